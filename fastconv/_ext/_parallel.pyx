"""The thread pool of the compiled kernels (``fc_pool.c``), and what it reports.

Kernels call ``run_tasks(n, fn, arg)``: ``fn(arg, t)`` runs once on each of
``n`` threads (``t = 0`` on the caller) and takes tasks from a counter in
``arg`` until none are left, so results never depend on which thread ran
which task. Idle threads poll for new work for ``set_poll_ns`` nanoseconds
(the backend sets ``fastconv._threads.POLL_MICROSECONDS`` at import), then
sleep; the pool changes no process-wide setting, and a child process after
``fork`` builds its own.
"""
cdef extern from "fc_pool.h":
    int fc_pool_run(int num_threads, fc_task_fn fn, void *arg) nogil
    int fc_pool_threaded() nogil
    void fc_pool_set_poll_ns(long ns) nogil


cdef int run_tasks(int num_threads, fc_task_fn fn, void *arg) noexcept nogil:
    return fc_pool_run(num_threads, fn, arg)


def set_poll_ns(long ns):
    """How long an idle thread of the pool polls for new work before it sleeps, in nanoseconds."""
    if ns < 0:
        raise ValueError(f"ns must be >= 0, got {ns}")
    fc_pool_set_poll_ns(ns)


def threaded():
    """True when the extensions were built with threads (False: a serial build)."""
    return bool(fc_pool_threaded())


cdef void _nothing(void *arg, int thread) noexcept nogil:
    pass


def team_size(int num_threads):
    """Threads that take part in a run asked for ``num_threads`` threads (1 in a serial build)."""
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    cdef int team
    with nogil:
        team = fc_pool_run(num_threads, _nothing, NULL)
    return team
