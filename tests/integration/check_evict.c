/*
 * check_evict.c: deliveries of payloads the broker keeps on disk only (past
 * payload_budget_bytes). They come in the order the queue hands them out,
 * with the right bytes, across a restart; reading them back happens off
 * the event loop, so a slow disk (PROTOQ_DELAY=store-read:MS makes every
 * read back that slow) delays only the deliveries that wait for it, never
 * the broker's other clients; and a delivery whose holder went away or
 * whose lease ran out while it was read is never sent stale.
 */
#include <check.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "protoq.h"
#include "testutil.h"

static struct srv g_srv;
static struct test_conf g_conf;
static const char *const g_args[] = {"-c", g_conf.path, NULL};

enum { READ_DELAY_MS = 3000 };

static void
start(const char *conf, const char *delay)
{
    ck_assert_int_eq(test_conf_write(&g_conf, conf), 0);
    if (delay != NULL) {
        setenv("PROTOQ_DELAY", delay, 1);
    }
    ck_assert_msg(srv_start(&g_srv, g_args) == 0, "protoqd did not start");
    unsetenv("PROTOQ_DELAY");
}

static void
teardown(void)
{
    ck_assert_int_eq(srv_stop(&g_srv), 0); /* exit 0: no leak under ASan */
    srv_cleanup(&g_srv);
    test_conf_remove(&g_conf);
}

/* What a consumer got. */
struct got {
    uint32_t n;
    uint64_t id[512];
    uint32_t attempt[512];
    uint32_t len[512];
    uint32_t seq[512]; /* the number the payload starts with */
    bool bytes_ok;     /* every payload byte as published */
};

static void
fill(char *buf, uint32_t len, uint32_t seq)
{
    int n = snprintf(buf, len, "%u:", seq);

    for (uint32_t i = (uint32_t)n; i < len; i++) {
        buf[i] = (char)('a' + (seq + i) % 26);
    }
}

static void
on_deliver(void *arg, protoq_client *c, const struct protoq_delivery *d)
{
    struct got *g = arg;
    static char want[8192];
    uint32_t seq = (uint32_t)strtoul(d->payload, NULL, 10);

    (void)c;
    ck_assert_uint_lt(g->n, 512);
    ck_assert_uint_le(d->len, sizeof(want));
    fill(want, (uint32_t)d->len, seq);
    g->bytes_ok &= memcmp(want, d->payload, d->len) == 0;
    g->id[g->n] = d->message_id;
    g->attempt[g->n] = d->attempt;
    g->len[g->n] = (uint32_t)d->len;
    g->seq[g->n] = seq;
    g->n++;
}

/* poll c until g holds want deliveries or timeout_ms passed */
static void
wait_got(protoq_client *c, struct got *g, uint32_t want, int timeout_ms)
{
    int64_t end = now_ms_mono() + timeout_ms;

    while (g->n < want && now_ms_mono() < end) {
        ck_assert_int_ge(protoq_poll(c, 50), 0);
    }
}

static void
publish_seq(protoq_client *c, const char *q, uint32_t seq, uint32_t len,
            uint64_t *id)
{
    static char buf[8192];
    struct protoq_message m = {.payload = buf, .len = len};

    fill(buf, len, seq);
    pq_check_ok(c, protoq_publish(c, q, &m, id));
}

/*
 * A 4 KiB budget and payloads of 100 to 3,000 bytes: the first few stay in
 * memory, the rest are read back. A consumer gets all 300
 * in publish order, every byte right; again after a restart (replay keeps
 * within the budget the same way).
 */
START_TEST(test_evicted_payloads_come_in_order_with_their_bytes)
{
    struct protoq_queue_attrs a;
    protoq_client *c;
    uint64_t ids[300], sub;
    struct got *g = calloc(1, sizeof(*g));

    ck_assert_ptr_nonnull(g);
    start("payload_budget_bytes 4k\n", NULL);
    c = pq_connect_or_fail(&g_srv);
    memset(&a, 0, sizeof(a));
    a.no_backoff = true; /* given back = ready at once, in order */
    pq_check_ok(c, protoq_queue_create(c, "q", &a));
    for (uint32_t i = 0; i < 300; i++) {
        publish_seq(c, "q", i, 100 + (i * 997) % 2900, &ids[i]);
    }
    /* all 300 in order; the even ones acked, the odd ones held, then
     * given back (prefetch 200: room for the 150 held) */
    g->bytes_ok = true;
    pq_check_ok(c, protoq_subscribe(c, "q", 200, NULL, 0, on_deliver, g, &sub));
    for (uint32_t i = 0; i < 300; i++) {
        wait_got(c, g, i + 1, 10000);
        ck_assert_uint_ge(g->n, i + 1);
        ck_assert_uint_eq(g->seq[i], i);
        ck_assert_uint_eq(g->id[i], ids[i]);
        ck_assert_uint_eq(g->len[i], 100 + (i * 997) % 2900);
        if (i % 2 == 0) {
            pq_check_ok(c, protoq_ack(c, g->id[i], g->attempt[i]));
        }
    }
    ck_assert(g->bytes_ok);
    pq_check_ok(c, protoq_unsubscribe(c, sub));
    protoq_close(c);

    /* after a restart: the 150 odd ones, in order */
    ck_assert_int_eq(srv_restart(&g_srv), 0);
    c = pq_connect_or_fail(&g_srv);
    memset(g, 0, sizeof(*g));
    g->bytes_ok = true;
    pq_check_ok(c, protoq_subscribe(c, "q", 32, NULL, 0, on_deliver, g, &sub));
    for (uint32_t i = 0; i < 150; i++) {
        wait_got(c, g, i + 1, 10000);
        ck_assert_uint_ge(g->n, i + 1);
        ck_assert_uint_eq(g->seq[i], 2 * i + 1);
        ck_assert_uint_eq(g->id[i], ids[2 * i + 1]);
        pq_check_ok(c, protoq_ack(c, g->id[i], g->attempt[i]));
    }
    ck_assert(g->bytes_ok);
    wait_got(c, g, 151, 300);
    ck_assert_uint_eq(g->n, 150); /* nothing more */
    protoq_close(c);
    free(g);
}
END_TEST

/*
 * Every read back takes 3 s. A consumer subscribes to a queue whose only
 * message is on disk; another client's publish, sent while that read is
 * under way, is confirmed before the delivery arrives. (When the loop
 * itself read the payload, the publish waited the 3 s and the delivery was
 * already there.)
 */
START_TEST(test_slow_read_back_does_not_stop_other_clients)
{
    protoq_client *p, *k;
    struct got g = {.bytes_ok = true};
    uint64_t sub;
    int64_t t0;

    start("payload_budget_bytes 1\n", "store-read:3000");
    p = pq_connect_or_fail(&g_srv);
    k = pq_connect_or_fail(&g_srv);
    pq_check_ok(p, protoq_queue_create(p, "disk", NULL));
    pq_check_ok(p, protoq_queue_create(p, "other", NULL));
    publish_seq(p, "disk", 7, 500, NULL);
    t0 = now_ms_mono();
    pq_check_ok(k,
                protoq_subscribe(k, "disk", 1, NULL, 0, on_deliver, &g, &sub));
    publish_seq(p, "other", 8, 100, NULL);
    /* the publish is confirmed; the delivery is still being read */
    ck_assert_int_ge(protoq_poll(k, 0), 0);
    ck_assert_msg(g.n == 0,
                  "the delivery came before another client's publish was "
                  "confirmed (%" PRId64 " ms): the read back blocked the loop",
                  now_ms_mono() - t0);
    wait_got(k, &g, 1, 3 * READ_DELAY_MS);
    ck_assert_uint_eq(g.n, 1);
    ck_assert_uint_eq(g.seq[0], 7);
    ck_assert(g.bytes_ok);
    pq_check_ok(k, protoq_ack(k, g.id[0], g.attempt[0]));
    protoq_close(k);
    protoq_close(p);
}
END_TEST

/*
 * Reads take 1.5 s. The first consumer goes away while its delivery is
 * read back: the job goes to the second consumer (attempt 2), once. Then a
 * lease (1 s) runs out while the read is under way: the consumer gets the
 * job once, as the later attempt, never the stale one.
 */
START_TEST(test_delivery_read_back_for_a_holder_that_left_or_lost_it)
{
    struct protoq_queue_attrs a;
    protoq_client *p, *k1, *k2;
    struct got g1 = {.bytes_ok = true}, g2 = {.bytes_ok = true};

    start("payload_budget_bytes 1\n", "store-read:1500");
    p = pq_connect_or_fail(&g_srv);
    memset(&a, 0, sizeof(a));
    a.no_backoff = true;
    pq_check_ok(p, protoq_queue_create(p, "q", &a));
    a.ack_timeout_ms = 1000;
    pq_check_ok(p, protoq_queue_create(p, "short", &a));
    publish_seq(p, "q", 1, 300, NULL);
    k1 = pq_connect_or_fail(&g_srv);
    pq_check_ok(k1,
                protoq_subscribe(k1, "q", 1, NULL, 0, on_deliver, &g1, NULL));
    protoq_close(k1); /* its delivery is still being read */
    k2 = pq_connect_or_fail(&g_srv);
    pq_check_ok(k2,
                protoq_subscribe(k2, "q", 1, NULL, 0, on_deliver, &g2, NULL));
    wait_got(k2, &g2, 1, 10000);
    ck_assert_uint_eq(g2.n, 1);
    ck_assert_uint_eq(g2.seq[0], 1);
    ck_assert_uint_eq(g2.attempt[0], 2);
    ck_assert(g2.bytes_ok);
    pq_check_ok(k2, protoq_ack_sync(k2, g2.id[0], g2.attempt[0]));

    /* the lease (1 s) runs out during the read (1.5 s) */
    memset(&g2, 0, sizeof(g2));
    g2.bytes_ok = true;
    pq_check_ok(
        k2, protoq_subscribe(k2, "short", 1, NULL, 0, on_deliver, &g2, NULL));
    publish_seq(p, "short", 2, 300, NULL);
    wait_got(k2, &g2, 1, 10000);
    ck_assert_uint_eq(g2.n, 1);
    ck_assert_uint_eq(g2.seq[0], 2);
    ck_assert_uint_eq(g2.attempt[0], 2);
    pq_check_ok(k2, protoq_ack_sync(k2, g2.id[0], g2.attempt[0]));
    /* and nothing else arrives */
    wait_got(k2, &g2, 2, 500);
    ck_assert_uint_eq(g2.n, 1);
    protoq_close(k2);
    protoq_close(p);
}
END_TEST

static Suite *
evict_suite(void)
{
    Suite *s = suite_create("evict");
    TCase *tc = tcase_create("read_back");

    tcase_add_checked_fixture(tc, NULL, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_evicted_payloads_come_in_order_with_their_bytes);
    tcase_add_test(tc, test_slow_read_back_does_not_stop_other_clients);
    tcase_add_test(tc,
                   test_delivery_read_back_for_a_holder_that_left_or_lost_it);
    suite_add_tcase(s, tc);
    return s;
}

int
main(void)
{
    SRunner *sr = srunner_create(evict_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
