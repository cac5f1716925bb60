/*
 * driver.h: what the parts of the model-based restart test share (see
 * check_model.c): one history's state (the model, the broker, the
 * connections, the generator) and the operations.
 *   driver.c   connections, deliveries, settling, observation, restarts
 *   ops.c      the operations on queues, messages and subscriptions
 */
#ifndef PQ_TEST_MODEL_DRIVER_H
#define PQ_TEST_MODEL_DRIVER_H

#include <stdbool.h>
#include <stdint.h>

#include "model.h"
#include "powerloss.h"
#include "testutil.h"

/*
 * Known bugs the generator stays away from until they are fixed. Each name
 * must go from DEFAULT_AVOID when its fix lands. Issue 8:
 *   delete-held     deleting a queue while its messages are held (item 1:
 *                   segment references released twice; 6: its dead
 *                   letters vanish on restart)
 *   keyed-requeue   a message with an idempotency key that was ever put
 *                   back (nack, release, lease expiry, unsubscribe, clean
 *                   stop, dead letter) (item 2: lost on restart)
 *   key-after-delete  an idempotency key reused after its queue was
 *                   deleted and created again (item 6)
 *   dlq-missing     dead_letter naming a missing queue, deleting a queue
 *                   others dead-letter to (item 7)
 * Found by this test:
 *   batch-over-segment  a PublishBatch bigger than segment_bytes got
 *                   DISK_FULL, which no retry can cure (store_space_check)
 */
/* Every path above is fixed: the generator avoids nothing by default. */
#define DEFAULT_AVOID ""

enum {
    AV_DELETE_HELD = 1,
    AV_KEYED_REQUEUE = 2,
    AV_KEY_AFTER_DELETE = 4,
    AV_DLQ_MISSING = 8,
    AV_BATCH_OVER_SEGMENT = 16,
};

enum { DRAIN_CONN = M_NC - 1, MAX_OBS = 4096, MAX_OPS = 400 };

struct conn {
    protoq_client *c;
    uint64_t async_errs;
    int cancels;
};

struct hist {
    struct model w;
    struct srv srv;
    struct conn c[M_NC];
    uint64_t seed;
    uint64_t rng;
    int nops, limit;
    unsigned avoid;
    int restarts;
    int power_losses;
    struct pl_result pl; /* what the power losses did */
    int64_t launch_ms;   /* time spent in srv_launch */
    int launches;
    uint32_t pubgen;
    char log[MAX_OPS][200];
    int nlog;
    bool verbose;
};

extern struct hist *g_h; /* the history running (for callbacks) */
/* The undo journal protoqd-pl writes (NULL: power loss not simulated). */
extern const char *g_pl_journal;

/* driver.c */
uint64_t rnd(struct hist *h);
uint32_t rn(struct hist *h, uint32_t n);
bool chance(struct hist *h, uint32_t pct);
void oplog(struct hist *h, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
bool failed(const struct hist *h);
int unexpected(struct hist *h, int ci, const char *what, int rc,
               const char *want);
bool remote_is(const struct hist *h, int ci, int rc, int code);
int conn_get(struct hist *h, int ci);
void conn_drop(struct hist *h, int ci);
int sleep_polling(struct hist *h, int64_t t, int skip);
int settle(struct hist *h);
int stat_queue(struct hist *h, int ci, int q, struct protoq_queue_info *qi);
int check_queue(struct hist *h, int q, bool counters, int retry_ms);
int flush_events(struct hist *h);
void drop_all_conns(struct hist *h);
int sync_pushes(struct hist *h);
int push_after_ok(struct hist *h);
int publish_sync(struct hist *h);
int sync_observed(struct hist *h);
int ack_held(struct hist *h, int si, bool resolving);
int op_restart(struct hist *h, int kind);
void on_deliver(void *arg, protoq_client *c, const struct protoq_delivery *d);
int process_obs(struct hist *h);
int poll_all(struct hist *h, int timeout_ms, int skip);

/* ops.c */
int op_create(struct hist *h, int ci, int q);
int op_delete(struct hist *h, int ci, int q);
int op_purge(struct hist *h, int ci, int q, uint64_t extra);
int op_churn(struct hist *h, int ci, int q);
int op_list(struct hist *h, int ci);
int find_key(const struct m_queue *Q, const char *key);
int op_publish(struct hist *h, int ci, int q);
int op_batch(struct hist *h, int ci, int q0);
int op_route_bind(struct hist *h, int ci, int q);
int op_route_unbind(struct hist *h, int ci);
int op_route_pub(struct hist *h, int ci);
int subscribe(struct hist *h, int ci, int q, uint32_t prefetch, uint8_t tags);
int roundtrip(struct hist *h, int ci);
int expect_async(struct hist *h, int ci, uint64_t stale_want, const char *what);
int take_jobs(struct hist *h, int ci);
int op_ack(struct hist *h);
int op_nack(struct hist *h);
int op_touch(struct hist *h, bool expire);
int op_release(struct hist *h);
int op_cancel(struct hist *h, int ci);
bool conn_holds_keyed(const struct hist *h, int ci);
int op_flow(struct hist *h);
int op_unsubscribe(struct hist *h);
int op_disconnect(struct hist *h, int ci, bool heartbeat_loss);
int op_drain(struct hist *h, int q);

#endif
