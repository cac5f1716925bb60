/*
 * dispatch_admin.c: queue administration: create (attributes and their
 * checks, dead-letter targets), delete (its subscriptions and held
 * deliveries go with it), purge, stat and list.
 */
#include "dispatch.h"
#include "dispatch_int.h"

#include <assert.h>
#include <stdio.h>
#include <string.h>
#include <sysexits.h>
#include <unistd.h>

#include "clock.h"
#include "log.h"
#include "mem.h"
#include "pqerr.h"
#include "route.h"

/* ---- queue administration ---- */

static bool
check_name(struct conn *c, uint64_t rid, const char *what, const char *name)
{
    if (name == NULL || !queue_name_valid(name, strlen(name))) {
        dispatch_reply_err(
            c, rid, PQ_EINVAL,
            "%s: invalid queue name (1-200 characters of A-Z a-z 0-9 . _ - :)",
            what);
        return false;
    }
    return true;
}

/* dispatch_find_queue: see dispatch_int.h. */
struct queue *
dispatch_find_queue(struct conn *c, uint64_t rid, const char *name,
                    unsigned perms, const char *what)
{
    struct queue *q;

    if (!check_name(c, rid, "queue", name) ||
        !dispatch_allow(c, rid, perms, name, what)) {
        return NULL;
    }
    q = qset_find(broker_of(c)->qs, name);
    if (q == NULL) {
        dispatch_reply_err(c, rid, PQ_ENOTFOUND, "queue \"%s\" does not exist",
                           name);
    }
    return q;
}

static void
attrs_from_wire(struct queue_attrs *a, const Protoq__QueueAttrs *w)
{
    memset(a, 0, sizeof(*a));
    if (w == NULL) {
        return;
    }
    a->transient = w->transient;
    a->max_length = w->max_length;
    a->max_bytes = w->max_bytes;
    a->ack_timeout_ms = w->ack_timeout_ms;
    a->max_attempts = w->max_attempts;
    snprintf(a->dead_letter, sizeof(a->dead_letter), "%s",
             w->dead_letter ? w->dead_letter : "");
    a->backoff_base_ms = w->backoff_base_ms;
    a->backoff_cap_ms = w->backoff_cap_ms;
    a->ttl_ms = w->ttl_ms;
    a->dedup_window_ms = w->dedup_window_ms;
    a->max_lease_ms = w->max_lease_ms;
    a->dead_letter_expired = w->dead_letter_expired;
    a->no_backoff = w->no_backoff;
}

static void
attrs_to_wire(Protoq__QueueAttrs *w, const struct queue_attrs *a)
{
    protoq__queue_attrs__init(w);
    w->transient = a->transient;
    w->max_length = a->max_length;
    w->max_bytes = a->max_bytes;
    w->ack_timeout_ms = a->ack_timeout_ms;
    w->max_attempts = a->max_attempts;
    w->dead_letter = (char *)a->dead_letter;
    w->backoff_base_ms = a->backoff_base_ms;
    w->backoff_cap_ms = a->backoff_cap_ms;
    w->ttl_ms = a->ttl_ms;
    w->dedup_window_ms = a->dedup_window_ms;
    w->max_lease_ms = a->max_lease_ms;
    w->dead_letter_expired = a->dead_letter_expired;
    w->no_backoff = a->backoff_base_ms == 0;
}

/*
 * Every new log segment starts with the definitions of all durable queues
 * (so old segments can be deleted); they must fit in a quarter of one.
 * A definition takes at most ~500 bytes.
 */
static size_t
max_durable_queues(const struct broker *bk)
{
    return (size_t)(bk->cfg->segment_bytes / 2048);
}

static size_t
durable_queue_count(const struct broker *bk)
{
    size_t n = 0;

    for (struct queue *q = qset_first(bk->qs); q; q = qset_next(q)) {
        n += !queue_attrs(q)->transient;
    }
    return n;
}

/*
 * A dead_letter names another queue that exists, durable when the queue
 * is (a transient one is gone after a restart): failed jobs are never
 * dropped for want of their dead-letter queue. Deleting a queue that is
 * one is refused too (on_queue_delete). Checked on every QueueCreate, the
 * idempotent repeat of an existing queue's included.
 */
static bool
dead_letter_ok(struct conn *c, uint64_t rid, const char *name,
               const struct queue_attrs *a)
{
    struct queue *dlq;

    if (strcmp(a->dead_letter, name) == 0) {
        dispatch_reply_err(c, rid, PQ_EINVAL,
                           "queue create %s: a queue cannot be its "
                           "own dead_letter",
                           name);
        return false;
    }
    dlq = qset_find(broker_of(c)->qs, a->dead_letter);
    if (dlq == NULL) {
        dispatch_reply_err(c, rid, PQ_ENOTFOUND,
                           "queue create %s: dead_letter queue "
                           "\"%s\" does not exist (create it first)",
                           name, a->dead_letter);
        return false;
    }
    if (!a->transient && queue_attrs(dlq)->transient) {
        dispatch_reply_err(
            c, rid, PQ_EINVAL,
            "queue create %s: dead_letter queue "
            "\"%s\" is transient, and a durable queue's dead letters "
            "must survive a restart",
            name, a->dead_letter);
        return false;
    }
    return true;
}

void
dispatch_on_queue_create(struct conn *c, uint64_t rid,
                         const Protoq__QueueCreate *r)
{
    struct broker *bk = broker_of(c);
    struct queue_attrs a;
    struct queue *q = NULL;
    bool existed;
    uint64_t lsn = 0;
    int rc;

    if (!check_name(c, rid, "queue create", r->name) ||
        !dispatch_allow(c, rid, AUTH_MANAGE, r->name, "queue create")) {
        return;
    }
    if (r->attrs && r->attrs->dead_letter &&
        strlen(r->attrs->dead_letter) > QUEUE_NAME_MAX) {
        dispatch_reply_err(c, rid, PQ_EINVAL,
                           "queue create %s: dead_letter name over "
                           "%d characters",
                           r->name, QUEUE_NAME_MAX);
        return;
    }
    attrs_from_wire(&a, r->attrs);
    if (a.dead_letter[0] != '\0' &&
        !queue_name_valid(a.dead_letter, strlen(a.dead_letter))) {
        dispatch_reply_err(c, rid, PQ_EINVAL,
                           "queue create %s: invalid dead_letter name",
                           r->name);
        return;
    }
    /* Dead letters flow into that queue: as good as publishing there. */
    if (a.dead_letter[0] != '\0' &&
        (!dispatch_allow(c, rid, AUTH_PUBLISH | AUTH_MANAGE, a.dead_letter,
                         "queue create: dead_letter") ||
         !dead_letter_ok(c, rid, r->name, &a))) {
        return;
    }
    if (a.max_attempts > 1000000 || a.ack_timeout_ms > 365ULL * 86400000 ||
        a.ttl_ms > DURATION_MAX_MS || a.backoff_base_ms > DURATION_MAX_MS ||
        a.backoff_cap_ms > DURATION_MAX_MS ||
        a.dedup_window_ms > DURATION_MAX_MS ||
        a.max_lease_ms > DURATION_MAX_MS) {
        dispatch_reply_err(
            c, rid, PQ_EINVAL,
            "queue create %s: max_attempts over 1000000, ack_timeout_ms "
            "over a year, or a duration over ten years",
            r->name);
        return;
    }
    existed = qset_find(bk->qs, r->name) != NULL;
    if (!existed && !a.transient &&
        durable_queue_count(bk) >= max_durable_queues(bk)) {
        conn_send_error(c, rid, PROTOQ__ERROR_CODE__OVERLOADED,
                        "queue create %s: %zu durable queues is the most this "
                        "broker keeps (segment_bytes / 2048: every log segment "
                        "starts with their definitions)",
                        r->name, max_durable_queues(bk));
        return;
    }
    rc = qset_create(bk->qs, r->name, &a, &q);
    if (rc == PQ_EEXIST) {
        dispatch_reply_err(c, rid, rc,
                           "queue \"%s\" already exists with other attributes",
                           r->name);
        return;
    }
    if (rc != PQ_OK) {
        dispatch_reply_err(c, rid, rc, "queue create %s: %s", r->name,
                           pq_strerror(rc));
        return;
    }
    if (!existed && !queue_attrs(q)->transient) {
        rc = journal_queue_create(bk->journal, q, &lsn);
        if (rc != PQ_OK) {
            qset_delete(bk->qs, q);
            dispatch_reply_err(c, rid, rc, "queue create %s: %s", r->name,
                               pq_strerror(rc));
            return;
        }
    }
    if (!existed) {
        log_info("queue %s created%s", r->name,
                 queue_attrs(q)->transient ? " (transient)" : "");
    }
    dispatch_finish_ok(c, rid, lsn, 0);
}

/* Unlink s from its connection's list, or its session's when it is held
 * (it stays allocated). */
void
dispatch_sub_unlink(struct sub *s)
{
    struct sub **pp = s->sess ? dispatch_session_held(s->sess) : &s->conn->subs;

    for (; *pp != s; pp = &(*pp)->next) {
    }
    *pp = s->next;
    s->next = NULL;
    if (s->sess != NULL) {
        dispatch_session_unheld(s->sess);
        s->sess = NULL;
    } else {
        s->conn->nsubs--;
    }
}

/*
 * Delete q with its subscriptions: their connections are told nothing
 * more, and the deliveries they hold go with the queue like every other
 * message of it. Not through dispatch_unsubscribe(): that makes each held
 * delivery a failed attempt (a REQUEUE or DEAD_LETTER record after the
 * QUEUE_DELETE, and a second release of segment references that
 * journal_queue_delete already released).
 */
static void
delete_with_subscriptions(struct broker *bk, struct queue *q)
{
    struct sub *gone = NULL, *s;

    for (struct consumer *cons = queue_first_consumer(q); cons;
         cons = queue_next_consumer(cons)) {
        s = cons->owner;
        dispatch_sub_unlink(s);
        s->next = gone;
        gone = s;
    }
    qset_delete(bk->qs, q); /* detaches the consumers */
    while ((s = gone) != NULL) {
        gone = s->next;
        queue_consumer_fini(&s->cons);
        pq_free(s);
    }
}

/* Publishes to q still waiting for the disk will find it gone: the
 * QUEUE_DELETE follows their PUBLISH in the log, so replay drops them too.
 * Their idempotency keys go with the queue: a publish to a queue of the
 * same name created meanwhile is not their duplicate. */
static void
forget_queue_in_list(struct broker *bk, struct wait *head, struct queue *q)
{
    for (struct wait *w = head; w; w = w->next) {
        for (uint32_t i = 0; i < w->n; i++) {
            if (w->items[i].q == q) {
                dispatch_room_give(bk, &w->items[i]);
                dispatch_pend_key_drop(bk, &w->items[i]);
                w->items[i].q = NULL;
            }
        }
    }
}

static void
forget_queue_in_waits(struct broker *bk, struct queue *q)
{
    forget_queue_in_list(bk, bk->waits_head, q);
    forget_queue_in_list(bk, bk->later_head, q);
}

/* The queues other than q whose dead_letter is q: their names, comma
 * separated, into buf (cut at cap); returns how many there are. */
static size_t
dead_letter_users(struct broker *bk, const struct queue *q, char *buf,
                  size_t cap)
{
    size_t n = 0, used = 0;

    buf[0] = '\0';
    for (struct queue *u = qset_first(bk->qs); u; u = qset_next(u)) {
        if (u == q || strcmp(queue_attrs(u)->dead_letter, queue_name(q)) != 0) {
            continue;
        }
        if (used < cap) {
            int k = snprintf(buf + used, cap - used, "%s%s", n ? ", " : "",
                             queue_name(u));

            used += k > 0 ? (size_t)k : 0;
        }
        n++;
    }
    return n;
}

void
dispatch_on_queue_delete(struct conn *c, uint64_t rid,
                         const Protoq__QueueDelete *r)
{
    struct broker *bk = broker_of(c);
    struct queue *q =
        dispatch_find_queue(c, rid, r->name, AUTH_MANAGE, "queue delete");
    char users[512];
    uint64_t lsn = 0;
    uint32_t n_bindings;
    size_t n_users;
    int rc;

    if (q == NULL) {
        return;
    }
    n_users = dead_letter_users(bk, q, users, sizeof(users));
    if (n_users > 0) {
        dispatch_reply_err(c, rid, PQ_EINVAL,
                           "queue rm %s: it is the dead_letter of "
                           "%zu queue%s (%s): delete %s first",
                           r->name, n_users, n_users == 1 ? "" : "s", users,
                           n_users == 1 ? "that one" : "those");
        return;
    }
    if (!queue_attrs(q)->transient) {
        rc = journal_queue_delete(bk->journal, q, &lsn);
        if (rc != PQ_OK) {
            dispatch_reply_err(c, rid, rc, "queue rm %s: %s", r->name,
                               pq_strerror(rc));
            return;
        }
    }
    dispatch_unmark_dirty(bk, q);
    forget_queue_in_waits(bk, q);
    dispatch_room_forget(bk, q);
    /* Its QUEUE_DELETE record removes its bindings on replay too. */
    n_bindings = routes_unbind_queue(bk->routes, queue_name(q));
    delete_with_subscriptions(bk, q);
    log_info("queue %s deleted (and %u route binding%s)", r->name, n_bindings,
             n_bindings == 1 ? "" : "s");
    dispatch_finish_ok(c, rid, lsn, 0);
}

void
dispatch_on_queue_purge(struct conn *c, uint64_t rid,
                        const Protoq__QueuePurge *r)
{
    struct broker *bk = broker_of(c);
    struct queue *q =
        dispatch_find_queue(c, rid, r->name, AUTH_MANAGE, "queue purge");
    uint64_t lsn = 0, n;
    int rc;

    if (q == NULL) {
        return;
    }
    if (!queue_attrs(q)->transient) {
        rc = journal_queue_purge(bk->journal, q, &lsn);
        if (rc != PQ_OK) {
            dispatch_reply_err(c, rid, rc, "queue purge %s: %s", r->name,
                               pq_strerror(rc));
            return;
        }
    }
    n = queue_purge(q);
    log_info("queue %s purged: %llu messages", r->name, (unsigned long long)n);
    dispatch_finish_ok(c, rid, lsn, n);
}

static void
fill_info(Protoq__QueueInfo *i, Protoq__QueueAttrs *wa, const struct queue *q)
{
    const struct queue_stats *st = queue_stats(q);

    protoq__queue_info__init(i);
    attrs_to_wire(wa, queue_attrs(q));
    i->name = (char *)queue_name(q);
    i->attrs = wa;
    i->ready = queue_ready_count(q);
    i->delayed = queue_delayed_count(q);
    i->inflight = queue_inflight_count(q);
    i->consumers = queue_consumer_count(q);
    i->bytes = queue_bytes(q);
    i->published = st->published;
    i->acked = st->acked;
    i->nacked = st->nacked;
    i->redelivered = st->redelivered;
    i->expired = st->expired;
    i->dead_lettered = st->dead_lettered;
    i->dropped = st->dropped;
}

void
dispatch_on_queue_stat(struct conn *c, uint64_t rid, const Protoq__QueueStat *r)
{
    struct queue *q =
        dispatch_find_queue(c, rid, r->name, AUTH_ANY, "queue stat");
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__QueueStatOk ok = PROTOQ__QUEUE_STAT_OK__INIT;
    Protoq__QueueInfo info;
    Protoq__QueueAttrs wa;

    if (q == NULL) {
        return;
    }
    fill_info(&info, &wa, q);
    ok.queue = &info;
    f.request_id = rid;
    f.kind_case = PROTOQ__FRAME__KIND_QUEUE_STAT_OK;
    f.queue_stat_ok = &ok;
    conn_send(c, &f);
}

void
dispatch_on_queue_list(struct conn *c, uint64_t rid)
{
    struct broker *bk = broker_of(c);
    size_t n = qset_queue_count(bk->qs), i = 0;
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__QueueListOk ok = PROTOQ__QUEUE_LIST_OK__INIT;
    Protoq__QueueInfo *infos = NULL, **ptrs = NULL;
    Protoq__QueueAttrs *attrs = NULL;

    if (n > 0) {
        infos = pq_calloc(n, sizeof(*infos));
        attrs = pq_calloc(n, sizeof(*attrs));
        ptrs = pq_calloc(n, sizeof(*ptrs));
        if (infos == NULL || attrs == NULL || ptrs == NULL) {
            dispatch_reply_err(c, rid, PQ_ENOMEM, "queue list: out of memory");
            goto out;
        }
    }
    /* Only the queues the token has some permission on. */
    for (struct queue *q = qset_first(bk->qs); q && i < n; q = qset_next(q)) {
        if (!dispatch_may(c, AUTH_ANY, queue_name(q))) {
            continue;
        }
        fill_info(&infos[i], &attrs[i], q);
        ptrs[i] = &infos[i];
        i++;
    }
    ok.n_queues = i;
    ok.queues = ptrs;
    f.request_id = rid;
    f.kind_case = PROTOQ__FRAME__KIND_QUEUE_LIST_OK;
    f.queue_list_ok = &ok;
    if (frame_packed_size(&f) - FRAME_HEADER_LEN >
        broker_of(c)->cfg->max_frame_bytes) {
        dispatch_reply_err(c, rid, PQ_ETOOBIG,
                           "queue list: %zu queues do not fit in one frame", n);
        goto out;
    }
    conn_send(c, &f);
out:
    pq_free(infos);
    pq_free(attrs);
    pq_free(ptrs);
}
