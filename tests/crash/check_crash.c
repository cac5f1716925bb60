/*
 * check_crash.c: durability of protoqd under crashes (issue 3).
 *
 * crash_loop: CRASH_CYCLES (default 20) times: launch protoqd on the same
 *   data dir, fork a producer (pipelined publishes with confirms; every
 *   confirmed seq/id is appended to a file with write()) and a consumer
 *   (acks every delivery with a confirmed ack; records every delivery, every
 *   ack tried and every ack confirmed), let them run 50-500 ms (seeded
 *   random; the seed is printed, CRASH_SEED=N repeats it), SIGKILL the
 *   broker, reap the children (they must exit by themselves). Then a final
 *   drain, and the checker: lost, unexpected, corrupt, bad duplicates and
 *   message-id conflicts must all be 0.
 * sigterm_loop: the same with an orderly SIGTERM, which must exit 0.
 * corruption: a flipped byte inside an early segment stops the start with
 *   the file and offset named; --check-data fails. A torn tail of the last
 *   segment is truncated at start; every earlier confirmed message is there,
 *   and the log keeps working afterwards.
 *
 * Payloads are self-checking: 16 hex digits of seq, 4 of filler length,
 * the filler (derived from seq) and an FNV-1a checksum in 8 hex digits.
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

enum {
    SEQ_STRIDE = 1000000, /* seq = (cycle + 1) * SEQ_STRIDE + i */
    PROD_BURST = 32,      /* pipelined publishes per burst */
    PROD_PAUSE_MS = 10,   /* between bursts: ~3000 msg/s, which the
                             acking consumer keeps up with */
    CONS_PREFETCH = 32,
    CHILD_MAX_MS = 15000, /* a child gives up on its own after this */
    REAP_MS = 10000,      /* the parent waits this long for a child */
    PAYLOAD_MAX = 4200,
};

static const char QUEUE[] = "crash";

/* ------------------------------------------------------------ fixture */

static struct srv g_srv;
static char g_conf_dir[64];
static char g_conf[128];
static const char *const g_args[] = {"-c", g_conf, NULL};
static const char *const g_args_info[] = {"-c", g_conf, "--log-level", "info",
                                          NULL};

static const char CONF_TEXT[] =
    "# check_crash: small segments (many rolls and deletions), fast retries\n"
    "segment_bytes 65536\n"
    "backoff_base_ms 1\n"
    "backoff_cap_ms 5\n"
    "max_attempts 1000\n";

/* write_conf: the conf file shared by every test of this program (written
 * once by main, removed at its end, so a failed test leaks nothing). */
static int
write_conf(void)
{
    FILE *f;

    snprintf(g_conf_dir, sizeof(g_conf_dir), "/tmp/protoq-crashconf.XXXXXX");
    if (mkdtemp(g_conf_dir) == NULL) {
        perror("mkdtemp");
        return -1;
    }
    snprintf(g_conf, sizeof(g_conf), "%s/protoqd.conf", g_conf_dir);
    f = fopen(g_conf, "w");
    if (f == NULL) {
        perror(g_conf);
        return -1;
    }
    fputs(CONF_TEXT, f);
    return fclose(f) == 0 ? 0 : -1;
}

static void
remove_conf(void)
{
    unlink(g_conf);
    rmdir(g_conf_dir);
}

static void
setup(void)
{
    ck_assert_msg(srv_start(&g_srv, g_args) == 0,
                  "protoqd did not start (PROTOQD=%s)",
                  getenv("PROTOQD") ? getenv("PROTOQD") : "(unset)");
}

static void
teardown(void)
{
    srv_cleanup(&g_srv);
}

static void
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
static size_t
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
static pid_t
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
static int
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

static void
create_queue(void)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);

    pq_check_ok(c, protoq_queue_create(c, QUEUE, NULL));
    protoq_close(c);
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
static void
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

/* ------------------------------------------------------------- checker */

enum {
    F_CONFIRMED = 1,
    F_ACK_CONF = 2,
    F_ACK_TRIED = 4,
    F_IN_DRAIN = 8,
    F_DELIVERED = 16,
};

struct seqinfo {
    uint8_t flags;
    uint32_t n_deliv;
    uint64_t id; /* confirmed or first delivered id */
};

struct idpair {
    uint64_t id, seq;
};

struct checker {
    int cycles;            /* producer cycles: seq (c+1)*STRIDE + i */
    uint64_t *n_sent;      /* per cycle */
    struct seqinfo **info; /* per cycle, n_sent entries */
    struct idpair *pairs;
    size_t n_pairs, cap_pairs;
    /* results */
    uint64_t sent, confirmed, deliveries, distinct, acked;
    uint64_t lost, unexpected, corrupt, duplicates, bad_dups, id_conflicts;
    uint64_t ack_unknown, refused_acks, unconfirmed_delivered;
    char first_problem[256];
};

static void problem(struct checker *k, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void
problem(struct checker *k, const char *fmt, ...)
{
    va_list ap;

    if (k->first_problem[0] != '\0') {
        return;
    }
    va_start(ap, fmt);
    vsnprintf(k->first_problem, sizeof(k->first_problem), fmt, ap);
    va_end(ap);
}

static struct seqinfo *
lookup(struct checker *k, uint64_t seq)
{
    uint64_t c = seq / SEQ_STRIDE, i = seq % SEQ_STRIDE;

    if (c < 1 || c > (uint64_t)k->cycles || i >= k->n_sent[c - 1]) {
        return NULL;
    }
    return &k->info[c - 1][i];
}

static void
add_pair(struct checker *k, uint64_t id, uint64_t seq)
{
    if (k->n_pairs == k->cap_pairs) {
        k->cap_pairs = k->cap_pairs ? k->cap_pairs * 2 : 4096;
        k->pairs = realloc(k->pairs, k->cap_pairs * sizeof(*k->pairs));
        ck_assert_ptr_nonnull(k->pairs);
    }
    k->pairs[k->n_pairs].id = id;
    k->pairs[k->n_pairs].seq = seq;
    k->n_pairs++;
}

static void
checker_init(struct checker *k, int cycles)
{
    memset(k, 0, sizeof(*k));
    k->cycles = cycles;
    k->n_sent = calloc((size_t)cycles, sizeof(*k->n_sent));
    k->info = calloc((size_t)cycles, sizeof(*k->info));
    ck_assert(k->n_sent != NULL && k->info != NULL);
}

static void
checker_free(struct checker *k)
{
    int c;

    for (c = 0; c < k->cycles; c++) {
        free(k->info[c]);
    }
    free(k->info);
    free(k->n_sent);
    free(k->pairs);
}

/* Read a producer file: P lines give the sent count, C lines confirms. */
static void
read_producer(struct checker *k, int cycle, const char *path)
{
    char line[256];
    uint64_t n = 0;
    FILE *f = fopen(path, "r");

    if (f == NULL) {
        return;
    }
    while (fgets(line, sizeof(line), f) != NULL) {
        if (line[0] == 'P') {
            n++;
        }
    }
    k->n_sent[cycle] = n;
    k->sent += n;
    k->info[cycle] = calloc(n ? n : 1, sizeof(struct seqinfo));
    ck_assert_ptr_nonnull(k->info[cycle]);
    rewind(f);
    while (fgets(line, sizeof(line), f) != NULL) {
        unsigned long long seq, id;
        struct seqinfo *si;

        if (line[0] != 'C' || sscanf(line + 1, "%llu %llu", &seq, &id) != 2) {
            continue;
        }
        si = lookup(k, seq);
        if (si == NULL) {
            problem(k, "confirm of seq %llu that was never sent", seq);
            continue;
        }
        si->flags |= F_CONFIRMED;
        si->id = id;
        k->confirmed++;
        add_pair(k, id, seq);
    }
    fclose(f);
}

/* Read a consumer file in order; in_drain marks the final drain. */
static void
read_consumer(struct checker *k, const char *path, bool in_drain)
{
    char line[256];
    FILE *f = fopen(path, "r");

    if (f == NULL) {
        return;
    }
    while (fgets(line, sizeof(line), f) != NULL) {
        unsigned long long seq, id;
        unsigned attempt;
        int ok, code;
        struct seqinfo *si;

        switch (line[0]) {
        case 'D':
            if (sscanf(line + 1, "%llu %llu %u %d", &seq, &id, &attempt, &ok) !=
                4) {
                continue;
            }
            k->deliveries++;
            if (!ok) {
                k->corrupt++;
                problem(k, "corrupt payload, message id %llu", id);
                continue;
            }
            si = lookup(k, seq);
            if (si == NULL) {
                k->unexpected++;
                problem(k, "delivered seq %llu (id %llu) was never published",
                        seq, id);
                continue;
            }
            if (si->flags & F_ACK_CONF) {
                k->bad_dups++;
                problem(k,
                        "seq %llu (id %llu, attempt %u) delivered again "
                        "after its ack was confirmed",
                        seq, id, attempt);
            }
            if (si->n_deliv == 0) {
                k->distinct++;
                if (!(si->flags & F_CONFIRMED)) {
                    k->unconfirmed_delivered++;
                }
            } else {
                k->duplicates++;
            }
            si->n_deliv++;
            si->flags |= F_DELIVERED;
            if (in_drain) {
                si->flags |= F_IN_DRAIN;
            }
            add_pair(k, id, seq);
            break;
        case 'a':
        case 'A':
            if (sscanf(line + 1, "%llu %llu", &seq, &id) != 2 ||
                (si = lookup(k, seq)) == NULL) {
                continue;
            }
            si->flags |= line[0] == 'A' ? F_ACK_CONF : F_ACK_TRIED;
            if (line[0] == 'A') {
                k->acked++;
            }
            break;
        case 'E':
            if (sscanf(line + 1, "%llu %llu %d", &seq, &id, &code) == 3) {
                k->refused_acks++;
                problem(k, "ack of seq %llu id %llu refused with %s", seq, id,
                        protoq_code_name(code));
            }
            break;
        default:
            break;
        }
    }
    fclose(f);
}

static int
cmp_pair(const void *a, const void *b)
{
    const struct idpair *x = a, *y = b;

    if (x->id != y->id) {
        return x->id < y->id ? -1 : 1;
    }
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

static void
checker_finish(struct checker *k)
{
    int c;
    size_t i;

    for (c = 0; c < k->cycles; c++) {
        for (i = 0; i < k->n_sent[c]; i++) {
            struct seqinfo *si = &k->info[c][i];

            if (!(si->flags & F_CONFIRMED) || (si->flags & F_ACK_CONF) ||
                (si->flags & F_IN_DRAIN)) {
                continue;
            }
            if (si->flags & F_ACK_TRIED) {
                k->ack_unknown++; /* an ack was sent; it may have landed */
            } else {
                k->lost++;
                problem(k, "confirmed seq %" PRIu64 " (id %" PRIu64 ") lost",
                        (uint64_t)(c + 1) * SEQ_STRIDE + i, si->id);
            }
        }
    }
    /* one id, one message */
    qsort(k->pairs, k->n_pairs, sizeof(*k->pairs), cmp_pair);
    for (i = 1; i < k->n_pairs; i++) {
        if (k->pairs[i].id == k->pairs[i - 1].id &&
            k->pairs[i].seq != k->pairs[i - 1].seq) {
            k->id_conflicts++;
            problem(k,
                    "message id %" PRIu64 " used for seq %" PRIu64
                    " and seq %" PRIu64,
                    k->pairs[i].id, k->pairs[i - 1].seq, k->pairs[i].seq);
        }
    }
}

static void
checker_report(const struct checker *k, const char *name, int cycles,
               unsigned seed)
{
    printf("%s: seed %u cycles %d: sent %" PRIu64 " confirmed %" PRIu64
           " deliveries %" PRIu64 " distinct %" PRIu64 " acked %" PRIu64
           " | lost %" PRIu64 " unexpected %" PRIu64 " corrupt %" PRIu64
           " duplicates %" PRIu64 " (after a confirmed ack: %" PRIu64 ")"
           " id_conflicts %" PRIu64 " refused_acks %" PRIu64
           " | ack_unconfirmed_gone %" PRIu64 " unconfirmed_delivered %" PRIu64
           "\n",
           name, seed, cycles, k->sent, k->confirmed, k->deliveries,
           k->distinct, k->acked, k->lost, k->unexpected, k->corrupt,
           k->duplicates, k->bad_dups, k->id_conflicts, k->refused_acks,
           k->ack_unknown, k->unconfirmed_delivered);
    fflush(stdout);
}

static void
checker_assert(const struct checker *k)
{
    ck_assert_msg(k->confirmed > 0, "no publish was ever confirmed");
    ck_assert_msg(k->acked > 0, "no ack was ever confirmed");
    ck_assert_msg(k->lost == 0 && k->unexpected == 0 && k->corrupt == 0 &&
                      k->bad_dups == 0 && k->id_conflicts == 0 &&
                      k->refused_acks == 0,
                  "lost %" PRIu64 " unexpected %" PRIu64 " corrupt %" PRIu64
                  " bad duplicates %" PRIu64 " id conflicts %" PRIu64
                  " refused acks %" PRIu64 "; first: %s",
                  k->lost, k->unexpected, k->corrupt, k->bad_dups,
                  k->id_conflicts, k->refused_acks, k->first_problem);
}

/* ------------------------------------------------------------ the loops */

static int
env_int(const char *name, int dflt, int lo, int hi)
{
    const char *v = getenv(name);
    long n;

    if (v == NULL || v[0] == '\0') {
        return dflt;
    }
    n = strtol(v, NULL, 10);
    return n < lo ? lo : n > hi ? hi : (int)n;
}

static unsigned
crash_seed(void)
{
    const char *v = getenv("CRASH_SEED");

    if (v != NULL && v[0] != '\0') {
        return (unsigned)strtoul(v, NULL, 10);
    }
    return (unsigned)time(NULL) ^ ((unsigned)getpid() << 16);
}

static uint32_t
rnd(uint64_t *state)
{
    uint64_t x = *state;

    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    return (uint32_t)(x >> 32);
}

/*
 * Failpoint mode of run_cycles: each cycle launches the broker with
 * PROTOQ_FAILPOINT=NAME:N (N random in fp_lo..fp_hi), so it kills itself
 * at that point; if it has not died after the cycle's run time plus a
 * bounded wait, it is killed -9 like a plain cycle.
 */
static const char *g_fp_name;
static int g_fp_lo, g_fp_hi;
static int g_fp_fired;

/* wait_self_kill: true when the broker died by itself within ms. */
static bool
wait_self_kill(int ms)
{
    int64_t deadline = now_ms_mono() + ms;
    int st;

    while (now_ms_mono() < deadline) {
        if (waitpid(g_srv.pid, &st, WNOHANG) == g_srv.pid) {
            g_srv.pid = 0;
            return true;
        }
        sleep_ms(5);
    }
    return false;
}

/* launch_armed: (re)start the broker with the failpoint armed. */
static int
launch_armed(uint64_t *state)
{
    char spec[96];
    int n = g_fp_lo + (int)(rnd(state) % (uint32_t)(g_fp_hi - g_fp_lo + 1));
    int rc;

    snprintf(spec, sizeof(spec), "%s:%d", g_fp_name, n);
    setenv("PROTOQ_FAILPOINT", spec, 1);
    rc = srv_launch(&g_srv);
    unsetenv("PROTOQ_FAILPOINT");
    return rc;
}

/*
 * run_cycles: cycles times: (re)launch, producer + consumer for a random
 * lo..hi ms, then stop the broker with kill -9 (sigterm false) or SIGTERM
 * (true; must exit 0), or let an armed failpoint crash it (g_fp_name).
 * Then the final drain and the checker.
 */
static void
run_cycles(const char *name, int cycles, bool sigterm, int lo, int hi)
{
    unsigned seed = crash_seed();
    uint64_t state = ((uint64_t)seed << 1) | 1;
    struct checker k;
    char path[400];
    int cyc;

    printf("%s: seed %u (CRASH_SEED=%u repeats it), %d cycles\n", name, seed,
           seed, cycles);
    fflush(stdout);
    for (cyc = 0; cyc < cycles; cyc++) {
        char ppath[400], cpath[400];
        int run_ms = lo + (int)(rnd(&state) % (uint32_t)(hi - lo + 1));
        pid_t prod, cons;

        if (g_fp_name != NULL) {
            if (cyc == 0) {
                ck_assert_int_eq(srv_stop(&g_srv), 0);
            }
            ck_assert_msg(launch_armed(&state) == 0,
                          "cycle %d: protoqd did not come back after "
                          "failpoint %s (seed %u)",
                          cyc, g_fp_name, seed);
        } else if (cyc > 0) {
            ck_assert_msg(srv_launch(&g_srv) == 0,
                          "cycle %d: protoqd did not come back after %s "
                          "(seed %u)",
                          cyc, sigterm ? "SIGTERM" : "kill -9", seed);
        }
        create_queue();
        snprintf(ppath, sizeof(ppath), "%s/prod-%04d.log", g_srv.dir, cyc);
        snprintf(cpath, sizeof(cpath), "%s/cons-%04d.log", g_srv.dir, cyc);
        cons = spawn('c', cpath, 0);
        prod = spawn('p', ppath, (uint64_t)(cyc + 1) * SEQ_STRIDE);
        if (g_fp_name != NULL) {
            if (wait_self_kill(run_ms + 1500)) {
                g_fp_fired++;
            } else {
                srv_kill9(&g_srv);
            }
        } else {
            sleep_ms(run_ms);
            if (sigterm) {
                int rc = srv_stop(&g_srv);

                ck_assert_msg(rc == 0,
                              "cycle %d: protoqd exit status %d "
                              "after SIGTERM, want 0 (seed %u)",
                              cyc, rc, seed);
            } else {
                srv_kill9(&g_srv);
            }
        }
        reap(prod, "producer", cyc);
        reap(cons, "consumer", cyc);
    }
    ck_assert_msg(srv_launch(&g_srv) == 0,
                  "protoqd did not start for the "
                  "final drain (seed %u)",
                  seed);
    create_queue();
    snprintf(path, sizeof(path), "%s/drain.log", g_srv.dir);
    drain(path);

    checker_init(&k, cycles);
    for (cyc = 0; cyc < cycles; cyc++) {
        snprintf(path, sizeof(path), "%s/prod-%04d.log", g_srv.dir, cyc);
        read_producer(&k, cyc, path);
    }
    for (cyc = 0; cyc < cycles; cyc++) {
        snprintf(path, sizeof(path), "%s/cons-%04d.log", g_srv.dir, cyc);
        read_consumer(&k, path, false);
    }
    snprintf(path, sizeof(path), "%s/drain.log", g_srv.dir);
    read_consumer(&k, path, true);
    checker_finish(&k);
    checker_report(&k, name, cycles, seed);
    checker_assert(&k);
    checker_free(&k);
}

/* One failpoint, many cycles; it must have fired in some of them, or the
 * test proved nothing. */
static void
run_failpoint(const char *fp, int lo, int hi)
{
    char name[64];

    g_fp_name = fp;
    g_fp_lo = lo;
    g_fp_hi = hi;
    g_fp_fired = 0;
    snprintf(name, sizeof(name), "failpoint %s", fp);
    run_cycles(name, env_int("FAILPOINT_CYCLES", 6, 1, 10000), false, 100, 300);
    printf("failpoint %s: fired in %d cycles\n", fp, g_fp_fired);
    ck_assert_msg(g_fp_fired > 0, "failpoint %s never fired", fp);
    g_fp_name = NULL;
}

START_TEST(test_failpoint_write_before_sync)
{
    run_failpoint("write-before-sync", 3, 40);
}
END_TEST

START_TEST(test_failpoint_sync_before_confirm)
{
    run_failpoint("sync-before-confirm", 3, 40);
}
END_TEST

START_TEST(test_failpoint_segment_roll)
{
    run_failpoint("segment-roll", 1, 4);
}
END_TEST

/* pin_old_segment: 400 messages in a queue nobody consumes, each between
 * eight of a filler queue that is then purged: every 64 KiB segment keeps
 * a few live messages among mostly dead bytes. Such segments can neither
 * be deleted nor be ignored (live bytes are far under half the log), so
 * compaction must move their messages on its first pass after a start
 * (and reach its failpoint), however little the crash traffic of a loaded
 * machine adds. */
static void
pin_old_segment(void)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_message m;
    char buf[1024];
    uint64_t purged = 0;

    memset(buf, 'p', sizeof(buf));
    memset(&m, 0, sizeof(m));
    m.payload = buf;
    m.len = sizeof(buf);
    pq_check_ok(c, protoq_queue_create(c, "pinned", NULL));
    pq_check_ok(c, protoq_queue_create(c, "filler", NULL));
    for (int i = 0; i < 400; i++) {
        pq_check_ok(c, protoq_publish(c, "pinned", &m, NULL));
        for (int k = 0; k < 8; k++) {
            pq_check_ok(c, protoq_publish_async(c, "filler", &m, NULL, NULL));
        }
        pq_check_ok(c, protoq_wait_confirms(c, 0, 10000));
    }
    ck_assert_uint_eq(protoq_async_errors(c), 0);
    pq_check_ok(c, protoq_queue_purge(c, "filler", &purged));
    ck_assert_uint_eq(purged, 400 * 8);
    protoq_close(c);
}

START_TEST(test_failpoint_compaction)
{
    pin_old_segment();
    /* A pass compacts one segment a second, 6-7 messages here: crash at
     * one of the first 5, so the first pass after each start fires. */
    run_failpoint("compaction", 1, 5);
}
END_TEST

/* ---------------------------------------------------------- disk full */

/*
 * A real small disk: a 24 MiB tmpfs mounted for the test (CI runs as
 * root; elsewhere the test says so and passes without running). Publishes
 * fill it until the broker answers DISK_FULL, never a confirm for what it
 * could not store; acks keep working; a purge frees segments and
 * publishing resumes by itself; what was confirmed and not purged or
 * acked survives a kill -9.
 */
static char g_tmpfs[128];
static char g_tmpfs_data[160];
static const char *const g_tmpfs_args[] = {"-c", g_conf, "--data-dir",
                                           g_tmpfs_data, NULL};

static bool
mount_tmpfs(void)
{
    char cmd[256];

    snprintf(g_tmpfs, sizeof(g_tmpfs), "/tmp/protoq-tmpfs.XXXXXX");
    if (geteuid() != 0 || mkdtemp(g_tmpfs) == NULL) {
        g_tmpfs[0] = '\0';
        return false;
    }
    snprintf(cmd, sizeof(cmd),
             "mount -t tmpfs -o size=24m tmpfs %s "
             "2>/dev/null",
             g_tmpfs);
    if (system(cmd) != 0) {
        rmdir(g_tmpfs);
        g_tmpfs[0] = '\0';
        return false;
    }
    snprintf(g_tmpfs_data, sizeof(g_tmpfs_data), "%s/data", g_tmpfs);
    return true;
}

static void
setup_disk_full(void)
{
    memset(&g_srv, 0, sizeof(g_srv));
    if (mount_tmpfs()) {
        ck_assert_msg(srv_start(&g_srv, g_tmpfs_args) == 0,
                      "protoqd did not start on the tmpfs");
    }
}

static void
teardown_disk_full(void)
{
    char cmd[256];

    srv_cleanup(&g_srv);
    if (g_tmpfs[0] != '\0') {
        snprintf(cmd, sizeof(cmd), "umount %s 2>/dev/null", g_tmpfs);
        if (system(cmd) == 0) {
            rmdir(g_tmpfs);
        }
        g_tmpfs[0] = '\0';
    }
}

/* publish_one: PQ_OK, or the broker's wire code negated on an Error. */
static int
publish_one(protoq_client *c, const char *q, const char *buf, size_t len)
{
    struct protoq_message m;
    int rc;

    memset(&m, 0, sizeof(m));
    m.payload = buf;
    m.len = len;
    rc = protoq_publish(c, q, &m, NULL);
    return rc == PQ_EREMOTE ? -protoq_last_error_code(c) : rc;
}

struct df_got {
    uint64_t id;
    uint32_t attempt;
    int n;
};

static void
on_df_deliver(void *arg, protoq_client *c, const struct protoq_delivery *d)
{
    struct df_got *g = arg;

    (void)c;
    g->id = d->message_id;
    g->attempt = d->attempt;
    g->n++;
}

START_TEST(test_disk_full_refuses_publishes_keeps_acks_and_recovers)
{
    static char buf[4096];
    struct protoq_queue_info st;
    struct df_got got = {0};
    uint64_t confirmed = 0, purged = 0;
    protoq_client *c;
    int rc = PQ_OK, i;

    if (g_tmpfs[0] == '\0') {
        printf("disk_full: skipped (needs root to mount a tmpfs)\n");
        return;
    }
    c = pq_connect_or_fail(&g_srv);
    memset(buf, 'f', sizeof(buf));
    pq_check_ok(c, protoq_queue_create(c, "keep", NULL));
    pq_check_ok(c, protoq_queue_create(c, "fill", NULL));
    for (i = 0; i < 3; i++) {
        ck_assert_int_eq(publish_one(c, "keep", "kept", 4), PQ_OK);
    }
    /* 24 MiB hold a few thousand of these; bounded at 20,000. */
    for (i = 0; i < 20000; i++) {
        rc = publish_one(c, "fill", buf, sizeof(buf));
        if (rc != PQ_OK) {
            break;
        }
        confirmed++;
    }
    ck_assert_msg(rc == -PROTOQ_CODE_DISK_FULL, "want DISK_FULL, got %d (%s)",
                  rc, protoq_errmsg(c));
    ck_assert_uint_gt(confirmed, 100);
    /* Every confirm was stored: the queue holds exactly that many. */
    pq_check_ok(c, protoq_queue_stat(c, "fill", &st));
    ck_assert_uint_eq(st.ready, confirmed);
    /* Still full: refused again, never a confirm. */
    ck_assert_int_eq(publish_one(c, "fill", buf, sizeof(buf)),
                     -PROTOQ_CODE_DISK_FULL);
    /* Acks keep working on the full disk (each PUBLISH reserved its ACK),
     * and a confirmed ack is durable. */
    pq_check_ok(
        c, protoq_subscribe(c, "keep", 1, NULL, 0, on_df_deliver, &got, NULL));
    for (i = 0; i < 100 && got.n == 0; i++) {
        ck_assert_int_ge(protoq_poll(c, 50), 0);
    }
    ck_assert_int_eq(got.n, 1);
    pq_check_ok(c, protoq_ack_sync(c, got.id, got.attempt));
    /* A purge frees the segments; publishing resumes by itself. */
    pq_check_ok(c, protoq_queue_purge(c, "fill", &purged));
    ck_assert_uint_eq(purged, confirmed);
    for (i = 0; i < 300; i++) {
        rc = publish_one(c, "fill", buf, 100);
        if (rc == PQ_OK) {
            break;
        }
        sleep_ms(20);
    }
    ck_assert_msg(rc == PQ_OK,
                  "publishing did not resume after the purge "
                  "(%d: %s)",
                  rc, protoq_errmsg(c));
    protoq_close(c);
    /* Confirmed and neither purged nor acked: still there after kill -9.
     * The unacked "keep" delivery comes back too (2 of 3 left). */
    srv_kill9(&g_srv);
    ck_assert_int_eq(srv_launch(&g_srv), 0);
    c = pq_connect_or_fail(&g_srv);
    pq_check_ok(c, protoq_queue_stat(c, "keep", &st));
    ck_assert_uint_eq(st.ready + st.delayed, 2);
    pq_check_ok(c, protoq_queue_stat(c, "fill", &st));
    ck_assert_uint_eq(st.ready, 1);
    protoq_close(c);
}
END_TEST

START_TEST(test_kill9_loop_loses_no_confirmed_message)
{
    run_cycles("crash_loop", env_int("CRASH_CYCLES", 20, 1, 100000), false, 50,
               500);
}
END_TEST

START_TEST(test_sigterm_mid_load_then_restart_is_clean)
{
    run_cycles("sigterm_loop", 3, true, 100, 400);
}
END_TEST

/* --------------------------------------------------------- data files */

/* Segment files of the data dir, sorted (the name sorts by sequence). */
static int
list_segments(char names[][64], int max)
{
    DIR *d = opendir(g_srv.data_dir);
    struct dirent *e;
    int n = 0, i, j;

    ck_assert_ptr_nonnull(d);
    while ((e = readdir(d)) != NULL && n < max) {
        size_t len = strlen(e->d_name);

        if (strncmp(e->d_name, "seg-", 4) == 0 && len > 8 && len < 64 &&
            strcmp(e->d_name + len - 4, ".log") == 0) {
            snprintf(names[n++], 64, "%s", e->d_name);
        }
    }
    closedir(d);
    for (i = 1; i < n; i++) {
        for (j = i; j > 0 && strcmp(names[j - 1], names[j]) > 0; j--) {
            char t[64];

            memcpy(t, names[j], 64);
            memcpy(names[j], names[j - 1], 64);
            memcpy(names[j - 1], t, 64);
        }
    }
    return n;
}

/* Record offsets of one segment (header "u32 len | u32 crc | u8 type |
 * body[len-1]", after a 20-byte segment header; zeros end the data).
 * Returns the count; *end gets the offset after the last record. */
static int
segment_records(const char *name, long *offs, int max, long *end)
{
    char path[400];
    uint8_t hdr[8];
    FILE *f;
    long off = 20, size;
    int n = 0;

    snprintf(path, sizeof(path), "%s/%s", g_srv.data_dir, name);
    f = fopen(path, "rb");
    ck_assert_ptr_nonnull(f);
    fseek(f, 0, SEEK_END);
    size = ftell(f);
    while (n < max && off + 8 <= size) {
        uint32_t len;

        fseek(f, off, SEEK_SET);
        if (fread(hdr, 1, 8, f) != 8) {
            break;
        }
        len = (uint32_t)hdr[0] | (uint32_t)hdr[1] << 8 |
              (uint32_t)hdr[2] << 16 | (uint32_t)hdr[3] << 24;
        if (len == 0 || off + 8 + (long)len > size) {
            break;
        }
        offs[n++] = off;
        off += 8 + (long)len;
    }
    fclose(f);
    *end = off;
    return n;
}

/* xor_byte: XOR the byte at off of data/name with x. */
static void
xor_byte(const char *name, long off, uint8_t x)
{
    char path[400];
    uint8_t b;
    int fd;

    snprintf(path, sizeof(path), "%s/%s", g_srv.data_dir, name);
    fd = open(path, O_RDWR);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(pread(fd, &b, 1, off), 1);
    b ^= x;
    ck_assert_int_eq(pwrite(fd, &b, 1, off), 1);
    ck_assert_int_eq(fsync(fd), 0);
    close(fd);
}

/* run_prog: run argv with stdout and stderr into outpath, at most
 * timeout_ms. Returns the exit status, 128+sig, or -1 when it had to be
 * killed because it was still running. */
static int
run_prog(const char *const *argv, const char *outpath, int timeout_ms)
{
    int64_t deadline = now_ms_mono() + timeout_ms;
    int status = 0, i;
    pid_t pid = fork();

    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        int fd = open(outpath, O_WRONLY | O_CREAT | O_TRUNC, 0644);

        if (fd >= 0) {
            dup2(fd, STDOUT_FILENO);
            dup2(fd, STDERR_FILENO);
        }
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    for (i = 0; i < 1000000; i++) {
        if (waitpid(pid, &status, WNOHANG) == pid) {
            return WIFEXITED(status) ? WEXITSTATUS(status)
                                     : 128 + WTERMSIG(status);
        }
        if (now_ms_mono() >= deadline) {
            break;
        }
        sleep_ms(5);
    }
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    return -1;
}

static const char *
protoqd_bin(void)
{
    const char *p = getenv("PROTOQD");

    return p && p[0] ? p : "build/protoqd";
}

static char *
slurp(const char *path)
{
    static char buf[65536];
    FILE *f = fopen(path, "r");
    size_t n = 0;

    buf[0] = '\0';
    if (f != NULL) {
        n = fread(buf, 1, sizeof(buf) - 1, f);
        buf[n] = '\0';
        fclose(f);
    }
    return buf;
}

static int
check_data(char *out_path, size_t cap)
{
    const char *argv[] = {protoqd_bin(), "--check-data", g_srv.data_dir, NULL};

    snprintf(out_path, cap, "%s/check-data.out", g_srv.dir);
    return run_prog(argv, out_path, 10000);
}

/* publish_seqs: publish seq first..first+n-1 (minpad filler) pipelined;
 * every one must be confirmed. */
static void
publish_seqs(uint64_t first, uint64_t n, size_t minpad)
{
    static char buf[PAYLOAD_MAX];
    protoq_client *c = pq_connect_or_fail(&g_srv);
    uint64_t i;

    pq_check_ok(c, protoq_queue_create(c, QUEUE, NULL));
    for (i = 0; i < n; i++) {
        struct protoq_message m;

        memset(&m, 0, sizeof(m));
        m.len = make_payload(first + i, minpad, buf);
        m.payload = buf;
        pq_check_ok(c, protoq_publish_async(c, QUEUE, &m, NULL, NULL));
        if (protoq_outstanding(c) >= 64) {
            pq_check_ok(c, protoq_wait_confirms(c, 32, 10000));
        }
    }
    pq_check_ok(c, protoq_wait_confirms(c, 0, 10000));
    protoq_close(c);
}

/* drain_seqs: drain the queue; mark seqs first..first+n-1 found in seen
 * (n entries); fail on corrupt or foreign payloads. Returns deliveries. */
static uint64_t
drain_seqs(uint64_t first, uint64_t n, bool *seen, const char *tag)
{
    char path[400], line[256];
    uint64_t got = 0;
    FILE *f;

    snprintf(path, sizeof(path), "%s/drain-%s.log", g_srv.dir, tag);
    unlink(path);
    drain(path);
    f = fopen(path, "r");
    ck_assert_ptr_nonnull(f);
    while (fgets(line, sizeof(line), f) != NULL) {
        unsigned long long seq, id;
        unsigned attempt;
        int ok;

        if (line[0] != 'D' || sscanf(line + 1, "%llu %llu %u %d", &seq, &id,
                                     &attempt, &ok) != 4) {
            continue;
        }
        ck_assert_msg(ok, "%s: corrupt payload (id %llu)", tag, id);
        ck_assert_msg(seq >= first && seq < first + n,
                      "%s: unexpected seq %llu", tag, seq);
        seen[seq - first] = true;
        got++;
    }
    fclose(f);
    return got;
}

START_TEST(test_flipped_byte_in_early_segment_stops_start)
{
    enum { N = 400 };
    char segs[64][64], out[400], needle[64];
    const char *argv[12];
    long offs[512], end, rec_off, flip_off;
    char portfile[400], logpath[400];
    bool seen[N];
    const char *log;
    int nseg, nrec, rc, i;

    publish_seqs(1, N, 800); /* ~1 KiB each: several 64 KiB segments */
    ck_assert_int_eq(srv_stop(&g_srv), 0);
    nseg = list_segments(segs, 64);
    ck_assert_msg(nseg >= 3, "want >= 3 segments, have %d", nseg);
    ck_assert_msg(check_data(out, sizeof(out)) == 0,
                  "--check-data on clean data failed: %s", slurp(out));

    nrec = segment_records(segs[0], offs, 512, &end);
    ck_assert_msg(nrec >= 10, "%s holds %d records", segs[0], nrec);
    rec_off = offs[nrec / 2];
    flip_off = rec_off + 9 + 100; /* inside the body of a middle record */
    ck_assert_int_lt(flip_off, offs[nrec / 2 + 1]);
    xor_byte(segs[0], flip_off, 0x5a);

    /* protoqd must refuse to start, naming the file and the offset. */
    snprintf(portfile, sizeof(portfile), "%s/port", g_srv.dir);
    snprintf(logpath, sizeof(logpath), "%s/corrupt-start.log", g_srv.dir);
    unlink(portfile);
    i = 0;
    argv[i++] = protoqd_bin();
    argv[i++] = "-c";
    argv[i++] = g_conf;
    argv[i++] = "--listen";
    argv[i++] = "127.0.0.1:0";
    argv[i++] = "--port-file";
    argv[i++] = portfile;
    argv[i++] = "--data-dir";
    argv[i++] = g_srv.data_dir;
    argv[i] = NULL;
    rc = run_prog(argv, logpath, 5000);
    log = slurp(logpath);
    ck_assert_msg(rc != -1,
                  "protoqd started on a segment with a flipped byte "
                  "(%s offset %ld); log: %s",
                  segs[0], flip_off, log);
    ck_assert_msg(rc != 0, "protoqd exited 0 on corrupt data; log: %s", log);
    ck_assert_msg(strstr(log, segs[0]) != NULL,
                  "start log does not name %s: %s", segs[0], log);
    {
        char a[32], b[32], c[32], d[32];

        snprintf(a, sizeof(a), "%ld", rec_off);
        snprintf(b, sizeof(b), "%ld", flip_off);
        snprintf(c, sizeof(c), "0x%lx", rec_off);
        snprintf(d, sizeof(d), "0x%lx", flip_off);
        ck_assert_msg(strstr(log, a) || strstr(log, b) || strstr(log, c) ||
                          strstr(log, d),
                      "start log does not name the offset "
                      "(record at %ld, byte at %ld): %s",
                      rec_off, flip_off, log);
    }
    rc = check_data(out, sizeof(out));
    ck_assert_msg(rc != 0 && rc != -1,
                  "--check-data exit %d on corrupt data: "
                  "%s",
                  rc, slurp(out));
    ck_assert_msg(strstr(slurp(out), segs[0]) != NULL,
                  "--check-data output does not name %s: %s", segs[0],
                  slurp(out));

    /* Undo the damage: everything is back. */
    xor_byte(segs[0], flip_off, 0x5a);
    ck_assert_msg(check_data(out, sizeof(out)) == 0,
                  "--check-data after repair: %s", slurp(out));
    ck_assert_int_eq(srv_launch(&g_srv), 0);
    memset(seen, 0, sizeof(seen));
    snprintf(needle, sizeof(needle), "repaired");
    ck_assert_uint_eq(drain_seqs(1, N, seen, needle), N);
    for (i = 0; i < N; i++) {
        ck_assert_msg(seen[i], "seq %d missing after repair", i + 1);
    }
}
END_TEST

static bool
contains_ci(const char *hay, const char *needle)
{
    size_t n = strlen(needle);

    for (; *hay; hay++) {
        if (strncasecmp(hay, needle, n) == 0) {
            return true;
        }
    }
    return false;
}

/* _i = 0: the file is cut 3 bytes into the last record; _i = 1: the last 3
 * bytes of the last record are damaged (the preallocated zeros follow). */
START_TEST(test_torn_tail_is_truncated_and_earlier_messages_survive)
{
    enum { N = 50, M = 10 };
    char segs[64][64], out[400], path[400], logp[400];
    long offs[4096], end;
    bool seen[N + M];
    const char *log;
    int nseg, nrec = 0, last = -1, i;

    publish_seqs(1, N, 0);
    ck_assert_int_eq(srv_stop(&g_srv), 0);
    nseg = list_segments(segs, 64);
    ck_assert_int_ge(nseg, 1);
    for (i = nseg - 1; i >= 0; i--) {
        nrec = segment_records(segs[i], offs, 4096, &end);
        if (nrec > 0) {
            last = i;
            break;
        }
    }
    ck_assert_msg(last >= 0, "no segment holds records");
    snprintf(path, sizeof(path), "%s/%s", g_srv.data_dir, segs[last]);
    if (_i == 0) {
        ck_assert_int_eq(truncate(path, end - 3), 0);
    } else {
        xor_byte(segs[last], end - 1, 0xff);
        xor_byte(segs[last], end - 2, 0xff);
        xor_byte(segs[last], end - 3, 0xff);
    }
    ck_assert_msg(check_data(out, sizeof(out)) == 0,
                  "--check-data on a torn "
                  "tail (which a start repairs) failed: %s",
                  slurp(out));

    srv_log_path(&g_srv, logp, sizeof(logp));
    unlink(logp);
    g_srv.extra_args = g_args_info;
    ck_assert_msg(srv_launch(&g_srv) == 0,
                  "protoqd did not start with a torn "
                  "tail in %s",
                  segs[last]);
    g_srv.extra_args = g_args;
    log = slurp(logp);
    ck_assert_msg(strstr(log, segs[last]) != NULL &&
                      (contains_ci(log, "trunc") || contains_ci(log, "torn")),
                  "the log does not report truncating %s: %s", segs[last], log);

    memset(seen, 0, sizeof(seen));
    drain_seqs(1, N, seen, "torn");
    for (i = 0; i < N - 1; i++) {
        ck_assert_msg(seen[i], "confirmed seq %d lost with the torn tail",
                      i + 1);
    }

    /* The log goes on after the cut: new records land and survive kill -9. */
    publish_seqs(N + 1, M, 0);
    srv_kill9(&g_srv);
    ck_assert_int_eq(srv_launch(&g_srv), 0);
    memset(seen, 0, sizeof(seen));
    ck_assert_uint_eq(drain_seqs(1, N + M, seen, "after"), M);
    for (i = N; i < N + M; i++) {
        ck_assert_msg(seen[i], "seq %d published after the repair is lost",
                      i + 1);
    }
}
END_TEST

/*
 * Disk use stays proportional to live data (DESIGN.md, Storage). A segment
 * is preallocated with room for the ACK reserve of every live message;
 * once it is sealed (the log moved on) that room is never written, so it
 * must be given back, or every segment carries 2 x 64 B x live messages of
 * zeros and disk use grows with live x segments.
 */
START_TEST(test_sealed_segments_give_back_preallocated_room)
{
    enum { N = 10000 };
    char segs[512][64], path[400], worst[64] = "";
    long offs[4096], end;
    uint64_t data = 0, disk = 0, worst_disk = 0, worst_end = 0;
    int nseg, i;

    publish_seqs(1, N, 0); /* ~3 MB of live messages in 64 KiB segments */
    nseg = list_segments(segs, 512);
    ck_assert_msg(nseg >= 10, "want >= 10 segments, have %d", nseg);
    /* Every segment but the last two (current and spare) is sealed. */
    for (i = 0; i < nseg - 2; i++) {
        struct stat sb;
        uint64_t used;

        snprintf(path, sizeof(path), "%s/%.63s", g_srv.data_dir, segs[i]);
        ck_assert_int_eq(stat(path, &sb), 0);
        segment_records(segs[i], offs, 4096, &end);
        used = (uint64_t)sb.st_blocks * 512;
        data += (uint64_t)end;
        disk += used;
        if (used > (uint64_t)end + 65536 &&
            used - (uint64_t)end > worst_disk - worst_end) {
            snprintf(worst, sizeof(worst), "%.63s", segs[i]);
            worst_disk = used;
            worst_end = (uint64_t)end;
        }
    }
    printf("sealed segments: %d, records %" PRIu64 " bytes, on disk %" PRIu64
           " bytes\n",
           nseg - 2, data, disk);
    ck_assert_msg(worst[0] == '\0' && disk <= 2 * data + 65536,
                  "%d sealed segments hold %" PRIu64 " bytes of records but "
                  "occupy %" PRIu64 " bytes on disk; e.g. %s: records end at "
                  "%" PRIu64 ", %" PRIu64 " bytes allocated (preallocated "
                  "reserve room is never trimmed)",
                  nseg - 2, data, disk, worst[0] ? worst : "-", worst_end,
                  worst_disk);
}
END_TEST

/*
 * A batch whose records straddle a segment roll: its first record ends one
 * segment, the rest start the next. The first segment's write can complete
 * (and its garbage collection run) before the whole publish is durable,
 * when nothing has taken a reference on that record yet: the segment was
 * deleted under a confirmed message, which a kill -9 then lost (found by
 * the model-based test, tests/model). Each round: a small message to
 * "keep" and three 15000-byte ones to "filler" in one batch, then filler
 * purged, so only keep's messages hold the old segments.
 */
START_TEST(test_batch_across_segment_roll_survives_kill9)
{
    enum { ROUNDS = 40, BIG = 15000 };
    static char big[BIG];
    const char *const qs[4] = {"keep", "filler", "filler", "filler"};
    struct protoq_message m[4];
    struct protoq_queue_info qi;
    protoq_client *c = pq_connect_or_fail(&g_srv);
    uint64_t purged;
    char small[32];

    pq_check_ok(c, protoq_queue_create(c, "keep", NULL));
    pq_check_ok(c, protoq_queue_create(c, "filler", NULL));
    memset(big, 'f', sizeof(big));
    memset(m, 0, sizeof(m));
    for (int i = 1; i < 4; i++) {
        m[i].payload = big;
        m[i].len = sizeof(big);
    }
    for (int r = 0; r < ROUNDS; r++) {
        snprintf(small, sizeof(small), "keep-%d", r);
        m[0].payload = small;
        m[0].len = strlen(small);
        pq_check_ok(c, protoq_publish_batch_multi(c, qs, m, 4, NULL));
        pq_check_ok(c, protoq_queue_purge(c, "filler", &purged));
        ck_assert_uint_eq(purged, 3);
        if (r % 4 != 3) {
            continue;
        }
        /* keep holds this round's messages only: every older segment is
         * free, the newest keep message may sit in one */
        protoq_close(c);
        srv_kill9(&g_srv);
        ck_assert_msg(srv_launch(&g_srv) == 0, "protoqd did not start again");
        c = pq_connect_or_fail(&g_srv);
        pq_check_ok(c, protoq_queue_stat(c, "keep", &qi));
        ck_assert_msg(qi.ready == 4,
                      "round %d: keep has %" PRIu64 " of its 4 "
                      "confirmed messages after kill -9",
                      r, qi.ready);
        pq_check_ok(c, protoq_queue_purge(c, "keep", &purged));
    }
    protoq_close(c);
}
END_TEST

/* ---------------------------------------------------------------- main */

static Suite *
crash_suite(void)
{
    Suite *s = suite_create("crash");
    int cycles = env_int("CRASH_CYCLES", 20, 1, 100000);
    TCase *tc;

    tc = tcase_create("kill9_loop");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60 + cycles * 4);
    tcase_add_test(tc, test_kill9_loop_loses_no_confirmed_message);
    suite_add_tcase(s, tc);

    tc = tcase_create("failpoints");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_failpoint_write_before_sync);
    tcase_add_test(tc, test_failpoint_sync_before_confirm);
    tcase_add_test(tc, test_failpoint_segment_roll);
    tcase_add_test(tc, test_failpoint_compaction);
    suite_add_tcase(s, tc);

    tc = tcase_create("disk_full");
    tcase_add_checked_fixture(tc, setup_disk_full, teardown_disk_full);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc,
                   test_disk_full_refuses_publishes_keeps_acks_and_recovers);
    suite_add_tcase(s, tc);

    tc = tcase_create("sigterm");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_sigterm_mid_load_then_restart_is_clean);
    suite_add_tcase(s, tc);

    tc = tcase_create("damaged_data");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_flipped_byte_in_early_segment_stops_start);
    tcase_add_loop_test(
        tc, test_torn_tail_is_truncated_and_earlier_messages_survive, 0, 2);
    suite_add_tcase(s, tc);

    tc = tcase_create("segment_gc");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_batch_across_segment_roll_survives_kill9, 0,
                        5);
    suite_add_tcase(s, tc);

    tc = tcase_create("disk_use");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_sealed_segments_give_back_preallocated_room);
    suite_add_tcase(s, tc);
    return s;
}

int
main(void)
{
    SRunner *sr;
    int failed;

    if (write_conf() != 0) {
        return EXIT_FAILURE;
    }
    sr = srunner_create(crash_suite());
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    remove_conf();
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
