/*
 * strcheck.c: see strcheck.h. Walks the protobuf wire format (a varint key
 * = number << 3 | wire type, then a varint, 8 or 4 bytes, or a varint
 * length and that many bytes) with the message's protobuf-c descriptor to
 * tell string fields and nested messages from bytes and packed numbers.
 */
#include "strcheck.h"
#include "pbwire.h"

#include <stdio.h>
#include <string.h>

#include "pqerr.h"
#include "pqlimits.h"

enum { MAX_DEPTH = 32 };

bool
utf8_valid(const uint8_t *s, size_t len)
{
    size_t i = 0;

    while (i < len) {
        uint8_t c = s[i];
        uint32_t cp, min;
        size_t need;

        if (c == 0) {
            return false;
        }
        if (c < 0x80) {
            i++;
            continue;
        }
        if ((c & 0xe0) == 0xc0) {
            need = 1, cp = c & 0x1f, min = 0x80;
        } else if ((c & 0xf0) == 0xe0) {
            need = 2, cp = c & 0x0f, min = 0x800;
        } else if ((c & 0xf8) == 0xf0) {
            need = 3, cp = c & 0x07, min = 0x10000;
        } else {
            return false; /* a continuation byte first, or 0xf8-0xff */
        }
        if (len - i - 1 < need) {
            return false;
        }
        for (size_t k = 1; k <= need; k++) {
            if ((s[i + k] & 0xc0) != 0x80) {
                return false;
            }
            cp = cp << 6 | (s[i + k] & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) {
            return false;
        }
        i += need + 1;
    }
    return true;
}

/* The field path of a failure ("message.headers.value"): the names on
 * the way down, formatted only when something is wrong (a valid frame
 * costs no string work). */
struct path {
    const char *name[MAX_DEPTH + 1];
    int depth;
};

static int
fail(const struct path *pt, const char *leaf, char *what, size_t cap)
{
    size_t at = 0;

    for (int i = 0; i < pt->depth && at < cap; i++) {
        int n = snprintf(what + at, cap - at, "%s.", pt->name[i]);

        at += n > 0 ? (size_t)n : 0;
    }
    if (at < cap) {
        snprintf(what + at, cap - at, "%s", leaf);
    }
    return PQ_EINVAL;
}

static int
check(const ProtobufCMessageDescriptor *desc, const uint8_t *p,
      const uint8_t *end, struct path *pt, char *what, size_t cap)
{
    while (p < end) {
        const ProtobufCFieldDescriptor *f;
        uint64_t key, n;

        if (!pbwire_get_varint(&p, end, &key)) {
            return fail(pt, "(malformed)", what, cap);
        }
        switch (key & 7) {
        case PBWIRE_VARINT:
            if (!pbwire_get_varint(&p, end, &n)) {
                return fail(pt, "(malformed)", what, cap);
            }
            continue;
        case PBWIRE_I64:
        case PBWIRE_I32:
            n = (key & 7) == PBWIRE_I64 ? 8 : 4;
            if ((uint64_t)(end - p) < n) {
                return fail(pt, "(malformed)", what, cap);
            }
            p += n;
            continue;
        case PBWIRE_LEN:
            break;
        default:
            return fail(pt, "(malformed)", what, cap);
        }
        if (!pbwire_get_varint(&p, end, &n) || n > (uint64_t)(end - p)) {
            return fail(pt, "(malformed)", what, cap);
        }
        f = key >> 3 <= UINT32_MAX ? protobuf_c_message_descriptor_get_field(
                                         desc, (unsigned)(key >> 3))
                                   : NULL;
        if (f != NULL && f->type == PROTOBUF_C_TYPE_STRING &&
            !utf8_valid(p, (size_t)n)) {
            return fail(pt, f->name, what, cap);
        }
        if (f != NULL && f->type == PROTOBUF_C_TYPE_MESSAGE) {
            int rc;

            if (pt->depth >= MAX_DEPTH) {
                return fail(pt, f->name, what, cap);
            }
            pt->name[pt->depth++] = f->name;
            rc = check(f->descriptor, p, p + n, pt, what, cap);
            pt->depth--;
            if (rc != PQ_OK) {
                return rc;
            }
        }
        p += n;
    }
    return PQ_OK;
}

int
wire_strings_check(const ProtobufCMessageDescriptor *desc, const uint8_t *buf,
                   size_t len, char *what, size_t cap)
{
    struct path pt; /* names[] is read only below depth: not zeroed */

    pt.depth = 0;
    if (cap > 0) {
        what[0] = '\0';
    }
    return check(desc, buf, buf + len, &pt, what, cap);
}

/* session_id_valid: see strcheck.h. */
bool
session_id_valid(const char *id)
{
    size_t n = strlen(id);

    if (n == 0 || n > PQ_SESSION_ID_MAX) {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        if (id[i] <= 0x20 || id[i] >= 0x7f) {
            return false;
        }
    }
    return true;
}
