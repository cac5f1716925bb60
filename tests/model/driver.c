/*
 * driver.c: connections, deliveries, settling, observation and restarts
 * of the model-based restart test (see check_model.c, driver.h).
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "driver.h"
#include "powerloss.h"

struct hist *g_h;
const char *g_pl_journal;
static struct m_obs g_obs[MAX_OBS];
static int g_nobs;
static bool g_obs_overflow;

/* ---------------------------------------------------------------- utils */

uint64_t
rnd(struct hist *h)
{
    uint64_t x = h->rng;

    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    h->rng = x;
    return x * 2685821657736338717ULL;
}

uint32_t
rn(struct hist *h, uint32_t n)
{
    return n == 0 ? 0 : (uint32_t)(rnd(h) % n);
}

bool
chance(struct hist *h, uint32_t pct)
{
    return rn(h, 100) < pct;
}

void
oplog(struct hist *h, const char *fmt, ...)
{
    va_list ap;

    if (h->nlog >= MAX_OPS) {
        return;
    }
    va_start(ap, fmt);
    vsnprintf(h->log[h->nlog], sizeof(h->log[0]), fmt, ap);
    va_end(ap);
    if (h->verbose) {
        fprintf(stderr, "  [%d] %s\n", h->nops, h->log[h->nlog]);
    }
    h->nlog++;
}

bool
failed(const struct hist *h)
{
    return h->w.failed;
}

/* A call answered other than the model said. */
int
unexpected(struct hist *h, int ci, const char *what, int rc, const char *want)
{
    return m_fail(
        &h->w, "%s: got %s (%d) code %s \"%s\", model wants %s", what,
        pq_strerror(rc), rc,
        h->c[ci].c ? protoq_code_name(protoq_last_error_code(h->c[ci].c)) : "-",
        h->c[ci].c ? protoq_errmsg(h->c[ci].c) : "", want);
}

bool
remote_is(const struct hist *h, int ci, int rc, int code)
{
    return rc == PQ_EREMOTE && protoq_last_error_code(h->c[ci].c) == code;
}

/* ---------------------------------------------------------- connections */

void
on_deliver(void *arg, protoq_client *c, const struct protoq_delivery *d)
{
    struct m_obs *o;
    size_t n = 0;

    (void)c;
    if (g_nobs >= MAX_OBS) {
        g_obs_overflow = true;
        return;
    }
    o = &g_obs[g_nobs++];
    memset(o, 0, sizeof(*o));
    o->conn = (int)(intptr_t)arg;
    o->sid = d->subscription_id;
    snprintf(o->queue, sizeof(o->queue), "%s", d->queue);
    o->id = d->message_id;
    o->attempt = d->attempt;
    o->len = (uint32_t)d->len;
    o->hash = m_hash(d->payload, d->len);
    for (size_t i = 0; i < d->n_headers && n < sizeof(o->hdrs); i++) {
        n += (size_t)snprintf(o->hdrs + n, sizeof(o->hdrs) - n, "%s=%s;",
                              d->headers[i].key, d->headers[i].value);
    }
    o->prio = d->priority;
    snprintf(o->corr, sizeof(o->corr), "%s", d->correlation_id);
    snprintf(o->rto, sizeof(o->rto), "%s", d->reply_to);
    snprintf(o->key, sizeof(o->key), "%s", d->idempotency_key);
    o->pg.has = d->has_progress;
    if (d->has_progress) {
        o->pg.pct = d->progress.percent;
        snprintf(o->pg.text, sizeof(o->pg.text), "%s", d->progress.text);
        snprintf(o->pg.ckpt, sizeof(o->pg.ckpt), "%s", d->progress.checkpoint);
    }
}

static void
on_cancel(void *arg, protoq_client *c, const char *queue, uint64_t id,
          uint32_t attempt)
{
    (void)c;
    (void)queue;
    (void)id;
    (void)attempt;
    g_h->c[(int)(intptr_t)arg].cancels++;
}

int
conn_get(struct hist *h, int ci)
{
    struct protoq_opts o;
    int rc;

    if (h->c[ci].c != NULL) {
        return 0;
    }
    memset(&o, 0, sizeof(o));
    o.client_name = "model";
    o.io_timeout_ms = 30000;
    rc = protoq_connect(h->srv.addr, &o, &h->c[ci].c);
    if (rc != PQ_OK) {
        m_fail(&h->w, "connect %s: %s: %s", h->srv.addr, pq_strerror(rc),
               h->c[ci].c ? protoq_errmsg(h->c[ci].c) : "");
        protoq_close(h->c[ci].c);
        h->c[ci].c = NULL;
        return -1;
    }
    protoq_set_cancel_cb(h->c[ci].c, on_cancel, (void *)(intptr_t)ci);
    h->c[ci].async_errs = 0;
    h->c[ci].cancels = 0;
    return 0;
}

void
conn_drop(struct hist *h, int ci)
{
    protoq_close(h->c[ci].c);
    h->c[ci].c = NULL;
}

static int
find_sub(const struct model *w, int conn, uint64_t sid)
{
    for (int i = 0; i < M_NS; i++) {
        if (w->s[i].used && w->s[i].conn == conn && w->s[i].sid == sid) {
            return i;
        }
    }
    return -1;
}

/* Feed every buffered delivery to the model. */
int
process_obs(struct hist *h)
{
    for (int i = 0; i < g_nobs && !failed(h); i++) {
        int si = find_sub(&h->w, g_obs[i].conn, g_obs[i].sid);

        if (si < 0) {
            m_fail(&h->w,
                   "delivery of %" PRIu64 " for subscription %" PRIu64
                   " on connection %d, which the model does not have",
                   g_obs[i].id, g_obs[i].sid, g_obs[i].conn);
            break;
        }
        m_deliver(&h->w, si, &g_obs[i]);
    }
    g_nobs = 0;
    if (g_obs_overflow) {
        g_obs_overflow = false;
        return m_fail(&h->w, "test: too many deliveries buffered");
    }
    return failed(h) ? -1 : 0;
}

/* Poll every open connection (except skip) once; errors fail. */
int
poll_all(struct hist *h, int timeout_ms, int skip)
{
    for (int ci = 0; ci < M_NC; ci++) {
        int rc;

        if (h->c[ci].c == NULL || ci == skip) {
            continue;
        }
        rc = protoq_poll(h->c[ci].c, timeout_ms);
        if (rc < 0) {
            return unexpected(h, ci, "poll", rc, "an open connection");
        }
    }
    return process_obs(h);
}

/* Sleep until mono time t while keeping the connections alive. */
int
sleep_polling(struct hist *h, int64_t t, int skip)
{
    while (!failed(h) && now_ms_mono() < t) {
        int64_t left = t - now_ms_mono();

        if (poll_all(h, left > 2 ? 2 : (int)left, skip) != 0) {
            return -1;
        }
    }
    return failed(h) ? -1 : 0;
}

/* Until the broker has pushed every delivery the model expects. */
int
settle(struct hist *h)
{
    int64_t deadline = now_ms_mono() + 5000;

    for (;;) {
        uint32_t owed = 0;
        int who = -1;

        if (poll_all(h, 0, -1) != 0) {
            return -1;
        }
        for (int si = 0; si < M_NS; si++) {
            uint32_t o = m_owed(&h->w, si);

            if (o > 0) {
                owed += o;
                who = si;
            }
        }
        if (owed == 0) {
            break;
        }
        if (now_ms_mono() > deadline) {
            return m_fail(&h->w,
                          "the broker still owes %u deliveries (e.g. to the "
                          "subscription on %s) after 5 s",
                          owed, m_qname(h->w.s[who].q));
        }
        if (poll_all(h, 2, -1) != 0) {
            return -1;
        }
    }
    /* anything more now is a delivery the model does not expect */
    return poll_all(h, 1, -1);
}

/* ---------------------------------------------------------- observation */

int
stat_queue(struct hist *h, int ci, int q, struct protoq_queue_info *qi)
{
    int rc;

    if (conn_get(h, ci) != 0) {
        return -1;
    }
    rc = protoq_queue_stat(h->c[ci].c, m_qname(q), qi);
    if (rc != PQ_OK) {
        return unexpected(h, ci, "stat", rc, "PQ_OK");
    }
    return 0;
}

/* Compare queue q's gauges (and counters when counters) with the model;
 * retry for up to retry_ms while the broker may still be catching up. */
int
check_queue(struct hist *h, int q, bool counters, int retry_ms)
{
    struct model *w = &h->w;
    int64_t deadline = now_ms_mono() + retry_ms;
    struct protoq_queue_info qi;
    uint64_t r, d, f, b;

    for (;;) {
        struct m_counters *n = &w->q[q].n;

        if (stat_queue(h, 0, q, &qi) != 0 || process_obs(h) != 0) {
            return -1;
        }
        m_gauges(w, q, &r, &d, &f, &b);
        if (qi.ready == r && qi.delayed == d && qi.inflight == f &&
            qi.bytes == b && qi.consumers == (uint64_t)(w->q[q].sub >= 0)) {
            if (!counters ||
                (qi.published >= n->published &&
                 qi.published <= n->published + n->pub_maybe &&
                 qi.acked == n->acked && qi.nacked == n->nacked &&
                 qi.redelivered == n->redelivered && qi.expired == n->expired &&
                 qi.dead_lettered == n->dead_lettered &&
                 qi.dropped == n->dropped)) {
                return 0;
            }
        }
        if (now_ms_mono() >= deadline) {
            break;
        }
        if (sleep_polling(h, now_ms_mono() + 3, -1) != 0) {
            return -1;
        }
    }
    return m_fail(
        w,
        "stat %s: ready/delayed/inflight/bytes/consumers %" PRIu64 "/%" PRIu64
        "/%" PRIu64 "/%" PRIu64 "/%" PRIu64 ", model %" PRIu64 "/%" PRIu64
        "/%" PRIu64 "/%" PRIu64
        "/%d; counters published/acked/nacked/redelivered/expired/"
        "dead_lettered/dropped %" PRIu64 "/%" PRIu64 "/%" PRIu64 "/%" PRIu64
        "/%" PRIu64 "/%" PRIu64 "/%" PRIu64 ", model %" PRIu64 "/%" PRIu64
        "/%" PRIu64 "/%" PRIu64 "/%" PRIu64 "/%" PRIu64 "/%" PRIu64,
        m_qname(q), qi.ready, qi.delayed, qi.inflight, qi.bytes, qi.consumers,
        r, d, f, b, w->q[q].sub >= 0, qi.published, qi.acked, qi.nacked,
        qi.redelivered, qi.expired, qi.dead_lettered, qi.dropped,
        w->q[q].n.published, w->q[q].n.acked, w->q[q].n.nacked,
        w->q[q].n.redelivered, w->q[q].n.expired, w->q[q].n.dead_lettered,
        w->q[q].n.dropped);
}

/* Let every timed event of the last operation happen, then settle. */
int
flush_events(struct hist *h)
{
    struct model *w = &h->w;
    bool touched[M_NQ] = {false};

    if (!m_events_pending(w)) {
        return settle(h);
    }
    for (int i = 0; i < M_MAXEV; i++) {
        if (w->ev[i].used) {
            touched[w->m[w->ev[i].m].cur.q] = true;
        }
    }
    if (sleep_polling(h, m_events_max_hi(w) + 8, -1) != 0) {
        return -1;
    }
    while (m_apply_one_event(w)) {
        if (settle(h) != 0) {
            return -1;
        }
    }
    if (settle(h) != 0) {
        return -1;
    }
    for (int q = 0; q < M_NQ; q++) {
        /* dead letters may have moved to another queue: check them all */
        if ((touched[q] || w->q[q].exists) && w->q[q].exists &&
            check_queue(h, q, false, 1500) != 0) {
            return -1;
        }
    }
    return 0;
}

/* -------------------------------------------------------------- restart */

/* Everything every connection sent has been handled and is durable. */
static int
barrier(struct hist *h)
{
    struct protoq_message pm;
    uint64_t n;
    int rc;

    for (int ci = 0; ci < M_NC; ci++) {
        if (h->c[ci].c != NULL && roundtrip(h, ci) != 0) {
            return -1;
        }
    }
    if (process_obs(h) != 0 || conn_get(h, 0) != 0) {
        return -1;
    }
    memset(&pm, 0, sizeof(pm));
    pm.payload = "sync";
    pm.len = 4;
    rc = protoq_queue_purge(h->c[0].c, "zsync", &n);
    if (rc == PQ_OK) {
        rc = protoq_publish(h->c[0].c, "zsync", &pm, NULL);
    }
    if (rc != PQ_OK) {
        return unexpected(h, 0, "barrier publish", rc, "PQ_OK");
    }
    if (process_obs(h) != 0) {
        return -1;
    }
    m_durable(&h->w);
    return 0;
}

/* Results and notices are pushed once their record is durable: make sure
 * they are (a confirmed publish is answered after every earlier wait), and
 * delivered where the model says, before an operation that sees a queue's
 * contents, room or consumers. */
int
sync_pushes(struct hist *h)
{
    if (!h->w.unpushed) {
        return 0;
    }
    if (publish_sync(h) != 0 || sync_observed(h) != 0) {
        return -1;
    }
    /* and a subscription on their queue has them before anything else */
    return settle(h);
}

/* take (process_obs or settle) the deliveries that came with a confirm,
 * then everything written before it is durable. The broker may have
 * written their records after the fsync (a result pushed once durable):
 * a sync window (m_sync_window). */
static int
observe_durable(struct hist *h, int (*take)(struct hist *))
{
    int rc;

    m_sync_window(&h->w, true);
    rc = take(h);
    if (rc == 0) {
        m_durable(&h->w);
    }
    m_sync_window(&h->w, false);
    return rc;
}

/*
 * The confirm of a job's end (AckOk, a nack's Ok) came: what the end made
 * (a result, notice, follow-ups) is in its queues now, pushed before the
 * confirm was sent. But the end freed its holder's credit at once, and a
 * delivery the broker chose then, before the push, may come after the
 * confirm (a payload read back from disk is sent once read): take every
 * delivery the model owes without the made messages first (one of those,
 * delivered instead, is linked by its delivery).
 */
int
push_after_ok(struct hist *h)
{
    return observe_durable(h, settle);
}

/* After a confirm: the deliveries that came before it, then everything
 * written before it is durable. */
int
sync_observed(struct hist *h)
{
    return observe_durable(h, process_obs);
}

/* A confirmed publish to the harness's queue on connection 0: every record
 * written before it is durable once it returns. */
int
publish_sync(struct hist *h)
{
    struct protoq_message pm;
    int rc;

    if (conn_get(h, 0) != 0) {
        return -1;
    }
    memset(&pm, 0, sizeof(pm));
    pm.payload = "sync";
    pm.len = 4;
    rc = protoq_publish(h->c[0].c, "zsync", &pm, NULL);
    return rc == PQ_OK ? 0 : unexpected(h, 0, "sync publish", rc, "PQ_OK");
}

void
drop_all_conns(struct hist *h)
{
    for (int ci = 0; ci < M_NC; ci++) {
        conn_drop(h, ci);
    }
    g_nobs = 0;
}

static int
launch(struct hist *h)
{
    int64_t t0 = now_ms_mono();
    int rc = srv_launch(&h->srv);

    h->launch_ms += now_ms_mono() - t0;
    h->launches++;
    if (rc != 0) {
        return m_fail(&h->w, "protoqd did not start again (log in %s)",
                      h->srv.dir);
    }
    return 0;
}

/* Ack everything drain subscription si (on DRAIN_CONN) holds, and the
 * results those acks put into its own queue, until it holds nothing. A
 * result goes to the back of its queue once the ack is durable: a
 * confirmed publish makes sure before the model pushes it. resolving:
 * after a bare kill -9, where nothing else may be taken as durable. */
int
ack_held(struct hist *h, int si, bool resolving)
{
    struct model *w = &h->w;
    int q = w->s[si].q;

    for (int round = 0; round < 3; round++) {
        int n = 0;

        for (int i = 0; i < w->nm; i++) {
            struct m_msg *m = &w->m[i];

            if (m->st != ST_INFLIGHT || m->sub != si) {
                continue;
            }
            if (protoq_ack(h->c[DRAIN_CONN].c, m->id, m->cur.attempt) !=
                PQ_OK) {
                return unexpected(h, DRAIN_CONN, "drain ack", -1, "PQ_OK");
            }
            w->q[q].n.acked++;
            m_gone(w, i, !resolving);
            if (resolving) {
                m->np = 1;
                m->pend[0] = m->cur;
            }
            m_reply(w, i, q, NULL, "", m->cur.attempt, -1);
            n++;
        }
        if (n == 0) {
            return 0;
        }
        if (expect_async(h, DRAIN_CONN, 0, "drain acks") != 0 ||
            publish_sync(h) != 0 || process_obs(h) != 0) {
            return -1;
        }
        m_push_limbo(w);
        if (settle(h) != 0) {
            return -1;
        }
    }
    return m_fail(w, "drain %s: results keep coming", m_qname(q));
}

/* After a kill -9 without a barrier: drain every queue, accepting for each
 * message any state the log may hold, then purge what is delayed. */
static int
resolve_uncertain(struct hist *h)
{
    struct model *w = &h->w;

    /* What the start wrote (a running job's failed attempt, its notice) is
     * pushed once durable: a confirmed publish makes it so. */
    if (publish_sync(h) != 0 || sleep_polling(h, now_ms_mono() + 60, -1) != 0) {
        return -1;
    }
    for (int q = 0; q < M_NQ; q++) {
        struct protoq_queue_info qi;
        int si;
        uint64_t n = 0, dmin = 0, dmax = 0;
        int64_t deadline;

        if (!w->q[q].exists) {
            continue;
        }
        if (stat_queue(h, 0, q, &qi) != 0 ||
            subscribe(h, DRAIN_CONN, q, 100000, (1u << M_NTAGS) - 1) != 0) {
            return -1;
        }
        si = w->q[q].sub;
        deadline = now_ms_mono() + 5000;
        while (w->s[si].held < qi.ready) {
            if (now_ms_mono() > deadline) {
                return m_fail(w,
                              "after kill -9: %s shows %" PRIu64
                              " ready, %u delivered",
                              m_qname(q), qi.ready, w->s[si].held);
            }
            if (poll_all(h, 2, -1) != 0) {
                return -1;
            }
        }
        if (poll_all(h, 2, -1) != 0) {
            return -1;
        }
        if (ack_held(h, si, true) != 0) {
            return -1;
        }
        m_detach(w, si, 0, 0, 0);
        conn_drop(h, DRAIN_CONN);
        /* delayed (an hour): only how many */
        for (int i = 0; i < w->nm; i++) {
            struct m_msg *m = &w->m[i];
            bool can_be = false, must_be = m->unc;

            if (!m->unc) {
                continue;
            }
            for (int k = 0; k < m->np; k++) {
                bool here =
                    m->pend[k].exists && m->pend[k].q == q && m->pend[k].dlong;

                can_be |= here;
                must_be &= here;
            }
            dmin += must_be;
            dmax += can_be;
        }
        if (qi.delayed < dmin || qi.delayed > dmax) {
            return m_fail(w,
                          "after kill -9: %s shows %" PRIu64
                          " delayed, model %" PRIu64 "..%" PRIu64,
                          m_qname(q), qi.delayed, dmin, dmax);
        }
        if (protoq_queue_purge(h->c[0].c, m_qname(q), &n) != PQ_OK ||
            n != qi.delayed) {
            return m_fail(w,
                          "after kill -9: purge %s removed %" PRIu64
                          ", stat said %" PRIu64,
                          m_qname(q), n, qi.delayed);
        }
        /* A message whose TTL ended before the kill but whose DROP or
         * DEAD_LETTER record was not durable expires again at the start:
         * these counters depend on which records survived. */
        if (stat_queue(h, 0, q, &qi) != 0) {
            return -1;
        }
        w->q[q].n.expired = qi.expired;
        w->q[q].n.dead_lettered = qi.dead_lettered;
        w->q[q].n.dropped = qi.dropped;
    }
    /* a job's end and what it made are one record: all or nothing */
    if (m_check_groups(w) != 0) {
        return -1;
    }
    /* every message not seen must have a state in which it is gone (or
     * delayed, now purged) */
    for (int i = 0; i < w->nm; i++) {
        struct m_msg *m = &w->m[i];
        bool ok = false;

        if (!m->unc) {
            continue;
        }
        for (int k = 0; k < m->np; k++) {
            ok |=
                !m->pend[k].exists || m->pend[k].dlong || m->pend[k].maybe_gone;
        }
        if (!ok) {
            return m_fail(w,
                          "after kill -9: message %" PRIu64
                          " (%s) is lost: every record "
                          "the log may hold keeps it",
                          m->id, m_qname(m->pend[m->np - 1].q));
        }
        /* its key: the answer depends on what the log held */
        if (m->key[0]) {
            for (int k = 0; k < m->np; k++) {
                struct m_queue *Q = &w->q[m->pend[k].q];

                if (m->pend[k].exists && find_key(Q, m->key) < 0) {
                    m_add_key(Q, m->key, -1);
                }
            }
        }
        m->unc = false;
        m->st = ST_GONE;
        m->cur.exists = false;
        m->np = 1;
        m->pend[0] = m->cur;
    }
    return 0;
}

/* power_loss: after the kill -9, leave the data dir as a power loss
 * would have (what no fsync covered undone, in part or torn), seeded by
 * the history's seed and the restart's number. */
static int
power_loss(struct hist *h)
{
    unsigned seed = (unsigned)(h->seed * 2654435761u) + (unsigned)h->restarts;
    struct pl_result r = {0};
    char err[300];

    h->power_losses++;
    if (getenv("MODEL_KEEP") != NULL) {
        /* debugging: the journal of each power loss */
        char cmd[800];

        snprintf(cmd, sizeof(cmd), "cp %s %s/pl.journal.restart%d",
                 g_pl_journal, h->srv.dir, h->restarts);
        if (system(cmd) != 0) {
            return m_fail(&h->w, "%s failed", cmd);
        }
    }
    if (pl_apply(g_pl_journal, seed, false, &r, err, sizeof(err)) != 0) {
        return m_fail(&h->w, "power loss: %s", err);
    }
    oplog(h,
          "  (power loss: of %ld journal records, %ld unsynced: %ld undone, "
          "%ld torn; %ld files vanished, %ld came back)",
          r.records, r.unsynced, r.undone, r.torn, r.vanished, r.revived);
    h->pl.records += r.records;
    h->pl.unsynced += r.unsynced;
    h->pl.undone += r.undone;
    h->pl.torn += r.torn;
    h->pl.vanished += r.vanished;
    h->pl.revived += r.revived;
    return 0;
}

/* kind: 0 kill -9 after a barrier, 1 bare kill -9, 2 SIGTERM, 3 power
 * loss (a bare kill -9 whose unsynced writes are then undone; a bare kill
 * -9 when the test build protoqd-pl is missing). */
int
op_restart(struct hist *h, int kind)
{
    struct model *w = &h->w;
    int64_t launch_ms;
    int rc;

    if (kind == 3 && g_pl_journal == NULL) {
        kind = 1;
    }
    if (kind == 2 && (h->avoid & AV_KEYED_REQUEUE)) {
        for (int ci = 0; ci < M_NC; ci++) {
            if (conn_holds_keyed(h, ci)) {
                kind = 0;
            }
        }
    }
    oplog(h, "restart: %s",
          kind == 0   ? "barrier + kill -9"
          : kind == 1 ? "kill -9"
          : kind == 2 ? "SIGTERM"
                      : "power loss");
    h->restarts++;
    if (kind == 0 && barrier(h) != 0) {
        return -1;
    }
    /* What an unconfirmed job end made is pushed when its record is
     * durable, maybe to a subscription that has it unread when the SIGTERM
     * comes, and the clean stop then keeps that delivery's attempt: take
     * those deliveries first (a limbo message's attempt at a clean stop is
     * otherwise one of two). */
    if (kind == 2 && sync_pushes(h) != 0) {
        return -1;
    }
    if (kind == 2) {
        rc = srv_stop(&h->srv);
        if (rc != 0) {
            return m_fail(w, "SIGTERM: protoqd exited with %d", rc);
        }
    } else {
        srv_kill9(&h->srv);
    }
    drop_all_conns(h);
    if (kind == 3 && power_loss(h) != 0) {
        return -1;
    }
    if (getenv("MODEL_KEEP") != NULL) {
        /* debugging: the data dir as each restart found it */
        char cmd[800];

        snprintf(cmd, sizeof(cmd), "cp -a %s %s/data.restart%d",
                 h->srv.data_dir, h->srv.dir, h->restarts);
        if (system(cmd) != 0) {
            return m_fail(w, "%s failed", cmd);
        }
    }
    if (launch(h) != 0) {
        return -1;
    }
    /* the start's backoff of interrupted jobs ended no later than this
     * plus the backoff: the model's window ends there */
    launch_ms = now_ms_mono();
    if (kind == 3) {
        m_power_loss(w);
    }
    if (kind == 1 || kind == 3) {
        /* With fsync always, whatever was confirmed was fsynced: a power
         * loss promises what a bare kill -9 does, except for what a sync
         * window took as durable (m_power_loss). */
        m_restart_uncertain(w);
        if (resolve_uncertain(h) != 0) {
            return -1;
        }
        m_rebuild_keys(w);
        return 0;
    }
    m_restart(w, kind == 2, launch_ms);
    return 0;
}
