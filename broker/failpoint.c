/* failpoint.c: see failpoint.h. */
#include "failpoint.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char armed[64]; /* "" = none */
static long hits_left; /* crash when it reaches 0 */

void
failpoint_init(void)
{
    const char *v = getenv("PROTOQ_FAILPOINT");
    const char *colon;
    size_t n;

    if (v == NULL || *v == '\0') {
        return;
    }
    colon = strchr(v, ':');
    n = colon ? (size_t)(colon - v) : strlen(v);
    if (n >= sizeof(armed)) {
        return;
    }
    memcpy(armed, v, n);
    armed[n] = '\0';
    hits_left = colon ? atol(colon + 1) : 1;
    if (hits_left < 1) {
        hits_left = 1;
    }
    fprintf(stderr, "protoqd: warn: failpoint %s armed: crash at hit %ld\n",
            armed, hits_left);
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
