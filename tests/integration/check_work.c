/*
 * check_work.c: `protoq work` as a supervisor, and `protoq consume`
 * stopping cleanly, against a real protoqd on loopback.
 *
 * Each test starts a broker, writes small job scripts into the test's temp
 * dir, runs `protoq work` as a child (its pid kept, so the test can signal
 * it) and checks the broker's view with `protoq queue stat` / `consume`.
 * "No failed attempt" is checked the decisive way: the queue has
 * --max-attempts 1 and a dead-letter queue, so one failure would
 * dead-letter the job. Every wait is bounded.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "testutil.h"

static struct srv g_srv;
static char g_listen[64];
static const char *g_args[] = {"--listen", g_listen, NULL};

static void
sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};

    nanosleep(&ts, NULL);
}

static const char *
protoq_bin(void)
{
    const char *bin = getenv("PROTOQ");

    return bin != NULL && bin[0] != '\0' ? bin : "build/protoq";
}

/* A port that was free a moment ago: the broker keeps it across restarts,
 * so a worker can reconnect to the same address. */
static uint16_t
free_port(void)
{
    struct sockaddr_in a;
    socklen_t len = sizeof(a);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    uint16_t port = 0;

    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd >= 0 && bind(fd, (struct sockaddr *)&a, sizeof(a)) == 0 &&
        getsockname(fd, (struct sockaddr *)&a, &len) == 0) {
        port = ntohs(a.sin_port);
    }
    if (fd >= 0) {
        close(fd);
    }
    return port;
}

static void
setup(void)
{
    snprintf(g_listen, sizeof(g_listen), "127.0.0.1:%u", free_port());
    ck_assert_msg(srv_start(&g_srv, g_args) == 0, "protoqd did not start");
}

static void
teardown(void)
{
    srv_cleanup(&g_srv);
}

/* Run "protoq ARGS" through sh (PROTOQ_SERVER set), stdout into out (may
 * be NULL), bounded by 20 s. Returns the exit status, or -1. */
__attribute__((format(printf, 3, 4))) static int
cli(char *out, size_t cap, const char *fmt, ...)
{
    char args[1024], cmd[2048], path[320];
    va_list ap;
    int status;
    FILE *f;
    size_t n;

    va_start(ap, fmt);
    vsnprintf(args, sizeof(args), fmt, ap);
    va_end(ap);
    snprintf(path, sizeof(path), "%s/cli.out", g_srv.dir);
    snprintf(cmd, sizeof(cmd),
             "PROTOQ_SERVER=%s timeout -s KILL 20 %s %s > %s 2>>%s/cli.err",
             g_srv.addr, protoq_bin(), args, path, g_srv.dir);
    status = system(cmd);
    if (out != NULL) {
        out[0] = '\0';
        f = fopen(path, "r");
        if (f != NULL) {
            n = fread(out, 1, cap - 1, f);
            out[n] = '\0';
            fclose(f);
        }
    }
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

/* A counter or gauge from `protoq queue stat Q`, or -1. */
static long
stat_of(const char *queue, const char *field)
{
    char out[4096], key[64];
    const char *p;

    if (cli(out, sizeof(out), "queue stat %s", queue) != 0) {
        return -1;
    }
    snprintf(key, sizeof(key), "\n%s: ", field);
    p = strstr(out, key);
    if (p == NULL && strncmp(out, key + 1, strlen(key) - 1) == 0) {
        p = out - 1;
    }
    return p != NULL ? strtol(p + strlen(key), NULL, 10) : -1;
}

/* Wait up to ms for stat_of(queue, field) == want. */
static bool
wait_stat(const char *queue, const char *field, long want, int ms)
{
    int64_t until = now_ms_mono() + ms;

    do {
        if (stat_of(queue, field) == want) {
            return true;
        }
        sleep_ms(50);
    } while (now_ms_mono() < until);
    return false;
}

/* Write an executable script DIR/name with body (after a #!/bin/sh). */
static void
script(const char *name, const char *body)
{
    char path[320];
    FILE *f;

    snprintf(path, sizeof(path), "%s/%s", g_srv.dir, name);
    f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fprintf(f, "#!/bin/sh\nD=%s\n%s\n", g_srv.dir, body);
    ck_assert_int_eq(fclose(f), 0);
    ck_assert_int_eq(chmod(path, 0755), 0);
}

/* Start `protoq work ARGS` (stderr to DIR/work.err); returns its pid. */
__attribute__((format(printf, 1, 2))) static pid_t
start_work(const char *fmt, ...)
{
    char args[1024], cmd[1600], errpath[320];
    va_list ap;
    pid_t pid;

    va_start(ap, fmt);
    vsnprintf(args, sizeof(args), fmt, ap);
    va_end(ap);
    snprintf(errpath, sizeof(errpath), "%s/work.err", g_srv.dir);
    snprintf(cmd, sizeof(cmd), "cd %s && exec %s work %s", g_srv.dir,
             protoq_bin(), args);
    pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        int fd = open(errpath, O_WRONLY | O_CREAT | O_APPEND, 0644);

        if (fd >= 0) {
            dup2(fd, STDERR_FILENO);
        }
        setenv("PROTOQ_SERVER", g_srv.addr, 1);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    return pid;
}

/* Wait up to ms for pid (our child) to exit; its status, or -1. */
static int
wait_exit(pid_t pid, int ms)
{
    int64_t until = now_ms_mono() + ms;
    int status;

    do {
        if (waitpid(pid, &status, WNOHANG) == pid) {
            return WIFEXITED(status) ? WEXITSTATUS(status)
                                     : 128 + WTERMSIG(status);
        }
        sleep_ms(20);
    } while (now_ms_mono() < until);
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    return -1;
}

/* True when pid no longer runs (gone, or a zombie nobody reaped yet). */
static bool
pid_gone(long pid)
{
    char path[64], buf[512];
    const char *p;
    FILE *f;
    size_t n;

    snprintf(path, sizeof(path), "/proc/%ld/stat", pid);
    f = fopen(path, "r");
    if (f == NULL) {
        return true;
    }
    n = fread(buf, 1, sizeof(buf) - 1, f);
    fclose(f);
    buf[n] = '\0';
    p = strrchr(buf, ')');
    return p != NULL && (p[2] == 'Z' || p[2] == 'X');
}

static bool
wait_gone(long pid, int ms)
{
    int64_t until = now_ms_mono() + ms;

    do {
        if (pid_gone(pid)) {
            return true;
        }
        sleep_ms(20);
    } while (now_ms_mono() < until);
    return false;
}

/* Contents of DIR/name (NUL-terminated, "" when missing); false when
 * the file does not exist. */
static bool
read_dir_file(const char *name, char *buf, size_t cap)
{
    char path[320];
    FILE *f;
    size_t n = 0;

    snprintf(path, sizeof(path), "%s/%s", g_srv.dir, name);
    f = fopen(path, "r");
    if (f != NULL) {
        n = fread(buf, 1, cap - 1, f);
        fclose(f);
    }
    buf[n] = '\0';
    return f != NULL;
}

/* Wait up to ms for DIR/name to exist and contain needle. */
static bool
wait_file_has(const char *name, const char *needle, int ms)
{
    char buf[8192];
    int64_t until = now_ms_mono() + ms;

    do {
        if (read_dir_file(name, buf, sizeof(buf)) &&
            strstr(buf, needle) != NULL) {
            return true;
        }
        sleep_ms(20);
    } while (now_ms_mono() < until);
    return false;
}

/* A queue where one failed attempt dead-letters the job into dlq. */
static void
make_strict_queue(void)
{
    ck_assert_int_eq(cli(NULL, 0, "queue create dlq"), 0);
    ck_assert_int_eq(cli(NULL, 0,
                         "queue create jobs --max-attempts 1 "
                         "--dead-letter dlq --backoff 0"),
                     0);
}

/* ---- pre-emption ---- */

START_TEST(test_sigterm_releases_without_failure)
{
    char runs[256];
    pid_t w;

    make_strict_queue();
    script("job.sh", "echo \"run $PROTOQ_ATTEMPT\" >> $D/runs\n"
                     "exec sleep 30");
    ck_assert_int_eq(cli(NULL, 0, "pub jobs train"), 0);
    w = start_work("jobs --shutdown-grace 200ms --kill-grace 1s -- ./job.sh");
    ck_assert(wait_file_has("runs", "run 1", 5000));
    kill(w, SIGTERM);
    ck_assert_int_eq(wait_exit(w, 5000), 0);
    /* Released: back in the queue, not dead-lettered. */
    ck_assert(wait_stat("jobs", "ready", 1, 3000));
    ck_assert_int_eq(stat_of("dlq", "ready"), 0);
    ck_assert_int_eq(stat_of("jobs", "nacked"), 0);
    /* The next worker runs it, still not dead. */
    w = start_work("jobs --shutdown-grace 200ms --kill-grace 1s -- ./job.sh");
    ck_assert(wait_file_has("runs", "run 2", 5000));
    kill(w, SIGHUP); /* SIGHUP is a shutdown too */
    ck_assert_int_eq(wait_exit(w, 5000), 0);
    read_dir_file("runs", runs, sizeof(runs));
    ck_assert_str_eq(runs, "run 1\nrun 2\n");
    ck_assert_int_eq(stat_of("dlq", "ready"), 0);
}
END_TEST

START_TEST(test_job_finishing_in_grace_is_acked)
{
    pid_t w;

    make_strict_queue();
    script("job.sh", "touch $D/started; sleep 0.5; echo done > $D/finished");
    ck_assert_int_eq(cli(NULL, 0, "pub jobs x"), 0);
    ck_assert_int_eq(cli(NULL, 0, "pub jobs y"), 0);
    w = start_work("jobs --shutdown-grace 5s -- ./job.sh");
    ck_assert(wait_file_has("started", "", 5000));
    kill(w, SIGTERM);
    ck_assert_int_eq(wait_exit(w, 8000), 0);
    ck_assert(wait_file_has("finished", "done", 100));
    /* The running one finished in the grace and was acked; the other was
     * never taken (the subscription was paused first). */
    ck_assert(wait_stat("jobs", "acked", 1, 3000));
    ck_assert_int_eq(stat_of("jobs", "ready"), 1);
    ck_assert_int_eq(stat_of("dlq", "ready"), 0);
}
END_TEST

/* ---- cancel and lost leases ---- */

START_TEST(test_cancel_stops_group_and_no_release_loop)
{
    char id[64], pids[64];
    long sh_pid = 0, child_pid = 0;
    pid_t w;

    make_strict_queue();
    /* Ignores SIGTERM (so does its child): only SIGKILL stops it. */
    script("stubborn.sh", "trap '' TERM\nsleep 100 &\n"
                          "echo $$ $! > $D/pids\nwait");
    ck_assert_int_eq(cli(id, sizeof(id), "pub jobs first"), 0);
    ck_assert_int_eq(cli(NULL, 0, "pub jobs second"), 0);
    w = start_work("jobs --kill-grace 1s -- ./stubborn.sh");
    ck_assert(wait_file_has("pids", " ", 5000));
    read_dir_file("pids", pids, sizeof(pids));
    ck_assert_int_eq(sscanf(pids, "%ld %ld", &sh_pid, &child_pid), 2);
    id[strcspn(id, "\n")] = '\0';
    ck_assert_int_eq(cli(NULL, 0, "cancel jobs %s", id), 0);
    /* SIGTERM is ignored; SIGKILL after the 1 s kill grace. */
    ck_assert(wait_gone(sh_pid, 3000));
    ck_assert(wait_gone(child_pid, 3000));
    /* Then the second job runs; nothing loops meanwhile. */
    ck_assert(wait_stat("jobs", "inflight", 1, 3000));
    ck_assert(wait_stat("jobs", "ready", 0, 3000));
    sleep_ms(500);
    ck_assert_int_le(stat_of("jobs", "redelivered"), 1);
    ck_assert_int_eq(stat_of("dlq", "ready"), 0);
    kill(w, SIGINT);
    sleep_ms(200);   /* (two pending SIGINTs would merge into one) */
    kill(w, SIGINT); /* a second signal ends the grace at once */
    ck_assert_int_eq(wait_exit(w, 5000), 0);
}
END_TEST

START_TEST(test_sigstop_sigcont_no_release_loop)
{
    char runs[512];
    pid_t w;
    long redelivered;
    unsigned attempt = 0;

    ck_assert_int_eq(cli(NULL, 0,
                         "queue create jobs --ack-timeout 300ms "
                         "--backoff 0 --max-attempts 100"),
                     0);
    script("job.sh", "echo \"run $PROTOQ_ATTEMPT $$\" >> $D/runs\n"
                     "exec sleep 3");
    ck_assert_int_eq(cli(NULL, 0, "pub jobs x"), 0);
    w = start_work("jobs --kill-grace 500ms -- ./job.sh");
    ck_assert(wait_file_has("runs", "run 1", 5000));
    kill(w, SIGSTOP);
    sleep_ms(1000); /* the lease (300 ms) runs out meanwhile */
    kill(w, SIGCONT);
    sleep_ms(2000);
    redelivered = stat_of("jobs", "redelivered");
    /* While we were stopped the job came back each time its 300 ms lease
     * ran out (about 3 times); then it runs again here. A handful of
     * attempts, not thousands (the old release loop: ~20k a second). */
    ck_assert_int_ge(redelivered, 1);
    ck_assert_int_le(redelivered, 10);
    read_dir_file("runs", runs, sizeof(runs));
    ck_assert_msg(sscanf(runs, "run 1 %*d\nrun %u", &attempt) == 1 &&
                      attempt <= 10,
                  "runs: %s", runs);
    kill(w, SIGTERM);
    sleep_ms(200);
    kill(w, SIGTERM);
    ck_assert_int_eq(wait_exit(w, 5000), 0);
}
END_TEST

/* ---- the worker's own death ---- */

START_TEST(test_worker_kill9_stops_job)
{
    char pids[64];
    long sh_pid = 0, child_pid = 0;
    pid_t w;

    make_strict_queue();
    script("job.sh", "sleep 100 &\necho $$ $! > $D/pids\nwait");
    ck_assert_int_eq(cli(NULL, 0, "pub jobs x"), 0);
    w = start_work("jobs --kill-grace 1s -- ./job.sh");
    ck_assert(wait_file_has("pids", " ", 5000));
    read_dir_file("pids", pids, sizeof(pids));
    ck_assert_int_eq(sscanf(pids, "%ld %ld", &sh_pid, &child_pid), 2);
    kill(w, SIGKILL);
    waitpid(w, NULL, 0);
    /* The watchdog stops the whole group. */
    ck_assert(wait_gone(sh_pid, 3000));
    ck_assert(wait_gone(child_pid, 3000));
}
END_TEST

START_TEST(test_reconnect_after_broker_restart)
{
    pid_t w;

    ck_assert_int_eq(cli(NULL, 0, "queue create jobs --backoff 0"), 0);
    script("job.sh", "cat >> $D/done; echo >> $D/done");
    ck_assert_int_eq(cli(NULL, 0, "pub jobs one"), 0);
    w = start_work("jobs -- ./job.sh");
    ck_assert(wait_file_has("done", "one", 5000));
    ck_assert(wait_stat("jobs", "acked", 1, 3000));
    ck_assert_int_eq(srv_restart(&g_srv), 0);
    ck_assert_int_eq(cli(NULL, 0, "pub jobs two"), 0);
    ck_assert_msg(wait_file_has("done", "two", 10000),
                  "the worker did not come back after the restart");
    kill(w, SIGTERM);
    ck_assert_int_eq(wait_exit(w, 5000), 0);
}
END_TEST

/* ---- what a job reports ---- */

START_TEST(test_progress_and_checkpoint_reach_next_attempt)
{
    char runs[512];
    pid_t w;

    make_strict_queue();
    script("job.sh",
           "echo \"attempt=$PROTOQ_ATTEMPT pct=$PROTOQ_PROGRESS_PERCENT "
           "text=$PROTOQ_PROGRESS_TEXT ckpt=$PROTOQ_CHECKPOINT\" >> $D/runs\n"
           "if [ \"$PROTOQ_ATTEMPT\" = 1 ]; then\n"
           "  echo 'progress 40 epoch 4/10' >> $PROTOQ_PROGRESS\n"
           "  $PROTOQ progress --checkpoint s3://b/run-7/step-4000\n"
           "  touch $D/reported\n"
           "  exec sleep 30\n"
           "fi");
    setenv("PROTOQ", protoq_bin(), 1);
    ck_assert_int_eq(cli(NULL, 0, "pub jobs train"), 0);
    w = start_work("jobs --shutdown-grace 100ms --kill-grace 1s -- ./job.sh");
    ck_assert(wait_file_has("reported", "", 5000));
    sleep_ms(300);
    kill(w, SIGTERM);
    ck_assert_int_eq(wait_exit(w, 5000), 0);
    w = start_work("jobs -- ./job.sh");
    ck_assert(wait_file_has("runs", "attempt=2", 5000));
    kill(w, SIGTERM);
    ck_assert_int_eq(wait_exit(w, 5000), 0);
    read_dir_file("runs", runs, sizeof(runs));
    ck_assert_msg(strstr(runs, "attempt=2 pct=40 text=epoch 4/10 "
                               "ckpt=s3://b/run-7/step-4000") != NULL,
                  "runs: %s", runs);
}
END_TEST

START_TEST(test_stderr_tail_in_dead_letter)
{
    char out[8192];
    pid_t w;

    make_strict_queue();
    script("job.sh", "echo 'loading data' >&2\n"
                     "echo 'CUDA error: out of memory' >&2\nexit 3");
    ck_assert_int_eq(cli(NULL, 0, "pub jobs x"), 0);
    w = start_work("jobs -- ./job.sh");
    ck_assert(wait_stat("dlq", "ready", 1, 5000));
    kill(w, SIGTERM);
    ck_assert_int_eq(wait_exit(w, 5000), 0);
    ck_assert_int_eq(cli(out, sizeof(out),
                         "consume dlq --json --count 1 "
                         "--wait 2s"),
                     0);
    ck_assert_msg(strstr(out, "command exited with 3") != NULL, "%s", out);
    ck_assert_msg(strstr(out, "CUDA error: out of memory") != NULL, "%s", out);
}
END_TEST

START_TEST(test_timeout_fails_attempt)
{
    char out[8192], pids[32];
    pid_t w;

    make_strict_queue();
    script("job.sh", "echo $$ > $D/pids\nexec sleep 30");
    ck_assert_int_eq(cli(NULL, 0, "pub jobs x"), 0);
    w = start_work("jobs --timeout 300ms --kill-grace 1s -- ./job.sh");
    ck_assert(wait_stat("dlq", "ready", 1, 5000));
    read_dir_file("pids", pids, sizeof(pids));
    ck_assert(wait_gone(strtol(pids, NULL, 10), 2000));
    kill(w, SIGTERM);
    ck_assert_int_eq(wait_exit(w, 5000), 0);
    ck_assert_int_eq(cli(out, sizeof(out),
                         "consume dlq --json --count 1 "
                         "--wait 2s"),
                     0);
    ck_assert_msg(strstr(out, "timed out after 300 ms") != NULL, "%s", out);
}
END_TEST

START_TEST(test_work_keeps_its_arguments)
{
    char path[64], cmdline[512];
    size_t n;
    FILE *f;
    pid_t w;

    ck_assert_int_eq(cli(NULL, 0, "queue create jobs"), 0);
    w = start_work("jobs --tag gpu=a100 -- /bin/true");
    sleep_ms(500);
    snprintf(path, sizeof(path), "/proc/%d/cmdline", (int)w);
    f = fopen(path, "r");
    ck_assert_ptr_nonnull(f);
    n = fread(cmdline, 1, sizeof(cmdline) - 1, f);
    fclose(f);
    for (size_t i = 0; i < n; i++) {
        cmdline[i] = cmdline[i] == '\0' ? ' ' : cmdline[i];
    }
    cmdline[n] = '\0';
    ck_assert_msg(strstr(cmdline, "gpu=a100") != NULL, "%s", cmdline);
    kill(w, SIGTERM);
    ck_assert_int_eq(wait_exit(w, 5000), 0);
}
END_TEST

/* ---- consume ---- */

START_TEST(test_consume_sigint_gives_back_without_failure)
{
    char cmd[1024];
    pid_t c;

    make_strict_queue();
    for (int i = 0; i < 5; i++) {
        ck_assert_int_eq(cli(NULL, 0, "pub jobs m%d", i), 0);
    }
    snprintf(cmd, sizeof(cmd),
             "exec %s consume jobs --no-ack --wait 30s "
             "> /dev/null",
             protoq_bin());
    c = fork();
    ck_assert_int_ge(c, 0);
    if (c == 0) {
        setenv("PROTOQ_SERVER", g_srv.addr, 1);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    ck_assert(wait_stat("jobs", "inflight", 5, 5000));
    kill(c, SIGINT);
    ck_assert_int_eq(wait_exit(c, 5000), 0);
    ck_assert(wait_stat("jobs", "ready", 5, 3000));
    ck_assert_int_eq(stat_of("dlq", "ready"), 0);
}
END_TEST

START_TEST(test_consume_epipe_stops_cleanly)
{
    int64_t end;
    int fds[2], status = -1;
    pid_t pid;

    make_strict_queue();
    ck_assert_int_eq(cli(NULL, 0, "pub jobs first"), 0);
    /* The reader is gone before anything is written: its end of the pipe
     * is closed before consume starts (`consume | true` raced with true's
     * exit: a loaded machine let consume write into the pipe first, and
     * what a pipe took is acked). */
    ck_assert_int_eq(pipe(fds), 0);
    close(fds[0]);
    pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        dup2(fds[1], STDOUT_FILENO);
        close(fds[1]);
        setenv("PROTOQ_SERVER", g_srv.addr, 1);
        execl(protoq_bin(), protoq_bin(), "consume", "jobs", "--wait", "2s",
              (char *)NULL);
        _exit(127);
    }
    close(fds[1]);
    end = now_ms_mono() + 20000;
    while (waitpid(pid, &status, WNOHANG) != pid) {
        if (now_ms_mono() > end) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            break;
        }
        usleep(20000);
    }
    ck_assert_int_eq(WIFEXITED(status) ? WEXITSTATUS(status) : -1, 0);
    /* Not acked (never read), not a failed attempt (not dead-lettered). */
    ck_assert(wait_stat("jobs", "ready", 1, 3000));
    ck_assert_int_eq(stat_of("jobs", "acked"), 0);
    ck_assert_int_eq(stat_of("dlq", "ready"), 0);
}
END_TEST

static Suite *
work_suite(void)
{
    Suite *s = suite_create("work");
    TCase *tc = tcase_create("work");
    TCase *tcc = tcase_create("consume");

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_sigterm_releases_without_failure);
    tcase_add_test(tc, test_job_finishing_in_grace_is_acked);
    tcase_add_test(tc, test_cancel_stops_group_and_no_release_loop);
    tcase_add_test(tc, test_sigstop_sigcont_no_release_loop);
    tcase_add_test(tc, test_worker_kill9_stops_job);
    tcase_add_test(tc, test_reconnect_after_broker_restart);
    tcase_add_test(tc, test_progress_and_checkpoint_reach_next_attempt);
    tcase_add_test(tc, test_stderr_tail_in_dead_letter);
    tcase_add_test(tc, test_timeout_fails_attempt);
    tcase_add_test(tc, test_work_keeps_its_arguments);
    suite_add_tcase(s, tc);
    tcase_add_checked_fixture(tcc, setup, teardown);
    tcase_set_timeout(tcc, 60);
    tcase_add_test(tcc, test_consume_sigint_gives_back_without_failure);
    tcase_add_test(tcc, test_consume_epipe_stops_cleanly);
    suite_add_tcase(s, tcc);
    return s;
}

int
main(void)
{
    SRunner *sr = srunner_create(work_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
