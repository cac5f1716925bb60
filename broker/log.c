/* log.c: see log.h. */
#include "log.h"
#include "pqerr.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static enum log_level cur_level = LOG_INFO;
static const char *const level_names[] = {"debug", "info", "warn", "error"};

void
log_set_level(enum log_level lvl)
{
    cur_level = lvl;
}

enum log_level
log_get_level(void)
{
    return cur_level;
}

const char *
log_level_name(enum log_level lvl)
{
    return level_names[lvl];
}

int
log_parse_level(const char *s, enum log_level *out)
{
    for (int i = LOG_DEBUG; i <= LOG_ERR; i++) {
        if (strcmp(s, level_names[i]) == 0) {
            *out = (enum log_level)i;
            return PQ_OK;
        }
    }
    return PQ_EINVAL;
}

static void
log_vmsg(enum log_level lvl, const char *fmt, va_list ap)
{
    char line[2048];
    int n;

    n = snprintf(line, sizeof(line), "protoqd: %s: ", level_names[lvl]);
    n += vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
    if (n > (int)sizeof(line) - 2) {
        n = (int)sizeof(line) - 2;
    }
    line[n++] = '\n';
    if (write(STDERR_FILENO, line, (size_t)n) < 0) {
        /* nowhere left to report it */
    }
}

void
log_msg(enum log_level lvl, const char *fmt, ...)
{
    va_list ap;

    if (lvl < cur_level) {
        return;
    }
    va_start(ap, fmt);
    log_vmsg(lvl, fmt, ap);
    va_end(ap);
}

void
log_limited(struct log_limit *l, uint64_t now_ms, uint32_t per_s,
            enum log_level lvl, const char *fmt, ...)
{
    va_list ap;

    if (lvl < cur_level) {
        return;
    }
    if (now_ms - l->window_ms >= 1000) {
        l->window_ms = now_ms;
        l->lines = 0;
    }
    if (l->lines >= per_s) {
        l->suppressed++;
        return;
    }
    l->lines++;
    if (l->suppressed > 0) {
        log_msg(lvl, "(%llu similar lines left out: at most %u a second)",
                (unsigned long long)l->suppressed, per_s);
        l->suppressed = 0;
    }
    va_start(ap, fmt);
    log_vmsg(lvl, fmt, ap);
    va_end(ap);
}
