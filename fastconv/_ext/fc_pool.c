/* The thread pool of fc_pool.h. */
#include "fc_pool.h"

#if defined(FASTCONV_THREADS) && FASTCONV_THREADS
#include <pthread.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>

#define FC_POOL_MAX_THREADS 256 /* the caller and 255 workers */
/* How long an idle thread polls for new work before it sleeps (fc_pool_set_poll_ns); 0 until set. */
static long poll_ns;

static pthread_mutex_t run_lock = PTHREAD_MUTEX_INITIALIZER;  /* one run at a time */
static pthread_mutex_t state_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t work_ready = PTHREAD_COND_INITIALIZER;
static pthread_cond_t work_done = PTHREAD_COND_INITIALIZER;
static int workers;              /* worker threads started (ids 1..workers) */
static int sleeping;             /* workers waiting on work_ready */
static int caller_sleeping;
static unsigned long generation; /* bumped for every run */
static int remaining;            /* workers of the current run still working */
static fc_task_fn job_fn;
static void *job_arg;
static unsigned long assigned[FC_POOL_MAX_THREADS]; /* the run each worker takes part in */
static int atfork_registered;

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static long now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long)t.tv_sec * 1000000000L + t.tv_nsec;
}

/* Polls until *word differs from seen (or for poll_ns); returns 1 when it changed. */
static int spin_until_changed_ul(const unsigned long *word, unsigned long seen)
{
    long deadline = now_ns() + __atomic_load_n(&poll_ns, __ATOMIC_RELAXED);
    for (;;) {
        for (int i = 0; i < 64; i++) {
            if (__atomic_load_n(word, __ATOMIC_ACQUIRE) != seen)
                return 1;
            cpu_relax();
        }
        if (now_ns() > deadline)
            return 0;
    }
}

static int spin_until_zero(const int *word)
{
    long deadline = now_ns() + __atomic_load_n(&poll_ns, __ATOMIC_RELAXED);
    for (;;) {
        for (int i = 0; i < 64; i++) {
            if (__atomic_load_n(word, __ATOMIC_ACQUIRE) == 0)
                return 1;
            cpu_relax();
        }
        if (now_ns() > deadline)
            return 0;
    }
}

static void *worker_main(void *id_ptr)
{
    int id = (int)(long)id_ptr;
    unsigned long seen = 0; /* any run so far counts as new: assigned[] says which is ours */
    for (;;) {
        if (!spin_until_changed_ul(&generation, seen)) {
            pthread_mutex_lock(&state_lock);
            sleeping++;
            while (generation == seen)
                pthread_cond_wait(&work_ready, &state_lock);
            sleeping--;
            pthread_mutex_unlock(&state_lock);
        }
        /* a worker that slept through runs it had no part in just catches up */
        seen = __atomic_load_n(&generation, __ATOMIC_ACQUIRE);
        if (__atomic_load_n(&assigned[id], __ATOMIC_RELAXED) != seen)
            continue;
        job_fn(job_arg, id);
        if (__atomic_sub_fetch(&remaining, 1, __ATOMIC_ACQ_REL) == 0) {
            pthread_mutex_lock(&state_lock);
            if (caller_sleeping)
                pthread_cond_signal(&work_done);
            pthread_mutex_unlock(&state_lock);
        }
    }
    return NULL;
}

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

/* Starts workers up to wanted (state_lock held); returns how many there are. */
static int start_workers(int wanted)
{
    sigset_t all, previous;
    sigfillset(&all);
    /* workers inherit a mask blocking every signal: signals go to the caller's threads */
    pthread_sigmask(SIG_BLOCK, &all, &previous);
    while (workers < wanted) {
        pthread_t thread;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        /* a new worker must not take a run of a thread that had its id before (in a parent process) */
        __atomic_store_n(&assigned[workers + 1], 0, __ATOMIC_RELAXED);
        int failed = pthread_create(&thread, &attr, worker_main, (void *)(long)(workers + 1));
        pthread_attr_destroy(&attr);
        if (failed)
            break;
        workers++;
    }
    pthread_sigmask(SIG_SETMASK, &previous, NULL);
    return workers;
}

int fc_pool_threaded(void) { return 1; }

void fc_pool_set_poll_ns(long ns) { __atomic_store_n(&poll_ns, ns > 0 ? ns : 0, __ATOMIC_RELAXED); }

int fc_pool_run(int num_threads, fc_task_fn fn, void *arg)
{
    if (num_threads > FC_POOL_MAX_THREADS)
        num_threads = FC_POOL_MAX_THREADS;
    if (num_threads <= 1 || pthread_mutex_trylock(&run_lock) != 0) {
        fn(arg, 0);
        return 1;
    }
    pthread_mutex_lock(&state_lock);
    if (!atfork_registered) {
        pthread_atfork(before_fork, after_fork_in_parent, after_fork_in_child);
        atfork_registered = 1;
    }
    int team = 1 + start_workers(num_threads - 1);
    if (team > num_threads)
        team = num_threads;
    job_fn = fn;
    job_arg = arg;
    unsigned long run = generation + 1;
    for (int id = 1; id < team; id++)
        __atomic_store_n(&assigned[id], run, __ATOMIC_RELAXED);
    __atomic_store_n(&remaining, team - 1, __ATOMIC_RELAXED);
    __atomic_store_n(&generation, run, __ATOMIC_RELEASE);
    if (sleeping)
        pthread_cond_broadcast(&work_ready);
    pthread_mutex_unlock(&state_lock);

    fn(arg, 0);

    if (!spin_until_zero(&remaining)) {
        pthread_mutex_lock(&state_lock);
        caller_sleeping = 1;
        while (__atomic_load_n(&remaining, __ATOMIC_ACQUIRE) != 0)
            pthread_cond_wait(&work_done, &state_lock);
        caller_sleeping = 0;
        pthread_mutex_unlock(&state_lock);
    }
    pthread_mutex_unlock(&run_lock);
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
