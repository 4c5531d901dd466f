/* What the kernels share between their files (not the ABI: m2cache.h). The sparse FFN's core, shared by the
 * per-precision entry points (sparse_ffn.c) and the fused decode layer
 * (decode.c): the activations of a call prepared once, the neurons of one or more precision groups shared
 * among the pool's parts by their bytes, each part adding into accumulators of its own, added up once. */
#ifndef M2C_KERNELS_H
#define M2C_KERNELS_H
#include <stdint.h>

#include "simd.h"

#define MAX_T 64

enum { KIND_FP16 = 0, KIND_INT8 = 1, KIND_INT4 = 2 };

/* The rows of one precision group: pool rows `slots[0..n)` of `bundle_bytes` each, P = parts (3: gate, up,
 * down; 2: up, down with each row's gate activations given, gact[i][t]). */
typedef struct {
    int kind;
    const uint8_t *pool;
    int64_t pool_rows, bundle_bytes;
    const int64_t *slots;
    int64_t n;
    const float *gact;
} ffn_group;

/* A call's activations: T rows of h [T][D] float32, with what each row format's loops read. */
typedef struct {
    const float *h;
    int64_t T, D, g8, g4, parts;
    int act, q8_i8, q8_i4; /* INT8 rows, INT4 rows meet INT8 activations (simd.h) */
    int block8, block4;    /* INT8, INT4 rows' down columns in blocks (m2c_block_down) */
    q8_row r[MAX_T];       /* where either does */
    float *he, *ho;  /* [T][D/2] even and odd positions (INT4 rows, float32 activations) */
    float *xs4;      /* [T][D/g4] sums per INT4 group (the minimums' term) */
    float *dd4, *xs2; /* INT4 groups of 32 with INT8 activations: [T][D/32*4] block scales each 4 times,
                       * [T][2*D/32] (0, group sum) pairs (simd.h dot_i4_q8_g32); else NULL */
} ffn_acts;

/* token t's INT4 dot product (gate copy rows and bundles' parts alike) */
static inline float i4_dot(const ffn_acts *a, const uint8_t *b, const f16 *m, int64_t t) {
    const int64_t D = a->D, ng = D / a->g4;
    const float *xs = a->xs4 + t * ng;
#if M2C_AVX2
    if (a->dd4) return dot_i4_q8_g32(b, m, &a->r[t], a->dd4 + t * (D / Q8_BLOCK) * 4, a->xs2 + t * 2 * ng, D);
#endif
    return a->q8_i4 ? dot_i4_q8(b, m, a->g4, &a->r[t], xs, D)
                    : dot_i4_f32(b, m, a->g4, a->he + t * (D / 2), a->ho + t * (D / 2), xs, D);
}

/* Bytes of scratch ffn_prepare and ffn_run need together for `parts` parts. */
int64_t ffn_scratch_bytes(int64_t T, int64_t D, int64_t g4, int parts);

/* Fills `a` from h (scratch: ffn_scratch_bytes of it, from the front); returns the scratch it used. */
int64_t ffn_prepare(ffn_acts *a, const float *h, int64_t T, int64_t D, int64_t g8, int64_t g4, int64_t parts,
                    int act, void *scratch);

/* out[T][D] += the FFN over every group's rows, shared among at most max_parts of the pool's threads (scratch:
 * what follows prepare's, room for max_parts parts' accumulators). */
void ffn_run(const ffn_acts *a, const ffn_group *groups, int ngroups, void *scratch, int max_parts, float *out);

/* act(gate . h) [T][rows] of rows [j0, j1) of a packed INT4 gate copy (m2c_gate_int4's layout), one thread;
 * gate_run: every row, shared among the pool's threads. */
void gate_rows(const ffn_acts *a, const uint8_t *gates, int64_t j0, int64_t j1, int64_t rows, float *out);
void gate_run(const ffn_acts *a, const uint8_t *gates, int64_t rows, float *out);

/* ---- attention (attention.c) ---- */

enum { W_F32 = 0, W_BF16 = 1, W_INT8 = 2 };

/* One position's attention block: what m2c_attn_decode takes (see there). */
typedef struct {
    const void *x, *attn_norm;
    float eps;
    const void *wqkv;
    const float *sqkv;
    const void *wo;
    const float *so;
    int64_t wgroup; /* INT8 rows' values per scale (sqkv, so: a scale per group of a row); 0: one a row */
    int64_t D, H, KV, hd;
    const void *cos, *ssin;
    void *cache;
    int64_t cap, pos;
    const void *ffn_norm;
    int is_bf16;
} attn_args;

/* Scratch attn_block needs at a context of L positions (32-byte aligned by the caller). */
int64_t attn_scratch_bytes(int64_t D, int64_t H, int64_t KV, int64_t hd, int64_t L);

/* y[D] = x + attention (float32, the cache written), hn[D] = rms_norm(y) * ffn_norm where ffn_norm is given. */
void attn_block(const attn_args *g, void *scratch, float *y, float *hn);

/* y[rows] = W · x (kind W_*; INT8 rows with scale[rows][cols / group], group 0: one a row), shared among the
 * pool's threads; scratch: matvec_scratch_bytes(cols) of it (the INT8 activations). */
int64_t matvec_scratch_bytes(int64_t cols);
void matvec(const void *w, const float *scale, int64_t group, int kind, const float *x, int64_t rows, int64_t cols,
            float *y, void *scratch);
/* 1 when an INT8 matrix's group fits rows of cols values (0, or a positive divisor of cols) */
int wgroup_ok(int64_t group, int64_t cols);

/* 1 when INT8/INT4 rows take INT8 activations (the default; m2c_set_int8_activations) */
int m2c_int8_activations(void);
#endif
