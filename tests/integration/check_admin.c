/*
 * check_admin.c: queue administration against a real protoqd on loopback:
 * create (idempotent, conflicting attributes, defaults), name validation,
 * list, stat, purge, delete, and operations on a missing queue.
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

static Suite *
admin_suite(void)
{
    Suite *s = suite_create("admin");
    TCase *tc;

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

    return s;
}

int
main(void)
{
    SRunner *sr = srunner_create(admin_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
