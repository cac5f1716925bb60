/*
 * dispatch_int.h: what the files of the protocol state machine share (never
 * included outside them). dispatch.h is its public face.
 *
 *   dispatch.c          errors, waits for durability, room and keys of
 *                       publishes on their way to disk, handshake, the frame
 *                       switch, the loop's side (pass, store events, ticks)
 *   dispatch_admin.c    queue create, delete, purge, stat, list
 *   dispatch_publish.c  publish and batch publish
 *   dispatch_consume.c  subscriptions, flow, delivery, ack, nack, touch,
 *                       release, cancel
 *   dispatch_route.c    route bind, unbind, list; a publish's route
 *                       resolved to its queues
 *   dispatch_job.c      job lookup and listing (read-only)
 *   dispatch_result.c   results and failure notices to a job's reply_to
 */
#ifndef PQ_DISPATCH_INT_H
#define PQ_DISPATCH_INT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "body.h"
#include "conn.h"
#include "frame.h"
#include "journal.h"
#include "queue.h"
#include "units.h"

/* Included after dispatch.h by each file of the module (struct broker);
 * it does not include it back. */
struct broker;

#ifndef PROTOQ_VERSION
#define PROTOQ_VERSION "0.1.0"
#endif

enum {
    DELIVERIES_PER_PASS = 4096, /* per queue per pass, then yield */
};

/* queue.c's name buffers hold the wire's longest name. */
_Static_assert((int)QUEUE_NAME_MAX == (int)PQ_QUEUE_NAME_MAX,
               "queue name limits differ");

/* The longest duration a client may give (delays, TTLs, leases, backoff,
 * windows): ten years. Past it a request is refused, so that no deadline
 * arithmetic can wrap. */
static const uint64_t DURATION_MAX_MS = UNITS_DURATION_MAX_MS;

/* The server a connection belongs to (the argument the server gave its
 * connection set, see server.c). */
static inline struct broker *
broker_of(const struct conn *c)
{
    return c->set->arg;
}

/* One subscription of a connection. */
struct sub {
    struct consumer cons; /* linked into its queue by queue.c */
    struct conn *conn;    /* NULL: held by a session in its gap */
    struct sess *sess;    /* non-NULL: held by this session (the connection
                             that made it went): paused for good */
    struct sub *next;     /* conn->subs, or the session's held list */
    bool flow_paused;     /* Flow{prefetch 0}: no new deliveries */
    /* deliveries waiting behind one whose payload is read back from disk
     * (dispatch_deliver.c) */
    struct outd *out_head, *out_tail;
};

/* WAIT_ACK: push the items (an ack's result and follow-ups, a failure
 * notice), then answer Ok if there is a connection. */
enum wait_kind { WAIT_PUBLISH, WAIT_OK, WAIT_ACK };

/* A reply (and for publishes, the messages) waiting for an LSN to be durable.
 */
struct wait {
    struct wait *next;
    uint64_t lsn;      /* durable when the store reports >= lsn */
    struct conn *conn; /* ref held; NULL: nobody to answer */
    uint64_t request_id;
    enum wait_kind kind;
    uint64_t count; /* WAIT_OK: Ok.count; WAIT_ACK: items[0..count) are
                       the follow-ups (AckOk) */
    uint32_t n;     /* WAIT_PUBLISH: messages */
    struct pending items[];
};

/* ---- room taken by publishes not yet durable ----
 * A message counts against max_length / max_bytes from its check, not
 * from when it becomes visible, so a pipelined burst cannot overshoot. */

struct room {
    uint64_t n;
    uint64_t bytes;
};

/* ---- idempotency keys on their way to disk ----
 * queue_dedup_find sees keys of queued messages only. A key whose publish
 * is still waiting for the disk is registered here, so a second publish
 * with it (pipelined, or in the same batch) gets the first id and waits
 * for the first one's fate instead of storing a second copy. */

struct pend_key {
    char *ckey;   /* "queue\x01key"; the map's key */
    uint64_t id;  /* the first publish's message id */
    uint64_t lsn; /* its LSN once journaled; 0 before */
};

/* Where the journal stood before a change, to confirm it afterwards. */
struct mark {
    uint64_t lsn;
    uint64_t errors;
};

/* dispatch_mark_dirty: q may now deliver; the delivery pass handles it. */
void dispatch_mark_dirty(struct broker *bk, struct queue *q);

/* dispatch_unmark_dirty: q is going away: forget it. */
void dispatch_unmark_dirty(struct broker *bk, struct queue *q);

/* dispatch_reply_err: an Error answering rid, with err mapped to its wire
 * code. */
__attribute__((format(printf, 4, 5))) void
dispatch_reply_err(struct conn *c, uint64_t rid, int err, const char *fmt, ...);

void dispatch_reply_ok(struct conn *c, uint64_t rid, uint64_t count);

/*
 * dispatch_may: c's token allows one of perms (enum auth_perm bits) on
 * queue; always true without an auth table. Answers nothing.
 */
bool dispatch_may(struct conn *c, unsigned perms, const char *queue);

/*
 * dispatch_allow: dispatch_may, else FORBIDDEN answering rid with what
 * (e.g. "queue delete") and the permission needed; the connection stays.
 * False too when c's token was revoked by a reload (c is closed
 * UNAUTHORIZED). Permissions depend on the name only, so a refusal never
 * says whether the queue exists.
 */
bool dispatch_allow(struct conn *c, uint64_t rid, unsigned perms,
                    const char *queue, const char *what);

/* dispatch_room_take: add what items adds to each queue, then check every queue
 * involved; on PQ_EFULL nothing stays taken and *full names the queue. */
int dispatch_room_take(struct broker *bk, struct pending *items, uint32_t n,
                       struct queue **full);

void dispatch_room_give(struct broker *bk, const struct pending *p);

void dispatch_room_forget(struct broker *bk, const struct queue *q);

/* dispatch_pend_key_name: "queue\x01key" into buf (queue names have no \x01).
 */
bool dispatch_pend_key_name(char *buf, size_t cap, const char *queue,
                            const char *key);

void dispatch_pend_key_drop(struct broker *bk, struct pending *p);

void dispatch_pending_fini(struct pending *p);

void dispatch_wait_free(struct broker *bk, struct wait *w);

struct wait *dispatch_wait_new(struct conn *c, uint64_t rid,
                               enum wait_kind kind, uint32_t n);

void dispatch_wait_enqueue(struct broker *bk, struct wait *w, uint64_t lsn);

/* Push the messages of a durable publish and answer PublishOk. */
void dispatch_complete_publish(struct broker *bk, struct wait *w);

/* dispatch_push_pending: put the message of p (durable, or in a transient
 * queue) into its queue; gives back its room. */
void dispatch_push_pending(struct broker *bk, struct pending *p);

/* ---- results and failure notices (dispatch_result.c) ---- */

/* How a job ended, for the message to its producer's reply_to. */
struct outcome {
    const char *status;      /* "ok" or "failed" */
    const char *queue;       /* the queue the job ran in */
    uint32_t attempt;        /* its last attempt */
    const char *reason;      /* failed: max_attempts, nack, expired, ... */
    const char *error;       /* failed: the last error text, or NULL */
    const char *dead_letter; /* failed: the dead-letter queue it went to */
    const uint8_t *result;   /* ok: the Ack's result */
    size_t result_len;
};

/*
 * dispatch_reply_item: fill p with the message that tells m's producer how
 * its job ended. PQ_OK; PQ_ENOTFOUND when there is nobody to tell (no
 * reply_to, or that queue is gone; logged); PQ_ETOOBIG when it would not
 * fit a Deliver; PQ_ENOMEM. p holds nothing unless PQ_OK.
 */
int dispatch_reply_item(struct broker *bk, const struct msg *m,
                        const struct outcome *o, struct pending *p);

/* dispatch_notice: a WAIT_ACK wait without a connection holding m's
 * failure notice, or NULL when there is none to send. */
struct wait *dispatch_notice(struct broker *bk, const struct msg *m,
                             const struct outcome *o);

/* dispatch_qevent_notice: the notice a queue event calls for (a job that
 * was dead-lettered or dropped), or *out = NULL. */
void dispatch_qevent_notice(struct broker *bk, const struct qevent *ev,
                            struct wait **out);

/* dispatch_wait_after: complete w (WAIT_ACK) once what was appended since
 * before is durable, or at the next pass if nothing was. */
void dispatch_wait_after(struct broker *bk, struct wait *w, struct mark before);

/* dispatch_complete_ack: push w's items and answer Ok (w->conn set). */
void dispatch_complete_ack(struct broker *bk, struct wait *w);

/* dispatch_run_later: complete what dispatch_wait_after deferred. */
void dispatch_run_later(struct broker *bk);

/*
 * finish: answer a request whose change was journaled up to lsn (0: nothing
 * journaled, answer now). Waits are FIFO in LSN order; an lsn-0 request
 * that arrives behind a waiting one is answered at once, which is fine:
 * replies are matched by request_id.
 */
void dispatch_finish_ok(struct conn *c, uint64_t rid, uint64_t lsn,
                        uint64_t count);

struct mark dispatch_mark_now(struct broker *bk);

/*
 * dispatch_finish_since: answer a request that changed state through queue
 * events, which journal whatever records they need: Ok once everything appended
 * since the mark is durable (at once if nothing was), or an Error if a
 * record could not be written (never an Ok for what is not on disk).
 */
void dispatch_finish_since(struct conn *c, uint64_t rid, struct mark before);

/* dispatch_find_queue: the queue named name, after checking the name and
 * that c may do one of perms on it (what names the request in errors);
 * NULL when answered with an error. */
struct queue *dispatch_find_queue(struct conn *c, uint64_t rid,
                                  const char *name, unsigned perms,
                                  const char *what);

void dispatch_on_queue_create(struct conn *c, uint64_t rid,
                              const Protoq__QueueCreate *r);

/* Unlink s from its connection's list (it stays allocated). */
void dispatch_sub_unlink(struct sub *s);

void dispatch_on_queue_delete(struct conn *c, uint64_t rid,
                              const Protoq__QueueDelete *r);

void dispatch_on_queue_purge(struct conn *c, uint64_t rid,
                             const Protoq__QueuePurge *r);

void dispatch_on_queue_stat(struct conn *c, uint64_t rid,
                            const Protoq__QueueStat *r);

void dispatch_on_queue_list(struct conn *c, uint64_t rid);

/* A subscription's tags: at most PQ_TAGS_MAX, keys 1..PQ_TAG_BYTES_MAX
 * bytes, values up to PQ_TAG_BYTES_MAX. */
bool dispatch_tags_valid(Protoq__KeyValue **kv, size_t n);

/*
 * dispatch_prepare_one: validate one Publish to the queue called qname
 * (pub->queue, or one of its route's queues) and fill p (body encoded, ids
 * assigned). On failure answers rid with the reason and returns false; p
 * holds nothing then.
 */
bool dispatch_prepare_one(struct conn *c, uint64_t rid,
                          const Protoq__Publish *pub, const char *qname,
                          struct pending *p, uint64_t wall_now);

/*
 * dispatch_publish: the shared path of Publish and PublishBatch. All or
 * nothing: every message is checked before any is journaled.
 */
void dispatch_publish(struct conn *c, uint64_t rid,
                      Protoq__Publish *const *items, size_t n);

void dispatch_on_subscribe(struct conn *c, uint64_t rid,
                           const Protoq__Subscribe *r);

void dispatch_unsubscribe(struct broker *bk, struct sub *s);

void dispatch_on_unsubscribe(struct conn *c, uint64_t rid,
                             const Protoq__Unsubscribe *r);

void dispatch_on_flow(struct conn *c, uint64_t rid, const Protoq__Flow *r);

/* dispatch_deliver: hand out what q can deliver now; true if it stopped early.
 */
bool dispatch_deliver(struct broker *bk, struct queue *q);

/* dispatch_reap_loads: payloads read back from disk: send the deliveries
 * that waited for them. */
void dispatch_reap_loads(struct broker *bk);

/* dispatch_sub_drop_outq: forget s's waiting deliveries (s is going); a
 * read under way goes on, for the message's next delivery to take over. */
void dispatch_sub_drop_outq(struct sub *s);

/* dispatch_drop_loads: free the reads nobody waits for (at close, after
 * every subscription went). */
void dispatch_drop_loads(struct broker *bk);

/* dispatch_sub_release_unsent: give back (released, not failed) the
 * deliveries waiting in s's out-queue, never sent, then drop it. */
void dispatch_sub_release_unsent(struct broker *bk, struct sub *s);

/* dispatch_release_held: give back what s holds without counting a failed
 * attempt (a clean stop). */
void dispatch_release_held(struct broker *bk, struct sub *s);

/* dispatch_send_cancel: CancelRequested for m (in flight) to c. */
void dispatch_send_cancel(struct conn *c, const struct msg *m);

/* ---- sessions and the disconnect grace (dispatch_session.c) ---- */

/* dispatch_session_hello: Hello's session: none, a new one, or one taken
 * over (*resumed). false when c was refused (a bad id, another identity's
 * session, no memory): closed with an Error. */
bool dispatch_session_hello(struct conn *c, uint64_t rid,
                            const Protoq__Hello *h, bool *resumed);

/* dispatch_session_cancels: after the Welcome of a resumed session: a
 * CancelRequested for each held delivery cancelled meanwhile. */
void dispatch_session_cancels(struct conn *c);

/* dispatch_session_closed: c goes: if its session is kept for the grace,
 * move what holds deliveries to it, end the other subscriptions, and
 * return true; false when nothing is kept (the caller ends c's
 * subscriptions, then dispatch_session_end). */
bool dispatch_session_closed(struct broker *bk, struct conn *c);

/* dispatch_session_end: end c's session, if any: its held deliveries fail
 * (released at a clean shutdown). */
void dispatch_session_end(struct broker *bk, struct conn *c);

/* dispatch_session_held / unheld: the held list of a session, and one
 * less on it (for dispatch_sub_unlink). */
struct sub **dispatch_session_held(struct sess *ss);
void dispatch_session_unheld(struct sess *ss);

/* dispatch_session_holder: the name and address to show for the holder
 * of a delivery of s (its session's last connection in the gap). */
void dispatch_session_holder(const struct sub *s, const char **name,
                             const char **peer);

/* dispatch_session_tick: end the sessions whose grace is over. */
void dispatch_session_tick(struct broker *bk);

/* dispatch_session_deadline: when the soonest grace ends (mono ms),
 * UINT64_MAX if none. */
uint64_t dispatch_session_deadline(const struct broker *bk);

/* dispatch_session_housekeeping: free held subscriptions that hold
 * nothing any more, and the disconnected sessions left with none. */
void dispatch_session_housekeeping(struct broker *bk);

/* dispatch_session_close_all: end every session (at close). */
void dispatch_session_close_all(struct broker *bk);

void dispatch_on_ack(struct conn *c, uint64_t rid, const Protoq__Ack *r);

void dispatch_on_nack(struct conn *c, uint64_t rid, const Protoq__Nack *r);

void dispatch_on_touch(struct conn *c, uint64_t rid, const Protoq__Touch *r);

void dispatch_on_release(struct conn *c, uint64_t rid,
                         const Protoq__Release *r);

void dispatch_on_cancel(struct conn *c, uint64_t rid, const Protoq__Cancel *r);

void dispatch_on_route_bind(struct conn *c, uint64_t rid,
                            const Protoq__RouteBind *r);

void dispatch_on_route_unbind(struct conn *c, uint64_t rid,
                              const Protoq__RouteUnbind *r);

void dispatch_on_route_list(struct conn *c, uint64_t rid);

/*
 * dispatch_route_queues: the queues a Publish to a route goes to (names
 * borrowed until the routes change; at most PQ_ROUTE_BINDINGS_MAX) into
 * queues[0..*n). false: answered with the reason (no such route, a bad
 * routing key, no match without allow_unrouted).
 */
bool dispatch_route_queues(struct conn *c, uint64_t rid,
                           const Protoq__Publish *pub, const char **queues,
                           uint32_t *n);

void dispatch_on_job_get(struct conn *c, uint64_t rid, const Protoq__JobGet *r);

void dispatch_on_job_list(struct conn *c, uint64_t rid,
                          const Protoq__JobList *r);

#endif
