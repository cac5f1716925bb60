/*
 * dispatch_publish.c: publish and batch publish: every message checked,
 * room and idempotency keys taken, PUBLISH records appended all or nothing,
 * the reply and the push once they are durable (dispatch.c's waits).
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

/* ---- publishing ---- */

static int
copy_kvs(Protoq__KeyValue **in, size_t n, struct kv **out)
{
    struct kv *kv;

    *out = NULL;
    if (n == 0) {
        return PQ_OK;
    }
    kv = pq_calloc(n, sizeof(*kv));
    if (kv == NULL) {
        return PQ_ENOMEM;
    }
    for (size_t i = 0; i < n; i++) {
        kv[i].key = pq_strdup(in[i]->key ? in[i]->key : "");
        kv[i].value = pq_strdup(in[i]->value ? in[i]->value : "");
        if (kv[i].key == NULL || kv[i].value == NULL) {
            for (size_t j = 0; j <= i; j++) {
                pq_free((char *)kv[j].key);
                pq_free((char *)kv[j].value);
            }
            pq_free(kv);
            return PQ_ENOMEM;
        }
    }
    *out = kv;
    return PQ_OK;
}

/* A subscription's tags: at most PQ_TAGS_MAX, keys 1..PQ_TAG_BYTES_MAX
 * bytes, values up to PQ_TAG_BYTES_MAX. */
bool
dispatch_tags_valid(Protoq__KeyValue **kv, size_t n)
{
    if (n > PQ_TAGS_MAX) {
        return false;
    }
    for (size_t i = 0; i < n; i++) {
        size_t kl = kv[i]->key ? strlen(kv[i]->key) : 0;
        size_t vl = kv[i]->value ? strlen(kv[i]->value) : 0;

        if (kl == 0 || kl > PQ_TAG_BYTES_MAX || vl > PQ_TAG_BYTES_MAX) {
            return false;
        }
    }
    return true;
}

/* dispatch_prepare_one: see dispatch_int.h. */
bool
dispatch_prepare_one(struct conn *c, uint64_t rid, const Protoq__Publish *pub,
                     const char *qname, struct pending *p, uint64_t wall_now)
{
    struct broker *bk = broker_of(c);
    Protoq__Message *m = pub->message;
    const struct frame_msg_limits lim = {
        .max_message_bytes = bk->cfg->max_message_bytes,
        .max_frame_bytes = bk->cfg->max_frame_bytes,
    };
    char why[256];
    size_t len;
    uint64_t ttl, dup_id;
    struct queue *q;
    int rc;

    memset(p, 0, sizeof(*p));
    q = dispatch_find_queue(c, rid, qname, AUTH_PUBLISH, "publish");
    if (q == NULL) {
        return false;
    }
    if (m == NULL) {
        dispatch_reply_err(c, rid, PQ_EINVAL, "publish %s: no message", qname);
        return false;
    }
    rc = frame_message_check(m, &lim, &len, why, sizeof(why));
    if (rc != PQ_OK) {
        dispatch_reply_err(c, rid, rc, "publish %s: %s", qname, why);
        return false;
    }
    /* Where the job's result goes must exist now, not only at its ack,
     * and the publisher must be one who may publish there. */
    if (m->reply_to && m->reply_to[0] != '\0' &&
        !dispatch_allow(c, rid, AUTH_PUBLISH, m->reply_to, "reply_to")) {
        return false;
    }
    if (m->reply_to && m->reply_to[0] != '\0' &&
        qset_find(bk->qs, m->reply_to) == NULL) {
        dispatch_reply_err(c, rid, PQ_ENOTFOUND,
                           "publish %s: reply_to queue %s does not exist",
                           qname, m->reply_to);
        return false;
    }
    if (m->delay_ms > DURATION_MAX_MS || m->ttl_ms > DURATION_MAX_MS ||
        (m->deliver_at_ms > wall_now &&
         m->deliver_at_ms - wall_now > DURATION_MAX_MS)) {
        dispatch_reply_err(
            c, rid, PQ_EINVAL,
            "publish %s: delay, deliver_at or ttl more than ten years "
            "away",
            qname);
        return false;
    }
    p->q = q;
    if (m->idempotency_key && m->idempotency_key[0] != '\0') {
        char ck[QUEUE_NAME_MAX + PQ_IDEMPOTENCY_KEY_MAX + 4];
        struct pend_key *pk;

        if (queue_dedup_find(q, m->idempotency_key, *bk->now_mono_ms,
                             &dup_id) == PQ_OK) {
            p->duplicate = true;
            p->mn.id = dup_id;
            return true;
        }
        dispatch_pend_key_name(ck, sizeof(ck), qname, m->idempotency_key);
        pk = hmap_str_get(&bk->pending_keys, ck);
        if (pk != NULL) {
            /* The first publish with this key is on its way to disk. */
            p->duplicate = true;
            p->mn.id = pk->id;
            p->dup_lsn = pk->lsn;
            return true;
        }
        pk = pq_calloc(1, sizeof(*pk));
        if (pk == NULL || (pk->ckey = pq_strdup(ck)) == NULL ||
            hmap_str_put(&bk->pending_keys, pk->ckey, pk) != PQ_OK) {
            if (pk != NULL) {
                pq_free(pk->ckey);
            }
            pq_free(pk);
            dispatch_reply_err(c, rid, PQ_ENOMEM, "publish %s: out of memory",
                               qname);
            return false;
        }
        pk->id = bk->next_msg_id; /* assigned to this message below */
        p->pkey = pk;
    }
    /* The stored body is the Message as received (unknown fields
     * dropped), re-encoded once, straight into the body. */
    p->mn.body = body_alloc(len);
    if (p->mn.body != NULL) {
        protoq__message__pack(m, p->mn.body->data);
    }
    if (p->mn.body == NULL ||
        copy_kvs(m->requires, m->n_requires, &p->requires) != PQ_OK ||
        (m->idempotency_key && m->idempotency_key[0] &&
         (p->idem_key = pq_strdup(m->idempotency_key)) == NULL)) {
        dispatch_pend_key_drop(bk, p);
        dispatch_pending_fini(p);
        dispatch_reply_err(c, rid, PQ_ENOMEM, "publish %s: out of memory",
                           qname);
        return false;
    }
    p->mn.n_requires = m->n_requires;
    p->mn.id = bk->next_msg_id++;
    p->mn.size = (uint32_t)m->payload.len;
    p->mn.priority = (uint8_t)m->priority;
    p->mn.reply = m->reply_to != NULL && m->reply_to[0] != '\0';
    p->mn.published_wall_ms = wall_now;
    if (m->deliver_at_ms > wall_now) {
        p->mn.due_ms = *bk->now_mono_ms + (m->deliver_at_ms - wall_now);
    } else if (m->deliver_at_ms == 0 && m->delay_ms > 0) {
        p->mn.due_ms = *bk->now_mono_ms + m->delay_ms;
    }
    ttl = m->ttl_ms ? m->ttl_ms : queue_attrs(q)->ttl_ms;
    if (ttl > 0) {
        p->mn.expire_ms = *bk->now_mono_ms + ttl;
    }
    return true;
}

static bool
is_routed(const Protoq__Publish *pub)
{
    return pub->route != NULL && pub->route[0] != '\0';
}

/*
 * expand: the messages that items stand for: one for a Publish to a
 * queue, one per matching queue for a Publish to a route. With w NULL it
 * counts them into *total; else it prepares each into w->items (w->n
 * counting). false: answered.
 */
static bool
expand(struct conn *c, uint64_t rid, Protoq__Publish *const *items, size_t n,
       struct wait *w, uint64_t wall_now, size_t *total)
{
    const char *queues[PQ_ROUTE_BINDINGS_MAX];
    uint32_t nq;

    *total = 0;
    for (size_t i = 0; i < n; i++) {
        if (is_routed(items[i])) {
            if (!dispatch_route_queues(c, rid, items[i], queues, &nq)) {
                return false;
            }
        } else {
            queues[0] = items[i]->queue;
            nq = 1;
        }
        for (uint32_t k = 0; k < nq && w != NULL; k++) {
            if (!dispatch_prepare_one(c, rid, items[i], queues[k],
                                      &w->items[w->n], wall_now)) {
                return false;
            }
            w->n++;
        }
        *total += nq;
    }
    return true;
}

/*
 * dispatch_publish: the shared path of Publish and PublishBatch. All or
 * nothing: every message is checked before any is journaled, and the
 * durable ones go to the log in one record.
 */
void
dispatch_publish(struct conn *c, uint64_t rid, Protoq__Publish *const *items,
                 size_t n)
{
    struct broker *bk = broker_of(c);
    uint64_t wall_now = clock_wall_ms(), lsn = 0;
    bool durable = false;
    struct queue *full = NULL;
    struct wait *w;
    size_t i, total;
    int rc;

    if (n == 0 || n > bk->cfg->max_batch) {
        dispatch_reply_err(c, rid, PQ_EINVAL,
                           "publish: %zu messages (1-%u allowed)", n,
                           bk->cfg->max_batch);
        return;
    }
    if (pq_mem_used() > bk->cfg->memory_high_bytes) {
        conn_send_error(
            c, rid, PROTOQ__ERROR_CODE__OVERLOADED,
            "broker memory over memory_high_bytes (%llu); retry later",
            (unsigned long long)bk->cfg->memory_high_bytes);
        return;
    }
    if (!expand(c, rid, items, n, NULL, wall_now, &total)) {
        return; /* answered */
    }
    if (total > bk->cfg->max_batch) {
        dispatch_reply_err(c, rid, PQ_EINVAL,
                           "publish: %zu messages after routing (at most %u)",
                           total, bk->cfg->max_batch);
        return;
    }
    w = dispatch_wait_new(c, rid, WAIT_PUBLISH, (uint32_t)total);
    if (w == NULL) {
        dispatch_reply_err(c, rid, PQ_ENOMEM, "publish: out of memory");
        return;
    }
    if (!expand(c, rid, items, n, w, wall_now, &total)) {
        goto fail; /* answered */
    }
    for (i = 0; i < w->n; i++) {
        durable |=
            !w->items[i].duplicate && !queue_attrs(w->items[i].q)->transient;
    }
    rc = dispatch_room_take(bk, w->items, w->n, &full);
    if (rc != PQ_OK) {
        if (rc == PQ_EFULL) {
            dispatch_reply_err(
                c, rid, rc,
                "publish %s: queue is full (max_length %llu, max_bytes %llu)",
                queue_name(full),
                (unsigned long long)queue_attrs(full)->max_length,
                (unsigned long long)queue_attrs(full)->max_bytes);
        } else {
            dispatch_reply_err(c, rid, rc, "publish: %s", pq_strerror(rc));
        }
        goto fail;
    }
    if (durable) {
        rc = journal_publish(bk->journal, w->items, w->n, *bk->now_mono_ms,
                             &lsn);
        if (rc != PQ_OK) {
            if (rc == PQ_ENOSPC) {
                bk->stats.disk_full_refusals++;
            }
            if (rc == PQ_ETOOBIG) {
                /* a batch is one record, and a record fits in a segment */
                dispatch_reply_err(c, rid, rc,
                                   "publish: not stored: the batch is larger "
                                   "than a log segment (segment_bytes "
                                   "%llu); publish it in smaller batches",
                                   (unsigned long long)bk->cfg->segment_bytes);
            } else {
                dispatch_reply_err(c, rid, rc, "publish: not stored: %s",
                                   pq_strerror(rc));
            }
            for (i = 0; i < w->n; i++) {
                dispatch_room_give(bk, &w->items[i]);
            }
            goto fail;
        }
    }
    for (i = 0; i < w->n; i++) {
        struct pending *p = &w->items[i];

        if (p->pkey != NULL) {
            p->pkey->lsn = lsn;
        }
        /* A duplicate of a publish still on its way waits for it: if that
         * one fails, this one fails with it. */
        if (p->dup_lsn > lsn) {
            lsn = p->dup_lsn;
        }
    }
    if (lsn == 0) {
        dispatch_complete_publish(bk, w);
        dispatch_wait_free(bk, w);
        return;
    }
    dispatch_wait_enqueue(bk, w, lsn);
    return;
fail:
    dispatch_wait_free(bk, w);
}
