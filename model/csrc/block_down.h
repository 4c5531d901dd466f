/* The down columns of a block of rows in integers (AVX2; sparse_ffn.c's group_span, INT8 activations on).
 *
 * A row's down column adds a * w into the output, w = q * scale + min per group of 32 values. Done row by row in
 * float (simd.h's axpy_i4) every value costs a widening, a conversion and a multiply-add; that made the INT4 FFN
 * compute-bound at under 40% of this machine's memory bandwidth. Here a block of up to 16 rows goes down at once:
 * - each row's coefficient per group, c = a * scale, is rounded to int8 against the largest |c| of the block in
 *   that group (d = max / 127), as INT8 activations are in the dot products (the rounding is at most d / 2, the
 *   error llama.cpp's Q8 activations make in its down projection); the minimums' term a * min stays float;
 * - two rows' nibbles, interleaved, meet their two coefficients in one maddubs, and the block's sums stay in int16
 *   (|sum| <= 8 pairs x 2 x 15 x 127 = 30480 < 2^15) until they are scaled by d once per group.
 * Per value that is about a quarter of the instructions of the float product.
 */
#ifndef M2C_BLOCK_DOWN_H
#define M2C_BLOCK_DOWN_H
#include <math.h>
#include <string.h>

#include "simd.h"

#define DOWN_BLOCK 16     /* rows at most in one block (8 pairs: the int16 sums' bound above) */
#define DOWN_GROUPS 1024  /* groups of 32 at most in a row: D <= 32768 */

#if M2C_AVX2
/* Whether down_i4_block takes rows of n values in groups of `group` (else the caller uses axpy_i4). */
static inline int down_i4_block_fits(int64_t n, int64_t group) {
    return group == 32 && n % 64 == 0 && n / 32 <= DOWN_GROUPS;
}

/* cp[p][g]: the coefficients of rows 2p and 2p + 1 in group g as one int16 (2p's in the low byte: maddubs' order),
 * each rounded against the block's largest |c| in that group; d[g] that largest / 127; ymin[g] += sum_r act[r] *
 * min(r, g). Rows nr..DOWN_BLOCK count as 0. */
static inline void down_i4_coefficients(const f16 *const *sm, const float *act, int nr, int64_t ng,
                                        int16_t (*cp)[DOWN_GROUPS], float *d, float *restrict ymin) {
    int64_t g0 = 0;
    for (; g0 + 8 <= ng; g0 += 8) { /* 8 groups at a time, 16 (scale, min) halves a row */
        __m256 c[DOWN_BLOCK], mx = _mm256_setzero_ps(), mins = _mm256_loadu_ps(ymin + g0);
        const __m256 sign = _mm256_set1_ps(-0.0f);
        for (int r = 0; r < DOWN_BLOCK; r++) c[r] = _mm256_setzero_ps();
        for (int r = 0; r < nr; r++) {
            const __m128i *p = (const __m128i *)(sm[r] + 2 * g0);
            const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128(p)), hi = _mm256_cvtph_ps(_mm_loadu_si128(p + 1));
            /* (s0 m0 s1 m1 | s2 m2 s3 m3), (s4 m4 s5 m5 | s6 m6 s7 m7) -> s0..s7 and m0..m7 */
            const __m256 s = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(lo, hi, 0x88)), 0xD8));
            const __m256 m = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(lo, hi, 0xDD)), 0xD8));
            const __m256 a = _mm256_set1_ps(act[r]);
            c[r] = _mm256_mul_ps(a, s);
            mins = _mm256_fmadd_ps(a, m, mins);
            mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, c[r]));
        }
        _mm256_storeu_ps(ymin + g0, mins);
        _mm256_storeu_ps(d + g0, _mm256_mul_ps(mx, _mm256_set1_ps(1.0f / 127.0f)));
        /* 127 / max where max > 0; a group whose coefficients are all 0 keeps codes 0 */
        const __m256 inv = _mm256_and_ps(_mm256_div_ps(_mm256_set1_ps(127.0f), mx),
                                         _mm256_cmp_ps(mx, _mm256_setzero_ps(), _CMP_GT_OQ));
        for (int p = 0; p < DOWN_BLOCK / 2; p++) {
            const __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(c[2 * p], inv));
            const __m256i q1 = _mm256_cvtps_epi32(_mm256_mul_ps(c[2 * p + 1], inv));
            const __m256i pair = _mm256_or_si256(_mm256_and_si256(q0, _mm256_set1_epi32(0xFF)), _mm256_slli_epi32(q1, 8));
            const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(pair, pair), 0x08); /* fits: no saturation */
            _mm_storeu_si128((__m128i *)(cp[p] + g0), _mm256_castsi256_si128(packed));
        }
    }
    for (; g0 < ng; g0++) { /* the groups after the last 8, one by one, in the same arithmetic */
        float c[DOWN_BLOCK] = {0}, mx = 0.0f;
        for (int r = 0; r < nr; r++) {
            c[r] = act[r] * (float)sm[r][2 * g0];
            ymin[g0] += act[r] * (float)sm[r][2 * g0 + 1];
            mx = fabsf(c[r]) > mx ? fabsf(c[r]) : mx;
        }
        d[g0] = mx * (1.0f / 127.0f);
        const float inv = mx > 0.0f ? 127.0f / mx : 0.0f;
        for (int p = 0; p < DOWN_BLOCK / 2; p++)
            cp[p][g0] = (int16_t)(((int32_t)lrintf(c[2 * p] * inv) & 0xFF) | ((int32_t)lrintf(c[2 * p + 1] * inv) * 256));
    }
}

/* ye, yo [n/2] (even and odd positions) += the down columns of rows[0..nr) (each n/2 bytes of nibbles, value 2k in
 * the low nibble of byte k) with coefficients act[r], their (scale, min) pairs sm[r]; ymin [n/32] += the
 * minimums' term. nr <= DOWN_BLOCK; down_i4_block_fits(n, 32). */
static inline void down_i4_block(const uint8_t *const *rows, const f16 *const *sm, const float *act, int nr, int64_t n,
                                 float *restrict ye, float *restrict yo, float *restrict ymin) {
    int16_t cp[DOWN_BLOCK / 2][DOWN_GROUPS] __attribute__((aligned(32)));
    float d[DOWN_GROUPS] __attribute__((aligned(32)));
    down_i4_coefficients(sm, act, nr, n / 32, cp, d, ymin);
    const uint8_t *r0[DOWN_BLOCK / 2], *r1[DOWN_BLOCK / 2];
    const int pairs = (nr + 1) / 2;
    for (int p = 0; p < pairs; p++) r0[p] = rows[2 * p], r1[p] = 2 * p + 1 < nr ? rows[2 * p + 1] : rows[2 * p];
    const __m256i low = _mm256_set1_epi8(15);
    /* a pair's int16 for group g broadcast over the low lane, g + 1's over the high one */
    const __m256i spread = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1,
                                            2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3);
    for (int64_t k0 = 0; k0 < n / 2; k0 += 32) { /* 32 bytes: groups g (bytes k0..k0+15) and g + 1 */
        const int64_t g = k0 / 16;
        __m256i ae = _mm256_setzero_si256(), be = ae, ao = ae, bo = ae;
        for (int p = 0; p < pairs; p++) {
            const __m256i v0 = _mm256_loadu_si256((const __m256i *)(r0[p] + k0));
            const __m256i v1 = _mm256_loadu_si256((const __m256i *)(r1[p] + k0));
            int32_t both; /* the pair's coefficients in groups g and g + 1 */
            memcpy(&both, cp[p] + g, 4);
            const __m256i cv = _mm256_shuffle_epi8(_mm256_set1_epi32(both), spread);
            const __m256i e0 = _mm256_and_si256(v0, low), e1 = _mm256_and_si256(v1, low);
            const __m256i o0 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), low);
            const __m256i o1 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), low);
            /* unpacklo: bytes 0-7 of each lane (k0 + 0..7, k0 + 16..23), unpackhi: 8-15 (k0 + 8..15, 24..31) */
            ae = _mm256_add_epi16(ae, _mm256_maddubs_epi16(_mm256_unpacklo_epi8(e0, e1), cv));
            be = _mm256_add_epi16(be, _mm256_maddubs_epi16(_mm256_unpackhi_epi8(e0, e1), cv));
            ao = _mm256_add_epi16(ao, _mm256_maddubs_epi16(_mm256_unpacklo_epi8(o0, o1), cv));
            bo = _mm256_add_epi16(bo, _mm256_maddubs_epi16(_mm256_unpackhi_epi8(o0, o1), cv));
        }
        const __m256 d0 = _mm256_set1_ps(d[g]), d1 = _mm256_set1_ps(d[g + 1]);
#define M2C_DOWN_ADD(y, acc, at, scale, half)                                                                       \
    _mm256_storeu_ps(y + k0 + at, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(                        \
                                                      _mm256_extracti128_si256(acc, half))),                       \
                                                  scale, _mm256_loadu_ps(y + k0 + at)))
        M2C_DOWN_ADD(ye, ae, 0, d0, 0);
        M2C_DOWN_ADD(ye, be, 8, d0, 0);
        M2C_DOWN_ADD(ye, ae, 16, d1, 1);
        M2C_DOWN_ADD(ye, be, 24, d1, 1);
        M2C_DOWN_ADD(yo, ao, 0, d0, 0);
        M2C_DOWN_ADD(yo, bo, 8, d0, 0);
        M2C_DOWN_ADD(yo, ao, 16, d1, 1);
        M2C_DOWN_ADD(yo, bo, 24, d1, 1);
#undef M2C_DOWN_ADD
    }
}
/* Whether down_i8_block takes rows of n values in groups of `group` (else the caller uses axpy_i8). */
static inline int down_i8_block_fits(int64_t n, int64_t group) {
    return group % 16 == 0 && n % 16 == 0 && n / group <= DOWN_GROUPS;
}

/* y [n] += the down columns of INT8 rows[0..nr) (n int8 values each, float32 scales s[r] per `group` values) with
 * coefficients act[r]. The coefficients round to int16 against the block's largest per group (steps of 1/32767 of
 * it: below float32's rounding of the sums that follow, for what a down column adds), two rows' values widened to
 * int16 meet them in one madd, and the block's sums stay in int32 (|sum| <= 16 x 127 x 32767 < 2^31) until they
 * are scaled once per group. nr <= DOWN_BLOCK; down_i8_block_fits(n, group). */
static inline void down_i8_block(const int8_t *const *rows, const float *const *s, const float *act, int nr,
                                 int64_t n, int64_t group, float *restrict y) {
    const int64_t ng = n / group;
    int16_t cq[DOWN_GROUPS * DOWN_BLOCK] __attribute__((aligned(32)));
    float d[DOWN_GROUPS];
    for (int64_t g = 0; g < ng; g++) {
        float c[DOWN_BLOCK], mx = 0.0f;
        for (int r = 0; r < nr; r++) {
            c[r] = act[r] * s[r][g];
            mx = fabsf(c[r]) > mx ? fabsf(c[r]) : mx;
        }
        d[g] = mx * (1.0f / 32767.0f);
        const float inv = mx > 0.0f ? 32767.0f / mx : 0.0f;
        for (int r = 0; r < DOWN_BLOCK; r++) cq[g * DOWN_BLOCK + r] = r < nr ? (int16_t)lrintf(c[r] * inv) : 0;
    }
    const int8_t *r0[DOWN_BLOCK / 2], *r1[DOWN_BLOCK / 2];
    const int pairs = (nr + 1) / 2;
    for (int p = 0; p < pairs; p++) r0[p] = rows[2 * p], r1[p] = 2 * p + 1 < nr ? rows[2 * p + 1] : rows[2 * p];
    for (int64_t k = 0; k < n; k += 16) { /* 16 values of group k / group */
        const int64_t g = k / group;
        __m256i lo = _mm256_setzero_si256(), hi = lo;
        for (int p = 0; p < pairs; p++) {
            const __m256i q0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(r0[p] + k)));
            const __m256i q1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(r1[p] + k)));
            int32_t cc; /* the pair's two coefficients */
            memcpy(&cc, cq + g * DOWN_BLOCK + 2 * p, 4);
            const __m256i cv = _mm256_set1_epi32(cc);
            lo = _mm256_add_epi32(lo, _mm256_madd_epi16(_mm256_unpacklo_epi16(q0, q1), cv)); /* values 0-3, 8-11 */
            hi = _mm256_add_epi32(hi, _mm256_madd_epi16(_mm256_unpackhi_epi16(q0, q1), cv)); /* 4-7, 12-15 */
        }
        const __m256 dv = _mm256_set1_ps(d[g]);
        const __m256i a = _mm256_permute2x128_si256(lo, hi, 0x20), b = _mm256_permute2x128_si256(lo, hi, 0x31);
        _mm256_storeu_ps(y + k, _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), dv, _mm256_loadu_ps(y + k)));
        _mm256_storeu_ps(y + k + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(b), dv, _mm256_loadu_ps(y + k + 8)));
    }
}
#endif
#endif
