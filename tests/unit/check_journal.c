/*
 * check_journal.c: the journal (broker/journal.c) without an event loop:
 * a queue set, a real store in a temp dir, and the journal between them,
 * driven the way the broker drives it (append, wait until durable, then
 * change the queue), then closed and replayed into a fresh queue set.
 *
 * Each test checks what replay rebuilds: messages in order with their
 * attempts and failures, acks, keyed jobs that were put back (a keyed job
 * nacked once used to vanish on restart and swallow the producer's retry),
 * progress kept across a release, dead letters, purges, and a log with
 * many rolled and reaped segments; deliveries that were running at a
 * crash (REC_DELIVER) counted as failed attempts, and only those.
 */
#include <check.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "body.h"
#include "byteorder.h"
#include "crc32c.h"
#include "clock.h"
#include "journal.h"
#include "log.h"
#include "pqerr.h"
#include "protoq.pb-c.h"
#include "queue.h"
#include "record.h"
#include "store.h"

/* One journaled queue set: what the broker's dispatch owns, minus the
 * network. */
struct jt {
    char dir[64];
    uint64_t segment_bytes;
    struct qset *qs;
    struct journal *j;
    uint64_t next_id;
    uint64_t durable_upto;
};

static void
on_qevent(void *arg, const struct qevent *ev)
{
    struct jt *t = arg;

    if (ev->type != QEV_READY && ev->type != QEV_TOUCH &&
        !queue_attrs(ev->q)->transient) {
        (void)journal_qevent(t->j, ev, clock_mono_ms(), NULL, 0);
    }
}

static void
jt_open(struct jt *t)
{
    struct journal_config cfg = {
        .data_dir = t->dir,
        .fsync = FSYNC_NEVER,
        .segment_bytes = t->segment_bytes,
        .payload_budget_bytes = 1 << 20,
    };
    char err[512];
    int rc;

    t->qs = qset_new(NULL);
    ck_assert_ptr_nonnull(t->qs);
    rc = journal_open(&cfg, t->qs, &t->j, err, sizeof(err));
    ck_assert_msg(rc == PQ_OK, "journal_open: %s", err);
    t->next_id = journal_next_id(t->j);
    t->durable_upto = 0;
    /* Like dispatch: the listener goes on after replay, then the
     * deliveries the log shows running fail. */
    qset_set_listener(t->qs, on_qevent, t);
    journal_resume(t->j, clock_mono_ms());
}

static void
jt_close(struct jt *t)
{
    journal_close(t->j);
    t->j = NULL;
    qset_free(t->qs);
    t->qs = NULL;
}

static void
jt_init(struct jt *t, uint64_t segment_bytes)
{
    memset(t, 0, sizeof(*t));
    snprintf(t->dir, sizeof(t->dir), "/tmp/protoq-journal.XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(t->dir));
    t->segment_bytes = segment_bytes;
    jt_open(t);
}

static void
jt_restart(struct jt *t)
{
    jt_close(t);
    jt_open(t);
}

static void
jt_fini(struct jt *t)
{
    char cmd[128];

    if (t->j != NULL) {
        jt_close(t);
    }
    snprintf(cmd, sizeof(cmd), "rm -rf %s", t->dir);
    ck_assert_int_eq(system(cmd), 0);
}

static void
on_durable(void *arg, uint64_t upto_lsn, int status)
{
    struct jt *t = arg;

    ck_assert_int_eq(status, PQ_OK);
    if (upto_lsn > t->durable_upto) {
        t->durable_upto = upto_lsn;
    }
}

/* Hand everything appended to the storage thread and wait (bounded) until
 * it is durable: what the broker does before it answers. */
static void
jt_sync(struct jt *t)
{
    uint64_t want = journal_last_lsn(t->j);

    journal_urgent(t->j);
    journal_submit(t->j);
    for (int i = 0; i < 5000 && t->durable_upto < want; i++) {
        usleep(1000);
        journal_reap(t->j, on_durable, t);
    }
    ck_assert_uint_ge(t->durable_upto, want);
}

static struct queue *
jt_queue(struct jt *t, const char *name, const struct queue_attrs *a)
{
    struct queue *q;
    uint64_t lsn;

    ck_assert_int_eq(qset_create(t->qs, name, a, &q), PQ_OK);
    ck_assert_int_eq(journal_queue_create(t->j, q, &lsn), PQ_OK);
    jt_sync(t);
    return q;
}

/* The encoded protoq.Message the broker stores for payload. */
static struct body *
message_body(const char *payload)
{
    Protoq__Message m = PROTOQ__MESSAGE__INIT;
    struct body *b;

    m.payload.data = (uint8_t *)payload;
    m.payload.len = strlen(payload);
    b = body_alloc(protoq__message__get_packed_size(&m));
    ck_assert_ptr_nonnull(b);
    protoq__message__pack(&m, b->data);
    return b;
}

/* Publish one message the way dispatch does: PUBLISH record, durable,
 * then into the queue. Returns its id. */
static uint64_t
jt_publish(struct jt *t, struct queue *q, const char *payload, const char *key)
{
    struct pending p;
    uint64_t lsn, now = clock_mono_ms();
    struct msg_new mn;

    memset(&p, 0, sizeof(p));
    p.q = q;
    p.mn.id = t->next_id++;
    p.mn.body = message_body(payload);
    p.mn.size = (uint32_t)strlen(payload);
    p.mn.published_wall_ms = clock_wall_ms();
    p.idem_key = (char *)key;
    ck_assert_int_eq(journal_publish(t->j, &p, 1, now, &lsn), PQ_OK);
    jt_sync(t);
    mn = p.mn;
    mn.idem_key = key;
    ck_assert(journal_keep_body(t->j, &mn));
    ck_assert_int_eq(queue_push(q, &mn, now, NULL), PQ_OK);
    journal_msg_stored(t->j, &mn);
    journal_publish_settled(t->j, &p);
    body_unref(&p.mn.body);
    return mn.id;
}

/* The payload of an encoded message (NUL-terminated into buf). */
static const char *
payload_of(const struct body *b, char *buf, size_t cap)
{
    Protoq__Message *m;

    ck_assert_ptr_nonnull(b);
    m = protoq__message__unpack(NULL, b->len, b->data);
    ck_assert_ptr_nonnull(m);
    snprintf(buf, cap, "%.*s", (int)m->payload.len,
             (const char *)m->payload.data);
    protoq__message__free_unpacked(m, NULL);
    return buf;
}

/* Take the next delivery of q (a consumer subscribed for it). */
static struct msg *
jt_deliver(struct jt *t, struct queue *q, struct consumer *c)
{
    struct consumer *to = NULL;
    struct msg *m = queue_next_delivery(q, clock_mono_ms(), &to);

    (void)t;
    ck_assert_ptr_nonnull(m);
    ck_assert_ptr_eq(to, c);
    if (m->body == NULL) {
        m->body = journal_load_body(t->j, m);
    }
    return m;
}

/* jt_deliver, and its REC_DELIVER as dispatch writes it. */
static struct msg *
jt_deliver_rec(struct jt *t, struct queue *q, struct consumer *c)
{
    struct msg *m = jt_deliver(t, q, c);

    journal_delivered(t->j, m);
    return m;
}

/* The process dies with c holding what it holds: nothing more is written
 * (the listener goes first, so c's unsubscribe writes no REQUEUE), then
 * the log is opened again. */
static void
jt_crash(struct jt *t, struct consumer *c)
{
    qset_set_listener(t->qs, NULL, NULL);
    queue_unsubscribe(c, clock_mono_ms());
    queue_consumer_fini(c);
    jt_restart(t);
}

static void
jt_ack(struct jt *t, uint64_t id, uint32_t attempt)
{
    struct msg *m;
    uint64_t lsn;

    ck_assert_int_eq(qset_ack(t->qs, id, attempt, &m), PQ_OK);
    ck_assert_int_eq(journal_ack(t->j, m, NULL, 0, &lsn), PQ_OK);
    msg_free(m);
    jt_sync(t);
}

/* Drain q after a restart: payloads in delivery order, attempts too. */
static void
expect_queue(struct jt *t, const char *name, const char *const *payloads,
             const uint32_t *attempts, size_t n)
{
    struct queue *q = qset_find(t->qs, name);
    struct consumer c;
    char buf[256];

    ck_assert_ptr_nonnull(q);
    ck_assert_uint_eq(queue_ready_count(q) + queue_delayed_count(q), n);
    queue_consumer_init(&c, 1, NULL, (uint32_t)n + 1);
    ck_assert_int_eq(queue_subscribe(q, &c), PQ_OK);
    for (size_t i = 0; i < n; i++) {
        struct msg *m = jt_deliver(t, q, &c);

        ck_assert_str_eq(payload_of(m->body, buf, sizeof(buf)), payloads[i]);
        if (attempts != NULL) {
            ck_assert_uint_eq(m->attempt, attempts[i]);
        }
    }
    queue_unsubscribe(&c, clock_mono_ms());
    queue_consumer_fini(&c);
}

/* meta_put: write DIR/META by hand (store.h, ON-DISK FORMAT): one slot,
 * gen % 2, as a broker that deleted segments before first would leave it. */
static void
meta_put(const char *dir, uint64_t gen, uint32_t first, uint32_t last)
{
    uint8_t slot[32] = {'P', 'Q', 'M', 'E', 'T', 'A', '0', '1'};
    char path[128];
    int fd;

    le64_put(slot + 8, gen);
    le32_put(slot + 16, first);
    le32_put(slot + 20, last);
    le32_put(slot + 24, 0);
    le32_put(slot + 28, crc32c(0, slot, 28));
    snprintf(path, sizeof(path), "%s/META", dir);
    fd = open(path, O_RDWR | O_CREAT, 0644);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(ftruncate(fd, 64), 0);
    ck_assert_int_eq(pwrite(fd, slot, sizeof(slot), (off_t)(gen % 2) * 32),
                     (ssize_t)sizeof(slot));
    ck_assert_int_eq(close(fd), 0);
}

static void
put_rec(struct store *st, const struct record *r)
{
    uint8_t buf[512];
    ssize_t n = record_encode(r, buf, sizeof(buf));

    ck_assert_int_gt(n, 0);
    ck_assert_int_eq(store_append(st, r->type, buf, (size_t)n, NULL, NULL),
                     PQ_OK);
}

/* fill_and_ack: fill the first segment of a 64 KiB-segment log and more
 * with 150 x 1000 bytes in fill, delivered (each with its DELIVER) and
 * acked: what referenced the first segment before still does, nothing of
 * fill does. */
static void
fill_and_ack(struct jt *t, struct queue *fill)
{
    struct consumer cf;
    char pad[1001];

    memset(pad, 'f', sizeof(pad) - 1);
    pad[sizeof(pad) - 1] = '\0';
    for (int i = 0; i < 150; i++) {
        jt_publish(t, fill, pad, NULL);
    }
    queue_consumer_init(&cf, 2, NULL, 1000);
    ck_assert_int_eq(queue_subscribe(fill, &cf), PQ_OK);
    for (int i = 0; i < 150; i++) {
        struct msg *m = jt_deliver(t, fill, &cf);

        journal_delivered(t->j, m);
        jt_ack(t, m->id, m->attempt);
    }
    queue_unsubscribe(&cf, clock_mono_ms());
    queue_consumer_fini(&cf);
}

/* access_first_segment: 0 while segment 1 of the data dir exists, -1
 * once it was deleted. */
static int
access_first_segment(const struct jt *t)
{
    char path[128];

    snprintf(path, sizeof(path), "%s/seg-0000000001.log", t->dir);
    return access(path, F_OK);
}

/* ---- tests ---- */

START_TEST(test_replay_publishes_in_order)
{
    static const char *const want[] = {"a", "b", "c", "d"};
    struct jt t;
    struct queue *q;

    jt_init(&t, 1 << 20);
    q = jt_queue(&t, "jobs", NULL);
    for (size_t i = 0; i < 4; i++) {
        jt_publish(&t, q, want[i], NULL);
    }
    jt_restart(&t);
    expect_queue(&t, "jobs", want, NULL, 4);
    ck_assert_uint_gt(journal_next_id(t.j), t.next_id - 1);
    jt_fini(&t);
}
END_TEST

START_TEST(test_replay_forgets_acked)
{
    static const char *const want[] = {"b"};
    struct jt t;
    struct queue *q;
    struct consumer c;
    struct msg *m;

    jt_init(&t, 1 << 20);
    q = jt_queue(&t, "jobs", NULL);
    jt_publish(&t, q, "a", NULL);
    jt_publish(&t, q, "b", NULL);
    queue_consumer_init(&c, 1, NULL, 1);
    ck_assert_int_eq(queue_subscribe(q, &c), PQ_OK);
    m = jt_deliver(&t, q, &c);
    jt_ack(&t, m->id, m->attempt);
    queue_unsubscribe(&c, clock_mono_ms());
    queue_consumer_fini(&c);
    jt_restart(&t);
    expect_queue(&t, "jobs", want, NULL, 1);
    jt_fini(&t);
}
END_TEST

/* A keyed job nacked once: its REQUEUE record re-pushes it at replay while
 * its key is already known; replay must take the key over (the job used to
 * be dropped, and the producer's retry answered as a duplicate). */
START_TEST(test_replay_keyed_job_put_back)
{
    static const char *const want[] = {"train"};
    static const uint32_t attempts[] = {2};
    struct nack_opts no = {.has_delay = true, .delay_ms = 0};
    struct jt t;
    struct queue *q;
    struct consumer c;
    struct msg *m;
    uint64_t id, dup = 0;

    jt_init(&t, 1 << 20);
    q = jt_queue(&t, "jobs", NULL);
    id = jt_publish(&t, q, "train", "k1");
    queue_consumer_init(&c, 1, NULL, 1);
    ck_assert_int_eq(queue_subscribe(q, &c), PQ_OK);
    m = jt_deliver(&t, q, &c);
    ck_assert_int_eq(qset_nack(t.qs, m->id, m->attempt, &no, clock_mono_ms()),
                     PQ_OK);
    jt_sync(&t);
    queue_unsubscribe(&c, clock_mono_ms());
    queue_consumer_fini(&c);
    jt_restart(&t);
    q = qset_find(t.qs, "jobs");
    ck_assert_int_eq(queue_dedup_find(q, "k1", clock_mono_ms(), &dup), PQ_OK);
    ck_assert_uint_eq(dup, id);
    expect_queue(&t, "jobs", want, attempts, 1);
    jt_fini(&t);
}
END_TEST

START_TEST(test_replay_release_keeps_progress)
{
    Protoq__Progress pr = PROTOQ__PROGRESS__INIT;
    struct jt t;
    struct queue *q;
    struct consumer c;
    struct body *prog, *kept;
    struct msg *m;
    Protoq__Progress *back;

    jt_init(&t, 1 << 20);
    q = jt_queue(&t, "jobs", NULL);
    jt_publish(&t, q, "train", NULL);
    queue_consumer_init(&c, 1, NULL, 1);
    ck_assert_int_eq(queue_subscribe(q, &c), PQ_OK);
    m = jt_deliver(&t, q, &c);
    pr.percent = 40;
    pr.checkpoint = "s3://b/step-4000";
    prog = body_alloc(protoq__progress__get_packed_size(&pr));
    protoq__progress__pack(&pr, prog->data);
    ck_assert_int_eq(
        qset_release(t.qs, m->id, m->attempt, prog, clock_mono_ms()), PQ_OK);
    body_unref(&prog);
    jt_sync(&t);
    queue_unsubscribe(&c, clock_mono_ms());
    queue_consumer_fini(&c);
    jt_restart(&t);
    q = qset_find(t.qs, "jobs");
    queue_consumer_init(&c, 1, NULL, 1);
    ck_assert_int_eq(queue_subscribe(q, &c), PQ_OK);
    m = jt_deliver(&t, q, &c);
    kept = msg_progress(m);
    ck_assert_ptr_nonnull(kept);
    back = protoq__progress__unpack(NULL, kept->len, kept->data);
    ck_assert_ptr_nonnull(back);
    ck_assert_uint_eq(back->percent, 40);
    ck_assert_str_eq(back->checkpoint, "s3://b/step-4000");
    protoq__progress__free_unpacked(back, NULL);
    ck_assert_uint_eq(m->failures, 0); /* a release is not a failure */
    queue_unsubscribe(&c, clock_mono_ms());
    queue_consumer_fini(&c);
    jt_fini(&t);
}
END_TEST

START_TEST(test_replay_dead_letter)
{
    static const char *const want[] = {"poison"};
    struct queue_attrs a;
    struct nack_opts dl = {.dead_letter = true, .error = "boom"};
    struct jt t;
    struct queue *q;
    struct consumer c;
    struct msg *m;

    jt_init(&t, 1 << 20);
    jt_queue(&t, "dlq", NULL);
    memset(&a, 0, sizeof(a));
    snprintf(a.dead_letter, sizeof(a.dead_letter), "dlq");
    q = jt_queue(&t, "jobs", &a);
    jt_publish(&t, q, "poison", NULL);
    queue_consumer_init(&c, 1, NULL, 1);
    ck_assert_int_eq(queue_subscribe(q, &c), PQ_OK);
    m = jt_deliver(&t, q, &c);
    ck_assert_int_eq(qset_nack(t.qs, m->id, m->attempt, &dl, clock_mono_ms()),
                     PQ_OK);
    jt_sync(&t);
    queue_unsubscribe(&c, clock_mono_ms());
    queue_consumer_fini(&c);
    jt_restart(&t);
    ck_assert_uint_eq(queue_ready_count(qset_find(t.qs, "jobs")), 0);
    expect_queue(&t, "dlq", want, NULL, 1);
    jt_fini(&t);
}
END_TEST

START_TEST(test_replay_purge_and_delete)
{
    static const char *const want[] = {"keep"};
    struct jt t;
    struct queue *q, *gone;
    uint64_t lsn;

    jt_init(&t, 1 << 20);
    q = jt_queue(&t, "keep", NULL);
    gone = jt_queue(&t, "gone", NULL);
    jt_publish(&t, gone, "x", NULL);
    jt_publish(&t, q, "keep", NULL);
    jt_publish(&t, gone, "y", NULL);
    ck_assert_int_eq(journal_queue_delete(t.j, gone, &lsn), PQ_OK);
    qset_delete(t.qs, gone);
    jt_sync(&t);
    jt_restart(&t);
    ck_assert_ptr_null(qset_find(t.qs, "gone"));
    expect_queue(&t, "keep", want, NULL, 1);
    q = qset_find(t.qs, "keep");
    ck_assert_int_eq(journal_queue_purge(t.j, q, &lsn), PQ_OK);
    ck_assert_uint_eq(queue_purge(q), 1);
    jt_sync(&t);
    jt_restart(&t);
    ck_assert_uint_eq(queue_ready_count(qset_find(t.qs, "keep")), 0);
    jt_fini(&t);
}
END_TEST

/* A dead letter whose original PUBLISH went with a deleted segment: the
 * DEAD_LETTER record holds the message since, and replay must rebuild it
 * from there (it used to skip a dead letter of a message it had not seen:
 * the job was lost at restart). */
START_TEST(test_replay_dead_letter_after_publish_segment_is_gone)
{
    static const char *const want[] = {"poison"};
    struct queue_attrs a;
    struct nack_opts dl = {.dead_letter = true, .error = "boom"};
    struct jt t;
    struct queue *q, *fill;
    struct consumer c;
    struct msg *m;

    jt_init(&t, 65536);
    jt_queue(&t, "dlq", NULL);
    memset(&a, 0, sizeof(a));
    snprintf(a.dead_letter, sizeof(a.dead_letter), "dlq");
    q = jt_queue(&t, "jobs", &a);
    fill = jt_queue(&t, "fill", NULL);
    jt_publish(&t, q, "poison", NULL);
    /* Only "poison" still references the first segment after this. */
    fill_and_ack(&t, fill);
    /* Dead-letter it: its references move to the DEAD_LETTER record, in
     * the current segment; the first segment is then deleted. */
    queue_consumer_init(&c, 1, NULL, 1);
    ck_assert_int_eq(queue_subscribe(q, &c), PQ_OK);
    m = jt_deliver(&t, q, &c);
    ck_assert_int_eq(qset_nack(t.qs, m->id, m->attempt, &dl, clock_mono_ms()),
                     PQ_OK);
    jt_sync(&t);
    queue_unsubscribe(&c, clock_mono_ms());
    queue_consumer_fini(&c);
    /* The storage thread deletes the first segment (bounded wait). */
    for (int i = 0; i < 200 && access_first_segment(&t) == 0; i++) {
        jt_sync(&t);
        usleep(10000);
    }
    ck_assert_int_eq(access_first_segment(&t), -1);
    jt_restart(&t);
    ck_assert_uint_eq(queue_ready_count(qset_find(t.qs, "jobs")), 0);
    expect_queue(&t, "dlq", want, NULL, 1);
    jt_fini(&t);
}
END_TEST

/* The live-message check at start, done by replay with the queue set it
 * builds (no map of its own): a REQUEUE shows message 7 live, but the
 * segment with its PUBLISH is gone while META says the log starts after
 * it, as a deletion of a segment with live data would leave it. The start
 * is refused naming the message; with an ACK after the REQUEUE (7 is gone,
 * and deleting its segment was right) the same log opens. */
START_TEST(test_replay_refuses_live_message_without_publish)
{
    struct store_config sc = {.fsync_policy = FSYNC_NEVER,
                              .segment_bytes = 4096};
    struct journal_config jc = {.fsync = FSYNC_NEVER,
                                .segment_bytes = 4096,
                                .payload_budget_bytes = 1 << 20};
    struct record r = {.type = REC_QUEUE_CREATE}, pad = {.type = REC_DROP};
    struct store *st;
    struct journal *j = NULL;
    struct qset *qs;
    char dir[64], path[128], err[512];
    int rc;

    snprintf(dir, sizeof(dir), "/tmp/protoq-journal.XXXXXX");
    ck_assert_ptr_nonnull(mkdtemp(dir));
    sc.dir = jc.data_dir = dir;
    ck_assert_int_eq(store_open(&sc, NULL, NULL, &st, err, sizeof(err)), PQ_OK);
    r.u.queue_create.name = (struct rec_str){"q", 1};
    put_rec(st, &r);
    r = (struct record){.type = REC_PUBLISH};
    r.u.publish.id = 7;
    r.u.publish.queue = (struct rec_str){"q", 1};
    put_rec(st, &r);
    pad.u.drop.id = 999999;
    pad.u.drop.reason = (struct rec_str){"x", 1};
    while (store_current_seg(st) < 2) {
        put_rec(st, &pad);
    }
    r = (struct record){.type = REC_QUEUE_CREATE};
    r.u.queue_create.name = (struct rec_str){"q", 1};
    put_rec(st, &r);
    r = (struct record){.type = REC_REQUEUE};
    r.u.requeue.id = 7;
    r.u.requeue.attempt = 1;
    put_rec(st, &r);
    if (_i == 1) {
        r = (struct record){.type = REC_ACK};
        r.u.ack.id = 7;
        put_rec(st, &r);
    }
    while (store_current_seg(st) < 3) {
        put_rec(st, &pad);
    }
    ck_assert_int_eq(store_close(st), PQ_OK);
    snprintf(path, sizeof(path), "%s/seg-0000000001.log", dir);
    ck_assert_int_eq(unlink(path), 0);
    meta_put(dir, 500, 2, 3);
    qs = qset_new(NULL);
    rc = journal_open(&jc, qs, &j, err, sizeof(err));
    if (_i == 0) {
        ck_assert_int_eq(rc, PQ_ECORRUPT);
        ck_assert_msg(strstr(err, "message 7 is live here") != NULL &&
                          strstr(err, "seg-0000000002.log") != NULL,
                      "%s", err);
        ck_assert_ptr_null(j);
    } else {
        ck_assert_msg(rc == PQ_OK, "%s", err);
        journal_close(j);
    }
    qset_free(qs);
    snprintf(path, sizeof(path), "rm -rf %s", dir);
    ck_assert_int_eq(system(path), 0);
}
END_TEST

/* Small segments: many rolls; acked messages let old segments go. What is
 * live comes back exactly, in order. */
START_TEST(test_replay_across_rolled_segments)
{
    enum { N = 3000 };
    static char names[N][16];
    static const char *want[N];
    struct jt t;
    struct queue *q;
    struct consumer c;
    size_t kept = 0;

    jt_init(&t, 65536);
    q = jt_queue(&t, "jobs", NULL);
    for (size_t i = 0; i < N; i++) {
        snprintf(names[i], sizeof(names[i]), "m%zu", i);
        jt_publish(&t, q, names[i], NULL);
    }
    queue_consumer_init(&c, 1, NULL, 1);
    ck_assert_int_eq(queue_subscribe(q, &c), PQ_OK);
    for (size_t i = 0; i < N; i++) {
        struct msg *m = jt_deliver(&t, q, &c);

        if (i % 10 == 9) {
            /* Every tenth stays: released, back at the front. */
            ck_assert_int_eq(
                qset_release(t.qs, m->id, m->attempt, NULL, clock_mono_ms()),
                PQ_OK);
            want[kept++] = names[i];
            break;
        }
        jt_ack(&t, m->id, m->attempt);
    }
    jt_sync(&t);
    queue_unsubscribe(&c, clock_mono_ms());
    queue_consumer_fini(&c);
    for (size_t i = 10; i < N; i++) {
        want[kept++] = names[i];
    }
    jt_restart(&t);
    expect_queue(&t, "jobs", want, NULL, kept);
    jt_fini(&t);
}
END_TEST

/* A delivery whose DELIVER record is in the log and that nothing ended
 * (crash) is a failed attempt at the next start: attempt as delivered,
 * failures + 1, so a job that takes the broker down each time counts up
 * to max_attempts instead of looping at attempt 1. A job acked after its
 * DELIVER does not come back. */
START_TEST(test_replay_counts_interrupted_delivery)
{
    struct queue_attrs a = {.no_backoff = true, .max_attempts = 5};
    struct jt t;
    struct queue *q;
    struct consumer c;
    struct msg *m;
    uint64_t id, done;

    jt_init(&t, 1 << 20);
    q = jt_queue(&t, "jobs", &a);
    id = jt_publish(&t, q, "crashy", NULL);
    done = jt_publish(&t, q, "done", NULL);
    for (uint32_t n = 1; n <= 3; n++) {
        queue_consumer_init(&c, 1, NULL, 2);
        ck_assert_int_eq(queue_subscribe(q, &c), PQ_OK);
        m = jt_deliver_rec(&t, q, &c);
        ck_assert_uint_eq(m->id, id);
        ck_assert_uint_eq(m->attempt, n);
        if (n == 1) {
            m = jt_deliver_rec(&t, q, &c);
            ck_assert_uint_eq(m->id, done);
            jt_ack(&t, done, 1);
        }
        jt_sync(&t);
        jt_crash(&t, &c);
        q = qset_find(t.qs, "jobs");
        ck_assert_ptr_nonnull(q);
        ck_assert_ptr_null(qset_msg(t.qs, done));
        ck_assert_uint_eq(queue_ready_count(q), 1);
        m = qset_msg(t.qs, id);
        ck_assert_ptr_nonnull(m);
        ck_assert_int_eq(m->state, MSG_READY);
        ck_assert_msg(m->attempt == n && m->failures == n,
                      "after crash %u: attempt %u failures %u, want %u %u", n,
                      m->attempt, (unsigned)m->failures, n, n);
    }
    jt_fini(&t);
}
END_TEST

/* Deliveries written in one DELIVER record (one loop pass) and running at
 * a crash go back in the order they were handed out, not in the order of
 * the replay's hash table: the failure notices the start sends for them
 * follow that order too. */
START_TEST(test_replay_interrupted_keep_their_order)
{
    static const char *const want[] = {"j0",  "j1",  "j2",  "j3", "j4",  "j5",
                                       "j6",  "j7",  "j8",  "j9", "j10", "j11",
                                       "j12", "j13", "j14", "j15"};
    enum { N = sizeof(want) / sizeof(want[0]) };
    struct queue_attrs a = {.no_backoff = true, .max_attempts = 5};
    uint32_t attempts[N];
    struct jt t;
    struct queue *q;
    struct consumer c;

    jt_init(&t, 1 << 20);
    q = jt_queue(&t, "jobs", &a);
    for (size_t i = 0; i < N; i++) {
        jt_publish(&t, q, want[i], NULL);
        attempts[i] = 2;
    }
    queue_consumer_init(&c, 1, NULL, N);
    ck_assert_int_eq(queue_subscribe(q, &c), PQ_OK);
    for (size_t i = 0; i < N; i++) {
        (void)jt_deliver_rec(&t, q, &c); /* one record: no sync between */
    }
    jt_sync(&t);
    jt_crash(&t, &c);
    expect_queue(&t, "jobs", want, attempts, N);
    jt_fini(&t);
}
END_TEST

/* The header key's value in an encoded message ("" if absent). */
static const char *
header_in(const struct body *b, const char *key, char *buf, size_t cap)
{
    Protoq__Message *m;

    ck_assert_ptr_nonnull(b);
    m = protoq__message__unpack(NULL, b->len, b->data);
    ck_assert_ptr_nonnull(m);
    buf[0] = '\0';
    for (size_t i = 0; i < m->n_headers; i++) {
        if (strcmp(m->headers[i]->key, key) == 0) {
            snprintf(buf, cap, "%s", m->headers[i]->value);
        }
    }
    protoq__message__free_unpacked(m, NULL);
    return buf;
}

/* At max_attempts the interrupted delivery dead-letters the job with the
 * reason a lost consumer's last attempt gives (max_attempts), once: the
 * DEAD_LETTER record written at that start keeps it there. */
START_TEST(test_replay_interrupted_delivery_dead_letters_at_max)
{
    struct queue_attrs a = {.no_backoff = true, .max_attempts = 1};
    struct jt t;
    struct queue *q;
    struct consumer c;
    struct msg *m;
    char buf[64];
    uint64_t id;

    jt_init(&t, 1 << 20);
    jt_queue(&t, "dlq", NULL);
    snprintf(a.dead_letter, sizeof(a.dead_letter), "dlq");
    q = jt_queue(&t, "jobs", &a);
    id = jt_publish(&t, q, "poison", NULL);
    queue_consumer_init(&c, 1, NULL, 1);
    ck_assert_int_eq(queue_subscribe(q, &c), PQ_OK);
    m = jt_deliver_rec(&t, q, &c);
    ck_assert_uint_eq(m->attempt, 1);
    jt_sync(&t);
    jt_crash(&t, &c);
    for (int round = 0; round < 2; round++) {
        q = qset_find(t.qs, "jobs");
        ck_assert_uint_eq(queue_total_count(q), 0);
        ck_assert_uint_eq(queue_total_count(qset_find(t.qs, "dlq")), 1);
        m = qset_msg(t.qs, id);
        ck_assert_ptr_nonnull(m);
        ck_assert_str_eq(queue_name(m->q), "dlq");
        ck_assert_uint_eq(m->attempt, 0);
        if (m->body == NULL) {
            m->body = journal_load_body(t.j, m);
        }
        ck_assert_str_eq(header_in(m->body, "x-death-reason", buf, sizeof(buf)),
                         "max_attempts");
        ck_assert_str_eq(
            header_in(m->body, "x-death-attempts", buf, sizeof(buf)), "1");
        jt_sync(&t);
        jt_restart(&t); /* the second round: as the first left it */
    }
    jt_fini(&t);
}
END_TEST

/* A state record after the DELIVER ends that delivery: a nacked job (its
 * REQUEUE) and a released one are not failed again by the next start. */
START_TEST(test_replay_ended_delivery_is_not_interrupted)
{
    struct queue_attrs a = {.no_backoff = true, .max_attempts = 5};
    struct jt t;
    struct queue *q;
    struct consumer c;
    struct msg *m;
    uint64_t nacked, released;

    jt_init(&t, 1 << 20);
    q = jt_queue(&t, "jobs", &a);
    nacked = jt_publish(&t, q, "nacked", NULL);
    released = jt_publish(&t, q, "released", NULL);
    queue_consumer_init(&c, 1, NULL, 2);
    ck_assert_int_eq(queue_subscribe(q, &c), PQ_OK);
    m = jt_deliver_rec(&t, q, &c);
    ck_assert_uint_eq(m->id, nacked);
    m = jt_deliver_rec(&t, q, &c);
    ck_assert_uint_eq(m->id, released);
    ck_assert_int_eq(qset_nack(t.qs, nacked, 1, NULL, clock_mono_ms()), PQ_OK);
    ck_assert_int_eq(qset_release(t.qs, released, 1, NULL, clock_mono_ms()),
                     PQ_OK);
    jt_sync(&t);
    jt_crash(&t, &c);
    m = qset_msg(t.qs, nacked);
    ck_assert_ptr_nonnull(m);
    ck_assert_uint_eq(m->attempt, 1);
    ck_assert_uint_eq(m->failures, 1);
    m = qset_msg(t.qs, released);
    ck_assert_ptr_nonnull(m);
    ck_assert_uint_eq(m->attempt, 1);
    ck_assert_uint_eq(m->failures, 0);
    jt_fini(&t);
}
END_TEST

/* Compaction moves a job in flight out of the oldest segment (a new
 * PUBLISH, with its attempt) and writes its DELIVER again after it: once
 * the old segment, which held the first DELIVER, is deleted, a crash
 * still counts the running attempt as failed. The DELIVER itself keeps no
 * segment: the first one goes once the job moved. */
START_TEST(test_replay_deliver_survives_compaction)
{
    struct queue_attrs a = {.no_backoff = true, .max_attempts = 5};
    struct jt t;
    struct queue *q, *fill;
    struct consumer c;
    struct msg *m;
    uint64_t id;

    jt_init(&t, 65536);
    q = jt_queue(&t, "jobs", &a);
    fill = jt_queue(&t, "fill", NULL);
    id = jt_publish(&t, q, "long-run", NULL);
    queue_consumer_init(&c, 1, NULL, 1);
    ck_assert_int_eq(queue_subscribe(q, &c), PQ_OK);
    m = jt_deliver_rec(&t, q, &c);
    ck_assert_uint_eq(m->attempt, 1);
    jt_sync(&t);
    /* Only the running job still references the first segment after
     * this (the fill's deliveries are recorded, then acked). */
    fill_and_ack(&t, fill);
    journal_compact(t.j, clock_mono_ms());
    m = qset_msg(t.qs, id);
    ck_assert_ptr_nonnull(m);
    ck_assert_uint_gt(m->pub_seg, 1); /* moved */
    for (int i = 0; i < 200 && access_first_segment(&t) == 0; i++) {
        jt_sync(&t);
        usleep(10000);
    }
    ck_assert_int_eq(access_first_segment(&t), -1);
    jt_crash(&t, &c);
    m = qset_msg(t.qs, id);
    ck_assert_ptr_nonnull(m);
    ck_assert_msg(m->attempt == 1 && m->failures == 1,
                  "attempt %u failures %u, want 1 1", m->attempt,
                  (unsigned)m->failures);
    ck_assert_uint_eq(queue_total_count(qset_find(t.qs, "fill")), 0);
    jt_fini(&t);
}
END_TEST

static Suite *
journal_suite(void)
{
    Suite *s = suite_create("journal");
    TCase *tc = tcase_create("replay");

    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_replay_publishes_in_order);
    tcase_add_test(tc, test_replay_forgets_acked);
    tcase_add_test(tc, test_replay_keyed_job_put_back);
    tcase_add_test(tc, test_replay_release_keeps_progress);
    tcase_add_test(tc, test_replay_dead_letter);
    tcase_add_test(tc, test_replay_purge_and_delete);
    tcase_add_test(tc, test_replay_dead_letter_after_publish_segment_is_gone);
    tcase_add_loop_test(tc, test_replay_refuses_live_message_without_publish, 0,
                        2);
    tcase_add_test(tc, test_replay_across_rolled_segments);
    tcase_add_test(tc, test_replay_counts_interrupted_delivery);
    tcase_add_test(tc, test_replay_interrupted_keep_their_order);
    tcase_add_test(tc, test_replay_interrupted_delivery_dead_letters_at_max);
    tcase_add_test(tc, test_replay_ended_delivery_is_not_interrupted);
    tcase_add_test(tc, test_replay_deliver_survives_compaction);
    suite_add_tcase(s, tc);
    return s;
}

int
main(void)
{
    SRunner *sr = srunner_create(journal_suite());
    int failed;

    log_set_level(LOG_WARN);
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    return failed == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
