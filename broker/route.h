/*
 * route.h: routes, named sets of bindings to queues. A publish to a route
 * stores one copy of the message in every queue with a binding whose
 * pattern matches the publish's routing key (each queue once, however many
 * of its bindings match). Patterns are AMQP topic patterns: the key and the
 * pattern are words separated by '.', a pattern word "*" matches exactly
 * one word, "#" zero or more words, any other word itself; the empty
 * pattern matches every key. A route exists while it has a binding.
 *
 * Pure in-memory state (no I/O, no clock): dispatch.c journals the changes
 * and journal_replay.c replays them. Queue names are kept as strings: a
 * queue's deletion removes its bindings through routes_unbind_queue.
 */
#ifndef PQ_ROUTE_H
#define PQ_ROUTE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct routes;

/* route_pattern_valid: a pattern of at most PQ_ROUTE_PATTERN_MAX bytes. */
bool route_pattern_valid(const char *pattern);

/* route_pattern_match: does key match pattern (see above)? Linear in the
 * product of their word counts, no recursion. */
bool route_pattern_match(const char *pattern, const char *key);

/* routes_new: an empty set, NULL on ENOMEM. routes_free: NULL ok. */
struct routes *routes_new(void);
void routes_free(struct routes *rs);

/*
 * routes_bind: bind queue to route with pattern ("" = every key), creating
 * the route. PQ_OK; PQ_EEXIST if this exact binding exists (nothing
 * changes); PQ_EINVAL for a bad route name or pattern; PQ_EFULL past
 * PQ_ROUTES_MAX routes, PQ_ROUTE_BINDINGS_MAX bindings of the route or
 * PQ_BINDINGS_MAX in all;
 * PQ_ENOMEM. The queue name is the caller's to check.
 */
int routes_bind(struct routes *rs, const char *route, const char *queue,
                const char *pattern);

/* routes_unbind: remove that exact binding (the route goes with its last
 * one). PQ_OK or PQ_ENOTFOUND. */
int routes_unbind(struct routes *rs, const char *route, const char *queue,
                  const char *pattern);

/* routes_unbind_queue: remove every binding to queue; returns how many. */
uint32_t routes_unbind_queue(struct routes *rs, const char *queue);

/*
 * routes_match: the distinct queues of route whose bindings match key, in
 * the order of their first matching binding, into queues[0..*n) (at most
 * cap; PQ_ROUTE_BINDINGS_MAX is always enough). The names are borrowed
 * until the set changes. PQ_OK (*n may be 0) or PQ_ENOTFOUND (no route).
 */
int routes_match(const struct routes *rs, const char *route, const char *key,
                 const char **queues, uint32_t cap, uint32_t *n);

/* routes_foreach: every binding, routes by name, bindings in bind order.
 * fn must not change the set. */
void routes_foreach(const struct routes *rs,
                    void (*fn)(void *arg, const char *route, const char *queue,
                               const char *pattern),
                    void *arg);

/* routes_binding_count: bindings of every route. */
size_t routes_binding_count(const struct routes *rs);

#endif
