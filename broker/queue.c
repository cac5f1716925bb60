/*
 * queue.c: the queue set (see queue.h for the state table, ordering, backoff
 * and event rules). Owns every struct queue, struct msg, msg_ext and dedup
 * entry; borrows the struct consumer objects the caller embeds.
 *
 * Invariants:
 *  - every live message is in qs->msgs (by id) and in exactly one of: a
 *    ready list of its queue (READY), its queue's delayed list (DELAYED), its
 *    holder's in-flight list (INFLIGHT);
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
#include "queue.h"

#include <assert.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "heap.h"
#include "hmap.h"
#include "mem.h"
#include "pqerr.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define POISON(p, n) ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif

enum { MSG_LIMBO = 0xf }; /* unlinked for a moment inside one call (4-bit state) */

/* struct msg allocation: slabs of MSG_SLAB_LEN messages (~100 KiB). */
enum { MSG_SLAB_LEN = 1024 };

struct msg_slab {
    struct msg_slab *prev, *next; /* qset's list of slabs with room */
    struct msg *free;             /* freed slots, linked through next */
    uint32_t used;                /* live messages here */
    uint32_t fresh;               /* slots [fresh, MSG_SLAB_LEN) never used yet */
    bool has_room;                /* on the qset's room list */
    struct msg msgs[MSG_SLAB_LEN];
};

/* Optional parts of a message; allocated only when one is used. */
struct msg_ext {
    struct kv *requires;          /* one block (kv_copy), or NULL */
    size_t n_requires;
    struct body *progress;        /* latest Progress, kept across attempts */
    char *last_error;             /* text of the latest nack error */
    struct dedup *dedup;          /* live idempotency entry, or NULL */
};

/* An idempotency key of one queue. While its message lives, m is set; once
 * it is gone, expire_ms is set and the entry sits on the queue's FIFO. */
struct dedup {
    char *key;                    /* owned; also the hmap key */
    uint64_t id;                  /* the first message's id */
    struct msg *m;                /* live message, or NULL */
    uint64_t expire_ms;           /* when m == NULL: forget at this time */
    struct dedup *prev, *next;    /* FIFO of gone entries, expiry order */
};

struct mlist {
    struct msg *head, *tail;
};

struct queue {
    char name[QUEUE_NAME_MAX + 1];
    struct qset *qs;
    struct queue *prev, *next;    /* qset's list, creation order */
    struct queue_attrs attrs;     /* resolved */
    struct queue_stats stats;
    struct mlist ready[PRIORITY_LEVELS];
    struct mlist delayed;         /* unordered; the heap orders them */
    uint64_t n_ready, n_delayed, n_inflight;
    uint64_t n_ready_req;         /* READY messages that have requirements */
    uint64_t bytes;               /* sum of msg.size */
    uint32_t n_consumers;
    struct consumer *cons_head, *cons_tail;
    struct consumer *avail_head, *avail_tail; /* credit ring, round-robin */
    struct hmap_str dedup;        /* key -> struct dedup */
    struct dedup *dd_head, *dd_tail; /* gone entries, oldest expiry first */
};

struct qset {
    struct queue_defaults defaults;
    struct hmap_str names;        /* name -> queue */
    struct queue *q_head, *q_tail;
    size_t n_queues;
    struct hmap_ptr msgs;         /* id -> msg, every live message */
    struct msg_slab **slabs;      /* every slab, sorted by address */
    size_t n_slabs, slabs_cap;
    struct msg_slab *room;        /* slabs with a free slot */
    size_t n_empty;               /* slabs with used == 0 (at most one kept) */
    struct heap deadlines;        /* msgs by next deadline */
    uint64_t rng;                 /* splitmix64 state */
    uint64_t clock_ms;            /* latest now_ms seen (for calls without one) */
    qset_listener_fn listener;
    void *listener_arg;
};

static void dead_letter(struct msg *m, uint64_t now_ms, const char *reason);

/* ---- small helpers ---- */

static uint64_t
sat_add(uint64_t a, uint64_t b)
{
    return a > UINT64_MAX - b ? UINT64_MAX : a + b;
}

static void
see_clock(struct qset *qs, uint64_t now_ms)
{
    if (now_ms > qs->clock_ms) {
        qs->clock_ms = now_ms;
    }
}

static uint64_t
rng_next(struct qset *qs)
{
    uint64_t z = (qs->rng += 0x9e3779b97f4a7c15ULL);

    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

static void
emit(struct qset *qs, enum qevent_type type, struct msg *m, struct queue *q,
     struct queue *from, const char *reason, const char *detail,
     const struct kv *hdrs, size_t n_hdrs)
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

static void
hint_ready(struct queue *q)
{
    if (q->n_ready > 0) {
        emit(q->qs, QEV_READY, NULL, q, NULL, NULL, NULL, NULL, 0);
    }
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
        if (strcmp(tags[i].key, want->key) == 0 && strcmp(tags[i].value, want->value) == 0) {
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

        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '.' || c == '_' || c == '-' || c == ':')) {
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
           a->max_bytes == b->max_bytes && a->ack_timeout_ms == b->ack_timeout_ms &&
           a->max_attempts == b->max_attempts &&
           strncmp(a->dead_letter, b->dead_letter, sizeof(a->dead_letter)) == 0 &&
           a->backoff_base_ms == b->backoff_base_ms && a->backoff_cap_ms == b->backoff_cap_ms &&
           a->ttl_ms == b->ttl_ms && a->dedup_window_ms == b->dedup_window_ms &&
           a->max_lease_ms == b->max_lease_ms &&
           a->dead_letter_expired == b->dead_letter_expired;
}

/* ---- message lists ---- */

static void
mlist_push_back(struct mlist *l, struct msg *m)
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

static void
mlist_push_front(struct mlist *l, struct msg *m)
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

static void
mlist_remove(struct mlist *l, struct msg *m)
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

/* ---- consumers: list and credit ring ---- */

static void
avail_remove(struct consumer *c)
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
static void
avail_sync(struct consumer *c)
{
    bool want;

    if (c->q == NULL) {
        return;
    }
    want = c->inflight < c->prefetch;
    if (want && !c->in_avail) {
        avail_append(c);
    } else if (!want && c->in_avail) {
        avail_remove(c);
    }
}

/* queue_consumer_init: see queue.h. */
void
queue_consumer_init(struct consumer *c, uint64_t id, void *owner, uint32_t prefetch)
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
queue_consumer_satisfies(const struct consumer *c, const struct kv *req, size_t n)
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

static bool
msg_has_req(const struct msg *m)
{
    return m->ext != NULL && m->ext->n_requires > 0;
}

static int
ensure_ext(struct msg *m)
{
    if (m->ext == NULL) {
        m->ext = pq_calloc(1, sizeof(*m->ext));
        if (m->ext == NULL) {
            return PQ_ENOMEM;
        }
    }
    return PQ_OK;
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
    memmove(&qs->slabs[i + 1], &qs->slabs[i], (qs->n_slabs - i) * sizeof(qs->slabs[0]));
    qs->slabs[i] = s;
    qs->n_slabs++;
    qs->n_empty++;
    room_push(qs, s);
    return s;
}

static void
slab_free(struct qset *qs, struct msg_slab *s)
{
    size_t i = slab_upper(qs, s);

    assert(s->used == 0 && i > 0 && qs->slabs[i - 1] == s);
    memmove(&qs->slabs[i - 1], &qs->slabs[i], (qs->n_slabs - i) * sizeof(qs->slabs[0]));
    qs->n_slabs--;
    qs->n_empty--;
    if (s->has_room) {
        room_remove(qs, s);
    }
    UNPOISON(s->msgs, sizeof(s->msgs));
    pq_free(s);
}

/* A zeroed struct msg, or NULL on ENOMEM. */
static struct msg *
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

/* Give m's slot back; an emptied slab is freed unless it is the only empty one. */
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
            slab_free(qs, s);
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

/* ---- deadline heap ---- */

static bool
msg_deadline(const struct msg *m, uint64_t *out)
{
    switch (m->state) {
    case MSG_INFLIGHT:
        *out = m->due_ms;
        return true;
    case MSG_DELAYED:
        *out = m->expire_ms != 0 && m->expire_ms < m->due_ms ? m->expire_ms : m->due_ms;
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
static void
sched(struct msg *m)
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

/* ---- dedup ---- */

static void
dd_fifo_remove(struct queue *q, struct dedup *d)
{
    if (d->prev != NULL) {
        d->prev->next = d->next;
    } else {
        q->dd_head = d->next;
    }
    if (d->next != NULL) {
        d->next->prev = d->prev;
    } else {
        q->dd_tail = d->prev;
    }
    d->prev = d->next = NULL;
}

static void
dd_free(struct dedup *d)
{
    pq_free(d->key);
    pq_free(d);
}

/* Forget entries whose window ended. The FIFO is in expiry order because
 * every entry of a queue gets the same window and the clock only advances. */
static void
dedup_gc(struct queue *q, uint64_t now_ms)
{
    while (q->dd_head != NULL && q->dd_head->expire_ms <= now_ms) {
        struct dedup *d = q->dd_head;

        dd_fifo_remove(q, d);
        (void)hmap_str_del(&q->dedup, d->key);
        dd_free(d);
    }
}

/* m leaves its queue: its key stays known for the window from now. */
static void
dedup_release(struct msg *m)
{
    struct queue *q = m->q;
    struct dedup *d;

    if (m->ext == NULL || m->ext->dedup == NULL) {
        return;
    }
    d = m->ext->dedup;
    m->ext->dedup = NULL;
    d->m = NULL;
    d->expire_ms = sat_add(q->qs->clock_ms, q->attrs.dedup_window_ms);
    d->next = NULL;
    d->prev = q->dd_tail;
    if (q->dd_tail != NULL) {
        q->dd_tail->next = d;
    } else {
        q->dd_head = d;
    }
    q->dd_tail = d;
}

/* queue_dedup_find: see queue.h. */
int
queue_dedup_find(struct queue *q, const char *key, uint64_t now_ms, uint64_t *id_out)
{
    struct dedup *d;

    see_clock(q->qs, now_ms);
    dedup_gc(q, now_ms);
    d = hmap_str_get(&q->dedup, key);
    if (d == NULL || (d->m == NULL && d->expire_ms <= now_ms)) {
        return PQ_ENOTFOUND;
    }
    if (id_out != NULL) {
        *id_out = d->id;
    }
    return PQ_OK;
}

/* ---- state changes ---- */

static void
make_ready(struct msg *m, bool front)
{
    struct queue *q = m->q;

    m->state = MSG_READY;
    m->due_ms = 0;
    if (front) {
        mlist_push_front(&q->ready[m->priority], m);
    } else {
        mlist_push_back(&q->ready[m->priority], m);
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
    mlist_push_back(&m->q->delayed, m);
    m->q->n_delayed++;
}

/* Take m out of its list and the heap; it stays in the id map and counted in
 * q->bytes. The caller puts it somewhere else or frees it. */
static void
unlink_msg(struct msg *m)
{
    struct queue *q = m->q;
    struct consumer *c;

    switch (m->state) {
    case MSG_READY:
        mlist_remove(&q->ready[m->priority], m);
        q->n_ready--;
        if (msg_has_req(m)) {
            q->n_ready_req--;
        }
        break;
    case MSG_DELAYED:
        mlist_remove(&q->delayed, m);
        q->n_delayed--;
        break;
    case MSG_INFLIGHT:
        c = m->holder;
        {
            struct mlist l = { c->inflight_head, c->inflight_tail };

            mlist_remove(&l, m);
            c->inflight_head = l.head;
            c->inflight_tail = l.tail;
        }
        c->inflight--;
        avail_sync(c);
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
drop_msg(struct msg *m, const char *reason, const char *detail)
{
    struct queue *q = m->q;

    assert(m->state == MSG_LIMBO);
    emit(q->qs, QEV_DROP, m, q, NULL, reason, detail, NULL, 0);
    (void)hmap_ptr_del(&q->qs->msgs, m->id);
    q->bytes -= m->size;
    dedup_release(m);
    msg_free(m);
}

/* Put an unlinked, previously delivered message back: at once (front of its
 * level) or after delay_ms. */
static void
requeue(struct msg *m, uint64_t now_ms, uint64_t delay_ms, const char *reason)
{
    if (delay_ms == 0) {
        make_ready(m, m->attempt > 0);
    } else {
        make_delayed(m, sat_add(now_ms, delay_ms));
    }
    sched(m);
    emit(m->q->qs, QEV_REQUEUE, m, m->q, NULL, reason, NULL, NULL, 0);
    if (m->state == MSG_READY) {
        hint_ready(m->q);
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
static void
fail_attempt(struct msg *m, uint64_t now_ms, const char *reason, const struct nack_opts *o)
{
    struct queue *q = m->q;

    if (m->failures < UINT16_MAX) {
        m->failures++;
    }
    if (o != NULL && o->dead_letter) {
        dead_letter(m, now_ms, "nack");
    } else if (m->failures >= q->attrs.max_attempts) {
        dead_letter(m, now_ms, "max_attempts");
    } else if (o != NULL && o->has_delay) {
        requeue(m, now_ms, o->delay_ms, reason);
    } else {
        requeue(m, now_ms, backoff_ms(q, m->failures), reason);
    }
}

/* Move an unlinked message to its queue's dead-letter queue (see queue.h),
 * or drop it when that is impossible. */
static void
dead_letter(struct msg *m, uint64_t now_ms, const char *reason)
{
    struct queue *src = m->q;
    struct qset *qs = src->qs;
    struct queue *dst = NULL;
    const char *detail = NULL;
    struct body *nb = NULL;
    struct kv hdrs[4];
    size_t n = 0;
    char attempts[24];

    snprintf(attempts, sizeof(attempts), "%" PRIu32, m->attempt);
    hdrs[n++] = (struct kv){ "x-death-reason", reason };
    hdrs[n++] = (struct kv){ "x-death-attempts", attempts };
    hdrs[n++] = (struct kv){ "x-death-queue", src->name };
    if (msg_last_error(m) != NULL) {
        hdrs[n++] = (struct kv){ "x-death-error", msg_last_error(m) };
    }

    if (src->attrs.dead_letter[0] == '\0') {
        detail = "no dead_letter queue configured";
    } else if ((dst = qset_find(qs, src->attrs.dead_letter)) == NULL) {
        detail = "dead_letter queue does not exist";
    } else if (queue_check_room(dst, 1, m->size) != PQ_OK) {
        detail = "dead_letter queue is full";
    } else if (m->body != NULL && (nb = body_with_headers(m->body, hdrs, n)) == NULL) {
        detail = "out of memory building the dead-letter body";
    }
    if (detail != NULL) {
        src->stats.dropped++;
        drop_msg(m, reason, detail);
        return;
    }

    /* Leave src: the key's window starts, counts move. */
    dedup_release(m);
    src->bytes -= m->size;
    src->stats.dead_lettered++;
    body_unref(&m->body);
    m->body = nb; /* NULL if the payload was evicted: the event's headers say what to add */
    m->q = dst;
    dst->bytes += m->size;
    m->attempt = 0;
    m->failures = 0;
    m->flags = 0;
    m->due_ms = 0;
    m->expire_ms = dst->attrs.ttl_ms != 0 ? sat_add(now_ms, dst->attrs.ttl_ms) : 0;
    if (m->ext != NULL) {
        /* the DLQ is for inspection: anyone may take it, no stale error */
        pq_free(m->ext->requires);
        m->ext->requires = NULL;
        m->ext->n_requires = 0;
        pq_free(m->ext->last_error);
        m->ext->last_error = NULL;
    }
    make_ready(m, false);
    sched(m);
    emit(qs, QEV_DEAD_LETTER, m, dst, src, reason, NULL, hdrs, n);
    hint_ready(dst);
}

/* An unlinked READY/DELAYED message's TTL passed. */
static void
expire_msg(struct msg *m, uint64_t now_ms)
{
    struct queue *q = m->q;

    q->stats.expired++;
    if (q->attrs.dead_letter_expired && q->attrs.dead_letter[0] != '\0') {
        dead_letter(m, now_ms, "expired");
    } else {
        drop_msg(m, "expired", NULL);
    }
}

/* An unlinked cancelled in-flight message reaches its end. */
static void
finish_cancelled(struct msg *m)
{
    m->q->stats.cancelled++;
    drop_msg(m, "cancelled", NULL);
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
        struct mlist l = { c->inflight_head, c->inflight_tail };

        free_list(qs, &l);
        c->inflight_head = c->inflight_tail = NULL;
        c->inflight = 0;
        c->q = NULL;
        c->in_avail = false;
        c->prev = c->next = c->avail_prev = c->avail_next = NULL;
        c = next;
    }
    for (p = 0; p < PRIORITY_LEVELS; p++) {
        free_list(qs, &q->ready[p]);
    }
    free_list(qs, &q->delayed);
    while ((d = hmap_str_next(&q->dedup, &iter, NULL)) != NULL) {
        dd_free(d); /* map is freed below without further lookups */
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
        slab_free(qs, qs->slabs[qs->n_slabs - 1]); /* every message is gone: empty */
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
    int rc, p;

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
    for (p = 0; p < PRIORITY_LEVELS; p++) {
        q->ready[p].head = q->ready[p].tail = NULL;
    }
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
    struct mlist *lists[PRIORITY_LEVELS + 1];
    int i;

    assert(q->n_consumers == 0);
    assert(q->n_inflight == 0);
    for (i = 0; i < PRIORITY_LEVELS; i++) {
        lists[i] = &q->ready[i];
    }
    lists[PRIORITY_LEVELS] = &q->delayed;
    for (i = 0; i <= PRIORITY_LEVELS; i++) {
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
qset_msg(const struct qset *qs, uint64_t id)
{
    return hmap_ptr_get(&qs->msgs, id);
}

/* qset_msg_count: see queue.h. */
size_t
qset_msg_count(const struct qset *qs)
{
    return hmap_ptr_len(&qs->msgs);
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
        (n_msgs > q->attrs.max_length || queue_total_count(q) > q->attrs.max_length - n_msgs)) {
        return PQ_EFULL;
    }
    if (q->attrs.max_bytes != 0 &&
        (n_bytes > q->attrs.max_bytes || q->bytes > q->attrs.max_bytes - n_bytes)) {
        return PQ_EFULL;
    }
    return PQ_OK;
}

/* ---- push ---- */

/* queue_push: see queue.h. All allocation happens before the first change,
 * so a failure leaves everything as it was. */
int
queue_push(struct queue *q, const struct msg_new *mn, uint64_t now_ms, struct msg **out)
{
    struct qset *qs = q->qs;
    struct dedup *d = NULL, *old = NULL;
    struct msg *m;
    size_t live;
    int rc;

    see_clock(qs, now_ms);
    if (mn->priority >= PRIORITY_LEVELS || (mn->idem_key != NULL && mn->idem_key[0] == '\0')) {
        return PQ_EINVAL;
    }
    if (hmap_ptr_get(&qs->msgs, mn->id) != NULL) {
        return PQ_EEXIST;
    }
    live = hmap_ptr_len(&qs->msgs);
    if (live >= UINT32_MAX - 1) {
        return PQ_ENOMEM; /* heap_pos is 32-bit */
    }
    if (mn->idem_key != NULL) {
        dedup_gc(q, now_ms);
        old = hmap_str_get(&q->dedup, mn->idem_key);
        if (old != NULL && (old->m != NULL || old->expire_ms > now_ms)) {
            return PQ_EEXIST;
        }
    }

    m = msg_alloc(qs);
    if (m == NULL) {
        return PQ_ENOMEM;
    }
    m->q = q; /* msg_free finds the slab through it */
    m->heap_pos = UINT32_MAX;
    if (mn->idem_key != NULL || mn->n_requires > 0 || mn->progress != NULL) {
        rc = ensure_ext(m);
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
            /* an expired entry the FIFO has not reached (clock went back) */
            dd_fifo_remove(q, old);
            (void)hmap_str_del(&q->dedup, old->key);
            dd_free(old);
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
    m->failures = mn->failures > UINT16_MAX ? UINT16_MAX : (uint16_t)mn->failures;
    m->pub_seg = mn->pub_seg;
    m->state_seg = mn->state_seg;
    m->pub_off = mn->pub_off;
    m->pub_len = mn->pub_len;
    if (mn->expire_ms != 0) {
        m->expire_ms = mn->expire_ms;
    } else if (q->attrs.ttl_ms != 0) {
        m->expire_ms = sat_add(now_ms, q->attrs.ttl_ms);
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
        make_ready(m, false);
    }
    sched(m);
    if (out != NULL) {
        *out = m;
    }
    if (m->state == MSG_READY) {
        hint_ready(q);
    }
    return PQ_OK;

err_free_dedup:
    pq_free(d->key);
    pq_free(d);
err_free_msg:
    msg_free(m);
    return rc;
}

/* ---- delivery ---- */

static void
deliver(struct msg *m, struct consumer *c, uint64_t now_ms)
{
    struct queue *q = m->q;
    struct mlist l;

    unlink_msg(m);
    m->state = MSG_INFLIGHT;
    m->holder = c;
    if (m->attempt < UINT32_MAX) {
        m->attempt++;
    }
    if (m->attempt > 1) {
        q->stats.redelivered++;
    }
    m->due_ms = sat_add(now_ms, q->attrs.ack_timeout_ms);
    l.head = c->inflight_head;
    l.tail = c->inflight_tail;
    mlist_push_back(&l, m);
    c->inflight_head = l.head;
    c->inflight_tail = l.tail;
    c->inflight++;
    q->n_inflight++;
    /* round-robin: c goes to the back of the ring (or off it, if full) */
    avail_remove(c);
    avail_sync(c);
    sched(m);
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

static struct msg *
first_ready(struct queue *q)
{
    int p;

    for (p = PRIORITY_LEVELS - 1; p >= 0; p--) {
        if (q->ready[p].head != NULL) {
            return q->ready[p].head;
        }
    }
    return NULL;
}

/* Slow path: some ready message has requirements. Walk the ready messages
 * in order; the first one some available consumer satisfies wins. */
static struct msg *
next_delivery_tagged(struct queue *q, uint64_t now_ms, struct consumer **to)
{
    int p;

    for (p = PRIORITY_LEVELS - 1; p >= 0; p--) {
        struct msg *m = q->ready[p].head;

        while (m != NULL) {
            struct msg *next = m->next;
            const struct kv *req;
            size_t n;
            struct consumer *c;

            if (expired(m, now_ms)) {
                unlink_msg(m);
                expire_msg(m, now_ms);
                m = next;
                continue;
            }
            req = msg_requires(m, &n);
            for (c = q->avail_head; c != NULL; c = c->avail_next) {
                if (!c->paused && queue_consumer_satisfies(c, req, n)) {
                    deliver(m, c, now_ms);
                    *to = c;
                    return m;
                }
            }
            m = next;
        }
    }
    return NULL;
}

/* queue_next_delivery: see queue.h. */
struct msg *
queue_next_delivery(struct queue *q, uint64_t now_ms, struct consumer **to)
{
    struct consumer *c;
    struct msg *m;

    see_clock(q->qs, now_ms);
    *to = NULL;
    if (q->n_ready == 0 || first_unpaused(q) == NULL) {
        return NULL;
    }
    /* the delivered message gains a lease deadline (see the invariants) */
    if (heap_reserve(&q->qs->deadlines, heap_len(&q->qs->deadlines) + 1) != PQ_OK) {
        return NULL;
    }
    if (q->n_ready_req > 0) {
        return next_delivery_tagged(q, now_ms, to);
    }
    while ((m = first_ready(q)) != NULL) {
        if (expired(m, now_ms)) {
            unlink_msg(m);
            expire_msg(m, now_ms);
            continue;
        }
        c = first_unpaused(q);
        deliver(m, c, now_ms);
        *to = c;
        return m;
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
    avail_sync(c);
    hint_ready(q);
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
    see_clock(q->qs, now_ms);
    avail_remove(c);
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
    c->q = NULL; /* from here on avail_sync(c) is a no-op */
    while (c->inflight_tail != NULL) {
        struct msg *m = c->inflight_tail;

        unlink_msg(m);
        if (msg_is_cancelled(m)) {
            finish_cancelled(m);
        } else {
            fail_attempt(m, now_ms, "unsubscribe", NULL);
        }
    }
    assert(c->inflight == 0);
    hint_ready(q);
}

/* queue_set_prefetch: see queue.h. */
void
queue_set_prefetch(struct consumer *c, uint32_t prefetch)
{
    c->prefetch = prefetch == 0 ? 1 : prefetch;
    avail_sync(c);
    if (c->q != NULL && c->in_avail) {
        hint_ready(c->q);
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
    unlink_msg(m);
    if (msg_is_cancelled(m)) {
        finish_cancelled(m);
        return PQ_ESTALE;
    }
    (void)hmap_ptr_del(&qs->msgs, m->id);
    m->q->bytes -= m->size;
    m->q->stats.acked++;
    dedup_release(m);
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
qset_nack(struct qset *qs, uint64_t id, uint32_t attempt, const struct nack_opts *o,
          uint64_t now_ms)
{
    struct msg *m = current(qs, id, attempt);
    struct queue *q;
    char *err = NULL;

    see_clock(qs, now_ms);
    if (m == NULL) {
        return PQ_ESTALE;
    }
    q = m->q;
    if (msg_is_cancelled(m)) {
        unlink_msg(m);
        finish_cancelled(m);
        hint_ready(q);
        return PQ_ESTALE;
    }
    if (o != NULL && o->error != NULL) {
        if (ensure_ext(m) != PQ_OK || (err = pq_strdup(o->error)) == NULL) {
            return PQ_ENOMEM;
        }
        pq_free(m->ext->last_error);
        m->ext->last_error = err;
    }
    q->stats.nacked++;
    unlink_msg(m);
    fail_attempt(m, now_ms, "nack", o);
    hint_ready(q);
    return PQ_OK;
}

static int
keep_progress(struct msg *m, struct body *progress)
{
    if (progress == NULL) {
        return PQ_OK;
    }
    if (ensure_ext(m) != PQ_OK) {
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

    see_clock(qs, now_ms);
    if (m == NULL || msg_is_cancelled(m)) {
        return PQ_ESTALE;
    }
    if (keep_progress(m, progress) != PQ_OK) {
        return PQ_ENOMEM;
    }
    a = &m->q->attrs;
    if (extend_ms == 0) {
        extend_ms = a->ack_timeout_ms;
    }
    if (a->max_lease_ms != 0 && extend_ms > a->max_lease_ms) {
        extend_ms = a->max_lease_ms;
    }
    m->due_ms = sat_add(now_ms, extend_ms);
    sched(m);
    if (lease_ms_out != NULL) {
        *lease_ms_out = extend_ms;
    }
    emit(qs, QEV_TOUCH, m, m->q, NULL, NULL, NULL, NULL, 0);
    return PQ_OK;
}

/* qset_release: see queue.h. */
int
qset_release(struct qset *qs, uint64_t id, uint32_t attempt, struct body *progress,
             uint64_t now_ms)
{
    struct msg *m = current(qs, id, attempt);
    struct queue *q;

    see_clock(qs, now_ms);
    if (m == NULL) {
        return PQ_ESTALE;
    }
    q = m->q;
    if (msg_is_cancelled(m)) {
        unlink_msg(m);
        finish_cancelled(m);
        hint_ready(q);
        return PQ_ESTALE;
    }
    if (keep_progress(m, progress) != PQ_OK) {
        return PQ_ENOMEM;
    }
    q->stats.released++;
    unlink_msg(m);
    requeue(m, now_ms, 0, "release");
    return PQ_OK;
}

/* qset_cancel: see queue.h. */
int
qset_cancel(struct qset *qs, uint64_t id, struct msg **inflight_out)
{
    struct msg *m = hmap_ptr_get(&qs->msgs, id);

    if (inflight_out != NULL) {
        *inflight_out = NULL;
    }
    if (m == NULL) {
        return PQ_ENOTFOUND;
    }
    if (m->state == MSG_INFLIGHT) {
        m->flags |= MSG_F_CANCELLED;
        if (inflight_out != NULL) {
            *inflight_out = m;
        }
        return PQ_OK;
    }
    unlink_msg(m);
    finish_cancelled(m);
    return PQ_OK;
}

/* queue_purge: see queue.h. */
uint64_t
queue_purge(struct queue *q)
{
    struct qset *qs = q->qs;
    uint64_t n = 0;
    int p;

    for (p = 0; p <= PRIORITY_LEVELS; p++) {
        struct mlist *l = p < PRIORITY_LEVELS ? &q->ready[p] : &q->delayed;

        while (l->head != NULL) {
            struct msg *m = l->head;

            unlink_msg(m);
            (void)hmap_ptr_del(&qs->msgs, m->id);
            q->bytes -= m->size;
            dedup_release(m);
            msg_free(m);
            n++;
        }
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

    see_clock(qs, now_ms);
    while ((m = heap_peek(&qs->deadlines)) != NULL) {
        struct queue *q = m->q;

        if (!msg_deadline(m, &d) || d > now_ms) {
            break;
        }
        switch (m->state) {
        case MSG_DELAYED:
            unlink_msg(m);
            if (expired(m, now_ms)) {
                expire_msg(m, now_ms);
            } else {
                make_ready(m, m->attempt > 0);
                sched(m);
                hint_ready(q);
            }
            break;
        case MSG_READY:
            unlink_msg(m);
            expire_msg(m, now_ms);
            break;
        case MSG_INFLIGHT:
            unlink_msg(m);
            if (msg_is_cancelled(m)) {
                finish_cancelled(m);
            } else {
                fail_attempt(m, now_ms, "lease", NULL);
            }
            hint_ready(q);
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

/* ---- walking and restoring (for the journal) ---- */

/* queue_foreach_msg: see queue.h. Walks the qset's id map, so it costs
 * O(all live messages); used for purge, delete, compaction and recovery,
 * never per message. */
void
queue_foreach_msg(struct queue *q, void (*fn)(void *arg, struct msg *m),
                  void *arg)
{
    size_t it = 0;
    struct msg *m;

    while ((m = hmap_ptr_next(&q->qs->msgs, &it)) != NULL) {
        if (m->q == q) {
            fn(arg, m);
        }
    }
}

/* msg_set_progress: see queue.h. */
int
msg_set_progress(struct msg *m, struct body *progress)
{
    return keep_progress(m, progress);
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

/* qset_sort_ready: see queue.h. */
void
qset_sort_ready(struct qset *qs)
{
    for (struct queue *q = qs->q_head; q != NULL; q = q->next) {
        for (int p = 0; p < PRIORITY_LEVELS; p++) {
            mlist_sort_by_id(&q->ready[p]);
        }
    }
}
