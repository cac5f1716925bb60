/*
 * check_durability.c: what survives a restart of a real protoqd: confirmed
 * messages in order, nothing that was acked, every confirmed message after
 * kill -9, and the queues (deleted ones stay deleted).
 *
 * Every test gets a fresh broker (server_fixture.h) and every wait is
 * bounded. PROTOQD names the broker binary.
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

static Suite *
durability_suite(void)
{
    Suite *s = suite_create("durability");
    TCase *tc;

    tc = tcase(s, "durability", 60);
    tcase_add_test(tc, test_restart_keeps_confirmed_messages_in_order);
    tcase_add_test(tc, test_restart_forgets_acked_messages);
    tcase_add_test(tc, test_kill9_loses_no_confirmed_message);
    tcase_add_test(tc, test_kill9_after_all_confirmed_keeps_all_in_order);
    tcase_add_test(tc,
                   test_queues_survive_restart_and_deleted_ones_stay_deleted);

    return s;
}

int
main(void)
{
    SRunner *sr = srunner_create(durability_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
