/*
 * check_reconnect.c: libprotoq's opt-in reconnect (protoq_opts.reconnect,
 * issue 10): a consumer survives a broker restart on the same port and data
 * dir and goes on receiving with nothing lost; its subscriptions come back
 * with their tags and flow state and keep the ids the caller holds; old
 * delivery tokens answer STALE_DELIVERY; a producer's publishes that were
 * unconfirmed when the connection went are reported failed (and a retry
 * with the same idempotency keys stores each message exactly once);
 * blocking calls made during the outage wait for the connection up to the
 * I/O timeout; and without the flag a handle dies as before.
 *
 * Loop tests: _i = 0 restarts the broker by SIGTERM, _i = 1 by kill -9.
 * Every wait is bounded.
 */
#include <check.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "testutil.h"

/* ------------------------------------------------------------ fixture */

static struct srv g_srv;
static struct test_conf g_conf;
static char g_listen[32];
/* "--listen 127.0.0.1:PORT" is filled in before the first restart, so that
 * the broker comes back on the port the handles know. */
static const char *g_args[] = {"-c", g_conf.path, NULL, NULL, NULL};

/* Short heartbeats: a consumer that stops calling into its handle for
 * over 600 ms is dropped by the broker (test_old_delivery_token...). */
static const char CONF_TEXT[] = "# check_reconnect: fast retries\n"
                                "backoff_base_ms 10\n"
                                "backoff_cap_ms 40\n"
                                "heartbeat_ms 200\n"
                                "heartbeat_timeout_ms 600\n";

static void
setup(void)
{
    ck_assert_msg(srv_start(&g_srv, g_args) == 0,
                  "protoqd did not start (PROTOQD=%s)",
                  getenv("PROTOQD") ? getenv("PROTOQD") : "(unset)");
    snprintf(g_listen, sizeof(g_listen), "127.0.0.1:%u", g_srv.port);
    g_args[2] = "--listen";
    g_args[3] = g_listen;
}

static void
teardown(void)
{
    srv_cleanup(&g_srv);
}

/* Stop the broker: mode 0 SIGTERM (it must exit 0), 1 kill -9. */
static void
broker_down(int mode)
{
    if (mode == 0) {
        ck_assert_int_eq(srv_stop(&g_srv), 0);
    } else {
        srv_kill9(&g_srv);
    }
}

/* Start it again on the same port and data dir. */
static void
broker_up(void)
{
    uint16_t port = g_srv.port;

    ck_assert_msg(srv_launch(&g_srv) == 0, "restart failed");
    ck_assert_int_eq(g_srv.port, port);
}

static void
sleep_ms(int ms)
{
    poll(NULL, 0, ms);
}

/* ------------------------------------------------------------ helpers */

/* Counts of connection events, by event. */
struct events {
    int lost, restored, sub_lost;
    uint64_t sub_lost_id;
    int sub_lost_code;
};

static void
on_conn(void *arg, protoq_client *c, int event, int err, uint64_t sub_id)
{
    struct events *e = arg;

    (void)err;
    if (event == PROTOQ_CONN_LOST) {
        e->lost++;
    } else if (event == PROTOQ_CONN_RESTORED) {
        e->restored++;
    } else if (event == PROTOQ_CONN_SUB_LOST) {
        e->sub_lost++;
        e->sub_lost_id = sub_id;
        e->sub_lost_code = protoq_last_error_code(c);
    }
}

/* A reconnecting handle with fast retries; io_ms its I/O timeout. */
static protoq_client *
connect_rc(struct events *ev, int io_ms)
{
    struct protoq_opts o;
    protoq_client *c;
    int rc;

    memset(&o, 0, sizeof(o));
    o.reconnect = true;
    o.reconnect_min_ms = 20;
    o.reconnect_max_ms = 200;
    o.io_timeout_ms = io_ms;
    o.client_name = "check_reconnect";
    rc = protoq_connect(g_srv.addr, &o, &c);
    ck_assert_msg(rc == PQ_OK, "connect: %s", protoq_errmsg(c));
    if (ev != NULL) {
        protoq_set_conn_cb(c, on_conn, ev);
    }
    return c;
}

static void
mkq(protoq_client *c, const char *name, bool transient)
{
    struct protoq_queue_attrs a;

    memset(&a, 0, sizeof(a));
    a.transient = transient;
    a.backoff_base_ms = 10;
    a.backoff_cap_ms = 40;
    a.max_attempts = 100;
    a.dedup_window_ms = 600000;
    pq_check_ok(c, protoq_queue_create(c, name, &a));
}

/* Publish "m<i>" to queue and wait for its confirmation. */
static void
pub_i(protoq_client *c, const char *queue, int i,
      const struct protoq_kv *requires, size_t n_requires)
{
    struct protoq_message m;
    char body[32];

    memset(&m, 0, sizeof(m));
    snprintf(body, sizeof(body), "m%d", i);
    m.payload = body;
    m.len = strlen(body);
    m.requires = requires;
    m.n_requires = n_requires;
    pq_check_ok(c, protoq_publish(c, queue, &m, NULL));
}

enum { NMSG = 100 };

/* A consumer that acks each delivery synchronously and records which
 * payloads were acked with success. */
struct consumer {
    uint64_t sub_id;   /* what protoq_subscribe gave */
    bool acked[NMSG];  /* "m<i>" acked with PQ_OK */
    int n_acked;       /* distinct */
    int deliveries;    /* all, redeliveries included */
    uint64_t sub_seen; /* the subscription id of the first delivery */
    bool wrong_sub;    /* a later delivery named another one */
    bool hold;         /* keep deliveries unacked (record the last) */
    uint64_t last_id;  /* the last delivery's token */
    uint32_t last_attempt;
};

static void
on_deliver(void *arg, protoq_client *c, const struct protoq_delivery *d)
{
    struct consumer *k = arg;
    char body[32];
    int i;

    k->deliveries++;
    if (k->sub_seen == 0) {
        k->sub_seen = d->subscription_id;
    } else if (d->subscription_id != k->sub_seen) {
        k->wrong_sub = true;
    }
    k->last_id = d->message_id;
    k->last_attempt = d->attempt;
    if (k->hold) {
        return;
    }
    snprintf(body, sizeof(body), "%.*s", (int)(d->len < 31 ? d->len : 31),
             (const char *)d->payload);
    i = atoi(body + 1);
    if (protoq_ack_sync(c, d->message_id, d->attempt) == PQ_OK && i >= 0 &&
        i < NMSG && !k->acked[i]) {
        k->acked[i] = true;
        k->n_acked++;
    }
}

/* Poll c until cond(arg) or timeout_ms; protoq_poll must never fail on a
 * reconnecting handle. */
static bool
poll_until(protoq_client *c, bool (*cond)(void *), void *arg, int timeout_ms)
{
    int64_t end = now_ms_mono() + timeout_ms;

    while (!cond(arg)) {
        int rc = protoq_poll(c, 50);

        ck_assert_msg(rc >= 0, "protoq_poll: %s (%d): %s", pq_strerror(rc), rc,
                      protoq_errmsg(c));
        if (now_ms_mono() > end) {
            return false;
        }
    }
    return true;
}

static int g_want;

static bool
acked_enough(void *arg)
{
    return ((struct consumer *)arg)->n_acked >= g_want;
}

static bool
delivered_once(void *arg)
{
    return ((struct consumer *)arg)->deliveries >= 1;
}

static bool
restored(void *arg)
{
    return ((struct events *)arg)->restored > 0;
}

/* ------------------------------------------------------------ tests */

/* A consumer with reconnect on goes on receiving across a broker restart on
 * the same port and data dir: every confirmed publish (half before the
 * restart, half after) is delivered and acked; it heard one loss and one
 * restoration; its deliveries keep the subscription id it was given. */
START_TEST(test_consumer_survives_restart_and_loses_nothing)
{
    struct events ev = {0};
    struct consumer k;
    protoq_client *p = pq_connect_or_fail(&g_srv);
    protoq_client *c = connect_rc(&ev, 5000);
    struct protoq_queue_info qi;
    int i;

    memset(&k, 0, sizeof(k));
    mkq(p, "jobs", false);
    for (i = 0; i < NMSG / 2; i++) {
        pub_i(p, "jobs", i, NULL, 0);
    }
    pq_check_ok(
        c, protoq_subscribe(c, "jobs", 8, NULL, 0, on_deliver, &k, &k.sub_id));
    g_want = 10;
    ck_assert(poll_until(c, acked_enough, &k, 5000));
    protoq_close(p);

    broker_down(_i);
    broker_up();
    ck_assert_msg(poll_until(c, restored, &ev, 10000), "no reconnect");
    ck_assert_int_eq(ev.lost, 1);
    ck_assert_int_eq(ev.restored, 1);
    ck_assert_int_eq((int)protoq_reconnects(c), 1);
    ck_assert(protoq_connected(c));

    p = pq_connect_or_fail(&g_srv);
    for (i = NMSG / 2; i < NMSG; i++) {
        pub_i(p, "jobs", i, NULL, 0);
    }
    g_want = NMSG;
    ck_assert_msg(poll_until(c, acked_enough, &k, 15000),
                  "acked %d of %d after the restart", k.n_acked, NMSG);
    ck_assert(!k.wrong_sub);
    ck_assert_uint_eq(k.sub_seen, k.sub_id);
    pq_check_ok(p, protoq_queue_stat(p, "jobs", &qi));
    ck_assert_uint_eq(qi.ready + qi.delayed + qi.inflight, 0);
    ck_assert_int_eq(ev.lost, 1);
    protoq_close(c);
    protoq_close(p);
}
END_TEST

/* Subscriptions come back as they were: tags (a job requiring gpu=a100
 * reaches the tagged consumer after the restart), flow state (a paused one
 * stays paused until protoq_flow with its old id resumes it), and a
 * subscription whose queue did not survive (transient) is dropped with
 * PROTOQ_CONN_SUB_LOST while the others go on. */
START_TEST(test_resubscribe_keeps_tags_flow_and_reports_lost_queue)
{
    static const struct protoq_kv gpu[] = {{"gpu", "a100"}};
    struct events ev = {0};
    struct consumer tagged, paused, gone;
    protoq_client *p = pq_connect_or_fail(&g_srv);
    protoq_client *c = connect_rc(&ev, 5000);

    memset(&tagged, 0, sizeof(tagged));
    memset(&paused, 0, sizeof(paused));
    memset(&gone, 0, sizeof(gone));
    mkq(p, "train", false);
    mkq(p, "later", false);
    mkq(p, "scratch", true);
    pq_check_ok(c, protoq_subscribe(c, "train", 4, gpu, 1, on_deliver, &tagged,
                                    &tagged.sub_id));
    pq_check_ok(c, protoq_subscribe(c, "later", 4, NULL, 0, on_deliver, &paused,
                                    &paused.sub_id));
    pq_check_ok(c, protoq_subscribe(c, "scratch", 4, NULL, 0, on_deliver, &gone,
                                    &gone.sub_id));
    pq_check_ok(c, protoq_flow(c, paused.sub_id, 0));
    protoq_close(p);

    broker_down(_i);
    broker_up();
    ck_assert_msg(poll_until(c, restored, &ev, 10000), "no reconnect");
    ck_assert_int_eq(ev.sub_lost, 1);
    ck_assert_uint_eq(ev.sub_lost_id, gone.sub_id);
    ck_assert_int_eq(ev.sub_lost_code, PROTOQ_CODE_QUEUE_NOT_FOUND);

    p = pq_connect_or_fail(&g_srv);
    pub_i(p, "train", 0, gpu, 1);
    pub_i(p, "later", 1, NULL, 0);
    g_want = 1;
    ck_assert_msg(poll_until(c, acked_enough, &tagged, 5000),
                  "the tagged subscription got nothing");
    /* Paused: nothing for a while, then the old id resumes it. */
    ck_assert(!poll_until(c, delivered_once, &paused, 300));
    pq_check_ok(c, protoq_flow(c, paused.sub_id, 4));
    ck_assert_msg(poll_until(c, acked_enough, &paused, 5000),
                  "the resumed subscription got nothing");
    ck_assert(!tagged.wrong_sub && !paused.wrong_sub);
    ck_assert_uint_eq(tagged.sub_seen, tagged.sub_id);
    ck_assert_uint_eq(paused.sub_seen, paused.sub_id);
    /* The dropped one is gone; unsubscribing the others by their old ids
     * works. */
    pq_check_ok(c, protoq_unsubscribe(c, tagged.sub_id));
    pq_check_ok(c, protoq_unsubscribe(c, paused.sub_id));
    protoq_close(c);
    protoq_close(p);
}
END_TEST

static bool
delivered_again(void *arg)
{
    struct consumer *k = arg;

    return k->deliveries >= 2;
}

/* A delivery of the old connection is the broker's again: it comes back
 * with a new attempt, and its old token answers STALE_DELIVERY. The
 * connection goes by a SIGTERM restart (_i = 0) or by the broker dropping
 * it for silence (_i = 1: the consumer makes no call for 1.5 s, over
 * heartbeat_timeout_ms, then finds out on its next poll). (A kill -9
 * restart is not used: this broker still gives a job that was running
 * the same attempt number again after one, issue 10.) */
START_TEST(test_old_delivery_token_answers_stale)
{
    struct events ev = {0};
    struct consumer k;
    protoq_client *p = pq_connect_or_fail(&g_srv);
    protoq_client *c = connect_rc(&ev, 5000);
    uint64_t old_id;
    uint32_t old_attempt;

    memset(&k, 0, sizeof(k));
    k.hold = true;
    mkq(p, "jobs", false);
    pub_i(p, "jobs", 0, NULL, 0);
    protoq_close(p);
    pq_check_ok(
        c, protoq_subscribe(c, "jobs", 1, NULL, 0, on_deliver, &k, &k.sub_id));
    g_want = 1;
    ck_assert(poll_until(c, delivered_once, &k, 5000));
    old_id = k.last_id;
    old_attempt = k.last_attempt;

    if (_i == 0) {
        broker_down(0);
        broker_up();
    } else {
        sleep_ms(1500);
    }
    ck_assert_msg(poll_until(c, delivered_again, &k, 10000),
                  "not delivered again after the reconnect");
    ck_assert_uint_eq(k.last_id, old_id);
    ck_assert_uint_ne(k.last_attempt, old_attempt);
    pq_check_remote(c, protoq_ack_sync(c, old_id, old_attempt),
                    PROTOQ_CODE_STALE_DELIVERY);
    pq_check_ok(c, protoq_ack_sync(c, k.last_id, k.last_attempt));
    protoq_close(c);
}
END_TEST

/* Outcomes of async publishes, by payload index. */
enum { NPUB = 300 };

struct outcome {
    int calls[NPUB];
    int err[NPUB];
};

struct pub_arg {
    struct outcome *o;
    int i;
};

static struct pub_arg g_pub_args[NPUB];

static void
on_confirm(void *arg, int err, uint64_t id, bool duplicate)
{
    struct pub_arg *a = arg;

    (void)id;
    (void)duplicate;
    a->o->calls[a->i]++;
    a->o->err[a->i] = err;
}

static int
pub_async_i(protoq_client *c, struct outcome *o, int i)
{
    struct protoq_message m;
    char body[32], key[32];

    memset(&m, 0, sizeof(m));
    snprintf(body, sizeof(body), "m%d", i);
    snprintf(key, sizeof(key), "k%d", i);
    m.payload = body;
    m.len = strlen(body);
    m.idempotency_key = key;
    g_pub_args[i].o = o;
    g_pub_args[i].i = i;
    return protoq_publish_async(c, "jobs", &m, on_confirm, &g_pub_args[i]);
}

/* A producer's publishes that were sent but unconfirmed when the broker
 * died are each reported failed (PQ_ECLOSED, exactly one callback), never
 * lost silently; the handle reconnects, and retrying them with the same
 * idempotency keys leaves each message stored exactly once. (The broker
 * is stopped with SIGSTOP first, so those publishes cannot be confirmed;
 * then killed.) */
START_TEST(test_unconfirmed_publishes_are_reported_failed)
{
    struct events ev = {0};
    struct outcome *o = calloc(1, sizeof(*o));
    protoq_client *c = connect_rc(&ev, 10000);
    struct protoq_queue_info qi;
    int i, failed = 0;

    ck_assert_ptr_nonnull(o);
    mkq(c, "jobs", false);
    for (i = 0; i < 200; i++) {
        pq_check_ok(c, pub_async_i(c, o, i));
    }
    pq_check_ok(c, protoq_wait_confirms(c, 0, 5000));
    for (i = 0; i < 200; i++) {
        ck_assert_int_eq(o->calls[i], 1);
        ck_assert_int_eq(o->err[i], PQ_OK);
    }
    ck_assert_int_eq(kill(g_srv.pid, SIGSTOP), 0);
    for (i = 200; i < NPUB; i++) {
        pq_check_ok(c, pub_async_i(c, o, i));
    }
    pq_check_ok(c, protoq_flush(c));
    ck_assert_uint_eq(protoq_outstanding(c), NPUB - 200);
    srv_kill9(&g_srv);
    broker_up();

    /* The call that meets the loss fails; each unconfirmed publish got
     * its callback once, with PQ_ECLOSED. */
    ck_assert_int_eq(protoq_wait_confirms(c, 0, 5000), PQ_ECLOSED);
    ck_assert_uint_eq(protoq_outstanding(c), 0);
    for (i = 200; i < NPUB; i++) {
        ck_assert_int_eq(o->calls[i], 1);
        ck_assert_int_eq(o->err[i], PQ_ECLOSED);
        failed++;
    }
    ck_assert_int_eq(failed, NPUB - 200);

    /* The caller retries (same keys); the handle reconnects for it. */
    for (i = 200; i < NPUB; i++) {
        pq_check_ok(c, pub_async_i(c, o, i));
    }
    pq_check_ok(c, protoq_wait_confirms(c, 0, 10000));
    for (i = 200; i < NPUB; i++) {
        ck_assert_int_eq(o->calls[i], 2);
        ck_assert_int_eq(o->err[i], PQ_OK);
    }
    ck_assert_int_eq((int)protoq_reconnects(c), 1);
    ck_assert_int_eq(ev.lost, 1);
    ck_assert_int_eq(ev.restored, 1);
    pq_check_ok(c, protoq_queue_stat(c, "jobs", &qi));
    ck_assert_uint_eq(qi.ready, NPUB);
    protoq_close(c);
    free(o);
}
END_TEST

/* A blocking call in a thread of its own (the handle is used by that
 * thread alone meanwhile), so that the main thread can start the broker:
 * protoqd dies with the thread that forked it (PR_SET_PDEATHSIG). */
struct stat_call {
    protoq_client *c;
    int rc;
    int64_t took_ms;
};

static void *
stat_in_thread(void *arg)
{
    struct stat_call *sc = arg;
    struct protoq_queue_info qi;
    int64_t t0 = now_ms_mono();

    sc->rc = protoq_queue_stat(sc->c, "jobs", &qi);
    sc->took_ms = now_ms_mono() - t0;
    return NULL;
}

/* A blocking call made while the broker is down waits for the reconnect
 * (here the broker comes back after ~400 ms) instead of failing; with a
 * short I/O timeout and no broker it fails with PQ_ECLOSED after about
 * that timeout, and the handle stays usable. */
START_TEST(test_blocking_call_waits_for_the_outage)
{
    struct events ev = {0};
    protoq_client *c = connect_rc(&ev, 10000);
    protoq_client *s = connect_rc(NULL, 300);
    struct protoq_queue_info qi;
    struct stat_call sc;
    pthread_t th;
    int64_t t0, took;
    int launched;
    uint16_t port = g_srv.port;

    mkq(c, "jobs", false);
    broker_down(_i);
    /* Both find out (a call in progress when it happens fails; these
     * polls do not). */
    while (protoq_connected(c) || protoq_connected(s)) {
        ck_assert_int_ge(protoq_poll(c, 10), 0);
        ck_assert_int_ge(protoq_poll(s, 10), 0);
    }

    /* No broker, 300 ms I/O timeout: PQ_ECLOSED, bounded. */
    t0 = now_ms_mono();
    ck_assert_int_eq(protoq_queue_stat(s, "jobs", &qi), PQ_ECLOSED);
    took = now_ms_mono() - t0;
    ck_assert_msg(took >= 250 && took < 3000, "took %" PRId64 " ms", took);
    ck_assert(!protoq_connected(s));
    ck_assert_ptr_nonnull(strstr(protoq_errmsg(s), "reconnecting"));

    /* The broker comes back while the call waits. */
    sc.c = c;
    ck_assert_int_eq(pthread_create(&th, NULL, stat_in_thread, &sc), 0);
    sleep_ms(400);
    launched = srv_launch(&g_srv);
    pthread_join(th, NULL);
    ck_assert_int_eq(launched, 0);
    ck_assert_int_eq(g_srv.port, port);
    ck_assert_msg(sc.rc == PQ_OK, "stat: %s", protoq_errmsg(c));
    ck_assert_msg(sc.took_ms >= 300, "took %" PRId64 " ms", sc.took_ms);
    ck_assert(protoq_connected(c));
    ck_assert_int_eq((int)protoq_reconnects(c), 1);

    /* The handle that gave up once works now. */
    pq_check_ok(s, protoq_queue_stat(s, "jobs", &qi));
    protoq_close(s);
    protoq_close(c);
}
END_TEST

/* Without the flag nothing changes: the restart kills the handle for good
 * (protoq_poll fails, later calls fail the same way, no reconnect). */
START_TEST(test_without_the_flag_the_handle_dies)
{
    struct consumer k;
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_info qi;
    int rc = 0;
    int64_t end;

    memset(&k, 0, sizeof(k));
    mkq(c, "jobs", false);
    pq_check_ok(
        c, protoq_subscribe(c, "jobs", 1, NULL, 0, on_deliver, &k, &k.sub_id));
    broker_down(_i);
    broker_up();
    end = now_ms_mono() + 5000;
    while (rc >= 0 && now_ms_mono() < end) {
        rc = protoq_poll(c, 100);
    }
    ck_assert_int_lt(rc, 0);
    ck_assert(!protoq_connected(c));
    ck_assert_int_eq(protoq_queue_stat(c, "jobs", &qi), rc);
    ck_assert_int_eq(protoq_poll(c, 100), rc);
    ck_assert_int_eq((int)protoq_reconnects(c), 0);
    protoq_close(c);
}
END_TEST

/* ------------------------------------------------------------ runner */

static TCase *
tcase(const char *name, int timeout_s)
{
    TCase *tc = tcase_create(name);

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, timeout_s);
    return tc;
}

static Suite *
reconnect_suite(void)
{
    Suite *s = suite_create("reconnect");
    TCase *tc = tcase("consumer", 60);

    tcase_add_loop_test(tc, test_consumer_survives_restart_and_loses_nothing, 0,
                        2);
    tcase_add_loop_test(
        tc, test_resubscribe_keeps_tags_flow_and_reports_lost_queue, 0, 2);
    tcase_add_loop_test(tc, test_old_delivery_token_answers_stale, 0, 2);
    suite_add_tcase(s, tc);

    tc = tcase("producer", 60);
    tcase_add_loop_test(tc, test_unconfirmed_publishes_are_reported_failed, 0,
                        1);
    tcase_add_loop_test(tc, test_blocking_call_waits_for_the_outage, 0, 2);
    suite_add_tcase(s, tc);

    tc = tcase("off", 30);
    tcase_add_loop_test(tc, test_without_the_flag_the_handle_dies, 0, 2);
    suite_add_tcase(s, tc);
    return s;
}

int
main(void)
{
    SRunner *sr;
    int failed;

    if (test_conf_write(&g_conf, CONF_TEXT) != 0) {
        return EXIT_FAILURE;
    }
    sr = srunner_create(reconnect_suite());
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    test_conf_remove(&g_conf);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
