/*
 * server.h: protoqd's event loop. The server owns the event_base, the
 * listener, the signal events, the deadline and housekeeping timers, and
 * wires the two modules below it: the connection set (conn.c), which
 * reports frames up through a struct conn_handler, and the broker
 * (dispatch.c), which handles them. Calls go one way: main -> server ->
 * {conn, dispatch}, dispatch -> conn (to answer) and down to journal,
 * queue and store; nothing calls back up except through those callbacks.
 */
#ifndef PQ_SERVER_H
#define PQ_SERVER_H

#include <stdbool.h>
#include <stdint.h>

#include "clock.h"
#include "config.h"
#include "conn.h"
#include "dispatch.h"

struct event_base;
struct event;
struct evconnlistener;
struct metrics;
struct ssl_ctx_st;

/*
 * What the server owns: the loop and its events, the listener, the
 * connection set and the broker (each a module's own struct, reached
 * through that module's functions). Touched only from the loop thread; the
 * storage thread talks to the loop through the log's eventfd.
 */
struct server {
    struct config cfg;
    char conf_path[CONFIG_PATH_MAX]; /* for SIGHUP; "" when none */
    struct event_base *base;
    struct evconnlistener *listener;     /* plain protoq; NULL if off */
    struct evconnlistener *tls_listener; /* tls_listen; NULL if off */
    struct ssl_ctx_st *tls_ctx;          /* for new TLS connections;
                                            replaced on SIGHUP; main may
                                            make it before server_init */
    struct event *sig_int, *sig_term, *sig_hup;
    struct event *deadline;      /* the one timer: qset_next_deadline() */
    struct event *housekeeping;  /* 1 s: heartbeats, idle peers, summary */
    struct event *store_ev;      /* the log's eventfd is readable */
    struct event *work;          /* made active when a pass left work */
    struct event *watchdog;      /* WATCHDOG=1 to systemd; NULL if unwatched */
    uint64_t status_ms;          /* mono; last STATUS= sent */
    char status_text[64];        /* what STATUS= says protoqd does */
    uint64_t listener_paused_ms; /* mono; accepts paused after EMFILE */
    uint64_t summary_ms;         /* mono; last summary check */
    uint64_t summary_every_ms;   /* SUMMARY_MS, or $PROTOQ_SUMMARY_MS */
    uint64_t summary_activity;   /* activity_count() at the last line */
    size_t mem_peak;             /* pq_mem_used() peak since the last trim */
    bool stopping;
    uint64_t now_mono_ms;    /* read once per loop pass */
    uint16_t port;           /* the port actually bound */
    uint16_t tls_port;       /* the TLS port actually bound */
    uint16_t metrics_port;   /* the metrics port bound; 0 when off */
    bool ready;              /* recovered and accepting (/readyz) */
    struct metrics *metrics; /* the HTTP side; NULL when off */

    struct auth_table *auth; /* tokens of cfg.auth_file; NULL = none */

    struct connset cs;    /* the connections (conn.c) */
    struct broker broker; /* queues, log, protocol state (dispatch.c) */
};

/*
 * server_init: open the store (replaying the log into the queue set), bind
 * the listener, install signals and timers. On failure writes a message
 * naming what failed into err and returns a PQ_* code; server_fini then
 * releases whatever was set up.
 */
int server_init(struct server *srv, char *err, size_t errlen);

/*
 * server_load_auth: (re)load the token table from cfg.auth_file and make it
 * the broker's. At start (no table yet) and on SIGHUP; on error the old
 * table stays and err says why (PQ_EINVAL for a bad line, PQ_ESYS when
 * unreadable). PQ_OK without doing anything when auth_file is "".
 */
int server_load_auth(struct server *srv, char *err, size_t errlen);

/* server_run: the loop (see server.c); returns the exit code for main. */
int server_run(struct server *srv);

/* server_fini: close every connection, the store and the loop. */
void server_fini(struct server *srv);

#endif
