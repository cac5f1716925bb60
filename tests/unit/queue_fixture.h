/*
 * queue_fixture.h: the fixture shared by the queue unit suites
 * (check_queue.c, check_queue_compact.c): one qset on a fake clock (`now`),
 * an event recorder, and helpers that push, deliver and ack. Test code only.
 */
#ifndef PROTOQ_QUEUE_FIXTURE_H
#define PROTOQ_QUEUE_FIXTURE_H

#include <check.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "body.h"
#include "pqerr.h"
#include "queue.h"

#define ck_assert_pq(expr, want)                                               \
    do {                                                                       \
        int rc_ = (expr);                                                      \
        ck_assert_msg(rc_ == (want), "%s: got %s (%d), want %s", #expr,        \
                      pq_strerror(rc_), rc_, pq_strerror(want));               \
    } while (0)
#define ck_assert_pq_ok(expr) ck_assert_pq(expr, PQ_OK)

enum { EV_MAX = 256 };

struct ev_rec {
    enum qevent_type type;
    uint64_t id;
    char reason[32];
    char q[QUEUE_NAME_MAX + 1];
    char from[QUEUE_NAME_MAX + 1];
    int has_detail;
};

extern struct qset *qs;
extern uint64_t now;
/* push_full asks queue_push for the struct msg (full form); the "compact"
 * cases run the same tests with out == NULL (compact form where it fits). */
extern bool want_ptr;
extern struct ev_rec evs[EV_MAX];
extern size_t n_evs;
extern size_t n_ready_hints;

void record(void *arg, const struct qevent *ev);
void setup(void);
void setup_compact(void);
void teardown(void);
struct queue *mkq(const char *name, const struct queue_attrs *a);
/* An encoded protoq.Message with this payload and optional header. */
struct body *mkbody(const char *payload, const char *hk, const char *hv);
struct msg *push_full(struct queue *q, uint64_t id, uint8_t prio, uint64_t due,
                      uint32_t size);
struct msg *push(struct queue *q, uint64_t id, uint8_t prio);
/* Next delivery's id, or 0 when none; *to gets the consumer. */
uint64_t next_id(struct queue *q, struct consumer **to);
void ack(uint64_t id);
struct ev_rec *find_ev(enum qevent_type type, uint64_t id);
/* Header value in an encoded Message, or NULL. Copies into buf. */
const char *header_of(const struct body *b, const char *key, char *buf,
                      size_t cap);

/* A test case of the fixture; names starting "compact:" push without
 * asking for the struct msg. */
void add_case(Suite *s, const char *name, const TTest *tests[], size_t n,
              int timeout);
/* ADD: one case of these tests; ADD2: the case as is, and again as
 * "compact:name" with compact pushes. */
#define ADD(s, name, timeout, ...)                                             \
    do {                                                                       \
        const TTest *t_[] = {__VA_ARGS__};                                     \
        add_case(s, name, t_, sizeof(t_) / sizeof(t_[0]), timeout);            \
    } while (0)
#define ADD2(s, name, timeout, ...)                                            \
    do {                                                                       \
        ADD(s, name, timeout, __VA_ARGS__);                                    \
        ADD(s, "compact:" name, timeout, __VA_ARGS__);                         \
    } while (0)

int run_suite(Suite *s);

#endif
