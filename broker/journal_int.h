/*
 * journal_int.h: what the files of the journal share (never included
 * outside them; journal.h is the interface).
 *
 *   journal.c         records written for queue changes, publishes, acks
 *                     and queue events; the payload budget; segment
 *                     references; the definitions rewritten at each
 *                     segment roll; compaction; close and accessors
 *   journal_replay.c  open: the data dir, the store, the replay of the log
 *                     into the queue set, the live-message check
 */
#ifndef PQ_JOURNAL_INT_H
#define PQ_JOURNAL_INT_H

#include "journal.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "hmap.h"
#include "queue.h"
#include "record.h"

struct store;

struct journal {
    struct store *st;
    uint8_t *buf; /* scratch for encoding one record */
    size_t cap;
    uint64_t max_id;       /* replay: largest message id seen */
    uint64_t next_id;      /* first id a new message may take */
    uint64_t replayed;     /* replay: records applied */
    uint64_t mono_at_open; /* replay: clocks read once */
    uint64_t wall_at_open;
    uint64_t resident;      /* payload bytes of durable messages in memory */
    uint64_t budget;        /* cfg.payload_budget_bytes */
    uint64_t evicted;       /* messages stored without their body in memory */
    uint64_t unwritten;     /* state records lost since the last warning */
    uint64_t append_errors; /* appends that failed, ever */
    int last_error;         /* the latest one's PQ_* code */
    uint64_t unwritten_logged_ms;   /* mono time of that warning */
    struct qset *qs;                /* the queues it journals (borrowed) */
    struct routes *routes;          /* cfg->routes (borrowed), or NULL */
    struct hmap_u64 suspects;       /* replay: id -> struct suspect, live by a
                                       state record but no PUBLISH seen yet */
    uint64_t last_bulk;             /* replay: j->replayed at the latest
                                       QUEUE_DELETE or QUEUE_PURGE */
    uint64_t now_mono_ms;           /* "now" of the call being served */
    struct rec_deliver_item *deliv; /* deliveries not appended yet: one
                                       REC_DELIVER per loop pass */
    uint32_t n_deliv, cap_deliv;
    uint64_t deliv_unwritten;             /* DELIVER records lost since the last
                                             warning */
    uint64_t deliv_logged_ms;             /* mono time of that warning */
    struct hmap_u64 delivered;            /* replay: id -> its latest delivery
                                             since its latest state record, packed
                                             (deliver_pack) */
    uint32_t delivered_seq;               /* replay: deliveries seen so far,
                                             their order in the log */
    struct rec_deliver_item *interrupted; /* replay's result: deliveries
                                             the log shows running at the
                                             stop, for journal_resume */
    uint32_t n_interrupted;
};

/* journal_durable: q exists and is not transient (its changes are logged). */
bool journal_durable(const struct queue *q);

/* journal_on_roll: the store's roll callback (arg is the journal): writes
 * every durable queue's definition and bindings into the new segment. */
void journal_on_roll(void *arg, uint32_t new_seg);

/* journal_forget_body: m (durable) leaves memory: give its budget back. */
void journal_forget_body(struct journal *j, const struct msg *m);

/* journal_ref_msg: take m's references on the segments of its PUBLISH and
 * state records. */
void journal_ref_msg(struct journal *j, struct msg *m);

/* journal_budget_allows: may a message of size bytes, on disk if pub_len >
 * 0, keep its body? Counts it as evicted when not. */
bool journal_budget_allows(struct journal *j, uint32_t size, uint32_t pub_len);

#endif
