/*
 * store_int.h: what the files of the store share (never included outside
 * them; store.h is the interface, with the on-disk format).
 *
 *   store.c          the data dir lock, DIR/META, placing records, segment
 *                    rolls, batches handed to the storage thread and reaped,
 *                    open and close, accessors, read-back
 *   store_thread.c   the storage thread: writes, fsyncs (group commit),
 *                    spare segments, deletions
 *   store_recover.c  recovery: scanning and checking segments at open, the
 *                    offline check (--check-data) and salvage
 *   store_verify.c   the liveness check fed by a scan (store_verify.h)
 */
#ifndef PQ_STORE_INT_H
#define PQ_STORE_INT_H

#include "store.h"

#include <limits.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>

#include "byteorder.h"
#include "record.h"
#include "store_verify.h"

/* The I/O seam in use (tests swap it with store_set_io). */
extern const struct store_io *store_seam;

static const char STORE_MAGIC[8] = {'P', 'R', 'O', 'T', 'O', 'Q', 'L', 'G'};

enum {
    REC_LEN_MAX = RECORD_BODY_MAX + 1, /* len field covers type + body */
    SPARE_RETRY_MS = 100,              /* retry a failed spare this often */
    PATH_BUF = PATH_MAX + 32,
};

/* ---- types ---- */

/* DIR/META: where the log starts and ends (store.h, ON-DISK FORMAT). */
struct meta {
    bool present;   /* read: the file exists */
    uint64_t gen;   /* bumped by every write */
    uint32_t first; /* oldest segment of the log */
    uint32_t last;  /* newest segment rolled into */
    uint32_t floor; /* salvage accepted the log up to it */
};

/* One segment as the loop sees it (for refs, GC and compaction). */
struct seg {
    uint32_t seq;
    uint64_t refs;  /* live references (dispatcher) */
    uint64_t holds; /* store_seg_hold: not deletable yet */
    uint64_t live_bytes;
    uint64_t end_off;  /* bytes appended so far */
    uint64_t zero_lsn; /* must be durable before deletion;
                          UINT64_MAX: pinned this session */
};

/* A run of records for one segment; also reused as its completion. */
struct batch {
    struct batch *next;
    uint32_t seg;
    uint32_t gen;   /* rewind generation it was planned in */
    uint64_t off;   /* file offset of data[0] */
    uint64_t alloc; /* preallocated size of seg */
    bool roll;      /* first write into seg */
    uint8_t *data;
    size_t len, cap;
    uint64_t first_lsn, last_lsn;
    int status;
    bool urgent; /* a reply waits on it (store_urgent) */
};

enum spare_state { SPARE_NONE, SPARE_READY, SPARE_FAILED };

struct store {
    char *dir;
    struct store_config cfg; /* cfg.dir points at dir */
    int lock_fd;
    int dir_fd;
    int efd; /* eventfd: completions ready */

    /* [loop] */
    struct batch *pending;
    uint32_t cur_seg;
    uint64_t cur_off;
    uint64_t cur_alloc;
    bool roll_next;          /* next batch starts a new segment */
    uint32_t start_prev_seq; /* SEG_START of the current segment: */
    uint64_t start_prev_end; /* the segment before it and its end */
    bool in_roll_cb;
    bool need_meta; /* call the roll cb before next append */
    uint32_t gen;
    uint64_t last_lsn;
    uint64_t durable_lsn;
    uint64_t reserved; /* live reservations */
    int loop_status;   /* PQ_ENOSPC after a failed batch */
    store_roll_fn roll_fn;
    void *roll_arg;
    struct seg *segs; /* oldest first; the last is current */
    size_t nsegs, segs_cap;

    /* [mu] */
    pthread_mutex_t mu;
    pthread_cond_t wake;     /* the thread waits here */
    pthread_cond_t spare_cv; /* the loop waits here for a spare */
    pthread_t thr;
    bool thr_started;
    pthread_t rd_thr; /* the reader thread (store_read.c) */
    bool rd_started;
    bool stop;
    struct batch *q_head, *q_tail; /* submitted, not yet taken */
    struct batch *c_head, *c_tail; /* completed, not yet reaped */
    uint32_t *dels;                /* segments to unlink */
    size_t ndels, dels_cap;
    int fatal;     /* PQ_EIO once failed for good */
    bool fail_set; /* batches of fail_gen fail */
    uint32_t fail_gen;
    uint32_t good_seg; /* where the loop rewinds to */
    uint64_t good_off, good_alloc;
    enum spare_state spare;
    bool spare_taken; /* the loop rolled into it */
    uint32_t spare_seq;
    uint64_t spare_alloc;
    uint64_t spare_room;                /* reserve room beyond segment_bytes */
    uint64_t want_room;                 /* reserve bytes the loop needs */
    uint64_t spare_retry_ms;            /* monotonic time of next retry */
    struct store_rd *rd_head, *rd_tail; /* reads asked for */
    struct store_rd *rd_done_head, *rd_done_tail; /* reads done */
    pthread_cond_t rd_wake;                       /* the reader waits here */
    bool rd_stop;
    uint32_t w_seg; /* written up to (for store_read) */
    uint64_t w_off;
    struct store_stats stats;

    /* [thread] (the loop's until the thread starts) */
    int meta_fd;      /* DIR/META */
    struct meta meta; /* what META says now */
    int cur_fd;
    int spare_fd;
    bool dirty; /* written, not yet synced */
    uint64_t last_sync_ms;
    /* FSYNC_ALWAYS: batches written but not synced because nobody waits on
     * them; synced by the next urgent round, a roll, or deferred_due_ms. */
    struct batch *def_head, *def_tail;
    uint64_t deferred_due_ms;
    uint64_t urgent_lsn; /* [mu] records up to it have a waiter */
};

/* ==== DIR/META ==== */

static const char META_MAGIC[8] = {'P', 'Q', 'M', 'E', 'T', 'A', '0', '1'};

enum { META_SLOT = 32, META_LEN = 2 * META_SLOT };

/* ==== Recovery: scanning segments ==== */

/* What a scan learns; shared by store_open and store_check. */
struct scan {
    const char *dir;
    store_replay_fn fn;
    void *arg;
    uint32_t *seqs; /* segment files, ascending */
    size_t nseqs;
    size_t lo;               /* seqs[0..lo) are leftovers of an
                                interrupted deletion (before META's
                                first segment) */
    size_t nvalid;           /* seqs[lo..nvalid) are kept */
    uint64_t *end_offs;      /* per kept segment: end of records */
    struct meta meta;        /* DIR/META as found */
    bool salvage;            /* store_salvage: find damage only */
    bool opaque;             /* cfg.opaque_records */
    bool caller_checks_live; /* cfg.live_check_by_caller */
    struct verify v;         /* the live-message check */
    struct verify_result vr;
    uint64_t links;   /* segment links checked */
    uint32_t version; /* of the segment being scanned */
    bool has_start;   /* it begins with a SEG_START: */
    struct rec_seg_start start;
    bool damaged; /* the first damage seen: */
    uint32_t damage_seq;
    uint64_t damage_off;
    uint64_t counts[256]; /* records per type */
    uint64_t records;
    uint64_t bytes;            /* record bytes */
    uint64_t n_publish, n_end; /* PUBLISH, ACK + DROP */
    bool torn;
    uint32_t torn_seq;
    uint64_t torn_off, torn_dropped;
    size_t spares; /* trailing segments without records */
};

/*
 * valid_after: some valid record starts after off (so damage at off is
 * not a torn tail). Only runs on damage. Linear in the bytes after off:
 * zeros are skipped four at a time, and a candidate must decode
 * (record_decode fails within a few fields on garbage) before its CRC is
 * computed (opaque: test logs of arbitrary bodies, CRC only). The CRC
 * work is capped at VALID_AFTER_BUDGET plus 16 times
 * those bytes; a crafted tail that would need more gets true, the
 * conservative answer (damage, never a cut of what may be records).
 */
enum { VALID_AFTER_BUDGET = 64 << 20 };

/*
 * scan_segment: verify (and replay) one segment held in buf. last: this is
 * the last segment that holds records, where a torn tail is allowed.
 * Sets *end to the end of the good records. Returns PQ_OK, PQ_ECORRUPT,
 * PQ_EVERSION or the replay callback's error, with err set.
 */
enum { SCAN_RELEASE_BYTES = 8 << 20 }; /* a power of two, page-aligned */

enum { SEG_START_BODY = 12, SEG_START_REC = STORE_SEG_START_LEN };

_Static_assert(STORE_REC_HDR_LEN + SEG_START_BODY == STORE_SEG_START_LEN,
               "SEG_START size");

void store_seterr(char *err, size_t errlen, const char *fmt, ...);

void seg_path(char *buf, size_t n, const char *dir, uint32_t seq);

int store_errno_to_pq(int e);
/* rec_crc: the CRC of a record: type byte, then body. */
uint32_t rec_crc(uint8_t type, const uint8_t *body, size_t len);

/* store_reader_stop: join the reader thread (if it started) and free the
 * reads it was asked for and the results nobody reaped. */
void store_reader_stop(struct store *st);

/* reserve room a new segment gets beyond segment_bytes */
uint64_t store_room_for(const struct store *st, uint64_t want);

int store_pwrite_all(int fd, const uint8_t *p, size_t n, uint64_t off);

/*
 * seg_create: create segment seq in dir, preallocate alloc bytes, write
 * and sync its header, then sync the directory (the new name). On success
 * *fd_out is open read-write. On failure the file is removed and errno
 * describes the cause; returns a PQ code.
 */
int seg_create(const char *dir, int dir_fd, uint32_t seq, uint64_t alloc,
               int *fd_out);

int store_dir_lock(const char *dir, bool shared, int *fd_out, char *err,
                   size_t errlen);

/*
 * meta_read: what DIR/META says (m->present false when there is none).
 * Of its two slots the valid one with the higher generation wins, so a
 * write torn by a crash leaves the previous state. PQ_ECORRUPT when the
 * file exists but no slot is valid.
 */
int store_meta_read(const char *dir, struct meta *m, char *err, size_t errlen);

/* store_meta_open: open (creating: size and name made durable) DIR/META. */
int store_meta_open(const char *dir, int dir_fd, int *fd_out, char *err,
                    size_t errlen);

/* store_meta_write: write m (a new generation) into the older slot and
 * when sync, fdatasync. Returns 0 or -1 with errno. */
int store_meta_write(int fd, struct meta *m, bool sync);

bool store_all_zero(const uint8_t *p, size_t n);

/*
 * scan_dir: list the segments, read DIR/META, decide which segments form
 * the log (plan_meta / plan_legacy), then verify (and replay) each in
 * order: records, links between segments, and the live messages. Fills
 * sc->end_offs for kept ones.
 */
int store_scan_dir(struct scan *sc, char *err, size_t errlen);

void store_scan_fini(struct scan *sc);

/* store_thread_main: the storage thread (store_thread.c); arg is the store. */
void *store_thread_main(void *arg);

/* record_publishes: how many messages a record of type stores (each
 * reserves room for its ack): 1 for PUBLISH, n for PUBLISH_BATCH. */
static inline uint64_t
record_publishes(uint8_t type, const uint8_t *body, size_t len)
{
    if (type == REC_PUBLISH) {
        return 1;
    }
    if (type == REC_PUBLISH_BATCH && len >= 4) {
        return le32_get(body);
    }
    return 0;
}

#endif
