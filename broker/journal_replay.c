/*
 * journal_replay.c: opening the journal (see journal.h): the data dir, the
 * store, and the replay of the log into the queue set. journal.c writes the
 * records replayed here; its opening comment lists them, with the segment
 * references and the payload budget that replay rebuilds.
 *
 * Replay: records are applied in log order with the queue listener off.
 * Nothing is in flight after a restart: every message comes back READY, or
 * DELAYED while its deliver-at time is in the future, with the attempt and
 * failure counts of its last record.
 *
 * Deliveries: a DELIVER names messages handed out (id, attempt). One that
 * is live, at that attempt or later than its own record says, and has no
 * state record after the DELIVER (PUBLISH, REQUEUE, DEAD_LETTER, ACK,
 * DROP each end it) was running when the broker stopped: journal_resume
 * makes it a failed attempt once the listener is set. A DELIVER about a
 * message replay does not hold (acked, its PUBLISH in a deleted segment)
 * is ignored: it never brings one back.
 */
#include "journal_int.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "body.h"
#include "clock.h"
#include "hmap.h"
#include "log.h"
#include "mem.h"
#include "pbwire.h"
#include "pqerr.h"
#include "pqlimits.h"
#include "queue.h"
#include "record.h"
#include "route.h"
#include "store.h"

/* Room for one requirement key or value and its NUL. */
enum { KEY_CAP = PQ_TAG_BYTES_MAX + 1 };

/*
 * data_dir_ensure: dir exists as a directory, or is created (mode 0750,
 * logged at warn) when its parent exists. A missing parent is an error: a
 * mistyped data_dir must not start an empty broker somewhere new.
 */
static int
data_dir_ensure(const char *dir, char *err, size_t errlen)
{
    char parent[CONFIG_PATH_MAX];
    size_t len = strlen(dir);
    struct stat st;
    char *slash;

    if (len == 0 || len >= sizeof(parent)) {
        snprintf(err, errlen, "data_dir \"%s\": bad path", dir);
        return PQ_EINVAL;
    }
    if (stat(dir, &st) == 0) {
        if (!S_ISDIR(st.st_mode)) {
            snprintf(err, errlen, "data_dir %s is not a directory", dir);
            return PQ_EINVAL;
        }
        return PQ_OK;
    }
    if (errno != ENOENT) {
        snprintf(err, errlen, "data_dir %s: %s", dir, strerror(errno));
        return PQ_ESYS;
    }
    memcpy(parent, dir, len + 1);
    while (len > 1 && parent[len - 1] == '/') {
        parent[--len] = '\0';
    }
    slash = strrchr(parent, '/');
    if (slash == NULL) {
        snprintf(parent, sizeof(parent), ".");
    } else if (slash == parent) {
        parent[1] = '\0';
    } else {
        *slash = '\0';
    }
    if (stat(parent, &st) != 0 || !S_ISDIR(st.st_mode)) {
        snprintf(err, errlen,
                 "data_dir %s does not exist, nor its parent %s: create it "
                 "(mkdir -p) or correct data_dir",
                 dir, parent);
        return PQ_ENOTFOUND;
    }
    if (mkdir(dir, 0750) != 0 && errno != EEXIST) {
        snprintf(err, errlen, "mkdir %s: %s", dir, strerror(errno));
        return PQ_ESYS;
    }
    log_warn("data_dir %s did not exist: created it (empty)", dir);
    return PQ_OK;
}

/* The length of the first length-delimited field num of an encoded
 * protoq.Message, walking the top-level fields with bounds checks; 0 if
 * absent or malformed (the body was CRC-checked, so malformed means a
 * bug). */
static size_t
message_field_len(const uint8_t *data, size_t len, uint32_t num)
{
    const uint8_t *p = data, *end = data + len;
    struct pbwire_field f;

    while (p < end && pbwire_next_field(&p, end, &f)) {
        if (f.num == num && f.type == PBWIRE_LEN) {
            return f.len;
        }
    }
    return 0;
}

/* message_payload_size: the payload length (field 1), for the max_bytes
 * accounting of replayed messages. */
static uint32_t
message_payload_size(const uint8_t *data, size_t len)
{
    return (uint32_t)message_field_len(data, len, 1);
}

/* message_has_reply_to: the message names a reply_to (field 9, not
 * empty): its end is told there (msg_new.reply). */
static bool
message_has_reply_to(const uint8_t *data, size_t len)
{
    return message_field_len(data, len, 9) > 0;
}

/* wall_to_mono: a wall-clock time from the log on this start's monotonic
 * clock (both read once at open); a time already past becomes 0, or the
 * open's mono time when never_zero. 0 stays 0. */
static uint64_t
wall_to_mono(const struct journal *j, uint64_t wall, bool never_zero)
{
    if (wall == 0) {
        return 0;
    }
    if (wall <= j->wall_at_open) {
        return never_zero ? j->mono_at_open : 0;
    }
    return j->mono_at_open + (wall - j->wall_at_open);
}

/* ---- replay ---- */

/*
 * The live-message check at start (what store_verify.c does for
 * --check-data, here without a map of its own: the queue set is the live
 * set). A REQUEUE or PROGRESS record for a message replay does not hold is
 * a suspect: its PUBLISH was lost with a segment, unless a later record
 * explains it (a PUBLISH moved by compaction, an ACK or DROP, a queue
 * delete or purge). What is left at the end refuses the start.
 */
struct suspect {
    struct store_loc at; /* the state record */
    uint64_t idx;        /* j->replayed when it was seen */
};

static int
suspect_add(struct journal *j, uint64_t id, const struct store_loc *loc)
{
    struct suspect *s = hmap_u64_get(&j->suspects, id);

    if (s == NULL) {
        s = pq_malloc(sizeof(*s));
        if (s == NULL) {
            return PQ_ENOMEM;
        }
        if (hmap_u64_put(&j->suspects, id, s) != PQ_OK) {
            pq_free(s);
            return PQ_ENOMEM;
        }
    }
    s->at = *loc;
    s->idx = j->replayed;
    return PQ_OK;
}

static void
suspect_clear(struct journal *j, uint64_t id)
{
    if (j->suspects.len > 0) {
        pq_free(hmap_u64_del(&j->suspects, id));
    }
}

static void
suspects_free(struct journal *j)
{
    size_t it = 0;
    void *s;

    while ((s = hmap_u64_next(&j->suspects, &it, NULL)) != NULL) {
        pq_free(s);
    }
    hmap_u64_fini(&j->suspects);
}

/* ---- deliveries (see the file comment) ---- */

/* The map's value: the attempt in the high half and the delivery's place
 * in the log (each item of each DELIVER record counted) in the low half
 * (never NULL: attempt >= 1), so the interrupted deliveries go back in
 * the order they were made, also those of one record. */
static void *
deliver_pack(uint32_t attempt, uint64_t idx)
{
    return (void *)(uintptr_t)(((uint64_t)attempt << 32) | (uint32_t)idx);
}

/* A state record about id ends whatever delivery of it came before. */
static void
delivered_clear(struct journal *j, uint64_t id)
{
    if (j->delivered.len > 0) {
        (void)hmap_u64_del(&j->delivered, id);
    }
}

static int
replay_deliver(struct journal *j, const struct rec_deliver *d)
{
    struct msg view;

    for (uint32_t i = 0; i < d->n; i++) {
        struct rec_deliver_item it = record_deliver_item(d, i);

        if (it.attempt == 0 || !qset_msg_peek(j->qs, it.id, &view) ||
            it.attempt < view.attempt) {
            continue;
        }
        (void)hmap_u64_del(&j->delivered, it.id);
        if (hmap_u64_put(&j->delivered, it.id,
                         deliver_pack(it.attempt, ++j->delivered_seq)) !=
            PQ_OK) {
            return PQ_ENOMEM;
        }
    }
    return PQ_OK;
}

static int
interrupted_cmp(const void *a, const void *b)
{
    const uint64_t *x = a, *y = b;

    return (uint32_t)x[1] < (uint32_t)y[1] ? -1
                                           : (uint32_t)x[1] > (uint32_t)y[1];
}

/* After replay: the deliveries still running at the stop, in the order
 * they were made, into j->interrupted; the map goes. */
static int
collect_interrupted(struct journal *j)
{
    size_t n = hmap_u64_len(&j->delivered), k = 0, it = 0;
    uint64_t(*tmp)[2] = NULL, id;
    struct msg view;
    void *v;
    int rc = PQ_OK;

    if (n == 0) {
        goto out;
    }
    tmp = pq_calloc(n, sizeof(*tmp));
    j->interrupted = pq_calloc(n, sizeof(*j->interrupted));
    if (tmp == NULL || j->interrupted == NULL) {
        rc = PQ_ENOMEM;
        goto out;
    }
    while ((v = hmap_u64_next(&j->delivered, &it, &id)) != NULL) {
        if (qset_msg_peek(j->qs, id, &view)) {
            tmp[k][0] = id;
            tmp[k][1] = (uint64_t)(uintptr_t)v;
            k++;
        }
    }
    qsort(tmp, k, sizeof(*tmp), interrupted_cmp);
    for (size_t i = 0; i < k; i++) {
        j->interrupted[i].id = tmp[i][0];
        j->interrupted[i].attempt = (uint32_t)(tmp[i][1] >> 32);
    }
    j->n_interrupted = (uint32_t)k;
out:
    pq_free(tmp);
    hmap_u64_fini(&j->delivered);
    return rc;
}

uint32_t
journal_resume(struct journal *j, uint64_t now_mono_ms)
{
    uint32_t n = 0;

    j->now_mono_ms = now_mono_ms;
    /* Back to the front of their queues from the last delivered to the
     * first, as a lost consumer's jobs go: they keep their order. */
    for (uint32_t i = j->n_interrupted; i-- > 0;) {
        const struct rec_deliver_item *it = &j->interrupted[i];

        if (qset_interrupted(j->qs, it->id, it->attempt, now_mono_ms) ==
            PQ_OK) {
            n++;
        }
    }
    if (n > 0) {
        log_warn("%u jobs were running when protoqd stopped: each counts as "
                 "a failed attempt (as a lost consumer's)",
                 n);
    }
    pq_free(j->interrupted);
    j->interrupted = NULL;
    j->n_interrupted = 0;
    return n;
}

/* check_suspects: after replay, refuse a log in which a message is live
 * without its PUBLISH (PQ_ECORRUPT with the file and offset in err). */
static int
check_suspects(struct journal *j, const char *dir, char *err, size_t errlen)
{
    uint32_t floor = store_salvage_floor(j->st);
    const struct suspect *first = NULL;
    uint64_t first_id = 0, n = 0, id;
    size_t it = 0;
    struct suspect *s;

    while ((s = hmap_u64_next(&j->suspects, &it, &id)) != NULL) {
        if (s->idx < j->last_bulk || s->at.seg <= floor) {
            continue; /* a delete or purge may have removed it; salvaged */
        }
        if (n++ == 0 || s->at.seg < first->at.seg ||
            (s->at.seg == first->at.seg && s->at.off < first->at.off)) {
            first = s;
            first_id = id;
        }
    }
    if (n == 0) {
        return PQ_OK;
    }
    snprintf(err, errlen,
             "%s/seg-%010u.log: offset %llu: message %llu is "
             "live here, but its publish record is not in the log (%llu such "
             "messages): a segment that held live messages is missing; run "
             "protoqd --check-data %s (salvage: protoqd --salvage-data %s)",
             dir, first->at.seg, (unsigned long long)first->at.off,
             (unsigned long long)first_id, (unsigned long long)n, dir, dir);
    return PQ_ECORRUPT;
}

static struct queue *
replay_queue(struct journal *j, struct rec_str name)
{
    char buf[QUEUE_NAME_MAX + 1];

    if (name.len == 0 || name.len > QUEUE_NAME_MAX) {
        return NULL;
    }
    memcpy(buf, name.ptr, name.len);
    buf[name.len] = '\0';
    return qset_find(j->qs, buf);
}

/* Remove a replayed message (all are READY or DELAYED during replay). */
static void
replay_remove(struct journal *j, uint64_t id)
{
    struct msg v;

    if (qset_msg_peek(j->qs, id, &v)) {
        journal_forget_body(j, &v);
        qset_cancel(j->qs, id, NULL);
    }
}

static int
replay_create(struct journal *j, const struct rec_queue_create *c)
{
    char name[QUEUE_NAME_MAX + 1];
    int rc;

    if (c->name.len == 0 || c->name.len > QUEUE_NAME_MAX) {
        return PQ_ECORRUPT;
    }
    memcpy(name, c->name.ptr, c->name.len);
    name[c->name.len] = '\0';
    rc = qset_create(j->qs, name, &c->attrs, NULL);
    /* A later definition of the same name (re-created with other
     * attributes after a delete in a segment since removed) wins. */
    if (rc == PQ_EEXIST) {
        log_warn("replay: queue %s redefined with other attributes", name);
        rc = PQ_OK;
    }
    return rc;
}

/*
 * replay_push: push a replayed message (its body within the budget,
 * checked by the caller). The log already accepted it, so its idempotency
 * key is taken over from a message that is gone (a put-back job re-pushed
 * by its REQUEUE record, or a key reused after its window): refusing it
 * lost the job. Only a live message with the same key, which the broker
 * never lets happen, still wins; that is logged, not hidden.
 */
static int
replay_push(struct journal *j, struct queue *q, struct msg_new *mn)
{
    int rc;

    mn->key_takeover = true;
    rc = queue_push(q, mn, j->mono_at_open, NULL);
    if (rc == PQ_EEXIST) {
        log_warn("replay: queue %s: message %llu skipped: its id or "
                 "idempotency key \"%s\" belongs to a live message",
                 queue_name(q), (unsigned long long)mn->id,
                 mn->idem_key ? mn->idem_key : "");
        rc = PQ_OK;
    } else if (rc == PQ_OK && journal_durable(q) && mn->body != NULL) {
        j->resident += mn->size;
    }
    return rc;
}

static int
replay_publish(struct journal *j, const struct rec_publish *p,
               const struct store_loc *loc)
{
    struct queue *q = replay_queue(j, p->queue);
    struct kv req[PQ_TAGS_MAX];
    char keys[PQ_TAGS_MAX][2][PQ_TAG_BYTES_MAX + 1];
    char idem[PQ_IDEMPOTENCY_KEY_MAX + 1];
    struct msg_new mn = {0};
    struct rec_kv kv;
    struct msg v;
    size_t cursor = 0, n = 0;
    int rc;

    if (p->id > j->max_id) {
        j->max_id = p->id;
    }
    if (q == NULL) {
        return PQ_OK; /* its queue was deleted in a segment since removed */
    }
    if (qset_msg_peek(j->qs, p->id, &v)) {
        replay_remove(j, p->id); /* compaction moved it: the newest wins */
    }
    while (record_publish_next_require(p, &cursor, &kv)) {
        if (n >= PQ_TAGS_MAX || kv.key.len > PQ_TAG_BYTES_MAX ||
            kv.value.len > PQ_TAG_BYTES_MAX) {
            return PQ_ECORRUPT;
        }
        memcpy(keys[n][0], kv.key.ptr, kv.key.len);
        keys[n][0][kv.key.len] = '\0';
        memcpy(keys[n][1], kv.value.ptr, kv.value.len);
        keys[n][1][kv.value.len] = '\0';
        req[n].key = keys[n][0];
        req[n].value = keys[n][1];
        n++;
    }
    if (p->idem_key.len > PQ_IDEMPOTENCY_KEY_MAX) {
        return PQ_ECORRUPT;
    }
    memcpy(idem, p->idem_key.ptr, p->idem_key.len);
    idem[p->idem_key.len] = '\0';
    mn.id = p->id;
    mn.size = message_payload_size(p->body.ptr, p->body.len);
    /* Past the budget the body stays on disk: do not even copy it. */
    if (!journal_durable(q) || j->resident + mn.size <= j->budget) {
        mn.body = body_new(p->body.ptr, p->body.len);
        if (mn.body == NULL) {
            rc = PQ_ENOMEM;
            goto out;
        }
    } else {
        j->evicted++;
    }
    mn.progress =
        p->progress.len ? body_new(p->progress.ptr, p->progress.len) : NULL;
    if (p->progress.len && mn.progress == NULL) {
        rc = PQ_ENOMEM;
        goto out;
    }
    mn.priority = p->priority > 9 ? 9 : p->priority;
    mn.reply = message_has_reply_to(p->body.ptr, p->body.len);
    mn.due_ms = wall_to_mono(j, p->deliver_at_wall_ms, false);
    mn.expire_ms = wall_to_mono(j, p->expire_wall_ms, true);
    mn.published_wall_ms = p->published_wall_ms;
    mn.idem_key = idem[0] ? idem : NULL;
    mn.requires = req;
    mn.n_requires = n;
    mn.attempt = p->attempt;
    mn.failures = p->failures;
    mn.pub_seg = mn.state_seg = loc->seg;
    mn.pub_off = (uint32_t)loc->off;
    mn.pub_len = loc->len;
    rc = replay_push(j, q, &mn);
out:
    body_unref(&mn.body);
    body_unref(&mn.progress);
    return rc;
}

/* Re-push m (a qset_msg_peek copy) with a new state (requeue,
 * dead-letter): replay has no in-flight messages, so remove and add is
 * exact but for its position. A dead letter (its DEAD_LETTER record at
 * loc holds the new body) enters `to` as queue.c's dead-lettering leaves
 * it: without its idempotency key (whose window stays with the source),
 * its requirements, or its source's TTL (the target's applies). */
static int
replay_reset(struct journal *j, const struct msg *m, struct queue *to,
             struct body *new_body, uint32_t attempt, uint32_t failures,
             uint64_t due_ms, const struct store_loc *loc, bool dead_letter)
{
    uint32_t seg = loc->seg;
    struct kv req[PQ_TAGS_MAX];
    size_t n_req = 0;
    const struct kv *kv = dead_letter ? NULL : msg_requires(m, &n_req);
    char *keys = NULL;
    char *idem = NULL;
    struct msg_new mn = {0};
    int rc = PQ_ENOMEM;

    if (n_req > PQ_TAGS_MAX) {
        return PQ_ECORRUPT;
    }
    /* Copy what the old message owns before it goes. */
    keys = pq_calloc(n_req ? n_req : 1, 2 * KEY_CAP);
    if (keys == NULL) {
        goto out;
    }
    for (size_t i = 0; i < n_req; i++) {
        snprintf(keys + i * 2 * KEY_CAP, KEY_CAP, "%s", kv[i].key);
        snprintf(keys + i * 2 * KEY_CAP + KEY_CAP, KEY_CAP, "%s", kv[i].value);
        req[i].key = keys + i * 2 * KEY_CAP;
        req[i].value = keys + i * 2 * KEY_CAP + KEY_CAP;
    }
    if (!dead_letter && msg_idem_key(m) &&
        (idem = pq_strdup(msg_idem_key(m))) == NULL) {
        goto out;
    }
    mn.id = m->id;
    mn.body = new_body ? body_ref(new_body) : body_ref(m->body);
    mn.progress = body_ref(msg_progress(m));
    mn.size = m->size;
    mn.priority = m->priority;
    mn.reply = msg_wants_reply(m);
    mn.due_ms = due_ms;
    /* A dead letter takes its new queue's TTL (queue_push applies it), as
     * dead_letter() does live; the source's TTL would drop it again. */
    mn.expire_ms = dead_letter ? 0 : m->expire_ms;
    mn.published_wall_ms = m->published_wall_ms;
    mn.idem_key = idem;
    mn.requires = req;
    mn.n_requires = n_req;
    mn.attempt = attempt;
    mn.failures = failures;
    mn.pub_seg = dead_letter ? seg : m->pub_seg;
    mn.pub_off = dead_letter ? (uint32_t)loc->off : m->pub_off;
    mn.pub_len = dead_letter ? loc->len : m->pub_len;
    mn.state_seg = seg;
    replay_remove(j, mn.id); /* m is stale from here on */
    if (mn.body != NULL && journal_durable(to) &&
        !journal_budget_allows(j, mn.size, mn.pub_len)) {
        body_unref(&mn.body);
    }
    rc = replay_push(j, to, &mn);
out:
    body_unref(&mn.body);
    body_unref(&mn.progress);
    pq_free(idem);
    pq_free(keys);
    return rc;
}

/* The priority field (3) of an encoded protoq.Message; 0 if absent. */
static uint8_t
message_priority(const uint8_t *data, size_t len)
{
    const uint8_t *p = data, *end = data + len;
    struct pbwire_field f;

    while (p < end && pbwire_next_field(&p, end, &f)) {
        if (f.num == 3 && f.type == PBWIRE_VARINT) {
            return f.varint > 9 ? 9 : (uint8_t)f.varint;
        }
    }
    return 0;
}

/*
 * replay_orphan_dead_letter: a DEAD_LETTER record for a message whose
 * PUBLISH is no longer in the log. That is normal: the live dead letter
 * references this record (its whole new body), not the PUBLISH, so the
 * segment of the PUBLISH may have been deleted. Rebuild the message in its
 * dead-letter queue from this record, as the live broker had it: attempt
 * and failures reset, the queue's TTL, no key or requirements. What the
 * record does not keep: the original publish time (0 here). A later ACK,
 * DROP or delete in the log removes it again as usual.
 */
static int
replay_orphan_dead_letter(struct journal *j, const struct rec_dead_letter *d,
                          struct queue *q, const struct store_loc *loc)
{
    struct msg_new mn = {0};
    int rc;

    if (d->id > j->max_id) {
        j->max_id = d->id;
    }
    mn.id = d->id;
    mn.size = message_payload_size(d->body.ptr, d->body.len);
    mn.priority = message_priority(d->body.ptr, d->body.len);
    mn.reply = message_has_reply_to(d->body.ptr, d->body.len);
    if (!journal_durable(q) || j->resident + mn.size <= j->budget) {
        mn.body = body_new(d->body.ptr, d->body.len);
        if (mn.body == NULL) {
            return PQ_ENOMEM;
        }
    } else {
        j->evicted++;
    }
    mn.pub_seg = mn.state_seg = loc->seg;
    mn.pub_off = (uint32_t)loc->off;
    mn.pub_len = loc->len;
    rc = replay_push(j, q, &mn);
    body_unref(&mn.body);
    return rc;
}

struct purge_replay {
    const struct rec_queue_purge *p;
    uint64_t *drop;
    size_t n, cap;
    bool oom;
};

static void
purge_replay_cb(void *arg, struct msg *m)
{
    struct purge_replay *w = arg;

    for (uint32_t i = 0; i < w->p->n_keep; i++) {
        if (record_purge_keep_id(w->p, i) == m->id) {
            return;
        }
    }
    if (w->n == w->cap) {
        size_t cap = w->cap ? w->cap * 2 : 256;
        uint64_t *d = pq_realloc(w->drop, cap * sizeof(*d));

        if (d == NULL) {
            w->oom = true;
            return;
        }
        w->drop = d;
        w->cap = cap;
    }
    w->drop[w->n++] = m->id;
}

/* A binding as it was: of a queue that exists at this point of the log
 * (a later QUEUE_DELETE removes it again). */
static int
replay_route(struct journal *j, const struct record *r)
{
    const struct rec_route *b = &r->u.route;
    char route[PQ_ROUTE_NAME_MAX + 1], pattern[PQ_ROUTE_PATTERN_MAX + 1];
    struct queue *q = replay_queue(j, b->queue);
    int rc;

    if (b->route.len == 0 || b->route.len > PQ_ROUTE_NAME_MAX ||
        b->pattern.len > PQ_ROUTE_PATTERN_MAX) {
        return PQ_ECORRUPT;
    }
    if (j->routes == NULL || q == NULL) {
        return PQ_OK;
    }
    memcpy(route, b->route.ptr, b->route.len);
    route[b->route.len] = '\0';
    memcpy(pattern, b->pattern.ptr, b->pattern.len);
    pattern[b->pattern.len] = '\0';
    if (r->type == REC_ROUTE_UNBIND) {
        (void)routes_unbind(j->routes, route, queue_name(q), pattern);
        return PQ_OK;
    }
    rc = routes_bind(j->routes, route, queue_name(q), pattern);
    if (rc == PQ_EEXIST) {
        return PQ_OK; /* rewritten at the start of a later segment */
    }
    if (rc == PQ_EFULL || rc == PQ_EINVAL) {
        log_warn("replay: binding of route %s to queue %s skipped: %s", route,
                 queue_name(q), pq_strerror(rc));
        return PQ_OK;
    }
    return rc;
}

static int
replay_record(void *arg, uint8_t type, const uint8_t *body, size_t len,
              const struct store_loc *loc)
{
    struct journal *j = arg;
    struct qset *qs = j->qs;
    struct record r;
    struct msg *m, view;
    struct queue *q;
    int rc;

    rc = record_decode(type, body, len, &r);
    if (rc != PQ_OK) {
        log_err("replay: segment %u offset %llu: undecodable %s record",
                loc->seg, (unsigned long long)loc->off, record_type_name(type));
        return PQ_ECORRUPT;
    }
    j->replayed++;
    switch (r.type) {
    case REC_QUEUE_CREATE:
        return replay_create(j, &r.u.queue_create);
    case REC_QUEUE_DELETE:
        j->last_bulk = j->replayed;
        q = replay_queue(j, r.u.queue_delete.name);
        if (q) {
            if (j->routes != NULL) {
                routes_unbind_queue(j->routes, queue_name(q));
            }
            qset_delete(qs, q);
        }
        return PQ_OK;
    case REC_QUEUE_PURGE: {
        struct purge_replay w = {.p = &r.u.queue_purge};

        j->last_bulk = j->replayed;
        q = replay_queue(j, r.u.queue_purge.name);
        if (q == NULL) {
            return PQ_OK;
        }
        queue_foreach_msg(q, purge_replay_cb, &w);
        for (size_t i = 0; i < w.n; i++) {
            replay_remove(j, w.drop[i]);
        }
        pq_free(w.drop);
        return w.oom ? PQ_ENOMEM : PQ_OK;
    }
    case REC_PUBLISH:
        suspect_clear(j, r.u.publish.id);
        delivered_clear(j, r.u.publish.id);
        return replay_publish(j, &r.u.publish, loc);
    case REC_PUBLISH_BATCH: {
        struct rec_publish p;
        size_t cur = 0;

        rc = PQ_OK;
        while (rc == PQ_OK && record_batch_next(&r.u.batch, &cur, &p)) {
            suspect_clear(j, p.id);
            delivered_clear(j, p.id);
            rc = replay_publish(j, &p, loc);
        }
        return rc;
    }
    case REC_ROUTE_BIND:
    case REC_ROUTE_UNBIND:
        return replay_route(j, &r);
    case REC_ACK:
        suspect_clear(j, r.u.ack.id);
        delivered_clear(j, r.u.ack.id);
        replay_remove(j, r.u.ack.id);
        return PQ_OK;
    case REC_DROP:
        suspect_clear(j, r.u.drop.id);
        delivered_clear(j, r.u.drop.id);
        replay_remove(j, r.u.drop.id);
        return PQ_OK;
    case REC_REQUEUE:
        delivered_clear(j, r.u.requeue.id);
        if (!qset_msg_peek(qs, r.u.requeue.id, &view)) {
            return suspect_add(j, r.u.requeue.id, loc);
        }
        return replay_reset(
            j, &view, view.q, NULL, r.u.requeue.attempt, r.u.requeue.failures,
            wall_to_mono(j, r.u.requeue.deliver_at_wall_ms, false), loc, false);
    case REC_DEAD_LETTER: {
        struct body *nb;

        delivered_clear(j, r.u.dead_letter.id);
        q = replay_queue(j, r.u.dead_letter.target);
        if (!qset_msg_peek(qs, r.u.dead_letter.id, &view)) {
            /* Its PUBLISH went with a deleted segment: since the dead
             * letter, this record is the message (its refs moved here). */
            return q != NULL
                       ? replay_orphan_dead_letter(j, &r.u.dead_letter, q, loc)
                       : PQ_OK;
        }
        if (q == NULL) {
            replay_remove(j, view.id);
            return PQ_OK;
        }
        nb = body_new(r.u.dead_letter.body.ptr, r.u.dead_letter.body.len);
        if (nb == NULL) {
            return PQ_ENOMEM;
        }
        rc = replay_reset(j, &view, q, nb, 0, 0, 0, loc, true);
        body_unref(&nb);
        return rc;
    }
    case REC_ATOMIC: {
        /* The job's end, then what it caused, all at this location. */
        struct rec_bytes raw;
        size_t cur = 0;

        rc = replay_record(j, r.u.atomic.inner_type, r.u.atomic.inner_raw.ptr,
                           r.u.atomic.inner_raw.len, loc);
        while (rc == PQ_OK &&
               record_atomic_next_publish(&r.u.atomic, &cur, &raw, NULL)) {
            rc = replay_record(j, REC_PUBLISH, raw.ptr, raw.len, loc);
        }
        return rc;
    }
    case REC_DELIVER:
        return replay_deliver(j, &r.u.deliver);
    case REC_PROGRESS:
        m = qset_msg(qs, r.u.progress.id);
        if (m == NULL && qset_msg_peek(qs, r.u.progress.id, &view)) {
            return PQ_ENOMEM; /* live, but no memory to expand it */
        }
        if (m != NULL) {
            struct body *pb =
                body_new(r.u.progress.progress.ptr, r.u.progress.progress.len);
            if (pb == NULL) {
                return PQ_ENOMEM;
            }
            rc = msg_set_progress(m, pb);
            body_unref(&pb);
            m->state_seg = loc->seg;
            return rc;
        }
        return suspect_add(j, r.u.progress.id, loc);
    default:
        log_warn("replay: segment %u offset %llu: unknown record type %u "
                 "skipped",
                 loc->seg, (unsigned long long)loc->off, type);
        return PQ_OK;
    }
}

struct ref_walk {
    struct journal *j;
    uint64_t n;
};

static void
ref_cb(void *arg, struct msg *m)
{
    struct ref_walk *w = arg;

    journal_ref_msg(w->j, m);
    w->n++;
}

/* A log written before dead_letter targets were checked may define a
 * queue whose dead-letter queue does not exist: it still loads. */
static void
warn_missing_dead_letters(struct journal *j)
{
    for (struct queue *q = qset_first(j->qs); q; q = qset_next(q)) {
        const char *dl = queue_attrs(q)->dead_letter;

        if (dl[0] != '\0' && qset_find(j->qs, dl) == NULL) {
            log_warn("queue %s: its dead_letter queue %s does not exist: "
                     "jobs it would dead-letter are dropped until %s is "
                     "created",
                     queue_name(q), dl, dl);
        }
    }
}

int
journal_open(const struct journal_config *cfg, struct qset *qs,
             struct journal **out, char *err, size_t errlen)
{
    struct store_config sc = {
        .dir = cfg->data_dir,
        .fsync_policy = cfg->fsync,
        .fsync_interval_ms = cfg->fsync_interval_ms,
        .segment_bytes = cfg->segment_bytes,
        .read_only = false,
        .live_check_by_caller = true, /* check_suspects, without a map */
    };
    struct journal *j = NULL;
    struct ref_walk w;
    uint64_t t0 = clock_mono_ms(), floor;
    int rc;

    *out = NULL;
    rc = data_dir_ensure(cfg->data_dir, err, errlen);
    if (rc != PQ_OK) {
        goto fail;
    }
    j = pq_calloc(1, sizeof(*j));
    if (j == NULL) {
        snprintf(err, errlen, "out of memory");
        rc = PQ_ENOMEM;
        goto fail;
    }
    j->qs = qs;
    j->routes = cfg->routes;
    j->budget = cfg->payload_budget_bytes;
    j->mono_at_open = j->now_mono_ms = clock_mono_ms();
    j->wall_at_open = clock_wall_ms();
    hmap_u64_init(&j->suspects);
    hmap_u64_init(&j->delivered);
    rc = store_open(&sc, replay_record, j, &j->st, err, errlen);
    if (rc == PQ_OK) {
        rc = check_suspects(j, cfg->data_dir, err, errlen);
    }
    suspects_free(j);
    if (rc == PQ_OK && collect_interrupted(j) != PQ_OK) {
        snprintf(err, errlen,
                 "out of memory listing the deliveries that "
                 "were running at the stop");
        rc = PQ_ENOMEM;
    }
    hmap_u64_fini(&j->delivered);
    if (rc != PQ_OK) {
        goto fail;
    }
    rc = qset_sort_ready(qs);
    if (rc != PQ_OK) {
        snprintf(err, errlen,
                 "out of memory putting the recovered messages in order");
        goto fail;
    }
    /* Counters are since this start: the replay's pushes (one per PUBLISH
     * and per put-back) and removals are not traffic. */
    qset_stats_reset(qs);
    w.j = j;
    w.n = 0;
    for (struct queue *q = qset_first(qs); q; q = qset_next(q)) {
        queue_foreach_msg(q, ref_cb, &w);
    }
    store_reserve_set(j->st, w.n);
    store_set_roll_cb(j->st, journal_on_roll, j);
    warn_missing_dead_letters(j);
    /* Ids never repeat: past every id in the log, and past the clock so
     * that a log emptied by deletion cannot bring old ids back. */
    floor = clock_wall_ms() << 16;
    j->next_id = j->max_id + 1 > floor ? j->max_id + 1 : floor;
    log_info("recovered %zu queues and %llu messages from %s (%llu records) "
             "in %llu ms; %llu payload bytes in memory, %llu messages on "
             "disk only",
             qset_queue_count(qs), (unsigned long long)w.n, cfg->data_dir,
             (unsigned long long)j->replayed,
             (unsigned long long)(clock_mono_ms() - t0),
             (unsigned long long)j->resident, (unsigned long long)j->evicted);
    *out = j;
    return PQ_OK;
fail:
    journal_close(j);
    return rc;
}
