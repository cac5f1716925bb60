/*
 * units.c: durations and sizes (grammar in units.h).
 */
#include "units.h"

#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include "pqerr.h"

enum {
    SEC_MS = 1000,
};

/* Parse leading decimal digits at *sp; advance *sp. At least one digit. */
static int
parse_digits(const char **sp, uint64_t *out)
{
    const char *s = *sp;
    uint64_t v = 0;

    if (*s < '0' || *s > '9') {
        return PQ_EINVAL;
    }
    while (*s >= '0' && *s <= '9') {
        uint64_t d = (uint64_t)(*s - '0');

        if (v > (UINT64_MAX - d) / 10) {
            return PQ_EINVAL;
        }
        v = v * 10 + d;
        s++;
    }
    *sp = s;
    *out = v;
    return PQ_OK;
}

/* v * mult + *acc without overflow. */
static int
add_scaled(uint64_t *acc, uint64_t v, uint64_t mult)
{
    if (v > UINT64_MAX / mult || *acc > UINT64_MAX - v * mult) {
        return PQ_EINVAL;
    }
    *acc += v * mult;
    return PQ_OK;
}

int
units_parse_u64(const char *s, uint64_t *out)
{
    uint64_t v;

    if (s == NULL || parse_digits(&s, &v) != PQ_OK || *s != '\0') {
        return PQ_EINVAL;
    }
    *out = v;
    return PQ_OK;
}

int
units_parse_duration_ms(const char *s, uint64_t *out)
{
    /* Largest first; "ms" before "m" so the longer unit wins. */
    static const struct {
        const char *text;
        size_t len;
        uint64_t mult;
    } units[] = {
        {"d", 1, 86400ull * SEC_MS}, {"h", 1, 3600ull * SEC_MS}, {"ms", 2, 1},
        {"m", 1, 60ull * SEC_MS},    {"s", 1, SEC_MS},
    };
    /* Rank of each unit in the required order d > h > m > s > ms. */
    static const int rank[] = {0, 1, 4, 2, 3};
    uint64_t total = 0;
    int last = -1;

    if (s == NULL || *s == '\0') {
        return PQ_EINVAL;
    }
    while (*s != '\0') {
        uint64_t v;
        size_t i;

        if (parse_digits(&s, &v) != PQ_OK) {
            return PQ_EINVAL;
        }
        if (*s == '\0' && last < 0) {
            *out = v; /* a plain number: milliseconds */
            return PQ_OK;
        }
        for (i = 0; i < sizeof(units) / sizeof(units[0]); i++) {
            if (strncmp(s, units[i].text, units[i].len) == 0) {
                break;
            }
        }
        if (i == sizeof(units) / sizeof(units[0]) || rank[i] <= last ||
            add_scaled(&total, v, units[i].mult) != PQ_OK) {
            return PQ_EINVAL;
        }
        last = rank[i];
        s += units[i].len;
    }
    *out = total;
    return PQ_OK;
}

int
units_parse_bytes(const char *s, uint64_t *out)
{
    static const char *const tails[] = {"", "b", "ib"};
    uint64_t v, mult = 1;
    size_t i;

    if (s == NULL || parse_digits(&s, &v) != PQ_OK) {
        return PQ_EINVAL;
    }
    switch (*s) {
    case 'k':
    case 'K':
        mult = 1024;
        break;
    case 'm':
    case 'M':
        mult = 1024 * 1024;
        break;
    case 'g':
    case 'G':
        mult = 1024ull * 1024 * 1024;
        break;
    default:
        break;
    }
    if (mult != 1) {
        s++;
    }
    for (i = 0; i < sizeof(tails) / sizeof(tails[0]); i++) {
        if (strcasecmp(s, tails[i]) == 0) {
            break;
        }
    }
    /* A bare "b"/"ib" only after a suffix, except "b" for bytes. */
    if (i == sizeof(tails) / sizeof(tails[0]) || (mult == 1 && i == 2)) {
        return PQ_EINVAL;
    }
    if (v > UINT64_MAX / mult) {
        return PQ_EINVAL;
    }
    *out = v * mult;
    return PQ_OK;
}

/* units_format_duration_ms: see units.h. */
void
units_format_duration_ms(uint64_t ms, char *buf, size_t cap)
{
    static const struct {
        const char *name;
        uint64_t ms;
    } u[] = {
        {"d", 86400000}, {"h", 3600000}, {"m", 60000}, {"s", 1000}, {"ms", 1}};
    size_t used = 0;

    if (cap == 0) {
        return;
    }
    buf[0] = '\0';
    if (ms == 0) {
        snprintf(buf, cap, "0ms");
        return;
    }
    for (size_t i = 0; i < sizeof(u) / sizeof(u[0]) && used < cap; i++) {
        if (ms >= u[i].ms) {
            int n = snprintf(buf + used, cap - used, "%llu%s",
                             (unsigned long long)(ms / u[i].ms), u[i].name);

            if (n < 0) {
                return;
            }
            used += (size_t)n;
            ms %= u[i].ms;
        }
    }
}
