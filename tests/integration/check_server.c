/*
 * check_server.c: integration tests of protoqd's connection handling against
 * a real broker on 127.0.0.1 (tests/testutil.h): the handshake, hostile
 * input on raw sockets (bad lengths, garbage, TLS and HTTP, a garbage
 * flood), liveness limits (hello timeout, heartbeats) and SIGTERM.
 * Queue administration is in check_admin.c, delivery in check_delivery.c,
 * request errors and frame limits in check_requests.c, restarts in
 * check_durability.c; the fixture they share is server_fixture.c.
 *
 * Every test gets a fresh broker in its own temp dir (a checked fixture) and
 * every wait is bounded. PROTOQD names the broker binary, PROTOQ the CLI.
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

/* Short liveness limits, to see them enforced within a test. */
static void
setup_server_short_timeouts(void)
{
    start_with_conf("idle_timeout_ms 300\n"
                    "heartbeat_ms 100\n"
                    "heartbeat_timeout_ms 500\n");
}

/* ------------------------------------------------------ raw frames */

static uint8_t *
pack_hello(uint64_t rid, uint32_t version, size_t *len)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Hello h = PROTOQ__HELLO__INIT;
    uint8_t *b;

    h.protocol_version = version;
    h.client_name = (char *)"check_server";
    f.request_id = rid;
    f.kind_case = PROTOQ__FRAME__KIND_HELLO;
    f.hello = &h;
    b = raw_pack(&f, len);
    ck_assert_ptr_nonnull(b);
    return b;
}

/* Send buf on a fresh connection (slowly: one byte per write), expect one
 * Error with code want (message containing sub) and then EOF. */
static void
expect_fatal(const void *buf, size_t len, bool slowly, int want,
             const char *sub)
{
    int fd = raw_connect(g_srv.port);

    ck_assert_int_ge(fd, 0);
    if (slowly) {
        ck_assert_int_eq(raw_send_slowly(fd, buf, len), 0);
    } else {
        send_all(fd, buf, len);
    }
    read_error(fd, want, sub);
    ck_assert_msg(raw_wait_eof(fd, RAW_TIMEOUT_MS),
                  "broker did not close after a fatal %s",
                  protoq_code_name(want));
    close(fd);
}

/* ============================================================ handshake */

START_TEST(test_connect_gets_sane_welcome)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_server_info si;
    char want_id[32];

    memset(&si, 0xa5, sizeof(si));
    protoq_server_info(c, &si);
    ck_assert_uint_eq(si.protocol_version, 1);
    snprintf(want_id, sizeof(want_id), "protoqd-%u", g_srv.port);
    ck_assert_str_eq(si.broker_id, want_id);
    ck_assert_msg(
        si.server_version[0] != '\0' &&
            memchr(si.server_version, '\0', sizeof(si.server_version)) != NULL,
        "server_version is empty or unterminated");
    ck_assert_uint_eq(si.max_frame_bytes, DEFAULT_MAX_FRAME);
    ck_assert_uint_eq(si.max_message_bytes, DEFAULT_MAX_MESSAGE);
    ck_assert_uint_lt(si.max_message_bytes, si.max_frame_bytes);
    ck_assert_uint_eq(si.max_batch, DEFAULT_MAX_BATCH);
    ck_assert_uint_eq(si.heartbeat_ms, DEFAULT_HEARTBEAT_MS);
    ck_assert_int_ge(protoq_fd(c), 0);
    protoq_close(c);
}
END_TEST

START_TEST(test_many_clients_connect_at_once)
{
    protoq_client *cs[20];
    size_t n = 0;

    for (size_t i = 0; i < 20; i++) {
        cs[i] = pq_connect_or_fail(&g_srv);
    }
    for (size_t i = 0; i < 20; i++) {
        struct protoq_queue_info *list = NULL;

        pq_check_ok(cs[i], protoq_queue_list(cs[i], &list, &n));
        ck_assert_uint_eq(n, 0);
        protoq_queue_list_free(list, n);
        protoq_close(cs[i]);
    }
}
END_TEST

START_TEST(test_hello_with_wrong_version_is_unsupported_version)
{
    size_t len;
    uint8_t *b = pack_hello(1, 2, &len);

    expect_fatal(b, len, false, PROTOQ_CODE_UNSUPPORTED_VERSION, NULL);
    free(b);
    assert_broker_healthy();
}
END_TEST

START_TEST(test_second_hello_is_unexpected_frame)
{
    int fd = raw_ready();
    size_t len;
    uint8_t *b = pack_hello(2, 1, &len);

    send_all(fd, b, len);
    read_error(fd, PROTOQ_CODE_UNEXPECTED_FRAME, NULL);
    ck_assert(raw_wait_eof(fd, RAW_TIMEOUT_MS));
    close(fd);
    free(b);
    assert_broker_healthy();
}
END_TEST

START_TEST(test_broker_only_frame_from_client_is_unexpected_frame)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Welcome w = PROTOQ__WELCOME__INIT;
    int fd = raw_ready();
    size_t len;
    uint8_t *b;

    w.protocol_version = 1;
    f.request_id = 2;
    f.kind_case = PROTOQ__FRAME__KIND_WELCOME;
    f.welcome = &w;
    b = raw_pack(&f, &len);
    ck_assert_ptr_nonnull(b);
    send_all(fd, b, len);
    read_error(fd, PROTOQ_CODE_UNEXPECTED_FRAME, NULL);
    ck_assert(raw_wait_eof(fd, RAW_TIMEOUT_MS));
    close(fd);
    free(b);
    assert_broker_healthy();
}
END_TEST

START_TEST(test_unknown_frame_kind_is_answered_and_connection_stays_open)
{
    /* request_id 7, then field 99 (varint 1): a kind from the future. */
    static const uint8_t unknown[] = {0, 0, 0, 5, 0x08, 0x07, 0x98, 0x06, 0x01};
    int fd = raw_ready();
    size_t len;
    uint8_t *b = pack_queue_list(8, &len);
    Protoq__Frame *f = NULL;
    int rc;

    send_all(fd, unknown, sizeof(unknown));
    rc = raw_read_frame(fd, RAW_TIMEOUT_MS, 1u << 20, &f);
    ck_assert_int_eq(rc, 0);
    ck_assert_int_eq(f->kind_case, PROTOQ__FRAME__KIND_ERROR);
    ck_assert_int_eq(f->error->code, PROTOQ_CODE_UNKNOWN_FRAME);
    ck_assert_uint_eq(f->request_id, 7);
    frame_free(f);
    send_all(fd, b, len);
    f = read_kind(fd, PROTOQ__FRAME__KIND_QUEUE_LIST_OK, 8);
    frame_free(f);
    close(fd);
    free(b);
}
END_TEST

/* ======================================================== hostile input */

START_TEST(test_frames_sent_one_byte_at_a_time_work)
{
    int fd = raw_connect(g_srv.port);
    Protoq__Frame *f;
    size_t len;
    uint8_t *b;

    ck_assert_int_ge(fd, 0);
    b = pack_hello(1, 1, &len);
    ck_assert_int_eq(raw_send_slowly(fd, b, len), 0);
    free(b);
    f = read_kind(fd, PROTOQ__FRAME__KIND_WELCOME, 1);
    frame_free(f);
    b = pack_queue_list(2, &len);
    ck_assert_int_eq(raw_send_slowly(fd, b, len), 0);
    free(b);
    f = read_kind(fd, PROTOQ__FRAME__KIND_QUEUE_LIST_OK, 2);
    frame_free(f);
    close(fd);
    assert_broker_healthy();
}
END_TEST

START_TEST(test_several_frames_in_one_write_are_all_answered)
{
    int fd = raw_connect(g_srv.port);
    size_t l1, l2, l3;
    uint8_t *b1 = pack_hello(1, 1, &l1);
    uint8_t *b2 = pack_queue_create(2, "multi", &l2);
    uint8_t *b3 = pack_queue_list(3, &l3);
    uint8_t *all = malloc(l1 + l2 + l3);
    Protoq__Frame *f;

    ck_assert_int_ge(fd, 0);
    ck_assert_ptr_nonnull(all);
    memcpy(all, b1, l1);
    memcpy(all + l1, b2, l2);
    memcpy(all + l1 + l2, b3, l3);
    send_all(fd, all, l1 + l2 + l3);
    f = read_kind(fd, PROTOQ__FRAME__KIND_WELCOME, 1);
    frame_free(f);
    /* Replies may come in any order: match by request id. */
    for (int i = 0; i < 2; i++) {
        int rc = raw_read_frame(fd, RAW_TIMEOUT_MS, 1u << 20, &f);

        ck_assert_int_eq(rc, 0);
        if (f->request_id == 2) {
            ck_assert_int_eq(f->kind_case, PROTOQ__FRAME__KIND_OK);
        } else {
            ck_assert_uint_eq(f->request_id, 3);
            ck_assert_int_eq(f->kind_case, PROTOQ__FRAME__KIND_QUEUE_LIST_OK);
        }
        frame_free(f);
    }
    free(b1);
    free(b2);
    free(b3);
    free(all);
    close(fd);
    assert_broker_healthy();
}
END_TEST

START_TEST(test_length_zero_is_malformed_frame)
{
    static const uint8_t zero[] = {0, 0, 0, 0};

    expect_fatal(zero, sizeof(zero), false, PROTOQ_CODE_MALFORMED_FRAME, NULL);
    assert_broker_healthy();
}
END_TEST

START_TEST(test_length_zero_after_hello_is_malformed_frame)
{
    static const uint8_t zero[] = {0, 0, 0, 0};
    int fd = raw_ready();

    send_all(fd, zero, sizeof(zero));
    read_error(fd, PROTOQ_CODE_MALFORMED_FRAME, NULL);
    ck_assert(raw_wait_eof(fd, RAW_TIMEOUT_MS));
    close(fd);
    assert_broker_healthy();
}
END_TEST

START_TEST(test_length_ffffffff_is_frame_too_large)
{
    static const uint8_t huge[] = {0xff, 0xff, 0xff, 0xff};
    int fd;

    expect_fatal(huge, sizeof(huge), false, PROTOQ_CODE_FRAME_TOO_LARGE, NULL);
    expect_fatal(huge, sizeof(huge), true, PROTOQ_CODE_FRAME_TOO_LARGE, NULL);
    /* After Hello as well. */
    fd = raw_ready();
    send_all(fd, huge, sizeof(huge));
    read_error(fd, PROTOQ_CODE_FRAME_TOO_LARGE, NULL);
    ck_assert(raw_wait_eof(fd, RAW_TIMEOUT_MS));
    close(fd);
    assert_broker_healthy();
}
END_TEST

START_TEST(test_garbage_protobuf_is_malformed_frame)
{
    /* Field 2 (hello) says 127 bytes follow, and only one does. */
    static const uint8_t bad[] = {0, 0, 0, 3, 0x12, 0x7f, 0x01};
    /* An 11-byte varint. */
    static const uint8_t badvarint[] = {0,    0,    0,    12,   0x08, 0xff,
                                        0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
                                        0xff, 0xff, 0xff, 0x01};
    uint8_t *hello, *both;
    size_t len;
    int fd;

    expect_fatal(bad, sizeof(bad), false, PROTOQ_CODE_MALFORMED_FRAME, NULL);
    expect_fatal(badvarint, sizeof(badvarint), false,
                 PROTOQ_CODE_MALFORMED_FRAME, NULL);
    /* Garbage right after a good frame, in the same write. */
    hello = pack_hello(1, 1, &len);
    both = malloc(len + sizeof(bad));
    ck_assert_ptr_nonnull(both);
    memcpy(both, hello, len);
    memcpy(both + len, bad, sizeof(bad));
    fd = raw_connect(g_srv.port);
    ck_assert_int_ge(fd, 0);
    send_all(fd, both, len + sizeof(bad));
    frame_free(read_kind(fd, PROTOQ__FRAME__KIND_WELCOME, 1));
    read_error(fd, PROTOQ_CODE_MALFORMED_FRAME, NULL);
    ck_assert(raw_wait_eof(fd, RAW_TIMEOUT_MS));
    close(fd);
    free(hello);
    free(both);
    assert_broker_healthy();
}
END_TEST

START_TEST(test_first_frame_not_hello_is_unexpected_frame)
{
    size_t len;
    uint8_t *b = pack_queue_list(1, &len);

    expect_fatal(b, len, false, PROTOQ_CODE_UNEXPECTED_FRAME, NULL);
    free(b);
    b = pack_publish(1, "q", "x", 1, &len);
    expect_fatal(b, len, false, PROTOQ_CODE_UNEXPECTED_FRAME, NULL);
    free(b);
    assert_broker_healthy();
}
END_TEST

START_TEST(test_tls_client_hello_gets_error_and_close)
{
    uint8_t hello[5 + 0x200];

    /* Record header, handshake type 1 (ClientHello), TLS 1.2 version, then
     * filler where the random and the cipher suites would be. */
    static const uint8_t prefix[] = {0x16, 0x03, 0x01, 0x02, 0x00, 0x01,
                                     0x00, 0x01, 0xfc, 0x03, 0x03};

    memset(hello, 0x5a, sizeof(hello));
    memcpy(hello, prefix, sizeof(prefix));
    expect_fatal(hello, sizeof(hello), false, PROTOQ_CODE_FRAME_TOO_LARGE,
                 "TLS");
    assert_broker_healthy();
}
END_TEST

START_TEST(test_http_request_gets_error_and_close)
{
    static const char get[] = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";

    expect_fatal(get, sizeof(get) - 1, false, PROTOQ_CODE_FRAME_TOO_LARGE,
                 "HTTP");
    assert_broker_healthy();
}
END_TEST

START_TEST(test_frame_over_4k_before_hello_is_frame_too_large)
{
    /* Only the prefix: the broker must refuse before the body arrives. */
    uint8_t hdr[4] = {0, 0, (MAX_HELLO_BYTES + 1) >> 8,
                      (MAX_HELLO_BYTES + 1) & 0xff};

    expect_fatal(hdr, sizeof(hdr), false, PROTOQ_CODE_FRAME_TOO_LARGE, NULL);
    assert_broker_healthy();
}
END_TEST

START_TEST(test_frames_over_4k_are_accepted_after_hello)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    char payload[64 * 1024];
    struct protoq_queue_info qi;
    Protoq__Frame *f;
    size_t len;
    uint8_t *b;
    int fd;

    pq_check_ok(c, protoq_queue_create(c, "large", NULL));
    memset(payload, 'L', sizeof(payload));
    fd = raw_ready();
    b = pack_publish(2, "large", payload, sizeof(payload), &len);
    send_all(fd, b, len);
    free(b);
    f = read_kind(fd, PROTOQ__FRAME__KIND_PUBLISH_OK, 2);
    ck_assert_uint_eq(f->publish_ok->n_message_ids, 1);
    frame_free(f);
    close(fd);
    stat_q(c, "large", &qi);
    ck_assert_uint_eq(qi.ready, 1);
    ck_assert_uint_eq(qi.bytes, sizeof(payload));
    protoq_close(c);
}
END_TEST

START_TEST(test_frame_over_max_frame_bytes_after_hello_is_frame_too_large)
{
    uint32_t n = DEFAULT_MAX_FRAME + 1;
    uint8_t hdr[4] = {(uint8_t)(n >> 24), (uint8_t)(n >> 16), (uint8_t)(n >> 8),
                      (uint8_t)n};
    int fd = raw_ready();

    send_all(fd, hdr, sizeof(hdr));
    read_error(fd, PROTOQ_CODE_FRAME_TOO_LARGE, NULL);
    ck_assert(raw_wait_eof(fd, RAW_TIMEOUT_MS));
    close(fd);
    assert_broker_healthy();
}
END_TEST

START_TEST(test_costly_to_decode_frame_is_malformed_frame)
{
    /* A batch of empty items: 2 bytes each on the wire, far more decoded. */
    enum { ITEMS = 150000 };
    size_t body = 2 + 4 + 2 * ITEMS + 8; /* generous upper bound */
    uint8_t *buf = malloc(4 + body);
    size_t inner = 2 * ITEMS;
    size_t p = 4, n;
    long before, after;

    ck_assert_ptr_nonnull(buf);
    /* The decoded form must really exceed the broker's budget. */
    ck_assert_uint_gt((size_t)ITEMS *
                          (sizeof(Protoq__Publish) + sizeof(void *)),
                      frame_decode_budget(body));
    buf[p++] = 0x08; /* request_id 1 */
    buf[p++] = 0x01;
    buf[p++] = 0xaa; /* field 21 (publish_batch), length-delimited */
    buf[p++] = 0x01;
    p += pbwire_put_varint(buf + p, inner);
    for (size_t i = 0; i < ITEMS; i++) {
        buf[p++] = 0x0a; /* items, length 0 */
        buf[p++] = 0x00;
    }
    n = p - 4;
    buf[0] = (uint8_t)(n >> 24);
    buf[1] = (uint8_t)(n >> 16);
    buf[2] = (uint8_t)(n >> 8);
    buf[3] = (uint8_t)n;
    before = srv_vmhwm_kb(&g_srv);
    {
        int fd = raw_ready();

        send_all(fd, buf, p);
        read_error(fd, PROTOQ_CODE_MALFORMED_FRAME, NULL);
        ck_assert(raw_wait_eof(fd, RAW_TIMEOUT_MS));
        close(fd);
    }
    after = srv_vmhwm_kb(&g_srv);
    ck_assert_int_gt(before, 0);
    ck_assert_msg(after - before < 64 * 1024,
                  "VmHWM grew by %ld KiB decoding a %zu-byte frame",
                  after - before, n);
    free(buf);
    assert_broker_healthy();
}
END_TEST

START_TEST(test_half_a_frame_then_close_is_harmless)
{
    size_t len;
    uint8_t *b = pack_hello(1, 1, &len);

    for (int i = 0; i < 20; i++) {
        int fd = raw_connect(g_srv.port);

        ck_assert_int_ge(fd, 0);
        send_all(fd, b, (size_t)(i % 4) + 2 < len ? (size_t)(i % 4) + 2 : 1);
        close(fd);
    }
    free(b);
    assert_broker_healthy();
}
END_TEST

/* ============================================================ garbage flood */

static uint64_t
xorshift(uint64_t *s)
{
    uint64_t x = *s;

    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return x;
}

/* Child: n connections of assorted garbage; each closed after an Error, an
 * EOF or 1 s. Exits 0 unless it could not connect. */
static void
garbage_child(uint16_t port, int n)
{
    static uint8_t buf[64 * 1024];
    uint64_t seed = 0x9e3779b97f4a7c15ull;
    int failures = 0;

    for (int i = 0; i < n; i++) {
        struct timeval tv = {.tv_sec = 1, .tv_usec = 0};
        int fd = raw_connect(port);
        size_t len;

        if (fd < 0) {
            failures++;
            continue;
        }
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
        len = 1 + xorshift(&seed) % sizeof(buf);
        for (size_t j = 0; j < len; j++) {
            buf[j] = (uint8_t)xorshift(&seed);
        }
        switch (i % 6) {
        case 0: /* random bytes */
            break;
        case 1: /* huge length */
            memset(buf, 0xff, 4);
            break;
        case 2: /* TLS */
            memcpy(buf, "\x16\x03\x01\x02\x00", len < 5 ? len : 5);
            break;
        case 3: /* HTTP */
            memcpy(buf, "GET / HTTP/1.1\r\n", len < 16 ? len : 16);
            break;
        case 4: /* a plausible length, garbage body */
            if (len >= 4) {
                uint32_t bl = (uint32_t)(len - 4) % MAX_HELLO_BYTES + 1;

                len = 4 + bl;
                buf[0] = 0;
                buf[1] = 0;
                buf[2] = (uint8_t)(bl >> 8);
                buf[3] = (uint8_t)bl;
            }
            break;
        default: /* zero length */
            if (len >= 4) {
                memset(buf, 0, 4);
            }
            break;
        }
        (void)raw_send(fd, buf, len);
        (void)raw_wait_eof(fd, 1000);
        close(fd);
    }
    _exit(failures > n / 10 ? 1 : 0);
}

START_TEST(test_garbage_flood_does_not_hurt_a_good_client)
{
    enum { N = 10000, BAD = 200 };
    struct protoq_queue_info qi;
    protoq_client *c;
    int64_t deadline;
    int status = -1;
    long hwm;
    pid_t kid;

    kid = fork();
    ck_assert_int_ge(kid, 0);
    if (kid == 0) {
        garbage_child(g_srv.port, BAD);
    }
    c = pq_connect_or_fail(&g_srv);
    pq_check_ok(c, protoq_queue_create(c, "good", NULL));
    publish_seq(c, "good", N, NULL);
    consume_seq_in_order("good", N, 500, 1, 30000);

    deadline = now_ms_mono() + 40000;
    for (;;) {
        pid_t r = waitpid(kid, &status, WNOHANG);

        if (r == kid) {
            break;
        }
        if (now_ms_mono() >= deadline) {
            kill(kid, SIGKILL);
            waitpid(kid, &status, 0);
            ck_abort_msg("the garbage client did not finish in time");
        }
        sleep_ms(10);
    }
    ck_assert_msg(WIFEXITED(status) && WEXITSTATUS(status) == 0,
                  "the garbage client could not connect (status 0x%x)", status);
    ck_assert_int_eq(kill(g_srv.pid, 0), 0);
    stat_q(c, "good", &qi);
    ck_assert_uint_eq(qi.published, N);
    hwm = srv_vmhwm_kb(&g_srv);
    ck_assert_int_gt(hwm, 0);
    ck_assert_msg(hwm < 200 * 1024, "protoqd VmHWM %ld KiB", hwm);
    protoq_close(c);
    assert_broker_healthy();
}
END_TEST

/* ============================================================ liveness */

START_TEST(test_no_hello_in_time_is_unexpected_frame)
{
    int fd = raw_connect(g_srv.port);
    int64_t t0 = now_ms_mono();

    ck_assert_int_ge(fd, 0);
    read_error(fd, PROTOQ_CODE_UNEXPECTED_FRAME, NULL);
    ck_assert(raw_wait_eof(fd, RAW_TIMEOUT_MS));
    ck_assert_int_ge(now_ms_mono() - t0, 250);
    close(fd);
    assert_broker_healthy();
}
END_TEST

START_TEST(test_silent_subscriber_is_closed_and_its_delivery_returns)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Subscribe sub = PROTOQ__SUBSCRIBE__INIT;
    protoq_client *c = pq_connect_or_fail(&g_srv);
    Protoq__Frame *r;
    uint64_t id = 0;
    struct coll k;
    size_t len;
    uint8_t *b;
    int fd;

    create_fast_retry_queue(c, "hb");
    pub_str(c, "hb", "job", 0, &id);
    fd = raw_ready();
    sub.queue = (char *)"hb";
    sub.prefetch = 1;
    f.request_id = 2;
    f.kind_case = PROTOQ__FRAME__KIND_SUBSCRIBE;
    f.subscribe = &sub;
    b = raw_pack(&f, &len);
    ck_assert_ptr_nonnull(b);
    send_all(fd, b, len);
    free(b);
    r = read_kind(fd, PROTOQ__FRAME__KIND_SUBSCRIBE_OK, 2);
    frame_free(r);
    /* Heartbeats may come first; the Deliver must come. */
    for (int i = 0; i < 20; i++) {
        ck_assert_int_eq(raw_read_frame(fd, RAW_TIMEOUT_MS, 1u << 20, &r), 0);
        if (r->kind_case == PROTOQ__FRAME__KIND_DELIVER) {
            break;
        }
        ck_assert_int_eq(r->kind_case, PROTOQ__FRAME__KIND_HEARTBEAT);
        frame_free(r);
        r = NULL;
    }
    ck_assert_ptr_nonnull(r);
    ck_assert_uint_eq(r->deliver->message_id, id);
    ck_assert_uint_eq(r->deliver->attempt, 1);
    frame_free(r);
    /* Say nothing more: closed after heartbeat_timeout_ms (500). */
    ck_assert_msg(raw_wait_eof(fd, 5000), "a silent subscriber was not closed");
    close(fd);
    coll_init(&k, 4, true);
    pq_check_ok(c, protoq_subscribe(c, "hb", 1, NULL, 0, on_collect, &k, NULL));
    ck_assert_uint_eq(poll_until(c, &k, 1, 5000), 1);
    ck_assert_uint_eq(k.v[0].id, id);
    ck_assert_uint_eq(k.v[0].attempt, 2);
    coll_free(&k);
    protoq_close(c);
}
END_TEST

START_TEST(test_silent_producer_is_not_closed)
{
    int fd = raw_ready();
    Protoq__Frame *r;
    size_t len;
    uint8_t *b = pack_queue_list(2, &len);

    /* Longer than the heartbeat timeout, without subscriptions. */
    ck_assert(!raw_wait_eof(fd, 1500));
    send_all(fd, b, len);
    r = read_kind(fd, PROTOQ__FRAME__KIND_QUEUE_LIST_OK, 2);
    frame_free(r);
    free(b);
    close(fd);
}
END_TEST

START_TEST(test_libprotoq_subscriber_keeps_its_connection_alive)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_server_info si;
    struct coll k;

    protoq_server_info(c, &si);
    ck_assert_uint_eq(si.heartbeat_ms, 100);
    pq_check_ok(p, protoq_queue_create(p, "alive", NULL));
    coll_init(&k, 4, true);
    pq_check_ok(c,
                protoq_subscribe(c, "alive", 1, NULL, 0, on_collect, &k, NULL));
    /* Idle, but polling, for three heartbeat timeouts. */
    poll_for(c, 1500);
    pub_str(p, "alive", "late", 0, NULL);
    ck_assert_uint_eq(poll_until(c, &k, 1, 5000), 1);
    ck_assert_str_eq(k.v[0].payload, "late");
    ck_assert_uint_eq(k.v[0].attempt, 1);
    coll_free(&k);
    protoq_close(p);
    protoq_close(c);
}
END_TEST

/* ============================================================== signals */

START_TEST(test_sigterm_exits_0)
{
    ck_assert_int_eq(srv_stop(&g_srv), 0);
}
END_TEST

START_TEST(test_sigterm_with_busy_clients_exits_0_and_keeps_messages)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    protoq_client *w = pq_connect_or_fail(&g_srv);
    struct protoq_queue_info qi;
    struct coll k;

    pq_check_ok(p, protoq_queue_create(p, "busy", NULL));
    publish_seq(p, "busy", 50, NULL);
    coll_init(&k, 64, false);
    pq_check_ok(w,
                protoq_subscribe(w, "busy", 10, NULL, 0, on_collect, &k, NULL));
    ck_assert_uint_eq(poll_until(w, &k, 10, 5000), 10);
    ck_assert_int_eq(srv_stop(&g_srv), 0);
    protoq_close(w);
    protoq_close(p);
    ck_assert_int_eq(srv_launch(&g_srv), 0);
    p = pq_connect_or_fail(&g_srv);
    stat_q(p, "busy", &qi);
    /* A clean stop releases the ten in flight: ready at once, no failed
     * attempt (no retry backoff). */
    ck_assert_uint_eq(qi.ready, 50);
    ck_assert_uint_eq(qi.delayed, 0);
    ck_assert_uint_eq(qi.inflight, 0);
    coll_free(&k);
    protoq_close(p);
}
END_TEST

static Suite *
server_suite(void)
{
    Suite *s = suite_create("server");
    TCase *tc;

    tc = tcase(s, "handshake", 30);
    tcase_add_test(tc, test_connect_gets_sane_welcome);
    tcase_add_test(tc, test_many_clients_connect_at_once);
    tcase_add_test(tc, test_hello_with_wrong_version_is_unsupported_version);
    tcase_add_test(tc, test_second_hello_is_unexpected_frame);
    tcase_add_test(tc, test_broker_only_frame_from_client_is_unexpected_frame);
    tcase_add_test(
        tc, test_unknown_frame_kind_is_answered_and_connection_stays_open);

    tc = tcase(s, "hostile_input", 30);
    tcase_add_test(tc, test_frames_sent_one_byte_at_a_time_work);
    tcase_add_test(tc, test_several_frames_in_one_write_are_all_answered);
    tcase_add_test(tc, test_length_zero_is_malformed_frame);
    tcase_add_test(tc, test_length_zero_after_hello_is_malformed_frame);
    tcase_add_test(tc, test_length_ffffffff_is_frame_too_large);
    tcase_add_test(tc, test_garbage_protobuf_is_malformed_frame);
    tcase_add_test(tc, test_first_frame_not_hello_is_unexpected_frame);
    tcase_add_test(tc, test_tls_client_hello_gets_error_and_close);
    tcase_add_test(tc, test_http_request_gets_error_and_close);
    tcase_add_test(tc, test_frame_over_4k_before_hello_is_frame_too_large);
    tcase_add_test(tc, test_frames_over_4k_are_accepted_after_hello);
    tcase_add_test(
        tc, test_frame_over_max_frame_bytes_after_hello_is_frame_too_large);
    tcase_add_test(tc, test_costly_to_decode_frame_is_malformed_frame);
    tcase_add_test(tc, test_half_a_frame_then_close_is_harmless);

    tc = tcase(s, "garbage_flood", 90);
    tcase_add_test(tc, test_garbage_flood_does_not_hurt_a_good_client);

    tc = tcase_create("liveness");
    tcase_add_checked_fixture(tc, setup_server_short_timeouts,
                              teardown_server_conf);
    tcase_set_timeout(tc, 30);
    suite_add_tcase(s, tc);
    tcase_add_test(tc, test_no_hello_in_time_is_unexpected_frame);
    tcase_add_test(tc,
                   test_silent_subscriber_is_closed_and_its_delivery_returns);
    tcase_add_test(tc, test_silent_producer_is_not_closed);
    tcase_add_test(tc, test_libprotoq_subscriber_keeps_its_connection_alive);

    tc = tcase(s, "signals", 30);
    tcase_add_test(tc, test_sigterm_exits_0);
    tcase_add_test(tc,
                   test_sigterm_with_busy_clients_exits_0_and_keeps_messages);
    return s;
}

int
main(void)
{
    SRunner *sr = srunner_create(server_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
