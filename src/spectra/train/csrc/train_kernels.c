/*
 * spectra.train._kernels: the training loss on CPU (see spectra/train/loss.py).
 *
 * cross_entropy: for logits x [N, V] (bfloat16 or float32, rows contiguous) and targets t [N] (int64, 0 <= t < V),
 * in one call per batch and one pass of three sweeps per row (a row of 50304 bf16 logits is 98 KiB, so sweeps two
 * and three read it from L2):
 *     m = max_j x_j,   lse = m + log(sum_j exp(x_j - m)),   loss_i = lse - x_t          (float32)
 *     grad_ij = (exp(x_ij - lse) - [j == t_i]) * scale                                    (stored in x's dtype)
 * with scale = 1 / (number of tokens averaged over), i.e. the gradient of the mean loss. bfloat16 is stored rounded
 * to nearest even, as torch converts. A NaN or +inf logit makes the row's loss NaN (never a plausible number), so the
 * trainer's non-finite-loss check still sees it. The gradient sweep is skipped when no gradient buffer is given.
 *
 * Paths: AVX-512 (F) with a polynomial exp (2^n by vscalefps, degree-7 Taylor on |r| <= ln2/2, about 1e-7 relative
 * error), and portable C with libm's expf. They agree with each other and with torch to float32 rounding, not bit
 * for bit. Rows are split over OpenMP threads.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPECTRA_X86 1
#include <immintrin.h>
#define TARGET_AVX512 __attribute__((target("avx512f")))
#endif

typedef struct {
    const void *x;
    int bf16;
    const int64_t *t;
    int64_t V;
    float *loss;
    void *grad;
    float scale;
} ce_job_t;

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; NaN stays NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float load1(const ce_job_t *J, int64_t i, int64_t j) {
    if (J->bf16) return bf16_to_f32(((const uint16_t *)J->x)[i * J->V + j]);
    return ((const float *)J->x)[i * J->V + j];
}

/* grad[i, j] = g in the logits' dtype */
static inline void store1(const ce_job_t *J, int64_t i, int64_t j, float g) {
    if (J->bf16)
        ((uint16_t *)J->grad)[i * J->V + j] = f32_to_bf16(g);
    else
        ((float *)J->grad)[i * J->V + j] = g;
}

static void ce_row_scalar(const ce_job_t *J, int64_t i) {
    const int64_t V = J->V;
    float m = -INFINITY;
    for (int64_t j = 0; j < V; j++) {
        const float v = load1(J, i, j);
        if (v > m) m = v;
    }
    float s = 0.0f;
    for (int64_t j = 0; j < V; j++) s += expf(load1(J, i, j) - m);
    const float lse = m + logf(s);
    J->loss[i] = lse - load1(J, i, J->t[i]);
    if (!J->grad) return;
    for (int64_t j = 0; j < V; j++)
        store1(J, i, j, (expf(load1(J, i, j) - lse) - (j == J->t[i] ? 1.0f : 0.0f)) * J->scale);
}

#ifdef SPECTRA_X86
TARGET_AVX512 static inline __m512 exp512(__m512 x) {
    /* exp(x) = 2^n * exp(r), n = round(x / ln2), r = x - n ln2 (ln2 split in two for exactness). max(-104, x) keeps
     * NaN (vmaxps returns its second operand when either is NaN) and sends -inf to a tiny positive number. */
    x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* 16 logits from column j as float32. */
TARGET_AVX512 static inline __m512 load16(const ce_job_t *J, int64_t i, int64_t j) {
    if (J->bf16) {
        const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)J->x + i * J->V + j));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)J->x + i * J->V + j);
}

/* g rounded to bfloat16 (nearest even; NaN kept) and stored at grad + i*V + j. */
TARGET_AVX512 static inline void store16_bf16(uint16_t *dst, __m512 g) {
    const __m512i u = _mm512_castps_si512(g);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(g, g, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    _mm256_storeu_si256((__m256i *)dst, _mm512_cvtepi32_epi16(r));
}

TARGET_AVX512 static void ce_row_avx512(const ce_job_t *J, int64_t i) {
    const int64_t V = J->V, V16 = V & ~(int64_t)15;
    /* max: a NaN lane is ignored here (vmaxps returns its second operand), and shows up in the sum below */
    __m512 mv = _mm512_set1_ps(-INFINITY);
    for (int64_t j = 0; j < V16; j += 16) mv = _mm512_max_ps(load16(J, i, j), mv);
    float m = _mm512_reduce_max_ps(mv);
    for (int64_t j = V16; j < V; j++) {
        const float v = load1(J, i, j);
        if (v > m) m = v;
    }
    const __m512 mb = _mm512_set1_ps(m);
    __m512 sv = _mm512_setzero_ps();
    for (int64_t j = 0; j < V16; j += 16) sv = _mm512_add_ps(sv, exp512(_mm512_sub_ps(load16(J, i, j), mb)));
    float s = _mm512_reduce_add_ps(sv);
    for (int64_t j = V16; j < V; j++) s += expf(load1(J, i, j) - m);
    const float lse = m + logf(s);
    J->loss[i] = lse - load1(J, i, J->t[i]);
    if (!J->grad) return;
    const __m512 lb = _mm512_set1_ps(lse), sc = _mm512_set1_ps(J->scale);
    for (int64_t j = 0; j < V16; j += 16) {
        const __m512 g = _mm512_mul_ps(exp512(_mm512_sub_ps(load16(J, i, j), lb)), sc);
        if (J->bf16)
            store16_bf16((uint16_t *)J->grad + i * V + j, g);
        else
            _mm512_storeu_ps((float *)J->grad + i * V + j, g);
    }
    for (int64_t j = V16; j < V; j++) store1(J, i, j, expf(load1(J, i, j) - lse) * J->scale);
    /* the target's entry: (p - 1) * scale, p recomputed as above */
    const int64_t t = J->t[i];
    float p;
    if (t < V16) {
        float lanes[16];
        _mm512_storeu_ps(lanes, exp512(_mm512_sub_ps(load16(J, i, t & ~(int64_t)15), lb)));
        p = lanes[t & 15];
    } else {
        p = expf(load1(J, i, t) - lse);
    }
    store1(J, i, t, (p - 1.0f) * J->scale);
}
#endif

static int avx512_supported(void) {
#ifdef SPECTRA_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
#else
    return 0;
#endif
}

/* cross_entropy(path, x, bf16, t, N, V, loss, grad, scale, threads): path 0 = portable C, 1 = AVX-512; pointers as
 * integers (grad = 0: loss only). */
static PyObject *py_cross_entropy(PyObject *self, PyObject *args) {
    int path, bf16, threads;
    unsigned long long px, pt, ploss, pgrad;
    long long N, V;
    float scale;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKiKLLKKfi", &path, &px, &bf16, &pt, &N, &V, &ploss, &pgrad, &scale, &threads))
        return NULL;
    if (N < 0 || V <= 0) return PyErr_Format(PyExc_ValueError, "bad sizes N=%lld V=%lld", N, V);
    if (path == 1 && !avx512_supported()) return PyErr_Format(PyExc_ValueError, "this CPU has no AVX-512");
    const ce_job_t J = {(const void *)(uintptr_t)px, bf16, (const int64_t *)(uintptr_t)pt, V,
                        (float *)(uintptr_t)ploss, (void *)(uintptr_t)pgrad, scale};
    Py_BEGIN_ALLOW_THREADS
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(threads > 0 ? threads : 1)
#endif
    for (long long i = 0; i < N; i++) {
#ifdef SPECTRA_X86
        if (path == 1) {
            ce_row_avx512(&J, i);
            continue;
        }
#endif
        ce_row_scalar(&J, i);
    }
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_paths(PyObject *self, PyObject *noargs) {
    (void)self, (void)noargs;
    return avx512_supported() ? Py_BuildValue("[ss]", "avx512", "scalar") : Py_BuildValue("[s]", "scalar");
}

static PyMethodDef methods[] = {
    {"cross_entropy", py_cross_entropy, METH_VARARGS, "Per-row cross-entropy and its gradient (see the source)."},
    {"paths", py_paths, METH_NOARGS, "Kernel paths this CPU runs, best first."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels", "spectra's training kernels for CPUs", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
