/*
 * server.h: the broker's one struct and its event loop. struct server owns
 * everything that lives for the life of protoqd: the event_base, the
 * listener, signal events, the one deadline timer, the 1 s housekeeping
 * timer, the list of connections, the queue set, the store and the
 * confirmations waiting for the store. All of it is touched only from the
 * loop thread; the storage thread talks to the loop through the store's
 * eventfd.
 */
#ifndef PQ_SERVER_H
#define PQ_SERVER_H

#include <stdbool.h>
#include <stdint.h>

#include "clock.h"
#include "config.h"
#include "conn.h"
#include "hmap.h"

struct event_base;
struct event;
struct evconnlistener;
struct qset;
struct store;
struct queue;
struct wait;

/* Broker-wide counters (metrics, the periodic summary). */
struct server_stats {
    uint64_t batches_durable;     /* store batches reported durable */
    uint64_t disk_full_refusals;
};

struct server {
    struct config cfg;
    char conf_path[CONFIG_PATH_MAX]; /* for SIGHUP; "" when none */
    struct event_base *base;
    struct evconnlistener *listener;
    struct event *sig_int, *sig_term, *sig_hup;
    struct event *deadline;       /* the one timer: qset_next_deadline() */
    struct event *housekeeping;   /* 1 s: heartbeats, idle peers, summary */
    struct event *store_ev;       /* the store's eventfd is readable */
    struct event *work;           /* made active when a pass left work */
    int store_fd;                 /* the store's eventfd; -1 without a store */
    uint64_t listener_paused_ms;  /* mono; accepts paused after EMFILE */
    uint64_t summary_ms;          /* mono; last summary line logged */
    bool stopping;
    bool shutting_down;           /* server_fini: closing for a clean stop */
    int exit_code;                /* 0, or EX_* on a fatal store error */

    uint64_t now_mono_ms;         /* read once per loop pass */
    uint16_t port;                /* the port actually bound */

    struct qset *qs;
    struct journal *journal;      /* the log (journal.c), NULL until opened */
    uint64_t next_msg_id;         /* broker-wide, never reused (see dispatch.c) */
    uint64_t next_sub_id;

    struct connset cs;            /* the connections (conn.c) */

    struct wait *waits_head;      /* FIFO of replies waiting for durability */
    struct wait *waits_tail;

    struct queue **dirty;         /* queues that may be able to deliver */
    uint32_t ndirty, dirty_cap;
    struct hmap_u64 dirty_set;    /* membership of dirty, keyed by pointer */
    struct hmap_u64 pending_room; /* queue -> room taken by unconfirmed publishes */
    struct hmap_str pending_keys; /* "queue\x01key" -> idempotency keys whose
                                     publish is not durable yet */

    struct server_stats stats;
};


/*
 * server_init: open the store (replaying the log into the queue set), bind
 * the listener, install signals and timers. On failure writes a message
 * naming what failed into err and returns a PQ_* code; server_fini then
 * releases whatever was set up.
 */
int server_init(struct server *srv, char *err, size_t errlen);

/* server_run: the loop (see server.c); returns the exit code for main. */
int server_run(struct server *srv);

/* server_fini: close every connection, the store and the loop. */
void server_fini(struct server *srv);

/* server_mark_dirty: queue q may now deliver; handled after this pass. */
void server_mark_dirty(struct server *srv, struct queue *q);

/* server_unmark_dirty: q is going away: forget it. */
void server_unmark_dirty(struct server *srv, struct queue *q);

/* server_wake: make sure the loop runs another pass without blocking. */
void server_wake(struct server *srv);

#endif
