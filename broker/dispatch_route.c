/*
 * dispatch_route.c: route bind, unbind and list, and a publish's route
 * resolved to the queues it stores copies in (route.h has the matching;
 * dispatch_publish.c stores the copies in one record).
 *
 * A binding is as durable as its queue: a binding of a durable queue is
 * journaled (ROUTE_BIND, ROUTE_UNBIND) and answered once on disk; one of a
 * transient queue lives in memory only, as the queue does.
 */
#include "dispatch.h"
#include "dispatch_int.h"

#include <string.h>

#include "log.h"
#include "mem.h"
#include "pqerr.h"
#include "route.h"

static bool
check_route(struct conn *c, uint64_t rid, const char *what, const char *route,
            const char *pattern)
{
    if (route == NULL || !queue_name_valid(route, strlen(route))) {
        dispatch_reply_err(c, rid, PQ_EINVAL,
                           "%s: invalid route name (1-%d characters of A-Z "
                           "a-z 0-9 . _ - :)",
                           what, PQ_ROUTE_NAME_MAX);
        return false;
    }
    if (pattern != NULL && !route_pattern_valid(pattern)) {
        dispatch_reply_err(c, rid, PQ_EINVAL, "%s %s: pattern over %d bytes",
                           what, route, PQ_ROUTE_PATTERN_MAX);
        return false;
    }
    return true;
}

static const char *
str_or_empty(const char *s)
{
    return s != NULL ? s : "";
}

void
dispatch_on_route_bind(struct conn *c, uint64_t rid, const Protoq__RouteBind *r)
{
    struct broker *bk = broker_of(c);
    const char *pattern = str_or_empty(r->pattern);
    struct queue *q;
    uint64_t lsn = 0;
    int rc;

    if (!check_route(c, rid, "route bind", r->route, pattern) ||
        (q = dispatch_find_queue(c, rid, r->queue, AUTH_MANAGE,
                                 "route bind")) == NULL) {
        return; /* answered */
    }
    rc = routes_bind(bk->routes, r->route, r->queue, pattern);
    if (rc == PQ_EEXIST) {
        dispatch_finish_ok(c, rid, 0, 0); /* bound already: Ok, count 0 */
        return;
    }
    if (rc == PQ_EFULL) {
        dispatch_reply_err(c, rid, PQ_EINVAL,
                           "route bind %s: too many bindings (at most %d "
                           "routes, %d bindings a route, %d in all)",
                           r->route, PQ_ROUTES_MAX, PQ_ROUTE_BINDINGS_MAX,
                           PQ_BINDINGS_MAX);
        return;
    }
    if (rc == PQ_OK && !queue_attrs(q)->transient) {
        rc =
            journal_route(bk->journal, true, r->route, r->queue, pattern, &lsn);
        if (rc != PQ_OK) {
            (void)routes_unbind(bk->routes, r->route, r->queue, pattern);
        }
    }
    if (rc != PQ_OK) {
        dispatch_reply_err(c, rid, rc, "route bind %s: %s", r->route,
                           pq_strerror(rc));
        return;
    }
    log_info("route %s bound to queue %s (pattern \"%s\")", r->route, r->queue,
             pattern);
    dispatch_finish_ok(c, rid, lsn, 1);
}

void
dispatch_on_route_unbind(struct conn *c, uint64_t rid,
                         const Protoq__RouteUnbind *r)
{
    struct broker *bk = broker_of(c);
    const char *pattern = str_or_empty(r->pattern);
    const char *queue = str_or_empty(r->queue);
    struct queue *q = qset_find(bk->qs, queue);
    uint64_t lsn = 0;
    int rc;

    if (!check_route(c, rid, "route unbind", r->route, pattern)) {
        return;
    }
    rc = routes_unbind(bk->routes, r->route, queue, pattern);
    if (rc == PQ_ENOTFOUND) {
        dispatch_finish_ok(c, rid, 0, 0); /* not bound: Ok, count 0 */
        return;
    }
    /* Bound means its queue exists (deletion unbinds). */
    if (q != NULL && !queue_attrs(q)->transient) {
        rc = journal_route(bk->journal, false, r->route, queue, pattern, &lsn);
        if (rc != PQ_OK) {
            /* Put it back (the same place in the match order is not
             * kept; the answer says the unbind failed). */
            (void)routes_bind(bk->routes, r->route, queue, pattern);
            dispatch_reply_err(c, rid, rc, "route unbind %s: %s", r->route,
                               pq_strerror(rc));
            return;
        }
    }
    log_info("route %s unbound from queue %s (pattern \"%s\")", r->route, queue,
             pattern);
    dispatch_finish_ok(c, rid, lsn, 1);
}

struct list_walk {
    struct conn *c; /* bindings of queues it may not see are left out */
    Protoq__RouteBinding *b;
    Protoq__RouteBinding **ptrs;
    size_t n;
};

static void
list_binding(void *arg, const char *route, const char *queue,
             const char *pattern)
{
    struct list_walk *w = arg;
    Protoq__RouteBinding *b = &w->b[w->n];

    if (!dispatch_may(w->c, AUTH_ANY, queue)) {
        return; /* as QueueList: only queues the token may see */
    }
    protoq__route_binding__init(b);
    /* The frame only reads them; the set does not change meanwhile. */
    b->route = (char *)route;
    b->queue = (char *)queue;
    b->pattern = (char *)pattern;
    w->ptrs[w->n++] = b;
}

void
dispatch_on_route_list(struct conn *c, uint64_t rid)
{
    struct broker *bk = broker_of(c);
    size_t n = routes_binding_count(bk->routes);
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__RouteListOk ok = PROTOQ__ROUTE_LIST_OK__INIT;
    struct list_walk w = {.c = c};

    if (n > 0) {
        w.b = pq_calloc(n, sizeof(*w.b));
        w.ptrs = pq_calloc(n, sizeof(*w.ptrs));
        if (w.b == NULL || w.ptrs == NULL) {
            dispatch_reply_err(c, rid, PQ_ENOMEM, "route list: out of memory");
            goto out;
        }
        routes_foreach(bk->routes, list_binding, &w);
    }
    ok.n_bindings = w.n;
    ok.bindings = w.ptrs;
    f.request_id = rid;
    f.kind_case = PROTOQ__FRAME__KIND_ROUTE_LIST_OK;
    f.route_list_ok = &ok;
    if (frame_packed_size(&f) - FRAME_HEADER_LEN > bk->cfg->max_frame_bytes) {
        dispatch_reply_err(c, rid, PQ_ETOOBIG,
                           "route list: %zu bindings do not fit in one frame",
                           n);
        goto out;
    }
    conn_send(c, &f);
out:
    pq_free(w.b);
    pq_free(w.ptrs);
}

bool
dispatch_route_queues(struct conn *c, uint64_t rid, const Protoq__Publish *pub,
                      const char **queues, uint32_t *n)
{
    struct broker *bk = broker_of(c);
    const char *key = str_or_empty(pub->routing_key);
    int rc;

    *n = 0;
    if (!check_route(c, rid, "publish", pub->route, NULL)) {
        return false;
    }
    if (pub->queue != NULL && pub->queue[0] != '\0') {
        dispatch_reply_err(c, rid, PQ_EINVAL,
                           "publish: give a queue or a route, not both");
        return false;
    }
    if (strlen(key) > PQ_ROUTING_KEY_MAX) {
        dispatch_reply_err(c, rid, PQ_EINVAL,
                           "publish to route %s: routing key over %d bytes",
                           pub->route, PQ_ROUTING_KEY_MAX);
        return false;
    }
    rc = routes_match(bk->routes, pub->route, key, queues,
                      PQ_ROUTE_BINDINGS_MAX, n);
    if (rc == PQ_ENOTFOUND) {
        dispatch_reply_err(c, rid, rc,
                           "route \"%s\" does not exist (it has no bindings)",
                           pub->route);
        return false;
    }
    if (*n == 0 && !pub->allow_unrouted) {
        dispatch_reply_err(c, rid, PQ_ENOTFOUND,
                           "route %s: no binding matches routing key \"%s\" "
                           "(nothing stored)",
                           pub->route, key);
        return false;
    }
    return true;
}
