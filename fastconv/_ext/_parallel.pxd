# The thread pool every kernel runs on (fc_pool.h): fn(arg, t) for each thread t of a run.
cdef extern from "fc_pool.h":
    ctypedef void (*fc_task_fn)(void *arg, int thread) noexcept nogil
    long fc_next_task(long *counter) noexcept nogil

cdef int run_tasks(int num_threads, fc_task_fn fn, void *arg) noexcept nogil
