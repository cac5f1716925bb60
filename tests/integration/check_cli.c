/*
 * check_cli.c: the protoq command line as people use it, each test running
 * the built binary ($PROTOQ, else build/protoq) as a subprocess against a
 * real protoqd: --json output, consume --raw/--framed, pub's stdin newline,
 * per-command --help, one-line usage errors with hints and "did you mean",
 * global options anywhere, server address validation, every broker error
 * as "message (CODE)", queue create's duration ranges, queue rm's
 * confirmation. One test calls the --json writer directly (cli_json.c):
 * the broker refuses non-UTF-8 headers, so no delivery can carry one.
 *
 * Every subprocess runs at most CLI_TIMEOUT_MS; every broker is stopped.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "testutil.h"

enum { CLI_TIMEOUT_MS = 15000, OUT_CAP = 1 << 22 };

/* What one run of protoq left behind. */
struct run {
    int status; /* exit status, 128+signal, -1 timed out */
    char *out;  /* stdout (binary safe; NUL-terminated too) */
    size_t out_len;
    char err[8192]; /* stderr */
};

static struct srv S;
static struct run R;

static void
setup(void)
{
    ck_assert_int_eq(srv_start(&S, NULL), 0);
    R.out = malloc(OUT_CAP + 1);
    ck_assert_ptr_nonnull(R.out);
}

static void
teardown(void)
{
    srv_cleanup(&S);
    free(R.out);
    R.out = NULL;
}

static const char *
cli_binary(void)
{
    const char *p = getenv("PROTOQ");

    return p != NULL && p[0] != '\0' ? p : "build/protoq";
}

/* read_file_into: up to cap bytes of path into buf; the length. */
static size_t
read_file_into(const char *path, char *buf, size_t cap)
{
    int fd = open(path, O_RDONLY);
    size_t n = 0;
    ssize_t r;

    if (fd < 0) {
        return 0;
    }
    while (n < cap && (r = read(fd, buf + n, cap - n)) > 0) {
        n += (size_t)r;
    }
    close(fd);
    return n;
}

/* write_file: len bytes of data into DIR/name; its path into path. */
static void
write_file(const char *name, const void *data, size_t len, char *path,
           size_t cap)
{
    FILE *f;

    snprintf(path, cap, "%s/%s", S.dir, name);
    f = fopen(path, "wb");
    ck_assert_ptr_nonnull(f);
    ck_assert_uint_eq(fwrite(data, 1, len, f), len);
    ck_assert_int_eq(fclose(f), 0);
}

/*
 * cli_env: run protoq with args (NULL-terminated), PROTOQ_SERVER set to
 * server (unset when NULL), stdin from in_path (NULL: /dev/null). Fills R;
 * returns R.status.
 */
static int
cli_env(const char *server, const char *in_path, const char *const *args)
{
    char outp[300], errp[300];
    const char *argv[64];
    int64_t deadline;
    size_t n = 0;
    pid_t pid;
    int st;

    argv[n++] = cli_binary();
    for (size_t i = 0; args[i] != NULL && n < 63; i++) {
        argv[n++] = args[i];
    }
    argv[n] = NULL;
    snprintf(outp, sizeof(outp), "%s/cli.out", S.dir);
    snprintf(errp, sizeof(errp), "%s/cli.err", S.dir);
    pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        int in = open(in_path ? in_path : "/dev/null", O_RDONLY);
        int out = open(outp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
        int err = open(errp, O_WRONLY | O_CREAT | O_TRUNC, 0600);

        if (in < 0 || out < 0 || err < 0) {
            _exit(126);
        }
        dup2(in, 0);
        dup2(out, 1);
        dup2(err, 2);
        if (server != NULL) {
            setenv("PROTOQ_SERVER", server, 1);
        } else {
            unsetenv("PROTOQ_SERVER");
        }
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    deadline = now_ms_mono() + CLI_TIMEOUT_MS;
    R.status = -1;
    for (;;) {
        pid_t w = waitpid(pid, &st, WNOHANG);

        if (w == pid) {
            R.status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
            break;
        }
        if (now_ms_mono() > deadline) {
            kill(pid, SIGKILL);
            waitpid(pid, &st, 0);
            break;
        }
        usleep(5000);
    }
    R.out_len = read_file_into(outp, R.out, OUT_CAP);
    R.out[R.out_len] = '\0';
    R.err[read_file_into(errp, R.err, sizeof(R.err) - 1)] = '\0';
    return R.status;
}

#define CLI(...) CLI_IN(NULL, __VA_ARGS__)
#define CLI_IN(path, ...)                                                      \
    cli_env(S.addr, path, (const char *const[]){__VA_ARGS__, NULL})
#define CLI_NOENV(...)                                                         \
    cli_env(NULL, NULL, (const char *const[]){__VA_ARGS__, NULL})

static int
count_lines(const char *s)
{
    int n = 0;

    for (; *s; s++) {
        n += *s == '\n';
    }
    return n;
}

/* ---- --json ---- */

/* Message ids are 64-bit (above 2^53): --json writes them as strings, so
 * jq and JavaScript keep every digit. */
START_TEST(json_id_is_a_string)
{
    char id[32], want[64];

    ck_assert_int_eq(CLI("queue", "create", "q"), 0);
    ck_assert_int_eq(CLI("pub", "q", "hello"), 0);
    snprintf(id, sizeof(id), "%s", R.out);
    id[strcspn(id, "\n")] = '\0';
    ck_assert_msg(strlen(id) > 15, "id %s", id);
    ck_assert_int_eq(CLI("consume", "q", "--count", "1", "--json"), 0);
    snprintf(want, sizeof(want), "{\"id\":\"%s\",", id);
    ck_assert_msg(strncmp(R.out, want, strlen(want)) == 0, "got %s", R.out);
    ck_assert_ptr_nonnull(strstr(R.out, "\"payload\":\"hello\""));
}
END_TEST

/* A header key or value that is not UTF-8 would make the line invalid
 * JSON: such pairs go, base64-encoded, into "headers_base64". */
START_TEST(json_non_utf8_header_is_base64)
{
    struct protoq_kv h[2] = {{"ok", "v"}, {"k", "\xff"}};
    struct protoq_delivery d;
    char *buf = NULL;
    size_t len = 0;
    FILE *f = open_memstream(&buf, &len);

    ck_assert_ptr_nonnull(f);
    memset(&d, 0, sizeof(d));
    d.message_id = 117710672494560966ULL;
    d.attempt = 1;
    d.queue = "q";
    d.headers = h;
    d.n_headers = 2;
    d.payload = "x";
    d.len = 1;
    cli_json_delivery(f, &d);
    ck_assert_int_eq(fclose(f), 0);
    ck_assert_str_eq(buf, "{\"id\":\"117710672494560966\",\"attempt\":1,"
                          "\"priority\":0,\"queue\":\"q\",\"headers\":{\"ok\":"
                          "\"v\"},\"headers_base64\":{\"aw==\":\"/w==\"},"
                          "\"payload\":\"x\"}\n");
    free(buf);
}
END_TEST

/* ---- payload bytes in and out ---- */

/* consume --raw writes one payload exactly as stored (no newline added);
 * --framed writes each as a 4-byte big-endian length and the bytes. */
START_TEST(consume_raw_and_framed)
{
    unsigned char bin[3000];
    char path[300];

    for (size_t i = 0; i < sizeof(bin); i++) {
        bin[i] = (unsigned char)(i * 7 + (i >> 8));
    }
    bin[sizeof(bin) - 1] = '\n';
    write_file("bin", bin, sizeof(bin), path, sizeof(path));
    ck_assert_int_eq(CLI("queue", "create", "q"), 0);
    ck_assert_int_eq(CLI("pub", "q", "--file", path), 0);
    ck_assert_int_eq(CLI("consume", "q", "--raw", "--count", "1"), 0);
    ck_assert_uint_eq(R.out_len, sizeof(bin));
    ck_assert_int_eq(memcmp(R.out, bin, sizeof(bin)), 0);

    /* --raw with more than one message would run them together. */
    ck_assert_int_eq(CLI("consume", "q", "--raw", "--wait", "100ms"), 2);

    ck_assert_int_eq(CLI("pub", "q", "ab"), 0);
    ck_assert_int_eq(CLI("pub", "q", "--file", path), 0);
    ck_assert_int_eq(CLI("consume", "q", "--framed", "--wait", "300ms"), 0);
    ck_assert_uint_eq(R.out_len, 4 + 2 + 4 + sizeof(bin));
    ck_assert_int_eq(memcmp(R.out, "\0\0\0\2ab", 6), 0);
    ck_assert_int_eq((unsigned char)R.out[8], sizeof(bin) >> 8);
    ck_assert_int_eq((unsigned char)R.out[9], sizeof(bin) & 255);
    ck_assert_int_eq(memcmp(R.out + 10, bin, sizeof(bin)), 0);
}
END_TEST

/* `echo x | protoq pub q` publishes "x": one trailing newline of stdin is
 * stripped, unless --binary. The default consume adds one newline. */
START_TEST(pub_stdin_strips_one_newline)
{
    char path[300];

    write_file("in", "x\n\n", 3, path, sizeof(path));
    ck_assert_int_eq(CLI("queue", "create", "q"), 0);
    ck_assert_int_eq(CLI_IN(path, "pub", "q"), 0);
    ck_assert_int_eq(CLI_IN(path, "pub", "q", "--binary"), 0);
    ck_assert_int_eq(CLI("consume", "q", "--count", "1", "--raw"), 0);
    ck_assert_uint_eq(R.out_len, 2);
    ck_assert_int_eq(memcmp(R.out, "x\n", 2), 0);
    ck_assert_int_eq(CLI("consume", "q", "--count", "1", "--raw"), 0);
    ck_assert_uint_eq(R.out_len, 3);
    ck_assert_int_eq(memcmp(R.out, "x\n\n", 3), 0);
    /* The default mode adds one newline to what it prints. */
    ck_assert_int_eq(CLI("pub", "q", "y"), 0);
    ck_assert_int_eq(CLI("consume", "q", "--count", "1"), 0);
    ck_assert_str_eq(R.out, "y\n");
}
END_TEST

/* ---- help and usage errors ---- */

/* Every command's --help (and -h, and `help CMD`) exits 0 with a short
 * text on stdout that has its synopsis and an example. */
START_TEST(per_command_help)
{
    static const char *const cmds[][3] = {
        {"pub", NULL, "protoq pub QUEUE"},
        {"consume", NULL, "protoq consume QUEUE"},
        {"work", NULL, "protoq work QUEUE"},
        {"cancel", NULL, "protoq cancel QUEUE ID"},
        {"queue", NULL, "protoq queue create"},
        {"queue", "create", "protoq queue create NAME"},
        {"queue", "rm", "protoq queue rm NAME"},
    };

    for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++) {
        if (cmds[i][1] != NULL) {
            ck_assert_int_eq(CLI(cmds[i][0], cmds[i][1], "--help"), 0);
        } else {
            ck_assert_int_eq(CLI(cmds[i][0], "--help"), 0);
        }
        ck_assert_msg(strstr(R.out, cmds[i][2]) != NULL, "%s: %s", cmds[i][2],
                      R.out);
        ck_assert_msg(strstr(R.out, "xample") != NULL, "%s: %s", cmds[i][0],
                      R.out);
        ck_assert_msg(count_lines(R.out) <= 25, "%s: %d lines", cmds[i][0],
                      count_lines(R.out));
        ck_assert_str_eq(R.err, "");
    }
    /* -h after other options, and `help pub`, say the same. */
    ck_assert_int_eq(CLI("pub", "q", "--priority", "3", "-h"), 0);
    ck_assert_ptr_nonnull(strstr(R.out, "protoq pub QUEUE"));
    ck_assert_int_eq(CLI("help", "pub"), 0);
    ck_assert_ptr_nonnull(strstr(R.out, "protoq pub QUEUE"));
}
END_TEST

/* A usage error is one line and a hint, not the whole usage; misspelt
 * commands and options get a "did you mean". Exit 2. */
START_TEST(usage_errors_are_short)
{
    ck_assert_int_eq(CLI("pub"), 2);
    ck_assert_msg(count_lines(R.err) <= 2, "%s", R.err);
    ck_assert_ptr_nonnull(strstr(R.err, "protoq pub --help"));
    ck_assert_str_eq(R.out, "");

    ck_assert_int_eq(CLI("pubb", "q", "x"), 2);
    ck_assert_msg(count_lines(R.err) <= 2, "%s", R.err);
    ck_assert_msg(strstr(R.err, "did you mean 'pub'") != NULL, "%s", R.err);

    ck_assert_int_eq(CLI("pub", "q", "x", "--priorty", "3"), 2);
    ck_assert_msg(count_lines(R.err) <= 2, "%s", R.err);
    ck_assert_msg(strstr(R.err, "did you mean '--priority'") != NULL, "%s",
                  R.err);

    ck_assert_int_eq(CLI("queue", "craete", "q"), 2);
    ck_assert_msg(strstr(R.err, "did you mean 'create'") != NULL, "%s", R.err);

    ck_assert_int_eq(CLI("consume", "q", "--count"), 2);
    ck_assert_msg(count_lines(R.err) <= 2, "%s", R.err);
    ck_assert_msg(strstr(R.err, "--count") != NULL, "%s", R.err);
}
END_TEST

/* ---- global options and the server address ---- */

/* -s works before the command, after it, and among its options. */
START_TEST(global_options_anywhere)
{
    ck_assert_int_eq(CLI_NOENV("queue", "create", "q", "-s", S.addr), 0);
    ck_assert_int_eq(CLI_NOENV("pub", "-s", S.addr, "q", "x"), 0);
    ck_assert_int_eq(CLI_NOENV("-s", S.addr, "queue", "ls"), 0);
    ck_assert_ptr_nonnull(strstr(R.out, "q "));
    ck_assert_int_eq(
        CLI_NOENV("consume", "q", "--count", "1", "--server", S.addr), 0);
    ck_assert_str_eq(R.out, "x\n");
}
END_TEST

/* A server address with a bad port is a usage error, before connecting. */
START_TEST(server_address_validated)
{
    static const char *const bad[] = {
        "127.0.0.1:99999", "127.0.0.1:0", "127.0.0.1:x1",
        "127.0.0.1:",      "[::1",        ":7650"};

    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        ck_assert_int_eq(CLI("-s", bad[i], "queue", "ls"), 2);
        ck_assert_msg(strstr(R.err, bad[i]) != NULL, "%s", R.err);
        ck_assert_msg(count_lines(R.err) <= 2, "%s", R.err);
    }
    /* $PROTOQ_SERVER too, naming where the address came from. */
    ck_assert_int_eq(cli_env("127.0.0.1:99999", NULL,
                             (const char *const[]){"queue", "ls", NULL}),
                     2);
    ck_assert_msg(strstr(R.err, "PROTOQ_SERVER") != NULL, "%s", R.err);
}
END_TEST

/* ---- broker errors ---- */

/* Every error from the broker is "message (CODE)", including a message
 * over the broker's limit, however large (the library knows the limit from
 * Welcome and refuses it with the broker's code). */
START_TEST(errors_carry_their_code)
{
    char path[300];
    size_t big = 20u << 20;
    char *buf = calloc(1, big);

    ck_assert_ptr_nonnull(buf);
    ck_assert_int_eq(CLI("queue", "create", "q"), 0);
    write_file("big", buf, big, path, sizeof(path));
    ck_assert_int_eq(CLI("pub", "q", "--file", path), 1);
    ck_assert_msg(strstr(R.err, "(MESSAGE_TOO_LARGE)") != NULL, "%s", R.err);
    write_file("big", buf, (1u << 20) + 1, path, sizeof(path));
    ck_assert_int_eq(CLI("pub", "q", "--file", path), 1);
    ck_assert_msg(strstr(R.err, "(MESSAGE_TOO_LARGE)") != NULL, "%s", R.err);
    free(buf);

    ck_assert_int_eq(CLI("queue", "rm", "nope"), 1);
    ck_assert_msg(strstr(R.err, "(QUEUE_NOT_FOUND)") != NULL, "%s", R.err);
    ck_assert_int_eq(CLI("pub", "nope", "x"), 1);
    ck_assert_msg(strstr(R.err, "(QUEUE_NOT_FOUND)") != NULL, "%s", R.err);
}
END_TEST

/* ---- queue commands ---- */

/* queue create's durations use the config's grammar and ranges: 1h30m is
 * fine; 5 (ms) and 0 (which would silently mean 30 s) are refused. */
START_TEST(queue_create_durations_ranged)
{
    ck_assert_int_eq(CLI("queue", "create", "q", "--ack-timeout", "1h30m"), 0);
    ck_assert_int_eq(CLI("queue", "stat", "q"), 0);
    ck_assert_msg(strstr(R.out, "ack_timeout_ms: 5400000\n") != NULL, "%s",
                  R.out);
    ck_assert_int_eq(CLI("queue", "create", "r", "--ack-timeout", "5"), 2);
    ck_assert_msg(strstr(R.err, "10ms") != NULL, "%s", R.err);
    ck_assert_int_eq(CLI("queue", "create", "r", "--ack-timeout", "0"), 2);
    ck_assert_int_eq(CLI("queue", "create", "r", "--ack-timeout", "31d"), 2);
    ck_assert_int_eq(CLI("queue", "create", "r", "--backoff", "1s:8d"), 2);
    ck_assert_int_eq(CLI("queue", "create", "r", "--max-attempts", "0"), 2);
    ck_assert_int_eq(CLI("queue", "create", "r", "--max-attempts", "1001"), 2);
    ck_assert_int_eq(CLI("queue", "create", "r", "--dedup-window", "0"), 2);
    ck_assert_int_eq(CLI("queue", "ls"), 0);
    ck_assert_ptr_null(strstr(R.out, "\nr "));
}
END_TEST

/* queue rm says what it did. */
START_TEST(queue_rm_confirms)
{
    ck_assert_int_eq(CLI("queue", "create", "q"), 0);
    ck_assert_int_eq(CLI("queue", "rm", "q"), 0);
    ck_assert_str_eq(R.out, "deleted queue q\n");
}
END_TEST

static Suite *
cli_suite(void)
{
    Suite *s = suite_create("cli");
    TCase *tc = tcase_create("cli");

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, json_id_is_a_string);
    tcase_add_test(tc, json_non_utf8_header_is_base64);
    tcase_add_test(tc, consume_raw_and_framed);
    tcase_add_test(tc, pub_stdin_strips_one_newline);
    tcase_add_test(tc, per_command_help);
    tcase_add_test(tc, usage_errors_are_short);
    tcase_add_test(tc, global_options_anywhere);
    tcase_add_test(tc, server_address_validated);
    tcase_add_test(tc, errors_carry_their_code);
    tcase_add_test(tc, queue_create_durations_ranged);
    tcase_add_test(tc, queue_rm_confirms);
    suite_add_tcase(s, tc);
    return s;
}

int
main(void)
{
    SRunner *sr = srunner_create(cli_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
