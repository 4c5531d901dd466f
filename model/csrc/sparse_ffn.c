/* The sparse mixed-precision FFN of a few tokens, read straight from the neuron pool (the gate policy's scores
 * from its resident INT4 copy of the gate rows: gate.c).
 *
 * Each kept neuron (a row of the pool, found by its slot) gives the gate and up dot products with each token's
 * input, the activation, and its down column added into the output. Weights are read once per call for all
 * tokens and never dequantised into a buffer (simd.h). Row layouts are the store's bundles
 * (m2cache.formats.quant):
 *   fp16: [P][D] halves
 *   int8: [P][D] int8, then [P][D/group] float32 scales (group = D: one per part, format version 1)
 *   int4: [P][D/2] bytes (value 2k in the low nibble of byte k, 2k+1 in the high one), then
 *         [P][D/group] (scale, min) float16 pairs; a value is q * scale + min
 * P = 3 (gate, up, down), or 2 for a split store's rows (up, down), whose gate activations come from outside
 * (gact [n][T]). Inputs and outputs are float32 [T][D]; the output is accumulated into (+=).
 */
#include <stdlib.h>
#include <string.h>

#include "block_down.h"
#include "kernels.h"
#include "m2cache.h"
#include "threads.h"

static int int8_acts = 1;

int m2c_set_int8_activations(int on) {
    const int before = __atomic_load_n(&int8_acts, __ATOMIC_RELAXED);
    __atomic_store_n(&int8_acts, on ? 1 : 0, __ATOMIC_RELAXED);
    return before;
}

int m2c_int8_activations(void) { return __atomic_load_n(&int8_acts, __ATOMIC_RELAXED); }

/* Whether `kind` rows of D values in groups of `group` add their down columns in blocks (block_down.h): AVX2,
 * INT8 activations on and the shapes its loops take. The one rule: ffn_prepare and the Python side ask it. */
int m2c_block_down(int kind, int64_t D, int64_t group) {
#if M2C_AVX2
    if (!m2c_int8_activations() || D <= 0 || D % Q8_BLOCK || group <= 0) return 0;
    if (kind == KIND_INT4) return group == Q8_BLOCK && down_i4_block_fits(D, group);
    if (kind == KIND_INT8) return group % Q8_BLOCK == 0 && down_i8_block_fits(D, group);
#endif
    (void)kind, (void)D, (void)group;
    return 0;
}

/* Every slot must name a row of the pool: checked before any row is read (-3 otherwise). */
static int slots_ok(const int64_t *slots, int64_t n, int64_t pool_rows) {
    int bad = 0;
    for (int64_t i = 0; i < n; i++) bad |= (slots[i] < 0) | (slots[i] >= pool_rows);
    return !bad;
}

static int64_t round64(int64_t n) { return (n + 63) / 64 * 64; }

#define ROW_BLOCK DOWN_BLOCK /* rows whose dot products run before their down columns (group_span) */

/* one part's accumulators: out [T][D], and for INT4 rows ye, yo [T][D/2] and ymin [T][D/g4] */
static int64_t part_floats(int64_t T, int64_t D, int64_t g4) { return round64(T * (2 * D + D / g4)); }

int64_t ffn_scratch_bytes(int64_t T, int64_t D, int64_t g4, int parts) {
    const int64_t acts = round64(T * q8_bytes(D)) + round64(4 * T * D) + round64(4 * T * (D / g4))
                         + round64(4 * T * (D / Q8_BLOCK) * 4) + round64(4 * T * 2 * (D / g4));
    return acts + (int64_t)parts * 4 * part_floats(T, D, g4);
}

int64_t ffn_prepare(ffn_acts *a, const float *h, int64_t T, int64_t D, int64_t g8, int64_t g4, int64_t parts,
                    int act, void *scratch) {
    uint8_t *p = scratch;
    a->h = h;
    a->T = T, a->D = D, a->g8 = g8, a->g4 = g4, a->parts = parts, a->act = act;
    const int q8 = m2c_int8_activations() && D % Q8_BLOCK == 0;
    a->q8_i8 = q8 && g8 % Q8_BLOCK == 0;
    a->q8_i4 = q8 && g4 % Q8_BLOCK == 0;
    a->block8 = m2c_block_down(KIND_INT8, D, g8);
    a->block4 = m2c_block_down(KIND_INT4, D, g4);
    const int64_t qb = q8_bytes(D);
    for (int64_t t = 0; t < T && (a->q8_i8 || a->q8_i4); t++) {
        a->r[t] = q8_at(p + t * qb, D);
        q8_quantise(h + t * D, D, &a->r[t]);
    }
    p += round64(T * qb);
    a->he = (float *)p;
    a->ho = a->he + T * (D / 2);
    p += round64(4 * T * D);
    a->xs4 = (float *)p;
    p += round64(4 * T * (D / g4));
    const int64_t ng = D / g4;
    for (int64_t t = 0; t < T; t++) {
        /* the sums the minimums meet: of the values the codes stand for (INT8 activations: d * q, so that an
         * INT4 row's product is exactly its dequantised values' with them), else of h */
        const float *x = h + t * D;
        for (int64_t g = 0; g < ng; g++) {
            float s = 0.0f;
            if (a->q8_i4) {
                for (int64_t b = g * g4 / Q8_BLOCK; b < (g + 1) * g4 / Q8_BLOCK; b++) {
                    int32_t qs = 0;
                    for (int i = 0; i < Q8_BLOCK; i++) qs += a->r[t].q[b * Q8_BLOCK + i];
                    s += (float)qs * a->r[t].d[b];
                }
            } else {
                for (int64_t i = g * g4; i < (g + 1) * g4; i++) s += x[i];
            }
            a->xs4[t * ng + g] = s;
        }
        if (a->q8_i4) continue;
        for (int64_t k = 0; k < D / 2; k++) {
            a->he[t * (D / 2) + k] = x[2 * k];
            a->ho[t * (D / 2) + k] = x[2 * k + 1];
        }
    }
    a->dd4 = a->xs2 = NULL;
    if (a->q8_i4 && g4 == Q8_BLOCK && M2C_AVX2) {
        a->dd4 = (float *)p;
        p += round64(4 * T * (D / Q8_BLOCK) * 4);
        a->xs2 = (float *)p;
        p += round64(4 * T * 2 * ng);
        for (int64_t t = 0; t < T; t++)
            for (int64_t b = 0; b < D / Q8_BLOCK; b++) {
                for (int i = 0; i < 4; i++) a->dd4[(t * (D / Q8_BLOCK) + b) * 4 + i] = a->r[t].d[b];
                a->xs2[(t * ng + b) * 2] = 0.0f;
                a->xs2[(t * ng + b) * 2 + 1] = a->xs4[t * ng + b];
            }
    }
    return p - (uint8_t *)scratch;
}

/* The dot product of part `part` of a row with token t's activations. */
static float row_dot(const ffn_acts *a, int kind, const uint8_t *row, int64_t part, int64_t t) {
    const int64_t D = a->D, P = a->parts;
    if (kind == KIND_FP16) return dot_f16((const f16 *)row + part * D, a->h + t * D, D);
    if (kind == KIND_INT8) {
        const int8_t *q = (const int8_t *)row + part * D;
        const float *s = (const float *)(row + P * D) + part * (D / a->g8);
        return a->q8_i8 ? dot_i8_q8(q, s, a->g8, &a->r[t], D) : dot_i8_f32(q, s, a->g8, a->h + t * D, D);
    }
    return i4_dot(a, row + part * (D / 2), (const f16 *)(row + P * (D / 2)) + 2 * part * (D / a->g4), t);
}

/* Rows are read where they sit, in ascending slot order with gaps the hardware prefetchers do not cross: each row's
 * lines are asked for PREFETCH_ROWS rows ahead of its use. */
#ifndef PREFETCH_ROWS
#define PREFETCH_ROWS 4
#endif
#ifndef PREFETCH_HINT
#define PREFETCH_HINT 3
#endif

static inline void prefetch_row(const ffn_group *g, int64_t i, int64_t e) {
    if (i >= e || PREFETCH_ROWS == 0) return;
    const char *p = (const char *)(g->pool + g->slots[i] * g->bundle_bytes);
    for (int64_t off = 0; off < g->bundle_bytes; off += 64) __builtin_prefetch(p + off, 0, PREFETCH_HINT);
}

/* a row's activation for token t: act(gate) * up, or the gate activation given times up */
static float row_act(const ffn_acts *a, const ffn_group *g, const uint8_t *row, int64_t i, int64_t t) {
    const float u = row_dot(a, g->kind, row, a->parts - 2, t);
    return (g->gact ? g->gact[i * a->T + t] : activate1(row_dot(a, g->kind, row, 0, t), a->act)) * u;
}

/* acc += the FFN of rows [b, e) of one group (acc: a part's accumulators, part_floats of them) */
static void group_span(const ffn_acts *a, const ffn_group *g, int64_t b, int64_t e, float *acc) {
    const int64_t T = a->T, D = a->D, P = a->parts, down = P - 1, ng4 = D / a->g4;
    float *ye = acc + T * D, *yo = ye + T * (D / 2), *ymin = yo + T * (D / 2);
    float act[MAX_T][ROW_BLOCK];
    /* a block of rows' dot products first, then their down columns: the dot products of a block are independent
     * of each other and of the down columns' sums, so they overlap instead of waiting on each row's */
    for (int64_t i0 = b; i0 < e; i0 += ROW_BLOCK) {
        const int64_t i1 = e - i0 < ROW_BLOCK ? e : i0 + ROW_BLOCK;
        for (int64_t i = i0; i < i1; i++) {
            const uint8_t *row = g->pool + g->slots[i] * g->bundle_bytes;
            prefetch_row(g, i + PREFETCH_ROWS, e);
            for (int64_t t = 0; t < T; t++) act[t][i - i0] = row_act(a, g, row, i, t);
        }
#if M2C_AVX2
        if (g->kind == KIND_INT4 && a->block4) { /* block_down.h */
            const uint8_t *rows[DOWN_BLOCK];
            const f16 *sm[DOWN_BLOCK];
            for (int64_t i = i0; i < i1; i++) {
                const uint8_t *row = g->pool + g->slots[i] * g->bundle_bytes;
                rows[i - i0] = row + down * (D / 2);
                sm[i - i0] = (const f16 *)(row + P * (D / 2)) + 2 * down * ng4;
            }
            for (int64_t t = 0; t < T; t++)
                down_i4_block(rows, sm, act[t], (int)(i1 - i0), D, ye + t * (D / 2), yo + t * (D / 2), ymin + t * ng4);
            continue;
        }
        if (g->kind == KIND_INT8 && a->block8) {
            const int8_t *rows[DOWN_BLOCK];
            const float *sc[DOWN_BLOCK];
            for (int64_t i = i0; i < i1; i++) {
                const uint8_t *row = g->pool + g->slots[i] * g->bundle_bytes;
                rows[i - i0] = (const int8_t *)row + down * D;
                sc[i - i0] = (const float *)(row + P * D) + down * (D / a->g8);
            }
            for (int64_t t = 0; t < T; t++) down_i8_block(rows, sc, act[t], (int)(i1 - i0), D, a->g8, acc + t * D);
            continue;
        }
#endif
        for (int64_t i = i0; i < i1; i++) {
            const uint8_t *row = g->pool + g->slots[i] * g->bundle_bytes;
            for (int64_t t = 0; t < T; t++) {
                const float c = act[t][i - i0];
                if (g->kind == KIND_FP16) {
                    axpy_f16(c, (const f16 *)row + down * D, acc + t * D, D);
                } else if (g->kind == KIND_INT8) {
                    axpy_i8(c, (const int8_t *)row + down * D, (const float *)(row + P * D) + down * (D / a->g8),
                            a->g8, acc + t * D, D);
                } else {
                    axpy_i4(c, row + down * (D / 2), (const f16 *)(row + P * (D / 2)) + 2 * down * ng4, a->g4,
                            ye + t * (D / 2), yo + t * (D / 2), ymin + t * ng4, D);
                }
            }
        }
    }
}

typedef struct {
    const ffn_acts *a;
    const ffn_group *groups;
    int ngroups;
    int64_t total; /* bytes of every group's rows */
    float *accs;   /* [parts][part_floats] */
} ffn_task;

static int64_t block_end(int64_t i, int64_t n) {
    i = (i + ROW_BLOCK - 1) / ROW_BLOCK * ROW_BLOCK;
    return i < n ? i : n;
}

/* Part `part` takes the rows whose bytes fall in its share of all the groups' bytes, in order. */
static void ffn_part(void *ctx, int part, int parts) {
    const ffn_task *k = ctx;
    const ffn_acts *a = k->a;
    float *acc = k->accs + part * part_floats(a->T, a->D, a->g4);
    memset(acc, 0, sizeof(float) * (size_t)part_floats(a->T, a->D, a->g4));
    int64_t lo, hi, at = 0; /* this part's byte range, and the bytes of the groups before */
    m2c_share(k->total, part, parts, &lo, &hi);
    for (int gi = 0; gi < k->ngroups; gi++) {
        const ffn_group *g = &k->groups[gi];
        const int64_t bytes = g->n * g->bundle_bytes;
        if (at + bytes > lo && at < hi && g->n) {
            /* rows whose first byte lies in [lo, hi) */
            /* ... rounded up to whole blocks of ROW_BLOCK rows (a part's first row, and the next part's, by the same
             * rule), so that the blocks, and with them block_down.h's rounding, do not depend on the parts */
            const int64_t b = lo <= at ? 0 : block_end((lo - at + g->bundle_bytes - 1) / g->bundle_bytes, g->n);
            const int64_t e = hi >= at + bytes ? g->n : block_end((hi - at + g->bundle_bytes - 1) / g->bundle_bytes, g->n);
            if (b < e) group_span(a, g, b, e, acc);
        }
        at += bytes;
    }
}

void ffn_run(const ffn_acts *a, const ffn_group *groups, int ngroups, void *scratch, int max_parts, float *out) {
    ffn_task k = {a, groups, ngroups, 0, scratch};
    for (int i = 0; i < ngroups; i++) k.total += groups[i].n * groups[i].bundle_bytes;
    if (k.total == 0) return;
    int ways = (int)(k.total * a->T / M2C_MIN_PART_BYTES), most = max_parts;
    ways = ways < most ? ways : most;
    ways = ways > 1 ? ways : 1;
    const int ran = m2c_run(ffn_part, &k, ways); /* the parts that ran, each into its own accumulators */
    const int64_t T = a->T, D = a->D, half = D / 2, ng4 = D / a->g4, pf = part_floats(T, D, a->g4);
    for (int p = 0; p < ran; p++) {
        const float *acc = k.accs + p * pf, *ye = acc + T * D, *yo = ye + T * half, *ymin = yo + T * half;
        for (int64_t t = 0; t < T; t++) {
            float *o = out + t * D;
            for (int64_t i = 0; i < D; i++) o[i] += acc[t * D + i];
            for (int64_t j = 0; j < half; j++) {
                const float m = ymin[t * ng4 + (2 * j) / a->g4];
                o[2 * j] += ye[t * half + j] + m;
                o[2 * j + 1] += yo[t * half + j] + m;
            }
        }
    }
}

/* out[T][D] += the FFN of several precision groups' rows at once (group i: kinds[i] rows slots[i][0..n[i]) of
 * pools[i], gact[i] NULL or [n[i]][T]), their rows shared among the threads by bytes across the groups, as the
 * native decode step shares them (so both add up the same sums in the same order). */
int m2c_ffn_groups(int ngroups, const int *kinds, const uint8_t *const *pools, const int64_t *pool_rows,
                   const int64_t *bundle_bytes, const int64_t *const *slots, const int64_t *n,
                   const float *const *gact, const float *h, int64_t T, int64_t D, int64_t g8, int64_t g4, int act,
                   int64_t parts, float *out) {
    if (ngroups < 0 || ngroups > 3 || T < 0 || T > MAX_T || D <= 0 || D % 2 || g8 <= 0 || D % g8 || g4 <= 0
        || D % g4 || g4 % 2 || (parts != 2 && parts != 3))
        return -1;
    ffn_group groups[3];
    for (int i = 0; i < ngroups; i++) {
        if (kinds[i] < KIND_FP16 || kinds[i] > KIND_INT4 || (n[i] && (parts == 2) != (gact[i] != NULL))) return -1;
        if (!slots_ok(slots[i], n[i], pool_rows[i])) return -3;
        groups[i] = (ffn_group){kinds[i], pools[i], pool_rows[i], bundle_bytes[i], slots[i], n[i], gact[i]};
    }
    if (T == 0) return 0;
    const int ways = m2c_threads();
    uint8_t *scratch = m2c_scratch(ffn_scratch_bytes(T, D, g4, ways));
    if (!scratch) return -2;
    ffn_acts a;
    const int64_t used = ffn_prepare(&a, h, T, D, g8, g4, parts, act, scratch);
    ffn_run(&a, groups, ngroups, scratch + used, ways, out);
    return 0;
}

static int ffn_entry(int kind, const uint8_t *pool, int64_t pool_rows, int64_t bundle_bytes, const int64_t *slots,
                     int64_t n, const float *h, int64_t T, int64_t D, int64_t group, int act, int64_t parts,
                     const float *gact, float *out) {
    if (T < 0 || T > MAX_T || D <= 0 || D % 2 || group <= 0 || D % group || parts != (gact ? 2 : 3)) return -1;
    if (kind == KIND_INT4 && group % 2) return -1;
    if (!slots_ok(slots, n, pool_rows)) return -3; /* before any row is read, in any part */
    if (n == 0 || T == 0) return 0;
    /* the other format's group is a placeholder (no row of it is read): a block where one fits, else D */
    const int64_t other = D % Q8_BLOCK == 0 ? Q8_BLOCK : D;
    const int64_t g4 = kind == KIND_INT4 ? group : other, g8 = kind == KIND_INT8 ? group : other;
    const int ways = m2c_threads();
    uint8_t *scratch = m2c_scratch(ffn_scratch_bytes(T, D, g4, ways));
    if (!scratch) return -2;
    ffn_acts a;
    const int64_t used = ffn_prepare(&a, h, T, D, g8, g4, parts, act, scratch);
    const ffn_group g = {kind, pool, pool_rows, bundle_bytes, slots, n, gact};
    ffn_run(&a, &g, 1, scratch + used, ways, out);
    return 0;
}

int m2c_ffn_fp16(const uint8_t *pool, int64_t pool_rows, int64_t bundle_bytes, const int64_t *slots, int64_t n,
                 const float *h, int64_t T, int64_t D, int act, int64_t parts, const float *gact, float *out) {
    return ffn_entry(KIND_FP16, pool, pool_rows, bundle_bytes, slots, n, h, T, D, D, act, parts, gact, out);
}

int m2c_ffn_int8(const uint8_t *pool, int64_t pool_rows, int64_t bundle_bytes, const int64_t *slots, int64_t n,
                 const float *h, int64_t T, int64_t D, int64_t group, int act, int64_t parts, const float *gact,
                 float *out) {
    return ffn_entry(KIND_INT8, pool, pool_rows, bundle_bytes, slots, n, h, T, D, group, act, parts, gact, out);
}

int m2c_ffn_int4(const uint8_t *pool, int64_t pool_rows, int64_t bundle_bytes, const int64_t *slots, int64_t n,
                 const float *h, int64_t T, int64_t D, int64_t group, int act, int64_t parts, const float *gact,
                 float *out) {
    return ffn_entry(KIND_INT4, pool, pool_rows, bundle_bytes, slots, n, h, T, D, group, act, parts, gact, out);
}

/* ---- copies and plain reads --------------------------------------------------------------------------- */

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

typedef struct {
    const uint8_t *base;
    const int64_t *rows;
    int64_t n, width;
    uint64_t sums[M2C_MAX_THREADS];
} read_task;

static void read_part(void *ctx, int part, int parts) {
    read_task *k = ctx;
    int64_t b, e;
    m2c_share(k->n, part, parts, &b, &e);
    uint64_t s = 0;
#if M2C_AVX2
    __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
#endif
    for (int64_t i = b; i < e; i++) {
        const uint8_t *p = k->base + (k->rows ? k->rows[i] : i) * k->width;
        int64_t j = 0;
#if M2C_AVX2
        for (; j + 64 <= k->width; j += 64) {
            a0 = _mm256_add_epi64(a0, _mm256_loadu_si256((const __m256i *)(p + j)));
            a1 = _mm256_add_epi64(a1, _mm256_loadu_si256((const __m256i *)(p + j + 32)));
        }
#endif
        for (; j < k->width; j++) s += p[j];
    }
#if M2C_AVX2
    uint64_t lanes[4];
    _mm256_storeu_si256((__m256i *)lanes, _mm256_add_epi64(a0, a1));
    s += lanes[0] + lanes[1] + lanes[2] + lanes[3];
#endif
    k->sums[part] = s;
}

/* Reads rows[0..n) (NULL: 0..n) of `width` bytes at base, shared among the pool's threads as the FFN shares its
 * rows, and returns a sum of their bytes: the ceiling a kernel over the same bytes is measured against. */
uint64_t m2c_read_rows(const uint8_t *base, const int64_t *rows, int64_t n, int64_t width) {
    read_task k = {base, rows, n, width, {0}};
    m2c_run(read_part, &k, (int)(n * width / M2C_MIN_PART_BYTES));
    uint64_t s = 0;
    for (int i = 0; i < M2C_MAX_THREADS; i++) s += k.sums[i];
    return s;
}
