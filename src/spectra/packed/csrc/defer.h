/*
 * Deferred calls: a thread that runs recorded kernel calls after one another while the Python thread goes on.
 * Included by ternary_kernels.c after pool.h.
 *
 * Why: a serving engine's step is a few C calls (the embedding rows, every block, the output layer, the picks of the
 * next tokens) and then its Python bookkeeping (the tokens' text, stop strings, events, the next step's rows). Run in
 * turn, the bookkeeping leaves the kernels' cores idle for its length on every step (about 0.4 ms of a 5 ms 16-row
 * step of TriLM-99M on the 2-core Xeon). With the calls recorded and run here, the engine records the next step's
 * calls while this one runs (their token ids read from this step's picks by `take_tokens`), and does its bookkeeping
 * while the next one runs: the kernels never wait for Python (spectra.inference.batch, `Scheduler`'s pipelined
 * steps).
 *
 * Use (each thread records its own list): `defer_begin()`, then the wrappers that take part (embed_rows,
 * decode_layers_batch, head_rows, take_tokens, pick_tokens) check their arguments as always and, instead of running,
 * append their work (defer_add: a copy of the arguments, which must point at memory that stays valid and unchanged
 * until the work has run); `defer_end()` hands the list to the thread and returns its ticket; `defer_wait(ticket)`
 * blocks, with the GIL released, until that list has run, and reports its status. Lists run in the order they were
 * ended; a list stops at its first failing call (1: done, 0: out of memory, -1: a token id outside the embedding).
 * The thread is the pool's caller while it runs a list (pool.h: one caller at a time; another thread calling the
 * kernels meanwhile runs its loops alone). Without pthreads (not Linux) `defer_end` runs the list itself.
 */

typedef int (*defer_fn)(void *arg); /* 1 done, 0 out of memory, -1 a bad token id */

#define DEFER_OPS 8   /* calls per list */
#define DEFER_LISTS 4 /* lists handed over and not yet run */

typedef struct {
    defer_fn fn[DEFER_OPS];
    void (*cleanup[DEFER_OPS])(void *arg); /* frees what the arguments own (may be NULL) */
    void *arg[DEFER_OPS];
    int n;
} defer_list_t;

static _Thread_local defer_list_t *defer_rec = NULL; /* the calling thread's recording, between begin and end */

static void defer_free(defer_list_t *L) {
    for (int i = 0; i < L->n; i++) {
        if (L->cleanup[i]) L->cleanup[i](L->arg[i]);
        free(L->arg[i]);
    }
    L->n = 0;
}

static int defer_run(defer_list_t *L) {
    int status = 1;
    for (int i = 0; i < L->n && status == 1; i++) status = L->fn[i](L->arg[i]);
    defer_free(L);
    return status;
}

/* Append fn(copy of arg[0 .. size)) to the recording; 0 with a Python error when the list is full or memory is
 * short (then `cleanup(arg)` has run). */
static int defer_add(defer_fn fn, void (*cleanup)(void *), const void *arg, size_t size) {
    defer_list_t *L = defer_rec;
    void *copy = L->n < DEFER_OPS ? malloc(size) : NULL;
    if (!copy) {
        if (cleanup) cleanup((void *)arg);
        if (L->n >= DEFER_OPS) PyErr_Format(PyExc_RuntimeError, "more than %d deferred calls in one list", DEFER_OPS);
        else PyErr_NoMemory();
        return 0;
    }
    memcpy(copy, arg, size);
    L->fn[L->n] = fn, L->cleanup[L->n] = cleanup, L->arg[L->n] = copy;
    L->n++;
    return 1;
}

/* A wrapper's last step: record fn(copy of arg) while the calling thread records, else run fn(arg) now with the GIL
 * released, then cleanup(arg); None, or the error fn's status says (0: MemoryError, -1: ValueError). */
static PyObject *defer_or_run(defer_fn fn, void (*cleanup)(void *), void *arg, size_t size) {
    if (defer_rec) {
        if (!defer_add(fn, cleanup, arg, size)) return NULL;
        Py_RETURN_NONE;
    }
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = fn(arg);
    Py_END_ALLOW_THREADS
    if (cleanup) cleanup(arg);
    if (status == 0) return PyErr_NoMemory();
    if (status < 0) return PyErr_Format(PyExc_ValueError, "a token id outside the embedding");
    Py_RETURN_NONE;
}

#ifdef __linux__
#define SPECTRA_DEFER_THREAD 1
#include <pthread.h>
static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    defer_list_t list[DEFER_LISTS];
    int status[DEFER_LISTS];
    uint64_t ended;              /* lists handed over; list t (1-based ticket) sits at list[(t - 1) % DEFER_LISTS] */
    _Atomic uint64_t done;       /* lists run */
    int started;
} dq = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

static void *defer_thread(void *unused) {
    (void)unused;
#ifdef SPECTRA_POOL
    pool_lent = 1; /* a thread waiting for its list helps (defer_await) in place of one pool worker */
#endif
    pthread_mutex_lock(&dq.mu);
    for (;;) {
        while (dq.done == dq.ended) pthread_cond_wait(&dq.cv, &dq.mu);
        const int at = (int)(dq.done % DEFER_LISTS);
        pthread_mutex_unlock(&dq.mu);
        const int status = defer_run(&dq.list[at]);
        pthread_mutex_lock(&dq.mu);
        dq.status[at] = status;
        dq.done++;
        pthread_cond_broadcast(&dq.cv);
    }
    return NULL;
}

static void defer_after_fork(void) { /* the child has no thread: it starts over, with nothing pending */
    pthread_mutex_init(&dq.mu, NULL);
    pthread_cond_init(&dq.cv, NULL);
    dq.ended = dq.done = 0;
    dq.started = 0;
}

/* Hand L over (blocking while DEFER_LISTS lists wait to run); its ticket, or 0 when the thread cannot start. Call
 * without the GIL. */
static uint64_t defer_submit(defer_list_t *L) {
    pthread_mutex_lock(&dq.mu);
    if (!dq.started) {
        static int registered = 0;
        if (!registered) registered = pthread_atfork(NULL, NULL, defer_after_fork) == 0;
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        pthread_attr_setstacksize(&attr, 8 << 20);
        const int rc = pthread_create(&t, &attr, defer_thread, NULL);
        pthread_attr_destroy(&attr);
        if (rc != 0) {
            pthread_mutex_unlock(&dq.mu);
            return 0;
        }
        dq.started = 1;
    }
    while (dq.ended - dq.done >= DEFER_LISTS) pthread_cond_wait(&dq.cv, &dq.mu);
    dq.list[dq.ended % DEFER_LISTS] = *L;
    const uint64_t ticket = ++dq.ended;
    pthread_cond_broadcast(&dq.cv);
    pthread_mutex_unlock(&dq.mu);
    L->n = 0;
    return ticket;
}

#ifdef SPECTRA_POOL
static int defer_ran(void *ticket) { return atomic_load(&dq.done) >= *(const uint64_t *)ticket; }
#endif

/* The status of list `ticket` once it has run (2: no such list). Until then, with `help`, the waiting thread works
 * on the lists' pooled jobs (pool_help) in the place of the pool worker that defer_thread's calls leave out
 * (pool_lent): a step's kernels run on one thread while the engine does its bookkeeping, and on two once it waits,
 * instead of three threads on two cores. Without (kernels on one thread: nothing to help with), it sleeps. Call
 * without the GIL. */
static int defer_await(uint64_t ticket, int help) {
    pthread_mutex_lock(&dq.mu);
    if (ticket == 0 || ticket > dq.ended || dq.done >= ticket + DEFER_LISTS) { /* its status was overwritten */
        pthread_mutex_unlock(&dq.mu);
        return 2;
    }
#ifdef SPECTRA_POOL
    if (help) {
        pthread_mutex_unlock(&dq.mu);
        pool_help(defer_ran, &ticket);
        pthread_mutex_lock(&dq.mu);
    }
#else
    (void)help;
#endif
    while (dq.done < ticket) pthread_cond_wait(&dq.cv, &dq.mu);
    /* another thread's lists may have run meanwhile and reused this one's status slot */
    const int status = dq.done >= ticket + DEFER_LISTS ? 2 : dq.status[(ticket - 1) % DEFER_LISTS];
    pthread_mutex_unlock(&dq.mu);
    return status;
}
#else
static struct {
    int status[DEFER_LISTS];
    uint64_t ended;
} dq;

static uint64_t defer_submit(defer_list_t *L) {
    dq.status[dq.ended % DEFER_LISTS] = defer_run(L);
    return ++dq.ended;
}

static int defer_await(uint64_t ticket, int help) {
    (void)help;
    if (ticket == 0 || ticket > dq.ended || ticket + DEFER_LISTS <= dq.ended) return 2;
    return dq.status[(ticket - 1) % DEFER_LISTS];
}
#endif
