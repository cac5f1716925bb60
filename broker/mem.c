/*
 * mem.c: counting allocator. Each block carries a 16-byte header holding its
 * size, so pq_free() and pq_realloc() can keep the count exact without
 * malloc_usable_size(). The count and the fault hook are process-wide on
 * purpose: they describe the process, not one broker object. The count is
 * updated atomically because the storage thread allocates too; the fault
 * hook is for single-threaded tests.
 */
#include "mem.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { HDR = 16 }; /* keeps the user pointer 16-byte aligned */

static size_t used_bytes;
static long fail_after = -1;

static int
should_fail(void)
{
    if (fail_after < 0) {
        return 0;
    }
    if (fail_after == 0) {
        return 1;
    }
    fail_after--;
    return 0;
}

void *
pq_malloc(size_t n)
{
    unsigned char *p;

    if (should_fail() || n > SIZE_MAX - HDR) {
        return NULL;
    }
    p = malloc(n + HDR);
    if (p == NULL) {
        return NULL;
    }
    memcpy(p, &n, sizeof(n));
    __atomic_add_fetch(&used_bytes, n + HDR, __ATOMIC_RELAXED);
    return p + HDR;
}

void *
pq_calloc(size_t nmemb, size_t size)
{
    void *p;

    if (size != 0 && nmemb > SIZE_MAX / size) {
        return NULL;
    }
    p = pq_malloc(nmemb * size);
    if (p != NULL) {
        memset(p, 0, nmemb * size);
    }
    return p;
}

void *
pq_realloc(void *ptr, size_t n)
{
    unsigned char *old, *p;
    size_t oldn;

    if (ptr == NULL) {
        return pq_malloc(n);
    }
    if (should_fail() || n > SIZE_MAX - HDR) {
        return NULL;
    }
    old = (unsigned char *)ptr - HDR;
    memcpy(&oldn, old, sizeof(oldn));
    p = realloc(old, n + HDR);
    if (p == NULL) {
        return NULL;
    }
    memcpy(p, &n, sizeof(n));
    __atomic_add_fetch(&used_bytes, n, __ATOMIC_RELAXED);
    __atomic_sub_fetch(&used_bytes, oldn, __ATOMIC_RELAXED);
    return p + HDR;
}

char *
pq_strndup(const char *s, size_t n)
{
    size_t len = strnlen(s, n);
    char *p = pq_malloc(len + 1);

    if (p != NULL) {
        memcpy(p, s, len);
        p[len] = '\0';
    }
    return p;
}

char *
pq_strdup(const char *s)
{
    return pq_strndup(s, SIZE_MAX);
}

void
pq_free(void *ptr)
{
    unsigned char *p;
    size_t n;

    if (ptr == NULL) {
        return;
    }
    p = (unsigned char *)ptr - HDR;
    memcpy(&n, p, sizeof(n));
    __atomic_sub_fetch(&used_bytes, n + HDR, __ATOMIC_RELAXED);
    free(p);
}

size_t
pq_mem_used(void)
{
    return __atomic_load_n(&used_bytes, __ATOMIC_RELAXED);
}

void
pq_mem_fail_after(long n)
{
    fail_after = n;
}
