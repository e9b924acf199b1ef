/*
 * TQ1_0 kernels: ternary x int8 products read straight from llama.cpp's base-3 bytes (1.625 bits of codes per weight,
 * plus the block scale kept apart as for TQ2_0). Included by ternary_kernels.c, whose job_t, activation quantization,
 * epilogue and dispatch they share; J->fmt == FMT_TQ1 selects them.
 *
 * llama.cpp's block: 52 code bytes (qs[48] then qh[4]; its fp16 scale is kept apart). Byte b holds five codes, most
 * significant first, as the fraction ceil(256 v / 243) of v = sum c_n 3^(4-n); code n is ((b * 3^n mod 256) * 3) >> 8.
 * For bytes 0..31 code n is element 32n + j, for bytes 32..47 element 160 + 16n + (j - 32), for bytes 48..51 (n < 4)
 * element 240 + 4n + (j - 48); the qh bytes' fifth code is 0.
 *
 * The kernels' order of those bytes (`kernels.tq1_to_kernel` in Python), N rows of nb blocks, 52 nb bytes a row:
 * - Dense rows: a row holds the 48 qs bytes of every block (block b at 48 b), then the 4 qh bytes of every block (at
 *   48 nb + 4 b). The one-token GEMV reads a row's qs bytes as one run, 64 at a time: a block's own 52 bytes filled 52
 *   of a register's 64 lanes, so a fifth of every decode and product was spent on padding.
 * - Encoded bytes where the AVX-512 VBMI kernels run (tq1_has_vbmi; elsewhere the bytes are llama.cpp's): each byte is
 *   stored as e = tq1_enc[b], chosen so that code 0 is a lookup of e's bits 0..5 and codes 1..4, as the four 2-bit
 *   fields of one byte, are the byte sum of a lookup of bits 0..5 and one of bits 2..7 (tq1_decode_tables_build). So
 *   three vpermb, a shift and an add decode 64 bytes. e = 0 is the all-zero codes, as b = 0 is, so masked-off bytes
 *   contribute nothing. The 13 bytes that are no valid code map to the 13 unused values, so the map is a permutation.
 *
 * Activations (per-block TQ1 layout, TQ1_AB = 320 bytes per block, read by the AVX2 and scalar kernels): five
 * "planes" of 64 bytes; plane n, slot j holds the activation of the element that code n of block byte j multiplies,
 * and 0 in slots 52..63 and in plane 4's slots 48..51. So one 64-byte register of a block's 52 code bytes (12 more
 * zero) against plane n is a full dot product. Built from the TQ2 layout by copying 32-, 16- and 4-byte runs
 * (tq1_activations). Products of several tokens on a VBMI CPU (the tiles here, the token lanes and AMX) read the TQ2
 * layout itself: they decode a block into TQ2_0's 4 chunks of codes (tq1_tq2_chunks), 256 products a block where the
 * planes took 320. One-token products on the VBMI GEMV get the dense layout in J->xq instead (tq1_activations_dense;
 * the choice: tq1_act_build in ternary_kernels.c): per 64-byte chunk c of a row's whole run (its qs run, then its qh
 * run right after it, as the kernel order stores them), 5 planes: plane n, slot j holds the activation of code n of
 * run byte 64 c + j, zero for code 4 of a qh byte (qh bytes hold four codes) and past the run. A chunk may hold the qs
 * run's last bytes and the qh run's first, so a row of TriLM-1.1B's 1792 columns (364 bytes) is 6 chunks, where
 * separate runs took 6 + 1.
 *
 * The integer sums are those of the TQ2 kernels (sum c a over a segment, exact in int32 for K <= 2^22), and the float
 * epilogue is the same, so the outputs equal the TQ2 kernels' and the pure-torch reference bit for bit.
 *
 * Decoding the codes:
 * - scalar: the formula above (on tq1_dec[e] where the bytes are encoded).
 * - AVX2 (CPUs without VBMI, or forced): t_n = b * 3^n mod 256 by byte adds (t + t + t), and c = [t >= 86] + [t >= 171]
 *   (= (3t) >> 8) with saturating subtractions, then vpmaddubsw like the TQ2 AVX2 path. On encoded bytes (a VBMI CPU
 *   forced onto this path) each block is first translated back through tq1_dec.
 * - AVX-512 (VBMI): codes 1..4 as the 2-bit fields of a TQ2 byte, by the two 64-entry lookups and an add; code 0 by
 *   vpermb on the low 6 bits. Field l is masked, not shifted, as in the TQ2 GEMV: vpdpbusd then accumulates 4^l c a,
 *   and a right shift by 2l recovers the exact sum.
 */

#define TQ1_CB 52  /* code bytes per block */
#define TQ1_QS 48  /* of which qs bytes (five codes each), stored as one run per row */
#define TQ1_QH 4   /* and qh bytes (four codes each), stored after the row's qs run */
#define TQ1_AB 320 /* activation bytes per block in the TQ1 layout */

static const uint8_t tq1_pow3[5] = {1, 3, 9, 27, 81};

static inline int tq1_code(int b, int n) { return (((b * tq1_pow3[n]) & 0xFF) * 3) >> 8; }

/* llama.cpp byte -> stored byte and back: the identity until tq1_encoding_init(1) runs (on VBMI CPUs, at import). */
static uint8_t tq1_enc[256], tq1_dec[256];
static uint8_t tq1_c0[64]; /* code 0 of a stored byte e, by e & 63 */
static uint8_t tq1_ta[64]; /* codes 1..4 of e as 2-bit fields: (tq1_ta[e & 63] + tq1_tb[e >> 2]) mod 256 */
static uint8_t tq1_tb[64];
static int tq1_encoded = 0;

/* The decoding tables (header). Bits 0..1 of e are x, bits 2..5 y and bits 6..7 z. A row (x, y) holds code 0
 * (tq1_c0) and a line L = (c2, c3, c4) (tq1_ta, as 4 c2 + 16 c3 + 64 c4). Each y adds the same 4 bytes to the lines of
 * its 4 rows, by z (tq1_tb): 0, 1, 2 (code 1 = 0, 1, 2 on the row's own line) and o + tau, an offset o of the line
 * with code 1 = tau. So a row covers its whole line and one more cell. Of the 27 lines of each code 0, 21 are rows'
 * lines, and the 6 lines (2, c3, c4 < 2) are covered cell by cell: cell (line, tau) by the extra cell of a row whose
 * line is that line minus the offset of its y. The kinds of y (`kinds`, each taking as many y as its rows fill):
 *   tau 0, o = +2 c2, rows (0, c3, c4 < 2);   tau 1, o = +1 c2, rows (1, c3, c4 < 2);
 *   tau 2, o = +2 c4, rows (2, c3, 2) (the carry leaves the byte: c4 2 -> 0);   tau 2, o = +1 c2 + 3 c4, rows
 *   (1, c3, 2) -> (2, c3, 1).
 * The lines (0, c3, 2) give no extra cell; they fill the last y of each kind, so 63 of the 64 rows are used and the
 * bytes hold all 243 codes (13 values are repeats or no valid code). Row (0, 0) has code 0 = 0 and line 0, and y = 0
 * adds 0 at z = 0, so e = 0 is the all-zero codes. */
/* tq1_tq2_chunks' vpermi2b indices (rows i0, i1, i2, i3, iq of tq1_tq2_index_t), filled with the decode tables. */
static int8_t tq1_tq2_idx[5][64];

static void tq1_decode_tables_build(void) {
    for (int c = 0; c < 64; c++) {
        tq1_tq2_idx[0][c] = (int8_t)(c < 32 ? c : 64 + c - 32);
        tq1_tq2_idx[1][c] = (int8_t)(c < 32 ? c : c < 48 ? 64 + c : c - 16);
        tq1_tq2_idx[2][c] = (int8_t)(c < 48 ? c : 64 + c - 16);
        tq1_tq2_idx[3][c] = (int8_t)(c < 32 ? c : 64 + c);
        tq1_tq2_idx[4][c] = (int8_t)(c < 48 ? 0 : ((c - 48) % 8) / 4 * 64 + 48 + (c - 48) % 4);
    }
    static const struct { int tau, off, c2, c4lo, c4hi; } kinds[4] = {
        {0, 8, 0, 0, 1}, {1, 4, 1, 0, 1}, {2, 128, 2, 2, 2}, {2, 196, 1, 2, 2}};
    int y = 0, x = 0, plain = 0; /* plain: how many rows (0, c3, 2) are placed */
    for (int g = 0; g < 4; g++) {
        const int nc4 = kinds[g].c4hi - kinds[g].c4lo + 1, n = 9 * nc4; /* code 0 x c3 x c4 */
        for (int r = 0; r < n || x != 0; r++) { /* the kind's rows, then plain rows to the end of its last y */
            int k = 0, line = 0;                 /* (row 63, after the 9 plain rows: line 0 again) */
            if (r < n) k = r / (3 * nc4), line = 4 * kinds[g].c2 + 16 * (r % 3) + 64 * (kinds[g].c4lo + r / 3 % nc4);
            else if (plain < 9) k = plain / 3, line = 16 * (plain % 3) + 128, plain++;
            if (x == 0)
                for (int z = 0; z < 4; z++) tq1_tb[y | z << 4] = (uint8_t)(z < 3 ? z : kinds[g].tau + kinds[g].off);
            tq1_c0[x | y << 2] = (uint8_t)k, tq1_ta[x | y << 2] = (uint8_t)line;
            if (++x == 4) x = 0, y++;
        }
    }
}

/* Codes 0..4 of a stored byte under the decoding tables (5 bytes; 3 in a field of codes 1..4: no valid code). */
static inline void tq1_decode_codes(int e, uint8_t *c) {
    const int f = (tq1_ta[e & 63] + tq1_tb[e >> 2]) & 0xFF;
    c[0] = tq1_c0[e & 63];
    for (int n = 1; n < 5; n++) c[n] = (uint8_t)((f >> (2 * n - 2)) & 3);
}

static void tq1_encoding_init(int encode) {
    for (int b = 0; b < 256; b++) tq1_enc[b] = (uint8_t)b;
    if (encode) {
        tq1_decode_tables_build();
        int used[256] = {0}, taken[256] = {0};
        for (int v = 0; v < 243; v++) { /* each valid byte takes the first stored value that decodes to its codes */
            const int b = (v * 256 + 242) / 243;
            for (int e = 0; e < 256; e++) {
                uint8_t c[5];
                tq1_decode_codes(e, c);
                int same = !taken[e];
                for (int n = 0; n < 5 && same; n++) same = c[n] == tq1_code(b, n);
                if (same) {
                    tq1_enc[b] = (uint8_t)e, used[b] = 1, taken[e] = 1;
                    break;
                }
            }
        }
        int e = 0; /* the 13 bytes that are no valid code take the 13 free values, in order */
        for (int b = 0; b < 256; b++) {
            if (used[b]) continue;
            while (taken[e]) e++;
            tq1_enc[b] = (uint8_t)e, taken[e] = 1;
        }
    }
    for (int b = 0; b < 256; b++) tq1_dec[tq1_enc[b]] = (uint8_t)b;
    tq1_encoded = encode;
}

/* Block b's 52 stored bytes of a row (kernel order), copied into one buffer in llama.cpp's order and byte values. */
static inline void tq1_block_llama(const uint8_t *row, int64_t nb, int64_t b, uint8_t *out) {
    const uint8_t *qs = row + TQ1_QS * b, *qh = row + TQ1_QS * nb + TQ1_QH * b;
    for (int j = 0; j < TQ1_QS; j++) out[j] = tq1_dec[qs[j]];
    for (int j = 0; j < TQ1_QH; j++) out[TQ1_QS + j] = tq1_dec[qh[j]];
}

/* TQ2-layout int8 activations [T, nb*256] -> TQ1 layout [T, nb*320]. In the TQ2 layout the 32 elements 32j..32j+31 of
 * a block are contiguous at 64 (j % 4) + 32 (j / 4). */
static void tq1_activations(const int8_t *a2, int8_t *a1, int64_t T, int64_t nb) {
    for (int64_t i = 0; i < T * nb; i++) {
        const int8_t *s = a2 + i * QK;
        int8_t *d = a1 + i * TQ1_AB;
        memset(d, 0, TQ1_AB);
        for (int n = 0; n < 5; n++) {
            int8_t *p = d + 64 * n;
            memcpy(p, s + 64 * (n % 4) + 32 * (n / 4), 32);       /* elements 32n .. 32n+31 */
            const int j = 5 + n / 2;                              /* elements 160+16n .. +15: chunk 5 + n/2 */
            memcpy(p + 32, s + 64 * (j % 4) + 32 * (j / 4) + 16 * (n % 2), 16);
            if (n < 4) memcpy(p + 48, s + 64 * 3 + 32 + 16 + 4 * n, 4); /* elements 240+4n .. +3: chunk 7 */
        }
    }
}

/* The dense layout of one token (header): chunks of 5 planes over a row's whole run of TQ1_CB * nb bytes. */
static inline int64_t tq1_run_chunks(int64_t nb) { return (TQ1_CB * nb + 63) / 64; }
static inline size_t tq1_dense_bytes(int64_t nb) { return (size_t)(5 * 64 * tq1_run_chunks(nb)); }

/* len activation bytes for plane n of the run starting at byte s of a run whose chunks hold `planes` planes. */
static inline void tq1_dense_put(int8_t *run, int planes, int64_t s, int n, const int8_t *src, int64_t len) {
    while (len > 0) {
        const int64_t c = s / 64, off = s % 64, take = len < 64 - off ? len : 64 - off;
        memcpy(run + (c * planes + n) * 64 + off, src, (size_t)take);
        s += take, src += take, len -= take;
    }
}

static void tq1_activations_dense(const int8_t *a2, int8_t *ad, int64_t nb) {
    memset(ad, 0, tq1_dense_bytes(nb));
    for (int64_t b = 0; b < nb; b++) {
        const int8_t *s = a2 + b * QK;
        for (int n = 0; n < 5; n++) {
            const int j = 5 + n / 2;
            tq1_dense_put(ad, 5, TQ1_QS * b, n, s + 64 * (n % 4) + 32 * (n / 4), 32);
            tq1_dense_put(ad, 5, TQ1_QS * b + 32, n, s + 64 * (j % 4) + 32 * (j / 4) + 16 * (n % 2), 16);
            if (n < 4) tq1_dense_put(ad, 5, TQ1_QS * nb + TQ1_QH * b, n, s + 64 * 3 + 32 + 16 + 4 * n, 4);
        }
    }
}

/* ---------------------------------------------------------------- scalar */

static void tq1_rows_scalar(const job_t *J, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *w = J->qs + n * J->nb * TQ1_CB;
        for (int64_t t = 0; t < J->T; t++) {
            const int8_t *a = J->xq + t * J->nb * TQ1_AB;
            float yv = 0.0f;
            for (int64_t s = 0; s < J->S; s++) {
                int32_t acc = 0;
                for (int64_t b = J->bounds[s]; b < J->bounds[s + 1]; b++) {
                    uint8_t wb[TQ1_CB];
                    tq1_block_llama(w, J->nb, b, wb);
                    const int8_t *ab = a + b * TQ1_AB;
                    for (int j = 0; j < TQ1_CB; j++)
                        for (int c = 0; c < 5; c++) acc += tq1_code(wb[j], c) * ab[64 * c + j];
                }
                yv = yv + J->seg_d[n * J->S + s] * (float)(acc - J->bsum[t * J->S + s]);
            }
            J->y[t * J->N + n] = yv * J->xs[t];
        }
    }
}

#ifdef SPECTRA_X86
/* ---------------------------------------------------------------- AVX2 */

/* c = (3t) >> 8 = [t >= 86] + [t >= 171] for bytes t. */
TARGET_AVX2 static inline __m256i tq1_code_avx2(__m256i t) {
    const __m256i one = _mm256_set1_epi8(1);
    const __m256i c1 = _mm256_min_epu8(_mm256_subs_epu8(t, _mm256_set1_epi8(85)), one);
    const __m256i c2 = _mm256_min_epu8(_mm256_subs_epu8(t, _mm256_set1_epi8((char)170)), one);
    return _mm256_add_epi8(c1, c2);
}

/* One row against one token. maddubs pairs are at most 2 * 127 * 2 = 508; ten per block sum to at most 5080 in int16. */
TARGET_AVX2 static void tq1_rows_avx2(const job_t *J, int64_t n0, int64_t n1) {
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *w = J->qs + n * J->nb * TQ1_CB;
        for (int64_t t = 0; t < J->T; t++) {
            const int8_t *a = J->xq + t * J->nb * TQ1_AB;
            float yv = 0.0f;
            for (int64_t s = 0; s < J->S; s++) {
                __m256i acc = _mm256_setzero_si256();
                for (int64_t b = J->bounds[s]; b < J->bounds[s + 1]; b++) {
                    const uint8_t *qs = w + TQ1_QS * b, *qh = w + TQ1_QS * J->nb + TQ1_QH * b;
                    PREFETCH(qs + PREFETCH_BYTES);
                    uint8_t llama[TQ1_CB]; /* encoded bytes (a VBMI CPU on this path): llama.cpp's first */
                    if (tq1_encoded) tq1_block_llama(w, J->nb, b, llama), qs = llama, qh = llama + TQ1_QS;
                    __m256i t0 = _mm256_loadu_si256((const __m256i *)qs); /* bytes 0..31, then 32..51: */
                    int32_t h;
                    memcpy(&h, qh, 4);
                    __m256i t1 = _mm256_inserti128_si256(
                        _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(qs + 32))), _mm_cvtsi32_si128(h), 1);
                    const int8_t *ab = a + b * TQ1_AB;
                    __m256i sum16 = _mm256_setzero_si256();
                    for (int c = 0; c < 5; c++) {
                        if (c) {
                            t0 = _mm256_add_epi8(_mm256_add_epi8(t0, t0), t0);
                            t1 = _mm256_add_epi8(_mm256_add_epi8(t1, t1), t1);
                        }
                        const __m256i a0 = _mm256_loadu_si256((const __m256i *)(ab + 64 * c));
                        const __m256i a1 = _mm256_loadu_si256((const __m256i *)(ab + 64 * c + 32));
                        sum16 = _mm256_add_epi16(sum16, _mm256_maddubs_epi16(tq1_code_avx2(t0), a0));
                        sum16 = _mm256_add_epi16(sum16, _mm256_maddubs_epi16(tq1_code_avx2(t1), a1));
                    }
                    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(sum16, ones));
                }
                yv = yv + J->seg_d[n * J->S + s] * (float)(hsum256(acc) - J->bsum[t * J->S + s]);
            }
            J->y[t * J->N + n] = yv * J->xs[t];
        }
    }
}

/* ---------------------------------------------------------------- AVX-512 (VNNI + VBMI) */

#define TARGET_AVX512_VBMI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi")))

typedef struct {
    __m512i ta, tb, c0;
} tq1_tables_t;

TARGET_AVX512_VBMI static inline tq1_tables_t tq1_tables_load(void) {
    tq1_tables_t L;
    L.ta = _mm512_loadu_si512(tq1_ta), L.tb = _mm512_loadu_si512(tq1_tb), L.c0 = _mm512_loadu_si512(tq1_c0);
    return L;
}

/* 64 stored (encoded) bytes -> codes 1..4 as 2-bit fields (*fa: vpermb on bits 0..5 plus vpermb on bits 2..7, read
 * through a 16-bit shift whose bits from the next byte land above the 6 that vpermb reads) and code 0 (*fb: vpermb
 * on bits 0..5). Bytes that are 0 give 0 in both. */
TARGET_AVX512_VBMI static inline __attribute__((always_inline)) void tq1_decode_bytes(__m512i w, const tq1_tables_t *L,
                                                                                   __m512i *fa, __m512i *fb) {
    *fa = _mm512_add_epi8(_mm512_permutexvar_epi8(w, L->ta), _mm512_permutexvar_epi8(_mm512_srli_epi16(w, 2), L->tb));
    *fb = _mm512_permutexvar_epi8(w, L->c0);
}

/* Block b of a row in the kernel order -> its 52 bytes in one register in llama.cpp's order (12 zero bytes after). */
TARGET_AVX512_VBMI static inline __attribute__((always_inline)) __m512i tq1_block_load(const uint8_t *row, int64_t nb,
                                                                                     int64_t b) {
    const __m512i qs = _mm512_maskz_loadu_epi8((__mmask64)0xFFFFFFFFFFFFULL, row + TQ1_QS * b);
    return _mm512_mask_loadu_epi32(qs, (__mmask16)(1 << 12), row + TQ1_QS * nb + TQ1_QH * b - TQ1_QS); /* lane 12 */
}

TARGET_AVX512_VBMI static inline __attribute__((always_inline)) void tq1_decode(const uint8_t *row, int64_t nb,
                                                                             int64_t b, const tq1_tables_t *L,
                                                                             __m512i *fa, __m512i *fb) {
    tq1_decode_bytes(tq1_block_load(row, nb, b), L, fa, fb);
}

/* A block's codes in TQ2_0's chunks (tq1_tq2_chunks): chunk l, lane c holds the code that meets byte 64 l + c of the
 * block's activations in the TQ2 layout, the byte tq1_activations_dense pairs it with. From tq1_decode's register
 * (lanes 0..47 the qs bytes, 48..51 the qh bytes, in llama.cpp's order) and its codes as planes Pn (code n of every
 * lane):
 *   chunk 0: P0[c] for c < 32, P4[c - 32] after;   chunk 1: P1[c], then P0[c] for c in 32..47, P1[c - 16] after;
 *   chunk 2: P2[c] for c < 48, P3[c - 16] after;    chunk 3: P3[c], then P4[c] for c in 32..47, and for
 *   c = 48 + 4 n + m code n of qh byte m (P_n[48 + m]).
 * So the multi-token kernels (tiles, token lanes, AMX) run a TQ1_0 block as 4 chunks against the TQ2-layout
 * activations, TQ2_0's products, where code n of the 52 code bytes against plane n of the TQ1 layout took 5 chunks of
 * 64 (12 lanes of each empty). */
typedef struct {
    __m512i i0, i1, i2, i3, iq;
} tq1_tq2_index_t;

TARGET_AVX512_VBMI static inline tq1_tq2_index_t tq1_tq2_index(void) {
    tq1_tq2_index_t X;
    X.i0 = _mm512_loadu_si512(tq1_tq2_idx[0]), X.i1 = _mm512_loadu_si512(tq1_tq2_idx[1]);
    X.i2 = _mm512_loadu_si512(tq1_tq2_idx[2]), X.i3 = _mm512_loadu_si512(tq1_tq2_idx[3]);
    X.iq = _mm512_loadu_si512(tq1_tq2_idx[4]);
    return X;
}

TARGET_AVX512_VBMI static inline __attribute__((always_inline)) void tq1_tq2_chunks(__m512i fa, __m512i fb,
                                                                                 const tq1_tq2_index_t *X,
                                                                                 __m512i *out) {
    const __m512i m3 = _mm512_set1_epi8(3);
    const __m512i p0 = fb, p1 = _mm512_and_si512(fa, m3), p2 = _mm512_and_si512(_mm512_srli_epi16(fa, 2), m3);
    const __m512i p3 = _mm512_and_si512(_mm512_srli_epi16(fa, 4), m3);
    const __m512i p4 = _mm512_and_si512(_mm512_srli_epi16(fa, 6), m3);
    out[0] = _mm512_permutex2var_epi8(p0, X->i0, p4);
    out[1] = _mm512_permutex2var_epi8(p1, X->i1, p0);
    out[2] = _mm512_permutex2var_epi8(p2, X->i2, p3);
    __m512i c3 = _mm512_permutex2var_epi8(p3, X->i3, p4);
    c3 = _mm512_mask_blend_epi8(0x00FF000000000000ULL, c3, _mm512_permutex2var_epi8(p0, X->iq, p1)); /* 48..55 */
    out[3] = _mm512_mask_blend_epi8(0xFF00000000000000ULL, c3, _mm512_permutex2var_epi8(p2, X->iq, p3)); /* 56.. */
}

/* Byte mask of run bytes [lo, hi) inside the 64-byte chunk at 64 c. */
static inline __mmask64 tq1_chunk_mask(int64_t c, int64_t lo, int64_t hi) {
    const int64_t a = lo > 64 * c ? lo - 64 * c : 0, z = hi < 64 * c + 64 ? hi - 64 * c : 64;
    const __mmask64 upto = z >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << z) - 1);
    return upto & ~(((__mmask64)1 << a) - 1);
}

/* Where one scale segment, blocks [b0, b1), lies in a row's run (tq1_seg_plan): its qs bytes [48 b0, 48 b1) and its qh
 * bytes [48 nb + 4 b0, 48 nb + 4 b1), one range when the segment is the whole row (its qs bytes end where its qh bytes
 * start), else two. Range i: chunks [c0[i], c1[i]), the first under byte mask kf[i] and the last under kl[i]
 * (all-ones where the range covers the chunk). The same for every row: tq1_gemv1_avx512 works it out once per call. */
typedef struct {
    int n;
    int64_t c0[2], c1[2];
    __mmask64 kf[2], kl[2];
} tq1_seg_t;

static inline tq1_seg_t tq1_seg_plan(int64_t nb, int64_t b0, int64_t b1) {
    tq1_seg_t P;
    const int64_t lo[2] = {TQ1_QS * b0, TQ1_QS * nb + TQ1_QH * b0}, hi[2] = {TQ1_QS * b1, TQ1_QS * nb + TQ1_QH * b1};
    const int whole = b0 == 0 && b1 == nb;
    P.n = b1 <= b0 ? 0 : whole ? 1 : 2;
    for (int i = 0; i < 2; i++) {
        const int64_t l = lo[i], h = whole ? hi[1] : hi[i];
        P.c0[i] = l / 64, P.c1[i] = (h + 63) / 64;
        P.kf[i] = tq1_chunk_mask(P.c0[i], l, h), P.kl[i] = tq1_chunk_mask(P.c1[i] - 1, l, h);
    }
    return P;
}

/* One-token dot products of rows R (1 or 2, adjacent: row r at w + r * rowb) over segment P, from the dense layout at
 * xd: each chunk of the segment's ranges decoded once per row and its 5 codes against the chunk's 5 planes. Out: each
 * row's 16 lane sums of sum c a. Two rows share the activation loads; codes 0 and 1 are not scaled and share an
 * accumulator, so 8 accumulators, 5 activations and the 3 table registers fit in the 32 zmm registers. */
TARGET_AVX512_VBMI static inline __attribute__((always_inline)) void tq1_dense_dot(const uint8_t *w, int64_t rowb,
                                                                                 const int8_t *xd, const tq1_seg_t *P,
                                                                                 const int R, const tq1_tables_t *L,
                                                                                 __m512i *out) {
    const __m512i m0 = _mm512_set1_epi8(0x03), m1 = _mm512_set1_epi8(0x0c);
    const __m512i m2 = _mm512_set1_epi8(0x30), m3 = _mm512_set1_epi8((char)0xc0);
    __m512i p0 = _mm512_setzero_si512(), p1 = p0, p2 = p0, p3 = p0, q0 = p0, q1 = p0, q2 = p0, q3 = p0;
    for (int i = 0; i < P->n; i++)
        for (int64_t c = P->c0[i]; c < P->c1[i]; c++) {
            const __mmask64 all = ~(__mmask64)0;
            const __mmask64 k = (c == P->c0[i] ? P->kf[i] : all) & (c == P->c1[i] - 1 ? P->kl[i] : all);
            const uint8_t *wa = w + 64 * c, *wb = wa + rowb;
            /* Each line three times, as gemv1_avx512 (the prefetches run ahead along the row pair's stream). */
            PREFETCH3_TQ1(wa);
            if (R == 2) PREFETCH3_TQ1(wb);
            __m512i fa, fb, ga = _mm512_setzero_si512(), gb = ga;
            tq1_decode_bytes(_mm512_maskz_loadu_epi8(k, wa), L, &fa, &fb);
            if (R == 2) tq1_decode_bytes(_mm512_maskz_loadu_epi8(k, wb), L, &ga, &gb);
            const int8_t *ab = xd + 5 * 64 * c;
            __m512i x0 = _mm512_loadu_si512(ab), x1 = _mm512_loadu_si512(ab + 64), x2 = _mm512_loadu_si512(ab + 128);
            __m512i x3 = _mm512_loadu_si512(ab + 192), x4 = _mm512_loadu_si512(ab + 256);
            __asm__("" : "+v"(x0), "+v"(x1), "+v"(x2), "+v"(x3), "+v"(x4));
            DPBUSD_R(p0, fb, x0);
            DPBUSD_R(p0, _mm512_and_si512(fa, m0), x1);
            DPBUSD_R(p1, _mm512_and_si512(fa, m1), x2);
            DPBUSD_R(p2, _mm512_and_si512(fa, m2), x3);
            DPBUSD_R(p3, _mm512_and_si512(fa, m3), x4);
            if (R == 2) {
                DPBUSD_R(q0, gb, x0);
                DPBUSD_R(q0, _mm512_and_si512(ga, m0), x1);
                DPBUSD_R(q1, _mm512_and_si512(ga, m1), x2);
                DPBUSD_R(q2, _mm512_and_si512(ga, m2), x3);
                DPBUSD_R(q3, _mm512_and_si512(ga, m3), x4);
            }
            __asm__("" : "+v"(p0), "+v"(p1), "+v"(p2), "+v"(p3), "+v"(q0), "+v"(q1), "+v"(q2), "+v"(q3));
        }
    __m512i v = _mm512_add_epi32(p0, _mm512_srai_epi32(p1, 2));
    v = _mm512_add_epi32(v, _mm512_srai_epi32(p2, 4));
    out[0] = _mm512_add_epi32(v, _mm512_srai_epi32(p3, 6));
    if (R == 2) {
        v = _mm512_add_epi32(q0, _mm512_srai_epi32(q1, 2));
        v = _mm512_add_epi32(v, _mm512_srai_epi32(q2, 4));
        out[1] = _mm512_add_epi32(v, _mm512_srai_epi32(q3, 6));
    }
}

/* One token: rows 16 at a time reduced together (hsum16x16) and finished with one vector epilogue, as gemv1_avx512.
 * J->xq holds the dense activation layout here (tq1_act_build). */
TARGET_AVX512_VBMI __attribute__((noinline)) static void tq1_gemv1_avx512(const job_t *J, int64_t n0, int64_t n1) {
    const tq1_tables_t L = tq1_tables_load();
    const int64_t rowb = J->nb * TQ1_CB;
    int64_t n = n0;
    if (J->S <= GROUP_SEGMENTS) {
        tq1_seg_t P[GROUP_SEGMENTS];
        for (int64_t s = 0; s < J->S; s++) P[s] = tq1_seg_plan(J->nb, J->bounds[s], J->bounds[s + 1]);
        __m512i v[GROUP_SEGMENTS][16];
        for (; n + 16 <= n1; n += 16) {
            for (int r = 0; r < 16; r += 2)
                for (int64_t s = 0; s < J->S; s++) {
                    __m512i o[2];
                    tq1_dense_dot(J->qs + (n + r) * rowb, rowb, J->xq, &P[s], 2, &L, o);
                    v[s][r] = o[0], v[s][r + 1] = o[1];
                }
            epilogue16(J, n, v, 0);
        }
    }
    for (; n < n1; n++) {
        float yv = 0.0f;
        for (int64_t s = 0; s < J->S; s++) {
            const tq1_seg_t P = tq1_seg_plan(J->nb, J->bounds[s], J->bounds[s + 1]);
            __m512i o[2];
            tq1_dense_dot(J->qs + n * rowb, rowb, J->xq, &P, 1, &L, o);
            const int32_t acc = _mm512_reduce_add_epi32(o[0]);
            yv = yv + J->seg_d[n * J->S + s] * (float)(acc - J->bsum[s]);
        }
        J->y[n] = yv * J->xs[0];
    }
}

/* GEMM tile: R rows x TT tokens (<= 4 x 4), from the rows' blocks in TQ2_0's chunks (tq1_rows_tq2: 256 bytes per
 * block, rows dec_row bytes apart) against the TQ2-layout activations (J->xq, K bytes per token): the loop of
 * tile_avx512 with its code vectors already unpacked. */
TARGET_AVX512_VBMI static inline __attribute__((always_inline)) void tq1_tile_avx512(const job_t *J, int64_t n,
                                                                                  int64_t t, const int R,
                                                                                  const int TT, const uint8_t *dec,
                                                                                  int64_t dec_row) {
    const int64_t K = J->K;
    float yv[4][4];
    _Pragma("GCC unroll 4")
    for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 4")
        for (int k = 0; k < TT; k++) yv[r][k] = 0.0f;
    for (int64_t s = 0; s < J->S; s++) {
        TILE_ACCS(TILE_ZERO) /* named accumulators, as in tile_avx512 */
        for (int64_t b = J->bounds[s]; b < J->bounds[s + 1]; b++) {
            _Pragma("GCC unroll 4")
            for (int c = 0; c < 4; c++) {
                __m512i wc[4];
                _Pragma("GCC unroll 4")
                for (int r = 0; r < R; r++) wc[r] = _mm512_loadu_si512(dec + r * dec_row + b * 256 + 64 * c);
                const int8_t *x = J->xq + t * K + b * QK + 64 * c;
                TILE_TOKEN(0, x, wc);
                TILE_TOKEN(1, x + K, wc);
                TILE_TOKEN(2, x + 2 * K, wc);
                TILE_TOKEN(3, x + 3 * K, wc);
            }
            TILE_PIN();
        }
        __m512i acc[4][4];
#define TQ1_TILE_OUT(r, k) acc[r][k] = a##r##k;
        TILE_ACCS(TQ1_TILE_OUT)
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

#define TQ1_TILE_ROW(R)                                                                       \
    do {                                                                                      \
        tq1_rows_tq2(J, n, R, dec, 0);                                                        \
        int64_t t = c0;                                                                       \
        for (; t + 4 <= c1; t += 4) tq1_tile_avx512(J, n, t, R, 4, dec, dec_row);             \
        switch (c1 - t) {                                                                     \
            case 3: tq1_tile_avx512(J, n, t, R, 3, dec, dec_row); break;                      \
            case 2: tq1_tile_avx512(J, n, t, R, 2, dec, dec_row); break;                      \
            case 1: tq1_tile_avx512(J, n, t, R, 1, dec, dec_row); break;                      \
            default: break;                                                                   \
        }                                                                                     \
    } while (0)

/* R rows' blocks in TQ2_0's chunks (tq1_tq2_chunks) into out: the 4 chunks themselves (256 bytes a block, rows
 * nb*256 apart: the tiles), or with `packed` as TQ2_0 code bytes, chunk l being field l of each byte (64 bytes a
 * block, rows nb*64 apart: the quad GEMM, quad_rows_tq1). */
TARGET_AVX512_VBMI static inline __attribute__((always_inline)) void tq1_rows_tq2(const job_t *J, int64_t n, int R,
                                                                               uint8_t *out, const int packed) {
    const tq1_tables_t L = tq1_tables_load();
    const tq1_tq2_index_t X = tq1_tq2_index();
    const int64_t rowb = J->nb * TQ1_CB;
    for (int r = 0; r < R; r++)
        for (int64_t b = 0; b < J->nb; b++) {
            const uint8_t *row = J->qs + (n + r) * rowb;
            PREFETCH(row + TQ1_QS * b + PREFETCH_BYTES);
            __m512i fa, fb, c[4];
            tq1_decode(row, J->nb, b, &L, &fa, &fb);
            tq1_tq2_chunks(fa, fb, &X, c);
            if (packed) { /* codes < 4: no bit leaves its byte */
                const __m512i lo = _mm512_or_si512(c[0], _mm512_slli_epi16(c[1], 2));
                const __m512i hi = _mm512_or_si512(_mm512_slli_epi16(c[2], 4), _mm512_slli_epi16(c[3], 6));
                _mm512_storeu_si512(out + (r * J->nb + b) * QB, _mm512_or_si512(lo, hi));
            } else {
                for (int l = 0; l < 4; l++) _mm512_storeu_si512(out + (r * J->nb + b) * 256 + 64 * l, c[l]);
            }
        }
}

/* Rows [n0, n1) against T tokens one row and one token at a time, from the same chunks (no buffer): what
 * tq1_gemm_avx512 does when it cannot get its buffer. */
TARGET_AVX512_VBMI static void tq1_rows_tq2_layout(const job_t *J, int64_t n0, int64_t n1) {
    const tq1_tables_t L = tq1_tables_load();
    const tq1_tq2_index_t X = tq1_tq2_index();
    const int64_t rowb = J->nb * TQ1_CB;
    for (int64_t n = n0; n < n1; n++)
        for (int64_t t = 0; t < J->T; t++) {
            float yv = 0.0f;
            for (int64_t s = 0; s < J->S; s++) {
                __m512i acc = _mm512_setzero_si512();
                for (int64_t b = J->bounds[s]; b < J->bounds[s + 1]; b++) {
                    __m512i fa, fb, c[4];
                    tq1_decode(J->qs + n * rowb, J->nb, b, &L, &fa, &fb);
                    tq1_tq2_chunks(fa, fb, &X, c);
                    for (int l = 0; l < 4; l++)
                        acc = _mm512_dpbusd_epi32(acc, c[l], _mm512_loadu_si512(J->xq + t * J->K + b * QK + 64 * l));
                }
                const int32_t v = _mm512_reduce_add_epi32(acc);
                yv = yv + J->seg_d[n * J->S + s] * (float)(v - J->bsum[t * J->S + s]);
            }
            J->y[t * J->N + n] = yv * J->xs[t];
        }
}

/* Several tokens, against the TQ2-layout activations: up to 4 rows x 4 tokens per tile. Each group of 4 rows is
 * decoded into TQ2_0's chunks (a buffer of 4 * nb * 256 bytes, in L1/L2) once per chunk of TOKEN_CHUNK tokens and read
 * by that chunk's tiles: table lookups cost more than the products, so decoding once per 4 tokens made the batch-64
 * GEMM 1.6x slower than TQ2_0's. */
TARGET_AVX512_VBMI __attribute__((noinline)) static void tq1_gemm_avx512(const job_t *J, int64_t n0, int64_t n1) {
    const int64_t dec_row = J->nb * 256;
    static _Thread_local void *buf = NULL;
    static _Thread_local size_t size = 0;
    uint8_t *dec = (uint8_t *)grow_buffer(&buf, &size, (size_t)(4 * dec_row));
    if (!dec) {
        tq1_rows_tq2_layout(J, n0, n1);
        return;
    }
    TILE_ROW_GROUPS(TQ1_TILE_ROW);
}

static int tq1_has_vbmi(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx512vbmi") ? 1 : 0;
        tq1_encoding_init(cached); /* the VBMI kernels read encoded bytes (header) */
    }
    return cached;
}
#endif /* SPECTRA_X86 */

static void tq1_run_rows(int path, const job_t *J, int64_t n0, int64_t n1) {
    if (n0 >= n1) return;
#ifdef SPECTRA_X86
    if (path == PATH_AVX512VNNI && tq1_has_vbmi()) {
        if (J->T == 1) tq1_gemv1_avx512(J, n0, n1);
        else tq1_gemm_avx512(J, n0, n1);
        return;
    }
    if (path == PATH_AVX2 || path == PATH_AVX512VNNI) {
        tq1_rows_avx2(J, n0, n1);
        return;
    }
#endif
    tq1_rows_scalar(J, n0, n1);
}
