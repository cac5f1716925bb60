/*
 * check_systemd.c: what protoqd tells systemd over $NOTIFY_SOCKET (no
 * libsystemd on either side: the test is the service manager, with a
 * datagram socket in a temp dir): STATUS= while it recovers, READY=1 and a
 * STATUS= line once it serves, WATCHDOG=1 at half of $WATCHDOG_USEC from
 * the loop (and none once the loop is stopped), STOPPING=1 on SIGTERM;
 * and no watchdog pings when $WATCHDOG_PID names another process.
 */
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <check.h>

#include "testutil.h"

static struct srv g_srv;
static int g_sock = -1;
static char g_dir[48], g_path[96];

/* Listen like systemd does and point NOTIFY_SOCKET at it. */
static void
notify_listen(const char *watchdog_usec, const char *watchdog_pid)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};

    signal(SIGPIPE, SIG_IGN);
    snprintf(g_dir, sizeof(g_dir), "/tmp/protoq-notify.XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(g_dir));
    snprintf(g_path, sizeof(g_path), "%s/notify", g_dir);
    snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", g_path);
    g_sock = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    ck_assert_int_ge(g_sock, 0);
    ck_assert_int_eq(bind(g_sock, (struct sockaddr *)&sa, sizeof(sa)), 0);
    setenv("NOTIFY_SOCKET", g_path, 1);
    setenv("WATCHDOG_USEC", watchdog_usec, 1);
    if (watchdog_pid != NULL) {
        setenv("WATCHDOG_PID", watchdog_pid, 1);
    } else {
        unsetenv("WATCHDOG_PID");
    }
}

static void
teardown(void)
{
    if (g_sock >= 0) {
        close(g_sock);
        g_sock = -1;
    }
    unlink(g_path);
    rmdir(g_dir);
    srv_cleanup(&g_srv); /* last: fails the test if protoqd did not exit 0 */
}

/* The messages that arrive within ms, joined by '|' into out. */
static void
collect(int ms, char *out, size_t cap)
{
    int64_t deadline = now_ms_mono() + ms;
    size_t len = 0;

    out[0] = '\0';
    for (;;) {
        struct pollfd pfd = {.fd = g_sock, .events = POLLIN};
        int64_t left = deadline - now_ms_mono();
        char msg[512];
        ssize_t n;

        if (left <= 0 || poll(&pfd, 1, (int)left) <= 0) {
            return;
        }
        n = recv(g_sock, msg, sizeof(msg) - 1, 0);
        if (n <= 0) {
            continue;
        }
        msg[n] = '\0';
        len +=
            (size_t)snprintf(out + len, len < cap ? cap - len : 0, "%s|", msg);
    }
}

static int
count(const char *hay, const char *needle)
{
    int n = 0;

    for (const char *p = hay; (p = strstr(p, needle)) != NULL; p++) {
        n++;
    }
    return n;
}

START_TEST(test_ready_status_watchdog_and_stopping)
{
    static char got[16384];

    notify_listen("400000", NULL); /* 0.4 s: a ping every 0.2 s */
    ck_assert_int_eq(srv_start(&g_srv, NULL), 0);
    collect(1500, got, sizeof(got));
    ck_assert_msg(strstr(got, "STATUS=recovering the log") != NULL, "%s", got);
    ck_assert_msg(strstr(got, "READY=1") != NULL, "%s", got);
    ck_assert_msg(strstr(got, "STATUS=serving on port") != NULL, "%s", got);
    ck_assert_msg(count(got, "WATCHDOG=1") >= 4, "%s", got);
    /* A stopped loop sends nothing: that is what the watchdog is for. */
    ck_assert_int_eq(kill(g_srv.pid, SIGSTOP), 0);
    collect(300, got, sizeof(got)); /* what was already under way */
    collect(1000, got, sizeof(got));
    ck_assert_msg(count(got, "WATCHDOG=1") == 0, "%s", got);
    ck_assert_int_eq(kill(g_srv.pid, SIGCONT), 0);
    collect(600, got, sizeof(got));
    ck_assert_msg(count(got, "WATCHDOG=1") >= 1, "%s", got);
    ck_assert_int_eq(kill(g_srv.pid, SIGTERM), 0);
    collect(1500, got, sizeof(got));
    ck_assert_msg(strstr(got, "STOPPING=1") != NULL, "%s", got);
}
END_TEST

START_TEST(test_no_watchdog_for_another_pid)
{
    static char got[16384];

    notify_listen("400000", "1");
    ck_assert_int_eq(srv_start(&g_srv, NULL), 0);
    collect(1200, got, sizeof(got));
    ck_assert_msg(strstr(got, "READY=1") != NULL, "%s", got);
    ck_assert_msg(count(got, "WATCHDOG=1") == 0, "%s", got);
}
END_TEST

static Suite *
systemd_suite(void)
{
    Suite *s = suite_create("systemd");
    TCase *tc = tcase_create("notify");

    tcase_add_checked_fixture(tc, NULL, teardown);
    tcase_set_timeout(tc, 30);
    suite_add_tcase(s, tc);
    tcase_add_test(tc, test_ready_status_watchdog_and_stopping);
    tcase_add_test(tc, test_no_watchdog_for_another_pid);
    return s;
}

int
main(void)
{
    SRunner *sr = srunner_create(systemd_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
