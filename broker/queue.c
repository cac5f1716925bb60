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

/*
 * Compact slots. A READY message that has never been delivered and has
 * nothing optional (no requirements, progress, idempotency key or TTL; see
 * compactable()) is kept as a 40-byte struct cslot instead of a struct msg
 * plus its id-index entry (~123 bytes): that is the bulk of a backlog. The
 * slots of one priority level form a deque in strictly increasing id order
 * (ids grow with publish order), so a message is found by binary search in
 * its level. A slot is turned into a struct msg in place ("promoted") when
 * it is delivered or someone needs a pointer (qset_msg); its slot then
 * holds that pointer (CS_FULL) and keeps its position. A removed slot in the
 * middle becomes a tombstone (CS_DEAD) that keeps its id for the search;
 * tombstones at the head are popped, and a level that becomes mostly
 * tombstones is squeezed.
 *
 * One ready level, in delivery order:
 *   1. front: full messages requeued at the front (delivered before);
 *   2. the slots and the back list merged by push order: back holds full
 *      messages pushed at the back (anything not compactable, or an id not
 *      above the last slot's); each has in due_ms its "seq", the tail
 *      position of the slots when it was pushed: it comes after every slot
 *      below seq and before the slot at seq. So the order is exactly the
 *      push order, as with one list.
 * Slot positions are absolute (they only grow, except when a squeeze
 * renumbers them, back seqs included); chunks[0] holds position base.
 */
enum { CSLOT_CHUNK = 1024 };
enum { CS_COMPACT = 0, CS_FULL = 1, CS_DEAD = 2 };
#define CS_WALL_MASK ((UINT64_C(1) << 48) - 1)
#define POS_NONE UINT64_MAX

struct cslot {
    uint64_t id;
    union {
        struct body *body;        /* CS_COMPACT: encoded message, or NULL when evicted */
        struct msg *m;            /* CS_FULL: the promoted message */
    } u;
    uint64_t wall_kind;           /* published_wall_ms (48 bits) | kind << 48 */
    uint32_t size, pub_seg, pub_off, pub_len; /* as in struct msg; state_seg = pub_seg */
};

struct cchunk {
    struct cslot s[CSLOT_CHUNK];
};

struct rlevel {
    struct mlist front;           /* requeued at the front */
    struct mlist back;            /* full messages pushed at the back; due_ms = seq */
    struct cchunk **chunks;       /* slots [base, base + n_chunks * CSLOT_CHUNK) */
    size_t n_chunks, chunks_cap;
    uint64_t base, head, tail;    /* slots in use: [head, tail); slot head is live */
    uint64_t n_live;              /* CS_COMPACT + CS_FULL slots in [head, tail) */
    uint64_t n_compact;           /* CS_COMPACT slots */
};

/* msg.flags bits beside MSG_F_CANCELLED, queue.c's own: where a READY
 * message sits in its level (neither: the front list). */
enum { MSG_F_SLOT = 1u << 1, MSG_F_BACK = 1u << 2 };

struct queue {
    char name[QUEUE_NAME_MAX + 1];
    struct qset *qs;
    struct queue *prev, *next;    /* qset's list, creation order */
    struct queue_attrs attrs;     /* resolved */
    struct queue_stats stats;
    struct rlevel ready[PRIORITY_LEVELS];
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
    struct hmap_ptr msgs;         /* id -> msg, every live struct msg */
    uint64_t n_compact;           /* messages kept in CS_COMPACT slots */
    uint64_t compact_max_id;      /* highest id ever put in a compact slot */
    bool no_squeeze;              /* a walk over slot positions is under way */
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

static void dead_letter(struct msg *m, uint64_t now_ms, enum qreason reason);

/* ---- small helpers ---- */

const char *
qreason_name(enum qreason r)
{
    static const char *const names[] = {
        [QR_NONE] = "",
        [QR_NACK] = "nack",
        [QR_LEASE] = "lease",
        [QR_UNSUBSCRIBE] = "unsubscribe",
        [QR_RELEASE] = "release",
        [QR_MAX_ATTEMPTS] = "max_attempts",
        [QR_EXPIRED] = "expired",
        [QR_CANCELLED] = "cancelled",
    };

    return (unsigned)r < sizeof(names) / sizeof(names[0]) ? names[r] : "?";
}

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
     struct queue *from, enum qreason reason, const char *detail,
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
        emit(q->qs, QEV_READY, NULL, q, NULL, QR_NONE, NULL, NULL, 0);
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

/* ---- compact slots (see struct cslot) ---- */

static struct cslot *
slot_at(const struct rlevel *lv, uint64_t pos)
{
    uint64_t i = pos - lv->base;

    assert(pos >= lv->base && i / CSLOT_CHUNK < lv->n_chunks);
    return &lv->chunks[i / CSLOT_CHUNK]->s[i % CSLOT_CHUNK];
}

static unsigned
cs_kind(const struct cslot *s)
{
    return (unsigned)(s->wall_kind >> 48);
}

static uint64_t
cs_wall(const struct cslot *s)
{
    return s->wall_kind & CS_WALL_MASK;
}

static void
cs_set_kind(struct cslot *s, unsigned kind, uint64_t wall_ms)
{
    s->wall_kind = (uint64_t)kind << 48 | (wall_ms & CS_WALL_MASK);
}

/* Room for n more slots at the tail. PQ_OK or PQ_ENOMEM (chunks already
 * added stay, unused). */
static int
slots_reserve(struct rlevel *lv, uint64_t n)
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
        memmove(lv->chunks, lv->chunks + k, (lv->n_chunks - k) * sizeof(lv->chunks[0]));
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
static void
slots_clear(struct qset *qs, struct rlevel *lv)
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
static uint64_t
slot_find(const struct rlevel *lv, uint64_t id)
{
    uint64_t lo = lv->head, hi = lv->tail;
    const struct cslot *s;

    if (lo == hi || id < slot_at(lv, lo)->id || id > slot_at(lv, hi - 1)->id) {
        return POS_NONE;
    }
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;

        if (slot_at(lv, mid)->id < id) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    if (lo == lv->tail) {
        return POS_NONE;
    }
    s = slot_at(lv, lo);
    return s->id == id && cs_kind(s) != CS_DEAD ? lo : POS_NONE;
}

/* The compact slot holding id anywhere in qs: O(levels holding compact
 * slots * log n); immediate for an id above every compact one. */
static bool
compact_find(const struct qset *qs, uint64_t id, struct queue **q_out, int *p_out,
             uint64_t *pos_out)
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
            pos = slot_find(lv, id);
            if (pos != POS_NONE && cs_kind(slot_at(lv, pos)) == CS_COMPACT) {
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
static void
slot_view(struct queue *q, int p, const struct cslot *s, struct msg *v)
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
static struct msg *
slot_promote(struct queue *q, int p, uint64_t pos)
{
    struct qset *qs = q->qs;
    struct rlevel *lv = &q->ready[p];
    struct cslot *s = slot_at(lv, pos);
    struct msg *m;
    int rc;

    if (cs_kind(s) == CS_FULL) {
        return s->u.m;
    }
    assert(cs_kind(s) == CS_COMPACT);
    if (hmap_ptr_reserve(&qs->msgs, hmap_ptr_len(&qs->msgs) + 1) != PQ_OK) {
        return NULL;
    }
    m = msg_alloc(qs);
    if (m == NULL) {
        return NULL;
    }
    slot_view(q, p, s, m);
    m->flags = MSG_F_SLOT;
    rc = hmap_ptr_put(&qs->msgs, m);
    assert(rc == PQ_OK); /* reserved, id unique */
    (void)rc;
    s->u.m = m;
    cs_set_kind(s, CS_FULL, 0);
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
        struct cslot *s = slot_at(lv, r);

        while (b != NULL && b->due_ms <= r) {
            b->due_ms = w;
            b = b->next;
        }
        if (cs_kind(s) != CS_DEAD) {
            if (w != r) {
                *slot_at(lv, w) = *s;
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

static void
maybe_squeeze(struct qset *qs, struct rlevel *lv)
{
    uint64_t span = lv->tail - lv->head;

    if (!qs->no_squeeze && span >= 2 * CSLOT_CHUNK && lv->n_live < span / 4) {
        level_squeeze(lv);
    }
}

/* The slot at pos leaves (its contents are the caller's). */
static void
slot_kill(struct queue *q, struct rlevel *lv, uint64_t pos)
{
    struct cslot *s = slot_at(lv, pos);

    if (cs_kind(s) == CS_COMPACT) {
        lv->n_compact--;
        q->qs->n_compact--;
    }
    assert(cs_kind(s) != CS_DEAD);
    cs_set_kind(s, CS_DEAD, 0);
    s->u.body = NULL;
    lv->n_live--;
    if (pos == lv->head) {
        while (lv->head < lv->tail && cs_kind(slot_at(lv, lv->head)) == CS_DEAD) {
            lv->head++;
        }
        slots_trim(lv);
    } else {
        maybe_squeeze(q->qs, lv);
    }
}

/* The first ready entry of lv: a full message (*m set) or the compact slot
 * at *pos (*m NULL). false when lv is empty. */
static bool
level_first(const struct rlevel *lv, struct msg **m, uint64_t *pos)
{
    *m = NULL;
    *pos = POS_NONE;
    if (lv->front.head != NULL) {
        *m = lv->front.head;
        return true;
    }
    if (lv->back.head != NULL && (lv->head == lv->tail || lv->back.head->due_ms <= lv->head)) {
        *m = lv->back.head;
        return true;
    }
    if (lv->head < lv->tail) {
        const struct cslot *s = slot_at(lv, lv->head);

        if (cs_kind(s) == CS_FULL) {
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
static bool
compactable_new(const struct queue *q, const struct msg_new *mn, uint64_t now_ms,
                bool want_ptr)
{
    const struct rlevel *lv = &q->ready[mn->priority];

    return !want_ptr && mn->due_ms <= now_ms && mn->expire_ms == 0 && q->attrs.ttl_ms == 0 &&
           mn->idem_key == NULL && mn->n_requires == 0 && mn->progress == NULL &&
           mn->attempt == 0 && mn->failures == 0 && mn->state_seg == mn->pub_seg &&
           mn->published_wall_ms <= CS_WALL_MASK &&
           (lv->head == lv->tail || mn->id > slot_at(lv, lv->tail - 1)->id);
}

/* The same test for an existing READY message (qset_sort_ready). */
static bool
compactable_msg(const struct msg *m)
{
    return m->state == MSG_READY && m->attempt == 0 && m->failures == 0 && m->ext == NULL &&
           m->expire_ms == 0 && m->heap_pos == UINT32_MAX &&
           (m->flags & MSG_F_CANCELLED) == 0 && m->state_seg == m->pub_seg &&
           m->published_wall_ms <= CS_WALL_MASK;
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
    struct rlevel *lv = &q->ready[m->priority];

    m->state = MSG_READY;
    m->flags &= ~(MSG_F_SLOT | MSG_F_BACK);
    if (front) {
        m->due_ms = 0;
        mlist_push_front(&lv->front, m);
    } else {
        m->due_ms = lv->tail; /* seq: after the slots pushed so far */
        m->flags |= MSG_F_BACK;
        mlist_push_back(&lv->back, m);
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

/* Take a READY m out of its level. */
static void
ready_remove(struct queue *q, struct msg *m)
{
    struct rlevel *lv = &q->ready[m->priority];

    if ((m->flags & MSG_F_SLOT) != 0) {
        uint64_t pos = slot_find(lv, m->id);

        assert(pos != POS_NONE && slot_at(lv, pos)->u.m == m);
        slot_kill(q, lv, pos);
    } else if ((m->flags & MSG_F_BACK) != 0) {
        mlist_remove(&lv->back, m);
        m->due_ms = 0;
    } else {
        mlist_remove(&lv->front, m);
    }
    m->flags &= ~(MSG_F_SLOT | MSG_F_BACK);
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
        ready_remove(q, m);
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
drop_msg(struct msg *m, enum qreason reason, const char *detail)
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
requeue(struct msg *m, uint64_t now_ms, uint64_t delay_ms, enum qreason reason)
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
fail_attempt(struct msg *m, uint64_t now_ms, enum qreason reason, const struct nack_opts *o)
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
        requeue(m, now_ms, o->delay_ms, reason);
    } else {
        requeue(m, now_ms, backoff_ms(q, m->failures), reason);
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

    snprintf(attempts, sizeof(attempts), "%" PRIu32, m->attempt);
    hdrs[n++] = (struct kv){ "x-death-reason", qreason_name(reason) };
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
        dead_letter(m, now_ms, QR_EXPIRED);
    } else {
        drop_msg(m, QR_EXPIRED, NULL);
    }
}

/* The compact message at pos is cancelled: QEV_DROP with a struct msg
 * image of it (nothing to allocate), then it goes. */
static void
drop_compact(struct queue *q, int p, uint64_t pos, enum qreason reason)
{
    struct rlevel *lv = &q->ready[p];
    struct cslot *s = slot_at(lv, pos);
    struct msg v;

    slot_view(q, p, s, &v);
    v.state = MSG_LIMBO;
    q->stats.cancelled++;
    emit(q->qs, QEV_DROP, &v, q, NULL, reason, NULL, NULL, 0);
    s = slot_at(lv, pos); /* a listener must not change the qset: same slot */
    body_unref(&s->u.body);
    q->bytes -= s->size;
    q->n_ready--;
    slot_kill(q, lv, pos);
}

/* An unlinked cancelled in-flight message reaches its end. */
static void
finish_cancelled(struct msg *m)
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
        struct cslot *s = slot_at(lv, pos);

        if (cs_kind(s) == CS_COMPACT) {
            body_unref(&s->u.body);
        } else if (cs_kind(s) == CS_FULL) {
            struct msg *m = s->u.m;

            (void)hmap_ptr_del(&qs->msgs, m->id);
            if (m->ext != NULL) {
                m->ext->dedup = NULL; /* the dedup table goes with the queue */
            }
            msg_free(m);
        }
    }
    slots_clear(qs, lv);
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
        level_free(qs, &q->ready[p]);
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
            struct cslot *s = slot_at(lv, pos);

            if (cs_kind(s) == CS_FULL && s->u.m->heap_pos != UINT32_MAX) {
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

    if (m == NULL && compact_find(qs, id, &q, &p, &pos)) {
        m = slot_promote(q, p, pos);
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
    if (compact_find(qs, id, &q, &p, &pos)) {
        slot_view(q, p, slot_at(&q->ready[p], pos), view);
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
    struct queue *cq;
    uint64_t cpos;
    int rc, cp;

    see_clock(qs, now_ms);
    if (mn->priority >= PRIORITY_LEVELS || (mn->idem_key != NULL && mn->idem_key[0] == '\0')) {
        return PQ_EINVAL;
    }
    if (hmap_ptr_get(&qs->msgs, mn->id) != NULL || compact_find(qs, mn->id, &cq, &cp, &cpos)) {
        return PQ_EEXIST;
    }
    live = hmap_ptr_len(&qs->msgs);
    if (live >= UINT32_MAX - 1) {
        return PQ_ENOMEM; /* heap_pos is 32-bit */
    }
    if (compactable_new(q, mn, now_ms, out != NULL)) {
        struct rlevel *lv = &q->ready[mn->priority];
        struct cslot *s;

        if (slots_reserve(lv, 1) != PQ_OK) {
            return PQ_ENOMEM;
        }
        s = slot_at(lv, lv->tail++);
        s->id = mn->id;
        s->u.body = body_ref(mn->body);
        cs_set_kind(s, CS_COMPACT, mn->published_wall_ms);
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
        hint_ready(q);
        return PQ_OK;
    }
    if (mn->idem_key != NULL) {
        dedup_gc(q, now_ms);
        old = hmap_str_get(&q->dedup, mn->idem_key);
        if (old != NULL &&
            (old->m != NULL || (old->expire_ms > now_ms && !mn->key_takeover))) {
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
            /* a gone entry: taken over, or expired but not yet reached by
             * the FIFO (clock went back) */
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

/* Deliver the entry of level p found by level_first or the walk: a full
 * message m, or (m NULL) the compact slot at pos, promoted first. NULL on
 * ENOMEM (nothing changed). */
static struct msg *
deliver_entry(struct queue *q, int p, struct msg *m, uint64_t pos, struct consumer *c,
              uint64_t now_ms)
{
    if (m == NULL && (m = slot_promote(q, p, pos)) == NULL) {
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
                while (pos < lv->tail && cs_kind(slot_at(lv, pos)) == CS_DEAD) {
                    pos++;
                }
                if (bm != NULL && (pos >= lv->tail || bm->due_ms <= pos)) {
                    m = bm;
                    bm = bm->next;
                } else if (pos < lv->tail) {
                    struct cslot *s = slot_at(lv, pos);

                    if (cs_kind(s) == CS_FULL) {
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
                unlink_msg(m);
                expire_msg(m, now_ms);
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
        maybe_squeeze(qs, &q->ready[p]);
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
    for (p = PRIORITY_LEVELS - 1; p >= 0; p--) {
        while (level_first(&q->ready[p], &m, &pos)) {
            if (m != NULL && expired(m, now_ms)) {
                unlink_msg(m);
                expire_msg(m, now_ms);
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
            fail_attempt(m, now_ms, QR_UNSUBSCRIBE, NULL);
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
    fail_attempt(m, now_ms, QR_NACK, o);
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
    emit(qs, QEV_TOUCH, m, m->q, NULL, QR_NONE, NULL, NULL, 0);
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
    requeue(m, now_ms, 0, QR_RELEASE);
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
        if (!compact_find(qs, id, &q, &p, &pos)) {
            return PQ_ENOTFOUND;
        }
        drop_compact(q, p, pos, QR_CANCELLED);
        return PQ_OK;
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

    for (p = 0; p <= 2 * PRIORITY_LEVELS; p++) {
        struct mlist *l = p == 2 * PRIORITY_LEVELS ? &q->delayed
                          : p % 2 == 0             ? &q->ready[p / 2].front
                                                   : &q->ready[p / 2].back;

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
    for (p = 0; p < PRIORITY_LEVELS; p++) {
        struct rlevel *lv = &q->ready[p];
        uint64_t pos;

        for (pos = lv->head; pos < lv->tail; pos++) {
            struct cslot *s = slot_at(lv, pos);

            if (cs_kind(s) == CS_COMPACT) {
                q->bytes -= s->size;
                body_unref(&s->u.body);
            } else if (cs_kind(s) == CS_FULL) {
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
                dedup_release(m);
                msg_free(m);
            } else {
                continue;
            }
            q->n_ready--;
            n++;
        }
        slots_clear(qs, lv);
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
                fail_attempt(m, now_ms, QR_LEASE, NULL);
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
            struct cslot *s = slot_at(lv, pos);
            struct msg v, *m;

            if (cs_kind(s) == CS_FULL) {
                fn(arg, s->u.m);
                continue;
            }
            if (cs_kind(s) != CS_COMPACT) {
                continue;
            }
            slot_view(q, p, s, &v);
            fn(arg, &v);
            s->u.body = v.body;
            s->pub_seg = v.pub_seg;
            s->pub_off = v.pub_off;
            s->pub_len = v.pub_len;
            if (v.state_seg != v.pub_seg && (m = slot_promote(q, p, pos)) != NULL) {
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

/* Put level p of q in id order: its front and back lists are merged into
 * the slots (compactable messages become compact slots, the others CS_FULL
 * ones). Merges from the tail down, in place: only room for the listed
 * messages is allocated. PQ_OK or PQ_ENOMEM (nothing changed). */
static int
level_sort(struct queue *q, int p)
{
    struct qset *qs = q->qs;
    struct rlevel *lv = &q->ready[p];
    struct mlist l = { NULL, NULL };
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
    if (slots_reserve(lv, k) != PQ_OK) {
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

        if (r > lv->head && cs_kind(slot_at(lv, r - 1)) == CS_DEAD) {
            r--;
            continue;
        }
        s = slot_at(lv, --w);
        if (r > lv->head && (m == NULL || slot_at(lv, r - 1)->id > m->id)) {
            r--;
            if (w != r) {
                *s = *slot_at(lv, r);
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
                cs_set_kind(s, CS_COMPACT, m->published_wall_ms);
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
                cs_set_kind(s, CS_FULL, 0);
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
