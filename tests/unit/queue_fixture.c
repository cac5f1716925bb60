/*
 * queue_fixture.c: see queue_fixture.h.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>

#include "mem.h"
#include "protoq.pb-c.h"
#include "queue_fixture.h"

/* ---- fixture: one qset, a fake clock, an event recorder ---- */

struct qset *qs;
uint64_t now;
/* push_full asks queue_push for the struct msg (full form); the "compact"
 * cases run the same tests with out == NULL (compact form where it fits). */
bool want_ptr = true;
struct ev_rec evs[EV_MAX];
size_t n_evs;
size_t n_ready_hints;

void
record(void *arg, const struct qevent *ev)
{
    struct ev_rec *r;

    (void)arg;
    if (ev->type == QEV_READY) {
        n_ready_hints++;
        return;
    }
    ck_assert_uint_lt(n_evs, EV_MAX);
    r = &evs[n_evs++];
    memset(r, 0, sizeof(*r));
    r->type = ev->type;
    r->id = ev->m->id;
    snprintf(r->reason, sizeof(r->reason), "%s", qreason_name(ev->reason));
    snprintf(r->q, sizeof(r->q), "%s", queue_name(ev->q));
    if (ev->from != NULL) {
        snprintf(r->from, sizeof(r->from), "%s", queue_name(ev->from));
    }
    r->has_detail = ev->detail != NULL;
}

void
setup(void)
{
    qs = qset_new(NULL);
    ck_assert_ptr_nonnull(qs);
    qset_seed(qs, 42);
    qset_set_listener(qs, record, NULL);
    now = 1000000;
    n_evs = 0;
    n_ready_hints = 0;
}

void
setup_compact(void)
{
    setup();
    want_ptr = false;
}

void
teardown(void)
{
    qset_free(qs);
    qs = NULL;
    want_ptr = true;
    ck_assert_uint_eq(pq_mem_used(), 0);
}

struct queue *
mkq(const char *name, const struct queue_attrs *a)
{
    struct queue *q = NULL;

    ck_assert_pq_ok(qset_create(qs, name, a, &q));
    ck_assert_ptr_nonnull(q);
    return q;
}

/* An encoded protoq.Message with this payload and optional header. */
struct body *
mkbody(const char *payload, const char *hk, const char *hv)
{
    Protoq__Message msg = PROTOQ__MESSAGE__INIT;
    Protoq__KeyValue kv = PROTOQ__KEY_VALUE__INIT;
    Protoq__KeyValue *kvs[1] = {&kv};
    uint8_t buf[512];
    size_t len;

    msg.payload.data = (uint8_t *)payload;
    msg.payload.len = strlen(payload);
    if (hk != NULL) {
        kv.key = (char *)hk;
        kv.value = (char *)hv;
        msg.n_headers = 1;
        msg.headers = kvs;
    }
    len = protoq__message__get_packed_size(&msg);
    ck_assert_uint_le(len, sizeof(buf));
    protoq__message__pack(&msg, buf);
    return body_new(buf, len);
}

struct msg *
push_full(struct queue *q, uint64_t id, uint8_t prio, uint64_t due,
          uint32_t size)
{
    struct msg_new mn;
    struct msg *m = NULL;
    char payload[32];

    memset(&mn, 0, sizeof(mn));
    snprintf(payload, sizeof(payload), "job-%" PRIu64, id);
    mn.id = id;
    mn.body = mkbody(payload, "origin", "test");
    ck_assert_ptr_nonnull(mn.body);
    mn.size = size;
    mn.priority = prio;
    mn.due_ms = due;
    mn.published_wall_ms = 1700000000000ULL;
    ck_assert_pq_ok(queue_push(q, &mn, now, want_ptr ? &m : NULL));
    body_unref(&mn.body); /* the queue holds its own reference */
    return m;
}

struct msg *
push(struct queue *q, uint64_t id, uint8_t prio)
{
    return push_full(q, id, prio, 0, 10);
}

/* Next delivery's id, or 0 when none; *to gets the consumer. */
uint64_t
next_id(struct queue *q, struct consumer **to)
{
    struct consumer *c = NULL;
    struct msg *m = queue_next_delivery(q, now, &c);

    if (to != NULL) {
        *to = c;
    }
    if (m == NULL) {
        ck_assert_ptr_null(c);
        return 0;
    }
    ck_assert_ptr_nonnull(c);
    ck_assert_int_eq(m->state, MSG_INFLIGHT);
    ck_assert_ptr_eq(m->holder, c);
    return m->id;
}

void
ack(uint64_t id)
{
    struct msg *m = qset_msg(qs, id);
    struct msg *out = NULL;

    ck_assert_ptr_nonnull(m);
    ck_assert_pq_ok(qset_ack(qs, id, m->attempt, &out));
    ck_assert_ptr_eq(out, m);
    msg_free(out);
}

struct ev_rec *
find_ev(enum qevent_type type, uint64_t id)
{
    size_t i;

    for (i = 0; i < n_evs; i++) {
        if (evs[i].type == type && evs[i].id == id) {
            return &evs[i];
        }
    }
    return NULL;
}

/* Header value in an encoded Message, or NULL. Copies into buf. */
const char *
header_of(const struct body *b, const char *key, char *buf, size_t cap)
{
    Protoq__Message *msg = protoq__message__unpack(NULL, b->len, b->data);
    const char *res = NULL;
    size_t i;

    ck_assert_ptr_nonnull(msg);
    for (i = 0; i < msg->n_headers; i++) {
        if (strcmp(msg->headers[i]->key, key) == 0) {
            snprintf(buf, cap, "%s", msg->headers[i]->value);
            res = buf;
        }
    }
    protoq__message__free_unpacked(msg, NULL);
    return res;
}

void
add_case(Suite *s, const char *name, const TTest *tests[], size_t n,
         int timeout)
{
    bool compact = strncmp(name, "compact:", 8) == 0;
    TCase *tc = tcase_create(name);
    size_t i;

    tcase_add_checked_fixture(tc, compact ? setup_compact : setup, teardown);
    tcase_set_timeout(tc, timeout);
    for (i = 0; i < n; i++) {
        tcase_add_test(tc, tests[i]);
    }
    suite_add_tcase(s, tc);
}

int
run_suite(Suite *s)
{
    SRunner *sr = srunner_create(s);
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
