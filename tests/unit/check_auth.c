/*
 * check_auth.c: broker/auth.c on its own: the queue-name glob, the
 * auth_file parser (what it accepts, and the line number it names for what
 * it refuses), token lookups, permission checks, SHA-256 against the
 * standard vector, and the loopback test of protected mode.
 */
#include <check.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "auth.h"
#include "mem.h"
#include "pqerr.h"

/* SHA-256("abc"), FIPS 180-2 appendix B.1. */
static const char ABC_HEX[] =
    "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";

static char g_err[512];

static struct auth_table *
parse_ok(const char *text)
{
    struct auth_table *t = NULL;
    int rc = auth_table_parse("tokens", text, strlen(text), &t, g_err,
                              sizeof(g_err));

    ck_assert_msg(rc == PQ_OK, "parse: %s (%d): %s", pq_strerror(rc), rc,
                  g_err);
    ck_assert_ptr_nonnull(t);
    return t;
}

/* The text is refused with an error that starts with want. */
static void
parse_fails(const char *text, const char *want)
{
    struct auth_table *t = (struct auth_table *)1;
    int rc = auth_table_parse("tokens", text, strlen(text), &t, g_err,
                              sizeof(g_err));

    ck_assert_int_eq(rc, PQ_EINVAL);
    ck_assert_ptr_null(t);
    ck_assert_msg(strncmp(g_err, want, strlen(want)) == 0,
                  "error \"%s\" does not start with \"%s\"", g_err, want);
}

/* ---- glob ---- */

START_TEST(test_glob_matches_stars_over_any_run)
{
    ck_assert(auth_glob_match("jobs", "jobs"));
    ck_assert(!auth_glob_match("jobs", "jobs2"));
    ck_assert(!auth_glob_match("jobs", "job"));
    ck_assert(auth_glob_match("*", "anything.at:all"));
    ck_assert(auth_glob_match("*", ""));
    ck_assert(auth_glob_match("train.*", "train."));
    ck_assert(auth_glob_match("train.*", "train.gpu.a100"));
    ck_assert(!auth_glob_match("train.*", "train"));
    ck_assert(!auth_glob_match("train.*", "xtrain.a"));
    ck_assert(auth_glob_match("*.dlq", "jobs.dlq"));
    ck_assert(!auth_glob_match("*.dlq", "jobs.dlq2"));
    ck_assert(auth_glob_match("train.*.gpu", "train.x.gpu"));
    ck_assert(auth_glob_match("train.*.gpu", "train.x.gpu.y.gpu"));
    ck_assert(!auth_glob_match("train.*.gpu", "train.x.cpu"));
    /* backtracking past a first, wrong match of the text after a star */
    ck_assert(auth_glob_match("a*b*c", "axbxbxxc"));
    ck_assert(!auth_glob_match("a*b*c", "axbxbxxcd"));
    ck_assert(auth_glob_match("**a**", "bab"));
    ck_assert(!auth_glob_match("", "a"));
    ck_assert(auth_glob_match("", ""));
}
END_TEST

/* ---- parser ---- */

START_TEST(test_parse_accepts_comments_blanks_and_every_permission)
{
    char text[1024];
    char hex[2 * AUTH_HASH_BYTES + 1];
    struct auth_table *t;
    const struct auth_token *tok;

    ck_assert_int_eq(auth_hash_hex("s3cret-worker", hex), PQ_OK);
    snprintf(
        text, sizeof(text),
        "# tokens\n"
        "\n"
        "   \t\n"
        "ops %s admin\n"
        "  worker-1\t%s consume:train.* publish:results manage:tmp.*  \r\n"
        "ci:x %s publish:*", /* no final newline */
        ABC_HEX, hex,
        "0000000000000000000000000000000000000000000000000000000000000001");
    t = parse_ok(text);
    ck_assert_uint_eq(auth_table_count(t), 3);

    tok = auth_lookup(t, "abc");
    ck_assert_ptr_nonnull(tok);
    ck_assert_str_eq(auth_token_name(tok), "ops");
    ck_assert(auth_token_is_admin(tok));
    ck_assert(auth_allows(tok, AUTH_MANAGE, "anything"));

    tok = auth_lookup(t, "s3cret-worker");
    ck_assert_ptr_nonnull(tok);
    ck_assert_str_eq(auth_token_name(tok), "worker-1");
    ck_assert(!auth_token_is_admin(tok));
    ck_assert(auth_allows(tok, AUTH_CONSUME, "train.a100"));
    ck_assert(!auth_allows(tok, AUTH_PUBLISH, "train.a100"));
    ck_assert(!auth_allows(tok, AUTH_MANAGE, "train.a100"));
    ck_assert(auth_allows(tok, AUTH_PUBLISH, "results"));
    ck_assert(!auth_allows(tok, AUTH_CONSUME, "results"));
    ck_assert(auth_allows(tok, AUTH_MANAGE, "tmp.1"));
    ck_assert(auth_allows(tok, AUTH_CONSUME | AUTH_MANAGE, "tmp.1"));
    ck_assert(auth_allows(tok, AUTH_ANY, "results"));
    ck_assert(!auth_allows(tok, AUTH_ANY, "secret"));

    /* the trailing \r and blanks are not part of the last permission */
    ck_assert(!auth_allows(tok, AUTH_MANAGE, "tmp"));

    /* a wrong, empty or missing token finds nothing */
    ck_assert_ptr_null(auth_lookup(t, "s3cret-worke"));
    ck_assert_ptr_null(auth_lookup(t, "s3cret-worker\n"));
    ck_assert_ptr_null(auth_lookup(t, ""));
    ck_assert_ptr_null(auth_lookup(t, NULL));
    ck_assert_ptr_null(auth_lookup(NULL, "abc"));
    auth_table_free(t);
}
END_TEST

START_TEST(test_parse_errors_name_the_line)
{
    parse_fails("# c\n\nops 12ab admin\n",
                "tokens:3: token ops: expected the hex SHA-256");
    parse_fails("a bb7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20"
                "015ad admin\n"
                "ops zz7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f"
                "20015ad admin\n",
                "tokens:2: token ops: expected the hex SHA-256");
    parse_fails("ops\n", "tokens:1: token ops: expected NAME HASH PERM");
    parse_fails(
        "ops "
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\n",
        "tokens:1: token ops: no permission given");
    parse_fails("ops ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f"
                "20015ad read:*\n",
                "tokens:1: token ops: permission \"read:*\": expected admin");
    parse_fails("ops ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f"
                "20015ad consume:\n",
                "tokens:1: token ops: permission \"consume:\": expected a "
                "queue-name glob");
    parse_fails("ops ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f"
                "20015ad consume:a/b\n",
                "tokens:1: token ops: permission \"consume:a/b\"");
    parse_fails("o/ps ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61"
                "f20015ad admin\n",
                "tokens:1: token name \"o/ps\"");
    parse_fails("ops ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f"
                "20015ad admin\n"
                "ops 0000000000000000000000000000000000000000000000000000000000"
                "000001 admin\n",
                "tokens:2: token ops: name used twice");
    parse_fails("ops ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f"
                "20015ad admin\n"
                "# same token, other name\n"
                "ops2 BA7816BF8F01CFEA414140DE5DAE2223B00361A396177A9CB410FF61"
                "F20015AD consume:*\n",
                "tokens:3: token ops2: same hash as token ops");
}
END_TEST

START_TEST(test_parse_refuses_long_lines_and_nul)
{
    size_t n = 5000;
    char *text = malloc(n + 32);
    struct auth_table *t = NULL;

    ck_assert_ptr_nonnull(text);
    strcpy(text, "# ok\n#");
    memset(text + 6, 'x', n);
    text[6 + n] = '\0';
    parse_fails(text, "tokens:2: line over 4096 bytes");
    free(text);

    ck_assert_int_eq(auth_table_parse("tokens", "ops\0 x admin\n", 13, &t,
                                      g_err, sizeof(g_err)),
                     PQ_EINVAL);
    ck_assert_ptr_null(t);
    ck_assert_str_eq(g_err, "tokens:1: NUL byte in the line");
}
END_TEST

START_TEST(test_empty_file_is_an_empty_table)
{
    struct auth_table *t = parse_ok("# nobody yet\n");

    ck_assert_uint_eq(auth_table_count(t), 0);
    ck_assert_ptr_null(auth_lookup(t, "abc"));
    auth_table_free(t);
}
END_TEST

START_TEST(test_load_file_and_unreadable_file)
{
    char dir[] = "/tmp/check_auth.XXXXXX", path[64];
    struct auth_table *t = NULL;
    FILE *f;

    ck_assert_ptr_nonnull(mkdtemp(dir));
    snprintf(path, sizeof(path), "%s/tokens", dir);
    ck_assert_int_eq(auth_table_load(path, &t, g_err, sizeof(g_err)), PQ_ESYS);
    ck_assert_ptr_null(t);
    ck_assert_msg(strstr(g_err, "No such file") != NULL, "%s", g_err);

    f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fprintf(f, "ops %s admin\nbad %.63s1\n", ABC_HEX, ABC_HEX);
    fclose(f);
    ck_assert_int_eq(auth_table_load(path, &t, g_err, sizeof(g_err)),
                     PQ_EINVAL);
    ck_assert_msg(strstr(g_err, "/tokens:2: token bad: no permission") != NULL,
                  "%s", g_err);

    f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    fprintf(f, "ops %s admin\n", ABC_HEX);
    fclose(f);
    ck_assert_int_eq(auth_table_load(path, &t, g_err, sizeof(g_err)), PQ_OK);
    ck_assert_uint_eq(auth_table_count(t), 1);
    auth_table_free(t);
    unlink(path);
    rmdir(dir);
}
END_TEST

START_TEST(test_parse_survives_out_of_memory)
{
    static const char text[] =
        "ops ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad "
        "consume:a publish:b manage:c\n"
        "w 0000000000000000000000000000000000000000000000000000000000000001 "
        "consume:*\n";
    struct auth_table *t = NULL;
    int rc = PQ_ENOMEM;

    /* Every allocation failing in turn: an error, never a leak or crash
     * (ASan's leak check runs at exit under make test SAN=1). */
    for (long n = 0; n < 50 && rc != PQ_OK; n++) {
        pq_mem_fail_after(n);
        rc = auth_table_parse("tokens", text, strlen(text), &t, g_err,
                              sizeof(g_err));
        pq_mem_fail_after(-1);
        ck_assert(rc == PQ_OK || rc == PQ_ENOMEM);
        ck_assert(rc == PQ_OK ? t != NULL : t == NULL);
    }
    ck_assert_int_eq(rc, PQ_OK);
    auth_table_free(t);
}
END_TEST

/* ---- lookups after a reload ---- */

START_TEST(test_find_by_name_and_hash)
{
    struct auth_table *t = parse_ok(
        "ops ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad "
        "admin\n");
    const struct auth_token *tok = auth_lookup(t, "abc");
    uint8_t other[AUTH_HASH_BYTES];

    ck_assert_ptr_nonnull(tok);
    ck_assert_ptr_eq(auth_find(t, "ops", auth_token_hash(tok)), tok);
    ck_assert_ptr_null(auth_find(t, "ops2", auth_token_hash(tok)));
    memcpy(other, auth_token_hash(tok), sizeof(other));
    other[31] ^= 1;
    ck_assert_ptr_null(auth_find(t, "ops", other));
    auth_table_free(t);
}
END_TEST

/* ---- hashing ---- */

START_TEST(test_sha256_standard_vectors)
{
    char hex[2 * AUTH_HASH_BYTES + 1];

    ck_assert_int_eq(auth_hash_hex("abc", hex), PQ_OK);
    ck_assert_str_eq(hex, ABC_HEX);
    ck_assert_int_eq(auth_hash_hex("", hex), PQ_OK);
    ck_assert_str_eq(
        hex,
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}
END_TEST

/* ---- protected mode ---- */

START_TEST(test_loopback_addresses)
{
    ck_assert(auth_host_is_loopback("127.0.0.1"));
    ck_assert(auth_host_is_loopback("127.1.2.3"));
    ck_assert(auth_host_is_loopback("::1"));
    ck_assert(auth_host_is_loopback("::ffff:127.0.0.1"));
    ck_assert(!auth_host_is_loopback("0.0.0.0"));
    ck_assert(!auth_host_is_loopback("::"));
    ck_assert(!auth_host_is_loopback(""));
    ck_assert(!auth_host_is_loopback("10.1.2.3"));
    ck_assert(!auth_host_is_loopback("192.168.0.1"));
    ck_assert(!auth_host_is_loopback("::ffff:10.0.0.1"));
    ck_assert(!auth_host_is_loopback("no-such-host.invalid"));
}
END_TEST

static Suite *
auth_suite(void)
{
    Suite *s = suite_create("auth");
    TCase *tc = tcase_create("glob");

    tcase_add_test(tc, test_glob_matches_stars_over_any_run);
    suite_add_tcase(s, tc);

    tc = tcase_create("parse");
    tcase_add_test(tc, test_parse_accepts_comments_blanks_and_every_permission);
    tcase_add_test(tc, test_parse_errors_name_the_line);
    tcase_add_test(tc, test_parse_refuses_long_lines_and_nul);
    tcase_add_test(tc, test_empty_file_is_an_empty_table);
    tcase_add_test(tc, test_load_file_and_unreadable_file);
    tcase_add_test(tc, test_parse_survives_out_of_memory);
    suite_add_tcase(s, tc);

    tc = tcase_create("lookup");
    tcase_add_test(tc, test_find_by_name_and_hash);
    tcase_add_test(tc, test_sha256_standard_vectors);
    tcase_add_test(tc, test_loopback_addresses);
    suite_add_tcase(s, tc);
    return s;
}

int
main(void)
{
    SRunner *sr = srunner_create(auth_suite());
    int failed;

    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
