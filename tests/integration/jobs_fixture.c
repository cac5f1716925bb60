/*
 * jobs_fixture.c: see jobs_fixture.h.
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
#include "jobs_fixture.h"

/* ------------------------------------------------------------ fixture */

struct srv g_srv;
static struct test_conf g_conf;
static const char *const g_args[] = {"-c", g_conf.path, NULL};

static const char CONF_TEXT[] =
    "# check_jobs: fast retries so redelivery tests stay short\n"
    "backoff_base_ms 10\n"
    "backoff_cap_ms 40\n"
    "heartbeat_ms 1000\n"
    "heartbeat_timeout_ms 5000\n";

/* jobs_main: see the header. The conf file is written once here and
 * removed at the end, so a failed test leaks nothing. */
int
jobs_main(Suite *s)
{
    SRunner *sr;
    int failed;

    if (test_conf_write(&g_conf, CONF_TEXT) != 0) {
        return EXIT_FAILURE;
    }
    sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    test_conf_remove(&g_conf);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
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

void
sleep_ms(int ms)
{
    poll(NULL, 0, ms);
}

/* ------------------------------------------------------------ helpers */

/* attrs_fast: attributes with a short backoff, everything else default. */
struct protoq_queue_attrs
attrs_fast(void)
{
    struct protoq_queue_attrs a;

    memset(&a, 0, sizeof(a));
    a.backoff_base_ms = 10;
    a.backoff_cap_ms = 40;
    return a;
}

void
mkq(protoq_client *c, const char *name, const struct protoq_queue_attrs *a)
{
    pq_check_ok(c, protoq_queue_create(c, name, a));
}

uint64_t
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

uint64_t
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

struct protoq_queue_info
qstat(protoq_client *c, const char *q)
{
    struct protoq_queue_info i;

    memset(&i, 0, sizeof(i));
    pq_check_ok(c, protoq_queue_stat(c, q, &i));
    return i;
}

uint64_t
qtotal(const struct protoq_queue_info *i)
{
    return i->ready + i->delayed + i->inflight;
}

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
uint64_t
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
struct cons *
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

void
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
void
cons_must_get(struct cons *k, int timeout_ms, struct got *out, const char *what)
{
    ck_assert_msg(cons_next(k, timeout_ms, out), "%s: no delivery within %d ms",
                  what, timeout_ms);
}

/* cons_none: assert that nothing is delivered for ms. */
void
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
void
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

void
check_header(const struct got *g, const char *key, const char *want)
{
    const char *v = got_header(g, key);

    ck_assert_msg(v != NULL, "header %s missing", key);
    ck_assert_msg(strcmp(v, want) == 0, "header %s = \"%s\", want \"%s\"", key,
                  v, want);
}

void
check_payload(const struct got *g, const char *want)
{
    ck_assert_msg(
        g->len == strlen(want) && memcmp(g->payload, want, g->len) == 0,
        "payload \"%.*s\", want \"%s\"", (int)g->len, g->payload, want);
}

/* ------------------------------------------------------------- suites */

TCase *
tcase(const char *name, int timeout_s)
{
    TCase *tc = tcase_create(name);

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, timeout_s);
    return tc;
}
