/*
 * store_thread.c: the storage thread. It takes the batches the loop
 * submits, writes them, fsyncs once per round as the policy says (group
 * commit), posts completions through the eventfd, keeps a spare segment
 * ready and deletes segments the loop let go.
 */
#include "store_int.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "clock.h"
#include "crc32c.h"
#include "failpoint.h"
#include "log.h"
#include "mem.h"
#include "pqerr.h"

/* ==== The storage thread ==== */

static void
post_completion(struct store *st, struct batch *b)
{
    uint64_t one = 1;
    ssize_t n;

    pq_free(b->data);
    b->data = NULL;
    b->next = NULL;
    pthread_mutex_lock(&st->mu);
    if (st->c_tail != NULL) {
        st->c_tail->next = b;
    } else {
        st->c_head = b;
    }
    st->c_tail = b;
    pthread_mutex_unlock(&st->mu);
    n = write(st->efd, &one, sizeof(one));
    (void)n; /* EAGAIN: counter full, still readable */
}

static int
sync_fd(struct store *st, int fd)
{
    uint64_t t0 = clock_mono_ns(), dt;
    int rc = store_seam->fdatasync(fd);

    dt = clock_mono_ns() - t0;
    pthread_mutex_lock(&st->mu);
    st->stats.fsyncs++;
    st->stats.fsync_ns_total += dt;
    if (dt > st->stats.fsync_ns_max) {
        st->stats.fsync_ns_max = dt;
    }
    histo_add(&st->stats.fsync_hist, HISTO_FSYNC_NS, dt);
    pthread_mutex_unlock(&st->mu);
    st->last_sync_ms = clock_mono_ms();
    if (rc == 0) {
        st->dirty = false;
    }
    return rc;
}

static void
set_fatal(struct store *st)
{
    pthread_mutex_lock(&st->mu);
    st->fatal = PQ_EIO;
    pthread_cond_broadcast(&st->spare_cv);
    pthread_mutex_unlock(&st->mu);
}

/*
 * write_one: write batch b (after a roll if it starts a segment). Sets
 * b->status to PQ_OK (written, not yet synced), PQ_ENOSPC or PQ_EIO.
 */
static void
write_one(struct store *st, struct batch *b)
{
    int e;

    pthread_mutex_lock(&st->mu);
    if (st->fatal != PQ_OK) {
        b->status = st->fatal;
    } else if (st->fail_set && b->gen == st->fail_gen) {
        b->status = PQ_ENOSPC;
    } else {
        b->status = PQ_OK;
    }
    pthread_mutex_unlock(&st->mu);
    if (b->status != PQ_OK) {
        return;
    }
    if (b->roll) {
        /* Seal the old segment before a byte goes into the new one, so a
         * torn tail can only be in the last segment. */
        if (st->cur_fd >= 0 && sync_fd(st, st->cur_fd) < 0) {
            set_fatal(st);
            b->status = PQ_EIO;
            return;
        }
        if (st->cur_fd >= 0) {
            /* Sealed: give back the preallocated tail (and the ack
             * reserve, which moves to the new segment). The records are
             * synced, so either size survives a crash, and recovery reads
             * the end of the file as the clean end. */
            (void)store_seam->ftruncate(st->cur_fd, (off_t)st->w_off);
            store_seam->close(st->cur_fd);
        }
        failpoint("segment-roll");
        /* The log now ends at the new segment: say so before its first
         * record, so a recovery that finds it missing or emptied knows.
         * Not synced (a roll costs no extra fsync): a process crash keeps
         * it; after a power loss an older last is fine, since segments
         * past it that hold records are accepted when their links chain
         * back to it (plan_meta). */
        st->meta.last = b->seg;
        if (store_meta_write(st->meta_fd, &st->meta, false) < 0) {
            set_fatal(st);
            b->status = PQ_EIO;
            return;
        }
        st->cur_fd = st->spare_fd;
        st->spare_fd = -1;
        pthread_mutex_lock(&st->mu);
        st->spare = SPARE_NONE;
        st->spare_taken = false;
        st->w_seg = b->seg;
        st->w_off = STORE_SEG_HDR_LEN;
        pthread_mutex_unlock(&st->mu);
    }
    if (store_pwrite_all(st->cur_fd, b->data, b->len, b->off) == 0) {
        st->dirty = true;
        pthread_mutex_lock(&st->mu);
        st->w_seg = b->seg;
        st->w_off = b->off + b->len;
        st->stats.batches++;
        st->stats.bytes_written += b->len;
        pthread_mutex_unlock(&st->mu);
        return;
    }
    e = errno;
    if (e == ENOSPC || e == EDQUOT) {
        /* Cut back to the last good offset and restore the allocation so
         * the next attempt writes into zeros again. */
        if (store_seam->ftruncate(st->cur_fd, (off_t)b->off) == 0) {
            (void)store_seam->fallocate(st->cur_fd, 0, (off_t)b->alloc);
        }
        pthread_mutex_lock(&st->mu);
        st->fail_set = true;
        st->fail_gen = b->gen;
        st->good_seg = b->seg;
        st->good_off = b->off;
        st->good_alloc = b->alloc;
        pthread_mutex_unlock(&st->mu);
        b->status = PQ_ENOSPC;
        return;
    }
    set_fatal(st);
    b->status = PQ_EIO;
}

/* write_round: write a list of batches, sync once per policy, then post
 * their completions in order. */
static void
write_round(struct store *st, struct batch *list)
{
    bool sync_now = false, urgent = false, all_ok = true;
    struct batch *b, *next;

    for (b = list; b != NULL; b = b->next) {
        write_one(st, b);
        urgent |= b->urgent;
        all_ok &= b->status == PQ_OK;
    }
    pthread_mutex_lock(&st->mu);
    for (b = list; b != NULL && !urgent; b = b->next) {
        urgent = b->last_lsn != 0 && st->urgent_lsn >= b->first_lsn;
    }
    pthread_mutex_unlock(&st->mu);
    failpoint("write-before-sync");
    if (st->dirty && st->cfg.fsync_policy == FSYNC_ALWAYS && !urgent &&
        all_ok) {
        /* Nobody waits on these records (acks without confirm, requeues):
         * they are written (a crash of the process keeps them) and are
         * synced with the next round someone waits on, or within
         * fsync_interval_ms. */
        if (st->def_head == NULL) {
            st->deferred_due_ms = clock_mono_ms() + st->cfg.fsync_interval_ms;
        }
        for (b = list; b != NULL; b = next) {
            next = b->next;
            b->next = NULL;
            if (st->def_tail != NULL) {
                st->def_tail->next = b;
            } else {
                st->def_head = b;
            }
            st->def_tail = b;
        }
        return;
    }
    if (st->dirty) {
        switch (st->cfg.fsync_policy) {
        case FSYNC_ALWAYS:
            sync_now = true;
            break;
        case FSYNC_INTERVAL:
            sync_now =
                clock_mono_ms() - st->last_sync_ms >= st->cfg.fsync_interval_ms;
            break;
        case FSYNC_NEVER:
            break;
        }
    }
    /* Deferred batches come first: their records are older. */
    if (st->def_head != NULL) {
        st->def_tail->next = list;
        list = st->def_head;
        st->def_head = st->def_tail = NULL;
    }
    if (sync_now && sync_fd(st, st->cur_fd) < 0) {
        /* Never retry an fsync: the kernel may have dropped the pages. */
        set_fatal(st);
        for (b = list; b != NULL; b = b->next) {
            if (b->status == PQ_OK) {
                b->status = PQ_EIO;
            }
        }
    }
    failpoint("sync-before-confirm");
    for (b = list; b != NULL; b = next) {
        next = b->next;
        post_completion(st, b);
    }
}

/* sync_deferred: sync and complete the deferred batches (their time came,
 * a waiter needs them, or the store closes). Called without mu. */
static void
sync_deferred(struct store *st)
{
    struct batch *list = st->def_head, *b, *next;

    st->def_head = st->def_tail = NULL;
    if (list == NULL) {
        return;
    }
    if (st->dirty && st->fatal == PQ_OK && sync_fd(st, st->cur_fd) < 0) {
        set_fatal(st);
    }
    for (b = list; b != NULL; b = next) {
        next = b->next;
        if (b->status == PQ_OK && st->fatal != PQ_OK) {
            b->status = PQ_EIO;
        }
        post_completion(st, b);
    }
}

/* make_spare: create (or grow) the next segment. Called without mu. */
static void
make_spare(struct store *st, uint32_t seq, uint64_t want)
{
    uint64_t room = store_room_for(st, want);
    uint64_t alloc = st->cfg.segment_bytes + room;
    int rc = PQ_OK, fd = st->spare_fd;

    if (fd < 0) {
        rc = seg_create(st->dir, st->dir_fd, seq, alloc, &fd);
    } else {
        int e = store_seam->fallocate(fd, 0, (off_t)alloc);
        rc = e == 0 ? PQ_OK : store_errno_to_pq(e);
    }
    pthread_mutex_lock(&st->mu);
    if (rc == PQ_OK) {
        st->spare_fd = fd;
        st->spare = SPARE_READY;
        st->spare_seq = seq;
        st->spare_alloc = alloc;
        st->spare_room = room;
    } else if (rc == PQ_EIO) {
        st->fatal = PQ_EIO;
    } else {
        st->spare = SPARE_FAILED;
        st->spare_retry_ms = clock_mono_ms() + SPARE_RETRY_MS;
    }
    pthread_cond_broadcast(&st->spare_cv);
    pthread_mutex_unlock(&st->mu);
}

static void
delete_segs(struct store *st, const uint32_t *seqs, size_t n)
{
    char path[PATH_BUF];

    if (n == 0) {
        return;
    }
    /* The log starts after them from now on; recorded first, so a crash
     * midway leaves leftovers (removed at the next start), never a log
     * whose start went missing unnoticed. seqs is the oldest prefix. */
    if (seqs[n - 1] + 1 > st->meta.first) {
        struct meta m = st->meta;

        m.first = seqs[n - 1] + 1;
        if (store_meta_write(st->meta_fd, &m, true) < 0) {
            log_warn("write %s/META: %s; segments not removed", st->dir,
                     strerror(errno));
            return;
        }
        st->meta = m;
    }
    for (size_t i = 0; i < n; i++) {
        seg_path(path, sizeof(path), st->dir, seqs[i]);
        if (store_seam->unlink(path) < 0 && errno != ENOENT) {
            log_warn("remove %s: %s", path, strerror(errno));
            continue;
        }
        /* One segment at a time, durably: the order of deletions matters
         * (store.h, "Deletion"). */
        (void)store_seam->fsync(st->dir_fd);
        pthread_mutex_lock(&st->mu);
        st->stats.segments_deleted++;
        pthread_mutex_unlock(&st->mu);
    }
}

static bool
spare_needed(const struct store *st, uint64_t now)
{
    if (st->fatal != PQ_OK) {
        return false;
    }
    switch (st->spare) {
    case SPARE_NONE:
        return true;
    case SPARE_FAILED:
        return now >= st->spare_retry_ms;
    case SPARE_READY:
        return !st->spare_taken && st->spare_room < st->want_room;
    }
    return false;
}

static void
timed_wait(struct store *st, uint64_t wait_ms)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    ts.tv_sec += (time_t)(wait_ms / 1000);
    ts.tv_nsec += (long)(wait_ms % 1000) * 1000000L;
    if (ts.tv_nsec >= 1000000000L) {
        ts.tv_sec++;
        ts.tv_nsec -= 1000000000L;
    }
    pthread_cond_timedwait(&st->wake, &st->mu, &ts);
}

void *
store_thread_main(void *arg)
{
    struct store *st = arg;

    pthread_mutex_lock(&st->mu);
    for (;;) {
        uint64_t now = clock_mono_ms(), wait_ms = 0;
        bool interval_due;

        if (st->q_head != NULL) {
            struct batch *list = st->q_head;
            st->q_head = st->q_tail = NULL;
            pthread_mutex_unlock(&st->mu);
            write_round(st, list);
            pthread_mutex_lock(&st->mu);
            continue;
        }
        if (st->ndels > 0) {
            uint32_t *d = st->dels;
            size_t n = st->ndels;
            st->dels = NULL;
            st->ndels = st->dels_cap = 0;
            pthread_mutex_unlock(&st->mu);
            delete_segs(st, d, n);
            pq_free(d);
            pthread_mutex_lock(&st->mu);
            continue;
        }
        if (spare_needed(st, now)) {
            /* The spare follows the segment the thread writes now. */
            uint32_t seq = st->w_seg + 1;
            uint64_t want = st->want_room;
            pthread_mutex_unlock(&st->mu);
            make_spare(st, seq, want);
            pthread_mutex_lock(&st->mu);
            continue;
        }
        if (st->def_head != NULL &&
            (now >= st->deferred_due_ms ||
             st->urgent_lsn >= st->def_head->first_lsn)) {
            pthread_mutex_unlock(&st->mu);
            sync_deferred(st);
            pthread_mutex_lock(&st->mu);
            continue;
        }
        interval_due = st->dirty && st->fatal == PQ_OK &&
                       st->cfg.fsync_policy == FSYNC_INTERVAL &&
                       now - st->last_sync_ms >= st->cfg.fsync_interval_ms;
        if (interval_due) {
            pthread_mutex_unlock(&st->mu);
            if (sync_fd(st, st->cur_fd) < 0) {
                set_fatal(st);
            }
            pthread_mutex_lock(&st->mu);
            continue;
        }
        if (st->stop) {
            break;
        }
        if (st->dirty && st->cfg.fsync_policy == FSYNC_INTERVAL &&
            st->fatal == PQ_OK) {
            wait_ms = st->last_sync_ms + st->cfg.fsync_interval_ms - now;
        }
        if (st->spare == SPARE_FAILED && st->fatal == PQ_OK) {
            uint64_t w =
                st->spare_retry_ms > now ? st->spare_retry_ms - now : 1;
            if (wait_ms == 0 || w < wait_ms) {
                wait_ms = w;
            }
        }
        if (st->def_head != NULL) {
            uint64_t w =
                st->deferred_due_ms > now ? st->deferred_due_ms - now : 1;
            if (wait_ms == 0 || w < wait_ms) {
                wait_ms = w;
            }
        }
        if (wait_ms > 0) {
            timed_wait(st, wait_ms);
        } else {
            pthread_cond_wait(&st->wake, &st->mu);
        }
    }
    pthread_mutex_unlock(&st->mu);
    /* Closing: whatever the policy, what was written gets synced. */
    sync_deferred(st);
    if (st->dirty && st->fatal == PQ_OK && sync_fd(st, st->cur_fd) < 0) {
        set_fatal(st);
    }
    return NULL;
}
