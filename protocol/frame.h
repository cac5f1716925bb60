/*
 * frame.h: the length-prefixed frame codec over plain byte buffers, shared
 * by the broker and libprotoq. A frame is a 4-byte big-endian length N
 * (1..max) followed by N bytes of a serialized protoq.Frame. Limits are
 * parameters; nothing here knows whether it runs in the broker or a client.
 */
#ifndef PQ_FRAME_H
#define PQ_FRAME_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "pqlimits.h"
#include "protoq.pb-c.h"

enum {
    FRAME_HEADER_LEN = 4,
    PROTOQ_PROTOCOL_VERSION = 1,
};

/*
 * frame_check_header: look at the first bytes of buf. Returns the body
 * length N (> 0) when a full header is present and 0 < N <= max_bytes;
 * PQ_EAGAIN when fewer than 4 bytes are there; PQ_EPROTO for N == 0;
 * PQ_ETOOBIG for N > max_bytes. Allocates nothing, so a hostile length is
 * refused before any buffer is sized for it.
 */
ssize_t frame_check_header(const uint8_t *buf, size_t len, uint32_t max_bytes);

/*
 * frame_unpack: decode one Frame body of len bytes. Every allocation the
 * decoder makes is counted against budget_bytes; past it the decode fails
 * (protobuf-c can otherwise allocate ~70x the input for empty repeated
 * sub-messages). Returns PQ_OK and *out (free with frame_free), PQ_EPROTO
 * for bytes that do not parse, PQ_ETOOBIG when the budget ran out.
 */
int frame_unpack(const uint8_t *body, size_t len, size_t budget_bytes,
                 Protoq__Frame **out);

/* frame_free: release a frame from frame_unpack; NULL is a no-op. */
void frame_free(Protoq__Frame *f);

/* frame_decode_budget: the decode budget the broker and client use for a
 * body of len bytes. */
size_t frame_decode_budget(size_t len);

/*
 * frame_packed_size: bytes frame_pack will write for f, prefix included.
 * frame_pack: write the 4-byte prefix and f into out (which has room for
 * frame_packed_size(f) bytes); returns the bytes written.
 */
size_t frame_packed_size(const Protoq__Frame *f);
size_t frame_pack(const Protoq__Frame *f, uint8_t *out);

/* The parts of a Deliver frame that are not the stored message body. */
struct frame_deliver {
    uint64_t subscription_id;
    const char *queue;
    uint64_t message_id;
    uint32_t attempt;
    uint64_t lease_ms;
    uint64_t published_at_ms;
    const uint8_t *progress; /* encoded protoq.Progress, or NULL */
    size_t progress_len;
};

/*
 * frame_deliver_size / frame_deliver_encode: a whole Deliver frame (prefix
 * included, request_id 0) whose Deliver.message is msg[0..msg_len), the
 * encoded protoq.Message as stored at publish. The message bytes are
 * spliced in as they are, never decoded and re-encoded: this is the hot
 * path of every delivery. Returns the bytes written.
 */
size_t frame_deliver_size(const struct frame_deliver *d, size_t msg_len);
size_t frame_deliver_encode(const struct frame_deliver *d, const uint8_t *msg,
                            size_t msg_len, uint8_t *out);

/*
 * frame_deliver_max_size: the largest Deliver frame (prefix included) the
 * broker may ever send for a stored Message of msg_len bytes: every varint
 * at its widest, a queue name of PQ_QUEUE_NAME_MAX bytes, PQ_PROGRESS_MAX
 * bytes of progress, and the x-death-* headers that one dead-lettering adds
 * to the message.
 */
size_t frame_deliver_max_size(size_t msg_len);

/* The limits of frame_message_check that come from the config. */
struct frame_msg_limits {
    uint32_t max_message_bytes; /* payload */
    uint32_t max_frame_bytes;   /* largest frame a peer takes, no prefix */
};

/*
 * frame_message_check: make m (from frame_unpack) fit to be stored and
 * delivered. Drops the unknown fields of m and of its headers and
 * requires: protobuf-c would re-encode them in canonical form, which is not
 * always a form it decodes again (a field 0 whose key was sent as 81 00).
 * Then checks every field against pqlimits.h and lim, and that
 * frame_deliver_max_size() of its encoding fits in lim->max_frame_bytes.
 * Returns PQ_OK with *packed_len = the size protoq__message__pack will
 * write; PQ_EINVAL (a field out of bounds) or PQ_ETOOBIG (payload over
 * max_message_bytes, or the Deliver over max_frame_bytes) with the reason
 * in why (a phrase without the queue name).
 */
int frame_message_check(Protoq__Message *m, const struct frame_msg_limits *lim,
                        size_t *packed_len, char *why, size_t whylen);

/*
 * frame_progress_check: the same for a Progress (from frame_unpack) that is
 * kept with a job and sent in its next Deliver: unknown fields dropped,
 * percent 0..100, encoding at most PQ_PROGRESS_MAX bytes. PQ_OK with
 * *packed_len, or PQ_EINVAL.
 */
int frame_progress_check(Protoq__Progress *p, size_t *packed_len);

/* ---- protobuf primitives, for splicing known-good encodings ---- */

#endif
