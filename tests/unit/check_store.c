/*
 * check_store.c: unit tests for store.c's log: append, replay, group
 * commit, fsync policies, rotation and segment deletion, disk full, I/O
 * errors and power loss. Each test runs in its own forked process with a
 * fresh mkdtemp data dir (tests/unit/store_fixture.h). Fault injection goes
 * through store_set_io: a seam that fails pwrite/fallocate with ENOSPC,
 * fdatasync with EIO, slows fdatasync down, or models a power loss (what
 * was not synced is dropped or torn; files whose directory entry was not
 * synced vanish). Waiting for the storage thread is poll() on its eventfd
 * with a deadline; no test sleeps for its result. Damage and recovery:
 * check_store_recover.c; the CRC and record codec: check_record.c.
 */
#include <check.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "clock.h"
#include "mem.h"
#include "pqerr.h"
#include "record.h"
#include "store.h"
#include "store_fixture.h"

START_TEST(test_append_close_reopen_replays_in_order)
{
    struct rlog want = {0}, got = {0};
    struct dones d = {0};
    struct store *st = must_open(cfg(FSYNC_ALWAYS, 1 << 20), NULL);

    append_n(st, &want, 300, 1, 200);
    ck_assert(reap_until(st, &d, 300, 5000));
    ck_assert_uint_eq(d.ok_upto, 300);
    ck_assert_uint_eq(store_durable_lsn(st), 300);
    append_n(st, &want, 20, 2, 50); /* pending at close: flushed */
    ck_assert_pq_ok(store_close(st));

    st = must_open(cfg(FSYNC_ALWAYS, 1 << 20), &got);
    ck_assert_uint_eq(got.n, 320);
    assert_same(&got, &want, 320);
    for (size_t i = 0; i < 320; i++) {
        ck_assert_uint_eq(got.v[i].loc.seg, want.v[i].loc.seg);
        ck_assert_uint_eq(got.v[i].loc.off, want.v[i].loc.off);
        ck_assert_uint_eq(got.v[i].loc.len, want.v[i].loc.len);
    }
    ck_assert_uint_eq(store_last_lsn(st), 0); /* LSNs are per process */
    ck_assert_pq_ok(store_close(st));
    rlog_free(&want);
    rlog_free(&got);
}
END_TEST

START_TEST(test_store_read_back_and_pending)
{
    struct rlog want = {0};
    struct dones d = {0};
    struct store *st = must_open(cfg(FSYNC_ALWAYS, 1 << 20), NULL);
    uint8_t type, *body;
    size_t len;
    char path[PATH_MAX + 32];

    append_n(st, &want, 10, 3, 100);
    /* not written yet */
    ck_assert_pq(store_read(st, &want.v[9].loc, &type, &body, &len), PQ_EAGAIN);
    ck_assert(reap_until(st, &d, 10, 5000));
    for (size_t i = 0; i < 10; i++) {
        ck_assert_pq_ok(store_read(st, &want.v[i].loc, &type, &body, &len));
        ck_assert_uint_eq(type, want.v[i].type);
        ck_assert_uint_eq(len, want.v[i].len);
        ck_assert(len == 0 || memcmp(body, want.v[i].body, len) == 0);
        pq_free(body);
    }
    /* flip a payload byte on disk: PQ_ECORRUPT */
    seg_file(path, sizeof(path), want.v[5].loc.seg);
    {
        int fd = open(path, O_RDWR);
        uint8_t c;
        off_t at = (off_t)(want.v[5].loc.off + want.v[5].loc.len - 1);
        ck_assert_int_ge(fd, 0);
        ck_assert_int_eq(pread(fd, &c, 1, at), 1);
        c ^= 0x40;
        ck_assert_int_eq(pwrite(fd, &c, 1, at), 1);
        close(fd);
    }
    ck_assert_pq(store_read(st, &want.v[5].loc, &type, &body, &len),
                 PQ_ECORRUPT);
    ck_assert_pq_ok(store_close(st));
    rlog_free(&want);
}
END_TEST

/* Results of reads done by the reader thread. */
struct reads {
    size_t n;
    uint64_t tag[64];
    int rc[64];
    uint8_t type[64];
    uint8_t *body[64];
    size_t len[64];
};

static void
on_read(void *arg, uint64_t tag, const struct store_loc *loc, int rc,
        uint8_t type, uint8_t *body, size_t len)
{
    struct reads *r = arg;

    (void)loc;
    ck_assert_uint_lt(r->n, 64);
    r->tag[r->n] = tag;
    r->rc[r->n] = rc;
    r->type[r->n] = type;
    r->body[r->n] = body;
    r->len[r->n] = len;
    r->n++;
}

/*
 * Reads off the loop thread give what store_read gives, in submission
 * order, through the store's eventfd: each record, a damaged one as
 * PQ_ECORRUPT. Reads still queued or not reaped at close are freed (ASan).
 */
START_TEST(test_reader_thread_reads_in_order_and_close_frees_the_rest)
{
    struct rlog want = {0};
    struct dones d = {0};
    struct reads r = {0};
    struct store *st = must_open(cfg(FSYNC_ALWAYS, 1 << 20), NULL);
    struct pollfd pfd;
    struct store_loc bad;
    int64_t end;

    append_n(st, &want, 20, 7, 300);
    ck_assert(reap_until(st, &d, 20, 5000));
    for (size_t i = 0; i < 20; i++) {
        ck_assert_pq_ok(store_read_submit(st, 100 + i, &want.v[i].loc));
    }
    bad = want.v[3].loc;
    bad.len += 1; /* the length on disk says otherwise */
    ck_assert_pq_ok(store_read_submit(st, 999, &bad));
    pfd.fd = store_event_fd(st);
    pfd.events = POLLIN;
    end = (int64_t)clock_mono_ms() + 5000;
    while (r.n < 21 && (int64_t)clock_mono_ms() < end) {
        poll(&pfd, 1, 100);
        store_reap(st, on_done, &d);
        store_read_reap(st, on_read, &r);
    }
    ck_assert_uint_eq(r.n, 21);
    for (size_t i = 0; i < 20; i++) {
        ck_assert_uint_eq(r.tag[i], 100 + i);
        ck_assert_pq_ok(r.rc[i]);
        ck_assert_uint_eq(r.type[i], want.v[i].type);
        ck_assert_uint_eq(r.len[i], want.v[i].len);
        ck_assert(r.len[i] == 0 ||
                  memcmp(r.body[i], want.v[i].body, r.len[i]) == 0);
        pq_free(r.body[i]);
    }
    ck_assert_uint_eq(r.tag[20], 999);
    ck_assert_pq(r.rc[20], PQ_ECORRUPT);
    ck_assert_ptr_null(r.body[20]);
    /* left for close: queued and done, never reaped */
    for (size_t i = 0; i < 20; i++) {
        ck_assert_pq_ok(store_read_submit(st, i, &want.v[i].loc));
    }
    ck_assert_pq_ok(store_close(st));
    rlog_free(&want);
}
END_TEST

START_TEST(test_lock_second_open_is_busy)
{
    struct store_config c = cfg(FSYNC_ALWAYS, 1 << 20);
    struct store *st = must_open(c, NULL), *st2 = NULL;
    char pid[32];

    ck_assert_pq(store_open(&c, NULL, NULL, &st2, errbuf, sizeof(errbuf)),
                 PQ_EBUSY);
    ck_assert_ptr_null(st2);
    snprintf(pid, sizeof(pid), "(pid %ld)", (long)getpid());
    ck_assert_msg(strstr(errbuf, "locked by another protoqd") != NULL &&
                      strstr(errbuf, pid) != NULL,
                  "err: %s", errbuf);
    ck_assert_pq(store_check(tmpdir, stderr, errbuf, sizeof(errbuf)), PQ_EBUSY);
    ck_assert_pq_ok(store_close(st));
    st = must_open(c, NULL); /* released at close */
    ck_assert_pq_ok(store_close(st));
}
END_TEST

/* ==== seam: counters, slow sync, failures ==== */

static struct {
    pthread_mutex_t mu;
    int fdatasyncs;
    int sync_sleep_ms;
    bool pwrite_enospc;
    bool fallocate_enospc;
    bool fdatasync_eio;
} fx = {.mu = PTHREAD_MUTEX_INITIALIZER};

static ssize_t
fx_pwrite(int fd, const void *b, size_t n, off_t off)
{
    bool fail;

    pthread_mutex_lock(&fx.mu);
    fail = fx.pwrite_enospc;
    pthread_mutex_unlock(&fx.mu);
    if (fail) {
        /* a short write, then the error, like a real full disk */
        if (n > 3) {
            ssize_t w = pwrite(fd, b, n / 2, off);
            if (w > 0) {
                return w;
            }
        }
        errno = ENOSPC;
        return -1;
    }
    return pwrite(fd, b, n, off);
}

static int
fx_fdatasync(int fd)
{
    int ms;
    bool eio;

    pthread_mutex_lock(&fx.mu);
    fx.fdatasyncs++;
    ms = fx.sync_sleep_ms;
    eio = fx.fdatasync_eio;
    pthread_mutex_unlock(&fx.mu);
    if (ms > 0) {
        struct timespec ts = {0, (long)ms * 1000000L};
        nanosleep(&ts, NULL);
    }
    if (eio) {
        errno = EIO;
        return -1;
    }
    return fdatasync(fd);
}

static int
fx_fallocate(int fd, off_t off, off_t len)
{
    bool fail;

    pthread_mutex_lock(&fx.mu);
    fail = fx.fallocate_enospc;
    pthread_mutex_unlock(&fx.mu);
    if (fail) {
        return ENOSPC;
    }
    return posix_fallocate(fd, off, len);
}

static struct store_io fx_io;

static void
fx_install(void)
{
    fx_io = *store_io_real();
    fx_io.pwrite = fx_pwrite;
    fx_io.fdatasync = fx_fdatasync;
    fx_io.fallocate = fx_fallocate;
    store_set_io(&fx_io);
}

static int
fx_syncs(void)
{
    int n;

    pthread_mutex_lock(&fx.mu);
    n = fx.fdatasyncs;
    pthread_mutex_unlock(&fx.mu);
    return n;
}

static void
fx_set(bool *flag, bool v)
{
    pthread_mutex_lock(&fx.mu);
    *flag = v;
    pthread_mutex_unlock(&fx.mu);
}

/* wait_spare: the thread makes segment seq ahead of time; wait for it
 * so that a fault switched on next hits the write path, not the spare. */
static void
wait_spare(uint32_t seq)
{
    char p[PATH_MAX + 32];
    uint64_t until = clock_mono_ms() + 5000;

    seg_file(p, sizeof(p), seq);
    while (!file_exists(p) && clock_mono_ms() < until) {
        struct timespec ts = {0, 2 * 1000000L};
        nanosleep(&ts, NULL);
    }
    ck_assert_msg(file_exists(p), "no spare %s", p);
}

/* wait_spare_synced: wait_spare, then until the spare's header sync has
 * been counted (the file exists before seg_create syncs it): the sync
 * count stays put for 50 ms, within 5 s. */
static void
wait_spare_synced(uint32_t seq)
{
    uint64_t until = clock_mono_ms() + 5000, still_since = clock_mono_ms();
    int last;

    wait_spare(seq);
    last = fx_syncs();
    while (clock_mono_ms() < until && clock_mono_ms() - still_since < 50) {
        struct timespec ts = {0, 2 * 1000000L};

        nanosleep(&ts, NULL);
        if (fx_syncs() != last) {
            last = fx_syncs();
            still_since = clock_mono_ms();
        }
    }
}

/*
 * Records nobody waits on are written at once but synced later (with the
 * next urgent batch or within fsync_interval_ms); an urgent batch is
 * synced and reported at once, and its fsync covers the deferred ones.
 */
START_TEST(test_unwaited_records_share_the_next_urgent_fsync)
{
    struct store_config c = cfg(FSYNC_ALWAYS, 1 << 20);
    struct dones d = {0};
    struct store_stats s0, s1;
    struct store *st;

    c.fsync_interval_ms = 400;
    st = must_open(c, NULL);
    append_n(st, NULL, 3, 31, 40);
    ck_assert(
        reap_until(st, &d, 3, 5000)); /* deferred, synced by the interval */
    store_get_stats(st, &s0);
    /* Not urgent: written, not reported within 100 ms, no fsync. */
    append_n(st, NULL, 5, 32, 40);
    ck_assert(!reap_until(st, &d, 8, 100));
    store_get_stats(st, &s1);
    ck_assert_uint_eq(s1.fsyncs, s0.fsyncs);
    /* Urgent: reported at once, the deferred ones with it, one fsync. */
    append_n(st, NULL, 1, 33, 40);
    store_urgent(st);
    ck_assert(reap_until(st, &d, 9, 1000));
    ck_assert_uint_eq(d.ok_upto, 9);
    ck_assert_uint_eq(store_durable_lsn(st), 9);
    store_get_stats(st, &s1);
    ck_assert_uint_eq(s1.fsyncs, s0.fsyncs + 1);
    /* Not urgent again: synced by the interval, within its bound. */
    append_n(st, NULL, 2, 34, 40);
    ck_assert(reap_until(st, &d, 11, 2000));
    ck_assert_uint_eq(d.ok_upto, 11);
    ck_assert_pq_ok(store_close(st));
}
END_TEST

START_TEST(test_group_commit_during_slow_fsync)
{
    struct dones d = {0};
    struct store *st;
    struct store_stats ss;
    uint64_t prev = 0;
    uint8_t body[64];

    fx_install();
    fx.sync_sleep_ms = 20;
    st = must_open(cfg(FSYNC_ALWAYS, 1 << 20), NULL);
    memset(body, 'x', sizeof(body));
    /* 2000 appends, submitted one by one, reaped as we go */
    for (int i = 0; i < 2000; i++) {
        ck_assert_pq_ok(
            store_append(st, REC_PUBLISH, body, sizeof(body), NULL, NULL));
        store_submit(st);
        store_reap(st, on_done, &d);
    }
    ck_assert(reap_until(st, &d, 2000, 10000));
    ck_assert_uint_le(d.n, 4096);
    for (size_t i = 0; i < d.n; i++) {
        ck_assert_int_eq(d.status[i], PQ_OK);
        ck_assert_uint_gt(d.upto[i], prev); /* in order, each once */
        prev = d.upto[i];
    }
    ck_assert_uint_eq(prev, 2000);
    /* 2000 records, 20 ms per fsync: they must share fsyncs. The bound
     * allows a slow loop (sanitizers, a loaded machine: CI saw 640
     * completions and more than 200 fsyncs), yet fails if records were
     * synced one by one: at least two records per fsync on average. */
    ck_assert_msg(d.n < 1000, "%zu batches for 2000 records", d.n);
    store_get_stats(st, &ss);
    ck_assert_msg(ss.fsyncs < 1000, "%llu fsyncs",
                  (unsigned long long)ss.fsyncs);
    ck_assert_pq_ok(store_close(st));
}
END_TEST

START_TEST(test_fsync_policy_always_never_interval)
{
    struct dones d = {0};
    struct store *st;
    struct store_config c;
    int before;
    uint64_t deadline;

    fx_install();
    /* always: a sync per round, before the report */
    st = must_open(cfg(FSYNC_ALWAYS, 1 << 20), NULL);
    before = fx_syncs();
    append_n(st, NULL, 5, 4, 10);
    ck_assert(reap_until(st, &d, 5, 5000));
    ck_assert_int_gt(fx_syncs(), before);
    ck_assert_pq_ok(store_close(st));

    /* never: reports without any sync until close */
    memset(&d, 0, sizeof(d));
    st = must_open(cfg(FSYNC_NEVER, 1 << 20), NULL);
    /* one round trip first, and the spare made, so the thread is idle */
    append_n(st, NULL, 1, 5, 10);
    ck_assert(reap_until(st, &d, 1, 5000));
    wait_spare_synced(2);
    before = fx_syncs();
    append_n(st, NULL, 50, 6, 10);
    ck_assert(reap_until(st, &d, 51, 5000));
    ck_assert_int_eq(fx_syncs(), before);
    ck_assert_pq_ok(store_close(st));
    ck_assert_int_gt(fx_syncs(), before); /* close syncs */

    /* interval: reports after write; a sync follows within the interval */
    memset(&d, 0, sizeof(d));
    c = cfg(FSYNC_INTERVAL, 1 << 20);
    c.fsync_interval_ms = 50;
    st = must_open(c, NULL);
    append_n(st, NULL, 1, 7, 10);
    ck_assert(reap_until(st, &d, 1, 5000));
    before = fx_syncs();
    append_n(st, NULL, 10, 8, 10);
    ck_assert(reap_until(st, &d, 11, 5000));
    deadline = clock_mono_ms() + 5000;
    while (fx_syncs() == before && clock_mono_ms() < deadline) {
        struct timespec ts = {0, 5 * 1000000L};
        nanosleep(&ts, NULL); /* polling for the timer, bounded */
    }
    ck_assert_int_gt(fx_syncs(), before);
    ck_assert_pq_ok(store_close(st));
}
END_TEST

/* ==== rotation, roll callback, deletion ==== */

struct rollrec {
    struct store *st;
    uint32_t segs[256];
    int n;
    bool append_meta;
};

static void
on_roll(void *arg, uint32_t seg)
{
    struct rollrec *r = arg;
    const char meta[] = "queue_create:jobs";

    if (r->n < 256) {
        r->segs[r->n] = seg;
    }
    r->n++;
    if (r->append_meta) {
        struct store_loc loc;
        ck_assert_pq_ok(store_append(r->st, REC_QUEUE_CREATE, meta,
                                     sizeof(meta) - 1, NULL, &loc));
        ck_assert_uint_eq(loc.seg, seg);
        /* after the store's own SEG_START */
        ck_assert_uint_eq(loc.off, STORE_SEG_HDR_LEN + STORE_SEG_START_LEN);
    }
}

START_TEST(test_rotation_and_replay_across_segments)
{
    struct rlog want = {0}, got = {0};
    struct dones d = {0};
    struct rollrec rr = {.append_meta = true};
    struct store *st = must_open(cfg(FSYNC_ALWAYS, 4096), NULL);
    struct store_seg_stat ss[64];
    size_t nseg;
    char path[PATH_MAX + 32];

    rr.st = st;
    store_set_roll_cb(st, on_roll, &rr);
    for (int i = 0; i < 60; i++) {
        size_t first = want.n;
        append_n(st, &want, 5, (uint32_t)(100 + i), 200);
        /* keep every segment alive (unreferenced ones get deleted) */
        for (size_t j = first; j < want.n; j++) {
            store_seg_ref(st, want.v[j].loc.seg, want.v[j].loc.len);
        }
        store_submit(st);
        store_reap(st, on_done, &d);
    }
    ck_assert(reap_until(st, &d, store_last_lsn(st), 5000));
    nseg = store_seg_stats(st, ss, 64);
    ck_assert_uint_ge(nseg, 5);
    ck_assert_int_eq(rr.n, (int)nseg - 1);
    for (size_t i = 1; i < nseg; i++) {
        ck_assert_uint_eq(rr.segs[i - 1], ss[i].seg);
        ck_assert_uint_le(ss[i - 1].end_off, 4096);
        seg_file(path, sizeof(path), ss[i].seg);
        ck_assert(file_exists(path));
    }
    ck_assert(ss[nseg - 1].current);
    ck_assert_pq_ok(store_close(st));

    st = must_open(cfg(FSYNC_ALWAYS, 4096), &got);
    /* replay = the appended records plus one meta record per roll */
    ck_assert_uint_eq(got.n, want.n + (size_t)rr.n);
    {
        size_t j = 0;
        for (size_t i = 0; i < got.n; i++) {
            if (got.v[i].loc.off == STORE_SEG_HDR_LEN + STORE_SEG_START_LEN &&
                i > 0) {
                ck_assert_uint_eq(got.v[i].type, REC_QUEUE_CREATE);
                continue;
            }
            ck_assert_uint_eq(got.v[i].type, want.v[j].type);
            ck_assert_uint_eq(got.v[i].len, want.v[j].len);
            ck_assert_uint_eq(got.v[i].loc.seg, want.v[j].loc.seg);
            j++;
        }
        ck_assert_uint_eq(j, want.n);
    }
    ck_assert_pq_ok(store_close(st));
    rlog_free(&want);
    rlog_free(&got);
}
END_TEST

START_TEST(test_segment_deleted_when_refs_reach_zero_oldest_first)
{
    struct dones d = {0};
    struct store *st = must_open(cfg(FSYNC_ALWAYS, 4096), NULL);
    struct store_loc locs[200];
    uint8_t body[100];
    char p1[PATH_MAX + 32], p2[PATH_MAX + 32];
    uint32_t s1, s2, cseg;
    int n = 0;

    memset(body, 'm', sizeof(body));
    /* publishes until we are three segments in; each refs its segment */
    while (store_current_seg(st) < 3 && n < 200) {
        ck_assert_pq_ok(
            store_append(st, REC_PUBLISH, body, sizeof(body), NULL, &locs[n]));
        store_seg_ref(st, locs[n].seg, locs[n].len);
        n++;
    }
    ck_assert_uint_eq(store_current_seg(st), 3);
    ck_assert(reap_until(st, &d, store_last_lsn(st), 5000));
    s1 = locs[0].seg;
    s2 = s1 + 1;
    seg_file(p1, sizeof(p1), s1);
    seg_file(p2, sizeof(p2), s2);
    /* ack everything in segment 2 first: it must stay (segment 1 lives) */
    for (int i = 0; i < n; i++) {
        if (locs[i].seg == s2) {
            uint8_t ack[8] = {0};
            ck_assert_pq_ok(store_append(st, REC_ACK, ack, 8, NULL, NULL));
            store_seg_unref(st, s2, locs[i].len);
        }
    }
    ck_assert(reap_until(st, &d, store_last_lsn(st), 5000));
    store_reap(st, on_done, &d);
    ck_assert(file_exists(p2));
    ck_assert_int_eq(store_compact_candidate(st, &cseg), PQ_OK);
    ck_assert_uint_eq(cseg, s1);
    /* now segment 1: unref without the ack being durable yet */
    for (int i = 0; i < n; i++) {
        if (locs[i].seg == s1) {
            uint8_t ack[8] = {1};
            ck_assert_pq_ok(store_append(st, REC_ACK, ack, 8, NULL, NULL));
            store_seg_unref(st, s1, locs[i].len);
        }
    }
    store_reap(st, on_done, &d); /* the acks are only pending */
    ck_assert(file_exists(p1));
    ck_assert(reap_until(st, &d, store_last_lsn(st), 5000));
    /* deletion is done by the thread: poll for it, bounded */
    {
        uint64_t deadline = clock_mono_ms() + 5000;
        while ((file_exists(p1) || file_exists(p2)) &&
               clock_mono_ms() < deadline) {
            struct timespec ts = {0, 2 * 1000000L};
            nanosleep(&ts, NULL);
        }
    }
    ck_assert(!file_exists(p1));
    ck_assert(!file_exists(p2));
    ck_assert_uint_eq(store_seg_stats(st, NULL, 0), 1); /* current only */
    {
        char p3[PATH_MAX + 32];
        seg_file(p3, sizeof(p3), store_current_seg(st));
        ck_assert(file_exists(p3));
    }
    ck_assert_pq_ok(store_close(st));
}
END_TEST

START_TEST(test_current_segment_never_deleted)
{
    struct dones d = {0};
    struct store *st = must_open(cfg(FSYNC_ALWAYS, 4096), NULL);
    struct store_loc loc;
    uint8_t body[10] = {0};
    char p[PATH_MAX + 32];

    ck_assert_pq_ok(store_append(st, REC_PUBLISH, body, 10, NULL, &loc));
    store_seg_ref(st, loc.seg, loc.len);
    ck_assert_pq_ok(store_append(st, REC_ACK, body, 8, NULL, NULL));
    store_seg_unref(st, loc.seg, loc.len);
    ck_assert(reap_until(st, &d, 2, 5000));
    store_reap(st, on_done, &d);
    seg_file(p, sizeof(p), loc.seg);
    ck_assert(file_exists(p));
    ck_assert_pq_ok(store_close(st));
}
END_TEST

/* ==== disk full and I/O errors ==== */

START_TEST(test_enospc_batch_not_stored_then_recovers)
{
    struct rlog want = {0}, got = {0};
    struct dones d = {0};
    struct store *st;

    fx_install();
    st = must_open(cfg(FSYNC_ALWAYS, 1 << 16), NULL);
    append_n(st, &want, 5, 21, 50);
    ck_assert(reap_until(st, &d, 5, 5000));
    wait_spare(2);
    fx_set(&fx.pwrite_enospc, true);
    append_n(st, NULL, 7, 22, 50); /* these are lost */
    ck_assert(reap_until(st, &d, 12, 5000));
    ck_assert_int_eq(d.status[d.n - 1], PQ_ENOSPC);
    ck_assert_uint_eq(d.ok_upto, 5);
    ck_assert_pq(store_status(st), PQ_ENOSPC);
    fx_set(&fx.pwrite_enospc, false);
    append_n(st, &want, 4, 23, 50);
    ck_assert(reap_until(st, &d, 16, 5000));
    ck_assert_int_eq(d.status[d.n - 1], PQ_OK);
    ck_assert_uint_eq(d.ok_upto, 16);
    /* The spare segment that failed with the disk is retried every
     * 100 ms; the store leaves degraded mode by itself once it exists. */
    for (int i = 0; i < 250 && store_status(st) != PQ_OK; i++) {
        struct timespec ts = {0, 20 * 1000000L};
        nanosleep(&ts, NULL);
    }
    ck_assert_pq_ok(store_status(st));
    ck_assert_pq_ok(store_close(st));
    store_set_io(NULL);

    st = must_open(cfg(FSYNC_ALWAYS, 1 << 16), &got);
    ck_assert_uint_eq(got.n, 9);
    assert_same(&got, &want, 9);
    ck_assert_pq_ok(store_close(st));
    rlog_free(&want);
    rlog_free(&got);
}
END_TEST

START_TEST(test_disk_full_refuses_publish_but_acks_use_reserve)
{
    struct dones d = {0};
    struct store *st;
    uint8_t body[200], ack[8] = {0};
    int published = 0, rc = PQ_OK;
    uint64_t deadline;

    memset(body, 'p', sizeof(body));
    fx_install();
    st = must_open(cfg(FSYNC_ALWAYS, 4096), NULL);
    /* wait until the thread has made its spare, then fail allocations */
    ck_assert_pq_ok(store_append(st, REC_QUEUE_CREATE, body, 10, NULL, NULL));
    ck_assert(reap_until(st, &d, 1, 5000));
    wait_spare(2);
    fx_set(&fx.fallocate_enospc, true);
    for (int i = 0; i < 500; i++) {
        rc = store_append(st, REC_PUBLISH, body, sizeof(body), NULL, NULL);
        if (rc != PQ_OK) {
            break;
        }
        published++;
        store_submit(st);
    }
    ck_assert_pq(rc, PQ_ENOSPC);
    ck_assert_int_gt(published, 20); /* two segments' worth */
    ck_assert_pq(store_status(st), PQ_ENOSPC);
    ck_assert_pq(store_space_check(st, 1, sizeof(body)), PQ_ENOSPC);
    ck_assert_uint_eq(store_reserve_count(st), (uint64_t)published);
    /* every accepted publish can still be acked */
    for (int i = 0; i < published; i++) {
        ck_assert_pq_ok(
            store_append(st, REC_ACK, ack, sizeof(ack), NULL, NULL));
    }
    ck_assert_uint_eq(store_reserve_count(st), 0);
    ck_assert(reap_until(st, &d, store_last_lsn(st), 5000));
    ck_assert_uint_eq(d.ok_upto, store_last_lsn(st));
    /* space returns: publishes are accepted again by themselves */
    fx_set(&fx.fallocate_enospc, false);
    deadline = clock_mono_ms() + 5000;
    do {
        rc = store_append(st, REC_PUBLISH, body, sizeof(body), NULL, NULL);
        if (rc == PQ_ENOSPC) {
            struct timespec ts = {0, 5 * 1000000L};
            nanosleep(&ts, NULL);
        }
    } while (rc == PQ_ENOSPC && clock_mono_ms() < deadline);
    ck_assert_pq_ok(rc);
    ck_assert(reap_until(st, &d, store_last_lsn(st), 5000));
    ck_assert_pq_ok(store_status(st));
    ck_assert_pq_ok(store_close(st));
}
END_TEST

START_TEST(test_fdatasync_eio_is_fatal)
{
    struct dones d = {0};
    struct store *st;

    fx_install();
    st = must_open(cfg(FSYNC_ALWAYS, 1 << 16), NULL);
    append_n(st, NULL, 3, 31, 50);
    ck_assert(reap_until(st, &d, 3, 5000));
    fx_set(&fx.fdatasync_eio, true);
    append_n(st, NULL, 3, 32, 50);
    ck_assert(reap_until(st, &d, 6, 5000));
    ck_assert_int_eq(d.status[d.n - 1], PQ_EIO);
    ck_assert_uint_eq(d.ok_upto, 3);
    ck_assert_pq(store_status(st), PQ_EIO);
    ck_assert_pq(store_append(st, REC_ACK, "12345678", 8, NULL, NULL), PQ_EIO);
    ck_assert_pq(store_close(st), PQ_EIO);
}
END_TEST

/* ==== power loss ==== */

/*
 * The power-loss seam: every file the store writes is tracked by path.
 * fdatasync/fsync of a file snapshots its content (that much survives);
 * pwrites since the last snapshot are "unsynced". fsync of the directory
 * makes every name created so far durable. At crash(), unsynced writes are
 * dropped, partly applied, or torn (a prefix of one write), and files
 * whose names were never made durable disappear. After crash() syncs fail
 * with EIO, so nothing is reported durable that was not.
 */
struct pl_write {
    uint64_t off;
    size_t len;
    uint8_t *data;
};

struct pl_file {
    char path[PATH_MAX + 32];
    int fd;
    bool is_dir;
    bool named; /* directory entry durable */
    bool gone;  /* unlinked */
    uint8_t *snap;
    size_t snap_len;
    struct pl_write *w;
    size_t nw;
};

static struct {
    pthread_mutex_t mu;
    struct pl_file f[64];
    size_t nf;
    bool crashed;
    unsigned seed;
} pl = {.mu = PTHREAD_MUTEX_INITIALIZER};

static struct pl_file *
pl_by_fd(int fd)
{
    for (size_t i = 0; i < pl.nf; i++) {
        if (pl.f[i].fd == fd && !pl.f[i].gone) {
            return &pl.f[i];
        }
    }
    return NULL;
}

static struct pl_file *
pl_by_path(const char *path)
{
    for (size_t i = 0; i < pl.nf; i++) {
        if (strcmp(pl.f[i].path, path) == 0 && !pl.f[i].gone) {
            return &pl.f[i];
        }
    }
    return NULL;
}

static void
pl_clear_writes(struct pl_file *f)
{
    for (size_t i = 0; i < f->nw; i++) {
        free(f->w[i].data);
    }
    free(f->w);
    f->w = NULL;
    f->nw = 0;
}

static void
pl_snapshot(struct pl_file *f)
{
    struct stat sb;

    free(f->snap);
    f->snap = NULL;
    f->snap_len = 0;
    if (fstat(f->fd, &sb) == 0 && sb.st_size > 0) {
        f->snap = malloc((size_t)sb.st_size);
        f->snap_len = (size_t)pread(f->fd, f->snap, (size_t)sb.st_size, 0);
    }
    pl_clear_writes(f);
}

static int
pl_open(const char *path, int flags, mode_t mode)
{
    int fd = open(path, flags, mode);
    struct pl_file *f;

    if (fd < 0) {
        return fd;
    }
    pthread_mutex_lock(&pl.mu);
    f = pl_by_path(path);
    if (f == NULL) {
        ck_assert_uint_lt(pl.nf, 64);
        f = &pl.f[pl.nf++];
        memset(f, 0, sizeof(*f));
        snprintf(f->path, sizeof(f->path), "%s", path);
        f->is_dir = (flags & O_DIRECTORY) != 0;
        f->named = !(flags & O_CREAT); /* existed before: durable */
        f->fd = fd;
        if (!f->is_dir && !(flags & O_TRUNC)) {
            pl_snapshot(f);
        }
    } else {
        f->fd = fd;
    }
    pthread_mutex_unlock(&pl.mu);
    return fd;
}

static int
pl_close(int fd)
{
    struct pl_file *f;

    pthread_mutex_lock(&pl.mu);
    f = pl_by_fd(fd);
    if (f != NULL) {
        f->fd = -1;
    }
    pthread_mutex_unlock(&pl.mu);
    return close(fd);
}

static ssize_t
pl_pwrite(int fd, const void *b, size_t n, off_t off)
{
    ssize_t r = pwrite(fd, b, n, off);
    struct pl_file *f;

    pthread_mutex_lock(&pl.mu);
    f = pl_by_fd(fd);
    if (r > 0 && f != NULL && !pl.crashed) {
        f->w = realloc(f->w, (f->nw + 1) * sizeof(*f->w));
        f->w[f->nw].off = (uint64_t)off;
        f->w[f->nw].len = (size_t)r;
        f->w[f->nw].data = malloc((size_t)r);
        memcpy(f->w[f->nw].data, b, (size_t)r);
        f->nw++;
    }
    pthread_mutex_unlock(&pl.mu);
    return r;
}

static int
pl_sync(int fd)
{
    struct pl_file *f;

    pthread_mutex_lock(&pl.mu);
    if (pl.crashed) {
        pthread_mutex_unlock(&pl.mu);
        errno = EIO;
        return -1;
    }
    f = pl_by_fd(fd);
    if (f != NULL && f->is_dir) {
        for (size_t i = 0; i < pl.nf; i++) {
            pl.f[i].named = true;
        }
    } else if (f != NULL) {
        pl_snapshot(f);
    }
    pthread_mutex_unlock(&pl.mu);
    return 0;
}

static int
pl_unlink(const char *path)
{
    struct pl_file *f;

    pthread_mutex_lock(&pl.mu);
    f = pl_by_path(path);
    if (f != NULL) {
        f->gone = true;
    }
    pthread_mutex_unlock(&pl.mu);
    return unlink(path);
}

static struct store_io pl_io;

static void
pl_reset(void)
{
    for (size_t i = 0; i < pl.nf; i++) {
        pl_clear_writes(&pl.f[i]);
        free(pl.f[i].snap);
    }
    memset(pl.f, 0, sizeof(pl.f));
    pl.nf = 0;
    pl.crashed = false;
}

static void
pl_install(void)
{
    pl_reset();
    pl_io = *store_io_real();
    pl_io.open = pl_open;
    pl_io.close = pl_close;
    pl_io.pwrite = pl_pwrite;
    pl_io.fdatasync = pl_sync;
    pl_io.fsync = pl_sync;
    pl_io.unlink = pl_unlink;
    store_set_io(&pl_io);
}

/* pl_apply_crash: rewrite the files as a power loss would leave them. */
static void
pl_apply_crash(void)
{
    for (size_t i = 0; i < pl.nf; i++) {
        struct pl_file *f = &pl.f[i];
        int fd;
        size_t k;
        if (f->gone || f->is_dir) {
            continue;
        }
        if (!f->named) {
            unlink(f->path);
            continue;
        }
        fd = open(f->path, O_RDWR);
        ck_assert_int_ge(fd, 0);
        ck_assert_int_eq(ftruncate(fd, (off_t)f->snap_len), 0);
        if (f->snap_len > 0) {
            ck_assert_int_eq(pwrite(fd, f->snap, f->snap_len, 0),
                             (ssize_t)f->snap_len);
        }
        /* some unsynced writes made it, maybe the next one torn */
        k = f->nw ? (size_t)rand_r(&pl.seed) % (f->nw + 1) : 0;
        for (size_t j = 0; j < k; j++) {
            ck_assert_int_eq(
                pwrite(fd, f->w[j].data, f->w[j].len, (off_t)f->w[j].off),
                (ssize_t)f->w[j].len);
        }
        if (k < f->nw && rand_r(&pl.seed) % 2 == 0) {
            size_t part = (size_t)rand_r(&pl.seed) % f->w[k].len;
            ck_assert_int_eq(pwrite(fd, f->w[k].data, part, (off_t)f->w[k].off),
                             (ssize_t)part);
        }
        close(fd);
    }
}

START_TEST(test_power_loss_keeps_every_durable_record)
{
    int runs = 200;

    for (int run = 0; run < runs; run++) {
        struct rlog want = {0};
        unsigned seed = 1000u + (unsigned)run;

        reset_tmpdir();
        for (int cycle = 0; cycle < 3; cycle++) {
            struct rlog got = {0};
            struct dones d = {0};
            struct store *st;
            uint64_t durable;
            int n = 20 + rand_r(&seed) % 120;
            size_t base;

            pl_install();
            pl.seed = seed + 7u * (unsigned)cycle;
            st = must_open(cfg(FSYNC_ALWAYS, 4096), &got);
            /* what survived: a prefix of everything appended, at least
             * up to what was reported durable */
            ck_assert_msg(got.n <= want.n, "run %d: replayed %zu of %zu", run,
                          got.n, want.n);
            assert_same(&got, &want, got.n);
            for (size_t i = got.n; i < want.n; i++) {
                free(want.v[i].body);
            }
            want.n = got.n;
            /* every record stays live: no segment may be deleted */
            for (size_t i = 0; i < got.n; i++) {
                store_seg_ref(st, got.v[i].loc.seg, got.v[i].loc.len);
            }
            rlog_free(&got);
            base = want.n;
            for (int i = 0; i < n; i++) {
                append_n(st, &want, 1, seed * 31u + (unsigned)i,
                         (size_t)(rand_r(&seed) % 300));
                store_seg_ref(st, want.v[want.n - 1].loc.seg, 1);
                if (rand_r(&seed) % 8 == 0) {
                    store_submit(st);
                }
                if (rand_r(&seed) % 16 == 0) {
                    store_reap(st, on_done, &d);
                }
            }
            store_submit(st);
            if (rand_r(&seed) % 2) {
                (void)reap_until(st, &d, store_last_lsn(st), rand_r(&seed) % 5);
            }
            pthread_mutex_lock(&pl.mu);
            pl.crashed = true;
            pthread_mutex_unlock(&pl.mu);
            (void)reap_until(st, &d, store_last_lsn(st), 5000);
            durable = d.ok_upto;
            (void)store_close(st);
            pl_apply_crash();
            store_set_io(NULL);
            /* the durable ones must come back next open */
            {
                struct rlog chk = {0};
                struct store_config c = cfg(FSYNC_ALWAYS, 4096);
                c.read_only = true;
                st = must_open(c, &chk);
                ck_assert_msg(chk.n >= base + durable,
                              "run %d cycle %d: %zu replayed, %zu+%llu durable",
                              run, cycle, chk.n, base,
                              (unsigned long long)durable);
                ck_assert_uint_le(chk.n, want.n);
                assert_same(&chk, &want, chk.n);
                ck_assert_pq_ok(store_close(st));
                rlog_free(&chk);
            }
        }
        pl_reset();
        rlog_free(&want);
    }
}
END_TEST

START_TEST(test_read_only_open_does_not_truncate)
{
    struct rlog want = {0}, got = {0};
    struct store_config c = cfg(FSYNC_ALWAYS, 1 << 16);
    struct store *st = must_open(c, NULL);
    char path[PATH_MAX + 32];
    size_t l1, l2;
    uint8_t *a, *b;

    append_n(st, &want, 5, 41, 30);
    ck_assert_pq_ok(store_close(st));
    seg_file(path, sizeof(path), 1);
    a = slurp(path, &l1);
    spit(path, a, (size_t)(want.v[4].loc.off + 3));
    free(a);
    a = slurp(path, &l1);
    c.read_only = true;
    st = must_open(c, &got);
    ck_assert_uint_eq(got.n, 4);
    ck_assert_pq(store_append(st, REC_ACK, "12345678", 8, NULL, NULL),
                 PQ_EINVAL);
    ck_assert_pq_ok(store_close(st));
    b = slurp(path, &l2);
    ck_assert_uint_eq(l1, l2);
    ck_assert_mem_eq(a, b, l1);
    free(a);
    free(b);
    rlog_free(&want);
    rlog_free(&got);
}
END_TEST

static Suite *
store_suite(void)
{
    Suite *s = suite_create("store");
    TCase *tc;

    tc = tcase_create("log");
    tcase_add_checked_fixture(tc, setup_tmpdir, teardown_tmpdir);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_append_close_reopen_replays_in_order);
    tcase_add_test(tc, test_store_read_back_and_pending);
    tcase_add_test(tc,
                   test_reader_thread_reads_in_order_and_close_frees_the_rest);
    tcase_add_test(tc, test_lock_second_open_is_busy);
    tcase_add_test(tc, test_unwaited_records_share_the_next_urgent_fsync);
    tcase_add_test(tc, test_group_commit_during_slow_fsync);
    tcase_add_test(tc, test_fsync_policy_always_never_interval);
    tcase_add_test(tc, test_rotation_and_replay_across_segments);
    tcase_add_test(tc, test_segment_deleted_when_refs_reach_zero_oldest_first);
    tcase_add_test(tc, test_current_segment_never_deleted);
    tcase_add_test(tc, test_read_only_open_does_not_truncate);
    suite_add_tcase(s, tc);

    tc = tcase_create("faults");
    tcase_add_checked_fixture(tc, setup_tmpdir, teardown_tmpdir);
    tcase_set_timeout(tc, 300);
    tcase_add_test(tc, test_enospc_batch_not_stored_then_recovers);
    tcase_add_test(tc, test_disk_full_refuses_publish_but_acks_use_reserve);
    tcase_add_test(tc, test_fdatasync_eio_is_fatal);
    tcase_add_test(tc, test_power_loss_keeps_every_durable_record);
    suite_add_tcase(s, tc);
    return s;
}

int
main(void)
{
    return run_store_suite(store_suite());
}
