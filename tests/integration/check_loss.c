/*
 * check_loss.c: paths on which the broker lost confirmed jobs (issue 8,
 * items 1, 2, 6 and 7), each across a restart by SIGTERM and by kill -9.
 *
 * Every test gets a fresh broker in a fresh data dir with small log
 * segments (so segments roll, are deleted and compacted within a test)
 * and short retry backoffs. Loop tests: _i = 0 restarts by SIGTERM,
 * _i = 1 by kill -9. Every wait is bounded.
 */
#include <check.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "testutil.h"

/* ------------------------------------------------------------ fixture */

static struct srv g_srv;
static struct test_conf g_conf;
static const char *const g_args[] = {"-c", g_conf.path, NULL};

static const char CONF_TEXT[] = "# check_loss: small segments, fast retries\n"
                                "segment_bytes 65536\n"
                                "backoff_base_ms 10\n"
                                "backoff_cap_ms 40\n";

static void
setup(void)
{
    ck_assert_msg(srv_start(&g_srv, g_args) == 0,
                  "protoqd did not start (PROTOQD=%s)",
                  getenv("PROTOQD") ? getenv("PROTOQD") : "(unset)");
}

static void
teardown(void)
{
    srv_cleanup(&g_srv);
}

/* bounce: restart on the same data dir; mode 0 SIGTERM, 1 kill -9. The
 * broker must have exited 0 on SIGTERM. */
static void
bounce(int mode)
{
    if (mode == 0) {
        ck_assert_int_eq(srv_stop(&g_srv), 0);
    } else {
        srv_kill9(&g_srv);
    }
    ck_assert_msg(srv_launch(&g_srv) == 0, "restart (%s) failed",
                  mode == 0 ? "SIGTERM" : "kill -9");
}

static void
sleep_ms(int ms)
{
    poll(NULL, 0, ms);
}

/* ------------------------------------------------------------ helpers */

static void
mkq(protoq_client *c, const char *name, const char *dead_letter,
    uint32_t max_attempts)
{
    struct protoq_queue_attrs a;

    memset(&a, 0, sizeof(a));
    a.backoff_base_ms = 10;
    a.backoff_cap_ms = 40;
    a.max_attempts = max_attempts;
    snprintf(a.dead_letter, sizeof(a.dead_letter), "%s",
             dead_letter ? dead_letter : "");
    pq_check_ok(c, protoq_queue_create(c, name, &a));
}

static uint64_t
pub_key(protoq_client *c, const char *q, const char *payload, const char *key)
{
    struct protoq_message m;
    uint64_t id = 0;

    memset(&m, 0, sizeof(m));
    m.payload = payload;
    m.len = strlen(payload);
    m.idempotency_key = key;
    pq_check_ok(c, protoq_publish(c, q, &m, &id));
    ck_assert_msg(id != 0, "publish returned message id 0");
    return id;
}

static uint64_t
pub(protoq_client *c, const char *q, const char *payload)
{
    return pub_key(c, q, payload, NULL);
}

static struct protoq_queue_info
qstat(protoq_client *c, const char *q)
{
    struct protoq_queue_info i;

    memset(&i, 0, sizeof(i));
    pq_check_ok(c, protoq_queue_stat(c, q, &i));
    return i;
}

static uint64_t
qtotal(protoq_client *c, const char *q)
{
    struct protoq_queue_info i = qstat(c, q);

    return i.ready + i.delayed + i.inflight;
}

/* One delivery. */
struct got {
    uint64_t id;
    uint32_t attempt;
    char payload[64];
};

/* A consumer: a handle, one subscription, the deliveries not yet taken. */
enum { CONS_RING = 64 };
struct cons {
    protoq_client *c;
    uint64_t sub;
    struct got ring[CONS_RING];
    unsigned head, tail;
};

static void
on_deliver(void *arg, protoq_client *c, const struct protoq_delivery *d)
{
    struct cons *k = arg;
    struct got *g;

    (void)c;
    ck_assert_msg(k->tail - k->head < CONS_RING, "delivery ring full");
    g = &k->ring[k->tail++ % CONS_RING];
    g->id = d->message_id;
    g->attempt = d->attempt;
    snprintf(
        g->payload, sizeof(g->payload), "%.*s",
        (int)(d->len < sizeof(g->payload) ? d->len : sizeof(g->payload) - 1),
        (const char *)d->payload);
}

static struct cons *
cons_open(const char *q, uint32_t prefetch)
{
    struct cons *k = calloc(1, sizeof(*k));

    ck_assert_ptr_nonnull(k);
    k->c = pq_connect_or_fail(&g_srv);
    pq_check_ok(k->c, protoq_subscribe(k->c, q, prefetch, NULL, 0, on_deliver,
                                       k, &k->sub));
    return k;
}

static void
cons_close(struct cons *k)
{
    if (k != NULL) {
        protoq_close(k->c);
        free(k);
    }
}

/* cons_get: the next delivery within 3 s, or the test fails. */
static struct got
cons_get(struct cons *k, const char *what)
{
    int64_t deadline = now_ms_mono() + 3000;

    for (int i = 0; i < 1000 && k->tail == k->head; i++) {
        int64_t left = deadline - now_ms_mono();
        int rc;

        ck_assert_msg(left > 0, "%s: no delivery within 3 s", what);
        rc = protoq_poll(k->c, left < 50 ? (int)left : 50);
        ck_assert_msg(rc >= 0, "%s: protoq_poll: %s", what, pq_strerror(rc));
    }
    ck_assert_msg(k->tail != k->head, "%s: no delivery", what);
    return k->ring[k->head++ % CONS_RING];
}

/* qtotal_wait: poll until q holds want messages (up to 3 s); the last count. */
static uint64_t
qtotal_wait(protoq_client *c, const char *q, uint64_t want)
{
    uint64_t n = qtotal(c, q);

    for (int i = 0; i < 150 && n != want; i++) {
        sleep_ms(20);
        n = qtotal(c, q);
    }
    return n;
}

/* fill_and_purge: ~200 KB through queue filler, then purged: segments
 * roll past the ones holding older messages, which then hold little that
 * is live (compaction moves it forward, housekeeping deletes the rest). */
static void
fill_and_purge(protoq_client *c)
{
    char big[4001];
    uint64_t purged = 0;

    memset(big, 'f', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    for (int i = 0; i < 50; i++) {
        pub(c, "filler", big);
    }
    pq_check_ok(c, protoq_queue_purge(c, "filler", &purged));
    ck_assert_uint_eq(purged, 50);
}

/* ------------------------------------------------ item 1: queue delete */

/*
 * Deleting a queue whose consumer holds deliveries must release each of
 * their segment references once. It released them twice (the delete, then
 * the requeue on detach), so the segment holding `keep`'s message reached
 * 0 references and was deleted: `keep` came back empty after a restart.
 */
START_TEST(test_delete_with_held_deliveries_keeps_other_queues)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct cons *k;

    mkq(c, "keep", NULL, 0);
    mkq(c, "victim", NULL, 0);
    mkq(c, "filler", NULL, 0);
    pub(c, "keep", "confirmed-message");
    for (int i = 0; i < 4; i++) {
        pub(c, "victim", "victim-job");
    }
    k = cons_open("victim", 10);
    for (int i = 0; i < 4; i++) {
        (void)cons_get(k, "victim");
    }
    /* Three segments roll past the one holding keep's message. */
    fill_and_purge(c);
    pq_check_ok(c, protoq_queue_delete(c, "victim"));
    /* Housekeeping deletes unreferenced segments (once a second). */
    sleep_ms(1500);
    mkq(c, "other", NULL, 0);
    sleep_ms(1500);
    ck_assert_uint_eq(qtotal(c, "keep"), 1);
    cons_close(k);
    protoq_close(c);

    bounce(_i);
    c = pq_connect_or_fail(&g_srv);
    ck_assert_msg(qtotal(c, "keep") == 1,
                  "%s: keep lost its confirmed "
                  "message",
                  _i == 0 ? "SIGTERM" : "kill -9");
    pq_check_remote(
        c, protoq_queue_stat(c, "victim", &(struct protoq_queue_info){0}),
        PROTOQ_CODE_QUEUE_NOT_FOUND);
    ck_assert_msg(!srv_log_has(&g_srv, "below zero"),
                  "a segment reference count went below zero");
    protoq_close(c);
}
END_TEST

/*
 * A deleted queue's messages are gone, the ones held by a consumer too:
 * they are not a failed attempt. They were, and with max_attempts 1 went
 * to the dead-letter queue with a DEAD_LETTER record written after the
 * QUEUE_DELETE, so they vanished again on restart.
 */
START_TEST(test_delete_with_held_deliveries_dead_letters_nothing)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct cons *k;
    struct got g;

    mkq(c, "dlq", NULL, 0);
    mkq(c, "src", "dlq", 1);
    pub(c, "src", "held");
    k = cons_open("src", 10);
    g = cons_get(k, "src");
    pq_check_ok(c, protoq_queue_delete(c, "src"));
    ck_assert_uint_eq(qtotal(c, "dlq"), 0);
    /* The holder's ack finds nothing. */
    pq_check_remote(k->c, protoq_ack_sync(k->c, g.id, g.attempt),
                    PROTOQ_CODE_STALE_DELIVERY);
    cons_close(k);
    protoq_close(c);

    bounce(_i);
    c = pq_connect_or_fail(&g_srv);
    ck_assert_uint_eq(qtotal(c, "dlq"), 0);
    /* The queue can be made again, empty. */
    mkq(c, "src", "dlq", 1);
    ck_assert_uint_eq(qtotal(c, "src"), 0);
    protoq_close(c);
}
END_TEST

/* ------------------------------------- item 2: keyed jobs put back */

/* How a keyed job is put back before the restart. */
enum put_back { PB_NACK, PB_LEASE, PB_RELEASE, PB_HELD, PB_COUNT };

static const char *const put_back_name[] = {"nack", "lease expiry", "release",
                                            "held at the stop"};

/*
 * A keyed job that was put back once (a REQUEUE record) must come back
 * after a restart, and the producer's retry with the same key must answer
 * its id without storing a second copy. Replay re-pushed it while its key
 * was still in the dedup table and took the refusal for success: the job
 * was gone and the retry swallowed. _i: way * 2 + restart mode. PB_HELD
 * with SIGTERM is the release at a clean shutdown.
 */
START_TEST(test_keyed_job_put_back_survives_restart)
{
    enum put_back way = (enum put_back)(_i / 2);
    int mode = _i % 2;
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a;
    struct cons *k;
    struct got g;
    uint64_t id, again;

    memset(&a, 0, sizeof(a));
    a.backoff_base_ms = 10;
    a.backoff_cap_ms = 40;
    a.ack_timeout_ms = way == PB_LEASE ? 200 : 60000;
    pq_check_ok(c, protoq_queue_create(c, "jobs", &a));
    mkq(c, "other-work", NULL, 0);
    id = pub_key(c, "jobs", "X", "k1");
    k = cons_open("jobs", 1);
    g = cons_get(k, put_back_name[way]);
    ck_assert_uint_eq(g.id, id);
    switch (way) {
    case PB_NACK:
        pq_check_ok(k->c,
                    protoq_nack_sync(k->c, g.id, g.attempt, 0, false, NULL));
        break;
    case PB_LEASE:
        g = cons_get(k, "redelivery after the lease");
        ck_assert_uint_eq(g.attempt, 2);
        pq_check_ok(k->c, protoq_flow(k->c, k->sub, 0));
        /* The lease runs out again; nothing is delivered while paused. */
        sleep_ms(400);
        break;
    case PB_RELEASE:
        pq_check_ok(k->c, protoq_release(k->c, g.id, g.attempt,
                                         PROTOQ_RELEASE_PREEMPTED, NULL, true));
        break;
    case PB_HELD:
    case PB_COUNT:
        break;
    }
    if (way != PB_HELD) {
        cons_close(k);
        k = NULL;
    }
    /* A confirmed write, so the put-back records reach the disk before a
     * kill -9 (they are synced with the next one). */
    pub(c, "other-work", "sync");
    protoq_close(c);

    bounce(mode);
    cons_close(k);
    c = pq_connect_or_fail(&g_srv);
    ck_assert_msg(qtotal(c, "jobs") == 1, "%s, %s: the job is gone",
                  put_back_name[way], mode == 0 ? "SIGTERM" : "kill -9");
    again = pub_key(c, "jobs", "X", "k1");
    ck_assert_uint_eq(again, id);
    ck_assert_uint_eq(qtotal(c, "jobs"), 1);
    k = cons_open("jobs", 1);
    g = cons_get(k, "after the restart");
    ck_assert_uint_eq(g.id, id);
    ck_assert_str_eq(g.payload, "X");
    pq_check_ok(k->c, protoq_ack_sync(k->c, g.id, g.attempt));
    cons_close(k);
    /* The key is remembered after the ack: a retry is a duplicate. */
    again = pub_key(c, "jobs", "X", "k1");
    ck_assert_uint_eq(again, id);
    ck_assert_uint_eq(qtotal(c, "jobs"), 0);
    protoq_close(c);
}
END_TEST

/*
 * A key whose dedup window has passed may be used again by a new job; that
 * job must survive a restart while the log still holds the first one. The
 * replay restarted the first job's window and refused the second.
 */
START_TEST(test_key_reused_after_its_window_survives_restart)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a;
    struct cons *k;
    struct got g;
    uint64_t first, second;

    memset(&a, 0, sizeof(a));
    a.dedup_window_ms = 100;
    pq_check_ok(c, protoq_queue_create(c, "jobs", &a));
    first = pub_key(c, "jobs", "first", "k1");
    k = cons_open("jobs", 1);
    g = cons_get(k, "first");
    pq_check_ok(k->c, protoq_ack_sync(k->c, g.id, g.attempt));
    cons_close(k);
    sleep_ms(300);
    second = pub_key(c, "jobs", "second", "k1");
    ck_assert_uint_ne(second, first);
    protoq_close(c);

    bounce(_i);
    c = pq_connect_or_fail(&g_srv);
    ck_assert_msg(qtotal(c, "jobs") == 1, "%s: the second job is gone",
                  _i == 0 ? "SIGTERM" : "kill -9");
    k = cons_open("jobs", 1);
    g = cons_get(k, "second");
    ck_assert_uint_eq(g.id, second);
    ck_assert_str_eq(g.payload, "second");
    cons_close(k);
    protoq_close(c);
}
END_TEST

/*
 * Compaction moves a live keyed job's PUBLISH forward; while the segment
 * of its first PUBLISH stays (here pinned by a cancelled job whose holder
 * has not answered: compaction leaves those), a replay meets both
 * records. It removed the first copy, then refused the second for its own
 * key: the job was lost.
 */
START_TEST(test_compacted_keyed_job_survives_restart)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct cons *k;
    struct got g;
    uint64_t id;

    mkq(c, "hold", NULL, 0);
    mkq(c, "jobs", NULL, 0);
    mkq(c, "filler", NULL, 0);
    pub(c, "hold", "pin");
    id = pub_key(c, "jobs", "K", "k1");
    k = cons_open("hold", 1);
    g = cons_get(k, "hold");
    pq_check_ok(c, protoq_cancel(c, "hold", g.id)); /* never answered */
    fill_and_purge(c);
    fill_and_purge(c);
    sleep_ms(2500); /* housekeeping compacts */
    ck_assert_uint_eq(qtotal(c, "jobs"), 1);
    protoq_close(c);

    bounce(_i);
    cons_close(k);
    c = pq_connect_or_fail(&g_srv);
    ck_assert_msg(qtotal(c, "jobs") == 1, "%s: the compacted keyed job is gone",
                  _i == 0 ? "SIGTERM" : "kill -9");
    ck_assert_uint_eq(pub_key(c, "jobs", "K", "k1"), id);
    ck_assert_uint_eq(qtotal(c, "jobs"), 1);
    protoq_close(c);
}
END_TEST

/*
 * Combination: keyed jobs put back in several ways, a queue deleted while
 * a consumer holds its jobs, and compaction moving the keyed jobs'
 * records forward (a moved PUBLISH is replayed like a put-back job: the
 * key is taken over), then a restart. Every keyed job comes back once
 * with its attempt count, and retries of every key are duplicates.
 */
START_TEST(test_keys_put_back_delete_and_compaction_combined)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct cons *k, *v;
    struct got g;
    uint64_t ids[3];
    const char *keys[3] = {"k-nacked", "k-released", "k-untouched"};

    mkq(c, "jobs", NULL, 0);
    mkq(c, "victim", NULL, 0);
    mkq(c, "filler", NULL, 0);
    for (int i = 0; i < 3; i++) {
        ids[i] = pub_key(c, "jobs", keys[i], keys[i]);
    }
    pub(c, "victim", "v1");
    pub(c, "victim", "v2");
    v = cons_open("victim", 10);
    (void)cons_get(v, "victim");
    (void)cons_get(v, "victim");
    k = cons_open("jobs", 1);
    g = cons_get(k, "first");
    ck_assert_uint_eq(g.id, ids[0]);
    pq_check_ok(k->c, protoq_nack_sync(k->c, g.id, g.attempt, 0, false, NULL));
    g = cons_get(k, "second"); /* the nacked one again, or the next */
    pq_check_ok(k->c, protoq_release(k->c, g.id, g.attempt,
                                     PROTOQ_RELEASE_PREEMPTED, NULL, true));
    pq_check_ok(k->c, protoq_flow(k->c, k->sub, 0));
    cons_close(k);
    fill_and_purge(c);
    pq_check_ok(c, protoq_queue_delete(c, "victim"));
    fill_and_purge(c);
    sleep_ms(2500); /* housekeeping: compaction and segment deletion */
    cons_close(v);
    ck_assert_uint_eq(qtotal(c, "jobs"), 3);
    protoq_close(c);

    bounce(_i);
    c = pq_connect_or_fail(&g_srv);
    ck_assert_msg(qtotal(c, "jobs") == 3,
                  "%s: %" PRIu64 " of 3 keyed jobs "
                  "after the restart",
                  _i == 0 ? "SIGTERM" : "kill -9", qtotal(c, "jobs"));
    for (int i = 0; i < 3; i++) {
        ck_assert_uint_eq(pub_key(c, "jobs", keys[i], keys[i]), ids[i]);
    }
    ck_assert_uint_eq(qtotal(c, "jobs"), 3);
    protoq_close(c);
    /* A second restart, the other way, after the first one's replay. */
    bounce(1 - _i);
    c = pq_connect_or_fail(&g_srv);
    ck_assert_uint_eq(qtotal(c, "jobs"), 3);
    k = cons_open("jobs", 3);
    for (int n = 0; n < 3; n++) {
        g = cons_get(k, "after the restart");
        for (int i = 0; i < 3; i++) {
            if (g.id == ids[i]) {
                ck_assert_str_eq(g.payload, keys[i]);
                ids[i] = 0; /* seen */
                /* The nacked job was delivered before: attempt 2 or 3. */
                ck_assert_uint_ge(g.attempt, i == 0 ? 2 : 1);
            }
        }
    }
    ck_assert_msg(ids[0] == 0 && ids[1] == 0 && ids[2] == 0,
                  "a keyed job came back twice, or another job came");
    cons_close(k);
    ck_assert(!srv_log_has(&g_srv, "below zero"));
    protoq_close(c);
}
END_TEST

/*
 * Counters are "since the broker started": the replay's pushes (one per
 * PUBLISH record and one per put-back) counted as published, so a queue
 * holding one job said published 3 after a restart.
 */
START_TEST(test_counters_start_at_zero_after_restart)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_info st;
    struct cons *k;
    struct got g;

    mkq(c, "jobs", NULL, 0);
    pub(c, "jobs", "X");
    pub(c, "jobs", "Y");
    k = cons_open("jobs", 1);
    g = cons_get(k, "X");
    pq_check_ok(k->c, protoq_nack_sync(k->c, g.id, g.attempt, 0, false, NULL));
    g = cons_get(k, "next");
    pq_check_ok(k->c, protoq_ack_sync(k->c, g.id, g.attempt));
    cons_close(k);
    protoq_close(c);

    bounce(_i);
    c = pq_connect_or_fail(&g_srv);
    st = qstat(c, "jobs");
    ck_assert_uint_eq(st.ready + st.delayed, 1);
    ck_assert_msg(st.published == 0 && st.acked == 0 && st.nacked == 0 &&
                      st.redelivered == 0 && st.expired == 0 &&
                      st.dead_lettered == 0 && st.dropped == 0,
                  "counters after a restart: published %" PRIu64
                  " acked %" PRIu64 " nacked %" PRIu64,
                  st.published, st.acked, st.nacked);
    pub(c, "jobs", "Z");
    ck_assert_uint_eq(qstat(c, "jobs").published, 1);
    protoq_close(c);
}
END_TEST

/*
 * A PublishBatch larger than one segment (segment_bytes 65536 here) was
 * refused with DISK_FULL, which no retry can cure. A batch is one log
 * record (all or nothing across a crash), and a record must fit in a
 * segment: it is refused with MESSAGE_TOO_LARGE naming segment_bytes,
 * stores nothing, and the same messages in two batches are stored and
 * kept across a restart.
 */
START_TEST(test_batch_over_a_segment_is_too_large_and_stores_nothing)
{
    enum { N = 6, LEN = 16000 };
    protoq_client *c = pq_connect_or_fail(&g_srv);
    static char payload[N][LEN];
    struct protoq_message m[N];
    uint64_t ids[N];
    struct cons *k;

    mkq(c, "big", NULL, 0);
    memset(m, 0, sizeof(m));
    for (int i = 0; i < N; i++) {
        memset(payload[i], 'a' + i, LEN);
        snprintf(payload[i], 16, "part-%d", i);
        m[i].payload = payload[i];
        m[i].len = LEN;
    }
    pq_check_remote(c, protoq_publish_batch(c, "big", m, N, ids),
                    PROTOQ_CODE_MESSAGE_TOO_LARGE);
    ck_assert_ptr_nonnull(strstr(protoq_errmsg(c), "segment_bytes"));
    ck_assert_uint_eq(qtotal(c, "big"), 0);
    pq_check_ok(c, protoq_publish_batch(c, "big", m, N / 2, ids));
    pq_check_ok(
        c, protoq_publish_batch(c, "big", m + N / 2, N - N / 2, ids + N / 2));
    protoq_close(c);
    bounce(_i);
    c = pq_connect_or_fail(&g_srv);
    ck_assert_uint_eq(qstat(c, "big").ready, N);
    k = cons_open("big", N);
    for (int i = 0; i < N; i++) {
        struct got g = cons_get(k, "batch part");
        char want[16];

        snprintf(want, sizeof(want), "part-%d", i);
        ck_assert_str_eq(g.payload, want);
        ck_assert_uint_eq(g.id, ids[i]);
        pq_check_ok(k->c, protoq_ack_sync(k->c, g.id, g.attempt));
    }
    cons_close(k);
    ck_assert_uint_eq(qtotal_wait(c, "big", 0), 0);
    protoq_close(c);
}
END_TEST

/* ------------------------------------------ item 6: raw frames */

/* raw_open: a raw connection past the handshake. */
static int
raw_open(void)
{
    int fd = raw_connect(g_srv.port);

    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(raw_hello(fd, 3000), 0);
    return fd;
}

/* raw_send_all: pack frames and send them in one write (the broker reads
 * them in one go, before anything reaches the disk). */
static void
raw_send_all(int fd, Protoq__Frame *const *frames, size_t n)
{
    uint8_t buf[8192];
    size_t used = 0;

    for (size_t i = 0; i < n; i++) {
        size_t len;
        uint8_t *one = raw_pack(frames[i], &len);

        ck_assert_ptr_nonnull(one);
        ck_assert_uint_le(used + len, sizeof(buf));
        memcpy(buf + used, one, len);
        used += len;
        free(one);
    }
    ck_assert_int_eq(raw_send(fd, buf, used), 0);
}

/* raw_reply: the next frame within 3 s (free with frame_free). */
static Protoq__Frame *
raw_reply(int fd)
{
    Protoq__Frame *r = NULL;

    ck_assert_int_eq(raw_read_frame(fd, 3000, 1u << 20, &r), 0);
    return r;
}

/*
 * A queue's idempotency keys go with it: a publish still on its way to
 * the disk when its queue is deleted must not answer for a publish with
 * the same key to the re-created queue (that one was answered duplicate
 * and nothing was stored).
 */
START_TEST(test_key_does_not_outlive_queue_delete)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    Protoq__Frame f[4], *r;
    Protoq__QueueCreate qc = PROTOQ__QUEUE_CREATE__INIT;
    Protoq__QueueDelete qd = PROTOQ__QUEUE_DELETE__INIT;
    Protoq__Publish p1 = PROTOQ__PUBLISH__INIT, p2 = PROTOQ__PUBLISH__INIT;
    Protoq__Message m1 = PROTOQ__MESSAGE__INIT, m2 = PROTOQ__MESSAGE__INIT;
    Protoq__Frame *all[4] = {&f[0], &f[1], &f[2], &f[3]};
    int fd;

    mkq(c, "q", NULL, 0);
    fd = raw_open();
    for (int i = 0; i < 4; i++) {
        protoq__frame__init(&f[i]);
        f[i].request_id = 100 + (uint64_t)i;
    }
    m1.payload.data = (uint8_t *)"A";
    m1.payload.len = 1;
    m1.idempotency_key = (char *)"k";
    m2 = m1;
    m2.payload.data = (uint8_t *)"B";
    p1.queue = p2.queue = qd.name = qc.name = (char *)"q";
    p1.message = &m1;
    p2.message = &m2;
    f[0].kind_case = PROTOQ__FRAME__KIND_PUBLISH;
    f[0].publish = &p1;
    f[1].kind_case = PROTOQ__FRAME__KIND_QUEUE_DELETE;
    f[1].queue_delete = &qd;
    f[2].kind_case = PROTOQ__FRAME__KIND_QUEUE_CREATE;
    f[2].queue_create = &qc;
    f[3].kind_case = PROTOQ__FRAME__KIND_PUBLISH;
    f[3].publish = &p2;
    raw_send_all(fd, all, 4);
    for (int i = 0; i < 4; i++) {
        r = raw_reply(fd);
        ck_assert_msg(r->kind_case != PROTOQ__FRAME__KIND_ERROR,
                      "request %" PRIu64 ": %s", r->request_id,
                      r->error->message);
        if (r->request_id == 103) {
            ck_assert_int_eq(r->kind_case, PROTOQ__FRAME__KIND_PUBLISH_OK);
            ck_assert_msg(
                r->publish_ok->n_duplicate == 0 || !r->publish_ok->duplicate[0],
                "the re-created queue's publish was answered duplicate");
        }
        frame_free(r);
    }
    close(fd);
    ck_assert_uint_eq(qtotal(c, "q"), 1);
    protoq_close(c);

    bounce(_i);
    c = pq_connect_or_fail(&g_srv);
    ck_assert_uint_eq(qtotal(c, "q"), 1);
    protoq_close(c);
}
END_TEST

/*
 * raw_ask: send f (every '@' byte of its encoding turned into a NUL, so
 * strings can hold one) and return the reply's error code (0: no Error).
 */
static int
raw_ask(int fd, Protoq__Frame *f)
{
    Protoq__Frame *r;
    size_t len;
    uint8_t *buf = raw_pack(f, &len);
    int code;

    ck_assert_ptr_nonnull(buf);
    for (size_t i = 0; i < len; i++) {
        if (buf[i] == '@') {
            buf[i] = '\0';
        }
    }
    ck_assert_int_eq(raw_send(fd, buf, len), 0);
    free(buf);
    r = raw_reply(fd);
    ck_assert_uint_eq(r->request_id, f->request_id);
    code = r->kind_case == PROTOQ__FRAME__KIND_ERROR ? (int)r->error->code : 0;
    frame_free(r);
    return code;
}

/* raw_publish: Publish of payload "p" to queue with message m. */
static int
raw_publish(int fd, const char *queue, Protoq__Message *m)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Publish p = PROTOQ__PUBLISH__INIT;

    m->payload.data = (uint8_t *)"p";
    m->payload.len = 1;
    p.queue = (char *)queue;
    p.message = m;
    f.request_id = 7;
    f.kind_case = PROTOQ__FRAME__KIND_PUBLISH;
    f.publish = &p;
    return raw_ask(fd, &f);
}

/*
 * A NUL inside a queue name cut it short ("abc\0def" named "abc"), and no
 * string field was checked for UTF-8. Every string field is now checked on
 * its full length: create, delete, publish (queue and every string of the
 * message), subscribe, dead_letter, nack error, progress.
 */
START_TEST(test_nul_and_bad_utf8_in_strings_are_refused)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__QueueCreate qc = PROTOQ__QUEUE_CREATE__INIT;
    Protoq__QueueDelete qd = PROTOQ__QUEUE_DELETE__INIT;
    Protoq__QueueAttrs qa = PROTOQ__QUEUE_ATTRS__INIT;
    Protoq__Subscribe sub = PROTOQ__SUBSCRIBE__INIT;
    Protoq__Nack nk = PROTOQ__NACK__INIT;
    Protoq__Message m;
    Protoq__KeyValue kv = PROTOQ__KEY_VALUE__INIT, *kvs[1] = {&kv};
    static const char *const bad_strings[] = {
        "x@y",              /* a NUL */
        "\xff",             /* never in UTF-8 */
        "\xc0\x80",         /* overlong NUL */
        "\xed\xa0\x80",     /* a surrogate */
        "\xe2\x82",         /* cut short */
        "\xf4\x90\x80\x80", /* past U+10FFFF */
    };
    const int bad = PROTOQ_CODE_BAD_REQUEST;
    int fd;

    mkq(c, "abc", NULL, 0);
    fd = raw_open();
    f.request_id = 5;
    f.kind_case = PROTOQ__FRAME__KIND_QUEUE_CREATE;
    f.queue_create = &qc;
    qc.name = (char *)"abd@def";
    ck_assert_int_eq(raw_ask(fd, &f), bad);
    qc.name = (char *)"x";
    qc.attrs = &qa;
    qa.dead_letter = (char *)"abc@def";
    ck_assert_int_eq(raw_ask(fd, &f), bad);
    f.kind_case = PROTOQ__FRAME__KIND_QUEUE_DELETE;
    f.queue_delete = &qd;
    qd.name = (char *)"abc@def";
    ck_assert_int_eq(raw_ask(fd, &f), bad);
    f.kind_case = PROTOQ__FRAME__KIND_SUBSCRIBE;
    f.subscribe = &sub;
    sub.queue = (char *)"abc@";
    ck_assert_int_eq(raw_ask(fd, &f), bad);
    f.kind_case = PROTOQ__FRAME__KIND_NACK;
    f.nack = &nk;
    nk.message_id = 1;
    nk.attempt = 1;
    nk.error = (char *)"\xff";
    ck_assert_int_eq(raw_ask(fd, &f), bad);

    protoq__message__init(&m);
    ck_assert_int_eq(raw_publish(fd, "abc@", &m), bad);
    for (size_t i = 0; i < sizeof(bad_strings) / sizeof(bad_strings[0]); i++) {
        const char *b = bad_strings[i];

        protoq__message__init(&m);
        m.idempotency_key = (char *)b;
        ck_assert_msg(raw_publish(fd, "abc", &m) == bad, "key %zu", i);
        protoq__message__init(&m);
        m.correlation_id = (char *)b;
        ck_assert_msg(raw_publish(fd, "abc", &m) == bad, "correlation_id %zu",
                      i);
        protoq__message__init(&m);
        m.reply_to = (char *)b;
        ck_assert_msg(raw_publish(fd, "abc", &m) == bad, "reply_to %zu", i);
        protoq__message__init(&m);
        kv.key = (char *)"h";
        kv.value = (char *)b;
        m.n_headers = 1;
        m.headers = kvs;
        ck_assert_msg(raw_publish(fd, "abc", &m) == bad, "header %zu", i);
    }
    /* Valid UTF-8 of every length passes; the connection still works. */
    protoq__message__init(&m);
    kv.key = (char *)"h";
    kv.value = (char *)"caf\xc3\xa9 \xe2\x9c\x93 \xf0\x9f\x98\x80";
    m.n_headers = 1;
    m.headers = kvs;
    ck_assert_int_eq(raw_publish(fd, "abc", &m), 0);
    close(fd);

    ck_assert_uint_eq(qtotal(c, "abc"), 1);
    pq_check_remote(c,
                    protoq_queue_stat(c, "abd", &(struct protoq_queue_info){0}),
                    PROTOQ_CODE_QUEUE_NOT_FOUND);
    pq_check_remote(c,
                    protoq_queue_stat(c, "x", &(struct protoq_queue_info){0}),
                    PROTOQ_CODE_QUEUE_NOT_FOUND);
    protoq_close(c);
    bounce(_i);
    c = pq_connect_or_fail(&g_srv);
    ck_assert_uint_eq(qtotal(c, "abc"), 1);
    pq_check_remote(c,
                    protoq_queue_stat(c, "abd", &(struct protoq_queue_info){0}),
                    PROTOQ_CODE_QUEUE_NOT_FOUND);
    protoq_close(c);
}
END_TEST

/* ---------------------------------- item 7: dead-letter targets */

/* create_code: QueueCreate name with dead_letter dl (transient if asked);
 * the wire code of the answer (0: Ok). */
static int
create_code(protoq_client *c, const char *name, const char *dl, bool transient)
{
    struct protoq_queue_attrs a;
    int rc;

    memset(&a, 0, sizeof(a));
    a.transient = transient;
    a.max_attempts = 1;
    snprintf(a.dead_letter, sizeof(a.dead_letter), "%s", dl);
    rc = protoq_queue_create(c, name, &a);
    if (rc == PQ_OK) {
        return 0;
    }
    ck_assert_int_eq(rc, PQ_EREMOTE);
    return protoq_last_error_code(c);
}

/* nack_one: take the one job of q and nack it (max_attempts 1: it is
 * dead-lettered at once). */
static void
nack_one(const char *q)
{
    struct cons *k = cons_open(q, 1);
    struct got g = cons_get(k, q);

    pq_check_ok(k->c, protoq_nack_sync(k->c, g.id, g.attempt, 0, false, "x"));
    cons_close(k);
}

/*
 * A dead_letter that does not exist was accepted, and so was deleting a
 * queue others use as their dead letter: failed jobs were then dropped
 * with a warning. Now: QUEUE_NOT_FOUND at create; BAD_REQUEST for a
 * queue that names itself, or a durable queue naming a transient one; a
 * delete of a queue in use is refused, naming its users.
 */
START_TEST(test_dead_letter_target_must_exist)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    const char *msg;

    ck_assert_int_eq(create_code(c, "jobs", "nowhere", false),
                     PROTOQ_CODE_QUEUE_NOT_FOUND);
    pq_check_remote(
        c, protoq_queue_stat(c, "jobs", &(struct protoq_queue_info){0}),
        PROTOQ_CODE_QUEUE_NOT_FOUND);
    ck_assert_int_eq(create_code(c, "jobs", "jobs", false),
                     PROTOQ_CODE_BAD_REQUEST);
    ck_assert_int_eq(create_code(c, "tdlq", "", true), 0);
    ck_assert_int_eq(create_code(c, "jobs", "tdlq", false),
                     PROTOQ_CODE_BAD_REQUEST);
    ck_assert_int_eq(create_code(c, "tjobs", "tdlq", true), 0);
    ck_assert_int_eq(create_code(c, "dlq", "", false), 0);
    ck_assert_int_eq(create_code(c, "jobs", "dlq", false), 0);
    ck_assert_int_eq(create_code(c, "jobs2", "dlq", false), 0);
    ck_assert_int_eq(create_code(c, "jobs", "dlq", false), 0); /* idempotent */

    pq_check_remote(c, protoq_queue_delete(c, "dlq"), PROTOQ_CODE_BAD_REQUEST);
    msg = protoq_errmsg(c);
    ck_assert_msg(strstr(msg, "jobs") && strstr(msg, "jobs2"),
                  "the refusal names the users: %s", msg);
    pq_check_remote(c, protoq_queue_delete(c, "tdlq"), PROTOQ_CODE_BAD_REQUEST);
    pub(c, "jobs", "job-1");
    protoq_close(c);

    bounce(_i);
    c = pq_connect_or_fail(&g_srv);
    pq_check_remote(c, protoq_queue_delete(c, "dlq"), PROTOQ_CODE_BAD_REQUEST);
    nack_one("jobs");
    ck_assert_uint_eq(qtotal(c, "dlq"), 1);
    pq_check_ok(c, protoq_queue_delete(c, "jobs"));
    pq_check_remote(c, protoq_queue_delete(c, "dlq"), PROTOQ_CODE_BAD_REQUEST);
    pq_check_ok(c, protoq_queue_delete(c, "jobs2"));
    ck_assert_uint_eq(qtotal(c, "dlq"), 1);
    protoq_close(c);

    bounce(_i);
    c = pq_connect_or_fail(&g_srv);
    ck_assert_uint_eq(qtotal(c, "dlq"), 1);
    pq_check_ok(c, protoq_queue_delete(c, "dlq"));
    protoq_close(c);
}
END_TEST

/*
 * A dead letter after a restart is what it was before: no key, no
 * requirements, and the dead-letter queue's TTL (not its source's). The
 * replay carried all three over from the source: an expired job
 * dead-lettered by dead_letter_expired expired again at once and was
 * dropped; of two dead letters with the same key (from two queues) the
 * second was refused; a dead letter with requirements reached no plain
 * consumer.
 */
START_TEST(test_dead_letters_survive_restart_as_they_were)
{
    protoq_client *c = pq_connect_or_fail(&g_srv);
    struct protoq_queue_attrs a;
    struct protoq_message m;
    struct protoq_kv req = {"gpu", "a100"};
    struct cons *k;
    struct got g;
    uint64_t id;

    mkq(c, "dlq", NULL, 0);
    memset(&a, 0, sizeof(a));
    a.ttl_ms = 100;
    a.dead_letter_expired = true;
    snprintf(a.dead_letter, sizeof(a.dead_letter), "dlq");
    pq_check_ok(c, protoq_queue_create(c, "short", &a));
    mkq(c, "src1", "dlq", 1);
    mkq(c, "src2", "dlq", 1);
    pub(c, "short", "expired");
    pub_key(c, "src1", "keyed-1", "same");
    pub_key(c, "src2", "keyed-2", "same");
    memset(&m, 0, sizeof(m));
    m.payload = "tagged";
    m.len = strlen("tagged");
    m.requires = &req;
    m.n_requires = 1;
    pq_check_ok(c, protoq_publish(c, "src1", &m, &id));
    nack_one("src1");
    nack_one("src2");
    ck_assert_uint_eq(qtotal_wait(c, "dlq", 3), 3);
    /* the tagged one needs a consumer with gpu=a100 in src1 */
    {
        protoq_client *t = pq_connect_or_fail(&g_srv);
        struct cons tk;

        memset(&tk, 0, sizeof(tk));
        tk.c = t;
        pq_check_ok(t, protoq_subscribe(t, "src1", 1, &req, 1, on_deliver, &tk,
                                        &tk.sub));
        g = cons_get(&tk, "tagged");
        pq_check_ok(t, protoq_nack_sync(t, g.id, g.attempt, 0, false, NULL));
        protoq_close(t);
    }
    ck_assert_uint_eq(qtotal_wait(c, "dlq", 4), 4);
    protoq_close(c);

    bounce(_i);
    c = pq_connect_or_fail(&g_srv);
    sleep_ms(300); /* past the source's TTL once more */
    ck_assert_msg(qtotal(c, "dlq") == 4,
                  "%s: %" PRIu64 " of 4 dead letters "
                  "after the restart",
                  _i == 0 ? "SIGTERM" : "kill -9", qtotal(c, "dlq"));
    /* A plain consumer gets all four. */
    k = cons_open("dlq", 4);
    for (int i = 0; i < 4; i++) {
        g = cons_get(k, "dead letter");
    }
    cons_close(k);
    /* The key is free in the dead-letter queue, as it was before. */
    ck_assert_uint_ne(pub_key(c, "dlq", "new", "same"), 0);
    ck_assert_uint_eq(qtotal(c, "dlq"), 5);
    protoq_close(c);
}
END_TEST

/*
 * A log written by 6b0104b (protoq queue create jobs --dead-letter
 * jobs.dlq --max-attempts 1 --backoff 10ms:10ms; protoq pub jobs job-1;
 * SIGTERM; segment_bytes 65536): the first 208 bytes of its only segment,
 * zeros after them up to 81920.
 */
static const uint8_t OLD_SEGMENT[] = {
    0x50, 0x52, 0x4f, 0x54, 0x4f, 0x51, 0x4c, 0x47, 0x01, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x5b, 0x00, 0x00, 0x00,
    0xf6, 0xc6, 0x57, 0xe4, 0x01, 0x04, 0x00, 0x00, 0x00, 0x6a, 0x6f, 0x62,
    0x73, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x30, 0x75, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x08, 0x00, 0x00, 0x00, 0x6a, 0x6f,
    0x62, 0x73, 0x2e, 0x64, 0x6c, 0x71, 0x0a, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x0a, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x5c, 0x26, 0x05, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x49,
    0x00, 0x00, 0x00, 0x26, 0xf4, 0xfe, 0x4b, 0x04, 0x00, 0x00, 0xe5, 0x17,
    0x74, 0x31, 0xa2, 0x01, 0x04, 0x00, 0x00, 0x00, 0x6a, 0x6f, 0x62, 0x73,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xd7, 0x19, 0x74,
    0x31, 0xa2, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x07, 0x00, 0x00,
    0x00, 0x0a, 0x05, 0x6a, 0x6f, 0x62, 0x2d, 0x31, 0x00, 0x00, 0x00, 0x00,
    0x00, 0x00, 0x00, 0x00};

/* A log whose queue names a dead_letter that does not exist still loads
 * (with a warning); once the queue is created, failed jobs reach it. */
START_TEST(test_old_log_with_missing_dead_letter_starts)
{
    protoq_client *c;
    char path[400];
    FILE *f;

    ck_assert_int_eq(srv_stop(&g_srv), 0);
    snprintf(path, sizeof(path), "%s/seg-0000000001.log", g_srv.data_dir);
    f = fopen(path, "w");
    ck_assert_ptr_nonnull(f);
    ck_assert_uint_eq(fwrite(OLD_SEGMENT, 1, sizeof(OLD_SEGMENT), f),
                      sizeof(OLD_SEGMENT));
    ck_assert_int_eq(ftruncate(fileno(f), 81920), 0);
    ck_assert_int_eq(fclose(f), 0);
    ck_assert_int_eq(srv_launch(&g_srv), 0);
    ck_assert(
        srv_log_has(&g_srv, "its dead_letter queue jobs.dlq does not exist"));
    c = pq_connect_or_fail(&g_srv);
    ck_assert_uint_eq(qtotal(c, "jobs"), 1);
    /* Re-declaring it names a missing queue: refused, not dropped later. */
    ck_assert_int_eq(create_code(c, "jobs", "jobs.dlq", false),
                     PROTOQ_CODE_QUEUE_NOT_FOUND);
    mkq(c, "jobs.dlq", NULL, 0);
    nack_one("jobs");
    ck_assert_uint_eq(qtotal(c, "jobs.dlq"), 1);
    protoq_close(c);

    bounce(_i);
    c = pq_connect_or_fail(&g_srv);
    ck_assert_uint_eq(qtotal(c, "jobs"), 0);
    ck_assert_uint_eq(qtotal(c, "jobs.dlq"), 1);
    protoq_close(c);
}
END_TEST

/* ================================================================ main */

static TCase *
tcase(const char *name, int timeout_s)
{
    TCase *tc = tcase_create(name);

    tcase_add_checked_fixture(tc, setup, teardown);
    tcase_set_timeout(tc, timeout_s);
    return tc;
}

static Suite *
loss_suite(void)
{
    Suite *s = suite_create("loss");
    TCase *tc;

    tc = tcase("delete", 30);
    tcase_add_loop_test(tc, test_delete_with_held_deliveries_keeps_other_queues,
                        0, 2);
    tcase_add_loop_test(
        tc, test_delete_with_held_deliveries_dead_letters_nothing, 0, 2);
    suite_add_tcase(s, tc);

    tc = tcase("keys", 30);
    tcase_add_loop_test(tc, test_keyed_job_put_back_survives_restart, 0,
                        2 * PB_COUNT);
    tcase_add_loop_test(tc, test_key_reused_after_its_window_survives_restart,
                        0, 2);
    tcase_add_loop_test(tc, test_compacted_keyed_job_survives_restart, 0, 2);
    tcase_add_loop_test(tc, test_counters_start_at_zero_after_restart, 0, 2);
    tcase_add_loop_test(
        tc, test_batch_over_a_segment_is_too_large_and_stores_nothing, 0, 2);
    tcase_add_loop_test(tc, test_keys_put_back_delete_and_compaction_combined,
                        0, 2);
    suite_add_tcase(s, tc);

    tc = tcase("names_strings", 30);
    tcase_add_loop_test(tc, test_key_does_not_outlive_queue_delete, 0, 2);
    tcase_add_loop_test(tc, test_nul_and_bad_utf8_in_strings_are_refused, 0, 2);
    suite_add_tcase(s, tc);

    tc = tcase("dead_letter", 30);
    tcase_add_loop_test(tc, test_dead_letter_target_must_exist, 0, 2);
    tcase_add_loop_test(tc, test_old_log_with_missing_dead_letter_starts, 0, 2);
    tcase_add_loop_test(tc, test_dead_letters_survive_restart_as_they_were, 0,
                        2);
    suite_add_tcase(s, tc);
    return s;
}

int
main(void)
{
    SRunner *sr;
    int failed;

    if (test_conf_write(&g_conf, CONF_TEXT) != 0) {
        return EXIT_FAILURE;
    }
    sr = srunner_create(loss_suite());
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    test_conf_remove(&g_conf);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
