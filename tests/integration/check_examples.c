/*
 * check_examples.c: the example programs of client/examples run against a
 * real protoqd, so that they cannot rot: producer submits jobs (with
 * requirements), worker_thread runs each in a thread of its own, reports
 * progress through touches from the handle's thread, acks with a result,
 * and resumes a job from the checkpoint of an earlier attempt.
 *
 * The programs are $PROTOQ_EXAMPLES/NAME, else build/examples/NAME.
 */
#include <check.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "testutil.h"

static struct srv g_srv;

static void
setup(void)
{
    ck_assert_msg(srv_start(&g_srv, NULL) == 0, "protoqd did not start");
}

static void
teardown(void)
{
    srv_cleanup(&g_srv);
}

static const char *
example(const char *name, char *buf, size_t cap)
{
    const char *dir = getenv("PROTOQ_EXAMPLES");

    snprintf(buf, cap, "%s/%s", dir ? dir : "build/examples", name);
    return buf;
}

/* Run an example with -s ADDR and args; its output goes to out. Returns
 * the exit status. */
static int
run_example(const char *name, const char *const *args, char *out, size_t cap)
{
    const char *argv[16];
    char path[512], outpath[300];
    size_t n = 0;
    int rc;

    argv[n++] = example(name, path, sizeof(path));
    argv[n++] = "-s";
    argv[n++] = g_srv.addr;
    for (size_t i = 0; args[i] != NULL && n < 15; i++) {
        argv[n++] = args[i];
    }
    argv[n] = NULL;
    snprintf(outpath, sizeof(outpath), "%s/%s.out", g_srv.dir, name);
    rc = prog_run(argv, outpath, 30000);
    file_slurp(outpath, out, cap);
    return rc;
}

static int
count_lines(const char *text, const char *prefix)
{
    size_t len = strlen(prefix);
    int n = 0;

    for (const char *p = text; *p != '\0';) {
        const char *nl = strchr(p, '\n');

        n += strncmp(p, prefix, len) == 0;
        if (nl == NULL) {
            break;
        }
        p = nl + 1;
    }
    return n;
}

/* producer submits 3 confirmed jobs; worker_thread runs them in its job
 * thread, reports progress and acks each with its result. */
START_TEST(test_producer_and_threaded_worker)
{
    static const char *const pub_args[] = {"-n",       "3",     "-p",
                                           "steps=10", "train", NULL};
    static const char *const work_args[] = {"-n", "3", "train", NULL};
    static char out[16384], pubs[4096];
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_info qi;
    int rc;

    pq_check_ok(c, protoq_queue_create(c, "train", NULL));
    rc = run_example("producer", pub_args, pubs, sizeof(pubs));
    ck_assert_msg(rc == 0, "producer exited %d: %s", rc, pubs);
    ck_assert_int_eq(count_lines(pubs, "published "), 3);

    rc = run_example("worker_thread", work_args, out, sizeof(out));
    ck_assert_msg(rc == 0, "worker_thread exited %d: %s", rc, out);
    ck_assert_msg(count_lines(out, "start ") == 3, "%s", out);
    ck_assert_msg(count_lines(out, "progress ") >= 1, "%s", out);
    ck_assert_msg(strstr(out, ": acked") != NULL, "%s", out);
    ck_assert_int_eq(count_lines(out, "done "), 3);
    /* Each published job is reported done under its own id. */
    for (const char *p = strstr(pubs, "published "); p != NULL;
         p = strstr(p + 1, "published ")) {
        char want[64];

        snprintf(want, sizeof(want), "done %" PRIu64 " attempt 1: acked",
                 (uint64_t)strtoull(p + 10, NULL, 10));
        ck_assert_msg(strstr(out, want) != NULL, "no '%s' in:\n%s", want, out);
    }
    pq_check_ok(c, protoq_queue_stat(c, "train", &qi));
    ck_assert_uint_eq(qi.acked, 3);
    ck_assert_uint_eq(qi.ready + qi.delayed + qi.inflight, 0);
    protoq_close(c);
}
END_TEST

/* producer -r stores the requirement with the job. */
START_TEST(test_producer_sets_requirements)
{
    static const char *const pub_args[] = {"-n",       "1",     "-r",
                                           "gpu=a100", "train", NULL};
    static char out[4096];
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_job *jobs = NULL;
    size_t n = 0;
    int rc;

    pq_check_ok(c, protoq_queue_create(c, "train", NULL));
    rc = run_example("producer", pub_args, out, sizeof(out));
    ck_assert_msg(rc == 0, "producer exited %d: %s", rc, out);
    pq_check_ok(
        c, protoq_job_list(c, "train", PROTOQ_JOB_ANY, 10, 0, &jobs, &n, NULL));
    ck_assert_uint_eq(n, 1);
    ck_assert_uint_eq(jobs[0].n_requires, 1);
    ck_assert_str_eq(jobs[0].requires[0].key, "gpu");
    ck_assert_str_eq(jobs[0].requires[0].value, "a100");
    protoq_job_list_free(jobs, n);
    protoq_close(c);
}
END_TEST

struct held {
    uint64_t id;
    uint32_t attempt;
};

static void
hold(void *arg, protoq_client *c, const struct protoq_delivery *d)
{
    struct held *h = arg;

    (void)c;
    h->id = d->message_id;
    h->attempt = d->attempt;
}

/* A job whose first attempt reported checkpoint step-8 and failed is
 * resumed by worker_thread from step 8. */
START_TEST(test_worker_resumes_from_checkpoint)
{
    static const char *const work_args[] = {"-n", "1", "train", NULL};
    static char out[8192];
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a;
    struct protoq_message m;
    struct protoq_progress pr = {.percent = 80, .checkpoint = "step-8"};
    struct held h = {0};
    uint64_t sub;
    int64_t end = now_ms_mono() + 5000;
    int rc;

    memset(&a, 0, sizeof(a));
    a.no_backoff = true;
    pq_check_ok(c, protoq_queue_create(c, "train", &a));
    memset(&m, 0, sizeof(m));
    m.payload = "steps=10";
    m.len = 8;
    pq_check_ok(c, protoq_publish(c, "train", &m, NULL));
    pq_check_ok(c, protoq_subscribe(c, "train", 1, NULL, 0, hold, &h, &sub));
    while (h.id == 0 && now_ms_mono() < end) {
        ck_assert_int_ge(protoq_poll(c, 100), 0);
    }
    ck_assert_uint_ne(h.id, 0);
    pq_check_ok(c, protoq_flow(c, sub, 0));
    pq_check_ok(c, protoq_touch(c, h.id, h.attempt, 0, &pr, NULL));
    pq_check_ok(c, protoq_nack_sync(c, h.id, h.attempt, 0, false, "preempted"));
    pq_check_ok(c, protoq_unsubscribe(c, sub));

    rc = run_example("worker_thread", work_args, out, sizeof(out));
    ck_assert_msg(rc == 0, "worker_thread exited %d: %s", rc, out);
    ck_assert_msg(strstr(out, "attempt 2 from step 8 of 10") != NULL, "%s",
                  out);
    ck_assert_msg(strstr(out, ": acked") != NULL, "%s", out);
    protoq_close(c);
}
END_TEST

static Suite *
examples_suite(void)
{
    Suite *s = suite_create("examples");
    TCase *tc = tcase_create("examples");

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_producer_and_threaded_worker);
    tcase_add_test(tc, test_producer_sets_requirements);
    tcase_add_test(tc, test_worker_resumes_from_checkpoint);
    suite_add_tcase(s, tc);
    return s;
}

int
main(void)
{
    SRunner *sr = srunner_create(examples_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
