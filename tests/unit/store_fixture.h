/*
 * store_fixture.h: the fixture shared by the storage unit suites
 * (check_store.c, check_store_recover.c): a fresh mkdtemp data dir per test
 * (removed at teardown, real I/O restored), a store config over it, a copy
 * of replayed or appended records, and file helpers. Test code only.
 */
#ifndef PROTOQ_STORE_FIXTURE_H
#define PROTOQ_STORE_FIXTURE_H

#include <check.h>
#include <limits.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "pqerr.h"
#include "store.h"

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

extern char tmpdir[PATH_MAX];
extern char errbuf[STORE_ERR_MAX];

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

/* completions seen by store_reap */
struct dones {
    uint64_t upto[4096];
    int status[4096];
    size_t n;
    uint64_t ok_upto; /* highest LSN reported PQ_OK */
};

void setup_tmpdir(void);
void teardown_tmpdir(void);
/* empties the data dir: removed and made again */
void reset_tmpdir(void);
struct store_config cfg(enum fsync_policy pol, uint64_t seg_bytes);
void rlog_add(struct rlog *l, uint8_t type, const uint8_t *body, size_t len,
              const struct store_loc *loc);
void rlog_free(struct rlog *l);
int collect(void *arg, uint8_t type, const uint8_t *body, size_t len,
            const struct store_loc *loc);
void on_done(void *arg, uint64_t upto, int status);
/* reap_until: reap until every LSN <= upto was reported (or timeout). */
bool reap_until(struct store *st, struct dones *d, uint64_t upto,
                int timeout_ms);
void fill_body(uint8_t *b, size_t len, uint32_t seed);
struct store *must_open(struct store_config c, struct rlog *replay);
void seg_file(char *buf, size_t n, uint32_t seq);
bool file_exists(const char *p);
uint8_t *slurp(const char *path, size_t *len);
void spit(const char *path, const uint8_t *b, size_t len);
/* n records of random types and lengths up to maxlen, kept in expect */
void append_n(struct store *st, struct rlog *expect, int n, uint32_t seed,
              size_t maxlen);
void assert_same(const struct rlog *got, const struct rlog *want, size_t n);
/* Runs the suite with log level LOG_ERR (torn-tail notices are expected). */
int run_store_suite(Suite *s);

#endif
