/*
 * testutil.h: helpers for the integration tests (a real protoqd on
 * loopback). Each test starts its own broker in a fresh mkdtemp directory on
 * an ephemeral port the broker reports through --port-file, talks to it with
 * libprotoq or raw sockets, and stops it. Every wait here is bounded; every
 * address is 127.0.0.1 (or ::1).
 *
 * The broker binary is $PROTOQD, else build/protoqd (relative to the
 * current directory). The broker's stderr goes to DIR/protoqd.log.
 */
#ifndef PQ_TESTUTIL_H
#define PQ_TESTUTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <check.h>

#include "frame.h" /* Protoq__Frame, pqerr.h */
#include "protoq.h"

/* A protoqd started by srv_start. */
struct srv {
    pid_t pid;          /* 0 when not running */
    char dir[256];      /* the test's temp dir (mkdtemp) */
    char data_dir[300]; /* DIR/data */
    char addr[64];      /* "127.0.0.1:PORT" for protoq_connect */
    uint16_t port;
    const char *const *extra_args; /* remembered for srv_restart */
};

/*
 * srv_start: make a temp dir, start protoqd on it (--listen 127.0.0.1:0
 * --port-file DIR/port --data-dir DIR/data --log-level warn, then
 * extra_args, a NULL-terminated array or NULL) and wait up to 5 s for the
 * port file. Returns 0 on success, -1 (with a message on stderr and the
 * broker killed) on failure. extra_args must outlive s (restart reuses it).
 */
int srv_start(struct srv *s, const char *const *extra_args);

/*
 * srv_launch: start protoqd again on s's existing dir and data dir (a new
 * port), used by srv_restart and after srv_kill9. Returns 0 or -1.
 */
int srv_launch(struct srv *s);

/* srv_restart: srv_stop then srv_launch on the same data dir (new port). */
int srv_restart(struct srv *s);

/* srv_kill9: SIGKILL the broker and reap it (no orderly shutdown). */
void srv_kill9(struct srv *s);

/*
 * srv_stop: SIGTERM, wait up to 5 s, then SIGKILL. Returns the broker's
 * exit status (0..255), 128+signal if a signal killed it, or -1 if it was
 * not running.
 */
int srv_stop(struct srv *s);

/* srv_cleanup: stop the broker if running and rm -rf the temp dir. */
void srv_cleanup(struct srv *s);

/* srv_log_path: DIR/protoqd.log into buf. */
void srv_log_path(const struct srv *s, char *buf, size_t cap);

/* srv_log_has: the broker's log (DIR/protoqd.log) has a line containing
 * needle. */
bool srv_log_has(const struct srv *s, const char *needle);

/* A config file in a temp dir of its own, shared by the brokers of one
 * test program: written once by main, removed at its end. */
struct test_conf {
    char dir[64];
    char path[128];
};

/* test_conf_write: mkdtemp a dir and write text to DIR/protoqd.conf.
 * 0, or -1 with a message on stderr. */
int test_conf_write(struct test_conf *tc, const char *text);

/* test_conf_remove: remove the file and its dir. */
void test_conf_remove(struct test_conf *tc);

/* srv_vmhwm_kb: the broker's peak RSS (VmHWM, KiB) or -1. */
long srv_vmhwm_kb(const struct srv *s);

/* srv_binary: the protoqd under test ($PROTOQD, else build/protoqd). */
const char *srv_binary(void);

/*
 * prog_run: run argv (argv[0] a path) with stdout and stderr into outpath,
 * for at most timeout_ms. Returns the exit status (0..255), 128+signal, or
 * -1 when it was still running and had to be killed.
 */
int prog_run(const char *const *argv, const char *outpath, int timeout_ms);

/* file_slurp: up to cap-1 bytes of path into buf, NUL-terminated ("" when
 * it cannot be read). Returns buf. */
char *file_slurp(const char *path, char *buf, size_t cap);

/* now_ms_mono: CLOCK_MONOTONIC in milliseconds. */
int64_t now_ms_mono(void);

/*
 * wait_until: call cond(arg) every few ms until it returns true or
 * timeout_ms passes. Returns true when cond held.
 */
bool wait_until(bool (*cond)(void *arg), void *arg, int timeout_ms);

/* ---- libprotoq helpers (fail the current Check test on error) ---- */

/* pq_connect_or_fail: connect to s with libprotoq; on failure ck_abort
 * with protoq_errmsg. Returns the handle. */
protoq_client *pq_connect_or_fail(const struct srv *s);

/* pq_check_ok: ck_assert that rc is PQ_OK, printing what and the handle's
 * message. */
#define pq_check_ok(c, expr)                                                   \
    do {                                                                       \
        int rc_ = (expr);                                                      \
        ck_assert_msg(rc_ == PQ_OK, "%s: %s (%d): %s", #expr,                  \
                      pq_strerror(rc_), rc_, protoq_errmsg(c));                \
    } while (0)

/* pq_check_remote: ck_assert that rc is PQ_EREMOTE with wire code code. */
#define pq_check_remote(c, expr, code)                                         \
    do {                                                                       \
        int rc_ = (expr);                                                      \
        ck_assert_msg(                                                         \
            rc_ == PQ_EREMOTE && protoq_last_error_code(c) == (code),          \
            "%s: want %s, got %s (%d) code %s: %s", #expr,                     \
            protoq_code_name(code), pq_strerror(rc_), rc_,                     \
            protoq_code_name(protoq_last_error_code(c)), protoq_errmsg(c));    \
    } while (0)

/* ---- raw sockets, for hostile-input tests ---- */

/* raw_connect: a blocking TCP connection to 127.0.0.1:port; -1 on error. */
int raw_connect(uint16_t port);

/* raw_send: write exactly len bytes (MSG_NOSIGNAL). Returns 0, or -1 when
 * the peer closed or another error happened. */
int raw_send(int fd, const void *buf, size_t len);

/* raw_send_slowly: raw_send one byte at a time. */
int raw_send_slowly(int fd, const void *buf, size_t len);

/*
 * raw_read_frame: read one frame (4-byte length + body) within timeout_ms
 * and decode it. Returns 0 with *out (free with frame_free), 1 on EOF
 * before a whole frame, -1 on timeout or error (including a frame over
 * max_bytes or that does not decode).
 */
int raw_read_frame(int fd, int timeout_ms, uint32_t max_bytes,
                   Protoq__Frame **out);

/* raw_wait_eof: true when the peer closes within timeout_ms (data that
 * arrives meanwhile is discarded). */
bool raw_wait_eof(int fd, int timeout_ms);

/*
 * raw_pack: serialize f with its 4-byte prefix into a
 * malloc'ed buffer; *len gets the size. NULL on ENOMEM.
 */
uint8_t *raw_pack(const Protoq__Frame *f, size_t *len);

/* raw_hello: send Hello (version 1, name "raw") and read the Welcome.
 * Returns 0 when a Welcome came back. */
int raw_hello(int fd, int timeout_ms);

/* ---- a TCP proxy, to cut or freeze a connection ---- */

/*
 * A proxy child process between clients and a broker: it accepts on
 * 127.0.0.1:port and forwards each connection, both ways, to
 * 127.0.0.1:backend. proxy_kill cuts (both sockets close at once: FIN
 * both ways); proxy_freeze partitions (the connections open at that moment
 * stop forwarding and are held open, never closed: no FIN, no RST, the
 * way a partitioned node, a NAT that dropped its state or a frozen peer
 * looks) while later connections flow normally.
 */
struct proxy {
    pid_t pid;     /* 0 when not running */
    uint16_t port; /* where clients connect */
    int ctl;       /* our end of the control socketpair */
};

/* proxy_start: listen on 127.0.0.1:port (0: any; an earlier proxy's port
 * may be taken again) and start forwarding to backend. ck_asserts that it
 * started; returns when the child is ready for proxy_freeze. */
void proxy_start(struct proxy *p, uint16_t port, uint16_t backend);

/* proxy_freeze: stop forwarding on every connection open now; returns
 * once the child has frozen them. */
void proxy_freeze(struct proxy *p);

/* proxy_kill: SIGKILL the child and reap it (no-op when not running). */
void proxy_kill(struct proxy *p);

#endif
