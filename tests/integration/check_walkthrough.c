/*
 * check_walkthrough.c: README's walk-through of `protoq work` (issue 10)
 * runs exactly as written. The commands live in tests/walkthrough.sh and,
 * the same text, in README.md between the markers
 * "<!-- walkthrough.sh begin -->" and "<!-- walkthrough.sh end -->"; this
 * suite checks that the two are identical, then runs the script with
 * protoqd and protoq from the build (PORT=0: its own broker on a free
 * loopback port, stopped by pid), bounded. Also: `protoq work`'s stdout
 * reaches a file as the job writes it (the walk-through reads the workers'
 * logs while they run).
 *
 * Paths are relative to the tree's top (make test runs there).
 */
#include <check.h>
#include <fcntl.h>
#include <libgen.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include "testutil.h"

static const char BEGIN[] = "<!-- walkthrough.sh begin -->";
static const char END[] = "<!-- walkthrough.sh end -->";

/* The directory of the build's binaries (dirname of $PROTOQD). */
static void
bin_dir(char *buf, size_t cap)
{
    char tmp[1024];

    snprintf(tmp, sizeof(tmp), "%s", srv_binary());
    snprintf(buf, cap, "%s", dirname(tmp));
}

/* README's block: the lines between the markers, the fence lines
 * ("```sh", "```") dropped. */
static char *
readme_block(void)
{
    static char readme[256 * 1024];
    char *b, *e, *out, *p;
    size_t n;

    file_slurp("README.md", readme, sizeof(readme));
    b = strstr(readme, BEGIN);
    e = b ? strstr(b, END) : NULL;
    ck_assert_msg(b != NULL && e != NULL, "README.md has no walkthrough "
                                          "markers");
    b = strchr(b, '\n') + 1;
    b = strstr(b, "```sh\n");
    ck_assert_msg(b != NULL && b < e, "no ```sh fence after the marker");
    b += 6;
    p = strstr(b, "\n```\n");
    ck_assert_msg(p != NULL && p < e, "no closing fence before the marker");
    n = (size_t)(p + 1 - b);
    out = malloc(n + 1);
    ck_assert_ptr_nonnull(out);
    memcpy(out, b, n);
    out[n] = '\0';
    return out;
}

START_TEST(test_readme_block_is_the_script)
{
    static char script[64 * 1024];
    char *block = readme_block();

    file_slurp("tests/walkthrough.sh", script, sizeof(script));
    ck_assert_msg(script[0] != '\0', "cannot read tests/walkthrough.sh");
    ck_assert_msg(strcmp(block, script) == 0,
                  "README.md's walk-through and tests/walkthrough.sh differ: "
                  "copy the script between the markers");
    free(block);
}
END_TEST

/* The script runs to its end with its own broker; it prints the
 * measured times and the dead letter. */
START_TEST(test_walkthrough_runs_as_written)
{
    static char out[64 * 1024];
    char bins[1024], path[4096], outpath[300];
    const char *argv[] = {"/bin/bash", "tests/walkthrough.sh", NULL};
    int rc;

    bin_dir(bins, sizeof(bins));
    snprintf(path, sizeof(path), "%s:%s", bins, getenv("PATH"));
    setenv("PATH", path, 1);
    setenv("PORT", "0", 1);
    unsetenv("PROTOQ_SERVER");
    snprintf(outpath, sizeof(outpath), "/tmp/protoq-walk-out.%d",
             (int)getpid());
    rc = prog_run(argv, outpath, 150000);
    file_slurp(outpath, out, sizeof(out));
    unlink(outpath);
    fprintf(stderr, "%s", out);
    ck_assert_msg(rc == 0, "walkthrough.sh exited %d:\n%s", rc, out);
    ck_assert_ptr_nonnull(strstr(out, "kill -9 to running on w2: "));
    ck_assert_ptr_nonnull(strstr(out, "w2 exited 0"));
    ck_assert_ptr_nonnull(strstr(out, "broker restart to a worker running"));
    ck_assert_ptr_nonnull(strstr(out, "loss is NaN"));
}
END_TEST

/* `protoq work > FILE`: a line the job prints is in FILE while the job
 * still runs (it used to wait in stdio's buffer until 4 KiB or exit). */
START_TEST(test_work_passes_job_stdout_through_at_once)
{
    struct srv s;
    char file[300], buf[4096], server[80];
    protoq_client *c;
    struct protoq_message m;
    pid_t pid;
    int64_t end;
    bool seen = false;

    ck_assert_int_eq(srv_start(&s, NULL), 0);
    c = pq_connect_or_fail(&s);
    pq_check_ok(c, protoq_queue_create(c, "q", NULL));
    memset(&m, 0, sizeof(m));
    m.payload = "x";
    m.len = 1;
    pq_check_ok(c, protoq_publish(c, "q", &m, NULL));
    snprintf(file, sizeof(file), "%s/work.out", s.dir);
    snprintf(server, sizeof(server), "%s", s.addr);
    pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        int fd = open(file, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        char bin[1100];

        prctl(PR_SET_PDEATHSIG, SIGKILL);
        bin_dir(bin, sizeof(bin));
        strcat(bin, "/protoq");
        dup2(fd, STDOUT_FILENO);
        execl(bin, bin, "-s", server, "work", "q", "--", "sh", "-c",
              "echo job-says-hello; sleep 5", (char *)NULL);
        _exit(127);
    }
    end = now_ms_mono() + 3000;
    while (!seen && now_ms_mono() < end) {
        poll(NULL, 0, 50);
        seen = strstr(file_slurp(file, buf, sizeof(buf)), "job-says-hello") !=
               NULL;
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    protoq_close(c);
    srv_cleanup(&s);
    ck_assert_msg(seen, "the job's line was not in protoq work's output "
                        "within 3 s");
}
END_TEST

static Suite *
walkthrough_suite(void)
{
    Suite *s = suite_create("walkthrough");
    TCase *tc = tcase_create("walkthrough");

    tcase_set_timeout(tc, 180);
    tcase_add_test(tc, test_readme_block_is_the_script);
    tcase_add_test(tc, test_work_passes_job_stdout_through_at_once);
    tcase_add_test(tc, test_walkthrough_runs_as_written);
    suite_add_tcase(s, tc);
    return s;
}

int
main(void)
{
    SRunner *sr = srunner_create(walkthrough_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
