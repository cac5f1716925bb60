/*
 * server.c: the event loop of protoqd. Owns the event_base, the listener,
 * the signal events, the one deadline timer and the 1 s housekeeping timer,
 * and runs the loop pass (memcached's worker loop, redis's beforeSleep):
 *
 *     run the ready callbacks        (event_base_loop EVLOOP_ONCE)
 *     dispatch_pass                  (deliver, submit the batch, confirm)
 *     conn_flush_all                 (one writev per connection with output)
 *     conn_reap                      (free closed connections)
 *     arm the deadline timer         (qset_next_deadline)
 *
 * Because confirms are only sent from dispatch after the store reports a
 * batch durable, no reply that promises durability reaches a socket early.
 */
#include "server.h"

#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <event2/event.h>
#include <event2/listener.h>

#include "auth.h"
#include "conn.h"
#include "dispatch.h"
#include "log.h"
#include "mem.h"
#include "metrics.h"
#include "pqerr.h"
#include "queue.h"
#include "journal.h"
#include "store.h"
#include "tls.h"
#include "units.h"

#include <openssl/ssl.h>

/* ---- systemd notification (sd_notify without libsystemd) ---- */

static void
sd_notify_msg(const char *msg)
{
    const char *path = getenv("NOTIFY_SOCKET");
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    socklen_t len;
    int fd;

    if (path == NULL || (path[0] != '/' && path[0] != '@') ||
        strlen(path) >= sizeof(sa.sun_path)) {
        return;
    }
    memcpy(sa.sun_path, path, strlen(path));
    if (sa.sun_path[0] == '@') {
        sa.sun_path[0] = '\0'; /* abstract namespace */
    }
    len = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + strlen(path));
    fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        return;
    }
    if (sendto(fd, msg, strlen(msg), 0, (struct sockaddr *)&sa, len) < 0) {
        log_warn("sd_notify %s: %s", path, strerror(errno));
    }
    close(fd);
}

/* sd_status: STATUS=, the line `systemctl status` shows. */
static void
sd_status(struct server *srv, const char *what)
{
    char msg[256];

    snprintf(msg, sizeof(msg),
             "STATUS=%s; %u connections, %zu queues, %zu messages, "
             "memory %zu MiB",
             what, srv->cs.nconns,
             srv->broker.qs ? qset_queue_count(srv->broker.qs) : 0,
             srv->broker.qs ? qset_msg_count(srv->broker.qs) : 0,
             pq_mem_used() >> 20);
    sd_notify_msg(msg);
}

/*
 * sd_watchdog_us: how often to send WATCHDOG=1 (half of $WATCHDOG_USEC),
 * or 0 when systemd does not watch this process.
 */
static uint64_t
sd_watchdog_us(void)
{
    const char *usec = getenv("WATCHDOG_USEC");
    const char *pid = getenv("WATCHDOG_PID");
    unsigned long long v;
    char *end;

    if (usec == NULL || getenv("NOTIFY_SOCKET") == NULL) {
        return 0;
    }
    if (pid != NULL && strtol(pid, NULL, 10) != (long)getpid()) {
        return 0;
    }
    errno = 0;
    v = strtoull(usec, &end, 10);
    if (errno != 0 || end == usec || *end != '\0' || v == 0) {
        return 0;
    }
    return v / 2;
}

/* ---- callbacks ---- */

static void
accept_cb(struct evconnlistener *l, evutil_socket_t fd, struct sockaddr *sa,
          int salen, void *arg)
{
    struct server *srv = arg;

    srv->now_mono_ms = clock_mono_ms();
    conn_accept(&srv->cs, fd, sa, salen,
                l == srv->tls_listener ? srv->tls_ctx : NULL);
}

static void
accept_error_cb(struct evconnlistener *l, void *arg)
{
    struct server *srv = arg;
    int err = EVUTIL_SOCKET_ERROR();

    (void)srv;
    /* EMFILE and friends: pause accepting for a moment instead of spinning. */
    log_warn("accept: %s; pausing accepts for 1 s",
             evutil_socket_error_to_string(err));
    evconnlistener_disable(l);
    srv->listener_paused_ms = clock_mono_ms();
}

/*
 * reload_tls: SIGHUP reads the certificate, key and client CAs again
 * (also when the paths did not change: renewing a certificate in place is
 * the usual case). New connections get the new context; open ones keep
 * theirs. A file that does not load keeps the old context, and says why.
 */
static void
reload_tls(struct server *srv)
{
    SSL_CTX *ctx = NULL;
    char err[512];

    if (srv->tls_listener == NULL) {
        return;
    }
    if (tls_server_ctx_new(&srv->cfg, &ctx, err, sizeof(err)) != PQ_OK) {
        log_warn("SIGHUP: TLS certificate not reloaded, new connections "
                 "keep the previous one: %s",
                 err);
        return;
    }
    SSL_CTX_free(srv->tls_ctx); /* open connections hold their own ref */
    srv->tls_ctx = ctx;
    log_info("SIGHUP: TLS certificate reloaded from %s", srv->cfg.tls_cert);
}

static void
signal_cb(evutil_socket_t sig, short what, void *arg)
{
    struct server *srv = arg;

    (void)what;
    if (sig == SIGHUP) {
        char err[512] = "";

        /* Tokens first, and whatever the conf file holds: a broken conf
         * must not keep a revoked token alive. */
        if (srv->auth != NULL) {
            if (server_load_auth(srv, err, sizeof(err)) != PQ_OK) {
                log_err("SIGHUP: %s; the previous %zu tokens stay in force",
                        err, auth_table_count(srv->auth));
            } else {
                log_info("SIGHUP: reloaded %s (%zu tokens)", srv->cfg.auth_file,
                         auth_table_count(srv->auth));
            }
            err[0] = '\0';
        }
        if (srv->conf_path[0] == '\0') {
            log_info("SIGHUP: no config file to reload");
            return;
        }
        if (config_reload_file(&srv->cfg, srv->conf_path, err, sizeof(err)) !=
            PQ_OK) {
            log_warn("SIGHUP: reload %s failed, nothing changed: %s",
                     srv->conf_path, err);
            return;
        }
        log_set_level(srv->cfg.log_level);
        log_set_json(srv->cfg.log_format == 1);
        log_info("SIGHUP: reloaded %s%s%s", srv->conf_path, err[0] ? "; " : "",
                 err);
        reload_tls(srv);
        return;
    }
    log_info("%s: shutting down", sig == SIGINT ? "SIGINT" : "SIGTERM");
    srv->stopping = true;
    event_base_loopbreak(srv->base);
}

/* The loop is alive: a timer on it tells systemd so (a wedged loop stops
 * telling, and systemd restarts protoqd after WatchdogSec). */
static void
watchdog_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg;
    sd_notify_msg("WATCHDOG=1");
}

static void
deadline_cb(evutil_socket_t fd, short what, void *arg)
{
    struct server *srv = arg;

    (void)fd;
    (void)what;
    srv->now_mono_ms = clock_mono_ms();
    dispatch_tick(&srv->broker);
}

/*
 * log_summary: one line at info level every SUMMARY_MS with the broker's
 * counters (since start), so an operator sees load and disk health in the
 * journal without a metrics endpoint; only when something happened since
 * the last line (an idle broker does not repeat it every minute). The
 * environment's PROTOQ_SUMMARY_MS changes the interval (for tests).
 */
enum { SUMMARY_MS = 60000, STATUS_MS = 10000 };

/* activity_count: a sum that grows with every connection, frame and
 * durable batch: unchanged means nothing happened. */
static uint64_t
activity_count(const struct server *srv)
{
    const struct conn_stats *cst = &srv->cs.stats;

    return cst->conns_accepted + cst->conns_rejected + cst->protocol_errors +
           cst->frames_in + cst->frames_out +
           srv->broker.stats.batches_durable +
           srv->broker.stats.disk_full_refusals;
}

/* summary_interval_ms: SUMMARY_MS, or $PROTOQ_SUMMARY_MS when set. */
static uint64_t
summary_interval_ms(void)
{
    const char *e = getenv("PROTOQ_SUMMARY_MS");
    uint64_t v;

    if (e != NULL && units_parse_u64(e, &v) == PQ_OK && v > 0) {
        return v;
    }
    return SUMMARY_MS;
}

static void
log_summary(struct server *srv)
{
    const struct broker_stats *s = &srv->broker.stats;
    const struct conn_stats *cst = &srv->cs.stats;
    struct store_stats ss = {0};
    uint64_t act = activity_count(srv);

    if (act == srv->summary_activity) {
        return;
    }
    srv->summary_activity = act;
    if (srv->broker.journal != NULL) {
        journal_store_stats(srv->broker.journal, &ss);
    }
    log_info(
        "summary: connections %u (accepted %llu, refused %llu, closed "
        "for bad input %llu); frames in %llu out %llu; queues %zu, "
        "messages %zu; durable batches %llu, fsyncs %llu (mean %llu us, "
        "max %llu us); publishes refused for disk %llu; auth failures %llu; "
        "memory %zu bytes",
        srv->cs.nconns, (unsigned long long)cst->conns_accepted,
        (unsigned long long)cst->conns_rejected,
        (unsigned long long)cst->protocol_errors,
        (unsigned long long)cst->frames_in, (unsigned long long)cst->frames_out,
        qset_queue_count(srv->broker.qs), qset_msg_count(srv->broker.qs),
        (unsigned long long)s->batches_durable, (unsigned long long)ss.fsyncs,
        (unsigned long long)(ss.fsyncs ? ss.fsync_ns_total / ss.fsyncs / 1000
                                       : 0),
        (unsigned long long)(ss.fsync_ns_max / 1000),
        (unsigned long long)s->disk_full_refusals,
        (unsigned long long)s->auth_failures, pq_mem_used());
}

/*
 * trim_memory: once usage fell TRIM_MIN_BYTES below its peak since the last
 * trim (connections holding big frames closed, a queue purged), give the
 * free heap pages back to the system, so that RSS follows usage down.
 * malloc_trim walks the free lists: about a millisecond per 100 MiB freed
 * here, at most once a second.
 */
enum { TRIM_MIN_BYTES = 16 * 1024 * 1024 };

static void
trim_memory(struct server *srv)
{
    size_t used = pq_mem_used();
    uint64_t t0;

    if (used > srv->mem_peak) {
        srv->mem_peak = used;
    }
    if (srv->mem_peak - used < TRIM_MIN_BYTES) {
        return;
    }
    t0 = clock_mono_ns();
    malloc_trim(0);
    log_debug("malloc_trim: usage %zu bytes, %zu below its peak; took %llu us",
              used, srv->mem_peak - used,
              (unsigned long long)((clock_mono_ns() - t0) / 1000));
    srv->mem_peak = used;
}

static void
housekeeping_cb(evutil_socket_t fd, short what, void *arg)
{
    struct server *srv = arg;

    (void)fd;
    (void)what;
    srv->now_mono_ms = clock_mono_ms();
    if (srv->listener_paused_ms &&
        srv->now_mono_ms - srv->listener_paused_ms >= 1000) {
        srv->listener_paused_ms = 0;
        if (srv->listener) {
            evconnlistener_enable(srv->listener);
        }
        if (srv->tls_listener) {
            evconnlistener_enable(srv->tls_listener);
        }
    }
    conn_housekeeping(&srv->cs, srv->now_mono_ms);
    dispatch_housekeeping(&srv->broker);
    trim_memory(srv);
    if (srv->now_mono_ms - srv->summary_ms >= srv->summary_every_ms) {
        srv->summary_ms = srv->now_mono_ms;
        log_summary(srv);
    }
    if (srv->now_mono_ms - srv->status_ms >= STATUS_MS) {
        srv->status_ms = srv->now_mono_ms;
        sd_status(srv, srv->status_text);
    }
}

static void
store_cb(evutil_socket_t fd, short what, void *arg)
{
    struct server *srv = arg;

    (void)fd;
    (void)what;
    srv->now_mono_ms = clock_mono_ms();
    dispatch_store_event(&srv->broker);
}

static void
work_cb(evutil_socket_t fd, short what, void *arg)
{
    (void)fd;
    (void)what;
    (void)arg; /* only wakes the loop; the pass does the work */
}

/* ---- listener ---- */

/* The port file: the client port, then `metrics PORT` when it is on. */
static int
write_port_file(const char *path, uint16_t port, uint16_t metrics_port,
                char *err, size_t errlen)
{
    char tmp[CONFIG_PATH_MAX + 8];
    FILE *f;

    snprintf(tmp, sizeof(tmp), "%s.tmp", path);
    f = fopen(tmp, "w");
    if (f == NULL) {
        snprintf(err, errlen, "open %s: %s", tmp, strerror(errno));
        return PQ_ESYS;
    }
    fprintf(f, "%u\n", port);
    if (metrics_port != 0) {
        fprintf(f, "metrics %u\n", metrics_port);
    }
    if (fclose(f) != 0 || rename(tmp, path) != 0) {
        snprintf(err, errlen, "write %s: %s", path, strerror(errno));
        return PQ_ESYS;
    }
    return PQ_OK;
}

/*
 * open_listener: bind addr (the value of config key `key`) and report the
 * bound port in *port (server_init writes the port files).
 */
static int
open_listener(struct server *srv, const char *key, const char *addr,
              struct evconnlistener **out, uint16_t *port, char *err,
              size_t errlen)
{
    struct evutil_addrinfo hints = {0}, *ai = NULL;
    struct sockaddr_storage bound;
    socklen_t blen = sizeof(bound);
    char host[CONFIG_ADDR_MAX], portstr[8];
    struct evconnlistener *l;
    uint16_t want;
    int rc;

    if (config_split_hostport(addr, host, sizeof(host), &want) != PQ_OK) {
        snprintf(err, errlen, "%s: bad address \"%s\"", key, addr);
        return PQ_EINVAL;
    }
    snprintf(portstr, sizeof(portstr), "%u", want);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = EVUTIL_AI_PASSIVE | EVUTIL_AI_ADDRCONFIG;
    rc = evutil_getaddrinfo(host, portstr, &hints, &ai);
    if (rc != 0) {
        snprintf(err, errlen, "%s %s: %s", key, addr, evutil_gai_strerror(rc));
        return PQ_EINVAL;
    }
    l = evconnlistener_new_bind(srv->base, accept_cb, srv,
                                LEV_OPT_CLOSE_ON_FREE | LEV_OPT_REUSEABLE |
                                    LEV_OPT_CLOSE_ON_EXEC,
                                1024, ai->ai_addr, (int)ai->ai_addrlen);
    evutil_freeaddrinfo(ai);
    if (l == NULL) {
        snprintf(err, errlen, "%s %s: %s", key, addr, strerror(errno));
        return PQ_ESYS;
    }
    *out = l;
    evconnlistener_set_error_cb(l, accept_error_cb);
    if (getsockname(evconnlistener_get_fd(l), (struct sockaddr *)&bound,
                    &blen) == 0) {
        *port = ntohs(bound.ss_family == AF_INET6
                          ? ((struct sockaddr_in6 *)&bound)->sin6_port
                          : ((struct sockaddr_in *)&bound)->sin_port);
    }
    log_info("%s on %s (port %u)",
             strcmp(key, "listen") == 0 ? "listening" : "listening for TLS",
             addr, *port);
    return PQ_OK;
}

/* open_listeners: the plain and the TLS listener, each if configured. */
static int
open_listeners(struct server *srv, char *err, size_t errlen)
{
    int rc;

    if (srv->cfg.tls_listen[0] != '\0' && srv->tls_ctx == NULL) {
        rc = tls_server_ctx_new(&srv->cfg, &srv->tls_ctx, err, errlen);
        if (rc != PQ_OK) {
            return rc;
        }
    }
    if (srv->cfg.tls_listen[0] != '\0') {
        rc = open_listener(srv, "tls_listen", srv->cfg.tls_listen,
                           &srv->tls_listener, &srv->tls_port, err, errlen);
        if (rc != PQ_OK) {
            return rc;
        }
    }
    if (srv->cfg.listen[0] != '\0') {
        rc = open_listener(srv, "listen", srv->cfg.listen, &srv->listener,
                           &srv->port, err, errlen);
        if (rc != PQ_OK) {
            return rc;
        }
    }
    /* The broker id names the port clients reach it on. */
    srv->broker.port = srv->listener != NULL ? srv->port : srv->tls_port;
    return PQ_OK;
}

/* The HTTP side, when the config names an address for it. */
static int
open_metrics(struct server *srv, char *err, size_t errlen)
{
    const struct metrics_src src = {
        .cfg = &srv->cfg,
        .cs = &srv->cs,
        .bk = &srv->broker,
        .ready = &srv->ready,
    };
    int rc;

    if (srv->cfg.metrics[0] == '\0') {
        return PQ_OK;
    }
    rc = metrics_open(&srv->metrics, srv->base, srv->cfg.metrics, &src,
                      &srv->metrics_port, err, errlen);
    if (rc == PQ_OK) {
        log_info("metrics on %s (port %u): /metrics, /healthz, /readyz",
                 srv->cfg.metrics, srv->metrics_port);
    }
    return rc;
}

/* ---- tokens ---- */

/* server_load_auth: see server.h. */
int
server_load_auth(struct server *srv, char *err, size_t errlen)
{
    struct auth_table *t = NULL;
    int rc;

    if (srv->cfg.auth_file[0] == '\0') {
        return PQ_OK;
    }
    rc = auth_table_load(srv->cfg.auth_file, &t, err, errlen);
    if (rc != PQ_OK) {
        return rc;
    }
    /* Each connection finds its token again by name and hash (dispatch.c);
     * those whose token is gone are closed now, so the old table can go. */
    auth_table_free(srv->auth);
    srv->auth = t;
    srv->broker.auth = t;
    srv->broker.auth_gen++;
    for (struct conn *c = srv->cs.conns, *next; c != NULL; c = next) {
        next = c->next;
        dispatch_auth_recheck(&srv->broker, c);
    }
    return PQ_OK;
}

/* ---- life cycle ---- */

/* The broker met a fatal storage error: end the loop (exit_code is set). */
static void
stop_loop(void *owner)
{
    struct server *srv = owner;

    srv->stopping = true;
    event_base_loopbreak(srv->base);
}

/* Wiring: conn.c reports frames, closes and output pressure; dispatch.c
 * handles them. conn.c includes neither server.h nor dispatch.h. */
static const struct conn_handler conn_to_dispatch = {
    .frame = dispatch_frame,
    .closed = dispatch_conn_closed,
    .output = dispatch_conn_output,
};

int
server_init(struct server *srv, char *err, size_t errlen)
{
    uint64_t wd_us;
    int rc;

    signal(SIGPIPE, SIG_IGN);
    srv->now_mono_ms = clock_mono_ms();
    srv->summary_ms = srv->now_mono_ms;
    srv->summary_every_ms = summary_interval_ms();
    srv->base = event_base_new();
    if (srv->base == NULL) {
        snprintf(err, errlen, "event_base_new failed");
        return PQ_ENOMEM;
    }
    /* The connections report to the protocol state machine. */
    srv->cs.base = srv->base;
    srv->cs.cfg = &srv->cfg;
    srv->cs.now_mono_ms = &srv->now_mono_ms;
    srv->cs.h = &conn_to_dispatch;
    srv->cs.arg = &srv->broker;
    srv->broker.cfg = &srv->cfg;
    srv->broker.now_mono_ms = &srv->now_mono_ms;
    srv->broker.stop = stop_loop;
    srv->broker.owner = srv;
    /* Signals first: once the port file exists a SIGTERM must find its
     * handler (not the default action, which would exit 143). */
    srv->sig_int = evsignal_new(srv->base, SIGINT, signal_cb, srv);
    srv->sig_term = evsignal_new(srv->base, SIGTERM, signal_cb, srv);
    srv->sig_hup = evsignal_new(srv->base, SIGHUP, signal_cb, srv);
    if (!srv->sig_int || !srv->sig_term || !srv->sig_hup ||
        event_add(srv->sig_int, NULL) != 0 ||
        event_add(srv->sig_term, NULL) != 0 ||
        event_add(srv->sig_hup, NULL) != 0) {
        snprintf(err, errlen, "cannot install signal handlers");
        return PQ_ENOMEM;
    }
    sd_status(srv, "recovering the log");
    rc = dispatch_open(&srv->broker, err, errlen);
    if (rc != PQ_OK) {
        return rc;
    }
    srv->now_mono_ms = clock_mono_ms(); /* replay may have taken a while */
    rc = open_listeners(srv, err, errlen);
    if (rc != PQ_OK) {
        return rc;
    }
    rc = open_metrics(srv, err, errlen);
    if (rc != PQ_OK) {
        return rc;
    }
    /* Every listener is open by now, and tls_port_file is written first:
     * whoever waits for port_file finds both ports listening. */
    if (srv->tls_listener != NULL && srv->cfg.tls_port_file[0] != '\0') {
        rc = write_port_file(srv->cfg.tls_port_file, srv->tls_port, 0, err,
                             errlen);
        if (rc != PQ_OK) {
            return rc;
        }
    }
    if (srv->listener != NULL && srv->cfg.port_file[0] != '\0') {
        rc = write_port_file(srv->cfg.port_file, srv->port, srv->metrics_port,
                             err, errlen);
        if (rc != PQ_OK) {
            return rc;
        }
    }
    srv->deadline = evtimer_new(srv->base, deadline_cb, srv);
    srv->housekeeping =
        event_new(srv->base, -1, EV_PERSIST, housekeeping_cb, srv);
    srv->work = event_new(srv->base, -1, 0, work_cb, srv);
    if (!srv->deadline || !srv->housekeeping || !srv->work) {
        snprintf(err, errlen, "cannot create loop events");
        return PQ_ENOMEM;
    }
    if (srv->broker.store_fd >= 0) {
        srv->store_ev = event_new(srv->base, srv->broker.store_fd,
                                  EV_READ | EV_PERSIST, store_cb, srv);
        if (srv->store_ev == NULL) {
            snprintf(err, errlen, "cannot create the store event");
            return PQ_ENOMEM;
        }
        event_add(srv->store_ev, NULL);
    }
    struct timeval one_s = {1, 0};
    event_add(srv->housekeeping, &one_s);
    wd_us = sd_watchdog_us();
    if (wd_us > 0) {
        struct timeval tv = {(time_t)(wd_us / 1000000),
                             (suseconds_t)(wd_us % 1000000)};

        srv->watchdog = event_new(srv->base, -1, EV_PERSIST, watchdog_cb, srv);
        if (srv->watchdog == NULL) {
            snprintf(err, errlen, "cannot create the watchdog timer");
            return PQ_ENOMEM;
        }
        event_add(srv->watchdog, &tv);
        log_info("systemd watchdog: WATCHDOG=1 every %llu ms",
                 (unsigned long long)(wd_us / 1000));
    }
    if (srv->tls_listener == NULL) {
        snprintf(srv->status_text, sizeof(srv->status_text),
                 "serving on port %u", srv->port);
    } else if (srv->listener == NULL) {
        snprintf(srv->status_text, sizeof(srv->status_text),
                 "serving on TLS port %u", srv->tls_port);
    } else {
        snprintf(srv->status_text, sizeof(srv->status_text),
                 "serving on port %u and TLS port %u", srv->port,
                 srv->tls_port);
    }
    return PQ_OK;
}

static void
arm_deadline(struct server *srv)
{
    uint64_t due = dispatch_next_deadline(&srv->broker);
    struct timeval tv;
    uint64_t wait_ms;

    if (due == UINT64_MAX) {
        evtimer_del(srv->deadline);
        return;
    }
    wait_ms = due > srv->now_mono_ms ? due - srv->now_mono_ms : 0;
    tv.tv_sec = (time_t)(wait_ms / 1000);
    tv.tv_usec = (suseconds_t)(wait_ms % 1000) * 1000;
    evtimer_add(srv->deadline, &tv);
}

int
server_run(struct server *srv)
{
    srv->ready = true;
    sd_notify_msg("READY=1");
    sd_status(srv, srv->status_text);
    srv->status_ms = srv->now_mono_ms;
    while (!srv->stopping) {
        event_base_loop(srv->base, EVLOOP_ONCE);
        srv->now_mono_ms = clock_mono_ms();
        if (dispatch_pass(&srv->broker)) {
            event_active(srv->work, EV_TIMEOUT, 0);
        }
        conn_flush_all(&srv->cs);
        conn_reap(&srv->cs);
        conn_resume_reads(&srv->cs);
        arm_deadline(srv);
    }
    srv->ready = false;
    sd_notify_msg("STOPPING=1");
    sd_status(srv, "stopping: giving back held jobs, flushing the log");
    return srv->broker.exit_code;
}

/*
 * server_drain: on shutdown, stop accepting and give pending confirms and
 * output up to a second to go out before the connections are closed.
 */
static void
server_drain(struct server *srv)
{
    uint64_t until = clock_mono_ms() + 1000;

    if (srv->listener) {
        evconnlistener_disable(srv->listener);
    }
    if (srv->tls_listener) {
        evconnlistener_disable(srv->tls_listener);
    }
    srv->stopping = false;
    while (clock_mono_ms() < until && srv->broker.exit_code == 0) {
        bool more = dispatch_pass(&srv->broker);
        bool busy;

        conn_flush_all(&srv->cs);
        busy = more || srv->broker.waits_head != NULL;

        for (struct conn *c = srv->cs.conns; c && !busy; c = c->next) {
            busy = conn_output_pending(c);
        }
        if (!busy) {
            break;
        }
        event_base_loop(srv->base, EVLOOP_ONCE | EVLOOP_NONBLOCK);
        srv->now_mono_ms = clock_mono_ms();
        if (!more) {
            usleep(1000);
        }
    }
    srv->stopping = true;
}

void
server_fini(struct server *srv)
{
    /* Only a server that got as far as its store has anything to drain
     * (a failed server_init ends here too, with parts missing). */
    if (srv->base != NULL && srv->broker.qs != NULL &&
        srv->broker.journal != NULL) {
        server_drain(srv);
    }
    /* A clean stop is not the workers' failure: what they hold goes back
     * as released (attempt and failures as recorded), not as failed. */
    srv->broker.shutting_down = true;
    while (srv->cs.conns) {
        conn_close(srv->cs.conns, "shutdown");
    }
    dispatch_close(&srv->broker);
    /* Nothing is flushed any more: let the reap free every closed conn. */
    for (struct conn *c = srv->cs.flush; c != NULL; c = c->flush_next) {
        c->on_flush = false;
    }
    srv->cs.flush = NULL;
    conn_reap(&srv->cs);
    conn_set_fini(&srv->cs);
    metrics_close(srv->metrics);
    srv->metrics = NULL;
    if (srv->listener) {
        evconnlistener_free(srv->listener);
    }
    if (srv->tls_listener) {
        evconnlistener_free(srv->tls_listener);
    }
    SSL_CTX_free(srv->tls_ctx);
    struct event **evs[] = {&srv->sig_int,  &srv->sig_term,     &srv->sig_hup,
                            &srv->deadline, &srv->housekeeping, &srv->store_ev,
                            &srv->work,     &srv->watchdog};
    for (size_t i = 0; i < sizeof(evs) / sizeof(evs[0]); i++) {
        if (*evs[i]) {
            event_free(*evs[i]);
            *evs[i] = NULL;
        }
    }
    if (srv->base) {
        event_base_free(srv->base);
    }
    srv->broker.auth = NULL;
    auth_table_free(srv->auth);
    srv->auth = NULL;
    libevent_global_shutdown();
}
