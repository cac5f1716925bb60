/*
 * byteorder.h: little-endian integers of the on-disk format (segment and
 * META headers, record fields), in one place. Byte by byte, so alignment
 * and host order never matter; compilers turn these into plain loads and
 * stores.
 */
#ifndef PQ_BYTEORDER_H
#define PQ_BYTEORDER_H

#include <stdint.h>

static inline uint32_t
le32_get(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}

static inline uint64_t
le64_get(const uint8_t *p)
{
    return (uint64_t)le32_get(p) | (uint64_t)le32_get(p + 4) << 32;
}

static inline void
le32_put(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) {
        p[i] = (uint8_t)(v >> (8 * i));
    }
}

static inline void
le64_put(uint8_t *p, uint64_t v)
{
    le32_put(p, (uint32_t)v);
    le32_put(p + 4, (uint32_t)(v >> 32));
}

#endif
