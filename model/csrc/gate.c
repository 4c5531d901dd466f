/* The gate policy's scores: act(gate . h) of every row of a resident INT4 copy of the layer's gate rows
 * (m2c_gate_int4, and gate_run for the native decode step), the rows shared among the pool's threads. */
#include "kernels.h"
#include "m2cache.h"
#include "threads.h"

typedef struct {
    const ffn_acts *a;
    const uint8_t *gates;
    int64_t rows;
    float *out;
} gate_task;

#ifndef GATE_AHEAD
#define GATE_AHEAD 4
#endif

void gate_rows(const ffn_acts *a, const uint8_t *gates, int64_t j0, int64_t j1, int64_t rows, float *out) {
    const int64_t D = a->D, ng = D / a->g4, width = D / 2 + 4 * ng;
    for (int64_t j = j0; j < j1; j++) {
        const uint8_t *row = gates + j * width;
        const f16 *meta = (const f16 *)(row + D / 2);
        if (j + GATE_AHEAD < j1) /* the rows are contiguous, but the hardware's prefetchers alone leave a core at ~half
                                  * its bandwidth here: each row's lines asked for GATE_AHEAD rows before its use */
            for (int64_t off = 0; off < width; off += 64) __builtin_prefetch(row + GATE_AHEAD * width + off, 0, 3);
        for (int64_t t = 0; t < a->T; t++) out[t * rows + j] = i4_dot(a, row, meta, t);
    }
    for (int64_t t = 0; t < a->T; t++) activate_all(out + t * rows + j0, j1 - j0, a->act);
}

static void gate_part(void *ctx, int part, int parts) {
    const gate_task *k = ctx;
    int64_t j0, j1;
    m2c_share(k->rows, part, parts, &j0, &j1);
    gate_rows(k->a, k->gates, j0, j1, k->rows, k->out);
}

void gate_run(const ffn_acts *a, const uint8_t *gates, int64_t rows, float *out) {
    const int64_t width = a->D / 2 + 4 * (a->D / a->g4);
    gate_task k = {a, gates, rows, out};
    m2c_run(gate_part, &k, (int)(rows * width * a->T / M2C_MIN_PART_BYTES));
}

/* act(gate . h) of every row of a resident INT4 copy of the gate rows, for each of T tokens: the gate
 * policy's score, computed without dequantising the copy. A row is the gate part of an INT4 bundle:
 * [D/2] bytes of nibbles, then [D/group] (scale, min) float16 pairs. out: float32 [T][rows]; the
 * rows shared among the kernels' threads, each computed whole by one. */
int m2c_gate_int4(const uint8_t *gates, int64_t rows, const float *h, int64_t T, int64_t D, int64_t group,
                  int act, float *out) {
    if (T < 0 || T > MAX_T || D <= 0 || group <= 0 || D % group || group % 2) return -1;
    if (T == 0) return 0;
    uint8_t *scratch = m2c_scratch(ffn_scratch_bytes(T, D, group, 0));
    if (!scratch) return -2;
    ffn_acts a;
    ffn_prepare(&a, h, T, D, group, group, 1, act, scratch);
    gate_run(&a, gates, rows, out);
    return 0;
}

