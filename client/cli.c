/*
 * cli.c: the protoq command-line tool: global options, usage, messages and
 * connecting; each command lives in its own file (cli.h lists them). It
 * uses libprotoq (protoq.h), the C library, and protocol/units.h for
 * durations and sizes (the grammar protoqd's config uses too).
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
#include "cli.h"

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

static const char usage_text[] =
    "usage: protoq [-s [tls://]HOST:PORT] [--ca FILE] [--cert FILE --key "
    "FILE]\n"
    "              COMMAND [ARGS]\n"
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
    "  work QUEUE [--concurrency N] [--tag K=V]... [--timeout D]\n"
    "             [--shutdown-grace D] [--kill-grace D] -- COMMAND [ARG]...\n"
    "      Runs COMMAND once per job in its own process group: payload on\n"
    "      stdin; PROTOQ_MESSAGE_ID, PROTOQ_ATTEMPT, PROTOQ_QUEUE,\n"
    "      PROTOQ_HEADER_<KEY>, PROTOQ_PROGRESS (a file for progress lines)\n"
    "      and the last attempt's PROTOQ_PROGRESS_PERCENT/_TEXT and\n"
    "      PROTOQ_CHECKPOINT in the environment. Touches the lease while it\n"
    "      runs; acks on exit 0, nacks otherwise (stderr tail as the error).\n"
    "      SIGTERM/SIGINT/SIGHUP: take no more jobs, wait --shutdown-grace\n"
    "      (30s), then stop and release what runs (no failed attempt).\n"
    "      Cancel, lost lease or connection, --timeout: SIGTERM to the job,\n"
    "      SIGKILL after --kill-grace (10s). Reconnects by itself.\n"
    "  cancel QUEUE ID          remove a ready job, or stop a running one\n"
    "  progress PERCENT [TEXT] | progress --checkpoint URI\n"
    "      (inside a job run by work) report progress or a checkpoint\n"
    "\n"
    "Durations (D): 500ms, 10s, 5m, 1h30m, 2d; a plain number is "
    "milliseconds.\n"
    "The server is -s HOST:PORT, else $PROTOQ_SERVER, else 127.0.0.1:7650.\n"
    "tls://HOST:PORT speaks TLS: the broker's certificate must chain to a CA\n"
    "in --ca FILE ($PROTOQ_CA; default: the system's CAs) and name HOST.\n"
    "--cert/--key FILE ($PROTOQ_CERT, $PROTOQ_KEY): a client certificate,\n"
    "for a broker that asks for one. PEM files.\n"
    "Exit status: 0 ok, 1 error, 2 usage.\n";

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
    if (rc == PQ_EREMOTE && cli->c != NULL &&
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

int
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
    o.auth_token = getenv("PROTOQ_TOKEN");
    o.io_timeout_ms = 60000;
    o.tls_ca_file = cli->tls_ca;
    o.tls_cert_file = cli->tls_cert;
    o.tls_key_file = cli->tls_key;
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

/* getenv, with "" counted as unset. */
static const char *
env_or_null(const char *name)
{
    const char *v = getenv(name);

    return v != NULL && v[0] != '\0' ? v : NULL;
}

/*
 * global_opt: one global option taking a value at argv[0] ("-s X",
 * "--server X", "--server=X", and the same for --ca, --cert, --key).
 * Returns the argv entries it used, 0 when argv[0] is none of them, -1
 * when its value is missing.
 */
static int
global_opt(struct cli *cli, int argc, char **argv)
{
    const struct {
        const char *flag, *alias;
        const char **dst;
    } opts[] = {
        {"--server", "-s", &cli->server},
        {"--ca", NULL, &cli->tls_ca},
        {"--cert", NULL, &cli->tls_cert},
        {"--key", NULL, &cli->tls_key},
    };

    for (size_t k = 0; k < sizeof(opts) / sizeof(opts[0]); k++) {
        size_t len = strlen(opts[k].flag);

        if (strncmp(argv[0], opts[k].flag, len) == 0 && argv[0][len] == '=') {
            *opts[k].dst = argv[0] + len + 1;
            return 1;
        }
        if (strcmp(argv[0], opts[k].flag) == 0 ||
            (opts[k].alias != NULL && strcmp(argv[0], opts[k].alias) == 0)) {
            if (argc < 2) {
                return -1;
            }
            *opts[k].dst = argv[1];
            return 2;
        }
    }
    return 0;
}

/* main: parse the global options, run one command, exit 0/1/2. */
int
main(int argc, char **argv)
{
    struct cli cli;
    const char *cmd;
    int i = 1;
    int n;
    int ret;

    memset(&cli, 0, sizeof(cli));
    cli.server = env_or_null("PROTOQ_SERVER");
    if (cli.server == NULL) {
        cli.server = "127.0.0.1:7650";
    }
    cli.tls_ca = env_or_null("PROTOQ_CA");
    cli.tls_cert = env_or_null("PROTOQ_CERT");
    cli.tls_key = env_or_null("PROTOQ_KEY");
    while (i < argc && argv[i][0] == '-') {
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            fputs(usage_text, stdout);
            return EXIT_OK;
        }
        if (strcmp(argv[i], "--version") == 0 || strcmp(argv[i], "-V") == 0) {
            printf("protoq %s\n", PROTOQ_VERSION);
            return EXIT_OK;
        }
        n = global_opt(&cli, argc - i, argv + i);
        if (n < 0) {
            return usage_err("%s needs a value", argv[i]);
        }
        if (n > 0) {
            i += n;
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
    } else if (strcmp(cmd, "cancel") == 0) {
        ret = cmd_cancel(&cli, argc - i, argv + i);
    } else if (strcmp(cmd, "progress") == 0) {
        ret = cmd_progress(&cli, argc - i, argv + i);
    } else if (strcmp(cmd, "help") == 0) {
        fputs(usage_text, stdout);
        ret = EXIT_OK;
    } else {
        ret = usage_err("unknown command '%s'", cmd);
    }
    protoq_close(cli.c);
    return ret;
}
