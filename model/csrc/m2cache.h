/* m2cache's native kernels: every function the Python side (m2cache.model.cpu_kernels) calls, and nothing
 * else. Built into one shared library with the system C compiler on first use; tests/test_cpu_kernels.py checks
 * that the ctypes declarations there match these. Pointers are to contiguous arrays; every shape and index is
 * checked here before any read (-1: a shape it does not take, -2: out of memory, -3: an index out of range).
 */
#ifndef M2CACHE_H
#define M2CACHE_H
#include <stdint.h>

/* The kernels' threads (threads.c): each product shared among n threads, the caller's and n - 1 of a pool. */
int m2c_set_threads(int n);
int m2c_threads(void);
/* on 1 until a matching 0: the caller's products come back to back (the pool's threads watch for them instead of
 * sleeping between them; m2c_decode does this for its call). */
void m2c_spin(int on);
/* how long a thread watches before it sleeps, in ns (0: never; default 0.2 ms); returns the setting before */
int64_t m2c_set_spin_ns(int64_t ns);

/* 1 (the default): INT8 and INT4 weights meet activations quantised to INT8 in blocks of 32, integer dot
 * products (simd.h); 0: float32 activations. Returns the setting before. */
int m2c_set_int8_activations(int on);
int m2c_int8_activations(void);
/* 1 where rows of `kind` (1 INT8, 2 INT4) of D values in groups of `group` add their down columns in blocks of
 * rows in integers (block_down.h: AVX2, INT8 activations on, shapes its loops take) */
int m2c_block_down(int kind, int64_t D, int64_t group);

/* out[T][D] += the FFN of pool rows slots[0..n) (one precision; sparse_ffn.c), parts 3 (gate, up, down) or 2
 * (up, down; gact[n][T] the gate activations). */
int m2c_ffn_fp16(const uint8_t *pool, int64_t pool_rows, int64_t bundle_bytes, const int64_t *slots, int64_t n,
                 const float *h, int64_t T, int64_t D, int act, int64_t parts, const float *gact, float *out);
int m2c_ffn_int8(const uint8_t *pool, int64_t pool_rows, int64_t bundle_bytes, const int64_t *slots, int64_t n,
                 const float *h, int64_t T, int64_t D, int64_t group, int act, int64_t parts, const float *gact,
                 float *out);
int m2c_ffn_int4(const uint8_t *pool, int64_t pool_rows, int64_t bundle_bytes, const int64_t *slots, int64_t n,
                 const float *h, int64_t T, int64_t D, int64_t group, int act, int64_t parts, const float *gact,
                 float *out);

/* The same over up to three groups of rows at once (FP16 0, INT8 1, INT4 2 in kinds[i]), shared among the
 * threads by bytes across the groups: the engine's FFN of a layer, in one call. */
int m2c_ffn_groups(int ngroups, const int *kinds, const uint8_t *const *pools, const int64_t *pool_rows,
                   const int64_t *bundle_bytes, const int64_t *const *slots, const int64_t *n,
                   const float *const *gact, const float *h, int64_t T, int64_t D, int64_t g8, int64_t g4, int act,
                   int64_t parts, float *out);

/* out[T][rows] = act(gate . h) of every row of a packed INT4 gate copy. */
int m2c_gate_int4(const uint8_t *gates, int64_t rows, const float *h, int64_t T, int64_t D, int64_t group, int act,
                  float *out);

/* pool[dst[i]] = src[rows[i]] (rows NULL: src[i]), rows of width bytes. */
int m2c_copy_rows(uint8_t *pool, int64_t pool_rows, const int64_t *dst, const uint8_t *src, int64_t src_rows,
                  const int64_t *rows, int64_t n, int64_t width);

/* A sum of the bytes of rows[0..n) (NULL: 0..n) of width bytes, read as the kernels share rows: the plain
 * read a kernel's bandwidth is measured against (tools/kernel_bench.py). */
uint64_t m2c_read_rows(const uint8_t *base, const int64_t *rows, int64_t n, int64_t width);

/* One decode position's attention block (attention.c). INT8 wqkv/wo (sqkv/so given): a float32 scale per wgroup
 * values of a row ([rows][cols / wgroup]), or per row (wgroup 0). */
int m2c_attn_decode(const void *x, const void *attn_norm, float eps, const void *wqkv, const float *sqkv,
                    const void *wo, const float *so, int64_t wgroup, int64_t D, int64_t H, int64_t KV, int64_t hd,
                    const void *cos, const void *ssin, void *cache, int64_t cap, int64_t pos,
                    const void *ffn_norm, void *x_out, void *h_out, int is_bf16);

/* y[rows] = W · (rms_norm(x) * norm), or W · x without a norm: the LM head of one row. INT8 W (scale given): a
 * float32 scale per `group` values of a row, or per row (group 0). */
int m2c_matvec(const void *x, const void *norm, float eps, const void *w, const float *scale, int64_t group,
               int64_t rows, int64_t cols, int is_bf16, float *y);

/* A decode token of one sequence with every weight in memory (decode.c): the layers' tables and the model's. */
typedef struct {
    const void *attn_norm, *wqkv, *wo, *ffn_norm; /* compute dtype; wqkv/wo INT8 rows where sqkv/so are given */
    const float *sqkv, *so;
    int64_t wgroup;        /* INT8 wqkv/wo: values per scale along a row (0: one scale a row) */
    const uint8_t *gates;  /* the gate policy's packed INT4 copy of the layer's gate rows [F][D/2 + 4 D/g4] */
    const float *norms;    /* ||up_j||·||down_j|| [F]: a neuron's score is |act(gate_j · h)| * norms[j] */
    const uint8_t *ffn[3]; /* the layer's every neuron at FP16, INT8, INT4 (row j: neuron j); NULL where unused */
    int64_t counts[3];     /* neurons kept at each precision: the best counts[0] at FP16, and so on */
} m2c_layer;

typedef struct {
    int64_t D, H, KV, hd, F, g8, g4, parts, vocab;
    int64_t bundle_bytes[3];
    float eps;
    int act, is_bf16;
    const void *final_norm, *head; /* the LM head, compute dtype or INT8 rows with head_scale */
    const float *head_scale;
    int64_t head_group; /* INT8 head: values per scale along a row (0: one scale a row) */
} m2c_model;

/* x [D] (compute dtype): in, the token's embedding; out, the last layer's residual. cache: the sequence's KV
 * cache [layers][2][KV][cap][hd], written at pos; cos/ssin [hd] this position's RoPE tables. logits [vocab]
 * float32 (NULL: no LM head). times (NULL: none): per layer 4 CLOCK_MONOTONIC ns stamps (start, attention
 * done, neurons chosen, FFN done), then 2 for the LM head. */
int m2c_decode(const m2c_model *m, const m2c_layer *layers, int64_t n_layers, void *x, void *cache, int64_t cap,
               int64_t pos, const void *cos, const void *ssin, float *logits, int64_t *times);
#endif
