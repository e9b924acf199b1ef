/*
 * AMX-INT8 GEMM for TQ2_0, TQ1_0 and int8 weights (Intel Sapphire Rapids and later). Included by ternary_kernels.c
 * after lane_kernels.h, whose weight panels, VNNI-layout activations (xt_build) and 16 x 16 stores it uses;
 * run_rows / run_rows_i8 call amx_rows / amx_i8_rows for AMX_MIN_T or more tokens when amx_ready(), or the
 * token-major GEMM (amx_tm_rows / amx_i8_tm_rows, below) where the weights come with their row-lane copy or, for
 * TQ2_0 codes, from amx_tm_min_t tokens.
 *
 * The integer sums are those of the AVX-512 kernels, sum c a per scale segment, only computed by the tile unit:
 * TDPBUSD C[m][n] += sum_k A[m][k] B[k/4][4n + k%4] with A unsigned (the codes c in {0,1,2}, one byte each) and B
 * signed (the int8 activations). Integer sums are exact, so the float epilogue (the scalar one, same operations in the
 * same order) gives outputs bit-identical to the other paths and to the pure-torch reference.
 * - A tiles: 16 weight rows x one chunk of a panel slice (lane_kernels.h), reused for every token.
 * - B tiles: 16 tokens x one chunk of the VNNI-layout activations.
 * - Per pass 32 rows x 32 tokens: 2 A tiles x 2 B tiles -> 4 C tiles (int32 16 x 16), restarted at every segment
 *   (fewer at the ragged ends: one A tile for the last <= 16 rows of a range, one B tile for an odd token group).
 * Lanes never overflow: |C| <= 2 * 127 * K < 2^31.
 *
 * Linux hands out the tile registers only after arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) (amx_ready, once,
 * at import); each call loads the tile configuration on its own thread and releases it at the end.
 */

#ifndef AMX_MIN_T
#define AMX_MIN_T 5 /* fewer tokens: the GEMV kernels (one weight read, no tile overhead) */
#endif
/* amx_rows fetches the output lines a panel's amx_store writes (T x 128 bytes) into L2 when the panel starts, as
 * lane_rows does (LANE_Y_PREFETCH). Xeon with AMX, TriLM-99M, 2 threads, q8 cache (benchmarks/kernel_ab.py, builds
 * alternating in one process): a step of 12 decode rows and 4 prompt chunks of 32 (`--batch 12 --chunks 4`) 1.029x
 * [1.004-1.048] (9/9 rounds); a prompt of 128 1.037x (10/11); 16 decode rows 1.016x [0.927-1.169] (8/15). */
#ifndef AMX_Y_PREFETCH
#define AMX_Y_PREFETCH 1
#endif
#define AMX_PF_LINES (PANEL_ROWS / 2) /* int8 weights: a panel of K bytes a row is K / 2 lines, K / 64 chunks */

static int amx_on = -1; /* -1: not probed; 0: unavailable or switched off (set_amx); 1: in use */
static int amx_avail = 0;

#if defined(SPECTRA_X86) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define SPECTRA_AMX 1
#define TARGET_AMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512vnni")))
#define TARGET_AMX_VBMI __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")))
#endif

/* Probe once (CPU flags AMX-TILE and AMX-INT8, then the kernel's permission); called from PyInit, single-threaded. */
static int amx_ready(void) {
    if (amx_on < 0) {
        amx_on = 0;
#ifdef SPECTRA_AMX
        unsigned a, b, c, d;
        if (__get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 24 & 1) && (d >> 25 & 1) &&
            __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni") &&
            syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                                       18 /* XFEATURE_XTILEDATA */) == 0)
            amx_avail = amx_on = 1;
#endif
    }
    return amx_on;
}

#ifndef AMX_TM_MIN_T
#define AMX_TM_MIN_T 64
#endif
static int amx_tm_min_t = AMX_TM_MIN_T; /* without the row-lane copy; 0: the token-major GEMM off (set_amx_tm) */
/* With the row-lane copy (a TQ2_0 matrix, or int8 rows: their jobs' fmt is 0 too), the token-major GEMM takes
 * products from this many tokens, where the others start at AMX_MIN_T (and a batched step's rows split into parts of
 * this many, split_parts). TriLM-99M, q8 cache, 2 threads, against AMX_MIN_T (benchmarks/kernel_ab.py): steps of 2 /
 * 3 / 4 / 8 rows 1.024x (8/9) / 1.125x (9/9) / 1.187x (9/9) / 1.025x (6/9). */
#ifndef AMX_TM_RL_MIN_T
#define AMX_TM_RL_MIN_T 2
#endif

/* The fewest tokens AMX takes for job J (AMX_MIN_T where AMX is off: the split's parts keep their minimum there). */
static inline int64_t amx_min_t(const job_t *J) {
    return J->rl && J->fmt == FMT_TQ2 && amx_tm_min_t > 0 && amx_on == 1 ? AMX_TM_RL_MIN_T : AMX_MIN_T;
}

static inline int amx_applies(int path, const job_t *J) {
    if (path != PATH_AVX512VNNI || J->T < amx_min_t(J) || amx_ready() != 1) return 0;
#ifdef SPECTRA_X86
    if (J->fmt == FMT_TQ1 && !tq1_has_vbmi()) return 0;
#endif
    return 1;
}

#ifdef SPECTRA_AMX
typedef struct {
    uint8_t palette, start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_cfg_t;

/* Tiles 0-7 as 16 rows of 64 bytes, on this thread (amx_configure_rows: the C tiles 0-3 and the token-major GEMM's
 * A tiles 6-7 of c_rows rows, for a product of fewer than 16 tokens). ldtilecfg in asm with the whole configuration
 * as its operand: GCC 12 drops the stores that fill the configuration before `_tile_loadconfig` where the function
 * goes on past it (the rows and widths were left unset, and ldtilecfg faulted), as if the intrinsic read only its
 * first bytes. */
TARGET_AMX static inline void amx_configure_rows(int c_rows) {
    amx_cfg_t cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.palette = 1;
    for (int i = 0; i < 8; i++) cfg.colsb[i] = 64, cfg.rows[i] = 16;
    for (int i = 0; i < 4; i++) cfg.rows[i] = (uint8_t)c_rows; /* C tiles */
    cfg.rows[6] = cfg.rows[7] = (uint8_t)c_rows;               /* the token-major GEMM's A tiles */
    __asm__ volatile("ldtilecfg %0" : : "m"(cfg));
}

TARGET_AMX static inline void amx_configure(void) { amx_configure_rows(16); }

/* The C tiles of a pass: 0 and 1 for a panel's weight rows 0-15 and 16-31 (nr of them), 2 and 3 the same for the
 * second token group (ntg == 2), each 1 KiB apart in cacc. amx_c_begin zeroes them (first) or loads them from cacc;
 * amx_c_save stores them there. */
TARGET_AMX static inline __attribute__((always_inline)) void amx_c_begin(int first, const int nr, const int ntg,
                                                                         const int32_t *cacc) {
    if (first) {
        _tile_zero(0);
        if (nr == 2) _tile_zero(1);
        if (ntg == 2) _tile_zero(2);
        if (ntg == 2 && nr == 2) _tile_zero(3);
    } else {
        _tile_loadd(0, cacc, 64);
        if (nr == 2) _tile_loadd(1, cacc + 256, 64);
        if (ntg == 2) _tile_loadd(2, cacc + 512, 64);
        if (ntg == 2 && nr == 2) _tile_loadd(3, cacc + 768, 64);
    }
}

TARGET_AMX static inline __attribute__((always_inline)) void amx_c_save(const int nr, const int ntg, int32_t *cacc) {
    _tile_stored(0, cacc, 64);
    if (nr == 2) _tile_stored(1, cacc + 256, 64);
    if (ntg == 2) _tile_stored(2, cacc + 512, 64);
    if (ntg == 2 && nr == 2) _tile_stored(3, cacc + 768, 64);
}

/* One panel slice, chunks [c0, c1) of segment s (chunk c's 16 * nat weight rows at abase + (c - c0) * cstep, astride
 * bytes apart), against token groups tg, tg + 1 (ntg of them). C starts at zero (first slice of the segment) or from
 * cacc; it is saved to cacc or, at the segment's last slice, finished into yv [ntg][32 rows][16 tokens] by the vector
 * epilogue: lane by lane the scalar epilogue's float32 operations. pf (int8 weights read from memory; NULL for the
 * decoded panels in L1): the next panel's bytes, AMX_PF_LINES lines of them prefetched with each chunk. */
TARGET_AMX static inline __attribute__((always_inline)) void amx_step(const job_t *J, const uint8_t *abase,
                                                                      int64_t astride, int64_t cstep,
                                                                      int64_t c0, int64_t c1, int64_t s, int first,
                                                                      int last, int64_t n, int64_t n1, int64_t tg,
                                                                      const int ntg, const int nat, int32_t *cacc,
                                                                      float *yv, const uint8_t *pf) {
    const int64_t nc = J->nb * PANEL_CPB;
    const int8_t *x0 = J->xt + tg * nc * 1024, *x1 = x0 + nc * 1024;
    amx_c_begin(first, nat, ntg, cacc);
    for (int64_t c = c0; c < c1; c++) {
        const uint8_t *a = abase + (c - c0) * cstep;
        if (pf)
            for (int l = 0; l < AMX_PF_LINES; l++)
                _mm_prefetch((const char *)(pf + (c * AMX_PF_LINES + l) * 64), _MM_HINT_T0);
        _tile_loadd(4, a, astride);
        if (nat == 2) _tile_loadd(5, a + 16 * astride, astride);
        _tile_loadd(6, x0 + c * 1024, 64);
        _tile_dpbusd(0, 4, 6);
        if (nat == 2) _tile_dpbusd(1, 5, 6);
        if (ntg == 2) {
            _tile_loadd(7, x1 + c * 1024, 64);
            _tile_dpbusd(2, 4, 7);
            if (nat == 2) _tile_dpbusd(3, 5, 7);
        }
    }
    amx_c_save(nat, ntg, cacc); /* cacc [ntg][32 rows][16 tokens] */
    if (!last) return;
    for (int g = 0; g < ntg; g++) {
        const __m512i bs = token_sums(J, (tg + g) * LANE_TOK, s);
        for (int m = 0; m < 16 * nat && n + m < n1; m++)
            finish_row(J, yv + (g * PANEL_ROWS + m) * LANE_TOK, _mm512_load_si512(cacc + (g * PANEL_ROWS + m) * 16), bs,
                       n + m, s);
    }
}

/* y for the panel's rows and token groups tg, tg + 1 (yv as in amx_step), 16 rows x 16 tokens at a time (store16). */
TARGET_AMX static void amx_store(const job_t *J, const float *yv, int64_t n, int64_t n1, int64_t tg) {
    for (int g = 0; g < 2 && (tg + g) * LANE_TOK < J->T; g++)
        for (int h = 0; h < 2 && n + 16 * h < n1; h++)
            store16(J, yv + (g * PANEL_ROWS + 16 * h) * LANE_TOK, n + 16 * h, n1, (tg + g) * LANE_TOK);
}

/* Rows [n0, n1) for all tokens; returns 0 (nothing done) when the buffers cannot be allocated. Per panel of 32 rows
 * and scale segment, the weights are decoded PANEL_SLICE blocks at a time into an L1-sized panel slice that every token
 * group then reads; the C tiles of each pair of token groups wait in cacc between slices. */
TARGET_AMX static int amx_rows(const job_t *J, int64_t n0, int64_t n1) {
    const int64_t cpb = PANEL_CPB, G = (J->T + LANE_TOK - 1) / LANE_TOK, P = (G + 1) / 2;
    const size_t panel_bytes = (size_t)(PANEL_SLICE * cpb * PANEL_ROWS * 64);
    const size_t pair_bytes = 2 * PANEL_ROWS * LANE_TOK * 4;
    uint8_t *panel = (uint8_t *)panel_get(panel_bytes + 2 * (size_t)P * pair_bytes);
    if (!panel) return 0;
    int32_t *cacc = (int32_t *)(void *)(panel + panel_bytes);
    float *yv = (float *)(void *)(panel + panel_bytes + (size_t)P * pair_bytes);
    const int64_t pair_words = (int64_t)(pair_bytes / 4);
    amx_configure();
    for (int64_t n = n0; n < n1; n += PANEL_ROWS) {
        const int two = n1 - n > 16; /* else the last rows of a range: one A tile */
#if AMX_Y_PREFETCH
        prefetch_y_lines(J, n); /* the output lines amx_store writes at the panel's end */
#endif
        for (int64_t s = 0; s < J->S; s++)
            for (int64_t b0 = J->bounds[s]; b0 < J->bounds[s + 1]; b0 += PANEL_SLICE) {
                const int64_t b1 = b0 + PANEL_SLICE < J->bounds[s + 1] ? b0 + PANEL_SLICE : J->bounds[s + 1];
                panel_decode(J, n, n1, b0, b1, panel);
                const int first = b0 == J->bounds[s], last = b1 == J->bounds[s + 1];
                for (int64_t p = 0; p < P; p++) {
                    int32_t *ca = cacc + p * pair_words;
                    float *yp = yv + p * pair_words;
                    const int64_t tg = 2 * p, c0 = b0 * cpb, c1 = b1 * cpb, PS = PANEL_ROWS * 64; /* chunk step */
                    if (tg + 1 < G) {
                        if (two) amx_step(J, panel, 64, PS, c0, c1, s, first, last, n, n1, tg, 2, 2, ca, yp, NULL);
                        else amx_step(J, panel, 64, PS, c0, c1, s, first, last, n, n1, tg, 2, 1, ca, yp, NULL);
                    } else {
                        if (two) amx_step(J, panel, 64, PS, c0, c1, s, first, last, n, n1, tg, 1, 2, ca, yp, NULL);
                        else amx_step(J, panel, 64, PS, c0, c1, s, first, last, n, n1, tg, 1, 1, ca, yp, NULL);
                    }
                }
            }
        for (int64_t p = 0; p < P; p++) amx_store(J, yv + p * pair_words, n, n1, 2 * p);
    }
    _tile_release();
    return 1;
}

/* ---- The token-major GEMM (TQ2_0 codes): the operands' roles swapped. A tiles are 16 tokens x one chunk of the
 * row-major activations, read in place (xq, K bytes apart: no VNNI copy of them is built), B tiles the weights in the
 * VNNI layout, and TDPBSUD (A signed, B unsigned) leaves C [16 tokens][16 weight rows]: each C row is 16 consecutive
 * outputs of one token, so the epilogue writes y straight from it, with no 16 x 16 transpose per 16 rows and 16
 * tokens (store16). The B tiles' rows are dwords of 16 weight rows side by side: the row-lane copy of the codes
 * (rowlane_codes, J->rl) holds them so; without it the panel decode makes them by a 16 x 16 transpose per 16 rows and
 * block, which costs more than store16's transposes saved up to about 64 tokens (K = 512 and 1280), hence
 * amx_tm_min_t there. The integer sums are the same sums (sum a c per segment) and the epilogue the same float32
 * operations in the same order, so the outputs are bit-identical to the other kernels'.
 * Xeon with AMX, one thread, 16 layers' worth of TriLM-99M matrices in turn (q|k|v, gate|up, down), against
 * amx_rows: with the copy 1.11-1.19x at 8 tokens, 1.08-1.11x at 16, 1.16-1.31x at 140; without it 0.75-0.87x at 8
 * tokens, 1.05-1.08x at 70, 1.16-1.24x at 140. */

static inline int amx_tm_applies(int path, const job_t *J) {
    return J->fmt == FMT_TQ2 && amx_tm_min_t > 0 && (J->rl || J->T >= amx_tm_min_t) && amx_applies(path, J);
}

#ifdef SPECTRA_AMX
/* Unlike amx_rows, the token-major GEMM does better without fetching its output lines first: TriLM-99M, q8 cache, 2
 * threads (benchmarks/kernel_ab.py -D AMX_Y_PREFETCH=0, which then applied to both): a 16-row step 1.015x (7/11),
 * 12 decode rows and 4 prompt chunks of 32 1.031x (9/9). */
#ifndef AMX_TM_Y_PREFETCH
#define AMX_TM_Y_PREFETCH 0
#endif
#ifndef AMX_TM_PF_BYTES
#define AMX_TM_PF_BYTES 8192 /* how far ahead in the row-lane copy the decode fetches, into L2 */
#endif
TARGET_AVX512 static inline __attribute__((always_inline)) void tm_fields(uint8_t *p, const __m512i *r) {
    const __m512i m3 = _mm512_set1_epi8(3);
    for (int l = 0; l < PANEL_CPB; l++, p += 2048)
        for (int k = 0; k < 16; k++)
            _mm512_store_si512(p + 64 * k, _mm512_and_si512(_mm512_srli_epi16(r[k], 2 * l), m3));
}

/* Rows n .. n+31 (zeros past n1), blocks [b0, b1) -> B tiles panel [chunk - 4 b0][half h][16][64]: row r of half h's
 * tile holds, for each of its 16 weight rows m, the codes of chunk positions 4r .. 4r+3 (bytes 4m .. 4m+3). Chunk l
 * position i of a TQ2_0 block is field l of code byte i, so row r of every chunk's tile is dword r of the 16 rows' code
 * bytes, shifted. Those 16 dwords of 16 rows are the row-lane copy's vector r (rowlane_codes, J->rl: 1 KiB a block of a
 * 16-row group, read as one stream) where the half is a whole group of it; else a 16 x 16 transpose of dwords of the
 * code bytes makes them (one per 16 rows and block, for its 4 chunks). */
TARGET_AVX512 static void panel_decode_tq2_tm(const job_t *J, int64_t n, int64_t n1, int64_t b0, int64_t b1,
                                              uint8_t *panel) {
    const int64_t rowb = J->nb * QB;
    int64_t pf[PANEL_SLICE];
    for (int h = 0; h < 2 && n + 16 * h < n1; h++) {
        const int64_t r0 = n + 16 * h;
        if (J->rl && r0 % 16 == 0 && r0 + 16 <= n1) {
            const uint8_t *g = J->rl + r0 * rowb; /* group r0 / 16: nb blocks of 1 KiB */
            for (int64_t b = b0; b < b1; b++) {
                __m512i r[16];
                for (int k = 0; k < 16; k++) {
                    _mm_prefetch((const char *)g + b * 1024 + 64 * k + AMX_TM_PF_BYTES, PANEL_HINT);
                    r[k] = _mm512_loadu_si512(g + b * 1024 + 64 * k);
                }
                tm_fields(panel + (PANEL_CPB * (b - b0) * 2 + h) * 1024, r);
            }
            continue;
        }
        panel_prefetch_offsets(b0, b1, J->nb, rowb, QB, pf); /* the code bytes' own fetch, as panel_decode_tq2's */
        for (int64_t b = b0; b < b1; b++) {
            __m512 r[16];
            for (int m = 0; m < 16; m++) {
                const int64_t row = r0 + m;
                if (row >= n1) {
                    r[m] = _mm512_setzero_ps();
                    continue;
                }
                const uint8_t *w = J->qs + row * rowb;
                _mm_prefetch((const char *)w + pf[b - b0], PANEL_HINT);
                r[m] = _mm512_castsi512_ps(_mm512_loadu_si512(w + b * QB));
            }
            transpose16_ps(r); /* r[k] lane m: dword k of row m */
            __m512i v[16];
            for (int k = 0; k < 16; k++) v[k] = _mm512_castps_si512(r[k]);
            tm_fields(panel + (PANEL_CPB * (b - b0) * 2 + h) * 1024, v);
        }
    }
}

#ifndef AMX_TM_PF_HINT
#define AMX_TM_PF_HINT _MM_HINT_T0
#endif
#ifndef AMX_TM_I8_PF
#define AMX_TM_I8_PF 1 /* panels ahead the int8 token-major GEMM fetches (0: none) */
#endif
/* Where a pass of the token-major GEMM finds its B tiles: chunk c's (c0 <= c < c1) at at + (c - c0) * step, the
 * second half's (weight rows 16..31 of the panel) half bytes after the first's; pf (or NULL): the same places in
 * the next panel, fetched with each chunk. */
typedef struct {
    const uint8_t *at, *pf;
    int64_t step, half;
} tm_b_t;

/* Chunks [c0, c1) of segment s against token groups tg, tg + 1 (ntg of them; A rows at xa0 / xa1, K bytes apart)
 * and nbt B tiles (the panel's halves). C starts at zero (first) or from cacc [g][h][16 tokens][16 rows] and is saved
 * there; at the segment's last chunks (last) each live token's row of C is finished: yv [g][16 tokens][32 rows] +=
 * d * f(C - bsum) (from 0 at s = 0), or at the last segment y = that * xs. */
TARGET_AMX static inline __attribute__((always_inline)) void amx_tm_step(const job_t *J, const tm_b_t B, int64_t c0,
                                                                         int64_t c1, int64_t s, int first, int last,
                                                                         int64_t n, int64_t n1, int64_t tg,
                                                                         const int ntg, const int nbt,
                                                                         const int8_t *xa0, const int8_t *xa1,
                                                                         int32_t *cacc, float *yv,
                                                                         const __m512 *dvec) {
    const int64_t K = J->K;
    amx_c_begin(first, nbt, ntg, cacc);
    for (int64_t c = c0; c < c1; c++) {
        const uint8_t *bt = B.at + (c - c0) * B.step;
        if (B.pf)
            for (int l = 0; l < 16; l++) {
                _mm_prefetch((const char *)B.pf + (c - c0) * B.step + 64 * l, AMX_TM_PF_HINT);
                _mm_prefetch((const char *)B.pf + (c - c0) * B.step + B.half + 64 * l, AMX_TM_PF_HINT);
            }
        _tile_loadd(4, bt, 64);
        if (nbt == 2) _tile_loadd(5, bt + B.half, 64);
        _tile_loadd(6, xa0 + c * 64, K);
        _tile_dpbsud(0, 6, 4);
        if (nbt == 2) _tile_dpbsud(1, 6, 5);
        if (ntg == 2) {
            _tile_loadd(7, xa1 + c * 64, K);
            _tile_dpbsud(2, 7, 4);
            if (nbt == 2) _tile_dpbsud(3, 7, 5);
        }
    }
    amx_c_save(nbt, ntg, cacc);
    if (!last) return;
    const int final = s == J->S - 1;
    for (int g = 0; g < ntg; g++)
        for (int64_t m = 0; m < 16 && (tg + g) * LANE_TOK + m < J->T; m++) {
            const int64_t t = (tg + g) * LANE_TOK + m;
            const __m512i bs = _mm512_set1_epi32(J->bsum[t * J->S + s]);
            const __m512 xs = _mm512_set1_ps(J->xs[t]);
            for (int h = 0; h < nbt; h++) {
                const __m512i sums = _mm512_load_si512(cacc + (2 * g + h) * 256 + 16 * m);
                const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(sums, bs));
                float *yp = yv + (g * LANE_TOK + m) * PANEL_ROWS + 16 * h;
                const __m512 y0 = s ? _mm512_load_ps(yp) : _mm512_setzero_ps();
                const __m512 acc = _mm512_add_ps(y0, _mm512_mul_ps(dvec[h], v));
                if (!final) {
                    _mm512_store_ps(yp, acc);
                    continue;
                }
                const int64_t rows = n1 - n - 16 * h;
                const __mmask16 live = (__mmask16)(rows >= 16 ? 0xffff : (1u << rows) - 1);
                _mm512_mask_storeu_ps(J->y + t * J->N + n + 16 * h, live, _mm512_mul_ps(acc, xs));
            }
        }
}

/* A product of fewer than 16 tokens: the A and C tiles configured with T rows, so each tdpbsud does T rows' work
 * (its time scales with them) and the A tiles read the activations in place, with no zero-padded copy. TriLM-99M, q8
 * cache, 2 threads (benchmarks/kernel_ab.py, against 16-row tiles): a 16-row step (parts of 8) 1.039x [0.970-1.091]
 * (10/11), 4 rows (parts of 2) 1.017x (6/9). */
#ifndef AMX_TM_SHORT
#define AMX_TM_SHORT 1
#endif

/* The token-major GEMM's per-call state: panel (extra bytes first: the decoded panel slice, or none), the C tiles of
 * every token pair waiting between slices (cacc), the partial outputs of a segment (yv), and the last token group
 * zero-padded to 16 rows when it is short (tail: its A tiles); the tile configuration loaded. NULL panel: no memory. */
typedef struct {
    uint8_t *panel;
    int32_t *cacc;
    float *yv;
    const int8_t *tail;
    int64_t G, P, pair_words;
} tm_call_t;

TARGET_AMX static tm_call_t tm_begin(const job_t *J, size_t extra) {
    tm_call_t C = {NULL, NULL, NULL, NULL, (J->T + LANE_TOK - 1) / LANE_TOK, 0, 2 * PANEL_ROWS * LANE_TOK};
    C.P = (C.G + 1) / 2;
    const int short_t = AMX_TM_SHORT && J->T < LANE_TOK; /* one group: tiles of T rows, read in place */
    const int64_t K = J->K, tail_rows = short_t ? 0 : J->T % LANE_TOK;
    const size_t pair_bytes = (size_t)C.pair_words * 4, tail_bytes = tail_rows ? (size_t)(LANE_TOK * K) : 0;
    C.panel = (uint8_t *)panel_get(extra + 2 * (size_t)C.P * pair_bytes + tail_bytes);
    if (!C.panel) return C;
    C.cacc = (int32_t *)(void *)(C.panel + extra);
    C.yv = (float *)(void *)(C.panel + extra + (size_t)C.P * pair_bytes);
    if (tail_rows) {
        int8_t *tail = (int8_t *)(C.panel + extra + 2 * (size_t)C.P * pair_bytes);
        memcpy(tail, J->xq + (C.G - 1) * LANE_TOK * K, (size_t)(tail_rows * K));
        memset(tail + tail_rows * K, 0, (size_t)((LANE_TOK - tail_rows) * K));
        C.tail = tail;
    }
    amx_configure_rows(short_t ? (int)J->T : 16);
    return C;
}

/* Weight rows n .. n+31's scales for segment s, one vector per half (0 past n1). */
TARGET_AVX512 static inline void tm_scales(const job_t *J, int64_t n, int64_t n1, int64_t s, __m512 dvec[2]) {
    for (int h = 0; h < 2; h++) {
        float d[16];
        for (int j = 0; j < 16; j++) {
            const int64_t row = n + 16 * h + j;
            d[j] = row < n1 ? J->seg_d[row * J->S + s] : 0.0f;
        }
        dvec[h] = _mm512_loadu_ps(d);
    }
}

/* Every token pair of the call through chunks [c0, c1) of segment s of the panel at n (B: its tiles; pf only for the
 * first pair, which meets the panel first). */
TARGET_AMX static inline __attribute__((always_inline)) void tm_pairs(const job_t *J, const tm_call_t *C, tm_b_t B,
                                                                      int64_t c0, int64_t c1, int64_t s, int first,
                                                                      int last, int64_t n, int64_t n1,
                                                                      const __m512 *dvec) {
    const int nbt = n1 - n > 16 ? 2 : 1; /* B tiles: one for the last <= 16 rows of a range */
    for (int64_t p = 0; p < C->P; p++, B.pf = NULL) {
        int32_t *ca = C->cacc + p * C->pair_words;
        float *yp = C->yv + p * C->pair_words;
        const int64_t tg = 2 * p, G = C->G;
        const int8_t *xa0 = tg == G - 1 && C->tail ? C->tail : J->xq + tg * LANE_TOK * J->K;
        const int8_t *xa1 = tg + 1 == G - 1 && C->tail ? C->tail : J->xq + (tg + 1) * LANE_TOK * J->K;
        if (tg + 1 < G) {
            if (nbt == 2) amx_tm_step(J, B, c0, c1, s, first, last, n, n1, tg, 2, 2, xa0, xa1, ca, yp, dvec);
            else amx_tm_step(J, B, c0, c1, s, first, last, n, n1, tg, 2, 1, xa0, xa1, ca, yp, dvec);
        } else {
            if (nbt == 2) amx_tm_step(J, B, c0, c1, s, first, last, n, n1, tg, 1, 2, xa0, xa1, ca, yp, dvec);
            else amx_tm_step(J, B, c0, c1, s, first, last, n, n1, tg, 1, 1, xa0, xa1, ca, yp, dvec);
        }
    }
}

/* TQ2_0 rows [n0, n1) for all tokens on the token-major GEMM; 0 (nothing done) when the buffers cannot be allocated.
 * Per panel of 32 rows and scale segment, the codes are decoded PANEL_SLICE blocks at a time into B tiles in L1. */
TARGET_AMX static int amx_tm_rows(const job_t *J, int64_t n0, int64_t n1) {
    const size_t panel_bytes = (size_t)(PANEL_SLICE * PANEL_CPB * PANEL_ROWS * 64);
    const tm_call_t C = tm_begin(J, panel_bytes);
    if (!C.panel) return 0;
    for (int64_t n = n0; n < n1; n += PANEL_ROWS) {
#if AMX_TM_Y_PREFETCH
        prefetch_y_lines(J, n); /* the output lines the epilogue writes at the last segment */
#endif
        for (int64_t s = 0; s < J->S; s++) {
            __m512 dvec[2];
            tm_scales(J, n, n1, s, dvec);
            for (int64_t b0 = J->bounds[s]; b0 < J->bounds[s + 1]; b0 += PANEL_SLICE) {
                const int64_t b1 = b0 + PANEL_SLICE < J->bounds[s + 1] ? b0 + PANEL_SLICE : J->bounds[s + 1];
                panel_decode_tq2_tm(J, n, n1, b0, b1, C.panel);
                const tm_b_t B = {C.panel, NULL, 2048, 1024};
                tm_pairs(J, &C, B, b0 * PANEL_CPB, b1 * PANEL_CPB, s, b0 == J->bounds[s], b1 == J->bounds[s + 1], n,
                         n1, dvec);
            }
        }
    }
    _tile_release();
    return 1;
}

/* Int8 rows [n0, n1) (whole 16-row groups of the row-lane copy J->rl: n0 and n1 multiples of 16) on the token-major
 * GEMM, the B tiles read from the copy in place (chunk c of group g: its 1 KiB at rl + 16 K g + 1024 c; a 32-row
 * panel is 32 K contiguous bytes, the next one fetched while this one runs). One segment, as amx_i8_rows. */
TARGET_AMX static int amx_i8_tm_rows(const job_t *J, int64_t n0, int64_t n1) {
    const tm_call_t C = tm_begin(J, 0);
    if (!C.panel) return 0;
    const int64_t K = J->K;
    for (int64_t n = n0; n < n1; n += PANEL_ROWS) {
        __m512 dvec[2];
        tm_scales(J, n, n1, 0, dvec);
        const uint8_t *at = J->rl + n * K;
        const int64_t ahead = AMX_TM_I8_PF * PANEL_ROWS;
        const tm_b_t B = {at, ahead && n + ahead + PANEL_ROWS <= n1 ? at + ahead * K : NULL, 1024, 16 * K};
        tm_pairs(J, &C, B, 0, K / 64, 0, 1, 1, n, n1, dvec);
    }
    _tile_release();
    return 1;
}
#endif /* SPECTRA_AMX */

/* Int8 weights (matmul_i8: u = w + 128, [N, K] in the activations' block order, one scale per row, bsum = 128 sum a):
 * the A tiles are read straight from the matrix, K bytes apart (rows past n1 come from a zero-padded copy). The
 * epilogue is amx_step's with one segment: y = s * (0 + d * f(sum u a - 128 sum a)), as i8_rows_scalar. */
TARGET_AMX static int amx_i8_rows(const job_t *J, int64_t n0, int64_t n1) {
    const int64_t G = (J->T + LANE_TOK - 1) / LANE_TOK, P = (G + 1) / 2, K = J->K;
    const size_t tail_bytes = (size_t)(PANEL_ROWS * K), pair_bytes = 2 * PANEL_ROWS * LANE_TOK * 4;
    uint8_t *tail = (uint8_t *)panel_get(tail_bytes + 2 * (size_t)P * pair_bytes);
    if (!tail) return 0;
    int32_t *cacc = (int32_t *)(void *)(tail + tail_bytes);
    float *yv = (float *)(void *)(tail + tail_bytes + (size_t)P * pair_bytes);
    const int64_t pair_words = (int64_t)(pair_bytes / 4);
    amx_configure();
    for (int64_t n = n0; n < n1; n += PANEL_ROWS) {
        const int64_t rows = n1 - n < PANEL_ROWS ? n1 - n : PANEL_ROWS;
        const int two = rows > 16;
        const uint8_t *a = J->qs + n * K;
        /* the next panel of this range, prefetched a chunk's share at a time while this one runs (the first token
         * pair's pass only): the matrix streams from DRAM, and 90 % of this function's samples sat on the tiles'
         * loads. 16 rows of 50304 x 512 (statistics only, the matrix evicted between calls): 1.095x [1.042-1.130]
         * (10/10); x 2048: 1.025x (9/10). The in-process server workload (TriLM-99M, 16 slots) 1.089x, 1.037x,
         * 1.001x (q8) and 0.999x (f16) in four A/Bs: about the output layer's share of the step, within the VM's
         * noise. Two panels ahead 0.936x against one; into L2 instead of L1 1.008x; the whole next panel at once at
         * the start of this one (256 prefetches for K = 512) 0.81-0.88x in the output layer alone. */
        const uint8_t *pf = n + 2 * PANEL_ROWS <= n1 ? a + PANEL_ROWS * K : NULL;
        if (rows % 16) { /* a tile reads 16 rows: copy the last ones and pad with zeros */
            memcpy(tail, a, (size_t)(rows * K));
            memset(tail + rows * K, 0, (size_t)((two ? 32 : 16) - rows) * (size_t)K);
            a = tail;
        }
        for (int64_t p = 0; p < P; p++) {
            int32_t *ca = cacc + p * pair_words;
            float *yp = yv + p * pair_words;
            const int64_t tg = 2 * p, c1 = K / 64;
            if (tg + 1 < G) {
                if (two) amx_step(J, a, K, 64, 0, c1, 0, 1, 1, n, n1, tg, 2, 2, ca, yp, p ? NULL : pf);
                else amx_step(J, a, K, 64, 0, c1, 0, 1, 1, n, n1, tg, 2, 1, ca, yp, p ? NULL : pf);
            } else {
                if (two) amx_step(J, a, K, 64, 0, c1, 0, 1, 1, n, n1, tg, 1, 2, ca, yp, p ? NULL : pf);
                else amx_step(J, a, K, 64, 0, c1, 0, 1, 1, n, n1, tg, 1, 1, ca, yp, p ? NULL : pf);
            }
        }
        for (int64_t p = 0; p < P; p++) amx_store(J, yv + p * pair_words, n, n1, 2 * p);
    }
    _tile_release();
    return 1;
}
#endif /* SPECTRA_AMX */

/* The int8-weight GEMM (the output layer) on rows [n0, n1), as amx_run_rows. */
static int amx_run_rows_i8(int path, const job_t *J, int64_t n0, int64_t n1) {
#ifdef SPECTRA_AMX
    /* The copy's whole groups token-major, the rest on the tiles. From AMX_MIN_T tokens only, though the copy lets
     * amx_applies take int8 rows from AMX_TM_RL_MIN_T: the output layer of TriLM-99M token-major at 2 / 4 rows ran
     * 0.951x / 0.986x the AVX-512 kernel (benchmarks/kernel_ab.py, 9 rounds each), so those stay there. */
    if (J->rl && J->xt && J->T >= AMX_MIN_T && amx_tm_min_t > 0 && amx_applies(path, J)) {
        const int64_t a0 = (n0 + 15) / 16 * 16, a1 = n1 / 16 * 16; /* n1 <= the rows: whole groups of the copy */
        if (a0 < a1)
            return (n0 >= a0 || amx_i8_rows(J, n0, a0)) && amx_i8_tm_rows(J, a0, a1) &&
                   (a1 >= n1 || amx_i8_rows(J, a1, n1));
    }
    if (J->xt && amx_applies(path, J)) return amx_i8_rows(J, n0, n1);
#else
    (void)path, (void)J, (void)n0, (void)n1;
#endif
    return 0;
}

/* Run the AMX GEMM on rows [n0, n1) if it applies and the activations were prepared (J->xt); 1 when done. */
static int amx_run_rows(int path, const job_t *J, int64_t n0, int64_t n1) {
#ifdef SPECTRA_AMX
    if (amx_tm_applies(path, J)) return amx_tm_rows(J, n0, n1);
    if (J->xt && amx_applies(path, J)) return amx_rows(J, n0, n1);
#else
    (void)path, (void)J, (void)n0, (void)n1;
#endif
    return 0;
}
