/*
 * client_tls.c: libprotoq's TLS layer (see client_int.h). The handle's
 * socket stays non-blocking; client.c calls client_tls_write/read where it
 * would call send/recv, and polls for what the TLS layer waits for. One
 * SSL_CTX per handle: the library keeps no global state, and a handle's
 * CA, certificate and key are its own.
 */
#include "client_int.h"
#include "tlsio.h"

#include <arpa/inet.h>
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

enum { TLS_ERR_MAX = 256 };

/* Fail with "what path: OpenSSL's reason". */
static int
file_error(char *msg, size_t msglen, const char *what, const char *path)
{
    char why[TLS_ERR_MAX];

    tlsio_last_error(why, sizeof(why));
    snprintf(msg, msglen, "%s %s: %s", what, path,
             why[0] != '\0' ? why : "cannot be used");
    return PQ_EINVAL;
}

/* The context: TLS 1.2+, verify the broker, our certificate if any. */
static int
make_ctx(const struct protoq_opts *o, SSL_CTX **out, char *msg, size_t msglen)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    const char *key;
    int rc = PQ_EINVAL;

    if (ctx == NULL) {
        snprintf(msg, msglen, "out of memory (TLS context)");
        return PQ_ENOMEM;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE |
                              SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    if (o->tls_ca_file != NULL) {
        if (SSL_CTX_load_verify_locations(ctx, o->tls_ca_file, NULL) != 1) {
            rc = file_error(msg, msglen, "CA file", o->tls_ca_file);
            goto err_free;
        }
    } else if (SSL_CTX_set_default_verify_paths(ctx) != 1) {
        rc = file_error(msg, msglen, "CA store", "(system default)");
        goto err_free;
    }
    if (o->tls_cert_file != NULL) {
        key = o->tls_key_file != NULL ? o->tls_key_file : o->tls_cert_file;
        if (SSL_CTX_use_certificate_chain_file(ctx, o->tls_cert_file) != 1) {
            rc = file_error(msg, msglen, "certificate", o->tls_cert_file);
            goto err_free;
        }
        if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1 ||
            SSL_CTX_check_private_key(ctx) != 1) {
            rc = file_error(msg, msglen, "key", key);
            goto err_free;
        }
    } else if (o->tls_key_file != NULL) {
        snprintf(msg, msglen, "a TLS key (%s) needs a certificate",
                 o->tls_key_file);
        goto err_free;
    }
    *out = ctx;
    return PQ_OK;

err_free:
    SSL_CTX_free(ctx);
    return rc;
}

/* The name the broker's certificate must carry: an IP address is checked
 * against IP SANs, anything else against DNS names (and sent as SNI). */
static int
set_peer_name(SSL *ssl, const char *name, char *msg, size_t msglen)
{
    unsigned char addr[sizeof(struct in6_addr)];
    bool ip = inet_pton(AF_INET, name, addr) == 1 ||
              inet_pton(AF_INET6, name, addr) == 1;

    if (ip) {
        if (X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), name) == 1) {
            return PQ_OK;
        }
    } else if (SSL_set_tlsext_host_name(ssl, name) == 1 &&
               SSL_set1_host(ssl, name) == 1) {
        return PQ_OK;
    }
    snprintf(msg, msglen, "cannot verify the TLS server name \"%s\"", name);
    return PQ_EINVAL;
}

/* Wait for the socket to be ready for events until deadline. */
static int
wait_fd(int fd, short events, int64_t deadline, char *msg, size_t msglen)
{
    struct pollfd pfd = {.fd = fd, .events = events};
    int rc;

    do {
        rc = poll(&pfd, 1, client_remaining_ms(deadline));
    } while (rc < 0 && errno == EINTR);
    if (rc == 0) {
        snprintf(msg, msglen, "TLS handshake timed out");
        return PQ_ETIMEDOUT;
    }
    if (rc < 0) {
        snprintf(msg, msglen, "poll: %s", strerror(errno));
        return PQ_ESYS;
    }
    return PQ_OK;
}

int
client_tls_connect(protoq_client *c, const char *host,
                   const struct protoq_opts *o, int64_t deadline, char *msg,
                   size_t msglen)
{
    const char *name = o->tls_server_name ? o->tls_server_name : host;
    char why[TLS_ERR_MAX];
    int rc;

    rc = make_ctx(o, &c->tls_ctx, msg, msglen);
    if (rc != PQ_OK) {
        return rc;
    }
    c->ssl = SSL_new(c->tls_ctx);
    if (c->ssl == NULL || SSL_set_fd(c->ssl, c->fd) != 1) {
        snprintf(msg, msglen, "out of memory (TLS session)");
        return PQ_ENOMEM;
    }
    if (!o->tls_no_verify_hostname) {
        rc = set_peer_name(c->ssl, name, msg, msglen);
        if (rc != PQ_OK) {
            return rc;
        }
    }
    SSL_set_connect_state(c->ssl);
    for (;;) {
        switch (tlsio_handshake(c->ssl, why, sizeof(why))) {
        case TLSIO_OK:
            return PQ_OK;
        case TLSIO_WANT_READ:
            rc = wait_fd(c->fd, POLLIN, deadline, msg, msglen);
            break;
        case TLSIO_WANT_WRITE:
            rc = wait_fd(c->fd, POLLOUT, deadline, msg, msglen);
            break;
        case TLSIO_CLOSED:
            snprintf(msg, msglen,
                     "TLS handshake: the broker closed the connection (is "
                     "this its TLS port, and does it want a client "
                     "certificate?)");
            return PQ_ECLOSED;
        default:
            snprintf(msg, msglen, "TLS handshake failed: %s", why);
            return PQ_EPROTO;
        }
        if (rc != PQ_OK) {
            return rc;
        }
    }
}

/*
 * SIGPIPE: OpenSSL writes with write(), not send(MSG_NOSIGNAL), and a
 * library must not change the process's signal handling. So, like libpq,
 * block SIGPIPE in this thread around the write and swallow one that the
 * write raised (unless one was already pending before).
 */
struct sigpipe_guard {
    sigset_t old;
    bool was_pending;
};

static void
sigpipe_block(struct sigpipe_guard *g)
{
    sigset_t pipe_set, pending;

    sigemptyset(&pipe_set);
    sigaddset(&pipe_set, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &pipe_set, &g->old);
    sigpending(&pending);
    g->was_pending = sigismember(&pending, SIGPIPE) == 1;
}

static void
sigpipe_restore(struct sigpipe_guard *g)
{
    sigset_t pipe_set, pending;
    struct timespec zero = {0, 0};

    sigpending(&pending);
    if (!g->was_pending && sigismember(&pending, SIGPIPE) == 1) {
        sigemptyset(&pipe_set);
        sigaddset(&pipe_set, SIGPIPE);
        while (sigtimedwait(&pipe_set, NULL, &zero) < 0 && errno == EINTR) {
        }
    }
    pthread_sigmask(SIG_SETMASK, &g->old, NULL);
}

ssize_t
client_tls_write(protoq_client *c, const void *buf, size_t len, char *msg,
                 size_t msglen)
{
    struct sigpipe_guard g;
    enum tlsio_status st;
    size_t n;

    sigpipe_block(&g);
    st = tlsio_write(c->ssl, buf, len, &n, msg, msglen);
    sigpipe_restore(&g);
    switch (st) {
    case TLSIO_OK:
        return (ssize_t)n;
    case TLSIO_WANT_READ:
    case TLSIO_WANT_WRITE:
        return 0;
    case TLSIO_CLOSED:
        snprintf(msg, msglen, "connection closed by broker");
        return PQ_ECLOSED;
    default:
        return PQ_EPROTO;
    }
}

ssize_t
client_tls_read(protoq_client *c, void *buf, size_t len, char *msg,
                size_t msglen)
{
    size_t n;

    c->tls_want_write = false;
    switch (tlsio_read(c->ssl, buf, len, &n, msg, msglen)) {
    case TLSIO_OK:
        return (ssize_t)n;
    case TLSIO_WANT_READ:
        return 0;
    case TLSIO_WANT_WRITE:
        c->tls_want_write = true;
        return 0;
    case TLSIO_CLOSED:
        snprintf(msg, msglen, "connection closed by broker");
        return PQ_ECLOSED;
    default:
        return PQ_EPROTO;
    }
}

bool
client_tls_pending(const protoq_client *c)
{
    return c->ssl != NULL && SSL_pending(c->ssl) > 0;
}

void
client_tls_free(protoq_client *c)
{
    if (c->ssl != NULL) {
        struct sigpipe_guard g;

        if (SSL_is_init_finished(c->ssl)) {
            sigpipe_block(&g);
            (void)SSL_shutdown(c->ssl);
            sigpipe_restore(&g);
        }
        ERR_clear_error();
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
    SSL_CTX_free(c->tls_ctx);
    c->tls_ctx = NULL;
}
