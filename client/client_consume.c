/*
 * client_consume.c: libprotoq consuming: subscribe, flow, poll,
 * ack/nack/touch/release and cancel.
 */
#include "client_int.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- consuming ---- */

/* client_subscribe_wire: Subscribe and wait for SubscribeOk; w carries the
 * hook that registers the subscription before any Deliver is handled. */
int
client_subscribe_wire(protoq_client *c, const char *queue, uint32_t prefetch,
                      bool paused, const struct protoq_kv *tags, size_t n_tags,
                      struct waiter *w, uint64_t *wire_id)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Subscribe s = PROTOQ__SUBSCRIBE__INIT;
    Protoq__KeyValue kv_inline[KV_STACK];
    Protoq__KeyValue *kvp_inline[KV_STACK];
    Protoq__KeyValue *kv = kv_inline;
    Protoq__KeyValue **kvp = kvp_inline;
    Protoq__Frame *r;
    int rc;

    if (n_tags > KV_STACK) {
        kv = malloc(n_tags * sizeof(*kv));
        kvp = malloc(n_tags * sizeof(*kvp));
        if (kv == NULL || kvp == NULL) {
            free(kv);
            free(kvp);
            return client_set_err(c, PQ_ENOMEM, "out of memory (subscribe)");
        }
    }
    s.queue = S(queue);
    s.prefetch = prefetch;
    s.paused = paused;
    s.n_tags = n_tags;
    s.tags = client_kv_to_wire(kv, kvp, tags, n_tags);
    f.kind_case = PROTOQ__FRAME__KIND_SUBSCRIBE;
    f.subscribe = &s;
    rc = client_request_w(c, &f, PROTOQ__FRAME__KIND_SUBSCRIBE_OK, &r, w);
    if (kv != kv_inline) {
        free(kv);
        free(kvp);
    }
    if (rc != PQ_OK) {
        return rc;
    }
    *wire_id = r->subscribe_ok->subscription_id;
    frame_free(r);
    return PQ_OK;
}

/* protoq_subscribe: Subscribe; the callback is registered when SubscribeOk
 * arrives. A reconnecting handle also keeps queue, prefetch and tags. */
int
protoq_subscribe(protoq_client *c, const char *queue, uint32_t prefetch,
                 const struct protoq_kv *tags, size_t n_tags,
                 protoq_deliver_fn cb, void *arg, uint64_t *sub_id)
{
    struct waiter w;
    uint64_t id;
    int rc;

    if (sub_id != NULL) {
        *sub_id = 0;
    }
    if (!client_name_ok(c, "queue", queue)) {
        return PQ_EINVAL;
    }
    if (cb == NULL || (n_tags > 0 && tags == NULL)) {
        return client_set_err(c, PQ_EINVAL, "subscribe needs a callback");
    }
    memset(&w, 0, sizeof(w));
    w.sub_cb = cb;
    w.sub_arg = arg;
    rc =
        client_subscribe_wire(c, queue, prefetch, false, tags, n_tags, &w, &id);
    if (rc != PQ_OK) {
        return rc;
    }
    rc = client_sub_remember(c, id, queue, prefetch, tags, n_tags);
    if (rc != PQ_OK) {
        /* It could not be renewed after a loss: do not keep it at all. */
        char msg[sizeof(c->errmsg)];

        snprintf(msg, sizeof(msg), "%s", c->errmsg);
        protoq_unsubscribe(c, id);
        return client_set_err(c, rc, "%s", msg);
    }
    if (sub_id != NULL) {
        *sub_id = id;
    }
    return PQ_OK;
}

/* protoq_unsubscribe: forget the subscription, then Unsubscribe (by its id
 * on the current connection) and wait for Ok. */
int
protoq_unsubscribe(protoq_client *c, uint64_t sub_id)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Unsubscribe u = PROTOQ__UNSUBSCRIBE__INIT;
    struct sub *s = client_sub_find(c, sub_id);
    uint64_t wire_id = s != NULL ? s->wire_id : sub_id;

    /* Forget it first: deliveries that cross the Unsubscribe are dropped
     * (they return to the queue when their lease or the connection ends). */
    client_sub_forget(c, sub_id);
    if (c->down || (s != NULL && wire_id == 0)) {
        return PQ_OK; /* the broker dropped it with the old connection */
    }
    u.subscription_id = wire_id;
    f.kind_case = PROTOQ__FRAME__KIND_UNSUBSCRIBE;
    f.unsubscribe = &u;
    return client_request_ok(c, &f, NULL);
}

/* protoq_flow: Flow (prefetch 0 pauses), wait for Ok. The prefetch is kept
 * first, so a reconnect that crosses the Flow subscribes with it. */
int
protoq_flow(protoq_client *c, uint64_t sub_id, uint32_t prefetch)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Flow fl = PROTOQ__FLOW__INIT;
    struct sub *s = client_sub_find(c, sub_id);
    int rc;

    if (s != NULL) {
        s->paused = prefetch == 0;
        s->prefetch = prefetch ? prefetch : s->prefetch;
    }
    rc = client_revive(c);
    if (rc != PQ_OK) {
        return rc;
    }
    s = client_sub_find(c, sub_id); /* the reconnect may have dropped it */
    fl.subscription_id = s != NULL ? s->wire_id : sub_id;
    fl.prefetch = prefetch;
    f.kind_case = PROTOQ__FRAME__KIND_FLOW;
    f.flow = &fl;
    return client_request_ok(c, &f, NULL);
}

/* protoq_poll: pump until a callback ran or timeout_ms passed. */
int
protoq_poll(protoq_client *c, int timeout_ms)
{
    int64_t deadline = client_deadline_after(timeout_ms);
    int rc;

    c->interrupted = false;
    for (;;) {
        rc = client_pump(c, client_remaining_ms(deadline), true);
        if (rc < 0 && c->down) {
            rc = 0; /* lost, reconnecting: the conn callback tells */
        }
        if (rc != 0 || c->interrupted ||
            (deadline >= 0 && client_remaining_ms(deadline) == 0)) {
            return rc;
        }
    }
}

/* A confirmed Ack with n follow-ups: AckOk names their ids, into ids (when
 * not NULL). */
static int
ack_with_ids(protoq_client *c, Protoq__Frame *f, size_t n, uint64_t *ids)
{
    Protoq__Frame *r = NULL;
    int rc = client_request(c, f, PROTOQ__FRAME__KIND_ACK_OK, &r);

    if (rc != PQ_OK) {
        return rc;
    }
    if (r->ack_ok->n_follow_up_ids != n) {
        rc = client_set_err(c, PQ_EPROTO,
                            "AckOk with %zu ids for %zu follow-ups",
                            r->ack_ok->n_follow_up_ids, n);
    } else if (ids != NULL) {
        memcpy(ids, r->ack_ok->follow_up_ids, n * sizeof(*ids));
    }
    frame_free(r);
    return rc;
}

/* protoq_ack_ex: Ack with result/follow-ups; waits only when opts->confirm. */
int
protoq_ack_ex(protoq_client *c, uint64_t message_id, uint32_t attempt,
              const struct protoq_ack_opts *opts)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Ack a = PROTOQ__ACK__INIT;
    struct msgbuf b;
    size_t kvi = 0;
    size_t i, n = opts ? opts->n_follow_ups : 0;
    int rc;

    a.message_id = message_id;
    a.attempt = attempt;
    f.kind_case = PROTOQ__FRAME__KIND_ACK;
    f.ack = &a;
    if (opts == NULL) {
        return client_send_noreply(c, &f);
    }
    a.confirm = opts->confirm;
    a.result.data = (uint8_t *)(opts->result_len ? opts->result : NULL);
    a.result.len = opts->result_len;
    if (n > 0) {
        if (opts->follow_up_queues == NULL || opts->follow_ups == NULL) {
            return client_set_err(c, PQ_EINVAL, "follow-ups without queues");
        }
        for (i = 0; i < n; i++) {
            if (!client_name_ok(c, "queue", opts->follow_up_queues[i]) ||
                !client_msg_ok(c, &opts->follow_ups[i])) {
                return PQ_EINVAL;
            }
        }
    }
    if (client_msgbuf_init(&b, opts->follow_ups, n) != PQ_OK) {
        return client_set_err(c, PQ_ENOMEM, "out of memory (ack)");
    }
    for (i = 0; i < n; i++) {
        client_msg_to_wire(&b, i, &kvi, opts->follow_up_queues[i],
                           &opts->follow_ups[i]);
    }
    a.n_follow_ups = n;
    a.follow_ups = n ? b.pubp : NULL;
    if (opts->confirm && n > 0) {
        rc = ack_with_ids(c, &f, n, opts->follow_up_ids);
    } else {
        rc = opts->confirm ? client_request_ok(c, &f, NULL)
                           : client_send_noreply(c, &f);
    }
    client_msgbuf_fini(&b);
    return rc;
}

/* protoq_ack: buffered Ack without confirm (no reply on success). */
int
protoq_ack(protoq_client *c, uint64_t message_id, uint32_t attempt)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Ack a = PROTOQ__ACK__INIT;

    a.message_id = message_id;
    a.attempt = attempt;
    f.kind_case = PROTOQ__FRAME__KIND_ACK;
    f.ack = &a;
    return client_send_noreply(c, &f);
}

/* protoq_ack_sync: Ack with confirm, wait for the durable Ok. */
int
protoq_ack_sync(protoq_client *c, uint64_t message_id, uint32_t attempt)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Ack a = PROTOQ__ACK__INIT;

    a.message_id = message_id;
    a.attempt = attempt;
    a.confirm = true;
    f.kind_case = PROTOQ__FRAME__KIND_ACK;
    f.ack = &a;
    return client_request_ok(c, &f, NULL);
}

static int
nack(protoq_client *c, uint64_t message_id, uint32_t attempt, uint64_t delay_ms,
     bool dead_letter, const char *error_text, bool confirm)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Nack nk = PROTOQ__NACK__INIT;

    nk.message_id = message_id;
    nk.attempt = attempt;
    nk.confirm = confirm;
    nk.delay_ms = delay_ms;
    nk.dead_letter = dead_letter;
    nk.error = S(error_text);
    f.kind_case = PROTOQ__FRAME__KIND_NACK;
    f.nack = &nk;
    return confirm ? client_request_ok(c, &f, NULL)
                   : client_send_noreply(c, &f);
}

/* protoq_nack: buffered Nack without confirm. */
int
protoq_nack(protoq_client *c, uint64_t message_id, uint32_t attempt,
            uint64_t delay_ms, bool dead_letter, const char *error_text)
{
    return nack(c, message_id, attempt, delay_ms, dead_letter, error_text,
                false);
}

/* protoq_nack_sync: Nack with confirm, wait for the durable Ok. */
int
protoq_nack_sync(protoq_client *c, uint64_t message_id, uint32_t attempt,
                 uint64_t delay_ms, bool dead_letter, const char *error_text)
{
    return nack(c, message_id, attempt, delay_ms, dead_letter, error_text,
                true);
}

static void
progress_to_wire(Protoq__Progress *w, const struct protoq_progress *p)
{
    w->percent = p->percent;
    w->text = S(p->text);
    w->checkpoint = S(p->checkpoint);
}

/* protoq_touch: Touch, wait for TouchOk. */
int
protoq_touch(protoq_client *c, uint64_t message_id, uint32_t attempt,
             uint64_t extend_ms, const struct protoq_progress *progress,
             uint64_t *lease_ms)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Touch t = PROTOQ__TOUCH__INIT;
    Protoq__Progress pw = PROTOQ__PROGRESS__INIT;
    Protoq__Frame *r;
    int rc;

    if (lease_ms != NULL) {
        *lease_ms = 0;
    }
    t.message_id = message_id;
    t.attempt = attempt;
    t.extend_ms = extend_ms;
    if (progress != NULL) {
        progress_to_wire(&pw, progress);
        t.progress = &pw;
    }
    f.kind_case = PROTOQ__FRAME__KIND_TOUCH;
    f.touch = &t;
    rc = client_request(c, &f, PROTOQ__FRAME__KIND_TOUCH_OK, &r);
    if (rc != PQ_OK) {
        return rc;
    }
    if (lease_ms != NULL) {
        *lease_ms = r->touch_ok->lease_ms;
    }
    frame_free(r);
    return PQ_OK;
}

/* protoq_release: Release; waits for Ok only when confirm. */
int
protoq_release(protoq_client *c, uint64_t message_id, uint32_t attempt,
               enum protoq_release_reason reason,
               const struct protoq_progress *progress, bool confirm)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Release rl = PROTOQ__RELEASE__INIT;
    Protoq__Progress pw = PROTOQ__PROGRESS__INIT;

    rl.message_id = message_id;
    rl.attempt = attempt;
    rl.reason = (Protoq__ReleaseReason)reason;
    rl.confirm = confirm;
    if (progress != NULL) {
        progress_to_wire(&pw, progress);
        rl.progress = &pw;
    }
    f.kind_case = PROTOQ__FRAME__KIND_RELEASE;
    f.release = &rl;
    return confirm ? client_request_ok(c, &f, NULL)
                   : client_send_noreply(c, &f);
}

/* protoq_cancel: Cancel, wait for Ok. */
int
protoq_cancel(protoq_client *c, const char *queue, uint64_t message_id)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Cancel cn = PROTOQ__CANCEL__INIT;

    if (!client_name_ok(c, "queue", queue)) {
        return PQ_EINVAL;
    }
    cn.queue = S(queue);
    cn.message_id = message_id;
    f.kind_case = PROTOQ__FRAME__KIND_CANCEL;
    f.cancel = &cn;
    return client_request_ok(c, &f, NULL);
}

/* protoq_set_cancel_cb: set the CancelRequested callback. */
void
protoq_set_cancel_cb(protoq_client *c, protoq_cancel_fn cb, void *arg)
{
    c->cancel_cb = cb;
    c->cancel_arg = arg;
}

/* protoq_set_error_cb: set the async error callback. */
void
protoq_set_error_cb(protoq_client *c, protoq_error_fn cb, void *arg)
{
    c->error_cb = cb;
    c->error_arg = arg;
}

/* protoq_async_errors: count of async errors so far. */
uint64_t
protoq_async_errors(const protoq_client *c)
{
    return c->async_errors;
}
