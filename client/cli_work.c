/*
 * cli_work.c: protoq work: run a command once per job, touching its lease while it
 * runs; ack on exit 0, nack otherwise.
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

int
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
            if (units_parse_u64(optarg, &conc) != PQ_OK || conc == 0 || conc > 4096) {
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

