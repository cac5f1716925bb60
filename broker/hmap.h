/*
 * hmap.h: open-addressing hash maps (linear probing, backward-shift delete,
 * so there are no tombstones). Two flavours:
 *   struct hmap_u64: uint64_t key -> non-NULL pointer
 *   struct hmap_str: NUL-terminated string key -> non-NULL pointer. The map
 *                    does NOT own or copy the key: the key must live as long
 *                    as its entry (typically it points into the value).
 * Values must be non-NULL (NULL marks an empty slot). Tables grow at 3/4 load
 * and shrink below 1/8 (never below HMAP_MIN_CAP). A failed grow returns
 * PQ_ENOMEM and leaves the map unchanged; shrinking is best-effort. Iteration
 * order is unspecified and is invalidated by any put/del.
 */
#ifndef PQ_HMAP_H
#define PQ_HMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum { HMAP_MIN_CAP = 16 };

struct hmap_u64_slot {
    uint64_t key;
    void *val; /* NULL = empty */
};

struct hmap_u64 {
    struct hmap_u64_slot *slots;
    size_t cap; /* power of two, or 0 before the first put */
    size_t len;
};

/* hmap_u64_init: an empty map; allocates nothing. */
void hmap_u64_init(struct hmap_u64 *m);
/* hmap_u64_fini: frees the table (not the values). */
void hmap_u64_fini(struct hmap_u64 *m);
/* hmap_u64_reserve: make room for n entries without growing later. */
int hmap_u64_reserve(struct hmap_u64 *m, size_t n);
/* hmap_u64_get: the value for key, or NULL. */
void *hmap_u64_get(const struct hmap_u64 *m, uint64_t key);
/* hmap_u64_put: insert key. PQ_OK, PQ_EEXIST (key present, unchanged),
 * PQ_EINVAL (val NULL) or PQ_ENOMEM (unchanged). */
int hmap_u64_put(struct hmap_u64 *m, uint64_t key, void *val);
/* hmap_u64_del: remove key; returns its value, or NULL if absent. */
void *hmap_u64_del(struct hmap_u64 *m, uint64_t key);
/* hmap_u64_len: number of entries. */
size_t hmap_u64_len(const struct hmap_u64 *m);
/* hmap_u64_next: iterate: start with *iter = 0; returns the next value and
 * sets *key_out (may be NULL), or NULL at the end. */
void *hmap_u64_next(const struct hmap_u64 *m, size_t *iter, uint64_t *key_out);

struct hmap_str_slot {
    const char *key; /* borrowed */
    uint64_t hash;
    void *val; /* NULL = empty */
};

struct hmap_str {
    struct hmap_str_slot *slots;
    size_t cap;
    size_t len;
};

/* hmap_str_init: an empty map; allocates nothing. */
void hmap_str_init(struct hmap_str *m);
/* hmap_str_fini: frees the table (not keys or values). */
void hmap_str_fini(struct hmap_str *m);
/* hmap_str_get: the value for key, or NULL. */
void *hmap_str_get(const struct hmap_str *m, const char *key);
/* hmap_str_put: insert key (borrowed). Same returns as hmap_u64_put. */
int hmap_str_put(struct hmap_str *m, const char *key, void *val);
/* hmap_str_del: remove key; returns its value, or NULL if absent. */
void *hmap_str_del(struct hmap_str *m, const char *key);
/* hmap_str_len: number of entries. */
size_t hmap_str_len(const struct hmap_str *m);
/* hmap_str_next: iterate like hmap_u64_next. */
void *hmap_str_next(const struct hmap_str *m, size_t *iter,
                    const char **key_out);

/*
 * struct hmap_ptr: an index of objects that carry their own uint64_t key at
 * byte offset key_off, one word per slot (half of hmap_u64's). On 64-bit
 * targets the top 16 bits of each slot hold 16 bits of the key's hash, so a
 * probe compares tags and reads the object only on a tag match (1 in 65536
 * for a wrong key); objects must therefore sit below 2^48 (asserted; true
 * of user-space pointers on Linux unless mmap is asked for higher ones).
 * Capacity is not a power of two (the hash is mapped to [0, cap) by a
 * multiply), grows by 1.5x past 85% load and halves below 25%, so at any
 * size the table costs 9.4-15 bytes per entry. Same linear probing and
 * backward-shift delete as the others; delete reads the objects it shifts.
 * The map borrows the objects.
 */
struct hmap_ptr {
    uintptr_t *slots; /* 0 = empty, else tag << 48 | pointer */
    size_t cap;       /* 0 before the first put */
    size_t len;
    size_t key_off; /* offsetof(object type, key field) */
};

/* hmap_ptr_init: an empty index of objects keyed at key_off; allocates nothing.
 */
void hmap_ptr_init(struct hmap_ptr *m, size_t key_off);
/* hmap_ptr_fini: frees the table (not the objects). */
void hmap_ptr_fini(struct hmap_ptr *m);
/* hmap_ptr_reserve: make room for n entries without growing later. */
int hmap_ptr_reserve(struct hmap_ptr *m, size_t n);
/* hmap_ptr_get: the object whose key is key, or NULL. */
void *hmap_ptr_get(const struct hmap_ptr *m, uint64_t key);
/* hmap_ptr_put: insert obj under its own key. PQ_OK, PQ_EEXIST (an object
 * with that key is present, unchanged), PQ_EINVAL (obj NULL) or PQ_ENOMEM
 * (unchanged). */
int hmap_ptr_put(struct hmap_ptr *m, void *obj);
/* hmap_ptr_del: remove the object with this key; returns it, or NULL. */
void *hmap_ptr_del(struct hmap_ptr *m, uint64_t key);
/* hmap_ptr_len: number of entries. */
size_t hmap_ptr_len(const struct hmap_ptr *m);
/* hmap_ptr_next: iterate: start with *iter = 0; the next object, or NULL. */
void *hmap_ptr_next(const struct hmap_ptr *m, size_t *iter);

/* hmap_hash_u64 / hmap_hash_str: the hash functions (exposed for tests). */
uint64_t hmap_hash_u64(uint64_t x);
uint64_t hmap_hash_str(const char *s);

#endif
