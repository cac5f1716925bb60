/*
 * conn.c: client connections. Owns struct conn, its socket and its two
 * evbuffers, the framing of input (length checked before any allocation,
 * decode under a budget, at most FRAMES_PER_WAKEUP frames per callback),
 * the framing of output, output backpressure and close-after-flush.
 *
 * I/O is done here, not by bufferevents: reads go straight into the input
 * buffer, and output is written once per loop pass (conn_flush_all) with
 * one writev however many frames a connection got in that pass; a write
 * event is armed only when the kernel buffer was full. Per message this is
 * a fraction of a syscall, where a bufferevent spends an ioctl per read and
 * two epoll_ctl per write (redis writes from beforeSleep for the same
 * reason).
 *
 * A conn is never freed from under its own callback: closing marks it
 * CLOSED and moves it to the reap list, which the loop pass empties.
 *
 * TLS (a connection accepted on tls_listen) changes only the two byte
 * pumps: read_some and write_some go through the connection's SSL instead
 * of read() and writev(), and the handshake (tls_step) runs before the
 * first read. OpenSSL's non-blocking API is used directly because the
 * I/O here is not a bufferevent. Two things differ from a plain socket:
 * decrypted bytes may wait inside the SSL when the socket has nothing
 * more (read_cb comes back for them), and either direction may have to
 * wait for the other (a write event drives a pending read, and
 * tls_flush_on_read a pending write).
 */
#include "conn.h"

#include <arpa/inet.h>
#include <assert.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include <event2/buffer.h>
#include <event2/event.h>

#include "frame.h"
#include "log.h"
#include "mem.h"
#include "pqerr.h"
#include "clock.h"
#include "config.h"
#include "strcheck.h"
#include "tlsio.h"

#include <openssl/err.h>
#include <openssl/ssl.h>

enum {
    FRAMES_PER_WAKEUP = 64, /* then yield to other connections */
    /* Bytes per read(): 64 KiB less room for libevent's chain header and
     * mem.c's, so that the buffer chain holding one read is a 64 KiB heap
     * block (a 65536-byte read would need a 128 KiB chain, which malloc
     * maps as 33 pages). */
    READ_CHUNK = 65536 - 256,
    READS_PER_WAKEUP = 4,
    CLOSING_GRACE_MS = 5000,     /* a closing peer's time to take its Error */
    TLS_RECORD_MAX = 16384,      /* plaintext bytes per TLS record */
    TLS_HANDSHAKE_RECORD = 0x16, /* first byte of a ClientHello */
    /* Input a connection may always hold, even over memory_high_bytes:
     * room for acks, heartbeats and small requests, so that consumers can
     * still free memory while big partial frames wait. */
    INPUT_FREE_BYTES = 4096,
};

/*
 * Reads land here first and are then copied into the connection's input
 * buffer, so that the buffer grows with the bytes that arrived (a read of
 * 10 bytes costs 10 bytes, not a READ_CHUNK reservation). The loop is
 * single-threaded; one buffer serves every connection.
 */
static uint8_t read_scratch[READ_CHUNK];

static const char *const state_names[] = {
    [CONN_HANDSHAKE] = "handshake",
    [CONN_READY] = "ready",
    [CONN_CLOSING] = "closing",
    [CONN_CLOSED] = "closed",
};

static void read_cb(evutil_socket_t fd, short what, void *arg);
static void write_cb(evutil_socket_t fd, short what, void *arg);

void
conn_log_bad(struct connset *cs, enum log_level lvl, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;

    if (lvl < log_get_level()) {
        return;
    }
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    log_limited(&cs->badlog, *cs->now_mono_ms, CONN_BAD_LOG_PER_S, lvl, "%s",
                msg);
}

/* ---- connections waiting for Hello, oldest first ---- */

static void
hs_link(struct conn *c)
{
    struct connset *cs = c->set;

    c->hs_next = NULL;
    c->hs_prev = cs->hs_newest;
    if (cs->hs_newest) {
        cs->hs_newest->hs_next = c;
    } else {
        cs->hs_oldest = c;
    }
    cs->hs_newest = c;
    cs->nhandshake++;
}

static void
hs_unlink(struct conn *c)
{
    struct connset *cs = c->set;

    if (c->hs_prev) {
        c->hs_prev->hs_next = c->hs_next;
    } else {
        cs->hs_oldest = c->hs_next;
    }
    if (c->hs_next) {
        c->hs_next->hs_prev = c->hs_prev;
    } else {
        cs->hs_newest = c->hs_prev;
    }
    c->hs_prev = c->hs_next = NULL;
    cs->nhandshake--;
}

const char *
conn_state_name(enum conn_state s)
{
    return state_names[s];
}

void
conn_set_state(struct conn *c, enum conn_state s)
{
    bool legal;

    switch (s) {
    case CONN_READY:
        legal = c->state == CONN_HANDSHAKE;
        break;
    case CONN_CLOSING:
        legal = c->state == CONN_HANDSHAKE || c->state == CONN_READY;
        break;
    case CONN_CLOSED:
        legal = c->state != CONN_CLOSED;
        break;
    default:
        legal = false;
        break;
    }
    assert(legal);
    if (c->state == CONN_HANDSHAKE) {
        hs_unlink(c);
    }
    log_debug("conn %llu %s: %s -> %s", (unsigned long long)c->id, c->peer,
              state_names[c->state], state_names[s]);
    c->state = s;
}

bool
conn_is_open(const struct conn *c)
{
    return c->state == CONN_HANDSHAKE || c->state == CONN_READY;
}

static bool
conn_writes(const struct conn *c)
{
    return c->fd >= 0 && c->state != CONN_CLOSED;
}

static void
set_reading(struct conn *c, bool on)
{
    if (on && !c->reading) {
        event_add(c->rev, NULL);
    } else if (!on && c->reading) {
        event_del(c->rev);
    }
    c->reading = on;
}

static void
set_writing(struct conn *c, bool on)
{
    if (on && !c->writing) {
        event_add(c->wev, NULL);
    } else if (!on && c->writing) {
        event_del(c->wev);
    }
    c->writing = on;
}

/* ---- output ---- */

bool
conn_output_pending(const struct conn *c)
{
    return c->out != NULL && evbuffer_get_length(c->out) > 0;
}

/* Output was queued: flush it in this pass, and watch the high mark. */
static void
note_output(struct conn *c)
{
    struct connset *cs = c->set;

    c->last_tx_ms = *cs->now_mono_ms;
    cs->stats.frames_out++;
    if (!c->on_flush) {
        c->on_flush = true;
        c->flush_next = cs->flush;
        cs->flush = c;
    }
    if (!c->output_full &&
        evbuffer_get_length(c->out) > cs->cfg->conn_output_high_bytes) {
        /* A peer that does not read what it asked for gets no more
         * deliveries and no more of its requests are read, so its
         * replies cannot pile up without bound. */
        c->output_full = true;
        set_reading(c, false);
        c->set->h->output(c->set->arg, c, true);
    }
}

uint8_t *
conn_reserve(struct conn *c, size_t n)
{
    struct evbuffer_iovec v;

    if (!conn_writes(c)) {
        return NULL;
    }
    if (evbuffer_reserve_space(c->out, (ev_ssize_t)n, &v, 1) != 1) {
        return NULL;
    }
    c->resv = v.iov_base;
    return v.iov_base;
}

void
conn_commit(struct conn *c, size_t n)
{
    struct evbuffer_iovec v = {.iov_base = c->resv, .iov_len = n};

    assert(c->resv != NULL);
    evbuffer_commit_space(c->out, &v, 1);
    c->resv = NULL;
    note_output(c);
}

int
conn_send(struct conn *c, const Protoq__Frame *f)
{
    size_t n = frame_packed_size(f);
    uint8_t *p = conn_reserve(c, n);

    if (p == NULL) {
        return conn_writes(c) ? PQ_ENOMEM : PQ_ECLOSED;
    }
    conn_commit(c, frame_pack(f, p));
    return PQ_OK;
}

static int
send_errorv(struct conn *c, uint64_t request_id, int code, const char *fmt,
            va_list ap)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Error e = PROTOQ__ERROR__INIT;
    char msg[512];

    vsnprintf(msg, sizeof(msg), fmt, ap);
    e.code = (Protoq__ErrorCode)code;
    e.message = msg;
    f.request_id = request_id;
    f.kind_case = PROTOQ__FRAME__KIND_ERROR;
    f.error = &e;
    return conn_send(c, &f);
}

int
conn_send_error(struct conn *c, uint64_t request_id, int code, const char *fmt,
                ...)
{
    va_list ap;
    int rc;

    va_start(ap, fmt);
    rc = send_errorv(c, request_id, code, fmt, ap);
    va_end(ap);
    return rc;
}

/* Outcome of one write to the peer. */
enum wr { WR_SOME, WR_AGAIN, WR_WAIT_READ, WR_ERROR };

/*
 * write_some: one write of c's output, plain (one writev of everything)
 * or TLS (one record of at most TLS_RECORD_MAX bytes); drains what went
 * out and sets *wrote to its length (WR_SOME with 0: try again).
 * WR_ERROR with the reason in why.
 */
static enum wr
write_some(struct conn *c, size_t *wrote, char *why, size_t whylen)
{
    *wrote = 0;
    if (c->ssl != NULL) {
        size_t len = evbuffer_get_length(c->out), n;
        size_t chunk = len < TLS_RECORD_MAX ? len : TLS_RECORD_MAX;
        const uint8_t *p = evbuffer_pullup(c->out, (ev_ssize_t)chunk);

        if (p == NULL) {
            snprintf(why, whylen, "out of memory for output");
            return WR_ERROR;
        }
        switch (tlsio_write(c->ssl, p, chunk, &n, why, whylen)) {
        case TLSIO_OK:
            evbuffer_drain(c->out, n);
            *wrote = n;
            return WR_SOME;
        case TLSIO_WANT_WRITE:
            return WR_AGAIN;
        case TLSIO_WANT_READ:
            return WR_WAIT_READ;
        case TLSIO_CLOSED:
            snprintf(why, whylen, "peer closed");
            return WR_ERROR;
        default:
            return WR_ERROR;
        }
    }
    int n = evbuffer_write(c->out, c->fd);

    if (n > 0) {
        *wrote = (size_t)n;
        return WR_SOME;
    }
    if (n < 0 && errno == EINTR) {
        return WR_SOME;
    }
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        return WR_AGAIN;
    }
    snprintf(why, whylen, "%s", n == 0 ? "peer closed" : strerror(errno));
    return WR_ERROR;
}

/*
 * flush: write c's output until it is empty or the kernel buffer is full
 * (then a write event finishes the job). Returns false when c was closed.
 * Before its TLS handshake is done a TLS connection writes nothing (its
 * output waits), except that a CLOSING one is closed at once.
 */
static bool
flush(struct conn *c)
{
    struct connset *cs = c->set;
    char why[256];

    if (c->ssl != NULL && !c->tls_ready) {
        if (c->state == CONN_CLOSING) {
            conn_close(c, "closed during the TLS handshake");
            return false;
        }
        return true;
    }
    while (evbuffer_get_length(c->out) > 0) {
        size_t wrote;

        switch (write_some(c, &wrote, why, sizeof(why))) {
        case WR_SOME:
            cs->stats.bytes_out += (uint64_t)wrote;
            continue;
        case WR_AGAIN:
            set_writing(c, true);
            return true;
        case WR_WAIT_READ:
            c->tls_flush_on_read = true;
            return true;
        case WR_ERROR:
            conn_close(c, why);
            return false;
        }
    }
    set_writing(c, false);
    if (c->output_full &&
        evbuffer_get_length(c->out) <= cs->cfg->conn_output_high_bytes / 2) {
        c->output_full = false;
        /* The frame clock stood still while the broker did not read. */
        if (c->frame_start_ms != 0) {
            c->frame_start_ms = *cs->now_mono_ms;
        }
        if (conn_is_open(c)) {
            set_reading(c, true);
            event_active(c->rev, EV_READ, 0); /* frames may wait in c->in */
        }
        c->set->h->output(c->set->arg, c, false);
    }
    if (c->state == CONN_CLOSING) {
        conn_close(c, "error reply flushed");
        return false;
    }
    return true;
}

void
conn_flush_all(struct connset *cs)
{
    struct conn *c = cs->flush, *next;

    cs->flush = NULL;
    for (; c != NULL; c = next) {
        next = c->flush_next;
        c->on_flush = false;
        c->flush_next = NULL;
        if (conn_writes(c) && !c->writing) {
            flush(c);
        }
    }
}

static void
write_cb(evutil_socket_t fd, short what, void *arg)
{
    struct conn *c = arg;

    (void)fd;
    (void)what;
    *c->set->now_mono_ms = clock_mono_ms();
    set_writing(c, false);
    if (c->ssl != NULL) {
        /* The TLS layer may have waited for a writable socket on behalf
         * of the handshake or a read: let read_cb retry. */
        event_active(c->rev, EV_READ, 0);
    }
    flush(c);
}

/* ---- closing ---- */

static void
move_to_reap(struct conn *c)
{
    struct connset *cs = c->set;

    if (c->prev) {
        c->prev->next = c->next;
    } else {
        cs->conns = c->next;
    }
    if (c->next) {
        c->next->prev = c->prev;
    }
    cs->nconns--;
    c->prev = NULL;
    c->next = cs->reap;
    if (cs->reap) {
        cs->reap->prev = c;
    }
    cs->reap = c;
}

/* One connection less from c's source address. */
static void
addr_release(struct conn *c)
{
    struct addr_count *a = c->addr;

    c->addr = NULL;
    if (a != NULL && --a->n == 0) {
        hmap_str_del(&c->set->addrs, a->host);
        pq_free(a);
    }
}

void
conn_close(struct conn *c, const char *why)
{
    if (c->state == CONN_CLOSED) {
        return;
    }
    log_debug("conn %llu %s: closed: %s", (unsigned long long)c->id, c->peer,
              why);
    c->set->h->closed(c->set->arg, c);
    conn_set_state(c, CONN_CLOSED);
    set_reading(c, false);
    set_writing(c, false);
    if (c->ssl != NULL && c->tls_ready) {
        /* close_notify, best effort: the socket is non-blocking and
         * nothing waits for the peer's answer. */
        (void)SSL_shutdown(c->ssl);
        ERR_clear_error();
    }
    evutil_closesocket(c->fd);
    c->fd = -1;
    if (c->mem_paused) {
        c->mem_paused = false;
        c->set->nmem_paused--;
    }
    addr_release(c);
    move_to_reap(c);
}

/*
 * close_with_error: send an Error and close once it is flushed; reads stop
 * at once and what input c held is let go. The line about it is logged
 * under the set's rate limit.
 */
static void
close_with_error(struct conn *c, uint64_t request_id, int code, const char *msg)
{
    conn_log_bad(c->set, LOG_INFO, "conn %llu %s: closing: %s",
                 (unsigned long long)c->id, c->peer, msg);
    evbuffer_drain(c->in, evbuffer_get_length(c->in));
    c->frame_start_ms = 0;
    conn_send_error(c, request_id, code, "%s", msg);
    conn_set_state(c, CONN_CLOSING);
    c->closing_ms = *c->set->now_mono_ms;
    /* Stop reading; the flush closes once the Error is out. */
    set_reading(c, false);
    /* The subscriptions go now: a closing peer must not get deliveries. */
    c->set->h->closed(c->set->arg, c);
}

void
conn_fatal(struct conn *c, uint64_t request_id, int code, const char *fmt, ...)
{
    va_list ap;
    char msg[512];

    if (!conn_is_open(c)) {
        return;
    }
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    c->set->stats.protocol_errors++;
    close_with_error(c, request_id, code, msg);
}

void
conn_unref(struct conn *c)
{
    assert(c->refs > 0);
    c->refs--;
}

static void
conn_free(struct conn *c)
{
    if (c->rev) {
        event_free(c->rev);
    }
    if (c->wev) {
        event_free(c->wev);
    }
    if (c->in) {
        evbuffer_free(c->in);
    }
    if (c->out) {
        evbuffer_free(c->out);
    }
    SSL_free(c->ssl);
    pq_free(c);
}

void
conn_reap(struct connset *cs)
{
    struct conn *c = cs->reap, *next;

    for (; c != NULL; c = next) {
        next = c->next;
        if (c->refs > 0 || c->on_flush) {
            continue;
        }
        if (c->prev) {
            c->prev->next = c->next;
        } else {
            cs->reap = c->next;
        }
        if (c->next) {
            c->next->prev = c->prev;
        }
        conn_free(c);
    }
}

/* ---- input ---- */

/* Say what a peer that does not speak protoq probably is. */
static const char *
guess_foreign(const uint8_t *h)
{
    if (h[0] == 0x16 && h[1] == 0x03) {
        return " (this looks like a TLS ClientHello; this port speaks plain "
               "protoq)";
    }
    if (memcmp(h, "GET ", 4) == 0 || memcmp(h, "POST", 4) == 0 ||
        memcmp(h, "PUT ", 4) == 0 || memcmp(h, "HEAD", 4) == 0) {
        return " (this looks like HTTP; this port speaks protoq)";
    }
    return "";
}

/*
 * read_frames: decode and dispatch up to FRAMES_PER_WAKEUP frames. Returns
 * true when more complete input may remain.
 */
static bool
read_frames(struct conn *c)
{
    struct evbuffer *in = c->in;

    for (int i = 0; i < FRAMES_PER_WAKEUP; i++) {
        uint8_t hdr[FRAME_HEADER_LEN];
        size_t avail = evbuffer_get_length(in);
        char bad[128];
        const uint8_t *body;
        Protoq__Frame *f;
        ssize_t n;
        int rc;

        if (!conn_is_open(c) || avail < FRAME_HEADER_LEN) {
            return false;
        }
        evbuffer_copyout(in, hdr, FRAME_HEADER_LEN);
        n = frame_check_header(hdr, FRAME_HEADER_LEN, c->max_frame_bytes);
        if (n == PQ_ETOOBIG) {
            conn_fatal(c, 0, PROTOQ__ERROR_CODE__FRAME_TOO_LARGE,
                       "frame length %u over the limit of %u bytes%s",
                       (unsigned)hdr[0] << 24 | (unsigned)hdr[1] << 16 |
                           (unsigned)hdr[2] << 8 | hdr[3],
                       c->max_frame_bytes, guess_foreign(hdr));
            return false;
        }
        if (n < 0) {
            conn_fatal(c, 0, PROTOQ__ERROR_CODE__MALFORMED_FRAME,
                       "frame length 0");
            return false;
        }
        if (avail < FRAME_HEADER_LEN + (size_t)n) {
            return false;
        }
        body = evbuffer_pullup(in, FRAME_HEADER_LEN + n) + FRAME_HEADER_LEN;
        rc = frame_unpack(body, (size_t)n, frame_decode_budget((size_t)n), &f);
        /* A string protobuf-c took (a NUL would cut it short) but proto3
         * does not allow: refused before anything looks at it. */
        bad[0] = '\0';
        if (rc == PQ_OK) {
            (void)wire_strings_check(&protoq__frame__descriptor, body,
                                     (size_t)n, bad, sizeof(bad));
        }
        evbuffer_drain(in, FRAME_HEADER_LEN + (size_t)n);
        c->frame_start_ms = 0;
        if (rc != PQ_OK) {
            conn_fatal(
                c, 0, PROTOQ__ERROR_CODE__MALFORMED_FRAME,
                rc == PQ_ETOOBIG
                    ? "frame of %zd bytes needs too much memory to decode"
                    : "frame of %zd bytes is not a valid protoq.Frame",
                n);
            return false;
        }
        c->last_rx_ms = *c->set->now_mono_ms;
        c->set->stats.frames_in++;
        if (bad[0] != '\0') {
            conn_send_error(c, f->request_id, PROTOQ__ERROR_CODE__BAD_REQUEST,
                            "field %s: not valid UTF-8, or holds a NUL "
                            "character",
                            bad);
        } else {
            c->set->h->frame(c->set->arg, c, f);
        }
        frame_free(f);
    }
    return conn_is_open(c) && evbuffer_get_length(in) >= FRAME_HEADER_LEN;
}

static void
mem_pause(struct conn *c, size_t have)
{
    struct connset *cs = c->set;

    set_reading(c, false);
    c->mem_paused = true;
    cs->nmem_paused++;
    cs->stats.mem_pauses++;
    conn_log_bad(cs, LOG_INFO,
                 "conn %llu %s: not reading: memory use %zu near "
                 "memory_high_bytes (%llu) with %zu bytes of an unfinished "
                 "frame held",
                 (unsigned long long)c->id, c->peer, pq_mem_used(),
                 (unsigned long long)cs->cfg->memory_high_bytes, have);
}

void
conn_resume_reads(struct connset *cs)
{
    if (cs->nmem_paused == 0 || pq_mem_used() >= cs->cfg->memory_high_bytes) {
        return;
    }
    for (struct conn *c = cs->conns; c != NULL; c = c->next) {
        if (!c->mem_paused) {
            continue;
        }
        c->mem_paused = false;
        cs->nmem_paused--;
        if (conn_is_open(c) && !c->output_full) {
            set_reading(c, true);
            event_active(c->rev, EV_READ, 0);
        }
    }
}

/* Outcome of one read from the peer. */
enum rd { RD_DATA, RD_AGAIN, RD_EOF, RD_ERROR };

/* read_some: one read() or one TLS record into buf; RD_ERROR with the
 * reason in why. */
static enum rd
read_some(struct conn *c, void *buf, size_t want, size_t *got, char *why,
          size_t whylen)
{
    if (c->ssl != NULL) {
        switch (tlsio_read(c->ssl, buf, want, got, why, whylen)) {
        case TLSIO_OK:
            return RD_DATA;
        case TLSIO_WANT_READ:
            return RD_AGAIN;
        case TLSIO_WANT_WRITE:
            set_writing(c, true); /* write_cb brings read_cb back */
            return RD_AGAIN;
        case TLSIO_CLOSED:
            return RD_EOF;
        default:
            return RD_ERROR;
        }
    }
    for (;;) {
        ssize_t n = read(c->fd, buf, want);

        if (n > 0) {
            *got = (size_t)n;
            return RD_DATA;
        }
        if (n == 0) {
            return RD_EOF;
        }
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            return RD_AGAIN;
        }
        if (errno != EINTR) {
            snprintf(why, whylen, "%s", strerror(errno));
            return RD_ERROR;
        }
    }
}

/*
 * fill: read what the socket has, without buffering more than one largest
 * frame unparsed. Input counts against memory_high_bytes like everything
 * else (mem.c); over it, a connection may hold only INPUT_FREE_BYTES, and
 * one whose unfinished frame needs more is not read until usage drops.
 * Returns false when c was closed.
 */
static bool
fill(struct conn *c)
{
    struct connset *cs = c->set;
    size_t cap = FRAME_HEADER_LEN + (size_t)cs->cfg->max_frame_bytes;
    /* A TLS read returns one record (16 KiB at most): allow as many
     * bytes per wakeup as plain reads of READ_CHUNK would. */
    int reads = c->ssl != NULL
                    ? READS_PER_WAKEUP *
                          ((READ_CHUNK + TLS_RECORD_MAX - 1) / TLS_RECORD_MAX)
                    : READS_PER_WAKEUP;
    char why[256];

    for (int i = 0; i < reads; i++) {
        size_t have = evbuffer_get_length(c->in);
        size_t want, got = 0;

        if (have >= cap) {
            return true;
        }
        want = cap - have < READ_CHUNK ? cap - have : READ_CHUNK;
        if (have + want > INPUT_FREE_BYTES &&
            pq_mem_used() + want > cs->cfg->memory_high_bytes) {
            if (have >= INPUT_FREE_BYTES) {
                mem_pause(c, have);
                return true;
            }
            want = INPUT_FREE_BYTES - have;
        }
        switch (read_some(c, read_scratch, want, &got, why, sizeof(why))) {
        case RD_DATA:
            if (evbuffer_add(c->in, read_scratch, got) != 0) {
                conn_close(c, "out of memory for input");
                return false;
            }
            cs->stats.bytes_in += (uint64_t)got;
            /* A short plain read drained the socket; a TLS read stops
             * at its record's end, and more may follow. */
            if (got < want && c->ssl == NULL) {
                return true; /* drained the socket */
            }
            continue;
        case RD_AGAIN:
            return true;
        case RD_EOF:
            conn_close(c, "peer closed");
            return false;
        case RD_ERROR:
            conn_close(c, why);
            return false;
        }
    }
    return true;
}

/*
 * refuse_plain: a plain protoq client (or anything else) on the TLS port.
 * Its first bytes are read, so that the close is not a reset that could
 * beat the Error to it, and it gets an Error in plain protoq saying so.
 */
static void
refuse_plain(struct conn *c)
{
    SSL_free(c->ssl);
    c->ssl = NULL;
    if (fill(c)) {
        conn_fatal(c, 0, PROTOQ__ERROR_CODE__BAD_REQUEST,
                   "this port speaks TLS: connect with tls://HOST:PORT");
    }
}

/*
 * tls_step: drive the server side of c's TLS handshake. Returns true once
 * it is done (frames may be read), false while it waits for the socket or
 * when c was closed.
 */
static bool
tls_step(struct conn *c)
{
    char why[256];
    uint8_t first;

    if (c->tls_ready) {
        return true;
    }
    if (!c->tls_sniffed) {
        ssize_t n = recv(c->fd, &first, 1, MSG_PEEK);

        if (n < 0 &&
            (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) {
            return false;
        }
        if (n <= 0) {
            conn_close(c, n == 0 ? "peer closed" : strerror(errno));
            return false;
        }
        c->tls_sniffed = true;
        if (first != TLS_HANDSHAKE_RECORD) {
            refuse_plain(c);
            return false;
        }
    }
    switch (tlsio_handshake(c->ssl, why, sizeof(why))) {
    case TLSIO_OK:
        c->tls_ready = true;
        tlsio_peer_cn(c->ssl, c->peer_cn, sizeof(c->peer_cn));
        log_debug("conn %llu %s: %s %s%s%s", (unsigned long long)c->id, c->peer,
                  SSL_get_version(c->ssl), SSL_get_cipher_name(c->ssl),
                  c->peer_cn[0] != '\0' ? ", client certificate CN=" : "",
                  c->peer_cn);
        return true;
    case TLSIO_WANT_READ:
        return false;
    case TLSIO_WANT_WRITE:
        set_writing(c, true);
        return false;
    case TLSIO_CLOSED:
        conn_close(c, "peer closed during the TLS handshake");
        return false;
    default:
        conn_log_bad(c->set, LOG_INFO, "conn %llu %s: TLS handshake failed: %s",
                     (unsigned long long)c->id, c->peer, why);
        conn_close(c, "TLS handshake failed");
        return false;
    }
}

static void
read_cb(evutil_socket_t fd, short what, void *arg)
{
    struct conn *c = arg;

    (void)fd;
    (void)what;
    *c->set->now_mono_ms = clock_mono_ms();
    if (!conn_is_open(c) || !c->reading) {
        return;
    }
    if (c->ssl != NULL && !tls_step(c)) {
        return;
    }
    if (c->tls_flush_on_read) {
        c->tls_flush_on_read = false;
        if (!flush(c)) {
            return;
        }
    }
    if (!fill(c)) {
        return;
    }
    /* Fairness: more frames wait, or decrypted bytes wait inside the
     * SSL where no socket event will announce them: come back in the
     * next pass. */
    if (read_frames(c) ||
        (c->ssl != NULL && conn_is_open(c) && SSL_has_pending(c->ssl))) {
        event_active(c->rev, EV_READ, 0);
    }
    /* The frame that begins what is left started arriving by now. */
    if (c->frame_start_ms == 0 && evbuffer_get_length(c->in) > 0) {
        c->frame_start_ms = *c->set->now_mono_ms;
    }
}

static void
format_peer(const struct sockaddr *sa, char *buf, size_t len)
{
    char host[INET6_ADDRSTRLEN] = "?";
    unsigned port = 0;

    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &s4->sin_addr, host, sizeof(host));
        port = ntohs(s4->sin_port);
        snprintf(buf, len, "%s:%u", host, port);
    } else if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &s6->sin6_addr, host, sizeof(host));
        port = ntohs(s6->sin6_port);
        snprintf(buf, len, "[%s]:%u", host, port);
    } else {
        snprintf(buf, len, "unknown");
    }
}

/*
 * addr_key: what connections are counted by: the IPv4 address, or the /64
 * of an IPv6 one (one host usually holds a whole /64).
 */
static void
addr_key(const struct sockaddr *sa, char *buf, size_t len)
{
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &s4->sin_addr, buf, (socklen_t)len);
    } else if (sa->sa_family == AF_INET6) {
        struct in6_addr a = ((const struct sockaddr_in6 *)sa)->sin6_addr;
        char host[INET6_ADDRSTRLEN];

        memset(a.s6_addr + 8, 0, 8);
        inet_ntop(AF_INET6, &a, host, sizeof(host));
        snprintf(buf, len, "%s/64", host);
    } else {
        snprintf(buf, len, "unknown");
    }
}

/*
 * refuse: tell a connection that is not taken why (an Error, best effort:
 * nothing waits for the socket) and close it. A connection to the TLS port
 * (plain false) is closed without one: its peer expects a TLS handshake.
 */
static void
refuse(evutil_socket_t fd, bool plain, const char *why)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Error e = PROTOQ__ERROR__INIT;
    uint8_t buf[512];

    e.code = PROTOQ__ERROR_CODE__OVERLOADED;
    e.message = (char *)why;
    f.kind_case = PROTOQ__FRAME__KIND_ERROR;
    f.error = &e;
    if (plain && frame_packed_size(&f) <= sizeof(buf)) {
        size_t n = frame_pack(&f, buf);
        if (send(fd, buf, n, MSG_DONTWAIT | MSG_NOSIGNAL) < 0) {
            /* best effort: the close says enough */
        }
    }
    evutil_closesocket(fd);
}

/*
 * admit: may one more connection from host come in (plain: not on the TLS
 * port)? Returns its address's count (created at 0 if new), or NULL after
 * refusing fd.
 */
static struct addr_count *
admit(struct connset *cs, evutil_socket_t fd, bool plain, const char *host)
{
    const struct config *cfg = cs->cfg;
    struct addr_count *a;
    uint32_t hs_cap;

    if (cs->nconns >= cfg->max_connections) {
        cs->stats.conns_rejected++;
        conn_log_bad(cs, LOG_WARN,
                     "refusing a connection from %s: max_connections (%u) "
                     "reached",
                     host, cfg->max_connections);
        refuse(fd, plain, "too many connections (max_connections)");
        return NULL;
    }
    a = hmap_str_get(&cs->addrs, host);
    if (a != NULL && a->n >= cfg->max_connections_per_addr) {
        cs->stats.conns_rejected_addr++;
        conn_log_bad(cs, LOG_WARN,
                     "refusing a connection from %s: max_connections_per_addr "
                     "(%u) reached",
                     host, cfg->max_connections_per_addr);
        refuse(fd, plain,
               "too many connections from this address "
               "(max_connections_per_addr)");
        return NULL;
    }
    if (a == NULL) {
        a = pq_calloc(1, sizeof(*a));
        if (a == NULL) {
            log_warn("refusing a connection: out of memory");
            evutil_closesocket(fd);
            return NULL;
        }
        snprintf(a->host, sizeof(a->host), "%s", host);
        if (hmap_str_put(&cs->addrs, a->host, a) != PQ_OK) {
            log_warn("refusing a connection: out of memory");
            pq_free(a);
            evutil_closesocket(fd);
            return NULL;
        }
    }
    /* Strangers that have not said Hello may hold at most half the slots;
     * past their own cap the oldest of them makes room for the newcomer,
     * so a flood of silent sockets cannot keep a real client out. */
    hs_cap = cfg->max_connections / 2;
    if (hs_cap == 0) {
        hs_cap = 1;
    }
    if (cfg->max_handshake_connections < hs_cap) {
        hs_cap = cfg->max_handshake_connections;
    }
    while (cs->nhandshake >= hs_cap && cs->hs_oldest != NULL) {
        struct conn *old = cs->hs_oldest;

        cs->stats.handshake_evicted++;
        close_with_error(old, 0, PROTOQ__ERROR_CODE__OVERLOADED,
                         "too many connections waiting for Hello "
                         "(max_handshake_connections); the oldest is closed");
    }
    return a;
}

void
conn_accept(struct connset *cs, evutil_socket_t fd, const struct sockaddr *sa,
            int salen, SSL_CTX *tls)
{
    struct addr_count *a;
    struct conn *c;
    char host[sizeof(a->host)];
    int one = 1;

    (void)salen;
    addr_key(sa, host, sizeof(host));
    a = admit(cs, fd, tls == NULL, host);
    if (a == NULL) {
        return;
    }
    c = pq_calloc(1, sizeof(*c));
    if (c == NULL) {
        log_warn("refusing a connection: out of memory");
        evutil_closesocket(fd);
        if (a->n == 0) {
            hmap_str_del(&cs->addrs, a->host);
            pq_free(a);
        }
        return;
    }
    /* From here on the address's count goes with c (addr_release). */
    c->set = cs;
    c->addr = a;
    a->n++;
    c->fd = fd;
    c->in = evbuffer_new();
    c->out = evbuffer_new();
    c->rev = event_new(cs->base, fd, EV_READ | EV_PERSIST, read_cb, c);
    c->wev = event_new(cs->base, fd, EV_WRITE, write_cb, c);
    if (tls != NULL) {
        c->ssl = SSL_new(tls);
    }
    if (c->in == NULL || c->out == NULL || c->rev == NULL || c->wev == NULL ||
        (tls != NULL && (c->ssl == NULL || SSL_set_fd(c->ssl, fd) != 1)) ||
        evutil_make_socket_nonblocking(fd) < 0) {
        log_warn("refusing a connection: out of memory");
        evutil_closesocket(fd);
        addr_release(c);
        conn_free(c);
        return;
    }
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (c->ssl != NULL) {
        SSL_set_accept_state(c->ssl);
    }
    c->state = CONN_HANDSHAKE;
    hs_link(c);
    c->id = ++cs->next_id;
    c->max_frame_bytes = cs->cfg->max_hello_bytes;
    c->accepted_ms = c->last_rx_ms = c->last_tx_ms = *cs->now_mono_ms;
    format_peer(sa, c->peer, sizeof(c->peer));
    snprintf(c->name, sizeof(c->name), "-");

    c->next = cs->conns;
    if (cs->conns) {
        cs->conns->prev = c;
    }
    cs->conns = c;
    cs->nconns++;
    cs->stats.conns_accepted++;
    set_reading(c, true);
    log_debug("conn %llu %s: accepted", (unsigned long long)c->id, c->peer);
}

/* ---- timers ---- */

static void
send_heartbeat(struct conn *c)
{
    Protoq__Frame f = PROTOQ__FRAME__INIT;
    Protoq__Heartbeat hb = PROTOQ__HEARTBEAT__INIT;

    f.kind_case = PROTOQ__FRAME__KIND_HEARTBEAT;
    f.heartbeat = &hb;
    conn_send(c, &f);
}

/*
 * conn_timed_out: close c if a frame it began did not arrive whole within
 * frame_timeout_ms (unless the broker itself stopped reading it for its
 * output), or if it has no subscription and sent nothing for
 * idle_conn_timeout_ms. True when it was closed.
 */
static bool
conn_timed_out(struct conn *c, uint64_t now_ms)
{
    struct connset *cs = c->set;
    const struct config *cfg = cs->cfg;
    char msg[160];

    if (!conn_is_open(c)) {
        return false;
    }
    if (c->frame_start_ms != 0 && !c->output_full &&
        now_ms - c->frame_start_ms >= cfg->frame_timeout_ms) {
        cs->stats.frame_timeouts++;
        snprintf(msg, sizeof(msg),
                 "frame not complete %u ms after it began "
                 "(frame_timeout_ms; %zu bytes of it arrived)",
                 cfg->frame_timeout_ms, evbuffer_get_length(c->in));
        close_with_error(c, 0, PROTOQ__ERROR_CODE__MALFORMED_FRAME, msg);
        return true;
    }
    if (c->state == CONN_READY && c->nsubs == 0 &&
        cfg->idle_conn_timeout_ms != 0 &&
        now_ms - c->last_rx_ms >= cfg->idle_conn_timeout_ms) {
        cs->stats.idle_closed++;
        snprintf(msg, sizeof(msg),
                 "idle for %u ms without a subscription "
                 "(idle_conn_timeout_ms)",
                 cfg->idle_conn_timeout_ms);
        close_with_error(c, 0, PROTOQ__ERROR_CODE__OVERLOADED, msg);
        return true;
    }
    return false;
}

void
conn_housekeeping(struct connset *cs, uint64_t now_ms)
{
    struct conn *c, *next;

    for (c = cs->conns; c != NULL; c = next) {
        next = c->next;
        if (c->state == CONN_CLOSING &&
            now_ms - c->closing_ms >= CLOSING_GRACE_MS) {
            conn_close(c, "error reply not taken in time");
            continue;
        }
        if (c->state == CONN_HANDSHAKE &&
            now_ms - c->accepted_ms >= cs->cfg->idle_timeout_ms) {
            conn_fatal(c, 0, PROTOQ__ERROR_CODE__UNEXPECTED_FRAME,
                       "no Hello within %u ms", cs->cfg->idle_timeout_ms);
            continue;
        }
        if (conn_timed_out(c, now_ms)) {
            continue;
        }
        if (c->state != CONN_READY || c->heartbeat_ms == 0) {
            continue;
        }
        /* Liveness matters where jobs are held: a silent consumer is
         * closed so its deliveries go to someone else. */
        if (c->nsubs > 0 &&
            now_ms - c->last_rx_ms >= cs->cfg->heartbeat_timeout_ms) {
            conn_log_bad(cs, LOG_INFO,
                         "conn %llu %s: no frame for %llu ms, closing",
                         (unsigned long long)c->id, c->peer,
                         (unsigned long long)(now_ms - c->last_rx_ms));
            conn_close(c, "heartbeat timeout");
            continue;
        }
        if (now_ms - c->last_tx_ms >= c->heartbeat_ms) {
            send_heartbeat(c);
        }
    }
}

uint32_t
conn_count_state(const struct connset *cs, enum conn_state st)
{
    uint32_t n = 0;

    if (st == CONN_HANDSHAKE) {
        return cs->nhandshake;
    }
    for (const struct conn *c = cs->conns; c != NULL; c = c->next) {
        n += c->state == st;
    }
    return n;
}

void
conn_set_fini(struct connset *cs)
{
    size_t it = 0;
    struct addr_count *a;

    while ((a = hmap_str_next(&cs->addrs, &it, NULL)) != NULL) {
        pq_free(a);
    }
    hmap_str_fini(&cs->addrs);
}
