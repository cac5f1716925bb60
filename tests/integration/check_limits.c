/*
 * check_limits.c: the broker's fair limits against a real protoqd on
 * loopback: partial frames count against memory_high_bytes and are closed
 * by frame_timeout_ms, a slowloris frame is closed, idle connections
 * without subscriptions time out, connections per source address are
 * capped, a flood of connections that never say Hello does not lock out a
 * client that does, and lines about bad connections are rate-limited.
 *
 * Every test gets its own broker with its own conf file; every wait is
 * bounded. Source addresses other than 127.0.0.1 are other loopback
 * addresses (127.0.0.2, ...), which Linux routes to lo.
 */
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <check.h>

#include "testutil.h"

enum {
    RAW_TIMEOUT_MS = 3000,
    MIB = 1024 * 1024,
    BIG_FRAME = 4 * MIB, /* the default max_frame_bytes */
    FLOOD_CONNS = 100,
};

static struct srv g_srv;
static struct test_conf g_conf;
static const char *g_args[8];

/* Start a broker with conf text (and --log-level info when verbose). */
static void
start_with(const char *text, bool verbose)
{
    int i = 0;

    signal(SIGPIPE, SIG_IGN);
    ck_assert_int_eq(test_conf_write(&g_conf, text), 0);
    g_args[i++] = "-c";
    g_args[i++] = g_conf.path;
    if (verbose) {
        g_args[i++] = "--log-level";
        g_args[i++] = "info";
    }
    g_args[i] = NULL;
    if (srv_start(&g_srv, g_args) != 0) {
        srv_cleanup(&g_srv);
        test_conf_remove(&g_conf);
        ck_abort_msg("could not start protoqd with:\n%s", text);
    }
}

static void
teardown(void)
{
    int rc = g_srv.pid > 0 ? srv_stop(&g_srv) : 0;

    srv_cleanup(&g_srv);
    test_conf_remove(&g_conf);
    ck_assert_msg(rc == 0, "protoqd exited %d", rc);
}

/* The broker's VmRSS in KiB, or -1. */
static long
srv_rss_kb(const struct srv *s)
{
    char path[64], buf[4096];
    const char *p;

    snprintf(path, sizeof(path), "/proc/%d/status", (int)s->pid);
    file_slurp(path, buf, sizeof(buf));
    p = strstr(buf, "VmRSS:");
    return p ? strtol(p + 6, NULL, 10) : -1;
}

/* A TCP connection from loopback address src (e.g. "127.0.0.2"). */
static int
connect_from(const char *src, uint16_t port)
{
    struct sockaddr_in me = {.sin_family = AF_INET};
    struct sockaddr_in to = {.sin_family = AF_INET};
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;

    ck_assert_int_ge(fd, 0);
    inet_pton(AF_INET, src, &me.sin_addr);
    to.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    to.sin_port = htons(port);
    ck_assert_int_eq(bind(fd, (struct sockaddr *)&me, sizeof(me)), 0);
    ck_assert_int_eq(connect(fd, (struct sockaddr *)&to, sizeof(to)), 0);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    return fd;
}

/* The next frame on fd is an Error with code want (or the peer closed
 * at once, which a refused connection may see instead), then EOF. */
static void
expect_error_then_eof(int fd, int want, int timeout_ms)
{
    Protoq__Frame *f = NULL;
    int rc = raw_read_frame(fd, timeout_ms, 1u << 20, &f);

    ck_assert_msg(rc == 0 || rc == 1, "no Error and no close within %d ms",
                  timeout_ms);
    if (rc == 0) {
        ck_assert_int_eq(f->kind_case, PROTOQ__FRAME__KIND_ERROR);
        ck_assert_msg((int)f->error->code == want, "code %d (%s), want %d",
                      (int)f->error->code, f->error->message, want);
        frame_free(f);
        ck_assert(raw_wait_eof(fd, timeout_ms));
    }
}

/*
 * Open n connections that say Hello and then start a frame of BIG_FRAME
 * bytes each, and push its body without blocking until every one is sent
 * or nothing moved for 1.5 s (the broker stopped reading). fds gets them.
 * Returns the body bytes the kernel took.
 */
static uint64_t
flood_partial_frames(int *fds, int n)
{
    static uint8_t chunk[256 * 1024];
    size_t sent[FLOOD_CONNS] = {0};
    uint8_t hdr[4] = {BIG_FRAME >> 24, (BIG_FRAME >> 16) & 0xff,
                      (BIG_FRAME >> 8) & 0xff, BIG_FRAME & 0xff};
    int64_t last_move = now_ms_mono(), deadline = last_move + 30000;
    uint64_t total = 0;
    bool all;

    ck_assert_int_le(n, FLOOD_CONNS);
    memset(chunk, 0x5a, sizeof(chunk));
    for (int i = 0; i < n; i++) {
        fds[i] = raw_connect(g_srv.port);
        ck_assert_int_ge(fds[i], 0);
        ck_assert_int_eq(raw_hello(fds[i], RAW_TIMEOUT_MS), 0);
        ck_assert_int_eq(raw_send(fds[i], hdr, sizeof(hdr)), 0);
    }
    do {
        all = true;
        for (int i = 0; i < n; i++) {
            size_t left = BIG_FRAME - 1 - sent[i]; /* never complete it */
            ssize_t w;

            if (left == 0) {
                continue;
            }
            all = false;
            w = send(fds[i], chunk, left < sizeof(chunk) ? left : sizeof(chunk),
                     MSG_DONTWAIT | MSG_NOSIGNAL);
            if (w > 0) {
                sent[i] += (size_t)w;
                total += (uint64_t)w;
                last_move = now_ms_mono();
            }
        }
        if (!all && now_ms_mono() - last_move > 100) {
            usleep(10000);
        }
    } while (!all && now_ms_mono() - last_move < 1500 &&
             now_ms_mono() < deadline);
    return total;
}

/* ---- memory and time a partial frame may take ---- */

/*
 * What 48 MiB of counted memory may cost in RSS: itself, and under
 * AddressSanitizer its shadow (an eighth) and redzones too.
 */
#if defined(__SANITIZE_ADDRESS__)
#define RSS_BUDGET_KB (48 * 1024 * 5 / 4)
#else
#define RSS_BUDGET_KB (48 * 1024)
#endif

static void
publish_1mib(protoq_client *c, const char *queue)
{
    static uint8_t payload[MIB];
    struct protoq_message m = {.payload = payload, .len = sizeof(payload)};
    uint64_t id;

    memset(payload, 'p', sizeof(payload));
    pq_check_ok(c, protoq_publish(c, queue, &m, &id));
}

START_TEST(test_partial_frames_stay_within_budget_and_time_out)
{
    int fds[FLOOD_CONNS];
    long hwm0, hwm1, rss_closed;
    uint64_t pushed;
    int64_t t0;
    protoq_client *c;

    start_with("memory_high_bytes 48M\n"
               "frame_timeout_ms 3s\n",
               false);
    /* Warm up: a stored 1 MiB message (counted in the budget), and every
     * code path of a big frame run once. */
    c = pq_connect_or_fail(&g_srv);
    pq_check_ok(c, protoq_queue_create(c, "q", NULL));
    publish_1mib(c, "q");
    protoq_close(c);
    usleep(100 * 1000);
    hwm0 = srv_vmhwm_kb(&g_srv);
    ck_assert_int_gt(hwm0, 0);
    t0 = now_ms_mono();
    pushed = flood_partial_frames(fds, FLOOD_CONNS);
    hwm1 = srv_vmhwm_kb(&g_srv);
    fprintf(stderr,
            "partial frames: %d connections pushed %llu MiB; peak RSS %ld "
            "-> %ld KiB (+%ld KiB; budget 48 MiB)\n",
            FLOOD_CONNS, (unsigned long long)(pushed / MIB), hwm0, hwm1,
            hwm1 - hwm0);
    ck_assert_msg(hwm1 - hwm0 <= RSS_BUDGET_KB,
                  "peak RSS grew by %ld KiB, over the budget (%d KiB)",
                  hwm1 - hwm0, RSS_BUDGET_KB);

    /* Every one of them is closed by the frame timeout (3 s after its
     * first byte, checked once a second). */
    for (int i = 0; i < FLOOD_CONNS; i++) {
        int64_t left = t0 + 3000 + 4000 - now_ms_mono();
        expect_error_then_eof(fds[i], PROTOQ__ERROR_CODE__MALFORMED_FRAME,
                              left > 500 ? (int)left : 500);
        close(fds[i]);
    }
    /* The memory came back: a big publish is accepted again. */
    c = pq_connect_or_fail(&g_srv);
    publish_1mib(c, "q");
    protoq_close(c);
    /* And the process gave it back (malloc_trim within a second or two). */
    usleep(2500 * 1000);
    rss_closed = srv_rss_kb(&g_srv);
    fprintf(stderr, "partial frames: RSS after they closed: %ld KiB\n",
            rss_closed);
#if !defined(__SANITIZE_ADDRESS__) /* ASan keeps freed memory a while */
    ck_assert_msg(rss_closed <= hwm0 + 16 * 1024,
                  "RSS %ld KiB after the connections closed (start %ld)",
                  rss_closed, hwm0);
#endif
}
END_TEST

START_TEST(test_slowloris_frame_is_closed_by_frame_timeout)
{
    uint8_t hdr[4] = {0, 0, 0, 100};
    int64_t t0, took;
    int fd;

    start_with("frame_timeout_ms 1s\n", false);
    fd = raw_connect(g_srv.port);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(raw_hello(fd, RAW_TIMEOUT_MS), 0);
    ck_assert_int_eq(raw_send(fd, hdr, sizeof(hdr)), 0);
    t0 = now_ms_mono();
    /* One byte every 200 ms: always busy, never done. */
    for (int i = 0; i < 40; i++) {
        if (raw_send(fd, "x", 1) != 0) {
            break;
        }
        if (raw_wait_eof(fd, 200)) {
            break;
        }
    }
    took = now_ms_mono() - t0;
    ck_assert_msg(took >= 900 && took <= 3500,
                  "closed after %lld ms (frame_timeout_ms 1s)",
                  (long long)took);
    close(fd);
}
END_TEST

/* ---- idle connections ---- */

static void
on_nothing(void *arg, protoq_client *c, const struct protoq_delivery *d)
{
    (void)c;
    (void)d;
    (void)arg;
}

START_TEST(test_idle_connection_without_subscription_is_closed)
{
    protoq_client *sub;
    int fd;

    start_with("idle_conn_timeout_ms 1s\n", false);
    sub = pq_connect_or_fail(&g_srv);
    pq_check_ok(sub, protoq_queue_create(sub, "idle", NULL));
    pq_check_ok(
        sub, protoq_subscribe(sub, "idle", 1, NULL, 0, on_nothing, NULL, NULL));
    fd = raw_connect(g_srv.port);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(raw_hello(fd, RAW_TIMEOUT_MS), 0);
    expect_error_then_eof(fd, PROTOQ__ERROR_CODE__OVERLOADED, 4000);
    close(fd);
    /* The subscriber, as silent, is still there. */
    usleep(500 * 1000);
    pq_check_ok(sub, protoq_queue_purge(sub, "idle", NULL));
    protoq_close(sub);
}
END_TEST

/* ---- how many connections, and from where ---- */

START_TEST(test_connections_per_address_are_capped)
{
    int fds[4], extra;
    protoq_client *c;

    start_with("max_connections_per_addr 4\n", false);
    for (int i = 0; i < 4; i++) {
        fds[i] = connect_from("127.0.0.2", g_srv.port);
        ck_assert_int_eq(raw_hello(fds[i], RAW_TIMEOUT_MS), 0);
    }
    extra = connect_from("127.0.0.2", g_srv.port);
    expect_error_then_eof(extra, PROTOQ__ERROR_CODE__OVERLOADED,
                          RAW_TIMEOUT_MS);
    close(extra);
    /* Another address is not affected. */
    c = pq_connect_or_fail(&g_srv);
    pq_check_ok(c, protoq_queue_create(c, "other", NULL));
    protoq_close(c);
    /* A slot freed is a slot again. */
    close(fds[0]);
    usleep(200 * 1000);
    fds[0] = connect_from("127.0.0.2", g_srv.port);
    ck_assert_int_eq(raw_hello(fds[0], RAW_TIMEOUT_MS), 0);
    for (int i = 0; i < 4; i++) {
        close(fds[i]);
    }
}
END_TEST

START_TEST(test_flood_without_hello_does_not_lock_out_a_client)
{
    enum { FLOOD = 600 };
    static int fds[FLOOD];
    protoq_client *c = NULL;
    int rc;

    /* max_connections 200: at most 100 of them may be waiting for Hello. */
    start_with("max_connections 200\n", false);
    for (int i = 0; i < FLOOD; i++) {
        char src[32];
        snprintf(src, sizeof(src), "127.0.%d.%d", 1 + i / 200, 2 + i % 200);
        fds[i] = connect_from(src, g_srv.port);
    }
    usleep(300 * 1000);
    rc = protoq_connect(g_srv.addr, NULL, &c);
    ck_assert_msg(rc == PQ_OK, "a client with a Hello was kept out: %s",
                  c ? protoq_errmsg(c) : "no memory");
    pq_check_ok(c, protoq_queue_create(c, "in", NULL));
    protoq_close(c);
    for (int i = 0; i < FLOOD; i++) {
        close(fds[i]);
    }
}
END_TEST

/* ---- logging ---- */

static int
count_lines(const char *path, const char *needle)
{
    char line[1024];
    int n = 0;
    FILE *f = fopen(path, "r");

    if (f == NULL) {
        return -1;
    }
    while (fgets(line, sizeof(line), f) != NULL) {
        n += strstr(line, needle) != NULL;
    }
    fclose(f);
    return n;
}

START_TEST(test_lines_about_bad_connections_are_rate_limited)
{
    enum { BAD = 300 };
    static const uint8_t zero[4] = {0, 0, 0, 0};
    char path[320];
    int64_t t0, took;
    int lines;

    start_with("", true);
    t0 = now_ms_mono();
    for (int i = 0; i < BAD; i++) {
        int fd = raw_connect(g_srv.port);
        ck_assert_int_ge(fd, 0);
        ck_assert_int_eq(raw_send(fd, zero, sizeof(zero)), 0);
        ck_assert(raw_wait_eof(fd, RAW_TIMEOUT_MS));
        close(fd);
    }
    took = now_ms_mono() - t0;
    /* One more, a second later, reports what was left out. */
    usleep(1100 * 1000);
    {
        int fd = raw_connect(g_srv.port);
        ck_assert_int_eq(raw_send(fd, zero, sizeof(zero)), 0);
        ck_assert(raw_wait_eof(fd, RAW_TIMEOUT_MS));
        close(fd);
    }
    srv_log_path(&g_srv, path, sizeof(path));
    lines = count_lines(path, "closing: frame length 0");
    fprintf(stderr, "bad connections: %d in %lld ms, %d lines logged\n", BAD,
            (long long)took, lines);
    ck_assert_int_le(lines, 10 * (int)(took / 1000 + 2) + 1);
    ck_assert(srv_log_has(&g_srv, "similar lines left out"));
}
END_TEST

static TCase *
tcase(Suite *s, const char *name, int timeout_s)
{
    TCase *tc = tcase_create(name);

    tcase_add_checked_fixture(tc, NULL, teardown);
    tcase_set_timeout(tc, timeout_s);
    suite_add_tcase(s, tc);
    return tc;
}

static Suite *
limits_suite(void)
{
    Suite *s = suite_create("limits");
    TCase *tc;

    tc = tcase(s, "partial_frames", 90);
    tcase_add_test(tc, test_partial_frames_stay_within_budget_and_time_out);
    tcase_add_test(tc, test_slowloris_frame_is_closed_by_frame_timeout);

    tc = tcase(s, "connections", 60);
    tcase_add_test(tc, test_idle_connection_without_subscription_is_closed);
    tcase_add_test(tc, test_connections_per_address_are_capped);
    tcase_add_test(tc, test_flood_without_hello_does_not_lock_out_a_client);

    tc = tcase(s, "logging", 60);
    tcase_add_test(tc, test_lines_about_bad_connections_are_rate_limited);
    return s;
}

int
main(void)
{
    SRunner *sr = srunner_create(limits_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
