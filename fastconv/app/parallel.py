"""Models of a run trained as independent tasks on any ``concurrent.futures``-style executor.

A task (``MemberTask``) is a picklable description of one model: its
settings and seed, where the run found MNIST (folder and SHA-256), the
backend, and the model's folder in the output. The function that runs it,
``train_member``, loads the data itself (the recorded folder if it has the
same files, else ``$FASTCONV_DATA``, the cache or a download, always checked
against the recorded checksums), trains, and returns the parameters, the
history and the test softmax outputs; the process that submitted it writes
the model's folder. Nothing of size travels to a worker, and no shared file
system is needed. Where the worker does see the run's folder (the same
machine, or a shared file system), the model keeps its checkpoints there:
one that was lost with its worker continues from its last checkpoint when it
is submitted again, and one stopped by Ctrl-C leaves a checkpoint that
``--resume`` continues.

A model trained this way is the model trained alone with the same seed,
settings and backend, bit for bit: it runs the same ``Training`` on the same
data, one model per process at a time (the book's network draws its weights
and dropout masks from ``np.random``, which is per process).
"""
import concurrent.futures
import dataclasses
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import fastconv
from fastconv.app._interrupts import deferred_interrupts
from fastconv.app.checkpoint import remove_temporaries
from fastconv.app.progress import RunProgress
from fastconv.app.runs import CHECKPOINT, load_data, member_outcome, write_member
from fastconv.app.settings import TrainConfig, steps_per_epoch
from fastconv.app.training import Training

__all__ = ["MemberTask", "MemberStopped", "train_member", "run_tasks", "ParallelTraining"]

_STEP_REPORT_S = 1.0  # least time between two step reports of a model
_POLL_S = 0.2  # how often the run looks at events while it waits for models
_LOST_WORKER = ("BrokenProcessPool", "KilledWorker", "CommClosedError")  # a task's worker died, not the task


class MemberStopped(Exception):
    """A model stopped because the run asked it to (Ctrl-C, or another model failed)."""


@dataclasses.dataclass(frozen=True)
class MemberTask:
    """One model to train, small enough to send anywhere."""

    key: int  # the model's number in its run
    config: dict  # TrainConfig.to_dict()
    seed: int
    source: dict  # where the run found MNIST: {"folder", "sha256": {file: digest}}
    download: bool
    backend: str
    folder: str  # the model's folder (absolute)
    run_folder: str  # the folder with the run's config.json (absolute)
    reporter: Any = None  # the channel's member side (progress events, stop requests), or None


class _Silent:
    def report(self, event):
        pass

    def stop_requested(self):
        return False


_ONE_MODEL_PER_PROCESS = threading.Lock()


def _shared_folder(task):
    """The model's folder when this process sees the run's own folder (its config.json), else None."""
    try:
        with open(Path(task.run_folder) / "config.json") as f:  # (settings added since it was written: defaults)
            visible = TrainConfig.from_dict(json.load(f)) == TrainConfig.from_dict(task.config)
    except (OSError, ValueError, TypeError):
        return None
    folder = Path(task.folder)
    return folder if visible and folder.is_dir() else None


def train_member(task):
    """Train the model of ``task`` (continuing its checkpoint if the run's folder is visible here).

    Returns ``{"params", "history", "test_proba", "val_proba"}`` (``val_proba``
    None without a validation split). Raises
    ``MemberStopped`` when the run asks its models to stop.
    """

    reporter = task.reporter or _Silent()
    with _ONE_MODEL_PER_PROCESS:
        if reporter.stop_requested():
            raise MemberStopped(f"model {task.key} was not started: the run is stopping")
        config = TrainConfig.from_dict(task.config)
        data, _ = load_data(config, None, task.download, recorded=task.source)
        folder = _shared_folder(task)
        checkpoint = None if folder is None else folder / CHECKPOINT
        if folder is not None:
            remove_temporaries(folder)  # a write cut short when an earlier attempt's worker died

        def report(kind, **fields):
            reporter.report(dict(fields, key=task.key, kind=kind))

        with fastconv.use_backend(task.backend):
            log = lambda text: report("log", text=text)  # noqa: E731
            if checkpoint is not None and checkpoint.is_file():
                training = Training.resume(checkpoint, data, log=log, config=config)
            else:
                training = Training(config, task.seed, data, checkpoint_path=checkpoint, log=log)
            position = lambda: {"epoch": training.epoch, "step": training.step,  # noqa: E731
                                "steps_per_epoch": training.steps_per_epoch, "epochs": config.epochs}
            report("start", pid=os.getpid(), host=socket.gethostname(), threads=fastconv.get_num_threads(),
                   resumed=training.epoch > 0 or training.step > 0, **position())
            last_report = [time.monotonic()]

            def on_step(_):
                if reporter.stop_requested():
                    raise KeyboardInterrupt  # between two steps: the checkpoint holds whole steps
                now = time.monotonic()
                if now - last_report[0] >= _STEP_REPORT_S:
                    last_report[0] = now
                    report("step", **position())

            try:
                training.run(on_step=on_step)
            except KeyboardInterrupt:
                where = f"its checkpoint is {checkpoint}" if checkpoint is not None else "no checkpoint is kept"
                raise MemberStopped(f"model {task.key} stopped on request; {where}") from None
            params, history = member_outcome(training, data)
    return {"params": params, "history": history, "test_proba": training.test_proba, "val_proba": training.val_proba}


def _is_lost_worker(exc):
    return any(cls.__name__ in _LOST_WORKER for cls in type(exc).__mro__)


def run_tasks(executor, tasks, on_done, *, channel=None, on_event=None, max_attempts=3):
    """Run ``train_member`` on each task on ``executor``; call ``on_done(task, result)`` here as each finishes.

    A task whose worker was lost is submitted again (at most
    ``max_attempts`` times in all). On ``KeyboardInterrupt`` here, or when a
    task fails, the models still running are asked to stop (they save a
    checkpoint), those that finish meanwhile are kept (``on_done``), and
    the interrupt or the failure is raised. ``on_event(event)`` receives the
    models' progress events, and ``{"key", "kind": "lost", "reason"}``.
    """
    on_event = on_event or (lambda event: None)
    pending, attempts = {}, {}

    def submit(task):
        attempts[task.key] = attempts.get(task.key, 0) + 1
        pending[executor.submit(train_member, task)] = task

    def pass_events():
        for event in channel.poll() if channel is not None else ():
            on_event(event)

    def settle(future, task):
        """Hand over a finished task's result; resubmit it if its worker was lost; else raise its error."""
        error = future.exception()
        if error is None:
            on_done(task, future.result())
        elif _is_lost_worker(error) and attempts[task.key] < max_attempts:
            on_event({"key": task.key, "kind": "lost", "reason": f"{type(error).__name__}: {error}"})
            submit(task)
        else:
            raise error

    try:
        for task in tasks:
            submit(task)
        while pending:
            done, _ = concurrent.futures.wait(list(pending), timeout=_POLL_S,
                                              return_when=concurrent.futures.FIRST_COMPLETED)
            pass_events()
            for future in done:
                settle(future, pending.pop(future))
            del done  # a finished Dask future is released with its last reference
    except BaseException:
        _stop(pending, channel, on_done, pass_events)
        raise


def _stop(pending, channel, on_done, pass_events):
    """Ask the running models to stop and wait for them; keep those that finish anyway."""
    if channel is not None:
        channel.request_stop()
    for future in list(pending):
        if future.cancel():
            del pending[future]
    while pending:
        done, _ = concurrent.futures.wait(list(pending), timeout=_POLL_S,
                                          return_when=concurrent.futures.FIRST_COMPLETED)
        pass_events()
        for future in done:
            task = pending.pop(future)
            if not future.cancelled() and future.exception() is None:
                on_done(task, future.result())


class ParallelTraining:
    """Train the models of runs as tasks on ``executor`` (its ``channel`` attribute, if any, carries progress).

    ``description`` is said in the run's first line. ``on_event`` also
    receives every progress event (after the display).
    """

    def __init__(self, executor, description, *, download=True, progress=True, max_attempts=3, on_event=None):
        self.executor = executor
        self.channel = getattr(executor, "channel", None)
        self.description = description
        self.download = download
        self.progress = progress
        self.max_attempts = max_attempts
        self.on_event = on_event

    def close(self):
        """Shut the executor down (its workers, or the connection to the cluster)."""
        self.executor.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def train(self, config, source, data, members, out, log=print):
        """Train ensemble members ``[(folder, seed), ...]`` of the run in ``out``.

        Returns ``[(None, history, test softmax, validation softmax)]``.

        Each member's folder is written as soon as it finishes.
        """
        jobs = [(f"member {int(seed) - config.seed + 1}", folder, config, seed, out) for folder, seed in members]
        return self.train_models(source, data, jobs, log)

    def train_models(self, source, data, models, log=print):
        """Train ``[(name, folder, config, seed, run_folder), ...]``; return what ``train`` does, in order."""
        x_train, _ = data[0]
        backend = fastconv.get_backend()
        tasks = []
        for key, (_, folder, config, seed, run_folder) in enumerate(models):
            Path(folder).mkdir(parents=True, exist_ok=True)
            tasks.append(MemberTask(key=key, config=config.to_dict(), seed=int(seed), source=source,
                                    download=self.download, backend=backend, folder=str(Path(folder).absolute()),
                                    run_folder=str(Path(run_folder).absolute()),
                                    reporter=None if self.channel is None else self.channel.reporter))
        display = RunProgress({key: name for key, (name, *_) in enumerate(models)},
                              {key: config.epochs * steps_per_epoch(x_train.shape[0], config.batch_size)
                               for key, (_, _, config, _, _) in enumerate(models)},
                              enabled=self.progress, log=log)
        results = [None] * len(models)

        def on_event(event):
            display.handle(event)
            if self.on_event is not None:
                self.on_event(event)

        def on_done(task, result):
            _, folder, config, seed, _ = models[task.key]
            with deferred_interrupts():  # a model's folder is written whole
                write_member(Path(folder), config, seed, data, result["params"], result["history"])
                results[task.key] = (None, result["history"], result["test_proba"], result["val_proba"])
            display.done(task.key, f"test accuracy {100 * result['history']['test_acc']:.2f} %")
            if self.on_event is not None:
                self.on_event({"key": task.key, "kind": "done"})

        try:
            run_tasks(self.executor, tasks, on_done, channel=self.channel, on_event=on_event,
                      max_attempts=self.max_attempts)
        finally:
            display.close()
        return results


# -- the command line's choice of executor --------------------------------------------------------------


def add_parallel_arguments(parser):
    """``--jobs`` and ``--dask``, for the commands that train several models."""
    parser.add_argument("--jobs", type=int, metavar="J",
                        help="models trained at once in worker processes on this machine, each on CPUs/J kernel "
                             "threads (default: one per CPU, at most one per model; 1: one after another here)")
    parser.add_argument("--dask", metavar="ADDRESS",
                        help="train the models on the Dask cluster whose scheduler is at ADDRESS (e.g. "
                             "tcp://host:8786; needs the dask extra)")


def parallel_training(models, *, jobs=None, dask=None, download=True, progress=True, on_event=None,
                      here_for_one=True):
    """The ``ParallelTraining`` for ``models`` models as the options ask, or None to train them here, in turn.

    With one job at a time, ``here_for_one`` asks for None, else for one
    worker process with all the CPUs' threads.

    Raises ``ValueError`` for a bad ``jobs``, ``executors.DaskMissing``
    without the dask extra, ``OSError`` when the scheduler does not answer.
    """
    from fastconv._threads import cpu_count
    from fastconv.app import executors

    if jobs is not None and (jobs < 1 or dask is not None):
        raise ValueError(f"--jobs must be at least 1, got {jobs}" if jobs < 1 else
                         "--jobs is for this machine's processes; a Dask cluster has its own workers")
    if dask is not None:
        executor = executors.dask_executor(dask)
        workers = executor.client.scheduler_info().get("workers", {})
        description = (f"models trained on the Dask cluster at {dask} ({len(workers)} worker"
                       f"{'s' if len(workers) != 1 else ''} now)")
    else:
        jobs = min(jobs or executors.default_jobs(models), models)
        if jobs < 2 and here_for_one:
            return None
        threads = max(1, cpu_count() // jobs)
        executor = executors.local_executor(jobs, threads)
        description = (f"{jobs} model{'s' if jobs != 1 else ''} at a time in worker processes, {threads} kernel "
                       f"thread{'s' if threads != 1 else ''} each ({executors.THREADS_ENV_VAR}={threads} in each "
                       "worker)")
    return ParallelTraining(executor, description, download=download, progress=progress, on_event=on_event)
