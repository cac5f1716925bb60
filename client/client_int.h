/*
 * client_int.h: libprotoq's private header, shared by its four files and
 * never installed:
 *
 *   client.c          the connection: buffers, the pending-request ring,
 *                     reading and dispatching frames, heartbeats, connect
 *                     and handshake, blocking request/reply
 *   client_admin.c    queue and route administration
 *   client_pub.c      packing messages, publishing (sync, async, batches)
 *   client_consume.c  subscriptions, flow, ack/nack/touch/release, cancel
 *   client_tls.c      TLS: the handshake and record I/O on the socket
 *   client_reconnect.c  opt-in reconnect: backoff, connecting again,
 *                     subscribing again, connection events
 *
 * Only client.c (and client_tls.c below it) touches the socket and the buffers;
 * the others build a Frame and hand it to client_request* / client_send_*.
 * Functions here take the client_ prefix; everything else stays static in its
 * file.
 */
#ifndef PQ_CLIENT_INT_H
#define PQ_CLIENT_INT_H

struct ssl_st;
struct ssl_ctx_st;

/* pqerr.h before protoq.h: the real enum wins and client.c holds protoq.h's
 * standalone copy to it. */
#include "backoff.h"
#include "frame.h"
#include "pqerr.h"
#include "protoq.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

_Static_assert(PROTOQ_PQ_ERR_COUNT == 1 - PQ_ERR_MIN,
               "client/protoq.h's copy of enum pq_err is out of date");

enum {
    IN_INITIAL = 256 * 1024,      /* input buffer, grown for large frames */
    IN_READ_MIN = 64 * 1024,      /* compact when less room than this */
    OUT_FLUSH_BYTES = 128 * 1024, /* auto-flush threshold of async output */
    PRE_WELCOME_MAX = 16 * 1024,  /* frame limit until the Welcome */
    PEND_INITIAL = 1024,          /* ring slots (power of two) */
    PEND_EVICT_AT = 1 << 16,      /* past this, drop abandoned entries */
    KV_STACK = 16,                /* key/values converted without malloc */
    DEFAULT_CONNECT_MS = 5000,
    DEFAULT_IO_MS = 30000,
    /* A broker that sent nothing for SILENT_BEATS heartbeat intervals +
     * SILENT_SLACK_MS is gone (the broker sends a Heartbeat whenever it
     * sent nothing for an interval, checked each second: hence the
     * slack). The Python client uses the same rule. */
    SILENT_BEATS = 3,
    SILENT_SLACK_MS = 1000,
};

enum pend_kind {
    PEND_FREE = 0,
    PEND_SYNC,    /* a blocking call waits on it (w) */
    PEND_CONFIRM, /* async publish: cb(arg, ...) */
    PEND_IGNORE,  /* its caller gave up; drop the reply */
};

/* A blocking call's wait state; lives on that call's stack. */
struct waiter {
    bool done;
    int err;                  /* PQ_* when the connection failed */
    Protoq__Frame *reply;     /* owned by the waiter once done */
    protoq_deliver_fn sub_cb; /* subscribe: registered on SubscribeOk */
    void *sub_arg;
    uint64_t resub_id; /* reconnect: SubscribeOk renews this sub's wire id */
};

/* One outstanding request that expects a reply. */
struct pending {
    uint64_t id; /* request_id; 0 = free slot */
    enum pend_kind kind;
    struct waiter *w;     /* PEND_SYNC */
    protoq_confirm_fn cb; /* PEND_CONFIRM */
    void *arg;
};

/* A frame whose user callback waits for the outermost dispatch (see
 * client.c: callbacks never nest). conf: the ring entry of an async
 * publish's confirm (kind PEND_CONFIRM), else kind PEND_FREE. f NULL: a
 * connection event (enum protoq_conn_event) for the conn callback. */
struct deferred {
    Protoq__Frame *f;
    struct pending conf;
    int event, err, code; /* code: the wire code of a SUB_LOST */
    uint64_t sub_id;
    char *msg; /* an event's text (malloc'ed; NULL ok) */
};

/* A subscription. id is what the caller was given (the broker's id of the
 * first Subscribe); wire_id the broker's id on the current connection (the
 * same until a reconnect; 0 while disconnected). queue, tags and prefetch
 * are kept on reconnecting handles only, to subscribe again. */
struct sub {
    uint64_t id;
    uint64_t wire_id;
    protoq_deliver_fn cb;
    void *arg;
    char *queue;            /* malloc'ed; with the tags' strings after it */
    struct protoq_kv *tags; /* malloc'ed */
    size_t n_tags;
    uint32_t prefetch; /* the last Subscribe or non-zero Flow */
    bool paused;       /* the last Flow was 0 */
};

struct protoq_client {
    int fd;                     /* -1 when never connected */
    struct ssl_ctx_st *tls_ctx; /* TLS (tls://): the context and */
    struct ssl_st *ssl;         /* the session; NULL for plain TCP */
    bool tls_want_write;        /* a TLS read waits for POLLOUT */
    int dead;                   /* PQ_* once unusable, else 0 */
    char dead_msg[512];         /* why it died */
    uint64_t next_id;           /* next request_id (starts at 1) */
    int io_timeout_ms;          /* < 0: forever */
    struct protoq_server_info info;
    uint32_t in_limit; /* largest frame body we accept */

    uint8_t *out; /* pending output: out[out_start..out_len) */
    size_t out_start, out_len, out_cap;
    uint8_t *in; /* unparsed input: in[in_start..in_end) */
    size_t in_start, in_end, in_cap;

    struct pending *pend; /* ring of pend_cap slots */
    size_t pend_cap;
    size_t n_pending;  /* used slots */
    size_t n_confirms; /* PEND_CONFIRM among them */

    struct sub *subs;
    size_t n_subs, subs_cap;
    uint64_t dropped_deliveries; /* for no (longer) known subscription */

    struct deferred *dq; /* FIFO of callbacks to run, in arrival order */
    size_t dq_head, dq_len, dq_cap; /* ring: dq[(dq_head + i) % dq_cap] */
    int cb_depth;                   /* > 0 while a user callback runs */
    bool interrupted;               /* a signal interrupted poll() */

    protoq_cancel_fn cancel_cb;
    void *cancel_arg;
    protoq_error_fn error_cb;
    void *error_arg;
    uint64_t async_errors;

    /* Opt-in reconnect (protoq_opts.reconnect): what to connect with again
     * (deep copies), and the state of an outage. */
    bool can_reconnect; /* reconnect set and the first connect worked */
    bool down;          /* dead, but reconnecting (dead is set too) */
    bool in_reconnect;  /* reconnect_once runs */
    char *r_hostport;
    struct protoq_opts r_opts;
    struct backoff backoff;
    int64_t retry_at_ms; /* monotonic: next reconnect attempt */
    uint64_t reconnects; /* connections restored */
    protoq_conn_fn conn_cb;
    void *conn_arg;

    int64_t last_send_ms;  /* monotonic; for heartbeats */
    int64_t last_recv_ms;  /* monotonic: the last byte from the broker */
    int64_t silent_max_ms; /* broker silence that fails the connection
                              (3 heartbeats + 1 s); 0 = not watched */
    int last_code;         /* wire code of the last remote error */
    char errmsg[512];
};

/*
 * Wire storage for messages being packed: the Message structs, their
 * KeyValue structs and pointer arrays. Small publishes use the inline
 * arrays; larger ones one malloc. Everything points into the caller's
 * strings, which outlive the pack.
 */
struct msgbuf {
    Protoq__Publish pub_inline[1];
    Protoq__Publish *pubp_inline[1];
    Protoq__Message msg_inline[1];
    Protoq__KeyValue kv_inline[KV_STACK];
    Protoq__KeyValue *kvp_inline[KV_STACK];
    Protoq__Publish *pub;
    Protoq__Publish **pubp;
    Protoq__Message *msg;
    Protoq__KeyValue *kv;
    Protoq__KeyValue **kvp;
    void *heap; /* the one allocation, or NULL */
};

/* protobuf-c wants char * for strings it only reads. */
static inline char *
S(const char *s)
{
    return (char *)(s ? s : "");
}

/* ---- client.c: helpers ---- */

/* Remaining ms until deadline (-1 = none), never below 0. */
int client_remaining_ms(int64_t deadline);
/* A deadline timeout_ms from now (-1 for timeout_ms < 0: none). */
int64_t client_deadline_after(int timeout_ms);
/* Record a local failure: code err, message fmt. Returns err. */
__attribute__((format(printf, 3, 4))) int
client_set_err(protoq_client *c, int err, const char *fmt, ...);
/* Mark the connection lost with err and a message and fail everything
 * outstanding (a reconnecting handle then reconnects). Returns err. */
__attribute__((format(printf, 3, 4))) int
client_conn_fail(protoq_client *c, int err, const char *fmt, ...);
/* The failure to report when c is dead. */
int client_dead_err(protoq_client *c);
void client_copy_str(char *dst, size_t cap, const char *src);
/* A queue or route name the broker can accept (else PQ_EINVAL recorded). */
bool client_name_ok(protoq_client *c, const char *what, const char *name);

/* ---- client.c: subscriptions and reconnect ---- */

/* The subscription the caller knows as id (NULL if none). */
struct sub *client_sub_find(protoq_client *c, uint64_t id);
/* Keep what a reconnect needs to subscribe sub id again (reconnecting
 * handles only; a no-op otherwise). PQ_OK or PQ_ENOMEM. */
int client_sub_remember(protoq_client *c, uint64_t id, const char *queue,
                        uint32_t prefetch, const struct protoq_kv *tags,
                        size_t n_tags);
/* Forget subscription id (nothing sent). */
void client_sub_forget(protoq_client *c, uint64_t id);
/* Queue a connection event (enum protoq_conn_event) for the conn
 * callback. 0 or PQ_ENOMEM (the event is dropped). */
int client_defer_event(protoq_client *c, int event, int err, uint64_t sub_id);

/* ---- client_connect.c ---- */

/* Connect to hostport and handshake (the first connection and every
 * reconnect); on failure c is dead with the reason. */
int client_conn_open(protoq_client *c, const char *hostport,
                     const struct protoq_opts *opts);

/* ---- client_reconnect.c ---- */

/* Turn reconnect on for c, connected to hostport with opts (copied).
 * PQ_OK, or PQ_ENOMEM recorded (c stays connected, without reconnect). */
int client_reconnect_init(protoq_client *c, const char *hostport,
                          const struct protoq_opts *opts);
/* Free the copies (protoq_close). */
void client_reconnect_fini(protoq_client *c);
/* A handle whose connection is down and reconnecting: try to connect
 * again (when the backoff allows) until connected or deadline (-1: none).
 * PQ_OK when connected; PQ_ECLOSED while still down (deadline, or a
 * signal: c->interrupted); the dead handle's error once it gave up. Not
 * down: PQ_OK when live, the dead handle's error otherwise. */
int client_revive_until(protoq_client *c, int64_t deadline);
/* client_revive_until bounded by the I/O timeout (blocking calls). */
int client_revive(protoq_client *c);

/* ---- client_consume.c ---- */

/* Send a Subscribe and wait for its SubscribeOk (w: the subscribe hooks);
 * the broker's id goes to *wire_id. */
int client_subscribe_wire(protoq_client *c, const char *queue,
                          uint32_t prefetch, bool paused,
                          const struct protoq_kv *tags, size_t n_tags,
                          struct waiter *w, uint64_t *wire_id);

/* ---- client.c: the pending-request ring ---- */

struct pending *client_pend_find(protoq_client *c, uint64_t id);
void client_pend_remove(protoq_client *c, struct pending *p);
/* Insert an entry for id; returns it, or NULL when out of memory. */
struct pending *client_pend_insert(protoq_client *c, uint64_t id,
                                   enum pend_kind kind);

/* ---- client.c: I/O and requests ---- */

/* One round of I/O (see client.c); callbacks run or a PQ_* error. */
int client_pump(protoq_client *c, int timeout_ms, bool dispatch);

/* ---- TLS (client_tls.c) ---- */

/*
 * client_tls_connect: TLS handshake on c->fd as the client, verifying the
 * broker's certificate against o->tls_ca_file (else the system's CAs) and,
 * unless o->tls_no_verify_hostname, its name against o->tls_server_name or
 * host; presents o->tls_cert_file/o->tls_key_file when given. Bounded by
 * deadline. PQ_OK with c->ssl and c->tls_ctx set, or PQ_EINVAL (a file),
 * PQ_EPROTO (handshake or certificate), PQ_ECLOSED, PQ_ETIMEDOUT,
 * PQ_ENOMEM with the reason in msg.
 */
int client_tls_connect(protoq_client *c, const char *host,
                       const struct protoq_opts *o, int64_t deadline, char *msg,
                       size_t msglen);

/* client_tls_write / client_tls_read: like send()/recv() on c->ssl:
 * bytes moved (> 0), 0 when the socket is not ready (tls_want_write says
 * whether a read waits for POLLOUT), or PQ_ECLOSED/PQ_EPROTO with the
 * reason in msg. SIGPIPE is kept from the process during a write. */
ssize_t client_tls_write(protoq_client *c, const void *buf, size_t len,
                         char *msg, size_t msglen);
ssize_t client_tls_read(protoq_client *c, void *buf, size_t len, char *msg,
                        size_t msglen);

/* client_tls_pending: decrypted input waits inside the SSL (poll() would
 * not report it). */
bool client_tls_pending(const protoq_client *c);

/* client_tls_free: close_notify (best effort) and free the session and
 * context; NULL-safe. */
void client_tls_free(protoq_client *c);
/* Write all pending output, bounded by the I/O timeout. */
int client_flush_all(protoq_client *c, bool dispatch);
/* Pack f (request_id set) into the output buffer; PQ_ETOOBIG when over the
 * broker's frame limit (nothing queued). */
int client_send_frame(protoq_client *c, Protoq__Frame *f);
/* Send f and wait for its reply of kind want (*reply: free with
 * frame_free); an Error reply gives PQ_EREMOTE. w may carry a subscribe
 * hook. client_request: the same without one. */
int client_request_w(protoq_client *c, Protoq__Frame *f,
                     Protoq__Frame__KindCase want, Protoq__Frame **reply,
                     struct waiter *w);
int client_request(protoq_client *c, Protoq__Frame *f,
                   Protoq__Frame__KindCase want, Protoq__Frame **reply);
/* Send f, wait for an Ok, and free it; *count gets Ok.count (NULL ok). */
int client_request_ok(protoq_client *c, Protoq__Frame *f, uint64_t *count);
/* A request that gets no reply on success (an id, no ring slot). */
int client_send_noreply(protoq_client *c, Protoq__Frame *f);

/* ---- client_pub.c: packing messages (also for follow-ups) ---- */

int client_msgbuf_init(struct msgbuf *b, const struct protoq_message *msgs,
                       size_t n);
void client_msgbuf_fini(struct msgbuf *b);
/* Fill kvs/ptrs from n pairs; returns the pointer array (NULL if n is 0). */
Protoq__KeyValue **client_kv_to_wire(Protoq__KeyValue *kvs,
                                     Protoq__KeyValue **ptrs,
                                     const struct protoq_kv *src, size_t n);
/* Fill b->msg[i] and b->pub[i] from m; *kvi is the next free kv slot. */
void client_msg_to_wire(struct msgbuf *b, size_t i, size_t *kvi,
                        const char *queue, const struct protoq_message *m);
/* m is well-formed (else PQ_EINVAL recorded). */
bool client_msg_ok(protoq_client *c, const struct protoq_message *m);

#endif
