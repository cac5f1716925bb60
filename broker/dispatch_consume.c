/*
 * dispatch_consume.c: subscriptions and what their holders answer:
 * subscribe, unsubscribe, flow, the delivery pass of a queue, ack, nack,
 * touch, release and cancel.
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

/* ---- consuming ---- */

static struct sub *
find_sub(struct conn *c, uint64_t id)
{
    for (struct sub *s = c->subs; s; s = s->next) {
        if (s->cons.id == id) {
            return s;
        }
    }
    return NULL;
}

void
dispatch_on_subscribe(struct conn *c, uint64_t rid, const Protoq__Subscribe *r)
{
    struct broker *bk = broker_of(c);
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__SubscribeOk ok = PROTOQ__SUBSCRIBE_OK__INIT;
    struct kv tags[PQ_TAGS_MAX];
    struct queue *q =
        dispatch_find_queue(c, rid, r->queue, AUTH_CONSUME, "subscribe");
    struct sub *s;
    uint32_t prefetch = r->prefetch ? r->prefetch : 1;

    if (q == NULL) {
        return;
    }
    if (c->nsubs >= 1024) {
        dispatch_reply_err(c, rid, PQ_EINVAL,
                           "subscribe: over 1024 subscriptions");
        return;
    }
    if (!dispatch_tags_valid(r->tags, r->n_tags)) {
        dispatch_reply_err(c, rid, PQ_EINVAL,
                           "subscribe: over %d tags or a tag over %d bytes",
                           PQ_TAGS_MAX, PQ_TAG_BYTES_MAX);
        return;
    }
    if (prefetch > 100000) {
        prefetch = 100000;
    }
    s = pq_calloc(1, sizeof(*s));
    if (s == NULL) {
        dispatch_reply_err(c, rid, PQ_ENOMEM, "subscribe: out of memory");
        return;
    }
    queue_consumer_init(&s->cons, ++bk->next_sub_id, s, prefetch);
    for (size_t i = 0; i < r->n_tags; i++) {
        tags[i].key = r->tags[i]->key;
        tags[i].value = r->tags[i]->value ? r->tags[i]->value : "";
    }
    if (queue_consumer_set_tags(&s->cons, tags, r->n_tags) != PQ_OK) {
        pq_free(s);
        dispatch_reply_err(c, rid, PQ_ENOMEM, "subscribe: out of memory");
        return;
    }
    s->conn = c;
    s->flow_paused = r->paused;
    s->cons.paused = s->flow_paused || c->output_full;
    s->next = c->subs;
    c->subs = s;
    c->nsubs++;
    /* Answer first so SubscribeOk precedes the first Deliver. */
    ok.subscription_id = s->cons.id;
    f.request_id = rid;
    f.kind_case = PROTOQ__FRAME__KIND_SUBSCRIBE_OK;
    f.subscribe_ok = &ok;
    conn_send(c, &f);
    queue_subscribe(q, &s->cons);
    dispatch_mark_dirty(bk, q);
}

void
dispatch_unsubscribe(struct broker *bk, struct sub *s)
{
    dispatch_sub_drop_outq(s);
    dispatch_sub_unlink(s);
    queue_unsubscribe(&s->cons, *bk->now_mono_ms);
    queue_consumer_fini(&s->cons);
    pq_free(s);
}

void
dispatch_on_unsubscribe(struct conn *c, uint64_t rid,
                        const Protoq__Unsubscribe *r)
{
    struct sub *s = find_sub(c, r->subscription_id);

    if (s == NULL) {
        conn_send_error(c, rid, PROTOQ__ERROR_CODE__SUBSCRIPTION_NOT_FOUND,
                        "no subscription %llu on this connection",
                        (unsigned long long)r->subscription_id);
        return;
    }
    dispatch_unsubscribe(broker_of(c), s);
    dispatch_reply_ok(c, rid, 0);
}

void
dispatch_on_flow(struct conn *c, uint64_t rid, const Protoq__Flow *r)
{
    struct sub *s = find_sub(c, r->subscription_id);

    if (s == NULL) {
        conn_send_error(c, rid, PROTOQ__ERROR_CODE__SUBSCRIPTION_NOT_FOUND,
                        "no subscription %llu on this connection",
                        (unsigned long long)r->subscription_id);
        return;
    }
    /* prefetch 0 pauses the subscription: a worker that shuts down pauses,
     * releases what it holds, then goes, without the released jobs coming
     * straight back to it. */
    s->flow_paused = r->prefetch == 0;
    s->cons.paused = s->flow_paused || c->output_full;
    if (r->prefetch > 0) {
        queue_set_prefetch(&s->cons,
                           r->prefetch > 100000 ? 100000 : r->prefetch);
    }
    dispatch_mark_dirty(broker_of(c), s->cons.q);
    dispatch_reply_ok(c, rid, 0);
}

/* dispatch_release_held: see dispatch_int.h. */
void
dispatch_release_held(struct broker *bk, struct sub *s)
{
    struct msg *m;

    while ((m = s->cons.inflight_head) != NULL) {
        int rc =
            qset_release(bk->qs, m->id, m->attempt, NULL, *bk->now_mono_ms);

        if (rc != PQ_OK && rc != PQ_ESTALE) {
            break; /* the unsubscribe below handles what is left */
        }
    }
}

void
dispatch_conn_closed(void *arg, struct conn *c)
{
    struct broker *bk = broker_of(c);

    (void)arg;
    if (dispatch_session_closed(bk, c)) {
        return; /* kept for the disconnect grace */
    }
    while (c->subs) {
        if (bk->shutting_down) {
            dispatch_release_held(bk, c->subs);
        }
        dispatch_unsubscribe(bk, c->subs);
    }
    dispatch_session_end(bk, c);
}

void
dispatch_conn_output(void *arg, struct conn *c, bool full)
{
    (void)arg;
    for (struct sub *s = c->subs; s; s = s->next) {
        s->cons.paused = full || s->flow_paused;
        if (!s->cons.paused) {
            dispatch_mark_dirty(broker_of(c), s->cons.q);
        }
    }
}

/* ---- acknowledgements ---- */

/*
 * ack_extras: the messages an ack adds (its follow-ups, then its result if
 * the job has a reply_to), checked, with room and disk space taken, into a
 * WAIT_ACK wait, before the ack touches the job: any refusal refuses the
 * ack and changes nothing. NULL when it answered rid with the refusal.
 */
static struct wait *
ack_extras(struct conn *c, uint64_t rid, const Protoq__Ack *r)
{
    struct broker *bk = broker_of(c);
    struct wait *w;
    struct queue *full = NULL;
    struct msg cur;
    uint64_t wall_now = clock_wall_ms();
    bool room = false;
    int rc;

    if (r->result.len > bk->cfg->max_result_bytes) {
        dispatch_reply_err(c, rid, PQ_ETOOBIG,
                           "ack: result of %zu bytes is over max_result_bytes "
                           "(%u)",
                           r->result.len, bk->cfg->max_result_bytes);
        return NULL;
    }
    if (r->n_follow_ups > bk->cfg->max_batch) {
        dispatch_reply_err(c, rid, PQ_EINVAL,
                           "ack: %zu follow-ups (at most max_batch, %u)",
                           r->n_follow_ups, bk->cfg->max_batch);
        return NULL;
    }
    if (r->n_follow_ups > 0 && pq_mem_used() > bk->cfg->memory_high_bytes) {
        /* follow-ups are publishes: refused like them */
        conn_send_error(
            c, rid, PROTOQ__ERROR_CODE__OVERLOADED,
            "ack: follow-ups refused: broker memory over memory_high_bytes "
            "(%llu); retry later",
            (unsigned long long)bk->cfg->memory_high_bytes);
        return NULL;
    }
    w = dispatch_wait_new(r->confirm ? c : NULL, rid, WAIT_ACK,
                          (uint32_t)r->n_follow_ups + 1);
    if (w == NULL) {
        dispatch_reply_err(c, rid, PQ_ENOMEM, "ack: out of memory");
        return NULL;
    }
    for (size_t i = 0; i < r->n_follow_ups; i++) {
        if (!dispatch_prepare_one(c, rid, r->follow_ups[i],
                                  r->follow_ups[i]->queue, &w->items[w->n],
                                  wall_now)) {
            goto fail; /* answered */
        }
        w->n++;
    }
    w->count = w->n;
    /* The result: only for the job in flight (any other ack is refused
     * below) that named a reply_to. */
    if (qset_msg_peek(bk->qs, r->message_id, &cur) &&
        cur.state == MSG_INFLIGHT && cur.attempt == r->attempt) {
        struct outcome o = {
            .status = "ok",
            .queue = queue_name(cur.q),
            .attempt = cur.attempt,
            .result = r->result.data,
            .result_len = r->result.len,
        };

        rc = dispatch_reply_item(bk, &cur, &o, &w->items[w->n]);
        if (rc == PQ_OK) {
            w->n++;
        } else if (rc != PQ_ENOTFOUND) {
            dispatch_reply_err(c, rid, rc,
                               "ack: the result does not fit a message (%s)",
                               pq_strerror(rc));
            goto fail;
        }
    }
    rc = dispatch_room_take(bk, w->items, w->n, &full);
    if (rc != PQ_OK) {
        dispatch_reply_err(c, rid, rc, "ack: follow-up to %s: %s",
                           full ? queue_name(full) : "?", pq_strerror(rc));
        goto fail;
    }
    room = true;
    rc = journal_publish_check(bk->journal, w->items, w->n);
    if (rc != PQ_OK) {
        dispatch_reply_err(c, rid, rc, "ack: not stored: %s", pq_strerror(rc));
        goto fail;
    }
    return w;
fail:
    for (uint32_t i = 0; room && i < w->n; i++) {
        dispatch_room_give(bk, &w->items[i]);
    }
    dispatch_wait_free(bk, w);
    return NULL;
}

/*
 * Ownership: ack, nack, touch and release come from the connection whose
 * subscription holds the delivery, or from a token with manage (or admin)
 * on its queue. Anyone else gets the same STALE_DELIVERY as for an id that
 * does not exist, so the answer says nothing about other connections'
 * jobs or other queues. Without an auth_file no connection may override.
 */
static bool
may_settle(struct conn *c, uint64_t id)
{
    struct broker *bk = broker_of(c);
    struct msg v;

    if (!qset_msg_peek(bk->qs, id, &v)) {
        return true; /* the handler answers STALE_DELIVERY itself */
    }
    if (v.state == MSG_INFLIGHT && v.holder != NULL &&
        ((struct sub *)v.holder->owner)->conn == c) {
        return true;
    }
    return bk->auth != NULL && dispatch_may(c, AUTH_MANAGE, queue_name(v.q));
}

/* The one answer to a delivery token that is not c's to settle. */
static void
reply_stale(struct conn *c, uint64_t rid, int rc, const char *what, uint64_t id,
            uint32_t attempt)
{
    dispatch_reply_err(c, rid, rc,
                       "%s %llu/%u: not a current delivery of this "
                       "connection (lease expired, already settled, "
                       "cancelled, or held by another connection)",
                       what, (unsigned long long)id, attempt);
}

void
dispatch_on_ack(struct conn *c, uint64_t rid, const Protoq__Ack *r)
{
    struct broker *bk = broker_of(c);
    struct msg *m = NULL;
    struct msg cur;
    struct queue *q, *was;
    struct wait *w = NULL;
    uint64_t lsn = 0;
    int rc;

    if (!may_settle(c, r->message_id)) {
        reply_stale(c, rid, PQ_ESTALE, "ack", r->message_id, r->attempt);
        return;
    }
    /* A job with a reply_to is told its end by every ack, plain ones too
     * (with an empty result). */
    if (r->n_follow_ups > 0 || r->result.len > 0 ||
        (qset_msg_peek(bk->qs, r->message_id, &cur) && msg_wants_reply(&cur))) {
        w = ack_extras(c, rid, r);
        if (w == NULL) {
            return; /* refused, nothing changed */
        }
    }
    was = qset_msg_peek(bk->qs, r->message_id, &cur) ? cur.q : NULL;
    rc = qset_ack(bk->qs, r->message_id, r->attempt, &m);
    if (rc != PQ_OK) {
        bool live = qset_msg_peek(bk->qs, r->message_id, &cur);

        if (was != NULL && !live) {
            /* a fenced ack of a cancelled job dropped it: its holder's
             * credit is free again */
            dispatch_mark_dirty(bk, was);
        }
        log_debug("ack %llu/%u stale: %s", (unsigned long long)r->message_id,
                  r->attempt,
                  live ? (cur.state == MSG_INFLIGHT ? "in flight, other attempt"
                                                    : "not in flight")
                       : "no such message");
        reply_stale(c, rid, rc, "ack", r->message_id, r->attempt);
        goto out;
    }
    q = m->q;
    rc = PQ_OK;
    if (w != NULL || !queue_attrs(q)->transient) {
        rc = journal_ack(bk->journal, m, w ? w->items : NULL, w ? w->n : 0,
                         &lsn);
        if (rc != PQ_OK) {
            /* In memory it is gone; on disk it stays and would come back
             * after a restart: at-least-once, never a loss. What the ack
             * would have added is in no record, so it is not added. */
            log_warn("queue %s: ack of %llu not journaled: %s", queue_name(q),
                     (unsigned long long)m->id, pq_strerror(rc));
        }
    }
    msg_free(m);
    dispatch_mark_dirty(bk, q);
    if (r->confirm && rc != PQ_OK) {
        dispatch_reply_err(c, rid, rc,
                           "ack applied, but not recorded in the log (%s); "
                           "after a restart the message is delivered again",
                           pq_strerror(rc));
    } else if (w != NULL && rc == PQ_OK) {
        if (lsn == 0) {
            dispatch_complete_ack(bk, w); /* gives the room back */
            dispatch_wait_free(bk, w);
        } else {
            dispatch_wait_enqueue(bk, w, lsn); /* the wait list owns it */
        }
        w = NULL;
    } else if (r->confirm && rc == PQ_OK) {
        dispatch_finish_ok(c, rid, lsn, 0);
    }
out:
    if (w != NULL) {
        for (uint32_t i = 0; i < w->n; i++) {
            dispatch_room_give(bk, &w->items[i]);
        }
        dispatch_wait_free(bk, w);
    }
}

void
dispatch_on_nack(struct conn *c, uint64_t rid, const Protoq__Nack *r)
{
    struct broker *bk = broker_of(c);
    struct msg v;
    struct queue *q = qset_msg_peek(bk->qs, r->message_id, &v) ? v.q : NULL;
    struct nack_opts o = {
        .has_delay = r->delay_ms > 0,
        .delay_ms = r->delay_ms,
        .dead_letter = r->dead_letter,
        .error = r->error,
    };
    struct mark before;
    int rc;

    if (r->error && strlen(r->error) > PQ_NACK_ERROR_MAX) {
        dispatch_reply_err(c, rid, PQ_EINVAL, "nack: error text over %d bytes",
                           PQ_NACK_ERROR_MAX);
        return;
    }
    if (r->delay_ms > DURATION_MAX_MS) {
        dispatch_reply_err(c, rid, PQ_EINVAL, "nack: delay over ten years");
        return;
    }
    if (!may_settle(c, r->message_id)) {
        reply_stale(c, rid, PQ_ESTALE, "nack", r->message_id, r->attempt);
        return;
    }
    before = dispatch_mark_now(bk);
    rc = qset_nack(bk->qs, r->message_id, r->attempt, &o, *bk->now_mono_ms);
    if (rc != PQ_OK) {
        reply_stale(c, rid, rc, "nack", r->message_id, r->attempt);
        return;
    }
    if (q) {
        dispatch_mark_dirty(bk, q);
    }
    if (r->confirm) {
        dispatch_finish_since(c, rid, before);
    }
}

/* Encode a Progress for keeping with the job (unknown fields dropped);
 * NULL when none given. */
static int
progress_body(Protoq__Progress *p, struct body **out)
{
    size_t len;
    int rc;

    *out = NULL;
    if (p == NULL) {
        return PQ_OK;
    }
    rc = frame_progress_check(p, &len);
    if (rc != PQ_OK) {
        return rc;
    }
    *out = body_alloc(len);
    if (*out == NULL) {
        return PQ_ENOMEM;
    }
    protoq__progress__pack(p, (*out)->data);
    return PQ_OK;
}

void
dispatch_on_touch(struct conn *c, uint64_t rid, const Protoq__Touch *r)
{
    struct broker *bk = broker_of(c);
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__TouchOk ok = PROTOQ__TOUCH_OK__INIT;
    struct body *prog = NULL;
    uint64_t lease = 0;
    int rc;

    if (r->extend_ms > DURATION_MAX_MS) {
        dispatch_reply_err(c, rid, PQ_EINVAL,
                           "touch: extension over ten years");
        return;
    }
    if (!may_settle(c, r->message_id)) {
        reply_stale(c, rid, PQ_ESTALE, "touch", r->message_id, r->attempt);
        return;
    }
    rc = progress_body(r->progress, &prog);
    if (rc != PQ_OK) {
        dispatch_reply_err(c, rid, rc,
                           "touch: progress over 2 KiB or percent over 100");
        return;
    }
    rc = qset_touch(bk->qs, r->message_id, r->attempt, r->extend_ms, prog,
                    *bk->now_mono_ms, &lease);
    body_unref(&prog);
    if (rc != PQ_OK) {
        reply_stale(c, rid, rc, "touch", r->message_id, r->attempt);
        return;
    }
    ok.lease_ms = lease;
    f.request_id = rid;
    f.kind_case = PROTOQ__FRAME__KIND_TOUCH_OK;
    f.touch_ok = &ok;
    conn_send(c, &f);
}

void
dispatch_on_release(struct conn *c, uint64_t rid, const Protoq__Release *r)
{
    struct broker *bk = broker_of(c);
    struct msg v;
    struct queue *q = qset_msg_peek(bk->qs, r->message_id, &v) ? v.q : NULL;
    struct body *prog = NULL;
    struct mark before;
    int rc;

    if (!may_settle(c, r->message_id)) {
        reply_stale(c, rid, PQ_ESTALE, "release", r->message_id, r->attempt);
        return;
    }
    rc = progress_body(r->progress, &prog);
    if (rc != PQ_OK) {
        dispatch_reply_err(c, rid, rc,
                           "release: progress over 2 KiB or percent over 100");
        return;
    }
    before = dispatch_mark_now(bk);
    rc =
        qset_release(bk->qs, r->message_id, r->attempt, prog, *bk->now_mono_ms);
    body_unref(&prog);
    if (rc != PQ_OK) {
        reply_stale(c, rid, rc, "release", r->message_id, r->attempt);
        return;
    }
    if (q) {
        dispatch_mark_dirty(bk, q);
    }
    if (r->confirm) {
        dispatch_finish_since(c, rid, before);
    }
}

void
dispatch_on_cancel(struct conn *c, uint64_t rid, const Protoq__Cancel *r)
{
    struct broker *bk = broker_of(c);
    struct msg v, *held = NULL;
    bool live = qset_msg_peek(bk->qs, r->message_id, &v);
    struct mark before;
    int rc;

    /* Ids are global and sequential: the queue name and a permission on
     * it keep them from being enumerated across queues. */
    if (r->queue == NULL || r->queue[0] == '\0') {
        conn_send_error(c, rid, PROTOQ__ERROR_CODE__BAD_REQUEST,
                        "cancel %llu: the queue name is required",
                        (unsigned long long)r->message_id);
        return;
    }
    if (!dispatch_allow(c, rid, AUTH_CONSUME | AUTH_MANAGE, r->queue,
                        "cancel")) {
        return;
    }
    if (!live || strcmp(r->queue, queue_name(v.q)) != 0) {
        conn_send_error(c, rid, PROTOQ__ERROR_CODE__BAD_REQUEST,
                        "cancel: no live message %llu in queue %s",
                        (unsigned long long)r->message_id, r->queue);
        return;
    }
    before = dispatch_mark_now(bk);
    rc = qset_cancel(bk->qs, r->message_id, &held);
    if (rc != PQ_OK) {
        dispatch_reply_err(c, rid, rc, "cancel %llu: %s",
                           (unsigned long long)r->message_id, pq_strerror(rc));
        return;
    }
    if (held) {
        struct outcome o = {
            .status = "failed",
            .queue = queue_name(held->q),
            .attempt = held->attempt,
            .reason = qreason_name(QR_CANCELLED),
            .error = msg_last_error(held),
        };
        struct mark at = dispatch_mark_now(bk);
        struct wait *notice = dispatch_notice(bk, held, &o);

        rc = journal_cancel(bk->journal, held, notice ? notice->items : NULL,
                            notice ? notice->n : 0);
        if (rc != PQ_OK) {
            log_warn("queue %s: cancel of %llu not journaled: %s",
                     queue_name(held->q), (unsigned long long)held->id,
                     pq_strerror(rc));
        }
        if (notice != NULL && rc == PQ_OK) {
            dispatch_wait_after(bk, notice, at);
        } else if (notice != NULL) {
            dispatch_wait_free(bk, notice);
        }
    }
    if (held && held->holder) {
        struct sub *s = held->holder->owner;

        /* A session in its gap gets it when it resumes. */
        if (s->conn != NULL) {
            dispatch_send_cancel(s->conn, held);
        }
    }
    dispatch_finish_since(c, rid, before);
}

/* dispatch_send_cancel: see dispatch_int.h. */
void
dispatch_send_cancel(struct conn *c, const struct msg *m)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__CancelRequested cr = PROTOQ__CANCEL_REQUESTED__INIT;

    cr.queue = (char *)queue_name(m->q);
    cr.message_id = m->id;
    cr.attempt = m->attempt;
    f.kind_case = PROTOQ__FRAME__KIND_CANCEL_REQUESTED;
    f.cancel_requested = &cr;
    conn_send(c, &f);
}
