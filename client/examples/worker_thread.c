/*
 * worker_thread.c: a libprotoq worker that runs each job in a thread of its
 * own and keeps the job's lease alive from the handle's thread.
 *
 * The pattern (README, "A long job in a thread"): a protoq_client handle is
 * not thread-safe, so only the main thread ever calls into it. The job
 * thread never touches the handle: it writes its progress into a
 * mutex-protected struct and wakes the main thread by writing a byte to a
 * pipe. The main thread sleeps in poll() on the pipe and the handle's
 * socket, and it alone touches the lease (with the latest progress), acks
 * when the job is done, and stops the job when the broker cancels it or
 * the connection is lost (the job is then someone else's).
 *
 * A job resumes from the checkpoint an earlier attempt reported.
 *
 *     worker_thread [-s HOST:PORT] [-n JOBS] QUEUE
 *
 * A job's payload is "steps=N" (default 20); each step takes 50 ms. The
 * worker exits after JOBS jobs (default: when SIGINT or SIGTERM arrives).
 * It prints one line per event: "start", "progress", "done", "lost".
 *
 * Built by `make all` into build/examples/ (not installed); run against a
 * real protoqd by tests/integration/check_examples.c.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "protoq.h"

enum {
    STEP_MS = 50,
    PROGRESS_EVERY_MS = 300, /* touch with progress at most this often */
};

/* The one job, shared by the main thread and the job thread. */
struct job {
    pthread_mutex_t mu;
    pthread_t thread;
    bool running; /* main thread only: a job thread exists */
    int wake_fd;  /* the pipe's write end: the job thread wakes main */
    /* set by main before the thread starts; read-only afterwards */
    uint64_t id;
    uint32_t attempt;
    int steps, first_step;
    /* under mu: the job thread writes these, main reads them */
    int step;
    bool finished;
    /* under mu: main writes, the job thread reads */
    bool stop;
};

struct worker {
    protoq_client *c;
    struct job job;
    uint64_t lease_ms;
    int64_t next_touch_ms, last_progress_ms;
    int reported_step;
    int done, max_jobs;
};

static volatile sig_atomic_t stop_signal;

static void
on_signal(int sig)
{
    (void)sig;
    stop_signal = 1;
}

static int64_t
now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- the job thread: no libprotoq calls here ---- */

static void *
job_main(void *arg)
{
    struct job *j = arg;
    bool stop = false;

    for (int step = j->first_step; step < j->steps && !stop; step++) {
        struct timespec ts = {0, STEP_MS * 1000000L};

        nanosleep(&ts, NULL); /* the real work */
        pthread_mutex_lock(&j->mu);
        j->step = step + 1;
        stop = j->stop;
        pthread_mutex_unlock(&j->mu);
        (void)!write(j->wake_fd, "p", 1);
    }
    pthread_mutex_lock(&j->mu);
    j->finished = true;
    pthread_mutex_unlock(&j->mu);
    (void)!write(j->wake_fd, "f", 1);
    return NULL;
}

/* ---- the handle's thread ---- */

static void
stop_job(struct job *j)
{
    pthread_mutex_lock(&j->mu);
    j->stop = true;
    pthread_mutex_unlock(&j->mu);
}

/* Delivery callback: start the job thread (prefetch 1: one job at a
 * time). The callback must not block, so the work goes to the thread. */
static void
on_deliver(void *arg, protoq_client *c, const struct protoq_delivery *d)
{
    struct worker *w = arg;
    struct job *j = &w->job;
    int steps = 20, from = 0;

    if (j->running) {
        /* Cannot happen with prefetch 1; give it back if it does. */
        protoq_release(c, d->message_id, d->attempt, PROTOQ_RELEASE_UNSPECIFIED,
                       NULL, false);
        return;
    }
    sscanf((const char *)d->payload, "steps=%d", &steps);
    if (d->has_progress) {
        sscanf(d->progress.checkpoint, "step-%d", &from);
    }
    j->id = d->message_id;
    j->attempt = d->attempt;
    j->steps = steps;
    j->first_step = from < steps ? from : steps;
    j->step = j->first_step;
    j->finished = j->stop = false;
    w->lease_ms = d->lease_ms ? d->lease_ms : 30000;
    w->next_touch_ms = now_ms() + (int64_t)w->lease_ms / 3;
    w->last_progress_ms = now_ms();
    w->reported_step = j->first_step;
    if (pthread_create(&j->thread, NULL, job_main, j) != 0) {
        protoq_release(c, d->message_id, d->attempt, PROTOQ_RELEASE_UNSPECIFIED,
                       NULL, false);
        return;
    }
    j->running = true;
    printf("start %" PRIu64 " attempt %u from step %d of %d\n", j->id,
           j->attempt, j->first_step, j->steps);
    fflush(stdout);
}

/* The broker asks us to stop a job (protoq cancel). */
static void
on_cancel(void *arg, protoq_client *c, const char *queue, uint64_t id,
          uint32_t attempt)
{
    struct worker *w = arg;

    (void)c;
    (void)queue;
    (void)attempt;
    if (w->job.running && w->job.id == id) {
        stop_job(&w->job);
    }
}

/* The connection went: the broker has taken the job back, so stop it
 * (another worker will run it, from its last checkpoint). */
static void
on_conn(void *arg, protoq_client *c, int event, int err, uint64_t sub_id)
{
    struct worker *w = arg;

    (void)err;
    (void)sub_id;
    if (event == PROTOQ_CONN_LOST) {
        printf("lost connection: %s\n", protoq_errmsg(c));
        if (w->job.running) {
            stop_job(&w->job);
        }
    } else if (event == PROTOQ_CONN_RESTORED) {
        printf("connected again\n");
    }
    fflush(stdout);
}

/* After a wake-up or a timeout: report progress, keep the lease, finish. */
static int
tend_job(struct worker *w)
{
    struct job *j = &w->job;
    struct protoq_progress pr;
    char text[64], ckpt[64];
    int step;
    bool finished, stopped;
    int rc = PQ_OK;

    if (!j->running) {
        return PQ_OK;
    }
    pthread_mutex_lock(&j->mu);
    step = j->step;
    finished = j->finished;
    stopped = j->stop;
    pthread_mutex_unlock(&j->mu);

    snprintf(text, sizeof(text), "step %d/%d", step, j->steps);
    snprintf(ckpt, sizeof(ckpt), "step-%d", step);
    pr.percent = (uint32_t)(j->steps ? step * 100 / j->steps : 100);
    pr.text = text;
    pr.checkpoint = ckpt;
    if (finished) {
        /* Copy the token and free the slot first: the next delivery's
         * callback may run inside the ack below (callbacks run from
         * inside any call on the handle). */
        uint64_t id = j->id;
        uint32_t attempt = j->attempt;

        pthread_join(j->thread, NULL);
        j->running = false;
        w->done++;
        if (stopped) {
            /* Cancelled or lost: not ours to ack. A release ends a cancel;
             * after a lost connection it answers STALE_DELIVERY. */
            protoq_release(w->c, id, attempt, PROTOQ_RELEASE_UNSPECIFIED, &pr,
                           false);
            printf("stopped %" PRIu64 " at step %d\n", id, step);
        } else {
            struct protoq_ack_opts ao = {.confirm = true};

            ao.result = text;
            ao.result_len = strlen(text);
            rc = protoq_ack_ex(w->c, id, attempt, &ao);
            printf("done %" PRIu64 " attempt %u: %s\n", id, attempt,
                   rc == PQ_OK ? "acked" : protoq_errmsg(w->c));
            rc = PQ_OK; /* a failed ack is the broker's to retry */
        }
        fflush(stdout);
        return rc;
    }
    if (now_ms() >= w->next_touch_ms ||
        (step != w->reported_step &&
         now_ms() - w->last_progress_ms >= PROGRESS_EVERY_MS)) {
        rc = protoq_touch(w->c, j->id, j->attempt, 0, &pr, NULL);
        if (rc == PQ_EREMOTE) {
            /* STALE_DELIVERY: the lease was lost; the job is not ours. */
            stop_job(j);
            rc = PQ_OK;
        }
        w->next_touch_ms = now_ms() + (int64_t)w->lease_ms / 3;
        w->last_progress_ms = now_ms();
        w->reported_step = step;
        printf("progress %" PRIu64 " %u%% %s\n", j->id, pr.percent, text);
        fflush(stdout);
    }
    return rc == PQ_ECLOSED ? PQ_OK : rc; /* reconnecting: carry on */
}

static int
run(struct worker *w, const char *queue, int wake_r)
{
    uint64_t sub;
    int rc = protoq_subscribe(w->c, queue, 1, NULL, 0, on_deliver, w, &sub);

    if (rc != PQ_OK) {
        return rc;
    }
    while (!stop_signal && (w->max_jobs == 0 || w->done < w->max_jobs)) {
        struct pollfd p[2] = {{.fd = protoq_fd(w->c), .events = POLLIN},
                              {.fd = wake_r, .events = POLLIN}};
        char buf[64];

        /* Run what is already buffered (and reconnect when down) before
         * sleeping: poll() cannot see bytes the handle has read. */
        rc = protoq_poll(w->c, 0);
        if (rc < 0) {
            return rc;
        }
        if (rc == 0 && poll(p, 2, w->job.running ? 100 : 500) < 0 &&
            errno != EINTR) {
            return PQ_ESYS;
        }
        while (read(wake_r, buf, sizeof(buf)) > 0) {
        }
        rc = tend_job(w);
        if (rc != PQ_OK) {
            return rc;
        }
    }
    if (w->job.running) { /* interrupted: give the job back, progress kept */
        stop_job(&w->job);
        pthread_join(w->job.thread, NULL);
        protoq_flow(w->c, sub, 0);
        protoq_release(w->c, w->job.id, w->job.attempt, PROTOQ_RELEASE_SHUTDOWN,
                       NULL, true);
    }
    return PQ_OK;
}

int
main(int argc, char **argv)
{
    struct protoq_opts o = {.client_name = "worker_thread", .reconnect = true};
    const char *server = getenv("PROTOQ_SERVER");
    struct worker w;
    int pipefd[2];
    int opt, rc;

    memset(&w, 0, sizeof(w));
    while ((opt = getopt(argc, argv, "s:n:")) != -1) {
        if (opt == 's') {
            server = optarg;
        } else if (opt == 'n') {
            w.max_jobs = atoi(optarg);
        } else {
            fprintf(stderr, "usage: worker_thread [-s HOST:PORT] [-n JOBS] "
                            "QUEUE\n");
            return 2;
        }
    }
    if (optind + 1 != argc) {
        fprintf(stderr,
                "usage: worker_thread [-s HOST:PORT] [-n JOBS] QUEUE\n");
        return 2;
    }
    signal(SIGINT, on_signal);
    signal(SIGTERM, on_signal);
    if (pipe2(pipefd, O_NONBLOCK | O_CLOEXEC) != 0) {
        perror("pipe");
        return 1;
    }
    pthread_mutex_init(&w.job.mu, NULL);
    w.job.wake_fd = pipefd[1];
    rc = protoq_connect(server ? server : "127.0.0.1:7650", &o, &w.c);
    if (rc == PQ_OK) {
        protoq_set_cancel_cb(w.c, on_cancel, &w);
        protoq_set_conn_cb(w.c, on_conn, &w);
        rc = run(&w, argv[optind], pipefd[0]);
    }
    if (rc != PQ_OK) {
        fprintf(stderr, "worker_thread: %s\n",
                w.c ? protoq_errmsg(w.c) : pq_strerror(rc));
    }
    protoq_close(w.c);
    close(pipefd[0]);
    close(pipefd[1]);
    pthread_mutex_destroy(&w.job.mu);
    return rc == PQ_OK ? 0 : 1;
}
