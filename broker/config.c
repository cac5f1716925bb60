/*
 * config.c: the settings of protoqd. One table (keys[] below) names every
 * key with its type, its field in struct config, its range and whether
 * SIGHUP may change it; config_set, config_get, config_dump, config_validate
 * and config_reload_file all walk that table, so adding a setting means one
 * field in config.h, one default in config_defaults, one row here and one
 * paragraph in conf/protoqd.conf (a unit test checks the last one).
 * No I/O besides reading the conf file and config_dump's write; no logging
 * (callers log, with the context they have); no allocation.
 */
#include "config.h"
#include "pqerr.h"
#include "units.h"

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

enum { KIB = 1024, MIB = 1024 * 1024 };
#define GIB ((uint64_t)1 << 30)
#define TIB ((uint64_t)1 << 40)
#define SEC_MS ((uint64_t)1000)
#define HOUR_MS ((uint64_t)3600 * 1000)
#define DAY_MS ((uint64_t)24 * 3600 * 1000)

/* Headroom a frame needs above its largest payload (ids, headers, batch). */
enum { FRAME_OVERHEAD = 64 * KIB };

/* Longest hostname (RFC 1035), also enough for any IPv6 literal + zone. */
enum { HOST_MAX = 253 };

/* How much of an offending value an error message quotes. */
enum { GOT_MAX = 80 };

_Static_assert(sizeof(enum fsync_policy) == sizeof(uint32_t),
               "enum fields are read and written as uint32_t");
_Static_assert(sizeof(enum log_level) == sizeof(uint32_t),
               "enum fields are read and written as uint32_t");

/* ---- the key table ---- */

enum key_type {
    KT_STRING,   /* char[size], NUL-terminated; str says what is valid */
    KT_COUNT,    /* u32/u64, plain decimal */
    KT_BYTES,    /* u32/u64, units_parse_bytes */
    KT_DURATION, /* u32/u64, units_parse_duration_ms */
    KT_ENUM,     /* u32-sized enum; en gives names */
};

struct str_kind {
    const char *expect; /* after "expected " in errors */
    bool empty_ok;      /* "" allowed */
    bool addr;          /* must pass config_split_hostport */
};

struct enum_kind {
    const char *expect; /* "always|interval|never" */
    int (*parse)(const char *s, uint32_t *out);
    const char *(*name)(uint32_t v);
};

struct key_def {
    const char *name;
    enum key_type type;
    size_t off;                 /* offsetof(struct config, field) */
    size_t size;                /* sizeof the field */
    uint64_t min, max;          /* numeric range, inclusive */
    bool reload;                /* SIGHUP applies it */
    const struct str_kind *str; /* KT_STRING only */
    const struct enum_kind *en; /* KT_ENUM only */
};

static const struct str_kind str_addr_opt = {
    "HOST:PORT, [V6]:PORT (port 0..65535) or \"\"", true, true};
static const struct str_kind str_path = {"a non-empty path", false, false};
static const struct str_kind str_path_opt = {"a path or \"\"", true, false};

/* Index of s in names[0..n) into *out; PQ_EINVAL when absent. */
static int
name_index(const char *const *names, uint32_t n, const char *s, uint32_t *out)
{
    for (uint32_t i = 0; i < n; i++) {
        if (strcmp(s, names[i]) == 0) {
            *out = i;
            return PQ_OK;
        }
    }
    return PQ_EINVAL;
}

#define NAMES_N(a) ((uint32_t)(sizeof(a) / sizeof((a)[0])))

static const char *const fsync_names[] = {"always", "interval", "never"};

static int
fsync_parse(const char *s, uint32_t *out)
{
    return name_index(fsync_names, NAMES_N(fsync_names), s, out);
}

static const char *
fsync_name_u32(uint32_t v)
{
    return v < NAMES_N(fsync_names) ? fsync_names[v] : NULL;
}

static const char *const verify_names[] = {"require", "optional"};

static int
verify_parse(const char *s, uint32_t *out)
{
    return name_index(verify_names, NAMES_N(verify_names), s, out);
}

static const char *
verify_name_u32(uint32_t v)
{
    return v < NAMES_N(verify_names) ? verify_names[v] : NULL;
}

static int
level_parse(const char *s, uint32_t *out)
{
    enum log_level lvl;
    int rc = log_parse_level(s, &lvl);

    if (rc == PQ_OK) {
        *out = (uint32_t)lvl;
    }
    return rc;
}

static const char *
level_name_u32(uint32_t v)
{
    if (v > (uint32_t)LOG_ERR) {
        return NULL;
    }
    return log_level_name((enum log_level)v);
}

static const char *const yesno_names[] = {"no", "yes"};

static int
yesno_parse(const char *s, uint32_t *out)
{
    for (uint32_t i = 0; i < 2; i++) {
        if (strcmp(s, yesno_names[i]) == 0) {
            *out = i;
            return PQ_OK;
        }
    }
    return PQ_EINVAL;
}

static const char *
yesno_name_u32(uint32_t v)
{
    return v < 2 ? yesno_names[v] : NULL;
}

static const struct enum_kind enum_yesno = {"yes|no", yesno_parse,
                                            yesno_name_u32};

static const char *const format_names[] = {"text", "json"};

static int
format_parse(const char *s, uint32_t *out)
{
    for (uint32_t i = 0; i < 2; i++) {
        if (strcmp(s, format_names[i]) == 0) {
            *out = i;
            return PQ_OK;
        }
    }
    return PQ_EINVAL;
}

static const char *
format_name_u32(uint32_t v)
{
    return v < 2 ? format_names[v] : NULL;
}

static const struct enum_kind enum_format = {"text|json", format_parse,
                                             format_name_u32};
static const struct enum_kind enum_fsync = {"always|interval|never",
                                            fsync_parse, fsync_name_u32};
static const struct enum_kind enum_level = {"debug|info|warn|error",
                                            level_parse, level_name_u32};
static const struct enum_kind enum_verify = {"require|optional", verify_parse,
                                             verify_name_u32};

/* clang-format off */
#define FIELD(f) offsetof(struct config, f), sizeof(((struct config *)0)->f)
#define STR(n, k, r) {#n, KT_STRING, FIELD(n), 0, 0, r, &k, NULL}
#define NUM(n, t, lo, hi, r) {#n, t, FIELD(n), lo, hi, r, NULL, NULL}
#define ENUM(n, k, r) {#n, KT_ENUM, FIELD(n), 0, 0, r, NULL, &k}
/* clang-format on */

/*
 * Every setting, in the order of config.h, config_dump and the conf file.
 * Ranges are what the code below them can take, not advice: the conf file
 * gives the advice. Reloadable keys are the ones the server reads afresh
 * (per connection, per request or per check); the rest are read once at
 * start (sockets, the store, queue defaults baked into queues).
 */
static const struct key_def keys[] = {
    /* ---- network ---- */
    STR(listen, str_addr_opt, false),
    STR(port_file, str_path_opt, false),
    STR(metrics, str_addr_opt, false),
    NUM(max_connections, KT_COUNT, 1, 1000000, true),
    NUM(max_frame_bytes, KT_BYTES, 1024, 64 * MIB, false),
    NUM(max_hello_bytes, KT_BYTES, 256, 64 * KIB, true),
    NUM(max_message_bytes, KT_BYTES, 1, 64 * MIB - FRAME_OVERHEAD, true),
    NUM(max_batch, KT_COUNT, 1, 1000000, true),
    NUM(max_result_bytes, KT_BYTES, 0, 64 * MIB - FRAME_OVERHEAD, true),
    NUM(conn_output_high_bytes, KT_BYTES, KIB, 4 * GIB, true),
    NUM(heartbeat_ms, KT_DURATION, 0, HOUR_MS, true),
    NUM(heartbeat_timeout_ms, KT_DURATION, 10, DAY_MS, true),
    NUM(idle_timeout_ms, KT_DURATION, 10, HOUR_MS, true),
    NUM(frame_timeout_ms, KT_DURATION, 10, HOUR_MS, true),
    NUM(idle_conn_timeout_ms, KT_DURATION, 0, 7 * DAY_MS, true),
    NUM(max_connections_per_addr, KT_COUNT, 1, 1000000, true),
    NUM(max_handshake_connections, KT_COUNT, 1, 1000000, true),
    NUM(disconnect_grace_ms, KT_DURATION, 0, 7 * DAY_MS, true),
    NUM(max_held_sessions, KT_COUNT, 1, 1000000, true),
    /* ---- security (the file's tokens are re-read on SIGHUP; turning
     * authentication on or off takes a restart) ---- */
    STR(auth_file, str_path_opt, false),
    ENUM(allow_anonymous, enum_yesno, false),
    /* ---- TLS ---- */
    STR(tls_listen, str_addr_opt, false),
    STR(tls_port_file, str_path_opt, false),
    STR(tls_cert, str_path_opt, true),
    STR(tls_key, str_path_opt, true),
    STR(tls_client_ca, str_path_opt, true),
    ENUM(tls_client_verify, enum_verify, true),
    /* ---- storage ---- */
    STR(data_dir, str_path, false),
    ENUM(fsync, enum_fsync, false),
    NUM(fsync_interval_ms, KT_DURATION, 1, 60 * SEC_MS, false),
    NUM(segment_bytes, KT_BYTES, 64 * KIB, GIB, false),
    NUM(payload_budget_bytes, KT_BYTES, 0, TIB, false),
    NUM(memory_high_bytes, KT_BYTES, 64 * KIB, TIB, true),
    /* ---- queue defaults ---- */
    NUM(ack_timeout_ms, KT_DURATION, UNITS_ACK_TIMEOUT_MIN_MS,
        UNITS_ACK_TIMEOUT_MAX_MS, false),
    NUM(max_attempts, KT_COUNT, 1, UNITS_MAX_ATTEMPTS_MAX, false),
    NUM(backoff_base_ms, KT_DURATION, 0, UNITS_BACKOFF_BASE_MAX_MS, false),
    NUM(backoff_cap_ms, KT_DURATION, 0, UNITS_BACKOFF_CAP_MAX_MS, false),
    NUM(max_lease_ms, KT_DURATION, 0, UNITS_MAX_LEASE_MAX_MS, false),
    NUM(dedup_window_ms, KT_DURATION, 0, UNITS_DEDUP_WINDOW_MAX_MS, false),
    /* ---- logging ---- */
    ENUM(log_level, enum_level, true),
    ENUM(log_format, enum_format, true),
};

enum { NKEYS = sizeof(keys) / sizeof(keys[0]) };
_Static_assert(NKEYS <= 64, "config.overridden is a 64-bit mask");

/*
 * config_defaults: every default in one initializer. The commented-out
 * values in conf/protoqd.conf must match (check_config verifies it).
 */
void
config_defaults(struct config *c)
{
    *c = (struct config){
        .listen = "127.0.0.1:7650",
        .port_file = "",
        .metrics = "", /* 127.0.0.1:7651 once /metrics exists */
        .max_connections = 10000,
        .max_frame_bytes = 4 * MIB,
        .max_hello_bytes = 4 * KIB,
        .max_message_bytes = 1 * MIB,
        .max_batch = 10000,
        .max_result_bytes = 1 * MIB,
        .conn_output_high_bytes = 4 * MIB,
        .heartbeat_ms = 5000,
        .heartbeat_timeout_ms = 15000,
        .idle_timeout_ms = 10000,
        .frame_timeout_ms = 60 * SEC_MS,
        .idle_conn_timeout_ms = HOUR_MS,
        .max_connections_per_addr = 1000,
        .max_handshake_connections = 1024,
        .disconnect_grace_ms = 0,
        .max_held_sessions = 10000,
        .auth_file = "",
        .allow_anonymous = 0,
        .tls_listen = "",
        .tls_port_file = "",
        .tls_cert = "",
        .tls_key = "",
        .tls_client_ca = "",
        .tls_client_verify = TLS_CLIENT_REQUIRE,
        .data_dir = "/var/lib/protoq",
        .fsync = FSYNC_ALWAYS,
        .fsync_interval_ms = 50,
        .segment_bytes = 32 * MIB,
        .payload_budget_bytes = 256 * MIB,
        .memory_high_bytes = GIB,
        .ack_timeout_ms = 30 * SEC_MS,
        .max_attempts = 5,
        .backoff_base_ms = 1 * SEC_MS,
        .backoff_cap_ms = 60 * SEC_MS,
        .max_lease_ms = 0,
        .dedup_window_ms = DAY_MS,
        .log_level = LOG_INFO,
        .overridden = 0,
    };
}

static const struct key_def *
find_key(const char *name)
{
    for (size_t i = 0; i < NKEYS; i++) {
        if (strcmp(keys[i].name, name) == 0) {
            return &keys[i];
        }
    }
    return NULL;
}

static uint64_t
get_num(const struct config *c, const struct key_def *k)
{
    const char *p = (const char *)c + k->off;

    if (k->size == sizeof(uint32_t)) {
        uint32_t v;
        memcpy(&v, p, sizeof(v));
        return v;
    } else {
        uint64_t v;
        memcpy(&v, p, sizeof(v));
        return v;
    }
}

static void
set_num(struct config *c, const struct key_def *k, uint64_t v)
{
    char *p = (char *)c + k->off;

    if (k->size == sizeof(uint32_t)) {
        uint32_t v32 = (uint32_t)v; /* callers checked v <= k->max */
        memcpy(p, &v32, sizeof(v32));
    } else {
        memcpy(p, &v, sizeof(v));
    }
}

static const char *
get_str(const struct config *c, const struct key_def *k)
{
    return (const char *)c + k->off;
}

static bool
is_host_char(char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
           (ch >= '0' && ch <= '9') || ch == '.' || ch == '-' || ch == '_';
}

static bool
is_v6_char(char ch)
{
    return (ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f') ||
           (ch >= 'A' && ch <= 'F') || ch == ':' || ch == '.';
}

/*
 * config_split_hostport: see config.h. Hostnames and IPv4 literals are
 * letters, digits, '.', '-', '_'; an IPv6 literal needs brackets (and may
 * carry a %zone). The port is 1 to 5 digits, 0..65535, and ends the string.
 */
int
config_split_hostport(const char *s, char *host, size_t hostlen, uint16_t *port)
{
    const char *h, *hend, *p;
    uint64_t v;

    if (s == NULL) {
        return PQ_EINVAL;
    }
    if (s[0] == '[') {
        bool zone = false, colon = false;
        h = s + 1;
        hend = strchr(h, ']');
        if (hend == NULL || hend == h || hend[1] != ':') {
            return PQ_EINVAL;
        }
        for (const char *q = h; q < hend; q++) {
            if (*q == '%' && !zone && q > h) {
                zone = true;
            } else if (zone ? !is_host_char(*q) : !is_v6_char(*q)) {
                return PQ_EINVAL;
            }
            colon = colon || (*q == ':' && !zone);
        }
        if (!colon || hend[-1] == '%') {
            return PQ_EINVAL;
        }
        p = hend + 2;
    } else {
        h = s;
        hend = strchr(s, ':');
        if (hend == NULL || hend == h) {
            return PQ_EINVAL;
        }
        for (const char *q = h; q < hend; q++) {
            if (!is_host_char(*q)) {
                return PQ_EINVAL;
            }
        }
        p = hend + 1;
    }
    if ((size_t)(hend - h) > HOST_MAX) {
        return PQ_EINVAL;
    }
    if (strlen(p) > 5 || units_parse_u64(p, &v) != PQ_OK || v > 65535) {
        return PQ_EINVAL;
    }
    if (host != NULL) {
        size_t n = (size_t)(hend - h);
        if (n >= hostlen) {
            return PQ_ETOOBIG;
        }
        memcpy(host, h, n);
        host[n] = '\0';
    }
    if (port != NULL) {
        *port = (uint16_t)v;
    }
    return PQ_OK;
}

/* config_fsync_name: see config.h. */
const char *
config_fsync_name(enum fsync_policy p)
{
    const char *n = fsync_name_u32((uint32_t)p);
    return n != NULL ? n : "?";
}

/* ---- errors ---- */

/* Write `KEY: expected WHAT, got "VALUE"`, VALUE cut to GOT_MAX bytes. */
static void
expected(char *err, size_t errlen, const char *key, const char *what,
         const char *got)
{
    size_t n = strlen(got);

    if (err == NULL || errlen == 0) {
        return;
    }
    snprintf(err, errlen, "%s: expected %s, got \"%.*s%s\"", key, what,
             (int)(n > GOT_MAX ? GOT_MAX : n), got, n > GOT_MAX ? "..." : "");
}

static void
range_error(char *err, size_t errlen, const struct key_def *k, const char *got)
{
    char what[64];

    snprintf(what, sizeof(what), "%" PRIu64 "..%" PRIu64, k->min, k->max);
    expected(err, errlen, k->name, what, got);
}

/* Is s acceptable for string key k? On failure, err says why. */
static int
check_string(const struct key_def *k, const char *s, char *err, size_t errlen)
{
    size_t n = strlen(s);

    if (n >= k->size) {
        char what[64];
        snprintf(what, sizeof(what), "at most %zu bytes", k->size - 1);
        expected(err, errlen, k->name, what, s);
        return PQ_EINVAL;
    }
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch < 0x20 || ch == 0x7f) {
            expected(err, errlen, k->name, "no control characters", s);
            return PQ_EINVAL;
        }
    }
    if (n == 0 ? !k->str->empty_ok
               : (k->str->addr &&
                  config_split_hostport(s, NULL, 0, NULL) != PQ_OK)) {
        expected(err, errlen, k->name, k->str->expect, s);
        return PQ_EINVAL;
    }
    return PQ_OK;
}

/* ---- set / get ---- */

static int
set_key(struct config *c, const struct key_def *k, const char *value, char *err,
        size_t errlen)
{
    uint64_t v = 0;
    int rc;

    switch (k->type) {
    case KT_STRING: {
        size_t n = strlen(value);
        if (n >= 2 && value[0] == '"' && value[n - 1] == '"') {
            value++; /* "..." quotes an empty or blank-edged string */
            n -= 2;
        }
        if (n >= k->size) {
            char what[64];
            snprintf(what, sizeof(what), "at most %zu bytes", k->size - 1);
            expected(err, errlen, k->name, what, value);
            return PQ_EINVAL;
        }
        char tmp[CONFIG_PATH_MAX];
        memcpy(tmp, value, n);
        tmp[n] = '\0';
        rc = check_string(k, tmp, err, errlen);
        if (rc != PQ_OK) {
            return rc;
        }
        memcpy((char *)c + k->off, tmp, n + 1);
        return PQ_OK;
    }
    case KT_ENUM: {
        uint32_t e;
        if (k->en->parse(value, &e) != PQ_OK) {
            expected(err, errlen, k->name, k->en->expect, value);
            return PQ_EINVAL;
        }
        set_num(c, k, e);
        return PQ_OK;
    }
    case KT_COUNT:
        rc = units_parse_u64(value, &v);
        break;
    case KT_BYTES:
        rc = units_parse_bytes(value, &v);
        break;
    case KT_DURATION:
        rc = units_parse_duration_ms(value, &v);
        break;
    default:
        rc = PQ_EINVAL;
        break;
    }
    if (rc != PQ_OK || v < k->min || v > k->max) {
        range_error(err, errlen, k, value);
        return PQ_EINVAL;
    }
    set_num(c, k, v);
    return PQ_OK;
}

/*
 * config_set: see config.h. Errors: `unknown key "KEY"` or
 * `KEY: expected WHAT, got "VALUE"`. c is unchanged on error.
 */
int
config_set(struct config *c, const char *key, const char *value, char *err,
           size_t errlen)
{
    const struct key_def *k = key != NULL ? find_key(key) : NULL;

    if (value == NULL) {
        value = "";
    }
    if (k == NULL) {
        if (err != NULL && errlen > 0) {
            snprintf(err, errlen, "unknown key \"%.*s\"", GOT_MAX,
                     key != NULL ? key : "");
        }
        return PQ_EINVAL;
    }
    return set_key(c, k, value, err, errlen);
}

/* config_override: see config.h. */
int
config_override(struct config *c, const char *key, const char *value, char *err,
                size_t errlen)
{
    int rc = config_set(c, key, value, err, errlen);

    if (rc == PQ_OK) {
        c->overridden |= (uint64_t)1 << (find_key(key) - keys);
    }
    return rc;
}

static int
get_key(const struct config *c, const struct key_def *k, char *buf, size_t len)
{
    const char *s;
    int n;

    switch (k->type) {
    case KT_STRING:
        s = get_str(c, k);
        break;
    case KT_ENUM:
        s = k->en->name((uint32_t)get_num(c, k));
        if (s == NULL) {
            s = "?";
        }
        break;
    default:
        n = snprintf(buf, len, "%" PRIu64, get_num(c, k));
        return n < 0 || (size_t)n >= len ? PQ_ETOOBIG : PQ_OK;
    }
    n = snprintf(buf, len, "%s", s);
    return n < 0 || (size_t)n >= len ? PQ_ETOOBIG : PQ_OK;
}

/* config_get: see config.h. */
int
config_get(const struct config *c, const char *key, char *buf, size_t len)
{
    const struct key_def *k = find_key(key);

    if (k == NULL) {
        return PQ_ENOTFOUND;
    }
    return get_key(c, k, buf, len);
}

/* config_key_reloadable: see config.h. */
bool
config_key_reloadable(const char *key)
{
    const struct key_def *k = find_key(key);
    return k != NULL && k->reload;
}

/* config_key_count: see config.h. */
size_t
config_key_count(void)
{
    return NKEYS;
}

/* config_key_name: see config.h; NULL past the end. */
const char *
config_key_name(size_t i)
{
    return i < NKEYS ? keys[i].name : NULL;
}

/* ---- the file ---- */

static bool
is_blank(char ch)
{
    return ch == ' ' || ch == '\t' || ch == '\r' || ch == '\f' || ch == '\v';
}

/*
 * Read one line (without its newline) into buf[CONFIG_LINE_MAX + 1].
 * Returns 1 for a line, 0 at EOF, PQ_ETOOBIG for an overlong line (the rest
 * of it is not read), PQ_EPROTO for a NUL byte, PQ_ESYS on a read error.
 */
static int
read_line(FILE *f, char *buf)
{
    size_t n = 0;
    int ch;

    while ((ch = getc(f)) != EOF && ch != '\n') {
        if (ch == '\0') {
            return PQ_EPROTO;
        }
        if (n == CONFIG_LINE_MAX) {
            return PQ_ETOOBIG;
        }
        buf[n++] = (char)ch;
    }
    buf[n] = '\0';
    if (ch == EOF) {
        if (ferror(f)) {
            return PQ_ESYS;
        }
        if (n == 0) {
            return 0;
        }
    }
    return 1;
}

/* Apply one line (modified in place). "" in msg means OK. */
static int
apply_line(struct config *c, char *line, char *msg, size_t msglen)
{
    const struct key_def *k;
    char *key = line, *val, *end;

    while (is_blank(*key)) {
        key++;
    }
    if (*key == '\0' || *key == '#') {
        return PQ_OK;
    }
    val = key;
    while (*val != '\0' && !is_blank(*val)) {
        val++;
    }
    if (*val != '\0') {
        *val++ = '\0';
    }
    while (is_blank(*val)) {
        val++;
    }
    end = val + strlen(val);
    while (end > val && is_blank(end[-1])) {
        *--end = '\0';
    }
    k = find_key(key);
    if (k != NULL && *val == '\0') {
        snprintf(msg, msglen, "%s: missing value", k->name);
        return PQ_EINVAL;
    }
    return config_set(c, key, val, msg, msglen);
}

/* config_load_file: see config.h. */
int
config_load_file(struct config *c, const char *path, char *err, size_t errlen)
{
    char line[CONFIG_LINE_MAX + 1];
    char msg[256];
    unsigned lineno = 0;
    int rc = PQ_OK;
    FILE *f;

    if (err != NULL && errlen > 0) {
        err[0] = '\0';
    }
    f = fopen(path, "re");
    if (f == NULL) {
        int e = errno;
        if (err != NULL && errlen > 0) {
            snprintf(err, errlen, "%s: %s", path, strerror(e));
        }
        return PQ_ESYS;
    }
    for (;;) {
        int got = read_line(f, line);
        lineno++;
        if (got == 0) {
            break;
        }
        msg[0] = '\0';
        if (got == PQ_ESYS) {
            int e = errno;
            snprintf(msg, sizeof(msg), "%s", strerror(e));
            rc = PQ_ESYS;
        } else if (got == PQ_ETOOBIG) {
            snprintf(msg, sizeof(msg), "line longer than %d bytes",
                     CONFIG_LINE_MAX);
            rc = PQ_EINVAL;
        } else if (got == PQ_EPROTO) {
            snprintf(msg, sizeof(msg), "NUL byte in line");
            rc = PQ_EINVAL;
        } else {
            rc = apply_line(c, line, msg, sizeof(msg));
        }
        if (rc != PQ_OK) {
            if (err != NULL && errlen > 0) {
                snprintf(err, errlen, "%s:%u: %s", path, lineno, msg);
            }
            break;
        }
    }
    fclose(f);
    return rc;
}

/* ---- validation ---- */

static int
check_key(const struct config *c, const struct key_def *k, char *err,
          size_t errlen)
{
    char got[32];
    uint64_t v;

    if (k->type == KT_STRING) {
        const char *s = get_str(c, k);
        if (memchr(s, '\0', k->size) == NULL) {
            expected(err, errlen, k->name, "a NUL-terminated string", "");
            return PQ_EINVAL;
        }
        return check_string(k, s, err, errlen);
    }
    v = get_num(c, k);
    if (k->type == KT_ENUM) {
        if (k->en->name((uint32_t)v) == NULL) {
            snprintf(got, sizeof(got), "%" PRIu64, v);
            expected(err, errlen, k->name, k->en->expect, got);
            return PQ_EINVAL;
        }
        return PQ_OK;
    }
    if (v < k->min || v > k->max) {
        snprintf(got, sizeof(got), "%" PRIu64, v);
        range_error(err, errlen, k, got);
        return PQ_EINVAL;
    }
    return PQ_OK;
}

/* The relation between two keys failed: KEY: expected WHAT (N), got "V". */
static int
cross_error(char *err, size_t errlen, const char *key, const char *rel,
            uint64_t bound, uint64_t got)
{
    char what[128], gotbuf[32];

    snprintf(what, sizeof(what), "%s (%" PRIu64 ")", rel, bound);
    snprintf(gotbuf, sizeof(gotbuf), "%" PRIu64, got);
    expected(err, errlen, key, what, gotbuf);
    return PQ_EINVAL;
}

/* Two HOST:PORT strings name the same fixed port on the same host. */
static bool
same_address(const char *a, const char *b)
{
    char h1[CONFIG_ADDR_MAX], h2[CONFIG_ADDR_MAX];
    uint16_t p1, p2;

    return a[0] != '\0' && b[0] != '\0' &&
           config_split_hostport(a, h1, sizeof(h1), &p1) == PQ_OK &&
           config_split_hostport(b, h2, sizeof(h2), &p2) == PQ_OK && p1 != 0 &&
           p1 == p2 && strcmp(h1, h2) == 0;
}

/* The TLS keys against each other and against listen. */
static int
validate_tls(const struct config *c, char *err, size_t errlen)
{
    if (c->listen[0] == '\0' && c->tls_listen[0] == '\0') {
        expected(err, errlen, "listen", "an address when tls_listen is \"\"",
                 c->listen);
        return PQ_EINVAL;
    }
    if (c->tls_listen[0] == '\0') {
        return PQ_OK;
    }
    if (same_address(c->listen, c->tls_listen)) {
        expected(err, errlen, "tls_listen", "an address other than listen's",
                 c->tls_listen);
        return PQ_EINVAL;
    }
    if (same_address(c->metrics, c->tls_listen)) {
        expected(err, errlen, "metrics", "an address other than tls_listen's",
                 c->metrics);
        return PQ_EINVAL;
    }
    if (c->tls_cert[0] == '\0') {
        expected(err, errlen, "tls_cert", "a path when tls_listen is set",
                 c->tls_cert);
        return PQ_EINVAL;
    }
    if (c->tls_key[0] == '\0') {
        expected(err, errlen, "tls_key", "a path when tls_listen is set",
                 c->tls_key);
        return PQ_EINVAL;
    }
    return PQ_OK;
}

/* config_validate: see config.h. */
int
config_validate(const struct config *c, char *err, size_t errlen)
{
    int rc;

    if (err != NULL && errlen > 0) {
        err[0] = '\0';
    }
    for (size_t i = 0; i < NKEYS; i++) {
        rc = check_key(c, &keys[i], err, errlen);
        if (rc != PQ_OK) {
            return rc;
        }
    }
    if ((uint64_t)c->max_frame_bytes <
        (uint64_t)c->max_message_bytes + FRAME_OVERHEAD) {
        return cross_error(err, errlen, "max_frame_bytes",
                           "at least max_message_bytes + 65536",
                           (uint64_t)c->max_message_bytes + FRAME_OVERHEAD,
                           c->max_frame_bytes);
    }
    if (c->heartbeat_ms != 0 && c->heartbeat_timeout_ms <= c->heartbeat_ms) {
        return cross_error(err, errlen, "heartbeat_timeout_ms",
                           "more than heartbeat_ms", c->heartbeat_ms,
                           c->heartbeat_timeout_ms);
    }
    if (c->backoff_cap_ms < c->backoff_base_ms) {
        return cross_error(err, errlen, "backoff_cap_ms",
                           "at least backoff_base_ms", c->backoff_base_ms,
                           c->backoff_cap_ms);
    }
    if (c->max_lease_ms != 0 && c->max_lease_ms < c->ack_timeout_ms) {
        return cross_error(err, errlen, "max_lease_ms",
                           "0 or at least ack_timeout_ms", c->ack_timeout_ms,
                           c->max_lease_ms);
    }
    if (same_address(c->listen, c->metrics)) {
        expected(err, errlen, "metrics", "an address other than listen's",
                 c->metrics);
        return PQ_EINVAL;
    }
    return validate_tls(c, err, errlen);
}

/* ---- dump ---- */

static int
write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) {
                continue;
            }
            return PQ_ESYS;
        }
        p += w;
        n -= (size_t)w;
    }
    return PQ_OK;
}

/* config_dump: see config.h. Stops quietly at the first write error. */
void
config_dump(const struct config *c, int fd)
{
    char val[CONFIG_PATH_MAX];
    char line[CONFIG_PATH_MAX + 64];

    for (size_t i = 0; i < NKEYS; i++) {
        const struct key_def *k = &keys[i];
        const char *q = "";
        size_t n;
        int len;

        if (get_key(c, k, val, sizeof(val)) != PQ_OK) {
            val[0] = '\0'; /* an unterminated string field: dump it empty */
        }
        n = strlen(val);
        if (k->type == KT_STRING &&
            (n == 0 || is_blank(val[0]) || is_blank(val[n - 1]) ||
             (n >= 2 && val[0] == '"' && val[n - 1] == '"'))) {
            q = "\"";
        }
        len = snprintf(line, sizeof(line), "%s %s%s%s\n", k->name, q, val, q);
        if (len < 0 || (size_t)len >= sizeof(line)) {
            continue; /* cannot happen: val < CONFIG_PATH_MAX */
        }
        if (write_all(fd, line, (size_t)len) != PQ_OK) {
            return;
        }
    }
}

/* ---- reload ---- */

static void
copy_field(struct config *dst, const struct config *src,
           const struct key_def *k)
{
    memcpy((char *)dst + k->off, (const char *)src + k->off, k->size);
}

static bool
same_value(const struct config *a, const struct config *b,
           const struct key_def *k)
{
    if (k->type == KT_STRING) {
        return strncmp(get_str(a, k), get_str(b, k), k->size) == 0;
    }
    return get_num(a, k) == get_num(b, k);
}

/* config_reload_file: see config.h. */
int
config_reload_file(struct config *live, const char *path, char *err,
                   size_t errlen)
{
    struct config next, merged;
    char msg[256];
    size_t used = 0;
    int rc;

    if (err != NULL && errlen > 0) {
        err[0] = '\0';
    }
    config_defaults(&next);
    rc = config_load_file(&next, path, err, errlen);
    if (rc != PQ_OK) {
        return rc;
    }
    for (size_t i = 0; i < NKEYS; i++) {
        if (live->overridden & ((uint64_t)1 << i)) {
            copy_field(&next, live, &keys[i]);
        }
    }
    rc = config_validate(&next, msg, sizeof(msg));
    if (rc != PQ_OK) {
        if (err != NULL && errlen > 0) {
            snprintf(err, errlen, "%s: %s", path, msg);
        }
        return rc;
    }

    merged = *live;
    for (size_t i = 0; i < NKEYS; i++) {
        const struct key_def *k = &keys[i];
        if (live->overridden & ((uint64_t)1 << i)) {
            continue;
        }
        if (k->reload) {
            copy_field(&merged, &next, k);
        } else if (!same_value(&next, live, k)) {
            if (err != NULL && errlen > 0 && used < errlen) {
                int n = snprintf(err + used, errlen - used, "%s%s",
                                 used == 0 ? "ignored until restart: " : ", ",
                                 k->name);
                used += n > 0 ? (size_t)n : 0;
            }
        }
    }
    /*
     * The file is valid on its own, but its reloadable keys next to the
     * running non-reloadable ones may not be (a bigger max_message_bytes
     * with the old max_frame_bytes).
     */
    rc = config_validate(&merged, msg, sizeof(msg));
    if (rc != PQ_OK) {
        if (err != NULL && errlen > 0) {
            snprintf(
                err, errlen,
                "%s: %s (with the running values of keys that need a restart)",
                path, msg);
        }
        return rc;
    }
    *live = merged;
    return PQ_OK;
}
