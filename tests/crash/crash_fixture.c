/*
 * crash_fixture.c: see crash_fixture.h.
 */
#include <check.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "testutil.h"
#include "crash_fixture.h"

const char QUEUE[] = "crash";

/* ------------------------------------------------------------ fixture */

struct srv g_srv;
struct test_conf g_conf;
const char *const g_args[] = {"-c", g_conf.path, NULL};

static const char CONF_TEXT[] =
    "# check_crash: small segments (many rolls and deletions), fast retries\n"
    "segment_bytes 65536\n"
    "backoff_base_ms 1\n"
    "backoff_cap_ms 5\n"
    "max_attempts 1000\n";

/* crash_main: see the header. The conf file is written once here and
 * removed at the end, so a failed test leaks nothing. */
int
crash_main(Suite *s)
{
    SRunner *sr;
    int failed;

    if (test_conf_write(&g_conf, CONF_TEXT) != 0) {
        return EXIT_FAILURE;
    }
    sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    test_conf_remove(&g_conf);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}

void
setup(void)
{
    ck_assert_msg(srv_start(&g_srv, g_args) == 0,
                  "protoqd did not start (PROTOQD=%s)",
                  getenv("PROTOQD") ? getenv("PROTOQD") : "(unset)");
}

void
teardown(void)
{
    srv_cleanup(&g_srv);
}

void
sleep_ms(int ms)
{
    poll(NULL, 0, ms);
}

/* ------------------------------------------------------------ payloads */

static uint32_t
fnv1a(const void *p, size_t n)
{
    const uint8_t *b = p;
    uint32_t h = 2166136261u;
    size_t i;

    for (i = 0; i < n; i++) {
        h = (h ^ b[i]) * 16777619u;
    }
    return h;
}

static char
filler_byte(uint64_t seq, size_t j)
{
    return (char)('a' + (seq * 7 + j * 31) % 26);
}

/* make_payload: the payload of seq with minpad + (0..479) filler bytes. */
size_t
make_payload(uint64_t seq, size_t minpad, char *buf)
{
    size_t flen = minpad + (size_t)((seq * 2654435761u) >> 11) % 480;
    size_t j, n;

    if (flen > PAYLOAD_MAX - 28) {
        flen = PAYLOAD_MAX - 28;
    }
    n = (size_t)snprintf(buf, 21, "%016" PRIx64 "%04zx", seq, flen);
    for (j = 0; j < flen; j++) {
        buf[n++] = filler_byte(seq, j);
    }
    snprintf(buf + n, 9, "%08" PRIx32, fnv1a(buf, n));
    return n + 8;
}

/* check_payload: true (and *seq) when p is intact. */
static bool
check_payload(const void *p, size_t len, uint64_t *seq)
{
    const char *s = p;
    char tmp[17], sum[9];
    unsigned long long v;
    size_t flen, j;
    unsigned x;

    *seq = 0;
    if (len < 28) {
        return false;
    }
    memcpy(tmp, s, 16);
    tmp[16] = '\0';
    if (sscanf(tmp, "%16llx", &v) != 1) {
        return false;
    }
    memcpy(tmp, s + 16, 4);
    tmp[4] = '\0';
    if (sscanf(tmp, "%4x", &x) != 1) {
        return false;
    }
    flen = x;
    if (len != 20 + flen + 8) {
        return false;
    }
    for (j = 0; j < flen; j++) {
        if (s[20 + j] != filler_byte(v, j)) {
            return false;
        }
    }
    snprintf(sum, sizeof(sum), "%08" PRIx32, fnv1a(s, 20 + flen));
    if (memcmp(sum, s + 20 + flen, 8) != 0) {
        return false;
    }
    *seq = v;
    return true;
}

/* ------------------------------------------------------ child processes */

/* Line output for the children: one write() per line, O_APPEND. */
static int g_out_fd = -1;

static void put_line(const char *fmt, ...)
    __attribute__((format(printf, 1, 2)));

static void
put_line(const char *fmt, ...)
{
    char line[256];
    va_list ap;
    int n;

    va_start(ap, fmt);
    n = vsnprintf(line, sizeof(line), fmt, ap);
    va_end(ap);
    if (n > 0 && g_out_fd >= 0) {
        ssize_t w = write(g_out_fd, line, (size_t)n);

        (void)w;
    }
}

static protoq_client *
child_connect(const char *addr)
{
    struct protoq_opts o;
    protoq_client *c = NULL;

    memset(&o, 0, sizeof(o));
    o.client_name = "check_crash";
    o.connect_timeout_ms = 2000;
    o.io_timeout_ms = 3000;
    if (protoq_connect(addr, &o, &c) != PQ_OK) {
        protoq_close(c);
        return NULL;
    }
    return c;
}

static void
on_confirm(void *arg, int err, uint64_t id, bool duplicate)
{
    (void)duplicate;
    if (err == PQ_OK) {
        put_line("C %" PRIu64 " %" PRIu64 "\n", (uint64_t)(uintptr_t)arg, id);
    }
}

/*
 * producer_run: publish seq_base, seq_base + 1, ... in pipelined bursts of
 * PROD_BURST (then wait for their confirms and pause pause_ms) until the
 * connection dies, max_ms passes or max_n were sent. "P seq" before each
 * send, "C seq id" on each confirm. Returns 0, or 2 when it could not
 * connect.
 */
static int
producer_run(const char *addr, const char *path, uint64_t seq_base,
             uint64_t max_n, size_t minpad, int max_ms, int pause_ms)
{
    static char buf[PAYLOAD_MAX];
    int64_t deadline = now_ms_mono() + max_ms;
    protoq_client *c;
    uint64_t i;
    int rc = PQ_OK;

    g_out_fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (g_out_fd < 0) {
        return 3;
    }
    c = child_connect(addr);
    if (c == NULL) {
        return 2;
    }
    for (i = 0; i < max_n && now_ms_mono() < deadline; i++) {
        struct protoq_message m;
        uint64_t seq = seq_base + i;

        memset(&m, 0, sizeof(m));
        m.len = make_payload(seq, minpad, buf);
        m.payload = buf;
        put_line("P %" PRIu64 "\n", seq);
        rc = protoq_publish_async(c, QUEUE, &m, on_confirm,
                                  (void *)(uintptr_t)seq);
        if (rc != PQ_OK) {
            break;
        }
        if (protoq_outstanding(c) >= PROD_BURST) {
            rc = protoq_wait_confirms(c, 0, 2000);
            if (rc != PQ_OK && rc != PQ_ETIMEDOUT) {
                break;
            }
            if (pause_ms > 0) {
                sleep_ms(pause_ms);
            }
        }
    }
    if (rc == PQ_OK || rc == PQ_ETIMEDOUT) {
        protoq_wait_confirms(c, 0, 3000);
    }
    protoq_close(c);
    close(g_out_fd);
    g_out_fd = -1;
    return 0;
}

/* Deliveries waiting for their ack in the consumer. */
struct pend {
    uint64_t id, seq;
    uint32_t attempt;
};

struct cons_state {
    struct pend ring[1024];
    unsigned head, tail;
    uint64_t delivered;
    int64_t last_ms;
};

static void
on_cdeliver(void *arg, protoq_client *c, const struct protoq_delivery *d)
{
    struct cons_state *cs = arg;
    uint64_t seq;
    bool ok = check_payload(d->payload, d->len, &seq);

    (void)c;
    put_line("D %" PRIu64 " %" PRIu64 " %u %d\n", seq, d->message_id,
             d->attempt, ok ? 1 : 0);
    cs->delivered++;
    cs->last_ms = now_ms_mono();
    if (cs->tail - cs->head < sizeof(cs->ring) / sizeof(cs->ring[0])) {
        struct pend *p = &cs->ring[cs->tail++ % 1024];

        p->id = d->message_id;
        p->seq = seq;
        p->attempt = d->attempt;
    }
}

/*
 * consumer_run: subscribe and ack every delivery with a confirmed ack:
 * "D seq id attempt ok" per delivery, "a seq id" before each ack, "A seq id"
 * when it is confirmed, "E seq id code" when the broker refuses it. Stops
 * when the connection dies, after max_ms, or (idle_ms > 0) when nothing
 * arrived for idle_ms. Returns 0, or 2 when it could not connect.
 */
static int
consumer_run(const char *addr, const char *path, int max_ms, int idle_ms)
{
    static struct cons_state cs;
    int64_t deadline = now_ms_mono() + max_ms;
    protoq_client *c;
    int rc = PQ_OK;

    memset(&cs, 0, sizeof(cs));
    g_out_fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (g_out_fd < 0) {
        return 3;
    }
    c = child_connect(addr);
    if (c == NULL) {
        close(g_out_fd);
        return 2;
    }
    cs.last_ms = now_ms_mono();
    if (protoq_subscribe(c, QUEUE, CONS_PREFETCH, NULL, 0, on_cdeliver, &cs,
                         NULL) != PQ_OK) {
        goto out;
    }
    while (now_ms_mono() < deadline) {
        rc = protoq_poll(c, 50);
        if (rc < 0) {
            break;
        }
        while (cs.head != cs.tail) {
            struct pend p = cs.ring[cs.head++ % 1024];

            put_line("a %" PRIu64 " %" PRIu64 "\n", p.seq, p.id);
            rc = protoq_ack_sync(c, p.id, p.attempt);
            if (rc == PQ_OK) {
                put_line("A %" PRIu64 " %" PRIu64 "\n", p.seq, p.id);
            } else if (rc == PQ_EREMOTE) {
                put_line("E %" PRIu64 " %" PRIu64 " %d\n", p.seq, p.id,
                         protoq_last_error_code(c));
                rc = PQ_OK;
            } else {
                break;
            }
        }
        if (rc < 0) {
            break;
        }
        if (idle_ms > 0 && now_ms_mono() - cs.last_ms >= idle_ms) {
            break;
        }
    }
out:
    protoq_close(c);
    close(g_out_fd);
    g_out_fd = -1;
    return 0;
}

/* spawn: fork; the child runs the producer (role 'p') or consumer ('c'). */
pid_t
spawn(char role, const char *path, uint64_t seq_base)
{
    pid_t pid = fork();
    char addr[64];

    ck_assert_int_ge(pid, 0);
    if (pid > 0) {
        return pid;
    }
    snprintf(addr, sizeof(addr), "%s", g_srv.addr);
    if (role == 'p') {
        _exit(producer_run(addr, path, seq_base, SEQ_STRIDE - 1, 0,
                           CHILD_MAX_MS, PROD_PAUSE_MS));
    }
    _exit(consumer_run(addr, path, CHILD_MAX_MS, 0));
}

/* reap: wait up to REAP_MS for child pid; fail the test if it hangs or dies
 * of a signal. Returns its exit code. */
int
reap(pid_t pid, const char *what, int cycle)
{
    int64_t deadline = now_ms_mono() + REAP_MS;
    int status = 0, i;

    for (i = 0; i < 1000000; i++) {
        pid_t r = waitpid(pid, &status, WNOHANG);

        if (r == pid) {
            break;
        }
        if (r < 0 && errno != EINTR) {
            ck_abort_msg("waitpid %s: %s", what, strerror(errno));
        }
        if (now_ms_mono() >= deadline) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            ck_abort_msg("cycle %d: the %s did not exit within %d ms after "
                         "the broker went away",
                         cycle, what, REAP_MS);
        }
        sleep_ms(2);
    }
    ck_assert_msg(WIFEXITED(status), "cycle %d: the %s died of signal %d",
                  cycle, what, WIFSIGNALED(status) ? WTERMSIG(status) : -1);
    return WEXITSTATUS(status);
}

static struct protoq_queue_info
stat_queue(void)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_info i;

    memset(&i, 0, sizeof(i));
    pq_check_ok(c, protoq_queue_stat(c, QUEUE, &i));
    protoq_close(c);
    return i;
}

/* drain: consume (in this process) until the queue is empty. */
void
drain(const char *path)
{
    struct protoq_queue_info st;
    int round;

    for (round = 0; round < 10; round++) {
        consumer_run(g_srv.addr, path, 30000, 1500);
        st = stat_queue();
        if (st.ready + st.delayed + st.inflight == 0) {
            return;
        }
    }
    ck_abort_msg("drain: queue still holds ready %" PRIu64 " delayed %" PRIu64
                 " in flight %" PRIu64,
                 st.ready, st.delayed, st.inflight);
}
