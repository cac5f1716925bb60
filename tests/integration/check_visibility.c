/*
 * check_visibility.c: JobGet and JobList against a real protoqd: a job is
 * found in each of its states (ready, delayed, in flight with its holder,
 * dead-lettered) with its attempt, failures, progress and last error, a
 * list filters by state and pages by id, and looking changes nothing (no
 * delivery, no attempt counted).
 */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "testutil.h"

static struct srv g_srv;

static void
setup(void)
{
    ck_assert_msg(srv_start(&g_srv, NULL) == 0,
                  "protoqd did not start (PROTOQD=%s)",
                  getenv("PROTOQD") ? getenv("PROTOQD") : "(unset)");
}

static void
teardown(void)
{
    srv_cleanup(&g_srv);
}

static uint64_t
wall_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static uint64_t
publish(protoq_client *c, const char *queue, uint64_t delay_ms)
{
    struct protoq_kv req = {"gpu", "a100"};
    struct protoq_message m = {.payload = "job",
                               .len = 3,
                               .priority = 4,
                               .delay_ms = delay_ms,
                               .requires = &req,
                               .n_requires = 1};
    uint64_t id;

    pq_check_ok(c, protoq_publish(c, queue, &m, &id));
    return id;
}

/* A worker: takes one delivery (with tag gpu=a100) and keeps its token. */
struct worker {
    protoq_client *c;
    uint64_t id;
    uint32_t attempt;
    int got;
};

static void
take_cb(void *arg, protoq_client *c, const struct protoq_delivery *d)
{
    struct worker *w = arg;

    (void)c;
    w->id = d->message_id;
    w->attempt = d->attempt;
    w->got++;
}

static void
worker_take(struct worker *w, const char *queue)
{
    struct protoq_opts o = {.client_name = "worker-7"};
    struct protoq_kv tag = {"gpu", "a100"};
    int64_t deadline = now_ms_mono() + 10000;

    memset(w, 0, sizeof(*w));
    pq_check_ok(w->c, protoq_connect(g_srv.addr, &o, &w->c));
    pq_check_ok(w->c,
                protoq_subscribe(w->c, queue, 1, &tag, 1, take_cb, w, NULL));
    while (w->got == 0 && now_ms_mono() < deadline) {
        int rc = protoq_poll(w->c, 100); /* callbacks run, or a PQ_* error */

        ck_assert_msg(rc >= 0, "protoq_poll: %s", pq_strerror(rc));
    }
    ck_assert_int_eq(w->got, 1);
}

START_TEST(test_job_in_each_state)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a = {.max_attempts = 2, .backoff_base_ms = 60000};
    struct protoq_progress prog = {
        .percent = 40, .text = "epoch 4", .checkpoint = "s3://ck/4"};
    uint64_t t0 = wall_ms(), id, late;
    struct protoq_job j;
    struct worker w;

    snprintf(a.dead_letter, sizeof(a.dead_letter), "dlq");
    pq_check_ok(c, protoq_queue_create(c, "dlq", NULL));
    pq_check_ok(c, protoq_queue_create(c, "train", &a));
    id = publish(c, "train", 0);
    late = publish(c, "train", 60000);

    /* ready */
    pq_check_ok(c, protoq_job_get(c, "train", id, &j));
    ck_assert_int_eq(j.state, PROTOQ_JOB_READY);
    ck_assert_str_eq(j.queue, "train");
    ck_assert_uint_eq(j.attempt, 0);
    ck_assert_uint_eq(j.priority, 4);
    ck_assert_uint_eq(j.payload_bytes, 3);
    ck_assert_uint_eq(j.n_requires, 1);
    ck_assert_str_eq(j.requires[0].key, "gpu");
    ck_assert_str_eq(j.requires[0].value, "a100");
    ck_assert(!j.has_holder && !j.has_progress);
    ck_assert_uint_ge(j.published_at_ms, t0 - 1000);
    ck_assert_uint_eq(j.due_at_ms, 0);
    protoq_job_fini(&j);

    /* delayed */
    pq_check_ok(c, protoq_job_get(c, "train", late, &j));
    ck_assert_int_eq(j.state, PROTOQ_JOB_DELAYED);
    ck_assert_uint_ge(j.due_at_ms, t0 + 59000);
    ck_assert_uint_le(j.due_at_ms, wall_ms() + 61000);
    protoq_job_fini(&j);

    /* in flight, with its holder and progress; looking twice counts no
     * attempt */
    worker_take(&w, "train");
    ck_assert_uint_eq(w.id, id);
    pq_check_ok(w.c, protoq_touch(w.c, w.id, w.attempt, 0, &prog, NULL));
    for (int k = 0; k < 2; k++) {
        pq_check_ok(c, protoq_job_get(c, "train", id, &j));
        ck_assert_int_eq(j.state, PROTOQ_JOB_INFLIGHT);
        ck_assert_uint_eq(j.attempt, 1);
        ck_assert(j.has_holder);
        ck_assert_str_eq(j.holder_name, "worker-7");
        ck_assert_msg(strncmp(j.holder_address, "127.0.0.1:", 10) == 0,
                      "holder address %s", j.holder_address);
        ck_assert_uint_gt(j.lease_left_ms, 0);
        ck_assert_uint_le(j.lease_left_ms, 30000);
        ck_assert(j.has_progress);
        ck_assert_uint_eq(j.progress_percent, 40);
        ck_assert_str_eq(j.progress_text, "epoch 4");
        ck_assert_str_eq(j.checkpoint, "s3://ck/4");
        protoq_job_fini(&j);
    }

    /* failed once: back to delayed (the backoff), failures and error kept */
    pq_check_ok(w.c, protoq_nack_sync(w.c, w.id, w.attempt, 0, false, "oom"));
    pq_check_ok(c, protoq_job_get(c, "train", id, &j));
    ck_assert_int_eq(j.state, PROTOQ_JOB_DELAYED);
    ck_assert_uint_eq(j.failures, 1);
    ck_assert_str_eq(j.last_error, "oom");
    ck_assert_str_eq(j.progress_text, "epoch 4");
    protoq_job_fini(&j);

    /* dead-lettered: found from its queue, in the dead-letter queue */
    pq_check_ok(c, protoq_cancel(c, "train", late));
    protoq_close(w.c);
    {
        struct protoq_queue_attrs b = {.max_attempts = 1};

        snprintf(b.dead_letter, sizeof(b.dead_letter), "dlq");
        pq_check_ok(c, protoq_queue_create(c, "once", &b));
    }
    id = publish(c, "once", 0);
    worker_take(&w, "once");
    pq_check_ok(w.c, protoq_nack_sync(w.c, w.id, w.attempt, 0, false, "bad"));
    pq_check_ok(c, protoq_job_get(c, "once", id, &j));
    ck_assert_int_eq(j.state, PROTOQ_JOB_DEAD);
    ck_assert_str_eq(j.queue, "dlq");
    protoq_job_fini(&j);
    protoq_close(w.c);

    /* gone: acked, cancelled or never there */
    pq_check_remote(c, protoq_job_get(c, "train", late, &j),
                    PROTOQ_CODE_QUEUE_NOT_FOUND);
    pq_check_remote(c, protoq_job_get(c, "train", 12345, &j),
                    PROTOQ_CODE_QUEUE_NOT_FOUND);
    pq_check_remote(c, protoq_job_get(c, "nope", id, &j),
                    PROTOQ_CODE_QUEUE_NOT_FOUND);
    protoq_close(c);
}
END_TEST

START_TEST(test_list_filters_and_pages)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_job *list;
    uint64_t ids[25], after = 0, next;
    size_t n, seen = 0;
    struct worker w;

    pq_check_ok(c, protoq_queue_create(c, "q", NULL));
    for (int i = 0; i < 20; i++) {
        ids[i] = publish(c, "q", 0);
    }
    for (int i = 20; i < 25; i++) {
        ids[i] = publish(c, "q", 600000);
    }
    worker_take(&w, "q"); /* ids[0] in flight */

    /* pages of 7 through all 25, in id order */
    do {
        pq_check_ok(c, protoq_job_list(c, "q", PROTOQ_JOB_ANY, 7, after, &list,
                                       &n, &next));
        ck_assert_uint_le(n, 7);
        for (size_t k = 0; k < n; k++) {
            ck_assert_uint_eq(list[k].id, ids[seen + k]);
        }
        seen += n;
        after = next;
        protoq_job_list_free(list, n);
    } while (next != 0 && seen < 100);
    ck_assert_uint_eq(seen, 25);

    pq_check_ok(
        c, protoq_job_list(c, "q", PROTOQ_JOB_DELAYED, 0, 0, &list, &n, &next));
    ck_assert_uint_eq(n, 5);
    ck_assert_uint_eq(next, 0);
    ck_assert_uint_eq(list[0].id, ids[20]);
    ck_assert_int_eq(list[4].state, PROTOQ_JOB_DELAYED);
    protoq_job_list_free(list, n);

    pq_check_ok(
        c, protoq_job_list(c, "q", PROTOQ_JOB_INFLIGHT, 0, 0, &list, &n, NULL));
    ck_assert_uint_eq(n, 1);
    ck_assert_uint_eq(list[0].id, ids[0]);
    ck_assert_str_eq(list[0].holder_name, "worker-7");
    protoq_job_list_free(list, n);

    pq_check_ok(c, protoq_job_list(c, "q", PROTOQ_JOB_READY, 3, ids[5], &list,
                                   &n, &next));
    ck_assert_uint_eq(n, 3);
    ck_assert_uint_eq(list[0].id, ids[6]);
    ck_assert_uint_eq(next, ids[8]);
    protoq_job_list_free(list, n);

    /* a queue without a dead-letter queue has no dead jobs */
    pq_check_ok(
        c, protoq_job_list(c, "q", PROTOQ_JOB_DEAD, 0, 0, &list, &n, NULL));
    ck_assert_uint_eq(n, 0);
    pq_check_remote(
        c, protoq_job_list(c, "q", PROTOQ_JOB_ANY, 1001, 0, &list, &n, NULL),
        PROTOQ_CODE_BAD_REQUEST);

    /* Listing delivered nothing and counted nothing. */
    {
        struct protoq_queue_info qi;

        pq_check_ok(c, protoq_queue_stat(c, "q", &qi));
        ck_assert_uint_eq(qi.ready, 19);
        ck_assert_uint_eq(qi.inflight, 1);
        ck_assert_uint_eq(qi.redelivered, 0);
    }
    protoq_close(w.c);
    protoq_close(c);
}
END_TEST

/* Run protoq -s ADDR args... (at most 10) with its output into buf;
 * returns its exit status. */
static int
cli(char *buf, size_t cap, const char *const *args)
{
    const char *bin = getenv("PROTOQ");
    const char *argv[16];
    char path[400];
    size_t n = 0;
    int rc;

    argv[n++] = bin != NULL && bin[0] != '\0' ? bin : "build/protoq";
    argv[n++] = "-s";
    argv[n++] = g_srv.addr;
    for (size_t i = 0; args[i] != NULL && n < 15; i++) {
        argv[n++] = args[i];
    }
    argv[n] = NULL;
    snprintf(path, sizeof(path), "%s/cli.out", g_srv.dir);
    rc = prog_run(argv, path, 10000);
    file_slurp(path, buf, cap);
    return rc;
}

/* The CLI of DESIGN.md: route bind, pub --route, route ls, job, jobs. */
START_TEST(test_cli_routes_and_jobs)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    char out[4096], id_text[32];

    pq_check_ok(c, protoq_queue_create(c, "gpu", NULL));
    pq_check_ok(c, protoq_queue_create(c, "cpu", NULL));
    protoq_close(c);
    ck_assert_int_eq(cli(out, sizeof(out),
                         (const char *[]){"route", "bind", "train", "gpu",
                                          "--pattern", "*.gpu", NULL}),
                     0);
    ck_assert_int_eq(
        cli(out, sizeof(out),
            (const char *[]){"route", "bind", "train", "cpu", NULL}),
        0);
    ck_assert_int_eq(
        cli(out, sizeof(out), (const char *[]){"route", "ls", NULL}), 0);
    ck_assert_msg(strstr(out, "*.gpu") && strstr(out, "(every key)"),
                  "route ls: %s", out);
    /* two copies, two ids */
    ck_assert_int_eq(
        cli(out, sizeof(out),
            (const char *[]){"pub", "--route", "train", "--routing-key",
                             "big.gpu", "data", "--priority", "7", NULL}),
        0);
    ck_assert_msg(sscanf(out, "%31s", id_text) == 1, "pub: %s", out);
    ck_assert_msg(strchr(strchr(out, '\n') + 1, '\n') != NULL,
                  "pub --route printed one id: %s", out);
    ck_assert_int_eq(
        cli(out, sizeof(out), (const char *[]){"job", "gpu", id_text, NULL}),
        0);
    ck_assert_msg(
        strstr(out, "state: ready\n") && strstr(out, "attempt: 0\n") &&
            strstr(out, "priority: 7\n") && strstr(out, "holder: -\n") &&
            strstr(out, "published_at: 20") && strstr(out, "due_at: -\n"),
        "job: %s", out);
    ck_assert_int_eq(
        cli(out, sizeof(out), (const char *[]){"jobs", "cpu", "--json", NULL}),
        0);
    /* ids as strings, as in every --json (a 64-bit id is not exact as a
     * JSON number in JavaScript or jq) */
    ck_assert_msg(strncmp(out, "{\"id\":\"", 7) == 0 &&
                      strstr(out, "\"state\":\"ready\""),
                  "jobs --json: %s", out);
    /* nothing matches: exit 1 */
    ck_assert_int_eq(
        cli(out, sizeof(out),
            (const char *[]){"route", "unbind", "train", "cpu", NULL}),
        0);
    ck_assert_int_eq(cli(out, sizeof(out),
                         (const char *[]){"pub", "--route", "train",
                                          "--routing-key", "x", "d", NULL}),
                     1);
    ck_assert_msg(strstr(out, "QUEUE_NOT_FOUND") != NULL, "%s", out);
    ck_assert_int_eq(
        cli(out, sizeof(out),
            (const char *[]){"jobs", "cpu", "--state", "bogus", NULL}),
        2);
}
END_TEST

static Suite *
visibility_suite(void)
{
    Suite *s = suite_create("visibility");
    TCase *tc = tcase_create("jobs");

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_job_in_each_state);
    tcase_add_test(tc, test_list_filters_and_pages);
    tcase_add_test(tc, test_cli_routes_and_jobs);
    suite_add_tcase(s, tc);
    return s;
}

int
main(void)
{
    SRunner *sr = srunner_create(visibility_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
