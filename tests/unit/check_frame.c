/*
 * check_frame.c: unit tests of protocol/frame.c, the codec the broker and
 * libprotoq share: the length prefix (checked before any allocation), the
 * budgeted decoder, packing, and the hand-spliced Deliver encoder, which
 * protobuf-c itself must be able to decode.
 */
#include <check.h>
#include <stdlib.h>
#include <string.h>

#include "frame.h"
#include "pbwire.h"
#include "pqerr.h"

/* A QueueList request, packed with its prefix, into a new buffer. */
static uint8_t *
pack_queue_list(uint64_t rid, size_t *len)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__QueueList ql = PROTOQ__QUEUE_LIST__INIT;
    uint8_t *buf;

    f.request_id = rid;
    f.kind_case = PROTOQ__FRAME__KIND_QUEUE_LIST;
    f.queue_list = &ql;
    *len = frame_packed_size(&f);
    buf = malloc(*len);
    ck_assert_ptr_nonnull(buf);
    ck_assert_uint_eq(frame_pack(&f, buf), *len);
    return buf;
}

/*
 * A tiny incremental reader over a byte stream, the way conn.c and the
 * client use the codec: returns frames decoded so far.
 */
struct reader {
    uint8_t buf[1 << 16];
    size_t len;
    int frames;
    uint64_t last_rid;
    int err;
};

static void
reader_feed(struct reader *r, const uint8_t *p, size_t n, uint32_t max)
{
    memcpy(r->buf + r->len, p, n);
    r->len += n;
    for (;;) {
        ssize_t body = frame_check_header(r->buf, r->len, max);
        Protoq__Frame *f;

        if (body == PQ_EAGAIN) {
            return;
        }
        if (body < 0) {
            r->err = (int)body;
            return;
        }
        if (r->len < FRAME_HEADER_LEN + (size_t)body) {
            return;
        }
        r->err = frame_unpack(r->buf + FRAME_HEADER_LEN, (size_t)body,
                              frame_decode_budget((size_t)body), &f);
        if (r->err != PQ_OK) {
            return;
        }
        r->frames++;
        r->last_rid = f->request_id;
        frame_free(f);
        memmove(r->buf, r->buf + FRAME_HEADER_LEN + body,
                r->len - FRAME_HEADER_LEN - (size_t)body);
        r->len -= FRAME_HEADER_LEN + (size_t)body;
    }
}

START_TEST(test_header_needs_four_bytes)
{
    uint8_t b[4] = {0, 0, 0, 5};

    for (size_t n = 0; n < 4; n++) {
        ck_assert_int_eq(frame_check_header(b, n, 100), PQ_EAGAIN);
    }
    ck_assert_int_eq(frame_check_header(b, 4, 100), 5);
}
END_TEST

START_TEST(test_length_zero_is_malformed)
{
    uint8_t b[4] = {0, 0, 0, 0};

    ck_assert_int_eq(frame_check_header(b, 4, 100), PQ_EPROTO);
}
END_TEST

START_TEST(test_length_over_limit_refused)
{
    uint8_t at[4] = {0, 0, 0x10, 0x00};   /* 4096 */
    uint8_t over[4] = {0, 0, 0x10, 0x01}; /* 4097 */
    uint8_t huge[4] = {0xff, 0xff, 0xff, 0xff};
    uint8_t tls[4] = {0x16, 0x03, 0x01, 0x02};
    uint8_t http[4] = {'G', 'E', 'T', ' '};

    ck_assert_int_eq(frame_check_header(at, 4, 4096), 4096);
    ck_assert_int_eq(frame_check_header(over, 4, 4096), PQ_ETOOBIG);
    ck_assert_int_eq(frame_check_header(huge, 4, 4096), PQ_ETOOBIG);
    ck_assert_int_eq(frame_check_header(huge, 4, UINT32_MAX - 1), PQ_ETOOBIG);
    ck_assert_int_eq(frame_check_header(tls, 4, 4 << 20), PQ_ETOOBIG);
    ck_assert_int_eq(frame_check_header(http, 4, 4 << 20), PQ_ETOOBIG);
}
END_TEST

START_TEST(test_frame_byte_by_byte)
{
    struct reader r = {0};
    size_t len;
    uint8_t *buf = pack_queue_list(77, &len);

    for (size_t i = 0; i < len; i++) {
        ck_assert_int_eq(r.frames, 0);
        reader_feed(&r, buf + i, 1, 4096);
        ck_assert_int_eq(r.err, PQ_OK);
    }
    ck_assert_int_eq(r.frames, 1);
    ck_assert_uint_eq(r.last_rid, 77);
    ck_assert_uint_eq(r.len, 0);
    free(buf);
}
END_TEST

START_TEST(test_many_frames_in_one_read)
{
    struct reader r = {0};
    uint8_t all[8192];
    size_t off = 0;

    for (uint64_t rid = 1; rid <= 100; rid++) {
        size_t len;
        uint8_t *buf = pack_queue_list(rid, &len);

        ck_assert_uint_lt(off + len, sizeof(all));
        memcpy(all + off, buf, len);
        off += len;
        free(buf);
    }
    /* The last frame split across two reads. */
    reader_feed(&r, all, off - 2, 4096);
    ck_assert_int_eq(r.frames, 99);
    reader_feed(&r, all + off - 2, 2, 4096);
    ck_assert_int_eq(r.err, PQ_OK);
    ck_assert_int_eq(r.frames, 100);
    ck_assert_uint_eq(r.last_rid, 100);
}
END_TEST

START_TEST(test_garbage_body_is_proto_error)
{
    /* Field 2 (hello), length-delimited, claiming 100 bytes with 3. */
    uint8_t bad1[] = {0x12, 0x64, 0x01, 0x02, 0x03};
    /* A varint that never ends. */
    uint8_t bad2[] = {0x08, 0xff, 0xff, 0xff, 0xff, 0xff,
                      0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
    /* Wire type 7 does not exist. */
    uint8_t bad3[] = {0x0f, 0x00};
    Protoq__Frame *f = (Protoq__Frame *)1;

    ck_assert_int_eq(frame_unpack(bad1, sizeof(bad1), 65536, &f), PQ_EPROTO);
    ck_assert_ptr_null(f);
    ck_assert_int_eq(frame_unpack(bad2, sizeof(bad2), 65536, &f), PQ_EPROTO);
    ck_assert_int_eq(frame_unpack(bad3, sizeof(bad3), 65536, &f), PQ_EPROTO);
}
END_TEST

START_TEST(test_random_garbage_never_crashes)
{
    uint8_t buf[512];
    unsigned seed = 12345;

    for (int i = 0; i < 20000; i++) {
        size_t n = (size_t)(rand_r(&seed) % sizeof(buf)) + 1;
        Protoq__Frame *f = NULL;
        int rc;

        for (size_t k = 0; k < n; k++) {
            buf[k] = (uint8_t)rand_r(&seed);
        }
        rc = frame_unpack(buf, n, frame_decode_budget(n), &f);
        ck_assert(rc == PQ_OK || rc == PQ_EPROTO || rc == PQ_ETOOBIG);
        frame_free(f);
    }
}
END_TEST

START_TEST(test_decode_budget_stops_amplification)
{
    /* A PublishBatch (field 21) of 200,000 empty Publish items: 2 bytes
     * each on the wire, ~100 bytes each decoded. */
    size_t items = 200000, inner = items * 2, n = 0;
    uint8_t *buf = malloc(inner + 16);
    Protoq__Frame *f = NULL;

    ck_assert_ptr_nonnull(buf);
    n += pbwire_put_varint(buf + n, (21 << 3) | 2);
    n += pbwire_put_varint(buf + n, inner);
    for (size_t i = 0; i < items; i++) {
        buf[n++] = (1 << 3) | 2; /* items, length 0 */
        buf[n++] = 0;
    }
    ck_assert_int_eq(frame_unpack(buf, n, frame_decode_budget(n), &f),
                     PQ_ETOOBIG);
    ck_assert_ptr_null(f);
    /* The same frame decodes with a budget big enough for it. */
    ck_assert_int_eq(frame_unpack(buf, n, 200 * n, &f), PQ_OK);
    ck_assert_uint_eq(f->publish_batch->n_items, items);
    frame_free(f);
    free(buf);
}
END_TEST

START_TEST(test_varint_sizes)
{
    uint8_t b[10];
    uint64_t vals[] = {0, 1, 127, 128, 16383, 16384, UINT32_MAX, UINT64_MAX};

    for (size_t i = 0; i < sizeof(vals) / sizeof(vals[0]); i++) {
        size_t n = pbwire_put_varint(b, vals[i]);
        uint64_t back = 0;

        ck_assert_uint_eq(n, pbwire_varint_size(vals[i]));
        for (size_t k = 0; k < n; k++) {
            back |= (uint64_t)(b[k] & 0x7f) << (7 * k);
        }
        ck_assert_uint_eq(back, vals[i]);
    }
    ck_assert_uint_eq(pbwire_varint_size(UINT64_MAX), 10);
    /* Every bit length, at both ends: the size agrees with the encoder. */
    for (unsigned s = 0; s < 64; s++) {
        uint64_t v = (uint64_t)1 << s;

        ck_assert_uint_eq(pbwire_varint_size(v), pbwire_put_varint(b, v));
        ck_assert_uint_eq(pbwire_varint_size(v - 1),
                          pbwire_put_varint(b, v - 1));
    }
}
END_TEST

START_TEST(test_deliver_splice_decodes)
{
    Protoq__Message m = PROTOQ__MESSAGE__INIT;
    Protoq__KeyValue h = PROTOQ__KEY_VALUE__INIT;
    Protoq__KeyValue *hs[1] = {&h};
    Protoq__Progress pr = PROTOQ__PROGRESS__INIT;
    uint8_t msg[256], prog[64], *out;
    size_t msg_len, prog_len, n;
    Protoq__Frame *f = NULL;
    ssize_t body;

    m.payload.data = (uint8_t *)"hello";
    m.payload.len = 5;
    h.key = "k";
    h.value = "v";
    m.n_headers = 1;
    m.headers = hs;
    m.priority = 7;
    msg_len = protoq__message__pack(&m, msg);
    pr.percent = 42;
    pr.text = "epoch 3";
    prog_len = protoq__progress__pack(&pr, prog);

    struct frame_deliver d = {
        .subscription_id = 9,
        .queue = "jobs",
        .message_id = 1ULL << 60,
        .attempt = 3,
        .lease_ms = 30000,
        .published_at_ms = 1700000000000ULL,
        .progress = prog,
        .progress_len = prog_len,
    };
    n = frame_deliver_size(&d, msg_len);
    out = malloc(n);
    ck_assert_uint_eq(frame_deliver_encode(&d, msg, msg_len, out), n);
    body = frame_check_header(out, n, 1 << 20);
    ck_assert_int_eq(body, (ssize_t)(n - FRAME_HEADER_LEN));
    ck_assert_int_eq(frame_unpack(out + 4, (size_t)body, 1 << 20, &f), PQ_OK);
    ck_assert_int_eq(f->kind_case, PROTOQ__FRAME__KIND_DELIVER);
    ck_assert_uint_eq(f->request_id, 0);
    ck_assert_uint_eq(f->deliver->subscription_id, 9);
    ck_assert_str_eq(f->deliver->queue, "jobs");
    ck_assert_uint_eq(f->deliver->message_id, 1ULL << 60);
    ck_assert_uint_eq(f->deliver->attempt, 3);
    ck_assert_uint_eq(f->deliver->lease_ms, 30000);
    ck_assert_uint_eq(f->deliver->published_at_ms, 1700000000000ULL);
    ck_assert_uint_eq(f->deliver->message->payload.len, 5);
    ck_assert_mem_eq(f->deliver->message->payload.data, "hello", 5);
    ck_assert_uint_eq(f->deliver->message->n_headers, 1);
    ck_assert_str_eq(f->deliver->message->headers[0]->key, "k");
    ck_assert_uint_eq(f->deliver->message->priority, 7);
    ck_assert_ptr_nonnull(f->deliver->progress);
    ck_assert_uint_eq(f->deliver->progress->percent, 42);
    ck_assert_str_eq(f->deliver->progress->text, "epoch 3");
    frame_free(f);
    free(out);
}
END_TEST

START_TEST(test_deliver_splice_empty_message)
{
    struct frame_deliver d = {.message_id = 1, .attempt = 1};
    uint8_t out[64];
    size_t n = frame_deliver_size(&d, 0);
    Protoq__Frame *f = NULL;

    ck_assert_uint_le(n, sizeof(out));
    ck_assert_uint_eq(frame_deliver_encode(&d, NULL, 0, out), n);
    ck_assert_int_eq(frame_unpack(out + 4, n - 4, 65536, &f), PQ_OK);
    ck_assert_ptr_nonnull(f->deliver->message);
    ck_assert_uint_eq(f->deliver->message->payload.len, 0);
    ck_assert_ptr_null(f->deliver->progress);
    frame_free(f);
}
END_TEST

/*
 * frame_message_check draws the line where the widest Deliver of the
 * message (envelope, 2 KiB of progress, dead-letter headers) just fits:
 * a payload one byte longer is MESSAGE_TOO_LARGE, and the widest Deliver
 * of the largest accepted one is within max_frame_bytes.
 */
START_TEST(test_message_check_line_is_the_widest_deliver)
{
    const struct frame_msg_limits lim = {.max_message_bytes = 65536,
                                         .max_frame_bytes = 16384};
    static uint8_t payload[16384];
    Protoq__Message m = PROTOQ__MESSAGE__INIT;
    size_t len = 0, best = 0;
    char why[256];

    m.payload.data = payload;
    for (size_t n = 8192; n < sizeof(payload); n++) {
        m.payload.len = n;
        if (frame_message_check(&m, &lim, &len, why, sizeof(why)) != PQ_OK) {
            ck_assert_ptr_nonnull(strstr(why, "max_frame_bytes"));
            break;
        }
        best = n;
        ck_assert_uint_le(frame_deliver_max_size(len) - FRAME_HEADER_LEN,
                          lim.max_frame_bytes);
    }
    ck_assert_uint_gt(best, 8192);
    m.payload.len = best;
    ck_assert_int_eq(frame_message_check(&m, &lim, &len, why, sizeof(why)),
                     PQ_OK);
    /* The envelope is bounded: under 4 KiB for any message. */
    ck_assert_uint_lt(lim.max_frame_bytes - best, 4096);
    m.payload.len = best + 1;
    ck_assert_int_eq(frame_message_check(&m, &lim, &len, why, sizeof(why)),
                     PQ_ETOOBIG);
    /* Over max_message_bytes is the payload's own limit. */
    m.payload.len = 100;
    ck_assert_int_eq(frame_message_check(
                         &m,
                         &(struct frame_msg_limits){.max_message_bytes = 99,
                                                    .max_frame_bytes = 16384},
                         &len, why, sizeof(why)),
                     PQ_ETOOBIG);
    ck_assert_ptr_nonnull(strstr(why, "max_message_bytes"));
}
END_TEST

static Suite *
frame_suite(void)
{
    Suite *s = suite_create("frame");
    TCase *hdr = tcase_create("header");
    TCase *stream = tcase_create("stream");
    TCase *decode = tcase_create("decode");
    TCase *deliver = tcase_create("deliver");

    tcase_add_test(hdr, test_header_needs_four_bytes);
    tcase_add_test(hdr, test_length_zero_is_malformed);
    tcase_add_test(hdr, test_length_over_limit_refused);
    tcase_add_test(stream, test_frame_byte_by_byte);
    tcase_add_test(stream, test_many_frames_in_one_read);
    tcase_add_test(decode, test_garbage_body_is_proto_error);
    tcase_add_test(decode, test_random_garbage_never_crashes);
    tcase_add_test(decode, test_decode_budget_stops_amplification);
    tcase_add_test(decode, test_varint_sizes);
    tcase_set_timeout(decode, 60);
    tcase_add_test(deliver, test_deliver_splice_decodes);
    tcase_add_test(deliver, test_deliver_splice_empty_message);
    tcase_add_test(deliver, test_message_check_line_is_the_widest_deliver);
    suite_add_tcase(s, hdr);
    suite_add_tcase(s, stream);
    suite_add_tcase(s, decode);
    suite_add_tcase(s, deliver);
    return s;
}

int
main(void)
{
    SRunner *sr = srunner_create(frame_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
