/*
 * dispatch_deliver.c: the delivery pass of a queue and the Deliver frames
 * it sends. A payload that is in memory is spliced into its Deliver at
 * once. One that was evicted to disk is read back by the store's reader
 * thread (journal_load_start), so the loop goes on serving everyone else
 * meanwhile; until it comes back, that subscription's later deliveries
 * wait behind it in the subscription's out-queue, so each consumer still
 * gets its messages in the order the queue handed them out. When a
 * delivery's turn comes, it is sent only if it is still current: the
 * message in flight, same attempt, same holder (a lease may have run out,
 * or a cancel or the holder's unsubscribe come, while it was read).
 */
#include "dispatch.h"
#include "dispatch_int.h"

#include "frame.h"
#include "journal.h"
#include "log.h"
#include "mem.h"
#include "pqerr.h"

/* A delivery waiting in its subscription's out-queue. */
struct outd {
    struct outd *next;
    uint64_t id;
    uint32_t attempt;
    struct body *b; /* a reference once known; NULL while loading/failed */
    bool loading;   /* its body is being read back */
    struct sub *s;
};

/* A delivery that cannot be sent is a failed attempt (error logged by
 * the caller): after max_attempts the message is dead-lettered or dropped,
 * and the consumer's connection is not harmed. */
static void
fail_attempt(struct broker *bk, struct msg *m, const char *error)
{
    struct nack_opts o = {.dead_letter = false, .error = error};

    qset_nack(bk->qs, m->id, m->attempt, &o, *bk->now_mono_ms);
}

/* Send one Deliver of m with body b (borrowed); the body is spliced, not
 * re-encoded. */
static void
emit(struct broker *bk, struct sub *s, struct msg *m, const struct body *b)
{
    struct body *prog = msg_progress(m);
    struct frame_deliver d = {
        .subscription_id = s->cons.id,
        .queue = queue_name(m->q),
        .message_id = m->id,
        .attempt = m->attempt,
        .lease_ms =
            m->due_ms > *bk->now_mono_ms ? m->due_ms - *bk->now_mono_ms : 0,
        .published_at_ms = m->published_wall_ms,
        .progress = prog ? prog->data : NULL,
        .progress_len = prog ? prog->len : 0,
    };
    size_t n;
    uint8_t *p;

    if (b == NULL) {
        /* Unreadable payload: fail this attempt rather than send garbage. */
        log_err("queue %s: message %llu: payload cannot be read back",
                queue_name(m->q), (unsigned long long)m->id);
        fail_attempt(bk, m, "payload unreadable");
        return;
    }
    n = frame_deliver_size(&d, b->len);
    if (n - FRAME_HEADER_LEN > bk->cfg->max_frame_bytes) {
        /* Publish checks that this cannot happen; a message stored while
         * max_frame_bytes was larger can. No client would accept it. */
        log_err("queue %s: message %llu: its Deliver of %zu bytes is over "
                "max_frame_bytes (%u, lowered since it was stored); the "
                "attempt fails",
                queue_name(m->q), (unsigned long long)m->id,
                n - FRAME_HEADER_LEN, bk->cfg->max_frame_bytes);
        fail_attempt(bk, m, "message over max_frame_bytes");
        return;
    }
    p = conn_reserve(s->conn, n);
    if (p == NULL) {
        return; /* the connection is going away; its close requeues m */
    }
    conn_commit(s->conn, frame_deliver_encode(&d, b->data, b->len, p));
}

static void
outd_free(struct outd *o)
{
    body_unref(&o->b);
    pq_free(o);
}

/* Send what heads s's out-queue, up to the first delivery still loading. */
static void
flush_outq(struct broker *bk, struct sub *s)
{
    struct outd *o;

    while ((o = s->out_head) != NULL && !o->loading) {
        struct msg *m = qset_msg(bk->qs, o->id);

        s->out_head = o->next;
        if (s->out_head == NULL) {
            s->out_tail = NULL;
        }
        if (m != NULL && m->state == MSG_INFLIGHT && m->attempt == o->attempt &&
            m->holder == &s->cons) {
            emit(bk, s, m, o->b);
        }
        outd_free(o);
    }
}

/* A body read back: the delivery waiting for it may go, and those behind. */
static void
on_loaded(void *arg, uint64_t id, struct body *b)
{
    struct broker *bk = arg;
    struct outd *o = hmap_u64_del(&bk->loading, id);

    if (o == NULL) {
        body_unref(&b); /* cannot happen: every load has its entry */
        return;
    }
    o->b = b;
    o->loading = false;
    if (o->s == NULL) {
        outd_free(o); /* its subscription went away meanwhile */
        return;
    }
    flush_outq(bk, o->s);
}

void
dispatch_reap_loads(struct broker *bk)
{
    if (bk->journal != NULL) {
        journal_reap_loads(bk->journal, on_loaded, bk);
    }
}

/* Queue m behind what s is waiting for; start reading its body when it is
 * not in memory. */
static void
defer(struct broker *bk, struct sub *s, struct msg *m)
{
    struct outd *o = pq_calloc(1, sizeof(*o)), *old;
    int rc;

    if (o == NULL) {
        log_err("queue %s: message %llu: no memory to queue its delivery",
                queue_name(m->q), (unsigned long long)m->id);
        fail_attempt(bk, m, "out of memory");
        return;
    }
    o->id = m->id;
    o->attempt = m->attempt;
    o->s = s;
    if (m->body != NULL) {
        o->b = body_ref(m->body);
    } else if ((old = hmap_u64_get(&bk->loading, m->id)) != NULL) {
        /* An earlier attempt's read is still on its way (its lease ran out,
         * or its holder left, meanwhile): this delivery takes it over; the
         * old one is stale. */
        hmap_u64_del(&bk->loading, m->id);
        if (old->s == NULL) {
            outd_free(old);
        } else {
            old->loading = false;
        }
        /* if the map cannot take it, it goes as unreadable: a failed
         * attempt, never a wrong payload */
        o->loading = hmap_u64_put(&bk->loading, m->id, o) == PQ_OK;
    } else if (hmap_u64_put(&bk->loading, m->id, o) == PQ_OK) {
        rc = journal_load_start(bk->journal, m);
        o->loading = rc == PQ_OK;
        if (rc != PQ_OK) {
            hmap_u64_del(&bk->loading, m->id);
            log_err("queue %s: message %llu: cannot read its payload back: "
                    "%s",
                    queue_name(m->q), (unsigned long long)m->id,
                    pq_strerror(rc));
        }
    }
    if (s->out_tail != NULL) {
        s->out_tail->next = o;
    } else {
        s->out_head = o;
    }
    s->out_tail = o;
    flush_outq(bk, s);
}

/* dispatch_sub_release_unsent: see dispatch_int.h. */
void
dispatch_sub_release_unsent(struct broker *bk, struct sub *s)
{
    for (struct outd *o = s->out_head; o != NULL; o = o->next) {
        struct msg v;

        if (qset_msg_peek(bk->qs, o->id, &v) && v.state == MSG_INFLIGHT &&
            v.attempt == o->attempt && v.holder == &s->cons) {
            (void)qset_release(bk->qs, o->id, o->attempt, NULL,
                               *bk->now_mono_ms);
        }
    }
    dispatch_sub_drop_outq(s);
}

void
dispatch_sub_drop_outq(struct sub *s)
{
    struct outd *o;

    while ((o = s->out_head) != NULL) {
        s->out_head = o->next;
        if (o->loading) {
            /* its read goes on: the next delivery of the message may take
             * it over; otherwise on_loaded frees it */
            o->s = NULL;
            o->next = NULL;
            body_unref(&o->b);
        } else {
            outd_free(o);
        }
    }
    s->out_tail = NULL;
}

void
dispatch_drop_loads(struct broker *bk)
{
    size_t it = 0;
    struct outd *o;

    /* the subscriptions are gone: what is left is orphaned loads */
    while ((o = hmap_u64_next(&bk->loading, &it, NULL)) != NULL) {
        outd_free(o);
    }
    hmap_u64_fini(&bk->loading);
}

/* dispatch_deliver: hand out what q can deliver now; true if it stopped early.
 */
bool
dispatch_deliver(struct broker *bk, struct queue *q)
{
    struct consumer *to;
    struct sub *s;
    struct msg *m;

    for (int i = 0; i < DELIVERIES_PER_PASS; i++) {
        m = queue_next_delivery(q, *bk->now_mono_ms, &to);
        if (m == NULL) {
            return false;
        }
        s = to->owner;
        journal_delivered(bk->journal, m);
        if (m->body != NULL && s->out_head == NULL) {
            emit(bk, s, m, m->body);
        } else {
            defer(bk, s, m);
        }
    }
    return true;
}
