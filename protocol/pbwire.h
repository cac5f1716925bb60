/*
 * pbwire.h: the protobuf wire format by hand, for the few places that must
 * read or write encoded bytes without a full decode: the Deliver fast path
 * (frame.c), a stored message's headers (broker/body.c), a replayed
 * message's payload size (broker/journal_replay.c), the string check of
 * every frame (strcheck.c). One home for the varint.
 *
 * A field is key = number << 3 | wire type, then a varint (type 0), 8 or 4
 * bytes (types 1, 5) or a varint length and that many bytes (type 2).
 * Group wire types (3, 4) are never written by protoq and read as
 * malformed.
 */
#ifndef PQ_PBWIRE_H
#define PQ_PBWIRE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum pbwire_type {
    PBWIRE_VARINT = 0,
    PBWIRE_I64 = 1,
    PBWIRE_LEN = 2,
    PBWIRE_I32 = 5,
};

enum { PBWIRE_VARINT_MAX = 10 }; /* bytes of the largest varint */

/* One field as pbwire_next_field reads it. */
struct pbwire_field {
    uint64_t num; /* field number */
    enum pbwire_type type;
    uint64_t varint;    /* PBWIRE_VARINT: the value */
    const uint8_t *val; /* PBWIRE_LEN: the contents, else NULL */
    size_t len;         /* PBWIRE_LEN: their length */
};

/* pbwire_varint_size: bytes of v as a base-128 varint (1..10). Inline:
 * the Deliver fast path sizes every field with it. */
static inline size_t
pbwire_varint_size(uint64_t v)
{
    /* 7 bits a byte: the bits in use, rounded up to 7s (v | 1: 0 takes
     * one byte). */
    return (size_t)((64 - __builtin_clzll(v | 1)) + 6) / 7;
}

/* pbwire_put_varint: write v at p; returns bytes written. */
static inline size_t
pbwire_put_varint(uint8_t *p, uint64_t v)
{
    size_t n = 0;

    while (v >= 0x80) {
        p[n++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    p[n++] = (uint8_t)v;
    return n;
}

/* pbwire_get_varint_long: pbwire_get_varint's loop, for any length. */
bool pbwire_get_varint_long(const uint8_t **pp, const uint8_t *end,
                            uint64_t *v);

/* pbwire_get_varint: read a varint at *pp (before end) into *v and advance
 * *pp; false when it runs past end or over 10 bytes. Inline for the
 * one-byte case (keys, small lengths and flags): the string check walks
 * every field of every frame. */
static inline bool
pbwire_get_varint(const uint8_t **pp, const uint8_t *end, uint64_t *v)
{
    if (*pp < end && **pp < 0x80) {
        *v = *(*pp)++;
        return true;
    }
    return pbwire_get_varint_long(pp, end, v);
}

/* pbwire_next_field: read one field at *pp into *f and advance *pp past
 * it; false when the bytes do not parse (then *pp is unspecified). */
bool pbwire_next_field(const uint8_t **pp, const uint8_t *end,
                       struct pbwire_field *f);

#endif
