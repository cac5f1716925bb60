/*
 * cli_work.c: protoq work, a supervisor that runs a command once per job.
 *
 * Each job runs in its own process group with the payload on stdin and its
 * id, attempt, headers and the previous attempt's progress in the
 * environment. While it runs, work touches its lease (and forwards the
 * progress lines the job writes to $PROTOQ_PROGRESS); exit 0 acks it with
 * its stdout (the first --max-result bytes, default 1 MiB, the broker's
 * default max_result_bytes) as the job's result, which the broker sends to
 * the job's reply_to; any other end nacks it with the tail of its stderr
 * as the error text. The job's stdout is also passed through to ours.
 *
 * Slots and credit: the broker may push as many jobs as the subscription
 * has credit. A job whose delivery is no longer ours (cancelled, lease lost,
 * connection lost) may still be dying in its slot, so the credit is kept at
 * concurrency minus those ("orphans"), with Flow; a delivery is never
 * released for want of a slot except in the race before a Flow arrives.
 *
 * Stopping a job: SIGTERM to its process group, SIGKILL after --kill-grace.
 * Reasons: a CancelRequested (when the job is gone, a release ends the
 * cancel; the broker fences it), a touch answered STALE_DELIVERY (lease
 * lost: the job is someone else's, nothing is reported), the
 * connection lost past the broker's disconnect grace (see below),
 * --timeout (a failed attempt), and the end of the shutdown grace
 * (released).
 *
 * Disconnect grace: work names a random session in its Hello. When the
 * connection is lost and the broker has a disconnect grace (its Welcome
 * said how long), the running jobs go on: work reconnects with the same
 * session, and when the Welcome says it was resumed they are still ours
 * (same delivery tokens), touched at once (a lease that ran out meanwhile
 * answers STALE_DELIVERY: stopped) and reported as usual; a job that
 * ended meanwhile is reported then. When the Welcome says not resumed, or
 * the grace is over before work is back, they are stopped as lost. Jobs
 * carried over from the old connection are held by the session's old
 * subscription, so they count against the new one's credit as busy
 * slots.
 *
 * Shutdown (SIGTERM, SIGINT, SIGHUP): pause the subscription, keep touching
 * running jobs for --shutdown-grace while they may finish (and are acked or
 * nacked as usual), then stop what still runs and release it (reason
 * SHUTDOWN, progress kept: no failed attempt), exit 0. A second signal ends
 * the grace at once.
 *
 * If work itself dies (kill -9), a watchdog process per job (it also feeds
 * the payload to stdin) sees its lifeline pipe close and stops the job's
 * process group the same way, so no job outlives its supervisor.
 */
#include "backoff.h"
#include "cli.h"
#include "clock.h"
#include "pqlimits.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum {
    TAIL_MAX = 4096,                         /* stderr bytes kept per job */
    NACK_ERROR_MAX = PQ_NACK_ERROR_MAX - 24, /* the broker keeps 1 KiB */
    PROGRESS_TEXT_MAX = 256,
    CHECKPOINT_MAX = 1024,
    PROGRESS_LINE_MAX = 2048,
    PROGRESS_MIN_GAP_MS = 1000, /* progress forwarded at most this often */
    DEFAULT_SHUTDOWN_GRACE_MS = 30000,
    DEFAULT_KILL_GRACE_MS = 10000,
    DEFAULT_RESULT_MAX = 1024 * 1024, /* the broker's max_result_bytes */
};

/* Why a job's process is being stopped (JOB_RUN: it is not). */
enum job_stop {
    JOB_RUN = 0,
    JOB_CANCELLED, /* CancelRequested: not ours any more */
    JOB_LOST,      /* lease or connection lost: not ours any more */
    JOB_TIMEOUT,   /* --timeout: nack when it is gone */
    JOB_SHUTDOWN,  /* shutdown grace over: release when it is gone */
};

/* A running job of `protoq work`. */
struct job {
    bool used;
    bool held;      /* we hold its delivery (ack/nack/release) */
    bool carried;   /* held by an earlier connection of our session: not
                       counted in the current subscription's credit */
    pid_t pid;      /* the command; also its process group */
    pid_t watchdog; /* feeds stdin, guards against our death */
    int lifeline;   /* write end; closed with a byte when done */
    int err_fd;     /* the command's stderr, non-blocking; -1 */
    int out_fd;     /* the command's stdout, non-blocking; -1 */
    char *out;      /* its first result_max bytes (malloc'ed) */
    size_t out_len;
    bool out_cut; /* it wrote more than that */
    uint64_t message_id;
    uint32_t attempt;
    uint64_t lease_ms;
    int64_t next_touch_ms; /* monotonic */
    int64_t deadline_ms;   /* --timeout; 0: none */
    enum job_stop stop;
    int64_t kill_at_ms; /* SIGKILL due (0: SIGTERM not sent yet) */
    bool exited;
    int status;          /* waitpid status once exited */
    char tail[TAIL_MAX]; /* ring of the last stderr bytes */
    size_t tail_len, tail_pos;
    char progress_path[256];
    off_t progress_off;
    char line[PROGRESS_LINE_MAX]; /* partial progress line */
    size_t line_len;
    bool has_progress, progress_dirty;
    uint32_t percent;
    char text[PROGRESS_TEXT_MAX];
    char checkpoint[CHECKPOINT_MAX];
    int64_t progress_sent_ms;
};

struct work_state {
    struct cli *cli;
    const char *queue;
    struct kvlist *tags;
    char **command;
    struct job *jobs;
    size_t n_jobs;
    uint64_t sub_id;
    uint32_t credit; /* prefetch the broker has now */
    uint64_t timeout_ms, shutdown_grace_ms, kill_grace_ms;
    uint64_t result_max; /* --max-result: stdout bytes kept as the result */
    char dir[64];        /* private dir for progress files */
    bool draining;       /* shutdown: paused, no new jobs */
    int64_t drain_end_ms;
    char session[64];   /* our session id (protoq_session_id_new) */
    int64_t gap_end_ms; /* disconnected: the broker's grace ends (0 when
                           connected, or nothing is kept) */
};

static volatile sig_atomic_t work_signals;

static void
on_stop_signal(int sig)
{
    (void)sig;
    work_signals++;
}

static void
on_child_signal(int sig)
{
    (void)sig; /* only interrupts poll() */
}

static int64_t
mono_ms(void)
{
    return (int64_t)clock_mono_ms();
}

static void say(const struct work_state *ws, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* A line on stderr: "protoq: work QUEUE: ...". */
static void
say(const struct work_state *ws, const char *fmt, ...)
{
    va_list ap;

    fprintf(stderr, "protoq: %s: ", ws->cli->cmd);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
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

/* ---- slots and credit ---- */

static size_t
count_jobs(const struct work_state *ws, bool held_only)
{
    size_t n = 0;

    for (size_t i = 0; i < ws->n_jobs; i++) {
        if (ws->jobs[i].used &&
            (!held_only || (ws->jobs[i].held && !ws->jobs[i].carried))) {
            n++;
        }
    }
    return n;
}

/* Keep the subscription's credit at the slots that can take a job: the
 * free ones plus the ones whose delivery we still hold (the broker counts
 * those against the credit already). 0 while draining. */
static int
sync_credit(struct work_state *ws)
{
    size_t orphans = count_jobs(ws, false) - count_jobs(ws, true);
    uint32_t want = ws->draining ? 0 : (uint32_t)(ws->n_jobs - orphans);
    int rc;

    if (ws->sub_id == 0 || want == ws->credit) {
        return PQ_OK;
    }
    rc = protoq_flow(ws->cli->c, ws->sub_id, want);
    if (rc == PQ_OK) {
        ws->credit = want;
    }
    return rc;
}

/* ---- starting a job ---- */

static void
set_progress_env(const struct protoq_delivery *d)
{
    char val[32];

    if (!d->has_progress) {
        return;
    }
    snprintf(val, sizeof(val), "%u", d->progress.percent);
    setenv("PROTOQ_PROGRESS_PERCENT", val, 1);
    setenv("PROTOQ_PROGRESS_TEXT", d->progress.text, 1);
    setenv("PROTOQ_CHECKPOINT", d->progress.checkpoint, 1);
}

/* In the command's child: environment, process group, fds, exec. */
static void
exec_command(struct work_state *ws, struct job *j,
             const struct protoq_delivery *d, int in_fd, int out_fd, int err_fd)
{
    char name[256], val[32];

    setpgid(0, 0);
    dup2(in_fd, STDIN_FILENO);
    dup2(out_fd, STDOUT_FILENO);
    dup2(err_fd, STDERR_FILENO);
    /* Every other descriptor of ours is close-on-exec. */
    snprintf(val, sizeof(val), "%" PRIu64, d->message_id);
    setenv("PROTOQ_MESSAGE_ID", val, 1);
    snprintf(val, sizeof(val), "%u", d->attempt);
    setenv("PROTOQ_ATTEMPT", val, 1);
    setenv("PROTOQ_QUEUE", d->queue, 1);
    setenv("PROTOQ_PROGRESS", j->progress_path, 1);
    set_progress_env(d);
    for (size_t i = 0; i < d->n_headers; i++) {
        header_env_name(name, sizeof(name), d->headers[i].key);
        setenv(name, d->headers[i].value, 1);
    }
    signal(SIGPIPE, SIG_DFL);
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    signal(SIGHUP, SIG_DFL);
    signal(SIGCHLD, SIG_DFL);
    execvp(ws->command[0], ws->command);
    fprintf(stderr, "protoq: work: %s: %s\n", ws->command[0], strerror(errno));
    _exit(127);
}

/* Stop process group pgid: SIGTERM, then SIGKILL after grace_ms. */
static void
stop_group(pid_t pgid, uint64_t grace_ms)
{
    int64_t until = mono_ms() + (int64_t)grace_ms;

    if (kill(-pgid, SIGTERM) != 0) {
        return;
    }
    while (mono_ms() < until && kill(-pgid, 0) == 0) {
        usleep(20000);
    }
    kill(-pgid, SIGKILL);
}

/* In the watchdog child: write the payload to the command's stdin, then
 * wait on the lifeline. A byte on it: work finished with the job, exit.
 * EOF: work died; stop the job's process group. */
static void
run_watchdog(const struct protoq_delivery *d, pid_t pgid, int in_w, int life_r,
             uint64_t kill_grace_ms)
{
    const char *p = d->payload;
    size_t left = d->len;
    char b;
    ssize_t n;
    int in = fcntl(in_w, F_DUPFD, 100);
    int life = fcntl(life_r, F_DUPFD, 100);

    /* Keep only these two: a watchdog must not hold another job's
     * lifeline open, or that job's watchdog would never see EOF. */
    dup2(in, 3);
    dup2(life, 4);
    close_range(5, ~0U, 0);
    signal(SIGINT, SIG_IGN);
    signal(SIGTERM, SIG_IGN);
    signal(SIGHUP, SIG_IGN);
    signal(SIGPIPE, SIG_IGN);
    while (left > 0) {
        n = write(3, p, left);
        if (n < 0 && errno == EINTR) {
            continue;
        }
        if (n <= 0) {
            break;
        }
        p += n;
        left -= (size_t)n;
    }
    close(3);
    do {
        n = read(4, &b, 1);
    } while (n < 0 && errno == EINTR);
    if (n <= 0) {
        stop_group(pgid, kill_grace_ms);
    }
    _exit(0);
}

/* Start d in slot j. Returns 0, or -1 with errno set (nothing started). */
static int
spawn_job(struct work_state *ws, struct job *j, const struct protoq_delivery *d)
{
    int in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1};
    int life[2] = {-1, -1};
    int fd, saved;
    pid_t pid;

    snprintf(j->progress_path, sizeof(j->progress_path), "%s/job-%zu", ws->dir,
             (size_t)(j - ws->jobs));
    fd = open(j->progress_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0 || close(fd) != 0 || pipe2(in, O_CLOEXEC) != 0 ||
        pipe2(out, O_CLOEXEC) != 0 || pipe2(err, O_CLOEXEC) != 0 ||
        pipe2(life, O_CLOEXEC) != 0) {
        goto fail;
    }
    fflush(NULL);
    pid = fork();
    if (pid < 0) {
        goto fail;
    }
    if (pid == 0) {
        exec_command(ws, j, d, in[0], out[1], err[1]);
    }
    setpgid(pid, pid); /* also in the child: whoever runs first */
    j->pid = pid;
    j->watchdog = fork();
    if (j->watchdog == 0) {
        run_watchdog(d, pid, in[1], life[0], ws->kill_grace_ms);
    }
    if (j->watchdog < 0) {
        /* No watchdog: the job could outlive us. Do not run it. */
        saved = errno;
        kill(-pid, SIGKILL);
        waitpid(pid, NULL, 0);
        errno = saved;
        goto fail;
    }
    close(in[0]);
    close(in[1]);
    close(out[1]);
    close(err[1]);
    close(life[0]);
    fcntl(out[0], F_SETFL, O_NONBLOCK);
    fcntl(err[0], F_SETFL, O_NONBLOCK);
    j->out_fd = out[0];
    j->err_fd = err[0];
    j->lifeline = life[1];
    return 0;
fail:
    saved = errno;
    for (int i = 0; i < 2; i++) {
        if (in[i] >= 0) {
            close(in[i]);
        }
        if (out[i] >= 0) {
            close(out[i]);
        }
        if (err[i] >= 0) {
            close(err[i]);
        }
        if (life[i] >= 0) {
            close(life[i]);
        }
    }
    unlink(j->progress_path);
    errno = saved;
    return -1;
}

static void
work_deliver(void *arg, protoq_client *c, const struct protoq_delivery *d)
{
    struct work_state *ws = arg;
    struct job *j = NULL;

    for (size_t i = 0; i < ws->n_jobs && j == NULL; i++) {
        if (!ws->jobs[i].used) {
            j = &ws->jobs[i];
        }
    }
    if (j == NULL || ws->draining) {
        /* Only in the race before our Flow reached the broker: give it
         * back (not a failed attempt). With no free slot, one of the jobs
         * we think we hold is not ours any more (its lease ran out while
         * we were stopped, say): touch them all now to find it. */
        for (size_t i = 0; i < ws->n_jobs && j == NULL; i++) {
            ws->jobs[i].next_touch_ms = 0;
        }
        protoq_release(c, d->message_id, d->attempt,
                       ws->draining ? PROTOQ_RELEASE_SHUTDOWN
                                    : PROTOQ_RELEASE_UNSPECIFIED,
                       NULL, false);
        return;
    }
    memset(j, 0, sizeof(*j));
    j->err_fd = j->out_fd = j->lifeline = -1;
    if (spawn_job(ws, j, d) != 0) {
        say(ws, "cannot start %s: %s", ws->command[0], strerror(errno));
        protoq_nack(c, d->message_id, d->attempt, 0, false,
                    "protoq work: cannot start the command");
        return;
    }
    j->used = j->held = true;
    j->message_id = d->message_id;
    j->attempt = d->attempt;
    j->lease_ms = d->lease_ms ? d->lease_ms : 30000;
    j->next_touch_ms = mono_ms() + (int64_t)j->lease_ms / 3;
    if (ws->timeout_ms > 0) {
        j->deadline_ms = mono_ms() + (int64_t)ws->timeout_ms;
    }
    if (d->has_progress) {
        /* Released with progress: keep it if this attempt reports none. */
        j->has_progress = true;
        j->percent = d->progress.percent;
        snprintf(j->text, sizeof(j->text), "%s", d->progress.text);
        snprintf(j->checkpoint, sizeof(j->checkpoint), "%s",
                 d->progress.checkpoint);
    }
}

static struct job *
find_job(struct work_state *ws, uint64_t message_id, uint32_t attempt)
{
    for (size_t i = 0; i < ws->n_jobs; i++) {
        struct job *j = &ws->jobs[i];

        if (j->used && j->held && j->message_id == message_id &&
            (attempt == 0 || j->attempt == attempt)) {
            return j;
        }
    }
    return NULL;
}

/* Begin stopping j for reason why; it is reported when it has exited. */
static void
begin_stop(struct work_state *ws, struct job *j, enum job_stop why)
{
    if (j->stop != JOB_RUN) {
        return;
    }
    j->stop = why;
    if (why == JOB_LOST) {
        j->held = false; /* the broker gave it away: nothing to report */
    }
    if (!j->exited) {
        kill(-j->pid, SIGTERM);
    }
    j->kill_at_ms = mono_ms() + (int64_t)ws->kill_grace_ms;
}

static void
work_cancel(void *arg, protoq_client *c, const char *queue, uint64_t message_id,
            uint32_t attempt)
{
    struct work_state *ws = arg;
    struct job *j = find_job(ws, message_id, attempt);

    (void)c;
    (void)queue;
    if (j != NULL) {
        say(ws, "job %" PRIu64 " cancelled: stopping it", message_id);
        begin_stop(ws, j, JOB_CANCELLED);
    }
}

/* ---- reading from jobs ---- */

static void
tail_add(struct job *j, const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        j->tail[j->tail_pos] = p[i];
        j->tail_pos = (j->tail_pos + 1) % TAIL_MAX;
        if (j->tail_len < TAIL_MAX) {
            j->tail_len++;
        }
    }
}

/* The last max bytes of the stderr tail into buf (NUL-terminated). */
static void
tail_copy(const struct job *j, char *buf, size_t max)
{
    size_t n = j->tail_len < max ? j->tail_len : max;
    size_t start = (j->tail_pos + TAIL_MAX - n) % TAIL_MAX;

    for (size_t i = 0; i < n; i++) {
        char ch = j->tail[(start + i) % TAIL_MAX];

        buf[i] = ch == '\0' ? ' ' : ch;
    }
    buf[n] = '\0';
}

/* Keep what fits of the job's stdout as its result. */
static void
out_add(struct work_state *ws, struct job *j, const char *p, size_t n)
{
    size_t room = ws->result_max - j->out_len;

    if (n > room) {
        j->out_cut = true;
        n = room;
    }
    if (n == 0) {
        return;
    }
    if (j->out == NULL && (j->out = malloc(ws->result_max)) == NULL) {
        j->out_cut = true;
        return;
    }
    memcpy(j->out + j->out_len, p, n);
    j->out_len += n;
}

/* Read what is there on *fd (non-blocking) into keep(), and pass it
 * through to `to`; closes *fd at EOF. */
static void
drain_fd(struct work_state *ws, struct job *j, int *fd, FILE *to,
         void (*keep)(struct work_state *, struct job *, const char *, size_t))
{
    char buf[4096];
    ssize_t n;

    while (*fd >= 0) {
        n = read(*fd, buf, sizeof(buf));
        if (n > 0) {
            keep(ws, j, buf, (size_t)n);
            /* At once, also into a file or a pipe: whoever reads our
             * output follows the job while it runs. */
            fwrite(buf, 1, (size_t)n, to);
            fflush(to);
            continue;
        }
        if (n < 0 && (errno == EINTR)) {
            continue;
        }
        if (n == 0) {
            close(*fd);
            *fd = -1;
        }
        break;
    }
}

static void
keep_tail(struct work_state *ws, struct job *j, const char *p, size_t n)
{
    (void)ws;
    tail_add(j, p, n);
}

/* Pass the job's stderr and stdout through to ours, keeping the tail of
 * one (the error text) and the head of the other (the result). */
static void
drain_output(struct work_state *ws, struct job *j)
{
    drain_fd(ws, j, &j->err_fd, stderr, keep_tail);
    drain_fd(ws, j, &j->out_fd, stdout, out_add);
}

/* One line written to $PROTOQ_PROGRESS: "progress PERCENT [TEXT]" or
 * "checkpoint URI". Anything else is ignored (and said once). */
static void
progress_line(struct work_state *ws, struct job *j, char *line)
{
    char *end;
    unsigned long v;

    if (strncmp(line, "progress ", 9) == 0) {
        v = strtoul(line + 9, &end, 10);
        if (end == line + 9 || v > 100 || (*end != '\0' && *end != ' ')) {
            say(ws, "job %" PRIu64 ": bad progress line: %.80s", j->message_id,
                line);
            return;
        }
        j->percent = (uint32_t)v;
        while (*end == ' ') {
            end++;
        }
        snprintf(j->text, sizeof(j->text), "%s", end);
    } else if (strncmp(line, "checkpoint ", 11) == 0) {
        snprintf(j->checkpoint, sizeof(j->checkpoint), "%s", line + 11);
    } else if (line[0] != '\0') {
        say(ws, "job %" PRIu64 ": unknown progress line: %.80s", j->message_id,
            line);
        return;
    } else {
        return;
    }
    j->has_progress = j->progress_dirty = true;
}

/* Read what the job appended to its progress file since last time. */
static void
read_progress(struct work_state *ws, struct job *j)
{
    char buf[4096];
    ssize_t n;
    int fd = open(j->progress_path, O_RDONLY | O_CLOEXEC);

    if (fd < 0) {
        return;
    }
    while ((n = pread(fd, buf, sizeof(buf), j->progress_off)) > 0) {
        j->progress_off += n;
        for (ssize_t i = 0; i < n; i++) {
            if (buf[i] == '\n') {
                j->line[j->line_len] = '\0';
                progress_line(ws, j, j->line);
                j->line_len = 0;
            } else if (j->line_len + 1 < sizeof(j->line)) {
                j->line[j->line_len++] = buf[i];
            }
        }
    }
    close(fd);
}

static void
progress_of(const struct job *j, struct protoq_progress *p)
{
    p->percent = j->percent;
    p->text = j->text;
    p->checkpoint = j->checkpoint;
}

/* ---- reporting ---- */

/* j's process has exited: report the outcome and free the slot. */
static int
finish_job(struct work_state *ws, struct job *j)
{
    protoq_client *c = ws->cli->c;
    struct protoq_progress prog;
    char err[NACK_ERROR_MAX + 1], tail[NACK_ERROR_MAX];
    int st = j->status;
    int rc = PQ_OK;
    int n;

    drain_output(ws, j);
    read_progress(ws, j);
    progress_of(j, &prog);
    if (!j->held) {
        /* Lost: the broker no longer expects an answer. */
    } else if (j->stop == JOB_CANCELLED) {
        /* Any answer ends the cancel (the broker replies STALE_DELIVERY
         * and drops the job); until then it counts against our credit. */
        rc = protoq_release(c, j->message_id, j->attempt,
                            PROTOQ_RELEASE_UNSPECIFIED, NULL, false);
    } else if (j->stop == JOB_SHUTDOWN) {
        rc = protoq_release(c, j->message_id, j->attempt,
                            PROTOQ_RELEASE_SHUTDOWN,
                            j->has_progress ? &prog : NULL, true);
        say(ws, "job %" PRIu64 " released (shutdown)", j->message_id);
    } else if (j->stop == JOB_RUN && WIFEXITED(st) && WEXITSTATUS(st) == 0) {
        struct protoq_ack_opts ao = {.result = j->out,
                                     .result_len = j->out_len};

        if (j->out_cut) {
            say(ws,
                "job %" PRIu64 ": its result is cut to the first %" PRIu64
                " bytes of its stdout (--max-result)",
                j->message_id, ws->result_max);
        }
        rc = protoq_ack_ex(c, j->message_id, j->attempt, &ao);
    } else {
        if (j->stop == JOB_TIMEOUT) {
            n = snprintf(err, sizeof(err), "timed out after %" PRIu64 " ms",
                         ws->timeout_ms);
        } else if (WIFEXITED(st)) {
            n = snprintf(err, sizeof(err), "command exited with %d",
                         WEXITSTATUS(st));
        } else {
            n = snprintf(err, sizeof(err), "command killed by signal %d",
                         WTERMSIG(st));
        }
        if (j->tail_len > 0 && n > 0 && (size_t)n + 11 < sizeof(err)) {
            size_t room = sizeof(err) - (size_t)n - 11;

            tail_copy(j, tail, room < sizeof(tail) ? room : sizeof(tail) - 1);
            memcpy(err + n, "; stderr: ", 10);
            memcpy(err + n + 10, tail, strlen(tail) + 1);
        }
        if (j->has_progress) {
            /* Keep the progress for the next attempt, then fail this one. */
            protoq_touch(c, j->message_id, j->attempt, 0, &prog, NULL);
        }
        rc = protoq_nack(c, j->message_id, j->attempt, 0, false, err);
    }
    if (j->err_fd >= 0) {
        close(j->err_fd);
    }
    if (j->out_fd >= 0) {
        close(j->out_fd);
    }
    free(j->out);
    j->out = NULL;
    if (j->lifeline >= 0) {
        /* Tell the watchdog we are done with this job. */
        (void)!write(j->lifeline, "x", 1);
        close(j->lifeline);
    }
    unlink(j->progress_path);
    j->used = false;
    j->held = false;
    if (rc == PQ_EREMOTE) {
        /* E.g. STALE_DELIVERY: the job was given away meanwhile. */
        say(ws, "job %" PRIu64 ": %s (%s)", j->message_id, protoq_errmsg(c),
            protoq_code_name(protoq_last_error_code(c)));
        rc = PQ_OK;
    }
    return rc;
}

/* Every held job is the broker's again (it goes to another worker): stop
 * them all (why: for the log). */
static void
lose_jobs(struct work_state *ws, const char *why)
{
    for (size_t i = 0; i < ws->n_jobs; i++) {
        struct job *j = &ws->jobs[i];

        if (j->used && j->held) {
            say(ws, "job %" PRIu64 ": %s: stopping it", j->message_id, why);
            begin_stop(ws, j, JOB_LOST);
            j->held = false; /* also when it was stopping already */
        }
    }
    ws->gap_end_ms = 0;
}

/* Reap exited children; report finished jobs. */
static int
reap_jobs(struct work_state *ws)
{
    int status;
    pid_t pid;

    while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
        for (size_t i = 0; i < ws->n_jobs; i++) {
            struct job *j = &ws->jobs[i];

            if (j->used && j->pid == pid) {
                j->exited = true;
                j->status = status;
            }
        }
        /* Watchdogs are reaped here too; nothing to do for them. */
    }
    for (size_t i = 0; i < ws->n_jobs; i++) {
        struct job *j = &ws->jobs[i];

        if (!j->used) {
            continue;
        }
        drain_output(ws, j);
        /* Done when the command exited and, if it was being stopped, its
         * whole group is gone (or the kill grace is over). */
        if (j->held && ws->cli->c == NULL) {
            continue; /* reported once the session is back */
        }
        if (j->exited && (j->stop == JOB_RUN || kill(-j->pid, 0) != 0 ||
                          mono_ms() >= j->kill_at_ms)) {
            int rc = finish_job(ws, j);

            if (rc != PQ_OK) {
                return rc;
            }
        }
    }
    return PQ_OK;
}

/* Timeouts, kill graces, progress, and touches. */
static int
tend_jobs(struct work_state *ws)
{
    protoq_client *c = ws->cli->c;
    int64_t now = mono_ms();

    if (c == NULL && ws->gap_end_ms > 0 && now >= ws->gap_end_ms) {
        lose_jobs(ws, "not back within the broker's disconnect grace");
    }
    for (size_t i = 0; i < ws->n_jobs; i++) {
        struct job *j = &ws->jobs[i];
        struct protoq_progress prog;
        bool send_progress;
        uint64_t lease = 0;
        int rc;

        if (!j->used) {
            continue;
        }
        if (j->stop == JOB_RUN && j->deadline_ms > 0 && now >= j->deadline_ms) {
            say(ws, "job %" PRIu64 " timed out: stopping it", j->message_id);
            begin_stop(ws, j, JOB_TIMEOUT);
        }
        if (j->stop != JOB_RUN && now >= j->kill_at_ms) {
            kill(-j->pid, SIGKILL);
        }
        if (!j->held || j->stop == JOB_CANCELLED || c == NULL) {
            continue;
        }
        read_progress(ws, j);
        send_progress = j->progress_dirty &&
                        now - j->progress_sent_ms >= PROGRESS_MIN_GAP_MS;
        if (now < j->next_touch_ms && !send_progress) {
            continue;
        }
        progress_of(j, &prog);
        rc = protoq_touch(c, j->message_id, j->attempt, 0,
                          send_progress ? &prog : NULL, &lease);
        if (rc == PQ_EREMOTE) {
            say(ws, "job %" PRIu64 ": lease lost (%s): stopping it",
                j->message_id, protoq_code_name(protoq_last_error_code(c)));
            begin_stop(ws, j, JOB_LOST);
            continue;
        }
        if (rc != PQ_OK) {
            return rc;
        }
        if (send_progress) {
            j->progress_dirty = false;
            j->progress_sent_ms = now;
        }
        if (lease > 0) {
            j->lease_ms = lease;
        }
        j->next_touch_ms = now + (int64_t)j->lease_ms / 3;
    }
    return PQ_OK;
}

/* ---- connection ---- */

/* The connection is gone. Without a disconnect grace the held jobs are
 * lost at once; with one they run on until the grace ends or the session
 * is back. */
static void
lose_connection(struct work_state *ws)
{
    struct protoq_server_info si;

    protoq_server_info(ws->cli->c, &si);
    if (si.disconnect_grace_ms == 0) {
        lose_jobs(ws, "connection lost");
    } else if (count_jobs(ws, false) > 0) {
        /* Lost a little early: the broker noticed no sooner than us. */
        ws->gap_end_ms = mono_ms() + (int64_t)si.disconnect_grace_ms;
        for (size_t i = 0; i < ws->n_jobs; i++) {
            ws->jobs[i].carried = ws->jobs[i].used && ws->jobs[i].held;
        }
        say(ws,
            "%zu job(s) keep running for the broker's disconnect grace "
            "(%u ms)",
            count_jobs(ws, false), si.disconnect_grace_ms);
    }
    protoq_close(ws->cli->c);
    ws->cli->c = NULL;
    ws->sub_id = 0;
    ws->credit = 0;
}

/* Connected again: the session's held jobs are still ours only if the
 * broker says it resumed it. Touch them at once to learn whether their
 * leases held. */
static void
session_back(struct work_state *ws)
{
    struct protoq_server_info si;
    size_t n = 0;

    protoq_server_info(ws->cli->c, &si);
    if (!si.session_resumed) {
        lose_jobs(ws, "session not resumed by the broker");
        return;
    }
    for (size_t i = 0; i < ws->n_jobs; i++) {
        struct job *j = &ws->jobs[i];

        if (j->used && j->held) {
            j->next_touch_ms = 0;
            n++;
        }
    }
    if (n > 0) {
        say(ws, "session resumed: %zu job(s) kept", n);
    }
}

/* Connect and subscribe with the credit the free slots allow. */
static int
connect_and_subscribe(struct work_state *ws)
{
    struct cli *cli = ws->cli;
    size_t orphans = count_jobs(ws, false);
    uint32_t credit = (uint32_t)(ws->n_jobs - orphans);
    int rc;

    cli->session_id = ws->session;
    rc = cli_connect(cli);
    if (rc != EXIT_OK) {
        return PQ_ECLOSED;
    }
    protoq_set_cancel_cb(cli->c, work_cancel, ws);
    session_back(ws);
    /* Subscribe paused when every slot is busy, then let sync_credit
     * open it; prefetch 0 would mean 1. */
    rc = protoq_subscribe(cli->c, ws->queue, credit ? credit : 1, ws->tags->kv,
                          ws->tags->n, work_deliver, ws, &ws->sub_id);
    if (rc != PQ_OK) {
        fail_pq(cli, rc);
        return rc;
    }
    ws->credit = credit ? credit : 1;
    if (credit == 0) {
        rc = protoq_flow(cli->c, ws->sub_id, 0);
        ws->credit = 0;
    }
    return rc;
}

/* Sleep up to ms, returning early on a stop signal; reaps meanwhile. */
static void
nap(struct work_state *ws, int64_t ms)
{
    int64_t until = mono_ms() + ms;
    int before = work_signals;

    while (mono_ms() < until && work_signals == before) {
        poll(NULL, 0, 50);
        reap_jobs(ws);
        tend_jobs(ws);
    }
}

/* ---- shutdown ---- */

static void
start_drain(struct work_state *ws)
{
    ws->draining = true;
    ws->drain_end_ms = mono_ms() + (int64_t)ws->shutdown_grace_ms;
    if (count_jobs(ws, false) > 0) {
        say(ws,
            "stopping: %zu job(s) running, waiting up to %" PRIu64
            " ms for them",
            count_jobs(ws, false), ws->shutdown_grace_ms);
    }
}

/* The grace is over (or a second signal): stop and release what runs. */
static void
end_drain(struct work_state *ws)
{
    for (size_t i = 0; i < ws->n_jobs; i++) {
        struct job *j = &ws->jobs[i];

        if (j->used && j->stop == JOB_RUN) {
            begin_stop(ws, j, JOB_SHUTDOWN);
        }
    }
    ws->drain_end_ms = 0;
}

/* ---- the command ---- */

static int
parse_work_args(struct work_state *ws, struct kvlist *tags, int argc,
                char **argv)
{
    enum { O_CONC = 256, O_TAG, O_TIMEOUT, O_SHUTDOWN, O_KILL, O_RESULT };
    static const struct option opts[] = {
        {"concurrency", required_argument, NULL, O_CONC},
        {"tag", required_argument, NULL, O_TAG},
        {"timeout", required_argument, NULL, O_TIMEOUT},
        {"shutdown-grace", required_argument, NULL, O_SHUTDOWN},
        {"kill-grace", required_argument, NULL, O_KILL},
        {"max-result", required_argument, NULL, O_RESULT},
        {NULL, 0, NULL, 0},
    };
    uint64_t conc = 1;
    int ch;

    ws->shutdown_grace_ms = DEFAULT_SHUTDOWN_GRACE_MS;
    ws->kill_grace_ms = DEFAULT_KILL_GRACE_MS;
    ws->result_max = DEFAULT_RESULT_MAX;
    while ((ch = cli_getopt(argc, argv, opts)) != -1) {
        switch (ch) {
        case O_CONC:
            if (units_parse_u64(optarg, &conc) != PQ_OK || conc == 0 ||
                conc > 4096) {
                return usage_err("--concurrency: want 1-4096, not %s", optarg);
            }
            break;
        case O_TAG:
            if (!kv_add(tags, optarg)) {
                return usage_err("--tag: want K=V (at most %d)", MAX_KV);
            }
            break;
        case O_TIMEOUT:
        case O_SHUTDOWN:
        case O_KILL: {
            uint64_t *dst = ch == O_TIMEOUT    ? &ws->timeout_ms
                            : ch == O_SHUTDOWN ? &ws->shutdown_grace_ms
                                               : &ws->kill_grace_ms;

            if (units_parse_duration_ms(optarg, dst) != PQ_OK) {
                return usage_err("--%s: not a duration: %s",
                                 opts[ch - O_CONC].name, optarg);
            }
            break;
        }
        case O_RESULT:
            if (units_parse_bytes(optarg, &ws->result_max) != PQ_OK ||
                ws->result_max > 64 * 1024 * 1024) {
                return usage_err("--max-result: want 0-64m bytes, not %s",
                                 optarg);
            }
            break;
        default:
            return EXIT_USAGE; /* cli_getopt said why */
        }
    }
    if (optind >= argc) {
        return usage_err("work: want a QUEUE");
    }
    ws->queue = argv[optind++];
    /* getopt stopped at "--" and moved QUEUE after it: the rest is the
     * command, options and all. */
    if (optind >= argc) {
        return usage_err("work: want -- COMMAND [ARG]...");
    }
    ws->command = argv + optind;
    ws->n_jobs = (size_t)conc;
    return EXIT_OK;
}

static void
install_signals(void)
{
    struct sigaction sa;

    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_stop_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    sa.sa_handler = on_child_signal; /* interrupts poll() on child exit */
    sigaction(SIGCHLD, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
}

/* One pass of the main loop while connected. */
static int
work_pass(struct work_state *ws)
{
    int rc = protoq_poll(ws->cli->c, count_jobs(ws, false) > 0 ? 100 : 1000);

    if (rc >= 0) {
        rc = reap_jobs(ws);
    }
    if (rc == PQ_OK) {
        rc = tend_jobs(ws);
    }
    if (rc == PQ_OK) {
        rc = sync_credit(ws);
    }
    if (rc == PQ_OK) {
        rc = protoq_flush(ws->cli->c);
    }
    return rc;
}

int
cmd_work(struct cli *cli, int argc, char **argv)
{
    struct work_state ws;
    struct kvlist tags;
    struct backoff backoff;
    int handled = 0;
    int rc, ret;

    memset(&ws, 0, sizeof(ws));
    tags.n = tags.used = 0;
    ws.cli = cli;
    ws.tags = &tags;
    ret = parse_work_args(&ws, &tags, argc, argv);
    if (ret != EXIT_OK) {
        return ret;
    }
    snprintf(cli->cmdbuf, sizeof(cli->cmdbuf), "work %s", ws.queue);
    cli->cmd = cli->cmdbuf;
    snprintf(ws.dir, sizeof(ws.dir), "/tmp/protoq-work.XXXXXX");
    if (mkdtemp(ws.dir) == NULL) {
        return fail(cli, "mkdtemp %s: %s", ws.dir, strerror(errno));
    }
    ws.jobs = calloc(ws.n_jobs, sizeof(*ws.jobs));
    if (ws.jobs == NULL) {
        ret = fail(cli, "out of memory");
        goto out;
    }
    install_signals();
    backoff_init(&backoff, 0, 0, (uint64_t)getpid() ^ (uint64_t)mono_ms());
    if (protoq_session_id_new(ws.session, sizeof(ws.session)) != PQ_OK) {
        ret = fail(cli, "no random session id: %s", strerror(errno));
        goto out;
    }
    /* The first connection must work: a typo in -s should not retry. */
    rc = connect_and_subscribe(&ws);
    if (rc != PQ_OK) {
        ret = EXIT_ERR;
        goto out;
    }
    for (;;) {
        if (work_signals > handled) {
            /* The first signal starts the grace; any later one ends it. */
            bool was_draining = ws.draining;

            if (!was_draining) {
                start_drain(&ws);
            }
            if (was_draining || work_signals - handled > 1) {
                end_drain(&ws);
            }
            handled = work_signals;
        }
        if (ws.draining && ws.drain_end_ms > 0 &&
            mono_ms() >= ws.drain_end_ms) {
            end_drain(&ws);
        }
        if (ws.draining && count_jobs(&ws, false) == 0) {
            break;
        }
        if (cli->c == NULL) {
            if (ws.draining) {
                /* Nothing to release to; wait for the jobs to stop. */
                nap(&ws, 100);
                continue;
            }
            nap(&ws, (int)backoff_next(&backoff));
            if (work_signals > handled) {
                continue;
            }
            if (connect_and_subscribe(&ws) == PQ_OK) {
                say(&ws, "connected again to %s", cli->server);
                ws.gap_end_ms = 0; /* (a failed subscribe keeps the
                                      earlier, safe end) */
                backoff_reset(&backoff);
            } else {
                protoq_close(cli->c);
                cli->c = NULL;
            }
            continue;
        }
        rc = work_pass(&ws);
        if (rc != PQ_OK) {
            say(&ws, "connection lost: %s; reconnecting",
                protoq_errmsg(cli->c));
            lose_connection(&ws);
        }
    }
    if (cli->c != NULL) {
        rc = protoq_flush(cli->c);
        if (rc != PQ_OK) {
            ret = fail_pq(cli, rc);
        }
    }
out:
    free(ws.jobs);
    rmdir(ws.dir);
    return ret;
}
