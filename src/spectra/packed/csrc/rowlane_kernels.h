/*
 * Row-lane GEMM on AVX-512 VNNI for ternary weights whose codes also exist as TQ2_0 code bytes interleaved by 16 rows
 * (J->rl; for a TQ1_0 matrix too, which then runs as fast as TQ2_0), and for int8 output rows interleaved alike: the 16
 * lanes of an accumulator are 16 weight rows and one token, so a vpdpbusd multiplies 4 codes of each of 16 rows by
 * the same 4 activation bytes of one token, broadcast to all lanes (one vpbroadcastd for both row groups of a pass;
 * the {1to16} memory operand doubled the loads, about 0.95x). Included by
 * ternary_kernels.c after amx_kernels.h; run_rows calls it before the AMX, lane and quad GEMMs for every product of
 * ROWLANE_MIN_T or more tokens that has the interleaved codes, where the CPU has no AMX (or it is switched off).
 *
 * Why: the quad GEMM (quad_kernels.h) broadcasts 16 code bytes of one row to the four 128-bit lanes, so each decoded
 * field vector holds 16 weights four times and serves one vpdpbusd per group of 4 tokens. The 8 token rows a thread
 * of a split batch step runs (the two parts of a 16-row step, split_parts) are 2 groups, so a code field is decoded
 * for 2 products, and decoding took as many issue slots as the products. Here a decoded vector holds 64 distinct
 * weights (4 of each of 16 rows) and serves one vpdpbusd per token: 8 products per decode at 8 tokens, and no
 * reduction at the end (an accumulator holds the finished sums of 16 rows). Zen 5, one core, 1536 x 512 at 8 tokens
 * from L1 / L2 (a standalone loop of this pass): 94-96 % of vpdpbusd's rate, where the quad GEMM ran 8192 x 512 at 8
 * tokens at 61-65 % (both without the call's fixed costs).
 *
 * - Layout (rowlane_codes; spectra.inference.decode makes it once for models with at most 64 MiB of codes):
 *   for the full groups of 16 rows, rl[((g * nb + b) * 16 + j) * 64 + 4 r + i] = qs[(16 g + r) * nb * 64 + 64 b +
 *   4 j + i]: block b of row group g is 1 KiB, 16 vectors of 4 code bytes of each row. Field l of code byte 4 j + i
 *   meets activation byte 256 b + 64 l + 4 j + i of the TQ2 layout (xq, as every TQ2_0 kernel reads it), so vector j,
 *   field l meets the 4 bytes at 256 b + 64 l + 4 j of each token: one dword, broadcast.
 * - Per pass: RG (1 or 2) groups of 16 rows x TT (1..8) tokens, RG * TT accumulators (16 at most), restarted at every
 *   scale segment. A pass decodes each field once (a shift and an AND; GFNI was no faster in the standalone loop on
 *   Zen 5) for RG * TT products. Int8 rows (the output layer) are used as they are: a group's block is 64 vectors.
 * - Rows outside full groups of 16 (a ragged N, or a chunk edge not on 16) go to the other kernels (run_rows_rest);
 *   run_parallel cuts chunks on multiples of 32 rows where this kernel runs (row_chunks).
 *
 * The integer sums are those of the other kernels (sum c a per segment, exact in int32, then minus the tokens' sum),
 * and the epilogue does the scalar epilogue's float32 operations in the same order (y = 0 + d f, y + d f per further
 * segment, then y * xs), lane by lane, so the outputs are bit-identical to every other path and to the pure-torch
 * reference (tests/test_packed_rowlane.py).
 */

#ifndef ROWLANE_MIN_T
#define ROWLANE_MIN_T 8 /* fewer tokens: the GEMV / tile kernels on the row-major codes */
#endif
#define ROWLANE_ROWS 16      /* rows per interleaved group (the lanes of an accumulator) */
#define ROWLANE_TOK 8        /* tokens per pass */
#define ROWLANE_GROUP_B 1024 /* bytes of one group's block: 16 rows x 64 code bytes */

static int rowlane_min_t = ROWLANE_MIN_T; /* 0: off (set_rowlane) */
#ifndef ROWLANE_PF_BYTES
/* Prefetch distance into L2 past the front of a pass's streams (its last row group). Zen 5, 99M batch-16 step (q8
 * cache): a first version that fetched each stream this far past its own position (TQ2_0 codes only), against the
 * quad GEMM: none 0.85x, 4 KiB 1.03x, 8 KiB 1.06x, 16 KiB 1.06x, 32 KiB 1.03x; for the int8 output layer, whose two
 * 16-row groups' streams are 8 KiB apart at K = 512, 8 KiB from the first stream (the second's front) 1.02x, 8 KiB
 * past the second 1.14-1.16x, hence this form. In this form 4 KiB and 16 KiB against 8 KiB: 0.987x, 0.996x (4/11
 * each, benchmarks/kernel_ab.py -D ROWLANE_PF_BYTES). */
#define ROWLANE_PF_BYTES 8192
#endif

/* The row-lane GEMM is to run this job's full 16-row groups (its activations are then built in the row-lane layout:
 * rowlane_build). */
static inline int rowlane_wanted(int path, const job_t *J) {
#ifdef SPECTRA_X86
    return path == PATH_AVX512VNNI && J->rl && rowlane_min_t > 0 && J->T >= rowlane_min_t && !amx_applies(path, J);
#else
    (void)path, (void)J;
    return 0;
#endif
}

/* ... and can: the activations are ready. */
static inline int rowlane_applies(int path, const job_t *J) { return J->x8 && rowlane_wanted(path, J); }

/* Bytes of the activations of T tokens of K in the row-lane layout (rowlane_build): whole groups of 8 tokens. */
static inline size_t rowlane_x8_bytes(int64_t T, int64_t K) {
    return (size_t)((T + ROWLANE_TOK - 1) / ROWLANE_TOK * ROWLANE_TOK * K);
}

/* Tokens [t0, t1) of xq [T, K] (the TQ2 layout) into x8, the row-lane layout: per group of 8 tokens, dword p of each
 * token in turn, x8 as int32 [T / 8][K / 4][8]. A pass's 8 activation dwords for one weight vector then sit side by
 * side at fixed offsets from one pointer (with a pointer per token the compiler ran out of registers and spilled). */
static void rowlane_build(const int8_t *xq, int64_t K, int8_t *x8, int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; t++) {
        int8_t *out = x8 + (t / ROWLANE_TOK * ROWLANE_TOK * K + t % ROWLANE_TOK * 4);
        const int8_t *in = xq + t * K;
        for (int64_t p = 0; p < K / 4; p++) memcpy(out + p * 4 * ROWLANE_TOK, in + 4 * p, 4);
    }
}

#ifdef SPECTRA_X86

/* The accumulators are named (RL_ACCS), each vpdpbusd written out (DPBUSD_R) and pinned once per block (RL_PIN), for
 * the reason of TILE_ACCS: with an array and the intrinsic, GCC copied accumulators between registers in the inner
 * loop. A token's dword is broadcast into a register once for both row groups (inside each vpdpbusd, {1to16}, the
 * loads doubled: 0.95x on Zen 5). */
#define RL_ACCS(X) X(0, 0) X(0, 1) X(0, 2) X(0, 3) X(0, 4) X(0, 5) X(0, 6) X(0, 7) \
                   X(1, 0) X(1, 1) X(1, 2) X(1, 3) X(1, 4) X(1, 5) X(1, 6) X(1, 7)
#define RL_ZERO(r, t) __m512i a##r##t = _mm512_setzero_si512();
#define RL_PIN()                                        \
    do {                                                \
        PIN8(a00, a01, a02, a03, a04, a05, a06, a07);   \
        PIN8(a10, a11, a12, a13, a14, a15, a16, a17);   \
    } while (0)
/* Token t's dword i of the block (at xb), broadcast, against the weight vectors w0 / w1 of the two row groups. */
#define RL_DP(t, i)                                                                     \
    do {                                                                                \
        if (t < TT) {                                                                   \
            const __m512i x_ = _mm512_set1_epi32(xb[(i) * ROWLANE_TOK + t]);            \
            DPBUSD_R(a0##t, w0, x_);                                                    \
            if (RG > 1) DPBUSD_R(a1##t, w1, x_);                                        \
        }                                                                               \
    } while (0)
/* Segment s's sums of accumulator (r, t) -> y (the scalar epilogue's operations: y = 0 + d f, y + d f, then * xs). */
#define RL_FINISH(r, t)                                                                                     \
    if (r < RG && t < TT) {                                                                                 \
        float *y_ = J->y + (t0 + t) * J->N + ROWLANE_ROWS * (g + r);                                        \
        const __m512i bs_ = _mm512_set1_epi32(J->bsum[(t0 + t) * S + s]);                                  \
        const __m512 v_ = _mm512_mul_ps(dd##r, _mm512_cvtepi32_ps(_mm512_sub_epi32(a##r##t, bs_)));        \
        __m512 o_ = _mm512_add_ps(s == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(y_), v_);                 \
        if (s == S - 1) o_ = _mm512_mul_ps(o_, _mm512_set1_ps(J->xs[t0 + t]));                             \
        _mm512_storeu_ps(y_, o_);                                                                           \
    }

/* The 16 rows' scales of segment s for row group g + r (stride S in seg_d). */
TARGET_AVX512 static inline __m512 rowlane_scales(const job_t *J, int64_t g, int64_t s) {
    float d[ROWLANE_ROWS];
    for (int i = 0; i < ROWLANE_ROWS; i++) d[i] = J->seg_d[(ROWLANE_ROWS * g + i) * J->S + s];
    return _mm512_loadu_ps(d);
}

/* Row groups g .. g+RG-1 (rows 16 g ..) against tokens t0 .. t0+TT-1, every segment: y[t][16 g + ...] written. I8:
 * the rows are int8 bytes (u = w + 128, K a row: a block of a group is 64 vectors, 4 KiB), used as they are; else TQ2_0
 * code bytes (64 a block: 16 vectors, 1 KiB), each vector's 4 fields decoded in turn. */
TARGET_AVX512 static inline __attribute__((always_inline)) void rowlane_pass(const job_t *J, int64_t g, int64_t t0,
                                                                             const int RG, const int TT, const int I8) {
    const int64_t K = J->K, nb = J->nb, S = J->S;
    const int64_t block_b = I8 ? 4 * ROWLANE_GROUP_B : ROWLANE_GROUP_B, group_b = nb * block_b;
    /* prefetch distance: ROWLANE_PF_BYTES past the same place in the pass's last group, the front of its streams */
    const int64_t pf = (RG - 1) * group_b + ROWLANE_PF_BYTES;
    const __m512i m3 = _mm512_set1_epi8(3);
    const int32_t *xt = (const int32_t *)(const void *)(J->x8 + t0 * K); /* t0: a multiple of 8 */
    for (int64_t s = 0; s < S; s++) {
        RL_ACCS(RL_ZERO)
        for (int64_t b = J->bounds[s]; b < J->bounds[s + 1]; b++) {
            const uint8_t *wb = J->rl + g * group_b + b * block_b;
            const int32_t *xb = xt + b * (QK / 4) * ROWLANE_TOK;
            if (I8) {
                for (int c = 0; c < QK / 4; c++) {
                    const uint8_t *p0 = wb + 64 * c, *p1 = p0 + group_b;
                    PREFETCH(p0 + pf);
                    if (RG > 1) PREFETCH(p1 + pf);
                    const __m512i w0 = _mm512_loadu_si512(p0);
                    const __m512i w1 = RG > 1 ? _mm512_loadu_si512(p1) : w0;
                    RL_DP(0, c);
                    RL_DP(1, c);
                    RL_DP(2, c);
                    RL_DP(3, c);
                    RL_DP(4, c);
                    RL_DP(5, c);
                    RL_DP(6, c);
                    RL_DP(7, c);
                }
            } else {
                for (int j = 0; j < 16; j++) {
                    const uint8_t *p0 = wb + 64 * j, *p1 = p0 + group_b;
                    PREFETCH(p0 + pf);
                    if (RG > 1) PREFETCH(p1 + pf);
                    const __m512i raw0 = _mm512_loadu_si512(p0);
                    const __m512i raw1 = RG > 1 ? _mm512_loadu_si512(p1) : raw0;
                    _Pragma("GCC unroll 4")
                    for (int l = 0; l < 4; l++) {
                        const __m512i w0 = _mm512_and_si512(l ? _mm512_srli_epi16(raw0, 2 * l) : raw0, m3);
                        const __m512i w1 =
                            RG > 1 ? _mm512_and_si512(l ? _mm512_srli_epi16(raw1, 2 * l) : raw1, m3) : w0;
                        RL_DP(0, 16 * l + j);
                        RL_DP(1, 16 * l + j);
                        RL_DP(2, 16 * l + j);
                        RL_DP(3, 16 * l + j);
                        RL_DP(4, 16 * l + j);
                        RL_DP(5, 16 * l + j);
                        RL_DP(6, 16 * l + j);
                        RL_DP(7, 16 * l + j);
                    }
                }
            }
            RL_PIN();
        }
        const __m512 dd0 = rowlane_scales(J, g, s), dd1 = RG > 1 ? rowlane_scales(J, g + 1, s) : dd0;
        RL_ACCS(RL_FINISH)
    }
}

#define ROWLANE_TOKENS(RG, I8)                                              \
    do {                                                                    \
        for (int64_t t0 = 0; t0 < J->T; t0 += ROWLANE_TOK) {                \
            switch (J->T - t0 < ROWLANE_TOK ? J->T - t0 : ROWLANE_TOK) {    \
                case 8: rowlane_pass(J, g, t0, RG, 8, I8); break;           \
                case 7: rowlane_pass(J, g, t0, RG, 7, I8); break;           \
                case 6: rowlane_pass(J, g, t0, RG, 6, I8); break;           \
                case 5: rowlane_pass(J, g, t0, RG, 5, I8); break;           \
                case 4: rowlane_pass(J, g, t0, RG, 4, I8); break;           \
                case 3: rowlane_pass(J, g, t0, RG, 3, I8); break;           \
                case 2: rowlane_pass(J, g, t0, RG, 2, I8); break;           \
                default: rowlane_pass(J, g, t0, RG, 1, I8); break;          \
            }                                                               \
        }                                                                   \
    } while (0)

/* Row groups [g0, g1), two at a time, every token: TQ2_0 codes, and int8 rows (the output layer). */
TARGET_AVX512 __attribute__((noinline)) static void rowlane_groups(const job_t *J, int64_t g0, int64_t g1) {
    int64_t g = g0;
    for (; g + 2 <= g1; g += 2) ROWLANE_TOKENS(2, 0);
    if (g < g1) ROWLANE_TOKENS(1, 0);
}

TARGET_AVX512 __attribute__((noinline)) static void rowlane_groups_i8(const job_t *J, int64_t g0, int64_t g1) {
    int64_t g = g0;
    for (; g + 2 <= g1; g += 2) ROWLANE_TOKENS(2, 1);
    if (g < g1) ROWLANE_TOKENS(1, 1);
}
#endif /* SPECTRA_X86 */

/* The full 16-row groups inside [n0, n1) of a job rowlane_applies to (i8: int8 rows, run_rows_i8); the rows before
 * the first and after the last (*lo_end = first row of the groups, *hi_start = the row after them) are the caller's.
 * 0 when no full group fits. */
static int rowlane_run_rows(const job_t *J, int64_t n0, int64_t n1, int i8, int64_t *lo_end, int64_t *hi_start) {
#ifdef SPECTRA_X86
    const int64_t g0 = (n0 + ROWLANE_ROWS - 1) / ROWLANE_ROWS, g1 = n1 / ROWLANE_ROWS;
    if (g0 >= g1) return 0;
    if (i8) rowlane_groups_i8(J, g0, g1);
    else rowlane_groups(J, g0, g1);
    *lo_end = g0 * ROWLANE_ROWS, *hi_start = g1 * ROWLANE_ROWS;
    return 1;
#else
    (void)J, (void)n0, (void)n1, (void)i8, (void)lo_end, (void)hi_start;
    return 0;
#endif
}
