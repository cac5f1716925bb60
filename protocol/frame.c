/*
 * frame.c: see frame.h. The hand-written parts (the length prefix and the
 * Deliver splice) follow the protobuf wire format exactly: a field is a
 * varint key (number << 3 | wire type), then a varint value (type 0) or a
 * varint length and that many bytes (type 2). tests/unit/check_frame.c
 * decodes every spliced frame with protobuf-c to hold this file to it.
 */
#include "frame.h"
#include "pbwire.h"
#include "pqerr.h"

#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

ssize_t
frame_check_header(const uint8_t *buf, size_t len, uint32_t max_bytes)
{
    uint32_t n;

    if (len < FRAME_HEADER_LEN) {
        return PQ_EAGAIN;
    }
    n = (uint32_t)buf[0] << 24 | (uint32_t)buf[1] << 16 |
        (uint32_t)buf[2] << 8 | (uint32_t)buf[3];
    if (n == 0) {
        return PQ_EPROTO;
    }
    if (n > max_bytes) {
        return PQ_ETOOBIG;
    }
    return (ssize_t)n;
}

/* ---- budgeted allocator for protobuf-c ---- */

struct budget {
    size_t left;
    int exceeded;
};

/* Each block records its size so frees give the budget back. */
static void *
budget_alloc(void *data, size_t size)
{
    struct budget *b = data;
    size_t need = size + 16;
    unsigned char *p;

    if (size > b->left || need > b->left) {
        b->exceeded = 1;
        return NULL;
    }
    p = malloc(need);
    if (p == NULL) {
        return NULL;
    }
    b->left -= need;
    memcpy(p, &need, sizeof(need));
    return p + 16;
}

static void
budget_free(void *data, void *ptr)
{
    struct budget *b = data;
    unsigned char *p;
    size_t need;

    if (ptr == NULL) {
        return;
    }
    p = (unsigned char *)ptr - 16;
    memcpy(&need, p, sizeof(need));
    if (b != NULL) {
        b->left += need;
    }
    free(p);
}

/* Frees after the decode are not counted: the budget is gone by then. */
static void
plain_free(void *data, void *ptr)
{
    (void)data;
    budget_free(NULL, ptr);
}

static ProtobufCAllocator free_allocator = {
    .alloc = NULL,
    .free = plain_free,
    .allocator_data = NULL,
};

size_t
frame_decode_budget(size_t len)
{
    /* Real frames need well under 24x (a batch of tiny messages is the
     * worst legitimate case); 64 KiB covers fixed overheads. */
    return 24 * len + 65536;
}

int
frame_unpack(const uint8_t *body, size_t len, size_t budget_bytes,
             Protoq__Frame **out)
{
    struct budget b = {.left = budget_bytes, .exceeded = 0};
    ProtobufCAllocator a = {
        .alloc = budget_alloc, .free = budget_free, .allocator_data = &b};
    Protoq__Frame *f;

    *out = NULL;
    f = protoq__frame__unpack(&a, len, body);
    if (f == NULL) {
        return b.exceeded ? PQ_ETOOBIG : PQ_EPROTO;
    }
    *out = f;
    return PQ_OK;
}

void
frame_free(Protoq__Frame *f)
{
    if (f != NULL) {
        protoq__frame__free_unpacked(f, &free_allocator);
    }
}

size_t
frame_packed_size(const Protoq__Frame *f)
{
    return FRAME_HEADER_LEN + protoq__frame__get_packed_size(f);
}

size_t
frame_pack(const Protoq__Frame *f, uint8_t *out)
{
    size_t n = protoq__frame__pack(f, out + FRAME_HEADER_LEN);

    out[0] = (uint8_t)(n >> 24);
    out[1] = (uint8_t)(n >> 16);
    out[2] = (uint8_t)(n >> 8);
    out[3] = (uint8_t)n;
    return FRAME_HEADER_LEN + n;
}

/* ---- protobuf primitives ---- */

static size_t
key_size(unsigned field)
{
    return pbwire_varint_size((uint64_t)field << 3);
}

/* A varint field, omitted when 0 as proto3 does. */
static size_t
varint_field_size(unsigned field, uint64_t v)
{
    return v == 0 ? 0 : key_size(field) + pbwire_varint_size(v);
}

static size_t
put_varint_field(uint8_t *p, unsigned field, uint64_t v)
{
    size_t n;

    if (v == 0) {
        return 0;
    }
    n = pbwire_put_varint(p, (uint64_t)field << 3 | PBWIRE_VARINT);
    return n + pbwire_put_varint(p + n, v);
}

static size_t
len_field_size(unsigned field, size_t len)
{
    return key_size(field) + pbwire_varint_size(len) + len;
}

static size_t
put_len_field(uint8_t *p, unsigned field, const void *data, size_t len)
{
    size_t n = pbwire_put_varint(p, (uint64_t)field << 3 | PBWIRE_LEN);

    n += pbwire_put_varint(p + n, len);
    if (len > 0) {
        memcpy(p + n, data, len);
    }
    return n + len;
}

/* Size of the Deliver message body (without its own key and length). */
static size_t
deliver_body_size(const struct frame_deliver *d, size_t qlen, size_t msg_len)
{
    size_t n = 0;

    n += varint_field_size(1, d->subscription_id);
    n += qlen ? len_field_size(2, qlen) : 0;
    n += varint_field_size(3, d->message_id);
    n += varint_field_size(4, d->attempt);
    n += varint_field_size(5, d->lease_ms);
    n += varint_field_size(6, d->published_at_ms);
    n += len_field_size(7, msg_len);
    n += d->progress ? len_field_size(8, d->progress_len) : 0;
    return n;
}

size_t
frame_deliver_size(const struct frame_deliver *d, size_t msg_len)
{
    /* Frame field 34 (deliver); request_id 0 is omitted. */
    size_t qlen = d->queue ? strlen(d->queue) : 0;

    return FRAME_HEADER_LEN +
           len_field_size(PROTOQ__FRAME__KIND_DELIVER,
                          deliver_body_size(d, qlen, msg_len));
}

size_t
frame_deliver_encode(const struct frame_deliver *d, const uint8_t *msg,
                     size_t msg_len, uint8_t *out)
{
    size_t qlen = d->queue ? strlen(d->queue) : 0;
    size_t body = deliver_body_size(d, qlen, msg_len);
    uint8_t *p = out + FRAME_HEADER_LEN;
    size_t total;

    p += pbwire_put_varint(p, (uint64_t)PROTOQ__FRAME__KIND_DELIVER << 3 |
                                  PBWIRE_LEN);
    p += pbwire_put_varint(p, body);
    p += put_varint_field(p, 1, d->subscription_id);
    if (qlen) {
        p += put_len_field(p, 2, d->queue, qlen);
    }
    p += put_varint_field(p, 3, d->message_id);
    p += put_varint_field(p, 4, d->attempt);
    p += put_varint_field(p, 5, d->lease_ms);
    p += put_varint_field(p, 6, d->published_at_ms);
    p += put_len_field(p, 7, msg, msg_len);
    if (d->progress) {
        p += put_len_field(p, 8, d->progress, d->progress_len);
    }
    total = (size_t)(p - out);
    out[0] = (uint8_t)((total - FRAME_HEADER_LEN) >> 24);
    out[1] = (uint8_t)((total - FRAME_HEADER_LEN) >> 16);
    out[2] = (uint8_t)((total - FRAME_HEADER_LEN) >> 8);
    out[3] = (uint8_t)(total - FRAME_HEADER_LEN);
    return total;
}

/* ---- what the broker stores must decode again and fit in a Deliver ---- */

/* A Message.headers field (KeyValue with both strings written, as
 * body_with_headers writes them). */
static size_t
kv_field_size(size_t klen, size_t vlen)
{
    return len_field_size(2, len_field_size(1, klen) + len_field_size(2, vlen));
}

/*
 * The headers one dead-lettering appends (queue.c: x-death-reason,
 * x-death-attempts, x-death-queue, and x-death-error when the last attempt
 * left one). Every key is counted as 16 bytes, the longest of the four.
 */
static size_t
dead_letter_growth_max(void)
{
    enum { KEY = 16, ATTEMPTS_DIGITS = 10 };

    return kv_field_size(KEY, PQ_DEAD_LETTER_REASON_MAX) +
           kv_field_size(KEY, ATTEMPTS_DIGITS) +
           kv_field_size(KEY, PQ_QUEUE_NAME_MAX) +
           kv_field_size(KEY, PQ_NACK_ERROR_MAX);
}

size_t
frame_deliver_max_size(size_t msg_len)
{
    static const uint8_t some_progress[1];
    const struct frame_deliver widest = {
        .subscription_id = UINT64_MAX,
        .message_id = UINT64_MAX,
        .attempt = UINT32_MAX,
        .lease_ms = UINT64_MAX,
        .published_at_ms = UINT64_MAX,
        .progress = some_progress,
        .progress_len = PQ_PROGRESS_MAX,
    };
    size_t body = deliver_body_size(&widest, PQ_QUEUE_NAME_MAX,
                                    msg_len + dead_letter_growth_max());

    return FRAME_HEADER_LEN + len_field_size(PROTOQ__FRAME__KIND_DELIVER, body);
}

/*
 * Free the unknown fields protobuf-c kept for m. They were allocated by
 * frame_unpack's allocator, so they go back through plain_free.
 */
static void
drop_unknown(ProtobufCMessage *m)
{
    for (unsigned i = 0; i < m->n_unknown_fields; i++) {
        plain_free(NULL, m->unknown_fields[i].data);
    }
    plain_free(NULL, m->unknown_fields);
    m->unknown_fields = NULL;
    m->n_unknown_fields = 0;
}

static size_t
str_len(const char *s)
{
    return s != NULL ? strlen(s) : 0;
}

/*
 * Drop the unknown fields of kv[0..n) and check them: n <= max_n, keys
 * 1..PQ_TAG_BYTES_MAX bytes; values at most value_max bytes each and
 * total_max bytes of keys and values in all.
 */
static bool
kvs_fit(Protoq__KeyValue **kv, size_t n, size_t max_n, size_t value_max,
        size_t total_max)
{
    size_t total = 0;

    if (n > max_n) {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        size_t kl = str_len(kv[i]->key), vl = str_len(kv[i]->value);

        drop_unknown(&kv[i]->base);
        if (kl == 0 || kl > PQ_TAG_BYTES_MAX || vl > value_max) {
            return false;
        }
        total += kl + vl;
    }
    return total <= total_max;
}

int
frame_message_check(Protoq__Message *m, const struct frame_msg_limits *lim,
                    size_t *packed_len, char *why, size_t whylen)
{
    size_t len, deliver;

    *packed_len = 0;
    drop_unknown(&m->base);
    if (m->payload.len > lim->max_message_bytes) {
        snprintf(why, whylen,
                 "payload of %zu bytes is over max_message_bytes (%u)",
                 m->payload.len, lim->max_message_bytes);
        return PQ_ETOOBIG;
    }
    if (m->priority > PQ_PRIORITY_MAX) {
        snprintf(why, whylen, "priority %u is not 0-%d", m->priority,
                 PQ_PRIORITY_MAX);
        return PQ_EINVAL;
    }
    if (!kvs_fit(m->headers, m->n_headers, PQ_HEADERS_MAX, PQ_HEADER_BYTES_MAX,
                 PQ_HEADER_BYTES_MAX) ||
        !kvs_fit(m->requires, m->n_requires, PQ_TAGS_MAX, PQ_TAG_BYTES_MAX,
                 SIZE_MAX)) {
        snprintf(why, whylen,
                 "headers or requires out of bounds (empty key, key over %d "
                 "bytes, over %d headers or %d bytes of headers, over %d "
                 "requires or a value over %d bytes)",
                 PQ_TAG_BYTES_MAX, PQ_HEADERS_MAX, PQ_HEADER_BYTES_MAX,
                 PQ_TAGS_MAX, PQ_TAG_BYTES_MAX);
        return PQ_EINVAL;
    }
    if (str_len(m->idempotency_key) > PQ_IDEMPOTENCY_KEY_MAX ||
        str_len(m->correlation_id) > PQ_CORRELATION_ID_MAX ||
        str_len(m->reply_to) > PQ_REPLY_TO_MAX) {
        snprintf(why, whylen,
                 "idempotency_key, correlation_id or reply_to too long "
                 "(limits %d, %d and %d bytes)",
                 PQ_IDEMPOTENCY_KEY_MAX, PQ_CORRELATION_ID_MAX,
                 PQ_REPLY_TO_MAX);
        return PQ_EINVAL;
    }
    len = protoq__message__get_packed_size(m);
    deliver = frame_deliver_max_size(len) - FRAME_HEADER_LEN;
    if (deliver > lim->max_frame_bytes) {
        snprintf(why, whylen,
                 "message of %zu bytes: its delivery could take %zu bytes, "
                 "over max_frame_bytes (%u)",
                 len, deliver, lim->max_frame_bytes);
        return PQ_ETOOBIG;
    }
    *packed_len = len;
    return PQ_OK;
}

int
frame_progress_check(Protoq__Progress *p, size_t *packed_len)
{
    size_t len;

    *packed_len = 0;
    drop_unknown(&p->base);
    if (p->percent > 100) {
        return PQ_EINVAL;
    }
    len = protoq__progress__get_packed_size(p);
    if (len > PQ_PROGRESS_MAX) {
        return PQ_EINVAL;
    }
    *packed_len = len;
    return PQ_OK;
}
