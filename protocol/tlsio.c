/*
 * tlsio.c: see tlsio.h. The one place that interprets SSL_get_error, so
 * that the broker's and the client's loops see the same four outcomes.
 */
#include "tlsio.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <string.h>

#include <openssl/err.h>
#include <openssl/x509.h>

char *
tlsio_last_error(char *err, size_t errlen)
{
    unsigned long e = ERR_get_error();

    if (errlen == 0) {
        return err;
    }
    err[0] = '\0';
    if (e != 0) {
        ERR_error_string_n(e, err, errlen);
    }
    ERR_clear_error();
    return err;
}

/*
 * outcome: map ret (the OpenSSL call's return) to a status. A failed
 * certificate check names the X.509 reason, which is what a user needs
 * ("certificate has expired", "hostname mismatch").
 */
static enum tlsio_status
outcome(SSL *ssl, int ret, char *err, size_t errlen)
{
    int saved = errno;
    long vr;

    switch (SSL_get_error(ssl, ret)) {
    case SSL_ERROR_NONE:
        return TLSIO_OK;
    case SSL_ERROR_WANT_READ:
        return TLSIO_WANT_READ;
    case SSL_ERROR_WANT_WRITE:
        return TLSIO_WANT_WRITE;
    case SSL_ERROR_ZERO_RETURN:
        return TLSIO_CLOSED;
    case SSL_ERROR_SYSCALL:
        if (ERR_peek_error() == 0) {
            if (saved == 0 || saved == ECONNRESET || saved == EPIPE) {
                return TLSIO_CLOSED; /* EOF without close_notify */
            }
            snprintf(err, errlen, "%s", strerror(saved));
            return TLSIO_FAILED;
        }
        break;
    default:
        break;
    }
    vr = SSL_get_verify_result(ssl);
    if (vr != X509_V_OK) {
        snprintf(err, errlen, "certificate verify failed: %s",
                 X509_verify_cert_error_string(vr));
        ERR_clear_error();
        return TLSIO_FAILED;
    }
    tlsio_last_error(err, errlen);
    if (err[0] == '\0') {
        snprintf(err, errlen, "TLS error");
    }
    return TLSIO_FAILED;
}

enum tlsio_status
tlsio_handshake(SSL *ssl, char *err, size_t errlen)
{
    ERR_clear_error();
    errno = 0;
    return outcome(ssl, SSL_do_handshake(ssl), err, errlen);
}

enum tlsio_status
tlsio_read(SSL *ssl, void *buf, size_t len, size_t *n, char *err, size_t errlen)
{
    int ret;

    *n = 0;
    ERR_clear_error();
    errno = 0;
    ret = SSL_read(ssl, buf, len > INT_MAX ? INT_MAX : (int)len);
    if (ret > 0) {
        *n = (size_t)ret;
        return TLSIO_OK;
    }
    return outcome(ssl, ret, err, errlen);
}

enum tlsio_status
tlsio_write(SSL *ssl, const void *buf, size_t len, size_t *n, char *err,
            size_t errlen)
{
    int ret;

    *n = 0;
    ERR_clear_error();
    errno = 0;
    ret = SSL_write(ssl, buf, len > INT_MAX ? INT_MAX : (int)len);
    if (ret > 0) {
        *n = (size_t)ret;
        return TLSIO_OK;
    }
    return outcome(ssl, ret, err, errlen);
}

char *
tlsio_peer_cn(SSL *ssl, char *buf, size_t len)
{
    X509 *cert = SSL_get0_peer_certificate(ssl);
    int n;

    if (len == 0) {
        return buf;
    }
    buf[0] = '\0';
    if (cert == NULL || SSL_get_verify_result(ssl) != X509_V_OK) {
        return buf;
    }
    n = X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName,
                                  buf, (int)len);
    if (n < 0 || (size_t)n >= len - 1 || strlen(buf) != (size_t)n) {
        buf[0] = '\0'; /* none, cut short, or with a NUL inside */
    }
    return buf;
}
