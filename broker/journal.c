/*
 * journal.c: the bridge between the queues and the log (see journal.h).
 *
 * Records and when they are written (durable queues only):
 *   QUEUE_CREATE  on create, and again for every durable queue as the first
 *                 records of each new segment (so old segments can go)
 *   QUEUE_DELETE  on delete;  QUEUE_PURGE with the ids in flight that stay
 *   PUBLISH       on publish (the whole message and its state), and again
 *                 when compaction moves a live message forward
 *   ACK           on ack;  DROP on expiry, cancel, or a failed dead-letter
 *   REQUEUE       on every failed attempt or release (attempt, failures,
 *                 and when it becomes visible, as wall-clock time)
 *   DEAD_LETTER   when a message moves to its dead-letter queue (new body)
 *   PROGRESS      when a touch or release carries progress
 *   PUBLISH_BATCH instead of PUBLISH when one publish stores several
 *                 durable messages (a batch, a route's fan-out): one
 *                 record, so a crash keeps all of them or none; each
 *                 message's pub_* point at it (load_body finds its part)
 *   ROUTE_BIND    on bind, and again for every binding of a durable queue
 *                 after the queue definitions of each new segment;
 *                 ROUTE_UNBIND on unbind. A QUEUE_DELETE removes the
 *                 queue's bindings on replay as it did when it happened.
 *   DELIVER       the deliveries of one loop pass (id, attempt), appended
 *                 before the next other record or at journal_submit, so
 *                 the log keeps the order of events; nothing waits for
 *                 it. Compaction writes one after the PUBLISH of each
 *                 in-flight message it moves. It takes no segment
 *                 reference: it is never older than its message's
 *                 PUBLISH, which keeps its segment (deletion is
 *                 oldest-first), and once the message has a later state
 *                 record or is gone, replay ignores it.
 *
 * Segment references: every live durable message refs the segment of its
 * PUBLISH (or DEAD_LETTER) record (m->pub_seg) and of its latest state
 * record (m->state_seg); the store deletes the oldest segments once they
 * hold nothing live.
 *
 * Payload budget: the bodies of durable messages count against
 * payload_budget_bytes (by payload size). A message that becomes durable
 * while the budget is used up keeps no body in memory (m->body NULL); its
 * PUBLISH or DEAD_LETTER record (m->pub_seg, pub_off, pub_len) is read back
 * when it is delivered, dead-lettered or moved by compaction. So the
 * budget holds the oldest messages, which are delivered first, and memory
 * per message beyond it is the index entry alone. Replay applies the same
 * rule. Transient queues have no disk: their bodies always stay.
 *
 * journal_replay.c holds the other half: opening the log and replaying it
 * into the queues. What both files share (struct journal, the helpers the
 * replay calls) is in journal_int.h.
 */
#include "journal_int.h"

#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "body.h"
#include "clock.h"
#include "failpoint.h"
#include "log.h"
#include "mem.h"
#include "pqerr.h"
#include "pqlimits.h"
#include "queue.h"
#include "record.h"
#include "route.h"
#include "store.h"

enum { COMPACT_MSGS_PER_CALL = 20000 };

/* ---- clocks: the log stores wall time, the queues run on mono time ---- */

static uint64_t
mono_to_wall(const struct journal *j, uint64_t mono, bool never_zero)
{
    if (mono == 0) {
        return 0;
    }
    if (mono <= j->now_mono_ms) {
        return never_zero ? clock_wall_ms() : 0;
    }
    return clock_wall_ms() + (mono - j->now_mono_ms);
}

/* ---- appending ---- */

static int
encode(uint8_t **buf, size_t *cap, const struct record *r, size_t *len)
{
    ssize_t n = record_encoded_size(r);

    if (n < 0) {
        return (int)n;
    }
    if ((size_t)n > *cap) {
        size_t ncap = (size_t)n < 4096 ? 4096 : (size_t)n * 2;
        uint8_t *nb = pq_realloc(*buf, ncap);

        if (nb == NULL) {
            return PQ_ENOMEM;
        }
        *buf = nb;
        *cap = ncap;
    }
    n = record_encode(r, *buf, *cap);
    if (n < 0) {
        return (int)n;
    }
    *len = (size_t)n;
    return PQ_OK;
}

static void flush_delivered(struct journal *j);

static int
append(struct journal *j, const struct record *r, uint64_t *lsn,
       struct store_loc *loc)
{
    size_t len;
    int rc;

    /* The deliveries so far come first: replay reads a state record after
     * a DELIVER as the end of that delivery. */
    if (j->n_deliv > 0) {
        flush_delivered(j);
    }
    rc = encode(&j->buf, &j->cap, r, &len);

    if (rc == PQ_OK) {
        rc = store_append(j->st, r->type, j->buf, len, lsn, loc);
    }
    if (rc != PQ_OK) {
        j->append_errors++;
        j->last_error = rc;
    }
    return rc;
}

static struct rec_str
rstr(const char *s)
{
    struct rec_str r = {.ptr = s ? s : "", .len = s ? (uint32_t)strlen(s) : 0};
    return r;
}

static void
queue_create_rec(struct record *r, const struct queue *q)
{
    memset(r, 0, sizeof(*r));
    r->type = REC_QUEUE_CREATE;
    r->u.queue_create.name = rstr(queue_name(q));
    r->u.queue_create.attrs = *queue_attrs(q);
}

bool
journal_durable(const struct queue *q)
{
    return q != NULL && !queue_attrs(q)->transient;
}

static void
route_rec(struct record *r, uint8_t type, const char *route, const char *queue,
          const char *pattern)
{
    memset(r, 0, sizeof(*r));
    r->type = type;
    r->u.route.route = rstr(route);
    r->u.route.queue = rstr(queue);
    r->u.route.pattern = rstr(pattern);
}

struct roll_walk {
    struct journal *j;
    uint32_t seg;
    uint8_t *buf;
    size_t cap;
};

/* A binding of a durable queue, rewritten at the start of a segment. */
static void
roll_binding(void *arg, const char *route, const char *queue,
             const char *pattern)
{
    struct roll_walk *w = arg;
    struct record r;
    size_t len;

    if (!journal_durable(qset_find(w->j->qs, queue))) {
        return;
    }
    route_rec(&r, REC_ROUTE_BIND, route, queue, pattern);
    if (encode(&w->buf, &w->cap, &r, &len) != PQ_OK ||
        store_append(w->j->st, r.type, w->buf, len, NULL, NULL) != PQ_OK) {
        log_warn("segment %u: could not write the binding of route %s to "
                 "queue %s",
                 w->seg, route, queue);
    }
}

/* Every new segment starts with the definitions of all durable queues and
 * their bindings. Its own buffer: the record that caused the roll is in
 * j->buf. */
void
journal_on_roll(void *arg, uint32_t new_seg)
{
    struct journal *j = arg;
    uint8_t *buf = NULL;
    size_t cap = 0, len;
    struct record r;

    for (struct queue *q = qset_first(j->qs); q; q = qset_next(q)) {
        if (!journal_durable(q)) {
            continue;
        }
        queue_create_rec(&r, q);
        if (encode(&buf, &cap, &r, &len) != PQ_OK ||
            store_append(j->st, r.type, buf, len, NULL, NULL) != PQ_OK) {
            log_warn("segment %u: could not write the definition of queue %s",
                     new_seg, queue_name(q));
        }
    }
    pq_free(buf);
    if (j->routes != NULL) {
        struct roll_walk w = {.j = j, .seg = new_seg};

        routes_foreach(j->routes, roll_binding, &w);
        pq_free(w.buf);
    }
}

/* ---- the payload budget ---- */

/* m (durable) now holds its body: keep it if the budget allows, else drop
 * it to the record on disk. */
static void
keep_or_evict(struct journal *j, struct msg *m)
{
    if (m->body == NULL) {
        return;
    }
    if (m->pub_len > 0 && j->resident + m->size > j->budget) {
        body_unref(&m->body);
        j->evicted++;
        return;
    }
    j->resident += m->size;
}

/* m (durable) leaves memory: give its budget back. */
void
journal_forget_body(struct journal *j, const struct msg *m)
{
    if (m->body != NULL) {
        j->resident -= m->size;
    }
}

/* batch_find: the publish of message id in batch b, into *out. */
static bool
batch_find(const struct rec_publish_batch *b, uint64_t id,
           struct rec_publish *out)
{
    struct rec_publish_batch copy = *b; /* out may overlay b (a union) */
    size_t cur = 0;

    while (record_batch_next(&copy, &cur, out)) {
        if (out->id == id) {
            return true;
        }
    }
    return false;
}

/* The body of message id in an atomic record (its dead letter or one of
 * its publishes) as a new reference in *out; false if it is not there. */
static bool
atomic_body(const struct rec_atomic *a, uint64_t id, struct body **out)
{
    struct rec_publish p;
    struct rec_bytes raw;
    struct record in;
    size_t cur = 0;

    if (record_atomic_inner(a, &in) == PQ_OK && in.type == REC_DEAD_LETTER &&
        in.u.dead_letter.id == id) {
        *out = body_new(in.u.dead_letter.body.ptr, in.u.dead_letter.body.len);
        return true;
    }
    while (record_atomic_next_publish(a, &cur, &raw, &p)) {
        if (p.id == id) {
            *out = body_new(p.body.ptr, p.body.len);
            return true;
        }
    }
    return false;
}

/* The body of message id from the record read back at loc (rc as
 * store_read gives it). A new reference, or NULL (logged). */
static struct body *
body_of_record(uint64_t id, const struct store_loc *loc, int rc, uint8_t type,
               const uint8_t *raw, size_t len)
{
    struct body *b = NULL;
    struct record r;

    if (rc != PQ_OK) {
        log_err("message %llu: reading its record back (segment %u offset "
                "%llu): %s",
                (unsigned long long)id, loc->seg, (unsigned long long)loc->off,
                pq_strerror(rc));
    } else if (record_decode(type, raw, len, &r) != PQ_OK) {
        log_err("message %llu: its record at segment %u offset %llu does "
                "not decode",
                (unsigned long long)id, loc->seg, (unsigned long long)loc->off);
    } else if (r.type == REC_PUBLISH && r.u.publish.id == id) {
        b = body_new(r.u.publish.body.ptr, r.u.publish.body.len);
    } else if (r.type == REC_DEAD_LETTER && r.u.dead_letter.id == id) {
        b = body_new(r.u.dead_letter.body.ptr, r.u.dead_letter.body.len);
    } else if (r.type == REC_PUBLISH_BATCH &&
               batch_find(&r.u.batch, id, &r.u.publish)) {
        b = body_new(r.u.publish.body.ptr, r.u.publish.body.len);
    } else if (r.type == REC_ATOMIC && atomic_body(&r.u.atomic, id, &b)) {
        /* found (b NULL: out of memory) */
    } else {
        log_err("message %llu: segment %u offset %llu holds another record "
                "(%s)",
                (unsigned long long)id, loc->seg, (unsigned long long)loc->off,
                record_type_name(type));
    }
    return b;
}

/* Read m's current body back from its record. A new reference or NULL. */
static struct body *
load_body(struct journal *j, const struct msg *m)
{
    struct store_loc loc = {
        .seg = m->pub_seg, .off = m->pub_off, .len = m->pub_len};
    uint8_t type = 0, *raw = NULL;
    struct body *b;
    size_t len = 0;
    int rc;

    if (m->pub_len == 0) {
        return NULL;
    }
    rc = store_read(j->st, &loc, &type, &raw, &len);
    b = body_of_record(m->id, &loc, rc, type, raw, len);
    pq_free(raw);
    return b;
}

/* ---- segment references ---- */

/* The live bytes of a segment (what compaction weighs) are those of the
 * PUBLISH records it holds for live messages. Callers unref before they
 * change m->pub_*, and ref after. */
void
journal_ref_msg(struct journal *j, struct msg *m)
{
    store_seg_ref(j->st, m->pub_seg, m->pub_len);
    store_seg_ref(j->st, m->state_seg, 0);
}

static void
unref_msg(struct journal *j, struct msg *m)
{
    store_seg_unref(j->st, m->pub_seg, m->pub_len);
    store_seg_unref(j->st, m->state_seg, 0);
}

/* m got a new state record at loc: move its state reference there. */
static void
move_state(struct journal *j, struct msg *m, uint32_t seg)
{
    store_seg_ref(j->st, seg, 0);
    store_seg_unref(j->st, m->state_seg, 0);
    m->state_seg = seg;
}

/* ---- writing ---- */

int
journal_queue_create(struct journal *j, struct queue *q, uint64_t *lsn)
{
    struct record r;

    queue_create_rec(&r, q);
    return append(j, &r, lsn, NULL);
}

int
journal_route(struct journal *j, bool bind, const char *route,
              const char *queue, const char *pattern, uint64_t *lsn)
{
    struct record r;

    route_rec(&r, bind ? REC_ROUTE_BIND : REC_ROUTE_UNBIND, route, queue,
              pattern);
    return append(j, &r, lsn, NULL);
}

static void
unref_cb(void *arg, struct msg *m)
{
    unref_msg(arg, m);
    journal_forget_body(arg, m);
}

int
journal_queue_delete(struct journal *j, struct queue *q, uint64_t *lsn)
{
    struct record r = {.type = REC_QUEUE_DELETE};
    int rc;

    r.u.queue_delete.name = rstr(queue_name(q));
    rc = append(j, &r, lsn, NULL);
    if (rc == PQ_OK) {
        queue_foreach_msg(q, unref_cb, j);
        store_reserve_set(j->st,
                          store_reserve_count(j->st) - queue_total_count(q));
    }
    return rc;
}

struct purge_walk {
    struct journal *j;
    uint64_t *keep;
    uint32_t n_keep, cap;
    uint64_t gone;
    bool oom;
};

static void
purge_cb(void *arg, struct msg *m)
{
    struct purge_walk *w = arg;

    if (m->state == MSG_INFLIGHT) {
        if (w->n_keep == w->cap) {
            uint32_t cap = w->cap ? w->cap * 2 : 64;
            uint64_t *k = pq_realloc(w->keep, cap * sizeof(*k));

            if (k == NULL) {
                w->oom = true;
                return;
            }
            w->keep = k;
            w->cap = cap;
        }
        w->keep[w->n_keep++] = m->id;
    }
}

static void
purge_unref_cb(void *arg, struct msg *m)
{
    struct purge_walk *w = arg;

    if (m->state != MSG_INFLIGHT) {
        unref_msg(w->j, m);
        journal_forget_body(w->j, m);
        w->gone++;
    }
}

int
journal_queue_purge(struct journal *j, struct queue *q, uint64_t *lsn)
{
    struct purge_walk w = {.j = j};
    struct record r = {.type = REC_QUEUE_PURGE};
    int rc;

    queue_foreach_msg(q, purge_cb, &w);
    if (w.oom) {
        rc = PQ_ENOMEM;
        goto out;
    }
    r.u.queue_purge.name = rstr(queue_name(q));
    r.u.queue_purge.n_keep = w.n_keep;
    r.u.queue_purge.keep_ids = w.keep;
    rc = append(j, &r, lsn, NULL);
    if (rc == PQ_OK) {
        queue_foreach_msg(q, purge_unref_cb, &w);
        store_reserve_set(j->st, store_reserve_count(j->st) - w.gone);
    }
out:
    pq_free(w.keep);
    return rc;
}

static void
publish_rec_from_pending(const struct journal *j, struct record *r,
                         const struct pending *p, struct rec_kv *req)
{
    const struct msg_new *mn = &p->mn;

    memset(r, 0, sizeof(*r));
    r->type = REC_PUBLISH;
    r->u.publish.id = mn->id;
    r->u.publish.queue = rstr(queue_name(p->q));
    r->u.publish.priority = mn->priority;
    r->u.publish.published_wall_ms = mn->published_wall_ms;
    r->u.publish.deliver_at_wall_ms = mono_to_wall(j, mn->due_ms, false);
    r->u.publish.expire_wall_ms = mono_to_wall(j, mn->expire_ms, true);
    r->u.publish.idem_key = rstr(p->idem_key);
    for (size_t i = 0; i < mn->n_requires; i++) {
        req[i].key = rstr(p->requires[i].key);
        req[i].value = rstr(p->requires[i].value);
    }
    r->u.publish.n_requires = (uint32_t)mn->n_requires;
    r->u.publish.requires = req;
    r->u.publish.body.ptr = mn->body->data;
    r->u.publish.body.len = mn->body->len;
}

/* Does p need a record (a new message in a durable queue)? */
static bool
needs_record(const struct pending *p)
{
    return !p->duplicate && p->q != NULL && journal_durable(p->q);
}

/* How many of items need a record. */
static uint32_t
count_records(const struct pending *items, uint32_t n)
{
    uint32_t count = 0;

    for (uint32_t i = 0; i < n; i++) {
        count += needs_record(&items[i]);
    }
    return count;
}

int
journal_publish_check(struct journal *j, const struct pending *items,
                      uint32_t n)
{
    uint64_t bytes = 0;

    for (uint32_t i = 0; i < n; i++) {
        if (needs_record(&items[i])) {
            bytes += items[i].mn.body->len + 128;
        }
    }
    return store_space_check(j->st, count_records(items, n), bytes);
}

/* p's record is at loc: where its body is, and a hold on the segment
 * until the publish settles (journal_publish_settled): the write may
 * complete, and the segment be collected, before the message takes its
 * own references. */
static void
placed(struct journal *j, struct pending *p, const struct store_loc *loc)
{
    p->mn.pub_seg = p->mn.state_seg = loc->seg;
    p->mn.pub_off = (uint32_t)loc->off;
    p->mn.pub_len = loc->len;
    store_seg_hold(j->st, loc->seg);
    p->seg_held = true;
}

/*
 * append_with: inner (a job's end: ACK, DROP or DEAD_LETTER) and the
 * messages of pubs that need a record, as ONE record: inner alone when
 * none does, a REC_ATOMIC otherwise. *loc: where it went.
 */
static int
append_with(struct journal *j, const struct record *inner, struct pending *pubs,
            uint32_t n, uint64_t *lsn, struct store_loc *loc)
{
    uint32_t count = count_records(pubs, n), k = 0;
    struct rec_publish *recs = NULL;
    struct rec_kv *req = NULL;
    struct record r = {.type = REC_ATOMIC};
    int rc = PQ_ENOMEM;

    if (count == 0) {
        return append(j, inner, lsn, loc);
    }
    recs = pq_calloc(count, sizeof(*recs));
    req = pq_calloc((size_t)count * PQ_TAGS_MAX, sizeof(*req));
    if (recs == NULL || req == NULL) {
        goto out;
    }
    for (uint32_t i = 0; i < n; i++) {
        struct record one;

        if (!needs_record(&pubs[i])) {
            continue;
        }
        if (pubs[i].mn.n_requires > PQ_TAGS_MAX) {
            rc = PQ_EINVAL;
            goto out;
        }
        publish_rec_from_pending(j, &one, &pubs[i], req + k * PQ_TAGS_MAX);
        recs[k++] = one.u.publish;
    }
    r.u.atomic.inner_type = inner->type;
    r.u.atomic.inner = inner;
    r.u.atomic.n = count;
    r.u.atomic.pubs = recs;
    rc = append(j, &r, lsn, loc);
    if (rc != PQ_OK) {
        goto out;
    }
    for (uint32_t i = 0; i < n; i++) {
        if (needs_record(&pubs[i])) {
            placed(j, &pubs[i], loc);
        }
    }
out:
    pq_free(req);
    pq_free(recs);
    return rc;
}

int
journal_publish(struct journal *j, struct pending *items, uint32_t n,
                uint64_t now_mono_ms, uint64_t *lsn)
{
    /* One message (the common case) needs no heap: its record and
     * requirements live here. */
    struct rec_kv one_req[1][PQ_TAGS_MAX];
    struct rec_publish one_rec;
    struct rec_kv(*req)[PQ_TAGS_MAX] = one_req;
    struct rec_publish *recs = &one_rec;
    struct store_loc loc;
    struct record r;
    uint32_t count;
    int rc;

    j->now_mono_ms = now_mono_ms;
    for (uint32_t i = 0; i < n; i++) {
        if (needs_record(&items[i]) && items[i].mn.n_requires > PQ_TAGS_MAX) {
            return PQ_EINVAL;
        }
    }
    count = count_records(items, n);
    if (count == 0) {
        return PQ_OK;
    }
    rc = journal_publish_check(j, items, n);
    if (rc != PQ_OK) {
        return rc;
    }
    if (count > 1) {
        recs = pq_calloc(count, sizeof(*recs));
        req = pq_calloc(count, sizeof(*req));
        if (recs == NULL || req == NULL) {
            rc = PQ_ENOMEM;
            goto out;
        }
    }
    count = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (needs_record(&items[i])) {
            publish_rec_from_pending(j, &r, &items[i], req[count]);
            recs[count++] = r.u.publish;
        }
    }
    /* One record for all of them: a crash keeps every message of the
     * publish or none. */
    if (count == 1) {
        r.type = REC_PUBLISH;
        r.u.publish = recs[0];
    } else {
        memset(&r, 0, sizeof(r));
        r.type = REC_PUBLISH_BATCH;
        r.u.batch.n = count;
        r.u.batch.items = recs;
    }
    rc = append(j, &r, lsn, &loc);
    if (rc != PQ_OK) {
        goto out;
    }
    for (uint32_t i = 0; i < n; i++) {
        if (needs_record(&items[i])) {
            placed(j, &items[i], &loc);
        }
    }
out:
    if (recs != &one_rec) {
        pq_free(recs);
        pq_free(req);
    }
    return rc;
}

void
journal_publish_settled(struct journal *j, struct pending *p)
{
    if (p->seg_held && j != NULL && j->st != NULL) {
        store_seg_release(j->st, p->mn.pub_seg);
    }
    p->seg_held = false;
}

/* May a message of size bytes, on disk if pub_len > 0, keep its body? */
bool
journal_budget_allows(struct journal *j, uint32_t size, uint32_t pub_len)
{
    if (pub_len > 0 && j->resident + size > j->budget) {
        j->evicted++;
        return false;
    }
    return true;
}

bool
journal_keep_body(struct journal *j, const struct msg_new *mn)
{
    return mn->body == NULL || journal_budget_allows(j, mn->size, mn->pub_len);
}

/* mn entered a durable queue as pushed: segment refs, resident bytes. */
static void
stored_new(struct journal *j, const struct msg_new *mn)
{
    store_seg_ref(j->st, mn->pub_seg, mn->pub_len);
    store_seg_ref(j->st, mn->state_seg, 0);
    if (mn->body != NULL) {
        j->resident += mn->size;
    }
}

void
journal_msg_stored(struct journal *j, const struct msg_new *mn)
{
    stored_new(j, mn);
}

void
journal_pin(struct journal *j, const struct msg_new *mn)
{
    store_seg_ref(j->st, mn->pub_seg, mn->pub_len);
}

/* A job's end without a record of its own (its queue is transient): the
 * messages it causes as plain PUBLISH records. */
static int
publish_alone(struct journal *j, struct pending *pubs, uint32_t n,
              uint64_t *lsn)
{
    return count_records(pubs, n) > 0
               ? journal_publish(j, pubs, n, j->now_mono_ms, lsn)
               : PQ_OK;
}

int
journal_ack(struct journal *j, struct msg *m, struct pending *pubs, uint32_t n,
            uint64_t *lsn)
{
    struct record r = {.type = REC_ACK};
    struct store_loc loc;
    int rc;

    if (!journal_durable(m->q)) {
        return publish_alone(j, pubs, n, lsn);
    }
    r.u.ack.id = m->id;
    rc = append_with(j, &r, pubs, n, lsn, &loc);
    unref_msg(j, m);
    journal_forget_body(j, m);
    return rc;
}

/* A PUBLISH carrying m's whole current state (compaction, or a message
 * that moves from a transient queue into a durable one). */
static int
republish(struct journal *j, struct msg *m, struct store_loc *loc)
{
    struct rec_kv req[PQ_TAGS_MAX];
    size_t n_req = 0;
    const struct kv *kv = msg_requires(m, &n_req);
    struct body *prog = msg_progress(m);
    struct record r = {.type = REC_PUBLISH};

    struct body *b = m->body ? body_ref(m->body) : load_body(j, m);
    int rc;

    if (b == NULL || n_req > sizeof(req) / sizeof(req[0])) {
        body_unref(&b);
        return b == NULL ? PQ_EIO : PQ_EINVAL;
    }
    for (size_t i = 0; i < n_req; i++) {
        req[i].key = rstr(kv[i].key);
        req[i].value = rstr(kv[i].value);
    }
    r.u.publish.id = m->id;
    r.u.publish.queue = rstr(queue_name(m->q));
    r.u.publish.priority = m->priority;
    r.u.publish.attempt = m->attempt;
    r.u.publish.failures = m->failures;
    r.u.publish.published_wall_ms = m->published_wall_ms;
    r.u.publish.deliver_at_wall_ms =
        m->state == MSG_DELAYED ? mono_to_wall(j, m->due_ms, false) : 0;
    r.u.publish.expire_wall_ms = mono_to_wall(j, m->expire_ms, true);
    r.u.publish.idem_key = rstr(msg_idem_key(m));
    r.u.publish.n_requires = (uint32_t)n_req;
    r.u.publish.requires = req;
    if (prog) {
        r.u.publish.progress.ptr = prog->data;
        r.u.publish.progress.len = prog->len;
    }
    r.u.publish.body.ptr = b->data;
    r.u.publish.body.len = b->len;
    rc = append(j, &r, NULL, loc);
    body_unref(&b);
    return rc;
}

static void
write_progress(struct journal *j, struct msg *m)
{
    struct body *prog = msg_progress(m);
    struct record r = {.type = REC_PROGRESS};
    struct store_loc loc;

    if (prog == NULL) {
        return;
    }
    r.u.progress.id = m->id;
    r.u.progress.progress.ptr = prog->data;
    r.u.progress.progress.len = prog->len;
    if (append(j, &r, NULL, &loc) == PQ_OK) {
        move_state(j, m, loc.seg);
    }
}

/*
 * warn_unwritten: a state record could not be written (disk full, most
 * likely). Its message then comes back as the log last had it after a
 * restart: at-least-once still holds. Logged at most once per 10 s with a
 * count, since a full disk fails every record in a row.
 */
static void
warn_unwritten(struct journal *j, const struct qevent *ev, int rc)
{
    uint64_t now = j->now_mono_ms;

    j->unwritten++;
    if (j->unwritten_logged_ms != 0 && now - j->unwritten_logged_ms < 10000) {
        return;
    }
    log_warn("queue %s: message %llu: %s record not written: %s (%llu such "
             "records since the last warning); after a restart it comes back "
             "as last recorded",
             queue_name(ev->q), (unsigned long long)ev->m->id,
             ev->type == QEV_DROP ? "drop" : "state", pq_strerror(rc),
             (unsigned long long)j->unwritten);
    j->unwritten = 0;
    j->unwritten_logged_ms = now;
}

int
journal_qevent(struct journal *j, const struct qevent *ev, uint64_t now_mono_ms,
               struct pending *pubs, uint32_t n)
{
    struct msg *m = ev->m;
    struct store_loc loc;
    struct record r;
    uint64_t lsn;
    int rc = PQ_OK;

    j->now_mono_ms = now_mono_ms;
    memset(&r, 0, sizeof(r));
    switch (ev->type) {
    case QEV_REQUEUE:
        if (!journal_durable(ev->q)) {
            return PQ_OK;
        }
        r.type = REC_REQUEUE;
        r.u.requeue.id = m->id;
        r.u.requeue.attempt = m->attempt;
        r.u.requeue.failures = m->failures;
        r.u.requeue.deliver_at_wall_ms =
            m->state == MSG_DELAYED ? mono_to_wall(j, m->due_ms, false) : 0;
        rc = append(j, &r, NULL, &loc);
        if (rc == PQ_OK) {
            move_state(j, m, loc.seg);
            if (ev->reason == QR_RELEASE) {
                write_progress(j, m);
            }
        }
        break;
    case QEV_TOUCH:
        if (journal_durable(ev->q)) {
            write_progress(j, m);
        }
        break;
    case QEV_DROP:
        if (!journal_durable(ev->q)) {
            rc = publish_alone(j, pubs, n, &lsn);
            break;
        }
        /* An in-flight cancel was recorded when it happened
         * (journal_cancel); recording it twice would take a second ack
         * reservation from the store. */
        if (!msg_is_cancelled(m)) {
            r.type = REC_DROP;
            r.u.drop.id = m->id;
            r.u.drop.reason = rstr(qreason_name(ev->reason));
            rc = append_with(j, &r, pubs, n, &lsn, &loc);
        }
        unref_msg(j, m);
        journal_forget_body(j, m);
        break;
    case QEV_DEAD_LETTER:
        if (m->body == NULL &&
            (journal_durable(ev->from) || journal_durable(ev->q))) {
            /* Evicted: queue.c moved it without its body; add the x-death
             * headers to the body read back from the log. */
            struct body *old = load_body(j, m);

            m->body =
                old ? body_with_headers(old, ev->headers, ev->n_headers) : NULL;
            body_unref(&old);
            if (m->body == NULL) {
                log_err("queue %s: message %llu: dead-lettered without its "
                        "body (it could not be read back)",
                        queue_name(ev->q), (unsigned long long)m->id);
            } else if (journal_durable(ev->from)) {
                j->resident += m->size; /* counted below like a kept body */
            }
        }
        if (journal_durable(ev->from) && journal_durable(ev->q)) {
            r.type = REC_DEAD_LETTER;
            r.u.dead_letter.id = m->id;
            r.u.dead_letter.target = rstr(queue_name(ev->q));
            r.u.dead_letter.reason = rstr(qreason_name(ev->reason));
            r.u.dead_letter.body.ptr = m->body ? m->body->data : NULL;
            r.u.dead_letter.body.len = m->body ? m->body->len : 0;
            rc = append_with(j, &r, pubs, n, &lsn, &loc);
            /* Only a written record moves the message on disk. If it was
             * not written, the log still has it in the source queue (it
             * comes back there after a restart) and its old references
             * keep that record alive. */
            if (rc == PQ_OK) {
                unref_msg(j, m);
                m->pub_seg = m->state_seg = loc.seg;
                m->pub_off = (uint32_t)loc.off;
                m->pub_len = loc.len;
                journal_ref_msg(j, m);
            }
        } else if (journal_durable(ev->from)) {
            r.type = REC_DROP;
            r.u.drop.id = m->id;
            r.u.drop.reason = rstr("dead-lettered to a transient queue");
            rc = append_with(j, &r, pubs, n, &lsn, &loc);
            unref_msg(j, m);
            journal_forget_body(j, m);
            m->pub_len = 0;
        } else if (journal_durable(ev->q)) {
            /* From a transient queue: its first record. Not written, it
             * stays in memory only (as it was) and has no references. */
            rc = republish(j, m, &loc);
            if (rc == PQ_OK) {
                m->pub_seg = m->state_seg = loc.seg;
                m->pub_off = (uint32_t)loc.off;
                m->pub_len = loc.len;
                journal_ref_msg(j, m);
                keep_or_evict(j, m);
            } else {
                m->pub_len = 0;
            }
            if (rc == PQ_OK) {
                rc = publish_alone(j, pubs, n, &lsn);
            }
        } else {
            rc = publish_alone(j, pubs, n, &lsn);
        }
        break;
    case QEV_READY:
        break;
    }
    if (rc != PQ_OK) {
        warn_unwritten(j, ev, rc);
    }
    return rc;
}

int
journal_cancel(struct journal *j, struct msg *m, struct pending *pubs,
               uint32_t n)
{
    struct record r = {.type = REC_DROP};
    struct store_loc loc;
    uint64_t lsn;

    if (!journal_durable(m->q)) {
        return publish_alone(j, pubs, n, &lsn);
    }
    r.u.drop.id = m->id;
    r.u.drop.reason = rstr(qreason_name(QR_CANCELLED));
    return append_with(j, &r, pubs, n, &lsn, &loc);
}

uint64_t
journal_errors(struct journal *j, int *last)
{
    if (last != NULL) {
        *last = j->last_error;
    }
    return j->append_errors;
}

void
journal_urgent(struct journal *j)
{
    store_urgent(j->st);
}

uint64_t
journal_last_lsn(struct journal *j)
{
    return store_last_lsn(j->st);
}

struct body *
journal_load_body(struct journal *j, struct msg *m)
{
    return load_body(j, m);
}

int
journal_load_start(struct journal *j, const struct msg *m)
{
    struct store_loc loc = {
        .seg = m->pub_seg, .off = m->pub_off, .len = m->pub_len};
    int rc;

    if (m->pub_len == 0) {
        return PQ_EINVAL;
    }
    store_seg_hold(j->st, loc.seg); /* no deletion under the reader */
    rc = store_read_submit(j->st, m->id, &loc);
    if (rc != PQ_OK) {
        store_seg_release(j->st, loc.seg);
    }
    return rc;
}

struct loads {
    struct journal *j;
    journal_loaded_fn fn;
    void *arg;
};

static void
loaded(void *arg, uint64_t id, const struct store_loc *loc, int rc,
       uint8_t type, uint8_t *raw, size_t len)
{
    struct loads *l = arg;
    struct body *b = body_of_record(id, loc, rc, type, raw, len);

    pq_free(raw);
    store_seg_release(l->j->st, loc->seg);
    l->fn(l->arg, id, b);
}

void
journal_reap_loads(struct journal *j, journal_loaded_fn fn, void *arg)
{
    struct loads l = {j, fn, arg};

    store_read_reap(j->st, loaded, &l);
}

/* ---- deliveries ---- */

void
journal_delivered(struct journal *j, const struct msg *m)
{
    if (!journal_durable(m->q)) {
        return;
    }
    if (j->n_deliv == j->cap_deliv) {
        uint32_t cap = j->cap_deliv ? j->cap_deliv * 2 : 256;
        struct rec_deliver_item *d = pq_realloc(j->deliv, cap * sizeof(*d));

        if (d == NULL) {
            j->deliv_unwritten++; /* as a record that was not written */
            return;
        }
        j->deliv = d;
        j->cap_deliv = cap;
    }
    j->deliv[j->n_deliv].id = m->id;
    j->deliv[j->n_deliv].attempt = m->attempt;
    j->n_deliv++;
}

/* The pending deliveries as one REC_DELIVER. Its failure (a full disk) is
 * no append error (a publish's confirm does not depend on it): logged at
 * most every 10 s; those deliveries are then not counted after a crash. */
static void
flush_delivered(struct journal *j)
{
    struct record r = {.type = REC_DELIVER};
    uint64_t now;
    size_t len;
    int rc;

    r.u.deliver.n = j->n_deliv;
    r.u.deliver.items = j->deliv;
    j->n_deliv = 0;
    rc = encode(&j->buf, &j->cap, &r, &len);
    if (rc == PQ_OK) {
        rc = store_append(j->st, r.type, j->buf, len, NULL, NULL);
    }
    if (rc == PQ_OK) {
        return;
    }
    j->deliv_unwritten += r.u.deliver.n;
    now = clock_mono_ms();
    if (j->deliv_logged_ms == 0 || now - j->deliv_logged_ms >= 10000) {
        log_warn("deliveries not recorded: %s (%llu since the last warning); "
                 "after a crash those jobs come back with their attempt as "
                 "before the delivery",
                 pq_strerror(rc), (unsigned long long)j->deliv_unwritten);
        j->deliv_unwritten = 0;
        j->deliv_logged_ms = now;
    }
}

void
journal_submit(struct journal *j)
{
    if (j->n_deliv > 0) {
        flush_delivered(j);
    }
    store_submit(j->st);
}

void
journal_reap(struct journal *j,
             void (*done)(void *arg, uint64_t upto_lsn, int status), void *arg)
{
    store_reap(j->st, done, arg);
}

/* ---- compaction ---- */

struct compact_walk {
    struct journal *j;
    uint32_t seg;
    uint32_t moved;
};

static void
compact_cb(void *arg, struct msg *m)
{
    struct compact_walk *w = arg;
    struct store_loc loc;

    /* A cancelled message's DROP is already in the log; a new PUBLISH
     * after it would bring it back on replay. It pins its segment until
     * its holder answers (a lease at most). */
    if (w->moved >= COMPACT_MSGS_PER_CALL || msg_is_cancelled(m) ||
        (m->pub_seg != w->seg && m->state_seg != w->seg)) {
        return;
    }
    if (republish(w->j, m, &loc) != PQ_OK) {
        return;
    }
    unref_msg(w->j, m);
    m->pub_seg = m->state_seg = loc.seg;
    m->pub_off = (uint32_t)loc.off;
    m->pub_len = loc.len;
    journal_ref_msg(w->j, m);
    if (m->state == MSG_INFLIGHT) {
        /* Its DELIVER may go with the old segment: write it again after
         * the new PUBLISH. */
        journal_delivered(w->j, m);
    }
    w->moved++;
    if (w->moved % 256 == 0) {
        /* Hand over what is moved so far: a long pass reaches the disk in
         * pieces. */
        journal_submit(w->j);
    }
    failpoint("compaction");
}

void
journal_compact(struct journal *j, uint64_t now_mono_ms)
{
    struct compact_walk w = {.j = j};

    j->now_mono_ms = now_mono_ms;
    if (store_compact_candidate(j->st, &w.seg) != PQ_OK) {
        return;
    }
    for (struct queue *q = qset_first(j->qs); q; q = qset_next(q)) {
        if (journal_durable(q)) {
            queue_foreach_msg(q, compact_cb, &w);
        }
    }
    if (w.moved > 0) {
        log_info("compaction: moved %u live messages out of segment %u",
                 w.moved, w.seg);
    }
}

void
journal_close(struct journal *j)
{
    int rc;

    if (j == NULL) {
        return;
    }
    if (j->st != NULL && j->n_deliv > 0) {
        flush_delivered(j);
    }
    if (j->st) {
        rc = store_close(j->st);
        if (rc != PQ_OK) {
            log_err("closing the log: %s", pq_strerror(rc));
        }
    }
    pq_free(j->buf);
    pq_free(j->deliv);
    pq_free(j->interrupted);
    pq_free(j);
}

uint64_t
journal_next_id(const struct journal *j)
{
    return j->next_id;
}

int
journal_event_fd(const struct journal *j)
{
    return store_event_fd(j->st);
}

void
journal_store_stats(struct journal *j, struct store_stats *out)
{
    store_get_stats(j->st, out);
}

uint64_t
journal_resident_bytes(const struct journal *j)
{
    return j->resident;
}
