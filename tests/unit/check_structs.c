/*
 * check_structs.c: unit tests for the broker's data structures under the
 * queues: heap.c, hmap.c, body.c. Pure; every test frees what it made.
 */
#include <check.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "body.h"
#include "heap.h"
#include "hmap.h"
#include "mem.h"
#include "protoq.pb-c.h"
#include "ckfast.h"
#include "queue_fixture.h"

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

    CKF_CMP(items, !=, NULL);
    CKF_CMP(ref, !=, NULL);
    srand(7);
    heap_init(&h, hitem_less, hitem_setpos);
    for (i = 0; i < N; i++) {
        items[i].key = (uint64_t)rand() % 5000; /* duplicates on purpose */
        CKF_CMP(heap_push(&h, &items[i]), ==, PQ_OK);
        items[i].in = 1;
        CKF_CMP(h.items[items[i].pos], ==, &items[i]);
    }
    /* remove a third from the middle by slot, and re-key some */
    for (i = 0; i < N; i += 3) {
        CKF_CMP(heap_remove(&h, items[i].pos), ==, &items[i]);
        CKF_CMP(items[i].pos, ==, HEAP_NOPOS);
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
    CKF_CMP(heap_len(&h), ==, n_ref);
    for (i = 0; i < n_ref; i++) {
        struct hitem *it = heap_peek(&h);

        CKF_CMP(heap_pop(&h), ==, it);
        CKF_CMP(it->key, ==, ref[i]);
    }
    CKF_CMP(heap_pop(&h), ==, NULL);
    CKF_CMP(heap_peek(&h), ==, NULL);
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
    CKF_CMP(heap_push(&h, &a), ==, PQ_ENOMEM);
    pq_mem_fail_after(-1);
    CKF_CMP(heap_len(&h), ==, 0);
    CKF_CMP(heap_push(&h, &a), ==, PQ_OK);
    CKF_CMP(heap_len(&h), ==, 1);
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

            CKF_CMP(rc, ==, ref[k] ? PQ_EEXIST : PQ_OK);
            if (!ref[k]) {
                ref[k] = 1;
                n_ref++;
            }
        } else {
            void *v = hmap_u64_del(&m, k * 0x100000000ULL);

            CKF_CMP(v, ==, ref[k] ? &vals[k] : NULL);
            if (ref[k]) {
                ref[k] = 0;
                n_ref--;
            }
        }
        CKF_CMP(hmap_u64_len(&m), ==, n_ref);
        if (m.cap > max_cap) {
            max_cap = m.cap;
        }
    }
    for (k = 0; k < KEYS; k++) {
        CKF_CMP(hmap_u64_get(&m, k * 0x100000000ULL), ==,
                ref[k] ? &vals[k] : NULL);
    }
    while (hmap_u64_next(&m, &iter, &k) != NULL) {
        CKF(ref[k / 0x100000000ULL]);
        seen++;
    }
    CKF_CMP(seen, ==, n_ref);
    CKF_CMP(max_cap, >=, 4096); /* it grew */
    CKF_CMP(m.cap, <, max_cap); /* and shrank again */
    CKF_CMP(hmap_u64_len(&m) * 4, <=, m.cap * 3);
    CKF_CMP(hmap_u64_put(&m, 1, NULL), ==, PQ_EINVAL);
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
            CKF_CMP(hmap_ptr_put(&m, &objs[k]), ==, ref[k] ? PQ_EEXIST : PQ_OK);
            if (!ref[k]) {
                ref[k] = 1;
                n_ref++;
            }
        } else {
            CKF_CMP(hmap_ptr_del(&m, objs[k].key), ==,
                    ref[k] ? &objs[k] : NULL);
            if (ref[k]) {
                ref[k] = 0;
                n_ref--;
            }
        }
        CKF_CMP(hmap_ptr_len(&m), ==, n_ref);
        CKF_CMP(hmap_ptr_len(&m) * 20, <=, m.cap * 17); /* load <= 85% */
        if (m.cap > max_cap) {
            max_cap = m.cap;
        }
    }
    for (k = 0; k < KEYS; k++) {
        CKF_CMP(hmap_ptr_get(&m, objs[k].key), ==, ref[k] ? &objs[k] : NULL);
    }
    CKF_CMP(hmap_ptr_get(&m, 7), ==, NULL);
    while ((o = hmap_ptr_next(&m, &iter)) != NULL) {
        CKF(ref[o - objs]);
        seen++;
    }
    CKF_CMP(seen, ==, n_ref);
    CKF_CMP(max_cap, >=, 3000); /* it grew */
    CKF_CMP(m.cap, <, max_cap); /* and shrank again */
    CKF_CMP(hmap_ptr_put(&m, NULL), ==, PQ_EINVAL);
    hmap_ptr_fini(&m);
    pq_mem_fail_after(0);
    CKF_CMP(hmap_ptr_put(&m, &objs[0]), ==,
            PQ_ENOMEM); /* first table: unchanged */
    CKF_CMP(hmap_ptr_len(&m), ==, 0);
    CKF_CMP(hmap_ptr_get(&m, objs[0].key), ==, NULL);
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

            CKF_CMP(rc, ==, ref[k] ? PQ_EEXIST : PQ_OK);
            if (!ref[k]) {
                ref[k] = 1;
                n_ref++;
            }
        } else {
            char probe[16];

            snprintf(probe, sizeof(probe), "key-%zu",
                     k); /* equal, not the same pointer */
            CKF_CMP(hmap_str_del(&m, probe), ==, ref[k] ? keys[k] : NULL);
            if (ref[k]) {
                ref[k] = 0;
                n_ref--;
            }
        }
    }
    CKF_CMP(hmap_str_len(&m), ==, n_ref);
    for (i = 0; i < KEYS; i++) {
        CKF_CMP(hmap_str_get(&m, keys[i]), ==, ref[i] ? keys[i] : NULL);
    }
    CKF_CMP(hmap_str_get(&m, "absent"), ==, NULL);
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

/* ======================================================== suite */

static Suite *
structs_suite(void)
{
    Suite *s = suite_create("structs");

    ADD(s, "heap", 20, test_heap_random_ops_match_sorted_reference,
        test_heap_push_fails_cleanly_on_enomem);
    ADD(s, "hmap", 20, test_hmap_u64_matches_reference_through_grow_and_shrink,
        test_hmap_str_matches_reference,
        test_hmap_ptr_matches_reference_through_grow_and_shrink);
    ADD(s, "body", 5, test_body_refcount_and_unref_nulls_pointer,
        test_body_with_headers_decodes_with_old_and_new_headers);
    return s;
}

int
main(void)
{
    return run_suite(structs_suite());
}
