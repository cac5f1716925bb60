/*
 * check_datadir.c: protoqd against data dirs it must refuse, through the
 * real binary (exit codes and messages are what an operator and systemd
 * see):
 *
 * start_failures: a data dir locked by another protoqd (71), a damaged
 *   segment header (65), no room for the first segment (74, on a tiny
 *   tmpfs when root; skipped otherwise). Each exits with its code, names
 *   the file, and never crashes.
 * missing_segments: a middle or the first segment deleted, the first
 *   truncated to its header, the last truncated to 0 bytes: `--check-data`
 *   says DAMAGED naming the file, protoqd refuses to start (65), and the
 *   documented salvage (`--salvage-data`) lets it start again with every
 *   message the remaining segments hold.
 */
#include <check.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "testutil.h"

enum {
    RUN_MS = 10000,
    EX_DATAERR_ = 65,
    EX_OSERR_ = 71,
    EX_IOERR_ = 74,
};

static struct srv g_srv;
static char g_out[65536];

static void
setup(void)
{
    memset(&g_srv, 0, sizeof(g_srv));
    ck_assert_int_eq(srv_start(&g_srv, NULL), 0);
}

static void
teardown(void)
{
    srv_cleanup(&g_srv);
}

/* run_protoqd: protoqd on data_dir with a fresh port file; its output into
 * DIR/name.out (and g_out). Returns its exit status (-1: still running
 * after RUN_MS, i.e. it started). */
static int
run_protoqd(const char *data_dir, const char *name)
{
    char out[400], port[400];
    const char *argv[] = {srv_binary(),  "--listen", "127.0.0.1:0",
                          "--port-file", port,       "--data-dir",
                          data_dir,      NULL};
    int rc;

    snprintf(out, sizeof(out), "%s/%s.out", g_srv.dir, name);
    snprintf(port, sizeof(port), "%s/%s.port", g_srv.dir, name);
    rc = prog_run(argv, out, 3000);
    file_slurp(out, g_out, sizeof(g_out));
    return rc;
}

/* run_check: protoqd --check-data data_dir; output in g_out. */
static int
run_check(const char *data_dir)
{
    char out[400];
    const char *argv[] = {srv_binary(), "--check-data", data_dir, NULL};
    int rc;

    snprintf(out, sizeof(out), "%s/check.out", g_srv.dir);
    rc = prog_run(argv, out, RUN_MS);
    file_slurp(out, g_out, sizeof(g_out));
    return rc;
}

/* seg_file: the path of segment seq in data_dir. */
static void
seg_file(char *buf, size_t cap, const char *data_dir, unsigned seq)
{
    snprintf(buf, cap, "%s/seg-%010u.log", data_dir, seq);
}

/* ------------------------------------------------------ start failures */

START_TEST(test_locked_data_dir_exits_71)
{
    int rc = run_protoqd(g_srv.data_dir, "second");

    ck_assert_msg(rc == EX_OSERR_,
                  "a second protoqd on a locked data dir "
                  "exited %d, want 71; output: %s",
                  rc, g_out);
    ck_assert_msg(strstr(g_out, g_srv.data_dir) && strstr(g_out, "locked"),
                  "the message does not name the locked dir: %s", g_out);
}
END_TEST

START_TEST(test_damaged_segment_header_exits_65)
{
    char path[400];
    int fd, rc;

    ck_assert_int_eq(srv_stop(&g_srv), 0);
    seg_file(path, sizeof(path), g_srv.data_dir, 1);
    fd = open(path, O_WRONLY);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(pwrite(fd, "NOTALOG!", 8, 0), 8);
    close(fd);
    rc = run_protoqd(g_srv.data_dir, "header");
    ck_assert_msg(rc == EX_DATAERR_,
                  "a damaged segment header: exit %d, "
                  "want 65; output: %s",
                  rc, g_out);
    ck_assert_msg(strstr(g_out, path) != NULL,
                  "the message does not name %s: "
                  "%s",
                  path, g_out);
}
END_TEST

/* A 1 MiB tmpfs cannot hold a first segment of 32 MiB (the default). */
START_TEST(test_no_room_for_first_segment_exits_74)
{
    char mnt[400], data[450], cmd[600], path[500];
    int rc;

    if (geteuid() != 0) {
        printf("no_room_for_first_segment: skipped (needs root to mount a "
               "tmpfs)\n");
        return;
    }
    snprintf(mnt, sizeof(mnt), "%s/tiny", g_srv.dir);
    ck_assert_int_eq(mkdir(mnt, 0755), 0);
    snprintf(cmd, sizeof(cmd),
             "mount -t tmpfs -o size=1m tmpfs %s "
             "2>/dev/null",
             mnt);
    if (system(cmd) != 0) {
        printf("no_room_for_first_segment: skipped (mount failed)\n");
        return;
    }
    snprintf(data, sizeof(data), "%s/data", mnt);
    rc = run_protoqd(data, "enospc");
    snprintf(cmd, sizeof(cmd), "umount %s", mnt);
    ck_assert_int_eq(system(cmd), 0);
    seg_file(path, sizeof(path), data, 1);
    ck_assert_msg(rc == EX_IOERR_,
                  "no room for the first segment: exit %d, "
                  "want 74; output: %s",
                  rc, g_out);
    ck_assert_msg(strstr(g_out, path) != NULL,
                  "the message does not name %s: "
                  "%s",
                  path, g_out);
}
END_TEST

/* ---------------------------------------------------- missing segments */

enum { N_MSGS = 240, PAD = 900 };

static char g_conf[128];
static const char *const g_small_args[] = {"-c", g_conf, NULL};

/* Four segments of 64 KiB, about 240 KiB of live messages, stopped. */
static void
setup_segments(void)
{
    static char buf[PAD + 16];
    protoq_client *c;
    int fd;

    snprintf(g_conf, sizeof(g_conf), "/tmp/protoq-datadir.XXXXXX");
    fd = mkstemp(g_conf);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(write(fd, "segment_bytes 65536\n", 20), 20);
    close(fd);
    memset(&g_srv, 0, sizeof(g_srv));
    ck_assert_int_eq(srv_start(&g_srv, g_small_args), 0);
    c = pq_connect_or_fail(&g_srv);
    pq_check_ok(c, protoq_queue_create(c, "q", NULL));
    memset(buf, 'x', sizeof(buf));
    for (int i = 0; i < N_MSGS; i++) {
        struct protoq_message m = {.payload = buf, .len = PAD};

        snprintf(buf, 16, "%06d", i);
        pq_check_ok(c, protoq_publish_async(c, "q", &m, NULL, NULL));
        if (protoq_outstanding(c) >= 64) {
            pq_check_ok(c, protoq_wait_confirms(c, 32, 10000));
        }
    }
    pq_check_ok(c, protoq_wait_confirms(c, 0, 10000));
    protoq_close(c);
    ck_assert_int_eq(srv_stop(&g_srv), 0);
}

static void
teardown_segments(void)
{
    srv_cleanup(&g_srv);
    unlink(g_conf);
}

/* last_seg: the highest segment number in the data dir. */
static unsigned
last_seg(void)
{
    DIR *d = opendir(g_srv.data_dir);
    struct dirent *e;
    unsigned max = 0, v;

    ck_assert_ptr_nonnull(d);
    while ((e = readdir(d)) != NULL) {
        if (sscanf(e->d_name, "seg-%10u.log", &v) == 1 && v > max) {
            max = v;
        }
    }
    closedir(d);
    return max;
}

/* _i: 0 delete a middle segment, 1 delete the first, 2 truncate the
 * first to its header, 3 truncate the last to 0 bytes. */
START_TEST(test_missing_segment_refused_then_salvaged)
{
    static const char *const what[] = {"middle deleted", "first deleted",
                                       "first cut to its header",
                                       "last emptied"};
    char path[400], out[400];
    const char *argv[] = {srv_binary(), "--salvage-data", g_srv.data_dir, NULL};
    struct protoq_queue_info info;
    protoq_client *c;
    unsigned last = last_seg();
    int rc;

    ck_assert_msg(last >= 4, "want >= 4 segments, have %u", last);
    ck_assert_msg(run_check(g_srv.data_dir) == 0,
                  "not clean before the "
                  "damage: %s",
                  g_out);
    switch (_i) {
    case 0:
        seg_file(path, sizeof(path), g_srv.data_dir, 2);
        ck_assert_int_eq(unlink(path), 0);
        break;
    case 1:
        seg_file(path, sizeof(path), g_srv.data_dir, 1);
        ck_assert_int_eq(unlink(path), 0);
        break;
    case 2:
        seg_file(path, sizeof(path), g_srv.data_dir, 1);
        ck_assert_int_eq(truncate(path, 20), 0);
        break;
    default:
        seg_file(path, sizeof(path), g_srv.data_dir, last);
        ck_assert_int_eq(truncate(path, 0), 0);
        break;
    }
    rc = run_check(g_srv.data_dir);
    ck_assert_msg(rc == EX_DATAERR_ && strstr(g_out, "DAMAGED") != NULL,
                  "%s: --check-data exit %d: %s", what[_i], rc, g_out);
    ck_assert_msg(strstr(g_out, path) != NULL,
                  "%s: --check-data does not "
                  "name %s: %s",
                  what[_i], path, g_out);
    rc = run_protoqd(g_srv.data_dir, "damaged");
    ck_assert_msg(rc == EX_DATAERR_, "%s: protoqd exit %d, want 65: %s",
                  what[_i], rc, g_out);
    ck_assert_msg(strstr(g_out, path) != NULL &&
                      strstr(g_out, "--salvage-data") != NULL,
                  "%s: the start message does not "
                  "name %s and the salvage: %s",
                  what[_i], path, g_out);

    /* The documented salvage: protoqd starts again with what is left. */
    snprintf(out, sizeof(out), "%s/salvage.out", g_srv.dir);
    rc = prog_run(argv, out, RUN_MS);
    file_slurp(out, g_out, sizeof(g_out));
    ck_assert_msg(rc == 0 && strstr(g_out, "result: clean"),
                  "%s: salvage "
                  "exit %d: %s",
                  what[_i], rc, g_out);
    ck_assert_msg(run_check(g_srv.data_dir) == 0,
                  "%s: not clean after the "
                  "salvage: %s",
                  what[_i], g_out);
    ck_assert_int_eq(srv_launch(&g_srv), 0);
    c = pq_connect_or_fail(&g_srv);
    pq_check_ok(c, protoq_queue_stat(c, "q", &info));
    ck_assert_msg(info.ready > 0 && info.ready < N_MSGS,
                  "%s: %llu ready "
                  "after the salvage",
                  what[_i], (unsigned long long)info.ready);
    protoq_close(c);
    /* and the log keeps working: a clean stop checks clean */
    ck_assert_int_eq(srv_stop(&g_srv), 0);
    ck_assert_msg(run_check(g_srv.data_dir) == 0, "%s: %s", what[_i], g_out);
}
END_TEST

static Suite *
datadir_suite(void)
{
    Suite *s = suite_create("datadir");
    TCase *tc;

    tc = tcase_create("start_failures");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_locked_data_dir_exits_71);
    tcase_add_test(tc, test_damaged_segment_header_exits_65);
    tcase_add_test(tc, test_no_room_for_first_segment_exits_74);
    suite_add_tcase(s, tc);

    tc = tcase_create("missing_segments");
    tcase_add_checked_fixture(tc, setup_segments, teardown_segments);
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_missing_segment_refused_then_salvaged, 0, 4);
    suite_add_tcase(s, tc);
    return s;
}

int
main(void)
{
    SRunner *sr = srunner_create(datadir_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
