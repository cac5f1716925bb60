/*
 * client.c: libprotoq, the blocking C client of protoqd (API in protoq.h).
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
 * blocking request). All parsing state lives in the handle (c->in_start),
 * never in locals that span a callback, and every frame is unpacked into its
 * own allocation, so a nested call may read, compact and dispatch freely.
 * A blocking call's waiter lives on its stack frame and is detached from
 * the ring when the call gives up.
 *
 * Invariants: the library never prints, never exits, keeps no globals, and
 * never keeps a pointer into an unpacked frame past the function that
 * handles it. A connection failure marks the handle dead (c->dead), fails
 * every outstanding request, and is sticky.
 */
/* pqerr.h before protoq.h: the real enum wins and the check below holds
 * protoq.h's standalone copy to it. */
#include "frame.h"
#include "pqerr.h"
#include "protoq.h"

#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

_Static_assert(PROTOQ_PQ_ERR_COUNT == 1 - PQ_ERR_MIN,
               "client/protoq.h's copy of enum pq_err is out of date");

enum {
    IN_INITIAL = 256 * 1024,      /* input buffer, grown for large frames */
    IN_READ_MIN = 64 * 1024,      /* compact when less room than this */
    OUT_FLUSH_BYTES = 128 * 1024, /* auto-flush threshold of async output */
    PRE_WELCOME_MAX = 16 * 1024,  /* frame limit until the Welcome */
    PEND_INITIAL = 1024,          /* ring slots (power of two) */
    PEND_EVICT_AT = 1 << 16,      /* past this, drop abandoned entries */
    KV_STACK = 16,                /* key/values converted without malloc */
    DEFAULT_CONNECT_MS = 5000,
    DEFAULT_IO_MS = 30000,
};

enum pend_kind {
    PEND_FREE = 0,
    PEND_SYNC,      /* a blocking call waits on it (w) */
    PEND_CONFIRM,   /* async publish: cb(arg, ...) */
    PEND_IGNORE,    /* its caller gave up; drop the reply */
};

/* A blocking call's wait state; lives on that call's stack. */
struct waiter {
    bool done;
    int err;                    /* PQ_* when the connection failed */
    Protoq__Frame *reply;       /* owned by the waiter once done */
    protoq_deliver_fn sub_cb;   /* subscribe: registered on SubscribeOk */
    void *sub_arg;
};

/* One outstanding request that expects a reply. */
struct pending {
    uint64_t id;                /* request_id; 0 = free slot */
    enum pend_kind kind;
    struct waiter *w;           /* PEND_SYNC */
    protoq_confirm_fn cb;       /* PEND_CONFIRM */
    void *arg;
};

struct sub {
    uint64_t id;                /* subscription_id */
    protoq_deliver_fn cb;
    void *arg;
};

struct protoq_client {
    int fd;                     /* -1 when never connected */
    int dead;                   /* PQ_* once unusable, else 0 */
    char dead_msg[512];         /* why it died */
    uint64_t next_id;           /* next request_id (starts at 1) */
    int io_timeout_ms;          /* < 0: forever */
    struct protoq_server_info info;
    uint32_t in_limit;          /* largest frame body we accept */

    uint8_t *out;               /* pending output: out[out_start..out_len) */
    size_t out_start, out_len, out_cap;
    uint8_t *in;                /* unparsed input: in[in_start..in_end) */
    size_t in_start, in_end, in_cap;

    struct pending *pend;       /* ring of pend_cap slots */
    size_t pend_cap;
    size_t n_pending;           /* used slots */
    size_t n_confirms;          /* PEND_CONFIRM among them */

    struct sub *subs;
    size_t n_subs, subs_cap;
    uint64_t dropped_deliveries;/* for no (longer) known subscription */

    protoq_cancel_fn cancel_cb;
    void *cancel_arg;
    protoq_error_fn error_cb;
    void *error_arg;
    uint64_t async_errors;

    int64_t last_send_ms;       /* monotonic; for heartbeats */
    int last_code;              /* wire code of the last remote error */
    char errmsg[512];
};

/* ---- small helpers ---- */

static int64_t
now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Remaining ms until deadline (-1 = none), never below 0. */
static int
remaining_ms(int64_t deadline)
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

static int64_t
deadline_after(int timeout_ms)
{
    return timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
}

/* Record a local failure: code err, message fmt. Returns err. */
__attribute__((format(printf, 3, 4))) static int
set_err(protoq_client *c, int err, const char *fmt, ...)
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
static int
dead_err(protoq_client *c)
{
    snprintf(c->errmsg, sizeof(c->errmsg), "%s", c->dead_msg);
    return c->dead;
}

static void
copy_str(char *dst, size_t cap, const char *src)
{
    snprintf(dst, cap, "%s", src ? src : "");
}

/* protobuf-c wants char * for strings it only reads. */
static char *
S(const char *s)
{
    return (char *)(s ? s : "");
}

static bool
name_ok(protoq_client *c, const char *what, const char *name)
{
    size_t n;

    if (name == NULL || name[0] == '\0') {
        set_err(c, PQ_EINVAL, "%s name is empty", what);
        return false;
    }
    n = strlen(name);
    if (n > PROTOQ_NAME_MAX) {
        set_err(c, PQ_EINVAL, "%s name is %zu bytes (at most %d)", what, n,
                PROTOQ_NAME_MAX);
        return false;
    }
    return true;
}

/* ---- the pending-request ring ---- */

static struct pending *
pend_find(protoq_client *c, uint64_t id)
{
    struct pending *p;

    if (c->pend_cap == 0 || id == 0) {
        return NULL;
    }
    p = &c->pend[id & (c->pend_cap - 1)];
    return p->id == id ? p : NULL;
}

static void
pend_remove(protoq_client *c, struct pending *p)
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
static struct pending *
pend_insert(protoq_client *c, uint64_t id, enum pend_kind kind)
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
        pend_remove(c, &c->pend[i]);
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

/* Mark the connection dead with err and a message; fail everything
 * outstanding. Returns err. */
__attribute__((format(printf, 3, 4))) static int
conn_fail(protoq_client *c, int err, const char *fmt, ...)
{
    va_list ap;

    if (c->dead) {
        return dead_err(c);
    }
    va_start(ap, fmt);
    vsnprintf(c->dead_msg, sizeof(c->dead_msg), fmt, ap);
    va_end(ap);
    c->dead = err;
    c->out_start = c->out_len = 0;
    pend_fail_all(c, err);
    return dead_err(c);
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
        return set_err(c, PQ_ENOMEM, "out of memory (output buffer)");
    }
    c->out = p;
    c->out_cap = cap;
    return PQ_OK;
}

/* One write() of pending output. Returns PQ_OK (some or none written) or a
 * connection error. */
static int
out_write(protoq_client *c)
{
    while (c->out_start < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_start,
                         c->out_len - c->out_start, MSG_NOSIGNAL);

        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                return PQ_OK;
            }
            return conn_fail(c, PQ_ECLOSED, "write to broker failed: %s",
                             strerror(errno));
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
        return conn_fail(c, PQ_ENOMEM, "out of memory (input buffer)");
    }
    c->in = p;
    c->in_cap = cap;
    return PQ_OK;
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
    for (;;) {
        n = recv(c->fd, c->in + c->in_end, c->in_cap - c->in_end, 0);
        if (n > 0) {
            c->in_end += (size_t)n;
            return n;
        }
        if (n == 0) {
            return conn_fail(c, PQ_ECLOSED, "connection closed by broker");
        }
        if (errno == EINTR) {
            continue;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            return 0;
        }
        return conn_fail(c, PQ_ECLOSED, "read from broker failed: %s",
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

static struct sub *
sub_find(protoq_client *c, uint64_t id)
{
    size_t i;

    for (i = 0; i < c->n_subs; i++) {
        if (c->subs[i].id == id) {
            return &c->subs[i];
        }
    }
    return NULL;
}

static int
sub_add(protoq_client *c, uint64_t id, protoq_deliver_fn cb, void *arg)
{
    struct sub *s = sub_find(c, id);

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
    }
    s->id = id;
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
    struct sub *s = sub_find(c, d->subscription_id);
    protoq_deliver_fn cb;
    void *arg;

    if (s == NULL) {
        c->dropped_deliveries++;
        return 0;
    }
    cb = s->cb;  /* s may move if the callback subscribes */
    arg = s->arg;
    memset(&dv, 0, sizeof(dv));
    dv.subscription_id = d->subscription_id;
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

/* Handle one reply to a request in the ring. Takes ownership of f. Returns
 * the number of callbacks run. */
static int
on_reply(protoq_client *c, struct pending *p, Protoq__Frame *f)
{
    struct pending e = *p;
    int events = 0;

    pend_remove(c, p);
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
        }
        e.w->reply = f;  /* ownership passes to the waiter */
        e.w->done = true;
        return 0;
    case PEND_CONFIRM:
        if (e.cb == NULL) {
            if (f->kind_case == PROTOQ__FRAME__KIND_ERROR) {
                c->async_errors++;
            }
        } else if (f->kind_case == PROTOQ__FRAME__KIND_PUBLISH_OK) {
            const Protoq__PublishOk *ok = f->publish_ok;

            e.cb(e.arg, PQ_OK, ok->n_message_ids ? ok->message_ids[0] : 0,
                 ok->n_duplicate ? ok->duplicate[0] != 0 : false);
            events = 1;
        } else if (f->kind_case == PROTOQ__FRAME__KIND_ERROR) {
            set_remote_err(c, f->error);
            e.cb(e.arg, PQ_EREMOTE, 0, false);
            events = 1;
        } else {
            set_err(c, PQ_EPROTO, "unexpected reply (kind %d) to a publish",
                    (int)f->kind_case);
            e.cb(e.arg, PQ_EPROTO, 0, false);
            events = 1;
        }
        break;
    default:
        break;
    }
    frame_free(f);
    return events;
}

/* Handle one incoming frame; takes ownership of f. Returns the number of
 * callbacks run, or a PQ_* error that killed the connection. */
static int
handle_frame(protoq_client *c, Protoq__Frame *f)
{
    struct pending *p;
    int rc = 0;

    if (f->request_id != 0) {
        p = pend_find(c, f->request_id);
        if (p != NULL) {
            return on_reply(c, p, f);
        }
        if (f->kind_case == PROTOQ__FRAME__KIND_ERROR) {
            /* An Error for a request nobody waits for: an unconfirmed ack,
             * nack or release, or a call that timed out. */
            c->async_errors++;
            if (c->error_cb != NULL) {
                set_remote_err(c, f->error);
                c->error_cb(c->error_arg, c, (int)f->error->code,
                            c->errmsg, f->request_id);
                rc = 1;
            }
        }
        frame_free(f);
        return rc;
    }
    switch (f->kind_case) {
    case PROTOQ__FRAME__KIND_DELIVER:
        rc = on_deliver(c, f->deliver);
        if (rc < 0) {
            frame_free(f);
            return conn_fail(c, rc, "out of memory (delivery)");
        }
        break;
    case PROTOQ__FRAME__KIND_CANCEL_REQUESTED:
        if (c->cancel_cb != NULL) {
            const Protoq__CancelRequested *cr = f->cancel_requested;

            c->cancel_cb(c->cancel_arg, c, cr->queue ? cr->queue : "",
                         cr->message_id, cr->attempt);
            rc = 1;
        }
        break;
    case PROTOQ__FRAME__KIND_ERROR: {
        /* request_id 0: a fatal protocol problem; the broker closes. */
        int code = (int)f->error->code;
        char msg[200];

        copy_str(msg, sizeof(msg), f->error->message);
        frame_free(f);
        rc = conn_fail(c, PQ_EREMOTE, "broker closed the connection: %s (%s)",
                       msg, protoq_code_name(code));
        c->last_code = code;
        return rc;
    }
    default:
        /* Heartbeat, or a push this library does not know: ignore. */
        break;
    }
    frame_free(f);
    return rc;
}

/* Decode and handle every complete frame in the input buffer. Returns the
 * number of callbacks run, or a PQ_* error (the connection is dead). */
static int
dispatch_input(protoq_client *c)
{
    int events = 0;

    while (!c->dead) {
        size_t avail = c->in_end - c->in_start;
        ssize_t n = frame_check_header(c->in + c->in_start, avail,
                                       c->in_limit);
        Protoq__Frame *f;
        int rc;

        if (n == PQ_EAGAIN) {
            break;
        }
        if (n < 0) {
            return conn_fail(c, PQ_EPROTO,
                             n == PQ_ETOOBIG
                                 ? "broker sent a frame over %u bytes"
                                 : "broker sent a frame of length 0 (limit %u)",
                             c->in_limit);
        }
        if (avail < FRAME_HEADER_LEN + (size_t)n) {
            /* Make sure the whole frame will fit. */
            rc = in_reserve(c, FRAME_HEADER_LEN + (size_t)n - avail);
            if (rc < 0) {
                return rc;
            }
            break;
        }
        rc = frame_unpack(c->in + c->in_start + FRAME_HEADER_LEN, (size_t)n,
                          frame_decode_budget((size_t)n), &f);
        if (rc != PQ_OK) {
            return conn_fail(c, PQ_EPROTO,
                             "broker sent a frame that does not decode (%s)",
                             pq_strerror(rc));
        }
        c->in_start += FRAME_HEADER_LEN + (size_t)n;
        if (c->in_start == c->in_end) {
            c->in_start = c->in_end = 0;
        }
        rc = handle_frame(c, f);
        if (rc < 0) {
            return rc;
        }
        events += rc;
    }
    return c->dead ? dead_err(c) : events;
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

/* How long poll() may sleep before a heartbeat is due (-1: no limit). */
static int
heartbeat_wait_ms(protoq_client *c, int timeout)
{
    int64_t due;

    if (c->info.heartbeat_ms == 0) {
        return timeout;
    }
    due = c->last_send_ms + c->info.heartbeat_ms - now_ms();
    if (due < 0) {
        due = 0;
    }
    if (timeout < 0 || due < timeout) {
        return (int)due;
    }
    return timeout;
}

/*
 * pump: one round of I/O. Handles frames already buffered first (without
 * waiting); otherwise writes what it can and waits up to timeout_ms for the
 * socket, then reads once. dispatch false: read into the buffer but run no
 * callbacks (used while flushing from inside a call that must not run
 * them). Returns callbacks run (>= 0) or a PQ_* connection error.
 */
static int
pump(protoq_client *c, int timeout_ms, bool dispatch)
{
    struct pollfd pfd;
    int rc;
    int wait;

    if (c->dead) {
        return dead_err(c);
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
    pfd.events = POLLIN | (c->out_len > c->out_start ? POLLOUT : 0);
    pfd.revents = 0;
    wait = heartbeat_wait_ms(c, timeout_ms);
    rc = poll(&pfd, 1, wait);
    if (rc < 0) {
        if (errno == EINTR) {
            return 0;
        }
        return conn_fail(c, PQ_ESYS, "poll: %s", strerror(errno));
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
    }
    return dispatch ? dispatch_input(c) : 0;
}

/* Write all pending output, bounded by the I/O timeout; reads meanwhile
 * (so a broker that writes to us while we write to it cannot deadlock us)
 * and dispatches only when dispatch is set. */
static int
flush_all(protoq_client *c, bool dispatch)
{
    int64_t deadline = deadline_after(c->io_timeout_ms);
    int rc;

    if (c->dead) {
        return dead_err(c);
    }
    rc = out_write(c);
    while (rc >= 0 && c->out_len > c->out_start) {
        int left = remaining_ms(deadline);

        if (left == 0) {
            return conn_fail(c, PQ_ETIMEDOUT,
                             "timed out writing to the broker");
        }
        rc = pump(c, left, dispatch);
    }
    return rc < 0 ? rc : PQ_OK;
}

/* Pack f (request_id already set) into the output buffer; auto-flush when
 * enough piled up. Returns PQ_OK, PQ_ETOOBIG (frame over the broker's
 * limit; nothing queued), or an error. */
static int
send_frame(protoq_client *c, Protoq__Frame *f)
{
    size_t n = frame_packed_size(f);
    int rc;

    if (n - FRAME_HEADER_LEN > c->info.max_frame_bytes) {
        return set_err(c, PQ_ETOOBIG,
                       "request of %zu bytes is over the broker's frame limit "
                       "of %u bytes",
                       n - FRAME_HEADER_LEN, c->info.max_frame_bytes);
    }
    rc = out_reserve(c, n);
    if (rc != PQ_OK) {
        return rc;
    }
    c->out_len += frame_pack(f, c->out + c->out_len);
    if (c->out_len - c->out_start >= OUT_FLUSH_BYTES) {
        return flush_all(c, false);
    }
    return PQ_OK;
}

/*
 * request: send f and wait for its reply, bounded by the I/O timeout. On
 * PQ_OK *reply holds the reply frame (of kind want; free with frame_free).
 * An Error reply gives PQ_EREMOTE with the code and text recorded. w may
 * carry a subscribe hook; NULL for none.
 */
static int
request_w(protoq_client *c, Protoq__Frame *f, Protoq__Frame__KindCase want,
          Protoq__Frame **reply, struct waiter *w)
{
    struct pending *p;
    int64_t deadline;
    uint64_t id;
    int rc;

    *reply = NULL;
    if (c->dead) {
        return dead_err(c);
    }
    id = c->next_id++;
    f->request_id = id;
    p = pend_insert(c, id, PEND_SYNC);
    if (p == NULL) {
        return set_err(c, PQ_ENOMEM, "out of memory (request table)");
    }
    p->w = w;
    rc = send_frame(c, f);
    if (rc != PQ_OK) {
        p = pend_find(c, id);
        if (p != NULL) {
            pend_remove(c, p);
        }
        return rc;
    }
    deadline = deadline_after(c->io_timeout_ms);
    while (!w->done) {
        int left = remaining_ms(deadline);

        if (left == 0) {
            p = pend_find(c, id);
            if (p != NULL) {
                p->kind = PEND_IGNORE;  /* the reply will be dropped */
                p->w = NULL;
            }
            return set_err(c, PQ_ETIMEDOUT,
                           "no reply from the broker within %d ms",
                           c->io_timeout_ms);
        }
        rc = pump(c, left, true);
        if (rc < 0 && !w->done) {
            return rc;
        }
    }
    if (w->err != 0) {
        frame_free(w->reply);
        return w->err == c->dead ? dead_err(c)
                                 : set_err(c, w->err, "request failed: %s",
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
        return set_err(c, PQ_EPROTO,
                       "unexpected reply from the broker (kind %d, wanted %d)",
                       rc, (int)want);
    }
    *reply = w->reply;
    return PQ_OK;
}

static int
request(protoq_client *c, Protoq__Frame *f, Protoq__Frame__KindCase want,
        Protoq__Frame **reply)
{
    struct waiter w;

    memset(&w, 0, sizeof(w));
    return request_w(c, f, want, reply, &w);
}

/* Send f, wait for an Ok, and free it; *count gets Ok.count (NULL ok). */
static int
request_ok(protoq_client *c, Protoq__Frame *f, uint64_t *count)
{
    Protoq__Frame *r;
    int rc = request(c, f, PROTOQ__FRAME__KIND_OK, &r);

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
static int
send_noreply(protoq_client *c, Protoq__Frame *f)
{
    if (c->dead) {
        return dead_err(c);
    }
    f->request_id = c->next_id++;
    return send_frame(c, f);
}

/* ---- connecting ---- */

/* Split "host:port", "[v6]:port", "host" into host and port strings. */
static int
parse_hostport(const char *hp, char *host, size_t hostcap, char *port,
               size_t portcap)
{
    const char *colon;
    size_t hl;

    if (hp == NULL || hp[0] == '\0') {
        hp = "127.0.0.1";
    }
    if (hp[0] == '[') {
        const char *end = strchr(hp, ']');

        if (end == NULL) {
            return PQ_EINVAL;
        }
        hl = (size_t)(end - hp - 1);
        if (hl >= hostcap) {
            return PQ_EINVAL;
        }
        memcpy(host, hp + 1, hl);
        host[hl] = '\0';
        if (end[1] == '\0') {
            snprintf(port, portcap, "%d", PROTOQ_DEFAULT_PORT);
            return PQ_OK;
        }
        if (end[1] != ':' || end[2] == '\0') {
            return PQ_EINVAL;
        }
        snprintf(port, portcap, "%s", end + 2);
        return PQ_OK;
    }
    colon = strrchr(hp, ':');
    if (colon == NULL || strchr(hp, ':') != colon) {
        /* no port, or a bare IPv6 address */
        if (strlen(hp) >= hostcap) {
            return PQ_EINVAL;
        }
        snprintf(host, hostcap, "%s", hp);
        snprintf(port, portcap, "%d", PROTOQ_DEFAULT_PORT);
        return PQ_OK;
    }
    hl = (size_t)(colon - hp);
    if (hl == 0 || hl >= hostcap || colon[1] == '\0' ||
        strlen(colon + 1) >= portcap) {
        return PQ_EINVAL;
    }
    memcpy(host, hp, hl);
    host[hl] = '\0';
    snprintf(port, portcap, "%s", colon + 1);
    return PQ_OK;
}

/* Connect a non-blocking socket to one address within deadline. Returns
 * the fd, or -1 with errno set. */
static int
connect_one(const struct addrinfo *ai, int64_t deadline)
{
    int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK |
                    SOCK_CLOEXEC, ai->ai_protocol);
    int one = 1;
    int err;
    socklen_t len = sizeof(err);

    if (fd < 0) {
        return -1;
    }
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
        struct pollfd pfd = {.fd = fd, .events = POLLOUT};
        int rc;

        if (errno != EINPROGRESS) {
            goto err_close;
        }
        do {
            rc = poll(&pfd, 1, remaining_ms(deadline));
        } while (rc < 0 && errno == EINTR);
        if (rc == 0) {
            errno = ETIMEDOUT;
            goto err_close;
        }
        if (rc < 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) {
            goto err_close;
        }
        if (err != 0) {
            errno = err;
            goto err_close;
        }
    }
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    return fd;

err_close:
    err = errno;
    close(fd);
    errno = err;
    return -1;
}

static int
do_connect(protoq_client *c, const char *hostport, int64_t deadline)
{
    char host[256];
    char port[32];
    struct addrinfo hints;
    struct addrinfo *res = NULL;
    struct addrinfo *ai;
    int rc;
    int err = 0;

    if (parse_hostport(hostport, host, sizeof(host), port, sizeof(port)) !=
        PQ_OK) {
        return conn_fail(c, PQ_EINVAL,
                         "bad server address '%s' (want HOST:PORT or "
                         "[IPV6]:PORT)",
                         hostport);
    }
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        return conn_fail(c, PQ_EINVAL, "cannot resolve %s port %s: %s", host,
                         port, gai_strerror(rc));
    }
    for (ai = res; ai != NULL; ai = ai->ai_next) {
        c->fd = connect_one(ai, deadline);
        if (c->fd >= 0) {
            break;
        }
        err = errno;
    }
    freeaddrinfo(res);
    if (c->fd < 0) {
        return conn_fail(c, err == ETIMEDOUT ? PQ_ETIMEDOUT : PQ_ECLOSED,
                         "cannot connect to %s: %s", hostport, strerror(err));
    }
    return PQ_OK;
}

static int
handshake(protoq_client *c, const struct protoq_opts *o)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Hello h = PROTOQ__HELLO__INIT;
    Protoq__Frame *r;
    const Protoq__Welcome *w;
    int rc;

    h.protocol_version = PROTOQ_PROTOCOL_VERSION;
    h.client_name = S(o && o->client_name ? o->client_name : "libprotoq");
    h.auth_token = S(o ? o->auth_token : NULL);
    h.heartbeat_ms = o ? o->heartbeat_ms : 0;
    f.kind_case = PROTOQ__FRAME__KIND_HELLO;
    f.hello = &h;
    rc = request(c, &f, PROTOQ__FRAME__KIND_WELCOME, &r);
    if (rc != PQ_OK) {
        if (rc == PQ_EREMOTE) {
            /* The broker closes after a refused Hello. */
            c->dead = PQ_EREMOTE;
            snprintf(c->dead_msg, sizeof(c->dead_msg), "%s", c->errmsg);
        }
        return rc;
    }
    w = r->welcome;
    c->info.protocol_version = w->protocol_version;
    copy_str(c->info.broker_id, sizeof(c->info.broker_id), w->broker_id);
    copy_str(c->info.server_version, sizeof(c->info.server_version),
             w->server_version);
    c->info.max_frame_bytes = w->max_frame_bytes;
    c->info.max_message_bytes = w->max_message_bytes;
    c->info.heartbeat_ms = w->heartbeat_ms;
    c->info.max_batch = w->max_batch;
    frame_free(r);
    if (c->info.protocol_version != PROTOQ_PROTOCOL_VERSION) {
        return conn_fail(c, PQ_EVERSION,
                         "broker speaks protocol version %u, not %d",
                         c->info.protocol_version, PROTOQ_PROTOCOL_VERSION);
    }
    if (c->info.max_frame_bytes == 0) {
        c->info.max_frame_bytes = 1u << 20;
    }
    /* Deliveries carry a whole message; allow it even if the broker's
     * request limit is smaller. */
    c->in_limit = c->info.max_frame_bytes;
    if (c->info.max_message_bytes > 0 &&
        c->info.max_message_bytes + 65536u > c->in_limit) {
        c->in_limit = c->info.max_message_bytes + 65536u;
    }
    return PQ_OK;
}

/* protoq_connect: connect, handshake; *out set even on failure (see protoq.h). */
int
protoq_connect(const char *hostport, const struct protoq_opts *opts,
               protoq_client **out)
{
    protoq_client *c = calloc(1, sizeof(*c));
    int connect_ms = opts && opts->connect_timeout_ms > 0
                         ? opts->connect_timeout_ms
                         : DEFAULT_CONNECT_MS;
    int64_t deadline = now_ms() + connect_ms;
    int rc;

    *out = c;
    if (c == NULL) {
        return PQ_ENOMEM;
    }
    c->fd = -1;
    c->next_id = 1;
    c->io_timeout_ms = opts && opts->io_timeout_ms != 0 ? opts->io_timeout_ms
                                                        : DEFAULT_IO_MS;
    c->in_limit = PRE_WELCOME_MAX;
    c->info.max_frame_bytes = PRE_WELCOME_MAX;
    c->last_send_ms = now_ms();
    rc = do_connect(c, hostport, deadline);
    if (rc != PQ_OK) {
        return rc;
    }
    /* The handshake is bounded by the connect timeout, not the I/O one. */
    c->io_timeout_ms = remaining_ms(deadline);
    if (c->io_timeout_ms == 0) {
        c->io_timeout_ms = 1;
    }
    rc = handshake(c, opts);
    c->io_timeout_ms = opts && opts->io_timeout_ms != 0 ? opts->io_timeout_ms
                                                        : DEFAULT_IO_MS;
    if (rc != PQ_OK) {
        if (rc == PQ_ETIMEDOUT) {
            conn_fail(c, rc, "no Welcome from %s within %d ms", hostport,
                      connect_ms);
        } else if (!c->dead) {
            char msg[sizeof(c->errmsg)];

            snprintf(msg, sizeof(msg), "%s", c->errmsg);
            conn_fail(c, rc, "%s", msg);
        }
        c->errmsg[0] = '\0';
        snprintf(c->errmsg, sizeof(c->errmsg), "%s", c->dead_msg);
        return rc;
    }
    return PQ_OK;
}

/* protoq_close: close the socket and free the handle; no callbacks run. */
void
protoq_close(protoq_client *c)
{
    if (c == NULL) {
        return;
    }
    if (c->fd >= 0) {
        close(c->fd);
    }
    free(c->pend);
    free(c->subs);
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

/* protoq_last_error_code: wire code of the last Error frame that failed a call. */
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

/* ---- queue admin ---- */

static void
attrs_to_wire(Protoq__QueueAttrs *w, const struct protoq_queue_attrs *a)
{
    w->transient = a->transient;
    w->max_length = a->max_length;
    w->max_bytes = a->max_bytes;
    w->ack_timeout_ms = a->ack_timeout_ms;
    w->max_attempts = a->max_attempts;
    w->dead_letter = S(a->dead_letter);
    w->backoff_base_ms = a->backoff_base_ms;
    w->backoff_cap_ms = a->backoff_cap_ms;
    w->ttl_ms = a->ttl_ms;
    w->dedup_window_ms = a->dedup_window_ms;
    w->max_lease_ms = a->max_lease_ms;
    w->dead_letter_expired = a->dead_letter_expired;
    w->no_backoff = a->no_backoff;
}

static void
info_from_wire(struct protoq_queue_info *o, const Protoq__QueueInfo *w)
{
    const Protoq__QueueAttrs *a = w->attrs;

    memset(o, 0, sizeof(*o));
    copy_str(o->name, sizeof(o->name), w->name);
    if (a != NULL) {
        o->attrs.transient = a->transient;
        o->attrs.max_length = a->max_length;
        o->attrs.max_bytes = a->max_bytes;
        o->attrs.ack_timeout_ms = a->ack_timeout_ms;
        o->attrs.max_attempts = a->max_attempts;
        copy_str(o->attrs.dead_letter, sizeof(o->attrs.dead_letter),
                 a->dead_letter);
        o->attrs.backoff_base_ms = a->backoff_base_ms;
        o->attrs.backoff_cap_ms = a->backoff_cap_ms;
        o->attrs.ttl_ms = a->ttl_ms;
        o->attrs.dedup_window_ms = a->dedup_window_ms;
        o->attrs.max_lease_ms = a->max_lease_ms;
        o->attrs.dead_letter_expired = a->dead_letter_expired;
        o->attrs.no_backoff = a->no_backoff;
    }
    o->ready = w->ready;
    o->delayed = w->delayed;
    o->inflight = w->inflight;
    o->consumers = w->consumers;
    o->bytes = w->bytes;
    o->published = w->published;
    o->acked = w->acked;
    o->nacked = w->nacked;
    o->redelivered = w->redelivered;
    o->expired = w->expired;
    o->dead_lettered = w->dead_lettered;
    o->dropped = w->dropped;
}

/* protoq_queue_create: QueueCreate, wait for Ok. */
int
protoq_queue_create(protoq_client *c, const char *name,
                    const struct protoq_queue_attrs *attrs)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__QueueCreate qc = PROTOQ__QUEUE_CREATE__INIT;
    Protoq__QueueAttrs wa = PROTOQ__QUEUE_ATTRS__INIT;

    if (!name_ok(c, "queue", name)) {
        return PQ_EINVAL;
    }
    qc.name = S(name);
    if (attrs != NULL) {
        attrs_to_wire(&wa, attrs);
        qc.attrs = &wa;
    }
    f.kind_case = PROTOQ__FRAME__KIND_QUEUE_CREATE;
    f.queue_create = &qc;
    return request_ok(c, &f, NULL);
}

/* protoq_queue_delete: QueueDelete, wait for Ok. */
int
protoq_queue_delete(protoq_client *c, const char *name)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__QueueDelete qd = PROTOQ__QUEUE_DELETE__INIT;

    if (!name_ok(c, "queue", name)) {
        return PQ_EINVAL;
    }
    qd.name = S(name);
    f.kind_case = PROTOQ__FRAME__KIND_QUEUE_DELETE;
    f.queue_delete = &qd;
    return request_ok(c, &f, NULL);
}

/* protoq_queue_purge: QueuePurge, wait for Ok{count}. */
int
protoq_queue_purge(protoq_client *c, const char *name, uint64_t *purged)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__QueuePurge qp = PROTOQ__QUEUE_PURGE__INIT;

    if (purged != NULL) {
        *purged = 0;
    }
    if (!name_ok(c, "queue", name)) {
        return PQ_EINVAL;
    }
    qp.name = S(name);
    f.kind_case = PROTOQ__FRAME__KIND_QUEUE_PURGE;
    f.queue_purge = &qp;
    return request_ok(c, &f, purged);
}

/* protoq_queue_list: QueueList; the array is the caller's (protoq_queue_list_free). */
int
protoq_queue_list(protoq_client *c, struct protoq_queue_info **out, size_t *n)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__QueueList ql = PROTOQ__QUEUE_LIST__INIT;
    Protoq__Frame *r;
    struct protoq_queue_info *list = NULL;
    size_t i, cnt;
    int rc;

    *out = NULL;
    *n = 0;
    f.kind_case = PROTOQ__FRAME__KIND_QUEUE_LIST;
    f.queue_list = &ql;
    rc = request(c, &f, PROTOQ__FRAME__KIND_QUEUE_LIST_OK, &r);
    if (rc != PQ_OK) {
        return rc;
    }
    cnt = r->queue_list_ok->n_queues;
    if (cnt > 0) {
        list = calloc(cnt, sizeof(*list));
        if (list == NULL) {
            frame_free(r);
            return set_err(c, PQ_ENOMEM, "out of memory (queue list)");
        }
        for (i = 0; i < cnt; i++) {
            info_from_wire(&list[i], r->queue_list_ok->queues[i]);
        }
    }
    frame_free(r);
    *out = list;
    *n = cnt;
    return PQ_OK;
}

/* protoq_queue_list_free: free a protoq_queue_list array. */
void
protoq_queue_list_free(struct protoq_queue_info *list, size_t n)
{
    (void)n;
    free(list);
}

/* protoq_queue_stat: QueueStat into *out. */
int
protoq_queue_stat(protoq_client *c, const char *name,
                  struct protoq_queue_info *out)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__QueueStat qs = PROTOQ__QUEUE_STAT__INIT;
    Protoq__Frame *r;
    int rc;

    memset(out, 0, sizeof(*out));
    if (!name_ok(c, "queue", name)) {
        return PQ_EINVAL;
    }
    qs.name = S(name);
    f.kind_case = PROTOQ__FRAME__KIND_QUEUE_STAT;
    f.queue_stat = &qs;
    rc = request(c, &f, PROTOQ__FRAME__KIND_QUEUE_STAT_OK, &r);
    if (rc != PQ_OK) {
        return rc;
    }
    if (r->queue_stat_ok->queue == NULL) {
        frame_free(r);
        return set_err(c, PQ_EPROTO, "broker sent QueueStatOk without a queue");
    }
    info_from_wire(out, r->queue_stat_ok->queue);
    frame_free(r);
    return PQ_OK;
}

/* protoq_route_bind: RouteBind, wait for Ok. */
int
protoq_route_bind(protoq_client *c, const char *route, const char *queue,
                  const char *pattern)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__RouteBind rb = PROTOQ__ROUTE_BIND__INIT;

    if (!name_ok(c, "route", route) || !name_ok(c, "queue", queue)) {
        return PQ_EINVAL;
    }
    rb.route = S(route);
    rb.queue = S(queue);
    rb.pattern = S(pattern);
    f.kind_case = PROTOQ__FRAME__KIND_ROUTE_BIND;
    f.route_bind = &rb;
    return request_ok(c, &f, NULL);
}

/* protoq_route_unbind: RouteUnbind, wait for Ok. */
int
protoq_route_unbind(protoq_client *c, const char *route, const char *queue,
                    const char *pattern)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__RouteUnbind ru = PROTOQ__ROUTE_UNBIND__INIT;

    if (!name_ok(c, "route", route) || !name_ok(c, "queue", queue)) {
        return PQ_EINVAL;
    }
    ru.route = S(route);
    ru.queue = S(queue);
    ru.pattern = S(pattern);
    f.kind_case = PROTOQ__FRAME__KIND_ROUTE_UNBIND;
    f.route_unbind = &ru;
    return request_ok(c, &f, NULL);
}

/* ---- building messages ---- */

/*
 * Wire storage for messages being packed: the Message structs, their
 * KeyValue structs and pointer arrays. Small publishes use the inline
 * arrays; larger ones one malloc. Everything points into the caller's
 * strings, which outlive the pack.
 */
struct msgbuf {
    Protoq__Publish pub_inline[1];
    Protoq__Publish *pubp_inline[1];
    Protoq__Message msg_inline[1];
    Protoq__KeyValue kv_inline[KV_STACK];
    Protoq__KeyValue *kvp_inline[KV_STACK];
    Protoq__Publish *pub;
    Protoq__Publish **pubp;
    Protoq__Message *msg;
    Protoq__KeyValue *kv;
    Protoq__KeyValue **kvp;
    void *heap;                 /* the one allocation, or NULL */
};

static int
msgbuf_init(struct msgbuf *b, const struct protoq_message *msgs, size_t n)
{
    size_t kvs = 0;
    size_t i;

    for (i = 0; i < n; i++) {
        kvs += msgs[i].n_headers + msgs[i].n_requires;
    }
    b->heap = NULL;
    if (n <= 1 && kvs <= KV_STACK) {
        b->pub = b->pub_inline;
        b->pubp = b->pubp_inline;
        b->msg = b->msg_inline;
        b->kv = b->kv_inline;
        b->kvp = b->kvp_inline;
        return PQ_OK;
    }
    b->heap = malloc(n * (sizeof(Protoq__Publish) + sizeof(Protoq__Publish *) +
                          sizeof(Protoq__Message)) +
                     kvs * (sizeof(Protoq__KeyValue) +
                            sizeof(Protoq__KeyValue *)));
    if (b->heap == NULL) {
        return PQ_ENOMEM;
    }
    /* Largest alignment first: the structs, then the pointer arrays. */
    b->pub = b->heap;
    b->msg = (Protoq__Message *)(b->pub + n);
    b->kv = (Protoq__KeyValue *)(b->msg + n);
    b->pubp = (Protoq__Publish **)(b->kv + kvs);
    b->kvp = (Protoq__KeyValue **)(b->pubp + n);
    return PQ_OK;
}

static void
msgbuf_fini(struct msgbuf *b)
{
    free(b->heap);
}

/* Fill kvs/ptrs from n pairs; returns the pointer array. */
static Protoq__KeyValue **
kv_to_wire(Protoq__KeyValue *kvs, Protoq__KeyValue **ptrs,
           const struct protoq_kv *src, size_t n)
{
    size_t i;

    for (i = 0; i < n; i++) {
        Protoq__KeyValue init = PROTOQ__KEY_VALUE__INIT;

        kvs[i] = init;
        kvs[i].key = S(src[i].key);
        kvs[i].value = S(src[i].value);
        ptrs[i] = &kvs[i];
    }
    return n ? ptrs : NULL;
}

/* Fill b->msg[i] and b->pub[i] from m; *kvi is the next free kv slot. */
static void
msg_to_wire(struct msgbuf *b, size_t i, size_t *kvi, const char *queue,
            const struct protoq_message *m)
{
    Protoq__Publish pinit = PROTOQ__PUBLISH__INIT;
    Protoq__Message minit = PROTOQ__MESSAGE__INIT;
    Protoq__Message *w = &b->msg[i];

    *w = minit;
    w->payload.data = (uint8_t *)(m->len ? m->payload : NULL);
    w->payload.len = m->len;
    w->n_headers = m->n_headers;
    w->headers = kv_to_wire(b->kv + *kvi, b->kvp + *kvi, m->headers,
                            m->n_headers);
    *kvi += m->n_headers;
    w->priority = m->priority;
    w->delay_ms = m->delay_ms;
    w->deliver_at_ms = m->deliver_at_ms;
    w->ttl_ms = m->ttl_ms;
    w->idempotency_key = S(m->idempotency_key);
    w->correlation_id = S(m->correlation_id);
    w->reply_to = S(m->reply_to);
    w->n_requires = m->n_requires;
    w->requires = kv_to_wire(b->kv + *kvi, b->kvp + *kvi, m->requires,
                             m->n_requires);
    *kvi += m->n_requires;
    b->pub[i] = pinit;
    b->pub[i].queue = S(queue);
    b->pub[i].message = w;
    b->pubp[i] = &b->pub[i];
}

static bool
msg_ok(protoq_client *c, const struct protoq_message *m)
{
    if (m == NULL) {
        set_err(c, PQ_EINVAL, "no message");
        return false;
    }
    if (m->len > 0 && m->payload == NULL) {
        set_err(c, PQ_EINVAL, "payload is NULL but len is %zu", m->len);
        return false;
    }
    if ((m->n_headers > 0 && m->headers == NULL) ||
        (m->n_requires > 0 && m->requires == NULL)) {
        set_err(c, PQ_EINVAL, "headers or requires missing");
        return false;
    }
    return true;
}

/* ---- publishing ---- */

/* protoq_publish_ex: one Publish, wait for its PublishOk (id and duplicate flag). */
int
protoq_publish_ex(protoq_client *c, const char *queue,
                  const struct protoq_message *msg, uint64_t *id_out,
                  bool *duplicate_out)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Frame *r;
    struct msgbuf b;
    size_t kvi = 0;
    int rc;

    if (id_out != NULL) {
        *id_out = 0;
    }
    if (duplicate_out != NULL) {
        *duplicate_out = false;
    }
    if (!name_ok(c, "queue", queue) || !msg_ok(c, msg)) {
        return PQ_EINVAL;
    }
    if (msgbuf_init(&b, msg, 1) != PQ_OK) {
        return set_err(c, PQ_ENOMEM, "out of memory (publish)");
    }
    msg_to_wire(&b, 0, &kvi, queue, msg);
    f.kind_case = PROTOQ__FRAME__KIND_PUBLISH;
    f.publish = &b.pub[0];
    rc = request(c, &f, PROTOQ__FRAME__KIND_PUBLISH_OK, &r);
    msgbuf_fini(&b);
    if (rc != PQ_OK) {
        return rc;
    }
    if (r->publish_ok->n_message_ids < 1) {
        frame_free(r);
        return set_err(c, PQ_EPROTO, "broker sent PublishOk without an id");
    }
    if (id_out != NULL) {
        *id_out = r->publish_ok->message_ids[0];
    }
    if (duplicate_out != NULL && r->publish_ok->n_duplicate > 0) {
        *duplicate_out = r->publish_ok->duplicate[0] != 0;
    }
    frame_free(r);
    return PQ_OK;
}

/* protoq_publish: protoq_publish_ex without the duplicate flag. */
int
protoq_publish(protoq_client *c, const char *queue,
               const struct protoq_message *msg, uint64_t *id_out)
{
    return protoq_publish_ex(c, queue, msg, id_out, NULL);
}

/* protoq_publish_async: buffer one Publish with a ring entry for its confirm callback. */
int
protoq_publish_async(protoq_client *c, const char *queue,
                     const struct protoq_message *msg, protoq_confirm_fn cb,
                     void *arg)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    struct pending *p;
    struct msgbuf b;
    size_t kvi = 0;
    uint64_t id;
    int rc;

    if (c->dead) {
        return dead_err(c);
    }
    if (!name_ok(c, "queue", queue) || !msg_ok(c, msg)) {
        return PQ_EINVAL;
    }
    if (msgbuf_init(&b, msg, 1) != PQ_OK) {
        return set_err(c, PQ_ENOMEM, "out of memory (publish)");
    }
    msg_to_wire(&b, 0, &kvi, queue, msg);
    f.kind_case = PROTOQ__FRAME__KIND_PUBLISH;
    f.publish = &b.pub[0];
    id = c->next_id++;
    f.request_id = id;
    p = pend_insert(c, id, PEND_CONFIRM);
    if (p == NULL) {
        msgbuf_fini(&b);
        return set_err(c, PQ_ENOMEM, "out of memory (request table)");
    }
    p->cb = cb;
    p->arg = arg;
    rc = send_frame(c, &f);
    msgbuf_fini(&b);
    if (rc == PQ_ETOOBIG || rc == PQ_ENOMEM) {
        /* Nothing was queued: take the entry back, no callback. */
        p = pend_find(c, id);
        if (p != NULL) {
            pend_remove(c, p);
        }
        return rc;
    }
    /* Other failures killed the connection; the callback already ran. */
    return rc;
}

static int
publish_batch(protoq_client *c, const char *queue, const char *const *queues,
              const struct protoq_message *msgs, size_t n, uint64_t *ids_out)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__PublishBatch pb = PROTOQ__PUBLISH_BATCH__INIT;
    Protoq__Frame *r;
    struct msgbuf b;
    size_t kvi = 0;
    size_t i;
    int rc;

    if (n == 0) {
        return set_err(c, PQ_EINVAL, "empty batch");
    }
    if (c->info.max_batch > 0 && n > c->info.max_batch) {
        return set_err(c, PQ_ETOOBIG, "batch of %zu messages is over the "
                       "broker's limit of %u", n, c->info.max_batch);
    }
    for (i = 0; i < n; i++) {
        const char *q = queues ? queues[i] : queue;

        if (!name_ok(c, "queue", q) || !msg_ok(c, &msgs[i])) {
            return PQ_EINVAL;
        }
    }
    if (msgbuf_init(&b, msgs, n) != PQ_OK) {
        return set_err(c, PQ_ENOMEM, "out of memory (batch)");
    }
    for (i = 0; i < n; i++) {
        msg_to_wire(&b, i, &kvi, queues ? queues[i] : queue, &msgs[i]);
    }
    pb.n_items = n;
    pb.items = b.pubp;
    f.kind_case = PROTOQ__FRAME__KIND_PUBLISH_BATCH;
    f.publish_batch = &pb;
    rc = request(c, &f, PROTOQ__FRAME__KIND_PUBLISH_OK, &r);
    msgbuf_fini(&b);
    if (rc != PQ_OK) {
        return rc;
    }
    if (r->publish_ok->n_message_ids != n) {
        rc = (int)r->publish_ok->n_message_ids;
        frame_free(r);
        return set_err(c, PQ_EPROTO, "broker confirmed %d of %zu messages",
                       rc, n);
    }
    if (ids_out != NULL) {
        memcpy(ids_out, r->publish_ok->message_ids, n * sizeof(*ids_out));
    }
    frame_free(r);
    return PQ_OK;
}

/* protoq_publish_batch: one atomic PublishBatch to one queue, wait for PublishOk. */
int
protoq_publish_batch(protoq_client *c, const char *queue,
                     const struct protoq_message *msgs, size_t n,
                     uint64_t *ids_out)
{
    return publish_batch(c, queue, NULL, msgs, n, ids_out);
}

/* protoq_publish_batch_multi: one atomic PublishBatch, a queue per message. */
int
protoq_publish_batch_multi(protoq_client *c, const char *const *queues,
                           const struct protoq_message *msgs, size_t n,
                           uint64_t *ids_out)
{
    if (queues == NULL) {
        return set_err(c, PQ_EINVAL, "no queues");
    }
    return publish_batch(c, NULL, queues, msgs, n, ids_out);
}

/* protoq_publish_route: Publish through a route, wait for PublishOk. */
int
protoq_publish_route(protoq_client *c, const char *route,
                     const char *routing_key, const struct protoq_message *msg,
                     uint64_t *ids_out, size_t max_ids, size_t *n_ids)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Frame *r;
    struct msgbuf b;
    size_t kvi = 0;
    size_t n;
    int rc;

    if (n_ids != NULL) {
        *n_ids = 0;
    }
    if (!name_ok(c, "route", route) || !msg_ok(c, msg)) {
        return PQ_EINVAL;
    }
    if (msgbuf_init(&b, msg, 1) != PQ_OK) {
        return set_err(c, PQ_ENOMEM, "out of memory (publish)");
    }
    msg_to_wire(&b, 0, &kvi, NULL, msg);
    b.pub[0].route = S(route);
    b.pub[0].routing_key = S(routing_key);
    f.kind_case = PROTOQ__FRAME__KIND_PUBLISH;
    f.publish = &b.pub[0];
    rc = request(c, &f, PROTOQ__FRAME__KIND_PUBLISH_OK, &r);
    msgbuf_fini(&b);
    if (rc != PQ_OK) {
        return rc;
    }
    n = r->publish_ok->n_message_ids;
    if (ids_out != NULL) {
        memcpy(ids_out, r->publish_ok->message_ids,
               (n < max_ids ? n : max_ids) * sizeof(*ids_out));
    }
    if (n_ids != NULL) {
        *n_ids = n;
    }
    frame_free(r);
    return PQ_OK;
}

/* protoq_wait_confirms: pump until at most max_outstanding async publishes are unconfirmed. */
int
protoq_wait_confirms(protoq_client *c, size_t max_outstanding, int timeout_ms)
{
    int64_t deadline = deadline_after(timeout_ms);
    int rc;

    if (c->dead) {
        return dead_err(c);
    }
    while (c->n_confirms > max_outstanding) {
        int left = remaining_ms(deadline);

        if (left == 0) {
            return set_err(c, PQ_ETIMEDOUT,
                           "%zu publishes still unconfirmed after %d ms",
                           c->n_confirms, timeout_ms);
        }
        rc = pump(c, left, true);
        if (rc < 0) {
            return rc;
        }
    }
    /* Send what is left even when nothing needed waiting for. */
    return c->out_len > c->out_start ? flush_all(c, true) : PQ_OK;
}

/* protoq_outstanding: async publishes not yet confirmed. */
size_t
protoq_outstanding(const protoq_client *c)
{
    return c->n_confirms;
}

/* protoq_flush: write all buffered output, dispatching what arrives. */
int
protoq_flush(protoq_client *c)
{
    return flush_all(c, true);
}

/* ---- consuming ---- */

/* protoq_subscribe: Subscribe; the callback is registered when SubscribeOk arrives. */
int
protoq_subscribe(protoq_client *c, const char *queue, uint32_t prefetch,
                 const struct protoq_kv *tags, size_t n_tags,
                 protoq_deliver_fn cb, void *arg, uint64_t *sub_id)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Subscribe s = PROTOQ__SUBSCRIBE__INIT;
    Protoq__KeyValue kv_inline[KV_STACK];
    Protoq__KeyValue *kvp_inline[KV_STACK];
    Protoq__KeyValue *kv = kv_inline;
    Protoq__KeyValue **kvp = kvp_inline;
    Protoq__Frame *r;
    struct waiter w;
    int rc;

    if (sub_id != NULL) {
        *sub_id = 0;
    }
    if (!name_ok(c, "queue", queue)) {
        return PQ_EINVAL;
    }
    if (cb == NULL || (n_tags > 0 && tags == NULL)) {
        return set_err(c, PQ_EINVAL, "subscribe needs a callback");
    }
    if (n_tags > KV_STACK) {
        kv = malloc(n_tags * sizeof(*kv));
        kvp = malloc(n_tags * sizeof(*kvp));
        if (kv == NULL || kvp == NULL) {
            free(kv);
            free(kvp);
            return set_err(c, PQ_ENOMEM, "out of memory (subscribe)");
        }
    }
    s.queue = S(queue);
    s.prefetch = prefetch;
    s.n_tags = n_tags;
    s.tags = kv_to_wire(kv, kvp, tags, n_tags);
    f.kind_case = PROTOQ__FRAME__KIND_SUBSCRIBE;
    f.subscribe = &s;
    memset(&w, 0, sizeof(w));
    w.sub_cb = cb;
    w.sub_arg = arg;
    rc = request_w(c, &f, PROTOQ__FRAME__KIND_SUBSCRIBE_OK, &r, &w);
    if (kv != kv_inline) {
        free(kv);
        free(kvp);
    }
    if (rc != PQ_OK) {
        return rc;
    }
    if (sub_id != NULL) {
        *sub_id = r->subscribe_ok->subscription_id;
    }
    frame_free(r);
    return PQ_OK;
}

/* protoq_unsubscribe: forget the subscription, then Unsubscribe and wait for Ok. */
int
protoq_unsubscribe(protoq_client *c, uint64_t sub_id)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Unsubscribe u = PROTOQ__UNSUBSCRIBE__INIT;
    size_t i;

    /* Forget it first: deliveries that cross the Unsubscribe are dropped
     * (they return to the queue when their lease or the connection ends). */
    for (i = 0; i < c->n_subs; i++) {
        if (c->subs[i].id == sub_id) {
            c->subs[i] = c->subs[--c->n_subs];
            break;
        }
    }
    u.subscription_id = sub_id;
    f.kind_case = PROTOQ__FRAME__KIND_UNSUBSCRIBE;
    f.unsubscribe = &u;
    return request_ok(c, &f, NULL);
}

/* protoq_flow: Flow (prefetch 0 pauses), wait for Ok. */
int
protoq_flow(protoq_client *c, uint64_t sub_id, uint32_t prefetch)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Flow fl = PROTOQ__FLOW__INIT;

    fl.subscription_id = sub_id;
    fl.prefetch = prefetch;
    f.kind_case = PROTOQ__FRAME__KIND_FLOW;
    f.flow = &fl;
    return request_ok(c, &f, NULL);
}

/* protoq_poll: pump until a callback ran or timeout_ms passed. */
int
protoq_poll(protoq_client *c, int timeout_ms)
{
    int64_t deadline = deadline_after(timeout_ms);
    int rc;

    for (;;) {
        rc = pump(c, remaining_ms(deadline), true);
        if (rc != 0 || (deadline >= 0 && remaining_ms(deadline) == 0)) {
            return rc;
        }
    }
}

/* protoq_ack_ex: Ack with result/follow-ups; waits only when opts->confirm. */
int
protoq_ack_ex(protoq_client *c, uint64_t message_id, uint32_t attempt,
              const struct protoq_ack_opts *opts)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Ack a = PROTOQ__ACK__INIT;
    struct msgbuf b;
    size_t kvi = 0;
    size_t i, n = opts ? opts->n_follow_ups : 0;
    int rc;

    a.message_id = message_id;
    a.attempt = attempt;
    f.kind_case = PROTOQ__FRAME__KIND_ACK;
    f.ack = &a;
    if (opts == NULL) {
        return send_noreply(c, &f);
    }
    a.confirm = opts->confirm;
    a.result.data = (uint8_t *)(opts->result_len ? opts->result : NULL);
    a.result.len = opts->result_len;
    if (n > 0) {
        if (opts->follow_up_queues == NULL || opts->follow_ups == NULL) {
            return set_err(c, PQ_EINVAL, "follow-ups without queues");
        }
        for (i = 0; i < n; i++) {
            if (!name_ok(c, "queue", opts->follow_up_queues[i]) ||
                !msg_ok(c, &opts->follow_ups[i])) {
                return PQ_EINVAL;
            }
        }
    }
    if (msgbuf_init(&b, opts->follow_ups, n) != PQ_OK) {
        return set_err(c, PQ_ENOMEM, "out of memory (ack)");
    }
    for (i = 0; i < n; i++) {
        msg_to_wire(&b, i, &kvi, opts->follow_up_queues[i],
                    &opts->follow_ups[i]);
    }
    a.n_follow_ups = n;
    a.follow_ups = n ? b.pubp : NULL;
    rc = opts->confirm ? request_ok(c, &f, NULL) : send_noreply(c, &f);
    msgbuf_fini(&b);
    return rc;
}

/* protoq_ack: buffered Ack without confirm (no reply on success). */
int
protoq_ack(protoq_client *c, uint64_t message_id, uint32_t attempt)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Ack a = PROTOQ__ACK__INIT;

    a.message_id = message_id;
    a.attempt = attempt;
    f.kind_case = PROTOQ__FRAME__KIND_ACK;
    f.ack = &a;
    return send_noreply(c, &f);
}

/* protoq_ack_sync: Ack with confirm, wait for the durable Ok. */
int
protoq_ack_sync(protoq_client *c, uint64_t message_id, uint32_t attempt)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Ack a = PROTOQ__ACK__INIT;

    a.message_id = message_id;
    a.attempt = attempt;
    a.confirm = true;
    f.kind_case = PROTOQ__FRAME__KIND_ACK;
    f.ack = &a;
    return request_ok(c, &f, NULL);
}

static int
nack(protoq_client *c, uint64_t message_id, uint32_t attempt,
     uint64_t delay_ms, bool dead_letter, const char *error_text,
     bool confirm)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Nack nk = PROTOQ__NACK__INIT;

    nk.message_id = message_id;
    nk.attempt = attempt;
    nk.confirm = confirm;
    nk.delay_ms = delay_ms;
    nk.dead_letter = dead_letter;
    nk.error = S(error_text);
    f.kind_case = PROTOQ__FRAME__KIND_NACK;
    f.nack = &nk;
    return confirm ? request_ok(c, &f, NULL) : send_noreply(c, &f);
}

/* protoq_nack: buffered Nack without confirm. */
int
protoq_nack(protoq_client *c, uint64_t message_id, uint32_t attempt,
            uint64_t delay_ms, bool dead_letter, const char *error_text)
{
    return nack(c, message_id, attempt, delay_ms, dead_letter, error_text,
                false);
}

/* protoq_nack_sync: Nack with confirm, wait for the durable Ok. */
int
protoq_nack_sync(protoq_client *c, uint64_t message_id, uint32_t attempt,
                 uint64_t delay_ms, bool dead_letter, const char *error_text)
{
    return nack(c, message_id, attempt, delay_ms, dead_letter, error_text,
                true);
}

static void
progress_to_wire(Protoq__Progress *w, const struct protoq_progress *p)
{
    w->percent = p->percent;
    w->text = S(p->text);
    w->checkpoint = S(p->checkpoint);
}

/* protoq_touch: Touch, wait for TouchOk. */
int
protoq_touch(protoq_client *c, uint64_t message_id, uint32_t attempt,
             uint64_t extend_ms, const struct protoq_progress *progress,
             uint64_t *lease_ms)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Touch t = PROTOQ__TOUCH__INIT;
    Protoq__Progress pw = PROTOQ__PROGRESS__INIT;
    Protoq__Frame *r;
    int rc;

    if (lease_ms != NULL) {
        *lease_ms = 0;
    }
    t.message_id = message_id;
    t.attempt = attempt;
    t.extend_ms = extend_ms;
    if (progress != NULL) {
        progress_to_wire(&pw, progress);
        t.progress = &pw;
    }
    f.kind_case = PROTOQ__FRAME__KIND_TOUCH;
    f.touch = &t;
    rc = request(c, &f, PROTOQ__FRAME__KIND_TOUCH_OK, &r);
    if (rc != PQ_OK) {
        return rc;
    }
    if (lease_ms != NULL) {
        *lease_ms = r->touch_ok->lease_ms;
    }
    frame_free(r);
    return PQ_OK;
}

/* protoq_release: Release; waits for Ok only when confirm. */
int
protoq_release(protoq_client *c, uint64_t message_id, uint32_t attempt,
               enum protoq_release_reason reason,
               const struct protoq_progress *progress, bool confirm)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Release rl = PROTOQ__RELEASE__INIT;
    Protoq__Progress pw = PROTOQ__PROGRESS__INIT;

    rl.message_id = message_id;
    rl.attempt = attempt;
    rl.reason = (Protoq__ReleaseReason)reason;
    rl.confirm = confirm;
    if (progress != NULL) {
        progress_to_wire(&pw, progress);
        rl.progress = &pw;
    }
    f.kind_case = PROTOQ__FRAME__KIND_RELEASE;
    f.release = &rl;
    return confirm ? request_ok(c, &f, NULL) : send_noreply(c, &f);
}

/* protoq_cancel: Cancel, wait for Ok. */
int
protoq_cancel(protoq_client *c, const char *queue, uint64_t message_id)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Cancel cn = PROTOQ__CANCEL__INIT;

    if (!name_ok(c, "queue", queue)) {
        return PQ_EINVAL;
    }
    cn.queue = S(queue);
    cn.message_id = message_id;
    f.kind_case = PROTOQ__FRAME__KIND_CANCEL;
    f.cancel = &cn;
    return request_ok(c, &f, NULL);
}

/* protoq_set_cancel_cb: set the CancelRequested callback. */
void
protoq_set_cancel_cb(protoq_client *c, protoq_cancel_fn cb, void *arg)
{
    c->cancel_cb = cb;
    c->cancel_arg = arg;
}

/* protoq_set_error_cb: set the async error callback. */
void
protoq_set_error_cb(protoq_client *c, protoq_error_fn cb, void *arg)
{
    c->error_cb = cb;
    c->error_arg = arg;
}

/* protoq_async_errors: count of async errors so far. */
uint64_t
protoq_async_errors(const protoq_client *c)
{
    return c->async_errors;
}
