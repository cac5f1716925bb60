/*
 * dispatch.h: the protocol state machine. One handler per request kind;
 * the only module that calls both queue.c and store.c, and it decides the
 * order: append the record, change the queue, answer once it is durable.
 * It also owns subscriptions (struct sub), the waits for durability, and
 * the delivery pass. Maps internal PQ_* codes to wire error codes.
 */
#ifndef PQ_DISPATCH_H
#define PQ_DISPATCH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "histo.h"
#include "hmap.h"
#include "protoq.pb-c.h"

struct auth_table;
struct config;
struct conn;
struct journal;
struct qset;
struct queue;
struct wait;

struct broker_stats {
    uint64_t batches_durable; /* store batches reported durable */
    uint64_t disk_full_refusals;
    struct histo commit_msgs;  /* messages confirmed per durable batch
                                  that confirmed any (HISTO_BATCH_MSGS) */
    uint64_t auth_failures;    /* Hellos refused UNAUTHORIZED */
    uint64_t sessions_resumed; /* Hellos that took a kept session over */
    uint64_t sessions_expired; /* disconnect graces that ran out */
};

struct routes;

/*
 * The broker: the queues, the log, and every piece of state the protocol
 * needs between frames. The server embeds it, fills the first block before
 * dispatch_open and reads exit_code and the counters; everything else is
 * dispatch.c's own.
 */
struct broker {
    /* Set by the owner (the server). */
    const struct config *cfg;      /* borrowed; limits are read at each use,
                                      so a SIGHUP reload applies at once */
    const uint64_t *now_mono_ms;   /* the loop's clock, read once per pass */
    void (*stop)(void *owner);     /* a fatal storage error: end the loop */
    void *owner;                   /* stop's argument */
    uint16_t port;                 /* names the broker in Welcome */
    bool shutting_down;            /* a clean stop: held jobs are released */
    const struct auth_table *auth; /* tokens (auth_file); NULL = none, every
                                      client may do anything */
    uint64_t auth_gen;             /* bumped when auth is replaced */

    /* Owned here. */
    int exit_code; /* 0, or EX_IOERR after a fatal store error */
    struct qset *qs;
    struct routes *routes;   /* route bindings (route.h) */
    struct journal *journal; /* the log, NULL until opened */
    int store_fd;            /* the log's eventfd; -1 without one */
    uint64_t next_msg_id;    /* never reused */
    uint64_t next_sub_id;
    struct wait *waits_head; /* FIFO of replies waiting for durability */
    struct wait *waits_tail;
    struct wait *later_head; /* results and notices with nothing to wait */
    struct wait *later_tail; /* for: pushed at the next pass */
    struct queue **dirty;    /* queues that may be able to deliver */
    uint32_t ndirty, dirty_cap;
    struct hmap_u64 dirty_set; /* membership of dirty, keyed by pointer */
    struct hmap_u64
        pending_room; /* queue -> room taken by unconfirmed publishes */
    struct hmap_str pending_keys; /* "queue\x01key" -> idempotency keys whose
                                     publish is not durable yet */
    struct hmap_u64 loading;      /* message id -> the delivery waiting for its
                                     payload to be read back */
    struct hmap_str sessions;     /* Hello.session_id -> struct sess, owned
                                     (dispatch_session.c) */
    struct sess *gap_head;        /* disconnected sessions in their grace, */
    struct sess *gap_tail;        /* soonest end first */
    uint32_t ngap;
    struct broker_stats stats;
};

/* dispatch_frame: handle one decoded frame from c (which owns nothing of f). */
void dispatch_frame(void *broker, struct conn *c, const Protoq__Frame *f);

/* dispatch_conn_closed: c stops: drop its subscriptions (their deliveries
 * are failed attempts and go back to their queues). Idempotent. */
void dispatch_conn_closed(void *broker, struct conn *c);

/* dispatch_auth_recheck: the token table was replaced: close c
 * (UNAUTHORIZED, request_id 0) if the token it authenticated with is gone
 * or changed, so a revoked consumer stops getting deliveries at once. */
void dispatch_auth_recheck(struct broker *b, struct conn *c);

/* dispatch_conn_output: c's output went over (full) or back under the
 * high-water mark: pause or resume deliveries to its consumers. */
void dispatch_conn_output(void *broker, struct conn *c, bool full);

/* dispatch_open: create the queue set, open the store and replay the log
 * into it (recover.c). Writes a message into err on failure. */
int dispatch_open(struct broker *b, char *err, size_t errlen);

/* dispatch_pass: the post-loop work of one pass: deliver to consumers of
 * dirty queues, hand the pending batch to the storage thread, answer what
 * became durable. Returns true when work is left for another pass. */
bool dispatch_pass(struct broker *b);

/* dispatch_store_event: the store's eventfd fired: answer what became
 * durable (or refuse what could not be stored). */
void dispatch_store_event(struct broker *b);

/* dispatch_tick: the deadline timer fired: expire leases, wake delays. */
void dispatch_tick(struct broker *b);

/* dispatch_next_deadline: the earliest of the queues' deadlines and the
 * end of a session's disconnect grace (mono ms), UINT64_MAX if none. */
uint64_t dispatch_next_deadline(const struct broker *b);

/* dispatch_housekeeping: once a second: compact the log if worth it. */
void dispatch_housekeeping(struct broker *b);

/* dispatch_close: flush the store and free the queue set and waits. */
void dispatch_close(struct broker *b);

#endif
