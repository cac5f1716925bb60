/*
 * clock.h: the one home of the clocks, for the broker, libprotoq, the CLI
 * and the tests. Monotonic time for timeouts, leases and deadlines; wall
 * time only for what is stored or shown (published_at, deliver_at on disk).
 */
#ifndef PQ_CLOCK_H
#define PQ_CLOCK_H

#include <stdint.h>
#include <time.h>

/* clock_mono_ms / clock_mono_ns: CLOCK_MONOTONIC. */
static inline uint64_t
clock_mono_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline uint64_t
clock_mono_ms(void)
{
    return clock_mono_ns() / 1000000u;
}

/* clock_wall_ms: CLOCK_REALTIME, Unix milliseconds. */
static inline uint64_t
clock_wall_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

#endif
