/*
 * server_fixture.h: what the core integration suites (check_server.c,
 * check_admin.c, check_delivery.c, check_requests.c, check_durability.c)
 * share: the checked fixture (a fresh protoqd per test, optionally with a
 * conf file), delivery collection, publishing helpers and raw-frame helpers.
 * Test code only; every wait is bounded.
 */
#ifndef PROTOQ_SERVER_FIXTURE_H
#define PROTOQ_SERVER_FIXTURE_H

#include <check.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "testutil.h"

enum {
    DEFAULT_MAX_FRAME = 4 * 1024 * 1024,
    DEFAULT_MAX_MESSAGE = 1024 * 1024,
    DEFAULT_MAX_BATCH = 10000,
    DEFAULT_HEARTBEAT_MS = 5000,
    MAX_HELLO_BYTES = 4096,
    RAW_TIMEOUT_MS = 3000,
};

/* ------------------------------------------------- delivery collection */

struct got {
    uint64_t id;
    uint64_t sub;
    uint32_t attempt;
    uint32_t priority;
    size_t len;
    char payload[48]; /* NUL-terminated copy, truncated */
};

struct coll {
    struct got *v;
    size_t n;
    size_t cap;
    size_t overflow; /* deliveries past cap */
    bool ack;        /* ack every delivery as it arrives */
    int ack_err;     /* first protoq_ack failure */
};

/* One async publish's outcome. */
struct pubrec {
    uint64_t id;
    int err;  /* 1 while pending, then PQ_OK or a PQ_* code */
    int code; /* wire code when err is PQ_EREMOTE */
    struct pubset *set;
};

struct pubset {
    protoq_client *c;
    struct pubrec *r;
    size_t n;
    size_t ok;
    size_t failed;
};

/* The broker of the running test (started by the fixture). */
extern struct srv g_srv;
/* The conf file of start_with_conf ("" when none). */
extern char g_conf[64];
/* Write text to a temp conf file and start g_srv with -c on it. */
void start_with_conf(const char *text);
/* Teardown for start_with_conf: remove the conf, stop and check g_srv. */
void teardown_server_conf(void);
/* Sleep ms milliseconds. */
void sleep_ms(int ms);
/* Make k collect up to cap deliveries, acking each one when ack. */
void coll_init(struct coll *k, size_t cap, bool ack);
/* Free what coll_init allocated. */
void coll_free(struct coll *k);
/* Delivery callback (arg: a struct coll) recording each delivery. */
void on_collect(void *arg, protoq_client *c, const struct protoq_delivery *d);
/* Poll c until k holds want deliveries or timeout_ms passes; returns k->n. */
size_t poll_until(protoq_client *c, struct coll *k, size_t want,
                  int timeout_ms);
/* Keep polling c for ms milliseconds (to see that nothing more comes). */
void poll_for(protoq_client *c, int ms);
/* Publish s to q with priority prio and wait for the confirm; *id gets the id.
 */
void pub_str(protoq_client *c, const char *q, const char *s, uint32_t prio,
             uint64_t *id);
/* Confirm callback (arg: a struct pubrec) recording the outcome. */
void on_confirm(void *arg, int err, uint64_t id, bool dup);
/* Make ps track n async publishes on c. */
void pubset_init(struct pubset *ps, protoq_client *c, size_t n);
/* Free what pubset_init allocated. */
void pubset_free(struct pubset *ps);
/* Publish "1".."n" to q pipelined, at most window unconfirmed; does not wait
 * for the last confirms. */
void pubset_send(struct pubset *ps, const char *q, size_t window);
/* Publish "1".."n" to q pipelined and wait for every confirm; ids (NULL ok)
 * gets the ids. */
void publish_seq(protoq_client *c, const char *q, size_t n, uint64_t *ids);
/* QUEUE_STAT of q into *qi; asserts it succeeded. */
void stat_q(protoq_client *c, const char *q, struct protoq_queue_info *qi);
/* Payload of g as a number, or 0 when it is not one. */
unsigned long payload_num(const struct got *g);
/* Consume and ack want messages from q on a fresh connection; asserts
 * "1".."want" in order with this attempt. */
void consume_seq_in_order(const char *q, size_t want, uint32_t prefetch,
                          uint32_t attempt, int timeout_ms);
/* Assert g_srv is alive and a new client can create, publish, consume and ack.
 */
void assert_broker_healthy(void);
/* A QueueList request frame with request id rid (length-prefixed, malloc'ed).
 */
uint8_t *pack_queue_list(uint64_t rid, size_t *len);
/* A QueueCreate request frame for name with request id rid (length-prefixed,
 * malloc'ed). */
uint8_t *pack_queue_create(uint64_t rid, const char *name, size_t *len);
/* A Publish request frame of payload to q with request id rid (length-prefixed,
 * malloc'ed). */
uint8_t *pack_publish(uint64_t rid, const char *q, const void *payload,
                      size_t plen, size_t *len);
/* raw_send all of buf on fd; asserts it was written. */
void send_all(int fd, const void *buf, size_t len);
/* Read one frame and check its kind and request id; returns it (the caller
 * frees it). */
Protoq__Frame *read_kind(int fd, Protoq__Frame__KindCase kind, uint64_t rid);
/* Read one Error frame with code want whose message contains sub (NULL: any).
 */
void read_error(int fd, int want, const char *sub);
/* Connect a raw socket to g_srv, say Hello, return the fd. */
int raw_ready(void);
/* Create q with no_backoff, so failed attempts are ready again at once. */
void create_fast_retry_queue(protoq_client *c, const char *q);
/* Add a case to s with the fresh-broker fixture and timeout seconds; returns
 * it. */
TCase *tcase(Suite *s, const char *name, int timeout);

#endif
