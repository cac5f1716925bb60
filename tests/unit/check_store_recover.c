/*
 * check_store_recover.c: what store_open and store_check make of a log
 * that was torn, damaged, emptied or left with leftovers: torn tails are
 * truncated, everything else is refused as damage naming the file (the
 * recorded start and end, segment links, live messages without their
 * publish). Fixture: tests/unit/store_fixture.h.
 */
#include <check.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "clock.h"
#include "crc32c.h"
#include "pqerr.h"
#include "record.h"
#include "store.h"
#include "store_fixture.h"

/* ==== torn tail ==== */

static void
torn_tail_case(bool zero_fill)
{
    struct rlog want = {0};
    struct store *st = must_open(cfg(FSYNC_ALWAYS, 1 << 16), NULL);
    char path[PATH_MAX + 32];
    uint8_t *pristine;
    size_t plen, from, to;
    int cases = 0;

    append_n(st, &want, 12, 9, 40);
    ck_assert_pq_ok(store_close(st));
    seg_file(path, sizeof(path), want.v[0].loc.seg);
    pristine = slurp(path, &plen);
    from = want.v[want.n - 3].loc.off;
    to = want.v[want.n - 1].loc.off + want.v[want.n - 1].loc.len;
    for (size_t cut = from; cut < to; cut++) {
        struct rlog got = {0};
        size_t keep = 0, good_end = STORE_SEG_HDR_LEN, len2, nonzero;
        uint8_t *after;
        if (zero_fill) {
            uint8_t *copy = malloc(plen);
            memcpy(copy, pristine, plen);
            memset(copy + cut, 0, to - cut);
            /* a torn write: some garbage in the lost part */
            if (to - cut > 4) {
                copy[cut + (to - cut) / 2] = 0xA5;
            }
            spit(path, copy, plen);
            free(copy);
        } else {
            spit(path, pristine, cut);
        }
        for (size_t i = 0; i < want.n; i++) {
            if (want.v[i].loc.off + want.v[i].loc.len <= cut) {
                keep = i + 1;
                good_end = want.v[i].loc.off + want.v[i].loc.len;
            }
        }
        st = must_open(cfg(FSYNC_ALWAYS, 1 << 16), &got);
        ck_assert_msg(got.n == keep, "cut %zu: replayed %zu, want %zu", cut,
                      got.n, keep);
        assert_same(&got, &want, keep);
        ck_assert_pq_ok(store_close(st));
        /* truncated: nothing but zeros after the last good record */
        after = slurp(path, &len2);
        ck_assert_uint_ge(len2, good_end);
        /* one assertion, not one a byte: each Check assertion writes to
         * Check's pipe, and 150 cuts x 64 KiB of them took minutes */
        nonzero = len2;
        for (size_t i = good_end; i < len2 && nonzero == len2; i++) {
            if (after[i] != 0) {
                nonzero = i;
            }
        }
        ck_assert_msg(nonzero == len2, "cut %zu: byte %zu not cut", cut,
                      nonzero);
        free(after);
        rlog_free(&got);
        cases++;
    }
    ck_assert_int_eq(cases, (int)(to - from));
    free(pristine);
    rlog_free(&want);
}

START_TEST(test_torn_tail_truncated_at_every_offset)
{
    torn_tail_case(false);
}
END_TEST

START_TEST(test_torn_tail_in_preallocated_zeros_at_every_offset)
{
    torn_tail_case(true);
}
END_TEST

/* ==== damage that is not a torn tail ==== */

/* build: segments 1 .. n-1 full of records, segment n current with
 * records, closed */
static void
n_segments(struct rlog *want, uint32_t n, int tail)
{
    struct store *st = must_open(cfg(FSYNC_ALWAYS, 4096), NULL);

    while (store_current_seg(st) < n) {
        append_n(st, want, 1, (uint32_t)want->n + 11, 150);
    }
    append_n(st, want, tail, 77, 60);
    ck_assert_pq_ok(store_close(st));
}

static void
two_segments(struct rlog *want)
{
    n_segments(want, 2, 6);
}

static void
flip(const char *path, size_t at, uint8_t mask)
{
    size_t len;
    uint8_t *b = slurp(path, &len);

    ck_assert_uint_lt(at, len);
    b[at] ^= mask;
    spit(path, b, len);
    free(b);
}

static void
expect_corrupt(const char *file_part, uint64_t off)
{
    struct store_config c = cfg(FSYNC_ALWAYS, 4096);
    struct store *st = NULL;
    char offs[64];
    int rc = store_open(&c, NULL, NULL, &st, errbuf, sizeof(errbuf));

    ck_assert_msg(rc == PQ_ECORRUPT, "got %s (%s)", pq_strerror(rc), errbuf);
    ck_assert_ptr_null(st);
    snprintf(offs, sizeof(offs), "offset %llu", (unsigned long long)off);
    ck_assert_msg(strstr(errbuf, file_part) != NULL, "err: %s", errbuf);
    ck_assert_msg(strstr(errbuf, offs) != NULL, "err: %s (want %s)", errbuf,
                  offs);
    ck_assert_msg(strstr(errbuf, "--check-data") != NULL, "err: %s", errbuf);
}

START_TEST(test_bitflip_in_earlier_segment_is_corrupt)
{
    /* which field of record 1 of segment 1 gets a flipped bit */
    static const size_t field_at[] = {0, 1, 5, 8, 12};
    struct rlog want = {0};
    char path[PATH_MAX + 32];
    uint8_t *orig;
    size_t olen;

    two_segments(&want);
    seg_file(path, sizeof(path), 1);
    orig = slurp(path, &olen);
    for (size_t k = 0; k < sizeof(field_at) / sizeof(field_at[0]); k++) {
        uint64_t off = want.v[1].loc.off;
        flip(path, (size_t)off + field_at[k], 0x10);
        expect_corrupt("seg-0000000001.log", off);
        spit(path, orig, olen);
    }
    /* a flipped bit in the segment header (magic) */
    flip(path, 2, 0x01);
    expect_corrupt("seg-0000000001.log", 0);
    spit(path, orig, olen);
    /* even a "torn-looking" tail of a non-last segment is damage */
    {
        uint64_t off = want.v[2].loc.off;
        spit(path, orig, (size_t)off + 5);
        expect_corrupt("seg-0000000001.log", off);
        spit(path, orig, olen);
    }
    free(orig);
    rlog_free(&want);
}
END_TEST

START_TEST(test_bitflip_mid_last_segment_followed_by_valid_is_corrupt)
{
    struct rlog want = {0};
    char path[PATH_MAX + 32];
    size_t i;

    two_segments(&want);
    /* the third-to-last record lives in segment 2, valid ones follow */
    i = want.n - 3;
    ck_assert_uint_eq(want.v[i].loc.seg, 2);
    seg_file(path, sizeof(path), 2);
    flip(path, (size_t)(want.v[i].loc.off + want.v[i].loc.len - 1), 0x80);
    expect_corrupt("seg-0000000002.log", want.v[i].loc.off);
    ck_assert(strstr(errbuf, "checksum mismatch") != NULL);
    rlog_free(&want);
}
END_TEST

START_TEST(test_unknown_version_refused)
{
    struct rlog want = {0};
    struct store_config c = cfg(FSYNC_ALWAYS, 4096);
    struct store *st = NULL;
    char path[PATH_MAX + 32];
    int rc;

    two_segments(&want);
    seg_file(path, sizeof(path), 1);
    flip(path, 8, 0x01); /* version 2 -> 3 */
    rc = store_open(&c, NULL, NULL, &st, errbuf, sizeof(errbuf));
    ck_assert_msg(rc == PQ_EVERSION, "got %s: %s", pq_strerror(rc), errbuf);
    ck_assert_msg(strstr(errbuf, "format version 3") != NULL, "%s", errbuf);
    rlog_free(&want);
}
END_TEST

static int
refuse_third(void *arg, uint8_t type, const uint8_t *body, size_t len,
             const struct store_loc *loc)
{
    int *calls = arg;

    (void)type;
    (void)body;
    (void)len;
    (void)loc;
    return ++*calls == 3 ? PQ_EINVAL : PQ_OK;
}

START_TEST(test_replay_error_aborts_open)
{
    struct rlog want = {0};
    struct store_config c = cfg(FSYNC_ALWAYS, 4096);
    struct store *st = NULL;
    int calls = 0;

    two_segments(&want);
    ck_assert_pq(
        store_open(&c, refuse_third, &calls, &st, errbuf, sizeof(errbuf)),
        PQ_EINVAL);
    ck_assert_ptr_null(st);
    ck_assert_int_eq(calls, 3);
    ck_assert_msg(strstr(errbuf, "replay of a") != NULL, "%s", errbuf);
    /* the lock was released: a normal open works */
    st = must_open(c, NULL);
    ck_assert_pq_ok(store_close(st));
    rlog_free(&want);
}
END_TEST

/* ==== the log's recorded start and end, and its links ==== */

/* meta_put: write DIR/META by hand (store.h): slot gen % 2. */
static void
meta_put(uint64_t gen, uint32_t first, uint32_t last, uint32_t floor)
{
    char path[PATH_MAX + 32];
    uint8_t slot[32] = {'P', 'Q', 'M', 'E', 'T', 'A', '0', '1'};
    int fd;

    for (int i = 0; i < 8; i++) {
        slot[8 + i] = (uint8_t)(gen >> (8 * i));
    }
    for (int i = 0; i < 4; i++) {
        slot[16 + i] = (uint8_t)(first >> (8 * i));
        slot[20 + i] = (uint8_t)(last >> (8 * i));
        slot[24 + i] = (uint8_t)(floor >> (8 * i));
    }
    {
        uint32_t crc = crc32c(0, slot, 28);
        for (int i = 0; i < 4; i++) {
            slot[28 + i] = (uint8_t)(crc >> (8 * i));
        }
    }
    snprintf(path, sizeof(path), "%s/META", tmpdir);
    fd = open(path, O_RDWR | O_CREAT, 0644);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(ftruncate(fd, 64), 0);
    ck_assert_int_eq(pwrite(fd, slot, 32, (off_t)(gen % 2) * 32), 32);
    close(fd);
}

/* three segments of opaque records, closed */
static void
three_segments(struct rlog *want)
{
    n_segments(want, 3, 2);
}

static void
expect_damage(struct store_config c, const char *file_part, const char *why)
{
    struct store *st = NULL;
    int rc = store_open(&c, NULL, NULL, &st, errbuf, sizeof(errbuf));

    ck_assert_msg(rc == PQ_ECORRUPT, "got %s (%s)", pq_strerror(rc), errbuf);
    ck_assert_ptr_null(st);
    ck_assert_msg(strstr(errbuf, file_part) != NULL, "err: %s", errbuf);
    ck_assert_msg(strstr(errbuf, why) != NULL, "err: %s (want %s)", errbuf,
                  why);
}

/* The four ways a log goes short without a flipped byte. */
START_TEST(test_missing_or_emptied_segment_is_damage)
{
    static const char *const what[] = {"missing", "missing", "truncated",
                                       "shorter than a segment header"};
    static const char *const file[] = {"seg-0000000002", "seg-0000000001",
                                       "seg-0000000001", "seg-0000000003"};
    struct rlog want = {0};
    char path[PATH_MAX + 32];

    three_segments(&want);
    switch (_i) {
    case 0:
        seg_file(path, sizeof(path), 2);
        ck_assert_int_eq(unlink(path), 0);
        break;
    case 1:
        seg_file(path, sizeof(path), 1);
        ck_assert_int_eq(unlink(path), 0);
        break;
    case 2:
        seg_file(path, sizeof(path), 1);
        ck_assert_int_eq(truncate(path, STORE_SEG_HDR_LEN), 0);
        break;
    default:
        seg_file(path, sizeof(path), 3);
        ck_assert_int_eq(truncate(path, 0), 0);
        break;
    }
    expect_damage(cfg(FSYNC_ALWAYS, 4096), file[_i], what[_i]);
    rlog_free(&want);
}
END_TEST

/* A crash between recording the new start and unlinking: the older
 * segments are leftovers; they are removed and not replayed. */
START_TEST(test_leftovers_before_the_recorded_start_are_removed)
{
    struct rlog want = {0}, got = {0};
    char path[PATH_MAX + 32];
    struct store *st;
    size_t from = 0;

    three_segments(&want);
    meta_put(100, 2, 3, 0);
    st = must_open(cfg(FSYNC_ALWAYS, 4096), &got);
    ck_assert_pq_ok(store_close(st));
    seg_file(path, sizeof(path), 1);
    ck_assert(!file_exists(path));
    while (want.v[from].loc.seg < 2) {
        from++;
    }
    /* replay starts at segment 2 (plus its roll-time records) */
    ck_assert_uint_ge(got.n, want.n - from);
    ck_assert_uint_eq(got.v[0].loc.seg, 2);
    rlog_free(&want);
    rlog_free(&got);
}
END_TEST

/* META written in slot 0, then a write torn in slot 1: the valid one
 * counts. A META of zeros (created, never written) counts as none. */
START_TEST(test_meta_torn_write_keeps_the_previous_copy)
{
    struct rlog want = {0};
    char path[PATH_MAX + 32];
    struct store *st;
    uint8_t junk[32];
    int fd;

    three_segments(&want);
    meta_put(200, 1, 3, 0);
    snprintf(path, sizeof(path), "%s/META", tmpdir);
    fd = open(path, O_WRONLY);
    memset(junk, 0x5a, sizeof(junk));
    ck_assert_int_eq(pwrite(fd, junk, 20, 32), 20); /* slot 1, torn */
    close(fd);
    st = must_open(cfg(FSYNC_ALWAYS, 4096), NULL);
    ck_assert_pq_ok(store_close(st));

    /* META's last is written unsynced at a roll: after a power loss it
     * may name the segment before. A segment past it whose link chains
     * back is part of the log. */
    meta_put(300, 1, 2, 0);
    meta_put(301, 1, 2, 0);
    {
        struct rlog got = {0};

        st = must_open(cfg(FSYNC_ALWAYS, 4096), &got);
        ck_assert_pq_ok(store_close(st));
        ck_assert_uint_eq(got.v[got.n - 1].loc.seg, 3);
        rlog_free(&got);
    }
    /* ... but one past a spare that holds no record is damage */
    {
        char p3[PATH_MAX + 32], p4[PATH_MAX + 32];

        seg_file(p3, sizeof(p3), 3);
        seg_file(p4, sizeof(p4), 4);
        ck_assert_int_eq(rename(p3, p4), 0);
        {
            size_t l;
            uint8_t *b = slurp(p4, &l);

            b[12] = 4; /* the header names segment 4 */
            spit(p4, b, l);
            free(b);
        }
        spit(p3, (const uint8_t *)"PROTOQLG\2\0\0\0\3\0\0\0\0\0\0\0", 20);
        meta_put(302, 1, 2, 0);
        expect_damage(cfg(FSYNC_ALWAYS, 4096), "seg-0000000004",
                      "holds records, but the log ends at segment 2");
    }
    rlog_free(&want);
}
END_TEST

/* journal-shaped records for the live-message check */
static void
put_rec(struct store *st, const struct record *r)
{
    uint8_t buf[512];
    ssize_t n = record_encode(r, buf, sizeof(buf));

    ck_assert_int_gt(n, 0);
    ck_assert_pq_ok(store_append(st, r->type, buf, (size_t)n, NULL, NULL));
}

static void
roll_to(struct store *st, uint32_t seg)
{
    struct record pad = {.type = REC_DROP};

    pad.u.drop.id = 999999;
    pad.u.drop.reason = (struct rec_str){"x", 1};
    while (store_current_seg(st) < seg) {
        put_rec(st, &pad);
    }
}

/* A REQUEUE shows message 7 live after its PUBLISH; segment 1 (holding
 * the PUBLISH) goes missing while META still says the log starts at 2,
 * as a deletion of a segment with live data would leave it: the open
 * refuses, naming the message. With an ACK after the REQUEUE, the same
 * log is clean (7 is gone, and deleting its segment was right). */
START_TEST(test_live_message_without_its_publish_is_damage)
{
    struct store_config c = cfg(FSYNC_ALWAYS, 4096);
    struct record r = {.type = REC_QUEUE_CREATE};
    struct store *st;
    char path[PATH_MAX + 32];

    c.opaque_records = false;
    st = must_open(c, NULL);
    r.u.queue_create.name = (struct rec_str){"q", 1};
    put_rec(st, &r);
    r = (struct record){.type = REC_PUBLISH};
    r.u.publish.id = 7;
    r.u.publish.queue = (struct rec_str){"q", 1};
    put_rec(st, &r);
    roll_to(st, 2);
    r = (struct record){.type = REC_REQUEUE};
    r.u.requeue.id = 7;
    r.u.requeue.attempt = 1;
    put_rec(st, &r);
    if (_i == 1) {
        r = (struct record){.type = REC_ACK};
        r.u.ack.id = 7;
        put_rec(st, &r);
    }
    roll_to(st, 3);
    ck_assert_pq_ok(store_close(st));
    seg_file(path, sizeof(path), 1);
    ck_assert_int_eq(unlink(path), 0);
    meta_put(500, 2, 3, 0);
    if (_i == 0) {
        expect_damage(c, "seg-0000000002", "message 7 is live here");
    } else {
        st = must_open(c, NULL);
        ck_assert_pq_ok(store_close(st));
    }
}
END_TEST

/* Garbage after the last record (not zeros) is still a torn tail, and
 * deciding so is linear: 8 MiB of random bytes took minutes when every
 * offset's CRC was computed over the length it claimed. */
START_TEST(test_random_garbage_tail_is_torn_and_linear)
{
    struct store_config c = cfg(FSYNC_ALWAYS, 16 << 20);
    struct record r = {.type = REC_QUEUE_CREATE};
    char path[PATH_MAX + 32];
    struct store *st;
    uint64_t t0;
    uint8_t *junk;
    size_t n = 8 << 20, len;
    uint8_t *all;
    int fd;

    c.opaque_records = false;
    st = must_open(c, NULL);
    r.u.queue_create.name = (struct rec_str){"q", 1};
    put_rec(st, &r);
    ck_assert_pq_ok(store_close(st));
    seg_file(path, sizeof(path), 1);
    all = slurp(path, &len);
    while (len > 0 && all[len - 1] == 0) {
        len--;
    }
    free(all);
    junk = malloc(n);
    ck_assert_ptr_nonnull(junk);
    fill_body(junk, n, 4242);
    fd = open(path, O_WRONLY);
    ck_assert_int_eq(pwrite(fd, junk, n, (off_t)len), (ssize_t)n);
    close(fd);
    free(junk);
    t0 = clock_mono_ms();
    st = must_open(c, NULL);
    ck_assert_pq_ok(store_close(st));
    ck_assert_msg(clock_mono_ms() - t0 < 10000, "open took %llu ms",
                  (unsigned long long)(clock_mono_ms() - t0));
    all = slurp(path, &n); /* cut back to the last record */
    {
        size_t i = len;

        while (i < n && all[i] == 0) {
            i++;
        }
        ck_assert_msg(i == n, "byte %zu of the garbage kept", i);
    }
    free(all);
}
END_TEST

/* ==== store_check ==== */

START_TEST(test_check_clean_and_damaged)
{
    struct rlog want = {0};
    char *out = NULL;
    size_t outlen = 0;
    FILE *f;
    char path[PATH_MAX + 32];
    int rc;

    two_segments(&want);
    f = open_memstream(&out, &outlen);
    rc = store_check(tmpdir, f, errbuf, sizeof(errbuf));
    fclose(f);
    ck_assert_msg(rc == PQ_OK, "%s: %s", pq_strerror(rc), errbuf);
    ck_assert_msg(strstr(out, "result: clean") != NULL, "%s", out);
    ck_assert_msg(strstr(out, "segments: 2") != NULL, "%s", out);
    {
        char recs[64];
        snprintf(recs, sizeof(recs), "records: %zu", want.n);
        ck_assert_msg(strstr(out, recs) != NULL, "%s", out);
    }
    free(out);

    seg_file(path, sizeof(path), 1);
    flip(path, (size_t)want.v[3].loc.off + 6, 0x01);
    {
        size_t l1, l2;
        uint8_t *before = slurp(path, &l1), *after;
        f = open_memstream(&out, &outlen);
        rc = store_check(tmpdir, f, errbuf, sizeof(errbuf));
        fclose(f);
        ck_assert_pq(rc, PQ_ECORRUPT);
        ck_assert_msg(strstr(out, "DAMAGED") != NULL, "%s", out);
        ck_assert_msg(strstr(out, "seg-0000000001.log") != NULL, "%s", out);
        after = slurp(path, &l2); /* nothing modified */
        ck_assert_uint_eq(l1, l2);
        ck_assert_mem_eq(before, after, l1);
        free(before);
        free(after);
        free(out);
    }
    rlog_free(&want);
}
END_TEST

static Suite *
store_recover_suite(void)
{
    Suite *s = suite_create("store_recover");
    TCase *tc;

    tc = tcase_create("recovery");
    tcase_add_checked_fixture(tc, setup_tmpdir, teardown_tmpdir);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_torn_tail_truncated_at_every_offset);
    tcase_add_test(tc, test_torn_tail_in_preallocated_zeros_at_every_offset);
    tcase_add_test(tc, test_bitflip_in_earlier_segment_is_corrupt);
    tcase_add_test(tc,
                   test_bitflip_mid_last_segment_followed_by_valid_is_corrupt);
    tcase_add_test(tc, test_unknown_version_refused);
    tcase_add_test(tc, test_replay_error_aborts_open);
    tcase_add_test(tc, test_check_clean_and_damaged);
    tcase_add_loop_test(tc, test_missing_or_emptied_segment_is_damage, 0, 4);
    tcase_add_test(tc, test_leftovers_before_the_recorded_start_are_removed);
    tcase_add_test(tc, test_meta_torn_write_keeps_the_previous_copy);
    tcase_add_loop_test(tc, test_live_message_without_its_publish_is_damage, 0,
                        2);
    tcase_add_test(tc, test_random_garbage_tail_is_torn_and_linear);
    suite_add_tcase(s, tc);
    return s;
}

int
main(void)
{
    return run_store_suite(store_recover_suite());
}
