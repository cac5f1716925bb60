/*
 * cli.c: the protoq command-line tool. It only uses libprotoq (protoq.h)
 * and the C library; it parses its own durations and sizes rather than
 * borrowing broker code.
 *
 *   protoq [-s HOST:PORT] queue create|ls|stat|purge|rm ...
 *   protoq [-s HOST:PORT] pub QUEUE [DATA] ...
 *   protoq [-s HOST:PORT] consume QUEUE ...
 *   protoq [-s HOST:PORT] work QUEUE ... -- COMMAND [ARG]...
 *
 * Exit status: 0 ok, 1 error (one line on stderr), 2 usage. Output
 * correctness rules: `pub --lines` exits 0 only after every line was
 * confirmed; `consume` never acks a message before its output reached
 * stdout (fflush first, then the acks go out).
 */
#include "protoq.h"

#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#ifndef PROTOQ_VERSION
#define PROTOQ_VERSION "0.1.0"
#endif

enum {
    EXIT_OK = 0,
    EXIT_ERR = 1,
    EXIT_USAGE = 2,
    LINES_WINDOW = 1000,      /* unconfirmed publishes of pub --lines */
    MAX_KV = 64,              /* --header / --require / --tag each */
    DEFAULT_PREFETCH = 1000,
    DEFAULT_WAIT_MS = 5000,
};

static const char usage_text[] =
    "usage: protoq [-s HOST:PORT] COMMAND [ARGS]\n"
    "\n"
    "  queue create NAME [--max-length N] [--max-bytes N[k|m|g]]\n"
    "               [--ack-timeout D] [--max-attempts N] [--dead-letter Q]\n"
    "               [--backoff BASE[:CAP]] [--ttl D] [--dedup-window D]\n"
    "               [--max-lease D] [--dead-letter-expired] [--transient]\n"
    "  queue ls                 queues with ready, delayed, inflight, consumers\n"
    "  queue stat NAME          every attribute and counter\n"
    "  queue purge NAME         drop ready and delayed messages\n"
    "  queue rm NAME            delete the queue\n"
    "  pub QUEUE [DATA] [--file F] [--lines] [--priority P] [--delay D]\n"
    "            [--ttl D] [--header K=V]... [--key IDEMPOTENCY_KEY]\n"
    "            [--require K=V]...\n"
    "      No DATA and no --file: stdin is one message. --lines: each stdin\n"
    "      line is one message (pipelined); exits 0 only when every line\n"
    "      was confirmed. Prints the message id of a single publish.\n"
    "  consume QUEUE [--count N] [--wait D] [--prefetch N] [--json]\n"
    "                [--no-ack | --nack] [--tag K=V]...\n"
    "      Prints each payload on its own line (--json: one object per line\n"
    "      with id, attempt, priority, headers, payload or payload_base64)\n"
    "      and acks it after it was written. Stops after --count messages or\n"
    "      when nothing arrived for --wait; with --count and no --wait it\n"
    "      waits forever, with neither --wait is 5s. Exit 0 when the count\n"
    "      was reached or the wait ran out (even after 0 messages).\n"
    "      --no-ack: ack nothing (messages return to the queue on exit);\n"
    "      --nack: nack each (requeued with the queue's backoff).\n"
    "  work QUEUE [--concurrency N] [--tag K=V]... -- COMMAND [ARG]...\n"
    "      Runs COMMAND once per job: payload on stdin, PROTOQ_MESSAGE_ID,\n"
    "      PROTOQ_ATTEMPT, PROTOQ_QUEUE and PROTOQ_HEADER_<KEY> in the\n"
    "      environment; touches the lease while it runs; acks on exit 0 and\n"
    "      nacks otherwise. Runs until interrupted.\n"
    "\n"
    "Durations (D): 500ms, 10s, 5m, 1h, 2d; a plain number is milliseconds.\n"
    "The server is -s HOST:PORT, else $PROTOQ_SERVER, else 127.0.0.1:7650.\n"
    "Exit status: 0 ok, 1 error, 2 usage.\n";

/* The global options and what every command needs. */
struct cli {
    const char *server;
    const char *cmd;          /* e.g. "pub jobs", for error messages */
    char cmdbuf[300];
    protoq_client *c;
};

/* ---- messages ---- */

__attribute__((format(printf, 2, 3))) static int
fail(const struct cli *cli, const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "protoq: %s: ", cli->cmd);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    return EXIT_ERR;
}

/* Report a failed library call on cli->c. */
static int
fail_pq(const struct cli *cli, int rc)
{
    const char *msg = cli->c ? protoq_errmsg(cli->c) : "";

    if (msg[0] == '\0') {
        msg = pq_strerror(rc);
    }
    if (rc == PQ_EREMOTE && cli->c != NULL &&
        protoq_last_error_code(cli->c) != 0) {
        return fail(cli, "%s (%s)", msg,
                    protoq_code_name(protoq_last_error_code(cli->c)));
    }
    return fail(cli, "%s", msg);
}

__attribute__((format(printf, 1, 2))) static int
usage_err(const char *fmt, ...)
{
    va_list ap;

    fputs("protoq: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputs("\n", stderr);
    fputs(usage_text, stderr);
    return EXIT_USAGE;
}

/* ---- parsing ---- */

/* parse_u64: a whole decimal number. */
static bool
parse_u64(const char *s, uint64_t *out)
{
    char *end;
    unsigned long long v;

    if (s == NULL || !isdigit((unsigned char)s[0])) {
        return false;
    }
    errno = 0;
    v = strtoull(s, &end, 10);
    if (errno != 0 || *end != '\0') {
        return false;
    }
    *out = v;
    return true;
}

/* parse_duration_ms: "500ms", "10s", "1.5m", "1h", "2d", or a plain
 * number of milliseconds. */
static bool
parse_duration_ms(const char *s, uint64_t *out)
{
    char *end;
    double v, mult;

    if (s == NULL || !(isdigit((unsigned char)s[0]) || s[0] == '.')) {
        return false;
    }
    errno = 0;
    v = strtod(s, &end);
    if (errno != 0 || end == s || v < 0) {
        return false;
    }
    if (*end == '\0' || strcmp(end, "ms") == 0) {
        mult = 1;
    } else if (strcmp(end, "s") == 0) {
        mult = 1000;
    } else if (strcmp(end, "m") == 0 || strcmp(end, "min") == 0) {
        mult = 60000;
    } else if (strcmp(end, "h") == 0) {
        mult = 3600000;
    } else if (strcmp(end, "d") == 0) {
        mult = 86400000;
    } else {
        return false;
    }
    v *= mult;
    if (v > 1.8e19) {
        return false;
    }
    *out = (uint64_t)(v + 0.5);
    return true;
}

/* parse_size: bytes with an optional k/m/g suffix (powers of 1024, an
 * optional trailing "b"/"ib" ignored). */
static bool
parse_size(const char *s, uint64_t *out)
{
    char *end;
    unsigned long long v;
    uint64_t mult = 1;

    if (s == NULL || !isdigit((unsigned char)s[0])) {
        return false;
    }
    errno = 0;
    v = strtoull(s, &end, 10);
    if (errno != 0) {
        return false;
    }
    switch (tolower((unsigned char)*end)) {
    case '\0':
        break;
    case 'k':
        mult = 1024;
        end++;
        break;
    case 'm':
        mult = 1024 * 1024;
        end++;
        break;
    case 'g':
        mult = 1024ull * 1024 * 1024;
        end++;
        break;
    case 'b':
        break;
    default:
        return false;
    }
    if (strcasecmp(end, "") != 0 && strcasecmp(end, "b") != 0 &&
        strcasecmp(end, "ib") != 0) {
        return false;
    }
    if (v > UINT64_MAX / mult) {
        return false;
    }
    *out = v * mult;
    return true;
}

/* A list of K=V pairs from repeated options; the strings point into argv
 * (which we split in place at the '='). */
struct kvlist {
    struct protoq_kv kv[MAX_KV];
    size_t n;
};

static bool
kv_add(struct kvlist *l, char *arg)
{
    char *eq = strchr(arg, '=');

    if (eq == NULL || eq == arg || l->n == MAX_KV) {
        return false;
    }
    *eq = '\0';
    l->kv[l->n].key = arg;
    l->kv[l->n].value = eq + 1;
    l->n++;
    return true;
}

/* ---- connecting ---- */

static int
cli_connect(struct cli *cli)
{
    struct protoq_opts o;
    int rc;

    memset(&o, 0, sizeof(o));
    o.client_name = "protoq-cli";
    o.auth_token = getenv("PROTOQ_TOKEN");
    o.io_timeout_ms = 60000;
    rc = protoq_connect(cli->server, &o, &cli->c);
    if (rc != PQ_OK) {
        int ret = fail_pq(cli, rc);

        protoq_close(cli->c);
        cli->c = NULL;
        return ret;
    }
    return EXIT_OK;
}

/* ---- queue ---- */

static int
cmd_queue_create(struct cli *cli, int argc, char **argv)
{
    enum {
        O_MAXLEN = 256, O_MAXBYTES, O_ACK, O_ATTEMPTS, O_DLQ, O_BACKOFF,
        O_TTL, O_DEDUP, O_LEASE, O_DLEXP, O_TRANSIENT
    };
    static const struct option opts[] = {
        {"max-length", required_argument, NULL, O_MAXLEN},
        {"max-bytes", required_argument, NULL, O_MAXBYTES},
        {"ack-timeout", required_argument, NULL, O_ACK},
        {"max-attempts", required_argument, NULL, O_ATTEMPTS},
        {"dead-letter", required_argument, NULL, O_DLQ},
        {"backoff", required_argument, NULL, O_BACKOFF},
        {"ttl", required_argument, NULL, O_TTL},
        {"dedup-window", required_argument, NULL, O_DEDUP},
        {"max-lease", required_argument, NULL, O_LEASE},
        {"dead-letter-expired", no_argument, NULL, O_DLEXP},
        {"transient", no_argument, NULL, O_TRANSIENT},
        {NULL, 0, NULL, 0},
    };
    struct protoq_queue_attrs a;
    uint64_t v;
    int ch, rc;

    memset(&a, 0, sizeof(a));
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case O_MAXLEN:
            if (!parse_u64(optarg, &a.max_length)) {
                return usage_err("--max-length: not a number: %s", optarg);
            }
            break;
        case O_MAXBYTES:
            if (!parse_size(optarg, &a.max_bytes)) {
                return usage_err("--max-bytes: not a size: %s", optarg);
            }
            break;
        case O_ACK:
            if (!parse_duration_ms(optarg, &a.ack_timeout_ms)) {
                return usage_err("--ack-timeout: not a duration: %s", optarg);
            }
            break;
        case O_ATTEMPTS:
            if (!parse_u64(optarg, &v) || v > UINT32_MAX) {
                return usage_err("--max-attempts: not a number: %s", optarg);
            }
            a.max_attempts = (uint32_t)v;
            break;
        case O_DLQ:
            if (strlen(optarg) > PROTOQ_NAME_MAX) {
                return usage_err("--dead-letter: name too long");
            }
            snprintf(a.dead_letter, sizeof(a.dead_letter), "%s", optarg);
            break;
        case O_BACKOFF: {
            char *colon = strchr(optarg, ':');

            if (colon != NULL) {
                *colon = '\0';
            }
            if (!parse_duration_ms(optarg, &a.backoff_base_ms) ||
                (colon && !parse_duration_ms(colon + 1, &a.backoff_cap_ms))) {
                return usage_err("--backoff: want BASE[:CAP], e.g. 1s:60s");
            }
            /* --backoff 0: retry at once (0 on the wire means "default"). */
            a.no_backoff = a.backoff_base_ms == 0;
            break;
        }
        case O_TTL:
            if (!parse_duration_ms(optarg, &a.ttl_ms)) {
                return usage_err("--ttl: not a duration: %s", optarg);
            }
            break;
        case O_DEDUP:
            if (!parse_duration_ms(optarg, &a.dedup_window_ms)) {
                return usage_err("--dedup-window: not a duration: %s",
                                 optarg);
            }
            break;
        case O_LEASE:
            if (!parse_duration_ms(optarg, &a.max_lease_ms)) {
                return usage_err("--max-lease: not a duration: %s", optarg);
            }
            break;
        case O_DLEXP:
            a.dead_letter_expired = true;
            break;
        case O_TRANSIENT:
            a.transient = true;
            break;
        default:
            return usage_err("queue create: bad option");
        }
    }
    if (optind != argc - 1) {
        return usage_err("queue create: want exactly one NAME");
    }
    snprintf(cli->cmdbuf, sizeof(cli->cmdbuf), "queue create %s",
             argv[optind]);
    cli->cmd = cli->cmdbuf;
    if ((rc = cli_connect(cli)) != EXIT_OK) {
        return rc;
    }
    rc = protoq_queue_create(cli->c, argv[optind], &a);
    return rc == PQ_OK ? EXIT_OK : fail_pq(cli, rc);
}

static int
cmd_queue_ls(struct cli *cli, int argc, char **argv)
{
    struct protoq_queue_info *list;
    size_t n, i;
    int w_name = 4, w[4] = {5, 7, 8, 9};
    char num[4][32];
    int rc;

    (void)argv;
    if (argc != 1) {
        return usage_err("queue ls: no arguments expected");
    }
    if ((rc = cli_connect(cli)) != EXIT_OK) {
        return rc;
    }
    rc = protoq_queue_list(cli->c, &list, &n);
    if (rc != PQ_OK) {
        return fail_pq(cli, rc);
    }
    for (i = 0; i < n; i++) {
        uint64_t v[4] = {list[i].ready, list[i].delayed, list[i].inflight,
                         list[i].consumers};
        int len = (int)strlen(list[i].name);

        w_name = len > w_name ? len : w_name;
        for (int k = 0; k < 4; k++) {
            int l = snprintf(num[k], sizeof(num[k]), "%" PRIu64, v[k]);

            w[k] = l > w[k] ? l : w[k];
        }
    }
    printf("%-*s  %*s  %*s  %*s  %*s\n", w_name, "NAME", w[0], "READY", w[1],
           "DELAYED", w[2], "INFLIGHT", w[3], "CONSUMERS");
    for (i = 0; i < n; i++) {
        printf("%-*s  %*" PRIu64 "  %*" PRIu64 "  %*" PRIu64 "  %*" PRIu64
               "\n",
               w_name, list[i].name, w[0], list[i].ready, w[1],
               list[i].delayed, w[2], list[i].inflight, w[3],
               list[i].consumers);
    }
    protoq_queue_list_free(list, n);
    return fflush(stdout) == 0 ? EXIT_OK : fail(cli, "stdout: %s",
                                                strerror(errno));
}

static int
cmd_queue_stat(struct cli *cli, int argc, char **argv)
{
    struct protoq_queue_info q;
    const struct protoq_queue_attrs *a = &q.attrs;
    int rc;

    if (argc != 2) {
        return usage_err("queue stat: want exactly one NAME");
    }
    snprintf(cli->cmdbuf, sizeof(cli->cmdbuf), "queue stat %s", argv[1]);
    cli->cmd = cli->cmdbuf;
    if ((rc = cli_connect(cli)) != EXIT_OK) {
        return rc;
    }
    rc = protoq_queue_stat(cli->c, argv[1], &q);
    if (rc != PQ_OK) {
        return fail_pq(cli, rc);
    }
    printf("name: %s\n", q.name);
    printf("transient: %s\n", a->transient ? "true" : "false");
    printf("max_length: %" PRIu64 "\n", a->max_length);
    printf("max_bytes: %" PRIu64 "\n", a->max_bytes);
    printf("ack_timeout_ms: %" PRIu64 "\n", a->ack_timeout_ms);
    printf("max_attempts: %u\n", a->max_attempts);
    printf("dead_letter: %s\n", a->dead_letter);
    printf("backoff_base_ms: %" PRIu64 "\n", a->backoff_base_ms);
    printf("backoff_cap_ms: %" PRIu64 "\n", a->backoff_cap_ms);
    printf("ttl_ms: %" PRIu64 "\n", a->ttl_ms);
    printf("dedup_window_ms: %" PRIu64 "\n", a->dedup_window_ms);
    printf("max_lease_ms: %" PRIu64 "\n", a->max_lease_ms);
    printf("dead_letter_expired: %s\n",
           a->dead_letter_expired ? "true" : "false");
    printf("no_backoff: %s\n", a->no_backoff ? "true" : "false");
    printf("ready: %" PRIu64 "\n", q.ready);
    printf("delayed: %" PRIu64 "\n", q.delayed);
    printf("inflight: %" PRIu64 "\n", q.inflight);
    printf("consumers: %" PRIu64 "\n", q.consumers);
    printf("bytes: %" PRIu64 "\n", q.bytes);
    printf("published: %" PRIu64 "\n", q.published);
    printf("acked: %" PRIu64 "\n", q.acked);
    printf("nacked: %" PRIu64 "\n", q.nacked);
    printf("redelivered: %" PRIu64 "\n", q.redelivered);
    printf("expired: %" PRIu64 "\n", q.expired);
    printf("dead_lettered: %" PRIu64 "\n", q.dead_lettered);
    printf("dropped: %" PRIu64 "\n", q.dropped);
    return fflush(stdout) == 0 ? EXIT_OK : fail(cli, "stdout: %s",
                                                strerror(errno));
}

static int
cmd_queue_purge_rm(struct cli *cli, int argc, char **argv, bool purge)
{
    uint64_t n = 0;
    int rc;

    if (argc != 2) {
        return usage_err("queue %s: want exactly one NAME",
                         purge ? "purge" : "rm");
    }
    snprintf(cli->cmdbuf, sizeof(cli->cmdbuf), "queue %s %s",
             purge ? "purge" : "rm", argv[1]);
    cli->cmd = cli->cmdbuf;
    if ((rc = cli_connect(cli)) != EXIT_OK) {
        return rc;
    }
    rc = purge ? protoq_queue_purge(cli->c, argv[1], &n)
               : protoq_queue_delete(cli->c, argv[1]);
    if (rc != PQ_OK) {
        return fail_pq(cli, rc);
    }
    if (purge) {
        printf("purged %" PRIu64 "\n", n);
    }
    return fflush(stdout) == 0 ? EXIT_OK : fail(cli, "stdout: %s",
                                                strerror(errno));
}

static int
cmd_queue(struct cli *cli, int argc, char **argv)
{
    if (argc < 2) {
        return usage_err("queue: want create, ls, stat, purge or rm");
    }
    cli->cmd = "queue";
    if (strcmp(argv[1], "create") == 0) {
        cli->cmd = "queue create";
        return cmd_queue_create(cli, argc - 1, argv + 1);
    }
    if (strcmp(argv[1], "ls") == 0 || strcmp(argv[1], "list") == 0) {
        cli->cmd = "queue ls";
        return cmd_queue_ls(cli, argc - 1, argv + 1);
    }
    if (strcmp(argv[1], "stat") == 0) {
        return cmd_queue_stat(cli, argc - 1, argv + 1);
    }
    if (strcmp(argv[1], "purge") == 0) {
        return cmd_queue_purge_rm(cli, argc - 1, argv + 1, true);
    }
    if (strcmp(argv[1], "rm") == 0 || strcmp(argv[1], "delete") == 0) {
        return cmd_queue_purge_rm(cli, argc - 1, argv + 1, false);
    }
    return usage_err("queue: unknown subcommand '%s'", argv[1]);
}

/* ---- pub ---- */

/* Read all of f into a malloc'ed buffer. */
static int
read_all(FILE *f, char **out, size_t *len)
{
    size_t cap = 64 * 1024, n = 0;
    char *buf = malloc(cap);

    if (buf == NULL) {
        return -1;
    }
    for (;;) {
        size_t r;

        if (n == cap) {
            char *nb = realloc(buf, cap * 2);

            if (nb == NULL) {
                free(buf);
                return -1;
            }
            buf = nb;
            cap *= 2;
        }
        r = fread(buf + n, 1, cap - n, f);
        n += r;
        if (r == 0) {
            break;
        }
    }
    if (ferror(f)) {
        free(buf);
        return -1;
    }
    *out = buf;
    *len = n;
    return 0;
}

/* Outcome of the pipelined publishes of pub --lines. */
struct lines_state {
    struct cli *cli;
    uint64_t confirmed;
    uint64_t failed;
    char first_err[600];
};

static void
lines_confirm(void *arg, int err, uint64_t message_id, bool duplicate)
{
    struct lines_state *st = arg;

    (void)message_id;
    (void)duplicate;
    if (err == PQ_OK) {
        st->confirmed++;
        return;
    }
    if (st->failed++ == 0) {
        const char *msg = protoq_errmsg(st->cli->c);
        int code = protoq_last_error_code(st->cli->c);

        if (err == PQ_EREMOTE && code != 0) {
            snprintf(st->first_err, sizeof(st->first_err), "%s (%s)", msg,
                     protoq_code_name(code));
        } else {
            snprintf(st->first_err, sizeof(st->first_err), "%s",
                     msg[0] ? msg : pq_strerror(err));
        }
    }
}

static int
pub_lines(struct cli *cli, const char *queue, struct protoq_message *m)
{
    struct lines_state st;
    char *line = NULL;
    size_t cap = 0;
    ssize_t n;
    uint64_t sent = 0;
    int rc = PQ_OK;

    memset(&st, 0, sizeof(st));
    st.cli = cli;
    while (st.failed == 0 && (n = getline(&line, &cap, stdin)) >= 0) {
        if (n > 0 && line[n - 1] == '\n') {
            n--;
        }
        m->payload = line;
        m->len = (size_t)n;
        rc = protoq_publish_async(cli->c, queue, m, lines_confirm, &st);
        if (rc != PQ_OK) {
            break;
        }
        sent++;
        if (protoq_outstanding(cli->c) >= LINES_WINDOW) {
            rc = protoq_wait_confirms(cli->c, LINES_WINDOW * 3 / 4, -1);
            if (rc != PQ_OK) {
                break;
            }
        }
    }
    free(line);
    if (rc == PQ_OK && ferror(stdin)) {
        fail(cli, "reading stdin: %s", strerror(errno));
        rc = PQ_ESYS;
    } else if (rc != PQ_OK) {
        /* The first confirm failure is the better message, if any. */
        if (st.failed == 0) {
            fail_pq(cli, rc);
        }
    }
    if (rc == PQ_OK || rc == PQ_ESYS) {
        int wrc = protoq_wait_confirms(cli->c, 0, -1);

        if (wrc != PQ_OK && rc == PQ_OK) {
            if (st.failed == 0) {
                fail_pq(cli, wrc);
            }
            rc = wrc;
        }
    }
    if (st.failed > 0) {
        fail(cli, "%" PRIu64 " of %" PRIu64 " messages not published; first "
             "error: %s", st.failed, sent, st.first_err);
        return EXIT_ERR;
    }
    return rc == PQ_OK ? EXIT_OK : EXIT_ERR;
}

static int
cmd_pub(struct cli *cli, int argc, char **argv)
{
    enum {
        O_FILE = 256, O_LINES, O_PRIO, O_DELAY, O_TTL, O_HEADER, O_KEY,
        O_REQUIRE
    };
    static const struct option opts[] = {
        {"file", required_argument, NULL, O_FILE},
        {"lines", no_argument, NULL, O_LINES},
        {"priority", required_argument, NULL, O_PRIO},
        {"delay", required_argument, NULL, O_DELAY},
        {"ttl", required_argument, NULL, O_TTL},
        {"header", required_argument, NULL, O_HEADER},
        {"key", required_argument, NULL, O_KEY},
        {"require", required_argument, NULL, O_REQUIRE},
        {NULL, 0, NULL, 0},
    };
    struct kvlist headers, requires;
    struct protoq_message m;
    const char *file = NULL;
    const char *queue;
    const char *data = NULL;
    bool lines = false;
    char *buf = NULL;
    uint64_t v, id = 0;
    int ch, rc;

    memset(&m, 0, sizeof(m));
    headers.n = requires.n = 0;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case O_FILE:
            file = optarg;
            break;
        case O_LINES:
            lines = true;
            break;
        case O_PRIO:
            if (!parse_u64(optarg, &v) || v > 9) {
                return usage_err("--priority: want 0-9, not %s", optarg);
            }
            m.priority = (uint32_t)v;
            break;
        case O_DELAY:
            if (!parse_duration_ms(optarg, &m.delay_ms)) {
                return usage_err("--delay: not a duration: %s", optarg);
            }
            break;
        case O_TTL:
            if (!parse_duration_ms(optarg, &m.ttl_ms)) {
                return usage_err("--ttl: not a duration: %s", optarg);
            }
            break;
        case O_HEADER:
            if (!kv_add(&headers, optarg)) {
                return usage_err("--header: want K=V (at most %d)", MAX_KV);
            }
            break;
        case O_KEY:
            m.idempotency_key = optarg;
            break;
        case O_REQUIRE:
            if (!kv_add(&requires, optarg)) {
                return usage_err("--require: want K=V (at most %d)", MAX_KV);
            }
            break;
        default:
            return usage_err("pub: bad option");
        }
    }
    if (optind >= argc) {
        return usage_err("pub: want a QUEUE");
    }
    queue = argv[optind++];
    if (optind < argc) {
        data = argv[optind++];
    }
    if (optind < argc) {
        return usage_err("pub: unexpected argument '%s'", argv[optind]);
    }
    if ((data != NULL) + (file != NULL) + lines > 1) {
        return usage_err("pub: DATA, --file and --lines exclude each other");
    }
    snprintf(cli->cmdbuf, sizeof(cli->cmdbuf), "pub %s", queue);
    cli->cmd = cli->cmdbuf;
    m.headers = headers.kv;
    m.n_headers = headers.n;
    m.requires = requires.kv;
    m.n_requires = requires.n;

    if (data != NULL) {
        m.payload = data;
        m.len = strlen(data);
    } else if (!lines) {
        FILE *f = stdin;

        if (file != NULL && (f = fopen(file, "rb")) == NULL) {
            return fail(cli, "%s: %s", file, strerror(errno));
        }
        rc = read_all(f, &buf, &m.len);
        if (f != stdin) {
            fclose(f);
        }
        if (rc != 0) {
            return fail(cli, "reading %s: %s", file ? file : "stdin",
                        strerror(errno));
        }
        m.payload = buf;
    }
    if ((rc = cli_connect(cli)) != EXIT_OK) {
        free(buf);
        return rc;
    }
    if (lines) {
        return pub_lines(cli, queue, &m);
    }
    rc = protoq_publish(cli->c, queue, &m, &id);
    free(buf);
    if (rc != PQ_OK) {
        return fail_pq(cli, rc);
    }
    printf("%" PRIu64 "\n", id);
    return fflush(stdout) == 0 ? EXIT_OK : fail(cli, "stdout: %s",
                                                strerror(errno));
}

/* ---- consume ---- */

enum consume_mode { MODE_ACK, MODE_NO_ACK, MODE_NACK };

/* A delivery token waiting for its ack (after stdout was flushed). */
struct token {
    uint64_t id;
    uint32_t attempt;
};

/* A growable list of delivery tokens. */
struct tokens {
    struct token *v;
    size_t n, cap;
};

struct consume_state {
    struct cli *cli;
    enum consume_mode mode;
    bool json;
    uint64_t count;            /* 0 = no limit */
    uint64_t received;         /* printed */
    struct tokens acks;        /* printed, not yet acked (or nacked) */
    struct tokens give_back;   /* to release at exit: deliveries past
                                  --count (never printed), and with
                                  --no-ack everything printed */
    int out_err;               /* errno of a failed write to stdout */
    bool oom;
    uint64_t async_errors;
};

static bool
tokens_add(struct tokens *l, const struct protoq_delivery *d)
{
    if (l->n == l->cap) {
        size_t cap = l->cap ? l->cap * 2 : 1024;
        struct token *n = realloc(l->v, cap * sizeof(*n));

        if (n == NULL) {
            return false;
        }
        l->v = n;
        l->cap = cap;
    }
    l->v[l->n].id = d->message_id;
    l->v[l->n].attempt = d->attempt;
    l->n++;
    return true;
}

static void
json_str(FILE *out, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    size_t i;

    fputc('"', out);
    for (i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];

        switch (ch) {
        case '"':
            fputs("\\\"", out);
            break;
        case '\\':
            fputs("\\\\", out);
            break;
        case '\n':
            fputs("\\n", out);
            break;
        case '\r':
            fputs("\\r", out);
            break;
        case '\t':
            fputs("\\t", out);
            break;
        default:
            if (ch < 0x20 || ch == 0x7f) {
                fputs("\\u00", out);
                fputc(hex[ch >> 4], out);
                fputc(hex[ch & 15], out);
            } else {
                fputc(ch, out);
            }
        }
    }
    fputc('"', out);
}

/* utf8_valid: strict UTF-8 (no overlongs, surrogates or > U+10FFFF). */
static bool
utf8_valid(const unsigned char *s, size_t n)
{
    size_t i = 0;

    while (i < n) {
        unsigned char c = s[i];
        size_t len;
        uint32_t cp;

        if (c < 0x80) {
            i++;
            continue;
        } else if ((c & 0xe0) == 0xc0) {
            len = 2;
            cp = c & 0x1f;
        } else if ((c & 0xf0) == 0xe0) {
            len = 3;
            cp = c & 0x0f;
        } else if ((c & 0xf8) == 0xf0) {
            len = 4;
            cp = c & 0x07;
        } else {
            return false;
        }
        if (i + len > n) {
            return false;
        }
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xc0) != 0x80) {
                return false;
            }
            cp = cp << 6 | (s[i + k] & 0x3f);
        }
        if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) ||
            (len == 4 && cp < 0x10000) || cp > 0x10ffff ||
            (cp >= 0xd800 && cp <= 0xdfff)) {
            return false;
        }
        i += len;
    }
    return true;
}

static void
base64_out(FILE *out, const unsigned char *p, size_t n)
{
    static const char tbl[] =
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t i;

    for (i = 0; i + 2 < n; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16 | (uint32_t)p[i + 1] << 8 | p[i + 2];

        fputc(tbl[v >> 18], out);
        fputc(tbl[(v >> 12) & 63], out);
        fputc(tbl[(v >> 6) & 63], out);
        fputc(tbl[v & 63], out);
    }
    if (i < n) {
        uint32_t v = (uint32_t)p[i] << 16;

        if (i + 1 < n) {
            v |= (uint32_t)p[i + 1] << 8;
        }
        fputc(tbl[v >> 18], out);
        fputc(tbl[(v >> 12) & 63], out);
        fputc(i + 1 < n ? tbl[(v >> 6) & 63] : '=', out);
        fputc('=', out);
    }
}

static void
print_json(FILE *out, const struct protoq_delivery *d)
{
    size_t i;

    fprintf(out, "{\"id\":%" PRIu64 ",\"attempt\":%u,\"priority\":%u,"
            "\"queue\":", d->message_id, d->attempt, d->priority);
    json_str(out, d->queue, strlen(d->queue));
    fputs(",\"headers\":{", out);
    for (i = 0; i < d->n_headers; i++) {
        if (i > 0) {
            fputc(',', out);
        }
        json_str(out, d->headers[i].key, strlen(d->headers[i].key));
        fputc(':', out);
        json_str(out, d->headers[i].value, strlen(d->headers[i].value));
    }
    fputc('}', out);
    if (utf8_valid(d->payload, d->len)) {
        fputs(",\"payload\":", out);
        json_str(out, d->payload, d->len);
    } else {
        fputs(",\"payload_base64\":\"", out);
        base64_out(out, d->payload, d->len);
        fputc('"', out);
    }
    fputs("}\n", out);
}

static void
consume_deliver(void *arg, protoq_client *c, const struct protoq_delivery *d)
{
    struct consume_state *st = arg;

    (void)c;
    if (st->count > 0 && st->received >= st->count) {
        /* Past the count (the broker had credit left): not printed, given
         * back with a Release at exit, which is not a failed attempt. */
        if (!tokens_add(&st->give_back, d)) {
            st->oom = true;
        }
        return;
    }
    if (st->json) {
        print_json(stdout, d);
    } else {
        fwrite(d->payload, 1, d->len, stdout);
        fputc('\n', stdout);
    }
    st->received++;
    /* --no-ack holds what it printed and gives it back at exit (after
     * pausing the flow, so it is not pushed straight back to us). */
    if (!tokens_add(st->mode == MODE_NO_ACK ? &st->give_back : &st->acks,
                    d)) {
        st->oom = true;
    }
}

static void
consume_error(void *arg, protoq_client *c, int code, const char *message,
              uint64_t request_id)
{
    struct consume_state *st = arg;

    (void)c;
    (void)request_id;
    st->async_errors++;
    fprintf(stderr, "protoq: %s: %s failed: %s (%s)\n", st->cli->cmd,
            st->mode == MODE_NACK ? "nack" : "ack", message,
            protoq_code_name(code));
}

/*
 * Flush stdout, then ack (or nack) everything printed so far. Output first:
 * a message is never acked before its line reached stdout. When final, the
 * last ack waits for the broker's durable Ok, which also brings any error
 * for the acks before it (replies come in request order).
 */
static int
consume_settle(struct consume_state *st, bool final)
{
    protoq_client *c = st->cli->c;
    size_t i;
    int rc = PQ_OK;

    if (fflush(stdout) != 0) {
        st->out_err = errno;
        return PQ_ESYS;
    }
    for (i = 0; i < st->acks.n && rc == PQ_OK; i++) {
        const struct token *t = &st->acks.v[i];
        bool last_sync = final && i + 1 == st->acks.n && st->give_back.n == 0;

        if (st->mode == MODE_NACK) {
            rc = last_sync ? protoq_nack_sync(c, t->id, t->attempt, 0, false,
                                              NULL)
                           : protoq_nack(c, t->id, t->attempt, 0, false, NULL);
        } else {
            rc = last_sync ? protoq_ack_sync(c, t->id, t->attempt)
                           : protoq_ack(c, t->id, t->attempt);
        }
    }
    st->acks.n = 0;
    if (final) {
        /* Give back what we hold but did not ack; the last one waits for
         * the broker, so errors for everything before it are in too. */
        size_t n = st->give_back.n;

        /* Over a snapshot: a release frees credit, and what the broker
         * sends for it while we wait must not be released in turn (it
         * would come straight back, forever). */
        /* Newest first: each release re-enters at the front of its
         * priority level, so this keeps the queue's order. */
        for (i = n; i > 0 && rc == PQ_OK; i--) {
            const struct token t = st->give_back.v[i - 1];

            rc = protoq_release(c, t.id, t.attempt,
                                PROTOQ_RELEASE_UNSPECIFIED, NULL, i == 1);
        }
        st->give_back.n = 0;
    }
    if (rc == PQ_OK && !final) {
        rc = protoq_flush(c);
    }
    return rc;
}

static int
cmd_consume(struct cli *cli, int argc, char **argv)
{
    enum { O_COUNT = 256, O_WAIT, O_PREFETCH, O_JSON, O_NOACK, O_NACK, O_TAG };
    static const struct option opts[] = {
        {"count", required_argument, NULL, O_COUNT},
        {"wait", required_argument, NULL, O_WAIT},
        {"prefetch", required_argument, NULL, O_PREFETCH},
        {"json", no_argument, NULL, O_JSON},
        {"no-ack", no_argument, NULL, O_NOACK},
        {"nack", no_argument, NULL, O_NACK},
        {"tag", required_argument, NULL, O_TAG},
        {NULL, 0, NULL, 0},
    };
    struct consume_state st;
    struct kvlist tags;
    uint64_t wait_ms = DEFAULT_WAIT_MS, prefetch = 0, credit, v;
    bool wait_set = false;
    const char *queue;
    uint64_t sub_id;
    int64_t idle_deadline;
    int ch, rc, ret = EXIT_OK;

    memset(&st, 0, sizeof(st));
    st.cli = cli;
    tags.n = 0;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case O_COUNT:
            if (!parse_u64(optarg, &st.count) || st.count == 0) {
                return usage_err("--count: want a number > 0, not %s",
                                 optarg);
            }
            break;
        case O_WAIT:
            if (!parse_duration_ms(optarg, &wait_ms)) {
                return usage_err("--wait: not a duration: %s", optarg);
            }
            wait_set = true;
            break;
        case O_PREFETCH:
            if (!parse_u64(optarg, &v) || v == 0 || v > UINT32_MAX) {
                return usage_err("--prefetch: want a number > 0, not %s",
                                 optarg);
            }
            prefetch = v;
            break;
        case O_JSON:
            st.json = true;
            break;
        case O_NOACK:
            if (st.mode == MODE_NACK) {
                return usage_err("--no-ack and --nack exclude each other");
            }
            st.mode = MODE_NO_ACK;
            break;
        case O_NACK:
            if (st.mode == MODE_NO_ACK) {
                return usage_err("--no-ack and --nack exclude each other");
            }
            st.mode = MODE_NACK;
            break;
        case O_TAG:
            if (!kv_add(&tags, optarg)) {
                return usage_err("--tag: want K=V (at most %d)", MAX_KV);
            }
            break;
        default:
            return usage_err("consume: bad option");
        }
    }
    if (optind != argc - 1) {
        return usage_err("consume: want exactly one QUEUE");
    }
    queue = argv[optind];
    snprintf(cli->cmdbuf, sizeof(cli->cmdbuf), "consume %s", queue);
    cli->cmd = cli->cmdbuf;
    if (prefetch == 0) {
        prefetch = DEFAULT_PREFETCH;
        if (st.count > 0 && st.count < prefetch) {
            prefetch = st.count;
        }
    }
    if ((rc = cli_connect(cli)) != EXIT_OK) {
        return rc;
    }
    protoq_set_error_cb(cli->c, consume_error, &st);
    credit = prefetch;
    rc = protoq_subscribe(cli->c, queue, (uint32_t)credit, tags.kv, tags.n,
                          consume_deliver, &st, &sub_id);
    if (rc != PQ_OK) {
        ret = fail_pq(cli, rc);
        goto out;
    }
    idle_deadline = (st.count > 0 && !wait_set) ? -1 : 0;
    for (;;) {
        struct timespec ts;
        int64_t now;
        int timeout = -1;

        /* Deliveries can arrive inside any call on the handle (protoq_flow
         * below runs callbacks while it waits for its Ok): check the count
         * and send their acks before blocking, or both sides wait. */
        if (st.count > 0 && st.received >= st.count) {
            rc = PQ_OK;
            break;
        }
        if (st.acks.n > 0) {
            rc = consume_settle(&st, false);
            if (rc != PQ_OK) {
                break;
            }
        }
        clock_gettime(CLOCK_MONOTONIC, &ts);
        now = (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
        if (idle_deadline == 0) {
            idle_deadline = now + (int64_t)wait_ms;
        }
        if (idle_deadline > 0) {
            if (now >= idle_deadline) {
                rc = PQ_OK;
                break;
            }
            timeout = (int)(idle_deadline - now);
        }
        rc = protoq_poll(cli->c, timeout);
        if (rc < 0) {
            ret = fail_pq(cli, rc);
            goto out;
        }
        if (st.oom) {
            ret = fail(cli, "out of memory");
            goto out;
        }
        if (rc > 0 && idle_deadline > 0) {
            idle_deadline = 0;  /* re-armed on the next pass */
        }
        if (st.count > 0 && st.received >= st.count) {
            rc = PQ_OK;
            break;
        }
        rc = consume_settle(&st, false);
        if (rc != PQ_OK) {
            break;
        }
        /* --no-ack holds every delivery, so widen the credit as it fills;
         * near --count, narrow it so few extra messages come our way. */
        if (st.mode == MODE_NO_ACK && st.received + prefetch / 2 >= credit) {
            credit = st.received + prefetch;
            if (st.count > 0 && credit > st.count) {
                credit = st.count;
            }
            rc = protoq_flow(cli->c, sub_id, (uint32_t)credit);
        } else if (st.mode != MODE_NO_ACK && st.count > 0 &&
                   st.count - st.received <= credit / 2 && credit > 1) {
            credit = st.count - st.received;
            rc = protoq_flow(cli->c, sub_id, (uint32_t)credit);
        }
        if (rc != PQ_OK) {
            break;
        }
    }
    if (rc == PQ_OK) {
        /* Pause the flow (Flow 0) before the final acks and releases free
         * credit, so nothing more is pushed to us: what arrives meanwhile
         * is released too, and the broker holds nothing of ours when we
         * disconnect. */
        rc = protoq_flow(cli->c, sub_id, 0);
    }
    if (rc == PQ_OK && !st.oom) {
        rc = consume_settle(&st, true);
    }
    if (st.oom) {
        ret = fail(cli, "out of memory");
        goto out;
    }
    if (st.out_err != 0) {
        ret = fail(cli, "writing stdout: %s", strerror(st.out_err));
    } else if (rc != PQ_OK) {
        ret = fail_pq(cli, rc);
    } else if (st.async_errors > 0) {
        ret = EXIT_ERR;
    }
out:
    free(st.acks.v);
    free(st.give_back.v);
    return ret;
}

/* ---- work ---- */

/* A running job of `protoq work`. */
struct job {
    bool used;
    pid_t pid;
    uint64_t message_id;
    uint32_t attempt;
    uint64_t lease_ms;
    int64_t next_touch_ms;     /* monotonic */
};

struct work_state {
    struct cli *cli;
    char **command;
    struct job *jobs;
    size_t n_jobs;
    size_t running;
    int err;                   /* PQ_* of a failure inside a callback */
};

static int64_t
mono_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Environment name for header key: PROTOQ_HEADER_ + key with every byte
 * that is not [A-Za-z0-9_] turned into '_' and letters upper-cased. */
static void
header_env_name(char *buf, size_t cap, const char *key)
{
    size_t n = (size_t)snprintf(buf, cap, "PROTOQ_HEADER_");

    for (; *key && n + 1 < cap; key++) {
        unsigned char ch = (unsigned char)*key;

        buf[n++] = isalnum(ch) ? (char)toupper(ch) : '_';
    }
    buf[n] = '\0';
}

/* Write the payload to the child's stdin from a helper process, so a large
 * payload and a child that does not read cannot block us. */
static pid_t
spawn_job(struct work_state *ws, const struct protoq_delivery *d)
{
    int pipefd[2];
    pid_t pid, writer;

    if (pipe(pipefd) < 0) {
        return -1;
    }
    pid = fork();
    if (pid < 0) {
        close(pipefd[0]);
        close(pipefd[1]);
        return -1;
    }
    if (pid == 0) {
        char name[256], val[32];
        size_t i;

        close(pipefd[1]);
        dup2(pipefd[0], STDIN_FILENO);
        close(pipefd[0]);
        close(protoq_fd(ws->cli->c));
        snprintf(val, sizeof(val), "%" PRIu64, d->message_id);
        setenv("PROTOQ_MESSAGE_ID", val, 1);
        snprintf(val, sizeof(val), "%u", d->attempt);
        setenv("PROTOQ_ATTEMPT", val, 1);
        setenv("PROTOQ_QUEUE", d->queue, 1);
        for (i = 0; i < d->n_headers; i++) {
            header_env_name(name, sizeof(name), d->headers[i].key);
            setenv(name, d->headers[i].value, 1);
        }
        signal(SIGPIPE, SIG_DFL);
        execvp(ws->command[0], ws->command);
        fprintf(stderr, "protoq: work: %s: %s\n", ws->command[0],
                strerror(errno));
        _exit(127);
    }
    close(pipefd[0]);
    /* The writer is a short-lived child; reaped in reap_jobs as unknown. */
    writer = fork();
    if (writer == 0) {
        const char *p = d->payload;
        size_t left = d->len;

        close(protoq_fd(ws->cli->c));
        signal(SIGPIPE, SIG_IGN);
        while (left > 0) {
            ssize_t n = write(pipefd[1], p, left);

            if (n < 0 && errno == EINTR) {
                continue;
            }
            if (n <= 0) {
                break;
            }
            p += n;
            left -= (size_t)n;
        }
        _exit(0);
    }
    close(pipefd[1]);
    return pid;
}

static void
work_deliver(void *arg, protoq_client *c, const struct protoq_delivery *d)
{
    struct work_state *ws = arg;
    struct job *j = NULL;
    size_t i;

    for (i = 0; i < ws->n_jobs; i++) {
        if (!ws->jobs[i].used) {
            j = &ws->jobs[i];
            break;
        }
    }
    if (j == NULL) {
        /* More than --concurrency: give it back untouched. */
        protoq_release(c, d->message_id, d->attempt, PROTOQ_RELEASE_UNSPECIFIED,
                       NULL, false);
        return;
    }
    j->pid = spawn_job(ws, d);
    if (j->pid < 0) {
        fprintf(stderr, "protoq: %s: cannot start %s: %s\n", ws->cli->cmd,
                ws->command[0], strerror(errno));
        protoq_nack(c, d->message_id, d->attempt, 0, false,
                    "protoq work: cannot start the command");
        return;
    }
    j->used = true;
    j->message_id = d->message_id;
    j->attempt = d->attempt;
    j->lease_ms = d->lease_ms ? d->lease_ms : 30000;
    j->next_touch_ms = mono_ms() + (int64_t)j->lease_ms / 3;
    ws->running++;
}

/* Reap finished children: ack jobs that exited 0, nack the others. */
static int
reap_jobs(struct work_state *ws)
{
    int status;
    pid_t pid;
    int rc = PQ_OK;

    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        size_t i;

        for (i = 0; i < ws->n_jobs; i++) {
            struct job *j = &ws->jobs[i];
            char err[64];

            if (!j->used || j->pid != pid) {
                continue;
            }
            j->used = false;
            ws->running--;
            if (WIFEXITED(status) && WEXITSTATUS(status) == 0) {
                rc = protoq_ack(ws->cli->c, j->message_id, j->attempt);
            } else {
                if (WIFEXITED(status)) {
                    snprintf(err, sizeof(err), "command exited with %d",
                             WEXITSTATUS(status));
                } else {
                    snprintf(err, sizeof(err), "command killed by signal %d",
                             WTERMSIG(status));
                }
                rc = protoq_nack(ws->cli->c, j->message_id, j->attempt, 0,
                                 false, err);
            }
            break;
        }
        if (rc != PQ_OK) {
            return rc;
        }
    }
    return protoq_flush(ws->cli->c);
}

/* Touch every job whose lease is a third gone. */
static int
touch_jobs(struct work_state *ws)
{
    int64_t now = mono_ms();
    size_t i;

    for (i = 0; i < ws->n_jobs; i++) {
        struct job *j = &ws->jobs[i];
        uint64_t lease = 0;
        int rc;

        if (!j->used || now < j->next_touch_ms) {
            continue;
        }
        rc = protoq_touch(ws->cli->c, j->message_id, j->attempt, 0, NULL,
                          &lease);
        if (rc == PQ_EREMOTE) {
            fprintf(stderr, "protoq: %s: touch of job %" PRIu64 " failed: "
                    "%s (%s)\n", ws->cli->cmd, j->message_id,
                    protoq_errmsg(ws->cli->c),
                    protoq_code_name(protoq_last_error_code(ws->cli->c)));
            lease = j->lease_ms;
        } else if (rc != PQ_OK) {
            return rc;
        }
        if (lease > 0) {
            j->lease_ms = lease;
        }
        j->next_touch_ms = now + (int64_t)j->lease_ms / 3;
    }
    return PQ_OK;
}

static volatile sig_atomic_t work_stop;

static void
on_stop_signal(int sig)
{
    (void)sig;
    work_stop = 1;
}

static void
on_child_signal(int sig)
{
    (void)sig;
}

static int
cmd_work(struct cli *cli, int argc, char **argv)
{
    enum { O_CONC = 256, O_TAG };
    static const struct option opts[] = {
        {"concurrency", required_argument, NULL, O_CONC},
        {"tag", required_argument, NULL, O_TAG},
        {NULL, 0, NULL, 0},
    };
    struct work_state ws;
    struct kvlist tags;
    struct sigaction sa;
    uint64_t conc = 1;
    const char *queue;
    int ch, rc, ret = EXIT_OK;

    memset(&ws, 0, sizeof(ws));
    tags.n = 0;
    while ((ch = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (ch) {
        case O_CONC:
            if (!parse_u64(optarg, &conc) || conc == 0 || conc > 4096) {
                return usage_err("--concurrency: want 1-4096, not %s",
                                 optarg);
            }
            break;
        case O_TAG:
            if (!kv_add(&tags, optarg)) {
                return usage_err("--tag: want K=V (at most %d)", MAX_KV);
            }
            break;
        default:
            return usage_err("work: bad option");
        }
    }
    if (optind >= argc) {
        return usage_err("work: want a QUEUE");
    }
    queue = argv[optind++];
    /* getopt stopped at "--" and moved QUEUE after it: the rest is the
     * command, options and all. */
    if (optind >= argc) {
        return usage_err("work: want -- COMMAND [ARG]...");
    }
    ws.command = argv + optind;
    ws.cli = cli;
    snprintf(cli->cmdbuf, sizeof(cli->cmdbuf), "work %s", queue);
    cli->cmd = cli->cmdbuf;
    ws.n_jobs = (size_t)conc;
    ws.jobs = calloc(ws.n_jobs, sizeof(*ws.jobs));
    if (ws.jobs == NULL) {
        return fail(cli, "out of memory");
    }
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_stop_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sa.sa_handler = on_child_signal;  /* interrupts poll() on child exit */
    sigaction(SIGCHLD, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    if ((rc = cli_connect(cli)) != EXIT_OK) {
        free(ws.jobs);
        return rc;
    }
    rc = protoq_subscribe(cli->c, queue, (uint32_t)conc, tags.kv, tags.n,
                          work_deliver, &ws, NULL);
    if (rc != PQ_OK) {
        ret = fail_pq(cli, rc);
        goto out;
    }
    while (!work_stop) {
        rc = protoq_poll(cli->c, ws.running > 0 ? 200 : 1000);
        if (rc < 0) {
            ret = fail_pq(cli, rc);
            goto out;
        }
        rc = reap_jobs(&ws);
        if (rc == PQ_OK) {
            rc = touch_jobs(&ws);
        }
        if (rc != PQ_OK) {
            ret = fail_pq(cli, rc);
            goto out;
        }
    }
    /* Interrupted: give running jobs back (they may be re-run elsewhere)
     * after stopping the commands. */
    for (size_t i = 0; i < ws.n_jobs; i++) {
        struct job *j = &ws.jobs[i];

        if (j->used) {
            kill(j->pid, SIGTERM);
            waitpid(j->pid, NULL, 0);
            protoq_release(cli->c, j->message_id, j->attempt,
                           PROTOQ_RELEASE_SHUTDOWN, NULL, false);
        }
    }
    rc = protoq_flush(cli->c);
    if (rc != PQ_OK) {
        ret = fail_pq(cli, rc);
    }
out:
    free(ws.jobs);
    return ret;
}

/* ---- main ---- */

/* main: parse the global options, run one command, exit 0/1/2. */
int
main(int argc, char **argv)
{
    struct cli cli;
    const char *cmd;
    int i = 1;
    int ret;

    memset(&cli, 0, sizeof(cli));
    cli.server = getenv("PROTOQ_SERVER");
    if (cli.server == NULL || cli.server[0] == '\0') {
        cli.server = "127.0.0.1:7650";
    }
    while (i < argc && argv[i][0] == '-') {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            fputs(usage_text, stdout);
            return EXIT_OK;
        }
        if (strcmp(argv[i], "--version") == 0 || strcmp(argv[i], "-V") == 0) {
            printf("protoq %s\n", PROTOQ_VERSION);
            return EXIT_OK;
        }
        if (strcmp(argv[i], "-s") == 0 || strcmp(argv[i], "--server") == 0) {
            if (i + 1 >= argc) {
                return usage_err("%s needs HOST:PORT", argv[i]);
            }
            cli.server = argv[i + 1];
            i += 2;
            continue;
        }
        if (strncmp(argv[i], "--server=", 9) == 0) {
            cli.server = argv[i] + 9;
            i++;
            continue;
        }
        return usage_err("unknown option '%s'", argv[i]);
    }
    if (i >= argc) {
        return usage_err("no command");
    }
    cmd = argv[i];
    cli.cmd = cmd;
    /* Each command parses argv[i..] with getopt_long from a fresh start;
     * argv[i] plays the program name. */
    optind = 0;
    opterr = 1;
    if (strcmp(cmd, "queue") == 0) {
        ret = cmd_queue(&cli, argc - i, argv + i);
    } else if (strcmp(cmd, "pub") == 0 || strcmp(cmd, "publish") == 0) {
        ret = cmd_pub(&cli, argc - i, argv + i);
    } else if (strcmp(cmd, "consume") == 0) {
        ret = cmd_consume(&cli, argc - i, argv + i);
    } else if (strcmp(cmd, "work") == 0) {
        ret = cmd_work(&cli, argc - i, argv + i);
    } else if (strcmp(cmd, "help") == 0) {
        fputs(usage_text, stdout);
        ret = EXIT_OK;
    } else {
        ret = usage_err("unknown command '%s'", cmd);
    }
    protoq_close(cli.c);
    return ret;
}
