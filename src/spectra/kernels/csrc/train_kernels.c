/*
 * spectra.kernels._train: the training loss (see spectra/train/loss.py) and causal attention (spectra/kernels/attention.py,
 * further down) on CPU.
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
#include <stdlib.h>
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

/* 16 bfloat16 values as float32 (exact: a bf16 is the top half of a float32). */
TARGET_AVX512 static inline __m512 widen_bf16(__m256i h) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* 16 logits from column j as float32. */
TARGET_AVX512 static inline __m512 load16(const ce_job_t *J, int64_t i, int64_t j) {
    if (J->bf16) return widen_bf16(_mm256_loadu_si256((const __m256i *)((const uint16_t *)J->x + i * J->V + j)));
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

/* ------------------------------------------------------------------------------------------------------------------
 * Causal attention for training (see spectra/model.py, _DenseCausalAttention), bfloat16 in and out, float32 inside.
 * For each of the B·H heads, with q, k, v, do (T, D) and scale c = 1/√D:
 *     forward:  S = c q kᵀ (float32),  P = softmax(S + causal mask) rounded to bf16,  O = P v
 *     backward: dP = do vᵀ,  δ_i = Σ_j dP_ij P_ij,  dS = P ∘ (dP − δ) (bf16),
 *               dq = c dS k,  dk = c dSᵀ q,  dv = Pᵀ do
 * P is returned (B·H, T, T), zero above the diagonal, and handed back to the backward pass. Every product accumulates
 * in float32 with vdpbf16ps (AVX-512 BF16): a bf16 pair from the left operand, broadcast, times 16 columns of pairs
 * from the right one, which is first repacked so that the two elements of each pair are adjacent. Only the causal
 * part (j ≤ i) is computed. q, k, v, o and do are (B, H, T, D) with any strides over B, H and T (D contiguous), so the
 * caller's transposed views need no copies; dq, dk, dv are written contiguous. Heads are split over OpenMP threads.
 * The scores, the softmax, dP and δ stay in float32: this is the flash kernel's rounding, with P and dS as the only
 * bf16 intermediates (torch's batched matmuls would also round dP).
 * ------------------------------------------------------------------------------------------------------------------ */
#ifdef SPECTRA_X86
#define TARGET_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define ATT_MR 6 /* rows per register tile; tiles are ATT_MR x 64 float32 accumulators (24 registers) */

typedef struct {
    uint16_t *p;
    int64_t sb, sh, st; /* element strides over B, H, T */
} view_t;

static inline uint16_t *row_of(const view_t *v, int64_t b, int64_t h, int64_t t) {
    return v->p + b * v->sb + h * v->sh + t * v->st;
}

/* C[m][n] = Σ_{kk ∈ [k0, k1)} A(m, kk) · B(kk, n) for m < MR, n < 16 NV: A(m, kk) is the bf16 pair at word
 * a[m sam + kk sak], B(kk, n .. n+15) the 16 pairs at words b[kk sbk + n]. C is float32 with row stride ldc. */
static inline __attribute__((always_inline)) TARGET_BF16 void tile(const int MR, const int NV, const uint32_t *a,
                                                                    int64_t sam, int64_t sak, const uint32_t *b,
                                                                    int64_t sbk, int64_t k0, int64_t k1, float *c,
                                                                    int64_t ldc) {
    __m512 acc[ATT_MR][4];
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < NV; v++) acc[r][v] = _mm512_setzero_ps();
    for (int64_t kk = k0; kk < k1; kk++) {
        __m512bh bv[4];
        for (int v = 0; v < NV; v++) bv[v] = (__m512bh)_mm512_loadu_si512(b + kk * sbk + 16 * v);
        for (int r = 0; r < MR; r++) {
            const __m512bh av = (__m512bh)_mm512_set1_epi32((int)a[r * sam + kk * sak]);
            for (int v = 0; v < NV; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], av, bv[v]);
        }
    }
    for (int r = 0; r < MR; r++)
        for (int v = 0; v < NV; v++) _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
}

#define TILE_CASE(MR, NV)                                        \
    case (MR) * 8 + (NV):                                        \
        tile(MR, NV, a, sam, sak, b, sbk, k0, k1, c, ldc);       \
        break;
#define TILE_ROW(MR) TILE_CASE(MR, 1) TILE_CASE(MR, 2) TILE_CASE(MR, 3) TILE_CASE(MR, 4)

/* C[m][0 .. N) for m < mr (mr ≤ ATT_MR, N a multiple of 16), in column chunks of 64. */
TARGET_BF16 static void gemm_rows(int mr, int64_t N, const uint32_t *a, int64_t sam, int64_t sak, const uint32_t *b0,
                                  int64_t sbk, int64_t k0, int64_t k1, float *c0, int64_t ldc) {
    for (int64_t n = 0; n < N; n += 64) {
        const int nv = (int)((N - n) >= 64 ? 4 : (N - n) / 16);
        const uint32_t *b = b0 + n;
        float *c = c0 + n;
        switch (mr * 8 + nv) {
            TILE_ROW(1) TILE_ROW(2) TILE_ROW(3) TILE_ROW(4) TILE_ROW(5) TILE_ROW(6)
        }
    }
}

/* dst word [i/2][c] = (src[i][c], src[i+1][c]) for rows i < 2·rows2 (rows ≥ nrows read as 0) and c < ncols; dst row
 * stride dcols words (columns ncols .. dcols are 0). src rows have stride ss elements. */
TARGET_BF16 static void pair_rows(uint32_t *dst, int64_t rows2, int64_t dcols, const uint16_t *src, int64_t ss,
                                  int64_t nrows, int64_t ncols) {
    const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                        37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int64_t ii = 0; ii < rows2; ii++) {
        const int64_t i = 2 * ii;
        uint32_t *d = dst + ii * dcols;
        int64_t c = 0;
        for (; c < ncols; c += 32) {
            const __mmask32 m = ncols - c >= 32 ? 0xffffffffu : (((__mmask32)1 << (ncols - c)) - 1);
            const __m512i x = i < nrows ? _mm512_maskz_loadu_epi16(m, src + i * ss + c) : _mm512_setzero_si512();
            const __m512i y = i + 1 < nrows ? _mm512_maskz_loadu_epi16(m, src + (i + 1) * ss + c)
                                            : _mm512_setzero_si512();
            const __m512i p0 = _mm512_permutex2var_epi16(x, lo, y), p1 = _mm512_permutex2var_epi16(x, hi, y);
            if (c + 16 <= dcols) _mm512_storeu_si512(d + c, p0);
            if (c + 32 <= dcols) _mm512_storeu_si512(d + c + 16, p1);
        }
        for (int64_t z = c; z < dcols; z++) d[z] = 0;
    }
}

/* dst[dd][j] = word dd of row j (the pair of elements 2dd, 2dd+1) for j < n (rows n .. dcols are 0), dd < D/2. */
static void pair_cols(uint32_t *dst, int64_t dcols, const view_t *v, int64_t b, int64_t h, int64_t n, int64_t D) {
    for (int64_t j = 0; j < dcols; j++) {
        const uint32_t *src = j < n ? (const uint32_t *)row_of(v, b, h, j) : NULL;
        for (int64_t dd = 0; dd < D / 2; dd++) dst[dd * dcols + j] = src ? src[dd] : 0;
    }
}

/* A (B,H,T,D) view's rows, one head, as dst[i/2][d][2] (T padded to rows2·2 with zeros). */
TARGET_BF16 static void pair_head_rows(uint32_t *dst, int64_t rows2, const view_t *v, int64_t b, int64_t h,
                                       int64_t T, int64_t D) {
    pair_rows(dst, rows2, D, row_of(v, b, h, 0), v->st, T, D);
}

/* float32 x 16 -> bf16 rounded to nearest even, stored under mask */
TARGET_BF16 static inline void store_bf16(uint16_t *dst, __m512 x, __mmask16 m) {
    _mm256_mask_storeu_epi16(dst, m, (__m256i)_mm512_cvtneps_pbh(x));
}

static inline __mmask16 lanes_below(int64_t n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }

/* rows r < mr of a float32 tile (row stride D) times `scale`, rounded to bf16 at dst + r·ld */
TARGET_BF16 static void store_tile(uint16_t *dst, int64_t ld, const float *acc, int mr, int64_t D, float scale) {
    const __m512 sc = _mm512_set1_ps(scale);
    for (int r = 0; r < mr; r++)
        for (int64_t d = 0; d < D; d += 16)
            store_bf16(dst + r * ld + d, _mm512_mul_ps(_mm512_loadu_ps(acc + r * D + d), sc), 0xffff);
}

typedef struct {
    view_t q, k, v, o, dout, dq, dk, dv;
    uint16_t *probs; /* (B·H, T, T) */
    int64_t B, H, T, D;
    float scale;
} attn_job_t;

static int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

TARGET_BF16 static void attn_forward_head(const attn_job_t *J, int64_t bh, uint32_t *kp, uint32_t *vp, float *s,
                                          uint32_t *pb, float *o) {
    const int64_t T = J->T, D = J->D, Tp = round_up(T, 64), b = bh / J->H, h = bh % J->H;
    uint16_t *P = J->probs + bh * T * T;
    pair_cols(kp, Tp, &J->k, b, h, T, D);       /* kp[d/2][j]: B operand of S = q kᵀ */
    pair_head_rows(vp, Tp / 2, &J->v, b, h, T, D); /* vp[j/2][d]: B operand of O = P v */
    const __m512 sc = _mm512_set1_ps(J->scale);
    for (int64_t i0 = 0; i0 < T; i0 += ATT_MR) {
        const int mr = (int)(T - i0 < ATT_MR ? T - i0 : ATT_MR);
        const int64_t jn = round_up(i0 + mr, 16); /* columns this block needs */
        gemm_rows(mr, jn, (const uint32_t *)row_of(&J->q, b, h, i0), J->q.st / 2, 1, kp, Tp, 0, D / 2, s, Tp);
        for (int r = 0; r < mr; r++) {
            const int64_t i = i0 + r, nv = i + 1; /* valid columns 0 .. i */
            float *sr = s + r * Tp;
            __m512 mx = _mm512_set1_ps(-INFINITY);
            for (int64_t j = 0; j < nv; j += 16)
                mx = _mm512_mask_max_ps(mx, lanes_below(nv - j), _mm512_mul_ps(_mm512_loadu_ps(sr + j), sc), mx);
            const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
            __m512 sum = _mm512_setzero_ps();
            for (int64_t j = 0; j < nv; j += 16) {
                const __m512 e = _mm512_maskz_mov_ps(lanes_below(nv - j),
                                                     exp512(_mm512_sub_ps(_mm512_mul_ps(_mm512_loadu_ps(sr + j), sc), m)));
                _mm512_storeu_ps(sr + j, e);
                sum = _mm512_add_ps(sum, e);
            }
            const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
            uint16_t *pr = (uint16_t *)(pb + r * (Tp / 2));
            for (int64_t j = 0; j < Tp; j += 16) {
                const __m512 p = j < nv ? _mm512_maskz_mul_ps(lanes_below(nv - j), _mm512_loadu_ps(sr + j), inv)
                                        : _mm512_setzero_ps();
                store_bf16(pr + j, p, 0xffff);
                if (j < T) store_bf16(P + i * T + j, p, lanes_below(T - j));
            }
        }
        const int64_t kmax = (i0 + mr + 1) / 2; /* pairs of key columns reaching the block's last row */
        gemm_rows(mr, D, pb, Tp / 2, 1, vp, D, 0, kmax, o, D);
        store_tile(row_of(&J->o, b, h, i0), J->o.st, o, mr, D, 1.0f);
    }
}

typedef struct {
    uint32_t *vp, *kp, *qp, *dop, *dst, *pt;
    uint16_t *ds;
    float *dp, *acc;
} bwd_scratch_t;

TARGET_BF16 static void attn_backward_head(const attn_job_t *J, int64_t bh, const bwd_scratch_t *W) {
    const int64_t T = J->T, D = J->D, Tp = round_up(T, 64), b = bh / J->H, h = bh % J->H;
    const uint16_t *P = J->probs + bh * T * T;
    pair_cols(W->vp, Tp, &J->v, b, h, T, D);              /* vp[d/2][j]: B of dP = do vᵀ */
    pair_head_rows(W->kp, Tp / 2, &J->k, b, h, T, D);     /* kp[j/2][d]: B of dq = dS k */
    pair_head_rows(W->qp, Tp / 2, &J->q, b, h, T, D);     /* qp[i/2][d]: B of dk = dSᵀ q */
    pair_head_rows(W->dop, Tp / 2, &J->dout, b, h, T, D); /* dop[i/2][d]: B of dv = Pᵀ do */
    memset(W->ds, 0, (size_t)(Tp * Tp) * sizeof(uint16_t));
    for (int64_t i0 = 0; i0 < T; i0 += ATT_MR) {
        const int mr = (int)(T - i0 < ATT_MR ? T - i0 : ATT_MR);
        const int64_t jn = round_up(i0 + mr, 16);
        gemm_rows(mr, jn, (const uint32_t *)row_of(&J->dout, b, h, i0), J->dout.st / 2, 1, W->vp, Tp, 0, D / 2, W->dp,
                  Tp);
        for (int r = 0; r < mr; r++) {
            const int64_t i = i0 + r, nv = i + 1;
            const float *dpr = W->dp + r * Tp;
            const uint16_t *pr = P + i * T;
            __m512 dl = _mm512_setzero_ps();
            for (int64_t j = 0; j < nv; j += 16) {
                const __mmask16 m = lanes_below(nv - j);
                const __m512 p = widen_bf16(_mm256_maskz_loadu_epi16(m, pr + j));
                dl = _mm512_add_ps(dl, _mm512_maskz_mul_ps(m, p, _mm512_loadu_ps(dpr + j)));
            }
            const __m512 delta = _mm512_set1_ps(_mm512_reduce_add_ps(dl));
            for (int64_t j = 0; j < nv; j += 16) {
                const __mmask16 m = lanes_below(nv - j);
                const __m512 p = widen_bf16(_mm256_maskz_loadu_epi16(m, pr + j));
                store_bf16(W->ds + i * Tp + j, _mm512_mul_ps(p, _mm512_sub_ps(_mm512_loadu_ps(dpr + j), delta)), m);
            }
        }
        gemm_rows(mr, D, (const uint32_t *)(W->ds + i0 * Tp), Tp / 2, 1, W->kp, D, 0, (i0 + mr + 1) / 2, W->acc, D);
        store_tile(J->dq.p + (bh * T + i0) * D, D, W->acc, mr, D, J->scale);
    }
    /* transposed pairs: dst[i/2][j] = (dS_ij, dS_i+1,j), pt[i/2][j] = (P_ij, P_i+1,j) */
    pair_rows(W->dst, Tp / 2, Tp, W->ds, Tp, T, Tp);
    pair_rows(W->pt, Tp / 2, Tp, P, T, T, T);
    uint16_t *dk = J->dk.p + bh * T * D, *dv = J->dv.p + bh * T * D;
    const int64_t kend = (T + 1) / 2;
    for (int64_t j0 = 0; j0 < T; j0 += ATT_MR) {
        const int mr = (int)(T - j0 < ATT_MR ? T - j0 : ATT_MR);
        gemm_rows(mr, D, W->dst + j0, 1, Tp, W->qp, D, j0 / 2, kend, W->acc, D);
        store_tile(dk + j0 * D, D, W->acc, mr, D, J->scale);
        gemm_rows(mr, D, W->pt + j0, 1, Tp, W->dop, D, j0 / 2, kend, W->acc, D);
        store_tile(dv + j0 * D, D, W->acc, mr, D, 1.0f);
    }
}

static int attention_bf16_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512bf16"); /* the features of TARGET_BF16 */
}

/* Runs the heads over threads; 0 when scratch memory could not be allocated. */
static int attn_run(const attn_job_t *J, int backward, int threads) {
    const int64_t Tp = round_up(J->T, 64), D = J->D, BH = J->B * J->H;
    const size_t pack = (size_t)(Tp / 2 * D) * 4, sq = (size_t)(Tp * Tp) * 4;
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(threads > 0 ? threads : 1) reduction(| : failed)
#endif
    {
        if (!backward) {
            uint32_t *kp = malloc(pack), *vp = malloc(pack), *pb = malloc((size_t)(ATT_MR * Tp) * 2);
            float *s = malloc((size_t)(ATT_MR * Tp) * 4), *o = malloc((size_t)(ATT_MR * D) * 4);
            failed = !(kp && vp && pb && s && o);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (int64_t bh = 0; bh < BH; bh++)
                if (!failed) attn_forward_head(J, bh, kp, vp, s, pb, o);
            free(kp), free(vp), free(pb), free(s), free(o);
        } else {
            bwd_scratch_t W = {malloc(pack), malloc(pack), malloc(pack), malloc(pack), malloc(sq / 2), malloc(sq / 2),
                               malloc(sq / 2), malloc((size_t)(ATT_MR * Tp) * 4), malloc((size_t)(ATT_MR * D) * 4)};
            failed = !(W.vp && W.kp && W.qp && W.dop && W.dst && W.pt && W.ds && W.dp && W.acc);
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (int64_t bh = 0; bh < BH; bh++)
                if (!failed) attn_backward_head(J, bh, &W);
            free(W.vp), free(W.kp), free(W.qp), free(W.dop), free(W.dst), free(W.pt), free(W.ds), free(W.dp);
            free(W.acc);
        }
    }
    return !failed;
}
#endif /* SPECTRA_X86 */

static int parse_view(PyObject *t, void *out) {
    unsigned long long p;
    long long sb, sh, st;
    if (!PyArg_ParseTuple(t, "KLLL", &p, &sb, &sh, &st)) return 0;
#ifdef SPECTRA_X86
    *(view_t *)out = (view_t){(uint16_t *)(uintptr_t)p, sb, sh, st};
#else
    (void)out;
#endif
    return 1;
}

/* attention_forward(q, k, v, o, probs, B, H, T, D, scale, threads) and
 * attention_backward(q, k, v, do, dq, dk, dv, probs, B, H, T, D, scale, threads): every tensor a tuple
 * (pointer, stride_b, stride_h, stride_t) in elements (probs a pointer); checked by the caller. */
static PyObject *attention_call(PyObject *args, int backward) {
#ifdef SPECTRA_X86
    attn_job_t J;
    memset(&J, 0, sizeof J);
    unsigned long long pprobs;
    long long B, H, T, D;
    float scale;
    int threads, ok;
    if (backward)
        ok = PyArg_ParseTuple(args, "O&O&O&O&O&O&O&KLLLLfi", parse_view, &J.q, parse_view, &J.k, parse_view, &J.v,
                              parse_view, &J.dout, parse_view, &J.dq, parse_view, &J.dk, parse_view, &J.dv, &pprobs,
                              &B, &H, &T, &D, &scale, &threads);
    else
        ok = PyArg_ParseTuple(args, "O&O&O&O&KLLLLfi", parse_view, &J.q, parse_view, &J.k, parse_view, &J.v,
                              parse_view, &J.o, &pprobs, &B, &H, &T, &D, &scale, &threads);
    if (!ok) return NULL;
    if (B <= 0 || H <= 0 || T <= 0 || D <= 0 || D % 16)
        return PyErr_Format(PyExc_ValueError, "attention: bad sizes B=%lld H=%lld T=%lld D=%lld (D a multiple of 16)",
                            B, H, T, D);
    if (!attention_bf16_supported()) return PyErr_Format(PyExc_ValueError, "this CPU has no AVX-512 BF16");
    J.probs = (uint16_t *)(uintptr_t)pprobs;
    J.B = B, J.H = H, J.T = T, J.D = D, J.scale = scale;
    int done;
    Py_BEGIN_ALLOW_THREADS
    done = attn_run(&J, backward, threads);
    Py_END_ALLOW_THREADS
    if (!done) return PyErr_NoMemory();
    Py_RETURN_NONE;
#else
    (void)args, (void)backward;
    return PyErr_Format(PyExc_ValueError, "the attention kernel needs an x86-64 CPU with AVX-512 BF16");
#endif
}

static PyObject *py_attention_forward(PyObject *self, PyObject *args) {
    (void)self;
    return attention_call(args, 0);
}

static PyObject *py_attention_backward(PyObject *self, PyObject *args) {
    (void)self;
    return attention_call(args, 1);
}

static PyObject *py_attention_supported(PyObject *self, PyObject *noargs) {
    (void)self, (void)noargs;
#ifdef SPECTRA_X86
    return PyBool_FromLong(attention_bf16_supported());
#else
    Py_RETURN_FALSE;
#endif
}

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
    {"attention_forward", py_attention_forward, METH_VARARGS, "Causal attention forward, bf16 (see the source)."},
    {"attention_backward", py_attention_backward, METH_VARARGS, "Causal attention backward, bf16 (see the source)."},
    {"attention_supported", py_attention_supported, METH_NOARGS, "Whether this CPU runs the attention kernel."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_train", "spectra's training kernels for CPUs", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__train(void) { return PyModule_Create(&module); }
