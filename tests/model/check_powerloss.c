/*
 * check_powerloss.c: the simulated power loss the model test uses
 * (powerloss.h, pl_seam.c) does what a power loss does and a kill -9 does
 * not: an ack written but not yet fsynced (acks without confirm are synced
 * with the next confirmed write or within fsync_interval_ms) is undone,
 * so its message comes back, while a bare kill -9 keeps it; confirmed
 * publishes survive both. The production protoqd ignores the seam's
 * variable: it links no seam. And pl_apply reads a journal as the seam
 * means it (one written here by hand): synced writes stay, unsynced ones
 * go, names stand or fall with the directory fsyncs.
 *
 * PROTOQD names the production broker, PROTOQD_PL the test build (else
 * tests/model/protoqd-pl beside PROTOQD). Every wait is bounded.
 */
#include <check.h>
#include <errno.h>
#include <fcntl.h>
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

/* One record of a hand-made journal: rec in dir d's file name. */
static void
jput(int jfd, const char *d, uint32_t type, const char *name, struct pl_rec r,
     const char *data)
{
    char path[512];
    size_t plen = 0;

    r.type = type;
    r.data_len = data ? strlen(data) : 0;
    if (name != NULL) {
        plen = (size_t)snprintf(path, sizeof(path), "%s/%s", d, name);
    }
    r.path_len = (uint32_t)plen;
    ck_assert_int_eq(write(jfd, &r, sizeof(r)), (ssize_t)sizeof(r));
    ck_assert_int_eq(write(jfd, path, plen), (ssize_t)plen);
    ck_assert_int_eq(write(jfd, data ? data : "", r.data_len),
                     (ssize_t)r.data_len);
}

/* put: file name of dir d now holds text (NULL: removed). */
static void
put(const char *d, const char *name, const char *text)
{
    char path[512];
    FILE *f;

    snprintf(path, sizeof(path), "%s/%s", d, name);
    if (text == NULL) {
        ck_assert_int_eq(unlink(path), 0);
        return;
    }
    f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    ck_assert_int_eq(fputs(text, f), text[0] ? 1 : 0);
    fclose(f);
}

/* has: what file name of dir d holds ("-" when it does not exist). */
static const char *
has(const char *d, const char *name, char *buf, size_t cap)
{
    char path[512];
    struct stat sb;

    snprintf(path, sizeof(path), "%s/%s", d, name);
    return stat(path, &sb) == 0 ? file_slurp(path, buf, cap) : "-";
}

/*
 * A journal as the seam writes it, with the I/O it describes done by
 * hand, and pl_apply with every unsynced record undone: a synced write
 * stays and an unsynced one goes; a name created before a directory fsync
 * stays, one created after it vanishes; a file removed before a directory
 * fsync stays removed, one removed after it comes back as it was.
 */
START_TEST(test_apply_follows_syncs_and_directory_syncs)
{
    char d[] = "/tmp/protoq-pl-apply.XXXXXX", jpath[600], buf[64], err[300];
    struct pl_result res = {0};
    int jfd;

    ck_assert_ptr_nonnull(mkdtemp(d));
    snprintf(jpath, sizeof(jpath), "%s/journal", d);
    jfd = open(jpath, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    ck_assert_int_ge(jfd, 0);
    put(d, "kept", "AAAA");
    put(d, "gone", "GGGG");
    put(d, "gone-durable", "DDDD");
    /* 0, 1: a write, synced */
    jput(jfd, d, PL_WRITE, "kept", (struct pl_rec){.len = 4, .old_size = 4},
         "AAAA");
    put(d, "kept", "BBBB");
    jput(jfd, d, PL_SYNC, "kept", (struct pl_rec){.upto = 1}, NULL);
    /* 2, 3: a name made durable */
    jput(jfd, d, PL_CREATE, "new-named", (struct pl_rec){0}, NULL);
    put(d, "new-named", "N");
    jput(jfd, d, PL_DIRSYNC, NULL, (struct pl_rec){.upto = 3}, NULL);
    /* 4, 5: a removal made durable */
    jput(jfd, d, PL_UNLINK, "gone-durable", (struct pl_rec){.old_size = 4},
         "DDDD");
    put(d, "gone-durable", NULL);
    jput(jfd, d, PL_DIRSYNC, NULL, (struct pl_rec){.upto = 5}, NULL);
    /* 6, 7, 8: an append, a creation and a removal no sync covers */
    jput(jfd, d, PL_WRITE, "kept",
         (struct pl_rec){.off = 4, .len = 4, .old_size = 4}, NULL);
    put(d, "kept", "BBBBCCCC");
    jput(jfd, d, PL_CREATE, "new-unnamed", (struct pl_rec){0}, NULL);
    put(d, "new-unnamed", "U");
    jput(jfd, d, PL_UNLINK, "gone", (struct pl_rec){.old_size = 4}, "GGGG");
    put(d, "gone", NULL);
    close(jfd);

    ck_assert_msg(pl_apply(jpath, 1, true, &res, err, sizeof(err)) == 0, "%s",
                  err);
    ck_assert_str_eq(has(d, "kept", buf, sizeof(buf)), "BBBB");
    ck_assert_str_eq(has(d, "new-named", buf, sizeof(buf)), "N");
    ck_assert_str_eq(has(d, "gone-durable", buf, sizeof(buf)), "-");
    ck_assert_str_eq(has(d, "new-unnamed", buf, sizeof(buf)), "-");
    ck_assert_str_eq(has(d, "gone", buf, sizeof(buf)), "GGGG");
    ck_assert_int_eq(res.records, 9);
    ck_assert_int_eq(res.unsynced, 1);
    ck_assert_int_eq(res.undone, 1);
    ck_assert_int_eq(res.vanished, 1);
    ck_assert_int_eq(res.revived, 1);
    for (const char *const *n = (const char *const[]){"kept", "new-named",
                                                      "gone", "journal", NULL};
         *n != NULL; n++) {
        put(d, *n, NULL);
    }
    ck_assert_int_eq(rmdir(d), 0);
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
    tcase_add_test(tc, test_apply_follows_syncs_and_directory_syncs);
    suite_add_tcase(s, tc);
    sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    failed_n = srunner_ntests_failed(sr);
    srunner_free(sr);
    test_conf_remove(&g_tc);
    unlink(journal);
    return failed_n == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
