/*
 * The kernels' thread pool: `pool_for(n_threads, n_chunks, fn, ctx)` runs fn(ctx, c) for c = 0 .. n_chunks-1 on the
 * calling thread and up to n_threads - 1 workers. Included by ternary_kernels.c (Linux; elsewhere OpenMP runs the
 * same loops).
 *
 * Why not OpenMP: a parallel region ends in a barrier that waits for every thread of the team, including one the OS
 * has not scheduled yet. On a machine whose cores are all in use (a 2-core server running its HTTP loop and clients
 * beside a 2-thread decoder, or any other process), every region then waits for a time slice: decoding measured 6
 * tok/s instead of 540 with one core taken by another process. Here a chunk is claimed by whoever gets to it first,
 * and the caller waits only for chunks that were claimed and not yet finished. A worker that wakes late finds nothing
 * left and goes back to waiting, so a busy core costs its share of the work, not a time slice per region. When the
 * cores are free the workers spin briefly between regions (the calls of one decode step are microseconds apart) and
 * the caller's wake-up costs nothing.
 *
 * Protocol. `claim` packs (generation, n_chunks, next chunk) into one 64-bit word, so a worker can only take a chunk
 * of the job it woke for: a compare-and-swap from a word of another generation fails. The job's fields (fn, ctx) are
 * read only after a successful claim; the caller cannot publish the next job before every claimed chunk is done, so
 * they are stable while a worker holds a chunk. Workers sleep on a futex over `gen` after POOL_SPIN polls; the caller
 * bumps `gen` and wakes them only when one sleeps (`sleepers`). One caller at a time: a second thread that finds the
 * pool busy runs its loop on its own. After fork() the child has no workers; the pool starts over there.
 */

#if defined(__linux__) && !defined(SPECTRA_NO_POOL) /* -DSPECTRA_NO_POOL: OpenMP instead, for comparisons */
#define SPECTRA_POOL 1
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <limits.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef POOL_SPIN_NS
#define POOL_SPIN_NS 100000 /* a worker polls this long for the next job before it sleeps */
#endif
#define POOL_MAX_WORKERS 255

typedef void (*chunk_fn)(void *ctx, int64_t chunk);

#ifdef POOL_STATS
/* -DPOOL_STATS (benchmarks/kernel_ab.py -D POOL_STATS=1): where the threads of pooled jobs wait, in nanoseconds
 * summed over jobs (pool_stats() reads and clears them). Per job: from publishing to the first chunk a worker starts
 * (wake), the caller's own chunks (caller_work), its wait for the others' after them (caller_wait), the workers'
 * chunks (worker_work), and from the end of the previous job to this one's publishing (between: the caller's work
 * outside jobs, while the workers wait), and the times a sleeping worker was woken with no job (roused:
 * pool_rouse). One caller at a time, as the pool runs. */
static struct {
    uint64_t jobs, wake, caller_work, caller_wait, between, last_end;
    _Atomic uint64_t worker_work, worker_start, roused;
} pstat;
static _Thread_local int pstat_caller;
static inline uint64_t pstat_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}
#define PSTAT(...) __VA_ARGS__
#else
#define PSTAT(...)
#endif

static struct {
    _Atomic uint64_t claim;   /* gen << 32 | n_chunks << 16 | next chunk */
    _Atomic uint32_t gen;     /* the futex word: bumped for each job */
    _Atomic int64_t done;     /* chunks finished in this job */
    _Atomic int sleepers;     /* workers in futex_wait */
    _Atomic int active;       /* workers taking part in this job (n_threads - 1) */
    chunk_fn fn;
    void *ctx;
    int n_workers;            /* started so far */
    uint32_t next_gen;
    pthread_mutex_t busy;     /* held by the calling thread for a job */
    pthread_mutex_t grow;
} pool = {.busy = PTHREAD_MUTEX_INITIALIZER, .grow = PTHREAD_MUTEX_INITIALIZER};

static inline void pool_relax(void) {
#ifdef SPECTRA_X86
    _mm_pause();
#endif
}

/* Run chunks of job `g` until none is left; returns how many this thread ran. */
static int64_t pool_work(uint32_t g) {
    int64_t ran = 0;
    for (;;) {
        uint64_t v = atomic_load_explicit(&pool.claim, memory_order_acquire);
        if ((uint32_t)(v >> 32) != g) return ran;
        const uint32_t i = (uint32_t)(v & 0xFFFF), n = (uint32_t)((v >> 16) & 0xFFFF);
        if (i >= n) return ran;
        if (!atomic_compare_exchange_weak_explicit(&pool.claim, &v, v + 1, memory_order_acq_rel,
                                                   memory_order_relaxed))
            continue;
        PSTAT(const uint64_t t0 = pstat_ns());
        pool.fn(pool.ctx, (int64_t)i); /* stable: job g cannot end while chunk i is unfinished */
        PSTAT(if (!pstat_caller) {
            atomic_fetch_add(&pstat.worker_work, pstat_ns() - t0);
            uint64_t none = 0;
            atomic_compare_exchange_strong(&pstat.worker_start, &none, t0);
        })
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
        ran++;
    }
}

static int64_t pool_now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void *pool_worker(void *arg) {
    const int index = (int)(intptr_t)arg;
    uint32_t seen = atomic_load(&pool.gen);
    for (;;) {
        uint32_t g;
        int64_t since = pool_now_ns();
        unsigned polls = 0;
        while ((g = atomic_load_explicit(&pool.gen, memory_order_acquire)) == seen) {
            pool_relax();
            if (++polls % 64 || pool_now_ns() - since < POOL_SPIN_NS) continue;
            atomic_fetch_add(&pool.sleepers, 1);
            syscall(SYS_futex, &pool.gen, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
            atomic_fetch_sub(&pool.sleepers, 1);
            PSTAT(if (atomic_load(&pool.gen) == seen) atomic_fetch_add(&pstat.roused, 1);)
            since = pool_now_ns();
        }
        seen = g;
        if (index < atomic_load_explicit(&pool.active, memory_order_relaxed)) pool_work(g);
    }
    return NULL;
}

static void pool_after_fork(void) {
    pthread_mutex_init(&pool.busy, NULL);
    pthread_mutex_init(&pool.grow, NULL);
    pool.n_workers = 0;
    atomic_store(&pool.sleepers, 0);
}

/* Start workers up to `want` (under `grow`); returns how many exist. */
static int pool_grow(int want) {
    static int registered = 0;
    if (want > POOL_MAX_WORKERS) want = POOL_MAX_WORKERS;
    pthread_mutex_lock(&pool.grow);
    if (!registered) registered = pthread_atfork(NULL, NULL, pool_after_fork) == 0;
    while (pool.n_workers < want) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 1 << 20);
        const int rc = pthread_create(&t, &attr, pool_worker, (void *)(intptr_t)pool.n_workers);
        pthread_attr_destroy(&attr);
        if (rc != 0) break;
        pool.n_workers++;
    }
    const int n = pool.n_workers;
    pthread_mutex_unlock(&pool.grow);
    return n;
}

/* Wake sleeping workers: after a job is published (pool_for), or without one, when they poll for the next one for
 * another POOL_SPIN_NS. A caller that will publish a job after some work of its own outside the pool (a serving
 * engine's bookkeeping between two decode steps, longer than the spin) calls this first, so the job finds its workers
 * polling instead of asleep. */
static void pool_rouse(void) {
    if (atomic_load(&pool.sleepers) > 0) syscall(SYS_futex, &pool.gen, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}

/* Places of a calling thread's jobs that a helper takes instead of a pool worker (pool_help): defer.h's thread sets
 * 1, the engine's Python thread helping whenever it waits for a step instead of doing its bookkeeping. */
static _Thread_local int pool_lent = 0;

static _Atomic int pool_helpers; /* threads in pool_help now */

/* Take chunks of whatever job the pool runs until stop(arg) says so (a thread lent to a caller: pool_lent). */
static void pool_help(int (*stop)(void *), void *arg) {
    atomic_fetch_add(&pool_helpers, 1);
    while (!stop(arg)) {
        pool_work(atomic_load_explicit(&pool.gen, memory_order_acquire));
        pool_relax();
    }
    atomic_fetch_sub(&pool_helpers, 1);
}

static void pool_for(int n_threads, int64_t n_chunks, chunk_fn fn, void *ctx) {
    if (n_chunks <= 0) return;
    int workers = n_threads - 1;
    if (n_chunks < 2 || workers < 1 || n_chunks > 0xFFFF || pthread_mutex_trylock(&pool.busy) != 0) {
        for (int64_t c = 0; c < n_chunks; c++) fn(ctx, c);
        return;
    }
    workers -= pool_lent < workers ? pool_lent : workers; /* the pool's own threads taking part (may be none) */
    if (pool.n_workers < workers) workers = pool_grow(workers) < workers ? pool.n_workers : workers;
    pool.fn = fn;
    pool.ctx = ctx;
    atomic_store_explicit(&pool.done, 0, memory_order_relaxed);
    atomic_store_explicit(&pool.active, workers, memory_order_relaxed);
    const uint32_t g = ++pool.next_gen;
    atomic_store_explicit(&pool.claim, (uint64_t)g << 32 | (uint64_t)n_chunks << 16, memory_order_release);
    PSTAT(const uint64_t tp = pstat_ns(); pstat_caller = 1; atomic_store(&pstat.worker_start, 0);
          if (pstat.last_end) pstat.between += tp - pstat.last_end;)
    atomic_store(&pool.gen, g); /* seq_cst: ordered before the read of sleepers (a sleeper re-checks gen) */
    if (workers) pool_rouse();
    pool_work(g);
    PSTAT(const uint64_t tc = pstat_ns(); pstat.caller_work += tc - tp;)
    while (atomic_load_explicit(&pool.done, memory_order_acquire) < n_chunks) pool_relax();
    PSTAT(const uint64_t te = pstat_ns(), ws = atomic_load(&pstat.worker_start); pstat.caller_wait += te - tc;
          if (ws > tp) pstat.wake += ws - tp;
          pstat.jobs++, pstat.last_end = te;)
    pthread_mutex_unlock(&pool.busy);
}
#endif
