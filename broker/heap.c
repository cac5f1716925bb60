/*
 * heap.c: indexed binary min-heap (see heap.h). Owns only the slot array;
 * elements belong to the caller. Every move of an element is reported via
 * setpos so the element always knows its slot.
 */
#include "heap.h"

#include <assert.h>

#include "mem.h"
#include "pqerr.h"

static void
place(struct heap *h, size_t pos, void *item)
{
    h->items[pos] = item;
    if (h->setpos != NULL) {
        h->setpos(item, pos);
    }
}

static void
sift_up(struct heap *h, size_t pos)
{
    void *item = h->items[pos];

    while (pos > 0) {
        size_t parent = (pos - 1) / 2;

        if (!h->less(item, h->items[parent])) {
            break;
        }
        place(h, pos, h->items[parent]);
        pos = parent;
    }
    place(h, pos, item);
}

static void
sift_down(struct heap *h, size_t pos)
{
    void *item = h->items[pos];

    for (;;) {
        size_t l = 2 * pos + 1;
        size_t r = l + 1;
        size_t best;

        if (l >= h->len) {
            break;
        }
        best = l;
        if (r < h->len && h->less(h->items[r], h->items[l])) {
            best = r;
        }
        if (!h->less(h->items[best], item)) {
            break;
        }
        place(h, pos, h->items[best]);
        pos = best;
    }
    place(h, pos, item);
}

/* heap_init: see heap.h. */
void
heap_init(struct heap *h, heap_less_fn less, heap_setpos_fn setpos)
{
    h->items = NULL;
    h->len = 0;
    h->cap = 0;
    h->less = less;
    h->setpos = setpos;
}

/* heap_fini: see heap.h. */
void
heap_fini(struct heap *h)
{
    pq_free(h->items);
    h->items = NULL;
    h->len = 0;
    h->cap = 0;
}

/* heap_reserve: see heap.h. Grows geometrically so pushes stay amortized O(1).
 */
int
heap_reserve(struct heap *h, size_t n)
{
    size_t cap;
    void **items;

    if (n <= h->cap) {
        return PQ_OK;
    }
    cap = h->cap < 16 ? 16 : h->cap;
    while (cap < n) {
        if (cap > SIZE_MAX / 2 / sizeof(void *)) {
            return PQ_ENOMEM;
        }
        cap *= 2;
    }
    items = pq_realloc(h->items, cap * sizeof(void *));
    if (items == NULL) {
        return PQ_ENOMEM;
    }
    h->items = items;
    h->cap = cap;
    return PQ_OK;
}

/* heap_push: see heap.h. */
int
heap_push(struct heap *h, void *item)
{
    int rc;

    if (h->len == SIZE_MAX) {
        return PQ_ENOMEM;
    }
    rc = heap_reserve(h, h->len + 1);
    if (rc != PQ_OK) {
        return rc;
    }
    h->items[h->len] = item;
    h->len++;
    sift_up(h, h->len - 1);
    return PQ_OK;
}

/* heap_peek: see heap.h. */
void *
heap_peek(const struct heap *h)
{
    return h->len == 0 ? NULL : h->items[0];
}

/* heap_pop: see heap.h. */
void *
heap_pop(struct heap *h)
{
    if (h->len == 0) {
        return NULL;
    }
    return heap_remove(h, 0);
}

/* heap_remove: see heap.h. The last element fills the hole and moves up or
 * down as its key requires. */
void *
heap_remove(struct heap *h, size_t pos)
{
    void *item;

    assert(pos < h->len);
    item = h->items[pos];
    h->len--;
    if (pos != h->len) {
        h->items[pos] = h->items[h->len];
        heap_update(h, pos);
    }
    if (h->setpos != NULL) {
        h->setpos(item, HEAP_NOPOS);
    }
    return item;
}

/* heap_update: see heap.h. */
void
heap_update(struct heap *h, size_t pos)
{
    assert(pos < h->len);
    if (pos > 0 && h->less(h->items[pos], h->items[(pos - 1) / 2])) {
        sift_up(h, pos);
    } else {
        sift_down(h, pos);
    }
}

/* heap_len: see heap.h. */
size_t
heap_len(const struct heap *h)
{
    return h->len;
}
