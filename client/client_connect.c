/*
 * client_connect.c: a libprotoq handle's connection: the address, the TCP
 * connect bounded by the connect timeout, TLS, the Hello/Welcome handshake
 * (token, heartbeat, session), and protoq_connect, which makes the handle.
 * The connection's I/O, the request ring, dispatching, dropping a lost
 * connection's state and protoq_close are client.c's.
 */
#include "client_int.h"
#include "clock.h"
#include "pqlimits.h"
#include "strcheck.h"

#include <errno.h>
#include <netdb.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

static const char TLS_SCHEME[] = "tls://"; /* 6 bytes */

/* Split "host:port", "[v6]:port", "host" into host and port strings. */
static int
parse_hostport(const char *hp, char *host, size_t hostcap, char *port,
               size_t portcap)
{
    const char *colon;
    size_t hl;

    if (hp == NULL || hp[0] == '\0') {
        hp = "127.0.0.1";
    }
    if (hp[0] == '[') {
        const char *end = strchr(hp, ']');

        if (end == NULL) {
            return PQ_EINVAL;
        }
        hl = (size_t)(end - hp - 1);
        if (hl >= hostcap) {
            return PQ_EINVAL;
        }
        memcpy(host, hp + 1, hl);
        host[hl] = '\0';
        if (end[1] == '\0') {
            snprintf(port, portcap, "%d", PROTOQ_DEFAULT_PORT);
            return PQ_OK;
        }
        if (end[1] != ':' || end[2] == '\0') {
            return PQ_EINVAL;
        }
        snprintf(port, portcap, "%s", end + 2);
        return PQ_OK;
    }
    colon = strrchr(hp, ':');
    if (colon == NULL || strchr(hp, ':') != colon) {
        /* no port, or a bare IPv6 address */
        if (strlen(hp) >= hostcap) {
            return PQ_EINVAL;
        }
        snprintf(host, hostcap, "%s", hp);
        snprintf(port, portcap, "%d", PROTOQ_DEFAULT_PORT);
        return PQ_OK;
    }
    hl = (size_t)(colon - hp);
    if (hl == 0 || hl >= hostcap || colon[1] == '\0' ||
        strlen(colon + 1) >= portcap) {
        return PQ_EINVAL;
    }
    memcpy(host, hp, hl);
    host[hl] = '\0';
    snprintf(port, portcap, "%s", colon + 1);
    return PQ_OK;
}

/* Connect a non-blocking socket to one address within deadline. Returns
 * the fd, or -1 with errno set. */
static int
connect_one(const struct addrinfo *ai, int64_t deadline)
{
    int fd =
        socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC,
               ai->ai_protocol);
    int one = 1;
    int err;
    socklen_t len = sizeof(err);

    if (fd < 0) {
        return -1;
    }
    if (connect(fd, ai->ai_addr, ai->ai_addrlen) < 0) {
        struct pollfd pfd = {.fd = fd, .events = POLLOUT};
        int rc;

        if (errno != EINPROGRESS) {
            goto err_close;
        }
        do {
            rc = poll(&pfd, 1, client_remaining_ms(deadline));
        } while (rc < 0 && errno == EINTR);
        if (rc == 0) {
            errno = ETIMEDOUT;
            goto err_close;
        }
        if (rc < 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) {
            goto err_close;
        }
        if (err != 0) {
            errno = err;
            goto err_close;
        }
    }
    (void)setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    return fd;

err_close:
    err = errno;
    close(fd);
    errno = err;
    return -1;
}

static int
do_connect(protoq_client *c, const char *hostport, int64_t deadline, char *host,
           size_t hostcap)
{
    char port[32];
    struct addrinfo hints;
    struct addrinfo *res = NULL;
    struct addrinfo *ai;
    int rc;
    int err = 0;

    if (parse_hostport(hostport, host, hostcap, port, sizeof(port)) != PQ_OK) {
        return client_conn_fail(c, PQ_EINVAL,
                                "bad server address '%s' (want HOST:PORT or "
                                "[IPV6]:PORT)",
                                hostport);
    }
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    rc = getaddrinfo(host, port, &hints, &res);
    if (rc != 0) {
        return client_conn_fail(c, PQ_EINVAL, "cannot resolve %s port %s: %s",
                                host, port, gai_strerror(rc));
    }
    for (ai = res; ai != NULL; ai = ai->ai_next) {
        c->fd = connect_one(ai, deadline);
        if (c->fd >= 0) {
            break;
        }
        err = errno;
    }
    freeaddrinfo(res);
    if (c->fd < 0) {
        return client_conn_fail(c, err == ETIMEDOUT ? PQ_ETIMEDOUT : PQ_ECLOSED,
                                "cannot connect to %s: %s", hostport,
                                strerror(err));
    }
    return PQ_OK;
}

_Static_assert((int)PROTOQ_SESSION_ID_MAX == (int)PQ_SESSION_ID_MAX,
               "session id limits differ");

/* protoq_session_id_new: 128 random bits in hex. */
int
protoq_session_id_new(char *buf, size_t cap)
{
    uint8_t r[16];

    if (cap < 2 * sizeof(r) + 1) {
        return PQ_EINVAL;
    }
    if (getrandom(r, sizeof(r), 0) != (ssize_t)sizeof(r)) {
        return PQ_ESYS;
    }
    for (size_t i = 0; i < sizeof(r); i++) {
        snprintf(buf + 2 * i, 3, "%02x", r[i]);
    }
    return PQ_OK;
}

static int
handshake(protoq_client *c, const struct protoq_opts *o)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Hello h = PROTOQ__HELLO__INIT;
    Protoq__Frame *r;
    const Protoq__Welcome *w;
    int rc;

    h.protocol_version = PROTOQ_PROTOCOL_VERSION;
    h.client_name = S(o && o->client_name ? o->client_name : "libprotoq");
    h.auth_token = S(o ? o->auth_token : NULL);
    h.heartbeat_ms = o ? o->heartbeat_ms : 0;
    if (o != NULL && o->session_id != NULL) {
        if (!session_id_valid(o->session_id)) {
            return client_conn_fail(
                c, PQ_EINVAL, "session id: want 1-%d printable ASCII bytes",
                PROTOQ_SESSION_ID_MAX);
        }
        h.session_id = (char *)o->session_id;
        h.session_resume = !o->session_fresh;
    }
    f.kind_case = PROTOQ__FRAME__KIND_HELLO;
    f.hello = &h;
    /* What comes right behind the Welcome (a resumed session's
     * CancelRequested) waits for the first dispatching call: no callback
     * can be set before protoq_connect returns. */
    c->cb_depth++;
    rc = client_request(c, &f, PROTOQ__FRAME__KIND_WELCOME, &r);
    c->cb_depth--;
    if (rc != PQ_OK) {
        if (rc == PQ_EREMOTE) {
            /* The broker closes after a refused Hello. */
            c->dead = PQ_EREMOTE;
            snprintf(c->dead_msg, sizeof(c->dead_msg), "%s", c->errmsg);
        }
        return rc;
    }
    w = r->welcome;
    c->info.protocol_version = w->protocol_version;
    client_copy_str(c->info.broker_id, sizeof(c->info.broker_id), w->broker_id);
    client_copy_str(c->info.server_version, sizeof(c->info.server_version),
                    w->server_version);
    c->info.max_frame_bytes = w->max_frame_bytes;
    c->info.max_message_bytes = w->max_message_bytes;
    c->info.heartbeat_ms = w->heartbeat_ms;
    c->info.max_batch = w->max_batch;
    c->info.session_resumed = w->session_resumed;
    c->info.disconnect_grace_ms = w->disconnect_grace_ms;
    c->silent_max_ms =
        w->heartbeat_ms == 0
            ? 0
            : (int64_t)w->heartbeat_ms * SILENT_BEATS + SILENT_SLACK_MS;
    frame_free(r);
    if (c->info.protocol_version != PROTOQ_PROTOCOL_VERSION) {
        return client_conn_fail(
            c, PQ_EVERSION, "broker speaks protocol version %u, not %d",
            c->info.protocol_version, PROTOQ_PROTOCOL_VERSION);
    }
    if (c->info.max_frame_bytes == 0) {
        c->info.max_frame_bytes = 1u << 20;
    }
    /* Deliveries carry a whole message; allow it even if the broker's
     * request limit is smaller. */
    c->in_limit = c->info.max_frame_bytes;
    if (c->info.max_message_bytes > 0 &&
        c->info.max_message_bytes + 65536u > c->in_limit) {
        c->in_limit = c->info.max_message_bytes + 65536u;
    }
    return PQ_OK;
}

/*
 * client_conn_open: connect c to hostport with opts and do the handshake,
 * bounded by the connect timeout: the first connection (protoq_connect) and
 * every reconnect (so handshake() builds every Hello). Starts from fresh
 * buffers and a live state; on failure c is dead with the reason in errmsg and
 * dead_msg.
 */
int
client_conn_open(protoq_client *c, const char *hostport,
                 const struct protoq_opts *opts)
{
    int connect_ms = opts && opts->connect_timeout_ms > 0
                         ? opts->connect_timeout_ms
                         : DEFAULT_CONNECT_MS;
    int64_t deadline = (int64_t)clock_mono_ms() + connect_ms;
    bool tls = opts != NULL && opts->tls;
    char host[256];
    int rc;

    client_tls_free(c); /* a reconnect after a refused Hello */
    if (c->fd >= 0) {
        close(c->fd);
        c->fd = -1;
    }
    c->dead = 0;
    c->dead_msg[0] = '\0';
    c->in_start = c->in_end = 0;
    c->out_start = c->out_len = 0;
    c->in_limit = PRE_WELCOME_MAX;
    c->info.max_frame_bytes = PRE_WELCOME_MAX;
    c->last_send_ms = c->last_recv_ms = (int64_t)clock_mono_ms();
    c->silent_max_ms = 0; /* the handshake has its own bound */
    if (hostport != NULL && strncmp(hostport, TLS_SCHEME, 6) == 0) {
        hostport += 6;
        tls = true;
    }
    rc = do_connect(c, hostport, deadline, host, sizeof(host));
    if (rc != PQ_OK) {
        return rc;
    }
    if (tls) {
        static const struct protoq_opts none;
        char msg[512];

        rc = client_tls_connect(c, host, opts ? opts : &none, deadline, msg,
                                sizeof(msg));
        if (rc != PQ_OK) {
            client_conn_fail(c, rc, "%s: %s", hostport, msg);
            snprintf(c->errmsg, sizeof(c->errmsg), "%s", c->dead_msg);
            return rc;
        }
    }
    /* The handshake is bounded by the connect timeout, not the I/O one. */
    c->io_timeout_ms = client_remaining_ms(deadline);
    if (c->io_timeout_ms == 0) {
        c->io_timeout_ms = 1;
    }
    rc = handshake(c, opts);
    c->io_timeout_ms =
        opts && opts->io_timeout_ms != 0 ? opts->io_timeout_ms : DEFAULT_IO_MS;
    if (rc != PQ_OK) {
        if (rc == PQ_ETIMEDOUT) {
            client_conn_fail(c, rc, "no Welcome from %s within %d ms", hostport,
                             connect_ms);
        } else if (!c->dead) {
            char msg[sizeof(c->errmsg)];

            snprintf(msg, sizeof(msg), "%s", c->errmsg);
            client_conn_fail(c, rc, "%s", msg);
        }
        c->errmsg[0] = '\0';
        snprintf(c->errmsg, sizeof(c->errmsg), "%s", c->dead_msg);
        if (tls && rc == PQ_ECLOSED &&
            (opts == NULL || opts->tls_cert_file == NULL)) {
            size_t n = strlen(c->errmsg);

            snprintf(c->errmsg + n, sizeof(c->errmsg) - n,
                     " (after the TLS handshake: does the broker want a "
                     "client certificate?)");
        }
        return rc;
    }
    return PQ_OK;
}

/* protoq_connect: connect, handshake; *out set even on failure (see
 * protoq.h). A reconnecting handle keeps copies of hostport and opts. */
int
protoq_connect(const char *hostport, const struct protoq_opts *opts,
               protoq_client **out)
{
    protoq_client *c = calloc(1, sizeof(*c));
    int rc;

    *out = c;
    if (c == NULL) {
        return PQ_ENOMEM;
    }
    c->fd = -1;
    c->next_id = 1;
    c->io_timeout_ms =
        opts && opts->io_timeout_ms != 0 ? opts->io_timeout_ms : DEFAULT_IO_MS;
    rc = client_conn_open(c, hostport, opts);
    if (rc == PQ_OK && opts != NULL && opts->reconnect) {
        rc = client_reconnect_init(c, hostport, opts);
    }
    return rc;
}
