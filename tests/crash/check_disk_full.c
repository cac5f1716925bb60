/*
 * check_disk_full.c: protoqd on a full disk (issue 3): a 24 MiB tmpfs
 * mounted for the test fills until the broker answers DISK_FULL; acks keep
 * working, a purge lets publishing resume, and what was confirmed survives
 * a kill -9. The fixture and payloads are in crash_fixture.c.
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
static const char *const g_tmpfs_args[] = {"-c", g_conf.path, "--data-dir",
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

/* ---------------------------------------------------------------- main */

static Suite *
disk_full_suite(void)
{
    Suite *s = suite_create("disk_full");
    TCase *tc;

    tc = tcase_create("disk_full");
    tcase_add_checked_fixture(tc, setup_disk_full, teardown_disk_full);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc,
                   test_disk_full_refuses_publishes_keeps_acks_and_recovers);
    suite_add_tcase(s, tc);
    return s;
}

int
main(void)
{
    return crash_main(disk_full_suite());
}
