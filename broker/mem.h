/*
 * mem.h: every broker allocation goes through here. It keeps a count of
 * bytes in use (reported in metrics, compared with the memory high
 * watermark) and a fault-injection hook for tests: after
 * pq_mem_fail_after(n), the (n+1)th allocation fails.
 * Single-threaded use only, except pq_mem_used() which may be read racily.
 */
#ifndef PQ_MEM_H
#define PQ_MEM_H

#include <stddef.h>

void *pq_malloc(size_t n);
void *pq_calloc(size_t nmemb, size_t size);
void *pq_realloc(void *p, size_t n);
char *pq_strdup(const char *s);
char *pq_strndup(const char *s, size_t n);
void pq_free(void *p);

/* Bytes currently allocated through pq_* (headers included). */
size_t pq_mem_used(void);

/* Test hook: let n more allocations succeed, then fail all; -1 disables. */
void pq_mem_fail_after(long n);

#endif
