/* A fixed pool of worker threads for the kernels (threads.h). The pool's size is set from Python
 * (m2cache.model.cpu_kernels.set_threads: the engine's compute threads); each run posts one task, the
 * caller computes part 0 and waits for the others. Runs do not nest or overlap: a second caller while
 * one runs computes its task alone (a trylock), so no thread ever waits on another's task.
 *
 * A decode token posts a few runs a layer, tens of microseconds apart; a sleep on a condition variable and
 * the wake-up after it cost about 20 us on a 2-core VM, as much as a small layer's whole product. So while a
 * caller says its runs come back to back (m2c_spin: the native decode step, for its call), a worker that
 * finished a part watches for the next task for up to spin_ns before it sleeps, and the caller watches for its
 * workers' parts as long before it sleeps: a run then costs a microsecond or two. Outside such a call nobody
 * watches (the cores belong to the event loop and the I/O threads between layers). The condition variables stay
 * the protocol (every change is made under `mu` and signalled); the watching only reads. */
#include <pthread.h>
#include <stdlib.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define relax() _mm_pause()
#else
#define relax() ((void)0)
#endif

#include "threads.h"

/* how long a thread watches before it sleeps: longer than the gaps between a decode token's runs, far below a
 * token (m2c_set_spin_ns); after YIELD_NS of it a watcher yields its core at each look, so that on a machine
 * with more runnable threads than cores the thread it waits for can run (spinning alone would keep it out) */
static int64_t spin_ns = 200000;
#define YIELD_NS 20000
#include <sched.h>

int64_t m2c_set_spin_ns(int64_t ns) {
    const int64_t before = __atomic_load_n(&spin_ns, __ATOMIC_RELAXED);
    __atomic_store_n(&spin_ns, ns < 0 ? 0 : ns, __ATOMIC_RELAXED);
    return before;
}

static int64_t clock_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static int spinning = 0; /* callers inside m2c_spin(1) .. m2c_spin(0) */

void m2c_spin(int on) { __atomic_add_fetch(&spinning, on ? 1 : -1, __ATOMIC_RELEASE); }

/* one look of a watch begun at `start`: 0 to stop (past spin_ns, or nobody spins), else 1 after a pause or, past
 * YIELD_NS, a yield of the core */
static int keep_watching(int i, int64_t start, int *yielding) {
    if (__atomic_load_n(&spinning, __ATOMIC_ACQUIRE) <= 0) return 0;
    if (*yielding) {
        sched_yield();
        return clock_ns() - start < __atomic_load_n(&spin_ns, __ATOMIC_RELAXED);
    }
    relax();
    if ((i & 255) == 255) {
        const int64_t spent = clock_ns() - start;
        if (spent >= __atomic_load_n(&spin_ns, __ATOMIC_RELAXED)) return 0;
        *yielding = spent >= YIELD_NS;
    }
    return 1;
}

/* watches *v, while a caller spins, until it differs from `from` (a while: keep_watching) */
static void watch_ulong(const unsigned long *v, unsigned long from) {
    const int64_t start = clock_ns();
    int yielding = 0;
    for (int i = 0; __atomic_load_n(v, __ATOMIC_ACQUIRE) == from && keep_watching(i, start, &yielding); i++) {
    }
}

/* watches *v, while a caller spins, until it is 0 (a while: keep_watching) */
static void watch_zero(const int *v) {
    const int64_t start = clock_ns();
    int yielding = 0;
    for (int i = 0; __atomic_load_n(v, __ATOMIC_ACQUIRE) != 0 && keep_watching(i, start, &yielding); i++) {
    }
}

static pthread_mutex_t run_mu = PTHREAD_MUTEX_INITIALIZER;  /* held for a whole run, and while resizing */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;      /* guards the fields below */
static pthread_cond_t go = PTHREAD_COND_INITIALIZER, done = PTHREAD_COND_INITIALIZER;
static pthread_t workers[M2C_MAX_THREADS];
static int threads = 1, quit = 0, pending = 0, task_parts = 1;
static unsigned long generation = 0, start_generation = 0;
static pthread_once_t fork_guard = PTHREAD_ONCE_INIT;
static m2c_task task_fn;
static void *task_ctx;

static void *work(void *arg) {
    const int part = (int)(intptr_t)arg;
    pthread_mutex_lock(&mu);
    /* the generation when the pool was sized, not when this thread first runs: a task posted in between
     * is this thread's to answer (else the caller would wait for it for ever) */
    unsigned long seen = start_generation;
    for (;;) {
        if (generation == seen && !quit) { /* watch for the next task a while before sleeping on `go` */
            pthread_mutex_unlock(&mu);
            watch_ulong(&generation, seen);
            pthread_mutex_lock(&mu);
        }
        while (generation == seen && !quit) pthread_cond_wait(&go, &mu);
        if (quit) break;
        seen = generation;
        m2c_task fn = task_fn;
        void *ctx = task_ctx;
        const int parts = task_parts;
        pthread_mutex_unlock(&mu);
        if (part < parts) fn(ctx, part, parts);
        pthread_mutex_lock(&mu);
        if (__atomic_sub_fetch(&pending, 1, __ATOMIC_RELEASE) == 0) pthread_cond_signal(&done);
    }
    pthread_mutex_unlock(&mu);
    return NULL;
}

static void stop_workers(void) {
    pthread_mutex_lock(&mu);
    quit = 1;
    pthread_cond_broadcast(&go);
    pthread_mutex_unlock(&mu);
    for (int i = 1; i < threads; i++) pthread_join(workers[i], NULL);
    quit = 0;
    __atomic_store_n(&threads, 1, __ATOMIC_RELAXED);
}

/* fork(): the child has none of the workers, so it starts with a pool of one and fresh locks; no run or
 * resize is in flight across the fork (prepare holds run_mu). */
static void before_fork(void) { pthread_mutex_lock(&run_mu); }
static void after_fork_parent(void) { pthread_mutex_unlock(&run_mu); }
static void after_fork_child(void) {
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    pthread_cond_t fresh_cond = PTHREAD_COND_INITIALIZER;
    run_mu = fresh;
    mu = fresh;
    go = fresh_cond;
    done = fresh_cond;
    __atomic_store_n(&threads, 1, __ATOMIC_RELAXED);
    quit = pending = 0;
}
static void guard_forks(void) { pthread_atfork(before_fork, after_fork_parent, after_fork_child); }

/* The pool's size (1: every kernel on its caller's thread); returns the size in use. */
int m2c_set_threads(int n) {
    if (n < 1) n = 1;
    if (n > M2C_MAX_THREADS) n = M2C_MAX_THREADS;
    pthread_once(&fork_guard, guard_forks);
    pthread_mutex_lock(&run_mu);
    if (n != threads) {
        stop_workers();
        pthread_mutex_lock(&mu);
        start_generation = generation;  /* only m2c_run moves it, under run_mu, which this holds */
        pthread_mutex_unlock(&mu);
        int started = 1;
        for (; started < n; started++)
            if (pthread_create(&workers[started], NULL, work, (void *)(intptr_t)started) != 0) break;
        __atomic_store_n(&threads, started, __ATOMIC_RELAXED);
    }
    const int now = threads;
    pthread_mutex_unlock(&run_mu);
    return now;
}

int m2c_threads(void) { return __atomic_load_n(&threads, __ATOMIC_RELAXED); }

int m2c_run(m2c_task fn, void *ctx, int max_parts) {
    if (m2c_threads() == 1 || max_parts <= 1 || pthread_mutex_trylock(&run_mu) != 0) {
        fn(ctx, 0, 1);
        return 1;
    }
    const int parts = threads < max_parts ? threads : max_parts;
    if (parts == 1) {  /* resized to one between the check and the lock */
        pthread_mutex_unlock(&run_mu);
        fn(ctx, 0, 1);
        return 1;
    }
    pthread_mutex_lock(&mu);
    task_fn = fn;
    task_ctx = ctx;
    task_parts = parts;
    __atomic_store_n(&pending, threads - 1, __ATOMIC_RELAXED); /* every worker answers; those past `parts` idle */
    __atomic_add_fetch(&generation, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&go);
    pthread_mutex_unlock(&mu);
    fn(ctx, 0, parts);
    watch_zero(&pending); /* the workers' parts, watched a while before sleeping on `done` */
    pthread_mutex_lock(&mu);
    while (pending) pthread_cond_wait(&done, &mu);
    pthread_mutex_unlock(&mu);
    pthread_mutex_unlock(&run_mu);
    return parts;
}

/* m2c_scratch: one buffer per calling thread, freed when the thread ends */
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
typedef struct {
    void *p;
    int64_t cap;
} scratch_buf;

static void scratch_free(void *v) {
    scratch_buf *s = v;
    free(s->p);
    free(s);
}

static void scratch_init(void) { pthread_key_create(&scratch_key, scratch_free); }

void *m2c_scratch(int64_t bytes) {
    pthread_once(&scratch_once, scratch_init);
    scratch_buf *s = pthread_getspecific(scratch_key);
    if (!s) {
        if (!(s = calloc(1, sizeof *s))) return NULL;
        pthread_setspecific(scratch_key, s);
    }
    if (bytes > s->cap) {
        void *p = NULL;
        const int64_t cap = (bytes + 4095) / 4096 * 4096;
        if (posix_memalign(&p, 64, (size_t)cap) != 0) return NULL;
        free(s->p);
        s->p = p;
        s->cap = cap;
    }
    return s->p;
}
