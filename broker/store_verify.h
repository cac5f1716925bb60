/*
 * store_verify.h: the liveness check of a log, private to store.c. Fed
 * every record in log order during a scan (store_open, store_check), it
 * rebuilds which messages are live and which segments they reference,
 * the way the journal's replay does, without building queues.
 *
 * What it can prove from the records alone: a message that a state
 * record (REQUEUE, PROGRESS) shows live, that no ACK or DROP ends
 * afterwards and no queue delete or purge may have removed, but whose
 * PUBLISH is not in the log, was live when a segment holding it went
 * missing: the data dir is damaged (replay would lose it silently).
 * Deletion can never cause that: a segment goes only once nothing live
 * references it, and a live message references its PUBLISH's segment.
 *
 * Memory and time are linear in the records: one entry per message id
 * that is live (or whose end the log does not show), one per queue name.
 */
#ifndef PQ_STORE_VERIFY_H
#define PQ_STORE_VERIFY_H

#include <stddef.h>
#include <stdint.h>

#include "hmap.h"
#include "store.h"

struct vqueue;
struct vent;

struct verify {
    struct hmap_u64 ids; /* id -> entry index + 1 */
    struct vent *ents;
    size_t nents, cap;
    size_t free_head;       /* index + 1 of a free entry; 0: none */
    struct hmap_str queues; /* name -> struct vqueue */
    struct vqueue *qlist;   /* every vqueue, for freeing */
    uint64_t idx;           /* records fed so far */
    uint64_t last_bulk_idx; /* the latest QUEUE_DELETE / PURGE */
    uint32_t floor;         /* salvage: ignore orphans up to here */
    int oom;                /* PQ_ENOMEM once an allocation failed */
};

/* A summary of the live set once every record is fed. */
struct verify_result {
    uint64_t live;              /* live messages */
    uint32_t min_seg, max_seg;  /* segments they reference (0: none) */
    uint64_t orphans;           /* live messages whose PUBLISH is gone */
    struct store_loc orphan_at; /* the earliest such one's last record */
    uint64_t orphan_id;
    uint64_t dl_orphans; /* dead letters whose source PUBLISH is
                            gone (replay rebuilds them from the
                            DEAD_LETTER record) */
};

/* verify_init: an empty tracker; floor: orphans whose last record is in a
 * segment <= floor were accepted by a salvage and are not reported. */
void verify_init(struct verify *v, uint32_t floor);

/* verify_record: feed one record (type, body) found at loc. Bodies that
 * do not decode are ignored here (the journal reports them). */
void verify_record(struct verify *v, uint8_t type, const uint8_t *body,
                   size_t len, const struct store_loc *loc);

/* verify_finish: the summary. PQ_OK or PQ_ENOMEM (a feed ran out of
 * memory: the result is incomplete). */
int verify_finish(struct verify *v, struct verify_result *out);

/* verify_fini: free everything. */
void verify_fini(struct verify *v);

#endif
