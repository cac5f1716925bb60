/*
 * check_powerloss.c: the simulated power loss the model test uses
 * (powerloss.h, pl_seam.c) does what a power loss does and a kill -9 does
 * not: an ack written but not yet fsynced (acks without confirm are synced
 * with the next confirmed write or within fsync_interval_ms) is undone,
 * so its message comes back, while a bare kill -9 keeps it; confirmed
 * publishes survive both. And the production protoqd ignores the seam's
 * variable: it links no seam.
 *
 * PROTOQD names the production broker, PROTOQD_PL the test build (else
 * tests/model/protoqd-pl beside PROTOQD). Every wait is bounded.
 */
#include <check.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "pl_journal.h"
#include "powerloss.h"
#include "testutil.h"

static struct test_conf g_tc;
static const char *g_args[3];
static char g_plain[PATH_MAX]; /* the production protoqd */

/* The first delivery: its id and attempt. */
struct got {
    uint64_t id;
    uint32_t attempt;
    int n;
};

static void
on_deliver(void *arg, protoq_client *c, const struct protoq_delivery *d)
{
    struct got *g = arg;

    (void)c;
    if (g->n++ == 0) {
        g->id = d->message_id;
        g->attempt = d->attempt;
    }
}

static long
file_size(const char *path)
{
    struct stat sb;

    return stat(path, &sb) == 0 ? (long)sb.st_size : -1;
}

/* The journal stopped growing: nothing more is being written. */
struct still {
    const char *path;
    long size;
    int64_t since;
};

static bool
journal_still(void *arg)
{
    struct still *s = arg;
    long now = file_size(s->path);

    if (now != s->size) {
        s->size = now;
        s->since = now_ms_mono();
    }
    return now_ms_mono() - s->since >= 150;
}

static void
publish(protoq_client *c, const char *payload)
{
    struct protoq_message pm;

    memset(&pm, 0, sizeof(pm));
    pm.payload = payload;
    pm.len = strlen(payload);
    pq_check_ok(c, protoq_publish(c, "q", &pm, NULL));
}

static uint64_t
ready(protoq_client *c)
{
    struct protoq_queue_info qi;

    pq_check_ok(c, protoq_queue_stat(c, "q", &qi));
    return qi.ready + qi.delayed + qi.inflight;
}

/*
 * Three confirmed publishes, one delivered and acked without confirm, the
 * ack's record written (the journal stops growing) but not synced (the
 * interval is a minute and nothing confirmed follows); then kill -9, or
 * kill -9 and a power loss that undoes every unsynced record. Returns how
 * many messages the restarted broker holds.
 */
static uint64_t
ack_then_crash(bool power_loss, struct pl_result *res)
{
    struct srv s;
    struct got g = {0};
    struct still st = {0};
    char journal[300], err[300];
    protoq_client *c;
    int64_t until;
    uint64_t n;

    ck_assert_int_eq(srv_start(&s, g_args), 0);
    snprintf(journal, sizeof(journal), "%s", getenv(PL_JOURNAL_ENV));
    c = pq_connect_or_fail(&s);
    pq_check_ok(c, protoq_queue_create(c, "q", NULL));
    publish(c, "a");
    publish(c, "b");
    publish(c, "c");
    pq_check_ok(c, protoq_subscribe(c, "q", 1, NULL, 0, on_deliver, &g, NULL));
    until = now_ms_mono() + 5000;
    while (g.n == 0 && now_ms_mono() < until) {
        ck_assert_int_ge(protoq_poll(c, 50), 0);
    }
    ck_assert_int_eq(g.n, 1);
    pq_check_ok(c, protoq_ack(c, g.id, g.attempt));
    pq_check_ok(c, protoq_flush(c));
    st.path = journal;
    st.size = file_size(journal);
    st.since = now_ms_mono();
    ck_assert(wait_until(journal_still, &st, 5000));
    srv_kill9(&s);
    protoq_close(c);
    if (power_loss) {
        ck_assert_msg(pl_apply(journal, 1, true, res, err, sizeof(err)) == 0,
                      "%s", err);
    }
    ck_assert_int_eq(srv_launch(&s), 0);
    c = pq_connect_or_fail(&s);
    n = ready(c);
    protoq_close(c);
    srv_cleanup(&s);
    return n;
}

START_TEST(test_power_loss_undoes_an_unsynced_ack_kill9_keeps_it)
{
    struct pl_result res = {0};

    ck_assert_uint_eq(ack_then_crash(false, &res), 2);
    ck_assert_uint_eq(ack_then_crash(true, &res), 3);
    ck_assert_int_ge(res.unsynced, 1);
    ck_assert_int_eq(res.undone, res.unsynced);
    ck_assert_int_eq(res.torn, 0);
}
END_TEST

/* The production protoqd runs no seam: the journal stays empty. */
START_TEST(test_production_protoqd_has_no_seam)
{
    struct srv s;
    const char *pl = getenv("PROTOQD");
    protoq_client *c;

    setenv("PROTOQD", g_plain, 1);
    ck_assert_int_eq(truncate(getenv(PL_JOURNAL_ENV), 0), 0);
    ck_assert_int_eq(srv_start(&s, g_args), 0);
    c = pq_connect_or_fail(&s);
    pq_check_ok(c, protoq_queue_create(c, "q", NULL));
    publish(c, "a");
    protoq_close(c);
    ck_assert_int_eq(srv_stop(&s), 0);
    ck_assert_int_eq(file_size(getenv(PL_JOURNAL_ENV)), 0);
    srv_cleanup(&s);
    setenv("PROTOQD", pl, 1);
}
END_TEST

int
main(void)
{
    Suite *s = suite_create("powerloss");
    TCase *tc = tcase_create("seam");
    SRunner *sr;
    const char *pl = pl_binary();
    char journal[] = "/tmp/protoq-pl-journal.XXXXXX";
    int fd, failed_n;

    if (pl == NULL) {
        fprintf(stderr, "check_powerloss: no protoqd-pl: %s\n",
                strerror(errno));
        return EXIT_FAILURE;
    }
    snprintf(g_plain, sizeof(g_plain), "%s", srv_binary());
    setenv("PROTOQD", pl, 1);
    fd = mkstemp(journal);
    if (fd < 0 || test_conf_write(&g_tc, "fsync always\n"
                                         "fsync_interval_ms 60000\n"
                                         "segment_bytes 64k\n") != 0) {
        fprintf(stderr, "check_powerloss: setup: %s\n", strerror(errno));
        return EXIT_FAILURE;
    }
    close(fd);
    setenv(PL_JOURNAL_ENV, journal, 1);
    g_args[0] = "-c";
    g_args[1] = g_tc.path;
    g_args[2] = NULL;
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_power_loss_undoes_an_unsynced_ack_kill9_keeps_it);
    tcase_add_test(tc, test_production_protoqd_has_no_seam);
    suite_add_tcase(s, tc);
    sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    failed_n = srunner_ntests_failed(sr);
    srunner_free(sr);
    test_conf_remove(&g_tc);
    unlink(journal);
    return failed_n == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
