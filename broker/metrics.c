/*
 * metrics.c: the HTTP endpoint (see metrics.h). One evhttp on the loop;
 * every page is rendered on request from counters the broker keeps anyway,
 * so having the endpoint costs nothing between scrapes. The HTTP side is
 * bounded: GET and HEAD only, headers up to 8 KiB, no request body, 10 s
 * to send a request or take a reply.
 */
#include "metrics.h"

#include <errno.h>
#include <netinet/in.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include <event2/buffer.h>
#include <event2/event.h>
#include <event2/http.h>

#include "config.h"
#include "conn.h"
#include "dispatch.h"
#include "journal.h"
#include "mem.h"
#include "pqerr.h"
#include "queue.h"
#include "store.h"

enum {
    HTTP_MAX_HEADERS = 8192,
    HTTP_MAX_BODY = 1024,
    HTTP_TIMEOUT_S = 10,
};

struct metrics {
    struct evhttp *http;
    struct metrics_src src;
};

/* ---- the text format ---- */

static void
family(struct evbuffer *b, const char *name, const char *type, const char *help)
{
    evbuffer_add_printf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name,
                        type);
}

/* A label value with \, " and newline escaped. */
static void
label_value(struct evbuffer *b, const char *v)
{
    for (; *v != '\0'; v++) {
        switch (*v) {
        case '\\':
            evbuffer_add(b, "\\\\", 2);
            break;
        case '"':
            evbuffer_add(b, "\\\"", 2);
            break;
        case '\n':
            evbuffer_add(b, "\\n", 2);
            break;
        default:
            evbuffer_add(b, v, 1);
            break;
        }
    }
}

static void
sample(struct evbuffer *b, const char *name, const char *lname,
       const char *lvalue, uint64_t v)
{
    if (lname == NULL) {
        evbuffer_add_printf(b, "%s %llu\n", name, (unsigned long long)v);
        return;
    }
    evbuffer_add_printf(b, "%s{%s=\"", name, lname);
    label_value(b, lvalue);
    evbuffer_add_printf(b, "\"} %llu\n", (unsigned long long)v);
}

static void
scalar(struct evbuffer *b, const char *name, const char *type, const char *help,
       uint64_t v)
{
    family(b, name, type, help);
    sample(b, name, NULL, NULL, v);
}

/* A histogram; bounds and sum are divided by scale (1e9: ns -> s). */
static void
histogram(struct evbuffer *b, const char *name, const char *help,
          const struct histo *h, const uint64_t bounds[HISTO_BUCKETS],
          double scale)
{
    uint64_t cum = 0;

    family(b, name, "histogram", help);
    for (size_t i = 0; i < HISTO_BUCKETS; i++) {
        cum += h->bucket[i];
        evbuffer_add_printf(b, "%s_bucket{le=\"%g\"} %llu\n", name,
                            (double)bounds[i] / scale, (unsigned long long)cum);
    }
    evbuffer_add_printf(b, "%s_bucket{le=\"+Inf\"} %llu\n", name,
                        (unsigned long long)h->count);
    evbuffer_add_printf(b, "%s_sum %.9g\n", name, (double)h->sum / scale);
    evbuffer_add_printf(b, "%s_count %llu\n", name,
                        (unsigned long long)h->count);
}

/* ---- per queue ---- */

typedef uint64_t (*queue_value_fn)(const struct queue *q);

static uint64_t
q_ready(const struct queue *q)
{
    return queue_ready_count(q);
}
static uint64_t
q_delayed(const struct queue *q)
{
    return queue_delayed_count(q);
}
static uint64_t
q_inflight(const struct queue *q)
{
    return queue_inflight_count(q);
}
static uint64_t
q_consumers(const struct queue *q)
{
    return queue_consumer_count(q);
}
static uint64_t
q_bytes(const struct queue *q)
{
    return queue_bytes(q);
}

/* A gauge read through get, or a counter of struct queue_stats at off. */
#define STAT(f) NULL, offsetof(struct queue_stats, f)

static const struct {
    const char *name, *type, *help;
    queue_value_fn get;
    size_t off;
} queue_metrics[] = {
    {"protoq_queue_ready", "gauge", "Messages ready to be delivered.", q_ready,
     0},
    {"protoq_queue_delayed", "gauge",
     "Messages waiting for their delay or retry backoff.", q_delayed, 0},
    {"protoq_queue_inflight", "gauge",
     "Messages delivered and not yet acknowledged.", q_inflight, 0},
    {"protoq_queue_consumers", "gauge", "Subscriptions on the queue.",
     q_consumers, 0},
    {"protoq_queue_bytes", "gauge", "Payload bytes of the queue's messages.",
     q_bytes, 0},
    {"protoq_queue_published_total", "counter",
     "Messages published since the broker started.", STAT(published)},
    {"protoq_queue_acked_total", "counter", "Messages acknowledged.",
     STAT(acked)},
    {"protoq_queue_nacked_total", "counter", "Negative acknowledgements.",
     STAT(nacked)},
    {"protoq_queue_redelivered_total", "counter",
     "Deliveries of a message after its first attempt.", STAT(redelivered)},
    {"protoq_queue_expired_total", "counter", "Messages whose TTL ran out.",
     STAT(expired)},
    {"protoq_queue_dead_lettered_total", "counter",
     "Messages moved to the dead-letter queue.", STAT(dead_lettered)},
};

static void
render_queues(const struct metrics_src *src, struct evbuffer *b)
{
    const struct qset *qs = src->bk->qs;

    for (size_t i = 0; i < sizeof(queue_metrics) / sizeof(queue_metrics[0]);
         i++) {
        family(b, queue_metrics[i].name, queue_metrics[i].type,
               queue_metrics[i].help);
        for (struct queue *q = qs ? qset_first(qs) : NULL; q != NULL;
             q = qset_next(q)) {
            uint64_t v;

            if (queue_metrics[i].get != NULL) {
                v = queue_metrics[i].get(q);
            } else {
                memcpy(&v, (const char *)queue_stats(q) + queue_metrics[i].off,
                       sizeof(v));
            }
            sample(b, queue_metrics[i].name, "queue", queue_name(q), v);
        }
    }
}

/* ---- the broker ---- */

static void
render_connections(const struct metrics_src *src, struct evbuffer *b)
{
    const struct connset *cs = src->cs;
    const struct conn_stats *st = &cs->stats;
    static const enum conn_state states[] = {CONN_HANDSHAKE, CONN_READY,
                                             CONN_CLOSING};

    family(b, "protoq_connections", "gauge",
           "Open client connections by state (handshake: no Hello yet).");
    for (size_t i = 0; i < sizeof(states) / sizeof(states[0]); i++) {
        sample(b, "protoq_connections", "state", conn_state_name(states[i]),
               conn_count_state(cs, states[i]));
    }
    scalar(b, "protoq_connections_accepted_total", "counter",
           "Client connections accepted.", st->conns_accepted);
    family(b, "protoq_connections_refused_total", "counter",
           "Client connections refused at accept, by the limit they hit.");
    sample(b, "protoq_connections_refused_total", "limit", "max_connections",
           st->conns_rejected);
    sample(b, "protoq_connections_refused_total", "limit",
           "max_connections_per_addr", st->conns_rejected_addr);
    family(b, "protoq_connections_closed_total", "counter",
           "Client connections the broker closed, by reason.");
    sample(b, "protoq_connections_closed_total", "reason", "bad_input",
           st->protocol_errors);
    sample(b, "protoq_connections_closed_total", "reason", "frame_timeout",
           st->frame_timeouts);
    sample(b, "protoq_connections_closed_total", "reason", "idle",
           st->idle_closed);
    sample(b, "protoq_connections_closed_total", "reason", "handshake_evicted",
           st->handshake_evicted);
    scalar(b, "protoq_frames_in_total", "counter", "Frames received.",
           st->frames_in);
    scalar(b, "protoq_frames_out_total", "counter", "Frames sent.",
           st->frames_out);
    scalar(b, "protoq_bytes_in_total", "counter",
           "Bytes received from clients.", st->bytes_in);
    scalar(b, "protoq_bytes_out_total", "counter", "Bytes sent to clients.",
           st->bytes_out);
    scalar(b, "protoq_input_paused_total", "counter",
           "Times a connection was not read for memory_high_bytes.",
           st->mem_pauses);
}

static void
render_storage(const struct metrics_src *src, struct evbuffer *b)
{
    const struct broker *bk = src->bk;
    struct store_stats ss = {0};

    if (bk->journal != NULL) {
        journal_store_stats(bk->journal, &ss);
    }
    histogram(b, "protoq_fsync_seconds",
              "Latency of the log's fsyncs (fdatasync).", &ss.fsync_hist,
              HISTO_FSYNC_NS, 1e9);
    histogram(b, "protoq_commit_batch_messages",
              "Messages confirmed by one group commit.", &bk->stats.commit_msgs,
              HISTO_BATCH_MSGS, 1);
    scalar(b, "protoq_disk_full_total", "counter",
           "Publishes refused because the data disk was full.",
           bk->stats.disk_full_refusals);
    scalar(b, "protoq_log_bytes_written_total", "counter",
           "Bytes written to the log.", ss.bytes_written);
}

static void
render_broker(const struct metrics_src *src, struct evbuffer *b)
{
    const struct broker *bk = src->bk;
    const struct config *cfg = src->cfg;

    scalar(b, "protoq_auth_failures_total", "counter",
           "Hellos refused for a missing or wrong token.",
           bk->stats.auth_failures);
    scalar(b, "protoq_sessions_disconnected", "gauge",
           "Sessions kept for their disconnect grace.", bk->ngap);
    scalar(b, "protoq_sessions_resumed_total", "counter",
           "Hellos that took over a session kept for its grace.",
           bk->stats.sessions_resumed);
    scalar(b, "protoq_sessions_expired_total", "counter",
           "Disconnect graces that ran out (their deliveries failed).",
           bk->stats.sessions_expired);
    scalar(b, "protoq_memory_bytes", "gauge",
           "Memory the broker allocated (what memory_high_bytes limits).",
           pq_mem_used());
    scalar(b, "protoq_memory_high_bytes", "gauge",
           "memory_high_bytes: past it publishes get OVERLOADED.",
           cfg->memory_high_bytes);
    scalar(b, "protoq_payload_memory_bytes", "gauge",
           "Payload bytes of durable messages kept in memory.",
           bk->journal ? journal_resident_bytes(bk->journal) : 0);
    scalar(b, "protoq_payload_budget_bytes", "gauge",
           "payload_budget_bytes: past it payloads stay on disk.",
           cfg->payload_budget_bytes);
    scalar(b, "protoq_queues", "gauge", "Queues.",
           bk->qs ? qset_queue_count(bk->qs) : 0);
    scalar(b, "protoq_messages", "gauge", "Messages in all queues.",
           bk->qs ? qset_msg_count(bk->qs) : 0);
}

int
metrics_render(const struct metrics_src *src, struct evbuffer *out)
{
    render_queues(src, out);
    render_connections(src, out);
    render_storage(src, out);
    render_broker(src, out);
    return PQ_OK;
}

/* ---- HTTP ---- */

static void
reply_text(struct evhttp_request *req, int code, const char *reason,
           const char *text)
{
    struct evbuffer *b = evbuffer_new();

    evhttp_add_header(evhttp_request_get_output_headers(req), "Content-Type",
                      "text/plain; charset=utf-8");
    if (b == NULL) {
        evhttp_send_error(req, HTTP_INTERNAL, NULL);
        return;
    }
    evbuffer_add(b, text, strlen(text));
    evhttp_send_reply(req, code, reason, b);
    evbuffer_free(b);
}

static void
handle(struct evhttp_request *req, void *arg)
{
    struct metrics *m = arg;
    const char *uri = evhttp_request_get_uri(req);
    size_t plen = strcspn(uri, "?");

    if (plen == 8 && strncmp(uri, "/metrics", plen) == 0) {
        struct evbuffer *b = evbuffer_new();

        if (b == NULL || metrics_render(&m->src, b) != PQ_OK) {
            evhttp_send_error(req, HTTP_INTERNAL, NULL);
        } else {
            evhttp_add_header(evhttp_request_get_output_headers(req),
                              "Content-Type",
                              "text/plain; version=0.0.4; charset=utf-8");
            evhttp_send_reply(req, HTTP_OK, "OK", b);
        }
        if (b != NULL) {
            evbuffer_free(b);
        }
    } else if (plen == 8 && strncmp(uri, "/healthz", plen) == 0) {
        reply_text(req, HTTP_OK, "OK", "ok\n");
    } else if (plen == 7 && strncmp(uri, "/readyz", plen) == 0) {
        if (*m->src.ready) {
            reply_text(req, HTTP_OK, "OK", "ready\n");
        } else {
            reply_text(req, 503, "Service Unavailable", "not ready\n");
        }
    } else {
        reply_text(req, HTTP_NOTFOUND, "Not Found",
                   "not found: try /metrics, /healthz or /readyz\n");
    }
}

int
metrics_open(struct metrics **out, struct event_base *base, const char *addr,
             const struct metrics_src *src, uint16_t *port, char *err,
             size_t errlen)
{
    char host[CONFIG_ADDR_MAX];
    struct evhttp_bound_socket *sock;
    struct sockaddr_storage bound;
    socklen_t blen = sizeof(bound);
    struct metrics *m = NULL;
    uint16_t p;
    int rc = PQ_OK;

    *out = NULL;
    if (config_split_hostport(addr, host, sizeof(host), &p) != PQ_OK) {
        snprintf(err, errlen, "metrics: bad address \"%s\"", addr);
        rc = PQ_EINVAL;
        goto out;
    }
    m = pq_calloc(1, sizeof(*m));
    if (m == NULL || (m->http = evhttp_new(base)) == NULL) {
        snprintf(err, errlen, "metrics %s: out of memory", addr);
        rc = PQ_ENOMEM;
        goto out;
    }
    m->src = *src;
    evhttp_set_max_headers_size(m->http, HTTP_MAX_HEADERS);
    evhttp_set_max_body_size(m->http, HTTP_MAX_BODY);
    evhttp_set_timeout(m->http, HTTP_TIMEOUT_S);
    evhttp_set_allowed_methods(m->http, EVHTTP_REQ_GET | EVHTTP_REQ_HEAD);
    evhttp_set_gencb(m->http, handle, m);
    sock = evhttp_bind_socket_with_handle(m->http, host, p);
    if (sock == NULL) {
        snprintf(err, errlen, "metrics %s: cannot listen: %s", addr,
                 strerror(errno));
        rc = PQ_ESYS;
        goto out;
    }
    *port = p;
    if (getsockname(evhttp_bound_socket_get_fd(sock), (struct sockaddr *)&bound,
                    &blen) == 0) {
        *port = ntohs(bound.ss_family == AF_INET6
                          ? ((struct sockaddr_in6 *)&bound)->sin6_port
                          : ((struct sockaddr_in *)&bound)->sin_port);
    }
    *out = m;
    m = NULL;
out:
    metrics_close(m);
    return rc;
}

void
metrics_close(struct metrics *m)
{
    if (m == NULL) {
        return;
    }
    if (m->http != NULL) {
        evhttp_free(m->http);
    }
    pq_free(m);
}
