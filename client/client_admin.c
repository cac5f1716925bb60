/*
 * client_admin.c: libprotoq queue and route administration (protoq.h).
 */
#include "client_int.h"

#include <stdlib.h>
#include <string.h>

/* ---- queue admin ---- */

static void
attrs_to_wire(Protoq__QueueAttrs *w, const struct protoq_queue_attrs *a)
{
    w->transient = a->transient;
    w->max_length = a->max_length;
    w->max_bytes = a->max_bytes;
    w->ack_timeout_ms = a->ack_timeout_ms;
    w->max_attempts = a->max_attempts;
    w->dead_letter = S(a->dead_letter);
    w->backoff_base_ms = a->backoff_base_ms;
    w->backoff_cap_ms = a->backoff_cap_ms;
    w->ttl_ms = a->ttl_ms;
    w->dedup_window_ms = a->dedup_window_ms;
    w->max_lease_ms = a->max_lease_ms;
    w->dead_letter_expired = a->dead_letter_expired;
    w->no_backoff = a->no_backoff;
}

static void
info_from_wire(struct protoq_queue_info *o, const Protoq__QueueInfo *w)
{
    const Protoq__QueueAttrs *a = w->attrs;

    memset(o, 0, sizeof(*o));
    client_copy_str(o->name, sizeof(o->name), w->name);
    if (a != NULL) {
        o->attrs.transient = a->transient;
        o->attrs.max_length = a->max_length;
        o->attrs.max_bytes = a->max_bytes;
        o->attrs.ack_timeout_ms = a->ack_timeout_ms;
        o->attrs.max_attempts = a->max_attempts;
        client_copy_str(o->attrs.dead_letter, sizeof(o->attrs.dead_letter),
                        a->dead_letter);
        o->attrs.backoff_base_ms = a->backoff_base_ms;
        o->attrs.backoff_cap_ms = a->backoff_cap_ms;
        o->attrs.ttl_ms = a->ttl_ms;
        o->attrs.dedup_window_ms = a->dedup_window_ms;
        o->attrs.max_lease_ms = a->max_lease_ms;
        o->attrs.dead_letter_expired = a->dead_letter_expired;
        o->attrs.no_backoff = a->no_backoff;
    }
    o->ready = w->ready;
    o->delayed = w->delayed;
    o->inflight = w->inflight;
    o->consumers = w->consumers;
    o->bytes = w->bytes;
    o->published = w->published;
    o->acked = w->acked;
    o->nacked = w->nacked;
    o->redelivered = w->redelivered;
    o->expired = w->expired;
    o->dead_lettered = w->dead_lettered;
    o->dropped = w->dropped;
}

/* protoq_queue_create: QueueCreate, wait for Ok. */
int
protoq_queue_create(protoq_client *c, const char *name,
                    const struct protoq_queue_attrs *attrs)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__QueueCreate qc = PROTOQ__QUEUE_CREATE__INIT;
    Protoq__QueueAttrs wa = PROTOQ__QUEUE_ATTRS__INIT;

    if (!client_name_ok(c, "queue", name)) {
        return PQ_EINVAL;
    }
    qc.name = S(name);
    if (attrs != NULL) {
        attrs_to_wire(&wa, attrs);
        qc.attrs = &wa;
    }
    f.kind_case = PROTOQ__FRAME__KIND_QUEUE_CREATE;
    f.queue_create = &qc;
    return client_request_ok(c, &f, NULL);
}

/* protoq_queue_delete: QueueDelete, wait for Ok. */
int
protoq_queue_delete(protoq_client *c, const char *name)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__QueueDelete qd = PROTOQ__QUEUE_DELETE__INIT;

    if (!client_name_ok(c, "queue", name)) {
        return PQ_EINVAL;
    }
    qd.name = S(name);
    f.kind_case = PROTOQ__FRAME__KIND_QUEUE_DELETE;
    f.queue_delete = &qd;
    return client_request_ok(c, &f, NULL);
}

/* protoq_queue_purge: QueuePurge, wait for Ok{count}. */
int
protoq_queue_purge(protoq_client *c, const char *name, uint64_t *purged)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__QueuePurge qp = PROTOQ__QUEUE_PURGE__INIT;

    if (purged != NULL) {
        *purged = 0;
    }
    if (!client_name_ok(c, "queue", name)) {
        return PQ_EINVAL;
    }
    qp.name = S(name);
    f.kind_case = PROTOQ__FRAME__KIND_QUEUE_PURGE;
    f.queue_purge = &qp;
    return client_request_ok(c, &f, purged);
}

/* protoq_queue_list: QueueList; the array is the caller's
 * (protoq_queue_list_free). */
int
protoq_queue_list(protoq_client *c, struct protoq_queue_info **out, size_t *n)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__QueueList ql = PROTOQ__QUEUE_LIST__INIT;
    Protoq__Frame *r;
    struct protoq_queue_info *list = NULL;
    size_t i, cnt;
    int rc;

    *out = NULL;
    *n = 0;
    f.kind_case = PROTOQ__FRAME__KIND_QUEUE_LIST;
    f.queue_list = &ql;
    rc = client_request(c, &f, PROTOQ__FRAME__KIND_QUEUE_LIST_OK, &r);
    if (rc != PQ_OK) {
        return rc;
    }
    cnt = r->queue_list_ok->n_queues;
    if (cnt > 0) {
        list = calloc(cnt, sizeof(*list));
        if (list == NULL) {
            frame_free(r);
            return client_set_err(c, PQ_ENOMEM, "out of memory (queue list)");
        }
        for (i = 0; i < cnt; i++) {
            info_from_wire(&list[i], r->queue_list_ok->queues[i]);
        }
    }
    frame_free(r);
    *out = list;
    *n = cnt;
    return PQ_OK;
}

/* protoq_queue_list_free: free a protoq_queue_list array. */
void
protoq_queue_list_free(struct protoq_queue_info *list, size_t n)
{
    (void)n;
    free(list);
}

/* protoq_queue_stat: QueueStat into *out. */
int
protoq_queue_stat(protoq_client *c, const char *name,
                  struct protoq_queue_info *out)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__QueueStat qs = PROTOQ__QUEUE_STAT__INIT;
    Protoq__Frame *r;
    int rc;

    memset(out, 0, sizeof(*out));
    if (!client_name_ok(c, "queue", name)) {
        return PQ_EINVAL;
    }
    qs.name = S(name);
    f.kind_case = PROTOQ__FRAME__KIND_QUEUE_STAT;
    f.queue_stat = &qs;
    rc = client_request(c, &f, PROTOQ__FRAME__KIND_QUEUE_STAT_OK, &r);
    if (rc != PQ_OK) {
        return rc;
    }
    if (r->queue_stat_ok->queue == NULL) {
        frame_free(r);
        return client_set_err(c, PQ_EPROTO,
                              "broker sent QueueStatOk without a queue");
    }
    info_from_wire(out, r->queue_stat_ok->queue);
    frame_free(r);
    return PQ_OK;
}

/* protoq_route_bind: RouteBind, wait for Ok. */
int
protoq_route_bind(protoq_client *c, const char *route, const char *queue,
                  const char *pattern)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__RouteBind rb = PROTOQ__ROUTE_BIND__INIT;

    if (!client_name_ok(c, "route", route) ||
        !client_name_ok(c, "queue", queue)) {
        return PQ_EINVAL;
    }
    rb.route = S(route);
    rb.queue = S(queue);
    rb.pattern = S(pattern);
    f.kind_case = PROTOQ__FRAME__KIND_ROUTE_BIND;
    f.route_bind = &rb;
    return client_request_ok(c, &f, NULL);
}

/* protoq_route_unbind: RouteUnbind, wait for Ok. */
int
protoq_route_unbind(protoq_client *c, const char *route, const char *queue,
                    const char *pattern)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__RouteUnbind ru = PROTOQ__ROUTE_UNBIND__INIT;

    if (!client_name_ok(c, "route", route) ||
        !client_name_ok(c, "queue", queue)) {
        return PQ_EINVAL;
    }
    ru.route = S(route);
    ru.queue = S(queue);
    ru.pattern = S(pattern);
    f.kind_case = PROTOQ__FRAME__KIND_ROUTE_UNBIND;
    f.route_unbind = &ru;
    return client_request_ok(c, &f, NULL);
}
