/*
 * pqlimits.h: the bounds protoq puts on what a peer may send, in one place.
 * protocol/PROTOCOL.md documents each one ("Limits"); the broker checks
 * them when a request arrives, so that whatever it confirms it can store
 * and later deliver. Lengths are bytes of the encoded field (UTF-8 for
 * strings), not characters.
 *
 * Raising a limit is compatible for the broker but not for old clients and
 * consumers that check it; lowering one can refuse what was accepted. A
 * limit that changes how big a Deliver can be (queue name, progress, the
 * dead-letter headers) also changes PQ_DELIVER_ENVELOPE_MAX in frame.c.
 */
#ifndef PQ_LIMITS_H
#define PQ_LIMITS_H

enum {
    PQ_QUEUE_NAME_MAX = 200,             /* a queue name (also dead_letter) */
    PQ_PRIORITY_MAX = 9,                 /* Message.priority is 0..9 */
    PQ_HEADERS_MAX = 1024,               /* Message.headers entries */
    PQ_HEADER_BYTES_MAX = 65536,         /* keys + values of all headers */
    PQ_TAGS_MAX = 32,                    /* Message.requires, Subscribe.tags */
    PQ_TAG_BYTES_MAX = 256,              /* a header key; a tag key or value */
    PQ_IDEMPOTENCY_KEY_MAX = 256,        /* Message.idempotency_key */
    PQ_CORRELATION_ID_MAX = 256,         /* Message.correlation_id */
    PQ_REPLY_TO_MAX = PQ_QUEUE_NAME_MAX, /* Message.reply_to (a queue) */
    PQ_SESSION_ID_MAX = 64,              /* Hello.session_id */
    PQ_NACK_ERROR_MAX = 1024,            /* Nack.error, kept as x-death-error */
    PQ_PROGRESS_MAX = 2048,         /* an encoded Progress (Touch, Release) */
    PQ_DEAD_LETTER_REASON_MAX = 16, /* x-death-reason value ("max_attempts") */
    PQ_ROUTE_NAME_MAX = PQ_QUEUE_NAME_MAX, /* a route name (queue charset) */
    PQ_ROUTING_KEY_MAX = 255,              /* Publish.routing_key */
    PQ_ROUTE_PATTERN_MAX = 255,            /* RouteBind.pattern */
    PQ_ROUTES_MAX = 1024,                  /* routes in a broker */
    PQ_ROUTE_BINDINGS_MAX = 256,           /* bindings of one route */
    PQ_BINDINGS_MAX = 4096,                /* bindings of all routes */
    PQ_JOB_LIST_DEFAULT = 100,             /* JobList.limit 0 */
    PQ_JOB_LIST_MAX = 1000,                /* JobList.limit */
};

#endif
