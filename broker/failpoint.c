/* failpoint.c: see failpoint.h. */
#include "failpoint.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static char armed[64];  /* "" = none */
static long hits_left;  /* crash when it reaches 0 */
static char slowed[64]; /* PROTOQ_DELAY's name; "" = none */
static long delay_ms;

/* name_of: copy v's NAME of NAME[:N] into buf; the N part, or NULL. */
static const char *
name_of(const char *v, char *buf, size_t cap)
{
    const char *colon = strchr(v, ':');
    size_t n = colon ? (size_t)(colon - v) : strlen(v);

    if (n >= cap) {
        buf[0] = '\0';
        return NULL;
    }
    memcpy(buf, v, n);
    buf[n] = '\0';
    return colon ? colon + 1 : NULL;
}

void
failpoint_init(void)
{
    const char *v = getenv("PROTOQ_FAILPOINT");
    const char *d = getenv("PROTOQ_DELAY");
    const char *num;

    if (d != NULL && *d != '\0') {
        num = name_of(d, slowed, sizeof(slowed));
        delay_ms = num ? atol(num) : 0;
        if (slowed[0] != '\0' && delay_ms > 0) {
            fprintf(stderr, "protoqd: warn: delay %s armed: %ld ms a hit\n",
                    slowed, delay_ms);
        } else {
            slowed[0] = '\0';
        }
    }
    if (v == NULL || *v == '\0') {
        return;
    }
    num = name_of(v, armed, sizeof(armed));
    hits_left = num ? atol(num) : 1;
    if (hits_left < 1) {
        hits_left = 1;
    }
    if (armed[0] != '\0') {
        fprintf(stderr, "protoqd: warn: failpoint %s armed: crash at hit %ld\n",
                armed, hits_left);
    }
}

void
failpoint_delay(const char *name)
{
    struct timespec ts;

    if (slowed[0] == '\0' || strcmp(name, slowed) != 0) {
        return;
    }
    ts.tv_sec = delay_ms / 1000;
    ts.tv_nsec = (delay_ms % 1000) * 1000000L;
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

void
failpoint(const char *name)
{
    if (armed[0] == '\0' || strcmp(name, armed) != 0) {
        return;
    }
    if (__atomic_sub_fetch(&hits_left, 1, __ATOMIC_SEQ_CST) == 0) {
        /* A (void) cast does not silence warn_unused_result, which
         * _FORTIFY_SOURCE (Debian's build flags) puts on write. */
        if (write(STDERR_FILENO, "protoqd: failpoint hit, SIGKILL\n", 32) < 0) {
            /* nowhere to report it; the kill follows */
        }
        kill(getpid(), SIGKILL);
        _exit(137); /* not reached */
    }
}
