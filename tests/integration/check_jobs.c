/*
 * check_jobs.c: job semantics against a real protoqd on loopback (issue 4).
 *
 * Every test gets a fresh broker in a fresh data dir (checked fixture), with
 * a small conf file that makes retry backoff short. Queue attributes
 * (ack_timeout_ms, max_attempts, dead_letter, ttl_ms, ...) keep every wait
 * well under a second or two. Every loop is bounded in count and time.
 *
 * Covered: redelivery after a disconnect and after a lease runs out, STALE
 * fencing of late acks and touches, nack until dead-lettered (with and
 * without a dead-letter queue), long jobs that keep touching, release with
 * progress, delay, priority, TTL, max_length, max_bytes, idempotency keys,
 * cancel, the state that must survive a restart (SIGTERM and kill -9), and
 * the CLI driving retries from a shell.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "testutil.h"

/* ------------------------------------------------------------ fixture */

static struct srv g_srv;
static char g_conf_dir[64];
static char g_conf[128];
static const char *const g_args[] = {"-c", g_conf, NULL};

static const char CONF_TEXT[] =
    "# check_jobs: fast retries so redelivery tests stay short\n"
    "backoff_base_ms 10\n"
    "backoff_cap_ms 40\n"
    "heartbeat_ms 1000\n"
    "heartbeat_timeout_ms 5000\n";

/* write_conf: the conf file shared by every test of this program (written
 * once by main, removed at its end, so a failed test leaks nothing). */
static int
write_conf(void)
{
    FILE *f;

    snprintf(g_conf_dir, sizeof(g_conf_dir), "/tmp/protoq-jobsconf.XXXXXX");
    if (mkdtemp(g_conf_dir) == NULL) {
        perror("mkdtemp");
        return -1;
    }
    snprintf(g_conf, sizeof(g_conf), "%s/protoqd.conf", g_conf_dir);
    f = fopen(g_conf, "w");
    if (f == NULL) {
        perror(g_conf);
        return -1;
    }
    fputs(CONF_TEXT, f);
    return fclose(f) == 0 ? 0 : -1;
}

static void
remove_conf(void)
{
    unlink(g_conf);
    rmdir(g_conf_dir);
}

static void
setup(void)
{
    ck_assert_msg(srv_start(&g_srv, g_args) == 0,
                  "protoqd did not start (PROTOQD=%s)",
                  getenv("PROTOQD") ? getenv("PROTOQD") : "(unset)");
}

static void
teardown(void)
{
    srv_cleanup(&g_srv);
}

/* bounce: restart the broker on the same data dir. mode 0: orderly
 * (SIGTERM, srv_restart); mode 1: kill -9 then launch. Every client handle
 * is dead afterwards. */
static void
bounce(int mode)
{
    if (mode == 0) {
        ck_assert_msg(srv_restart(&g_srv) == 0, "restart after SIGTERM failed");
    } else {
        srv_kill9(&g_srv);
        ck_assert_msg(srv_launch(&g_srv) == 0, "launch after kill -9 failed");
    }
}

static const char *
mode_name(int mode)
{
    return mode == 0 ? "SIGTERM+restart" : "kill-9+launch";
}

static void
sleep_ms(int ms)
{
    poll(NULL, 0, ms);
}

/* ------------------------------------------------------------ helpers */

/* attrs_fast: attributes with a short backoff, everything else default. */
static struct protoq_queue_attrs
attrs_fast(void)
{
    struct protoq_queue_attrs a;

    memset(&a, 0, sizeof(a));
    a.backoff_base_ms = 10;
    a.backoff_cap_ms = 40;
    return a;
}

static void
mkq(protoq_client *c, const char *name, const struct protoq_queue_attrs *a)
{
    pq_check_ok(c, protoq_queue_create(c, name, a));
}

static uint64_t
pub(protoq_client *c, const char *q, const char *payload)
{
    struct protoq_message m;
    uint64_t id = 0;

    memset(&m, 0, sizeof(m));
    m.payload = payload;
    m.len = strlen(payload);
    pq_check_ok(c, protoq_publish(c, q, &m, &id));
    ck_assert_msg(id != 0, "publish returned message id 0");
    return id;
}

static uint64_t
pub_msg(protoq_client *c, const char *q, struct protoq_message *m,
        const char *payload)
{
    uint64_t id = 0;

    m->payload = payload;
    m->len = strlen(payload);
    pq_check_ok(c, protoq_publish(c, q, m, &id));
    ck_assert_msg(id != 0, "publish returned message id 0");
    return id;
}

static struct protoq_queue_info
qstat(protoq_client *c, const char *q)
{
    struct protoq_queue_info i;

    memset(&i, 0, sizeof(i));
    pq_check_ok(c, protoq_queue_stat(c, q, &i));
    return i;
}

static uint64_t
qtotal(const struct protoq_queue_info *i)
{
    return i->ready + i->delayed + i->inflight;
}

/* Which counter stat_wait waits for. */
enum stat_field {
    SF_READY,
    SF_DELAYED,
    SF_INFLIGHT,
    SF_TOTAL,
    SF_NACKED,
    SF_EXPIRED,
    SF_DEAD,
    SF_DROPPED,
    SF_ACKED
};

static uint64_t
stat_field(const struct protoq_queue_info *i, enum stat_field f)
{
    switch (f) {
    case SF_READY:
        return i->ready;
    case SF_DELAYED:
        return i->delayed;
    case SF_INFLIGHT:
        return i->inflight;
    case SF_TOTAL:
        return qtotal(i);
    case SF_NACKED:
        return i->nacked;
    case SF_EXPIRED:
        return i->expired;
    case SF_DEAD:
        return i->dead_lettered;
    case SF_DROPPED:
        return i->dropped;
    case SF_ACKED:
        return i->acked;
    }
    return UINT64_MAX;
}

/* stat_wait: poll QueueStat every 20 ms until field == want (up to
 * timeout_ms). Returns the last value seen. */
static uint64_t
stat_wait(protoq_client *c, const char *q, enum stat_field f, uint64_t want,
          int timeout_ms)
{
    int64_t deadline = now_ms_mono() + timeout_ms;
    uint64_t v = UINT64_MAX;
    int i;

    for (i = 0; i < 10000; i++) {
        struct protoq_queue_info st = qstat(c, q);

        v = stat_field(&st, f);
        if (v == want || now_ms_mono() >= deadline) {
            return v;
        }
        sleep_ms(20);
    }
    return v;
}

/* One delivery, copied out of the callback. */
enum { GOT_MAX_HDR = 12, GOT_RING = 64 };
struct got {
    uint64_t id;
    uint32_t attempt;
    uint32_t priority;
    uint64_t lease_ms;
    char payload[512];
    size_t len;
    size_t n_hdr;
    char hk[GOT_MAX_HDR][64];
    char hv[GOT_MAX_HDR][1100];
    bool has_progress;
    uint32_t percent;
    char ptext[256];
    char pckpt[256];
    int64_t at_ms; /* monotonic time of the callback */
};

/* A consumer: one handle, one subscription, a ring of deliveries. */
struct cons {
    protoq_client *c;
    uint64_t sub;
    struct got ring[GOT_RING];
    unsigned head, tail; /* tail - head = queued */
    unsigned overflow;
    unsigned n_cancel;
    char cancel_queue[PROTOQ_NAME_MAX + 1];
    uint64_t cancel_id;
    uint32_t cancel_attempt;
    unsigned n_err;
    int last_err_code;
};

static void
copy_str(char *dst, size_t cap, const char *src)
{
    snprintf(dst, cap, "%s", src ? src : "");
}

static void
on_deliver(void *arg, protoq_client *c, const struct protoq_delivery *d)
{
    struct cons *k = arg;
    struct got *g;
    size_t i;

    (void)c;
    if (k->tail - k->head >= GOT_RING) {
        k->overflow++;
        return;
    }
    g = &k->ring[k->tail % GOT_RING];
    memset(g, 0, sizeof(*g));
    g->id = d->message_id;
    g->attempt = d->attempt;
    g->priority = d->priority;
    g->lease_ms = d->lease_ms;
    g->len = d->len;
    memcpy(g->payload, d->payload,
           d->len < sizeof(g->payload) - 1 ? d->len : sizeof(g->payload) - 1);
    g->n_hdr = d->n_headers < GOT_MAX_HDR ? d->n_headers : GOT_MAX_HDR;
    for (i = 0; i < g->n_hdr; i++) {
        copy_str(g->hk[i], sizeof(g->hk[i]), d->headers[i].key);
        copy_str(g->hv[i], sizeof(g->hv[i]), d->headers[i].value);
    }
    g->has_progress = d->has_progress;
    if (d->has_progress) {
        g->percent = d->progress.percent;
        copy_str(g->ptext, sizeof(g->ptext), d->progress.text);
        copy_str(g->pckpt, sizeof(g->pckpt), d->progress.checkpoint);
    }
    g->at_ms = now_ms_mono();
    k->tail++;
}

static void
on_cancel(void *arg, protoq_client *c, const char *queue, uint64_t id,
          uint32_t attempt)
{
    struct cons *k = arg;

    (void)c;
    k->n_cancel++;
    copy_str(k->cancel_queue, sizeof(k->cancel_queue), queue);
    k->cancel_id = id;
    k->cancel_attempt = attempt;
}

static void
on_error(void *arg, protoq_client *c, int code, const char *message,
         uint64_t request_id)
{
    struct cons *k = arg;

    (void)c;
    (void)message;
    (void)request_id;
    k->n_err++;
    k->last_err_code = code;
}

/* cons_open: a new connection subscribed to q with prefetch. */
static struct cons *
cons_open(const char *q, uint32_t prefetch)
{
    struct cons *k = calloc(1, sizeof(*k));

    ck_assert_ptr_nonnull(k);
    k->c = pq_connect_or_fail(&g_srv);
    protoq_set_cancel_cb(k->c, on_cancel, k);
    protoq_set_error_cb(k->c, on_error, k);
    pq_check_ok(k->c, protoq_subscribe(k->c, q, prefetch, NULL, 0, on_deliver,
                                       k, &k->sub));
    return k;
}

static void
cons_close(struct cons *k)
{
    if (k != NULL) {
        protoq_close(k->c);
        free(k);
    }
}

/* cons_next: the next delivery within timeout_ms. false on timeout. */
static bool
cons_next(struct cons *k, int timeout_ms, struct got *out)
{
    int64_t deadline = now_ms_mono() + timeout_ms;
    int i;

    for (i = 0; i < 100000; i++) {
        int64_t left;
        int rc;

        if (k->tail != k->head) {
            *out = k->ring[k->head % GOT_RING];
            k->head++;
            return true;
        }
        left = deadline - now_ms_mono();
        if (left <= 0) {
            return false;
        }
        rc = protoq_poll(k->c, left < 50 ? (int)left : 50);
        ck_assert_msg(rc >= 0, "protoq_poll: %s: %s", pq_strerror(rc),
                      protoq_errmsg(k->c));
    }
    return false;
}

/* cons_must_get: the next delivery, failing the test if none comes. */
static void
cons_must_get(struct cons *k, int timeout_ms, struct got *out, const char *what)
{
    ck_assert_msg(cons_next(k, timeout_ms, out), "%s: no delivery within %d ms",
                  what, timeout_ms);
}

/* cons_none: assert that nothing is delivered for ms. */
static void
cons_none(struct cons *k, int ms, const char *what)
{
    struct got g;

    if (cons_next(k, ms, &g)) {
        ck_abort_msg("%s: unexpected delivery of id %" PRIu64 " attempt %u "
                     "payload \"%.*s\"",
                     what, g.id, g.attempt, (int)g.len, g.payload);
    }
}

/* pump: let a handle process what arrived (cancel requests, errors). */
static void
pump_for(struct cons *k, int ms)
{
    int64_t deadline = now_ms_mono() + ms;
    int i;

    for (i = 0; i < 10000 && now_ms_mono() < deadline; i++) {
        int rc = protoq_poll(k->c, 10);

        ck_assert_msg(rc >= 0, "protoq_poll: %s", pq_strerror(rc));
    }
}

static const char *
got_header(const struct got *g, const char *key)
{
    size_t i;

    for (i = 0; i < g->n_hdr; i++) {
        if (strcmp(g->hk[i], key) == 0) {
            return g->hv[i];
        }
    }
    return NULL;
}

static void
check_header(const struct got *g, const char *key, const char *want)
{
    const char *v = got_header(g, key);

    ck_assert_msg(v != NULL, "header %s missing", key);
    ck_assert_msg(strcmp(v, want) == 0, "header %s = \"%s\", want \"%s\"", key,
                  v, want);
}

static void
check_payload(const struct got *g, const char *want)
{
    ck_assert_msg(
        g->len == strlen(want) && memcmp(g->payload, want, g->len) == 0,
        "payload \"%.*s\", want \"%s\"", (int)g->len, g->payload, want);
}

/* ===================================================== failed attempts */

START_TEST(test_disconnect_mid_job_goes_to_other_consumer_attempt_2)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a = attrs_fast();
    struct cons *ca, *cb;
    struct got g;
    uint64_t id;

    a.ack_timeout_ms = 60000; /* only the disconnect can bring it back */
    mkq(p, "jobs", &a);
    id = pub(p, "jobs", "train-1");
    ca = cons_open("jobs", 1);
    cons_must_get(ca, 3000, &g, "first consumer");
    ck_assert_uint_eq(g.id, id);
    ck_assert_uint_eq(g.attempt, 1);
    cb = cons_open("jobs", 1);
    cons_none(cb, 200, "second consumer while the first holds the job");
    cons_close(ca); /* dies mid-job */
    cons_must_get(cb, 3000, &g, "second consumer after the first left");
    ck_assert_uint_eq(g.id, id);
    ck_assert_uint_eq(g.attempt, 2);
    check_payload(&g, "train-1");
    pq_check_ok(cb->c, protoq_ack_sync(cb->c, g.id, g.attempt));
    ck_assert_uint_eq(stat_wait(p, "jobs", SF_TOTAL, 0, 2000), 0);
    cons_close(cb);
    protoq_close(p);
}
END_TEST

START_TEST(test_lease_expiry_redelivers_and_late_ack_is_stale)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a = attrs_fast();
    struct cons *ca, *cb;
    struct got g1, g2;
    struct protoq_queue_info st;
    uint64_t id;

    a.ack_timeout_ms = 300;
    mkq(p, "jobs", &a);
    id = pub(p, "jobs", "never-acked");
    ca = cons_open("jobs", 1);
    cons_must_get(ca, 3000, &g1, "first consumer");
    ck_assert_uint_eq(g1.id, id);
    ck_assert_uint_eq(g1.attempt, 1);
    ck_assert_msg(g1.lease_ms > 0 && g1.lease_ms <= 300,
                  "lease_ms %" PRIu64 ", want (0, 300]", g1.lease_ms);
    cb = cons_open("jobs", 1);
    /* ca never acks and is never polled again until its late ack. */
    cons_must_get(cb, 3000, &g2, "second consumer after the lease ran out");
    ck_assert_uint_eq(g2.id, id);
    ck_assert_uint_eq(g2.attempt, 2);
    ck_assert_msg(g2.at_ms - g1.at_ms >= 250,
                  "redelivered %" PRId64 " ms after the first delivery, before "
                  "the 300 ms lease ran out",
                  g2.at_ms - g1.at_ms);
    /* The first consumer's late ack is fenced. */
    pq_check_remote(ca->c, protoq_ack_sync(ca->c, id, 1),
                    PROTOQ_CODE_STALE_DELIVERY);
    /* The current holder's ack works. */
    pq_check_ok(cb->c, protoq_ack_sync(cb->c, id, 2));
    st = qstat(p, "jobs");
    ck_assert_uint_eq(qtotal(&st), 0);
    ck_assert_uint_eq(st.acked, 1);
    ck_assert_uint_eq(st.redelivered, 1);
    /* And the old token stays stale after the ack. */
    pq_check_remote(ca->c, protoq_ack_sync(ca->c, id, 1),
                    PROTOQ_CODE_STALE_DELIVERY);
    cons_close(ca);
    cons_close(cb);
    protoq_close(p);
}
END_TEST

/* nack_until_dead: consume q, nack every delivery with "boom-N"; expect
 * attempts 1..max in order and nothing after. Returns the message id. */
static void
nack_until_dead(struct cons *k, uint64_t id, uint32_t max)
{
    struct got g;
    uint32_t n;

    for (n = 1; n <= max; n++) {
        char err[32];

        cons_must_get(k, 3000, &g, "nacked job coming back");
        ck_assert_uint_eq(g.id, id);
        ck_assert_uint_eq(g.attempt, n);
        snprintf(err, sizeof(err), "boom-%u", n);
        pq_check_ok(k->c,
                    protoq_nack_sync(k->c, g.id, g.attempt, 0, false, err));
    }
    cons_none(k, 500, "source queue after max_attempts");
}

START_TEST(test_nack_forever_dead_letters_with_headers)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a = attrs_fast();
    struct protoq_kv hdr[] = {{"h1", "v1"}};
    struct protoq_message m;
    struct protoq_queue_info st;
    struct cons *k, *d;
    struct got g;
    uint64_t id;

    mkq(p, "jobs.dlq", NULL);
    a.max_attempts = 3;
    snprintf(a.dead_letter, sizeof(a.dead_letter), "jobs.dlq");
    mkq(p, "jobs", &a);
    memset(&m, 0, sizeof(m));
    m.headers = hdr;
    m.n_headers = 1;
    id = pub_msg(p, "jobs", &m, "poison");
    k = cons_open("jobs", 1);
    nack_until_dead(k, id, 3);
    ck_assert_uint_eq(stat_wait(p, "jobs.dlq", SF_READY, 1, 2000), 1);
    st = qstat(p, "jobs");
    ck_assert_uint_eq(qtotal(&st), 0);
    ck_assert_uint_eq(st.dead_lettered, 1);
    ck_assert_uint_eq(st.dropped, 0);
    ck_assert_uint_eq(st.nacked, 3);

    d = cons_open("jobs.dlq", 1);
    cons_must_get(d, 3000, &g, "dead letter");
    check_payload(&g, "poison");
    check_header(&g, "x-death-reason", "max_attempts");
    check_header(&g, "x-death-attempts", "3");
    check_header(&g, "x-death-queue", "jobs");
    check_header(&g, "x-death-error", "boom-3");
    check_header(&g, "h1", "v1");
    pq_check_ok(d->c, protoq_ack_sync(d->c, g.id, g.attempt));
    /* Never delivered again on the source queue. */
    cons_none(k, 300, "source queue after dead-lettering");
    cons_close(d);
    cons_close(k);
    protoq_close(p);
}
END_TEST

START_TEST(test_nack_forever_without_dlq_drops)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a = attrs_fast();
    struct protoq_queue_info st;
    struct cons *k;
    uint64_t id;

    a.max_attempts = 3;
    mkq(p, "jobs", &a);
    id = pub(p, "jobs", "poison");
    k = cons_open("jobs", 1);
    nack_until_dead(k, id, 3);
    ck_assert_uint_eq(stat_wait(p, "jobs", SF_DROPPED, 1, 2000), 1);
    st = qstat(p, "jobs");
    ck_assert_uint_eq(qtotal(&st), 0);
    ck_assert_uint_eq(st.dead_lettered, 0);
    ck_assert_uint_eq(st.bytes, 0);
    cons_close(k);
    protoq_close(p);
}
END_TEST

START_TEST(test_nack_with_dead_letter_flag_goes_to_dlq_at_once)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a = attrs_fast();
    struct cons *k, *d;
    struct got g;
    uint64_t id;

    mkq(p, "dlq", NULL);
    a.max_attempts = 5;
    snprintf(a.dead_letter, sizeof(a.dead_letter), "dlq");
    mkq(p, "jobs", &a);
    id = pub(p, "jobs", "bad-input");
    k = cons_open("jobs", 1);
    cons_must_get(k, 3000, &g, "job");
    ck_assert_uint_eq(g.id, id);
    pq_check_ok(k->c, protoq_nack_sync(k->c, id, 1, 0, true, "cannot parse"));
    cons_none(k, 300, "source after nack(dead_letter)");
    d = cons_open("dlq", 1);
    cons_must_get(d, 3000, &g, "dead letter");
    check_payload(&g, "bad-input");
    check_header(&g, "x-death-reason", "nack");
    check_header(&g, "x-death-attempts", "1");
    check_header(&g, "x-death-queue", "jobs");
    check_header(&g, "x-death-error", "cannot parse");
    cons_close(d);
    cons_close(k);
    protoq_close(p);
}
END_TEST

START_TEST(test_touching_job_outlives_many_leases_and_stale_touch_fails)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a = attrs_fast();
    struct protoq_queue_info st;
    struct cons *ca, *cb;
    struct got g;
    uint64_t id, lease = 0;
    int64_t t0;
    int touches = 0, i;

    a.ack_timeout_ms = 200;
    mkq(p, "jobs", &a);
    id = pub(p, "jobs", "long-training-run");
    ca = cons_open("jobs", 1);
    cons_must_get(ca, 3000, &g, "long job");
    ck_assert_uint_eq(g.id, id);
    ck_assert_uint_eq(g.attempt, 1);
    cb = cons_open("jobs", 1);
    t0 = now_ms_mono();
    /* 2 s = 10 leases; touch every 60 ms; the other worker gets nothing. */
    for (i = 0; i < 200 && now_ms_mono() - t0 < 2000; i++) {
        pq_check_ok(ca->c, protoq_touch(ca->c, id, 1, 0, NULL, &lease));
        ck_assert_msg(lease > 0 && lease <= 200,
                      "touch lease_ms %" PRIu64 ", want (0, 200]", lease);
        touches++;
        cons_none(cb, 60, "other worker while the job is touched");
    }
    ck_assert_int_ge(touches, 15);
    /* A token with another attempt is stale. */
    pq_check_remote(ca->c, protoq_touch(ca->c, id, 2, 0, NULL, NULL),
                    PROTOQ_CODE_STALE_DELIVERY);
    pq_check_ok(ca->c, protoq_ack_sync(ca->c, id, 1));
    st = qstat(p, "jobs");
    ck_assert_uint_eq(st.redelivered, 0);
    ck_assert_uint_eq(st.acked, 1);
    ck_assert_uint_eq(qtotal(&st), 0);
    /* After the ack the token is stale too. */
    pq_check_remote(ca->c, protoq_touch(ca->c, id, 1, 0, NULL, NULL),
                    PROTOQ_CODE_STALE_DELIVERY);
    cons_none(cb, 300, "other worker after the ack");
    cons_close(ca);
    cons_close(cb);
    protoq_close(p);
}
END_TEST

START_TEST(test_touch_after_lease_expired_is_stale)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a = attrs_fast();
    struct cons *ca, *cb;
    struct got g;
    uint64_t id;

    a.ack_timeout_ms = 200;
    mkq(p, "jobs", &a);
    id = pub(p, "jobs", "slow");
    ca = cons_open("jobs", 1);
    cons_must_get(ca, 3000, &g, "job");
    cb = cons_open("jobs", 1);
    cons_must_get(cb, 3000, &g, "redelivery after expiry");
    ck_assert_uint_eq(g.id, id);
    ck_assert_uint_eq(g.attempt, 2);
    pq_check_remote(ca->c, protoq_touch(ca->c, id, 1, 0, NULL, NULL),
                    PROTOQ_CODE_STALE_DELIVERY);
    pq_check_ok(cb->c, protoq_touch(cb->c, id, 2, 0, NULL, NULL));
    pq_check_ok(cb->c, protoq_ack_sync(cb->c, id, 2));
    cons_close(ca);
    cons_close(cb);
    protoq_close(p);
}
END_TEST

START_TEST(test_release_is_not_a_failure_and_keeps_progress)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a = attrs_fast();
    struct protoq_queue_info st;
    struct cons *k;
    struct got g;
    uint64_t id;
    uint32_t n;

    a.max_attempts = 1; /* a single failure would dead-letter it */
    mkq(p, "jobs", &a);
    id = pub(p, "jobs", "preemptible");
    k = cons_open("jobs", 1);
    for (n = 1; n <= 3; n++) {
        char text[32], ckpt[32];
        struct protoq_progress pr;

        cons_must_get(k, 3000, &g, "released job coming back");
        ck_assert_uint_eq(g.id, id);
        ck_assert_uint_eq(g.attempt, n);
        if (n == 1) {
            ck_assert_msg(!g.has_progress, "first delivery has progress");
        } else {
            ck_assert_msg(g.has_progress, "attempt %u lost the progress", n);
            ck_assert_uint_eq(g.percent, 10 * (n - 1));
            snprintf(text, sizeof(text), "step %u", n - 1);
            ck_assert_str_eq(g.ptext, text);
            snprintf(ckpt, sizeof(ckpt), "ckpt://%u", n - 1);
            ck_assert_str_eq(g.pckpt, ckpt);
        }
        snprintf(text, sizeof(text), "step %u", n);
        snprintf(ckpt, sizeof(ckpt), "ckpt://%u", n);
        pr.percent = 10 * n;
        pr.text = text;
        pr.checkpoint = ckpt;
        if (n < 3) {
            /* progress by touch, then release keeping it (NULL) */
            pq_check_ok(k->c, protoq_touch(k->c, id, n, 0, &pr, NULL));
            pq_check_ok(k->c,
                        protoq_release(k->c, id, n, PROTOQ_RELEASE_PREEMPTED,
                                       NULL, true));
        } else {
            /* progress carried by the release itself */
            pr.percent = 75;
            pr.text = "released";
            pq_check_ok(k->c,
                        protoq_release(k->c, id, n, PROTOQ_RELEASE_SHUTDOWN,
                                       &pr, true));
        }
    }
    cons_must_get(k, 3000, &g, "job after three releases");
    ck_assert_uint_eq(g.id, id);
    ck_assert_uint_eq(g.attempt, 4);
    ck_assert_msg(g.has_progress, "progress lost after release");
    ck_assert_uint_eq(g.percent, 75);
    ck_assert_str_eq(g.ptext, "released");
    ck_assert_str_eq(g.pckpt, "ckpt://3");
    check_payload(&g, "preemptible");
    pq_check_ok(k->c, protoq_ack_sync(k->c, id, 4));
    st = qstat(p, "jobs");
    ck_assert_uint_eq(st.dead_lettered, 0);
    ck_assert_uint_eq(st.dropped, 0);
    ck_assert_uint_eq(st.acked, 1);
    ck_assert_uint_eq(qtotal(&st), 0);
    cons_close(k);
    protoq_close(p);
}
END_TEST

/* ===================================================== publish options */

START_TEST(test_delay_hides_message_until_due)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_message m;
    struct protoq_queue_info st;
    struct cons *k;
    struct got g;
    int64_t t0;
    uint64_t id;

    mkq(p, "jobs", NULL);
    k = cons_open("jobs", 1);
    memset(&m, 0, sizeof(m));
    m.delay_ms = 500;
    t0 = now_ms_mono();
    id = pub_msg(p, "jobs", &m, "later");
    st = qstat(p, "jobs");
    ck_assert_uint_eq(st.delayed, 1);
    ck_assert_uint_eq(st.ready, 0);
    cons_none(k, (int)(t0 + 400 - now_ms_mono()),
              "delayed message before 400 ms");
    cons_must_get(k, 3000, &g, "delayed message after its delay");
    ck_assert_uint_eq(g.id, id);
    ck_assert_msg(g.at_ms - t0 >= 450,
                  "delivered after %" PRId64 " ms, delay "
                  "was 500 ms",
                  g.at_ms - t0);
    ck_assert_uint_eq(g.attempt, 1);
    pq_check_ok(k->c, protoq_ack_sync(k->c, id, 1));
    cons_close(k);
    protoq_close(p);
}
END_TEST

START_TEST(test_priority_first_then_fifo_within_level)
{
    static const struct {
        const char *payload;
        uint32_t prio;
    } in[] = {{"a1", 0}, {"a2", 0}, {"b1", 9}, {"a3", 0}, {"b2", 9}, {"c1", 5}};
    static const char *const want[] = {"b1", "b2", "c1", "a1", "a2", "a3"};
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct cons *k;
    struct got g;
    size_t i;

    mkq(p, "jobs", NULL);
    for (i = 0; i < sizeof(in) / sizeof(in[0]); i++) {
        struct protoq_message m;

        memset(&m, 0, sizeof(m));
        m.priority = in[i].prio;
        pub_msg(p, "jobs", &m, in[i].payload);
    }
    k = cons_open("jobs", 1);
    for (i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        cons_must_get(k, 3000, &g, "priority order");
        ck_assert_msg(g.len == strlen(want[i]) &&
                          memcmp(g.payload, want[i], g.len) == 0,
                      "delivery %zu is \"%.*s\" (priority %u), want \"%s\"", i,
                      (int)g.len, g.payload, g.priority, want[i]);
        pq_check_ok(k->c, protoq_ack_sync(k->c, g.id, g.attempt));
    }
    cons_none(k, 200, "after all six");
    cons_close(k);
    protoq_close(p);
}
END_TEST

START_TEST(test_ttl_expired_message_is_never_delivered)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs qa = attrs_fast();
    struct protoq_message m;
    struct cons *k;
    struct got g;

    mkq(p, "jobs", NULL);
    qa.ttl_ms = 200;
    mkq(p, "short", &qa);
    memset(&m, 0, sizeof(m));
    m.ttl_ms = 200;
    pub_msg(p, "jobs", &m, "dies");
    pub(p, "jobs", "lives");
    pub(p, "short", "dies-too"); /* the queue's default TTL */
    sleep_ms(500);
    k = cons_open("jobs", 4);
    cons_must_get(k, 3000, &g, "message without TTL");
    check_payload(&g, "lives");
    pq_check_ok(k->c, protoq_ack_sync(k->c, g.id, g.attempt));
    cons_none(k, 300, "expired message");
    ck_assert_uint_eq(stat_wait(p, "jobs", SF_EXPIRED, 1, 2000), 1);
    ck_assert_uint_eq(stat_wait(p, "jobs", SF_TOTAL, 0, 2000), 0);
    cons_close(k);
    k = cons_open("short", 4);
    cons_none(k, 300, "message expired by the queue's ttl_ms");
    ck_assert_uint_eq(stat_wait(p, "short", SF_EXPIRED, 1, 2000), 1);
    cons_close(k);
    protoq_close(p);
}
END_TEST

START_TEST(test_max_length_rejects_and_keeps_accepted)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a = attrs_fast();
    struct protoq_message m;
    struct protoq_queue_info st;
    struct cons *k;
    struct got g;
    int i;

    a.max_length = 3;
    mkq(p, "jobs", &a);
    pub(p, "jobs", "m0");
    pub(p, "jobs", "m1");
    pub(p, "jobs", "m2");
    memset(&m, 0, sizeof(m));
    m.payload = "m3";
    m.len = 2;
    pq_check_remote(p, protoq_publish(p, "jobs", &m, NULL),
                    PROTOQ_CODE_QUEUE_FULL);
    st = qstat(p, "jobs");
    ck_assert_uint_eq(st.ready, 3);
    ck_assert_uint_eq(st.published, 3);
    k = cons_open("jobs", 1);
    for (i = 0; i < 3; i++) {
        char want[8];

        snprintf(want, sizeof(want), "m%d", i);
        cons_must_get(k, 3000, &g, "accepted message");
        check_payload(&g, want);
        /* in flight still counts against max_length */
        if (i == 0) {
            pq_check_remote(p, protoq_publish(p, "jobs", &m, NULL),
                            PROTOQ_CODE_QUEUE_FULL);
        }
        pq_check_ok(k->c, protoq_ack_sync(k->c, g.id, g.attempt));
    }
    cons_none(k, 200, "rejected message");
    /* room again */
    pub(p, "jobs", "m4");
    cons_must_get(k, 3000, &g, "after room was made");
    check_payload(&g, "m4");
    cons_close(k);
    protoq_close(p);
}
END_TEST

START_TEST(test_max_bytes_rejects_and_keeps_accepted)
{
    char b40[41], b10[11];
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a = attrs_fast();
    struct protoq_message m;
    struct protoq_queue_info st;
    struct cons *k;
    struct got g;
    int i;

    memset(b40, 'x', 40);
    b40[40] = '\0';
    memset(b10, 'y', 10);
    b10[10] = '\0';
    a.max_bytes = 100;
    mkq(p, "jobs", &a);
    pub(p, "jobs", b40);
    pub(p, "jobs", b40);
    memset(&m, 0, sizeof(m));
    m.payload = b40;
    m.len = 40;
    pq_check_remote(p, protoq_publish(p, "jobs", &m, NULL),
                    PROTOQ_CODE_QUEUE_FULL);
    pub(p, "jobs", b10); /* 90 bytes: still fits */
    st = qstat(p, "jobs");
    ck_assert_uint_eq(st.ready, 3);
    ck_assert_uint_eq(st.bytes, 90);
    k = cons_open("jobs", 1);
    for (i = 0; i < 3; i++) {
        cons_must_get(k, 3000, &g, "accepted message");
        check_payload(&g, i < 2 ? b40 : b10);
        pq_check_ok(k->c, protoq_ack_sync(k->c, g.id, g.attempt));
    }
    cons_none(k, 200, "rejected message");
    ck_assert_uint_eq(qstat(p, "jobs").bytes, 0);
    cons_close(k);
    protoq_close(p);
}
END_TEST

START_TEST(test_idempotency_key_returns_first_id)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_message m;
    struct protoq_queue_info st;
    struct cons *k;
    struct got g;
    uint64_t id1 = 0, id2 = 0, id3 = 0;
    bool dup = true;

    mkq(p, "jobs", NULL);
    memset(&m, 0, sizeof(m));
    m.idempotency_key = "job-42";
    m.payload = "first";
    m.len = 5;
    pq_check_ok(p, protoq_publish_ex(p, "jobs", &m, &id1, &dup));
    ck_assert_msg(!dup, "first publish flagged duplicate");
    m.payload = "second";
    m.len = 6;
    pq_check_ok(p, protoq_publish_ex(p, "jobs", &m, &id2, &dup));
    ck_assert_msg(dup,
                  "second publish with the same key not flagged duplicate");
    ck_assert_uint_eq(id2, id1);
    m.idempotency_key = "job-43";
    pq_check_ok(p, protoq_publish_ex(p, "jobs", &m, &id3, &dup));
    ck_assert_msg(!dup, "another key flagged duplicate");
    ck_assert_uint_ne(id3, id1);
    st = qstat(p, "jobs");
    ck_assert_uint_eq(st.ready, 2);
    ck_assert_uint_eq(st.published, 2);
    k = cons_open("jobs", 1);
    cons_must_get(k, 3000, &g, "keyed message");
    ck_assert_uint_eq(g.id, id1);
    check_payload(&g, "first");
    cons_close(k);
    protoq_close(p);
}
END_TEST

/* ============================================================== cancel */

START_TEST(test_cancel_ready_and_delayed_job_removes_it)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_message m;
    struct protoq_queue_info st;
    struct cons *k;
    struct got g;
    uint64_t id1, id3;

    mkq(p, "jobs", NULL);
    id1 = pub(p, "jobs", "cancel-me");
    pub(p, "jobs", "keep-me");
    memset(&m, 0, sizeof(m));
    m.delay_ms = 60000;
    id3 = pub_msg(p, "jobs", &m, "cancel-me-too");
    pq_check_ok(p, protoq_cancel(p, "jobs", id1));
    pq_check_ok(p, protoq_cancel(p, "jobs", id3));
    st = qstat(p, "jobs");
    ck_assert_uint_eq(st.ready, 1);
    ck_assert_uint_eq(st.delayed, 0);
    k = cons_open("jobs", 4);
    cons_must_get(k, 3000, &g, "the job not cancelled");
    check_payload(&g, "keep-me");
    cons_none(k, 300, "cancelled job");
    cons_close(k);
    protoq_close(p);
}
END_TEST

START_TEST(test_cancel_inflight_notifies_holder_and_fences_ack)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a = attrs_fast();
    struct cons *ca, *cb;
    struct got g;
    uint64_t id;
    int i;

    mkq(p, "jobs", &a);
    id = pub(p, "jobs", "running");
    ca = cons_open("jobs", 1);
    cons_must_get(ca, 3000, &g, "job");
    ck_assert_uint_eq(g.id, id);
    cb = cons_open("jobs", 1);
    pq_check_ok(p, protoq_cancel(p, "jobs", id));
    for (i = 0; i < 200 && ca->n_cancel == 0; i++) {
        pump_for(ca, 10);
    }
    ck_assert_msg(ca->n_cancel == 1, "holder got %u cancel requests, want 1",
                  ca->n_cancel);
    ck_assert_str_eq(ca->cancel_queue, "jobs");
    ck_assert_uint_eq(ca->cancel_id, id);
    ck_assert_uint_eq(ca->cancel_attempt, 1);
    pq_check_remote(ca->c, protoq_ack_sync(ca->c, id, 1),
                    PROTOQ_CODE_STALE_DELIVERY);
    /* A cancelled job never runs again, not even when its holder leaves. */
    cons_close(ca);
    cons_none(cb, 500, "cancelled job");
    ck_assert_uint_eq(stat_wait(p, "jobs", SF_TOTAL, 0, 2000), 0);
    cons_close(cb);
    protoq_close(p);
}
END_TEST

/* The fenced answer (STALE_DELIVERY) to an ack, nack or release of a
 * cancelled job frees its holder's credit: the next job must come at once
 * (found by the model-based test, tests/model: the holder stalled until
 * something else woke its queue). */
START_TEST(test_fenced_answer_to_cancelled_job_frees_credit)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a = attrs_fast();
    struct cons *ca;
    struct got g;
    uint64_t id, next;
    int rc;

    mkq(p, "jobs", &a);
    id = pub(p, "jobs", "running");
    next = pub(p, "jobs", "waiting");
    ca = cons_open("jobs", 1);
    cons_must_get(ca, 3000, &g, "job");
    ck_assert_uint_eq(g.id, id);
    pq_check_ok(p, protoq_cancel(p, "jobs", id));
    switch (_i) {
    case 0:
        rc = protoq_ack_sync(ca->c, id, 1);
        break;
    case 1:
        rc = protoq_nack_sync(ca->c, id, 1, 0, false, "failed");
        break;
    default:
        rc = protoq_release(ca->c, id, 1, PROTOQ_RELEASE_PREEMPTED, NULL, true);
        break;
    }
    pq_check_remote(ca->c, rc, PROTOQ_CODE_STALE_DELIVERY);
    cons_must_get(ca, 2000, &g, "the job after the cancelled one");
    ck_assert_uint_eq(g.id, next);
    cons_close(ca);
    protoq_close(p);
}
END_TEST

/* ============================================================= restart */

START_TEST(test_restart_keeps_attempt_count)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a = attrs_fast();
    struct cons *k, *d;
    struct got g;
    uint64_t id;
    uint32_t n;

    mkq(p, "dlq", NULL);
    a.max_attempts = 5;
    snprintf(a.dead_letter, sizeof(a.dead_letter), "dlq");
    mkq(p, "jobs", &a);
    id = pub(p, "jobs", "flaky");
    k = cons_open("jobs", 1);
    /* Each nack asks for a 300 ms delay, so the job cannot come back to k
     * before k is closed (closing while holding it would be a failure). */
    for (n = 1; n <= 2; n++) {
        cons_must_get(k, 3000, &g, "nacked job");
        ck_assert_uint_eq(g.attempt, n);
        pq_check_ok(k->c, protoq_nack_sync(k->c, id, n, 300, false, "flaky"));
    }
    cons_close(k);
    protoq_close(p);
    bounce(_i);
    p = pq_connect_or_fail(&g_srv);
    k = cons_open("jobs", 1);
    /* Attempts 3, 4, 5 after the restart; the 5th failure dead-letters. */
    for (n = 3; n <= 5; n++) {
        cons_must_get(k, 3000, &g, "job after restart");
        ck_assert_uint_eq(g.id, id);
        ck_assert_msg(g.attempt == n,
                      "%s: attempt %u, want %u (attempt count "
                      "as last recorded)",
                      mode_name(_i), g.attempt, n);
        check_payload(&g, "flaky");
        pq_check_ok(k->c,
                    protoq_nack_sync(k->c, id, g.attempt, 0, false, "flaky"));
    }
    cons_none(k, 300, "job after max_attempts");
    d = cons_open("dlq", 1);
    cons_must_get(d, 3000, &g, "dead letter");
    check_header(&g, "x-death-reason", "max_attempts");
    check_header(&g, "x-death-attempts", "5");
    cons_close(d);
    cons_close(k);
    protoq_close(p);
}
END_TEST

START_TEST(test_restart_keeps_pending_delay)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a = attrs_fast();
    struct protoq_message m;
    struct cons *k;
    struct got g;
    uint64_t idx, idy;
    int64_t tx, ty, t_first;
    int i;

    mkq(p, "jobs", &a);
    /* Y: delivered, then nacked with a 1500 ms delay. */
    idy = pub(p, "jobs", "nacked-with-delay");
    k = cons_open("jobs", 1);
    cons_must_get(k, 3000, &g, "job Y");
    ty = now_ms_mono();
    pq_check_ok(k->c, protoq_nack_sync(k->c, idy, 1, 1500, false, "later"));
    cons_close(k);
    /* X: published with a 1500 ms delay. */
    memset(&m, 0, sizeof(m));
    m.delay_ms = 1500;
    tx = now_ms_mono();
    idx = pub_msg(p, "jobs", &m, "published-with-delay");
    protoq_close(p);
    bounce(_i);
    p = pq_connect_or_fail(&g_srv);
    ck_assert_uint_eq(qstat(p, "jobs").delayed, 2);
    k = cons_open("jobs", 2);
    t_first = ty < tx ? ty : tx;
    cons_none(k, (int)(t_first + 1300 - now_ms_mono()),
              "delayed job before its time after a restart");
    for (i = 0; i < 2; i++) {
        cons_must_get(k, 5000, &g, "delayed job after restart");
        if (g.id == idx) {
            ck_assert_msg(g.at_ms - tx >= 1400,
                          "%s: X delivered %" PRId64
                          " ms after publish, delay 1500",
                          mode_name(_i), g.at_ms - tx);
            ck_assert_uint_eq(g.attempt, 1);
        } else {
            ck_assert_uint_eq(g.id, idy);
            ck_assert_msg(g.at_ms - ty >= 1400,
                          "%s: Y delivered %" PRId64
                          " ms after its nack, delay 1500",
                          mode_name(_i), g.at_ms - ty);
            ck_assert_uint_eq(g.attempt, 2);
        }
        pq_check_ok(k->c, protoq_ack_sync(k->c, g.id, g.attempt));
    }
    cons_close(k);
    protoq_close(p);
}
END_TEST

START_TEST(test_restart_keeps_dead_letters)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a = attrs_fast();
    struct protoq_kv hdr[] = {{"owner", "team-a"}};
    struct protoq_message m;
    struct protoq_queue_info st;
    struct cons *k;
    struct got g;
    uint64_t id;

    mkq(p, "dlq", NULL);
    snprintf(a.dead_letter, sizeof(a.dead_letter), "dlq");
    mkq(p, "jobs", &a);
    memset(&m, 0, sizeof(m));
    m.headers = hdr;
    m.n_headers = 1;
    id = pub_msg(p, "jobs", &m, "bad-job");
    k = cons_open("jobs", 1);
    cons_must_get(k, 3000, &g, "job");
    ck_assert_uint_eq(g.id, id);
    pq_check_ok(k->c, protoq_nack_sync(k->c, id, 1, 0, true, "bad input"));
    cons_close(k);
    ck_assert_uint_eq(stat_wait(p, "dlq", SF_READY, 1, 2000), 1);
    protoq_close(p);
    bounce(_i);
    p = pq_connect_or_fail(&g_srv);
    st = qstat(p, "jobs");
    ck_assert_msg(qtotal(&st) == 0,
                  "%s: source queue holds %" PRIu64
                  " messages after restart, want 0",
                  mode_name(_i), qtotal(&st));
    st = qstat(p, "dlq");
    ck_assert_msg(st.ready == 1, "%s: dlq ready %" PRIu64 ", want 1",
                  mode_name(_i), st.ready);
    k = cons_open("dlq", 1);
    cons_must_get(k, 3000, &g, "dead letter after restart");
    check_payload(&g, "bad-job");
    check_header(&g, "x-death-reason", "nack");
    check_header(&g, "x-death-queue", "jobs");
    check_header(&g, "x-death-error", "bad input");
    check_header(&g, "x-death-attempts", "1");
    check_header(&g, "owner", "team-a");
    pq_check_ok(k->c, protoq_ack_sync(k->c, g.id, g.attempt));
    cons_close(k);
    k = cons_open("jobs", 1);
    cons_none(k, 300, "source queue after restart");
    cons_close(k);
    protoq_close(p);
}
END_TEST

START_TEST(test_restart_returns_inflight_job_to_ready)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a = attrs_fast();
    struct protoq_queue_info st;
    struct cons *k;
    struct got g;
    uint64_t id;

    a.ack_timeout_ms = 60000; /* the old lease must not be what frees it */
    mkq(p, "jobs", &a);
    id = pub(p, "jobs", "in-flight");
    k = cons_open("jobs", 1);
    cons_must_get(k, 3000, &g, "job");
    ck_assert_uint_eq(g.id, id);
    protoq_close(p);
    bounce(_i); /* k's connection dies with the broker */
    cons_close(k);
    p = pq_connect_or_fail(&g_srv);
    st = qstat(p, "jobs");
    ck_assert_msg(st.inflight == 0, "%s: %" PRIu64 " in flight after restart",
                  mode_name(_i), st.inflight);
    ck_assert_msg(st.ready + st.delayed == 1,
                  "%s: ready %" PRIu64 " delayed %" PRIu64
                  " after restart, want 1 in all",
                  mode_name(_i), st.ready, st.delayed);
    k = cons_open("jobs", 1);
    cons_must_get(k, 3000, &g, "job in flight at the restart");
    ck_assert_uint_eq(g.id, id);
    ck_assert_uint_ge(g.attempt, 1);
    check_payload(&g, "in-flight");
    pq_check_ok(k->c, protoq_ack_sync(k->c, id, g.attempt));
    ck_assert_uint_eq(stat_wait(p, "jobs", SF_TOTAL, 0, 2000), 0);
    cons_close(k);
    protoq_close(p);
}
END_TEST

START_TEST(test_restart_keeps_released_progress)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a = attrs_fast();
    struct protoq_progress pr = {40, "epoch 4/10", "s3://ckpt/epoch4"};
    struct cons *k;
    struct got g;
    uint64_t id;

    /* Not 1: the released job may go straight back to k, and closing k
     * then counts as a failed attempt. */
    a.max_attempts = 5;
    mkq(p, "jobs", &a);
    id = pub(p, "jobs", "resumable");
    k = cons_open("jobs", 1);
    cons_must_get(k, 3000, &g, "job");
    pq_check_ok(k->c, protoq_touch(k->c, id, 1, 0, &pr, NULL));
    pq_check_ok(
        k->c, protoq_release(k->c, id, 1, PROTOQ_RELEASE_SHUTDOWN, NULL, true));
    cons_close(k);
    protoq_close(p);
    bounce(_i);
    p = pq_connect_or_fail(&g_srv);
    k = cons_open("jobs", 1);
    cons_must_get(k, 3000, &g, "released job after restart");
    ck_assert_uint_eq(g.id, id);
    ck_assert_msg(g.has_progress, "%s: progress lost", mode_name(_i));
    ck_assert_uint_eq(g.percent, 40);
    ck_assert_str_eq(g.ptext, "epoch 4/10");
    ck_assert_str_eq(g.pckpt, "s3://ckpt/epoch4");
    ck_assert_uint_ge(g.attempt, 2);
    pq_check_ok(k->c, protoq_ack_sync(k->c, id, g.attempt));
    cons_close(k);
    protoq_close(p);
}
END_TEST

START_TEST(test_restart_keeps_idempotency_keys)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_message m;
    uint64_t id1 = 0, id2 = 0;
    bool dup = true;

    mkq(p, "jobs", NULL);
    memset(&m, 0, sizeof(m));
    m.idempotency_key = "nightly-2024-01-01";
    m.payload = "x";
    m.len = 1;
    pq_check_ok(p, protoq_publish_ex(p, "jobs", &m, &id1, &dup));
    ck_assert(!dup);
    protoq_close(p);
    bounce(_i);
    p = pq_connect_or_fail(&g_srv);
    pq_check_ok(p, protoq_publish_ex(p, "jobs", &m, &id2, &dup));
    ck_assert_msg(dup && id2 == id1,
                  "%s: key forgotten: id %" PRIu64 " dup %d, want id %" PRIu64
                  " dup 1",
                  mode_name(_i), id2, (int)dup, id1);
    ck_assert_uint_eq(qstat(p, "jobs").ready, 1);
    protoq_close(p);
}
END_TEST

/* Counters are "since the broker started": replaying the log is not
 * publishing. Every PUBLISH, REQUEUE and DEAD_LETTER record replayed used
 * to count as a publish (found by the model-based test, tests/model). */
START_TEST(test_restart_counts_no_replayed_publish)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a = attrs_fast();
    struct protoq_queue_info i;
    struct cons *k;
    struct got g;
    uint64_t id;

    mkq(p, "jobs", &a);
    id = pub(p, "jobs", "retried");
    (void)pub(p, "jobs", "waiting");
    k = cons_open("jobs", 1);
    cons_must_get(k, 3000, &g, "job");
    ck_assert_uint_eq(g.id, id);
    pq_check_ok(k->c, protoq_nack_sync(k->c, id, 1, 0, false, "failed"));
    cons_close(k);
    protoq_close(p);
    bounce(_i);
    p = pq_connect_or_fail(&g_srv);
    i = qstat(p, "jobs");
    ck_assert_uint_eq(i.ready + i.delayed, 2);
    ck_assert_msg(i.published == 0,
                  "%s: published %" PRIu64 " right after the "
                  "restart, want 0",
                  mode_name(_i), i.published);
    (void)pub(p, "jobs", "new");
    ck_assert_uint_eq(qstat(p, "jobs").published, 1);
    protoq_close(p);
}
END_TEST

/* A dead letter takes the dead-letter queue's TTL (none here), live and
 * after a restart. Replay kept the source message's TTL, so a message
 * dead-lettered because it expired expired again in the dead-letter queue
 * at the restart and was dropped (found by the model-based test). */
START_TEST(test_restart_keeps_expired_dead_letter)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a = attrs_fast();
    struct protoq_queue_info i;
    struct cons *d;
    struct got g;

    mkq(p, "dlq", NULL);
    a.ttl_ms = 100;
    a.dead_letter_expired = true;
    snprintf(a.dead_letter, sizeof(a.dead_letter), "dlq");
    mkq(p, "jobs", &a);
    pub(p, "jobs", "too-late");
    ck_assert_uint_eq(stat_wait(p, "dlq", SF_READY, 1, 3000), 1);
    protoq_close(p);
    bounce(_i);
    p = pq_connect_or_fail(&g_srv);
    sleep_ms(200);
    i = qstat(p, "dlq");
    ck_assert_msg(i.ready == 1 && i.expired == 0,
                  "%s: dead-letter queue has %" PRIu64 " ready, %" PRIu64
                  " expired after the restart; want 1, 0",
                  mode_name(_i), i.ready, i.expired);
    d = cons_open("dlq", 1);
    cons_must_get(d, 3000, &g, "the dead letter after the restart");
    check_payload(&g, "too-late");
    check_header(&g, "x-death-reason", "expired");
    cons_close(d);
    protoq_close(p);
}
END_TEST

START_TEST(test_restart_never_reuses_message_ids)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct cons *k;
    struct got g;
    uint64_t id1, id2, id3;

    mkq(p, "jobs", NULL);
    id1 = pub(p, "jobs", "one");
    id2 = pub(p, "jobs", "two");
    /* ack the newest so the largest id is gone from the live set */
    k = cons_open("jobs", 2);
    cons_must_get(k, 3000, &g, "one");
    cons_must_get(k, 3000, &g, "two");
    pq_check_ok(k->c, protoq_ack_sync(k->c, id2, 1));
    cons_close(k);
    protoq_close(p);
    bounce(_i);
    p = pq_connect_or_fail(&g_srv);
    id3 = pub(p, "jobs", "three");
    ck_assert_msg(id3 > id2 && id3 != id1,
                  "%s: id %" PRIu64 " after restart; "
                  "earlier ids %" PRIu64 ", %" PRIu64,
                  mode_name(_i), id3, id1, id2);
    protoq_close(p);
}
END_TEST

START_TEST(test_restart_expires_ttl_while_down)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_message m;
    struct cons *k;
    struct got g;

    mkq(p, "jobs", NULL);
    memset(&m, 0, sizeof(m));
    m.ttl_ms = 300;
    pub_msg(p, "jobs", &m, "short-lived");
    pub(p, "jobs", "long-lived");
    protoq_close(p);
    if (_i == 0) {
        srv_stop(&g_srv);
    } else {
        srv_kill9(&g_srv);
    }
    sleep_ms(600); /* the TTL runs out while the broker is down */
    ck_assert_int_eq(srv_launch(&g_srv), 0);
    p = pq_connect_or_fail(&g_srv);
    k = cons_open("jobs", 4);
    cons_must_get(k, 3000, &g, "message without TTL");
    check_payload(&g, "long-lived");
    pq_check_ok(k->c, protoq_ack_sync(k->c, g.id, g.attempt));
    cons_none(k, 400, "message whose TTL ran out while the broker was down");
    ck_assert_uint_eq(stat_wait(p, "jobs", SF_TOTAL, 0, 2000), 0);
    cons_close(k);
    protoq_close(p);
}
END_TEST

START_TEST(test_restart_keeps_priority_and_fifo_order)
{
    static const struct {
        const char *payload;
        uint32_t prio;
    } in[] = {{"a1", 0}, {"b1", 9}, {"a2", 0}, {"a3", 0}, {"b2", 9}, {"a4", 0}};
    static const char *const want[] = {"b1", "b2", "a1", "a2", "a3", "a4"};
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct cons *k;
    struct got g;
    size_t i;

    mkq(p, "jobs", NULL);
    for (i = 0; i < sizeof(in) / sizeof(in[0]); i++) {
        struct protoq_message m;

        memset(&m, 0, sizeof(m));
        m.priority = in[i].prio;
        pub_msg(p, "jobs", &m, in[i].payload);
    }
    protoq_close(p);
    bounce(_i);
    p = pq_connect_or_fail(&g_srv);
    k = cons_open("jobs", 1);
    for (i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        cons_must_get(k, 3000, &g, "order after restart");
        ck_assert_msg(g.len == strlen(want[i]) &&
                          memcmp(g.payload, want[i], g.len) == 0,
                      "%s: delivery %zu is \"%.*s\", want \"%s\"",
                      mode_name(_i), i, (int)g.len, g.payload, want[i]);
        ck_assert_uint_eq(g.priority, want[i][0] == 'b' ? 9 : 0);
        pq_check_ok(k->c, protoq_ack_sync(k->c, g.id, g.attempt));
    }
    cons_close(k);
    protoq_close(p);
}
END_TEST

START_TEST(test_restart_keeps_inflight_cancel)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a = attrs_fast();
    struct protoq_queue_info st;
    struct cons *k;
    struct got g;
    uint64_t id;
    int i;

    a.ack_timeout_ms = 60000;
    mkq(p, "jobs", &a);
    id = pub(p, "jobs", "cancelled-while-running");
    k = cons_open("jobs", 1);
    cons_must_get(k, 3000, &g, "job");
    pq_check_ok(p, protoq_cancel(p, "jobs", id));
    for (i = 0; i < 200 && k->n_cancel == 0; i++) {
        pump_for(k, 10);
    }
    ck_assert_uint_eq(k->n_cancel, 1);
    protoq_close(p);
    /* The broker goes down while the cancelled job is still held. */
    bounce(_i);
    cons_close(k);
    p = pq_connect_or_fail(&g_srv);
    st = qstat(p, "jobs");
    ck_assert_msg(qtotal(&st) == 0,
                  "%s: cancelled job is back after the "
                  "restart (ready %" PRIu64 " delayed %" PRIu64 ")",
                  mode_name(_i), st.ready, st.delayed);
    k = cons_open("jobs", 1);
    cons_none(k, 300, "cancelled job after restart");
    cons_close(k);
    protoq_close(p);
}
END_TEST

START_TEST(test_lease_expiry_counts_toward_max_attempts)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a = attrs_fast();
    struct cons *k, *d;
    struct got g;
    uint64_t id;
    uint32_t n;

    mkq(p, "dlq", NULL);
    a.ack_timeout_ms = 150;
    a.max_attempts = 2;
    snprintf(a.dead_letter, sizeof(a.dead_letter), "dlq");
    mkq(p, "jobs", &a);
    id = pub(p, "jobs", "hangs");
    k = cons_open("jobs", 1);
    for (n = 1; n <= 2; n++) {
        cons_must_get(k, 3000, &g, "job (never acked)");
        ck_assert_uint_eq(g.id, id);
        ck_assert_uint_eq(g.attempt, n);
    }
    cons_none(k, 500, "job after two expired leases");
    d = cons_open("dlq", 1);
    cons_must_get(d, 3000, &g, "dead letter after expired leases");
    check_payload(&g, "hangs");
    check_header(&g, "x-death-reason", "max_attempts");
    check_header(&g, "x-death-attempts", "2");
    check_header(&g, "x-death-queue", "jobs");
    /* stale: both leases ran out */
    pq_check_remote(k->c, protoq_ack_sync(k->c, id, 2),
                    PROTOQ_CODE_STALE_DELIVERY);
    cons_close(d);
    cons_close(k);
    protoq_close(p);
}
END_TEST

START_TEST(test_ttl_dead_letter_expired_goes_to_dlq)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a = attrs_fast();
    struct cons *d;
    struct got g;

    mkq(p, "dlq", NULL);
    a.ttl_ms = 200;
    a.dead_letter_expired = true;
    snprintf(a.dead_letter, sizeof(a.dead_letter), "dlq");
    mkq(p, "jobs", &a);
    pub(p, "jobs", "too-late");
    d = cons_open("dlq", 1);
    cons_must_get(d, 3000, &g, "expired message in the dead-letter queue");
    check_payload(&g, "too-late");
    check_header(&g, "x-death-reason", "expired");
    check_header(&g, "x-death-queue", "jobs");
    ck_assert_uint_eq(stat_wait(p, "jobs", SF_TOTAL, 0, 2000), 0);
    cons_close(d);
    protoq_close(p);
}
END_TEST

START_TEST(test_disconnect_returns_every_prefetched_job)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a = attrs_fast();
    struct cons *ca, *cb;
    struct got g;
    uint64_t seen = 0;
    int i;

    a.ack_timeout_ms = 60000;
    mkq(p, "jobs", &a);
    for (i = 0; i < 5; i++) {
        char b[8];

        snprintf(b, sizeof(b), "j%d", i);
        pub(p, "jobs", b);
    }
    ca = cons_open("jobs", 5);
    for (i = 0; i < 5; i++) {
        cons_must_get(ca, 3000, &g, "prefetched job");
        ck_assert_uint_eq(g.attempt, 1);
    }
    ck_assert_uint_eq(qstat(p, "jobs").inflight, 5);
    cons_close(ca);
    cb = cons_open("jobs", 10);
    for (i = 0; i < 5; i++) {
        cons_must_get(cb, 3000, &g, "job returned by the disconnect");
        ck_assert_uint_eq(g.attempt, 2);
        ck_assert_msg(g.len == 2 && g.payload[0] == 'j', "payload %.*s",
                      (int)g.len, g.payload);
        seen |= 1u << (g.payload[1] - '0');
        pq_check_ok(cb->c, protoq_ack_sync(cb->c, g.id, g.attempt));
    }
    ck_assert_uint_eq(seen, 0x1f);
    cons_close(cb);
    protoq_close(p);
}
END_TEST

/* ================================================================= CLI */

/* run_cli: run $PROTOQ (or build/protoq) with args, PROTOQ_SERVER set to the
 * broker, stdout into out (NUL-terminated), bounded by timeout_ms. Returns
 * the exit status, or -1 if it had to be killed. */
static int
run_cli(const char *const *args, char *out, size_t cap, int timeout_ms)
{
    const char *bin = getenv("PROTOQ");
    char outpath[320], errpath[320];
    const char *argv[32];
    int64_t deadline;
    size_t n = 0, got;
    int status = 0, i;
    pid_t pid;
    FILE *f;

    if (bin == NULL || bin[0] == '\0') {
        bin = "build/protoq";
    }
    snprintf(outpath, sizeof(outpath), "%s/cli.out", g_srv.dir);
    snprintf(errpath, sizeof(errpath), "%s/cli.err", g_srv.dir);
    argv[n++] = bin;
    for (i = 0; args[i] != NULL && n < 30; i++) {
        argv[n++] = args[i];
    }
    argv[n] = NULL;
    pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        int fo = open(outpath, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        int fe = open(errpath, O_WRONLY | O_CREAT | O_TRUNC, 0644);

        if (fo >= 0) {
            dup2(fo, STDOUT_FILENO);
        }
        if (fe >= 0) {
            dup2(fe, STDERR_FILENO);
        }
        setenv("PROTOQ_SERVER", g_srv.addr, 1);
        execv(bin, (char *const *)argv);
        fprintf(stderr, "exec %s: %s\n", bin, strerror(errno));
        _exit(127);
    }
    deadline = now_ms_mono() + timeout_ms;
    for (i = 0; i < 100000; i++) {
        pid_t r = waitpid(pid, &status, WNOHANG);

        if (r == pid) {
            break;
        }
        if (now_ms_mono() >= deadline) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            status = -1;
            break;
        }
        sleep_ms(5);
    }
    out[0] = '\0';
    f = fopen(outpath, "r");
    if (f != NULL) {
        got = fread(out, 1, cap - 1, f);
        out[got] = '\0';
        fclose(f);
    }
    if (status != -1) {
        status =
            WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    if (status != 0) {
        char err[1024] = "";

        f = fopen(errpath, "r");
        if (f != NULL) {
            got = fread(err, 1, sizeof(err) - 1, f);
            err[got] = '\0';
            fclose(f);
        }
        fprintf(stderr, "%s %s: exit %d; stderr: %s\n", bin, args[0], status,
                err);
    }
    return status;
}

/* json_attempt: the number after "attempt" in a --json line, or -1. */
static long
json_attempt(const char *s)
{
    const char *p = strstr(s, "\"attempt\"");

    if (p == NULL) {
        return -1;
    }
    p += strlen("\"attempt\"");
    while (*p == ' ' || *p == ':' || *p == '\t') {
        p++;
    }
    return *p >= '0' && *p <= '9' ? strtol(p, NULL, 10) : -1;
}

START_TEST(test_cli_consume_nack_drives_retries_to_dlq)
{
    static const char *const nack1[] = {
        "consume", "cliq", "--nack", "--count", "1", "--wait", "3s", NULL};
    static const char *const nack2[] = {"consume", "cliq",   "--nack",
                                        "--count", "1",      "--wait",
                                        "3s",      "--json", NULL};
    char out[4096];
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a = attrs_fast();
    struct protoq_queue_info st;

    mkq(p, "cliq.dlq", NULL);
    a.max_attempts = 2;
    snprintf(a.dead_letter, sizeof(a.dead_letter), "cliq.dlq");
    mkq(p, "cliq", &a);
    pub(p, "cliq", "job-from-shell");
    ck_assert_int_eq(run_cli(nack1, out, sizeof(out), 10000), 0);
    ck_assert_msg(strstr(out, "job-from-shell") != NULL,
                  "consume --nack printed \"%s\"", out);
    ck_assert_uint_eq(stat_wait(p, "cliq", SF_NACKED, 1, 2000), 1);
    st = qstat(p, "cliq");
    ck_assert_uint_eq(st.ready + st.delayed, 1);
    ck_assert_uint_eq(st.inflight, 0);
    ck_assert_int_eq(run_cli(nack2, out, sizeof(out), 10000), 0);
    ck_assert_msg(strstr(out, "job-from-shell") != NULL,
                  "consume --nack --json printed \"%s\"", out);
    ck_assert_msg(json_attempt(out) == 2,
                  "--json attempt %ld in \"%s\", want 2", json_attempt(out),
                  out);
    /* second failure of max_attempts 2: dead-lettered */
    ck_assert_uint_eq(stat_wait(p, "cliq.dlq", SF_READY, 1, 2000), 1);
    st = qstat(p, "cliq");
    ck_assert_uint_eq(qtotal(&st), 0);
    ck_assert_uint_eq(st.dead_lettered, 1);
    protoq_close(p);
}
END_TEST

START_TEST(test_cli_consume_no_ack_returns_job)
{
    static const char *const noack[] = {
        "consume", "cliq", "--no-ack", "--count", "1", "--wait", "3s", NULL};
    static const char *const ack[] = {"consume", "cliq", "--count", "1",
                                      "--wait",  "3s",   "--json",  NULL};
    char out[4096];
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a = attrs_fast();
    struct protoq_queue_info st;
    int rc;

    a.max_attempts = 5;
    mkq(p, "cliq", &a);
    pub(p, "cliq", "job-no-ack");
    rc = run_cli(noack, out, sizeof(out), 10000);
    if (rc == -1) {
        st = qstat(p, "cliq");
        ck_abort_msg("protoq consume --no-ack --count 1 did not exit within "
                     "10 s (printed \"%s\"); the job was redelivered %" PRIu64
                     " times meanwhile",
                     out, st.redelivered);
    }
    ck_assert_int_eq(rc, 0);
    ck_assert_msg(strstr(out, "job-no-ack") != NULL,
                  "consume --no-ack printed \"%s\"", out);
    /* The job comes back when the CLI exits. */
    ck_assert_uint_eq(stat_wait(p, "cliq", SF_INFLIGHT, 0, 2000), 0);
    st = qstat(p, "cliq");
    ck_assert_uint_eq(st.ready + st.delayed, 1);
    ck_assert_uint_eq(st.acked, 0);
    ck_assert_int_eq(run_cli(ack, out, sizeof(out), 10000), 0);
    ck_assert_msg(strstr(out, "job-no-ack") != NULL,
                  "consume --json printed \"%s\"", out);
    ck_assert_msg(json_attempt(out) == 2,
                  "--json attempt %ld in \"%s\", want 2", json_attempt(out),
                  out);
    ck_assert_uint_eq(stat_wait(p, "cliq", SF_ACKED, 1, 2000), 1);
    ck_assert_uint_eq(stat_wait(p, "cliq", SF_TOTAL, 0, 2000), 0);
    protoq_close(p);
}
END_TEST

/* ================================================================ main */

static TCase *
tcase(const char *name, int timeout_s)
{
    TCase *tc = tcase_create(name);

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, timeout_s);
    return tc;
}

static Suite *
jobs_suite(void)
{
    Suite *s = suite_create("jobs");
    TCase *tc;

    tc = tcase("failures", 20);
    tcase_add_test(tc,
                   test_disconnect_mid_job_goes_to_other_consumer_attempt_2);
    tcase_add_test(tc, test_lease_expiry_redelivers_and_late_ack_is_stale);
    tcase_add_test(tc, test_nack_forever_dead_letters_with_headers);
    tcase_add_test(tc, test_nack_forever_without_dlq_drops);
    tcase_add_test(tc, test_nack_with_dead_letter_flag_goes_to_dlq_at_once);
    tcase_add_test(
        tc, test_touching_job_outlives_many_leases_and_stale_touch_fails);
    tcase_add_test(tc, test_touch_after_lease_expired_is_stale);
    tcase_add_test(tc, test_release_is_not_a_failure_and_keeps_progress);
    tcase_add_test(tc, test_lease_expiry_counts_toward_max_attempts);
    tcase_add_test(tc, test_disconnect_returns_every_prefetched_job);
    suite_add_tcase(s, tc);

    tc = tcase("publish_options", 20);
    tcase_add_test(tc, test_delay_hides_message_until_due);
    tcase_add_test(tc, test_priority_first_then_fifo_within_level);
    tcase_add_test(tc, test_ttl_expired_message_is_never_delivered);
    tcase_add_test(tc, test_ttl_dead_letter_expired_goes_to_dlq);
    tcase_add_test(tc, test_max_length_rejects_and_keeps_accepted);
    tcase_add_test(tc, test_max_bytes_rejects_and_keeps_accepted);
    tcase_add_test(tc, test_idempotency_key_returns_first_id);
    suite_add_tcase(s, tc);

    tc = tcase("cancel", 20);
    tcase_add_test(tc, test_cancel_ready_and_delayed_job_removes_it);
    tcase_add_test(tc, test_cancel_inflight_notifies_holder_and_fences_ack);
    tcase_add_loop_test(tc, test_fenced_answer_to_cancelled_job_frees_credit, 0,
                        3);
    suite_add_tcase(s, tc);

    /* _i = 0: SIGTERM and restart; _i = 1: kill -9 and launch */
    tc = tcase("restart", 30);
    tcase_add_loop_test(tc, test_restart_keeps_attempt_count, 0, 2);
    tcase_add_loop_test(tc, test_restart_keeps_pending_delay, 0, 2);
    tcase_add_loop_test(tc, test_restart_keeps_dead_letters, 0, 2);
    tcase_add_loop_test(tc, test_restart_returns_inflight_job_to_ready, 0, 2);
    tcase_add_loop_test(tc, test_restart_keeps_released_progress, 0, 2);
    tcase_add_loop_test(tc, test_restart_keeps_idempotency_keys, 0, 2);
    tcase_add_loop_test(tc, test_restart_never_reuses_message_ids, 0, 2);
    tcase_add_loop_test(tc, test_restart_counts_no_replayed_publish, 0, 2);
    tcase_add_loop_test(tc, test_restart_keeps_expired_dead_letter, 0, 2);
    tcase_add_loop_test(tc, test_restart_expires_ttl_while_down, 0, 2);
    tcase_add_loop_test(tc, test_restart_keeps_priority_and_fifo_order, 0, 2);
    tcase_add_loop_test(tc, test_restart_keeps_inflight_cancel, 0, 2);
    suite_add_tcase(s, tc);

    tc = tcase("cli", 30);
    tcase_add_test(tc, test_cli_consume_nack_drives_retries_to_dlq);
    tcase_add_test(tc, test_cli_consume_no_ack_returns_job);
    suite_add_tcase(s, tc);
    return s;
}

int
main(void)
{
    SRunner *sr;
    int failed;

    if (write_conf() != 0) {
        return EXIT_FAILURE;
    }
    sr = srunner_create(jobs_suite());
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    remove_conf();
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
