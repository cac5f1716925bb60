/*
 * check_delivery.c: publishing and consuming against a real protoqd on
 * loopback: the walk-through through libprotoq and the protoq CLI, batches,
 * sharing and credit between consumers, redelivery (disconnect, nack,
 * backoff), stale tokens and priority.
 *
 * Every test gets a fresh broker (server_fixture.h) and every wait is
 * bounded. PROTOQD names the broker binary, PROTOQ the CLI.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <check.h>

#include "pqlimits.h"
#include "pbwire.h"
#include "testutil.h"
#include "server_fixture.h"

static void
setup_server_fast_retry(void)
{
    start_with_conf("backoff_base_ms 0\n");
}

/* ========================================================= walk-through */

START_TEST(test_100k_pipelined_publishes_consumed_in_order)
{
    enum { N = 100000 };
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_info qi;
    struct pubset ps;
    uint64_t prev = 0;
    size_t unordered = 0;

    pq_check_ok(c, protoq_queue_create(c, "walk", NULL));
    pubset_init(&ps, c, N);
    pubset_send(&ps, "walk", 10000);
    pq_check_ok(c, protoq_wait_confirms(c, 0, 60000));
    ck_assert_uint_eq(protoq_outstanding(c), 0);
    ck_assert_uint_eq(ps.failed, 0);
    ck_assert_uint_eq(ps.ok, N);
    for (size_t i = 0; i < N; i++) {
        ck_assert_int_eq(ps.r[i].err, PQ_OK);
        ck_assert_uint_ne(ps.r[i].id, 0);
        if (ps.r[i].id <= prev) {
            unordered++;
        }
        prev = ps.r[i].id;
    }
    /* One connection, one queue: ids follow publish order. */
    ck_assert_uint_eq(unordered, 0);
    stat_q(c, "walk", &qi);
    ck_assert_uint_eq(qi.ready, N);
    ck_assert_uint_eq(qi.published, N);

    consume_seq_in_order("walk", N, 1000, 1, 90000);

    /* The acks were pipelined; the broker must have applied them all. */
    for (int i = 0; i < 100; i++) {
        stat_q(c, "walk", &qi);
        if (qi.acked == N) {
            break;
        }
        sleep_ms(20);
    }
    ck_assert_uint_eq(qi.acked, N);
    ck_assert_uint_eq(qi.ready, 0);
    ck_assert_uint_eq(qi.inflight, 0);
    ck_assert_uint_eq(qi.bytes, 0);
    pubset_free(&ps);
    protoq_close(c);
}
END_TEST

static const char *
cli_path(void)
{
    const char *p = getenv("PROTOQ");

    return p && p[0] ? p : "build/protoq";
}

/*
 * Run the protoq CLI with args (NULL-terminated, without argv[0]); stdin
 * from in_path (NULL: /dev/null), stdout to out_path and stderr to err_path
 * (NULL: /dev/null). Returns the exit status, 128+signal, or -1 when it
 * ran longer than timeout_ms (it is killed).
 */
static int
run_cli(const char *const *args, const char *in_path, const char *out_path,
        const char *err_path, int timeout_ms)
{
    const char *argv[32];
    int64_t deadline;
    size_t n = 0;
    int status;
    pid_t pid;

    ck_assert_msg(access(cli_path(), X_OK) == 0,
                  "protoq CLI %s is not there (set PROTOQ): %s", cli_path(),
                  strerror(errno));
    argv[n++] = cli_path();
    for (size_t i = 0; args[i] != NULL && n + 1 < 32; i++) {
        argv[n++] = args[i];
    }
    argv[n] = NULL;
    pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        int in = open(in_path ? in_path : "/dev/null", O_RDONLY);
        int out = open(out_path ? out_path : "/dev/null",
                       O_WRONLY | O_CREAT | O_TRUNC, 0644);
        int err = open(err_path ? err_path : "/dev/null",
                       O_WRONLY | O_CREAT | O_TRUNC, 0644);

        if (in < 0 || out < 0 || err < 0) {
            _exit(126);
        }
        dup2(in, STDIN_FILENO);
        dup2(out, STDOUT_FILENO);
        dup2(err, STDERR_FILENO);
        unsetenv("PROTOQ_SERVER");
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    deadline = now_ms_mono() + timeout_ms;
    for (;;) {
        pid_t r = waitpid(pid, &status, WNOHANG);

        if (r == pid) {
            break;
        }
        if (now_ms_mono() >= deadline) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            return -1;
        }
        sleep_ms(5);
    }
    if (WIFEXITED(status)) {
        return WEXITSTATUS(status);
    }
    return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : -1;
}

/* Read a whole (small) file into a malloc'ed NUL-terminated string. */
static char *
slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    char *buf;
    long size;

    ck_assert_msg(f != NULL, "%s: %s", path, strerror(errno));
    fseek(f, 0, SEEK_END);
    size = ftell(f);
    fseek(f, 0, SEEK_SET);
    buf = malloc((size_t)size + 1);
    ck_assert_ptr_nonnull(buf);
    *len = fread(buf, 1, (size_t)size, f);
    buf[*len] = '\0';
    fclose(f);
    return buf;
}

static void
tmp_path(char *buf, size_t cap, const char *name)
{
    snprintf(buf, cap, "%s/%s", g_srv.dir, name);
}

START_TEST(test_cli_walkthrough_pub_lines_then_consume)
{
    enum { N = 10000 };
    char in[320], out[320], err[320];
    struct protoq_queue_info qi;
    protoq_client *c;
    char *want, *got;
    size_t wlen = 0, glen = 0;
    char count[16];
    FILE *f;
    int rc;

    tmp_path(in, sizeof(in), "in.txt");
    tmp_path(out, sizeof(out), "out.txt");
    tmp_path(err, sizeof(err), "err.txt");
    f = fopen(in, "w");
    ck_assert_ptr_nonnull(f);
    for (int i = 1; i <= N; i++) {
        fprintf(f, "%d\n", i);
    }
    fclose(f);
    want = slurp(in, &wlen);
    snprintf(count, sizeof(count), "%d", N);

    rc = run_cli(
        (const char *[]){"-s", g_srv.addr, "queue", "create", "cliq", NULL},
        NULL, out, err, 10000);
    ck_assert_msg(rc == 0, "queue create exited %d", rc);
    rc = run_cli(
        (const char *[]){"-s", g_srv.addr, "pub", "cliq", "--lines", NULL}, in,
        out, err, 30000);
    ck_assert_msg(rc == 0, "pub --lines exited %d", rc);

    c = pq_connect_or_fail(&g_srv);
    stat_q(c, "cliq", &qi);
    ck_assert_uint_eq(qi.ready, N);

    rc = run_cli((const char *[]){"-s", g_srv.addr, "consume", "cliq",
                                  "--count", count, NULL},
                 NULL, out, err, 30000);
    ck_assert_msg(rc == 0, "consume exited %d", rc);
    got = slurp(out, &glen);
    ck_assert_uint_eq(glen, wlen);
    ck_assert_msg(memcmp(got, want, wlen) == 0,
                  "consume printed something other than 1..%d", N);

    /* consume acked what it printed. */
    for (int i = 0; i < 100; i++) {
        stat_q(c, "cliq", &qi);
        if (qi.acked == N) {
            break;
        }
        sleep_ms(20);
    }
    ck_assert_uint_eq(qi.ready, 0);
    ck_assert_uint_eq(qi.inflight, 0);
    ck_assert_uint_eq(qi.acked, N);

    /* queue ls shows it. */
    rc = run_cli((const char *[]){"-s", g_srv.addr, "queue", "ls", NULL}, NULL,
                 out, err, 10000);
    ck_assert_int_eq(rc, 0);
    free(got);
    got = slurp(out, &glen);
    ck_assert_msg(strstr(got, "cliq") != NULL, "queue ls printed: %s", got);
    free(got);
    free(want);
    protoq_close(c);
}
END_TEST

START_TEST(test_cli_exit_codes_usage_is_2_errors_are_1)
{
    char err[320];
    size_t len = 0;
    char *msg;
    int rc;

    tmp_path(err, sizeof(err), "err.txt");
    rc = run_cli((const char *[]){NULL}, NULL, NULL, err, 10000);
    ck_assert_msg(rc == 2, "no arguments: exit %d, want 2", rc);
    rc = run_cli((const char *[]){"-s", g_srv.addr, "frobnicate", NULL}, NULL,
                 NULL, err, 10000);
    ck_assert_msg(rc == 2, "unknown command: exit %d, want 2", rc);
    rc = run_cli((const char *[]){"-s", g_srv.addr, "consume", NULL}, NULL,
                 NULL, err, 10000);
    ck_assert_msg(rc == 2, "consume without a queue: exit %d, want 2", rc);
    rc = run_cli((const char *[]){"-s", g_srv.addr, "consume", "q",
                                  "--no-such-flag", NULL},
                 NULL, NULL, err, 10000);
    ck_assert_msg(rc == 2, "unknown flag: exit %d, want 2", rc);

    rc = run_cli(
        (const char *[]){"-s", g_srv.addr, "pub", "nosuch", "hello", NULL},
        NULL, NULL, err, 10000);
    ck_assert_msg(rc == 1, "pub to a missing queue: exit %d, want 1", rc);
    msg = slurp(err, &len);
    ck_assert_msg(len > 0, "pub to a missing queue printed nothing on stderr");
    free(msg);
    rc = run_cli((const char *[]){"-s", g_srv.addr, "consume", "nosuch",
                                  "--count", "1", "--wait", "1s", NULL},
                 NULL, NULL, err, 10000);
    ck_assert_msg(rc == 1, "consume of a missing queue: exit %d, want 1", rc);
    rc = run_cli(
        (const char *[]){"-s", g_srv.addr, "queue", "stat", "nosuch", NULL},
        NULL, NULL, err, 10000);
    ck_assert_msg(rc == 1, "stat of a missing queue: exit %d, want 1", rc);
    rc = run_cli(
        (const char *[]){"-s", g_srv.addr, "queue", "rm", "nosuch", NULL}, NULL,
        NULL, err, 10000);
    ck_assert_msg(rc == 1, "rm of a missing queue: exit %d, want 1", rc);
}
END_TEST

/* ================================================================ batch */

START_TEST(test_batch_naming_missing_queue_stores_nothing)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    const char *const qs[] = {"a", "b", "missing", "a"};
    struct protoq_message m[4];
    struct protoq_queue_info qi;
    uint64_t ids[4] = {0, 0, 0, 0};

    pq_check_ok(c, protoq_queue_create(c, "a", NULL));
    pq_check_ok(c, protoq_queue_create(c, "b", NULL));
    memset(m, 0, sizeof(m));
    for (size_t i = 0; i < 4; i++) {
        m[i].payload = "m";
        m[i].len = 1;
    }
    pq_check_remote(c, protoq_publish_batch_multi(c, qs, m, 4, ids),
                    PROTOQ_CODE_QUEUE_NOT_FOUND);
    stat_q(c, "a", &qi);
    ck_assert_uint_eq(qi.ready, 0);
    ck_assert_uint_eq(qi.published, 0);
    stat_q(c, "b", &qi);
    ck_assert_uint_eq(qi.ready, 0);
    ck_assert_uint_eq(qi.published, 0);
    protoq_close(c);
}
END_TEST

START_TEST(test_batch_with_one_oversized_message_stores_nothing)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_message m[3];
    struct protoq_queue_info qi;
    size_t big = DEFAULT_MAX_MESSAGE + 1;
    char *payload = malloc(big);

    ck_assert_ptr_nonnull(payload);
    memset(payload, 'z', big);
    pq_check_ok(c, protoq_queue_create(c, "a", NULL));
    memset(m, 0, sizeof(m));
    m[0].payload = "ok";
    m[0].len = 2;
    m[1].payload = payload;
    m[1].len = big;
    m[2].payload = "ok";
    m[2].len = 2;
    pq_check_remote(c, protoq_publish_batch(c, "a", m, 3, NULL),
                    PROTOQ_CODE_MESSAGE_TOO_LARGE);
    stat_q(c, "a", &qi);
    ck_assert_uint_eq(qi.ready, 0);
    free(payload);
    protoq_close(c);
}
END_TEST

START_TEST(test_batch_across_queues_stores_all_in_order)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    const char *const qs[] = {"a", "b", "a", "b", "a"};
    static const char *const body[] = {"a1", "b1", "a2", "b2", "a3"};
    struct protoq_message m[5];
    struct protoq_queue_info qi;
    uint64_t ids[5] = {0};
    struct coll k;

    pq_check_ok(c, protoq_queue_create(c, "a", NULL));
    pq_check_ok(c, protoq_queue_create(c, "b", NULL));
    memset(m, 0, sizeof(m));
    for (size_t i = 0; i < 5; i++) {
        m[i].payload = body[i];
        m[i].len = 2;
    }
    pq_check_ok(c, protoq_publish_batch_multi(c, qs, m, 5, ids));
    for (size_t i = 0; i < 5; i++) {
        ck_assert_uint_ne(ids[i], 0);
        for (size_t j = 0; j < i; j++) {
            ck_assert_uint_ne(ids[i], ids[j]);
        }
    }
    stat_q(c, "a", &qi);
    ck_assert_uint_eq(qi.ready, 3);
    stat_q(c, "b", &qi);
    ck_assert_uint_eq(qi.ready, 2);
    coll_init(&k, 8, true);
    pq_check_ok(c, protoq_subscribe(c, "a", 10, NULL, 0, on_collect, &k, NULL));
    ck_assert_uint_eq(poll_until(c, &k, 3, 5000), 3);
    ck_assert_str_eq(k.v[0].payload, "a1");
    ck_assert_str_eq(k.v[1].payload, "a2");
    ck_assert_str_eq(k.v[2].payload, "a3");
    ck_assert_uint_eq(k.v[0].id, ids[0]);
    ck_assert_uint_eq(k.v[1].id, ids[2]);
    ck_assert_uint_eq(k.v[2].id, ids[4]);
    coll_free(&k);
    protoq_close(c);
}
END_TEST

START_TEST(test_batch_over_max_batch_is_bad_request)
{
    /* libprotoq refuses it locally; send it raw. */
    enum { N = DEFAULT_MAX_BATCH + 1 };
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__PublishBatch pb = PROTOQ__PUBLISH_BATCH__INIT;
    Protoq__Publish *items = calloc(N, sizeof(*items));
    Protoq__Publish **ptrs = calloc(N, sizeof(*ptrs));
    Protoq__Message m = PROTOQ__MESSAGE__INIT;
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_info qi;
    Protoq__Frame *r;
    size_t len;
    uint8_t *b;
    int fd;

    ck_assert_ptr_nonnull(items);
    ck_assert_ptr_nonnull(ptrs);
    pq_check_ok(c, protoq_queue_create(c, "a", NULL));
    m.payload.data = (uint8_t *)"0123456789abcdef";
    m.payload.len = 16;
    for (size_t i = 0; i < N; i++) {
        protoq__publish__init(&items[i]);
        items[i].queue = (char *)"a";
        items[i].message = &m;
        ptrs[i] = &items[i];
    }
    pb.n_items = N;
    pb.items = ptrs;
    f.request_id = 2;
    f.kind_case = PROTOQ__FRAME__KIND_PUBLISH_BATCH;
    f.publish_batch = &pb;
    b = raw_pack(&f, &len);
    ck_assert_ptr_nonnull(b);
    fd = raw_ready();
    send_all(fd, b, len);
    read_error(fd, PROTOQ_CODE_BAD_REQUEST, NULL);
    free(b);
    b = pack_queue_list(3, &len);
    send_all(fd, b, len);
    r = read_kind(fd, PROTOQ__FRAME__KIND_QUEUE_LIST_OK, 3);
    frame_free(r);
    free(b);
    close(fd);
    stat_q(c, "a", &qi);
    ck_assert_uint_eq(qi.ready, 0);
    free(items);
    free(ptrs);
    protoq_close(c);
}
END_TEST

/* =========================================================== consumers */

START_TEST(test_two_consumers_share_a_queue_round_robin)
{
    enum { N = 1000 };
    protoq_client *p = pq_connect_or_fail(&g_srv);
    protoq_client *c1 = pq_connect_or_fail(&g_srv);
    protoq_client *c2 = pq_connect_or_fail(&g_srv);
    unsigned char *seen = calloc(N + 1, 1);
    struct coll k1, k2;
    int64_t deadline;
    size_t dups = 0;

    ck_assert_ptr_nonnull(seen);
    pq_check_ok(p, protoq_queue_create(p, "rr", NULL));
    coll_init(&k1, N, true);
    coll_init(&k2, N, true);
    pq_check_ok(c1,
                protoq_subscribe(c1, "rr", 10, NULL, 0, on_collect, &k1, NULL));
    pq_check_ok(c2,
                protoq_subscribe(c2, "rr", 10, NULL, 0, on_collect, &k2, NULL));
    publish_seq(p, "rr", N, NULL);
    deadline = now_ms_mono() + 20000;
    while (k1.n + k2.n < N && now_ms_mono() < deadline) {
        ck_assert_int_ge(protoq_poll(c1, 5), 0);
        ck_assert_int_ge(protoq_poll(c2, 5), 0);
    }
    poll_for(c1, 100);
    poll_for(c2, 100);
    ck_assert_msg(k1.n + k2.n == N, "got %zu + %zu of %d", k1.n, k2.n, N);
    ck_assert_uint_eq(k1.overflow + k2.overflow, 0);
    for (size_t i = 0; i < k1.n + k2.n; i++) {
        const struct got *g = i < k1.n ? &k1.v[i] : &k2.v[i - k1.n];
        unsigned long v = payload_num(g);

        ck_assert_msg(v >= 1 && v <= N, "bad payload \"%s\"", g->payload);
        ck_assert_uint_eq(g->attempt, 1);
        if (seen[v]++) {
            dups++;
        }
    }
    ck_assert_uint_eq(dups, 0);
    /* Each consumer sees its share in publish order. */
    for (size_t i = 1; i < k1.n; i++) {
        ck_assert_uint_lt(payload_num(&k1.v[i - 1]), payload_num(&k1.v[i]));
    }
    for (size_t i = 1; i < k2.n; i++) {
        ck_assert_uint_lt(payload_num(&k2.v[i - 1]), payload_num(&k2.v[i]));
    }
    ck_assert_msg(k1.n >= N / 5 && k2.n >= N / 5,
                  "not shared round-robin: %zu vs %zu", k1.n, k2.n);
    free(seen);
    coll_free(&k1);
    coll_free(&k2);
    protoq_close(c1);
    protoq_close(c2);
    protoq_close(p);
}
END_TEST

START_TEST(test_prefetch_credit_is_respected)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    protoq_client *w = pq_connect_or_fail(&g_srv);
    struct protoq_queue_info qi;
    uint64_t sub = 0;
    struct coll k;

    pq_check_ok(p, protoq_queue_create(p, "credit", NULL));
    publish_seq(p, "credit", 20, NULL);
    coll_init(&k, 32, false);
    pq_check_ok(
        w, protoq_subscribe(w, "credit", 5, NULL, 0, on_collect, &k, &sub));
    ck_assert_uint_ne(sub, 0);
    poll_until(w, &k, 5, 5000);
    poll_for(w, 500);
    ck_assert_uint_eq(k.n, 5);
    for (size_t i = 0; i < 5; i++) {
        ck_assert_uint_eq(payload_num(&k.v[i]), i + 1);
        ck_assert_uint_eq(k.v[i].sub, sub);
    }
    stat_q(p, "credit", &qi);
    ck_assert_uint_eq(qi.inflight, 5);
    ck_assert_uint_eq(qi.ready, 15);

    pq_check_ok(w, protoq_ack(w, k.v[0].id, k.v[0].attempt));
    poll_until(w, &k, 6, 5000);
    poll_for(w, 500);
    ck_assert_uint_eq(k.n, 6);
    ck_assert_uint_eq(payload_num(&k.v[5]), 6);
    stat_q(p, "credit", &qi);
    ck_assert_uint_eq(qi.inflight, 5);
    ck_assert_uint_eq(qi.ready, 14);
    ck_assert_uint_eq(qi.acked, 1);

    /* Raising the credit with Flow lets exactly that many more through. */
    pq_check_ok(w, protoq_flow(w, sub, 8));
    poll_until(w, &k, 9, 5000);
    poll_for(w, 500);
    ck_assert_uint_eq(k.n, 9);
    coll_free(&k);
    protoq_close(w);
    protoq_close(p);
}
END_TEST

/* =========================================================== redelivery */

START_TEST(test_disconnect_requeues_unacked_to_front_with_attempt_2)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    protoq_client *w1 = pq_connect_or_fail(&g_srv);
    protoq_client *w2;
    struct protoq_queue_info qi;
    uint64_t ids[20];
    struct coll k1, k2;

    create_fast_retry_queue(p, "dq");
    publish_seq(p, "dq", 20, ids);
    coll_init(&k1, 32, false);
    pq_check_ok(w1,
                protoq_subscribe(w1, "dq", 10, NULL, 0, on_collect, &k1, NULL));
    ck_assert_uint_eq(poll_until(w1, &k1, 10, 5000), 10);
    for (size_t i = 0; i < 10; i++) {
        ck_assert_uint_eq(k1.v[i].id, ids[i]);
        ck_assert_uint_eq(k1.v[i].attempt, 1);
    }
    protoq_close(w1);

    /* The ten come back ahead of the ten never delivered. */
    for (int i = 0; i < 200; i++) {
        stat_q(p, "dq", &qi);
        if (qi.inflight == 0 && qi.ready == 20) {
            break;
        }
        sleep_ms(10);
    }
    ck_assert_uint_eq(qi.inflight, 0);
    ck_assert_uint_eq(qi.ready, 20);
    ck_assert_uint_eq(qi.consumers, 0);

    w2 = pq_connect_or_fail(&g_srv);
    coll_init(&k2, 32, true);
    pq_check_ok(
        w2, protoq_subscribe(w2, "dq", 100, NULL, 0, on_collect, &k2, NULL));
    poll_until(w2, &k2, 20, 5000);
    poll_for(w2, 200);
    ck_assert_uint_eq(k2.n, 20);
    for (size_t i = 0; i < 20; i++) {
        ck_assert_uint_eq(k2.v[i].id, ids[i]);
        ck_assert_uint_eq(payload_num(&k2.v[i]), i + 1);
        ck_assert_uint_eq(k2.v[i].attempt, i < 10 ? 2 : 1);
    }
    stat_q(p, "dq", &qi);
    ck_assert_uint_eq(qi.redelivered, 10);
    coll_free(&k1);
    coll_free(&k2);
    protoq_close(w2);
    protoq_close(p);
}
END_TEST

START_TEST(test_nack_requeues_with_attempt_2)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_info qi;
    uint64_t id = 0;
    struct coll k;

    create_fast_retry_queue(c, "nq");
    pub_str(c, "nq", "job", 0, &id);
    pub_str(c, "nq", "next", 0, NULL);
    coll_init(&k, 8, false);
    pq_check_ok(c, protoq_subscribe(c, "nq", 1, NULL, 0, on_collect, &k, NULL));
    ck_assert_uint_eq(poll_until(c, &k, 1, 5000), 1);
    ck_assert_uint_eq(k.v[0].id, id);
    ck_assert_uint_eq(k.v[0].attempt, 1);
    pq_check_ok(c, protoq_nack(c, id, 1, 0, false, "boom"));
    ck_assert_uint_eq(poll_until(c, &k, 2, 5000), 2);
    /* Back at the front, ahead of "next". */
    ck_assert_uint_eq(k.v[1].id, id);
    ck_assert_str_eq(k.v[1].payload, "job");
    ck_assert_uint_eq(k.v[1].attempt, 2);
    pq_check_ok(c, protoq_nack_sync(c, id, 2, 0, false, NULL));
    ck_assert_uint_eq(poll_until(c, &k, 3, 5000), 3);
    ck_assert_uint_eq(k.v[2].id, id);
    ck_assert_uint_eq(k.v[2].attempt, 3);
    pq_check_ok(c, protoq_ack_sync(c, id, 3));
    ck_assert_uint_eq(poll_until(c, &k, 4, 5000), 4);
    ck_assert_str_eq(k.v[3].payload, "next");
    ck_assert_uint_eq(k.v[3].attempt, 1);
    stat_q(c, "nq", &qi);
    ck_assert_uint_eq(qi.nacked, 2);
    ck_assert_uint_eq(qi.acked, 1);
    ck_assert_uint_eq(qi.ready, 0);
    ck_assert_uint_eq(qi.inflight, 1);
    coll_free(&k);
    protoq_close(c);
}
END_TEST

START_TEST(test_nack_past_max_attempts_drops_without_dead_letter)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a;
    struct protoq_queue_info qi;
    uint64_t id = 0;
    struct coll k;

    memset(&a, 0, sizeof(a));
    a.no_backoff = true;
    a.max_attempts = 2;
    pq_check_ok(c, protoq_queue_create(c, "mq", &a));
    pub_str(c, "mq", "doomed", 0, &id);
    coll_init(&k, 8, false);
    pq_check_ok(c, protoq_subscribe(c, "mq", 1, NULL, 0, on_collect, &k, NULL));
    ck_assert_uint_eq(poll_until(c, &k, 1, 5000), 1);
    pq_check_ok(c, protoq_nack_sync(c, id, 1, 0, false, "e1"));
    ck_assert_uint_eq(poll_until(c, &k, 2, 5000), 2);
    ck_assert_uint_eq(k.v[1].attempt, 2);
    pq_check_ok(c, protoq_nack_sync(c, id, 2, 0, false, "e2"));
    poll_for(c, 300);
    ck_assert_uint_eq(k.n, 2);
    stat_q(c, "mq", &qi);
    ck_assert_uint_eq(qi.ready + qi.inflight + qi.delayed, 0);
    ck_assert_uint_eq(qi.dropped, 1);
    coll_free(&k);
    protoq_close(c);
}
END_TEST

START_TEST(test_broker_default_backoff_0_retries_at_once)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_info qi;
    uint64_t id = 0;
    struct coll k;

    /* The broker's default backoff is 0 (setup_server_fast_retry), and a
     * queue created with defaults inherits it. */
    pq_check_ok(c, protoq_queue_create(c, "cq", NULL));
    stat_q(c, "cq", &qi);
    ck_assert_uint_eq(qi.attrs.backoff_base_ms, 0);
    ck_assert_uint_eq(qi.attrs.backoff_cap_ms, 60000);
    /* Effective values: a base of 0 is no backoff. */
    ck_assert(qi.attrs.no_backoff);
    pub_str(c, "cq", "job", 0, &id);
    pub_str(c, "cq", "next", 0, NULL);
    coll_init(&k, 8, false);
    pq_check_ok(c, protoq_subscribe(c, "cq", 1, NULL, 0, on_collect, &k, NULL));
    ck_assert_uint_eq(poll_until(c, &k, 1, 5000), 1);
    for (uint32_t att = 1; att <= 3; att++) {
        ck_assert_uint_eq(k.v[att - 1].id, id);
        ck_assert_uint_eq(k.v[att - 1].attempt, att);
        pq_check_ok(c, protoq_nack(c, id, att, 0, false, NULL));
        ck_assert_uint_eq(poll_until(c, &k, att + 1, 5000), att + 1);
    }
    ck_assert_str_eq(k.v[3].payload, "job");
    ck_assert_uint_eq(k.v[3].attempt, 4);
    coll_free(&k);
    protoq_close(c);
}
END_TEST

START_TEST(test_queue_attrs_from_backoff_0_default_survive_restart)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_info before, after;

    pq_check_ok(c, protoq_queue_create(c, "cq", NULL));
    stat_q(c, "cq", &before);
    protoq_close(c);
    ck_assert_int_eq(srv_restart(&g_srv), 0);
    c = pq_connect_or_fail(&g_srv);
    stat_q(c, "cq", &after);
    ck_assert_uint_eq(after.attrs.backoff_base_ms,
                      before.attrs.backoff_base_ms);
    ck_assert_uint_eq(after.attrs.backoff_cap_ms, before.attrs.backoff_cap_ms);
    ck_assert_int_eq(after.attrs.no_backoff, before.attrs.no_backoff);
    /* Declaring it again as before is still "the same attributes". */
    pq_check_ok(c, protoq_queue_create(c, "cq", NULL));
    protoq_close(c);
}
END_TEST

struct errs {
    int n;
    int code;
    uint64_t rid;
};

static void
on_async_error(void *arg, protoq_client *c, int code, const char *msg,
               uint64_t rid)
{
    struct errs *e = arg;

    (void)c;
    (void)msg;
    e->n++;
    e->code = code;
    e->rid = rid;
}

START_TEST(test_ack_of_unknown_token_is_stale_delivery)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct errs e = {0, 0, 0};
    int64_t deadline;

    protoq_set_error_cb(c, on_async_error, &e);
    pq_check_ok(c, protoq_ack(c, 123456789, 1));
    deadline = now_ms_mono() + 5000;
    while (e.n == 0 && now_ms_mono() < deadline) {
        ck_assert_int_ge(protoq_poll(c, 100), 0);
    }
    ck_assert_int_eq(e.n, 1);
    ck_assert_int_eq(e.code, PROTOQ_CODE_STALE_DELIVERY);
    ck_assert_uint_ne(e.rid, 0);
    ck_assert_uint_eq(protoq_async_errors(c), 1);
    pq_check_remote(c, protoq_ack_sync(c, 987654321, 1),
                    PROTOQ_CODE_STALE_DELIVERY);
    pq_check_remote(c, protoq_nack_sync(c, 987654321, 1, 0, false, NULL),
                    PROTOQ_CODE_STALE_DELIVERY);
    protoq_close(c);
}
END_TEST

START_TEST(test_ack_of_stale_token_is_stale_delivery_and_changes_nothing)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_info qi;
    uint64_t id = 0;
    struct coll k;

    create_fast_retry_queue(c, "sq");
    pub_str(c, "sq", "x", 0, &id);
    coll_init(&k, 8, false);
    pq_check_ok(c, protoq_subscribe(c, "sq", 1, NULL, 0, on_collect, &k, NULL));
    ck_assert_uint_eq(poll_until(c, &k, 1, 5000), 1);
    /* Wrong attempt: not the current token. */
    pq_check_remote(c, protoq_ack_sync(c, id, 2), PROTOQ_CODE_STALE_DELIVERY);
    stat_q(c, "sq", &qi);
    ck_assert_uint_eq(qi.inflight, 1);
    ck_assert_uint_eq(qi.acked, 0);
    /* Nack it; the attempt-1 token is now stale. */
    pq_check_ok(c, protoq_nack_sync(c, id, 1, 0, false, NULL));
    ck_assert_uint_eq(poll_until(c, &k, 2, 5000), 2);
    ck_assert_uint_eq(k.v[1].attempt, 2);
    pq_check_remote(c, protoq_ack_sync(c, id, 1), PROTOQ_CODE_STALE_DELIVERY);
    pq_check_ok(c, protoq_ack_sync(c, id, 2));
    /* Acked twice: the second is stale too. */
    pq_check_remote(c, protoq_ack_sync(c, id, 2), PROTOQ_CODE_STALE_DELIVERY);
    stat_q(c, "sq", &qi);
    ck_assert_uint_eq(qi.acked, 1);
    ck_assert_uint_eq(qi.inflight + qi.ready, 0);
    coll_free(&k);
    protoq_close(c);
}
END_TEST

/* ============================================================= priority */

START_TEST(test_higher_priority_first_fifo_within_level)
{
    static const struct {
        const char *s;
        uint32_t prio;
    } in[] = {
        {"a0", 0}, {"b0", 5}, {"a1", 0}, {"c0", 9}, {"b1", 5},
        {"a2", 0}, {"c1", 9}, {"b2", 5}, {"d0", 1},
    };
    static const char *const want[] = {"c0", "c1", "b0", "b1", "b2",
                                       "d0", "a0", "a1", "a2"};
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct coll k;

    pq_check_ok(c, protoq_queue_create(c, "prio", NULL));
    for (size_t i = 0; i < sizeof(in) / sizeof(in[0]); i++) {
        pub_str(c, "prio", in[i].s, in[i].prio, NULL);
    }
    coll_init(&k, 16, true);
    pq_check_ok(
        c, protoq_subscribe(c, "prio", 100, NULL, 0, on_collect, &k, NULL));
    poll_until(c, &k, 9, 5000);
    poll_for(c, 200);
    ck_assert_uint_eq(k.n, 9);
    for (size_t i = 0; i < 9; i++) {
        ck_assert_msg(strcmp(k.v[i].payload, want[i]) == 0,
                      "delivery %zu is %s, want %s", i, k.v[i].payload,
                      want[i]);
        ck_assert_uint_eq(k.v[i].priority, k.v[i].payload[0] == 'c'   ? 9
                                           : k.v[i].payload[0] == 'b' ? 5
                                           : k.v[i].payload[0] == 'd' ? 1
                                                                      : 0);
    }
    coll_free(&k);
    protoq_close(c);
}
END_TEST

START_TEST(test_priority_over_9_is_bad_request)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_message m;
    struct protoq_queue_info qi;

    pq_check_ok(c, protoq_queue_create(c, "prio", NULL));
    memset(&m, 0, sizeof(m));
    m.payload = "x";
    m.len = 1;
    m.priority = 10;
    pq_check_remote(c, protoq_publish(c, "prio", &m, NULL),
                    PROTOQ_CODE_BAD_REQUEST);
    stat_q(c, "prio", &qi);
    ck_assert_uint_eq(qi.ready, 0);
    protoq_close(c);
}
END_TEST

static Suite *
delivery_suite(void)
{
    Suite *s = suite_create("delivery");
    TCase *tc;

    tc = tcase(s, "walkthrough", 180);
    tcase_add_test(tc, test_100k_pipelined_publishes_consumed_in_order);
    tcase_add_test(tc, test_cli_walkthrough_pub_lines_then_consume);
    tcase_add_test(tc, test_cli_exit_codes_usage_is_2_errors_are_1);

    tc = tcase(s, "batch", 30);
    tcase_add_test(tc, test_batch_naming_missing_queue_stores_nothing);
    tcase_add_test(tc, test_batch_with_one_oversized_message_stores_nothing);
    tcase_add_test(tc, test_batch_across_queues_stores_all_in_order);
    tcase_add_test(tc, test_batch_over_max_batch_is_bad_request);

    tc = tcase(s, "consumers", 30);
    tcase_add_test(tc, test_two_consumers_share_a_queue_round_robin);
    tcase_add_test(tc, test_prefetch_credit_is_respected);

    tc = tcase_create("redelivery_config");
    tcase_add_checked_fixture(tc, setup_server_fast_retry,
                              teardown_server_conf);
    tcase_set_timeout(tc, 30);
    suite_add_tcase(s, tc);
    tcase_add_test(tc, test_broker_default_backoff_0_retries_at_once);
    tcase_add_test(tc, test_queue_attrs_from_backoff_0_default_survive_restart);

    tc = tcase(s, "redelivery", 30);
    tcase_add_test(tc,
                   test_disconnect_requeues_unacked_to_front_with_attempt_2);
    tcase_add_test(tc, test_nack_requeues_with_attempt_2);
    tcase_add_test(tc, test_nack_past_max_attempts_drops_without_dead_letter);
    tcase_add_test(tc, test_ack_of_unknown_token_is_stale_delivery);
    tcase_add_test(
        tc, test_ack_of_stale_token_is_stale_delivery_and_changes_nothing);

    tc = tcase(s, "priority", 30);
    tcase_add_test(tc, test_higher_priority_first_fifo_within_level);
    tcase_add_test(tc, test_priority_over_9_is_bad_request);

    return s;
}

int
main(void)
{
    SRunner *sr = srunner_create(delivery_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
