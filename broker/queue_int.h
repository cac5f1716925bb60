/*
 * queue_int.h: what the files of the queue set share (never included
 * outside them; queue.h is the interface). The invariants are in queue.c.
 *
 *   queue.c          names and attributes, consumers, the deadline heap,
 *                    state changes (requeue, dead-letter, expiry, drop),
 *                    the set, push
 *   queue_ready.c    the ready structure: message lists, slabs of struct
 *                    msg, compact slots, and walking/sorting for the journal
 *   queue_dedup.c    idempotency keys
 *   queue_deliver.c  delivery, subscriptions, the holder's answers (ack,
 *                    nack, touch, release, cancel), purge and time
 */
#ifndef PQ_QUEUE_INT_H
#define PQ_QUEUE_INT_H

#include "queue.h"

#include <assert.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "heap.h"
#include "hmap.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define POISON(p, n) ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif

enum {
    MSG_LIMBO = 0xf
}; /* unlinked for a moment inside one call (4-bit state) */

/* struct msg allocation: slabs of MSG_SLAB_LEN messages (~100 KiB). */
enum { MSG_SLAB_LEN = 1024 };

struct msg_slab {
    struct msg_slab *prev, *next; /* qset's list of slabs with room */
    struct msg *free;             /* freed slots, linked through next */
    uint32_t used;                /* live messages here */
    uint32_t fresh; /* slots [fresh, MSG_SLAB_LEN) never used yet */
    bool has_room;  /* on the qset's room list */
    struct msg msgs[MSG_SLAB_LEN];
};

/* Optional parts of a message; allocated only when one is used. */
struct msg_ext {
    struct kv *requires; /* one block (kv_copy), or NULL */
    size_t n_requires;
    struct body *progress; /* latest Progress, kept across attempts */
    char *last_error;      /* text of the latest nack error */
    struct dedup *dedup;   /* live idempotency entry, or NULL */
};

/* An idempotency key of one queue. While its message lives, m is set; once
 * it is gone, expire_ms is set and the entry sits on the queue's FIFO. */
struct dedup {
    char *key;                 /* owned; also the hmap key */
    uint64_t id;               /* the first message's id */
    struct msg *m;             /* live message, or NULL */
    uint64_t expire_ms;        /* when m == NULL: forget at this time */
    struct dedup *prev, *next; /* FIFO of gone entries, expiry order */
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
        struct body
            *body;     /* CS_COMPACT: encoded message, or NULL when evicted */
        struct msg *m; /* CS_FULL: the promoted message */
    } u;
    uint64_t wall_kind; /* published_wall_ms (48 bits) | kind << 48 */
    uint32_t size, pub_seg, pub_off,
        pub_len; /* as in struct msg; state_seg = pub_seg */
};

struct cchunk {
    struct cslot s[CSLOT_CHUNK];
};

struct rlevel {
    struct mlist front;     /* requeued at the front */
    struct mlist back;      /* full messages pushed at the back; due_ms = seq */
    struct cchunk **chunks; /* slots [base, base + n_chunks * CSLOT_CHUNK) */
    size_t n_chunks, chunks_cap;
    uint64_t base, head,
        tail;           /* slots in use: [head, tail); slot head is live */
    uint64_t n_live;    /* CS_COMPACT + CS_FULL slots in [head, tail) */
    uint64_t n_compact; /* CS_COMPACT slots */
};

/* msg.flags bits beside MSG_F_CANCELLED, queue.c's own: where a READY
 * message sits in its level (neither: the front list). */
enum { MSG_F_SLOT = 1u << 1, MSG_F_BACK = 1u << 2 };

struct queue {
    char name[QUEUE_NAME_MAX + 1];
    struct qset *qs;
    struct queue *prev, *next; /* qset's list, creation order */
    struct queue_attrs attrs;  /* resolved */
    struct queue_stats stats;
    struct rlevel ready[PRIORITY_LEVELS];
    struct mlist delayed; /* unordered; the heap orders them */
    uint64_t n_ready, n_delayed, n_inflight;
    uint64_t n_ready_req; /* READY messages that have requirements */
    uint64_t bytes;       /* sum of msg.size */
    uint32_t n_consumers;
    struct consumer *cons_head, *cons_tail;
    struct consumer *avail_head, *avail_tail; /* credit ring, round-robin */
    struct hmap_str dedup;                    /* key -> struct dedup */
    struct dedup *dd_head, *dd_tail; /* gone entries, oldest expiry first */
};

struct qset {
    struct queue_defaults defaults;
    struct hmap_str names; /* name -> queue */
    struct queue *q_head, *q_tail;
    size_t n_queues;
    struct hmap_ptr msgs;    /* id -> msg, every live struct msg */
    uint64_t n_compact;      /* messages kept in CS_COMPACT slots */
    uint64_t compact_max_id; /* highest id ever put in a compact slot */
    bool no_squeeze;         /* a walk over slot positions is under way */
    struct msg_slab **slabs; /* every slab, sorted by address */
    size_t n_slabs, slabs_cap;
    struct msg_slab *room; /* slabs with a free slot */
    size_t n_empty;        /* slabs with used == 0 (at most one kept) */
    struct heap deadlines; /* msgs by next deadline */
    uint64_t rng;          /* splitmix64 state */
    uint64_t clock_ms;     /* latest now_ms seen (for calls without one) */
    qset_listener_fn listener;
    void *listener_arg;
};

static inline uint64_t
queue_sat_add(uint64_t a, uint64_t b)
{
    return a > UINT64_MAX - b ? UINT64_MAX : a + b;
}

static inline void
queue_see_clock(struct qset *qs, uint64_t now_ms)
{
    if (now_ms > qs->clock_ms) {
        qs->clock_ms = now_ms;
    }
}

void queue_emit(struct qset *qs, enum qevent_type type, struct msg *m,
                struct queue *q, struct queue *from, enum qreason reason,
                const char *detail, const struct kv *hdrs, size_t n_hdrs);

static inline void
queue_hint_ready(struct queue *q)
{
    if (q->n_ready > 0) {
        queue_emit(q->qs, QEV_READY, NULL, q, NULL, QR_NONE, NULL, NULL, 0);
    }
}

void queue_mlist_push_back(struct mlist *l, struct msg *m);

void queue_mlist_push_front(struct mlist *l, struct msg *m);

void queue_mlist_remove(struct mlist *l, struct msg *m);

void queue_avail_remove(struct consumer *c);

/* Put c on or off the credit ring to match its credit (joins at the tail). */
void queue_avail_sync(struct consumer *c);

static inline bool
msg_has_req(const struct msg *m)
{
    return m->ext != NULL && m->ext->n_requires > 0;
}

int queue_ensure_ext(struct msg *m);

void queue_slab_free(struct qset *qs, struct msg_slab *s);

/* A zeroed struct msg, or NULL on ENOMEM. */
struct msg *msg_alloc(struct qset *qs);

static inline struct cslot *
queue_slot_at(const struct rlevel *lv, uint64_t pos)
{
    uint64_t i = pos - lv->base;

    assert(pos >= lv->base && i / CSLOT_CHUNK < lv->n_chunks);
    return &lv->chunks[i / CSLOT_CHUNK]->s[i % CSLOT_CHUNK];
}

static inline unsigned
queue_cs_kind(const struct cslot *s)
{
    return (unsigned)(s->wall_kind >> 48);
}

static inline void
queue_cs_set_kind(struct cslot *s, unsigned kind, uint64_t wall_ms)
{
    s->wall_kind = (uint64_t)kind << 48 | (wall_ms & CS_WALL_MASK);
}

/* Room for n more slots at the tail. PQ_OK or PQ_ENOMEM (chunks already
 * added stay, unused). */
int queue_slots_reserve(struct rlevel *lv, uint64_t n);

/* Drop every slot (the caller has dealt with their contents). */
void queue_slots_clear(struct qset *qs, struct rlevel *lv);

/* Position of the live slot holding id, or POS_NONE. O(log n). */
uint64_t queue_slot_find(const struct rlevel *lv, uint64_t id);

/* The compact slot holding id anywhere in qs: O(levels holding compact
 * slots * log n); immediate for an id above every compact one. */
bool queue_compact_find(const struct qset *qs, uint64_t id,
                        struct queue **q_out, int *p_out, uint64_t *pos_out);

/* A read-only struct msg image of a compact slot. */
void queue_slot_view(struct queue *q, int p, const struct cslot *s,
                     struct msg *v);

/* Turn the slot at pos into a struct msg in place (same position). The
 * message, or NULL on ENOMEM (nothing changed). */
struct msg *queue_slot_promote(struct queue *q, int p, uint64_t pos);

void queue_maybe_squeeze(struct qset *qs, struct rlevel *lv);

/* The slot at pos leaves (its contents are the caller's). */
void queue_slot_kill(struct queue *q, struct rlevel *lv, uint64_t pos);

/* The first ready entry of lv: a full message (*m set) or the compact slot
 * at *pos (*m NULL). false when lv is empty. */
bool queue_level_first(const struct rlevel *lv, struct msg **m, uint64_t *pos);

/* A new message that can be kept in a compact slot at the tail of its
 * level: READY, never delivered, nothing optional, no pointer wanted. */
bool queue_compactable_new(const struct queue *q, const struct msg_new *mn,
                           uint64_t now_ms, bool want_ptr);

bool msg_deadline(const struct msg *m, uint64_t *out);

/* Give m the heap slot its state calls for. Never allocates: capacity for
 * every live message was reserved in queue_push. */
void queue_sched(struct msg *m);

void queue_dd_fifo_remove(struct queue *q, struct dedup *d);

void queue_dd_free(struct dedup *d);

/* Forget entries whose window ended. The FIFO is in expiry order because
 * every entry of a queue gets the same window and the clock only advances. */
void queue_dedup_gc(struct queue *q, uint64_t now_ms);

/* m leaves its queue: its key stays known for the window from now. */
void queue_dedup_release(struct msg *m);

void queue_make_ready(struct msg *m, bool front);

/* Take m out of its list and the heap; it stays in the id map and counted in
 * q->bytes. The caller puts it somewhere else or frees it. */
void queue_unlink_msg(struct msg *m);

/* Put an unlinked, previously delivered message back: at once (front of its
 * level) or after delay_ms. */
void queue_requeue(struct msg *m, uint64_t now_ms, uint64_t delay_ms,
                   enum qreason reason);

/* An unlinked in-flight message failed an attempt. */
void queue_fail_attempt(struct msg *m, uint64_t now_ms, enum qreason reason,
                        const struct nack_opts *o);

/* An unlinked READY/DELAYED message's TTL passed. */
void queue_expire_msg(struct msg *m, uint64_t now_ms);

/* The compact message at pos is cancelled: QEV_DROP with a struct msg
 * image of it (nothing to allocate), then it goes. */
void queue_drop_compact(struct queue *q, int p, uint64_t pos,
                        enum qreason reason);

/* An unlinked cancelled in-flight message reaches its end. */
void queue_finish_cancelled(struct msg *m);

int queue_keep_progress(struct msg *m, struct body *progress);

#endif
