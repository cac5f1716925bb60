/*
 * units.h: the one grammar for durations and sizes, shared by protoqd's
 * config (broker/config.c) and the protoq CLI (client/cli.c), so that
 * "--ack-timeout 1h30m" and "ack_timeout_ms 1h30m" mean the same thing.
 *
 *   duration  a plain number of milliseconds ("250"), or one or more
 *             NUMBER UNIT groups with units d, h, m, s, ms, largest first,
 *             each at most once: "500ms", "30s", "1h30m", "2d12h"
 *   size      a number of bytes with an optional suffix k, m, g (KiB, MiB,
 *             GiB; either case; "kb", "KiB", "mb", "MiB"... also accepted)
 *
 * Whole numbers only; no sign, no spaces. Both return PQ_OK, or PQ_EINVAL
 * for anything else and on overflow of uint64_t.
 */
#ifndef PQ_UNITS_H
#define PQ_UNITS_H

#include <stdint.h>

/* units_parse_u64: a whole decimal number, nothing else. */
int units_parse_u64(const char *s, uint64_t *out);
int units_parse_duration_ms(const char *s, uint64_t *out);
int units_parse_bytes(const char *s, uint64_t *out);

#endif
