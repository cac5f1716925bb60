/*
 * strcheck.h: proto3 `string` fields checked on the wire. protobuf-c
 * checks neither that a string is valid UTF-8 (proto3 requires it) nor
 * that it holds no NUL, and hands strings over as C strings, so a NUL cuts
 * one short without a trace ("abc\0def" would name queue "abc"). The
 * broker refuses such a frame before it looks at it.
 */
#ifndef PQ_STRCHECK_H
#define PQ_STRCHECK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <protobuf-c/protobuf-c.h>

/* utf8_valid: s[0..len) is valid UTF-8 (no overlong forms, surrogates or
 * code points past U+10FFFF) and holds no NUL. */
bool utf8_valid(const uint8_t *s, size_t len);

/* session_id_valid: a Hello.session_id the broker takes: 1 to
 * PQ_SESSION_ID_MAX bytes of printable ASCII, no space. */
bool session_id_valid(const char *id);

/*
 * wire_strings_check: every string field of the encoded message desc in
 * buf[0..len), in nested messages too, passes utf8_valid. PQ_OK; or
 * PQ_EINVAL with the path of the first bad field in what (e.g.
 * "publish.message.headers.value"), which is also set for a buffer that
 * does not parse (decode it first: then it does). Unknown fields are
 * skipped. Nesting deeper than 32 is refused.
 */
int wire_strings_check(const ProtobufCMessageDescriptor *desc,
                       const uint8_t *buf, size_t len, char *what, size_t cap);

#endif
