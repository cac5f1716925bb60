/*
 * queue_deliver.c: delivery (round-robin over consumers with credit,
 * tags), subscriptions, what a holder answers (ack, nack, touch, release,
 * cancel), purge, and the deadline tick.
 */
#include "queue_int.h"

#include <assert.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "mem.h"
#include "pqerr.h"

/* ---- delivery ---- */

static void
deliver(struct msg *m, struct consumer *c, uint64_t now_ms)
{
    struct queue *q = m->q;
    struct mlist l;

    queue_unlink_msg(m);
    m->state = MSG_INFLIGHT;
    m->holder = c;
    if (m->attempt < UINT32_MAX) {
        m->attempt++;
    }
    if (m->attempt > 1) {
        q->stats.redelivered++;
    }
    m->due_ms = queue_sat_add(now_ms, q->attrs.ack_timeout_ms);
    l.head = c->inflight_head;
    l.tail = c->inflight_tail;
    queue_mlist_push_back(&l, m);
    c->inflight_head = l.head;
    c->inflight_tail = l.tail;
    c->inflight++;
    q->n_inflight++;
    /* round-robin: c goes to the back of the ring (or off it, if full) */
    queue_avail_remove(c);
    queue_avail_sync(c);
    queue_sched(m);
}

static bool
expired(const struct msg *m, uint64_t now_ms)
{
    return m->expire_ms != 0 && m->expire_ms <= now_ms;
}

static struct consumer *
first_unpaused(struct queue *q)
{
    struct consumer *c;

    for (c = q->avail_head; c != NULL; c = c->avail_next) {
        if (!c->paused) {
            return c;
        }
    }
    return NULL;
}

/* Deliver the entry of level p found by level_first or the walk: a full
 * message m, or (m NULL) the compact slot at pos, promoted first. NULL on
 * ENOMEM (nothing changed). */
static struct msg *
deliver_entry(struct queue *q, int p, struct msg *m, uint64_t pos,
              struct consumer *c, uint64_t now_ms)
{
    if (m == NULL && (m = queue_slot_promote(q, p, pos)) == NULL) {
        return NULL;
    }
    deliver(m, c, now_ms);
    return m;
}

/* Slow path: some ready message has requirements. Walk the ready messages
 * in order; the first one some available consumer satisfies wins. Slot
 * positions stay put during the walk (no squeeze). */
static struct msg *
next_delivery_tagged(struct queue *q, uint64_t now_ms, struct consumer **to)
{
    struct qset *qs = q->qs;
    struct msg *got = NULL;
    int p;

    qs->no_squeeze = true;
    for (p = PRIORITY_LEVELS - 1; p >= 0 && got == NULL; p--) {
        struct rlevel *lv = &q->ready[p];
        struct msg *fm = lv->front.head, *bm = lv->back.head;
        uint64_t pos = lv->head;

        for (;;) {
            struct msg *m = NULL;
            const struct kv *req;
            size_t n;
            struct consumer *c;

            if (fm != NULL) {
                m = fm;
                fm = fm->next;
            } else {
                if (pos < lv->head) {
                    pos = lv->head;
                }
                while (pos < lv->tail &&
                       queue_cs_kind(queue_slot_at(lv, pos)) == CS_DEAD) {
                    pos++;
                }
                if (bm != NULL && (pos >= lv->tail || bm->due_ms <= pos)) {
                    m = bm;
                    bm = bm->next;
                } else if (pos < lv->tail) {
                    struct cslot *s = queue_slot_at(lv, pos);

                    if (queue_cs_kind(s) == CS_FULL) {
                        m = s->u.m;
                        pos++;
                    }
                } else {
                    break;
                }
            }
            if (m == NULL) {
                /* a compact slot: no requirements, anyone may take it */
                c = first_unpaused(q);
                got = deliver_entry(q, p, NULL, pos, c, now_ms);
                if (got != NULL) {
                    *to = c;
                }
                goto out;
            }
            if (expired(m, now_ms)) {
                queue_unlink_msg(m);
                queue_expire_msg(m, now_ms);
                continue;
            }
            req = msg_requires(m, &n);
            for (c = q->avail_head; c != NULL; c = c->avail_next) {
                if (!c->paused && queue_consumer_satisfies(c, req, n)) {
                    deliver(m, c, now_ms);
                    *to = c;
                    got = m;
                    goto out;
                }
            }
        }
    }
out:
    qs->no_squeeze = false;
    for (p = 0; p < PRIORITY_LEVELS; p++) {
        queue_maybe_squeeze(qs, &q->ready[p]);
    }
    return got;
}

/* queue_next_delivery: see queue.h. */
struct msg *
queue_next_delivery(struct queue *q, uint64_t now_ms, struct consumer **to)
{
    struct consumer *c;
    struct msg *m;
    uint64_t pos;
    int p;

    queue_see_clock(q->qs, now_ms);
    *to = NULL;
    if (q->n_ready == 0 || first_unpaused(q) == NULL) {
        return NULL;
    }
    /* the delivered message gains a lease deadline (see the invariants) */
    if (heap_reserve(&q->qs->deadlines, heap_len(&q->qs->deadlines) + 1) !=
        PQ_OK) {
        return NULL;
    }
    if (q->n_ready_req > 0) {
        return next_delivery_tagged(q, now_ms, to);
    }
    for (p = PRIORITY_LEVELS - 1; p >= 0; p--) {
        while (queue_level_first(&q->ready[p], &m, &pos)) {
            if (m != NULL && expired(m, now_ms)) {
                queue_unlink_msg(m);
                queue_expire_msg(m, now_ms);
                continue;
            }
            c = first_unpaused(q);
            m = deliver_entry(q, p, m, pos, c, now_ms);
            if (m != NULL) {
                *to = c;
            }
            return m;
        }
    }
    return NULL;
}

/* ---- subscriptions ---- */

/* queue_subscribe: see queue.h. */
int
queue_subscribe(struct queue *q, struct consumer *c)
{
    if (c->q != NULL || c->prefetch == 0) {
        return PQ_EINVAL;
    }
    c->q = q;
    c->next = NULL;
    c->prev = q->cons_tail;
    if (q->cons_tail != NULL) {
        q->cons_tail->next = c;
    } else {
        q->cons_head = c;
    }
    q->cons_tail = c;
    q->n_consumers++;
    c->in_avail = false;
    queue_avail_sync(c);
    queue_hint_ready(q);
    return PQ_OK;
}

/* queue_unsubscribe: see queue.h. Walks the held messages newest first, so
 * that front-of-level requeues keep their original order. */
void
queue_unsubscribe(struct consumer *c, uint64_t now_ms)
{
    struct queue *q = c->q;

    if (q == NULL) {
        return;
    }
    queue_see_clock(q->qs, now_ms);
    queue_avail_remove(c);
    if (c->prev != NULL) {
        c->prev->next = c->next;
    } else {
        q->cons_head = c->next;
    }
    if (c->next != NULL) {
        c->next->prev = c->prev;
    } else {
        q->cons_tail = c->prev;
    }
    c->prev = c->next = NULL;
    q->n_consumers--;
    c->q = NULL; /* from here on queue_avail_sync(c) is a no-op */
    while (c->inflight_tail != NULL) {
        struct msg *m = c->inflight_tail;

        queue_unlink_msg(m);
        if (msg_is_cancelled(m)) {
            queue_finish_cancelled(m);
        } else {
            queue_fail_attempt(m, now_ms, QR_UNSUBSCRIBE, NULL);
        }
    }
    assert(c->inflight == 0);
    queue_hint_ready(q);
}

/* queue_set_prefetch: see queue.h. */
void
queue_set_prefetch(struct consumer *c, uint32_t prefetch)
{
    c->prefetch = prefetch == 0 ? 1 : prefetch;
    queue_avail_sync(c);
    if (c->q != NULL && c->in_avail) {
        queue_hint_ready(c->q);
    }
}

/* ---- answers from the holder ---- */

/* The in-flight message with this token, or NULL. */
static struct msg *
current(struct qset *qs, uint64_t id, uint32_t attempt)
{
    struct msg *m = hmap_ptr_get(&qs->msgs, id);

    if (m == NULL || m->state != MSG_INFLIGHT || m->attempt != attempt) {
        return NULL;
    }
    return m;
}

/* qset_ack: see queue.h. m->q still names the queue afterwards. */
int
qset_ack(struct qset *qs, uint64_t id, uint32_t attempt, struct msg **out)
{
    struct msg *m = current(qs, id, attempt);

    if (out != NULL) {
        *out = NULL;
    }
    if (m == NULL) {
        return PQ_ESTALE;
    }
    queue_unlink_msg(m);
    if (msg_is_cancelled(m)) {
        queue_finish_cancelled(m);
        return PQ_ESTALE;
    }
    (void)hmap_ptr_del(&qs->msgs, m->id);
    m->q->bytes -= m->size;
    m->q->stats.acked++;
    queue_dedup_release(m);
    m->state = MSG_LIMBO;
    if (out != NULL) {
        *out = m;
    } else {
        msg_free(m);
    }
    return PQ_OK;
}

/* qset_nack: see queue.h. */
int
qset_nack(struct qset *qs, uint64_t id, uint32_t attempt,
          const struct nack_opts *o, uint64_t now_ms)
{
    struct msg *m = current(qs, id, attempt);
    struct queue *q;
    char *err = NULL;

    queue_see_clock(qs, now_ms);
    if (m == NULL) {
        return PQ_ESTALE;
    }
    q = m->q;
    if (msg_is_cancelled(m)) {
        queue_unlink_msg(m);
        queue_finish_cancelled(m);
        queue_hint_ready(q);
        return PQ_ESTALE;
    }
    if (o != NULL && o->error != NULL) {
        if (queue_ensure_ext(m) != PQ_OK ||
            (err = pq_strdup(o->error)) == NULL) {
            return PQ_ENOMEM;
        }
        pq_free(m->ext->last_error);
        m->ext->last_error = err;
    }
    q->stats.nacked++;
    queue_unlink_msg(m);
    queue_fail_attempt(m, now_ms, QR_NACK, o);
    queue_hint_ready(q);
    return PQ_OK;
}

/* qset_interrupted: see queue.h. */
int
qset_interrupted(struct qset *qs, uint64_t id, uint32_t attempt,
                 uint64_t now_ms)
{
    struct msg *m, view;
    struct queue *q;

    queue_see_clock(qs, now_ms);
    m = qset_msg(qs, id);
    if (m == NULL) {
        /* live but in the compact form, and no memory to expand it */
        return qset_msg_peek(qs, id, &view) ? PQ_ENOMEM : PQ_ENOTFOUND;
    }
    if (m->state != MSG_READY && m->state != MSG_DELAYED) {
        return PQ_EINVAL;
    }
    q = m->q;
    queue_unlink_msg(m);
    if (attempt > m->attempt) {
        m->attempt = attempt;
    }
    queue_fail_attempt(m, now_ms, QR_UNSUBSCRIBE, NULL);
    queue_hint_ready(q);
    return PQ_OK;
}

int
queue_keep_progress(struct msg *m, struct body *progress)
{
    if (progress == NULL) {
        return PQ_OK;
    }
    if (queue_ensure_ext(m) != PQ_OK) {
        return PQ_ENOMEM;
    }
    body_unref(&m->ext->progress);
    m->ext->progress = body_ref(progress);
    return PQ_OK;
}

/* qset_touch: see queue.h. */
int
qset_touch(struct qset *qs, uint64_t id, uint32_t attempt, uint64_t extend_ms,
           struct body *progress, uint64_t now_ms, uint64_t *lease_ms_out)
{
    struct msg *m = current(qs, id, attempt);
    const struct queue_attrs *a;

    queue_see_clock(qs, now_ms);
    if (m == NULL || msg_is_cancelled(m)) {
        return PQ_ESTALE;
    }
    if (queue_keep_progress(m, progress) != PQ_OK) {
        return PQ_ENOMEM;
    }
    a = &m->q->attrs;
    if (extend_ms == 0) {
        extend_ms = a->ack_timeout_ms;
    }
    if (a->max_lease_ms != 0 && extend_ms > a->max_lease_ms) {
        extend_ms = a->max_lease_ms;
    }
    m->due_ms = queue_sat_add(now_ms, extend_ms);
    queue_sched(m);
    if (lease_ms_out != NULL) {
        *lease_ms_out = extend_ms;
    }
    queue_emit(qs, QEV_TOUCH, m, m->q, NULL, QR_NONE, NULL, NULL, 0);
    return PQ_OK;
}

/* qset_release: see queue.h. */
int
qset_release(struct qset *qs, uint64_t id, uint32_t attempt,
             struct body *progress, uint64_t now_ms)
{
    struct msg *m = current(qs, id, attempt);
    struct queue *q;

    queue_see_clock(qs, now_ms);
    if (m == NULL) {
        return PQ_ESTALE;
    }
    q = m->q;
    if (msg_is_cancelled(m)) {
        queue_unlink_msg(m);
        queue_finish_cancelled(m);
        queue_hint_ready(q);
        return PQ_ESTALE;
    }
    if (queue_keep_progress(m, progress) != PQ_OK) {
        return PQ_ENOMEM;
    }
    q->stats.released++;
    queue_unlink_msg(m);
    queue_requeue(m, now_ms, 0, QR_RELEASE);
    return PQ_OK;
}

/* qset_cancel: see queue.h. */
int
qset_cancel(struct qset *qs, uint64_t id, struct msg **inflight_out)
{
    struct msg *m = hmap_ptr_get(&qs->msgs, id);
    struct queue *q;
    uint64_t pos;
    int p;

    if (inflight_out != NULL) {
        *inflight_out = NULL;
    }
    if (m == NULL) {
        if (!queue_compact_find(qs, id, &q, &p, &pos)) {
            return PQ_ENOTFOUND;
        }
        queue_drop_compact(q, p, pos, QR_CANCELLED);
        return PQ_OK;
    }
    if (m->state == MSG_INFLIGHT) {
        if (m->flags & MSG_F_CANCELLED) {
            return PQ_OK; /* once: one record, one notice, one request */
        }
        m->flags |= MSG_F_CANCELLED;
        if (inflight_out != NULL) {
            *inflight_out = m;
        }
        return PQ_OK;
    }
    queue_unlink_msg(m);
    queue_finish_cancelled(m);
    return PQ_OK;
}

/* queue_purge: see queue.h. */
uint64_t
queue_purge(struct queue *q)
{
    struct qset *qs = q->qs;
    uint64_t n = 0;
    int p;

    for (p = 0; p <= 2 * PRIORITY_LEVELS; p++) {
        struct mlist *l = p == 2 * PRIORITY_LEVELS ? &q->delayed
                          : p % 2 == 0             ? &q->ready[p / 2].front
                                                   : &q->ready[p / 2].back;

        while (l->head != NULL) {
            struct msg *m = l->head;

            queue_unlink_msg(m);
            (void)hmap_ptr_del(&qs->msgs, m->id);
            q->bytes -= m->size;
            queue_dedup_release(m);
            msg_free(m);
            n++;
        }
    }
    for (p = 0; p < PRIORITY_LEVELS; p++) {
        struct rlevel *lv = &q->ready[p];
        uint64_t pos;

        for (pos = lv->head; pos < lv->tail; pos++) {
            struct cslot *s = queue_slot_at(lv, pos);

            if (queue_cs_kind(s) == CS_COMPACT) {
                q->bytes -= s->size;
                body_unref(&s->u.body);
            } else if (queue_cs_kind(s) == CS_FULL) {
                struct msg *m = s->u.m;

                if (m->heap_pos != UINT32_MAX) {
                    heap_remove(&qs->deadlines, m->heap_pos);
                }
                if (msg_has_req(m)) {
                    q->n_ready_req--;
                }
                m->state = MSG_LIMBO;
                (void)hmap_ptr_del(&qs->msgs, m->id);
                q->bytes -= m->size;
                queue_dedup_release(m);
                msg_free(m);
            } else {
                continue;
            }
            q->n_ready--;
            n++;
        }
        queue_slots_clear(qs, lv);
    }
    return n;
}

/* ---- time ---- */

/* qset_tick: see queue.h. Each message handled leaves the heap or moves to
 * a deadline > now_ms (or one that the next round expires), so it ends. */
void
qset_tick(struct qset *qs, uint64_t now_ms)
{
    struct msg *m;
    uint64_t d;

    queue_see_clock(qs, now_ms);
    while ((m = heap_peek(&qs->deadlines)) != NULL) {
        struct queue *q = m->q;

        if (!msg_deadline(m, &d) || d > now_ms) {
            break;
        }
        switch (m->state) {
        case MSG_DELAYED:
            queue_unlink_msg(m);
            if (expired(m, now_ms)) {
                queue_expire_msg(m, now_ms);
            } else {
                queue_make_ready(m, m->attempt > 0);
                queue_sched(m);
                queue_hint_ready(q);
            }
            break;
        case MSG_READY:
            queue_unlink_msg(m);
            queue_expire_msg(m, now_ms);
            break;
        case MSG_INFLIGHT:
            queue_unlink_msg(m);
            if (msg_is_cancelled(m)) {
                queue_finish_cancelled(m);
            } else {
                queue_fail_attempt(m, now_ms, QR_LEASE, NULL);
            }
            queue_hint_ready(q);
            break;
        default:
            assert(0 && "limbo message in the heap");
            return;
        }
    }
}

/* qset_next_deadline: see queue.h. */
uint64_t
qset_next_deadline(const struct qset *qs)
{
    const struct msg *m = heap_peek(&qs->deadlines);
    uint64_t d;

    if (m == NULL || !msg_deadline(m, &d)) {
        return UINT64_MAX;
    }
    return d;
}
