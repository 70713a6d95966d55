"""Interleaved timing of one benchmark on several implementations.

Each implementation is a *runner*: a ``LocalRunner`` runs the operation in
this process (every worker process of the report holds one), and
``bench.procs.ProcessRunner`` forwards the same three calls (prepare, sample,
release) to a worker process. For each implementation the operation is built,
called once on fresh state (the *first call*: JIT compilation, first-touch
allocation, thread-pool start-up; reported on its own) and once more to choose
how many calls make one sample. Samples are then taken in rounds, one sample
per implementation per round, with the order rotated every round, so that
noise from other processes hits every implementation alike. Only these
samples enter the statistics.

Before each sample the implementation runs untimed for ``settle_time``
seconds (its warm-up call, repeated, at least once): the thread pools of the
implementation measured just before (a multi-threaded BLAS or an OpenMP pool
keeps spinning for up to about 0.1 s after its last call, in whichever process
it lives) go quiet, and each sample sees what a program calling only this
implementation sees, rather than its neighbour's leftovers.
"""
import contextlib
import dataclasses
import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Optional


class RemoteError(Exception):
    """An operation failed in a worker process; the message names the exception raised there."""


@dataclass(frozen=True)
class Settings:
    repeat: int = 7  # samples per implementation ...
    min_repeat: int = 3  # ... but no fewer than this ...
    max_time: float = 5.0  # ... once its samples of one benchmark took this many seconds
    sample_time: float = 0.01  # calls are grouped so that a sample lasts at least this long
    max_number: int = 10_000
    settle_time: float = 0.0  # untimed calls before each sample, for at least this many seconds

    def for_case(self, case):
        """These settings with the case's own limits applied."""
        settings = self
        if case.min_repeat is not None:
            settings = dataclasses.replace(settings, min_repeat=min(settings.min_repeat, case.min_repeat))
        if case.repeat is not None and case.repeat > settings.repeat:
            settings = dataclasses.replace(settings, repeat=case.repeat)
        if case.max_time is not None and settings.max_time > 0:  # 0: a smoke run, every limit at its least
            settings = dataclasses.replace(settings, max_time=case.max_time)
        if case.settle_time is not None:
            settings = dataclasses.replace(settings, settle_time=case.settle_time)
        return settings


@dataclass
class Measurement:
    impl: str
    first_call_s: float
    number: int
    samples_s: list = field(default_factory=list)  # seconds per call, one entry per sample
    spent_s: float = 0.0
    error: Optional[str] = None  # why the implementation failed; it is then left out of later rounds

    def done(self, settings):
        if self.error is not None:
            return True
        n = len(self.samples_s)
        return n >= settings.repeat or (n >= settings.min_repeat and self.spent_s >= settings.max_time)


@contextlib.contextmanager
def _gc_paused():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def seconds_per_call(fn, number):
    with _gc_paused():
        start = time.perf_counter()
        for _ in range(number):
            fn()
        return (time.perf_counter() - start) / number


def _settle(fn, seconds):
    """Call ``fn`` untimed until ``seconds`` have passed (not at all for 0)."""
    if seconds <= 0:
        return
    end = time.perf_counter() + seconds
    while True:
        fn()
        if time.perf_counter() >= end:
            return


class LocalRunner:
    """Runs benchmarks in this process; ``factory(case)`` returns ``(run, warmup or None)``."""

    def __init__(self, name, factory, kind="backend"):
        self.name = name
        self.kind = kind
        self._factory = factory
        self._calls = None

    def prepare(self, case, settings):
        """Build the operation, call it once on fresh state; returns (first call s, calls per sample)."""
        run, warmup = self._factory(case)
        self._calls = run, warmup or run
        first = seconds_per_call(warmup or run, 1)
        if case.fixed_number is not None:
            return first, case.fixed_number
        if settings.sample_time <= 0:
            return first, 1
        once = seconds_per_call(run, 1)
        return first, min(settings.max_number, max(1, math.ceil(settings.sample_time / max(once, 1e-9))))

    def sample(self, number, settle_time):
        run, settle = self._calls
        _settle(settle, settle_time)
        return seconds_per_call(run, number)

    def release(self):
        self._calls = None


def _failure(exc):
    return str(exc) if isinstance(exc, RemoteError) else f"{type(exc).__name__}: {exc}"


def _prepare(case, runner, settings):
    try:
        first, number = runner.prepare(case, settings)
    except Exception as exc:  # a broken implementation is reported, and the others are still measured
        return Measurement(runner.name, math.nan, 0, error=_failure(exc))
    return Measurement(runner.name, first, number)


def measure(case, runners, settings):
    """Time ``case`` on every runner; returns one Measurement per runner, in order."""
    settings = settings.for_case(case)
    prepared = [(runner, _prepare(case, runner, settings)) for runner in runners]
    try:
        for round_index in range(settings.repeat):
            shift = round_index % len(prepared)
            for runner, m in prepared[shift:] + prepared[:shift]:
                if m.done(settings):
                    continue
                try:
                    seconds = runner.sample(m.number, settings.settle_time)
                except Exception as exc:  # as in _prepare
                    m.error = _failure(exc)
                    continue
                m.samples_s.append(seconds)
                m.spent_s += seconds * m.number
            if all(m.done(settings) for _, m in prepared):
                break
    finally:
        for runner, _ in prepared:
            with contextlib.suppress(Exception):  # a dead worker has nothing left to release
                runner.release()
    return [m for _, m in prepared]


def summary(samples, scale=1.0):
    """(median, min, max) of samples, times ``scale``."""
    return (statistics.median(samples) * scale, min(samples) * scale, max(samples) * scale)
