/*
 * crc32c.c: CRC-32C, two ways. The portable path is a slicing-by-8 table
 * built once (a pthread_once, so the storage thread and the loop thread can
 * both call in first). The fast path uses the SSE4.2 crc32 instruction,
 * compiled for that target only inside one function and chosen at run time
 * with __builtin_cpu_supports, so the binary still runs on CPUs without it.
 * Both compute the same reflected CRC with the usual ~0 pre/post
 * conditioning, so crc values chain across calls.
 */
#include "crc32c.h"

#include <pthread.h>
#include <stdbool.h>
#include <string.h>

#if defined(__x86_64__)
#include <nmmintrin.h>
#endif

enum { POLY = 0x82F63B78u };

static uint32_t table[8][256];
static pthread_once_t table_once = PTHREAD_ONCE_INIT;

static void
table_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) {
            c = (c & 1) ? (c >> 1) ^ POLY : c >> 1;
        }
        table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++) {
        for (int t = 1; t < 8; t++) {
            table[t][i] =
                (table[t - 1][i] >> 8) ^ table[0][table[t - 1][i] & 0xff];
        }
    }
}

/* crc32c_sw: see crc32c.h. */
uint32_t
crc32c_sw(uint32_t crc, const void *buf, size_t len)
{
    const uint8_t *p = buf;

    pthread_once(&table_once, table_init);
    crc = ~crc;
    while (len >= 8) {
        /* Little-endian byte order assembled by hand: no alignment needs. */
        uint32_t lo = crc ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 |
                             (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
        uint32_t hi = (uint32_t)p[4] | (uint32_t)p[5] << 8 |
                      (uint32_t)p[6] << 16 | (uint32_t)p[7] << 24;
        crc = table[7][lo & 0xff] ^ table[6][(lo >> 8) & 0xff] ^
              table[5][(lo >> 16) & 0xff] ^ table[4][lo >> 24] ^
              table[3][hi & 0xff] ^ table[2][(hi >> 8) & 0xff] ^
              table[1][(hi >> 16) & 0xff] ^ table[0][hi >> 24];
        p += 8;
        len -= 8;
    }
    while (len-- > 0) {
        crc = (crc >> 8) ^ table[0][(crc ^ *p++) & 0xff];
    }
    return ~crc;
}

#if defined(__x86_64__)
/* crc32c_hw: see crc32c.h. */
__attribute__((target("sse4.2"))) uint32_t
crc32c_hw(uint32_t crc, const void *buf, size_t len)
{
    const uint8_t *p = buf;
    uint64_t c = ~crc;

    while (len > 0 && ((uintptr_t)p & 7) != 0) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
        len--;
    }
    while (len >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = _mm_crc32_u64(c, w);
        p += 8;
        len -= 8;
    }
    while (len-- > 0) {
        c = _mm_crc32_u8((uint32_t)c, *p++);
    }
    return ~(uint32_t)c;
}

/* crc32c_hw_available: see crc32c.h. */
bool
crc32c_hw_available(void)
{
    return __builtin_cpu_supports("sse4.2");
}
#else
uint32_t
crc32c_hw(uint32_t crc, const void *buf, size_t len)
{
    return crc32c_sw(crc, buf, len);
}

bool
crc32c_hw_available(void)
{
    return false;
}
#endif

/* crc32c: see crc32c.h. The CPU check is cheap (a cached flag). */
uint32_t
crc32c(uint32_t crc, const void *buf, size_t len)
{
    if (crc32c_hw_available()) {
        return crc32c_hw(crc, buf, len);
    }
    return crc32c_sw(crc, buf, len);
}
