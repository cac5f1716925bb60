/*
 * histo.h: a fixed-bucket histogram of unsigned values (Prometheus style:
 * each bucket counts the values up to its bound and above the previous
 * one; the exporter makes them cumulative). The bounds live with whoever
 * fills it; histo_add takes them so the struct stays a plain counter block
 * that can be copied under a lock.
 */
#ifndef PQ_HISTO_H
#define PQ_HISTO_H

#include <stddef.h>
#include <stdint.h>

enum { HISTO_BUCKETS = 14 };

struct histo {
    uint64_t
        bucket[HISTO_BUCKETS]; /* bucket[i]: bounds[i-1] < v <= bounds[i] */
    uint64_t count;            /* all values, the ones over the last
                                  bound included (+Inf) */
    uint64_t sum;
};

static inline void
histo_add(struct histo *h, const uint64_t bounds[HISTO_BUCKETS], uint64_t v)
{
    for (size_t i = 0; i < HISTO_BUCKETS; i++) {
        if (v <= bounds[i]) {
            h->bucket[i]++;
            break;
        }
    }
    h->count++;
    h->sum += v;
}

/* fsync latency, in ns: 100 us .. 2.5 s. */
static const uint64_t HISTO_FSYNC_NS[HISTO_BUCKETS] = {
    100000,   250000,   500000,    1000000,   2500000,   5000000,    10000000,
    25000000, 50000000, 100000000, 250000000, 500000000, 1000000000, 2500000000,
};

/* messages confirmed by one group commit: 1 .. 8192. */
static const uint64_t HISTO_BATCH_MSGS[HISTO_BUCKETS] = {
    1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192,
};

#endif
