/*
 * pbwire.c: varints and fields of the protobuf wire format (pbwire.h).
 */
#include "pbwire.h"

bool
pbwire_get_varint_long(const uint8_t **pp, const uint8_t *end, uint64_t *v)
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

bool
pbwire_next_field(const uint8_t **pp, const uint8_t *end,
                  struct pbwire_field *f)
{
    uint64_t key, n;

    if (!pbwire_get_varint(pp, end, &key)) {
        return false;
    }
    f->num = key >> 3;
    f->type = (enum pbwire_type)(key & 7);
    f->varint = 0;
    f->val = NULL;
    f->len = 0;
    switch (f->type) {
    case PBWIRE_VARINT:
        return pbwire_get_varint(pp, end, &f->varint);
    case PBWIRE_I64:
        n = 8;
        break;
    case PBWIRE_I32:
        n = 4;
        break;
    case PBWIRE_LEN:
        if (!pbwire_get_varint(pp, end, &n)) {
            return false;
        }
        if (n > (uint64_t)(end - *pp)) {
            return false;
        }
        f->val = *pp;
        f->len = (size_t)n;
        break;
    default:
        return false;
    }
    if (n > (uint64_t)(end - *pp)) {
        return false;
    }
    *pp += n;
    return true;
}
