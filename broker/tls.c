/*
 * tls.c: the broker's TLS server context (see tls.h). Reading the files is
 * all of it: the per-connection TLS I/O lives in conn.c on top of
 * protocol/tlsio.c.
 */
#include "tls.h"

#include <stdio.h>

#include <openssl/err.h>

#include "config.h"
#include "pqerr.h"
#include "tlsio.h"

/* TLS 1.2 suites: ECDHE key exchange and an AEAD cipher only (TLS 1.3
 * suites are all of that kind already and keep OpenSSL's defaults). */
static const char TLS12_CIPHERS[] = "ECDHE+AESGCM:ECDHE+CHACHA20";

/* Fail with "what path: OpenSSL's reason" in err. */
static int
ctx_error(char *err, size_t errlen, const char *what, const char *path)
{
    char why[256];

    tlsio_last_error(why, sizeof(why));
    snprintf(err, errlen, "%s %s: %s", what, path,
             why[0] != '\0' ? why : "cannot be used");
    return PQ_EINVAL;
}

/* Ask for client certificates signed by the CAs in cfg->tls_client_ca. */
static int
set_client_ca(SSL_CTX *ctx, const struct config *cfg, char *err, size_t errlen)
{
    STACK_OF(X509_NAME) * names;
    int mode = SSL_VERIFY_PEER;

    if (SSL_CTX_load_verify_locations(ctx, cfg->tls_client_ca, NULL) != 1) {
        return ctx_error(err, errlen, "tls_client_ca", cfg->tls_client_ca);
    }
    /* The CA names go in the CertificateRequest, so a client holding
     * several certificates can pick the right one. */
    names = SSL_load_client_CA_file(cfg->tls_client_ca);
    if (names == NULL) {
        return ctx_error(err, errlen, "tls_client_ca", cfg->tls_client_ca);
    }
    SSL_CTX_set_client_CA_list(ctx, names); /* ctx owns names now */
    if (cfg->tls_client_verify == TLS_CLIENT_REQUIRE) {
        mode |= SSL_VERIFY_FAIL_IF_NO_PEER_CERT;
    }
    SSL_CTX_set_verify(ctx, mode, NULL);
    return PQ_OK;
}

int
tls_server_ctx_new(const struct config *cfg, SSL_CTX **out, char *err,
                   size_t errlen)
{
    static const unsigned char sid_ctx[] = "protoqd";
    SSL_CTX *ctx;
    int rc = PQ_EINVAL;

    ERR_clear_error();
    ctx = SSL_CTX_new(TLS_server_method());
    if (ctx == NULL) {
        snprintf(err, errlen, "SSL_CTX_new failed");
        return PQ_ENOMEM;
    }
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION |
                                 SSL_OP_CIPHER_SERVER_PREFERENCE);
    /* conn.c writes from an evbuffer it drains after each write, and
     * an idle connection should not pin 34 KiB of record buffers. */
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE |
                              SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                              SSL_MODE_RELEASE_BUFFERS);
    if (SSL_CTX_set_cipher_list(ctx, TLS12_CIPHERS) != 1) {
        snprintf(err, errlen, "no usable TLS 1.2 cipher suite");
        goto err_free;
    }
    /* Sessions resumed with a client certificate need an id context. */
    SSL_CTX_set_session_id_context(ctx, sid_ctx, sizeof(sid_ctx) - 1);
    if (SSL_CTX_use_certificate_chain_file(ctx, cfg->tls_cert) != 1) {
        ctx_error(err, errlen, "tls_cert", cfg->tls_cert);
        goto err_free;
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, cfg->tls_key, SSL_FILETYPE_PEM) != 1) {
        ctx_error(err, errlen, "tls_key", cfg->tls_key);
        goto err_free;
    }
    if (SSL_CTX_check_private_key(ctx) != 1) {
        ctx_error(err, errlen, "tls_key", cfg->tls_key);
        goto err_free;
    }
    if (cfg->tls_client_ca[0] != '\0') {
        rc = set_client_ca(ctx, cfg, err, errlen);
        if (rc != PQ_OK) {
            goto err_free;
        }
    }
    *out = ctx;
    return PQ_OK;

err_free:
    SSL_CTX_free(ctx);
    return rc;
}
