/*
 * powerloss.h: a simulated power loss for a real protoqd (the test build
 * build/tests/model/protoqd-pl, see pl_seam.c and pl_journal.h). After a
 * kill -9, pl_apply reads the undo journal the broker wrote and rewrites
 * its data dir as a power loss would have left it.
 */
#ifndef PQ_TEST_MODEL_POWERLOSS_H
#define PQ_TEST_MODEL_POWERLOSS_H

#include <stdbool.h>
#include <stddef.h>

/* What one power loss did. */
struct pl_result {
    long records;  /* journal records read */
    long unsynced; /* writes and size changes not made durable by a sync */
    long undone;   /* of them undone (the torn one counts here) */
    long torn;     /* writes kept in part */
    long vanished; /* files whose creation was not durable */
    long revived;  /* removed files whose removal was not durable */
};

/*
 * pl_apply: for each file in the journal, undo its writes and size changes
 * that no sync covered, newest first, except a random prefix of them that
 * reached the disk anyway and maybe one more torn (a prefix of a write
 * kept); remove files created since the last directory fsync and bring
 * back the ones removed since. The choices come from seed (rand_r), in
 * the order tests/unit/check_store.c's pl_apply_crash makes them; with
 * all, every unsynced record is undone (none kept, none torn), for a test
 * that needs one outcome. Adds to *res. 0, or -1 with err set (an
 * unreadable journal or data dir).
 */
int pl_apply(const char *journal, unsigned seed, bool all,
             struct pl_result *res, char *err, size_t errlen);

/*
 * pl_binary: the test build protoqd-pl: $PROTOQD_PL, else
 * tests/model/protoqd-pl beside $PROTOQD (build/protoqd by default).
 * NULL with errno set when it is not an executable file.
 */
const char *pl_binary(void);

#endif
