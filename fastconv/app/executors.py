"""Where the models of a parallel run train: local worker processes or a Dask cluster.

Each executor comes with a *channel*: members send progress events through
it, and the run asks them through it to stop (Ctrl-C). A member task holds
only the channel's ``reporter``, a small picklable object.

- ``local_executor(jobs, threads)``: ``jobs`` worker processes on this
  machine, started with ``spawn`` (a forked child inherits the parent's
  thread-pool and BLAS state, and forking a threaded process is fragile), each running its kernels on
  ``threads`` threads: the worker sets ``FASTCONV_NUM_THREADS`` and its BLAS
  limit in its own process when it starts. Workers ignore SIGINT; Ctrl-C
  reaches the run, which asks them to stop. A pool that lost a process is
  replaced on the next submit.
- ``dask_executor(address)``: the workers of a running Dask cluster
  (a ``distributed.Client(address)``); events travel as the
  workers' logged events, the stop request as a ``distributed.Event``.
"""
import concurrent.futures
import multiprocessing
import os
import queue
import signal
import threading
import time
import uuid

from fastconv._threads import ENV_VAR as THREADS_ENV_VAR, cpu_count

__all__ = ["local_executor", "dask_executor", "default_jobs", "DaskMissing", "LocalExecutor", "Channel"]

DASK_EXTRA = 'pip install "fastconv[dask]"'
_STOP_POLL_S = 1.0  # how often a Dask member asks whether to stop (a round trip to the scheduler)


class DaskMissing(ImportError):
    """``distributed`` does not import: the ``dask`` extra is not installed."""


def default_jobs(members):
    """Members trained at once by default: one per CPU, at most as many as there are members."""
    return max(1, min(members, cpu_count()))


# -- in a worker process -------------------------------------------------------------------------------

_worker_channel = None  # (queue, stop event) of the run that started this worker process


def _start_local_worker(events, stop, threads):
    """Initializer of a local worker process: its kernel threads, its signals, its channel."""
    global _worker_channel
    os.environ[THREADS_ENV_VAR] = str(threads)  # this worker's own process, before any kernel runs
    from threadpoolctl import threadpool_limits

    threadpool_limits(threads, user_api="blas")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the run, which sets ``stop``
    _worker_channel = (events, stop)


class LocalReporter:
    """A member's side of a local run's channel (the queue and event its worker process was given)."""

    def report(self, event):
        if _worker_channel is not None:
            _worker_channel[0].put(event)

    def stop_requested(self):
        return _worker_channel is not None and _worker_channel[1].is_set()


class DaskReporter:
    """A member's side of a Dask run's channel: events logged by its worker, a named stop event."""

    def __init__(self, topic):
        self.topic = topic
        self._asked = 0.0
        self._stop = False

    def __getstate__(self):
        return {"topic": self.topic}

    def __setstate__(self, state):
        self.__init__(state["topic"])

    def report(self, event):
        from distributed import get_worker

        get_worker().log_event(self.topic, event)

    def stop_requested(self):
        now = time.monotonic()
        if not self._stop and now - self._asked >= _STOP_POLL_S:
            from distributed import Event

            self._asked = now
            self._stop = Event(self.topic).is_set()
        return self._stop


# -- in the process that runs the training ------------------------------------------------------------


class Channel:
    """The run's side: events from members (``poll``), a stop request to all of them (``request_stop``)."""

    def __init__(self, reporter, events, request_stop):
        self.reporter = reporter
        self._events = events  # a queue (get_nowait raises queue.Empty)
        self.request_stop = request_stop

    def poll(self):
        """The events that arrived since the last call."""
        arrived = []
        while True:
            try:
                arrived.append(self._events.get_nowait())
            except queue.Empty:
                return arrived


class LocalExecutor(concurrent.futures.Executor):
    """A ``ProcessPoolExecutor`` of spawned workers that is replaced when one of its processes dies.

    A dead worker fails the futures of every task its pool was running
    (``BrokenProcessPool``; the pool stops its other workers too); the run
    submits those again, and the next ``submit`` starts a fresh pool. The
    queue and event of the channel live in a manager process, so a worker
    killed while it reports cannot leave a lock held for the others.
    """

    def __init__(self, jobs, threads):
        self.jobs, self.threads = jobs, threads
        self._context = multiprocessing.get_context("spawn")
        self._manager = self._context.Manager()
        events, stop = self._manager.Queue(), self._manager.Event()
        self._initargs = (events, stop, threads)
        self._lock = threading.Lock()
        self._pool = None
        self.channel = Channel(LocalReporter(), events, stop.set)

    def _new_pool(self):
        return concurrent.futures.ProcessPoolExecutor(
            self.jobs, mp_context=self._context, initializer=_start_local_worker, initargs=self._initargs)

    def submit(self, fn, /, *args, **kwargs):
        with self._lock:
            if self._pool is None:
                self._pool = self._new_pool()
            try:
                return self._pool.submit(fn, *args, **kwargs)
            except concurrent.futures.process.BrokenProcessPool:
                self._pool.shutdown(wait=True)
                self._pool = self._new_pool()
                return self._pool.submit(fn, *args, **kwargs)

    def shutdown(self, wait=True, *, cancel_futures=False):
        with self._lock:
            if self._pool is not None:
                self._pool.shutdown(wait=wait, cancel_futures=cancel_futures)
                self._pool = None
            self._manager.shutdown()


def local_executor(jobs, threads):
    """``jobs`` spawned worker processes, ``threads`` kernel threads each; ``.channel`` is its channel."""
    if jobs < 1 or threads < 1:
        raise ValueError(f"need jobs >= 1 and threads >= 1, got jobs={jobs}, threads={threads}")
    return LocalExecutor(jobs, threads)


class _DaskExecutor(concurrent.futures.Executor):
    """Tasks on a Dask cluster, as ``concurrent.futures`` futures, on the client this executor closes.

    Like ``Client.get_executor()``, except that a task's result is released
    on the cluster as soon as it has arrived here: a key still held would be
    computed again (a model trained twice) when the worker holding it dies.
    The futures count as running from the start: a task on the cluster is
    stopped through the channel, not cancelled.
    """

    def __init__(self, client):
        from distributed import Event

        self.client = client
        self.topic = f"fastconv-{uuid.uuid4().hex}"
        self._stop_event = Event(self.topic, client=client)
        events = queue.Queue()
        self.channel = Channel(DaskReporter(self.topic), events, self._stop_event.set)
        client.subscribe_topic(self.topic, lambda event: events.put(event[1]))

    def submit(self, fn, /, *args, **kwargs):
        result = concurrent.futures.Future()
        result.set_running_or_notify_cancel()

        def transfer(task):
            try:
                result.set_result(task.result())
            except BaseException as exc:  # the task's own exception, or the cluster's (KilledWorker)
                result.set_exception(exc)
            finally:
                task.release()

        self.client.submit(fn, *args, pure=False, **kwargs).add_done_callback(transfer)
        return result

    def shutdown(self, wait=True, *, cancel_futures=False):
        try:
            self.client.unsubscribe_topic(self.topic)
        finally:
            self.client.close()


def import_distributed():
    """The ``distributed`` module, or ``DaskMissing`` saying which extra to install."""
    try:
        import distributed
    except ImportError as exc:
        raise DaskMissing(f"--dask needs Dask's distributed scheduler, which is not installed ({exc}): "
                          f"{DASK_EXTRA}") from None
    return distributed


def dask_executor(address, timeout=10):
    """An executor on the Dask cluster whose scheduler listens at ``address``; ``.channel`` is its channel.

    Raises ``DaskMissing`` without the extra and ``OSError`` when the
    scheduler does not answer within ``timeout`` seconds.
    """
    distributed = import_distributed()
    try:
        client = distributed.Client(address, timeout=timeout)
    except (OSError, TimeoutError, ValueError) as exc:
        raise OSError(f"cannot reach the Dask scheduler at {address!r} ({type(exc).__name__}: {exc})") from None
    return _DaskExecutor(client)
