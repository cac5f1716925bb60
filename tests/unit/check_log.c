/*
 * check_log.c: protoqd's log lines (broker/log.c): an RFC 3339 UTC time
 * with milliseconds before each line, or, when stderr is the journal
 * (JOURNAL_STREAM names stderr's device:inode), the sd-daemon priority
 * prefix instead, so that `journalctl -p warning` can filter.
 */
#include <check.h>
#include <fcntl.h>
#include <regex.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log.h"

static char path[64];
static int saved_stderr = -1;

/* Send stderr to a fresh temp file (path); log_init() after the caller set
 * the environment. */
static void
capture(void)
{
    int fd;

    snprintf(path, sizeof(path), "/tmp/check_log.XXXXXX");
    fd = mkstemp(path);
    ck_assert_int_ge(fd, 0);
    saved_stderr = dup(STDERR_FILENO);
    ck_assert_int_ge(dup2(fd, STDERR_FILENO), 0);
    close(fd);
}

/* Restore stderr; the captured text into buf. */
static void
release(char *buf, size_t cap)
{
    FILE *f;
    size_t n;

    dup2(saved_stderr, STDERR_FILENO);
    close(saved_stderr);
    f = fopen(path, "r");
    ck_assert_ptr_nonnull(f);
    n = fread(buf, 1, cap - 1, f);
    buf[n] = '\0';
    fclose(f);
    unlink(path);
}

static void
journal_stream_of_stderr(char *buf, size_t cap)
{
    struct stat st;

    ck_assert_int_eq(fstat(STDERR_FILENO, &st), 0);
    snprintf(buf, cap, "%llu:%llu", (unsigned long long)st.st_dev,
             (unsigned long long)st.st_ino);
}

static bool
matches(const char *text, const char *re)
{
    regex_t r;
    int rc;

    ck_assert_int_eq(regcomp(&r, re, REG_EXTENDED | REG_NOSUB), 0);
    rc = regexec(&r, text, 0, NULL, 0);
    regfree(&r);
    return rc == 0;
}

START_TEST(timestamps_when_not_journald)
{
    char out[4096];

    unsetenv("JOURNAL_STREAM");
    capture();
    log_init();
    log_set_level(LOG_INFO);
    log_warn("disk %d%% full", 91);
    log_info("hello");
    log_debug("not shown");
    release(out, sizeof(out));
    ck_assert_msg(matches(out, "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:"
                               "[0-9]{2}\\.[0-9]{3}Z protoqd: warn: disk 91% "
                               "full\n[0-9]{4}-[^ ]+Z protoqd: info: hello\n$"),
                  "%s", out);
    ck_assert(!log_to_journal());
}
END_TEST

START_TEST(priority_prefixes_under_journald)
{
    char out[4096], js[64];

    capture();
    journal_stream_of_stderr(js, sizeof(js));
    setenv("JOURNAL_STREAM", js, 1);
    log_init();
    log_set_level(LOG_DEBUG);
    log_debug("d");
    log_info("i");
    log_warn("w");
    log_err("e");
    release(out, sizeof(out));
    ck_assert_str_eq(out, "<7>protoqd: debug: d\n<6>protoqd: info: i\n"
                          "<4>protoqd: warn: w\n<3>protoqd: error: e\n");
}
END_TEST

/* A JOURNAL_STREAM inherited by a process whose stderr went elsewhere
 * does not count: timestamps. */
START_TEST(other_stream_is_not_journald)
{
    char out[4096];

    setenv("JOURNAL_STREAM", "1:2", 1);
    capture();
    log_init();
    log_set_level(LOG_INFO);
    log_warn("w");
    release(out, sizeof(out));
    ck_assert_msg(matches(out, "^[0-9]{4}-[^ ]+Z protoqd: warn: w\n$"), "%s",
                  out);
}
END_TEST

/* log_format json: one object a line, the message escaped, the
 * journal's priority prefix kept in front. */
START_TEST(json_lines)
{
    char out[4096], js[64];

    unsetenv("JOURNAL_STREAM");
    capture();
    log_init();
    log_set_level(LOG_INFO);
    log_set_json(true);
    log_warn("say \"%s\"\tto\\ %d", "hi", 7);
    release(out, sizeof(out));
    ck_assert_msg(matches(out, "^\\{\"time\":\"[0-9]{4}-[0-9]{2}-[0-9]{2}T"
                               "[0-9:]{8}\\.[0-9]{3}Z\",\"level\":\"warn\","
                               "\"msg\":\"say \\\\\"hi\\\\\"\\\\u0009to"
                               "\\\\\\\\ 7\"\\}\n$"),
                  "%s", out);
    capture();
    journal_stream_of_stderr(js, sizeof(js));
    setenv("JOURNAL_STREAM", js, 1);
    log_init();
    log_err("e");
    release(out, sizeof(out));
    unsetenv("JOURNAL_STREAM");
    log_set_json(false);
    ck_assert_msg(matches(out, "^<3>\\{\"time\":\"[^\"]+\",\"level\":"
                               "\"error\",\"msg\":\"e\"\\}\n$"),
                  "%s", out);
}
END_TEST

int
main(void)
{
    Suite *s = suite_create("log");
    TCase *tc = tcase_create("log");
    SRunner *sr;
    int failed;

    tcase_add_test(tc, timestamps_when_not_journald);
    tcase_add_test(tc, priority_prefixes_under_journald);
    tcase_add_test(tc, other_stream_is_not_journald);
    tcase_add_test(tc, json_lines);
    suite_add_tcase(s, tc);
    sr = srunner_create(s);
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
