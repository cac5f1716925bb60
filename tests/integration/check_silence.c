/*
 * check_silence.c: libprotoq notices a broker that went silent (a network
 * cut without FIN or RST), against a real protoqd on loopback with a short
 * heartbeat (heartbeat_ms 300: a handle gives the broker 3 intervals + 1 s,
 * SILENT_MS, to send something; PROTOCOL.md, "Heartbeats and liveness").
 *
 * The cut is a TCP proxy (testutil.h's proxy_start) between the handle and
 * the broker that freezes: it stops forwarding without closing anything,
 * so neither end hears of it. Only the broker's silence tells. The
 * healthy cases check that the watch does not misfire: an idle handle, and
 * one whose program stayed away longer than SILENT_MS while the broker's
 * heartbeats waited unread in the socket. Every wait is bounded.
 */
#include <check.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

enum {
    HB_MS = 300,
    SILENT_MS = 3 * HB_MS + 1000,
    /* Scheduling slack on a loaded 2-core box (and under ASan). */
    LATE_MS = 800,
};

static struct srv g_srv;
static struct test_conf g_conf;
static const char *const g_args[] = {"-c", g_conf.path, NULL};
static struct proxy g_px;

static const char CONF_TEXT[] = "# check_silence\n"
                                "heartbeat_ms 300\n"
                                "heartbeat_timeout_ms 3000\n";

static void
setup(void)
{
    ck_assert_msg(srv_start(&g_srv, g_args) == 0, "protoqd did not start");
    proxy_start(&g_px, 0, g_srv.port);
}

static void
teardown(void)
{
    int rc;

    proxy_kill(&g_px);
    rc = srv_stop(&g_srv);
    srv_cleanup(&g_srv);
    ck_assert_msg(rc == 0, "protoqd exited %d", rc);
}

/* A handle through the proxy, with opts o (NULL: defaults). */
static protoq_client *
connect_via_proxy(struct protoq_opts *o)
{
    struct protoq_server_info si;
    protoq_client *c = NULL;
    char addr[64];
    int rc;

    snprintf(addr, sizeof(addr), "127.0.0.1:%u", g_px.port);
    rc = protoq_connect(addr, o, &c);
    ck_assert_msg(rc == PQ_OK, "connect via proxy: %s", protoq_errmsg(c));
    protoq_server_info(c, &si);
    ck_assert_uint_eq(si.heartbeat_ms, HB_MS);
    return c;
}

/* protoq_poll until it fails or ms passed; its last return. */
static int
poll_until_error(protoq_client *c, int ms)
{
    int64_t until = now_ms_mono() + ms;
    int rc;

    do {
        rc = protoq_poll(c, 200);
    } while (rc >= 0 && now_ms_mono() < until);
    return rc;
}

START_TEST(test_poll_fails_when_the_broker_goes_silent)
{
    protoq_client *c = connect_via_proxy(NULL);
    int64_t t0, took;
    int rc;

    ck_assert_int_ge(protoq_poll(c, 100), 0);
    proxy_freeze(&g_px);
    t0 = now_ms_mono();
    rc = poll_until_error(c, SILENT_MS + 4000);
    took = now_ms_mono() - t0;
    ck_assert_msg(rc == PQ_ETIMEDOUT, "poll gave %s after %lld ms: %s",
                  pq_strerror(rc), (long long)took, protoq_errmsg(c));
    ck_assert_msg(took <= SILENT_MS + LATE_MS, "noticed after %lld ms",
                  (long long)took);
    ck_assert_msg(strstr(protoq_errmsg(c), "no frame from the broker for") !=
                      NULL,
                  "%s", protoq_errmsg(c));
    ck_assert_ptr_nonnull(strstr(protoq_errmsg(c), "(heartbeat 300 ms)"));
    /* Dead for good, as after any loss without reconnect. */
    ck_assert_int_eq(protoq_poll(c, 0), PQ_ETIMEDOUT);
    protoq_close(c);
}
END_TEST

START_TEST(test_blocking_call_notices_a_silent_broker)
{
    struct protoq_opts o;
    struct protoq_queue_info qi;
    protoq_client *c;
    int64_t t0, took;
    int rc;

    memset(&o, 0, sizeof(o));
    o.io_timeout_ms = 20000; /* far beyond the silence limit */
    c = connect_via_proxy(&o);
    pq_check_ok(c, protoq_queue_create(c, "q", NULL));
    proxy_freeze(&g_px);
    t0 = now_ms_mono();
    rc = protoq_queue_stat(c, "q", &qi);
    took = now_ms_mono() - t0;
    ck_assert_msg(rc == PQ_ETIMEDOUT, "stat gave %s after %lld ms: %s",
                  pq_strerror(rc), (long long)took, protoq_errmsg(c));
    ck_assert_msg(took <= SILENT_MS + LATE_MS, "noticed after %lld ms",
                  (long long)took);
    ck_assert_ptr_nonnull(
        strstr(protoq_errmsg(c), "no frame from the broker for"));
    protoq_close(c);
}
END_TEST

START_TEST(test_idle_handle_stays_up)
{
    protoq_client *c = connect_via_proxy(NULL);
    struct protoq_queue_info qi;
    int64_t until = now_ms_mono() + 3 * SILENT_MS;

    pq_check_ok(c, protoq_queue_create(c, "q", NULL));
    /* Idle in protoq_poll for 3 silence limits: the broker's heartbeats
     * keep it up. */
    while (now_ms_mono() < until) {
        int rc = protoq_poll(c, 250);

        ck_assert_msg(rc >= 0, "poll: %s: %s", pq_strerror(rc),
                      protoq_errmsg(c));
    }
    /* Away from the handle for longer than the limit: the heartbeats
     * that arrived meanwhile wait in the socket, and count. */
    poll(NULL, 0, SILENT_MS + 600);
    ck_assert_msg(protoq_poll(c, 0) >= 0, "%s", protoq_errmsg(c));
    pq_check_ok(c, protoq_queue_stat(c, "q", &qi));
    ck_assert(protoq_connected(c));
    protoq_close(c);
}
END_TEST

/* ---- a reconnecting handle ---- */

struct events {
    int lost, restored, lost_err, delivered;
};

static void
on_conn(void *arg, protoq_client *c, int event, int err, uint64_t sub_id)
{
    struct events *ev = arg;

    (void)c;
    (void)sub_id;
    if (event == PROTOQ_CONN_LOST) {
        ev->lost++;
        ev->lost_err = err;
    } else if (event == PROTOQ_CONN_RESTORED) {
        ev->restored++;
    }
}

static void
on_deliver(void *arg, protoq_client *c, const struct protoq_delivery *d)
{
    struct events *ev = arg;

    ev->delivered++;
    protoq_ack(c, d->message_id, d->attempt);
}

START_TEST(test_reconnecting_handle_reconnects_after_silence)
{
    struct protoq_opts o;
    struct protoq_message m;
    struct events ev;
    protoq_client *c, *adm = pq_connect_or_fail(&g_srv);
    uint64_t sub;
    int64_t until;

    memset(&ev, 0, sizeof(ev));
    memset(&o, 0, sizeof(o));
    o.reconnect = true;
    o.reconnect_min_ms = 20;
    o.reconnect_max_ms = 200;
    c = connect_via_proxy(&o);
    protoq_set_conn_cb(c, on_conn, &ev);
    pq_check_ok(adm, protoq_queue_create(adm, "q", NULL));
    pq_check_ok(c, protoq_subscribe(c, "q", 1, NULL, 0, on_deliver, &ev, &sub));
    proxy_freeze(&g_px); /* later connections go through */
    until = now_ms_mono() + SILENT_MS + 4000;
    while (ev.restored == 0 && now_ms_mono() < until) {
        ck_assert_int_ge(protoq_poll(c, 100), 0); /* never fails: reconnects */
    }
    ck_assert_int_eq(ev.lost, 1);
    ck_assert_int_eq(ev.lost_err, PQ_ETIMEDOUT);
    ck_assert_int_eq(ev.restored, 1);
    ck_assert_uint_eq(protoq_reconnects(c), 1);
    /* The subscription was renewed on the new connection. */
    memset(&m, 0, sizeof(m));
    m.payload = "x";
    m.len = 1;
    pq_check_ok(adm, protoq_publish(adm, "q", &m, NULL));
    /* the broker may hand it to the old, frozen connection's subscription
     * first: it comes back once the broker gives that one up (its own
     * heartbeat timeout), slow under ASan */
    until = now_ms_mono() + 15000;
    while (ev.delivered == 0 && now_ms_mono() < until) {
        ck_assert_int_ge(protoq_poll(c, 100), 0);
    }
    ck_assert_int_eq(ev.delivered, 1);
    protoq_close(c);
    protoq_close(adm);
}
END_TEST

int
main(void)
{
    Suite *s = suite_create("silence");
    TCase *tc = tcase_create("silence");
    SRunner *sr;
    int failed;

    if (test_conf_write(&g_conf, CONF_TEXT) != 0) {
        return EXIT_FAILURE;
    }
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, test_poll_fails_when_the_broker_goes_silent);
    tcase_add_test(tc, test_blocking_call_notices_a_silent_broker);
    tcase_add_test(tc, test_idle_handle_stays_up);
    tcase_add_test(tc, test_reconnecting_handle_reconnects_after_silence);
    suite_add_tcase(s, tc);
    sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    test_conf_remove(&g_conf);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
