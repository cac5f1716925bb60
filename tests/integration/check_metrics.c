/*
 * check_metrics.c: protoqd's HTTP side against a real broker started with
 * --metrics 127.0.0.1:0 (the port file's second line names the port):
 * /metrics parses as the Prometheus text format (every line checked by the
 * small parser below), has the names of the design, and its counters move
 * with traffic; /healthz, /readyz, unknown paths, other methods, and a
 * request with oversized headers.
 */
#include <arpa/inet.h>
#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <check.h>

#include "testutil.h"

static struct srv g_srv;
static uint16_t g_mport;
static const char *const g_args[] = {"--metrics", "127.0.0.1:0", NULL};

static void
setup(void)
{
    char path[320], buf[128];
    const char *p;

    signal(SIGPIPE, SIG_IGN);
    if (srv_start(&g_srv, g_args) != 0) {
        srv_cleanup(&g_srv);
        ck_abort_msg("could not start protoqd --metrics 127.0.0.1:0");
    }
    snprintf(path, sizeof(path), "%s/port", g_srv.dir);
    file_slurp(path, buf, sizeof(buf));
    p = strstr(buf, "\nmetrics ");
    ck_assert_msg(p != NULL, "no metrics port in the port file: \"%s\"", buf);
    g_mport = (uint16_t)strtoul(p + 9, NULL, 10);
    ck_assert_uint_ne(g_mport, 0);
}

static void
teardown(void)
{
    int rc = g_srv.pid > 0 ? srv_stop(&g_srv) : 0;

    srv_cleanup(&g_srv);
    ck_assert_msg(rc == 0, "protoqd exited %d", rc);
}

/* ---- a minimal HTTP/1.0 client ---- */

struct reply {
    int status;
    char *head; /* status line and headers */
    char *body; /* NUL-terminated */
    size_t body_len;
};

static void
reply_free(struct reply *r)
{
    free(r->head);
    free(r->body);
}

/* Send req as is on a new connection; read until the broker closes. */
static struct reply
http_raw(const char *req)
{
    struct reply r = {0};
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    int64_t deadline = now_ms_mono() + 5000;
    int fd = raw_connect(g_mport);
    char *sep;

    ck_assert_ptr_nonnull(buf);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(raw_send(fd, req, strlen(req)), 0);
    for (;;) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        int64_t left = deadline - now_ms_mono();
        ssize_t n;

        ck_assert_msg(left > 0, "no complete reply to %.20s within 5 s", req);
        if (poll(&pfd, 1, (int)left) <= 0) {
            continue;
        }
        if (len + 4096 > cap) {
            cap *= 2;
            buf = realloc(buf, cap);
            ck_assert_ptr_nonnull(buf);
        }
        n = recv(fd, buf + len, cap - len - 1, 0);
        if (n == 0 || (n < 0 && errno == ECONNRESET)) {
            break;
        }
        ck_assert_msg(n > 0 || errno == EINTR, "recv: %s", strerror(errno));
        len += n > 0 ? (size_t)n : 0;
    }
    close(fd);
    buf[len] = '\0';
    sep = strstr(buf, "\r\n\r\n");
    ck_assert_msg(sep != NULL, "no end of headers in \"%s\"", buf);
    *sep = '\0';
    r.head = strdup(buf);
    r.body_len = len - (size_t)(sep + 4 - buf);
    r.body = malloc(r.body_len + 1);
    memcpy(r.body, sep + 4, r.body_len + 1);
    ck_assert_int_eq(sscanf(buf, "HTTP/1.%*d %d", &r.status), 1);
    free(buf);
    return r;
}

static struct reply
http_get(const char *path)
{
    char req[256];

    snprintf(req, sizeof(req), "GET %s HTTP/1.0\r\nHost: x\r\n\r\n", path);
    return http_raw(req);
}

/* ---- the text format (version 0.0.4), strictly ---- */

enum { MAX_SERIES = 4096, MAX_FAMILIES = 256, NAME_MAX_ = 200 };

struct series {
    char key[384]; /* name{labels} as written */
    char name[NAME_MAX_];
    double value;
};

struct family {
    char name[NAME_MAX_];
    char type[16];
    bool help;
};

struct page {
    struct series s[MAX_SERIES];
    size_t ns;
    struct family f[MAX_FAMILIES];
    size_t nf;
};

static bool
name_ok(const char *p, size_t n)
{
    if (n == 0 ||
        !(isalpha((unsigned char)p[0]) || p[0] == '_' || p[0] == ':')) {
        return false;
    }
    for (size_t i = 1; i < n; i++) {
        if (!(isalnum((unsigned char)p[i]) || p[i] == '_' || p[i] == ':')) {
            return false;
        }
    }
    return true;
}

static struct family *
find_family(struct page *pg, const char *name)
{
    for (size_t i = 0; i < pg->nf; i++) {
        if (strcmp(pg->f[i].name, name) == 0) {
            return &pg->f[i];
        }
    }
    return NULL;
}

/* The family a sample belongs to (histogram samples carry a suffix). */
static struct family *
family_of(struct page *pg, const char *name, const char **suffix)
{
    static const char *const sfx[] = {"_bucket", "_sum", "_count"};
    struct family *f = find_family(pg, name);

    *suffix = "";
    if (f != NULL) {
        return f;
    }
    for (size_t i = 0; i < 3; i++) {
        size_t n = strlen(name), k = strlen(sfx[i]);
        char base[NAME_MAX_];

        if (n > k && strcmp(name + n - k, sfx[i]) == 0 && n - k < NAME_MAX_) {
            memcpy(base, name, n - k);
            base[n - k] = '\0';
            f = find_family(pg, base);
            if (f != NULL && strcmp(f->type, "histogram") == 0) {
                *suffix = sfx[i];
                return f;
            }
        }
    }
    return NULL;
}

/*
 * parse_labels: {name="value",...} at *pp; checks names and escapes.
 * Writes the le label's value (if any) into le.
 */
static void
parse_labels(const char **pp, int lineno, char *le, size_t lelen)
{
    const char *p = *pp + 1;

    le[0] = '\0';
    while (*p != '}') {
        const char *n0 = p;
        char val[256];
        size_t vl = 0;

        while (isalnum((unsigned char)*p) || *p == '_') {
            p++;
        }
        ck_assert_msg(name_ok(n0, (size_t)(p - n0)) && n0[0] != ':',
                      "line %d: bad label name", lineno);
        ck_assert_msg(p[0] == '=' && p[1] == '"', "line %d: want =\"", lineno);
        p += 2;
        while (*p != '"') {
            ck_assert_msg(*p != '\0' && *p != '\n',
                          "line %d: unterminated label value", lineno);
            if (*p == '\\') {
                ck_assert_msg(p[1] == '\\' || p[1] == '"' || p[1] == 'n',
                              "line %d: bad escape \\%c", lineno, p[1]);
                p++;
            }
            if (vl + 1 < sizeof(val)) {
                val[vl++] = *p;
            }
            p++;
        }
        val[vl] = '\0';
        p++;
        if ((size_t)(p - n0) > 4 && strncmp(n0, "le=", 3) == 0) {
            snprintf(le, lelen, "%.63s", val);
        }
        if (*p == ',') {
            p++;
        } else {
            ck_assert_msg(*p == '}', "line %d: want , or }", lineno);
        }
    }
    *pp = p + 1;
}

static void
parse_page(const char *body, struct page *pg)
{
    const char *line = body;
    int lineno = 0;
    double last_bucket = -1, last_le = -INFINITY;
    char bucket_of[NAME_MAX_] = "";

    memset(pg, 0, sizeof(*pg));
    ck_assert_msg(body[0] != '\0' && body[strlen(body) - 1] == '\n',
                  "the page must end with a newline");
    while (*line != '\0') {
        const char *end = strchr(line, '\n');
        char buf[1024];
        size_t n = (size_t)(end - line);

        lineno++;
        ck_assert_msg(n < sizeof(buf), "line %d too long", lineno);
        memcpy(buf, line, n);
        buf[n] = '\0';
        line = end + 1;
        ck_assert_msg(n > 0, "line %d is empty", lineno);
        if (buf[0] == '#') {
            char kw[8], name[NAME_MAX_], rest[512];
            struct family *f;

            ck_assert_msg(
                sscanf(buf, "# %7s %199s %511[^\n]", kw, name, rest) == 3,
                "line %d: bad comment \"%s\"", lineno, buf);
            ck_assert_msg(name_ok(name, strlen(name)), "line %d: bad name",
                          lineno);
            f = find_family(pg, name);
            if (f == NULL) {
                ck_assert_uint_lt(pg->nf, MAX_FAMILIES);
                f = &pg->f[pg->nf++];
                snprintf(f->name, sizeof(f->name), "%s", name);
            }
            if (strcmp(kw, "HELP") == 0) {
                ck_assert_msg(!f->help, "line %d: second HELP for %s", lineno,
                              name);
                f->help = true;
            } else {
                ck_assert_msg(strcmp(kw, "TYPE") == 0,
                              "line %d: comment is neither HELP nor TYPE",
                              lineno);
                ck_assert_msg(f->type[0] == '\0', "line %d: second TYPE for %s",
                              lineno, name);
                ck_assert_msg(strcmp(rest, "counter") == 0 ||
                                  strcmp(rest, "gauge") == 0 ||
                                  strcmp(rest, "histogram") == 0,
                              "line %d: type %s", lineno, rest);
                snprintf(f->type, sizeof(f->type), "%.15s", rest);
            }
            continue;
        }
        /* name{labels} value */
        const char *p = buf, *suffix;
        struct series *s;
        struct family *f;
        char le[64] = "", *vend;

        while (isalnum((unsigned char)*p) || *p == '_' || *p == ':') {
            p++;
        }
        ck_assert_uint_lt(pg->ns, MAX_SERIES);
        s = &pg->s[pg->ns];
        ck_assert_msg(name_ok(buf, (size_t)(p - buf)) &&
                          (size_t)(p - buf) < NAME_MAX_,
                      "line %d: bad metric name", lineno);
        memcpy(s->name, buf, (size_t)(p - buf));
        s->name[p - buf] = '\0';
        if (*p == '{') {
            parse_labels(&p, lineno, le, sizeof(le));
        }
        ck_assert_msg(*p == ' ', "line %d: want a blank before the value",
                      lineno);
        snprintf(s->key, sizeof(s->key), "%.*s", (int)(p - buf), buf);
        s->value = strtod(p + 1, &vend);
        ck_assert_msg(vend != p + 1 && *vend == '\0',
                      "line %d: bad value \"%s\"", lineno, p + 1);
        f = family_of(pg, s->name, &suffix);
        ck_assert_msg(f != NULL && f->type[0] != '\0' && f->help,
                      "line %d: %s has no HELP and TYPE before it", lineno,
                      s->name);
        if (strcmp(f->type, "counter") == 0) {
            ck_assert_msg(
                strlen(s->name) > 6 &&
                    strcmp(s->name + strlen(s->name) - 6, "_total") == 0,
                "line %d: counter %s without _total", lineno, s->name);
        }
        if (strcmp(f->type, "counter") == 0 || strcmp(suffix, "") != 0) {
            ck_assert_msg(s->value >= 0, "line %d: negative", lineno);
        }
        if (strcmp(suffix, "_bucket") == 0) {
            double lev;

            ck_assert_msg(le[0] != '\0', "line %d: bucket without le", lineno);
            lev = strcmp(le, "+Inf") == 0 ? INFINITY : strtod(le, NULL);
            if (strcmp(bucket_of, f->name) != 0) {
                snprintf(bucket_of, sizeof(bucket_of), "%s", f->name);
                last_bucket = -1;
                last_le = -INFINITY;
            }
            ck_assert_msg(lev > last_le, "line %d: le not increasing", lineno);
            ck_assert_msg(s->value >= last_bucket,
                          "line %d: buckets not cumulative", lineno);
            last_le = lev;
            last_bucket = s->value;
        }
        if (strcmp(suffix, "_count") == 0) {
            ck_assert_msg(strcmp(bucket_of, f->name) == 0 && isinf(last_le) &&
                              last_bucket == s->value,
                          "line %d: _count differs from the +Inf bucket",
                          lineno);
        }
        for (size_t i = 0; i < pg->ns; i++) {
            ck_assert_msg(strcmp(pg->s[i].key, s->key) != 0,
                          "line %d: %s twice", lineno, s->key);
        }
        pg->ns++;
    }
}

/* The value of series key (name{labels} exactly as written); fails the
 * test when it is missing. */
static double
val(const struct page *pg, const char *key)
{
    for (size_t i = 0; i < pg->ns; i++) {
        if (strcmp(pg->s[i].key, key) == 0) {
            return pg->s[i].value;
        }
    }
    ck_abort_msg("no series %s", key);
    return 0;
}

static struct page *
scrape(void)
{
    struct page *pg = malloc(sizeof(*pg));
    struct reply r = http_get("/metrics");

    ck_assert_ptr_nonnull(pg);
    ck_assert_int_eq(r.status, 200);
    ck_assert_msg(strstr(r.head, "text/plain; version=0.0.4") != NULL,
                  "content type: %s", r.head);
    ck_assert_uint_eq(strlen(r.body), r.body_len);
    parse_page(r.body, pg);
    reply_free(&r);
    return pg;
}

/* ---- tests ---- */

START_TEST(test_metrics_parse_and_have_the_design_names)
{
    struct page *pg;
    protoq_client *c = pq_connect_or_fail(&g_srv);
    static const char *const families[] = {
        "protoq_queue_ready",
        "protoq_queue_delayed",
        "protoq_queue_inflight",
        "protoq_queue_consumers",
        "protoq_queue_bytes",
        "protoq_queue_published_total",
        "protoq_queue_acked_total",
        "protoq_queue_nacked_total",
        "protoq_queue_redelivered_total",
        "protoq_queue_expired_total",
        "protoq_queue_dead_lettered_total",
        "protoq_connections",
        "protoq_fsync_seconds",
        "protoq_commit_batch_messages",
        "protoq_disk_full_total",
        "protoq_auth_failures_total",
        "protoq_sessions_disconnected",
        "protoq_sessions_resumed_total",
        "protoq_sessions_expired_total",
        "protoq_memory_bytes",
        "protoq_memory_high_bytes",
        "protoq_payload_budget_bytes",
        "protoq_frames_in_total",
        "protoq_frames_out_total",
        "protoq_bytes_in_total",
        "protoq_bytes_out_total",
    };

    pq_check_ok(c, protoq_queue_create(c, "jobs.a", NULL));
    pq_check_ok(c, protoq_queue_create(c, "jobs:b-2_x", NULL));
    pg = scrape();
    for (size_t i = 0; i < sizeof(families) / sizeof(families[0]); i++) {
        struct family *f = find_family(pg, families[i]);
        ck_assert_msg(f != NULL, "no family %s", families[i]);
    }
    ck_assert_str_eq(find_family(pg, "protoq_fsync_seconds")->type,
                     "histogram");
    ck_assert(val(pg, "protoq_queue_ready{queue=\"jobs:b-2_x\"}") == 0);
    ck_assert(val(pg, "protoq_connections{state=\"ready\"}") >= 1);
    ck_assert(val(pg, "protoq_memory_bytes") > 0);
    ck_assert(val(pg, "protoq_memory_high_bytes") == 1073741824.0);
    ck_assert(val(pg, "protoq_auth_failures_total") == 0);
    free(pg);
    protoq_close(c);
}
END_TEST

START_TEST(test_metrics_counters_move_with_traffic)
{
    struct page *a, *b;
    protoq_client *c = pq_connect_or_fail(&g_srv);
    const char *cli = getenv("PROTOQ") ? getenv("PROTOQ") : "build/protoq";
    char out[320];
    int rc;

    pq_check_ok(c, protoq_queue_create(c, "m", NULL));
    a = scrape();
    for (int i = 0; i < 10; i++) {
        struct protoq_message m = {.payload = "0123456789", .len = 10};
        uint64_t id;
        pq_check_ok(c, protoq_publish(c, "m", &m, &id));
    }
    {
        const char *argv[] = {cli, "-s",      g_srv.addr, "consume",
                              "m", "--count", "4",        NULL};
        snprintf(out, sizeof(out), "%s/consume.out", g_srv.dir);
        rc = prog_run(argv, out, 10000);
        ck_assert_int_eq(rc, 0);
    }
    usleep(200 * 1000); /* the acks of the CLI's last messages */
    b = scrape();
    ck_assert(val(b, "protoq_queue_published_total{queue=\"m\"}") == 10);
    ck_assert(val(b, "protoq_queue_acked_total{queue=\"m\"}") == 4);
    ck_assert(val(b, "protoq_queue_ready{queue=\"m\"}") == 6);
    ck_assert(val(b, "protoq_queue_bytes{queue=\"m\"}") == 60);
    ck_assert(val(b, "protoq_queue_inflight{queue=\"m\"}") == 0);
    ck_assert(val(b, "protoq_frames_in_total") >=
              val(a, "protoq_frames_in_total") + 10 + 4);
    ck_assert(val(b, "protoq_frames_out_total") >
              val(a, "protoq_frames_out_total") + 10);
    ck_assert(val(b, "protoq_bytes_in_total") >
              val(a, "protoq_bytes_in_total") + 100);
    ck_assert(val(b, "protoq_fsync_seconds_count") >=
              val(a, "protoq_fsync_seconds_count") + 1);
    ck_assert(val(b, "protoq_fsync_seconds_sum") > 0);
    ck_assert(val(b, "protoq_commit_batch_messages_count") >=
              val(a, "protoq_commit_batch_messages_count") + 1);
    ck_assert(val(b, "protoq_commit_batch_messages_sum") -
                  val(a, "protoq_commit_batch_messages_sum") ==
              10);
    ck_assert(val(b, "protoq_connections_accepted_total") >=
              val(a, "protoq_connections_accepted_total") + 1);
    free(a);
    free(b);
    protoq_close(c);
}
END_TEST

START_TEST(test_health_ready_and_http_limits)
{
    struct reply r;
    char *big;

    r = http_get("/healthz");
    ck_assert_int_eq(r.status, 200);
    ck_assert_str_eq(r.body, "ok\n");
    reply_free(&r);
    r = http_get("/readyz");
    ck_assert_int_eq(r.status, 200);
    ck_assert_str_eq(r.body, "ready\n");
    reply_free(&r);
    r = http_get("/metrics?x=1");
    ck_assert_int_eq(r.status, 200);
    reply_free(&r);
    r = http_get("/nope");
    ck_assert_int_eq(r.status, 404);
    reply_free(&r);
    r = http_raw("POST /metrics HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi");
    ck_assert_msg(r.status == 405 || r.status == 501, "POST: %d", r.status);
    reply_free(&r);
    /* Headers over 8 KiB are refused; the broker goes on serving. */
    big = malloc(20000);
    ck_assert_ptr_nonnull(big);
    snprintf(big, 20000, "GET /metrics HTTP/1.0\r\nX-Big: %0*d\r\n\r\n", 16000,
             7);
    {
        int fd = raw_connect(g_mport);
        ck_assert_int_ge(fd, 0);
        (void)raw_send(fd, big, strlen(big));
        ck_assert(raw_wait_eof(fd, 5000));
        close(fd);
    }
    free(big);
    r = http_get("/healthz");
    ck_assert_int_eq(r.status, 200);
    reply_free(&r);
}
END_TEST

static Suite *
metrics_suite(void)
{
    Suite *s = suite_create("metrics");
    TCase *tc = tcase_create("http");

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    suite_add_tcase(s, tc);
    tcase_add_test(tc, test_metrics_parse_and_have_the_design_names);
    tcase_add_test(tc, test_metrics_counters_move_with_traffic);
    tcase_add_test(tc, test_health_ready_and_http_limits);
    return s;
}

int
main(void)
{
    SRunner *sr = srunner_create(metrics_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
