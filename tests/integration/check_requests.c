/*
 * check_requests.c: request errors against a real protoqd on loopback:
 * unknown queues, oversized payloads, unknown protobuf fields (hand-encoded
 * on a raw socket), overlong correlation ids, and messages that would not
 * fit the broker's frame limit when delivered.
 *
 * Every test gets a fresh broker (server_fixture.h) and every wait is
 * bounded. PROTOQD names the broker binary.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <check.h>

#include "pqlimits.h"
#include "pbwire.h"
#include "testutil.h"
#include "server_fixture.h"

/* ======================================================= request errors */

START_TEST(test_publish_and_subscribe_to_unknown_queue_fail)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_message m;
    struct pubset ps;
    struct coll k;

    memset(&m, 0, sizeof(m));
    m.payload = "x";
    m.len = 1;
    pq_check_remote(c, protoq_publish(c, "ghost", &m, NULL),
                    PROTOQ_CODE_QUEUE_NOT_FOUND);
    pubset_init(&ps, c, 3);
    for (size_t i = 0; i < 3; i++) {
        pq_check_ok(c,
                    protoq_publish_async(c, "ghost", &m, on_confirm, &ps.r[i]));
    }
    pq_check_ok(c, protoq_wait_confirms(c, 0, 5000));
    ck_assert_uint_eq(ps.failed, 3);
    for (size_t i = 0; i < 3; i++) {
        ck_assert_int_eq(ps.r[i].err, PQ_EREMOTE);
        ck_assert_int_eq(ps.r[i].code, PROTOQ_CODE_QUEUE_NOT_FOUND);
    }
    coll_init(&k, 1, false);
    pq_check_remote(
        c, protoq_subscribe(c, "ghost", 1, NULL, 0, on_collect, &k, NULL),
        PROTOQ_CODE_QUEUE_NOT_FOUND);
    pq_check_remote(c, protoq_unsubscribe(c, 424242),
                    PROTOQ_CODE_SUBSCRIPTION_NOT_FOUND);
    /* The connection is still good. */
    pq_check_ok(c, protoq_queue_create(c, "ghost", NULL));
    pub_str(c, "ghost", "now", 0, NULL);
    coll_free(&k);
    pubset_free(&ps);
    protoq_close(c);
}
END_TEST

START_TEST(test_payload_over_max_message_bytes_is_message_too_large)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_server_info si;
    struct protoq_queue_info qi;
    struct protoq_message m;
    struct coll k;
    char *payload;
    uint64_t id = 0;

    protoq_server_info(c, &si);
    ck_assert_uint_gt(si.max_message_bytes, 0);
    ck_assert_uint_lt(si.max_message_bytes + 1024u, si.max_frame_bytes);
    payload = malloc(si.max_message_bytes + 1);
    ck_assert_ptr_nonnull(payload);
    memset(payload, 'p', si.max_message_bytes + 1);
    pq_check_ok(c, protoq_queue_create(c, "big", NULL));
    memset(&m, 0, sizeof(m));
    m.payload = payload;
    m.len = si.max_message_bytes + 1;
    pq_check_remote(c, protoq_publish(c, "big", &m, NULL),
                    PROTOQ_CODE_MESSAGE_TOO_LARGE);
    stat_q(c, "big", &qi);
    ck_assert_uint_eq(qi.ready, 0);
    /* Exactly the limit is fine, and comes back intact. */
    m.len = si.max_message_bytes;
    pq_check_ok(c, protoq_publish(c, "big", &m, &id));
    stat_q(c, "big", &qi);
    ck_assert_uint_eq(qi.ready, 1);
    ck_assert_uint_eq(qi.bytes, si.max_message_bytes);
    coll_init(&k, 2, true);
    pq_check_ok(c,
                protoq_subscribe(c, "big", 1, NULL, 0, on_collect, &k, NULL));
    ck_assert_uint_eq(poll_until(c, &k, 1, 5000), 1);
    ck_assert_uint_eq(k.v[0].id, id);
    ck_assert_uint_eq(k.v[0].len, si.max_message_bytes);
    coll_free(&k);
    free(payload);
    protoq_close(c);
}
END_TEST

/* =================================== what is confirmed can be delivered */

/* A small protobuf writer for frames protobuf-c would never produce. */
struct pbuf {
    uint8_t b[512];
    size_t n;
};

static void
pb_raw(struct pbuf *p, const void *data, size_t len)
{
    ck_assert_uint_le(p->n + len, sizeof(p->b));
    memcpy(p->b + p->n, data, len);
    p->n += len;
}

static void
pb_var(struct pbuf *p, unsigned field, uint64_t v)
{
    uint8_t tmp[20];
    size_t n = pbwire_put_varint(tmp, (uint64_t)field << 3);

    n += pbwire_put_varint(tmp + n, v);
    pb_raw(p, tmp, n);
}

static void
pb_len(struct pbuf *p, unsigned field, const void *data, size_t len)
{
    uint8_t tmp[20];
    size_t n = pbwire_put_varint(tmp, (uint64_t)field << 3 | 2);

    n += pbwire_put_varint(tmp + n, len);
    pb_raw(p, tmp, n);
    pb_raw(p, data, len);
}

/* An unknown field 0 of wire type 1 with its key written in two bytes
 * (81 00): protobuf-c accepts it, but re-encodes the key as 01, which it
 * then refuses to decode. */
static void
pb_field0(struct pbuf *p)
{
    static const uint8_t f0[] = {0x81, 0x00, 1, 2, 3, 4, 5, 6, 7, 8};

    pb_raw(p, f0, sizeof(f0));
}

/* Send a frame of the given kind whose body is inner (already encoded). */
static void
send_raw_kind(int fd, uint64_t rid, unsigned kind, const struct pbuf *inner)
{
    struct pbuf f = {.n = 4};

    pb_var(&f, 1, rid);
    pb_len(&f, kind, inner->b, inner->n);
    f.b[0] = (uint8_t)((f.n - 4) >> 24);
    f.b[1] = (uint8_t)((f.n - 4) >> 16);
    f.b[2] = (uint8_t)((f.n - 4) >> 8);
    f.b[3] = (uint8_t)(f.n - 4);
    send_all(fd, f.b, f.n);
}

/* Create queue q and subscribe to it (prefetch 1) on a raw connection. */
static void
raw_create_and_subscribe(int fd, const char *q, uint64_t rid)
{
    Protoq__Frame sf = PROTOQ__FRAME__INIT;
    Protoq__Subscribe sub = PROTOQ__SUBSCRIBE__INIT;
    Protoq__Frame *f;
    size_t len;
    uint8_t *b = pack_queue_create(rid, q, &len);

    send_all(fd, b, len);
    free(b);
    frame_free(read_kind(fd, PROTOQ__FRAME__KIND_OK, rid));
    sub.queue = (char *)q;
    sub.prefetch = 1;
    sf.request_id = rid + 1;
    sf.kind_case = PROTOQ__FRAME__KIND_SUBSCRIBE;
    sf.subscribe = &sub;
    b = raw_pack(&sf, &len);
    ck_assert_ptr_nonnull(b);
    send_all(fd, b, len);
    free(b);
    f = read_kind(fd, PROTOQ__FRAME__KIND_SUBSCRIBE_OK, rid + 1);
    frame_free(f);
}

START_TEST(test_unknown_fields_in_a_message_are_dropped_and_it_is_delivered)
{
    int fd = raw_ready();
    struct pbuf kv = {0}, msg = {0}, pub = {0};
    Protoq__Frame *f;

    raw_create_and_subscribe(fd, "unk", 2);
    pb_len(&kv, 1, "k", 1);
    pb_field0(&kv);
    pb_len(&kv, 2, "v", 1);
    pb_len(&msg, 1, "x", 1);
    pb_field0(&msg);
    pb_len(&msg, 2, kv.b, kv.n);
    pb_len(&pub, 1, "unk", 3);
    pb_len(&pub, 2, msg.b, msg.n);
    send_raw_kind(fd, 4, PROTOQ__FRAME__KIND_PUBLISH, &pub);
    /* PublishOk and the Deliver may come in either order. */
    for (int i = 0; i < 2; i++) {
        int rc = raw_read_frame(fd, RAW_TIMEOUT_MS, 1u << 24, &f);

        ck_assert_msg(rc == 0, "frame %d after the publish: %s", i,
                      rc == 1 ? "EOF"
                              : "a timeout or a frame that does not decode");
        if (f->kind_case == PROTOQ__FRAME__KIND_PUBLISH_OK) {
            ck_assert_uint_eq(f->request_id, 4);
        } else {
            const Protoq__Message *m;

            ck_assert_int_eq(f->kind_case, PROTOQ__FRAME__KIND_DELIVER);
            m = f->deliver->message;
            ck_assert_ptr_nonnull(m);
            ck_assert_uint_eq(m->payload.len, 1);
            ck_assert_int_eq(m->payload.data[0], 'x');
            ck_assert_uint_eq(m->n_headers, 1);
            ck_assert_str_eq(m->headers[0]->key, "k");
            ck_assert_str_eq(m->headers[0]->value, "v");
            ck_assert_uint_eq(m->base.n_unknown_fields, 0);
            ck_assert_uint_eq(m->headers[0]->base.n_unknown_fields, 0);
        }
        frame_free(f);
    }
    close(fd);
    assert_broker_healthy();
}
END_TEST

START_TEST(test_unknown_fields_in_progress_are_dropped_and_it_is_delivered)
{
    int fd = raw_ready();
    struct pbuf prog = {0}, rel = {0};
    Protoq__Frame *f;
    uint64_t id;
    uint32_t attempt;
    size_t len;
    uint8_t *b;

    raw_create_and_subscribe(fd, "unkp", 2);
    b = pack_publish(4, "unkp", "job", 3, &len);
    send_all(fd, b, len);
    free(b);
    /* PublishOk comes first: a message is visible once confirmed. */
    frame_free(read_kind(fd, PROTOQ__FRAME__KIND_PUBLISH_OK, 4));
    f = read_kind(fd, PROTOQ__FRAME__KIND_DELIVER, 0);
    id = f->deliver->message_id;
    attempt = f->deliver->attempt;
    frame_free(f);
    pb_var(&prog, 1, 50);
    pb_field0(&prog);
    pb_len(&prog, 2, "half", 4);
    pb_var(&rel, 1, id);
    pb_var(&rel, 2, attempt);
    pb_len(&rel, 4, prog.b, prog.n);
    pb_var(&rel, 5, 1);
    send_raw_kind(fd, 5, PROTOQ__FRAME__KIND_RELEASE, &rel);
    for (int i = 0; i < 2; i++) {
        int rc = raw_read_frame(fd, RAW_TIMEOUT_MS, 1u << 24, &f);

        ck_assert_msg(rc == 0, "frame %d after the release: %s", i,
                      rc == 1 ? "EOF"
                              : "a timeout or a frame that does not decode");
        if (f->kind_case == PROTOQ__FRAME__KIND_OK) {
            ck_assert_uint_eq(f->request_id, 5);
        } else {
            ck_assert_int_eq(f->kind_case, PROTOQ__FRAME__KIND_DELIVER);
            ck_assert_uint_eq(f->deliver->message_id, id);
            ck_assert_ptr_nonnull(f->deliver->progress);
            ck_assert_uint_eq(f->deliver->progress->percent, 50);
            ck_assert_str_eq(f->deliver->progress->text, "half");
            ck_assert_uint_eq(f->deliver->progress->base.n_unknown_fields, 0);
        }
        frame_free(f);
    }
    close(fd);
    assert_broker_healthy();
}
END_TEST

START_TEST(test_long_correlation_id_and_reply_to_are_bad_request)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    const size_t big = 3u << 20;
    struct protoq_queue_info qi;
    struct protoq_message m;
    char *s = malloc(big + 1);
    char ok[PQ_CORRELATION_ID_MAX + 1];

    ck_assert_ptr_nonnull(s);
    memset(s, 'c', big);
    s[big] = '\0';
    pq_check_ok(c, protoq_queue_create(c, "corr", NULL));
    memset(&m, 0, sizeof(m));
    m.payload = "p";
    m.len = 1;
    m.correlation_id = s;
    pq_check_remote(c, protoq_publish(c, "corr", &m, NULL),
                    PROTOQ_CODE_BAD_REQUEST);
    s[PQ_CORRELATION_ID_MAX + 1] = '\0';
    pq_check_remote(c, protoq_publish(c, "corr", &m, NULL),
                    PROTOQ_CODE_BAD_REQUEST);
    m.correlation_id = NULL;
    s[PQ_REPLY_TO_MAX + 1] = '\0';
    m.reply_to = s;
    pq_check_remote(c, protoq_publish(c, "corr", &m, NULL),
                    PROTOQ_CODE_BAD_REQUEST);
    stat_q(c, "corr", &qi);
    ck_assert_uint_eq(qi.ready, 0);
    /* At the limits both are stored (a reply_to must name a queue). */
    memset(ok, 'k', sizeof(ok) - 1);
    ok[sizeof(ok) - 1] = '\0';
    m.correlation_id = ok;
    s[PQ_REPLY_TO_MAX] = '\0';
    pq_check_ok(c, protoq_queue_create(c, s, NULL));
    pq_check_ok(c, protoq_publish(c, "corr", &m, NULL));
    stat_q(c, "corr", &qi);
    ck_assert_uint_eq(qi.ready, 1);
    free(s);
    protoq_close(c);
}
END_TEST

/* Broker with a small frame limit (the smallest the config allows for its
 * max_message_bytes), so that limits are cheap to reach. */
enum { SMALL_MAX_MESSAGE = 65536, SMALL_MAX_FRAME = 2 * 65536 };

static void
setup_server_small_frames(void)
{
    start_with_conf("max_message_bytes 65536\n"
                    "max_frame_bytes 131072\n");
}

START_TEST(test_publish_whose_deliver_would_be_over_max_frame_is_too_large)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Publish p = PROTOQ__PUBLISH__INIT;
    Protoq__Message m = PROTOQ__MESSAGE__INIT;
    Protoq__KeyValue kv = PROTOQ__KEY_VALUE__INIT, *kvs[1] = {&kv};
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_info qi;
    const size_t target = FRAME_HEADER_LEN + SMALL_MAX_FRAME - 8;
    size_t vlen = SMALL_MAX_FRAME - SMALL_MAX_MESSAGE - 200, len = 0;
    char *payload = malloc(SMALL_MAX_MESSAGE);
    char *value = malloc(SMALL_MAX_FRAME);
    uint8_t *b = NULL;
    int fd;

    ck_assert_ptr_nonnull(payload);
    ck_assert_ptr_nonnull(value);
    memset(payload, 'p', SMALL_MAX_MESSAGE);
    memset(value, 'v', SMALL_MAX_FRAME);
    pq_check_ok(c, protoq_queue_create(c, "tight", NULL));
    m.payload.data = (uint8_t *)payload;
    m.payload.len = SMALL_MAX_MESSAGE;
    kv.key = (char *)"h";
    kv.value = value;
    m.n_headers = 1;
    m.headers = kvs;
    p.queue = (char *)"tight";
    p.message = &m;
    f.request_id = 9;
    f.kind_case = PROTOQ__FRAME__KIND_PUBLISH;
    f.publish = &p;
    /* A Publish frame 8 bytes under max_frame_bytes: every field is within
     * its own limit, but the Deliver (queue name, ids, lease, publish
     * time) cannot fit. */
    for (int i = 0; i < 3; i++) {
        value[vlen] = '\0';
        b = raw_pack(&f, &len);
        ck_assert_ptr_nonnull(b);
        if (len == target) {
            break;
        }
        value[vlen] = 'v';
        vlen = (size_t)((ssize_t)vlen + (ssize_t)target - (ssize_t)len);
        free(b);
        b = NULL;
    }
    ck_assert_uint_eq(len, target);
    ck_assert_uint_le(1 + vlen, 65536); /* headers within their 64 KiB */
    fd = raw_ready();
    send_all(fd, b, len);
    read_error(fd, PROTOQ_CODE_MESSAGE_TOO_LARGE, "max_frame_bytes");
    close(fd);
    stat_q(c, "tight", &qi);
    ck_assert_uint_eq(qi.ready, 0);
    free(b);
    free(value);
    free(payload);
    protoq_close(c);
    assert_broker_healthy();
}
END_TEST

/* A broker whose max_message_bytes (2 MiB) is over the next run's frame
 * limit. */
static void
setup_server_big_messages(void)
{
    start_with_conf("max_message_bytes 2M\n");
}

START_TEST(test_message_stored_under_a_larger_frame_limit_is_not_sent)
{
    const size_t big = 3u << 19; /* 1.5 MiB */
    struct protoq_queue_attrs a;
    struct protoq_queue_info qi;
    struct protoq_message m;
    protoq_client *c = pq_connect_or_fail(&g_srv);
    char *payload = malloc(big);
    struct coll k;
    FILE *f;

    ck_assert_ptr_nonnull(payload);
    memset(payload, 'b', big);
    memset(&a, 0, sizeof(a));
    a.max_attempts = 1;
    pq_check_ok(c, protoq_queue_create(c, "shrunk", &a));
    memset(&m, 0, sizeof(m));
    m.payload = payload;
    m.len = big;
    pq_check_ok(c, protoq_publish(c, "shrunk", &m, NULL));
    pub_str(c, "shrunk", "small", 0, NULL);
    protoq_close(c);
    free(payload);

    /* The operator lowers the limits and restarts. */
    f = fopen(g_conf, "w");
    ck_assert_ptr_nonnull(f);
    fputs("max_message_bytes 65536\nmax_frame_bytes 131072\n", f);
    ck_assert_int_eq(fclose(f), 0);
    ck_assert_int_eq(srv_restart(&g_srv), 0);

    /* The consumer's connection survives: the big one is not sent (its
     * attempt fails; with max_attempts 1 it is dropped), the small one is. */
    c = pq_connect_or_fail(&g_srv);
    coll_init(&k, 4, true);
    pq_check_ok(
        c, protoq_subscribe(c, "shrunk", 10, NULL, 0, on_collect, &k, NULL));
    ck_assert_uint_eq(poll_until(c, &k, 1, 5000), 1);
    ck_assert_str_eq(k.v[0].payload, "small");
    poll_for(c, 300);
    ck_assert_uint_eq(k.n, 1);
    stat_q(c, "shrunk", &qi);
    ck_assert_uint_eq(qi.dropped, 1);
    coll_free(&k);
    protoq_close(c);
}
END_TEST

static Suite *
requests_suite(void)
{
    Suite *s = suite_create("requests");
    TCase *tc;

    tc = tcase(s, "request_errors", 30);
    tcase_add_test(tc, test_publish_and_subscribe_to_unknown_queue_fail);
    tcase_add_test(tc,
                   test_payload_over_max_message_bytes_is_message_too_large);
    tcase_add_test(
        tc, test_unknown_fields_in_a_message_are_dropped_and_it_is_delivered);
    tcase_add_test(
        tc, test_unknown_fields_in_progress_are_dropped_and_it_is_delivered);
    tcase_add_test(tc, test_long_correlation_id_and_reply_to_are_bad_request);

    tc = tcase_create("small_frames");
    tcase_add_checked_fixture(tc, setup_server_small_frames,
                              teardown_server_conf);
    tcase_set_timeout(tc, 30);
    suite_add_tcase(s, tc);
    tcase_add_test(
        tc, test_publish_whose_deliver_would_be_over_max_frame_is_too_large);

    tc = tcase_create("frame_limit_lowered");
    tcase_add_checked_fixture(tc, setup_server_big_messages,
                              teardown_server_conf);
    tcase_set_timeout(tc, 30);
    suite_add_tcase(s, tc);
    tcase_add_test(tc,
                   test_message_stored_under_a_larger_frame_limit_is_not_sent);

    return s;
}

int
main(void)
{
    SRunner *sr = srunner_create(requests_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
