/*
 * check_queue_compact.c: the queue's compact message form (the same
 * workloads give the same order and events as the full form, and cost
 * less memory) and its scale (a million delayed messages). Fixture:
 * tests/unit/queue_fixture.h.
 */
#include <check.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "mem.h"
#include "queue.h"
#include "ckfast.h"
#include "queue_fixture.h"

/* ======================================================== scale */

START_TEST(test_million_delayed_messages_stay_logarithmic)
{
    enum { N = 1000000 };
    struct queue *q = mkq("big", NULL);
    struct consumer c;
    struct msg_new mn;
    uint64_t i, last = 0, got = 0;
    struct consumer *to;
    struct msg *m;

    memset(&mn, 0, sizeof(mn));
    mn.size = 1;
    srand(3);
    for (i = 1; i <= N; i++) {
        mn.id = i;
        mn.due_ms =
            now + 1 + (uint64_t)rand() % 100000; /* random order of deadlines */
        CKF_CMP(queue_push(q, &mn, now, NULL), ==, PQ_OK);
    }
    CKF_CMP(queue_delayed_count(q), ==, N);
    qset_set_listener(qs, NULL, NULL);
    /* cancel a slice from the middle of the heap */
    for (i = 1; i <= N; i += 10) {
        CKF_CMP(qset_cancel(qs, i, NULL), ==, PQ_OK);
    }
    queue_consumer_init(&c, 1, NULL, UINT32_MAX);
    CKF_CMP(queue_subscribe(q, &c), ==, PQ_OK);
    while (qset_next_deadline(qs) != UINT64_MAX && got < N) {
        uint64_t d = qset_next_deadline(qs);

        CKF_CMP(d, >=, last); /* deadlines come out in order */
        last = d;
        now = d;
        qset_tick(qs, now);
        while ((m = queue_next_delivery(q, now, &to)) != NULL) {
            struct msg *out;

            CKF_CMP(qset_ack(qs, m->id, m->attempt, &out), ==, PQ_OK);
            msg_free(out);
            got++;
        }
    }
    CKF_CMP(got, ==, N - N / 10);
    CKF_CMP(qset_msg_count(qs), ==, 0);
    queue_unsubscribe(&c, now);
    queue_consumer_fini(&c);
}
END_TEST

/* ======================================================== compact form */

/* One random workload on a fresh qset, pushing with or without out (full
 * or compact form); every delivery and event goes to the trace. */
struct trace {
    uint64_t v[60000];
    size_t n;
};

static void
trace_add(struct trace *t, uint64_t a, uint64_t b)
{
    CKF_CMP(t->n + 2, <, sizeof(t->v) / sizeof(t->v[0]));
    t->v[t->n++] = a;
    t->v[t->n++] = b;
}

static void
trace_event(void *arg, const struct qevent *ev)
{
    if (ev->type != QEV_READY) {
        trace_add(arg, 1000 + ev->type, ev->m->id);
    }
}

static void
count_cb(void *arg, struct msg *m)
{
    (void)m;
    (*(uint64_t *)arg)++;
}

static void
run_workload(bool ptr, unsigned seed, struct trace *t)
{
    struct qset *s = qset_new(NULL);
    struct queue_attrs a = {0}, da = {0};
    struct queue *q, *dlq;
    struct consumer c[2];
    struct kv tag = {"zone", "eu"};
    struct body *b = mkbody("x", NULL, NULL);
    uint64_t id = 0, clock = 1000000, held[64];
    size_t n_held = 0;
    int i;

    CKF_CMP(s, !=, NULL);
    qset_seed(s, 7);
    qset_set_listener(s, trace_event, t);
    a.no_backoff = true;
    a.max_attempts = 3;
    strcpy(a.dead_letter, "dlq");
    CKF_CMP(qset_create(s, "dlq", &da, &dlq), ==, PQ_OK);
    CKF_CMP(qset_create(s, "q", &a, &q), ==, PQ_OK);
    queue_consumer_init(&c[0], 1, NULL, 8);
    queue_consumer_init(&c[1], 2, NULL, 8);
    CKF_CMP(queue_consumer_set_tags(&c[1], &tag, 1), ==, PQ_OK);
    srand(seed);
    for (i = 0; i < 6000; i++) {
        int op = rand() % 100;

        if (op < 45) {
            struct msg_new mn = {0};
            struct msg *m = NULL;
            int kind = rand() % 20;

            mn.id = ++id;
            mn.body = b;
            mn.size = 1 + (uint32_t)(rand() % 100);
            mn.priority = (uint8_t)(rand() % 3);
            mn.published_wall_ms = 1700000000000ULL + id;
            if (kind == 0) {
                mn.due_ms = clock + 1 + (uint64_t)(rand() % 50);
            } else if (kind == 1) {
                mn.expire_ms = clock + 1 + (uint64_t)(rand() % 50);
            } else if (kind == 2) {
                mn.requires = &tag;
                mn.n_requires = 1;
            } else if (kind == 3 && id > 50) {
                mn.id = id - 1 -
                        (uint64_t)(rand() % 50); /* an old id: EEXIST or back */
            }
            trace_add(t, 1,
                      (uint64_t)queue_push(rand() % 4 == 0 ? dlq : q, &mn,
                                           clock, ptr ? &m : NULL));
        } else if (op < 65) {
            struct consumer *to;
            struct msg *m;

            if (c[0].q == NULL && rand() % 2) {
                CKF_CMP(queue_subscribe(q, &c[0]), ==, PQ_OK);
            }
            if (c[1].q == NULL && rand() % 2) {
                CKF_CMP(queue_subscribe(q, &c[1]), ==, PQ_OK);
            }
            m = queue_next_delivery(q, clock, &to);
            trace_add(t, 2, m != NULL ? m->id * 4 + to->id : 0);
            if (m != NULL && n_held < 64) {
                held[n_held++] = m->id;
            }
        } else if (op < 80 && n_held > 0) {
            size_t k = (size_t)rand() % n_held;
            struct msg v;
            uint64_t hid = held[k];
            int r = rand() % 4;

            held[k] = held[--n_held];
            if (!qset_msg_peek(s, hid, &v) || v.state != MSG_INFLIGHT) {
                trace_add(t, 3, 0);
                continue;
            }
            if (r == 0) {
                struct msg *out = NULL;

                trace_add(t, 3, (uint64_t)qset_ack(s, hid, v.attempt, &out));
                msg_free(out);
            } else if (r == 1) {
                trace_add(t, 4,
                          (uint64_t)qset_nack(s, hid, v.attempt, NULL, clock));
            } else if (r == 2) {
                trace_add(
                    t, 5,
                    (uint64_t)qset_release(s, hid, v.attempt, NULL, clock));
            } else {
                struct nack_opts o = {.has_delay = true, .delay_ms = 5};

                trace_add(t, 6,
                          (uint64_t)qset_nack(s, hid, v.attempt, &o, clock));
            }
        } else if (op < 86 && id > 0) {
            trace_add(
                t, 7,
                (uint64_t)qset_cancel(s, 1 + (uint64_t)rand() % id, NULL));
        } else if (op < 90 && id > 0) {
            struct msg *m = qset_msg(s, 1 + (uint64_t)rand() % id);

            trace_add(t, 8, m != NULL ? m->id * 8 + m->state : 0);
        } else if (op < 93) {
            struct consumer *cc = &c[rand() % 2];

            queue_unsubscribe(cc, clock);
            trace_add(t, 9, cc->id);
            n_held = 0; /* stale tokens are fine: peek checks them */
        } else if (op < 99) {
            clock += (uint64_t)(rand() % 20);
            qset_tick(s, clock);
            trace_add(t, 10, clock);
        } else {
            trace_add(t, 11, queue_purge(rand() % 2 ? q : dlq));
        }
        trace_add(t, 12, queue_ready_count(q) << 32 | queue_ready_count(dlq));
        trace_add(t, 13, queue_bytes(q) << 32 | qset_msg_count(s));
    }
    CKF_CMP(qset_sort_ready(s), ==, PQ_OK);
    {
        uint64_t n = 0;

        queue_foreach_msg(q, count_cb, &n);
        queue_foreach_msg(dlq, count_cb, &n);
        CKF_CMP(n, ==, qset_msg_count(s));
    }
    /* drain in the sorted order (both runs now hold compact slots) */
    for (i = 0; i < 100000; i++) {
        struct consumer *to;
        struct msg *m;

        if (c[0].q == NULL) {
            CKF_CMP(queue_subscribe(q, &c[0]), ==, PQ_OK);
        }
        m = queue_next_delivery(q, clock, &to);
        if (m == NULL) {
            clock += 100;
            qset_tick(s, clock);
            if (queue_ready_count(q) + queue_delayed_count(q) == 0) {
                break;
            }
            continue;
        }
        trace_add(t, 14, m->id * 4 + to->id);
        if (m->id % 5 == 0) {
            trace_add(t, 15, (uint64_t)qset_cancel(s, m->id + 1, NULL));
        }
        trace_add(t, 3, (uint64_t)qset_ack(s, m->id, m->attempt, NULL));
    }
    queue_unsubscribe(&c[0], clock);
    queue_unsubscribe(&c[1], clock);
    queue_consumer_fini(&c[0]);
    queue_consumer_fini(&c[1]);
    body_unref(&b);
    qset_free(s);
}

START_TEST(test_compact_form_changes_no_order_or_event)
{
    static struct trace full, compact;
    unsigned seed;

    for (seed = 1; seed <= 8; seed++) {
        size_t i;

        full.n = compact.n = 0;
        run_workload(true, seed, &full);
        run_workload(false, seed, &compact);
        CKF_CMP(full.n, ==, compact.n);
        for (i = 0; i < full.n; i++) {
            ck_assert_msg(full.v[i] == compact.v[i],
                          "seed %u: trace differs at %zu (op %" PRIu64
                          "): %" PRIu64 " vs %" PRIu64,
                          seed, i, full.v[i & ~(size_t)1], full.v[i],
                          compact.v[i]);
        }
    }
}
END_TEST

START_TEST(test_compact_backlog_costs_under_64_bytes_a_message)
{
    enum { N = 200000 };
    struct queue *q = mkq("big", NULL);
    struct consumer c;
    struct consumer *to;
    struct msg_new mn;
    size_t before = pq_mem_used();
    uint64_t i;
    struct msg *m;

    memset(&mn, 0, sizeof(mn));
    mn.size = 1;
    for (i = 1; i <= N; i++) {
        mn.id = i;
        CKF_CMP(queue_push(q, &mn, now, NULL), ==, PQ_OK);
    }
    CKF_CMP(qset_msg_count(qs), ==, N);
    CKF_CMP((pq_mem_used() - before) / N, <=, 48);
    /* cancel 7 of every 8 from the middle: the level is squeezed whenever
     * tombstones pass 3/4, so it holds at most 4 slots a live message */
    qset_set_listener(qs, NULL, NULL);
    for (i = 1; i <= N; i++) {
        if (i % 8 != 0) {
            CKF_CMP(qset_cancel(qs, i, NULL), ==, PQ_OK);
        }
    }
    CKF_CMP(pq_mem_used() - before, <=, (size_t)N / 8 * 4 * 40 + 3 * 41000);
    CKF_CMP(qset_cancel(qs, 1, NULL), ==, PQ_ENOTFOUND);
    queue_consumer_init(&c, 1, NULL, UINT32_MAX);
    CKF_CMP(queue_subscribe(q, &c), ==, PQ_OK);
    for (i = 8; i <= N; i += 8) {
        m = queue_next_delivery(q, now, &to);
        CKF_CMP(m, !=, NULL);
        CKF_CMP(m->id, ==, i);
        CKF_CMP(qset_ack(qs, m->id, m->attempt, NULL), ==, PQ_OK);
    }
    CKF_CMP(queue_next_delivery(q, now, &to), ==, NULL);
    CKF_CMP(qset_msg_count(qs), ==, 0);
    queue_unsubscribe(&c, now);
    queue_consumer_fini(&c);
}
END_TEST

static void
move_cb(void *arg, struct msg *m)
{
    (void)arg;
    m->pub_seg = m->state_seg = 77;
    m->pub_off = (uint32_t)m->id;
    body_unref(&m->body); /* evicted */
}

START_TEST(test_compact_foreach_keeps_changes_and_sort_merges_back_pushes)
{
    struct queue *q = mkq("jobs", NULL);
    uint64_t order[] = {10, 11, 12, 3,
                        4,  13, 1}; /* replay-like: out of order */
    uint64_t want[] = {1, 3, 4, 10, 11, 12, 13};
    struct consumer c;
    struct consumer *to;
    struct msg v;
    size_t i;

    for (i = 0; i < sizeof(order) / sizeof(order[0]); i++) {
        push(q, order[i], 2);
    }
    CKF(qset_msg_peek(qs, 11, &v));
    CKF_CMP(v.state, ==, MSG_READY);
    CKF_CMP(v.priority, ==, 2);
    queue_foreach_msg(q, move_cb, NULL);
    CKF(qset_msg_peek(qs, 12, &v));
    CKF_CMP(v.pub_seg, ==, 77);
    CKF_CMP(v.state_seg, ==, 77);
    CKF_CMP(v.pub_off, ==, 12);
    CKF_CMP(v.body, ==, NULL);
    CKF_CMP(qset_sort_ready(qs), ==, PQ_OK);
    CKF_CMP(qset_msg_count(qs), ==, 7);
    queue_consumer_init(&c, 1, NULL, 100);
    CKF_CMP(queue_subscribe(q, &c), ==, PQ_OK);
    for (i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        struct msg *m = queue_next_delivery(q, now, &to);

        CKF_CMP(m, !=, NULL);
        CKF_CMP(m->id, ==, want[i]);
        CKF_CMP(m->pub_seg, ==, 77);
        CKF_CMP(m->pub_off, ==, (uint32_t)m->id);
    }
    queue_unsubscribe(&c, now);
    queue_consumer_fini(&c);
}
END_TEST

/* ======================================================== suite */

static Suite *
queue_compact_suite(void)
{
    Suite *s = suite_create("queue_compact");

    ADD(s, "scale", 120, test_million_delayed_messages_stay_logarithmic);
    ADD(s, "compact_form", 60, test_compact_form_changes_no_order_or_event,
        test_compact_backlog_costs_under_64_bytes_a_message,
        test_compact_foreach_keeps_changes_and_sort_merges_back_pushes);
    return s;
}

int
main(void)
{
    return run_suite(queue_compact_suite());
}
