/* The thread pool of fc_pool.h. */
#include "fc_pool.h"

#if defined(FASTCONV_THREADS) && FASTCONV_THREADS

#define FC_POOL_MAX_THREADS 256 /* the caller and 255 workers */

/* What the pool needs of the system, on Windows (Win32 threads, slim reader/writer locks, condition
   variables, interlocked operations) and elsewhere (POSIX threads, GCC/Clang atomics): a lock, a
   condition variable, a thread, atomic loads and stores with their order, a clock. */
#if defined(_WIN32)
#ifndef WIN32_LEAN_AND_MEAN
#define WIN32_LEAN_AND_MEAN
#endif
#include <windows.h>

typedef SRWLOCK fc_mutex;
typedef CONDITION_VARIABLE fc_cond;
#define FC_MUTEX_INIT SRWLOCK_INIT
#define FC_COND_INIT CONDITION_VARIABLE_INIT
typedef LONG fc_count; /* a number of threads */
typedef LONG fc_run;   /* a run's number, compared for equality only (it may wrap) */
typedef LONG fc_ns;    /* the polling time */

static void mutex_lock(fc_mutex *m) { AcquireSRWLockExclusive(m); }
static int mutex_trylock(fc_mutex *m) { return TryAcquireSRWLockExclusive(m) != 0; }
static void mutex_unlock(fc_mutex *m) { ReleaseSRWLockExclusive(m); }
static void cond_wait(fc_cond *c, fc_mutex *m) { SleepConditionVariableSRW(c, m, INFINITE, 0); }
static void cond_signal(fc_cond *c) { WakeConditionVariable(c); }
static void cond_broadcast(fc_cond *c) { WakeAllConditionVariable(c); }

/* Aligned LONGs are read and written whole; MemoryBarrier() (a full barrier) gives the order. */
static LONG load_acquire(const volatile LONG *p)
{
    LONG v = *p;
    MemoryBarrier();
    return v;
}
static LONG load_relaxed(const volatile LONG *p) { return *p; }
static void store_release(volatile LONG *p, LONG v)
{
    MemoryBarrier();
    *p = v;
}
static void store_relaxed(volatile LONG *p, LONG v) { *p = v; }
static LONG decrement(volatile LONG *p) { return InterlockedDecrement(p); } /* a full barrier too */

static void cpu_relax(void) { YieldProcessor(); }

static long long now_ns(void)
{
    LARGE_INTEGER t, frequency;
    QueryPerformanceCounter(&t);
    QueryPerformanceFrequency(&frequency);
    const long long f = frequency.QuadPart;
    return t.QuadPart / f * 1000000000LL + t.QuadPart % f * 1000000000LL / f;
}

static void worker_main(int id);

static DWORD WINAPI worker_thread(LPVOID id)
{
    worker_main((int)(INT_PTR)id);
    return 0;
}

/* Starts worker id, detached; returns 0 when it started. */
static int start_thread(int id)
{
    HANDLE thread = CreateThread(NULL, 0, worker_thread, (LPVOID)(INT_PTR)id, 0, NULL);
    if (thread == NULL)
        return 1;
    CloseHandle(thread);
    return 0;
}

/* Windows has no signals to keep from the workers, and no fork. */
typedef int fc_signals;
static void block_signals(fc_signals *previous) { *previous = 0; }
static void restore_signals(const fc_signals *previous) { (void)previous; }
static void register_fork_handlers(void) {}

#else /* POSIX */
#include <pthread.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

typedef pthread_mutex_t fc_mutex;
typedef pthread_cond_t fc_cond;
#define FC_MUTEX_INIT PTHREAD_MUTEX_INITIALIZER
#define FC_COND_INIT PTHREAD_COND_INITIALIZER
typedef int fc_count;
typedef unsigned long fc_run;
typedef long fc_ns;

static void mutex_lock(fc_mutex *m) { pthread_mutex_lock(m); }
static int mutex_trylock(fc_mutex *m) { return pthread_mutex_trylock(m) == 0; }
static void mutex_unlock(fc_mutex *m) { pthread_mutex_unlock(m); }
static void cond_wait(fc_cond *c, fc_mutex *m) { pthread_cond_wait(c, m); }
static void cond_signal(fc_cond *c) { pthread_cond_signal(c); }
static void cond_broadcast(fc_cond *c) { pthread_cond_broadcast(c); }

#define load_acquire(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define load_relaxed(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define store_release(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define store_relaxed(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define decrement(p) __atomic_sub_fetch((p), 1, __ATOMIC_ACQ_REL)

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static long long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

static void worker_main(int id);

static void *worker_thread(void *id)
{
    worker_main((int)(long)id);
    return NULL;
}

static int start_thread(int id)
{
    pthread_t thread;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    int failed = pthread_create(&thread, &attr, worker_thread, (void *)(long)id);
    pthread_attr_destroy(&attr);
    return failed;
}

/* Workers inherit a mask blocking every signal: signals go to the caller's threads. */
typedef sigset_t fc_signals;
static void block_signals(fc_signals *previous)
{
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, previous);
}
static void restore_signals(const fc_signals *previous) { pthread_sigmask(SIG_SETMASK, previous, NULL); }

static void register_fork_handlers(void);
#endif

/* How long an idle thread polls for new work before it sleeps (fc_pool_set_poll_ns); 0 until set. */
static fc_ns poll_ns;

static fc_mutex run_lock = FC_MUTEX_INIT;  /* one run at a time */
static fc_mutex state_lock = FC_MUTEX_INIT;
static fc_cond work_ready = FC_COND_INIT;
static fc_cond work_done = FC_COND_INIT;
static int workers;              /* worker threads started (ids 1..workers) */
static int sleeping;             /* workers waiting on work_ready */
static int caller_sleeping;
static fc_run generation;        /* bumped for every run */
static fc_count remaining;       /* workers of the current run still working */
static fc_task_fn job_fn;
static void *job_arg;
static fc_run assigned[FC_POOL_MAX_THREADS]; /* the run each worker takes part in */
static int fork_handlers_registered;

/* Polls until *word differs from seen (or for poll_ns); returns 1 when it changed. */
static int spin_until_changed(const fc_run *word, fc_run seen)
{
    long long deadline = now_ns() + load_relaxed(&poll_ns);
    for (;;) {
        for (int i = 0; i < 64; i++) {
            if (load_acquire(word) != seen)
                return 1;
            cpu_relax();
        }
        if (now_ns() > deadline)
            return 0;
    }
}

static int spin_until_zero(const fc_count *word)
{
    long long deadline = now_ns() + load_relaxed(&poll_ns);
    for (;;) {
        for (int i = 0; i < 64; i++) {
            if (load_acquire(word) == 0)
                return 1;
            cpu_relax();
        }
        if (now_ns() > deadline)
            return 0;
    }
}

static void worker_main(int id)
{
    fc_run seen = 0; /* any run so far counts as new: assigned[] says which is ours */
    for (;;) {
        if (!spin_until_changed(&generation, seen)) {
            mutex_lock(&state_lock);
            sleeping++;
            while (load_relaxed(&generation) == seen)
                cond_wait(&work_ready, &state_lock);
            sleeping--;
            mutex_unlock(&state_lock);
        }
        /* a worker that slept through runs it had no part in just catches up */
        seen = load_acquire(&generation);
        if (load_relaxed(&assigned[id]) != seen)
            continue;
        job_fn(job_arg, id);
        if (decrement(&remaining) == 0) {
            mutex_lock(&state_lock);
            if (caller_sleeping)
                cond_signal(&work_done);
            mutex_unlock(&state_lock);
        }
    }
}

#if !defined(_WIN32)
static void before_fork(void) { pthread_mutex_lock(&run_lock); }
static void after_fork_in_parent(void) { pthread_mutex_unlock(&run_lock); }

static void after_fork_in_child(void)
{
    /* the workers did not survive: start over with fresh locks */
    pthread_mutex_init(&run_lock, NULL);
    pthread_mutex_init(&state_lock, NULL);
    pthread_cond_init(&work_ready, NULL);
    pthread_cond_init(&work_done, NULL);
    workers = 0;
    for (int id = 0; id < FC_POOL_MAX_THREADS; id++)
        assigned[id] = 0;
    sleeping = 0;
    caller_sleeping = 0;
    remaining = 0;
}

static void register_fork_handlers(void) { pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child); }
#endif

/* Starts workers up to wanted (state_lock held); returns how many there are. */
static int start_workers(int wanted)
{
    fc_signals previous;
    block_signals(&previous);
    while (workers < wanted) {
        /* a new worker must not take a run of a thread that had its id before (in a parent process) */
        store_relaxed(&assigned[workers + 1], 0);
        if (start_thread(workers + 1))
            break;
        workers++;
    }
    restore_signals(&previous);
    return workers;
}

int fc_pool_threaded(void) { return 1; }

void fc_pool_set_poll_ns(long ns) { store_relaxed(&poll_ns, ns > 0 ? ns : 0); }

int fc_pool_run(int num_threads, fc_task_fn fn, void *arg)
{
    if (num_threads > FC_POOL_MAX_THREADS)
        num_threads = FC_POOL_MAX_THREADS;
    if (num_threads <= 1 || !mutex_trylock(&run_lock)) {
        fn(arg, 0);
        return 1;
    }
    mutex_lock(&state_lock);
    if (!fork_handlers_registered) {
        register_fork_handlers();
        fork_handlers_registered = 1;
    }
    int team = 1 + start_workers(num_threads - 1);
    if (team > num_threads)
        team = num_threads;
    job_fn = fn;
    job_arg = arg;
    fc_run run = (fc_run)((unsigned long)generation + 1);
    for (int id = 1; id < team; id++)
        store_relaxed(&assigned[id], run);
    store_relaxed(&remaining, team - 1);
    store_release(&generation, run);
    if (sleeping)
        cond_broadcast(&work_ready);
    mutex_unlock(&state_lock);

    fn(arg, 0);

    if (!spin_until_zero(&remaining)) {
        mutex_lock(&state_lock);
        caller_sleeping = 1;
        while (load_acquire(&remaining) != 0)
            cond_wait(&work_done, &state_lock);
        caller_sleeping = 0;
        mutex_unlock(&state_lock);
    }
    mutex_unlock(&run_lock);
    return team;
}

#else /* serial build */

int fc_pool_threaded(void) { return 0; }

void fc_pool_set_poll_ns(long ns) { (void)ns; }

int fc_pool_run(int num_threads, fc_task_fn fn, void *arg)
{
    (void)num_threads;
    fn(arg, 0);
    return 1;
}

#endif
