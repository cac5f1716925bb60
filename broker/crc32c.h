/*
 * crc32c.h: CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the
 * checksum of every log record. One entry point; it picks the SSE4.2
 * instruction at run time when the CPU has it and a portable table
 * otherwise. Both give the same answers (tests compare them). Pure
 * function of its inputs, safe from any thread.
 */
#ifndef PQ_CRC32C_H
#define PQ_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/*
 * crc32c: extend crc (0 to start) over len bytes of buf and return the new
 * value. Chaining works: crc32c(crc32c(0, a, n), b, m) equals the CRC of
 * a followed by b. crc32c(0, "123456789", 9) == 0xE3069283.
 */
uint32_t crc32c(uint32_t crc, const void *buf, size_t len);

/* crc32c_sw: the portable table version (tests compare it with crc32c). */
uint32_t crc32c_sw(uint32_t crc, const void *buf, size_t len);

/* crc32c_hw: the SSE4.2 version; only call it when crc32c_hw_available(). */
uint32_t crc32c_hw(uint32_t crc, const void *buf, size_t len);

/* crc32c_hw_available: true when this CPU has the SSE4.2 crc32 instruction. */
_Bool crc32c_hw_available(void);

#endif
