/*
 * spectra.packed._kernels: ternary x int8 matrix products on TQ2_0-layout weights (see spectra/packed/kernels.py).
 *
 * Weights: N rows of K/256 blocks; each block is the 64 code bytes of a llama.cpp TQ2_0 block (its fp16 scale is kept
 * apart, as one float per row and "scale segment"). Byte j = 32h + m of a block holds codes c = q+1 in {0,1,2} of
 * elements 128h + 32l + m in bits 2l..2l+1, l = 0..3.
 *
 * Activations: each token row x (float32, K) is quantized to int8 with one scale per token,
 *     amax = max_i |x_i|,  inv = 127 / amax,  a_i = clamp(rint(x_i * inv), -127, 127),  s = amax / 127
 * (float32 arithmetic, round half to even; amax == 0 gives a = 0, s = 0; a non-finite x gives s = NaN), and stored per
 * block in the order of the weight bit fields: permuted position 64l + 32h + m holds element 128h + 32l + m.
 *
 * Output: with segments [b0, b1) of blocks over which every row's scale d is constant,
 *     acc_s = sum_{i in s} c_i a_i  (int32, exact),   bsum_s = sum_{i in s} a_i,
 *     y = s * (((0 + d_0 * (float)(acc_0 - bsum_0)) + d_1 * (float)(acc_1 - bsum_1)) + ...)
 * which is sum_i q_i a_i by the identity sum (q+1) a - sum a = sum q a. Every path (scalar, AVX2, AVX-512 VNNI) does
 * the same integer sums and the same float32 operations in the same order, so all paths give bit-identical results,
 * equal to the pure-torch reference. Build with -ffp-contract=off so no float multiply-add gets fused.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SPECTRA_X86 1
#include <immintrin.h>
#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define TARGET_AVX2 __attribute__((target("avx2,fma")))
#endif

#define QK 256         /* weights per block */
#define QB 64          /* code bytes per block */
#define TOKEN_CHUNK 64 /* GEMM: tokens whose int8 activations are reused per pass over a row group */
#ifndef CHUNKS_PER_THREAD
#define CHUNKS_PER_THREAD 8 /* row chunks per thread, handed out dynamically */
#endif
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 256 /* GEMV: software prefetch distance along the weight stream (best of 0..2048 here) */
#endif

enum { PATH_SCALAR = 0, PATH_AVX2 = 1, PATH_AVX512VNNI = 2 };

typedef struct {
    const uint8_t *qs;     /* [N, nb*64] */
    const int32_t *bounds; /* [S+1] block indices */
    const float *seg_d;    /* [N, S] */
    const int8_t *xq;      /* [T, K] permuted int8 activations */
    const int32_t *bsum;   /* [T, S] */
    const float *xs;       /* [T] activation scales */
    float *y;              /* [T, N] */
    int64_t N, K, nb, S, T;
} job_t;

/* ---------------------------------------------------------------- activation quantization */

static inline int64_t perm_pos(int64_t e) {
    int64_t h = e >> 7, r = e & 127;
    return 64 * (r >> 5) + 32 * h + (r & 31);
}

static void quantize_row_scalar(const float *x, const job_t *J, int8_t *q, int32_t *bsum, float *scale) {
    float amax = 0.0f;
    int bad = 0;
    for (int64_t i = 0; i < J->K; i++) {
        float a = fabsf(x[i]);
        if (!(a <= 3.4028234663852886e38f)) bad = 1; /* NaN or inf */
        else if (a > amax) amax = a;
    }
    if (bad || amax == 0.0f) {
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
                float v = x[b * QK + e] * inv;
                long r = lrintf(v);
                if (r > 127) r = 127;
                if (r < -127) r = -127;
                q[b * QK + perm_pos(e)] = (int8_t)r;
                sum += (int32_t)r;
            }
        }
        bsum[s] = sum;
    }
}

#ifdef SPECTRA_X86
TARGET_AVX512 static void quantize_row_avx512(const float *x, const job_t *J, int8_t *q, int32_t *bsum, float *scale) {
    const __m512 big = _mm512_set1_ps(3.4028234663852886e38f);
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 bad = 0;
    for (int64_t i = 0; i < J->K; i += 16) {
        __m512 a = _mm512_abs_ps(_mm512_loadu_ps(x + i));
        bad |= _mm512_cmp_ps_mask(a, big, _CMP_NLE_UQ);
        vmax = _mm512_max_ps(vmax, a);
    }
    float amax = _mm512_reduce_max_ps(vmax);
    if (bad || amax == 0.0f) {
        for (int64_t i = 0; i < J->K; i++) q[i] = 0;
        for (int64_t i = 0; i < J->S; i++) bsum[i] = 0;
        *scale = bad ? NAN : 0.0f;
        return;
    }
    const float inv = 127.0f / amax;
    *scale = amax / 127.0f;
    const __m512 vinv = _mm512_set1_ps(inv);
    const __m512i hi = _mm512_set1_epi32(127), lo = _mm512_set1_epi32(-127);
    for (int64_t s = 0; s < J->S; s++) {
        __m512i vsum = _mm512_setzero_si512();
        for (int64_t b = J->bounds[s]; b < J->bounds[s + 1]; b++) {
            for (int h = 0; h < 2; h++) {
                for (int l = 0; l < 4; l++) {
                    for (int k = 0; k < 2; k++) {
                        const float *src = x + b * QK + 128 * h + 32 * l + 16 * k;
                        __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(src), vinv));
                        r = _mm512_max_epi32(_mm512_min_epi32(r, hi), lo);
                        vsum = _mm512_add_epi32(vsum, r);
                        _mm_storeu_si128((__m128i *)(q + b * QK + 64 * l + 32 * h + 16 * k), _mm512_cvtepi32_epi8(r));
                    }
                }
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
            _mm_prefetch((const char *)(w + b * QB + PREFETCH_BYTES), _MM_HINT_T0);
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
            __m512i acc[4][4]; /* [token][field] */
            _Pragma("GCC unroll 4")
            for (int k = 0; k < TT; k++)
                _Pragma("GCC unroll 4")
                for (int l = 0; l < 4; l++) acc[k][l] = _mm512_setzero_si512();
            for (int64_t b = J->bounds[s]; b < J->bounds[s + 1]; b++) {
#if PREFETCH_BYTES > 0
                _mm_prefetch((const char *)(w + b * QB + PREFETCH_BYTES), _MM_HINT_T0);
#endif
                const __m512i w0 = _mm512_loadu_si512(w + b * QB);
                const __m512i wm[4] = {_mm512_and_si512(w0, m0), _mm512_and_si512(w0, m1), _mm512_and_si512(w0, m2),
                                       _mm512_and_si512(w0, m3)};
                _Pragma("GCC unroll 4")
                for (int k = 0; k < TT; k++) {
                    const int8_t *ab = J->xq + k * J->K + b * QK;
                    _Pragma("GCC unroll 4")
                    for (int l = 0; l < 4; l++)
                        acc[k][l] = _mm512_dpbusd_epi32(acc[k][l], wm[l], _mm512_loadu_si512(ab + 64 * l));
                }
            }
            const float d = J->seg_d[n * J->S + s];
            _Pragma("GCC unroll 4")
            for (int k = 0; k < TT; k++) {
                __m512i v = _mm512_add_epi32(acc[k][0], _mm512_srai_epi32(acc[k][1], 2));
                v = _mm512_add_epi32(v, _mm512_srai_epi32(acc[k][2], 4));
                v = _mm512_add_epi32(v, _mm512_srai_epi32(acc[k][3], 6));
                yv[k] = yv[k] + d * (float)(_mm512_reduce_add_epi32(v) - J->bsum[k * J->S + s]);
            }
        }
        _Pragma("GCC unroll 4")
        for (int k = 0; k < TT; k++) J->y[k * J->N + n] = yv[k] * J->xs[k];
    }
}

/* One function per token count, so that each gets its own register allocation. */
/* One token: the same loop written out by hand; measured faster here than the generic body with TT = 1, though the
 * two compile to nearly the same instructions. */
TARGET_AVX512 __attribute__((noinline)) static void gemv1_avx512(const job_t *J, int64_t n0, int64_t n1) {
    const __m512i m0 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x0c);
    const __m512i m2 = _mm512_set1_epi8(0x30), m3 = _mm512_set1_epi8((char)0xc0);
    const int8_t *a = J->xq;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *w = J->qs + n * J->nb * QB;
        float yv = 0.0f;
        for (int64_t s = 0; s < J->S; s++) {
            __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t b = J->bounds[s]; b < J->bounds[s + 1]; b++) {
#if PREFETCH_BYTES > 0
                _mm_prefetch((const char *)(w + b * QB + PREFETCH_BYTES), _MM_HINT_T0);
#endif
                const __m512i w0 = _mm512_loadu_si512(w + b * QB);
                const int8_t *ab = a + b * QK;
                a0 = _mm512_dpbusd_epi32(a0, _mm512_and_si512(w0, m0), _mm512_loadu_si512(ab));
                a1 = _mm512_dpbusd_epi32(a1, _mm512_and_si512(w0, m1), _mm512_loadu_si512(ab + 64));
                a2 = _mm512_dpbusd_epi32(a2, _mm512_and_si512(w0, m2), _mm512_loadu_si512(ab + 128));
                a3 = _mm512_dpbusd_epi32(a3, _mm512_and_si512(w0, m3), _mm512_loadu_si512(ab + 192));
            }
            __m512i v = _mm512_add_epi32(a0, _mm512_srai_epi32(a1, 2));
            v = _mm512_add_epi32(v, _mm512_srai_epi32(a2, 4));
            v = _mm512_add_epi32(v, _mm512_srai_epi32(a3, 6));
            const int32_t acc = _mm512_reduce_add_epi32(v);
            yv = yv + J->seg_d[n * J->S + s] * (float)(acc - J->bsum[s]);
        }
        J->y[n] = yv * J->xs[0];
    }
}

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
        case 1: gemv1_avx512(J, n0, n1); break;
        case 2: gemv2_avx512(J, n0, n1); break;
        case 3: gemv3_avx512(J, n0, n1); break;
        default: gemv4_avx512(J, n0, n1); break;
    }
}

/* GEMM tile: R rows x TT tokens (<= 4 x 4). Each 64-byte block of a row is unpacked once into four code vectors and
 * used against TT tokens; 16 int32 accumulators stay in registers. */
TARGET_AVX512 static inline __attribute__((always_inline)) void tile_avx512(const job_t *J, int64_t n, int64_t t,
                                                                            const int R, const int TT) {
    const __m512i m3 = _mm512_set1_epi8(3);
    float yv[4][4];
    _Pragma("GCC unroll 4")
    for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 4")
        for (int k = 0; k < TT; k++) yv[r][k] = 0.0f;
    for (int64_t s = 0; s < J->S; s++) {
        __m512i acc[4][4];
        _Pragma("GCC unroll 4")
        for (int r = 0; r < R; r++)
            _Pragma("GCC unroll 4")
            for (int k = 0; k < TT; k++) acc[r][k] = _mm512_setzero_si512();
        for (int64_t b = J->bounds[s]; b < J->bounds[s + 1]; b++) {
            __m512i w[4];
            _Pragma("GCC unroll 4")
            for (int r = 0; r < R; r++) w[r] = _mm512_loadu_si512(J->qs + ((n + r) * J->nb + b) * QB);
            _Pragma("GCC unroll 4")
            for (int l = 0; l < 4; l++) {
                __m512i wl[4];
                _Pragma("GCC unroll 4")
                for (int r = 0; r < R; r++) {
                    __m512i v = w[r];
                    if (l == 1) v = _mm512_srli_epi16(v, 2);
                    if (l == 2) v = _mm512_srli_epi16(v, 4);
                    if (l == 3) v = _mm512_srli_epi16(v, 6);
                    wl[r] = _mm512_and_si512(v, m3);
                }
                _Pragma("GCC unroll 4")
                for (int k = 0; k < TT; k++) {
                    const __m512i a = _mm512_loadu_si512(J->xq + (t + k) * J->K + b * QK + 64 * l);
                    _Pragma("GCC unroll 4")
                    for (int r = 0; r < R; r++) acc[r][k] = _mm512_dpbusd_epi32(acc[r][k], wl[r], a);
                }
            }
        }
        _Pragma("GCC unroll 4")
        for (int r = 0; r < R; r++) {
            const float d = J->seg_d[(n + r) * J->S + s];
            _Pragma("GCC unroll 4")
            for (int k = 0; k < TT; k++) {
                const int32_t v = _mm512_reduce_add_epi32(acc[r][k]);
                yv[r][k] = yv[r][k] + d * (float)(v - J->bsum[(t + k) * J->S + s]);
            }
        }
    }
    _Pragma("GCC unroll 4")
    for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 4")
        for (int k = 0; k < TT; k++) J->y[(t + k) * J->N + n + r] = yv[r][k] * J->xs[t + k];
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

TARGET_AVX512 static void gemm_avx512(const job_t *J, int64_t n0, int64_t n1) {
    for (int64_t c0 = 0; c0 < J->T; c0 += TOKEN_CHUNK) {
        const int64_t c1 = c0 + TOKEN_CHUNK < J->T ? c0 + TOKEN_CHUNK : J->T;
        int64_t n = n0;
        for (; n + 4 <= n1; n += 4) TILE_ROW(4);
        switch (n1 - n) {
            case 3: TILE_ROW(3); break;
            case 2: TILE_ROW(2); break;
            case 1: TILE_ROW(1); break;
            default: break;
        }
    }
}
#endif /* SPECTRA_X86 */

/* ---------------------------------------------------------------- dispatch */

static void run_rows(int path, const job_t *J, int64_t n0, int64_t n1) {
    if (n0 >= n1) return;
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

/* Rows are handed out in contiguous chunks (multiples of 4 rows, the GEMM tile height; about 8 per thread), so each
 * thread reads one sequential stream of weights at a time. Chunks rather than one range per thread because this
 * machine is shared: a thread that the OS deschedules then delays the call by one chunk, not by half the matrix. */
static void run_parallel(int path, const job_t *J, int n_threads) {
    if (n_threads <= 1 || J->N < 8) {
        run_rows(path, J, 0, J->N);
        return;
    }
#ifdef _OPENMP
    const int64_t groups = (J->N + 3) / 4;
    int64_t per_chunk = groups / (CHUNKS_PER_THREAD * n_threads);
    if (per_chunk < 4) per_chunk = 4;
    const int64_t n_chunks = (groups + per_chunk - 1) / per_chunk;
#pragma omp parallel for num_threads(n_threads) schedule(dynamic, 1)
    for (int64_t c = 0; c < n_chunks; c++) {
        const int64_t n0 = 4 * c * per_chunk, n1 = 4 * (c + 1) * per_chunk < J->N ? 4 * (c + 1) * per_chunk : J->N;
        run_rows(path, J, n0, n1);
    }
#else
    run_rows(path, J, 0, J->N);
#endif
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

/* ---------------------------------------------------------------- Python bindings */

static int parse_job(PyObject *args, int *path, const float **x, job_t *J, int *n_threads) {
    unsigned long long px, pqs, pb, pd, py;
    long long T, K, N, S;
    if (!PyArg_ParseTuple(args, "iKLLKLKLKKi", path, &px, &T, &K, &pqs, &N, &pb, &S, &pd, &py, n_threads)) return 0;
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
    J->T = T, J->K = K, J->N = N, J->S = S, J->nb = K / QK;
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

/* matmul(path, x_ptr, T, K, qs_ptr, N, bounds_ptr, S, seg_d_ptr, y_ptr, n_threads) -> None; y[T, N] = x[T, K] W^T */
static PyObject *py_matmul(PyObject *self, PyObject *args) {
    int path, n_threads;
    const float *x;
    job_t J;
    (void)self;
    if (!parse_job(args, &path, &x, &J, &n_threads)) return NULL;
    if (J.T == 0 || J.N == 0) Py_RETURN_NONE;
    /* Per-thread scratch for the int8 activations, reused across calls: decoding makes hundreds of small calls per
     * token and a malloc/free per call is measurable. It grows to the largest T*K seen by this thread. */
    static _Thread_local void *scratch = NULL;
    static _Thread_local size_t scratch_size = 0;
    const size_t q_bytes = ((size_t)(J.T * J.K) + 63) & ~(size_t)63;
    const size_t need = q_bytes + sizeof(int32_t) * (size_t)(J.T * J.S) + sizeof(float) * (size_t)J.T;
    if (need > scratch_size) {
        free(scratch);
        scratch_size = 0;
        scratch = aligned_alloc(64, (need + 63) & ~(size_t)63);
        if (!scratch) return PyErr_NoMemory();
        scratch_size = need;
    }
    int8_t *xq = (int8_t *)scratch;
    int32_t *bsum = (int32_t *)((char *)scratch + q_bytes);
    float *xs = (float *)(bsum + J.T * J.S);
    Py_BEGIN_ALLOW_THREADS
    quantize_rows(path, x, &J, xq, bsum, xs);
    J.xq = xq, J.bsum = bsum, J.xs = xs;
    run_parallel(path, &J, n_threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
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

static PyObject *py_cpu_features(PyObject *self, PyObject *noargs) {
    (void)self, (void)noargs;
    PyObject *d = PyDict_New();
    if (!d) return NULL;
#ifdef SPECTRA_X86
    __builtin_cpu_init();
    const char *names[] = {"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512vnni"};
    int values[] = {__builtin_cpu_supports("avx2"),     __builtin_cpu_supports("fma"),
                    __builtin_cpu_supports("avx512f"),  __builtin_cpu_supports("avx512bw"),
                    __builtin_cpu_supports("avx512vl"), __builtin_cpu_supports("avx512vnni")};
    for (int i = 0; i < 6; i++) {
        if (PyDict_SetItemString(d, names[i], values[i] ? Py_True : Py_False) < 0) {
            Py_DECREF(d);
            return NULL;
        }
    }
#endif
    return d;
}

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
    return Py_BuildValue("{s:O,s:O}", "x86_simd", x86 ? Py_True : Py_False, "openmp", openmp ? Py_True : Py_False);
}

static PyMethodDef methods[] = {
    {"matmul", py_matmul, METH_VARARGS, "y[T,N] = x[T,K] @ W^T for TQ2_0-layout ternary W (int8 activations)."},
    {"quantize", py_quantize, METH_VARARGS, "Per-token int8 activations in the kernels' permuted block order."},
    {"cpu_features", py_cpu_features, METH_NOARGS, "Instruction-set extensions this CPU (and OS) supports."},
    {"build_info", py_build_info, METH_NOARGS, "Whether SIMD paths and OpenMP were compiled in."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels", "spectra's ternary CPU kernels", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
