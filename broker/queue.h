/*
 * queue.h: named queues and the messages in them: ready lists per priority,
 * delayed and in-flight messages, consumers with credit, retry/backoff and
 * dead-letter decisions, TTL, idempotency keys, cancel. Pure in-memory state:
 * no I/O, no clock (time is a now_ms parameter, CLOCK_MONOTONIC ms, except
 * fields named *_wall_ms), no libevent. dispatch.c is the only caller; it
 * logs every change (see the table below) and does the I/O.
 *
 * ---- Message states and transitions ----
 *
 *   (absent) --queue_push----------------------> READY | DELAYED     [return]
 *   DELAYED  --qset_tick, due reached-----------> READY               QEV_READY
 *   READY    --queue_next_delivery--------------> INFLIGHT            [return]
 *   INFLIGHT --qset_ack-------------------------> (absent)            [return]
 *   INFLIGHT --qset_touch-----------------------> INFLIGHT, new lease QEV_TOUCH
 *   INFLIGHT --qset_nack / lease expiry /
 *              queue_unsubscribe / qset_release-> READY | DELAYED QEV_REQUEUE
 *   INFLIGHT --same, failures reach max_attempts
 *              or nack with dead_letter---------> READY in the DLQ
 * QEV_DEAD_LETTER (no / missing / full DLQ: absent)  QEV_DROP READY|DELAYED
 * --TTL passed (tick or delivery)-> DLQ if the queue has dead_letter_expired
 * and a dead_letter             QEV_DEAD_LETTER else (absent) QEV_DROP
 * "expired" READY|DELAYED --qset_cancel-----------------> (absent) QEV_DROP
 * "cancelled" INFLIGHT --qset_cancel----------------------> INFLIGHT+cancelled
 * [return] INFLIGHT+cancelled --ack/nack/release/lease expiry/unsubscribe
 *                                             -> (absent)          QEV_DROP
 * "cancelled" (ack/nack/release then return PQ_ESTALE: the ack is fenced)
 *   READY|DELAYED --queue_purge-----------------> (absent)            [return:
 * count] any      --qset_delete (queue removed)------> (absent) [direct call]
 *
 * [return] means no event: the caller learns it from the call it made.
 * Every other change fires exactly one of QEV_REQUEUE, QEV_DEAD_LETTER,
 * QEV_DROP, QEV_TOUCH for the message. QEV_READY is only a wake-up hint for
 * delivery (not a log record); it may repeat, and the caller coalesces it.
 * Events fire synchronously, before anything is freed. A listener may read
 * queue/msg state but must not call any function that changes the qset.
 *
 * Ordering: FIFO within a priority level, higher priority first. A message
 * that has been delivered before (attempt > 0) re-enters READY at the FRONT
 * of its level (whether at once or after a backoff delay), so a returned job
 * comes back close to its original position (as in RabbitMQ) instead of
 * behind the whole backlog. When several come back at once (unsubscribe with
 * no backoff, releases) their delivery order is kept; with a backoff each
 * returns when its own jittered delay ends, so among themselves they follow
 * those due times. A message never delivered (new, delayed, dead-lettered,
 * replayed) enters at the back.
 *
 * Backoff for failure k (k = failures, 1-based):
 *   d = min(backoff_cap_ms, backoff_base_ms * 2^(k-1)), then "equal jitter":
 *   the delay is uniform in [d/2, d] (the qset RNG; qset_seed for tests).
 *   base 0 (possible only through queue_defaults) means requeue at once.
 *   A nack with has_delay uses exactly delay_ms (no jitter).
 *
 * Calls without a now_ms (qset_ack, qset_cancel, queue_purge) use the
 * latest now_ms the qset has been given by any call (e.g. qset_tick), for
 * the one thing that needs a time there: the start of an idempotency key's
 * retention window.
 *
 * TTL applies to READY and DELAYED messages only; an in-flight message is
 * never expired under its worker (its lease governs), but TTL applies again
 * once it is requeued.
 *
 * Compact form: a READY message that was never delivered (attempt 0), with
 * no requirements, progress, idempotency key or TTL, pushed with out ==
 * NULL and with state_seg == pub_seg, is kept in 40 bytes instead of a
 * struct msg (about 123 bytes with its id-index entry), in its level's
 * id-ordered slots. It becomes a struct msg, keeping its place, when it is
 * delivered or qset_msg asks for it. Events about it (QEV_DROP of a cancel)
 * carry a struct msg image that lives for the call only. It changes
 * nothing in the order or the state table.
 *
 * Allocation: only queue_push, qset_create, queue_subscribe, the consumer
 * tag setter, qset_nack (error text), qset_touch (progress holder),
 * queue_next_delivery (room in the deadline heap for the lease) and
 * dead-lettering (new body) allocate, and qset_msg and queue_next_delivery
 * when they turn a compact message into a struct msg. Lease expiry, ack,
 * release, cancel, purge and tick never fail for lack of memory, except that a
 * dead-letter whose new body cannot be allocated drops the message (QEV_DROP,
 * detail says so).
 */
#ifndef PQ_QUEUE_H
#define PQ_QUEUE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "body.h"
#include "queue_attrs.h"

enum { PRIORITY_LEVELS = 10 };

struct queue;
struct qset;
struct msg_ext;

/* queue_name_valid: 1-200 chars of A-Z a-z 0-9 . _ - : */
bool queue_name_valid(const char *name, size_t len);

struct queue_defaults {
    uint64_t ack_timeout_ms;  /* 30000 */
    uint32_t max_attempts;    /* 5 */
    uint64_t backoff_base_ms; /* 1000 */
    uint64_t backoff_cap_ms;  /* 60000 */
    uint64_t dedup_window_ms; /* 86400000 */
    uint64_t max_lease_ms;    /* 0 = no cap */
};

/* queue_defaults_init: the built-in defaults above. */
void queue_defaults_init(struct queue_defaults *d);

/* queue_attrs_resolve: fill the 0 fields that d covers with d's values. */
void queue_attrs_resolve(struct queue_attrs *a, const struct queue_defaults *d);

/* queue_attrs_equal: same resolved attributes (dead_letter compared as a
 * string). */
bool queue_attrs_equal(const struct queue_attrs *a,
                       const struct queue_attrs *b);

struct queue_stats {
    uint64_t published; /* queue_push */
    uint64_t acked;
    uint64_t nacked;      /* qset_nack calls that matched */
    uint64_t redelivered; /* deliveries with attempt > 1 */
    uint64_t expired;     /* TTL expiries (dropped or dead-lettered) */
    uint64_t
        dead_lettered; /* moved out to the DLQ (counted here, the source) */
    uint64_t
        dropped; /* should have been dead-lettered, but no/missing/full DLQ */
    uint64_t cancelled; /* removed by qset_cancel (at once or when fenced) */
    uint64_t released;  /* qset_release */
};

enum msg_state { MSG_READY, MSG_DELAYED, MSG_INFLIGHT };

/* msg.flags (bits 1 and 2 are queue.c's own, queue_int.h). MSG_F_REPLY:
 * its message names a reply_to, so its end is told there (never compact:
 * the compact form has no flags). */
enum { MSG_F_CANCELLED = 1u << 0, MSG_F_REPLY = 1u << 3 };

/*
 * struct msg: the in-memory index entry of one live message (unless it is
 * in compact form, see above). 112 bytes on LP64 (checked in
 * check_queue.c), allocated in slabs, plus ~11 bytes of id index. To fit,
 * failures is 16-bit and saturates at 65535 (a max_attempts above that acts
 * as "never dead-letter"). The optional parts (requirements,
 * progress, idempotency key, last error) live in a separate msg_ext that
 * most messages never allocate. body may be NULL when the dispatcher has
 * evicted the payload to disk; queue.c never dereferences it except to
 * build a dead-letter body (and then handles NULL).
 * Fields are read-only for callers, except body and the pub_seg, pub_off,
 * pub_len and state_seg
 * fields, which are the dispatcher's.
 */
struct msg {
    uint64_t id;             /* broker-wide unique, caller-assigned */
    struct queue *q;         /* current queue */
    struct body *body;       /* encoded protoq.Message, or NULL when evicted */
    struct msg *prev, *next; /* READY: priority list; INFLIGHT: holder's list */
    struct consumer *holder; /* INFLIGHT only */
    struct msg_ext *ext;     /* optional parts, or NULL */
    uint64_t due_ms;    /* DELAYED: visible at; INFLIGHT: lease end (mono) */
    uint64_t expire_ms; /* TTL deadline (mono), 0 = none */
    uint64_t published_wall_ms; /* Unix ms */
    uint32_t size;              /* payload bytes counted against max_bytes */
    uint32_t heap_pos;  /* slot in the qset deadline heap, UINT32_MAX = none */
    uint32_t attempt;   /* deliveries so far; token = (id, attempt) */
    uint32_t pub_seg;   /* dispatcher's: log segment of the publish */
    uint32_t state_seg; /* dispatcher's: segment of the latest state record */
    uint32_t
        pub_off; /* dispatcher's: offset of that record (segments < 4 GiB) */
    uint32_t pub_len;  /* dispatcher's: its length on disk, 0 = not on disk */
    uint16_t failures; /* failed attempts (release does not count); saturates */
    uint8_t priority;  /* 0-9, higher first */
    uint8_t state : 4; /* enum msg_state */
    uint8_t flags : 4; /* MSG_F_* */
};

/* msg_idem_key: the message's idempotency key, or NULL. */
const char *msg_idem_key(const struct msg *m);
/* msg_requires: the message's required tags (count in *n), or NULL/0. */
const struct kv *msg_requires(const struct msg *m, size_t *n);
/* msg_progress: latest progress (encoded protoq.Progress), or NULL. Borrowed.
 */
struct body *msg_progress(const struct msg *m);
/* msg_last_error: the error text of the latest nack, or NULL. */
const char *msg_last_error(const struct msg *m);
/* msg_wants_reply: its message names a reply_to (msg_new.reply). */
bool msg_wants_reply(const struct msg *m);
/* msg_is_cancelled: qset_cancel hit it while in flight. */
bool msg_is_cancelled(const struct msg *m);

/* msg_free: free a message the caller got from qset_ack (already unlinked
 * from every queue and map). NULL ok. */
void msg_free(struct msg *m);

/*
 * struct consumer: one subscription, embedded in the caller's object.
 * Initialise with queue_consumer_init(); the caller may set `paused`
 * (output backpressure) at any time: a paused consumer is skipped. When it
 * unpauses, the caller should run delivery for its queue. Other fields are
 * queue.c's.
 */
struct consumer {
    uint64_t id;       /* caller's subscription id */
    struct queue *q;   /* set by queue_subscribe, NULL when not subscribed */
    void *owner;       /* caller's (the connection) */
    uint32_t prefetch; /* credit: max in flight, >= 1 */
    uint32_t inflight; /* messages held now (cancelled included) */
    bool paused;       /* caller-set: skip for now */
    bool in_avail;     /* on the queue's credit ring */
    struct kv *tags;   /* owned copies */
    size_t n_tags;
    struct consumer *prev, *next; /* queue's consumer list */
    struct consumer *avail_prev,
        *avail_next; /* queue's credit ring (inflight < prefetch) */
    struct msg *inflight_head,
        *inflight_tail; /* held messages, delivery order */
};

/* queue_consumer_init: zero c and set id, owner, prefetch. */
void queue_consumer_init(struct consumer *c, uint64_t id, void *owner,
                         uint32_t prefetch);
/* queue_consumer_set_tags: replace c's tags with copies of n pairs.
 * PQ_OK, PQ_ENOMEM (unchanged). May be called while subscribed. */
int queue_consumer_set_tags(struct consumer *c, const struct kv *tags,
                            size_t n);
/* queue_consumer_fini: free the tags; c must be unsubscribed. */
void queue_consumer_fini(struct consumer *c);
/* queue_consumer_satisfies: c has every (key, value) pair of req. */
bool queue_consumer_satisfies(const struct consumer *c, const struct kv *req,
                              size_t n);

/* ---- events ---- */

/* Why a message was requeued, dead-lettered or dropped. The names are what
 * users see: x-death-reason headers, DROP records, log lines. */
enum qreason {
    QR_NONE = 0,
    QR_NACK,         /* the holder nacked it */
    QR_LEASE,        /* its lease ran out */
    QR_UNSUBSCRIBE,  /* its holder unsubscribed or disconnected */
    QR_RELEASE,      /* given back (not a failed attempt) */
    QR_MAX_ATTEMPTS, /* failed max_attempts times */
    QR_EXPIRED,      /* its TTL ran out */
    QR_CANCELLED,    /* cancelled by a producer or admin */
};

/* qreason_name: "nack", "lease", ... ("" for QR_NONE). */
const char *qreason_name(enum qreason r);

enum qevent_type {
    QEV_READY,       /* q has deliverable messages: schedule delivery (hint) */
    QEV_REQUEUE,     /* m back to READY/DELAYED: m->attempt, failures, due_ms;
                        reason */
    QEV_DEAD_LETTER, /* m moved from `from` to m->q (=q) with a new body; reason
                      */
    QEV_DROP,        /* m is about to be freed: reason, detail */
    QEV_TOUCH        /* m's lease is now m->due_ms; progress maybe new */
};

struct qevent {
    enum qevent_type type;
    struct msg *m;            /* NULL for QEV_READY */
    struct queue *q;          /* queue m is in (or was in, for DROP) */
    struct queue *from;       /* QEV_DEAD_LETTER: source queue */
    enum qreason reason;      /* REQUEUE: NACK, LEASE, UNSUBSCRIBE, RELEASE;
                               * DEAD_LETTER/DROP: MAX_ATTEMPTS, NACK,
                               * EXPIRED, CANCELLED */
    const char *detail;       /* DROP after a failed dead-letter: why (for the
                                 warning), else NULL */
    const struct kv *headers; /* DEAD_LETTER: the x-death-* headers added */
    size_t n_headers;
};

typedef void (*qset_listener_fn)(void *arg, const struct qevent *ev);

/* ---- the set of queues ---- */

/* qset_new: an empty set with defaults d (NULL = built-ins). NULL on ENOMEM. */
struct qset *qset_new(const struct queue_defaults *d);
/* qset_free: frees every queue and message; consumers must be gone. NULL ok. */
void qset_free(struct qset *qs);
/* qset_seed: reseed the jitter RNG (deterministic tests). */
void qset_seed(struct qset *qs, uint64_t seed);
/* qset_set_listener: where events go (fn NULL = none). */
void qset_set_listener(struct qset *qs, qset_listener_fn fn, void *arg);
/* qset_defaults: the defaults used by qset_create. */
const struct queue_defaults *qset_defaults(const struct qset *qs);

/* qset_create: declare queue `name` with attrs a (NULL = all defaults),
 * resolved against the qset defaults. PQ_OK with *out = the new queue, or
 * the existing one if its resolved attrs are equal; PQ_EEXIST if they
 * differ (*out = the existing queue); PQ_EINVAL for a bad name or a bad
 * dead_letter name (or the queue itself); PQ_ENOMEM. out may be NULL. */
int qset_create(struct qset *qs, const char *name, const struct queue_attrs *a,
                struct queue **out);
/* qset_find: the queue called name, or NULL. */
struct queue *qset_find(struct qset *qs, const char *name);
/* qset_delete: free q and all its messages, in flight ones included, with
 * no events: a deleted queue's messages are gone, never requeued nor
 * dead-lettered. Consumers still attached are detached (c->q = NULL,
 * nothing held; the caller still owns and finalises them). Always PQ_OK. */
int qset_delete(struct qset *qs, struct queue *q);
/* qset_first / qset_next: queues in creation order; NULL at the end.
 * Deleting the current queue invalidates the iteration. */
struct queue *qset_first(const struct qset *qs);
struct queue *qset_next(const struct queue *q);
/* qset_queue_count: number of queues. */
size_t qset_queue_count(const struct qset *qs);
/* qset_msg: the live message with this id, or NULL. A message kept in
 * compact form (see "Compact form" above) becomes a struct msg here, in
 * place; NULL also when there is no memory for that. Use qset_msg_peek
 * when a copy will do. */
struct msg *qset_msg(struct qset *qs, uint64_t id);
/* qset_msg_peek: copy the live message with this id into *view and return
 * true; false if there is none. The copy is read-only and valid until the
 * qset changes (ext and body are borrowed). Never allocates. */
bool qset_msg_peek(const struct qset *qs, uint64_t id, struct msg *view);
/* qset_msg_count: live messages in all queues. */
size_t qset_msg_count(const struct qset *qs);

/* qset_tick: handle every deadline <= now_ms (delayed -> ready, lease
 * expiry -> failed attempt, TTL -> expired), firing events. */
void qset_tick(struct qset *qs, uint64_t now_ms);
/* qset_next_deadline: earliest pending deadline (mono ms), UINT64_MAX if none.
 */
uint64_t qset_next_deadline(const struct qset *qs);

/* ---- queue accessors ---- */

const char *queue_name(const struct queue *q);
const struct queue_attrs *queue_attrs(const struct queue *q);
const struct queue_stats *queue_stats(const struct queue *q);
/* qset_stats_reset: zero every queue's counters (after log replay: what
 * it pushed and removed happened before this start). */
void qset_stats_reset(struct qset *qs);
uint64_t queue_ready_count(const struct queue *q);
uint64_t queue_delayed_count(const struct queue *q);
uint64_t queue_inflight_count(const struct queue *q);
/* queue_total_count: ready + delayed + inflight (what max_length limits). */
uint64_t queue_total_count(const struct queue *q);
/* queue_bytes: sum of msg.size of every message in the queue. */
uint64_t queue_bytes(const struct queue *q);
uint32_t queue_consumer_count(const struct queue *q);
/* queue_first_consumer / queue_next_consumer: subscription order. */
struct consumer *queue_first_consumer(const struct queue *q);
struct consumer *queue_next_consumer(const struct consumer *c);

/* queue_check_room: PQ_EFULL if adding n_msgs / n_bytes would pass
 * max_length or max_bytes, else PQ_OK. queue_push does not check: the
 * dispatcher checks before logging, so replay is never refused. */
int queue_check_room(const struct queue *q, uint64_t n_msgs, uint64_t n_bytes);

/* queue_dedup_find: PQ_OK and *id_out if key was published to q and its
 * message is live, or gone less than dedup_window_ms ago; else
 * PQ_ENOTFOUND. Also expires old entries (amortized O(1)). */
int queue_dedup_find(struct queue *q, const char *key, uint64_t now_ms,
                     uint64_t *id_out);

struct msg_new {
    uint64_t id;
    struct body *body;  /* the queue takes its own ref */
    uint32_t size;      /* payload bytes */
    uint8_t priority;   /* 0-9 */
    uint64_t due_ms;    /* 0 or mono visible-at */
    uint64_t expire_ms; /* mono; 0 = the queue's ttl_ms from now_ms (if any) */
    uint64_t published_wall_ms;
    const char *idem_key;      /* copied; NULL = none */
    bool key_takeover;         /* log replay: idem_key is taken over
                                * from a message that is gone, whatever
                                * its window (the log already accepted
                                * this push); a live owner still wins */
    const struct kv *requires; /* copied */
    size_t n_requires;
    uint32_t attempt, failures; /* log replay; 0 for a new publish */
    struct body *progress;      /* log replay; ref taken; NULL = none */
    bool reply;                 /* the message names a reply_to */
    uint32_t pub_seg, state_seg;
    uint32_t pub_off, pub_len; /* where the body can be read back */
};

/* queue_push: add a message: READY (due_ms <= now_ms) or DELAYED, at the
 * back of its priority level; registers the idempotency key. PQ_OK and
 * *out (out may be NULL: then the message may take the compact form, so
 * pass out only when a pointer is needed); PQ_EEXIST if the id is live or the
 * key belongs to a live message, or to one gone less than dedup_window_ms ago
 * (unless mn->key_takeover); PQ_EINVAL (priority > 9, empty key); PQ_ENOMEM.
 * Nothing changes on failure. Fires QEV_READY when it became READY. */
int queue_push(struct queue *q, const struct msg_new *mn, uint64_t now_ms,
               struct msg **out);

/* queue_next_delivery: pick the next (consumer, message) pair and mark the
 * message INFLIGHT: holder = *to, attempt++, lease due = now + ack_timeout.
 * Consumers are taken round-robin among those with credit, not paused, and
 * whose tags satisfy the message; a message nobody can take does not block
 * those behind it. Expired messages met on the way are expired (events).
 * NULL when no pair is possible, or when there is no memory for the lease's
 * deadline slot (nothing changes; a later call retries). O(1) amortized
 * when no message in q has requirements; otherwise it scans past the
 * messages nobody can take. */
struct msg *queue_next_delivery(struct queue *q, uint64_t now_ms,
                                struct consumer **to);

/* queue_subscribe: attach c (prefetch >= 1, not subscribed). PQ_OK, PQ_EINVAL.
 * Fires QEV_READY if q has ready messages. */
int queue_subscribe(struct queue *q, struct consumer *c);
/* queue_unsubscribe: detach c; each message it holds is a failed attempt
 * (QEV_REQUEUE "unsubscribe", or QEV_DEAD_LETTER / QEV_DROP), cancelled
 * ones are dropped. Order among them is kept. No-op if not subscribed. */
void queue_unsubscribe(struct consumer *c, uint64_t now_ms);
/* queue_set_prefetch: change c's credit (>= 1). */
void queue_set_prefetch(struct consumer *c, uint32_t prefetch);

/* qset_ack: the in-flight message with this exact token is done: removed
 * from its queue and maps and returned in *out; the caller logs it and
 * calls msg_free(). PQ_ESTALE if (id, attempt) is not the current
 * in-flight token (unknown id included): nothing changes. If the message
 * was cancelled: QEV_DROP "cancelled", freed, PQ_ESTALE (fenced). */
int qset_ack(struct qset *qs, uint64_t id, uint32_t attempt, struct msg **out);

struct nack_opts {
    bool has_delay;
    uint64_t delay_ms; /* with has_delay: exact requeue delay */
    bool dead_letter;  /* straight to the DLQ */
    const char *error; /* worker's error text, kept for x-death-error */
};

/* qset_nack: a failed attempt: failures+1, then requeue after o->delay_ms
 * or the backoff (QEV_REQUEUE "nack"), or dead-letter if o->dead_letter or
 * failures >= max_attempts (QEV_DEAD_LETTER/QEV_DROP). o may be NULL.
 * PQ_OK, PQ_ESTALE (not current; cancelled: dropped, fenced), PQ_ENOMEM
 * (could not keep the error text; nothing changed). */
int qset_nack(struct qset *qs, uint64_t id, uint32_t attempt,
              const struct nack_opts *o, uint64_t now_ms);

/* qset_touch: extend the lease to now + extend_ms (0 = ack_timeout), capped
 * at max_lease_ms when non-zero; progress (ref taken) replaces the kept
 * progress if non-NULL. Fires QEV_TOUCH. *lease_ms_out = granted extension
 * (may be NULL). PQ_OK, PQ_ESTALE (not current, or cancelled), PQ_ENOMEM. */
int qset_touch(struct qset *qs, uint64_t id, uint32_t attempt,
               uint64_t extend_ms, struct body *progress, uint64_t now_ms,
               uint64_t *lease_ms_out);

/* qset_release: give the message back at once (READY, front of its level);
 * failures unchanged, attempt kept; progress as in touch. Fires
 * QEV_REQUEUE "release". PQ_OK, PQ_ESTALE (cancelled: dropped), PQ_ENOMEM. */
int qset_release(struct qset *qs, uint64_t id, uint32_t attempt,
                 struct body *progress, uint64_t now_ms);

/* qset_interrupted: message id (READY or DELAYED, as replay leaves every
 * message) was delivered as `attempt` before a crash and its holder is
 * gone with the old process: a failed attempt as a lost consumer's
 * (attempt raised to `attempt`, failures+1, then QEV_REQUEUE "unsubscribe"
 * after the backoff, or QEV_DEAD_LETTER / QEV_DROP "max_attempts").
 * PQ_OK, PQ_ENOTFOUND (no such message), PQ_EINVAL (not READY/DELAYED),
 * PQ_ENOMEM. */
int qset_interrupted(struct qset *qs, uint64_t id, uint32_t attempt,
                     uint64_t now_ms);

/* qset_cancel: cancel message id. READY/DELAYED: QEV_DROP "cancelled",
 * freed, *inflight_out = NULL. INFLIGHT: marked cancelled (kept, still
 * counted against its holder's credit until the holder answers or the
 * lease ends), *inflight_out = m so the caller can push CancelRequested to
 * m->holder. PQ_OK, or PQ_ENOTFOUND for an unknown id. inflight_out may be
 * NULL. Cancelling an already cancelled in-flight message is PQ_OK again
 * with *inflight_out = NULL: it was recorded, told and noticed once. */
int qset_cancel(struct qset *qs, uint64_t id, struct msg **inflight_out);

/* queue_purge: drop every READY and DELAYED message (no events); returns the
 * count. In-flight messages stay. */
uint64_t queue_purge(struct queue *q);

/* queue_foreach_msg: call fn for every live message of q (any state).
 * fn must not add, remove or move messages, nor keep m. A compact message
 * is passed as a struct msg image: what fn changes of its body, pub_seg,
 * pub_off, pub_len and state_seg is kept, nothing else. O(live messages
 * of q). */
void queue_foreach_msg(struct queue *q, void (*fn)(void *arg, struct msg *m),
                       void *arg);

/* qset_sort_ready: put every ready list in id order (publish order). Log
 * replay uses it: compaction and retries move records in the log, so the
 * replay order is not the publish order. READY messages that qualify take
 * the compact form: pointers to READY messages are invalid afterwards.
 * PQ_OK or PQ_ENOMEM (the level it failed on is left as it was). */
int qset_sort_ready(struct qset *qs);

/* msg_set_progress: replace m's kept progress (ref taken; log replay).
 * PQ_OK or PQ_ENOMEM. */
int msg_set_progress(struct msg *m, struct body *progress);

#endif
