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

#include <stddef.h>
#include <stdint.h>

/* units_parse_u64: a whole decimal number, nothing else. */
int units_parse_u64(const char *s, uint64_t *out);
int units_parse_duration_ms(const char *s, uint64_t *out);
int units_parse_bytes(const char *s, uint64_t *out);

/*
 * The ranges of the per-queue settings, shared by protoqd's config (the
 * broker-wide defaults, broker/config.c) and `protoq queue create`, so a
 * value the config refuses is refused on the command line too.
 */
#define UNITS_DAY_MS ((uint64_t)24 * 3600 * 1000)
#define UNITS_ACK_TIMEOUT_MIN_MS ((uint64_t)10)
#define UNITS_ACK_TIMEOUT_MAX_MS (30 * UNITS_DAY_MS)
#define UNITS_MAX_ATTEMPTS_MAX ((uint64_t)1000)
#define UNITS_BACKOFF_BASE_MAX_MS UNITS_DAY_MS
#define UNITS_BACKOFF_CAP_MAX_MS (7 * UNITS_DAY_MS)
#define UNITS_MAX_LEASE_MAX_MS (365 * UNITS_DAY_MS)
#define UNITS_DEDUP_WINDOW_MAX_MS (365 * UNITS_DAY_MS)
/* The longest duration the broker takes in a request (ten years). */
#define UNITS_DURATION_MAX_MS (10 * 365 * UNITS_DAY_MS)

/* units_format_duration_ms: ms in the grammar above ("0ms", "1h30m",
 * "30d"), into buf (NUL-terminated, truncated to cap). */
void units_format_duration_ms(uint64_t ms, char *buf, size_t cap);

#endif
