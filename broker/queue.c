/*
 * queue.c: the queue set (see queue.h for the state table, ordering, backoff
 * and event rules). Owns every struct queue, struct msg, msg_ext and dedup
 * entry; borrows the struct consumer objects the caller embeds.
 *
 * Invariants:
 *  - every live message is either a struct msg, in qs->msgs (by id), or a
 *    CS_COMPACT slot of a ready level (READY, never delivered; see struct
 *    cslot), and not in qs->msgs;
 *  - a struct msg is in exactly one of: a ready level of its queue (front
 *    list, back list or a CS_FULL slot, per MSG_F_SLOT/MSG_F_BACK; READY),
 *    its queue's delayed list (DELAYED), its holder's in-flight list
 *    (INFLIGHT);
 *  - the slots of a level in [head, tail) have strictly increasing ids
 *    (tombstones keep theirs), and slot head is not a tombstone;
 *  - a message has a heap slot iff it has a deadline: DELAYED (min of due
 *    and TTL), INFLIGHT (lease end), READY with a TTL;
 *  - the heap's capacity covers every message with a deadline: it is
 *    reserved where a message without one gains one (queue_push of a
 *    DELAYED or TTL message, queue_next_delivery for READY -> INFLIGHT);
 *    every other transition trades one deadline for another, so nothing
 *    else needs memory for bookkeeping;
 *  - struct msg lives in slabs of MSG_SLAB_LEN (no per-message allocator
 *    header); a slab is freed when it empties, except one spare.
 *  - a consumer is on its queue's credit ring iff subscribed and
 *    inflight < prefetch.
 * No I/O, no clock, no libevent: time comes in as now_ms.
 */
#include "queue_int.h"

#include <assert.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "mem.h"
#include "pqerr.h"

static void dead_letter(struct msg *m, uint64_t now_ms, enum qreason reason);

/* ---- small helpers ---- */

const char *
qreason_name(enum qreason r)
{
    static const char *const names[] = {
        [QR_NONE] = "",           [QR_NACK] = "nack",
        [QR_LEASE] = "lease",     [QR_UNSUBSCRIBE] = "unsubscribe",
        [QR_RELEASE] = "release", [QR_MAX_ATTEMPTS] = "max_attempts",
        [QR_EXPIRED] = "expired", [QR_CANCELLED] = "cancelled",
    };

    return (unsigned)r < sizeof(names) / sizeof(names[0]) ? names[r] : "?";
}

static uint64_t
rng_next(struct qset *qs)
{
    uint64_t z = (qs->rng += 0x9e3779b97f4a7c15ULL);

    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void
queue_emit(struct qset *qs, enum qevent_type type, struct msg *m,
           struct queue *q, struct queue *from, enum qreason reason,
           const char *detail, const struct kv *hdrs, size_t n_hdrs)
{
    struct qevent ev;

    if (qs->listener == NULL) {
        return;
    }
    ev.type = type;
    ev.m = m;
    ev.q = q;
    ev.from = from;
    ev.reason = reason;
    ev.detail = detail;
    ev.headers = hdrs;
    ev.n_headers = n_hdrs;
    qs->listener(qs->listener_arg, &ev);
}

/* kv_copy: n pairs and their strings in one block (free with pq_free). */
static struct kv *
kv_copy(const struct kv *src, size_t n)
{
    size_t total = n * sizeof(struct kv);
    struct kv *dst;
    char *p;
    size_t i;

    if (n > SIZE_MAX / sizeof(struct kv) / 2) {
        return NULL;
    }
    for (i = 0; i < n; i++) {
        total += strlen(src[i].key != NULL ? src[i].key : "") + 1;
        total += strlen(src[i].value != NULL ? src[i].value : "") + 1;
    }
    dst = pq_malloc(total);
    if (dst == NULL) {
        return NULL;
    }
    p = (char *)(dst + n);
    for (i = 0; i < n; i++) {
        const char *k = src[i].key != NULL ? src[i].key : "";
        const char *v = src[i].value != NULL ? src[i].value : "";
        size_t kl = strlen(k) + 1;
        size_t vl = strlen(v) + 1;

        memcpy(p, k, kl);
        dst[i].key = p;
        p += kl;
        memcpy(p, v, vl);
        dst[i].value = p;
        p += vl;
    }
    return dst;
}

static bool
has_tag(const struct kv *tags, size_t n, const struct kv *want)
{
    size_t i;

    for (i = 0; i < n; i++) {
        if (strcmp(tags[i].key, want->key) == 0 &&
            strcmp(tags[i].value, want->value) == 0) {
            return true;
        }
    }
    return false;
}

/* ---- name and attributes ---- */

/* queue_name_valid: see queue.h. */
bool
queue_name_valid(const char *name, size_t len)
{
    size_t i;

    if (name == NULL || len == 0 || len > QUEUE_NAME_MAX) {
        return false;
    }
    for (i = 0; i < len; i++) {
        char c = name[i];

        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') ||
              (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-' ||
              c == ':')) {
            return false;
        }
    }
    return true;
}

/* queue_defaults_init: see queue.h. */
void
queue_defaults_init(struct queue_defaults *d)
{
    d->ack_timeout_ms = 30000;
    d->max_attempts = 5;
    d->backoff_base_ms = 1000;
    d->backoff_cap_ms = 60000;
    d->dedup_window_ms = 86400000;
    d->max_lease_ms = 0;
}

/* queue_attrs_resolve: see queue.h. */
void
queue_attrs_resolve(struct queue_attrs *a, const struct queue_defaults *d)
{
    if (a->ack_timeout_ms == 0) {
        a->ack_timeout_ms = d->ack_timeout_ms;
    }
    if (a->max_attempts == 0) {
        a->max_attempts = d->max_attempts;
    }
    if (a->no_backoff) {
        a->backoff_base_ms = 0;
        a->backoff_cap_ms = 0;
    }
    if (a->backoff_base_ms == 0 && !a->no_backoff) {
        a->backoff_base_ms = d->backoff_base_ms;
    }
    if (a->backoff_cap_ms == 0 && !a->no_backoff) {
        a->backoff_cap_ms = d->backoff_cap_ms;
    }
    if (a->dedup_window_ms == 0) {
        a->dedup_window_ms = d->dedup_window_ms;
    }
    if (a->max_lease_ms == 0) {
        a->max_lease_ms = d->max_lease_ms;
    }
}

/* queue_attrs_equal: see queue.h. */
bool
queue_attrs_equal(const struct queue_attrs *a, const struct queue_attrs *b)
{
    return a->transient == b->transient && a->max_length == b->max_length &&
           a->max_bytes == b->max_bytes &&
           a->ack_timeout_ms == b->ack_timeout_ms &&
           a->max_attempts == b->max_attempts &&
           strncmp(a->dead_letter, b->dead_letter, sizeof(a->dead_letter)) ==
               0 &&
           a->backoff_base_ms == b->backoff_base_ms &&
           a->backoff_cap_ms == b->backoff_cap_ms && a->ttl_ms == b->ttl_ms &&
           a->dedup_window_ms == b->dedup_window_ms &&
           a->max_lease_ms == b->max_lease_ms &&
           a->dead_letter_expired == b->dead_letter_expired;
}

/* ---- consumers: list and credit ring ---- */

void
queue_avail_remove(struct consumer *c)
{
    struct queue *q = c->q;

    if (!c->in_avail) {
        return;
    }
    if (c->avail_prev != NULL) {
        c->avail_prev->avail_next = c->avail_next;
    } else {
        q->avail_head = c->avail_next;
    }
    if (c->avail_next != NULL) {
        c->avail_next->avail_prev = c->avail_prev;
    } else {
        q->avail_tail = c->avail_prev;
    }
    c->avail_prev = c->avail_next = NULL;
    c->in_avail = false;
}

static void
avail_append(struct consumer *c)
{
    struct queue *q = c->q;

    assert(!c->in_avail);
    c->avail_next = NULL;
    c->avail_prev = q->avail_tail;
    if (q->avail_tail != NULL) {
        q->avail_tail->avail_next = c;
    } else {
        q->avail_head = c;
    }
    q->avail_tail = c;
    c->in_avail = true;
}

/* Put c on or off the credit ring to match its credit (joins at the tail). */
void
queue_avail_sync(struct consumer *c)
{
    bool want;

    if (c->q == NULL) {
        return;
    }
    want = c->inflight < c->prefetch;
    if (want && !c->in_avail) {
        avail_append(c);
    } else if (!want && c->in_avail) {
        queue_avail_remove(c);
    }
}

/* queue_consumer_init: see queue.h. */
void
queue_consumer_init(struct consumer *c, uint64_t id, void *owner,
                    uint32_t prefetch)
{
    memset(c, 0, sizeof(*c));
    c->id = id;
    c->owner = owner;
    c->prefetch = prefetch;
}

/* queue_consumer_set_tags: see queue.h. */
int
queue_consumer_set_tags(struct consumer *c, const struct kv *tags, size_t n)
{
    struct kv *copy = NULL;

    if (n > 0) {
        copy = kv_copy(tags, n);
        if (copy == NULL) {
            return PQ_ENOMEM;
        }
    }
    pq_free(c->tags);
    c->tags = copy;
    c->n_tags = n;
    return PQ_OK;
}

/* queue_consumer_fini: see queue.h. */
void
queue_consumer_fini(struct consumer *c)
{
    assert(c->q == NULL);
    pq_free(c->tags);
    c->tags = NULL;
    c->n_tags = 0;
}

/* queue_consumer_satisfies: see queue.h. */
bool
queue_consumer_satisfies(const struct consumer *c, const struct kv *req,
                         size_t n)
{
    size_t i;

    for (i = 0; i < n; i++) {
        if (!has_tag(c->tags, c->n_tags, &req[i])) {
            return false;
        }
    }
    return true;
}

/* ---- message accessors ---- */

/* msg_idem_key: see queue.h. */
const char *
msg_idem_key(const struct msg *m)
{
    return m->ext != NULL && m->ext->dedup != NULL ? m->ext->dedup->key : NULL;
}

/* msg_requires: see queue.h. */
const struct kv *
msg_requires(const struct msg *m, size_t *n)
{
    if (m->ext == NULL || m->ext->n_requires == 0) {
        *n = 0;
        return NULL;
    }
    *n = m->ext->n_requires;
    return m->ext->requires;
}

/* msg_progress: see queue.h. */
struct body *
msg_progress(const struct msg *m)
{
    return m->ext != NULL ? m->ext->progress : NULL;
}

/* msg_last_error: see queue.h. */
const char *
msg_last_error(const struct msg *m)
{
    return m->ext != NULL ? m->ext->last_error : NULL;
}

/* msg_is_cancelled: see queue.h. */
bool
msg_is_cancelled(const struct msg *m)
{
    return (m->flags & MSG_F_CANCELLED) != 0;
}

bool
msg_wants_reply(const struct msg *m)
{
    return (m->flags & MSG_F_REPLY) != 0;
}

int
queue_ensure_ext(struct msg *m)
{
    if (m->ext == NULL) {
        m->ext = pq_calloc(1, sizeof(*m->ext));
        if (m->ext == NULL) {
            return PQ_ENOMEM;
        }
    }
    return PQ_OK;
}

/* ---- deadline heap ---- */

bool
msg_deadline(const struct msg *m, uint64_t *out)
{
    switch (m->state) {
    case MSG_INFLIGHT:
        *out = m->due_ms;
        return true;
    case MSG_DELAYED:
        *out = m->expire_ms != 0 && m->expire_ms < m->due_ms ? m->expire_ms
                                                             : m->due_ms;
        return true;
    case MSG_READY:
        *out = m->expire_ms;
        return m->expire_ms != 0;
    default:
        return false;
    }
}

static bool
deadline_less(const void *a, const void *b)
{
    uint64_t da = UINT64_MAX, db = UINT64_MAX;

    (void)msg_deadline(a, &da);
    (void)msg_deadline(b, &db);
    return da < db;
}

static void
deadline_setpos(void *item, size_t pos)
{
    struct msg *m = item;

    m->heap_pos = pos == HEAP_NOPOS ? UINT32_MAX : (uint32_t)pos;
}

/* Give m the heap slot its state calls for. Never allocates: capacity for
 * every live message was reserved in queue_push. */
void
queue_sched(struct msg *m)
{
    struct heap *h = &m->q->qs->deadlines;
    uint64_t d;

    if (!msg_deadline(m, &d)) {
        if (m->heap_pos != UINT32_MAX) {
            heap_remove(h, m->heap_pos);
        }
        return;
    }
    if (m->heap_pos != UINT32_MAX) {
        heap_update(h, m->heap_pos);
    } else {
        int rc = heap_push(h, m);

        assert(rc == PQ_OK); /* reserved */
        (void)rc;
    }
}

/* ---- state changes ---- */

void
queue_make_ready(struct msg *m, bool front)
{
    struct queue *q = m->q;
    struct rlevel *lv = &q->ready[m->priority];

    m->state = MSG_READY;
    m->flags &= ~(MSG_F_SLOT | MSG_F_BACK);
    if (front) {
        m->due_ms = 0;
        queue_mlist_push_front(&lv->front, m);
    } else {
        m->due_ms = lv->tail; /* seq: after the slots pushed so far */
        m->flags |= MSG_F_BACK;
        queue_mlist_push_back(&lv->back, m);
    }
    q->n_ready++;
    if (msg_has_req(m)) {
        q->n_ready_req++;
    }
}

static void
make_delayed(struct msg *m, uint64_t due_ms)
{
    m->state = MSG_DELAYED;
    m->due_ms = due_ms;
    queue_mlist_push_back(&m->q->delayed, m);
    m->q->n_delayed++;
}

/* Take a READY m out of its level. */
static void
ready_remove(struct queue *q, struct msg *m)
{
    struct rlevel *lv = &q->ready[m->priority];

    if ((m->flags & MSG_F_SLOT) != 0) {
        uint64_t pos = queue_slot_find(lv, m->id);

        assert(pos != POS_NONE && queue_slot_at(lv, pos)->u.m == m);
        queue_slot_kill(q, lv, pos);
    } else if ((m->flags & MSG_F_BACK) != 0) {
        queue_mlist_remove(&lv->back, m);
        m->due_ms = 0;
    } else {
        queue_mlist_remove(&lv->front, m);
    }
    m->flags &= ~(MSG_F_SLOT | MSG_F_BACK);
}

/* Take m out of its list and the heap; it stays in the id map and counted in
 * q->bytes. The caller puts it somewhere else or frees it. */
void
queue_unlink_msg(struct msg *m)
{
    struct queue *q = m->q;
    struct consumer *c;

    switch (m->state) {
    case MSG_READY:
        ready_remove(q, m);
        q->n_ready--;
        if (msg_has_req(m)) {
            q->n_ready_req--;
        }
        break;
    case MSG_DELAYED:
        queue_mlist_remove(&q->delayed, m);
        q->n_delayed--;
        break;
    case MSG_INFLIGHT:
        c = m->holder;
        {
            struct mlist l = {c->inflight_head, c->inflight_tail};

            queue_mlist_remove(&l, m);
            c->inflight_head = l.head;
            c->inflight_tail = l.tail;
        }
        c->inflight--;
        queue_avail_sync(c);
        m->holder = NULL;
        q->n_inflight--;
        break;
    default:
        assert(0 && "unlink of an unlinked message");
    }
    m->state = MSG_LIMBO;
    if (m->heap_pos != UINT32_MAX) {
        heap_remove(&q->qs->deadlines, m->heap_pos);
    }
}

/* m (unlinked) is gone for good: tell the caller, then free it. */
static void
drop_msg(struct msg *m, enum qreason reason, const char *detail)
{
    struct queue *q = m->q;

    assert(m->state == MSG_LIMBO);
    queue_emit(q->qs, QEV_DROP, m, q, NULL, reason, detail, NULL, 0);
    (void)hmap_ptr_del(&q->qs->msgs, m->id);
    q->bytes -= m->size;
    queue_dedup_release(m);
    msg_free(m);
}

/* Put an unlinked, previously delivered message back: at once (front of its
 * level) or after delay_ms. */
void
queue_requeue(struct msg *m, uint64_t now_ms, uint64_t delay_ms,
              enum qreason reason)
{
    if (delay_ms == 0) {
        queue_make_ready(m, m->attempt > 0);
    } else {
        make_delayed(m, queue_sat_add(now_ms, delay_ms));
    }
    queue_sched(m);
    queue_emit(m->q->qs, QEV_REQUEUE, m, m->q, NULL, reason, NULL, NULL, 0);
    if (m->state == MSG_READY) {
        queue_hint_ready(m->q);
    }
}

/* backoff_ms: delay before retry after `failures` failed attempts. */
static uint64_t
backoff_ms(struct queue *q, uint32_t failures)
{
    uint64_t base = q->attrs.backoff_base_ms;
    uint64_t cap = q->attrs.backoff_cap_ms;
    uint64_t d = base;
    uint64_t lo;
    uint32_t k;

    if (base == 0) {
        return 0;
    }
    for (k = 1; k < failures; k++) {
        if ((cap != 0 && d >= cap) || d > UINT64_MAX / 2) {
            break;
        }
        d *= 2;
    }
    if (cap != 0 && d > cap) {
        d = cap;
    }
    lo = d / 2;
    return lo + rng_next(q->qs) % (d - lo + 1);
}

/* An unlinked in-flight message failed an attempt. */
void
queue_fail_attempt(struct msg *m, uint64_t now_ms, enum qreason reason,
                   const struct nack_opts *o)
{
    struct queue *q = m->q;

    if (m->failures < UINT16_MAX) {
        m->failures++;
    }
    if (o != NULL && o->dead_letter) {
        dead_letter(m, now_ms, QR_NACK);
    } else if (m->failures >= q->attrs.max_attempts) {
        dead_letter(m, now_ms, QR_MAX_ATTEMPTS);
    } else if (o != NULL && o->has_delay) {
        queue_requeue(m, now_ms, o->delay_ms, reason);
    } else {
        queue_requeue(m, now_ms, backoff_ms(q, m->failures), reason);
    }
}

/* Move an unlinked message to its queue's dead-letter queue (see queue.h),
 * or drop it when that is impossible. */
static void
dead_letter(struct msg *m, uint64_t now_ms, enum qreason reason)
{
    struct queue *src = m->q;
    struct qset *qs = src->qs;
    struct queue *dst = NULL;
    const char *detail = NULL;
    struct body *nb = NULL;
    struct kv hdrs[4];
    size_t n = 0;
    char attempts[24];
    char *last_error = NULL; /* hdrs may point at it: freed after the event */

    snprintf(attempts, sizeof(attempts), "%" PRIu32, m->attempt);
    hdrs[n++] = (struct kv){"x-death-reason", qreason_name(reason)};
    hdrs[n++] = (struct kv){"x-death-attempts", attempts};
    hdrs[n++] = (struct kv){"x-death-queue", src->name};
    if (msg_last_error(m) != NULL) {
        hdrs[n++] = (struct kv){"x-death-error", msg_last_error(m)};
    }

    if (src->attrs.dead_letter[0] == '\0') {
        detail = "no dead_letter queue configured";
    } else if ((dst = qset_find(qs, src->attrs.dead_letter)) == NULL) {
        detail = "dead_letter queue does not exist";
    } else if (queue_check_room(dst, 1, m->size) != PQ_OK) {
        detail = "dead_letter queue is full";
    } else if (m->body != NULL &&
               (nb = body_with_headers(m->body, hdrs, n)) == NULL) {
        detail = "out of memory building the dead-letter body";
    }
    if (detail != NULL) {
        src->stats.dropped++;
        drop_msg(m, reason, detail);
        return;
    }

    /* Leave src: the key's window starts, counts move. */
    queue_dedup_release(m);
    src->bytes -= m->size;
    src->stats.dead_lettered++;
    body_unref(&m->body);
    m->body = nb; /* NULL if the payload was evicted: the event's headers say
                     what to add */
    m->q = dst;
    dst->bytes += m->size;
    m->attempt = 0;
    m->failures = 0;
    m->flags &= MSG_F_REPLY; /* its end is still told to reply_to */
    m->due_ms = 0;
    m->expire_ms =
        dst->attrs.ttl_ms != 0 ? queue_sat_add(now_ms, dst->attrs.ttl_ms) : 0;
    if (m->ext != NULL) {
        /* the DLQ is for inspection: anyone may take it, no stale error */
        pq_free(m->ext->requires);
        m->ext->requires = NULL;
        m->ext->n_requires = 0;
        last_error = m->ext->last_error;
        m->ext->last_error = NULL;
    }
    queue_make_ready(m, false);
    queue_sched(m);
    /* The listener builds an evicted message's dead-letter body (and a
     * failure notice) from hdrs, x-death-error included. */
    queue_emit(qs, QEV_DEAD_LETTER, m, dst, src, reason, NULL, hdrs, n);
    pq_free(last_error);
    queue_hint_ready(dst);
}

/* An unlinked READY/DELAYED message's TTL passed. */
void
queue_expire_msg(struct msg *m, uint64_t now_ms)
{
    struct queue *q = m->q;

    q->stats.expired++;
    if (q->attrs.dead_letter_expired && q->attrs.dead_letter[0] != '\0') {
        dead_letter(m, now_ms, QR_EXPIRED);
    } else {
        drop_msg(m, QR_EXPIRED, NULL);
    }
}

/* The compact message at pos is cancelled: QEV_DROP with a struct msg
 * image of it (nothing to allocate), then it goes. */
void
queue_drop_compact(struct queue *q, int p, uint64_t pos, enum qreason reason)
{
    struct rlevel *lv = &q->ready[p];
    struct cslot *s = queue_slot_at(lv, pos);
    struct msg v;

    queue_slot_view(q, p, s, &v);
    v.state = MSG_LIMBO;
    q->stats.cancelled++;
    queue_emit(q->qs, QEV_DROP, &v, q, NULL, reason, NULL, NULL, 0);
    s = queue_slot_at(lv,
                      pos); /* a listener must not change the qset: same slot */
    body_unref(&s->u.body);
    q->bytes -= s->size;
    q->n_ready--;
    queue_slot_kill(q, lv, pos);
}

/* An unlinked cancelled in-flight message reaches its end. */
void
queue_finish_cancelled(struct msg *m)
{
    m->q->stats.cancelled++;
    drop_msg(m, QR_CANCELLED, NULL);
}

/* ---- the set ---- */

/* qset_new: see queue.h. */
struct qset *
qset_new(const struct queue_defaults *d)
{
    struct qset *qs = pq_calloc(1, sizeof(*qs));

    if (qs == NULL) {
        return NULL;
    }
    if (d != NULL) {
        qs->defaults = *d;
    } else {
        queue_defaults_init(&qs->defaults);
    }
    hmap_str_init(&qs->names);
    hmap_ptr_init(&qs->msgs, offsetof(struct msg, id));
    heap_init(&qs->deadlines, deadline_less, deadline_setpos);
    qs->rng = 0x5eed5eed5eed5eedULL;
    return qs;
}

static void
free_list(struct qset *qs, struct mlist *l)
{
    while (l->head != NULL) {
        struct msg *m = l->head;

        l->head = m->next;
        (void)hmap_ptr_del(&qs->msgs, m->id);
        if (m->ext != NULL) {
            m->ext->dedup = NULL; /* the dedup table goes with the queue */
        }
        msg_free(m);
    }
    l->tail = NULL;
}

/* Free every message of a ready level and its slot storage. */
static void
level_free(struct qset *qs, struct rlevel *lv)
{
    uint64_t pos;

    free_list(qs, &lv->front);
    free_list(qs, &lv->back);
    for (pos = lv->head; pos < lv->tail; pos++) {
        struct cslot *s = queue_slot_at(lv, pos);

        if (queue_cs_kind(s) == CS_COMPACT) {
            body_unref(&s->u.body);
        } else if (queue_cs_kind(s) == CS_FULL) {
            struct msg *m = s->u.m;

            (void)hmap_ptr_del(&qs->msgs, m->id);
            if (m->ext != NULL) {
                m->ext->dedup = NULL; /* the dedup table goes with the queue */
            }
            msg_free(m);
        }
    }
    queue_slots_clear(qs, lv);
}

/* Free q and everything in it; consumers still attached are detached
 * (their in-flight messages freed). Does not touch qs->names / list. */
static void
queue_destroy(struct queue *q)
{
    struct qset *qs = q->qs;
    struct consumer *c;
    struct dedup *d;
    size_t iter = 0;
    int p;

    for (c = q->cons_head; c != NULL;) {
        struct consumer *next = c->next;
        struct mlist l = {c->inflight_head, c->inflight_tail};

        free_list(qs, &l);
        c->inflight_head = c->inflight_tail = NULL;
        c->inflight = 0;
        c->q = NULL;
        c->in_avail = false;
        c->prev = c->next = c->avail_prev = c->avail_next = NULL;
        c = next;
    }
    for (p = 0; p < PRIORITY_LEVELS; p++) {
        level_free(qs, &q->ready[p]);
    }
    free_list(qs, &q->delayed);
    while ((d = hmap_str_next(&q->dedup, &iter, NULL)) != NULL) {
        queue_dd_free(d); /* map is freed below without further lookups */
    }
    hmap_str_fini(&q->dedup);
    pq_free(q);
}

/* qset_free: see queue.h. Queues' messages are freed without events. */
void
qset_free(struct qset *qs)
{
    struct queue *q;

    if (qs == NULL) {
        return;
    }
    heap_fini(&qs->deadlines); /* nothing below needs the heap */
    for (q = qs->q_head; q != NULL;) {
        struct queue *next = q->next;

        queue_destroy(q);
        q = next;
    }
    hmap_str_fini(&qs->names);
    hmap_ptr_fini(&qs->msgs);
    while (qs->n_slabs > 0) {
        queue_slab_free(
            qs, qs->slabs[qs->n_slabs - 1]); /* every message is gone: empty */
    }
    pq_free(qs->slabs);
    pq_free(qs);
}

/* qset_seed: see queue.h. */
void
qset_seed(struct qset *qs, uint64_t seed)
{
    qs->rng = seed;
}

/* qset_set_listener: see queue.h. */
void
qset_set_listener(struct qset *qs, qset_listener_fn fn, void *arg)
{
    qs->listener = fn;
    qs->listener_arg = arg;
}

/* qset_defaults: see queue.h. */
const struct queue_defaults *
qset_defaults(const struct qset *qs)
{
    return &qs->defaults;
}

/* qset_create: see queue.h. */
int
qset_create(struct qset *qs, const char *name, const struct queue_attrs *a,
            struct queue **out)
{
    struct queue_attrs ra;
    struct queue *q;
    size_t len, dl_len;
    int rc;

    if (out != NULL) {
        *out = NULL;
    }
    len = name != NULL ? strnlen(name, QUEUE_NAME_MAX + 1) : 0;
    if (!queue_name_valid(name, len)) {
        return PQ_EINVAL;
    }
    if (a != NULL) {
        ra = *a;
    } else {
        memset(&ra, 0, sizeof(ra));
    }
    dl_len = strnlen(ra.dead_letter, sizeof(ra.dead_letter));
    if (dl_len == sizeof(ra.dead_letter) ||
        (dl_len > 0 && (!queue_name_valid(ra.dead_letter, dl_len) ||
                        strcmp(ra.dead_letter, name) == 0))) {
        return PQ_EINVAL;
    }
    memset(ra.dead_letter + dl_len, 0, sizeof(ra.dead_letter) - dl_len);
    queue_attrs_resolve(&ra, &qs->defaults);

    q = qset_find(qs, name);
    if (q != NULL) {
        if (out != NULL) {
            *out = q;
        }
        return queue_attrs_equal(&q->attrs, &ra) ? PQ_OK : PQ_EEXIST;
    }
    q = pq_calloc(1, sizeof(*q));
    if (q == NULL) {
        return PQ_ENOMEM;
    }
    memcpy(q->name, name, len);
    q->name[len] = '\0';
    q->qs = qs;
    q->attrs = ra;
    hmap_str_init(&q->dedup);
    rc = hmap_str_put(&qs->names, q->name, q);
    if (rc != PQ_OK) {
        pq_free(q);
        return rc;
    }
    q->prev = qs->q_tail;
    if (qs->q_tail != NULL) {
        qs->q_tail->next = q;
    } else {
        qs->q_head = q;
    }
    qs->q_tail = q;
    qs->n_queues++;
    if (out != NULL) {
        *out = q;
    }
    return PQ_OK;
}

/* qset_find: see queue.h. */
struct queue *
qset_find(struct qset *qs, const char *name)
{
    return hmap_str_get(&qs->names, name);
}

/* qset_delete: see queue.h. */
int
qset_delete(struct qset *qs, struct queue *q)
{
    struct mlist *lists[2 * PRIORITY_LEVELS + 1];
    int i;

    /* Held messages go with the queue, without events (queue_destroy
     * detaches their consumers): only their leases leave the heap here. */
    for (struct consumer *c = q->cons_head; c != NULL; c = c->next) {
        for (struct msg *m = c->inflight_head; m != NULL; m = m->next) {
            if (m->heap_pos != UINT32_MAX) {
                heap_remove(&qs->deadlines, m->heap_pos);
            }
        }
    }
    for (i = 0; i < PRIORITY_LEVELS; i++) {
        struct rlevel *lv = &q->ready[i];
        uint64_t pos;

        lists[2 * i] = &lv->front;
        lists[2 * i + 1] = &lv->back;
        for (pos = lv->head; pos < lv->tail; pos++) {
            struct cslot *s = queue_slot_at(lv, pos);

            if (queue_cs_kind(s) == CS_FULL && s->u.m->heap_pos != UINT32_MAX) {
                heap_remove(&qs->deadlines, s->u.m->heap_pos);
            }
        }
    }
    lists[2 * PRIORITY_LEVELS] = &q->delayed;
    for (i = 0; i <= 2 * PRIORITY_LEVELS; i++) {
        struct msg *m;

        for (m = lists[i]->head; m != NULL; m = m->next) {
            if (m->heap_pos != UINT32_MAX) {
                heap_remove(&qs->deadlines, m->heap_pos);
            }
        }
    }
    (void)hmap_str_del(&qs->names, q->name);
    if (q->prev != NULL) {
        q->prev->next = q->next;
    } else {
        qs->q_head = q->next;
    }
    if (q->next != NULL) {
        q->next->prev = q->prev;
    } else {
        qs->q_tail = q->prev;
    }
    qs->n_queues--;
    queue_destroy(q);
    return PQ_OK;
}

/* qset_first: see queue.h. */
struct queue *
qset_first(const struct qset *qs)
{
    return qs->q_head;
}

/* qset_next: see queue.h. */
struct queue *
qset_next(const struct queue *q)
{
    return q->next;
}

/* qset_queue_count: see queue.h. */
size_t
qset_queue_count(const struct qset *qs)
{
    return qs->n_queues;
}

/* qset_msg: see queue.h. */
struct msg *
qset_msg(struct qset *qs, uint64_t id)
{
    struct msg *m = hmap_ptr_get(&qs->msgs, id);
    struct queue *q;
    uint64_t pos;
    int p;

    if (m == NULL && queue_compact_find(qs, id, &q, &p, &pos)) {
        m = queue_slot_promote(q, p, pos);
    }
    return m;
}

/* qset_msg_peek: see queue.h. */
bool
qset_msg_peek(const struct qset *qs, uint64_t id, struct msg *view)
{
    struct msg *m = hmap_ptr_get(&qs->msgs, id);
    struct queue *q;
    uint64_t pos;
    int p;

    if (m != NULL) {
        *view = *m;
        return true;
    }
    if (queue_compact_find(qs, id, &q, &p, &pos)) {
        queue_slot_view(q, p, queue_slot_at(&q->ready[p], pos), view);
        return true;
    }
    return false;
}

/* qset_msg_count: see queue.h. */
size_t
qset_msg_count(const struct qset *qs)
{
    return hmap_ptr_len(&qs->msgs) + (size_t)qs->n_compact;
}

/* ---- queue accessors ---- */

/* queue_name: see queue.h. */
const char *
queue_name(const struct queue *q)
{
    return q->name;
}

/* queue_attrs: see queue.h. */
const struct queue_attrs *
queue_attrs(const struct queue *q)
{
    return &q->attrs;
}

/* queue_stats: see queue.h. */
const struct queue_stats *
queue_stats(const struct queue *q)
{
    return &q->stats;
}

/* qset_stats_reset: see queue.h. */
void
qset_stats_reset(struct qset *qs)
{
    for (struct queue *q = qs->q_head; q != NULL; q = q->next) {
        memset(&q->stats, 0, sizeof(q->stats));
    }
}

/* queue_ready_count: see queue.h. */
uint64_t
queue_ready_count(const struct queue *q)
{
    return q->n_ready;
}

/* queue_delayed_count: see queue.h. */
uint64_t
queue_delayed_count(const struct queue *q)
{
    return q->n_delayed;
}

/* queue_inflight_count: see queue.h. */
uint64_t
queue_inflight_count(const struct queue *q)
{
    return q->n_inflight;
}

/* queue_total_count: see queue.h. */
uint64_t
queue_total_count(const struct queue *q)
{
    return q->n_ready + q->n_delayed + q->n_inflight;
}

/* queue_bytes: see queue.h. */
uint64_t
queue_bytes(const struct queue *q)
{
    return q->bytes;
}

/* queue_consumer_count: see queue.h. */
uint32_t
queue_consumer_count(const struct queue *q)
{
    return q->n_consumers;
}

/* queue_first_consumer: see queue.h. */
struct consumer *
queue_first_consumer(const struct queue *q)
{
    return q->cons_head;
}

/* queue_next_consumer: see queue.h. */
struct consumer *
queue_next_consumer(const struct consumer *c)
{
    return c->next;
}

/* queue_check_room: see queue.h. */
int
queue_check_room(const struct queue *q, uint64_t n_msgs, uint64_t n_bytes)
{
    if (q->attrs.max_length != 0 &&
        (n_msgs > q->attrs.max_length ||
         queue_total_count(q) > q->attrs.max_length - n_msgs)) {
        return PQ_EFULL;
    }
    if (q->attrs.max_bytes != 0 && (n_bytes > q->attrs.max_bytes ||
                                    q->bytes > q->attrs.max_bytes - n_bytes)) {
        return PQ_EFULL;
    }
    return PQ_OK;
}

/* ---- push ---- */

/* queue_push: see queue.h. All allocation happens before the first change,
 * so a failure leaves everything as it was. */
int
queue_push(struct queue *q, const struct msg_new *mn, uint64_t now_ms,
           struct msg **out)
{
    struct qset *qs = q->qs;
    struct dedup *d = NULL, *old = NULL;
    struct msg *m;
    size_t live;
    struct queue *cq;
    uint64_t cpos;
    int rc, cp;

    queue_see_clock(qs, now_ms);
    if (mn->priority >= PRIORITY_LEVELS ||
        (mn->idem_key != NULL && mn->idem_key[0] == '\0')) {
        return PQ_EINVAL;
    }
    if (hmap_ptr_get(&qs->msgs, mn->id) != NULL ||
        queue_compact_find(qs, mn->id, &cq, &cp, &cpos)) {
        return PQ_EEXIST;
    }
    live = hmap_ptr_len(&qs->msgs);
    if (live >= UINT32_MAX - 1) {
        return PQ_ENOMEM; /* heap_pos is 32-bit */
    }
    if (queue_compactable_new(q, mn, now_ms, out != NULL)) {
        struct rlevel *lv = &q->ready[mn->priority];
        struct cslot *s;

        if (queue_slots_reserve(lv, 1) != PQ_OK) {
            return PQ_ENOMEM;
        }
        s = queue_slot_at(lv, lv->tail++);
        s->id = mn->id;
        s->u.body = body_ref(mn->body);
        queue_cs_set_kind(s, CS_COMPACT, mn->published_wall_ms);
        s->size = mn->size;
        s->pub_seg = mn->pub_seg;
        s->pub_off = mn->pub_off;
        s->pub_len = mn->pub_len;
        lv->n_live++;
        lv->n_compact++;
        qs->n_compact++;
        if (mn->id > qs->compact_max_id) {
            qs->compact_max_id = mn->id;
        }
        q->n_ready++;
        q->bytes += mn->size;
        q->stats.published++;
        queue_hint_ready(q);
        return PQ_OK;
    }
    if (mn->idem_key != NULL) {
        queue_dedup_gc(q, now_ms);
        old = hmap_str_get(&q->dedup, mn->idem_key);
        if (old != NULL && (old->m != NULL ||
                            (old->expire_ms > now_ms && !mn->key_takeover))) {
            return PQ_EEXIST;
        }
    }

    m = msg_alloc(qs);
    if (m == NULL) {
        return PQ_ENOMEM;
    }
    m->q = q; /* msg_free finds the slab through it */
    m->heap_pos = UINT32_MAX;
    if (mn->reply) {
        m->flags |= MSG_F_REPLY;
    }
    if (mn->idem_key != NULL || mn->n_requires > 0 || mn->progress != NULL) {
        rc = queue_ensure_ext(m);
        if (rc != PQ_OK) {
            goto err_free_msg;
        }
    }
    if (mn->n_requires > 0) {
        m->ext->requires = kv_copy(mn->requires, mn->n_requires);
        if (m->ext->requires == NULL) {
            rc = PQ_ENOMEM;
            goto err_free_msg;
        }
        m->ext->n_requires = mn->n_requires;
    }
    rc = hmap_ptr_reserve(&qs->msgs, live + 1);
    if (rc != PQ_OK) {
        goto err_free_msg;
    }
    if (mn->due_ms > now_ms || mn->expire_ms != 0 || q->attrs.ttl_ms != 0) {
        rc = heap_reserve(&qs->deadlines, heap_len(&qs->deadlines) + 1);
        if (rc != PQ_OK) {
            goto err_free_msg;
        }
    }
    if (mn->idem_key != NULL) {
        d = pq_calloc(1, sizeof(*d));
        if (d == NULL) {
            rc = PQ_ENOMEM;
            goto err_free_msg;
        }
        d->key = pq_strdup(mn->idem_key);
        if (d->key == NULL) {
            rc = PQ_ENOMEM;
            goto err_free_dedup;
        }
        if (old != NULL) {
            /* a gone entry: taken over, or expired but not yet reached by
             * the FIFO (clock went back) */
            queue_dd_fifo_remove(q, old);
            (void)hmap_str_del(&q->dedup, old->key);
            queue_dd_free(old);
        }
        rc = hmap_str_put(&q->dedup, d->key, d);
        if (rc != PQ_OK) {
            goto err_free_dedup;
        }
    }

    /* Commit: nothing below can fail. */
    m->id = mn->id;
    m->q = q;
    m->body = body_ref(mn->body);
    m->size = mn->size;
    m->priority = mn->priority;
    m->published_wall_ms = mn->published_wall_ms;
    m->attempt = mn->attempt;
    m->failures =
        mn->failures > UINT16_MAX ? UINT16_MAX : (uint16_t)mn->failures;
    m->pub_seg = mn->pub_seg;
    m->state_seg = mn->state_seg;
    m->pub_off = mn->pub_off;
    m->pub_len = mn->pub_len;
    if (mn->expire_ms != 0) {
        m->expire_ms = mn->expire_ms;
    } else if (q->attrs.ttl_ms != 0) {
        m->expire_ms = queue_sat_add(now_ms, q->attrs.ttl_ms);
    }
    if (mn->progress != NULL) {
        m->ext->progress = body_ref(mn->progress);
    }
    if (d != NULL) {
        d->id = mn->id;
        d->m = m;
        m->ext->dedup = d;
    }
    rc = hmap_ptr_put(&qs->msgs, m);
    assert(rc == PQ_OK); /* reserved, id checked */
    q->bytes += m->size;
    q->stats.published++;
    if (mn->due_ms > now_ms) {
        make_delayed(m, mn->due_ms);
    } else {
        queue_make_ready(m, false);
    }
    queue_sched(m);
    if (out != NULL) {
        *out = m;
    }
    if (m->state == MSG_READY) {
        queue_hint_ready(q);
    }
    return PQ_OK;

err_free_dedup:
    pq_free(d->key);
    pq_free(d);
err_free_msg:
    msg_free(m);
    return rc;
}
