/*
 * testutil.c: see testutil.h. Starts and stops real protoqd processes for
 * the integration tests and talks raw bytes to them. Every loop here is
 * bounded by a deadline; the child asks the kernel for SIGTERM when the
 * test process dies (PR_SET_PDEATHSIG), so a broker never outlives its
 * test even with CK_FORK=no.
 */
#include "testutil.h"
#include "clock.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum {
    START_TIMEOUT_MS = 5000,
    STOP_TIMEOUT_MS = 5000,
    MAX_ARGS = 64,
};

/* now_ms_mono: CLOCK_MONOTONIC in ms. */
int64_t
now_ms_mono(void)
{
    return (int64_t)clock_mono_ms();
}

static void
sleep_ms(int ms)
{
    struct timespec ts = {.tv_sec = ms / 1000,
                          .tv_nsec = (ms % 1000) * 1000000L};

    nanosleep(&ts, NULL);
}

/* wait_until: poll cond every 5 ms until true or timeout. */
bool
wait_until(bool (*cond)(void *arg), void *arg, int timeout_ms)
{
    int64_t deadline = now_ms_mono() + timeout_ms;

    for (;;) {
        if (cond(arg)) {
            return true;
        }
        if (now_ms_mono() >= deadline) {
            return false;
        }
        sleep_ms(5);
    }
}

/* ---- the broker process ---- */

static const char *
protoqd_path(void)
{
    const char *p = getenv("PROTOQD");

    return p && p[0] ? p : "build/protoqd";
}

/* srv_binary: see testutil.h. */
const char *
srv_binary(void)
{
    return protoqd_path();
}

/* prog_run: see testutil.h. */
int
prog_run(const char *const *argv, const char *outpath, int timeout_ms)
{
    int64_t deadline = now_ms_mono() + timeout_ms;
    int status = 0;
    pid_t pid = fork();

    if (pid < 0) {
        return -1;
    }
    if (pid == 0) {
        int fd = open(outpath, O_WRONLY | O_CREAT | O_TRUNC, 0644);

        if (fd >= 0) {
            dup2(fd, STDOUT_FILENO);
            dup2(fd, STDERR_FILENO);
        }
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    while (now_ms_mono() < deadline) {
        if (waitpid(pid, &status, WNOHANG) == pid) {
            return WIFEXITED(status) ? WEXITSTATUS(status)
                                     : 128 + WTERMSIG(status);
        }
        sleep_ms(5);
    }
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    return -1;
}

/* file_slurp: see testutil.h. */
char *
file_slurp(const char *path, char *buf, size_t cap)
{
    FILE *f = fopen(path, "r");
    size_t n = 0;

    if (f != NULL) {
        n = fread(buf, 1, cap - 1, f);
        fclose(f);
    }
    buf[n] = '\0';
    return buf;
}

/* srv_log_path: DIR/protoqd.log. */
void
srv_log_path(const struct srv *s, char *buf, size_t cap)
{
    snprintf(buf, cap, "%s/protoqd.log", s->dir);
}

/* srv_log_has: see testutil.h. */
bool
srv_log_has(const struct srv *s, const char *needle)
{
    char path[300], line[4096];
    bool found = false;
    FILE *f;

    srv_log_path(s, path, sizeof(path));
    f = fopen(path, "r");
    if (f == NULL) {
        return false;
    }
    while (!found && fgets(line, sizeof(line), f) != NULL) {
        found = strstr(line, needle) != NULL;
    }
    fclose(f);
    return found;
}

/* test_conf_write: see testutil.h. */
int
test_conf_write(struct test_conf *tc, const char *text)
{
    FILE *f;
    int rc = -1;

    snprintf(tc->dir, sizeof(tc->dir), "/tmp/protoq-conf.XXXXXX");
    if (mkdtemp(tc->dir) == NULL) {
        perror("mkdtemp");
        return -1;
    }
    snprintf(tc->path, sizeof(tc->path), "%s/protoqd.conf", tc->dir);
    f = fopen(tc->path, "w");
    if (f == NULL) {
        perror(tc->path);
        return -1;
    }
    if (fputs(text, f) >= 0) {
        rc = 0;
    }
    if (fclose(f) != 0) {
        rc = -1;
    }
    if (rc != 0) {
        fprintf(stderr, "%s: write failed\n", tc->path);
    }
    return rc;
}

/* test_conf_remove: see testutil.h. */
void
test_conf_remove(struct test_conf *tc)
{
    unlink(tc->path);
    rmdir(tc->dir);
}

/* Read DIR/port; returns the port or 0 while it is not there yet. */
static uint16_t
read_port_file(const struct srv *s)
{
    char path[300];
    char buf[32];
    FILE *f;
    long v;

    snprintf(path, sizeof(path), "%s/port", s->dir);
    f = fopen(path, "r");
    if (f == NULL) {
        return 0;
    }
    if (fgets(buf, sizeof(buf), f) == NULL) {
        fclose(f);
        return 0;
    }
    fclose(f);
    v = strtol(buf, NULL, 10);
    return v > 0 && v < 65536 ? (uint16_t)v : 0;
}

/* Print the tail of the broker's log to stderr (for failed starts). */
static void
dump_log(const struct srv *s)
{
    char path[300];
    char buf[4096];
    FILE *f;
    size_t n;
    long size;

    srv_log_path(s, path, sizeof(path));
    f = fopen(path, "r");
    if (f == NULL) {
        return;
    }
    fseek(f, 0, SEEK_END);
    size = ftell(f);
    fseek(f, size > (long)sizeof(buf) - 1 ? size - (long)sizeof(buf) + 1 : 0,
          SEEK_SET);
    n = fread(buf, 1, sizeof(buf) - 1, f);
    buf[n] = '\0';
    fclose(f);
    fprintf(stderr, "---- %s ----\n%s\n----\n", path, buf);
}

/* srv_launch: fork+exec protoqd on s's dirs, wait for its port file. */
int
srv_launch(struct srv *s)
{
    const char *argv[MAX_ARGS];
    char portfile[300];
    char logpath[300];
    int64_t deadline;
    size_t n = 0;
    pid_t pid;

    snprintf(portfile, sizeof(portfile), "%s/port", s->dir);
    srv_log_path(s, logpath, sizeof(logpath));
    unlink(portfile);
    argv[n++] = protoqd_path();
    argv[n++] = "--listen";
    argv[n++] = "127.0.0.1:0";
    argv[n++] = "--port-file";
    argv[n++] = portfile;
    argv[n++] = "--data-dir";
    argv[n++] = s->data_dir;
    argv[n++] = "--log-level";
    argv[n++] = "warn";
    for (size_t i = 0; s->extra_args && s->extra_args[i]; i++) {
        if (n + 1 >= MAX_ARGS) {
            fprintf(stderr, "srv_launch: too many arguments\n");
            return -1;
        }
        argv[n++] = s->extra_args[i];
    }
    argv[n] = NULL;

    pid = fork();
    if (pid < 0) {
        fprintf(stderr, "srv_launch: fork: %s\n", strerror(errno));
        return -1;
    }
    if (pid == 0) {
        int fd = open(logpath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);

        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (fd >= 0) {
            dup2(fd, STDERR_FILENO);
        }
        execv(argv[0], (char *const *)argv);
        fprintf(stderr, "exec %s: %s\n", argv[0], strerror(errno));
        _exit(127);
    }
    s->pid = pid;
    s->port = 0;
    deadline = now_ms_mono() + START_TIMEOUT_MS;
    while (now_ms_mono() < deadline) {
        int status;

        s->port = read_port_file(s);
        if (s->port != 0) {
            snprintf(s->addr, sizeof(s->addr), "127.0.0.1:%u", s->port);
            return 0;
        }
        if (waitpid(pid, &status, WNOHANG) == pid) {
            s->pid = 0;
            fprintf(stderr,
                    "srv_launch: %s exited during start (status "
                    "0x%x)\n",
                    argv[0], status);
            dump_log(s);
            return -1;
        }
        sleep_ms(5);
    }
    fprintf(stderr, "srv_launch: no port file from %s within %d ms\n", argv[0],
            START_TIMEOUT_MS);
    dump_log(s);
    srv_kill9(s);
    return -1;
}

/* srv_start: fresh temp dir, then srv_launch. */
int
srv_start(struct srv *s, const char *const *extra_args)
{
    memset(s, 0, sizeof(*s));
    snprintf(s->dir, sizeof(s->dir), "/tmp/protoq-test.XXXXXX");
    if (mkdtemp(s->dir) == NULL) {
        fprintf(stderr, "srv_start: mkdtemp: %s\n", strerror(errno));
        s->dir[0] = '\0';
        return -1;
    }
    snprintf(s->data_dir, sizeof(s->data_dir), "%s/data", s->dir);
    s->extra_args = extra_args;
    return srv_launch(s);
}

/* srv_kill9: SIGKILL and reap. */
void
srv_kill9(struct srv *s)
{
    if (s->pid > 0) {
        kill(s->pid, SIGKILL);
        while (waitpid(s->pid, NULL, 0) < 0 && errno == EINTR) {
        }
        s->pid = 0;
    }
}

/* srv_stop: SIGTERM, bounded wait, then SIGKILL; the exit status. */
int
srv_stop(struct srv *s)
{
    int64_t deadline;
    int status;

    if (s->pid <= 0) {
        return -1;
    }
    kill(s->pid, SIGTERM);
    deadline = now_ms_mono() + STOP_TIMEOUT_MS;
    for (;;) {
        pid_t r = waitpid(s->pid, &status, WNOHANG);

        if (r == s->pid) {
            break;
        }
        if (r < 0 && errno != EINTR) {
            s->pid = 0;
            return -1;
        }
        if (now_ms_mono() >= deadline) {
            fprintf(stderr,
                    "srv_stop: protoqd %d ignored SIGTERM for %d ms; "
                    "killing it\n",
                    (int)s->pid, STOP_TIMEOUT_MS);
            kill(s->pid, SIGKILL);
            while (waitpid(s->pid, &status, 0) < 0 && errno == EINTR) {
            }
            break;
        }
        sleep_ms(5);
    }
    s->pid = 0;
    if (WIFEXITED(status)) {
        return WEXITSTATUS(status);
    }
    return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : -1;
}

/* What a stop this file makes itself must end in: protoqd's own exit 0
 * after SIGTERM. A non-zero exit (a sanitizer report or leak, an error at
 * shutdown) or a signal (a crash, or the SIGKILL of a broker that ignored
 * SIGTERM) fails the running test, naming the suite and the status, with
 * the tail of the broker's log. Tests that expect another status call
 * srv_stop themselves. Returns whether the stop was clean; if not, why is
 * in msg (for ck_abort_msg once the caller has cleaned up). */
static bool
srv_stop_clean(struct srv *s, const char *what, char *msg, size_t cap)
{
    pid_t pid = s->pid;
    int rc = srv_stop(s);

    if (rc == 0) {
        return true;
    }
    dump_log(s);
    snprintf(msg, cap,
             "%s (test %s): %s: protoqd %d (%s) %s %d after SIGTERM%s",
             program_invocation_short_name, tcase_name() ? tcase_name() : "?",
             what, (int)pid, s->dir,
             rc > 128 ? "was killed by signal" : "exited with status",
             rc > 128 ? rc - 128 : rc,
             rc == 128 + SIGKILL ? " (it ignored SIGTERM for 5 s)" : "");
    return false;
}

/* srv_restart: srv_stop, then srv_launch on the same data dir. */
int
srv_restart(struct srv *s)
{
    char msg[600];

    if (s->pid > 0 && !srv_stop_clean(s, "srv_restart", msg, sizeof(msg))) {
        ck_abort_msg("%s", msg);
    }
    return srv_launch(s);
}

static int
rm_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(path);
}

/* srv_cleanup: stop if running, remove the temp dir. */
void
srv_cleanup(struct srv *s)
{
    char msg[600];
    bool clean = true;

    if (s->pid > 0) {
        clean = srv_stop_clean(s, "srv_cleanup", msg, sizeof(msg));
    }
    if (s->dir[0] != '\0' && strncmp(s->dir, "/tmp/", 5) == 0) {
        nftw(s->dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    }
    s->dir[0] = '\0';
    /* after the dir is gone: ck_abort_msg does not return */
    if (!clean) {
        ck_abort_msg("%s", msg);
    }
}

/* srv_vmhwm_kb: VmHWM of the broker in KiB, or -1. */
long
srv_vmhwm_kb(const struct srv *s)
{
    char path[64];
    char line[256];
    FILE *f;
    long kb = -1;

    if (s->pid <= 0) {
        return -1;
    }
    snprintf(path, sizeof(path), "/proc/%d/status", (int)s->pid);
    f = fopen(path, "r");
    if (f == NULL) {
        return -1;
    }
    while (fgets(line, sizeof(line), f) != NULL) {
        if (strncmp(line, "VmHWM:", 6) == 0) {
            kb = strtol(line + 6, NULL, 10);
            break;
        }
    }
    fclose(f);
    return kb;
}

/* ---- libprotoq ---- */

/* pq_connect_or_fail: connect with libprotoq or abort the Check test. */
protoq_client *
pq_connect_or_fail(const struct srv *s)
{
    struct protoq_opts o;
    protoq_client *c = NULL;
    int rc;

    memset(&o, 0, sizeof(o));
    o.client_name = "check";
    o.io_timeout_ms = 10000;
    rc = protoq_connect(s->addr, &o, &c);
    if (rc != PQ_OK) {
        char msg[600];

        snprintf(msg, sizeof(msg), "%s", protoq_errmsg(c));
        protoq_close(c);
        ck_abort_msg("protoq_connect %s: %s (%d): %s", s->addr, pq_strerror(rc),
                     rc, msg);
    }
    return c;
}

/* ---- raw sockets ---- */

/* raw_connect: blocking TCP connection to 127.0.0.1:port. */
int
raw_connect(uint16_t port)
{
    struct sockaddr_in sa;
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;

    if (fd < 0) {
        return -1;
    }
    memset(&sa, 0, sizeof(sa));
    sa.sin_family = AF_INET;
    sa.sin_port = htons(port);
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        close(fd);
        return -1;
    }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    return fd;
}

/* raw_send: send all of buf. */
int
raw_send(int fd, const void *buf, size_t len)
{
    const uint8_t *p = buf;

    while (len > 0) {
        ssize_t n = send(fd, p, len, MSG_NOSIGNAL);

        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -1;
        }
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

/* raw_send_slowly: send buf one byte at a time. */
int
raw_send_slowly(int fd, const void *buf, size_t len)
{
    const uint8_t *p = buf;
    size_t i;

    for (i = 0; i < len; i++) {
        if (raw_send(fd, p + i, 1) != 0) {
            return -1;
        }
    }
    return 0;
}

/* Read exactly len bytes before deadline: 0 ok, 1 EOF, -1 error/timeout. */
static int
read_exact(int fd, uint8_t *buf, size_t len, int64_t deadline)
{
    size_t got = 0;

    while (got < len) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        int64_t left = deadline - now_ms_mono();
        ssize_t n;
        int rc;

        if (left <= 0) {
            return -1;
        }
        rc = poll(&pfd, 1, (int)left);
        if (rc < 0 && errno == EINTR) {
            continue;
        }
        if (rc <= 0) {
            return -1;
        }
        n = recv(fd, buf + got, len - got, 0);
        if (n == 0) {
            return 1;
        }
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN) {
                continue;
            }
            return errno == ECONNRESET ? 1 : -1;
        }
        got += (size_t)n;
    }
    return 0;
}

/* raw_read_frame: read and decode one frame within timeout_ms. */
int
raw_read_frame(int fd, int timeout_ms, uint32_t max_bytes, Protoq__Frame **out)
{
    int64_t deadline = now_ms_mono() + timeout_ms;
    uint8_t hdr[FRAME_HEADER_LEN];
    uint8_t *body;
    ssize_t n;
    int rc;

    *out = NULL;
    rc = read_exact(fd, hdr, sizeof(hdr), deadline);
    if (rc != 0) {
        return rc;
    }
    n = frame_check_header(hdr, sizeof(hdr), max_bytes);
    if (n < 0) {
        return -1;
    }
    body = malloc((size_t)n);
    if (body == NULL) {
        return -1;
    }
    rc = read_exact(fd, body, (size_t)n, deadline);
    if (rc == 0) {
        rc = frame_unpack(body, (size_t)n, frame_decode_budget((size_t)n),
                          out) == PQ_OK
                 ? 0
                 : -1;
    }
    free(body);
    return rc;
}

/* raw_wait_eof: true when the peer closes within timeout_ms. */
bool
raw_wait_eof(int fd, int timeout_ms)
{
    int64_t deadline = now_ms_mono() + timeout_ms;
    uint8_t buf[4096];

    for (;;) {
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        int64_t left = deadline - now_ms_mono();
        ssize_t n;
        int rc;

        if (left <= 0) {
            return false;
        }
        rc = poll(&pfd, 1, (int)left);
        if (rc < 0 && errno == EINTR) {
            continue;
        }
        if (rc <= 0) {
            return false;
        }
        n = recv(fd, buf, sizeof(buf), 0);
        if (n == 0 || (n < 0 && errno == ECONNRESET)) {
            return true;
        }
        if (n < 0 && errno != EINTR && errno != EAGAIN) {
            return false;
        }
    }
}

/* raw_pack: serialize f with its length prefix into a malloc'ed buffer. */
uint8_t *
raw_pack(const Protoq__Frame *f, size_t *len)
{
    size_t n = frame_packed_size(f);
    uint8_t *buf = malloc(n);

    if (buf == NULL) {
        return NULL;
    }
    *len = frame_pack(f, buf);
    return buf;
}

/* raw_hello: send Hello, expect Welcome. */
int
raw_hello(int fd, int timeout_ms)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Hello h = PROTOQ__HELLO__INIT;
    Protoq__Frame *r = NULL;
    uint8_t *buf;
    size_t len;
    int rc;

    h.protocol_version = PROTOQ_PROTOCOL_VERSION;
    h.client_name = (char *)"raw";
    f.request_id = 1;
    f.kind_case = PROTOQ__FRAME__KIND_HELLO;
    f.hello = &h;
    buf = raw_pack(&f, &len);
    if (buf == NULL) {
        return -1;
    }
    rc = raw_send(fd, buf, len);
    free(buf);
    if (rc != 0) {
        return -1;
    }
    if (raw_read_frame(fd, timeout_ms, 1u << 20, &r) != 0) {
        return -1;
    }
    rc = r->kind_case == PROTOQ__FRAME__KIND_WELCOME ? 0 : -1;
    frame_free(r);
    return rc;
}

/* ---- a TCP proxy, to cut or freeze a connection ---- */

enum { PROXY_PAIRS = 16 };

/* One proxied connection: fd[0] the client's, fd[1] the broker's. */
struct proxy_pair {
    int fd[2];   /* -1 when the slot is free */
    bool frozen; /* held open, never read again */
};

static void
pair_close(struct proxy_pair *pp)
{
    close(pp->fd[0]);
    close(pp->fd[1]);
    pp->fd[0] = pp->fd[1] = -1;
    pp->frozen = false;
}

static void
proxy_accept(int lfd, uint16_t backend, struct proxy_pair *pairs)
{
    int cfd = accept(lfd, NULL, NULL), bfd;
    size_t i;

    if (cfd < 0) {
        return;
    }
    bfd = raw_connect(backend);
    for (i = 0; i < PROXY_PAIRS && pairs[i].fd[0] >= 0; i++) {
    }
    if (bfd < 0 || i == PROXY_PAIRS) {
        close(cfd);
        if (bfd >= 0) {
            close(bfd);
        }
        return;
    }
    pairs[i].fd[0] = cfd;
    pairs[i].fd[1] = bfd;
    pairs[i].frozen = false;
}

/* The child: forward until killed or until the control socket closes. */
static void
proxy_run(int lfd, int ctl, uint16_t backend)
{
    struct proxy_pair pairs[PROXY_PAIRS];
    struct pollfd p[2 + 2 * PROXY_PAIRS];
    size_t at[2 + 2 * PROXY_PAIRS]; /* p[k] is pairs[at[k] / 2].fd[at[k] % 2] */
    static char buf[65536];

    for (size_t i = 0; i < PROXY_PAIRS; i++) {
        pairs[i].fd[0] = pairs[i].fd[1] = -1;
        pairs[i].frozen = false;
    }
    for (;;) {
        nfds_t n = 2;
        char cmd;

        p[0] = (struct pollfd){.fd = lfd, .events = POLLIN};
        p[1] = (struct pollfd){.fd = ctl, .events = POLLIN};
        for (size_t i = 0; i < PROXY_PAIRS; i++) {
            if (pairs[i].fd[0] < 0 || pairs[i].frozen) {
                continue;
            }
            for (size_t side = 0; side < 2; side++) {
                p[n] =
                    (struct pollfd){.fd = pairs[i].fd[side], .events = POLLIN};
                at[n++] = i * 2 + side;
            }
        }
        if (poll(p, n, -1) < 0) {
            continue;
        }
        if (p[1].revents != 0) {
            if (read(ctl, &cmd, 1) != 1) {
                return; /* the test is gone */
            }
            for (size_t i = 0; i < PROXY_PAIRS; i++) {
                pairs[i].frozen = pairs[i].fd[0] >= 0;
            }
            if (write(ctl, "k", 1) != 1) {
                return;
            }
            continue; /* frozen pairs' revents are stale now */
        }
        for (nfds_t k = 2; k < n; k++) {
            struct proxy_pair *pp = &pairs[at[k] / 2];
            size_t side = at[k] % 2;
            ssize_t got;

            if (p[k].revents == 0 || pp->fd[0] < 0) {
                continue;
            }
            got = read(pp->fd[side], buf, sizeof(buf));
            if (got <= 0 || raw_send(pp->fd[1 - side], buf, (size_t)got) != 0) {
                pair_close(pp);
            }
        }
        if (p[0].revents != 0) {
            proxy_accept(lfd, backend, pairs);
        }
    }
}

/* proxy_start: see testutil.h. */
void
proxy_start(struct proxy *p, uint16_t port, uint16_t backend)
{
    struct sockaddr_in a;
    socklen_t len = sizeof(a);
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
    int sv[2];
    char ready;

    ck_assert_int_ge(lfd, 0);
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    a.sin_port = htons(port);
    ck_assert_msg(bind(lfd, (struct sockaddr *)&a, sizeof(a)) == 0,
                  "proxy: bind 127.0.0.1:%u: %s", port, strerror(errno));
    ck_assert_int_eq(listen(lfd, 8), 0);
    ck_assert_int_eq(getsockname(lfd, (struct sockaddr *)&a, &len), 0);
    ck_assert_int_eq(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    p->port = ntohs(a.sin_port);
    p->pid = fork();
    ck_assert_int_ge(p->pid, 0);
    if (p->pid == 0) {
        close(sv[0]);
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* CK_FORK=no leaves none behind */
        if (write(sv[1], "r", 1) == 1) {
            proxy_run(lfd, sv[1], backend);
        }
        _exit(0);
    }
    close(lfd);
    close(sv[1]);
    p->ctl = sv[0];
    ck_assert_msg(read(p->ctl, &ready, 1) == 1, "proxy did not start");
}

/* proxy_freeze: see testutil.h. */
void
proxy_freeze(struct proxy *p)
{
    struct pollfd pfd = {.fd = p->ctl, .events = POLLIN};
    char ack;

    ck_assert_int_eq(write(p->ctl, "f", 1), 1);
    ck_assert_msg(poll(&pfd, 1, 5000) == 1 && read(p->ctl, &ack, 1) == 1,
                  "proxy did not freeze");
}

/* proxy_kill: see testutil.h. */
void
proxy_kill(struct proxy *p)
{
    if (p->pid <= 0) {
        return;
    }
    kill(p->pid, SIGKILL);
    waitpid(p->pid, NULL, 0);
    close(p->ctl);
    p->pid = 0;
    p->ctl = -1;
}
