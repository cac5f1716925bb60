/*
 * cli.c: the protoq command-line tool: global options, usage, messages and
 * connecting; each command lives in its own file (cli.h lists them). It
 * uses libprotoq (protoq.h), the C library, and protocol/units.h for
 * durations and sizes (the grammar protoqd's config uses too).
 *
 *   protoq [-s [tls://]HOST:PORT] [--ca F] [--cert F --key F] COMMAND ...
 *   protoq [-s HOST:PORT] queue create|ls|stat|purge|rm ...
 *   protoq [-s HOST:PORT] pub QUEUE [DATA] ...
 *   protoq [-s HOST:PORT] consume QUEUE ...
 *   protoq [-s HOST:PORT] work QUEUE ... -- COMMAND [ARG]...
 *
 * Exit status: 0 ok, 1 error (one line on stderr), 2 usage, 3 the job
 * that pub --wait waited for failed. Output
 * correctness rules: `pub --lines` exits 0 only after every line was
 * confirmed; `consume` never acks a message before its output reached
 * stdout (fflush first, then the acks go out).
 */
#include "cli.h"

#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <stddef.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static const char usage_text[] =
    "usage: protoq [-s [tls://]HOST:PORT] [-t TOKEN] [--ca FILE]\n"
    "              [--cert FILE --key FILE] COMMAND [ARGS]\n"
    "\n"
    "  queue create NAME [--max-length N] [--max-bytes N[k|m|g]]\n"
    "               [--ack-timeout D] [--max-attempts N] [--dead-letter Q]\n"
    "               [--backoff BASE[:CAP]] [--ttl D] [--dedup-window D]\n"
    "               [--max-lease D] [--dead-letter-expired] [--transient]\n"
    "  queue ls                 queues with ready, delayed, inflight, "
    "consumers\n"
    "  queue stat NAME          every attribute and counter\n"
    "  queue purge NAME         drop ready and delayed messages\n"
    "  queue rm NAME            delete the queue\n"
    "  pub QUEUE [DATA] [--file F] [--lines] [--binary] [--priority P]\n"
    "            [--delay D] [--ttl D] [--header K=V]... [--key KEY]\n"
    "            [--require K=V]... [--reply-to Q] [--correlation-id ID]\n"
    "            [--wait [TIMEOUT]]\n"
    "      No DATA and no --file: stdin is one message, one trailing\n"
    "      newline stripped (--binary: kept). --lines: each stdin line is\n"
    "      one message (pipelined); exits 0 only when every line was\n"
    "      confirmed. Prints the message id of a single publish.\n"
    "      --reply-to: the job's result (or failure notice) goes to Q.\n"
    "      --wait: wait for the job's end on a private reply queue: the\n"
    "      result on stdout (exit 0) or the failure on stderr (exit 3).\n"
    "  pub --route ROUTE [--routing-key K] [--allow-unrouted] [DATA] ...\n"
    "      Through a route: one copy per queue whose binding matches K;\n"
    "      prints the id of each copy. Matching nothing is an error unless\n"
    "      --allow-unrouted.\n"
    "  consume QUEUE [--count N] [--wait D] [--prefetch N]\n"
    "                [--json | --raw | --framed] [--no-ack | --nack]\n"
    "                [--tag K=V]...\n"
    "      Prints each payload followed by a newline (--json: one object\n"
    "      per line, id as a string; --raw: the bytes of one message only;\n"
    "      --framed: a 4-byte big-endian length before each payload)\n"
    "      and acks it after it was written. Stops after --count messages or\n"
    "      when nothing arrived for --wait; with --count and no --wait it\n"
    "      waits forever, with neither --wait is 5s. Exit 0 when the count\n"
    "      was reached or the wait ran out (even after 0 messages).\n"
    "      --no-ack: ack nothing (messages return to the queue on exit);\n"
    "      --nack: nack each (requeued with the queue's backoff).\n"
    "  work QUEUE [--concurrency N] [--tag K=V]... [--timeout D]\n"
    "             [--shutdown-grace D] [--kill-grace D] [--max-result N]\n"
    "             -- COMMAND [ARG]...\n"
    "      Runs COMMAND once per job in its own process group: payload on\n"
    "      stdin; PROTOQ_MESSAGE_ID, PROTOQ_ATTEMPT, PROTOQ_QUEUE,\n"
    "      PROTOQ_HEADER_<KEY>, PROTOQ_PROGRESS (a file for progress lines)\n"
    "      and the last attempt's PROTOQ_PROGRESS_PERCENT/_TEXT and\n"
    "      PROTOQ_CHECKPOINT in the environment. Touches the lease while it\n"
    "      runs; acks on exit 0 with the first --max-result bytes (1m) of\n"
    "      its stdout as the job's result (sent to its reply_to), nacks\n"
    "      otherwise (stderr tail as the error).\n"
    "      SIGTERM/SIGINT/SIGHUP: take no more jobs, wait --shutdown-grace\n"
    "      (30s), then stop and release what runs (no failed attempt).\n"
    "      Cancel, lost lease or connection, --timeout: SIGTERM to the job,\n"
    "      SIGKILL after --kill-grace (10s). Reconnects by itself.\n"
    "  cancel QUEUE ID          remove a ready job, or stop a running one\n"
    "  job QUEUE ID             one job as key: value lines (state, attempt,\n"
    "                           holder, lease, progress, last error, ...)\n"
    "  jobs QUEUE [--state ready|delayed|inflight|dead] [--limit N] [--json]\n"
    "                           the queue's jobs in id order (default 100)\n"
    "  route bind ROUTE QUEUE [--pattern P]   (P: a.*.c, a.#; none: every "
    "key)\n"
    "  route unbind ROUTE QUEUE [--pattern P]\n"
    "  route ls                 every binding: route, queue, pattern\n"
    "  progress PERCENT [TEXT] | progress --checkpoint URI\n"
    "      (inside a job run by work) report progress or a checkpoint\n"
    "\n"
    "Durations (D): 500ms, 10s, 5m, 1h30m, 2d; a plain number is "
    "milliseconds.\n"
    "The server is -s [tls://]HOST:PORT (anywhere on the line), else\n"
    "$PROTOQ_SERVER, else 127.0.0.1:7650. 'protoq CMD --help': one command.\n"
    "The auth token (for a broker with an auth_file) is -t TOKEN, else\n"
    "$PROTOQ_TOKEN; prefer the variable: a command line shows in ps.\n"
    "tls://HOST:PORT speaks TLS: the broker's certificate must chain to a CA\n"
    "in --ca FILE ($PROTOQ_CA; default: the system's CAs) and name HOST.\n"
    "--cert/--key FILE ($PROTOQ_CERT, $PROTOQ_KEY): a client certificate,\n"
    "for a broker that asks for one. PEM files. --ca and --cert go anywhere\n"
    "on the line, --key FILE before the command (after it, pub's --key).\n"
    "Exit status: 0 ok, 1 error, 2 usage, 3 the awaited job failed.\n";

/* The commands, for "did you mean" (cli_help.c has their help). */
static const char *const cli_commands[] = {
    "queue", "pub",  "publish", "consume",  "work", "cancel",
    "job",   "jobs", "route",   "progress", "help", NULL,
};
static const char *const queue_commands[] = {
    "create", "ls", "list", "stat", "purge", "rm", "delete", NULL,
};

/*
 * The global options: taken out of the command line wherever they appear
 * before "--" (protoq -s A pub q x, protoq pub q x -s A), each setting one
 * string of struct cli. --opt=VALUE works too. A before_cmd one is global
 * only before the command: after it the name is the command's own (--key
 * FILE, the TLS key, versus pub's --key KEY).
 */
static const struct global_opt {
    const char *shrt, *lng; /* shrt NULL: none */
    size_t off;             /* offsetof(struct cli, ...) */
    bool before_cmd;
} global_opts[] = {
    {"-s", "--server", offsetof(struct cli, server), false},
    {"-t", "--token", offsetof(struct cli, token), false},
    {NULL, "--ca", offsetof(struct cli, tls_ca), false},
    {NULL, "--cert", offsetof(struct cli, tls_cert), false},
    {NULL, "--key", offsetof(struct cli, tls_key), true},
};

/* What usage errors and --help are about: "pub", "queue create"; NULL
 * before the command is known. */
static const char *usage_topic;

/* ---- messages ---- */

int
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
int
fail_pq(const struct cli *cli, int rc)
{
    const char *msg = cli->c ? protoq_errmsg(cli->c) : "";

    if (msg[0] == '\0') {
        msg = pq_strerror(rc);
    }
    if ((rc == PQ_EREMOTE || rc == PQ_ETOOBIG) && cli->c != NULL &&
        protoq_last_error_code(cli->c) != 0) {
        const char *name = protoq_code_name(protoq_last_error_code(cli->c));
        size_t mlen = strlen(msg), nlen = strlen(name);

        /* A connection the broker closed names the code already. */
        if (!(mlen > nlen + 2 && msg[mlen - 1] == ')' &&
              strncmp(msg + mlen - nlen - 1, name, nlen) == 0 &&
              msg[mlen - nlen - 2] == '(')) {
            return fail(cli, "%s (%s)", msg, name);
        }
    }
    return fail(cli, "%s", msg);
}

/* The hint under a usage error. */
static void
usage_hint(void)
{
    if (usage_topic != NULL) {
        fprintf(stderr, "try 'protoq %s --help'\n", usage_topic);
    } else {
        fputs("try 'protoq --help'\n", stderr);
    }
}

int
usage_err(const char *fmt, ...)
{
    va_list ap;

    fputs("protoq: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputs("\n", stderr);
    usage_hint();
    return EXIT_USAGE;
}

/* edit_distance: Levenshtein distance of a and b, capped at 9. */
static size_t
edit_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    size_t row[64];

    if (la >= 64 || lb >= 64) {
        return 9;
    }
    for (size_t j = 0; j <= lb; j++) {
        row[j] = j;
    }
    for (size_t i = 1; i <= la; i++) {
        size_t diag = row[0];

        row[0] = i;
        for (size_t j = 1; j <= lb; j++) {
            size_t up = row[j];
            size_t best = diag + (a[i - 1] != b[j - 1]);

            if (up + 1 < best) {
                best = up + 1;
            }
            if (row[j - 1] + 1 < best) {
                best = row[j - 1] + 1;
            }
            row[j] = best;
            diag = up;
        }
    }
    return row[lb] < 9 ? row[lb] : 9;
}

/* cli_suggest: see cli.h. */
const char *
cli_suggest(const char *word, const char *const *cands)
{
    const char *best = NULL;
    size_t best_d = 3; /* at most two edits... */

    if (strlen(word) < 3) {
        best_d = 2; /* ...one for short words */
    }
    for (size_t i = 0; cands[i] != NULL; i++) {
        size_t d = edit_distance(word, cands[i]);

        if (d < best_d) {
            best_d = d;
            best = cands[i];
        }
    }
    return best;
}

/* Report a bad option of a command (argv[optind - 1]) in one line. */
static void
bad_option(int ch, char **argv, const struct option *opts)
{
    const char *arg = argv[optind - 1];
    char name[64];
    const char *names[128];
    const char *guess;
    size_t n = 0;

    if (ch == ':') {
        usage_err("%s: %s needs a value", usage_topic, arg);
        return;
    }
    if (strncmp(arg, "--", 2) != 0) {
        usage_err("%s: unknown option '%s'", usage_topic, arg);
        return;
    }
    snprintf(name, sizeof(name), "%.*s", (int)strcspn(arg + 2, "="), arg + 2);
    for (; opts[n].name != NULL && n + 1 < sizeof(names) / sizeof(names[0]);
         n++) {
        names[n] = opts[n].name;
    }
    names[n] = NULL;
    guess = cli_suggest(name, names);
    if (guess != NULL) {
        usage_err("%s: unknown option '--%s' (did you mean '--%s'?)",
                  usage_topic, name, guess);
    } else {
        usage_err("%s: unknown option '--%s'", usage_topic, name);
    }
}

/* cli_getopt: see cli.h. */
int
cli_getopt(int argc, char **argv, const struct option *opts)
{
    int ch;

    opterr = 0;
    ch = getopt_long(argc, argv, ":", opts, NULL);
    if (ch == '?' || ch == ':') {
        bad_option(ch, argv, opts);
        return '?';
    }
    return ch;
}

/* ---- parsing ---- */

bool
kv_add(struct kvlist *l, const char *arg)
{
    const char *eq = strchr(arg, '=');
    size_t len = strlen(arg);
    char *copy;

    if (eq == NULL || eq == arg || l->n == MAX_KV ||
        len + 1 > sizeof(l->buf) - l->used) {
        return false;
    }
    copy = l->buf + l->used;
    memcpy(copy, arg, len + 1);
    l->used += len + 1;
    copy[eq - arg] = '\0';
    l->kv[l->n].key = copy;
    l->kv[l->n].value = copy + (eq - arg) + 1;
    l->n++;
    return true;
}

/* ---- connecting ---- */

int
cli_connect(struct cli *cli)
{
    struct protoq_opts o;
    int rc;

    memset(&o, 0, sizeof(o));
    o.client_name = "protoq-cli";
    o.auth_token = cli->token;
    o.io_timeout_ms = 60000;
    o.tls_ca_file = cli->tls_ca;
    o.tls_cert_file = cli->tls_cert;
    o.tls_key_file = cli->tls_key;
    o.session_id = cli->session_id;
    rc = protoq_connect(cli->server, &o, &cli->c);
    if (rc != PQ_OK) {
        int ret = fail_pq(cli, rc);

        protoq_close(cli->c);
        cli->c = NULL;
        return ret;
    }
    return EXIT_OK;
}

/* ---- main ---- */

/*
 * server_check: a server address the library can use: [tls://]HOST:PORT,
 * [IPV6]:PORT, or a HOST alone (the default port); the port 1-65535.
 * NULL when fine, else what is wrong.
 */
static const char *
server_check(const char *s)
{
    const char *port;
    uint64_t v;

    if (strncmp(s, "tls://", 6) == 0) {
        s += 6;
    }
    if (s[0] == '[') {
        const char *end = strchr(s, ']');

        if (end == NULL || end == s + 1) {
            return "want [IPV6]:PORT";
        }
        if (end[1] == '\0') {
            return NULL;
        }
        if (end[1] != ':') {
            return "want [IPV6]:PORT";
        }
        port = end + 2;
    } else {
        const char *colon = strrchr(s, ':');

        if (colon == NULL || strchr(s, ':') != colon) {
            return s[0] == '\0' ? "want HOST:PORT" : NULL;
        }
        if (colon == s) {
            return "want HOST:PORT (no host)";
        }
        port = colon + 1;
    }
    if (units_parse_u64(port, &v) != PQ_OK || v == 0 || v > 65535) {
        return "the port must be a number 1-65535";
    }
    return NULL;
}

/*
 * take_globals: move the global options out of argv[1..] (up to "--"),
 * setting cli's fields; what is left stays in order in argv, argc updated.
 * Returns EXIT_OK, or EXIT_USAGE after the message.
 */
static int
take_globals(struct cli *cli, int *argc, char **argv)
{
    int out = 1, i = 1;
    bool cmd_seen = false; /* the first word that is not global is it */

    while (i < *argc) {
        const struct global_opt *g = NULL;
        const char *val = NULL;
        size_t k;

        if (strcmp(argv[i], "--") == 0) {
            break;
        }
        for (k = 0; k < sizeof(global_opts) / sizeof(global_opts[0]); k++) {
            size_t ll = strlen(global_opts[k].lng);

            if (global_opts[k].before_cmd && cmd_seen) {
                continue;
            }
            if ((global_opts[k].shrt != NULL &&
                 strcmp(argv[i], global_opts[k].shrt) == 0) ||
                strcmp(argv[i], global_opts[k].lng) == 0) {
                g = &global_opts[k];
                if (i + 1 >= *argc) {
                    return usage_err("%s needs a value", argv[i]);
                }
                val = argv[i + 1];
                i += 2;
                break;
            }
            if (strncmp(argv[i], global_opts[k].lng, ll) == 0 &&
                argv[i][ll] == '=') {
                g = &global_opts[k];
                val = argv[i] + ll + 1;
                i++;
                break;
            }
        }
        if (g == NULL) {
            cmd_seen = true;
            argv[out++] = argv[i++];
            continue;
        }
        *(const char **)((char *)cli + g->off) = val;
    }
    while (i < *argc) {
        argv[out++] = argv[i++];
    }
    argv[out] = NULL;
    *argc = out;
    return EXIT_OK;
}

/* wants_help: a -h or --help among args (up to "--"). */
static bool
wants_help(int argc, char **argv)
{
    for (int i = 0; i < argc && strcmp(argv[i], "--") != 0; i++) {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            return true;
        }
    }
    return false;
}

/* The topic of argv[0..]: "queue create" for a known queue command, else
 * the command's name, into buf. */
static const char *
topic_of(int argc, char **argv, char *buf, size_t cap)
{
    if (strcmp(argv[0], "queue") == 0 && argc > 1) {
        for (size_t k = 0; queue_commands[k] != NULL; k++) {
            if (strcmp(argv[1], queue_commands[k]) == 0) {
                snprintf(buf, cap, "queue %s", argv[1]);
                return buf;
            }
        }
    }
    snprintf(buf, cap, "%s", argv[0]);
    return buf;
}

/* print_help: the help of topic on stdout (the whole usage when there is
 * none). */
static int
print_help(const char *topic)
{
    const char *text = topic != NULL ? cli_help(topic) : NULL;

    if (text == NULL && topic != NULL && strncmp(topic, "queue ", 6) == 0) {
        text = cli_help("queue");
    }
    fputs(text != NULL ? text : usage_text, stdout);
    return EXIT_OK;
}

/* getenv, with "" counted as unset. */
static const char *
env_or_null(const char *name)
{
    const char *v = getenv(name);

    return v != NULL && v[0] != '\0' ? v : NULL;
}

/* tls_file: *opt from its option, else from $env; NULL when "" or unset. */
static void
tls_file(const char **opt, const char *env)
{
    if (*opt == NULL) {
        *opt = env_or_null(env);
    } else if ((*opt)[0] == '\0') {
        *opt = NULL;
    }
}

/* main: parse the global options, run one command, exit 0/1/2. */
int
main(int argc, char **argv)
{
    struct cli cli;
    char topic[64];
    const char *cmd, *bad, *guess;
    bool from_env = false;
    int ret;

    memset(&cli, 0, sizeof(cli));
    if (take_globals(&cli, &argc, argv) != EXIT_OK) {
        return EXIT_USAGE;
    }
    if (cli.server == NULL) {
        cli.server = env_or_null("PROTOQ_SERVER");
        from_env = cli.server != NULL;
    }
    if (cli.server == NULL || cli.server[0] == '\0') {
        cli.server = "127.0.0.1:7650";
    }
    if (cli.token == NULL) {
        cli.token = getenv("PROTOQ_TOKEN");
    }
    /* The TLS files: the option, else the environment; "" is unset. */
    tls_file(&cli.tls_ca, "PROTOQ_CA");
    tls_file(&cli.tls_cert, "PROTOQ_CERT");
    tls_file(&cli.tls_key, "PROTOQ_KEY");
    if (argc < 2) {
        return usage_err("no command");
    }
    cmd = argv[1];
    if (strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0) {
        fputs(usage_text, stdout);
        return EXIT_OK;
    }
    if (strcmp(cmd, "--version") == 0 || strcmp(cmd, "-V") == 0) {
        printf("protoq %s\n", PROTOQ_VERSION);
        return EXIT_OK;
    }
    if (cmd[0] == '-') {
        return usage_err("unknown option '%s'", cmd);
    }
    usage_topic = topic_of(argc - 1, argv + 1, topic, sizeof(topic));
    if (strcmp(cmd, "help") == 0) {
        return argc > 2 ? print_help(topic_of(argc - 2, argv + 2, topic,
                                              sizeof(topic)))
                        : print_help(NULL);
    }
    if (wants_help(argc - 1, argv + 1)) {
        return print_help(usage_topic);
    }
    if ((bad = server_check(cli.server)) != NULL) {
        return usage_err("%s%s: %s", from_env ? "PROTOQ_SERVER=" : "server ",
                         cli.server, bad);
    }
    cli.cmd = cmd;
    /* Each command parses argv[1..] with cli_getopt from a fresh start;
     * argv[1] plays the program name. */
    argc--;
    argv++;
    optind = 0;
    if (strcmp(cmd, "queue") == 0) {
        ret = cmd_queue(&cli, argc, argv);
    } else if (strcmp(cmd, "pub") == 0 || strcmp(cmd, "publish") == 0) {
        ret = cmd_pub(&cli, argc, argv);
    } else if (strcmp(cmd, "consume") == 0) {
        ret = cmd_consume(&cli, argc, argv);
    } else if (strcmp(cmd, "work") == 0) {
        ret = cmd_work(&cli, argc, argv);
    } else if (strcmp(cmd, "cancel") == 0) {
        ret = cmd_cancel(&cli, argc, argv);
    } else if (strcmp(cmd, "job") == 0) {
        ret = cmd_job(&cli, argc, argv);
    } else if (strcmp(cmd, "jobs") == 0) {
        ret = cmd_jobs(&cli, argc, argv);
    } else if (strcmp(cmd, "route") == 0) {
        ret = cmd_route(&cli, argc, argv);
    } else if (strcmp(cmd, "progress") == 0) {
        ret = cmd_progress(&cli, argc, argv);
    } else if ((guess = cli_suggest(cmd, cli_commands)) != NULL) {
        usage_topic = NULL;
        ret =
            usage_err("unknown command '%s' (did you mean '%s'?)", cmd, guess);
    } else {
        usage_topic = NULL;
        ret = usage_err("unknown command '%s'", cmd);
    }
    protoq_close(cli.c);
    return ret;
}
