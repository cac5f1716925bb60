/*
 * check_grace.c: the disconnect grace and session resume (PROTOCOL.md,
 * "Sessions"), against a real protoqd on loopback whose conf sets
 * disconnect_grace_ms 1500.
 *
 * A consumer names a session in Hello (protoq_opts.session_id). When its
 * connection goes, the broker keeps what it holds for the grace; the same
 * session reconnecting within it takes the deliveries over (same tokens,
 * same attempt). Past the grace they are failed attempts as at any
 * disconnect. `protoq work` uses a session, so a running job survives a
 * cut connection: the test puts a TCP proxy (testutil.h's proxy_start)
 * between work and the broker and kills it. Every wait is bounded.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "testutil.h"

enum { GRACE_MS = 1500, HELD_MAX = 8 };

static struct srv g_srv;
static struct test_conf g_conf;
static const char *const g_args[] = {"-c", g_conf.path, NULL};

static const char CONF_TEXT[] = "# check_grace\n"
                                "disconnect_grace_ms 1500\n"
                                "backoff_base_ms 10\n"
                                "backoff_cap_ms 40\n"
                                "heartbeat_ms 1000\n"
                                "heartbeat_timeout_ms 5000\n"
                                "metrics 127.0.0.1:0\n";

static void
sleep_ms(int ms)
{
    poll(NULL, 0, ms);
}

static void
setup(void)
{
    ck_assert_msg(srv_start(&g_srv, g_args) == 0, "protoqd did not start");
}

/* A clean stop must exit 0: sessions still kept at shutdown are given
 * back, and an ASan build's leak report would make it fail. */
static void
teardown(void)
{
    int rc = srv_stop(&g_srv);
    char log[4096] = "";

    if (rc != 0) {
        char path[320];

        srv_log_path(&g_srv, path, sizeof(path));
        file_slurp(path, log, sizeof(log));
    }
    srv_cleanup(&g_srv);
    ck_assert_msg(rc == 0, "protoqd exited %d: %s", rc, log);
}

/* ---- a consumer that keeps the tokens it was given ---- */

struct held {
    protoq_client *c;
    uint64_t sub;
    size_t n;
    uint64_t id[HELD_MAX];
    uint32_t attempt[HELD_MAX];
    unsigned n_cancel;
    uint64_t cancel_id;
};

static void
on_deliver(void *arg, protoq_client *c, const struct protoq_delivery *d)
{
    struct held *h = arg;

    (void)c;
    if (h->n < HELD_MAX) {
        h->id[h->n] = d->message_id;
        h->attempt[h->n] = d->attempt;
        h->n++;
    }
}

static void
on_cancel(void *arg, protoq_client *c, const char *queue, uint64_t message_id,
          uint32_t attempt)
{
    struct held *h = arg;

    (void)c;
    (void)queue;
    (void)attempt;
    h->n_cancel++;
    h->cancel_id = message_id;
}

/* Connect to the broker as session sid (NULL: none) with token tok. */
static int
connect_as(const char *sid, const char *tok, protoq_client **out)
{
    struct protoq_opts o;

    memset(&o, 0, sizeof(o));
    o.session_id = sid;
    o.auth_token = tok;
    o.connect_timeout_ms = 3000;
    return protoq_connect(g_srv.addr, &o, out);
}

static protoq_client *
connect_ok(const char *sid, const char *tok)
{
    protoq_client *c = NULL;
    int rc = connect_as(sid, tok, &c);

    ck_assert_msg(rc == PQ_OK, "connect as %s: %s", sid ? sid : "-",
                  protoq_errmsg(c));
    return c;
}

/* Pump h's handle until it holds want deliveries (up to ms). */
static void
hold(struct held *h, size_t want, int ms)
{
    int64_t until = now_ms_mono() + ms;

    while (h->n < want && now_ms_mono() < until) {
        ck_assert_int_ge(protoq_poll(h->c, 50), 0);
    }
    ck_assert_msg(h->n == want, "held %zu deliveries, want %zu", h->n, want);
}

/* Subscribe a session's handle to q and wait for want deliveries. */
static void
take(struct held *h, const char *q, uint32_t prefetch, size_t want)
{
    protoq_set_cancel_cb(h->c, on_cancel, h);
    pq_check_ok(h->c, protoq_subscribe(h->c, q, prefetch, NULL, 0, on_deliver,
                                       h, &h->sub));
    hold(h, want, 3000);
}

static void
mkq(protoq_client *c, const char *name, uint32_t max_attempts,
    uint64_t ack_timeout_ms)
{
    struct protoq_queue_attrs a;

    memset(&a, 0, sizeof(a));
    a.max_attempts = max_attempts;
    a.ack_timeout_ms = ack_timeout_ms;
    a.backoff_base_ms = 10;
    a.backoff_cap_ms = 40;
    pq_check_ok(c, protoq_queue_create(c, name, &a));
}

static void
pub_n(protoq_client *c, const char *q, int n)
{
    for (int i = 0; i < n; i++) {
        struct protoq_message m;

        memset(&m, 0, sizeof(m));
        m.payload = "job";
        m.len = 3;
        pq_check_ok(c, protoq_publish(c, q, &m, NULL));
    }
}

static struct protoq_queue_info
qstat(protoq_client *c, const char *q)
{
    struct protoq_queue_info i;

    pq_check_ok(c, protoq_queue_stat(c, q, &i));
    return i;
}

/* The value of metric name (a scalar) on the broker's /metrics, or -1. */
static long
metric(const char *name)
{
    static const char get[] = "GET /metrics HTTP/1.0\r\n\r\n";
    char path[320], buf[65536], key[128];
    const char *p;
    size_t n = 0;
    long port = -1;
    int fd;

    snprintf(path, sizeof(path), "%s/port", g_srv.dir);
    p = strstr(file_slurp(path, buf, sizeof(buf)), "metrics ");
    if (p != NULL) {
        port = strtol(p + 8, NULL, 10);
    }
    ck_assert_int_gt(port, 0);
    fd = raw_connect((uint16_t)port);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(raw_send(fd, get, sizeof(get) - 1), 0);
    for (;;) {
        ssize_t r = read(fd, buf + n, sizeof(buf) - 1 - n);

        if (r <= 0) {
            break;
        }
        n += (size_t)r;
    }
    close(fd);
    buf[n] = '\0';
    snprintf(key, sizeof(key), "\n%s ", name);
    p = strstr(buf, key);
    return p != NULL ? strtol(p + strlen(key), NULL, 10) : -1;
}

/* ---- libprotoq sessions ---- */

START_TEST(test_resume_keeps_deliveries)
{
    protoq_client *adm = connect_ok(NULL, NULL);
    struct protoq_server_info si;
    struct protoq_queue_info qi;
    struct held a = {0}, b = {0};
    struct protoq_job job;

    mkq(adm, "train", 5, 30000);
    pub_n(adm, "train", 3);
    a.c = connect_ok("worker-7-session", NULL);
    protoq_server_info(a.c, &si);
    ck_assert(!si.session_resumed); /* a new session */
    ck_assert_uint_eq(si.disconnect_grace_ms, GRACE_MS);
    take(&a, "train", 3, 3);
    protoq_close(a.c); /* the network blip */
    sleep_ms(200);
    /* Kept for the session: still in flight, nothing redelivered. */
    qi = qstat(adm, "train");
    ck_assert_uint_eq(qi.inflight, 3);
    ck_assert_uint_eq(qi.ready, 0);
    ck_assert_int_eq(metric("protoq_sessions_disconnected"), 1);
    b.c = connect_ok("worker-7-session", NULL);
    protoq_server_info(b.c, &si);
    ck_assert(si.session_resumed);
    ck_assert_int_eq(metric("protoq_sessions_disconnected"), 0);
    ck_assert_int_eq(metric("protoq_sessions_resumed_total"), 1);
    pq_check_ok(b.c, protoq_job_get(b.c, "train", a.id[0], &job));
    ck_assert_uint_eq(job.attempt, 1);
    protoq_job_fini(&job);
    for (size_t i = 0; i < 3; i++) {
        ck_assert_uint_eq(a.attempt[i], 1);
        pq_check_ok(b.c, protoq_ack_sync(b.c, a.id[i], a.attempt[i]));
    }
    qi = qstat(adm, "train");
    ck_assert_uint_eq(qi.acked, 3);
    ck_assert_uint_eq(qi.redelivered, 0);
    ck_assert_uint_eq(qi.inflight + qi.ready + qi.delayed, 0);
    protoq_close(b.c);
    /* One left in its grace when the broker stops (the teardown checks
     * the clean stop). */
    pub_n(adm, "train", 1);
    a.n = 0;
    a.c = connect_ok("left-at-shutdown", NULL);
    take(&a, "train", 1, 1);
    protoq_close(a.c);
    protoq_close(adm);
}
END_TEST

/* A reconnecting handle (protoq_opts.reconnect) with a session: a cut
 * connection is made again by the library, the session resumes, and the
 * delivery the callback had is still the caller's under its old token. */
START_TEST(test_reconnecting_handle_resumes_its_session)
{
    protoq_client *adm = connect_ok(NULL, NULL);
    struct protoq_server_info si;
    struct protoq_queue_info qi;
    struct protoq_opts o;
    struct held a = {0};
    int64_t until;

    mkq(adm, "train", 1, 30000);
    pub_n(adm, "train", 1);
    memset(&o, 0, sizeof(o));
    o.session_id = "reconnecting-worker";
    o.session_fresh = true; /* the first connection only */
    o.reconnect = true;
    o.reconnect_min_ms = 20;
    o.reconnect_max_ms = 100;
    o.connect_timeout_ms = 3000;
    ck_assert_int_eq(protoq_connect(g_srv.addr, &o, &a.c), PQ_OK);
    take(&a, "train", 1, 1);
    /* The network blip: the socket goes, the handle stays. */
    ck_assert_int_eq(shutdown(protoq_fd(a.c), SHUT_RDWR), 0);
    until = now_ms_mono() + 5000;
    while (protoq_reconnects(a.c) == 0 && now_ms_mono() < until) {
        ck_assert_int_ge(protoq_poll(a.c, 50), 0);
    }
    ck_assert_uint_eq(protoq_reconnects(a.c), 1);
    protoq_server_info(a.c, &si);
    ck_assert_msg(si.session_resumed, "the reconnect did not resume");
    pq_check_ok(a.c, protoq_ack_sync(a.c, a.id[0], a.attempt[0]));
    qi = qstat(adm, "train");
    ck_assert_uint_eq(qi.acked, 1);
    ck_assert_uint_eq(qi.redelivered, 0);
    ck_assert_uint_eq(qi.dead_lettered, 0);
    protoq_close(a.c);
    protoq_close(adm);
}
END_TEST

START_TEST(test_past_grace_failed_attempts)
{
    protoq_client *adm = connect_ok(NULL, NULL);
    struct protoq_server_info si;
    struct protoq_queue_info qi;
    struct held a = {0}, b = {0}, o = {0};

    mkq(adm, "train", 5, 30000);
    pub_n(adm, "train", 3);
    a.c = connect_ok("late-session", NULL);
    take(&a, "train", 3, 3);
    protoq_close(a.c);
    sleep_ms(GRACE_MS + 700);
    /* The grace is over: three failed attempts, back in the queue. */
    qi = qstat(adm, "train");
    ck_assert_uint_eq(qi.inflight, 0);
    ck_assert_uint_eq(qi.ready + qi.delayed, 3);
    ck_assert_int_eq(metric("protoq_sessions_expired_total"), 1);
    /* Too late to resume: nothing was kept, the old tokens are stale. */
    b.c = connect_ok("late-session", NULL);
    protoq_server_info(b.c, &si);
    ck_assert(!si.session_resumed);
    pq_check_remote(b.c, protoq_ack_sync(b.c, a.id[0], a.attempt[0]),
                    PROTOQ_CODE_STALE_DELIVERY);
    o.c = connect_ok(NULL, NULL);
    take(&o, "train", 3, 3);
    for (size_t i = 0; i < 3; i++) {
        ck_assert_uint_eq(o.attempt[i], 2);
    }
    protoq_close(o.c);
    protoq_close(b.c);
    protoq_close(adm);
}
END_TEST

START_TEST(test_lease_expiring_in_grace_requeues)
{
    protoq_client *adm = connect_ok(NULL, NULL);
    struct protoq_server_info si;
    struct held a = {0}, b = {0}, o = {0};
    int64_t t0;

    mkq(adm, "train", 5, 400); /* a lease shorter than the grace */
    pub_n(adm, "train", 1);
    a.c = connect_ok("short-lease", NULL);
    take(&a, "train", 1, 1);
    protoq_close(a.c);
    t0 = now_ms_mono();
    o.c = connect_ok(NULL, NULL);
    take(&o, "train", 1, 1); /* the lease ran out: redelivered */
    ck_assert_int_lt(now_ms_mono() - t0, GRACE_MS);
    ck_assert_uint_eq(o.id[0], a.id[0]);
    ck_assert_uint_eq(o.attempt[0], 2);
    /* The session comes back within the grace, but the job is not its any
     * more. */
    b.c = connect_ok("short-lease", NULL);
    protoq_server_info(b.c, &si);
    ck_assert(si.session_resumed);
    pq_check_remote(b.c,
                    protoq_touch(b.c, a.id[0], a.attempt[0], 0, NULL, NULL),
                    PROTOQ_CODE_STALE_DELIVERY);
    pq_check_ok(o.c, protoq_ack_sync(o.c, o.id[0], o.attempt[0]));
    protoq_close(o.c);
    protoq_close(b.c);
    protoq_close(adm);
}
END_TEST

START_TEST(test_cancel_in_gap_reaches_resumed_session)
{
    protoq_client *adm = connect_ok(NULL, NULL);
    struct protoq_queue_info qi;
    struct held a = {0}, b = {0};
    int64_t until;

    mkq(adm, "train", 5, 30000);
    pub_n(adm, "train", 2);
    a.c = connect_ok("cancel-session", NULL);
    take(&a, "train", 2, 2);
    protoq_close(a.c);
    pq_check_ok(adm, protoq_cancel(adm, "train", a.id[1]));
    b.c = connect_ok("cancel-session", NULL);
    protoq_set_cancel_cb(b.c, on_cancel, &b);
    until = now_ms_mono() + 3000;
    while (b.n_cancel == 0 && now_ms_mono() < until) {
        ck_assert_int_ge(protoq_poll(b.c, 50), 0);
    }
    ck_assert_uint_eq(b.n_cancel, 1);
    ck_assert_uint_eq(b.cancel_id, a.id[1]);
    /* The cancelled one is fenced; the other is still ours. */
    pq_check_remote(b.c, protoq_ack_sync(b.c, a.id[1], a.attempt[1]),
                    PROTOQ_CODE_STALE_DELIVERY);
    pq_check_ok(b.c, protoq_ack_sync(b.c, a.id[0], a.attempt[0]));
    qi = qstat(adm, "train");
    ck_assert_uint_eq(qi.inflight + qi.ready + qi.delayed, 0);
    ck_assert_uint_eq(qi.acked, 1);
    protoq_close(b.c);
    protoq_close(adm);
}
END_TEST

START_TEST(test_second_connection_takes_over)
{
    protoq_client *adm = connect_ok(NULL, NULL);
    struct protoq_server_info si;
    struct held a = {0}, b = {0};
    int64_t until;
    int rc = 0;

    mkq(adm, "train", 5, 30000);
    pub_n(adm, "train", 1);
    a.c = connect_ok("half-open", NULL);
    take(&a, "train", 1, 1);
    /* The old connection looks alive to the broker (a half-open TCP after
     * a switch reboot): the new one takes the session over. */
    b.c = connect_ok("half-open", NULL);
    protoq_server_info(b.c, &si);
    ck_assert(si.session_resumed);
    pq_check_ok(b.c, protoq_touch(b.c, a.id[0], a.attempt[0], 0, NULL, NULL));
    until = now_ms_mono() + 3000;
    while (rc >= 0 && now_ms_mono() < until) {
        rc = protoq_poll(a.c, 50);
    }
    ck_assert_msg(rc < 0, "the old connection was not closed");
    pq_check_ok(b.c, protoq_ack_sync(b.c, a.id[0], a.attempt[0]));
    ck_assert_uint_eq(qstat(adm, "train").redelivered, 0);
    protoq_close(a.c);
    protoq_close(b.c);
    protoq_close(adm);
}
END_TEST

START_TEST(test_fresh_session_ends_the_old_one)
{
    protoq_client *adm = connect_ok(NULL, NULL);
    struct protoq_queue_info qi;
    struct protoq_opts o;
    protoq_client *c = NULL;
    struct held a = {0};

    mkq(adm, "train", 5, 30000);
    pub_n(adm, "train", 1);
    a.c = connect_ok("restarted", NULL);
    take(&a, "train", 1, 1);
    protoq_close(a.c);
    sleep_ms(100);
    /* A worker that starts afresh under the same name asks for no resume:
     * what the old one held goes back at once as a failed attempt. */
    memset(&o, 0, sizeof(o));
    o.session_id = "restarted";
    o.session_fresh = true;
    pq_check_ok(c, protoq_connect(g_srv.addr, &o, &c));
    qi = qstat(adm, "train");
    ck_assert_uint_eq(qi.inflight, 0);
    ck_assert_uint_eq(qi.ready + qi.delayed, 1);
    protoq_close(c);
    protoq_close(adm);
}
END_TEST

START_TEST(test_bad_session_ids_refused)
{
    static const char *const bad[] = {
        "0123456789012345678901234567890123456789012345678901234567890123"
        "4", /* 65 bytes */
        "tab\there",
    };

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        Protoq__Frame f = PROTOQ__FRAME__INIT, *r = NULL;
        Protoq__Hello h = PROTOQ__HELLO__INIT;
        int fd = raw_connect(g_srv.port);
        uint8_t *buf;
        size_t len;

        ck_assert_int_ge(fd, 0);
        h.protocol_version = PROTOQ_PROTOCOL_VERSION;
        h.session_id = (char *)bad[i];
        h.session_resume = true;
        f.request_id = 1;
        f.kind_case = PROTOQ__FRAME__KIND_HELLO;
        f.hello = &h;
        buf = raw_pack(&f, &len);
        ck_assert_ptr_nonnull(buf);
        ck_assert_int_eq(raw_send(fd, buf, len), 0);
        free(buf);
        ck_assert_int_eq(raw_read_frame(fd, 3000, 1u << 20, &r), 0);
        ck_assert_int_eq(r->kind_case, PROTOQ__FRAME__KIND_ERROR);
        ck_assert_int_eq(r->error->code, PROTOQ__ERROR_CODE__BAD_REQUEST);
        frame_free(r);
        ck_assert(raw_wait_eof(fd, 3000));
        close(fd);
    }
    /* The library refuses them before sending. */
    {
        protoq_client *c = NULL;

        ck_assert_int_eq(connect_as(bad[1], NULL, &c), PQ_EINVAL);
        protoq_close(c);
    }
}
END_TEST

START_TEST(test_kept_session_resumes_after_grace_reload_to_zero)
{
    protoq_client *adm = connect_ok(NULL, NULL);
    struct protoq_server_info si;
    struct held a = {0}, b = {0};
    FILE *f;

    mkq(adm, "train", 5, 30000);
    pub_n(adm, "train", 1);
    a.c = connect_ok("reloaded", NULL);
    take(&a, "train", 1, 1);
    protoq_close(a.c);
    sleep_ms(100);
    /* SIGHUP with the grace off: new disconnects keep nothing, but what
     * was kept stays resumable until its own grace ends. */
    f = fopen(g_conf.path, "w");
    ck_assert_ptr_nonnull(f);
    fputs("disconnect_grace_ms 0\n", f);
    fclose(f);
    kill(g_srv.pid, SIGHUP);
    sleep_ms(300);
    f = fopen(g_conf.path, "w");
    ck_assert_ptr_nonnull(f);
    fputs(CONF_TEXT, f);
    fclose(f);
    b.c = connect_ok("reloaded", NULL);
    protoq_server_info(b.c, &si);
    ck_assert_uint_eq(si.disconnect_grace_ms, 0);
    ck_assert(si.session_resumed);
    pq_check_ok(b.c, protoq_ack_sync(b.c, a.id[0], a.attempt[0]));
    protoq_close(b.c);
    protoq_close(adm);
}
END_TEST

/* ---- tests with a broker of their own ---- */

static struct test_conf g_own;
static const char *const g_own_args[] = {"-c", g_own.path, NULL};

/* A conf of CONF_TEXT and a printf of fmt in a dir of its own (g_own);
 * the test removes it at its end. An argument may be g_own.dir: it is
 * filled before fmt is printed. */
__attribute__((format(printf, 1, 2))) static void
own_conf(const char *fmt, ...)
{
    char text[1024], more[512];
    va_list ap;
    FILE *f;

    ck_assert_int_eq(test_conf_write(&g_own, "\n"), 0);
    va_start(ap, fmt);
    vsnprintf(more, sizeof(more), fmt, ap);
    va_end(ap);
    snprintf(text, sizeof(text), "%s%s", CONF_TEXT, more);
    f = fopen(g_own.path, "w");
    ck_assert_ptr_nonnull(f);
    fputs(text, f);
    fclose(f);
}

/* Replace the fixture's broker with one on g_own's conf (the teardown
 * stops it). */
static void
own_start(void)
{
    srv_cleanup(&g_srv);
    ck_assert_int_eq(srv_start(&g_srv, g_own_args), 0);
}

/* ---- authentication: a session belongs to its token ---- */

/* The tokens "example-gpu" (consume:train.*) and "example-ops" (admin),
 * hashed as in conf/protoqd.conf. */
static const char AUTH_TEXT[] =
    "gpu-01 cc3bfcf828a82f9081767ea028e30df7615a1a18c6ddc146ce3e9fcac43b2239 "
    "consume:train.*\n"
    "ops dfed54d6bde240ccd42accdd50559e1e91572fdda4f892b749002ece7b352030 "
    "admin\n";

START_TEST(test_auth_other_token_cannot_claim)
{
    protoq_client *adm, *x = NULL;
    struct held a = {0}, b = {0};
    char auth[160];
    FILE *f;

    own_conf("auth_file %s/tokens\n", g_own.dir);
    snprintf(auth, sizeof(auth), "%s/tokens", g_own.dir);
    f = fopen(auth, "w");
    ck_assert_ptr_nonnull(f);
    fputs(AUTH_TEXT, f);
    fclose(f);
    own_start();
    adm = connect_ok(NULL, "example-ops");
    mkq(adm, "train.a", 5, 30000);
    pub_n(adm, "train.a", 1);
    a.c = connect_ok("gpu-session", "example-gpu");
    take(&a, "train.a", 1, 1);
    protoq_close(a.c);
    /* Another token (even an admin) cannot claim the session. */
    ck_assert_int_eq(connect_as("gpu-session", "example-ops", &x), PQ_EREMOTE);
    ck_assert_int_eq(protoq_last_error_code(x), PROTOQ_CODE_FORBIDDEN);
    protoq_close(x);
    /* Its owner still can, and the job is still in flight for it. */
    b.c = connect_ok("gpu-session", "example-gpu");
    pq_check_ok(b.c, protoq_ack_sync(b.c, a.id[0], a.attempt[0]));
    ck_assert_uint_eq(qstat(adm, "train.a").acked, 1);
    protoq_close(b.c);
    protoq_close(adm);
    unlink(auth);
    test_conf_remove(&g_own);
}
END_TEST

START_TEST(test_max_held_sessions_bounds_the_gap)
{
    protoq_client *adm;
    struct protoq_queue_info qi;
    struct held a = {0}, b = {0};

    own_conf("max_held_sessions 1\n");
    own_start();
    adm = connect_ok(NULL, NULL);
    mkq(adm, "train", 5, 30000);
    pub_n(adm, "train", 2);
    a.c = connect_ok("first", NULL);
    take(&a, "train", 1, 1);
    b.c = connect_ok("second", NULL);
    take(&b, "train", 1, 1);
    protoq_close(a.c);
    sleep_ms(200);
    /* The one place is taken: the second disconnect keeps nothing, its
     * job is a failed attempt at once. */
    protoq_close(b.c);
    sleep_ms(300);
    qi = qstat(adm, "train");
    ck_assert_uint_eq(qi.inflight, 1);
    ck_assert_uint_eq(qi.ready + qi.delayed, 1);
    ck_assert_int_eq(metric("protoq_sessions_disconnected"), 1);
    ck_assert(srv_log_has(&g_srv, "max_held_sessions"));
    protoq_close(adm);
    test_conf_remove(&g_own);
}
END_TEST

/* ---- protoq work across a cut connection ---- */

static const char *
protoq_bin(void)
{
    const char *bin = getenv("PROTOQ");

    return bin != NULL && bin[0] != '\0' ? bin : "build/protoq";
}

/* Wait up to ms for DIR/name to contain needle. */
static bool
file_has(const char *name, const char *needle, int ms)
{
    char path[320], buf[8192];
    int64_t until = now_ms_mono() + ms;

    snprintf(path, sizeof(path), "%s/%s", g_srv.dir, name);
    do {
        if (strstr(file_slurp(path, buf, sizeof(buf)), needle) != NULL) {
            return true;
        }
        sleep_ms(20);
    } while (now_ms_mono() < until);
    return false;
}

/* `protoq work` through a proxy on port, running job.sh (which records
 * each run, then sleeps `secs`); its pid. */
static pid_t
work_start(uint16_t port, const char *secs)
{
    char cmd[1200], path[320];
    pid_t pid;
    FILE *f;

    snprintf(path, sizeof(path), "%s/job.sh", g_srv.dir);
    f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fprintf(f,
            "#!/bin/sh\necho \"run $PROTOQ_ATTEMPT\" >> %s/runs\n"
            "sleep %s\necho done >> %s/runs\n",
            g_srv.dir, secs, g_srv.dir);
    fclose(f);
    chmod(path, 0755);
    snprintf(cmd, sizeof(cmd),
             "cd %s && exec %s -s 127.0.0.1:%u work jobs --kill-grace 1s "
             "-- ./job.sh 2>>%s/work.err",
             g_srv.dir, protoq_bin(), port, g_srv.dir);
    pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    return pid;
}

static void
work_stop(pid_t pid)
{
    int64_t until = now_ms_mono() + 5000;

    kill(pid, SIGTERM);
    while (waitpid(pid, NULL, WNOHANG) == 0 && now_ms_mono() < until) {
        sleep_ms(20);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
}

/* A queue where one failed attempt dead-letters the job. */
static protoq_client *
strict_queue(void)
{
    protoq_client *adm = connect_ok(NULL, NULL);
    struct protoq_queue_attrs a;

    pq_check_ok(adm, protoq_queue_create(adm, "dlq", NULL));
    memset(&a, 0, sizeof(a));
    a.max_attempts = 1;
    snprintf(a.dead_letter, sizeof(a.dead_letter), "dlq");
    pq_check_ok(adm, protoq_queue_create(adm, "jobs", &a));
    pub_n(adm, "jobs", 1);
    return adm;
}

/* The job ran once and was acked by the resumed session: never
 * redelivered, never failed. */
static void
check_done_once(protoq_client *adm)
{
    char path[320], runs[256];

    for (int i = 0; i < 100 && qstat(adm, "jobs").acked == 0; i++) {
        sleep_ms(50);
    }
    ck_assert_uint_eq(qstat(adm, "jobs").acked, 1);
    ck_assert_uint_eq(qstat(adm, "jobs").redelivered, 0);
    ck_assert_uint_eq(qstat(adm, "dlq").ready, 0);
    snprintf(path, sizeof(path), "%s/runs", g_srv.dir);
    ck_assert_str_eq(file_slurp(path, runs, sizeof(runs)), "run 1\ndone\n");
}

START_TEST(test_work_keeps_job_across_cut)
{
    protoq_client *adm = strict_queue();
    struct proxy px;
    pid_t w;

    proxy_start(&px, 0, g_srv.port);
    w = work_start(px.port, "2");
    ck_assert(file_has("runs", "run 1", 5000));
    proxy_kill(&px); /* the switch reboots */
    sleep_ms(300);
    proxy_start(&px, px.port, g_srv.port);
    ck_assert(file_has("runs", "done", 6000));
    ck_assert(file_has("work.err", "resumed", 3000));
    check_done_once(adm);
    work_stop(w);
    proxy_kill(&px);
    protoq_close(adm);
}
END_TEST

/* A cut that closes nothing (a partition, a NAT that forgot the flow):
 * work hears of it only by the broker's silence (3 heartbeats + 1 s: 4 s
 * here), within the grace (the broker itself waits heartbeat_timeout_ms,
 * 5 s, then the grace, 1.5 s), and resumes its session on a new
 * connection: the job runs once and its ack is taken. */
START_TEST(test_work_resumes_after_silent_cut)
{
    protoq_client *adm = strict_queue();
    struct proxy px;
    pid_t w;

    proxy_start(&px, 0, g_srv.port);
    w = work_start(px.port, "5");
    ck_assert(file_has("runs", "run 1", 5000));
    proxy_freeze(&px); /* new connections still go through */
    ck_assert(file_has("work.err", "no frame from the broker", 6000));
    ck_assert(file_has("work.err", "resumed", 3000));
    ck_assert(file_has("runs", "done", 6000));
    check_done_once(adm);
    work_stop(w);
    proxy_kill(&px);
    protoq_close(adm);
}
END_TEST

START_TEST(test_work_stops_job_past_grace)
{
    protoq_client *adm = strict_queue();
    struct proxy px;
    pid_t w;

    proxy_start(&px, 0, g_srv.port);
    w = work_start(px.port, "30");
    ck_assert(file_has("runs", "run 1", 5000));
    proxy_kill(&px);
    /* Past the grace the broker fails the attempt (dead-lettered here:
     * max_attempts 1), and work stops the job on its own. */
    ck_assert(file_has("work.err", "stopping it", GRACE_MS + 3000));
    for (int i = 0; i < 100 && qstat(adm, "dlq").ready == 0; i++) {
        sleep_ms(50);
    }
    ck_assert_uint_eq(qstat(adm, "dlq").ready, 1);
    work_stop(w);
    protoq_close(adm);
}
END_TEST

int
main(void)
{
    Suite *s = suite_create("grace");
    TCase *tc = tcase_create("sessions");
    TCase *tw = tcase_create("work");
    SRunner *sr;
    int failed;

    if (test_conf_write(&g_conf, CONF_TEXT) != 0) {
        return EXIT_FAILURE;
    }
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, test_resume_keeps_deliveries);
    tcase_add_test(tc, test_reconnecting_handle_resumes_its_session);
    tcase_add_test(tc, test_past_grace_failed_attempts);
    tcase_add_test(tc, test_lease_expiring_in_grace_requeues);
    tcase_add_test(tc, test_cancel_in_gap_reaches_resumed_session);
    tcase_add_test(tc, test_second_connection_takes_over);
    tcase_add_test(tc, test_fresh_session_ends_the_old_one);
    tcase_add_test(tc, test_bad_session_ids_refused);
    tcase_add_test(tc, test_kept_session_resumes_after_grace_reload_to_zero);
    tcase_add_test(tc, test_auth_other_token_cannot_claim);
    tcase_add_test(tc, test_max_held_sessions_bounds_the_gap);
    suite_add_tcase(s, tc);
    tcase_add_checked_fixture(tw, setup, teardown);
    tcase_set_timeout(tw, 40);
    tcase_add_test(tw, test_work_keeps_job_across_cut);
    tcase_add_test(tw, test_work_stops_job_past_grace);
    tcase_add_test(tw, test_work_resumes_after_silent_cut);
    suite_add_tcase(s, tw);
    sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    test_conf_remove(&g_conf);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
