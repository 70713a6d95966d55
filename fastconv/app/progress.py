"""One progress display for the models of a parallel run, fed by the events its members send.

A single bar counts the training steps of all models together (so its ETA
is the run's); its text says how many models are finished and the epoch
each running one is in. The members' own lines (epoch summaries, resumes)
are printed above it, prefixed with the model's name.
"""
import contextlib

__all__ = ["RunProgress"]


class RunProgress:
    """Follow models ``names[key]`` of ``steps[key]`` training steps each; ``handle`` their events.

    Events are dicts with ``key``, ``kind`` (``start``, ``step``, ``log``,
    ``lost``) and, for ``start`` and ``step``, ``epoch`` (finished epochs),
    ``step`` (steps into the current one), ``steps_per_epoch`` and ``epochs``.
    """

    def __init__(self, names, steps, *, enabled=True, log=print):
        self.names, self.steps, self.log = dict(names), dict(steps), log
        self.position = {key: 0 for key in self.names}
        self.epoch = {}  # running models: (epoch now, epochs)
        self.finished = set()
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=sum(self.steps.values()), unit="step", leave=False, dynamic_ncols=True)
            self._refresh()

    def _say(self, text):
        if self.bar is None:
            self.log(text)
        else:
            with self.bar.external_write_mode():
                self.log(text)

    def _refresh(self):
        if self.bar is None:
            return
        running = ", ".join(f"{self.names[key]} epoch {now}/{epochs}" for key, (now, epochs) in self.epoch.items())
        self.bar.set_description_str(f"{len(self.finished)}/{len(self.names)} trained", refresh=False)
        self.bar.set_postfix_str(running, refresh=False)
        self.bar.n = sum(self.position.values())
        self.bar.refresh()

    def handle(self, event):
        key, kind = event["key"], event["kind"]
        if key in self.finished:
            return
        if kind in ("start", "step"):
            self.position[key] = event["epoch"] * event["steps_per_epoch"] + event["step"]
            self.epoch[key] = (min(event["epoch"] + 1, event["epochs"]), event["epochs"])
        if kind == "start":
            where = (f"continues from its checkpoint at epoch {event['epoch'] + 1}, step {event['step']}"
                     if event["resumed"] else "starts")
            self._say(f"{self.names[key]}: {where} (process {event['pid']} on {event['host']}, "
                      f"{event['threads']} kernel thread{'s' if event['threads'] != 1 else ''})")
        elif kind == "log":
            self._say(f"{self.names[key]}: {event['text']}")
        elif kind == "lost":
            self.epoch.pop(key, None)
            self._say(f"{self.names[key]}: its worker was lost ({event['reason']}); it is submitted again")
        self._refresh()

    def done(self, key, summary):
        """Model ``key`` finished; ``summary`` says how it did."""
        self.finished.add(key)
        self.position[key] = self.steps[key]
        self.epoch.pop(key, None)
        self._say(f"{self.names[key]}: finished, {summary}")
        self._refresh()

    def close(self):
        if self.bar is not None:
            with contextlib.suppress(Exception):
                self.bar.close()
