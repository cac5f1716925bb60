/*
 * dispatch_result.c: what a job's producer hears back. When a job whose
 * message named a reply_to queue ends, the broker publishes one message
 * there: its result when it is acked, a failure notice when it is
 * dead-lettered, dropped (max attempts without a dead-letter queue, TTL)
 * or cancelled. That message goes into the same log record as the job's
 * end (journal.h), so after a crash a result exists exactly when its ack
 * does. It is pushed once that record is durable (the waits of
 * dispatch.c), or at the next loop pass when nothing needed a record.
 *
 * Headers of the message (PROTOCOL.md, "Results and failure notices"):
 * protoq-status ok|failed, protoq-job-id, protoq-queue, protoq-attempt,
 * protoq-correlation-id (also in Message.correlation_id) and, for a
 * failure, protoq-reason, protoq-error, protoq-dead-letter. Its payload is
 * the result, or the error text of a failure.
 *
 * A reply_to queue that is gone by then gets nothing (logged); one that is
 * full takes it anyway: a result never fails or blocks the ack.
 */
#include "dispatch.h"
#include "dispatch_int.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "log.h"
#include "mem.h"
#include "pbwire.h"
#include "pqerr.h"

/* The reply_to (9) and correlation_id (8) of an encoded protoq.Message,
 * as NUL-terminated copies into rt and cid (cut at their caps). */
static void
reply_fields(const struct body *b, char *rt, size_t rtcap, char *cid,
             size_t cidcap)
{
    const uint8_t *p = b->data, *end = b->data + b->len;
    struct pbwire_field f;

    rt[0] = cid[0] = '\0';
    while (p < end && pbwire_next_field(&p, end, &f)) {
        if (f.type != PBWIRE_LEN) {
            continue;
        }
        if (f.num == 9) {
            snprintf(rt, rtcap, "%.*s", (int)f.len, (const char *)f.val);
        } else if (f.num == 8) {
            snprintf(cid, cidcap, "%.*s", (int)f.len, (const char *)f.val);
        }
    }
}

/* The body of m, from memory or read back from the log. A new reference,
 * or NULL. */
static struct body *
msg_body(struct broker *bk, const struct msg *m)
{
    if (m->body != NULL) {
        return body_ref(m->body);
    }
    return journal_load_body(bk->journal, (struct msg *)m);
}

/* dispatch_reply_item: see dispatch_int.h. */
int
dispatch_reply_item(struct broker *bk, const struct msg *m,
                    const struct outcome *o, struct pending *p)
{
    char rt[QUEUE_NAME_MAX + 1], cid[PQ_CORRELATION_ID_MAX + 1];
    char id[24], attempt[16];
    Protoq__KeyValue kv[8], *kvp[8];
    Protoq__Message msg = PROTOQ__MESSAGE__INIT;
    const struct frame_msg_limits lim = {
        .max_message_bytes = UINT32_MAX,
        .max_frame_bytes = bk->cfg->max_frame_bytes,
    };
    struct body *b = msg_body(bk, m);
    struct queue *q;
    size_t n = 0, len;
    char why[128];
    uint64_t ttl;
    int rc = PQ_ENOTFOUND;

    memset(p, 0, sizeof(*p));
    if (b == NULL) {
        log_warn("queue %s: job %" PRIu64 ": its message cannot be read, "
                 "so its producer is not told that it ended (%s)",
                 o->queue, m->id, o->status);
        goto out;
    }
    reply_fields(b, rt, sizeof(rt), cid, sizeof(cid));
    if (rt[0] == '\0') {
        goto out; /* nobody asked */
    }
    q = qset_find(bk->qs, rt);
    if (q == NULL) {
        log_info("queue %s: job %" PRIu64 " ended (%s), but its reply_to "
                 "queue %s no longer exists: nothing sent",
                 o->queue, m->id, o->status, rt);
        goto out;
    }
    snprintf(id, sizeof(id), "%" PRIu64, m->id);
    snprintf(attempt, sizeof(attempt), "%" PRIu32, o->attempt);
#define HDR(k, v)                                                              \
    do {                                                                       \
        protoq__key_value__init(&kv[n]);                                       \
        kv[n].key = (char *)(k);                                               \
        kv[n].value = (char *)(v);                                             \
        kvp[n] = &kv[n];                                                       \
        n++;                                                                   \
    } while (0)
    HDR("protoq-status", o->status);
    HDR("protoq-job-id", id);
    HDR("protoq-queue", o->queue);
    HDR("protoq-attempt", attempt);
    if (cid[0] != '\0') {
        HDR("protoq-correlation-id", cid);
    }
    if (o->reason != NULL) {
        HDR("protoq-reason", o->reason);
    }
    if (o->error != NULL && o->error[0] != '\0') {
        HDR("protoq-error", o->error);
    }
    if (o->dead_letter != NULL) {
        HDR("protoq-dead-letter", o->dead_letter);
    }
#undef HDR
    msg.n_headers = n;
    msg.headers = kvp;
    msg.correlation_id = cid;
    msg.priority = m->priority;
    if (o->result_len > 0) {
        msg.payload.data = (uint8_t *)o->result;
        msg.payload.len = o->result_len;
    } else if (o->error != NULL) {
        msg.payload.data = (uint8_t *)o->error;
        msg.payload.len = strlen(o->error);
    }
    rc = frame_message_check(&msg, &lim, &len, why, sizeof(why));
    if (rc != PQ_OK) {
        log_debug("job %" PRIu64 ": its result does not fit: %s", m->id, why);
        goto out;
    }
    p->mn.body = body_alloc(len);
    if (p->mn.body == NULL) {
        rc = PQ_ENOMEM;
        goto out;
    }
    protoq__message__pack(&msg, p->mn.body->data);
    p->q = q;
    p->no_room = true;
    p->mn.id = bk->next_msg_id++;
    p->mn.size = (uint32_t)msg.payload.len;
    p->mn.priority = (uint8_t)m->priority;
    p->mn.published_wall_ms = clock_wall_ms();
    ttl = queue_attrs(q)->ttl_ms;
    if (ttl > 0) {
        p->mn.expire_ms = *bk->now_mono_ms + ttl;
    }
    rc = PQ_OK;
out:
    body_unref(&b);
    return rc;
}

/* dispatch_notice: see dispatch_int.h. */
struct wait *
dispatch_notice(struct broker *bk, const struct msg *m, const struct outcome *o)
{
    struct wait *w = dispatch_wait_new(NULL, 0, WAIT_ACK, 1);

    if (w == NULL) {
        log_warn("queue %s: job %" PRIu64 " %s: out of memory for the "
                 "notice to its producer",
                 o->queue, m->id, o->reason ? o->reason : o->status);
        return NULL;
    }
    if (dispatch_reply_item(bk, m, o, &w->items[0]) != PQ_OK) {
        dispatch_wait_free(bk, w);
        return NULL;
    }
    w->n = 1;
    return w;
}

/* dispatch_wait_after: see dispatch_int.h. */
void
dispatch_wait_after(struct broker *bk, struct wait *w, struct mark before)
{
    uint64_t lsn = journal_last_lsn(bk->journal);

    if (lsn != before.lsn) {
        dispatch_wait_enqueue(bk, w, lsn);
        return;
    }
    /* Nothing to wait for, but this may run inside a queue event, where
     * no queue may change: the next pass pushes it. */
    w->next = NULL;
    if (bk->later_tail) {
        bk->later_tail->next = w;
    } else {
        bk->later_head = w;
    }
    bk->later_tail = w;
}

/* AckOk: the ids of a confirmed ack's follow-ups (items[0..count)). */
static void
reply_ack_ok(struct wait *w)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__AckOk ok = PROTOQ__ACK_OK__INIT;
    uint64_t *ids = pq_malloc(w->count * sizeof(*ids));

    if (ids == NULL) {
        dispatch_reply_err(w->conn, w->request_id, PQ_ENOMEM,
                           "ack stored, but out of memory building the "
                           "reply");
        return;
    }
    for (uint64_t i = 0; i < w->count; i++) {
        ids[i] = w->items[i].mn.id;
    }
    ok.n_follow_up_ids = w->count;
    ok.follow_up_ids = ids;
    f.request_id = w->request_id;
    f.kind_case = PROTOQ__FRAME__KIND_ACK_OK;
    f.ack_ok = &ok;
    conn_send(w->conn, &f);
    pq_free(ids);
}

/* dispatch_complete_ack: see dispatch_int.h. */
void
dispatch_complete_ack(struct broker *bk, struct wait *w)
{
    for (uint32_t i = 0; i < w->n; i++) {
        dispatch_push_pending(bk, &w->items[i]);
    }
    if (w->conn && conn_is_open(w->conn) && w->count == 0) {
        dispatch_reply_ok(w->conn, w->request_id, 0);
    } else if (w->conn && conn_is_open(w->conn)) {
        reply_ack_ok(w);
    }
}

/* dispatch_run_later: see dispatch_int.h. */
void
dispatch_run_later(struct broker *bk)
{
    struct wait *w = bk->later_head;

    bk->later_head = bk->later_tail = NULL;
    while (w != NULL) {
        struct wait *next = w->next;

        dispatch_complete_ack(bk, w);
        dispatch_wait_free(bk, w);
        w = next;
    }
}

/* ---- the end of a job ---- */

void
dispatch_qevent_notice(struct broker *bk, const struct qevent *ev,
                       struct wait **out)
{
    struct outcome o = {.status = "failed"};
    const struct msg *m = ev->m;
    char attempt_buf[16] = "";

    *out = NULL;
    if (ev->type == QEV_DEAD_LETTER) {
        /* m was reset for its new queue: the x-death headers say how it
         * ended where it ran. */
        o.queue = queue_name(ev->from);
        o.dead_letter = queue_name(ev->q);
        for (size_t i = 0; i < ev->n_headers; i++) {
            if (strcmp(ev->headers[i].key, "x-death-attempts") == 0) {
                snprintf(attempt_buf, sizeof(attempt_buf), "%s",
                         ev->headers[i].value);
            } else if (strcmp(ev->headers[i].key, "x-death-error") == 0) {
                o.error = ev->headers[i].value;
            }
        }
        o.attempt = (uint32_t)strtoul(attempt_buf, NULL, 10);
    } else if (ev->type == QEV_DROP && !msg_is_cancelled(m)) {
        /* (an in-flight cancel told the producer when it happened) */
        o.queue = queue_name(ev->q);
        o.attempt = m->attempt;
        o.error = msg_last_error(m);
    } else {
        return;
    }
    o.reason = qreason_name(ev->reason);
    *out = dispatch_notice(bk, m, &o);
}
