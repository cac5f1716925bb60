/*
 * check_route.c: the route set (route.c) and its pattern matcher, and the
 * PUBLISH_BATCH record that stores a fan-out (record.c).
 */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "pqerr.h"
#include "pqlimits.h"
#include "record.h"
#include "route.h"

struct match_case {
    const char *pattern, *key;
    bool want;
};

static const struct match_case cases[] = {
    {"", "", true},
    {"", "anything.at.all", true},
    {"a", "a", true},
    {"a", "b", false},
    {"a", "a.b", false},
    {"a.b", "a.b", true},
    {"a.b", "a", false},
    {"*", "a", true},
    {"*", "", false},
    {"*", "a.b", false},
    {"*.b", "a.b", true},
    {"a.*", "a", false},
    {"train.*.gpu", "train.big.gpu", true},
    {"train.*.gpu", "train.gpu", false},
    {"train.*.gpu", "train.a.b.gpu", false},
    {"#", "", true},
    {"#", "a", true},
    {"#", "a.b.c", true},
    {"a.#", "a", true},
    {"a.#", "a.b.c", true},
    {"a.#", "b.a", false},
    {"#.c", "a.b.c", true},
    {"#.c", "c", true},
    {"#.c", "c.d", false},
    {"a.#.c", "a.c", true},
    {"a.#.c", "a.x.y.c", true},
    {"a.#.c", "a.x.y.d", false},
    {"#.#", "", true},
    {"#.#.#.#.#.#.#.#.#.#.z", "a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.a.b", false},
    {"*.#", "", false},
    {"*.#", "a", true},
    {"#.*", "a.b", true},
    {"a.*.#", "a", false},
    {"a.*.#", "a.b.c.d", true},
    {"a..b", "a..b", true},
    {"a.*.b", "a..b", true},
    {"ab*", "abc", false}, /* "*" is a wildcard only as a whole word */
    {"a#", "a", false},
};

START_TEST(test_pattern_match_table)
{
    const struct match_case *t = &cases[_i];

    ck_assert_msg(route_pattern_match(t->pattern, t->key) == t->want,
                  "pattern \"%s\" key \"%s\": want %s", t->pattern, t->key,
                  t->want ? "match" : "no match");
}
END_TEST

/* The longest keys and patterns, all dots (256 empty words): bounded and
 * still right. */
START_TEST(test_pattern_match_at_the_limits)
{
    char key[PQ_ROUTING_KEY_MAX + 1], pattern[PQ_ROUTE_PATTERN_MAX + 1];

    memset(key, '.', PQ_ROUTING_KEY_MAX);
    key[PQ_ROUTING_KEY_MAX] = '\0';
    memset(pattern, '.', PQ_ROUTE_PATTERN_MAX);
    pattern[PQ_ROUTE_PATTERN_MAX] = '\0';
    ck_assert(route_pattern_match(pattern, key));
    ck_assert(route_pattern_match("#", key));
    pattern[0] = '*';
    ck_assert(!route_pattern_match(pattern, key));
    ck_assert(route_pattern_valid(pattern));
    ck_assert(!route_pattern_valid(
        "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
        "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
        "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
        "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
        "x"));
}
END_TEST

START_TEST(test_match_gives_each_queue_once_in_bind_order)
{
    struct routes *rs = routes_new();
    const char *q[PQ_ROUTE_BINDINGS_MAX];
    uint32_t n;

    ck_assert_ptr_nonnull(rs);
    ck_assert_int_eq(routes_bind(rs, "r", "q2", "a.#"), PQ_OK);
    ck_assert_int_eq(routes_bind(rs, "r", "q1", "*.b"), PQ_OK);
    ck_assert_int_eq(routes_bind(rs, "r", "q2", "#.b"), PQ_OK);
    ck_assert_int_eq(routes_bind(rs, "r", "q3", "c"), PQ_OK);
    ck_assert_int_eq(routes_bind(rs, "r", "q3", "c"), PQ_EEXIST);
    ck_assert_uint_eq(routes_binding_count(rs), 4);
    ck_assert_int_eq(routes_match(rs, "r", "a.b", q, PQ_ROUTE_BINDINGS_MAX, &n),
                     PQ_OK);
    ck_assert_uint_eq(n, 2);
    ck_assert_str_eq(q[0], "q2");
    ck_assert_str_eq(q[1], "q1");
    ck_assert_int_eq(routes_match(rs, "r", "z", q, PQ_ROUTE_BINDINGS_MAX, &n),
                     PQ_OK);
    ck_assert_uint_eq(n, 0);
    ck_assert_int_eq(routes_match(rs, "x", "", q, PQ_ROUTE_BINDINGS_MAX, &n),
                     PQ_ENOTFOUND);
    ck_assert_int_eq(routes_bind(rs, "bad name", "q", ""), PQ_EINVAL);
    routes_free(rs);
}
END_TEST

static void
collect(void *arg, const char *route, const char *queue, const char *pattern)
{
    char *buf = arg;
    size_t len = strlen(buf);

    snprintf(buf + len, 512 - len, "%s/%s/%s;", route, queue, pattern);
}

START_TEST(test_unbind_and_queue_removal)
{
    struct routes *rs = routes_new();
    char buf[512] = "";

    ck_assert_int_eq(routes_bind(rs, "b", "q1", ""), PQ_OK);
    ck_assert_int_eq(routes_bind(rs, "a", "q2", "x"), PQ_OK);
    ck_assert_int_eq(routes_bind(rs, "a", "q1", "y"), PQ_OK);
    ck_assert_int_eq(routes_bind(rs, "c", "q1", "z"), PQ_OK);
    routes_foreach(rs, collect, buf);
    ck_assert_str_eq(buf, "a/q2/x;a/q1/y;b/q1/;c/q1/z;");
    ck_assert_int_eq(routes_unbind(rs, "a", "q2", "y"), PQ_ENOTFOUND);
    ck_assert_int_eq(routes_unbind(rs, "a", "q2", "x"), PQ_OK);
    ck_assert_uint_eq(routes_unbind_queue(rs, "q1"), 3);
    buf[0] = '\0';
    routes_foreach(rs, collect, buf);
    ck_assert_str_eq(buf, ""); /* every route went with its last binding */
    ck_assert_uint_eq(routes_binding_count(rs), 0);
    ck_assert_int_eq(routes_bind(rs, "a", "q1", ""), PQ_OK);
    routes_free(rs);
}
END_TEST

START_TEST(test_binding_limits)
{
    struct routes *rs = routes_new();
    char name[32];

    for (int i = 0; i < PQ_ROUTE_BINDINGS_MAX; i++) {
        snprintf(name, sizeof(name), "q%d", i);
        ck_assert_int_eq(routes_bind(rs, "r", name, ""), PQ_OK);
    }
    ck_assert_int_eq(routes_bind(rs, "r", "one-more", ""), PQ_EFULL);
    for (int i = 1; i < PQ_BINDINGS_MAX / PQ_ROUTE_BINDINGS_MAX; i++) {
        char route[32];

        snprintf(route, sizeof(route), "r%d", i);
        for (int k = 0; k < PQ_ROUTE_BINDINGS_MAX; k++) {
            snprintf(name, sizeof(name), "q%d", k);
            ck_assert_int_eq(routes_bind(rs, route, name, ""), PQ_OK);
        }
    }
    ck_assert_uint_eq(routes_binding_count(rs), PQ_BINDINGS_MAX);
    ck_assert_int_eq(routes_bind(rs, "new", "q", ""), PQ_EFULL);
    routes_free(rs);
}
END_TEST

START_TEST(test_publish_batch_record_round_trip)
{
    struct rec_kv req = {{"gpu", 3}, {"a100", 4}};
    struct rec_publish items[2] = {
        {.id = 7,
         .queue = {"q1", 2},
         .priority = 3,
         .n_requires = 1,
         .requires = &req,
         .body = {(const uint8_t *)"body-one", 8}},
        {.id = 8, .queue = {"q2", 2}, .body = {(const uint8_t *)"b2", 2}},
    };
    struct record r = {.type = REC_PUBLISH_BATCH}, d;
    struct rec_publish p;
    uint8_t buf[512];
    size_t cur = 0;
    ssize_t n;

    r.u.batch.n = 2;
    r.u.batch.items = items;
    n = record_encode(&r, buf, sizeof(buf));
    ck_assert_int_gt(n, 0);
    ck_assert_int_eq(record_decode(REC_PUBLISH_BATCH, buf, (size_t)n, &d),
                     PQ_OK);
    ck_assert_uint_eq(d.u.batch.n, 2);
    ck_assert(record_batch_next(&d.u.batch, &cur, &p));
    ck_assert_uint_eq(p.id, 7);
    ck_assert_uint_eq(p.priority, 3);
    ck_assert_uint_eq(p.n_requires, 1);
    ck_assert_int_eq(memcmp(p.body.ptr, "body-one", 8), 0);
    ck_assert(record_batch_next(&d.u.batch, &cur, &p));
    ck_assert_uint_eq(p.id, 8);
    ck_assert_int_eq(memcmp(p.queue.ptr, "q2", 2), 0);
    ck_assert(!record_batch_next(&d.u.batch, &cur, &p));
    /* Every truncation is refused, never read past. */
    for (ssize_t k = 0; k < n; k++) {
        ck_assert_int_eq(record_decode(REC_PUBLISH_BATCH, buf, (size_t)k, &d),
                         PQ_ECORRUPT);
    }
    /* An empty batch is never written nor read. */
    r.u.batch.n = 0;
    ck_assert_int_lt(record_encode(&r, buf, sizeof(buf)), 0);
    memset(buf, 0, 4);
    ck_assert_int_eq(record_decode(REC_PUBLISH_BATCH, buf, 4, &d), PQ_ECORRUPT);
    ck_assert(record_type_known(REC_ROUTE_BIND));
    ck_assert(!record_type_known(11));
    ck_assert_str_eq(record_type_name(REC_PUBLISH_BATCH), "publish_batch");
}
END_TEST

START_TEST(test_route_record_round_trip)
{
    struct record r, d;
    uint8_t buf[128];
    ssize_t n;

    memset(&r, 0, sizeof(r));
    r.type = REC_ROUTE_UNBIND;
    r.u.route.route = (struct rec_str){"r", 1};
    r.u.route.queue = (struct rec_str){"queue", 5};
    r.u.route.pattern = (struct rec_str){"a.#", 3};
    n = record_encode(&r, buf, sizeof(buf));
    ck_assert_int_eq(n, 4 + 1 + 4 + 5 + 4 + 3);
    ck_assert_int_eq(record_decode(REC_ROUTE_UNBIND, buf, (size_t)n, &d),
                     PQ_OK);
    ck_assert_int_eq(memcmp(d.u.route.pattern.ptr, "a.#", 3), 0);
    ck_assert_int_eq(record_decode(REC_ROUTE_BIND, buf, (size_t)n - 1, &d),
                     PQ_ECORRUPT);
}
END_TEST

static Suite *
route_suite(void)
{
    Suite *s = suite_create("route");
    TCase *tc = tcase_create("patterns");

    tcase_add_loop_test(tc, test_pattern_match_table, 0,
                        (int)(sizeof(cases) / sizeof(cases[0])));
    tcase_add_test(tc, test_pattern_match_at_the_limits);
    suite_add_tcase(s, tc);
    tc = tcase_create("set");
    tcase_add_test(tc, test_match_gives_each_queue_once_in_bind_order);
    tcase_add_test(tc, test_unbind_and_queue_removal);
    tcase_add_test(tc, test_binding_limits);
    suite_add_tcase(s, tc);
    tc = tcase_create("records");
    tcase_add_test(tc, test_publish_batch_record_round_trip);
    tcase_add_test(tc, test_route_record_round_trip);
    suite_add_tcase(s, tc);
    return s;
}

int
main(void)
{
    SRunner *sr = srunner_create(route_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
