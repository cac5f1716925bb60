/*
 * check_results.c: results and follow-ups against a real protoqd (issue 11,
 * parts "Results" and "Follow-up publishes").
 *
 * Covered: an ack's result reaches the job's reply_to with its correlation
 * id and the protoq-* headers; a reply_to that does not exist is refused
 * at publish; one deleted later, or full, never makes the ack fail; a
 * result over max_result_bytes refuses the ack and leaves the job in
 * flight; follow-ups are published with the ack (a confirmed ack returns
 * their ids), and a refused one refuses
 * the ack and changes nothing; failure notices for a job dead-lettered
 * after max attempts, dropped by its TTL, or cancelled (ready and in
 * flight, with the last nack's error); a plain ack sends an empty result
 * (also after a restart, and with every payload evicted); across kill -9,
 * a job's result and follow-up exist exactly when its ack does; `protoq
 * pub --wait` against `protoq work` and against a poison job (exit 3).
 */
#include <check.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "testutil.h"

static struct srv g_srv;
static struct test_conf g_conf;
static const char *const g_args[] = {"-c", g_conf.path, NULL};

static void
setup(void)
{
    ck_assert_msg(srv_start(&g_srv, g_args) == 0, "protoqd did not start");
}

static void
teardown(void)
{
    srv_cleanup(&g_srv);
}

/* ------------------------------------------------------------ helpers */

enum { HDRS = 16 };

/* One delivery, copied. */
struct one {
    int n; /* deliveries seen since the last take */
    uint64_t id;
    uint32_t attempt;
    char payload[256];
    size_t len;
    char cid[128];
    size_t n_hdr;
    char hk[HDRS][64];
    char hv[HDRS][256];
};

static void
on_one(void *arg, protoq_client *c, const struct protoq_delivery *d)
{
    struct one *o = arg;

    (void)c;
    o->n++;
    o->id = d->message_id;
    o->attempt = d->attempt;
    o->len = d->len < sizeof(o->payload) - 1 ? d->len : sizeof(o->payload) - 1;
    memcpy(o->payload, d->payload, o->len);
    o->payload[o->len] = '\0';
    snprintf(o->cid, sizeof(o->cid), "%s", d->correlation_id);
    o->n_hdr = d->n_headers < HDRS ? d->n_headers : HDRS;
    for (size_t i = 0; i < o->n_hdr; i++) {
        snprintf(o->hk[i], sizeof(o->hk[i]), "%s", d->headers[i].key);
        snprintf(o->hv[i], sizeof(o->hv[i]), "%s", d->headers[i].value);
    }
}

/* take: subscribe c to q (prefetch 1) and wait up to ms for one delivery
 * into *o; returns whether one came. The subscription stays. */
static bool
take(protoq_client *c, const char *q, struct one *o, int ms)
{
    int64_t end = now_ms_mono() + ms;

    memset(o, 0, sizeof(*o));
    pq_check_ok(c, protoq_subscribe(c, q, 1, NULL, 0, on_one, o, NULL));
    while (o->n == 0 && now_ms_mono() < end) {
        ck_assert_int_ge(protoq_poll(c, 50), 0);
    }
    return o->n > 0;
}

static const char *
hdr(const struct one *o, const char *k)
{
    for (size_t i = 0; i < o->n_hdr; i++) {
        if (strcmp(o->hk[i], k) == 0) {
            return o->hv[i];
        }
    }
    return "";
}

static void
mkq(protoq_client *c, const char *name, uint64_t max_length)
{
    struct protoq_queue_attrs a;

    memset(&a, 0, sizeof(a));
    a.max_length = max_length;
    pq_check_ok(c, protoq_queue_create(c, name, &a));
}

/* submit: publish payload to q with reply_to (and correlation id cid). */
static uint64_t
submit(protoq_client *c, const char *q, const char *payload,
       const char *reply_to, const char *cid)
{
    struct protoq_message m;
    uint64_t id = 0;

    memset(&m, 0, sizeof(m));
    m.payload = payload;
    m.len = strlen(payload);
    m.reply_to = reply_to;
    m.correlation_id = cid;
    pq_check_ok(c, protoq_publish(c, q, &m, &id));
    return id;
}

static uint64_t
ready_count(protoq_client *c, const char *q)
{
    struct protoq_queue_info st;

    pq_check_ok(c, protoq_queue_stat(c, q, &st));
    return st.ready + st.delayed + st.inflight;
}

/* ack_result: confirmed ack of o carrying result (and follow-ups). */
static int
ack_result(protoq_client *c, const struct one *o, const char *result,
           const char *const *fq, const struct protoq_message *fu, size_t nf)
{
    struct protoq_ack_opts ao = {
        .confirm = true,
        .result = result,
        .result_len = result ? strlen(result) : 0,
        .follow_up_queues = fq,
        .follow_ups = fu,
        .n_follow_ups = nf,
    };

    return protoq_ack_ex(c, o->id, o->attempt, &ao);
}

/* ------------------------------------------------------------ results */

START_TEST(test_result_reaches_reply_to_with_correlation_id)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    protoq_client *w = pq_connect_or_fail(&g_srv);
    struct one job, res;
    char idbuf[32];
    uint64_t id;

    mkq(p, "jobs", 0);
    mkq(p, "replies", 0);
    id = submit(p, "jobs", "train", "replies", "run-7");
    ck_assert(take(w, "jobs", &job, 3000));
    ck_assert_uint_eq(job.id, id);
    pq_check_ok(w, ack_result(w, &job, "loss=0.1", NULL, NULL, 0));
    ck_assert_msg(take(p, "replies", &res, 3000), "no result arrived");
    ck_assert_str_eq(res.payload, "loss=0.1");
    ck_assert_str_eq(res.cid, "run-7");
    snprintf(idbuf, sizeof(idbuf), "%" PRIu64, id);
    ck_assert_str_eq(hdr(&res, "protoq-status"), "ok");
    ck_assert_str_eq(hdr(&res, "protoq-job-id"), idbuf);
    ck_assert_str_eq(hdr(&res, "protoq-queue"), "jobs");
    ck_assert_str_eq(hdr(&res, "protoq-attempt"), "1");
    ck_assert_str_eq(hdr(&res, "protoq-correlation-id"), "run-7");
    ck_assert_uint_eq(ready_count(p, "jobs"), 0);
    protoq_close(w);
    protoq_close(p);
}
END_TEST

START_TEST(test_reply_to_missing_queue_is_refused_at_publish)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_message m;

    mkq(p, "jobs", 0);
    memset(&m, 0, sizeof(m));
    m.payload = "x";
    m.len = 1;
    m.reply_to = "nobody";
    pq_check_remote(p, protoq_publish(p, "jobs", &m, NULL),
                    PROTOQ_CODE_QUEUE_NOT_FOUND);
    ck_assert_uint_eq(ready_count(p, "jobs"), 0);
    protoq_close(p);
}
END_TEST

/* A reply_to deleted after the publish: the ack still succeeds and the
 * result goes nowhere; a full one: it takes the result anyway. */
START_TEST(test_reply_to_deleted_or_full_never_fails_the_ack)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    protoq_client *w = pq_connect_or_fail(&g_srv);
    struct one job, res;

    mkq(p, "jobs", 0);
    mkq(p, "gone", 0);
    mkq(p, "tiny", 1);
    submit(p, "jobs", "a", "gone", NULL);
    pq_check_ok(p, protoq_queue_delete(p, "gone"));
    ck_assert(take(w, "jobs", &job, 3000));
    pq_check_ok(w, ack_result(w, &job, "r1", NULL, NULL, 0));
    ck_assert_uint_eq(ready_count(p, "jobs"), 0);

    protoq_close(w);
    w = pq_connect_or_fail(&g_srv);
    submit(p, "tiny", "filler", NULL, NULL);
    submit(p, "jobs", "b", "tiny", NULL);
    ck_assert(take(w, "jobs", &job, 3000));
    pq_check_ok(w, ack_result(w, &job, "r2", NULL, NULL, 0));
    ck_assert_uint_eq(ready_count(p, "jobs"), 0);
    ck_assert_uint_eq(ready_count(p, "tiny"), 2);
    ck_assert(take(p, "tiny", &res, 3000));
    ck_assert_str_eq(res.payload, "filler");
    protoq_close(w);
    protoq_close(p);
}
END_TEST

START_TEST(test_result_over_limit_refuses_ack_and_job_stays)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    protoq_client *w = pq_connect_or_fail(&g_srv);
    char big[2048];
    struct one job, res;

    mkq(p, "jobs", 0);
    mkq(p, "replies", 0);
    submit(p, "jobs", "a", "replies", NULL);
    ck_assert(take(w, "jobs", &job, 3000));
    memset(big, 'x', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0'; /* over max_result_bytes 1024 */
    pq_check_remote(w, ack_result(w, &job, big, NULL, NULL, 0),
                    PROTOQ_CODE_MESSAGE_TOO_LARGE);
    ck_assert_uint_eq(ready_count(p, "jobs"), 1);
    ck_assert_uint_eq(ready_count(p, "replies"), 0);
    /* the same delivery can still be acked */
    pq_check_ok(w, ack_result(w, &job, "small", NULL, NULL, 0));
    ck_assert(take(p, "replies", &res, 3000));
    ck_assert_str_eq(res.payload, "small");
    protoq_close(w);
    protoq_close(p);
}
END_TEST

/* ---------------------------------------------------------- follow-ups */

START_TEST(test_follow_ups_are_published_with_the_ack)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    protoq_client *w = pq_connect_or_fail(&g_srv);
    const char *const fq[] = {"eval", "report"};
    struct protoq_message fu[2];
    uint64_t ids[2] = {0, 0};
    struct protoq_ack_opts ao = {
        .confirm = true,
        .follow_up_queues = fq,
        .follow_ups = fu,
        .n_follow_ups = 2,
        .follow_up_ids = ids,
    };
    struct one job, next;

    mkq(p, "jobs", 0);
    mkq(p, "eval", 0);
    mkq(p, "report", 0);
    submit(p, "jobs", "train", NULL, NULL);
    memset(fu, 0, sizeof(fu));
    fu[0].payload = "eval-it";
    fu[0].len = 7;
    fu[1].payload = "report-it";
    fu[1].len = 9;
    ck_assert(take(w, "jobs", &job, 3000));
    /* confirmed: AckOk names the follow-ups' ids, in order */
    pq_check_ok(w, protoq_ack_ex(w, job.id, job.attempt, &ao));
    ck_assert_uint_gt(ids[0], job.id);
    ck_assert_uint_gt(ids[1], ids[0]);
    ck_assert_uint_eq(ready_count(p, "jobs"), 0);
    ck_assert(take(p, "eval", &next, 3000));
    ck_assert_str_eq(next.payload, "eval-it");
    ck_assert_uint_eq(next.id, ids[0]);
    ck_assert_uint_eq(ready_count(p, "report"), 1);
    ck_assert(take(w, "report", &next, 3000));
    ck_assert_uint_eq(next.id, ids[1]);
    protoq_close(w);
    protoq_close(p);
}
END_TEST

/* Any follow-up refused (missing queue, full queue): the ack is refused
 * with its error and nothing changes. */
START_TEST(test_refused_follow_up_refuses_the_ack)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    protoq_client *w = pq_connect_or_fail(&g_srv);
    const char *const missing[] = {"eval", "nowhere"};
    const char *const tofull[] = {"eval", "tiny"};
    struct protoq_message fu[2];
    struct one job;

    mkq(p, "jobs", 0);
    mkq(p, "eval", 0);
    mkq(p, "tiny", 1);
    submit(p, "tiny", "filler", NULL, NULL);
    submit(p, "jobs", "train", NULL, NULL);
    memset(fu, 0, sizeof(fu));
    fu[0].payload = fu[1].payload = "next";
    fu[0].len = fu[1].len = 4;
    ck_assert(take(w, "jobs", &job, 3000));
    pq_check_remote(w, ack_result(w, &job, NULL, missing, fu, 2),
                    PROTOQ_CODE_QUEUE_NOT_FOUND);
    pq_check_remote(w, ack_result(w, &job, NULL, tofull, fu, 2),
                    PROTOQ_CODE_QUEUE_FULL);
    ck_assert_uint_eq(ready_count(p, "jobs"), 1);
    ck_assert_uint_eq(ready_count(p, "eval"), 0);
    ck_assert_uint_eq(ready_count(p, "tiny"), 1);
    /* the job is still held: a plain ack works */
    pq_check_ok(w, protoq_ack_sync(w, job.id, job.attempt));
    ck_assert_uint_eq(ready_count(p, "jobs"), 0);
    ck_assert_uint_eq(ready_count(p, "eval"), 0);
    protoq_close(w);
    protoq_close(p);
}
END_TEST

/* ------------------------------------------------------------- notices */

START_TEST(test_notice_when_dead_lettered_after_max_attempts)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a;
    struct one job, res;
    protoq_client *w;

    memset(&a, 0, sizeof(a));
    a.max_attempts = 2;
    a.backoff_base_ms = 1;
    a.backoff_cap_ms = 1;
    snprintf(a.dead_letter, sizeof(a.dead_letter), "dlq");
    mkq(p, "dlq", 0);
    mkq(p, "replies", 0);
    pq_check_ok(p, protoq_queue_create(p, "jobs", &a));
    submit(p, "jobs", "poison", "replies", "c1");
    w = pq_connect_or_fail(&g_srv);
    ck_assert(take(w, "jobs", &job, 3000));
    pq_check_ok(w, protoq_nack_sync(w, job.id, job.attempt, 0, false, "bad"));
    for (int i = 0; i < 60 && job.attempt < 2; i++) {
        ck_assert_int_ge(protoq_poll(w, 50), 0);
    }
    ck_assert_uint_eq(job.attempt, 2);
    pq_check_ok(w, protoq_nack_sync(w, job.id, job.attempt, 0, false, "boom"));
    ck_assert_msg(take(p, "replies", &res, 3000), "no failure notice");
    ck_assert_str_eq(hdr(&res, "protoq-status"), "failed");
    ck_assert_str_eq(hdr(&res, "protoq-reason"), "max_attempts");
    ck_assert_str_eq(hdr(&res, "protoq-error"), "boom");
    ck_assert_str_eq(hdr(&res, "protoq-dead-letter"), "dlq");
    ck_assert_str_eq(hdr(&res, "protoq-attempt"), "2");
    ck_assert_str_eq(res.cid, "c1");
    ck_assert_str_eq(res.payload, "boom");
    ck_assert_uint_eq(ready_count(p, "dlq"), 1);
    protoq_close(w);
    protoq_close(p);
}
END_TEST

START_TEST(test_notice_when_expired_or_cancelled)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    protoq_client *w = pq_connect_or_fail(&g_srv);
    struct protoq_message m;
    struct one job, res;
    uint64_t id;

    mkq(p, "jobs", 0);
    mkq(p, "replies", 0);
    memset(&m, 0, sizeof(m));
    m.payload = "late";
    m.len = 4;
    m.reply_to = "replies";
    m.ttl_ms = 50;
    pq_check_ok(p, protoq_publish(p, "jobs", &m, NULL));
    ck_assert(take(p, "replies", &res, 3000));
    ck_assert_str_eq(hdr(&res, "protoq-reason"), "expired");
    pq_check_ok(p, protoq_ack_sync(p, res.id, res.attempt));

    /* cancelled while ready */
    id = submit(p, "jobs", "r", "replies", "ready");
    res.n = 0; /* the notice may arrive while cancel waits for its Ok */
    pq_check_ok(p, protoq_cancel(p, "jobs", id));
    for (int i = 0; i < 60 && res.n == 0; i++) {
        protoq_poll(p, 50);
    }
    ck_assert_int_eq(res.n, 1);
    ck_assert_str_eq(hdr(&res, "protoq-reason"), "cancelled");
    ck_assert_str_eq(res.cid, "ready");
    pq_check_ok(p, protoq_ack_sync(p, res.id, res.attempt));

    /* cancelled in flight: told at the cancel, once */
    id = submit(p, "jobs", "f", "replies", "inflight");
    ck_assert(take(w, "jobs", &job, 3000));
    res.n = 0;
    pq_check_ok(p, protoq_cancel(p, "jobs", id));
    for (int i = 0; i < 60 && res.n == 0; i++) {
        protoq_poll(p, 50);
    }
    ck_assert_int_eq(res.n, 1);
    ck_assert_str_eq(hdr(&res, "protoq-reason"), "cancelled");
    ck_assert_str_eq(res.cid, "inflight");
    pq_check_ok(p, protoq_ack_sync(p, res.id, res.attempt));
    /* cancelling it again is Ok and adds no second notice (it did: found
     * by the model test, seed 1796158274819) */
    pq_check_ok(p, protoq_cancel(p, "jobs", id));
    res.n = 0;
    for (int i = 0; i < 6; i++) {
        protoq_poll(p, 50);
    }
    ck_assert_int_eq(res.n, 0);
    ck_assert_uint_eq(ready_count(p, "replies"), 0);
    /* the holder's fenced answer adds no second notice */
    protoq_ack_sync(w, job.id, job.attempt);
    res.n = 0;
    for (int i = 0; i < 6; i++) {
        protoq_poll(p, 50);
    }
    ck_assert_int_eq(res.n, 0);
    ck_assert_uint_eq(ready_count(p, "replies"), 0);
    protoq_close(w);
    protoq_close(p);
}
END_TEST

/* A job nacked with an error, then cancelled while in flight again: its
 * notice carries that error (protoq-error and the payload), as for a
 * ready job and as PROTOCOL.md says ("the last Nack error text, when there
 * was one"). The in-flight cancel built its notice without it. */
START_TEST(test_inflight_cancel_notice_has_last_error)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    protoq_client *w = pq_connect_or_fail(&g_srv);
    struct one job, res;
    uint64_t id;

    mkq(p, "jobs", 0);
    mkq(p, "replies", 0);
    id = submit(p, "jobs", "j", "replies", "cx");
    ck_assert(take(w, "jobs", &job, 3000));
    job.n = 0;
    pq_check_ok(w, protoq_nack_sync(w, job.id, job.attempt, 1, false, "oom"));
    for (int i = 0; i < 60 && job.n == 0; i++) {
        ck_assert_int_ge(protoq_poll(w, 50), 0);
    }
    ck_assert_int_eq(job.n, 1);
    ck_assert_uint_eq(job.attempt, 2);
    ck_assert_uint_eq(job.id, id);
    pq_check_ok(p, protoq_cancel(p, "jobs", id));
    ck_assert_msg(take(p, "replies", &res, 3000), "no notice arrived");
    ck_assert_str_eq(hdr(&res, "protoq-reason"), "cancelled");
    ck_assert_str_eq(hdr(&res, "protoq-attempt"), "2");
    ck_assert_str_eq(hdr(&res, "protoq-error"), "oom");
    ck_assert_str_eq(res.payload, "oom");
    protoq_close(w);
    protoq_close(p);
}
END_TEST

/* A plain ack (no result, no follow-ups) of a job with a reply_to sends
 * its (empty) result, pipelined or confirmed, also for a job published
 * before a restart: PROTOCOL.md "the Ack's result (it may be empty)", and
 * `protoq pub --wait` on a job whose command prints nothing. It sent
 * nothing (only an ack with extras built a result). */
static void
plain_ack_sends_empty_result(bool restart)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    protoq_client *w;
    struct one job, res;
    char idbuf[32];
    uint64_t id[2];

    mkq(p, "jobs", 0);
    mkq(p, "replies", 0);
    id[0] = submit(p, "jobs", "quiet", "replies", "q1");
    id[1] = submit(p, "jobs", "quiet", "replies", "q2");
    if (restart) {
        protoq_close(p);
        ck_assert_int_eq(srv_restart(&g_srv), 0);
        p = pq_connect_or_fail(&g_srv);
    }
    w = pq_connect_or_fail(&g_srv);
    for (int i = 0; i < 2; i++) {
        ck_assert(take(w, "jobs", &job, 3000));
        ck_assert_uint_eq(job.id, id[i]);
        if (i == 0) {
            pq_check_ok(w, protoq_ack_sync(w, job.id, job.attempt));
        } else {
            pq_check_ok(w, protoq_ack(w, job.id, job.attempt));
            (void)ready_count(w, "jobs"); /* sent */
        }
        ck_assert_msg(take(p, "replies", &res, 3000),
                      "no result arrived for job %d (attempt %u)", i,
                      job.attempt);
        snprintf(idbuf, sizeof(idbuf), "%" PRIu64, id[i]);
        ck_assert_str_eq(hdr(&res, "protoq-status"), "ok");
        ck_assert_str_eq(hdr(&res, "protoq-job-id"), idbuf);
        ck_assert_str_eq(res.cid, i == 0 ? "q1" : "q2");
        ck_assert_uint_eq(res.len, 0);
        pq_check_ok(p, protoq_ack_sync(p, res.id, res.attempt));
        protoq_close(w);
        w = pq_connect_or_fail(&g_srv);
    }
    protoq_close(w);
    protoq_close(p);
}

START_TEST(test_plain_ack_sends_empty_result)
{
    plain_ack_sends_empty_result(_i == 1);
}
END_TEST

/* ------------------------------------------------------------- evicted */

static struct test_conf g_conf_evicted;
static const char *const g_args_evicted[] = {"-c", g_conf_evicted.path, NULL};

static void
setup_evicted(void)
{
    ck_assert_msg(srv_start(&g_srv, g_args_evicted) == 0,
                  "protoqd did not start");
}

/* Every payload stays on disk only (payload_budget_bytes 0). A job
 * dead-lettered with an error: its dead letter is built from the body read
 * back and the x-death headers of the event, whose x-death-error pointed
 * at the error text dead_letter() had already freed (garbage, or a crash
 * under ASan, before the fix); the failure notice reads the same headers. */
START_TEST(test_evicted_dead_letter_keeps_its_error_text)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    protoq_client *w = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a;
    struct one job, dead, res;

    memset(&a, 0, sizeof(a));
    a.max_attempts = 1;
    snprintf(a.dead_letter, sizeof(a.dead_letter), "dlq");
    mkq(p, "dlq", 0);
    mkq(p, "replies", 0);
    pq_check_ok(p, protoq_queue_create(p, "jobs", &a));
    submit(p, "jobs", "evicted job", "replies", "e1");
    ck_assert(take(w, "jobs", &job, 3000));
    ck_assert_str_eq(job.payload, "evicted job");
    pq_check_ok(w, protoq_nack_sync(w, job.id, job.attempt, 0, false,
                                    "the error text of the last attempt"));
    ck_assert(take(p, "dlq", &dead, 3000));
    ck_assert_str_eq(dead.payload, "evicted job");
    ck_assert_str_eq(hdr(&dead, "x-death-error"),
                     "the error text of the last attempt");
    ck_assert(take(w, "replies", &res, 3000));
    ck_assert_str_eq(hdr(&res, "protoq-error"),
                     "the error text of the last attempt");
    ck_assert_str_eq(res.cid, "e1");
    protoq_close(w);
    protoq_close(p);
}
END_TEST

/* --------------------------------------------------------------- crash */

enum { CRASH_JOBS = 200 };

struct tally {
    int jobs[CRASH_JOBS];    /* job i still in "jobs" */
    int results[CRASH_JOBS]; /* results naming job i */
    int follows[CRASH_JOBS]; /* follow-ups of job i */
    uint64_t ids[CRASH_JOBS];
};

static int
job_index(const struct tally *t, uint64_t id)
{
    for (int i = 0; i < CRASH_JOBS; i++) {
        if (t->ids[i] == id) {
            return i;
        }
    }
    return -1;
}

struct drain {
    struct tally *t;
    int kind; /* 0 jobs, 1 results, 2 follow-ups */
    int n;
};

static void
on_drain(void *arg, protoq_client *c, const struct protoq_delivery *d)
{
    struct drain *dr = arg;
    uint64_t id = 0;
    int i;

    dr->n++;
    if (dr->kind == 0) {
        id = d->message_id;
    } else if (dr->kind == 1) {
        for (size_t k = 0; k < d->n_headers; k++) {
            if (strcmp(d->headers[k].key, "protoq-job-id") == 0) {
                id = strtoull(d->headers[k].value, NULL, 10);
            }
        }
    } else {
        id = strtoull(d->correlation_id, NULL, 10);
    }
    i = job_index(dr->t, id);
    ck_assert_int_ge(i, 0);
    (dr->kind == 0   ? dr->t->jobs
     : dr->kind == 1 ? dr->t->results
                     : dr->t->follows)[i]++;
    protoq_ack(c, d->message_id, d->attempt);
}

static void
drain(protoq_client *c, const char *q, struct drain *dr, uint64_t want)
{
    int64_t end = now_ms_mono() + 5000;

    pq_check_ok(c, protoq_subscribe(c, q, 64, NULL, 0, on_drain, dr, NULL));
    while ((uint64_t)dr->n < want && now_ms_mono() < end) {
        ck_assert_int_ge(protoq_poll(c, 50), 0);
    }
    ck_assert_uint_eq((uint64_t)dr->n, want);
}

struct acker {
    struct tally *t;
    int acked;
};

/* Ack every job with a result and one follow-up (its id as correlation
 * id), pipelined, without waiting for anything. */
static void
on_job(void *arg, protoq_client *c, const struct protoq_delivery *d)
{
    struct acker *a = arg;
    static const char *const fq[] = {"next"};
    char cid[32];
    struct protoq_message fu;
    struct protoq_ack_opts ao = {
        .result = "done",
        .result_len = 4,
        .follow_up_queues = fq,
        .follow_ups = &fu,
        .n_follow_ups = 1,
    };

    snprintf(cid, sizeof(cid), "%" PRIu64, d->message_id);
    memset(&fu, 0, sizeof(fu));
    fu.payload = "step2";
    fu.len = 5;
    fu.correlation_id = cid;
    protoq_ack_ex(c, d->message_id, d->attempt, &ao);
    a->acked++;
}

/* A result and a follow-up exist exactly when the ack does, after kill -9
 * in the middle of a stream of acks (mode 0), and after a clean restart
 * (mode 1: replay of the atomic records). */
START_TEST(test_kill9_result_and_follow_up_exactly_with_ack)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    protoq_client *w = pq_connect_or_fail(&g_srv);
    struct tally *t = calloc(1, sizeof(*t));
    struct acker a = {.t = t};
    struct drain dj = {.t = t, .kind = 0}, dres = {.t = t, .kind = 1},
                 dnext = {.t = t, .kind = 2};
    uint64_t left, nres, nnext;
    int64_t end;

    ck_assert_ptr_nonnull(t);
    mkq(p, "jobs", 0);
    mkq(p, "replies", 0);
    mkq(p, "next", 0);
    for (int i = 0; i < CRASH_JOBS; i++) {
        t->ids[i] = submit(p, "jobs", "job", "replies", NULL);
    }
    pq_check_ok(w, protoq_subscribe(w, "jobs", 16, NULL, 0, on_job, &a, NULL));
    end = now_ms_mono() + 5000;
    while (a.acked < CRASH_JOBS / 2 && now_ms_mono() < end) {
        ck_assert_int_ge(protoq_poll(w, 5), 0);
    }
    ck_assert_int_ge(a.acked, CRASH_JOBS / 2);
    if (_i == 0) {
        srv_kill9(&g_srv);
        ck_assert(srv_launch(&g_srv) == 0);
    } else {
        end = now_ms_mono() + 5000;
        while (a.acked < CRASH_JOBS && now_ms_mono() < end) {
            ck_assert_int_ge(protoq_poll(w, 5), 0);
        }
        protoq_flush(w);
        sleep(1); /* a few unconfirmed acks in flight are fine either way */
        ck_assert(srv_restart(&g_srv) == 0);
    }
    protoq_close(w);
    protoq_close(p);
    p = pq_connect_or_fail(&g_srv);
    left = ready_count(p, "jobs");
    nres = ready_count(p, "replies");
    nnext = ready_count(p, "next");
    ck_assert_uint_eq(left + nres, CRASH_JOBS);
    ck_assert_uint_eq(nres, nnext);
    drain(p, "replies", &dres, nres);
    drain(p, "next", &dnext, nnext);
    /* the drain's acks of jobs send results too: not to p's subscriptions */
    protoq_close(p);
    p = pq_connect_or_fail(&g_srv);
    drain(p, "jobs", &dj, left);
    for (int i = 0; i < CRASH_JOBS; i++) {
        ck_assert_msg(t->jobs[i] + t->results[i] == 1 &&
                          t->results[i] == t->follows[i],
                      "job %d (id %" PRIu64 "): in queue %d, results %d, "
                      "follow-ups %d",
                      i, t->ids[i], t->jobs[i], t->results[i], t->follows[i]);
    }
    protoq_close(p);
    free(t);
}
END_TEST

/* ----------------------------------------------------------------- CLI */

static const char *
protoq_bin(void)
{
    const char *p = getenv("PROTOQ");

    return p && p[0] ? p : "build/protoq";
}

/* spawn_work: `protoq work QUEUE -- sh -c SCRIPT` in the background, its
 * output into DIR/work.log. Stop it with stop_work. */
static pid_t
spawn_work(const char *queue, const char *script)
{
    char log[320];
    pid_t pid;

    snprintf(log, sizeof(log), "%s/work.log", g_srv.dir);
    pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        int fd = open(log, O_WRONLY | O_CREAT | O_APPEND, 0644);

        if (fd >= 0) {
            dup2(fd, STDOUT_FILENO);
            dup2(fd, STDERR_FILENO);
        }
        setenv("PROTOQ_SERVER", g_srv.addr, 1);
        execl(protoq_bin(), protoq_bin(), "work", queue, "--", "sh", "-c",
              script, (char *)NULL);
        _exit(127);
    }
    return pid;
}

/* stop_work: SIGTERM, up to 5 s, then SIGKILL. */
static void
stop_work(pid_t pid)
{
    int64_t end = now_ms_mono() + 5000;
    int status;

    kill(pid, SIGTERM);
    while (waitpid(pid, &status, WNOHANG) != pid) {
        if (now_ms_mono() > end) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            return;
        }
        poll(NULL, 0, 20);
    }
}

/* pub_wait: `protoq -s ADDR pub QUEUE DATA --wait 20s`; its exit status,
 * its output into out. */
static int
pub_wait(const char *queue, const char *data, char *out, size_t cap)
{
    char path[320];
    const char *const argv[] = {protoq_bin(), "-s",  g_srv.addr,
                                "pub",        queue, data,
                                "--wait",     "20s", NULL};
    int st;

    snprintf(path, sizeof(path), "%s/pub.out", g_srv.dir);
    st = prog_run(argv, path, 30000);
    file_slurp(path, out, cap);
    return st;
}

/* The private reply queue of pub --wait is gone: only `name` is left. */
static void
assert_only_queue(protoq_client *c, const char *name)
{
    struct protoq_queue_info *l = NULL;
    size_t n = 0;

    pq_check_ok(c, protoq_queue_list(c, &l, &n));
    ck_assert_uint_eq(n, 1);
    ck_assert_str_eq(l[0].name, name);
    protoq_queue_list_free(l, n);
}

START_TEST(test_pub_wait_returns_work_stdout)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    char out[512];
    pid_t w;
    int st;

    mkq(p, "train", 0);
    w = spawn_work("train", "printf 'trained on %s' \"$(cat)\"");
    st = pub_wait("train", "cifar", out, sizeof(out));
    stop_work(w);
    ck_assert_msg(st == 0, "exit %d: %s", st, out);
    ck_assert_str_eq(out, "trained on cifar");
    ck_assert_uint_eq(ready_count(p, "train"), 0);
    assert_only_queue(p, "train");
    protoq_close(p);
}
END_TEST

START_TEST(test_pub_wait_poison_job_exits_3_with_its_failure)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a;
    char out[1024];
    pid_t w;
    int st;

    memset(&a, 0, sizeof(a));
    a.max_attempts = 2;
    a.backoff_base_ms = 1;
    a.backoff_cap_ms = 1;
    pq_check_ok(p, protoq_queue_create(p, "train", &a));
    w = spawn_work("train", "echo 'CUDA out of memory' >&2; exit 7");
    st = pub_wait("train", "huge", out, sizeof(out));
    stop_work(w);
    ck_assert_msg(st == 3, "exit %d: %s", st, out);
    ck_assert_msg(strstr(out, "max_attempts") != NULL &&
                      strstr(out, "CUDA out of memory") != NULL,
                  "%s", out);
    ck_assert_uint_eq(ready_count(p, "train"), 0);
    assert_only_queue(p, "train");
    protoq_close(p);
}
END_TEST

/* pub --wait with an idempotency key an earlier job holds: the broker
 * answers with that job's id (duplicate) and stores nothing, so no result
 * would ever reach this reply queue. It waited for nothing until its
 * timeout (forever without one); now it fails at once naming the job. */
START_TEST(test_pub_wait_duplicate_key_fails_at_once)
{
    protoq_client *p = pq_connect_or_fail(&g_srv);
    const char *const first[] = {protoq_bin(), "-s",    g_srv.addr,
                                 "pub",        "train", "one",
                                 "--key",      "k1",    NULL};
    const char *const again[] = {protoq_bin(), "-s",  g_srv.addr, "pub",
                                 "train",      "two", "--key",    "k1",
                                 "--wait",     "20s", NULL};
    char path[320], out[512];
    int64_t t0;
    int st;

    mkq(p, "train", 0);
    snprintf(path, sizeof(path), "%s/pub.out", g_srv.dir);
    ck_assert_int_eq(prog_run(first, path, 10000), 0);
    t0 = now_ms_mono();
    st = prog_run(again, path, 30000);
    file_slurp(path, out, sizeof(out));
    ck_assert_msg(st == 1, "exit %d: %s", st, out);
    ck_assert_msg(now_ms_mono() - t0 < 10000, "waited %lld ms",
                  (long long)(now_ms_mono() - t0));
    ck_assert_msg(strstr(out, "k1") != NULL, "%s", out);
    ck_assert_uint_eq(ready_count(p, "train"), 1);
    assert_only_queue(p, "train");
    protoq_close(p);
}
END_TEST

/* ------------------------------------------------------------ main */

static Suite *
results_suite(void)
{
    Suite *s = suite_create("results");
    TCase *tc = tcase_create("results");
    TCase *tk = tcase_create("crash");
    TCase *te = tcase_create("evicted");

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 30);
    tcase_add_test(tc, test_result_reaches_reply_to_with_correlation_id);
    tcase_add_test(tc, test_reply_to_missing_queue_is_refused_at_publish);
    tcase_add_test(tc, test_reply_to_deleted_or_full_never_fails_the_ack);
    tcase_add_test(tc, test_result_over_limit_refuses_ack_and_job_stays);
    tcase_add_test(tc, test_follow_ups_are_published_with_the_ack);
    tcase_add_test(tc, test_refused_follow_up_refuses_the_ack);
    tcase_add_test(tc, test_notice_when_dead_lettered_after_max_attempts);
    tcase_add_test(tc, test_notice_when_expired_or_cancelled);
    tcase_add_test(tc, test_inflight_cancel_notice_has_last_error);
    tcase_add_loop_test(tc, test_plain_ack_sends_empty_result, 0, 2);
    tcase_add_test(tc, test_pub_wait_returns_work_stdout);
    tcase_add_test(tc, test_pub_wait_poison_job_exits_3_with_its_failure);
    tcase_add_test(tc, test_pub_wait_duplicate_key_fails_at_once);
    suite_add_tcase(s, tc);

    tcase_add_checked_fixture(te, setup_evicted, teardown);
    tcase_add_test(te, test_evicted_dead_letter_keeps_its_error_text);
    tcase_add_loop_test(te, test_plain_ack_sends_empty_result, 0, 2);
    suite_add_tcase(s, te);

    tcase_add_checked_fixture(tk, setup, teardown);
    tcase_set_timeout(tk, 60);
    tcase_add_loop_test(tk, test_kill9_result_and_follow_up_exactly_with_ack, 0,
                        2);
    suite_add_tcase(s, tk);
    return s;
}

int
main(void)
{
    SRunner *sr;
    int failed;

    if (test_conf_write(&g_conf, "max_result_bytes 1024\n"
                                 "heartbeat_ms 1000\n"
                                 "heartbeat_timeout_ms 5000\n") != 0 ||
        test_conf_write(&g_conf_evicted, "payload_budget_bytes 0\n") != 0) {
        return 1;
    }
    sr = srunner_create(results_suite());
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    test_conf_remove(&g_conf);
    test_conf_remove(&g_conf_evicted);
    return failed == 0 ? 0 : 1;
}
