/*
 * check_record_atomic.c: the REC_ATOMIC record body (record.h): a job's end
 * (ACK, DEAD_LETTER or DROP) with the publishes it causes. Round trip in both
 * forms, and the strict decoder: a wrapped record of another type, no
 * publish, a damaged publish inside, a short or overlong body.
 */
#include <check.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "pqerr.h"
#include "record.h"

#define S(lit) ((struct rec_str){(lit), sizeof(lit) - 1})
#define B(lit) ((struct rec_bytes){(const uint8_t *)(lit), sizeof(lit) - 1})

/* An ACK of 7 with two publishes (ids 8 and 9) into buf; its length. */
static size_t
encode_ack_with_two(uint8_t *buf, size_t cap)
{
    static const struct rec_kv req[1] = {{S("gpu"), S("a100")}};
    struct record inner = {.type = REC_ACK}, r = {.type = REC_ATOMIC};
    struct rec_publish pubs[2];
    ssize_t n;

    inner.u.ack.id = 7;
    memset(pubs, 0, sizeof(pubs));
    pubs[0].id = 8;
    pubs[0].queue = S("replies");
    pubs[0].body = B("\x0a\x02ok");
    pubs[1].id = 9;
    pubs[1].queue = S("next");
    pubs[1].n_requires = 1;
    pubs[1].requires = req;
    pubs[1].body = B("\x0a\x05step2");
    r.u.atomic.inner_type = REC_ACK;
    r.u.atomic.inner = &inner;
    r.u.atomic.n = 2;
    r.u.atomic.pubs = pubs;
    n = record_encode(&r, buf, cap);
    ck_assert_int_gt(n, 0);
    ck_assert_int_eq(n, record_encoded_size(&r));
    return (size_t)n;
}

START_TEST(test_atomic_round_trip)
{
    uint8_t buf[512];
    size_t len = encode_ack_with_two(buf, sizeof(buf)), cur = 0;
    struct record r, inner;
    struct rec_publish p;
    struct rec_bytes raw;
    struct rec_kv kv;
    size_t kc = 0;

    ck_assert_int_eq(record_decode(REC_ATOMIC, buf, len, &r), PQ_OK);
    ck_assert_uint_eq(r.u.atomic.inner_type, REC_ACK);
    ck_assert_uint_eq(r.u.atomic.n, 2);
    ck_assert_int_eq(record_atomic_inner(&r.u.atomic, &inner), PQ_OK);
    ck_assert_uint_eq(inner.type, REC_ACK);
    ck_assert_uint_eq(inner.u.ack.id, 7);
    ck_assert(record_atomic_next_publish(&r.u.atomic, &cur, &raw, &p));
    ck_assert_uint_eq(p.id, 8);
    ck_assert_int_eq(memcmp(p.queue.ptr, "replies", 7), 0);
    ck_assert_uint_eq(p.body.len, 4);
    ck_assert(record_atomic_next_publish(&r.u.atomic, &cur, &raw, &p));
    ck_assert_uint_eq(p.id, 9);
    ck_assert(record_publish_next_require(&p, &kc, &kv));
    ck_assert_int_eq(memcmp(kv.value.ptr, "a100", 4), 0);
    ck_assert(!record_atomic_next_publish(&r.u.atomic, &cur, &raw, &p));
    ck_assert_str_eq(record_type_name(REC_ATOMIC), "atomic");
}
END_TEST

/* What record_decode gives encodes back to the same bytes (the format has
 * one encoding per record; fuzz_record checks it for every type, and
 * failed on this one while the encoder took only the encode form). */
START_TEST(test_atomic_decode_form_encodes_back)
{
    uint8_t buf[512], again[512];
    size_t len = encode_ack_with_two(buf, sizeof(buf));
    struct record r;

    ck_assert_int_eq(record_decode(REC_ATOMIC, buf, len, &r), PQ_OK);
    ck_assert_int_eq(record_encoded_size(&r), (ssize_t)len);
    ck_assert_int_eq(record_encode(&r, again, sizeof(again)), (ssize_t)len);
    ck_assert_int_eq(memcmp(buf, again, len), 0);
    ck_assert_int_eq(record_encode(&r, again, len - 1), PQ_ETOOBIG);
}
END_TEST

START_TEST(test_atomic_encoder_refuses_bad_input)
{
    struct record inner = {.type = REC_PUBLISH}, r = {.type = REC_ATOMIC};
    struct rec_publish pub;
    uint8_t buf[256];

    memset(&pub, 0, sizeof(pub));
    pub.queue = S("q");
    r.u.atomic.inner_type = REC_PUBLISH; /* only ACK, DEAD_LETTER, DROP */
    r.u.atomic.inner = &inner;
    r.u.atomic.n = 1;
    r.u.atomic.pubs = &pub;
    ck_assert_int_eq(record_encode(&r, buf, sizeof(buf)), PQ_EINVAL);
    inner.type = REC_DROP;
    r.u.atomic.inner_type = REC_ACK; /* does not match the inner record */
    ck_assert_int_eq(record_encode(&r, buf, sizeof(buf)), PQ_EINVAL);
    r.u.atomic.inner_type = REC_DROP;
    r.u.atomic.n = 0; /* nothing to wrap: write the DROP alone */
    ck_assert_int_eq(record_encode(&r, buf, sizeof(buf)), PQ_EINVAL);
    r.u.atomic.n = 1;
    ck_assert_int_gt(record_encode(&r, buf, sizeof(buf)), 0);
}
END_TEST

START_TEST(test_atomic_decoder_is_strict)
{
    uint8_t buf[512], bad[513];
    size_t len = encode_ack_with_two(buf, sizeof(buf));
    struct record r;

    /* every cut short, and one byte too many */
    for (size_t cut = 0; cut < len; cut++) {
        ck_assert_int_eq(record_decode(REC_ATOMIC, buf, cut, &r), PQ_ECORRUPT);
    }
    memcpy(bad, buf, len);
    bad[len] = 0;
    ck_assert_int_eq(record_decode(REC_ATOMIC, bad, len + 1, &r), PQ_ECORRUPT);
    /* a wrapped record of another type (an atomic inside an atomic) */
    memcpy(bad, buf, len);
    bad[0] = REC_ATOMIC;
    ck_assert_int_eq(record_decode(REC_ATOMIC, bad, len, &r), PQ_ECORRUPT);
    bad[0] = REC_PUBLISH;
    ck_assert_int_eq(record_decode(REC_ATOMIC, bad, len, &r), PQ_ECORRUPT);
    /* n = 0: inner_type u8, inner bytes (4 + 8), then n */
    memcpy(bad, buf, len);
    memset(bad + 13, 0, 4);
    ck_assert_int_eq(record_decode(REC_ATOMIC, bad, len, &r), PQ_ECORRUPT);
    /* a damaged publish inside: its queue name length runs past its body */
    memcpy(bad, buf, len);
    bad[17 + 4 + 8] = 0xff;
    ck_assert_int_eq(record_decode(REC_ATOMIC, bad, len, &r), PQ_ECORRUPT);
}
END_TEST

static Suite *
record_suite(void)
{
    Suite *s = suite_create("record");
    TCase *tc = tcase_create("atomic");

    tcase_add_test(tc, test_atomic_round_trip);
    tcase_add_test(tc, test_atomic_decode_form_encodes_back);
    tcase_add_test(tc, test_atomic_encoder_refuses_bad_input);
    tcase_add_test(tc, test_atomic_decoder_is_strict);
    suite_add_tcase(s, tc);
    return s;
}

int
main(void)
{
    SRunner *sr = srunner_create(record_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
