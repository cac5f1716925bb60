/*
 * protoq.h: the one public header of libprotoq, the C client library of the
 * protoq broker.
 *
 * Model: one protoq_client handle is one TCP connection to one protoqd. Every
 * call is blocking (bounded by the handle's I/O timeout) and uses poll(); no
 * event library is needed and the library keeps no global state. A handle is
 * single-threaded: use it from one thread at a time (one handle per thread is
 * the normal pattern).
 *
 * Errors: every int-returning call returns PQ_OK (0) or a negative PQ_* code;
 * protoq_errmsg() gives a human-readable message for the last failure on the
 * handle. When the broker answered with an Error frame the code is
 * PQ_EREMOTE, protoq_last_error_code() gives the wire code
 * (PROTOQ_CODE_QUEUE_FULL, ...) and protoq_errmsg() the broker's text. The
 * library never prints and never exits.
 *
 * Pipelining: requests carry increasing request ids and are matched to
 * replies by id, so async publishes, acks and nacks are buffered and sent in
 * batches (one write() for many frames). Callbacks (deliveries, publish
 * confirms, async errors, cancel requests) run only from inside
 * protoq_poll(), protoq_flush(), protoq_wait_confirms() or a blocking
 * request call on the same handle, never from another thread. From inside a
 * callback you may call any function on the handle except protoq_close(),
 * including blocking ones (protoq_ack_sync, protoq_publish, admin calls):
 * callbacks never nest. A blocking call made from a callback gets its own
 * reply; deliveries, confirms and other callbacks that arrive meanwhile are
 * queued (in arrival order) and run by the outermost call once the current
 * callback returns, so the stack stays one callback deep however many
 * messages flow. Consequently protoq_poll() or protoq_wait_confirms()
 * called from inside a callback run no further callbacks: do not wait
 * there for a delivery or a confirm callback.
 *
 * Liveness: while inside any call the library answers the broker's
 * heartbeat interval (Welcome.heartbeat_ms) with its own Heartbeat when it
 * has sent nothing else. The broker closes a connection that holds
 * subscriptions and stays silent for ~3 intervals, so a consumer must call
 * into the handle (protoq_poll is enough) at least that often; run long
 * jobs outside the delivery callback and protoq_touch their leases.
 * The other way round, a connection on which the broker sent nothing for
 * 3 intervals + 1 s fails with PQ_ETIMEDOUT ("no frame from the broker for
 * N ms (heartbeat M ms)"), in protoq_poll as in a blocking call (poll()
 * wakes up in time): a cut without FIN or RST is noticed in seconds, and
 * a reconnecting handle reconnects. Only a wait that finds nothing to
 * read can fail it: bytes that arrived while the program was away from
 * the handle count as received.
 *
 * After a connection failure (PQ_ECLOSED, PQ_EPROTO, PQ_ETIMEDOUT for a
 * silent broker or a write that timed out) the handle is dead: every later
 * call returns the same code, and every outstanding async publish got its
 * callback with the error. Close it and connect again, or connect with
 * protoq_opts.reconnect (see "Reconnect" below) to have the handle do
 * that itself.
 *
 * Reconnect (opt-in, protoq_opts.reconnect): when the connection is lost
 * after protoq_connect succeeded, the handle connects again (TCP, TLS,
 * Hello with the same options and token) after a delay that grows from
 * reconnect_min_ms to reconnect_max_ms with jitter, and subscribes again
 * to every subscription it held, with the same queue, tags, callback and
 * prefetch (the last protoq_flow: a paused subscription stays paused). The
 * subscription ids the caller holds stay valid (the library maps them to
 * the new connection's). What is lost, and how the caller hears of it:
 *  - The call in progress when the loss is seen fails (PQ_ECLOSED, or
 *    PQ_ETIMEDOUT when the broker went silent or a write timed out);
 *    every request sent or buffered on the old connection is failed
 *    likewise, never sent again by the library: async publishes get their
 *    confirm callback with that error, blocking ones return it. Such a
 *    publish may or may not have been stored; publishing it again is the
 *    caller's choice (at least once: give it an idempotency_key to make
 *    the retry harmless; retry after the call that reported the loss
 *    returns: a publish made from inside that confirm callback fails with
 *    PQ_ECLOSED too). Buffered acks, nacks and releases are dropped (the
 *    broker redelivers those jobs).
 *  - Deliveries of the old connection are the broker's again: it requeues
 *    them when the connection drops (a failed attempt each, as for any
 *    disconnect) and delivers them again with a new attempt number. Their
 *    old tokens are not refused locally: an ack, nack, touch or release
 *    with one is sent and the broker answers PROTOQ_CODE_STALE_DELIVERY
 *    (PQ_EREMOTE from the _sync calls and protoq_touch; the async error
 *    callback for the pipelined ones; after a kill -9 of the broker a job
 *    comes back as its next attempt too, except one handed out in the
 *    broker's last loop pass before the kill, whose delivery record had
 *    not reached the log: it comes back with the same attempt, and then
 *    the same token is current again). Deliveries that had arrived but not
 *    yet reached their callback when the loss was seen are dropped, and so
 *    are cancel requests for them.
 *  - With a session_id (below) and a broker with a disconnect grace, the
 *    reconnect resumes the session (never fresh, whatever session_fresh
 *    said for the first connection): if protoq_server_info's
 *    session_resumed is then true, the deliveries already handed to
 *    callbacks are still the caller's under their old tokens (ack, touch
 *    and so on work as before the loss); those dropped above stay leased
 *    to the session and come back when their lease ends.
 *  - protoq_poll does not fail while the handle reconnects: it waits as
 *    usual (returning 0 on timeout). Any other call made while the
 *    connection is down waits for it up to io_timeout_ms (< 0: forever),
 *    then fails with PQ_ECLOSED ("not connected"); the handle stays usable
 *    and the next call tries again.
 *  - The conn callback (protoq_set_conn_cb) hears PROTOQ_CONN_LOST,
 *    PROTOQ_CONN_RESTORED and PROTOQ_CONN_SUB_LOST (a subscription that
 *    could not be made again, e.g. its queue is gone: it is dropped), run
 *    like the other callbacks. protoq_reconnects() counts restorations.
 * A handshake the broker refuses on reconnect (UNAUTHORIZED, an other
 * protocol version) ends the reconnecting: the handle is then dead as
 * above. protoq_fd() changes across a reconnect and is -1 while down.
 */
#ifndef PROTOQ_H
#define PROTOQ_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/*
 * Library error codes (negative). This is the same enum as the tree's
 * protocol/pqerr.h, repeated here so that this header stands alone when
 * installed; the shared include guard makes the two interchangeable, and
 * client.c checks that they agree (PROTOQ_PQ_ERR_COUNT).
 */
#ifndef PQ_ERR_H
#define PQ_ERR_H
enum pq_err {
    PQ_OK = 0,
    PQ_ENOMEM = -1,     /* allocation failed */
    PQ_EAGAIN = -2,     /* need more input (not an error) */
    PQ_EPROTO = -3,     /* malformed frame or record */
    PQ_ETOOBIG = -4,    /* length over a configured limit */
    PQ_EINVAL = -5,     /* bad argument or request */
    PQ_ENOTFOUND = -6,  /* no such queue, subscription or message */
    PQ_EEXIST = -7,     /* already exists (with other attributes) */
    PQ_EFULL = -8,      /* queue max_length or max_bytes reached */
    PQ_ESTALE = -9,     /* delivery token no longer current */
    PQ_ENOSPC = -10,    /* disk full */
    PQ_EIO = -11,       /* I/O error (fsync failure is fatal) */
    PQ_ECORRUPT = -12,  /* checksum or format damage in stored data */
    PQ_ECLOSED = -13,   /* connection closed */
    PQ_ETIMEDOUT = -14, /* operation timed out */
    PQ_EVERSION = -15,  /* unsupported version */
    PQ_EBUSY = -16,     /* resource locked or overloaded */
    PQ_ESYS = -17,      /* other system call failure; see errno/message */
    PQ_EREMOTE = -18,   /* the broker answered with an Error frame */
    PQ_ERR_MIN = -18
};

/* pq_strerror: a static, human-readable name for a PQ_* code. */
const char *pq_strerror(int err);
#endif
#define PROTOQ_PQ_ERR_COUNT 19 /* PQ_OK..PQ_EREMOTE; checked in client.c */

/*
 * Wire error codes (protoq.ErrorCode in protocol/protoq.proto), as reported
 * by protoq_last_error_code() after a PQ_EREMOTE.
 */
enum protoq_code {
    PROTOQ_CODE_NONE = 0,
    PROTOQ_CODE_BAD_REQUEST = 1,
    PROTOQ_CODE_UNSUPPORTED_VERSION = 2,
    PROTOQ_CODE_FRAME_TOO_LARGE = 3,
    PROTOQ_CODE_MALFORMED_FRAME = 4,
    PROTOQ_CODE_UNKNOWN_FRAME = 5,
    PROTOQ_CODE_UNEXPECTED_FRAME = 6,
    PROTOQ_CODE_QUEUE_NOT_FOUND = 7,
    PROTOQ_CODE_QUEUE_EXISTS = 8,
    PROTOQ_CODE_QUEUE_FULL = 9,
    PROTOQ_CODE_MESSAGE_TOO_LARGE = 10,
    PROTOQ_CODE_UNAUTHORIZED = 11,
    PROTOQ_CODE_FORBIDDEN = 12,
    PROTOQ_CODE_DISK_FULL = 13,
    PROTOQ_CODE_OVERLOADED = 14,
    PROTOQ_CODE_STALE_DELIVERY = 15,
    PROTOQ_CODE_SUBSCRIPTION_NOT_FOUND = 16,
    PROTOQ_CODE_INTERNAL = 17,
    PROTOQ_CODE_UNSUPPORTED = 18,
};

/* protoq_code_name: "QUEUE_FULL" for PROTOQ_CODE_QUEUE_FULL; "UNKNOWN" for
 * a code this header does not know. Static string. */
const char *protoq_code_name(int code);

enum {
    PROTOQ_DEFAULT_PORT = 7650,
    PROTOQ_NAME_MAX = 200, /* longest queue / route name, bytes */
};

/* The opaque handle: one connection to one broker. */
typedef struct protoq_client protoq_client;

/* ------------------------------------------------------------ connecting */

/* Options for protoq_connect. All-zero (or a NULL pointer) means defaults. */
struct protoq_opts {
    const char *client_name; /* shown in broker logs; NULL = "libprotoq" */
    const char *auth_token;  /* NULL = none */
    int connect_timeout_ms;  /* TCP connect + Hello/Welcome; 0 = 5000 */
    int io_timeout_ms;       /* bound of each blocking request; 0 = 30000,
                                < 0 = wait forever */
    uint32_t heartbeat_ms;   /* heartbeat interval wished; 0 = broker's */
    /* Reconnect after a lost connection (see "Reconnect" at the top). */
    bool reconnect;
    uint32_t reconnect_min_ms; /* first delay (0 = 100); each try doubles */
    uint32_t reconnect_max_ms; /* largest delay (0 = 5000); each delay is
                                  drawn from [d/2, d] (jitter) */
    /*
     * TLS: on when tls is set or the address starts with "tls://". The
     * broker's certificate must chain to a CA in tls_ca_file (NULL: the
     * system's CA store) and name the host of the address (a DNS name or
     * an IP address in its subjectAltName), or tls_server_name when set.
     * tls_cert_file and tls_key_file (PEM) are the client certificate for
     * a broker that asks for one (tls_client_ca); tls_key_file NULL means
     * the key is in tls_cert_file. TLS 1.2 or later.
     */
    bool tls;
    const char *tls_ca_file;
    const char *tls_cert_file;
    const char *tls_key_file;
    const char *tls_server_name; /* name to verify and send as SNI */
    bool tls_no_verify_hostname; /* any name the CA signed: only for tests
                                    and private CAs that sign one broker */
    /*
     * Session (the broker's disconnect grace, README "Disconnect grace"):
     * session_id names it, 1-PROTOQ_SESSION_ID_MAX printable ASCII bytes
     * (protoq_session_id_new makes a random one); NULL = no session. A
     * connection that names a session the broker still keeps takes over
     * its deliveries (same tokens, same attempt) unless session_fresh,
     * which ends that session (its deliveries fail as at a disconnect)
     * and starts a new one. protoq_server_info says what happened.
     */
    const char *session_id;
    bool session_fresh;
};

enum { PROTOQ_SESSION_ID_MAX = 64 };

/* protoq_session_id_new: a random session id (32 hex digits, 128 bits)
 * into buf (cap >= 33). PQ_OK, PQ_EINVAL (cap too small), PQ_ESYS. */
int protoq_session_id_new(char *buf, size_t cap);

/* What the broker said in its Welcome. */
struct protoq_server_info {
    uint32_t protocol_version;
    char broker_id[64];           /* truncated if longer */
    char server_version[64];      /* truncated if longer */
    uint32_t max_frame_bytes;     /* largest frame the broker accepts */
    uint32_t max_message_bytes;   /* largest payload */
    uint32_t heartbeat_ms;        /* agreed interval; 0 = off */
    uint32_t max_batch;           /* most messages in one batch; 0 = no limit */
    bool session_resumed;         /* opts' session was kept: what it held is
                                     this handle's (same tokens) */
    uint32_t disconnect_grace_ms; /* how long the broker keeps a session's
                                     deliveries after a disconnect; 0 = no
                                     grace (sessions are not kept) */
};

/*
 * protoq_connect: connect to hostport ("127.0.0.1:7650", "[::1]:7650",
 * "localhost:7650"; the port defaults to 7650 when omitted; a "tls://"
 * prefix, or opts->tls, runs TLS over the connection) and do the
 * Hello/Welcome handshake (opts NULL = defaults). Returns PQ_OK with a
 * ready handle in *out, or a PQ_* code. Like libpq, *out is set even on
 * failure (to a dead handle, so protoq_errmsg(*out) and
 * protoq_last_error_code(*out) say why) unless memory ran out (*out NULL);
 * protoq_close(*out) in either case.
 */
int protoq_connect(const char *hostport, const struct protoq_opts *opts,
                   protoq_client **out);

/* protoq_close: close the connection (unsent output is dropped; call
 * protoq_flush or protoq_wait_confirms first) and free the handle. NULL is
 * a no-op. No callbacks run. */
void protoq_close(protoq_client *c);

/* protoq_errmsg: the message of the last failure on c ("" if none). Valid
 * until the next call on c. */
const char *protoq_errmsg(const protoq_client *c);

/* protoq_last_error_code: the wire code (enum protoq_code) of the last
 * Error frame that failed a call on c, 0 if the last failure was local;
 * except that a publish (or an ack with follow-ups) too large for the
 * broker's frame limit (from Welcome) fails locally, unsent, with
 * PQ_ETOOBIG and PROTOQ_CODE_MESSAGE_TOO_LARGE here. */
int protoq_last_error_code(const protoq_client *c);

/* protoq_server_info: copy the Welcome's contents into *out. */
void protoq_server_info(const protoq_client *c, struct protoq_server_info *out);

/* protoq_fd: the socket, for callers that poll() it with other fds (wait
 * for POLLIN, then call protoq_poll(c, 0)). Do not read or write it. With
 * TLS, bytes already read may wait decrypted inside the handle: call
 * protoq_poll(c, 0) until it returns 0 before sleeping on the fd. */
int protoq_fd(const protoq_client *c);

/* Connection events of a reconnecting handle. */
enum protoq_conn_event {
    PROTOQ_CONN_LOST = 1,     /* err: why; reconnecting */
    PROTOQ_CONN_RESTORED = 2, /* connected again, subscriptions renewed */
    PROTOQ_CONN_SUB_LOST = 3, /* sub_id could not be renewed (err; the wire
                                 code in protoq_last_error_code): dropped */
};

/* Connection event callback: event is an enum protoq_conn_event; sub_id
 * is 0 except for PROTOQ_CONN_SUB_LOST; protoq_errmsg(c) says why while it
 * runs. */
typedef void (*protoq_conn_fn)(void *arg, protoq_client *c, int event, int err,
                               uint64_t sub_id);

/* protoq_set_conn_cb: set (or clear with NULL) the conn callback. */
void protoq_set_conn_cb(protoq_client *c, protoq_conn_fn cb, void *arg);

/* protoq_reconnects: how many times the connection was restored. */
uint64_t protoq_reconnects(const protoq_client *c);

/* protoq_connected: the handle has a live connection (false while a
 * reconnecting handle is down, and once a handle is dead). */
bool protoq_connected(const protoq_client *c);

/* ----------------------------------------------------------- queue admin */

/* Queue attributes. Zero / empty means "the broker default"; in a
 * protoq_queue_info they are the effective values. */
struct protoq_queue_attrs {
    bool transient;          /* never written to the log */
    uint64_t max_length;     /* ready + delayed + in flight; 0 = unlimited */
    uint64_t max_bytes;      /* payload bytes; 0 = unlimited */
    uint64_t ack_timeout_ms; /* lease of one delivery */
    uint32_t max_attempts;   /* failed attempts before dead-lettering */
    char dead_letter[PROTOQ_NAME_MAX + 1]; /* "" = none */
    uint64_t backoff_base_ms;              /* first retry delay */
    uint64_t backoff_cap_ms;               /* largest retry delay */
    uint64_t ttl_ms;                       /* default message TTL; 0 = none */
    uint64_t dedup_window_ms;              /* idempotency keys kept this long */
    uint64_t max_lease_ms;    /* longest single touch extension; 0 = none */
    bool dead_letter_expired; /* expired messages go to dead_letter too */
    bool no_backoff;          /* retry failed attempts at once; the backoff
                                 fields are ignored (0 there means "broker
                                 default") */
};

/* A queue's attributes and counters (QueueInfo on the wire). */
struct protoq_queue_info {
    char name[PROTOQ_NAME_MAX + 1];
    struct protoq_queue_attrs attrs;
    uint64_t ready;
    uint64_t delayed;
    uint64_t inflight;
    uint64_t consumers;
    uint64_t bytes;     /* payload bytes held */
    uint64_t published; /* counters since the broker started */
    uint64_t acked;
    uint64_t nacked;
    uint64_t redelivered;
    uint64_t expired;
    uint64_t dead_lettered;
    uint64_t dropped;
};

/* protoq_queue_create: declare queue name (attrs NULL = all defaults).
 * Succeeds too when it exists with the same attributes; PQ_EREMOTE with
 * PROTOQ_CODE_QUEUE_EXISTS when it exists with others. */
int protoq_queue_create(protoq_client *c, const char *name,
                        const struct protoq_queue_attrs *attrs);

/* protoq_queue_delete: delete queue name and every message in it. */
int protoq_queue_delete(protoq_client *c, const char *name);

/* protoq_queue_purge: drop every ready and delayed message of name; the
 * number dropped goes to *purged (NULL ok). */
int protoq_queue_purge(protoq_client *c, const char *name, uint64_t *purged);

/* protoq_queue_list: every queue. On success *out is a malloc'ed array of
 * *n entries (NULL when 0), freed with protoq_queue_list_free. */
int protoq_queue_list(protoq_client *c, struct protoq_queue_info **out,
                      size_t *n);

/* protoq_queue_list_free: free an array from protoq_queue_list (NULL ok). */
void protoq_queue_list_free(struct protoq_queue_info *list, size_t n);

/* protoq_queue_stat: attributes and counters of one queue into *out. */
int protoq_queue_stat(protoq_client *c, const char *name,
                      struct protoq_queue_info *out);

/* protoq_route_bind / protoq_route_unbind: bind queue to route, matching
 * routing keys against pattern (NULL or "" = every key: an AMQP topic
 * pattern, `*` one dot-separated word, `#` zero or more). Wait for Ok
 * (durable when the queue is). Binding what is bound, or unbinding what is
 * not, succeeds and changes nothing; deleting a queue removes its
 * bindings; a route exists while it has bindings. */
int protoq_route_bind(protoq_client *c, const char *route, const char *queue,
                      const char *pattern);
int protoq_route_unbind(protoq_client *c, const char *route, const char *queue,
                        const char *pattern);

/* One binding of a route. */
struct protoq_binding {
    char route[PROTOQ_NAME_MAX + 1];
    char queue[PROTOQ_NAME_MAX + 1];
    char pattern[256]; /* "" = every key */
};

/* protoq_route_list: every binding, by route name then bind order. On
 * success *out is a malloc'ed array of *n entries (NULL when 0); free()
 * it. */
int protoq_route_list(protoq_client *c, struct protoq_binding **out, size_t *n);

/* ------------------------------------------------------------ publishing */

/* A string pair: a header, a consumer tag or a message requirement. */
struct protoq_kv {
    const char *key;
    const char *value;
};

/* A message to publish. Zero-initialise it, then set what you need; the
 * library copies everything before the publish call returns. */
struct protoq_message {
    const void *payload;
    size_t len;
    const struct protoq_kv *headers;
    size_t n_headers;
    uint32_t priority;           /* 0-9, higher first */
    uint64_t delay_ms;           /* invisible this long after publish */
    uint64_t deliver_at_ms;      /* wall clock Unix ms; overrides delay_ms */
    uint64_t ttl_ms;             /* 0 = the queue's default */
    const char *idempotency_key; /* NULL = none */
    const char *correlation_id;  /* NULL = none */
    const char *reply_to;        /* queue for the ack's result; NULL = none */
    const struct protoq_kv *requires; /* tags a consumer must have */
    size_t n_requires;
};

/* protoq_publish: publish one message to queue and wait until the broker
 * confirms it durable (PublishOk). The message id goes to *id_out (NULL
 * ok). Async publishes still outstanding are not waited for. */
int protoq_publish(protoq_client *c, const char *queue,
                   const struct protoq_message *msg, uint64_t *id_out);

/* protoq_publish_ex: protoq_publish that also reports whether the
 * idempotency key matched an earlier message (*duplicate_out; NULL ok). */
int protoq_publish_ex(protoq_client *c, const char *queue,
                      const struct protoq_message *msg, uint64_t *id_out,
                      bool *duplicate_out);

/* Publish confirmation: err is PQ_OK with the stored message_id (and
 * duplicate when an idempotency key matched), or a PQ_* code (PQ_EREMOTE:
 * the wire code is in protoq_last_error_code(c) and the text in
 * protoq_errmsg(c) while the callback runs; PQ_ECLOSED: the connection
 * died and the message may or may not be stored). */
typedef void (*protoq_confirm_fn)(void *arg, int err, uint64_t message_id,
                                  bool duplicate);

/*
 * protoq_publish_async: queue one publish for sending and return without
 * waiting for its confirmation; cb(arg, ...) runs exactly once, from inside
 * a later protoq_poll / protoq_flush / protoq_wait_confirms / blocking call
 * (or protoq_close never: closing drops pending callbacks). The frame is
 * buffered and written when the buffer fills or on the next flush/poll/wait.
 * cb may be NULL (the outcome is then only counted). Returns PQ_OK when
 * queued; PQ_EINVAL, PQ_ETOOBIG or PQ_ENOMEM when nothing was queued (cb
 * not called); or a connection error met while flushing, in which case cb
 * has already run with that error too.
 */
int protoq_publish_async(protoq_client *c, const char *queue,
                         const struct protoq_message *msg, protoq_confirm_fn cb,
                         void *arg);

/*
 * protoq_publish_batch: publish msgs[0..n) atomically in one PublishBatch
 * frame, all to queue, and wait for the confirmation. On success ids_out
 * (n entries; NULL ok) gets the ids in order. All-or-nothing: on error
 * nothing was stored.
 */
int protoq_publish_batch(protoq_client *c, const char *queue,
                         const struct protoq_message *msgs, size_t n,
                         uint64_t *ids_out);

/* protoq_publish_batch_multi: protoq_publish_batch with one queue per
 * message (queues[i] for msgs[i]), still one atomic frame. */
int protoq_publish_batch_multi(protoq_client *c, const char *const *queues,
                               const struct protoq_message *msgs, size_t n,
                               uint64_t *ids_out);

/* protoq_publish_route: publish msg through route with routing_key (NULL =
 * ""); every matching queue gets a copy, all stored in one log record (a
 * crash keeps all or none). Up to max_ids stored ids (one per matching
 * queue, in the order of their bindings) go to ids_out and their count to
 * *n_ids (both NULL ok). A route that does not exist, or whose bindings
 * match nothing, fails with PROTOQ_CODE_QUEUE_NOT_FOUND. */
int protoq_publish_route(protoq_client *c, const char *route,
                         const char *routing_key,
                         const struct protoq_message *msg, uint64_t *ids_out,
                         size_t max_ids, size_t *n_ids);

enum {
    /* protoq_publish_route_ex: matching no binding stores nothing and
     * succeeds with *n_ids 0, instead of failing. */
    PROTOQ_ROUTE_ALLOW_UNROUTED = 1u << 0,
};

/* protoq_publish_route_ex: protoq_publish_route with flags
 * (PROTOQ_ROUTE_*). */
int protoq_publish_route_ex(protoq_client *c, const char *route,
                            const char *routing_key,
                            const struct protoq_message *msg, unsigned flags,
                            uint64_t *ids_out, size_t max_ids, size_t *n_ids);

/*
 * protoq_wait_confirms: send all buffered output, then process incoming
 * frames (running callbacks) until at most max_outstanding async publishes
 * are unconfirmed, or timeout_ms passes (< 0: no limit). Returns PQ_OK,
 * PQ_ETIMEDOUT, or a connection error.
 */
int protoq_wait_confirms(protoq_client *c, size_t max_outstanding,
                         int timeout_ms);

/* protoq_outstanding: async publishes sent or buffered, not yet confirmed. */
size_t protoq_outstanding(const protoq_client *c);

/* protoq_flush: write all buffered output (running callbacks for frames
 * that arrive meanwhile). Returns PQ_OK or a connection error. */
int protoq_flush(protoq_client *c);

/* ------------------------------------------------------------- consuming */

/* Progress of a job, reported with protoq_touch / protoq_release. */
struct protoq_progress {
    uint32_t percent;       /* 0-100 */
    const char *text;       /* NULL = none */
    const char *checkpoint; /* NULL = none; e.g. a checkpoint URI */
};

/* One delivery. Every pointer is valid only while the callback runs; copy
 * what you keep. (message_id, attempt) is the delivery token. */
struct protoq_delivery {
    uint64_t subscription_id;
    const char *queue;
    uint64_t message_id;
    uint32_t attempt;         /* 1 on the first delivery */
    uint64_t lease_ms;        /* lease runs out this long after sending */
    uint64_t published_at_ms; /* wall clock, Unix ms */
    const void *payload;
    size_t len;
    const struct protoq_kv *headers;
    size_t n_headers;
    uint32_t priority;
    const char *correlation_id;      /* "" when none */
    const char *reply_to;            /* "" when none */
    const char *idempotency_key;     /* "" when none */
    bool has_progress;               /* an earlier attempt reported progress */
    struct protoq_progress progress; /* texts "" when none */
};

/* Delivery callback; c is the handle, so the callback can ack directly. */
typedef void (*protoq_deliver_fn)(void *arg, protoq_client *c,
                                  const struct protoq_delivery *d);

/*
 * protoq_subscribe: start consuming queue with a credit of prefetch unacked
 * deliveries (0 = 1) as a consumer with tags[0..n_tags) (NULL, 0 = none).
 * Deliveries run cb(arg, c, delivery) from protoq_poll and friends. The
 * subscription id goes to *sub_id (NULL ok). A handle may hold several
 * subscriptions.
 */
int protoq_subscribe(protoq_client *c, const char *queue, uint32_t prefetch,
                     const struct protoq_kv *tags, size_t n_tags,
                     protoq_deliver_fn cb, void *arg, uint64_t *sub_id);

/* protoq_unsubscribe: end subscription sub_id (waits for Ok). The broker
 * takes back its deliveries still unacked (a failed attempt each); ones
 * that arrive after this call are not passed to any callback. To stop
 * cleanly, pause with protoq_flow(c, sub_id, 0), ack or release what you
 * hold, then unsubscribe. */
int protoq_unsubscribe(protoq_client *c, uint64_t sub_id);

/* protoq_flow: change the prefetch of sub_id (waits for Ok); 0 pauses the
 * subscription (nothing more is pushed until a later flow > 0). */
int protoq_flow(protoq_client *c, uint64_t sub_id, uint32_t prefetch);

/*
 * protoq_poll: flush buffered output, then wait up to timeout_ms (0: do not
 * wait; < 0: forever) for incoming frames and handle all that are complete:
 * deliveries, publish confirms, async errors and cancel requests run their
 * callbacks; heartbeats are answered by our own while idle. Returns the
 * number of callbacks run (>= 0; 0 on timeout, or early when a signal
 * handler interrupted the wait, so a program can check its stop flag) or a
 * PQ_* error.
 */
int protoq_poll(protoq_client *c, int timeout_ms);

/* protoq_ack: acknowledge a delivery (the message is removed; a message with
 * a reply_to sends it an empty result). Buffered and pipelined: the broker
 * answers nothing on success; a failure (e.g. PROTOQ_CODE_STALE_DELIVERY)
 * arrives later and goes to the error callback and protoq_async_errors(). */
int protoq_ack(protoq_client *c, uint64_t message_id, uint32_t attempt);

/* protoq_ack_sync: acknowledge and wait until the ack is durable. */
int protoq_ack_sync(protoq_client *c, uint64_t message_id, uint32_t attempt);

/* Extra parts of an ack. The result and the follow-ups are stored in the
 * same log record as the ack (they exist exactly when it does). */
struct protoq_ack_opts {
    bool confirm;       /* wait for the durable Ok */
    const void *result; /* sent to the message's reply_to queue (dropped
                           when it has none); up to the broker's
                           max_result_bytes (default 1 MiB) */
    size_t result_len;
    const char *const *follow_up_queues;     /* one queue per follow-up */
    const struct protoq_message *follow_ups; /* published atomically with
                                                the ack */
    size_t n_follow_ups;
    uint64_t *follow_up_ids; /* with confirm: room for n_follow_ups ids,
                                filled with the follow-ups' message ids in
                                order (NULL: not wanted) */
};

/* protoq_ack_ex: acknowledge with a result and/or follow-up publishes;
 * waits for the Ok when opts->confirm, otherwise like protoq_ack. All or
 * nothing: a follow-up the broker refuses (e.g. QUEUE_NOT_FOUND,
 * QUEUE_FULL) or a result over max_result_bytes (MESSAGE_TOO_LARGE)
 * refuses the ack with that error, and the job stays held. A confirmed
 * ack returns the follow-ups' message ids (opts->follow_up_ids). */
int protoq_ack_ex(protoq_client *c, uint64_t message_id, uint32_t attempt,
                  const struct protoq_ack_opts *opts);

/* protoq_nack: fail a delivery: requeue after delay_ms (0: the queue's
 * backoff), or dead-letter it now; error_text (NULL ok) is kept in the
 * dead letter's headers. Pipelined like protoq_ack. */
int protoq_nack(protoq_client *c, uint64_t message_id, uint32_t attempt,
                uint64_t delay_ms, bool dead_letter, const char *error_text);

/* protoq_nack_sync: protoq_nack that waits until the nack is durable. */
int protoq_nack_sync(protoq_client *c, uint64_t message_id, uint32_t attempt,
                     uint64_t delay_ms, bool dead_letter,
                     const char *error_text);

/* protoq_touch: extend the lease to extend_ms from now (0: the queue's ack
 * timeout), optionally storing progress (NULL = none), and wait for the
 * answer; the new lease goes to *lease_ms (NULL ok). A stale token gives
 * PQ_EREMOTE with PROTOQ_CODE_STALE_DELIVERY. */
int protoq_touch(protoq_client *c, uint64_t message_id, uint32_t attempt,
                 uint64_t extend_ms, const struct protoq_progress *progress,
                 uint64_t *lease_ms);

/* Why a job is given back (protoq.ReleaseReason). */
enum protoq_release_reason {
    PROTOQ_RELEASE_UNSPECIFIED = 0,
    PROTOQ_RELEASE_PREEMPTED = 1,
    PROTOQ_RELEASE_SHUTDOWN = 2,
};

/* protoq_release: give a job back without counting a failed attempt,
 * keeping progress (NULL = the last reported). confirm: wait for the
 * durable Ok; otherwise pipelined like protoq_ack. */
int protoq_release(protoq_client *c, uint64_t message_id, uint32_t attempt,
                   enum protoq_release_reason reason,
                   const struct protoq_progress *progress, bool confirm);

/* ------------------------------------------------------ job visibility */

/* A job's state (JobState on the wire). */
enum protoq_job_state {
    PROTOQ_JOB_ANY = 0, /* protoq_job_list: no filter */
    PROTOQ_JOB_READY = 1,
    PROTOQ_JOB_DELAYED = 2,  /* waiting for its delay or retry */
    PROTOQ_JOB_INFLIGHT = 3, /* delivered, lease running */
    PROTOQ_JOB_DEAD = 4,     /* in the queue's dead-letter queue */
};

/* protoq_job_state_name: "ready", "delayed", "inflight", "dead" ("any"
 * for 0, "unknown" otherwise). Static string. */
const char *protoq_job_state_name(int state);

/* protoq_job_state_parse: the state called name (as above); -1 if none. */
int protoq_job_state_parse(const char *name);

/* What the broker knows of one job (JobInfo). Strings are malloc'ed (never
 * NULL after a successful call); protoq_job_fini frees them. */
struct protoq_job {
    char queue[PROTOQ_NAME_MAX + 1]; /* where it is (the DLQ when dead) */
    uint64_t id;
    int state; /* enum protoq_job_state */
    uint32_t attempt;
    uint32_t failures;
    uint32_t priority;
    struct protoq_kv *requires; /* malloc'ed pairs */
    size_t n_requires;
    bool has_holder; /* in flight: */
    char holder_name[65];
    char holder_address[65];
    uint64_t subscription_id;
    uint64_t lease_left_ms;
    bool has_progress;
    uint32_t progress_percent;
    char *progress_text;
    char *checkpoint;
    char *last_error;         /* "" = none */
    uint64_t published_at_ms; /* wall clock, Unix ms */
    uint64_t due_at_ms;       /* delayed: visible at; in flight: lease end */
    bool cancelled;
    uint32_t payload_bytes;
};

/* protoq_job_fini: free what a protoq_job holds (zeroed after). */
void protoq_job_fini(struct protoq_job *j);

/* protoq_job_get: look up job id of queue without changing it (no
 * delivery, no attempt counted). PQ_EREMOTE with
 * PROTOQ_CODE_QUEUE_NOT_FOUND when the queue or the job is not there. */
int protoq_job_get(protoq_client *c, const char *queue, uint64_t id,
                   struct protoq_job *out);

/* protoq_job_list: up to limit (0 = 100, at most 1000) jobs of queue with
 * ids above after_id, in id order, in state (PROTOQ_JOB_ANY: all;
 * PROTOQ_JOB_DEAD: the queue's dead-letter queue). *out: a malloc'ed array
 * of *n (NULL when 0), freed with protoq_job_list_free; *next_after_id
 * (NULL ok): the after_id of the next page, 0 when this was the last. */
int protoq_job_list(protoq_client *c, const char *queue, int state,
                    uint32_t limit, uint64_t after_id, struct protoq_job **out,
                    size_t *n, uint64_t *next_after_id);

/* protoq_job_list_free: free an array from protoq_job_list (NULL ok). */
void protoq_job_list_free(struct protoq_job *list, size_t n);

/* protoq_cancel: cancel job message_id of queue: a ready job is removed, a
 * job in flight gets a cancel request pushed to its holder. Waits for Ok. */
int protoq_cancel(protoq_client *c, const char *queue, uint64_t message_id);

/* Cancel request for a job this handle holds (request it stop). */
typedef void (*protoq_cancel_fn)(void *arg, protoq_client *c, const char *queue,
                                 uint64_t message_id, uint32_t attempt);

/* protoq_set_cancel_cb: set (or clear with NULL) the cancel callback. */
void protoq_set_cancel_cb(protoq_client *c, protoq_cancel_fn cb, void *arg);

/* Asynchronous error: an Error frame answering a request nobody waits for
 * (an unconfirmed ack, nack or release). request_id is the request's id;
 * code is the wire code; message the broker's text (valid during the
 * call). */
typedef void (*protoq_error_fn)(void *arg, protoq_client *c, int code,
                                const char *message, uint64_t request_id);

/* protoq_set_error_cb: set (or clear with NULL) the async error callback. */
void protoq_set_error_cb(protoq_client *c, protoq_error_fn cb, void *arg);

/* protoq_async_errors: how many asynchronous errors arrived (whether or not
 * an error callback was set). */
uint64_t protoq_async_errors(const protoq_client *c);

#ifdef __cplusplus
}
#endif

#endif
