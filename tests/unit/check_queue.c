/*
 * check_queue.c: unit tests for broker/queue.c (declare, ordering,
 * consumers, leases, retries, delay/TTL, limits, dedup, tags, release and
 * cancel). Pure: a fake clock (`now`, tests/unit/queue_fixture.h), no
 * sleeps, no I/O. Every test frees what it made, so an ASan build also
 * checks for leaks. The compact form and scale: check_queue_compact.c.
 */
#include <check.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "mem.h"
#include "protoq.pb-c.h"
#include "queue.h"
#include "queue_fixture.h"

/* ======================================================== names and declare */

START_TEST(test_queue_name_validation)
{
    char long_name[QUEUE_NAME_MAX + 2];

    ck_assert(queue_name_valid("jobs", 4));
    ck_assert(queue_name_valid("a.b_c-d:E9", 10));
    ck_assert(!queue_name_valid("", 0));
    ck_assert(!queue_name_valid("a b", 3));
    ck_assert(!queue_name_valid("a/b", 3));
    ck_assert(!queue_name_valid("caf\xc3\xa9", 5));
    ck_assert(!queue_name_valid("a\0b", 3));
    memset(long_name, 'x', sizeof(long_name));
    ck_assert(queue_name_valid(long_name, QUEUE_NAME_MAX));
    ck_assert(!queue_name_valid(long_name, QUEUE_NAME_MAX + 1));
    long_name[QUEUE_NAME_MAX + 1] = '\0';
    ck_assert_pq(qset_create(qs, long_name, NULL, NULL), PQ_EINVAL);
    ck_assert_pq(qset_create(qs, "bad name", NULL, NULL), PQ_EINVAL);
    ck_assert_uint_eq(qset_queue_count(qs), 0);
}
END_TEST

START_TEST(test_declare_is_idempotent_and_conflicts_are_rejected)
{
    struct queue_attrs a, b;
    struct queue *q1, *q2 = NULL;

    memset(&a, 0, sizeof(a));
    a.max_length = 10;
    q1 = mkq("jobs", &a);
    ck_assert_uint_eq(queue_attrs(q1)->ack_timeout_ms, 30000); /* resolved */
    ck_assert_uint_eq(queue_attrs(q1)->max_attempts, 5);
    b = a;
    b.ack_timeout_ms = 30000; /* explicit default == implicit default */
    ck_assert_pq_ok(qset_create(qs, "jobs", &b, &q2));
    ck_assert_ptr_eq(q2, q1);
    b.max_length = 11;
    ck_assert_pq(qset_create(qs, "jobs", &b, &q2), PQ_EEXIST);
    strcpy(b.dead_letter, "jobs");
    ck_assert_pq(qset_create(qs, "jobs2", &b, NULL), PQ_OK);
    strcpy(b.dead_letter, "bad name");
    ck_assert_pq(qset_create(qs, "jobs3", &b, NULL), PQ_EINVAL);
    strcpy(b.dead_letter, "jobs3");
    ck_assert_pq(qset_create(qs, "jobs3", &b, NULL), PQ_EINVAL); /* itself */
    ck_assert_ptr_eq(qset_find(qs, "jobs"), q1);
    ck_assert_ptr_null(qset_find(qs, "nope"));
    ck_assert_ptr_eq(qset_first(qs), q1);
    ck_assert_str_eq(queue_name(qset_next(q1)), "jobs2");
    ck_assert_ptr_null(qset_next(qset_next(q1)));
    ck_assert_pq_ok(qset_delete(qs, q1));
    ck_assert_ptr_null(qset_find(qs, "jobs"));
    ck_assert_uint_eq(qset_queue_count(qs), 1);
}
END_TEST

/* ======================================================== ordering */

START_TEST(test_fifo_within_one_level)
{
    struct queue *q = mkq("jobs", NULL);
    struct consumer c;
    uint64_t id;

    queue_consumer_init(&c, 1, NULL, 100);
    for (id = 1; id <= 50; id++) {
        push(q, id, 4);
    }
    ck_assert_pq_ok(queue_subscribe(q, &c));
    for (id = 1; id <= 50; id++) {
        ck_assert_uint_eq(next_id(q, NULL), id);
    }
    ck_assert_uint_eq(next_id(q, NULL), 0);
    ck_assert_uint_eq(queue_inflight_count(q), 50);
    queue_unsubscribe(&c, now);
    queue_consumer_fini(&c);
}
END_TEST

START_TEST(test_higher_priority_first_fifo_within_level)
{
    struct queue *q = mkq("jobs", NULL);
    struct consumer c;
    static const struct {
        uint64_t id;
        uint8_t prio;
    } in[] = {
        {1, 0}, {2, 5}, {3, 9}, {4, 5}, {5, 0}, {6, 9}, {7, 1},
    };
    static const uint64_t want[] = {3, 6, 2, 4, 7, 1, 5};
    size_t i;
    struct msg_new bad;

    queue_consumer_init(&c, 1, NULL, 100);
    for (i = 0; i < sizeof(in) / sizeof(in[0]); i++) {
        push(q, in[i].id, in[i].prio);
    }
    memset(&bad, 0, sizeof(bad));
    bad.id = 99;
    bad.priority = 10;
    ck_assert_pq(queue_push(q, &bad, now, NULL), PQ_EINVAL);
    ck_assert_pq_ok(queue_subscribe(q, &c));
    for (i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        ck_assert_uint_eq(next_id(q, NULL), want[i]);
    }
    queue_unsubscribe(&c, now);
    queue_consumer_fini(&c);
}
END_TEST

/* ======================================================== consumers */

START_TEST(test_round_robin_across_three_consumers)
{
    struct queue *q = mkq("jobs", NULL);
    struct consumer c[3];
    struct consumer *to;
    int counts[3] = {0, 0, 0};
    uint64_t id;
    int i;

    for (i = 0; i < 3; i++) {
        queue_consumer_init(&c[i], (uint64_t)i, NULL, 100);
        ck_assert_pq_ok(queue_subscribe(q, &c[i]));
    }
    ck_assert_uint_eq(queue_consumer_count(q), 3);
    for (id = 1; id <= 30; id++) {
        push(q, id, 0);
    }
    for (id = 1; id <= 30; id++) {
        ck_assert_uint_eq(next_id(q, &to), id);
        ck_assert_ptr_eq(to, &c[(id - 1) % 3]); /* strict rotation */
        counts[to - c]++;
    }
    ck_assert_int_eq(counts[0], 10);
    ck_assert_int_eq(counts[1], 10);
    ck_assert_int_eq(counts[2], 10);
    for (i = 0; i < 3; i++) {
        queue_unsubscribe(&c[i], now);
        queue_consumer_fini(&c[i]);
    }
}
END_TEST

START_TEST(test_prefetch_limits_inflight_and_resumes_after_ack)
{
    struct queue *q = mkq("jobs", NULL);
    struct consumer c;
    uint64_t id, a, b;

    queue_consumer_init(&c, 1, NULL, 2);
    ck_assert_pq(queue_subscribe(q, &c), PQ_OK);
    for (id = 1; id <= 5; id++) {
        push(q, id, 0);
    }
    a = next_id(q, NULL);
    b = next_id(q, NULL);
    ck_assert_uint_eq(a, 1);
    ck_assert_uint_eq(b, 2);
    ck_assert_uint_eq(c.inflight, 2);
    ck_assert_uint_eq(next_id(q, NULL), 0); /* credit used up */
    ack(a);
    ck_assert_uint_eq(c.inflight, 1);
    ck_assert_uint_eq(next_id(q, NULL), 3);
    ck_assert_uint_eq(next_id(q, NULL), 0);
    queue_set_prefetch(&c, 3);
    ck_assert_uint_eq(next_id(q, NULL), 4);
    ck_assert_uint_eq(next_id(q, NULL), 0);
    ck_assert_uint_eq(queue_stats(q)->acked, 1);
    queue_unsubscribe(&c, now);
    queue_consumer_fini(&c);
}
END_TEST

START_TEST(test_paused_consumer_is_skipped)
{
    struct queue *q = mkq("jobs", NULL);
    struct consumer c1, c2, *to;

    queue_consumer_init(&c1, 1, NULL, 10);
    queue_consumer_init(&c2, 2, NULL, 10);
    ck_assert_pq_ok(queue_subscribe(q, &c1));
    ck_assert_pq_ok(queue_subscribe(q, &c2));
    push(q, 1, 0);
    push(q, 2, 0);
    push(q, 3, 0);
    c1.paused = true;
    ck_assert_uint_eq(next_id(q, &to), 1);
    ck_assert_ptr_eq(to, &c2);
    ck_assert_uint_eq(next_id(q, &to), 2);
    ck_assert_ptr_eq(to, &c2);
    c2.paused = true;
    ck_assert_uint_eq(next_id(q, NULL), 0);
    ck_assert_uint_eq(queue_ready_count(q), 1);
    c1.paused = false;
    ck_assert_uint_eq(next_id(q, &to), 3);
    ck_assert_ptr_eq(to, &c1);
    ck_assert_pq(queue_subscribe(q, &c1), PQ_EINVAL); /* already subscribed */
    queue_unsubscribe(&c1, now);
    queue_unsubscribe(&c2, now);
    queue_consumer_fini(&c1);
    queue_consumer_fini(&c2);
}
END_TEST

START_TEST(test_unsubscribe_requeues_at_front_in_delivery_order)
{
    struct queue_defaults d;
    struct queue *q;
    struct consumer c1, c2;
    uint64_t id;

    /* backoff base 0 (only possible via defaults): requeue at once, so the
     * order is not shuffled by jitter */
    qset_free(qs);
    queue_defaults_init(&d);
    d.backoff_base_ms = 0;
    qs = qset_new(&d);
    ck_assert_ptr_nonnull(qs);
    qset_set_listener(qs, record, NULL);
    q = mkq("jobs", NULL);
    queue_consumer_init(&c1, 1, NULL, 3);
    ck_assert_pq_ok(queue_subscribe(q, &c1));
    for (id = 1; id <= 6; id++) {
        push(q, id, 0);
    }
    for (id = 1; id <= 3; id++) {
        ck_assert_uint_eq(next_id(q, NULL), id);
    }
    queue_unsubscribe(&c1, now);
    ck_assert_ptr_null(c1.q);
    ck_assert_uint_eq(c1.inflight, 0);
    ck_assert_uint_eq(queue_consumer_count(q), 0);
    ck_assert_uint_eq(queue_inflight_count(q), 0);
    ck_assert_uint_eq(queue_ready_count(q), 6);
    ck_assert_ptr_nonnull(find_ev(QEV_REQUEUE, 2));
    ck_assert_str_eq(find_ev(QEV_REQUEUE, 2)->reason, "unsubscribe");
    ck_assert_uint_eq(qset_msg(qs, 2)->failures, 1);
    ck_assert_uint_eq(qset_msg(qs, 2)->attempt, 1);
    queue_consumer_init(&c2, 2, NULL, 10);
    ck_assert_pq_ok(queue_subscribe(q, &c2));
    /* 1,2,3 return before 4,5,6 and in their original order */
    for (id = 1; id <= 6; id++) {
        uint64_t got = next_id(q, NULL);

        ck_assert_uint_eq(got, id);
        ck_assert_uint_eq(qset_msg(qs, got)->attempt, id <= 3 ? 2 : 1);
    }
    ck_assert_uint_eq(queue_stats(q)->redelivered, 3);
    queue_unsubscribe(&c2, now);
    queue_consumer_fini(&c1);
    queue_consumer_fini(&c2);
}
END_TEST

START_TEST(test_unsubscribe_with_backoff_returns_jobs_ahead_of_new_ones)
{
    struct queue *q = mkq("jobs", NULL);
    struct consumer c1, c2;
    uint64_t id, got;

    queue_consumer_init(&c1, 1, NULL, 3);
    ck_assert_pq_ok(queue_subscribe(q, &c1));
    for (id = 1; id <= 6; id++) {
        push(q, id, 0);
    }
    for (id = 1; id <= 3; id++) {
        ck_assert_uint_eq(next_id(q, NULL), id);
    }
    queue_unsubscribe(&c1, now);
    ck_assert_uint_eq(queue_delayed_count(q), 3); /* backoff after failure 1 */
    ck_assert_uint_le(qset_next_deadline(qs), now + 1000);
    ck_assert_uint_ge(qset_next_deadline(qs), now + 500);
    now += 1000;
    qset_tick(qs, now);
    queue_consumer_init(&c2, 2, NULL, 10);
    ck_assert_pq_ok(queue_subscribe(q, &c2));
    for (id = 1; id <= 6; id++) {
        got = next_id(q, NULL);
        if (id <= 3) {
            ck_assert_uint_le(
                got, 3); /* order among them follows their jittered due times */
        } else {
            ck_assert_uint_eq(got, id);
        }
    }
    queue_unsubscribe(&c2, now);
    queue_consumer_fini(&c1);
    queue_consumer_fini(&c2);
}
END_TEST

/* ======================================================== leases */

START_TEST(test_lease_expiry_redelivers_with_next_attempt)
{
    struct queue *q = mkq("jobs", NULL);
    struct consumer c;
    struct msg *m;

    queue_consumer_init(&c, 1, NULL, 1);
    ck_assert_pq_ok(queue_subscribe(q, &c));
    push(q, 7, 0);
    ck_assert_uint_eq(next_id(q, NULL), 7);
    m = qset_msg(qs, 7);
    ck_assert_uint_eq(m->attempt, 1);
    ck_assert_uint_eq(m->due_ms, now + 30000);
    ck_assert_uint_eq(qset_next_deadline(qs), now + 30000);
    now += 29999;
    qset_tick(qs, now);
    ck_assert_int_eq(m->state, MSG_INFLIGHT);
    now += 1;
    qset_tick(qs, now);
    ck_assert_ptr_nonnull(find_ev(QEV_REQUEUE, 7));
    ck_assert_str_eq(find_ev(QEV_REQUEUE, 7)->reason, "lease");
    ck_assert_int_eq(m->state, MSG_DELAYED); /* backoff after failure 1 */
    ck_assert_uint_eq(m->failures, 1);
    ck_assert_uint_eq(c.inflight, 0);
    now = m->due_ms;
    qset_tick(qs, now);
    ck_assert_uint_eq(next_id(q, NULL), 7);
    ck_assert_uint_eq(m->attempt, 2);
    ck_assert_uint_eq(queue_stats(q)->redelivered, 1);
    queue_unsubscribe(&c, now);
    queue_consumer_fini(&c);
}
END_TEST

START_TEST(test_stale_token_after_expiry_is_rejected_and_changes_nothing)
{
    struct queue *q = mkq("jobs", NULL);
    struct consumer c1, c2;
    struct msg *m, *out = (struct msg *)1;
    uint64_t due;

    queue_consumer_init(&c1, 1, NULL, 1);
    queue_consumer_init(&c2, 2, NULL, 1);
    ck_assert_pq_ok(queue_subscribe(q, &c1));
    push(q, 7, 0);
    ck_assert_uint_eq(next_id(q, NULL), 7);
    now += 30000;
    qset_tick(qs, now);
    m = qset_msg(qs, 7);
    now = m->due_ms;
    qset_tick(qs, now);
    queue_unsubscribe(&c1, now);
    ck_assert_pq_ok(queue_subscribe(q, &c2));
    ck_assert_uint_eq(next_id(q, NULL), 7);
    ck_assert_uint_eq(m->attempt, 2);
    due = m->due_ms;
    /* the first worker answers late with attempt 1 */
    ck_assert_pq(qset_ack(qs, 7, 1, &out), PQ_ESTALE);
    ck_assert_ptr_null(out);
    ck_assert_pq(qset_nack(qs, 7, 1, NULL, now), PQ_ESTALE);
    ck_assert_pq(qset_touch(qs, 7, 1, 0, NULL, now + 5, NULL), PQ_ESTALE);
    ck_assert_pq(qset_release(qs, 7, 1, NULL, now), PQ_ESTALE);
    ck_assert_pq(qset_ack(qs, 8, 1, NULL), PQ_ESTALE); /* unknown id */
    ck_assert_int_eq(m->state, MSG_INFLIGHT);
    ck_assert_ptr_eq(m->holder, &c2);
    ck_assert_uint_eq(m->due_ms, due);
    ck_assert_uint_eq(m->failures, 1);
    ck_assert_uint_eq(queue_stats(q)->acked, 0);
    ck_assert_uint_eq(queue_stats(q)->nacked, 0);
    ack(7);
    ck_assert_uint_eq(qset_msg_count(qs), 0);
    queue_unsubscribe(&c2, now);
    queue_consumer_fini(&c1);
    queue_consumer_fini(&c2);
}
END_TEST

START_TEST(test_touch_extends_past_many_ack_timeouts)
{
    struct queue *q = mkq("jobs", NULL);
    struct consumer c;
    struct msg *m;
    struct body *prog = body_new("\x08\x32", 2); /* Progress{percent: 50} */
    uint64_t lease = 0;
    int i;

    queue_consumer_init(&c, 1, NULL, 1);
    ck_assert_pq_ok(queue_subscribe(q, &c));
    push(q, 1, 0);
    ck_assert_uint_eq(next_id(q, NULL), 1);
    m = qset_msg(qs, 1);
    for (i = 0; i < 100; i++) { /* 100 x 20 s = 2000 s >> 30 s lease */
        now += 20000;
        qset_tick(qs, now);
        ck_assert_pq_ok(
            qset_touch(qs, 1, 1, 0, i == 50 ? prog : NULL, now, &lease));
        ck_assert_uint_eq(lease, 30000);
        ck_assert_uint_eq(m->due_ms, now + 30000);
    }
    ck_assert_ptr_eq(msg_progress(m), prog);
    ck_assert_uint_eq(prog->refs, 2);
    ck_assert_pq_ok(qset_touch(qs, 1, 1, 3600000, NULL, now,
                               &lease)); /* no cap by default */
    ck_assert_uint_eq(lease, 3600000);
    ck_assert_ptr_nonnull(find_ev(QEV_TOUCH, 1));
    ck_assert_ptr_null(find_ev(QEV_REQUEUE, 1));
    ck_assert_uint_eq(m->attempt, 1);
    ack(1);
    ck_assert_uint_eq(queue_stats(q)->redelivered, 0);
    body_unref(&prog);
    queue_unsubscribe(&c, now);
    queue_consumer_fini(&c);
}
END_TEST

START_TEST(test_touch_is_capped_at_max_lease)
{
    struct queue_attrs a;
    struct queue *q;
    struct consumer c;
    uint64_t lease = 0;

    memset(&a, 0, sizeof(a));
    a.max_lease_ms = 60000;
    q = mkq("jobs", &a);
    queue_consumer_init(&c, 1, NULL, 1);
    ck_assert_pq_ok(queue_subscribe(q, &c));
    push(q, 1, 0);
    ck_assert_uint_eq(next_id(q, NULL), 1);
    ck_assert_pq_ok(qset_touch(qs, 1, 1, 3600000, NULL, now, &lease));
    ck_assert_uint_eq(lease, 60000);
    ck_assert_uint_eq(qset_msg(qs, 1)->due_ms, now + 60000);
    ck_assert_pq_ok(qset_touch(qs, 1, 1, 5000, NULL, now, &lease));
    ck_assert_uint_eq(lease, 5000);
    now += 5000;
    qset_tick(qs, now);
    ck_assert_int_eq(qset_msg(qs, 1)->state, MSG_DELAYED); /* lease ran out */
    queue_unsubscribe(&c, now);
    queue_consumer_fini(&c);
}
END_TEST

/* ======================================================== nack, backoff,
 * dead-letter */

START_TEST(test_nack_with_delay_requeues_after_exactly_that_delay)
{
    struct queue *q = mkq("jobs", NULL);
    struct consumer c;
    struct nack_opts o;
    struct msg *m;

    queue_consumer_init(&c, 1, NULL, 1);
    ck_assert_pq_ok(queue_subscribe(q, &c));
    push(q, 1, 0);
    ck_assert_uint_eq(next_id(q, NULL), 1);
    memset(&o, 0, sizeof(o));
    o.has_delay = true;
    o.delay_ms = 5000;
    ck_assert_pq_ok(qset_nack(qs, 1, 1, &o, now));
    m = qset_msg(qs, 1);
    ck_assert_int_eq(m->state, MSG_DELAYED);
    ck_assert_uint_eq(m->due_ms, now + 5000);
    ck_assert_uint_eq(m->failures, 1);
    ck_assert_uint_eq(queue_stats(q)->nacked, 1);
    ck_assert_uint_eq(qset_next_deadline(qs), now + 5000);
    now += 4999;
    qset_tick(qs, now);
    ck_assert_uint_eq(next_id(q, NULL), 0);
    now += 1;
    qset_tick(qs, now);
    ck_assert_uint_eq(next_id(q, NULL), 1);
    o.delay_ms = 0; /* delay 0: ready at once */
    ck_assert_pq_ok(qset_nack(qs, 1, 2, &o, now));
    ck_assert_int_eq(m->state, MSG_READY);
    queue_unsubscribe(&c, now);
    queue_consumer_fini(&c);
}
END_TEST

START_TEST(test_backoff_doubles_to_cap_with_jitter_in_half_to_full)
{
    struct queue_attrs a;
    struct queue *q;
    struct consumer c;
    uint32_t k;
    int seen_low = 0, seen_high = 0;
    uint64_t trial;

    memset(&a, 0, sizeof(a));
    a.backoff_base_ms = 100;
    a.backoff_cap_ms = 1000;
    a.max_attempts = 100;
    q = mkq("jobs", &a);
    queue_consumer_init(&c, 1, NULL, 1);
    ck_assert_pq_ok(queue_subscribe(q, &c));
    for (trial = 0; trial < 20; trial++) {
        struct msg *m;

        push(q, 1000 + trial, 0);
        for (k = 1; k <= 8; k++) {
            uint64_t d = 100ULL << (k - 1);
            uint64_t delay;

            if (d > 1000) {
                d = 1000;
            }
            m = queue_next_delivery(q, now, &(struct consumer *){NULL});
            ck_assert_ptr_nonnull(m);
            ck_assert_pq_ok(qset_nack(qs, m->id, m->attempt, NULL, now));
            ck_assert_uint_eq(m->failures, k);
            ck_assert_int_eq(m->state, MSG_DELAYED);
            delay = m->due_ms - now;
            ck_assert_msg(delay >= d / 2 && delay <= d,
                          "failure %u: delay %" PRIu64 " not in [%" PRIu64
                          ", %" PRIu64 "]",
                          k, delay, d / 2, d);
            seen_low += delay < d * 3 / 4;
            seen_high += delay > d * 3 / 4;
            now = m->due_ms;
            qset_tick(qs, now);
        }
        m = queue_next_delivery(q, now, &(struct consumer *){NULL});
        ck_assert_ptr_nonnull(m);
        ack(m->id);
    }
    ck_assert_int_gt(seen_low, 10); /* it is jittered, both halves */
    ck_assert_int_gt(seen_high, 10);
    queue_unsubscribe(&c, now);
    queue_consumer_fini(&c);
}
END_TEST

START_TEST(test_max_attempts_dead_letters_with_death_headers)
{
    struct queue_attrs a;
    struct queue *q, *dlq;
    struct consumer c;
    struct nack_opts o;
    struct msg *m;
    struct ev_rec *ev;
    char buf[64];
    uint32_t k;

    dlq = mkq("jobs.dead", NULL);
    memset(&a, 0, sizeof(a));
    a.max_attempts = 3;
    strcpy(a.dead_letter, "jobs.dead");
    q = mkq("jobs", &a);
    queue_consumer_init(&c, 1, NULL, 1);
    ck_assert_pq_ok(queue_subscribe(q, &c));
    push(q, 1, 6);
    memset(&o, 0, sizeof(o));
    o.has_delay = true;
    o.error = "CUDA out of memory";
    for (k = 1; k <= 3; k++) {
        ck_assert_uint_eq(next_id(q, NULL), 1);
        ck_assert_pq_ok(qset_nack(qs, 1, k, &o, now));
    }
    m = qset_msg(qs, 1);
    ck_assert_ptr_nonnull(m);
    ck_assert_ptr_eq(m->q, dlq);
    ck_assert_int_eq(m->state, MSG_READY);
    ck_assert_uint_eq(m->attempt, 0);
    ck_assert_uint_eq(m->failures, 0);
    ck_assert_uint_eq(m->priority, 6);
    ck_assert_uint_eq(queue_total_count(q), 0);
    ck_assert_uint_eq(queue_bytes(q), 0);
    ck_assert_uint_eq(queue_ready_count(dlq), 1);
    ck_assert_uint_eq(queue_bytes(dlq), 10);
    ck_assert_uint_eq(queue_stats(q)->dead_lettered, 1);
    ck_assert_uint_eq(queue_stats(q)->dropped, 0);
    ev = find_ev(QEV_DEAD_LETTER, 1);
    ck_assert_ptr_nonnull(ev);
    ck_assert_str_eq(ev->reason, "max_attempts");
    ck_assert_str_eq(ev->q, "jobs.dead");
    ck_assert_str_eq(ev->from, "jobs");
    /* the new body: original headers plus the x-death-* ones */
    ck_assert_ptr_nonnull(m->body);
    ck_assert_ptr_nonnull(header_of(m->body, "origin", buf, sizeof(buf)));
    ck_assert_str_eq(buf, "test");
    ck_assert_ptr_nonnull(
        header_of(m->body, "x-death-reason", buf, sizeof(buf)));
    ck_assert_str_eq(buf, "max_attempts");
    ck_assert_ptr_nonnull(
        header_of(m->body, "x-death-attempts", buf, sizeof(buf)));
    ck_assert_str_eq(buf, "3");
    ck_assert_ptr_nonnull(
        header_of(m->body, "x-death-queue", buf, sizeof(buf)));
    ck_assert_str_eq(buf, "jobs");
    ck_assert_ptr_nonnull(
        header_of(m->body, "x-death-error", buf, sizeof(buf)));
    ck_assert_str_eq(buf, "CUDA out of memory");
    queue_unsubscribe(&c, now);
    queue_consumer_fini(&c);
}
END_TEST

START_TEST(test_nack_dead_letter_flag_goes_straight_to_dlq)
{
    struct queue_attrs a;
    struct queue *q;
    struct consumer c;
    struct nack_opts o;
    char buf[64];

    mkq("dlq", NULL);
    memset(&a, 0, sizeof(a));
    strcpy(a.dead_letter, "dlq");
    q = mkq("jobs", &a);
    queue_consumer_init(&c, 1, NULL, 1);
    ck_assert_pq_ok(queue_subscribe(q, &c));
    push(q, 1, 0);
    ck_assert_uint_eq(next_id(q, NULL), 1);
    memset(&o, 0, sizeof(o));
    o.dead_letter = true;
    ck_assert_pq_ok(qset_nack(qs, 1, 1, &o, now));
    ck_assert_str_eq(queue_name(qset_msg(qs, 1)->q), "dlq");
    header_of(qset_msg(qs, 1)->body, "x-death-reason", buf, sizeof(buf));
    ck_assert_str_eq(buf, "nack");
    ck_assert_ptr_null(
        header_of(qset_msg(qs, 1)->body, "x-death-error", buf, sizeof(buf)));
    queue_unsubscribe(&c, now);
    queue_consumer_fini(&c);
}
END_TEST

/* Issue 8: a message bounced between dead-letter queues kept gaining a set
 * of x-death-* headers (1.3 KiB with a long nack error) per hop, until its
 * Deliver was over max_frame_bytes and no consumer could take it. Each hop
 * now replaces the set. */
START_TEST(test_dead_letter_again_and_again_keeps_one_set_of_death_headers)
{
    struct queue_attrs a;
    struct queue *ping, *pong;
    struct consumer c1, c2;
    struct nack_opts o;
    char err[1025], buf[64];
    uint32_t first_len = 0;
    Protoq__Message *msg;
    size_t n_reason = 0;

    memset(&a, 0, sizeof(a));
    strcpy(a.dead_letter, "pong");
    ping = mkq("ping", &a);
    strcpy(a.dead_letter, "ping");
    pong = mkq("pong", &a);
    queue_consumer_init(&c1, 1, NULL, 1);
    queue_consumer_init(&c2, 2, NULL, 1);
    ck_assert_pq_ok(queue_subscribe(ping, &c1));
    ck_assert_pq_ok(queue_subscribe(pong, &c2));
    push(ping, 1, 0);
    memset(err, 'e', sizeof(err) - 1);
    err[sizeof(err) - 1] = '\0';
    memset(&o, 0, sizeof(o));
    o.dead_letter = true;
    o.error = err;
    for (int hop = 0; hop < 100; hop++) {
        struct queue *from = hop % 2 == 0 ? ping : pong;

        ck_assert_uint_eq(next_id(from, NULL), 1);
        ck_assert_pq_ok(qset_nack(qs, 1, 1, &o, now));
        ck_assert_ptr_eq(qset_msg(qs, 1)->q, hop % 2 == 0 ? pong : ping);
        if (hop == 0) {
            first_len = qset_msg(qs, 1)->body->len;
        }
        ck_assert_uint_eq(qset_msg(qs, 1)->body->len, first_len);
    }
    ck_assert_str_eq(
        header_of(qset_msg(qs, 1)->body, "x-death-queue", buf, sizeof(buf)),
        "pong");
    ck_assert_str_eq(
        header_of(qset_msg(qs, 1)->body, "origin", buf, sizeof(buf)), "test");
    msg = protoq__message__unpack(NULL, qset_msg(qs, 1)->body->len,
                                  qset_msg(qs, 1)->body->data);
    ck_assert_ptr_nonnull(msg);
    for (size_t i = 0; i < msg->n_headers; i++) {
        n_reason += strcmp(msg->headers[i]->key, "x-death-reason") == 0;
    }
    ck_assert_uint_eq(n_reason, 1);
    protoq__message__free_unpacked(msg, NULL);
    queue_unsubscribe(&c1, now);
    queue_unsubscribe(&c2, now);
    queue_consumer_fini(&c1);
    queue_consumer_fini(&c2);
}
END_TEST

START_TEST(test_without_dlq_message_is_dropped_and_counted)
{
    struct queue_attrs a;
    struct queue *q;
    struct consumer c;
    struct ev_rec *ev;

    memset(&a, 0, sizeof(a));
    a.max_attempts = 1;
    q = mkq("jobs", &a);
    strcpy(a.dead_letter, "missing");
    mkq("jobs2", &a);
    queue_consumer_init(&c, 1, NULL, 1);
    ck_assert_pq_ok(queue_subscribe(q, &c));
    push(q, 1, 0);
    ck_assert_uint_eq(next_id(q, NULL), 1);
    ck_assert_pq_ok(qset_nack(qs, 1, 1, NULL, now));
    ck_assert_ptr_null(qset_msg(qs, 1));
    ev = find_ev(QEV_DROP, 1);
    ck_assert_ptr_nonnull(ev);
    ck_assert_str_eq(ev->reason, "max_attempts");
    ck_assert(ev->has_detail);
    ck_assert_uint_eq(queue_stats(q)->dropped, 1);
    ck_assert_uint_eq(queue_total_count(q), 0);
    queue_unsubscribe(&c, now);
    /* dead_letter names a queue that does not exist: dropped too */
    q = qset_find(qs, "jobs2");
    ck_assert_pq_ok(queue_subscribe(q, &c));
    push(q, 2, 0);
    ck_assert_uint_eq(next_id(q, NULL), 2);
    now += 30000;
    qset_tick(qs, now); /* lease expiry counts as the one allowed failure */
    ck_assert_ptr_null(qset_msg(qs, 2));
    ck_assert_uint_eq(queue_stats(q)->dropped, 1);
    ck_assert_ptr_nonnull(find_ev(QEV_DROP, 2));
    queue_unsubscribe(&c, now);
    queue_consumer_fini(&c);
}
END_TEST

/* ======================================================== delay and TTL */

START_TEST(test_delayed_message_invisible_until_due)
{
    struct queue *q = mkq("jobs", NULL);
    struct consumer c;

    queue_consumer_init(&c, 1, NULL, 10);
    ck_assert_pq_ok(queue_subscribe(q, &c));
    ck_assert_uint_eq(qset_next_deadline(qs), UINT64_MAX);
    push_full(q, 1, 0, now + 10000, 1);
    push_full(q, 2, 0, now + 5000, 1);
    push(q, 3, 0);
    ck_assert_uint_eq(queue_delayed_count(q), 2);
    ck_assert_uint_eq(qset_next_deadline(qs), now + 5000);
    ck_assert_uint_eq(next_id(q, NULL), 3);
    ck_assert_uint_eq(next_id(q, NULL), 0);
    now += 4999;
    qset_tick(qs, now);
    ck_assert_uint_eq(next_id(q, NULL), 0);
    now += 1;
    n_ready_hints = 0;
    qset_tick(qs, now);
    ck_assert_uint_gt(n_ready_hints, 0);
    ck_assert_uint_eq(next_id(q, NULL), 2);
    /* next deadline: the lease of 3 (30 s after start) vs 1 due at +10 s */
    ck_assert_uint_eq(qset_next_deadline(qs), now + 5000);
    now += 5000;
    qset_tick(qs, now);
    ck_assert_uint_eq(next_id(q, NULL), 1);
    queue_unsubscribe(&c, now);
    queue_consumer_fini(&c);
}
END_TEST

START_TEST(test_expired_message_is_never_delivered)
{
    struct queue_attrs a;
    struct queue *q;
    struct consumer c;
    struct ev_rec *ev;

    memset(&a, 0, sizeof(a));
    a.ttl_ms = 1000;
    q = mkq("jobs", &a);
    push(q, 1, 0);
    push(q, 2, 0);
    ck_assert_uint_eq(qset_msg(qs, 1)->expire_ms, now + 1000);
    ck_assert_uint_eq(qset_next_deadline(qs), now + 1000);
    now += 1000;
    queue_consumer_init(&c, 1, NULL, 10);
    ck_assert_pq_ok(queue_subscribe(q, &c));
    /* no tick yet: delivery itself skips and expires */
    ck_assert_uint_eq(next_id(q, NULL), 0);
    ck_assert_ptr_null(qset_msg(qs, 1));
    ev = find_ev(QEV_DROP, 1);
    ck_assert_ptr_nonnull(ev);
    ck_assert_str_eq(ev->reason, "expired");
    push(q, 3, 0);
    now += 1000;
    qset_tick(qs, now); /* and the tick expires the rest */
    ck_assert_ptr_null(qset_msg(qs, 3));
    ck_assert_uint_eq(queue_stats(q)->expired, 3);
    ck_assert_uint_eq(queue_stats(q)->dropped, 0);
    ck_assert_uint_eq(queue_total_count(q), 0);
    ck_assert_uint_eq(qset_next_deadline(qs), UINT64_MAX);
    queue_unsubscribe(&c, now);
    queue_consumer_fini(&c);
}
END_TEST

START_TEST(test_expired_goes_to_dlq_when_configured)
{
    struct queue_attrs a;
    struct queue *q, *dlq;
    char buf[64];
    struct msg *m;

    dlq = mkq("dlq", NULL);
    memset(&a, 0, sizeof(a));
    a.ttl_ms = 1000;
    a.dead_letter_expired = true;
    strcpy(a.dead_letter, "dlq");
    q = mkq("jobs", &a);
    push_full(q, 1, 0, now + 5000,
              10); /* delayed past its TTL: expires first */
    now += 1000;
    qset_tick(qs, now);
    m = qset_msg(qs, 1);
    ck_assert_ptr_nonnull(m);
    ck_assert_ptr_eq(m->q, dlq);
    ck_assert_uint_eq(m->expire_ms, 0); /* the DLQ has no TTL */
    header_of(m->body, "x-death-reason", buf, sizeof(buf));
    ck_assert_str_eq(buf, "expired");
    header_of(m->body, "x-death-attempts", buf, sizeof(buf));
    ck_assert_str_eq(buf, "0");
    ck_assert_uint_eq(queue_stats(q)->expired, 1);
    ck_assert_uint_eq(queue_stats(q)->dead_lettered, 1);
    ck_assert_uint_eq(queue_total_count(q), 0);
    ck_assert_uint_eq(qset_next_deadline(qs), UINT64_MAX);
}
END_TEST

START_TEST(test_inflight_message_is_not_expired_under_its_worker)
{
    struct queue_attrs a;
    struct queue *q;
    struct consumer c;

    memset(&a, 0, sizeof(a));
    a.ttl_ms = 1000;
    q = mkq("jobs", &a);
    queue_consumer_init(&c, 1, NULL, 1);
    ck_assert_pq_ok(queue_subscribe(q, &c));
    push(q, 1, 0);
    ck_assert_uint_eq(next_id(q, NULL), 1);
    now += 5000;
    qset_tick(qs, now);
    ck_assert_int_eq(qset_msg(qs, 1)->state, MSG_INFLIGHT);
    ack(1);
    ck_assert_uint_eq(queue_stats(q)->expired, 0);
    queue_unsubscribe(&c, now);
    queue_consumer_fini(&c);
}
END_TEST

/* ======================================================== limits */

START_TEST(test_max_length_and_max_bytes_reject_with_efull)
{
    struct queue_attrs a;
    struct queue *q;
    struct consumer c;

    memset(&a, 0, sizeof(a));
    a.max_length = 3;
    a.max_bytes = 100;
    q = mkq("jobs", &a);
    ck_assert_pq_ok(queue_check_room(q, 3, 100));
    ck_assert_pq(queue_check_room(q, 4, 0), PQ_EFULL);
    ck_assert_pq(queue_check_room(q, 1, 101), PQ_EFULL);
    ck_assert_pq(queue_check_room(q, UINT64_MAX, 0), PQ_EFULL);
    push_full(q, 1, 0, 0, 40);
    push_full(q, 2, 0, now + 1000, 40); /* delayed counts */
    ck_assert_pq(queue_check_room(q, 1, 21), PQ_EFULL);
    ck_assert_pq_ok(queue_check_room(q, 1, 20));
    push_full(q, 3, 0, 0, 20);
    ck_assert_pq(queue_check_room(q, 1, 0), PQ_EFULL);
    queue_consumer_init(&c, 1, NULL, 1);
    ck_assert_pq_ok(queue_subscribe(q, &c));
    ck_assert_uint_eq(next_id(q, NULL), 1);
    ck_assert_pq(queue_check_room(q, 1, 0), PQ_EFULL); /* in flight counts */
    ack(1);
    ck_assert_pq_ok(queue_check_room(q, 1, 40));
    ck_assert_uint_eq(queue_bytes(q), 60);
    queue_unsubscribe(&c, now);
    queue_consumer_fini(&c);
}
END_TEST

START_TEST(test_full_dlq_drops_instead_of_overflowing)
{
    struct queue_attrs a;
    struct queue *q, *dlq;
    struct consumer c;
    struct nack_opts o = {.dead_letter = true};

    memset(&a, 0, sizeof(a));
    a.max_length = 1;
    dlq = mkq("dlq", &a);
    push(dlq, 100, 0);
    memset(&a, 0, sizeof(a));
    strcpy(a.dead_letter, "dlq");
    q = mkq("jobs", &a);
    queue_consumer_init(&c, 1, NULL, 1);
    ck_assert_pq_ok(queue_subscribe(q, &c));
    push(q, 1, 0);
    ck_assert_uint_eq(next_id(q, NULL), 1);
    ck_assert_pq_ok(qset_nack(qs, 1, 1, &o, now));
    ck_assert_ptr_null(qset_msg(qs, 1));
    ck_assert_uint_eq(queue_total_count(dlq), 1);
    ck_assert_uint_eq(queue_stats(q)->dropped, 1);
    ck_assert_ptr_nonnull(find_ev(QEV_DROP, 1));
    ck_assert(find_ev(QEV_DROP, 1)->has_detail);
    queue_unsubscribe(&c, now);
    queue_consumer_fini(&c);
}
END_TEST

/* ======================================================== idempotency keys */

START_TEST(test_dedup_key_known_while_live_and_for_window_after)
{
    struct queue_attrs a;
    struct queue *q;
    struct consumer c;
    struct msg_new mn;
    uint64_t id = 0;

    memset(&a, 0, sizeof(a));
    a.dedup_window_ms = 10000;
    q = mkq("jobs", &a);
    memset(&mn, 0, sizeof(mn));
    mn.id = 1;
    mn.idem_key = "order-42";
    ck_assert_pq(queue_dedup_find(q, "order-42", now, &id), PQ_ENOTFOUND);
    ck_assert_pq_ok(queue_push(q, &mn, now, NULL));
    ck_assert_str_eq(msg_idem_key(qset_msg(qs, 1)), "order-42");
    now += 999999;
    qset_tick(qs, now);
    ck_assert_pq_ok(queue_dedup_find(q, "order-42", now, &id));
    ck_assert_uint_eq(id, 1); /* live: no matter how long */
    mn.id = 2;
    ck_assert_pq(queue_push(q, &mn, now, NULL), PQ_EEXIST);
    queue_consumer_init(&c, 1, NULL, 1);
    ck_assert_pq_ok(queue_subscribe(q, &c));
    ck_assert_uint_eq(next_id(q, NULL), 1);
    now += 20000;
    ck_assert_pq_ok(qset_touch(qs, 1, 1, 0, NULL, now, NULL));
    ack(1); /* the window starts at the latest now seen */
    ck_assert_pq_ok(queue_dedup_find(q, "order-42", now + 9999, &id));
    ck_assert_uint_eq(id, 1);
    ck_assert_pq(queue_dedup_find(q, "order-42", now + 10000, &id),
                 PQ_ENOTFOUND);
    now += 10000;
    ck_assert_pq_ok(queue_push(q, &mn, now, NULL)); /* the key is free again */
    ck_assert_pq_ok(queue_dedup_find(q, "order-42", now, &id));
    ck_assert_uint_eq(id, 2);
    ck_assert_pq(queue_dedup_find(q, "other", now, &id), PQ_ENOTFOUND);
    queue_unsubscribe(&c, now);
    queue_consumer_fini(&c);
}
END_TEST

/* Log replay re-pushes a message whose key is in its window (a put-back
 * job, or a key reused after its window): key_takeover lets it in; a live
 * owner of the key still wins. */
START_TEST(test_dedup_key_takeover_for_replay)
{
    struct queue_attrs a;
    struct queue *q;
    struct msg_new mn;
    uint64_t id = 0;

    memset(&a, 0, sizeof(a));
    a.dedup_window_ms = 10000;
    q = mkq("jobs", &a);
    memset(&mn, 0, sizeof(mn));
    mn.id = 1;
    mn.idem_key = "k";
    ck_assert_pq_ok(queue_push(q, &mn, now, NULL));
    ck_assert_pq_ok(qset_cancel(qs, 1, NULL)); /* gone: key in its window */
    ck_assert_pq(queue_push(q, &mn, now, NULL), PQ_EEXIST);
    mn.key_takeover = true;
    ck_assert_pq_ok(queue_push(q, &mn, now, NULL));
    ck_assert_pq_ok(queue_dedup_find(q, "k", now, &id));
    ck_assert_uint_eq(id, 1);
    mn.id = 2; /* live owner: refused even with takeover */
    ck_assert_pq(queue_push(q, &mn, now, NULL), PQ_EEXIST);
    ck_assert_pq_ok(qset_cancel(qs, 1, NULL));
    ck_assert_pq_ok(queue_push(q, &mn, now, NULL)); /* another id takes it */
    ck_assert_pq_ok(queue_dedup_find(q, "k", now, &id));
    ck_assert_uint_eq(id, 2);
}
END_TEST

/* qset_delete with a consumer holding messages: they go with the queue
 * without events (no requeue, no dead letter), their leases leave the
 * deadline heap, and the consumer is left detached. */
START_TEST(test_delete_with_held_messages_fires_nothing)
{
    struct queue_attrs a;
    struct queue *q, *dlq;
    struct consumer c;
    struct msg_new mn;

    memset(&a, 0, sizeof(a));
    dlq = mkq("dlq", NULL);
    a.max_attempts = 1;
    snprintf(a.dead_letter, sizeof(a.dead_letter), "dlq");
    q = mkq("jobs", &a);
    memset(&mn, 0, sizeof(mn));
    mn.id = 1;
    mn.idem_key = "k";
    ck_assert_pq_ok(queue_push(q, &mn, now, NULL));
    push(q, 2, 0);
    push(q, 3, 0);
    queue_consumer_init(&c, 1, NULL, 2);
    ck_assert_pq_ok(queue_subscribe(q, &c));
    ck_assert_uint_eq(next_id(q, NULL), 1);
    ck_assert_uint_eq(next_id(q, NULL), 2);
    n_evs = 0;
    ck_assert_pq_ok(qset_delete(qs, q));
    ck_assert_uint_eq(n_evs, 0);
    ck_assert_ptr_null(c.q);
    ck_assert_uint_eq(c.inflight, 0);
    ck_assert_ptr_null(qset_msg(qs, 1));
    ck_assert_uint_eq(qset_msg_count(qs), 0);
    ck_assert_uint_eq(qset_next_deadline(qs), UINT64_MAX);
    now += 10ULL * 86400000;
    qset_tick(qs, now); /* no lease of a freed message left to expire */
    ck_assert_uint_eq(n_evs, 0);
    ck_assert_uint_eq(queue_total_count(dlq), 0);
    queue_unsubscribe(&c, now); /* detached: a no-op */
    queue_consumer_fini(&c);
}
END_TEST

START_TEST(test_dedup_entries_expire_in_bulk)
{
    struct queue_attrs a;
    struct queue *q;
    struct msg_new mn;
    char key[32];
    uint64_t i, id;
    size_t before;

    memset(&a, 0, sizeof(a));
    a.dedup_window_ms = 1000;
    q = mkq("jobs", &a);
    memset(&mn, 0, sizeof(mn));
    for (i = 1; i <= 1000; i++) {
        snprintf(key, sizeof(key), "k%" PRIu64, i);
        mn.id = i;
        mn.idem_key = key;
        ck_assert_pq_ok(queue_push(q, &mn, now, NULL));
    }
    ck_assert_uint_eq(queue_purge(q), 1000); /* all gone: windows start */
    before = pq_mem_used();
    ck_assert_pq_ok(queue_dedup_find(q, "k500", now + 999, &id));
    ck_assert_uint_eq(id, 500);
    ck_assert_pq(queue_dedup_find(q, "k500", now + 1000, &id), PQ_ENOTFOUND);
    ck_assert_uint_lt(pq_mem_used(), before); /* the entries were freed */
}
END_TEST

/* ======================================================== tags */

START_TEST(test_required_tags_skip_unfit_consumer_without_blocking_others)
{
    struct queue *q = mkq("jobs", NULL);
    struct consumer cpu, gpu, *to;
    struct kv a100 = {"gpu", "a100"};
    struct kv h100 = {"gpu", "h100"};
    struct kv tags[2] = {{"zone", "eu"}, {"gpu", "a100"}};
    struct msg_new mn;
    size_t n;

    queue_consumer_init(&cpu, 1, NULL, 10);
    queue_consumer_init(&gpu, 2, NULL, 10);
    ck_assert_pq_ok(queue_consumer_set_tags(&gpu, tags, 2));
    ck_assert_pq_ok(queue_subscribe(q, &cpu));
    memset(&mn, 0, sizeof(mn));
    mn.id = 1;
    mn.requires = &h100; /* nobody has it */
    mn.n_requires = 1;
    ck_assert_pq_ok(queue_push(q, &mn, now, NULL));
    mn.id = 2;
    mn.requires = &a100;
    ck_assert_pq_ok(queue_push(q, &mn, now, NULL));
    ck_assert_ptr_nonnull(msg_requires(qset_msg(qs, 2), &n));
    ck_assert_uint_eq(n, 1);
    push(q, 3, 0);
    /* cpu only: 1 and 2 wait, 3 goes */
    ck_assert_uint_eq(next_id(q, &to), 3);
    ck_assert_ptr_eq(to, &cpu);
    ck_assert_uint_eq(next_id(q, NULL), 0);
    ck_assert_pq_ok(queue_subscribe(q, &gpu));
    ck_assert_uint_eq(next_id(q, &to), 2);
    ck_assert_ptr_eq(to, &gpu);
    ck_assert_uint_eq(next_id(q, NULL), 0);
    ck_assert_uint_eq(queue_ready_count(q), 1);
    ck_assert_int_eq(qset_msg(qs, 1)->state, MSG_READY);
    push(q, 4, 0); /* plain messages still flow, to either */
    ck_assert_uint_eq(next_id(q, NULL), 4);
    queue_unsubscribe(&cpu, now);
    queue_unsubscribe(&gpu, now);
    queue_consumer_fini(&cpu);
    queue_consumer_fini(&gpu);
}
END_TEST

/* ======================================================== release and cancel
 */

START_TEST(test_release_does_not_count_a_failure_and_keeps_progress)
{
    struct queue_attrs a;
    struct queue *q;
    struct consumer c;
    struct body *prog = body_new("\x08\x0a", 2);
    struct msg *m;
    int i;

    memset(&a, 0, sizeof(a));
    a.max_attempts = 2;
    q = mkq("jobs", &a);
    queue_consumer_init(&c, 1, NULL, 1);
    ck_assert_pq_ok(queue_subscribe(q, &c));
    push(q, 1, 0);
    push(q, 2, 0);
    for (i = 1; i <= 5; i++) { /* more releases than max_attempts */
        ck_assert_uint_eq(next_id(q, NULL), 1); /* back at the front */
        ck_assert_pq_ok(
            qset_release(qs, 1, (uint32_t)i, i == 1 ? prog : NULL, now));
    }
    m = qset_msg(qs, 1);
    ck_assert_int_eq(m->state, MSG_READY);
    ck_assert_uint_eq(m->failures, 0);
    ck_assert_uint_eq(m->attempt, 5);
    ck_assert_ptr_eq(msg_progress(m), prog);
    ck_assert_str_eq(find_ev(QEV_REQUEUE, 1)->reason, "release");
    ck_assert_uint_eq(queue_stats(q)->released, 5);
    ck_assert_uint_eq(queue_stats(q)->dropped, 0);
    body_unref(&prog);
    queue_unsubscribe(&c, now);
    queue_consumer_fini(&c);
}
END_TEST

START_TEST(test_cancel_removes_ready_and_fences_inflight)
{
    struct queue *q = mkq("jobs", NULL);
    struct consumer c;
    struct msg *m = NULL, *out = NULL;

    queue_consumer_init(&c, 1, NULL, 1);
    push(q, 1, 0);
    push(q, 2, 0);
    push_full(q, 3, 0, now + 1000, 10);
    ck_assert_pq_ok(qset_cancel(qs, 2, &m));
    ck_assert_ptr_null(m);
    ck_assert_ptr_null(qset_msg(qs, 2));
    ck_assert_str_eq(find_ev(QEV_DROP, 2)->reason, "cancelled");
    ck_assert_pq_ok(qset_cancel(qs, 3, &m)); /* delayed */
    ck_assert_ptr_null(qset_msg(qs, 3));
    ck_assert_pq(qset_cancel(qs, 99, &m), PQ_ENOTFOUND);
    ck_assert_pq_ok(queue_subscribe(q, &c));
    ck_assert_uint_eq(next_id(q, NULL), 1);
    ck_assert_pq_ok(qset_cancel(qs, 1, &m));
    ck_assert_ptr_eq(m, qset_msg(qs, 1));
    ck_assert_ptr_eq(m->holder, &c);
    ck_assert(msg_is_cancelled(m));
    ck_assert_uint_eq(c.inflight, 1);        /* the worker is still busy */
    ck_assert_pq_ok(qset_cancel(qs, 1, &m)); /* again: nothing more to do */
    ck_assert_ptr_null(m);
    ck_assert_pq(qset_touch(qs, 1, 1, 0, NULL, now, NULL), PQ_ESTALE);
    ck_assert_pq(qset_ack(qs, 1, 1, &out), PQ_ESTALE); /* fenced */
    ck_assert_ptr_null(out);
    ck_assert_ptr_null(qset_msg(qs, 1));
    ck_assert_uint_eq(c.inflight, 0);
    ck_assert_uint_eq(queue_stats(q)->cancelled, 3);
    ck_assert_uint_eq(queue_stats(q)->acked, 0);
    ck_assert_uint_eq(queue_total_count(q), 0);
    ck_assert_uint_eq(queue_bytes(q), 0);
    ck_assert_uint_eq(qset_next_deadline(qs), UINT64_MAX);
    queue_unsubscribe(&c, now);
    queue_consumer_fini(&c);
}
END_TEST

START_TEST(test_cancelled_inflight_is_dropped_at_lease_end)
{
    struct queue *q = mkq("jobs", NULL);
    struct consumer c;

    queue_consumer_init(&c, 1, NULL, 1);
    ck_assert_pq_ok(queue_subscribe(q, &c));
    push(q, 1, 0);
    ck_assert_uint_eq(next_id(q, NULL), 1);
    ck_assert_pq_ok(qset_cancel(qs, 1, NULL));
    now += 30000;
    qset_tick(qs, now);
    ck_assert_ptr_null(qset_msg(qs, 1));
    ck_assert_ptr_null(find_ev(QEV_REQUEUE, 1));
    ck_assert_str_eq(find_ev(QEV_DROP, 1)->reason, "cancelled");
    queue_unsubscribe(&c, now);
    queue_consumer_fini(&c);
}
END_TEST

START_TEST(test_purge_drops_ready_and_delayed_keeps_inflight)
{
    struct queue *q = mkq("jobs", NULL);
    struct consumer c;

    queue_consumer_init(&c, 1, NULL, 1);
    ck_assert_pq_ok(queue_subscribe(q, &c));
    push(q, 1, 0);
    ck_assert_uint_eq(next_id(q, NULL), 1);
    push(q, 2, 0);
    push(q, 3, 9);
    push_full(q, 4, 0, now + 1000, 10);
    ck_assert_uint_eq(queue_purge(q), 3);
    ck_assert_uint_eq(queue_total_count(q), 1);
    ck_assert_uint_eq(queue_inflight_count(q), 1);
    ck_assert_uint_eq(queue_bytes(q), 10);
    ck_assert_ptr_null(qset_msg(qs, 4));
    ck_assert_uint_eq(qset_next_deadline(qs), now + 30000); /* only the lease */
    ack(1);
    ck_assert_uint_eq(queue_purge(q), 0);
    queue_unsubscribe(&c, now);
    queue_consumer_fini(&c);
}
END_TEST

/* ======================================================== robustness */

START_TEST(test_push_enomem_at_every_step_leaves_nothing_behind)
{
    struct queue *q = mkq("jobs", NULL);
    struct kv req = {"gpu", "a100"};
    struct msg_new mn;
    struct body *b = body_new("x", 1);
    long n;
    int rc = PQ_ENOMEM;

    memset(&mn, 0, sizeof(mn));
    mn.id = 1;
    mn.body = b;
    mn.idem_key = "k";
    mn.requires = &req;
    mn.n_requires = 1;
    for (n = 0; n < 50 && rc != PQ_OK; n++) {
        pq_mem_fail_after(n);
        rc = queue_push(q, &mn, now, NULL);
        pq_mem_fail_after(-1);
        if (rc != PQ_OK) {
            ck_assert_pq(rc, PQ_ENOMEM);
            ck_assert_ptr_null(qset_msg(qs, 1));
            ck_assert_uint_eq(queue_total_count(q), 0);
            ck_assert_uint_eq(b->refs, 1);
            ck_assert_pq(queue_dedup_find(q, "k", now, NULL), PQ_ENOTFOUND);
        }
    }
    ck_assert_pq_ok(rc);
    ck_assert_int_gt(n, 3); /* several allocation points were exercised */
    ck_assert_ptr_nonnull(qset_msg(qs, 1));
    ck_assert_pq(queue_push(q, &mn, now, NULL), PQ_EEXIST); /* same id */
    body_unref(&b);
}
END_TEST

START_TEST(test_msg_index_entry_stays_small)
{
    ck_assert_uint_le(sizeof(struct msg), 112);
}
END_TEST

START_TEST(test_delete_queue_frees_messages_and_heap_slots)
{
    struct queue *q = mkq("jobs", NULL);
    struct queue *q2 = mkq("keep", NULL);

    push(q, 1, 0);
    push_full(q, 2, 0, now + 1000, 10);
    push_full(q2, 3, 0, now + 2000, 10);
    ck_assert_pq_ok(qset_delete(qs, q));
    ck_assert_ptr_null(qset_msg(qs, 1));
    ck_assert_ptr_null(qset_msg(qs, 2));
    ck_assert_uint_eq(qset_next_deadline(qs), now + 2000);
    now += 2000;
    qset_tick(qs, now);
    ck_assert_uint_eq(queue_ready_count(q2), 1);
}
END_TEST

/* ======================================================== suite */

static Suite *
queue_suite(void)
{
    Suite *s = suite_create("queue");

    ADD2(s, "declare", 5, test_queue_name_validation,
         test_declare_is_idempotent_and_conflicts_are_rejected,
         test_delete_queue_frees_messages_and_heap_slots);
    ADD2(s, "ordering", 5, test_fifo_within_one_level,
         test_higher_priority_first_fifo_within_level);
    ADD2(s, "consumers", 5, test_round_robin_across_three_consumers,
         test_prefetch_limits_inflight_and_resumes_after_ack,
         test_paused_consumer_is_skipped,
         test_unsubscribe_requeues_at_front_in_delivery_order,
         test_unsubscribe_with_backoff_returns_jobs_ahead_of_new_ones);
    ADD2(s, "leases", 5, test_lease_expiry_redelivers_with_next_attempt,
         test_stale_token_after_expiry_is_rejected_and_changes_nothing,
         test_touch_extends_past_many_ack_timeouts,
         test_touch_is_capped_at_max_lease);
    ADD2(s, "retry", 10, test_nack_with_delay_requeues_after_exactly_that_delay,
         test_backoff_doubles_to_cap_with_jitter_in_half_to_full,
         test_max_attempts_dead_letters_with_death_headers,
         test_nack_dead_letter_flag_goes_straight_to_dlq,
         test_dead_letter_again_and_again_keeps_one_set_of_death_headers,
         test_without_dlq_message_is_dropped_and_counted);
    ADD2(s, "delay_ttl", 5, test_delayed_message_invisible_until_due,
         test_expired_message_is_never_delivered,
         test_expired_goes_to_dlq_when_configured,
         test_inflight_message_is_not_expired_under_its_worker);
    ADD2(s, "limits", 5, test_max_length_and_max_bytes_reject_with_efull,
         test_full_dlq_drops_instead_of_overflowing);
    ADD(s, "dedup", 5, test_dedup_key_known_while_live_and_for_window_after,
        test_dedup_key_takeover_for_replay, test_dedup_entries_expire_in_bulk);
    ADD2(s, "delete", 5, test_delete_with_held_messages_fires_nothing);
    ADD2(s, "tags", 5,
         test_required_tags_skip_unfit_consumer_without_blocking_others);
    ADD2(s, "release_cancel_purge", 5,
         test_release_does_not_count_a_failure_and_keeps_progress,
         test_cancel_removes_ready_and_fences_inflight,
         test_cancelled_inflight_is_dropped_at_lease_end,
         test_purge_drops_ready_and_delayed_keeps_inflight);
    ADD(s, "robustness", 5,
        test_push_enomem_at_every_step_leaves_nothing_behind,
        test_msg_index_entry_stays_small);
    return s;
}

int
main(void)
{
    return run_suite(queue_suite());
}
