/*
 * conn.h: one struct conn per client socket: its socket, input and output
 * buffers and events, its state, framing of input and output, backpressure,
 * and close-after-flush.
 * Decoded frames, closes and output pressure go up through the set's
 * conn_handler; conn.c knows nothing of queues, and includes nothing of the
 * broker above it.
 */
#ifndef PQ_CONN_H
#define PQ_CONN_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <event2/util.h>

#include "hmap.h"
#include "log.h"
#include "auth.h"
#include "protoq.pb-c.h"

struct config;
struct conn;
struct event_base;
struct sess;
struct sub;
struct event;
struct evbuffer;
struct sockaddr;
struct ssl_st;
struct ssl_ctx_st;

/*
 * States and their legal transitions (conn_set_state asserts them):
 *   HANDSHAKE -> READY      Hello accepted
 *   HANDSHAKE -> CLOSING    bad first frame: Error queued, reads off
 *   READY     -> CLOSING    protocol error or shutdown: Error queued
 *   any       -> CLOSED     EOF, socket error, or CLOSING output flushed;
 *                           subscriptions dropped, deliveries requeued
 * A CLOSED conn is freed after the loop pass once no wait refers to it.
 */
enum conn_state { CONN_HANDSHAKE, CONN_READY, CONN_CLOSING, CONN_CLOSED };

/*
 * What the connections report upward, so that conn.c knows nothing of the
 * protocol's meaning (the server wires these to dispatch.c): a decoded
 * frame; a connection that closed (once; its subscriptions must go); its
 * output going over (full) or back under the high-water mark.
 */
struct conn_handler {
    void (*frame)(void *arg, struct conn *c, const Protoq__Frame *f);
    void (*closed)(void *arg, struct conn *c);
    void (*output)(void *arg, struct conn *c, bool full);
};

struct conn_stats {
    uint64_t conns_accepted;
    uint64_t conns_rejected;      /* over max_connections */
    uint64_t conns_rejected_addr; /* over max_connections_per_addr */
    uint64_t handshake_evicted;   /* closed for a newer one before Hello */
    uint64_t protocol_errors;     /* connections closed for bad input */
    uint64_t frame_timeouts;      /* closed: a frame did not arrive whole */
    uint64_t idle_closed;         /* closed: idle_conn_timeout_ms */
    uint64_t mem_pauses;          /* reads paused: memory_high_bytes */
    uint64_t frames_in;
    uint64_t frames_out;
    uint64_t bytes_in;
    uint64_t bytes_out;
};

/* Connections open from one source address (the key of connset.addrs). */
struct addr_count {
    char host[64]; /* an IPv4 address or an IPv6 /64; the map key */
    uint32_t n;
};

/*
 * The set of connections: what conn.c owns for all of them. The owner (the
 * server) fills base, cfg, now_mono_ms, h and arg, and zeroes the rest.
 */
struct connset {
    struct event_base *base;
    const struct config *cfg; /* borrowed; limits read at each use */
    uint64_t *now_mono_ms;    /* the loop's clock (the owner's), which
                                 a read refreshes */
    const struct conn_handler *h;
    void *arg;          /* h's argument */
    struct conn *conns; /* doubly linked, all live connections */
    uint32_t nconns;
    struct conn *reap;  /* closed, freed after the pass */
    struct conn *flush; /* connections with output to write */
    uint64_t next_id;
    struct conn_stats stats;
    struct hmap_str addrs;  /* host -> struct addr_count, owned */
    struct conn *hs_oldest; /* HANDSHAKE connections, oldest first */
    struct conn *hs_newest;
    uint32_t nhandshake;
    uint32_t nmem_paused;    /* connections not read for memory */
    struct log_limit badlog; /* lines about misbehaving peers */
};

struct conn {
    struct connset *set;
    evutil_socket_t fd; /* -1 once CLOSED */
    struct event *rev;  /* EV_READ | EV_PERSIST, while reading */
    struct event *wev;  /* EV_WRITE, armed only when the kernel
                           buffer was full at the last flush */
    struct evbuffer *in, *out;
    struct conn *flush_next; /* set->flush list: output to write */
    bool on_flush;           /* on set->flush */
    bool reading;            /* rev added */
    bool writing;            /* wev added */
    enum conn_state state;
    uint64_t id;              /* for logs */
    char peer[64];            /* "127.0.0.1:53122" */
    char name[64];            /* Hello.client_name, sanitised */
    struct conn *prev, *next; /* set->conns, then set->reap */
    struct sub *subs;         /* this connection's subscriptions */
    struct sess *sess;        /* the session Hello named (dispatch) */
    uint32_t nsubs;
    uint32_t refs;                  /* waits that still hold this conn */
    uint32_t max_frame_bytes;       /* max_hello_bytes until Hello, then full */
    uint32_t heartbeat_ms;          /* agreed interval; 0 = off */
    uint64_t last_rx_ms;            /* mono: last frame received */
    uint64_t last_tx_ms;            /* mono: last frame queued */
    uint64_t accepted_ms;           /* mono */
    uint64_t closing_ms;            /* mono: when it became CLOSING */
    bool output_full;               /* over conn_output_high_bytes */
    bool mem_paused;                /* not read: over memory_high_bytes */
    uint8_t *resv;                  /* conn_reserve'd space, until commit */
    uint64_t frame_start_ms;        /* mono: first byte of the unfinished frame
                                       in `in`; 0 when none */
    struct addr_count *addr;        /* its source address's count */
    struct conn *hs_prev, *hs_next; /* set's HANDSHAKE list */
    /* The token given in Hello (dispatch.c); unused without auth_file. */
    const struct auth_token *auth_tok; /* in the table of auth_gen */
    uint64_t auth_gen;                 /* table generation auth_tok is from */
    char auth_name[AUTH_NAME_MAX + 1]; /* to find it in a reloaded table */
    uint8_t auth_hash[AUTH_HASH_BYTES];
    /* ---- TLS (tls_listen); all zero on the plain port ---- */
    struct ssl_st *ssl;     /* the session; NULL for plain protoq */
    bool tls_sniffed;       /* first byte checked: a TLS record */
    bool tls_ready;         /* handshake done: records carry frames */
    bool tls_flush_on_read; /* a TLS write waits for input first */
    char peer_cn[128];      /* CN of the client's verified certificate,
                               "" when none: the connection's identity
                               for authorisation */
};

/*
 * conn_accept: wrap an accepted socket; closes fd on failure. tls NULL:
 * plain protoq; otherwise the connection first runs a TLS handshake as the
 * server with its own SSL from tls (which it keeps alive), and its frames
 * travel in TLS records. A peer on a TLS port whose first byte is not a
 * TLS handshake record gets a plain Error and is closed.
 */
void conn_accept(struct connset *cs, evutil_socket_t fd,
                 const struct sockaddr *sa, int salen, struct ssl_ctx_st *tls);

const char *conn_state_name(enum conn_state s);
void conn_set_state(struct conn *c, enum conn_state s);

/* conn_is_open: may still receive frames (not CLOSING or CLOSED). */
bool conn_is_open(const struct conn *c);

/*
 * conn_send: pack f (with its length prefix) into c's output. Returns
 * PQ_OK, PQ_ECLOSED when c no longer writes, PQ_ENOMEM.
 */
int conn_send(struct conn *c, const Protoq__Frame *f);

/*
 * conn_reserve / conn_commit: room for n bytes of encoded output written
 * directly into the output buffer (the Deliver fast path). conn_reserve
 * returns NULL when c does not write or memory ran out.
 */
uint8_t *conn_reserve(struct conn *c, size_t n);
void conn_commit(struct conn *c, size_t n);

/* conn_send_error: an Error frame answering request_id. */
int conn_send_error(struct conn *c, uint64_t request_id, int code,
                    const char *fmt, ...) __attribute__((format(printf, 4, 5)));

/*
 * conn_fatal: send an Error (request_id 0 unless given) and close once it is
 * flushed; reads stop at once. Used for every framing and handshake error.
 */
void conn_fatal(struct conn *c, uint64_t request_id, int code, const char *fmt,
                ...) __attribute__((format(printf, 4, 5)));

/* conn_close: close now (EOF, error, shutdown); freed after the pass. */
void conn_close(struct conn *c, const char *why);

/* conn_output_pending: bytes are still queued for c's socket. */
bool conn_output_pending(const struct conn *c);

/* conn_unref: a wait is done with c; frees nothing itself. */
void conn_unref(struct conn *c);

/* conn_reap: free CLOSED connections that nothing refers to. */
void conn_reap(struct connset *cs);

/* conn_flush_all: write every connection's pending output (once per loop
 * pass: one writev per connection however many frames it got). */
void conn_flush_all(struct connset *cs);

/* conn_housekeeping: heartbeats out, dead and idle peers closed, frames
 * that take too long to arrive refused. */
void conn_housekeeping(struct connset *cs, uint64_t now_ms);

/* conn_resume_reads: read again from connections paused for memory once
 * usage is back under memory_high_bytes (cheap when none is paused). */
void conn_resume_reads(struct connset *cs);

/* conn_count_state: how many open connections are in state s. */
uint32_t conn_count_state(const struct connset *cs, enum conn_state s);

/* conn_set_fini: free what the set owns besides the connections (call
 * once every connection was reaped). */
void conn_set_fini(struct connset *cs);

/* conn_log_bad: a line about a misbehaving peer, at most
 * CONN_BAD_LOG_PER_S a second (the rest are counted). */
enum { CONN_BAD_LOG_PER_S = 10 };
void conn_log_bad(struct connset *cs, enum log_level lvl, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif
