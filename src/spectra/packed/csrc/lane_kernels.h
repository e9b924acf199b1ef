/*
 * Token-lane GEMM for TQ2_0 and TQ1_0 weights on AVX-512 VNNI, and the code it shares with the AMX GEMM
 * (amx_kernels.h): weight panels with one code byte per weight, activations in the VNNI layout, 16 x 16 stores.
 * Included by ternary_kernels.c after tq1_kernels.h; run_rows calls lane_rows where the CPU has no AMX (or it is
 * switched off) for lane_from(J) or more tokens: LANE_MIN_T for TQ1_0, and for TQ2_0 from where the quad GEMM
 * (quad_kernels.h) stops being faster, 128 tokens for K < 1024 and 256 from K = 1024.
 *
 * The 4 x 4 tiles of gemm_avx512 hold one accumulator per (row, token) whose 16 lanes are partial sums over K, so
 * every tile ends in a 16-way horizontal reduction (hsum16x16) per scale segment. Here the 16 lanes of an accumulator
 * are 16 tokens instead: vpdpbusd multiplies one row's four codes, broadcast from the panel, by four activations of
 * each of 16 tokens (the VNNI layout below), so an accumulator ends holding the finished sums of one row for 16
 * tokens, and the epilogue is 16 lanes of float work per row and a 16 x 16 transpose per 16 rows. This is the AMX
 * tile product, C[m][n] += sum_k A[m][k] B[k/4][4n + k%4], done by vpdpbusd: both kernels issue one vpdpbusd per 64
 * products, the lanes save the reductions and the tiles' repeated unpacking. Measured (benchmarks/lane_gemm.py,
 * README): TriLM-1.1B prefill 1.32x / 1.20x on 1 / 2 threads of an Intel Xeon with AMX off; on Zen 4 1.2-1.3x for
 * the 99M's K = 512 matrices and within noise at 1.1B shapes. No gain at 16 tokens (one token group: the panel decode
 * is shared by fewer products), hence LANE_MIN_T; slower for the int8 output layer, whose rows the tiles read in
 * place (a panel copy cost more than the reductions saved), so int8 weights keep the tiles.
 *
 * - Panels (panel_decode_tq2 / _tq1): PANEL_ROWS weight rows, PANEL_SLICE blocks at a time, decoded to one code byte
 *   c in {0,1,2} per weight: [chunk][PANEL_ROWS][64]. A "chunk" is 64 activation bytes of the kernels' layout: 4 per
 *   block (field l of a TQ2_0 block's 64 code bytes meets bytes 64l .. 64l+63 of the block's permuted activations;
 *   a TQ1_0 block's codes are moved to the lanes of the activations they meet, tq1_tq2_chunks), so both formats
 *   run the same products on the same activations. (TQ1_0 panels were 5 chunks a block, code n of the 52 code bytes
 *   against plane n of the TQ1 activations, 12 lanes of each empty: 5/4 of the products; TriLM-1.1B prefill of 128
 *   tokens 1.20x / 1.18x faster on 1 / 2 threads of Zen 5 with 4.)
 * - Activations (xt_build): 16 tokens x one chunk in the VNNI layout, B[r][4n + j] = a[token n][64 chunk + 4r + j],
 *   [T/16][chunk][16][64], built once per call for all tokens (padded with zero tokens to a multiple of 16).
 * - Per pass, 16 rows x 16 tokens: 16 accumulators, restarted at every scale segment, saved between panel slices.
 *
 * The integer sums are those of the other kernels, sum c a per segment, exact in int32, and the epilogue does the
 * scalar epilogue's float32 operations in the same order, lane by lane, so the outputs are bit-identical to every
 * other path and to the pure-torch reference.
 */

#ifndef LANE_MIN_T
#define LANE_MIN_T 32 /* fewer tokens: the GEMV / 4 x 4 tile kernels (set_lane; benchmarks/lane_gemm.py) */
#endif
#define PANEL_ROWS 32 /* weight rows per panel: 2 passes of 16 here, 2 A tiles for AMX */
#define LANE_TOK 16   /* tokens per accumulator (and per AMX B tile) */
#ifndef PANEL_SLICE
#define PANEL_SLICE 2 /* blocks per panel slice: 32 rows x 2 blocks of codes = 16 KiB (TQ2_0), 20 KiB (TQ1_0), in L1 */
#endif

static int lane_min_t = LANE_MIN_T; /* 0: off (set_lane) */

/* Where TQ2_0 products pass from the quad GEMM (quad_kernels.h, from quad_min_t tokens) to the lanes: measured on
 * Zen 4 (one thread, alternating rounds), quad against lanes at 32 tokens 1.01-1.03x for K = 512 and 1.09x for the
 * 1.1B's matrices; at 128 0.97-0.99x for K = 512, 1.02x for K = 1792 and 5120; at 512 0.93-1.01x. */
#ifndef QUAD_MIN_T
#define QUAD_MIN_T 8 /* fewer tokens: the tiles (or the GEMV kernels) */
#endif
static int quad_min_t = QUAD_MIN_T; /* 0: off (set_quad) */

static inline int64_t lane_from(const job_t *J) {
    const int64_t quad_to = J->fmt == FMT_TQ2 && quad_min_t > 0 ? (J->K >= 1024 ? 256 : 128) : 0;
    return lane_min_t > quad_to ? lane_min_t : quad_to;
}

/* Chunks per block of a panel, for both formats (TQ1_0 panels take TQ2_0's chunks, tq1_tq2_chunks). */
#define PANEL_CPB 4

static inline int lane_applies(int path, const job_t *J) {
    if (path != PATH_AVX512VNNI || lane_min_t <= 0 || J->T < lane_from(J)) return 0;
#ifdef SPECTRA_X86
    if (J->fmt == FMT_TQ1 && !tq1_has_vbmi()) return 0;
    return 1;
#else
    return 0;
#endif
}

/* Bytes of a job's activations in the VNNI layout. */
static inline size_t xt_bytes_for(const job_t *J) {
    return (size_t)(((J->T + LANE_TOK - 1) / LANE_TOK) * LANE_TOK * J->nb * PANEL_CPB * 64);
}

static void *panel_get(size_t need) { /* per thread, apart from scratch_get's (the caller's thread runs rows too) */
    static _Thread_local void *panel = NULL;
    static _Thread_local size_t size = 0;
    return grow_buffer(&panel, &size, need);
}

#ifdef SPECTRA_X86
/* A panel reads its 32 rows a slice at a time: 32 streams, too many for the hardware prefetchers. Each block decoded
 * fetches the block PANEL_AHEAD slices later in its row or, past the row's end, in the same row of the next panel (or
 * the one after, for rows shorter than the distance). A stray prefetch past the matrix is harmless (it never faults).
 * The fetch goes to L2: between two slices 16 token groups stream up to 64 KiB of activations through L1, which
 * evicted lines fetched into L1, and the panel decode then waited on its loads. Likewise lane_rows fetches the output
 * lines a panel's store16 calls will write (T x 128 bytes) into L2 when the panel starts. On Zen 4
 * (benchmarks/kernel_ab.py, TriLM-1.1B prompt of 128, 1 thread) L1 and 2 slices ahead -> L2 and 6: 1.015x (8/9
 * rounds); with the output lines too: 1.027x (9/9). */
#ifndef PANEL_AHEAD
#define PANEL_AHEAD 6
#endif
#ifndef PANEL_HINT
#define PANEL_HINT _MM_HINT_T1
#endif
#ifndef LANE_Y_PREFETCH
#define LANE_Y_PREFETCH 1
#endif
/* The output lines of weight rows n .. n+31 for every token (T x 128 bytes) into L2: a panel's stores at its end
 * (lane_rows, and amx_rows / amx_tm_rows in amx_kernels.h). */
static inline void prefetch_y_lines(const job_t *J, int64_t n) {
    for (int64_t t = 0; t < J->T; t++) {
        _mm_prefetch((const char *)(J->y + t * J->N + n), _MM_HINT_T1);
        _mm_prefetch((const char *)(J->y + t * J->N + n + 16), _MM_HINT_T1);
    }
}
/* Where the decode of block b (of the slice starting at b0) prefetches, as a byte offset from the start of its row:
 * the block PANEL_AHEAD slices later in the row, or past the row's end that many blocks on in the rows of the next
 * panels (rows are rowb bytes apart, PANEL_ROWS to a panel; a row's blocks are `bytes` apart). Computed once per
 * slice: the loop that walked the distance across rows for every block decoded (six steps for a 512-wide matrix)
 * cost more than the decode itself; 99m's 1536 x 512 product of 8 tokens on AMX, one thread, cache-resident: 23.9 ->
 * 17.0 us. */
static inline void panel_prefetch_offsets(int64_t b0, int64_t b1, int64_t nb, int64_t rowb, int64_t bytes,
                                          int64_t off[PANEL_SLICE]) {
    for (int64_t b = b0; b < b1; b++) {
        const int64_t ahead = b + PANEL_AHEAD * PANEL_SLICE;
        off[b - b0] = ahead / nb * PANEL_ROWS * rowb + ahead % nb * bytes;
    }
}

/* Rows n .. n+31 (zeros past n1), blocks [b0, b1) -> panel [chunk - 4 b0][32][64] of codes. TQ2_0: field l of a
 * block's 64 code bytes is its chunk l. */
TARGET_AVX512 static void panel_decode_tq2(const job_t *J, int64_t n, int64_t n1, int64_t b0, int64_t b1,
                                           uint8_t *panel) {
    const __m512i m3 = _mm512_set1_epi8(3);
    const int64_t rowb = J->nb * QB;
    int64_t pf[PANEL_SLICE];
    panel_prefetch_offsets(b0, b1, J->nb, rowb, QB, pf);
    for (int m = 0; m < PANEL_ROWS; m++) {
        if (n + m >= n1) {
            for (int64_t c = 0; c < (b1 - b0) * PANEL_CPB; c++)
                _mm512_store_si512(panel + (c * PANEL_ROWS + m) * 64, _mm512_setzero_si512());
            continue;
        }
        const uint8_t *w = J->qs + (n + m) * rowb;
        for (int64_t b = b0; b < b1; b++) {
            _mm_prefetch((const char *)w + pf[b - b0], PANEL_HINT);
            const __m512i v = _mm512_loadu_si512(w + b * QB);
            uint8_t *p = panel + (PANEL_CPB * (b - b0) * PANEL_ROWS + m) * 64;
            _mm512_store_si512(p, _mm512_and_si512(v, m3));
            _mm512_store_si512(p + PANEL_ROWS * 64, _mm512_and_si512(_mm512_srli_epi16(v, 2), m3));
            _mm512_store_si512(p + 2 * PANEL_ROWS * 64, _mm512_and_si512(_mm512_srli_epi16(v, 4), m3));
            _mm512_store_si512(p + 3 * PANEL_ROWS * 64, _mm512_and_si512(_mm512_srli_epi16(v, 6), m3));
        }
    }
}

/* The same for TQ1_0, in TQ2_0's chunks (tq1_tq2_chunks, tq1_kernels.h), so that both formats run the same products
 * on the same activations. */
TARGET_AVX512_VBMI static void panel_decode_tq1(const job_t *J, int64_t n, int64_t n1, int64_t b0, int64_t b1,
                                                uint8_t *panel) {
    const tq1_tables_t L = tq1_tables_load();
    const tq1_tq2_index_t X = tq1_tq2_index();
    const int64_t rowb = J->nb * TQ1_CB;
    int64_t pf[PANEL_SLICE];
    panel_prefetch_offsets(b0, b1, J->nb, rowb, TQ1_QS, pf); /* along the row's qs run */
    for (int m = 0; m < PANEL_ROWS; m++) {
        if (n + m >= n1) {
            for (int64_t c = 0; c < (b1 - b0) * PANEL_CPB; c++)
                _mm512_store_si512(panel + (c * PANEL_ROWS + m) * 64, _mm512_setzero_si512());
            continue;
        }
        const uint8_t *w = J->qs + (n + m) * rowb;
        for (int64_t b = b0; b < b1; b++) {
            _mm_prefetch((const char *)w + pf[b - b0], PANEL_HINT);
            _mm_prefetch((const char *)w + pf[b - b0] + TQ1_QS - 1, PANEL_HINT);
            __m512i fa, fb, c[4];
            tq1_decode(w, J->nb, b, &L, &fa, &fb);
            tq1_tq2_chunks(fa, fb, &X, c);
            uint8_t *p = panel + (PANEL_CPB * (b - b0) * PANEL_ROWS + m) * 64;
            for (int l = 0; l < 4; l++) _mm512_store_si512(p + l * PANEL_ROWS * 64, c[l]);
        }
    }
}

static void panel_decode(const job_t *J, int64_t n, int64_t n1, int64_t b0, int64_t b1, uint8_t *panel) {
    if (J->fmt == FMT_TQ1) panel_decode_tq1(J, n, n1, b0, b1, panel);
    else panel_decode_tq2(J, n, n1, b0, b1, panel);
}

/* In place: r[k] lane m becomes r[m] lane k (a 16 x 16 transpose of floats; only moves, so values are unchanged). */
TARGET_AVX512 static inline void transpose16_ps(__m512 *r) {
    __m512 t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* u[4i + j]: rows 4i..4i+3, column j (+4, +8, +12 in the other 128-bit lanes) */
        u[4 * i] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0x44);
        u[4 * i + 1] = _mm512_shuffle_ps(t[4 * i], t[4 * i + 2], 0xee);
        u[4 * i + 2] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0x44);
        u[4 * i + 3] = _mm512_shuffle_ps(t[4 * i + 1], t[4 * i + 3], 0xee);
    }
    for (int j = 0; j < 4; j++) {
        const __m512 v0 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88), v1 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xdd);
        const __m512 v2 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88);
        const __m512 v3 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xdd);
        r[j] = _mm512_shuffle_f32x4(v0, v2, 0x88);
        r[j + 8] = _mm512_shuffle_f32x4(v0, v2, 0xdd);
        r[j + 4] = _mm512_shuffle_f32x4(v1, v3, 0x88);
        r[j + 12] = _mm512_shuffle_f32x4(v1, v3, 0xdd);
    }
}

/* xq [T, nb * cpb * 64] (the kernels' layout for the format) -> xt [T/16][chunk][16][64]: per chunk and token group a
 * 16 x 16 transpose of 4-byte groups (transpose16_ps only moves bits); missing tokens are zero. xt_build_group does
 * token group g (tokens 16g .. 16g+15) alone. */
TARGET_AVX512 static void xt_build_group(const job_t *J, const int8_t *xq, int8_t *xt, int64_t g) {
    const int64_t nc = J->nb * PANEL_CPB, row = nc * 64;
    for (int64_t c = 0; c < nc; c++) {
        __m512 r[16];
        for (int n = 0; n < LANE_TOK; n++) {
            const int64_t t = g * LANE_TOK + n;
            r[n] = t < J->T ? _mm512_castsi512_ps(_mm512_loadu_si512(xq + t * row + c * 64)) : _mm512_setzero_ps();
        }
        transpose16_ps(r);
        for (int k = 0; k < 16; k++) _mm512_storeu_ps((float *)(void *)(xt + (g * nc + c) * 1024 + 64 * k), r[k]);
    }
}

TARGET_AVX512 static void xt_build(const job_t *J, const int8_t *xq, int8_t *xt) {
    for (int64_t g = 0; g < (J->T + LANE_TOK - 1) / LANE_TOK; g++) xt_build_group(J, xq, xt, g);
}

/* Lanes of the tokens t0 .. t0+15 that exist (< T). */
static inline __mmask16 token_mask(const job_t *J, int64_t t0) {
    return (__mmask16)(J->T - t0 >= 16 ? 0xffff : (1u << (J->T - t0)) - 1);
}

/* Lane k of bs: token t0 + k's activation sum over segment s (0 for tokens past T). */
TARGET_AVX512 static inline __m512i token_sums(const job_t *J, int64_t t0, int64_t s) {
    if (J->S == 1) return _mm512_maskz_loadu_epi32(token_mask(J, t0), J->bsum + t0);
    int32_t tmp[16] = {0};
    for (int k = 0; k < 16 && t0 + k < J->T; k++) tmp[k] = J->bsum[(t0 + k) * J->S + s];
    return _mm512_loadu_si512(tmp);
}

/* yp[16] += d * f(acc - bs) for weight row `row` and segment s, lane by lane the scalar epilogue's float32
 * operations (acc: the row's integer sums for 16 tokens, bs: token_sums). At s = 0 the sum starts from 0 in a
 * register, so yp needs no zeroing first. */
TARGET_AVX512 static inline void finish_row(const job_t *J, float *yp, __m512i acc, __m512i bs, int64_t row,
                                            int64_t s) {
    const __m512 d = _mm512_set1_ps(J->seg_d[row * J->S + s]);
    const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, bs));
    const __m512 y = s ? _mm512_load_ps(yp) : _mm512_setzero_ps(); /* the first segment starts from 0 (not stored) */
    _mm512_store_ps(yp, _mm512_add_ps(y, _mm512_mul_ps(d, v)));
}

/* yv [16 rows][16 tokens] (rows n.., tokens t0..) times the activation scales into y: each token's 16 rows as one
 * 64-byte store after a 16 x 16 transpose (scattering a row's 16 tokens touched 16 lines N floats apart, which for N a
 * multiple of 1024 all fall in one L1 set). */
TARGET_AVX512 static void store16(const job_t *J, const float *yv, int64_t n, int64_t n1, int64_t t0) {
    const __m512 xs = _mm512_maskz_loadu_ps(token_mask(J, t0), J->xs + t0);
    const __mmask16 rows = (__mmask16)(n1 - n >= 16 ? 0xffff : (1u << (n1 - n)) - 1);
    __m512 r[16];
    for (int m = 0; m < 16; m++) r[m] = _mm512_mul_ps(_mm512_load_ps(yv + m * LANE_TOK), xs);
    transpose16_ps(r);
    for (int k = 0; k < 16 && t0 + k < J->T; k++) _mm512_mask_storeu_ps(J->y + (t0 + k) * J->N + n, rows, r[k]);
}

/* acc += vpdpbusd(the 4 code bytes at p broadcast to every lane, b), written out for the reason DPBUSD is: with the
 * intrinsics GCC 12 copied every accumulator to another register and back at each step. */
#define LANE_DP(acc, p, b)                                                                                        \
    do {                                                                                                        \
        __m512i w_;                                                                                             \
        __asm__("vpbroadcastd %2, %1\n\tvpdpbusd %3, %1, %0"                                                   \
                : "+v"(acc), "=&v"(w_)                                                                          \
                : "m"(*(const int32_t *)(const void *)(p)), "v"(b));                                            \
    } while (0)

/* 16 rows of a panel slice (row m's chunk c at a + (c - c0) * PANEL_ROWS * 64 + 64 m) x the 16 tokens of group tg,
 * chunks [c0, c1) of segment s. The accumulators start at zero (first slice of the segment) or from cacc [16 rows][16
 * tokens]; they are saved there or, at the segment's last slice, finished into yv [16][16]: yv += d * f(acc - bsum),
 * lane by lane the scalar epilogue's float32 operations, for the live rows (< n1). The accumulators are 16 named
 * variables and every address a constant offset from one pointer: with an array GCC 12 kept them on the stack. */
#define LANE_ROWS16(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15)
TARGET_AVX512 static void lane_step(const job_t *J, const uint8_t *a, int64_t c0, int64_t c1, int64_t s, int first,
                                    int last, int64_t n, int64_t n1, int64_t tg, int32_t *cacc, float *yv) {
    const int64_t nc = J->nb * PANEL_CPB;
    const int8_t *x = J->xt + tg * nc * 1024;
#define LANE_INIT(m) __m512i a##m = first ? _mm512_setzero_si512() : _mm512_load_si512(cacc + 16 * m);
    LANE_ROWS16(LANE_INIT)
    for (int64_t c = c0; c < c1; c++) {
        const uint8_t *ac = a + (c - c0) * PANEL_ROWS * 64;
        const int8_t *xc = x + c * 1024;
        _Pragma("GCC unroll 16")
        for (int r = 0; r < 16; r++) {
            const __m512i b = _mm512_loadu_si512(xc + 64 * r);
#define LANE_ROW(m) LANE_DP(a##m, ac + 64 * m + 4 * r, b);
            LANE_ROWS16(LANE_ROW)
        }
    }
    if (!last) {
#define LANE_SAVE(m) _mm512_store_si512(cacc + 16 * m, a##m);
        LANE_ROWS16(LANE_SAVE)
        return;
    }
    const __m512i acc[16] = {a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15};
    const __m512i bs = token_sums(J, tg * LANE_TOK, s);
    for (int m = 0; m < 16 && n + m < n1; m++) finish_row(J, yv + 16 * m, acc[m], bs, n + m, s);
}

/* Rows [n0, n1) for all tokens; returns 0 (nothing done) when the buffers cannot be allocated. Per panel of 32 rows
 * and scale segment, the weights are decoded PANEL_SLICE blocks at a time into an L1-sized slice that
 * every token group and both 16-row halves then read; accumulators wait in cacc between slices. */
TARGET_AVX512 static int lane_rows(const job_t *J, int64_t n0, int64_t n1) {
    const int64_t cpb = PANEL_CPB, G = (J->T + LANE_TOK - 1) / LANE_TOK;
    const size_t panel_bytes = (size_t)(PANEL_SLICE * cpb * PANEL_ROWS * 64), part = 16 * LANE_TOK;
    uint8_t *panel = (uint8_t *)panel_get(panel_bytes + 2 * sizeof(int32_t) * 2 * (size_t)G * part);
    if (!panel) return 0;
    int32_t *cacc = (int32_t *)(void *)(panel + panel_bytes);
    float *yv = (float *)(void *)(cacc + 2 * G * part);
    for (int64_t n = n0; n < n1; n += PANEL_ROWS) {
        const int halves = n1 - n > 16 ? 2 : 1;
#if LANE_Y_PREFETCH
        prefetch_y_lines(J, n); /* the output lines store16 writes at the panel's end */
#endif
        for (int64_t s = 0; s < J->S; s++)
            for (int64_t b0 = J->bounds[s]; b0 < J->bounds[s + 1]; b0 += PANEL_SLICE) {
                const int64_t b1 = b0 + PANEL_SLICE < J->bounds[s + 1] ? b0 + PANEL_SLICE : J->bounds[s + 1];
                panel_decode(J, n, n1, b0, b1, panel);
                const int first = b0 == J->bounds[s], last = b1 == J->bounds[s + 1];
                for (int64_t g = 0; g < G; g++)
                    for (int h = 0; h < halves; h++) {
                        const int64_t i = (2 * g + h) * (int64_t)part;
                        lane_step(J, panel + 16 * h * 64, b0 * cpb, b1 * cpb, s, first, last, n + 16 * h, n1, g,
                                  cacc + i, yv + i);
                    }
            }
        for (int64_t g = 0; g < G; g++)
            for (int h = 0; h < halves; h++) store16(J, yv + (2 * g + h) * part, n + 16 * h, n1, g * LANE_TOK);
    }
    return 1;
}
#else
/* Never called without SPECTRA_X86 (vnni_xt_bytes is 0 there); defined so that the callers compile everywhere. */
static void xt_build_group(const job_t *J, const int8_t *xq, int8_t *xt, int64_t g) { (void)J, (void)xq, (void)xt, (void)g; }
static void xt_build(const job_t *J, const int8_t *xq, int8_t *xt) { (void)J, (void)xq, (void)xt; }
#endif /* SPECTRA_X86 */

/* Run the token-lane GEMM on rows [n0, n1) if it applies and the activations were prepared (J->xt); 1 when done. */
static int lane_run_rows(int path, const job_t *J, int64_t n0, int64_t n1) {
#ifdef SPECTRA_X86
    if (J->xt && lane_applies(path, J)) return lane_rows(J, n0, n1);
#else
    (void)path, (void)J, (void)n0, (void)n1;
#endif
    return 0;
}
