/*
 * jobs_fixture.h: what the job-semantics suites (check_jobs.c,
 * check_jobs_restart.c) share: the checked fixture (a fresh protoqd per test
 * with a conf file that makes retry backoff short), queue and publish
 * helpers, stat polling, and a consumer that records deliveries, cancels and
 * async errors. Test code only; every wait is bounded.
 */
#ifndef PROTOQ_JOBS_FIXTURE_H
#define PROTOQ_JOBS_FIXTURE_H

#include <check.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "testutil.h"

/* Which counter stat_wait waits for. */
enum stat_field {
    SF_READY,
    SF_DELAYED,
    SF_INFLIGHT,
    SF_TOTAL,
    SF_NACKED,
    SF_EXPIRED,
    SF_DEAD,
    SF_DROPPED,
    SF_ACKED
};

/* One delivery, copied out of the callback. */
enum { GOT_MAX_HDR = 12, GOT_RING = 64 };
struct got {
    uint64_t id;
    uint32_t attempt;
    uint32_t priority;
    uint64_t lease_ms;
    char payload[512];
    size_t len;
    size_t n_hdr;
    char hk[GOT_MAX_HDR][64];
    char hv[GOT_MAX_HDR][1100];
    bool has_progress;
    uint32_t percent;
    char ptext[256];
    char pckpt[256];
    int64_t at_ms; /* monotonic time of the callback */
};

/* A consumer: one handle, one subscription, a ring of deliveries. */
struct cons {
    protoq_client *c;
    uint64_t sub;
    struct got ring[GOT_RING];
    unsigned head, tail; /* tail - head = queued */
    unsigned overflow;
    unsigned n_cancel;
    char cancel_queue[PROTOQ_NAME_MAX + 1];
    uint64_t cancel_id;
    uint32_t cancel_attempt;
    unsigned n_err;
    int last_err_code;
};

/* The broker of the running test (started by the fixture). */
extern struct srv g_srv;
/* jobs_main: the program's main: write the conf file every test uses,
 * run s, remove the file; the exit status. */
int jobs_main(Suite *s);
/* Sleep ms milliseconds. */
void sleep_ms(int ms);
/* Queue attributes with a short backoff, everything else default. */
struct protoq_queue_attrs attrs_fast(void);
/* Create queue name with attributes a; asserts it worked. */
void mkq(protoq_client *c, const char *name,
         const struct protoq_queue_attrs *a);
/* Publish payload to q and wait for the confirm; returns the id. */
uint64_t pub(protoq_client *c, const char *q, const char *payload);
/* Publish m with payload to q and wait for the confirm; returns the id. */
uint64_t pub_msg(protoq_client *c, const char *q, struct protoq_message *m,
                 const char *payload);
/* QueueStat of q; asserts it worked. */
struct protoq_queue_info qstat(protoq_client *c, const char *q);
/* Every message the queue holds: ready, delayed and in flight. */
uint64_t qtotal(const struct protoq_queue_info *i);
/* Poll QueueStat every 20 ms until field f == want (up to timeout_ms); returns
 * the last value. */
uint64_t stat_wait(protoq_client *c, const char *q, enum stat_field f,
                   uint64_t want, int timeout_ms);
/* A new connection subscribed to q with prefetch; recorded by the consumer
 * callbacks. */
struct cons *cons_open(const char *q, uint32_t prefetch);
/* Close k's connection and free it. */
void cons_close(struct cons *k);
/* The next delivery on k into *out, failing the test (what) if none comes in
 * timeout_ms. */
void cons_must_get(struct cons *k, int timeout_ms, struct got *out,
                   const char *what);
/* Assert that nothing is delivered on k for ms (what names it in the failure).
 */
void cons_none(struct cons *k, int ms, const char *what);
/* Let k's handle process what arrives for ms (cancel requests, errors). */
void pump_for(struct cons *k, int ms);
/* Assert g has header key with value want. */
void check_header(const struct got *g, const char *key, const char *want);
/* Assert g's payload is exactly want. */
void check_payload(const struct got *g, const char *want);
/* A case with the fresh-broker fixture and timeout_s seconds; the caller adds
 * it to its suite. */
TCase *tcase(const char *name, int timeout_s);

#endif
