/*
 * server_fixture.c: see server_fixture.h.
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

struct srv g_srv;
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
char g_conf[64];
static const char *g_retry_args[3];

void
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

void
teardown_server_conf(void)
{
    if (g_conf[0] != '\0') {
        unlink(g_conf);
        g_conf[0] = '\0';
    }
    teardown_server();
}

void
sleep_ms(int ms)
{
    struct timespec ts = {.tv_sec = ms / 1000,
                          .tv_nsec = (long)(ms % 1000) * 1000000L};

    nanosleep(&ts, NULL);
}

void
coll_init(struct coll *k, size_t cap, bool ack)
{
    memset(k, 0, sizeof(*k));
    k->v = calloc(cap, sizeof(*k->v));
    ck_assert_ptr_nonnull(k->v);
    k->cap = cap;
    k->ack = ack;
}

void
coll_free(struct coll *k)
{
    free(k->v);
    k->v = NULL;
}

void
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
size_t
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
void
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

void
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

void
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

void
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

void
pubset_free(struct pubset *ps)
{
    free(ps->r);
    ps->r = NULL;
}

/*
 * Publish "1".."n" (payload i+1 for record i) to q, pipelined, keeping at
 * most window unconfirmed. Does not wait for the last confirms.
 */
void
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
void
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

void
stat_q(protoq_client *c, const char *q, struct protoq_queue_info *qi)
{
    pq_check_ok(c, protoq_queue_stat(c, q, qi));
}

/* Payload of g as a number, or 0 when it is not one. */
unsigned long
payload_num(const struct got *g)
{
    char *end;
    unsigned long v = strtoul(g->payload, &end, 10);

    return *end == '\0' && g->len == strlen(g->payload) ? v : 0;
}

/* Consume want messages from q on a fresh connection, acking each; checks
 * payloads are exactly "1".."want" in order with attempt == attempt. */
void
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
void
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

uint8_t *
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

uint8_t *
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

uint8_t *
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

void
send_all(int fd, const void *buf, size_t len)
{
    ck_assert_msg(raw_send(fd, buf, len) == 0, "raw_send: %s", strerror(errno));
}

/* Read one frame and check its kind and request id. Returns it (the
 * caller frees it). */
Protoq__Frame *
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
void
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
int
raw_ready(void)
{
    int fd = raw_connect(g_srv.port);

    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(raw_hello(fd, RAW_TIMEOUT_MS), 0);
    return fd;
}

/* -------------------------------------------------------------- queues */

/* A queue whose failed attempts are ready again at once (no_backoff), so
 * redelivery order is exact. */
void
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

/* ------------------------------------------------------------- suites */

TCase *
tcase(Suite *s, const char *name, int timeout)
{
    TCase *tc = tcase_create(name);

    tcase_add_checked_fixture(tc, setup_server, teardown_server);
    tcase_set_timeout(tc, timeout);
    suite_add_tcase(s, tc);
    return tc;
}
