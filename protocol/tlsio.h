/*
 * tlsio.h: one step of TLS over a non-blocking socket, for the broker
 * (conn.c) and the client library (client.c) alike. Each call wraps one
 * OpenSSL call (SSL_do_handshake, SSL_read, SSL_write), clears OpenSSL's
 * error queue first (SSL_get_error reads it) and turns the outcome into a
 * tlsio_status; on TLSIO_FAILED a one-line reason is written into err.
 * Nothing here allocates, logs or touches a socket except through ssl.
 */
#ifndef PQ_TLSIO_H
#define PQ_TLSIO_H

#include <stddef.h>

#include <openssl/ssl.h>

enum tlsio_status {
    TLSIO_OK,         /* done; for read/write *n bytes moved (> 0) */
    TLSIO_WANT_READ,  /* wait until the socket is readable, then retry */
    TLSIO_WANT_WRITE, /* wait until the socket is writable, then retry */
    TLSIO_CLOSED,     /* the peer closed (close_notify or EOF) */
    TLSIO_FAILED,     /* a protocol, certificate or socket error */
};

/* tlsio_handshake: one step of the handshake (either side). */
enum tlsio_status tlsio_handshake(SSL *ssl, char *err, size_t errlen);

/* tlsio_read: up to len decrypted bytes into buf; *n gets the count. */
enum tlsio_status tlsio_read(SSL *ssl, void *buf, size_t len, size_t *n,
                             char *err, size_t errlen);

/* tlsio_write: up to len bytes of buf (partial writes are enabled by the
 * caller's SSL_MODE_ENABLE_PARTIAL_WRITE); *n gets the count written. */
enum tlsio_status tlsio_write(SSL *ssl, const void *buf, size_t len, size_t *n,
                              char *err, size_t errlen);

/*
 * tlsio_peer_cn: the subject CN of the peer's verified certificate into
 * buf ("" when there is none, it did not verify, or it holds a NUL or does
 * not fit). Returns buf.
 */
char *tlsio_peer_cn(SSL *ssl, char *buf, size_t len);

/* tlsio_last_error: OpenSSL's oldest queued error as text into err ("" if
 * none); clears the queue. Returns err. */
char *tlsio_last_error(char *err, size_t errlen);

#endif
