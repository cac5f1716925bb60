/*
 * check_ops.c: what an operator sees of protoqd: the minute summary only
 * when something happened (PROTOQ_SUMMARY_MS shortens the minute), log
 * lines with timestamps, and a data dir that is created only when its
 * parent exists (a mistyped path does not start an empty broker), and
 * --check-data's advice on a damaged dir naming the salvage step.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "testutil.h"

static struct srv S;

/* count_in_log: lines of the broker's log containing needle. */
static int
count_in_log(const char *needle)
{
    char path[300], line[4096];
    FILE *f;
    int n = 0;

    srv_log_path(&S, path, sizeof(path));
    f = fopen(path, "r");
    if (f == NULL) {
        return 0;
    }
    while (fgets(line, sizeof(line), f) != NULL) {
        n += strstr(line, needle) != NULL;
    }
    fclose(f);
    return n;
}

static bool
has_summary(void *arg)
{
    (void)arg;
    return count_in_log("summary:") > 0;
}

START_TEST(summary_only_after_activity)
{
    static const char *const args[] = {"--log-level", "info", NULL};
    protoq_client *c;
    int n;

    setenv("PROTOQ_SUMMARY_MS", "1000", 1);
    ck_assert_int_eq(srv_start(&S, args), 0);
    unsetenv("PROTOQ_SUMMARY_MS");
    /* Idle: no summary line, however many intervals pass. */
    usleep(2500 * 1000);
    ck_assert_int_eq(count_in_log("summary:"), 0);
    c = pq_connect_or_fail(&S);
    pq_check_ok(c, protoq_queue_create(c, "q", NULL));
    protoq_close(c);
    ck_assert(wait_until(has_summary, NULL, 5000));
    /* Idle again: the line is not repeated. */
    usleep(1500 * 1000);
    n = count_in_log("summary:");
    usleep(3000 * 1000);
    ck_assert_int_eq(count_in_log("summary:"), n);
    /* Every line starts with an RFC 3339 UTC time. */
    ck_assert_int_eq(count_in_log("Z protoqd: info: summary:"), n);
    srv_cleanup(&S);
}
END_TEST

START_TEST(data_dir_needs_its_parent)
{
    char tmp[] = "/tmp/check_ops.XXXXXX";
    char dd[256], out[300], buf[4096], cmd[400];
    const char *argv[] = {srv_binary(), "--listen", "127.0.0.1:0",
                          "--data-dir", dd,         NULL};
    const char *sargs[] = {"--data-dir", dd, NULL};

    ck_assert_ptr_nonnull(mkdtemp(tmp));
    /* Parent missing: refused, nothing created. */
    snprintf(dd, sizeof(dd), "%s/no/such/dir", tmp);
    snprintf(out, sizeof(out), "%s/out", tmp);
    ck_assert_int_eq(prog_run(argv, out, 10000), 71);
    file_slurp(out, buf, sizeof(buf));
    ck_assert_msg(strstr(buf, "does not exist, nor its parent") != NULL, "%s",
                  buf);
    snprintf(dd, sizeof(dd), "%s/no", tmp);
    ck_assert_int_ne(access(dd, F_OK), 0);
    /* Parent there: created, with a warning. */
    snprintf(dd, sizeof(dd), "%s/fresh", tmp);
    ck_assert_int_eq(srv_start(&S, sargs), 0);
    ck_assert_int_eq(access(dd, F_OK), 0);
    ck_assert(srv_log_has(&S, "did not exist: created it"));
    srv_cleanup(&S);
    snprintf(cmd, sizeof(cmd), "rm -rf '%s'", tmp);
    ck_assert_int_eq(system(cmd), 0);
}
END_TEST

/* --check-data on a damaged segment names the next step (salvage), not
 * itself. */
START_TEST(check_data_advice_names_salvage)
{
    char seg[400], out[400], buf[8192], want[400];
    const char *argv[] = {srv_binary(), "--check-data", S.data_dir, NULL};
    protoq_client *c;
    struct protoq_message m;
    FILE *f;

    ck_assert_int_eq(srv_start(&S, NULL), 0);
    c = pq_connect_or_fail(&S);
    pq_check_ok(c, protoq_queue_create(c, "q", NULL));
    memset(&m, 0, sizeof(m));
    m.payload = "0123456789abcdef0123456789abcdef";
    m.len = 32;
    for (int i = 0; i < 200; i++) {
        pq_check_ok(c, protoq_publish(c, "q", &m, NULL));
    }
    protoq_close(c);
    ck_assert_int_eq(srv_stop(&S), 0);
    /* Flip bytes in the middle of the records: valid ones follow. */
    snprintf(seg, sizeof(seg), "%s/seg-0000000001.log", S.data_dir);
    f = fopen(seg, "r+b");
    ck_assert_ptr_nonnull(f);
    ck_assert_int_eq(fseek(f, 4000, SEEK_SET), 0);
    ck_assert_int_eq(fwrite("\xff\xff\xff\xff", 1, 4, f), 4);
    ck_assert_int_eq(fclose(f), 0);
    snprintf(out, sizeof(out), "%s/check.out", S.dir);
    ck_assert_int_eq(prog_run(argv, out, 20000), 65);
    file_slurp(out, buf, sizeof(buf));
    snprintf(want, sizeof(want), "protoqd --salvage-data %s keeps", S.data_dir);
    ck_assert_msg(strstr(buf, want) != NULL, "%s", buf);
    ck_assert_msg(strstr(buf, "run protoqd --check-data") == NULL, "%s", buf);
    srv_cleanup(&S);
}
END_TEST

int
main(void)
{
    Suite *s = suite_create("ops");
    TCase *tc = tcase_create("ops");
    SRunner *sr;
    int failed;

    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, summary_only_after_activity);
    tcase_add_test(tc, data_dir_needs_its_parent);
    tcase_add_test(tc, check_data_advice_names_salvage);
    suite_add_tcase(s, tc);
    sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
