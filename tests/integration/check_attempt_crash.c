/*
 * check_attempt_crash.c: the attempt counter of a job that was running
 * when protoqd was killed -9 (issue 10). Its delivery was recorded
 * (REC_DELIVER), so after the restart it is a failed attempt, as if its
 * consumer had been lost: the job comes back as the next attempt, `protoq
 * job` shows the attempt and the failure, and at max_attempts it is
 * dead-lettered (x-death-reason max_attempts). A job that takes the broker
 * down each time thus ends in the dead-letter queue instead of looping at
 * attempt 1. A SIGTERM is no failure: the broker releases what runs.
 *
 * Every test gets a fresh broker (jobs_fixture.h: backoff 10..40 ms) and
 * every wait is bounded. The delivery's record is not waited for by the
 * broker; each test makes it durable before the kill -9 with a confirmed
 * publish (the log is written in order, so everything before that publish
 * is on disk once it is confirmed).
 */
#include <check.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jobs_fixture.h"
#include "testutil.h"

/* Everything the broker appended so far is on disk: a publish to another
 * queue, confirmed (durable) only after every earlier record. */
static void
log_barrier(protoq_client *p)
{
    pub(p, "sync", "barrier");
}

/* The job's state as JobGet (what `protoq job` prints) shows it. */
static struct protoq_job
job_of(protoq_client *p, const char *q, uint64_t id)
{
    struct protoq_job j;

    memset(&j, 0, sizeof(j));
    pq_check_ok(p, protoq_job_get(p, q, id, &j));
    return j;
}

/* kill -9 while k holds the job, then start on the same data dir. k's
 * connection dies with the broker and is closed here. */
static void
crash_with(struct cons *k)
{
    srv_kill9(&g_srv);
    cons_close(k);
    ck_assert_msg(srv_launch(&g_srv) == 0, "launch after kill -9 failed");
}

/* A job running on a consumer: queue `jobs` (attributes a, a lease long
 * enough that it does not end by itself) and `sync`, one job published
 * and delivered as attempt 1, its DELIVER on disk. Returns the consumer
 * holding it (its id in *id); the publisher's connection is closed. */
static struct cons *
running_job(struct protoq_queue_attrs *a, uint64_t *id)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct cons *k;
    struct got g;

    a->ack_timeout_ms = 60000;
    mkq(p, "jobs", a);
    mkq(p, "sync", NULL);
    *id = pub(p, "jobs", "x");
    k = cons_open("jobs", 1);
    cons_must_get(k, 3000, &g, "the job");
    ck_assert_uint_eq(g.id, *id);
    ck_assert_uint_eq(g.attempt, 1);
    log_barrier(p);
    protoq_close(p);
    return k;
}

START_TEST(test_kill9_running_job_comes_back_as_next_attempt)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a = attrs_fast();
    struct protoq_job j;
    struct cons *k;
    struct got g;
    uint64_t id;
    uint32_t n;

    a.ack_timeout_ms = 60000; /* the old lease must not be what frees it */
    a.max_attempts = 5;
    mkq(p, "jobs", &a);
    mkq(p, "sync", NULL);
    id = pub(p, "jobs", "takes the broker down");
    /* Three deliveries in a row end in a kill -9: attempts 1, 2, 3. */
    for (n = 1; n <= 3; n++) {
        k = cons_open("jobs", 1);
        cons_must_get(k, 3000, &g, "the job");
        ck_assert_uint_eq(g.id, id);
        ck_assert_msg(g.attempt == n,
                      "delivery %u after %u kill -9: attempt %u, want %u", n,
                      n - 1, g.attempt, n);
        log_barrier(p);
        protoq_close(p);
        crash_with(k);
        p = pq_connect_or_fail(&g_srv);
        j = job_of(p, "jobs", id);
        ck_assert_msg(j.attempt == n && j.failures == n,
                      "after kill -9 number %u: job shows attempt %u failures "
                      "%u, want %u and %u",
                      n, j.attempt, j.failures, n, n);
        ck_assert_msg(
            j.state == PROTOQ_JOB_READY || j.state == PROTOQ_JOB_DELAYED,
            "state %s after the restart", protoq_job_state_name(j.state));
        protoq_job_fini(&j);
    }
    k = cons_open("jobs", 1);
    cons_must_get(k, 3000, &g, "the job after three kill -9");
    ck_assert_uint_eq(g.id, id);
    ck_assert_uint_eq(g.attempt, 4);
    check_payload(&g, "takes the broker down");
    pq_check_ok(k->c, protoq_ack_sync(k->c, id, g.attempt));
    ck_assert_uint_eq(stat_wait(p, "jobs", SF_TOTAL, 0, 2000), 0);
    cons_close(k);
    protoq_close(p);
}
END_TEST

/* `protoq job` (the CLI) prints the counted attempt after the restart. */
START_TEST(test_kill9_cli_job_shows_counted_attempt)
{
    struct protoq_queue_attrs a = attrs_fast();
    char idbuf[24], outpath[320], out[2048];
    uint64_t id;
    int rc;

    crash_with(running_job(&a, &id));
    snprintf(idbuf, sizeof(idbuf), "%" PRIu64, id);
    snprintf(outpath, sizeof(outpath), "%s/cli.out", g_srv.dir);
    {
        const char *bin = getenv("PROTOQ");
        const char *argv[] = {bin && bin[0] ? bin : "build/protoq",
                              "-s",
                              g_srv.addr,
                              "job",
                              "jobs",
                              idbuf,
                              NULL};

        rc = prog_run(argv, outpath, 5000);
    }
    file_slurp(outpath, out, sizeof(out));
    ck_assert_msg(rc == 0, "protoq job exited %d: %s", rc, out);
    ck_assert_msg(strstr(out, "\nattempt: 1\n") != NULL &&
                      strstr(out, "\nfailures: 1\n") != NULL,
                  "protoq job after kill -9:\n%s", out);
}
END_TEST

/* max_attempts 1: the attempt that was running at the kill -9 was the
 * last one; the start dead-letters the job as a lost consumer's last
 * attempt would (x-death-reason max_attempts, x-death-attempts 1), once. */
START_TEST(test_kill9_running_job_dead_letters_at_max_attempts)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a = attrs_fast();
    struct protoq_queue_info st;
    struct cons *k;
    struct got g;
    uint64_t id;

    a.max_attempts = 1;
    snprintf(a.dead_letter, sizeof(a.dead_letter), "dlq");
    mkq(p, "dlq", NULL);
    protoq_close(p);
    crash_with(running_job(&a, &id));
    p = pq_connect_or_fail(&g_srv);
    st = qstat(p, "jobs");
    ck_assert_msg(qtotal(&st) == 0,
                  "jobs still holds %" PRIu64 " after the kill -9 of its last "
                  "attempt",
                  qtotal(&st));
    ck_assert_uint_eq(stat_wait(p, "dlq", SF_TOTAL, 1, 2000), 1);
    /* A clean restart keeps it where it is: the dead letter was logged. */
    protoq_close(p);
    ck_assert_int_eq(srv_restart(&g_srv), 0);
    p = pq_connect_or_fail(&g_srv);
    st = qstat(p, "jobs");
    ck_assert_uint_eq(qtotal(&st), 0);
    k = cons_open("dlq", 1);
    cons_must_get(k, 3000, &g, "the dead letter");
    ck_assert_uint_eq(g.id, id);
    check_payload(&g, "x");
    check_header(&g, "x-death-reason", "max_attempts");
    check_header(&g, "x-death-attempts", "1");
    check_header(&g, "x-death-queue", "jobs");
    cons_none(k, 200, "a second copy of the dead letter");
    cons_close(k);
    protoq_close(p);
}
END_TEST

/* SIGTERM: the broker releases the running job (not a failure); the
 * DELIVER before that release counts nothing. */
START_TEST(test_sigterm_running_job_counts_no_failure)
{
    struct protoq_queue_attrs a = attrs_fast();
    protoq_client *p;
    struct protoq_job j;
    struct cons *k;
    struct got g;
    uint64_t id;

    k = running_job(&a, &id);
    ck_assert_int_eq(srv_restart(&g_srv), 0);
    cons_close(k);
    p = pq_connect_or_fail(&g_srv);
    j = job_of(p, "jobs", id);
    ck_assert_msg(j.attempt == 1 && j.failures == 0,
                  "after SIGTERM: attempt %u failures %u, want 1 and 0",
                  j.attempt, j.failures);
    protoq_job_fini(&j);
    k = cons_open("jobs", 1);
    cons_must_get(k, 3000, &g, "the job after SIGTERM");
    ck_assert_uint_eq(g.attempt, 2);
    cons_close(k);
    protoq_close(p);
}
END_TEST

static Suite *
attempt_crash_suite(void)
{
    Suite *s = suite_create("attempt_crash");
    TCase *tc = tcase("kill9", 30);

    tcase_add_test(tc, test_kill9_running_job_comes_back_as_next_attempt);
    tcase_add_test(tc, test_kill9_cli_job_shows_counted_attempt);
    tcase_add_test(tc, test_kill9_running_job_dead_letters_at_max_attempts);
    tcase_add_test(tc, test_sigterm_running_job_counts_no_failure);
    suite_add_tcase(s, tc);
    return s;
}

int
main(void)
{
    return jobs_main(attempt_crash_suite());
}
