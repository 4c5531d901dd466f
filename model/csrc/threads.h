/* The kernels' own threads: a decode layer's products split over the compute cores with a hand-off of
 * microseconds (a Python thread pool's costs ~0.1 ms, as much as a small layer's whole product). */
#ifndef M2C_THREADS_H
#define M2C_THREADS_H
#include <stdint.h>

#define M2C_MAX_THREADS 64
/* A part of a shared product reads at least this many bytes of weights (a hand-off costs microseconds). */
#define M2C_MIN_PART_BYTES (96 << 10)

/* fn(ctx, part, parts) for every part in [0, parts): part 0 on the caller's thread, the rest on the pool's. */
typedef void (*m2c_task)(void *ctx, int part, int parts);

/* Runs the task in min(pool size, max_parts) parts (one where the pool has one thread or is busy with
 * another caller's task); returns, once every part has returned, the number of parts it ran. */
int m2c_run(m2c_task fn, void *ctx, int max_parts);

/* on 1: the caller's runs come back to back until it calls m2c_spin(0); meanwhile the workers and the caller
 * watch for the next task and for the parts' end a while before they sleep (threads.c). Calls nest. */
void m2c_spin(int on);

/* The pool's size now: what a task may be split into. */
int m2c_threads(void);

/* A buffer of at least `bytes` bytes (64-byte aligned) owned by the calling thread, reused from call to call
 * and grown only when a call needs more (its contents are not kept then): the kernels' scratch, so that no
 * call allocates once the first of its size has run. NULL when out of memory. A kernel hands slices of its
 * caller's buffer to the parts it runs on the pool (the caller waits for them all). */
void *m2c_scratch(int64_t bytes);

/* [begin, end) of part `part` of `parts` over n items. */
static inline void m2c_share(int64_t n, int part, int parts, int64_t *begin, int64_t *end) {
    *begin = n * part / parts;
    *end = n * (part + 1) / parts;
}
#endif
