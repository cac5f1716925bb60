/*
 * store_verify.c: the liveness check of a log (see store_verify.h).
 *
 * Queue membership is lazy: a queue's delete bumps its generation and a
 * purge stamps its record index; an entry is live while its queue
 * generation matches and it was placed (published, requeued, kept by a
 * purge) at or after the queue's last purge. So a delete or purge costs
 * O(kept ids), not a walk over the queue.
 *
 * An orphan is an id whose first record here is a state record (REQUEUE,
 * PROGRESS; DEAD_LETTER into a live queue) rather than its PUBLISH. It is
 * proven lost at the end when no ACK/DROP followed it and no queue delete
 * or purge came after its last record (its queue is unknown, so any of
 * them may have removed it), unless a purge listed it as kept.
 */
#include "store_verify.h"

#include <stdbool.h>
#include <string.h>

#include "mem.h"
#include "pqerr.h"
#include "record.h"

struct vqueue {
    struct vqueue *next;
    uint32_t gen; /* bumped by each delete */
    bool exists;
    uint64_t purge_idx; /* record index of the last purge */
    char name[];
};

/* 40 bytes: one per message the log shows live (its id is the key). */
struct vent {
    struct vqueue *q;  /* NULL: orphan, or dead */
    uint64_t last_idx; /* last record placing it in q; on the
                          free list: the next free index + 1 */
    uint64_t at_off;   /* orphans: their last record is at
                          (state_seg, at_off) */
    uint32_t qgen;
    uint32_t pub_seg, state_seg;
    bool orphan;
    bool dl;   /* orphan first seen as a dead letter */
    bool dead; /* published to a queue that is gone */
};

void
verify_init(struct verify *v, uint32_t floor)
{
    memset(v, 0, sizeof(*v));
    hmap_u64_init(&v->ids);
    hmap_str_init(&v->queues);
    v->floor = floor;
}

void
verify_fini(struct verify *v)
{
    struct vqueue *q, *next;

    for (q = v->qlist; q != NULL; q = next) {
        next = q->next;
        pq_free(q);
    }
    hmap_u64_fini(&v->ids);
    hmap_str_fini(&v->queues);
    pq_free(v->ents);
    memset(v, 0, sizeof(*v));
}

/* ---- queues ---- */

static struct vqueue *
queue_get(struct verify *v, struct rec_str name, bool create)
{
    char buf[512];
    struct vqueue *q;

    if (name.len == 0 || name.len >= sizeof(buf)) {
        return NULL;
    }
    memcpy(buf, name.ptr, name.len);
    buf[name.len] = '\0';
    q = hmap_str_get(&v->queues, buf);
    if (q != NULL || !create) {
        return q;
    }
    q = pq_calloc(1, sizeof(*q) + name.len + 1);
    if (q == NULL) {
        v->oom = PQ_ENOMEM;
        return NULL;
    }
    memcpy(q->name, buf, name.len + 1);
    if (hmap_str_put(&v->queues, q->name, q) != PQ_OK) {
        pq_free(q);
        v->oom = PQ_ENOMEM;
        return NULL;
    }
    q->next = v->qlist;
    v->qlist = q;
    return q;
}

/* live_queue: the queue named, if it exists now. */
static struct vqueue *
live_queue(struct verify *v, struct rec_str name)
{
    struct vqueue *q = queue_get(v, name, false);

    return q != NULL && q->exists ? q : NULL;
}

/* ---- entries ---- */

static struct vent *
ent_find(struct verify *v, uint64_t id)
{
    void *p = hmap_u64_get(&v->ids, id);

    return p != NULL ? &v->ents[(uintptr_t)p - 1] : NULL;
}

static struct vent *
ent_add(struct verify *v, uint64_t id)
{
    size_t i;

    if (v->free_head != 0) {
        i = v->free_head - 1;
        v->free_head = (size_t)v->ents[i].last_idx;
    } else {
        if (v->nents == v->cap) {
            size_t ncap = v->cap ? v->cap * 2 : 1024;
            struct vent *n = pq_realloc(v->ents, ncap * sizeof(*n));

            if (n == NULL) {
                v->oom = PQ_ENOMEM;
                return NULL;
            }
            v->ents = n;
            v->cap = ncap;
        }
        i = v->nents++;
    }
    if (hmap_u64_put(&v->ids, id, (void *)(uintptr_t)(i + 1)) != PQ_OK) {
        v->ents[i].last_idx = v->free_head;
        v->free_head = i + 1;
        v->oom = PQ_ENOMEM;
        return NULL;
    }
    memset(&v->ents[i], 0, sizeof(v->ents[i]));
    return &v->ents[i];
}

static void
ent_del(struct verify *v, uint64_t id)
{
    void *p = hmap_u64_del(&v->ids, id);

    if (p != NULL) {
        size_t i = (uintptr_t)p - 1;

        v->ents[i].last_idx = v->free_head;
        v->free_head = i + 1;
    }
}

/* alive: a known (non-orphan) entry still in its queue. */
static bool
alive(const struct vent *e)
{
    return !e->orphan && !e->dead && e->q != NULL && e->q->exists &&
           e->q->gen == e->qgen && e->last_idx >= e->q->purge_idx;
}

/* place: e now lives in q, its record at loc is both its PUBLISH and its
 * state (publish, compaction move, dead letter). */
static void
place(struct verify *v, struct vent *e, struct vqueue *q,
      const struct store_loc *loc)
{
    e->q = q;
    e->qgen = q->gen;
    e->orphan = e->dl = e->dead = false;
    e->pub_seg = e->state_seg = loc->seg;
    e->last_idx = v->idx;
}

/* state: a state record for id at loc (REQUEUE, PROGRESS). */
static void
state(struct verify *v, uint64_t id, const struct store_loc *loc)
{
    struct vent *e = ent_find(v, id);

    if (e == NULL) {
        e = ent_add(v, id);
        if (e == NULL) {
            return;
        }
        e->orphan = true;
    }
    if (e->orphan) {
        e->last_idx = v->idx;
        e->state_seg = loc->seg;
        e->at_off = loc->off;
    } else if (alive(e)) {
        e->state_seg = loc->seg;
    }
}

static void
dead_letter(struct verify *v, const struct rec_dead_letter *d,
            const struct store_loc *loc)
{
    struct vqueue *to = live_queue(v, d->target);
    struct vent *e = ent_find(v, d->id);

    if (e != NULL && !e->orphan) {
        if (!alive(e)) {
            return;
        }
        if (to == NULL) {
            ent_del(v, d->id); /* dropped: its target is gone */
        } else {
            place(v, e, to, loc);
        }
        return;
    }
    if (to == NULL) {
        ent_del(v, d->id);
        return;
    }
    if (e == NULL && (e = ent_add(v, d->id)) == NULL) {
        return;
    }
    if (!e->orphan) {
        e->orphan = e->dl = true;
    }
    e->last_idx = v->idx;
    e->state_seg = loc->seg;
    e->at_off = loc->off;
}

static void
purge(struct verify *v, const struct rec_queue_purge *p)
{
    struct vqueue *q = live_queue(v, p->name);

    v->last_bulk_idx = v->idx;
    if (q == NULL) {
        return;
    }
    q->purge_idx = v->idx;
    for (uint32_t i = 0; i < p->n_keep; i++) {
        struct vent *e = ent_find(v, record_purge_keep_id(p, i));

        if (e != NULL && (e->orphan || (e->q == q && e->qgen == q->gen))) {
            e->last_idx = v->idx;
        }
    }
}

static void
verify_publish(struct verify *v, const struct rec_publish *p,
               const struct store_loc *loc)
{
    struct vqueue *q = live_queue(v, p->queue);
    struct vent *e = ent_find(v, p->id);

    if (e == NULL && (e = ent_add(v, p->id)) == NULL) {
        return;
    }
    if (q == NULL) {
        /* Replay ignores it (its queue is gone): so do its later
         * records, which must not count as orphans. */
        e->orphan = e->dl = false;
        e->dead = true;
        e->q = NULL;
    } else {
        place(v, e, q, loc);
    }
}

void
verify_record(struct verify *v, uint8_t type, const uint8_t *body, size_t len,
              const struct store_loc *loc)
{
    struct record r;
    struct vqueue *q;

    v->idx++;
    if (record_decode(type, body, len, &r) != PQ_OK) {
        return;
    }
    switch (r.type) {
    case REC_QUEUE_CREATE:
        q = queue_get(v, r.u.queue_create.name, true);
        if (q != NULL) {
            q->exists = true;
        }
        break;
    case REC_QUEUE_DELETE:
        v->last_bulk_idx = v->idx;
        q = live_queue(v, r.u.queue_delete.name);
        if (q != NULL) {
            q->exists = false;
            q->gen++;
        }
        break;
    case REC_QUEUE_PURGE:
        purge(v, &r.u.queue_purge);
        break;
    case REC_PUBLISH:
        verify_publish(v, &r.u.publish, loc);
        break;
    case REC_PUBLISH_BATCH: {
        struct rec_publish p;
        size_t cur = 0;

        while (record_batch_next(&r.u.batch, &cur, &p)) {
            verify_publish(v, &p, loc);
        }
        break;
    }
    case REC_ACK:
        ent_del(v, r.u.ack.id);
        break;
    case REC_DROP:
        ent_del(v, r.u.drop.id);
        break;
    case REC_REQUEUE:
        state(v, r.u.requeue.id, loc);
        break;
    case REC_PROGRESS:
        state(v, r.u.progress.id, loc);
        break;
    case REC_DELIVER:
        /* Proves nothing live: replay ignores a delivery of a message it
         * does not hold (acked since, or its PUBLISH in a deleted
         * segment), and a DELIVER keeps no segment. */
        break;
    case REC_DEAD_LETTER:
        dead_letter(v, &r.u.dead_letter, loc);
        break;
    case REC_ATOMIC: {
        /* As replay: the inner record, then each publish, all here. */
        struct rec_bytes raw;
        size_t cur = 0;

        verify_record(v, r.u.atomic.inner_type, r.u.atomic.inner_raw.ptr,
                      r.u.atomic.inner_raw.len, loc);
        while (record_atomic_next_publish(&r.u.atomic, &cur, &raw, NULL)) {
            verify_record(v, REC_PUBLISH, raw.ptr, raw.len, loc);
        }
        break;
    }
    default:
        break;
    }
}

static bool
loc_before(const struct store_loc *a, const struct store_loc *b)
{
    return a->seg < b->seg || (a->seg == b->seg && a->off < b->off);
}

int
verify_finish(struct verify *v, struct verify_result *out)
{
    size_t it = 0;
    uint64_t id;
    void *p;

    memset(out, 0, sizeof(*out));
    while ((p = hmap_u64_next(&v->ids, &it, &id)) != NULL) {
        struct vent *e = &v->ents[(uintptr_t)p - 1];
        struct store_loc at = {.seg = e->state_seg, .off = e->at_off};

        if (e->orphan) {
            if (v->last_bulk_idx > e->last_idx || at.seg <= v->floor) {
                continue; /* a delete or purge may have removed it */
            }
            if (e->dl) {
                out->dl_orphans++;
                continue;
            }
            if (out->orphans++ == 0 || loc_before(&at, &out->orphan_at)) {
                out->orphan_at = at;
                out->orphan_id = id;
            }
            continue;
        }
        if (!alive(e)) {
            continue;
        }
        out->live++;
        for (int k = 0; k < 2; k++) {
            uint32_t s = k == 0 ? e->pub_seg : e->state_seg;

            if (out->min_seg == 0 || s < out->min_seg) {
                out->min_seg = s;
            }
            if (s > out->max_seg) {
                out->max_seg = s;
            }
        }
    }
    return v->oom;
}
