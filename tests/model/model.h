/*
 * model.h: the reference model of the model-based restart test
 * (check_model.c). It holds what a protoqd must show after any sequence of
 * operations: every queue's messages in delivery order, each with its
 * attempt, failures, progress and dead-letter headers; what a restart
 * brings back (the recorded state of each message, and after a kill -9 the
 * set of records that may or may not have reached the log); dedup answers;
 * the counters since the broker started.
 *
 * Time-driven changes (delays, backoff, a shortened lease, a TTL that ends
 * before the message is due) are timed events with a window [lo, hi] of
 * monotonic ms. The test waits past every window after the operation that
 * made them, and the model applies an event early when an observation
 * needs it (a delivery of a message whose event is still pending), so
 * either order of close events is accepted. Messages that return at once
 * in an order the broker does not fix (backoff jitter, several
 * subscriptions detached by one disconnect) share a group number: a
 * contiguous run of one group may be delivered in any order.
 *
 * What a job's end makes (a result, failure notice or follow-up: m_reply,
 * m_made_by) is a message like the others, with two differences: its id is
 * the broker's to choose, so it is bound at its first delivery by content
 * (ordered meanwhile by ordkey, after every id known when it was made);
 * and it is in limbo (READY, not in its queue's order) until its record is
 * known durable or it is delivered, since the broker pushes it only then.
 */
#ifndef PQ_TEST_MODEL_H
#define PQ_TEST_MODEL_H

#include <stdbool.h>
#include <stdint.h>

#include "protoq.h"

enum {
    M_NQ = 5,       /* queue slots q0..q4 */
    M_MAXM = 700,   /* messages per history */
    M_PUBM = 560,   /* publishes stop here: results, notices and
                       follow-ups take the rest */
    M_NH = 8,       /* headers of a message (a notice has up to 8) */
    M_NC = 4,       /* connections; the last one is the drainer's */
    M_NS = 16,      /* subscriptions */
    M_MAXDL = 5,    /* dead-letter hops kept per message */
    M_MAXP = 8,     /* records kept since the last durable point */
    M_NTAGS = 3,    /* tag universe: gpu=a100, gpu=h100, zone=eu */
    M_MAXEV = 256,  /* pending timed events */
    M_MAXKEYS = 64, /* dedup entries per queue */
    M_MAXB = 12,    /* bindings of the one route, "r" */
    M_NPAT = 4,     /* patterns a binding may have (m_pat) */
    M_NRKEY = 4,    /* routing keys a publish may use (m_rkey) */
};

enum { MADE_NONE, MADE_RESULT, MADE_NOTICE, MADE_FOLLOW_UP };

enum m_state { ST_GONE, ST_READY, ST_DLONG, ST_INFLIGHT, ST_TIMED };

/* A timed event's kind. */
enum m_ev { EV_READY_BACK, EV_READY_FRONT, EV_EXPIRE, EV_LEASE };

struct m_prog {
    bool has;
    uint32_t pct;
    char text[24];
    char ckpt[24];
};

struct m_dl {
    char reason[16];
    uint32_t attempts;
    int q;
    char err[24];
};

/* What a restart brings back of one message (its latest record). */
struct m_proj {
    bool exists;
    int q;
    uint32_t attempt; /* deliveries so far */
    uint32_t failures;
    struct m_prog pg;
    uint8_t ndl;
    struct m_dl dl[M_MAXDL];
    char err[24];    /* the last nack's error text */
    bool dlong;      /* delayed for an hour */
    bool running;    /* a DELIVER of this attempt that no later record ended:
                        after a kill -9 the start fails that attempt */
    bool maybe_gone; /* after a kill -9: this state's dead letter may have
                        found its queue full (dropped) */
};

struct m_msg {
    uint64_t id;
    uint32_t gen; /* payload generator index */
    uint32_t len;
    uint8_t nh;
    char hk[M_NH][24];
    char hv[M_NH][24];
    uint8_t prio;
    char key[24];
    char corr[12];
    char rto[12];
    uint8_t reqmask; /* required tags (bits over the universe) */
    bool text;       /* payload is txt (a result or notice), not m_payload */
    char txt[24];
    /* A result, notice or follow-up: made by the end of job `cause` (its
     * record pend[cause_k] of that job), -1 none. Its id is not known
     * until it is delivered (0 until then): deliveries bind it by content. */
    int cause;
    uint8_t cause_k;
    uint8_t made;    /* MADE_*: what a job's end made it as */
    bool limbo;      /* READY, not yet pushed: the broker pushes it once
                        its record is durable (m_durable, or a delivery) */
    uint64_t ordkey; /* id order while the id is unknown (2 * id + 1 of
                        the highest id known when it was made) */
    uint32_t upass;  /* made by one start's pass over the jobs a kill -9
                        interrupted (0: not): among those the broker's id
                        order is not the model's to know */
    bool checked;    /* made, and delivered as the model said */
    bool maybe_made; /* a notice the start may have made (proj_notice);
                        counted in its queue's pub_maybe until seen */
    bool gvalid;     /* at a bare kill -9: both it and its cause were written
                        and not known durable (m_check_groups) */
    bool doomed;     /* TTL ends before its delay: never delivered */
    bool ttl_long;
    struct m_proj cur; /* the live state */
    enum m_state st;
    int sub;        /* INFLIGHT: holder */
    uint64_t dseq;  /* INFLIGHT: delivery order */
    uint32_t grp;   /* READY: unordered group, 0 = none */
    uint64_t lseq;  /* when it was last linked into a ready list */
    uint64_t mseq;  /* made: the lseq counter when its job's end made it */
    bool cancelled; /* INFLIGHT and cancelled */
    int ev;         /* TIMED: pending event index, -1 none */
    uint8_t np;     /* pend[0] durable, pend[1..np) written since */
    struct m_proj pend[M_MAXP];
    bool unc; /* after a kill -9: state is one of pend[] */
    /* Power loss only: the state before the first record the model saw in
     * a sync window (m_sync_window), which its m_durable took as durable
     * although the broker may have written it after the fsync (a DELIVER
     * of a result pushed once the ack was durable): a kill -9 keeps such
     * a record, a power loss may not (m_power_loss). */
    bool pl_alt_ok;
    uint32_t pl_alt_gen;
    struct m_proj pl_alt;
    bool seen; /* uncertain and observed */
    int8_t rk; /* seen: the pend[] state it matched */
};

struct m_counters {
    uint64_t published, acked, nacked, redelivered, expired, dead_lettered,
        dropped;
    uint64_t pub_maybe; /* notices the start may have published here (a
                           job running at a bare kill -9 that it ended):
                           published is in [published, +pub_maybe] */
};

struct m_key {
    char key[24];
    int m; /* message index, -1 = unknown (avoid the key) */
};

struct m_queue {
    bool exists;
    uint32_t inc; /* incarnation (create after delete) */
    struct protoq_queue_attrs a;
    int rd[M_MAXM]; /* READY messages in delivery order */
    int nrd;
    int sub; /* the one subscription, -1 none */
    struct m_counters n;
    struct m_key keys[M_MAXKEYS];
    int nkeys;
};

struct m_sub {
    bool used;
    int conn;
    int q;
    uint64_t sid;
    uint32_t prefetch;
    uint32_t held;
    uint8_t tags; /* bits over the universe */
};

struct m_event {
    bool used;
    int m;
    enum m_ev kind;
    int64_t lo, hi; /* monotonic ms window */
    uint32_t grp;
};

/* One delivery as the client saw it. */
struct m_obs {
    int conn;
    uint64_t sid;
    char queue[PROTOQ_NAME_MAX + 1];
    uint64_t id;
    uint32_t attempt;
    uint32_t len;
    uint64_t hash;
    char hdrs[1024];
    uint32_t prio;
    char corr[16], rto[16], key[32];
    struct m_prog pg;
};

/* A binding of route "r": queue slot q, pattern m_pat[pat]. */
struct m_bind {
    int q;
    int pat;
};

struct model {
    struct m_queue q[M_NQ];
    struct m_bind b[M_MAXB]; /* in bind order */
    int nb;
    struct m_msg m[M_MAXM];
    int nm;
    struct m_sub s[M_NS];
    struct m_event ev[M_MAXEV];
    uint64_t dseq;
    uint32_t grp;
    uint64_t lseq;             /* ready-list links so far (m_msg.lseq) */
    uint32_t cfg_max_attempts; /* broker defaults the test configures */
    uint64_t cfg_backoff_base, cfg_backoff_cap, cfg_ack_timeout, cfg_dedup;
    uint64_t unc_msgs, unc_multi; /* after bare kill -9s: messages, and
                                     those with more than one possible state */
    /* What job ends made (results, failure notices, follow-ups), and how
     * many of them a delivery matched; atomic groups (a job's end with
     * what it made) checked after a bare kill -9, kept or lost whole. */
    uint64_t n_results, n_notices, n_follow_ups;
    uint64_t seen_results, seen_notices, seen_follow_ups;
    uint64_t groups_kept, groups_lost;
    /* Results or notices the broker may not have pushed yet (it pushes
     * them once their record is durable): the test syncs before it looks. */
    bool unpushed;
    /* A sync window is open (m_sync_window): records go on pl_alt. */
    bool pl_window;
    uint32_t pl_gen;
    uint64_t pl_alts; /* pl_alt states added at power losses */

    char err[1024]; /* first mismatch */
    bool failed;
};

extern const char *const m_pat[M_NPAT];
extern const char *const m_rkey[M_NRKEY];

/* m_route_match: the queues of route "r" that a publish with routing key
 * m_rkey[k] reaches, each once, in the order of their first matching
 * binding, into qs; returns how many. */
int m_route_match(const struct model *w, int k, int *qs);

/* m_unbind_queue: queue q's bindings are gone (deleted, or transient at a
 * restart). */
void m_unbind_queue(struct model *w, int q);

extern const char *const m_tag_key[M_NTAGS];
extern const char *const m_tag_val[M_NTAGS];

/* m_fail: record the first mismatch (printf-like); returns -1. */
int m_fail(struct model *w, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

const char *m_qname(int q);
int m_qindex(const char *name);
void m_payload(uint32_t gen, uint32_t len, char *buf);
uint64_t m_hash(const void *p, size_t len);

void m_init(struct model *w);

/* Effective attributes of queue q (broker defaults filled in). */
void m_effective(const struct model *w, int q, struct protoq_queue_attrs *out);
/* Room for n more messages of total bytes in q. */
bool m_room(const struct model *w, int q, uint64_t n, uint64_t bytes);

/* Message changes (each writes what the broker logs, see m_record). */
int m_new_msg(struct model *w);
void m_record(struct model *w, struct m_msg *m);
void m_record_progress(struct model *w, struct m_msg *m);
void m_durable(struct model *w);
/* What job ends made is in its queues now (their records are durable). */
void m_push_limbo(struct model *w);
void m_insert_back(struct model *w, int q, int mi);
void m_insert_front(struct model *w, int q, int mi);
void m_unlink_ready(struct model *w, int mi);
void m_gone(struct model *w, int mi, bool record);
int m_add_event(struct model *w, int mi, enum m_ev kind, int64_t lo, int64_t hi,
                uint32_t grp);
void m_drop_event(struct model *w, int mi);
/* A failed attempt of held (unlinked) message mi. */
void m_fail_attempt(struct model *w, int mi, int64_t now, bool to_dl,
                    bool has_delay, uint64_t delay, uint32_t grp,
                    uint32_t dlgrp);
void m_dead_letter(struct model *w, int mi, const char *reason, uint32_t grp);

/* What job mi's end in queue src tells its producer (nothing without a
 * reply_to, or when that queue is gone), as a new message at the back of
 * the reply_to queue: a result (reason NULL: status "ok", payload text) or
 * a failure notice (reason; text: the error, also its payload; dl: the
 * dead-letter queue or -1). attempt: the attempt that ended it. Call after
 * the job's end is recorded. Returns the new message's index or -1. */
int m_reply(struct model *w, int mi, int src, const char *reason,
            const char *text, uint32_t attempt, int dl);
/* A message made by job mi's end (follow-up or reply) is in queue q now:
 * written with that end, its id unknown. */
void m_made_by(struct model *w, int ni, int mi, int q);
/* After a bare kill -9 every drain is done: each atomic group (a job's end
 * with its result/notice/follow-ups) must be there whole or not at all. */
int m_check_groups(struct model *w);
void m_release_held(struct model *w, int mi);
/* A subscription ends (unsubscribe, disconnect, queue deleted). */
void m_detach(struct model *w, int si, int64_t now, uint32_t grp,
              uint32_t dlgrp);
/* Apply the earliest pending event; false if none. */
bool m_apply_one_event(struct model *w);
/* Apply events in order until message mi has none. */
void m_apply_events_for(struct model *w, int mi);
int64_t m_events_max_hi(const struct model *w);
bool m_events_pending(const struct model *w);

/* Deliveries: how many more the broker owes subscription si right now. */
uint32_t m_owed(const struct model *w, int si);
/* Check one delivery; 0 or -1 (w->err set). */
int m_deliver(struct model *w, int si, const struct m_obs *o);
/* Expected header text of message m as its delivery shows it. */
void m_headers_text(const struct model *w, const struct m_msg *m,
                    const struct m_proj *p, char *buf, size_t cap);

/* Restarts. clean: a SIGTERM, which gives held jobs back as released;
 * otherwise a kill -9, after which each job whose delivery the log holds
 * (running) is a failed attempt at the start. launch_ms: when the broker
 * started (its backoff of those jobs runs from about then). */
void m_restart(struct model *w, bool clean, int64_t launch_ms);
/* After a kill -9 without a barrier: every message may be in any state of
 * its pend[]; marked unc until a drain resolves it. */
void m_restart_uncertain(struct model *w);
/* Before m_restart_uncertain at a power loss: a message may also be in
 * its pl_alt state (its records of the last sync window lost). */
void m_power_loss(struct model *w);
/* Open (true) or close a sync window: the deliveries and events the test
 * processes between a confirmed request and its m_durable came before the
 * confirm, but the broker may have written their records after the fsync
 * that confirmed it (a kill -9 keeps them; a power loss may not). */
void m_sync_window(struct model *w, bool open);
void m_rebuild_keys(struct model *w);
/* Remember key (message mi, -1 = unknown) in Q's dedup table. */
void m_add_key(struct m_queue *Q, const char *key, int mi);

/* Gauges of queue q. */
void m_gauges(const struct model *w, int q, uint64_t *ready, uint64_t *delayed,
              uint64_t *inflight, uint64_t *bytes);

/* restart.c's helpers from model.c: the failure notice a start may have
 * sent for job mi's state before (dl: where the job went, -1 dropped),
 * made uncertain; and whether subscription si may take message mi. */
void m_proj_notice(struct model *w, int mi, const struct m_proj *before,
                   int dl);
bool m_eligible(const struct model *w, int si, int mi);
/* Message mi (unlinked) was running at a kill -9: the start fails that
 * attempt as a lost consumer's. */
void m_interrupted(struct model *w, int mi, int64_t now, uint32_t grp,
                   uint32_t dlgrp);

#endif
