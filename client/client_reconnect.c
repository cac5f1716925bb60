/*
 * client_reconnect.c: libprotoq's opt-in reconnect (protoq_opts.reconnect;
 * the contract is in protoq.h, "Reconnect").
 *
 * When a reconnecting handle loses its connection, conn_fail (client.c)
 * fails every outstanding request as on any handle, drops the old
 * connection's socket, buffers and undelivered deliveries, marks the handle
 * down and queues a PROTOQ_CONN_LOST event. The handle then comes back
 * here from its entry points: client_pump (protoq_poll waits for the
 * connection within its own timeout) and client_revive (every other call
 * waits up to the I/O timeout). reconnect_once connects with
 * client_conn_open, the same path as protoq_connect, and subscribes again;
 * the delays between attempts come from the shared backoff (backoff.h).
 *
 * While reconnect_once runs, cb_depth is raised so that no user callback
 * runs in the middle of it (deliveries of the renewed subscriptions wait in
 * the FIFO), and in_reconnect keeps a failure inside it from being seen as
 * a new loss.
 */
#include "client_int.h"
#include "clock.h"

#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* The string fields of protoq_opts, for copying and freeing. */
static const char **
opts_str(struct protoq_opts *o, size_t i)
{
    const char **f[] = {&o->client_name,  &o->auth_token,
                        &o->tls_ca_file,  &o->tls_cert_file,
                        &o->tls_key_file, &o->tls_server_name,
                        &o->session_id};

    return i < sizeof(f) / sizeof(f[0]) ? f[i] : NULL;
}

int
client_reconnect_init(protoq_client *c, const char *hostport,
                      const struct protoq_opts *opts)
{
    const char **dst;
    size_t i;

    c->r_opts = *opts;
    for (i = 0; (dst = opts_str(&c->r_opts, i)) != NULL; i++) {
        if (*dst != NULL) {
            *dst = strdup(*dst);
            if (*dst == NULL) {
                goto nomem;
            }
        }
    }
    /* A reconnect resumes the session; session_fresh was for the first
     * connection only. */
    c->r_opts.session_fresh = false;
    c->r_hostport = strdup(hostport ? hostport : "");
    if (c->r_hostport == NULL) {
        goto nomem;
    }
    backoff_init(&c->backoff, opts->reconnect_min_ms, opts->reconnect_max_ms,
                 clock_mono_ns() ^ (uint64_t)getpid() ^ (uintptr_t)c);
    c->can_reconnect = true;
    return PQ_OK;

nomem:
    client_reconnect_fini(c);
    return client_set_err(c, PQ_ENOMEM, "out of memory (reconnect options)");
}

void
client_reconnect_fini(protoq_client *c)
{
    const char **dst;
    size_t i;

    for (i = 0; (dst = opts_str(&c->r_opts, i)) != NULL; i++) {
        free((char *)*dst);
        *dst = NULL;
    }
    free(c->r_hostport);
    c->r_hostport = NULL;
    c->can_reconnect = false;
}

/* Subscribe again to every subscription, with its last prefetch. One the
 * broker refuses (its queue is gone, ...) is dropped with a
 * PROTOQ_CONN_SUB_LOST event. PQ_OK, or the connection error. */
static int
resubscribe_all(protoq_client *c)
{
    size_t i = 0;

    while (i < c->n_subs) {
        struct sub *s = &c->subs[i];
        uint64_t id = s->id;
        uint64_t wire_id;
        struct waiter w;
        int rc;

        memset(&w, 0, sizeof(w));
        w.resub_id = id;
        rc = s->queue == NULL
                 ? client_set_err(c, PQ_EINVAL,
                                  "subscription %llu: queue "
                                  "unknown",
                                  (unsigned long long)id)
                 : client_subscribe_wire(c, s->queue, s->prefetch, s->paused,
                                         s->tags, s->n_tags, &w, &wire_id);
        if (rc == PQ_EREMOTE || rc == PQ_EINVAL) {
            client_defer_event(c, PROTOQ_CONN_SUB_LOST, rc, id);
            client_sub_forget(c, id); /* the last one moved to slot i */
            continue;
        }
        if (rc != PQ_OK) {
            return rc;
        }
        i++;
    }
    return PQ_OK;
}

/* A Hello the broker refused for good: trying again cannot help. */
static bool
refused_for_good(const protoq_client *c, int rc)
{
    return rc == PQ_EVERSION ||
           (rc == PQ_EREMOTE &&
            (c->last_code == PROTOQ_CODE_UNAUTHORIZED ||
             c->last_code == PROTOQ_CODE_FORBIDDEN ||
             c->last_code == PROTOQ_CODE_UNSUPPORTED_VERSION));
}

/* One attempt: connect, handshake, subscribe again. PQ_OK with the handle
 * live (a PROTOQ_CONN_RESTORED queued), or the error with it still down
 * (or dead for good). */
static int
reconnect_once(protoq_client *c)
{
    int rc;

    c->in_reconnect = true;
    c->cb_depth++;
    rc = client_conn_open(c, c->r_hostport, &c->r_opts);
    if (refused_for_good(c, rc)) {
        c->in_reconnect = false;
        c->cb_depth--;
        c->down = false;
        c->can_reconnect = false;
        return rc;
    }
    if (rc == PQ_OK) {
        rc = resubscribe_all(c);
    }
    if (rc == PQ_OK && c->dead) {
        rc = client_dead_err(c);
    }
    c->cb_depth--;
    c->in_reconnect = false;
    if (rc != PQ_OK) {
        return rc;
    }
    c->down = false;
    c->reconnects++;
    backoff_reset(&c->backoff);
    client_defer_event(c, PROTOQ_CONN_RESTORED, PQ_OK, 0);
    return PQ_OK;
}

/* Sleep ms (> 0); false when a signal interrupted it. */
static bool
nap(int ms)
{
    return poll(NULL, 0, ms) == 0 || errno != EINTR;
}

int
client_revive_until(protoq_client *c, int64_t deadline)
{
    char last[sizeof(c->dead_msg)];

    if (!c->dead) {
        return PQ_OK;
    }
    if (!c->down || c->in_reconnect) {
        return client_dead_err(c);
    }
    for (;;) {
        int64_t wait = c->retry_at_ms - (int64_t)clock_mono_ms();
        int left = client_remaining_ms(deadline);
        int rc;

        if (left >= 0 && wait > left) {
            if (left > 0 && !nap(left)) {
                c->interrupted = true;
            }
            break;
        }
        if (wait > 0 && !nap((int)wait)) {
            c->interrupted = true;
            break;
        }
        rc = reconnect_once(c);
        if (rc == PQ_OK || !c->down) {
            return rc == PQ_OK ? PQ_OK : client_dead_err(c);
        }
        c->retry_at_ms = (int64_t)clock_mono_ms() + backoff_next(&c->backoff);
    }
    snprintf(last, sizeof(last), "%s", c->dead_msg);
    return client_set_err(c, PQ_ECLOSED,
                          "not connected to %s: reconnecting (%s)",
                          c->r_hostport, last);
}

int
client_revive(protoq_client *c)
{
    if (!c->dead) {
        return PQ_OK;
    }
    return client_revive_until(c, client_deadline_after(c->io_timeout_ms));
}

/* protoq_set_conn_cb: the connection event callback. */
void
protoq_set_conn_cb(protoq_client *c, protoq_conn_fn cb, void *arg)
{
    c->conn_cb = cb;
    c->conn_arg = arg;
}

/* protoq_reconnects: connections restored so far. */
uint64_t
protoq_reconnects(const protoq_client *c)
{
    return c->reconnects;
}

/* protoq_connected: a live connection. */
bool
protoq_connected(const protoq_client *c)
{
    return c != NULL && !c->dead;
}
