/*
 * check_config.c: unit tests for broker/config.c: defaults, the value
 * parsers, exact error messages (with file:line), the file syntax, flags
 * over the file, cross-field validation, SIGHUP reload, dump round trips,
 * and the shipped conf/protoqd.conf (it must load and name every key, and
 * its commented-out values must be the real defaults). Files go to a fresh
 * mkdtemp directory per test. Run from the source root, or set
 * PROTOQ_SRCDIR to it.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "config.h"
#include "pqerr.h"
#include "units.h"

#define ck_assert_pq_ok(expr)                                                  \
    do {                                                                       \
        int rc_ = (expr);                                                      \
        ck_assert_msg(rc_ == PQ_OK, "%s: %s (%d)", #expr, pq_strerror(rc_),    \
                      rc_);                                                    \
    } while (0)

#define ck_assert_pq_err(expr, code)                                           \
    do {                                                                       \
        int rc_ = (expr);                                                      \
        ck_assert_msg(rc_ == (code), "%s: got %s (%d), want %s", #expr,        \
                      pq_strerror(rc_), rc_, pq_strerror(code));               \
    } while (0)

/* ---- fixture: a temp dir and files in it ---- */

enum { MAX_FILES = 16 };
static char tmpdir[64];
static char files[MAX_FILES][128];
static int nfiles;

static void
setup_tmpdir(void)
{
    snprintf(tmpdir, sizeof(tmpdir), "/tmp/check_config.XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(tmpdir));
    nfiles = 0;
}

static void
teardown_tmpdir(void)
{
    for (int i = 0; i < nfiles; i++) {
        unlink(files[i]);
    }
    rmdir(tmpdir);
}

/* Write text to tmpdir/name; returns the path (valid until teardown). */
static const char *
write_file(const char *name, const char *text)
{
    ck_assert_int_lt(nfiles, MAX_FILES);
    char *path = files[nfiles++];
    snprintf(path, sizeof(files[0]), "%s/%s", tmpdir, name);
    FILE *f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    ck_assert_int_eq(fputs(text, f) >= 0, 1);
    ck_assert_int_eq(fclose(f), 0);
    return path;
}

/* Read a whole (small) file into a static buffer. */
static const char *
read_text(const char *path)
{
    static char buf[1 << 16];
    FILE *f = fopen(path, "r");
    ck_assert_msg(f != NULL, "%s: %s", path, strerror(errno));
    size_t n = fread(buf, 1, sizeof(buf) - 1, f);
    ck_assert_int_lt(n, sizeof(buf) - 1);
    buf[n] = '\0';
    fclose(f);
    return buf;
}

static const char *
get(const struct config *c, const char *key)
{
    static char buf[CONFIG_PATH_MAX];
    ck_assert_pq_ok(config_get(c, key, buf, sizeof(buf)));
    return buf;
}

/* Every key of a and b has the same canonical value. */
static void
assert_same_config(const struct config *a, const struct config *b)
{
    char va[CONFIG_PATH_MAX], vb[CONFIG_PATH_MAX];

    for (size_t i = 0; i < config_key_count(); i++) {
        const char *k = config_key_name(i);
        ck_assert_pq_ok(config_get(a, k, va, sizeof(va)));
        ck_assert_pq_ok(config_get(b, k, vb, sizeof(vb)));
        ck_assert_msg(strcmp(va, vb) == 0, "%s: \"%s\" != \"%s\"", k, va, vb);
    }
}

static const char *
shipped_conf(void)
{
    static char path[4096];
    const char *src = getenv("PROTOQ_SRCDIR");
    snprintf(path, sizeof(path), "%s/conf/protoqd.conf", src ? src : ".");
    return path;
}

/* ---- defaults ---- */

START_TEST(test_defaults_are_the_documented_values)
{
    struct config c;
    config_defaults(&c);
    ck_assert_str_eq(c.listen, "127.0.0.1:7650");
    ck_assert_str_eq(c.port_file, "");
    ck_assert_str_eq(c.metrics, "");
    ck_assert_uint_eq(c.max_connections, 10000);
    ck_assert_uint_eq(c.max_frame_bytes, 4194304);
    ck_assert_uint_eq(c.max_hello_bytes, 4096);
    ck_assert_uint_eq(c.max_message_bytes, 1048576);
    ck_assert_uint_eq(c.max_batch, 10000);
    ck_assert_uint_eq(c.conn_output_high_bytes, 4194304);
    ck_assert_uint_eq(c.heartbeat_ms, 5000);
    ck_assert_uint_eq(c.heartbeat_timeout_ms, 15000);
    ck_assert_uint_eq(c.idle_timeout_ms, 10000);
    ck_assert_str_eq(c.tls_listen, "");
    ck_assert_str_eq(c.tls_port_file, "");
    ck_assert_str_eq(c.tls_cert, "");
    ck_assert_str_eq(c.tls_key, "");
    ck_assert_str_eq(c.tls_client_ca, "");
    ck_assert_int_eq(c.tls_client_verify, TLS_CLIENT_REQUIRE);
    ck_assert_str_eq(c.data_dir, "/var/lib/protoq");
    ck_assert_int_eq(c.fsync, FSYNC_ALWAYS);
    ck_assert_uint_eq(c.fsync_interval_ms, 50);
    ck_assert_uint_eq(c.segment_bytes, 32u << 20);
    ck_assert_uint_eq(c.payload_budget_bytes, 256u << 20);
    ck_assert_uint_eq(c.memory_high_bytes, 1u << 30);
    ck_assert_uint_eq(c.ack_timeout_ms, 30000);
    ck_assert_uint_eq(c.max_attempts, 5);
    ck_assert_uint_eq(c.backoff_base_ms, 1000);
    ck_assert_uint_eq(c.backoff_cap_ms, 60000);
    ck_assert_uint_eq(c.max_lease_ms, 0);
    ck_assert_uint_eq(c.dedup_window_ms, 86400000);
    ck_assert_int_eq(c.log_level, LOG_INFO);
    ck_assert_uint_eq(c.overridden, 0);
}
END_TEST

START_TEST(test_defaults_pass_validation)
{
    struct config c;
    char err[256] = "x";
    config_defaults(&c);
    ck_assert_pq_ok(config_validate(&c, err, sizeof(err)));
    ck_assert_str_eq(err, "");
}
END_TEST

START_TEST(test_key_table_is_complete_and_unique)
{
    static const char *const want[] = {
        "listen",
        "port_file",
        "metrics",
        "max_connections",
        "max_frame_bytes",
        "max_hello_bytes",
        "max_message_bytes",
        "max_batch",
        "max_result_bytes",
        "conn_output_high_bytes",
        "heartbeat_ms",
        "heartbeat_timeout_ms",
        "idle_timeout_ms",
        "frame_timeout_ms",
        "idle_conn_timeout_ms",
        "max_connections_per_addr",
        "max_handshake_connections",
        "disconnect_grace_ms",
        "max_held_sessions",
        "auth_file",
        "allow_anonymous",
        "tls_listen",
        "tls_port_file",
        "tls_cert",
        "tls_key",
        "tls_client_ca",
        "tls_client_verify",
        "data_dir",
        "fsync",
        "fsync_interval_ms",
        "segment_bytes",
        "payload_budget_bytes",
        "memory_high_bytes",
        "ack_timeout_ms",
        "max_attempts",
        "backoff_base_ms",
        "backoff_cap_ms",
        "max_lease_ms",
        "dedup_window_ms",
        "log_level",
        "log_format",
    };
    size_t n = sizeof(want) / sizeof(want[0]);
    ck_assert_uint_eq(config_key_count(), n);
    for (size_t i = 0; i < n; i++) {
        ck_assert_str_eq(config_key_name(i), want[i]);
    }
    ck_assert_ptr_null(config_key_name(n));
}
END_TEST

/* ---- parsers ---- */

START_TEST(test_duration_suffixes)
{
    static const struct {
        const char *s;
        uint64_t ms;
    } ok[] = {
        {"0", 0},
        {"250", 250},
        {"250ms", 250},
        {"0ms", 0},
        {"30s", 30000},
        {"5m", 300000},
        {"2h", 7200000},
        {"7d", 604800000},
        {"007s", 7000},
        {"18446744073709551615", UINT64_MAX},
        {"18446744073709551ms", 18446744073709551ull},
        {"1h30m", 5400000},
        {"2d12h", 216000000},
        {"1m30s", 90000},
        {"1s500ms", 1500},
        {"1d2h3m4s5ms", 93784005},
    };
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
        uint64_t v = 12345;
        ck_assert_msg(units_parse_duration_ms(ok[i].s, &v) == PQ_OK,
                      "%s rejected", ok[i].s);
        ck_assert_msg(v == ok[i].ms, "%s -> %llu", ok[i].s,
                      (unsigned long long)v);
    }
}
END_TEST

START_TEST(test_duration_rejects_garbage_and_overflow)
{
    static const char *const bad[] = {
        "",
        "-1",
        "+5",
        " 5",
        "5 ",
        "5x",
        "1.5s",
        "s",
        "ms",
        "5S",
        "5sec",
        "5 s",
        "0x10",
        "5msms",
        "1e3",
        "18446744073709551616",
        "18446744073709552s",
        "213503982334602d",
        "99999999999999999999999",
        "30m1h",
        "1s1s",
        "1h30",
        "1h 30m",
        "5ms1s",
        "1.5m",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        uint64_t v = 777;
        ck_assert_msg(units_parse_duration_ms(bad[i], &v) == PQ_EINVAL,
                      "\"%s\" accepted", bad[i]);
        ck_assert_uint_eq(v, 777); /* untouched on error */
    }
    ck_assert_int_eq(units_parse_duration_ms(NULL, &(uint64_t){0}), PQ_EINVAL);
}
END_TEST

START_TEST(test_bytes_suffixes)
{
    static const struct {
        const char *s;
        uint64_t n;
    } ok[] = {
        {"0", 0},
        {"4096", 4096},
        {"4k", 4096},
        {"4K", 4096},
        {"4m", 4194304},
        {"4M", 4194304},
        {"1g", 1073741824},
        {"1G", 1073741824},
        {"17179869183G", 17179869183ull << 30},
        {"4KB", 4096},
        {"4KiB", 4096},
        {"4kb", 4096},
        {"2MiB", 2097152},
        {"10b", 10},
    };
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
        uint64_t v = 1;
        ck_assert_msg(units_parse_bytes(ok[i].s, &v) == PQ_OK, "%s rejected",
                      ok[i].s);
        ck_assert_msg(v == ok[i].n, "%s -> %llu", ok[i].s,
                      (unsigned long long)v);
    }
}
END_TEST

START_TEST(test_bytes_rejects_garbage_and_overflow)
{
    static const char *const bad[] = {
        "",
        "k",
        "-1",
        "4 k",
        "4ib",
        "4KBB",
        "4kk",
        "1t",
        "1T",
        "1.5M",
        " 1",
        "1 ",
        "17179869184G",
        "18014398509481984K",
        "18446744073709551616",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        uint64_t v = 777;
        ck_assert_msg(units_parse_bytes(bad[i], &v) == PQ_EINVAL,
                      "\"%s\" accepted", bad[i]);
        ck_assert_uint_eq(v, 777);
    }
}
END_TEST

START_TEST(test_split_hostport_accepts)
{
    static const struct {
        const char *s, *host;
        uint16_t port;
    } ok[] = {
        {"127.0.0.1:7650", "127.0.0.1", 7650},
        {"localhost:0", "localhost", 0},
        {"broker-1.example_net.org:65535", "broker-1.example_net.org", 65535},
        {"[::1]:7650", "::1", 7650},
        {"[::]:1", "::", 1},
        {"[fe80::1%eth0]:80", "fe80::1%eth0", 80},
        {"[::ffff:10.0.0.1]:9", "::ffff:10.0.0.1", 9},
    };
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++) {
        char host[CONFIG_ADDR_MAX];
        uint16_t port = 1234;
        ck_assert_msg(
            config_split_hostport(ok[i].s, host, sizeof(host), &port) == PQ_OK,
            "%s rejected", ok[i].s);
        ck_assert_str_eq(host, ok[i].host);
        ck_assert_uint_eq(port, ok[i].port);
    }
    ck_assert_pq_ok(config_split_hostport("h:1", NULL, 0, NULL));
}
END_TEST

START_TEST(test_split_hostport_rejects)
{
    static const char *const bad[] = {
        "",
        "127.0.0.1",
        ":7650",
        "127.0.0.1:",
        "127.0.0.1:65536",
        "127.0.0.1:123456",
        "127.0.0.1:000001",
        "::1:7650",
        "[::1]7650",
        "[::1]",
        "[]:80",
        "[1.2.3.4]:80",
        "[::1]:",
        "[::1%]:80",
        "[%x]:80",
        "[::g]:80",
        "host:80x",
        "host:-1",
        "host:+80",
        "ho st:80",
        "host: 80",
        "host:80 ",
        "a:b:80",
        "[::1]:80:1",
        "*:80",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        char host[CONFIG_ADDR_MAX];
        uint16_t port;
        ck_assert_msg(config_split_hostport(bad[i], host, sizeof(host),
                                            &port) == PQ_EINVAL,
                      "\"%s\" accepted", bad[i]);
    }
    char small[4];
    ck_assert_pq_err(
        config_split_hostport("localhost:1", small, sizeof(small), NULL),
        PQ_ETOOBIG);
    ck_assert_pq_ok(config_split_hostport("abc:1", small, sizeof(small), NULL));
    ck_assert_str_eq(small, "abc");
}
END_TEST

START_TEST(test_set_each_type)
{
    struct config c;
    char err[256];
    config_defaults(&c);
    ck_assert_pq_ok(config_set(&c, "listen", "[::1]:0", err, sizeof(err)));
    ck_assert_str_eq(c.listen, "[::1]:0");
    ck_assert_pq_ok(config_set(&c, "max_connections", "12", err, sizeof(err)));
    ck_assert_uint_eq(c.max_connections, 12);
    ck_assert_pq_ok(config_set(&c, "max_frame_bytes", "8M", err, sizeof(err)));
    ck_assert_uint_eq(c.max_frame_bytes, 8u << 20);
    ck_assert_pq_ok(config_set(&c, "segment_bytes", "1g", err, sizeof(err)));
    ck_assert_uint_eq(c.segment_bytes, 1u << 30);
    ck_assert_pq_ok(config_set(&c, "heartbeat_ms", "2s", err, sizeof(err)));
    ck_assert_uint_eq(c.heartbeat_ms, 2000);
    ck_assert_pq_ok(config_set(&c, "ack_timeout_ms", "30d", err, sizeof(err)));
    ck_assert_uint_eq(c.ack_timeout_ms, 30ull * 86400000);
    ck_assert_pq_ok(config_set(&c, "fsync", "interval", err, sizeof(err)));
    ck_assert_int_eq(c.fsync, FSYNC_INTERVAL);
    ck_assert_pq_ok(config_set(&c, "fsync", "never", err, sizeof(err)));
    ck_assert_int_eq(c.fsync, FSYNC_NEVER);
    ck_assert_str_eq(config_fsync_name(c.fsync), "never");
    ck_assert_pq_ok(config_set(&c, "log_level", "debug", err, sizeof(err)));
    ck_assert_int_eq(c.log_level, LOG_DEBUG);
    ck_assert_pq_ok(config_set(&c, "log_level", "error", err, sizeof(err)));
    ck_assert_int_eq(c.log_level, LOG_ERR);
    ck_assert_pq_ok(
        config_set(&c, "metrics", "127.0.0.1:7651", err, sizeof(err)));
    ck_assert_str_eq(c.metrics, "127.0.0.1:7651");
    ck_assert_pq_ok(config_set(&c, "metrics", "", err, sizeof(err)));
    ck_assert_str_eq(c.metrics, "");
}
END_TEST

START_TEST(test_range_edges)
{
    struct config c;
    char err[256];
    config_defaults(&c);
    ck_assert_pq_ok(
        config_set(&c, "max_frame_bytes", "1024", err, sizeof(err)));
    ck_assert_pq_ok(config_set(&c, "max_frame_bytes", "64M", err, sizeof(err)));
    ck_assert_pq_err(
        config_set(&c, "max_frame_bytes", "67108865", err, sizeof(err)),
        PQ_EINVAL);
    ck_assert_pq_err(
        config_set(&c, "max_frame_bytes", "1023", err, sizeof(err)), PQ_EINVAL);
    ck_assert_pq_ok(config_set(&c, "max_hello_bytes", "256", err, sizeof(err)));
    ck_assert_pq_ok(config_set(&c, "max_hello_bytes", "64k", err, sizeof(err)));
    ck_assert_pq_err(config_set(&c, "max_hello_bytes", "255", err, sizeof(err)),
                     PQ_EINVAL);
    ck_assert_pq_err(
        config_set(&c, "max_hello_bytes", "65537", err, sizeof(err)),
        PQ_EINVAL);
    /* A u32 field never silently truncates a u64 value. */
    ck_assert_pq_err(
        config_set(&c, "max_connections", "4294967297", err, sizeof(err)),
        PQ_EINVAL);
    ck_assert_pq_err(config_set(&c, "heartbeat_ms", "50d", err, sizeof(err)),
                     PQ_EINVAL);
    ck_assert_uint_eq(c.max_connections, 10000);
    ck_assert_uint_eq(c.heartbeat_ms, 5000);
    ck_assert_pq_ok(config_set(&c, "heartbeat_ms", "0", err, sizeof(err)));
    ck_assert_pq_err(config_set(&c, "max_attempts", "0", err, sizeof(err)),
                     PQ_EINVAL);
    ck_assert_pq_err(config_set(&c, "max_attempts", "5k", err, sizeof(err)),
                     PQ_EINVAL); /* counts take no suffix */
}
END_TEST

START_TEST(test_string_quotes_and_limits)
{
    struct config c;
    char err[256];
    static char big[CONFIG_PATH_MAX + 8];
    config_defaults(&c);

    ck_assert_pq_ok(config_set(&c, "port_file", "\"\"", err, sizeof(err)));
    ck_assert_str_eq(c.port_file, "");
    ck_assert_pq_ok(
        config_set(&c, "data_dir", "\" my dir \"", err, sizeof(err)));
    ck_assert_str_eq(c.data_dir, " my dir ");
    ck_assert_pq_ok(config_set(&c, "data_dir", "a\"b", err, sizeof(err)));
    ck_assert_str_eq(c.data_dir, "a\"b");

    memset(big, 'a', CONFIG_PATH_MAX - 1);
    big[CONFIG_PATH_MAX - 1] = '\0';
    ck_assert_pq_ok(config_set(&c, "data_dir", big, err, sizeof(err)));
    ck_assert_uint_eq(strlen(c.data_dir), CONFIG_PATH_MAX - 1);
    big[CONFIG_PATH_MAX - 1] = 'a';
    big[CONFIG_PATH_MAX] = '\0';
    ck_assert_pq_err(config_set(&c, "data_dir", big, err, sizeof(err)),
                     PQ_EINVAL);
    ck_assert_msg(strncmp(err,
                          "data_dir: expected at most 4095 bytes, got \"aaa",
                          46) == 0,
                  "%s", err);
    ck_assert_uint_eq(strlen(c.data_dir), CONFIG_PATH_MAX - 1);

    ck_assert_pq_err(config_set(&c, "data_dir", "", err, sizeof(err)),
                     PQ_EINVAL);
    ck_assert_str_eq(err, "data_dir: expected a non-empty path, got \"\"");
    ck_assert_pq_err(config_set(&c, "data_dir", "a\tb", err, sizeof(err)),
                     PQ_EINVAL);
    ck_assert_str_eq(err,
                     "data_dir: expected no control characters, got \"a\tb\"");
}
END_TEST

/* ---- error messages ---- */

START_TEST(test_set_error_messages_are_exact)
{
    struct config c;
    char err[256];
    config_defaults(&c);

    ck_assert_pq_err(config_set(&c, "max_frame_bytes", "0", err, sizeof(err)),
                     PQ_EINVAL);
    ck_assert_str_eq(err,
                     "max_frame_bytes: expected 1024..67108864, got \"0\"");
    ck_assert_pq_err(config_set(&c, "lisen", "x:1", err, sizeof(err)),
                     PQ_EINVAL);
    ck_assert_str_eq(err, "unknown key \"lisen\"");
    ck_assert_pq_err(config_set(&c, "fsync", "sometimes", err, sizeof(err)),
                     PQ_EINVAL);
    ck_assert_str_eq(
        err, "fsync: expected always|interval|never, got \"sometimes\"");
    ck_assert_pq_err(config_set(&c, "log_level", "INFO", err, sizeof(err)),
                     PQ_EINVAL);
    ck_assert_str_eq(err,
                     "log_level: expected debug|info|warn|error, got \"INFO\"");
    ck_assert_pq_err(config_set(&c, "listen", "7650", err, sizeof(err)),
                     PQ_EINVAL);
    ck_assert_str_eq(err, "listen: expected HOST:PORT, [V6]:PORT (port "
                          "0..65535) or \"\", got \"7650\"");
    ck_assert_pq_err(config_set(&c, "heartbeat_ms", "5 s", err, sizeof(err)),
                     PQ_EINVAL);
    ck_assert_str_eq(err, "heartbeat_ms: expected 0..3600000, got \"5 s\"");
    /* Nothing changed by the failed calls. */
    struct config d;
    config_defaults(&d);
    assert_same_config(&c, &d);
    /* A NULL or zero-length err buffer is allowed. */
    ck_assert_pq_err(config_set(&c, "fsync", "x", NULL, 0), PQ_EINVAL);
}
END_TEST

START_TEST(test_file_range_error_names_path_and_line)
{
    struct config c;
    char err[512], want[512];
    const char *path =
        write_file("protoqd.conf", "# line 1\n\n# 3\n#4\n\n\n\n\n\n\nlisten "
                                   "127.0.0.1:1\nmax_frame_bytes 0\n");
    config_defaults(&c);
    ck_assert_pq_err(config_load_file(&c, path, err, sizeof(err)), PQ_EINVAL);
    snprintf(want, sizeof(want),
             "%s:12: max_frame_bytes: expected 1024..67108864, got \"0\"",
             path);
    ck_assert_str_eq(err, want);
}
END_TEST

START_TEST(test_file_unknown_key_names_path_and_line)
{
    struct config c;
    char err[512], want[512];
    const char *path =
        write_file("protoqd.conf", "fsync always\n\nlisen 1.2.3.4:5\n");
    config_defaults(&c);
    ck_assert_pq_err(config_load_file(&c, path, err, sizeof(err)), PQ_EINVAL);
    snprintf(want, sizeof(want), "%s:3: unknown key \"lisen\"", path);
    ck_assert_str_eq(err, want);

    /* Relative paths are quoted as given. */
    char cwd[4096];
    ck_assert_ptr_nonnull(getcwd(cwd, sizeof(cwd)));
    ck_assert_int_eq(chdir(tmpdir), 0);
    ck_assert_pq_err(config_load_file(&c, "protoqd.conf", err, sizeof(err)),
                     PQ_EINVAL);
    ck_assert_int_eq(chdir(cwd), 0);
    ck_assert_str_eq(err, "protoqd.conf:3: unknown key \"lisen\"");
}
END_TEST

START_TEST(test_file_missing_value_and_trailing_comment)
{
    struct config c;
    char err[512], want[512];
    const char *p1 = write_file("a.conf", "fsync   \n");
    const char *p2 = write_file("b.conf", "\n\nfsync always # safest\n");
    config_defaults(&c);
    ck_assert_pq_err(config_load_file(&c, p1, err, sizeof(err)), PQ_EINVAL);
    snprintf(want, sizeof(want), "%s:1: fsync: missing value", p1);
    ck_assert_str_eq(err, want);
    /* Comments take a whole line; a trailing one is part of the value. */
    ck_assert_pq_err(config_load_file(&c, p2, err, sizeof(err)), PQ_EINVAL);
    snprintf(want, sizeof(want),
             "%s:3: fsync: expected always|interval|never, got \"always # "
             "safest\"",
             p2);
    ck_assert_str_eq(err, want);
}
END_TEST

START_TEST(test_file_line_length_limit)
{
    static char text[3 * CONFIG_LINE_MAX];
    struct config c;
    char err[512], want[512];
    size_t n = 0;

    /* A comment exactly CONFIG_LINE_MAX long is fine ... */
    text[n++] = '#';
    memset(text + n, 'x', CONFIG_LINE_MAX - 1);
    n += CONFIG_LINE_MAX - 1;
    text[n++] = '\n';
    text[n] = '\0';
    const char *ok = write_file("ok.conf", text);
    config_defaults(&c);
    ck_assert_pq_ok(config_load_file(&c, ok, err, sizeof(err)));

    /* ... one byte more is an error on its own line number. */
    text[n++] = '#';
    memset(text + n, 'y', CONFIG_LINE_MAX);
    n += CONFIG_LINE_MAX;
    text[n++] = '\n';
    text[n] = '\0';
    const char *bad = write_file("bad.conf", text);
    ck_assert_pq_err(config_load_file(&c, bad, err, sizeof(err)), PQ_EINVAL);
    snprintf(want, sizeof(want), "%s:2: line longer than 4096 bytes", bad);
    ck_assert_str_eq(err, want);
}
END_TEST

START_TEST(test_file_unreadable)
{
    struct config c;
    char err[512], want[512];
    config_defaults(&c);
    snprintf(want, sizeof(want), "%s/nope.conf", tmpdir);
    ck_assert_pq_err(config_load_file(&c, want, err, sizeof(err)), PQ_ESYS);
    ck_assert_msg(strstr(err, "nope.conf: No such file or directory") != NULL,
                  "%s", err);
    ck_assert_pq_err(config_load_file(&c, tmpdir, err, sizeof(err)), PQ_ESYS);
    ck_assert_msg(strstr(err, "Is a directory") != NULL, "%s", err);
}
END_TEST

START_TEST(test_file_nul_byte)
{
    struct config c;
    char err[512];
    const char *path = write_file("nul.conf", "");
    int fd = open(path, O_WRONLY | O_TRUNC);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, "fsync al\0ways\n", 14), 14);
    close(fd);
    config_defaults(&c);
    ck_assert_pq_err(config_load_file(&c, path, err, sizeof(err)), PQ_EINVAL);
    ck_assert_msg(strstr(err, ":1: NUL byte in line") != NULL, "%s", err);
}
END_TEST

/* ---- file syntax ---- */

START_TEST(test_file_comments_blanks_and_spaces)
{
    struct config c;
    char err[512];
    const char *path = write_file(
        "protoqd.conf", "# protoq test\n"
                        "\n"
                        "   \t \n"
                        "    # indented comment\n"
                        "listen   127.0.0.1:9999   \t\n"
                        "\tfsync interval\r\n"
                        "data_dir /srv/protoq data\n"
                        "port_file \"\"\n"
                        "max_message_bytes 2M\n"
                        "max_frame_bytes 4M\n"
                        "max_frame_bytes 8M\n" /* the later line wins */
                        "log_level warn");     /* no newline at EOF */
    config_defaults(&c);
    ck_assert_pq_ok(config_load_file(&c, path, err, sizeof(err)));
    ck_assert_str_eq(err, "");
    ck_assert_str_eq(c.listen, "127.0.0.1:9999");
    ck_assert_int_eq(c.fsync, FSYNC_INTERVAL);
    ck_assert_str_eq(c.data_dir, "/srv/protoq data");
    ck_assert_str_eq(c.port_file, "");
    ck_assert_uint_eq(c.max_message_bytes, 2u << 20);
    ck_assert_uint_eq(c.max_frame_bytes, 8u << 20);
    ck_assert_int_eq(c.log_level, LOG_WARN);
    ck_assert_uint_eq(c.heartbeat_ms, 5000); /* untouched keys keep theirs */
    ck_assert_pq_ok(config_validate(&c, err, sizeof(err)));
}
END_TEST

START_TEST(test_empty_file_changes_nothing)
{
    struct config c, d;
    char err[64];
    const char *path = write_file("empty.conf", "");
    config_defaults(&c);
    config_defaults(&d);
    ck_assert_pq_ok(config_load_file(&c, path, err, sizeof(err)));
    assert_same_config(&c, &d);
}
END_TEST

START_TEST(test_flags_override_file)
{
    struct config c;
    char err[512];
    const char *path = write_file("protoqd.conf", "listen 127.0.0.1:7000\n"
                                                  "data_dir /from/file\n"
                                                  "log_level warn\n");
    config_defaults(&c);
    ck_assert_pq_ok(config_load_file(&c, path, err, sizeof(err)));
    /* main.c: flags after the file. */
    ck_assert_pq_ok(
        config_override(&c, "listen", "127.0.0.1:0", err, sizeof(err)));
    ck_assert_pq_ok(config_set(&c, "data_dir", "/from/flag", err, sizeof(err)));
    ck_assert_str_eq(c.listen, "127.0.0.1:0");
    ck_assert_str_eq(c.data_dir, "/from/flag");
    ck_assert_int_eq(c.log_level, LOG_WARN);
    ck_assert_uint_eq(c.overridden,
                      1); /* listen is key 0; config_set marks nothing */
    ck_assert_pq_err(config_override(&c, "listen", "nope", err, sizeof(err)),
                     PQ_EINVAL);
    ck_assert_pq_err(config_override(&c, "lisen", "1:1", err, sizeof(err)),
                     PQ_EINVAL);
    ck_assert_uint_eq(c.overridden, 1);
    ck_assert_str_eq(c.listen, "127.0.0.1:0");
}
END_TEST

/* ---- cross-field validation ---- */

START_TEST(test_validate_frame_vs_message)
{
    struct config c;
    char err[256];
    config_defaults(&c);
    ck_assert_pq_ok(config_set(&c, "max_frame_bytes", "1M", err, sizeof(err)));
    ck_assert_pq_err(config_validate(&c, err, sizeof(err)), PQ_EINVAL);
    ck_assert_str_eq(err,
                     "max_frame_bytes: expected at least "
                     "max_message_bytes + 65536 (1114112), got \"1048576\"");
    c.max_frame_bytes = 1048576 + 65536;
    ck_assert_pq_ok(config_validate(&c, err, sizeof(err)));
    c.max_frame_bytes--;
    ck_assert_pq_err(config_validate(&c, err, sizeof(err)), PQ_EINVAL);
}
END_TEST

START_TEST(test_validate_heartbeats)
{
    struct config c;
    char err[256];
    config_defaults(&c);
    c.heartbeat_timeout_ms = c.heartbeat_ms;
    ck_assert_pq_err(config_validate(&c, err, sizeof(err)), PQ_EINVAL);
    ck_assert_str_eq(err, "heartbeat_timeout_ms: expected more than "
                          "heartbeat_ms (5000), got \"5000\"");
    c.heartbeat_timeout_ms = 5001;
    ck_assert_pq_ok(config_validate(&c, err, sizeof(err)));
    /* With heartbeats off the timeout is not compared. */
    c.heartbeat_ms = 0;
    c.heartbeat_timeout_ms = 10;
    ck_assert_pq_ok(config_validate(&c, err, sizeof(err)));
}
END_TEST

START_TEST(test_validate_backoff_lease_metrics)
{
    struct config c;
    char err[256];
    config_defaults(&c);
    c.backoff_cap_ms = 999;
    ck_assert_pq_err(config_validate(&c, err, sizeof(err)), PQ_EINVAL);
    ck_assert_str_eq(err, "backoff_cap_ms: expected at least backoff_base_ms "
                          "(1000), got \"999\"");
    c.backoff_cap_ms = 1000;
    ck_assert_pq_ok(config_validate(&c, err, sizeof(err)));

    c.max_lease_ms = 29999;
    ck_assert_pq_err(config_validate(&c, err, sizeof(err)), PQ_EINVAL);
    ck_assert_str_eq(err, "max_lease_ms: expected 0 or at least "
                          "ack_timeout_ms (30000), got \"29999\"");
    c.max_lease_ms = 30000;
    ck_assert_pq_ok(config_validate(&c, err, sizeof(err)));

    snprintf(c.metrics, sizeof(c.metrics), "127.0.0.1:7650");
    ck_assert_pq_err(config_validate(&c, err, sizeof(err)), PQ_EINVAL);
    ck_assert_str_eq(err, "metrics: expected an address other than listen's, "
                          "got \"127.0.0.1:7650\"");
    snprintf(c.metrics, sizeof(c.metrics), "127.0.0.1:7651");
    ck_assert_pq_ok(config_validate(&c, err, sizeof(err)));
    /* Two port-0 listeners get different ports. */
    snprintf(c.listen, sizeof(c.listen), "127.0.0.1:0");
    snprintf(c.metrics, sizeof(c.metrics), "127.0.0.1:0");
    ck_assert_pq_ok(config_validate(&c, err, sizeof(err)));
}
END_TEST

START_TEST(test_validate_rechecks_ranges_set_directly)
{
    struct config c;
    char err[256];
    config_defaults(&c);
    c.max_batch = 0;
    ck_assert_pq_err(config_validate(&c, err, sizeof(err)), PQ_EINVAL);
    ck_assert_str_eq(err, "max_batch: expected 1..1000000, got \"0\"");
    config_defaults(&c);
    c.fsync = (enum fsync_policy)7;
    ck_assert_pq_err(config_validate(&c, err, sizeof(err)), PQ_EINVAL);
    ck_assert_str_eq(err, "fsync: expected always|interval|never, got \"7\"");
    config_defaults(&c);
    snprintf(c.listen, sizeof(c.listen), "nohost");
    ck_assert_pq_err(config_validate(&c, err, sizeof(err)), PQ_EINVAL);
    config_defaults(&c);
    memset(c.port_file, 'x', sizeof(c.port_file)); /* unterminated */
    ck_assert_pq_err(config_validate(&c, err, sizeof(err)), PQ_EINVAL);
}
END_TEST

/* ---- SIGHUP reload ---- */

START_TEST(test_reload_applies_only_reloadable_keys)
{
    struct config live;
    char err[512];
    config_defaults(&live);
    const char *path = write_file("protoqd.conf", "log_level debug\n"
                                                  "max_connections 50\n"
                                                  "max_message_bytes 2M\n"
                                                  "max_batch 7\n"
                                                  "conn_output_high_bytes 1M\n"
                                                  "heartbeat_ms 1s\n"
                                                  "heartbeat_timeout_ms 3s\n"
                                                  "idle_timeout_ms 2s\n"
                                                  "memory_high_bytes 512M\n"
                                                  "data_dir /elsewhere\n"
                                                  "fsync never\n"
                                                  "max_attempts 9\n");
    ck_assert_pq_ok(config_reload_file(&live, path, err, sizeof(err)));
    ck_assert_str_eq(err,
                     "ignored until restart: data_dir, fsync, max_attempts");
    ck_assert_int_eq(live.log_level, LOG_DEBUG);
    ck_assert_uint_eq(live.max_connections, 50);
    ck_assert_uint_eq(live.max_message_bytes, 2u << 20);
    ck_assert_uint_eq(live.max_batch, 7);
    ck_assert_uint_eq(live.conn_output_high_bytes, 1u << 20);
    ck_assert_uint_eq(live.heartbeat_ms, 1000);
    ck_assert_uint_eq(live.heartbeat_timeout_ms, 3000);
    ck_assert_uint_eq(live.idle_timeout_ms, 2000);
    ck_assert_uint_eq(live.memory_high_bytes, 512u << 20);
    ck_assert_str_eq(live.data_dir, "/var/lib/protoq");
    ck_assert_int_eq(live.fsync, FSYNC_ALWAYS);
    ck_assert_uint_eq(live.max_attempts, 5);

    /* Same file again: nothing new to ignore or apply. */
    ck_assert_pq_ok(config_reload_file(&live, path, err, sizeof(err)));
    ck_assert_str_eq(err,
                     "ignored until restart: data_dir, fsync, max_attempts");
    ck_assert_int_eq(live.log_level, LOG_DEBUG);
}
END_TEST

START_TEST(test_reloadable_flags)
{
    static const char *const yes[] = {
        "log_level",
        "log_format",
        "max_connections",
        "max_hello_bytes",
        "max_message_bytes",
        "max_batch",
        "conn_output_high_bytes",
        "heartbeat_ms",
        "heartbeat_timeout_ms",
        "idle_timeout_ms",
        "memory_high_bytes",
        "frame_timeout_ms",
        "idle_conn_timeout_ms",
        "max_connections_per_addr",
        "max_handshake_connections",
        "disconnect_grace_ms",
        "max_held_sessions",
        "max_result_bytes",
        "tls_cert",
        "tls_key",
        "tls_client_ca",
        "tls_client_verify",
    };
    size_t nyes = 0;
    for (size_t i = 0; i < config_key_count(); i++) {
        const char *k = config_key_name(i);
        bool want = false;
        for (size_t j = 0; j < sizeof(yes) / sizeof(yes[0]); j++) {
            want = want || strcmp(k, yes[j]) == 0;
        }
        ck_assert_msg(config_key_reloadable(k) == want, "%s", k);
        nyes += want;
    }
    ck_assert_uint_eq(nyes, sizeof(yes) / sizeof(yes[0]));
    ck_assert(!config_key_reloadable("lisen"));
}
END_TEST

START_TEST(test_reload_removed_line_reverts_to_default)
{
    struct config live;
    char err[256];
    config_defaults(&live);
    live.max_batch = 3;
    live.log_level = LOG_ERR;
    const char *path = write_file("protoqd.conf", "# nothing set\n");
    ck_assert_pq_ok(config_reload_file(&live, path, err, sizeof(err)));
    ck_assert_str_eq(err, "");
    ck_assert_uint_eq(live.max_batch, 10000);
    ck_assert_int_eq(live.log_level, LOG_INFO);
}
END_TEST

START_TEST(test_reload_keeps_command_line_values)
{
    struct config live;
    char err[256];
    config_defaults(&live);
    ck_assert_pq_ok(
        config_override(&live, "log_level", "debug", err, sizeof(err)));
    ck_assert_pq_ok(
        config_override(&live, "data_dir", "/flag/dir", err, sizeof(err)));
    const char *path = write_file("protoqd.conf", "log_level warn\n"
                                                  "data_dir /file/dir\n"
                                                  "max_batch 9\n");
    ck_assert_pq_ok(config_reload_file(&live, path, err, sizeof(err)));
    ck_assert_str_eq(err, "");
    ck_assert_int_eq(live.log_level, LOG_DEBUG);
    ck_assert_str_eq(live.data_dir, "/flag/dir");
    ck_assert_uint_eq(live.max_batch, 9);
    ck_assert_uint_ne(live.overridden, 0);
}
END_TEST

START_TEST(test_reload_error_leaves_live_unchanged)
{
    struct config live, before;
    char err[512], want[512];
    config_defaults(&live);
    live.max_batch = 3;
    before = live;
    const char *bad = write_file("bad.conf", "max_batch 9\nlog_level loud\n");
    ck_assert_pq_err(config_reload_file(&live, bad, err, sizeof(err)),
                     PQ_EINVAL);
    snprintf(want, sizeof(want),
             "%s:2: log_level: expected debug|info|warn|error, got \"loud\"",
             bad);
    ck_assert_str_eq(err, want);
    assert_same_config(&live, &before);

    /* Invalid as a whole file (would not start): rejected too. */
    const char *cross = write_file("cross.conf", "max_frame_bytes 1M\n");
    ck_assert_pq_err(config_reload_file(&live, cross, err, sizeof(err)),
                     PQ_EINVAL);
    ck_assert_msg(
        strstr(err, "cross.conf: max_frame_bytes: expected at least") != NULL,
        "%s", err);
    assert_same_config(&live, &before);

    snprintf(want, sizeof(want), "%s/missing.conf", tmpdir);
    ck_assert_pq_err(config_reload_file(&live, want, err, sizeof(err)),
                     PQ_ESYS);
    assert_same_config(&live, &before);
}
END_TEST

START_TEST(test_reload_rejects_mix_with_running_values)
{
    /* The file raises both limits; only max_message_bytes may change now. */
    struct config live, before;
    char err[512];
    config_defaults(&live);
    before = live;
    const char *path = write_file("protoqd.conf", "max_frame_bytes 64M\n"
                                                  "max_message_bytes 32M\n");
    ck_assert_pq_err(config_reload_file(&live, path, err, sizeof(err)),
                     PQ_EINVAL);
    ck_assert_msg(strstr(err, "max_frame_bytes: expected at least "
                              "max_message_bytes + 65536 (33619968), got "
                              "\"4194304\" (with the running values") != NULL,
                  "%s", err);
    assert_same_config(&live, &before);
}
END_TEST

/* ---- dump ---- */

static const char *
dump_to_file(const struct config *c, const char *name)
{
    const char *path = write_file(name, "");
    int fd = open(path, O_WRONLY | O_TRUNC);
    ck_assert_int_ge(fd, 0);
    config_dump(c, fd);
    ck_assert_int_eq(close(fd), 0);
    return path;
}

START_TEST(test_dump_is_canonical_and_in_table_order)
{
    struct config c;
    char err[256];
    config_defaults(&c);
    ck_assert_pq_ok(config_set(&c, "heartbeat_ms", "2s", err, sizeof(err)));
    ck_assert_pq_ok(config_set(&c, "segment_bytes", "128M", err, sizeof(err)));
    const char *text = read_text(dump_to_file(&c, "dump.conf"));
    static const char head[] = "listen 127.0.0.1:7650\n"
                               "port_file \"\"\n"
                               "metrics \"\"\n"
                               "max_connections 10000\n"
                               "max_frame_bytes 4194304\n";
    ck_assert_msg(strncmp(text, head, sizeof(head) - 1) == 0, "%s", text);
    ck_assert_ptr_nonnull(strstr(text, "\nheartbeat_ms 2000\n"));
    ck_assert_ptr_nonnull(strstr(text, "\nsegment_bytes 134217728\n"));
    ck_assert_ptr_nonnull(strstr(text, "\nfsync always\n"));
    ck_assert_ptr_nonnull(strstr(text, "\ndedup_window_ms 86400000\n"));
    ck_assert_ptr_nonnull(strstr(text, "\ndata_dir /var/lib/protoq\n"));

    /* One line per key, in table order. */
    const char *p = text;
    for (size_t i = 0; i < config_key_count(); i++) {
        size_t n = strlen(config_key_name(i));
        ck_assert_msg(strncmp(p, config_key_name(i), n) == 0 && p[n] == ' ',
                      "line %zu: %.40s", i + 1, p);
        p = strchr(p, '\n');
        ck_assert_ptr_nonnull(p);
        p++;
    }
    ck_assert_str_eq(p, "");
}
END_TEST

START_TEST(test_dump_then_load_round_trips)
{
    struct config c, back;
    char err[512];
    static const char *const kv[][2] = {
        {"listen", "[::1]:0"},
        {"port_file", " /tmp/odd name "},
        {"metrics", "127.0.0.1:7651"},
        {"max_connections", "77"},
        {"max_frame_bytes", "64M"},
        {"max_hello_bytes", "300"},
        {"max_message_bytes", "3M"},
        {"max_batch", "1"},
        {"conn_output_high_bytes", "4G"},
        {"heartbeat_ms", "0"},
        {"heartbeat_timeout_ms", "1d"},
        {"idle_timeout_ms", "1h"},
        {"frame_timeout_ms", "10"},
        {"idle_conn_timeout_ms", "7d"},
        {"max_connections_per_addr", "1"},
        {"max_handshake_connections", "1000000"},
        {"disconnect_grace_ms", "7d"},
        {"max_held_sessions", "1"},
        {"auth_file", "/etc/protoqd/tokens"},
        {"allow_anonymous", "yes"},
        {"tls_listen", "127.0.0.1:0"},
        {"tls_port_file", "/tmp/tls port"},
        {"tls_cert", "/etc/protoq/cert.pem"},
        {"tls_key", "/etc/protoq/key.pem"},
        {"tls_client_ca", "/etc/protoq/ca.pem"},
        {"tls_client_verify", "optional"},
        {"data_dir", "\"\"quoted\"\""},
        {"fsync", "interval"},
        {"fsync_interval_ms", "1m"},
        {"segment_bytes", "1G"},
        {"payload_budget_bytes", "0"},
        {"memory_high_bytes", "1024G"},
        {"ack_timeout_ms", "30d"},
        {"max_attempts", "1000"},
        {"backoff_base_ms", "0"},
        {"backoff_cap_ms", "7d"},
        {"max_lease_ms", "365d"},
        {"dedup_window_ms", "0"},
        {"log_level", "error"},
        {"log_format", "json"},
        {"max_result_bytes", "0"},
    };
    ck_assert_uint_eq(sizeof(kv) / sizeof(kv[0]), config_key_count());
    config_defaults(&c);
    for (size_t i = 0; i < sizeof(kv) / sizeof(kv[0]); i++) {
        ck_assert_msg(config_set(&c, kv[i][0], kv[i][1], err, sizeof(err)) ==
                          PQ_OK,
                      "%s", err);
    }
    ck_assert_pq_ok(config_validate(&c, err, sizeof(err)));
    ck_assert_str_eq(c.port_file, " /tmp/odd name ");
    ck_assert_str_eq(c.data_dir, "\"quoted\"");

    /* Every value differs from its default, so a lost key would show. */
    config_defaults(&back);
    for (size_t i = 0; i < config_key_count(); i++) {
        char a[CONFIG_PATH_MAX];
        const char *k = config_key_name(i);
        ck_assert_pq_ok(config_get(&c, k, a, sizeof(a)));
        ck_assert_msg(strcmp(a, get(&back, k)) != 0, "%s equals default", k);
    }

    const char *path = dump_to_file(&c, "dump.conf");
    ck_assert_pq_ok(config_load_file(&back, path, err, sizeof(err)));
    assert_same_config(&c, &back);

    /* And as a SIGHUP: defaults -> dumped file applies all reloadables. */
    struct config live;
    config_defaults(&live);
    ck_assert_pq_ok(config_reload_file(&live, path, err, sizeof(err)));
    ck_assert_msg(
        strncmp(err, "ignored until restart: listen, port_file, ", 42) == 0,
        "%s", err);
    size_t commas = 0;
    for (const char *q = err; *q != '\0'; q++) {
        commas += *q == ',';
    }
    size_t nreload = 0;
    for (size_t i = 0; i < config_key_count(); i++) {
        nreload += config_key_reloadable(config_key_name(i));
    }
    ck_assert_uint_eq(nreload, 22);
    ck_assert_uint_eq(commas + 1, config_key_count() - nreload);
    /* A short err buffer is cut, never overrun. */
    char tiny[8];
    struct config live2;
    config_defaults(&live2);
    ck_assert_pq_ok(config_reload_file(&live2, path, tiny, sizeof(tiny)));
    ck_assert_str_eq(tiny, "ignored");
    for (size_t i = 0; i < config_key_count(); i++) {
        const char *k = config_key_name(i);
        char a[CONFIG_PATH_MAX];
        ck_assert_pq_ok(config_get(&c, k, a, sizeof(a)));
        if (config_key_reloadable(k)) {
            ck_assert_str_eq(get(&live, k), a);
        } else {
            ck_assert_msg(strstr(err, k) != NULL, "%s not reported: %s", k,
                          err);
        }
    }
}
END_TEST

START_TEST(test_get_errors)
{
    struct config c;
    char small[4];
    config_defaults(&c);
    ck_assert_pq_err(config_get(&c, "nope", small, sizeof(small)),
                     PQ_ENOTFOUND);
    ck_assert_pq_err(config_get(&c, "listen", small, sizeof(small)),
                     PQ_ETOOBIG);
    ck_assert_pq_err(config_get(&c, "max_batch", small, sizeof(small)),
                     PQ_ETOOBIG);
    ck_assert_pq_ok(config_get(&c, "max_attempts", small, sizeof(small)));
    ck_assert_str_eq(small, "5");
}
END_TEST

/* ---- the shipped conf/protoqd.conf ---- */

START_TEST(test_shipped_conf_loads_and_validates)
{
    struct config c;
    char err[512];
    config_defaults(&c);
    ck_assert_msg(config_load_file(&c, shipped_conf(), err, sizeof(err)) ==
                      PQ_OK,
                  "%s", err);
    ck_assert_msg(config_validate(&c, err, sizeof(err)) == PQ_OK, "%s", err);
    /* `make run` keeps its data in the tree. */
    ck_assert_str_eq(c.data_dir, "var/protoq");
}
END_TEST

START_TEST(test_shipped_conf_names_every_key)
{
    const char *text = read_text(shipped_conf());

    for (size_t i = 0; i < config_key_count(); i++) {
        const char *k = config_key_name(i);
        size_t n = strlen(k);
        bool found = false;
        for (const char *l = text; *l != '\0' && !found;) {
            const char *s = l + (*l == '#');
            found = strncmp(s, k, n) == 0 &&
                    (s[n] == ' ' || s[n] == '\n' || s[n] == '\0');
            l = strchr(l, '\n');
            l = l != NULL ? l + 1 : "";
        }
        ck_assert_msg(found, "%s: no `#%s` or `%s` line", shipped_conf(), k, k);
    }
}
END_TEST

START_TEST(test_shipped_conf_commented_values_are_defaults)
{
    static char text[1 << 16];
    bool seen[64] = {false};
    struct config d;

    ck_assert_uint_le(config_key_count(), 64);
    snprintf(text, sizeof(text), "%s", read_text(shipped_conf()));
    config_defaults(&d);
    for (char *l = strtok(text, "\n"); l != NULL; l = strtok(NULL, "\n")) {
        char key[64], val[256], buf[CONFIG_PATH_MAX], err[256];
        size_t i;

        /* `#key value`, '#' right before a known key; prose has "# ". */
        if (l[0] != '#' || l[1] == ' ' || l[1] == '\0' ||
            sscanf(l + 1, "%63s %255[^\n]", key, val) != 2) {
            continue;
        }
        for (i = 0; i < config_key_count(); i++) {
            if (strcmp(config_key_name(i), key) == 0) {
                break;
            }
        }
        if (i == config_key_count()) {
            continue;
        }
        struct config c = d;
        ck_assert_msg(config_set(&c, key, val, err, sizeof(err)) == PQ_OK,
                      "%s: `#%s %s`: %s", shipped_conf(), key, val, err);
        ck_assert_pq_ok(config_get(&c, key, buf, sizeof(buf)));
        ck_assert_msg(strcmp(buf, get(&d, key)) == 0,
                      "%s: `#%s %s` is not the default (%s)", shipped_conf(),
                      key, val, get(&d, key));
        seen[i] = true;
    }
    for (size_t i = 0; i < config_key_count(); i++) {
        ck_assert_msg(seen[i], "%s: no `#%s DEFAULT` line", shipped_conf(),
                      config_key_name(i));
    }
}
END_TEST

static Suite *
config_suite(void)
{
    Suite *s = suite_create("config");
    TCase *tc;

    tc = tcase_create("defaults");
    tcase_add_test(tc, test_defaults_are_the_documented_values);
    tcase_add_test(tc, test_defaults_pass_validation);
    tcase_add_test(tc, test_key_table_is_complete_and_unique);
    suite_add_tcase(s, tc);

    tc = tcase_create("parse");
    tcase_add_test(tc, test_duration_suffixes);
    tcase_add_test(tc, test_duration_rejects_garbage_and_overflow);
    tcase_add_test(tc, test_bytes_suffixes);
    tcase_add_test(tc, test_bytes_rejects_garbage_and_overflow);
    tcase_add_test(tc, test_split_hostport_accepts);
    tcase_add_test(tc, test_split_hostport_rejects);
    tcase_add_test(tc, test_set_each_type);
    tcase_add_test(tc, test_range_edges);
    tcase_add_test(tc, test_string_quotes_and_limits);
    suite_add_tcase(s, tc);

    tc = tcase_create("errors");
    tcase_add_checked_fixture(tc, setup_tmpdir, teardown_tmpdir);
    tcase_add_test(tc, test_set_error_messages_are_exact);
    tcase_add_test(tc, test_file_range_error_names_path_and_line);
    tcase_add_test(tc, test_file_unknown_key_names_path_and_line);
    tcase_add_test(tc, test_file_missing_value_and_trailing_comment);
    tcase_add_test(tc, test_file_line_length_limit);
    tcase_add_test(tc, test_file_unreadable);
    tcase_add_test(tc, test_file_nul_byte);
    suite_add_tcase(s, tc);

    tc = tcase_create("file");
    tcase_add_checked_fixture(tc, setup_tmpdir, teardown_tmpdir);
    tcase_add_test(tc, test_file_comments_blanks_and_spaces);
    tcase_add_test(tc, test_empty_file_changes_nothing);
    tcase_add_test(tc, test_flags_override_file);
    suite_add_tcase(s, tc);

    tc = tcase_create("validate");
    tcase_add_test(tc, test_validate_frame_vs_message);
    tcase_add_test(tc, test_validate_heartbeats);
    tcase_add_test(tc, test_validate_backoff_lease_metrics);
    tcase_add_test(tc, test_validate_rechecks_ranges_set_directly);
    suite_add_tcase(s, tc);

    tc = tcase_create("reload");
    tcase_add_checked_fixture(tc, setup_tmpdir, teardown_tmpdir);
    tcase_add_test(tc, test_reload_applies_only_reloadable_keys);
    tcase_add_test(tc, test_reloadable_flags);
    tcase_add_test(tc, test_reload_removed_line_reverts_to_default);
    tcase_add_test(tc, test_reload_keeps_command_line_values);
    tcase_add_test(tc, test_reload_error_leaves_live_unchanged);
    tcase_add_test(tc, test_reload_rejects_mix_with_running_values);
    suite_add_tcase(s, tc);

    tc = tcase_create("dump");
    tcase_add_checked_fixture(tc, setup_tmpdir, teardown_tmpdir);
    tcase_add_test(tc, test_dump_is_canonical_and_in_table_order);
    tcase_add_test(tc, test_dump_then_load_round_trips);
    tcase_add_test(tc, test_get_errors);
    suite_add_tcase(s, tc);

    tc = tcase_create("shipped_conf");
    tcase_add_test(tc, test_shipped_conf_loads_and_validates);
    tcase_add_test(tc, test_shipped_conf_names_every_key);
    tcase_add_test(tc, test_shipped_conf_commented_values_are_defaults);
    suite_add_tcase(s, tc);

    return s;
}

int
main(void)
{
    SRunner *sr = srunner_create(config_suite());
    srunner_run_all(sr, CK_NORMAL);
    int failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
