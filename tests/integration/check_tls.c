/*
 * check_tls.c: TLS between protoqd (tls_listen) and libprotoq / the CLI,
 * against a real broker on loopback.
 *
 * main() makes a throwaway PKI with the openssl CLI in a temp dir, once
 * for the whole program: a CA, a second CA nobody trusts, server
 * certificates for 127.0.0.1/localhost (two, for the reload test) and for
 * another name only, and client certificates from each CA. Each test writes
 * its own conf file there (its TLS port file and, for the reload test, its
 * own copies of the certificate and key carry the test process's pid).
 */
#include <check.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "testutil.h"

static char g_pki[64];      /* the PKI temp dir */
static char g_openssl[256]; /* the openssl CLI's path */

/* ---- the throwaway PKI ---- */

static int
run_openssl(const char *const *args)
{
    const char *argv[24];
    char out[128];
    size_t n = 0;
    int rc;

    argv[n++] = g_openssl;
    for (size_t i = 0; args[i] != NULL && n < 23; i++) {
        argv[n++] = args[i];
    }
    argv[n] = NULL;
    snprintf(out, sizeof(out), "%s/openssl.out", g_pki);
    rc = prog_run(argv, out, 30000);
    if (rc != 0) {
        char buf[2048];

        fprintf(stderr, "openssl %s failed (%d): %s\n", args[0], rc,
                file_slurp(out, buf, sizeof(buf)));
    }
    return rc;
}

/* A CA: NAME.key and a self-signed NAME.pem. */
static int
make_ca(const char *name)
{
    char key[128], pem[128], subj[64];

    snprintf(key, sizeof(key), "%s/%s.key", g_pki, name);
    snprintf(pem, sizeof(pem), "%s/%s.pem", g_pki, name);
    snprintf(subj, sizeof(subj), "/CN=protoq test %s", name);
    const char *const args[] = {"req",    "-x509",    "-newkey",
                                "ec",     "-pkeyopt", "ec_paramgen_curve:P-256",
                                "-nodes", "-keyout",  key,
                                "-out",   pem,        "-days",
                                "2",      "-subj",    subj,
                                NULL};
    return run_openssl(args);
}

/* A leaf NAME.key/NAME.pem with CN cn, signed by CA ca, with san as its
 * subjectAltName ("" = none). */
static int
make_leaf(const char *name, const char *cn, const char *san, const char *ca)
{
    char key[128], pem[128], csr[128], ext[128], subj[128];
    char cakey[128], capem[128];
    FILE *f;

    snprintf(key, sizeof(key), "%s/%s.key", g_pki, name);
    snprintf(pem, sizeof(pem), "%s/%s.pem", g_pki, name);
    snprintf(csr, sizeof(csr), "%s/%s.csr", g_pki, name);
    snprintf(ext, sizeof(ext), "%s/%s.ext", g_pki, name);
    snprintf(cakey, sizeof(cakey), "%s/%s.key", g_pki, ca);
    snprintf(capem, sizeof(capem), "%s/%s.pem", g_pki, ca);
    snprintf(subj, sizeof(subj), "/CN=%s", cn);
    f = fopen(ext, "w");
    if (f == NULL) {
        return -1;
    }
    if (san[0] != '\0') {
        fprintf(f, "subjectAltName=%s\n", san);
    }
    fclose(f);
    const char *const req[] = {
        "req",    "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
        "-nodes", "-keyout", key,  "-out",     csr,
        "-subj",  subj,      NULL};
    const char *const sign[] = {"x509",        "-req",
                                "-in",         csr,
                                "-CA",         capem,
                                "-CAkey",      cakey,
                                "-set_serial", name[0] == 's' ? "1001" : "2002",
                                "-out",        pem,
                                "-days",       "2",
                                "-extfile",    ext,
                                NULL};
    if (run_openssl(req) != 0) {
        return -1;
    }
    return run_openssl(sign);
}

static int
make_pki(void)
{
    static const char *const finders[] = {
        "/usr/bin/openssl", "/usr/local/bin/openssl", "/bin/openssl"};
    static const char san_local[] = "DNS:localhost,IP:127.0.0.1";

    for (size_t i = 0; i < sizeof(finders) / sizeof(finders[0]); i++) {
        if (access(finders[i], X_OK) == 0) {
            snprintf(g_openssl, sizeof(g_openssl), "%s", finders[i]);
        }
    }
    if (g_openssl[0] == '\0') {
        fprintf(stderr, "check_tls: no openssl CLI (apt-get install "
                        "openssl)\n");
        return -1;
    }
    snprintf(g_pki, sizeof(g_pki), "/tmp/protoq-tls.XXXXXX");
    if (mkdtemp(g_pki) == NULL) {
        perror("mkdtemp");
        return -1;
    }
    if (make_ca("ca") != 0 || make_ca("rogue-ca") != 0 ||
        make_leaf("srv1", "protoq-srv-1", san_local, "ca") != 0 ||
        make_leaf("srv2", "protoq-srv-2", san_local, "ca") != 0 ||
        make_leaf("srv-other", "other.example", "DNS:other.example", "ca") !=
            0 ||
        make_leaf("client", "worker-7", "", "ca") != 0 ||
        make_leaf("rogue-client", "worker-7", "", "rogue-ca") != 0) {
        return -1;
    }
    return 0;
}

static void
remove_pki(void)
{
    char cmd[128];

    if (g_pki[0] != '\0') {
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", g_pki);
        if (system(cmd) != 0) {
            fprintf(stderr, "check_tls: could not remove %s\n", g_pki);
        }
    }
}

/* PKI path of a file: "ca.pem" -> "/tmp/protoq-tls.X/ca.pem". */
static const char *
pki(const char *file)
{
    static char bufs[8][128];
    static int next;
    char *b = bufs[next++ % 8];

    snprintf(b, 128, "%s/%s", g_pki, file);
    return b;
}

/* ---- a broker with a TLS listener ---- */

struct tls_srv {
    struct srv s;
    char conf[128];
    char port_file[128];
    const char *args[8];
    char tls_addr[64]; /* "tls://127.0.0.1:PORT" */
    uint16_t tls_port;
};

static bool
port_file_ready(void *arg)
{
    struct tls_srv *t = arg;
    char buf[16];

    return file_slurp(t->port_file, buf, sizeof(buf))[0] != '\0';
}

/*
 * tls_start: protoqd with a plain listener (testutil's) and a TLS one on
 * 127.0.0.1:0 using cert/key, plus extra conf lines. Fails the test if it
 * does not start.
 */
static void
tls_start(struct tls_srv *t, const char *cert, const char *key,
          const char *extra)
{
    char buf[16];
    FILE *f;

    memset(t, 0, sizeof(*t));
    snprintf(t->conf, sizeof(t->conf), "%s/conf-%d", g_pki, (int)getpid());
    snprintf(t->port_file, sizeof(t->port_file), "%s/tlsport-%d", g_pki,
             (int)getpid());
    unlink(t->port_file);
    f = fopen(t->conf, "w");
    ck_assert_ptr_nonnull(f);
    fprintf(f,
            "tls_listen 127.0.0.1:0\ntls_port_file %s\ntls_cert %s\n"
            "tls_key %s\n%s",
            t->port_file, cert, key, extra);
    fclose(f);
    t->args[0] = "-c";
    t->args[1] = t->conf;
    t->args[2] = "--log-level";
    t->args[3] = "debug";
    t->args[4] = NULL;
    ck_assert_msg(srv_start(&t->s, t->args) == 0, "protoqd did not start");
    ck_assert(wait_until(port_file_ready, t, 5000));
    t->tls_port = (uint16_t)atoi(file_slurp(t->port_file, buf, sizeof(buf)));
    ck_assert_uint_ne(t->tls_port, 0);
    snprintf(t->tls_addr, sizeof(t->tls_addr), "tls://127.0.0.1:%u",
             t->tls_port);
}

/* tls_stop: a clean stop (exit 0: under SAN=1 a leak would show here). */
static void
tls_stop(struct tls_srv *t)
{
    int rc = srv_stop(&t->s);
    char log[512], buf[4096];

    srv_log_path(&t->s, log, sizeof(log));
    ck_assert_msg(rc == 0, "protoqd exited %d: %s", rc,
                  file_slurp(log, buf, sizeof(buf)));
    srv_cleanup(&t->s);
    unlink(t->conf);
    unlink(t->port_file);
}

/* Connect over TLS with these files (NULL = not given); the rc back. */
static int
tls_connect(const char *addr, const char *ca, const char *cert, const char *key,
            protoq_client **out)
{
    struct protoq_opts o;

    memset(&o, 0, sizeof(o));
    o.client_name = "check_tls";
    o.tls_ca_file = ca;
    o.tls_cert_file = cert;
    o.tls_key_file = key;
    return protoq_connect(addr, &o, out);
}

/* A connection with this client certificate (NULL: none) is refused. */
static void
assert_refused(const struct tls_srv *t, const char *cert, const char *key)
{
    protoq_client *c = NULL;
    int rc = tls_connect(t->tls_addr, pki("ca.pem"), cert, key, &c);

    ck_assert_msg(rc != PQ_OK, "connected with certificate %s",
                  cert ? cert : "(none)");
    protoq_close(c);
}

/* ---- a publish / consume round trip ---- */

struct got {
    size_t n;
    size_t bad; /* payloads that were not what was sent */
    size_t len; /* payload size expected */
};

/* Payload i: len bytes of a pattern that depends on i. */
static void
fill_payload(uint8_t *p, size_t len, size_t i)
{
    for (size_t k = 0; k < len; k++) {
        p[k] = (uint8_t)(k * 31u + i * 7u);
    }
}

static void
on_deliver(void *arg, protoq_client *c, const struct protoq_delivery *d)
{
    struct got *g = arg;
    uint8_t *want = malloc(g->len);
    size_t i;

    ck_assert_ptr_nonnull(want);
    i = d->len >= 4 ? (size_t)((const uint8_t *)d->payload)[0] : 0;
    /* The first byte names the index (below 256 messages per test). */
    fill_payload(want, g->len, i);
    want[0] = (uint8_t)i;
    if (d->len != g->len || memcmp(d->payload, want, g->len) != 0) {
        g->bad++;
    }
    free(want);
    g->n++;
    protoq_ack(c, d->message_id, d->attempt);
}

/*
 * round_trip: publish n messages of len bytes to queue over c (pipelined),
 * consume them all back and check every byte.
 */
static void
round_trip(protoq_client *c, const char *queue, size_t n, size_t len)
{
    struct protoq_message m;
    struct got g = {.len = len};
    uint8_t *buf = malloc(len);
    int64_t until = now_ms_mono() + 30000;

    ck_assert_ptr_nonnull(buf);
    ck_assert_uint_lt(n, 256);
    pq_check_ok(c, protoq_queue_create(c, queue, NULL));
    memset(&m, 0, sizeof(m));
    for (size_t i = 0; i < n; i++) {
        fill_payload(buf, len, i);
        buf[0] = (uint8_t)i;
        m.payload = buf;
        m.len = len;
        pq_check_ok(c, protoq_publish_async(c, queue, &m, NULL, NULL));
    }
    pq_check_ok(c, protoq_wait_confirms(c, 0, 30000));
    ck_assert_uint_eq(protoq_async_errors(c), 0);
    pq_check_ok(c,
                protoq_subscribe(c, queue, 64, NULL, 0, on_deliver, &g, NULL));
    while (g.n < n && now_ms_mono() < until) {
        int rc = protoq_poll(c, 200);

        ck_assert_msg(rc >= 0, "poll: %s", protoq_errmsg(c));
    }
    pq_check_ok(c, protoq_flush(c));
    ck_assert_uint_eq(g.n, n);
    ck_assert_uint_eq(g.bad, 0);
    free(buf);
}

/* ---- tests ---- */

START_TEST(test_round_trip_without_client_certificate)
{
    struct tls_srv t;
    protoq_client *c = NULL, *plain;

    tls_start(&t, pki("srv1.pem"), pki("srv1.key"), "");
    pq_check_ok(c, tls_connect(t.tls_addr, pki("ca.pem"), NULL, NULL, &c));
    round_trip(c, "small", 200, 100);
    /* Frames larger than a TLS record (16 KiB) and many records in
     * flight both ways. */
    round_trip(c, "large", 40, 300 * 1024);
    protoq_close(c);
    /* The plain listener serves beside it. */
    plain = pq_connect_or_fail(&t.s);
    round_trip(plain, "plain", 10, 1000);
    protoq_close(plain);
    ck_assert(srv_log_has(&t.s, "TLSv1.3"));
    tls_stop(&t);
}
END_TEST

START_TEST(test_round_trip_with_client_certificate)
{
    struct tls_srv t;
    protoq_client *c = NULL;
    char extra[256];

    snprintf(extra, sizeof(extra), "tls_client_ca %s\n", pki("ca.pem"));
    tls_start(&t, pki("srv1.pem"), pki("srv1.key"), extra);
    pq_check_ok(c, tls_connect(t.tls_addr, pki("ca.pem"), pki("client.pem"),
                               pki("client.key"), &c));
    round_trip(c, "mtls", 50, 2000);
    protoq_close(c);
    /* The certificate's CN is the connection's identity. */
    ck_assert(srv_log_has(&t.s, "client certificate CN=worker-7"));

    /* Required by default: no certificate, no connection. */
    assert_refused(&t, NULL, NULL);
    /* A certificate from a CA the broker does not trust: refused. */
    assert_refused(&t, pki("rogue-client.pem"), pki("rogue-client.key"));
    ck_assert(srv_log_has(&t.s, "TLS handshake failed"));
    tls_stop(&t);
}
END_TEST

START_TEST(test_client_certificate_optional)
{
    struct tls_srv t;
    protoq_client *c = NULL;
    char extra[256];

    snprintf(extra, sizeof(extra),
             "tls_client_ca %s\ntls_client_verify optional\n", pki("ca.pem"));
    tls_start(&t, pki("srv1.pem"), pki("srv1.key"), extra);
    pq_check_ok(c, tls_connect(t.tls_addr, pki("ca.pem"), NULL, NULL, &c));
    round_trip(c, "anon", 5, 10);
    protoq_close(c);
    c = NULL;
    pq_check_ok(c, tls_connect(t.tls_addr, pki("ca.pem"), pki("client.pem"),
                               pki("client.key"), &c));
    protoq_close(c);
    ck_assert(srv_log_has(&t.s, "client certificate CN=worker-7"));
    /* Optional does not mean unchecked: a bad certificate is refused. */
    assert_refused(&t, pki("rogue-client.pem"), pki("rogue-client.key"));
    tls_stop(&t);
}
END_TEST

START_TEST(test_wrong_ca_refused)
{
    struct tls_srv t;
    protoq_client *c = NULL;
    int rc;

    tls_start(&t, pki("srv1.pem"), pki("srv1.key"), "");
    rc = tls_connect(t.tls_addr, pki("rogue-ca.pem"), NULL, NULL, &c);
    ck_assert_int_eq(rc, PQ_EPROTO);
    ck_assert_msg(strstr(protoq_errmsg(c), "certificate verify failed") != NULL,
                  "%s", protoq_errmsg(c));
    protoq_close(c);
    tls_stop(&t);
}
END_TEST

START_TEST(test_hostname_mismatch_refused)
{
    struct tls_srv t;
    struct protoq_opts o;
    protoq_client *c = NULL;
    int rc;

    tls_start(&t, pki("srv-other.pem"), pki("srv-other.key"), "");
    /* Signed by the trusted CA, but for other.example, not 127.0.0.1. */
    rc = tls_connect(t.tls_addr, pki("ca.pem"), NULL, NULL, &c);
    ck_assert_int_eq(rc, PQ_EPROTO);
    ck_assert_msg(strstr(protoq_errmsg(c), "mismatch") != NULL, "%s",
                  protoq_errmsg(c));
    protoq_close(c);
    c = NULL;
    /* The name is what failed: asking for other.example succeeds. */
    memset(&o, 0, sizeof(o));
    o.tls_ca_file = pki("ca.pem");
    o.tls_server_name = "other.example";
    pq_check_ok(c, protoq_connect(t.tls_addr, &o, &c));
    protoq_close(c);
    c = NULL;
    /* So does turning the check off, which the option says is unsafe. */
    memset(&o, 0, sizeof(o));
    o.tls_ca_file = pki("ca.pem");
    o.tls_no_verify_hostname = true;
    pq_check_ok(c, protoq_connect(t.tls_addr, &o, &c));
    protoq_close(c);
    tls_stop(&t);
}
END_TEST

START_TEST(test_plain_client_on_tls_port_gets_clean_close)
{
    struct tls_srv t;
    protoq_client *c = NULL;
    Protoq__Frame *f = NULL;
    int fd;
    int rc;

    tls_start(&t, pki("srv1.pem"), pki("srv1.key"), "idle_timeout_ms 1s\n");
    /* libprotoq without TLS: a plain Error saying what to do. */
    rc = protoq_connect(t.tls_addr + 6, NULL, &c);
    ck_assert_int_eq(rc, PQ_EREMOTE);
    ck_assert_int_eq(protoq_last_error_code(c), PROTOQ_CODE_BAD_REQUEST);
    ck_assert_msg(strstr(protoq_errmsg(c), "tls://") != NULL, "%s",
                  protoq_errmsg(c));
    protoq_close(c);
    c = NULL;
    /* Raw: a Hello gets one Error frame, then EOF (not a reset). */
    fd = raw_connect(t.tls_port);
    ck_assert_int_ge(fd, 0);
    ck_assert_int_eq(raw_hello(fd, 5000), -1);
    close(fd);
    fd = raw_connect(t.tls_port);
    ck_assert_int_ge(fd, 0);
    {
        static const uint8_t junk[] = "GET / HTTP/1.0\r\n\r\n";
        ck_assert_int_eq(raw_send(fd, junk, sizeof(junk) - 1), 0);
    }
    ck_assert_int_eq(raw_read_frame(fd, 5000, 4096, &f), 0);
    ck_assert_int_eq(f->kind_case, PROTOQ__FRAME__KIND_ERROR);
    frame_free(f);
    ck_assert(raw_wait_eof(fd, 5000));
    close(fd);
    /* A peer that says nothing after connecting, or stops in the middle
     * of the TLS handshake, is closed by the handshake timeout; meanwhile
     * others connect. */
    fd = raw_connect(t.tls_port);
    ck_assert_int_ge(fd, 0);
    pq_check_ok(c, tls_connect(t.tls_addr, pki("ca.pem"), NULL, NULL, &c));
    round_trip(c, "after", 3, 10);
    ck_assert(raw_wait_eof(fd, 5000));
    close(fd);
    fd = raw_connect(t.tls_port);
    ck_assert_int_ge(fd, 0);
    {
        /* The start of a TLS record header, and no more. */
        static const uint8_t part[] = {0x16, 0x03, 0x01, 0x00};
        ck_assert_int_eq(raw_send(fd, part, sizeof(part)), 0);
    }
    ck_assert(raw_wait_eof(fd, 5000));
    close(fd);
    /* The connection that did finish its handshake is unharmed. */
    round_trip(c, "after2", 3, 10);
    protoq_close(c);
    tls_stop(&t);
}
END_TEST

/* The CN of the certificate the broker shows on port, into cn. */
static void
server_cn(uint16_t port, char *cn, size_t len)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    SSL *ssl;
    X509 *cert;
    int fd = raw_connect(port);

    ck_assert_ptr_nonnull(ctx);
    ck_assert_int_ge(fd, 0);
    ssl = SSL_new(ctx);
    ck_assert_ptr_nonnull(ssl);
    SSL_set_fd(ssl, fd);
    ck_assert_int_eq(SSL_connect(ssl), 1); /* blocking socket */
    cert = SSL_get0_peer_certificate(ssl);
    ck_assert_ptr_nonnull(cert);
    cn[0] = '\0';
    X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, cn,
                              (int)len);
    SSL_shutdown(ssl);
    SSL_free(ssl);
    SSL_CTX_free(ctx);
    close(fd);
}

/*
 * handshake_with: a TLS handshake with the broker on port from a client
 * limited to max_version and (when not NULL) the TLS 1.2 cipher list
 * ciphers. Returns true when it succeeded; the version into ver.
 */
static bool
handshake_with(uint16_t port, int max_version, const char *ciphers, char *ver,
               size_t verlen)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    SSL *ssl;
    int fd = raw_connect(port);
    bool ok;

    ck_assert_ptr_nonnull(ctx);
    ck_assert_int_ge(fd, 0);
    SSL_CTX_set_min_proto_version(ctx, 0);
    ck_assert_int_eq(SSL_CTX_set_max_proto_version(ctx, max_version), 1);
    if (ciphers != NULL) {
        ck_assert_int_eq(SSL_CTX_set_cipher_list(ctx, ciphers), 1);
    }
    ssl = SSL_new(ctx);
    ck_assert_ptr_nonnull(ssl);
    SSL_set_fd(ssl, fd);
    ok = SSL_connect(ssl) == 1; /* blocking socket */
    snprintf(ver, verlen, "%s", ok ? SSL_get_version(ssl) : "");
    if (ok) {
        SSL_shutdown(ssl);
    }
    SSL_free(ssl);
    SSL_CTX_free(ctx);
    close(fd);
    return ok;
}

START_TEST(test_protocol_versions_and_ciphers)
{
    struct tls_srv t;
    char ver[32];

    tls_start(&t, pki("srv1.pem"), pki("srv1.key"), "");
    ck_assert(
        handshake_with(t.tls_port, TLS1_3_VERSION, NULL, ver, sizeof(ver)));
    ck_assert_str_eq(ver, "TLSv1.3");
    /* TLS 1.2 is accepted, with a forward-secret AEAD suite... */
    ck_assert(handshake_with(t.tls_port, TLS1_2_VERSION,
                             "ECDHE-ECDSA-AES128-GCM-SHA256", ver,
                             sizeof(ver)));
    ck_assert_str_eq(ver, "TLSv1.2");
    /* ...but not with a CBC suite, and nothing older. */
    ck_assert(!handshake_with(t.tls_port, TLS1_2_VERSION,
                              "ECDHE-ECDSA-AES128-SHA", ver, sizeof(ver)));
    ck_assert(!handshake_with(t.tls_port, TLS1_1_VERSION, "ALL:@SECLEVEL=0",
                              ver, sizeof(ver)));
    tls_stop(&t);
}
END_TEST

static void
copy_file(const char *from, const char *to)
{
    char buf[16384];
    FILE *in = fopen(from, "rb");
    FILE *out;
    size_t n;

    ck_assert_ptr_nonnull(in);
    /* Write a new file and rename it over: what a renewal tool does. */
    char tmp[160];
    snprintf(tmp, sizeof(tmp), "%s.tmp", to);
    out = fopen(tmp, "wb");
    ck_assert_ptr_nonnull(out);
    while ((n = fread(buf, 1, sizeof(buf), in)) > 0) {
        ck_assert_uint_eq(fwrite(buf, 1, n, out), n);
    }
    fclose(in);
    ck_assert_int_eq(fclose(out), 0);
    ck_assert_int_eq(rename(tmp, to), 0);
}

struct cn_wait {
    uint16_t port;
    const char *want;
    struct srv *s;
    const char *log;
};

static bool
cn_is(void *arg)
{
    struct cn_wait *w = arg;
    char cn[128];

    server_cn(w->port, cn, sizeof(cn));
    return strcmp(cn, w->want) == 0;
}

static bool
log_has(void *arg)
{
    struct cn_wait *w = arg;

    return srv_log_has(w->s, w->log);
}

START_TEST(test_sighup_reloads_certificate)
{
    struct tls_srv t;
    protoq_client *old = NULL, *c = NULL;
    char cert[128], key[128], cn[128];
    struct cn_wait w;
    FILE *f;

    snprintf(cert, sizeof(cert), "%s/live-%d.pem", g_pki, (int)getpid());
    snprintf(key, sizeof(key), "%s/live-%d.key", g_pki, (int)getpid());
    copy_file(pki("srv1.pem"), cert);
    copy_file(pki("srv1.key"), key);
    tls_start(&t, cert, key, "");
    server_cn(t.tls_port, cn, sizeof(cn));
    ck_assert_str_eq(cn, "protoq-srv-1");
    pq_check_ok(old, tls_connect(t.tls_addr, pki("ca.pem"), NULL, NULL, &old));

    /* Renewed in place, then SIGHUP: new connections get the new one. */
    copy_file(pki("srv2.pem"), cert);
    copy_file(pki("srv2.key"), key);
    ck_assert_int_eq(kill(t.s.pid, SIGHUP), 0);
    w = (struct cn_wait){.port = t.tls_port, .want = "protoq-srv-2"};
    ck_assert_msg(wait_until(cn_is, &w, 5000), "still the old certificate");
    pq_check_ok(c, tls_connect(t.tls_addr, pki("ca.pem"), NULL, NULL, &c));
    round_trip(c, "new", 3, 10);
    protoq_close(c);
    c = NULL;
    /* The connection made before the reload goes on. */
    round_trip(old, "old", 3, 10);

    /* A broken file on reload: the previous certificate stays, the log
     * says why, nothing is dropped. */
    f = fopen(cert, "w");
    ck_assert_ptr_nonnull(f);
    fputs("-----BEGIN CERTIFICATE-----\nnot base64\n", f);
    fclose(f);
    ck_assert_int_eq(kill(t.s.pid, SIGHUP), 0);
    w = (struct cn_wait){.s = &t.s, .log = "TLS certificate not reloaded"};
    ck_assert(wait_until(log_has, &w, 5000));
    ck_assert(srv_log_has(&t.s, cert));
    server_cn(t.tls_port, cn, sizeof(cn));
    ck_assert_str_eq(cn, "protoq-srv-2");
    pq_check_ok(c, tls_connect(t.tls_addr, pki("ca.pem"), NULL, NULL, &c));
    protoq_close(c);
    round_trip(old, "old2", 3, 10);
    protoq_close(old);
    tls_stop(&t);
    unlink(cert);
    unlink(key);
}
END_TEST

/* protoqd --check-config with conf text; exit status, output in out. */
static int
check_config(const char *text, char *out, size_t outlen)
{
    char conf[128], log[128];
    FILE *f;
    int rc;

    snprintf(conf, sizeof(conf), "%s/cc-%d.conf", g_pki, (int)getpid());
    snprintf(log, sizeof(log), "%s/cc-%d.out", g_pki, (int)getpid());
    f = fopen(conf, "w");
    ck_assert_ptr_nonnull(f);
    fputs(text, f);
    fclose(f);
    const char *const argv[] = {srv_binary(), "-c", conf, "--check-config",
                                NULL};
    rc = prog_run(argv, log, 10000);
    file_slurp(log, out, outlen);
    unlink(conf);
    unlink(log);
    return rc;
}

START_TEST(test_config_is_checked)
{
    char text[1024], out[8192];

    /* tls_listen without a certificate. */
    ck_assert_int_eq(check_config("tls_listen 127.0.0.1:0\n", out, sizeof(out)),
                     78);
    ck_assert_msg(strstr(out, "tls_cert") != NULL, "%s", out);
    /* Neither listener. */
    ck_assert_int_eq(check_config("listen \"\"\n", out, sizeof(out)), 78);
    ck_assert_msg(strstr(out, "listen") != NULL, "%s", out);
    /* A key that does not match the certificate. */
    snprintf(text, sizeof(text),
             "tls_listen 127.0.0.1:0\ntls_cert %s\ntls_key %s\n",
             pki("srv1.pem"), pki("srv2.key"));
    ck_assert_int_eq(check_config(text, out, sizeof(out)), 78);
    ck_assert_msg(strstr(out, "tls_key") != NULL, "%s", out);
    /* TLS only, a good pair. */
    snprintf(text, sizeof(text),
             "listen \"\"\ntls_listen 127.0.0.1:0\ntls_cert %s\ntls_key %s\n"
             "tls_client_ca %s\n",
             pki("srv1.pem"), pki("srv1.key"), pki("ca.pem"));
    ck_assert_int_eq(check_config(text, out, sizeof(out)), 0);
    ck_assert_msg(strstr(out, "tls_client_verify require") != NULL, "%s", out);
}
END_TEST

START_TEST(test_cli_over_tls)
{
    struct tls_srv t;
    char out[256], buf[4096], server[80];
    int rc;

    tls_start(&t, pki("srv1.pem"), pki("srv1.key"), "");
    snprintf(out, sizeof(out), "%s/cli-%d.out", g_pki, (int)getpid());
    const char *const create[] = {getenv("PROTOQ") ? getenv("PROTOQ")
                                                   : "build/protoq",
                                  "-s",
                                  t.tls_addr,
                                  "--ca",
                                  pki("ca.pem"),
                                  "queue",
                                  "create",
                                  "cli",
                                  NULL};
    rc = prog_run(create, out, 10000);
    ck_assert_msg(rc == 0, "%s", file_slurp(out, buf, sizeof(buf)));
    const char *const pub[] = {create[0], "-s",          t.tls_addr,
                               "--ca",    pki("ca.pem"), "pub",
                               "cli",     "over tls",    NULL};
    rc = prog_run(pub, out, 10000);
    ck_assert_msg(rc == 0, "%s", file_slurp(out, buf, sizeof(buf)));
    /* The CA from the environment, --server= spelling. */
    ck_assert_int_eq(setenv("PROTOQ_CA", pki("ca.pem"), 1), 0);
    snprintf(server, sizeof(server), "--server=%s", t.tls_addr);
    const char *const consume[] = {create[0], server,    "consume",
                                   "cli",     "--count", "1",
                                   "--wait",  "5s",      NULL};
    rc = prog_run(consume, out, 10000);
    ck_assert_msg(rc == 0, "%s", file_slurp(out, buf, sizeof(buf)));
    ck_assert_str_eq(file_slurp(out, buf, sizeof(buf)), "over tls\n");
    /* Without the CA: a clear refusal, exit 1. */
    ck_assert_int_eq(unsetenv("PROTOQ_CA"), 0);
    rc = prog_run(consume, out, 10000);
    ck_assert_int_eq(rc, 1);
    ck_assert_msg(strstr(file_slurp(out, buf, sizeof(buf)),
                         "certificate verify failed") != NULL,
                  "%s", buf);
    /* The plain CLI on the TLS port: told to use tls://, the wire code
     * named once (it was printed twice: "(BAD_REQUEST) (BAD_REQUEST)"). */
    snprintf(server, sizeof(server), "127.0.0.1:%u", t.tls_port);
    const char *const plain[] = {create[0], "-s", server, "queue", "ls", NULL};
    rc = prog_run(plain, out, 10000);
    ck_assert_int_eq(rc, 1);
    file_slurp(out, buf, sizeof(buf));
    ck_assert_msg(strstr(buf, "tls://") != NULL, "%s", buf);
    ck_assert_msg(
        strstr(buf, "(BAD_REQUEST)") != NULL &&
            strstr(strstr(buf, "(BAD_REQUEST)") + 1, "(BAD_REQUEST)") == NULL,
        "%s", buf);
    unlink(out);
    tls_stop(&t);
}
END_TEST

/*
 * --ca and --cert are global options anywhere on the line, --key FILE only
 * before the command: after it, pub's --key is the idempotency key.
 */
START_TEST(test_cli_global_options_anywhere)
{
    struct tls_srv t;
    char out[256], buf[4096], extra[256], id1[64], id2[64];
    const char *cli = getenv("PROTOQ") ? getenv("PROTOQ") : "build/protoq";
    int rc;

    snprintf(extra, sizeof(extra), "tls_client_ca %s\n", pki("ca.pem"));
    tls_start(&t, pki("srv1.pem"), pki("srv1.key"), extra);
    snprintf(out, sizeof(out), "%s/cli-g-%d.out", g_pki, (int)getpid());
    const char *const create[] = {cli,           "--key",    pki("client.key"),
                                  "queue",       "create",   "g",
                                  "-s",          t.tls_addr, "--ca",
                                  pki("ca.pem"), "--cert",   pki("client.pem"),
                                  NULL};
    rc = prog_run(create, out, 10000);
    ck_assert_msg(rc == 0, "%s", file_slurp(out, buf, sizeof(buf)));
    /* The same idempotency key twice: one message, the same id. */
    const char *const pub[] = {cli,
                               "--key",
                               pki("client.key"),
                               "pub",
                               "g",
                               "x",
                               "--key",
                               "idem-1",
                               "-s",
                               t.tls_addr,
                               "--ca",
                               pki("ca.pem"),
                               "--cert",
                               pki("client.pem"),
                               NULL};
    rc = prog_run(pub, out, 10000);
    ck_assert_msg(rc == 0, "%s", file_slurp(out, id1, sizeof(id1)));
    file_slurp(out, id1, sizeof(id1));
    rc = prog_run(pub, out, 10000);
    ck_assert_msg(rc == 0, "%s", file_slurp(out, id2, sizeof(id2)));
    file_slurp(out, id2, sizeof(id2));
    ck_assert_str_eq(id1, id2);
    /* --key after the command is pub's: no TLS key, so the certificate
     * file is tried as the key, and that fails. */
    const char *const nokey[] = {
        cli,  "pub",      "g",    "y",           "--key",  pki("client.key"),
        "-s", t.tls_addr, "--ca", pki("ca.pem"), "--cert", pki("client.pem"),
        NULL};
    rc = prog_run(nokey, out, 10000);
    ck_assert_msg(rc == 1, "%s", file_slurp(out, buf, sizeof(buf)));
    /* The certificate and key from the environment. */
    ck_assert_int_eq(setenv("PROTOQ_CERT", pki("client.pem"), 1), 0);
    ck_assert_int_eq(setenv("PROTOQ_KEY", pki("client.key"), 1), 0);
    const char *const ls[] = {cli,        "queue", "ls",          "-s",
                              t.tls_addr, "--ca",  pki("ca.pem"), NULL};
    rc = prog_run(ls, out, 10000);
    ck_assert_int_eq(unsetenv("PROTOQ_CERT"), 0);
    ck_assert_int_eq(unsetenv("PROTOQ_KEY"), 0);
    file_slurp(out, buf, sizeof(buf));
    ck_assert_msg(rc == 0, "%s", buf);
    ck_assert_msg(strstr(buf, "g ") != NULL, "%s", buf);
    unlink(out);
    tls_stop(&t);
}
END_TEST

struct work_wait {
    protoq_client *c;
    const char *out;
};

/* The job ran (its payload is in the output file) and was acked. */
static bool
job_done(void *arg)
{
    struct work_wait *w = arg;
    struct protoq_queue_info qi;
    char buf[64];

    if (strcmp(file_slurp(w->out, buf, sizeof(buf)), "job over tls") != 0 ||
        protoq_queue_stat(w->c, "wq", &qi) != PQ_OK) {
        return false;
    }
    return qi.ready == 0 && qi.inflight == 0 && qi.acked == 1;
}

START_TEST(test_work_over_tls)
{
    struct tls_srv t;
    protoq_client *c = NULL;
    struct protoq_message m;
    struct work_wait w;
    char out[128], cmd[512];
    int status;
    pid_t pid;

    tls_start(&t, pki("srv1.pem"), pki("srv1.key"), "");
    pq_check_ok(c, tls_connect(t.tls_addr, pki("ca.pem"), NULL, NULL, &c));
    pq_check_ok(c, protoq_queue_create(c, "wq", NULL));
    memset(&m, 0, sizeof(m));
    m.payload = "job over tls";
    m.len = strlen("job over tls");
    pq_check_ok(c, protoq_publish(c, "wq", &m, NULL));
    snprintf(out, sizeof(out), "%s/work-%d.out", g_pki, (int)getpid());
    snprintf(cmd, sizeof(cmd), "exec %s work wq -- /bin/sh -c 'cat > %s'",
             getenv("PROTOQ") ? getenv("PROTOQ") : "build/protoq", out);
    pid = fork();
    ck_assert_int_ge(pid, 0);
    if (pid == 0) {
        setenv("PROTOQ_SERVER", t.tls_addr, 1);
        setenv("PROTOQ_CA", pki("ca.pem"), 1);
        execl("/bin/sh", "sh", "-c", cmd, (char *)NULL);
        _exit(127);
    }
    w = (struct work_wait){.c = c, .out = out};
    ck_assert_msg(wait_until(job_done, &w, 10000), "the job did not run");
    ck_assert_int_eq(kill(pid, SIGTERM), 0);
    ck_assert_int_eq(waitpid(pid, &status, 0), pid);
    ck_assert(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    protoq_close(c);
    unlink(out);
    tls_stop(&t);
}
END_TEST

static Suite *
tls_suite(void)
{
    Suite *s = suite_create("tls");
    TCase *tc = tcase_create("tls");

    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_round_trip_without_client_certificate);
    tcase_add_test(tc, test_round_trip_with_client_certificate);
    tcase_add_test(tc, test_client_certificate_optional);
    tcase_add_test(tc, test_wrong_ca_refused);
    tcase_add_test(tc, test_hostname_mismatch_refused);
    tcase_add_test(tc, test_protocol_versions_and_ciphers);
    tcase_add_test(tc, test_plain_client_on_tls_port_gets_clean_close);
    tcase_add_test(tc, test_sighup_reloads_certificate);
    tcase_add_test(tc, test_config_is_checked);
    tcase_add_test(tc, test_cli_over_tls);
    tcase_add_test(tc, test_cli_global_options_anywhere);
    tcase_add_test(tc, test_work_over_tls);
    suite_add_tcase(s, tc);
    return s;
}

int
main(void)
{
    SRunner *sr;
    int failed;

    if (make_pki() != 0) {
        remove_pki();
        return 1;
    }
    sr = srunner_create(tls_suite());
    srunner_run_all(sr, CK_NORMAL);
    failed = srunner_ntests_failed(sr);
    srunner_free(sr);
    remove_pki();
    return failed == 0 ? 0 : 1;
}
