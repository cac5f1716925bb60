/*
 * record.c: encode and decode record bodies (layout in record.h). The
 * encoder and decoder are written as one field list per type, walked by a
 * writer (struct wbuf) or a reader (struct rbuf); both are bounds-checked
 * at every field, so a hostile or damaged body can only produce
 * PQ_ECORRUPT, never a read past its end. Decoded strings and bytes point
 * into the caller's body; nothing is allocated here.
 */
#include "record.h"
#include "byteorder.h"

#include <string.h>

#include "pqerr.h"

/* ---- writer ---- */

/* A writer that counts when buf is NULL (size pass) and stops writing,
 * but keeps counting, once cap is exceeded. */
enum { DELIVER_ITEM_LEN = 12 }; /* a REC_DELIVER item: id u64, attempt u32 */

struct wbuf {
    uint8_t *buf;
    size_t cap;
    size_t len;
    bool invalid; /* inconsistent input (caller bug) */
};

static void
w_raw(struct wbuf *w, const void *p, size_t n)
{
    if (w->buf != NULL && w->len <= w->cap && n <= w->cap - w->len && n > 0) {
        memcpy(w->buf + w->len, p, n);
    }
    w->len += n;
}

static void
w_u8(struct wbuf *w, uint8_t v)
{
    w_raw(w, &v, 1);
}

static void
w_u32(struct wbuf *w, uint32_t v)
{
    uint8_t b[4];

    le32_put(b, v);
    w_raw(w, b, 4);
}

static void
w_u64(struct wbuf *w, uint64_t v)
{
    uint8_t b[8];

    le64_put(b, v);
    w_raw(w, b, 8);
}

static void
w_blob(struct wbuf *w, const void *p, uint32_t n)
{
    w_u32(w, n);
    if (n > 0 && p == NULL) {
        w->invalid = true; /* a length without data */
        return;
    }
    w_raw(w, p, n);
}

static void
w_str(struct wbuf *w, struct rec_str s)
{
    w_blob(w, s.ptr, s.len);
}

static void
w_bytes(struct wbuf *w, struct rec_bytes b)
{
    w_blob(w, b.ptr, b.len);
}

/* ---- reader ---- */

struct rbuf {
    const uint8_t *p;
    size_t len;
    size_t off;
    bool bad; /* ran past the end or bad value */
};

static bool
r_need(struct rbuf *r, size_t n)
{
    if (r->bad || n > r->len - r->off) {
        r->bad = true;
        return false;
    }
    return true;
}

static uint8_t
r_u8(struct rbuf *r)
{
    if (!r_need(r, 1)) {
        return 0;
    }
    return r->p[r->off++];
}

static bool
r_bool(struct rbuf *r)
{
    uint8_t v = r_u8(r);

    if (v > 1) {
        r->bad = true;
    }
    return v == 1;
}

static uint32_t
r_u32(struct rbuf *r)
{
    uint32_t v;

    if (!r_need(r, 4)) {
        return 0;
    }
    v = le32_get(r->p + r->off);
    r->off += 4;
    return v;
}

static uint64_t
r_u64(struct rbuf *r)
{
    uint64_t v;

    if (!r_need(r, 8)) {
        return 0;
    }
    v = le64_get(r->p + r->off);
    r->off += 8;
    return v;
}

static const uint8_t *
r_blob(struct rbuf *r, uint32_t *n)
{
    const uint8_t *p;

    *n = r_u32(r);
    if (!r_need(r, *n)) {
        *n = 0;
        return NULL;
    }
    p = r->p + r->off;
    r->off += *n;
    return p;
}

static struct rec_str
r_str(struct rbuf *r)
{
    struct rec_str s;

    s.ptr = (const char *)r_blob(r, &s.len);
    return s;
}

/* r_name: a string into buf (a NUL-terminated copy); one that does not
 * fit, or holds a NUL, makes the record bad. */
static void
r_name(struct rbuf *r, char *buf, size_t cap)
{
    uint32_t n;
    const uint8_t *p = r_blob(r, &n);

    buf[0] = '\0';
    if (p == NULL) {
        return;
    }
    if (n >= cap || memchr(p, '\0', n) != NULL) {
        r->bad = true;
        return;
    }
    memcpy(buf, p, n);
    buf[n] = '\0';
}

static struct rec_bytes
r_bytes(struct rbuf *r)
{
    struct rec_bytes b;

    b.ptr = r_blob(r, &b.len);
    return b;
}

/* ---- per-type field lists ---- */

static void enc_body(struct wbuf *w, const struct record *r);

/* The inner record of an atomic one: only these may be wrapped. */
static bool
atomic_inner_ok(uint8_t type)
{
    return type == REC_ACK || type == REC_DEAD_LETTER || type == REC_DROP;
}

/* A nested record body with its u32 length: a size pass, then the body. */
static void
w_nested(struct wbuf *w, const struct record *r)
{
    struct wbuf size = {0};

    enc_body(&size, r);
    if (size.invalid || size.len > UINT32_MAX) {
        w->invalid = true;
        return;
    }
    w_u32(w, (uint32_t)size.len);
    enc_body(w, r);
}

static void
enc_atomic(struct wbuf *w, const struct rec_atomic *a)
{
    struct record pub = {.type = REC_PUBLISH};

    /* Either form: the encode form (inner, pubs), or what record_decode
     * gave (inner_raw, pubs_raw), which encodes back to the same bytes. */
    if (!atomic_inner_ok(a->inner_type) || a->n == 0 ||
        (a->inner != NULL ? a->inner->type != a->inner_type
                          : a->inner_raw.ptr == NULL) ||
        (a->pubs == NULL && a->pubs_raw.ptr == NULL)) {
        w->invalid = true;
        return;
    }
    w_u8(w, a->inner_type);
    if (a->inner != NULL) {
        w_nested(w, a->inner);
    } else {
        w_bytes(w, a->inner_raw);
    }
    w_u32(w, a->n);
    if (a->pubs == NULL) {
        w_raw(w, a->pubs_raw.ptr, a->pubs_raw.len);
        return;
    }
    for (uint32_t i = 0; i < a->n; i++) {
        pub.u.publish = a->pubs[i];
        w_nested(w, &pub);
    }
}

static void
dec_atomic(struct rbuf *rb, struct rec_atomic *a)
{
    struct record inner;
    size_t start;

    a->inner_type = r_u8(rb);
    a->inner_raw = r_bytes(rb);
    a->n = r_u32(rb);
    if (rb->bad || !atomic_inner_ok(a->inner_type) || a->n == 0 ||
        record_decode(a->inner_type, a->inner_raw.ptr, a->inner_raw.len,
                      &inner) != PQ_OK ||
        a->n > (rb->len - rb->off) / 4) {
        rb->bad = true;
        return;
    }
    start = rb->off;
    for (uint32_t i = 0; i < a->n && !rb->bad; i++) {
        struct rec_bytes b = r_bytes(rb);

        if (!rb->bad &&
            record_decode(REC_PUBLISH, b.ptr, b.len, &inner) != PQ_OK) {
            rb->bad = true;
        }
    }
    a->pubs_raw.ptr = rb->p + start;
    a->pubs_raw.len = (uint32_t)(rb->off - start);
}

static void
enc_publish(struct wbuf *w, const struct rec_publish *p)
{
    size_t cur = 0;
    uint32_t n = 0;
    struct rec_kv kv;

    w_u64(w, p->id);
    w_str(w, p->queue);
    w_u8(w, p->priority);
    w_u32(w, p->attempt);
    w_u32(w, p->failures);
    w_u64(w, p->published_wall_ms);
    w_u64(w, p->deliver_at_wall_ms);
    w_u64(w, p->expire_wall_ms);
    w_str(w, p->idem_key);
    w_u32(w, p->n_requires);
    while (record_publish_next_require(p, &cur, &kv)) {
        w_str(w, kv.key);
        w_str(w, kv.value);
        n++;
    }
    if (n != p->n_requires) {
        w->invalid = true;
    }
    w_bytes(w, p->progress);
    w_bytes(w, p->body);
}

static void
dec_publish(struct rbuf *rb, struct rec_publish *p)
{
    size_t start;

    p->id = r_u64(rb);
    p->queue = r_str(rb);
    p->priority = r_u8(rb);
    p->attempt = r_u32(rb);
    p->failures = r_u32(rb);
    p->published_wall_ms = r_u64(rb);
    p->deliver_at_wall_ms = r_u64(rb);
    p->expire_wall_ms = r_u64(rb);
    p->idem_key = r_str(rb);
    p->n_requires = r_u32(rb);
    p->requires = NULL;
    start = rb->off;
    /* Each pair takes at least 8 bytes: bound the loop by the input. */
    if (!rb->bad && p->n_requires > (rb->len - rb->off) / 8) {
        rb->bad = true;
        return;
    }
    for (uint32_t i = 0; i < p->n_requires && !rb->bad; i++) {
        (void)r_str(rb);
        (void)r_str(rb);
    }
    p->requires_raw.ptr = rb->p + start;
    p->requires_raw.len = (uint32_t)(rb->off - start);
    p->progress = r_bytes(rb);
    p->body = r_bytes(rb);
}

/* One publish body of a batch, whole: nothing short, nothing left over. */
static void
dec_batch_item(struct rbuf *rb, struct rec_publish *p)
{
    uint32_t len;
    const uint8_t *item = r_blob(rb, &len);
    struct rbuf sub = {.p = item, .len = len};

    if (rb->bad) {
        return;
    }
    dec_publish(&sub, p);
    if (sub.bad || sub.off != sub.len) {
        rb->bad = true;
    }
}

static void
enc_body(struct wbuf *w, const struct record *r)
{
    switch (r->type) {
    case REC_QUEUE_CREATE: {
        const struct rec_queue_create *q = &r->u.queue_create;
        w_str(w, q->name);
        w_u8(w, q->attrs.transient ? 1 : 0);
        w_u64(w, q->attrs.max_length);
        w_u64(w, q->attrs.max_bytes);
        w_u64(w, q->attrs.ack_timeout_ms);
        w_u32(w, q->attrs.max_attempts);
        w_blob(w, q->attrs.dead_letter, strlen(q->attrs.dead_letter));
        w_u64(w, q->attrs.backoff_base_ms);
        w_u64(w, q->attrs.backoff_cap_ms);
        w_u64(w, q->attrs.ttl_ms);
        w_u64(w, q->attrs.dedup_window_ms);
        w_u64(w, q->attrs.max_lease_ms);
        w_u8(w, q->attrs.dead_letter_expired ? 1 : 0);
        break;
    }
    case REC_QUEUE_DELETE:
        w_str(w, r->u.queue_delete.name);
        break;
    case REC_QUEUE_PURGE: {
        const struct rec_queue_purge *p = &r->u.queue_purge;
        w_str(w, p->name);
        w_u32(w, p->n_keep);
        if (p->n_keep > 0 && p->keep_ids == NULL && p->keep_le == NULL) {
            w->invalid = true;
            break;
        }
        for (uint32_t i = 0; i < p->n_keep; i++) {
            w_u64(w, record_purge_keep_id(p, i));
        }
        break;
    }
    case REC_PUBLISH:
        enc_publish(w, &r->u.publish);
        break;
    case REC_PUBLISH_BATCH: {
        const struct rec_publish_batch *b = &r->u.batch;
        if (b->n == 0 || (b->items == NULL && b->raw.ptr == NULL)) {
            w->invalid = true;
            break;
        }
        w_u32(w, b->n);
        for (uint32_t i = 0; i < b->n && b->items != NULL; i++) {
            struct wbuf sz = {0};

            enc_publish(&sz, &b->items[i]);
            w->invalid |= sz.invalid || sz.len > UINT32_MAX;
            w_u32(w, (uint32_t)sz.len);
            enc_publish(w, &b->items[i]);
        }
        if (b->items == NULL) {
            w_raw(w, b->raw.ptr, b->raw.len);
        }
        break;
    }
    case REC_ROUTE_BIND:
    case REC_ROUTE_UNBIND:
        w_str(w, r->u.route.route);
        w_str(w, r->u.route.queue);
        w_str(w, r->u.route.pattern);
        break;
    case REC_ACK:
        w_u64(w, r->u.ack.id);
        break;
    case REC_REQUEUE:
        w_u64(w, r->u.requeue.id);
        w_u32(w, r->u.requeue.attempt);
        w_u32(w, r->u.requeue.failures);
        w_u64(w, r->u.requeue.deliver_at_wall_ms);
        break;
    case REC_DEAD_LETTER:
        w_u64(w, r->u.dead_letter.id);
        w_str(w, r->u.dead_letter.target);
        w_str(w, r->u.dead_letter.reason);
        w_bytes(w, r->u.dead_letter.body);
        break;
    case REC_DROP:
        w_u64(w, r->u.drop.id);
        w_str(w, r->u.drop.reason);
        break;
    case REC_PROGRESS:
        w_u64(w, r->u.progress.id);
        w_bytes(w, r->u.progress.progress);
        break;
    case REC_ATOMIC:
        enc_atomic(w, &r->u.atomic);
        break;
    case REC_DELIVER: {
        const struct rec_deliver *d = &r->u.deliver;
        if (d->n == 0 || (d->items == NULL && d->items_le == NULL)) {
            w->invalid = true;
            break;
        }
        w_u32(w, d->n);
        for (uint32_t i = 0; i < d->n; i++) {
            struct rec_deliver_item it = record_deliver_item(d, i);

            w_u64(w, it.id);
            w_u32(w, it.attempt);
        }
        break;
    }
    case REC_SEG_START:
        w_u32(w, r->u.seg_start.prev_seq);
        w_u64(w, r->u.seg_start.prev_end);
        break;
    default:
        break;
    }
}

static void
dec_body(struct rbuf *rb, struct record *r)
{
    switch (r->type) {
    case REC_QUEUE_CREATE: {
        struct rec_queue_create *q = &r->u.queue_create;
        q->name = r_str(rb);
        q->attrs.transient = r_bool(rb);
        q->attrs.max_length = r_u64(rb);
        q->attrs.max_bytes = r_u64(rb);
        q->attrs.ack_timeout_ms = r_u64(rb);
        q->attrs.max_attempts = r_u32(rb);
        r_name(rb, q->attrs.dead_letter, sizeof(q->attrs.dead_letter));
        q->attrs.backoff_base_ms = r_u64(rb);
        q->attrs.backoff_cap_ms = r_u64(rb);
        q->attrs.ttl_ms = r_u64(rb);
        q->attrs.dedup_window_ms = r_u64(rb);
        q->attrs.max_lease_ms = r_u64(rb);
        q->attrs.dead_letter_expired = r_bool(rb);
        q->attrs.no_backoff =
            q->attrs.backoff_base_ms == 0 && q->attrs.backoff_cap_ms == 0;
        break;
    }
    case REC_QUEUE_DELETE:
        r->u.queue_delete.name = r_str(rb);
        break;
    case REC_QUEUE_PURGE: {
        struct rec_queue_purge *p = &r->u.queue_purge;
        p->name = r_str(rb);
        p->n_keep = r_u32(rb);
        p->keep_ids = NULL;
        /* Divide instead of multiplying: n_keep is untrusted. */
        if (!rb->bad && p->n_keep > (rb->len - rb->off) / 8) {
            rb->bad = true;
            break;
        }
        p->keep_le = rb->p + rb->off;
        rb->off += (size_t)p->n_keep * 8;
        break;
    }
    case REC_PUBLISH:
        dec_publish(rb, &r->u.publish);
        break;
    case REC_PUBLISH_BATCH: {
        struct rec_publish_batch *b = &r->u.batch;
        struct rec_publish item;
        size_t start;
        b->n = r_u32(rb);
        b->items = NULL;
        start = rb->off;
        /* Each item takes at least 4 bytes: bound the loop by the input. */
        if (!rb->bad && (b->n == 0 || b->n > (rb->len - rb->off) / 4)) {
            rb->bad = true;
            break;
        }
        for (uint32_t i = 0; i < b->n && !rb->bad; i++) {
            dec_batch_item(rb, &item);
        }
        b->raw.ptr = rb->p + start;
        b->raw.len = (uint32_t)(rb->off - start);
        break;
    }
    case REC_ROUTE_BIND:
    case REC_ROUTE_UNBIND:
        r->u.route.route = r_str(rb);
        r->u.route.queue = r_str(rb);
        r->u.route.pattern = r_str(rb);
        break;
    case REC_ACK:
        r->u.ack.id = r_u64(rb);
        break;
    case REC_REQUEUE:
        r->u.requeue.id = r_u64(rb);
        r->u.requeue.attempt = r_u32(rb);
        r->u.requeue.failures = r_u32(rb);
        r->u.requeue.deliver_at_wall_ms = r_u64(rb);
        break;
    case REC_DEAD_LETTER:
        r->u.dead_letter.id = r_u64(rb);
        r->u.dead_letter.target = r_str(rb);
        r->u.dead_letter.reason = r_str(rb);
        r->u.dead_letter.body = r_bytes(rb);
        break;
    case REC_DROP:
        r->u.drop.id = r_u64(rb);
        r->u.drop.reason = r_str(rb);
        break;
    case REC_PROGRESS:
        r->u.progress.id = r_u64(rb);
        r->u.progress.progress = r_bytes(rb);
        break;
    case REC_ATOMIC:
        dec_atomic(rb, &r->u.atomic);
        break;
    case REC_DELIVER: {
        struct rec_deliver *d = &r->u.deliver;
        d->n = r_u32(rb);
        d->items = NULL;
        /* Divide instead of multiplying: n is untrusted. */
        if (!rb->bad &&
            (d->n == 0 || d->n > (rb->len - rb->off) / DELIVER_ITEM_LEN)) {
            rb->bad = true;
            break;
        }
        d->items_le = rb->p + rb->off;
        rb->off += (size_t)d->n * DELIVER_ITEM_LEN;
        break;
    }
    case REC_SEG_START:
        r->u.seg_start.prev_seq = r_u32(rb);
        r->u.seg_start.prev_end = r_u64(rb);
        break;
    default:
        rb->bad = true;
        break;
    }
}

static bool
type_known(uint8_t type)
{
    return (type >= REC_QUEUE_CREATE && type <= REC_PROGRESS) ||
           type == REC_ATOMIC ||
           (type >= REC_ROUTE_BIND && type <= REC_DELIVER) ||
           type == REC_SEG_START;
}

bool
record_type_known(uint8_t type)
{
    return type_known(type);
}

/* ---- public ---- */

/* record_encoded_size: see record.h. */
ssize_t
record_encoded_size(const struct record *r)
{
    struct wbuf w = {0};

    if (!type_known(r->type)) {
        return PQ_EINVAL;
    }
    enc_body(&w, r);
    if (w.invalid) {
        return PQ_EINVAL;
    }
    if (w.len > RECORD_BODY_MAX) {
        return PQ_ETOOBIG;
    }
    return (ssize_t)w.len;
}

/* record_encode: see record.h. */
ssize_t
record_encode(const struct record *r, uint8_t *buf, size_t cap)
{
    ssize_t need = record_encoded_size(r);
    struct wbuf w = {.buf = buf, .cap = cap};

    if (need < 0) {
        return need;
    }
    if ((size_t)need > cap || buf == NULL) {
        return PQ_ETOOBIG;
    }
    enc_body(&w, r);
    return (ssize_t)w.len;
}

/* record_decode: see record.h. */
int
record_decode(uint8_t type, const uint8_t *body, size_t len, struct record *out)
{
    struct rbuf rb = {.p = body, .len = len};

    memset(out, 0, sizeof(*out));
    out->type = type;
    if (!type_known(type)) {
        return PQ_EVERSION;
    }
    if (body == NULL && len > 0) {
        return PQ_EINVAL;
    }
    dec_body(&rb, out);
    if (rb.bad || rb.off != rb.len) {
        return PQ_ECORRUPT;
    }
    return PQ_OK;
}

/* record_type_name: see record.h. */
const char *
record_type_name(uint8_t type)
{
    static const char *const names[] = {
        [REC_QUEUE_CREATE] = "queue_create",
        [REC_QUEUE_DELETE] = "queue_delete",
        [REC_QUEUE_PURGE] = "queue_purge",
        [REC_PUBLISH] = "publish",
        [REC_ACK] = "ack",
        [REC_REQUEUE] = "requeue",
        [REC_DEAD_LETTER] = "dead_letter",
        [REC_DROP] = "drop",
        [REC_PROGRESS] = "progress",
        [REC_ROUTE_BIND] = "route_bind",
        [REC_ROUTE_UNBIND] = "route_unbind",
        [REC_PUBLISH_BATCH] = "publish_batch",
        [REC_ATOMIC] = "atomic",
        [REC_DELIVER] = "deliver",
        [REC_SEG_START] = "seg_start",
    };

    if (!type_known(type)) {
        return "unknown";
    }
    return names[type];
}

/* record_purge_keep_id: see record.h. */
uint64_t
record_purge_keep_id(const struct rec_queue_purge *p, uint32_t i)
{
    uint64_t v = 0;

    if (p->keep_ids != NULL) {
        return p->keep_ids[i];
    }
    for (int k = 0; k < 8; k++) {
        v |= (uint64_t)p->keep_le[(size_t)i * 8 + (size_t)k] << (8 * k);
    }
    return v;
}

/* record_deliver_item: see record.h. */
struct rec_deliver_item
record_deliver_item(const struct rec_deliver *d, uint32_t i)
{
    struct rec_deliver_item it;
    const uint8_t *p;

    if (d->items != NULL) {
        return d->items[i];
    }
    p = d->items_le + (size_t)i * DELIVER_ITEM_LEN;
    it.id = le64_get(p);
    it.attempt = le32_get(p + 8);
    return it;
}

/* record_publish_next_require: see record.h. In the encode form the
 * cursor is an index; in the decode form a byte offset into requires_raw
 * (already validated by record_decode). */
bool
record_publish_next_require(const struct rec_publish *p, size_t *cursor,
                            struct rec_kv *kv)
{
    struct rbuf rb;

    if (p->requires != NULL) {
        if (*cursor >= p->n_requires) {
            return false;
        }
        *kv = p->requires[(*cursor)++];
        return true;
    }
    rb = (struct rbuf){
        .p = p->requires_raw.ptr, .len = p->requires_raw.len, .off = *cursor};
    if (rb.p == NULL || rb.off >= rb.len) {
        return false;
    }
    kv->key = r_str(&rb);
    kv->value = r_str(&rb);
    if (rb.bad) {
        return false;
    }
    *cursor = rb.off;
    return true;
}

/* record_batch_next: see record.h. In the encode form the cursor is an
 * index; in the decode form a byte offset into raw (already validated by
 * record_decode). */
bool
record_batch_next(const struct rec_publish_batch *b, size_t *cursor,
                  struct rec_publish *p)
{
    struct rbuf rb;

    if (b->items != NULL) {
        if (*cursor >= b->n) {
            return false;
        }
        *p = b->items[(*cursor)++];
        return true;
    }
    rb = (struct rbuf){.p = b->raw.ptr, .len = b->raw.len, .off = *cursor};
    if (rb.p == NULL || rb.off >= rb.len) {
        return false;
    }
    memset(p, 0, sizeof(*p));
    dec_batch_item(&rb, p);
    if (rb.bad) {
        return false;
    }
    *cursor = rb.off;
    return true;
}

/* record_atomic_inner: see record.h. */
int
record_atomic_inner(const struct rec_atomic *a, struct record *out)
{
    if (a->inner != NULL) {
        *out = *a->inner;
        return PQ_OK;
    }
    return record_decode(a->inner_type, a->inner_raw.ptr, a->inner_raw.len,
                         out);
}

/* record_atomic_next_publish: see record.h. The cursor is an index in the
 * encode form, a byte offset into pubs_raw in the decode form. */
bool
record_atomic_next_publish(const struct rec_atomic *a, size_t *cursor,
                           struct rec_bytes *raw, struct rec_publish *out)
{
    struct rbuf rb;
    struct record r;

    if (a->pubs != NULL) {
        if (*cursor >= a->n) {
            return false;
        }
        raw->ptr = NULL;
        raw->len = 0;
        if (out != NULL) {
            *out = a->pubs[*cursor];
        }
        (*cursor)++;
        return true;
    }
    rb = (struct rbuf){
        .p = a->pubs_raw.ptr, .len = a->pubs_raw.len, .off = *cursor};
    if (rb.p == NULL || rb.off >= rb.len) {
        return false;
    }
    *raw = r_bytes(&rb);
    if (rb.bad || record_decode(REC_PUBLISH, raw->ptr, raw->len, &r) != PQ_OK) {
        return false;
    }
    if (out != NULL) {
        *out = r.u.publish;
    }
    *cursor = rb.off;
    return true;
}
