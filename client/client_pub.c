/*
 * client_pub.c: libprotoq publishing: packing protoq_message into Publish
 * frames, single, async (confirm callback) and batch publishes, routes.
 */
#include "client_int.h"

#include <stdlib.h>
#include <string.h>

/* ---- building messages ---- */

int
client_msgbuf_init(struct msgbuf *b, const struct protoq_message *msgs,
                   size_t n)
{
    size_t kvs = 0;
    size_t i;

    for (i = 0; i < n; i++) {
        kvs += msgs[i].n_headers + msgs[i].n_requires;
    }
    b->heap = NULL;
    if (n <= 1 && kvs <= KV_STACK) {
        b->pub = b->pub_inline;
        b->pubp = b->pubp_inline;
        b->msg = b->msg_inline;
        b->kv = b->kv_inline;
        b->kvp = b->kvp_inline;
        return PQ_OK;
    }
    b->heap =
        malloc(n * (sizeof(Protoq__Publish) + sizeof(Protoq__Publish *) +
                    sizeof(Protoq__Message)) +
               kvs * (sizeof(Protoq__KeyValue) + sizeof(Protoq__KeyValue *)));
    if (b->heap == NULL) {
        return PQ_ENOMEM;
    }
    /* Largest alignment first: the structs, then the pointer arrays. */
    b->pub = b->heap;
    b->msg = (Protoq__Message *)(b->pub + n);
    b->kv = (Protoq__KeyValue *)(b->msg + n);
    b->pubp = (Protoq__Publish **)(b->kv + kvs);
    b->kvp = (Protoq__KeyValue **)(b->pubp + n);
    return PQ_OK;
}

void
client_msgbuf_fini(struct msgbuf *b)
{
    free(b->heap);
}

/* Fill kvs/ptrs from n pairs; returns the pointer array. */
Protoq__KeyValue **
client_kv_to_wire(Protoq__KeyValue *kvs, Protoq__KeyValue **ptrs,
                  const struct protoq_kv *src, size_t n)
{
    size_t i;

    for (i = 0; i < n; i++) {
        Protoq__KeyValue init = PROTOQ__KEY_VALUE__INIT;

        kvs[i] = init;
        kvs[i].key = S(src[i].key);
        kvs[i].value = S(src[i].value);
        ptrs[i] = &kvs[i];
    }
    return n ? ptrs : NULL;
}

/* Fill b->msg[i] and b->pub[i] from m; *kvi is the next free kv slot. */
void
client_msg_to_wire(struct msgbuf *b, size_t i, size_t *kvi, const char *queue,
                   const struct protoq_message *m)
{
    Protoq__Publish pinit = PROTOQ__PUBLISH__INIT;
    Protoq__Message minit = PROTOQ__MESSAGE__INIT;
    Protoq__Message *w = &b->msg[i];

    *w = minit;
    w->payload.data = (uint8_t *)(m->len ? m->payload : NULL);
    w->payload.len = m->len;
    w->n_headers = m->n_headers;
    w->headers = client_kv_to_wire(b->kv + *kvi, b->kvp + *kvi, m->headers,
                                   m->n_headers);
    *kvi += m->n_headers;
    w->priority = m->priority;
    w->delay_ms = m->delay_ms;
    w->deliver_at_ms = m->deliver_at_ms;
    w->ttl_ms = m->ttl_ms;
    w->idempotency_key = S(m->idempotency_key);
    w->correlation_id = S(m->correlation_id);
    w->reply_to = S(m->reply_to);
    w->n_requires = m->n_requires;
    w->requires = client_kv_to_wire(b->kv + *kvi, b->kvp + *kvi, m->requires,
                                    m->n_requires);
    *kvi += m->n_requires;
    b->pub[i] = pinit;
    b->pub[i].queue = S(queue);
    b->pub[i].message = w;
    b->pubp[i] = &b->pub[i];
}

bool
client_msg_ok(protoq_client *c, const struct protoq_message *m)
{
    if (m == NULL) {
        client_set_err(c, PQ_EINVAL, "no message");
        return false;
    }
    if (m->len > 0 && m->payload == NULL) {
        client_set_err(c, PQ_EINVAL, "payload is NULL but len is %zu", m->len);
        return false;
    }
    if ((m->n_headers > 0 && m->headers == NULL) ||
        (m->n_requires > 0 && m->requires == NULL)) {
        client_set_err(c, PQ_EINVAL, "headers or requires missing");
        return false;
    }
    return true;
}

/* ---- publishing ---- */

/* protoq_publish_ex: one Publish, wait for its PublishOk (id and duplicate
 * flag). */
int
protoq_publish_ex(protoq_client *c, const char *queue,
                  const struct protoq_message *msg, uint64_t *id_out,
                  bool *duplicate_out)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Frame *r;
    struct msgbuf b;
    size_t kvi = 0;
    int rc;

    if (id_out != NULL) {
        *id_out = 0;
    }
    if (duplicate_out != NULL) {
        *duplicate_out = false;
    }
    if (!client_name_ok(c, "queue", queue) || !client_msg_ok(c, msg)) {
        return PQ_EINVAL;
    }
    if (client_msgbuf_init(&b, msg, 1) != PQ_OK) {
        return client_set_err(c, PQ_ENOMEM, "out of memory (publish)");
    }
    client_msg_to_wire(&b, 0, &kvi, queue, msg);
    f.kind_case = PROTOQ__FRAME__KIND_PUBLISH;
    f.publish = &b.pub[0];
    rc = client_request(c, &f, PROTOQ__FRAME__KIND_PUBLISH_OK, &r);
    client_msgbuf_fini(&b);
    if (rc != PQ_OK) {
        return rc;
    }
    if (r->publish_ok->n_message_ids < 1) {
        frame_free(r);
        return client_set_err(c, PQ_EPROTO,
                              "broker sent PublishOk without an id");
    }
    if (id_out != NULL) {
        *id_out = r->publish_ok->message_ids[0];
    }
    if (duplicate_out != NULL && r->publish_ok->n_duplicate > 0) {
        *duplicate_out = r->publish_ok->duplicate[0] != 0;
    }
    frame_free(r);
    return PQ_OK;
}

/* protoq_publish: protoq_publish_ex without the duplicate flag. */
int
protoq_publish(protoq_client *c, const char *queue,
               const struct protoq_message *msg, uint64_t *id_out)
{
    return protoq_publish_ex(c, queue, msg, id_out, NULL);
}

/* protoq_publish_async: buffer one Publish with a ring entry for its confirm
 * callback. */
int
protoq_publish_async(protoq_client *c, const char *queue,
                     const struct protoq_message *msg, protoq_confirm_fn cb,
                     void *arg)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    struct pending *p;
    struct msgbuf b;
    size_t kvi = 0;
    uint64_t id;
    int rc;

    rc = client_revive(c);
    if (rc != PQ_OK) {
        return rc;
    }
    if (!client_name_ok(c, "queue", queue) || !client_msg_ok(c, msg)) {
        return PQ_EINVAL;
    }
    if (client_msgbuf_init(&b, msg, 1) != PQ_OK) {
        return client_set_err(c, PQ_ENOMEM, "out of memory (publish)");
    }
    client_msg_to_wire(&b, 0, &kvi, queue, msg);
    f.kind_case = PROTOQ__FRAME__KIND_PUBLISH;
    f.publish = &b.pub[0];
    id = c->next_id++;
    f.request_id = id;
    p = client_pend_insert(c, id, PEND_CONFIRM);
    if (p == NULL) {
        client_msgbuf_fini(&b);
        return client_set_err(c, PQ_ENOMEM, "out of memory (request table)");
    }
    p->cb = cb;
    p->arg = arg;
    rc = client_send_frame(c, &f);
    client_msgbuf_fini(&b);
    if (rc == PQ_ETOOBIG || rc == PQ_ENOMEM) {
        /* Nothing was queued: take the entry back, no callback. */
        p = client_pend_find(c, id);
        if (p != NULL) {
            client_pend_remove(c, p);
        }
        return rc;
    }
    /* Other failures killed the connection; the callback already ran. */
    return rc;
}

static int
publish_batch(protoq_client *c, const char *queue, const char *const *queues,
              const struct protoq_message *msgs, size_t n, uint64_t *ids_out)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__PublishBatch pb = PROTOQ__PUBLISH_BATCH__INIT;
    Protoq__Frame *r;
    struct msgbuf b;
    size_t kvi = 0;
    size_t i;
    int rc;

    if (n == 0) {
        return client_set_err(c, PQ_EINVAL, "empty batch");
    }
    if (c->info.max_batch > 0 && n > c->info.max_batch) {
        return client_set_err(c, PQ_ETOOBIG,
                              "batch of %zu messages is over the "
                              "broker's limit of %u",
                              n, c->info.max_batch);
    }
    for (i = 0; i < n; i++) {
        const char *q = queues ? queues[i] : queue;

        if (!client_name_ok(c, "queue", q) || !client_msg_ok(c, &msgs[i])) {
            return PQ_EINVAL;
        }
    }
    if (client_msgbuf_init(&b, msgs, n) != PQ_OK) {
        return client_set_err(c, PQ_ENOMEM, "out of memory (batch)");
    }
    for (i = 0; i < n; i++) {
        client_msg_to_wire(&b, i, &kvi, queues ? queues[i] : queue, &msgs[i]);
    }
    pb.n_items = n;
    pb.items = b.pubp;
    f.kind_case = PROTOQ__FRAME__KIND_PUBLISH_BATCH;
    f.publish_batch = &pb;
    rc = client_request(c, &f, PROTOQ__FRAME__KIND_PUBLISH_OK, &r);
    client_msgbuf_fini(&b);
    if (rc != PQ_OK) {
        return rc;
    }
    if (r->publish_ok->n_message_ids != n) {
        rc = (int)r->publish_ok->n_message_ids;
        frame_free(r);
        return client_set_err(c, PQ_EPROTO,
                              "broker confirmed %d of %zu messages", rc, n);
    }
    if (ids_out != NULL) {
        memcpy(ids_out, r->publish_ok->message_ids, n * sizeof(*ids_out));
    }
    frame_free(r);
    return PQ_OK;
}

/* protoq_publish_batch: one atomic PublishBatch to one queue, wait for
 * PublishOk. */
int
protoq_publish_batch(protoq_client *c, const char *queue,
                     const struct protoq_message *msgs, size_t n,
                     uint64_t *ids_out)
{
    return publish_batch(c, queue, NULL, msgs, n, ids_out);
}

/* protoq_publish_batch_multi: one atomic PublishBatch, a queue per message. */
int
protoq_publish_batch_multi(protoq_client *c, const char *const *queues,
                           const struct protoq_message *msgs, size_t n,
                           uint64_t *ids_out)
{
    if (queues == NULL) {
        return client_set_err(c, PQ_EINVAL, "no queues");
    }
    return publish_batch(c, NULL, queues, msgs, n, ids_out);
}

/* protoq_publish_route: Publish through a route, wait for PublishOk. */
int
protoq_publish_route(protoq_client *c, const char *route,
                     const char *routing_key, const struct protoq_message *msg,
                     uint64_t *ids_out, size_t max_ids, size_t *n_ids)
{
    return protoq_publish_route_ex(c, route, routing_key, msg, 0, ids_out,
                                   max_ids, n_ids);
}

/* protoq_publish_route_ex: protoq_publish_route with flags. */
int
protoq_publish_route_ex(protoq_client *c, const char *route,
                        const char *routing_key,
                        const struct protoq_message *msg, unsigned flags,
                        uint64_t *ids_out, size_t max_ids, size_t *n_ids)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Frame *r;
    struct msgbuf b;
    size_t kvi = 0;
    size_t n;
    int rc;

    if (n_ids != NULL) {
        *n_ids = 0;
    }
    if (!client_name_ok(c, "route", route) || !client_msg_ok(c, msg)) {
        return PQ_EINVAL;
    }
    if (client_msgbuf_init(&b, msg, 1) != PQ_OK) {
        return client_set_err(c, PQ_ENOMEM, "out of memory (publish)");
    }
    client_msg_to_wire(&b, 0, &kvi, NULL, msg);
    b.pub[0].route = S(route);
    b.pub[0].routing_key = S(routing_key);
    b.pub[0].allow_unrouted = (flags & PROTOQ_ROUTE_ALLOW_UNROUTED) != 0;
    f.kind_case = PROTOQ__FRAME__KIND_PUBLISH;
    f.publish = &b.pub[0];
    rc = client_request(c, &f, PROTOQ__FRAME__KIND_PUBLISH_OK, &r);
    client_msgbuf_fini(&b);
    if (rc != PQ_OK) {
        return rc;
    }
    n = r->publish_ok->n_message_ids;
    if (ids_out != NULL && n > 0) { /* no ids: message_ids is NULL */
        memcpy(ids_out, r->publish_ok->message_ids,
               (n < max_ids ? n : max_ids) * sizeof(*ids_out));
    }
    if (n_ids != NULL) {
        *n_ids = n;
    }
    frame_free(r);
    return PQ_OK;
}

/* protoq_wait_confirms: pump until at most max_outstanding async publishes are
 * unconfirmed. */
int
protoq_wait_confirms(protoq_client *c, size_t max_outstanding, int timeout_ms)
{
    int64_t deadline = client_deadline_after(timeout_ms);
    int rc = client_revive(c);

    if (rc != PQ_OK) {
        return rc;
    }
    while (c->n_confirms > max_outstanding) {
        int left = client_remaining_ms(deadline);

        if (left == 0) {
            return client_set_err(c, PQ_ETIMEDOUT,
                                  "%zu publishes still unconfirmed after %d ms",
                                  c->n_confirms, timeout_ms);
        }
        rc = client_pump(c, left, true);
        if (rc < 0) {
            return rc;
        }
    }
    /* Send what is left even when nothing needed waiting for. */
    return c->out_len > c->out_start ? client_flush_all(c, true) : PQ_OK;
}

/* protoq_outstanding: async publishes not yet confirmed. */
size_t
protoq_outstanding(const protoq_client *c)
{
    return c->n_confirms;
}

/* protoq_flush: write all buffered output, dispatching what arrives. */
int
protoq_flush(protoq_client *c)
{
    return client_flush_all(c, true);
}
