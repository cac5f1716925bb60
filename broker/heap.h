/*
 * heap.h: an indexed binary min-heap of opaque pointers. Each element learns
 * its slot through the setpos callback whenever it moves (beanstalkd style),
 * so an element can be removed or re-keyed in O(log n) given its slot. When
 * an element leaves the heap, setpos is called with HEAP_NOPOS.
 * The heap never allocates except in heap_push/heap_reserve; once capacity
 * is reserved, heap_push cannot fail. No locking: the caller's job.
 */
#ifndef PQ_HEAP_H
#define PQ_HEAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define HEAP_NOPOS SIZE_MAX

/* less(a, b): true when a must come out before b. */
typedef bool (*heap_less_fn)(const void *a, const void *b);
/* setpos(item, pos): item now sits at pos (HEAP_NOPOS once removed). */
typedef void (*heap_setpos_fn)(void *item, size_t pos);

struct heap {
    void **items; /* items[0] is the minimum */
    size_t len;   /* elements in use */
    size_t cap;   /* slots allocated */
    heap_less_fn less;
    heap_setpos_fn setpos; /* may be NULL */
};

/* heap_init: an empty heap; allocates nothing. */
void heap_init(struct heap *h, heap_less_fn less, heap_setpos_fn setpos);

/* heap_fini: frees the slot array (not the elements); h is empty after. */
void heap_fini(struct heap *h);

/* heap_reserve: make room for at least n elements. PQ_OK or PQ_ENOMEM. */
int heap_reserve(struct heap *h, size_t n);

/* heap_push: insert item. PQ_OK, or PQ_ENOMEM (heap unchanged). */
int heap_push(struct heap *h, void *item);

/* heap_peek: the minimum, or NULL when empty. */
void *heap_peek(const struct heap *h);

/* heap_pop: remove and return the minimum, or NULL when empty. */
void *heap_pop(struct heap *h);

/* heap_remove: remove and return the element at pos (pos < len). */
void *heap_remove(struct heap *h, size_t pos);

/* heap_update: the key of the element at pos changed; restore order. */
void heap_update(struct heap *h, size_t pos);

/* heap_len: number of elements. */
size_t heap_len(const struct heap *h);

#endif
