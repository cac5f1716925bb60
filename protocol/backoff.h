/*
 * backoff.h: the one reconnect backoff, shared by libprotoq's opt-in
 * reconnect (client/client.c) and `protoq work` (client/cli_work.c).
 *
 * Exponential with "equal jitter": the n-th delay is drawn uniformly from
 * [d/2, d] where d = min_ms * 2^n capped at max_ms, so many clients that
 * lost the same broker at the same moment do not come back in lockstep,
 * and none waits more than max_ms. The random state lives in the struct
 * (no global state: libprotoq may be used by many handles and threads).
 */
#ifndef PQ_BACKOFF_H
#define PQ_BACKOFF_H

#include <stdint.h>

enum {
    BACKOFF_DEFAULT_MIN_MS = 100,
    BACKOFF_DEFAULT_MAX_MS = 5000,
};

struct backoff {
    uint32_t min_ms, max_ms; /* bounds of d */
    uint32_t cur_ms;         /* d of the next delay */
    uint64_t rng;            /* xorshift64 state, never 0 */
};

/* backoff_init: bounds (0 = the defaults above; max below min is raised to
 * min) and a seed (any value; e.g. pid ^ time). */
void backoff_init(struct backoff *b, uint32_t min_ms, uint32_t max_ms,
                  uint64_t seed);

/* backoff_next: the next delay in ms, then doubles d (up to max_ms). */
uint32_t backoff_next(struct backoff *b);

/* backoff_reset: back to min_ms (after a success). */
void backoff_reset(struct backoff *b);

#endif
