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
 * cancel, and the CLI driving retries from a shell. The state that must
 * survive a restart is in check_jobs_restart.c; the fixture they share is
 * jobs_fixture.c.
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

/* ================================ lease expiry, TTL dead letter, prefetch */

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

    tc = tcase("cli", 30);
    tcase_add_test(tc, test_cli_consume_nack_drives_retries_to_dlq);
    tcase_add_test(tc, test_cli_consume_no_ack_returns_job);
    suite_add_tcase(s, tc);
    return s;
}

int
main(void)
{
    return jobs_main(jobs_suite());
}
