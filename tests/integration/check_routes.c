/*
 * check_routes.c: routes and fan-out against a real protoqd on loopback:
 * a publish to a route stores one copy in each queue whose binding matches
 * the routing key (AMQP topic patterns), all copies in one log record (a
 * torn tail keeps all of them or none), bindings survive restarts and go
 * with their queue, and what a route cannot deliver is refused.
 */
#include <check.h>
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "testutil.h"

static struct srv g_srv;

static void
setup(void)
{
    ck_assert_msg(srv_start(&g_srv, NULL) == 0,
                  "protoqd did not start (PROTOQD=%s)",
                  getenv("PROTOQD") ? getenv("PROTOQD") : "(unset)");
}

static void
teardown(void)
{
    srv_cleanup(&g_srv);
}

static void
create_queues(protoq_client *c, const char *const *names, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        pq_check_ok(c, protoq_queue_create(c, names[i], NULL));
    }
}

/* Publish payload through route with key; returns how many copies. */
static size_t
pub_route(protoq_client *c, const char *route, const char *key,
          const char *payload, uint64_t *ids, size_t max)
{
    struct protoq_message m = {.payload = payload, .len = strlen(payload)};
    size_t n = 0;

    pq_check_ok(c, protoq_publish_route(c, route, key, &m, ids, max, &n));
    return n;
}

/* How many jobs of queue are ready. */
static size_t
count_ready(protoq_client *c, const char *queue)
{
    struct protoq_queue_info qi;

    pq_check_ok(c, protoq_queue_stat(c, queue, &qi));
    return qi.ready;
}

/* Does queue hold message id? */
static bool
has_job(protoq_client *c, const char *queue, uint64_t id)
{
    struct protoq_job j;
    int rc = protoq_job_get(c, queue, id, &j);

    if (rc == PQ_OK) {
        protoq_job_fini(&j);
        return true;
    }
    ck_assert_msg(rc == PQ_EREMOTE &&
                      protoq_last_error_code(c) == PROTOQ_CODE_QUEUE_NOT_FOUND,
                  "job get %s %llu: %s", queue, (unsigned long long)id,
                  protoq_errmsg(c));
    return false;
}

START_TEST(test_fanout_reaches_matching_queues_once_each)
{
    static const char *const qs[] = {"gpu", "train", "eval"};
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_message m = {.payload = "x", .len = 1};
    uint64_t ids[8];
    size_t n;

    create_queues(c, qs, 3);
    pq_check_ok(c, protoq_route_bind(c, "jobs", "gpu", "train.*.gpu"));
    pq_check_ok(c, protoq_route_bind(c, "jobs", "train", "train.#"));
    pq_check_ok(c, protoq_route_bind(c, "jobs", "train", "#.big"));
    pq_check_ok(c, protoq_route_bind(c, "jobs", "eval", "eval.#"));
    /* Binding twice is fine and changes nothing. */
    pq_check_ok(c, protoq_route_bind(c, "jobs", "eval", "eval.#"));

    /* train.big matches train.# and #.big (one copy for train) */
    n = pub_route(c, "jobs", "train.big", "a", ids, 8);
    ck_assert_uint_eq(n, 1);
    ck_assert(has_job(c, "train", ids[0]));
    /* train.x.gpu: gpu and train */
    n = pub_route(c, "jobs", "train.x.gpu", "bb", ids, 8);
    ck_assert_uint_eq(n, 2);
    ck_assert(has_job(c, "gpu", ids[0]));
    ck_assert(has_job(c, "train", ids[1]));
    ck_assert(!has_job(c, "eval", ids[0]) && !has_job(c, "eval", ids[1]));
    /* eval: "#" matches zero words */
    n = pub_route(c, "jobs", "eval", "ccc", ids, 8);
    ck_assert_uint_eq(n, 1);
    ck_assert(has_job(c, "eval", ids[0]));
    ck_assert_uint_eq(count_ready(c, "gpu"), 1);
    ck_assert_uint_eq(count_ready(c, "train"), 2);
    ck_assert_uint_eq(count_ready(c, "eval"), 1);

    /* Nothing matches: refused, nothing stored... */
    pq_check_remote(c, protoq_publish_route(c, "jobs", "other", &m, ids, 8, &n),
                    PROTOQ_CODE_QUEUE_NOT_FOUND);
    /* ...unless the publisher allows it. */
    pq_check_ok(c, protoq_publish_route_ex(c, "jobs", "other", &m,
                                           PROTOQ_ROUTE_ALLOW_UNROUTED, ids, 8,
                                           &n));
    ck_assert_uint_eq(n, 0);
    ck_assert_uint_eq(count_ready(c, "gpu") + count_ready(c, "train") +
                          count_ready(c, "eval"),
                      4);
    /* A route with no bindings does not exist. */
    pq_check_remote(c, protoq_publish_route(c, "nope", "", &m, ids, 8, &n),
                    PROTOQ_CODE_QUEUE_NOT_FOUND);
    /* Binding to a missing queue is refused. */
    pq_check_remote(c, protoq_route_bind(c, "jobs", "missing", ""),
                    PROTOQ_CODE_QUEUE_NOT_FOUND);
    protoq_close(c);
}
END_TEST

START_TEST(test_broadcast_and_unbind)
{
    static const char *const qs[] = {"w1", "w2", "w3"};
    protoq_client *c = pq_connect_or_fail(&g_srv);
    uint64_t ids[8];

    create_queues(c, qs, 3);
    for (int i = 0; i < 3; i++) {
        pq_check_ok(c, protoq_route_bind(c, "all", qs[i], NULL));
    }
    ck_assert_uint_eq(pub_route(c, "all", "anything.at.all", "hi", ids, 8), 3);
    pq_check_ok(c, protoq_route_unbind(c, "all", "w2", NULL));
    /* Unbinding what is not bound is fine. */
    pq_check_ok(c, protoq_route_unbind(c, "all", "w2", NULL));
    ck_assert_uint_eq(pub_route(c, "all", "", "hi", ids, 8), 2);
    ck_assert_uint_eq(count_ready(c, "w1"), 2);
    ck_assert_uint_eq(count_ready(c, "w2"), 1);
    ck_assert_uint_eq(count_ready(c, "w3"), 2);
    protoq_close(c);
}
END_TEST

/* The bindings, as "route queue pattern;" lines in order. */
static void
bindings_text(protoq_client *c, char *buf, size_t cap)
{
    struct protoq_binding *b;
    size_t n, off = 0;

    pq_check_ok(c, protoq_route_list(c, &b, &n));
    buf[0] = '\0';
    for (size_t i = 0; i < n && off < cap; i++) {
        off += (size_t)snprintf(buf + off, cap - off, "%s %s %s;", b[i].route,
                                b[i].queue, b[i].pattern);
    }
    free(b);
}

START_TEST(test_bindings_replay_and_vanish_with_their_queue)
{
    static const char *const qs[] = {"a", "b"};
    struct protoq_queue_attrs tattrs = {.transient = true};
    protoq_client *c = pq_connect_or_fail(&g_srv);
    char text[1024];

    create_queues(c, qs, 2);
    pq_check_ok(c, protoq_queue_create(c, "t", &tattrs));
    pq_check_ok(c, protoq_route_bind(c, "r2", "a", "x.*"));
    pq_check_ok(c, protoq_route_bind(c, "r1", "b", ""));
    pq_check_ok(c, protoq_route_bind(c, "r1", "a", "#"));
    pq_check_ok(c, protoq_route_bind(c, "r1", "t", ""));
    pq_check_ok(c, protoq_route_bind(c, "r2", "b", "y"));
    pq_check_ok(c, protoq_route_unbind(c, "r2", "b", "y"));
    bindings_text(c, text, sizeof(text));
    ck_assert_str_eq(text, "r1 b ;r1 a #;r1 t ;r2 a x.*;");
    protoq_close(c);

    /* kill -9: the bindings of durable queues come back, in order; the
     * transient queue and its binding do not. */
    srv_kill9(&g_srv);
    ck_assert_int_eq(srv_launch(&g_srv), 0);
    c = pq_connect_or_fail(&g_srv);
    bindings_text(c, text, sizeof(text));
    ck_assert_str_eq(text, "r1 b ;r1 a #;r2 a x.*;");

    /* Deleting a queue removes its bindings (r2 goes with its last one),
     * and a restart does not bring them back. */
    pq_check_ok(c, protoq_queue_delete(c, "a"));
    bindings_text(c, text, sizeof(text));
    ck_assert_str_eq(text, "r1 b ;");
    /* A queue re-created under the same name starts with no bindings. */
    pq_check_ok(c, protoq_queue_create(c, "a", NULL));
    protoq_close(c);
    srv_kill9(&g_srv);
    ck_assert_int_eq(srv_launch(&g_srv), 0);
    c = pq_connect_or_fail(&g_srv);
    bindings_text(c, text, sizeof(text));
    ck_assert_str_eq(text, "r1 b ;");
    protoq_close(c);
}
END_TEST

/* Bindings are rewritten at the start of every segment, so they outlive
 * the segment their ROUTE_BIND was first written in. */
START_TEST(test_bindings_survive_segment_deletion)
{
    struct test_conf tc;
    const char *args[] = {"-c", tc.path, NULL};
    protoq_client *c;
    char text[256], payload[4096], first[400];
    uint64_t ids[4];

    srv_cleanup(&g_srv);
    ck_assert_int_eq(test_conf_write(&tc, "segment_bytes 65536\n"), 0);
    ck_assert_int_eq(srv_start(&g_srv, args), 0);
    c = pq_connect_or_fail(&g_srv);
    pq_check_ok(c, protoq_queue_create(c, "q", NULL));
    pq_check_ok(c, protoq_route_bind(c, "r", "q", "k"));
    memset(payload, 'p', sizeof(payload) - 1);
    payload[sizeof(payload) - 1] = '\0';
    /* ~50 segments through the route, then purged: the first segments
     * hold nothing live and are deleted. */
    for (int i = 0; i < 200; i++) {
        ck_assert_uint_eq(pub_route(c, "r", "k", payload, ids, 4), 1);
    }
    /* The storage thread deletes free segments after a write completes:
     * purge (a record each time) until segment 1 is gone. */
    snprintf(first, sizeof(first), "%s/seg-0000000001.log", g_srv.data_dir);
    for (int64_t until = now_ms_mono() + 10000;
         access(first, F_OK) == 0 && now_ms_mono() < until;) {
        pq_check_ok(c, protoq_queue_purge(c, "q", NULL));
        usleep(20000);
    }
    ck_assert_msg(access(first, F_OK) != 0,
                  "%s (with the first ROUTE_BIND) was not deleted", first);
    ck_assert_uint_eq(pub_route(c, "r", "k", "after", ids, 4), 1);
    protoq_close(c);
    srv_kill9(&g_srv);
    ck_assert_int_eq(srv_launch(&g_srv), 0);
    c = pq_connect_or_fail(&g_srv);
    bindings_text(c, text, sizeof(text));
    ck_assert_str_eq(text, "r q k;");
    ck_assert_uint_eq(count_ready(c, "q"), 1);
    protoq_close(c);
    srv_cleanup(&g_srv);
    test_conf_remove(&tc);
}
END_TEST

/* Where the records of segment path end ("u32 len | u32 crc | type |
 * body" after a 20-byte header; zeros follow the last one): 20 for a
 * spare, -1 when it cannot be opened. */
static long
records_end(const char *path)
{
    uint8_t hdr[4];
    long off = 20;
    int fd = open(path, O_RDONLY);

    if (fd < 0) {
        return -1;
    }
    while (pread(fd, hdr, 4, off) == 4) {
        uint32_t len = (uint32_t)hdr[0] | (uint32_t)hdr[1] << 8 |
                       (uint32_t)hdr[2] << 16 | (uint32_t)hdr[3] << 24;

        if (len == 0) {
            break;
        }
        off += 8 + (long)len;
    }
    close(fd);
    return off;
}

/* The newest segment with records (into path) and where they end. */
static long
last_records_end(char *path, size_t cap)
{
    DIR *d = opendir(g_srv.data_dir);
    struct dirent *e;
    char best[64] = "", cand[512];
    long best_end = -1;

    ck_assert_ptr_nonnull(d);
    while ((e = readdir(d)) != NULL) {
        long end;

        if (strncmp(e->d_name, "seg-", 4) != 0 ||
            strlen(e->d_name) >= sizeof(best) || strcmp(e->d_name, best) <= 0) {
            continue;
        }
        snprintf(cand, sizeof(cand), "%s/%s", g_srv.data_dir, e->d_name);
        end = records_end(cand);
        if (end > 20) {
            snprintf(best, sizeof(best), "%s", e->d_name);
            best_end = end;
        }
    }
    closedir(d);
    ck_assert_msg(best_end > 20, "no segment with records in %s",
                  g_srv.data_dir);
    snprintf(path, cap, "%s/%s", g_srv.data_dir, best);
    return best_end;
}

/* A crash that tears the record of a fan-out keeps none of its copies
 * (they are one record); the fan-out before it keeps all of them. */
START_TEST(test_fanout_is_all_or_nothing_across_a_torn_tail)
{
    static const char *const qs[] = {"f1", "f2", "f3"};
    protoq_client *c = pq_connect_or_fail(&g_srv);
    uint64_t first[4], second[4];
    char path[512];
    long end;

    create_queues(c, qs, 3);
    for (int i = 0; i < 3; i++) {
        pq_check_ok(c, protoq_route_bind(c, "fan", qs[i], ""));
    }
    ck_assert_uint_eq(pub_route(c, "fan", "", "one", first, 4), 3);
    ck_assert_uint_eq(pub_route(c, "fan", "", "two", second, 4), 3);
    protoq_close(c);
    srv_kill9(&g_srv);
    /* A torn write: the last record loses its last bytes. */
    end = last_records_end(path, sizeof(path));
    ck_assert_int_eq(truncate(path, end - 3), 0);
    ck_assert_int_eq(srv_launch(&g_srv), 0);
    c = pq_connect_or_fail(&g_srv);
    for (int i = 0; i < 3; i++) {
        ck_assert_msg(has_job(c, qs[i], first[i]),
                      "the first fan-out lost its copy in %s", qs[i]);
        ck_assert_msg(!has_job(c, qs[i], second[i]),
                      "the torn fan-out kept its copy in %s (of 3)", qs[i]);
    }
    protoq_close(c);
}
END_TEST

/* A batch across queues is one record too. */
START_TEST(test_batch_is_all_or_nothing_across_a_torn_tail)
{
    static const char *const qs[] = {"b1", "b2", "b3"};
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_message m[3];
    uint64_t ids[3];
    char path[512];

    create_queues(c, qs, 3);
    for (int i = 0; i < 3; i++) {
        m[i] = (struct protoq_message){.payload = "batch", .len = 5};
    }
    pq_check_ok(c, protoq_publish_batch_multi(c, qs, m, 3, ids));
    protoq_close(c);
    srv_kill9(&g_srv);
    ck_assert_int_eq(truncate(path, last_records_end(path, sizeof(path)) - 3),
                     0);
    ck_assert_int_eq(srv_launch(&g_srv), 0);
    c = pq_connect_or_fail(&g_srv);
    /* (queue stat, not job get: the same check runs against an older
     * protoqd, which kept the first two of the three) */
    for (int i = 0; i < 3; i++) {
        ck_assert_msg(count_ready(c, qs[i]) == 0,
                      "the torn batch kept its message in %s", qs[i]);
    }
    protoq_close(c);
}
END_TEST

START_TEST(test_bad_route_requests_are_refused)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    char pattern[300];

    pq_check_ok(c, protoq_queue_create(c, "q", NULL));
    memset(pattern, 'a', sizeof(pattern) - 1);
    pattern[sizeof(pattern) - 1] = '\0';
    pq_check_remote(c, protoq_route_bind(c, "r", "q", pattern),
                    PROTOQ_CODE_BAD_REQUEST);
    pq_check_remote(c, protoq_route_bind(c, "bad name", "q", ""),
                    PROTOQ_CODE_BAD_REQUEST);
    pq_check_ok(c, protoq_route_bind(c, "r", "q", ""));
    {
        struct protoq_message m = {.payload = "x", .len = 1};
        size_t n;

        pq_check_remote(c,
                        protoq_publish_route(c, "r", pattern, &m, NULL, 0, &n),
                        PROTOQ_CODE_BAD_REQUEST);
    }
    protoq_close(c);
}
END_TEST

/* Payloads of every ready message of queue, in order, "|"-joined into
 * buf; nothing is acked (the messages go back when c closes). */
struct take {
    char *buf;
    size_t cap, len;
    int n;
};

static void
take_cb(void *arg, protoq_client *c, const struct protoq_delivery *d)
{
    struct take *t = arg;

    (void)c;
    t->len += (size_t)snprintf(t->buf + t->len, t->cap - t->len, "%.*s|",
                               (int)d->len, (const char *)d->payload);
    t->n++;
}

static void
payloads_of(const char *queue, int want, char *buf, size_t cap)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct take t = {.buf = buf, .cap = cap};
    int64_t until = now_ms_mono() + 10000;

    buf[0] = '\0';
    pq_check_ok(c, protoq_subscribe(c, queue, 100, NULL, 0, take_cb, &t, NULL));
    while (t.n < want && now_ms_mono() < until) {
        int rc = protoq_poll(c, 50); /* callbacks run, or a PQ_* error */

        ck_assert_msg(rc >= 0, "protoq_poll: %s: %s", pq_strerror(rc),
                      protoq_errmsg(c));
    }
    protoq_close(c);
}

static int
cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* s ("a|b|c|") with its |-separated items sorted, in place. */
static void
sort_items(char *s)
{
    char *item[16], copy[256];
    size_t n = 0, at = 0;

    snprintf(copy, sizeof(copy), "%s", s);
    for (char *save = NULL, *t = strtok_r(copy, "|", &save);
         t != NULL && n < 16; t = strtok_r(NULL, "|", &save)) {
        item[n++] = t;
    }
    qsort(item, n, sizeof(item[0]), cmp_str);
    s[0] = '\0';
    for (size_t i = 0; i < n; i++) {
        at += (size_t)sprintf(s + at, "%s|", item[i]);
    }
}

/* With no payload budget every durable body stays on disk: a delivery
 * reads it back from the one record of its publish, and finds its own
 * part of a batch or a fan-out, before and after a restart. */
START_TEST(test_evicted_bodies_come_back_from_a_shared_record)
{
    static const char *const qs[] = {"e1", "e2", "e1"};
    struct protoq_queue_attrs now = {.no_backoff = true};
    struct test_conf tc;
    const char *args[] = {"-c", tc.path, NULL};
    struct protoq_message m[3] = {{.payload = "first", .len = 5},
                                  {.payload = "second", .len = 6},
                                  {.payload = "third", .len = 5}};
    protoq_client *c;
    char got[256];

    srv_cleanup(&g_srv);
    ck_assert_int_eq(test_conf_write(&tc, "payload_budget_bytes 0\n"), 0);
    ck_assert_int_eq(srv_start(&g_srv, args), 0);
    c = pq_connect_or_fail(&g_srv);
    /* no backoff: what the reader leaves comes back at once in its
     * order (with a backoff, jittered delays would reorder it) */
    pq_check_ok(c, protoq_queue_create(c, "e1", &now));
    pq_check_ok(c, protoq_queue_create(c, "e2", &now));
    pq_check_ok(c, protoq_publish_batch_multi(c, qs, m, 3, NULL));
    pq_check_ok(c, protoq_route_bind(c, "both", "e2", ""));
    pq_check_ok(c, protoq_route_bind(c, "both", "e1", ""));
    ck_assert_uint_eq(pub_route(c, "both", "", "fanned", NULL, 0), 2);
    protoq_close(c);
    for (int round = 0; round < 2; round++) {
        /* After the kill -9 the order is not the subject: each reader's
         * deliveries were running (failed attempts put back at the start)
         * or requeued already, depending on which records made it. */
        payloads_of("e1", 3, got, sizeof(got));
        if (round > 0) {
            sort_items(got);
        }
        ck_assert_str_eq(got, round == 0 ? "first|third|fanned|"
                                         : "fanned|first|third|");
        payloads_of("e2", 2, got, sizeof(got));
        if (round > 0) {
            sort_items(got);
        }
        ck_assert_str_eq(got, round == 0 ? "second|fanned|" : "fanned|second|");
        srv_kill9(&g_srv);
        ck_assert_int_eq(srv_launch(&g_srv), 0);
    }
    srv_cleanup(&g_srv);
    test_conf_remove(&tc);
}
END_TEST

static Suite *
routes_suite(void)
{
    Suite *s = suite_create("routes");
    TCase *tc = tcase_create("routes");

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_fanout_reaches_matching_queues_once_each);
    tcase_add_test(tc, test_broadcast_and_unbind);
    tcase_add_test(tc, test_bindings_replay_and_vanish_with_their_queue);
    tcase_add_test(tc, test_bindings_survive_segment_deletion);
    tcase_add_test(tc, test_fanout_is_all_or_nothing_across_a_torn_tail);
    tcase_add_test(tc, test_batch_is_all_or_nothing_across_a_torn_tail);
    tcase_add_test(tc, test_bad_route_requests_are_refused);
    tcase_add_test(tc, test_evicted_bodies_come_back_from_a_shared_record);
    suite_add_tcase(s, tc);
    return s;
}

int
main(void)
{
    SRunner *sr = srunner_create(routes_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
