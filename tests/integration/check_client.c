/*
 * check_client.c: libprotoq's own behaviour against a real protoqd on
 * loopback: what a program may do from inside its callbacks.
 *
 * Callbacks never nest: a blocking call made from a delivery or confirm
 * callback gets its reply, but the deliveries that arrive meanwhile wait
 * for the outermost dispatch. Each test counts how deep callbacks are on
 * the stack and fails if it is ever more than one; the first one also runs
 * the 100,000-message workload that used to overflow the stack (16,236
 * nested frames, SIGSEGV). The broker runs with fsync never: these tests
 * are about the client, and a synchronous ack per message with an fsync
 * each would take minutes.
 */
#include <check.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

static struct srv g_srv;
static const char *const g_args[] = {"--fsync", "never", NULL};

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

/* Publish n small messages to queue, pipelined, every confirm checked. */
static void
publish_n(protoq_client *c, const char *queue, size_t n)
{
    char buf[32];
    struct protoq_message m;

    memset(&m, 0, sizeof(m));
    for (size_t i = 0; i < n; i++) {
        m.len = (size_t)snprintf(buf, sizeof(buf), "%zu", i);
        m.payload = buf;
        pq_check_ok(c, protoq_publish_async(c, queue, &m, NULL, NULL));
        if (protoq_outstanding(c) > 2000) {
            pq_check_ok(c, protoq_wait_confirms(c, 1000, 30000));
        }
    }
    pq_check_ok(c, protoq_wait_confirms(c, 0, 30000));
    ck_assert_uint_eq(protoq_async_errors(c), 0);
}

/* ---- a synchronous ack from the delivery callback ---- */

struct sync_state {
    size_t got;
    uint64_t next;        /* payloads arrive in order 0, 1, 2, ... */
    int depth, max_depth; /* callbacks on the stack */
    int ack_failures;
};

static void
ack_sync_cb(void *arg, protoq_client *c, const struct protoq_delivery *d)
{
    struct sync_state *st = arg;
    char want[32];
    int n;

    st->depth++;
    if (st->depth > st->max_depth) {
        st->max_depth = st->depth;
    }
    n = snprintf(want, sizeof(want), "%" PRIu64, st->next);
    if ((size_t)n == d->len && memcmp(want, d->payload, d->len) == 0) {
        st->next++;
    }
    if (protoq_ack_sync(c, d->message_id, d->attempt) != PQ_OK) {
        st->ack_failures++;
    }
    st->got++;
    st->depth--;
}

START_TEST(test_ack_sync_in_callback_does_not_nest)
{
    enum { N = 100000 };
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct sync_state st;
    struct protoq_queue_info info;
    int rounds = 0;

    memset(&st, 0, sizeof(st));
    pq_check_ok(c, protoq_queue_create(c, "deep", NULL));
    publish_n(c, "deep", N);
    pq_check_ok(
        c, protoq_subscribe(c, "deep", 64, NULL, 0, ack_sync_cb, &st, NULL));
    while (st.got < N && rounds++ < 200000) {
        ck_assert_int_ge(protoq_poll(c, 1000), 0);
    }
    ck_assert_uint_eq(st.got, N);
    ck_assert_uint_eq(st.next, N); /* every payload, in order */
    ck_assert_int_eq(st.ack_failures, 0);
    ck_assert_int_eq(st.max_depth, 1);
    pq_check_ok(c, protoq_queue_stat(c, "deep", &info));
    ck_assert_uint_eq(info.ready + info.inflight + info.delayed, 0);
    protoq_close(c);
}
END_TEST

/* ---- a blocking publish from a confirm callback ---- */

struct confirm_state {
    protoq_client *c;
    size_t confirms, published_inside;
    int depth, max_depth;
    int failures;
};

static void
confirm_cb(void *arg, int err, uint64_t message_id, bool duplicate)
{
    struct confirm_state *st = arg;
    struct protoq_message m;
    uint64_t id;

    (void)message_id;
    (void)duplicate;
    st->depth++;
    if (st->depth > st->max_depth) {
        st->max_depth = st->depth;
    }
    if (err != PQ_OK) {
        st->failures++;
    }
    st->confirms++;
    memset(&m, 0, sizeof(m));
    m.payload = "inner";
    m.len = 5;
    if (protoq_publish(st->c, "side", &m, &id) == PQ_OK) {
        st->published_inside++;
    } else {
        st->failures++;
    }
    st->depth--;
}

START_TEST(test_publish_sync_in_confirm_callback)
{
    enum { N = 2000 };
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct confirm_state st;
    struct protoq_message m;
    struct protoq_queue_info info;

    memset(&st, 0, sizeof(st));
    st.c = c;
    pq_check_ok(c, protoq_queue_create(c, "main", NULL));
    pq_check_ok(c, protoq_queue_create(c, "side", NULL));
    memset(&m, 0, sizeof(m));
    m.payload = "outer";
    m.len = 5;
    for (size_t i = 0; i < N; i++) {
        pq_check_ok(c, protoq_publish_async(c, "main", &m, confirm_cb, &st));
    }
    pq_check_ok(c, protoq_wait_confirms(c, 0, 30000));
    ck_assert_uint_eq(st.confirms, N);
    ck_assert_uint_eq(st.published_inside, N);
    ck_assert_int_eq(st.failures, 0);
    ck_assert_int_eq(st.max_depth, 1);
    pq_check_ok(c, protoq_queue_stat(c, "side", &info));
    ck_assert_uint_eq(info.ready, N);
    protoq_close(c);
}
END_TEST

/* ---- deliveries that arrive during a blocking call wait their turn ---- */

struct order_state {
    protoq_client *c;
    uint64_t sub;
    size_t got;
    int depth, max_depth;
    bool order_ok;
    uint64_t last_id;
};

static void
admin_cb(void *arg, protoq_client *c, const struct protoq_delivery *d)
{
    struct order_state *st = arg;
    struct protoq_queue_info info;

    st->depth++;
    if (st->depth > st->max_depth) {
        st->max_depth = st->depth;
    }
    if (d->message_id <= st->last_id) {
        st->order_ok = false;
    }
    st->last_id = d->message_id;
    /* A blocking admin call and an ack from inside the callback. */
    if (protoq_queue_stat(c, "order", &info) != PQ_OK ||
        protoq_ack(c, d->message_id, d->attempt) != PQ_OK) {
        st->order_ok = false;
    }
    st->got++;
    st->depth--;
}

START_TEST(test_blocking_admin_call_in_callback_keeps_order)
{
    enum { N = 5000 };
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct order_state st;
    int rounds = 0;

    memset(&st, 0, sizeof(st));
    st.c = c;
    st.order_ok = true;
    pq_check_ok(c, protoq_queue_create(c, "order", NULL));
    publish_n(c, "order", N);
    pq_check_ok(
        c, protoq_subscribe(c, "order", 200, NULL, 0, admin_cb, &st, &st.sub));
    while (st.got < N && rounds++ < 100000) {
        ck_assert_int_ge(protoq_poll(c, 1000), 0);
    }
    ck_assert_uint_eq(st.got, N);
    ck_assert(st.order_ok);
    ck_assert_int_eq(st.max_depth, 1);
    protoq_close(c);
}
END_TEST

static Suite *
client_suite(void)
{
    Suite *s = suite_create("client");
    TCase *tc = tcase_create("callbacks");

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_ack_sync_in_callback_does_not_nest);
    tcase_add_test(tc, test_publish_sync_in_confirm_callback);
    tcase_add_test(tc, test_blocking_admin_call_in_callback_keeps_order);
    suite_add_tcase(s, tc);
    return s;
}

int
main(void)
{
    SRunner *sr = srunner_create(client_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
