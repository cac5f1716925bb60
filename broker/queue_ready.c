/*
 * queue_ready.c: the ready structure of a queue (see struct rlevel in
 * queue_int.h): message lists, slabs of struct msg, compact slots, and the
 * walks and sorting the journal uses after a replay.
 */
#include "queue_int.h"

#include <assert.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "mem.h"
#include "pqerr.h"

/* ---- message lists ---- */

void
queue_mlist_push_back(struct mlist *l, struct msg *m)
{
    m->next = NULL;
    m->prev = l->tail;
    if (l->tail != NULL) {
        l->tail->next = m;
    } else {
        l->head = m;
    }
    l->tail = m;
}

void
queue_mlist_push_front(struct mlist *l, struct msg *m)
{
    m->prev = NULL;
    m->next = l->head;
    if (l->head != NULL) {
        l->head->prev = m;
    } else {
        l->tail = m;
    }
    l->head = m;
}

void
queue_mlist_remove(struct mlist *l, struct msg *m)
{
    if (m->prev != NULL) {
        m->prev->next = m->next;
    } else {
        l->head = m->next;
    }
    if (m->next != NULL) {
        m->next->prev = m->prev;
    } else {
        l->tail = m->prev;
    }
    m->prev = m->next = NULL;
}

/* ---- message slabs ---- */

static void
room_push(struct qset *qs, struct msg_slab *s)
{
    assert(!s->has_room);
    s->prev = NULL;
    s->next = qs->room;
    if (qs->room != NULL) {
        qs->room->prev = s;
    }
    qs->room = s;
    s->has_room = true;
}

static void
room_remove(struct qset *qs, struct msg_slab *s)
{
    assert(s->has_room);
    if (s->prev != NULL) {
        s->prev->next = s->next;
    } else {
        qs->room = s->next;
    }
    if (s->next != NULL) {
        s->next->prev = s->prev;
    }
    s->prev = s->next = NULL;
    s->has_room = false;
}

/* Index in qs->slabs of the first slab whose address is above p. */
static size_t
slab_upper(const struct qset *qs, const void *p)
{
    size_t lo = 0, hi = qs->n_slabs;

    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;

        if ((uintptr_t)qs->slabs[mid] <= (uintptr_t)p) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

/* The slab holding m: O(log slabs). */
static struct msg_slab *
slab_of(const struct qset *qs, const struct msg *m)
{
    size_t i = slab_upper(qs, m);
    struct msg_slab *s;

    assert(i > 0);
    s = qs->slabs[i - 1];
    assert(m >= s->msgs && m < s->msgs + MSG_SLAB_LEN);
    return s;
}

static struct msg_slab *
slab_new(struct qset *qs)
{
    struct msg_slab *s;
    size_t i;

    if (qs->n_slabs == qs->slabs_cap) {
        size_t cap = qs->slabs_cap < 8 ? 8 : qs->slabs_cap * 2;
        struct msg_slab **a = pq_realloc(qs->slabs, cap * sizeof(*a));

        if (a == NULL) {
            return NULL;
        }
        qs->slabs = a;
        qs->slabs_cap = cap;
    }
    s = pq_malloc(sizeof(*s));
    if (s == NULL) {
        return NULL;
    }
    s->prev = s->next = NULL;
    s->free = NULL;
    s->used = 0;
    s->fresh = 0;
    s->has_room = false;
    POISON(s->msgs, sizeof(s->msgs));
    i = slab_upper(qs, s);
    memmove(&qs->slabs[i + 1], &qs->slabs[i],
            (qs->n_slabs - i) * sizeof(qs->slabs[0]));
    qs->slabs[i] = s;
    qs->n_slabs++;
    qs->n_empty++;
    room_push(qs, s);
    return s;
}

void
queue_slab_free(struct qset *qs, struct msg_slab *s)
{
    size_t i = slab_upper(qs, s);

    assert(s->used == 0 && i > 0 && qs->slabs[i - 1] == s);
    memmove(&qs->slabs[i - 1], &qs->slabs[i],
            (qs->n_slabs - i) * sizeof(qs->slabs[0]));
    qs->n_slabs--;
    qs->n_empty--;
    if (s->has_room) {
        room_remove(qs, s);
    }
    UNPOISON(s->msgs, sizeof(s->msgs));
    pq_free(s);
}

/* A zeroed struct msg, or NULL on ENOMEM. */
struct msg *
msg_alloc(struct qset *qs)
{
    struct msg_slab *s = qs->room;
    struct msg *m;

    if (s == NULL && (s = slab_new(qs)) == NULL) {
        return NULL;
    }
    if (s->free != NULL) {
        m = s->free;
        UNPOISON(m, sizeof(*m));
        s->free = m->next;
    } else {
        m = &s->msgs[s->fresh++];
        UNPOISON(m, sizeof(*m));
    }
    if (s->used++ == 0) {
        qs->n_empty--;
    }
    if (s->free == NULL && s->fresh == MSG_SLAB_LEN) {
        room_remove(qs, s);
    }
    memset(m, 0, sizeof(*m));
    return m;
}

/* Give m's slot back; an emptied slab is freed unless it is the only empty one.
 */
static void
msg_release(struct qset *qs, struct msg *m)
{
    struct msg_slab *s = slab_of(qs, m);

    m->next = s->free;
    s->free = m;
    POISON(m, sizeof(*m));
    if (!s->has_room) {
        room_push(qs, s);
    }
    assert(s->used > 0);
    if (--s->used == 0) {
        qs->n_empty++;
        if (qs->n_empty > 1) {
            queue_slab_free(qs, s);
        }
    }
}

/* msg_free: see queue.h. Also used internally once m is unlinked; m->q
 * must name a queue of the qset (its slab is found through it). */
void
msg_free(struct msg *m)
{
    if (m == NULL) {
        return;
    }
    if (m->ext != NULL) {
        assert(m->ext->dedup == NULL); /* released while the queue was known */
        pq_free(m->ext->requires);
        body_unref(&m->ext->progress);
        pq_free(m->ext->last_error);
        pq_free(m->ext);
    }
    body_unref(&m->body);
    msg_release(m->q->qs, m);
}

/* ---- compact slots (see struct cslot) ---- */

static uint64_t
cs_wall(const struct cslot *s)
{
    return s->wall_kind & CS_WALL_MASK;
}

/* Room for n more slots at the tail. PQ_OK or PQ_ENOMEM (chunks already
 * added stay, unused). */
int
queue_slots_reserve(struct rlevel *lv, uint64_t n)
{
    uint64_t need = lv->tail + n - lv->base;
    size_t chunks = (size_t)((need + CSLOT_CHUNK - 1) / CSLOT_CHUNK);

    if (chunks > lv->chunks_cap) {
        size_t cap = lv->chunks_cap < 4 ? 4 : lv->chunks_cap * 2;
        struct cchunk **a;

        if (cap < chunks) {
            cap = chunks;
        }
        a = pq_realloc(lv->chunks, cap * sizeof(*a));
        if (a == NULL) {
            return PQ_ENOMEM;
        }
        lv->chunks = a;
        lv->chunks_cap = cap;
    }
    while (lv->n_chunks < chunks) {
        struct cchunk *c = pq_malloc(sizeof(*c));

        if (c == NULL) {
            return PQ_ENOMEM;
        }
        lv->chunks[lv->n_chunks++] = c;
    }
    return PQ_OK;
}

/* Free the chunks wholly below head, and those wholly at or above tail. */
static void
slots_trim(struct rlevel *lv)
{
    size_t k = (size_t)((lv->head - lv->base) / CSLOT_CHUNK);
    size_t keep, i;

    if (k > 0) {
        for (i = 0; i < k; i++) {
            pq_free(lv->chunks[i]);
        }
        memmove(lv->chunks, lv->chunks + k,
                (lv->n_chunks - k) * sizeof(lv->chunks[0]));
        lv->n_chunks -= k;
        lv->base += (uint64_t)k * CSLOT_CHUNK;
    }
    keep = (size_t)((lv->tail - lv->base + CSLOT_CHUNK - 1) / CSLOT_CHUNK);
    while (lv->n_chunks > keep) {
        pq_free(lv->chunks[--lv->n_chunks]);
    }
    if (lv->n_chunks == 0 && lv->chunks_cap > 0) {
        pq_free(lv->chunks);
        lv->chunks = NULL;
        lv->chunks_cap = 0;
    }
}

/* Drop every slot (the caller has dealt with their contents). */
void
queue_slots_clear(struct qset *qs, struct rlevel *lv)
{
    qs->n_compact -= lv->n_compact;
    lv->n_compact = lv->n_live = 0;
    lv->head = lv->tail;
    if (lv->back.head == NULL) {
        lv->base = lv->head = lv->tail = 0; /* no seq refers to a position */
        while (lv->n_chunks > 0) {
            pq_free(lv->chunks[--lv->n_chunks]);
        }
    }
    slots_trim(lv);
}

/* Position of the live slot holding id, or POS_NONE. O(log n). */
uint64_t
queue_slot_find(const struct rlevel *lv, uint64_t id)
{
    uint64_t lo = lv->head, hi = lv->tail;
    const struct cslot *s;

    if (lo == hi || id < queue_slot_at(lv, lo)->id ||
        id > queue_slot_at(lv, hi - 1)->id) {
        return POS_NONE;
    }
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;

        if (queue_slot_at(lv, mid)->id < id) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    if (lo == lv->tail) {
        return POS_NONE;
    }
    s = queue_slot_at(lv, lo);
    return s->id == id && queue_cs_kind(s) != CS_DEAD ? lo : POS_NONE;
}

/* The compact slot holding id anywhere in qs: O(levels holding compact
 * slots * log n); immediate for an id above every compact one. */
bool
queue_compact_find(const struct qset *qs, uint64_t id, struct queue **q_out,
                   int *p_out, uint64_t *pos_out)
{
    struct queue *q;
    int p;

    if (qs->n_compact == 0 || id > qs->compact_max_id) {
        return false;
    }
    for (q = qs->q_head; q != NULL; q = q->next) {
        for (p = 0; p < PRIORITY_LEVELS; p++) {
            struct rlevel *lv = &q->ready[p];
            uint64_t pos;

            if (lv->n_compact == 0) {
                continue;
            }
            pos = queue_slot_find(lv, id);
            if (pos != POS_NONE &&
                queue_cs_kind(queue_slot_at(lv, pos)) == CS_COMPACT) {
                *q_out = q;
                *p_out = p;
                *pos_out = pos;
                return true;
            }
        }
    }
    return false;
}

/* A read-only struct msg image of a compact slot. */
void
queue_slot_view(struct queue *q, int p, const struct cslot *s, struct msg *v)
{
    memset(v, 0, sizeof(*v));
    v->id = s->id;
    v->q = q;
    v->body = s->u.body;
    v->published_wall_ms = cs_wall(s);
    v->size = s->size;
    v->heap_pos = UINT32_MAX;
    v->pub_seg = v->state_seg = s->pub_seg;
    v->pub_off = s->pub_off;
    v->pub_len = s->pub_len;
    v->priority = (uint8_t)p;
    v->state = MSG_READY;
}

/* Turn the slot at pos into a struct msg in place (same position). The
 * message, or NULL on ENOMEM (nothing changed). */
struct msg *
queue_slot_promote(struct queue *q, int p, uint64_t pos)
{
    struct qset *qs = q->qs;
    struct rlevel *lv = &q->ready[p];
    struct cslot *s = queue_slot_at(lv, pos);
    struct msg *m;
    int rc;

    if (queue_cs_kind(s) == CS_FULL) {
        return s->u.m;
    }
    assert(queue_cs_kind(s) == CS_COMPACT);
    if (hmap_ptr_reserve(&qs->msgs, hmap_ptr_len(&qs->msgs) + 1) != PQ_OK) {
        return NULL;
    }
    m = msg_alloc(qs);
    if (m == NULL) {
        return NULL;
    }
    queue_slot_view(q, p, s, m);
    m->flags = MSG_F_SLOT;
    rc = hmap_ptr_put(&qs->msgs, m);
    assert(rc == PQ_OK); /* reserved, id unique */
    (void)rc;
    s->u.m = m;
    queue_cs_set_kind(s, CS_FULL, 0);
    lv->n_compact--;
    qs->n_compact--;
    return m;
}

/* Squeeze out the tombstones of lv: positions and back seqs renumbered. */
static void
level_squeeze(struct rlevel *lv)
{
    uint64_t r, w = lv->head;
    struct msg *b = lv->back.head;

    for (r = lv->head; r < lv->tail; r++) {
        struct cslot *s = queue_slot_at(lv, r);

        while (b != NULL && b->due_ms <= r) {
            b->due_ms = w;
            b = b->next;
        }
        if (queue_cs_kind(s) != CS_DEAD) {
            if (w != r) {
                *queue_slot_at(lv, w) = *s;
            }
            w++;
        }
    }
    for (; b != NULL; b = b->next) {
        b->due_ms = w;
    }
    lv->tail = w;
    slots_trim(lv);
}

void
queue_maybe_squeeze(struct qset *qs, struct rlevel *lv)
{
    uint64_t span = lv->tail - lv->head;

    if (!qs->no_squeeze && span >= 2 * CSLOT_CHUNK && lv->n_live < span / 4) {
        level_squeeze(lv);
    }
}

/* The slot at pos leaves (its contents are the caller's). */
void
queue_slot_kill(struct queue *q, struct rlevel *lv, uint64_t pos)
{
    struct cslot *s = queue_slot_at(lv, pos);

    if (queue_cs_kind(s) == CS_COMPACT) {
        lv->n_compact--;
        q->qs->n_compact--;
    }
    assert(queue_cs_kind(s) != CS_DEAD);
    queue_cs_set_kind(s, CS_DEAD, 0);
    s->u.body = NULL;
    lv->n_live--;
    if (pos == lv->head) {
        while (lv->head < lv->tail &&
               queue_cs_kind(queue_slot_at(lv, lv->head)) == CS_DEAD) {
            lv->head++;
        }
        slots_trim(lv);
    } else {
        queue_maybe_squeeze(q->qs, lv);
    }
}

/* The first ready entry of lv: a full message (*m set) or the compact slot
 * at *pos (*m NULL). false when lv is empty. */
bool
queue_level_first(const struct rlevel *lv, struct msg **m, uint64_t *pos)
{
    *m = NULL;
    *pos = POS_NONE;
    if (lv->front.head != NULL) {
        *m = lv->front.head;
        return true;
    }
    if (lv->back.head != NULL &&
        (lv->head == lv->tail || lv->back.head->due_ms <= lv->head)) {
        *m = lv->back.head;
        return true;
    }
    if (lv->head < lv->tail) {
        const struct cslot *s = queue_slot_at(lv, lv->head);

        if (queue_cs_kind(s) == CS_FULL) {
            *m = s->u.m;
        } else {
            *pos = lv->head;
        }
        return true;
    }
    return false;
}

/* A new message that can be kept in a compact slot at the tail of its
 * level: READY, never delivered, nothing optional, no pointer wanted. */
bool
queue_compactable_new(const struct queue *q, const struct msg_new *mn,
                      uint64_t now_ms, bool want_ptr)
{
    const struct rlevel *lv = &q->ready[mn->priority];

    return !want_ptr && mn->due_ms <= now_ms && mn->expire_ms == 0 &&
           q->attrs.ttl_ms == 0 && mn->idem_key == NULL &&
           mn->n_requires == 0 && mn->progress == NULL && mn->attempt == 0 &&
           mn->failures == 0 && !mn->reply && mn->state_seg == mn->pub_seg &&
           mn->published_wall_ms <= CS_WALL_MASK &&
           (lv->head == lv->tail ||
            mn->id > queue_slot_at(lv, lv->tail - 1)->id);
}

/* The same test for an existing READY message (qset_sort_ready). */
static bool
compactable_msg(const struct msg *m)
{
    return m->state == MSG_READY && m->attempt == 0 && m->failures == 0 &&
           m->ext == NULL && m->expire_ms == 0 && m->heap_pos == UINT32_MAX &&
           (m->flags & (MSG_F_CANCELLED | MSG_F_REPLY)) == 0 &&
           m->state_seg == m->pub_seg && m->published_wall_ms <= CS_WALL_MASK;
}

/* ---- walking and restoring (for the journal) ---- */

static void
foreach_list(struct msg *m, void (*fn)(void *arg, struct msg *m), void *arg)
{
    while (m != NULL) {
        struct msg *next = m->next;

        fn(arg, m);
        m = next;
    }
}

/* queue_foreach_msg: see queue.h. Walks q's own lists and slots: O(live
 * messages of q). A compact message is shown as a struct msg image; the
 * fields fn may change are copied back (a state_seg of its own makes it a
 * struct msg, if there is memory for one). */
void
queue_foreach_msg(struct queue *q, void (*fn)(void *arg, struct msg *m),
                  void *arg)
{
    struct consumer *c;
    int p;

    for (p = PRIORITY_LEVELS - 1; p >= 0; p--) {
        struct rlevel *lv = &q->ready[p];
        uint64_t pos;

        foreach_list(lv->front.head, fn, arg);
        for (pos = lv->head; pos < lv->tail; pos++) {
            struct cslot *s = queue_slot_at(lv, pos);
            struct msg v, *m;

            if (queue_cs_kind(s) == CS_FULL) {
                fn(arg, s->u.m);
                continue;
            }
            if (queue_cs_kind(s) != CS_COMPACT) {
                continue;
            }
            queue_slot_view(q, p, s, &v);
            fn(arg, &v);
            s->u.body = v.body;
            s->pub_seg = v.pub_seg;
            s->pub_off = v.pub_off;
            s->pub_len = v.pub_len;
            if (v.state_seg != v.pub_seg &&
                (m = queue_slot_promote(q, p, pos)) != NULL) {
                m->state_seg = v.state_seg;
            }
        }
        foreach_list(lv->back.head, fn, arg);
    }
    foreach_list(q->delayed.head, fn, arg);
    for (c = q->cons_head; c != NULL; c = c->next) {
        foreach_list(c->inflight_head, fn, arg);
    }
}

/* msg_set_progress: see queue.h. */
int
msg_set_progress(struct msg *m, struct body *progress)
{
    return queue_keep_progress(m, progress);
}

/* Merge two id-sorted chains linked through next. */
static struct msg *
merge_by_id(struct msg *a, struct msg *b)
{
    struct msg head = {0}, *t = &head;

    while (a != NULL && b != NULL) {
        if (a->id <= b->id) {
            t->next = a;
            a = a->next;
        } else {
            t->next = b;
            b = b->next;
        }
        t = t->next;
    }
    t->next = a != NULL ? a : b;
    return head.next;
}

/* Sort one ready list by id (merge sort, O(n log n), no allocation). */
static void
mlist_sort_by_id(struct mlist *l)
{
    struct msg *bins[64] = {0}, *m, *next, *prev = NULL;
    int i, top = 0;

    for (m = l->head; m != NULL; m = next) {
        next = m->next;
        m->next = NULL;
        for (i = 0; i < 64 && bins[i] != NULL; i++) {
            m = merge_by_id(bins[i], m);
            bins[i] = NULL;
        }
        bins[i < 64 ? i : 63] = m;
        if (i >= top) {
            top = i + 1;
        }
    }
    m = NULL;
    for (i = 0; i < top; i++) {
        m = merge_by_id(bins[i], m);
    }
    l->head = m;
    for (; m != NULL; m = m->next) {
        m->prev = prev;
        prev = m;
    }
    l->tail = prev;
}

/* Put level p of q in id order: its front and back lists are merged into
 * the slots (compactable messages become compact slots, the others CS_FULL
 * ones). Merges from the tail down, in place: only room for the listed
 * messages is allocated. PQ_OK or PQ_ENOMEM (nothing changed). */
static int
level_sort(struct queue *q, int p)
{
    struct qset *qs = q->qs;
    struct rlevel *lv = &q->ready[p];
    struct mlist l = {NULL, NULL};
    struct msg *m;
    uint64_t k = 0, r, w;

    for (m = lv->front.head; m != NULL; m = m->next) {
        k++;
    }
    for (m = lv->back.head; m != NULL; m = m->next) {
        k++;
    }
    if (k == 0) {
        return PQ_OK;
    }
    if (queue_slots_reserve(lv, k) != PQ_OK) {
        return PQ_ENOMEM;
    }
    /* one list, front then back, then sorted */
    l = lv->front;
    if (lv->back.head != NULL) {
        if (l.tail != NULL) {
            l.tail->next = lv->back.head;
            lv->back.head->prev = l.tail;
        } else {
            l.head = lv->back.head;
        }
        l.tail = lv->back.tail;
    }
    lv->front.head = lv->front.tail = lv->back.head = lv->back.tail = NULL;
    mlist_sort_by_id(&l);

    r = lv->tail;
    w = lv->tail + k;
    m = l.tail;
    while (m != NULL || r > lv->head) {
        struct cslot *s;

        if (r > lv->head &&
            queue_cs_kind(queue_slot_at(lv, r - 1)) == CS_DEAD) {
            r--;
            continue;
        }
        s = queue_slot_at(lv, --w);
        if (r > lv->head &&
            (m == NULL || queue_slot_at(lv, r - 1)->id > m->id)) {
            r--;
            if (w != r) {
                *s = *queue_slot_at(lv, r);
            }
            continue;
        }
        /* m goes here */
        {
            struct msg *prev = m->prev;

            m->next = m->prev = NULL;
            m->due_ms = 0;
            m->flags &= ~(MSG_F_SLOT | MSG_F_BACK);
            s->id = m->id;
            if (compactable_msg(m)) {
                s->u.body = m->body;
                m->body = NULL; /* the slot owns the reference now */
                queue_cs_set_kind(s, CS_COMPACT, m->published_wall_ms);
                s->size = m->size;
                s->pub_seg = m->pub_seg;
                s->pub_off = m->pub_off;
                s->pub_len = m->pub_len;
                lv->n_compact++;
                qs->n_compact++;
                if (m->id > qs->compact_max_id) {
                    qs->compact_max_id = m->id;
                }
                (void)hmap_ptr_del(&qs->msgs, m->id);
                msg_free(m);
            } else {
                s->u.m = m;
                queue_cs_set_kind(s, CS_FULL, 0);
                m->flags |= MSG_F_SLOT;
            }
            m = prev;
        }
    }
    lv->head = w;
    lv->tail += k;
    lv->n_live = lv->tail - lv->head;
    slots_trim(lv);
    return PQ_OK;
}

/* qset_sort_ready: see queue.h. */
int
qset_sort_ready(struct qset *qs)
{
    for (struct queue *q = qs->q_head; q != NULL; q = q->next) {
        for (int p = 0; p < PRIORITY_LEVELS; p++) {
            if (level_sort(q, p) != PQ_OK) {
                return PQ_ENOMEM;
            }
        }
    }
    return PQ_OK;
}
