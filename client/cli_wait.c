/*
 * cli_wait.c: protoq pub --wait: submit a job and block until its result
 * or its failure comes back, on a private reply queue that is created
 * first and removed at the end (also after a timeout or a signal).
 *
 * The broker publishes one message to the job's reply_to when the job ends
 * (PROTOCOL.md, "Results and failure notices"): protoq-status ok with the
 * result as payload (printed on stdout, exit 0), or failed with
 * protoq-reason and protoq-error (printed on stderr, exit 3).
 */
#include "cli.h"

#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile sig_atomic_t g_wait_stop;

static void
on_wait_signal(int sig)
{
    g_wait_stop = sig;
}

/* What came back to the reply queue. */
struct reply {
    bool got;
    bool ok;
    uint64_t job_id; /* the job it is about (protoq-job-id) */
    char *payload;   /* malloc'ed copy */
    size_t len;
    char reason[64];
    char error[1100];
};

static void
on_reply(void *arg, protoq_client *c, const struct protoq_delivery *d)
{
    struct reply *r = arg;
    uint64_t job = 0;

    for (size_t i = 0; i < d->n_headers; i++) {
        if (strcmp(d->headers[i].key, "protoq-job-id") == 0) {
            job = strtoull(d->headers[i].value, NULL, 10);
        }
    }
    if (r->got || job != r->job_id) {
        protoq_ack(c, d->message_id, d->attempt); /* not ours: drop it */
        return;
    }
    r->got = true;
    r->ok = false;
    for (size_t i = 0; i < d->n_headers; i++) {
        const char *k = d->headers[i].key, *v = d->headers[i].value;

        if (strcmp(k, "protoq-status") == 0) {
            r->ok = strcmp(v, "ok") == 0;
        } else if (strcmp(k, "protoq-reason") == 0) {
            snprintf(r->reason, sizeof(r->reason), "%s", v);
        } else if (strcmp(k, "protoq-error") == 0) {
            snprintf(r->error, sizeof(r->error), "%s", v);
        }
    }
    r->payload = malloc(d->len ? d->len : 1);
    if (r->payload != NULL) {
        memcpy(r->payload, d->payload, d->len);
        r->len = d->len;
    }
    protoq_ack(c, d->message_id, d->attempt);
}

static int64_t
mono_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* The outcome as the exit status: the result on stdout (0) or the failure
 * on stderr (3). */
static int
report(const struct cli *cli, const struct reply *r)
{
    if (!r->ok) {
        size_t n = strlen(r->error);

        while (n > 0 && (r->error[n - 1] == '\n' || r->error[n - 1] == ' ')) {
            n--;
        }
        fprintf(stderr, "protoq: %s: job %" PRIu64 " failed: %s%s%.*s\n",
                cli->cmd, r->job_id, r->reason[0] ? r->reason : "unknown",
                n ? ": " : "", (int)n, r->error);
        return EXIT_JOB_FAILED;
    }
    if (r->payload == NULL) {
        return fail(cli, "out of memory for the result");
    }
    if (fwrite(r->payload, 1, r->len, stdout) != r->len ||
        fflush(stdout) != 0) {
        return fail(cli, "stdout: %s", strerror(errno));
    }
    return EXIT_OK;
}

/* pub_wait: see cli.h. */
int
pub_wait(struct cli *cli, const char *queue, struct protoq_message *m,
         int64_t timeout_ms)
{
    struct protoq_queue_attrs attrs;
    struct reply r;
    struct sigaction sa;
    char rq[PROTOQ_NAME_MAX + 1];
    int64_t end = timeout_ms >= 0 ? mono_ms() + timeout_ms : -1;
    int rc, status = EXIT_ERR;
    bool dup = false;

    memset(&r, 0, sizeof(r));
    memset(&attrs, 0, sizeof(attrs));
    snprintf(rq, sizeof(rq), "protoq.reply.%ld.%lx", (long)getpid(),
             (unsigned long)(mono_ms() ^ (int64_t)time(NULL) << 20));
    rc = protoq_queue_create(cli->c, rq, &attrs);
    if (rc != PQ_OK) {
        return fail_pq(cli, rc);
    }
    /* Stop cleanly on a signal so that the reply queue goes too. */
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_wait_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    m->reply_to = rq;
    rc = protoq_publish_ex(cli->c, queue, m, &r.job_id, &dup);
    if (rc == PQ_OK && dup) {
        /* nothing stored: that job's end goes to its own reply queue */
        status = fail(cli,
                      "key %s: job %" PRIu64
                      " was published with it before; nothing was stored and "
                      "no result will come here",
                      m->idempotency_key, r.job_id);
        goto out;
    }
    if (rc == PQ_OK) {
        rc = protoq_subscribe(cli->c, rq, 1, NULL, 0, on_reply, &r, NULL);
    }
    if (rc != PQ_OK) {
        status = fail_pq(cli, rc);
        goto out;
    }
    while (!r.got && !g_wait_stop) {
        int64_t left = end < 0 ? 1000 : end - mono_ms();

        if (left <= 0) {
            break;
        }
        rc = protoq_poll(cli->c, (int)(left < 1000 ? left : 1000));
        if (rc < 0) {
            status = fail_pq(cli, rc);
            goto out;
        }
    }
    if (r.got) {
        status = report(cli, &r);
    } else if (g_wait_stop) {
        status = fail(cli,
                      "stopped by signal %d; job %" PRIu64
                      " goes on, its result is not kept",
                      (int)g_wait_stop, r.job_id);
    } else {
        status = fail(cli,
                      "no result within %" PRId64 " ms; job %" PRIu64
                      " goes on, its result is not kept",
                      timeout_ms, r.job_id);
    }
out:
    protoq_flush(cli->c);
    rc = protoq_queue_delete(cli->c, rq);
    if (rc != PQ_OK && status == EXIT_OK) {
        status = fail_pq(cli, rc);
    }
    free(r.payload);
    return status;
}
