/*
 * crash_fixture.h: what the crash suites (check_crash.c, check_disk_full.c,
 * check_segments.c) share: the checked fixture (a fresh protoqd per test on
 * a conf with small segments and fast retries), self-checking payloads, and
 * the producer and consumer children with their spawn, reap and drain (the
 * checker that reads their logs is check_crash.c's). Test code only; every
 * wait is bounded.
 *
 * Payloads are self-checking: 16 hex digits of seq, 4 of filler length,
 * the filler (derived from seq) and an FNV-1a checksum in 8 hex digits.
 */
#ifndef PROTOQ_CRASH_FIXTURE_H
#define PROTOQ_CRASH_FIXTURE_H

#include <check.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "testutil.h"

enum {
    SEQ_STRIDE = 1000000, /* seq = (cycle + 1) * SEQ_STRIDE + i */
    PROD_BURST = 32,      /* pipelined publishes per burst */
    PROD_PAUSE_MS = 10,   /* between bursts: ~3000 msg/s, which the
                             acking consumer keeps up with */
    CONS_PREFETCH = 32,
    CHILD_MAX_MS = 15000, /* a child gives up on its own after this */
    REAP_MS = 10000,      /* the parent waits this long for a child */
    PAYLOAD_MAX = 4200,
};

/* The queue every crash test publishes to and consumes from. */
extern const char QUEUE[];
/* The broker of the running test (started by setup). */
extern struct srv g_srv;
/* The conf file (crash_main writes it). */
extern struct test_conf g_conf;
/* protoqd's extra arguments: -c g_conf.path. */
extern const char *const g_args[];
/* crash_main: the program's main: write the conf file every test uses,
 * run s, remove the file; the exit status. */
int crash_main(Suite *s);
/* Checked fixture: start a fresh protoqd on the shared conf. */
void setup(void);
/* Checked fixture: stop the broker and remove its dir. */
void teardown(void);
/* Sleep ms milliseconds. */
void sleep_ms(int ms);
/* Write the self-checking payload of seq (minpad + 0..479 filler bytes) to buf;
 * returns its length. */
size_t make_payload(uint64_t seq, size_t minpad, char *buf);
/* Fork a child that runs the producer (role 'p') or the consumer ('c'), logging
 * to path. */
pid_t spawn(char role, const char *path, uint64_t seq_base);
/* Wait up to REAP_MS for child pid, failing the test if it hangs or dies of a
 * signal; returns its exit code. */
int reap(pid_t pid, const char *what, int cycle);
/* Consume and ack (in this process) until QUEUE is empty, logging to path like
 * the consumer. */
void drain(const char *path);

#endif
