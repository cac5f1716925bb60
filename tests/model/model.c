/*
 * model.c: the reference model of check_model.c (see model.h). No I/O: the
 * test drives the broker and tells the model what it did and saw.
 */
#include "model.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *const m_tag_key[M_NTAGS] = {"gpu", "gpu", "zone"};
const char *const m_tag_val[M_NTAGS] = {"a100", "h100", "eu"};

int
m_fail(struct model *w, const char *fmt, ...)
{
    va_list ap;

    if (!w->failed) {
        va_start(ap, fmt);
        vsnprintf(w->err, sizeof(w->err), fmt, ap);
        va_end(ap);
        w->failed = true;
    }
    return -1;
}

const char *
m_qname(int q)
{
    static const char *const names[M_NQ] = {"q0", "q1", "q2", "q3", "q4"};

    return q >= 0 && q < M_NQ ? names[q] : "?";
}

int
m_qindex(const char *name)
{
    for (int i = 0; i < M_NQ; i++) {
        if (strcmp(name, m_qname(i)) == 0) {
            return i;
        }
    }
    return -1;
}

void
m_payload(uint32_t gen, uint32_t len, char *buf)
{
    static const char al[] = "abcdefghijklmnopqrstuvwxyz0123456789";

    for (uint32_t i = 0; i < len; i++) {
        buf[i] = al[(gen * 31u + i * 7u + (i >> 5) * 3u) % 36u];
    }
}

uint64_t
m_hash(const void *p, size_t len)
{
    const uint8_t *b = p;
    uint64_t h = 1469598103934665603ULL;

    for (size_t i = 0; i < len; i++) {
        h = (h ^ b[i]) * 1099511628211ULL;
    }
    return h;
}

/* Patterns and keys, and whether each pattern matches each key (by hand,
 * not by a second matcher): "" every key; "*" one word, "#" any words. */
const char *const m_pat[M_NPAT] = {"", "a.*", "a.#", "#.c"};
const char *const m_rkey[M_NRKEY] = {"a.b", "a.b.c", "x.c", "a"};
static const bool pat_matches[M_NPAT][M_NRKEY] = {
    {true, true, true, true},    /* "" */
    {true, false, false, false}, /* a.* */
    {true, true, false, true},   /* a.# */
    {false, true, true, false},  /* #.c */
};

int
m_route_match(const struct model *w, int k, int *qs)
{
    int n = 0;

    for (int i = 0; i < w->nb; i++) {
        bool dup = false;

        if (!pat_matches[w->b[i].pat][k]) {
            continue;
        }
        for (int j = 0; j < n; j++) {
            dup |= qs[j] == w->b[i].q;
        }
        if (!dup) {
            qs[n++] = w->b[i].q;
        }
    }
    return n;
}

void
m_unbind_queue(struct model *w, int q)
{
    int n = 0;

    for (int i = 0; i < w->nb; i++) {
        if (w->b[i].q != q) {
            w->b[n++] = w->b[i];
        }
    }
    w->nb = n;
}

void
m_init(struct model *w)
{
    memset(w, 0, sizeof(*w));
    for (int i = 0; i < M_NQ; i++) {
        w->q[i].sub = -1;
    }
}

void
m_effective(const struct model *w, int q, struct protoq_queue_attrs *o)
{
    *o = w->q[q].a;
    if (o->ack_timeout_ms == 0) {
        o->ack_timeout_ms = w->cfg_ack_timeout;
    }
    if (o->max_attempts == 0) {
        o->max_attempts = w->cfg_max_attempts;
    }
    if (o->no_backoff) {
        o->backoff_base_ms = 0;
        o->backoff_cap_ms = 0;
    } else {
        if (o->backoff_base_ms == 0) {
            o->backoff_base_ms = w->cfg_backoff_base;
        }
        if (o->backoff_cap_ms == 0) {
            o->backoff_cap_ms = w->cfg_backoff_cap;
        }
    }
    if (o->dedup_window_ms == 0) {
        o->dedup_window_ms = w->cfg_dedup;
    }
}

static bool
live_in(const struct m_msg *m, int q)
{
    return m->st != ST_GONE && m->cur.q == q;
}

bool
m_room(const struct model *w, int q, uint64_t n, uint64_t bytes)
{
    uint64_t cnt = 0, b = 0;

    for (int i = 0; i < w->nm; i++) {
        if (live_in(&w->m[i], q)) {
            cnt++;
            b += w->m[i].len;
        }
    }
    if (w->q[q].a.max_length != 0 && cnt + n > w->q[q].a.max_length) {
        return false;
    }
    if (w->q[q].a.max_bytes != 0 && b + bytes > w->q[q].a.max_bytes) {
        return false;
    }
    return true;
}

int
m_new_msg(struct model *w)
{
    struct m_msg *m;

    if (w->nm >= M_MAXM) {
        return -1;
    }
    m = &w->m[w->nm];
    memset(m, 0, sizeof(*m));
    m->sub = -1;
    m->ev = -1;
    m->cause = -1;
    m->rk = -1;
    return w->nm++;
}

/* The broker wrote a record of m's current state: a delivery's DELIVER
 * while it is in flight (running), else the record that ended it. */
void
m_record(struct model *w, struct m_msg *m)
{
    if (w->pl_window && m->np > 0 &&
        (!m->pl_alt_ok || m->pl_alt_gen != w->pl_gen)) {
        m->pl_alt = m->pend[m->np - 1];
        m->pl_alt_ok = true;
        m->pl_alt_gen = w->pl_gen;
    }
    m->cur.running = m->st == ST_INFLIGHT && !m->cancelled && m->cur.exists;
    if (m->np == 0) {
        m->pend[0] = m->cur;
        m->np = 1;
        return;
    }
    if (m->np < M_MAXP) {
        m->np++;
    }
    m->pend[m->np - 1] = m->cur;
}

/* A PROGRESS record (touch): only the progress changes in the log. */
void
m_record_progress(struct model *w, struct m_msg *m)
{
    struct m_proj p = m->np > 0 ? m->pend[m->np - 1] : m->cur;

    p.pg = m->cur.pg;
    if (m->np < M_MAXP) {
        m->np++;
    }
    m->pend[m->np - 1] = p;
    (void)w;
}

/*
 * Link made message mi (in limbo) into its queue. The broker put it there
 * when its record became durable, a moment the model does not see: after
 * what was ready when it was made, but maybe before what became ready
 * since (a delay or backoff that ended meanwhile). It and those are one
 * unordered group.
 */
static void
limbo_link(struct model *w, int mi)
{
    struct m_queue *Q = &w->q[w->m[mi].cur.q];
    int pos, k;

    w->m[mi].limbo = false;
    m_insert_back(w, w->m[mi].cur.q, mi);
    for (pos = 0; Q->rd[pos] != mi; pos++) {
    }
    k = pos;
    while (k > 0 && w->m[Q->rd[k - 1]].prio == w->m[mi].prio &&
           w->m[Q->rd[k - 1]].lseq > w->m[mi].mseq) {
        k--;
    }
    /* a group this one overlaps (an earlier link of the same pass) is
     * merged into it, not split: its members before k stay unordered with
     * the rest */
    while (k < pos && k > 0 && w->m[Q->rd[k]].grp != 0 &&
           w->m[Q->rd[k - 1]].grp == w->m[Q->rd[k]].grp) {
        k--;
    }
    if (k < pos) {
        uint32_t g = ++w->grp;

        for (int i = k; i <= pos; i++) {
            w->m[Q->rd[i]].grp = g;
        }
    }
}

void
m_push_limbo(struct model *w)
{
    for (int i = 0; i < w->nm; i++) {
        if (w->m[i].limbo) {
            limbo_link(w, i);
        }
    }
}

/* Everything written so far is durable, and so what job ends made is in
 * its queues (in the order it was made). */
void
m_durable(struct model *w)
{
    m_push_limbo(w);
    for (int i = 0; i < w->nm; i++) {
        struct m_msg *m = &w->m[i];

        if (m->np > 1) {
            m->pend[0] = m->pend[m->np - 1];
            m->np = 1;
        }
        /* a window's records are covered by the next fsync, not its own */
        m->pl_alt_ok &= w->pl_window && m->pl_alt_gen == w->pl_gen;
    }
    w->unpushed = false; /* durable means pushed (dispatch_result.c) */
}

static void
rd_insert(struct m_queue *q, int pos, int mi)
{
    memmove(&q->rd[pos + 1], &q->rd[pos], (size_t)(q->nrd - pos) * sizeof(int));
    q->rd[pos] = mi;
    q->nrd++;
}

void
m_insert_back(struct model *w, int q, int mi)
{
    struct m_queue *Q = &w->q[q];
    int pos = Q->nrd;

    while (pos > 0 && w->m[Q->rd[pos - 1]].prio < w->m[mi].prio) {
        pos--;
    }
    rd_insert(Q, pos, mi);
    w->m[mi].st = ST_READY;
    w->m[mi].lseq = ++w->lseq;
}

void
m_insert_front(struct model *w, int q, int mi)
{
    struct m_queue *Q = &w->q[q];
    int pos = 0;

    while (pos < Q->nrd && w->m[Q->rd[pos]].prio > w->m[mi].prio) {
        pos++;
    }
    rd_insert(Q, pos, mi);
    w->m[mi].st = ST_READY;
    w->m[mi].lseq = ++w->lseq;
}

void
m_unlink_ready(struct model *w, int mi)
{
    struct m_queue *Q = &w->q[w->m[mi].cur.q];

    for (int i = 0; i < Q->nrd; i++) {
        if (Q->rd[i] == mi) {
            memmove(&Q->rd[i], &Q->rd[i + 1],
                    (size_t)(Q->nrd - i - 1) * sizeof(int));
            Q->nrd--;
            return;
        }
    }
}

void
m_drop_event(struct model *w, int mi)
{
    struct m_msg *m = &w->m[mi];

    if (m->ev >= 0) {
        w->ev[m->ev].used = false;
        m->ev = -1;
    }
}

/* mi leaves its queue for good (ack, drop, purge, cancel, delete). */
void
m_gone(struct model *w, int mi, bool record)
{
    struct m_msg *m = &w->m[mi];

    if (m->st == ST_READY) {
        m_unlink_ready(w, mi);
    } else if (m->st == ST_INFLIGHT && m->sub >= 0) {
        w->s[m->sub].held--;
    }
    m_drop_event(w, mi);
    m->st = ST_GONE;
    m->limbo = false;
    m->sub = -1;
    m->grp = 0;
    m->cancelled = false;
    m->cur.exists = false;
    if (record) {
        m_record(w, m);
    }
}

int
m_add_event(struct model *w, int mi, enum m_ev kind, int64_t lo, int64_t hi,
            uint32_t grp)
{
    for (int i = 0; i < M_MAXEV; i++) {
        if (!w->ev[i].used) {
            w->ev[i] = (struct m_event){true, mi, kind, lo, hi, grp};
            w->m[mi].ev = i;
            w->m[mi].st = kind == EV_LEASE ? ST_INFLIGHT : ST_TIMED;
            return 0;
        }
    }
    return m_fail(w, "model: too many timed events");
}

void
m_dead_letter(struct model *w, int mi, const char *reason, uint32_t grp)
{
    struct m_msg *m = &w->m[mi];
    int src = m->cur.q;
    int dst =
        w->q[src].a.dead_letter[0] ? m_qindex(w->q[src].a.dead_letter) : -1;
    struct m_dl d;

    memset(&d, 0, sizeof(d));
    snprintf(d.reason, sizeof(d.reason), "%s", reason);
    d.attempts = m->cur.attempt;
    d.q = src;
    snprintf(d.err, sizeof(d.err), "%s", m->cur.err);
    if (dst < 0 || !w->q[dst].exists || !m_room(w, dst, 1, m->len) ||
        m->cur.ndl >= M_MAXDL) {
        w->q[src].n.dropped++;
        m_gone(w, mi, true);
        m_reply(w, mi, src, reason, d.err, d.attempts, -1);
        return;
    }
    w->q[src].n.dead_lettered++;
    m->cur.q = dst;
    m->cur.attempt = 0;
    m->cur.failures = 0;
    m->cur.dl[m->cur.ndl++] = d;
    m->cur.err[0] = '\0';
    m->cur.dlong = false;
    m->cancelled = false;
    m->sub = -1;
    m->grp = grp;
    m_insert_back(w, dst, mi);
    m_record(w, m);
    m_reply(w, mi, src, reason, d.err, d.attempts, dst);
}

/* The highest message id the model knows. */
static uint64_t
max_id(const struct model *w)
{
    uint64_t id = 0;

    for (int i = 0; i < w->nm; i++) {
        id = w->m[i].id > id ? w->m[i].id : id;
    }
    return id;
}

void
m_made_by(struct model *w, int ni, int mi, int q)
{
    struct m_msg *n = &w->m[ni];

    n->cause = mi;
    n->cause_k = (uint8_t)(w->m[mi].np > 0 ? w->m[mi].np - 1 : 0);
    /* its id comes from the broker's counter after every id known now */
    n->ordkey = max_id(w) * 2 + 1;
    n->cur.q = q;
    n->cur.exists = false;
    m_record(w, n); /* the durable state: not there */
    n->cur.exists = true;
    m_record(w, n); /* written with the job's end */
    n->grp = 0;
    n->st = ST_READY;
    n->limbo = true; /* in its queue once its record is durable */
    n->mseq = w->lseq;
    w->q[q].n.published++;
    w->unpushed = true;
}

/* The result or notice that job mi's end sends to its reply_to: a new
 * message whose content is set, its state not yet. Returns its index, -1
 * when none is sent (no reply_to, or it is gone), or -1 with the model
 * failed (full). */
static int
reply_new(struct model *w, int mi, int src, const char *reason,
          const char *text, uint32_t attempt, int dl, int *rqp)
{
    const struct m_msg *j = &w->m[mi];
    int rq = j->rto[0] ? m_qindex(j->rto) : -1, ni;
    struct m_msg *n;
    uint8_t k = 0;
    char txt[sizeof(n->txt)], corr[sizeof(n->corr)];

#define HDR(key, ...)                                                          \
    do {                                                                       \
        snprintf(n->hk[k], sizeof(n->hk[k]), "%s", key);                       \
        snprintf(n->hv[k], sizeof(n->hv[k]), __VA_ARGS__);                     \
        k++;                                                                   \
    } while (0)
    if (rq < 0 || !w->q[rq].exists) {
        return -1; /* nobody asked, or the reply_to queue is gone */
    }
    ni = m_new_msg(w);
    if (ni < 0) {
        return m_fail(w, "model: too many messages for a reply");
    }
    j = &w->m[mi];
    n = &w->m[ni];
    snprintf(txt, sizeof(txt), "%s", text ? text : "");
    snprintf(corr, sizeof(corr), "%s", j->corr);
    n->made = reason ? MADE_NOTICE : MADE_RESULT;
    n->text = true;
    memcpy(n->txt, txt, sizeof(txt));
    n->len = (uint32_t)strlen(txt);
    n->prio = j->prio;
    memcpy(n->corr, corr, sizeof(corr));
    HDR("protoq-status", "%s", reason ? "failed" : "ok");
    HDR("protoq-job-id", "%" PRIu64, j->id);
    HDR("protoq-queue", "%s", m_qname(src));
    HDR("protoq-attempt", "%" PRIu32, attempt);
    if (corr[0]) {
        HDR("protoq-correlation-id", "%s", corr);
    }
    if (reason) {
        HDR("protoq-reason", "%s", reason);
        if (txt[0]) {
            HDR("protoq-error", "%s", txt);
        }
        if (dl >= 0) {
            HDR("protoq-dead-letter", "%s", m_qname(dl));
        }
    }
#undef HDR
    n->nh = k;
    n->cause = mi;
    *rqp = rq;
    return ni;
}

int
m_reply(struct model *w, int mi, int src, const char *reason, const char *text,
        uint32_t attempt, int dl)
{
    int rq, ni = reply_new(w, mi, src, reason, text, attempt, dl, &rq);

    if (ni < 0) {
        return -1;
    }
    if (reason) {
        w->n_notices++;
    } else {
        w->n_results++;
    }
    m_made_by(w, ni, mi, rq);
    return ni;
}

/*
 * Job mi's state p was running at a kill -9 whose records are in doubt,
 * and the start ends it (max_attempts): the notice that end sends may be
 * there or not (the job may as well have been in another state), so it is
 * made uncertain: pend[0] not there, pend[1] in reply_to. dl: where the
 * job went (-1 dropped). Not bound to the job's group (cause_k 0).
 */
void
m_proj_notice(struct model *w, int mi, const struct m_proj *before, int dl)
{
    int rq, ni = reply_new(w, mi, before->q, "max_attempts", before->err,
                           before->attempt, dl, &rq);
    struct m_msg *n;

    if (ni < 0) {
        return;
    }
    n = &w->m[ni];
    n->cause_k = 0;
    n->ordkey = max_id(w) * 2 + 1;
    memset(&n->pend[0], 0, sizeof(n->pend[0]));
    memset(&n->pend[1], 0, sizeof(n->pend[1]));
    n->pend[1].exists = true;
    n->pend[1].q = rq;
    n->np = 2;
    n->maybe_made = true; /* counted after restart_queues */
}

static uint64_t
backoff_hi(const struct model *w, int q, uint32_t failures)
{
    struct protoq_queue_attrs a;
    uint64_t d;

    m_effective(w, q, &a);
    if (a.backoff_base_ms == 0) {
        return 0;
    }
    d = a.backoff_base_ms;
    for (uint32_t k = 1; k < failures && d < a.backoff_cap_ms; k++) {
        d *= 2;
    }
    if (a.backoff_cap_ms != 0 && d > a.backoff_cap_ms) {
        d = a.backoff_cap_ms;
    }
    return d;
}

/* Back to ready after a failure or release: at once (front) or timed. */
static void
requeue(struct model *w, int mi, int64_t now, uint64_t lo, uint64_t hi,
        uint32_t grp)
{
    struct m_msg *m = &w->m[mi];

    m->sub = -1;
    m->cancelled = false;
    m->grp = grp;
    if (hi == 0) {
        m_insert_front(w, m->cur.q, mi);
    } else {
        m_add_event(w, mi, EV_READY_FRONT, now + (int64_t)lo, now + (int64_t)hi,
                    grp);
    }
    m_record(w, m);
}

void
m_fail_attempt(struct model *w, int mi, int64_t now, bool to_dl, bool has_delay,
               uint64_t delay, uint32_t grp, uint32_t dlgrp)
{
    struct m_msg *m = &w->m[mi];
    struct protoq_queue_attrs a;
    uint64_t hi;

    if (m->st == ST_INFLIGHT && m->sub >= 0) {
        w->s[m->sub].held--;
    }
    m->sub = -1;
    m_drop_event(w, mi);
    if (m->cancelled) {
        m_gone(w, mi, false);
        return;
    }
    m_effective(w, m->cur.q, &a);
    m->cur.failures++;
    if (to_dl) {
        m_dead_letter(w, mi, "nack", dlgrp);
    } else if (m->cur.failures >= a.max_attempts) {
        m_dead_letter(w, mi, "max_attempts", dlgrp);
    } else if (has_delay) {
        requeue(w, mi, now, delay, delay, 0);
    } else {
        hi = backoff_hi(w, m->cur.q, m->cur.failures);
        requeue(w, mi, now, hi / 2, hi, hi == 0 ? 0 : grp);
    }
}

/* Message mi (unlinked) was running at a kill -9: the start fails that
 * attempt as a lost consumer's (journal_resume). The broker returns them
 * in its delivery order, which the model may not know across
 * subscriptions: they share grp (dead letters dlgrp). */
void
m_interrupted(struct model *w, int mi, int64_t now, uint32_t grp,
              uint32_t dlgrp)
{
    struct m_msg *m = &w->m[mi];
    struct protoq_queue_attrs a;
    uint64_t hi;

    m->cur.running = false;
    m->sub = -1;
    m_effective(w, m->cur.q, &a);
    m->cur.failures++;
    if (m->cur.failures >= a.max_attempts) {
        m_dead_letter(w, mi, "max_attempts", dlgrp);
    } else {
        hi = backoff_hi(w, m->cur.q, m->cur.failures);
        requeue(w, mi, now, hi / 2, hi, grp);
    }
}

void
m_release_held(struct model *w, int mi)
{
    struct m_msg *m = &w->m[mi];

    if (m->sub >= 0) {
        w->s[m->sub].held--;
    }
    m_drop_event(w, mi);
    requeue(w, mi, 0, 0, 0, 0);
}

static int
held_cmp(const void *a, const void *b, void *arg)
{
    const struct model *w = arg;
    uint64_t x = w->m[*(const int *)a].dseq, y = w->m[*(const int *)b].dseq;

    return x < y ? -1 : x > y;
}

/* Held messages of subscription si in delivery order into out; count. */
static int
held_list(const struct model *w, int si, int *out)
{
    int n = 0;

    for (int i = 0; i < w->nm; i++) {
        if (w->m[i].st == ST_INFLIGHT && w->m[i].sub == si) {
            out[n++] = i;
        }
    }
    qsort_r(out, (size_t)n, sizeof(int), held_cmp, (void *)w);
    return n;
}

void
m_detach(struct model *w, int si, int64_t now, uint32_t grp, uint32_t dlgrp)
{
    static int held[M_MAXM];
    int n = held_list(w, si, held);

    /* Returned at once they keep their delivery order: push them to the
     * front from the last delivered to the first. Dead letters made here
     * share dlgrp (the broker's order among them is not specified). */
    for (int i = n - 1; i >= 0; i--) {
        m_fail_attempt(w, held[i], now, false, false, 0, grp, dlgrp);
    }
    if (w->q[w->s[si].q].sub == si) {
        w->q[w->s[si].q].sub = -1;
    }
    w->s[si].used = false;
}

static int
earliest_event(const struct model *w)
{
    int best = -1;

    for (int i = 0; i < M_MAXEV; i++) {
        if (w->ev[i].used && (best < 0 || w->ev[i].lo < w->ev[best].lo)) {
            best = i;
        }
    }
    return best;
}

bool
m_events_pending(const struct model *w)
{
    return earliest_event(w) >= 0;
}

int64_t
m_events_max_hi(const struct model *w)
{
    int64_t hi = 0;

    for (int i = 0; i < M_MAXEV; i++) {
        if (w->ev[i].used && w->ev[i].hi > hi) {
            hi = w->ev[i].hi;
        }
    }
    return hi;
}

bool
m_apply_one_event(struct model *w)
{
    int e = earliest_event(w);
    struct m_event ev;
    struct m_msg *m;

    if (e < 0) {
        return false;
    }
    ev = w->ev[e];
    m = &w->m[ev.m];
    w->ev[e].used = false;
    m->ev = -1;
    switch (ev.kind) {
    case EV_READY_BACK:
        m->grp = ev.grp;
        m_insert_back(w, m->cur.q, ev.m);
        break;
    case EV_READY_FRONT:
        m->grp = ev.grp;
        m_insert_front(w, m->cur.q, ev.m);
        break;
    case EV_EXPIRE:
        w->q[m->cur.q].n.expired++;
        m->st = ST_READY; /* not linked: dead-letter or drop unlinks nothing */
        if (w->q[m->cur.q].a.dead_letter_expired &&
            w->q[m->cur.q].a.dead_letter[0]) {
            m->st = ST_DLONG;
            m_dead_letter(w, ev.m, "expired", 0);
        } else {
            m->st = ST_DLONG;
            m_gone(w, ev.m, true);
            m_reply(w, ev.m, m->cur.q, "expired", m->cur.err, m->cur.attempt,
                    -1);
        }
        break;
    case EV_LEASE:
        m_fail_attempt(w, ev.m, ev.hi, false, false, 0, 0, 0);
        break;
    }
    return true;
}

void
m_apply_events_for(struct model *w, int mi)
{
    while (w->m[mi].ev >= 0 && m_apply_one_event(w)) {
    }
}

bool
m_eligible(const struct model *w, int si, int mi)
{
    const struct m_msg *m = &w->m[mi];
    uint8_t req = m->cur.ndl > 0 ? 0 : m->reqmask;

    return (req & ~w->s[si].tags) == 0;
}

/* Candidate ready positions for subscription si: [*from, *to) of rd, only
 * eligible members count. Returns false when none. */
static bool
candidates(const struct model *w, int si, int *from, int *to)
{
    const struct m_queue *Q = &w->q[w->s[si].q];

    for (int i = 0; i < Q->nrd; i++) {
        int mi = Q->rd[i];
        uint32_t g = w->m[mi].grp;
        int j = i + 1;

        if (g != 0) {
            /* a run of one group: any eligible member */
            int k = i;
            bool any = false;

            while (k < Q->nrd && w->m[Q->rd[k]].grp == g) {
                any |= m_eligible(w, si, Q->rd[k]);
                k++;
            }
            if (!any) {
                i = k - 1;
                continue;
            }
            *from = i;
            *to = k;
            return true;
        }
        if (m_eligible(w, si, mi)) {
            *from = i;
            *to = j;
            return true;
        }
    }
    return false;
}

uint32_t
m_owed(const struct model *w, int si)
{
    const struct m_sub *s = &w->s[si];
    const struct m_queue *Q;
    uint32_t credit, n = 0;

    if (!s->used || !w->q[s->q].exists || s->prefetch <= s->held) {
        return 0;
    }
    Q = &w->q[s->q];
    credit = s->prefetch - s->held;
    for (int i = 0; i < Q->nrd && n < credit; i++) {
        if (m_eligible(w, si, Q->rd[i])) {
            n++;
        }
    }
    return n;
}

void
m_headers_text(const struct model *w, const struct m_msg *m,
               const struct m_proj *p, char *buf, size_t cap)
{
    size_t n = 0;

    buf[0] = '\0';
    for (int i = 0; i < m->nh && n < cap; i++) {
        /* a notice made for a job whose id was not known then (a
         * follow-up): its id once known, else 0 (check_fields) */
        if (m->cause >= 0 && strcmp(m->hk[i], "protoq-job-id") == 0 &&
            strcmp(m->hv[i], "0") == 0) {
            n += (size_t)snprintf(buf + n, cap - n, "%s=%" PRIu64 ";", m->hk[i],
                                  w->m[m->cause].id);
            continue;
        }
        n += (size_t)snprintf(buf + n, cap - n, "%s=%s;", m->hk[i], m->hv[i]);
    }
    for (int i = 0; i < p->ndl && n < cap; i++) {
        const struct m_dl *d = &p->dl[i];

        n += (size_t)snprintf(buf + n, cap - n,
                              "x-death-reason=%s;x-death-attempts=%" PRIu32
                              ";x-death-queue=%s;",
                              d->reason, d->attempts, m_qname(d->q));
        if (d->err[0] && n < cap) {
            n +=
                (size_t)snprintf(buf + n, cap - n, "x-death-error=%s;", d->err);
        }
    }
}

/* Headers exp (with "protoq-job-id=0;": a notice of a job whose id the
 * model has not learnt, a follow-up of an unconfirmed ack) are got but for
 * that id. */
static bool
job_id_unknown_fits(const char *exp, const char *got)
{
    static const char key[] = "protoq-job-id=";
    const char *e = strstr(exp, "protoq-job-id=0;"), *g = strstr(got, key);
    size_t pre;

    if (e == NULL || g == NULL || (size_t)(g - got) != (size_t)(e - exp)) {
        return false;
    }
    pre = (size_t)(e - exp) + sizeof(key) - 1;
    if (strncmp(exp, got, pre) != 0) {
        return false;
    }
    got += pre + strspn(got + pre, "0123456789");
    return strcmp(exp + pre + 1, got) == 0;
}

static int
check_fields(struct model *w, const struct m_msg *m, const struct m_proj *p,
             const struct m_obs *o)
{
    static char exp[sizeof(o->hdrs)];
    static char buf[70000];

    if (o->len != m->len) {
        return m_fail(w, "message %" PRIu64 ": payload %u bytes, want %u",
                      m->id, o->len, m->len);
    }
    if (m->text) {
        memcpy(buf, m->txt, m->len);
    } else {
        m_payload(m->gen, m->len, buf);
    }
    if (o->hash != m_hash(buf, m->len)) {
        return m_fail(w, "message %" PRIu64 ": payload differs", m->id);
    }
    m_headers_text(w, m, p, exp, sizeof(exp));
    if (strcmp(exp, o->hdrs) != 0 && !job_id_unknown_fits(exp, o->hdrs)) {
        return m_fail(w, "message %" PRIu64 ": headers '%s', want '%s'", m->id,
                      o->hdrs, exp);
    }
    if (o->prio != m->prio || strcmp(o->corr, m->corr) != 0 ||
        strcmp(o->rto, m->rto) != 0 || strcmp(o->key, m->key) != 0) {
        return m_fail(w,
                      "message %" PRIu64
                      ": priority/correlation/reply_to/key %u/%s/%s/%s, "
                      "want %u/%s/%s/%s",
                      m->id, o->prio, o->corr, o->rto, o->key, m->prio, m->corr,
                      m->rto, m->key);
    }
    if (o->pg.has != p->pg.has ||
        (p->pg.has &&
         (o->pg.pct != p->pg.pct || strcmp(o->pg.text, p->pg.text) != 0 ||
          strcmp(o->pg.ckpt, p->pg.ckpt) != 0))) {
        return m_fail(w,
                      "message %" PRIu64
                      ": progress %d %u '%s' '%s', want %d %u '%s' '%s'",
                      m->id, o->pg.has, o->pg.pct, o->pg.text, o->pg.ckpt,
                      p->pg.has, p->pg.pct, p->pg.text, p->pg.ckpt);
    }
    if (o->attempt != p->attempt + 1) {
        return m_fail(w, "message %" PRIu64 ": attempt %u, want %u", m->id,
                      o->attempt, p->attempt + 1);
    }
    return 0;
}

static int
find_msg(const struct model *w, uint64_t id)
{
    for (int i = 0; i < w->nm; i++) {
        if (w->m[i].id == id) {
            return i;
        }
    }
    return -1;
}

/* check_fields without failing. */
static bool
fields_match(struct model *w, const struct m_msg *m, const struct m_proj *p,
             const struct m_obs *o)
{
    if (check_fields(w, m, p, o) == 0) {
        return true;
    }
    w->failed = false;
    w->err[0] = '\0';
    return false;
}

/* Could unbound message m (its id not known yet) be observation o from
 * queue q? */
static bool
unbound_fits(struct model *w, const struct m_msg *m, int q,
             const struct m_obs *o)
{
    if (m->id != 0 || m->cause < 0) {
        return false;
    }
    if (m->unc) {
        for (int k = m->np - 1; k >= 0; k--) {
            if (m->pend[k].exists && m->pend[k].q == q && !m->pend[k].dlong &&
                fields_match(w, m, &m->pend[k], o)) {
                return true;
            }
        }
        return false;
    }
    return m->st == ST_READY && m->cur.q == q && fields_match(w, m, &m->cur, o);
}

/* For whoever reads a failure: why no made message the model has unbound
 * is observation o. */
static void
why_unbound(struct model *w, const struct m_obs *o)
{
    for (int i = 0; i < w->nm; i++) {
        const struct m_msg *m = &w->m[i];

        if (m->id != 0 || m->cause < 0) {
            continue;
        }
        (void)check_fields(w, m, &m->cur, o);
        fprintf(stderr,
                "model: unbound m%d (made %d by m%d): state %d in %s%s, "
                "limbo %d: %s\n",
                i, m->made, m->cause, m->st, m_qname(m->cur.q),
                m->unc ? " (uncertain)" : "", m->limbo,
                w->err[0] ? w->err : "fields match");
        w->failed = false;
        w->err[0] = '\0';
    }
}

/* A delivery of an id the model does not know: a result, notice or
 * follow-up whose id it learns now. Prefer one the subscription may get
 * next; any other that fits gets the order checked (and fails). */
static int
bind_unbound(struct model *w, int si, const struct m_obs *o)
{
    const struct m_queue *Q = &w->q[w->s[si].q];
    int pick = -1;

    for (int i = 0; i < Q->nrd && pick < 0; i++) {
        if (unbound_fits(w, &w->m[Q->rd[i]], w->s[si].q, o)) {
            pick = Q->rd[i];
        }
    }
    for (int i = 0; i < w->nm && pick < 0; i++) {
        if (unbound_fits(w, &w->m[i], w->s[si].q, o)) {
            pick = i;
        }
    }
    if (pick >= 0) {
        w->m[pick].id = o->id;
        /* the ones made after it have higher ids (not those one start
         * pass made with it: their order is the broker's) */
        for (int i = pick + 1; i < w->nm; i++) {
            if (w->m[i].upass != 0 && w->m[i].upass == w->m[pick].upass) {
                continue;
            }
            if (w->m[i].id == 0 && w->m[i].ordkey < o->id * 2 + 1) {
                w->m[i].ordkey = o->id * 2 + 1;
            }
        }
    }
    return pick;
}

/* A delivery of a message whose state is uncertain (after a kill -9). */
static int
deliver_uncertain(struct model *w, int si, int mi, const struct m_obs *o)
{
    struct m_msg *m = &w->m[mi];
    int q = w->s[si].q;

    if (m->seen) {
        return m_fail(
            w, "message %" PRIu64 " delivered twice after the restart", m->id);
    }
    for (int k = m->np - 1; k >= 0; k--) {
        struct m_proj *p = &m->pend[k];

        if (!p->exists || p->q != q || p->dlong) {
            continue;
        }
        if (check_fields(w, m, p, o) == 0) {
            m->cur = *p;
            m->seen = true;
            m->rk = (int8_t)k;
            if (m->maybe_made) { /* it was published after all */
                m->maybe_made = false;
                w->q[q].n.pub_maybe--;
                w->q[q].n.published++;
            }
            m->unc = false;
            m->np = 1;
            m->pend[0] = *p;
            m->cur.attempt++;
            m->st = ST_INFLIGHT;
            m->sub = si;
            m->dseq = ++w->dseq;
            w->s[si].held++;
            if (m->cur.attempt > 1) {
                w->q[q].n.redelivered++;
            }
            m_record(w, m); /* its DELIVER */
            return 0;
        }
        /* try the next candidate */
        w->failed = false;
        w->err[0] = '\0';
    }
    /* for whoever reads the failure: each state, and why it does not fit */
    for (int k = 0; k < m->np; k++) {
        const struct m_proj *p = &m->pend[k];

        (void)check_fields(w, m, p, o);
        fprintf(stderr,
                "model: m%d state %d: exists %d in %s, attempt %u, "
                "failures %u, progress %d, running %d, delayed an hour %d: "
                "%s\n",
                mi, k, p->exists, m_qname(p->q), p->attempt, p->failures,
                p->pg.has, p->running, p->dlong, w->err);
        w->failed = false;
        w->err[0] = '\0';
    }
    return m_fail(w,
                  "message %" PRIu64
                  " delivered from %s (attempt %u) matches none of "
                  "the %u states the log may hold for it",
                  m->id, m_qname(q), o->attempt, m->np);
}

static int deliver(struct model *w, int si, const struct m_obs *o);

/* One try at matching a delivery against the model as it is now. */
static int
deliver_now(struct model *w, int si, int mi, const struct m_obs *o)
{
    struct m_sub *s = &w->s[si];
    struct m_queue *Q = &w->q[s->q];
    struct m_msg *m = &w->m[mi];
    int from, to, at = -1;

    if (s->held >= s->prefetch) {
        return m_fail(w, "delivery of %" PRIu64 " beyond the prefetch %u of %s",
                      o->id, s->prefetch, o->queue);
    }
    if (!candidates(w, si, &from, &to)) {
        return m_fail(w,
                      "delivery of %" PRIu64
                      " (attempt %u) from %s, but nothing is ready "
                      "for it (message state %d in %s)",
                      o->id, o->attempt, o->queue, m->st, m_qname(m->cur.q));
    }
    for (int i = from; i < to; i++) {
        if (Q->rd[i] == mi && m_eligible(w, si, mi)) {
            at = i;
        }
    }
    if (at < 0) {
        /* what the model has there, for whoever reads the failure */
        for (int i = 0; i < Q->nrd; i++) {
            const struct m_msg *x = &w->m[Q->rd[i]];

            fprintf(stderr,
                    "model: %s ready[%d]: id %" PRIu64
                    " (0: made, not seen yet) made %d by m%d, %u bytes, "
                    "prio %u, group %u\n",
                    m_qname(s->q), i, x->id, x->made, x->cause, x->len, x->prio,
                    x->grp);
        }
        return m_fail(w,
                      "delivery of %" PRIu64
                      " (attempt %u) from %s, want %" PRIu64
                      " (attempt %u)%s; its state %d in %s",
                      o->id, o->attempt, o->queue, w->m[Q->rd[from]].id,
                      w->m[Q->rd[from]].cur.attempt + 1,
                      to - from > 1 ? " or another of its group" : "", m->st,
                      m_qname(m->cur.q));
    }
    if (check_fields(w, m, &m->cur, o) != 0) {
        return -1;
    }
    m_unlink_ready(w, mi);
    m->cur.attempt++;
    m->st = ST_INFLIGHT;
    m->sub = si;
    m->grp = 0;
    m->dseq = ++w->dseq;
    s->held++;
    if (m->cur.attempt > 1) {
        Q->n.redelivered++;
    }
    m_record(w, m); /* its DELIVER */
    return 0;
}

int
m_deliver(struct model *w, int si, const struct m_obs *o)
{
    int rc = deliver(w, si, o);
    int mi = rc == 0 ? find_msg(w, o->id) : -1;

    if (mi >= 0 && !w->m[mi].checked) {
        /* what a job's end made, checked at its first delivery */
        w->m[mi].checked = true;
        w->seen_results += w->m[mi].made == MADE_RESULT;
        w->seen_notices += w->m[mi].made == MADE_NOTICE;
        w->seen_follow_ups += w->m[mi].made == MADE_FOLLOW_UP;
    }
    return rc;
}

/* m_deliver without the counting. */
static int
deliver(struct model *w, int si, const struct m_obs *o)
{
    struct m_sub *s = &w->s[si];
    int mi = find_msg(w, o->id);

    if (strcmp(o->queue, m_qname(s->q)) != 0) {
        return m_fail(
            w, "delivery of %" PRIu64 " names queue %s, subscription is on %s",
            o->id, o->queue, m_qname(s->q));
    }
    /* a notice made by a timed event the model has not applied yet */
    mi = mi < 0 ? bind_unbound(w, si, o) : mi;
    while (mi < 0 && m_events_pending(w)) {
        m_apply_one_event(w);
        mi = bind_unbound(w, si, o);
    }
    if (mi < 0) {
        why_unbound(w, o);
        return m_fail(w,
                      "delivery of unknown message %" PRIu64
                      " from %s (%u bytes, headers '%s')",
                      o->id, o->queue, o->len, o->hdrs);
    }
    if (w->m[mi].unc) {
        return deliver_uncertain(w, si, mi, o);
    }
    if (w->m[mi].limbo) {
        limbo_link(w, mi); /* the broker pushed it: it is in its queue */
    }
    m_apply_events_for(w, mi);
    /* A timed event (a lease that ended, a delay) may have happened before
     * this delivery without the model knowing yet: apply them in order
     * until the delivery fits, or none is left. */
    for (;;) {
        if (deliver_now(w, si, mi, o) == 0) {
            return 0;
        }
        if (!m_events_pending(w)) {
            return -1;
        }
        w->failed = false;
        w->err[0] = '\0';
        m_apply_one_event(w);
    }
}

void
m_gauges(const struct model *w, int q, uint64_t *ready, uint64_t *delayed,
         uint64_t *inflight, uint64_t *bytes)
{
    *ready = *delayed = *inflight = *bytes = 0;
    for (int i = 0; i < w->nm; i++) {
        const struct m_msg *m = &w->m[i];

        if (!live_in(m, q)) {
            continue;
        }
        *bytes += m->len;
        switch (m->st) {
        case ST_READY:
            (*ready)++;
            break;
        case ST_DLONG:
        case ST_TIMED:
            (*delayed)++;
            break;
        case ST_INFLIGHT:
            (*inflight)++;
            break;
        default:
            break;
        }
    }
}
