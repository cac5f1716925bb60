/*
 * dispatch_job.c: job visibility: JobGet (one job by queue and id) and
 * JobList (a queue's jobs by id, filtered by state, a page at a time).
 * Read-only: nothing is delivered, no attempt is counted, no compact
 * message is expanded (qset_msg_peek and queue_foreach_msg only).
 *
 * A job that was dead-lettered lives on in the queue's dead_letter queue
 * under the same id: JobGet on the original queue finds it there as
 * JOB_STATE_DEAD; JobList with JOB_STATE_DEAD lists the dead-letter queue.
 */
#include "dispatch.h"
#include "dispatch_int.h"

#include <stdlib.h>
#include <string.h>

#include "clock.h"
#include "mem.h"
#include "pqerr.h"

/* One JobInfo and what it points to, alive until the reply is sent. */
struct job_view {
    Protoq__JobInfo info;
    Protoq__JobHolder holder;
    Protoq__KeyValue kv[PQ_TAGS_MAX];
    Protoq__KeyValue *kvp[PQ_TAGS_MAX];
    Protoq__Progress *progress; /* unpacked; freed with the view */
};

static Protoq__JobState
job_state(const struct msg *m, const struct queue *asked)
{
    if (m->q != asked) {
        return PROTOQ__JOB_STATE__JOB_STATE_DEAD;
    }
    switch (m->state) {
    case MSG_READY:
        return PROTOQ__JOB_STATE__JOB_STATE_READY;
    case MSG_DELAYED:
        return PROTOQ__JOB_STATE__JOB_STATE_DELAYED;
    default:
        return PROTOQ__JOB_STATE__JOB_STATE_INFLIGHT;
    }
}

/* Mono ms to wall ms (0 stays 0). */
static uint64_t
wall_of(uint64_t mono, uint64_t now_mono, uint64_t now_wall)
{
    if (mono == 0) {
        return 0;
    }
    return mono >= now_mono ? now_wall + (mono - now_mono)
                            : now_wall - (now_mono - mono);
}

/* Fill v from m (a qset_msg_peek copy) as seen from the queue asked. */
static void
fill_job(struct broker *bk, struct job_view *v, const struct msg *m,
         const struct queue *asked, uint64_t now_wall)
{
    uint64_t now = *bk->now_mono_ms;
    const struct kv *req;
    struct body *prog;
    size_t n_req = 0;

    memset(v, 0, sizeof(*v));
    protoq__job_info__init(&v->info);
    v->info.queue = (char *)queue_name(m->q);
    v->info.message_id = m->id;
    v->info.state = job_state(m, asked);
    v->info.attempt = m->attempt;
    v->info.failures = m->failures;
    v->info.priority = m->priority;
    v->info.published_at_ms = m->published_wall_ms;
    v->info.payload_bytes = m->size;
    v->info.cancelled = msg_is_cancelled(m);
    v->info.last_error = (char *)(msg_last_error(m) ? msg_last_error(m) : "");
    if (m->state != MSG_READY) {
        v->info.due_at_ms = wall_of(m->due_ms, now, now_wall);
    }
    req = msg_requires(m, &n_req);
    for (size_t i = 0; i < n_req && i < PQ_TAGS_MAX; i++) {
        protoq__key_value__init(&v->kv[i]);
        v->kv[i].key = (char *)req[i].key;
        v->kv[i].value = (char *)req[i].value;
        v->kvp[i] = &v->kv[i];
    }
    v->info.n_requires = n_req < PQ_TAGS_MAX ? n_req : PQ_TAGS_MAX;
    v->info.requires = v->kvp;
    prog = msg_progress(m);
    if (prog != NULL) {
        /* Stored as received (bounded by PQ_PROGRESS_MAX); a failure to
         * decode leaves it out. */
        v->progress = protoq__progress__unpack(NULL, prog->len, prog->data);
        v->info.progress = v->progress;
    }
    if (m->state == MSG_INFLIGHT && m->holder != NULL) {
        const struct sub *s = m->holder->owner;

        protoq__job_holder__init(&v->holder);
        v->holder.subscription_id = m->holder->id;
        const char *name, *peer;

        dispatch_session_holder(s, &name, &peer);
        v->holder.client_name = (char *)name;
        v->holder.address = (char *)peer;
        v->holder.lease_left_ms = m->due_ms > now ? m->due_ms - now : 0;
        v->info.holder = &v->holder;
    }
}

static void
view_fini(struct job_view *v)
{
    if (v->progress != NULL) {
        protoq__progress__free_unpacked(v->progress, NULL);
        v->progress = NULL;
    }
}

void
dispatch_on_job_get(struct conn *c, uint64_t rid, const Protoq__JobGet *r)
{
    struct broker *bk = broker_of(c);
    struct queue *q = dispatch_find_queue(
        c, rid, r->queue, AUTH_CONSUME | AUTH_MANAGE, "job get");
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    struct job_view v;
    struct msg m;

    if (q == NULL) {
        return; /* answered */
    }
    if (!qset_msg_peek(bk->qs, r->message_id, &m) ||
        (m.q != q &&
         strcmp(queue_attrs(q)->dead_letter, queue_name(m.q)) != 0)) {
        dispatch_reply_err(c, rid, PQ_ENOTFOUND,
                           "job %llu: not in queue %s (acked, expired, "
                           "cancelled, or never there)",
                           (unsigned long long)r->message_id, r->queue);
        return;
    }
    fill_job(bk, &v, &m, q, clock_wall_ms());
    f.request_id = rid;
    f.kind_case = PROTOQ__FRAME__KIND_JOB_INFO;
    f.job_info = &v.info;
    conn_send(c, &f);
    view_fini(&v);
}

/* The smallest ids above after_id in the wanted state, sorted: at most
 * cap (limit + 1, so that a next page is known to exist). */
struct list_walk {
    uint64_t after_id;
    int state; /* enum msg_state, or -1 for any */
    uint64_t *ids;
    uint32_t n, cap;
};

static void
list_cb(void *arg, struct msg *m)
{
    struct list_walk *w = arg;
    uint32_t lo = 0, hi = w->n;

    if (m->id <= w->after_id || (w->state >= 0 && m->state != w->state) ||
        (w->n == w->cap && m->id > w->ids[w->n - 1])) {
        return;
    }
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;

        if (w->ids[mid] < m->id) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    if (w->n == w->cap) {
        w->n--; /* the largest goes */
    }
    memmove(&w->ids[lo + 1], &w->ids[lo], (w->n - lo) * sizeof(uint64_t));
    w->ids[lo] = m->id;
    w->n++;
}

void
dispatch_on_job_list(struct conn *c, uint64_t rid, const Protoq__JobList *r)
{
    struct broker *bk = broker_of(c);
    struct queue *q = dispatch_find_queue(
                     c, rid, r->queue, AUTH_CONSUME | AUTH_MANAGE, "job list"),
                 *from;
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__JobListOk ok = PROTOQ__JOB_LIST_OK__INIT;
    struct list_walk w = {.after_id = r->after_id, .state = -1};
    struct job_view *views = NULL;
    Protoq__JobInfo **ptrs = NULL;
    uint64_t now_wall = clock_wall_ms();
    uint32_t limit = r->limit ? r->limit : PQ_JOB_LIST_DEFAULT, n;

    if (q == NULL) {
        return; /* answered */
    }
    if (limit > PQ_JOB_LIST_MAX) {
        dispatch_reply_err(c, rid, PQ_EINVAL, "job list %s: limit %u (1-%d)",
                           r->queue, limit, PQ_JOB_LIST_MAX);
        return;
    }
    from = q;
    switch (r->state) {
    case PROTOQ__JOB_STATE__JOB_STATE_UNSPECIFIED:
        break;
    case PROTOQ__JOB_STATE__JOB_STATE_READY:
        w.state = MSG_READY;
        break;
    case PROTOQ__JOB_STATE__JOB_STATE_DELAYED:
        w.state = MSG_DELAYED;
        break;
    case PROTOQ__JOB_STATE__JOB_STATE_INFLIGHT:
        w.state = MSG_INFLIGHT;
        break;
    case PROTOQ__JOB_STATE__JOB_STATE_DEAD:
        from = qset_find(bk->qs, queue_attrs(q)->dead_letter);
        break;
    default:
        dispatch_reply_err(c, rid, PQ_EINVAL, "job list %s: unknown state %d",
                           r->queue, (int)r->state);
        return;
    }
    w.cap = limit + 1;
    w.ids = pq_malloc(w.cap * sizeof(*w.ids));
    views = pq_calloc(limit, sizeof(*views));
    ptrs = pq_calloc(limit, sizeof(*ptrs));
    if (w.ids == NULL || views == NULL || ptrs == NULL) {
        dispatch_reply_err(c, rid, PQ_ENOMEM, "job list %s: out of memory",
                           r->queue);
        goto out;
    }
    if (from != NULL) {
        queue_foreach_msg(from, list_cb, &w);
    }
    n = w.n < limit ? w.n : limit;
    for (uint32_t i = 0; i < n; i++) {
        struct msg m;

        /* Listed a moment ago, nothing ran since: it is there. */
        if (qset_msg_peek(bk->qs, w.ids[i], &m)) {
            fill_job(bk, &views[ok.n_jobs], &m, q, now_wall);
            ptrs[ok.n_jobs] = &views[ok.n_jobs].info;
            ok.n_jobs++;
        }
    }
    ok.jobs = ptrs;
    ok.next_after_id = w.n > limit ? w.ids[limit - 1] : 0;
    f.request_id = rid;
    f.kind_case = PROTOQ__FRAME__KIND_JOB_LIST_OK;
    f.job_list_ok = &ok;
    if (frame_packed_size(&f) - FRAME_HEADER_LEN > bk->cfg->max_frame_bytes) {
        dispatch_reply_err(c, rid, PQ_ETOOBIG,
                           "job list %s: %zu jobs do not fit in one frame; "
                           "ask for fewer",
                           r->queue, ok.n_jobs);
        goto out;
    }
    conn_send(c, &f);
out:
    for (size_t i = 0; views != NULL && i < ok.n_jobs; i++) {
        view_fini(&views[i]);
    }
    pq_free(w.ids);
    pq_free(views);
    pq_free(ptrs);
}
