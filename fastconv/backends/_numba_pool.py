"""The numba backend's thread pool: one call's tasks side by side, the first on the calling thread.

The kernels release the GIL, so plain Python threads run them in parallel.
What costs time is handing work over. A thread asleep on a lock, or on the
GIL, wakes tens of microseconds after it is signalled, and a training step
makes about twenty calls, each with a start and an end. So:

- a waiting thread first polls, in compiled code without the GIL, for
  ``fastconv._threads.POLL_MICROSECONDS`` (``SPIN_TICKS`` time-stamp counter
  ticks): long enough to catch the next kernel of a training step (the
  layers' Python between two calls takes 40 to 220 µs), too short to matter
  to another library's threads. Then it sleeps on a condition variable;
- the calling thread announces a call from compiled code, having released
  the GIL, and (for kernels that take their tasks from a shared counter)
  lets the workers take the GIL first; a worker that found the GIL held
  would sleep on it;
- a worker counts its task as finished from compiled code, and is polling
  for the next call, GIL released, when the calling thread sees the count.
"""
import os
import threading

import numpy as np
from numba import config

from fastconv._threads import POLL_MICROSECONDS
from fastconv.backends._numba_kernels import _kernel
from fastconv.backends._numba_simd import add_one, load_acquire, pause, set_one_and_load, ticks

# The time-stamp counter's rate is not known (it is the CPU's nominal clock on x86): polls are timed as if
# it ticked this often per microsecond (2.3 GHz), the one place that assumes a rate.
TICKS_PER_MICROSECOND = 2300
# How long a waiting thread polls. Polls are also counted, so a CPU without a usable counter stops too.
SPIN_TICKS = POLL_MICROSECONDS * TICKS_PER_MICROSECOND
# How long the calling thread lets the workers go first (see Pool.run).
HAND_OFF_TICKS = 43 * TICKS_PER_MICROSECOND


# --------------------------------------------------------------------------- compiled waiting

@_kernel
def _spin_until(word, target, most):
    """Poll until word[0] >= target (True) or for about ``most`` counter ticks (False)."""
    end = ticks() + most
    for _ in range(most // 64):
        for _ in range(64):
            if load_acquire(word) >= target:
                return True
            pause()
        if ticks() > end:
            break
    return load_acquire(word) >= target


@_kernel
def _announce(generation, counter, most):
    """A new call (generation[0] += 1); then, unless ``most`` is 0, poll until a worker took a task from
    ``counter``, for ``most`` ticks at most (see ``_spin_until``)."""
    add_one(generation)
    if most:
        _spin_until(counter, 1, most)


@_kernel
def _finish_and_poll(finished, caller_sleeps, generation, target, most):
    """Count a task as finished; then 1 when the generation reaches ``target`` within ``most`` ticks (see
    ``_spin_until``), 0 when it does not, -1 without polling when the caller had gone to sleep and must be
    woken."""
    add_one(finished)
    if load_acquire(caller_sleeps):
        return -1
    return 1 if _spin_until(generation, target, most) else 0


@_kernel
def _announce_sleep(caller_sleeps, finished):
    """caller_sleeps[0] = 1, then finished[0]: a worker that finishes after this read sees the flag."""
    return set_one_and_load(caller_sleeps, finished)


# Uncompiled stand-ins (NUMBA_DISABLE_JIT): no polling, threads sleep instead; a lock for the atomics.
_atomic = threading.Lock()


def _spin_until_py(word, target, most):
    return word[0] >= target


def _announce_py(generation, counter, most):
    with _atomic:
        generation[0] += 1


def _finish_and_poll_py(finished, caller_sleeps, generation, target, most):
    with _atomic:
        finished[0] += 1
        return -1 if caller_sleeps[0] else int(generation[0] >= target)


def _announce_sleep_py(caller_sleeps, finished):
    with _atomic:
        caller_sleeps[0] = 1
        return finished[0]


if config.DISABLE_JIT:
    spin_until, announce, finish_and_poll, announce_sleep = (
        _spin_until_py, _announce_py, _finish_and_poll_py, _announce_sleep_py)
else:
    spin_until, announce, finish_and_poll, announce_sleep = _spin_until, _announce, _finish_and_poll, _announce_sleep


# --------------------------------------------------------------------------- the pool

class _Call:
    """One call's tasks for the pool's workers: each runs at most once, or is cancelled."""

    def __init__(self, tasks):
        self.tasks = tasks
        self.started = [False] * len(tasks)
        self.cancelled = [False] * len(tasks)
        self.errors = []
        self.finished = np.zeros(1, dtype=np.int64)  # tasks run to their end (atomic: finish_and_poll)
        self.caller_sleeps = np.zeros(1, dtype=np.int64)  # set once the caller stopped polling
        self.lock = threading.Condition()

    def start(self, i):
        """Whether task i is to run now: neither cancelled nor started before. It then counts as started."""
        with self.lock:
            if self.started[i] or self.cancelled[i]:
                return False
            self.started[i] = True
            return True

    def run(self, i):
        try:
            self.tasks[i]()
        except BaseException as exc:  # handed to the caller
            self.errors.append(exc)

    def wake_caller(self):
        with self.lock:
            self.lock.notify()

    def wait(self):
        """Cancel the tasks no worker has started (the work they would drain is done); wait for the rest."""
        with self.lock:
            for i, started in enumerate(self.started):
                self.cancelled[i] = not started
            running = sum(self.started)
        if spin_until(self.finished, running, SPIN_TICKS):
            return
        if announce_sleep(self.caller_sleeps, self.finished) >= running:  # the last one finished meanwhile
            return
        with self.lock:
            while self.finished[0] < running:
                self.lock.wait()


class _Worker:
    """A thread that runs the task of each new call, polling briefly for the next call before it sleeps."""

    def __init__(self, name, generation):
        self.generation = generation  # the pool's count of calls (shared)
        self.wake = threading.Condition()
        self.work = (None, 0)  # (call, task index) of the latest call that has a task for this thread
        self.asleep = False  # blocked on ``wake`` rather than polling
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def assign(self, call, i):
        with self.wake:
            self.work = (call, i)

    def notify_if_asleep(self):
        with self.wake:
            if self.asleep:
                self.wake.notify()

    def _loop(self):
        seen = 0  # the last generation looked at
        polled = False  # whether a newer generation has been seen already
        while True:
            if not (polled or spin_until(self.generation, seen + 1, SPIN_TICKS)):
                with self.wake:
                    self.asleep = True
                    while self.generation[0] <= seen:
                        self.wake.wait()
                    self.asleep = False
            with self.wake:
                seen = int(self.generation[0])
                call, i = self.work
                self.work = (None, 0)  # held no longer than the call: its tasks reference the caller's arrays
            polled = False
            if call is not None and call.start(i):
                call.run(i)
                # counted as finished, and polling again with the GIL released, which the caller then takes
                result = finish_and_poll(call.finished, call.caller_sleeps, self.generation, seen + 1, SPIN_TICKS)
                if result < 0:
                    call.wake_caller()
                polled = result > 0
            call = None


class Pool:
    """Worker threads, started on demand, that run one call's tasks at a time next to the calling thread."""

    def __init__(self, name):
        self._name = name
        self._forget()
        if hasattr(os, "register_at_fork"):
            # a forked child has none of the parent's threads: start new ones there
            os.register_at_fork(after_in_child=self._forget)

    def _forget(self):
        self._busy = threading.Lock()  # held by the call the workers serve
        self._workers = []
        self._generation = np.zeros(1, dtype=np.int64)

    def run(self, tasks, counter=None):
        """Run tasks that drain one shared queue of work: the first on this thread, the others on workers.

        When the first returns the queue is empty, so tasks that no worker
        has started yet are cancelled rather than waited for. A call made
        while another thread's call holds the workers runs all its tasks on
        its own thread, one after another (the first drains the queue).
        Re-raises the first error.

        ``counter``: the int64 array from which the tasks' compiled code
        takes its work (counter[0] rises as tasks are taken). The calling
        thread then waits, without the GIL, until a worker has taken a task
        (or for about ``HAND_OFF_TICKS``) before it starts its own.
        """
        if len(tasks) == 1 or not self._busy.acquire(blocking=False):
            for task in tasks:
                task()
            return
        try:
            if not self._workers:  # compiled here, where a failure is raised, not in a worker thread
                flag = np.zeros(1, dtype=np.int64)
                finish_and_poll(flag, flag, flag, 0, 0)
            while len(self._workers) < len(tasks) - 1:
                self._workers.append(_Worker(f"{self._name}-{len(self._workers) + 1}", self._generation))
            call = _Call(tasks[1:])
            workers = self._workers[:len(tasks) - 1]
            for i, worker in enumerate(workers):
                worker.assign(call, i)
            polling = not any(worker.asleep for worker in workers)  # a hint, read without the workers' locks
            announce(self._generation, self._generation if counter is None else counter,
                     HAND_OFF_TICKS if counter is not None and polling else 0)
            for worker in workers:
                worker.notify_if_asleep()
            try:
                tasks[0]()
            finally:
                call.wait()  # the workers write into arrays this call returns
        finally:
            self._busy.release()
        if call.errors:
            raise call.errors[0]
