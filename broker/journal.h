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

#include "queue.h"

struct server;
struct pend_key;

/* One message of a publish, from its check until it is durable and queued
 * (dispatch.c fills it, journal.c writes it). */
struct pending {
    struct queue *q;              /* NULL once the queue was deleted */
    struct msg_new mn;            /* body ref owned here until pushed */
    char *idem_key;               /* owned */
    struct kv *requires;          /* owned array and strings */
    bool duplicate;               /* idempotency hit: nothing to store */
    struct pend_key *pkey;        /* its key, registered until it settles */
    uint64_t dup_lsn;             /* duplicate of a publish not yet durable:
                                     answer no earlier than this LSN */
    bool seg_held;                /* journal_publish holds mn.pub_seg until
                                     journal_publish_settled */
};

/* journal_open: open the store in cfg.data_dir and rebuild every queue from
 * it; sets srv->store, srv->store_fd and srv->next_msg_id. */
int journal_open(struct server *srv, char *err, size_t errlen);

/* journal_close: final flush and fsync; frees the journal. */
void journal_close(struct server *srv);

/* Each appends one change and sets *lsn to the LSN to wait for. */
int journal_queue_create(struct server *srv, struct queue *q, uint64_t *lsn);
int journal_queue_delete(struct server *srv, struct queue *q, uint64_t *lsn);
int journal_queue_purge(struct server *srv, struct queue *q, uint64_t *lsn);

/* journal_publish: PUBLISH records for the durable, non-duplicate items,
 * all or none (space is checked first); sets each item's pub_seg. */
int journal_publish(struct server *srv, struct pending *items, uint32_t n,
                    uint64_t *lsn);

/* journal_publish_settled: the publish of p is over (its message stored,
 * pinned or given up): drop the hold journal_publish took on the segment
 * of its record. Until then that segment is not deleted, even when its
 * own write completed before the rest of a batch that continued in the
 * next segment. Safe after journal_close (does nothing). */
void journal_publish_settled(struct server *srv, struct pending *p);

/* journal_keep_body: whether a durable message about to be pushed (mn)
 * may keep its body in memory under the payload budget; false counts it
 * as evicted (the caller pushes it with body NULL). */
bool journal_keep_body(struct server *srv, const struct msg_new *mn);

/* journal_msg_stored: the durable message mn entered its queue (with
 * mn->body as pushed): ref its segments, count a kept body. */
void journal_msg_stored(struct server *srv, const struct msg_new *mn);

/* journal_pin: keep mn's segment for the life of the process (a durable
 * message that could not be queued; a restart brings it back). */
void journal_pin(struct server *srv, const struct msg_new *mn);

/* journal_ack: m was acked: ACK record, segment refs dropped. */
int journal_ack(struct server *srv, struct msg *m, uint64_t *lsn);

/* journal_cancel: m (in flight) was cancelled: record it now, so a crash
 * before its holder answers cannot bring it back. Its references go when
 * the queue drops it (QEV_DROP, which then writes no second record). */
int journal_cancel(struct server *srv, struct msg *m);

/* journal_qevent: the record a queue event needs (requeue, dead-letter,
 * drop, progress), if m's queue is durable. */
void journal_qevent(struct server *srv, const struct qevent *ev);

/* journal_errors: how many appends have failed so far (*last: the latest
 * one's PQ_* code); a confirm compares it before and after a change. */
uint64_t journal_errors(struct server *srv, int *last);

/* journal_urgent: a reply waits on what was appended so far. */
void journal_urgent(struct server *srv);

/* journal_last_lsn: LSN of the last record appended (0: none). */
uint64_t journal_last_lsn(struct server *srv);

/* journal_load_body: m's body read back from its PUBLISH record (for a
 * message whose payload is not in memory). A new reference, or NULL. */
struct body *journal_load_body(struct server *srv, struct msg *m);

/* journal_submit: hand the pending records to the storage thread;
 * journal_reap: report completed batches (see store_reap). */
void journal_submit(struct server *srv);
void journal_reap(struct server *srv,
                  void (*done)(void *arg, uint64_t upto_lsn, int status),
                  void *arg);

/* journal_compact: move live messages out of the oldest segment when the
 * store says it is worth it; bounded work per call. */
void journal_compact(struct server *srv);

#endif
