/*
 * check_auth.c: authentication, permissions and delivery ownership against
 * a real protoqd on loopback (issue 12): a broker with an auth_file refuses
 * anonymous and wrong tokens (UNAUTHORIZED, then close), answers FORBIDDEN
 * outside a token's permissions and keeps the connection, lists only the
 * queues a token may see, lets only the holder of a delivery (or a manage
 * token) settle it, refuses a cancel without its queue, and re-reads the
 * tokens on SIGHUP. Protected mode: no auth_file on a non-loopback address
 * is refused with exit status 78 unless allow_anonymous is yes.
 */
#include <check.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "testutil.h"

/* Tokens of the test broker; the file holds their SHA-256, made with
 * protoqd --hash-token (so that path is tested too). */
#define ADMIN_TOKEN "root-Token-1"
#define WORKER_TOKEN "worker-Token-2"
#define PRODUCER_TOKEN "producer-Token-3"
#define MANAGER_TOKEN "manager-Token-4"
#define LATE_TOKEN "late-Token-5"

static struct srv g_srv;
static struct test_conf g_conf;
static char g_tokdir[64];
static char g_tokens[200];
static const char *g_args[4];

/* protoqd --hash-token on token: the hex hash, or fails the test. */
static void
hash_token(const char *token, char hex[65])
{
    char cmd[600], out[400];
    FILE *p;
    size_t n;

    snprintf(cmd, sizeof(cmd), "printf '%%s\\n' '%s' | '%s' --hash-token",
             token, srv_binary());
    p = popen(cmd, "r");
    ck_assert_ptr_nonnull(p);
    n = fread(out, 1, sizeof(out) - 1, p);
    out[n] = '\0';
    ck_assert_int_eq(pclose(p), 0);
    ck_assert_msg(n > 65 && out[64] == '\n', "--hash-token printed \"%s\"",
                  out);
    memcpy(hex, out, 64);
    hex[64] = '\0';
    ck_assert_msg(strstr(out + 65, hex) != NULL, "no example line: %s", out);
}

/* Write the token file: the four standard tokens, plus LATE when late. */
static void
write_tokens(bool late, bool broken)
{
    char h[5][65];
    FILE *f = fopen(g_tokens, "w");

    ck_assert_ptr_nonnull(f);
    hash_token(ADMIN_TOKEN, h[0]);
    hash_token(WORKER_TOKEN, h[1]);
    hash_token(PRODUCER_TOKEN, h[2]);
    hash_token(MANAGER_TOKEN, h[3]);
    hash_token(LATE_TOKEN, h[4]);
    fprintf(f,
            "# test tokens\n"
            "root %s admin\n"
            "worker %s consume:jobs*\n"
            "producer %s publish:jobs*\n"
            "manager %s manage:jobs*\n",
            h[0], h[1], h[2], h[3]);
    if (late) {
        fprintf(f, "late %s consume:jobs\n", h[4]);
    }
    if (broken) {
        fprintf(f, "broken %s read:*\n", h[4]);
    }
    ck_assert_int_eq(fclose(f), 0);
}

static void
setup(void)
{
    char text[400];

    snprintf(g_tokdir, sizeof(g_tokdir), "/tmp/check_auth_tok.XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(g_tokdir));
    snprintf(g_tokens, sizeof(g_tokens), "%s/tokens", g_tokdir);
    write_tokens(false, false);
    snprintf(text, sizeof(text), "auth_file %s\nfsync never\n", g_tokens);
    ck_assert_int_eq(test_conf_write(&g_conf, text), 0);
    g_args[0] = "-c";
    g_args[1] = g_conf.path;
    g_args[2] = NULL;
    ck_assert_msg(srv_start(&g_srv, g_args) == 0, "protoqd did not start");
}

static void
teardown(void)
{
    /* a clean stop exits 0; under SAN=1 a leak report would not */
    int rc = srv_stop(&g_srv);

    srv_cleanup(&g_srv);
    unlink(g_tokens);
    rmdir(g_tokdir);
    test_conf_remove(&g_conf);
    ck_assert_int_eq(rc, 0);
}

/* Connect with token (NULL = none); *rc gets protoq_connect's result. */
static protoq_client *
connect_as(const char *token, int *rc)
{
    struct protoq_opts o;
    protoq_client *c = NULL;

    memset(&o, 0, sizeof(o));
    o.client_name = "check_auth";
    o.auth_token = token;
    o.io_timeout_ms = 10000;
    *rc = protoq_connect(g_srv.addr, &o, &c);
    return c;
}

static protoq_client *
connect_ok(const char *token)
{
    int rc;
    protoq_client *c = connect_as(token, &rc);

    ck_assert_msg(rc == PQ_OK, "connect with %s: %s: %s", token,
                  pq_strerror(rc), protoq_errmsg(c));
    return c;
}

/* Publish one small message to queue through c; its id. */
static uint64_t
publish_one(protoq_client *c, const char *queue)
{
    struct protoq_message m;
    uint64_t id = 0;

    memset(&m, 0, sizeof(m));
    m.payload = "job";
    m.len = 3;
    pq_check_ok(c, protoq_publish(c, queue, &m, &id));
    return id;
}

/* ---- raw frames (what the library would not send) ---- */

/* Hello with token on a new raw connection; the broker's answer to *out. */
static int
raw_hello_on(uint16_t port, const char *token, Protoq__Frame **out)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Hello h = PROTOQ__HELLO__INIT;
    int fd = raw_connect(port);
    uint8_t *buf;
    size_t len;

    ck_assert_int_ge(fd, 0);
    h.protocol_version = PROTOQ_PROTOCOL_VERSION;
    h.client_name = (char *)"raw";
    h.auth_token = (char *)(token ? token : "");
    f.request_id = 1;
    f.kind_case = PROTOQ__FRAME__KIND_HELLO;
    f.hello = &h;
    buf = raw_pack(&f, &len);
    ck_assert_ptr_nonnull(buf);
    ck_assert_int_eq(raw_send(fd, buf, len), 0);
    free(buf);
    ck_assert_int_eq(raw_read_frame(fd, 5000, 1u << 20, out), 0);
    return fd;
}

static int
raw_hello_as(const char *token, Protoq__Frame **out)
{
    return raw_hello_on(g_srv.port, token, out);
}

/* Send f on fd; the Error code of the answer (0 for a non-Error). */
static int
raw_request_code(int fd, Protoq__Frame *f)
{
    Protoq__Frame *r = NULL;
    uint8_t *buf;
    size_t len;
    int code;

    buf = raw_pack(f, &len);
    ck_assert_ptr_nonnull(buf);
    ck_assert_int_eq(raw_send(fd, buf, len), 0);
    free(buf);
    ck_assert_int_eq(raw_read_frame(fd, 5000, 1u << 20, &r), 0);
    ck_assert_uint_eq(r->request_id, f->request_id);
    code = r->kind_case == PROTOQ__FRAME__KIND_ERROR ? (int)r->error->code : 0;
    frame_free(r);
    return code;
}

/* ---- authentication ---- */

START_TEST(test_no_or_wrong_token_is_unauthorized_and_closed)
{
    static const char *const bad[] = {NULL, "", "root-Token-", "ROOT-TOKEN-1",
                                      "root-Token-1\n"};
    protoq_client *c;
    Protoq__Frame *r = NULL;
    int rc, fd;

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        c = connect_as(bad[i], &rc);
        ck_assert_msg(rc == PQ_EREMOTE &&
                          protoq_last_error_code(c) == PROTOQ_CODE_UNAUTHORIZED,
                      "token %zu: %s (%s)", i, pq_strerror(rc),
                      protoq_errmsg(c));
        protoq_close(c);
    }
    /* on the wire: an Error UNAUTHORIZED answering Hello, then EOF */
    fd = raw_hello_as("guess", &r);
    ck_assert_int_eq(r->kind_case, PROTOQ__FRAME__KIND_ERROR);
    ck_assert_int_eq(r->error->code, PROTOQ__ERROR_CODE__UNAUTHORIZED);
    ck_assert_uint_eq(r->request_id, 1);
    frame_free(r);
    ck_assert(raw_wait_eof(fd, 5000));
    close(fd);

    /* and the right token gets in */
    c = connect_ok(ADMIN_TOKEN);
    pq_check_ok(c, protoq_queue_create(c, "jobs", NULL));
    protoq_close(c);
}
END_TEST

/* ---- permissions ---- */

static void
noop_cb(void *arg, protoq_client *c, const struct protoq_delivery *d)
{
    (void)arg;
    (void)c;
    (void)d;
}

START_TEST(test_consume_token_cannot_delete_purge_publish_or_create)
{
    protoq_client *admin = connect_ok(ADMIN_TOKEN);
    protoq_client *w = connect_ok(WORKER_TOKEN);
    struct protoq_message m;
    uint64_t id = 0, purged = 0;

    pq_check_ok(admin, protoq_queue_create(admin, "jobs", NULL));
    id = publish_one(admin, "jobs");
    memset(&m, 0, sizeof(m));

    pq_check_remote(w, protoq_queue_delete(w, "jobs"), PROTOQ_CODE_FORBIDDEN);
    ck_assert_msg(strstr(protoq_errmsg(w), "manage") != NULL, "%s",
                  protoq_errmsg(w));
    pq_check_remote(w, protoq_queue_purge(w, "jobs", &purged),
                    PROTOQ_CODE_FORBIDDEN);
    pq_check_remote(w, protoq_publish(w, "jobs", &m, &id),
                    PROTOQ_CODE_FORBIDDEN);
    ck_assert_msg(strstr(protoq_errmsg(w), "publish") != NULL, "%s",
                  protoq_errmsg(w));
    pq_check_remote(w, protoq_queue_create(w, "jobs2", NULL),
                    PROTOQ_CODE_FORBIDDEN);
    /* outside its glob it may not even subscribe; whether the queue exists
     * is not said: the same answer for one that does not */
    pq_check_ok(admin, protoq_queue_create(admin, "secret", NULL));
    pq_check_remote(
        w, protoq_subscribe(w, "secret", 1, NULL, 0, noop_cb, NULL, NULL),
        PROTOQ_CODE_FORBIDDEN);
    pq_check_remote(
        w, protoq_subscribe(w, "nosuch", 1, NULL, 0, noop_cb, NULL, NULL),
        PROTOQ_CODE_FORBIDDEN);

    /* the connection stays, and what is allowed still works; nothing was
     * deleted, purged or published */
    struct protoq_queue_info info;
    pq_check_ok(w, protoq_queue_stat(w, "jobs", &info));
    ck_assert_uint_eq(info.ready, 1);
    pq_check_ok(admin, protoq_queue_stat(admin, "jobs", &info));
    ck_assert_uint_eq(info.ready, 1);
    protoq_close(w);
    protoq_close(admin);
}
END_TEST

START_TEST(test_queue_list_shows_only_permitted_queues)
{
    protoq_client *admin = connect_ok(ADMIN_TOKEN);
    protoq_client *p = connect_ok(PRODUCER_TOKEN);
    struct protoq_queue_info *qs = NULL, info;
    size_t n = 0;

    pq_check_ok(admin, protoq_queue_create(admin, "jobs", NULL));
    pq_check_ok(admin, protoq_queue_create(admin, "jobs.gpu", NULL));
    pq_check_ok(admin, protoq_queue_create(admin, "secret", NULL));
    pq_check_ok(admin, protoq_queue_create(admin, "payroll", NULL));

    pq_check_ok(admin, protoq_queue_list(admin, &qs, &n));
    ck_assert_uint_eq(n, 4);
    protoq_queue_list_free(qs, n);

    pq_check_ok(p, protoq_queue_list(p, &qs, &n));
    ck_assert_uint_eq(n, 2);
    for (size_t i = 0; i < n; i++) {
        ck_assert_msg(strncmp(qs[i].name, "jobs", 4) == 0, "listed %s",
                      qs[i].name);
    }
    protoq_queue_list_free(qs, n);
    pq_check_remote(p, protoq_queue_stat(p, "secret", &info),
                    PROTOQ_CODE_FORBIDDEN);
    protoq_close(p);
    protoq_close(admin);
}
END_TEST

/* ---- delivery ownership ---- */

struct got {
    uint64_t id;
    uint32_t attempt;
    int n;
};

static void
got_cb(void *arg, protoq_client *c, const struct protoq_delivery *d)
{
    struct got *g = arg;

    (void)c;
    g->id = d->message_id;
    g->attempt = d->attempt;
    g->n++;
}

/* Subscribe c to jobs and wait for one delivery into *g. */
static void
take_one(protoq_client *c, struct got *g)
{
    int64_t until = now_ms_mono() + 5000;

    memset(g, 0, sizeof(*g));
    pq_check_ok(c, protoq_subscribe(c, "jobs", 1, NULL, 0, got_cb, g, NULL));
    while (g->n == 0 && now_ms_mono() < until) {
        ck_assert_int_ge(protoq_poll(c, 100), 0);
    }
    ck_assert_int_eq(g->n, 1);
}

/* Every way for other to settle g's delivery is STALE_DELIVERY. */
static void
cannot_settle(protoq_client *other, const struct got *g)
{
    uint64_t lease = 0;

    pq_check_remote(
        other, protoq_touch(other, g->id, g->attempt, 3600000, NULL, &lease),
        PROTOQ_CODE_STALE_DELIVERY);
    pq_check_remote(other, protoq_ack_sync(other, g->id, g->attempt),
                    PROTOQ_CODE_STALE_DELIVERY);
    pq_check_remote(other,
                    protoq_nack_sync(other, g->id, g->attempt, 0, true, "x"),
                    PROTOQ_CODE_STALE_DELIVERY);
    pq_check_remote(other,
                    protoq_release(other, g->id, g->attempt,
                                   PROTOQ_RELEASE_UNSPECIFIED, NULL, true),
                    PROTOQ_CODE_STALE_DELIVERY);
    /* a non-existent id gets the very same answer */
    pq_check_remote(other, protoq_ack_sync(other, g->id + 1000, 1),
                    PROTOQ_CODE_STALE_DELIVERY);
}

START_TEST(test_other_connection_cannot_settle_a_delivery)
{
    protoq_client *admin = connect_ok(ADMIN_TOKEN);
    protoq_client *holder = connect_ok(WORKER_TOKEN);
    protoq_client *thief = connect_ok(WORKER_TOKEN); /* same token, too */
    protoq_client *prod = connect_ok(PRODUCER_TOKEN);
    struct protoq_queue_info info;
    struct got g;
    uint64_t id, lease = 0;

    pq_check_ok(admin, protoq_queue_create(admin, "jobs", NULL));
    id = publish_one(prod, "jobs");
    take_one(holder, &g);
    ck_assert_uint_eq(g.id, id);

    cannot_settle(thief, &g);
    cannot_settle(prod, &g);

    /* still in flight with its holder, which can touch and ack it */
    pq_check_ok(admin, protoq_queue_stat(admin, "jobs", &info));
    ck_assert_uint_eq(info.inflight, 1);
    ck_assert_uint_eq(info.acked, 0);
    pq_check_ok(holder,
                protoq_touch(holder, g.id, g.attempt, 60000, NULL, &lease));
    ck_assert_uint_gt(lease, 0);
    pq_check_ok(holder, protoq_ack_sync(holder, g.id, g.attempt));
    pq_check_ok(admin, protoq_queue_stat(admin, "jobs", &info));
    ck_assert_uint_eq(info.acked, 1);
    ck_assert_uint_eq(info.ready + info.inflight, 0);
    protoq_close(prod);
    protoq_close(thief);
    protoq_close(holder);
    protoq_close(admin);
}
END_TEST

START_TEST(test_manage_token_may_settle_others_deliveries)
{
    protoq_client *admin = connect_ok(ADMIN_TOKEN);
    protoq_client *holder = connect_ok(WORKER_TOKEN);
    protoq_client *mgr = connect_ok(MANAGER_TOKEN);
    struct protoq_queue_info info;
    struct got g;
    uint64_t id, lease = 0;

    pq_check_ok(mgr, protoq_queue_create(mgr, "jobs", NULL));
    id = publish_one(admin, "jobs");
    take_one(holder, &g);
    ck_assert_uint_eq(g.id, id);
    pq_check_ok(mgr, protoq_touch(mgr, g.id, g.attempt, 60000, NULL, &lease));
    pq_check_ok(admin, protoq_release(admin, g.id, g.attempt,
                                      PROTOQ_RELEASE_PREEMPTED, NULL, true));
    pq_check_ok(admin, protoq_queue_stat(admin, "jobs", &info));
    ck_assert_uint_eq(info.inflight + info.ready, 1);
    protoq_close(mgr);
    protoq_close(holder);
    protoq_close(admin);
}
END_TEST

/* ---- cancel ---- */

/* A Cancel of id with no queue name is refused BAD_REQUEST. */
static void
cancel_without_queue(uint16_t port, const char *token, uint64_t id)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT, *r = NULL;
    Protoq__Cancel cn = PROTOQ__CANCEL__INIT;
    int fd = raw_hello_on(port, token, &r);

    ck_assert_int_eq(r->kind_case, PROTOQ__FRAME__KIND_WELCOME);
    frame_free(r);
    cn.message_id = id;
    f.request_id = 7;
    f.kind_case = PROTOQ__FRAME__KIND_CANCEL;
    f.cancel = &cn;
    ck_assert_int_eq(raw_request_code(fd, &f), PROTOQ__ERROR_CODE__BAD_REQUEST);
    close(fd);
}

START_TEST(test_cancel_needs_queue_and_permission)
{
    protoq_client *admin = connect_ok(ADMIN_TOKEN);
    protoq_client *w = connect_ok(WORKER_TOKEN);
    protoq_client *p = connect_ok(PRODUCER_TOKEN);
    struct protoq_queue_info info;
    uint64_t secret_id, jobs_id;

    pq_check_ok(admin, protoq_queue_create(admin, "jobs", NULL));
    pq_check_ok(admin, protoq_queue_create(admin, "secret", NULL));
    secret_id = publish_one(admin, "secret");
    jobs_id = publish_one(admin, "jobs");

    /* no queue name: BAD_REQUEST, even for the admin */
    cancel_without_queue(g_srv.port, ADMIN_TOKEN, secret_id);

    /* a queue the token has nothing on: FORBIDDEN; publish only: too */
    pq_check_remote(w, protoq_cancel(w, "secret", secret_id),
                    PROTOQ_CODE_FORBIDDEN);
    pq_check_remote(p, protoq_cancel(p, "jobs", jobs_id),
                    PROTOQ_CODE_FORBIDDEN);
    /* its own queue with another queue's id: not found there */
    pq_check_remote(w, protoq_cancel(w, "jobs", secret_id),
                    PROTOQ_CODE_BAD_REQUEST);
    ck_assert_msg(strstr(protoq_errmsg(w), "no live message") != NULL, "%s",
                  protoq_errmsg(w));
    pq_check_ok(admin, protoq_queue_stat(admin, "secret", &info));
    ck_assert_uint_eq(info.ready, 1);

    /* and with both right, it cancels */
    pq_check_ok(w, protoq_cancel(w, "jobs", jobs_id));
    pq_check_ok(admin, protoq_queue_stat(admin, "jobs", &info));
    ck_assert_uint_eq(info.ready, 0);
    protoq_close(p);
    protoq_close(w);
    protoq_close(admin);
}
END_TEST

/* ---- SIGHUP ---- */

static bool
late_gets_in(void *arg)
{
    int rc;
    protoq_client *c = connect_as(LATE_TOKEN, &rc);

    (void)arg;
    protoq_close(c);
    return rc == PQ_OK;
}

static bool
late_refused(void *arg)
{
    int rc;
    protoq_client *c = connect_as(LATE_TOKEN, &rc);
    bool refused = rc == PQ_EREMOTE &&
                   protoq_last_error_code(c) == PROTOQ_CODE_UNAUTHORIZED;

    (void)arg;
    protoq_close(c);
    return refused;
}

static bool
nothing_in_flight(void *arg)
{
    struct protoq_queue_info info;

    return protoq_queue_stat(arg, "jobs", &info) == PQ_OK &&
           info.inflight == 0 && info.ready == 1;
}

static bool
log_says_kept(void *arg)
{
    (void)arg;
    return srv_log_has(&g_srv, "the previous 5 tokens stay in force");
}

START_TEST(test_sighup_adds_and_removes_tokens)
{
    protoq_client *admin = connect_ok(ADMIN_TOKEN);
    protoq_client *late;
    struct protoq_queue_info info;
    struct got g;

    pq_check_ok(admin, protoq_queue_create(admin, "jobs", NULL));
    ck_assert(late_refused(NULL));

    write_tokens(true, false);
    ck_assert_int_eq(kill(g_srv.pid, SIGHUP), 0);
    ck_assert(wait_until(late_gets_in, NULL, 5000));
    late = connect_ok(LATE_TOKEN);
    pq_check_ok(late, protoq_queue_stat(late, "jobs", &info));

    /* a file with an error: refused as a whole, the tokens stay */
    write_tokens(false, true);
    ck_assert_int_eq(kill(g_srv.pid, SIGHUP), 0);
    ck_assert(wait_until(log_says_kept, NULL, 5000));
    ck_assert(late_gets_in(NULL));

    /* removed: no new connection, and the open one is closed at once:
     * its job goes back to the queue without it asking anything */
    publish_one(admin, "jobs");
    take_one(late, &g);
    pq_check_ok(admin, protoq_queue_stat(admin, "jobs", &info));
    ck_assert_uint_eq(info.inflight, 1);
    write_tokens(false, false);
    ck_assert_int_eq(kill(g_srv.pid, SIGHUP), 0);
    ck_assert(wait_until(late_refused, NULL, 5000));
    ck_assert(wait_until(nothing_in_flight, admin, 5000));
    ck_assert_int_ne(protoq_queue_stat(late, "jobs", &info), PQ_OK);

    /* the others were not disturbed */
    pq_check_ok(admin, protoq_queue_stat(admin, "jobs", &info));
    protoq_close(late);
    protoq_close(admin);
}
END_TEST

/* ---- the CLI ---- */

START_TEST(test_cli_sends_token_from_flag_or_environment)
{
    const char *bin = getenv("PROTOQ");
    char out[300], buf[2048];
    const char *with_flag[] = {bin,          "-s",    g_srv.addr, "-t",
                               WORKER_TOKEN, "queue", "ls",       NULL};
    const char *no_flag[] = {bin, "-s", g_srv.addr, "queue", "ls", NULL};
    const char *forbidden[] = {bin,     "-s", g_srv.addr, "-t", WORKER_TOKEN,
                               "queue", "rm", "jobs",     NULL};

    ck_assert_msg(bin != NULL && access(bin, X_OK) == 0,
                  "set PROTOQ to the protoq CLI");
    snprintf(out, sizeof(out), "%s/cli.out", g_tokdir);
    ck_assert_int_eq(prog_run(with_flag, out, 10000), 0);

    unsetenv("PROTOQ_TOKEN");
    ck_assert_int_eq(prog_run(no_flag, out, 10000), 1);
    ck_assert_ptr_nonnull(file_slurp(out, buf, sizeof(buf)));
    ck_assert_msg(strstr(buf, "UNAUTHORIZED") != NULL, "%s", buf);

    setenv("PROTOQ_TOKEN", WORKER_TOKEN, 1);
    ck_assert_int_eq(prog_run(no_flag, out, 10000), 0);
    ck_assert_int_eq(prog_run(forbidden, out, 10000), 1);
    ck_assert_ptr_nonnull(file_slurp(out, buf, sizeof(buf)));
    ck_assert_msg(strstr(buf, "FORBIDDEN") != NULL, "%s", buf);
    unsetenv("PROTOQ_TOKEN");
    unlink(out);
}
END_TEST

/* ---- without an auth_file ---- */

START_TEST(test_anonymous_broker_still_enforces_ownership)
{
    struct srv s;
    protoq_client *holder, *other;
    struct got g;
    uint64_t id;

    ck_assert_int_eq(srv_start(&s, NULL), 0);
    holder = pq_connect_or_fail(&s);
    other = pq_connect_or_fail(&s);
    pq_check_ok(holder, protoq_queue_create(holder, "jobs", NULL));
    id = publish_one(other, "jobs");
    take_one(holder, &g);
    ck_assert_uint_eq(g.id, id);
    cannot_settle(other, &g);
    cancel_without_queue(s.port, NULL, g.id);
    pq_check_ok(holder, protoq_ack_sync(holder, g.id, g.attempt));
    protoq_close(other);
    protoq_close(holder);
    ck_assert_int_eq(srv_stop(&s), 0);
    srv_cleanup(&s);
}
END_TEST

START_TEST(test_protected_mode_refuses_network_listen_without_tokens)
{
    char dir[] = "/tmp/check_auth_pm.XXXXXX", data[100], out[100], buf[2048];
    const char *argv[] = {srv_binary(), "--listen", "0.0.0.0:0",
                          "--data-dir", data,       "--check-config",
                          NULL,         NULL,       NULL};
    struct test_conf tc;

    ck_assert_ptr_nonnull(mkdtemp(dir));
    snprintf(data, sizeof(data), "%s/data", dir);
    snprintf(out, sizeof(out), "%s/out", dir);

    /* no auth_file, non-loopback: 78 and a message that says what to do */
    argv[5] = NULL;
    ck_assert_int_eq(prog_run(argv, out, 10000), 78);
    ck_assert_ptr_nonnull(file_slurp(out, buf, sizeof(buf)));
    ck_assert_msg(strstr(buf, "refusing to listen on 0.0.0.0:0") != NULL &&
                      strstr(buf, "allow_anonymous yes") != NULL,
                  "%s", buf);
    argv[2] = "[::]:0";
    ck_assert_int_eq(prog_run(argv, out, 10000), 78);

    /* --check-config says the same */
    argv[5] = "--check-config";
    ck_assert_int_eq(prog_run(argv, out, 10000), 78);

    /* allow_anonymous yes: accepted (and the start logs the risk) */
    ck_assert_int_eq(test_conf_write(&tc, "allow_anonymous yes\n"), 0);
    argv[6] = "-c";
    argv[7] = tc.path;
    ck_assert_int_eq(prog_run(argv, out, 10000), 0);
    ck_assert_ptr_nonnull(file_slurp(out, buf, sizeof(buf)));
    ck_assert_msg(strstr(buf, "allow_anonymous yes") != NULL, "%s", buf);
    test_conf_remove(&tc);

    /* a loopback address needs neither */
    argv[2] = "127.0.0.1:0";
    argv[6] = NULL;
    ck_assert_int_eq(prog_run(argv, out, 10000), 0);

    /* a bad auth_file stops the start with its line number */
    ck_assert_int_eq(test_conf_write(&tc, "auth_file /nonexistent/tokens\n"),
                     0);
    argv[2] = "0.0.0.0:0";
    argv[6] = "-c";
    argv[7] = tc.path;
    ck_assert_int_eq(prog_run(argv, out, 10000), 78);
    ck_assert_ptr_nonnull(file_slurp(out, buf, sizeof(buf)));
    ck_assert_msg(strstr(buf, "auth_file /nonexistent/tokens") != NULL, "%s",
                  buf);
    test_conf_remove(&tc);
    unlink(out);
    rmdir(data);
    rmdir(dir);
}
END_TEST

static Suite *
auth_suite(void)
{
    Suite *s = suite_create("auth");
    TCase *tc = tcase_create("tokens");

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_no_or_wrong_token_is_unauthorized_and_closed);
    tcase_add_test(tc,
                   test_consume_token_cannot_delete_purge_publish_or_create);
    tcase_add_test(tc, test_queue_list_shows_only_permitted_queues);
    tcase_add_test(tc, test_other_connection_cannot_settle_a_delivery);
    tcase_add_test(tc, test_manage_token_may_settle_others_deliveries);
    tcase_add_test(tc, test_cancel_needs_queue_and_permission);
    tcase_add_test(tc, test_sighup_adds_and_removes_tokens);
    tcase_add_test(tc, test_cli_sends_token_from_flag_or_environment);
    suite_add_tcase(s, tc);

    tc = tcase_create("anonymous");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_anonymous_broker_still_enforces_ownership);
    tcase_add_test(tc,
                   test_protected_mode_refuses_network_listen_without_tokens);
    suite_add_tcase(s, tc);
    return s;
}

int
main(void)
{
    SRunner *sr = srunner_create(auth_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
