/*
 * cli.h: what the protoq CLI's files share. cli.c parses the global options
 * and runs one command; each command is in its own file:
 *
 *   cli_queue.c    queue create|ls|stat|purge|rm
 *   cli_pub.c      pub
 *   cli_wait.c     pub --wait (a private reply queue, result or failure)
 *   cli_consume.c  consume
 *   cli_work.c     work (runs a command per job)
 *   cli_job.c      cancel, progress, job, jobs
 *   cli_route.c    route bind|unbind|ls
 *   cli_json.c     the --json writer
 */
#ifndef PQ_CLI_H
#define PQ_CLI_H

#include <getopt.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "protoq.h"
#include "units.h"

#ifndef PROTOQ_VERSION
#define PROTOQ_VERSION "0.1.0"
#endif

enum {
    EXIT_OK = 0,
    EXIT_ERR = 1,
    EXIT_USAGE = 2,
    EXIT_JOB_FAILED = 3, /* pub --wait: the awaited job failed */
    LINES_WINDOW = 1000, /* unconfirmed publishes of pub --lines */
    MAX_KV = 64,         /* --header / --require / --tag each */
    KV_TEXT_MAX = 16384, /* their text, per option kind */
    DEFAULT_PREFETCH = 1000,
    DEFAULT_WAIT_MS = 5000,
};

/* The global options and what every command needs. */
struct cli {
    const char *server;     /* HOST:PORT or tls://HOST:PORT */
    const char *token;      /* -t TOKEN, else $PROTOQ_TOKEN; NULL = none */
    const char *tls_ca;     /* --ca / $PROTOQ_CA; NULL = system CAs */
    const char *tls_cert;   /* --cert / $PROTOQ_CERT (mTLS) */
    const char *tls_key;    /* --key / $PROTOQ_KEY */
    const char *cmd;        /* e.g. "pub jobs", for error messages */
    const char *session_id; /* Hello's session (protoq work); NULL = none */
    char cmdbuf[300];
    protoq_client *c;
};

/* A list of K=V pairs from repeated options. The strings are copied into
 * buf (argv stays as given, so ps shows what the user typed). */
struct kvlist {
    struct protoq_kv kv[MAX_KV];
    size_t n;
    char buf[KV_TEXT_MAX];
    size_t used;
};

/* fail: "protoq: CMD: message" on stderr; returns EXIT_ERR. */
__attribute__((format(printf, 2, 3))) int fail(const struct cli *cli,
                                               const char *fmt, ...);
/* fail_pq: report a failed library call on cli->c (message and code). */
int fail_pq(const struct cli *cli, int rc);
/* usage_err: "protoq: message" and a hint ("try 'protoq pub --help'") on
 * stderr; returns EXIT_USAGE. */
__attribute__((format(printf, 1, 2))) int usage_err(const char *fmt, ...);
/* cli_getopt: getopt_long over a command's options (no short ones); an
 * unknown option or a missing value is reported in one line (with "did
 * you mean") and returns '?': the caller returns EXIT_USAGE. */
int cli_getopt(int argc, char **argv, const struct option *opts);
/* cli_suggest: the candidate (NULL-terminated list) closest to a misspelt
 * word, or NULL when none is close. */
const char *cli_suggest(const char *word, const char *const *cands);
/* cli_help: the --help text of a topic ("pub", "queue create"), or NULL
 * (cli_help.c). */
const char *cli_help(const char *topic);
/* kv_add: add a copy of "K=V" to l; false when malformed or full. */
bool kv_add(struct kvlist *l, const char *arg);
/* cli_json_delivery: one delivery as a line of JSON on out (cli_json.c). */
void cli_json_delivery(FILE *out, const struct protoq_delivery *d);
/* cli_json_str: s[0..n) as a JSON string (quoted, escaped) on out. */
void cli_json_str(FILE *out, const char *s, size_t n);
/* cli_connect: connect cli->c to cli->server; EXIT_OK or a failure. */
int cli_connect(struct cli *cli);

/* The commands: argv[0] is the command's name; exit status back. */
int cmd_queue(struct cli *cli, int argc, char **argv);
int cmd_pub(struct cli *cli, int argc, char **argv);
/* pub_wait: publish m to queue with a private reply queue as reply_to
 * and wait up to timeout_ms (< 0: forever) for the job's end: EXIT_OK with
 * the result on stdout, EXIT_JOB_FAILED with the failure on stderr, or
 * EXIT_ERR. The reply queue is removed in every case. */
int pub_wait(struct cli *cli, const char *queue, struct protoq_message *m,
             int64_t timeout_ms);
int cmd_consume(struct cli *cli, int argc, char **argv);
int cmd_work(struct cli *cli, int argc, char **argv);
int cmd_cancel(struct cli *cli, int argc, char **argv);
int cmd_progress(struct cli *cli, int argc, char **argv);
int cmd_job(struct cli *cli, int argc, char **argv);
int cmd_jobs(struct cli *cli, int argc, char **argv);
int cmd_route(struct cli *cli, int argc, char **argv);

#endif
