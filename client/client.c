/*
 * client.c: libprotoq, the blocking C client of protoqd (API in protoq.h):
 * the connection itself. client_int.h lists the other files.
 *
 * One handle owns one non-blocking TCP socket and two byte buffers. Output:
 * frames are packed straight into c->out and written in large chunks (on a
 * flush, on a blocking call, or when OUT_FLUSH_BYTES have piled up), so a
 * pipelined producer pays one write() per many publishes. Input: read in
 * large chunks into c->in and cut into frames with the shared codec
 * (frame_check_header against the broker's limit, frame_unpack with
 * frame_decode_budget); nothing is allocated for a frame before its length
 * was checked.
 *
 * Requests that expect a reply sit in a ring keyed by request_id (slot =
 * id & mask; the ring doubles when a new id would land on a slot still in
 * use), so matching a reply is O(1) whatever order replies come in
 * (PublishOk waits for fsync and may overtake nothing or everything).
 * Requests without a reply (unconfirmed ack/nack/release) take an id but no
 * slot; an Error for such an id is an "async error".
 *
 * Re-entrancy: callbacks may call back into the handle (ack, or even a
 * blocking request). Callbacks never nest: a frame that needs a user
 * callback (Deliver, CancelRequested, a confirm, an async Error) goes on the
 * handle's FIFO c->dq, and only the outermost dispatch (c->cb_depth == 0)
 * runs it. A blocking call made from a callback still gets its own reply
 * (replies to waiters are handled at once), while the deliveries that
 * arrive meanwhile wait their turn, so the stack stays one callback deep
 * however many messages flow (the FIFO is bounded by the subscription's
 * credit and the outstanding publishes). All parsing state lives in the
 * handle (c->in_start), and every frame is unpacked into its own
 * allocation, so a nested call may read, compact and dispatch freely. A
 * blocking call's waiter lives on its stack frame and is detached from the
 * ring when the call gives up.
 *
 * Invariants: the library never prints, never exits, keeps no globals, and
 * never keeps a pointer into an unpacked frame past the function that
 * handles it. A connection failure marks the handle dead (c->dead), fails
 * every outstanding request, and is sticky, except on a reconnecting handle
 * (protoq_opts.reconnect): there it is also "down" (c->down), the old
 * connection's state is dropped at once (conn_drop), and the entry points
 * (client_pump, client_revive) connect again with client_conn_open, the
 * same path as protoq_connect (one handshake builds every Hello), and
 * subscribe again (reconnect_once).
 */
#include "client_int.h"
#include "clock.h"

#include <errno.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static void conn_drop(protoq_client *c);

/* ---- small helpers ---- */

static int64_t
now_ms(void)
{
    return (int64_t)clock_mono_ms();
}

/* Remaining ms until deadline (-1 = none), never below 0. */
int
client_remaining_ms(int64_t deadline)
{
    int64_t left;

    if (deadline < 0) {
        return -1;
    }
    left = deadline - now_ms();
    if (left < 0) {
        return 0;
    }
    return left > 0x7fffffff ? 0x7fffffff : (int)left;
}

int64_t
client_deadline_after(int timeout_ms)
{
    return timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
}

/* Record a local failure: code err, message fmt. Returns err. */
int
client_set_err(protoq_client *c, int err, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(c->errmsg, sizeof(c->errmsg), fmt, ap);
    va_end(ap);
    c->last_code = 0;
    return err;
}

/* Record an Error frame's contents. Returns PQ_EREMOTE. */
static int
set_remote_err(protoq_client *c, const Protoq__Error *e)
{
    int code = e ? (int)e->code : 0;
    const char *msg = e && e->message ? e->message : "";

    if (msg[0] == '\0') {
        msg = protoq_code_name(code);
    }
    snprintf(c->errmsg, sizeof(c->errmsg), "%s", msg);
    c->last_code = code;
    return PQ_EREMOTE;
}

/* The failure to report when c is dead. */
int
client_dead_err(protoq_client *c)
{
    snprintf(c->errmsg, sizeof(c->errmsg), "%s", c->dead_msg);
    return c->dead;
}

void
client_copy_str(char *dst, size_t cap, const char *src)
{
    snprintf(dst, cap, "%s", src ? src : "");
}

bool
client_name_ok(protoq_client *c, const char *what, const char *name)
{
    size_t n;

    if (name == NULL || name[0] == '\0') {
        client_set_err(c, PQ_EINVAL, "%s name is empty", what);
        return false;
    }
    n = strlen(name);
    if (n > PROTOQ_NAME_MAX) {
        client_set_err(c, PQ_EINVAL, "%s name is %zu bytes (at most %d)", what,
                       n, PROTOQ_NAME_MAX);
        return false;
    }
    return true;
}

/* ---- the pending-request ring ---- */

struct pending *
client_pend_find(protoq_client *c, uint64_t id)
{
    struct pending *p;

    if (c->pend_cap == 0 || id == 0) {
        return NULL;
    }
    p = &c->pend[id & (c->pend_cap - 1)];
    return p->id == id ? p : NULL;
}

void
client_pend_remove(protoq_client *c, struct pending *p)
{
    if (p->kind == PEND_CONFIRM) {
        c->n_confirms--;
    }
    memset(p, 0, sizeof(*p));
    c->n_pending--;
}

/* Rehash into a ring of cap slots; abandoned entries are dropped when
 * drop_ignored. Returns PQ_OK, PQ_EAGAIN when two live ids still collide
 * at this size, or PQ_ENOMEM. */
static int
pend_rehash(protoq_client *c, size_t cap, bool drop_ignored)
{
    struct pending *n = calloc(cap, sizeof(*n));
    size_t i;

    if (n == NULL) {
        return PQ_ENOMEM;
    }
    for (i = 0; i < c->pend_cap; i++) {
        struct pending *p = &c->pend[i];
        struct pending *q;

        if (p->id == 0 || (drop_ignored && p->kind == PEND_IGNORE)) {
            continue;
        }
        q = &n[p->id & (cap - 1)];
        if (q->id != 0) {
            free(n);
            return PQ_EAGAIN;
        }
        *q = *p;
    }
    if (drop_ignored) {
        c->n_pending = 0;
        for (i = 0; i < cap; i++) {
            c->n_pending += n[i].id != 0;
        }
    }
    free(c->pend);
    c->pend = n;
    c->pend_cap = cap;
    return PQ_OK;
}

/* Insert an entry for id; returns it, or NULL when out of memory. */
struct pending *
client_pend_insert(protoq_client *c, uint64_t id, enum pend_kind kind)
{
    struct pending *p;

    if (c->pend_cap == 0 && pend_rehash(c, PEND_INITIAL, false) != PQ_OK) {
        return NULL;
    }
    while (c->pend[id & (c->pend_cap - 1)].id != 0) {
        size_t cap = c->pend_cap * 2;
        int rc = PQ_EAGAIN;

        if (cap > PEND_EVICT_AT) {
            rc = pend_rehash(c, c->pend_cap, true);
            if (rc == PQ_OK && c->pend[id & (c->pend_cap - 1)].id == 0) {
                break;
            }
        }
        while ((rc = pend_rehash(c, cap, false)) == PQ_EAGAIN) {
            cap *= 2;
        }
        if (rc != PQ_OK) {
            return NULL;
        }
    }
    p = &c->pend[id & (c->pend_cap - 1)];
    p->id = id;
    p->kind = kind;
    c->n_pending++;
    if (kind == PEND_CONFIRM) {
        c->n_confirms++;
    }
    return p;
}

/* Fail every outstanding request with err (the connection is gone). */
static void
pend_fail_all(protoq_client *c, int err)
{
    size_t i;

    for (i = 0; i < c->pend_cap && c->n_pending > 0; i++) {
        struct pending p = c->pend[i];

        if (p.id == 0) {
            continue;
        }
        client_pend_remove(c, &c->pend[i]);
        if (p.kind == PEND_SYNC) {
            p.w->done = true;
            p.w->err = err;
        } else if (p.kind == PEND_CONFIRM && p.cb != NULL) {
            snprintf(c->errmsg, sizeof(c->errmsg), "%s", c->dead_msg);
            c->last_code = 0;
            p.cb(p.arg, err, 0, false);
        }
    }
}

/* client_conn_fail: see client_int.h. */
int
client_conn_fail(protoq_client *c, int err, const char *fmt, ...)
{
    va_list ap;

    if (c->dead) {
        return client_dead_err(c);
    }
    va_start(ap, fmt);
    vsnprintf(c->dead_msg, sizeof(c->dead_msg), fmt, ap);
    va_end(ap);
    c->dead = err;
    c->out_start = c->out_len = 0;
    pend_fail_all(c, err);
    if (c->can_reconnect) {
        conn_drop(c);
        if (!c->in_reconnect && !c->down) {
            c->down = true;
            c->retry_at_ms = now_ms() + backoff_next(&c->backoff);
            client_defer_event(c, PROTOQ_CONN_LOST, err, 0);
        }
    }
    return client_dead_err(c);
}

/* ---- output ---- */

static int
out_reserve(protoq_client *c, size_t n)
{
    size_t cap;
    uint8_t *p;

    if (c->out_start > 0 && c->out_start == c->out_len) {
        c->out_start = c->out_len = 0;
    }
    if (c->out_cap - c->out_len >= n) {
        return PQ_OK;
    }
    if (c->out_start > 0) {
        memmove(c->out, c->out + c->out_start, c->out_len - c->out_start);
        c->out_len -= c->out_start;
        c->out_start = 0;
        if (c->out_cap - c->out_len >= n) {
            return PQ_OK;
        }
    }
    cap = c->out_cap ? c->out_cap : 64 * 1024;
    while (cap - c->out_len < n) {
        cap *= 2;
    }
    p = realloc(c->out, cap);
    if (p == NULL) {
        return client_set_err(c, PQ_ENOMEM, "out of memory (output buffer)");
    }
    c->out = p;
    c->out_cap = cap;
    return PQ_OK;
}

/* One send() of up to len bytes, or one TLS record: bytes written (> 0),
 * 0 when the socket is full, or a connection error. */
static ssize_t
send_some(protoq_client *c, const uint8_t *buf, size_t len)
{
    char msg[256];
    ssize_t n;

    if (c->ssl != NULL) {
        n = client_tls_write(c, buf, len, msg, sizeof(msg));
        if (n < 0) {
            return client_conn_fail(c, (int)n, "write to broker failed: %s",
                                    msg);
        }
        return n;
    }
    for (;;) {
        n = send(c->fd, buf, len, MSG_NOSIGNAL);
        if (n >= 0) {
            return n;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            return 0;
        }
        if (errno != EINTR) {
            return client_conn_fail(c, PQ_ECLOSED, "write to broker failed: %s",
                                    strerror(errno));
        }
    }
}

/* Write pending output until done or the socket is full. Returns PQ_OK
 * (some or none written) or a connection error. */
static int
out_write(protoq_client *c)
{
    while (c->out_start < c->out_len) {
        ssize_t n =
            send_some(c, c->out + c->out_start, c->out_len - c->out_start);

        if (n < 0) {
            return (int)n;
        }
        if (n == 0) {
            return PQ_OK;
        }
        c->out_start += (size_t)n;
        c->last_send_ms = now_ms();
    }
    c->out_start = c->out_len = 0;
    return PQ_OK;
}

/* ---- input ---- */

/* Make room for at least want more bytes after in_end. */
static int
in_reserve(protoq_client *c, size_t want)
{
    size_t used = c->in_end - c->in_start;
    size_t cap;
    uint8_t *p;

    if (c->in_start == c->in_end) {
        c->in_start = c->in_end = 0;
    }
    if (c->in_cap - c->in_end >= want) {
        return PQ_OK;
    }
    if (c->in_start > 0) {
        memmove(c->in, c->in + c->in_start, used);
        c->in_start = 0;
        c->in_end = used;
        if (c->in_cap - c->in_end >= want) {
            return PQ_OK;
        }
    }
    cap = c->in_cap ? c->in_cap : IN_INITIAL;
    while (cap - c->in_end < want) {
        cap *= 2;
    }
    p = realloc(c->in, cap);
    if (p == NULL) {
        return client_conn_fail(c, PQ_ENOMEM, "out of memory (input buffer)");
    }
    c->in = p;
    c->in_cap = cap;
    return PQ_OK;
}

/* TLS: read records while the SSL holds decrypted bytes and there is
 * room, so that none wait where poll() cannot see them. */
static ssize_t
in_read_tls(protoq_client *c)
{
    char msg[256];
    ssize_t total = 0;

    do {
        ssize_t n = client_tls_read(c, c->in + c->in_end, c->in_cap - c->in_end,
                                    msg, sizeof(msg));

        if (n < 0) {
            return client_conn_fail(c, (int)n,
                                    n == PQ_ECLOSED ? "%s"
                                                    : "read from broker "
                                                      "failed: %s",
                                    msg);
        }
        if (n == 0) {
            break;
        }
        c->in_end += (size_t)n;
        c->last_recv_ms = now_ms();
        total += n;
    } while (c->in_end < c->in_cap && client_tls_pending(c));
    return total;
}

/* One read() into the input buffer. Returns bytes read (0 when none were
 * ready) or a connection error. */
static ssize_t
in_read(protoq_client *c)
{
    ssize_t n;
    int rc = in_reserve(c, IN_READ_MIN);

    if (rc != PQ_OK) {
        return rc;
    }
    if (c->ssl != NULL) {
        return in_read_tls(c);
    }
    for (;;) {
        n = recv(c->fd, c->in + c->in_end, c->in_cap - c->in_end, 0);
        if (n > 0) {
            c->in_end += (size_t)n;
            c->last_recv_ms = now_ms();
            return n;
        }
        if (n == 0) {
            return client_conn_fail(c, PQ_ECLOSED,
                                    "connection closed by broker");
        }
        if (errno == EINTR) {
            continue;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            return 0;
        }
        return client_conn_fail(c, PQ_ECLOSED, "read from broker failed: %s",
                                strerror(errno));
    }
}

/* ---- dispatching incoming frames ---- */

/* Convert n wire key/values into kv (which has room for n). */
static void
kv_from_wire(struct protoq_kv *kv, Protoq__KeyValue *const *w, size_t n)
{
    size_t i;

    for (i = 0; i < n; i++) {
        kv[i].key = w[i]->key ? w[i]->key : "";
        kv[i].value = w[i]->value ? w[i]->value : "";
    }
}

/* The subscription of a Deliver: by the current connection's id. */
static struct sub *
sub_find_wire(protoq_client *c, uint64_t wire_id)
{
    size_t i;

    for (i = 0; i < c->n_subs && wire_id != 0; i++) {
        if (c->subs[i].wire_id == wire_id) {
            return &c->subs[i];
        }
    }
    return NULL;
}

/* The subscription the caller knows as id. */
struct sub *
client_sub_find(protoq_client *c, uint64_t id)
{
    size_t i;

    for (i = 0; i < c->n_subs; i++) {
        if (c->subs[i].id == id) {
            return &c->subs[i];
        }
    }
    return NULL;
}

/* Forget subscription id (nothing is sent). */
void
client_sub_forget(protoq_client *c, uint64_t id)
{
    struct sub *s = client_sub_find(c, id);

    if (s != NULL) {
        free(s->queue);
        free(s->tags);
        *s = c->subs[--c->n_subs];
    }
}

/* Keep queue, prefetch and tags of sub id for a reconnect: one allocation
 * for the strings (queue first), one for the pairs. */
int
client_sub_remember(protoq_client *c, uint64_t id, const char *queue,
                    uint32_t prefetch, const struct protoq_kv *tags,
                    size_t n_tags)
{
    struct sub *s = client_sub_find(c, id);
    size_t len = strlen(queue) + 1;
    size_t i;
    char *p;

    if (s == NULL || !c->can_reconnect) {
        return PQ_OK;
    }
    for (i = 0; i < n_tags; i++) {
        len += strlen(tags[i].key) + strlen(tags[i].value) + 2;
    }
    s->queue = malloc(len);
    s->tags = n_tags ? calloc(n_tags, sizeof(*s->tags)) : NULL;
    if (s->queue == NULL || (n_tags > 0 && s->tags == NULL)) {
        return client_set_err(c, PQ_ENOMEM, "out of memory (subscription)");
    }
    p = stpcpy(s->queue, queue) + 1;
    for (i = 0; i < n_tags; i++) {
        s->tags[i].key = p;
        p = stpcpy(p, tags[i].key) + 1;
        s->tags[i].value = p;
        p = stpcpy(p, tags[i].value) + 1;
    }
    s->n_tags = n_tags;
    s->prefetch = prefetch;
    return PQ_OK;
}

static int
sub_add(protoq_client *c, uint64_t id, protoq_deliver_fn cb, void *arg)
{
    struct sub *s = client_sub_find(c, id);

    if (s == NULL) {
        if (c->n_subs == c->subs_cap) {
            size_t cap = c->subs_cap ? c->subs_cap * 2 : 4;
            struct sub *n = realloc(c->subs, cap * sizeof(*n));

            if (n == NULL) {
                return PQ_ENOMEM;
            }
            c->subs = n;
            c->subs_cap = cap;
        }
        s = &c->subs[c->n_subs++];
        memset(s, 0, sizeof(*s));
    }
    s->id = id;
    s->wire_id = id;
    s->cb = cb;
    s->arg = arg;
    return PQ_OK;
}

/* Run the subscription's callback for a Deliver. Returns 1 if a callback
 * ran, 0 if not, or PQ_ENOMEM. */
static int
on_deliver(protoq_client *c, const Protoq__Deliver *d)
{
    struct protoq_kv stack_kv[KV_STACK];
    struct protoq_kv *kv = stack_kv;
    struct protoq_delivery dv;
    const Protoq__Message *m = d->message;
    struct sub *s = sub_find_wire(c, d->subscription_id);
    protoq_deliver_fn cb;
    void *arg;

    if (s == NULL) {
        c->dropped_deliveries++;
        return 0;
    }
    cb = s->cb; /* s may move if the callback subscribes */
    arg = s->arg;
    memset(&dv, 0, sizeof(dv));
    dv.subscription_id = s->id;
    dv.queue = d->queue ? d->queue : "";
    dv.message_id = d->message_id;
    dv.attempt = d->attempt;
    dv.lease_ms = d->lease_ms;
    dv.published_at_ms = d->published_at_ms;
    dv.correlation_id = "";
    dv.reply_to = "";
    dv.idempotency_key = "";
    dv.progress.text = "";
    dv.progress.checkpoint = "";
    if (m != NULL) {
        dv.payload = m->payload.data;
        dv.len = m->payload.len;
        if (m->n_headers > KV_STACK) {
            kv = malloc(m->n_headers * sizeof(*kv));
            if (kv == NULL) {
                return PQ_ENOMEM;
            }
        }
        kv_from_wire(kv, m->headers, m->n_headers);
        dv.headers = kv;
        dv.n_headers = m->n_headers;
        dv.priority = m->priority;
        dv.correlation_id = m->correlation_id ? m->correlation_id : "";
        dv.reply_to = m->reply_to ? m->reply_to : "";
        dv.idempotency_key = m->idempotency_key ? m->idempotency_key : "";
    }
    if (dv.payload == NULL) {
        dv.payload = "";
    }
    if (d->progress != NULL) {
        dv.has_progress = true;
        dv.progress.percent = d->progress->percent;
        dv.progress.text = d->progress->text ? d->progress->text : "";
        dv.progress.checkpoint =
            d->progress->checkpoint ? d->progress->checkpoint : "";
    }
    if (cb != NULL) {
        cb(arg, c, &dv);
    }
    if (kv != stack_kv) {
        free(kv);
    }
    return 1;
}

/* A new zeroed slot at the tail of the callback FIFO, or NULL when out of
 * memory. */
static struct deferred *
dq_push(protoq_client *c)
{
    struct deferred *d;

    if (c->dq_len == c->dq_cap) {
        size_t cap = c->dq_cap ? c->dq_cap * 2 : 64;
        struct deferred *n = malloc(cap * sizeof(*n));

        if (n == NULL) {
            return NULL;
        }
        for (size_t i = 0; i < c->dq_len; i++) {
            n[i] = c->dq[(c->dq_head + i) % c->dq_cap];
        }
        free(c->dq);
        c->dq = n;
        c->dq_cap = cap;
        c->dq_head = 0;
    }
    d = &c->dq[(c->dq_head + c->dq_len) % c->dq_cap];
    memset(d, 0, sizeof(*d));
    c->dq_len++;
    return d;
}

/* Put f on the callback FIFO (conf: its confirm entry, or NULL). Takes
 * ownership of f. Returns 0, or PQ_ENOMEM with the connection failed. */
static int
defer(protoq_client *c, Protoq__Frame *f, const struct pending *conf)
{
    struct deferred *d = dq_push(c);

    if (d == NULL) {
        frame_free(f);
        return client_conn_fail(c, PQ_ENOMEM, "out of memory (callback queue)");
    }
    d->f = f;
    if (conf != NULL) {
        d->conf = *conf;
    }
    return 0;
}

/* Queue a connection event for the conn callback. Out of memory drops it:
 * events are advisory (protoq_connected tells the same). */
int
client_defer_event(protoq_client *c, int event, int err, uint64_t sub_id)
{
    struct deferred *d = dq_push(c);

    if (d == NULL) {
        return PQ_ENOMEM;
    }
    d->event = event;
    d->err = err;
    d->sub_id = sub_id;
    d->code = event == PROTOQ_CONN_SUB_LOST ? c->last_code : 0;
    d->msg = strdup(event == PROTOQ_CONN_LOST       ? c->dead_msg
                    : event == PROTOQ_CONN_SUB_LOST ? c->errmsg
                                                    : "");
    return 0;
}

/* Free what a FIFO entry owns. */
static void
deferred_fini(struct deferred *d)
{
    frame_free(d->f);
    free(d->msg);
}

/* Run the user callback for one deferred frame. Returns 1 if a callback
 * ran, 0 if not, or PQ_ENOMEM. */
static int
run_one(protoq_client *c, const struct deferred *d)
{
    Protoq__Frame *f = d->f;
    const struct pending *e = &d->conf;

    if (f == NULL) {
        if (c->conn_cb == NULL) {
            return 0;
        }
        client_copy_str(c->errmsg, sizeof(c->errmsg), d->msg);
        c->last_code = d->code;
        c->conn_cb(c->conn_arg, c, d->event, d->err, d->sub_id);
        return 1;
    }
    if (e->kind == PEND_CONFIRM) {
        if (f->kind_case == PROTOQ__FRAME__KIND_PUBLISH_OK) {
            const Protoq__PublishOk *ok = f->publish_ok;

            e->cb(e->arg, PQ_OK, ok->n_message_ids ? ok->message_ids[0] : 0,
                  ok->n_duplicate ? ok->duplicate[0] != 0 : false);
        } else if (f->kind_case == PROTOQ__FRAME__KIND_ERROR) {
            set_remote_err(c, f->error);
            e->cb(e->arg, PQ_EREMOTE, 0, false);
        } else {
            client_set_err(c, PQ_EPROTO,
                           "unexpected reply (kind %d) to a publish",
                           (int)f->kind_case);
            e->cb(e->arg, PQ_EPROTO, 0, false);
        }
        return 1;
    }
    switch (f->kind_case) {
    case PROTOQ__FRAME__KIND_DELIVER:
        return on_deliver(c, f->deliver);
    case PROTOQ__FRAME__KIND_CANCEL_REQUESTED:
        if (c->cancel_cb != NULL) {
            const Protoq__CancelRequested *cr = f->cancel_requested;

            c->cancel_cb(c->cancel_arg, c, cr->queue ? cr->queue : "",
                         cr->message_id, cr->attempt);
            return 1;
        }
        return 0;
    case PROTOQ__FRAME__KIND_ERROR:
        if (c->error_cb != NULL) {
            set_remote_err(c, f->error);
            c->error_cb(c->error_arg, c, (int)f->error->code, c->errmsg,
                        f->request_id);
            return 1;
        }
        return 0;
    default:
        return 0;
    }
}

/* Run the deferred callbacks in arrival order, unless a callback is already
 * running (then the outermost dispatch runs them). Also after the
 * connection died: a confirm received before is still a confirm. Returns
 * callbacks run, or PQ_ENOMEM. */
static int
run_deferred(protoq_client *c)
{
    int events = 0;

    if (c->cb_depth > 0) {
        return 0;
    }
    while (c->dq_len > 0) {
        struct deferred d = c->dq[c->dq_head];
        int rc;

        c->dq_head = (c->dq_head + 1) % c->dq_cap;
        c->dq_len--;
        c->cb_depth++;
        rc = run_one(c, &d);
        c->cb_depth--;
        deferred_fini(&d);
        if (rc < 0) {
            return client_conn_fail(c, rc, "out of memory (delivery)");
        }
        events += rc;
    }
    return events;
}

/* Handle one reply to a request in the ring. Takes ownership of f. Returns
 * 0, or a PQ_* error that killed the connection. */
static int
on_reply(protoq_client *c, struct pending *p, Protoq__Frame *f)
{
    struct pending e = *p;

    client_pend_remove(c, p);
    switch (e.kind) {
    case PEND_SYNC:
        /* SubscribeOk registers the callback now, before any Deliver that
         * follows it in the same read is dispatched. */
        if (f->kind_case == PROTOQ__FRAME__KIND_SUBSCRIBE_OK &&
            e.w->sub_cb != NULL) {
            if (sub_add(c, f->subscribe_ok->subscription_id, e.w->sub_cb,
                        e.w->sub_arg) != PQ_OK) {
                e.w->err = PQ_ENOMEM;
            }
        } else if (f->kind_case == PROTOQ__FRAME__KIND_SUBSCRIBE_OK &&
                   e.w->resub_id != 0) {
            struct sub *s = client_sub_find(c, e.w->resub_id);

            if (s != NULL) {
                s->wire_id = f->subscribe_ok->subscription_id;
            }
        }
        e.w->reply = f; /* ownership passes to the waiter */
        e.w->done = true;
        return 0;
    case PEND_CONFIRM:
        if (e.cb != NULL) {
            return defer(c, f, &e);
        }
        if (f->kind_case == PROTOQ__FRAME__KIND_ERROR) {
            c->async_errors++;
        }
        break;
    default:
        break;
    }
    frame_free(f);
    return 0;
}

/* Handle one incoming frame; takes ownership of f. Frames that need a
 * user callback are deferred. Returns 0, or a PQ_* error that killed the
 * connection. */
static int
handle_frame(protoq_client *c, Protoq__Frame *f)
{
    struct pending *p;

    if (f->request_id != 0) {
        p = client_pend_find(c, f->request_id);
        if (p != NULL) {
            return on_reply(c, p, f);
        }
        if (f->kind_case == PROTOQ__FRAME__KIND_ERROR) {
            /* An Error for a request nobody waits for: an unconfirmed ack,
             * nack or release, or a call that timed out. */
            c->async_errors++;
            if (c->error_cb != NULL) {
                return defer(c, f, NULL);
            }
        }
        frame_free(f);
        return 0;
    }
    switch (f->kind_case) {
    case PROTOQ__FRAME__KIND_DELIVER:
    case PROTOQ__FRAME__KIND_CANCEL_REQUESTED:
        return defer(c, f, NULL);
    case PROTOQ__FRAME__KIND_ERROR: {
        /* request_id 0: a fatal protocol problem; the broker closes. */
        int code = (int)f->error->code;
        char msg[200];

        int rc;

        client_copy_str(msg, sizeof(msg), f->error->message);
        frame_free(f);
        rc = client_conn_fail(c, PQ_EREMOTE,
                              "broker closed the connection: %s (%s)", msg,
                              protoq_code_name(code));
        c->last_code = code;
        return rc;
    }
    default:
        /* Heartbeat, or a push this library does not know: ignore. */
        break;
    }
    frame_free(f);
    return 0;
}

/* Decode and handle every complete frame in the input buffer, then run
 * the deferred callbacks (outermost call only). Returns the number of
 * callbacks run, or a PQ_* error (the connection is dead). */
static int
dispatch_input(protoq_client *c)
{
    int events = 0, rc;

    while (!c->dead) {
        size_t avail = c->in_end - c->in_start;
        ssize_t n = frame_check_header(c->in + c->in_start, avail, c->in_limit);
        Protoq__Frame *f;

        if (n == PQ_EAGAIN) {
            break;
        }
        if (n < 0) {
            client_conn_fail(c, PQ_EPROTO,
                             n == PQ_ETOOBIG
                                 ? "broker sent a frame over %u bytes"
                                 : "broker sent a frame of length 0 (limit %u)",
                             c->in_limit);
            break;
        }
        if (avail < FRAME_HEADER_LEN + (size_t)n) {
            /* Make sure the whole frame will fit (a failure kills c). */
            in_reserve(c, FRAME_HEADER_LEN + (size_t)n - avail);
            break;
        }
        rc = frame_unpack(c->in + c->in_start + FRAME_HEADER_LEN, (size_t)n,
                          frame_decode_budget((size_t)n), &f);
        if (rc != PQ_OK) {
            client_conn_fail(c, PQ_EPROTO,
                             "broker sent a frame that does not decode (%s)",
                             pq_strerror(rc));
            break;
        }
        c->in_start += FRAME_HEADER_LEN + (size_t)n;
        if (c->in_start == c->in_end) {
            c->in_start = c->in_end = 0;
        }
        handle_frame(c, f); /* an error there killed c */
        /* Its callback runs before the next frame is decoded, so that
         * decoded frames do not pile up (a read holds hundreds: keeping
         * them all alive until the end of the read costs malloc its
         * caches). Inside a callback this only queues. */
        rc = run_deferred(c);
        events += rc > 0 ? rc : 0;
    }
    /* Also on a dead connection: a confirm received before it died is
     * still a confirm. */
    rc = run_deferred(c);
    events += rc > 0 ? rc : 0;
    if (c->dead) {
        return client_dead_err(c);
    }
    return events;
}

/* Queue a Heartbeat if nothing was sent for the agreed interval. */
static int
maybe_heartbeat(protoq_client *c)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Heartbeat hb = PROTOQ__HEARTBEAT__INIT;
    size_t n;
    int rc;

    if (c->info.heartbeat_ms == 0 || c->out_len > c->out_start ||
        now_ms() - c->last_send_ms < (int64_t)c->info.heartbeat_ms) {
        return PQ_OK;
    }
    f.kind_case = PROTOQ__FRAME__KIND_HEARTBEAT;
    f.heartbeat = &hb;
    n = frame_packed_size(&f);
    rc = out_reserve(c, n);
    if (rc != PQ_OK) {
        return rc;
    }
    c->out_len += frame_pack(&f, c->out + c->out_len);
    return out_write(c);
}

/*
 * How long poll() may sleep (-1: no limit): up to timeout, but no later
 * than our next heartbeat is due, nor than the moment the broker's silence
 * reaches c->silent_max_ms (so that check_silence() runs in time even in a
 * call that waits forever).
 */
static int
heartbeat_wait_ms(protoq_client *c, int timeout)
{
    int64_t due = INT64_MAX;

    if (c->info.heartbeat_ms != 0) {
        due = c->last_send_ms + c->info.heartbeat_ms - now_ms();
    }
    if (c->silent_max_ms != 0 &&
        c->last_recv_ms + c->silent_max_ms - now_ms() < due) {
        due = c->last_recv_ms + c->silent_max_ms - now_ms();
    }
    if (due == INT64_MAX) {
        return timeout;
    }
    if (due < 0) {
        due = 0;
    }
    if (timeout < 0 || due < timeout) {
        return (int)due;
    }
    return timeout;
}

/*
 * check_silence: fail the connection with PQ_ETIMEDOUT when the broker sent
 * nothing for c->silent_max_ms (its heartbeats stopped too): a cut without
 * FIN or RST (partition, NAT or firewall state dropped, frozen peer) is
 * noticed in seconds, not when TCP gives up, and a reconnecting handle
 * reconnects as after any loss. PQ_OK otherwise. Called only after poll()
 * found nothing to read, so bytes waiting in the socket or in the SSL are
 * never taken for silence, however long the caller stayed away from the
 * handle; nor is a whole frame waiting undispatched (a pump without
 * dispatch).
 */
static int
check_silence(protoq_client *c)
{
    size_t avail = c->in_end - c->in_start;
    int64_t silent;

    if (c->silent_max_ms == 0) {
        return PQ_OK;
    }
    if (avail > FRAME_HEADER_LEN) {
        ssize_t n = frame_check_header(c->in + c->in_start, avail, c->in_limit);

        if (n > 0 && avail >= FRAME_HEADER_LEN + (size_t)n) {
            return PQ_OK;
        }
    }
    silent = now_ms() - c->last_recv_ms;
    if (silent < c->silent_max_ms) {
        return PQ_OK;
    }
    return client_conn_fail(
        c, PQ_ETIMEDOUT,
        "no frame from the broker for %lld ms (heartbeat %u ms)",
        (long long)silent, c->info.heartbeat_ms);
}

/*
 * pump: one round of I/O. Handles frames already buffered first (without
 * waiting); otherwise writes what it can and waits up to timeout_ms for the
 * socket, then reads once. dispatch false: read into the buffer but run no
 * callbacks (used while flushing from inside a call that must not run
 * them). Returns callbacks run (>= 0) or a PQ_* connection error.
 */
int
client_pump(protoq_client *c, int timeout_ms, bool dispatch)
{
    struct pollfd pfd;
    int rc;
    int wait;

    if (c->dead) {
        if (!c->down || c->in_reconnect) {
            return client_dead_err(c);
        }
        /* Reconnecting: tell of the loss first, then wait for the
         * connection within timeout_ms. */
        rc = dispatch ? run_deferred(c) : 0;
        if (rc == 0) {
            rc = client_revive_until(c, client_deadline_after(timeout_ms));
            if (rc == PQ_ECLOSED && c->down) {
                return dispatch ? run_deferred(c) : 0;
            }
        }
        if (rc != PQ_OK) {
            return rc;
        }
    }
    if (dispatch) {
        rc = dispatch_input(c);
        if (rc != 0) {
            return rc;
        }
    }
    rc = out_write(c);
    if (rc != PQ_OK) {
        return rc;
    }
    rc = maybe_heartbeat(c);
    if (rc != PQ_OK) {
        return rc;
    }
    pfd.fd = c->fd;
    pfd.events =
        POLLIN | (c->out_len > c->out_start || c->tls_want_write ? POLLOUT : 0);
    pfd.revents = 0;
    wait = heartbeat_wait_ms(c, timeout_ms);
    if (client_tls_pending(c)) {
        /* Decrypted input waits in the SSL: poll() cannot see it. */
        rc = 1;
        pfd.revents = POLLIN;
    } else {
        rc = poll(&pfd, 1, wait);
    }
    if (c->tls_want_write && (pfd.revents & POLLOUT)) {
        pfd.revents |= POLLIN; /* the TLS read waited for this */
    }
    if (rc < 0) {
        if (errno == EINTR) {
            c->interrupted = true;
            return 0;
        }
        return client_conn_fail(c, PQ_ESYS, "poll: %s", strerror(errno));
    }
    if (pfd.revents & POLLOUT) {
        rc = out_write(c);
        if (rc != PQ_OK) {
            return rc;
        }
    }
    if (pfd.revents & (POLLIN | POLLHUP | POLLERR)) {
        ssize_t n = in_read(c);

        if (n < 0) {
            return (int)n;
        }
    } else {
        rc = check_silence(c);
        if (rc != PQ_OK) {
            return rc;
        }
    }
    return dispatch ? dispatch_input(c) : 0;
}

/* Write all pending output, bounded by the I/O timeout; reads meanwhile
 * (so a broker that writes to us while we write to it cannot deadlock us)
 * and dispatches only when dispatch is set. */
int
client_flush_all(protoq_client *c, bool dispatch)
{
    int64_t deadline = client_deadline_after(c->io_timeout_ms);
    int rc;

    rc = client_revive(c);
    if (rc != PQ_OK) {
        return rc;
    }
    rc = out_write(c);
    while (rc >= 0 && c->out_len > c->out_start) {
        int left = client_remaining_ms(deadline);

        if (left == 0) {
            return client_conn_fail(c, PQ_ETIMEDOUT,
                                    "timed out writing to the broker");
        }
        rc = client_pump(c, left, dispatch);
    }
    return rc < 0 ? rc : PQ_OK;
}

/* Pack f (request_id already set) into the output buffer; auto-flush when
 * enough piled up. Returns PQ_OK, PQ_ETOOBIG (frame over the broker's
 * limit; nothing queued), or an error. */
int
client_send_frame(protoq_client *c, Protoq__Frame *f)
{
    size_t n = frame_packed_size(f);
    int rc;

    if (n - FRAME_HEADER_LEN > c->info.max_frame_bytes) {
        client_set_err(c, PQ_ETOOBIG,
                       "request of %zu bytes is over the broker's frame "
                       "limit of %u bytes",
                       n - FRAME_HEADER_LEN, c->info.max_frame_bytes);
        /* The broker would close the connection on it, not answer: for
         * what carries messages, give the code it answers a message over
         * max_message_bytes with (what a slightly smaller one gets). */
        if (f->kind_case == PROTOQ__FRAME__KIND_PUBLISH ||
            f->kind_case == PROTOQ__FRAME__KIND_PUBLISH_BATCH ||
            f->kind_case == PROTOQ__FRAME__KIND_ACK) {
            c->last_code = PROTOQ_CODE_MESSAGE_TOO_LARGE;
        }
        return PQ_ETOOBIG;
    }
    rc = out_reserve(c, n);
    if (rc != PQ_OK) {
        return rc;
    }
    c->out_len += frame_pack(f, c->out + c->out_len);
    if (c->out_len - c->out_start >= OUT_FLUSH_BYTES) {
        return client_flush_all(c, false);
    }
    return PQ_OK;
}

/*
 * request: send f and wait for its reply, bounded by the I/O timeout. On
 * PQ_OK *reply holds the reply frame (of kind want; free with frame_free).
 * An Error reply gives PQ_EREMOTE with the code and text recorded. w may
 * carry a subscribe hook; NULL for none.
 */
int
client_request_w(protoq_client *c, Protoq__Frame *f,
                 Protoq__Frame__KindCase want, Protoq__Frame **reply,
                 struct waiter *w)
{
    struct pending *p;
    int64_t deadline;
    uint64_t id;
    int rc;

    *reply = NULL;
    rc = client_revive(c);
    if (rc != PQ_OK) {
        return rc;
    }
    id = c->next_id++;
    f->request_id = id;
    p = client_pend_insert(c, id, PEND_SYNC);
    if (p == NULL) {
        return client_set_err(c, PQ_ENOMEM, "out of memory (request table)");
    }
    p->w = w;
    rc = client_send_frame(c, f);
    if (rc != PQ_OK) {
        p = client_pend_find(c, id);
        if (p != NULL) {
            client_pend_remove(c, p);
        }
        return rc;
    }
    deadline = client_deadline_after(c->io_timeout_ms);
    while (!w->done) {
        int left = client_remaining_ms(deadline);

        if (left == 0) {
            p = client_pend_find(c, id);
            if (p != NULL) {
                p->kind = PEND_IGNORE; /* the reply will be dropped */
                p->w = NULL;
            }
            return client_set_err(c, PQ_ETIMEDOUT,
                                  "no reply from the broker within %d ms",
                                  c->io_timeout_ms);
        }
        rc = client_pump(c, left, true);
        if (rc < 0 && !w->done) {
            return rc;
        }
    }
    if (w->err != 0) {
        frame_free(w->reply);
        return w->err == c->dead
                   ? client_dead_err(c)
                   : client_set_err(c, w->err, "request failed: %s",
                                    pq_strerror(w->err));
    }
    if (w->reply->kind_case == PROTOQ__FRAME__KIND_ERROR) {
        rc = set_remote_err(c, w->reply->error);
        frame_free(w->reply);
        return rc;
    }
    if (w->reply->kind_case != want) {
        rc = (int)w->reply->kind_case;
        frame_free(w->reply);
        return client_set_err(
            c, PQ_EPROTO,
            "unexpected reply from the broker (kind %d, wanted %d)", rc,
            (int)want);
    }
    *reply = w->reply;
    return PQ_OK;
}

int
client_request(protoq_client *c, Protoq__Frame *f, Protoq__Frame__KindCase want,
               Protoq__Frame **reply)
{
    struct waiter w;

    memset(&w, 0, sizeof(w));
    return client_request_w(c, f, want, reply, &w);
}

/* Send f, wait for an Ok, and free it; *count gets Ok.count (NULL ok). */
int
client_request_ok(protoq_client *c, Protoq__Frame *f, uint64_t *count)
{
    Protoq__Frame *r;
    int rc = client_request(c, f, PROTOQ__FRAME__KIND_OK, &r);

    if (rc == PQ_OK) {
        if (count != NULL) {
            *count = r->ok->count;
        }
        frame_free(r);
    }
    return rc;
}

/* Send a request that gets no reply on success (an id, but no ring slot).
 * Buffered. */
int
client_send_noreply(protoq_client *c, Protoq__Frame *f)
{
    int rc = client_revive(c);

    if (rc != PQ_OK) {
        return rc;
    }
    f->request_id = c->next_id++;
    return client_send_frame(c, f);
}

/*
 * conn_drop: a reconnecting handle lost its connection (client_conn_fail):
 * close the socket and drop what belongs to that connection: its input and
 * output, and the deliveries and cancel requests waiting for a callback
 * (the broker has taken them back). Confirms, errors and events stay.
 */
static void
conn_drop(protoq_client *c)
{
    size_t i, kept = 0;

    client_tls_free(c);
    if (c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
    }
    c->in_start = c->in_end = 0;
    c->out_start = c->out_len = 0;
    c->tls_want_write = false;
    for (i = 0; i < c->dq_len; i++) {
        struct deferred *d = &c->dq[(c->dq_head + i) % c->dq_cap];

        if (d->f != NULL && d->conf.kind != PEND_CONFIRM &&
            (d->f->kind_case == PROTOQ__FRAME__KIND_DELIVER ||
             d->f->kind_case == PROTOQ__FRAME__KIND_CANCEL_REQUESTED)) {
            deferred_fini(d);
            continue;
        }
        c->dq[(c->dq_head + kept++) % c->dq_cap] = *d;
    }
    c->dq_len = kept;
    for (i = 0; i < c->n_subs; i++) {
        c->subs[i].wire_id = 0;
    }
}

/* protoq_close: close the socket and free the handle; no callbacks run. */
void
protoq_close(protoq_client *c)
{
    if (c == NULL) {
        return;
    }
    client_tls_free(c);
    if (c->fd >= 0) {
        close(c->fd);
    }
    for (size_t i = 0; i < c->dq_len; i++) {
        deferred_fini(&c->dq[(c->dq_head + i) % c->dq_cap]);
    }
    free(c->dq);
    free(c->pend);
    while (c->n_subs > 0) {
        client_sub_forget(c, c->subs[0].id);
    }
    free(c->subs);
    client_reconnect_fini(c);
    free(c->out);
    free(c->in);
    free(c);
}

/* protoq_errmsg: the last failure's message on c. */
const char *
protoq_errmsg(const protoq_client *c)
{
    return c ? c->errmsg : "out of memory";
}

/* protoq_last_error_code: wire code of the last Error frame that failed a call.
 */
int
protoq_last_error_code(const protoq_client *c)
{
    return c ? c->last_code : 0;
}

/* protoq_server_info: copy of the Welcome. */
void
protoq_server_info(const protoq_client *c, struct protoq_server_info *out)
{
    *out = c->info;
}

/* protoq_fd: the socket, for callers that poll() it themselves. */
int
protoq_fd(const protoq_client *c)
{
    return c->fd;
}

/* protoq_code_name: name of a wire error code ("QUEUE_FULL"). */
const char *
protoq_code_name(int code)
{
    static const char *const names[] = {
        [PROTOQ_CODE_NONE] = "ERROR_UNSPECIFIED",
        [PROTOQ_CODE_BAD_REQUEST] = "BAD_REQUEST",
        [PROTOQ_CODE_UNSUPPORTED_VERSION] = "UNSUPPORTED_VERSION",
        [PROTOQ_CODE_FRAME_TOO_LARGE] = "FRAME_TOO_LARGE",
        [PROTOQ_CODE_MALFORMED_FRAME] = "MALFORMED_FRAME",
        [PROTOQ_CODE_UNKNOWN_FRAME] = "UNKNOWN_FRAME",
        [PROTOQ_CODE_UNEXPECTED_FRAME] = "UNEXPECTED_FRAME",
        [PROTOQ_CODE_QUEUE_NOT_FOUND] = "QUEUE_NOT_FOUND",
        [PROTOQ_CODE_QUEUE_EXISTS] = "QUEUE_EXISTS",
        [PROTOQ_CODE_QUEUE_FULL] = "QUEUE_FULL",
        [PROTOQ_CODE_MESSAGE_TOO_LARGE] = "MESSAGE_TOO_LARGE",
        [PROTOQ_CODE_UNAUTHORIZED] = "UNAUTHORIZED",
        [PROTOQ_CODE_FORBIDDEN] = "FORBIDDEN",
        [PROTOQ_CODE_DISK_FULL] = "DISK_FULL",
        [PROTOQ_CODE_OVERLOADED] = "OVERLOADED",
        [PROTOQ_CODE_STALE_DELIVERY] = "STALE_DELIVERY",
        [PROTOQ_CODE_SUBSCRIPTION_NOT_FOUND] = "SUBSCRIPTION_NOT_FOUND",
        [PROTOQ_CODE_INTERNAL] = "INTERNAL",
        [PROTOQ_CODE_UNSUPPORTED] = "UNSUPPORTED",
    };

    if (code < 0 || (size_t)code >= sizeof(names) / sizeof(names[0])) {
        return "UNKNOWN";
    }
    return names[code];
}
