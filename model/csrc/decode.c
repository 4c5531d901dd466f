/* A decode token of one sequence whose weights are all in memory, in one call: every layer's attention block,
 * the gate policy's scores and its choice of neurons and precisions, the FFN over the chosen rows where they
 * sit (the DRAM tier's whole layers), then the LM head.
 *
 * The engine's actors plan, read and copy a layer at a time; when every layer of every precision the policy
 * uses is held in DRAM for good there is nothing left for them to do per layer, and what a layer costs is its
 * bytes: here no Python runs between layers and no thread hop is taken (m2cache.model.native_decode).
 *
 * It computes what the layer-by-layer path computes, the same kernels in the same order: the attention block
 * (attention.c), the residual and the FFN input stored in the compute dtype; the gate activations of every
 * neuron from the packed INT4 copy (m2c_gate_int4); scores |act| * ||up||·||down|| in float32; the top
 * counts[0] neurons at FP16, the next counts[1] at INT8, the next counts[2] at INT4 (ties broken otherwise
 * than numpy's argpartition does); each group's rows in ascending order through the FFN kernel (a split
 * store's rows take the gate activations above); the FFN's output rounded to the compute dtype and added.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels.h"
#include "m2cache.h"
#include "threads.h"

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t); /* time.perf_counter_ns's clock */
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static float stored(float v, int is_bf16) { return is_bf16 ? from_bf16(to_bf16(v)) : v; }

/* idx[lo..hi) reordered so that its first k - lo entries have the largest scores (k in [lo, hi]) */
static void select_top(const float *score, int64_t *idx, int64_t lo, int64_t hi, int64_t k) {
    while (hi - lo > 1 && lo < k && k < hi) {
        /* median of three as pivot, then a three-way partition: larger | equal | smaller */
        const int64_t mid = lo + (hi - lo) / 2;
        float a = score[idx[lo]], b = score[idx[mid]], c = score[idx[hi - 1]];
        const float pivot = a > b ? (b > c ? b : (a > c ? c : a)) : (a > c ? a : (b > c ? c : b));
        int64_t lt = lo, i = lo, gt = hi;
        while (i < gt) {
            const float s = score[idx[i]];
            if (s > pivot) {
                const int64_t t = idx[lt]; idx[lt] = idx[i]; idx[i] = t;
                lt++, i++;
            } else if (s < pivot) {
                gt--;
                const int64_t t = idx[gt]; idx[gt] = idx[i]; idx[i] = t;
            } else {
                i++;
            }
        }
        if (k <= lt) hi = lt;
        else if (k >= gt) lo = gt;
        else return; /* the cut falls among equal scores */
    }
}

typedef struct {
    float *y, *hn, *h, *gact, *score, *ffn, *gsel;
    int64_t *idx, *ids;
    uint8_t *cls;
    void *attn, *acts;
    int parts; /* the FFN's part accumulators in acts */
} decode_scratch;

static int64_t al(int64_t n) { return (n + 63) / 64 * 64; }

static int64_t scratch_bytes(const m2c_model *m, int64_t L, int parts) {
    const int64_t D = m->D, F = m->F;
    return al(attn_scratch_bytes(D, m->H, m->KV, m->hd, L)) + 4 * al(4 * D) + 3 * al(4 * F) + 2 * al(8 * F) + al(F)
           + ffn_scratch_bytes(1, D, m->g4, parts);
}

static decode_scratch carve(const m2c_model *m, int64_t L, int parts, uint8_t *p) {
    const int64_t D = m->D, F = m->F;
    decode_scratch s;
    s.parts = parts;
    s.attn = p, p += al(attn_scratch_bytes(D, m->H, m->KV, m->hd, L));
    s.y = (float *)p, p += al(4 * D);
    s.hn = (float *)p, p += al(4 * D);
    s.h = (float *)p, p += al(4 * D);
    s.ffn = (float *)p, p += al(4 * D);
    s.gact = (float *)p, p += al(4 * F);
    s.score = (float *)p, p += al(4 * F);
    s.gsel = (float *)p, p += al(4 * F);
    s.idx = (int64_t *)p, p += al(8 * F);
    s.ids = (int64_t *)p, p += al(8 * F);
    s.cls = p, p += al(F);
    s.acts = p;
    return s;
}

/* ids[0..) of each class in ascending order: FP16, then INT8, then INT4; returns how many were kept */
static int64_t choose(const m2c_model *m, const m2c_layer *l, decode_scratch *s) {
    const int64_t F = m->F;
    for (int64_t j = 0; j < F; j++) {
        s->idx[j] = j;
        s->cls[j] = 3;
    }
    int64_t at = 0;
    for (int c = 0; c < 3; c++) {
        const int64_t k = at + l->counts[c];
        select_top(s->score, s->idx, at, F, k);
        for (int64_t i = at; i < k; i++) s->cls[s->idx[i]] = (uint8_t)c;
        at = k;
    }
    int64_t start[3] = {0, l->counts[0], l->counts[0] + l->counts[1]};
    for (int64_t j = 0; j < F; j++)
        if (s->cls[j] < 3) s->ids[start[s->cls[j]]++] = j;
    return at;
}

static void layer_step(const m2c_model *m, const m2c_layer *l, void *x, void *cache, int64_t cap, int64_t pos,
                       const void *cos, const void *ssin, decode_scratch *s, int64_t *times) {
    const int64_t D = m->D, F = m->F;
    const int bf = m->is_bf16;
    if (times) times[0] = now_ns();
    const attn_args g = {x, l->attn_norm, m->eps, l->wqkv, l->sqkv, l->wo, l->so, l->wgroup, D, m->H, m->KV, m->hd, cos, ssin,
                         cache, cap, pos, l->ffn_norm, bf};
    attn_block(&g, s->attn, s->y, s->hn);
    for (int64_t i = 0; i < D; i++) {
        s->y[i] = stored(s->y[i], bf); /* the residual and the FFN input, as the compute dtype holds them */
        s->h[i] = stored(s->hn[i], bf);
    }
    if (times) times[1] = now_ns();
    ffn_acts a;
    const int64_t used = ffn_prepare(&a, s->h, 1, D, m->g8, m->g4, m->parts, m->act, s->acts);
    gate_run(&a, l->gates, F, s->gact);
    for (int64_t j = 0; j < F; j++) s->score[j] = fabsf(s->gact[j]) * l->norms[j];
    const int64_t kept = choose(m, l, s);
    for (int64_t i = 0; i < kept; i++) s->gsel[i] = s->gact[s->ids[i]];
    if (times) times[2] = now_ns();
    ffn_group groups[3];
    int ng = 0;
    for (int c = 0, at = 0; c < 3; at += (int)l->counts[c], c++) {
        if (!l->counts[c]) continue;
        groups[ng++] = (ffn_group){c, l->ffn[c], F, m->bundle_bytes[c], s->ids + at, l->counts[c],
                                   m->parts == 2 ? s->gsel + at : NULL};
    }
    memset(s->ffn, 0, sizeof(float) * (size_t)D);
    ffn_run(&a, groups, ng, (uint8_t *)s->acts + used, s->parts, s->ffn);
    for (int64_t i = 0; i < D; i++) {
        const float v = stored(s->y[i] + stored(s->ffn[i], bf), bf);
        if (bf) ((bf16 *)x)[i] = to_bf16(v);
        else ((float *)x)[i] = v;
    }
    if (times) times[3] = now_ns();
}

int m2c_decode(const m2c_model *m, const m2c_layer *layers, int64_t n_layers, void *x, void *cache, int64_t cap,
               int64_t pos, const void *cos, const void *ssin, float *logits, int64_t *times) {
    if (m->D <= 0 || m->D % 2 || m->F <= 0 || m->H <= 0 || m->KV <= 0 || m->H % m->KV || m->hd <= 0 || m->hd % 2)
        return -1;
    if (m->g4 <= 0 || m->D % m->g4 || m->g4 % 2 || m->g8 <= 0 || m->D % m->g8 || (m->parts != 2 && m->parts != 3))
        return -1;
    if (pos < 0 || pos >= cap || n_layers < 0) return -1;
    for (int64_t L = 0; L < n_layers; L++) {
        const m2c_layer *l = &layers[L];
        if (!l->gates || !l->norms || l->counts[0] < 0 || l->counts[1] < 0 || l->counts[2] < 0
            || l->counts[0] + l->counts[1] + l->counts[2] > m->F)
            return -1;
        for (int c = 0; c < 3; c++)
            if (l->counts[c] && !l->ffn[c]) return -1;
        if (!wgroup_ok(l->wgroup, m->D) || !wgroup_ok(l->wgroup, m->H * m->hd)) return -1;
    }
    if (!wgroup_ok(m->head_group, m->D)) return -1;
    const int parts = m2c_threads();
    uint8_t *mem = m2c_scratch(scratch_bytes(m, pos + 1, parts));
    if (!mem) return -2;
    decode_scratch s = carve(m, pos + 1, parts, mem);
    const int64_t esize = m->is_bf16 ? 2 : 4, layer_cache = 2 * m->KV * cap * m->hd * esize;
    m2c_spin(1); /* the token's runs come back to back: the pool's threads watch for them (threads.c) */
    for (int64_t L = 0; L < n_layers; L++)
        layer_step(m, &layers[L], x, (uint8_t *)cache + L * layer_cache, cap, pos, cos, ssin, &s,
                   times ? times + 4 * L : NULL);
    int rc = 0;
    if (logits) {
        if (times) times[4 * n_layers] = now_ns();
        rc = m2c_matvec(x, m->final_norm, m->eps, m->head, m->head_scale, m->head_group, m->vocab, m->D, m->is_bf16,
                        logits);
        if (times) times[4 * n_layers + 1] = now_ns();
    }
    m2c_spin(0);
    return rc;
}
