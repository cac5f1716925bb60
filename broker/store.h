/*
 * store.h: the durable log. An append-only sequence of segment files in the
 * data dir, each record framed with a length, a CRC32C and a type byte; one
 * storage thread (pthreads) writes and fsyncs batches while the event loop
 * keeps running (group commit). No libevent here: the loop polls
 * store_event_fd() and calls store_reap().
 *
 * Threads: every function below runs on the loop thread (the one that
 * called store_open) unless it says otherwise. The storage thread is
 * private to store.c.
 *
 * ON-DISK FORMAT (version 2; integers little-endian, field by field):
 *   DIR/LOCK                fcntl write lock for the life of the store; the
 *                           file holds the owner's pid as text.
 *   DIR/seg-%010u.log       segments, sequence numbers from 1, increasing,
 *                           without gaps from META's first to its last
 *                           (deletion only ever removes the oldest).
 *   DIR/META (64 B)         two 32-byte slots, each: "PQMETA01" (8) |
 *                           u64 gen | u32 first | u32 last | u32 floor |
 *                           u32 crc32c(the 28 bytes before). The valid
 *                           slot with the higher gen counts; a write goes
 *                           to the other slot (gen % 2) in place and is
 *                           fdatasynced, so a torn write keeps the old
 *                           one and a full disk cannot stop it. first: the
 *                           log's oldest segment (written before segments
 *                           are deleted; older files are leftovers of an
 *                           interrupted deletion; synced). last: the
 *                           segment last rolled into (written, not synced,
 *                           before its first record). Newer files are
 *                           spares and hold no record, except segments
 *                           right after last whose links chain back to it
 *                           (a power loss lost the unsynced write).
 *                           floor: 0, or the last segment a salvage
 *                           accepted as found (gaps, links and lost
 *                           publish records up to it are not reported).
 *                           All zeros = never written (a crash at create).
 *   segment header (20 B):  "PROTOQLG" (8) | u32 version (1 or 2) | u64 seq
 *   first record of a version-2 segment: REC_SEG_START (record.h), the
 *                           link to the segment before and where its
 *                           records end; written by the store, not
 *                           replayed, and takes no LSN.
 *   record:                 u32 len | u32 crc | u8 type | body[len - 1]
 *                           len = 1 + body length, 1..RECORD_BODY_MAX+1;
 *                           crc = crc32c(type byte + body).
 *   After the last record a segment holds zeros (segments are
 *   preallocated): a record header of eight zero bytes followed by zeros
 *   to the end of the file is the clean end of data.
 * Record bodies are defined in record.h.
 *
 * Recovery rules (store_open): a record that is short, has an impossible
 * length or a CRC mismatch is damage. If it is in the last segment that
 * holds records AND no valid record can be found at any offset after it
 * (only zeros or garbage follow), it is a torn tail: the file is truncated
 * to the last good record (logged with file, offset and bytes dropped)
 * and the open goes on. Any other damage (an earlier segment, or valid
 * records after the bad one) fails the open with PQ_ECORRUPT and a message
 * naming the file and offset and `protoqd --check-data DIR`. With META:
 * the segments first..last must all be there (the last with a sound
 * header even when it holds no record), each version-2 segment's link
 * must match the segment before it (its number and the end of its
 * records), later files must hold no record (spares: removed), earlier
 * ones are removed; and no message that a REQUEUE/PROGRESS shows live
 * may lack its PUBLISH (store_verify.h). Without META (a version-1 dir,
 * or a new dir before its first record): trailing segments that hold no
 * record (a spare created ahead of time, even with a torn header) are
 * removed, no gaps are allowed among the rest, and a version-2 segment
 * with records means META went missing. Any failure is PQ_ECORRUPT
 * naming the file; a version outside 1..2 is PQ_EVERSION.
 * Salvage: store_salvage (`protoqd --salvage-data DIR`).
 *
 * HOW TO CHANGE THE FORMAT SAFELY: new record kinds need no version bump
 * (record.h). A change to the header or framing, or to what recovery
 * must check, bumps STORE_FORMAT_VERSION (1 -> 2 added META and the
 * SEG_START link); keep the reader for the previous version for at least
 * one release (STORE_FORMAT_MIN), write the new version only into new
 * segments, and add a golden data dir (tests/golden/) for the new one.
 *
 * Space: segments are preallocated (posix_fallocate), so writes inside one
 * do not hit ENOSPC. The storage thread prepares the next segment (the
 * spare) ahead of time; when none can be allocated the store is degraded:
 * store_append refuses ordinary records with PQ_ENOSPC at once, while the
 * records that end a message's life (REC_ACK, REC_DROP) still succeed out
 * of a reserve: every REC_PUBLISH reserves STORE_ACK_RESERVE bytes in the
 * current segment for its future ACK/DROP, and an ACK/DROP of at most that
 * size consumes one reservation. The reserve moves with the current
 * segment at each roll. The store leaves degraded mode by itself once a
 * spare can be allocated again.
 *
 * Deletion: the dispatcher counts live references per segment (every live
 * message refs the segment of its PUBLISH and of its latest state record).
 * A segment is deleted when it is not the current one, it and every OLDER
 * segment have 0 refs, and the record that took its count to 0 is durable.
 * Oldest-first matters: an ACK in segment 7 that cancels a PUBLISH in
 * segment 3 must outlive segment 3, or the message would come back.
 * Compaction (store_compact_candidate) moves the live messages out of the
 * oldest segment so that the rest can go.
 */
#ifndef PQ_STORE_H
#define PQ_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/types.h>

#include "config.h"
#include "histo.h"
#include "record.h"

enum {
    STORE_FORMAT_VERSION = 2, /* written into new segments */
    STORE_FORMAT_MIN = 1,     /* the oldest version read */
    STORE_SEG_HDR_LEN = 20,   /* magic 8 + version 4 + seq 8 */
    STORE_REC_HDR_LEN = 9,    /* len 4 + crc 4 + type 1 */
    STORE_SEG_START_LEN = 21, /* the SEG_START record (9 + 12) that
                                 begins every format-2 segment */
    STORE_ACK_RESERVE = 64,   /* bytes reserved per live PUBLISH */
    STORE_ERR_MAX = 512,      /* a good errlen for err buffers */
};

struct store;

struct store_config {
    const char *dir;                /* data dir; must exist */
    enum fsync_policy fsync_policy; /* FSYNC_ALWAYS/INTERVAL/NEVER */
    uint32_t fsync_interval_ms; /* FSYNC_INTERVAL: fsync at most this often */
    uint64_t segment_bytes;     /* roll to a new segment past this */
    bool read_only;             /* replay only: no thread, no writes,
                                   no truncation; appends fail */
    bool opaque_records;        /* tests: the records are not the
                                   journal's (record.h): skip the
                                   live-message check */
    bool live_check_by_caller;  /* the replay callback checks that
                                   live messages kept their PUBLISH
                                   (the journal, with the live set it
                                   builds anyway): the store keeps no
                                   map of its own (memory) */
};

/* Where a record lives. Persistent across restarts (unlike the LSN). */
struct store_loc {
    uint32_t seg; /* segment sequence number */
    uint32_t len; /* bytes on disk, header included */
    uint64_t off; /* offset of the record header */
};

/*
 * Replay callback: called once per valid record in log order during
 * store_open. body/len is the record body (valid only during the call);
 * loc is where it lives. Return PQ_OK to go on, or a negative PQ_E* code to
 * abort the open (store_open then returns that code). Records about ids or
 * queues the callback never saw are normal (their segments were deleted);
 * the callback must tolerate them, and duplicate QUEUE_CREATEs (one per
 * segment, see store_set_roll_cb).
 */
typedef int (*store_replay_fn)(void *arg, uint8_t type, const uint8_t *body,
                               size_t len, const struct store_loc *loc);

/* Completion callback of store_reap: every record with LSN <= upto_lsn
 * (and after the previous report) has status. */
typedef void (*store_done_fn)(void *arg, uint64_t upto_lsn, int status);

/* Roll callback: called inside store_append when new_seg becomes the
 * current segment, before the record being appended is placed. */
typedef void (*store_roll_fn)(void *arg, uint32_t new_seg);

/*
 * store_open: lock c->dir, replay every segment through fn (may be NULL),
 * repair a torn tail, then start the storage thread (unless read_only).
 * On success *out owns the lock, the fds and the thread; free it with
 * store_close(). On failure returns PQ_EBUSY (another protoqd holds the
 * lock), PQ_ECORRUPT, PQ_EVERSION, PQ_ENOSPC, PQ_ESYS/PQ_EIO (a system
 * call failed), PQ_ENOMEM, or fn's error, with a one-line message naming
 * the file in err (the caller logs it); *out is left NULL.
 * After it returns, the caller refs the segments of its live messages
 * (store_seg_ref) before its first store_reap: deletion only happens there.
 * LSNs are per process: replayed records are not numbered; the first
 * append gets LSN 1.
 */
int store_open(const struct store_config *c, store_replay_fn fn, void *arg,
               struct store **out, char *err, size_t errlen);

/*
 * store_close: hand over what is pending, wait for it to be written and
 * synced (whatever the policy), stop the thread, release the lock and free
 * st. Unreaped completions are dropped. Returns PQ_OK, or the store's
 * error (PQ_EIO, PQ_ENOSPC) if the final flush failed. NULL is a no-op.
 */
int store_close(struct store *st);

/*
 * store_append: add one record (type, len-byte body) to the pending batch.
 * Nothing is written yet (see store_submit). Sets *lsn_out (may be NULL)
 * to the record's LSN and *loc_out (may be NULL) to its location, both
 * known at once. May roll to a new segment first (calling the roll
 * callback). Returns PQ_OK; PQ_ENOSPC when the disk is full (nothing
 * appended; ACK/DROP records draw on the reserve and do not fail this way);
 * PQ_EIO when the store has failed; PQ_ETOOBIG when len > RECORD_BODY_MAX
 * or the record cannot fit in an empty segment; PQ_EINVAL for a read-only
 * store or type 0; PQ_ENOMEM.
 * A REC_PUBLISH takes one reservation (STORE_ACK_RESERVE bytes); a REC_ACK
 * or REC_DROP gives one back; a REC_ATOMIC takes one per publish it holds
 * and gives one back when it wraps an ACK or DROP (it never draws on the
 * reserve).
 */
int store_append(struct store *st, uint8_t type, const void *body, size_t len,
                 uint64_t *lsn_out, struct store_loc *loc_out);

/*
 * store_submit: hand the pending batch to the storage thread. If the thread
 * is busy (say, in an fsync), the batch joins the one waiting, so all that
 * arrives during one fsync is written and synced together (group commit).
 * Call it once per loop pass. Cheap when nothing is pending.
 */
void store_submit(struct store *st);

/* store_event_fd: an eventfd that becomes readable when batches complete
 * or reads are done; the loop polls it and calls store_reap and
 * store_read_reap. -1 for a read-only store. */
int store_event_fd(const struct store *st);

/*
 * store_reap: report completed batches in LSN order through done: status
 * PQ_OK (durable per the fsync policy), PQ_ENOSPC (those records were NOT
 * stored; their locations become invalid and will be reused; the store
 * rewinds and later appends are tried again), or PQ_EIO (fatal: the caller
 * stops and exits non-zero; nothing is retried after a failed fsync).
 * Then deletes segments that became free (see the file comment). Clears
 * the eventfd.
 */
void store_reap(struct store *st, store_done_fn done, void *arg);

/*
 * store_urgent: a reply waits until the records appended so far are
 * durable. With FSYNC_ALWAYS, a batch that nobody waits on (acks without
 * confirm, requeues, drops) is written at once but its fdatasync waits for
 * the next urgent batch, a segment roll, or fsync_interval_ms, whichever
 * comes first; an urgent batch is synced as soon as it is written. So a
 * process crash loses no written record, and a power loss can lose at most
 * fsync_interval_ms of records that no client was told are durable.
 * Completions (and so store_durable_lsn) still follow the real fsync.
 */
void store_urgent(struct store *st);

/* store_last_lsn: the LSN of the last appended record (0: none yet). */
uint64_t store_last_lsn(const struct store *st);

/* store_durable_lsn: the highest LSN reaped with PQ_OK (0: none). */
uint64_t store_durable_lsn(const struct store *st);

/* store_status: PQ_OK, PQ_ENOSPC while degraded (no room for new
 * records), or PQ_EIO once the store has failed for good. */
int store_status(const struct store *st);

/*
 * store_space_check: PQ_OK when n_publish PUBLISH records totalling bytes
 * of body would be accepted now (for all-or-nothing batches: check, then
 * append), else PQ_ENOSPC (or PQ_EIO). Appends nothing.
 */
int store_space_check(struct store *st, uint32_t n_publish, uint64_t bytes);

/* store_reserve_set: set the number of live reservations. Call it after
 * recovery with the number of live durable messages (until then the store
 * counts replayed PUBLISH minus ACK/DROP records, which is only an
 * estimate once old segments are deleted), and when messages die without
 * an ACK/DROP record (purge, queue delete, dead-lettered away). */
void store_reserve_set(struct store *st, uint64_t n_live);

/* store_reserve_count: the number of live reservations. */
uint64_t store_reserve_count(const struct store *st);

/* store_seg_ref / store_seg_unref: a live message starts / stops using a
 * record in segment seg; bytes (e.g. loc.len, may be 0) feeds the live-byte
 * count used by compaction. Append the record that kills the message
 * before the unref: the unref remembers the last LSN as the point that
 * must be durable before the segment can go. Unknown seg: ignored; an
 * unref of a segment with no references left is logged as the bug it is
 * (a reference released twice) and ignored. */
void store_seg_ref(struct store *st, uint32_t seg, uint64_t bytes);
void store_seg_unref(struct store *st, uint32_t seg, uint64_t bytes);

/* store_seg_hold / store_seg_release: keep segment seg from deletion while
 * a record in it is not referenced yet (a publish waiting for the rest of
 * its batch, which may go on in the next segment and complete later).
 * Unlike a reference, a hold does not make the segment a compaction
 * candidate. Unknown seg: ignored. */
void store_seg_hold(struct store *st, uint32_t seg);
void store_seg_release(struct store *st, uint32_t seg);

/* store_set_roll_cb: fn is called (on the loop thread, from within
 * store_append) each time a new segment becomes current, so the caller can
 * append its metadata (a QUEUE_CREATE per durable queue) as the first
 * records of the segment; those appends do not roll again. NULL: none. */
void store_set_roll_cb(struct store *st, store_roll_fn fn, void *arg);

/* store_current_seg: the sequence number of the segment being appended to. */
uint32_t store_current_seg(const struct store *st);

/*
 * store_compact_candidate: when more than half of the bytes on disk are
 * dead, the oldest segment that still has live references (and is not the
 * current one): its live messages should be re-appended (new PUBLISH with
 * the current state) and their old refs dropped. PQ_OK and *seg, or
 * PQ_ENOTFOUND when nothing is worth compacting.
 */
int store_compact_candidate(const struct store *st, uint32_t *seg);

/* Per-segment numbers for compaction decisions and metrics. */
struct store_seg_stat {
    uint32_t seg;
    uint64_t refs;       /* live references */
    uint64_t live_bytes; /* sum of bytes given to ref - unref */
    uint64_t end_off;    /* bytes of header + records */
    bool current;
};

/* store_seg_stats: fill up to max entries, oldest first; returns how many
 * segments exist (may be > max). */
size_t store_seg_stats(const struct store *st, struct store_seg_stat *out,
                       size_t max);

/* Counters for metrics (loop-thread snapshot; approximate while running). */
struct store_stats {
    uint64_t batches; /* batches written */
    uint64_t bytes_written;
    uint64_t fsyncs; /* fdatasync calls on segments */
    uint64_t fsync_ns_total;
    uint64_t fsync_ns_max;
    struct histo fsync_hist; /* latency in ns, HISTO_FSYNC_NS buckets */
    uint64_t segments_deleted;
};

/* store_salvage_floor: segments up to this one were accepted as found by
 * --salvage-data (what they lost is not reported again); 0: none. */
uint32_t store_salvage_floor(const struct store *st);

/* store_get_stats: copy the counters. */
void store_get_stats(struct store *st, struct store_stats *out);

/*
 * store_read: read back the record at loc (pread + CRC check). On PQ_OK,
 * *type is its type and *body (*len bytes) a new copy of its body that the
 * caller frees with pq_free. PQ_EAGAIN when the record is not written yet
 * (still in a batch: try again after it is reaped), PQ_ECORRUPT on a CRC or
 * length mismatch, PQ_ENOTFOUND when the segment is gone, PQ_ESYS/PQ_EIO on a
 * read error, PQ_ENOMEM.
 */
int store_read(struct store *st, const struct store_loc *loc, uint8_t *type,
               uint8_t **body, size_t *len);

/*
 * Reads off the caller's thread. store_read_submit queues a read of the
 * record at loc for the store's reader thread (the caller keeps loc.seg
 * from deletion, e.g. with store_seg_hold, until the result is reaped);
 * PQ_OK or PQ_ENOMEM. When it is done the store's eventfd becomes
 * readable, and store_read_reap calls fn once for each finished read, in
 * submission order, on the caller's thread: rc and the rest as store_read
 * gives them; fn owns body (pq_free). Reads not reaped by store_close are
 * dropped.
 */
typedef void (*store_read_fn)(void *arg, uint64_t tag,
                              const struct store_loc *loc, int rc, uint8_t type,
                              uint8_t *body, size_t len);
int store_read_submit(struct store *st, uint64_t tag,
                      const struct store_loc *loc);
void store_read_reap(struct store *st, store_read_fn fn, void *arg);

/*
 * store_check: verify dir read-only (no lock taken for writing, nothing
 * modified) with every check a start makes (see "Recovery rules": records,
 * META's start and end, no gaps, segment links, no live message without
 * its publish record) and print a summary to out: segments, the recorded
 * start and end, links checked, records per type, bytes, live messages
 * and the segments they reference, torn tail found, first damage with
 * file and offset. Linear in the data. Backs
 * `protoqd --check-data DIR`. Returns PQ_OK for a clean dir (a torn tail
 * that store_open would repair counts as clean), PQ_ECORRUPT or
 * PQ_EVERSION for damage, PQ_EBUSY if a protoqd holds the lock, PQ_ESYS
 * when the dir cannot be read; err gets the one-line reason.
 */
int store_check(const char *dir, FILE *out, char *err, size_t errlen);

/*
 * store_salvage: make a damaged data dir startable again, keeping every
 * record that can still be read (backs `protoqd --salvage-data DIR`;
 * protoqd must be stopped). A segment damaged at an offset is cut there;
 * a file that is no segment any more (bad header, emptied) is moved
 * away; originals go to DIR/salvage-UNIXTIME/. Then DIR/META is
 * rewritten to say the log is the segments left, accepted as found: gaps,
 * links and lost publish records up to its last segment are no longer
 * reported (what they held is gone for good: confirmed messages in lost
 * parts are lost, acked ones whose ack was lost come back). Prints what
 * it did and the result of a check to out. PQ_OK when the dir checks
 * clean afterwards; PQ_EBUSY (a protoqd runs), PQ_EVERSION, PQ_ECORRUPT,
 * PQ_ESYS otherwise, with err set.
 */
int store_salvage(const char *dir, FILE *out, char *err, size_t errlen);

/*
 * I/O seam for fault injection (tests only). The store makes these calls
 * through the struct set here; each has the libc meaning (fallocate has
 * posix_fallocate's: returns 0 or an errno value, does not set errno).
 * Process-wide: set it before store_open and restore it (NULL) after
 * store_close. The storage thread calls them, so hooks must be
 * thread-safe.
 */
struct store_io {
    int (*open)(const char *path, int flags, mode_t mode);
    int (*close)(int fd);
    ssize_t (*pwrite)(int fd, const void *buf, size_t n, off_t off);
    int (*fdatasync)(int fd);
    int (*fsync)(int fd);
    int (*fallocate)(int fd, off_t off, off_t len);
    int (*ftruncate)(int fd, off_t len);
    int (*rename)(const char *from, const char *to);
    int (*unlink)(const char *path);
};

/* store_set_io: use io for all later I/O (NULL: the real calls). */
void store_set_io(const struct store_io *io);

/* store_io_real: the real calls, for hooks that wrap them. */
const struct store_io *store_io_real(void);

#endif
