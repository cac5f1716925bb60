/*
 * cli_pub.c: protoq pub: one message from DATA, --file or stdin, or one per
 * stdin line (--lines, pipelined, exit 0 only when every line was confirmed);
 * to a queue, or through a route (--route, one copy per matching queue).
 */
#include "cli.h"

#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* A route fans out to at most this many queues (the broker's limit of
 * bindings a route). */
enum { PUB_ROUTE_IDS_MAX = 256 };

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
        fail(cli,
             "%" PRIu64 " of %" PRIu64 " messages not published; first "
             "error: %s",
             st.failed, sent, st.first_err);
        return EXIT_ERR;
    }
    return rc == PQ_OK ? EXIT_OK : EXIT_ERR;
}

/* Publish m through route: prints the id of each copy, one a line. */
static int
pub_route(struct cli *cli, const char *route, const char *key, unsigned flags,
          const struct protoq_message *m)
{
    uint64_t ids[PUB_ROUTE_IDS_MAX];
    size_t n = 0;
    int rc = protoq_publish_route_ex(cli->c, route, key, m, flags, ids,
                                     PUB_ROUTE_IDS_MAX, &n);

    if (rc != PQ_OK) {
        return fail_pq(cli, rc);
    }
    for (size_t i = 0; i < n && i < PUB_ROUTE_IDS_MAX; i++) {
        printf("%" PRIu64 "\n", ids[i]);
    }
    return fflush(stdout) == 0 ? EXIT_OK
                               : fail(cli, "stdout: %s", strerror(errno));
}

int
cmd_pub(struct cli *cli, int argc, char **argv)
{
    enum {
        O_FILE = 256,
        O_LINES,
        O_PRIO,
        O_DELAY,
        O_TTL,
        O_HEADER,
        O_KEY,
        O_REQUIRE,
        O_BINARY,
        O_ROUTE,
        O_ROUTING_KEY,
        O_ALLOW_UNROUTED,
        O_REPLY_TO,
        O_CORRELATION_ID,
        O_WAIT
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
        {"binary", no_argument, NULL, O_BINARY},
        {"route", required_argument, NULL, O_ROUTE},
        {"routing-key", required_argument, NULL, O_ROUTING_KEY},
        {"allow-unrouted", no_argument, NULL, O_ALLOW_UNROUTED},
        {"reply-to", required_argument, NULL, O_REPLY_TO},
        {"correlation-id", required_argument, NULL, O_CORRELATION_ID},
        {"wait", optional_argument, NULL, O_WAIT},
        {NULL, 0, NULL, 0},
    };
    struct kvlist headers, requires;
    struct protoq_message m;
    const char *file = NULL;
    const char *queue = NULL, *route = NULL, *routing_key = NULL;
    unsigned route_flags = 0;
    const char *data = NULL;
    bool lines = false, binary = false, wait = false;
    uint64_t wait_ms = 0;
    bool wait_limit = false;
    char *buf = NULL;
    uint64_t v, id = 0;
    int ch, rc;

    memset(&m, 0, sizeof(m));
    headers.n = requires.n = 0;
    headers.used = requires.used = 0;
    while ((ch = cli_getopt(argc, argv, opts)) != -1) {
        switch (ch) {
        case O_FILE:
            file = optarg;
            break;
        case O_LINES:
            lines = true;
            break;
        case O_PRIO:
            if (units_parse_u64(optarg, &v) != PQ_OK || v > 9) {
                return usage_err("--priority: want 0-9, not %s", optarg);
            }
            m.priority = (uint32_t)v;
            break;
        case O_DELAY:
            if (units_parse_duration_ms(optarg, &m.delay_ms) != PQ_OK) {
                return usage_err("--delay: not a duration: %s", optarg);
            }
            break;
        case O_TTL:
            if (units_parse_duration_ms(optarg, &m.ttl_ms) != PQ_OK) {
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
        case O_BINARY:
            binary = true;
            break;
        case O_ROUTE:
            route = optarg;
            break;
        case O_ROUTING_KEY:
            routing_key = optarg;
            break;
        case O_ALLOW_UNROUTED:
            route_flags |= PROTOQ_ROUTE_ALLOW_UNROUTED;
            break;
        case O_REPLY_TO:
            m.reply_to = optarg;
            break;
        case O_CORRELATION_ID:
            m.correlation_id = optarg;
            break;
        case O_WAIT:
            /* --wait[=T] or --wait T: a following word that reads as a
             * duration is the timeout (put DATA first if it is one). */
            wait = true;
            if (optarg == NULL && optind < argc &&
                units_parse_duration_ms(argv[optind], &wait_ms) == PQ_OK) {
                optarg = argv[optind++];
            }
            if (optarg != NULL &&
                units_parse_duration_ms(optarg, &wait_ms) != PQ_OK) {
                return usage_err("--wait: not a duration: %s", optarg);
            }
            wait_limit = optarg != NULL;
            break;
        default:
            return EXIT_USAGE; /* cli_getopt said why */
        }
    }
    if (route == NULL && optind >= argc) {
        return usage_err("pub: want a QUEUE (or --route ROUTE)");
    }
    if (route == NULL) {
        queue = argv[optind++];
    } else if (lines) {
        return usage_err("pub: --lines needs a QUEUE, not --route");
    }
    if (route == NULL && (routing_key != NULL || route_flags != 0)) {
        return usage_err("pub: --routing-key and --allow-unrouted go with "
                         "--route");
    }
    if (optind < argc) {
        data = argv[optind++];
    }
    if (optind < argc) {
        return usage_err("pub: unexpected argument '%s'", argv[optind]);
    }
    if ((data != NULL) + (file != NULL) + lines > 1) {
        return usage_err("pub: DATA, --file and --lines exclude each other");
    }
    if (wait && (lines || m.reply_to != NULL || route != NULL)) {
        return usage_err("pub: --wait makes its own reply queue: it excludes "
                         "--lines, --reply-to and --route");
    }
    snprintf(cli->cmdbuf, sizeof(cli->cmdbuf), "pub %s%s",
             route ? "--route " : "", route ? route : queue);
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
        /* `echo x | protoq pub q` publishes "x": one trailing newline of
         * stdin goes, unless --binary (a file is taken as it is). */
        if (file == NULL && !binary && m.len > 0 && buf[m.len - 1] == '\n') {
            m.len--;
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
    if (route != NULL) {
        rc = pub_route(cli, route, routing_key, route_flags, &m);
        free(buf);
        return rc;
    }
    if (wait) {
        rc = pub_wait(cli, queue, &m, wait_limit ? (int64_t)wait_ms : -1);
        free(buf);
        return rc;
    }
    rc = protoq_publish(cli->c, queue, &m, &id);
    free(buf);
    if (rc != PQ_OK) {
        return fail_pq(cli, rc);
    }
    printf("%" PRIu64 "\n", id);
    return fflush(stdout) == 0 ? EXIT_OK
                               : fail(cli, "stdout: %s", strerror(errno));
}
