/*
 * restart.c: what the model expects of a restart: a clean stop or a kill
 * -9 after a barrier (m_restart: one known state, running deliveries
 * failed by the start), and a bare kill -9 (m_restart_uncertain: each
 * message in any state its log may hold, a job's end with what it made).
 */
#include "model.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* What the start makes of state p of a message of len bytes when p was
 * running at a kill -9 (m_interrupted on a possible state): requeued,
 * or dead-lettered (which may also have been a drop when the
 * dead-letter queue has a limit), or dropped. */
static void
proj_interrupted(const struct model *w, struct m_proj *p)
{
    struct protoq_queue_attrs a;
    int dst;

    p->running = false;
    m_effective(w, p->q, &a);
    p->failures++;
    if (p->failures < a.max_attempts) {
        return;
    }
    dst = a.dead_letter[0] ? m_qindex(a.dead_letter) : -1;
    if (dst < 0 || !w->q[dst].exists || w->q[dst].a.transient ||
        p->ndl >= M_MAXDL) {
        p->exists = false;
        return;
    }
    p->maybe_gone = w->q[dst].a.max_length != 0 || w->q[dst].a.max_bytes != 0;
    memset(&p->dl[p->ndl], 0, sizeof(p->dl[p->ndl]));
    snprintf(p->dl[p->ndl].reason, sizeof(p->dl[p->ndl].reason), "%s",
             "max_attempts");
    p->dl[p->ndl].attempts = p->attempt;
    p->dl[p->ndl].q = p->q;
    snprintf(p->dl[p->ndl].err, sizeof(p->dl[p->ndl].err), "%s", p->err);
    p->ndl++;
    p->q = dst;
    p->attempt = 0;
    p->failures = 0;
    p->err[0] = '\0';
    p->dlong = false;
}

static int
id_cmp(const void *a, const void *b, void *arg)
{
    const struct model *w = arg;
    const struct m_msg *x = &w->m[*(const int *)a], *y = &w->m[*(const int *)b];
    uint64_t kx = x->id ? x->id * 2 : x->ordkey,
             ky = y->id ? y->id * 2 : y->ordkey;

    if (x->prio != y->prio) {
        return x->prio > y->prio ? -1 : 1;
    }
    if (kx != ky) {
        return kx < ky ? -1 : 1;
    }
    /* unbound ones made together: in the order they were made (those of
     * one start pass are grouped after the sort: group_upass) */
    return *(const int *)a < *(const int *)b ? -1 : 1;
}

/* Unbound messages next to each other in a ready list that one start pass
 * made (failure notices of interrupted jobs) have ids in the order that
 * start failed the jobs, which the model does not know: one unordered
 * group each. */
static void
group_upass(struct model *w, struct m_queue *Q)
{
    for (int i = 0; i + 1 < Q->nrd;) {
        const struct m_msg *x = &w->m[Q->rd[i]];
        int j = i + 1;

        while (j < Q->nrd && x->id == 0 && x->upass != 0 &&
               w->m[Q->rd[j]].id == 0 && w->m[Q->rd[j]].upass == x->upass &&
               w->m[Q->rd[j]].prio == x->prio) {
            j++;
        }
        if (j - i > 1) {
            uint32_t g = ++w->grp;

            for (int k = i; k < j; k++) {
                w->m[Q->rd[k]].grp = g;
            }
        }
        i = j;
    }
}

void
m_add_key(struct m_queue *Q, const char *key, int mi)
{
    size_t n = strlen(key);

    if (Q->nkeys >= M_MAXKEYS || n >= sizeof(Q->keys[0].key)) {
        return;
    }
    memcpy(Q->keys[Q->nkeys].key, key, n + 1);
    Q->keys[Q->nkeys++].m = mi;
}

void
m_rebuild_keys(struct model *w)
{
    /* After a restart a key of a message that is gone (or moved to another
     * queue) is remembered only if the segment with its PUBLISH record is
     * still there: the model does not know, and the generator avoids it. */
    for (int q = 0; q < M_NQ; q++) {
        struct m_queue *Q = &w->q[q];

        for (int k = 0; k < Q->nkeys; k++) {
            int mi = Q->keys[k].m;

            if (mi >= 0 && (w->m[mi].st == ST_GONE || w->m[mi].cur.q != q)) {
                Q->keys[k].m = -1;
            }
        }
    }
    for (int i = 0; i < w->nm; i++) {
        struct m_msg *m = &w->m[i];
        struct m_queue *Q;
        bool have = false;

        if (m->st == ST_GONE || m->key[0] == '\0') {
            continue;
        }
        Q = &w->q[m->cur.q];
        for (int k = 0; k < Q->nkeys; k++) {
            if (strcmp(Q->keys[k].key, m->key) == 0) {
                Q->keys[k].m = i;
                have = true;
            }
        }
        if (!have) {
            m_add_key(Q, m->key, i);
        }
    }
}

/* Common part of every restart: transient queues go, subscriptions go,
 * counters start again. */
static void
restart_queues(struct model *w)
{
    for (int q = 0; q < M_NQ; q++) {
        struct m_queue *Q = &w->q[q];

        Q->sub = -1;
        Q->nrd = 0;
        memset(&Q->n, 0, sizeof(Q->n));
        if (Q->exists && Q->a.transient) {
            Q->exists = false;
            m_unbind_queue(w, q);
        }
    }
    for (int i = 0; i < M_NS; i++) {
        w->s[i].used = false;
    }
    for (int i = 0; i < w->nm; i++) {
        w->m[i].pl_alt_ok = false;
    }
    for (int i = 0; i < M_MAXEV; i++) {
        w->ev[i].used = false;
    }
}

void
m_restart(struct model *w, bool clean, int64_t launch_ms)
{
    static int order[M_MAXM], running[M_MAXM];
    int n = 0, nrun = 0, first_made;
    uint32_t grp, dlgrp;

    if (clean) {
        /* a clean stop releases held jobs (attempt and failures kept) and
         * flushes everything */
        for (int i = 0; i < w->nm; i++) {
            struct m_msg *m = &w->m[i];

            if (m->st == ST_INFLIGHT && m->cancelled) {
                m_gone(w, i, false);
            } else if (m->st == ST_INFLIGHT) {
                m->st = ST_READY; /* its REQUEUE ends the delivery */
                m_record(w, m);
            }
        }
        m_durable(w);
    }
    for (int i = 0; i < w->nm; i++) {
        struct m_msg *m = &w->m[i];

        if (m->st == ST_GONE) {
            continue;
        }
        m->cur = m->pend[m->np - 1];
        m->cur.err[0] = '\0'; /* a nack's error is not logged */
        m->np = 1;
        m->pend[0] = m->cur;
        m->limbo = false;
        m->sub = -1;
        m->grp = 0;
        m->cancelled = false;
        m->ev = -1;
        if (!m->cur.exists || !w->q[m->cur.q].exists ||
            w->q[m->cur.q].a.transient) {
            m->st = ST_GONE;
            m->cur.exists = false;
            continue;
        }
        m->st = m->cur.dlong ? ST_DLONG : ST_READY;
        if (m->cur.running) {
            m->st = ST_TIMED; /* unlinked until m_interrupted */
            running[nrun++] = i;
        } else if (m->st == ST_READY) {
            order[n++] = i;
        }
    }
    restart_queues(w);
    for (int i = 0; i < w->nm; i++) {
        w->m[i].maybe_made = false; /* the counters began again */
    }
    qsort_r(order, (size_t)n, sizeof(int), id_cmp, w);
    for (int k = 0; k < n; k++) {
        struct m_queue *Q = &w->q[w->m[order[k]].cur.q];

        Q->rd[Q->nrd++] = order[k];
    }
    for (int q = 0; q < M_NQ; q++) {
        group_upass(w, &w->q[q]);
    }
    /* then the start fails what was running (kill -9 only) */
    grp = ++w->grp;
    dlgrp = ++w->grp;
    first_made = w->nm;
    for (int k = 0; k < nrun; k++) {
        m_interrupted(w, running[k], launch_ms, grp, dlgrp);
    }
    for (int i = first_made; i < w->nm; i++) {
        w->m[i].upass = grp;
    }
    m_rebuild_keys(w);
}

/* Before a bare kill -9's restart: which made messages can be checked
 * against their cause (m_check_groups): the made message was written (not
 * known durable) with the job's end, record pend[cause_k] of the job. */
static void
mark_groups(struct model *w)
{
    for (int i = 0; i < w->nm; i++) {
        struct m_msg *n = &w->m[i];
        const struct m_msg *j = n->cause >= 0 ? &w->m[n->cause] : NULL;
        const struct m_proj *p = &n->pend[1];

        n->gvalid = j != NULL && n->np == 2 && !n->pend[0].exists &&
                    p->exists && !p->dlong && w->q[p->q].exists &&
                    !w->q[p->q].a.transient && j->np < M_MAXP &&
                    n->cause_k >= 1 && n->cause_k < j->np;
    }
}

int
m_check_groups(struct model *w)
{
    for (int i = 0; i < w->nm && !w->failed; i++) {
        const struct m_msg *n = &w->m[i];
        const struct m_msg *j = n->gvalid ? &w->m[n->cause] : NULL;
        bool kept = false, lost = false;

        if (j == NULL || !(j->unc || j->seen)) {
            continue; /* its job was not in doubt (a drain resolves unc) */
        }
        if (j->seen) {
            kept = j->rk >= n->cause_k;
            lost = !kept;
        } else {
            /* not delivered again: its end survived if every state before
             * it would have been delivered */
            kept = true;
            for (int k = 0; k < n->cause_k; k++) {
                kept &= j->pend[k].exists && !j->pend[k].dlong;
            }
        }
        if ((kept && !n->seen) || (lost && n->seen)) {
            return m_fail(w,
                          "after kill -9: job %" PRIu64
                          " %s its end, but the %s it made in %s is %s",
                          j->id, kept ? "kept" : "lost",
                          n->made == MADE_RESULT   ? "result"
                          : n->made == MADE_NOTICE ? "failure notice"
                                                   : "follow-up",
                          m_qname(n->pend[1].q), n->seen ? "there" : "missing");
        }
        w->groups_kept += kept;
        w->groups_lost += lost;
    }
    return w->failed ? -1 : 0;
}

/*
 * Made message mi is in limbo at a kill -9: the broker pushes it when its
 * record is durable, a moment the model does not see, and a subscription
 * on its queue (eligible, with room) may have had it before the client
 * read it (the kill comes before sync_pushes). Its DELIVER may be in the
 * log, and then the start fails that attempt (journal_resume): one more
 * state, running at the next attempt. When that failed attempt may drop
 * it, its job's kept end no longer implies it is there (gvalid off).
 */
static bool
proj_pushed(struct model *w, int mi)
{
    struct m_msg *m = &w->m[mi];
    int si = m->limbo && m->np >= 1 ? w->q[m->cur.q].sub : -1;
    struct m_proj *p;

    if (si < 0 || !w->s[si].used || w->s[si].held >= w->s[si].prefetch ||
        !m_eligible(w, si, mi) || m->np >= M_MAXP ||
        !m->pend[m->np - 1].exists) {
        return false;
    }
    p = &m->pend[m->np];
    *p = m->pend[m->np - 1];
    p->attempt++;
    p->running = true;
    m->np++;
    return true;
}

void
m_sync_window(struct model *w, bool open)
{
    w->pl_window = open;
    w->pl_gen += open;
}

/* The log a power loss leaves is a prefix of what was written: with the
 * records of a sync window gone, so is everything after them, and the
 * message is in its pl_alt state, older than pend[0]. What its job's end
 * made refers to pend[] by index (cause_k): shifted with it. */
/* pend[k] is new: what the pend[] indexes of message mi's made messages
 * point at moves up. */
static void
pend_inserted(struct model *w, int mi, int k)
{
    for (int j = 0; j < w->nm; j++) {
        if (w->m[j].cause == mi && w->m[j].cause_k >= k) {
            w->m[j].cause_k++;
        }
    }
}

/* A release with progress is two records in one write (REQUEUE, then
 * PROGRESS): a kill -9 keeps both or neither, a torn write may keep the
 * REQUEUE alone. So after a power loss a released state may also be there
 * with the progress it had before the release. */
static void
split_release(struct model *w, int mi)
{
    struct m_msg *m = &w->m[mi];

    for (int k = m->np - 1; k >= 1 && m->np < M_MAXP; k--) {
        const struct m_proj *a = &m->pend[k - 1], *b = &m->pend[k];

        if (!a->running || b->running || !b->exists || a->q != b->q ||
            a->attempt != b->attempt || a->failures != b->failures ||
            (a->pg.has == b->pg.has && a->pg.pct == b->pg.pct &&
             strcmp(a->pg.text, b->pg.text) == 0 &&
             strcmp(a->pg.ckpt, b->pg.ckpt) == 0)) {
            continue;
        }
        memmove(&m->pend[k + 1], &m->pend[k],
                (size_t)(m->np - k) * sizeof(m->pend[0]));
        m->pend[k].pg = m->pend[k - 1].pg;
        m->np++;
        pend_inserted(w, mi, k);
    }
}

void
m_power_loss(struct model *w)
{
    for (int i = 0; i < w->nm; i++) {
        struct m_msg *m = &w->m[i];

        split_release(w, i);
        if (!m->pl_alt_ok || m->np >= M_MAXP) {
            continue;
        }
        memmove(&m->pend[1], &m->pend[0], (size_t)m->np * sizeof(m->pend[0]));
        m->pend[0] = m->pl_alt;
        m->np++;
        w->pl_alts++;
        pend_inserted(w, i, 0);
    }
}

void
m_restart_uncertain(struct model *w)
{
    int first_new = w->nm; /* m_proj_notice adds after it */

    mark_groups(w);
    for (int i = 0; i < w->nm; i++) {
        struct m_msg *m = &w->m[i];
        bool any = false, pushed;

        if (m->st == ST_GONE && m->np <= 1) {
            continue;
        }
        pushed = i < first_new && proj_pushed(w, i);
        for (int k = 0; k < m->np; k++) {
            struct m_proj *p = &m->pend[k];

            if (p->exists && (!w->q[p->q].exists || w->q[p->q].a.transient)) {
                p->exists = false;
            }
            p->err[0] = '\0'; /* a nack's error is not logged */
            if (p->exists && p->running) {
                struct m_proj before = *p;

                proj_interrupted(w, p);
                if (!p->exists || p->ndl > before.ndl) {
                    /* its end at the start: a notice, maybe (the drop
                     * of a full dead-letter queue's has no dead-letter
                     * header: both forms may be there) */
                    m_proj_notice(w, i, &before, p->exists ? p->q : -1);
                    if (p->maybe_gone) {
                        m_proj_notice(w, i, &before, -1);
                    }
                }
            }
            any |= p->exists;
        }
        if (pushed &&
            (!m->pend[m->np - 1].exists || m->pend[m->np - 1].maybe_gone)) {
            m->gvalid = false;
        }
        m->sub = -1;
        m->grp = 0;
        m->cancelled = false;
        m->limbo = false;
        m->ev = -1;
        m->seen = false;
        m->rk = -1;
        m->unc = any;
        w->unc_msgs += any;
        w->unc_multi += any && m->np > 1;
        m->st = any ? ST_READY : ST_GONE; /* not linked into rd: unc */
        m->cur.exists = any;
    }
    restart_queues(w);
    for (int i = 0; i < w->nm; i++) {
        if (i >= first_new && w->m[i].maybe_made) {
            w->q[w->m[i].pend[1].q].n.pub_maybe++;
        } else {
            w->m[i].maybe_made = false; /* an earlier start's: the
                                           counters began again since */
        }
    }
}
