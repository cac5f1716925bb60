/*
 * check_server.c: integration tests of protoqd's core against a real broker
 * on 127.0.0.1 (tests/testutil.h): handshake, queue administration, the
 * publish/consume walk-through through libprotoq and the protoq CLI, batches,
 * sharing and credit, redelivery, stale tokens, priority, request errors,
 * hostile input on raw sockets, durability across restarts and kill -9, and
 * SIGTERM.
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

enum {
    DEFAULT_MAX_FRAME = 4 * 1024 * 1024,
    DEFAULT_MAX_MESSAGE = 1024 * 1024,
    DEFAULT_MAX_BATCH = 10000,
    DEFAULT_HEARTBEAT_MS = 5000,
    MAX_HELLO_BYTES = 4096,
    RAW_TIMEOUT_MS = 3000,
};

static struct srv g_srv;
static int g_health_seq;

static void
setup_server(void)
{
    signal(SIGPIPE, SIG_IGN);
    if (srv_start(&g_srv, NULL) != 0) {
        srv_cleanup(&g_srv);
        ck_abort_msg("could not start protoqd");
    }
}

/*
 * Stop the broker if it still runs and check that it went cleanly: exit 0
 * on SIGTERM, and no sanitizer report in its log (SAN=1 builds). Removes
 * the test's dir either way.
 */
static void
stop_and_check_broker(void)
{
    char path[320];
    char line[512];
    char bad[512] = "";
    int rc = 0;
    FILE *f;

    if (g_srv.pid > 0) {
        rc = srv_stop(&g_srv);
    }
    srv_log_path(&g_srv, path, sizeof(path));
    f = fopen(path, "r");
    if (f != NULL) {
        while (fgets(line, sizeof(line), f) != NULL) {
            if (strstr(line, "Sanitizer") != NULL ||
                strstr(line, "runtime error:") != NULL) {
                snprintf(bad, sizeof(bad), "%s", line);
                break;
            }
        }
        fclose(f);
    }
    srv_cleanup(&g_srv);
    ck_assert_msg(rc == 0, "protoqd exited %d on SIGTERM", rc);
    ck_assert_msg(bad[0] == '\0', "protoqd log: %s", bad);
}

static void
teardown_server(void)
{
    if (g_srv.dir[0] != '\0') {
        stop_and_check_broker();
    }
    srv_cleanup(&g_srv);
}

/*
 * A queue's backoff_base_ms of 0 means "the broker default", so a broker
 * whose default is 0 (retry at once) needs a config file. Requeued messages
 * are then ready again immediately, which makes redelivery order exact.
 */
static char g_conf[64];
static const char *g_retry_args[3];

static void
start_with_conf(const char *text)
{
    size_t len = strlen(text);
    int fd;

    signal(SIGPIPE, SIG_IGN);
    snprintf(g_conf, sizeof(g_conf), "/tmp/protoq-check-conf.XXXXXX");
    fd = mkstemp(g_conf);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, text, len), (ssize_t)len);
    close(fd);
    g_retry_args[0] = "-c";
    g_retry_args[1] = g_conf;
    g_retry_args[2] = NULL;
    if (srv_start(&g_srv, g_retry_args) != 0) {
        srv_cleanup(&g_srv);
        unlink(g_conf);
        ck_abort_msg("could not start protoqd -c %s", g_conf);
    }
}

static void
setup_server_fast_retry(void)
{
    start_with_conf("backoff_base_ms 0\n");
}

/* Short liveness limits, to see them enforced within a test. */
static void
setup_server_short_timeouts(void)
{
    start_with_conf("idle_timeout_ms 300\n"
                    "heartbeat_ms 100\n"
                    "heartbeat_timeout_ms 500\n");
}

static void
teardown_server_conf(void)
{
    if (g_conf[0] != '\0') {
        unlink(g_conf);
        g_conf[0] = '\0';
    }
    teardown_server();
}

static void
sleep_ms(int ms)
{
    struct timespec ts = {.tv_sec = ms / 1000,
                          .tv_nsec = (long)(ms % 1000) * 1000000L};

    nanosleep(&ts, NULL);
}

/* ------------------------------------------------- delivery collection */

struct got {
    uint64_t id;
    uint64_t sub;
    uint32_t attempt;
    uint32_t priority;
    size_t len;
    char payload[48]; /* NUL-terminated copy, truncated */
};

struct coll {
    struct got *v;
    size_t n;
    size_t cap;
    size_t overflow; /* deliveries past cap */
    bool ack;        /* ack every delivery as it arrives */
    int ack_err;     /* first protoq_ack failure */
};

static void
coll_init(struct coll *k, size_t cap, bool ack)
{
    memset(k, 0, sizeof(*k));
    k->v = calloc(cap, sizeof(*k->v));
    ck_assert_ptr_nonnull(k->v);
    k->cap = cap;
    k->ack = ack;
}

static void
coll_free(struct coll *k)
{
    free(k->v);
    k->v = NULL;
}

static void
on_collect(void *arg, protoq_client *c, const struct protoq_delivery *d)
{
    struct coll *k = arg;

    if (k->n < k->cap) {
        struct got *g = &k->v[k->n];
        size_t n =
            d->len < sizeof(g->payload) - 1 ? d->len : sizeof(g->payload) - 1;

        g->id = d->message_id;
        g->sub = d->subscription_id;
        g->attempt = d->attempt;
        g->priority = d->priority;
        g->len = d->len;
        memcpy(g->payload, d->payload, n);
        g->payload[n] = '\0';
        k->n++;
    } else {
        k->overflow++;
    }
    if (k->ack) {
        int rc = protoq_ack(c, d->message_id, d->attempt);

        if (rc != PQ_OK && k->ack_err == 0) {
            k->ack_err = rc;
        }
    }
}

/* Poll c until k holds want deliveries or timeout_ms passes; returns k->n. */
static size_t
poll_until(protoq_client *c, struct coll *k, size_t want, int timeout_ms)
{
    int64_t deadline = now_ms_mono() + timeout_ms;

    while (k->n + k->overflow < want) {
        int64_t left = deadline - now_ms_mono();
        int rc;

        if (left <= 0) {
            break;
        }
        rc = protoq_poll(c, left > 100 ? 100 : (int)left);
        ck_assert_msg(rc >= 0, "protoq_poll: %s: %s", pq_strerror(rc),
                      protoq_errmsg(c));
    }
    return k->n;
}

/* Keep polling c for ms milliseconds (to see that nothing more comes). */
static void
poll_for(protoq_client *c, int ms)
{
    int64_t deadline = now_ms_mono() + ms;

    for (;;) {
        int64_t left = deadline - now_ms_mono();
        int rc;

        if (left <= 0) {
            return;
        }
        rc = protoq_poll(c, (int)left);
        ck_assert_msg(rc >= 0, "protoq_poll: %s: %s", pq_strerror(rc),
                      protoq_errmsg(c));
    }
}

/* ------------------------------------------------------ publishing */

static void
pub_str(protoq_client *c, const char *q, const char *s, uint32_t prio,
        uint64_t *id)
{
    struct protoq_message m;

    memset(&m, 0, sizeof(m));
    m.payload = s;
    m.len = strlen(s);
    m.priority = prio;
    pq_check_ok(c, protoq_publish(c, q, &m, id));
}

/* One async publish's outcome. */
struct pubrec {
    uint64_t id;
    int err;  /* 1 while pending, then PQ_OK or a PQ_* code */
    int code; /* wire code when err is PQ_EREMOTE */
    struct pubset *set;
};

struct pubset {
    protoq_client *c;
    struct pubrec *r;
    size_t n;
    size_t ok;
    size_t failed;
};

static void
on_confirm(void *arg, int err, uint64_t id, bool dup)
{
    struct pubrec *r = arg;

    (void)dup;
    r->err = err;
    r->id = id;
    if (err == PQ_EREMOTE) {
        r->code = protoq_last_error_code(r->set->c);
    }
    if (err == PQ_OK) {
        r->set->ok++;
    } else {
        r->set->failed++;
    }
}

static void
pubset_init(struct pubset *ps, protoq_client *c, size_t n)
{
    memset(ps, 0, sizeof(*ps));
    ps->c = c;
    ps->n = n;
    ps->r = calloc(n, sizeof(*ps->r));
    ck_assert_ptr_nonnull(ps->r);
    for (size_t i = 0; i < n; i++) {
        ps->r[i].err = 1;
        ps->r[i].set = ps;
    }
}

static void
pubset_free(struct pubset *ps)
{
    free(ps->r);
    ps->r = NULL;
}

/*
 * Publish "1".."n" (payload i+1 for record i) to q, pipelined, keeping at
 * most window unconfirmed. Does not wait for the last confirms.
 */
static void
pubset_send(struct pubset *ps, const char *q, size_t window)
{
    protoq_client *c = ps->c;

    for (size_t i = 0; i < ps->n; i++) {
        struct protoq_message m;
        char buf[32];

        memset(&m, 0, sizeof(m));
        snprintf(buf, sizeof(buf), "%zu", i + 1);
        m.payload = buf;
        m.len = strlen(buf);
        pq_check_ok(c, protoq_publish_async(c, q, &m, on_confirm, &ps->r[i]));
        if (protoq_outstanding(c) >= window) {
            pq_check_ok(c, protoq_wait_confirms(c, window / 2, 30000));
        }
    }
}

/* Publish "1".."n" to q pipelined and wait for every confirm; asserts all
 * succeeded. ids (n entries, NULL ok) gets the ids. */
static void
publish_seq(protoq_client *c, const char *q, size_t n, uint64_t *ids)
{
    struct pubset ps;

    pubset_init(&ps, c, n);
    pubset_send(&ps, q, 5000);
    pq_check_ok(c, protoq_wait_confirms(c, 0, 60000));
    ck_assert_uint_eq(ps.ok, n);
    ck_assert_uint_eq(ps.failed, 0);
    if (ids != NULL) {
        for (size_t i = 0; i < n; i++) {
            ids[i] = ps.r[i].id;
        }
    }
    pubset_free(&ps);
}

static void
stat_q(protoq_client *c, const char *q, struct protoq_queue_info *qi)
{
    pq_check_ok(c, protoq_queue_stat(c, q, qi));
}

/* Payload of g as a number, or 0 when it is not one. */
static unsigned long
payload_num(const struct got *g)
{
    char *end;
    unsigned long v = strtoul(g->payload, &end, 10);

    return *end == '\0' && g->len == strlen(g->payload) ? v : 0;
}

/* Consume want messages from q on a fresh connection, acking each; checks
 * payloads are exactly "1".."want" in order with attempt == attempt. */
static void
consume_seq_in_order(const char *q, size_t want, uint32_t prefetch,
                     uint32_t attempt, int timeout_ms)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct coll k;
    size_t bad = 0, first_bad = 0;

    coll_init(&k, want, true);
    pq_check_ok(
        c, protoq_subscribe(c, q, prefetch, NULL, 0, on_collect, &k, NULL));
    poll_until(c, &k, want, timeout_ms);
    ck_assert_msg(k.n == want, "got %zu of %zu messages from %s", k.n, want, q);
    for (size_t i = 0; i < want; i++) {
        if (payload_num(&k.v[i]) != i + 1 || k.v[i].attempt != attempt) {
            if (bad++ == 0) {
                first_bad = i;
            }
        }
    }
    ck_assert_msg(bad == 0,
                  "%zu deliveries out of order; first at %zu: payload \"%s\" "
                  "attempt %u (want %zu attempt %u)",
                  bad, first_bad, k.v[first_bad].payload,
                  k.v[first_bad].attempt, first_bad + 1, attempt);
    ck_assert_int_eq(k.ack_err, 0);
    poll_for(c, 200);
    ck_assert_uint_eq(k.overflow, 0);
    coll_free(&k);
    protoq_close(c);
}

/* The broker process is alive and a normal client can create, publish,
 * consume and ack. */
static void
assert_broker_healthy(void)
{
    protoq_client *c;
    struct coll k;
    char q[32];
    uint64_t id = 0;

    ck_assert_msg(g_srv.pid > 0 && kill(g_srv.pid, 0) == 0,
                  "protoqd (pid %d) is gone", (int)g_srv.pid);
    c = pq_connect_or_fail(&g_srv);
    snprintf(q, sizeof(q), "health-%d", ++g_health_seq);
    pq_check_ok(c, protoq_queue_create(c, q, NULL));
    pub_str(c, q, "still-ok", 0, &id);
    ck_assert_uint_ne(id, 0);
    coll_init(&k, 4, false);
    pq_check_ok(c, protoq_subscribe(c, q, 1, NULL, 0, on_collect, &k, NULL));
    ck_assert_uint_eq(poll_until(c, &k, 1, 5000), 1);
    ck_assert_str_eq(k.v[0].payload, "still-ok");
    ck_assert_uint_eq(k.v[0].id, id);
    pq_check_ok(c, protoq_ack_sync(c, k.v[0].id, k.v[0].attempt));
    coll_free(&k);
    protoq_close(c);
    ck_assert_int_eq(kill(g_srv.pid, 0), 0);
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

static uint8_t *
pack_queue_list(uint64_t rid, size_t *len)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__QueueList ql = PROTOQ__QUEUE_LIST__INIT;
    uint8_t *b;

    f.request_id = rid;
    f.kind_case = PROTOQ__FRAME__KIND_QUEUE_LIST;
    f.queue_list = &ql;
    b = raw_pack(&f, len);
    ck_assert_ptr_nonnull(b);
    return b;
}

static uint8_t *
pack_queue_create(uint64_t rid, const char *name, size_t *len)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__QueueCreate qc = PROTOQ__QUEUE_CREATE__INIT;
    uint8_t *b;

    qc.name = (char *)name;
    f.request_id = rid;
    f.kind_case = PROTOQ__FRAME__KIND_QUEUE_CREATE;
    f.queue_create = &qc;
    b = raw_pack(&f, len);
    ck_assert_ptr_nonnull(b);
    return b;
}

static uint8_t *
pack_publish(uint64_t rid, const char *q, const void *payload, size_t plen,
             size_t *len)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Publish p = PROTOQ__PUBLISH__INIT;
    Protoq__Message m = PROTOQ__MESSAGE__INIT;
    uint8_t *b;

    m.payload.data = (uint8_t *)payload;
    m.payload.len = plen;
    p.queue = (char *)q;
    p.message = &m;
    f.request_id = rid;
    f.kind_case = PROTOQ__FRAME__KIND_PUBLISH;
    f.publish = &p;
    b = raw_pack(&f, len);
    ck_assert_ptr_nonnull(b);
    return b;
}

static void
send_all(int fd, const void *buf, size_t len)
{
    ck_assert_msg(raw_send(fd, buf, len) == 0, "raw_send: %s", strerror(errno));
}

/* Read one frame and check its kind and request id. Returns it (the
 * caller frees it). */
static Protoq__Frame *
read_kind(int fd, Protoq__Frame__KindCase kind, uint64_t rid)
{
    Protoq__Frame *f = NULL;
    int rc = raw_read_frame(fd, RAW_TIMEOUT_MS, 1u << 24, &f);

    ck_assert_msg(rc == 0, "raw_read_frame: %s",
                  rc == 1 ? "EOF" : "timeout or bad frame");
    if (f->kind_case == PROTOQ__FRAME__KIND_ERROR &&
        kind != PROTOQ__FRAME__KIND_ERROR) {
        ck_abort_msg("wanted frame kind %d, got Error %s: %s", (int)kind,
                     protoq_code_name((int)f->error->code),
                     f->error->message ? f->error->message : "");
    }
    ck_assert_int_eq(f->kind_case, kind);
    ck_assert_uint_eq(f->request_id, rid);
    return f;
}

/* Read one Error frame with code want; its message must contain sub
 * (NULL: any). */
static void
read_error(int fd, int want, const char *sub)
{
    Protoq__Frame *f = NULL;
    int rc = raw_read_frame(fd, RAW_TIMEOUT_MS, 1u << 24, &f);

    ck_assert_msg(rc == 0, "wanted Error %s, got %s", protoq_code_name(want),
                  rc == 1 ? "EOF" : "a timeout or a bad frame");
    ck_assert_msg(f->kind_case == PROTOQ__FRAME__KIND_ERROR,
                  "wanted Error %s, got frame kind %d", protoq_code_name(want),
                  (int)f->kind_case);
    ck_assert_msg((int)f->error->code == want, "wanted Error %s, got %s: %s",
                  protoq_code_name(want), protoq_code_name((int)f->error->code),
                  f->error->message ? f->error->message : "");
    if (sub != NULL) {
        ck_assert_msg(f->error->message != NULL &&
                          strcasestr(f->error->message, sub) != NULL,
                      "Error message \"%s\" does not mention \"%s\"",
                      f->error->message ? f->error->message : "", sub);
    }
    frame_free(f);
}

/* Connect, say Hello, return the fd. */
static int
raw_ready(void)
{
    int fd = raw_connect(g_srv.port);

    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(raw_hello(fd, RAW_TIMEOUT_MS), 0);
    return fd;
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

/* ========================================================== queue admin */

START_TEST(test_queue_create_again_with_same_attrs_is_ok)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a;
    struct protoq_queue_info *list = NULL;
    size_t n = 0;

    memset(&a, 0, sizeof(a));
    a.max_length = 100;
    a.ack_timeout_ms = 5000;
    pq_check_ok(c, protoq_queue_create(c, "jobs", &a));
    pq_check_ok(c, protoq_queue_create(c, "jobs", &a));
    pq_check_ok(c, protoq_queue_list(c, &list, &n));
    ck_assert_uint_eq(n, 1);
    ck_assert_str_eq(list[0].name, "jobs");
    ck_assert_uint_eq(list[0].attrs.max_length, 100);
    ck_assert_uint_eq(list[0].attrs.ack_timeout_ms, 5000);
    protoq_queue_list_free(list, n);
    protoq_close(c);
}
END_TEST

START_TEST(test_queue_create_with_other_attrs_is_queue_exists)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a;
    struct protoq_queue_info qi;

    memset(&a, 0, sizeof(a));
    a.max_length = 100;
    pq_check_ok(c, protoq_queue_create(c, "jobs", &a));
    a.max_length = 101;
    pq_check_remote(c, protoq_queue_create(c, "jobs", &a),
                    PROTOQ_CODE_QUEUE_EXISTS);
    memset(&a, 0, sizeof(a));
    a.transient = true;
    a.max_length = 100;
    pq_check_remote(c, protoq_queue_create(c, "jobs", &a),
                    PROTOQ_CODE_QUEUE_EXISTS);
    memset(&a, 0, sizeof(a));
    a.no_backoff = true;
    a.max_length = 100;
    pq_check_remote(c, protoq_queue_create(c, "jobs", &a),
                    PROTOQ_CODE_QUEUE_EXISTS);
    /* The first attributes stand, and the connection still works. */
    stat_q(c, "jobs", &qi);
    ck_assert_uint_eq(qi.attrs.max_length, 100);
    ck_assert(!qi.attrs.transient);
    protoq_close(c);
}
END_TEST

START_TEST(test_queue_defaults_are_filled_in)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_info qi;

    pq_check_ok(c, protoq_queue_create(c, "plain", NULL));
    stat_q(c, "plain", &qi);
    ck_assert_str_eq(qi.name, "plain");
    ck_assert(!qi.attrs.transient);
    ck_assert_uint_eq(qi.attrs.max_length, 0);
    ck_assert_uint_eq(qi.attrs.max_bytes, 0);
    ck_assert_uint_eq(qi.attrs.ack_timeout_ms, 30000);
    ck_assert_uint_eq(qi.attrs.max_attempts, 5);
    ck_assert_str_eq(qi.attrs.dead_letter, "");
    ck_assert_uint_eq(qi.attrs.backoff_base_ms, 1000);
    ck_assert_uint_eq(qi.attrs.backoff_cap_ms, 60000);
    ck_assert_uint_eq(qi.attrs.ttl_ms, 0);
    ck_assert_uint_eq(qi.attrs.dedup_window_ms, 86400000);
    ck_assert_uint_eq(qi.ready + qi.delayed + qi.inflight + qi.consumers +
                          qi.bytes + qi.published + qi.acked,
                      0);
    protoq_close(c);
}
END_TEST

START_TEST(test_invalid_queue_names_are_bad_request)
{
    static const char *const bad[] = {
        "has space",   "slash/name", "bang!",     "tab\tname",
        "caf\xc3\xa9", "star*",      "new\nline",
    };
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_info *list = NULL;
    char longest[PROTOQ_NAME_MAX + 1];
    size_t n = 0;

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        pq_check_remote(c, protoq_queue_create(c, bad[i], NULL),
                        PROTOQ_CODE_BAD_REQUEST);
        pq_check_remote(
            c, protoq_queue_stat(c, bad[i], &(struct protoq_queue_info){0}),
            PROTOQ_CODE_BAD_REQUEST);
    }
    /* Every allowed character, and the longest allowed name, work. */
    pq_check_ok(c, protoq_queue_create(c, "AZaz09._-:", NULL));
    memset(longest, 'q', PROTOQ_NAME_MAX);
    longest[PROTOQ_NAME_MAX] = '\0';
    pq_check_ok(c, protoq_queue_create(c, longest, NULL));
    pq_check_ok(c, protoq_queue_list(c, &list, &n));
    ck_assert_uint_eq(n, 2);
    protoq_queue_list_free(list, n);
    protoq_close(c);
}
END_TEST

START_TEST(test_empty_and_overlong_names_on_the_wire_are_bad_request)
{
    /* libprotoq refuses these locally, so send them raw. */
    int fd = raw_ready();
    char overlong[PROTOQ_NAME_MAX + 2];
    Protoq__Frame *f;
    size_t len;
    uint8_t *b;

    b = pack_queue_create(2, "", &len);
    send_all(fd, b, len);
    free(b);
    read_error(fd, PROTOQ_CODE_BAD_REQUEST, NULL);
    memset(overlong, 'x', PROTOQ_NAME_MAX + 1);
    overlong[PROTOQ_NAME_MAX + 1] = '\0';
    b = pack_queue_create(3, overlong, &len);
    send_all(fd, b, len);
    free(b);
    read_error(fd, PROTOQ_CODE_BAD_REQUEST, NULL);
    /* Not fatal: the connection still answers, and nothing was created. */
    b = pack_queue_list(4, &len);
    send_all(fd, b, len);
    free(b);
    f = read_kind(fd, PROTOQ__FRAME__KIND_QUEUE_LIST_OK, 4);
    ck_assert_uint_eq(f->queue_list_ok->n_queues, 0);
    frame_free(f);
    close(fd);
}
END_TEST

START_TEST(test_queue_list_shows_every_queue)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_info *list = NULL;
    bool seen[3] = {false, false, false};
    static const char *const names[] = {"alpha", "beta", "gamma"};
    size_t n = 0;

    pq_check_ok(c, protoq_queue_list(c, &list, &n));
    ck_assert_uint_eq(n, 0);
    ck_assert_ptr_null(list);
    for (size_t i = 0; i < 3; i++) {
        pq_check_ok(c, protoq_queue_create(c, names[i], NULL));
    }
    pub_str(c, "beta", "b1", 0, NULL);
    pub_str(c, "beta", "b2", 0, NULL);
    pq_check_ok(c, protoq_queue_list(c, &list, &n));
    ck_assert_uint_eq(n, 3);
    for (size_t i = 0; i < n; i++) {
        for (size_t j = 0; j < 3; j++) {
            if (strcmp(list[i].name, names[j]) == 0) {
                ck_assert(!seen[j]);
                seen[j] = true;
                ck_assert_uint_eq(list[i].ready, j == 1 ? 2 : 0);
            }
        }
    }
    ck_assert(seen[0] && seen[1] && seen[2]);
    protoq_queue_list_free(list, n);
    protoq_close(c);
}
END_TEST

START_TEST(test_queue_stat_counts_ready_inflight_acked)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    protoq_client *w = pq_connect_or_fail(&g_srv);
    struct protoq_queue_info qi;
    struct coll k;

    pq_check_ok(c, protoq_queue_create(c, "counts", NULL));
    pub_str(c, "counts", "aaaa", 0, NULL);       /* 4 bytes */
    pub_str(c, "counts", "bbbbbb", 0, NULL);     /* 6 */
    pub_str(c, "counts", "cc", 0, NULL);         /* 2 */
    pub_str(c, "counts", "d", 0, NULL);          /* 1 */
    pub_str(c, "counts", "eeeeeeeeee", 0, NULL); /* 10 */
    stat_q(c, "counts", &qi);
    ck_assert_uint_eq(qi.ready, 5);
    ck_assert_uint_eq(qi.inflight, 0);
    ck_assert_uint_eq(qi.delayed, 0);
    ck_assert_uint_eq(qi.consumers, 0);
    ck_assert_uint_eq(qi.bytes, 23);
    ck_assert_uint_eq(qi.published, 5);
    ck_assert_uint_eq(qi.acked, 0);

    coll_init(&k, 8, false);
    pq_check_ok(
        w, protoq_subscribe(w, "counts", 2, NULL, 0, on_collect, &k, NULL));
    ck_assert_uint_eq(poll_until(w, &k, 2, 5000), 2);
    ck_assert_str_eq(k.v[0].payload, "aaaa");
    ck_assert_str_eq(k.v[1].payload, "bbbbbb");
    stat_q(c, "counts", &qi);
    ck_assert_uint_eq(qi.ready, 3);
    ck_assert_uint_eq(qi.inflight, 2);
    ck_assert_uint_eq(qi.consumers, 1);
    ck_assert_uint_eq(qi.bytes, 23);
    pq_check_ok(w, protoq_ack_sync(w, k.v[0].id, k.v[0].attempt));
    ck_assert_uint_eq(poll_until(w, &k, 3, 5000), 3);
    ck_assert_str_eq(k.v[2].payload, "cc");
    stat_q(c, "counts", &qi);
    ck_assert_uint_eq(qi.ready, 2);
    ck_assert_uint_eq(qi.inflight, 2);
    ck_assert_uint_eq(qi.acked, 1);
    ck_assert_uint_eq(qi.bytes, 19);
    coll_free(&k);
    protoq_close(w);
    protoq_close(c);
}
END_TEST

START_TEST(test_queue_purge_counts_ready_and_keeps_inflight)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    protoq_client *w = pq_connect_or_fail(&g_srv);
    struct protoq_queue_info qi;
    uint64_t purged = 999;
    struct coll k;

    pq_check_ok(c, protoq_queue_create(c, "p", NULL));
    publish_seq(c, "p", 10, NULL);
    coll_init(&k, 16, false);
    pq_check_ok(w, protoq_subscribe(w, "p", 3, NULL, 0, on_collect, &k, NULL));
    ck_assert_uint_eq(poll_until(w, &k, 3, 5000), 3);
    pq_check_ok(c, protoq_queue_purge(c, "p", &purged));
    ck_assert_uint_eq(purged, 7);
    stat_q(c, "p", &qi);
    ck_assert_uint_eq(qi.ready, 0);
    ck_assert_uint_eq(qi.inflight, 3);
    /* The in-flight ones can still be acked. */
    for (size_t i = 0; i < 3; i++) {
        pq_check_ok(w, protoq_ack_sync(w, k.v[i].id, k.v[i].attempt));
    }
    poll_for(w, 200);
    ck_assert_uint_eq(k.n, 3);
    pq_check_ok(c, protoq_queue_purge(c, "p", &purged));
    ck_assert_uint_eq(purged, 0);
    stat_q(c, "p", &qi);
    ck_assert_uint_eq(qi.inflight, 0);
    ck_assert_uint_eq(qi.acked, 3);
    coll_free(&k);
    protoq_close(w);
    protoq_close(c);
}
END_TEST

START_TEST(test_queue_delete_removes_queue_and_messages)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_info *list = NULL;
    struct protoq_queue_info qi;
    size_t n = 0;

    pq_check_ok(c, protoq_queue_create(c, "doomed", NULL));
    pq_check_ok(c, protoq_queue_create(c, "kept", NULL));
    publish_seq(c, "doomed", 5, NULL);
    pq_check_ok(c, protoq_queue_delete(c, "doomed"));
    pq_check_remote(c, protoq_queue_stat(c, "doomed", &qi),
                    PROTOQ_CODE_QUEUE_NOT_FOUND);
    pq_check_ok(c, protoq_queue_list(c, &list, &n));
    ck_assert_uint_eq(n, 1);
    ck_assert_str_eq(list[0].name, "kept");
    protoq_queue_list_free(list, n);
    /* Re-created, it starts empty. */
    pq_check_ok(c, protoq_queue_create(c, "doomed", NULL));
    stat_q(c, "doomed", &qi);
    ck_assert_uint_eq(qi.ready, 0);
    ck_assert_uint_eq(qi.bytes, 0);
    protoq_close(c);
}
END_TEST

START_TEST(test_ops_on_missing_queue_are_queue_not_found)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_info qi;
    struct protoq_message m;
    struct coll k;
    uint64_t purged;

    coll_init(&k, 1, false);
    memset(&m, 0, sizeof(m));
    m.payload = "x";
    m.len = 1;
    pq_check_remote(c, protoq_queue_stat(c, "nosuch", &qi),
                    PROTOQ_CODE_QUEUE_NOT_FOUND);
    pq_check_remote(c, protoq_queue_delete(c, "nosuch"),
                    PROTOQ_CODE_QUEUE_NOT_FOUND);
    pq_check_remote(c, protoq_queue_purge(c, "nosuch", &purged),
                    PROTOQ_CODE_QUEUE_NOT_FOUND);
    pq_check_remote(c, protoq_publish(c, "nosuch", &m, NULL),
                    PROTOQ_CODE_QUEUE_NOT_FOUND);
    pq_check_remote(c, protoq_publish_batch(c, "nosuch", &m, 1, NULL),
                    PROTOQ_CODE_QUEUE_NOT_FOUND);
    pq_check_remote(
        c, protoq_subscribe(c, "nosuch", 1, NULL, 0, on_collect, &k, NULL),
        PROTOQ_CODE_QUEUE_NOT_FOUND);
    /* None of that was fatal. */
    pq_check_ok(c, protoq_queue_create(c, "now", NULL));
    coll_free(&k);
    protoq_close(c);
}
END_TEST

/* ========================================================= walk-through */

START_TEST(test_100k_pipelined_publishes_consumed_in_order)
{
    enum { N = 100000 };
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_info qi;
    struct pubset ps;
    uint64_t prev = 0;
    size_t unordered = 0;

    pq_check_ok(c, protoq_queue_create(c, "walk", NULL));
    pubset_init(&ps, c, N);
    pubset_send(&ps, "walk", 10000);
    pq_check_ok(c, protoq_wait_confirms(c, 0, 60000));
    ck_assert_uint_eq(protoq_outstanding(c), 0);
    ck_assert_uint_eq(ps.failed, 0);
    ck_assert_uint_eq(ps.ok, N);
    for (size_t i = 0; i < N; i++) {
        ck_assert_int_eq(ps.r[i].err, PQ_OK);
        ck_assert_uint_ne(ps.r[i].id, 0);
        if (ps.r[i].id <= prev) {
            unordered++;
        }
        prev = ps.r[i].id;
    }
    /* One connection, one queue: ids follow publish order. */
    ck_assert_uint_eq(unordered, 0);
    stat_q(c, "walk", &qi);
    ck_assert_uint_eq(qi.ready, N);
    ck_assert_uint_eq(qi.published, N);

    consume_seq_in_order("walk", N, 1000, 1, 90000);

    /* The acks were pipelined; the broker must have applied them all. */
    for (int i = 0; i < 100; i++) {
        stat_q(c, "walk", &qi);
        if (qi.acked == N) {
            break;
        }
        sleep_ms(20);
    }
    ck_assert_uint_eq(qi.acked, N);
    ck_assert_uint_eq(qi.ready, 0);
    ck_assert_uint_eq(qi.inflight, 0);
    ck_assert_uint_eq(qi.bytes, 0);
    pubset_free(&ps);
    protoq_close(c);
}
END_TEST

static const char *
cli_path(void)
{
    const char *p = getenv("PROTOQ");

    return p && p[0] ? p : "build/protoq";
}

/*
 * Run the protoq CLI with args (NULL-terminated, without argv[0]); stdin
 * from in_path (NULL: /dev/null), stdout to out_path and stderr to err_path
 * (NULL: /dev/null). Returns the exit status, 128+signal, or -1 when it
 * ran longer than timeout_ms (it is killed).
 */
static int
run_cli(const char *const *args, const char *in_path, const char *out_path,
        const char *err_path, int timeout_ms)
{
    const char *argv[32];
    int64_t deadline;
    size_t n = 0;
    int status;
    pid_t pid;

    ck_assert_msg(access(cli_path(), X_OK) == 0,
                  "protoq CLI %s is not there (set PROTOQ): %s", cli_path(),
                  strerror(errno));
    argv[n++] = cli_path();
    for (size_t i = 0; args[i] != NULL && n + 1 < 32; i++) {
        argv[n++] = args[i];
    }
    argv[n] = NULL;
    pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        int in = open(in_path ? in_path : "/dev/null", O_RDONLY);
        int out = open(out_path ? out_path : "/dev/null",
                       O_WRONLY | O_CREAT | O_TRUNC, 0644);
        int err = open(err_path ? err_path : "/dev/null",
                       O_WRONLY | O_CREAT | O_TRUNC, 0644);

        if (in < 0 || out < 0 || err < 0) {
            _exit(126);
        }
        dup2(in, STDIN_FILENO);
        dup2(out, STDOUT_FILENO);
        dup2(err, STDERR_FILENO);
        unsetenv("PROTOQ_SERVER");
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    deadline = now_ms_mono() + timeout_ms;
    for (;;) {
        pid_t r = waitpid(pid, &status, WNOHANG);

        if (r == pid) {
            break;
        }
        if (now_ms_mono() >= deadline) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            return -1;
        }
        sleep_ms(5);
    }
    if (WIFEXITED(status)) {
        return WEXITSTATUS(status);
    }
    return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : -1;
}

/* Read a whole (small) file into a malloc'ed NUL-terminated string. */
static char *
slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    char *buf;
    long size;

    ck_assert_msg(f != NULL, "%s: %s", path, strerror(errno));
    fseek(f, 0, SEEK_END);
    size = ftell(f);
    fseek(f, 0, SEEK_SET);
    buf = malloc((size_t)size + 1);
    ck_assert_ptr_nonnull(buf);
    *len = fread(buf, 1, (size_t)size, f);
    buf[*len] = '\0';
    fclose(f);
    return buf;
}

static void
tmp_path(char *buf, size_t cap, const char *name)
{
    snprintf(buf, cap, "%s/%s", g_srv.dir, name);
}

START_TEST(test_cli_walkthrough_pub_lines_then_consume)
{
    enum { N = 10000 };
    char in[320], out[320], err[320];
    struct protoq_queue_info qi;
    protoq_client *c;
    char *want, *got;
    size_t wlen = 0, glen = 0;
    char count[16];
    FILE *f;
    int rc;

    tmp_path(in, sizeof(in), "in.txt");
    tmp_path(out, sizeof(out), "out.txt");
    tmp_path(err, sizeof(err), "err.txt");
    f = fopen(in, "w");
    ck_assert_ptr_nonnull(f);
    for (int i = 1; i <= N; i++) {
        fprintf(f, "%d\n", i);
    }
    fclose(f);
    want = slurp(in, &wlen);
    snprintf(count, sizeof(count), "%d", N);

    rc = run_cli(
        (const char *[]){"-s", g_srv.addr, "queue", "create", "cliq", NULL},
        NULL, out, err, 10000);
    ck_assert_msg(rc == 0, "queue create exited %d", rc);
    rc = run_cli(
        (const char *[]){"-s", g_srv.addr, "pub", "cliq", "--lines", NULL}, in,
        out, err, 30000);
    ck_assert_msg(rc == 0, "pub --lines exited %d", rc);

    c = pq_connect_or_fail(&g_srv);
    stat_q(c, "cliq", &qi);
    ck_assert_uint_eq(qi.ready, N);

    rc = run_cli((const char *[]){"-s", g_srv.addr, "consume", "cliq",
                                  "--count", count, NULL},
                 NULL, out, err, 30000);
    ck_assert_msg(rc == 0, "consume exited %d", rc);
    got = slurp(out, &glen);
    ck_assert_uint_eq(glen, wlen);
    ck_assert_msg(memcmp(got, want, wlen) == 0,
                  "consume printed something other than 1..%d", N);

    /* consume acked what it printed. */
    for (int i = 0; i < 100; i++) {
        stat_q(c, "cliq", &qi);
        if (qi.acked == N) {
            break;
        }
        sleep_ms(20);
    }
    ck_assert_uint_eq(qi.ready, 0);
    ck_assert_uint_eq(qi.inflight, 0);
    ck_assert_uint_eq(qi.acked, N);

    /* queue ls shows it. */
    rc = run_cli((const char *[]){"-s", g_srv.addr, "queue", "ls", NULL}, NULL,
                 out, err, 10000);
    ck_assert_int_eq(rc, 0);
    free(got);
    got = slurp(out, &glen);
    ck_assert_msg(strstr(got, "cliq") != NULL, "queue ls printed: %s", got);
    free(got);
    free(want);
    protoq_close(c);
}
END_TEST

START_TEST(test_cli_exit_codes_usage_is_2_errors_are_1)
{
    char err[320];
    size_t len = 0;
    char *msg;
    int rc;

    tmp_path(err, sizeof(err), "err.txt");
    rc = run_cli((const char *[]){NULL}, NULL, NULL, err, 10000);
    ck_assert_msg(rc == 2, "no arguments: exit %d, want 2", rc);
    rc = run_cli((const char *[]){"-s", g_srv.addr, "frobnicate", NULL}, NULL,
                 NULL, err, 10000);
    ck_assert_msg(rc == 2, "unknown command: exit %d, want 2", rc);
    rc = run_cli((const char *[]){"-s", g_srv.addr, "consume", NULL}, NULL,
                 NULL, err, 10000);
    ck_assert_msg(rc == 2, "consume without a queue: exit %d, want 2", rc);
    rc = run_cli((const char *[]){"-s", g_srv.addr, "consume", "q",
                                  "--no-such-flag", NULL},
                 NULL, NULL, err, 10000);
    ck_assert_msg(rc == 2, "unknown flag: exit %d, want 2", rc);

    rc = run_cli(
        (const char *[]){"-s", g_srv.addr, "pub", "nosuch", "hello", NULL},
        NULL, NULL, err, 10000);
    ck_assert_msg(rc == 1, "pub to a missing queue: exit %d, want 1", rc);
    msg = slurp(err, &len);
    ck_assert_msg(len > 0, "pub to a missing queue printed nothing on stderr");
    free(msg);
    rc = run_cli((const char *[]){"-s", g_srv.addr, "consume", "nosuch",
                                  "--count", "1", "--wait", "1s", NULL},
                 NULL, NULL, err, 10000);
    ck_assert_msg(rc == 1, "consume of a missing queue: exit %d, want 1", rc);
    rc = run_cli(
        (const char *[]){"-s", g_srv.addr, "queue", "stat", "nosuch", NULL},
        NULL, NULL, err, 10000);
    ck_assert_msg(rc == 1, "stat of a missing queue: exit %d, want 1", rc);
    rc = run_cli(
        (const char *[]){"-s", g_srv.addr, "queue", "rm", "nosuch", NULL}, NULL,
        NULL, err, 10000);
    ck_assert_msg(rc == 1, "rm of a missing queue: exit %d, want 1", rc);
}
END_TEST

/* ================================================================ batch */

START_TEST(test_batch_naming_missing_queue_stores_nothing)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    const char *const qs[] = {"a", "b", "missing", "a"};
    struct protoq_message m[4];
    struct protoq_queue_info qi;
    uint64_t ids[4] = {0, 0, 0, 0};

    pq_check_ok(c, protoq_queue_create(c, "a", NULL));
    pq_check_ok(c, protoq_queue_create(c, "b", NULL));
    memset(m, 0, sizeof(m));
    for (size_t i = 0; i < 4; i++) {
        m[i].payload = "m";
        m[i].len = 1;
    }
    pq_check_remote(c, protoq_publish_batch_multi(c, qs, m, 4, ids),
                    PROTOQ_CODE_QUEUE_NOT_FOUND);
    stat_q(c, "a", &qi);
    ck_assert_uint_eq(qi.ready, 0);
    ck_assert_uint_eq(qi.published, 0);
    stat_q(c, "b", &qi);
    ck_assert_uint_eq(qi.ready, 0);
    ck_assert_uint_eq(qi.published, 0);
    protoq_close(c);
}
END_TEST

START_TEST(test_batch_with_one_oversized_message_stores_nothing)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_message m[3];
    struct protoq_queue_info qi;
    size_t big = DEFAULT_MAX_MESSAGE + 1;
    char *payload = malloc(big);

    ck_assert_ptr_nonnull(payload);
    memset(payload, 'z', big);
    pq_check_ok(c, protoq_queue_create(c, "a", NULL));
    memset(m, 0, sizeof(m));
    m[0].payload = "ok";
    m[0].len = 2;
    m[1].payload = payload;
    m[1].len = big;
    m[2].payload = "ok";
    m[2].len = 2;
    pq_check_remote(c, protoq_publish_batch(c, "a", m, 3, NULL),
                    PROTOQ_CODE_MESSAGE_TOO_LARGE);
    stat_q(c, "a", &qi);
    ck_assert_uint_eq(qi.ready, 0);
    free(payload);
    protoq_close(c);
}
END_TEST

START_TEST(test_batch_across_queues_stores_all_in_order)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    const char *const qs[] = {"a", "b", "a", "b", "a"};
    static const char *const body[] = {"a1", "b1", "a2", "b2", "a3"};
    struct protoq_message m[5];
    struct protoq_queue_info qi;
    uint64_t ids[5] = {0};
    struct coll k;

    pq_check_ok(c, protoq_queue_create(c, "a", NULL));
    pq_check_ok(c, protoq_queue_create(c, "b", NULL));
    memset(m, 0, sizeof(m));
    for (size_t i = 0; i < 5; i++) {
        m[i].payload = body[i];
        m[i].len = 2;
    }
    pq_check_ok(c, protoq_publish_batch_multi(c, qs, m, 5, ids));
    for (size_t i = 0; i < 5; i++) {
        ck_assert_uint_ne(ids[i], 0);
        for (size_t j = 0; j < i; j++) {
            ck_assert_uint_ne(ids[i], ids[j]);
        }
    }
    stat_q(c, "a", &qi);
    ck_assert_uint_eq(qi.ready, 3);
    stat_q(c, "b", &qi);
    ck_assert_uint_eq(qi.ready, 2);
    coll_init(&k, 8, true);
    pq_check_ok(c, protoq_subscribe(c, "a", 10, NULL, 0, on_collect, &k, NULL));
    ck_assert_uint_eq(poll_until(c, &k, 3, 5000), 3);
    ck_assert_str_eq(k.v[0].payload, "a1");
    ck_assert_str_eq(k.v[1].payload, "a2");
    ck_assert_str_eq(k.v[2].payload, "a3");
    ck_assert_uint_eq(k.v[0].id, ids[0]);
    ck_assert_uint_eq(k.v[1].id, ids[2]);
    ck_assert_uint_eq(k.v[2].id, ids[4]);
    coll_free(&k);
    protoq_close(c);
}
END_TEST

START_TEST(test_batch_over_max_batch_is_bad_request)
{
    /* libprotoq refuses it locally; send it raw. */
    enum { N = DEFAULT_MAX_BATCH + 1 };
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__PublishBatch pb = PROTOQ__PUBLISH_BATCH__INIT;
    Protoq__Publish *items = calloc(N, sizeof(*items));
    Protoq__Publish **ptrs = calloc(N, sizeof(*ptrs));
    Protoq__Message m = PROTOQ__MESSAGE__INIT;
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_info qi;
    Protoq__Frame *r;
    size_t len;
    uint8_t *b;
    int fd;

    ck_assert_ptr_nonnull(items);
    ck_assert_ptr_nonnull(ptrs);
    pq_check_ok(c, protoq_queue_create(c, "a", NULL));
    m.payload.data = (uint8_t *)"0123456789abcdef";
    m.payload.len = 16;
    for (size_t i = 0; i < N; i++) {
        protoq__publish__init(&items[i]);
        items[i].queue = (char *)"a";
        items[i].message = &m;
        ptrs[i] = &items[i];
    }
    pb.n_items = N;
    pb.items = ptrs;
    f.request_id = 2;
    f.kind_case = PROTOQ__FRAME__KIND_PUBLISH_BATCH;
    f.publish_batch = &pb;
    b = raw_pack(&f, &len);
    ck_assert_ptr_nonnull(b);
    fd = raw_ready();
    send_all(fd, b, len);
    read_error(fd, PROTOQ_CODE_BAD_REQUEST, NULL);
    free(b);
    b = pack_queue_list(3, &len);
    send_all(fd, b, len);
    r = read_kind(fd, PROTOQ__FRAME__KIND_QUEUE_LIST_OK, 3);
    frame_free(r);
    free(b);
    close(fd);
    stat_q(c, "a", &qi);
    ck_assert_uint_eq(qi.ready, 0);
    free(items);
    free(ptrs);
    protoq_close(c);
}
END_TEST

/* =========================================================== consumers */

START_TEST(test_two_consumers_share_a_queue_round_robin)
{
    enum { N = 1000 };
    protoq_client *p = pq_connect_or_fail(&g_srv);
    protoq_client *c1 = pq_connect_or_fail(&g_srv);
    protoq_client *c2 = pq_connect_or_fail(&g_srv);
    unsigned char *seen = calloc(N + 1, 1);
    struct coll k1, k2;
    int64_t deadline;
    size_t dups = 0;

    ck_assert_ptr_nonnull(seen);
    pq_check_ok(p, protoq_queue_create(p, "rr", NULL));
    coll_init(&k1, N, true);
    coll_init(&k2, N, true);
    pq_check_ok(c1,
                protoq_subscribe(c1, "rr", 10, NULL, 0, on_collect, &k1, NULL));
    pq_check_ok(c2,
                protoq_subscribe(c2, "rr", 10, NULL, 0, on_collect, &k2, NULL));
    publish_seq(p, "rr", N, NULL);
    deadline = now_ms_mono() + 20000;
    while (k1.n + k2.n < N && now_ms_mono() < deadline) {
        ck_assert_int_ge(protoq_poll(c1, 5), 0);
        ck_assert_int_ge(protoq_poll(c2, 5), 0);
    }
    poll_for(c1, 100);
    poll_for(c2, 100);
    ck_assert_msg(k1.n + k2.n == N, "got %zu + %zu of %d", k1.n, k2.n, N);
    ck_assert_uint_eq(k1.overflow + k2.overflow, 0);
    for (size_t i = 0; i < k1.n + k2.n; i++) {
        const struct got *g = i < k1.n ? &k1.v[i] : &k2.v[i - k1.n];
        unsigned long v = payload_num(g);

        ck_assert_msg(v >= 1 && v <= N, "bad payload \"%s\"", g->payload);
        ck_assert_uint_eq(g->attempt, 1);
        if (seen[v]++) {
            dups++;
        }
    }
    ck_assert_uint_eq(dups, 0);
    /* Each consumer sees its share in publish order. */
    for (size_t i = 1; i < k1.n; i++) {
        ck_assert_uint_lt(payload_num(&k1.v[i - 1]), payload_num(&k1.v[i]));
    }
    for (size_t i = 1; i < k2.n; i++) {
        ck_assert_uint_lt(payload_num(&k2.v[i - 1]), payload_num(&k2.v[i]));
    }
    ck_assert_msg(k1.n >= N / 5 && k2.n >= N / 5,
                  "not shared round-robin: %zu vs %zu", k1.n, k2.n);
    free(seen);
    coll_free(&k1);
    coll_free(&k2);
    protoq_close(c1);
    protoq_close(c2);
    protoq_close(p);
}
END_TEST

START_TEST(test_prefetch_credit_is_respected)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    protoq_client *w = pq_connect_or_fail(&g_srv);
    struct protoq_queue_info qi;
    uint64_t sub = 0;
    struct coll k;

    pq_check_ok(p, protoq_queue_create(p, "credit", NULL));
    publish_seq(p, "credit", 20, NULL);
    coll_init(&k, 32, false);
    pq_check_ok(
        w, protoq_subscribe(w, "credit", 5, NULL, 0, on_collect, &k, &sub));
    ck_assert_uint_ne(sub, 0);
    poll_until(w, &k, 5, 5000);
    poll_for(w, 500);
    ck_assert_uint_eq(k.n, 5);
    for (size_t i = 0; i < 5; i++) {
        ck_assert_uint_eq(payload_num(&k.v[i]), i + 1);
        ck_assert_uint_eq(k.v[i].sub, sub);
    }
    stat_q(p, "credit", &qi);
    ck_assert_uint_eq(qi.inflight, 5);
    ck_assert_uint_eq(qi.ready, 15);

    pq_check_ok(w, protoq_ack(w, k.v[0].id, k.v[0].attempt));
    poll_until(w, &k, 6, 5000);
    poll_for(w, 500);
    ck_assert_uint_eq(k.n, 6);
    ck_assert_uint_eq(payload_num(&k.v[5]), 6);
    stat_q(p, "credit", &qi);
    ck_assert_uint_eq(qi.inflight, 5);
    ck_assert_uint_eq(qi.ready, 14);
    ck_assert_uint_eq(qi.acked, 1);

    /* Raising the credit with Flow lets exactly that many more through. */
    pq_check_ok(w, protoq_flow(w, sub, 8));
    poll_until(w, &k, 9, 5000);
    poll_for(w, 500);
    ck_assert_uint_eq(k.n, 9);
    coll_free(&k);
    protoq_close(w);
    protoq_close(p);
}
END_TEST

/* =========================================================== redelivery */

/* A queue whose failed attempts are ready again at once (no_backoff), so
 * redelivery order is exact. */
static void
create_fast_retry_queue(protoq_client *c, const char *q)
{
    struct protoq_queue_attrs a;
    struct protoq_queue_info qi;

    memset(&a, 0, sizeof(a));
    a.no_backoff = true;
    pq_check_ok(c, protoq_queue_create(c, q, &a));
    stat_q(c, q, &qi);
    ck_assert(qi.attrs.no_backoff);
}

START_TEST(test_disconnect_requeues_unacked_to_front_with_attempt_2)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    protoq_client *w1 = pq_connect_or_fail(&g_srv);
    protoq_client *w2;
    struct protoq_queue_info qi;
    uint64_t ids[20];
    struct coll k1, k2;

    create_fast_retry_queue(p, "dq");
    publish_seq(p, "dq", 20, ids);
    coll_init(&k1, 32, false);
    pq_check_ok(w1,
                protoq_subscribe(w1, "dq", 10, NULL, 0, on_collect, &k1, NULL));
    ck_assert_uint_eq(poll_until(w1, &k1, 10, 5000), 10);
    for (size_t i = 0; i < 10; i++) {
        ck_assert_uint_eq(k1.v[i].id, ids[i]);
        ck_assert_uint_eq(k1.v[i].attempt, 1);
    }
    protoq_close(w1);

    /* The ten come back ahead of the ten never delivered. */
    for (int i = 0; i < 200; i++) {
        stat_q(p, "dq", &qi);
        if (qi.inflight == 0 && qi.ready == 20) {
            break;
        }
        sleep_ms(10);
    }
    ck_assert_uint_eq(qi.inflight, 0);
    ck_assert_uint_eq(qi.ready, 20);
    ck_assert_uint_eq(qi.consumers, 0);

    w2 = pq_connect_or_fail(&g_srv);
    coll_init(&k2, 32, true);
    pq_check_ok(
        w2, protoq_subscribe(w2, "dq", 100, NULL, 0, on_collect, &k2, NULL));
    poll_until(w2, &k2, 20, 5000);
    poll_for(w2, 200);
    ck_assert_uint_eq(k2.n, 20);
    for (size_t i = 0; i < 20; i++) {
        ck_assert_uint_eq(k2.v[i].id, ids[i]);
        ck_assert_uint_eq(payload_num(&k2.v[i]), i + 1);
        ck_assert_uint_eq(k2.v[i].attempt, i < 10 ? 2 : 1);
    }
    stat_q(p, "dq", &qi);
    ck_assert_uint_eq(qi.redelivered, 10);
    coll_free(&k1);
    coll_free(&k2);
    protoq_close(w2);
    protoq_close(p);
}
END_TEST

START_TEST(test_nack_requeues_with_attempt_2)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_info qi;
    uint64_t id = 0;
    struct coll k;

    create_fast_retry_queue(c, "nq");
    pub_str(c, "nq", "job", 0, &id);
    pub_str(c, "nq", "next", 0, NULL);
    coll_init(&k, 8, false);
    pq_check_ok(c, protoq_subscribe(c, "nq", 1, NULL, 0, on_collect, &k, NULL));
    ck_assert_uint_eq(poll_until(c, &k, 1, 5000), 1);
    ck_assert_uint_eq(k.v[0].id, id);
    ck_assert_uint_eq(k.v[0].attempt, 1);
    pq_check_ok(c, protoq_nack(c, id, 1, 0, false, "boom"));
    ck_assert_uint_eq(poll_until(c, &k, 2, 5000), 2);
    /* Back at the front, ahead of "next". */
    ck_assert_uint_eq(k.v[1].id, id);
    ck_assert_str_eq(k.v[1].payload, "job");
    ck_assert_uint_eq(k.v[1].attempt, 2);
    pq_check_ok(c, protoq_nack_sync(c, id, 2, 0, false, NULL));
    ck_assert_uint_eq(poll_until(c, &k, 3, 5000), 3);
    ck_assert_uint_eq(k.v[2].id, id);
    ck_assert_uint_eq(k.v[2].attempt, 3);
    pq_check_ok(c, protoq_ack_sync(c, id, 3));
    ck_assert_uint_eq(poll_until(c, &k, 4, 5000), 4);
    ck_assert_str_eq(k.v[3].payload, "next");
    ck_assert_uint_eq(k.v[3].attempt, 1);
    stat_q(c, "nq", &qi);
    ck_assert_uint_eq(qi.nacked, 2);
    ck_assert_uint_eq(qi.acked, 1);
    ck_assert_uint_eq(qi.ready, 0);
    ck_assert_uint_eq(qi.inflight, 1);
    coll_free(&k);
    protoq_close(c);
}
END_TEST

START_TEST(test_nack_past_max_attempts_drops_without_dead_letter)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a;
    struct protoq_queue_info qi;
    uint64_t id = 0;
    struct coll k;

    memset(&a, 0, sizeof(a));
    a.no_backoff = true;
    a.max_attempts = 2;
    pq_check_ok(c, protoq_queue_create(c, "mq", &a));
    pub_str(c, "mq", "doomed", 0, &id);
    coll_init(&k, 8, false);
    pq_check_ok(c, protoq_subscribe(c, "mq", 1, NULL, 0, on_collect, &k, NULL));
    ck_assert_uint_eq(poll_until(c, &k, 1, 5000), 1);
    pq_check_ok(c, protoq_nack_sync(c, id, 1, 0, false, "e1"));
    ck_assert_uint_eq(poll_until(c, &k, 2, 5000), 2);
    ck_assert_uint_eq(k.v[1].attempt, 2);
    pq_check_ok(c, protoq_nack_sync(c, id, 2, 0, false, "e2"));
    poll_for(c, 300);
    ck_assert_uint_eq(k.n, 2);
    stat_q(c, "mq", &qi);
    ck_assert_uint_eq(qi.ready + qi.inflight + qi.delayed, 0);
    ck_assert_uint_eq(qi.dropped, 1);
    coll_free(&k);
    protoq_close(c);
}
END_TEST

START_TEST(test_broker_default_backoff_0_retries_at_once)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_info qi;
    uint64_t id = 0;
    struct coll k;

    /* The broker's default backoff is 0 (setup_server_fast_retry), and a
     * queue created with defaults inherits it. */
    pq_check_ok(c, protoq_queue_create(c, "cq", NULL));
    stat_q(c, "cq", &qi);
    ck_assert_uint_eq(qi.attrs.backoff_base_ms, 0);
    ck_assert_uint_eq(qi.attrs.backoff_cap_ms, 60000);
    /* Effective values: a base of 0 is no backoff. */
    ck_assert(qi.attrs.no_backoff);
    pub_str(c, "cq", "job", 0, &id);
    pub_str(c, "cq", "next", 0, NULL);
    coll_init(&k, 8, false);
    pq_check_ok(c, protoq_subscribe(c, "cq", 1, NULL, 0, on_collect, &k, NULL));
    ck_assert_uint_eq(poll_until(c, &k, 1, 5000), 1);
    for (uint32_t att = 1; att <= 3; att++) {
        ck_assert_uint_eq(k.v[att - 1].id, id);
        ck_assert_uint_eq(k.v[att - 1].attempt, att);
        pq_check_ok(c, protoq_nack(c, id, att, 0, false, NULL));
        ck_assert_uint_eq(poll_until(c, &k, att + 1, 5000), att + 1);
    }
    ck_assert_str_eq(k.v[3].payload, "job");
    ck_assert_uint_eq(k.v[3].attempt, 4);
    coll_free(&k);
    protoq_close(c);
}
END_TEST

START_TEST(test_queue_attrs_from_backoff_0_default_survive_restart)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_info before, after;

    pq_check_ok(c, protoq_queue_create(c, "cq", NULL));
    stat_q(c, "cq", &before);
    protoq_close(c);
    ck_assert_int_eq(srv_restart(&g_srv), 0);
    c = pq_connect_or_fail(&g_srv);
    stat_q(c, "cq", &after);
    ck_assert_uint_eq(after.attrs.backoff_base_ms,
                      before.attrs.backoff_base_ms);
    ck_assert_uint_eq(after.attrs.backoff_cap_ms, before.attrs.backoff_cap_ms);
    ck_assert_int_eq(after.attrs.no_backoff, before.attrs.no_backoff);
    /* Declaring it again as before is still "the same attributes". */
    pq_check_ok(c, protoq_queue_create(c, "cq", NULL));
    protoq_close(c);
}
END_TEST

struct errs {
    int n;
    int code;
    uint64_t rid;
};

static void
on_async_error(void *arg, protoq_client *c, int code, const char *msg,
               uint64_t rid)
{
    struct errs *e = arg;

    (void)c;
    (void)msg;
    e->n++;
    e->code = code;
    e->rid = rid;
}

START_TEST(test_ack_of_unknown_token_is_stale_delivery)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct errs e = {0, 0, 0};
    int64_t deadline;

    protoq_set_error_cb(c, on_async_error, &e);
    pq_check_ok(c, protoq_ack(c, 123456789, 1));
    deadline = now_ms_mono() + 5000;
    while (e.n == 0 && now_ms_mono() < deadline) {
        ck_assert_int_ge(protoq_poll(c, 100), 0);
    }
    ck_assert_int_eq(e.n, 1);
    ck_assert_int_eq(e.code, PROTOQ_CODE_STALE_DELIVERY);
    ck_assert_uint_ne(e.rid, 0);
    ck_assert_uint_eq(protoq_async_errors(c), 1);
    pq_check_remote(c, protoq_ack_sync(c, 987654321, 1),
                    PROTOQ_CODE_STALE_DELIVERY);
    pq_check_remote(c, protoq_nack_sync(c, 987654321, 1, 0, false, NULL),
                    PROTOQ_CODE_STALE_DELIVERY);
    protoq_close(c);
}
END_TEST

START_TEST(test_ack_of_stale_token_is_stale_delivery_and_changes_nothing)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_info qi;
    uint64_t id = 0;
    struct coll k;

    create_fast_retry_queue(c, "sq");
    pub_str(c, "sq", "x", 0, &id);
    coll_init(&k, 8, false);
    pq_check_ok(c, protoq_subscribe(c, "sq", 1, NULL, 0, on_collect, &k, NULL));
    ck_assert_uint_eq(poll_until(c, &k, 1, 5000), 1);
    /* Wrong attempt: not the current token. */
    pq_check_remote(c, protoq_ack_sync(c, id, 2), PROTOQ_CODE_STALE_DELIVERY);
    stat_q(c, "sq", &qi);
    ck_assert_uint_eq(qi.inflight, 1);
    ck_assert_uint_eq(qi.acked, 0);
    /* Nack it; the attempt-1 token is now stale. */
    pq_check_ok(c, protoq_nack_sync(c, id, 1, 0, false, NULL));
    ck_assert_uint_eq(poll_until(c, &k, 2, 5000), 2);
    ck_assert_uint_eq(k.v[1].attempt, 2);
    pq_check_remote(c, protoq_ack_sync(c, id, 1), PROTOQ_CODE_STALE_DELIVERY);
    pq_check_ok(c, protoq_ack_sync(c, id, 2));
    /* Acked twice: the second is stale too. */
    pq_check_remote(c, protoq_ack_sync(c, id, 2), PROTOQ_CODE_STALE_DELIVERY);
    stat_q(c, "sq", &qi);
    ck_assert_uint_eq(qi.acked, 1);
    ck_assert_uint_eq(qi.inflight + qi.ready, 0);
    coll_free(&k);
    protoq_close(c);
}
END_TEST

/* ============================================================= priority */

START_TEST(test_higher_priority_first_fifo_within_level)
{
    static const struct {
        const char *s;
        uint32_t prio;
    } in[] = {
        {"a0", 0}, {"b0", 5}, {"a1", 0}, {"c0", 9}, {"b1", 5},
        {"a2", 0}, {"c1", 9}, {"b2", 5}, {"d0", 1},
    };
    static const char *const want[] = {"c0", "c1", "b0", "b1", "b2",
                                       "d0", "a0", "a1", "a2"};
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct coll k;

    pq_check_ok(c, protoq_queue_create(c, "prio", NULL));
    for (size_t i = 0; i < sizeof(in) / sizeof(in[0]); i++) {
        pub_str(c, "prio", in[i].s, in[i].prio, NULL);
    }
    coll_init(&k, 16, true);
    pq_check_ok(
        c, protoq_subscribe(c, "prio", 100, NULL, 0, on_collect, &k, NULL));
    poll_until(c, &k, 9, 5000);
    poll_for(c, 200);
    ck_assert_uint_eq(k.n, 9);
    for (size_t i = 0; i < 9; i++) {
        ck_assert_msg(strcmp(k.v[i].payload, want[i]) == 0,
                      "delivery %zu is %s, want %s", i, k.v[i].payload,
                      want[i]);
        ck_assert_uint_eq(k.v[i].priority, k.v[i].payload[0] == 'c'   ? 9
                                           : k.v[i].payload[0] == 'b' ? 5
                                           : k.v[i].payload[0] == 'd' ? 1
                                                                      : 0);
    }
    coll_free(&k);
    protoq_close(c);
}
END_TEST

START_TEST(test_priority_over_9_is_bad_request)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_message m;
    struct protoq_queue_info qi;

    pq_check_ok(c, protoq_queue_create(c, "prio", NULL));
    memset(&m, 0, sizeof(m));
    m.payload = "x";
    m.len = 1;
    m.priority = 10;
    pq_check_remote(c, protoq_publish(c, "prio", &m, NULL),
                    PROTOQ_CODE_BAD_REQUEST);
    stat_q(c, "prio", &qi);
    ck_assert_uint_eq(qi.ready, 0);
    protoq_close(c);
}
END_TEST

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

/* =========================================================== durability */

START_TEST(test_restart_keeps_confirmed_messages_in_order)
{
    enum { N = 1000 };
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a;
    struct protoq_queue_info qi;
    uint64_t *ids = calloc(N, sizeof(*ids));
    uint64_t newid = 0;

    ck_assert_ptr_nonnull(ids);
    memset(&a, 0, sizeof(a));
    a.max_attempts = 7;
    a.ack_timeout_ms = 12000;
    a.no_backoff = true;
    pq_check_ok(c, protoq_queue_create(c, "dur", &a));
    publish_seq(c, "dur", N, ids);
    protoq_close(c);

    ck_assert_int_eq(srv_restart(&g_srv), 0);
    c = pq_connect_or_fail(&g_srv);
    stat_q(c, "dur", &qi);
    ck_assert_uint_eq(qi.ready, N);
    ck_assert_uint_eq(qi.inflight, 0);
    ck_assert_uint_eq(qi.attrs.max_attempts, 7);
    ck_assert_uint_eq(qi.attrs.ack_timeout_ms, 12000);
    ck_assert(qi.attrs.no_backoff);
    consume_seq_in_order("dur", N, 200, 1, 20000);
    /* Ids are never reused, restarts included. */
    pub_str(c, "dur", "after", 0, &newid);
    for (size_t i = 0; i < N; i++) {
        ck_assert_uint_ne(newid, ids[i]);
    }
    free(ids);
    protoq_close(c);
}
END_TEST

START_TEST(test_restart_forgets_acked_messages)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_info qi;
    struct coll k;
    unsigned seen = 0;

    pq_check_ok(c, protoq_queue_create(c, "acked", NULL));
    publish_seq(c, "acked", 10, NULL);
    coll_init(&k, 16, false);
    pq_check_ok(c,
                protoq_subscribe(c, "acked", 5, NULL, 0, on_collect, &k, NULL));
    ck_assert_uint_eq(poll_until(c, &k, 5, 5000), 5);
    for (size_t i = 0; i < 5; i++) {
        pq_check_ok(c, protoq_ack_sync(c, k.v[i].id, k.v[i].attempt));
    }
    protoq_close(c);
    coll_free(&k);

    ck_assert_int_eq(srv_restart(&g_srv), 0);
    c = pq_connect_or_fail(&g_srv);
    stat_q(c, "acked", &qi);
    /* Acking freed credit, so 6..10 were in flight when the connection
     * closed: a failed attempt each, back after the retry backoff. */
    ck_assert_uint_eq(qi.ready + qi.delayed, 5);
    ck_assert_uint_eq(qi.inflight, 0);
    coll_init(&k, 16, true);
    pq_check_ok(
        c, protoq_subscribe(c, "acked", 100, NULL, 0, on_collect, &k, NULL));
    poll_until(c, &k, 5, 10000);
    poll_for(c, 200);
    ck_assert_uint_eq(k.n, 5);
    /* Each retry delay has its own jitter, so any order of 6..10. */
    for (size_t i = 0; i < 5; i++) {
        unsigned long v = payload_num(&k.v[i]);

        ck_assert_msg(v >= 6 && v <= 10, "payload %lu came back", v);
        ck_assert_msg(!(seen & (1u << v)), "payload %lu came twice", v);
        seen |= 1u << v;
        ck_assert_uint_eq(k.v[i].attempt, 2);
    }
    coll_free(&k);
    protoq_close(c);
}
END_TEST

START_TEST(test_kill9_loses_no_confirmed_message)
{
    enum { N = 3000 };
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct pubset ps;
    struct coll k;
    unsigned char *seen = calloc(N + 1, 1);
    size_t confirmed = 0, missing = 0, first_missing = 0;
    unsigned long prev = 0;

    ck_assert_ptr_nonnull(seen);
    pq_check_ok(c, protoq_queue_create(c, "crash", NULL));
    pubset_init(&ps, c, N);
    pubset_send(&ps, "crash", 100000);
    pq_check_ok(c, protoq_flush(c));
    /* Kill it while confirms are still coming. */
    pq_check_ok(c, protoq_wait_confirms(c, N / 2, 30000));
    srv_kill9(&g_srv);
    /* Collect confirms that were already on the wire. */
    for (int i = 0; i < 50; i++) {
        if (protoq_poll(c, 20) < 0) {
            break;
        }
    }
    for (size_t i = 0; i < N; i++) {
        if (ps.r[i].err == PQ_OK) {
            confirmed++;
        }
    }
    ck_assert_uint_ge(confirmed, N / 2);
    protoq_close(c);

    ck_assert_int_eq(srv_launch(&g_srv), 0);
    c = pq_connect_or_fail(&g_srv);
    coll_init(&k, N, true);
    pq_check_ok(
        c, protoq_subscribe(c, "crash", 1000, NULL, 0, on_collect, &k, NULL));
    poll_until(c, &k, N, 3000);
    poll_for(c, 300);
    ck_assert_uint_eq(k.overflow, 0);
    ck_assert_uint_ge(k.n, confirmed);
    for (size_t i = 0; i < k.n; i++) {
        unsigned long v = payload_num(&k.v[i]);

        ck_assert_msg(v >= 1 && v <= N, "bad payload \"%s\"", k.v[i].payload);
        ck_assert_msg(!seen[v], "payload %lu delivered twice", v);
        ck_assert_msg(v > prev, "payload %lu after %lu: out of order", v, prev);
        ck_assert_uint_eq(k.v[i].id, ps.r[v - 1].err == PQ_OK ? ps.r[v - 1].id
                                                              : k.v[i].id);
        seen[v] = 1;
        prev = v;
    }
    for (size_t i = 0; i < N; i++) {
        if (ps.r[i].err == PQ_OK && !seen[i + 1]) {
            if (missing++ == 0) {
                first_missing = i + 1;
            }
        }
    }
    ck_assert_msg(missing == 0,
                  "%zu confirmed messages lost by kill -9 (first: %zu)",
                  missing, first_missing);
    free(seen);
    coll_free(&k);
    pubset_free(&ps);
    protoq_close(c);
}
END_TEST

START_TEST(test_kill9_after_all_confirmed_keeps_all_in_order)
{
    enum { N = 1000 };
    protoq_client *c = pq_connect_or_fail(&g_srv);

    pq_check_ok(c, protoq_queue_create(c, "k9", NULL));
    publish_seq(c, "k9", N, NULL);
    protoq_close(c);
    srv_kill9(&g_srv);
    ck_assert_int_eq(srv_launch(&g_srv), 0);
    consume_seq_in_order("k9", N, 100, 1, 20000);
}
END_TEST

START_TEST(test_queues_survive_restart_and_deleted_ones_stay_deleted)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_info *list = NULL;
    struct protoq_queue_info qi;
    size_t n = 0;

    pq_check_ok(c, protoq_queue_create(c, "stays", NULL));
    pq_check_ok(c, protoq_queue_create(c, "goes", NULL));
    pub_str(c, "goes", "x", 0, NULL);
    pub_str(c, "stays", "y", 0, NULL);
    pq_check_ok(c, protoq_queue_delete(c, "goes"));
    protoq_close(c);
    srv_kill9(&g_srv);
    ck_assert_int_eq(srv_launch(&g_srv), 0);
    c = pq_connect_or_fail(&g_srv);
    pq_check_ok(c, protoq_queue_list(c, &list, &n));
    ck_assert_uint_eq(n, 1);
    ck_assert_str_eq(list[0].name, "stays");
    protoq_queue_list_free(list, n);
    stat_q(c, "stays", &qi);
    ck_assert_uint_eq(qi.ready, 1);
    protoq_close(c);
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

/* ================================================================ suite */

static TCase *
tcase(Suite *s, const char *name, int timeout)
{
    TCase *tc = tcase_create(name);

    tcase_add_checked_fixture(tc, setup_server, teardown_server);
    tcase_set_timeout(tc, timeout);
    suite_add_tcase(s, tc);
    return tc;
}

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

    tc = tcase(s, "queue_admin", 30);
    tcase_add_test(tc, test_queue_create_again_with_same_attrs_is_ok);
    tcase_add_test(tc, test_queue_create_with_other_attrs_is_queue_exists);
    tcase_add_test(tc, test_queue_defaults_are_filled_in);
    tcase_add_test(tc, test_invalid_queue_names_are_bad_request);
    tcase_add_test(tc,
                   test_empty_and_overlong_names_on_the_wire_are_bad_request);
    tcase_add_test(tc, test_queue_list_shows_every_queue);
    tcase_add_test(tc, test_queue_stat_counts_ready_inflight_acked);
    tcase_add_test(tc, test_queue_purge_counts_ready_and_keeps_inflight);
    tcase_add_test(tc, test_queue_delete_removes_queue_and_messages);
    tcase_add_test(tc, test_ops_on_missing_queue_are_queue_not_found);

    tc = tcase(s, "walkthrough", 180);
    tcase_add_test(tc, test_100k_pipelined_publishes_consumed_in_order);
    tcase_add_test(tc, test_cli_walkthrough_pub_lines_then_consume);
    tcase_add_test(tc, test_cli_exit_codes_usage_is_2_errors_are_1);

    tc = tcase(s, "batch", 30);
    tcase_add_test(tc, test_batch_naming_missing_queue_stores_nothing);
    tcase_add_test(tc, test_batch_with_one_oversized_message_stores_nothing);
    tcase_add_test(tc, test_batch_across_queues_stores_all_in_order);
    tcase_add_test(tc, test_batch_over_max_batch_is_bad_request);

    tc = tcase(s, "consumers", 30);
    tcase_add_test(tc, test_two_consumers_share_a_queue_round_robin);
    tcase_add_test(tc, test_prefetch_credit_is_respected);

    tc = tcase_create("redelivery_config");
    tcase_add_checked_fixture(tc, setup_server_fast_retry,
                              teardown_server_conf);
    tcase_set_timeout(tc, 30);
    suite_add_tcase(s, tc);
    tcase_add_test(tc, test_broker_default_backoff_0_retries_at_once);
    tcase_add_test(tc, test_queue_attrs_from_backoff_0_default_survive_restart);

    tc = tcase(s, "redelivery", 30);
    tcase_add_test(tc,
                   test_disconnect_requeues_unacked_to_front_with_attempt_2);
    tcase_add_test(tc, test_nack_requeues_with_attempt_2);
    tcase_add_test(tc, test_nack_past_max_attempts_drops_without_dead_letter);
    tcase_add_test(tc, test_ack_of_unknown_token_is_stale_delivery);
    tcase_add_test(
        tc, test_ack_of_stale_token_is_stale_delivery_and_changes_nothing);

    tc = tcase(s, "priority", 30);
    tcase_add_test(tc, test_higher_priority_first_fifo_within_level);
    tcase_add_test(tc, test_priority_over_9_is_bad_request);

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

    tc = tcase(s, "durability", 60);
    tcase_add_test(tc, test_restart_keeps_confirmed_messages_in_order);
    tcase_add_test(tc, test_restart_forgets_acked_messages);
    tcase_add_test(tc, test_kill9_loses_no_confirmed_message);
    tcase_add_test(tc, test_kill9_after_all_confirmed_keeps_all_in_order);
    tcase_add_test(tc,
                   test_queues_survive_restart_and_deleted_ones_stay_deleted);

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
