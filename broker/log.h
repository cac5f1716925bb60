/*
 * log.h: leveled logging to stderr, one line each:
 *
 *   2026-12-01T14:52:06.123Z protoqd: warn: ...   (RFC 3339, UTC, ms)
 *   <4>protoqd: warn: ...                         (under journald)
 *
 * Under systemd with stderr on the journal (JOURNAL_STREAM names stderr's
 * device:inode) the line starts with the sd-daemon priority prefix instead
 * (<7> debug, <6> info, <4> warn, <3> error): journald adds the time and
 * `journalctl -p warning` filters on it. The level is process-wide (set
 * from config, changed on SIGHUP). Thread-safe: each line is one write(2).
 */
#ifndef PQ_LOG_H
#define PQ_LOG_H

#include <stdbool.h>
#include <stdint.h>

enum log_level { LOG_DEBUG, LOG_INFO, LOG_WARN, LOG_ERR };

/* log_init: decide between timestamps and journald's <N> prefixes (from
 * JOURNAL_STREAM and stderr); call once at start, before any thread. */
void log_init(void);
/* log_to_journal: log_init found stderr to be the journal. */
bool log_to_journal(void);
void log_set_level(enum log_level lvl);
/* log_set_json: one JSON object a line ({"time", "level", "msg"}) instead
 * of text (log_format json); the journal's <N> prefix stays. */
void log_set_json(bool on);
enum log_level log_get_level(void);
/* log_parse_level: "debug"|"info"|"warn"|"error" -> 0, else PQ_EINVAL. */
int log_parse_level(const char *s, enum log_level *out);
const char *log_level_name(enum log_level lvl);

void log_msg(enum log_level lvl, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/*
 * A budget of lines a second for one kind of line (about misbehaving
 * connections), so that a flood of them cannot flood the log. Zeroed by
 * its owner; used from one thread.
 */
struct log_limit {
    uint64_t window_ms;  /* start of the current one-second window */
    uint32_t lines;      /* logged in that window */
    uint64_t suppressed; /* left out since the last line logged */
};

/*
 * log_limited: log_msg, unless l already logged per_s lines in the second
 * around now_ms (a monotonic clock): then the line is only counted, and the
 * next line logged says how many were left out.
 */
void log_limited(struct log_limit *l, uint64_t now_ms, uint32_t per_s,
                 enum log_level lvl, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

#define log_debug(...) log_msg(LOG_DEBUG, __VA_ARGS__)
#define log_info(...) log_msg(LOG_INFO, __VA_ARGS__)
#define log_warn(...) log_msg(LOG_WARN, __VA_ARGS__)
#define log_err(...) log_msg(LOG_ERR, __VA_ARGS__)

#endif
