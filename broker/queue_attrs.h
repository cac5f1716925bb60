/*
 * queue_attrs.h: a queue's attributes, one struct for every place that
 * holds them: the queue set (queue.h), the log (record.h encodes and
 * decodes this struct itself) and dispatch_admin.c, which alone converts
 * them to and from the wire's QueueAttrs. No dependencies, so that both
 * queue/ and the record codec can use it without using each other.
 */
#ifndef PQ_QUEUE_ATTRS_H
#define PQ_QUEUE_ATTRS_H

#include <stdbool.h>
#include <stdint.h>

#include "pqlimits.h"

enum { QUEUE_NAME_MAX = PQ_QUEUE_NAME_MAX };

/* Queue attributes. 0 (or "") means "use the default" for the fields that
 * queue_defaults covers; 0 means "unlimited"/"none" for the others. */
struct queue_attrs {
    bool transient;          /* not logged (dispatcher's concern) */
    uint64_t max_length;     /* ready+delayed+inflight cap; 0 = none */
    uint64_t max_bytes;      /* payload bytes cap; 0 = none */
    uint64_t ack_timeout_ms; /* lease per delivery/touch */
    uint32_t max_attempts;   /* failures before dead-letter */
    char dead_letter[QUEUE_NAME_MAX + 1]; /* "" = none */
    uint64_t backoff_base_ms;
    uint64_t backoff_cap_ms;
    uint64_t ttl_ms; /* default message TTL; 0 = none */
    uint64_t
        dedup_window_ms;   /* idempotency key retention after the msg is gone */
    uint64_t max_lease_ms; /* cap on one touch extension; 0 = none */
    bool dead_letter_expired; /* expired messages go to dead_letter too */
    /* Retry at once: backoff_* resolve to 0. Not logged: a record holds
     * resolved attributes, and both backoffs 0 means exactly this. */
    bool no_backoff;
};

#endif
