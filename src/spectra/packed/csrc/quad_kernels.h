/*
 * Quad GEMM on AVX-512 VNNI for TQ2_0 weights from QUAD_MIN_T tokens up to the token-lane GEMM's start (lane_from in
 * lane_kernels.h: 128 tokens for K < 1024, 256 from K = 1024; batched decode steps, prompt chunks), for TQ1_0 weights
 * from QUAD_MIN_T to the lanes' 32 tokens (each 4-row group packed as TQ2_0 code bytes: quad_rows_tq1), and for int8
 * weights (the output layer) from QUAD_MIN_T tokens on. Included by ternary_kernels.c after amx_kernels.h; run_rows
 * and run_rows_i8 call it in place of the 4 x 4 tiles and the lanes.
 *
 * The tiles (gemm_avx512, i8_tile_avx512) give each accumulator the 16 lanes of one token: 16 partial sums over K,
 * so every 16 outputs end in a 16-way reduction (hsum16x16, 37 vector operations) plus a float epilogue from gathered
 * scalars. At K = 512 (TriLM-99M) that is as much work as the products: the tiles ran at 69 % of vpdpbusd's rate
 * there against 87-92 % at K = 1792-5120, and an experiment that dropped the reduction made the 99M's matrices
 * 1.10-1.22x faster at 16 tokens. Here a vector holds 4 tokens x 4 lanes ("quad" layout of the activations: 16
 * consecutive bytes of each of 4 tokens), and the weights are 16 bytes broadcast to the four 128-bit lanes
 * (vbroadcasti32x4, a load): an accumulator ends holding 4 partial sums for each of 4 tokens, so 4 accumulators
 * reduce to 16 finished outputs (4 rows x 4 tokens) in 6 operations, a quarter of the tiles' reduction, and the
 * epilogue works on 16 outputs per vector.
 *
 * - Activations (quad_build): x4 [T/4][K/16][4 tokens][16 bytes] for the full groups of 4 tokens, from the int8 rows
 *   of the TQ2_0 / int8 layout by a 4 x 4 transpose of 128-bit lanes per 64 bytes.
 * - TQ2_0: 16 code bytes of a block (bytes 16q .. 16q+15) hold, in field l, the codes of elements 64l + 16q .. +15,
 *   which meet activation chunk 16b + 4l + q. Per row and 16 bytes: one broadcast, three shifts and four ANDs, used
 *   by 4 token groups: 0.44 vector operations per vpdpbusd, as in the tiles. Where the CPU has GFNI (Ice Lake and
 *   later, Zen 4) fields 1-3 are one gf2p8affineqb each instead of a shift and an AND (quad_pass.h, built twice):
 *   a 99m batch-16 step with AMX off on the Xeon 1.067x [1.009-1.108] (11/11 rounds, benchmarks/kernel_ab.py
 *   --no-amx), the 1.1B's 1.056x [1.002-1.106] (7/7); the 8 tokens a thread of a split step give each decoded field
 *   only two vpdpbusd, so the decode weighs twice as much there.
 * - int8: the rows' bytes u = w + 128 are broadcast as they are.
 * - Per pass: 4 rows x up to 16 tokens (4 token groups), 16 accumulators, all K. The last T % 4 tokens go to one
 *   tile of the tiles' GEMM after the passes (a pass over a partly empty group would compute the empty lanes too),
 *   and below QUAD_MIN_T tokens the tiles run alone: with one or two groups a broadcast code vector serves only one
 *   or two vpdpbusd, where a tile's serves four.
 *
 * Measured on Zen 4 (one thread, cache-resident, builds in one process, median of 7 alternating rounds), quad
 * against the tiles: TQ2_0 1280 x 512 1.12-1.18x at 9-31 tokens (16: 76 -> 83 % of vpdpbusd's rate), 512 x 512 1.14x,
 * 512 x 1280 1.05x, 1792 x 1792 1.05x at 16 tokens, 5120 x 1792 at 24 1.04x; at 5-7 tokens 0.75-0.87x, hence
 * QUAD_MIN_T. int8 at 16 tokens: the 99M's 50304 x 512 output layer 1.16x, the 1.1B's 32000 x 1792 1.42x (both read
 * from L3 / DRAM; a 2048 x 512 layer in L2 0.94x). A layout with the 4 groups of a chunk side by side (one 256-byte
 * run per step) was 0.88x of the one here at K = 512. Against the lanes see lane_from; TriLM-1.1B prompt of 128
 * (benchmarks/kernel_ab.py, quad instead of lanes): 1 thread 1.023x [1.006-1.034], 9/9 rounds; 2 threads 1.006x (5/9).
 * Running every pass of 16 tokens over a block of 8 or 32 rows before the next pass (weights kept, activations
 * streamed) instead of all passes per 4 rows: 0.98x there.
 *
 * The integer sums are the other kernels' (sum c a per segment, exact in int32), and the epilogue does the scalar
 * epilogue's float32 operations in the same order, lane by lane, so the outputs are bit-identical to every other
 * path and to the pure-torch reference.
 */

/* The quad GEMM runs TQ2_0 products of T tokens here (the token-lane GEMM or AMX take larger T). */
static inline int quad_applies(int path, const job_t *J) {
#ifdef SPECTRA_X86
    return path == PATH_AVX512VNNI && quad_min_t > 0 && J->T >= quad_min_t &&
           (J->fmt == FMT_TQ2 || (J->fmt == FMT_TQ1 && tq1_has_vbmi())) && !amx_applies(path, J) &&
           !lane_applies(path, J) && !(rowlane_wanted(path, J) && J->N % ROWLANE_ROWS == 0);
#else
    (void)path, (void)J;
    return 0;
#endif
}

/* The same for int8 weights (matmul_i8: the output layer), where the lane GEMM never runs. */
static inline int quad_applies_i8(int path, const job_t *J) {
#ifdef SPECTRA_X86
    return path == PATH_AVX512VNNI && quad_min_t > 0 && J->T >= quad_min_t && !amx_applies(path, J);
#else
    (void)path, (void)J;
    return 0;
#endif
}

/* GFNI for the TQ2_0 passes' field decode (quad_pass.h): -1 not probed, 0 absent or switched off (set_gfni), 1 on.
 * Probed once from PyInit (single-threaded). CPUs with AVX-512 VNNI but no GFNI (Cascade Lake) take the shifts. */
static int quad_gfni = -1;
static int quad_gfni_ready(void) {
    if (quad_gfni < 0) {
#ifdef SPECTRA_X86
        quad_gfni = __builtin_cpu_supports("gfni") ? 1 : 0;
#else
        quad_gfni = 0;
#endif
    }
    return quad_gfni;
}
#ifdef SPECTRA_X86
#define TARGET_AVX512_GFNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,gfni")))
#endif

/* Bytes of the full groups of 4 of T int8 rows of K in the quad layout. */
static inline size_t quad_bytes(int64_t T, int64_t K) { return (size_t)((T / 4) * 4 * K); }

#ifdef SPECTRA_X86
/* Tokens 4g .. 4g+3 of xq [T, K] (a full group: 4g + 3 < T) -> x4 group g: per 64 bytes, a 4 x 4 transpose of
 * 128-bit lanes. */
TARGET_AVX512 static void quad_build_group(const int8_t *xq, int64_t K, int8_t *x4, int64_t g) {
    int8_t *out = x4 + g * 4 * K;
    for (int64_t j = 0; j < K; j += 64) {
        __m512i a[4];
        for (int i = 0; i < 4; i++) a[i] = _mm512_loadu_si512(xq + (4 * g + i) * K + j);
        const __m512i s0 = _mm512_shuffle_i64x2(a[0], a[1], 0x44), s1 = _mm512_shuffle_i64x2(a[0], a[1], 0xee);
        const __m512i s2 = _mm512_shuffle_i64x2(a[2], a[3], 0x44), s3 = _mm512_shuffle_i64x2(a[2], a[3], 0xee);
        int8_t *o = out + 4 * j; /* chunks j/16 .. j/16 + 3, 64 bytes each */
        _mm512_storeu_si512(o, _mm512_shuffle_i64x2(s0, s2, 0x88));
        _mm512_storeu_si512(o + 64, _mm512_shuffle_i64x2(s0, s2, 0xdd));
        _mm512_storeu_si512(o + 128, _mm512_shuffle_i64x2(s1, s3, 0x88));
        _mm512_storeu_si512(o + 192, _mm512_shuffle_i64x2(s1, s3, 0xdd));
    }
}

/* Lane 4i + r: a[r] summed over the 4 dwords of 128-bit lane i (rows r = 0..3, token i of the group). */
TARGET_AVX512 static inline __m512i quad_reduce4(__m512i a0, __m512i a1, __m512i a2, __m512i a3) {
    const __m512i t01 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
    const __m512i t23 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
    return _mm512_add_epi32(_mm512_unpacklo_epi64(t01, t23), _mm512_unpackhi_epi64(t01, t23));
}

/* Lane 4i + r = p[t0 + i]: one load of a full group's 4 values (scalars stored to an array and read back as a vector
 * stall on store forwarding). */
TARGET_AVX512 static inline __m512i quad_tokens_epi32(const int32_t *p, int64_t t0) {
    return _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
                                    _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(p + t0))));
}

/* Row group n .. n+R-1 (R <= 4) against the full token groups g0 .. g0+NG-1 (NG <= 4): accumulators a<r><g>, named
 * and pinned as the tiles' (TILE_ZERO, TILE_PIN). `I8`: the rows are int8 bytes (K per row), else TQ2_0 code bytes.
 * The finish is per segment: out_g += d * f(sum - bsum), lane 4i + r for row n + r and token 4 (g0 + g) + i, then
 * y = out * xs. */
#define QUAD_DP(g)                                                             \
    do {                                                                       \
        if (g < NG) {                                                          \
            const __m512i x_ = _mm512_loadu_si512(xc + (g) * 4 * K);           \
            DPBUSD_R(a0##g, w[0], x_);                                         \
            if (R > 1) DPBUSD_R(a1##g, w[1], x_);                              \
            if (R > 2) DPBUSD_R(a2##g, w[2], x_);                              \
            if (R > 3) DPBUSD_R(a3##g, w[3], x_);                              \
        }                                                                      \
    } while (0)
#define QUAD_FINISH(g)                                                                                          \
    do {                                                                                                      \
        if (g < NG) {                                                                                         \
            const __m512i sum_ = quad_reduce4(a0##g, a1##g, a2##g, a3##g);                                    \
            const __m512i bs_ = quad_tokens_epi32(bq + s * J->T, 4 * (g0 + g));                              \
            out[g] = _mm512_add_ps(out[g], _mm512_mul_ps(dd, _mm512_cvtepi32_ps(_mm512_sub_epi32(sum_, bs_)))); \
        }                                                                                                     \
    } while (0)

#define QUAD_PASS quad_pass
#define QUAD_PASS_TARGET TARGET_AVX512
#define QUAD_PASS_GFNI 0
#include "quad_pass.h"
#undef QUAD_PASS
#undef QUAD_PASS_TARGET
#undef QUAD_PASS_GFNI
#define QUAD_PASS quad_pass_gfni
#define QUAD_PASS_TARGET TARGET_AVX512_GFNI
#define QUAD_PASS_GFNI 1
#include "quad_pass.h"
#undef QUAD_PASS
#undef QUAD_PASS_TARGET
#undef QUAD_PASS_GFNI

/* The full groups of 4 tokens in passes of up to 4; the last T % 4 tokens in one tile of the tiles' GEMM (a pass
 * over a partly empty group computes its empty lanes too). */
#define QUAD_TILE(R, TT, I8)                                                  \
    do {                                                                      \
        if (I8) i8_tile_avx512(J, n, 4 * G, R, TT, 0);                        \
        else tile_avx512(J, n, 4 * G, R, TT);                                 \
    } while (0)
#define QUAD_GROUPS(PASS, R, I8)                                                  \
    do {                                                                      \
        int64_t g = 0;                                                        \
        for (; g + 4 <= G; g += 4) PASS(J, x4, bq, n, g, R, 4, I8);           \
        switch (G - g) {                                                      \
            case 3: PASS(J, x4, bq, n, g, R, 3, I8); break;                   \
            case 2: PASS(J, x4, bq, n, g, R, 2, I8); break;                   \
            case 1: PASS(J, x4, bq, n, g, R, 1, I8); break;                   \
            default: break;                                                   \
        }                                                                     \
        switch (J->T % 4) {                                                   \
            case 3: QUAD_TILE(R, 3, I8); break;                               \
            case 2: QUAD_TILE(R, 2, I8); break;                               \
            case 1: QUAD_TILE(R, 1, I8); break;                               \
            default: break;                                                   \
        }                                                                     \
    } while (0)

/* Rows [n0, n1) for all tokens. */
#define QUAD_ROWS(PASS, I8)                                                   \
    do {                                                                      \
        const int64_t G = J->T / 4; /* full token groups */                   \
        const int8_t *x4 = J->x4;                                             \
        const int32_t *bq = quad_token_sums(J);                               \
        if (!bq) return 0;                                                    \
        int64_t n = n0;                                                       \
        for (; n + 4 <= n1; n += 4) QUAD_GROUPS(PASS, 4, I8);                 \
        switch (n1 - n) {                                                     \
            case 3: QUAD_GROUPS(PASS, 3, I8); break;                          \
            case 2: QUAD_GROUPS(PASS, 2, I8); break;                          \
            case 1: QUAD_GROUPS(PASS, 1, I8); break;                          \
            default: break;                                                   \
        }                                                                     \
    } while (0)

/* The token sums by segment, bq[s * T + t]: J->bsum ([T][S]) itself for one segment, else a copy in a per-thread
 * buffer, so that a pass loads 4 tokens' sums as one vector (gathering them at stride S cost the passes of a
 * 2-segment matrix 2-4 % at 128 tokens). NULL when the buffer cannot grow. */
static const int32_t *quad_token_sums(const job_t *J) {
    if (J->S == 1) return J->bsum;
    static _Thread_local void *buf = NULL;
    static _Thread_local size_t size = 0;
    int32_t *bq = (int32_t *)grow_buffer(&buf, &size, sizeof(int32_t) * (size_t)(J->T * J->S));
    if (!bq) return NULL;
    for (int64_t t = 0; t < J->T; t++)
        for (int64_t s = 0; s < J->S; s++) bq[s * J->T + t] = J->bsum[t * J->S + s];
    return bq;
}

TARGET_AVX512 __attribute__((noinline)) static int quad_rows_tq2(const job_t *J, int64_t n0, int64_t n1) {
    QUAD_ROWS(quad_pass, 0);
    return 1;
}

/* The same with the GFNI field decode (quad_pass.h), where the CPU has GFNI (quad_gfni). */
TARGET_AVX512_GFNI __attribute__((noinline)) static int quad_rows_tq2_gfni(const job_t *J, int64_t n0, int64_t n1) {
    QUAD_ROWS(quad_pass_gfni, 0);
    return 1;
}

TARGET_AVX512 __attribute__((noinline)) static int quad_rows_i8(const job_t *J, int64_t n0, int64_t n1) {
    QUAD_ROWS(quad_pass, 1);
    return 1;
}
#else
static void quad_build_group(const int8_t *xq, int64_t K, int8_t *x4, int64_t g) {
    (void)xq, (void)K, (void)x4, (void)g;
}
#endif /* SPECTRA_X86 */

/* The full token groups of xq [T, K] into x4. */
static void quad_build(const int8_t *xq, int64_t T, int64_t K, int8_t *x4) {
    for (int64_t g = 0; g < T / 4; g++) quad_build_group(xq, K, x4, g);
}

#ifdef SPECTRA_X86
/* Rows n .. n+R-1 of a TQ1_0 job as TQ2_0 code bytes, nb * 64 a row, into q2 (tq1_rows_tq2). */
TARGET_AVX512_VBMI static void tq1_pack_tq2(const job_t *J, int64_t n, int R, uint8_t *q2) {
    tq1_rows_tq2(J, n, R, q2, 1);
}

/* The quad GEMM for a TQ1_0 job (quad_applies: a VBMI CPU, from quad_min_t tokens to the lanes' start): each group of
 * 4 rows packed as TQ2_0 code bytes (tq1_pack_tq2, into a per-thread buffer of 4 * nb * 64 bytes) and run as a TQ2_0
 * job of those rows against the same activations (the TQ2 layout: tq1_reads_tq2_layout). 0 when the buffer cannot
 * grow. */
static int quad_rows_tq1(const job_t *J, int64_t n0, int64_t n1) {
    static _Thread_local void *buf = NULL;
    static _Thread_local size_t size = 0;
    uint8_t *q2 = (uint8_t *)grow_buffer(&buf, &size, (size_t)(4 * J->nb * QB));
    if (!q2) return 0;
    for (int64_t n = n0; n < n1; n += 4) {
        const int R = n1 - n < 4 ? (int)(n1 - n) : 4;
        tq1_pack_tq2(J, n, R, q2);
        job_t G = *J;
        G.qs = q2, G.fmt = FMT_TQ2, G.seg_d = J->seg_d + n * J->S, G.y = J->y + n;
        if (!(quad_gfni_ready() == 1 ? quad_rows_tq2_gfni(&G, 0, R) : quad_rows_tq2(&G, 0, R))) return 0;
    }
    return 1;
}
#endif

/* Run the quad GEMM on rows [n0, n1) if the activations were prepared (J->x4); 1 when done (0: not done, the
 * caller's other kernels run the rows). */
static int quad_run_rows(const job_t *J, int64_t n0, int64_t n1, int i8) {
#ifdef SPECTRA_X86
    if (!J->x4) return 0;
    if (i8) return quad_rows_i8(J, n0, n1);
    if (J->fmt == FMT_TQ1) return quad_rows_tq1(J, n0, n1);
    return quad_gfni_ready() == 1 ? quad_rows_tq2_gfni(J, n0, n1) : quad_rows_tq2(J, n0, n1);
#else
    (void)J, (void)n0, (void)n1, (void)i8;
    return 0;
#endif
}
