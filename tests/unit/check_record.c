/*
 * check_record.c: unit tests for crc32c.c (check vector, both code paths)
 * and the record codec of record.c (round trips of every type, truncated,
 * overlong and hostile input).
 */
#include <check.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "crc32c.h"
#include "pqerr.h"
#include "record.h"
#include "store_fixture.h"

/* ==== CRC32C ==== */

START_TEST(test_crc32c_check_vector_both_paths)
{
    const char *v = "123456789";

    ck_assert_uint_eq(crc32c_sw(0, v, 9), 0xE3069283u);
    ck_assert_uint_eq(crc32c(0, v, 9), 0xE3069283u);
    if (crc32c_hw_available()) {
        ck_assert_uint_eq(crc32c_hw(0, v, 9), 0xE3069283u);
    }
    ck_assert_uint_eq(crc32c_sw(0, "", 0), 0);
    /* 32 zero bytes: the iSCSI (RFC 3720) vector */
    {
        uint8_t z[32] = {0};
        ck_assert_uint_eq(crc32c_sw(0, z, 32), 0x8A9136AAu);
        ck_assert_uint_eq(crc32c(0, z, 32), 0x8A9136AAu);
    }
}
END_TEST

START_TEST(test_crc32c_paths_agree_on_random_buffers)
{
    uint8_t buf[4096 + 16];

    fill_body(buf, sizeof(buf), 7);
    for (int i = 0; i < 500; i++) {
        size_t off = (size_t)(rand() % 16), len = (size_t)(rand() % 4096);
        uint32_t a = crc32c_sw(0, buf + off, len);
        ck_assert_uint_eq(crc32c(0, buf + off, len), a);
        if (crc32c_hw_available()) {
            ck_assert_uint_eq(crc32c_hw(0, buf + off, len), a);
        }
        /* chaining */
        size_t cut = len ? (size_t)rand() % len : 0;
        ck_assert_uint_eq(
            crc32c(crc32c(0, buf + off, cut), buf + off + cut, len - cut), a);
    }
}
END_TEST

/* ==== record codec ==== */

static const struct rec_kv kvs[] = {
    {{"gpu", 3}, {"a100", 4}},
    {{"zone", 4}, {"", 0}},
};
static const uint64_t keep_ids[] = {5, 1ull << 40, 77};
static const struct rec_deliver_item delivered[] = {{42, 1},
                                                    {1ull << 50, UINT32_MAX}};

enum { N_SAMPLES = 10 }; /* one record of each body type */

static void
sample_records(struct record *r /* [N_SAMPLES] */)
{
    memset(r, 0, N_SAMPLES * sizeof(*r));
    r[0].type = REC_QUEUE_CREATE;
    r[0].u.queue_create.name = (struct rec_str){"jobs", 4};
    r[0].u.queue_create.attrs =
        (struct queue_attrs){.transient = true,
                             .max_length = 1,
                             .max_bytes = 2,
                             .ack_timeout_ms = 3,
                             .max_attempts = 4,
                             .dead_letter = "dlq",
                             .backoff_base_ms = 5,
                             .backoff_cap_ms = 6,
                             .ttl_ms = 7,
                             .dedup_window_ms = 8,
                             .max_lease_ms = UINT64_MAX,
                             .dead_letter_expired = true};
    r[1].type = REC_QUEUE_DELETE;
    r[1].u.queue_delete.name = (struct rec_str){"jobs", 4};
    r[2].type = REC_QUEUE_PURGE;
    r[2].u.queue_purge = (struct rec_queue_purge){
        .name = {"jobs", 4}, .n_keep = 3, .keep_ids = keep_ids};
    r[3].type = REC_PUBLISH;
    r[3].u.publish =
        (struct rec_publish){.id = 0x0102030405060708ull,
                             .queue = {"jobs", 4},
                             .priority = 9,
                             .attempt = 2,
                             .failures = 1,
                             .published_wall_ms = 1000,
                             .deliver_at_wall_ms = 2000,
                             .expire_wall_ms = 3000,
                             .idem_key = {"k1", 2},
                             .n_requires = 2,
                             .requires = kvs,
                             .progress = {(const uint8_t *)"50%", 3},
                             .body = {(const uint8_t *)"\0\1\2payload", 10}};
    r[4].type = REC_ACK;
    r[4].u.ack.id = 42;
    r[5].type = REC_REQUEUE;
    r[5].u.requeue = (struct rec_requeue){42, 3, 2, 99};
    r[6].type = REC_DEAD_LETTER;
    r[6].u.dead_letter = (struct rec_dead_letter){
        42, {"dlq", 3}, {"max_attempts", 12}, {(const uint8_t *)"b", 1}};
    r[7].type = REC_DROP;
    r[7].u.drop = (struct rec_drop){42, {"expired", 7}};
    r[8].type = REC_PROGRESS;
    r[8].u.progress = (struct rec_progress){42, {(const uint8_t *)"", 0}};
    r[9].type = REC_DELIVER;
    r[9].u.deliver = (struct rec_deliver){.n = 2, .items = delivered};
}

START_TEST(test_record_roundtrip_every_type)
{
    struct record r[N_SAMPLES], d, d2;
    uint8_t buf[1024], buf2[1024];

    sample_records(r);
    for (int i = 0; i < N_SAMPLES; i++) {
        ssize_t n = record_encode(&r[i], buf, sizeof(buf));
        ck_assert_int_gt(n, 0);
        ck_assert_int_eq(n, record_encoded_size(&r[i]));
        ck_assert_pq_ok(record_decode(r[i].type, buf, (size_t)n, &d));
        ck_assert_uint_eq(d.type, r[i].type);
        /* Re-encoding the decoded form gives the same bytes. */
        ck_assert_int_eq(record_encode(&d, buf2, sizeof(buf2)), n);
        ck_assert_mem_eq(buf, buf2, (size_t)n);
        ck_assert_pq_ok(record_decode(r[i].type, buf2, (size_t)n, &d2));
        ck_assert_str_ne(record_type_name(r[i].type), "unknown");
    }
    /* field checks on a few */
    {
        ssize_t n = record_encode(&r[3], buf, sizeof(buf));
        size_t cur = 0;
        struct rec_kv kv;
        int k = 0;
        ck_assert_pq_ok(record_decode(REC_PUBLISH, buf, (size_t)n, &d));
        ck_assert_uint_eq(d.u.publish.id, 0x0102030405060708ull);
        ck_assert_uint_eq(d.u.publish.priority, 9);
        ck_assert_uint_eq(d.u.publish.expire_wall_ms, 3000);
        ck_assert_mem_eq(d.u.publish.body.ptr, "\0\1\2payload", 10);
        ck_assert(d.u.publish.body.ptr > buf); /* points into buf */
        while (record_publish_next_require(&d.u.publish, &cur, &kv)) {
            ck_assert_uint_eq(kv.key.len, kvs[k].key.len);
            ck_assert_mem_eq(kv.key.ptr, kvs[k].key.ptr, kv.key.len);
            ck_assert_mem_eq(kv.value.ptr, kvs[k].value.ptr, kv.value.len);
            k++;
        }
        ck_assert_int_eq(k, 2);
    }
    {
        ssize_t n = record_encode(&r[2], buf, sizeof(buf));
        ck_assert_pq_ok(record_decode(REC_QUEUE_PURGE, buf, (size_t)n, &d));
        ck_assert_uint_eq(d.u.queue_purge.n_keep, 3);
        for (uint32_t i = 0; i < 3; i++) {
            ck_assert_uint_eq(record_purge_keep_id(&d.u.queue_purge, i),
                              keep_ids[i]);
        }
    }
    {
        ssize_t n = record_encode(&r[9], buf, sizeof(buf));
        ck_assert_int_eq(n, 4 + 2 * 12); /* small: 12 bytes a delivery */
        ck_assert_pq_ok(record_decode(REC_DELIVER, buf, (size_t)n, &d));
        ck_assert_uint_eq(d.u.deliver.n, 2);
        for (uint32_t i = 0; i < 2; i++) {
            struct rec_deliver_item it = record_deliver_item(&d.u.deliver, i);

            ck_assert_uint_eq(it.id, delivered[i].id);
            ck_assert_uint_eq(it.attempt, delivered[i].attempt);
        }
        ck_assert_str_eq(record_type_name(REC_DELIVER), "deliver");
    }
    {
        ssize_t n = record_encode(&r[0], buf, sizeof(buf));
        ck_assert_pq_ok(record_decode(REC_QUEUE_CREATE, buf, (size_t)n, &d));
        ck_assert(d.u.queue_create.attrs.transient);
        ck_assert_uint_eq(d.u.queue_create.attrs.max_lease_ms, UINT64_MAX);
        ck_assert_uint_eq(d.u.queue_create.attrs.max_attempts, 4);
        ck_assert(d.u.queue_create.attrs.dead_letter_expired);
        ck_assert_str_eq(d.u.queue_create.attrs.dead_letter, "dlq");
        ck_assert(!d.u.queue_create.attrs.no_backoff);
    }
}
END_TEST

START_TEST(test_record_decode_truncated_or_overlong_is_corrupt)
{
    struct record r[N_SAMPLES], d;
    uint8_t buf[1024];

    sample_records(r);
    for (int i = 0; i < N_SAMPLES; i++) {
        ssize_t n = record_encode(&r[i], buf, sizeof(buf) - 1);
        ck_assert_int_gt(n, 0);
        for (ssize_t cut = 0; cut < n; cut++) {
            ck_assert_pq(record_decode(r[i].type, buf, (size_t)cut, &d),
                         PQ_ECORRUPT);
        }
        buf[n] = 0;
        ck_assert_pq(record_decode(r[i].type, buf, (size_t)n + 1, &d),
                     PQ_ECORRUPT);
        /* too small a buffer to encode into */
        ck_assert_pq(record_encode(&r[i], buf, (size_t)n - 1), PQ_ETOOBIG);
    }
    ck_assert_pq(record_decode(0, buf, 8, &d), PQ_EVERSION);
    ck_assert_pq(record_decode(200, buf, 8, &d), PQ_EVERSION);
    ck_assert_str_eq(record_type_name(200), "unknown");
}
END_TEST

START_TEST(test_record_decode_hostile_lengths_and_flags)
{
    struct record r[N_SAMPLES], d;
    uint8_t buf[1024];
    ssize_t n;

    sample_records(r);
    /* transient flag = 2 */
    n = record_encode(&r[0], buf, sizeof(buf));
    buf[4 + 4] = 2;
    ck_assert_pq(record_decode(REC_QUEUE_CREATE, buf, (size_t)n, &d),
                 PQ_ECORRUPT);
    /* string length 0xffffffff */
    n = record_encode(&r[1], buf, sizeof(buf));
    memset(buf, 0xff, 4);
    ck_assert_pq(record_decode(REC_QUEUE_DELETE, buf, (size_t)n, &d),
                 PQ_ECORRUPT);
    /* purge count far beyond the body */
    n = record_encode(&r[2], buf, sizeof(buf));
    memset(buf + 8, 0xff, 4);
    ck_assert_pq(record_decode(REC_QUEUE_PURGE, buf, (size_t)n, &d),
                 PQ_ECORRUPT);
    /* n_requires huge */
    n = record_encode(&r[3], buf, sizeof(buf));
    {
        size_t at = 8 + 4 + 4 + 1 + 4 + 4 + 8 + 8 + 8 + 4 + 2;
        memset(buf + at, 0xff, 4);
        ck_assert_pq(record_decode(REC_PUBLISH, buf, (size_t)n, &d),
                     PQ_ECORRUPT);
    }
    /* deliveries: a count far beyond the body, and none at all */
    n = record_encode(&r[9], buf, sizeof(buf));
    memset(buf, 0xff, 4);
    ck_assert_pq(record_decode(REC_DELIVER, buf, (size_t)n, &d), PQ_ECORRUPT);
    memset(buf, 0, 4);
    ck_assert_pq(record_decode(REC_DELIVER, buf, 4, &d), PQ_ECORRUPT);
    /* inconsistent encode input */
    r[3].u.publish.requires = NULL; /* a count without pairs */
    ck_assert_pq(record_encoded_size(&r[3]), PQ_EINVAL);
    r[9].u.deliver.n = 0;
    ck_assert_pq(record_encoded_size(&r[9]), PQ_EINVAL);
}
END_TEST

static Suite *
record_suite(void)
{
    Suite *s = suite_create("record");
    TCase *tc;

    tc = tcase_create("crc32c");
    tcase_add_test(tc, test_crc32c_check_vector_both_paths);
    tcase_add_test(tc, test_crc32c_paths_agree_on_random_buffers);
    suite_add_tcase(s, tc);

    tc = tcase_create("record");
    tcase_add_test(tc, test_record_roundtrip_every_type);
    tcase_add_test(tc, test_record_decode_truncated_or_overlong_is_corrupt);
    tcase_add_test(tc, test_record_decode_hostile_lengths_and_flags);
    suite_add_tcase(s, tc);
    return s;
}

int
main(void)
{
    return run_store_suite(record_suite());
}
