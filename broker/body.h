/*
 * body.h: refcounted, immutable message content. The bytes are the encoded
 * protobuf protoq.Message exactly as published (see protocol/protoq.proto),
 * so a Deliver can embed them without re-encoding. A body is never changed
 * after body_new(); "adding headers" makes a new body (body_with_headers).
 * Single-threaded refcount: the loop thread only (the storage thread gets
 * its own copies or refs taken on the loop thread).
 */
#ifndef PQ_BODY_H
#define PQ_BODY_H

#include <stddef.h>
#include <stdint.h>

struct body {
    uint32_t refs;  /* owners; freed when it drops to 0 */
    uint32_t len;   /* bytes in data */
    uint8_t data[]; /* encoded protoq.Message */
};

/* One header (protoq.KeyValue) or one tag/requirement. Borrowed strings. */
struct kv {
    const char *key;
    const char *value;
};

/* body_new: a copy of len bytes (len < 4 GiB) with refs = 1; NULL on
 * ENOMEM or when len does not fit in uint32_t. data may be NULL if len is 0. */
struct body *body_new(const void *data, size_t len);

/* body_alloc: a body of len uninitialised bytes (refs = 1) for the caller
 * to fill before anyone else sees it; NULL on ENOMEM or len >= 4 GiB. */
struct body *body_alloc(size_t len);

/* body_ref: one more owner; returns b (NULL ok). */
struct body *body_ref(struct body *b);

/* body_unref: drop the caller's reference, free at 0, and always set *bp to
 * NULL. bp == NULL or *bp == NULL is a no-op. */
void body_unref(struct body **bp);

/* body_with_headers: a NEW body (refs = 1): b's fields, less its
 * `headers` whose key is one of kv's keys, followed by n encoded `headers`
 * fields (field 2, KeyValue{key = 1, value = 2}). Protobuf parsers append
 * repeated fields that appear again, so the result decodes as b's Message
 * with those n headers set (replaced, moved to the end): a message that is
 * dead-lettered again and again keeps one set of x-death-* headers instead
 * of growing past the frame limit. A b that does not parse as a protobuf
 * message is kept whole. b == NULL is treated as an empty Message. NULL
 * key/value encode as "". NULL on ENOMEM or if the result would exceed
 * 4 GiB. b is not changed. */
struct body *body_with_headers(const struct body *b, const struct kv *kv,
                               size_t n);

#endif
