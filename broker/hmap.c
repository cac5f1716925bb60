/*
 * hmap.c: open-addressing hash maps with linear probing and backward-shift
 * deletion (see hmap.h). Invariant: every entry sits in the probe run that
 * starts at its home slot (hash & (cap - 1)) with no empty slot in between;
 * backward-shift delete keeps it without tombstones, so lookups stay short
 * after many deletes. Load factor stays <= 3/4 (hmap_u64, hmap_str; power
 * of two capacities) or <= 85% (hmap_ptr; any capacity, hash mapped by a
 * multiply, so "home slot" there is ptr_home()).
 */
#include "hmap.h"

#include <assert.h>
#include <string.h>

#include "mem.h"
#include "pqerr.h"

/* hmap_hash_u64: splitmix64's finalizer; good avalanche for sequential ids. */
uint64_t
hmap_hash_u64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

/* hmap_hash_str: FNV-1a 64, then the u64 finalizer to spread the low bits. */
uint64_t
hmap_hash_str(const char *s)
{
    uint64_t h = 0xcbf29ce484222325ULL;

    for (; *s != '\0'; s++) {
        h ^= (unsigned char)*s;
        h *= 0x100000001b3ULL;
    }
    return hmap_hash_u64(h);
}

static bool
need_grow(size_t len, size_t cap)
{
    return cap == 0 || (len + 1) * 4 > cap * 3;
}

static size_t
cap_for(size_t n)
{
    size_t cap = HMAP_MIN_CAP;

    while (n * 4 > cap * 3) {
        if (cap > SIZE_MAX / 4) {
            return 0;
        }
        cap *= 2;
    }
    return cap;
}

/* ---- uint64 keys ---- */

/* hmap_u64_init: see hmap.h. */
void
hmap_u64_init(struct hmap_u64 *m)
{
    m->slots = NULL;
    m->cap = 0;
    m->len = 0;
}

/* hmap_u64_fini: see hmap.h. */
void
hmap_u64_fini(struct hmap_u64 *m)
{
    pq_free(m->slots);
    hmap_u64_init(m);
}

static void
u64_insert_fresh(struct hmap_u64_slot *slots, size_t cap, uint64_t key,
                 void *val)
{
    size_t i = hmap_hash_u64(key) & (cap - 1);

    while (slots[i].val != NULL) {
        i = (i + 1) & (cap - 1);
    }
    slots[i].key = key;
    slots[i].val = val;
}

static int
u64_rehash(struct hmap_u64 *m, size_t cap)
{
    struct hmap_u64_slot *slots;
    size_t i;

    if (cap == 0 || cap > SIZE_MAX / sizeof(*slots)) {
        return PQ_ENOMEM;
    }
    slots = pq_calloc(cap, sizeof(*slots));
    if (slots == NULL) {
        return PQ_ENOMEM;
    }
    for (i = 0; i < m->cap; i++) {
        if (m->slots[i].val != NULL) {
            u64_insert_fresh(slots, cap, m->slots[i].key, m->slots[i].val);
        }
    }
    pq_free(m->slots);
    m->slots = slots;
    m->cap = cap;
    return PQ_OK;
}

/* hmap_u64_reserve: see hmap.h. */
int
hmap_u64_reserve(struct hmap_u64 *m, size_t n)
{
    size_t cap = cap_for(n);

    if (cap == 0) {
        return PQ_ENOMEM;
    }
    if (cap <= m->cap) {
        return PQ_OK;
    }
    return u64_rehash(m, cap);
}

static size_t
u64_find(const struct hmap_u64 *m, uint64_t key)
{
    size_t i;

    if (m->cap == 0) {
        return SIZE_MAX;
    }
    i = hmap_hash_u64(key) & (m->cap - 1);
    while (m->slots[i].val != NULL) {
        if (m->slots[i].key == key) {
            return i;
        }
        i = (i + 1) & (m->cap - 1);
    }
    return SIZE_MAX;
}

/* hmap_u64_get: see hmap.h. */
void *
hmap_u64_get(const struct hmap_u64 *m, uint64_t key)
{
    size_t i = u64_find(m, key);

    return i == SIZE_MAX ? NULL : m->slots[i].val;
}

/* hmap_u64_put: see hmap.h. */
int
hmap_u64_put(struct hmap_u64 *m, uint64_t key, void *val)
{
    if (val == NULL) {
        return PQ_EINVAL;
    }
    if (u64_find(m, key) != SIZE_MAX) {
        return PQ_EEXIST;
    }
    if (need_grow(m->len, m->cap)) {
        int rc = u64_rehash(m, m->cap == 0 ? HMAP_MIN_CAP : m->cap * 2);

        if (rc != PQ_OK) {
            return rc;
        }
    }
    u64_insert_fresh(m->slots, m->cap, key, val);
    m->len++;
    return PQ_OK;
}

/* hmap_u64_del: see hmap.h. Backward shift: walk the run after the hole and
 * move back every entry whose home slot is not cyclically in (hole, j]. */
void *
hmap_u64_del(struct hmap_u64 *m, uint64_t key)
{
    size_t i = u64_find(m, key);
    size_t mask, j;
    void *val;

    if (i == SIZE_MAX) {
        return NULL;
    }
    val = m->slots[i].val;
    mask = m->cap - 1;
    j = i;
    for (;;) {
        size_t home;

        j = (j + 1) & mask;
        if (m->slots[j].val == NULL) {
            break;
        }
        home = hmap_hash_u64(m->slots[j].key) & mask;
        if (((j - home) & mask) >= ((j - i) & mask)) {
            m->slots[i] = m->slots[j];
            i = j;
        }
    }
    m->slots[i].val = NULL;
    m->slots[i].key = 0;
    m->len--;
    if (m->cap > HMAP_MIN_CAP && m->len * 8 < m->cap) {
        (void)u64_rehash(
            m, m->cap / 2); /* best-effort: a failed shrink is harmless */
    }
    return val;
}

/* hmap_u64_len: see hmap.h. */
size_t
hmap_u64_len(const struct hmap_u64 *m)
{
    return m->len;
}

/* hmap_u64_next: see hmap.h. */
void *
hmap_u64_next(const struct hmap_u64 *m, size_t *iter, uint64_t *key_out)
{
    while (*iter < m->cap) {
        size_t i = (*iter)++;

        if (m->slots[i].val != NULL) {
            if (key_out != NULL) {
                *key_out = m->slots[i].key;
            }
            return m->slots[i].val;
        }
    }
    return NULL;
}

/* ---- string keys ---- */

/* hmap_str_init: see hmap.h. */
void
hmap_str_init(struct hmap_str *m)
{
    m->slots = NULL;
    m->cap = 0;
    m->len = 0;
}

/* hmap_str_fini: see hmap.h. */
void
hmap_str_fini(struct hmap_str *m)
{
    pq_free(m->slots);
    hmap_str_init(m);
}

static void
str_insert_fresh(struct hmap_str_slot *slots, size_t cap, const char *key,
                 uint64_t hash, void *val)
{
    size_t i = hash & (cap - 1);

    while (slots[i].val != NULL) {
        i = (i + 1) & (cap - 1);
    }
    slots[i].key = key;
    slots[i].hash = hash;
    slots[i].val = val;
}

static int
str_rehash(struct hmap_str *m, size_t cap)
{
    struct hmap_str_slot *slots;
    size_t i;

    if (cap == 0 || cap > SIZE_MAX / sizeof(*slots)) {
        return PQ_ENOMEM;
    }
    slots = pq_calloc(cap, sizeof(*slots));
    if (slots == NULL) {
        return PQ_ENOMEM;
    }
    for (i = 0; i < m->cap; i++) {
        if (m->slots[i].val != NULL) {
            str_insert_fresh(slots, cap, m->slots[i].key, m->slots[i].hash,
                             m->slots[i].val);
        }
    }
    pq_free(m->slots);
    m->slots = slots;
    m->cap = cap;
    return PQ_OK;
}

static size_t
str_find(const struct hmap_str *m, const char *key, uint64_t hash)
{
    size_t i;

    if (m->cap == 0) {
        return SIZE_MAX;
    }
    i = hash & (m->cap - 1);
    while (m->slots[i].val != NULL) {
        if (m->slots[i].hash == hash && strcmp(m->slots[i].key, key) == 0) {
            return i;
        }
        i = (i + 1) & (m->cap - 1);
    }
    return SIZE_MAX;
}

/* hmap_str_get: see hmap.h. */
void *
hmap_str_get(const struct hmap_str *m, const char *key)
{
    size_t i = str_find(m, key, hmap_hash_str(key));

    return i == SIZE_MAX ? NULL : m->slots[i].val;
}

/* hmap_str_put: see hmap.h. */
int
hmap_str_put(struct hmap_str *m, const char *key, void *val)
{
    uint64_t hash = hmap_hash_str(key);

    if (val == NULL) {
        return PQ_EINVAL;
    }
    if (str_find(m, key, hash) != SIZE_MAX) {
        return PQ_EEXIST;
    }
    if (need_grow(m->len, m->cap)) {
        int rc = str_rehash(m, m->cap == 0 ? HMAP_MIN_CAP : m->cap * 2);

        if (rc != PQ_OK) {
            return rc;
        }
    }
    str_insert_fresh(m->slots, m->cap, key, hash, val);
    m->len++;
    return PQ_OK;
}

/* hmap_str_del: see hmap.h (same backward shift as hmap_u64_del). */
void *
hmap_str_del(struct hmap_str *m, const char *key)
{
    size_t i = str_find(m, key, hmap_hash_str(key));
    size_t mask, j;
    void *val;

    if (i == SIZE_MAX) {
        return NULL;
    }
    val = m->slots[i].val;
    mask = m->cap - 1;
    j = i;
    for (;;) {
        size_t home;

        j = (j + 1) & mask;
        if (m->slots[j].val == NULL) {
            break;
        }
        home = m->slots[j].hash & mask;
        if (((j - home) & mask) >= ((j - i) & mask)) {
            m->slots[i] = m->slots[j];
            i = j;
        }
    }
    m->slots[i].val = NULL;
    m->slots[i].key = NULL;
    m->len--;
    if (m->cap > HMAP_MIN_CAP && m->len * 8 < m->cap) {
        (void)str_rehash(m, m->cap / 2); /* best-effort */
    }
    return val;
}

/* hmap_str_len: see hmap.h. */
size_t
hmap_str_len(const struct hmap_str *m)
{
    return m->len;
}

/* hmap_str_next: see hmap.h. */
void *
hmap_str_next(const struct hmap_str *m, size_t *iter, const char **key_out)
{
    while (*iter < m->cap) {
        size_t i = (*iter)++;

        if (m->slots[i].val != NULL) {
            if (key_out != NULL) {
                *key_out = m->slots[i].key;
            }
            return m->slots[i].val;
        }
    }
    return NULL;
}

/* ---- objects keyed by their own uint64_t (one word per slot) ---- */

#if UINTPTR_MAX == UINT64_MAX
enum { TAG_SHIFT = 48 };
#define PTR_MASK ((uintptr_t)0xffffffffffffULL)
#define SLOT_TAG(h) ((uintptr_t)((h)&0xffff) << TAG_SHIFT)
#else
#define PTR_MASK UINTPTR_MAX
#define SLOT_TAG(h) ((uintptr_t)0)
#endif
#define SLOT_OBJ(s) ((void *)((s)&PTR_MASK))
#define SLOT_TAG_OF(s) ((s) & ~PTR_MASK)

static uint64_t
ptr_key(const struct hmap_ptr *m, const void *obj)
{
    uint64_t k;

    memcpy(&k, (const char *)obj + m->key_off, sizeof(k));
    return k;
}

/* The hash mapped onto [0, cap) by its high bits (Lemire's reduction). */
static size_t
ptr_home(uint64_t h, size_t cap)
{
    return (size_t)(((unsigned __int128)h * cap) >> 64);
}

static size_t
ptr_cap_for(size_t n)
{
    /* load <= 17/20 (85%) */
    if (n > SIZE_MAX / 20) {
        return 0;
    }
    n = n * 20 / 17 + 1;
    return n < HMAP_MIN_CAP ? HMAP_MIN_CAP : n;
}

/* hmap_ptr_init: see hmap.h. */
void
hmap_ptr_init(struct hmap_ptr *m, size_t key_off)
{
    m->slots = NULL;
    m->cap = 0;
    m->len = 0;
    m->key_off = key_off;
}

/* hmap_ptr_fini: see hmap.h. */
void
hmap_ptr_fini(struct hmap_ptr *m)
{
    pq_free(m->slots);
    hmap_ptr_init(m, m->key_off);
}

static void
ptr_insert_fresh(uintptr_t *slots, size_t cap, uint64_t h, uintptr_t slot)
{
    size_t i = ptr_home(h, cap);

    while (slots[i] != 0) {
        i = i + 1 == cap ? 0 : i + 1;
    }
    slots[i] = slot;
}

static int
ptr_rehash(struct hmap_ptr *m, size_t cap)
{
    uintptr_t *slots;
    size_t i;

    if (cap == 0 || cap > SIZE_MAX / sizeof(*slots)) {
        return PQ_ENOMEM;
    }
    slots = pq_calloc(cap, sizeof(*slots));
    if (slots == NULL) {
        return PQ_ENOMEM;
    }
    for (i = 0; i < m->cap; i++) {
        if (m->slots[i] != 0) {
            uint64_t h = hmap_hash_u64(ptr_key(m, SLOT_OBJ(m->slots[i])));

            ptr_insert_fresh(slots, cap, h, m->slots[i]);
        }
    }
    pq_free(m->slots);
    m->slots = slots;
    m->cap = cap;
    return PQ_OK;
}

/* hmap_ptr_reserve: see hmap.h. Grows by at least 1.5x, so a reserve per
 * insert stays amortized O(1). */
int
hmap_ptr_reserve(struct hmap_ptr *m, size_t n)
{
    size_t want = ptr_cap_for(n);

    if (want == 0) {
        return PQ_ENOMEM;
    }
    if (want <= m->cap) {
        return PQ_OK;
    }
    if (m->cap > 0 && want < m->cap + m->cap / 2) {
        want = m->cap + m->cap / 2;
    }
    return ptr_rehash(m, want);
}

static size_t
ptr_find(const struct hmap_ptr *m, uint64_t key, uint64_t h)
{
    uintptr_t tag = SLOT_TAG(h);
    size_t i;

    if (m->cap == 0) {
        return SIZE_MAX;
    }
    i = ptr_home(h, m->cap);
    while (m->slots[i] != 0) {
        if (SLOT_TAG_OF(m->slots[i]) == tag &&
            ptr_key(m, SLOT_OBJ(m->slots[i])) == key) {
            return i;
        }
        i = i + 1 == m->cap ? 0 : i + 1;
    }
    return SIZE_MAX;
}

/* hmap_ptr_get: see hmap.h. */
void *
hmap_ptr_get(const struct hmap_ptr *m, uint64_t key)
{
    size_t i = ptr_find(m, key, hmap_hash_u64(key));

    return i == SIZE_MAX ? NULL : SLOT_OBJ(m->slots[i]);
}

/* hmap_ptr_put: see hmap.h. */
int
hmap_ptr_put(struct hmap_ptr *m, void *obj)
{
    uint64_t key, h;
    int rc;

    if (obj == NULL) {
        return PQ_EINVAL;
    }
    assert(((uintptr_t)obj & ~PTR_MASK) == 0);
    key = ptr_key(m, obj);
    h = hmap_hash_u64(key);
    if (ptr_find(m, key, h) != SIZE_MAX) {
        return PQ_EEXIST;
    }
    rc = hmap_ptr_reserve(m, m->len + 1);
    if (rc != PQ_OK) {
        return rc;
    }
    ptr_insert_fresh(m->slots, m->cap, h, SLOT_TAG(h) | (uintptr_t)obj);
    m->len++;
    return PQ_OK;
}

/* Cyclic distance from a forward to b. */
static size_t
ptr_dist(size_t a, size_t b, size_t cap)
{
    return b >= a ? b - a : b + cap - a;
}

/* hmap_ptr_del: see hmap.h (backward shift, as hmap_u64_del). */
void *
hmap_ptr_del(struct hmap_ptr *m, uint64_t key)
{
    size_t i = ptr_find(m, key, hmap_hash_u64(key));
    size_t j;
    void *obj;

    if (i == SIZE_MAX) {
        return NULL;
    }
    obj = SLOT_OBJ(m->slots[i]);
    j = i;
    for (;;) {
        size_t home;

        j = j + 1 == m->cap ? 0 : j + 1;
        if (m->slots[j] == 0) {
            break;
        }
        home =
            ptr_home(hmap_hash_u64(ptr_key(m, SLOT_OBJ(m->slots[j]))), m->cap);
        if (ptr_dist(home, j, m->cap) >= ptr_dist(i, j, m->cap)) {
            m->slots[i] = m->slots[j];
            i = j;
        }
    }
    m->slots[i] = 0;
    m->len--;
    if (m->cap > HMAP_MIN_CAP && m->len * 4 < m->cap) {
        (void)ptr_rehash(
            m, ptr_cap_for(m->len * 17 / 10 + 1)); /* ~50% load; best-effort */
    }
    return obj;
}

/* hmap_ptr_len: see hmap.h. */
size_t
hmap_ptr_len(const struct hmap_ptr *m)
{
    return m->len;
}

/* hmap_ptr_next: see hmap.h. */
void *
hmap_ptr_next(const struct hmap_ptr *m, size_t *iter)
{
    while (*iter < m->cap) {
        size_t i = (*iter)++;

        if (m->slots[i] != 0) {
            return SLOT_OBJ(m->slots[i]);
        }
    }
    return NULL;
}
