/*
 * dispatch.c: the protocol state machine of protoqd. One handler per
 * request kind. It is the only module that calls both queue.c and the
 * journal (journal.c, over store.c), and it fixes the order of every
 * durable change:
 *
 *   publish   check -> append PUBLISH -> wait -> (durable) push + PublishOk
 *   ack       ack in memory -> append ACK -> (confirm) Ok once durable
 *   admin     change in memory -> append -> Ok once durable
 *
 * A published message becomes visible to consumers only once its record is
 * durable, so no consumer ever sees a message that a crash could take back,
 * and a failed write (disk full) is answered DISK_FULL with nothing to undo.
 * Waits are answered in log order (store batches complete in order).
 *
 * Transient queues skip the journal: their changes apply and answer at once.
 */
#include "dispatch.h"

#include <assert.h>
#include <stdio.h>
#include <string.h>
#include <sysexits.h>
#include <unistd.h>

#include <event2/event.h>

#include "body.h"
#include "conn.h"
#include "frame.h"
#include "journal.h"
#include "log.h"
#include "mem.h"
#include "pqerr.h"
#include "queue.h"
#include "server.h"

#ifndef PROTOQ_VERSION
#define PROTOQ_VERSION "0.1.0"
#endif

enum {
    DELIVERIES_PER_PASS = 4096, /* per queue per pass, then yield */
    MAX_TAGS = 32,              /* tags per consumer / requirements per msg */
    MAX_TAG_BYTES = 256,        /* key or value */
    MAX_HEADER_BYTES = 65536,   /* all headers of one message */
};

/* The longest duration a client may give (delays, TTLs, leases, backoff,
 * windows): ten years. Past it a request is refused, so that no deadline
 * arithmetic can wrap. */
static const uint64_t DURATION_MAX_MS = 10ULL * 365 * 86400000;

/* One subscription of a connection. */
struct sub {
    struct consumer cons;         /* linked into its queue by queue.c */
    struct conn *conn;
    struct sub *next;             /* conn->subs */
    bool flow_paused;             /* Flow{prefetch 0}: no new deliveries */
};

enum wait_kind { WAIT_PUBLISH, WAIT_OK };

/* A reply (and for publishes, the messages) waiting for an LSN to be durable. */
struct wait {
    struct wait *next;
    uint64_t lsn;                 /* durable when the store reports >= lsn */
    struct conn *conn;            /* ref held; NULL: nobody to answer */
    uint64_t request_id;
    enum wait_kind kind;
    uint64_t count;               /* WAIT_OK: Ok.count */
    uint32_t n;                   /* WAIT_PUBLISH: messages */
    struct pending items[];
};

/* ---- error mapping: internal PQ_* to wire codes, in one place ---- */

static int
wire_code(int err)
{
    switch (err) {
    case PQ_EINVAL:
        return PROTOQ__ERROR_CODE__BAD_REQUEST;
    case PQ_ENOTFOUND:
        return PROTOQ__ERROR_CODE__QUEUE_NOT_FOUND;
    case PQ_EEXIST:
        return PROTOQ__ERROR_CODE__QUEUE_EXISTS;
    case PQ_EFULL:
        return PROTOQ__ERROR_CODE__QUEUE_FULL;
    case PQ_ETOOBIG:
        return PROTOQ__ERROR_CODE__MESSAGE_TOO_LARGE;
    case PQ_ESTALE:
        return PROTOQ__ERROR_CODE__STALE_DELIVERY;
    case PQ_ENOSPC:
        return PROTOQ__ERROR_CODE__DISK_FULL;
    case PQ_ENOMEM:
    case PQ_EBUSY:
        return PROTOQ__ERROR_CODE__OVERLOADED;
    default:
        return PROTOQ__ERROR_CODE__INTERNAL;
    }
}

static void
reply_err(struct conn *c, uint64_t rid, int err, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static void
reply_err(struct conn *c, uint64_t rid, int err, const char *fmt, ...)
{
    char msg[400];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    conn_send_error(c, rid, wire_code(err), "%s", msg);
}

static void
reply_ok(struct conn *c, uint64_t rid, uint64_t count)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Ok ok = PROTOQ__OK__INIT;

    ok.count = count;
    f.request_id = rid;
    f.kind_case = PROTOQ__FRAME__KIND_OK;
    f.ok = &ok;
    conn_send(c, &f);
}

/* ---- room taken by publishes not yet durable ----
 * A message counts against max_length / max_bytes from its check, not
 * from when it becomes visible, so a pipelined burst cannot overshoot. */

struct room {
    uint64_t n;
    uint64_t bytes;
};

static struct room *
room_of(struct server *srv, const struct queue *q, bool create)
{
    uint64_t key = (uint64_t)(uintptr_t)q;
    struct room *r = hmap_u64_get(&srv->pending_room, key);

    if (r == NULL && create) {
        r = pq_calloc(1, sizeof(*r));
        if (r != NULL && hmap_u64_put(&srv->pending_room, key, r) != PQ_OK) {
            pq_free(r);
            r = NULL;
        }
    }
    return r;
}

/* room_take: add what items adds to each queue, then check every queue
 * involved; on PQ_EFULL nothing stays taken and *full names the queue. */
static int
room_take(struct server *srv, struct pending *items, uint32_t n,
          struct queue **full)
{
    uint32_t i;
    int rc = PQ_OK;

    for (i = 0; i < n; i++) {
        struct room *r;

        if (items[i].duplicate) {
            continue;
        }
        r = room_of(srv, items[i].q, true);
        if (r == NULL) {
            rc = PQ_ENOMEM;
            break;
        }
        r->n++;
        r->bytes += items[i].mn.size;
    }
    for (uint32_t k = 0; rc == PQ_OK && k < n; k++) {
        struct room *r;

        if (items[k].duplicate) {
            continue;
        }
        r = room_of(srv, items[k].q, false);
        rc = queue_check_room(items[k].q, r->n, r->bytes);
        if (rc != PQ_OK) {
            *full = items[k].q;
        }
    }
    if (rc != PQ_OK) {
        for (uint32_t k = 0; k < i; k++) {
            struct room *r = items[k].duplicate ? NULL
                                                : room_of(srv, items[k].q, false);
            if (r) {
                r->n--;
                r->bytes -= items[k].mn.size;
            }
        }
    }
    return rc;
}

static void
room_give(struct server *srv, const struct pending *p)
{
    struct room *r;

    if (p->duplicate || p->q == NULL ||
        (r = room_of(srv, p->q, false)) == NULL) {
        return;
    }
    r->n--;
    r->bytes -= p->mn.size;
    if (r->n == 0) {
        hmap_u64_del(&srv->pending_room, (uint64_t)(uintptr_t)p->q);
        pq_free(r);
    }
}

static void
room_forget(struct server *srv, const struct queue *q)
{
    pq_free(hmap_u64_del(&srv->pending_room, (uint64_t)(uintptr_t)q));
}

/* ---- idempotency keys on their way to disk ----
 * queue_dedup_find sees keys of queued messages only. A key whose publish
 * is still waiting for the disk is registered here, so a second publish
 * with it (pipelined, or in the same batch) gets the first id and waits
 * for the first one's fate instead of storing a second copy. */

struct pend_key {
    char *ckey;                   /* "queue\x01key"; the map's key */
    uint64_t id;                  /* the first publish's message id */
    uint64_t lsn;                 /* its LSN once journaled; 0 before */
};

/* pend_key_name: "queue\x01key" into buf (queue names have no \x01). */
static bool
pend_key_name(char *buf, size_t cap, const char *queue, const char *key)
{
    int n = snprintf(buf, cap, "%s\x01%s", queue, key);

    return n > 0 && (size_t)n < cap;
}

static void
pend_key_drop(struct server *srv, struct pending *p)
{
    if (p->pkey != NULL) {
        hmap_str_del(&srv->pending_keys, p->pkey->ckey);
        pq_free(p->pkey->ckey);
        pq_free(p->pkey);
        p->pkey = NULL;
    }
}

/* ---- waits ---- */

static void
pending_fini(struct pending *p)
{
    body_unref(&p->mn.body);
    body_unref(&p->mn.progress);
    pq_free(p->idem_key);
    if (p->requires) {
        for (size_t i = 0; i < p->mn.n_requires; i++) {
            pq_free((char *)p->requires[i].key);
            pq_free((char *)p->requires[i].value);
        }
        pq_free(p->requires);
    }
}

static void
wait_free(struct server *srv, struct wait *w)
{
    for (uint32_t i = 0; i < w->n; i++) {
        pend_key_drop(srv, &w->items[i]);
        journal_publish_settled(srv, &w->items[i]);
        pending_fini(&w->items[i]);
    }
    if (w->conn) {
        conn_unref(w->conn);
    }
    pq_free(w);
}

static struct wait *
wait_new(struct conn *c, uint64_t rid, enum wait_kind kind, uint32_t n)
{
    struct wait *w = pq_calloc(1, sizeof(*w) + (size_t)n * sizeof(w->items[0]));

    if (w == NULL) {
        return NULL;
    }
    w->conn = c;
    if (c) {
        c->refs++;
    }
    w->request_id = rid;
    w->kind = kind;
    return w;
}

static void
wait_enqueue(struct server *srv, struct wait *w, uint64_t lsn)
{
    journal_urgent(srv); /* someone waits: sync it as soon as written */
    w->lsn = lsn;
    if (srv->waits_tail) {
        srv->waits_tail->next = w;
    } else {
        srv->waits_head = w;
    }
    srv->waits_tail = w;
}

/* Push the messages of a durable publish and answer PublishOk. */
static void
complete_publish(struct server *srv, struct wait *w)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__PublishOk ok = PROTOQ__PUBLISH_OK__INIT;
    uint64_t ids_small[16];
    protobuf_c_boolean dup_small[16];
    uint64_t *ids = w->n <= 16 ? ids_small : pq_malloc(w->n * sizeof(*ids));
    protobuf_c_boolean *dups =
        w->n <= 16 ? dup_small : pq_malloc(w->n * sizeof(*dups));
    bool any_dup = false;

    for (uint32_t i = 0; i < w->n; i++) {
        struct pending *p = &w->items[i];
        struct msg_new mn;
        bool durable;
        int rc;

        room_give(srv, p);
        if (ids) {
            ids[i] = p->mn.id;
        }
        if (dups) {
            dups[i] = p->duplicate;
        }
        any_dup |= p->duplicate;
        if (p->duplicate) {
            continue;
        }
        /* The queue may have been deleted while the record was written:
         * its QUEUE_DELETE follows the PUBLISH in the log, so dropping the
         * message here is what a replay would do too. */
        if (p->q != NULL) {
            p->mn.requires = p->requires;
            p->mn.idem_key = p->idem_key;
            /* The budget decides before the push, so the queue can keep
             * the message compact (no struct msg pointer needed here). */
            mn = p->mn;
            durable = !queue_attrs(p->q)->transient;
            if (durable && !journal_keep_body(srv, &mn)) {
                mn.body = NULL; /* the pending item still owns its ref */
            }
            rc = queue_push(p->q, &mn, srv->now_mono_ms, NULL);
            if (rc != PQ_OK && durable) {
                /* On disk but not in memory (out of memory): keep its
                 * segment for the life of this process, so the record is
                 * not deleted and a restart brings the message back. */
                journal_pin(srv, &mn);
                log_err("queue %s: message %llu is stored but could not be "
                        "queued (%s); it is delivered after a restart",
                        queue_name(p->q), (unsigned long long)p->mn.id,
                        pq_strerror(rc));
            } else if (rc != PQ_OK) {
                log_warn("queue %s: message %llu not queued: %s",
                         queue_name(p->q), (unsigned long long)p->mn.id,
                         pq_strerror(rc));
            } else if (durable) {
                journal_msg_stored(srv, &mn);
            }
        }
    }
    if (w->conn && conn_is_open(w->conn)) {
        if (ids == NULL || dups == NULL) {
            reply_err(w->conn, w->request_id, PQ_ENOMEM,
                      "stored, but out of memory building the reply");
        } else {
            ok.n_message_ids = w->n;
            ok.message_ids = ids;
            ok.n_duplicate = any_dup ? w->n : 0;
            ok.duplicate = dups;
            f.request_id = w->request_id;
            f.kind_case = PROTOQ__FRAME__KIND_PUBLISH_OK;
            f.publish_ok = &ok;
            conn_send(w->conn, &f);
        }
    }
    if (ids != ids_small) {
        pq_free(ids);
    }
    if (dups != dup_small) {
        pq_free(dups);
    }
}

static void
fail_wait(struct server *srv, struct wait *w, int status)
{
    for (uint32_t i = 0; i < w->n; i++) {
        room_give(srv, &w->items[i]);
    }
    if (w->kind == WAIT_PUBLISH) {
        srv->stats.disk_full_refusals++;
    }
    if (w->conn && conn_is_open(w->conn)) {
        reply_err(w->conn, w->request_id, status,
                  status == PQ_ENOSPC
                      ? "not stored: the data disk is full; retry later"
                      : "not stored: %s", pq_strerror(status));
    }
}

/* journal_done callback: every wait up to upto_lsn is settled. */
static void
settle_waits(void *arg, uint64_t upto_lsn, int status)
{
    struct server *srv = arg;
    struct wait *w;

    if (status == PQ_EIO || (status != PQ_OK && status != PQ_ENOSPC)) {
        /* Never confirm after a failed fsync: stop, let systemd restart us
         * and recovery decide what is on disk. */
        log_err("storage failed (%s); stopping without confirming anything "
                "more", pq_strerror(status));
        srv->exit_code = EX_IOERR;
        srv->stopping = true;
        event_base_loopbreak(srv->base);
        return;
    }
    srv->stats.batches_durable++;
    while ((w = srv->waits_head) != NULL && w->lsn <= upto_lsn) {
        srv->waits_head = w->next;
        if (srv->waits_head == NULL) {
            srv->waits_tail = NULL;
        }
        if (status != PQ_OK) {
            fail_wait(srv, w, status);
        } else if (w->kind == WAIT_PUBLISH) {
            complete_publish(srv, w);
        } else if (w->conn && conn_is_open(w->conn)) {
            reply_ok(w->conn, w->request_id, w->count);
        }
        wait_free(srv, w);
    }
}

/*
 * finish: answer a request whose change was journaled up to lsn (0: nothing
 * journaled, answer now). Waits are FIFO in LSN order; an lsn-0 request
 * that arrives behind a waiting one is answered at once, which is fine:
 * replies are matched by request_id.
 */
static void
finish_ok(struct conn *c, uint64_t rid, uint64_t lsn, uint64_t count)
{
    struct server *srv = c->srv;
    struct wait *w;

    if (lsn == 0) {
        reply_ok(c, rid, count);
        return;
    }
    w = wait_new(c, rid, WAIT_OK, 0);
    if (w == NULL) {
        reply_err(c, rid, PQ_ENOMEM, "applied, but out of memory for the reply");
        return;
    }
    w->count = count;
    wait_enqueue(srv, w, lsn);
}

/* Where the journal stood before a change, to confirm it afterwards. */
struct mark {
    uint64_t lsn;
    uint64_t errors;
};

static struct mark
mark_now(struct server *srv)
{
    struct mark m = {journal_last_lsn(srv), journal_errors(srv, NULL)};
    return m;
}

/*
 * finish_since: answer a request that changed state through queue events,
 * which journal whatever records they need: Ok once everything appended
 * since the mark is durable (at once if nothing was), or an Error if a
 * record could not be written (never an Ok for what is not on disk).
 */
static void
finish_since(struct conn *c, uint64_t rid, struct mark before)
{
    int last;
    uint64_t lsn = journal_last_lsn(c->srv);

    if (journal_errors(c->srv, &last) != before.errors) {
        reply_err(c, rid, last, "applied in memory, but not recorded in the "
                  "log (%s); after a restart it is undone", pq_strerror(last));
        return;
    }
    finish_ok(c, rid, lsn != before.lsn ? lsn : 0, 0);
}

/* ---- handshake ---- */

static void
on_hello(struct conn *c, uint64_t rid, const Protoq__Hello *h)
{
    struct server *srv = c->srv;
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Welcome w = PROTOQ__WELCOME__INIT;
    char broker_id[32];
    size_t i;

    if (h->protocol_version != PROTOQ_PROTOCOL_VERSION) {
        conn_fatal(c, rid, PROTOQ__ERROR_CODE__UNSUPPORTED_VERSION,
                   "protocol version %u is not supported; this broker speaks %d",
                   h->protocol_version, PROTOQ_PROTOCOL_VERSION);
        return;
    }
    /* Keep a printable copy of the client name for logs. */
    for (i = 0; h->client_name && h->client_name[i] && i + 1 < sizeof(c->name);
         i++) {
        char ch = h->client_name[i];
        c->name[i] = (ch >= 0x20 && ch < 0x7f) ? ch : '?';
    }
    c->name[i > 0 ? i : 1] = '\0';
    c->heartbeat_ms = srv->cfg.heartbeat_ms;
    if (h->heartbeat_ms != 0 && srv->cfg.heartbeat_ms != 0 &&
        h->heartbeat_ms > srv->cfg.heartbeat_ms) {
        /* A client may ask for a slower beat, within the timeout. */
        c->heartbeat_ms = h->heartbeat_ms < srv->cfg.heartbeat_timeout_ms / 2
                              ? h->heartbeat_ms
                              : srv->cfg.heartbeat_timeout_ms / 2;
    }
    conn_set_state(c, CONN_READY);
    c->max_frame_bytes = srv->cfg.max_frame_bytes;

    snprintf(broker_id, sizeof(broker_id), "protoqd-%u", srv->port);
    w.protocol_version = PROTOQ_PROTOCOL_VERSION;
    w.broker_id = broker_id;
    w.server_version = PROTOQ_VERSION;
    w.max_frame_bytes = srv->cfg.max_frame_bytes;
    w.max_message_bytes = srv->cfg.max_message_bytes;
    w.heartbeat_ms = c->heartbeat_ms;
    w.max_batch = srv->cfg.max_batch;
    f.request_id = rid;
    f.kind_case = PROTOQ__FRAME__KIND_WELCOME;
    f.welcome = &w;
    conn_send(c, &f);
    log_debug("conn %llu %s: hello from \"%s\"", (unsigned long long)c->id,
              c->peer, c->name);
}

/* ---- queue administration ---- */

static bool
check_name(struct conn *c, uint64_t rid, const char *what, const char *name)
{
    if (name == NULL || !queue_name_valid(name, strlen(name))) {
        reply_err(c, rid, PQ_EINVAL,
                  "%s: invalid queue name (1-200 characters of A-Z a-z 0-9 . _ - :)",
                  what);
        return false;
    }
    return true;
}

static struct queue *
find_queue(struct conn *c, uint64_t rid, const char *name)
{
    struct queue *q;

    if (!check_name(c, rid, "queue", name)) {
        return NULL;
    }
    q = qset_find(c->srv->qs, name);
    if (q == NULL) {
        reply_err(c, rid, PQ_ENOTFOUND, "queue \"%s\" does not exist", name);
    }
    return q;
}

static void
attrs_from_wire(struct queue_attrs *a, const Protoq__QueueAttrs *w)
{
    memset(a, 0, sizeof(*a));
    if (w == NULL) {
        return;
    }
    a->transient = w->transient;
    a->max_length = w->max_length;
    a->max_bytes = w->max_bytes;
    a->ack_timeout_ms = w->ack_timeout_ms;
    a->max_attempts = w->max_attempts;
    snprintf(a->dead_letter, sizeof(a->dead_letter), "%s",
             w->dead_letter ? w->dead_letter : "");
    a->backoff_base_ms = w->backoff_base_ms;
    a->backoff_cap_ms = w->backoff_cap_ms;
    a->ttl_ms = w->ttl_ms;
    a->dedup_window_ms = w->dedup_window_ms;
    a->max_lease_ms = w->max_lease_ms;
    a->dead_letter_expired = w->dead_letter_expired;
    a->no_backoff = w->no_backoff;
}

static void
attrs_to_wire(Protoq__QueueAttrs *w, const struct queue_attrs *a)
{
    protoq__queue_attrs__init(w);
    w->transient = a->transient;
    w->max_length = a->max_length;
    w->max_bytes = a->max_bytes;
    w->ack_timeout_ms = a->ack_timeout_ms;
    w->max_attempts = a->max_attempts;
    w->dead_letter = (char *)a->dead_letter;
    w->backoff_base_ms = a->backoff_base_ms;
    w->backoff_cap_ms = a->backoff_cap_ms;
    w->ttl_ms = a->ttl_ms;
    w->dedup_window_ms = a->dedup_window_ms;
    w->max_lease_ms = a->max_lease_ms;
    w->dead_letter_expired = a->dead_letter_expired;
    w->no_backoff = a->backoff_base_ms == 0;
}

/*
 * Every new log segment starts with the definitions of all durable queues
 * (so old segments can be deleted); they must fit in a quarter of one.
 * A definition takes at most ~500 bytes.
 */
static size_t
max_durable_queues(const struct server *srv)
{
    return (size_t)(srv->cfg.segment_bytes / 2048);
}

static size_t
durable_queue_count(const struct server *srv)
{
    size_t n = 0;

    for (struct queue *q = qset_first(srv->qs); q; q = qset_next(q)) {
        n += !queue_attrs(q)->transient;
    }
    return n;
}

static void
on_queue_create(struct conn *c, uint64_t rid, const Protoq__QueueCreate *r)
{
    struct server *srv = c->srv;
    struct queue_attrs a;
    struct queue *q = NULL;
    bool existed;
    uint64_t lsn = 0;
    int rc;

    if (!check_name(c, rid, "queue create", r->name)) {
        return;
    }
    if (r->attrs && r->attrs->dead_letter &&
        strlen(r->attrs->dead_letter) > QUEUE_NAME_MAX) {
        reply_err(c, rid, PQ_EINVAL, "queue create %s: dead_letter name over "
                  "%d characters", r->name, QUEUE_NAME_MAX);
        return;
    }
    attrs_from_wire(&a, r->attrs);
    if (a.dead_letter[0] != '\0' &&
        !queue_name_valid(a.dead_letter, strlen(a.dead_letter))) {
        reply_err(c, rid, PQ_EINVAL, "queue create %s: invalid dead_letter name",
                  r->name);
        return;
    }
    if (a.max_attempts > 1000000 || a.ack_timeout_ms > 365ULL * 86400000 ||
        a.ttl_ms > DURATION_MAX_MS || a.backoff_base_ms > DURATION_MAX_MS ||
        a.backoff_cap_ms > DURATION_MAX_MS ||
        a.dedup_window_ms > DURATION_MAX_MS ||
        a.max_lease_ms > DURATION_MAX_MS) {
        reply_err(c, rid, PQ_EINVAL,
                  "queue create %s: max_attempts over 1000000, ack_timeout_ms "
                  "over a year, or a duration over ten years", r->name);
        return;
    }
    existed = qset_find(srv->qs, r->name) != NULL;
    if (!existed && !a.transient && durable_queue_count(srv) >= max_durable_queues(srv)) {
        conn_send_error(c, rid, PROTOQ__ERROR_CODE__OVERLOADED,
                        "queue create %s: %zu durable queues is the most this "
                        "broker keeps (segment_bytes / 2048: every log segment "
                        "starts with their definitions)", r->name,
                        max_durable_queues(srv));
        return;
    }
    rc = qset_create(srv->qs, r->name, &a, &q);
    if (rc == PQ_EEXIST) {
        reply_err(c, rid, rc,
                  "queue \"%s\" already exists with other attributes", r->name);
        return;
    }
    if (rc != PQ_OK) {
        reply_err(c, rid, rc, "queue create %s: %s", r->name, pq_strerror(rc));
        return;
    }
    if (!existed && !queue_attrs(q)->transient) {
        rc = journal_queue_create(srv, q, &lsn);
        if (rc != PQ_OK) {
            qset_delete(srv->qs, q);
            reply_err(c, rid, rc, "queue create %s: %s", r->name,
                      pq_strerror(rc));
            return;
        }
    }
    if (!existed) {
        log_info("queue %s created%s", r->name,
                 queue_attrs(q)->transient ? " (transient)" : "");
    }
    finish_ok(c, rid, lsn, 0);
}

static void unsubscribe(struct server *srv, struct conn *c, struct sub *s);

/* Detach every subscription of q (their connections are told nothing
 * more; deliveries in flight are dropped with the queue). */
static void
drop_subscriptions(struct server *srv, struct queue *q)
{
    struct consumer *cons;

    while ((cons = queue_first_consumer(q)) != NULL) {
        struct sub *s = cons->owner;

        unsubscribe(srv, s->conn, s);
    }
}

/* Publishes to q still waiting for the disk will find it gone: the
 * QUEUE_DELETE follows their PUBLISH in the log, so replay drops them too. */
static void
forget_queue_in_waits(struct server *srv, struct queue *q)
{
    for (struct wait *w = srv->waits_head; w; w = w->next) {
        for (uint32_t i = 0; i < w->n; i++) {
            if (w->items[i].q == q) {
                room_give(srv, &w->items[i]);
                w->items[i].q = NULL;
            }
        }
    }
}

static void
on_queue_delete(struct conn *c, uint64_t rid, const Protoq__QueueDelete *r)
{
    struct server *srv = c->srv;
    struct queue *q = find_queue(c, rid, r->name);
    uint64_t lsn = 0;
    int rc;

    if (q == NULL) {
        return;
    }
    if (!queue_attrs(q)->transient) {
        rc = journal_queue_delete(srv, q, &lsn);
        if (rc != PQ_OK) {
            reply_err(c, rid, rc, "queue rm %s: %s", r->name, pq_strerror(rc));
            return;
        }
    }
    drop_subscriptions(srv, q);
    server_unmark_dirty(srv, q);
    forget_queue_in_waits(srv, q);
    room_forget(srv, q);
    qset_delete(srv->qs, q);
    log_info("queue %s deleted", r->name);
    finish_ok(c, rid, lsn, 0);
}

static void
on_queue_purge(struct conn *c, uint64_t rid, const Protoq__QueuePurge *r)
{
    struct server *srv = c->srv;
    struct queue *q = find_queue(c, rid, r->name);
    uint64_t lsn = 0, n;
    int rc;

    if (q == NULL) {
        return;
    }
    if (!queue_attrs(q)->transient) {
        rc = journal_queue_purge(srv, q, &lsn);
        if (rc != PQ_OK) {
            reply_err(c, rid, rc, "queue purge %s: %s", r->name,
                      pq_strerror(rc));
            return;
        }
    }
    n = queue_purge(q);
    log_info("queue %s purged: %llu messages", r->name, (unsigned long long)n);
    finish_ok(c, rid, lsn, n);
}

static void
fill_info(Protoq__QueueInfo *i, Protoq__QueueAttrs *wa, const struct queue *q)
{
    const struct queue_stats *st = queue_stats(q);

    protoq__queue_info__init(i);
    attrs_to_wire(wa, queue_attrs(q));
    i->name = (char *)queue_name(q);
    i->attrs = wa;
    i->ready = queue_ready_count(q);
    i->delayed = queue_delayed_count(q);
    i->inflight = queue_inflight_count(q);
    i->consumers = queue_consumer_count(q);
    i->bytes = queue_bytes(q);
    i->published = st->published;
    i->acked = st->acked;
    i->nacked = st->nacked;
    i->redelivered = st->redelivered;
    i->expired = st->expired;
    i->dead_lettered = st->dead_lettered;
    i->dropped = st->dropped;
}

static void
on_queue_stat(struct conn *c, uint64_t rid, const Protoq__QueueStat *r)
{
    struct queue *q = find_queue(c, rid, r->name);
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__QueueStatOk ok = PROTOQ__QUEUE_STAT_OK__INIT;
    Protoq__QueueInfo info;
    Protoq__QueueAttrs wa;

    if (q == NULL) {
        return;
    }
    fill_info(&info, &wa, q);
    ok.queue = &info;
    f.request_id = rid;
    f.kind_case = PROTOQ__FRAME__KIND_QUEUE_STAT_OK;
    f.queue_stat_ok = &ok;
    conn_send(c, &f);
}

static void
on_queue_list(struct conn *c, uint64_t rid)
{
    struct server *srv = c->srv;
    size_t n = qset_queue_count(srv->qs), i = 0;
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__QueueListOk ok = PROTOQ__QUEUE_LIST_OK__INIT;
    Protoq__QueueInfo *infos = NULL, **ptrs = NULL;
    Protoq__QueueAttrs *attrs = NULL;

    if (n > 0) {
        infos = pq_calloc(n, sizeof(*infos));
        attrs = pq_calloc(n, sizeof(*attrs));
        ptrs = pq_calloc(n, sizeof(*ptrs));
        if (infos == NULL || attrs == NULL || ptrs == NULL) {
            reply_err(c, rid, PQ_ENOMEM, "queue list: out of memory");
            goto out;
        }
    }
    for (struct queue *q = qset_first(srv->qs); q && i < n;
         q = qset_next(q), i++) {
        fill_info(&infos[i], &attrs[i], q);
        ptrs[i] = &infos[i];
    }
    ok.n_queues = i;
    ok.queues = ptrs;
    f.request_id = rid;
    f.kind_case = PROTOQ__FRAME__KIND_QUEUE_LIST_OK;
    f.queue_list_ok = &ok;
    if (frame_packed_size(&f) - FRAME_HEADER_LEN > c->srv->cfg.max_frame_bytes) {
        reply_err(c, rid, PQ_ETOOBIG,
                  "queue list: %zu queues do not fit in one frame", n);
        goto out;
    }
    conn_send(c, &f);
out:
    pq_free(infos);
    pq_free(attrs);
    pq_free(ptrs);
}

/* ---- publishing ---- */

static int
copy_kvs(Protoq__KeyValue **in, size_t n, struct kv **out)
{
    struct kv *kv;

    *out = NULL;
    if (n == 0) {
        return PQ_OK;
    }
    kv = pq_calloc(n, sizeof(*kv));
    if (kv == NULL) {
        return PQ_ENOMEM;
    }
    for (size_t i = 0; i < n; i++) {
        kv[i].key = pq_strdup(in[i]->key ? in[i]->key : "");
        kv[i].value = pq_strdup(in[i]->value ? in[i]->value : "");
        if (kv[i].key == NULL || kv[i].value == NULL) {
            for (size_t j = 0; j <= i; j++) {
                pq_free((char *)kv[j].key);
                pq_free((char *)kv[j].value);
            }
            pq_free(kv);
            return PQ_ENOMEM;
        }
    }
    *out = kv;
    return PQ_OK;
}

static bool
kvs_valid(Protoq__KeyValue **kv, size_t n, size_t max_n, size_t *bytes)
{
    if (n > max_n) {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        size_t kl = kv[i]->key ? strlen(kv[i]->key) : 0;
        size_t vl = kv[i]->value ? strlen(kv[i]->value) : 0;

        if (kl == 0 || kl > MAX_TAG_BYTES || (bytes == NULL && vl > MAX_TAG_BYTES)) {
            return false;
        }
        if (bytes) {
            *bytes += kl + vl;
        }
    }
    return bytes == NULL || *bytes <= MAX_HEADER_BYTES;
}

/*
 * prepare_one: validate one Publish and fill p (body encoded, ids
 * assigned). On failure answers the request with the reason and returns
 * false; p holds nothing then.
 */
static bool
prepare_one(struct conn *c, uint64_t rid, const Protoq__Publish *pub,
            struct pending *p, uint64_t wall_now)
{
    struct server *srv = c->srv;
    const Protoq__Message *m = pub->message;
    size_t hdr_bytes = 0, len;
    uint64_t ttl, dup_id;
    struct queue *q;

    memset(p, 0, sizeof(*p));
    if (pub->route && pub->route[0] != '\0') {
        conn_send_error(c, rid, PROTOQ__ERROR_CODE__UNSUPPORTED,
                        "publish to a route is not implemented yet");
        return false;
    }
    q = find_queue(c, rid, pub->queue);
    if (q == NULL) {
        return false;
    }
    if (m == NULL) {
        reply_err(c, rid, PQ_EINVAL, "publish %s: no message", pub->queue);
        return false;
    }
    if (m->payload.len > srv->cfg.max_message_bytes) {
        reply_err(c, rid, PQ_ETOOBIG,
                  "publish %s: payload of %zu bytes is over max_message_bytes (%u)",
                  pub->queue, m->payload.len, srv->cfg.max_message_bytes);
        return false;
    }
    if (m->delay_ms > DURATION_MAX_MS || m->ttl_ms > DURATION_MAX_MS ||
        (m->deliver_at_ms > wall_now &&
         m->deliver_at_ms - wall_now > DURATION_MAX_MS)) {
        reply_err(c, rid, PQ_EINVAL,
                  "publish %s: delay, deliver_at or ttl more than ten years "
                  "away", pub->queue);
        return false;
    }
    if (m->priority > 9) {
        reply_err(c, rid, PQ_EINVAL, "publish %s: priority %u is not 0-9",
                  pub->queue, m->priority);
        return false;
    }
    if (!kvs_valid(m->headers, m->n_headers, 1024, &hdr_bytes) ||
        !kvs_valid(m->requires, m->n_requires, MAX_TAGS, NULL)) {
        reply_err(c, rid, PQ_EINVAL,
                  "publish %s: headers or requires out of bounds (empty key, "
                  "over %d tags, or over %d bytes)",
                  pub->queue, MAX_TAGS, MAX_HEADER_BYTES);
        return false;
    }
    if (m->idempotency_key && strlen(m->idempotency_key) > 256) {
        reply_err(c, rid, PQ_EINVAL,
                  "publish %s: idempotency key over 256 bytes", pub->queue);
        return false;
    }
    p->q = q;
    if (m->idempotency_key && m->idempotency_key[0] != '\0') {
        char ck[QUEUE_NAME_MAX + 260];
        struct pend_key *pk;

        if (queue_dedup_find(q, m->idempotency_key, srv->now_mono_ms,
                             &dup_id) == PQ_OK) {
            p->duplicate = true;
            p->mn.id = dup_id;
            return true;
        }
        pend_key_name(ck, sizeof(ck), pub->queue, m->idempotency_key);
        pk = hmap_str_get(&srv->pending_keys, ck);
        if (pk != NULL) {
            /* The first publish with this key is on its way to disk. */
            p->duplicate = true;
            p->mn.id = pk->id;
            p->dup_lsn = pk->lsn;
            return true;
        }
        pk = pq_calloc(1, sizeof(*pk));
        if (pk == NULL || (pk->ckey = pq_strdup(ck)) == NULL ||
            hmap_str_put(&srv->pending_keys, pk->ckey, pk) != PQ_OK) {
            if (pk != NULL) {
                pq_free(pk->ckey);
            }
            pq_free(pk);
            reply_err(c, rid, PQ_ENOMEM, "publish %s: out of memory",
                      pub->queue);
            return false;
        }
        pk->id = srv->next_msg_id; /* assigned to this message below */
        p->pkey = pk;
    }
    /* The stored body is the Message as received, re-encoded once,
     * straight into the body. */
    len = protoq__message__get_packed_size(m);
    p->mn.body = body_alloc(len);
    if (p->mn.body != NULL) {
        protoq__message__pack(m, p->mn.body->data);
    }
    if (p->mn.body == NULL ||
        copy_kvs(m->requires, m->n_requires, &p->requires) != PQ_OK ||
        (m->idempotency_key && m->idempotency_key[0] &&
         (p->idem_key = pq_strdup(m->idempotency_key)) == NULL)) {
        pend_key_drop(srv, p);
        pending_fini(p);
        reply_err(c, rid, PQ_ENOMEM, "publish %s: out of memory", pub->queue);
        return false;
    }
    p->mn.n_requires = m->n_requires;
    p->mn.id = srv->next_msg_id++;
    p->mn.size = (uint32_t)m->payload.len;
    p->mn.priority = (uint8_t)m->priority;
    p->mn.published_wall_ms = wall_now;
    if (m->deliver_at_ms > wall_now) {
        p->mn.due_ms = srv->now_mono_ms + (m->deliver_at_ms - wall_now);
    } else if (m->deliver_at_ms == 0 && m->delay_ms > 0) {
        p->mn.due_ms = srv->now_mono_ms + m->delay_ms;
    }
    ttl = m->ttl_ms ? m->ttl_ms : queue_attrs(q)->ttl_ms;
    if (ttl > 0) {
        p->mn.expire_ms = srv->now_mono_ms + ttl;
    }
    return true;
}

/*
 * publish: the shared path of Publish and PublishBatch. All or nothing:
 * every message is checked before any is journaled.
 */
static void
publish(struct conn *c, uint64_t rid, Protoq__Publish *const *items, size_t n)
{
    struct server *srv = c->srv;
    uint64_t wall_now = clock_wall_ms(), lsn = 0;
    bool durable = false;
    struct queue *full = NULL;
    struct wait *w;
    size_t i;
    int rc;

    if (n == 0 || n > srv->cfg.max_batch) {
        reply_err(c, rid, PQ_EINVAL, "publish: %zu messages (1-%u allowed)", n,
                  srv->cfg.max_batch);
        return;
    }
    if (pq_mem_used() > srv->cfg.memory_high_bytes) {
        conn_send_error(c, rid, PROTOQ__ERROR_CODE__OVERLOADED,
                        "broker memory over memory_high_bytes (%llu); retry later",
                        (unsigned long long)srv->cfg.memory_high_bytes);
        return;
    }
    w = wait_new(c, rid, WAIT_PUBLISH, (uint32_t)n);
    if (w == NULL) {
        reply_err(c, rid, PQ_ENOMEM, "publish: out of memory");
        return;
    }
    for (i = 0; i < n; i++) {
        if (!prepare_one(c, rid, items[i], &w->items[i], wall_now)) {
            goto fail; /* answered */
        }
        w->n++;
        durable |= !w->items[i].duplicate &&
                   !queue_attrs(w->items[i].q)->transient;
    }
    rc = room_take(srv, w->items, w->n, &full);
    if (rc != PQ_OK) {
        if (rc == PQ_EFULL) {
            reply_err(c, rid, rc,
                      "publish %s: queue is full (max_length %llu, max_bytes %llu)",
                      queue_name(full),
                      (unsigned long long)queue_attrs(full)->max_length,
                      (unsigned long long)queue_attrs(full)->max_bytes);
        } else {
            reply_err(c, rid, rc, "publish: %s", pq_strerror(rc));
        }
        goto fail;
    }
    if (durable) {
        rc = journal_publish(srv, w->items, w->n, &lsn);
        if (rc != PQ_OK) {
            if (rc == PQ_ENOSPC) {
                srv->stats.disk_full_refusals++;
            }
            reply_err(c, rid, rc, "publish: not stored: %s", pq_strerror(rc));
            for (i = 0; i < w->n; i++) {
                room_give(srv, &w->items[i]);
            }
            goto fail;
        }
    }
    for (i = 0; i < w->n; i++) {
        struct pending *p = &w->items[i];

        if (p->pkey != NULL) {
            p->pkey->lsn = lsn;
        }
        /* A duplicate of a publish still on its way waits for it: if that
         * one fails, this one fails with it. */
        if (p->dup_lsn > lsn) {
            lsn = p->dup_lsn;
        }
    }
    if (lsn == 0) {
        complete_publish(srv, w);
        wait_free(srv, w);
        return;
    }
    wait_enqueue(srv, w, lsn);
    return;
fail:
    wait_free(srv, w);
}

/* ---- consuming ---- */

static struct sub *
find_sub(struct conn *c, uint64_t id)
{
    for (struct sub *s = c->subs; s; s = s->next) {
        if (s->cons.id == id) {
            return s;
        }
    }
    return NULL;
}

static void
on_subscribe(struct conn *c, uint64_t rid, const Protoq__Subscribe *r)
{
    struct server *srv = c->srv;
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__SubscribeOk ok = PROTOQ__SUBSCRIBE_OK__INIT;
    struct kv tags[MAX_TAGS];
    struct queue *q = find_queue(c, rid, r->queue);
    struct sub *s;
    uint32_t prefetch = r->prefetch ? r->prefetch : 1;

    if (q == NULL) {
        return;
    }
    if (c->nsubs >= 1024) {
        reply_err(c, rid, PQ_EINVAL, "subscribe: over 1024 subscriptions");
        return;
    }
    if (!kvs_valid(r->tags, r->n_tags, MAX_TAGS, NULL)) {
        reply_err(c, rid, PQ_EINVAL, "subscribe: over %d tags or a tag over %d bytes",
                  MAX_TAGS, MAX_TAG_BYTES);
        return;
    }
    if (prefetch > 100000) {
        prefetch = 100000;
    }
    s = pq_calloc(1, sizeof(*s));
    if (s == NULL) {
        reply_err(c, rid, PQ_ENOMEM, "subscribe: out of memory");
        return;
    }
    queue_consumer_init(&s->cons, ++srv->next_sub_id, s, prefetch);
    for (size_t i = 0; i < r->n_tags; i++) {
        tags[i].key = r->tags[i]->key;
        tags[i].value = r->tags[i]->value ? r->tags[i]->value : "";
    }
    if (queue_consumer_set_tags(&s->cons, tags, r->n_tags) != PQ_OK) {
        pq_free(s);
        reply_err(c, rid, PQ_ENOMEM, "subscribe: out of memory");
        return;
    }
    s->conn = c;
    s->cons.paused = c->output_full;
    s->next = c->subs;
    c->subs = s;
    c->nsubs++;
    /* Answer first so SubscribeOk precedes the first Deliver. */
    ok.subscription_id = s->cons.id;
    f.request_id = rid;
    f.kind_case = PROTOQ__FRAME__KIND_SUBSCRIBE_OK;
    f.subscribe_ok = &ok;
    conn_send(c, &f);
    queue_subscribe(q, &s->cons);
    server_mark_dirty(srv, q);
}

static void
unsubscribe(struct server *srv, struct conn *c, struct sub *s)
{
    struct sub **pp;

    for (pp = &c->subs; *pp != s; pp = &(*pp)->next) {
    }
    *pp = s->next;
    c->nsubs--;
    queue_unsubscribe(&s->cons, srv->now_mono_ms);
    queue_consumer_fini(&s->cons);
    pq_free(s);
}

static void
on_unsubscribe(struct conn *c, uint64_t rid, const Protoq__Unsubscribe *r)
{
    struct sub *s = find_sub(c, r->subscription_id);

    if (s == NULL) {
        conn_send_error(c, rid, PROTOQ__ERROR_CODE__SUBSCRIPTION_NOT_FOUND,
                        "no subscription %llu on this connection",
                        (unsigned long long)r->subscription_id);
        return;
    }
    unsubscribe(c->srv, c, s);
    reply_ok(c, rid, 0);
}

static void
on_flow(struct conn *c, uint64_t rid, const Protoq__Flow *r)
{
    struct sub *s = find_sub(c, r->subscription_id);

    if (s == NULL) {
        conn_send_error(c, rid, PROTOQ__ERROR_CODE__SUBSCRIPTION_NOT_FOUND,
                        "no subscription %llu on this connection",
                        (unsigned long long)r->subscription_id);
        return;
    }
    /* prefetch 0 pauses the subscription: a worker that shuts down pauses,
     * releases what it holds, then goes, without the released jobs coming
     * straight back to it. */
    s->flow_paused = r->prefetch == 0;
    s->cons.paused = s->flow_paused || c->output_full;
    if (r->prefetch > 0) {
        queue_set_prefetch(&s->cons, r->prefetch > 100000 ? 100000 : r->prefetch);
    }
    server_mark_dirty(c->srv, s->cons.q);
    reply_ok(c, rid, 0);
}

/* Give back what s holds without counting a failed attempt (clean stop). */
static void
release_held(struct server *srv, struct sub *s)
{
    struct msg *m;

    while ((m = s->cons.inflight_head) != NULL) {
        int rc = qset_release(srv->qs, m->id, m->attempt, NULL,
                              srv->now_mono_ms);

        if (rc != PQ_OK && rc != PQ_ESTALE) {
            break; /* the unsubscribe below handles what is left */
        }
    }
}

void
dispatch_conn_closed(struct conn *c)
{
    while (c->subs) {
        if (c->srv->shutting_down) {
            release_held(c->srv, c->subs);
        }
        unsubscribe(c->srv, c, c->subs);
    }
}

void
dispatch_conn_output(struct conn *c, bool full)
{
    for (struct sub *s = c->subs; s; s = s->next) {
        s->cons.paused = full || s->flow_paused;
        if (!s->cons.paused) {
            server_mark_dirty(c->srv, s->cons.q);
        }
    }
}

/* Send one Deliver; the message body is spliced, not re-encoded. */
static void
send_deliver(struct server *srv, struct sub *s, struct msg *m)
{
    struct body *prog = msg_progress(m);
    struct frame_deliver d = {
        .subscription_id = s->cons.id,
        .queue = queue_name(m->q),
        .message_id = m->id,
        .attempt = m->attempt,
        .lease_ms = m->due_ms > srv->now_mono_ms ? m->due_ms - srv->now_mono_ms : 0,
        .published_at_ms = m->published_wall_ms,
        .progress = prog ? prog->data : NULL,
        .progress_len = prog ? prog->len : 0,
    };
    struct body *b = m->body;
    size_t n;
    uint8_t *p;

    if (b == NULL) {
        b = journal_load_body(srv, m);
    } else {
        body_ref(b);
    }
    if (b == NULL) {
        /* Unreadable payload: fail this attempt rather than send garbage. */
        struct nack_opts o = {.dead_letter = false, .error = "payload unreadable"};

        log_err("queue %s: message %llu: payload cannot be read back",
                queue_name(m->q), (unsigned long long)m->id);
        qset_nack(srv->qs, m->id, m->attempt, &o, srv->now_mono_ms);
        return;
    }
    n = frame_deliver_size(&d, b->len);
    p = conn_reserve(s->conn, n);
    if (p == NULL) {
        /* The connection is going away; its close requeues the message. */
        body_unref(&b);
        return;
    }
    conn_commit(s->conn, frame_deliver_encode(&d, b->data, b->len, p));
    body_unref(&b);
}

/* deliver: hand out what q can deliver now; true if it stopped early. */
static bool
deliver(struct server *srv, struct queue *q)
{
    struct consumer *to;
    struct msg *m;

    for (int i = 0; i < DELIVERIES_PER_PASS; i++) {
        m = queue_next_delivery(q, srv->now_mono_ms, &to);
        if (m == NULL) {
            return false;
        }
        send_deliver(srv, to->owner, m);
    }
    return true;
}

/* ---- acknowledgements ---- */

static void
on_ack(struct conn *c, uint64_t rid, const Protoq__Ack *r)
{
    struct server *srv = c->srv;
    struct msg *m = NULL;
    struct msg cur;
    struct queue *q, *was;
    uint64_t lsn = 0;
    int rc;

    if (r->n_follow_ups > 0 || r->result.len > 0) {
        conn_send_error(c, rid, PROTOQ__ERROR_CODE__UNSUPPORTED,
                        "ack with a result or follow-ups is not implemented yet");
        return;
    }
    was = qset_msg_peek(srv->qs, r->message_id, &cur) ? cur.q : NULL;
    rc = qset_ack(srv->qs, r->message_id, r->attempt, &m);
    if (rc != PQ_OK) {
        bool live = qset_msg_peek(srv->qs, r->message_id, &cur);

        if (was != NULL && !live) {
            /* a fenced ack of a cancelled job dropped it: its holder's
             * credit is free again */
            server_mark_dirty(srv, was);
        }
        log_debug("ack %llu/%u stale: %s", (unsigned long long)r->message_id,
                  r->attempt, live ? (cur.state == MSG_INFLIGHT ? "in flight, other attempt" : "not in flight") : "no such message");
        reply_err(c, rid, rc, "ack %llu/%u: not the current delivery (lease "
                  "expired, already acked, or cancelled)",
                  (unsigned long long)r->message_id, r->attempt);
        return;
    }
    q = m->q;
    rc = PQ_OK;
    if (!queue_attrs(q)->transient) {
        rc = journal_ack(srv, m, &lsn);
        if (rc != PQ_OK) {
            /* In memory it is gone; on disk it stays and would come back
             * after a restart: at-least-once, never a loss. */
            log_warn("queue %s: ack of %llu not journaled: %s", queue_name(q),
                     (unsigned long long)m->id, pq_strerror(rc));
        }
    }
    msg_free(m);
    server_mark_dirty(srv, q);
    if (r->confirm && rc != PQ_OK) {
        reply_err(c, rid, rc, "ack applied, but not recorded in the log (%s); "
                  "after a restart the message is delivered again",
                  pq_strerror(rc));
    } else if (r->confirm) {
        finish_ok(c, rid, lsn, 0);
    }
}

static void
on_nack(struct conn *c, uint64_t rid, const Protoq__Nack *r)
{
    struct server *srv = c->srv;
    struct msg v;
    struct queue *q = qset_msg_peek(srv->qs, r->message_id, &v) ? v.q : NULL;
    struct nack_opts o = {
        .has_delay = r->delay_ms > 0,
        .delay_ms = r->delay_ms,
        .dead_letter = r->dead_letter,
        .error = r->error,
    };
    struct mark before;
    int rc;

    if (r->error && strlen(r->error) > 1024) {
        reply_err(c, rid, PQ_EINVAL, "nack: error text over 1024 bytes");
        return;
    }
    if (r->delay_ms > DURATION_MAX_MS) {
        reply_err(c, rid, PQ_EINVAL, "nack: delay over ten years");
        return;
    }
    before = mark_now(srv);
    rc = qset_nack(srv->qs, r->message_id, r->attempt, &o, srv->now_mono_ms);
    if (rc != PQ_OK) {
        reply_err(c, rid, rc, "nack %llu/%u: not the current delivery",
                  (unsigned long long)r->message_id, r->attempt);
        return;
    }
    if (q) {
        server_mark_dirty(srv, q);
    }
    if (r->confirm) {
        finish_since(c, rid, before);
    }
}

/* Encode a Progress for keeping with the job; NULL when none given. */
static int
progress_body(const Protoq__Progress *p, struct body **out)
{
    enum { PROGRESS_MAX = 2048 };
    size_t len;

    *out = NULL;
    if (p == NULL) {
        return PQ_OK;
    }
    len = protoq__progress__get_packed_size(p);
    if (len > PROGRESS_MAX || p->percent > 100) {
        return PQ_EINVAL;
    }
    *out = body_alloc(len);
    if (*out == NULL) {
        return PQ_ENOMEM;
    }
    protoq__progress__pack(p, (*out)->data);
    return PQ_OK;
}

static void
on_touch(struct conn *c, uint64_t rid, const Protoq__Touch *r)
{
    struct server *srv = c->srv;
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__TouchOk ok = PROTOQ__TOUCH_OK__INIT;
    struct body *prog = NULL;
    uint64_t lease = 0;
    int rc;

    if (r->extend_ms > DURATION_MAX_MS) {
        reply_err(c, rid, PQ_EINVAL, "touch: extension over ten years");
        return;
    }
    rc = progress_body(r->progress, &prog);
    if (rc != PQ_OK) {
        reply_err(c, rid, rc, "touch: progress over 2 KiB or percent over 100");
        return;
    }
    rc = qset_touch(srv->qs, r->message_id, r->attempt, r->extend_ms, prog,
                    srv->now_mono_ms, &lease);
    body_unref(&prog);
    if (rc != PQ_OK) {
        reply_err(c, rid, rc, "touch %llu/%u: not the current delivery",
                  (unsigned long long)r->message_id, r->attempt);
        return;
    }
    ok.lease_ms = lease;
    f.request_id = rid;
    f.kind_case = PROTOQ__FRAME__KIND_TOUCH_OK;
    f.touch_ok = &ok;
    conn_send(c, &f);
}

static void
on_release(struct conn *c, uint64_t rid, const Protoq__Release *r)
{
    struct server *srv = c->srv;
    struct msg v;
    struct queue *q = qset_msg_peek(srv->qs, r->message_id, &v) ? v.q : NULL;
    struct body *prog = NULL;
    struct mark before;
    int rc;

    rc = progress_body(r->progress, &prog);
    if (rc != PQ_OK) {
        reply_err(c, rid, rc, "release: progress over 2 KiB or percent over 100");
        return;
    }
    before = mark_now(srv);
    rc = qset_release(srv->qs, r->message_id, r->attempt, prog, srv->now_mono_ms);
    body_unref(&prog);
    if (rc != PQ_OK) {
        reply_err(c, rid, rc, "release %llu/%u: not the current delivery",
                  (unsigned long long)r->message_id, r->attempt);
        return;
    }
    if (q) {
        server_mark_dirty(srv, q);
    }
    if (r->confirm) {
        finish_since(c, rid, before);
    }
}

static void
on_cancel(struct conn *c, uint64_t rid, const Protoq__Cancel *r)
{
    struct server *srv = c->srv;
    struct msg v, *held = NULL;
    bool live = qset_msg_peek(srv->qs, r->message_id, &v);
    struct mark before;
    int rc;

    if (!live || (r->queue && r->queue[0] &&
                  strcmp(r->queue, queue_name(v.q)) != 0)) {
        conn_send_error(c, rid, PROTOQ__ERROR_CODE__BAD_REQUEST,
                        "cancel: no live message %llu%s%s",
                        (unsigned long long)r->message_id,
                        r->queue && r->queue[0] ? " in queue " : "",
                        r->queue ? r->queue : "");
        return;
    }
    before = mark_now(srv);
    rc = qset_cancel(srv->qs, r->message_id, &held);
    if (rc != PQ_OK) {
        reply_err(c, rid, rc, "cancel %llu: %s",
                  (unsigned long long)r->message_id, pq_strerror(rc));
        return;
    }
    if (held && !queue_attrs(held->q)->transient) {
        rc = journal_cancel(srv, held);
        if (rc != PQ_OK) {
            log_warn("queue %s: cancel of %llu not journaled: %s",
                     queue_name(held->q), (unsigned long long)held->id,
                     pq_strerror(rc));
        }
    }
    if (held && held->holder) {
        struct sub *s = held->holder->owner;
        Protoq__Frame f = PROTOQ__FRAME__INIT;
        Protoq__CancelRequested cr = PROTOQ__CANCEL_REQUESTED__INIT;

        cr.queue = (char *)queue_name(held->q);
        cr.message_id = held->id;
        cr.attempt = held->attempt;
        f.kind_case = PROTOQ__FRAME__KIND_CANCEL_REQUESTED;
        f.cancel_requested = &cr;
        conn_send(s->conn, &f);
    }
    finish_since(c, rid, before);
}

/* ---- the frame switch ---- */

void
dispatch_frame(struct conn *c, const Protoq__Frame *f)
{
    uint64_t rid = f->request_id;

    if (c->state == CONN_HANDSHAKE) {
        if (f->kind_case != PROTOQ__FRAME__KIND_HELLO) {
            conn_fatal(c, rid, PROTOQ__ERROR_CODE__UNEXPECTED_FRAME,
                       "the first frame must be Hello (got kind %d)",
                       (int)f->kind_case);
            return;
        }
        on_hello(c, rid, f->hello);
        return;
    }
    switch (f->kind_case) {
    case PROTOQ__FRAME__KIND_HELLO:
        conn_fatal(c, rid, PROTOQ__ERROR_CODE__UNEXPECTED_FRAME,
                   "Hello sent twice");
        break;
    case PROTOQ__FRAME__KIND_HEARTBEAT:
        break; /* last_rx_ms already updated */
    case PROTOQ__FRAME__KIND_QUEUE_CREATE:
        on_queue_create(c, rid, f->queue_create);
        break;
    case PROTOQ__FRAME__KIND_QUEUE_DELETE:
        on_queue_delete(c, rid, f->queue_delete);
        break;
    case PROTOQ__FRAME__KIND_QUEUE_PURGE:
        on_queue_purge(c, rid, f->queue_purge);
        break;
    case PROTOQ__FRAME__KIND_QUEUE_LIST:
        on_queue_list(c, rid);
        break;
    case PROTOQ__FRAME__KIND_QUEUE_STAT:
        on_queue_stat(c, rid, f->queue_stat);
        break;
    case PROTOQ__FRAME__KIND_PUBLISH:
        publish(c, rid, &f->publish, 1);
        break;
    case PROTOQ__FRAME__KIND_PUBLISH_BATCH:
        publish(c, rid, f->publish_batch->items, f->publish_batch->n_items);
        break;
    case PROTOQ__FRAME__KIND_SUBSCRIBE:
        on_subscribe(c, rid, f->subscribe);
        break;
    case PROTOQ__FRAME__KIND_UNSUBSCRIBE:
        on_unsubscribe(c, rid, f->unsubscribe);
        break;
    case PROTOQ__FRAME__KIND_FLOW:
        on_flow(c, rid, f->flow);
        break;
    case PROTOQ__FRAME__KIND_ACK:
        on_ack(c, rid, f->ack);
        break;
    case PROTOQ__FRAME__KIND_NACK:
        on_nack(c, rid, f->nack);
        break;
    case PROTOQ__FRAME__KIND_TOUCH:
        on_touch(c, rid, f->touch);
        break;
    case PROTOQ__FRAME__KIND_RELEASE:
        on_release(c, rid, f->release);
        break;
    case PROTOQ__FRAME__KIND_CANCEL:
        on_cancel(c, rid, f->cancel);
        break;
    case PROTOQ__FRAME__KIND_ROUTE_BIND:
    case PROTOQ__FRAME__KIND_ROUTE_UNBIND:
        conn_send_error(c, rid, PROTOQ__ERROR_CODE__UNSUPPORTED,
                        "routes are not implemented yet");
        break;
    case PROTOQ__FRAME__KIND_WELCOME:
    case PROTOQ__FRAME__KIND_ERROR:
    case PROTOQ__FRAME__KIND_OK:
    case PROTOQ__FRAME__KIND_QUEUE_LIST_OK:
    case PROTOQ__FRAME__KIND_QUEUE_STAT_OK:
    case PROTOQ__FRAME__KIND_PUBLISH_OK:
    case PROTOQ__FRAME__KIND_SUBSCRIBE_OK:
    case PROTOQ__FRAME__KIND_DELIVER:
    case PROTOQ__FRAME__KIND_TOUCH_OK:
    case PROTOQ__FRAME__KIND_CANCEL_REQUESTED:
        conn_fatal(c, rid, PROTOQ__ERROR_CODE__UNEXPECTED_FRAME,
                   "frame kind %d is sent by the broker, not to it",
                   (int)f->kind_case);
        break;
    default:
        /* Unset or from a newer protocol: refuse it, keep the connection. */
        conn_send_error(c, rid, PROTOQ__ERROR_CODE__UNKNOWN_FRAME,
                        "unknown frame kind %d", (int)f->kind_case);
        break;
    }
}

/* ---- the loop's side ---- */

/* Queue events: journal what a replay needs, and wake delivery. */
static void
on_qevent(void *arg, const struct qevent *ev)
{
    struct server *srv = arg;

    if (ev->type == QEV_READY) {
        server_mark_dirty(srv, ev->q);
        return;
    }
    if (ev->type == QEV_DROP && ev->detail) {
        log_warn("queue %s: message %llu dropped (%s): %s", queue_name(ev->q),
                 (unsigned long long)ev->m->id, ev->reason, ev->detail);
    }
    journal_qevent(srv, ev);
    if (ev->type == QEV_REQUEUE || ev->type == QEV_DEAD_LETTER) {
        server_mark_dirty(srv, ev->q);
    }
    if (ev->type == QEV_DROP || ev->type == QEV_REQUEUE ||
        ev->type == QEV_DEAD_LETTER) {
        /* The holder (if any) got credit back. */
        if (ev->from) {
            server_mark_dirty(srv, ev->from);
        }
    }
}

int
dispatch_open(struct server *srv, char *err, size_t errlen)
{
    struct queue_defaults d;
    int rc;

    queue_defaults_init(&d);
    d.ack_timeout_ms = srv->cfg.ack_timeout_ms;
    d.max_attempts = srv->cfg.max_attempts;
    d.backoff_base_ms = srv->cfg.backoff_base_ms;
    d.backoff_cap_ms = srv->cfg.backoff_cap_ms;
    d.dedup_window_ms = srv->cfg.dedup_window_ms;
    d.max_lease_ms = srv->cfg.max_lease_ms;
    srv->qs = qset_new(&d);
    if (srv->qs == NULL) {
        snprintf(err, errlen, "out of memory");
        return PQ_ENOMEM;
    }
    qset_seed(srv->qs, clock_mono_ms() ^ (uint64_t)getpid());
    rc = journal_open(srv, err, errlen);
    if (rc != PQ_OK) {
        return rc;
    }
    qset_set_listener(srv->qs, on_qevent, srv);
    return PQ_OK;
}

bool
dispatch_pass(struct server *srv)
{
    bool more = false;
    uint32_t n = srv->ndirty;

    /* Deliver for queues marked dirty before this pass; queues marked
     * during it are handled next pass. */
    for (uint32_t i = 0; i < n; i++) {
        struct queue *q = srv->dirty[i];

        hmap_u64_del(&srv->dirty_set, (uint64_t)(uintptr_t)q);
        srv->dirty[i] = NULL;
        if (deliver(srv, q)) {
            server_mark_dirty(srv, q);
        }
    }
    if (n > 0) {
        uint32_t rest = srv->ndirty - n;
        memmove(srv->dirty, srv->dirty + n, rest * sizeof(*srv->dirty));
        srv->ndirty = rest;
    }
    more = srv->ndirty > 0;
    journal_submit(srv);
    return more;
}

void
dispatch_store_event(struct server *srv)
{
    journal_reap(srv, settle_waits, srv);
}

void
dispatch_housekeeping(struct server *srv)
{
    journal_compact(srv);
}

void
dispatch_tick(struct server *srv)
{
    qset_tick(srv->qs, srv->now_mono_ms);
}

void
dispatch_close(struct server *srv)
{
    struct wait *w;

    journal_close(srv);
    /* Whatever is still waiting was never confirmed; drop it silently. */
    while ((w = srv->waits_head) != NULL) {
        srv->waits_head = w->next;
        wait_free(srv, w);
    }
    srv->waits_tail = NULL;
    {
        size_t it = 0;
        void *r;

        while ((r = hmap_u64_next(&srv->pending_room, &it, NULL)) != NULL) {
            pq_free(r);
        }
        hmap_u64_fini(&srv->pending_room);
    }
    hmap_str_fini(&srv->pending_keys); /* entries went with their waits */
    qset_free(srv->qs);
    srv->qs = NULL;
}
