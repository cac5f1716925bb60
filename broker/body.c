/*
 * body.c: refcounted immutable message bodies (see body.h), and the
 * hand-written protobuf encoding of appended `headers` fields. Knows just
 * enough of the wire format for that: varints and length-delimited fields.
 */
#include "body.h"
#include "pbwire.h"

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

static uint8_t *
put_varint(uint8_t *p, uint64_t v)
{
    return p + pbwire_put_varint(p, v);
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
    return 1 + pbwire_varint_size(klen) + (uint64_t)klen + 1 +
           pbwire_varint_size(vlen) + (uint64_t)vlen;
}

/* ---- reading b's own fields, to drop the headers being replaced ---- */

/* Is this field of a Message a header whose key is one of kv[0..n)? The
 * key is KeyValue field 1 (the last one, as a decoder reads it). */
static bool
is_replaced(const struct pbwire_field *hf, const struct kv *kv, size_t n)
{
    const uint8_t *p = hf->val, *end, *key = NULL;
    struct pbwire_field f;
    size_t klen = 0;

    if (hf->num != 2 || hf->type != PBWIRE_LEN) {
        return false;
    }
    end = hf->val + hf->len;
    while (p < end) {
        if (!pbwire_next_field(&p, end, &f)) {
            return false;
        }
        if (f.num == 1 && f.type == PBWIRE_LEN) {
            key = f.val;
            klen = f.len;
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
        const uint8_t *start = p;
        struct pbwire_field f;

        if (!pbwire_next_field(&p, end, &f)) {
            if (out != NULL) {
                memcpy(out, b->data, b->len);
            }
            return b->len;
        }
        if (!is_replaced(&f, kv, n)) {
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

        total += 1 + pbwire_varint_size(inner) + inner;
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
