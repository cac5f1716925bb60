/*
 * body.c: refcounted immutable message bodies (see body.h), and the
 * hand-written protobuf encoding of appended `headers` fields. Knows just
 * enough of the wire format for that: varints and length-delimited fields.
 */
#include "body.h"

#include <assert.h>
#include <stdbool.h>
#include <string.h>

#include "mem.h"

enum {
    TAG_MESSAGE_HEADERS = 0x12, /* Message.headers: field 2, wire type 2 */
    TAG_KV_KEY = 0x0a,          /* KeyValue.key: field 1, wire type 2 */
    TAG_KV_VALUE = 0x12         /* KeyValue.value: field 2, wire type 2 */
};

/* body_new: see body.h. */
struct body *
body_new(const void *data, size_t len)
{
    struct body *b = body_alloc(len);

    if (b != NULL && len > 0) {
        memcpy(b->data, data, len);
    }
    return b;
}

/* body_alloc: see body.h. */
struct body *
body_alloc(size_t len)
{
    struct body *b;

    if (len > UINT32_MAX) {
        return NULL;
    }
    b = pq_malloc(sizeof(*b) + len);
    if (b == NULL) {
        return NULL;
    }
    b->refs = 1;
    b->len = (uint32_t)len;
    return b;
}

/* body_ref: see body.h. */
struct body *
body_ref(struct body *b)
{
    if (b != NULL) {
        assert(b->refs > 0 && b->refs < UINT32_MAX);
        b->refs++;
    }
    return b;
}

/* body_unref: see body.h. */
void
body_unref(struct body **bp)
{
    struct body *b;

    if (bp == NULL || *bp == NULL) {
        return;
    }
    b = *bp;
    *bp = NULL; /* the caller no longer owns a reference, whatever happens */
    assert(b->refs > 0);
    if (--b->refs == 0) {
        pq_free(b);
    }
}

static size_t
varint_len(uint64_t v)
{
    size_t n = 1;

    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

static uint8_t *
put_varint(uint8_t *p, uint64_t v)
{
    while (v >= 0x80) {
        *p++ = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    *p++ = (uint8_t)v;
    return p;
}

static uint8_t *
put_bytes_field(uint8_t *p, uint8_t tag, const char *s, size_t len)
{
    *p++ = tag;
    p = put_varint(p, len);
    if (len > 0) {
        memcpy(p, s, len);
    }
    return p + len;
}

/* Encoded size of one KeyValue message's contents (without its own tag). */
static uint64_t
kv_inner_len(size_t klen, size_t vlen)
{
    return 1 + varint_len(klen) + (uint64_t)klen + 1 + varint_len(vlen) + (uint64_t)vlen;
}

/* ---- reading b's own fields, to drop the headers being replaced ---- */

static bool
get_varint(const uint8_t **pp, const uint8_t *end, uint64_t *v)
{
    const uint8_t *p = *pp;
    uint64_t x = 0;

    for (unsigned shift = 0; shift < 64 && p < end; shift += 7) {
        x |= (uint64_t)(*p & 0x7f) << shift;
        if ((*p++ & 0x80) == 0) {
            *v = x;
            *pp = p;
            return true;
        }
    }
    return false;
}

/* One field of an encoded message; for wire type 2, val/val_len is its
 * content. Advances *pp past it; false when the bytes do not parse. */
static bool
next_field(const uint8_t **pp, const uint8_t *end, uint64_t *num,
           const uint8_t **val, size_t *val_len)
{
    uint64_t key, n;

    if (!get_varint(pp, end, &key)) {
        return false;
    }
    *num = key >> 3;
    *val = NULL;
    *val_len = 0;
    switch (key & 7) {
    case 0:
        return get_varint(pp, end, &n);
    case 1:
    case 5:
        n = (key & 7) == 1 ? 8 : 4;
        break;
    case 2:
        if (!get_varint(pp, end, &n)) {
            return false;
        }
        *val = *pp;
        *val_len = (size_t)n;
        break;
    default:
        return false; /* groups: never written by protoq */
    }
    if (n > (uint64_t)(end - *pp)) {
        return false;
    }
    *pp += n;
    return true;
}

/* Is this field of a Message a header whose key is one of kv[0..n)? The
 * key is KeyValue field 1 (the last one, as a decoder reads it). */
static bool
is_replaced(uint64_t num, const uint8_t *val, size_t len, const struct kv *kv,
            size_t n)
{
    const uint8_t *p = val, *end, *key = NULL, *v;
    size_t klen = 0, vlen;
    uint64_t f;

    if (num != 2 || val == NULL) {
        return false;
    }
    end = val + len;
    while (p < end) {
        if (!next_field(&p, end, &f, &v, &vlen)) {
            return false;
        }
        if (f == 1 && v != NULL) {
            key = v;
            klen = vlen;
        }
    }
    for (size_t i = 0; i < n && key != NULL; i++) {
        const char *k = kv[i].key != NULL ? kv[i].key : "";

        if (strlen(k) == klen && memcmp(k, key, klen) == 0) {
            return true;
        }
    }
    return false;
}

/*
 * Copy the fields of b that are not headers with one of kv's keys into out
 * (NULL: only count). Returns the bytes kept, or b->len when b does not
 * parse (then everything is kept, and copied when out is given).
 */
static size_t
keep_fields(const struct body *b, const struct kv *kv, size_t n, uint8_t *out)
{
    const uint8_t *p = b->data, *end = b->data + b->len;
    size_t kept = 0;

    while (p < end) {
        const uint8_t *start = p, *val;
        size_t len;
        uint64_t num;

        if (!next_field(&p, end, &num, &val, &len)) {
            if (out != NULL) {
                memcpy(out, b->data, b->len);
            }
            return b->len;
        }
        if (!is_replaced(num, val, len, kv, n)) {
            if (out != NULL) {
                memcpy(out + kept, start, (size_t)(p - start));
            }
            kept += (size_t)(p - start);
        }
    }
    return kept;
}

/* body_with_headers: see body.h. Two passes: size, then encode. */
struct body *
body_with_headers(const struct body *b, const struct kv *kv, size_t n)
{
    uint64_t total = b != NULL ? keep_fields(b, kv, n, NULL) : 0;
    struct body *nb;
    uint8_t *p;
    size_t i;

    for (i = 0; i < n; i++) {
        size_t klen = kv[i].key != NULL ? strlen(kv[i].key) : 0;
        size_t vlen = kv[i].value != NULL ? strlen(kv[i].value) : 0;
        uint64_t inner = kv_inner_len(klen, vlen);

        total += 1 + varint_len(inner) + inner;
        if (total > UINT32_MAX) {
            return NULL;
        }
    }
    nb = pq_malloc(sizeof(*nb) + (size_t)total);
    if (nb == NULL) {
        return NULL;
    }
    nb->refs = 1;
    nb->len = (uint32_t)total;
    p = nb->data;
    if (b != NULL && b->len > 0) {
        p += keep_fields(b, kv, n, p);
    }
    for (i = 0; i < n; i++) {
        const char *k = kv[i].key != NULL ? kv[i].key : "";
        const char *v = kv[i].value != NULL ? kv[i].value : "";
        size_t klen = strlen(k);
        size_t vlen = strlen(v);

        *p++ = TAG_MESSAGE_HEADERS;
        p = put_varint(p, kv_inner_len(klen, vlen));
        p = put_bytes_field(p, TAG_KV_KEY, k, klen);
        p = put_bytes_field(p, TAG_KV_VALUE, v, vlen);
    }
    assert(p == nb->data + nb->len);
    return nb;
}
