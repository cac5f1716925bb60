/* log.c: see log.h. */
#include "log.h"
#include "pqerr.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static enum log_level cur_level = LOG_INFO;
static const char *const level_names[] = {"debug", "info", "warn", "error"};
/* sd-daemon(3) priorities: LOG_DEBUG 7, LOG_INFO 6, LOG_WARNING 4,
 * LOG_ERR 3. */
static const char syslog_prio[] = {'7', '6', '4', '3'};
static bool to_journal;
static bool as_json; /* log_format json */

/* log_init: see log.h. */
void
log_init(void)
{
    const char *js = getenv("JOURNAL_STREAM");
    unsigned long long dev, ino;
    struct stat st;

    to_journal = false;
    if (js == NULL || sscanf(js, "%llu:%llu", &dev, &ino) != 2 ||
        fstat(STDERR_FILENO, &st) != 0) {
        return;
    }
    /* systemd sets it for the service's own stderr; a child whose stderr
     * was redirected inherits the variable but not the stream. */
    to_journal = (unsigned long long)st.st_dev == dev &&
                 (unsigned long long)st.st_ino == ino;
}

bool
log_to_journal(void)
{
    return to_journal;
}

/* The line's prefix: "<N>" for journald, else an RFC 3339 UTC time with
 * milliseconds and a space. Returns its length. */
static int
line_prefix(char *buf, size_t cap, enum log_level lvl)
{
    struct timespec ts;
    struct tm tm;
    size_t n;

    if (to_journal) {
        return snprintf(buf, cap, "<%c>", syslog_prio[lvl]);
    }
    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    n = strftime(buf, cap, "%Y-%m-%dT%H:%M:%S", &tm);
    return (int)n +
           snprintf(buf + n, cap - n, ".%03ldZ ", ts.tv_nsec / 1000000);
}

void
log_set_level(enum log_level lvl)
{
    cur_level = lvl;
}

void
log_set_json(bool on)
{
    as_json = on;
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

/* json_line: {"time":...,"level":...,"msg":...} from msg into line (after
 * the journal's prefix, if any); returns the new length. The message is
 * escaped as a JSON string; a byte over 0x7f goes through as it is. */
static int
json_line(char *line, size_t cap, int n, enum log_level lvl, const char *msg)
{
    static const char hex[] = "0123456789abcdef";
    struct timespec ts;
    struct tm tm;
    size_t at;

    clock_gettime(CLOCK_REALTIME, &ts);
    gmtime_r(&ts.tv_sec, &tm);
    at = (size_t)n;
    at += strftime(line + at, cap - at, "{\"time\":\"%Y-%m-%dT%H:%M:%S", &tm);
    at += (size_t)snprintf(line + at, cap - at,
                           ".%03ldZ\",\"level\":\"%s\",\"msg\":\"",
                           ts.tv_nsec / 1000000, level_names[lvl]);
    for (const char *s = msg; *s != '\0' && at + 8 < cap; s++) {
        unsigned char ch = (unsigned char)*s;

        if (ch == '"' || ch == '\\') {
            line[at++] = '\\';
            line[at++] = (char)ch;
        } else if (ch < 0x20) {
            line[at++] = '\\';
            line[at++] = 'u';
            line[at++] = '0';
            line[at++] = '0';
            line[at++] = hex[ch >> 4];
            line[at++] = hex[ch & 15];
        } else {
            line[at++] = (char)ch;
        }
    }
    line[at++] = '"';
    line[at++] = '}';
    return (int)at;
}

static void
log_vmsg(enum log_level lvl, const char *fmt, va_list ap)
{
    char line[4096], msg[2048];
    int n;

    if (as_json) {
        vsnprintf(msg, sizeof(msg), fmt, ap);
        n = to_journal ? snprintf(line, 8, "<%c>", syslog_prio[lvl]) : 0;
        n = json_line(line, sizeof(line) - 1, n, lvl, msg);
    } else {
        n = line_prefix(line, 64, lvl);
        n += snprintf(line + n, sizeof(line) - (size_t)n,
                      "protoqd: %s: ", level_names[lvl]);
        n += vsnprintf(line + n, sizeof(line) - (size_t)n - 1, fmt, ap);
        if (n > (int)sizeof(line) - 2) {
            n = (int)sizeof(line) - 2;
        }
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
