/* The kernels' inner loops: one row of weights against one row of activations, in every weight format a
 * store or a resident part holds, written once here for the FFN, the gate scores and the attention block.
 *
 * Weights are read once and never dequantised into a buffer. On a CPU with AVX2, FMA and F16C (every x86-64
 * CPU since 2013-2015, AVX-512 ones included) the loops are written with intrinsics; elsewhere the plain
 * loops below them serve (the compiler vectorises what it can).
 *
 * INT8 and INT4 rows meet activations quantised to INT8 in blocks of 32 values (one float32 scale a block,
 * round to nearest, |q| <= 127): integer dot products (vpmaddubsw + vpmaddwd), each block's sum scaled once,
 * as llama.cpp's Q8_0/Q4_x dot products do. That changes the product by the activations' rounding (~0.2%
 * of a block's largest value per value, far below the INT8/INT4 weights' own); FP16, BF16 and FP32 rows meet
 * the float32 activations as they are. m2c_set_int8_activations(0) keeps every product in float32.
 */
#ifndef M2C_SIMD_H
#define M2C_SIMD_H
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define M2C_AVX2 1
#include <immintrin.h>
#else
#define M2C_AVX2 0
#endif

typedef _Float16 f16;
typedef uint16_t bf16;

#define Q8_BLOCK 32

enum { ACT_SILU = 0, ACT_RELU = 1, ACT_GELU = 2, ACT_GELU_TANH = 3 };

static inline float from_bf16(bf16 v) {
    const uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline bf16 to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (bf16)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline float activate(float x, int act) {
    switch (act) {
    case ACT_SILU: return x / (1.0f + expf(-x));
    case ACT_RELU: return x > 0.0f ? x : 0.0f;
    case ACT_GELU: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
    default: {
        float k = 0.79788456080286536f * (x + 0.044715f * x * x * x);
        return 0.5f * x * (1.0f + tanhf(k));
    }
    }
}

/* One row of activations quantised for integer dot products (see the top): in order (q) for INT8 rows,
 * split into even and odd positions (qe, qo) for INT4 rows, whose bytes hold values 2k and 2k+1 in their low
 * and high nibbles; d the blocks' scales. Filled by q8_quantise into caller-owned memory. */
typedef struct {
    int8_t *q, *qe, *qo; /* [D], [D/2], [D/2] */
    float *d;            /* [D/32] */
} q8_row;

static inline int64_t q8_bytes(int64_t D) { return 2 * D + (int64_t)sizeof(float) * (D / Q8_BLOCK) + 64; }

/* Lays a q8_row out in `mem` (q8_bytes(D) bytes, 32-byte aligned by the caller). */
static inline q8_row q8_at(void *mem, int64_t D) {
    q8_row r;
    r.q = (int8_t *)mem;
    r.qe = r.q + D;
    r.qo = r.qe + D / 2;
    r.d = (float *)(r.qo + D / 2);
    return r;
}

static inline void q8_quantise(const float *x, int64_t D, q8_row *r) {
    for (int64_t b = 0; b < D / Q8_BLOCK; b++) {
        const float *xb = x + b * Q8_BLOCK;
        float amax = 0.0f;
        for (int i = 0; i < Q8_BLOCK; i++) amax = fmaxf(amax, fabsf(xb[i]));
        const float d = amax / 127.0f, id = d > 0.0f ? 1.0f / d : 0.0f;
        r->d[b] = d;
        for (int i = 0; i < Q8_BLOCK; i++) r->q[b * Q8_BLOCK + i] = (int8_t)lrintf(xb[i] * id);
    }
    for (int64_t k = 0; k < D / 2; k++) {
        r->qe[k] = r->q[2 * k];
        r->qo[k] = r->q[2 * k + 1];
    }
}

#if M2C_AVX2
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* sum of w[i] * x[i] over 32 int8 values of each: 8 int32 lanes (vpmaddubsw wants one operand unsigned) */
static inline __m256i dot32_i8(__m256i w, __m256i x) {
    const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

static inline __m256 load8_bf16(const bf16 *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
#endif

/* ---- float activations ------------------------------------------------------------------------------- */

static inline float dot_f32(const float *w, const float *x, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
#if M2C_AVX2
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
    for (; i < n; i++) s += w[i] * x[i];
    return s;
}

static inline float dot_f16(const f16 *w, const float *x, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
#if M2C_AVX2
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i))), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i + 8))), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i + 16))), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i + 24))), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= n; i += 8)
        a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i))), _mm256_loadu_ps(x + i), a0);
    s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
    for (; i < n; i++) s += (float)w[i] * x[i];
    return s;
}

static inline float dot_bf16(const bf16 *w, const float *x, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
#if M2C_AVX2
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (; i + 32 <= n; i += 32) {
        a0 = _mm256_fmadd_ps(load8_bf16(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(load8_bf16(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(load8_bf16(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(load8_bf16(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(load8_bf16(w + i), _mm256_loadu_ps(x + i), a0);
    s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
    for (; i < n; i++) s += from_bf16(w[i]) * x[i];
    return s;
}

/* int8 values, one float32 scale per `group` values (group = n: one per row), float32 activations */
static inline float dot_i8_f32(const int8_t *w, const float *s, int64_t group, const float *x, int64_t n) {
    float total = 0.0f;
    for (int64_t g0 = 0, gi = 0; g0 < n; g0 += group, gi++) {
        int64_t i = g0;
        float p = 0.0f;
#if M2C_AVX2
        __m256 a = _mm256_setzero_ps();
        for (; i + 8 <= g0 + group; i += 8) {
            const __m128i v = _mm_loadl_epi64((const __m128i *)(w + i));
            a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), _mm256_loadu_ps(x + i), a);
        }
        p = hsum8(a);
#endif
        for (; i < g0 + group; i++) p += (float)w[i] * x[i];
        total += p * s[gi];
    }
    return total;
}

/* INT4 nibbles (value 2k in the low nibble of byte k, 2k+1 in the high one), (scale, min) float16 pairs per
 * `group` values; activations split into even (xe) and odd (xo) positions, xsum their sums per group */
static inline float dot_i4_f32(const uint8_t *b, const f16 *m, int64_t group, const float *xe, const float *xo,
                               const float *xsum, int64_t n) {
    const int64_t gh = group / 2;
    float total = 0.0f;
    for (int64_t g0 = 0, gi = 0; g0 < n / 2; g0 += gh, gi++) {
        int64_t k = g0;
        float p = 0.0f;
#if M2C_AVX2
        __m256 a = _mm256_setzero_ps();
        const __m256i low = _mm256_set1_epi32(15);
        for (; k + 8 <= g0 + gh; k += 8) {
            const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b + k)));
            a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, low)), _mm256_loadu_ps(xe + k), a);
            a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), _mm256_loadu_ps(xo + k), a);
        }
        p = hsum8(a);
#endif
        for (; k < g0 + gh; k++) p += (float)(b[k] & 15) * xe[k] + (float)(b[k] >> 4) * xo[k];
        total += p * (float)m[2 * gi] + (float)m[2 * gi + 1] * xsum[gi];
    }
    return total;
}

/* ---- INT8 activations (q8_row) ------------------------------------------------------------------------ */

/* int8 row with one float32 scale per `group` values (a multiple of 32) against q8 activations (n % 32 == 0) */
static inline float dot_i8_q8(const int8_t *w, const float *s, int64_t group, const q8_row *x, int64_t n) {
    const int64_t per = group / Q8_BLOCK; /* blocks per weight group */
#if M2C_AVX2
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t b = 0;
    for (; b + 2 <= n / Q8_BLOCK; b += 2) {
        const __m256i p0 = dot32_i8(_mm256_loadu_si256((const __m256i *)(w + b * 32)),
                                    _mm256_loadu_si256((const __m256i *)(x->q + b * 32)));
        const __m256i p1 = dot32_i8(_mm256_loadu_si256((const __m256i *)(w + b * 32 + 32)),
                                    _mm256_loadu_si256((const __m256i *)(x->q + b * 32 + 32)));
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(s[b / per] * x->d[b]), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), _mm256_set1_ps(s[(b + 1) / per] * x->d[b + 1]), a1);
    }
    if (b < n / Q8_BLOCK) {
        const __m256i p0 = dot32_i8(_mm256_loadu_si256((const __m256i *)(w + b * 32)),
                                    _mm256_loadu_si256((const __m256i *)(x->q + b * 32)));
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), _mm256_set1_ps(s[b / per] * x->d[b]), a0);
    }
    return hsum8(_mm256_add_ps(a0, a1));
#else
    float total = 0.0f;
    for (int64_t b = 0; b < n / Q8_BLOCK; b++) {
        int32_t p = 0;
        for (int i = 0; i < Q8_BLOCK; i++) p += (int32_t)w[b * 32 + i] * x->q[b * 32 + i];
        total += (float)p * s[b / per] * x->d[b];
    }
    return total;
#endif
}

/* INT4 row (as dot_i4_f32) against q8 activations: the nibbles meet the activations' codes unscaled, each
 * block's integer sum scaled by scale * d once, the minimums by the float sums of the activations (xsum, per
 * weight group); n % 32 == 0, group a multiple of 32 */
static inline float dot_i4_q8(const uint8_t *b, const f16 *m, int64_t group, const q8_row *x, const float *xsum,
                              int64_t n) {
    const int64_t per = group / Q8_BLOCK, ng = n / group, nb = n / Q8_BLOCK;
    float mins = 0.0f;
    for (int64_t g = 0; g < ng; g++) mins += (float)m[2 * g + 1] * xsum[g];
#if M2C_AVX2
    const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t blk = 0; /* two blocks (32 bytes of nibbles) an iteration */
    for (; blk + 4 <= nb; blk += 4) {
        const __m256i v0 = _mm256_loadu_si256((const __m256i *)(b + blk * 16));
        const __m256i v1 = _mm256_loadu_si256((const __m256i *)(b + blk * 16 + 32));
        const __m256i e0 = _mm256_maddubs_epi16(_mm256_and_si256(v0, low), _mm256_loadu_si256((const __m256i *)(x->qe + blk * 16)));
        const __m256i o0 = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v0, 4), low),
                                                _mm256_loadu_si256((const __m256i *)(x->qo + blk * 16)));
        const __m256i e1 = _mm256_maddubs_epi16(_mm256_and_si256(v1, low), _mm256_loadu_si256((const __m256i *)(x->qe + blk * 16 + 32)));
        const __m256i o1 = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v1, 4), low),
                                                _mm256_loadu_si256((const __m256i *)(x->qo + blk * 16 + 32)));
        const __m256i p0 = _mm256_madd_epi16(_mm256_add_epi16(e0, o0), ones);
        const __m256i p1 = _mm256_madd_epi16(_mm256_add_epi16(e1, o1), ones);
        const __m256 s0 = _mm256_set_m128(_mm_set1_ps((float)m[2 * ((blk + 1) / per)] * x->d[blk + 1]),
                                          _mm_set1_ps((float)m[2 * (blk / per)] * x->d[blk]));
        const __m256 s1 = _mm256_set_m128(_mm_set1_ps((float)m[2 * ((blk + 3) / per)] * x->d[blk + 3]),
                                          _mm_set1_ps((float)m[2 * ((blk + 2) / per)] * x->d[blk + 2]));
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), s0, a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p1), s1, a1);
    }
    for (; blk + 2 <= nb; blk += 2) {
        const __m256i v0 = _mm256_loadu_si256((const __m256i *)(b + blk * 16));
        const __m256i e0 = _mm256_maddubs_epi16(_mm256_and_si256(v0, low), _mm256_loadu_si256((const __m256i *)(x->qe + blk * 16)));
        const __m256i o0 = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v0, 4), low),
                                                _mm256_loadu_si256((const __m256i *)(x->qo + blk * 16)));
        const __m256i p0 = _mm256_madd_epi16(_mm256_add_epi16(e0, o0), ones);
        const __m256 s0 = _mm256_set_m128(_mm_set1_ps((float)m[2 * ((blk + 1) / per)] * x->d[blk + 1]),
                                          _mm_set1_ps((float)m[2 * (blk / per)] * x->d[blk]));
        a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p0), s0, a0);
    }
    float total = hsum8(_mm256_add_ps(a0, a1));
    if (blk < nb) { /* one block left: 16 bytes */
        const __m128i lo = _mm_set1_epi8(15);
        const __m128i v = _mm_loadu_si128((const __m128i *)(b + blk * 16));
        const __m128i e = _mm_maddubs_epi16(_mm_and_si128(v, lo), _mm_loadu_si128((const __m128i *)(x->qe + blk * 16)));
        const __m128i o = _mm_maddubs_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), lo),
                                            _mm_loadu_si128((const __m128i *)(x->qo + blk * 16)));
        __m128i p = _mm_madd_epi16(_mm_add_epi16(e, o), _mm_set1_epi16(1));
        p = _mm_add_epi32(p, _mm_shuffle_epi32(p, 0x4E));
        p = _mm_add_epi32(p, _mm_shuffle_epi32(p, 0xB1));
        total += (float)_mm_cvtsi128_si32(p) * (float)m[2 * (blk / per)] * x->d[blk];
    }
    return total + mins;
#else
    float total = 0.0f;
    for (int64_t blk = 0; blk < nb; blk++) {
        int32_t p = 0;
        for (int k = 0; k < 16; k++) {
            const uint8_t v = b[blk * 16 + k];
            p += (int32_t)(v & 15) * x->qe[blk * 16 + k] + (int32_t)(v >> 4) * x->qo[blk * 16 + k];
        }
        total += (float)p * (float)m[2 * (blk / per)] * x->d[blk];
    }
    return total + mins;
#endif
}

#if M2C_AVX2
/* dot_i4_q8 for groups of 32 (one weight group a block), every scale and minimum widened by vector:
 * dd4 [n/32 * 4] the blocks' scales each repeated 4 times, xs2 [2 * n/32] (0, sum of the group's values) pairs */
static inline float dot_i4_q8_g32(const uint8_t *b, const f16 *m, const q8_row *x, const float *dd4,
                                  const float *xs2, int64_t n) {
    const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1);
    const __m256i two = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2);
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m128 mins = _mm_setzero_ps();
    const int64_t nb = n / Q8_BLOCK;
    int64_t blk = 0;
    for (; blk + 2 <= nb; blk += 2) { /* blocks blk, blk + 1: 32 bytes of nibbles, two (scale, min) pairs */
        const __m256i v = _mm256_loadu_si256((const __m256i *)(b + blk * 16));
        const __m256i e = _mm256_maddubs_epi16(_mm256_and_si256(v, low), _mm256_loadu_si256((const __m256i *)(x->qe + blk * 16)));
        const __m256i o = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), low),
                                               _mm256_loadu_si256((const __m256i *)(x->qo + blk * 16)));
        const __m128 sm = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(m + 2 * blk))); /* s0 m0 s1 m1 */
        const __m256 s = _mm256_mul_ps(_mm256_permutevar8x32_ps(_mm256_castps128_ps256(sm), two), _mm256_loadu_ps(dd4 + 4 * blk));
        mins = _mm_fmadd_ps(sm, _mm_loadu_ps(xs2 + 2 * blk), mins);
        const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_add_epi16(e, o), ones));
        if (blk & 2) a1 = _mm256_fmadd_ps(p, s, a1);
        else a0 = _mm256_fmadd_ps(p, s, a0);
    }
    float total = hsum8(_mm256_add_ps(a0, a1));
    mins = _mm_add_ps(mins, _mm_movehl_ps(mins, mins));
    total += _mm_cvtss_f32(_mm_add_ss(mins, _mm_movehdup_ps(mins)));
    if (blk < nb) { /* one block left: 16 bytes */
        const __m128i lo = _mm_set1_epi8(15);
        const __m128i v = _mm_loadu_si128((const __m128i *)(b + blk * 16));
        const __m128i e = _mm_maddubs_epi16(_mm_and_si128(v, lo), _mm_loadu_si128((const __m128i *)(x->qe + blk * 16)));
        const __m128i o = _mm_maddubs_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), lo),
                                            _mm_loadu_si128((const __m128i *)(x->qo + blk * 16)));
        __m128i p = _mm_madd_epi16(_mm_add_epi16(e, o), _mm_set1_epi16(1));
        p = _mm_add_epi32(p, _mm_shuffle_epi32(p, 0x4E));
        p = _mm_add_epi32(p, _mm_shuffle_epi32(p, 0xB1));
        total += (float)_mm_cvtsi128_si32(p) * (float)m[2 * blk] * x->d[blk] + (float)m[2 * blk + 1] * xs2[2 * blk + 1];
    }
    return total;
}
#endif

/* ---- y += a * row ------------------------------------------------------------------------------------- */

static inline void axpy_f16(float a, const f16 *restrict w, float *restrict y, int64_t n) {
    int64_t i = 0;
#if M2C_AVX2
    const __m256 av = _mm256_set1_ps(a);
    for (; i + 16 <= n; i += 16) {
        const __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i)));
        const __m256 w1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i + 8)));
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, w0, _mm256_loadu_ps(y + i)));
        _mm256_storeu_ps(y + i + 8, _mm256_fmadd_ps(av, w1, _mm256_loadu_ps(y + i + 8)));
    }
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i))),
                                                _mm256_loadu_ps(y + i)));
#endif
    for (; i < n; i++) y[i] += a * (float)w[i];
}

/* y += a * (int8 row with a float32 scale per `group` values) */
static inline void axpy_i8(float a, const int8_t *restrict w, const float *restrict s, int64_t group, float *restrict y,
                           int64_t n) {
    for (int64_t g0 = 0, gi = 0; g0 < n; g0 += group, gi++) {
        const float as = a * s[gi];
        int64_t i = g0;
#if M2C_AVX2
        const __m256 av = _mm256_set1_ps(as);
        for (; i + 16 <= g0 + group; i += 16) {
            const __m128i v = _mm_loadu_si128((const __m128i *)(w + i));
            const __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
            const __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(v, v)));
            _mm256_storeu_ps(y + i, _mm256_fmadd_ps(av, w0, _mm256_loadu_ps(y + i)));
            _mm256_storeu_ps(y + i + 8, _mm256_fmadd_ps(av, w1, _mm256_loadu_ps(y + i + 8)));
        }
#endif
        for (; i < g0 + group; i++) y[i] += as * (float)w[i];
    }
}

/* y += a * (INT4 row), y split into even (ye) and odd (yo) positions; each group's minimum times a is added
 * to ymin[group] instead (the caller adds it to every value of the group once, at the end) */
static inline void axpy_i4(float a, const uint8_t *restrict b, const f16 *restrict m, int64_t group, float *restrict ye,
                           float *restrict yo, float *restrict ymin, int64_t n) {
    const int64_t gh = group / 2;
    for (int64_t g0 = 0, gi = 0; g0 < n / 2; g0 += gh, gi++) {
        const float as = a * (float)m[2 * gi];
        ymin[gi] += a * (float)m[2 * gi + 1];
        int64_t k = g0;
#if M2C_AVX2
        const __m256 av = _mm256_set1_ps(as);
        const __m256i low = _mm256_set1_epi32(15);
        for (; k + 8 <= g0 + gh; k += 8) {
            const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b + k)));
            _mm256_storeu_ps(ye + k, _mm256_fmadd_ps(av, _mm256_cvtepi32_ps(_mm256_and_si256(v, low)), _mm256_loadu_ps(ye + k)));
            _mm256_storeu_ps(yo + k, _mm256_fmadd_ps(av, _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), _mm256_loadu_ps(yo + k)));
        }
#endif
        for (; k < g0 + gh; k++) {
            ye[k] += as * (float)(b[k] & 15);
            yo[k] += as * (float)(b[k] >> 4);
        }
    }
}

/* ---- activations over a vector ------------------------------------------------------------------------ */

#if M2C_AVX2
/* e^x to ~2 ulp for |x| < 88 (Cephes' polynomial after a split into 2^n * e^r), saturating beyond */
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.3365447505531f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

#if M2C_AVX2
static inline __m256 activate8(__m256 x, int act) {
    const __m256 one = _mm256_set1_ps(1.0f);
    if (act == ACT_SILU) return _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
    if (act == ACT_RELU) return _mm256_max_ps(x, _mm256_setzero_ps());
    /* gelu_pytorch_tanh: 0.5 x (1 + tanh k) = x / (1 + e^(-2k)) */
    const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    const __m256 k = _mm256_mul_ps(_mm256_set1_ps(0.79788456080286536f), _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), x3, x));
    return _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_mul_ps(_mm256_set1_ps(-2.0f), k))));
}
#endif

/* v[i] = act(v[i]) for i < n; every value by the same code whatever n (a tail goes through the vector code
 * too), so values do not depend on how rows are shared among threads */
static inline void activate_all(float *v, int64_t n, int act) {
    int64_t i = 0;
#if M2C_AVX2
    if (act != ACT_GELU) {
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(v + i, activate8(_mm256_loadu_ps(v + i), act));
        if (i < n) {
            float tail[8] = {0};
            memcpy(tail, v + i, sizeof(float) * (size_t)(n - i));
            _mm256_storeu_ps(tail, activate8(_mm256_loadu_ps(tail), act));
            memcpy(v + i, tail, sizeof(float) * (size_t)(n - i));
        }
        return;
    }
#endif
    for (; i < n; i++) v[i] = activate(v[i], act);
}

/* act(x) of one value by activate_all's code */
static inline float activate1(float x, int act) {
    activate_all(&x, 1, act);
    return x;
}

#endif
