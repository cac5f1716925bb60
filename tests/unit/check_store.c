/*
 * check_store.c: unit tests for crc32c.c, record.c and store.c. Each test
 * runs in its own forked process with a fresh mkdtemp data dir (removed at
 * teardown) and the real I/O calls restored. Fault injection goes through
 * store_set_io: a seam that fails pwrite/fallocate with ENOSPC, fdatasync
 * with EIO, slows fdatasync down, or models a power loss (what was not
 * synced is dropped or torn; files whose directory entry was not synced
 * vanish). Waiting for the storage thread is poll() on its eventfd with a
 * deadline; no test sleeps for its result.
 */
#include <check.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "crc32c.h"
#include "log.h"
#include "mem.h"
#include "pqerr.h"
#include "record.h"
#include "store.h"
#include "clock.h"

#define ck_assert_pq_ok(expr)                                                  \
    do {                                                                       \
        int rc_ = (expr);                                                      \
        ck_assert_msg(rc_ == PQ_OK, "%s: %s (%d)", #expr, pq_strerror(rc_),    \
                      rc_);                                                    \
    } while (0)

#define ck_assert_pq(expr, want)                                               \
    do {                                                                       \
        int rc_ = (expr);                                                      \
        ck_assert_msg(rc_ == (want), "%s: got %s (%d), want %s", #expr,        \
                      pq_strerror(rc_), rc_, pq_strerror(want));               \
    } while (0)

static char tmpdir[PATH_MAX];
static char errbuf[STORE_ERR_MAX];

/* ---- fixture ---- */

static int
rm_one(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static void
setup_tmpdir(void)
{
    strcpy(tmpdir, "/tmp/pqstore.XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(tmpdir));
    store_set_io(NULL);
}

static void
teardown_tmpdir(void)
{
    store_set_io(NULL);
    nftw(tmpdir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

/* ---- helpers ---- */

static struct store_config
cfg(enum fsync_policy pol, uint64_t seg_bytes)
{
    struct store_config c = {
        .dir = tmpdir,
        .fsync_policy = pol,
        .fsync_interval_ms = 10,
        .segment_bytes = seg_bytes,
        .read_only = false,
        .opaque_records = true, /* random records, not a journal's */
    };
    return c;
}

/* A replayed or appended record kept for comparison. */
struct rec_copy {
    uint8_t type;
    uint8_t *body;
    size_t len;
    struct store_loc loc;
};

struct rlog {
    struct rec_copy *v;
    size_t n, cap;
};

static void
rlog_add(struct rlog *l, uint8_t type, const uint8_t *body, size_t len,
         const struct store_loc *loc)
{
    if (l->n == l->cap) {
        l->cap = l->cap ? l->cap * 2 : 64;
        l->v = realloc(l->v, l->cap * sizeof(*l->v));
        ck_assert_ptr_nonnull(l->v);
    }
    l->v[l->n].type = type;
    l->v[l->n].len = len;
    l->v[l->n].body = malloc(len ? len : 1);
    ck_assert_ptr_nonnull(l->v[l->n].body);
    if (len > 0) {
        memcpy(l->v[l->n].body, body, len);
    }
    if (loc != NULL) {
        l->v[l->n].loc = *loc;
    }
    l->n++;
}

static void
rlog_free(struct rlog *l)
{
    for (size_t i = 0; i < l->n; i++) {
        free(l->v[i].body);
    }
    free(l->v);
    memset(l, 0, sizeof(*l));
}

static int
collect(void *arg, uint8_t type, const uint8_t *body, size_t len,
        const struct store_loc *loc)
{
    rlog_add(arg, type, body, len, loc);
    return PQ_OK;
}

/* completions seen by store_reap */
struct dones {
    uint64_t upto[4096];
    int status[4096];
    size_t n;
    uint64_t ok_upto; /* highest LSN reported PQ_OK */
};

static void
on_done(void *arg, uint64_t upto, int status)
{
    struct dones *d = arg;

    if (d->n < 4096) {
        d->upto[d->n] = upto;
        d->status[d->n] = status;
    }
    d->n++;
    if (status == PQ_OK && upto > d->ok_upto) {
        d->ok_upto = upto;
    }
}

/* reap_until: reap until every LSN <= upto was reported (or timeout). */
static bool
reap_until(struct store *st, struct dones *d, uint64_t upto, int timeout_ms)
{
    uint64_t deadline = clock_mono_ms() + (uint64_t)timeout_ms;
    struct pollfd pfd = {.fd = store_event_fd(st), .events = POLLIN};

    store_submit(st);
    while (d->n == 0 || d->upto[(d->n - 1) % 4096] < upto) {
        uint64_t now = clock_mono_ms();
        if (now >= deadline) {
            return false;
        }
        poll(&pfd, 1, (int)(deadline - now));
        store_reap(st, on_done, d);
    }
    return true;
}

static void
fill_body(uint8_t *b, size_t len, uint32_t seed)
{
    for (size_t i = 0; i < len; i++) {
        seed = seed * 1103515245u + 12345u;
        b[i] = (uint8_t)(seed >> 16);
    }
}

static struct store *
must_open(struct store_config c, struct rlog *replay)
{
    struct store *st = NULL;
    int rc = store_open(&c, replay ? collect : NULL, replay, &st, errbuf,
                        sizeof(errbuf));

    ck_assert_msg(rc == PQ_OK, "store_open: %s: %s", pq_strerror(rc), errbuf);
    return st;
}

static void
seg_file(char *buf, size_t n, uint32_t seq)
{
    snprintf(buf, n, "%s/seg-%010u.log", tmpdir, seq);
}

static bool
file_exists(const char *p)
{
    return access(p, F_OK) == 0;
}

static uint8_t *
slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    uint8_t *b;
    long n;

    ck_assert_ptr_nonnull(f);
    fseek(f, 0, SEEK_END);
    n = ftell(f);
    fseek(f, 0, SEEK_SET);
    b = malloc((size_t)n + 1);
    ck_assert_ptr_nonnull(b);
    ck_assert_uint_eq(fread(b, 1, (size_t)n, f), (size_t)n);
    fclose(f);
    *len = (size_t)n;
    return b;
}

static void
spit(const char *path, const uint8_t *b, size_t len)
{
    FILE *f = fopen(path, "wb");

    ck_assert_ptr_nonnull(f);
    ck_assert_uint_eq(fwrite(b, 1, len, f), len);
    fclose(f);
}

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

static void
sample_records(struct record *r /* [9] */)
{
    memset(r, 0, 9 * sizeof(*r));
    r[0].type = REC_QUEUE_CREATE;
    r[0].u.queue_create.name = (struct rec_str){"jobs", 4};
    r[0].u.queue_create.attrs =
        (struct rec_queue_attrs){.transient = true,
                                 .max_length = 1,
                                 .max_bytes = 2,
                                 .ack_timeout_ms = 3,
                                 .max_attempts = 4,
                                 .dead_letter = {"dlq", 3},
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
}

START_TEST(test_record_roundtrip_every_type)
{
    struct record r[9], d, d2;
    uint8_t buf[1024], buf2[1024];

    sample_records(r);
    for (int i = 0; i < 9; i++) {
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
        ssize_t n = record_encode(&r[0], buf, sizeof(buf));
        ck_assert_pq_ok(record_decode(REC_QUEUE_CREATE, buf, (size_t)n, &d));
        ck_assert(d.u.queue_create.attrs.transient);
        ck_assert_uint_eq(d.u.queue_create.attrs.max_lease_ms, UINT64_MAX);
        ck_assert_uint_eq(d.u.queue_create.attrs.max_attempts, 4);
        ck_assert(d.u.queue_create.attrs.dead_letter_expired);
    }
}
END_TEST

START_TEST(test_record_decode_truncated_or_overlong_is_corrupt)
{
    struct record r[9], d;
    uint8_t buf[1024];

    sample_records(r);
    for (int i = 0; i < 9; i++) {
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
    struct record r[9], d;
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
    /* inconsistent encode input */
    r[3].u.publish.requires = NULL; /* a count without pairs */
    ck_assert_pq(record_encoded_size(&r[3]), PQ_EINVAL);
}
END_TEST

/* ==== store basics ==== */

static void
append_n(struct store *st, struct rlog *expect, int n, uint32_t seed,
         size_t maxlen)
{
    uint8_t body[4096];

    for (int i = 0; i < n; i++) {
        uint32_t s = seed * 7919u + (uint32_t)i;
        size_t len = (size_t)(s % (maxlen + 1));
        uint8_t type = (uint8_t)(1 + s % 9);
        struct store_loc loc;
        uint64_t lsn;
        fill_body(body, len, s);
        ck_assert_pq_ok(store_append(st, type, body, len, &lsn, &loc));
        ck_assert_uint_eq(lsn, store_last_lsn(st));
        if (expect != NULL) {
            rlog_add(expect, type, body, len, &loc);
        }
    }
}

static void
assert_same(const struct rlog *got, const struct rlog *want, size_t n)
{
    ck_assert_uint_ge(got->n, n);
    ck_assert_uint_ge(want->n, n);
    for (size_t i = 0; i < n; i++) {
        ck_assert_msg(
            got->v[i].type == want->v[i].type &&
                got->v[i].len == want->v[i].len &&
                memcmp(got->v[i].body, want->v[i].body, got->v[i].len) == 0,
            "record %zu differs", i);
    }
}

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
        size_t keep = 0, good_end = STORE_SEG_HDR_LEN, len2;
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
        for (size_t i = good_end; i < len2; i++) {
            ck_assert_msg(after[i] == 0, "cut %zu: byte %zu not cut", cut, i);
        }
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

        nftw(tmpdir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
        ck_assert_int_eq(mkdir(tmpdir, 0700), 0);
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

    tc = tcase_create("crc32c");
    tcase_add_test(tc, test_crc32c_check_vector_both_paths);
    tcase_add_test(tc, test_crc32c_paths_agree_on_random_buffers);
    suite_add_tcase(s, tc);

    tc = tcase_create("record");
    tcase_add_test(tc, test_record_roundtrip_every_type);
    tcase_add_test(tc, test_record_decode_truncated_or_overlong_is_corrupt);
    tcase_add_test(tc, test_record_decode_hostile_lengths_and_flags);
    suite_add_tcase(s, tc);

    tc = tcase_create("log");
    tcase_add_checked_fixture(tc, setup_tmpdir, teardown_tmpdir);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_append_close_reopen_replays_in_order);
    tcase_add_test(tc, test_store_read_back_and_pending);
    tcase_add_test(tc, test_lock_second_open_is_busy);
    tcase_add_test(tc, test_unwaited_records_share_the_next_urgent_fsync);
    tcase_add_test(tc, test_group_commit_during_slow_fsync);
    tcase_add_test(tc, test_fsync_policy_always_never_interval);
    tcase_add_test(tc, test_rotation_and_replay_across_segments);
    tcase_add_test(tc, test_segment_deleted_when_refs_reach_zero_oldest_first);
    tcase_add_test(tc, test_current_segment_never_deleted);
    tcase_add_test(tc, test_read_only_open_does_not_truncate);
    suite_add_tcase(s, tc);

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
    SRunner *sr = srunner_create(store_suite());
    int failed;

    log_set_level(LOG_ERR); /* torn-tail notices are expected */
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
