/*
 * check_crash.c: durability of protoqd under crashes (issue 3).
 *
 * crash_loop: CRASH_CYCLES (default 20) times: launch protoqd on the same
 *   data dir, fork a producer (pipelined publishes with confirms; every
 *   confirmed seq/id is appended to a file with write()) and a consumer
 *   (acks every delivery with a confirmed ack; records every delivery, every
 *   ack tried and every ack confirmed), let them run 50-500 ms (seeded
 *   random; the seed is printed, CRASH_SEED=N repeats it), SIGKILL the
 *   broker, reap the children (they must exit by themselves). Then a final
 *   drain, and the checker: lost, unexpected, corrupt, bad duplicates and
 *   message-id conflicts must all be 0.
 * sigterm_loop: the same with an orderly SIGTERM, which must exit 0.
 * power_loss_loop: the same with a power loss: the test build protoqd-pl
 *   (tests/model/pl_seam.c) journals what a power loss must undo, and
 *   after each kill -9 the writes no fsync covered are undone (a seeded
 *   prefix kept, maybe one torn; tests/model/powerloss.c). With fsync
 *   always the checker's rules are the same: confirmed means fsynced.
 * failpoints: the same loop with the broker killing itself at a named
 *   failpoint (before a sync, before a confirm, at a segment roll, during
 *   compaction).
 *
 * A full disk is in check_disk_full.c, damaged and rolled segments in
 * check_segments.c; the fixture, payloads and children they share are in
 * crash_fixture.c.
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
#include "model/pl_journal.h"
#include "model/powerloss.h"

static void
create_queue(void)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);

    pq_check_ok(c, protoq_queue_create(c, QUEUE, NULL));
    protoq_close(c);
}

/* ------------------------------------------------------------- checker */

enum {
    F_CONFIRMED = 1,
    F_ACK_CONF = 2,
    F_ACK_TRIED = 4,
    F_IN_DRAIN = 8,
    F_DELIVERED = 16,
};

struct seqinfo {
    uint8_t flags;
    uint32_t n_deliv;
    uint64_t id; /* confirmed or first delivered id */
};

struct idpair {
    uint64_t id, seq;
};

struct checker {
    int cycles;            /* producer cycles: seq (c+1)*STRIDE + i */
    uint64_t *n_sent;      /* per cycle */
    struct seqinfo **info; /* per cycle, n_sent entries */
    struct idpair *pairs;
    size_t n_pairs, cap_pairs;
    /* results */
    uint64_t sent, confirmed, deliveries, distinct, acked;
    uint64_t lost, unexpected, corrupt, duplicates, bad_dups, id_conflicts;
    uint64_t ack_unknown, refused_acks, unconfirmed_delivered;
    char first_problem[256];
};

static void problem(struct checker *k, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void
problem(struct checker *k, const char *fmt, ...)
{
    va_list ap;

    if (k->first_problem[0] != '\0') {
        return;
    }
    va_start(ap, fmt);
    vsnprintf(k->first_problem, sizeof(k->first_problem), fmt, ap);
    va_end(ap);
}

static struct seqinfo *
lookup(struct checker *k, uint64_t seq)
{
    uint64_t c = seq / SEQ_STRIDE, i = seq % SEQ_STRIDE;

    if (c < 1 || c > (uint64_t)k->cycles || i >= k->n_sent[c - 1]) {
        return NULL;
    }
    return &k->info[c - 1][i];
}

static void
add_pair(struct checker *k, uint64_t id, uint64_t seq)
{
    if (k->n_pairs == k->cap_pairs) {
        k->cap_pairs = k->cap_pairs ? k->cap_pairs * 2 : 4096;
        k->pairs = realloc(k->pairs, k->cap_pairs * sizeof(*k->pairs));
        ck_assert_ptr_nonnull(k->pairs);
    }
    k->pairs[k->n_pairs].id = id;
    k->pairs[k->n_pairs].seq = seq;
    k->n_pairs++;
}

static void
checker_init(struct checker *k, int cycles)
{
    memset(k, 0, sizeof(*k));
    k->cycles = cycles;
    k->n_sent = calloc((size_t)cycles, sizeof(*k->n_sent));
    k->info = calloc((size_t)cycles, sizeof(*k->info));
    ck_assert(k->n_sent != NULL && k->info != NULL);
}

static void
checker_free(struct checker *k)
{
    int c;

    for (c = 0; c < k->cycles; c++) {
        free(k->info[c]);
    }
    free(k->info);
    free(k->n_sent);
    free(k->pairs);
}

/* Read a producer file: P lines give the sent count, C lines confirms. */
static void
read_producer(struct checker *k, int cycle, const char *path)
{
    char line[256];
    uint64_t n = 0;
    FILE *f = fopen(path, "r");

    if (f == NULL) {
        return;
    }
    while (fgets(line, sizeof(line), f) != NULL) {
        if (line[0] == 'P') {
            n++;
        }
    }
    k->n_sent[cycle] = n;
    k->sent += n;
    k->info[cycle] = calloc(n ? n : 1, sizeof(struct seqinfo));
    ck_assert_ptr_nonnull(k->info[cycle]);
    rewind(f);
    while (fgets(line, sizeof(line), f) != NULL) {
        unsigned long long seq, id;
        struct seqinfo *si;

        if (line[0] != 'C' || sscanf(line + 1, "%llu %llu", &seq, &id) != 2) {
            continue;
        }
        si = lookup(k, seq);
        if (si == NULL) {
            problem(k, "confirm of seq %llu that was never sent", seq);
            continue;
        }
        si->flags |= F_CONFIRMED;
        si->id = id;
        k->confirmed++;
        add_pair(k, id, seq);
    }
    fclose(f);
}

/* Read a consumer file in order; in_drain marks the final drain. */
static void
read_consumer(struct checker *k, const char *path, bool in_drain)
{
    char line[256];
    FILE *f = fopen(path, "r");

    if (f == NULL) {
        return;
    }
    while (fgets(line, sizeof(line), f) != NULL) {
        unsigned long long seq, id;
        unsigned attempt;
        int ok, code;
        struct seqinfo *si;

        switch (line[0]) {
        case 'D':
            if (sscanf(line + 1, "%llu %llu %u %d", &seq, &id, &attempt, &ok) !=
                4) {
                continue;
            }
            k->deliveries++;
            if (!ok) {
                k->corrupt++;
                problem(k, "corrupt payload, message id %llu", id);
                continue;
            }
            si = lookup(k, seq);
            if (si == NULL) {
                k->unexpected++;
                problem(k, "delivered seq %llu (id %llu) was never published",
                        seq, id);
                continue;
            }
            if (si->flags & F_ACK_CONF) {
                k->bad_dups++;
                problem(k,
                        "seq %llu (id %llu, attempt %u) delivered again "
                        "after its ack was confirmed",
                        seq, id, attempt);
            }
            if (si->n_deliv == 0) {
                k->distinct++;
                if (!(si->flags & F_CONFIRMED)) {
                    k->unconfirmed_delivered++;
                }
            } else {
                k->duplicates++;
            }
            si->n_deliv++;
            si->flags |= F_DELIVERED;
            if (in_drain) {
                si->flags |= F_IN_DRAIN;
            }
            add_pair(k, id, seq);
            break;
        case 'a':
        case 'A':
            if (sscanf(line + 1, "%llu %llu", &seq, &id) != 2 ||
                (si = lookup(k, seq)) == NULL) {
                continue;
            }
            si->flags |= line[0] == 'A' ? F_ACK_CONF : F_ACK_TRIED;
            if (line[0] == 'A') {
                k->acked++;
            }
            break;
        case 'E':
            if (sscanf(line + 1, "%llu %llu %d", &seq, &id, &code) == 3) {
                k->refused_acks++;
                problem(k, "ack of seq %llu id %llu refused with %s", seq, id,
                        protoq_code_name(code));
            }
            break;
        default:
            break;
        }
    }
    fclose(f);
}

static int
cmp_pair(const void *a, const void *b)
{
    const struct idpair *x = a, *y = b;

    if (x->id != y->id) {
        return x->id < y->id ? -1 : 1;
    }
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

static void
checker_finish(struct checker *k)
{
    int c;
    size_t i;

    for (c = 0; c < k->cycles; c++) {
        for (i = 0; i < k->n_sent[c]; i++) {
            struct seqinfo *si = &k->info[c][i];

            if (!(si->flags & F_CONFIRMED) || (si->flags & F_ACK_CONF) ||
                (si->flags & F_IN_DRAIN)) {
                continue;
            }
            if (si->flags & F_ACK_TRIED) {
                k->ack_unknown++; /* an ack was sent; it may have landed */
            } else {
                k->lost++;
                problem(k, "confirmed seq %" PRIu64 " (id %" PRIu64 ") lost",
                        (uint64_t)(c + 1) * SEQ_STRIDE + i, si->id);
            }
        }
    }
    /* one id, one message */
    qsort(k->pairs, k->n_pairs, sizeof(*k->pairs), cmp_pair);
    for (i = 1; i < k->n_pairs; i++) {
        if (k->pairs[i].id == k->pairs[i - 1].id &&
            k->pairs[i].seq != k->pairs[i - 1].seq) {
            k->id_conflicts++;
            problem(k,
                    "message id %" PRIu64 " used for seq %" PRIu64
                    " and seq %" PRIu64,
                    k->pairs[i].id, k->pairs[i - 1].seq, k->pairs[i].seq);
        }
    }
}

static void
checker_report(const struct checker *k, const char *name, int cycles,
               unsigned seed)
{
    printf("%s: seed %u cycles %d: sent %" PRIu64 " confirmed %" PRIu64
           " deliveries %" PRIu64 " distinct %" PRIu64 " acked %" PRIu64
           " | lost %" PRIu64 " unexpected %" PRIu64 " corrupt %" PRIu64
           " duplicates %" PRIu64 " (after a confirmed ack: %" PRIu64 ")"
           " id_conflicts %" PRIu64 " refused_acks %" PRIu64
           " | ack_unconfirmed_gone %" PRIu64 " unconfirmed_delivered %" PRIu64
           "\n",
           name, seed, cycles, k->sent, k->confirmed, k->deliveries,
           k->distinct, k->acked, k->lost, k->unexpected, k->corrupt,
           k->duplicates, k->bad_dups, k->id_conflicts, k->refused_acks,
           k->ack_unknown, k->unconfirmed_delivered);
    fflush(stdout);
}

static void
checker_assert(const struct checker *k)
{
    ck_assert_msg(k->confirmed > 0, "no publish was ever confirmed");
    ck_assert_msg(k->acked > 0, "no ack was ever confirmed");
    ck_assert_msg(k->lost == 0 && k->unexpected == 0 && k->corrupt == 0 &&
                      k->bad_dups == 0 && k->id_conflicts == 0 &&
                      k->refused_acks == 0,
                  "lost %" PRIu64 " unexpected %" PRIu64 " corrupt %" PRIu64
                  " bad duplicates %" PRIu64 " id conflicts %" PRIu64
                  " refused acks %" PRIu64 "; first: %s",
                  k->lost, k->unexpected, k->corrupt, k->bad_dups,
                  k->id_conflicts, k->refused_acks, k->first_problem);
}

/* ------------------------------------------------------------ the loops */

/* power_loss_loop: the journal protoqd-pl writes (NULL: kill -9 only), and
 * what the power losses did. */
static const char *g_pl_journal;
static struct pl_result g_pl;

static int
env_int(const char *name, int dflt, int lo, int hi)
{
    const char *v = getenv(name);
    long n;

    if (v == NULL || v[0] == '\0') {
        return dflt;
    }
    n = strtol(v, NULL, 10);
    return n < lo ? lo : n > hi ? hi : (int)n;
}

static unsigned
crash_seed(void)
{
    const char *v = getenv("CRASH_SEED");

    if (v != NULL && v[0] != '\0') {
        return (unsigned)strtoul(v, NULL, 10);
    }
    return (unsigned)time(NULL) ^ ((unsigned)getpid() << 16);
}

static uint32_t
rnd(uint64_t *state)
{
    uint64_t x = *state;

    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *state = x;
    return (uint32_t)(x >> 32);
}

/*
 * Failpoint mode of run_cycles: each cycle launches the broker with
 * PROTOQ_FAILPOINT=NAME:N (N random in fp_lo..fp_hi), so it kills itself
 * at that point; if it has not died after the cycle's run time plus a
 * bounded wait, it is killed -9 like a plain cycle.
 */
static const char *g_fp_name;
static int g_fp_lo, g_fp_hi;
static int g_fp_fired;

/* wait_self_kill: true when the broker died by itself within ms. */
static bool
wait_self_kill(int ms)
{
    int64_t deadline = now_ms_mono() + ms;
    int st;

    while (now_ms_mono() < deadline) {
        if (waitpid(g_srv.pid, &st, WNOHANG) == g_srv.pid) {
            g_srv.pid = 0;
            return true;
        }
        sleep_ms(5);
    }
    return false;
}

/* armed_create_queue: create_queue after launch_armed. The failpoint may
 * fire on the queue's own record (the first segment roll can come that
 * early: the start itself writes records); true when it did, and the
 * broker is gone. */
static bool
armed_create_queue(void)
{
    protoq_client *c = NULL;
    int rc = protoq_connect(g_srv.addr, NULL, &c);

    if (rc == PQ_OK) {
        rc = protoq_queue_create(c, QUEUE, NULL);
    }
    if (rc != PQ_OK) {
        ck_assert_msg(wait_self_kill(5000),
                      "create queue %s: %s (failpoint %s not fired)", QUEUE,
                      protoq_errmsg(c), g_fp_name);
    }
    protoq_close(c);
    return rc != PQ_OK;
}

/* launch_armed: (re)start the broker with the failpoint armed. */
static int
launch_armed(uint64_t *state)
{
    char spec[96];
    int n = g_fp_lo + (int)(rnd(state) % (uint32_t)(g_fp_hi - g_fp_lo + 1));
    int rc;

    snprintf(spec, sizeof(spec), "%s:%d", g_fp_name, n);
    setenv("PROTOQ_FAILPOINT", spec, 1);
    rc = srv_launch(&g_srv);
    unsetenv("PROTOQ_FAILPOINT");
    return rc;
}

/*
 * run_cycles: cycles times: (re)launch, producer + consumer for a random
 * lo..hi ms, then stop the broker with kill -9 (sigterm false) or SIGTERM
 * (true; must exit 0), or let an armed failpoint crash it (g_fp_name).
 * Then the final drain and the checker.
 */
static void
run_cycles(const char *name, int cycles, bool sigterm, int lo, int hi)
{
    unsigned seed = crash_seed();
    uint64_t state = ((uint64_t)seed << 1) | 1;
    struct checker k;
    char path[400];
    int cyc;

    printf("%s: seed %u (CRASH_SEED=%u repeats it), %d cycles\n", name, seed,
           seed, cycles);
    fflush(stdout);
    for (cyc = 0; cyc < cycles; cyc++) {
        char ppath[400], cpath[400];
        int run_ms = lo + (int)(rnd(&state) % (uint32_t)(hi - lo + 1));
        pid_t prod, cons;

        if (g_fp_name != NULL) {
            if (cyc == 0) {
                ck_assert_int_eq(srv_stop(&g_srv), 0);
            }
            ck_assert_msg(launch_armed(&state) == 0,
                          "cycle %d: protoqd did not come back after "
                          "failpoint %s (seed %u)",
                          cyc, g_fp_name, seed);
        } else if (cyc > 0) {
            ck_assert_msg(srv_launch(&g_srv) == 0,
                          "cycle %d: protoqd did not come back after %s "
                          "(seed %u)",
                          cyc, sigterm ? "SIGTERM" : "kill -9", seed);
        }
        if (g_fp_name == NULL) {
            create_queue();
        } else if (armed_create_queue()) {
            g_fp_fired++;
            continue;
        }
        snprintf(ppath, sizeof(ppath), "%s/prod-%04d.log", g_srv.dir, cyc);
        snprintf(cpath, sizeof(cpath), "%s/cons-%04d.log", g_srv.dir, cyc);
        cons = spawn('c', cpath, 0);
        prod = spawn('p', ppath, (uint64_t)(cyc + 1) * SEQ_STRIDE);
        if (g_fp_name != NULL) {
            if (wait_self_kill(run_ms + 1500)) {
                g_fp_fired++;
            } else {
                srv_kill9(&g_srv);
            }
        } else {
            sleep_ms(run_ms);
            if (sigterm) {
                int rc = srv_stop(&g_srv);

                ck_assert_msg(rc == 0,
                              "cycle %d: protoqd exit status %d "
                              "after SIGTERM, want 0 (seed %u)",
                              cyc, rc, seed);
            } else {
                srv_kill9(&g_srv);
            }
        }
        if (g_pl_journal != NULL) {
            char err[300];

            ck_assert_msg(pl_apply(g_pl_journal, seed * 31u + (unsigned)cyc,
                                   false, &g_pl, err, sizeof(err)) == 0,
                          "cycle %d: power loss: %s (seed %u)", cyc, err, seed);
        }
        reap(prod, "producer", cyc);
        reap(cons, "consumer", cyc);
    }
    ck_assert_msg(srv_launch(&g_srv) == 0,
                  "protoqd did not start for the "
                  "final drain (seed %u)",
                  seed);
    create_queue();
    snprintf(path, sizeof(path), "%s/drain.log", g_srv.dir);
    drain(path);

    checker_init(&k, cycles);
    for (cyc = 0; cyc < cycles; cyc++) {
        snprintf(path, sizeof(path), "%s/prod-%04d.log", g_srv.dir, cyc);
        read_producer(&k, cyc, path);
    }
    for (cyc = 0; cyc < cycles; cyc++) {
        snprintf(path, sizeof(path), "%s/cons-%04d.log", g_srv.dir, cyc);
        read_consumer(&k, path, false);
    }
    snprintf(path, sizeof(path), "%s/drain.log", g_srv.dir);
    read_consumer(&k, path, true);
    checker_finish(&k);
    checker_report(&k, name, cycles, seed);
    checker_assert(&k);
    checker_free(&k);
}

/* One failpoint, many cycles; it must have fired in some of them, or the
 * test proved nothing. */
static void
run_failpoint(const char *fp, int lo, int hi)
{
    char name[64];

    g_fp_name = fp;
    g_fp_lo = lo;
    g_fp_hi = hi;
    g_fp_fired = 0;
    snprintf(name, sizeof(name), "failpoint %s", fp);
    run_cycles(name, env_int("FAILPOINT_CYCLES", 6, 1, 10000), false, 100, 300);
    printf("failpoint %s: fired in %d cycles\n", fp, g_fp_fired);
    ck_assert_msg(g_fp_fired > 0, "failpoint %s never fired", fp);
    g_fp_name = NULL;
}

START_TEST(test_failpoint_write_before_sync)
{
    run_failpoint("write-before-sync", 3, 40);
}
END_TEST

START_TEST(test_failpoint_sync_before_confirm)
{
    run_failpoint("sync-before-confirm", 3, 40);
}
END_TEST

START_TEST(test_failpoint_segment_roll)
{
    run_failpoint("segment-roll", 1, 4);
}
END_TEST

/* pin_old_segment: 400 messages in a queue nobody consumes, each between
 * eight of a filler queue that is then purged: every 64 KiB segment keeps
 * a few live messages among mostly dead bytes. Such segments can neither
 * be deleted nor be ignored (live bytes are far under half the log), so
 * compaction must move their messages on its first pass after a start
 * (and reach its failpoint), however little the crash traffic of a loaded
 * machine adds. */
static void
pin_old_segment(void)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_message m;
    char buf[1024];
    uint64_t purged = 0;

    memset(buf, 'p', sizeof(buf));
    memset(&m, 0, sizeof(m));
    m.payload = buf;
    m.len = sizeof(buf);
    pq_check_ok(c, protoq_queue_create(c, "pinned", NULL));
    pq_check_ok(c, protoq_queue_create(c, "filler", NULL));
    for (int i = 0; i < 400; i++) {
        pq_check_ok(c, protoq_publish(c, "pinned", &m, NULL));
        for (int k = 0; k < 8; k++) {
            pq_check_ok(c, protoq_publish_async(c, "filler", &m, NULL, NULL));
        }
        pq_check_ok(c, protoq_wait_confirms(c, 0, 10000));
    }
    ck_assert_uint_eq(protoq_async_errors(c), 0);
    pq_check_ok(c, protoq_queue_purge(c, "filler", &purged));
    ck_assert_uint_eq(purged, 400 * 8);
    protoq_close(c);
}

START_TEST(test_failpoint_compaction)
{
    pin_old_segment();
    /* A pass compacts one segment a second, 6-7 messages here: crash at
     * one of the first 5, so the first pass after each start fires. */
    run_failpoint("compaction", 1, 5);
}
END_TEST

START_TEST(test_kill9_loop_loses_no_confirmed_message)
{
    run_cycles("crash_loop", env_int("CRASH_CYCLES", 20, 1, 100000), false, 50,
               500);
}
END_TEST

/* The kill -9 loop on protoqd-pl, each kill a power loss; some must have
 * undone writes, or the test proved nothing. */
START_TEST(test_power_loss_loop_loses_no_confirmed_message)
{
    const char *pl = pl_binary();
    char journal[400];

    ck_assert_msg(pl != NULL, "no protoqd-pl (PROTOQD_PL): %s",
                  strerror(errno));
    ck_assert_int_eq(srv_stop(&g_srv), 0);
    snprintf(journal, sizeof(journal), "%s/pl.journal", g_srv.dir);
    setenv("PROTOQD", pl, 1);
    setenv(PL_JOURNAL_ENV, journal, 1);
    ck_assert_int_eq(srv_launch(&g_srv), 0);
    g_pl_journal = journal;
    run_cycles("power_loss_loop", env_int("PL_CYCLES", 10, 1, 100000), false,
               50, 500);
    printf("power_loss_loop: %ld journal records, %ld writes and size "
           "changes no fsync covered, %ld undone (%ld torn), %ld files "
           "vanished, %ld came back\n",
           g_pl.records, g_pl.unsynced, g_pl.undone, g_pl.torn, g_pl.vanished,
           g_pl.revived);
    ck_assert_msg(g_pl.undone > 0, "no power loss undid a write");
    g_pl_journal = NULL;
}
END_TEST

START_TEST(test_sigterm_mid_load_then_restart_is_clean)
{
    run_cycles("sigterm_loop", 3, true, 100, 400);
}
END_TEST

/* ---------------------------------------------------------------- main */

static Suite *
crash_suite(void)
{
    Suite *s = suite_create("crash");
    int cycles = env_int("CRASH_CYCLES", 20, 1, 100000);
    TCase *tc;

    tc = tcase_create("kill9_loop");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60 + cycles * 4);
    tcase_add_test(tc, test_kill9_loop_loses_no_confirmed_message);
    suite_add_tcase(s, tc);

    tc = tcase_create("power_loss_loop");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60 + env_int("PL_CYCLES", 10, 1, 100000) * 4);
    tcase_add_test(tc, test_power_loss_loop_loses_no_confirmed_message);
    suite_add_tcase(s, tc);

    tc = tcase_create("failpoints");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 120);
    tcase_add_test(tc, test_failpoint_write_before_sync);
    tcase_add_test(tc, test_failpoint_sync_before_confirm);
    tcase_add_test(tc, test_failpoint_segment_roll);
    tcase_add_test(tc, test_failpoint_compaction);
    suite_add_tcase(s, tc);

    tc = tcase_create("sigterm");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_sigterm_mid_load_then_restart_is_clean);
    suite_add_tcase(s, tc);
    return s;
}

int
main(void)
{
    return crash_main(crash_suite());
}
