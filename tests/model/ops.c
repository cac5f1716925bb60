/*
 * ops.c: the operations of the model-based restart test (see
 * check_model.c, driver.h): each does one thing to the broker and checks
 * the answer against the model, which it updates.
 */
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "driver.h"

/* --------------------------------------------------------------- queues */

static const char *
ids_text(const struct model *w, int q)
{
    static char buf[512];
    size_t n = 0;

    buf[0] = '\0';
    for (int i = 0; i < w->q[q].nrd && n < sizeof(buf) - 24; i++) {
        n += (size_t)snprintf(buf + n, sizeof(buf) - n, " %" PRIu64,
                              w->m[w->q[q].rd[i]].id);
    }
    return buf;
}

static void
gen_attrs(struct hist *h, int q, struct protoq_queue_attrs *a)
{
    memset(a, 0, sizeof(*a));
    a->transient = chance(h, 15);
    if (chance(h, 25)) {
        a->max_length = 3 + rn(h, 12);
    }
    if (chance(h, 15)) {
        a->max_bytes = 2000 + rn(h, 20000);
    }
    switch (rn(h, 3)) {
    case 0:
        break; /* broker default (30 s) */
    case 1:
        a->ack_timeout_ms = 20000;
        break;
    default:
        a->ack_timeout_ms = 60000;
    }
    a->max_attempts = rn(h, 4); /* 0 = default (3) */
    switch (rn(h, 4)) {
    case 0:
        a->no_backoff = true;
        break;
    case 1:
        a->backoff_base_ms = 2 + rn(h, 4);
        a->backoff_cap_ms = a->backoff_base_ms + rn(h, 8);
        break;
    default:
        break; /* broker default: 4 ms .. 12 ms */
    }
    if (chance(h, 20)) {
        a->ttl_ms = 86400000;
    }
    if (chance(h, 10)) {
        a->max_lease_ms = 3600000;
    }
    if (chance(h, 60)) {
        /* dead letters go to a higher slot, so chains end */
        int d = q + 1 + (int)rn(h, (uint32_t)(M_NQ - q));

        if (d < M_NQ && (h->w.q[d].exists || !(h->avoid & AV_DLQ_MISSING))) {
            snprintf(a->dead_letter, sizeof(a->dead_letter), "%s", m_qname(d));
            a->dead_letter_expired = chance(h, 50);
        }
    }
}

static bool
attrs_same(const struct model *w, int q, const struct protoq_queue_attrs *b)
{
    struct protoq_queue_attrs a;

    m_effective(w, q, &a);
    return a.transient == b->transient && a.max_length == b->max_length &&
           a.max_bytes == b->max_bytes &&
           a.ack_timeout_ms == b->ack_timeout_ms &&
           a.max_attempts == b->max_attempts &&
           strcmp(a.dead_letter, b->dead_letter) == 0 &&
           a.backoff_base_ms == b->backoff_base_ms &&
           a.backoff_cap_ms == b->backoff_cap_ms && a.ttl_ms == b->ttl_ms &&
           a.dedup_window_ms == b->dedup_window_ms &&
           a.max_lease_ms == b->max_lease_ms &&
           a.dead_letter_expired == b->dead_letter_expired &&
           a.no_backoff == b->no_backoff;
}

int
op_create(struct hist *h, int ci, int q)
{
    struct model *w = &h->w;
    struct protoq_queue_attrs a;
    bool same = false, dl_bad;
    int dl, rc;

    gen_attrs(h, q, &a);
    if (w->q[q].exists && chance(h, 60)) {
        a = w->q[q].a; /* re-declare with the same attributes */
    }
    dl = a.dead_letter[0] ? m_qindex(a.dead_letter) : -1;
    oplog(h,
          "create %s transient=%d max_length=%" PRIu64 " max_bytes=%" PRIu64
          " ack=%" PRIu64 " attempts=%u dl=%s dle=%d backoff=%" PRIu64
          "/%" PRIu64 "%s ttl=%" PRIu64 " (c%d)",
          m_qname(q), a.transient, a.max_length, a.max_bytes, a.ack_timeout_ms,
          a.max_attempts, a.dead_letter, a.dead_letter_expired,
          a.backoff_base_ms, a.backoff_cap_ms, a.no_backoff ? " none" : "",
          a.ttl_ms, ci);
    if (w->q[q].exists) {
        struct m_queue tmp = w->q[q];

        w->q[q].a = a;
        m_effective(w, q, &a);
        w->q[q] = tmp;
        same = attrs_same(w, q, &a);
        a = same ? w->q[q].a : a;
    }
    rc = protoq_queue_create(h->c[ci].c, m_qname(q), &a);
    /* The dead-letter queue must exist, and a durable queue's must be
     * durable (the broker checks this before anything else). */
    dl_bad =
        dl >= 0 && (!w->q[dl].exists || (!a.transient && w->q[dl].a.transient));
    if (w->q[q].exists && !(dl_bad && !same)) {
        if (same ? rc != PQ_OK
                 : !remote_is(h, ci, rc, PROTOQ_CODE_QUEUE_EXISTS)) {
            return unexpected(h, ci, "create existing", rc,
                              same ? "PQ_OK" : "QUEUE_EXISTS");
        }
        return 0;
    }
    if (dl_bad) {
        if (rc == PQ_OK) {
            return unexpected(
                h, ci, "create with a missing or transient dead_letter queue",
                rc, "a refusal");
        }
        return 0;
    }
    if (rc != PQ_OK) {
        return unexpected(h, ci, "create", rc, "PQ_OK");
    }
    w->q[q].exists = true;
    w->q[q].inc++;
    w->q[q].a = a;
    w->q[q].nrd = 0;
    w->q[q].sub = -1;
    w->q[q].nkeys = 0;
    memset(&w->q[q].n, 0, sizeof(w->q[q].n));
    return 0;
}

static bool
queue_has_held(const struct model *w, int q)
{
    for (int i = 0; i < w->nm; i++) {
        if (w->m[i].st == ST_INFLIGHT && w->m[i].cur.q == q) {
            return true;
        }
    }
    return false;
}

static int
dl_user(const struct model *w, int q)
{
    for (int i = 0; i < M_NQ; i++) {
        if (i != q && w->q[i].exists &&
            strcmp(w->q[i].a.dead_letter, m_qname(q)) == 0) {
            return i;
        }
    }
    return -1;
}

int
op_delete(struct hist *h, int ci, int q)
{
    struct model *w = &h->w;
    int rc, user = dl_user(w, q);

    if ((h->avoid & AV_DELETE_HELD) && queue_has_held(w, q)) {
        return 0;
    }
    if ((h->avoid & AV_DLQ_MISSING) && user >= 0) {
        return 0;
    }
    oplog(h, "delete %s%s (c%d)", m_qname(q),
          queue_has_held(w, q) ? " with jobs held" : "", ci);
    rc = protoq_queue_delete(h->c[ci].c, m_qname(q));
    if (!w->q[q].exists) {
        return remote_is(h, ci, rc, PROTOQ_CODE_QUEUE_NOT_FOUND)
                   ? 0
                   : unexpected(h, ci, "delete of a missing queue", rc,
                                "QUEUE_NOT_FOUND");
    }
    if (user >= 0) {
        if (rc == PQ_OK) {
            return unexpected(h, ci, "delete of a dead-letter queue in use", rc,
                              "a refusal");
        }
        return 0;
    }
    if (rc != PQ_OK) {
        return unexpected(h, ci, "delete", rc, "PQ_OK");
    }
    for (int i = 0; i < w->nm; i++) {
        if (w->m[i].st != ST_GONE && w->m[i].cur.q == q) {
            m_gone(w, i, true);
        }
    }
    if (w->q[q].sub >= 0) {
        w->s[w->q[q].sub].used = false;
    }
    w->q[q].sub = -1;
    w->q[q].exists = false;
    w->q[q].nkeys = 0;
    m_unbind_queue(w, q);
    if (!w->q[q].a.transient) {
        m_durable(w);
    }
    return 0;
}

int
op_purge(struct hist *h, int ci, int q, uint64_t extra)
{
    struct model *w = &h->w;
    uint64_t n = 0, want = extra;
    int rc;

    oplog(h, "purge %s (c%d)", m_qname(q), ci);
    rc = protoq_queue_purge(h->c[ci].c, m_qname(q), &n);
    if (!w->q[q].exists) {
        return remote_is(h, ci, rc, PROTOQ_CODE_QUEUE_NOT_FOUND)
                   ? 0
                   : unexpected(h, ci, "purge of a missing queue", rc,
                                "QUEUE_NOT_FOUND");
    }
    if (rc != PQ_OK) {
        return unexpected(h, ci, "purge", rc, "PQ_OK");
    }
    for (int i = 0; i < w->nm; i++) {
        struct m_msg *m = &w->m[i];

        if (m->cur.q == q &&
            (m->st == ST_READY || m->st == ST_DLONG || m->st == ST_TIMED)) {
            want++;
            m_gone(w, i, true);
        }
    }
    if (n != want) {
        return m_fail(w, "purge %s removed %" PRIu64 ", model %" PRIu64,
                      m_qname(q), n, want);
    }
    if (!w->q[q].a.transient) {
        m_durable(w);
    }
    return 0;
}

/* Segment churn: about 170 KiB to q (two segments' worth), then a purge,
 * so that segments roll and empty ones are deleted while other queues'
 * messages live in older ones. */
int
op_churn(struct hist *h, int ci, int q)
{
    static char payload[14000];
    struct model *w = &h->w;
    struct protoq_message pm[4];
    int rc;

    if (!w->q[q].exists || w->q[q].a.transient || w->q[q].a.max_length != 0 ||
        w->q[q].a.max_bytes != 0 || w->q[q].sub >= 0) {
        return 0;
    }
    oplog(h, "churn %s: 12 x %zu bytes, then purge (c%d)", m_qname(q),
          sizeof(payload), ci);
    memset(pm, 0, sizeof(pm));
    memset(payload, 'z', sizeof(payload));
    for (int i = 0; i < 4; i++) {
        pm[i].payload = payload;
        pm[i].len = sizeof(payload);
    }
    for (int b = 0; b < 3; b++) {
        rc = protoq_publish_batch(h->c[ci].c, m_qname(q), pm, 4, NULL);
        if (rc != PQ_OK) {
            return unexpected(h, ci, "churn batch", rc, "PQ_OK");
        }
        w->q[q].n.published += 4;
    }
    m_durable(w);
    return op_purge(h, ci, q, 12);
}

static int check_routes(struct hist *h, int ci);

int
op_list(struct hist *h, int ci)
{
    struct model *w = &h->w;
    struct protoq_queue_info *l = NULL;
    size_t n = 0;
    int rc, seen = 0, want = 0;

    if (conn_get(h, ci) != 0) {
        return -1;
    }
    oplog(h, "list (c%d)", ci);
    rc = protoq_queue_list(h->c[ci].c, &l, &n);
    if (rc != PQ_OK) {
        return unexpected(h, ci, "list", rc, "PQ_OK");
    }
    for (size_t i = 0; i < n && !failed(h); i++) {
        int q = m_qindex(l[i].name);

        if (strcmp(l[i].name, "zsync") == 0) {
            continue;
        }
        if (q < 0 || !w->q[q].exists) {
            m_fail(w, "list shows queue %s, which the model does not have",
                   l[i].name);
        } else if (!attrs_same(w, q, &l[i].attrs)) {
            m_fail(w, "list: %s has other attributes than declared", l[i].name);
        }
        seen++;
    }
    protoq_queue_list_free(l, n);
    for (int q = 0; q < M_NQ; q++) {
        want += w->q[q].exists;
    }
    if (!failed(h) && seen != want) {
        m_fail(w, "list shows %d queues, model %d", seen, want);
    }
    return failed(h) ? -1 : check_routes(h, ci);
}

/* The broker's bindings are the model's, in order. */
static int
check_routes(struct hist *h, int ci)
{
    struct model *w = &h->w;
    struct protoq_binding *b = NULL;
    size_t n = 0;
    int rc = protoq_route_list(h->c[ci].c, &b, &n);

    if (rc != PQ_OK) {
        return unexpected(h, ci, "route list", rc, "PQ_OK");
    }
    if (n != (size_t)w->nb) {
        m_fail(w, "route list shows %zu bindings, model %d", n, w->nb);
    }
    for (size_t i = 0; i < n && !failed(h); i++) {
        if (strcmp(b[i].route, "r") != 0 ||
            strcmp(b[i].queue, m_qname(w->b[i].q)) != 0 ||
            strcmp(b[i].pattern, m_pat[w->b[i].pat]) != 0) {
            m_fail(w, "binding %zu is %s %s \"%s\", model r %s \"%s\"", i,
                   b[i].route, b[i].queue, b[i].pattern, m_qname(w->b[i].q),
                   m_pat[w->b[i].pat]);
        }
    }
    free(b);
    return failed(h) ? -1 : 0;
}

/* ----------------------------------------------------------- publishing */

struct pubbuf {
    struct protoq_kv hdr[3];
    struct protoq_kv req[M_NTAGS];
    char *payload;
};

int
find_key(const struct m_queue *Q, const char *key)
{
    for (int i = 0; i < Q->nkeys; i++) {
        if (strcmp(Q->keys[i].key, key) == 0) {
            return i;
        }
    }
    return -1;
}

/* A queue slot: one that exists when existing and there is one. */
static int
pick_existing(struct hist *h, bool existing)
{
    int cand[M_NQ], n = 0;

    for (int q = 0; q < M_NQ && existing; q++) {
        if (h->w.q[q].exists) {
            cand[n++] = q;
        }
    }
    return n == 0 ? (int)rn(h, M_NQ) : cand[rn(h, (uint32_t)n)];
}

/* The message's reply_to (if any) exists. */
static bool
rto_ok(const struct model *w, const struct m_msg *m)
{
    return m->rto[0] == '\0' || w->q[m_qindex(m->rto)].exists;
}

/* Make message mi (not yet in any queue) and its wire form. */
static void
gen_msg(struct hist *h, int mi, int q, bool keyed, uint32_t maxlen,
        struct protoq_message *pm, struct pubbuf *b)
{
    struct m_msg *m = &h->w.m[mi];

    m->gen = ++h->pubgen;
    m->len = chance(h, 20) ? 4000 + rn(h, 11000) : rn(h, 400);
    m->len = m->len > maxlen ? maxlen : m->len;
    m->prio = chance(h, 40) ? (uint8_t)rn(h, 10) : 0;
    m->nh = (uint8_t)rn(h, 4);
    for (int i = 0; i < m->nh; i++) {
        snprintf(m->hk[i], sizeof(m->hk[i]), "h%d", i);
        snprintf(m->hv[i], sizeof(m->hv[i]), "v%u", rn(h, 1000));
    }
    if (keyed) {
        if (h->avoid & AV_KEY_AFTER_DELETE) {
            snprintf(m->key, sizeof(m->key), "k%u-%u", h->w.q[q].inc, rn(h, 6));
        } else {
            snprintf(m->key, sizeof(m->key), "k%u", rn(h, 6));
        }
    }
    if (chance(h, 40)) {
        /* Every end of such a job puts a result or failure notice into
         * reply_to, one of the model's queues (mostly one that exists: a
         * missing one refuses the publish). */
        if (chance(h, 70)) {
            snprintf(m->corr, sizeof(m->corr), "c%u", rn(h, 100));
        }
        snprintf(m->rto, sizeof(m->rto), "%s",
                 m_qname(pick_existing(h, chance(h, 90))));
    }
    if (chance(h, 20)) {
        m->reqmask = (uint8_t)(1u << rn(h, M_NTAGS));
    }
    memset(pm, 0, sizeof(*pm));
    m_payload(m->gen, m->len, b->payload);
    pm->payload = b->payload;
    pm->len = m->len;
    for (int i = 0; i < m->nh; i++) {
        b->hdr[i].key = m->hk[i];
        b->hdr[i].value = m->hv[i];
    }
    pm->headers = b->hdr;
    pm->n_headers = m->nh;
    pm->priority = m->prio;
    pm->idempotency_key = m->key[0] ? m->key : NULL;
    pm->correlation_id = m->corr[0] ? m->corr : NULL;
    pm->reply_to = m->rto[0] ? m->rto : NULL;
    for (int t = 0, n = 0; t < M_NTAGS; t++) {
        if (m->reqmask & (1u << t)) {
            b->req[n].key = m_tag_key[t];
            b->req[n].value = m_tag_val[t];
            pm->requires = b->req;
            pm->n_requires = (size_t)++n;
        }
    }
    m->cur.q = q;
}

/* Timing of message mi: 0 now, 1 an hour, 2 a few ms, 3 doomed by TTL. */
static int
gen_timing(struct hist *h, int mi, struct protoq_message *pm, int slot)
{
    struct m_msg *m = &h->w.m[mi];
    int kind = 0;

    if (chance(h, 8)) {
        kind = 1;
        pm->delay_ms = 3600000;
    } else if (chance(h, 10)) {
        kind = 2;
        pm->delay_ms = 2 + 3 * (uint64_t)slot + rn(h, 3) * 20;
    } else if (chance(h, 5) && m->key[0] == '\0') {
        kind = 3;
        pm->delay_ms = 30 + 3 * (uint64_t)slot;
        pm->ttl_ms = 1 + 3 * (uint64_t)slot;
        m->doomed = true;
    }
    if (kind != 3 && chance(h, 10)) {
        pm->ttl_ms = 86400000;
        m->ttl_long = true;
    }
    return kind;
}

/* The model side of a stored publish. */
static void
stored(struct hist *h, int mi, int q, int kind, const struct protoq_message *pm,
       int64_t t0, int64_t t1, uint32_t grp)
{
    struct model *w = &h->w;
    struct m_msg *m = &w->m[mi];

    m->cur.exists = true;
    m->cur.q = q;
    w->q[q].n.published++;
    switch (kind) {
    case 1:
        m->st = ST_DLONG;
        m->cur.dlong = true;
        break;
    case 2:
        m_add_event(w, mi, EV_READY_BACK, t0 + (int64_t)pm->delay_ms,
                    t1 + (int64_t)pm->delay_ms, grp);
        break;
    case 3:
        m_add_event(w, mi, EV_EXPIRE, t0 + (int64_t)pm->ttl_ms,
                    t1 + (int64_t)pm->ttl_ms, 0);
        break;
    default:
        m_insert_back(w, q, mi);
        m->grp = grp;
    }
    m_record(w, m);
    if (m->key[0]) {
        m_add_key(&w->q[q], m->key, mi);
    }
}

static bool
can_key(const struct hist *h, int q)
{
    /* avoid keyed-requeue: no keys where a subscription can put them back */
    return !(h->avoid & AV_KEYED_REQUEUE) ||
           (h->w.q[q].sub < 0 && h->w.q[q].a.dead_letter[0] == '\0');
}

int
op_publish(struct hist *h, int ci, int q)
{
    static char payload[16384];
    struct model *w = &h->w;
    struct protoq_message pm;
    struct pubbuf b = {.payload = payload};
    int mi = w->nm < M_PUBM ? m_new_msg(w) : -1, kind, k = -1, rc;
    bool dup = false;
    uint64_t id = 0;
    int64_t t0, t1;

    if (mi < 0) {
        return 0;
    }
    gen_msg(h, mi, q, chance(h, 25) && can_key(h, q), 16000, &pm, &b);
    kind = gen_timing(h, mi, &pm, 0);
    if (w->m[mi].key[0] && w->q[q].exists) {
        k = find_key(&w->q[q], w->m[mi].key);
        if (k >= 0 && w->q[q].keys[k].m < 0) {
            w->nm--; /* a key whose answer the model cannot know */
            return 0;
        }
    }
    oplog(h,
          "publish %s len=%u prio=%u key=%s req=%u delay=%" PRIu64
          " ttl=%" PRIu64 "%s%s (c%d)",
          m_qname(q), w->m[mi].len, w->m[mi].prio, w->m[mi].key,
          w->m[mi].reqmask, pm.delay_ms, pm.ttl_ms,
          w->m[mi].rto[0] ? " reply_to=" : "", w->m[mi].rto, ci);
    t0 = now_ms_mono();
    rc = protoq_publish_ex(h->c[ci].c, m_qname(q), &pm, &id, &dup);
    t1 = now_ms_mono();
    if (!w->q[q].exists || !rto_ok(w, &w->m[mi])) {
        w->nm--;
        return remote_is(h, ci, rc, PROTOQ_CODE_QUEUE_NOT_FOUND)
                   ? 0
                   : unexpected(h, ci, "publish to a missing queue or reply_to",
                                rc, "QUEUE_NOT_FOUND");
    }
    if (k >= 0) {
        const struct m_msg *first = &w->m[w->q[q].keys[k].m];

        w->nm--;
        if (rc != PQ_OK || !dup || id != first->id) {
            return m_fail(w,
                          "publish %s key %s: rc %s dup %d id %" PRIu64
                          ", model: duplicate "
                          "of %" PRIu64,
                          m_qname(q), first->key, pq_strerror(rc), dup, id,
                          first->id);
        }
        return 0;
    }
    if (!m_room(w, q, 1, w->m[mi].len)) {
        w->nm--;
        return remote_is(h, ci, rc, PROTOQ_CODE_QUEUE_FULL)
                   ? 0
                   : unexpected(h, ci, "publish to a full queue", rc,
                                "QUEUE_FULL");
    }
    if (rc != PQ_OK || dup) {
        w->nm--;
        return unexpected(h, ci, "publish", rc, "PQ_OK, not a duplicate");
    }
    w->m[mi].id = id;
    stored(h, mi, q, kind, &pm, t0, t1, 0);
    if (!w->q[q].a.transient) {
        m_durable(w);
    }
    return 0;
}

/* Payload bytes of a batch that surely fits in one 64 KiB segment's
 * record, and that surely does not (headers, keys, requirements and the
 * record's framing make up the difference). */
enum { BATCH_SURE_FITS = 56000, BATCH_SURE_TOO_BIG = 65536 };

/* A batch of 2-5 messages (no keys) to one or several queues. */
int
op_batch(struct hist *h, int ci, int q0)
{
    static char payloads[5][16384];
    struct model *w = &h->w;
    struct protoq_message pm[5];
    struct pubbuf b[5];
    const char *qn[5];
    int qs[5], mis[5], kinds[5];
    uint64_t ids[5], need[M_NQ] = {0}, bytes[M_NQ] = {0};
    int n = 2 + (int)rn(h, 4), rc, first = w->nm;
    bool all_exist = true, room = true, durable = false;
    uint64_t total = 0;
    uint32_t grp = 0;
    int64_t t0, t1;
    char line[200];
    size_t ln = 0;

    if (w->nm + n > M_PUBM) {
        return 0;
    }
    for (int i = 0; i < n; i++) {
        qs[i] = chance(h, 70) ? q0 : (int)rn(h, M_NQ);
        mis[i] = m_new_msg(w);
        b[i].payload = payloads[i];
        /* avoid batch-over-segment: 5 x 8000 bytes fit in a 64 KiB segment;
         * otherwise up to 5 x 16000 do not, and are refused */
        gen_msg(h, mis[i], qs[i], false,
                (h->avoid & AV_BATCH_OVER_SEGMENT) ? 8000 : 16000, &pm[i],
                &b[i]);
        kinds[i] = gen_timing(h, mis[i], &pm[i], i);
        qn[i] = m_qname(qs[i]);
        all_exist &= w->q[qs[i]].exists && rto_ok(w, &w->m[mis[i]]);
        need[qs[i]]++;
        bytes[qs[i]] += w->m[mis[i]].len;
        total += w->m[mis[i]].len;
        ln += (size_t)snprintf(
            line + ln, sizeof(line) - ln,
            " %s/%u/p%u/d%" PRIu64 "/t%" PRIu64 "%s%s", qn[i], w->m[mis[i]].len,
            w->m[mis[i]].prio, pm[i].delay_ms, pm[i].ttl_ms,
            w->m[mis[i]].rto[0] ? "/r" : "", w->m[mis[i]].rto);
    }
    oplog(h, "batch%s (c%d)", line, ci);
    for (int q = 0; q < M_NQ && all_exist; q++) {
        room &= need[q] == 0 || m_room(w, q, need[q], bytes[q]);
    }
    t0 = now_ms_mono();
    rc = protoq_publish_batch_multi(h->c[ci].c, qn, pm, (size_t)n, ids);
    t1 = now_ms_mono();
    if (!all_exist || !room) {
        w->nm = first;
        if (!all_exist ? remote_is(h, ci, rc, PROTOQ_CODE_QUEUE_NOT_FOUND)
                       : remote_is(h, ci, rc, PROTOQ_CODE_QUEUE_FULL)) {
            return 0;
        }
        return unexpected(h, ci, "batch", rc,
                          !all_exist ? "QUEUE_NOT_FOUND" : "QUEUE_FULL");
    }
    /* A batch is one log record: one bigger than a segment (64 KiB here)
     * is refused whole. Near the limit the record's own overhead decides,
     * so either answer is right there. */
    if (total > BATCH_SURE_TOO_BIG ||
        (total > BATCH_SURE_FITS && rc != PQ_OK)) {
        w->nm = first;
        if (remote_is(h, ci, rc, PROTOQ_CODE_MESSAGE_TOO_LARGE)) {
            return 0;
        }
        return unexpected(h, ci, "batch over a segment", rc,
                          "MESSAGE_TOO_LARGE");
    }
    if (rc != PQ_OK) {
        w->nm = first;
        return unexpected(h, ci, "batch", rc, "PQ_OK");
    }
    /* A delay that may have ended before the batch was committed makes its
     * message ready at the commit, in batch order, instead of after it:
     * then the batch's ready messages may come in either order. */
    for (int i = 0; i < n; i++) {
        if (kinds[i] == 2 && t1 - t0 + 2 >= (int64_t)pm[i].delay_ms) {
            grp = ++w->grp;
        }
    }
    for (int i = 0; i < n; i++) {
        w->m[mis[i]].id = ids[i];
        stored(h, mis[i], qs[i], kinds[i], &pm[i], t0, t1, grp);
        durable |= !w->q[qs[i]].a.transient;
    }
    if (durable) {
        m_durable(w);
    }
    return 0;
}

/* ------------------------------------------------------------- routing */

int
op_route_bind(struct hist *h, int ci, int q)
{
    struct model *w = &h->w;
    int pat = (int)rn(h, M_NPAT), rc, i;

    oplog(h, "route bind r %s \"%s\" (c%d)", m_qname(q), m_pat[pat], ci);
    for (i = 0; i < w->nb; i++) {
        if (w->b[i].q == q && w->b[i].pat == pat) {
            break;
        }
    }
    if (i == w->nb && w->nb == M_MAXB) {
        return 0;
    }
    rc = protoq_route_bind(h->c[ci].c, "r", m_qname(q), m_pat[pat]);
    if (!w->q[q].exists) {
        return remote_is(h, ci, rc, PROTOQ_CODE_QUEUE_NOT_FOUND)
                   ? 0
                   : unexpected(h, ci, "route bind to a missing queue", rc,
                                "QUEUE_NOT_FOUND");
    }
    if (rc != PQ_OK) {
        return unexpected(h, ci, "route bind", rc, "PQ_OK");
    }
    if (i == w->nb) {
        w->b[w->nb++] = (struct m_bind){.q = q, .pat = pat};
    }
    return 0;
}

int
op_route_unbind(struct hist *h, int ci)
{
    struct model *w = &h->w;
    int i, rc;

    if (w->nb == 0) {
        return 0;
    }
    i = (int)rn(h, (uint32_t)w->nb);
    oplog(h, "route unbind r %s \"%s\" (c%d)", m_qname(w->b[i].q),
          m_pat[w->b[i].pat], ci);
    rc = protoq_route_unbind(h->c[ci].c, "r", m_qname(w->b[i].q),
                             m_pat[w->b[i].pat]);
    if (rc != PQ_OK) {
        return unexpected(h, ci, "route unbind", rc, "PQ_OK");
    }
    memmove(&w->b[i], &w->b[i + 1], (size_t)(w->nb - i - 1) * sizeof(w->b[0]));
    w->nb--;
    return 0;
}

/* One message through route "r": a copy in each matching queue, like a
 * batch of identical messages (all or none). */
int
op_route_pub(struct hist *h, int ci)
{
    static char payload[16384];
    struct model *w = &h->w;
    struct protoq_message pm;
    struct pubbuf b = {.payload = payload};
    int qs[M_NQ], mis[M_NQ], k = (int)rn(h, M_NRKEY);
    int n = m_route_match(w, k, qs), kind, rc, first = w->nm;
    uint64_t ids[M_NQ];
    bool room = true, durable = false;
    uint32_t grp = 0;
    size_t got = 0;
    int64_t t0, t1;

    if (w->nm + (n > 0 ? n : 1) > M_PUBM) {
        return 0;
    }
    if (n == 0 && chance(h, 75)) {
        /* histories are short: a route with nothing to match binds first */
        return op_route_bind(h, ci, (int)rn(h, M_NQ));
    }
    mis[0] = m_new_msg(w);
    /* at most 5 x 8000 bytes: a fan-out is one record, in one segment */
    gen_msg(h, mis[0], n > 0 ? qs[0] : 0, false, 8000, &pm, &b);
    kind = gen_timing(h, mis[0], &pm, 0);
    for (int i = 1; i < n; i++) {
        mis[i] = m_new_msg(w);
        w->m[mis[i]] = w->m[mis[0]];
        w->m[mis[i]].cur.q = qs[i];
    }
    for (int i = 0; i < n; i++) {
        room &= m_room(w, qs[i], 1, w->m[mis[i]].len);
    }
    oplog(h, "route pub r \"%s\" to %d queue%s, %u bytes (c%d)", m_rkey[k], n,
          n == 1 ? "" : "s", w->m[mis[0]].len, ci);
    t0 = now_ms_mono();
    rc = protoq_publish_route(h->c[ci].c, "r", m_rkey[k], &pm, ids, M_NQ, &got);
    t1 = now_ms_mono();
    if (n == 0 || !rto_ok(w, &w->m[mis[0]]) || !room) {
        bool nf = n == 0 || !rto_ok(w, &w->m[mis[0]]);

        w->nm = first;
        if (nf ? remote_is(h, ci, rc, PROTOQ_CODE_QUEUE_NOT_FOUND)
               : remote_is(h, ci, rc, PROTOQ_CODE_QUEUE_FULL)) {
            return 0;
        }
        return unexpected(h, ci, "route pub", rc,
                          nf ? "QUEUE_NOT_FOUND" : "QUEUE_FULL");
    }
    if (rc != PQ_OK || got != (size_t)n) {
        w->nm = first;
        return rc != PQ_OK
                   ? unexpected(h, ci, "route pub", rc, "PQ_OK")
                   : m_fail(w, "route pub: %zu copies, model %d", got, n);
    }
    if (kind == 2 && t1 - t0 + 2 >= (int64_t)pm.delay_ms) {
        grp = ++w->grp;
    }
    for (int i = 0; i < n; i++) {
        w->m[mis[i]].id = ids[i];
        stored(h, mis[i], qs[i], kind, &pm, t0, t1, grp);
        durable |= !w->q[qs[i]].a.transient;
    }
    if (durable) {
        m_durable(w);
    }
    return 0;
}

/* ------------------------------------------------------------ consuming */

static int
free_sub(const struct model *w)
{
    for (int i = 0; i < M_NS; i++) {
        if (!w->s[i].used) {
            return i;
        }
    }
    return -1;
}

int
subscribe(struct hist *h, int ci, int q, uint32_t prefetch, uint8_t tags)
{
    struct model *w = &h->w;
    struct protoq_kv t[M_NTAGS];
    size_t nt = 0;
    uint64_t sid = 0;
    int si = free_sub(w), rc;

    if (si < 0 || conn_get(h, ci) != 0) {
        return -1;
    }
    for (int i = 0; i < M_NTAGS; i++) {
        if (tags & (1u << i)) {
            t[nt].key = m_tag_key[i];
            t[nt++].value = m_tag_val[i];
        }
    }
    oplog(h, "subscribe %s prefetch=%u tags=%u (c%d)", m_qname(q), prefetch,
          tags, ci);
    /* deliveries may come before SubscribeOk: know the subscription first */
    w->s[si] = (struct m_sub){true, ci,  q, 0, prefetch ? prefetch : 1,
                              0,    tags}; /* 0 = 1 */
    rc = protoq_subscribe(h->c[ci].c, m_qname(q), prefetch, nt ? t : NULL, nt,
                          on_deliver, (void *)(intptr_t)ci, &sid);
    if (!w->q[q].exists) {
        w->s[si].used = false;
        return remote_is(h, ci, rc, PROTOQ_CODE_QUEUE_NOT_FOUND)
                   ? 1
                   : unexpected(h, ci, "subscribe to a missing queue", rc,
                                "QUEUE_NOT_FOUND");
    }
    if (rc != PQ_OK) {
        w->s[si].used = false;
        return unexpected(h, ci, "subscribe", rc, "PQ_OK");
    }
    w->s[si].sid = sid; /* deliveries that came meanwhile are still buffered */
    w->q[q].sub = si;
    return 0;
}

static int
pick_held(struct hist *h, bool keyed_ok)
{
    struct model *w = &h->w;
    int cand[M_MAXM], n = 0;

    for (int i = 0; i < w->nm; i++) {
        const struct m_msg *m = &w->m[i];

        if (m->st == ST_INFLIGHT && m->ev < 0 && m->sub >= 0 &&
            (keyed_ok || m->key[0] == '\0' || !(h->avoid & AV_KEYED_REQUEUE))) {
            cand[n++] = i;
        }
    }
    return n == 0 ? -1 : cand[rn(h, (uint32_t)n)];
}

/* A round trip on ci: every request sent before it has been handled. */
int
roundtrip(struct hist *h, int ci)
{
    struct protoq_queue_info *l = NULL;
    size_t n = 0;
    int rc = protoq_queue_list(h->c[ci].c, &l, &n);

    protoq_queue_list_free(l, n);
    return rc == PQ_OK ? 0 : unexpected(h, ci, "round trip", rc, "PQ_OK");
}

/* An unconfirmed ack/nack/release: barrier, then STALE answers counted. */
int
expect_async(struct hist *h, int ci, uint64_t stale_want, const char *what)
{
    uint64_t before = protoq_async_errors(h->c[ci].c);

    if (roundtrip(h, ci) != 0) {
        return -1;
    }
    if (protoq_async_errors(h->c[ci].c) - before != stale_want) {
        return m_fail(
            &h->w, "%s: %" PRIu64 " asynchronous errors, model %" PRIu64, what,
            protoq_async_errors(h->c[ci].c) - before, stale_want);
    }
    return 0;
}

/* When nothing is held: subscribe ci (every tag) to a queue with ready
 * messages and no consumer, and take its deliveries. */
int
take_jobs(struct hist *h, int ci)
{
    struct model *w = &h->w;
    int cand[M_NQ], n = 0, rc;

    if (pick_held(h, true) >= 0) {
        return 0;
    }
    for (int q = 0; q < M_NQ; q++) {
        if (w->q[q].exists && w->q[q].sub < 0 && w->q[q].nrd > 0) {
            cand[n++] = q;
        }
    }
    if (n == 0) {
        return 0;
    }
    rc = subscribe(h, ci, cand[rn(h, (uint32_t)n)], 1 + rn(h, 4),
                   (1u << M_NTAGS) - 1);
    return rc < 0 || settle(h) != 0 ? -1 : 0;
}

/* The follow-ups of an ack (up to 2): made into model messages (ids
 * unknown) and their wire form; *code: the error the broker must refuse the
 * ack with (a missing queue or reply_to, no room), or 0. */
struct follow {
    int n;
    int mi[2];
    int q[2];
    const char *qn[2];
    struct protoq_message pm[2];
    struct pubbuf b[2];
};

static void
gen_follow_ups(struct hist *h, struct follow *f, int *code)
{
    static char payloads[2][2048];
    struct model *w = &h->w;
    uint64_t need[M_NQ] = {0}, bytes[M_NQ] = {0};
    bool exist = true, room = true;

    *code = 0;
    f->n = chance(h, 30) && w->nm + 4 <= M_MAXM ? 1 + (int)rn(h, 2) : 0;
    for (int i = 0; i < f->n; i++) {
        f->q[i] = pick_existing(h, chance(h, 90));
        f->qn[i] = m_qname(f->q[i]);
        f->mi[i] = m_new_msg(w);
        f->b[i].payload = payloads[i];
        gen_msg(h, f->mi[i], f->q[i], false, sizeof(payloads[i]), &f->pm[i],
                &f->b[i]);
        w->m[f->mi[i]].made = MADE_FOLLOW_UP;
        exist &= w->q[f->q[i]].exists && rto_ok(w, &w->m[f->mi[i]]);
        need[f->q[i]]++;
        bytes[f->q[i]] += w->m[f->mi[i]].len;
    }
    for (int q = 0; q < M_NQ && exist; q++) {
        room &= need[q] == 0 || m_room(w, q, need[q], bytes[q]);
    }
    *code = !exist  ? PROTOQ_CODE_QUEUE_NOT_FOUND
            : !room ? PROTOQ_CODE_QUEUE_FULL
                    : 0;
}

/* An ack: plain, with a result, with follow-ups (stored with the ack, all
 * or nothing), confirmed or pipelined. */
int
op_ack(struct hist *h)
{
    struct model *w = &h->w;
    int mi = pick_held(h, true), ci, rc, q, code, first = w->nm;
    struct m_msg *m;
    bool confirm = chance(h, 50), stale, result, extras, durable;
    struct protoq_ack_opts ao;
    struct follow f;
    char res[24];
    uint64_t fids[2] = {0, 0};

    if (mi < 0) {
        return 0;
    }
    m = &w->m[mi];
    q = m->cur.q;
    result = chance(h, m->rto[0] ? 60 : 15); /* none without a reply_to */
    snprintf(res, sizeof(res), "r%u", rn(h, 100000));
    gen_follow_ups(h, &f, &code);
    extras = result || f.n > 0;
    ci = w->s[m->sub].conn;
    stale = m->cancelled;
    /* follow-ups are checked before the delivery token */
    code = code ? code : stale ? PROTOQ_CODE_STALE_DELIVERY : 0;
    oplog(h, "ack %" PRIu64 "/%u %s%s%s%s%s%s (c%d)", m->id, m->cur.attempt,
          confirm ? "confirm" : "", result ? " result=" : "", result ? res : "",
          f.n > 0 ? " follow-ups to" : "", f.n > 0 ? f.qn[0] : "",
          stale ? " cancelled" : "", ci);
    memset(&ao, 0, sizeof(ao));
    ao.confirm = confirm;
    if (result) {
        ao.result = res;
        ao.result_len = strlen(res);
    }
    ao.follow_up_queues = f.qn;
    ao.follow_ups = f.pm;
    ao.n_follow_ups = (size_t)f.n;
    ao.follow_up_ids = fids; /* AckOk, when confirmed */
    if (extras) {
        rc = protoq_ack_ex(h->c[ci].c, m->id, m->cur.attempt, &ao);
    } else if (confirm) {
        rc = protoq_ack_sync(h->c[ci].c, m->id, m->cur.attempt);
    } else {
        rc = protoq_ack(h->c[ci].c, m->id, m->cur.attempt);
    }
    if (confirm ? (code ? !remote_is(h, ci, rc, code) : rc != PQ_OK)
                : rc != PQ_OK) {
        w->nm = first;
        return unexpected(h, ci, "ack", rc,
                          confirm && code ? protoq_code_name(code) : "PQ_OK");
    }
    if (!confirm && expect_async(h, ci, code != 0, "ack") != 0) {
        w->nm = first;
        return -1;
    }
    if (code != 0 && code != PROTOQ_CODE_STALE_DELIVERY) {
        w->nm = first; /* refused: nothing changed, the job is still held */
        return 0;
    }
    if (stale) {
        w->nm = first;
        m_gone(w, mi, false);
        return 0;
    }
    w->q[q].n.acked++;
    m_gone(w, mi, true);
    durable = !w->q[q].a.transient;
    for (int i = 0; i < f.n; i++) {
        m_made_by(w, f.mi[i], mi, f.q[i]);
        if (confirm) {
            w->m[f.mi[i]].id = fids[i]; /* AckOk: checked at its delivery */
        }
        w->n_follow_ups++;
        durable |= !w->q[f.q[i]].a.transient;
    }
    /* every ack tells a job's reply_to, a plain one with an empty result */
    {
        int r = m_reply(w, mi, q, NULL, result ? res : "", m->cur.attempt, -1);

        durable |= r >= 0 && !w->q[w->m[r].cur.q].a.transient;
    }
    /* deliveries that came before the Ok came before the push */
    if (confirm && durable && sync_observed(h) != 0) {
        return -1;
    }
    return 0;
}

int
op_nack(struct hist *h)
{
    struct model *w = &h->w;
    int mi = pick_held(h, false), ci, rc;
    struct m_msg *m;
    bool confirm = chance(h, 50), dl = chance(h, 15), stale;
    uint64_t delay = chance(h, 40) ? 1 + rn(h, 10) : 0;
    char err[24];
    int q;

    if (mi < 0) {
        return 0;
    }
    m = &w->m[mi];
    q = m->cur.q;
    ci = w->s[m->sub].conn;
    stale = m->cancelled;
    snprintf(err, sizeof(err), "e%u", rn(h, 1000));
    oplog(h, "nack %" PRIu64 "/%u delay=%" PRIu64 " dl=%d err=%s %s%s (c%d)",
          m->id, m->cur.attempt, delay, dl, err, confirm ? "confirm" : "",
          stale ? " cancelled" : "", ci);
    if (confirm) {
        rc =
            protoq_nack_sync(h->c[ci].c, m->id, m->cur.attempt, delay, dl, err);
        if (stale ? !remote_is(h, ci, rc, PROTOQ_CODE_STALE_DELIVERY)
                  : rc != PQ_OK) {
            return unexpected(h, ci, "nack", rc,
                              stale ? "STALE_DELIVERY" : "PQ_OK");
        }
    } else {
        rc = protoq_nack(h->c[ci].c, m->id, m->cur.attempt, delay, dl, err);
        if (rc != PQ_OK || expect_async(h, ci, stale, "nack") != 0) {
            return rc != PQ_OK ? unexpected(h, ci, "nack", rc, "PQ_OK") : -1;
        }
    }
    if (!stale) {
        w->q[q].n.nacked++;
        snprintf(m->cur.err, sizeof(m->cur.err), "%s", err);
    }
    m_fail_attempt(w, mi, now_ms_mono(), dl, delay != 0, delay, ++w->grp, 0);
    /* deliveries that came before the Ok came before a notice's push */
    if (confirm && !w->q[q].a.transient && sync_observed(h) != 0) {
        return -1;
    }
    return 0;
}

static void
gen_progress(struct hist *h, struct protoq_progress *p, struct m_prog *mp,
             char *text, char *ck)
{
    mp->has = true;
    mp->pct = rn(h, 101);
    snprintf(mp->text, sizeof(mp->text), "%s", chance(h, 50) ? "" : "step");
    snprintf(mp->ckpt, sizeof(mp->ckpt), chance(h, 50) ? "" : "s3://ck/%u",
             rn(h, 100));
    snprintf(text, 24, "%s", mp->text);
    snprintf(ck, 24, "%s", mp->ckpt);
    p->percent = mp->pct;
    p->text = text[0] ? text : NULL;
    p->checkpoint = ck[0] ? ck : NULL;
}

int
op_touch(struct hist *h, bool expire)
{
    struct model *w = &h->w;
    int mi = pick_held(h, !expire), ci, rc;
    struct m_msg *m;
    struct protoq_progress p;
    struct m_prog mp;
    char text[24], ck[24];
    bool with = chance(h, 60);
    uint64_t lease = 0, extend = expire ? 3 + rn(h, 6) : 0;

    if (mi < 0 || w->m[mi].cancelled) {
        return 0;
    }
    m = &w->m[mi];
    ci = w->s[m->sub].conn;
    if (with) {
        gen_progress(h, &p, &mp, text, ck);
    }
    oplog(h, "%s %" PRIu64 "/%u extend=%" PRIu64 " progress=%s (c%d)",
          expire ? "expire" : "touch", m->id, m->cur.attempt, extend,
          with ? (mp.text[0] ? mp.text : "yes") : "none", ci);
    rc = protoq_touch(h->c[ci].c, m->id, m->cur.attempt, extend,
                      with ? &p : NULL, &lease);
    if (rc != PQ_OK) {
        return unexpected(h, ci, "touch", rc, "PQ_OK");
    }
    if (with) {
        m->cur.pg = mp;
        m_record_progress(w, m);
    }
    if (expire) {
        int64_t t = now_ms_mono();

        return m_add_event(w, mi, EV_LEASE, t + (int64_t)extend,
                           t + (int64_t)extend, 0);
    }
    return 0;
}

int
op_release(struct hist *h)
{
    struct model *w = &h->w;
    int mi = pick_held(h, false), ci, rc;
    struct m_msg *m;
    struct protoq_progress p;
    struct m_prog mp;
    char text[24], ck[24];
    bool with = chance(h, 50), confirm = chance(h, 50), stale;

    if (mi < 0) {
        return 0;
    }
    m = &w->m[mi];
    ci = w->s[m->sub].conn;
    stale = m->cancelled;
    if (with) {
        gen_progress(h, &p, &mp, text, ck);
    }
    oplog(h, "release %" PRIu64 "/%u progress=%s %s%s (c%d)", m->id,
          m->cur.attempt, with ? "yes" : "none", confirm ? "confirm" : "",
          stale ? " cancelled" : "", ci);
    rc = protoq_release(h->c[ci].c, m->id, m->cur.attempt,
                        PROTOQ_RELEASE_PREEMPTED, with ? &p : NULL, confirm);
    if (confirm) {
        if (stale ? !remote_is(h, ci, rc, PROTOQ_CODE_STALE_DELIVERY)
                  : rc != PQ_OK) {
            return unexpected(h, ci, "release", rc,
                              stale ? "STALE_DELIVERY" : "PQ_OK");
        }
    } else if (rc != PQ_OK || expect_async(h, ci, stale, "release") != 0) {
        return rc != PQ_OK ? unexpected(h, ci, "release", rc, "PQ_OK") : -1;
    }
    if (stale) {
        m_gone(w, mi, false);
        return 0;
    }
    if (with) {
        m->cur.pg = mp;
    }
    m_release_held(w, mi);
    if (confirm && !w->q[m->cur.q].a.transient) {
        m_durable(w);
    }
    return 0;
}

int
op_cancel(struct hist *h, int ci)
{
    struct model *w = &h->w;
    int mi, rc, before;
    struct m_msg *m;

    if (w->nm == 0) {
        return 0;
    }
    mi = (int)rn(h, (uint32_t)w->nm);
    m = &w->m[mi];
    if ((m->st == ST_INFLIGHT && m->ev >= 0) || m->id == 0) {
        return 0; /* a lease about to end: the outcome would race; or a
                     result whose id the model does not know yet */
    }
    oplog(h, "cancel %s %" PRIu64 " (state %d%s) (c%d)", m_qname(m->cur.q),
          m->id, m->st, m->cancelled ? " cancelled" : "", ci);
    before = m->st == ST_INFLIGHT ? h->c[w->s[m->sub].conn].cancels : 0;
    rc = protoq_cancel(h->c[ci].c, m_qname(m->cur.q), m->id);
    if (m->st == ST_GONE) {
        return remote_is(h, ci, rc, PROTOQ_CODE_BAD_REQUEST)
                   ? 0
                   : unexpected(h, ci, "cancel of a gone message", rc,
                                "BAD_REQUEST");
    }
    if (rc != PQ_OK) {
        return unexpected(h, ci, "cancel", rc, "PQ_OK");
    }
    if (m->st == ST_INFLIGHT) {
        int hc = w->s[m->sub].conn;
        struct m_proj save = m->cur;

        if (m->cancelled) {
            return 0;
        }
        m->cancelled = true;
        m->cur.exists = false;
        m_record(w, m); /* recorded at once, with the notice */
        m->cur = save;
        m_reply(w, mi, m->cur.q, "cancelled", m->cur.err, m->cur.attempt, -1);
        /* the holder is told */
        if (hc != ci && roundtrip(h, hc) != 0) {
            return -1;
        }
        if (h->c[hc].cancels != before + 1) {
            return m_fail(w,
                          "cancel of %" PRIu64
                          ": holder got %d CancelRequested, want 1",
                          m->id, h->c[hc].cancels - before);
        }
        return 0;
    }
    m_gone(w, mi, true);
    m_reply(w, mi, m->cur.q, "cancelled", m->cur.err, m->cur.attempt, -1);
    return 0;
}

static bool
sub_holds_keyed(const struct hist *h, int si)
{
    for (int i = 0; i < h->w.nm; i++) {
        if (h->w.m[i].st == ST_INFLIGHT && h->w.m[i].sub == si &&
            h->w.m[i].key[0] && !h->w.m[i].cancelled) {
            return true;
        }
    }
    return false;
}

bool
conn_holds_keyed(const struct hist *h, int ci)
{
    for (int si = 0; si < M_NS; si++) {
        if (h->w.s[si].used && h->w.s[si].conn == ci &&
            sub_holds_keyed(h, si)) {
            return true;
        }
    }
    return false;
}

static int
pick_sub(struct hist *h)
{
    int cand[M_NS], n = 0;

    for (int i = 0; i < M_NS; i++) {
        if (h->w.s[i].used && h->w.s[i].conn != DRAIN_CONN) {
            cand[n++] = i;
        }
    }
    return n == 0 ? -1 : cand[rn(h, (uint32_t)n)];
}

int
op_flow(struct hist *h)
{
    struct model *w = &h->w;
    int si = pick_sub(h), rc;
    uint32_t p = chance(h, 30) ? 0 : 1 + rn(h, 6);

    if (si < 0) {
        return 0;
    }
    oplog(h, "flow %s prefetch=%u (c%d)", m_qname(w->s[si].q), p,
          w->s[si].conn);
    rc = protoq_flow(h->c[w->s[si].conn].c, w->s[si].sid, p);
    if (rc != PQ_OK) {
        return unexpected(h, w->s[si].conn, "flow", rc, "PQ_OK");
    }
    w->s[si].prefetch = p;
    return 0;
}

int
op_unsubscribe(struct hist *h)
{
    struct model *w = &h->w;
    int si = pick_sub(h), rc;

    if (si < 0 || ((h->avoid & AV_KEYED_REQUEUE) && sub_holds_keyed(h, si))) {
        return 0;
    }
    oplog(h, "unsubscribe %s holding %u (c%d)", m_qname(w->s[si].q),
          w->s[si].held, w->s[si].conn);
    rc = protoq_unsubscribe(h->c[w->s[si].conn].c, w->s[si].sid);
    if (rc != PQ_OK) {
        return unexpected(h, w->s[si].conn, "unsubscribe", rc, "PQ_OK");
    }
    m_detach(w, si, now_ms_mono(), ++w->grp, 0);
    return 0;
}

/* Wait until the broker shows no consumer on the queues in mask. */
static int
await_detached(struct hist *h, unsigned mask, int skip)
{
    int64_t deadline = now_ms_mono() + 3000;

    for (int q = 0; q < M_NQ; q++) {
        struct protoq_queue_info qi;
        int ci = skip == 0 ? 1 : 0;

        if (!(mask & (1u << q))) {
            continue;
        }
        for (;;) {
            if (conn_get(h, ci) != 0 || stat_queue(h, ci, q, &qi) != 0) {
                return -1;
            }
            if (qi.consumers == 0) {
                break;
            }
            if (now_ms_mono() > deadline) {
                return m_fail(
                    &h->w,
                    "%s still has a consumer 3 s after its connection ended",
                    m_qname(q));
            }
            if (sleep_polling(h, now_ms_mono() + 5, skip) != 0) {
                return -1;
            }
        }
    }
    return 0;
}

/* Close connection ci (heartbeat_loss: stop talking and let the broker
 * time it out first). */
int
op_disconnect(struct hist *h, int ci, bool heartbeat_loss)
{
    struct model *w = &h->w;
    unsigned mask = 0;
    uint32_t grp = ++w->grp, dlgrp = ++w->grp;
    int64_t t;

    if (h->c[ci].c == NULL ||
        ((h->avoid & AV_KEYED_REQUEUE) && conn_holds_keyed(h, ci))) {
        return 0;
    }
    for (int si = 0; si < M_NS; si++) {
        if (w->s[si].used && w->s[si].conn == ci) {
            mask |= 1u << w->s[si].q;
        }
    }
    if (heartbeat_loss && mask == 0) {
        return 0;
    }
    oplog(h, "%s c%d", heartbeat_loss ? "heartbeat loss" : "disconnect", ci);
    if (heartbeat_loss) {
        if (await_detached(h, mask, ci) != 0) {
            return -1;
        }
    } else {
        conn_drop(h, ci);
    }
    t = now_ms_mono();
    for (int si = 0; si < M_NS; si++) {
        if (w->s[si].used && w->s[si].conn == ci) {
            m_detach(w, si, t, grp, dlgrp);
        }
    }
    if (heartbeat_loss) {
        conn_drop(h, ci);
        return 0;
    }
    return await_detached(h, mask, ci);
}

/* Subscribe a fresh consumer with every tag, take everything ready, ack it
 * all, go. The model checks each delivery against its exact order. */
int
op_drain(struct hist *h, int q)
{
    struct model *w = &h->w;
    int si, rc = 0;

    if (!w->q[q].exists || w->q[q].sub >= 0) {
        return 0;
    }
    oplog(h, "drain %s: model has%s", m_qname(q), ids_text(w, q));
    si = free_sub(w);
    if (si < 0 ||
        (rc = subscribe(h, DRAIN_CONN, q, 100000, (1u << M_NTAGS) - 1)) != 0) {
        return rc > 0 ? 0 : -1;
    }
    if (settle(h) != 0) {
        return -1;
    }
    if (ack_held(h, si, false) != 0) {
        return -1;
    }
    if (w->q[q].nrd != 0) {
        return m_fail(w, "drain %s: the model still has%s ready", m_qname(q),
                      ids_text(w, q));
    }
    rc = protoq_unsubscribe(h->c[DRAIN_CONN].c, w->s[si].sid);
    if (rc != PQ_OK) {
        return unexpected(h, DRAIN_CONN, "drain unsubscribe", rc, "PQ_OK");
    }
    m_detach(w, si, now_ms_mono(), 0, 0);
    conn_drop(h, DRAIN_CONN);
    return 0;
}
