/*
 * dispatch_session.c: sessions and the disconnect grace (PROTOCOL.md,
 * "Sessions").
 *
 * A connection may name a session in its Hello. When such a connection
 * goes while disconnect_grace_ms > 0, its subscriptions that hold
 * deliveries are not ended: they move to the session, paused for good (so
 * nothing new is pushed to them), still holding their deliveries, whose
 * leases keep running. A connection that names the session again within
 * the grace (with the same identity: token name and TLS client CN) takes
 * them over: its acks, nacks, touches and releases of those tokens are
 * accepted, and CancelRequested for them reaches it (also one that came
 * during the gap, sent right after the Welcome). When the grace ends first,
 * the held subscriptions are unsubscribed: their deliveries are failed
 * attempts, exactly as at a disconnect without a grace.
 *
 * A held subscription is struct sub with s->sess set: on the session's
 * held list, not on a connection's subs; s->conn is the session's current
 * connection (NULL in the gap). It goes once it holds nothing (lease
 * expiry, ack...): pruned on the housekeeping tick, at resume and at
 * disconnect.
 *
 * Bounds: a session id is 1-PQ_SESSION_ID_MAX printable ASCII bytes;
 * max_held_sessions disconnected sessions at once (past it a disconnect
 * is handled as without a grace); SESSION_HELD_SUBS_MAX held
 * subscriptions per session (the others end as at a disconnect).
 * Sessions are in memory only: a restart ends them all.
 */
#include "dispatch.h"
#include "dispatch_int.h"

#include <stdio.h>
#include <string.h>

#include "log.h"
#include "mem.h"
#include "pqerr.h"
#include "strcheck.h"

enum { SESSION_HELD_SUBS_MAX = 1024 };

struct sess {
    char id[PQ_SESSION_ID_MAX + 1];          /* the sessions map's key */
    char ident[AUTH_NAME_MAX + 1 + 128 + 1]; /* "token\ncn" */
    struct conn *conn; /* the connection on it; NULL in the gap */
    uint64_t end_ms;   /* mono: the grace ends (conn NULL) */
    struct sub *held;  /* subscriptions that outlived their connection */
    uint32_t nheld;
    char name[64], peer[64];          /* its last connection's, for JobGet */
    struct sess *gap_prev, *gap_next; /* bk's gap list, by end_ms */
};

/* Who may take a session over: the token and TLS identity of c. */
static void
ident_of(const struct conn *c, char *buf, size_t cap)
{
    snprintf(buf, cap, "%s\n%s", broker_of(c)->auth ? c->auth_name : "",
             c->peer_cn);
}

static void
gap_unlink(struct broker *bk, struct sess *ss)
{
    if (ss->gap_prev != NULL) {
        ss->gap_prev->gap_next = ss->gap_next;
    } else if (bk->gap_head == ss) {
        bk->gap_head = ss->gap_next;
    } else {
        return; /* not on the list */
    }
    if (ss->gap_next != NULL) {
        ss->gap_next->gap_prev = ss->gap_prev;
    } else {
        bk->gap_tail = ss->gap_prev;
    }
    ss->gap_prev = ss->gap_next = NULL;
    bk->ngap--;
}

/* Insert by end_ms from the tail (in order unless the grace was reloaded
 * shorter). */
static void
gap_insert(struct broker *bk, struct sess *ss)
{
    struct sess *after = bk->gap_tail;

    while (after != NULL && after->end_ms > ss->end_ms) {
        after = after->gap_prev;
    }
    ss->gap_prev = after;
    ss->gap_next = after ? after->gap_next : bk->gap_head;
    if (ss->gap_next != NULL) {
        ss->gap_next->gap_prev = ss;
    } else {
        bk->gap_tail = ss;
    }
    if (after != NULL) {
        after->gap_next = ss;
    } else {
        bk->gap_head = ss;
    }
    bk->ngap++;
}

/* Free the held subscriptions that hold nothing any more. */
static void
prune(struct broker *bk, struct sess *ss)
{
    struct sub *s = ss->held, *next;

    for (; s != NULL; s = next) {
        next = s->next;
        if (s->cons.inflight == 0) {
            dispatch_unsubscribe(bk, s); /* unlinks it from ss */
        }
    }
}

/* End ss: what it holds fails as at a disconnect (released instead at a
 * clean shutdown); ss is freed. */
static void
session_end(struct broker *bk, struct sess *ss)
{
    while (ss->held != NULL) {
        if (bk->shutting_down) {
            dispatch_release_held(bk, ss->held);
        }
        dispatch_unsubscribe(bk, ss->held);
    }
    if (ss->conn != NULL) {
        ss->conn->sess = NULL;
    }
    gap_unlink(bk, ss);
    hmap_str_del(&bk->sessions, ss->id);
    pq_free(ss);
}

/* Move s from its connection to ss, paused for good. */
static void
hold(struct broker *bk, struct sess *ss, struct sub *s)
{
    dispatch_sub_release_unsent(bk, s);
    dispatch_sub_unlink(s);
    s->sess = ss;
    s->conn = NULL;
    s->flow_paused = true;
    s->cons.paused = true;
    s->next = ss->held;
    ss->held = s;
    ss->nheld++;
}

/* dispatch_session_closed: see dispatch_int.h. */
bool
dispatch_session_closed(struct broker *bk, struct conn *c)
{
    struct sess *ss = c->sess;
    uint64_t grace = bk->cfg->disconnect_grace_ms;

    if (ss == NULL) {
        return false;
    }
    if (bk->shutting_down || grace == 0 ||
        bk->ngap >= bk->cfg->max_held_sessions) {
        if (!bk->shutting_down && grace > 0) {
            conn_log_bad(c->set, LOG_WARN,
                         "conn %llu %s: session not kept: %u disconnected "
                         "sessions already (max_held_sessions)",
                         (unsigned long long)c->id, c->peer, bk->ngap);
        }
        return false; /* the caller ends the subscriptions and ss */
    }
    while (c->subs != NULL) {
        struct sub *s = c->subs;

        if (s->cons.inflight > 0 && ss->nheld < SESSION_HELD_SUBS_MAX) {
            hold(bk, ss, s);
        } else {
            dispatch_unsubscribe(bk, s);
        }
    }
    c->sess = NULL;
    ss->conn = NULL;
    for (struct sub *s = ss->held; s != NULL; s = s->next) {
        s->conn = NULL;
    }
    prune(bk, ss);
    if (ss->held == NULL) {
        session_end(bk, ss); /* nothing to keep */
        return true;
    }
    snprintf(ss->name, sizeof(ss->name), "%s", c->name);
    snprintf(ss->peer, sizeof(ss->peer), "%s", c->peer);
    ss->end_ms = *bk->now_mono_ms + grace;
    gap_insert(bk, ss);
    log_info("conn %llu %s: session %s keeps %u subscription(s) for %llu ms",
             (unsigned long long)c->id, c->peer, ss->id, ss->nheld,
             (unsigned long long)grace);
    return true;
}

/* dispatch_session_end: see dispatch_int.h. */
void
dispatch_session_end(struct broker *bk, struct conn *c)
{
    if (c->sess != NULL) {
        session_end(bk, c->sess);
    }
}

/* c takes ss over. */
static void
attach(struct broker *bk, struct sess *ss, struct conn *c)
{
    gap_unlink(bk, ss);
    ss->conn = c;
    c->sess = ss;
    prune(bk, ss);
    for (struct sub *s = ss->held; s != NULL; s = s->next) {
        s->conn = c;
    }
}

/* dispatch_session_held: see dispatch_int.h. */
struct sub **
dispatch_session_held(struct sess *ss)
{
    return &ss->held;
}

/* dispatch_session_unheld: see dispatch_int.h. */
void
dispatch_session_unheld(struct sess *ss)
{
    ss->nheld--;
}

/* dispatch_session_hello: see dispatch_int.h. */
bool
dispatch_session_hello(struct conn *c, uint64_t rid, const Protoq__Hello *h,
                       bool *resumed)
{
    struct broker *bk = broker_of(c);
    char ident[sizeof(((struct sess *)0)->ident)];
    struct sess *ss;

    *resumed = false;
    if (h->session_id == NULL || h->session_id[0] == '\0') {
        return true;
    }
    if (!session_id_valid(h->session_id)) {
        conn_fatal(c, rid, PROTOQ__ERROR_CODE__BAD_REQUEST,
                   "session id: want 1-%d printable ASCII bytes",
                   PQ_SESSION_ID_MAX);
        return false;
    }
    ident_of(c, ident, sizeof(ident));
    ss = hmap_str_get(&bk->sessions, h->session_id);
    if (ss == NULL && bk->cfg->disconnect_grace_ms == 0) {
        return true; /* nothing is ever kept: no session needed (one kept
                        before a reload set the grace to 0 may resume) */
    }
    if (ss != NULL && strcmp(ss->ident, ident) != 0) {
        conn_fatal(c, rid, PROTOQ__ERROR_CODE__FORBIDDEN,
                   "session %s belongs to another identity", h->session_id);
        return false;
    }
    if (ss != NULL && ss->conn != NULL) {
        /* Taken over (the old connection may be half-open): it closes,
         * its deliveries go to the session, and on to c below. */
        log_info("conn %llu %s: session %s taken over by conn %llu %s",
                 (unsigned long long)ss->conn->id, ss->conn->peer, ss->id,
                 (unsigned long long)c->id, c->peer);
        conn_close(ss->conn, "session taken over by a new connection");
        ss = hmap_str_get(&bk->sessions, h->session_id);
    }
    if (ss != NULL && !h->session_resume) {
        log_info("conn %llu %s: session %s started afresh: what it held "
                 "goes back",
                 (unsigned long long)c->id, c->peer, ss->id);
        session_end(bk, ss);
        ss = NULL;
    }
    if (ss != NULL) {
        attach(bk, ss, c);
        *resumed = true;
        bk->stats.sessions_resumed++;
        log_info("conn %llu %s: session %s resumed with %u subscription(s)",
                 (unsigned long long)c->id, c->peer, ss->id, ss->nheld);
        return true;
    }
    ss = pq_calloc(1, sizeof(*ss));
    if (ss == NULL) {
        conn_fatal(c, rid, PROTOQ__ERROR_CODE__OVERLOADED,
                   "session: out of memory");
        return false;
    }
    snprintf(ss->id, sizeof(ss->id), "%s", h->session_id);
    memcpy(ss->ident, ident, sizeof(ident));
    if (hmap_str_put(&bk->sessions, ss->id, ss) != PQ_OK) {
        pq_free(ss);
        conn_fatal(c, rid, PROTOQ__ERROR_CODE__OVERLOADED,
                   "session: out of memory");
        return false;
    }
    ss->conn = c;
    c->sess = ss;
    return true;
}

/* dispatch_session_cancels: see dispatch_int.h. */
void
dispatch_session_cancels(struct conn *c)
{
    if (c->sess == NULL) {
        return;
    }
    for (struct sub *s = c->sess->held; s != NULL; s = s->next) {
        for (struct msg *m = s->cons.inflight_head; m != NULL; m = m->next) {
            if (msg_is_cancelled(m)) {
                dispatch_send_cancel(c, m);
            }
        }
    }
}

/* dispatch_session_holder: see dispatch_int.h. */
void
dispatch_session_holder(const struct sub *s, const char **name,
                        const char **peer)
{
    if (s->conn != NULL) {
        *name = s->conn->name;
        *peer = s->conn->peer;
    } else {
        *name = s->sess->name;
        *peer = s->sess->peer;
    }
}

/* dispatch_session_tick: see dispatch_int.h. */
void
dispatch_session_tick(struct broker *bk)
{
    struct sess *ss;

    while ((ss = bk->gap_head) != NULL && ss->end_ms <= *bk->now_mono_ms) {
        log_info("session %s: disconnect grace over: %u subscription(s) "
                 "end, their deliveries are failed attempts",
                 ss->id, ss->nheld);
        bk->stats.sessions_expired++;
        session_end(bk, ss);
    }
}

/* dispatch_session_housekeeping: see dispatch_int.h. */
void
dispatch_session_housekeeping(struct broker *bk)
{
    size_t it = 0;
    struct sess *ss;

    while ((ss = hmap_str_next(&bk->sessions, &it, NULL)) != NULL) {
        if (ss->held != NULL) {
            prune(bk, ss);
        }
        if (ss->held == NULL && ss->conn == NULL) {
            session_end(bk, ss); /* nothing left to resume */
            it = 0;              /* the map changed */
        }
    }
}

/* dispatch_session_deadline: see dispatch_int.h. */
uint64_t
dispatch_session_deadline(const struct broker *bk)
{
    return bk->gap_head != NULL ? bk->gap_head->end_ms : UINT64_MAX;
}

/* dispatch_session_close_all: see dispatch_int.h. */
void
dispatch_session_close_all(struct broker *bk)
{
    size_t it = 0;
    struct sess *ss;

    while ((ss = hmap_str_next(&bk->sessions, &it, NULL)) != NULL) {
        session_end(bk, ss);
        it = 0; /* the map changed */
    }
    hmap_str_fini(&bk->sessions);
}
