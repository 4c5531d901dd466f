/* One decode position's attention block of one sequence, in float32, in one call.
 *
 * x_out = x + Wo · attention(rope(Wqkv · rms_norm(x) * attn_norm)), the position's keys and values
 * written into the layer's cache, and (ffn_norm not NULL) h = rms_norm(x_out) * ffn_norm, the FFN's input.
 * torch runs this as ~35 small operators, each a dispatch through the interpreter and torch whose code
 * and data the layer's weight stream has pushed out of the caches; here it is one call that releases
 * the GIL. The values are the torch path's to float32 rounding (sums taken in another order).
 *
 * Weights: float32 rows, or INT8 rows with one float32 scale each (W ≈ q * scale[row]): the resident
 * forms "full" and "int8" of a float32 engine (m2cache.model.int8). The cache of one layer is
 * float32 [2][KV][cap][hd] (keys, then values); head h attends with key/value head h / (H / KV).
 * RoPE: out[i] = v[i] * cos[i] + v[(i + hd/2) % hd] * ssin[i], ssin's first half negated
 * (m2cache.model.llama.apply_rope). Built with the FFN kernels (m2cache.model.cpu_kernels).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "threads.h"

/* A part of a shared projection reads at least this many bytes of weights. */
#define MIN_PART_BYTES (96 << 10)

static float dot_f32(const float *w, const float *x, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += w[i] * x[i];
    return s;
}

static float dot_i8(const int8_t *w, const float *x, int64_t n) {
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++) s += (float)w[i] * x[i];
    return s;
}

typedef struct {
    const void *w;
    const float *scale, *x;
    int64_t rows, cols;
    float *y;
} matvec_task;

static void matvec_part(void *ctx, int part, int parts) {
    const matvec_task *k = ctx;
    int64_t r0, r1;
    m2c_share(k->rows, part, parts, &r0, &r1);
    if (k->scale) {
        const int8_t *q = (const int8_t *)k->w;
        for (int64_t r = r0; r < r1; r++) k->y[r] = dot_i8(q + r * k->cols, k->x, k->cols) * k->scale[r];
    } else {
        const float *f = (const float *)k->w;
        for (int64_t r = r0; r < r1; r++) k->y[r] = dot_f32(f + r * k->cols, k->x, k->cols);
    }
}

/* y[r] = W[r] · x for rows [0, rows), shared among the kernels' threads; W float32, or INT8 with scale[r]
 * (scale not NULL). */
static void matvec(const void *w, const float *scale, const float *x, int64_t rows, int64_t cols, float *y) {
    matvec_task k = {w, scale, x, rows, cols, y};
    const int64_t bytes = rows * cols * (scale ? 1 : 4);
    m2c_run(matvec_part, &k, (int)(bytes / MIN_PART_BYTES));
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

/* Returns 0, -1 for shapes it does not take, -2 when out of memory. */
int m2c_attn_decode(const float *x, const float *attn_norm, float eps, const void *wqkv, const float *sqkv,
                    const void *wo, const float *so, int64_t D, int64_t H, int64_t KV, int64_t hd,
                    const float *cos, const float *ssin, float *cache, int64_t cap, int64_t pos,
                    const float *ffn_norm, float *x_out, float *h_out) {
    if (D <= 0 || H <= 0 || KV <= 0 || H % KV || hd <= 0 || hd % 2 || pos < 0 || pos >= cap) return -1;
    const int64_t rows = (H + 2 * KV) * hd, G = H / KV, L = pos + 1;
    float *buf = malloc(sizeof(float) * (size_t)(D + rows + H * hd + L + hd));
    if (!buf) return -2;
    float *xn = buf, *qkv = xn + D, *att = qkv + rows, *p = att + H * hd, *tmp = p + L;

    rms_norm(x, attn_norm, eps, D, xn);
    matvec(wqkv, sqkv, xn, rows, D, qkv);
    float *q = qkv, *k = qkv + H * hd, *v = k + KV * hd;
    for (int64_t h = 0; h < H; h++) rope(q + h * hd, cos, ssin, hd, tmp);
    float *keys = cache, *values = cache + KV * cap * hd;
    for (int64_t j = 0; j < KV; j++) {
        rope(k + j * hd, cos, ssin, hd, tmp);
        for (int64_t i = 0; i < hd; i++) {
            keys[(j * cap + pos) * hd + i] = k[j * hd + i];
            values[(j * cap + pos) * hd + i] = v[j * hd + i];
        }
    }
    const float scale = 1.0f / sqrtf((float)hd);
    for (int64_t h = 0; h < H; h++) {
        const int64_t j = h / G;
        const float *qh = q + h * hd, *kj = keys + j * cap * hd, *vj = values + j * cap * hd;
        float m = -INFINITY, sum = 0.0f;
        for (int64_t t = 0; t < L; t++) {
            p[t] = dot_f32(kj + t * hd, qh, hd) * scale;
            m = p[t] > m ? p[t] : m;
        }
        for (int64_t t = 0; t < L; t++) {
            p[t] = expf(p[t] - m);
            sum += p[t];
        }
        float *out = att + h * hd;
        for (int64_t i = 0; i < hd; i++) out[i] = 0.0f;
        for (int64_t t = 0; t < L; t++) {
            const float a = p[t] / sum;
            for (int64_t i = 0; i < hd; i++) out[i] += a * vj[t * hd + i];
        }
    }
    matvec(wo, so, att, D, H * hd, x_out);
    for (int64_t i = 0; i < D; i++) x_out[i] += x[i];
    if (ffn_norm) rms_norm(x_out, ffn_norm, eps, D, h_out);
    free(buf);
    return 0;
}
