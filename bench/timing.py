"""Interleaved timing of one benchmark on several implementations.

For each implementation the operation is built, called once on fresh state
(the *first call*: JIT compilation, first-touch allocation, thread-pool
start-up; reported on its own) and once more to choose how many calls make one
sample. Samples are then taken in rounds, one sample per implementation per
round, with the order rotated every round, so that noise from other processes
hits every implementation alike. Only these samples enter the statistics.

Before each sample the implementation runs untimed for ``settle_time``
seconds (its warm-up call, repeated): the thread pools of the implementation
measured just before (a multi-threaded BLAS spins for about 0.1 s after its
last call) go quiet, and each sample sees what a program calling only this
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

import fastconv


@dataclass(frozen=True)
class Impl:
    """Something to time: a fastconv backend, or the PyTorch yardstick."""

    name: str
    is_backend: bool = True

    def active(self):
        return fastconv.use_backend(self.name) if self.is_backend else contextlib.nullcontext()


@dataclass(frozen=True)
class Settings:
    repeat: int = 7  # samples per implementation ...
    min_repeat: int = 3  # ... but no fewer than this ...
    max_time: float = 5.0  # ... once its samples of one benchmark took this many seconds
    sample_time: float = 0.01  # calls are grouped so that a sample lasts at least this long
    max_number: int = 10_000
    settle_time: float = 0.0  # untimed calls before each sample, for at least this many seconds


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


def _seconds_per_call(fn, number):
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


def _failure(exc):
    return f"{type(exc).__name__}: {exc}"


def _prepare(case, impl, settings):
    try:
        return _calibrate(case, impl, settings)
    except Exception as exc:  # a broken implementation is reported, and the others are still measured
        return None, Measurement(impl.name, math.nan, 0, error=_failure(exc))


def _calibrate(case, impl, settings):
    with impl.active():
        run, warmup = case.make(impl)
        first = _seconds_per_call(warmup or run, 1)
        settle = warmup or run
        if case.fixed_number is not None:
            number = case.fixed_number
        elif settings.sample_time <= 0:
            number = 1
        else:
            once = _seconds_per_call(run, 1)
            number = min(settings.max_number, max(1, math.ceil(settings.sample_time / max(once, 1e-9))))
    return (run, settle), Measurement(impl.name, first, number)


def measure(case, impls, settings):
    """Time ``case`` on every implementation; returns one Measurement per implementation, in order."""
    if case.min_repeat is not None:
        settings = dataclasses.replace(settings, min_repeat=min(settings.min_repeat, case.min_repeat))
    prepared = [(impl,) + _prepare(case, impl, settings) for impl in impls]
    for round_index in range(settings.repeat):
        shift = round_index % len(prepared)
        for impl, calls, m in prepared[shift:] + prepared[:shift]:
            if m.done(settings):
                continue
            run, settle = calls
            try:
                with impl.active():
                    _settle(settle, settings.settle_time)
                    seconds = _seconds_per_call(run, m.number)
            except Exception as exc:  # as in _prepare
                m.error = _failure(exc)
                continue
            m.samples_s.append(seconds)
            m.spent_s += seconds * m.number
        if all(m.done(settings) for _, _, m in prepared):
            break
    return [m for _, _, m in prepared]


def summary(samples, scale=1.0):
    """(median, min, max) of samples, times ``scale``."""
    return (statistics.median(samples) * scale, min(samples) * scale, max(samples) * scale)
