/*
 * queue_dedup.c: idempotency keys of a queue: live while their message
 * lives, then kept for the queue's dedup window in expiry order.
 */
#include "queue_int.h"

#include <assert.h>
#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#include "mem.h"
#include "pqerr.h"

/* ---- dedup ---- */

void
queue_dd_fifo_remove(struct queue *q, struct dedup *d)
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

void
queue_dd_free(struct dedup *d)
{
    pq_free(d->key);
    pq_free(d);
}

/* Forget entries whose window ended. The FIFO is in expiry order because
 * every entry of a queue gets the same window and the clock only advances. */
void
queue_dedup_gc(struct queue *q, uint64_t now_ms)
{
    while (q->dd_head != NULL && q->dd_head->expire_ms <= now_ms) {
        struct dedup *d = q->dd_head;

        queue_dd_fifo_remove(q, d);
        (void)hmap_str_del(&q->dedup, d->key);
        queue_dd_free(d);
    }
}

/* m leaves its queue: its key stays known for the window from now. */
void
queue_dedup_release(struct msg *m)
{
    struct queue *q = m->q;
    struct dedup *d;

    if (m->ext == NULL || m->ext->dedup == NULL) {
        return;
    }
    d = m->ext->dedup;
    m->ext->dedup = NULL;
    d->m = NULL;
    d->expire_ms = queue_sat_add(q->qs->clock_ms, q->attrs.dedup_window_ms);
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
queue_dedup_find(struct queue *q, const char *key, uint64_t now_ms,
                 uint64_t *id_out)
{
    struct dedup *d;

    queue_see_clock(q->qs, now_ms);
    queue_dedup_gc(q, now_ms);
    d = hmap_str_get(&q->dedup, key);
    if (d == NULL || (d->m == NULL && d->expire_ms <= now_ms)) {
        return PQ_ENOTFOUND;
    }
    if (id_out != NULL) {
        *id_out = d->id;
    }
    return PQ_OK;
}
