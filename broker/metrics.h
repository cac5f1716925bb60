/*
 * metrics.h: protoqd's HTTP side (libevent's evhttp) on the `metrics`
 * address: /metrics in the Prometheus text format (version 0.0.4),
 * /healthz (200 while the process serves) and /readyz (200 once recovery
 * is done and the client listener accepts, 503 otherwise). It runs on the
 * broker's event loop and only reads: the server hands it what to read
 * through struct metrics_src, so it depends on the modules below the
 * server (conn, dispatch) and never on the server itself.
 */
#ifndef PQ_METRICS_H
#define PQ_METRICS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct broker;
struct config;
struct connset;
struct event_base;
struct evbuffer;
struct metrics;

/* What the endpoint reads, borrowed from the server for its lifetime. */
struct metrics_src {
    const struct config *cfg;
    const struct connset *cs;
    struct broker *bk;
    const bool *ready; /* recovered and accepting */
};

/*
 * metrics_open: serve src on addr (HOST:PORT; port 0 picks one, returned
 * in *port). PQ_OK, or a PQ_* code with the reason in err.
 */
int metrics_open(struct metrics **out, struct event_base *base,
                 const char *addr, const struct metrics_src *src,
                 uint16_t *port, char *err, size_t errlen);

/* metrics_close: stop serving and free m (NULL: nothing). */
void metrics_close(struct metrics *m);

/* metrics_render: the /metrics page into out. PQ_OK or PQ_ENOMEM. */
int metrics_render(const struct metrics_src *src, struct evbuffer *out);

#endif
