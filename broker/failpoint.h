/*
 * failpoint.h: named crash points for the crash tests. With
 * PROTOQ_FAILPOINT=NAME:N in the environment, protoqd kills itself with
 * SIGKILL at the Nth time it passes failpoint NAME (N defaults to 1), so a
 * test can crash it at exactly the moment that matters. Without the
 * variable every failpoint is one predictable branch. Process-wide: read
 * once at start; safe to hit from the storage thread.
 *
 * Names:
 *   write-before-sync    a batch is written, its fdatasync not yet done
 *   sync-before-confirm  a batch is synced, its confirms not yet sent
 *   segment-roll         the old segment is sealed, nothing in the new one
 *   compaction           half of one compaction pass is written
 *
 * With PROTOQ_DELAY=NAME:MS, failpoint_delay(NAME) sleeps MS ms at every
 * hit instead, so a test can make one step slow:
 *   store-read           reading a record back from a segment
 */
#ifndef PQ_FAILPOINT_H
#define PQ_FAILPOINT_H

/* failpoint_init: read PROTOQ_FAILPOINT; call once before any thread. */
void failpoint_init(void);

/* failpoint: crash here if armed for name and this is the Nth hit. */
void failpoint(const char *name);

/* failpoint_delay: sleep here if PROTOQ_DELAY names name. */
void failpoint_delay(const char *name);

#endif
