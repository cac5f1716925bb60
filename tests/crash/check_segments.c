/*
 * check_segments.c: protoqd's segment files under damage and growth
 * (issue 3). A flipped byte inside an early segment stops the start with
 * the file and offset named, and --check-data fails. A torn tail of the
 * last segment is truncated at start; every earlier confirmed message is
 * there, and the log keeps working afterwards. A batch across a segment
 * roll survives kill -9, and sealed segments give back their preallocated
 * room. The fixture and payloads are in crash_fixture.c.
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

static const char *const g_args_info[] = {"-c", g_conf.path, "--log-level",
                                          "info", NULL};

/* --------------------------------------------------------- data files */

/* Segment files of the data dir, sorted (the name sorts by sequence). */
static int
list_segments(char names[][64], int max)
{
    DIR *d = opendir(g_srv.data_dir);
    struct dirent *e;
    int n = 0, i, j;

    ck_assert_ptr_nonnull(d);
    while ((e = readdir(d)) != NULL && n < max) {
        size_t len = strlen(e->d_name);

        if (strncmp(e->d_name, "seg-", 4) == 0 && len > 8 && len < 64 &&
            strcmp(e->d_name + len - 4, ".log") == 0) {
            snprintf(names[n++], 64, "%s", e->d_name);
        }
    }
    closedir(d);
    for (i = 1; i < n; i++) {
        for (j = i; j > 0 && strcmp(names[j - 1], names[j]) > 0; j--) {
            char t[64];

            memcpy(t, names[j], 64);
            memcpy(names[j], names[j - 1], 64);
            memcpy(names[j - 1], t, 64);
        }
    }
    return n;
}

/* Record offsets of one segment (header "u32 len | u32 crc | u8 type |
 * body[len-1]", after a 20-byte segment header; zeros end the data).
 * Returns the count; *end gets the offset after the last record. */
static int
segment_records(const char *name, long *offs, int max, long *end)
{
    char path[400];
    uint8_t hdr[8];
    FILE *f;
    long off = 20, size;
    int n = 0;

    snprintf(path, sizeof(path), "%s/%s", g_srv.data_dir, name);
    f = fopen(path, "rb");
    ck_assert_ptr_nonnull(f);
    fseek(f, 0, SEEK_END);
    size = ftell(f);
    while (n < max && off + 8 <= size) {
        uint32_t len;

        fseek(f, off, SEEK_SET);
        if (fread(hdr, 1, 8, f) != 8) {
            break;
        }
        len = (uint32_t)hdr[0] | (uint32_t)hdr[1] << 8 |
              (uint32_t)hdr[2] << 16 | (uint32_t)hdr[3] << 24;
        if (len == 0 || off + 8 + (long)len > size) {
            break;
        }
        offs[n++] = off;
        off += 8 + (long)len;
    }
    fclose(f);
    *end = off;
    return n;
}

/* xor_byte: XOR the byte at off of data/name with x. */
static void
xor_byte(const char *name, long off, uint8_t x)
{
    char path[400];
    uint8_t b;
    int fd;

    snprintf(path, sizeof(path), "%s/%s", g_srv.data_dir, name);
    fd = open(path, O_RDWR);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(pread(fd, &b, 1, off), 1);
    b ^= x;
    ck_assert_int_eq(pwrite(fd, &b, 1, off), 1);
    ck_assert_int_eq(fsync(fd), 0);
    close(fd);
}

/* run_prog: run argv with stdout and stderr into outpath, at most
 * timeout_ms. Returns the exit status, 128+sig, or -1 when it had to be
 * killed because it was still running. */
static int
run_prog(const char *const *argv, const char *outpath, int timeout_ms)
{
    int64_t deadline = now_ms_mono() + timeout_ms;
    int status = 0, i;
    pid_t pid = fork();

    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        int fd = open(outpath, O_WRONLY | O_CREAT | O_TRUNC, 0644);

        if (fd >= 0) {
            dup2(fd, STDOUT_FILENO);
            dup2(fd, STDERR_FILENO);
        }
        execv(argv[0], (char *const *)argv);
        _exit(127);
    }
    for (i = 0; i < 1000000; i++) {
        if (waitpid(pid, &status, WNOHANG) == pid) {
            return WIFEXITED(status) ? WEXITSTATUS(status)
                                     : 128 + WTERMSIG(status);
        }
        if (now_ms_mono() >= deadline) {
            break;
        }
        sleep_ms(5);
    }
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    return -1;
}

static const char *
protoqd_bin(void)
{
    const char *p = getenv("PROTOQD");

    return p && p[0] ? p : "build/protoqd";
}

static char *
slurp(const char *path)
{
    static char buf[65536];
    FILE *f = fopen(path, "r");
    size_t n = 0;

    buf[0] = '\0';
    if (f != NULL) {
        n = fread(buf, 1, sizeof(buf) - 1, f);
        buf[n] = '\0';
        fclose(f);
    }
    return buf;
}

static int
check_data(char *out_path, size_t cap)
{
    const char *argv[] = {protoqd_bin(), "--check-data", g_srv.data_dir, NULL};

    snprintf(out_path, cap, "%s/check-data.out", g_srv.dir);
    return run_prog(argv, out_path, 10000);
}

/* publish_seqs: publish seq first..first+n-1 (minpad filler) pipelined;
 * every one must be confirmed. */
static void
publish_seqs(uint64_t first, uint64_t n, size_t minpad)
{
    static char buf[PAYLOAD_MAX];
    protoq_client *c = pq_connect_or_fail(&g_srv);
    uint64_t i;

    pq_check_ok(c, protoq_queue_create(c, QUEUE, NULL));
    for (i = 0; i < n; i++) {
        struct protoq_message m;

        memset(&m, 0, sizeof(m));
        m.len = make_payload(first + i, minpad, buf);
        m.payload = buf;
        pq_check_ok(c, protoq_publish_async(c, QUEUE, &m, NULL, NULL));
        if (protoq_outstanding(c) >= 64) {
            pq_check_ok(c, protoq_wait_confirms(c, 32, 10000));
        }
    }
    pq_check_ok(c, protoq_wait_confirms(c, 0, 10000));
    protoq_close(c);
}

/* drain_seqs: drain the queue; mark seqs first..first+n-1 found in seen
 * (n entries); fail on corrupt or foreign payloads. Returns deliveries. */
static uint64_t
drain_seqs(uint64_t first, uint64_t n, bool *seen, const char *tag)
{
    char path[400], line[256];
    uint64_t got = 0;
    FILE *f;

    snprintf(path, sizeof(path), "%s/drain-%s.log", g_srv.dir, tag);
    unlink(path);
    drain(path);
    f = fopen(path, "r");
    ck_assert_ptr_nonnull(f);
    while (fgets(line, sizeof(line), f) != NULL) {
        unsigned long long seq, id;
        unsigned attempt;
        int ok;

        if (line[0] != 'D' || sscanf(line + 1, "%llu %llu %u %d", &seq, &id,
                                     &attempt, &ok) != 4) {
            continue;
        }
        ck_assert_msg(ok, "%s: corrupt payload (id %llu)", tag, id);
        ck_assert_msg(seq >= first && seq < first + n,
                      "%s: unexpected seq %llu", tag, seq);
        seen[seq - first] = true;
        got++;
    }
    fclose(f);
    return got;
}

START_TEST(test_flipped_byte_in_early_segment_stops_start)
{
    enum { N = 400 };
    char segs[64][64], out[400], needle[64];
    const char *argv[12];
    long offs[512], end, rec_off, flip_off;
    char portfile[400], logpath[400];
    bool seen[N];
    const char *log;
    int nseg, nrec, rc, i;

    publish_seqs(1, N, 800); /* ~1 KiB each: several 64 KiB segments */
    ck_assert_int_eq(srv_stop(&g_srv), 0);
    nseg = list_segments(segs, 64);
    ck_assert_msg(nseg >= 3, "want >= 3 segments, have %d", nseg);
    ck_assert_msg(check_data(out, sizeof(out)) == 0,
                  "--check-data on clean data failed: %s", slurp(out));

    nrec = segment_records(segs[0], offs, 512, &end);
    ck_assert_msg(nrec >= 10, "%s holds %d records", segs[0], nrec);
    rec_off = offs[nrec / 2];
    flip_off = rec_off + 9 + 100; /* inside the body of a middle record */
    ck_assert_int_lt(flip_off, offs[nrec / 2 + 1]);
    xor_byte(segs[0], flip_off, 0x5a);

    /* protoqd must refuse to start, naming the file and the offset. */
    snprintf(portfile, sizeof(portfile), "%s/port", g_srv.dir);
    snprintf(logpath, sizeof(logpath), "%s/corrupt-start.log", g_srv.dir);
    unlink(portfile);
    i = 0;
    argv[i++] = protoqd_bin();
    argv[i++] = "-c";
    argv[i++] = g_conf.path;
    argv[i++] = "--listen";
    argv[i++] = "127.0.0.1:0";
    argv[i++] = "--port-file";
    argv[i++] = portfile;
    argv[i++] = "--data-dir";
    argv[i++] = g_srv.data_dir;
    argv[i] = NULL;
    rc = run_prog(argv, logpath, 5000);
    log = slurp(logpath);
    ck_assert_msg(rc != -1,
                  "protoqd started on a segment with a flipped byte "
                  "(%s offset %ld); log: %s",
                  segs[0], flip_off, log);
    ck_assert_msg(rc != 0, "protoqd exited 0 on corrupt data; log: %s", log);
    ck_assert_msg(strstr(log, segs[0]) != NULL,
                  "start log does not name %s: %s", segs[0], log);
    {
        char a[32], b[32], c[32], d[32];

        snprintf(a, sizeof(a), "%ld", rec_off);
        snprintf(b, sizeof(b), "%ld", flip_off);
        snprintf(c, sizeof(c), "0x%lx", rec_off);
        snprintf(d, sizeof(d), "0x%lx", flip_off);
        ck_assert_msg(strstr(log, a) || strstr(log, b) || strstr(log, c) ||
                          strstr(log, d),
                      "start log does not name the offset "
                      "(record at %ld, byte at %ld): %s",
                      rec_off, flip_off, log);
    }
    rc = check_data(out, sizeof(out));
    ck_assert_msg(rc != 0 && rc != -1,
                  "--check-data exit %d on corrupt data: "
                  "%s",
                  rc, slurp(out));
    ck_assert_msg(strstr(slurp(out), segs[0]) != NULL,
                  "--check-data output does not name %s: %s", segs[0],
                  slurp(out));

    /* Undo the damage: everything is back. */
    xor_byte(segs[0], flip_off, 0x5a);
    ck_assert_msg(check_data(out, sizeof(out)) == 0,
                  "--check-data after repair: %s", slurp(out));
    ck_assert_int_eq(srv_launch(&g_srv), 0);
    memset(seen, 0, sizeof(seen));
    snprintf(needle, sizeof(needle), "repaired");
    ck_assert_uint_eq(drain_seqs(1, N, seen, needle), N);
    for (i = 0; i < N; i++) {
        ck_assert_msg(seen[i], "seq %d missing after repair", i + 1);
    }
}
END_TEST

static bool
contains_ci(const char *hay, const char *needle)
{
    size_t n = strlen(needle);

    for (; *hay; hay++) {
        if (strncasecmp(hay, needle, n) == 0) {
            return true;
        }
    }
    return false;
}

/* _i = 0: the file is cut 3 bytes into the last record; _i = 1: the last 3
 * bytes of the last record are damaged (the preallocated zeros follow). */
START_TEST(test_torn_tail_is_truncated_and_earlier_messages_survive)
{
    enum { N = 50, M = 10 };
    char segs[64][64], out[400], path[400], logp[400];
    long offs[4096], end;
    bool seen[N + M];
    const char *log;
    int nseg, nrec = 0, last = -1, i;

    publish_seqs(1, N, 0);
    ck_assert_int_eq(srv_stop(&g_srv), 0);
    nseg = list_segments(segs, 64);
    ck_assert_int_ge(nseg, 1);
    for (i = nseg - 1; i >= 0; i--) {
        nrec = segment_records(segs[i], offs, 4096, &end);
        if (nrec > 0) {
            last = i;
            break;
        }
    }
    ck_assert_msg(last >= 0, "no segment holds records");
    snprintf(path, sizeof(path), "%s/%s", g_srv.data_dir, segs[last]);
    if (_i == 0) {
        ck_assert_int_eq(truncate(path, end - 3), 0);
    } else {
        xor_byte(segs[last], end - 1, 0xff);
        xor_byte(segs[last], end - 2, 0xff);
        xor_byte(segs[last], end - 3, 0xff);
    }
    ck_assert_msg(check_data(out, sizeof(out)) == 0,
                  "--check-data on a torn "
                  "tail (which a start repairs) failed: %s",
                  slurp(out));

    srv_log_path(&g_srv, logp, sizeof(logp));
    unlink(logp);
    g_srv.extra_args = g_args_info;
    ck_assert_msg(srv_launch(&g_srv) == 0,
                  "protoqd did not start with a torn "
                  "tail in %s",
                  segs[last]);
    g_srv.extra_args = g_args;
    log = slurp(logp);
    ck_assert_msg(strstr(log, segs[last]) != NULL &&
                      (contains_ci(log, "trunc") || contains_ci(log, "torn")),
                  "the log does not report truncating %s: %s", segs[last], log);

    memset(seen, 0, sizeof(seen));
    drain_seqs(1, N, seen, "torn");
    for (i = 0; i < N - 1; i++) {
        ck_assert_msg(seen[i], "confirmed seq %d lost with the torn tail",
                      i + 1);
    }

    /* The log goes on after the cut: new records land and survive kill -9. */
    publish_seqs(N + 1, M, 0);
    srv_kill9(&g_srv);
    ck_assert_int_eq(srv_launch(&g_srv), 0);
    memset(seen, 0, sizeof(seen));
    ck_assert_uint_eq(drain_seqs(1, N + M, seen, "after"), M);
    for (i = N; i < N + M; i++) {
        ck_assert_msg(seen[i], "seq %d published after the repair is lost",
                      i + 1);
    }
}
END_TEST

/*
 * Disk use stays proportional to live data (DESIGN.md, Storage). A segment
 * is preallocated with room for the ACK reserve of every live message;
 * once it is sealed (the log moved on) that room is never written, so it
 * must be given back, or every segment carries 2 x 64 B x live messages of
 * zeros and disk use grows with live x segments.
 */
START_TEST(test_sealed_segments_give_back_preallocated_room)
{
    enum { N = 10000 };
    char segs[512][64], path[400], worst[64] = "";
    long offs[4096], end;
    uint64_t data = 0, disk = 0, worst_disk = 0, worst_end = 0;
    int nseg, i;

    publish_seqs(1, N, 0); /* ~3 MB of live messages in 64 KiB segments */
    nseg = list_segments(segs, 512);
    ck_assert_msg(nseg >= 10, "want >= 10 segments, have %d", nseg);
    /* Every segment but the last two (current and spare) is sealed. */
    for (i = 0; i < nseg - 2; i++) {
        struct stat sb;
        uint64_t used;

        snprintf(path, sizeof(path), "%s/%.63s", g_srv.data_dir, segs[i]);
        ck_assert_int_eq(stat(path, &sb), 0);
        segment_records(segs[i], offs, 4096, &end);
        used = (uint64_t)sb.st_blocks * 512;
        data += (uint64_t)end;
        disk += used;
        if (used > (uint64_t)end + 65536 &&
            used - (uint64_t)end > worst_disk - worst_end) {
            snprintf(worst, sizeof(worst), "%.63s", segs[i]);
            worst_disk = used;
            worst_end = (uint64_t)end;
        }
    }
    printf("sealed segments: %d, records %" PRIu64 " bytes, on disk %" PRIu64
           " bytes\n",
           nseg - 2, data, disk);
    ck_assert_msg(worst[0] == '\0' && disk <= 2 * data + 65536,
                  "%d sealed segments hold %" PRIu64 " bytes of records but "
                  "occupy %" PRIu64 " bytes on disk; e.g. %s: records end at "
                  "%" PRIu64 ", %" PRIu64 " bytes allocated (preallocated "
                  "reserve room is never trimmed)",
                  nseg - 2, data, disk, worst[0] ? worst : "-", worst_end,
                  worst_disk);
}
END_TEST

/*
 * A batch whose records straddle a segment roll: its first record ends one
 * segment, the rest start the next. The first segment's write can complete
 * (and its garbage collection run) before the whole publish is durable,
 * when nothing has taken a reference on that record yet: the segment was
 * deleted under a confirmed message, which a kill -9 then lost (found by
 * the model-based test, tests/model). Each round: a small message to
 * "keep" and three 15000-byte ones to "filler" in one batch, then filler
 * purged, so only keep's messages hold the old segments.
 */
START_TEST(test_batch_across_segment_roll_survives_kill9)
{
    enum { ROUNDS = 40, BIG = 15000 };
    static char big[BIG];
    const char *const qs[4] = {"keep", "filler", "filler", "filler"};
    struct protoq_message m[4];
    struct protoq_queue_info qi;
    protoq_client *c = pq_connect_or_fail(&g_srv);
    uint64_t purged;
    char small[32];

    pq_check_ok(c, protoq_queue_create(c, "keep", NULL));
    pq_check_ok(c, protoq_queue_create(c, "filler", NULL));
    memset(big, 'f', sizeof(big));
    memset(m, 0, sizeof(m));
    for (int i = 1; i < 4; i++) {
        m[i].payload = big;
        m[i].len = sizeof(big);
    }
    for (int r = 0; r < ROUNDS; r++) {
        snprintf(small, sizeof(small), "keep-%d", r);
        m[0].payload = small;
        m[0].len = strlen(small);
        pq_check_ok(c, protoq_publish_batch_multi(c, qs, m, 4, NULL));
        pq_check_ok(c, protoq_queue_purge(c, "filler", &purged));
        ck_assert_uint_eq(purged, 3);
        if (r % 4 != 3) {
            continue;
        }
        /* keep holds this round's messages only: every older segment is
         * free, the newest keep message may sit in one */
        protoq_close(c);
        srv_kill9(&g_srv);
        ck_assert_msg(srv_launch(&g_srv) == 0, "protoqd did not start again");
        c = pq_connect_or_fail(&g_srv);
        pq_check_ok(c, protoq_queue_stat(c, "keep", &qi));
        ck_assert_msg(qi.ready == 4,
                      "round %d: keep has %" PRIu64 " of its 4 "
                      "confirmed messages after kill -9",
                      r, qi.ready);
        pq_check_ok(c, protoq_queue_purge(c, "keep", &purged));
    }
    protoq_close(c);
}
END_TEST

/* ---------------------------------------------------------------- main */

static Suite *
segments_suite(void)
{
    Suite *s = suite_create("segments");
    TCase *tc;

    tc = tcase_create("damaged_data");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_flipped_byte_in_early_segment_stops_start);
    tcase_add_loop_test(
        tc, test_torn_tail_is_truncated_and_earlier_messages_survive, 0, 2);
    suite_add_tcase(s, tc);

    tc = tcase_create("segment_gc");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_loop_test(tc, test_batch_across_segment_roll_survives_kill9, 0,
                        5);
    suite_add_tcase(s, tc);

    tc = tcase_create("disk_use");
    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_sealed_segments_give_back_preallocated_room);
    suite_add_tcase(s, tc);
    return s;
}

int
main(void)
{
    return crash_main(segments_suite());
}
