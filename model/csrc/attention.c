/* One decode position's attention block of one sequence, in one call.
 *
 * x_out = x + Wo · attention(rope(Wqkv · rms_norm(x) * attn_norm)), the position's keys and values
 * written into the layer's cache, and (ffn_norm not NULL) h = rms_norm(x_out) * ffn_norm, the FFN's input.
 * torch runs this as ~35 small operators, each a dispatch through the interpreter and torch whose code
 * and data the layer's weight stream has pushed out of the caches; here it is one call that releases
 * the GIL, its projections shared among the kernels' threads (threads.h).
 *
 * The activations, norms, RoPE tables and cache are float32 or bfloat16 (`is_bf16`), the engine's compute
 * dtype; the weights float32 or bfloat16 rows as the activations are, or INT8 rows with one float32
 * scale each (W ≈ q * scale[row]): the resident forms "full" and "int8" (m2cache.model.int8). Every sum
 * is taken in float32 and a bfloat16 result is rounded once, where it is stored (the cache, x_out, h),
 * so a bfloat16 engine's values differ from torch's operators (which round after each) by bfloat16
 * rounding; float32 ones by float32 rounding. The dense reference computes decode positions here too.
 *
 * The cache of one layer is [2][KV][cap][hd] (keys, then values); head h attends with key/value head
 * h / (H / KV). RoPE: out[i] = v[i] * cos[i] + v[(i + hd/2) % hd] * ssin[i], ssin's first half negated
 * (m2cache.model.llama.apply_rope).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "threads.h"


typedef uint16_t bf16;

static inline float from_bf16(bf16 v) {
    const uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline bf16 to_bf16(float f) {  /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (bf16)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* n values of a float32 (bf16_src = 0) or bfloat16 array, as float32 */
static void widen(const void *src, int bf16_src, int64_t n, float *dst) {
    if (bf16_src)
        for (int64_t i = 0; i < n; i++) dst[i] = from_bf16(((const bf16 *)src)[i]);
    else
        memcpy(dst, src, sizeof(float) * (size_t)n);
}

static float dot_f32(const float *w, const float *x, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += w[i] * x[i];
    return s;
}

static float dot_bf16(const bf16 *w, const float *x, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += from_bf16(w[i]) * x[i];
    return s;
}

static float dot_i8(const int8_t *w, const float *x, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += (float)w[i] * x[i];
    return s;
}

enum { W_F32 = 0, W_BF16 = 1, W_INT8 = 2 };

typedef struct {
    const void *w;
    const float *scale, *x;
    int64_t rows, cols;
    int kind;
    float *y;
} matvec_task;

static void matvec_part(void *ctx, int part, int parts) {
    const matvec_task *k = ctx;
    int64_t r0, r1;
    m2c_share(k->rows, part, parts, &r0, &r1);
    for (int64_t r = r0; r < r1; r++) {
        if (k->kind == W_INT8) k->y[r] = dot_i8((const int8_t *)k->w + r * k->cols, k->x, k->cols) * k->scale[r];
        else if (k->kind == W_BF16) k->y[r] = dot_bf16((const bf16 *)k->w + r * k->cols, k->x, k->cols);
        else k->y[r] = dot_f32((const float *)k->w + r * k->cols, k->x, k->cols);
    }
}

/* y[r] = W[r] · x for rows [0, rows), shared among the kernels' threads. */
static void matvec(const void *w, const float *scale, int kind, const float *x, int64_t rows, int64_t cols, float *y) {
    matvec_task k = {w, scale, x, rows, cols, kind, y};
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
    for (int64_t i = 0; i < hd; i++) v[i] = tmp[i];
}

/* Returns 0, -1 for shapes it does not take, -2 when out of memory. `is_bf16`: activations, norms, tables,
 * cache and outputs are bfloat16 (else float32); wqkv/wo are INT8 rows where sqkv/so are not NULL, else
 * rows of the activations' type. */
int m2c_attn_decode(const void *x, const void *attn_norm, float eps, const void *wqkv, const float *sqkv,
                    const void *wo, const float *so, int64_t D, int64_t H, int64_t KV, int64_t hd,
                    const void *cos, const void *ssin, void *cache, int64_t cap, int64_t pos,
                    const void *ffn_norm, void *x_out, void *h_out, int is_bf16) {
    if (D <= 0 || H <= 0 || KV <= 0 || H % KV || hd <= 0 || hd % 2 || pos < 0 || pos >= cap) return -1;
    const int64_t rows = (H + 2 * KV) * hd, G = H / KV, L = pos + 1;
    float *buf = malloc(sizeof(float) * (size_t)(5 * D + rows + H * hd + L + 3 * hd));
    if (!buf) return -2;
    float *xf = buf, *xn = xf + D, *norm = xn + D, *y = norm + D, *hn = y + D, *qkv = hn + D, *att = qkv + rows;
    float *p = att + H * hd, *tmp = p + L, *cs = tmp + hd, *sn = cs + hd;
    const int wkind = is_bf16 ? W_BF16 : W_F32;

    widen(x, is_bf16, D, xf);
    widen(attn_norm, is_bf16, D, norm);
    widen(cos, is_bf16, hd, cs);
    widen(ssin, is_bf16, hd, sn);
    rms_norm(xf, norm, eps, D, xn);
    matvec(wqkv, sqkv, sqkv ? W_INT8 : wkind, xn, rows, D, qkv);
    float *q = qkv, *k = qkv + H * hd, *v = k + KV * hd;
    for (int64_t h = 0; h < H; h++) rope(q + h * hd, cs, sn, hd, tmp);
    for (int64_t j = 0; j < KV; j++) rope(k + j * hd, cs, sn, hd, tmp);
    const int64_t half_cache = KV * cap * hd;  /* values start this many elements after the keys */
    for (int64_t j = 0; j < KV; j++)
        for (int64_t i = 0; i < hd; i++) {
            const int64_t at = (j * cap + pos) * hd + i;
            if (is_bf16) {
                ((bf16 *)cache)[at] = to_bf16(k[j * hd + i]);
                ((bf16 *)cache)[half_cache + at] = to_bf16(v[j * hd + i]);
            } else {
                ((float *)cache)[at] = k[j * hd + i];
                ((float *)cache)[half_cache + at] = v[j * hd + i];
            }
        }
    const float scale = 1.0f / sqrtf((float)hd);
    for (int64_t h = 0; h < H; h++) {
        const int64_t base = (h / G) * cap * hd;  /* this head's key/value head, position 0 */
        const float *qh = q + h * hd;
        float m = 0.0f, sum = 0.0f;
        for (int64_t t = 0; t < L; t++) {
            const int64_t at = base + t * hd;
            p[t] = (is_bf16 ? dot_bf16((const bf16 *)cache + at, qh, hd) : dot_f32((const float *)cache + at, qh, hd)) * scale;
            m = t == 0 || p[t] > m ? p[t] : m;
        }
        for (int64_t t = 0; t < L; t++) {
            p[t] = expf(p[t] - m);
            sum += p[t];
        }
        float *out = att + h * hd;
        for (int64_t i = 0; i < hd; i++) out[i] = 0.0f;
        for (int64_t t = 0; t < L; t++) {
            const float a = p[t] / sum;
            const int64_t at = half_cache + base + t * hd;
            if (is_bf16)
                for (int64_t i = 0; i < hd; i++) out[i] += a * from_bf16(((const bf16 *)cache)[at + i]);
            else
                for (int64_t i = 0; i < hd; i++) out[i] += a * ((const float *)cache)[at + i];
        }
    }
    matvec(wo, so, so ? W_INT8 : wkind, att, D, H * hd, y);
    for (int64_t i = 0; i < D; i++) y[i] += xf[i];
    if (ffn_norm) {
        widen(ffn_norm, is_bf16, D, norm);
        if (is_bf16)  /* the FFN's input is the norm of the residual as stored */
            for (int64_t i = 0; i < D; i++) y[i] = from_bf16(to_bf16(y[i]));
        rms_norm(y, norm, eps, D, hn);
    }
    for (int64_t i = 0; i < D; i++) {
        if (is_bf16) {
            ((bf16 *)x_out)[i] = to_bf16(y[i]);
            if (ffn_norm) ((bf16 *)h_out)[i] = to_bf16(hn[i]);
        } else {
            ((float *)x_out)[i] = y[i];
            if (ffn_norm) ((float *)h_out)[i] = hn[i];
        }
    }
    free(buf);
    return 0;
}
