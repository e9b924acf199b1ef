/*
 * One pass of the quad GEMM (quad_kernels.h, which includes this file twice): QUAD_PASS is the function's name,
 * QUAD_PASS_TARGET its target attribute and QUAD_PASS_GFNI whether a TQ2_0 code field is taken out of its byte by one
 * GFNI affine map (gf2p8affineqb: the bits 2l and 2l + 1 moved to 0 and 1, the rest cleared) instead of a shift and
 * an AND. The two builds give the same code bytes, so the same sums. The file has no include guard on purpose.
 */

QUAD_PASS_TARGET static inline __attribute__((always_inline)) void QUAD_PASS(const job_t *J, const int8_t *x4,
                                                                      const int32_t *bq, int64_t n, int64_t g0,
                                                                      const int R, const int NG, const int I8) {
    const int64_t K = J->K, S = J->S;
    const __m512i m3 = _mm512_set1_epi8(3);
    const int8_t *xg = x4 + g0 * 4 * K;
    __m512 out[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t s = 0; s < S; s++) {
        TILE_ACCS(TILE_ZERO)
        for (int64_t b = J->bounds[s]; b < J->bounds[s + 1]; b++) {
            if (I8) {
                /* int8 rows are only K bytes: too short a stream for the hardware prefetcher (i8_tile_avx512) */
                const uint8_t *ahead = J->qs + (n + I8_PF_GROUPS * 4) * K + b * QK;
                _Pragma("GCC unroll 4")
                for (int r = 0; r < 4; r++)
                    for (int c = 0; c < QK; c += 64) PREFETCH(ahead + r * K + c);
                _Pragma("GCC unroll 16")
                for (int c = 0; c < 16; c++) {
                    __m512i w[4];
                    _Pragma("GCC unroll 4")
                    for (int r = 0; r < R; r++)
                        w[r] = _mm512_broadcast_i32x4(
                            _mm_loadu_si128((const __m128i *)(J->qs + (n + r) * K + b * QK + 16 * c)));
                    const int8_t *xc = xg + (16 * b + c) * 64;
                    QUAD_DP(0);
                    QUAD_DP(1);
                    QUAD_DP(2);
                    QUAD_DP(3);
                }
            } else {
                __m512i raw[4];
                _Pragma("GCC unroll 4")
                for (int r = 0; r < R; r++) PREFETCH(J->qs + ((n + r) * J->nb + b) * QB + PREFETCH_BYTES);
                _Pragma("GCC unroll 4")
                for (int q = 0; q < 4; q++) {
                    _Pragma("GCC unroll 4")
                    for (int r = 0; r < R; r++)
                        raw[r] = _mm512_broadcast_i32x4(
                            _mm_loadu_si128((const __m128i *)(J->qs + ((n + r) * J->nb + b) * QB + 16 * q)));
                    _Pragma("GCC unroll 4")
                    for (int l = 0; l < 4; l++) {
                        __m512i w[4];
                        _Pragma("GCC unroll 4")
                        for (int r = 0; r < R; r++) {
#if QUAD_PASS_GFNI
                            /* field l, (c >> 2l) & 3, as one affine map of each byte's bits: row 0 of the matrix
                             * (its top byte) takes bit 2l, row 1 bit 2l + 1 */
                            w[r] = l == 0 ? _mm512_and_si512(raw[r], m3)
                                          : _mm512_gf2p8affine_epi64_epi8(
                                                raw[r], _mm512_set1_epi64((long long)((uint64_t)(1u << 2 * l) << 56 |
                                                                                      (uint64_t)(2u << 2 * l) << 48)),
                                                0);
#else
                            __m512i c = raw[r];
                            if (l == 1) c = _mm512_srli_epi16(c, 2);
                            if (l == 2) c = _mm512_srli_epi16(c, 4);
                            if (l == 3) c = _mm512_srli_epi16(c, 6);
                            w[r] = _mm512_and_si512(c, m3);
#endif
                        }
                        const int8_t *xc = xg + (16 * b + 4 * l + q) * 64;
                        QUAD_DP(0);
                        QUAD_DP(1);
                        QUAD_DP(2);
                        QUAD_DP(3);
                    }
                }
            }
            TILE_PIN();
        }
        /* lane 4i + r: seg_d[(n + r) * S + s], the same for every token */
        const __m512 dd = _mm512_broadcast_f32x4(first4_ps(J->seg_d + n * S + s, S, R));
        QUAD_FINISH(0);
        QUAD_FINISH(1);
        QUAD_FINISH(2);
        QUAD_FINISH(3);
    }
    const __mmask8 rows = (__mmask8)((1u << R) - 1);
    for (int g = 0; g < NG; g++) {
        const int64_t t0 = 4 * (g0 + g);
        const __m512 xs = _mm512_castsi512_ps(quad_tokens_epi32((const int32_t *)(const void *)J->xs, t0));
        const __m512 y = _mm512_mul_ps(out[g], xs);
        float *yp = J->y + t0 * J->N + n;
        _mm_mask_storeu_ps(yp, rows, _mm512_castps512_ps128(y));
        _mm_mask_storeu_ps(yp + J->N, rows, _mm512_extractf32x4_ps(y, 1));
        _mm_mask_storeu_ps(yp + 2 * J->N, rows, _mm512_extractf32x4_ps(y, 2));
        _mm_mask_storeu_ps(yp + 3 * J->N, rows, _mm512_extractf32x4_ps(y, 3));
    }
}

