/*
 * check_queue.c: unit tests for broker/queue.c and the structures under it
 * (heap.c, hmap.c, body.c). Pure: a fake clock (`now`), no sleeps, no I/O.
 * Every test frees what it made, so an ASan build also checks for leaks.
 */
#include <check.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "body.h"
#include "heap.h"
#include "hmap.h"
#include "mem.h"
#include "pqerr.h"
#include "protoq.pb-c.h"
#include "queue.h"

#define ck_assert_pq(expr, want)                                               \
    do {                                                                       \
        int rc_ = (expr);                                                      \
        ck_assert_msg(rc_ == (want), "%s: got %s (%d), want %s", #expr,        \
                      pq_strerror(rc_), rc_, pq_strerror(want));               \
    } while (0)
#define ck_assert_pq_ok(expr) ck_assert_pq(expr, PQ_OK)

/* ---- fixture: one qset, a fake clock, an event recorder ---- */

enum { EV_MAX = 256 };

struct ev_rec {
    enum qevent_type type;
    uint64_t id;
    char reason[32];
    char q[QUEUE_NAME_MAX + 1];
    char from[QUEUE_NAME_MAX + 1];
    int has_detail;
};

static struct qset *qs;
static uint64_t now;
/* push_full asks queue_push for the struct msg (full form); the "compact"
 * cases run the same tests with out == NULL (compact form where it fits). */
static bool want_ptr = true;
static struct ev_rec evs[EV_MAX];
static size_t n_evs;
static size_t n_ready_hints;

static void
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

static void
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

static void
setup_compact(void)
{
    setup();
    want_ptr = false;
}

static void
teardown(void)
{
    qset_free(qs);
    qs = NULL;
    want_ptr = true;
    ck_assert_uint_eq(pq_mem_used(), 0);
}

static struct queue *
mkq(const char *name, const struct queue_attrs *a)
{
    struct queue *q = NULL;

    ck_assert_pq_ok(qset_create(qs, name, a, &q));
    ck_assert_ptr_nonnull(q);
    return q;
}

/* An encoded protoq.Message with this payload and optional header. */
static struct body *
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

static struct msg *
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

static struct msg *
push(struct queue *q, uint64_t id, uint8_t prio)
{
    return push_full(q, id, prio, 0, 10);
}

/* Next delivery's id, or 0 when none; *to gets the consumer. */
static uint64_t
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

static void
ack(uint64_t id)
{
    struct msg *m = qset_msg(qs, id);
    struct msg *out = NULL;

    ck_assert_ptr_nonnull(m);
    ck_assert_pq_ok(qset_ack(qs, id, m->attempt, &out));
    ck_assert_ptr_eq(out, m);
    msg_free(out);
}

static struct ev_rec *
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
static const char *
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

/* ======================================================== heap */

struct hitem {
    uint64_t key;
    size_t pos;
    int in;
};

static bool
hitem_less(const void *a, const void *b)
{
    return ((const struct hitem *)a)->key < ((const struct hitem *)b)->key;
}

static void
hitem_setpos(void *p, size_t pos)
{
    ((struct hitem *)p)->pos = pos;
}

static int
cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

    return x < y ? -1 : x > y;
}

START_TEST(test_heap_random_ops_match_sorted_reference)
{
    enum { N = 10000 };
    struct hitem *items = calloc(N, sizeof(*items));
    uint64_t *ref = calloc(N, sizeof(*ref));
    struct heap h;
    size_t i, n_ref = 0;

    ck_assert_ptr_nonnull(items);
    ck_assert_ptr_nonnull(ref);
    srand(7);
    heap_init(&h, hitem_less, hitem_setpos);
    for (i = 0; i < N; i++) {
        items[i].key = (uint64_t)rand() % 5000; /* duplicates on purpose */
        ck_assert_pq_ok(heap_push(&h, &items[i]));
        items[i].in = 1;
        ck_assert_ptr_eq(h.items[items[i].pos], &items[i]);
    }
    /* remove a third from the middle by slot, and re-key some */
    for (i = 0; i < N; i += 3) {
        ck_assert_ptr_eq(heap_remove(&h, items[i].pos), &items[i]);
        ck_assert_uint_eq(items[i].pos, HEAP_NOPOS);
        items[i].in = 0;
    }
    for (i = 1; i < N; i += 7) {
        if (items[i].in) {
            items[i].key = (uint64_t)rand() % 5000;
            heap_update(&h, items[i].pos);
        }
    }
    for (i = 0; i < N; i++) {
        if (items[i].in) {
            ref[n_ref++] = items[i].key;
        }
    }
    qsort(ref, n_ref, sizeof(*ref), cmp_u64);
    ck_assert_uint_eq(heap_len(&h), n_ref);
    for (i = 0; i < n_ref; i++) {
        struct hitem *it = heap_peek(&h);

        ck_assert_ptr_eq(heap_pop(&h), it);
        ck_assert_uint_eq(it->key, ref[i]);
    }
    ck_assert_ptr_null(heap_pop(&h));
    ck_assert_ptr_null(heap_peek(&h));
    heap_fini(&h);
    free(items);
    free(ref);
}
END_TEST

START_TEST(test_heap_push_fails_cleanly_on_enomem)
{
    struct hitem a = {1, 0, 0};
    struct heap h;

    heap_init(&h, hitem_less, hitem_setpos);
    pq_mem_fail_after(0);
    ck_assert_pq(heap_push(&h, &a), PQ_ENOMEM);
    pq_mem_fail_after(-1);
    ck_assert_uint_eq(heap_len(&h), 0);
    ck_assert_pq_ok(heap_push(&h, &a));
    ck_assert_uint_eq(heap_len(&h), 1);
    heap_fini(&h);
}
END_TEST

/* ======================================================== hmap */

START_TEST(test_hmap_u64_matches_reference_through_grow_and_shrink)
{
    enum { KEYS = 4096, OPS = 200000 };
    static int ref[KEYS];
    static int vals[KEYS];
    struct hmap_u64 m;
    size_t i, n_ref = 0, iter = 0, seen = 0, max_cap = 0;
    uint64_t k;

    memset(ref, 0, sizeof(ref));
    srand(11);
    hmap_u64_init(&m);
    for (i = 0; i < OPS; i++) {
        /* keys spread so some collide in the low bits */
        k = (uint64_t)(rand() % KEYS);
        /* phases: mostly insert, then mostly delete (forces shrink) */
        int insert = i < OPS / 2 ? rand() % 4 != 0 : rand() % 4 == 0;

        if (insert) {
            int rc = hmap_u64_put(&m, k * 0x100000000ULL, &vals[k]);

            ck_assert_int_eq(rc, ref[k] ? PQ_EEXIST : PQ_OK);
            if (!ref[k]) {
                ref[k] = 1;
                n_ref++;
            }
        } else {
            void *v = hmap_u64_del(&m, k * 0x100000000ULL);

            ck_assert_ptr_eq(v, ref[k] ? &vals[k] : NULL);
            if (ref[k]) {
                ref[k] = 0;
                n_ref--;
            }
        }
        ck_assert_uint_eq(hmap_u64_len(&m), n_ref);
        if (m.cap > max_cap) {
            max_cap = m.cap;
        }
    }
    for (k = 0; k < KEYS; k++) {
        ck_assert_ptr_eq(hmap_u64_get(&m, k * 0x100000000ULL),
                         ref[k] ? &vals[k] : NULL);
    }
    while (hmap_u64_next(&m, &iter, &k) != NULL) {
        ck_assert(ref[k / 0x100000000ULL]);
        seen++;
    }
    ck_assert_uint_eq(seen, n_ref);
    ck_assert_uint_ge(max_cap, 4096);  /* it grew */
    ck_assert_uint_lt(m.cap, max_cap); /* and shrank again */
    ck_assert_uint_le(hmap_u64_len(&m) * 4, m.cap * 3);
    ck_assert_pq(hmap_u64_put(&m, 1, NULL), PQ_EINVAL);
    hmap_u64_fini(&m);
}
END_TEST

START_TEST(test_hmap_ptr_matches_reference_through_grow_and_shrink)
{
    enum { KEYS = 4096, OPS = 200000 };
    struct obj {
        int pad;
        uint64_t key;
    };
    static struct obj objs[KEYS];
    static int ref[KEYS];
    struct hmap_ptr m;
    size_t i, n_ref = 0, iter = 0, seen = 0, max_cap = 0;
    struct obj *o;
    uint64_t k;

    memset(ref, 0, sizeof(ref));
    for (k = 0; k < KEYS; k++) {
        objs[k].key = k * 0x100000000ULL;
    }
    srand(12);
    hmap_ptr_init(&m, offsetof(struct obj, key));
    for (i = 0; i < OPS; i++) {
        k = (uint64_t)(rand() % KEYS);
        int insert = i < OPS / 2 ? rand() % 4 != 0 : rand() % 4 == 0;

        if (insert) {
            ck_assert_int_eq(hmap_ptr_put(&m, &objs[k]),
                             ref[k] ? PQ_EEXIST : PQ_OK);
            if (!ref[k]) {
                ref[k] = 1;
                n_ref++;
            }
        } else {
            ck_assert_ptr_eq(hmap_ptr_del(&m, objs[k].key),
                             ref[k] ? &objs[k] : NULL);
            if (ref[k]) {
                ref[k] = 0;
                n_ref--;
            }
        }
        ck_assert_uint_eq(hmap_ptr_len(&m), n_ref);
        ck_assert_uint_le(hmap_ptr_len(&m) * 20, m.cap * 17); /* load <= 85% */
        if (m.cap > max_cap) {
            max_cap = m.cap;
        }
    }
    for (k = 0; k < KEYS; k++) {
        ck_assert_ptr_eq(hmap_ptr_get(&m, objs[k].key),
                         ref[k] ? &objs[k] : NULL);
    }
    ck_assert_ptr_null(hmap_ptr_get(&m, 7));
    while ((o = hmap_ptr_next(&m, &iter)) != NULL) {
        ck_assert(ref[o - objs]);
        seen++;
    }
    ck_assert_uint_eq(seen, n_ref);
    ck_assert_uint_ge(max_cap, 3000);  /* it grew */
    ck_assert_uint_lt(m.cap, max_cap); /* and shrank again */
    ck_assert_pq(hmap_ptr_put(&m, NULL), PQ_EINVAL);
    hmap_ptr_fini(&m);
    pq_mem_fail_after(0);
    ck_assert_pq(hmap_ptr_put(&m, &objs[0]),
                 PQ_ENOMEM); /* first table: unchanged */
    ck_assert_uint_eq(hmap_ptr_len(&m), 0);
    ck_assert_ptr_null(hmap_ptr_get(&m, objs[0].key));
    pq_mem_fail_after(-1);
    hmap_ptr_fini(&m);
}
END_TEST

START_TEST(test_hmap_str_matches_reference)
{
    enum { KEYS = 2000 };
    static char keys[KEYS][16];
    static int ref[KEYS];
    struct hmap_str m;
    size_t i, n_ref = 0;

    memset(ref, 0, sizeof(ref));
    srand(5);
    hmap_str_init(&m);
    for (i = 0; i < KEYS; i++) {
        snprintf(keys[i], sizeof(keys[i]), "key-%zu", i);
    }
    for (i = 0; i < 50000; i++) {
        size_t k = (size_t)rand() % KEYS;

        if (rand() % 3 != 0) {
            int rc = hmap_str_put(&m, keys[k], keys[k]);

            ck_assert_int_eq(rc, ref[k] ? PQ_EEXIST : PQ_OK);
            if (!ref[k]) {
                ref[k] = 1;
                n_ref++;
            }
        } else {
            char probe[16];

            snprintf(probe, sizeof(probe), "key-%zu",
                     k); /* equal, not the same pointer */
            ck_assert_ptr_eq(hmap_str_del(&m, probe), ref[k] ? keys[k] : NULL);
            if (ref[k]) {
                ref[k] = 0;
                n_ref--;
            }
        }
    }
    ck_assert_uint_eq(hmap_str_len(&m), n_ref);
    for (i = 0; i < KEYS; i++) {
        ck_assert_ptr_eq(hmap_str_get(&m, keys[i]), ref[i] ? keys[i] : NULL);
    }
    ck_assert_ptr_null(hmap_str_get(&m, "absent"));
    hmap_str_fini(&m);
}
END_TEST

/* ======================================================== body */

START_TEST(test_body_refcount_and_unref_nulls_pointer)
{
    size_t before = pq_mem_used();
    struct body *b = body_new("abc", 3);
    struct body *b2;

    ck_assert_ptr_nonnull(b);
    ck_assert_uint_gt(pq_mem_used(), before);
    ck_assert_uint_eq(b->refs, 1);
    ck_assert_uint_eq(b->len, 3);
    b2 = body_ref(b);
    ck_assert_ptr_eq(b2, b);
    ck_assert_uint_eq(b->refs, 2);
    body_unref(&b2);
    ck_assert_ptr_null(b2);
    ck_assert_uint_eq(b->refs, 1);
    body_unref(&b);
    ck_assert_ptr_null(b);
    body_unref(&b); /* NULL ok */
    body_unref(NULL);
    ck_assert_uint_eq(pq_mem_used(), before);
}
END_TEST

START_TEST(test_body_with_headers_decodes_with_old_and_new_headers)
{
    struct body *b = mkbody("payload!", "a", "1");
    char big[300];
    struct kv add[3];
    struct body *nb;
    Protoq__Message *msg;

    memset(big, 'v', sizeof(big) - 1); /* > 127 bytes: 2-byte varint lengths */
    big[sizeof(big) - 1] = '\0';
    add[0] = (struct kv){"x-death-reason", "max_attempts"};
    add[1] = (struct kv){"long", big};
    add[2] = (struct kv){"empty", NULL};
    nb = body_with_headers(b, add, 3);
    ck_assert_ptr_nonnull(nb);
    ck_assert_uint_eq(b->refs, 1); /* original untouched */
    msg = protoq__message__unpack(NULL, nb->len, nb->data);
    ck_assert_ptr_nonnull(msg);
    ck_assert_uint_eq(msg->payload.len, 8);
    ck_assert_mem_eq(msg->payload.data, "payload!", 8);
    ck_assert_uint_eq(msg->n_headers, 4);
    ck_assert_str_eq(msg->headers[0]->key, "a");
    ck_assert_str_eq(msg->headers[0]->value, "1");
    ck_assert_str_eq(msg->headers[1]->key, "x-death-reason");
    ck_assert_str_eq(msg->headers[1]->value, "max_attempts");
    ck_assert_str_eq(msg->headers[2]->key, "long");
    ck_assert_str_eq(msg->headers[2]->value, big);
    ck_assert_str_eq(msg->headers[3]->key, "empty");
    ck_assert_str_eq(msg->headers[3]->value, "");
    protoq__message__free_unpacked(msg, NULL);
    body_unref(&nb);

    /* A header of the same name is replaced, the others stay in order. */
    add[0] = (struct kv){"a", "2"};
    nb = body_with_headers(b, add, 1);
    ck_assert_ptr_nonnull(nb);
    msg = protoq__message__unpack(NULL, nb->len, nb->data);
    ck_assert_ptr_nonnull(msg);
    ck_assert_uint_eq(msg->n_headers, 1);
    ck_assert_str_eq(msg->headers[0]->value, "2");
    ck_assert_mem_eq(msg->payload.data, "payload!", 8);
    protoq__message__free_unpacked(msg, NULL);
    body_unref(&nb);
    body_unref(&b);

    /* Bytes that do not parse (a varint that never ends) are kept whole. */
    b = body_new("\xff\xff", 2);
    ck_assert_ptr_nonnull(b);
    nb = body_with_headers(b, add, 1);
    ck_assert_ptr_nonnull(nb);
    ck_assert_uint_eq(nb->len, 2 + 1 + 1 + 3 + 3);
    ck_assert_mem_eq(nb->data, "\xff\xff", 2);
    body_unref(&nb);

    nb = body_with_headers(NULL, add, 1); /* NULL body = empty Message */
    ck_assert_ptr_nonnull(nb);
    msg = protoq__message__unpack(NULL, nb->len, nb->data);
    ck_assert_ptr_nonnull(msg);
    ck_assert_uint_eq(msg->n_headers, 1);
    protoq__message__free_unpacked(msg, NULL);
    body_unref(&nb);
    body_unref(&b);
}
END_TEST

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
    ck_assert_uint_eq(c.inflight, 1); /* the worker is still busy */
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
        ck_assert_int_eq(queue_push(q, &mn, now, NULL), PQ_OK);
    }
    ck_assert_uint_eq(queue_delayed_count(q), N);
    qset_set_listener(qs, NULL, NULL);
    /* cancel a slice from the middle of the heap */
    for (i = 1; i <= N; i += 10) {
        ck_assert_int_eq(qset_cancel(qs, i, NULL), PQ_OK);
    }
    queue_consumer_init(&c, 1, NULL, UINT32_MAX);
    ck_assert_pq_ok(queue_subscribe(q, &c));
    while (qset_next_deadline(qs) != UINT64_MAX && got < N) {
        uint64_t d = qset_next_deadline(qs);

        ck_assert_uint_ge(d, last); /* deadlines come out in order */
        last = d;
        now = d;
        qset_tick(qs, now);
        while ((m = queue_next_delivery(q, now, &to)) != NULL) {
            struct msg *out;

            ck_assert_int_eq(qset_ack(qs, m->id, m->attempt, &out), PQ_OK);
            msg_free(out);
            got++;
        }
    }
    ck_assert_uint_eq(got, N - N / 10);
    ck_assert_uint_eq(qset_msg_count(qs), 0);
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
    ck_assert_uint_lt(t->n + 2, sizeof(t->v) / sizeof(t->v[0]));
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

    ck_assert_ptr_nonnull(s);
    qset_seed(s, 7);
    qset_set_listener(s, trace_event, t);
    a.no_backoff = true;
    a.max_attempts = 3;
    strcpy(a.dead_letter, "dlq");
    ck_assert_pq_ok(qset_create(s, "dlq", &da, &dlq));
    ck_assert_pq_ok(qset_create(s, "q", &a, &q));
    queue_consumer_init(&c[0], 1, NULL, 8);
    queue_consumer_init(&c[1], 2, NULL, 8);
    ck_assert_pq_ok(queue_consumer_set_tags(&c[1], &tag, 1));
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
                ck_assert_pq_ok(queue_subscribe(q, &c[0]));
            }
            if (c[1].q == NULL && rand() % 2) {
                ck_assert_pq_ok(queue_subscribe(q, &c[1]));
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
    ck_assert_pq_ok(qset_sort_ready(s));
    {
        uint64_t n = 0;

        queue_foreach_msg(q, count_cb, &n);
        queue_foreach_msg(dlq, count_cb, &n);
        ck_assert_uint_eq(n, qset_msg_count(s));
    }
    /* drain in the sorted order (both runs now hold compact slots) */
    for (i = 0; i < 100000; i++) {
        struct consumer *to;
        struct msg *m;

        if (c[0].q == NULL) {
            ck_assert_pq_ok(queue_subscribe(q, &c[0]));
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
        ck_assert_uint_eq(full.n, compact.n);
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
        ck_assert_pq_ok(queue_push(q, &mn, now, NULL));
    }
    ck_assert_uint_eq(qset_msg_count(qs), N);
    ck_assert_uint_le((pq_mem_used() - before) / N, 48);
    /* cancel 7 of every 8 from the middle: the level is squeezed whenever
     * tombstones pass 3/4, so it holds at most 4 slots a live message */
    qset_set_listener(qs, NULL, NULL);
    for (i = 1; i <= N; i++) {
        if (i % 8 != 0) {
            ck_assert_pq_ok(qset_cancel(qs, i, NULL));
        }
    }
    ck_assert_uint_le(pq_mem_used() - before,
                      (size_t)N / 8 * 4 * 40 + 3 * 41000);
    ck_assert_pq(qset_cancel(qs, 1, NULL), PQ_ENOTFOUND);
    queue_consumer_init(&c, 1, NULL, UINT32_MAX);
    ck_assert_pq_ok(queue_subscribe(q, &c));
    for (i = 8; i <= N; i += 8) {
        m = queue_next_delivery(q, now, &to);
        ck_assert_ptr_nonnull(m);
        ck_assert_uint_eq(m->id, i);
        ck_assert_pq_ok(qset_ack(qs, m->id, m->attempt, NULL));
    }
    ck_assert_ptr_null(queue_next_delivery(q, now, &to));
    ck_assert_uint_eq(qset_msg_count(qs), 0);
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
    ck_assert(qset_msg_peek(qs, 11, &v));
    ck_assert_uint_eq(v.state, MSG_READY);
    ck_assert_uint_eq(v.priority, 2);
    queue_foreach_msg(q, move_cb, NULL);
    ck_assert(qset_msg_peek(qs, 12, &v));
    ck_assert_uint_eq(v.pub_seg, 77);
    ck_assert_uint_eq(v.state_seg, 77);
    ck_assert_uint_eq(v.pub_off, 12);
    ck_assert_ptr_null(v.body);
    ck_assert_pq_ok(qset_sort_ready(qs));
    ck_assert_uint_eq(qset_msg_count(qs), 7);
    queue_consumer_init(&c, 1, NULL, 100);
    ck_assert_pq_ok(queue_subscribe(q, &c));
    for (i = 0; i < sizeof(want) / sizeof(want[0]); i++) {
        struct msg *m = queue_next_delivery(q, now, &to);

        ck_assert_ptr_nonnull(m);
        ck_assert_uint_eq(m->id, want[i]);
        ck_assert_uint_eq(m->pub_seg, 77);
        ck_assert_uint_eq(m->pub_off, (uint32_t)m->id);
    }
    queue_unsubscribe(&c, now);
    queue_consumer_fini(&c);
}
END_TEST

/* ======================================================== suite */

static void
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

#define ADD(s, name, timeout, ...)                                             \
    do {                                                                       \
        const TTest *t_[] = {__VA_ARGS__};                                     \
        add_case(s, name, t_, sizeof(t_) / sizeof(t_[0]), timeout);            \
    } while (0)
/* ADD2: the case as is, and again as "compact:name" with compact pushes. */
#define ADD2(s, name, timeout, ...)                                            \
    do {                                                                       \
        ADD(s, name, timeout, __VA_ARGS__);                                    \
        ADD(s, "compact:" name, timeout, __VA_ARGS__);                         \
    } while (0)

static Suite *
queue_suite(void)
{
    Suite *s = suite_create("queue");

    ADD(s, "heap", 20, test_heap_random_ops_match_sorted_reference,
        test_heap_push_fails_cleanly_on_enomem);
    ADD(s, "hmap", 20, test_hmap_u64_matches_reference_through_grow_and_shrink,
        test_hmap_str_matches_reference,
        test_hmap_ptr_matches_reference_through_grow_and_shrink);
    ADD(s, "body", 5, test_body_refcount_and_unref_nulls_pointer,
        test_body_with_headers_decodes_with_old_and_new_headers);
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
    ADD(s, "scale", 120, test_million_delayed_messages_stay_logarithmic);
    ADD(s, "compact_form", 60, test_compact_form_changes_no_order_or_event,
        test_compact_backlog_costs_under_64_bytes_a_message,
        test_compact_foreach_keeps_changes_and_sort_merges_back_pushes);
    return s;
}

int
main(void)
{
    SRunner *sr = srunner_create(queue_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
