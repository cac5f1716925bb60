/*
 * record.h: the bodies of log records: one struct per record type, an
 * encoder that writes into a caller's buffer and a decoder that points into
 * the caller's buffer (it copies nothing, so a decoded struct is valid only
 * while the body bytes are). No I/O, no allocation, no libevent. store.c
 * frames these bodies (length, CRC, type byte); this file knows only the
 * body layout.
 *
 * BODY FORMAT (all integers fixed-width little-endian, written field by
 * field; never a C struct):
 *   u8   1 byte            u32  4 bytes LE       u64  8 bytes LE
 *   str  u32 length N, then N bytes (no NUL; may be empty; N <= body size)
 *   bytes  same as str, arbitrary content
 *
 *   type                 fields, in order
 *   1 REC_QUEUE_CREATE   name str, transient u8, max_length u64,
 *                        max_bytes u64, ack_timeout_ms u64,
 *                        max_attempts u32, dead_letter str,
 *                        backoff_base_ms u64, backoff_cap_ms u64, ttl_ms u64,
 *                        dedup_window_ms u64, max_lease_ms u64,
 *                        dead_letter_expired u8
 *   2 REC_QUEUE_DELETE   name str
 *   3 REC_QUEUE_PURGE    name str, n u32, n x id u64 (in-flight ids that
 *                        survive the purge)
 *   4 REC_PUBLISH        id u64, queue str, priority u8, attempt u32,
 *                        failures u32, published_wall_ms u64,
 *                        deliver_at_wall_ms u64 (0 = ready now),
 *                        expire_wall_ms u64 (0 = never), idem_key str,
 *                        n_requires u32, n x (key str, value str),
 *                        progress bytes, body bytes (encoded protoq.Message)
 *   5 REC_ACK            id u64
 *   6 REC_REQUEUE        id u64, attempt u32, failures u32,
 *                        deliver_at_wall_ms u64
 *   7 REC_DEAD_LETTER    id u64, target str, reason str, body bytes
 *   8 REC_DROP           id u64, reason str
 *   9 REC_PROGRESS       id u64, progress bytes
 *  10 REC_ATOMIC         inner_type u8 (5 ACK, 7 DEAD_LETTER or 8 DROP),
 *                        inner bytes (that record's body), n u32 (>= 1),
 *                        n x publish bytes (each a REC_PUBLISH body): a
 *                        job's end and the messages it causes (an ack's
 *                        result and follow-ups, a failure notice), applied
 *                        together or not at all. Replay applies the inner
 *                        record, then each publish, all at this location.
 *  13 REC_ROUTE_BIND     route str, queue str, pattern str
 *  14 REC_ROUTE_UNBIND   route str, queue str, pattern str
 *  15 REC_PUBLISH_BATCH  n u32 (>= 1), n x publish bytes (each the body
 *                        of a REC_PUBLISH): the messages of one publish
 *                        that stores several (a batch, a route's fan-out),
 *                        all or none of them as one record
 *  16 REC_DELIVER        n u32 (>= 1), n x (id u64, attempt u32): the
 *                        deliveries of one loop pass (message ids are
 *                        unique across queues), each with the attempt it
 *                        went out as. Not waited on: a delivery whose
 *                        record reached the disk is, after a crash, a
 *                        failed attempt (journal_replay.c).
 *  64 REC_SEG_START      prev_seq u32, prev_end u64: written by the store
 *                        (never by the dispatcher) as the first record of
 *                        every segment of format version 2: the segment
 *                        before it and the offset where that one's records
 *                        end (prev_seq 0: the log starts here). Recovery
 *                        checks the link and does not replay the record.
 *
 * The decoder is strict: a body that ends inside a field, a length that
 * runs past the end, a u8 flag other than 0/1, or bytes left over after
 * the last field is PQ_ECORRUPT. An unknown type is PQ_EVERSION (written
 * by a newer protoqd).
 *
 * HOW TO CHANGE THIS SAFELY: type numbers are permanent; never reuse or
 * renumber one. Never change the fields of an existing type: a record
 * needs a new layout -> give it a new type number (e.g. REC_PUBLISH2) and
 * keep decoding the old one for at least one release. Because the decoder
 * rejects trailing bytes, "append a field" is NOT compatible; it is a new
 * type. Numbers 10..63 are set aside for job-state records (RELEASE,
 * CANCEL, RESULT, LEASE/TOUCH, ROUTE_BIND, ...); 64..127 for future
 * metadata; 128..255 for experiments that must never reach a release.
 * A change to the framing around the body (store.c) is a segment format
 * version bump instead.
 */
#ifndef PQ_RECORD_H
#define PQ_RECORD_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "queue_attrs.h"

enum record_type {
    REC_QUEUE_CREATE = 1,
    REC_QUEUE_DELETE = 2,
    REC_QUEUE_PURGE = 3,
    REC_PUBLISH = 4,
    REC_ACK = 5,
    REC_REQUEUE = 6,
    REC_DEAD_LETTER = 7,
    REC_DROP = 8,
    REC_PROGRESS = 9,
    REC_ATOMIC = 10,
    /* 11..12: free */
    REC_ROUTE_BIND = 13,
    REC_ROUTE_UNBIND = 14,
    REC_PUBLISH_BATCH = 15,
    REC_DELIVER = 16,
    /* 17..63 reserved for job-state records; see the comment above. */
    REC_SEG_START = 64, /* store metadata (64..127) */
};

/* The largest body a record may have (the log refuses longer lengths as
 * corruption rather than allocating for them). */
enum { RECORD_BODY_MAX = 64 * 1024 * 1024 - 1 };

/* A string in a record body: len bytes at ptr, not NUL-terminated. */
struct rec_str {
    const char *ptr;
    uint32_t len;
};

/* Opaque bytes in a record body. */
struct rec_bytes {
    const uint8_t *ptr;
    uint32_t len;
};

/* A (key, value) requirement of a message (consumer tags must match). */
struct rec_kv {
    struct rec_str key;
    struct rec_str value;
};

/* Queue attributes as stored (0 = "use the broker default" where noted by
 * the dispatcher; the store gives them no meaning). */
struct rec_queue_create {
    struct rec_str name;
    struct queue_attrs attrs; /* no_backoff: both backoffs 0 */
};

struct rec_queue_delete {
    struct rec_str name;
};

/*
 * The ids that survive a purge. Encoding reads keep_ids (a host array of
 * n_keep ids). Decoding sets keep_ids = NULL and keep_le to the n_keep*8
 * raw little-endian bytes in the body. Use record_purge_keep_id() to read
 * either form.
 */
struct rec_queue_purge {
    struct rec_str name;
    uint32_t n_keep;
    const uint64_t *keep_ids; /* encode input */
    const uint8_t *keep_le;   /* decode output */
};

/*
 * A published message. requires: encoding reads requires[] (n_requires
 * entries); decoding sets requires = NULL and requires_raw to the encoded
 * pairs in the body. Iterate either form with record_publish_next_require().
 */
struct rec_publish {
    uint64_t id;
    struct rec_str queue;
    uint8_t priority;  /* 0..9; the store does not check */
    uint32_t attempt;  /* deliveries so far */
    uint32_t failures; /* failed attempts (release excluded) */
    uint64_t published_wall_ms;
    uint64_t deliver_at_wall_ms; /* 0 = ready now */
    uint64_t expire_wall_ms;     /* 0 = never */
    struct rec_str idem_key;     /* empty = none */
    uint32_t n_requires;
    const struct rec_kv *requires; /* encode input */
    struct rec_bytes requires_raw; /* decode output */
    struct rec_bytes progress;     /* latest progress; may be empty */
    struct rec_bytes body;         /* the encoded protoq.Message */
};

struct rec_ack {
    uint64_t id;
};

struct rec_requeue {
    uint64_t id;
    uint32_t attempt;
    uint32_t failures;
    uint64_t deliver_at_wall_ms; /* 0 = ready now */
};

struct rec_dead_letter {
    uint64_t id;
    struct rec_str target; /* dead-letter queue name */
    struct rec_str reason;
    struct rec_bytes body; /* the new body (reason in headers) */
};

struct rec_drop {
    uint64_t id;
    struct rec_str reason; /* e.g. "expired", "max_length" */
};

struct rec_progress {
    uint64_t id;
    struct rec_bytes progress;
};

/* A binding of a route (REC_ROUTE_BIND, REC_ROUTE_UNBIND). */
struct rec_route {
    struct rec_str route;
    struct rec_str queue;
    struct rec_str pattern; /* empty = every key */
};

/*
 * Several publishes in one record. Encoding reads items[0..n); decoding
 * sets items = NULL and raw to the n encoded publish bodies (each checked
 * by record_decode). Iterate either form with record_batch_next().
 */
struct rec_publish_batch {
    uint32_t n;
    const struct rec_publish *items; /* encode input */
    struct rec_bytes raw;            /* decode output */
};

/*
 * An ack, dead-letter or drop with the publishes that go with it. Encoding
 * reads inner (a record of type inner_type) and pubs[n]; decoding checks
 * the inner record and every publish strictly, sets inner = pubs = NULL,
 * inner_raw to the inner body and pubs_raw to the n length-prefixed
 * publish bodies. Decode the inner one with record_atomic_inner() and walk
 * the publishes with record_atomic_next_publish().
 */
struct rec_atomic {
    uint8_t inner_type;
    const struct record *inner;     /* encode input */
    struct rec_bytes inner_raw;     /* decode output */
    uint32_t n;                     /* publishes, >= 1 */
    const struct rec_publish *pubs; /* encode input */
    struct rec_bytes pubs_raw;      /* decode output */
};

/* One delivery of a REC_DELIVER. */
struct rec_deliver_item {
    uint64_t id;
    uint32_t attempt; /* the attempt it was delivered as (>= 1) */
};

/*
 * Deliveries. Encoding reads items[0..n); decoding sets items = NULL and
 * items_le to the n*12 raw bytes in the body. Read either form with
 * record_deliver_item().
 */
struct rec_deliver {
    uint32_t n;                           /* >= 1 */
    const struct rec_deliver_item *items; /* encode input */
    const uint8_t *items_le;              /* decode output */
};

struct rec_seg_start {
    uint32_t prev_seq; /* 0: the first segment of a new log */
    uint64_t prev_end; /* end of prev_seq's records */
};

/* One record of any type: type selects the union member. */
struct record {
    uint8_t type; /* enum record_type */
    union {
        struct rec_queue_create queue_create;
        struct rec_queue_delete queue_delete;
        struct rec_queue_purge queue_purge;
        struct rec_publish publish;
        struct rec_ack ack;
        struct rec_requeue requeue;
        struct rec_dead_letter dead_letter;
        struct rec_drop drop;
        struct rec_progress progress;
        struct rec_route route; /* ROUTE_BIND, ROUTE_UNBIND */
        struct rec_publish_batch batch;
        struct rec_atomic atomic;
        struct rec_deliver deliver;
        struct rec_seg_start seg_start;
    } u;
};

/*
 * record_encoded_size: the body size record_encode will write for r, or
 * PQ_EINVAL for an unknown type, PQ_ETOOBIG when a string/bytes field is
 * over UINT32_MAX or the total is over RECORD_BODY_MAX.
 */
ssize_t record_encoded_size(const struct record *r);

/*
 * record_encode: write r's body into buf (cap bytes). Returns the bytes
 * written; PQ_ETOOBIG when cap is too small (nothing useful written) or a
 * field is too long; PQ_EINVAL for an unknown type. The type byte is not
 * part of the body: pass r->type to store_append separately.
 */
ssize_t record_encode(const struct record *r, uint8_t *buf, size_t cap);

/*
 * record_decode: parse a body of len bytes of the given type into *out,
 * whose pointers point into body (nothing is copied or allocated).
 * PQ_OK; PQ_ECORRUPT for a short, overlong or malformed body;
 * PQ_EVERSION for a type this build does not know.
 */
int record_decode(uint8_t type, const uint8_t *body, size_t len,
                  struct record *out);

/* record_type_known: whether this build reads records of type. */
bool record_type_known(uint8_t type);

/* record_type_name: "publish", "ack", ... or "unknown" (never NULL). */
const char *record_type_name(uint8_t type);

/* record_purge_keep_id: the i-th (i < n_keep) surviving id of a purge,
 * from either the encode or the decode form. */
uint64_t record_purge_keep_id(const struct rec_queue_purge *p, uint32_t i);

/* record_deliver_item: the i-th (i < n) delivery of a REC_DELIVER, from
 * either the encode or the decode form. */
struct rec_deliver_item record_deliver_item(const struct rec_deliver *d,
                                            uint32_t i);

/*
 * record_publish_next_require: iterate a publish's requirements in either
 * form. Start with *cursor = 0; each call fills *kv and returns true, or
 * returns false after the last one.
 *     size_t cur = 0; struct rec_kv kv;
 *     while (record_publish_next_require(p, &cur, &kv)) { ... }
 */
bool record_publish_next_require(const struct rec_publish *p, size_t *cursor,
                                 struct rec_kv *kv);

/*
 * record_batch_next: iterate the publishes of a batch in either form.
 * Start with *cursor = 0; each call fills *p (pointing into the body in
 * the decode form) and returns true, or returns false after the last.
 */
bool record_batch_next(const struct rec_publish_batch *b, size_t *cursor,
                       struct rec_publish *p);

/*
 * record_atomic_inner: decode the inner record of a decoded atomic one
 * into *out (PQ_OK; it was checked by record_decode).
 */
int record_atomic_inner(const struct rec_atomic *a, struct record *out);

/*
 * record_atomic_next_publish: walk the publishes of a decoded atomic
 * record. Start with *cursor = 0; each call sets *raw to one REC_PUBLISH
 * body and *out (may be NULL) to its decoding, and returns true, or
 * returns false after the last one.
 */
bool record_atomic_next_publish(const struct rec_atomic *a, size_t *cursor,
                                struct rec_bytes *raw, struct rec_publish *out);

#endif
