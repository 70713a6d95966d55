/* A small thread pool for the compiled kernels (POSIX threads, or Win32 threads on Windows; serial
 * where neither is built).
 *
 * fc_pool_run(n, fn, arg) calls fn(arg, t) once for each t in [0, n): t = 0 on
 * the calling thread, the others on pool workers, and returns when all have
 * returned. Work is handed out inside fn through an atomic counter
 * (fc_next_task), so the result never depends on which thread ran what.
 *
 * Idle workers, and a caller waiting for them, poll for a short while
 * (fc_pool_set_poll_ns) to catch the next kernel of a sequence, then sleep on
 * a condition variable: they never hold a core for long after the work is
 * done. The pool touches no environment
 * variable and no other library's threads. After fork() the child starts
 * with an empty pool (its threads did not survive) and builds a new one.
 * A call made while another thread is using the pool runs on its caller
 * alone.
 */
#ifndef FASTCONV_FC_POOL_H
#define FASTCONV_FC_POOL_H

typedef void (*fc_task_fn)(void *arg, int thread);

/* Runs fn(arg, t) for t < num_threads; returns the number of threads that took part. */
int fc_pool_run(int num_threads, fc_task_fn fn, void *arg);

/* 1 when built with threads, 0 in a serial build. */
int fc_pool_threaded(void);

/* How long an idle thread polls for new work before it sleeps, in nanoseconds (0, the start: it sleeps at
   once). The backend sets it at import from fastconv._threads.POLL_MICROSECONDS. */
void fc_pool_set_poll_ns(long ns);

/* The next task number of a counter shared by the threads of one run. */
#if !defined(__GNUC__) && !defined(__clang__) && defined(_MSC_VER)
#include <intrin.h>
#endif
static inline long fc_next_task(long *counter)
{
#if defined(__GNUC__) || defined(__clang__)
    return __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED);
#elif defined(_MSC_VER)
    return _InterlockedExchangeAdd((volatile long *)counter, 1);
#else
    return (*counter)++; /* serial builds only */
#endif
}

#endif
