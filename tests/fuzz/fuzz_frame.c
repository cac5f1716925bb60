/*
 * fuzz_frame.c: libFuzzer target for the frame decoder and for the
 * broker's promise that a message it confirms can be delivered.
 *
 * The input is one frame body (no length prefix). It goes through
 * frame_unpack with the budget the broker uses; a Publish (or each item of
 * a PublishBatch) then goes through frame_message_check as prepare_one in
 * broker/dispatch.c does, and if the check passes the message is packed as
 * the broker stores it and spliced into Deliver frames by
 * frame_deliver_encode: one with a plain envelope, and one with the widest
 * envelope (largest ids, a queue name of PQ_QUEUE_NAME_MAX, 2 KiB of
 * progress) around the body a dead-lettering makes (body_with_headers with
 * the longest x-death-* headers). Each Deliver must fit max_frame_bytes and
 * frame_check_header, decode with the client's budget, and carry the message
 * as published. A Touch or Release progress goes through
 * frame_progress_check and must come back the same way in a Deliver.
 *
 * This round trip is what showed that protobuf-c re-encodes an unknown
 * field 0 (key sent as 81 00) into bytes it refuses to decode.
 */
#include <stdbool.h>
#include <string.h>

#include "body.h"
#include "frame.h"
#include "pbwire.h"
#include "fuzz.h"
#include "pqerr.h"

/* Small limits, so that inputs of a few KiB reach them. */
static const struct frame_msg_limits lim = {
    .max_message_bytes = 4096,
    .max_frame_bytes = 8192,
};

enum { BATCH_ITEMS_CHECKED = 16 };

static const char *
str_or_empty(const char *s)
{
    return s != NULL ? s : "";
}

static bool
same_str(const char *a, const char *b)
{
    return strcmp(str_or_empty(a), str_or_empty(b)) == 0;
}

static bool
same_kvs(Protoq__KeyValue **a, Protoq__KeyValue **b, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (!same_str(a[i]->key, b[i]->key) ||
            !same_str(a[i]->value, b[i]->value)) {
            return false;
        }
    }
    return true;
}

static bool
is_extra(const char *key, const struct kv *extra, size_t n_extra)
{
    for (size_t i = 0; i < n_extra; i++) {
        if (same_str(key, extra[i].key)) {
            return true;
        }
    }
    return false;
}

/* got is want with extra[0..n_extra) set as body_with_headers sets them:
 * want's headers with those keys dropped, the extra ones appended. */
static void
check_same_message(const Protoq__Message *got, const Protoq__Message *want,
                   const struct kv *extra, size_t n_extra)
{
    size_t j = 0;

    FUZZ_CHECK(got != NULL);
    FUZZ_CHECK(got->payload.len == want->payload.len);
    FUZZ_CHECK(
        want->payload.len == 0 ||
        memcmp(got->payload.data, want->payload.data, want->payload.len) == 0);
    FUZZ_CHECK(got->priority == want->priority);
    FUZZ_CHECK(got->delay_ms == want->delay_ms);
    FUZZ_CHECK(got->deliver_at_ms == want->deliver_at_ms);
    FUZZ_CHECK(got->ttl_ms == want->ttl_ms);
    FUZZ_CHECK(same_str(got->idempotency_key, want->idempotency_key));
    FUZZ_CHECK(same_str(got->correlation_id, want->correlation_id));
    FUZZ_CHECK(same_str(got->reply_to, want->reply_to));
    FUZZ_CHECK(got->n_requires == want->n_requires);
    FUZZ_CHECK(same_kvs(got->requires, want->requires, want->n_requires));
    for (size_t i = 0; i < want->n_headers; i++) {
        if (is_extra(want->headers[i]->key, extra, n_extra)) {
            continue;
        }
        FUZZ_CHECK(j < got->n_headers);
        FUZZ_CHECK(same_kvs(&got->headers[j], &want->headers[i], 1));
        j++;
    }
    FUZZ_CHECK(got->n_headers == j + n_extra);
    for (size_t i = 0; i < n_extra; i++) {
        const Protoq__KeyValue *h = got->headers[j + i];

        FUZZ_CHECK(same_str(h->key, extra[i].key));
        FUZZ_CHECK(same_str(h->value, extra[i].value));
    }
}

/* A Progress of exactly PQ_PROGRESS_MAX bytes: text (field 2) of
 * PQ_PROGRESS_MAX - 3 bytes. */
static const uint8_t *
widest_progress(void)
{
    static uint8_t p[PQ_PROGRESS_MAX];

    if (p[0] == 0) {
        p[0] = 0x12;
        pbwire_put_varint(p + 1, PQ_PROGRESS_MAX - 3);
        memset(p + 3, 'p', PQ_PROGRESS_MAX - 3);
    }
    return p;
}

/*
 * Splice body into a Deliver with envelope d, then check that it fits,
 * passes the header check and decodes (with the client's budget) into d's
 * values; returns the decoded frame (the caller frees it).
 */
static Protoq__Frame *
deliver_round_trip(const struct frame_deliver *d, const struct body *b)
{
    size_t n = frame_deliver_size(d, b->len);
    uint8_t *buf = malloc(n);
    Protoq__Frame *f = NULL;
    const Protoq__Deliver *dv;

    FUZZ_CHECK(buf != NULL);
    FUZZ_CHECK(n - FRAME_HEADER_LEN <= lim.max_frame_bytes);
    FUZZ_CHECK(frame_deliver_encode(d, b->data, b->len, buf) == n);
    FUZZ_CHECK(frame_check_header(buf, n, lim.max_frame_bytes) ==
               (ssize_t)(n - FRAME_HEADER_LEN));
    FUZZ_CHECK(frame_unpack(buf + FRAME_HEADER_LEN, n - FRAME_HEADER_LEN,
                            frame_decode_budget(n - FRAME_HEADER_LEN),
                            &f) == PQ_OK);
    FUZZ_CHECK(f->kind_case == PROTOQ__FRAME__KIND_DELIVER);
    FUZZ_CHECK(f->request_id == 0);
    dv = f->deliver;
    FUZZ_CHECK(dv->subscription_id == d->subscription_id);
    FUZZ_CHECK(same_str(dv->queue, d->queue));
    FUZZ_CHECK(dv->message_id == d->message_id);
    FUZZ_CHECK(dv->attempt == d->attempt);
    FUZZ_CHECK(dv->lease_ms == d->lease_ms);
    FUZZ_CHECK(dv->published_at_ms == d->published_at_ms);
    FUZZ_CHECK((dv->progress != NULL) == (d->progress != NULL));
    free(buf);
    return f;
}

static void
check_publish(Protoq__Publish *pub)
{
    static char queue[PQ_QUEUE_NAME_MAX + 1];
    static char error[PQ_NACK_ERROR_MAX + 1];
    static char reason[PQ_DEAD_LETTER_REASON_MAX + 1];
    const struct kv death[] = {
        {"x-death-reason", reason},
        {"x-death-attempts", "4294967295"},
        {"x-death-queue", queue},
        {"x-death-error", error},
    };
    const size_t n_death = sizeof(death) / sizeof(death[0]);
    const struct frame_deliver plain = {
        .subscription_id = 1,
        .queue = "q",
        .message_id = 1,
        .attempt = 1,
        .lease_ms = 30000,
        .published_at_ms = 1764547200000ULL,
    };
    const struct frame_deliver widest = {
        .subscription_id = UINT64_MAX,
        .queue = queue,
        .message_id = UINT64_MAX,
        .attempt = UINT32_MAX,
        .lease_ms = UINT64_MAX,
        .published_at_ms = UINT64_MAX,
        .progress = widest_progress(),
        .progress_len = PQ_PROGRESS_MAX,
    };
    Protoq__Message *m = pub->message;
    struct body *b = NULL, *dead = NULL;
    Protoq__Frame *f;
    char why[256] = "";
    size_t len, len2;
    int rc;

    if (queue[0] == '\0') {
        memset(queue, 'q', PQ_QUEUE_NAME_MAX);
        memset(error, 'e', PQ_NACK_ERROR_MAX);
        memset(reason, 'r', PQ_DEAD_LETTER_REASON_MAX);
    }
    if (m == NULL) {
        return;
    }
    rc = frame_message_check(m, &lim, &len, why, sizeof(why));
    if (rc != PQ_OK) {
        FUZZ_CHECK(rc == PQ_EINVAL || rc == PQ_ETOOBIG);
        FUZZ_CHECK(why[0] != '\0');
        return;
    }
    FUZZ_CHECK(m->base.n_unknown_fields == 0);
    FUZZ_CHECK(len == protoq__message__get_packed_size(m));
    b = body_alloc(len);
    FUZZ_CHECK(b != NULL);
    FUZZ_CHECK(protoq__message__pack(m, b->data) == len);

    f = deliver_round_trip(&plain, b);
    check_same_message(f->deliver->message, m, NULL, 0);
    /* What the broker stored passes its own check again, unchanged (a
     * message read back from the log is the same message). */
    why[0] = '\0';
    FUZZ_CHECK(frame_message_check(f->deliver->message, &lim, &len2, why,
                                   sizeof(why)) == PQ_OK);
    FUZZ_CHECK(len2 == len);
    frame_free(f);

    dead = body_with_headers(b, death, n_death);
    FUZZ_CHECK(dead != NULL);
    FUZZ_CHECK(frame_deliver_size(&widest, dead->len) <=
               frame_deliver_max_size(len));
    f = deliver_round_trip(&widest, dead);
    check_same_message(f->deliver->message, m, death, n_death);
    frame_free(f);
    body_unref(&dead);
    body_unref(&b);
}

static void
check_progress(Protoq__Progress *p)
{
    const struct frame_deliver d = {
        .subscription_id = 1,
        .queue = "q",
        .message_id = 1,
        .attempt = 2,
    };
    struct body *msg = body_new(NULL, 0), *prog;
    struct frame_deliver with = d;
    Protoq__Frame *f;
    size_t len;

    if (p == NULL || frame_progress_check(p, &len) != PQ_OK) {
        body_unref(&msg);
        return;
    }
    FUZZ_CHECK(len <= PQ_PROGRESS_MAX);
    prog = body_alloc(len);
    FUZZ_CHECK(msg != NULL && prog != NULL);
    FUZZ_CHECK(protoq__progress__pack(p, prog->data) == len);
    with.progress = prog->data;
    with.progress_len = prog->len;
    f = deliver_round_trip(&with, msg);
    FUZZ_CHECK(f->deliver->progress->percent == p->percent);
    FUZZ_CHECK(same_str(f->deliver->progress->text, p->text));
    FUZZ_CHECK(same_str(f->deliver->progress->checkpoint, p->checkpoint));
    frame_free(f);
    body_unref(&prog);
    body_unref(&msg);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    Protoq__Frame *f = NULL;
    ssize_t hdr;
    int rc;

    /* The header check on the raw bytes: never more than it was given. */
    hdr = frame_check_header(data, size, lim.max_frame_bytes);
    FUZZ_CHECK(hdr == PQ_EAGAIN || hdr == PQ_EPROTO || hdr == PQ_ETOOBIG ||
               (hdr > 0 && (size_t)hdr <= lim.max_frame_bytes));

    rc = frame_unpack(data, size, frame_decode_budget(size), &f);
    if (rc != PQ_OK) {
        FUZZ_CHECK(rc == PQ_EPROTO || rc == PQ_ETOOBIG);
        FUZZ_CHECK(f == NULL);
        return 0;
    }
    switch (f->kind_case) {
    case PROTOQ__FRAME__KIND_PUBLISH:
        check_publish(f->publish);
        break;
    case PROTOQ__FRAME__KIND_PUBLISH_BATCH:
        for (size_t i = 0;
             i < f->publish_batch->n_items && i < BATCH_ITEMS_CHECKED; i++) {
            check_publish(f->publish_batch->items[i]);
        }
        break;
    case PROTOQ__FRAME__KIND_TOUCH:
        check_progress(f->touch->progress);
        break;
    case PROTOQ__FRAME__KIND_RELEASE:
        check_progress(f->release->progress);
        break;
    default:
        break;
    }
    frame_free(f);
    return 0;
}
