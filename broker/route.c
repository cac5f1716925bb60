/*
 * route.c: see route.h. Routes are a sorted array (binary search by name;
 * at most PQ_ROUTES_MAX), each with an array of bindings in bind order (at
 * most PQ_ROUTE_BINDINGS_MAX); both bounds keep every walk short.
 */
#include "route.h"

#include <stdlib.h>
#include <string.h>

#include "mem.h"
#include "pqerr.h"
#include "pqlimits.h"
#include "queue.h"

struct binding {
    char *queue;
    char *pattern; /* "" = every key */
};

struct route {
    char *name;
    struct binding *b;
    uint32_t n, cap;
};

struct routes {
    struct route *r; /* sorted by name */
    uint32_t n, cap;
    size_t n_bindings;
};

/* ---- patterns ---- */

bool
route_pattern_valid(const char *pattern)
{
    return strlen(pattern) <= PQ_ROUTE_PATTERN_MAX;
}

/* Split s into at most cap words (start, length); returns the count, or
 * cap + 1 if there are more. The empty string has no words. */
static size_t
split_words(const char *s, const char **w, size_t *wl, size_t cap)
{
    size_t n = 0;

    if (*s == '\0') {
        return 0;
    }
    for (;;) {
        const char *dot = strchr(s, '.');
        size_t len = dot ? (size_t)(dot - s) : strlen(s);

        if (n == cap) {
            return cap + 1;
        }
        w[n] = s;
        wl[n++] = len;
        if (dot == NULL) {
            return n;
        }
        s = dot + 1;
    }
}

static bool
word_is(const char *w, size_t len, char c)
{
    return len == 1 && w[0] == c;
}

/*
 * Dynamic programming over (pattern words, key words): row[j] is whether
 * the pattern words so far match the first j key words. Both strings are
 * bounded (255 bytes: at most 256 words, all empty), so the table is one
 * row of 257 at a time.
 */
bool
route_pattern_match(const char *pattern, const char *key)
{
    enum { WORDS = PQ_ROUTE_PATTERN_MAX + 1 };
    _Static_assert(PQ_ROUTING_KEY_MAX <= PQ_ROUTE_PATTERN_MAX,
                   "the word arrays are sized by the pattern limit");
    const char *pw[WORDS], *kw[WORDS];
    size_t pl[WORDS], kl[WORDS];
    bool row[WORDS + 1], prev[WORDS + 1];
    size_t np, nk;

    if (*pattern == '\0') {
        return true;
    }
    np = split_words(pattern, pw, pl, WORDS);
    nk = split_words(key, kw, kl, WORDS);
    if (np > WORDS || nk > WORDS) {
        return false; /* longer than any valid pattern or key */
    }
    row[0] = true;
    for (size_t j = 1; j <= nk; j++) {
        row[j] = false;
    }
    for (size_t i = 0; i < np; i++) {
        memcpy(prev, row, (nk + 1) * sizeof(bool));
        if (word_is(pw[i], pl[i], '#')) {
            /* zero words (prev[j]) or one more word (row[j - 1]) */
            row[0] = prev[0];
            for (size_t j = 1; j <= nk; j++) {
                row[j] = prev[j] || row[j - 1];
            }
            continue;
        }
        row[0] = false;
        for (size_t j = 1; j <= nk; j++) {
            bool same =
                word_is(pw[i], pl[i], '*') ||
                (pl[i] == kl[j - 1] && memcmp(pw[i], kw[j - 1], pl[i]) == 0);

            row[j] = prev[j - 1] && same;
        }
    }
    return row[nk];
}

/* ---- the set ---- */

struct routes *
routes_new(void)
{
    return pq_calloc(1, sizeof(struct routes));
}

static void
binding_fini(struct binding *b)
{
    pq_free(b->queue);
    pq_free(b->pattern);
}

static void
route_fini(struct route *r)
{
    for (uint32_t i = 0; i < r->n; i++) {
        binding_fini(&r->b[i]);
    }
    pq_free(r->b);
    pq_free(r->name);
}

void
routes_free(struct routes *rs)
{
    if (rs == NULL) {
        return;
    }
    for (uint32_t i = 0; i < rs->n; i++) {
        route_fini(&rs->r[i]);
    }
    pq_free(rs->r);
    pq_free(rs);
}

/* The index of route name, or where it would go (*found false). */
static uint32_t
find_route(const struct routes *rs, const char *name, bool *found)
{
    uint32_t lo = 0, hi = rs->n;

    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        int c = strcmp(rs->r[mid].name, name);

        if (c == 0) {
            *found = true;
            return mid;
        }
        if (c < 0) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    *found = false;
    return lo;
}

static int
find_binding(const struct route *r, const char *queue, const char *pattern)
{
    for (uint32_t i = 0; i < r->n; i++) {
        if (strcmp(r->b[i].queue, queue) == 0 &&
            strcmp(r->b[i].pattern, pattern) == 0) {
            return (int)i;
        }
    }
    return -1;
}

/* Grow *arr (of *cap elements of size sz) to hold one more than n. */
static int
grow(void **arr, uint32_t *cap, uint32_t n, size_t sz)
{
    uint32_t ncap;
    void *na;

    if (n < *cap) {
        return PQ_OK;
    }
    ncap = *cap ? *cap * 2 : 4;
    na = pq_realloc(*arr, (size_t)ncap * sz);
    if (na == NULL) {
        return PQ_ENOMEM;
    }
    *arr = na;
    *cap = ncap;
    return PQ_OK;
}

/* Insert an empty route called name at index at. */
static int
insert_route(struct routes *rs, uint32_t at, const char *name)
{
    void *arr = rs->r;
    char *copy;
    int rc;

    if (rs->n >= PQ_ROUTES_MAX) {
        return PQ_EFULL;
    }
    rc = grow(&arr, &rs->cap, rs->n, sizeof(struct route));
    rs->r = arr;
    if (rc != PQ_OK || (copy = pq_strdup(name)) == NULL) {
        return PQ_ENOMEM;
    }
    memmove(&rs->r[at + 1], &rs->r[at], (rs->n - at) * sizeof(struct route));
    rs->r[at] = (struct route){.name = copy};
    rs->n++;
    return PQ_OK;
}

static void
remove_route(struct routes *rs, uint32_t at)
{
    route_fini(&rs->r[at]);
    memmove(&rs->r[at], &rs->r[at + 1],
            (rs->n - at - 1) * sizeof(struct route));
    rs->n--;
}

int
routes_bind(struct routes *rs, const char *route, const char *queue,
            const char *pattern)
{
    struct binding nb = {0};
    struct route *r;
    bool found;
    uint32_t at;
    void *arr;
    int rc;

    if (!queue_name_valid(route, strlen(route)) ||
        !route_pattern_valid(pattern)) {
        return PQ_EINVAL;
    }
    at = find_route(rs, route, &found);
    if (found && find_binding(&rs->r[at], queue, pattern) >= 0) {
        return PQ_EEXIST;
    }
    if ((found && rs->r[at].n >= PQ_ROUTE_BINDINGS_MAX) ||
        rs->n_bindings >= PQ_BINDINGS_MAX) {
        return PQ_EFULL;
    }
    nb.queue = pq_strdup(queue);
    nb.pattern = pq_strdup(pattern);
    if (nb.queue == NULL || nb.pattern == NULL) {
        rc = PQ_ENOMEM;
        goto fail;
    }
    if (!found && (rc = insert_route(rs, at, route)) != PQ_OK) {
        goto fail;
    }
    r = &rs->r[at];
    arr = r->b;
    rc = grow(&arr, &r->cap, r->n, sizeof(struct binding));
    r->b = arr;
    if (rc != PQ_OK) {
        if (r->n == 0) {
            remove_route(rs, at);
        }
        goto fail;
    }
    r->b[r->n++] = nb; /* the route owns the copies now */
    rs->n_bindings++;
    return PQ_OK;
fail:
    binding_fini(&nb);
    return rc;
}

/* Remove binding i of route at; the route goes with its last binding. */
static void
remove_binding(struct routes *rs, uint32_t at, uint32_t i)
{
    struct route *r = &rs->r[at];

    binding_fini(&r->b[i]);
    memmove(&r->b[i], &r->b[i + 1], (r->n - i - 1) * sizeof(struct binding));
    r->n--;
    rs->n_bindings--;
    if (r->n == 0) {
        remove_route(rs, at);
    }
}

int
routes_unbind(struct routes *rs, const char *route, const char *queue,
              const char *pattern)
{
    bool found;
    uint32_t at = find_route(rs, route, &found);
    int i;

    if (!found || (i = find_binding(&rs->r[at], queue, pattern)) < 0) {
        return PQ_ENOTFOUND;
    }
    remove_binding(rs, at, (uint32_t)i);
    return PQ_OK;
}

uint32_t
routes_unbind_queue(struct routes *rs, const char *queue)
{
    uint32_t removed = 0;

    /* Backwards: removing a binding (and maybe its route) only moves what
     * comes after it. */
    for (uint32_t at = rs->n; at-- > 0;) {
        for (uint32_t i = rs->r[at].n; i-- > 0;) {
            if (strcmp(rs->r[at].b[i].queue, queue) == 0) {
                bool last = rs->r[at].n == 1;

                remove_binding(rs, at, i);
                removed++;
                if (last) {
                    break;
                }
            }
        }
    }
    return removed;
}

int
routes_match(const struct routes *rs, const char *route, const char *key,
             const char **queues, uint32_t cap, uint32_t *n)
{
    bool found;
    uint32_t at = find_route(rs, route, &found);
    const struct route *r;

    *n = 0;
    if (!found) {
        return PQ_ENOTFOUND;
    }
    r = &rs->r[at];
    for (uint32_t i = 0; i < r->n && *n < cap; i++) {
        bool dup = false;

        if (!route_pattern_match(r->b[i].pattern, key)) {
            continue;
        }
        for (uint32_t k = 0; k < *n && !dup; k++) {
            dup = strcmp(queues[k], r->b[i].queue) == 0;
        }
        if (!dup) {
            queues[(*n)++] = r->b[i].queue;
        }
    }
    return PQ_OK;
}

void
routes_foreach(const struct routes *rs,
               void (*fn)(void *arg, const char *route, const char *queue,
                          const char *pattern),
               void *arg)
{
    for (uint32_t at = 0; at < rs->n; at++) {
        for (uint32_t i = 0; i < rs->r[at].n; i++) {
            fn(arg, rs->r[at].name, rs->r[at].b[i].queue,
               rs->r[at].b[i].pattern);
        }
    }
}

size_t
routes_binding_count(const struct routes *rs)
{
    return rs->n_bindings;
}
