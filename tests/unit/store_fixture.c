/*
 * store_fixture.c: see store_fixture.h.
 */
#include <ftw.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "clock.h"
#include "log.h"
#include "store_fixture.h"

char tmpdir[PATH_MAX];
char errbuf[STORE_ERR_MAX];

static int
rm_one(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

void
setup_tmpdir(void)
{
    strcpy(tmpdir, "/tmp/pqstore.XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(tmpdir));
    store_set_io(NULL);
}

void
reset_tmpdir(void)
{
    nftw(tmpdir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
    ck_assert_int_eq(mkdir(tmpdir, 0700), 0);
}

void
teardown_tmpdir(void)
{
    store_set_io(NULL);
    nftw(tmpdir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

struct store_config
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

void
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

void
rlog_free(struct rlog *l)
{
    for (size_t i = 0; i < l->n; i++) {
        free(l->v[i].body);
    }
    free(l->v);
    memset(l, 0, sizeof(*l));
}

int
collect(void *arg, uint8_t type, const uint8_t *body, size_t len,
        const struct store_loc *loc)
{
    rlog_add(arg, type, body, len, loc);
    return PQ_OK;
}

void
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
bool
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

void
fill_body(uint8_t *b, size_t len, uint32_t seed)
{
    for (size_t i = 0; i < len; i++) {
        seed = seed * 1103515245u + 12345u;
        b[i] = (uint8_t)(seed >> 16);
    }
}

struct store *
must_open(struct store_config c, struct rlog *replay)
{
    struct store *st = NULL;
    int rc = store_open(&c, replay ? collect : NULL, replay, &st, errbuf,
                        sizeof(errbuf));

    ck_assert_msg(rc == PQ_OK, "store_open: %s: %s", pq_strerror(rc), errbuf);
    return st;
}

void
seg_file(char *buf, size_t n, uint32_t seq)
{
    snprintf(buf, n, "%s/seg-%010u.log", tmpdir, seq);
}

bool
file_exists(const char *p)
{
    return access(p, F_OK) == 0;
}

uint8_t *
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

void
spit(const char *path, const uint8_t *b, size_t len)
{
    FILE *f = fopen(path, "wb");

    ck_assert_ptr_nonnull(f);
    ck_assert_uint_eq(fwrite(b, 1, len, f), len);
    fclose(f);
}

/* ==== store basics ==== */

void
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

void
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

int
run_store_suite(Suite *s)
{
    SRunner *sr = srunner_create(s);
    int failed;

    log_set_level(LOG_ERR); /* torn-tail notices are expected */
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
