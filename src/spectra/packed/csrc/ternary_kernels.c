/*
 * spectra.packed._kernels: ternary x int8 matrix products on TQ2_0-layout weights (see spectra/packed/kernels.py).
 *
 * Weights: N rows of K/256 blocks; each block is the 64 code bytes of a llama.cpp TQ2_0 block (its fp16 scale is kept
 * apart, as one float per row and "scale segment"). Byte j = 32h + m of a block holds codes c = q+1 in {0,1,2} of
 * elements 128h + 32l + m in bits 2l..2l+1, l = 0..3.
 *
 * Activations: each token row x (float32, K) is quantized to int8 with one scale per token,
 *     amax = max_i |x_i|,  inv = 127 / amax,  a_i = clamp(rint(x_i * inv), -127, 127),  s = amax / 127
 * (float32 arithmetic, round half to even; amax < 2^-100 gives a = 0, s = 0 (127 / amax overflows float32 below
 * 3.7e-37, and rint(inf) flipped signs); a non-finite x gives s = NaN), and stored per
 * block in the order of the weight bit fields: permuted position 64l + 32h + m holds element 128h + 32l + m.
 *
 * Output: with segments [b0, b1) of blocks over which every row's scale d is constant,
 *     acc_s = sum_{i in s} c_i a_i  (int32, exact),   bsum_s = sum_{i in s} a_i,
 *     y = s * (((0 + d_0 * (float)(acc_0 - bsum_0)) + d_1 * (float)(acc_1 - bsum_1)) + ...)
 * which is sum_i q_i a_i by the identity sum (q+1) a - sum a = sum q a. Every path (scalar, AVX2, AVX-512 VNNI) does
 * the same integer sums and the same float32 operations in the same order, so all paths give bit-identical results,
 * equal to the pure-torch reference. Build with -ffp-contract=off so no float multiply-add gets fused.
 *
 * Also here: matmul_group (several matrices of one input, quantized once), matmul_i8 (int8 weights, for the output
 * layer; integer-exact like the ternary products), attend (single-query attention over a KV cache slice, float32) and
 * decode_layer_batch / decode_layers_batch (Llama blocks for token rows, built from the others;
 * spectra.inference.decode). The last two are float code whose results equal torch's to rounding, not bit for bit.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdio.h>

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <stdatomic.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#ifdef __linux__
#include <errno.h>
#include <sys/mman.h>
#ifndef MADV_COLLAPSE
#define MADV_COLLAPSE 25 /* Linux 6.1; older kernels answer EINVAL */
#endif
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPECTRA_X86 1
#include <cpuid.h>
#include <immintrin.h>
#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define TARGET_AVX2 __attribute__((target("avx2,fma")))
#endif

#define QK 256         /* weights per block */
#define QB 64          /* code bytes per block */
#define TOKEN_CHUNK 64 /* GEMM: tokens whose int8 activations are reused per pass over a row group */
#ifndef CHUNKS_PER_THREAD
/* Row chunks per thread, handed out dynamically. Each claim is a compare-and-swap on a line the other core also
 * writes, which costs far more between this VM's two cores than in one core's cache: 4 instead of 8 (Zen 4, 2
 * threads, benchmarks/kernel_ab.py --decode / --batch with --base-define CHUNKS_PER_THREAD=8): TriLM-1.1B decode
 * 1.087x [1.06-1.12] (11/11), 99M decode 1.070x (9/9), 99M batch-16 step 1.025x (8/9), 1.1B prompt of 128 0.996x; 2
 * per thread lost on the batch step. */
#define CHUNKS_PER_THREAD 4
#endif
/* GEMV: software prefetch distance along the weight stream, into L2 (hint T1). Without it a GEMV reading from DRAM
 * takes about the sum of its compute time and its memory time (0.30 ms for 4096x4096 here, 0.11 ms of it compute):
 * the out-of-order window covers only ~1.5 KiB of the stream, too little for DRAM latency. 8 KiB ahead into L2 brings
 * it to the time of a plain read of the matrix (measured best of 0.25..32 KiB with hints T0/T1/T2/NTA; T0 and NTA do
 * not help, T1/T2 from 4 KiB on do). Prefetches past the end of a matrix are harmless (they never fault). */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 8192
#endif
#define PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T1)
/* The one-token GEMV (gemv1_avx512) prefetches every line gemv1_pf_copies (3) times, at 1, 2, 3 x gemv1_pf_step ahead.
 * - Zen 4 (GEMV1_PREFETCH_STEP, any CPU but Intel's and Zen 5): a PREFETCHT1 is sometimes lost (others report it on
 *   EPYC 9124), and a line whose prefetch is lost costs a whole DRAM latency. Here it looks worse the faster the
 *   loop runs: a read-only loop over 4 MiB took 0.23 ms with one prefetch 8 KiB ahead, 0.16 ms with none. With one
 *   prefetch per line no distance from 2 to 24 KiB beat 8 KiB; two or three copies (8+16, 10+20, 12+24 KiB; steps
 *   of 4, 5, 6, 8 KiB x 1, 2, 3) made the streamed 4096x4096 GEMV 4-8 % faster in interleaved A/B runs of
 *   benchmarks/kernels.py, with little difference between them.
 * - The 2-core Intel Xeon (Sapphire Rapids class; GEMV1_PREFETCH_STEP_INTEL): steps of 3 KiB, with the output layer's
 *   prefetch below (I8_PF_BYTES_INTEL), made TriLM-1.1B decoding 1.031x faster on 1 and on 2 threads
 *   (benchmarks/kernel_ab.py --decode, 9 rounds: 9/9 and 7/9 faster). Chosen at import by the CPU's vendor
 *   (prefetch_tune).
 * - Zen 5 (AMD family 1Ah; GEMV1_PREFETCH_STEP_ZEN5): three copies 8 KiB apart. On the 2-core EPYC of family 1Ah
 *   model 2 (2026-12-06), TriLM-1.5B decoding (2048-wide rows) ran at 6 KiB steps far below its bound: against them,
 *   in one process (set_prefetch alternating, 5 rounds) 8 KiB gave 1.108x (5/5) and 1.041x (3/5) in two runs on 1
 *   thread, 1.161x (5/5) on 2; TriLM-1.1B 1.003x (4/7) and 1.030x (5/7). As builds (kernel_ab.py --decode --greedy
 *   --shards 2, 7 rounds): 1.5B 1.090x (7/7) on 1 thread, 0.986x (3/7) on 2; 1.1B 0.994x (2/7) on 1. One copy 12
 *   KiB ahead against three 6 KiB apart was 0.975x on 1 thread at 1.1B (9 rounds, 1/9) and level on 2.
 * The copy count is a variable (set_prefetch), and the loop tests it: GCC 12 then lays the GEMV's pair loop out
 *   otherwise (the prefetches first, the loads after), and that loop ran TriLM-1.1B decoding 1.090x faster on Zen 5
 *   with the same three prefetches (kernel_ab.py --decode --shards 2 --base 2710cd8, 1 thread, 9/9 rounds). */
#ifndef GEMV1_PREFETCH_STEP
#define GEMV1_PREFETCH_STEP 6144
#endif
#ifndef GEMV1_PREFETCH_STEP_INTEL
#define GEMV1_PREFETCH_STEP_INTEL 3072
#endif
#ifndef GEMV1_PREFETCH_STEP_ZEN5
#define GEMV1_PREFETCH_STEP_ZEN5 8192
#endif
#ifndef GEMV1_PF_COPIES
#define GEMV1_PF_COPIES 3
#endif
static int64_t gemv1_pf_step = GEMV1_PREFETCH_STEP;
static int gemv1_pf_copies = GEMV1_PF_COPIES; /* 1 .. 3 */
/* With three copies, whether the one-token GEMV runs gemv1_pf3_avx512, the same loop with the three prefetches fixed
 * at compile time, instead of gemv1_avx512, which tests the count per block (set by prefetch_tune on Intel; see
 * gemv1_pf3_avx512 for why not on AMD). */
static int gemv1_pf_fixed = 0;
#define PREFETCH3(p)                                                    \
    do {                                                                \
        PREFETCH((p) + gemv1_pf_step);                                  \
        if (gemv1_pf_copies > 1) {                                      \
            PREFETCH((p) + 2 * gemv1_pf_step);                          \
            if (gemv1_pf_copies > 2) PREFETCH((p) + 3 * gemv1_pf_step); \
        }                                                               \
    } while (0)
/* The TQ1_0 GEMV (tq1_gemv1_avx512) prefetches three copies at 1, 2, 3 x tq1_pf_step, its own distance (Intel's
 * GEMV1_PREFETCH_STEP_INTEL there, GEMV1_PREFETCH_STEP on every other CPU, Zen 5 included). On Zen 5 one copy lost
 * there (kernel_ab.py --decode --shards 2 --format tq1, 1 thread, 9 rounds: one copy at 12 KiB 0.935x, at 6 KiB
 * 0.942x; three at 12 KiB 0.941x; two at 6 KiB 1.005x), and no step from 3 to 12 KiB beat 6 (in one process, 7
 * rounds: 0.978-0.995x). */
static int64_t tq1_pf_step = GEMV1_PREFETCH_STEP;
/* Three prefetches of the line at p, at 1, 2, 3 x step bytes ahead. */
#define PREFETCH3_AT(p, step)              \
    do {                                   \
        PREFETCH((p) + (step));            \
        PREFETCH((p) + 2 * (step));        \
        PREFETCH((p) + 3 * (step));        \
    } while (0)
#define PREFETCH3_TQ1(p) PREFETCH3_AT(p, tq1_pf_step)

/* The int8 output layer's GEMV (i8_row_avx512): on Zen 4 one prefetch per 4 lines, PREFETCH_BYTES ahead (24 against
 * 18 GB/s from DRAM with one per line, 50304 x 1792); on the Intel Xeon every line, I8_PF_BYTES_INTEL ahead (the
 * 50304 x 2048 layer alone: 18 against 15 GB/s, where a plain read of it gets 18-19). */
#ifndef I8_PF_BYTES_INTEL
#define I8_PF_BYTES_INTEL 2048
#endif
static int64_t i8_pf_bytes = PREFETCH_BYTES;
static int i8_pf_every_line = 0;

/* Far pairs (gemv1_far_avx512): the one-token TQ2_0 GEMV reads row r of a 16-row group together with row r of the
 * group half its row range away, two streams side by side, instead of two adjacent rows (one stream), and prefetches
 * each line once, gemv1_far_pf_step ahead (0: not at all). From DRAM one Zen 5 core reads one stream at 36-39 GB/s
 * and two at 41-42 (kernels' stream_read, 1 GiB on 2 MiB pages), and the GEMV's three prefetches per line were what
 * kept its single stream near 34. On the 2-core EPYC of AMD family 1Ah (2026-12-06), TriLM-1.1B with 2 scale shards
 * decoded through Decoder.greedy, far pairs against the adjacent loop in one process, 11 alternating rounds: one
 * prefetch 16 KiB ahead 1.069x [1.036-1.083] (11/11) on 1 thread and 1.087x (8/11) on 2; no prefetch 1.056x (11/11)
 * and 1.112x (10/11); 12 KiB 1.054x (11/11) and 1.084x (9/11); far pairs with the adjacent loop's three prefetches
 * 0.998x. Far pairs pay only when the weights stream from DRAM: on a model whose blocks fit in the last-level cache
 * (TriLM-99M: 12 MB) they cost 0.87-0.89x (session 31). So far_pairs_mode -1 (the default) takes them for a decode
 * step (decode_layers_batch / decode_token, one row) when the CPU is one they were measured on (gemv1_far_auto:
 * Zen 5) and the blocks' code bytes exceed the last-level cache (llc_bytes); set_far_pairs forces them on (1, every
 * one-token TQ2_0 product: A/B runs and tests) or off (0). The sums and the epilogue are the adjacent loop's, so the
 * outputs are the same bits. */
#ifndef GEMV1_FAR_PF_STEP
#define GEMV1_FAR_PF_STEP 0
#endif
static int64_t gemv1_far_pf_step = GEMV1_FAR_PF_STEP;
static int gemv1_far_auto = 0;  /* set by prefetch_tune on CPUs the far pairs were measured on */
static int far_pairs_mode = -1; /* -1: by CPU and model size (set_far), 0: never, 1: always */

static void prefetch_tune(void) {
#ifdef SPECTRA_X86
    if (__builtin_cpu_is("intel")) {
        gemv1_pf_step = tq1_pf_step = GEMV1_PREFETCH_STEP_INTEL;
        i8_pf_bytes = I8_PF_BYTES_INTEL;
        i8_pf_every_line = 1;
        gemv1_pf_fixed = 1;
    } else if (__builtin_cpu_is("amd")) {
        unsigned a, b, c, d;
        if (__get_cpuid(1, &a, &b, &c, &d)) {
            const unsigned family = (a >> 8 & 0xf) == 0xf ? 0xf + (a >> 20 & 0xff) : a >> 8 & 0xf;
            if (family >= 0x1a) {
                gemv1_pf_step = GEMV1_PREFETCH_STEP_ZEN5; /* the TQ1_0 GEMV keeps its step */
                gemv1_far_auto = 1;
            }
        }
    }
#endif
}

enum { PATH_SCALAR = 0, PATH_AVX2 = 1, PATH_AVX512VNNI = 2 };

typedef struct {
    const uint8_t *qs;     /* [N, nb*64] */
    const int32_t *bounds; /* [S+1] block indices */
    const float *seg_d;    /* [N, S] */
    const int8_t *xq;      /* [T, K] permuted int8 activations */
    const int32_t *bsum;   /* [T, S] */
    const float *xs;       /* [T] activation scales */
    const int8_t *xt;      /* AMX GEMM only: the activations in tile layout (amx_kernels.h), else NULL */
    const int8_t *x4;      /* quad GEMM only: the activations in quad layout (quad_kernels.h), else NULL */
    const uint8_t *rl;     /* the codes as TQ2_0 code bytes interleaved by 16 rows (rowlane_kernels.h), or NULL */
    const int8_t *x8;      /* row-lane GEMM only: the activations in row-lane layout (rowlane_build), else NULL */
    float *y;              /* [T, N] */
    int64_t N, K, nb, S, T;
    int fmt; /* FMT_TQ2: qs holds TQ2_0 code bytes [N, nb*64], xq the TQ2 layout; FMT_TQ1: tq1_kernels.h */
    int far; /* a one-token TQ2_0 product reads far pairs (gemv1_far_avx512; set_far) */
} job_t;

enum { FMT_TQ2 = 0, FMT_TQ1 = 1 };

/* *buf grown to at least `need` bytes (64-byte aligned, contents not kept), *size updated; NULL when it cannot grow.
 * The per-thread buffers (scratch_get, panel_get) keep theirs across calls. */
static void *grow_buffer(void **buf, size_t *size, size_t need) {
    if (need > *size) {
        free(*buf);
        *size = 0;
        *buf = aligned_alloc(64, (need + 63) & ~(size_t)63);
        if (!*buf) return NULL;
        *size = need;
    }
    return *buf;
}

/* ---------------------------------------------------------------- activation quantization */

static inline int64_t perm_pos(int64_t e) {
    int64_t h = e >> 7, r = e & 127;
    return 64 * (r >> 5) + 32 * h + (r & 31);
}

/* The int8 rule's two pieces, shared by the activations (quantize_row_*) and the q8 KV cache rows (kv_store_q8_*):
 * the largest |x_i| of n floats with *bad set where one is NaN or infinite, and one value times 127 / max rounded to
 * nearest even and clamped to [-127, 127]. */
static float absmax_scalar(const float *x, int64_t n, int *bad) {
    float amax = 0.0f;
    *bad = 0;
    for (int64_t i = 0; i < n; i++) {
        const float a = fabsf(x[i]);
        if (!(a <= 3.4028234663852886e38f)) *bad = 1; /* NaN or inf */
        else if (a > amax) amax = a;
    }
    return amax;
}

/* A row whose largest |x| is below this quantizes to zeros with scale 0 (module docstring). */
#define Q8_TINY 0x1p-100f

static inline int8_t round_i8(float v) {
    const long r = lrintf(v);
    return (int8_t)(r > 127 ? 127 : r < -127 ? -127 : r);
}

static void quantize_row_scalar(const float *x, const job_t *J, int8_t *q, int32_t *bsum, float *scale) {
    int bad;
    const float amax = absmax_scalar(x, J->K, &bad);
    if (bad || amax < Q8_TINY) {
        for (int64_t i = 0; i < J->K; i++) q[i] = 0;
        for (int64_t i = 0; i < J->S; i++) bsum[i] = 0;
        *scale = bad ? NAN : 0.0f;
        return;
    }
    const float inv = 127.0f / amax;
    *scale = amax / 127.0f;
    for (int64_t s = 0; s < J->S; s++) {
        int32_t sum = 0;
        for (int64_t b = J->bounds[s]; b < J->bounds[s + 1]; b++) {
            for (int64_t e = 0; e < QK; e++) {
                const int8_t r = round_i8(x[b * QK + e] * inv);
                q[b * QK + perm_pos(e)] = r;
                sum += (int32_t)r;
            }
        }
        bsum[s] = sum;
    }
}

#ifdef SPECTRA_X86
/* absmax_scalar 16 lanes at a time (n % 16 == 0): the same largest value. */
TARGET_AVX512 static inline __attribute__((always_inline)) float absmax_avx512(const float *x, int64_t n, int *bad) {
    const __m512 big = _mm512_set1_ps(3.4028234663852886e38f);
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 nf = 0;
    for (int64_t i = 0; i < n; i += 16) {
        const __m512 a = _mm512_abs_ps(_mm512_loadu_ps(x + i));
        nf |= _mm512_cmp_ps_mask(a, big, _CMP_NLE_UQ);
        vmax = _mm512_max_ps(vmax, a);
    }
    *bad = nf != 0;
    return _mm512_reduce_max_ps(vmax);
}

TARGET_AVX512 static void quantize_row_avx512(const float *x, const job_t *J, int8_t *q, int32_t *bsum, float *scale) {
    int bad;
    const float amax = absmax_avx512(x, J->K, &bad);
    if (bad || amax < Q8_TINY) {
        for (int64_t i = 0; i < J->K; i++) q[i] = 0;
        for (int64_t i = 0; i < J->S; i++) bsum[i] = 0;
        *scale = bad ? NAN : 0.0f;
        return;
    }
    const float inv = 127.0f / amax;
    *scale = amax / 127.0f;
    const __m512 vinv = _mm512_set1_ps(inv);
    /* Per 64 output bytes (positions 64l + 32h + 16k, elements 128h + 32l + 16k + 0..15): four int32 vectors are
     * narrowed with saturating packs (int32 -> int16 -> int8: values above 127 become 127, as the clamp makes them)
     * and a max with -127 (the clamp's lower end), then one dword permute undoes the packs' 128-bit-lane order. The
     * sum of the 64 bytes is one vpdpbusd against ones (exact). Same bytes and sums as clamping each int32. */
    const __m512i lo8 = _mm512_set1_epi8(-127), ones = _mm512_set1_epi8(1);
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    for (int64_t s = 0; s < J->S; s++) {
        __m512i vsum = _mm512_setzero_si512();
        for (int64_t b = J->bounds[s]; b < J->bounds[s + 1]; b++) {
            for (int l = 0; l < 4; l++) {
                const float *src = x + b * QK + 32 * l;
                const __m512i r0 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(src), vinv));
                const __m512i r1 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(src + 16), vinv));
                const __m512i r2 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(src + 128), vinv));
                const __m512i r3 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(src + 144), vinv));
                __m512i p = _mm512_packs_epi16(_mm512_packs_epi32(r0, r1), _mm512_packs_epi32(r2, r3));
                p = _mm512_max_epi8(_mm512_permutexvar_epi32(order, p), lo8);
                vsum = _mm512_dpbusd_epi32(vsum, ones, p);
                _mm512_storeu_si512(q + b * QK + 64 * l, p);
            }
        }
        bsum[s] = _mm512_reduce_add_epi32(vsum);
    }
}
#endif

static void quantize_rows(int path, const float *x, const job_t *J, int8_t *q, int32_t *bsum, float *scale) {
    for (int64_t t = 0; t < J->T; t++) {
#ifdef SPECTRA_X86
        if (path == PATH_AVX512VNNI) {
            quantize_row_avx512(x + t * J->K, J, q + t * J->K, bsum + t * J->S, scale + t);
            continue;
        }
#endif
        quantize_row_scalar(x + t * J->K, J, q + t * J->K, bsum + t * J->S, scale + t);
    }
}

/* ---------------------------------------------------------------- scalar path */

static void rows_scalar(const job_t *J, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *w = J->qs + n * J->nb * QB;
        for (int64_t t = 0; t < J->T; t++) {
            const int8_t *a = J->xq + t * J->K;
            float yv = 0.0f;
            for (int64_t s = 0; s < J->S; s++) {
                int32_t acc = 0;
                for (int64_t b = J->bounds[s]; b < J->bounds[s + 1]; b++) {
                    const uint8_t *wb = w + b * QB;
                    const int8_t *ab = a + b * QK;
                    for (int j = 0; j < QB; j++) {
                        const int v = wb[j];
                        acc += (v & 3) * ab[j] + ((v >> 2) & 3) * ab[64 + j] + ((v >> 4) & 3) * ab[128 + j] +
                               (v >> 6) * ab[192 + j];
                    }
                }
                yv = yv + J->seg_d[n * J->S + s] * (float)(acc - J->bsum[t * J->S + s]);
            }
            J->y[t * J->N + n] = yv * J->xs[t];
        }
    }
}

#ifdef SPECTRA_X86
/* ---------------------------------------------------------------- AVX2 path */

TARGET_AVX2 static inline int32_t hsum256(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* One row against up to 4 tokens. maddubs sums pairs of (c <= 2) * (|a| <= 127): at most 508, 8 of them at most 4064,
 * so the int16 partial sums never saturate. */
TARGET_AVX2 static inline __attribute__((always_inline)) void tile_avx2(const job_t *J, int64_t n, int64_t t,
                                                                        const int TT) {
    const __m256i m3 = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    const uint8_t *w = J->qs + n * J->nb * QB;
    float yv[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int64_t s = 0; s < J->S; s++) {
        __m256i acc[4];
        _Pragma("GCC unroll 4")
        for (int k = 0; k < TT; k++) acc[k] = _mm256_setzero_si256();
        for (int64_t b = J->bounds[s]; b < J->bounds[s + 1]; b++) {
            PREFETCH(w + b * QB + PREFETCH_BYTES);
            __m256i sum16[4];
            _Pragma("GCC unroll 4")
            for (int k = 0; k < TT; k++) sum16[k] = _mm256_setzero_si256();
            _Pragma("GCC unroll 4")
            for (int h = 0; h < 2; h++) {
                const __m256i raw = _mm256_loadu_si256((const __m256i *)(w + b * QB + 32 * h));
                __m256i wl[4];
                wl[0] = _mm256_and_si256(raw, m3);
                wl[1] = _mm256_and_si256(_mm256_srli_epi16(raw, 2), m3);
                wl[2] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m3);
                wl[3] = _mm256_and_si256(_mm256_srli_epi16(raw, 6), m3);
                _Pragma("GCC unroll 4")
                for (int k = 0; k < TT; k++) {
                    const int8_t *ab = J->xq + (t + k) * J->K + b * QK + 32 * h;
                    _Pragma("GCC unroll 4")
                    for (int l = 0; l < 4; l++) {
                        __m256i a = _mm256_loadu_si256((const __m256i *)(ab + 64 * l));
                        sum16[k] = _mm256_add_epi16(sum16[k], _mm256_maddubs_epi16(wl[l], a));
                    }
                }
            }
            _Pragma("GCC unroll 4")
            for (int k = 0; k < TT; k++) acc[k] = _mm256_add_epi32(acc[k], _mm256_madd_epi16(sum16[k], ones));
        }
        const float d = J->seg_d[n * J->S + s];
        _Pragma("GCC unroll 4")
        for (int k = 0; k < TT; k++) {
            int32_t v = hsum256(acc[k]);
            yv[k] = yv[k] + d * (float)(v - J->bsum[(t + k) * J->S + s]);
        }
    }
    _Pragma("GCC unroll 4")
    for (int k = 0; k < TT; k++) J->y[(t + k) * J->N + n] = yv[k] * J->xs[t + k];
}

TARGET_AVX2 static void rows_avx2(const job_t *J, int64_t n0, int64_t n1) {
    for (int64_t c0 = 0; c0 < J->T; c0 += TOKEN_CHUNK) {
        const int64_t c1 = c0 + TOKEN_CHUNK < J->T ? c0 + TOKEN_CHUNK : J->T;
        for (int64_t n = n0; n < n1; n++) {
            int64_t t = c0;
            for (; t + 4 <= c1; t += 4) tile_avx2(J, n, t, 4);
            switch (c1 - t) {
                case 3: tile_avx2(J, n, t, 3); break;
                case 2: tile_avx2(J, n, t, 2); break;
                case 1: tile_avx2(J, n, t, 1); break;
                default: break;
            }
        }
    }
}

/* ---------------------------------------------------------------- AVX-512 VNNI path */

/* acc += vpdpbusd(w, *p) with p's 64 bytes as the memory operand. Written out because with the intrinsic GCC 12 kept
 * each accumulator in two registers and copied it every iteration (vpdpbusd overwrites its accumulator). */
#define DPBUSD(acc, w, p) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "m"(*(const __m512i *)(const void *)(p)))
/* The same with the activations in a register, for two rows that share them. */
#define DPBUSD_R(acc, w, x) __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x))

/* The 16 accumulators of gemv_rows_avx512 (token k, field l) as named variables pinned once per block, for the reason
 * of TILE_ACCS (GCC 12 copied the [4][4] array's accumulators every block and read the masks from the stack). */
#define GEMV_ACCS(X) X(0, 0) X(0, 1) X(0, 2) X(0, 3) X(1, 0) X(1, 1) X(1, 2) X(1, 3) \
                     X(2, 0) X(2, 1) X(2, 2) X(2, 3) X(3, 0) X(3, 1) X(3, 2) X(3, 3)
#define GEMV_ZERO(k, l) __m512i g##k##l = _mm512_setzero_si512();
#define GEMV_TOKEN(k)                                                  \
    do {                                                               \
        if (k < TT) {                                                  \
            const int8_t *ab_ = J->xq + k * J->K + b * QK;             \
            DPBUSD(g##k##0, w0_, ab_);                                 \
            DPBUSD(g##k##1, w1_, ab_ + 64);                            \
            DPBUSD(g##k##2, w2_, ab_ + 128);                           \
            DPBUSD(g##k##3, w3_, ab_ + 192);                           \
        }                                                              \
    } while (0)
#define GEMV_FINISH(k)                                                                                       \
    do {                                                                                                     \
        if (k < TT) {                                                                                        \
            __m512i v_ = _mm512_add_epi32(g##k##0, _mm512_srai_epi32(g##k##1, 2));                          \
            v_ = _mm512_add_epi32(v_, _mm512_srai_epi32(g##k##2, 4));                                        \
            v_ = _mm512_add_epi32(v_, _mm512_srai_epi32(g##k##3, 6));                                        \
            yv[k] = yv[k] + d * (float)(_mm512_reduce_add_epi32(v_) - J->bsum[k * J->S + s]);                \
        }                                                                                                    \
    } while (0)
/* GEMV for 1..4 tokens (decoding, small batches), one sequential weight stream per thread. The 2-bit fields are isolated with a mask only (no
 * shift): field l is then c * 4^l, and vpdpbusd accumulates c * 4^l * a exactly, so each of the four accumulators is
 * 4^l times its true sum and an arithmetic right shift by 2l recovers it. Products are at most 128 * 127, four per
 * lane and block, so a lane stays below 2^31 for K <= 2^22. */
TARGET_AVX512 static inline __attribute__((always_inline)) void gemv_rows_avx512(const job_t *J, int64_t n0,
                                                                                 int64_t n1, const int TT) {
    const __m512i m0 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x0c);
    const __m512i m2 = _mm512_set1_epi8(0x30), m3 = _mm512_set1_epi8((char)0xc0);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *w = J->qs + n * J->nb * QB;
        float yv[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int64_t s = 0; s < J->S; s++) {
            GEMV_ACCS(GEMV_ZERO)
            for (int64_t b = J->bounds[s]; b < J->bounds[s + 1]; b++) {
#if PREFETCH_BYTES > 0
                PREFETCH(w + b * QB + PREFETCH_BYTES);
#endif
                const __m512i wv = _mm512_loadu_si512(w + b * QB);
                const __m512i w0_ = _mm512_and_si512(wv, m0), w1_ = _mm512_and_si512(wv, m1);
                const __m512i w2_ = _mm512_and_si512(wv, m2), w3_ = _mm512_and_si512(wv, m3);
                GEMV_TOKEN(0);
                GEMV_TOKEN(1);
                GEMV_TOKEN(2);
                GEMV_TOKEN(3);
                __asm__("" : "+v"(g00), "+v"(g01), "+v"(g02), "+v"(g03), "+v"(g10), "+v"(g11), "+v"(g12), "+v"(g13));
                __asm__("" : "+v"(g20), "+v"(g21), "+v"(g22), "+v"(g23), "+v"(g30), "+v"(g31), "+v"(g32), "+v"(g33));
            }
            const float d = J->seg_d[n * J->S + s];
            GEMV_FINISH(0);
            GEMV_FINISH(1);
            GEMV_FINISH(2);
            GEMV_FINISH(3);
        }
        _Pragma("GCC unroll 4")
        for (int k = 0; k < TT; k++) J->y[k * J->N + n] = yv[k] * J->xs[k];
    }
}

/* Lane r of the result = the sum of the 16 lanes of v[r]. Integer adds, so the order does not change the result. */
TARGET_AVX512 static inline __m512i hsum16x16(const __m512i *v) {
    __m512i t[8], u[4];
    for (int i = 0; i < 8; i++) /* per 128-bit chunk: [a0+a2, b0+b2, a1+a3, b1+b3] for rows a = 2i, b = 2i+1 */
        t[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                                _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) /* per chunk: partial sums of rows 4i .. 4i+3 */
        u[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(t[2 * i], t[2 * i + 1]),
                                _mm512_unpackhi_epi64(t[2 * i], t[2 * i + 1]));
    const __m512i w01 = _mm512_add_epi32(_mm512_shuffle_i32x4(u[0], u[1], 0x88), _mm512_shuffle_i32x4(u[0], u[1], 0xdd));
    const __m512i w23 = _mm512_add_epi32(_mm512_shuffle_i32x4(u[2], u[3], 0x88), _mm512_shuffle_i32x4(u[2], u[3], 0xdd));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(w01, w23, 0x88), _mm512_shuffle_i32x4(w01, w23, 0xdd));
}

/* The float epilogue of 16 rows n .. n+15 for one token, given their per-segment integer sums v[s][r]:
 * y = s * (((0 + d_0 * f(acc_0 - bsum_0)) + d_1 * f(acc_1 - bsum_1)) + ...), lane by lane the same float32 operations
 * as the scalar epilogue, so the result is bit-identical to it. */
TARGET_AVX512 static inline void epilogue16(const job_t *J, int64_t n, __m512i v[][16], int64_t t) {
    const int64_t S = J->S;
    __m512 yv = _mm512_setzero_ps();
    for (int64_t s = 0; s < S; s++) {
        const __m512i acc = _mm512_sub_epi32(hsum16x16(v[s]), _mm512_set1_epi32(J->bsum[t * S + s]));
        __m512 d;
        if (S == 1) {
            d = _mm512_loadu_ps(J->seg_d + n);
        } else {
            float dd[16];
            for (int r = 0; r < 16; r++) dd[r] = J->seg_d[(n + r) * S + s];
            d = _mm512_loadu_ps(dd);
        }
        yv = _mm512_add_ps(yv, _mm512_mul_ps(d, _mm512_cvtepi32_ps(acc)));
    }
    _mm512_storeu_ps(J->y + t * J->N + n, _mm512_mul_ps(yv, _mm512_set1_ps(J->xs[t])));
}

#define GROUP_SEGMENTS 4 /* GEMV: rows are reduced 16 at a time when a row has at most this many scale segments */

/* One pair of rows of the one-token TQ2_0 GEMV, segment s: the rows at w and w + GAP bytes against the activations
 * a, prefetched by PF(wa, wb); their four field accumulators combined into OUTA and OUTB. gemv1_avx512 (GAP = rowb:
 * adjacent rows, one stream) and gemv1_far_avx512 (two streams) expand it; a macro, so gemv1_avx512's loop is its
 * own code (an always_inline helper measured slower, see below). */
#define GEMV1_PF_ADJACENT(wa, wb) \
    do {                          \
        PREFETCH3(wa);            \
        PREFETCH3(wb);            \
    } while (0)
#define GEMV1_PAIR_SUMS(W, GAP, PF, OUTA, OUTB)                                                                       \
    do {                                                                                                             \
        __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;          \
        for (int64_t b = J->bounds[s]; b < J->bounds[s + 1]; b++) {                                                  \
            const uint8_t *wa = (W) + b * QB, *wb = wa + (GAP);                                                      \
            PF(wa, wb);                                                                                              \
            const __m512i w0 = _mm512_loadu_si512(wa), w1 = _mm512_loadu_si512(wb);                                 \
            const int8_t *ab = a + b * QK;                                                                           \
            __m512i x0 = _mm512_loadu_si512(ab), x1 = _mm512_loadu_si512(ab + 64);                                   \
            __m512i x2 = _mm512_loadu_si512(ab + 128), x3 = _mm512_loadu_si512(ab + 192);                            \
            __asm__("" : "+v"(x0), "+v"(x1), "+v"(x2), "+v"(x3)); /* else GCC 12 loads each twice */                 \
            DPBUSD_R(a0, _mm512_and_si512(w0, m0), x0);                                                              \
            DPBUSD_R(a1, _mm512_and_si512(w0, m1), x1);                                                              \
            DPBUSD_R(a2, _mm512_and_si512(w0, m2), x2);                                                              \
            DPBUSD_R(a3, _mm512_and_si512(w0, m3), x3);                                                              \
            DPBUSD_R(b0, _mm512_and_si512(w1, m0), x0);                                                              \
            DPBUSD_R(b1, _mm512_and_si512(w1, m1), x1);                                                              \
            DPBUSD_R(b2, _mm512_and_si512(w1, m2), x2);                                                              \
            DPBUSD_R(b3, _mm512_and_si512(w1, m3), x3);                                                              \
            /* else GCC 12 moves 4 accumulators through other registers every block */                              \
            __asm__("" : "+v"(a0), "+v"(a1), "+v"(a2), "+v"(a3), "+v"(b0), "+v"(b1), "+v"(b2), "+v"(b3));           \
        }                                                                                                            \
        __m512i c = _mm512_add_epi32(a0, _mm512_srai_epi32(a1, 2));                                                  \
        c = _mm512_add_epi32(c, _mm512_srai_epi32(a2, 4));                                                           \
        OUTA = _mm512_add_epi32(c, _mm512_srai_epi32(a3, 6));                                                        \
        c = _mm512_add_epi32(b0, _mm512_srai_epi32(b1, 2));                                                          \
        c = _mm512_add_epi32(c, _mm512_srai_epi32(b2, 4));                                                           \
        OUTB = _mm512_add_epi32(c, _mm512_srai_epi32(b3, 6));                                                        \
    } while (0)

/* One token. Rows are taken 16 at a time: each row's four field accumulators are combined into one vector, and the 16
 * vectors are reduced together (hsum16x16) and finished with one vector epilogue. Per row that replaces a horizontal
 * reduction and a scalar epilogue, which cost about as much as a short row's dot product (7 blocks at dim 1792). The
 * weights are still read as one sequential stream.
 * Per 64-byte block a single row costs 1 + 4 zmm loads, 4 AND and 4 vpdpbusd (DPBUSD: with the intrinsic, GCC 12
 * copied all four accumulators through other registers every block, 8 extra zmm moves). On this Zen 4 (3.45 GHz)
 * vpdpbusd has latency 4 and throughput 1 per cycle, so the four chains are not latency-bound; a block costs about
 * 5.5 cycles from L2. The 16 rows are taken in adjacent pairs that share the four activation loads (DPBUSD_R, 8
 * chains): 0.10-0.116 instead of 0.117-0.121 ms for a cache-resident 4096x4096 when the machine is quiet (4 rows: no
 * faster from L2). A pair's rows are adjacent in memory, so the weights are still one sequential stream. Streamed
 * from DRAM the pairs alone were no faster; with the triple prefetch (PREFETCH3) about 0.17 instead of 0.18 ms. The
 * page size matters most: see huge_pages. */
/* The body of gemv1_avx512 and gemv1_pf3_avx512, which differ only in the prefetches: PAIR_PF(wa, wb) for a row
 * pair's block, LINE_PF(p) for one row's block. The last rows (and rows with many segments) go one at a time; the
 * block loop repeats the pairs' on purpose: sharing it through an always_inline helper measured 0.120 -> 0.146 ms
 * for a cache-resident 4096^2 GEMV. */
#define GEMV1_ROWS(PAIR_PF, LINE_PF)                                                                                   \
    const __m512i m0 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x0c);                                            \
    const __m512i m2 = _mm512_set1_epi8(0x30), m3 = _mm512_set1_epi8((char)0xc0);                                      \
    const int8_t *a = J->xq;                                                                                           \
    const int64_t rowb = J->nb * QB;                                                                                   \
    int64_t n = n0;                                                                                                    \
    if (J->S <= GROUP_SEGMENTS) {                                                                                      \
        __m512i v[GROUP_SEGMENTS][16];                                                                                 \
        for (; n + 16 <= n1; n += 16) {                                                                                \
            for (int r = 0; r < 16; r += 2) {                                                                          \
                const uint8_t *w = J->qs + (n + r) * rowb; /* row n + r; row n + r + 1 at w + rowb */                  \
                for (int64_t s = 0; s < J->S; s++) GEMV1_PAIR_SUMS(w, rowb, PAIR_PF, v[s][r], v[s][r + 1]);            \
            }                                                                                                          \
            epilogue16(J, n, v, 0);                                                                                    \
        }                                                                                                              \
    }                                                                                                                  \
    for (; n < n1; n++) {                                                                                              \
        const uint8_t *w = J->qs + n * rowb;                                                                           \
        float yv = 0.0f;                                                                                               \
        for (int64_t s = 0; s < J->S; s++) {                                                                           \
            __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;                                            \
            for (int64_t b = J->bounds[s]; b < J->bounds[s + 1]; b++) {                                                \
                LINE_PF(w + b * QB);                                                                                   \
                const __m512i w0 = _mm512_loadu_si512(w + b * QB);                                                     \
                const int8_t *ab = a + b * QK;                                                                         \
                DPBUSD(a0, _mm512_and_si512(w0, m0), ab);                                                              \
                DPBUSD(a1, _mm512_and_si512(w0, m1), ab + 64);                                                         \
                DPBUSD(a2, _mm512_and_si512(w0, m2), ab + 128);                                                        \
                DPBUSD(a3, _mm512_and_si512(w0, m3), ab + 192);                                                        \
            }                                                                                                          \
            __m512i v = _mm512_add_epi32(a0, _mm512_srai_epi32(a1, 2));                                                \
            v = _mm512_add_epi32(v, _mm512_srai_epi32(a2, 4));                                                         \
            v = _mm512_add_epi32(v, _mm512_srai_epi32(a3, 6));                                                         \
            const int32_t acc = _mm512_reduce_add_epi32(v);                                                            \
            yv = yv + J->seg_d[n * J->S + s] * (float)(acc - J->bsum[s]);                                              \
        }                                                                                                              \
        J->y[n] = yv * J->xs[0];                                                                                       \
    }

TARGET_AVX512 __attribute__((noinline)) static void gemv1_avx512(const job_t *J, int64_t n0, int64_t n1) {
    GEMV1_ROWS(GEMV1_PF_ADJACENT, PREFETCH3)
}

TARGET_AVX512 __attribute__((noinline)) static void gemv1_far_avx512(const job_t *J, int64_t n0, int64_t n1);
TARGET_AVX512 __attribute__((noinline)) static void gemv1_pf3_avx512(const job_t *J, int64_t n0, int64_t n1);

TARGET_AVX512 __attribute__((noinline)) static void gemv2_avx512(const job_t *J, int64_t n0, int64_t n1) {
    gemv_rows_avx512(J, n0, n1, 2);
}
TARGET_AVX512 __attribute__((noinline)) static void gemv3_avx512(const job_t *J, int64_t n0, int64_t n1) {
    gemv_rows_avx512(J, n0, n1, 3);
}
TARGET_AVX512 __attribute__((noinline)) static void gemv4_avx512(const job_t *J, int64_t n0, int64_t n1) {
    gemv_rows_avx512(J, n0, n1, 4);
}

TARGET_AVX512 static void gemv_avx512(const job_t *J, int64_t n0, int64_t n1) {
    switch (J->T) {
        case 1:
            if (J->far || far_pairs_mode == 1) gemv1_far_avx512(J, n0, n1);
            else if (gemv1_pf_fixed && gemv1_pf_copies == 3) gemv1_pf3_avx512(J, n0, n1);
            else gemv1_avx512(J, n0, n1);
            break;
        case 2: gemv2_avx512(J, n0, n1); break;
        case 3: gemv3_avx512(J, n0, n1); break;
        default: gemv4_avx512(J, n0, n1); break;
    }
}

/* The 4 x 4 tiles' epilogue works on one vector whose lane 4r + k belongs to row n + r and token t + k. Its operands
 * are built in registers: a row value repeated over its 4 lanes (tile_rows), a token value repeated over the 4 rows
 * (a 128-bit broadcast), and the result is transposed once and written as one masked 4-float store per token
 * (tile_store). Gathers (vpgatherdd is microcoded on Zen 4) and arrays filled by scalar stores and read back as a
 * vector (a store-forwarding stall) cost as much as two of K = 512's blocks per tile. */
TARGET_AVX512 static inline __m512 tile_rows(__m128 a) {
    return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                 _mm512_castps128_ps512(a));
}

/* p[0], p[stride], p[2 * stride], p[3 * stride], the first n of them (n constant after inlining), zeros after. */
static inline __attribute__((always_inline)) __m128 first4_ps(const float *p, int64_t stride, const int n) {
    return _mm_setr_ps(p[0], n > 1 ? p[stride] : 0.0f, n > 2 ? p[2 * stride] : 0.0f, n > 3 ? p[3 * stride] : 0.0f);
}
static inline __attribute__((always_inline)) __m128i first4_epi32(const int32_t *p, int64_t stride, const int n) {
    return _mm_setr_epi32(p[0], n > 1 ? p[stride] : 0, n > 2 ? p[2 * stride] : 0, n > 3 ? p[3 * stride] : 0);
}

/* Lane 4r + k of v to y[(t + k) * N + n + r], for r < R, k < TT. */
TARGET_AVX512 static inline __attribute__((always_inline)) void tile_store(float *y, int64_t N, int64_t n, int64_t t,
                                                                           __m512 v, const int R, const int TT) {
    const __m512 tr = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), v);
    const __mmask8 m = (__mmask8)((1u << R) - 1);
    float *y0 = y + t * N + n;
    _mm_mask_storeu_ps(y0, m, _mm512_castps512_ps128(tr));
    if (TT > 1) _mm_mask_storeu_ps(y0 + N, m, _mm512_extractf32x4_ps(tr, 1));
    if (TT > 2) _mm_mask_storeu_ps(y0 + 2 * N, m, _mm512_extractf32x4_ps(tr, 2));
    if (TT > 3) _mm_mask_storeu_ps(y0 + 3 * N, m, _mm512_extractf32x4_ps(tr, 3));
}

/* The 16 accumulators of a 4 x 4 tile (row r, token k) as named variables, each vpdpbusd written out (DPBUSD_R) and
 * pinned to its register once per block (TILE_PIN): with an [4][4] array and the intrinsic, GCC 12 copied accumulators
 * through other registers and spilled some to the stack every block, and the tiles ran at about 45 % of vpdpbusd's
 * rate. Unused ones (r >= R or k >= TT) stay zero. */
#define TILE_ACCS(X) X(0, 0) X(0, 1) X(0, 2) X(0, 3) X(1, 0) X(1, 1) X(1, 2) X(1, 3) \
                     X(2, 0) X(2, 1) X(2, 2) X(2, 3) X(3, 0) X(3, 1) X(3, 2) X(3, 3)
#define TILE_ZERO(r, k) __m512i a##r##k = _mm512_setzero_si512();
/* Eight vector variables kept in registers from here on (an empty asm that reads and writes them). */
#define PIN8(a, b, c, d, e, f, g, h) \
    __asm__("" : "+v"(a), "+v"(b), "+v"(c), "+v"(d), "+v"(e), "+v"(f), "+v"(g), "+v"(h))
#define TILE_PIN()                                      \
    do {                                                \
        PIN8(a00, a01, a02, a03, a10, a11, a12, a13);   \
        PIN8(a20, a21, a22, a23, a30, a31, a32, a33);   \
    } while (0)
/* Token k's 64 activation bytes at p against the R row vectors w[0..R-1]. */
#define TILE_TOKEN(k, p, w)                                      \
    do {                                                         \
        if (k < TT) {                                            \
            const __m512i x_ = _mm512_loadu_si512(p);            \
            DPBUSD_R(a0##k, w[0], x_);                           \
            if (R > 1) DPBUSD_R(a1##k, w[1], x_);                \
            if (R > 2) DPBUSD_R(a2##k, w[2], x_);                \
            if (R > 3) DPBUSD_R(a3##k, w[3], x_);                \
        }                                                        \
    } while (0)
#define TILE_OUT(r, k) v[4 * r + k] = a##r##k;

/* GEMM tile: R rows x TT tokens (<= 4 x 4). Each 64-byte block of a row is unpacked once into four code vectors and
 * used against TT tokens; 16 int32 accumulators stay in registers. */
TARGET_AVX512 static inline __attribute__((always_inline)) void tile_avx512(const job_t *J, int64_t n, int64_t t,
                                                                            const int R, const int TT) {
    const __m512i m3 = _mm512_set1_epi8(3);
    /* The epilogue runs on lane 4r + k of one vector for row n + r and token t + k (unused lanes: zeros). */
    __m512 yv = _mm512_setzero_ps();
    __m512i v[16];
    const int64_t S = J->S, K = J->K;
    for (int64_t s = 0; s < J->S; s++) {
        TILE_ACCS(TILE_ZERO)
        for (int64_t b = J->bounds[s]; b < J->bounds[s + 1]; b++) {
            __m512i w[4];
            _Pragma("GCC unroll 4")
            for (int r = 0; r < R; r++) w[r] = _mm512_loadu_si512(J->qs + ((n + r) * J->nb + b) * QB);
            const int8_t *x = J->xq + t * K + b * QK;
            _Pragma("GCC unroll 4")
            for (int l = 0; l < 4; l++) {
                __m512i wl[4];
                _Pragma("GCC unroll 4")
                for (int r = 0; r < R; r++) {
                    __m512i c = w[r];
                    if (l == 1) c = _mm512_srli_epi16(c, 2);
                    if (l == 2) c = _mm512_srli_epi16(c, 4);
                    if (l == 3) c = _mm512_srli_epi16(c, 6);
                    wl[r] = _mm512_and_si512(c, m3);
                }
                TILE_TOKEN(0, x + 64 * l, wl);
                TILE_TOKEN(1, x + K + 64 * l, wl);
                TILE_TOKEN(2, x + 2 * K + 64 * l, wl);
                TILE_TOKEN(3, x + 3 * K + 64 * l, wl);
            }
            TILE_PIN();
        }
        /* Per segment, the R x TT sums are reduced together (hsum16x16) and finished in one vector epilogue: lane by
         * lane the float32 operations of the scalar epilogue, so bit-identical to it. R x TT horizontal reductions
         * and scalar epilogues instead cost about as much as 3 blocks, i.e. 10-25 % per extra scale segment at dim
         * 1792 (7 blocks; measured A/B on the same weights with 1 and 2 segments). */
        TILE_ACCS(TILE_OUT)
        /* Lane 4r + k: seg_d[(n + r) * S + s] and bsum[(t + k) * S + s]; lanes outside the R x TT tile get 0. */
        const __m512 dd = tile_rows(first4_ps(J->seg_d + n * S + s, S, R));
        const __m512i bs = _mm512_broadcast_i32x4(first4_epi32(J->bsum + t * S + s, S, TT));
        const __m512i sums = _mm512_sub_epi32(hsum16x16(v), bs);
        yv = _mm512_add_ps(yv, _mm512_mul_ps(dd, _mm512_cvtepi32_ps(sums)));
    }
    const __m512 xs = _mm512_broadcast_f32x4(first4_ps(J->xs + t, 1, TT));
    tile_store(J->y, J->N, n, t, _mm512_mul_ps(yv, xs), R, TT);
}

#define TILE_ROW(R)                                                           \
    do {                                                                      \
        int64_t t = c0;                                                       \
        for (; t + 4 <= c1; t += 4) tile_avx512(J, n, t, R, 4);               \
        switch (c1 - t) {                                                     \
            case 3: tile_avx512(J, n, t, R, 3); break;                        \
            case 2: tile_avx512(J, n, t, R, 2); break;                        \
            case 1: tile_avx512(J, n, t, R, 1); break;                        \
            default: break;                                                   \
        }                                                                     \
    } while (0)

/* Rows [n0, n1) of J, TOKEN_CHUNK tokens [c0, c1) at a time, 4 rows at a time (the rest in one group of 1..3):
 * ROW(R) handles rows n .. n+R-1 for the chunk (gemm_avx512's TILE_ROW, tq1_gemm_avx512's TQ1_TILE_ROW). */
#define TILE_ROW_GROUPS(ROW)                                                  \
    do {                                                                      \
        for (int64_t c0 = 0; c0 < J->T; c0 += TOKEN_CHUNK) {                  \
            const int64_t c1 = c0 + TOKEN_CHUNK < J->T ? c0 + TOKEN_CHUNK : J->T; \
            int64_t n = n0;                                                   \
            for (; n + 4 <= n1; n += 4) ROW(4);                               \
            switch (n1 - n) {                                                 \
                case 3: ROW(3); break;                                        \
                case 2: ROW(2); break;                                        \
                case 1: ROW(1); break;                                        \
                default: break;                                               \
            }                                                                 \
        }                                                                     \
    } while (0)

TARGET_AVX512 static void gemm_avx512(const job_t *J, int64_t n0, int64_t n1) { TILE_ROW_GROUPS(TILE_ROW); }

/* ---------------------------------------------------------------- AVX-512 VNNI, int8 weights */

/* The dot product of one int8 row with one token, as a vector of 16 lane sums of u * a (u = w + 128): four
 * independent accumulators so that vpdpbusd's latency is hidden (DPBUSD: see gemv1_avx512). */
TARGET_AVX512 static inline __m512i i8_row_avx512(const uint8_t *w, const int8_t *a, int64_t K) {
    __m512i c0 = _mm512_setzero_si512(), c1 = c0, c2 = c0, c3 = c0;
    const int64_t ahead = i8_pf_bytes;
    const int every = i8_pf_every_line;
    for (int64_t k = 0; k < K; k += QK) {
#if PREFETCH_BYTES > 0
        if (every) { /* i8_pf_every_line, i8_pf_bytes: see prefetch_tune */
            PREFETCH(w + k + ahead);
            PREFETCH(w + k + ahead + 64);
            PREFETCH(w + k + ahead + 128);
            PREFETCH(w + k + ahead + 192);
        } else {
            PREFETCH(w + k + ahead); /* the L2 streamer fetches the neighbours */
        }
#endif
        DPBUSD(c0, _mm512_loadu_si512(w + k), a + k);
        DPBUSD(c1, _mm512_loadu_si512(w + k + 64), a + k + 64);
        DPBUSD(c2, _mm512_loadu_si512(w + k + 128), a + k + 128);
        DPBUSD(c3, _mm512_loadu_si512(w + k + 192), a + k + 192);
    }
    return _mm512_add_epi32(_mm512_add_epi32(c0, c1), _mm512_add_epi32(c2, c3));
}

TARGET_AVX512 __attribute__((noinline)) static void i8_gemv1_avx512(const job_t *J, int64_t n0, int64_t n1) {
    int64_t n = n0;
    __m512i v[1][16];
    for (; n + 16 <= n1; n += 16) {
        for (int r = 0; r < 16; r++) v[0][r] = i8_row_avx512(J->qs + (n + r) * J->K, J->xq, J->K);
        epilogue16(J, n, v, 0);
    }
    for (; n < n1; n++) {
        const int32_t acc = _mm512_reduce_add_epi32(i8_row_avx512(J->qs + n * J->K, J->xq, J->K));
        float yv = 0.0f;
        yv = yv + J->seg_d[n] * (float)(acc - J->bsum[0]);
        J->y[n] = yv * J->xs[0];
    }
}

/* R rows x TT tokens (<= 4 x 4): each weight vector is loaded once for TT tokens, each activation vector once for R
 * rows; 16 accumulators stay in registers. The 16 sums are reduced together (hsum16x16) and finished in one vector
 * epilogue (tile_rows, tile_store), lane by lane the scalar epilogue's float32 operations, so bit-identical to it
 * (16 separate horizontal reductions cost as much as the dot products at K = 512). `pf`: the first
 * token tile of a row group also prefetches the row group I8_PF_GROUPS ahead; a row of the output layer is only K
 * bytes, too short a stream for the hardware prefetcher (T = 4 at 50304 x 512 on Zen 4: 1.82 ms without, against
 * 0.35 ms for T = 1, whose GEMV prefetches). */
#ifndef I8_PF_GROUPS
#define I8_PF_GROUPS 2
#endif
TARGET_AVX512 static inline __attribute__((always_inline)) void i8_tile_avx512(const job_t *J, int64_t n, int64_t t,
                                                                               const int R, const int TT, const int pf) {
    TILE_ACCS(TILE_ZERO)
    const int64_t K = J->K;
    const uint8_t *ahead = J->qs + (n + I8_PF_GROUPS * 4) * K;
    for (int64_t i = 0; i < K; i += 64) {
        if (pf) {
            _Pragma("GCC unroll 4")
            for (int r = 0; r < 4; r++) PREFETCH(ahead + r * K + i);
        }
        __m512i w[4];
        _Pragma("GCC unroll 4")
        for (int r = 0; r < R; r++) w[r] = _mm512_loadu_si512(J->qs + (n + r) * K + i);
        const int8_t *x = J->xq + t * K + i;
        TILE_TOKEN(0, x, w);
        TILE_TOKEN(1, x + K, w);
        TILE_TOKEN(2, x + 2 * K, w);
        TILE_TOKEN(3, x + 3 * K, w);
        TILE_PIN();
    }
    __m512i v[16];
    TILE_ACCS(TILE_OUT)
    const __m512 dd = tile_rows(first4_ps(J->seg_d + n, 1, R));
    const __m512i bs = _mm512_broadcast_i32x4(first4_epi32(J->bsum + t, 1, TT));
    const __m512 xs = _mm512_broadcast_f32x4(first4_ps(J->xs + t, 1, TT));
    const __m512i sums = _mm512_sub_epi32(hsum16x16(v), bs);
    const __m512 yv = _mm512_add_ps(_mm512_setzero_ps(), _mm512_mul_ps(dd, _mm512_cvtepi32_ps(sums)));
    tile_store(J->y, J->N, n, t, _mm512_mul_ps(yv, xs), R, TT);
}

#define I8_TILE_ROW(R)                                                        \
    do {                                                                      \
        int64_t t = c0;                                                       \
        for (; t + 4 <= c1; t += 4) i8_tile_avx512(J, n, t, R, 4, t == c0);   \
        switch (c1 - t) {                                                     \
            case 3: i8_tile_avx512(J, n, t, R, 3, t == c0); break;            \
            case 2: i8_tile_avx512(J, n, t, R, 2, t == c0); break;            \
            case 1: i8_tile_avx512(J, n, t, R, 1, t == c0); break;            \
            default: break;                                                   \
        }                                                                     \
    } while (0)

TARGET_AVX512 static void i8_rows_avx512(const job_t *J, int64_t n0, int64_t n1) {
    if (J->T == 1) {
        i8_gemv1_avx512(J, n0, n1);
        return;
    }
    for (int64_t c0 = 0; c0 < J->T; c0 += TOKEN_CHUNK) {
        const int64_t c1 = c0 + TOKEN_CHUNK < J->T ? c0 + TOKEN_CHUNK : J->T;
        int64_t n = n0;
        for (; n + 4 <= n1; n += 4) I8_TILE_ROW(4);
        switch (n1 - n) {
            case 3: I8_TILE_ROW(3); break;
            case 2: I8_TILE_ROW(2); break;
            case 1: I8_TILE_ROW(1); break;
            default: break;
        }
    }
}

/* ---------------------------------------------------------------- AVX2, int8 weights */

/* |w| * sign(a, w) = w * a with both factors in [-127, 127], so maddubs' int16 pair sums (<= 32258) never saturate. */
TARGET_AVX2 static void i8_rows_avx2(const job_t *J, int64_t n0, int64_t n1) {
    const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *w = J->qs + n * J->K;
        for (int64_t t = 0; t < J->T; t++) {
            const int8_t *a = J->xq + t * J->K;
            __m256i acc = _mm256_setzero_si256();
            for (int64_t i = 0; i < J->K; i += 32) {
                const __m256i ws = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w + i)), flip);
                const __m256i av = _mm256_loadu_si256((const __m256i *)(a + i));
                const __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(ws), _mm256_sign_epi8(av, ws));
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
            }
            float yv = 0.0f;
            yv = yv + J->seg_d[n] * (float)hsum256(acc);
            J->y[t * J->N + n] = yv * J->xs[t];
        }
    }
}
#endif /* SPECTRA_X86 */

/* ---------------------------------------------------------------- dispatch */

#include "tq1_kernels.h"
#include "lane_kernels.h"
#include "amx_kernels.h"
#include "rowlane_kernels.h"
#include "quad_kernels.h"
#include "pool.h"
#include "defer.h"

/* Bytes of a job's activations in the VNNI layout (lane_kernels.h) when the AMX or the token-lane GEMM will run it,
 * else 0 (the other kernels read the row-major activations). */
static size_t vnni_xt_bytes(int path, const job_t *J) {
    if (rowlane_wanted(path, J) && J->N % ROWLANE_ROWS == 0) return 0; /* every row on the row-lane GEMM */
    if (amx_applies(path, J)) return amx_tm_applies(path, J) ? 0 : xt_bytes_for(J); /* amx_tm_rows reads xq */
    return lane_applies(path, J) ? xt_bytes_for(J) : 0;
}

/* fn(ctx, c) for c = 0 .. n_chunks - 1 on up to n_threads threads: the kernels' pool (pool.h) where there is one,
 * else OpenMP's dynamic schedule, else a plain loop. */
typedef void (*for_chunks_fn)(void *ctx, int64_t chunk);
static void for_chunks(int n_threads, int64_t n_chunks, for_chunks_fn fn, void *ctx) {
#if defined(SPECTRA_POOL)
    pool_for(n_threads, n_chunks, fn, ctx);
#elif defined(_OPENMP)
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, 1) if (n_threads > 1)
    for (int64_t c = 0; c < n_chunks; c++) fn(ctx, c);
#else
    (void)n_threads;
    for (int64_t c = 0; c < n_chunks; c++) fn(ctx, c);
#endif
}

/* Int8 weights, portable: X = sum_i (u_i - 128) a_i, y = s * (0 + d * f(X)). */
static void i8_rows_scalar(const job_t *J, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *w = J->qs + n * J->K;
        for (int64_t t = 0; t < J->T; t++) {
            const int8_t *a = J->xq + t * J->K;
            int32_t acc = 0;
            for (int64_t i = 0; i < J->K; i++) acc += ((int32_t)w[i] - 128) * a[i];
            float yv = 0.0f;
            yv = yv + J->seg_d[n] * (float)acc;
            J->y[t * J->N + n] = yv * J->xs[t];
        }
    }
}

/* Rows [n0, n1) of J: the row-lane GEMM on the full 16-row groups where it applies (i8: int8 rows), `rest` (the
 * kernels on the row-major weights) on the other rows. */
static void rows_with_rowlane(void (*rest)(int, const job_t *, int64_t, int64_t), int path, const job_t *J,
                              int64_t n0, int64_t n1, int i8) {
    int64_t lo_end, hi_start;
    if (rowlane_applies(path, J) && rowlane_run_rows(J, n0, n1, i8, &lo_end, &hi_start)) {
        rest(path, J, n0, lo_end);
        rest(path, J, hi_start, n1);
        return;
    }
    rest(path, J, n0, n1);
}

/* Int8 rows on the row-major weights (run_rows_i8 runs the rest through rows_with_rowlane). */
static void run_rows_i8_rest(int path, const job_t *J, int64_t n0, int64_t n1) {
    if (n0 >= n1) return;
    if (amx_run_rows_i8(path, J, n0, n1) || quad_run_rows(J, n0, n1, 1)) return;
#ifdef SPECTRA_X86
    if (path == PATH_AVX512VNNI) {
        i8_rows_avx512(J, n0, n1);
        return;
    }
    if (path == PATH_AVX2) {
        i8_rows_avx2(J, n0, n1);
        return;
    }
#endif
    i8_rows_scalar(J, n0, n1);
}

static void run_rows_i8(int path, const job_t *J, int64_t n0, int64_t n1) {
    rows_with_rowlane(run_rows_i8_rest, path, J, n0, n1, 1);
}

/* Ternary rows on the row-major codes (every kernel but the row-lane GEMM; run_rows adds it). */
static void run_rows_rest(int path, const job_t *J, int64_t n0, int64_t n1) {
    if (n0 >= n1) return;
    if (amx_run_rows(path, J, n0, n1) || lane_run_rows(path, J, n0, n1)) return;
    if (quad_run_rows(J, n0, n1, 0)) return; /* J->x4 is set only where quad_applies */
    if (J->fmt == FMT_TQ1) {
        tq1_run_rows(path, J, n0, n1);
        return;
    }
#ifdef SPECTRA_X86
    if (path == PATH_AVX512VNNI) {
        if (J->T <= 4) gemv_avx512(J, n0, n1);
        else gemm_avx512(J, n0, n1);
        return;
    }
    if (path == PATH_AVX2) {
        rows_avx2(J, n0, n1);
        return;
    }
#endif
    rows_scalar(J, n0, n1);
}

static void run_rows(int path, const job_t *J, int64_t n0, int64_t n1) {
    rows_with_rowlane(run_rows_rest, path, J, n0, n1, 0);
}

/* Rows are handed out in contiguous chunks (multiples of 4 rows, the GEMM tile height; how many per thread:
 * chunks_per_thread), so each thread reads one sequential stream of weights at a time. Chunks are claimed, not
 * assigned, because machines are shared: with the pool (pool.h) a thread that the OS deschedules delays the call by
 * at most its chunk, and one that has not started yet delays it by nothing (another thread takes its chunk). */
typedef void (*rows_fn)(int path, const job_t *J, int64_t n0, int64_t n1);

typedef struct {
    rows_fn rows;
    int path;
    const job_t *J;
    int64_t per_chunk; /* rows per chunk, a multiple of 4 */
} rows_task_t;

static void rows_chunk(void *ctx, int64_t c) {
    const rows_task_t *t = (const rows_task_t *)ctx;
    const int64_t n0 = c * t->per_chunk, n1 = n0 + t->per_chunk < t->J->N ? n0 + t->per_chunk : t->J->N;
    t->rows(t->path, t->J, n0, n1);
}

#ifndef GEMV_CHUNKS_PER_THREAD
/* One chunk per thread for the GEMV kernels (up to 4 tokens) and for products on the AMX tile unit: each chunk is a
 * claim on the shared counter and a new weight stream for the prefetchers (and, for AMX, a tile configuration load).
 * On the 2-core Intel Xeon (AMX), builds A/B in one process against 4 per thread for every job
 * (benchmarks/kernel_ab.py, 2 threads): TriLM-1.1B decode 1.076x (9/9), TQ1_0 1.026x (6/7), 99M decode 1.093x (9/9),
 * 99M batch-16 step 1.134x (9/9), the 16-client server 1.072x (10/10); with another process spinning on one core,
 * 1.1B decode 1.054x [0.944-1.092] (4/7). AMX prompts against one chunk up to 32 tokens only: 1.1B prompt of 64
 * 1.066x (7/7), 128 1.015x (6/7), 512 1.007x (3/5), 99M 128 1.034x (6/9), the 16-client server (whose steps carry
 * 32-token prompt chunks) 1.026x (7/10). The AVX-512 GEMMs keep CHUNKS_PER_THREAD (2 per thread lost on Zen 4's
 * batch step). Not measured on Zen 4. */
#define GEMV_CHUNKS_PER_THREAD 1
#endif
#ifndef AMX_CHUNKS_PER_THREAD
#define AMX_CHUNKS_PER_THREAD 1
#endif

static int chunks_per_thread(int path, const job_t *J) {
    if (J->T <= 4) return GEMV_CHUNKS_PER_THREAD;
    if (amx_applies(path, J)) return AMX_CHUNKS_PER_THREAD;
    return CHUNKS_PER_THREAD;
}

/* How a job's N rows are cut for n_threads: rows per chunk (a multiple of 4, at least 16; of 32 where the row-lane
 * GEMM or the token-major AMX GEMM reads the row-lane copy, so that its 16-row groups are whole), and the number of
 * chunks. */
static int64_t row_chunks(int path, const job_t *J, int n_threads, int64_t *n_chunks) {
    const int64_t N = J->N, groups = (N + 3) / 4;
    int64_t per_chunk = groups / (chunks_per_thread(path, J) * n_threads);
    if (per_chunk < 4) per_chunk = 4;
    if (rowlane_applies(path, J) || (J->rl && amx_tm_applies(path, J))) per_chunk = (per_chunk + 7) / 8 * 8;
    *n_chunks = (groups + per_chunk - 1) / per_chunk;
    return 4 * per_chunk;
}

static void run_parallel(rows_fn rows, int path, const job_t *J, int n_threads) {
    if (n_threads <= 1 || J->N < 8) {
        rows(path, J, 0, J->N);
        return;
    }
    int64_t n_chunks;
    const rows_task_t task = {rows, path, J, row_chunks(path, J, n_threads, &n_chunks)};
    for_chunks(n_threads, n_chunks, rows_chunk, (void *)&task);
}

/* Several jobs of one input (q | k | v, gate | up) in one parallel region: chunk c is chunk c - first[g] of job g,
 * each job cut as run_parallel cuts it. One hand-out and one wait instead of one per job; a thread that finishes its
 * part of one matrix goes on to the next without waiting for the other threads. */
typedef struct {
    rows_fn rows;
    int path, G;
    const job_t *jobs;
    int64_t per_chunk[3], first[4]; /* per job: rows per chunk, and its first chunk index (first[G] = total) */
} rows_multi_t;

static void rows_multi_chunk(void *ctx, int64_t c) {
    const rows_multi_t *t = (const rows_multi_t *)ctx;
    int g = 0;
    while (c >= t->first[g + 1]) g++;
    const job_t *J = &t->jobs[g];
    const int64_t n0 = (c - t->first[g]) * t->per_chunk[g];
    t->rows(t->path, J, n0, n0 + t->per_chunk[g] < J->N ? n0 + t->per_chunk[g] : J->N);
}

#ifndef GEMV_SPAN
#define GEMV_SPAN 1
#endif
/* GEMV jobs of one input (up to 4 tokens: q | k | v, gate | up) as n_threads ranges of their rows laid end to end:
 * a thread reads one stream that runs from one matrix into the next (a loaded checkpoint's matrices lie in that order
 * in its code arena) instead of starting a new stream per matrix. Range c: rows [total c / n, total (c+1) / n) of
 * the concatenation, cut at multiples of 16 rows. Against one row chunk per thread per matrix, the 2-core Xeon,
 * builds alternating in one process (kernel_ab.py --decode, 2 threads): TriLM-1.1B 1.011x (8/11) and 1.005x (12/15),
 * TQ1_0 1.023x (7/9), 99M 1.024x (11/11). */
typedef struct {
    rows_fn rows;
    int path, G;
    const job_t *jobs;
    int64_t total, parts, first[4];
} rows_span_t;

static void rows_span_chunk(void *ctx, int64_t c) {
    const rows_span_t *t = (const rows_span_t *)ctx;
    const int64_t r0 = (t->total * c / t->parts) & ~(int64_t)15;
    const int64_t r1 = c + 1 == t->parts ? t->total : (t->total * (c + 1) / t->parts) & ~(int64_t)15;
    for (int g = 0; g < t->G; g++) {
        const int64_t lo = r0 > t->first[g] ? r0 : t->first[g], hi = r1 < t->first[g + 1] ? r1 : t->first[g + 1];
        if (lo < hi) t->rows(t->path, &t->jobs[g], lo - t->first[g], hi - t->first[g]);
    }
}

static void run_parallel_jobs(rows_fn rows, int path, const job_t *jobs, int G, int n_threads) {
    int small = 0;
    for (int g = 0; g < G; g++) small |= jobs[g].N < 8;
    if (G == 1 || G > 3 || n_threads <= 1 || small) {
        for (int g = 0; g < G; g++)
            if (jobs[g].N > 0) run_parallel(rows, path, &jobs[g], n_threads);
        return;
    }
    int gemv = GEMV_SPAN;
    for (int g = 0; g < G; g++) gemv &= jobs[g].T <= 4;
    if (gemv) {
        rows_span_t span = {rows, path, G, jobs, 0, n_threads, {0, 0, 0, 0}};
        for (int g = 0; g < G; g++) span.first[g + 1] = span.first[g] + jobs[g].N;
        span.total = span.first[G];
        for_chunks(n_threads, n_threads, rows_span_chunk, (void *)&span);
        return;
    }
    rows_multi_t task = {rows, path, G, jobs, {0, 0, 0}, {0, 0, 0, 0}};
    for (int g = 0; g < G; g++) {
        int64_t n_chunks;
        task.per_chunk[g] = row_chunks(path, &jobs[g], n_threads, &n_chunks);
        task.first[g + 1] = task.first[g] + n_chunks;
    }
    for_chunks(n_threads, task.first[G], rows_multi_chunk, (void *)&task);
}

static int path_supported(int path) {
    if (path == PATH_SCALAR) return 1;
#ifdef SPECTRA_X86
    __builtin_cpu_init();
    if (path == PATH_AVX2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (path == PATH_AVX512VNNI)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#endif
    return 0;
}

/* ---------------------------------------------------------------- single-query attention (decoding) */

#ifndef ATT_AHEAD
#define ATT_AHEAD 32 /* rows of keys / values prefetched ahead */
#endif
#ifndef ATT_NEAR_BYTES
/* A head with at most this many bytes of keys prefetches the next head's keys and values during its key and value
 * passes (attend_pair). 99m batch-16 steps on Zen 4, builds A/B in one process, with the scheme before (a head's own
 * values during its key pass): better than the ATT_AHEAD scheme alone up to 32 KB of keys (float16, D = 64: 256
 * positions), worse at 38-46 KB (0.94x). */
#define ATT_NEAR_BYTES 32768
#endif

/* IEEE binary16 <-> float32 for a KV cache held in float16. float_to_half rounds to nearest even, with subnormals,
 * overflow to infinity and NaN kept NaN: the rounding of torch's .to(torch.float16) and of vcvtps2ph, so a cache
 * written here equals one written by the model's own forward. half_to_float is exact. */
static inline uint16_t float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7FFFFFFF;
    if (ax >= 0x7F800000) return (uint16_t)(sign | (ax > 0x7F800000 ? 0x7E00 | ((ax >> 13) & 0x3FF) : 0x7C00));
    if (ax >= 0x477FF000) return (uint16_t)(sign | 0x7C00); /* 65520 and up round to infinity */
    if (ax < 0x38800000) {                                    /* below 2^-14: a subnormal half, or zero */
        if (ax < 0x33000000) return (uint16_t)sign;          /* below 2^-25 (and 2^-25 itself, a tie to 0) */
        const uint32_t e = ax >> 23, m = (ax & 0x7FFFFF) | 0x800000, shift = 126 - e;
        uint32_t r = m >> shift;
        const uint32_t rem = m & ((1u << shift) - 1), halfway = 1u << (shift - 1);
        if (rem > halfway || (rem == halfway && (r & 1))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = (ax - 0x38000000) >> 13; /* exponent rebiased 127 -> 15, mantissa cut to 10 bits */
    const uint32_t rem = ax & 0x1FFF;
    if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) r++; /* a carry into the exponent is the right result */
    return (uint16_t)(sign | r);
}

static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1F, m = h & 0x3FF;
    uint32_t bits;
    if (e == 0) {
        const float f = (float)m * 5.9604644775390625e-8f; /* m * 2^-24, exact */
        return sign ? -f : f;
    }
    bits = e == 31 ? sign | 0x7F800000 | (m << 13) : sign | ((e + 112) << 23) | (m << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float kv_at(const void *base, int64_t i, int half) {
    return half ? half_to_float(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

/* A KV cache's kind (`half` in the calls below): 0 float32, 1 float16, KV_Q8 int8 rows. A q8 row is D int8 values
 * and, after them, its float32 scale s: value i is s * a_i, with s = max |x| / 127 and a_i = x_i * (127 / max |x|)
 * rounded to nearest even (the kernels' activation rule, quantize_row_scalar: a zero row gives a = 0, s = 0, a
 * non-finite one a = 0, s = NaN). So a row takes D + 4 bytes against 2 D (float16): at head size 64, 0.53x. Head
 * strides are in elements (bytes for q8), rows follow one another. */
#define KV_Q8 2
static inline int64_t kv_es(int half) { return half == KV_Q8 ? 1 : half ? 2 : 4; }
/* 1 for a KV cache kind the calls take, else 0 with a ValueError set (the kind comes from Python). */
static int kv_kind_ok(int half) {
    if (half >= 0 && half <= KV_Q8) return 1;
    PyErr_Format(PyExc_ValueError, "KV cache kind %d (0 f32, 1 f16, 2 q8)", half);
    return 0;
}

/* One row's length in elements of kv_es bytes (the unit of head strides), and in bytes. */
static inline int64_t kv_row_len(int half, int64_t D) { return half == KV_Q8 ? D + 4 : D; }
static inline int64_t kv_row_bytes(int half, int64_t D) { return kv_row_len(half, D) * kv_es(half); }

static void kv_store_q8_scalar(void *dst, const float *src, int64_t D) {
    int8_t *a = (int8_t *)dst;
    int bad;
    const float amax = absmax_scalar(src, D, &bad);
    float s = bad ? NAN : 0.0f;
    if (bad || amax < Q8_TINY) {
        memset(a, 0, (size_t)D);
    } else {
        const float inv = 127.0f / amax;
        s = amax / 127.0f;
        for (int64_t i = 0; i < D; i++) a[i] = round_i8(src[i] * inv);
    }
    memcpy(a + D, &s, sizeof(float));
}

static inline float q8_scale(const char *row, int64_t D) {
    float s;
    memcpy(&s, row + D, sizeof(float));
    return s;
}

/* Row j's value i of a cache slice of kind `half` (q8: the int8 value, unscaled), and row j's scale (1 but for q8). */
static inline float kv_val(const void *base, int64_t j, int64_t i, int64_t D, int half) {
    return half == KV_Q8 ? (float)((const int8_t *)base)[j * (D + 4) + i] : kv_at(base, j * D + i, half);
}

static inline float kv_row_scale(const void *base, int64_t j, int64_t D, int half) {
    return half == KV_Q8 ? q8_scale((const char *)base + j * (D + 4), D) : 1.0f;
}

/* e^x below this is 0: e^-87 is about the smallest normal float, and the exp of anything smaller is subnormal, which
 * Intel cores produce by a microcode assist per vector (or per value): softmax and log-sum-exp over values spread over
 * more than 87 nats ran 2.5-16x as long (Xeon, 2 threads: the statistics of 16 rows of 50304 logits 2.79 against
 * 0.73 ms; a 1024-key head of sharp attention 77 against 4.7 us, 237 against 95 us on the scalar path). Such a term
 * is below 1e-37 of the largest, which every one of those sums holds. */
#define EXP_FLOOR (-87.0f)

/* expf(x) for x <= 0, 0 below EXP_FLOOR (NaN stays NaN). */
static inline float exp_floor(float x) { return x < EXP_FLOOR ? 0.0f : expf(x); }

/* out_h = softmax(scale * q_h K_h^T) V_h for one query per head, in float32: K_h and V_h are S rows of D values (row
 * stride D, head stride `hs`), the layout of a KV cache slice, float32 or float16 (`half`, widened exactly); or q8
 * rows (D + 4 bytes), each row's scale applied once: score_j = (q . a_j) s_j scale, out = sum_j (p_j s_j) b_j / sum
 * (s_j = 1 otherwise, exact). Three passes per head: scores and their max, exp and sum, then the weighted sum of value
 * rows divided by the sum. Float sums run in another order than torch's scaled_dot_product_attention (and the AVX-512
 * exp is a polynomial), so results agree to rounding (about 1e-6 relative), not bit for bit. */
static void attend_head_scalar(const float *q, const void *k, const void *v, float *out, float *p, int64_t S,
                               int64_t D, float scale, int half) {
    float mx = -INFINITY;
    for (int64_t j = 0; j < S; j++) {
        float dot = 0.0f;
        for (int64_t i = 0; i < D; i++) dot += q[i] * kv_val(k, j, i, D, half);
        p[j] = dot * kv_row_scale(k, j, D, half) * scale;
        if (p[j] > mx) mx = p[j];
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < S; j++) {
        p[j] = exp_floor(p[j] - mx);
        sum += p[j];
    }
    for (int64_t i = 0; i < D; i++) out[i] = 0.0f;
    for (int64_t j = 0; j < S; j++) {
        const float w = p[j] * kv_row_scale(v, j, D, half);
        for (int64_t i = 0; i < D; i++) out[i] += w * kv_val(v, j, i, D, half);
    }
    const float inv = 1.0f / sum;
    for (int64_t i = 0; i < D; i++) out[i] *= inv;
}

/* One cache row (D values) from float32: copied, or rounded to float16. */
static void kv_store_scalar(void *dst, const float *src, int64_t D, int half) {
    if (!half) {
        memcpy(dst, src, sizeof(float) * (size_t)D);
        return;
    }
    for (int64_t i = 0; i < D; i++) ((uint16_t *)dst)[i] = float_to_half(src[i]);
}

#ifdef SPECTRA_X86
/* Lane r of the result = the float sum of the 16 lanes of v[r] (the float version of hsum16x16). */
TARGET_AVX512 static inline __m512 hsum16x16_ps(const __m512 *v) {
    __m512 t[8], u[4];
    for (int i = 0; i < 8; i++)
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
        u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    const __m512 w01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x88), _mm512_shuffle_f32x4(u[0], u[1], 0xdd));
    const __m512 w23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x88), _mm512_shuffle_f32x4(u[2], u[3], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w01, w23, 0x88), _mm512_shuffle_f32x4(w01, w23, 0xdd));
}

/* e^x for x <= 0 (softmax after subtracting the max): x = n ln2 + r with |r| <= ln2/2 (Cody-Waite, two-part ln2),
 * e^r by its Taylor series to r^7 (truncation error < 1e-8 relative), times 2^n by vscalefps; 0 below EXP_FLOOR (and
 * for NaN). Relative error about 2 ulp, against expf's 1. */
TARGET_AVX512 static inline __m512 exp_ps(__m512 x) {
    const __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(EXP_FLOOR), _CMP_GE_OQ);
    x = _mm512_max_ps(x, _mm512_set1_ps(EXP_FLOOR));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_maskz_scalef_ps(live, p, n);
}


/* D a multiple of 16, at most 256. Scores of 16 keys at a time: each key's D products are summed into one vector and
 * the 16 vectors are reduced together; exp runs 16 lanes at a time. */
#define KV_LOAD16(base, i, half)                                                                                   \
    ((half) ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)(base) + (i))))                   \
            : _mm512_loadu_ps((const float *)(base) + (i)))

/* The scores' softmax numerators in place, p[j] = e^(p[j] - max) (vmax: the running maxima of the 16 lanes), and
 * their sum. */
TARGET_AVX512 static inline __attribute__((always_inline)) float att_exp_pass(float *p, int64_t S, __m512 vmax) {
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t j0 = 0; j0 < S; j0 += 16) {
        const int64_t m = S - j0 < 16 ? S - j0 : 16;
        const __mmask16 live = m == 16 ? (__mmask16)0xffff : (__mmask16)((1u << m) - 1);
        const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, p + j0), mx));
        _mm512_mask_storeu_ps(p + j0, live, e);
        vsum = _mm512_mask_add_ps(vsum, live, vsum, e);
    }
    return _mm512_reduce_add_ps(vsum);
}

/* The two halves of one head's attention: the scores (p[j] = e^(score_j - max), their sum returned) and the values
 * (out = sum_j p[j] v_j / sum). attend_head_avx512 runs one after the other; attend_shared_chunk runs all the scores
 * of a head first and then all its values, with the same float operations.
 * Prefetching (`pf`; 0: keys and values already in cache), two ways, every line of a row. A short head (`near`,
 * attend_pair): while its keys are read, row r of the next head's keys, and while its values are read, row r of the
 * next head's values (nk, next_v, nS rows; NULL: none), so each stream is fetched one head ahead of its use, spread over
 * the whole head; a head whose values no such pass fetched (`v` given to the key pass: a chunk's first, or one after
 * a long head) fetches row r of them while its keys are read. A long head: keys and values ATT_AHEAD rows ahead of
 * their use, up to the last row. Fetching the next head's values during the value pass instead of a head's own during
 * its key pass (Zen 5, 2026-12-06): one thread attending 8 rows x 128 heads at 65 positions from DRAM (float16,
 * D = 64) read 30.6 -> 39.1 GB/s (1.29x, 21/21); the 99m batch-16 step at position 64 1.048x (12/15). */
TARGET_AVX512 static inline __attribute__((always_inline)) float att_scores_impl(
    const float *q, const void *k, const void *v, float *p, int64_t S, int64_t D, float scale, const int half,
    const int near, const char *nk, int64_t nS, const int pf) {
    const int64_t es = half ? 2 : 4;
    const int64_t nv = D / 16;
    __m512 qv[16];
    for (int64_t c = 0; c < nv; c++) qv[c] = _mm512_mul_ps(_mm512_loadu_ps(q + 16 * c), _mm512_set1_ps(scale));
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int64_t j0 = 0; j0 < S; j0 += 16) {
        __m512 dots[16];
        const int64_t m = S - j0 < 16 ? S - j0 : 16;
        for (int64_t r = 0; r < 16; r++) {
            if (r >= m) {
                dots[r] = _mm512_setzero_ps();
                continue;
            }
            const int64_t kj = (j0 + r) * D;
            if (pf && near)
                for (int64_t c = 0; c < D * es; c += 64) {
                    if (v) _mm_prefetch((const char *)v + kj * es + c, _MM_HINT_T1);
                    if (j0 + r < nS) _mm_prefetch(nk + kj * es + c, _MM_HINT_T1);
                }
            else if (pf && j0 + r + ATT_AHEAD < S)
                for (int64_t c = 0; c < D * es; c += 64)
                    _mm_prefetch((const char *)k + (kj + ATT_AHEAD * D) * es + c, _MM_HINT_T1);
            __m512 acc = _mm512_mul_ps(qv[0], KV_LOAD16(k, kj, half));
            for (int64_t c = 1; c < nv; c++) acc = _mm512_fmadd_ps(qv[c], KV_LOAD16(k, kj + 16 * c, half), acc);
            dots[r] = acc;
        }
        const __mmask16 live = m == 16 ? (__mmask16)0xffff : (__mmask16)((1u << m) - 1);
        const __m512 sc = hsum16x16_ps(dots);
        _mm512_mask_storeu_ps(p + j0, live, sc);
        vmax = _mm512_mask_max_ps(vmax, live, vmax, sc);
    }
    return att_exp_pass(p, S, vmax);
}

TARGET_AVX512 static inline __attribute__((always_inline)) void att_values_impl(
    const void *v, const float *p, float sum, float *out, int64_t S, int64_t D, const int half, const int near,
    const char *next_v, int64_t nS, const int pf) {
    const int64_t es = half ? 2 : 4;
    const int64_t nv = D / 16;
    __m512 o[16];
    for (int64_t c = 0; c < nv; c++) o[c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < S; j++) {
        const int64_t vj = j * D;
        if (pf && !near && j + ATT_AHEAD < S)
            for (int64_t c = 0; c < D * es; c += 64)
                _mm_prefetch((const char *)v + (vj + ATT_AHEAD * D) * es + c, _MM_HINT_T1);
        if (pf && near && j < nS)
            for (int64_t c = 0; c < D * es; c += 64) _mm_prefetch(next_v + vj * es + c, _MM_HINT_T1);
        const __m512 pj = _mm512_set1_ps(p[j]);
        for (int64_t c = 0; c < nv; c++) o[c] = _mm512_fmadd_ps(pj, KV_LOAD16(v, vj + 16 * c, half), o[c]);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / sum);
    for (int64_t c = 0; c < nv; c++) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(o[c], inv));
}

/* One head; a float16 cache at head size 64 (every paper size but the 3.9B) or 128 gets its own copy of the passes,
 * with D a constant (the inner loops unrolled, no run-time trip counts). */
#define ATT_HEAD(HALF, DD)                                                                                           \
    att_values_impl(v, p, att_scores_impl(q, k, vf, p, S, DD, scale, HALF, near, nk, nS, 1), out, S, DD, HALF, near, \
                    nv, nS, 1)
TARGET_AVX512 static void attend_head_avx512(const float *q, const void *k, const void *v, float *out, float *p,
                                             int64_t S, int64_t D, float scale, int half, int near,
                                             const char *nk, const char *nv, int64_t nS, int fetch_v) {
    const void *vf = fetch_v ? v : NULL;
    if (half && D == 64)
        ATT_HEAD(1, 64);
    else if (half && D == 128)
        ATT_HEAD(1, 128);
    else if (half)
        ATT_HEAD(1, D);
    else
        ATT_HEAD(0, D);
}
#undef ATT_HEAD

/* The halves on float32 keys or values already in cache (attend_shared_chunk's widened head). */
TARGET_AVX512 static float att_scores_cached(const float *q, const float *k, float *p, int64_t S, int64_t D,
                                             float scale) {
    if (D == 64) return att_scores_impl(q, k, NULL, p, S, 64, scale, 0, 0, NULL, 0, 0);
    if (D == 128) return att_scores_impl(q, k, NULL, p, S, 128, scale, 0, 0, NULL, 0, 0);
    return att_scores_impl(q, k, NULL, p, S, D, scale, 0, 0, NULL, 0, 0);
}

TARGET_AVX512 static void att_values_cached(const float *v, const float *p, float sum, float *out, int64_t S,
                                            int64_t D) {
    if (D == 64) att_values_impl(v, p, sum, out, S, 64, 0, 0, NULL, 0, 0);
    else if (D == 128) att_values_impl(v, p, sum, out, S, 128, 0, 0, NULL, 0, 0);
    else att_values_impl(v, p, sum, out, S, D, 0, 0, NULL, 0, 0);
}

/* One cache row from float32, rounded to float16 16 lanes at a time (vcvtps2ph, nearest even); D % 16 == 0. */
TARGET_AVX512 static void kv_store_half_avx512(void *dst, const float *src, int64_t D) {
    for (int64_t i = 0; i < D; i += 16)
        _mm256_storeu_si256((__m256i *)((uint16_t *)dst + i),
                            _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

#define Q8_LOAD16(row, i) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((row) + (i)))))

/* The q8 passes' fetch for row j (R bytes, both ends: a row can straddle two lines): row j of the next head (`next`,
 * nS rows) in a short head, row j + ATT_AHEAD of its own (`own`) in a long one. */
static inline __attribute__((always_inline)) void q8_prefetch(const char *next, const char *own, int64_t j, int64_t S,
                                                              int64_t R, int64_t nS, int near) {
    const char *at = NULL;
    if (near && next && j < nS) at = next + j * R;
    else if (!near && j + ATT_AHEAD < S) at = own + (j + ATT_AHEAD) * R;
    if (at) {
        _mm_prefetch(at, _MM_HINT_T1);
        _mm_prefetch(at + R - 1, _MM_HINT_T1);
    }
}

/* attend_head_scalar on q8 rows 16 lanes at a time, D % 16 == 0, in two halves like att_scores_impl /
 * att_values_impl: scores of 16 rows at a time (each row's D products summed into one vector, the 16 reduced
 * together, then times their scales s_j * scale), and the values with weights p_j s_j. The rows are read either as
 * cache rows (k or v: D int8 and the scale, D + 4 bytes) or, `widened`, as float32 copies of their int8 values (kw:
 * [S][D]) with their scales apart (ks: [S]): attend_shared_chunk's prompt rows, the same float operations on the same
 * values (int8 -> float32 is exact), so the same bits as attending row by row. Prefetching (cache rows only,
 * q8_prefetch), as att_scores_impl's: a short head (`near`: at most ATT_NEAR_BYTES of keys) fetches row r of the next
 * head's keys (nk, nS rows) while it reads its own row r, and row j of the next head's values (nv) in its value pass;
 * a head that no such pass fetched (`first`) fetches its own keys and values first; a long head reads ATT_AHEAD rows
 * ahead. */
TARGET_AVX512 static inline __attribute__((always_inline)) float att_scores_q8(
    const float *q, const char *k, const float *kw, const float *ks, float *p, int64_t S, int64_t D, float scale,
    const char *nk, int64_t nS, const int near, const int widened) {
    const int64_t R = D + 4, nvec = D / 16;
    __m512 qv[16];
    for (int64_t c = 0; c < nvec; c++) qv[c] = _mm512_loadu_ps(q + 16 * c);
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    float sc[16];
    for (int64_t j0 = 0; j0 < S; j0 += 16) {
        __m512 dots[16];
        const int64_t m = S - j0 < 16 ? S - j0 : 16;
        for (int64_t r = 0; r < 16; r++) {
            sc[r] = 0.0f;
            if (r >= m) {
                dots[r] = _mm512_setzero_ps();
                continue;
            }
            const int64_t j = j0 + r;
            __m512 acc;
            if (widened) {
                const float *row = kw + j * D;
                acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(row));
                for (int64_t c = 1; c < nvec; c++) acc = _mm512_fmadd_ps(qv[c], _mm512_loadu_ps(row + 16 * c), acc);
                sc[r] = ks[j] * scale;
            } else {
                const char *row = k + j * R;
                q8_prefetch(nk, k, j, S, R, nS, near);
                acc = _mm512_mul_ps(qv[0], Q8_LOAD16(row, 0));
                for (int64_t c = 1; c < nvec; c++) acc = _mm512_fmadd_ps(qv[c], Q8_LOAD16(row, 16 * c), acc);
                sc[r] = q8_scale(row, D) * scale;
            }
            dots[r] = acc;
        }
        const __mmask16 live = m == 16 ? (__mmask16)0xffff : (__mmask16)((1u << m) - 1);
        const __m512 s16 = _mm512_mul_ps(hsum16x16_ps(dots), _mm512_loadu_ps(sc));
        _mm512_mask_storeu_ps(p + j0, live, s16);
        vmax = _mm512_mask_max_ps(vmax, live, vmax, s16);
    }
    return att_exp_pass(p, S, vmax);
}

TARGET_AVX512 static inline __attribute__((always_inline)) void att_values_q8(
    const char *v, const float *vw, const float *vs, const float *p, float sum, float *out, int64_t S, int64_t D,
    const char *nv, int64_t nS, const int near, const int widened) {
    const int64_t R = D + 4, nvec = D / 16;
    __m512 o[16];
    for (int64_t c = 0; c < nvec; c++) o[c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < S; j++) {
        if (widened) {
            const __m512 pj = _mm512_set1_ps(p[j] * vs[j]);
            for (int64_t c = 0; c < nvec; c++) o[c] = _mm512_fmadd_ps(pj, _mm512_loadu_ps(vw + j * D + 16 * c), o[c]);
            continue;
        }
        const char *row = v + j * R;
        q8_prefetch(nv, v, j, S, R, nS, near);
        const __m512 pj = _mm512_set1_ps(p[j] * q8_scale(row, D));
        for (int64_t c = 0; c < nvec; c++) o[c] = _mm512_fmadd_ps(pj, Q8_LOAD16(row, 16 * c), o[c]);
    }
    const __m512 inv = _mm512_set1_ps(1.0f / sum);
    for (int64_t c = 0; c < nvec; c++) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(o[c], inv));
}

TARGET_AVX512 static void attend_head_q8_avx512(const float *q, const char *k, const char *v, float *out, float *p,
                                                int64_t S, int64_t D, float scale, const char *nk, const char *nv,
                                                int64_t nS, int first) {
    const int64_t R = D + 4;
    const int near = S * R <= ATT_NEAR_BYTES;
    if (first || !near)
        for (int64_t j = 0; j < (near ? S : S < ATT_AHEAD ? S : ATT_AHEAD) * R; j += 64) {
            _mm_prefetch(k + j, _MM_HINT_T1);
            _mm_prefetch(v + j, _MM_HINT_T1);
        }
    /* head size 64 or 128 a constant, as attend_head_avx512's: the loops over the row's vectors unrolled, with no
     * run-time trip counts. The same operations in the same order, so the same bits. TriLM-99M batch-16 step at
     * position 64, q8 cache, Xeon with AMX, 2 threads (benchmarks/kernel_ab.py): 1.041x [0.974-1.214] (13/15). */
#define ATT_Q8_HEAD(DD)                                                                                              \
    att_values_q8(v, NULL, NULL, p, att_scores_q8(q, k, NULL, NULL, p, S, DD, scale, nk, nS, near, 0), out, S, DD,  \
                  nv, nS, near, 0)
    if (D == 64)
        ATT_Q8_HEAD(64);
    else if (D == 128)
        ATT_Q8_HEAD(128);
    else
        ATT_Q8_HEAD(D);
#undef ATT_Q8_HEAD
}

/* The halves on widened q8 rows (attend_shared_chunk). */
TARGET_AVX512 static float att_scores_q8_cached(const float *q, const float *kw, const float *ks, float *p, int64_t S,
                                                int64_t D, float scale) {
    if (D == 64) return att_scores_q8(q, NULL, kw, ks, p, S, 64, scale, NULL, 0, 0, 1);
    if (D == 128) return att_scores_q8(q, NULL, kw, ks, p, S, 128, scale, NULL, 0, 0, 1);
    return att_scores_q8(q, NULL, kw, ks, p, S, D, scale, NULL, 0, 0, 1);
}

TARGET_AVX512 static void att_values_q8_cached(const float *vw, const float *vs, const float *p, float sum, float *out,
                                               int64_t S, int64_t D) {
    if (D == 64) att_values_q8(NULL, vw, vs, p, sum, out, S, 64, NULL, 0, 0, 1);
    else if (D == 128) att_values_q8(NULL, vw, vs, p, sum, out, S, 128, NULL, 0, 0, 1);
    else att_values_q8(NULL, vw, vs, p, sum, out, S, D, NULL, 0, 0, 1);
}

/* n q8 cache rows (D + 4 bytes each) as float32 values [n][D] and their scales [n] (attend_shared_chunk). */
TARGET_AVX512 static void widen_q8(float *dst, float *scales, const char *src, int64_t n, int64_t D) {
    for (int64_t j = 0; j < n; j++) {
        const char *row = src + j * (D + 4);
        for (int64_t c = 0; c < D; c += 16) _mm512_storeu_ps(dst + j * D + c, Q8_LOAD16(row, c));
        scales[j] = q8_scale(row, D);
    }
}

/* kv_store_q8_scalar 16 lanes at a time (D % 16 == 0): the same max, products and rounding (vcvtps2dq, nearest even
 * under the default rounding mode), so the same bytes. */
TARGET_AVX512 static inline __attribute__((always_inline)) void kv_store_q8_row(void *dst, const float *src,
                                                                           int64_t D) {
    int bad;
    const float amax = absmax_avx512(src, D, &bad);
    if (bad || amax < Q8_TINY) {
        kv_store_q8_scalar(dst, src, D);
        return;
    }
    const __m512 vinv = _mm512_set1_ps(127.0f / amax);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    for (int64_t i = 0; i < D; i += 16) {
        __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(src + i), vinv));
        r = _mm512_min_epi32(_mm512_max_epi32(r, lo), hi);
        _mm_storeu_si128((__m128i *)((int8_t *)dst + i), _mm512_cvtepi32_epi8(r));
    }
    const float s = amax / 127.0f;
    memcpy((char *)dst + D, &s, sizeof(float));
}

/* kv_store_q8_row, with head size 64 a constant (the loops unrolled; the same bytes). */
TARGET_AVX512 static void kv_store_q8_avx512(void *dst, const float *src, int64_t D) {
    if (D == 64) kv_store_q8_row(dst, src, 64);
    else kv_store_q8_row(dst, src, D);
}
#endif

/* One q8 cache row from D floats: kv_store_q8_avx512 where it runs, else kv_store_q8_scalar (the same bytes). */
static void kv_store_q8(int path, void *dst, const float *src, int64_t D) {
#ifdef SPECTRA_X86
    if (path == PATH_AVX512VNNI && D % 16 == 0) {
        kv_store_q8_avx512(dst, src, D);
        return;
    }
#else
    (void)path;
#endif
    kv_store_q8_scalar(dst, src, D);
}

/* Room for one head's S scores on the calling thread, grown as needed and kept (the pool's workers live on), so no
 * call allocates: a prefill chunk of 128 rows at position 2000 would otherwise ask for 128 * H * 2000 floats per
 * layer. NULL when it cannot grow. */
static float *att_scores(int64_t S) {
    static _Thread_local void *buf = NULL;
    static _Thread_local size_t size = 0;
    return (float *)grow_buffer(&buf, &size, sizeof(float) * (size_t)S);
}

/* Attention of B rows, each over its own cache (row b: q at qs + b * A, keys / values of head h at kcs[b] + h * hs
 * elements, positions 0..pos[b]), as one job over the B * H (row, head) pairs: one hand-out of work per layer instead
 * of one per row. Row b's output goes to outs + b * A. Returns 0 when a thread could not get room for its scores. */
typedef struct {
    const float *qs;
    float *outs;
    void *const *kcs, *const *vcs;
    const int64_t *pos;
    int64_t H, D, A, hs, B, n_chunks;
    float scale;
    int simd, half;
    _Atomic int *failed;
} attend_batch_task_t;

/* Pair i = (row i / H, head i % H); `next`: the pair this thread runs after it (-1: none). */
static void attend_pair(const attend_batch_task_t *t, int64_t i, int64_t next, int first) {
    const int64_t H = t->H, D = t->D, es = kv_es(t->half), b = i / H, h = i % H, S = t->pos[b] + 1;
    const char *kh = (const char *)t->kcs[b] + h * t->hs * es, *vh = (const char *)t->vcs[b] + h * t->hs * es;
    const float *q = t->qs + b * t->A + h * D;
    float *out = t->outs + b * t->A + h * D;
    float *p = att_scores(S);
    if (!p) {
        atomic_store(t->failed, 1);
        return;
    }
#ifdef SPECTRA_X86
    if (t->simd && t->half == KV_Q8) { /* the next pair's keys and values, fetched during this one's passes */
        const char *nk = next >= 0 ? (const char *)t->kcs[next / H] + (next % H) * t->hs : NULL;
        const char *nv = next >= 0 ? (const char *)t->vcs[next / H] + (next % H) * t->hs : NULL;
        const int64_t nS = next >= 0 ? t->pos[next / H] + 1 : 0;
        const int prev_far = !first && (t->pos[(i - 1) / H] + 1) * kv_row_bytes(KV_Q8, D) > ATT_NEAR_BYTES;
        attend_head_q8_avx512(q, kh, vh, out, p, S, D, t->scale, nk, nv, nS, first || prev_far);
        return;
    }
    if (t->simd) {
        /* Every head's keys and values are new streams. A short head (at most ATT_NEAR_BYTES of keys) fetches the
         * next pair's keys during its key pass and the next pair's values during its value pass (att_scores_impl),
         * so only a chunk's first head starts cold: its keys are fetched here, its values during its key pass (as
         * are those of a short head after a long one). A long head fetches the first rows of its values and of the
         * next pair's keys here and then runs ATT_AHEAD rows ahead. */
        const char *nk = next >= 0 ? (const char *)t->kcs[next / H] + (next % H) * t->hs * es : NULL;
        const char *nv = next >= 0 ? (const char *)t->vcs[next / H] + (next % H) * t->hs * es : NULL;
        const int64_t nS = next >= 0 ? t->pos[next / H] + 1 : 0, bytes = S * D * es;
        const int near = bytes <= ATT_NEAR_BYTES;
        const int fetch_v = first || (t->pos[(i - 1) / H] + 1) * D * es > ATT_NEAR_BYTES; /* no pass fetched them */
        if (near && first)
            for (int64_t j = 0; j < bytes; j += 64) _mm_prefetch(kh + j, _MM_HINT_T1);
        if (!near)
            for (int64_t j = 0; j < (ATT_AHEAD * D < S * D ? ATT_AHEAD * D : S * D) * es; j += 64) {
                _mm_prefetch(vh + j, _MM_HINT_T1);
                if (nk) _mm_prefetch(nk + j, _MM_HINT_T1);
            }
        attend_head_avx512(q, kh, vh, out, p, S, D, t->scale, t->half, near, nk, nv, nS, fetch_v);
        return;
    }
#endif
    (void)next, (void)first;
    attend_head_scalar(q, kh, vh, out, p, S, D, t->scale, t->half);
}

/* Chunk c: pairs [c * P / n_chunks, (c + 1) * P / n_chunks), in order. */
static void attend_batch_chunk(void *ctx, int64_t c) {
    const attend_batch_task_t *t = (const attend_batch_task_t *)ctx;
    const int64_t P = t->B * t->H, i0 = c * P / t->n_chunks, i1 = (c + 1) * P / t->n_chunks;
    for (int64_t i = i0; i < i1; i++) attend_pair(t, i, i + 1 < i1 ? i + 1 : -1, i == i0);
}

#ifdef SPECTRA_X86
/* Rows that share one float16 cache (a prompt's rows: consecutive positions of one sequence). Each would widen every
 * key and value it reads to float32, and on Zen 4 vcvtph2ps (1.5 cycles per 16 values, on the pipes of the
 * multiply-adds) costs more than the multiply-add it feeds (1 cycle): about 20 cycles a key at head size 64, against
 * 13 on float32 keys and values in L1. Here the pairs go head by head (pair i = (row i % B, head i / B)); for each head
 * of its run a thread widens the keys, positions 0 .. max pos, once into a buffer of its own, computes the scores of
 * all its rows of that head, then widens the values into the same buffer and finishes the rows. The widened values
 * are the cache's exactly and each row's float operations are those of attend_head_avx512, so the outputs are
 * bit-identical to attending row by row (tests/test_packed_decode.py: a prompt equals feeding it token by token).
 * A q8 cache's rows are widened the same way, their scales kept apart (widen_q8, then att_scores_q8 / att_values_q8
 * as attend_head_q8_avx512 runs them). Prefill speed against the float16 cache's (Zen 5, 2 threads, 4 rounds
 * alternating): TriLM-99M prompt of 1024 0.925x row by row, 0.986x so; TriLM-1.1B prompt of 1000 0.950x, 1.019x. */
static float *att_shared_buffer(int64_t n) { /* per thread, grown as needed and kept, as att_scores */
    static _Thread_local void *buf = NULL;
    static _Thread_local size_t size = 0;
    return (float *)grow_buffer(&buf, &size, sizeof(float) * (size_t)n);
}

TARGET_AVX512 static void widen_half(float *dst, const uint16_t *src, int64_t n) { /* n % 16 == 0 */
    for (int64_t i = 0; i < n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
}

static void attend_shared_chunk(void *ctx, int64_t c) {
    const attend_batch_task_t *t = (const attend_batch_task_t *)ctx;
    const int64_t H = t->H, D = t->D, B = t->B, P = B * H, i0 = c * P / t->n_chunks, i1 = (c + 1) * P / t->n_chunks;
    int64_t smax = 0;
    for (int64_t b = 0; b < B; b++) smax = t->pos[b] + 1 > smax ? t->pos[b] + 1 : smax;
    /* widened keys or values [smax][D], then the rows' scores [B][smax], sums [B] and (q8) row scales [smax] */
    float *w = att_shared_buffer(smax * D + B * smax + B + smax);
    if (!w) {
        atomic_store(t->failed, 1);
        return;
    }
    float *ps = w + smax * D, *sums = ps + B * smax, *rs = sums + B;
    for (int64_t h = i0 / B; h * B < i1; h++) {
        const int64_t b0 = i0 > h * B ? i0 - h * B : 0, b1 = i1 < (h + 1) * B ? i1 - h * B : B;
        if (t->half == KV_Q8) {
            const char *kh = (const char *)t->kcs[0] + h * t->hs, *vh = (const char *)t->vcs[0] + h * t->hs;
            widen_q8(w, rs, kh, smax, D);
            for (int64_t b = b0; b < b1; b++)
                sums[b] = att_scores_q8_cached(t->qs + b * t->A + h * D, w, rs, ps + b * smax, t->pos[b] + 1, D,
                                               t->scale);
            widen_q8(w, rs, vh, smax, D);
            for (int64_t b = b0; b < b1; b++)
                att_values_q8_cached(w, rs, ps + b * smax, sums[b], t->outs + b * t->A + h * D, t->pos[b] + 1, D);
            continue;
        }
        widen_half(w, (const uint16_t *)t->kcs[0] + h * t->hs, smax * D);
        for (int64_t b = b0; b < b1; b++)
            sums[b] = att_scores_cached(t->qs + b * t->A + h * D, w, ps + b * smax, t->pos[b] + 1, D, t->scale);
        widen_half(w, (const uint16_t *)t->vcs[0] + h * t->hs, smax * D);
        for (int64_t b = b0; b < b1; b++)
            att_values_cached(w, ps + b * smax, sums[b], t->outs + b * t->A + h * D, t->pos[b] + 1, D);
    }
}
#endif

#ifndef ATT_SHARED_MIN_ROWS
#define ATT_SHARED_MIN_ROWS 4 /* fewer rows sharing a cache attend row by row */
#endif

/* The end of the run of rows from r0 on that share row r0's cache. */
static int64_t same_cache_end(void *const *kcs, void *const *vcs, int64_t r0, int64_t B) {
    int64_t r = r0 + 1;
    while (r < B && kcs[r] == kcs[r0] && vcs[r] == vcs[r0]) r++;
    return r;
}

#ifndef ATT_CHUNKS_PER_THREAD
#define ATT_CHUNKS_PER_THREAD 8 /* pairs are handed out in this many runs per thread (one claim per run) */
#endif
#ifndef ATT_ROW1_CHUNKS_PER_THREAD
/* One decoded row (the one-token decode): its heads in one run per thread. Each claim is a compare-and-swap on a line
 * both cores write; where the VM's two cores sit on different CCDs of the Zen 5 host (a cache line takes ~200 ns
 * from one to the other, against ~45 ns on one CCD) the eight claims per thread of 28 short heads cost more than the
 * balance they buy. TriLM-1.1B greedy decode on 2 threads, 8-token bursts of the two builds alternating in one
 * process, classified by a core-to-core probe between bursts: cores on different CCDs 1.023x (faster in 117 of 179
 * pairs) and 1.018x (83/142); on one CCD 1.007x (292/522) and 1.018x (381/600). */
#define ATT_ROW1_CHUNKS_PER_THREAD 1
#endif

/* Rows [0, B) as one job: attend_shared_chunk's head-by-head order when `shared`, else attend_batch_chunk's. */
static void attend_rows(int path, const float *qs, void *const *kcs, void *const *vcs, const int64_t *pos, float *outs,
                        int64_t B, int64_t H, int64_t D, int64_t hs, float scale, int n_threads, int half, int shared,
                        _Atomic int *failed) {
    const int64_t P = B * H;
    const int64_t want = (int64_t)(B == 1 ? ATT_ROW1_CHUNKS_PER_THREAD : ATT_CHUNKS_PER_THREAD) * n_threads;
    const attend_batch_task_t task = {qs, outs, kcs, vcs, pos, H, D, H * D, hs, B, want < P ? want : P, scale,
                                      path == PATH_AVX512VNNI && D % 16 == 0, half, failed};
#ifdef SPECTRA_X86
    if (shared) {
        for_chunks(n_threads, task.n_chunks, attend_shared_chunk, (void *)&task);
        return;
    }
#endif
    (void)shared;
    for_chunks(n_threads, task.n_chunks, attend_batch_chunk, (void *)&task);
}

/* The rows in stretches: each run of at least ATT_SHARED_MIN_ROWS rows on one float16 cache (a prompt chunk, alone or
 * after a batched step's decode rows) is one attend_shared_chunk job, the rows between such runs one row-by-row job. */
static int attend_batch_run(int path, const float *qs, void *const *kcs, void *const *vcs, const int64_t *pos,
                            float *outs, int64_t B, int64_t H, int64_t D, int64_t hs, float scale, int n_threads,
                            int half) {
    _Atomic int failed = 0;
    const int64_t A = H * D;
    int can_share = 0;
#ifdef SPECTRA_X86
    can_share = half && path == PATH_AVX512VNNI && D % 16 == 0 && B >= ATT_SHARED_MIN_ROWS;
#endif
    for (int64_t r0 = 0, r1; r0 < B && !atomic_load(&failed); r0 = r1) {
        int shared = 0;
        for (r1 = r0; r1 < B;) { /* up to the next shared run, or to the end of this one if it starts at r0 */
            const int64_t e = can_share ? same_cache_end(kcs, vcs, r1, B) : B;
            if (can_share && e - r1 >= ATT_SHARED_MIN_ROWS) {
                if (r1 == r0) r1 = e, shared = 1;
                break;
            }
            r1 = e;
        }
        attend_rows(path, qs + r0 * A, kcs + r0, vcs + r0, pos + r0, outs + r0 * A, r1 - r0, H, D, hs, scale,
                    n_threads, half, shared, &failed);
    }
    return !atomic_load(&failed);
}

/* One query per head over S positions: the batch of one row at position S - 1. */
static int attend_run(int path, const float *q, const void *k, const void *v, float *out, int64_t H, int64_t S,
                      int64_t D, int64_t hs, float scale, int n_threads, int half) {
    void *kc = (void *)k, *vc = (void *)v;
    const int64_t pos = S - 1;
    return attend_batch_run(path, q, &kc, &vc, &pos, out, 1, H, D, hs, scale, n_threads, half);
}

/* Rotary embedding of k and the new k / v rows of one position into a cache of float32 or float16 (`half`): head
 * hh's row at kc + (hh * hs + pos * D) elements. */
static void rope_head(int path, const float *x, const float *cos, const float *sin, float *y, int64_t D);

static void kv_write(int path, const float *k, const float *v, void *kc, void *vc, const float *cos, const float *sin,
                     int64_t H, int64_t D, int64_t hs, int64_t pos, int half) {
    const int64_t es = kv_es(half), R = kv_row_bytes(half, D);
    float tmp[256];
    for (int64_t hh = 0; hh < H; hh++) {
        char *kd = (char *)kc + hh * hs * es + pos * R, *vd = (char *)vc + hh * hs * es + pos * R;
        rope_head(path, k + hh * D, cos, sin, tmp, D);
        if (half == KV_Q8) {
            kv_store_q8(path, kd, tmp, D);
            kv_store_q8(path, vd, v + hh * D, D);
            continue;
        }
#ifdef SPECTRA_X86
        if (half && path == PATH_AVX512VNNI && D % 16 == 0) {
            kv_store_half_avx512(kd, tmp, D);
            kv_store_half_avx512(vd, v + hh * D, D);
            continue;
        }
#else
        (void)path;
#endif
        kv_store_scalar(kd, tmp, D, half);
        kv_store_scalar(vd, v + hh * D, D, half);
    }
}

/* One row's attention inputs at position p (cos, sin: that position's D values): q rotated per head (into att, then
 * copied back to q), k rotated and v written into the caches. */
static void rope_kv_row(int path, float *q, const float *k, const float *v, float *att, void *kc, void *vc,
                        const float *cos, const float *sin, int64_t H, int64_t D, int64_t hs, int64_t p, int half) {
    for (int64_t hh = 0; hh < H; hh++) rope_head(path, q + hh * D, cos, sin, att + hh * D, D);
    kv_write(path, k, v, kc, vc, cos, sin, H, D, hs, p, half);
    memcpy(q, att, sizeof(float) * (size_t)(H * D));
}

/* Fetch, for writing, the cache lines that kv_write will store position p's k and v rows into. Issued before the
 * layer's q / k / v products, so that the misses on rows that no thread has touched yet (one 2-line row per head, of
 * a different cache for every row of a batch) resolve during them. Rotating and storing 16 rows' k and v took 16-21 us
 * of a 99m layer on the calling thread (the pool's workers waiting), 6 us with these fetches. */
static void kv_prefetch(const char *kc, const char *vc, int64_t H, int64_t D, int64_t hs, int64_t p, int half) {
    const int64_t es = kv_es(half), R = kv_row_bytes(half, D);
    for (int64_t hh = 0; hh < H; hh++)
        for (int64_t j = 0; j < R; j += 64) {
            __builtin_prefetch(kc + hh * hs * es + p * R + j, 1, 3);
            __builtin_prefetch(vc + hh * hs * es + p * R + j, 1, 3);
        }
}

/* argmax(path, ptr, B, V, out_ptr): out[b] = the index of the largest of row b's V floats, the first one on ties, and
 * the first NaN when the row has one: torch.argmax's answer, for greedy decoding (torch's takes ~70 us per 50k row). */
static int64_t argmax_scalar(const float *x, int64_t V) {
    int64_t best = 0;
    for (int64_t i = 0; i < V; i++) {
        if (x[i] != x[i]) return i;
        if (x[i] > x[best]) best = i;
    }
    return best;
}

#ifdef SPECTRA_X86
TARGET_AVX512 static int64_t argmax_avx512(const float *x, int64_t V) {
    const int64_t V16 = V & ~(int64_t)15;
    /* four running maxima (a max does not depend on the order), so the loop is not bound by vmaxps's latency */
    __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
    int64_t i = 0;
    for (; i + 64 <= V16; i += 64) {
        const __m512 v0 = _mm512_loadu_ps(x + i), v1 = _mm512_loadu_ps(x + i + 16);
        const __m512 v2 = _mm512_loadu_ps(x + i + 32), v3 = _mm512_loadu_ps(x + i + 48);
        if (_mm512_cmp_ps_mask(v0, v0, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(v1, v1, _CMP_UNORD_Q) |
            _mm512_cmp_ps_mask(v2, v2, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(v3, v3, _CMP_UNORD_Q))
            return argmax_scalar(x, V); /* a NaN: the scalar rule */
        m0 = _mm512_max_ps(m0, v0), m1 = _mm512_max_ps(m1, v1), m2 = _mm512_max_ps(m2, v2), m3 = _mm512_max_ps(m3, v3);
    }
    for (; i < V16; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        if (_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q)) return argmax_scalar(x, V);
        m0 = _mm512_max_ps(m0, v);
    }
    float m = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
    for (int64_t i = V16; i < V; i++) {
        if (x[i] != x[i]) return argmax_scalar(x, V);
        if (x[i] > m) m = x[i];
    }
    const __m512 mv = _mm512_set1_ps(m);
    for (int64_t i = 0; i < V16; i += 16) {
        const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + i), mv, _CMP_EQ_OQ);
        if (hit) return i + __builtin_ctz(hit);
    }
    for (int64_t i = V16; i < V; i++)
        if (x[i] == m) return i;
    return 0; /* all -inf: torch gives 0 too */
}
#endif

/* One row's argmax on `path`. */
static int64_t argmax_row(int path, const float *x, int64_t V) {
#ifdef SPECTRA_X86
    if (path == PATH_AVX512VNNI) return argmax_avx512(x, V);
#endif
    (void)path;
    return argmax_scalar(x, V);
}

static PyObject *py_argmax(PyObject *self, PyObject *args) {
    int path;
    unsigned long long px, po;
    long long B, V;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKLLK", &path, &px, &B, &V, &po)) return NULL;
    if (B < 0 || V <= 0 || !path_supported(path)) return PyErr_Format(PyExc_ValueError, "bad argmax B=%lld V=%lld", B, V);
    const float *x = (const float *)(uintptr_t)px;
    int64_t *out = (int64_t *)(uintptr_t)po;
    for (long long b = 0; b < B; b++) out[b] = argmax_row(path, x + b * V, V);
    Py_RETURN_NONE;
}

/* logsumexp(path, ptr, B, V, out_ptr): out[b] = log(sum_i exp(x[b, i])) in float32 (the AVX-512 exp of the
 * attention kernels, about 2 ulp), for the log-probabilities a server returns: log p_i = x_i - out. A row is taken in
 * pieces of LSE_PIECE values: piece p's largest value m_p (argmax_row) and s_p = sum exp(x - m_p) over it, then
 * out = M + log(sum_p s_p exp(m_p - M)) with M the largest m_p (sums in double, pieces in order). So the statistics of
 * a row can be taken piece by piece on different threads (head_exec: each thread reads the part of the output
 * layer's logits it has just written, in its own cache) and combined into the same bits as one thread's. Agrees with
 * torch.logsumexp to about 1e-6 relative. A row with a NaN gives its first NaN; a row of -inf gives -inf. */
#ifndef LSE_PIECE
#define LSE_PIECE 4096
#endif
typedef struct {
    float m;     /* the piece's largest value (its first NaN if it has one) */
    int64_t idx; /* where, in the piece */
    double s;    /* sum exp(x - m) over the piece (0 when m is infinite or NaN, or not asked for) */
} piece_t;

static double expsum_scalar(const float *x, int64_t n, float m) {
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) sum += exp_floor(x[i] - m);
    return sum;
}

#ifdef SPECTRA_X86
TARGET_AVX512 static double expsum_avx512(const float *x, int64_t n, float m) {
    const int64_t n16 = n & ~(int64_t)15;
    const __m512 mv = _mm512_set1_ps(m);
    __m512 acc = _mm512_setzero_ps();
    for (int64_t i = 0; i < n16; i += 16) acc = _mm512_add_ps(acc, exp_ps(_mm512_sub_ps(_mm512_loadu_ps(x + i), mv)));
    double sum = (double)_mm512_reduce_add_ps(acc);
    for (int64_t i = n16; i < n; i++) sum += exp_floor(x[i] - m);
    return sum;
}
#endif

static void piece_stats(int path, const float *x, int64_t n, int want_s, piece_t *p) {
    p->idx = argmax_row(path, x, n);
    p->m = x[p->idx];
    p->s = 0.0;
    if (!want_s || p->m != p->m || p->m == INFINITY || p->m == -INFINITY) return;
#ifdef SPECTRA_X86
    if (path == PATH_AVX512VNNI) {
        p->s = expsum_avx512(x, n, p->m);
        return;
    }
#endif
    p->s = expsum_scalar(x, n, p->m);
}

static inline int64_t lse_pieces(int64_t V) { return (V + LSE_PIECE - 1) / LSE_PIECE; }

/* A row's argmax (and, with lse, its log-sum-exp; with top, the value at the argmax) from its pieces' statistics:
 * argmax_row's answer (the first largest value, or the first NaN), and the log-sum-exp above. */
static void pieces_combine(const piece_t *ps, int64_t P, int64_t *idx, float *lse, float *top) {
    for (int64_t q = 0; q < P; q++)
        if (ps[q].m != ps[q].m) {
            if (idx) *idx = q * LSE_PIECE + ps[q].idx;
            if (lse) *lse = ps[q].m;
            if (top) *top = ps[q].m;
            return;
        }
    int64_t best = 0;
    for (int64_t q = 1; q < P; q++)
        if (ps[q].m > ps[best].m) best = q;
    if (idx) *idx = best * LSE_PIECE + ps[best].idx;
    if (top) *top = ps[best].m;
    if (!lse) return;
    const float M = ps[best].m;
    if (M == -INFINITY || M == INFINITY) {
        *lse = M;
        return;
    }
    double sum = 0.0;
    for (int64_t q = 0; q < P; q++)
        if (ps[q].m != -INFINITY) sum += ps[q].s * exp((double)ps[q].m - (double)M);
    *lse = M + (float)log(sum);
}

/* Pieces [q0, q1) of a row of V values. */
static void row_pieces(int path, const float *x, int64_t V, int64_t q0, int64_t q1, int want_s, piece_t *ps) {
    for (int64_t q = q0; q < q1; q++) {
        const int64_t v0 = q * LSE_PIECE, n = V - v0 < LSE_PIECE ? V - v0 : LSE_PIECE;
        piece_stats(path, x + v0, n, want_s, ps + q);
    }
}

/* The statistics of B rows by vocabulary range (rows_stats): chunk c (of n) takes pieces [P c / n, P (c + 1) / n) of
 * every row into ps [B][P], combined afterwards (pieces_combine). Split by rows instead, each thread read logits half
 * of which the other core had just written (16 rows of 50304 x 512: 0.36 ms of statistics after the logits, 0.20
 * this way). With a job J (from HEAD_FUSE_ROWS rows on), the chunk also computes each piece's logits first (the
 * int8 product's rows [LSE_PIECE q, ..)) and takes their statistics while they are in its cache (16 rows x 4096
 * floats: 256 KiB): the in-process server workload 1.011x [1.006-1.032] (8/8) and 1.010x (7/8). For fewer rows the
 * whole product runs first (one row: the piece-by-piece product measured 0.996x / 0.997x on the 1.1B's greedy decode,
 * 2 / 1 threads). */
#ifndef HEAD_FUSE_ROWS
#define HEAD_FUSE_ROWS 4
#endif
typedef struct {
    int path, n;
    const float *x;
    int64_t B, V, P;
    int want_s;
    piece_t *ps;
    const job_t *J;
    int keep; /* with J: 0 when the logits are not wanted (each piece goes to the thread's piece_buffer, not to y) */
} piece_task_t;

/* Per thread (apart from scratch_get's and panel_get's): one piece of the logits of B rows, [B][LSE_PIECE]. */
static float *piece_buffer(int64_t B) {
    static _Thread_local void *buf = NULL;
    static _Thread_local size_t size = 0;
    return (float *)grow_buffer(&buf, &size, sizeof(float) * LSE_PIECE * (size_t)B);
}

static void piece_chunk(void *ctx, int64_t c) {
    const piece_task_t *t = (const piece_task_t *)ctx;
    const int64_t q0 = t->P * c / t->n, q1 = t->P * (c + 1) / t->n;
    float *buf = t->J && !t->keep ? piece_buffer(t->B) : NULL;
    if (t->J && !t->keep && !buf) { /* no memory for the buffer: mark the rows' pieces for rows_stats to refuse */
        for (int64_t q = q0; q < q1; q++)
            for (int64_t b = 0; b < t->B; b++) t->ps[b * t->P + q].idx = -1;
        return;
    }
    for (int64_t q = q0; q < q1; q++) {
        const int64_t v0 = q * LSE_PIECE, v1 = v0 + LSE_PIECE < t->V ? v0 + LSE_PIECE : t->V;
        if (buf) { /* the job's rows [v0, v1) stored at buf [b][n - v0]: its stride LSE_PIECE, its origin moved back */
            job_t J = *t->J;
            J.N = LSE_PIECE;
            J.y = (float *)((uintptr_t)buf - sizeof(float) * (size_t)v0);
            run_rows_i8(t->path, &J, v0, v1);
            for (int64_t b = 0; b < t->B; b++) piece_stats(t->path, buf + b * LSE_PIECE, v1 - v0, t->want_s,
                                                           t->ps + b * t->P + q);
            continue;
        }
        if (t->J) run_rows_i8(t->path, t->J, v0, v1);
        for (int64_t b = 0; b < t->B; b++)
            row_pieces(t->path, t->x + b * t->V, t->V, q, q + 1, t->want_s, t->ps + b * t->P);
    }
}

/* Argmax (idx, or NULL), log-sum-exp (lse, or NULL) and the value at the argmax (top, or NULL) of the B rows of
 * y [B, V] over n_threads, by pieces (piece_chunk); with a job J, its int8 product writes each piece of y first, or,
 * with y NULL, each piece into a per-thread buffer that only the statistics read. 0 when memory cannot be had. */
static int rows_stats(int path, int n_threads, const float *y, int64_t B, int64_t V, int64_t *idx, float *lse,
                      float *top, const job_t *J) {
    if (B == 0) return 1;
    const int64_t P = lse_pieces(V);
    piece_t *ps = (piece_t *)malloc(sizeof(piece_t) * (size_t)(B * P));
    if (!ps) return 0;
    const int n = n_threads < P ? n_threads : (int)P;
    const piece_task_t task = {path, n, y, B, V, P, lse != NULL, ps, J, y != NULL};
    for_chunks(n, n, piece_chunk, (void *)&task);
    int ok = 1;
    for (int64_t i = 0; i < B * P; i++) ok &= ps[i].idx >= 0;
    for (int64_t b = 0; ok && b < B; b++)
        pieces_combine(ps + b * P, P, idx ? idx + b : NULL, lse ? lse + b : NULL, top ? top + b : NULL);
    free(ps);
    return ok;
}

static PyObject *py_logsumexp(PyObject *self, PyObject *args) {
    int path, ok;
    unsigned long long px, po;
    long long B, V;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKLLK", &path, &px, &B, &V, &po)) return NULL;
    if (B < 0 || V <= 0 || !path_supported(path))
        return PyErr_Format(PyExc_ValueError, "bad logsumexp B=%lld V=%lld", B, V);
    Py_BEGIN_ALLOW_THREADS
    ok = rows_stats(path, 1, (const float *)(uintptr_t)px, B, V, NULL, (float *)(uintptr_t)po, NULL, NULL);
    Py_END_ALLOW_THREADS
    if (!ok) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* argmax_logsumexp(path, n_threads, ptr, B, V, idx_ptr, lse_ptr): argmax and, when lse_ptr is not 0, logsumexp of
 * each of B rows, exactly `argmax` and `logsumexp` (the same pieces), over the kernels' pool with the GIL released. A
 * batched decode step needs both for every row (greedy picks, and log-probabilities for the server's streams): one call
 * instead of two serial ones on the engine thread, while the other threads would otherwise wait. */
static PyObject *py_argmax_logsumexp(PyObject *self, PyObject *args) {
    int path, n_threads, ok;
    unsigned long long px, pi, pl;
    long long B, V;
    (void)self;
    if (!PyArg_ParseTuple(args, "iiKLLKK", &path, &n_threads, &px, &B, &V, &pi, &pl)) return NULL;
    if (B < 0 || V <= 0 || n_threads < 1 || !path_supported(path))
        return PyErr_Format(PyExc_ValueError, "bad argmax_logsumexp B=%lld V=%lld threads=%d", B, V, n_threads);
    Py_BEGIN_ALLOW_THREADS
    ok = rows_stats(path, n_threads, (const float *)(uintptr_t)px, B, V, (int64_t *)(uintptr_t)pi,
                    (float *)(uintptr_t)pl, NULL, NULL);
    Py_END_ALLOW_THREADS
    if (!ok) return PyErr_NoMemory();
    Py_RETURN_NONE;
}


/* ---------------------------------------------------------------- sampling */

/* sample(path, x_ptr, V, temperature, top_k, top_p, u) -> int: one draw from the distribution a sampled decoding
 * step picks its token from (spectra.inference.sampling.sample_next): s = x / temperature (float32), restricted to the
 * top_k largest s (0: all; ties with the k-th are kept), then to the nucleus (top_p < 1: a token stays while the
 * weight of the tokens strictly more likely than it is below top_p of the total), weights w = e^(s - max s); the token
 * is the first, in index order, whose running sum of weights passes u times the total (u uniform in [0, 1), from the
 * request's seeded generator). The weights are float32 (exp_ps / exp_scalar: the same bits on every path), their sums
 * double, taken 16 tokens at a time (block_sum). Per 50304-token row this is tens of microseconds, against about 1 ms
 * for torch's softmax and multinomial on one thread and 3-4 ms with torch's sort for top_p. NaN or +inf in s: the
 * argmax rule's index (there is no distribution to draw from); all -inf: index 0; -inf itself is never drawn. */

/* e^x for x <= 0, exp_ps's float32 operations one value at a time: fmaf rounds as vfmadd, rintf as vroundscale to
 * nearest, ldexpf scales as vscalef. */
static float exp_scalar(float x) {
    if (!(x >= EXP_FLOOR)) return 0.0f;
    const float n = rintf(x * 1.44269504088896341f);
    float r = fmaf(-n, 0.693359375f, x);
    r = fmaf(-n, -2.12194440e-4f, r);
    float p = 1.0f / 5040.0f;
    p = fmaf(p, r, 1.0f / 720.0f);
    p = fmaf(p, r, 1.0f / 120.0f);
    p = fmaf(p, r, 1.0f / 24.0f);
    p = fmaf(p, r, 1.0f / 6.0f);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    return ldexpf(p, (int)n);
}

#define SAMPLE_BLOCK 16
#define SAMPLE_BINS 2048
#define SAMPLE_DIRECT 4096 /* top_k up to this: the nucleus is searched among the kept values directly */
#define SAMPLE_SPAN 32.0f /* nats below the largest s that the bins cover; weights below are under e^-32 */

/* The sum of 16 float weights in double, in a fixed order (pairs 8 apart, then 4, 2, 1 apart): block_sum_avx512's. */
static double block_sum(const float *w) {
    double b[8], c[4];
    for (int j = 0; j < 8; j++) b[j] = (double)w[j] + (double)w[j + 8];
    for (int j = 0; j < 4; j++) c[j] = b[j] + b[j + 4];
    return (c[0] + c[2]) + (c[1] + c[3]);
}

/* s = x / T (sample_weights), then w = e^(s - m) where s >= thr, else 0, through the last whole block of 16
 * (sample_exp). */
static void sample_weights_scalar(const float *x, int64_t V, float T, float *s) {
    for (int64_t i = 0; i < V; i++) s[i] = x[i] / T;
}

/* pre[b]: the blocks' sums added one after another from 0 through block b (the draw's running sum at each block's
 * end; pre[nb - 1] is the total). */
static void sample_prefix(const double *bsum, int64_t nb, double *pre) {
    double acc = 0.0;
    for (int64_t b = 0; b < nb; b++) pre[b] = acc += bsum[b];
}

static void sample_exp_scalar(const float *s, int64_t V, float m, float thr, float *w, double *bsum, double *pre) {
    const int64_t Vp = (V + SAMPLE_BLOCK - 1) / SAMPLE_BLOCK * SAMPLE_BLOCK;
    for (int64_t i = 0; i < Vp; i++) {
        const float d = i < V ? s[i] - m : 0.0f;
        w[i] = i < V && s[i] >= thr ? exp_scalar(d) : 0.0f; /* 0 more than 87 below the largest (EXP_FLOOR) */
    }
    for (int64_t b = 0; b < Vp / SAMPLE_BLOCK; b++) bsum[b] = block_sum(w + SAMPLE_BLOCK * b);
    sample_prefix(bsum, Vp / SAMPLE_BLOCK, pre);
}

#ifdef SPECTRA_X86
TARGET_AVX512 static void sample_weights_avx512(const float *x, int64_t V, float T, float *s) {
    const __m512 t = _mm512_set1_ps(T);
    int64_t i = 0;
    for (; i + 16 <= V; i += 16) _mm512_storeu_ps(s + i, _mm512_div_ps(_mm512_loadu_ps(x + i), t));
    for (; i < V; i++) s[i] = x[i] / T;
}

/* block_sum of 16 weights in a register: the same pairs in the same order. */
TARGET_AVX512 static inline double block_sum_avx512(__m512 e) {
    const __m512d b = _mm512_add_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(e)),
                                    _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1))));
    const __m256d c = _mm256_add_pd(_mm512_castpd512_pd256(b), _mm512_extractf64x4_pd(b, 1));
    const __m128d d = _mm_add_pd(_mm256_castpd256_pd128(c), _mm256_extractf128_pd(c, 1));
    return _mm_cvtsd_f64(_mm_add_sd(d, _mm_unpackhi_pd(d, d)));
}

TARGET_AVX512 static void sample_exp_avx512(const float *s, int64_t V, float m, float thr, float *w, double *bsum,
                                            double *pre) {
    const __m512 mv = _mm512_set1_ps(m), tv = _mm512_set1_ps(thr);
    double acc = 0.0; /* the running sum's chain of adds hides under each block's exp */
    for (int64_t i = 0; i < V; i += 16) {
        const __mmask16 live = V - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (V - i)) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(live, s + i);
        const __m512 d = _mm512_sub_ps(v, mv);
        const __m512 e = _mm512_maskz_mov_ps(_mm512_mask_cmp_ps_mask(live, v, tv, _CMP_GE_OQ), exp_ps(d));
        _mm512_storeu_ps(w + i, e);
        bsum[i / 16] = block_sum_avx512(e);
        pre[i / 16] = acc += bsum[i / 16];
    }
}
#endif

/* The median of a[lo], a[mid], a[hi]: the quickselects' pivot. */
static inline float median3(const float *a, int64_t lo, int64_t hi) {
    const float x0 = a[lo], x1 = a[lo + (hi - lo) / 2], x2 = a[hi];
    return x0 > x1 ? (x1 > x2 ? x1 : (x0 > x2 ? x2 : x0)) : (x0 > x2 ? x0 : (x1 > x2 ? x2 : x1));
}

/* The k-th largest of a[0..n) (1 <= k <= n, no NaN), counting repeats; reorders a. Quickselect with a three-way
 * partition (many equal values, such as -inf, cost one pass). */
static float select_desc(float *a, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1;
    const int64_t want = k - 1;
    while (lo < hi) {
        const float pivot = median3(a, lo, hi);
        int64_t lt = lo, i = lo, gt = hi;
        while (i <= gt) {
            const float v = a[i];
            if (v > pivot) a[i++] = a[lt], a[lt++] = v;
            else if (v < pivot) a[i] = a[gt], a[gt--] = v;
            else i++;
        }
        if (want < lt) hi = lt - 1;
        else if (want > gt) lo = gt + 1;
        else return pivot;
    }
    return a[lo];
}

/* The largest value of each block of 16 of s[0..V) into bm; the values of s at or above f into out (returns how
 * many). */
static void block_max_scalar(const float *s, int64_t V, float *bm) {
    for (int64_t b = 0; b < (V + 15) / 16; b++) {
        float mx = s[16 * b];
        for (int64_t i = 16 * b + 1; i < 16 * b + 16 && i < V; i++) mx = s[i] > mx ? s[i] : mx;
        bm[b] = mx;
    }
}

static int64_t collect_scalar(const float *s, int64_t V, float f, float *out) {
    int64_t n = 0;
    for (int64_t i = 0; i < V; i++)
        if (s[i] >= f) out[n++] = s[i];
    return n;
}

#ifdef SPECTRA_X86
TARGET_AVX512 static void block_max_avx512(const float *s, int64_t V, float *bm) {
    int64_t b = 0;
    for (; 16 * b + 16 <= V; b++) bm[b] = _mm512_reduce_max_ps(_mm512_loadu_ps(s + 16 * b));
    if (16 * b < V) {
        const __mmask16 live = (__mmask16)((1u << (V - 16 * b)) - 1);
        bm[b] = _mm512_mask_reduce_max_ps(live, _mm512_maskz_loadu_ps(live, s + 16 * b));
    }
}

TARGET_AVX512 static int64_t collect_avx512(const float *s, int64_t V, float f, float *out) {
    const __m512 fv = _mm512_set1_ps(f);
    int64_t n = 0;
    for (int64_t i = 0; i < V; i += 16) {
        const __mmask16 live = V - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (V - i)) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(live, s + i);
        const __mmask16 hit = _mm512_mask_cmp_ps_mask(live, v, fv, _CMP_GE_OQ);
        if (hit) {
            _mm512_mask_compressstoreu_ps(out + n, hit, v);
            n += __builtin_popcount((unsigned)hit);
        }
    }
    return n;
}
#endif

/* The bins of top_k (large k) and top_p: bin[i] = floor((m - s[i]) * SAMPLE_BINS / SAMPLE_SPAN), the last one
 * (SAMPLE_BINS - 1) open. */
static void sample_bins_scalar(const float *s, int64_t V, float m, uint16_t *bin) {
    const float scale = (float)SAMPLE_BINS / SAMPLE_SPAN;
    for (int64_t i = 0; i < V; i++) {
        const float d = (m - s[i]) * scale;
        bin[i] = (uint16_t)(d < (float)(SAMPLE_BINS - 1) ? (int)d : SAMPLE_BINS - 1);
    }
}

#ifdef SPECTRA_X86
TARGET_AVX512 static void sample_bins_avx512(const float *s, int64_t V, float m, uint16_t *bin) {
    const __m512 mv = _mm512_set1_ps(m), sc = _mm512_set1_ps((float)SAMPLE_BINS / SAMPLE_SPAN);
    const __m512 top = _mm512_set1_ps((float)(SAMPLE_BINS - 1));
    int64_t i = 0;
    for (; i + 16 <= V; i += 16) {
        const __m512 d = _mm512_min_ps(_mm512_mul_ps(_mm512_sub_ps(mv, _mm512_loadu_ps(s + i)), sc), top);
        _mm256_storeu_si256((__m256i *)(bin + i), _mm512_cvtepi32_epi16(_mm512_cvttps_epi32(d)));
    }
    sample_bins_scalar(s + i, V - i, m, bin + i);
}
#endif

/* The weights of s below thr set to 0, and the sums of the blocks that changed taken again (block_sum's order). */
static void sample_cut_scalar(const float *s, int64_t V, float thr, float *w, double *bsum) {
    for (int64_t b = 0; b < (V + SAMPLE_BLOCK - 1) / SAMPLE_BLOCK; b++) {
        if (bsum[b] == 0.0) continue;
        int dirty = 0;
        for (int64_t i = SAMPLE_BLOCK * b; i < SAMPLE_BLOCK * (b + 1) && i < V; i++)
            if (w[i] > 0.0f && s[i] < thr) w[i] = 0.0f, dirty = 1;
        if (dirty) bsum[b] = block_sum(w + SAMPLE_BLOCK * b);
    }
}

#ifdef SPECTRA_X86
TARGET_AVX512 static void sample_cut_avx512(const float *s, int64_t V, float thr, float *w, double *bsum) {
    const __m512 tv = _mm512_set1_ps(thr);
    for (int64_t i = 0; i < V; i += 16) {
        if (bsum[i / 16] == 0.0) continue;
        const __mmask16 live = V - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (V - i)) - 1);
        const __m512 wv = _mm512_loadu_ps(w + i); /* w has whole blocks (zeros past V) */
        const __mmask16 drop = _mm512_mask_cmp_ps_mask(live, _mm512_maskz_loadu_ps(live, s + i), tv, _CMP_LT_OQ) &
                               _mm512_cmp_ps_mask(wv, _mm512_setzero_ps(), _CMP_GT_OQ);
        if (!drop) continue;
        const __m512 kept = _mm512_maskz_mov_ps((__mmask16)~drop, wv);
        _mm512_storeu_ps(w + i, kept);
        bsum[i / 16] = block_sum_avx512(kept);
    }
}

/* The values (and weights) of s with weight in bin `cut`, in index order; returns how many. */
TARGET_AVX512 static int64_t sample_bin_collect_avx512(const float *s, const float *w, int64_t V, const uint16_t *bin,
                                                       int cut, float *a, float *wa) {
    const __m256i cv = _mm256_set1_epi16((short)cut);
    const __m512 zero = _mm512_setzero_ps();
    int64_t n = 0, i = 0;
    for (; i + 16 <= V; i += 16) {
        const __m512 wv = _mm512_loadu_ps(w + i);
        const __mmask16 hit = _mm256_cmpeq_epi16_mask(_mm256_loadu_si256((const __m256i *)(bin + i)), cv) &
                              _mm512_cmp_ps_mask(wv, zero, _CMP_GT_OQ);
        if (hit) {
            _mm512_mask_compressstoreu_ps(a + n, hit, _mm512_loadu_ps(s + i));
            _mm512_mask_compressstoreu_ps(wa + n, hit, wv);
            n += __builtin_popcount((unsigned)hit);
        }
    }
    for (; i < V; i++)
        if (bin[i] == cut && w[i] > 0.0f) a[n] = s[i], wa[n++] = w[i];
    return n;
}
#endif

static void sample_bins(int path, const float *s, int64_t V, float m, uint16_t *bin) {
#ifdef SPECTRA_X86
    if (path == PATH_AVX512VNNI) {
        sample_bins_avx512(s, V, m, bin);
        return;
    }
#endif
    (void)path;
    sample_bins_scalar(s, V, m, bin);
}

/* Whether top_k_threshold counts by bins (larger k) rather than by block maxima. */
static inline int top_k_by_bins(int64_t V, int64_t k) { return k > (V + 15) / 16 / 2; }

/* top_k's threshold: the k-th largest of s[0..V) (k < V; m the largest). Small k: the largest value of each block of
 * 16 first; the k-th largest of those is at most the answer (k blocks hold a value at least that large), so only the
 * values at or above it are selected from (a few times k of them). Larger k: the values counted by bin below m
 * (sample_bins), and only the bin where the count from the top reaches k is selected from (a quickselect over all V
 * values took 0.5 ms, its comparisons unpredictable; top_k_by_bins: then bin[] holds them). tmp: V floats; bin: V. */
static float top_k_threshold(int path, const float *s, int64_t V, float m, int64_t k, float *tmp, uint16_t *bin) {
    const int64_t nb = (V + 15) / 16;
    int64_t n = 0;
    if (top_k_by_bins(V, k)) {
        static _Thread_local uint32_t count[4][SAMPLE_BINS];
        memset(count, 0, sizeof(count));
        sample_bins(path, s, V, m, bin);
        for (int64_t i = 0; i < V; i++) count[i & 3][bin[i]]++;
        int64_t above = 0;
        int cut = 0;
        for (; cut < SAMPLE_BINS - 1; cut++) {
            const int64_t c = (int64_t)count[0][cut] + count[1][cut] + count[2][cut] + count[3][cut];
            if (above + c >= k) break;
            above += c;
        }
        for (int64_t i = 0; i < V; i++)
            if (bin[i] == cut) tmp[n++] = s[i];
        return select_desc(tmp, n, k - above);
    }
    {
#ifdef SPECTRA_X86
        if (path == PATH_AVX512VNNI) {
            block_max_avx512(s, V, tmp);
            n = collect_avx512(s, V, select_desc(tmp, nb, k), tmp);
        } else
#endif
        {
            block_max_scalar(s, V, tmp);
            n = collect_scalar(s, V, select_desc(tmp, nb, k), tmp);
        }
    }
    return select_desc(tmp, n, k);
}

/* top_p's threshold: the smallest value v of the candidates a[0..n) (weights wa) whose strictly larger candidates
 * weigh less than P in all: the nucleus is every candidate >= v. Weighted quickselect (reorders a and wa): a
 * partition's larger side weighs at least P (the threshold is in it) or not (the pivot stays, and the smaller side is
 * searched with that weight carried). The largest candidate always stays (nothing is larger). */
static float top_p_threshold(float *a, float *wa, int64_t n, double P) {
    int64_t lo = 0, hi = n - 1;
    double above = 0.0;
    float kept = INFINITY;
    while (lo <= hi) {
        const float pivot = median3(a, lo, hi);
        int64_t lt = lo, i = lo, gt = hi;
        double mass_hi = 0.0, mass_eq = 0.0;
        while (i <= gt) {
            const float v = a[i], w = wa[i];
            if (v > pivot) {
                a[i] = a[lt], wa[i] = wa[lt], a[lt] = v, wa[lt] = w;
                mass_hi += w, lt++, i++;
            } else if (v < pivot) {
                a[i] = a[gt], wa[i] = wa[gt], a[gt] = v, wa[gt] = w;
                gt--;
            } else {
                mass_eq += w, i++;
            }
        }
        if (above + mass_hi >= P) { /* the pivot is out: the threshold is larger */
            hi = lt - 1;
            continue;
        }
        kept = pivot;
        if (above + mass_hi + mass_eq >= P) break; /* the next smaller value is out */
        above += mass_hi + mass_eq;
        lo = gt + 1;
    }
    return kept;
}

/* The values of s with weight (w > 0) and their weights into a / wa, in index order (blocks of zero weight skipped);
 * returns how many. */
static int64_t collect_kept(const float *s, const float *w, const double *bsum, int64_t V, float *a, float *wa) {
    int64_t n = 0;
    for (int64_t b = 0; b < (V + SAMPLE_BLOCK - 1) / SAMPLE_BLOCK; b++)
        if (bsum[b] != 0.0)
            for (int64_t i = SAMPLE_BLOCK * b; i < SAMPLE_BLOCK * (b + 1) && i < V; i++)
                if (w[i] > 0.0f) a[n] = s[i], wa[n++] = w[i];
    return n;
}

static int64_t sample_row(int path, const float *x, int64_t V, float T, int64_t k, double p, double u, float *buf) {
    const int64_t Vp = (V + SAMPLE_BLOCK - 1) / SAMPLE_BLOCK * SAMPLE_BLOCK, nb = Vp / SAMPLE_BLOCK;
    float *w = buf + Vp, *tmp = buf + 2 * Vp, *tmpw = buf + 3 * Vp;
    double *bsum = (double *)(void *)(buf + 4 * Vp);                 /* nb doubles */
    double *pre = (double *)(void *)(buf + 4 * Vp + 2 * nb);          /* nb doubles: sample_prefix */
    uint16_t *bin = (uint16_t *)(void *)(buf + 4 * Vp + 4 * nb);      /* V of them: top_p's bins */
    const float *s = x; /* x / 1 is x itself, bit for bit (OpenAI's default temperature): no division pass */
    if (T != 1.0f) {
#ifdef SPECTRA_X86
        if (path == PATH_AVX512VNNI) sample_weights_avx512(x, V, T, buf);
        else
#endif
            sample_weights_scalar(x, V, T, buf);
        s = buf;
    }
    const int64_t top = argmax_row(path, s, V);
    const float m = s[top];
    /* x / T overflowed (T below ~1e-37, or 0 as a float): the limit T -> 0 is greedy, the largest x (the first
     * overflowed s need not be the largest x, and 0 / 0 is NaN) */
    if (m != m || m == INFINITY || m == -INFINITY) return s == x ? top : argmax_row(path, x, V);
    const int top_k = k > 0 && k < V;
    float thr = top_k ? top_k_threshold(path, s, V, m, k, tmp, bin) : -INFINITY;
    if (thr < -FLT_MAX) thr = -FLT_MAX; /* -inf never drawn */
#ifdef SPECTRA_X86
    if (path == PATH_AVX512VNNI) sample_exp_avx512(s, V, m, thr, w, bsum, pre);
    else
#endif
        sample_exp_scalar(s, V, m, thr, w, bsum, pre);
    double total = pre[nb - 1];
    if (p < 1.0) {
        /* The nucleus among the kept values: few (after top_k) are searched directly (top_p_threshold); many are
         * weighed by bins of s below m first (SAMPLE_BINS over SAMPLE_SPAN, the last one open), the bins above the
         * one where the weight from the top reaches p of the total all stay, and only that bin's values are
         * searched, with the weight above it carried. */
        const double P = p * total;
        int64_t n = k > 0 && k <= SAMPLE_DIRECT ? collect_kept(s, w, bsum, V, tmp, tmpw) : SAMPLE_DIRECT + 1;
        double above = 0.0;
        if (n > SAMPLE_DIRECT) {
            static _Thread_local double mass[2][SAMPLE_BINS];
            memset(mass, 0, sizeof(mass));
            if (!(top_k && top_k_by_bins(V, k))) sample_bins(path, s, V, m, bin); /* else top_k's */
            /* weights by bin in index order, into two tables (even and odd indices) so that the adds to one bin
             * need not wait on one another; a plain loop over every value (zero weights add nothing): one with
             * branches for zero weights, zero blocks and the open bin took 0.12 ms of a row's 0.17, this 0.05 */
            for (int64_t i = 0; i < V; i++) mass[i & 1][bin[i]] += (double)w[i];
            int cut = 0;
            while (cut < SAMPLE_BINS - 1 && above + (mass[0][cut] + mass[1][cut]) < P)
                above += mass[0][cut] + mass[1][cut], cut++;
#ifdef SPECTRA_X86
            if (path == PATH_AVX512VNNI) n = sample_bin_collect_avx512(s, w, V, bin, cut, tmp, tmpw);
            else
#endif
            {
                n = 0;
                for (int64_t i = 0; i < V; i++)
                    if (bin[i] == cut && w[i] > 0.0f) tmp[n] = s[i], tmpw[n++] = w[i];
            }
        }
        const float v = n > 0 ? top_p_threshold(tmp, tmpw, n, P - above) : thr; /* n = 0: sums short of P by rounding */
        if (v > thr) {
            thr = v;
#ifdef SPECTRA_X86
            if (path == PATH_AVX512VNNI) sample_cut_avx512(s, V, thr, w, bsum);
            else
#endif
                sample_cut_scalar(s, V, thr, w, bsum);
            sample_prefix(bsum, nb, pre);
            total = pre[nb - 1];
        }
    }
    /* The first block whose running sum passes target (pre never decreases: a binary search; a block of zeros adds
     * nothing, so it is never the first), then token by token from the sum before it, in the same double adds as a
     * scan of every block would make. */
    const double target = u * total;
    if (pre[nb - 1] > target) {
        int64_t lo = 0, hi = nb - 1;
        while (lo < hi) {
            const int64_t mid = lo + (hi - lo) / 2;
            if (pre[mid] > target) hi = mid;
            else lo = mid + 1;
        }
        double acc = lo > 0 ? pre[lo - 1] : 0.0;
        int64_t last = -1; /* in this block, unless rounding says otherwise: then its last kept token */
        for (int64_t i = SAMPLE_BLOCK * lo; i < SAMPLE_BLOCK * (lo + 1) && i < V; i++)
            if (w[i] > 0.0f) {
                acc += (double)w[i];
                last = i;
                if (acc > target) return i;
            }
        return last;
    }
    for (int64_t b = nb - 1; b >= 0; b--) /* u * total rounded up to the total: the last kept token */
        if (bsum[b] != 0.0) {
            for (int64_t i = SAMPLE_BLOCK * (b + 1) - 1; i >= SAMPLE_BLOCK * b; i--)
                if (i < V && w[i] > 0.0f) return i;
        }
    return top;
}

/* Whether (top_k, top_p, u) are arguments sample_row takes (with a temperature > 0). */
static int sample_params_ok(long long k, double p, double u) { return k >= 0 && p > 0 && p <= 1 && u >= 0 && u < 1; }

/* Per thread: sample_row's buffers (s, w, two rows of candidates, the block sums, their running sums and the bins:
 * under 5 rows of V floats, rounded up to whole blocks). */
static float *sample_buffer(int64_t V) {
    static _Thread_local void *buf = NULL;
    static _Thread_local size_t size = 0;
    return (float *)grow_buffer(&buf, &size, sizeof(float) * 5 * (size_t)((V + SAMPLE_BLOCK - 1) / SAMPLE_BLOCK *
                                                                             SAMPLE_BLOCK));
}

/* The next token of each of n rows of a step (sample_rows, pick_tokens): row rows[b] of the logits y [., V] (rows
 * NULL: row b); temperature T[b] > 0: sample_row's draw with (top_k k[b], top_p p[b], u[b]), else the row's argmax
 * idx[rows[b]] (sample_next's rule, as a greedy step takes it). -1 where sample_row's buffers could not be had. */
typedef struct {
    int path, n_threads;
    const float *y;
    const int64_t *idx, *rows, *k;
    int64_t V, n;
    const double *T, *p, *u;
    int64_t *out;
} pick_args_t;

static void pick_chunk(void *ctx, int64_t b) {
    const pick_args_t *a = (const pick_args_t *)ctx;
    const int64_t r = a->rows ? a->rows[b] : b;
    if (!(a->T[b] > 0)) {
        a->out[b] = a->idx[r];
        return;
    }
    float *buf = sample_buffer(a->V);
    a->out[b] = buf ? sample_row(a->path, a->y + r * a->V, a->V, (float)a->T[b], a->k[b], a->p[b], a->u[b], buf) : -1;
}

/* pick_chunk for every row, the sampled ones spread over the kernels' pool; 0 when a row's buffers ran short. */
static int pick_run(void *arg) {
    const pick_args_t *a = (const pick_args_t *)arg;
    int64_t sampled = 0;
    for (int64_t b = 0; b < a->n; b++) sampled += a->T[b] > 0;
    if (sampled) for_chunks(a->n_threads < sampled ? a->n_threads : (int)sampled, a->n, pick_chunk, (void *)a);
    else
        for (int64_t b = 0; b < a->n; b++) pick_chunk((void *)a, b);
    for (int64_t b = 0; b < a->n; b++)
        if (a->out[b] < 0) return 0;
    return 1;
}

/* sample_rows(path, n_threads, x_ptr, V, rows_ptr, B, temperature_ptr, top_k_ptr, top_p_ptr, u_ptr, out_ptr):
 * `sample` for B rows of x [., V] (row rows[b] of x, int64; rows_ptr 0: rows 0 .. B-1), each with its own float64
 * temperature, int64 top_k, float64 top_p and u, spread over the kernels' pool (a sampled batched step: one call
 * instead of one per row on the engine thread). The same draws as `sample` row by row (pick_run, every row sampled). */
static PyObject *py_sample_rows(PyObject *self, PyObject *args) {
    int path, n_threads;
    unsigned long long px, pr, pT, pk, pp, pu, po;
    long long B, V;
    (void)self;
    if (!PyArg_ParseTuple(args, "iiKLKLKKKKK", &path, &n_threads, &px, &V, &pr, &B, &pT, &pk, &pp, &pu, &po))
        return NULL;
    if (B < 0 || V <= 0 || n_threads < 1 || !path_supported(path))
        return PyErr_Format(PyExc_ValueError, "bad sample_rows sizes B=%lld V=%lld threads=%d", B, V, n_threads);
    const pick_args_t t = {path, n_threads, (const float *)(uintptr_t)px, NULL, (const int64_t *)(uintptr_t)pr,
                           (const int64_t *)(uintptr_t)pk, V, B, (const double *)(uintptr_t)pT,
                           (const double *)(uintptr_t)pp, (const double *)(uintptr_t)pu, (int64_t *)(uintptr_t)po};
    for (long long b = 0; b < B; b++)
        if (!(t.T[b] > 0) || !sample_params_ok((long long)t.k[b], t.p[b], t.u[b]))
            return PyErr_Format(PyExc_ValueError, "bad sampling arguments in row %lld: temperature=%g top_k=%lld "
                                "top_p=%g u=%g", b, t.T[b], (long long)t.k[b], t.p[b], t.u[b]);
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = pick_run((void *)&t);
    Py_END_ALLOW_THREADS
    if (!ok) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* pick_tokens(path, n_threads, y_ptr, V, idx_ptr, rows_ptr, n, temperature_ptr, top_k_ptr, top_p_ptr, u_ptr, out_ptr):
 * out[b] = the next token of row rows[b] (rows_ptr 0: row b; pick_args_t): a step's picks written where the next
 * step's take_tokens reads them. y_ptr may be 0 when no row samples. Deferred while recording (defer.h). */
static PyObject *py_pick_tokens(PyObject *self, PyObject *args) {
    int path, n_threads;
    unsigned long long py, pi, pr, pT, pk, pp, pu, po;
    long long V, n;
    (void)self;
    if (!PyArg_ParseTuple(args, "iiKLKKLKKKKK", &path, &n_threads, &py, &V, &pi, &pr, &n, &pT, &pk, &pp, &pu, &po))
        return NULL;
    if (n < 0 || V <= 0 || n_threads < 1 || !path_supported(path) || !pi)
        return PyErr_Format(PyExc_ValueError, "bad pick_tokens arguments n=%lld V=%lld threads=%d", n, V, n_threads);
    const pick_args_t a = {path, n_threads, (const float *)(uintptr_t)py, (const int64_t *)(uintptr_t)pi,
                           (const int64_t *)(uintptr_t)pr, (const int64_t *)(uintptr_t)pk, V, n,
                           (const double *)(uintptr_t)pT, (const double *)(uintptr_t)pp,
                           (const double *)(uintptr_t)pu, (int64_t *)(uintptr_t)po};
    for (long long b = 0; b < n; b++)
        if (a.T[b] > 0 && (!py || !sample_params_ok((long long)a.k[b], a.p[b], a.u[b])))
            return PyErr_Format(PyExc_ValueError, "bad sampling arguments in row %lld: temperature=%g top_k=%lld "
                                "top_p=%g u=%g%s", b, a.T[b], (long long)a.k[b], a.p[b], a.u[b],
                                py ? "" : " (no logits given)");
    if (n == 0) Py_RETURN_NONE;
    return defer_or_run(pick_run, NULL, (void *)&a, sizeof(a));
}

typedef struct {
    int64_t *dst;
    const int64_t *src, *index;
    int64_t n;
} take_args_t;

static int take_run(void *arg) {
    const take_args_t *a = (const take_args_t *)arg;
    for (int64_t i = 0; i < a->n; i++)
        if (a->index[i] >= 0) a->dst[i] = a->src[a->index[i]];
    return 1;
}

/* take_tokens(dst_ptr, src_ptr, index_ptr, n): dst[i] = src[index[i]] where index[i] >= 0 (int64 arrays): a step's
 * token ids from the step before's picks (pick_tokens' out), when both are recorded before the first has run.
 * Deferred while recording (defer.h). */
static PyObject *py_take_tokens(PyObject *self, PyObject *args) {
    unsigned long long pd, ps, pi;
    long long n;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKKL", &pd, &ps, &pi, &n)) return NULL;
    if (n < 0 || !pd || !ps || !pi) return PyErr_Format(PyExc_ValueError, "bad take_tokens arguments n=%lld", n);
    const take_args_t a = {(int64_t *)(uintptr_t)pd, (const int64_t *)(uintptr_t)ps, (const int64_t *)(uintptr_t)pi,
                           n};
    return defer_or_run(take_run, NULL, (void *)&a, sizeof(a));
}

/* defer_begin(): record the calls that follow on this thread (defer.h) instead of running them. */
static PyObject *py_defer_begin(PyObject *self, PyObject *noargs) {
    static _Thread_local defer_list_t own;
    (void)self, (void)noargs;
    if (defer_rec) return PyErr_Format(PyExc_RuntimeError, "defer_begin: this thread is already recording");
    own.n = 0;
    defer_rec = &own;
    Py_RETURN_NONE;
}

/* defer_end() -> ticket: hand the recorded calls to the deferred-call thread, which runs them after the lists handed
 * over before; the ticket is for defer_wait. */
static PyObject *py_defer_end(PyObject *self, PyObject *noargs) {
    (void)self, (void)noargs;
    defer_list_t *L = defer_rec;
    if (!L) return PyErr_Format(PyExc_RuntimeError, "defer_end without defer_begin");
    defer_rec = NULL;
    uint64_t ticket;
    Py_BEGIN_ALLOW_THREADS
    ticket = defer_submit(L);
    Py_END_ALLOW_THREADS
    if (!ticket) {
        defer_free(L);
        return PyErr_Format(PyExc_RuntimeError, "could not start the deferred-call thread");
    }
    return PyLong_FromUnsignedLongLong(ticket);
}

/* defer_abort(): drop the recorded calls (after an error while recording); nothing when not recording. */
static PyObject *py_defer_abort(PyObject *self, PyObject *noargs) {
    (void)self, (void)noargs;
    if (defer_rec) {
        defer_free(defer_rec);
        defer_rec = NULL;
    }
    Py_RETURN_NONE;
}

/* defer_wait(ticket, help=True): block, with the GIL released, until the list `ticket` has run, working on its
 * pooled jobs meanwhile unless `help` is false (defer_await); MemoryError when a call of it ran out of memory,
 * ValueError when it fed a token id outside the embedding (the calls after a failing one do not run). */
static PyObject *py_defer_wait(PyObject *self, PyObject *args) {
    unsigned long long ticket;
    int help = 1;
    (void)self;
    if (!PyArg_ParseTuple(args, "K|p", &ticket, &help)) return NULL;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = defer_await(ticket, help);
    Py_END_ALLOW_THREADS
    if (status == 1) Py_RETURN_NONE;
    if (status == 0) return PyErr_NoMemory();
    if (status == -1)
        return PyErr_Format(PyExc_ValueError, "deferred step %llu: a token id outside the embedding", ticket);
    return PyErr_Format(PyExc_ValueError, "defer_wait: no deferred list %llu (finished long ago, or never handed over)",
                        ticket);
}

static PyObject *py_sample(PyObject *self, PyObject *args) {
    int path;
    unsigned long long px;
    long long V, k;
    double T, p, u;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKLdLdd", &path, &px, &V, &T, &k, &p, &u)) return NULL;
    if (V <= 0 || !(T > 0) || !sample_params_ok(k, p, u) || !path_supported(path))
        return PyErr_Format(PyExc_ValueError, "bad sample arguments V=%lld temperature=%g top_k=%lld top_p=%g u=%g", V,
                            T, k, p, u);
    float *buf = sample_buffer(V);
    if (!buf) return PyErr_NoMemory();
    int64_t idx;
    Py_BEGIN_ALLOW_THREADS
    idx = sample_row(path, (const float *)(uintptr_t)px, V, (float)T, k, p, u, buf);
    Py_END_ALLOW_THREADS
    return PyLong_FromLongLong((long long)idx);
}

/* to_half(path, src_ptr, dst_ptr, n): n float32 -> float16 with the KV cache's rounding (kv_write's code: the AVX-512
 * conversion for whole rows of 16 on that path, the scalar one otherwise), for checking it against torch's. */
static PyObject *py_to_half(PyObject *self, PyObject *args) {
    int path;
    unsigned long long ps, pd;
    long long n;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKKL", &path, &ps, &pd, &n)) return NULL;
    if (n < 0 || !path_supported(path)) return PyErr_Format(PyExc_ValueError, "bad to_half call (n=%lld)", n);
    const float *src = (const float *)(uintptr_t)ps;
    uint16_t *dst = (uint16_t *)(uintptr_t)pd;
#ifdef SPECTRA_X86
    if (path == PATH_AVX512VNNI && n % 16 == 0) {
        kv_store_half_avx512(dst, src, n);
        Py_RETURN_NONE;
    }
#endif
    kv_store_scalar(dst, src, n, 1);
    Py_RETURN_NONE;
}

/* to_q8(path, src_ptr, dst_ptr, D, rows): rows of D floats -> q8 cache rows of D + 4 bytes, as the KV cache writes
 * them (kv_write; for tests). */
static PyObject *py_to_q8(PyObject *self, PyObject *args) {
    int path;
    unsigned long long ps, pd;
    long long D, n;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKKLL", &path, &ps, &pd, &D, &n)) return NULL;
    if (D <= 0 || D > 256 || n < 0 || !path_supported(path))
        return PyErr_Format(PyExc_ValueError, "bad to_q8 call (D=%lld, rows=%lld)", D, n);
    const float *src = (const float *)(uintptr_t)ps;
    char *dst = (char *)(uintptr_t)pd;
    for (long long r = 0; r < n; r++) kv_store_q8(path, dst + r * (D + 4), src + r * D, D);
    Py_RETURN_NONE;
}

/* attend(path, q_ptr, k_ptr, v_ptr, out_ptr, H, S, D, head_stride, scale, n_threads, kind=0): q, out [H, D]
 * contiguous; k, v: head h's S rows at k_ptr + h * head_stride (elements) of a float32 (kind 0), float16 (1) or q8
 * (2: D int8 and a float32 scale) cache. */
static PyObject *py_attend(PyObject *self, PyObject *args) {
    int path, n_threads;
    unsigned long long pq, pk, pv, po;
    long long H, S, D, hs;
    float scale;
    (void)self;
    int half = 0;
    if (!PyArg_ParseTuple(args, "iKKKKLLLLfi|i", &path, &pq, &pk, &pv, &po, &H, &S, &D, &hs, &scale, &n_threads,
                          &half))
        return NULL;
    if (!kv_kind_ok(half)) return NULL;
    if (H <= 0 || S <= 0 || D <= 0 || D > 256 || hs < S * kv_row_len(half, D))
        return PyErr_Format(PyExc_ValueError, "bad sizes H=%lld S=%lld D=%lld head stride %lld", H, S, D, hs);
    if (n_threads < 1) return PyErr_Format(PyExc_ValueError, "n_threads must be >= 1, got %d", n_threads);
    if (!path_supported(path)) return PyErr_Format(PyExc_ValueError, "kernel path %d is not supported", path);
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = attend_run(path, (const float *)(uintptr_t)pq, (const void *)(uintptr_t)pk, (const void *)(uintptr_t)pv,
                    (float *)(uintptr_t)po, H, S, D, hs, scale, n_threads, half);
    Py_END_ALLOW_THREADS
    if (!ok) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* ---------------------------------------------------------------- Python bindings */

static int parse_job(PyObject *args, int *path, const float **x, job_t *J, int *n_threads) {
    unsigned long long px, pqs, pb, pd, py;
    long long T, K, N, S;
    int fmt = FMT_TQ2;
    if (!PyArg_ParseTuple(args, "iKLLKLKLKKi|i", path, &px, &T, &K, &pqs, &N, &pb, &S, &pd, &py, n_threads, &fmt))
        return 0;
    if (fmt != FMT_TQ2 && fmt != FMT_TQ1) {
        PyErr_Format(PyExc_ValueError, "unknown weight format %d (0: TQ2_0 code bytes, 1: TQ1_0 code bytes)", fmt);
        return 0;
    }
    if (T < 0 || N < 0 || K <= 0 || K % QK || S <= 0) {
        PyErr_Format(PyExc_ValueError, "bad sizes T=%lld N=%lld K=%lld S=%lld (K must be a positive multiple of %d)",
                     T, N, K, S, QK);
        return 0;
    }
    if (!path_supported(*path)) {
        PyErr_Format(PyExc_ValueError, "kernel path %d is not supported by this CPU or build", *path);
        return 0;
    }
    memset(J, 0, sizeof(*J));
    *x = (const float *)(uintptr_t)px;
    J->qs = (const uint8_t *)(uintptr_t)pqs;
    J->bounds = (const int32_t *)(uintptr_t)pb;
    J->seg_d = (const float *)(uintptr_t)pd;
    J->y = (float *)(uintptr_t)py;
    J->T = T, J->K = K, J->N = N, J->S = S, J->nb = K / QK, J->fmt = fmt;
    if (J->bounds[0] != 0 || J->bounds[S] != J->nb) {
        PyErr_SetString(PyExc_ValueError, "segment bounds must start at 0 and end at K/256");
        return 0;
    }
    for (long long s = 0; s < S; s++) {
        if (J->bounds[s + 1] <= J->bounds[s]) {
            PyErr_SetString(PyExc_ValueError, "segment bounds must be strictly increasing");
            return 0;
        }
    }
    return 1;
}

/* Per-thread scratch for the int8 activations and their sums, reused across calls: decoding makes hundreds of small
 * calls per token and a malloc/free per call is measurable. It grows to the largest size seen by this thread. */
static void *scratch_get(size_t need) {
    static _Thread_local void *scratch = NULL;
    static _Thread_local size_t scratch_size = 0;
    return grow_buffer(&scratch, &scratch_size, need);
}

static size_t round64(size_t n) { return (n + 63) & ~(size_t)63; }

/* Bytes of TQ1_0 activations a product of T tokens reads (tq1_kernels.h): the dense layout alone where run_rows hands
 * a one-token TQ1_0 job to the VBMI GEMV (tq1_gemv1_avx512, then its only reader: not AMX, not the lanes, which
 * use_lane can open to one token), else the per-block layout. Depends on the format and T only, so it is the same for
 * every TQ1_0 job of a group. */
static int tq1_dense_applies(int path, int64_t T) {
#ifdef SPECTRA_X86
    job_t J;
    memset(&J, 0, sizeof(J));
    J.fmt = FMT_TQ1, J.T = T;
    return T == 1 && path == PATH_AVX512VNNI && tq1_has_vbmi() && !amx_applies(path, &J) && !lane_applies(path, &J);
#else
    (void)path, (void)T;
    return 0;
#endif
}

/* Whether a TQ1_0 product of T tokens reads the TQ2-layout activations themselves: every multi-token kernel on a VBMI
 * CPU (the tiles, the token lanes, AMX) runs a TQ1_0 block as TQ2_0's 4 chunks (tq1_tq2_chunks). */
static int tq1_reads_tq2_layout(int path, int64_t T) {
#ifdef SPECTRA_X86
    return T > 1 && path == PATH_AVX512VNNI && tq1_has_vbmi();
#else
    (void)path, (void)T;
    return 0;
#endif
}

static size_t tq1_act_bytes(int path, int64_t T, int64_t nb) {
    if (tq1_reads_tq2_layout(path, T)) return 0;
    return round64(tq1_dense_applies(path, T) ? tq1_dense_bytes(nb) : (size_t)(T * nb * TQ1_AB));
}

/* Tokens [t0, t1) of a product of T tokens: TQ2-layout activations xq [T, nb*256] -> the TQ1_0 layout of
 * tq1_act_bytes at xq1 (both buffers of all T tokens; decided by T, not by the range). */
static void tq1_act_build(int path, int64_t T, const int8_t *xq, int8_t *xq1, int64_t t0, int64_t t1, int64_t nb) {
    if (tq1_reads_tq2_layout(path, T)) return;
    if (tq1_dense_applies(path, T)) tq1_activations_dense(xq, xq1, nb);
    else tq1_activations(xq + t0 * nb * QK, xq1 + t0 * nb * TQ1_AB, t1 - t0, nb);
}

/* matmul(path, x_ptr, T, K, qs_ptr, N, bounds_ptr, S, seg_d_ptr, y_ptr, n_threads[, fmt]) -> None; y[T, N] = x[T, K] W^T
 * for TQ2_0 code bytes (fmt 0, the default) or TQ1_0 code bytes (fmt 1, see tq1_kernels.h) */
static PyObject *py_matmul(PyObject *self, PyObject *args) {
    int path, n_threads;
    const float *x;
    job_t J;
    (void)self;
    if (!parse_job(args, &path, &x, &J, &n_threads)) return NULL;
    if (J.T == 0 || J.N == 0) Py_RETURN_NONE;
    const size_t q_bytes = round64((size_t)(J.T * J.K));
    const size_t q1_bytes = J.fmt == FMT_TQ1 ? tq1_act_bytes(path, J.T, J.nb) : 0;
    const size_t xt_bytes = vnni_xt_bytes(path, &J);
    const size_t x4_bytes = quad_applies(path, &J) ? round64(quad_bytes(J.T, J.K)) : 0;
    const size_t x8_bytes = rowlane_wanted(path, &J) ? round64(rowlane_x8_bytes(J.T, J.K)) : 0;
    void *scratch = scratch_get(q_bytes + q1_bytes + xt_bytes + x4_bytes + x8_bytes +
                                sizeof(int32_t) * (size_t)(J.T * J.S) + sizeof(float) * (size_t)J.T);
    if (!scratch) return PyErr_NoMemory();
    int8_t *xq = (int8_t *)scratch;
    int8_t *xq1 = (int8_t *)scratch + q_bytes;
    int8_t *xt = (int8_t *)scratch + q_bytes + q1_bytes;
    int8_t *x4 = (int8_t *)scratch + q_bytes + q1_bytes + xt_bytes;
    int8_t *x8 = x4 + x4_bytes;
    int32_t *bsum = (int32_t *)((char *)scratch + q_bytes + q1_bytes + xt_bytes + x4_bytes + x8_bytes);
    float *xs = (float *)(bsum + J.T * J.S);
    Py_BEGIN_ALLOW_THREADS
    quantize_rows(path, x, &J, xq, bsum, xs);
    if (J.fmt == FMT_TQ1) tq1_act_build(path, J.T, xq, xq1, 0, J.T, J.nb);
    J.xq = J.fmt == FMT_TQ1 && q1_bytes ? xq1 : xq, J.bsum = bsum, J.xs = xs;
    if (xt_bytes) xt_build(&J, xq, xt), J.xt = xt; /* TQ2-layout activations for both formats (panel_decode_tq1) */
    if (x4_bytes) quad_build(xq, J.T, J.K, x4), J.x4 = x4;
    if (x8_bytes) rowlane_build(xq, J.K, x8, 0, J.T), J.x8 = x8;
    run_parallel(run_rows, path, &J, n_threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static int check_bounds(const int32_t *bounds, long long S, int64_t nb) {
    if (bounds[0] != 0 || bounds[S] != nb) {
        PyErr_SetString(PyExc_ValueError, "segment bounds must start at 0 and end at K/256");
        return 0;
    }
    for (long long s = 0; s < S; s++) {
        if (bounds[s + 1] <= bounds[s]) {
            PyErr_SetString(PyExc_ValueError, "segment bounds must be strictly increasing");
            return 0;
        }
    }
    return 1;
}

#define MAX_GROUP 8

/* One (qs_ptr, N, bounds_ptr, S, seg_d_ptr, y_ptr[, fmt[, rl_ptr]]) tuple -> a job on inputs [T, K]. rl_ptr: the
 * matrix's codes as TQ2_0 code bytes interleaved by 16 rows (rowlane_codes; for a TQ1_0 matrix too), 0 for none. */
static int parse_spec(PyObject *spec, job_t *J, int64_t T, int64_t K) {
    unsigned long long pqs, pb, pd, py, prl = 0;
    long long N, S;
    int fmt = FMT_TQ2;
    const int64_t nb = K / QK;
    if (!PyTuple_Check(spec) || !PyArg_ParseTuple(spec, "KLKLKK|iK", &pqs, &N, &pb, &S, &pd, &py, &fmt, &prl)) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "a matrix spec is a tuple");
        return 0;
    }
    if (N < 0 || S <= 0 || S > nb || (fmt != FMT_TQ2 && fmt != FMT_TQ1)) {
        PyErr_Format(PyExc_ValueError, "bad sizes N=%lld S=%lld or weight format %d", N, S, fmt);
        return 0;
    }
    memset(J, 0, sizeof(*J));
    J->qs = (const uint8_t *)(uintptr_t)pqs;
    J->bounds = (const int32_t *)(uintptr_t)pb;
    J->seg_d = (const float *)(uintptr_t)pd;
    J->y = (float *)(uintptr_t)py;
    J->rl = (const uint8_t *)(uintptr_t)prl;
    J->T = T, J->K = K, J->N = N, J->S = S, J->nb = nb, J->fmt = fmt;
    return check_bounds(J->bounds, S, nb);
}

#ifndef ROWS_PAR_MIN
#define ROWS_PAR_MIN 32 /* per-row work runs on the pool from this many rows on (a prompt chunk) */
#endif

/* fn(ctx, g) for the groups of LANE_TOK rows of T (row group g: rows LANE_TOK g ..): spread over the pool from
 * ROWS_PAR_MIN rows on, else in order on the calling thread, where a decode step's few rows cost less than a hand-out.
 * Rows do not depend on one another, so the results are the same either way. */
static void for_row_groups(int n_threads, int64_t T, for_chunks_fn fn, void *ctx) {
    const int64_t n = (T + LANE_TOK - 1) / LANE_TOK;
    if (T >= ROWS_PAR_MIN) {
        for_chunks(n_threads, n, fn, ctx);
        return;
    }
    for (int64_t g = 0; g < n; g++) fn(ctx, g);
}

/* group_run's activations, 16 rows (one token group of the VNNI layout) per chunk, so that a prompt's rows are
 * prepared on every thread: int8 rows with one sum per block (Q: S = nb), their TQ1_0 form (xq1 when a job of either
 * kind reads it) and the VNNI layout (xt when the AMX or lane GEMM runs a job: both formats' panels meet the TQ2
 * layout, panel_decode_tq1). Rows do not depend on one another, so the bytes are those of the one-thread loop. */
typedef struct {
    int path;
    job_t Q;
    const float *x;
    int8_t *xq, *xq1, *xt, *x4, *x8;
    int32_t *blk_sum;
    float *xs;
} group_prep_t;

static void group_prep_chunk(void *ctx, int64_t g) {
    const group_prep_t *p = (const group_prep_t *)ctx;
    const job_t *Q = &p->Q;
    const int64_t t0 = g * LANE_TOK, t1 = t0 + LANE_TOK < Q->T ? t0 + LANE_TOK : Q->T;
    job_t R = *Q;
    R.T = t1 - t0;
    quantize_rows(p->path, p->x + t0 * Q->K, &R, p->xq + t0 * Q->K, p->blk_sum + t0 * Q->nb, p->xs + t0);
    if (p->xq1) tq1_act_build(p->path, Q->T, p->xq, p->xq1, t0, t1, Q->nb);
    if (p->xt) xt_build_group(Q, p->xq, p->xt, g);
    if (p->x4) /* the full token groups of 4 inside this group of 16 */
        for (int64_t q = t0 / 4; q < t1 / 4; q++) quad_build_group(p->xq, Q->K, p->x4, q);
    if (p->x8) rowlane_build(p->xq, Q->K, p->x8, t0, t1);
}

/* Quantize x [T, K] once (one sum per block) and run every job on it. Needs no Python (call it with the GIL released);
 * returns 0 when scratch memory cannot be allocated. */
static int group_run(int path, const float *x, int64_t T, int64_t K, job_t *jobs, int G, int n_threads) {
    const int64_t nb = K / QK;
    size_t sums = 0;
    for (int g = 0; g < G; g++) sums += (size_t)(T * jobs[g].S);
    const size_t q_bytes = round64((size_t)(T * K));
    const size_t b_bytes = round64(sizeof(int32_t) * (size_t)(nb + 1));
    const size_t blk_bytes = round64(sizeof(int32_t) * (size_t)(T * nb));
    const size_t s_bytes = round64(sizeof(int32_t) * sums);
    int any_tq1 = 0;
    for (int g = 0; g < G; g++) any_tq1 |= jobs[g].fmt == FMT_TQ1;
    const size_t q1_bytes = any_tq1 ? tq1_act_bytes(path, T, nb) : 0;
    size_t xt_bytes = 0; /* VNNI-layout activations, when a job runs the AMX or lane GEMM */
    for (int g = 0; g < G; g++) {
        const size_t need = vnni_xt_bytes(path, &jobs[g]);
        if (need > xt_bytes) xt_bytes = need;
    }
    size_t x4_bytes = 0; /* quad-layout activations, when a TQ2_0 job runs the quad GEMM */
    for (int g = 0; g < G; g++)
        if (quad_applies(path, &jobs[g])) x4_bytes = round64(quad_bytes(T, K));
    size_t x8_bytes = 0; /* row-lane-layout activations, when a TQ2_0 job runs the row-lane GEMM */
    for (int g = 0; g < G; g++)
        if (rowlane_wanted(path, &jobs[g])) x8_bytes = round64(rowlane_x8_bytes(T, K));
    void *scratch = scratch_get(q_bytes + b_bytes + blk_bytes + s_bytes + q1_bytes + sizeof(float) * (size_t)T +
                                xt_bytes + x4_bytes + x8_bytes + 64);
    if (!scratch) return 0;
    int8_t *xt =
        (int8_t *)scratch + round64(q_bytes + b_bytes + blk_bytes + s_bytes + q1_bytes + sizeof(float) * (size_t)T);
    int8_t *x4 = xt + xt_bytes;
    int8_t *x8 = x4 + x4_bytes;
    int8_t *xq1 = (int8_t *)scratch + q_bytes + b_bytes + blk_bytes + s_bytes;
    int8_t *xq = (int8_t *)scratch;
    int32_t *blocks = (int32_t *)((char *)scratch + q_bytes);
    int32_t *blk_sum = (int32_t *)((char *)scratch + q_bytes + b_bytes);
    int32_t *sum = (int32_t *)((char *)scratch + q_bytes + b_bytes + blk_bytes);
    float *xs = (float *)((char *)scratch + q_bytes + b_bytes + blk_bytes + s_bytes + q1_bytes);
    for (int64_t b = 0; b <= nb; b++) blocks[b] = (int32_t)b;
    group_prep_t prep;
    memset(&prep, 0, sizeof(prep));
    job_t *Q = &prep.Q;
    Q->T = T, Q->K = K, Q->nb = nb, Q->S = nb, Q->bounds = blocks;
    prep.path = path, prep.x = x, prep.xq = xq, prep.xq1 = q1_bytes ? xq1 : NULL, prep.blk_sum = blk_sum, prep.xs = xs;
    prep.xt = xt_bytes ? xt : NULL;
    prep.x4 = x4_bytes ? x4 : NULL;
    prep.x8 = x8_bytes ? x8 : NULL;
    for_row_groups(n_threads, T, group_prep_chunk, (void *)&prep);
    for (int g = 0; g < G; g++) {
        job_t *J = &jobs[g];
        for (int64_t t = 0; t < T; t++)
            for (int64_t s = 0; s < J->S; s++) {
                int32_t v = 0;
                for (int64_t b = J->bounds[s]; b < J->bounds[s + 1]; b++) v += blk_sum[t * nb + b];
                sum[t * J->S + s] = v;
            }
        J->xq = J->fmt == FMT_TQ1 && q1_bytes ? xq1 : xq, J->bsum = sum, J->xs = xs;
        /* each layout only where it was sized and built above: a switch (use_rowlane, use_amx, ...) flipped by another
         * thread in between, or a job the quad GEMM takes at too few tokens for its layout (x4_bytes 0: TQ1_0 at one
         * token ran the quad GEMM on the TQ1 activations), must find NULL and take another kernel */
        const size_t need_xt = vnni_xt_bytes(path, J);
        if (need_xt && need_xt <= xt_bytes) J->xt = xt;
        if (x4_bytes && quad_applies(path, J) && round64(quad_bytes(T, K)) <= x4_bytes) J->x4 = x4;
        if (x8_bytes && rowlane_wanted(path, J)) J->x8 = x8;
        sum += T * J->S;
    }
    run_parallel_jobs(run_rows, path, jobs, G, n_threads);
    return 1;
}

/* matmul_group(path, x_ptr, T, K, n_threads, ((qs_ptr, N, bounds_ptr, S, seg_d_ptr, y_ptr), ...)) -> None:
 * y_j[T, N_j] = x W_j^T for up to 8 matrices that share the input (q|k|v, gate|up). The input is quantized once, with
 * one sum per 256-block; each matrix's segment sums are then integer sums of those, so every output is bit-identical
 * to a separate matmul call. The matrices are read one after the other, each as one sequential stream. */
static PyObject *py_matmul_group(PyObject *self, PyObject *args) {
    int path, n_threads;
    unsigned long long px;
    long long T, K;
    PyObject *specs;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKLLiO!", &path, &px, &T, &K, &n_threads, &PyTuple_Type, &specs)) return NULL;
    const Py_ssize_t G = PyTuple_GET_SIZE(specs);
    if (T < 0 || K <= 0 || K % QK || K > (1LL << 22) || G < 1 || G > MAX_GROUP)
        return PyErr_Format(PyExc_ValueError, "bad sizes T=%lld K=%lld or group of %zd matrices (1..%d)", T, K, G,
                            MAX_GROUP);
    if (!path_supported(path)) return PyErr_Format(PyExc_ValueError, "kernel path %d is not supported", path);
    job_t jobs[MAX_GROUP];
    for (Py_ssize_t g = 0; g < G; g++)
        if (!parse_spec(PyTuple_GET_ITEM(specs, g), &jobs[g], T, K)) return NULL;
    if (T == 0) Py_RETURN_NONE;
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = group_run(path, (const float *)(uintptr_t)px, T, K, jobs, (int)G, n_threads);
    Py_END_ALLOW_THREADS
    if (!ok) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* The sizes of a matmul_i8 job of T rows of K (for the kernels' applies tests). */
static job_t i8_sizes(int64_t T, int64_t K) {
    job_t Jx;
    memset(&Jx, 0, sizeof(Jx));
    Jx.T = T, Jx.K = K, Jx.nb = K / QK, Jx.S = 1;
    return Jx;
}

/* Bytes of the VNNI copy of T int8 rows of K where the AMX GEMM runs them, else 0 (the lane GEMM takes no int8). */
static size_t i8_xt_bytes(int path, int64_t T, int64_t K) {
    const job_t Jx = i8_sizes(T, K);
    return amx_applies(path, &Jx) ? xt_bytes_for(&Jx) : 0;
}

/* Bytes of the quad copy of T int8 rows of K where the quad GEMM runs them, else 0. */
static size_t i8_x4_bytes(int path, int64_t T, int64_t K) {
    const job_t Jx = i8_sizes(T, K);
    return quad_applies_i8(path, &Jx) ? round64(quad_bytes(T, K)) : 0;
}

/* Bytes of the row-lane copy of T int8 rows of K where the row-lane GEMM runs them (the weights' interleaved copy
 * given: has_rl), else 0. */
static size_t i8_x8_bytes(int path, int64_t T, int64_t K, int has_rl) {
    job_t Jx = i8_sizes(T, K);
    Jx.rl = has_rl ? (const uint8_t *)&Jx : NULL; /* any non-NULL address: rowlane_wanted only tests it */
    return rowlane_wanted(path, &Jx) ? round64(rowlane_x8_bytes(T, K)) : 0;
}

/* Scratch bytes of matmul_i8_run for T rows of K: the int8 rows, their VNNI, quad and row-lane copies (i8_xt_bytes,
 * i8_x4_bytes, i8_x8_bytes), the row sums and the row scales. */
static size_t i8_scratch_bytes(int path, int64_t T, int64_t K, int has_rl) {
    return round64((size_t)(T * K)) + i8_xt_bytes(path, T, K) + i8_x4_bytes(path, T, K) +
           i8_x8_bytes(path, T, K, has_rl) + (sizeof(int32_t) + sizeof(float)) * (size_t)T;
}

/* The int8 product's job for x [T, K] against qw [N, K] (its activations quantized into scratch, `have` bytes that
 * the caller sized with i8_scratch_bytes, laid out as it says; bounds holds the one segment), ready for run_rows_i8
 * on any rows. rl: qw interleaved by 16 rows for the row-lane GEMM (rowlane_codes), or NULL. The layout is computed
 * again here: where a switch (use_rowlane, use_amx, ...) flipped on another thread since the caller sized it and it
 * no longer fits, the kernels get none of the optional copies (J.xt, x4, x8 NULL) and take the plain path. */
static void matmul_i8_prep(int path, const float *x, int64_t T, int64_t K, const uint8_t *qw, const uint8_t *rl,
                           int64_t N, const float *d, float *y, void *scratch, size_t have, int32_t bounds[2],
                           job_t *Jp) {
    const size_t q_bytes = round64((size_t)(T * K));
    size_t xt_bytes = i8_xt_bytes(path, T, K), x4_bytes = i8_x4_bytes(path, T, K);
    size_t x8_bytes = i8_x8_bytes(path, T, K, rl != NULL);
    if (q_bytes + xt_bytes + x4_bytes + x8_bytes + (sizeof(int32_t) + sizeof(float)) * (size_t)T > have)
        xt_bytes = x4_bytes = x8_bytes = 0;
    int8_t *xq = (int8_t *)scratch;
    int8_t *xt = (int8_t *)scratch + q_bytes;
    int8_t *x4 = xt + xt_bytes;
    int8_t *x8 = x4 + x4_bytes;
    int32_t *bsum = (int32_t *)((char *)scratch + q_bytes + xt_bytes + x4_bytes + x8_bytes);
    float *xs = (float *)(bsum + T);
    bounds[0] = 0, bounds[1] = (int32_t)(K / QK);
    job_t J;
    memset(&J, 0, sizeof(J));
    J.qs = qw;
    J.rl = rl;
    J.seg_d = d;
    J.y = y;
    J.bounds = bounds;
    J.T = T, J.K = K, J.N = N, J.S = 1, J.nb = K / QK;
    quantize_rows(path, x, &J, xq, bsum, xs);
    for (int64_t t = 0; t < T; t++) bsum[t] *= 128; /* sum u a = sum w a + 128 sum a */
    J.xq = xq, J.bsum = bsum, J.xs = xs;
    if (xt_bytes) xt_build(&J, xq, xt), J.xt = xt;
    if (x4_bytes) quad_build(xq, T, K, x4), J.x4 = x4;
    if (x8_bytes) rowlane_build(xq, K, x8, 0, T), J.x8 = x8;
    *Jp = J;
}

/* y[T, N] = x[T, K] W^T for the int8 W of matmul_i8 (w + 128, permuted blocks, row scales d), in `scratch` of
 * `have` bytes (i8_scratch_bytes(path, T, K)); needs no GIL. */
static void matmul_i8_run(int path, int n_threads, const float *x, int64_t T, int64_t K, const uint8_t *qw,
                          const uint8_t *rl, int64_t N, const float *d, float *y, void *scratch, size_t have) {
    int32_t bounds[2];
    job_t J;
    matmul_i8_prep(path, x, T, K, qw, rl, N, d, y, scratch, have, bounds, &J);
    run_parallel(run_rows_i8, path, &J, n_threads);
}

/* matmul_i8(path, x_ptr, T, K, w_ptr, N, scale_ptr, y_ptr, n_threads) -> None: y[T, N] = x W^T for int8 weights stored
 * as u = w + 128 (uint8 [N, K], in the activations' permuted block order) with one float32 scale per row:
 * y = s * (0 + d * f(X)), X = sum_i w_i a_i exactly (int32 suffices for K <= 2^16). */
static PyObject *py_matmul_i8(PyObject *self, PyObject *args) {
    int path, n_threads;
    unsigned long long px, pw, pd, py;
    long long T, K, N;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKLLKLKKi", &path, &px, &T, &K, &pw, &N, &pd, &py, &n_threads)) return NULL;
    if (T < 0 || N < 0 || K <= 0 || K % QK || K > (1LL << 16))
        return PyErr_Format(PyExc_ValueError, "bad sizes T=%lld N=%lld K=%lld (K a multiple of %d, at most 65536)", T,
                            N, K, QK);
    if (!path_supported(path)) return PyErr_Format(PyExc_ValueError, "kernel path %d is not supported", path);
    if (T == 0 || N == 0) Py_RETURN_NONE;
    const size_t have = i8_scratch_bytes(path, T, K, 0);
    void *scratch = scratch_get(have);
    if (!scratch) return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    matmul_i8_run(path, n_threads, (const float *)(uintptr_t)px, T, K, (const uint8_t *)(uintptr_t)pw, NULL, N,
                  (const float *)(uintptr_t)pd, (float *)(uintptr_t)py, scratch, have);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static void rms_norm_row(const float *x, const float *w, float eps, float *h, int64_t C);

/* head_rows(path, n_threads, x_ptr, B, C, norm_w_ptr, eps, qw_ptr, d_ptr, V, y_ptr, idx_ptr, lse_ptr, top_ptr
 * [, rl_ptr [, rows_ptr]]) (rl_ptr: qw interleaved by 16 rows, rowlane_codes, for the row-lane GEMM; rows_ptr: int64
 * [B], row b is row rows[b] of x, a step's decode rows and its prompts' last positions picked out of the rows the
 * blocks ran; 0 for none): the end of a decode step for B rows of the residual stream x [B, C]: the final RMSNorm
 * (rms_norm_row, the blocks' norm), the int8 output layer y [B, V] (matmul_i8's quantization and kernels), and,
 * where idx_ptr / lse_ptr / top_ptr are not 0, each row's argmax / log-sum-exp / logit at the argmax
 * (argmax_logsumexp's functions, over the pool), in one call that releases the GIL once. On Python's side these were
 * six tensor operations for the norm, the output layer's call and the statistics' call, each taking the GIL back
 * (about 0.3 ms of a 99M batch-16 step).
 * y_ptr 0 (with idx_ptr): the statistics without the logits. A greedy step whose rows want no more than the chosen
 * token's log-probability (the server's usual request) then keeps each piece of the logits in a per-thread buffer
 * that stays in L2, instead of writing 16 x 50304 floats (3.2 MB, plus the reads that allocate their lines) that
 * nothing reads again: the in-process server workload (99m, 16 slots, logprobs 0) 1.016x [1.004-1.028] 8/8. */
/* The end of a step for B rows (no Python: call it with the GIL released): the final RMSNorm, the int8 output layer
 * into y [B, V] (or, with y NULL, a buffer per piece) and, when idx is given, each row's argmax (and logsumexp into
 * lse, the argmax's logit into top, when given). Row b is row rows[b] of x (rows NULL: row b). 0 when scratch memory
 * cannot be allocated. */
static int head_exec(int path, int n_threads, const float *x, const int64_t *rows, int64_t B, int64_t C,
                     const float *w, float eps, const uint8_t *qw, const uint8_t *rl, const float *d, int64_t V,
                     float *y, int64_t *idx, float *lse, float *top) {
    const size_t i8_bytes = round64(i8_scratch_bytes(path, B, C, rl != NULL));
    void *scratch = scratch_get(i8_bytes + sizeof(float) * (size_t)(B * C));
    if (!scratch) return 0;
    float *h = (float *)((char *)scratch + i8_bytes);
    for (int64_t b = 0; b < B; b++) rms_norm_row(x + (rows ? rows[b] : b) * C, w, eps, h + b * C, C);
    if (!idx || (y && B < HEAD_FUSE_ROWS)) {
        matmul_i8_run(path, n_threads, h, B, C, qw, rl, V, d, y, scratch, i8_bytes);
        return !idx || rows_stats(path, n_threads, y, B, V, idx, lse, top, NULL);
    }
    int32_t bounds[2];
    job_t J;
    matmul_i8_prep(path, h, B, C, qw, rl, V, d, y, scratch, i8_bytes, bounds, &J);
    return rows_stats(path, n_threads, y, B, V, idx, lse, top, &J);
}

typedef struct {
    int path, n_threads;
    const float *x;
    const int64_t *rows;
    int64_t B, C, V;
    const float *w, *d;
    float eps;
    const uint8_t *qw, *rl;
    float *y, *lse, *top;
    int64_t *idx;
} head_args_t;

static int head_run(void *arg) {
    const head_args_t *a = (const head_args_t *)arg;
    return head_exec(a->path, a->n_threads, a->x, a->rows, a->B, a->C, a->w, a->eps, a->qw, a->rl, a->d, a->V, a->y,
                     a->idx, a->lse, a->top);
}

/* head_rows (above); deferred while recording (defer.h). */
static PyObject *py_head_rows(PyObject *self, PyObject *args) {
    int path, n_threads;
    unsigned long long px, pn, pw, pd, py, pi, pl, pt, prl = 0, prows = 0;
    long long B, C, V;
    float eps;
    (void)self;
    if (!PyArg_ParseTuple(args, "iiKLLKfKKLKKKK|KK", &path, &n_threads, &px, &B, &C, &pn, &eps, &pw, &pd, &V, &py,
                          &pi, &pl, &pt, &prl, &prows))
        return NULL;
    if (B < 0 || V <= 0 || C <= 0 || C % QK || C > (1LL << 16) || n_threads < 1)
        return PyErr_Format(PyExc_ValueError,
                            "bad head_rows sizes B=%lld C=%lld V=%lld threads=%d (C a multiple of %d)", B, C, V,
                            n_threads, QK);
    if (!path_supported(path)) return PyErr_Format(PyExc_ValueError, "kernel path %d is not supported", path);
    if (!py && !pi) return PyErr_Format(PyExc_ValueError, "head_rows without the logits needs the argmax (idx_ptr)");
    if (B == 0) Py_RETURN_NONE;
    const head_args_t a = {path, n_threads, (const float *)(uintptr_t)px, (const int64_t *)(uintptr_t)prows, B, C, V,
                           (const float *)(uintptr_t)pn, (const float *)(uintptr_t)pd, eps,
                           (const uint8_t *)(uintptr_t)pw, (const uint8_t *)(uintptr_t)prl, (float *)(uintptr_t)py,
                           (float *)(uintptr_t)pl, (float *)(uintptr_t)pt, (int64_t *)(uintptr_t)pi};
    return defer_or_run(head_run, NULL, (void *)&a, sizeof(a));
}

/* ---------------------------------------------------------------- one decoder layer for one token */

/* h = x / sqrt(mean(x^2) + eps) * w, in float32. The sum of squares runs in 16 interleaved partial sums (lane j:
 * elements j, j + 16, ...), added pairwise at the end: independent chains that the compiler vectorizes, where one
 * running sum is a chain of C dependent adds of 4 cycles each (C = 512: about 2000 cycles a row, run on the calling
 * thread while the pool's workers wait, for every row of a batched step). Another order than torch's, like every
 * float sum here: equal to rounding. */
static void rms_norm_row(const float *x, const float *w, float eps, float *h, int64_t C) {
    float part[16] = {0.0f};
    int64_t i = 0;
    for (; i + 16 <= C; i += 16)
        for (int j = 0; j < 16; j++) part[j] += x[i + j] * x[i + j];
    for (; i < C; i++) part[i & 15] += x[i] * x[i];
    for (int n = 8; n > 0; n /= 2)
        for (int j = 0; j < n; j++) part[j] += part[j + n];
    const float r = 1.0f / sqrtf(part[0] / (float)C + eps);
    for (int64_t i = 0; i < C; i++) h[i] = (x[i] * r) * w[i];
}

#ifdef SPECTRA_X86
/* rope_head 16 lanes at a time, the same products and sums (no fused multiply-add): D / 2 a multiple of 16. */
TARGET_AVX512 static void rope_head_avx512(const float *x, const float *cos, const float *sin, float *y, int64_t D) {
    const int64_t half = D / 2;
    for (int64_t i = 0; i < half; i += 16) {
        const __m512 a = _mm512_loadu_ps(x + i), b = _mm512_loadu_ps(x + i + half);
        const __m512 nb = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(b), _mm512_set1_epi32(INT32_MIN)));
        _mm512_storeu_ps(y + i, _mm512_add_ps(_mm512_mul_ps(a, _mm512_loadu_ps(cos + i)),
                                              _mm512_mul_ps(nb, _mm512_loadu_ps(sin + i))));
        _mm512_storeu_ps(y + i + half, _mm512_add_ps(_mm512_mul_ps(b, _mm512_loadu_ps(cos + i + half)),
                                                     _mm512_mul_ps(a, _mm512_loadu_ps(sin + i + half))));
    }
}
#endif

/* Rotary embedding of one head, halves convention (HF's rotate_half): y = x cos + (-x2, x1) sin. */
static void rope_head(int path, const float *x, const float *cos, const float *sin, float *y, int64_t D) {
    const int64_t half = D / 2;
#ifdef SPECTRA_X86
    if (path == PATH_AVX512VNNI && half % 16 == 0) {
        rope_head_avx512(x, cos, sin, y, D);
        return;
    }
#else
    (void)path;
#endif
    for (int64_t i = 0; i < half; i++) {
        const float a = x[i], b = x[i + half];
        y[i] = a * cos[i] + (-b) * sin[i];
        y[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

#ifdef SPECTRA_X86
TARGET_AVX512 static void silu_mul_avx512(float *g, const float *u, int64_t n) {
    const __m512 one = _mm512_set1_ps(1.0f);
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 x = _mm512_loadu_ps(g + i);
        const __m512 e = exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), x));
        _mm512_storeu_ps(g + i, _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(one, e)), _mm512_loadu_ps(u + i)));
    }
    for (; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}
#endif

/* g = silu(g) * u = g / (1 + e^-g) * u. */
static void silu_mul(int path, float *g, const float *u, int64_t n) {
#ifdef SPECTRA_X86
    if (path == PATH_AVX512VNNI) {
        silu_mul_avx512(g, u, n);
        return;
    }
#endif
    for (int64_t i = 0; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* decode_layer_batch(path, n_threads, x_ptr, B, C, H, D, pos_ptr, cos_ptr, sin_ptr, k_ptrs, v_ptrs, layer_off,
 * head_stride, scale, layer): one Llama block (RMSNorm, q|k|v, RoPE, KV-cache writes, attention, o_proj and the
 * residual, RMSNorm, gate|up, SiLU(gate)*up, down_proj and the residual) for B token rows, x [B, C] updated in place.
 * Row b sits at position pos[b] (int64) of its KV cache, whose layer 0 starts at k_ptrs[b] / v_ptrs[b] (uint64
 * addresses); this layer's starts layer_off bytes later; head h's row j at + h * head_stride + j * D elements. cos/sin:
 * the whole (max_len, D) tables. layer = (w_in_ptr, eps_in, w_post_ptr, eps_post, (q, k, v specs), o spec, (gate, up
 * specs), down spec, h_ptr, att_ptr), the matrix specs as in matmul_group with room for B rows in every y (q, k and v
 * in separate [B, H*D] buffers); h [B, C] and att [B, H*D] are scratch. Each weight matrix is read once for all B rows
 * (the GEMM kernels), and every per-row step (norm, RoPE, attention over that row's own positions, SiLU, residual) is
 * a function of that row alone, so each row's result is the same bits whatever else is in the call: a batch-1 decode
 * step is the call with one row. The linear layers are the ternary kernels (bit-identical to the reference); norms,
 * RoPE, attention and SiLU are float32 C and equal torch's to rounding. */
/* One block's matrices and buffers for `decode_layer_batch` / `decode_layers_batch`, parsed from its Python tuple
 * (w_in, eps_in, w_post, eps_post, (q, k, v), o, (gate, up), down, h_buf, att_buf) with the GIL held. */
typedef struct {
    const float *w_in, *w_post;
    float eps_in, eps_post;
    float *hb, *attb;
    job_t jq[3], jo, jg[2], jd;
} batch_layer_t;

static int parse_batch_layer(PyObject *layer, batch_layer_t *L, int64_t B, int64_t C, int64_t A) {
    unsigned long long pw_in, pw_post, ph, patt;
    PyObject *qkv, *o, *gu, *down;
    if (!PyTuple_Check(layer) ||
        !PyArg_ParseTuple(layer, "KfKfO!OO!OKK", &pw_in, &L->eps_in, &pw_post, &L->eps_post, &PyTuple_Type, &qkv, &o,
                          &PyTuple_Type, &gu, &down, &ph, &patt)) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "a layer spec is a tuple");
        return 0;
    }
    if (PyTuple_GET_SIZE(qkv) != 3 || PyTuple_GET_SIZE(gu) != 2) {
        PyErr_SetString(PyExc_ValueError, "a layer spec needs 3 attention inputs and 2 GLU inputs");
        return 0;
    }
    for (int i = 0; i < 3; i++)
        if (!parse_spec(PyTuple_GET_ITEM(qkv, i), &L->jq[i], B, C)) return 0;
    if (!parse_spec(o, &L->jo, B, A)) return 0;
    for (int i = 0; i < 2; i++)
        if (!parse_spec(PyTuple_GET_ITEM(gu, i), &L->jg[i], B, C)) return 0;
    const int64_t G = L->jg[0].N;
    if (G <= 0 || G % QK || L->jg[1].N != G || !parse_spec(down, &L->jd, B, G)) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "gate and up need equal sizes, multiples of 256");
        return 0;
    }
    if (L->jq[0].N != A || L->jq[1].N != A || L->jq[2].N != A || L->jo.N != C || L->jd.N != C) {
        PyErr_Format(PyExc_ValueError, "matrix sizes do not fit C=%lld and H*D=%lld", (long long)C, (long long)A);
        return 0;
    }
    L->w_in = (const float *)(uintptr_t)pw_in, L->w_post = (const float *)(uintptr_t)pw_post;
    L->hb = (float *)(uintptr_t)ph, L->attb = (float *)(uintptr_t)patt;
    return 1;
}

/* The per-row work of a batched block (norms, RoPE and cache writes, SiLU, residuals), by row groups
 * (for_row_groups): on the calling thread while the pool's workers wait, or for a prompt chunk over the pool. */
typedef struct {
    int path;
    const batch_layer_t *L;
    float *xs;
    int64_t C, H, D, A, G, B;
    const int64_t *pos;
    const float *cos0, *sin0;
    const unsigned long long *kp, *vp;
    long long loff, hs;
    int half;
    void **kcs;
} layer_rows_t;

typedef void (*rows_range_fn)(const layer_rows_t *t, int64_t b0, int64_t b1);

typedef struct {
    rows_range_fn fn;
    const layer_rows_t *t;
} rows_range_task_t;

static void rows_range_chunk(void *ctx, int64_t g) {
    const rows_range_task_t *r = (const rows_range_task_t *)ctx;
    const int64_t b0 = LANE_TOK * g, b1 = b0 + LANE_TOK < r->t->B ? b0 + LANE_TOK : r->t->B;
    r->fn(r->t, b0, b1);
}

static void for_rows(int n_threads, const layer_rows_t *t, rows_range_fn fn) {
    const rows_range_task_t r = {fn, t};
    for_row_groups(n_threads, t->B, rows_range_chunk, (void *)&r);
}

static void rows_norm_in(const layer_rows_t *t, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
        kv_prefetch((const char *)(uintptr_t)(t->kp[b] + (unsigned long long)t->loff),
                    (const char *)(uintptr_t)(t->vp[b] + (unsigned long long)t->loff), t->H, t->D, t->hs, t->pos[b],
                    t->half);
        rms_norm_row(t->xs + b * t->C, t->L->w_in, t->L->eps_in, t->L->hb + b * t->C, t->C);
    }
}

static void rows_rope_kv(const layer_rows_t *t, int64_t b0, int64_t b1) {
    const batch_layer_t *L = t->L;
    for (int64_t b = b0; b < b1; b++) {
        const int64_t p = t->pos[b], A = t->A, D = t->D;
        void *kc = t->kcs[b] = (void *)(uintptr_t)(t->kp[b] + (unsigned long long)t->loff);
        void *vc = t->kcs[t->B + b] = (void *)(uintptr_t)(t->vp[b] + (unsigned long long)t->loff);
        rope_kv_row(t->path, L->jq[0].y + b * A, L->jq[1].y + b * A, L->jq[2].y + b * A, L->attb + b * A, kc, vc,
                    t->cos0 + p * D, t->sin0 + p * D, t->H, D, t->hs, p, t->half);
    }
}

static void rows_resid_norm(const layer_rows_t *t, int64_t b0, int64_t b1) {
    const batch_layer_t *L = t->L;
    for (int64_t b = b0; b < b1; b++) {
        float *x = t->xs + b * t->C;
        for (int64_t i = 0; i < t->C; i++) x[i] = x[i] + L->jo.y[b * t->C + i];
        rms_norm_row(x, L->w_post, L->eps_post, L->hb + b * t->C, t->C);
    }
}

static void rows_silu(const layer_rows_t *t, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) silu_mul(t->path, t->L->jg[0].y + b * t->G, t->L->jg[1].y + b * t->G, t->G);
}

static void rows_resid(const layer_rows_t *t, int64_t b0, int64_t b1) {
    for (int64_t i = b0 * t->C; i < b1 * t->C; i++) t->xs[i] = t->xs[i] + t->L->jd.y[i];
}

/* The batched block itself (no Python: call it with the GIL released); 0 when scratch memory cannot be allocated. */
static int batch_layer_run(int path, int n_threads, batch_layer_t *L, float *xs, int64_t B, int64_t C, int64_t H,
                           int64_t D, const int64_t *pos, const float *cos0, const float *sin0,
                           const unsigned long long *kp, const unsigned long long *vp, long long loff, long long hs,
                           float scale, int half) {
    const int64_t A = H * D, G = L->jg[0].N;
    job_t *jq = L->jq, *jg = L->jg;
    /* Every row's k and v go into its cache first, then all rows attend in one job (rows are distinct sequences, or
     * distinct positions of one, each reading only positions up to its own). */
    void **kcs = (void **)malloc(sizeof(void *) * 2 * (size_t)B);
    if (!kcs) return 0;
    const layer_rows_t t = {path, L, xs, C, H, D, A, G, B, pos, cos0, sin0, kp, vp, loff, hs, half, kcs};
    for_rows(n_threads, &t, rows_norm_in);
    int ok = group_run(path, L->hb, B, C, jq, 3, n_threads);
    if (ok) for_rows(n_threads, &t, rows_rope_kv);
    ok = ok && attend_batch_run(path, jq[0].y, kcs, kcs + B, pos, L->attb, B, H, D, hs, scale, n_threads, half);
    free(kcs);
    ok = ok && group_run(path, L->attb, B, A, &L->jo, 1, n_threads);
    if (ok) for_rows(n_threads, &t, rows_resid_norm);
    ok = ok && group_run(path, L->hb, B, C, jg, 2, n_threads);
    if (ok) for_rows(n_threads, &t, rows_silu);
    ok = ok && group_run(path, jg[0].y, B, G, &L->jd, 1, n_threads);
    if (ok) for_rows(n_threads, &t, rows_resid);
    return ok;
}

/* A batched step's rows split over the threads: each of n_threads parts of the rows runs every block on its own thread
 * (batch_layer_run with one thread), instead of each block's GEMMs, attention and per-row steps running across the
 * threads in turn. At a small model's sizes a GEMM's rows cost about as much on two threads as on one (the
 * activations, made on one core, and the outputs, read back on one core by the per-row steps, cross between the
 * cores, and each hand-out ends in a wait), and the per-row steps run on the calling thread alone. Split, each part
 * reads every weight matrix and decodes its panels itself, and nothing crosses between the threads until the output
 * layer. Rows do not depend on one another (Rows), so the results are the same bits.
 * When: each part has at least AMX_MIN_T rows (parts of 4 ran the GEMV kernels, 0.83x; AMX_TM_RL_MIN_T where every
 * GEMM of the block runs token-major from the row-lane copy, amx_min_t) and its GEMMs are ones the
 * split was measured with (split_parts), a block's code bytes are at most SPLIT_MAX_LAYER_BYTES (twice the weight
 * reads: at TriLM-1.1B's 9.6 MB per block the 16-row step ran 0.80x with AMX, 0.94x without), and the parts are
 * within 3.5x of each other in rows. A prompt chunk's rows read each other's keys,
 * so a cache's rows stay in one part (split_parts): a step of decode rows and one prompt chunk splits between them.
 * The 2-core Xeon, TriLM-99M (0.75 MB per block), split against not, alternating in one process: 16 decode rows
 * 1.19x [1.14-1.23] (7/7), 12 rows 1.12x, 10 rows 1.11x; 15 decode rows with a 16 / 32 / 48-token chunk 1.32x /
 * 1.085x / 1.22x, 12 with 32 1.02x, 8 with 32 0.92x (hence the 3.5x). 16 rows of 190M (1.8 MB): 1.04x (4/5); 390M
 * (3.1 MB): 0.98x (0/5). TQ1_0 codes on AMX: 0.886x (each part decodes the base-3 panels again), so not split.
 * With AMX switched off (use_amx: the AVX-512 GEMMs Zen 4 runs, on this Xeon): 99M 16 rows TQ2_0 1.107x (7/7), TQ1_0
 * 1.124x (5/5), 12 rows (parts of 6, the 4 x 4 tiles) 1.024x, hence SPLIT_MIN_VNNI_ROWS; 390M 0.987x, 1.1B 0.943x.
 * Not measured on Zen 4 itself. set_batch_split turns it off (A/B runs and tests). */
#ifndef SPLIT_MAX_LAYER_BYTES
#define SPLIT_MAX_LAYER_BYTES (1 << 20)
#endif
/* The same bound where every matrix of the block comes with its row-lane copy and the parts run the row-lane GEMM
 * (rowlane_kernels.h), which is as fast at a part's 8 rows as at 16. Zen 5, TriLM-190M (1.77 MB a block), 16 rows
 * split against not (benchmarks/kernel_ab.py -D): TQ2_0 with the copies 1.038x (9/9) and 1.100x (9/9) in two runs;
 * TQ1_0 with its copies (of its TQ2_0 code bytes) 1.050x (6/7), without them 0.967x (0/7), hence the condition. */
#ifndef SPLIT_MAX_LAYER_BYTES_ROWLANE
#define SPLIT_MAX_LAYER_BYTES_ROWLANE (2 << 20)
#endif
#ifndef SPLIT_MIN_VNNI_ROWS
#define SPLIT_MIN_VNNI_ROWS 8
#endif
#ifndef SPLIT_MAX_THREADS
#define SPLIT_MAX_THREADS 2 /* measured on 2 cores only: with more, each part reads all weights (n times per step) */
#endif
#define SPLIT_MAX_PARTS 16
static int batch_split_on = 1;

typedef struct {
    int path;
    const batch_layer_t *Ls;
    Py_ssize_t n_layers;
    int all_layers, half;
    float *xs;
    int64_t B, C, H, D;
    int64_t cut[SPLIT_MAX_PARTS + 1]; /* part c: rows [cut[c], cut[c + 1]) */
    const int64_t *pos;
    const float *cos0, *sin0;
    const unsigned long long *kp, *vp;
    long long loff, hs;
    float scale;
    _Atomic int failed;
} split_task_t;

/* A block's seven matrices (q, k, v, o, gate, up, down), as an initializer of job pointers. */
#define LAYER_JOBS(L) {&(L)->jq[0], &(L)->jq[1], &(L)->jq[2], &(L)->jo, &(L)->jg[0], &(L)->jg[1], &(L)->jd}

/* Layer L's jobs and scratch for rows [r0, r0 + n) of its B: each buffer starts r0 rows in. */
static void layer_rows_from(batch_layer_t *L, int64_t r0, int64_t n, int64_t C, int64_t A) {
    job_t *jobs[7] = LAYER_JOBS(L);
    for (int i = 0; i < 7; i++) jobs[i]->y += r0 * jobs[i]->N, jobs[i]->T = n;
    L->hb += r0 * C, L->attb += r0 * A;
}

static void split_chunk(void *ctx, int64_t c) {
    split_task_t *t = (split_task_t *)ctx;
    const int64_t r0 = t->cut[c], r1 = t->cut[c + 1], A = t->H * t->D;
    for (Py_ssize_t i = 0; i < t->n_layers && !atomic_load(&t->failed); i++) {
        batch_layer_t L = t->Ls[i];
        layer_rows_from(&L, r0, r1 - r0, t->C, A);
        if (!batch_layer_run(t->path, 1, &L, t->xs + r0 * t->C, r1 - r0, t->C, t->H, t->D, t->pos + r0, t->cos0,
                             t->sin0, t->kp + r0, t->vp + r0, t->all_layers ? (long long)i * t->loff : t->loff, t->hs,
                             t->scale, t->half))
            atomic_store(&t->failed, 1);
    }
}

/* Where B rows whose caches start at kp[] split into parts for n_threads (cut[0] = 0 .. cut[parts] = B, and the
 * smallest part's rows in *smallest); returns the number of parts, 1 for not split. A cache's rows (a prompt chunk's
 * positions) stay in one part: parts end at the row boundaries nearest to even shares, the first `lead` rows longer,
 * where the cache changes; each needs min_rows rows, and the largest may have at most 3.5 times the smallest's. */
static int64_t split_cuts(int n_threads, int64_t B, const unsigned long long *kp, int64_t *cut, int64_t *smallest,
                          int64_t lead, int64_t min_rows) {
    int64_t parts = B / min_rows < n_threads ? B / min_rows : n_threads;
    if (parts > SPLIT_MAX_PARTS) parts = SPLIT_MAX_PARTS;
    if (parts < 2) return 1;
    for (int64_t i = 1; i < B; i++) /* each cache's rows in one run */
        if (kp[i] != kp[i - 1])
            for (int64_t j = 0; j < i - 1; j++)
                if (kp[j] == kp[i]) return 1;
    cut[0] = 0, cut[parts] = B;
    int64_t least = B, largest = 0;
    for (int64_t c = 1; c <= parts; c++) {
        if (c < parts) {
            const int64_t want = B * c / parts + (c == 1 ? lead : 0);
            int64_t best = -1;
            for (int64_t r = cut[c - 1] + 1; r < B; r++)
                if (kp[r] != kp[r - 1] && (best < 0 || llabs(r - want) < llabs(best - want))) best = r;
            if (best < 0) return 1;
            cut[c] = best;
        }
        if (cut[c] - cut[c - 1] < least) least = cut[c] - cut[c - 1];
        if (cut[c] - cut[c - 1] > largest) largest = cut[c] - cut[c - 1];
    }
    *smallest = least;
    return least < min_rows || 2 * largest > 7 * least ? 1 : parts;
}

#ifndef SPLIT_LEAD_ROWS
#define SPLIT_LEAD_ROWS 1
#endif

/* Rows the first part of a split takes beyond its even share: SPLIT_LEAD_ROWS when the calling thread is defer.h's
 * and no thread waits to help. That thread claims the first part at once, while the engine, which takes the second,
 * is still at its bookkeeping (about 0.4 ms of a 4.7 ms 16-row step of the 99m): with even parts the first waited
 * that long at the job's end. Pipelined, 16 slots (99m, q8, Xeon with AMX), one row against none: in process
 * 1.082x [0.903-1.213] (7/8), 1.031x [0.975-1.188] (7/8), and HEAD's build against this one 1.051x [0.992-1.201]
 * (9/10); a server with 16 clients 1.065x [1.007-1.119] (8/8). Two rows: 1.043x (6/8) in process. */
static int64_t split_lead(void) {
#ifdef SPECTRA_POOL
    return pool_lent && !atomic_load(&pool_helpers) ? SPLIT_LEAD_ROWS : 0;
#else
    return 0;
#endif
}

/* split_cuts for blocks L (batch_layers) when the split is on, every one of at most SPLIT_MAX_THREADS threads gets a
 * part, a block's code bytes are at most SPLIT_MAX_LAYER_BYTES (SPLIT_MAX_LAYER_BYTES_ROWLANE where every part runs
 * the row-lane GEMM) and the kernels that take the smallest part are ones it was measured with: the AMX GEMM on TQ2_0
 * codes, or the AVX-512 GEMMs (no AMX) from SPLIT_MIN_VNNI_ROWS rows; else 1. */
static int64_t split_parts(int path, int n_threads, const batch_layer_t *L, int64_t B, const unsigned long long *kp,
                           int64_t *cut) {
    if (!batch_split_on || n_threads > SPLIT_MAX_THREADS) return 1;
    int64_t smallest, min_rows = 0; /* the fewest rows a part's GEMMs all take on AMX (AMX_MIN_T without it) */
    const job_t *jobs[7] = LAYER_JOBS(L);
    for (int i = 0; i < 7; i++) {
        const int64_t m = amx_min_t(jobs[i]);
        if (m > min_rows) min_rows = m;
    }
    /* The lead row (split_lead) was measured with AMX, whose tiles take any count of rows. Where a part's GEMMs are
     * the AVX-512 ones it would make 16 decode rows parts of 9 and 7: the 7 fell under SPLIT_MIN_VNNI_ROWS, so such a
     * step never split (and the row-lane GEMM runs 8 rows a pass); there the parts are even. */
    for (int64_t lead = split_lead();; lead = 0) {
        int64_t parts = split_cuts(n_threads, B, kp, cut, &smallest, lead, min_rows);
        if (parts < n_threads) { /* a thread without a part would wait */
            if (lead) continue;
            return 1;
        }
        int64_t bytes = 0;
        int rowlane = 1, all_amx = 1; /* every part's GEMMs on the row-lane GEMM / on AMX */
        for (int i = 0; i < 7; i++) {
            job_t part = *jobs[i];
            part.T = smallest;
            const int amx = amx_applies(path, &part);
            all_amx &= amx;
            if (amx ? part.fmt != FMT_TQ2 : path != PATH_AVX512VNNI || smallest < SPLIT_MIN_VNNI_ROWS) {
                parts = 1;
                break;
            }
            bytes += part.N * part.nb * (part.fmt == FMT_TQ1 ? TQ1_CB : QB);
            rowlane &= rowlane_wanted(path, &part);
        }
        if (lead && (parts == 1 || !all_amx)) continue;
        if (parts == 1) return 1;
        return bytes > (rowlane ? SPLIT_MAX_LAYER_BYTES_ROWLANE : SPLIT_MAX_LAYER_BYTES) ? 1 : parts;
    }
}

/* A model's blocks parsed once (`layers_plan`), for decode_layers_batch to take instead of the tuple of every block's
 * tuple: parsing that tuple (8 PyArg_ParseTuple calls a block, 192 for TriLM-1.1B) took 50 us of every decode step
 * on the 2-core Xeon, with the interpreter's memory evicted by the weights the step before had streamed. A call copies
 * the parsed blocks (the jobs' fields are set per call) and sets their token count; the plan holds addresses only,
 * so its owner keeps the tensors alive and builds a new plan when they change (spectra.inference.decode.Rows). */
#define PLAN_CAPSULE "spectra.packed._kernels.layers_plan"
typedef struct {
    Py_ssize_t n;
    int64_t C, A;
    batch_layer_t L[];
} layers_plan_t;

static void plan_free(PyObject *capsule) { free(PyCapsule_GetPointer(capsule, PLAN_CAPSULE)); }

/* layers_plan(layers, C, A) -> capsule: the tuple decode_layers_batch takes, parsed and checked once. */
static PyObject *py_layers_plan(PyObject *self, PyObject *args) {
    PyObject *layers;
    long long C, A;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!LL", &PyTuple_Type, &layers, &C, &A)) return NULL;
    const Py_ssize_t n = PyTuple_GET_SIZE(layers);
    if (n < 1 || C <= 0 || C % QK || A <= 0 || A % QK)
        return PyErr_Format(PyExc_ValueError, "layers_plan: %zd layers, C=%lld, A=%lld (C and A multiples of %d)", n,
                            C, A, QK);
    layers_plan_t *plan = (layers_plan_t *)malloc(sizeof(layers_plan_t) + sizeof(batch_layer_t) * (size_t)n);
    if (!plan) return PyErr_NoMemory();
    plan->n = n, plan->C = C, plan->A = A;
    for (Py_ssize_t i = 0; i < n; i++)
        if (!parse_batch_layer(PyTuple_GET_ITEM(layers, i), &plan->L[i], 1, C, A)) {
            free(plan);
            return NULL;
        }
    PyObject *capsule = PyCapsule_New(plan, PLAN_CAPSULE, plan_free);
    if (!capsule) free(plan);
    return capsule;
}

static void plan_rows(batch_layer_t *L, int64_t B) {
    for (int i = 0; i < 3; i++) L->jq[i].T = B;
    for (int i = 0; i < 2; i++) L->jg[i].T = B;
    L->jo.T = B, L->jd.T = B;
}

/* A call's own copy of a plan's blocks for B rows (malloc'd; NULL when out of memory). */
static batch_layer_t *plan_copy(const layers_plan_t *plan, int64_t B) {
    batch_layer_t *Ls = (batch_layer_t *)malloc(sizeof(batch_layer_t) * (size_t)plan->n);
    if (!Ls) return NULL;
    memcpy(Ls, plan->L, sizeof(batch_layer_t) * (size_t)plan->n);
    for (Py_ssize_t i = 0; i < plan->n; i++) plan_rows(&Ls[i], B);
    return Ls;
}

/* The last-level cache the VM's cores share, in bytes: sysfs's size of cpu0's index 3 (CPUID and sysconf report the
 * host's whole L3: 384 MiB on the 2-core EPYC VM of family 1Ah, whose cores share 32 MiB), else 32 MiB. */
static long long llc_bytes(void) {
    static long long bytes = -1;
    if (bytes < 0) {
        long long kb = 0;
        FILE *f = fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r");
        if (f) {
            if (fscanf(f, "%lld", &kb) != 1) kb = 0;
            fclose(f);
        }
        bytes = kb > 0 ? kb << 10 : 32LL << 20;
    }
    return bytes;
}

/* far_pairs_mode -1: the TQ2_0 jobs of a one-row step over every block read far pairs when the CPU is one they were
 * measured on and the blocks' code bytes exceed the last-level cache (gemv1_far_pf_step). Jobs come parsed with far
 * = 0 (parse_spec), so only the switch to far pairs is written. */
static void set_far(batch_layer_t *Ls, Py_ssize_t n_layers) {
    if (far_pairs_mode >= 0 || !gemv1_far_auto) return; /* mode 1 is taken at the GEMV's dispatch (gemv_avx512) */
    long long bytes = 0;
    for (Py_ssize_t i = 0; i < n_layers; i++) {
        job_t *jobs[7] = LAYER_JOBS(&Ls[i]);
        for (int j = 0; j < 7; j++) bytes += jobs[j]->N * jobs[j]->nb * (jobs[j]->fmt == FMT_TQ1 ? TQ1_CB : QB);
    }
    if (bytes <= llc_bytes()) return;
    for (Py_ssize_t i = 0; i < n_layers; i++) {
        job_t *jobs[7] = LAYER_JOBS(&Ls[i]);
        for (int j = 0; j < 7; j++) jobs[j]->far = jobs[j]->fmt == FMT_TQ2;
    }
}

/* Every block on B rows (no Python: call it with the GIL released): split over the threads by rows where
 * split_parts says so, else block after block. all_layers: layer i's caches at i * loff (else loff itself). 0 when
 * scratch memory cannot be allocated. */
static int layers_exec(int path, int n_threads, batch_layer_t *Ls, Py_ssize_t n_layers, int all_layers, int half,
                       float *xs, int64_t B, int64_t C, int64_t H, int64_t D, const int64_t *pos, const float *cos0,
                       const float *sin0, const unsigned long long *kp, const unsigned long long *vp, long long loff,
                       long long hs, float scale) {
    split_task_t task = {path, Ls, n_layers, all_layers, half, xs, B, C, H, D, {0}, pos, cos0, sin0, kp, vp,
                         loff, hs, scale, 0};
    if (B == 1 && all_layers) set_far(Ls, n_layers); /* one block alone does not tell the model's size */
    const int64_t parts = split_parts(path, n_threads, Ls, B, kp, task.cut);
    if (parts > 1) {
        for_chunks(n_threads, parts, split_chunk, (void *)&task);
        return !atomic_load(&task.failed);
    }
    int ok = 1;
    for (Py_ssize_t i = 0; ok && i < n_layers; i++)
        ok = batch_layer_run(path, n_threads, &Ls[i], xs, B, C, H, D, pos, cos0, sin0, kp, vp,
                             all_layers ? (long long)i * loff : loff, hs, scale, half);
    return ok;
}

typedef struct {
    int path, n_threads;
    batch_layer_t *Ls; /* owned */
    Py_ssize_t n_layers;
    int all_layers, half;
    float *xs;
    int64_t B, C, H, D;
    const int64_t *pos;
    const float *cos0, *sin0;
    const unsigned long long *kp, *vp;
    long long loff, hs;
    float scale;
} layers_args_t;

static int layers_run(void *arg) {
    const layers_args_t *a = (const layers_args_t *)arg;
    return layers_exec(a->path, a->n_threads, a->Ls, a->n_layers, a->all_layers, a->half, a->xs, a->B, a->C, a->H,
                       a->D, a->pos, a->cos0, a->sin0, a->kp, a->vp, a->loff, a->hs, a->scale);
}

static void layers_free(void *arg) { free(((layers_args_t *)arg)->Ls); }

/* decode_layer(s)_batch; deferred while recording (defer.h). */
static PyObject *batch_layers(PyObject *args, int all_layers) {
    int path, n_threads;
    unsigned long long px, ppos, pcos, psin, pks, pvs;
    long long B, C, H, D, loff, hs;
    float scale;
    PyObject *layers;
    int half = 0;
    if (!PyArg_ParseTuple(args, "iiKLLLLKKKKKLLfO|i", &path, &n_threads, &px, &B, &C, &H, &D, &ppos, &pcos, &psin,
                          &pks, &pvs, &loff, &hs, &scale, &layers, &half))
        return NULL;
    if (!kv_kind_ok(half)) return NULL;
    const layers_plan_t *plan = NULL;
    if (all_layers && PyCapsule_IsValid(layers, PLAN_CAPSULE)) {
        plan = (const layers_plan_t *)PyCapsule_GetPointer(layers, PLAN_CAPSULE);
        if (plan->C != C || plan->A != H * D)
            return PyErr_Format(PyExc_ValueError, "a layers plan for C=%lld, H*D=%lld called with C=%lld, H*D=%lld",
                                (long long)plan->C, (long long)plan->A, C, H * D);
    } else if (!PyTuple_Check(layers)) {
        return PyErr_Format(PyExc_TypeError, "layers must be a tuple%s, not %s",
                            all_layers ? " or a layers_plan capsule" : "", Py_TYPE(layers)->tp_name);
    }
    const long long A = H * D;
    if (B <= 0 || C <= 0 || C % QK || H <= 0 || D <= 0 || D % 2 || D > 256 || A % QK || loff < 0)
        return PyErr_Format(PyExc_ValueError, "bad decode_layer_batch sizes B=%lld C=%lld H=%lld D=%lld", B, C, H, D);
    if (n_threads < 1) return PyErr_Format(PyExc_ValueError, "n_threads must be >= 1, got %d", n_threads);
    if (!path_supported(path)) return PyErr_Format(PyExc_ValueError, "kernel path %d is not supported", path);
    const int64_t *pos = (const int64_t *)(uintptr_t)ppos;
    for (long long b = 0; b < B; b++)
        if (pos[b] < 0 || hs < (pos[b] + 1) * kv_row_len(half, D))
            return PyErr_Format(PyExc_ValueError, "row %lld: position %lld outside its cache", b, (long long)pos[b]);
    /* decode_layer_batch: `layers` is one layer's tuple and loff its byte offset in the caches; decode_layers_batch:
     * a tuple of every layer's, and loff the bytes between two layers' caches (layer i at i * loff). */
    const Py_ssize_t n_layers = plan ? plan->n : all_layers ? PyTuple_GET_SIZE(layers) : 1;
    if (n_layers < 1) return PyErr_Format(PyExc_ValueError, "no layers given");
    batch_layer_t *Ls = plan ? plan_copy(plan, B) : (batch_layer_t *)malloc(sizeof(batch_layer_t) * (size_t)n_layers);
    if (!Ls) return PyErr_NoMemory();
    if (!plan) {
        for (Py_ssize_t i = 0; i < n_layers; i++)
            if (!parse_batch_layer(all_layers ? PyTuple_GET_ITEM(layers, i) : layers, &Ls[i], B, C, A)) {
                free(Ls);
                return NULL;
            }
    }
    float *xs = (float *)(uintptr_t)px;
    const float *cos0 = (const float *)(uintptr_t)pcos, *sin0 = (const float *)(uintptr_t)psin;
    const unsigned long long *kp = (const unsigned long long *)(uintptr_t)pks;
    const unsigned long long *vp = (const unsigned long long *)(uintptr_t)pvs;
    const layers_args_t a = {path, n_threads, Ls, n_layers, all_layers, half, xs, B, C, H, D, pos, cos0, sin0, kp, vp,
                             loff, hs, scale};
    return defer_or_run(layers_run, layers_free, (void *)&a, sizeof(a)); /* (Ls freed: run now or recorded) */
}

static PyObject *py_decode_layer_batch(PyObject *self, PyObject *args) {
    (void)self;
    return batch_layers(args, 0);
}

/* decode_layers_batch: decode_layer_batch for every block in one call, the GIL released once for the whole stack (a
 * server's HTTP loop runs meanwhile instead of taking the GIL between two blocks and holding up the next one). */
static PyObject *py_decode_layers_batch(PyObject *self, PyObject *args) {
    (void)self;
    return batch_layers(args, 1);
}

#ifdef SPECTRA_X86
static int f16c_on = 0; /* the CPU converts float16 (F16C: every AVX2 CPU); set once at import */

/* n float16 values widened to float32 by vcvtph2ps, 8 at a time: exact, as half_to_float. A batched step's 16
 * embedding rows of 512 took 44 us through half_to_float's branches (with the GIL held), 23 us this way (most of it
 * the rows' trips to DRAM). */
__attribute__((target("avx,f16c"))) static void halves_widen_f16c(const uint16_t *e, int64_t n, float *x) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(e + i))));
    for (; i < n; i++) x[i] = half_to_float(e[i]);
}
#endif

/* Row `token` of an embedding table [rows, C] of float32 (kind 0), float16 (1) or bfloat16 (2), widened exactly to
 * float32 in x. */
static void embed_row(const void *emb, int kind, int64_t token, int64_t C, float *x) {
    if (kind == 0) {
        memcpy(x, (const float *)emb + token * C, sizeof(float) * (size_t)C);
        return;
    }
    const uint16_t *e = (const uint16_t *)emb + token * C;
    if (kind == 1) {
#ifdef SPECTRA_X86
        if (f16c_on) {
            halves_widen_f16c(e, C, x);
            return;
        }
#endif
        for (int64_t i = 0; i < C; i++) x[i] = half_to_float(e[i]);
        return;
    }
    for (int64_t i = 0; i < C; i++) {
        const uint32_t bits = (uint32_t)e[i] << 16;
        memcpy(&x[i], &bits, 4);
    }
}

typedef struct {
    const void *emb;
    int kind;
    int64_t n_emb, C, B;
    const int64_t *ids;
    float *x;
} embed_args_t;

static int embed_run(void *arg) {
    const embed_args_t *a = (const embed_args_t *)arg;
    for (int64_t b = 0; b < a->B; b++)
        if (a->ids[b] < 0 || a->ids[b] >= a->n_emb) return -1;
    for (int64_t b = 0; b < a->B; b++) embed_row(a->emb, a->kind, a->ids[b], a->C, a->x + b * a->C);
    return 1;
}

/* embed_rows(emb_ptr, emb_kind, emb_rows, C, ids_ptr, B, x_ptr): x[b] = row ids[b] of the embedding (embed_row), for
 * a batched step's rows: one call where `torch.index_select` (and a float16 table's widening copy) cost 2 torch ops
 * a step, each run with its code evicted by the step's weight stream. Deferred while recording (defer.h), its ids
 * then checked when it runs (take_tokens may write them first). */
static PyObject *py_embed_rows(PyObject *self, PyObject *args) {
    unsigned long long pe, pi, px;
    int kind;
    long long n_emb, C, B;
    (void)self;
    if (!PyArg_ParseTuple(args, "KiLLKLK", &pe, &kind, &n_emb, &C, &pi, &B, &px)) return NULL;
    if (kind < 0 || kind > 2 || C <= 0 || B < 0)
        return PyErr_Format(PyExc_ValueError, "embed_rows: kind %d (0 float32, 1 float16, 2 bfloat16), C=%lld, B=%lld",
                            kind, C, B);
    const int64_t *ids = (const int64_t *)(uintptr_t)pi;
    const embed_args_t a = {(const void *)(uintptr_t)pe, kind, n_emb, C, B, ids, (float *)(uintptr_t)px};
    if (defer_rec) {
        if (!defer_add(embed_run, NULL, &a, sizeof(a))) return NULL;
        Py_RETURN_NONE;
    }
    for (long long b = 0; b < B; b++) /* (checked here to name the id; embed_run's own check then passes) */
        if (ids[b] < 0 || ids[b] >= n_emb)
            return PyErr_Format(PyExc_ValueError, "token id %lld is outside the embedding's %lld rows",
                                (long long)ids[b], n_emb);
    embed_run((void *)&a);
    Py_RETURN_NONE;
}

/* decode_token(path, n_threads, token, emb_ptr, emb_kind, emb_rows, x_ptr, C, H, D, pos_ptr, cos_ptr, sin_ptr,
 * k_ptrs, v_ptrs, layer_bytes, head_stride, scale, plan, half, norm_ptr, eps, head_ptr, head_scale_ptr, V, y_ptr)
 * -> int: one greedy decode step of one sequence in one call with the GIL released once: the token's embedding row
 * into x (emb_kind 0 float32, 1 float16, 2 bfloat16: widened exactly), every block (decode_layers_batch's row, from a
 * layers_plan), the final norm and the int8 output layer into y (head_rows), and y's argmax (argmax's rule). The
 * same bits as those calls one after the other. Between two such calls the interpreter runs only the caller's loop:
 * on the 2-core Xeon the torch ops of a step (the embedding lookup, the logits' allocation, the greedy pick) cost
 * 0.4-0.5 ms of every TriLM-1.1B token on 2 threads, each finding its code and data evicted by the weights the step
 * before had streamed. Optional trailing (temperature, top_k, top_p, u), temperature > 0: the token is `sample`'s
 * draw from y instead of its argmax, in the same call (the logits still in cache). */
static PyObject *py_decode_token(PyObject *self, PyObject *args) {
    int path, n_threads, emb_kind, half;
    unsigned long long pe, px, ppos, pcos, psin, pks, pvs, pn, pw, pd, py;
    long long token, n_emb, C, H, D, loff, hs, V, top_k = 0;
    float scale, eps;
    double temperature = 0.0, top_p = 1.0, u = 0.0;
    PyObject *capsule;
    (void)self;
    if (!PyArg_ParseTuple(args, "iiLKiLKLLLKKKKKLLfOiKfKKLK|dLdd", &path, &n_threads, &token, &pe, &emb_kind, &n_emb,
                          &px, &C, &H, &D, &ppos, &pcos, &psin, &pks, &pvs, &loff, &hs, &scale, &capsule, &half, &pn,
                          &eps, &pw, &pd, &V, &py, &temperature, &top_k, &top_p, &u))
        return NULL;
    if (temperature < 0 || !sample_params_ok(top_k, top_p, u))
        return PyErr_Format(PyExc_ValueError, "bad decode_token sampling temperature=%g top_k=%lld top_p=%g u=%g",
                            temperature, top_k, top_p, u);
    if (!PyCapsule_IsValid(capsule, PLAN_CAPSULE))
        return PyErr_Format(PyExc_TypeError, "decode_token takes a layers_plan capsule, not %s",
                            Py_TYPE(capsule)->tp_name);
    const layers_plan_t *plan = (const layers_plan_t *)PyCapsule_GetPointer(capsule, PLAN_CAPSULE);
    if (C <= 0 || H <= 0 || D <= 0 || D % 2 || D > 256 || plan->C != C || plan->A != H * D || C > (1LL << 16) ||
        V <= 0 || n_threads < 1 || loff < 0)
        return PyErr_Format(PyExc_ValueError, "bad decode_token sizes C=%lld H=%lld D=%lld V=%lld threads=%d for a "
                            "plan of C=%lld, H*D=%lld", C, H, D, V, n_threads, (long long)plan->C, (long long)plan->A);
    if (token < 0 || token >= n_emb)
        return PyErr_Format(PyExc_ValueError, "token id %lld is outside the embedding's %lld rows", token, n_emb);
    if (emb_kind < 0 || emb_kind > 2)
        return PyErr_Format(PyExc_ValueError, "embedding kind %d (0 float32, 1 float16, 2 bfloat16)", emb_kind);
    if (!path_supported(path)) return PyErr_Format(PyExc_ValueError, "kernel path %d is not supported", path);
    const int64_t *pos = (const int64_t *)(uintptr_t)ppos;
    if (!kv_kind_ok(half)) return NULL;
    if (pos[0] < 0 || hs < (pos[0] + 1) * kv_row_len(half, D))
        return PyErr_Format(PyExc_ValueError, "position %lld outside its cache", (long long)pos[0]);
    float *sbuf = temperature > 0 ? sample_buffer(V) : NULL;
    if (temperature > 0 && !sbuf) return PyErr_NoMemory();
    batch_layer_t *Ls = plan_copy(plan, 1);
    if (!Ls) return PyErr_NoMemory();
    float *x = (float *)(uintptr_t)px, *y = (float *)(uintptr_t)py;
    const float *cos0 = (const float *)(uintptr_t)pcos, *sin0 = (const float *)(uintptr_t)psin;
    const unsigned long long *kp = (const unsigned long long *)(uintptr_t)pks;
    const unsigned long long *vp = (const unsigned long long *)(uintptr_t)pvs;
    int ok;
    int64_t best = 0;
    Py_BEGIN_ALLOW_THREADS
    embed_row((const void *)(uintptr_t)pe, emb_kind, token, C, x);
    ok = layers_exec(path, n_threads, Ls, plan->n, 1, half, x, 1, C, H, D, pos, cos0, sin0, kp, vp, loff, hs, scale) &&
         head_exec(path, n_threads, x, NULL, 1, C, (const float *)(uintptr_t)pn, eps, (const uint8_t *)(uintptr_t)pw,
                   NULL, (const float *)(uintptr_t)pd, V, y, &best, NULL, NULL);
    if (ok && sbuf) best = sample_row(path, y, V, (float)temperature, top_k < V ? top_k : 0, top_p, u, sbuf);
    Py_END_ALLOW_THREADS
    free(Ls);
    if (!ok) return PyErr_NoMemory();
    return PyLong_FromLongLong((long long)best);
}

/* quantize(path, x_ptr, T, K, bounds_ptr, S, q_ptr, bsum_ptr, scale_ptr): the int8 activations the kernels use. */
static PyObject *py_quantize(PyObject *self, PyObject *args) {
    int path;
    unsigned long long px, pb, pq, ps, pscale;
    long long T, K, S;
    job_t J;
    (void)self;
    if (!PyArg_ParseTuple(args, "iKLLKLKKK", &path, &px, &T, &K, &pb, &S, &pq, &ps, &pscale)) return NULL;
    if (T < 0 || K <= 0 || K % QK || S <= 0) return PyErr_Format(PyExc_ValueError, "bad sizes T=%lld K=%lld", T, K);
    if (!path_supported(path)) return PyErr_Format(PyExc_ValueError, "kernel path %d is not supported", path);
    memset(&J, 0, sizeof(J));
    J.T = T, J.K = K, J.S = S, J.nb = K / QK;
    J.bounds = (const int32_t *)(uintptr_t)pb;
    quantize_rows(path, (const float *)(uintptr_t)px, &J, (int8_t *)(uintptr_t)pq, (int32_t *)(uintptr_t)ps,
                  (float *)(uintptr_t)pscale);
    Py_RETURN_NONE;
}

/* stream_read(path, n_threads, ptr, nbytes, streams, prefetch) -> (bytes read, fold): read the first bytes of
 * [ptr, ptr + nbytes), the largest multiple of 256 * streams * n_threads of them, once: one part per thread of the
 * pool, each part as `streams` (1..8) sequential streams side by side, with software prefetch `prefetch` bytes ahead
 * of each (0: none, the hardware prefetchers alone); `fold` is the OR of the 64-bit words read folded to 32 bits (so
 * no read can be dropped). benchmarks/peers.py times it as the DRAM read rate that bounds a
 * decode: numpy's and torch's reductions read one stream per thread without prefetch, and on the 2-core Xeon they
 * measured 10-15 % below the best of these settings over the same 1 GiB, so a GEMV that prefetches could read faster
 * than their "bound". */
typedef struct {
    const uint8_t *p;
    int64_t part, streams, prefetch;
    uint64_t *out; /* one word per part */
    int simd;
} stream_read_t;

#ifdef SPECTRA_X86
TARGET_AVX512 static uint64_t stream_read_avx512(const uint8_t *base, int64_t sub, int64_t S, int64_t pf) {
    __m512i acc[8];
    for (int s = 0; s < 8; s++) acc[s] = _mm512_setzero_si512();
    for (int64_t i = 0; i + 256 <= sub; i += 256)
        for (int64_t s = 0; s < S; s++) {
            const uint8_t *q = base + s * sub + i;
            if (pf)
                for (int j = 0; j < 256; j += 64) _mm_prefetch((const char *)q + pf + j, _MM_HINT_T0);
            const __m512i a = _mm512_or_si512(_mm512_loadu_si512(q), _mm512_loadu_si512(q + 64));
            const __m512i b = _mm512_or_si512(_mm512_loadu_si512(q + 128), _mm512_loadu_si512(q + 192));
            acc[s] = _mm512_or_si512(acc[s], _mm512_or_si512(a, b));
        }
    __m512i a = acc[0];
    for (int s = 1; s < 8; s++) a = _mm512_or_si512(a, acc[s]);
    return (uint64_t)_mm512_reduce_or_epi64(a);
}
#endif

static void stream_read_chunk(void *ctx, int64_t c) {
    const stream_read_t *t = (const stream_read_t *)ctx;
    const uint8_t *base = t->p + c * t->part;
    const int64_t sub = t->part / t->streams; /* bytes per stream, a multiple of 256 */
    uint64_t v = 0;
#ifdef SPECTRA_X86
    if (t->simd) {
        t->out[c] = stream_read_avx512(base, sub, t->streams, t->prefetch);
        return;
    }
#endif
    for (int64_t i = 0; i + 8 <= t->streams * sub; i += 8) {
        uint64_t w;
        memcpy(&w, base + i, 8);
        v |= w;
    }
    t->out[c] = v;
}

static PyObject *py_stream_read(PyObject *self, PyObject *args) {
    int path, n_threads;
    unsigned long long p;
    long long n, streams, prefetch;
    (void)self;
    if (!PyArg_ParseTuple(args, "iiKLLL", &path, &n_threads, &p, &n, &streams, &prefetch)) return NULL;
    if (n_threads < 1 || n < 0 || streams < 1 || streams > 8 || prefetch < 0)
        return PyErr_Format(PyExc_ValueError, "bad stream_read arguments: threads %d, bytes %lld, streams %lld, "
                            "prefetch %lld (threads >= 1, streams 1..8, prefetch >= 0)", n_threads, n, streams,
                            prefetch);
    if (!path_supported(path)) return PyErr_Format(PyExc_ValueError, "kernel path %d is not supported", path);
    const int64_t unit = 256 * streams * n_threads;
    uint64_t *out = (uint64_t *)calloc((size_t)n_threads, sizeof(uint64_t));
    if (!out) return PyErr_NoMemory();
    const stream_read_t task = {(const uint8_t *)(uintptr_t)p, n / unit * 256 * streams, streams, prefetch, out,
                                path == PATH_AVX512VNNI};
    Py_BEGIN_ALLOW_THREADS
    if (task.part > 0) for_chunks(n_threads, n_threads, stream_read_chunk, (void *)&task);
    Py_END_ALLOW_THREADS
    uint64_t v = 0;
    for (int i = 0; i < n_threads; i++) v |= out[i];
    free(out);
    return Py_BuildValue("Lk", (long long)(n_threads * task.part), (unsigned long)(uint32_t)(v ^ (v >> 32)));
}

/* core_round_trip(iters) -> float: nanoseconds per round trip of one cache line between the calling thread and a
 * second thread, each spinning until the other has written it (the mean over `iters` round trips), or -1.0 where it
 * cannot run (no pthreads, or the second thread was not running within a second: a busy machine). On a 2-core VM it
 * tells where the two cores sit: on the Zen 5 host of 2026-12-06 about 90 ns when they share a CCD (the 2-thread read
 * probe then reads ~46-50 GB/s) and 380-450 ns when they do not (~76-82 GB/s: each core has its own CCD's link to
 * memory), and the host moves them between the two within seconds. `benchmarks/peers.py` records it around every
 * round. */
#ifdef SPECTRA_POOL
typedef struct {
    _Alignas(64) _Atomic int64_t flag;
    _Alignas(64) int64_t iters;
    unsigned long mask[16]; /* the echo thread's CPU (a sched_setaffinity mask) */
} round_trip_t;

static void *round_trip_echo(void *arg) {
    round_trip_t *r = (round_trip_t *)arg;
    syscall(SYS_sched_setaffinity, 0, sizeof r->mask, r->mask);
    for (int64_t i = 0; i < r->iters; i++) {
        int64_t v;
        while ((v = atomic_load_explicit(&r->flag, memory_order_acquire)) != 2 * i + 1)
            if (v < 0) return NULL;
        /* a compare-exchange, not a store: the caller may have given up (-1) since the load, and a plain store would
         * overwrite that and spin here for ever while the caller waits in pthread_join */
        int64_t expect = 2 * i + 1;
        if (!atomic_compare_exchange_strong_explicit(&r->flag, &expect, 2 * i + 2, memory_order_acq_rel,
                                                     memory_order_acquire))
            return NULL;
    }
    return NULL;
}

/* The calling thread on the first CPU it may run on, the echo thread on the second (when there is one: else both
 * are left where the OS puts them); the caller's CPUs are restored after. */
static double round_trip_run(int64_t iters) {
    round_trip_t r; /* on this thread's stack: the echo thread is joined before it returns */
    unsigned long allowed[16] = {0}, mine[16] = {0};
    const int bits = (int)(8 * sizeof(unsigned long));
    const int known = syscall(SYS_sched_getaffinity, 0, sizeof allowed, allowed) > 0;
    int cpus[2] = {-1, -1}, n = 0;
    for (int c = 0; known && c < 16 * bits && n < 2; c++)
        if (allowed[c / bits] >> (c % bits) & 1UL) cpus[n++] = c;
    memset(r.mask, 0, sizeof r.mask);
    if (n == 2) {
        mine[cpus[0] / bits] = 1UL << (cpus[0] % bits);
        r.mask[cpus[1] / bits] = 1UL << (cpus[1] % bits);
        syscall(SYS_sched_setaffinity, 0, sizeof mine, mine);
    } else {
        memcpy(r.mask, allowed, sizeof r.mask);
    }
    atomic_store(&r.flag, 0);
    r.iters = iters;
    pthread_t t;
    if (pthread_create(&t, NULL, round_trip_echo, &r) != 0) {
        if (n == 2) syscall(SYS_sched_setaffinity, 0, sizeof allowed, allowed);
        return -1.0;
    }
    const int64_t start = pool_now_ns();
    int ok = 1;
    for (int64_t i = 0; i < iters && ok; i++) {
        atomic_store_explicit(&r.flag, 2 * i + 1, memory_order_release);
        for (unsigned polls = 0; atomic_load_explicit(&r.flag, memory_order_acquire) != 2 * i + 2;)
            if (++polls % 4096 == 0 && pool_now_ns() - start > 1000000000) {
                ok = 0;
                break;
            }
    }
    const int64_t end = pool_now_ns();
    atomic_store(&r.flag, -1);
    pthread_join(t, NULL);
    if (n == 2) syscall(SYS_sched_setaffinity, 0, sizeof allowed, allowed);
    return ok ? (double)(end - start) / (double)iters : -1.0;
}
#endif

static PyObject *py_core_round_trip(PyObject *self, PyObject *args) {
    long long iters;
    (void)self;
    if (!PyArg_ParseTuple(args, "L", &iters)) return NULL;
    if (iters < 1 || iters > 100000000)
        return PyErr_Format(PyExc_ValueError, "core_round_trip: iters %lld (1..1e8)", iters);
    double ns = -1.0;
#ifdef SPECTRA_POOL
    Py_BEGIN_ALLOW_THREADS
    ns = round_trip_run((int64_t)iters);
    Py_END_ALLOW_THREADS
#endif
    return PyFloat_FromDouble(ns);
}

/* huge_pages(ptr, nbytes) -> int: back the memory [ptr, ptr + nbytes) with 2 MiB pages where Linux allows it, in place
 * (same addresses, same contents). Streaming a 4 MiB matrix from DRAM on 4 KiB pages costs one TLB miss per 4 KiB
 * and the hardware prefetchers stop at every 4 KiB boundary: here a plain read of 4 MiB takes 0.21-0.24 ms on 4 KiB
 * pages and 0.15-0.17 ms on 2 MiB pages, and the GEMV follows the read. The range is widened to whole 2 MiB pages
 * (their other bytes only change physical backing, never contents). MADV_HUGEPAGE marks it for transparent huge
 * pages; MADV_COLLAPSE (Linux 6.1+) then moves the pages already there into huge pages now, one 2 MiB page at a time
 * so that a page that cannot be collapsed (at the edge of a mapping) does not stop the others. Returns how many bytes
 * were collapsed (0 where not supported; the advice still applies to pages faulted in later). */
static PyObject *py_huge_pages(PyObject *self, PyObject *args) {
    unsigned long long p;
    long long n;
    (void)self;
    if (!PyArg_ParseTuple(args, "KL", &p, &n)) return NULL;
    if (n < 0) return PyErr_Format(PyExc_ValueError, "bad size %lld", n);
    long long done = 0;
#ifdef __linux__
    const uintptr_t H = (uintptr_t)2 << 20;
    const uintptr_t lo = (uintptr_t)p & ~(H - 1), hi = ((uintptr_t)p + (uintptr_t)n + H - 1) & ~(H - 1);
    if (n > 0) {
        Py_BEGIN_ALLOW_THREADS
        if (madvise((void *)lo, hi - lo, MADV_HUGEPAGE) == 0 || errno == ENOMEM) /* ENOMEM: a hole; the rest is done */
            for (uintptr_t a = lo; a < hi; a += H)
                if (madvise((void *)a, H, MADV_COLLAPSE) == 0) done += (long long)H;
        Py_END_ALLOW_THREADS
    }
#else
    (void)p;
#endif
    return PyLong_FromLongLong(done);
}

/* *setting = min_tokens from args (>= 0; 0 switches the `kernel` GEMM off); returns the previous value. */
static PyObject *set_min_tokens(PyObject *args, int *setting, const char *kernel) {
    int min_t;
    if (!PyArg_ParseTuple(args, "i", &min_t)) return NULL;
    if (min_t < 0) return PyErr_Format(PyExc_ValueError, "min_tokens must be >= 0 (0 switches the %s GEMM off)", kernel);
    const int before = *setting;
    *setting = min_t;
    return PyLong_FromLong(before);
}

/* set_prefetch(gemv_step, i8_bytes, i8_every_line[, gemv_copies[, tq1_step[, gemv_fixed]]]) -> (previous six): the
 * GEMV prefetch settings that prefetch_tune chose for this CPU (gemv_step and gemv_copies: the one-token TQ2_0 GEMV
 * prefetches every line gemv_copies times, at 1 .. gemv_copies x gemv_step bytes ahead; i8_bytes and i8_every_line:
 * the int8 output layer's distance, and one prefetch per line or per 4 lines; tq1_step: the TQ1_0 GEMV's three
 * prefetches at 1, 2, 3 x tq1_step; gemv_fixed: with three copies, the loop with them fixed at compile time,
 * gemv1_pf3_avx512). For A/B runs and tuning on other CPUs; set it while no kernel runs. */
static PyObject *py_set_prefetch(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *names[] = {"gemv_step", "i8_bytes", "i8_every_line", "gemv_copies", "tq1_step", "gemv_fixed", NULL};
    long long step, i8_bytes, t1_step = tq1_pf_step;
    int every, copies = gemv1_pf_copies, fixed = gemv1_pf_fixed;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "LLp|iLp", names, &step, &i8_bytes, &every, &copies, &t1_step,
                                     &fixed))
        return NULL;
    if (step < 0 || step > (1 << 20) || i8_bytes < 0 || i8_bytes > (1 << 20) || t1_step < 0 || t1_step > (1 << 20))
        return PyErr_Format(PyExc_ValueError, "prefetch distances must be 0 .. 1048576 bytes, got %lld, %lld and %lld",
                            step, i8_bytes, t1_step);
    if (copies < 1 || copies > 3) return PyErr_Format(PyExc_ValueError, "gemv_copies must be 1, 2 or 3, got %d", copies);
    PyObject *before = Py_BuildValue("LLOiLO", (long long)gemv1_pf_step, (long long)i8_pf_bytes,
                                     i8_pf_every_line ? Py_True : Py_False, gemv1_pf_copies, (long long)tq1_pf_step,
                                     gemv1_pf_fixed ? Py_True : Py_False);
    gemv1_pf_step = step, i8_pf_bytes = i8_bytes, i8_pf_every_line = every, gemv1_pf_copies = copies;
    tq1_pf_step = t1_step, gemv1_pf_fixed = fixed;
    return before;
}

/* set_lane(min_tokens) -> int: products of at least min_tokens tokens (0: none) use the token-lane GEMM
 * (lane_kernels.h) where AMX does not take them; returns the previous setting. For A/B runs and tests. */
static PyObject *py_set_lane(PyObject *self, PyObject *args) {
    (void)self;
    return set_min_tokens(args, &lane_min_t, "lane");
}

/* set_quad(min_tokens) -> int: products of at least min_tokens tokens (0: none) use the quad GEMM (quad_kernels.h):
 * TQ2_0 up to where the lanes take over (lane_from), int8 at any count; returns the previous value. For A/B runs and
 * tests. */
static PyObject *py_set_quad(PyObject *self, PyObject *args) {
    (void)self;
    return set_min_tokens(args, &quad_min_t, "quad");
}

/* set_amx_tm(min_tokens) -> int: TQ2_0 products of at least min_tokens tokens (0: none) that AMX takes run the
 * token-major GEMM (amx_kernels.h); returns the previous value. For A/B runs and tests. */
static PyObject *py_set_amx_tm(PyObject *self, PyObject *args) {
    (void)self;
    return set_min_tokens(args, &amx_tm_min_t, "amx_tm");
}

/* set_rowlane(min_tokens) -> int: products of at least min_tokens tokens (0: none) whose codes come with their 16-row
 * interleaved copy use the row-lane GEMM (rowlane_kernels.h) where AMX does not take them; returns the previous value.
 * For A/B runs and tests. */
static PyObject *py_set_rowlane(PyObject *self, PyObject *args) {
    (void)self;
    return set_min_tokens(args, &rowlane_min_t, "row-lane");
}

/* set_amx(on) -> bool: use the AMX GEMM where the CPU has it (the default) or not (for A/B runs and tests of the
 * AVX-512 GEMM on AMX machines); returns whether it was in use before. */
static PyObject *py_set_amx(PyObject *self, PyObject *args) {
    int on;
    (void)self;
    if (!PyArg_ParseTuple(args, "p", &on)) return NULL;
    const int before = amx_ready() == 1;
    amx_on = on && amx_avail;
    return PyBool_FromLong(before);
}

/* set_gfni(on) -> bool: decode TQ2_0 code fields in the quad GEMM with GFNI where the CPU has it (the default) or with
 * shifts (for A/B runs and tests of both on GFNI machines); returns whether GFNI was in use before. */
static PyObject *py_set_gfni(PyObject *self, PyObject *args) {
    int on;
    (void)self;
    if (!PyArg_ParseTuple(args, "p", &on)) return NULL;
    const int before = quad_gfni_ready() == 1;
#ifdef SPECTRA_X86
    quad_gfni = on && __builtin_cpu_supports("gfni");
#endif
    return PyBool_FromLong(before);
}

/* batch_split_cuts(n_threads, caches, lead=0, min_rows=AMX_MIN_T) -> list: where a step whose rows have these cache
 * addresses (one int per row) splits over n_threads threads (split_cuts: [0, .., B], or [0, B] when it does not),
 * before the model-size and AMX conditions. For tests. */
static PyObject *py_batch_split_cuts(PyObject *self, PyObject *args) {
    int n_threads;
    long long lead = 0, min_rows = AMX_MIN_T;
    PyObject *caches;
    (void)self;
    if (!PyArg_ParseTuple(args, "iO!|LL", &n_threads, &PyTuple_Type, &caches, &lead, &min_rows)) return NULL;
    if (min_rows < 1) return PyErr_Format(PyExc_ValueError, "min_rows must be at least 1, got %lld", min_rows);
    const Py_ssize_t B = PyTuple_GET_SIZE(caches);
    if (B < 1 || B > 4096) return PyErr_Format(PyExc_ValueError, "need 1..4096 rows, got %zd", B);
    if (lead < 0 || lead > B) return PyErr_Format(PyExc_ValueError, "lead must lie in 0..%zd, got %lld", B, lead);
    unsigned long long kp[4096];
    for (Py_ssize_t i = 0; i < B; i++) {
        kp[i] = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(caches, i));
        if (PyErr_Occurred()) return NULL;
    }
    int64_t cut[SPLIT_MAX_PARTS + 1] = {0, B}, smallest;
    const int64_t parts = split_cuts(n_threads, B, kp, cut, &smallest, lead, min_rows);
    if (parts < 2) cut[1] = B;
    PyObject *out = PyList_New(parts + 1);
    if (!out) return NULL;
    for (int64_t c = 0; c <= parts; c++) PyList_SET_ITEM(out, c, PyLong_FromLongLong(cut[c]));
    return out;
}

/* set_far_pairs(mode, pf_step=-1) -> (mode, pf_step): far pairs in the one-token TQ2_0 GEMV (far_pairs_mode: -1 by
 * CPU and model size, 0 never, 1 always) and their prefetch distance (0: none; -1 keeps it); returns the previous
 * two. For A/B runs and tests; outputs do not depend on them. */
static PyObject *py_set_far_pairs(PyObject *self, PyObject *args) {
    int mode;
    long long step = -1;
    (void)self;
    if (!PyArg_ParseTuple(args, "i|L", &mode, &step)) return NULL;
    if (mode < -1 || mode > 1) return PyErr_Format(PyExc_ValueError, "far pairs mode must be -1, 0 or 1, got %d", mode);
    if (step < -1 || step > (1 << 20))
        return PyErr_Format(PyExc_ValueError, "far pairs prefetch distance must be 0 .. 1048576 bytes, got %lld", step);
    PyObject *before = Py_BuildValue("iL", far_pairs_mode, (long long)gemv1_far_pf_step);
    far_pairs_mode = mode;
    if (step >= 0) gemv1_far_pf_step = step;
    return before;
}

/* set_batch_split(on) -> bool: split a batched decode step's rows over the threads (the default; batch_layers) or not
 * (every block's work spread over the threads in turn); returns the previous setting. For A/B runs and tests. */
static PyObject *py_set_batch_split(PyObject *self, PyObject *args) {
    int on;
    (void)self;
    if (!PyArg_ParseTuple(args, "p", &on)) return NULL;
    const int before = batch_split_on;
    batch_split_on = on;
    return PyBool_FromLong(before);
}

static PyObject *py_cpu_features(PyObject *self, PyObject *noargs) {
    (void)self, (void)noargs;
    PyObject *d = PyDict_New();
    if (!d) return NULL;
#ifdef SPECTRA_X86
    __builtin_cpu_init();
    const char *names[] = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avx512vbmi"};
    int values[] = {__builtin_cpu_supports("avx2"),       __builtin_cpu_supports("fma"),
                    __builtin_cpu_supports("avx512f"),    __builtin_cpu_supports("avx512bw"),
                    __builtin_cpu_supports("avx512vl"),   __builtin_cpu_supports("avx512vnni"),
                    __builtin_cpu_supports("avx512vbmi")};
    for (int i = 0; i < 7; i++) {
        if (PyDict_SetItemString(d, names[i], values[i] ? Py_True : Py_False) < 0) {
            Py_DECREF(d);
            return NULL;
        }
    }
    amx_ready();
    if (PyDict_SetItemString(d, "amx_int8", amx_avail ? Py_True : Py_False) < 0) { /* CPU flag and OS permission */
        Py_DECREF(d);
        return NULL;
    }
#endif
    return d;
}

/* tq1_encoding() -> bytes(256): the stored value of each llama.cpp TQ1_0 byte in the kernels' order (tq1_kernels.h; the
 * identity where the bytes are not encoded). */
static PyObject *py_tq1_encoding(PyObject *self, PyObject *noargs) {
    (void)self, (void)noargs;
    return PyBytes_FromStringAndSize((const char *)tq1_enc, 256);
}

/* tq1_decoding() -> bytes(192): the VBMI kernels' decoding tables (tq1_kernels.h), 64 bytes each: code 0 by the stored
 * byte's bits 0..5, then the two tables whose byte sum, by bits 0..5 and by bits 2..7, holds codes 1..4 as 2-bit
 * fields (zero where the bytes are not encoded). */
static PyObject *py_tq1_decoding(PyObject *self, PyObject *noargs) {
    (void)self, (void)noargs;
    uint8_t t[192];
    memcpy(t, tq1_c0, 64), memcpy(t + 64, tq1_ta, 64), memcpy(t + 128, tq1_tb, 64);
    return PyBytes_FromStringAndSize((const char *)t, 192);
}

/* rouse_pool() -> None: wake the kernels' sleeping pool workers so that they poll for the next job (pool_rouse);
 * nothing without the pool. */
static PyObject *py_rouse_pool(PyObject *self, PyObject *noargs) {
    (void)self, (void)noargs;
#if defined(SPECTRA_POOL)
    pool_rouse();
#endif
    Py_RETURN_NONE;
}

#if defined(POOL_STATS) && defined(SPECTRA_POOL)
/* pool_stats() -> dict of the pool's counters since the last call (pool.h, -DPOOL_STATS builds only), then cleared. */
static PyObject *py_pool_stats(PyObject *self, PyObject *noargs) {
    (void)self, (void)noargs;
    /* the workers' counters read and cleared in one step: a load then a store of 0 lost a count made in between */
    const unsigned long long worker_work = atomic_exchange(&pstat.worker_work, 0);
    const unsigned long long roused = atomic_exchange(&pstat.roused, 0);
    PyObject *d = Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:K}", "jobs", (unsigned long long)pstat.jobs, "wake",
                                (unsigned long long)pstat.wake, "caller_work", (unsigned long long)pstat.caller_work,
                                "caller_wait", (unsigned long long)pstat.caller_wait, "worker_work", worker_work,
                                "between", (unsigned long long)pstat.between, "roused", roused);
    pstat.jobs = pstat.wake = pstat.caller_work = pstat.caller_wait = pstat.between = pstat.last_end = 0;
    return d;
}
#endif

static PyObject *py_build_info(PyObject *self, PyObject *noargs) {
    (void)self, (void)noargs;
#ifdef SPECTRA_X86
    const int x86 = 1;
#else
    const int x86 = 0;
#endif
#ifdef _OPENMP
    const int openmp = 1;
#else
    const int openmp = 0;
#endif
#ifdef SPECTRA_POOL
    const int pool = 1; /* the kernels' own thread pool (pool.h); OpenMP is only the fallback */
#else
    const int pool = 0;
#endif
    return Py_BuildValue("{s:O,s:O,s:O}", "x86_simd", x86 ? Py_True : Py_False, "openmp", openmp ? Py_True : Py_False,
                         "thread_pool", pool ? Py_True : Py_False);
}

#ifdef SPECTRA_X86
/* (Defined here, after the hot code, so that adding it moved no other kernel: placed right after gemv1_avx512 it
 * shifted the code behind it and the TriLM-99M decode, which does not call it, measured 0.979x on 2 threads twice.) */
/* Far pairs (see gemv1_far_pf_step): rows n + r and n + 16 * half + r of [n0, n1) in one block loop, for the first
 * 2 * half whole 16-row groups; the rest (an odd group, the last rows, rows with many segments) as gemv1_avx512 does
 * them, with gemv1_avx512's block loop (GEMV1_PAIR_SUMS). */
TARGET_AVX512 __attribute__((noinline)) static void gemv1_far_avx512(const job_t *J, int64_t n0, int64_t n1) {
    const __m512i m0 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x0c);
    const __m512i m2 = _mm512_set1_epi8(0x30), m3 = _mm512_set1_epi8((char)0xc0);
    const int8_t *a = J->xq;
    const int64_t rowb = J->nb * QB, half = J->S <= GROUP_SEGMENTS ? (n1 - n0) / 32 : 0, gap = 16 * half * rowb;
    const int64_t ahead = gemv1_far_pf_step;
#define GEMV1_PF_FAR(wa, wb)              \
    do {                                  \
        if (ahead) {                      \
            PREFETCH((wa) + ahead);       \
            PREFETCH((wb) + ahead);       \
        }                                 \
    } while (0)
    __m512i v[GROUP_SEGMENTS][16], u[GROUP_SEGMENTS][16];
    int64_t n = n0;
    for (int64_t g = 0; g < half; g++, n += 16) {
        for (int r = 0; r < 16; r++) {
            const uint8_t *w = J->qs + (n + r) * rowb; /* its partner at w + gap */
            for (int64_t s = 0; s < J->S; s++) GEMV1_PAIR_SUMS(w, gap, GEMV1_PF_FAR, v[s][r], u[s][r]);
        }
        epilogue16(J, n, v, 0);
        epilogue16(J, n + 16 * half, u, 0);
    }
#undef GEMV1_PF_FAR
    if (n + 16 * half < n1) gemv1_avx512(J, n + 16 * half, n1);
}

/* gemv1_avx512 with its three prefetches per line fixed at compile time (gemv1_pf_fixed: Intel). gemv1_avx512 tests
 * gemv1_pf_copies at every block: a compare and two branches per block and row pair, beside 8 ANDs and 8 vpdpbusd
 * that already fill ports 0 and 5. On Zen 5 GCC 12 laid that counted loop out the prefetches first, which ran TriLM-1.1B
 * decoding 1.090x faster than before (see GEMV1_PREFETCH_STEP), so AMD keeps it. On the 2-core Xeon with AMX
 * (2026-12-07), this loop against the counted one (benchmarks/kernel_ab.py --decode --greedy --shards 2, TriLM-1.1B):
 * 1 thread 1.018x [1.009-1.030] (9/9), 2 threads 1.028x [0.990-1.069] (10/11); README, "The one-token GEMV's
 * prefetches fixed at compile time". Defined here, after the hot code, so that adding it moved no other kernel. */
#define PREFETCH3_FIXED(p) PREFETCH3_AT(p, gemv1_pf_step)
#define GEMV1_PF_ADJACENT_FIXED(wa, wb) \
    do {                                \
        PREFETCH3_FIXED(wa);            \
        PREFETCH3_FIXED(wb);            \
    } while (0)
TARGET_AVX512 __attribute__((noinline)) static void gemv1_pf3_avx512(const job_t *J, int64_t n0, int64_t n1) {
    GEMV1_ROWS(GEMV1_PF_ADJACENT_FIXED, PREFETCH3_FIXED)
}
#endif

static PyMethodDef methods[] = {
    {"matmul", py_matmul, METH_VARARGS, "y[T,N] = x[T,K] @ W^T for TQ2_0-layout ternary W (int8 activations)."},
    {"matmul_group", py_matmul_group, METH_VARARGS, "Several ternary matmuls of one input, quantized once."},
    {"matmul_i8", py_matmul_i8, METH_VARARGS, "y[T,N] = x[T,K] @ W^T for int8 W (w+128, permuted blocks, row scales)."},
    {"head_rows", py_head_rows, METH_VARARGS, "Final RMSNorm, int8 output layer and row argmax / logsumexp in one call."},
    {"decode_layer_batch", py_decode_layer_batch, METH_VARARGS, "One Llama block for B token rows (see the source)."},
    {"decode_layers_batch", py_decode_layers_batch, METH_VARARGS, "decode_layer_batch for every block in one call."},
    {"layers_plan", py_layers_plan, METH_VARARGS, "decode_layers_batch's tuple of blocks, parsed once (a capsule)."},
    {"decode_token", py_decode_token, METH_VARARGS, "One greedy step: embedding, every block, output layer, argmax."},
    {"embed_rows", py_embed_rows, METH_VARARGS, "Embedding rows (float32, float16 or bfloat16) widened to float32."},
    {"logsumexp", py_logsumexp, METH_VARARGS, "Row-wise log-sum-exp of float32 rows."},
    {"argmax", py_argmax, METH_VARARGS, "Row-wise argmax of float32 rows (torch.argmax's ties and NaN rule)."},
    {"argmax_logsumexp", py_argmax_logsumexp, METH_VARARGS, "argmax and logsumexp of float32 rows, over the pool."},
    {"sample", py_sample, METH_VARARGS, "One draw from a float32 row with temperature, top-k and top-p (u given)."},
    {"sample_rows", py_sample_rows, METH_VARARGS, "sample for each row of a float32 matrix, over the pool."},
    {"to_half", py_to_half, METH_VARARGS, "float32 -> float16 as the KV cache rounds (for tests)."},
    {"to_q8", py_to_q8, METH_VARARGS, "float32 rows -> q8 KV cache rows (int8 and a scale; for tests)."},
    {"attend", py_attend, METH_VARARGS, "Single-query attention per head over a KV cache slice (float32)."},
    {"quantize", py_quantize, METH_VARARGS, "Per-token int8 activations in the kernels' permuted block order."},
    {"core_round_trip", py_core_round_trip, METH_VARARGS, "ns per cache-line round trip between two spinning threads."},
    {"huge_pages", py_huge_pages, METH_VARARGS, "Back a memory range with 2 MiB pages in place (Linux THP)."},
    {"set_prefetch", (PyCFunction)(void (*)(void))py_set_prefetch, METH_VARARGS | METH_KEYWORDS,
     "Set the GEMV prefetch distances (for A/B runs and tuning)."},
    {"stream_read", py_stream_read, METH_VARARGS, "Read a memory range once over the pool (the read-rate probe)."},
    {"set_lane", py_set_lane, METH_VARARGS, "Token count from which the token-lane GEMM runs (0: off); returns the old."},
    {"set_quad", py_set_quad, METH_VARARGS, "Token count from which the quad GEMM runs (0: off); returns the old."},
    {"set_amx_tm", py_set_amx_tm, METH_VARARGS,
     "Token count from which AMX runs TQ2_0 products token-major (0: off); returns the old."},
    {"set_rowlane", py_set_rowlane, METH_VARARGS,
     "Token count from which the row-lane GEMM runs on interleaved codes (0: off); returns the old."},
    {"set_gfni", py_set_gfni, METH_VARARGS,
     "Decode TQ2_0 code fields in the quad GEMM with GFNI where available (default) or not; returns the old state."},
    {"set_amx", py_set_amx, METH_VARARGS, "Use the AMX-INT8 GEMM where available (default) or not; returns the old state."},
    {"batch_split_cuts", py_batch_split_cuts, METH_VARARGS, "Where a step's rows split over the threads (tests)."},
    {"set_far_pairs", py_set_far_pairs, METH_VARARGS, "Far row pairs in the one-token TQ2_0 GEMV: -1 auto, 0, 1."},
    {"set_batch_split", py_set_batch_split, METH_VARARGS, "Split batched decode steps' rows over the threads or not."},
    {"cpu_features", py_cpu_features, METH_NOARGS, "Instruction-set extensions this CPU (and OS) supports."},
    {"tq1_encoding", py_tq1_encoding, METH_NOARGS, "The stored value of each TQ1_0 code byte (kernel order)."},
    {"tq1_decoding", py_tq1_decoding, METH_NOARGS, "The VBMI kernels' TQ1_0 decoding tables (code 0, two sum tables)."},
    {"build_info", py_build_info, METH_NOARGS, "Whether SIMD paths, OpenMP and the thread pool were compiled in."},
    {"rouse_pool", py_rouse_pool, METH_NOARGS, "Wake the pool's sleeping workers to poll for the next job."},
    {"pick_tokens", py_pick_tokens, METH_VARARGS, "The next token of each row: its argmax, or its draw when sampled."},
    {"take_tokens", py_take_tokens, METH_VARARGS, "dst[i] = src[index[i]] where index[i] >= 0 (int64 arrays)."},
    {"defer_begin", py_defer_begin, METH_NOARGS, "Record the kernel calls that follow instead of running them."},
    {"defer_end", py_defer_end, METH_NOARGS, "Hand the recorded calls to the deferred-call thread; its ticket."},
    {"defer_abort", py_defer_abort, METH_NOARGS, "Drop the recorded calls."},
    {"defer_wait", py_defer_wait, METH_VARARGS, "Wait until the deferred list with this ticket has run."},
#if defined(POOL_STATS) && defined(SPECTRA_POOL)
    {"pool_stats", py_pool_stats, METH_NOARGS, "The thread pool's wait counters since the last call (-DPOOL_STATS)."},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels", "spectra's ternary CPU kernels", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__kernels(void) {
    prefetch_tune(); /* before any thread runs a kernel */
#ifdef SPECTRA_X86
    quad_gfni_ready(); /* probed once, before any thread reads it */
    f16c_on = __builtin_cpu_supports("f16c");
    tq1_has_vbmi(); /* fills the TQ1 decode tables (and chooses the byte encoding) once, before any thread reads them */
    amx_ready(); /* asks Linux for the tile registers once */
#else
    tq1_encoding_init(0);
#endif
    return PyModule_Create(&module);
}
