/*
 * journal.h: what dispatch.c writes to the log and how the log is read
 * back. Turns queue changes into records (record.h) appended to the store,
 * keeps each live message's segment references (so the store can delete
 * and compact segments), writes queue metadata at the start of every
 * segment, and on start replays the log into the queue set. Only durable
 * queues are journaled; callers skip transient ones.
 */
#ifndef PQ_JOURNAL_H
#define PQ_JOURNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "config.h"
#include "queue.h"

struct journal;
struct pend_key;
struct routes;
struct store_stats;

/* One message of a publish, from its check until it is durable and queued
 * (dispatch.c fills it, journal.c writes it). */
struct pending {
    struct queue *q;       /* NULL once the queue was deleted */
    struct msg_new mn;     /* body ref owned here until pushed */
    char *idem_key;        /* owned */
    struct kv *requires;   /* owned array and strings */
    bool duplicate;        /* idempotency hit: nothing to store */
    struct pend_key *pkey; /* its key, registered until it settles */
    uint64_t dup_lsn;      /* duplicate of a publish not yet durable:
                              answer no earlier than this LSN */
    bool seg_held;         /* journal_publish holds mn.pub_seg until
                              journal_publish_settled */
    bool no_room;          /* a result or failure notice: stored even past
                              its queue's max_length / max_bytes */
};

/* What the journal needs from the config. */
struct journal_config {
    const char *data_dir;
    enum fsync_policy fsync;
    uint32_t fsync_interval_ms;
    uint64_t segment_bytes;
    uint64_t payload_budget_bytes;
    struct routes *routes; /* replayed into and rewritten at each segment
                              (borrowed for the journal's life); NULL:
                              route records are skipped */
};

/*
 * journal_open: open the store in cfg->data_dir (created with its parents
 * if missing) and replay the log into qs, which the journal borrows for
 * its life. On success *out is the journal; on failure a PQ_* code with a
 * message naming what failed in err, and nothing is left open.
 */
int journal_open(const struct journal_config *cfg, struct qset *qs,
                 struct journal **out, char *err, size_t errlen);

/* journal_close: final flush and fsync; frees j (NULL: no-op). */
void journal_close(struct journal *j);

/* journal_next_id: the first message id not in the log (and past the wall
 * clock, so ids never repeat even after the log was emptied). */
uint64_t journal_next_id(const struct journal *j);

/* journal_event_fd: readable when the storage thread finished a batch. */
int journal_event_fd(const struct journal *j);

/* journal_resident_bytes: payload bytes of durable messages kept in
 * memory (against payload_budget_bytes). */
uint64_t journal_resident_bytes(const struct journal *j);

/* journal_store_stats: the store's counters. */
void journal_store_stats(struct journal *j, struct store_stats *out);

/* Each appends one change and sets *lsn to the LSN to wait for. */
int journal_queue_create(struct journal *j, struct queue *q, uint64_t *lsn);
int journal_queue_delete(struct journal *j, struct queue *q, uint64_t *lsn);
int journal_queue_purge(struct journal *j, struct queue *q, uint64_t *lsn);

/* journal_route: a ROUTE_BIND (bind) or ROUTE_UNBIND record. */
int journal_route(struct journal *j, bool bind, const char *route,
                  const char *queue, const char *pattern, uint64_t *lsn);

/* journal_publish: the durable, non-duplicate items in one record (PUBLISH
 * for one, PUBLISH_BATCH for several), so all or none of them survive a
 * crash (space is checked first); sets each item's pub_*. */
int journal_publish(struct journal *j, struct pending *items, uint32_t n,
                    uint64_t now_mono_ms, uint64_t *lsn);

/* journal_publish_settled: the publish of p is over (its message stored,
 * pinned or given up): drop the hold journal_publish took on the segment
 * of its record. Until then that segment is not deleted, even when its
 * own write completed before the rest of a batch that continued in the
 * next segment. j NULL (the journal is closed): does nothing. */
void journal_publish_settled(struct journal *j, struct pending *p);

/* journal_keep_body: whether a durable message about to be pushed (mn)
 * may keep its body in memory under the payload budget; false counts it
 * as evicted (the caller pushes it with body NULL). */
bool journal_keep_body(struct journal *j, const struct msg_new *mn);

/* journal_msg_stored: the durable message mn entered its queue (with
 * mn->body as pushed): ref its segments, count a kept body. */
void journal_msg_stored(struct journal *j, const struct msg_new *mn);

/* journal_pin: keep mn's segment for the life of the process (a durable
 * message that could not be queued; a restart brings it back). */
void journal_pin(struct journal *j, const struct msg_new *mn);

/* journal_publish_check: whether the store has room for the records of
 * items (PQ_OK, or PQ_ENOSPC and the like); nothing is appended. */
int journal_publish_check(struct journal *j, const struct pending *items,
                          uint32_t n);

/*
 * The end of a job and the messages it causes (pubs[n]: an ack's result
 * and follow-ups, a failure notice; n may be 0) are ONE record: the end
 * record alone when no item of pubs needs one, else a REC_ATOMIC. Items
 * that need a record get their location and a segment hold, as from
 * journal_publish; the caller pushes them once the LSN is durable and
 * settles them (journal_publish_settled). A job in a transient queue has
 * no end record: its items go as plain PUBLISH records.
 */

/* journal_ack: m was acked: ACK (with pubs), segment refs dropped. */
int journal_ack(struct journal *j, struct msg *m, struct pending *pubs,
                uint32_t n, uint64_t *lsn);

/* journal_cancel: m (in flight) was cancelled: record it now (with pubs),
 * so a crash before its holder answers cannot bring it back. Its
 * references go when the queue drops it (QEV_DROP, which then writes no
 * second record). */
int journal_cancel(struct journal *j, struct msg *m, struct pending *pubs,
                   uint32_t n);

/* journal_qevent: the record a queue event needs (requeue, dead-letter,
 * drop with pubs, progress), if m's queue is durable. PQ_OK, or why a
 * record was not written (logged here). */
int journal_qevent(struct journal *j, const struct qevent *ev,
                   uint64_t now_mono_ms, struct pending *pubs, uint32_t n);

/* journal_errors: how many appends have failed so far (*last: the latest
 * one's PQ_* code); a confirm compares it before and after a change. */
uint64_t journal_errors(struct journal *j, int *last);

/* journal_urgent: a reply waits on what was appended so far. */
void journal_urgent(struct journal *j);

/* journal_last_lsn: LSN of the last record appended (0: none). */
uint64_t journal_last_lsn(struct journal *j);

/* journal_load_body: m's body read back from its PUBLISH record (for a
 * message whose payload is not in memory). A new reference, or NULL. */
struct body *journal_load_body(struct journal *j, struct msg *m);

/*
 * journal_load_start: read m's body back off the loop thread (for a
 * delivery of a message whose body is not in memory). The result comes to
 * journal_reap_loads's fn with m's id: a new reference to the body, or
 * NULL when its record could not be read back (logged). PQ_OK, or an error
 * (then nothing comes).
 */
int journal_load_start(struct journal *j, const struct msg *m);
typedef void (*journal_loaded_fn)(void *arg, uint64_t id, struct body *b);
/* journal_reap_loads: hand the finished loads to fn, in the order they
 * were started; call it when journal_event_fd is readable. */
void journal_reap_loads(struct journal *j, journal_loaded_fn fn, void *arg);

/*
 * journal_delivered: m (in flight, attempt m->attempt) was just handed to
 * a consumer. If its queue is durable the delivery goes into the REC_DELIVER
 * of this loop pass (appended before any other record, or by
 * journal_submit). Nothing waits for it: it reaches the disk with the next
 * batch, and a crash before that forgets the delivery (the job then comes
 * back with its attempt as before, as without this record).
 */
void journal_delivered(struct journal *j, const struct msg *m);

/*
 * journal_resume: call once after journal_open, with the queue listener
 * set: each delivery the log shows still running when the broker stopped
 * (a kill -9, a crash, a power loss) is a failed attempt now, as if its
 * consumer was lost: attempt as delivered, failures + 1, then requeued
 * after the backoff or dead-lettered at max_attempts (their records are
 * written through the listener). Returns how many there were.
 */
uint32_t journal_resume(struct journal *j, uint64_t now_mono_ms);

/* journal_submit: hand the pending records to the storage thread;
 * journal_reap: report completed batches (see store_reap). */
void journal_submit(struct journal *j);
void journal_reap(struct journal *j,
                  void (*done)(void *arg, uint64_t upto_lsn, int status),
                  void *arg);

/* journal_compact: move live messages out of the oldest segment when the
 * store says it is worth it; bounded work per call. */
void journal_compact(struct journal *j, uint64_t now_mono_ms);

#endif
