/* The sparse mixed-precision FFN of a few tokens, read straight from the neuron pool.
 *
 * Each call computes one precision group: for every kept neuron (a row of the pool, found by its
 * slot) the gate and up dot products with each token's input, the activation, and the down column
 * added into the output. Weights are read once per call for all tokens and never dequantised into a
 * buffer: INT8 and INT4 values are widened in registers. Row layouts are the store's bundles
 * (m2cache.storage.quant):
 *   fp16: [3][D] halves
 *   int8: [3][D] int8, then [3][D/group] float32 scales (group = D: one per part, format version 1)
 *   int4: [3][D/2] bytes (value 2k in the low nibble of byte k, 2k+1 in the high one), then
 *         [3][D/group] (scale, min) float16 pairs; a value is q * scale + min
 * A split store's rows hold only up and down ([2][...] the same way); its gate activations come from
 * outside (gact [n][T]).
 * Inputs and outputs are float32 [T][D]; the output is accumulated into (+=).
 * Built with -O3 -march=native -ffast-math so the loops below vectorise (loaded by ctypes from
 * m2cache.model.cpu_kernels).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "threads.h"
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef _Float16 f16;

enum { ACT_SILU = 0, ACT_RELU = 1, ACT_GELU = 2, ACT_GELU_TANH = 3 };

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

#define MAX_T 64

/* Every slot must name a row of the pool: checked before any row is read (-3 otherwise). */
static int slots_ok(const int64_t *slots, int64_t n, int64_t pool_rows) {
    int bad = 0;
    for (int64_t i = 0; i < n; i++) bad |= (slots[i] < 0) | (slots[i] >= pool_rows);
    return !bad;
}

/* FP16 and INT8 rows: the gate and up dot products of one row with x, and y += a * down row, for
 * one element type. gcc does not vectorise _Float16 -> float conversions on its own, so on AVX-512
 * each loop is written with the widening load (LOAD16: 16 elements as 16 floats); the scalar tail
 * (and other CPUs) use the plain loop. */
#if defined(__AVX512F__)
#define LOAD16_fp16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define LOAD16_int8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#define ROW_KERNELS(name, type)                                                                      \
    static __attribute__((unused))                                                                   \
    void dot2_##name(const type *w, const float *x, int64_t D, float *g_out, float *u_out) {         \
        int64_t d = 0;                                                                               \
        __m512 vg = _mm512_setzero_ps(), vu = _mm512_setzero_ps();                                   \
        for (; d + 16 <= D; d += 16) {                                                               \
            __m512 xv = _mm512_loadu_ps(x + d);                                                      \
            vg = _mm512_fmadd_ps(LOAD16_##name(w + d), xv, vg);                                      \
            vu = _mm512_fmadd_ps(LOAD16_##name(w + D + d), xv, vu);                                  \
        }                                                                                            \
        float g = _mm512_reduce_add_ps(vg), u = _mm512_reduce_add_ps(vu);                           \
        for (; d < D; d++) {                                                                         \
            g += (float)w[d] * x[d];                                                                 \
            u += (float)w[D + d] * x[d];                                                             \
        }                                                                                            \
        *g_out = g;                                                                                  \
        *u_out = u;                                                                                  \
    }                                                                                                \
    static __attribute__((unused)) float dot1_##name(const type *w, const float *x, int64_t D) {     \
        int64_t d = 0;                                                                               \
        __m512 v = _mm512_setzero_ps();                                                              \
        for (; d + 16 <= D; d += 16)                                                                 \
            v = _mm512_fmadd_ps(LOAD16_##name(w + d), _mm512_loadu_ps(x + d), v);                    \
        float s = _mm512_reduce_add_ps(v);                                                           \
        for (; d < D; d++) s += (float)w[d] * x[d];                                                  \
        return s;                                                                                    \
    }                                                                                                \
    static void axpy_##name(float a, const type *w, float *y, int64_t D) {                           \
        int64_t d = 0;                                                                               \
        __m512 av = _mm512_set1_ps(a);                                                               \
        for (; d + 16 <= D; d += 16)                                                                 \
            _mm512_storeu_ps(y + d, _mm512_fmadd_ps(av, LOAD16_##name(w + d), _mm512_loadu_ps(y + d))); \
        for (; d < D; d++) y[d] += a * (float)w[d];                                                  \
    }
#else
#define ROW_KERNELS(name, type)                                                                      \
    static __attribute__((unused))                                                                   \
    void dot2_##name(const type *w, const float *x, int64_t D, float *g_out, float *u_out) {         \
        float g = 0.0f, u = 0.0f;                                                                    \
        for (int64_t d = 0; d < D; d++) {                                                            \
            g += (float)w[d] * x[d];                                                                 \
            u += (float)w[D + d] * x[d];                                                             \
        }                                                                                            \
        *g_out = g;                                                                                  \
        *u_out = u;                                                                                  \
    }                                                                                                \
    static __attribute__((unused)) float dot1_##name(const type *w, const float *x, int64_t D) {     \
        float s = 0.0f;                                                                              \
        for (int64_t d = 0; d < D; d++) s += (float)w[d] * x[d];                                     \
        return s;                                                                                    \
    }                                                                                                \
    static void axpy_##name(float a, const type *w, float *y, int64_t D) {                           \
        for (int64_t d = 0; d < D; d++) y[d] += a * (float)w[d];                                     \
    }
#endif
ROW_KERNELS(fp16, f16)
ROW_KERNELS(int8, int8_t)  /* axpy only: INT8 dot products run in groups, below */

/* INT8 gate and up products of one row with x, in groups of `group` values: each group's partial sums
 * are scaled once (one vector accumulator per group folded into the row's with one FMA). */
static void dot2_int8_groups(const int8_t *w, const float *s, const float *x, int64_t D, int64_t group,
                             float *g_out, float *u_out) {
    const int64_t ng = D / group;
    float g = 0.0f, u = 0.0f;
#if defined(__AVX512F__)
    if (group % 16 == 0) {
        __m512 vg = _mm512_setzero_ps(), vu = _mm512_setzero_ps();
        for (int64_t k = 0; k < ng; k++) {
            __m512 pg = _mm512_setzero_ps(), pu = _mm512_setzero_ps();
            for (int64_t d = k * group; d < (k + 1) * group; d += 16) {
                __m512 xv = _mm512_loadu_ps(x + d);
                pg = _mm512_fmadd_ps(LOAD16_int8(w + d), xv, pg);
                pu = _mm512_fmadd_ps(LOAD16_int8(w + D + d), xv, pu);
            }
            vg = _mm512_fmadd_ps(_mm512_set1_ps(s[k]), pg, vg);
            vu = _mm512_fmadd_ps(_mm512_set1_ps(s[ng + k]), pu, vu);
        }
        *g_out = _mm512_reduce_add_ps(vg);
        *u_out = _mm512_reduce_add_ps(vu);
        return;
    }
#endif
    for (int64_t k = 0; k < ng; k++) {
        float pg = 0.0f, pu = 0.0f;
        for (int64_t d = k * group; d < (k + 1) * group; d++) {
            pg += (float)w[d] * x[d];
            pu += (float)w[D + d] * x[d];
        }
        g += pg * s[k];
        u += pu * s[ng + k];
    }
    *g_out = g;
    *u_out = u;
}

/* The INT8 up product alone (split rows: the gate activation comes from outside), in groups. */
static float dot1_int8_groups(const int8_t *w, const float *s, const float *x, int64_t D, int64_t group) {
    const int64_t ng = D / group;
    float total = 0.0f;
#if defined(__AVX512F__)
    if (group % 16 == 0) {
        __m512 v = _mm512_setzero_ps();
        for (int64_t k = 0; k < ng; k++) {
            __m512 p = _mm512_setzero_ps();
            for (int64_t d = k * group; d < (k + 1) * group; d += 16)
                p = _mm512_fmadd_ps(LOAD16_int8(w + d), _mm512_loadu_ps(x + d), p);
            v = _mm512_fmadd_ps(_mm512_set1_ps(s[k]), p, v);
        }
        return _mm512_reduce_add_ps(v);
    }
#endif
    for (int64_t k = 0; k < ng; k++) {
        float p = 0.0f;
        for (int64_t d = k * group; d < (k + 1) * group; d++) p += (float)w[d] * x[d];
        total += p * s[k];
    }
    return total;
}

/* One FP16 or INT8 group of neurons. FP16 rows are [P][D] halves; INT8 rows [P][D] int8 followed by
 * [P][D/group] float32 scales. P = 3 (gate, up, down) with gact NULL; P = 2 (up, down: a split store)
 * with gact[i][t], the gate activation of row i for token t, given. */
static int ffn_rows(int int8, const uint8_t *pool, int64_t pool_rows, int64_t bundle_bytes, const int64_t *slots,
                    int64_t n, const float *h, int64_t T, int64_t D, int64_t group, int act, int64_t parts,
                    const float *gact, float *out) {
    if (T > MAX_T || group <= 0 || D % group || parts != (gact ? 2 : 3)) return -1;
    if (!slots_ok(slots, n, pool_rows)) return -3;
    const int64_t ng = D / group, down = parts - 1;
    float a[MAX_T];
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *row = pool + slots[i] * bundle_bytes;
        const int8_t *q = (const int8_t *)row;
        const float *s = (const float *)(row + parts * D);  /* INT8 only: [P][ng], aligned as the bundle is */
        for (int64_t t = 0; t < T; t++) {
            float g, u;
            if (gact) {
                u = int8 ? dot1_int8_groups(q, s, h + t * D, D, group) : dot1_fp16((const f16 *)row, h + t * D, D);
                a[t] = gact[i * T + t] * u;
                continue;
            }
            if (int8) dot2_int8_groups(q, s, h + t * D, D, group, &g, &u);
            else dot2_fp16((const f16 *)row, h + t * D, D, &g, &u);
            a[t] = activate(g, act) * u;
        }
        for (int64_t t = 0; t < T; t++) {
            if (!int8) {
                axpy_fp16(a[t], (const f16 *)row + down * D, out + t * D, D);
                continue;
            }
            for (int64_t k = 0; k < ng; k++)
                axpy_int8(a[t] * s[down * ng + k], q + down * D + k * group, out + t * D + k * group, group);
        }
    }
    return 0;
}

/* INT4 works on de-interleaved copies of the input (even and odd positions) and accumulates the
 * output the same way, so every inner loop runs over whole bytes: low nibble with the even values,
 * high nibble with the odd ones. Values are dequantised in registers (q * scale + min), one group at
 * a time, into accumulators that span the whole row: no reduction per group. */
static float dot_int4(const uint8_t *b, const f16 *m, const float *xe, const float *xo, const float *xsum,
                      int64_t half, int64_t gh) {
    float total = 0.0f;
    int64_t k = 0;
#if defined(__AVX512F__)
    if (gh % 16 == 0) {
        /* sum_g scale_g * (q . x)_g + min_g * (sum x)_g: the codes meet x unscaled, one vector
         * accumulator per group folded into the row's with one FMA; the min term is scalar */
        __m512 acc = _mm512_setzero_ps();
        const __m512i low = _mm512_set1_epi32(15);
        for (int64_t g0 = 0, gi = 0; g0 < half; g0 += gh, gi++) {
            __m512 accg = _mm512_setzero_ps();
            for (k = g0; k < g0 + gh; k += 16) {
                __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(b + k)));
                accg = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, low)), _mm512_loadu_ps(xe + k), accg);
                accg = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), _mm512_loadu_ps(xo + k), accg);
            }
            acc = _mm512_fmadd_ps(_mm512_set1_ps((float)m[2 * gi]), accg, acc);
            total += (float)m[2 * gi + 1] * xsum[gi];
        }
        return total + _mm512_reduce_add_ps(acc);
    }
#endif
    for (k = 0; k < half; k++) {
        const int64_t gi = k / gh;
        const float sc = (float)m[2 * gi], mn = (float)m[2 * gi + 1];
        total += ((float)(b[k] & 15) * sc + mn) * xe[k] + ((float)(b[k] >> 4) * sc + mn) * xo[k];
    }
    return total;
}

static void axpy_int4(float a, const uint8_t *b, const f16 *m, float *ye, float *yo, int64_t half, int64_t gh) {
    int64_t k = 0;
#if defined(__AVX512F__)
    if (gh % 16 == 0) {
        const __m512i low = _mm512_set1_epi32(15);
        for (int64_t g0 = 0; g0 < half; g0 += gh) {
            const int64_t gi = g0 / gh;
            const __m512 sc = _mm512_set1_ps(a * (float)m[2 * gi]), mn = _mm512_set1_ps(a * (float)m[2 * gi + 1]);
            for (k = g0; k < g0 + gh; k += 16) {
                __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(b + k)));
                __m512 we = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, low)), sc, mn);
                __m512 wo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)), sc, mn);
                _mm512_storeu_ps(ye + k, _mm512_add_ps(_mm512_loadu_ps(ye + k), we));
                _mm512_storeu_ps(yo + k, _mm512_add_ps(_mm512_loadu_ps(yo + k), wo));
            }
        }
        return;
    }
#endif
    for (k = 0; k < half; k++) {
        const int64_t gi = k / gh;
        const float sc = a * (float)m[2 * gi], mn = a * (float)m[2 * gi + 1];
        ye[k] += (float)(b[k] & 15) * sc + mn;
        yo[k] += (float)(b[k] >> 4) * sc + mn;
    }
}

/* h [T][D] split into its even (he) and odd (ho) positions, [T][D/2] each, and each token's sum over
 * every group of 2*gh values (xsum [T][D/(2*gh)], zeroed by the caller): the INT4 loops' inputs. */
static void deinterleave(const float *h, int64_t T, int64_t D, int64_t gh, float *he, float *ho, float *xsum) {
    const int64_t half = D / 2, ng = D / (2 * gh);
    for (int64_t t = 0; t < T; t++)
        for (int64_t k = 0; k < half; k++) {
            he[t * half + k] = h[t * D + 2 * k];
            ho[t * half + k] = h[t * D + 2 * k + 1];
            xsum[t * ng + k / gh] += h[t * D + 2 * k] + h[t * D + 2 * k + 1];
        }
}

static int ffn_int4(const uint8_t *pool, int64_t pool_rows, int64_t bundle_bytes, const int64_t *slots,
                    int64_t n, const float *h, int64_t T, int64_t D, int64_t group, int act, int64_t parts,
                    const float *gact, float *out) {
    if (T > MAX_T || group <= 0 || D % group || group % 2 || parts != (gact ? 2 : 3)) return -1;
    if (!slots_ok(slots, n, pool_rows)) return -3;
    const int64_t half = D / 2, ng = D / group, gh = group / 2;
    float *he = malloc(sizeof(float) * T * half), *ho = malloc(sizeof(float) * T * half);
    float *ye = calloc(T * half, sizeof(float)), *yo = calloc(T * half, sizeof(float));
    float *xsum = calloc(T * ng, sizeof(float));
    if (!he || !ho || !ye || !yo || !xsum) {
        free(he); free(ho); free(ye); free(yo); free(xsum);
        return -2;
    }
    deinterleave(h, T, D, gh, he, ho, xsum);
    float a[MAX_T];
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *row = pool + slots[i] * bundle_bytes;
        const f16 *meta = (const f16 *)(row + parts * half);  /* [P][ng][2] (scale, min) */
        const int64_t up = parts - 2, down = parts - 1;
        for (int64_t t = 0; t < T; t++) {
            const float *xe = he + t * half, *xo = ho + t * half;
            const float *xs = xsum + t * ng;
            const float u = dot_int4(row + up * half, meta + 2 * ng * up, xe, xo, xs, half, gh);
            a[t] = (gact ? gact[i * T + t] : activate(dot_int4(row, meta, xe, xo, xs, half, gh), act)) * u;
        }
        for (int64_t t = 0; t < T; t++)
            axpy_int4(a[t], row + down * half, meta + 2 * ng * down, ye + t * half, yo + t * half, half, gh);
    }
    for (int64_t t = 0; t < T; t++)
        for (int64_t k = 0; k < half; k++) {
            out[t * D + 2 * k] += ye[t * half + k];
            out[t * D + 2 * k + 1] += yo[t * half + k];
        }
    free(he); free(ho); free(ye); free(yo); free(xsum);
    return 0;
}

typedef struct {
    const uint8_t *gates;
    const float *he, *ho, *xsum;
    int64_t rows, T, half, ng, gh;
    int act;
    float *out;
} gate_task;

static void gate_part(void *ctx, int part, int parts) {
    const gate_task *k = ctx;
    const int64_t width = k->half + 4 * k->ng;
    int64_t j0, j1;
    m2c_share(k->rows, part, parts, &j0, &j1);
    for (int64_t j = j0; j < j1; j++) {
        const uint8_t *row = k->gates + j * width;
        const f16 *meta = (const f16 *)(row + k->half);
        for (int64_t t = 0; t < k->T; t++)
            k->out[t * k->rows + j] = activate(dot_int4(row, meta, k->he + t * k->half, k->ho + t * k->half,
                                                        k->xsum + t * k->ng, k->half, k->gh), k->act);
    }
}

/* act(gate . h) of every row of a resident INT4 copy of the gate rows, for each of T tokens: the gate
 * policy's score, computed without dequantising the copy. A row is the gate part of an INT4 bundle:
 * [D/2] bytes of nibbles, then [D/group] (scale, min) float16 pairs. out: float32 [T][rows]; the
 * rows shared among the kernels' threads. */
int m2c_gate_int4(const uint8_t *gates, int64_t rows, const float *h, int64_t T, int64_t D, int64_t group,
                  int act, float *out) {
    if (T > MAX_T || group <= 0 || D % group || group % 2) return -1;
    const int64_t half = D / 2, ng = D / group, gh = group / 2, width = half + 4 * ng;
    float *he = malloc(sizeof(float) * T * half), *ho = malloc(sizeof(float) * T * half);
    float *xsum = calloc(T * ng, sizeof(float));
    if (!he || !ho || !xsum) {
        free(he); free(ho); free(xsum);
        return -2;
    }
    deinterleave(h, T, D, gh, he, ho, xsum);
    gate_task k = {gates, he, ho, xsum, rows, T, half, ng, gh, act, out};
    m2c_run(gate_part, &k, (int)(rows * width * T / M2C_MIN_PART_BYTES));
    free(he); free(ho); free(xsum);
    return 0;
}

/* The FFN of a precision group, its neurons shared among the pool's threads: each part adds into a zeroed
 * buffer of its own, added into out once every part has succeeded (the FFN is a sum over neurons; a part
 * that fails leaves out as it was). One part alone adds into out directly. */
enum { KIND_FP16 = 0, KIND_INT8 = 1, KIND_INT4 = 2 };

typedef struct {
    int kind, act;
    const uint8_t *pool;
    int64_t pool_rows, bundle_bytes, n, T, D, group, parts;
    const int64_t *slots;
    const float *h, *gact;
    float *out, *spare;  /* spare: [parts][T][D], or NULL for one part (into out) */
    int rc[M2C_MAX_THREADS];
} ffn_task;

static void ffn_part(void *ctx, int part, int parts) {
    ffn_task *k = ctx;
    int64_t b, e;
    m2c_share(k->n, part, parts, &b, &e);
    float *out = k->spare ? k->spare + part * k->T * k->D : k->out;
    const int64_t *slots = k->slots + b;
    const float *gact = k->gact ? k->gact + b * k->T : NULL;
    if (k->kind == KIND_INT4)
        k->rc[part] = ffn_int4(k->pool, k->pool_rows, k->bundle_bytes, slots, e - b, k->h, k->T, k->D, k->group,
                               k->act, k->parts, gact, out);
    else
        k->rc[part] = ffn_rows(k->kind == KIND_INT8, k->pool, k->pool_rows, k->bundle_bytes, slots, e - b, k->h,
                               k->T, k->D, k->group, k->act, k->parts, gact, out);
}

static int ffn_shared(int kind, const uint8_t *pool, int64_t pool_rows, int64_t bundle_bytes, const int64_t *slots,
                      int64_t n, const float *h, int64_t T, int64_t D, int64_t group, int act, int64_t parts,
                      const float *gact, float *out) {
    if (T > MAX_T || group <= 0 || D % group || parts != (gact ? 2 : 3)) return -1;
    if (!slots_ok(slots, n, pool_rows)) return -3;  /* before any row is read, in any part */
    int ways = (int)(n * bundle_bytes * T / M2C_MIN_PART_BYTES), pool_threads = m2c_threads();
    ways = ways < pool_threads ? ways : pool_threads;
    ways = ways > 1 ? ways : 1;
    ffn_task k = {kind, act, pool, pool_rows, bundle_bytes, n, T, D, group, parts, slots, h, gact, out, NULL, {0}};
    if (ways > 1 && !(k.spare = calloc((size_t)ways * T * D, sizeof(float)))) ways = 1;
    m2c_run(ffn_part, &k, ways);
    int rc = 0;
    for (int i = 0; i < ways; i++) rc = rc ? rc : k.rc[i];
    for (int i = 0; i < ways && rc == 0 && k.spare; i++)
        for (int64_t j = 0; j < T * D; j++) out[j] += k.spare[i * T * D + j];
    free(k.spare);
    return rc;
}

int m2c_ffn_fp16(const uint8_t *pool, int64_t pool_rows, int64_t bundle_bytes, const int64_t *slots,
                 int64_t n, const float *h, int64_t T, int64_t D, int act, int64_t parts, const float *gact,
                 float *out) {
    return ffn_shared(KIND_FP16, pool, pool_rows, bundle_bytes, slots, n, h, T, D, D, act, parts, gact, out);
}

int m2c_ffn_int8(const uint8_t *pool, int64_t pool_rows, int64_t bundle_bytes, const int64_t *slots,
                 int64_t n, const float *h, int64_t T, int64_t D, int64_t group, int act, int64_t parts,
                 const float *gact, float *out) {
    return ffn_shared(KIND_INT8, pool, pool_rows, bundle_bytes, slots, n, h, T, D, group, act, parts, gact, out);
}

int m2c_ffn_int4(const uint8_t *pool, int64_t pool_rows, int64_t bundle_bytes, const int64_t *slots,
                 int64_t n, const float *h, int64_t T, int64_t D, int64_t group, int act, int64_t parts,
                 const float *gact, float *out) {
    return ffn_shared(KIND_INT4, pool, pool_rows, bundle_bytes, slots, n, h, T, D, group, act, parts, gact, out);
}

/* pool[dst[i]] = src[rows[i]] (rows NULL: src[i]) for i < n, rows of `width` bytes: the CPU's copy
 * of DRAM bundles into the device pool in one pass, with no staging buffer in between (torch needs
 * a gather and a scatter, each looping per element). -3 before any copy if an index is out of range. */
int m2c_copy_rows(uint8_t *pool, int64_t pool_rows, const int64_t *dst, const uint8_t *src, int64_t src_rows,
                  const int64_t *rows, int64_t n, int64_t width) {
    if (!slots_ok(dst, n, pool_rows) || (rows ? !slots_ok(rows, n, src_rows) : n > src_rows)) return -3;
    for (int64_t i = 0; i < n; i++)
        memcpy(pool + dst[i] * width, src + (rows ? rows[i] : i) * width, (size_t)width);
    return 0;
}
