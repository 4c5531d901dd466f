/* One decode position's attention block of one sequence, in one call; and the products of a resident matrix
 * with one row (the LM head).
 *
 * x_out = x + Wo · attention(rope(Wqkv · rms_norm(x) * attn_norm)), the position's keys and values
 * written into the layer's cache, and (ffn_norm not NULL) h = rms_norm(x_out) * ffn_norm, the FFN's input.
 * torch runs this as ~35 small operators, each a dispatch through the interpreter and torch whose code
 * and data the layer's weight stream has pushed out of the caches; here it is one call that releases
 * the GIL, its projections shared among the kernels' threads (threads.h).
 *
 * The activations, norms, RoPE tables and cache are float32 or bfloat16 (`is_bf16`), the engine's compute
 * dtype; the weights float32 or bfloat16 rows as the activations are, or INT8 rows with one float32
 * scale each (W ≈ q * scale[row]): the resident forms "full" and "int8" (m2cache.formats.int8). Every sum
 * is taken in float32 and a bfloat16 result is rounded once, where it is stored (the cache, x_out, h),
 * so a bfloat16 engine's values differ from torch's operators (which round after each) by bfloat16
 * rounding; float32 ones by float32 rounding. INT8 rows meet the normed activations quantised to INT8 in
 * blocks of 32 (simd.h) unless m2c_set_int8_activations(0). The dense reference computes decode positions
 * here too.
 *
 * The cache of one layer is [2][KV][cap][hd] (keys, then values); head h attends with key/value head
 * h / (H / KV). RoPE: out[i] = v[i] * cos[i] + v[(i + hd/2) % hd] * ssin[i], ssin's first half negated
 * (m2cache.model.llama.apply_rope).
 */
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "m2cache.h"
#include "threads.h"

/* n values of a float32 (bf16_src = 0) or bfloat16 array, as float32 */
static void widen(const void *src, int bf16_src, int64_t n, float *dst) {
    if (bf16_src)
        for (int64_t i = 0; i < n; i++) dst[i] = from_bf16(((const bf16 *)src)[i]);
    else
        memcpy(dst, src, sizeof(float) * (size_t)n);
}

typedef struct {
    const void *w;
    const float *scale, *x;
    const q8_row *xq; /* INT8 rows with INT8 activations, else NULL */
    int64_t rows, cols, group; /* group: INT8 values per scale (cols: one a row) */
    int kind;
    float *y;
} matvec_task;

static void matvec_part(void *ctx, int part, int parts) {
    const matvec_task *k = ctx;
    int64_t r0, r1;
    m2c_share(k->rows, part, parts, &r0, &r1);
    for (int64_t r = r0; r < r1; r++) {
        if (k->kind == W_INT8) {
            const int8_t *row = (const int8_t *)k->w + r * k->cols;
            const float *s = k->scale + r * (k->cols / k->group);
            k->y[r] = k->xq ? dot_i8_q8(row, s, k->group, k->xq, k->cols) : dot_i8_f32(row, s, k->group, k->x, k->cols);
        } else if (k->kind == W_BF16) {
            k->y[r] = dot_bf16((const bf16 *)k->w + r * k->cols, k->x, k->cols);
        } else {
            k->y[r] = dot_f32((const float *)k->w + r * k->cols, k->x, k->cols);
        }
    }
}

int64_t matvec_scratch_bytes(int64_t cols) { return q8_bytes(cols) + 64; }

int wgroup_ok(int64_t group, int64_t cols) { return group == 0 || (group > 0 && cols % group == 0); }

void matvec(const void *w, const float *scale, int64_t group, int kind, const float *x, int64_t rows, int64_t cols,
            float *y, void *scratch) {
    q8_row xq;
    group = group ? group : cols;
    const int q8 = kind == W_INT8 && m2c_int8_activations() && cols % Q8_BLOCK == 0 && group % Q8_BLOCK == 0;
    if (q8) {
        xq = q8_at(scratch, cols);
        q8_quantise(x, cols, &xq);
    }
    matvec_task k = {w, scale, x, q8 ? &xq : NULL, rows, cols, group, kind, y};
    const int64_t bytes = rows * cols * (kind == W_INT8 ? 1 : kind == W_BF16 ? 2 : 4);
    m2c_run(matvec_part, &k, (int)(bytes / M2C_MIN_PART_BYTES));
}

static void rms_norm(const float *x, const float *weight, float eps, int64_t D, float *out) {
    float ss = 0.0f;
    for (int64_t i = 0; i < D; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)D + eps);
    for (int64_t i = 0; i < D; i++) out[i] = x[i] * r * weight[i];
}

static void rope(float *v, const float *cos, const float *ssin, int64_t hd, float *tmp) {
    const int64_t half = hd / 2;
    for (int64_t i = 0; i < hd; i++) tmp[i] = v[i] * cos[i] + v[(i + half) % hd] * ssin[i];
    memcpy(v, tmp, sizeof(float) * (size_t)hd);
}

static void axpy_cache(float a, const void *v, int is_bf16, float *y, int64_t n) {
    if (is_bf16)
        for (int64_t i = 0; i < n; i++) y[i] += a * from_bf16(((const bf16 *)v)[i]);
    else
        for (int64_t i = 0; i < n; i++) y[i] += a * ((const float *)v)[i];
}

int64_t attn_scratch_bytes(int64_t D, int64_t H, int64_t KV, int64_t hd, int64_t L) {
    const int64_t rows = (H + 2 * KV) * hd;
    const int64_t cols = D > H * hd ? D : H * hd;
    return (int64_t)sizeof(float) * (5 * D + rows + H * hd + L + 3 * hd) + matvec_scratch_bytes(cols) + 64;
}

/* The block's sums in float32 (y = x + attention, hn = rms_norm(y) * ffn_norm), before they are stored. */
void attn_block(const attn_args *g, void *scratch, float *y, float *hn) {
    const int64_t D = g->D, H = g->H, KV = g->KV, hd = g->hd, cap = g->cap, pos = g->pos;
    const int64_t rows = (H + 2 * KV) * hd, G = H / KV, L = pos + 1;
    float *xf = scratch, *xn = xf + D, *norm = xn + D, *qkv = norm + D, *att = qkv + rows;
    float *p = att + H * hd, *tmp = p + L, *cs = tmp + hd, *sn = cs + hd;
    void *mv = (void *)((((uintptr_t)(sn + hd)) + 63) & ~(uintptr_t)63);
    const int bf = g->is_bf16, wkind = bf ? W_BF16 : W_F32;

    widen(g->x, bf, D, xf);
    widen(g->attn_norm, bf, D, norm);
    widen(g->cos, bf, hd, cs);
    widen(g->ssin, bf, hd, sn);
    rms_norm(xf, norm, g->eps, D, xn);
    matvec(g->wqkv, g->sqkv, g->wgroup, g->sqkv ? W_INT8 : wkind, xn, rows, D, qkv, mv);
    float *q = qkv, *k = qkv + H * hd, *v = k + KV * hd;
    for (int64_t h = 0; h < H; h++) rope(q + h * hd, cs, sn, hd, tmp);
    for (int64_t j = 0; j < KV; j++) rope(k + j * hd, cs, sn, hd, tmp);
    const int64_t half_cache = KV * cap * hd; /* values start this many elements after the keys */
    for (int64_t j = 0; j < KV; j++)
        for (int64_t i = 0; i < hd; i++) {
            const int64_t at = (j * cap + pos) * hd + i;
            if (bf) {
                ((bf16 *)g->cache)[at] = to_bf16(k[j * hd + i]);
                ((bf16 *)g->cache)[half_cache + at] = to_bf16(v[j * hd + i]);
            } else {
                ((float *)g->cache)[at] = k[j * hd + i];
                ((float *)g->cache)[half_cache + at] = v[j * hd + i];
            }
        }
    const float scale = 1.0f / sqrtf((float)hd);
    const size_t esize = bf ? 2 : 4;
    for (int64_t h = 0; h < H; h++) {
        const int64_t base = (h / G) * cap * hd; /* this head's key/value head, position 0 */
        const float *qh = q + h * hd;
        float m = 0.0f, sum = 0.0f;
        for (int64_t t = 0; t < L; t++) {
            const int64_t at = base + t * hd;
            p[t] = (bf ? dot_bf16((const bf16 *)g->cache + at, qh, hd) : dot_f32((const float *)g->cache + at, qh, hd)) * scale;
            m = t == 0 || p[t] > m ? p[t] : m;
        }
        for (int64_t t = 0; t < L; t++) {
            p[t] = expf(p[t] - m);
            sum += p[t];
        }
        float *out = att + h * hd;
        memset(out, 0, sizeof(float) * (size_t)hd);
        for (int64_t t = 0; t < L; t++)
            axpy_cache(p[t] / sum, (const uint8_t *)g->cache + (half_cache + base + t * hd) * esize, bf, out, hd);
    }
    matvec(g->wo, g->so, g->wgroup, g->so ? W_INT8 : wkind, att, D, H * hd, y, mv);
    for (int64_t i = 0; i < D; i++) y[i] += xf[i];
    if (g->ffn_norm) {
        widen(g->ffn_norm, bf, D, norm);
        if (bf) /* the FFN's input is the norm of the residual as stored */
            for (int64_t i = 0; i < D; i++) y[i] = from_bf16(to_bf16(y[i]));
        rms_norm(y, norm, g->eps, D, hn);
    }
}

/* Returns 0, -1 for shapes it does not take, -2 when out of memory. `is_bf16`: activations, norms, tables,
 * cache and outputs are bfloat16 (else float32); wqkv/wo are INT8 rows where sqkv/so are not NULL, else
 * rows of the activations' type. */
int m2c_attn_decode(const void *x, const void *attn_norm, float eps, const void *wqkv, const float *sqkv,
                    const void *wo, const float *so, int64_t wgroup, int64_t D, int64_t H, int64_t KV, int64_t hd,
                    const void *cos, const void *ssin, void *cache, int64_t cap, int64_t pos,
                    const void *ffn_norm, void *x_out, void *h_out, int is_bf16) {
    if (D <= 0 || H <= 0 || KV <= 0 || H % KV || hd <= 0 || hd % 2 || pos < 0 || pos >= cap) return -1;
    if (!wgroup_ok(wgroup, D) || !wgroup_ok(wgroup, H * hd)) return -1;
    const int64_t work = attn_scratch_bytes(D, H, KV, hd, pos + 1);
    float *buf = m2c_scratch(work + (int64_t)sizeof(float) * 2 * D);
    if (!buf) return -2;
    float *y = buf, *hn = y + D;
    const attn_args g = {x, attn_norm, eps, wqkv, sqkv, wo, so, wgroup, D, H, KV, hd, cos, ssin, cache, cap, pos,
                         ffn_norm, is_bf16};
    attn_block(&g, hn + D, y, hn);
    for (int64_t i = 0; i < D; i++) {
        if (is_bf16) {
            ((bf16 *)x_out)[i] = to_bf16(y[i]);
            if (ffn_norm) ((bf16 *)h_out)[i] = to_bf16(hn[i]);
        } else {
            ((float *)x_out)[i] = y[i];
            if (ffn_norm) ((float *)h_out)[i] = hn[i];
        }
    }
    return 0;
}

/* y[rows] (float32) = W · rms_norm(x) * norm (norm NULL: W · x) for one row x[cols] of the activations' type
 * (float32 or bfloat16), W float32/bfloat16 rows as x, or INT8 rows with a float32 scale each (scale not NULL):
 * the LM head over the last position. -1 for shapes it does not take, -2 when out of memory. */
int m2c_matvec(const void *x, const void *norm, float eps, const void *w, const float *scale, int64_t group,
               int64_t rows, int64_t cols, int is_bf16, float *y) {
    if (rows < 0 || cols <= 0 || !wgroup_ok(group, cols)) return -1;
    float *buf = m2c_scratch((int64_t)sizeof(float) * 2 * cols + matvec_scratch_bytes(cols) + 64);
    if (!buf) return -2;
    float *xf = buf, *nf = xf + cols;
    void *mv = (void *)((((uintptr_t)(nf + cols)) + 63) & ~(uintptr_t)63);
    widen(x, is_bf16, cols, xf);
    if (norm) {
        widen(norm, is_bf16, cols, nf);
        rms_norm(xf, nf, eps, cols, xf);
    }
    matvec(w, scale, group, scale ? W_INT8 : is_bf16 ? W_BF16 : W_F32, xf, rows, cols, y, mv);
    return 0;
}
