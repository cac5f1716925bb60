/*
 * tls.h: the broker's TLS server context, made from the config's tls_cert,
 * tls_key, tls_client_ca and tls_client_verify. server.c makes one at
 * start and a new one on each SIGHUP; conn.c gives each TLS connection its
 * own SSL from the context current when it was accepted (OpenSSL counts
 * the references, so a replaced context lives on until its last
 * connection closes).
 */
#ifndef PQ_TLS_H
#define PQ_TLS_H

#include <stddef.h>

#include <openssl/ssl.h>

struct config;

/*
 * tls_server_ctx_new: a server context with protoq's defaults (TLS 1.2 or
 * later, forward-secret AEAD ciphers for 1.2, no renegotiation, no
 * compression) holding cfg's certificate chain and key, and, with
 * tls_client_ca set, asking clients for a certificate signed by one of
 * those CAs (refusing clients without one unless tls_client_verify is
 * optional). Returns PQ_OK with *out (free with SSL_CTX_free), or
 * PQ_EINVAL with "tls_cert /path: reason" in err; *out untouched.
 */
int tls_server_ctx_new(const struct config *cfg, SSL_CTX **out, char *err,
                       size_t errlen);

#endif
