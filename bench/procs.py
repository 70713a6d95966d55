"""Worker processes seen from the report: start, ask, stop (the other side is ``bench.worker``)."""
import contextlib
import dataclasses
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path

from bench.timing import RemoteError

# a worker that takes longer to answer one request is taken for hung (the slowest request, a sample of the
# reference's inference on 10,000 images, takes about 15 s on a quiet machine)
ANSWER_TIMEOUT_S = 900.0
# the folder that holds the ``bench`` package, so that workers import this very copy of it
_BENCH_PARENT = str(Path(__file__).resolve().parent.parent)


# A worker measuring the fastconv of another source tree (``spec["source"]``) imports this bench first,
# then looks for everything else in that tree only: the folder holding bench (a source tree too) and
# the current directory leave the search path before fastconv is imported.
_FROM_TREE = ("import sys; sys.path.insert(0, {bench!r}); import bench.worker as worker; "
              "sys.path[:] = [{tree!r}] + [p for p in sys.path if p not in ('', {bench!r}, {cwd!r})]; "
              "sys.exit(worker.main())")
# Otherwise the worker measures the fastconv a user would import: the installed one comes before the
# folder holding bench (often the repository root, whose fastconv may be unbuilt), which goes last.
_INSTALLED = ("import sys; sys.path[:] = [p for p in sys.path if p not in ('', {bench!r}, {cwd!r})] + [{bench!r}]; "
              "import bench.worker as worker; sys.exit(worker.main())")


def _command(spec):
    if spec.get("source"):
        code = _FROM_TREE.format(bench=_BENCH_PARENT, tree=str(Path(spec["source"]).resolve()), cwd=os.getcwd())
    else:
        code = _INSTALLED.format(bench=_BENCH_PARENT, cwd=os.getcwd())
    return [sys.executable, "-c", code, json.dumps(spec)]


class Worker:
    """One worker process (``bench.worker``) and its line-by-line JSON conversation."""

    def __init__(self, spec, env):
        self.spec = spec
        env = dict(env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_BENCH_PARENT, env.get("PYTHONPATH")) if p)
        self.process = subprocess.Popen(_command(spec), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env=env)
        self._ready = False

    @property
    def name(self):
        return self.spec.get("name", self.spec["kind"])

    def _read(self):
        # one answer line per request, so nothing waits in the pipe's buffer when select says "nothing yet"
        if not select.select([self.process.stdout], [], [], ANSWER_TIMEOUT_S)[0]:
            self.process.kill()
            self.process.wait()
            raise RemoteError(f"worker process {self.name!r} gave no answer in {ANSWER_TIMEOUT_S:.0f} s; stopped")
        line = self.process.stdout.readline()
        if not line:
            code = self.process.wait()
            raise RemoteError(f"worker process {self.name!r} exited (status {code})")
        answer = json.loads(line)
        if "error" in answer:
            raise RemoteError(answer["error"])
        return answer

    def wait_ready(self):
        if not self._ready:
            self._read()
            self._ready = True

    def request(self, op, **args):
        self.wait_ready()
        if self.process.poll() is not None:
            raise RemoteError(f"worker process {self.name!r} exited (status {self.process.returncode})")
        try:
            self.process.stdin.write(json.dumps(dict(args, op=op)) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError:
            raise RemoteError(f"worker process {self.name!r} exited (status {self.process.wait()})") from None
        return self._read()

    @property
    def alive(self):
        return self.process.poll() is None

    def close(self, timeout=30):
        if self.process.poll() is None:
            with contextlib.suppress(OSError):
                self.process.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.process.stdin.flush()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for stream in (self.process.stdin, self.process.stdout):
            with contextlib.suppress(OSError):
                stream.close()


def _cpu_ticks(pid):
    """CPU time used by all threads of process ``pid`` so far, in clock ticks (None where /proc is absent)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[11]) + int(fields[12])  # utime, stime


def wait_until_idle(pid, window=0.03, limit=2.0):
    """Return once process ``pid`` has used no CPU for a ``window`` of seconds (at most ``limit`` seconds).

    After answering, a worker's thread pools may keep spinning (OpenBLAS about 0.1 s, OpenMP by its
    wait policy); the next implementation's sample would share the cores with them. A fixed order of
    turns puts the same neighbour before an implementation every round, so this would bias it.
    """
    before = _cpu_ticks(pid)
    if before is None:
        return
    end = time.perf_counter() + limit
    while time.perf_counter() < end:
        time.sleep(window)
        now = _cpu_ticks(pid)
        if now is None or now == before:
            return
        before = now


class ProcessRunner:
    """A timing runner (see ``bench.timing``) whose operations run in a worker process.

    A worker that dies (a crash in compiled code) fails the benchmark it was
    running; the next benchmark starts a new one.
    """

    def __init__(self, spec, env, covers=None):
        self.spec, self.env = spec, env
        self.name = spec["name"]
        self.kind = "torch" if spec["kind"] == "torch" else "backend"
        self.covers = covers or (lambda case: True)  # which benchmarks this implementation takes part in
        self.worker = None
        self.facts = None

    def start(self):
        if self.worker is None or not self.worker.alive:
            self.worker = Worker(self.spec, self.env)
        return self

    def describe(self):
        self.facts = self.start().worker.request("describe")
        return self.facts

    def prepare(self, case, settings):
        answer = self.start().worker.request("prepare", case=case.to_dict(), settings=dataclasses.asdict(settings))
        return answer["first_call_s"], answer["number"]

    def sample(self, number, settle_time):
        seconds = self.worker.request("sample", number=number, settle_time=settle_time)["seconds"]
        wait_until_idle(self.worker.process.pid)
        return seconds

    def release(self):
        if self.worker is not None and self.worker.alive:
            self.worker.request("release")

    def request(self, op, **args):
        return self.start().worker.request(op, **args)

    def close(self):
        if self.worker is not None:
            self.worker.close()
            self.worker = None
