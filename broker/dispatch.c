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
#include "dispatch_int.h"

#include <assert.h>
#include <stdio.h>
#include <string.h>
#include <sysexits.h>
#include <unistd.h>

#include "clock.h"
#include "log.h"
#include "mem.h"
#include "pqerr.h"
#include "route.h"

/* dispatch_mark_dirty: q may now deliver; the delivery pass handles it. */
void
dispatch_mark_dirty(struct broker *bk, struct queue *q)
{
    uint64_t key = (uint64_t)(uintptr_t)q;

    if (hmap_u64_get(&bk->dirty_set, key) != NULL) {
        return;
    }
    if (bk->ndirty == bk->dirty_cap) {
        uint32_t cap = bk->dirty_cap ? bk->dirty_cap * 2 : 64;
        struct queue **d = pq_realloc(bk->dirty, cap * sizeof(*d));

        if (d == NULL) {
            return; /* delivered on the next event that marks it */
        }
        bk->dirty = d;
        bk->dirty_cap = cap;
    }
    if (hmap_u64_put(&bk->dirty_set, key, q) != PQ_OK) {
        return;
    }
    bk->dirty[bk->ndirty++] = q;
}

/* dispatch_unmark_dirty: q is going away: forget it. */
void
dispatch_unmark_dirty(struct broker *bk, struct queue *q)
{
    if (hmap_u64_del(&bk->dirty_set, (uint64_t)(uintptr_t)q) == NULL) {
        return;
    }
    for (uint32_t i = 0; i < bk->ndirty; i++) {
        if (bk->dirty[i] == q) {
            bk->dirty[i] = bk->dirty[--bk->ndirty];
            return;
        }
    }
}

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

void
dispatch_reply_err(struct conn *c, uint64_t rid, int err, const char *fmt, ...)
{
    char msg[400];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    conn_send_error(c, rid, wire_code(err), "%s", msg);
}

void
dispatch_reply_ok(struct conn *c, uint64_t rid, uint64_t count)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Ok ok = PROTOQ__OK__INIT;

    ok.count = count;
    f.request_id = rid;
    f.kind_case = PROTOQ__FRAME__KIND_OK;
    f.ok = &ok;
    conn_send(c, &f);
}

static struct room *
room_of(struct broker *bk, const struct queue *q, bool create)
{
    uint64_t key = (uint64_t)(uintptr_t)q;
    struct room *r = hmap_u64_get(&bk->pending_room, key);

    if (r == NULL && create) {
        r = pq_calloc(1, sizeof(*r));
        if (r != NULL && hmap_u64_put(&bk->pending_room, key, r) != PQ_OK) {
            pq_free(r);
            r = NULL;
        }
    }
    return r;
}

/* dispatch_room_take: add what items adds to each queue, then check every queue
 * involved; on PQ_EFULL nothing stays taken and *full names the queue. */
int
dispatch_room_take(struct broker *bk, struct pending *items, uint32_t n,
                   struct queue **full)
{
    uint32_t i;
    int rc = PQ_OK;

    for (i = 0; i < n; i++) {
        struct room *r;

        if (items[i].duplicate || items[i].no_room) {
            continue;
        }
        r = room_of(bk, items[i].q, true);
        if (r == NULL) {
            rc = PQ_ENOMEM;
            break;
        }
        r->n++;
        r->bytes += items[i].mn.size;
    }
    for (uint32_t k = 0; rc == PQ_OK && k < n; k++) {
        struct room *r;

        if (items[k].duplicate || items[k].no_room) {
            continue;
        }
        r = room_of(bk, items[k].q, false);
        rc = queue_check_room(items[k].q, r->n, r->bytes);
        if (rc != PQ_OK) {
            *full = items[k].q;
        }
    }
    if (rc != PQ_OK) {
        for (uint32_t k = 0; k < i; k++) {
            struct room *r = items[k].duplicate || items[k].no_room
                                 ? NULL
                                 : room_of(bk, items[k].q, false);
            if (r) {
                r->n--;
                r->bytes -= items[k].mn.size;
            }
        }
    }
    return rc;
}

void
dispatch_room_give(struct broker *bk, const struct pending *p)
{
    struct room *r;

    if (p->duplicate || p->no_room || p->q == NULL ||
        (r = room_of(bk, p->q, false)) == NULL) {
        return;
    }
    r->n--;
    r->bytes -= p->mn.size;
    if (r->n == 0) {
        hmap_u64_del(&bk->pending_room, (uint64_t)(uintptr_t)p->q);
        pq_free(r);
    }
}

void
dispatch_room_forget(struct broker *bk, const struct queue *q)
{
    pq_free(hmap_u64_del(&bk->pending_room, (uint64_t)(uintptr_t)q));
}

/* dispatch_pend_key_name: "queue\x01key" into buf (queue names have no \x01).
 */
bool
dispatch_pend_key_name(char *buf, size_t cap, const char *queue,
                       const char *key)
{
    int n = snprintf(buf, cap, "%s\x01%s", queue, key);

    return n > 0 && (size_t)n < cap;
}

void
dispatch_pend_key_drop(struct broker *bk, struct pending *p)
{
    if (p->pkey != NULL) {
        hmap_str_del(&bk->pending_keys, p->pkey->ckey);
        pq_free(p->pkey->ckey);
        pq_free(p->pkey);
        p->pkey = NULL;
    }
}

/* ---- waits ---- */

void
dispatch_pending_fini(struct pending *p)
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

void
dispatch_wait_free(struct broker *bk, struct wait *w)
{
    for (uint32_t i = 0; i < w->n; i++) {
        dispatch_pend_key_drop(bk, &w->items[i]);
        journal_publish_settled(bk->journal, &w->items[i]);
        dispatch_pending_fini(&w->items[i]);
    }
    if (w->conn) {
        conn_unref(w->conn);
    }
    pq_free(w);
}

struct wait *
dispatch_wait_new(struct conn *c, uint64_t rid, enum wait_kind kind, uint32_t n)
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

void
dispatch_wait_enqueue(struct broker *bk, struct wait *w, uint64_t lsn)
{
    journal_urgent(bk->journal); /* someone waits: sync it as soon as written */
    w->lsn = lsn;
    if (bk->waits_tail) {
        bk->waits_tail->next = w;
    } else {
        bk->waits_head = w;
    }
    bk->waits_tail = w;
}

/* dispatch_push_pending: see dispatch_int.h. */
void
dispatch_push_pending(struct broker *bk, struct pending *p)
{
    struct msg_new mn;
    bool durable;
    int rc;

    dispatch_room_give(bk, p);
    if (p->duplicate) {
        return;
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
        if (durable && !journal_keep_body(bk->journal, &mn)) {
            mn.body = NULL; /* the pending item still owns its ref */
        }
        rc = queue_push(p->q, &mn, *bk->now_mono_ms, NULL);
        if (rc != PQ_OK && durable) {
            /* On disk but not in memory (out of memory): keep its
             * segment for the life of this process, so the record is
             * not deleted and a restart brings the message back. */
            journal_pin(bk->journal, &mn);
            log_err("queue %s: message %llu is stored but could not be "
                    "queued (%s); it is delivered after a restart",
                    queue_name(p->q), (unsigned long long)p->mn.id,
                    pq_strerror(rc));
        } else if (rc != PQ_OK) {
            log_warn("queue %s: message %llu not queued: %s", queue_name(p->q),
                     (unsigned long long)p->mn.id, pq_strerror(rc));
        } else if (durable) {
            journal_msg_stored(bk->journal, &mn);
        }
    }
}

/* Push the messages of a durable publish and answer PublishOk. */
void
dispatch_complete_publish(struct broker *bk, struct wait *w)
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

        if (ids) {
            ids[i] = p->mn.id;
        }
        if (dups) {
            dups[i] = p->duplicate;
        }
        any_dup |= p->duplicate;
        dispatch_push_pending(bk, p);
    }
    if (w->conn && conn_is_open(w->conn)) {
        if (ids == NULL || dups == NULL) {
            dispatch_reply_err(w->conn, w->request_id, PQ_ENOMEM,
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
fail_wait(struct broker *bk, struct wait *w, int status)
{
    for (uint32_t i = 0; i < w->n; i++) {
        dispatch_room_give(bk, &w->items[i]);
    }
    if (w->kind == WAIT_PUBLISH) {
        bk->stats.disk_full_refusals++;
    }
    if (w->conn && conn_is_open(w->conn)) {
        dispatch_reply_err(
            w->conn, w->request_id, status,
            status == PQ_ENOSPC
                ? "not stored: the data disk is full; retry later"
                : "not stored: %s",
            pq_strerror(status));
    }
}

/* journal_done callback: every wait up to upto_lsn is settled. */
static void
settle_waits(void *arg, uint64_t upto_lsn, int status)
{
    struct broker *bk = arg;
    uint64_t confirmed = 0;
    struct wait *w;

    if (status == PQ_EIO || (status != PQ_OK && status != PQ_ENOSPC)) {
        /* Never confirm after a failed fsync: stop, let systemd restart us
         * and recovery decide what is on disk. */
        log_err("storage failed (%s); stopping without confirming anything "
                "more",
                pq_strerror(status));
        bk->exit_code = EX_IOERR;
        bk->stop(bk->owner);
        return;
    }
    bk->stats.batches_durable++;
    while ((w = bk->waits_head) != NULL && w->lsn <= upto_lsn) {
        bk->waits_head = w->next;
        if (bk->waits_head == NULL) {
            bk->waits_tail = NULL;
        }
        if (status != PQ_OK) {
            fail_wait(bk, w, status);
        } else if (w->kind == WAIT_PUBLISH) {
            confirmed += w->n;
            dispatch_complete_publish(bk, w);
        } else if (w->kind == WAIT_ACK) {
            dispatch_complete_ack(bk, w);
        } else if (w->conn && conn_is_open(w->conn)) {
            dispatch_reply_ok(w->conn, w->request_id, w->count);
        }
        dispatch_wait_free(bk, w);
    }
    if (confirmed > 0) {
        histo_add(&bk->stats.commit_msgs, HISTO_BATCH_MSGS, confirmed);
    }
}

/*
 * finish: answer a request whose change was journaled up to lsn (0: nothing
 * journaled, answer now). Waits are FIFO in LSN order; an lsn-0 request
 * that arrives behind a waiting one is answered at once, which is fine:
 * replies are matched by request_id.
 */
void
dispatch_finish_ok(struct conn *c, uint64_t rid, uint64_t lsn, uint64_t count)
{
    struct broker *bk = broker_of(c);
    struct wait *w;

    if (lsn == 0) {
        dispatch_reply_ok(c, rid, count);
        return;
    }
    w = dispatch_wait_new(c, rid, WAIT_OK, 0);
    if (w == NULL) {
        dispatch_reply_err(c, rid, PQ_ENOMEM,
                           "applied, but out of memory for the reply");
        return;
    }
    w->count = count;
    dispatch_wait_enqueue(bk, w, lsn);
}

struct mark
dispatch_mark_now(struct broker *bk)
{
    struct mark m = {journal_last_lsn(bk->journal),
                     journal_errors(bk->journal, NULL)};
    return m;
}

/*
 * dispatch_finish_since: answer a request that changed state through queue
 * events, which journal whatever records they need: Ok once everything appended
 * since the mark is durable (at once if nothing was), or an Error if a
 * record could not be written (never an Ok for what is not on disk).
 */
void
dispatch_finish_since(struct conn *c, uint64_t rid, struct mark before)
{
    int last;
    uint64_t lsn = journal_last_lsn(broker_of(c)->journal);

    if (journal_errors(broker_of(c)->journal, &last) != before.errors) {
        dispatch_reply_err(c, rid, last,
                           "applied in memory, but not recorded in the "
                           "log (%s); after a restart it is undone",
                           pq_strerror(last));
        return;
    }
    dispatch_finish_ok(c, rid, lsn != before.lsn ? lsn : 0, 0);
}

/* ---- authentication and permissions ---- */

/* c's token in the live table (found again after a reload): NULL when a
 * reload removed or changed it. Only called with an auth table. */
static const struct auth_token *
current_token(struct conn *c)
{
    struct broker *bk = broker_of(c);

    if (c->auth_gen != bk->auth_gen) {
        c->auth_tok = auth_find(bk->auth, c->auth_name, c->auth_hash);
        c->auth_gen = bk->auth_gen;
    }
    return c->auth_tok;
}

/* current_token, and a revoked token closes c UNAUTHORIZED (NULL then). */
static const struct auth_token *
live_token(struct conn *c, uint64_t rid)
{
    const struct auth_token *tok = current_token(c);

    if (tok == NULL) {
        broker_of(c)->stats.auth_failures++;
        conn_fatal(c, rid, PROTOQ__ERROR_CODE__UNAUTHORIZED,
                   "token %s is no longer valid (auth_file reloaded)",
                   c->auth_name);
    }
    return tok;
}

/* dispatch_auth_recheck: see dispatch.h. */
void
dispatch_auth_recheck(struct broker *bk, struct conn *c)
{
    if (bk->auth != NULL && c->state == CONN_READY) {
        (void)live_token(c, 0);
    }
}

/* dispatch_may: see dispatch_int.h. */
bool
dispatch_may(struct conn *c, unsigned perms, const char *queue)
{
    const struct auth_token *tok;

    if (broker_of(c)->auth == NULL) {
        return true;
    }
    tok = current_token(c);
    return tok != NULL && auth_allows(tok, perms, queue ? queue : "");
}

/* dispatch_allow: see dispatch_int.h. */
bool
dispatch_allow(struct conn *c, uint64_t rid, unsigned perms, const char *queue,
               const char *what)
{
    struct broker *bk = broker_of(c);
    const struct auth_token *tok;

    if (bk->auth == NULL) {
        return true;
    }
    tok = live_token(c, rid);
    if (tok == NULL) {
        return false;
    }
    if (auth_allows(tok, perms, queue ? queue : "")) {
        return true;
    }
    conn_send_error(c, rid, PROTOQ__ERROR_CODE__FORBIDDEN,
                    "%s %s: token %s lacks %s permission on this queue", what,
                    queue ? queue : "", auth_token_name(tok),
                    auth_perm_name(perms));
    return false;
}

/* Hello's token against the table; false when c was refused (and closed). */
static bool
authenticate(struct conn *c, uint64_t rid, const char *token)
{
    struct broker *bk = broker_of(c);
    const struct auth_token *tok;

    if (bk->auth == NULL) {
        return true; /* a token sent anyway is ignored */
    }
    tok = auth_lookup(bk->auth, token);
    if (tok == NULL) {
        bk->stats.auth_failures++;
        /* conn_fatal logs the refusal with the peer's address */
        conn_fatal(c, rid, PROTOQ__ERROR_CODE__UNAUTHORIZED,
                   "%s auth token: this broker needs a valid one in Hello",
                   token && token[0] ? "unknown" : "no");
        return false;
    }
    c->auth_tok = tok;
    c->auth_gen = bk->auth_gen;
    snprintf(c->auth_name, sizeof(c->auth_name), "%s", auth_token_name(tok));
    memcpy(c->auth_hash, auth_token_hash(tok), AUTH_HASH_BYTES);
    return true;
}

/* ---- handshake ---- */

static void
on_hello(struct conn *c, uint64_t rid, const Protoq__Hello *h)
{
    struct broker *bk = broker_of(c);
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Welcome w = PROTOQ__WELCOME__INIT;
    char broker_id[32];
    bool resumed = false;
    size_t i;

    if (h->protocol_version != PROTOQ_PROTOCOL_VERSION) {
        conn_fatal(
            c, rid, PROTOQ__ERROR_CODE__UNSUPPORTED_VERSION,
            "protocol version %u is not supported; this broker speaks %d",
            h->protocol_version, PROTOQ_PROTOCOL_VERSION);
        return;
    }
    if (!authenticate(c, rid, h->auth_token)) {
        return;
    }
    /* Keep a printable copy of the client name for logs. */
    for (i = 0; h->client_name && h->client_name[i] && i + 1 < sizeof(c->name);
         i++) {
        char ch = h->client_name[i];
        c->name[i] = (ch >= 0x20 && ch < 0x7f) ? ch : '?';
    }
    c->name[i > 0 ? i : 1] = '\0';
    c->heartbeat_ms = bk->cfg->heartbeat_ms;
    if (h->heartbeat_ms != 0 && bk->cfg->heartbeat_ms != 0 &&
        h->heartbeat_ms > bk->cfg->heartbeat_ms) {
        /* A client may ask for a slower beat, within the timeout. */
        c->heartbeat_ms = h->heartbeat_ms < bk->cfg->heartbeat_timeout_ms / 2
                              ? h->heartbeat_ms
                              : bk->cfg->heartbeat_timeout_ms / 2;
    }
    if (!dispatch_session_hello(c, rid, h, &resumed)) {
        return;
    }
    conn_set_state(c, CONN_READY);
    c->max_frame_bytes = bk->cfg->max_frame_bytes;

    snprintf(broker_id, sizeof(broker_id), "protoqd-%u", bk->port);
    w.protocol_version = PROTOQ_PROTOCOL_VERSION;
    w.broker_id = broker_id;
    w.server_version = PROTOQ_VERSION;
    w.max_frame_bytes = bk->cfg->max_frame_bytes;
    w.max_message_bytes = bk->cfg->max_message_bytes;
    w.heartbeat_ms = c->heartbeat_ms;
    w.max_batch = bk->cfg->max_batch;
    w.session_resumed = resumed;
    w.disconnect_grace_ms = bk->cfg->disconnect_grace_ms;
    f.request_id = rid;
    f.kind_case = PROTOQ__FRAME__KIND_WELCOME;
    f.welcome = &w;
    conn_send(c, &f);
    if (resumed) {
        dispatch_session_cancels(c);
    }
    log_debug("conn %llu %s: hello from \"%s\"%s%s", (unsigned long long)c->id,
              c->peer, c->name, bk->auth ? ", token " : "",
              bk->auth ? c->auth_name : "");
}

/* ---- the frame switch ---- */

void
dispatch_frame(void *arg, struct conn *c, const Protoq__Frame *f)
{
    uint64_t rid = f->request_id;

    (void)arg;
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
        dispatch_on_queue_create(c, rid, f->queue_create);
        break;
    case PROTOQ__FRAME__KIND_QUEUE_DELETE:
        dispatch_on_queue_delete(c, rid, f->queue_delete);
        break;
    case PROTOQ__FRAME__KIND_QUEUE_PURGE:
        dispatch_on_queue_purge(c, rid, f->queue_purge);
        break;
    case PROTOQ__FRAME__KIND_QUEUE_LIST:
        dispatch_on_queue_list(c, rid);
        break;
    case PROTOQ__FRAME__KIND_QUEUE_STAT:
        dispatch_on_queue_stat(c, rid, f->queue_stat);
        break;
    case PROTOQ__FRAME__KIND_PUBLISH:
        dispatch_publish(c, rid, &f->publish, 1);
        break;
    case PROTOQ__FRAME__KIND_PUBLISH_BATCH:
        dispatch_publish(c, rid, f->publish_batch->items,
                         f->publish_batch->n_items);
        break;
    case PROTOQ__FRAME__KIND_SUBSCRIBE:
        dispatch_on_subscribe(c, rid, f->subscribe);
        break;
    case PROTOQ__FRAME__KIND_UNSUBSCRIBE:
        dispatch_on_unsubscribe(c, rid, f->unsubscribe);
        break;
    case PROTOQ__FRAME__KIND_FLOW:
        dispatch_on_flow(c, rid, f->flow);
        break;
    case PROTOQ__FRAME__KIND_ACK:
        dispatch_on_ack(c, rid, f->ack);
        break;
    case PROTOQ__FRAME__KIND_NACK:
        dispatch_on_nack(c, rid, f->nack);
        break;
    case PROTOQ__FRAME__KIND_TOUCH:
        dispatch_on_touch(c, rid, f->touch);
        break;
    case PROTOQ__FRAME__KIND_RELEASE:
        dispatch_on_release(c, rid, f->release);
        break;
    case PROTOQ__FRAME__KIND_CANCEL:
        dispatch_on_cancel(c, rid, f->cancel);
        break;
    case PROTOQ__FRAME__KIND_ROUTE_BIND:
        if (dispatch_allow(c, rid, AUTH_MANAGE, f->route_bind->queue,
                           "route bind")) {
            dispatch_on_route_bind(c, rid, f->route_bind);
        }
        break;
    case PROTOQ__FRAME__KIND_ROUTE_UNBIND:
        if (dispatch_allow(c, rid, AUTH_MANAGE, f->route_unbind->queue,
                           "route unbind")) {
            dispatch_on_route_unbind(c, rid, f->route_unbind);
        }
        break;
    case PROTOQ__FRAME__KIND_ROUTE_LIST:
        dispatch_on_route_list(c, rid);
        break;
    case PROTOQ__FRAME__KIND_JOB_GET:
        dispatch_on_job_get(c, rid, f->job_get);
        break;
    case PROTOQ__FRAME__KIND_JOB_LIST:
        dispatch_on_job_list(c, rid, f->job_list);
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
    case PROTOQ__FRAME__KIND_ROUTE_LIST_OK:
    case PROTOQ__FRAME__KIND_JOB_INFO:
    case PROTOQ__FRAME__KIND_JOB_LIST_OK:
    case PROTOQ__FRAME__KIND_ACK_OK:
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
    struct broker *bk = arg;
    struct wait *notice = NULL;
    struct mark before;
    int rc;

    if (ev->type == QEV_READY) {
        dispatch_mark_dirty(bk, ev->q);
        return;
    }
    if (ev->type == QEV_DROP && ev->detail) {
        log_warn("queue %s: message %llu dropped (%s): %s", queue_name(ev->q),
                 (unsigned long long)ev->m->id, qreason_name(ev->reason),
                 ev->detail);
    }
    before = dispatch_mark_now(bk);
    dispatch_qevent_notice(bk, ev, &notice);
    rc = journal_qevent(bk->journal, ev, *bk->now_mono_ms,
                        notice ? notice->items : NULL, notice ? notice->n : 0);
    if (notice != NULL && rc == PQ_OK) {
        dispatch_wait_after(bk, notice, before);
    } else if (notice != NULL) {
        /* not on disk with the job's end: not sent either */
        dispatch_wait_free(bk, notice);
    }
    if (ev->type == QEV_REQUEUE || ev->type == QEV_DEAD_LETTER) {
        dispatch_mark_dirty(bk, ev->q);
    }
    if (ev->type == QEV_DROP || ev->type == QEV_REQUEUE ||
        ev->type == QEV_DEAD_LETTER) {
        /* The holder (if any) got credit back. */
        if (ev->from) {
            dispatch_mark_dirty(bk, ev->from);
        }
    }
}

int
dispatch_open(struct broker *bk, char *err, size_t errlen)
{
    struct journal_config jc;
    struct queue_defaults d;
    int rc;

    hmap_u64_init(&bk->dirty_set);
    hmap_u64_init(&bk->pending_room);
    hmap_u64_init(&bk->loading);
    hmap_str_init(&bk->pending_keys);
    hmap_str_init(&bk->sessions);
    bk->store_fd = -1;
    queue_defaults_init(&d);
    d.ack_timeout_ms = bk->cfg->ack_timeout_ms;
    d.max_attempts = bk->cfg->max_attempts;
    d.backoff_base_ms = bk->cfg->backoff_base_ms;
    d.backoff_cap_ms = bk->cfg->backoff_cap_ms;
    d.dedup_window_ms = bk->cfg->dedup_window_ms;
    d.max_lease_ms = bk->cfg->max_lease_ms;
    bk->qs = qset_new(&d);
    if (bk->qs == NULL) {
        snprintf(err, errlen, "out of memory");
        return PQ_ENOMEM;
    }
    qset_seed(bk->qs, clock_mono_ms() ^ (uint64_t)getpid());
    jc.data_dir = bk->cfg->data_dir;
    jc.fsync = bk->cfg->fsync;
    jc.fsync_interval_ms = bk->cfg->fsync_interval_ms;
    jc.segment_bytes = bk->cfg->segment_bytes;
    jc.payload_budget_bytes = bk->cfg->payload_budget_bytes;
    bk->routes = routes_new();
    if (bk->routes == NULL) {
        snprintf(err, errlen, "out of memory");
        return PQ_ENOMEM;
    }
    jc.routes = bk->routes;
    rc = journal_open(&jc, bk->qs, &bk->journal, err, errlen);
    if (rc != PQ_OK) {
        return rc;
    }
    bk->next_msg_id = journal_next_id(bk->journal);
    bk->store_fd = journal_event_fd(bk->journal);
    qset_set_listener(bk->qs, on_qevent, bk);
    /* replay may have taken a while: the clock, not the loop's "now" */
    journal_resume(bk->journal, clock_mono_ms());
    return PQ_OK;
}

bool
dispatch_pass(struct broker *bk)
{
    bool more = false;
    uint32_t n = bk->ndirty;

    dispatch_run_later(bk);
    /* Deliver for queues marked dirty before this pass; queues marked
     * during it are handled next pass. */
    for (uint32_t i = 0; i < n; i++) {
        struct queue *q = bk->dirty[i];

        hmap_u64_del(&bk->dirty_set, (uint64_t)(uintptr_t)q);
        bk->dirty[i] = NULL;
        if (dispatch_deliver(bk, q)) {
            dispatch_mark_dirty(bk, q);
        }
    }
    if (n > 0) {
        uint32_t rest = bk->ndirty - n;
        memmove(bk->dirty, bk->dirty + n, rest * sizeof(*bk->dirty));
        bk->ndirty = rest;
    }
    more = bk->ndirty > 0;
    journal_submit(bk->journal);
    return more;
}

void
dispatch_store_event(struct broker *bk)
{
    journal_reap(bk->journal, settle_waits, bk);
    dispatch_reap_loads(bk);
}

void
dispatch_housekeeping(struct broker *bk)
{
    journal_compact(bk->journal, *bk->now_mono_ms);
    dispatch_session_housekeeping(bk);
}

void
dispatch_tick(struct broker *bk)
{
    qset_tick(bk->qs, *bk->now_mono_ms);
    dispatch_session_tick(bk);
}

uint64_t
dispatch_next_deadline(const struct broker *bk)
{
    uint64_t q = qset_next_deadline(bk->qs);
    uint64_t s = dispatch_session_deadline(bk);

    return q < s ? q : s;
}

void
dispatch_close(struct broker *bk)
{
    struct wait *w;

    /* Held deliveries go back (released: a clean stop) while the log is
     * still open to record it. */
    dispatch_session_close_all(bk);
    journal_close(bk->journal);
    bk->journal = NULL;
    bk->store_fd = -1;
    /* Whatever is still waiting was never confirmed; drop it silently. */
    while ((w = bk->waits_head) != NULL) {
        bk->waits_head = w->next;
        dispatch_wait_free(bk, w);
    }
    bk->waits_tail = NULL;
    while ((w = bk->later_head) != NULL) {
        bk->later_head = w->next;
        dispatch_wait_free(bk, w);
    }
    bk->later_tail = NULL;
    {
        size_t it = 0;
        void *r;

        while ((r = hmap_u64_next(&bk->pending_room, &it, NULL)) != NULL) {
            pq_free(r);
        }
        hmap_u64_fini(&bk->pending_room);
    }
    hmap_str_fini(&bk->pending_keys); /* entries went with their waits */
    dispatch_drop_loads(bk);
    pq_free(bk->dirty);
    bk->dirty = NULL;
    bk->ndirty = bk->dirty_cap = 0;
    hmap_u64_fini(&bk->dirty_set);
    qset_free(bk->qs);
    bk->qs = NULL;
    routes_free(bk->routes);
    bk->routes = NULL;
}
