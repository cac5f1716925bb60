/*
 * store.c: the durable log (format, recovery, reserve and deletion rules
 * are documented in store.h).
 *
 * Two threads. The loop thread owns placement: store_append decides the
 * segment and offset of every record, the LSN, rolls and reservations, and
 * collects records into a pending batch. store_submit moves the batch onto
 * a queue under st->mu. The storage thread takes everything queued, writes
 * each batch with one pwrite at its planned offset, syncs once per round
 * according to the policy, and posts completions (in LSN order) that the
 * loop collects in store_reap after the eventfd fires. The storage thread
 * also prepares the next segment (the spare: created, preallocated, header
 * synced, directory synced) so a roll never waits for disk allocation, and
 * unlinks segments the loop found free.
 *
 * Invariants:
 *  - A batch lies inside one segment; a batch with roll set is the first
 *    write into a new segment, and the thread fdatasyncs the previous
 *    segment before writing it, so only the last segment with records can
 *    ever have a torn tail.
 *  - Loop view: cur_off + reserved * STORE_ACK_RESERVE <= cur_alloc after
 *    every append, so ACK/DROP records always fit in the current segment.
 *  - After a failed write (ENOSPC) every batch of that generation fails
 *    without touching the disk, until the loop rewinds to the thread's last
 *    good position in store_reap and starts the next generation; so no
 *    write ever lands after a hole.
 *  - The storage thread never logs, except the rare unlink failure.
 * Fields marked [mu] are shared and only touched under st->mu; [loop] and
 * [thread] fields belong to one thread.
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

/* ---- I/O seam ---- */

static int
real_open(const char *path, int flags, mode_t mode)
{
    return open(path, flags, mode);
}

static int
real_fallocate(int fd, off_t off, off_t len)
{
    return posix_fallocate(fd, off, len);
}

static const struct store_io io_real = {
    .open = real_open,
    .close = close,
    .pwrite = pwrite,
    .fdatasync = fdatasync,
    .fsync = fsync,
    .fallocate = real_fallocate,
    .ftruncate = ftruncate,
    .rename = rename,
    .unlink = unlink,
};

const struct store_io *store_seam = &io_real;

/* store_set_io: see store.h. */
void
store_set_io(const struct store_io *new_io)
{
    store_seam = new_io != NULL ? new_io : &io_real;
}

/* store_io_real: see store.h. */
const struct store_io *
store_io_real(void)
{
    return &io_real;
}

/* ---- small helpers ---- */

void store_seterr(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

void
store_seterr(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;

    if (err == NULL || errlen == 0) {
        return;
    }
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

void
seg_path(char *buf, size_t n, const char *dir, uint32_t seq)
{
    snprintf(buf, n, "%s/seg-%010u.log", dir, seq);
}

/* rec_crc: see store_int.h. */
uint32_t
rec_crc(uint8_t type, const uint8_t *body, size_t len)
{
    return crc32c(crc32c(0, &type, 1), body, len);
}

int
store_errno_to_pq(int e)
{
    switch (e) {
    case ENOSPC:
    case EDQUOT:
        return PQ_ENOSPC;
    case EIO:
        return PQ_EIO;
    case ENOMEM:
        return PQ_ENOMEM;
    default:
        return PQ_ESYS;
    }
}

/* reserve room a new segment gets beyond segment_bytes */
uint64_t
store_room_for(const struct store *st, uint64_t want)
{
    uint64_t room = st->cfg.segment_bytes / 4;

    if (room < 2 * want) {
        room = 2 * want;
    }
    return (room + 4095) & ~(uint64_t)4095;
}

int
store_pwrite_all(int fd, const uint8_t *p, size_t n, uint64_t off)
{
    while (n > 0) {
        ssize_t w = store_seam->pwrite(fd, p, n, (off_t)off);
        if (w < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -1;
        }
        if (w == 0) {
            errno = ENOSPC;
            return -1;
        }
        p += w;
        n -= (size_t)w;
        off += (uint64_t)w;
    }
    return 0;
}

/*
 * seg_create: create segment seq in dir, preallocate alloc bytes, write
 * and sync its header, then sync the directory (the new name). On success
 * *fd_out is open read-write. On failure the file is removed and errno
 * describes the cause; returns a PQ code.
 */
int
seg_create(const char *dir, int dir_fd, uint32_t seq, uint64_t alloc,
           int *fd_out)
{
    char path[PATH_BUF];
    uint8_t hdr[STORE_SEG_HDR_LEN];
    int fd, rc, e;

    seg_path(path, sizeof(path), dir, seq);
    fd = store_seam->open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        return store_errno_to_pq(errno);
    }
    rc = store_seam->fallocate(fd, 0, (off_t)alloc);
    if (rc != 0) {
        e = rc;
        goto err_remove;
    }
    memcpy(hdr, STORE_MAGIC, 8);
    le32_put(hdr + 8, STORE_FORMAT_VERSION);
    le64_put(hdr + 12, seq);
    if (store_pwrite_all(fd, hdr, sizeof(hdr), 0) < 0 ||
        store_seam->fdatasync(fd) < 0 || store_seam->fsync(dir_fd) < 0) {
        e = errno;
        goto err_remove;
    }
    *fd_out = fd;
    return PQ_OK;

err_remove:
    store_seam->close(fd);
    store_seam->unlink(path);
    errno = e;
    return store_errno_to_pq(e);
}

/* ---- data dir lock ---- */

int
store_dir_lock(const char *dir, bool shared, int *fd_out, char *err,
               size_t errlen)
{
    char path[PATH_BUF], pidbuf[32];
    struct flock fl = {.l_whence = SEEK_SET};
    int fd, n;

    snprintf(path, sizeof(path), "%s/LOCK", dir);
    fd = shared ? open(path, O_RDONLY | O_CLOEXEC)
                : open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) {
        if (shared && errno == ENOENT) {
            *fd_out = -1; /* nobody ever wrote here */
            return PQ_OK;
        }
        store_seterr(err, errlen, "open %s: %s", path, strerror(errno));
        return store_errno_to_pq(errno);
    }
    /* OFD locks: they conflict between two opens in one process too, and
     * closing another fd of the file does not drop them. */
    fl.l_type = shared ? F_RDLCK : F_WRLCK;
    if (fcntl(fd, F_OFD_SETLK, &fl) < 0) {
        int e = errno;
        if (e == EAGAIN || e == EACCES) {
            n = (int)pread(fd, pidbuf, sizeof(pidbuf) - 1, 0);
            pidbuf[n > 0 ? n : 0] = '\0';
            pidbuf[strcspn(pidbuf, "\n")] = '\0';
            store_seterr(err, errlen,
                         "data dir %s is locked by another protoqd (pid %s)",
                         dir, pidbuf[0] != '\0' ? pidbuf : "unknown");
            close(fd);
            return PQ_EBUSY;
        }
        store_seterr(err, errlen, "lock %s: %s", path, strerror(e));
        close(fd);
        return PQ_ESYS;
    }
    if (!shared) {
        n = snprintf(pidbuf, sizeof(pidbuf), "%ld\n", (long)getpid());
        if (ftruncate(fd, 0) < 0 || pwrite(fd, pidbuf, (size_t)n, 0) != n) {
            /* The lock still holds; the pid is only for the message. */
        }
    }
    *fd_out = fd;
    return PQ_OK;
}

static void
meta_path(char *buf, size_t n, const char *dir)
{
    snprintf(buf, n, "%s/META", dir);
}

/*
 * meta_read: what DIR/META says (m->present false when there is none).
 * Of its two slots the valid one with the higher generation wins, so a
 * write torn by a crash leaves the previous state. PQ_ECORRUPT when the
 * file exists but no slot is valid.
 */
int
store_meta_read(const char *dir, struct meta *m, char *err, size_t errlen)
{
    char path[PATH_BUF];
    uint8_t buf[META_LEN] = {0};
    int fd = -1;
    ssize_t n;

    memset(m, 0, sizeof(*m));
    meta_path(path, sizeof(path), dir);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT) {
            return PQ_OK;
        }
        store_seterr(err, errlen, "open %s: %s", path, strerror(errno));
        return store_errno_to_pq(errno);
    }
    n = pread(fd, buf, sizeof(buf), 0);
    close(fd);
    if (n < 0) {
        store_seterr(err, errlen, "read %s: %s", path, strerror(errno));
        return store_errno_to_pq(errno);
    }
    if (store_all_zero(buf, sizeof(buf))) {
        return PQ_OK; /* created, never written: a crash */
    }
    for (int i = 0; i < 2; i++) {
        const uint8_t *p = buf + i * META_SLOT;
        uint64_t gen = le64_get(p + 8);

        if (memcmp(p, META_MAGIC, 8) != 0 ||
            le32_get(p + 28) != crc32c(0, p, 28) ||
            (m->present && gen <= m->gen)) {
            continue;
        }
        m->present = true;
        m->gen = gen;
        m->first = le32_get(p + 16);
        m->last = le32_get(p + 20);
        m->floor = le32_get(p + 24);
    }
    if (!m->present || m->first == 0 || m->last < m->first) {
        store_seterr(err, errlen,
                     "%s: damaged (no valid copy of the log's start and end); "
                     "run protoqd --check-data %s",
                     path, dir);
        return PQ_ECORRUPT;
    }
    return PQ_OK;
}

/* store_meta_open: open (creating: size and name made durable) DIR/META. */
int
store_meta_open(const char *dir, int dir_fd, int *fd_out, char *err,
                size_t errlen)
{
    char path[PATH_BUF];
    struct stat sb;
    int fd;

    meta_path(path, sizeof(path), dir);
    fd = store_seam->open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0 || fstat(fd, &sb) < 0) {
        goto fail;
    }
    if (sb.st_size < META_LEN) {
        /* Allocate both slots once: later writes overwrite in place and
         * so need no free space (they must work on a full disk, where
         * deleting segments is what makes room). */
        if (store_seam->ftruncate(fd, META_LEN) < 0 ||
            store_seam->fsync(fd) < 0 || store_seam->fsync(dir_fd) < 0) {
            goto fail;
        }
    }
    *fd_out = fd;
    return PQ_OK;

fail:
    store_seterr(err, errlen, "open %s: %s", path, strerror(errno));
    if (fd >= 0) {
        int e = errno;

        store_seam->close(fd);
        errno = e;
    }
    return store_errno_to_pq(errno);
}

/* store_meta_write: write m (a new generation) into the older slot and,
 * when sync, fdatasync. Returns 0 or -1 with errno. */
int
store_meta_write(int fd, struct meta *m, bool sync)
{
    uint8_t slot[META_SLOT] = {0};

    m->gen++;
    memcpy(slot, META_MAGIC, 8);
    le64_put(slot + 8, m->gen);
    le32_put(slot + 16, m->first);
    le32_put(slot + 20, m->last);
    le32_put(slot + 24, m->floor);
    le32_put(slot + 28, crc32c(0, slot, 28));
    if (store_pwrite_all(fd, slot, sizeof(slot), (m->gen % 2) * META_SLOT) <
            0 ||
        (sync && store_seam->fdatasync(fd) < 0)) {
        return -1;
    }
    return 0;
}

/* ==== Loop side: placement, batches, reaping ==== */

static struct seg *
seg_find(struct store *st, uint32_t seq)
{
    size_t lo = 0, hi = st->nsegs;

    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (st->segs[mid].seq < seq) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    if (lo < st->nsegs && st->segs[lo].seq == seq) {
        return &st->segs[lo];
    }
    return NULL;
}

static int
seg_add(struct store *st, uint32_t seq, uint64_t end_off)
{
    if (st->nsegs == st->segs_cap) {
        size_t ncap = st->segs_cap ? st->segs_cap * 2 : 16;
        struct seg *n = pq_realloc(st->segs, ncap * sizeof(*n));
        if (n == NULL) {
            return PQ_ENOMEM;
        }
        st->segs = n;
        st->segs_cap = ncap;
    }
    st->segs[st->nsegs++] = (struct seg){.seq = seq, .end_off = end_off};
    return PQ_OK;
}

/* submit_locked: move the pending batch onto the thread's queue, joining
 * the last queued batch when it continues it (group commit). */
static void
submit_locked(struct store *st)
{
    struct batch *p = st->pending, *t = st->q_tail;

    if (p == NULL) {
        return;
    }
    st->pending = NULL;
    if (t != NULL && !p->roll && t->seg == p->seg && t->gen == p->gen &&
        t->off + t->len == p->off && t->cap - t->len >= p->len) {
        memcpy(t->data + t->len, p->data, p->len);
        t->len += p->len;
        t->last_lsn = p->last_lsn;
        t->urgent |= p->urgent;
        pq_free(p->data);
        pq_free(p);
    } else if (t != NULL && !p->roll && t->seg == p->seg && t->gen == p->gen &&
               t->off + t->len == p->off) {
        /* Swap roles: grow the queued one by appending p's bytes. */
        uint8_t *n = pq_realloc(t->data, t->len + p->len);
        if (n != NULL) {
            memcpy(n + t->len, p->data, p->len);
            t->data = n;
            t->len += p->len;
            t->cap = t->len;
            t->last_lsn = p->last_lsn;
            t->urgent |= p->urgent;
            pq_free(p->data);
            pq_free(p);
        } else {
            t->next = p; /* no memory: queue it on its own */
            st->q_tail = p;
        }
    } else {
        p->next = NULL;
        if (t != NULL) {
            t->next = p;
        } else {
            st->q_head = p;
        }
        st->q_tail = p;
    }
    pthread_cond_signal(&st->wake);
}

/* store_submit: see store.h. */
void
store_submit(struct store *st)
{
    if (st->pending == NULL) {
        return;
    }
    pthread_mutex_lock(&st->mu);
    submit_locked(st);
    pthread_mutex_unlock(&st->mu);
}

static int pending_reserve(struct store *st, size_t n);

/*
 * try_roll: make the spare the current segment. need_room: reserve bytes
 * the new segment must hold. May wait for the thread to finish preparing a
 * spare. PQ_OK (rolled; roll callback called), PQ_ENOSPC (no spare can be
 * had now), PQ_EIO.
 */
static int
try_roll(struct store *st, uint64_t need_room)
{
    uint32_t seq;
    uint64_t alloc;
    int rc;

    pthread_mutex_lock(&st->mu);
    submit_locked(st);
    if (st->want_room < need_room) {
        st->want_room = need_room;
    }
    pthread_cond_signal(&st->wake);
    while (st->fatal == PQ_OK &&
           (st->spare == SPARE_NONE || st->spare_taken ||
            (st->spare == SPARE_READY && st->spare_room < need_room))) {
        pthread_cond_wait(&st->spare_cv, &st->mu);
    }
    if (st->fatal != PQ_OK) {
        rc = st->fatal;
        pthread_mutex_unlock(&st->mu);
        return rc;
    }
    if (st->spare != SPARE_READY) {
        pthread_mutex_unlock(&st->mu);
        return PQ_ENOSPC;
    }
    st->spare_taken = true;
    seq = st->spare_seq;
    alloc = st->spare_alloc;
    pthread_mutex_unlock(&st->mu);

    rc = seg_add(st, seq, STORE_SEG_HDR_LEN);
    if (rc != PQ_OK) {
        pthread_mutex_lock(&st->mu);
        st->spare_taken = false;
        pthread_mutex_unlock(&st->mu);
        return rc;
    }
    st->start_prev_seq = st->cur_seg;
    st->start_prev_end = st->cur_off;
    st->cur_seg = seq;
    st->cur_off = STORE_SEG_HDR_LEN;
    st->cur_alloc = alloc;
    st->roll_next = true;
    st->need_meta = false;
    /* The roll batch exists even if nothing follows, so the thread always
     * gets to switch segments and make the next spare. */
    rc = pending_reserve(st, 0);
    if (rc != PQ_OK) {
        return rc;
    }
    st->roll_next = false;
    if (st->roll_fn != NULL) {
        st->in_roll_cb = true;
        st->roll_fn(st->roll_arg, seq);
        st->in_roll_cb = false;
    }
    return PQ_OK;
}

static int
pending_reserve(struct store *st, size_t n)
{
    struct batch *b = st->pending;

    if (b == NULL) {
        b = pq_calloc(1, sizeof(*b));
        if (b == NULL) {
            return PQ_ENOMEM;
        }
        b->seg = st->cur_seg;
        b->off = st->cur_off;
        b->alloc = st->cur_alloc;
        b->gen = st->gen;
        b->roll = st->roll_next;
        st->pending = b;
    }
    if (b->cap - b->len < n) {
        size_t ncap = b->cap ? b->cap * 2 : 4096;
        uint8_t *d;
        while (ncap - b->len < n) {
            ncap *= 2;
        }
        d = pq_realloc(b->data, ncap);
        if (d == NULL) {
            if (b->len == 0) {
                st->pending = NULL;
                pq_free(b->data);
                pq_free(b);
            }
            return PQ_ENOMEM;
        }
        b->data = d;
        b->cap = ncap;
    }
    return PQ_OK;
}

static bool
is_terminal(uint8_t type)
{
    return type == REC_ACK || type == REC_DROP;
}

/* The ack reservations a record takes (publishes, a batch's each) and
 * whether it gives one back (it ends a message). An atomic record does
 * both; it never draws on the reserve, since it adds messages. */
static void
resv_change(uint8_t type, const void *body, size_t len, uint64_t *take,
            bool *give)
{
    struct record r;

    *take = record_publishes(type, body, len);
    *give = is_terminal(type);
    if (type == REC_ATOMIC && record_decode(type, body, len, &r) == PQ_OK) {
        *take = r.u.atomic.n;
        *give = is_terminal(r.u.atomic.inner_type);
    }
}

/* start_bytes: room the SEG_START of the current segment still needs. */
static uint64_t
start_bytes(const struct store *st)
{
    return st->cur_off == STORE_SEG_HDR_LEN ? SEG_START_REC : 0;
}

/* place: put one record into the pending batch at cur_off (room and
 * rolls are the caller's business). */
static int
place(struct store *st, uint8_t type, const void *body, size_t len,
      uint64_t *lsn_out, struct store_loc *loc_out)
{
    uint64_t rec = STORE_REC_HDR_LEN + (uint64_t)len;
    struct batch *b;
    struct seg *s;
    uint8_t *p;
    int rc;

    if (start_bytes(st) > 0 && type != REC_SEG_START) {
        /* The first record of every segment links it to the one before
         * (store.h): recovery checks that no segment went missing or
         * short. */
        uint8_t sb[SEG_START_BODY];

        le32_put(sb, st->start_prev_seq);
        le64_put(sb + 4, st->start_prev_end);
        rc = place(st, REC_SEG_START, sb, sizeof(sb), NULL, NULL);
        if (rc != PQ_OK) {
            return rc;
        }
    }
    rc = pending_reserve(st, (size_t)rec);
    if (rc != PQ_OK) {
        return rc;
    }
    st->roll_next = false;
    b = st->pending;
    p = b->data + b->len;
    le32_put(p, (uint32_t)(len + 1));
    le32_put(p + 4, rec_crc(type, body, len));
    p[8] = type;
    if (len > 0) {
        memcpy(p + 9, body, len);
    }
    b->len += (size_t)rec;
    if (type != REC_SEG_START) {
        /* SEG_START takes no LSN: it always travels in the batch of the
         * record that follows it, and callers count LSNs as their own
         * appends (store.h). */
        st->last_lsn++;
        if (b->first_lsn == 0) {
            b->first_lsn = st->last_lsn;
        }
        b->last_lsn = st->last_lsn;
    }
    if (loc_out != NULL) {
        *loc_out = (struct store_loc){
            .seg = st->cur_seg, .len = (uint32_t)rec, .off = st->cur_off};
    }
    if (lsn_out != NULL) {
        *lsn_out = st->last_lsn;
    }
    st->cur_off += rec;
    s = seg_find(st, st->cur_seg);
    if (s != NULL) {
        s->end_off = st->cur_off;
    }
    return PQ_OK;
}

/* store_append: see store.h. */
int
store_append(struct store *st, uint8_t type, const void *body, size_t len,
             uint64_t *lsn_out, struct store_loc *loc_out)
{
    uint64_t rec = STORE_REC_HDR_LEN + (uint64_t)len;
    uint64_t resv_after, room_after, take;
    bool ordinary_fits, give;
    int rc, fatal;

    if (st->cfg.read_only || type == 0 || type == REC_SEG_START ||
        (body == NULL && len > 0)) {
        return PQ_EINVAL;
    }
    if (len > RECORD_BODY_MAX ||
        STORE_SEG_HDR_LEN + SEG_START_REC + rec > st->cfg.segment_bytes) {
        return PQ_ETOOBIG;
    }
    pthread_mutex_lock(&st->mu);
    fatal = st->fatal;
    pthread_mutex_unlock(&st->mu);
    if (fatal != PQ_OK) {
        return fatal;
    }
    if (st->need_meta && !st->in_roll_cb && st->roll_fn != NULL) {
        st->need_meta = false;
        st->in_roll_cb = true;
        st->roll_fn(st->roll_arg, st->cur_seg);
        st->in_roll_cb = false;
    }
    resv_change(type, body, len, &take, &give);
    resv_after = st->reserved + take;
    if (give && resv_after > 0 && (take > 0 || rec <= STORE_ACK_RESERVE)) {
        resv_after--;
    }
    room_after = resv_after * STORE_ACK_RESERVE;
    ordinary_fits =
        st->cur_off + start_bytes(st) + rec <= st->cfg.segment_bytes &&
        st->cur_off + start_bytes(st) + rec + room_after <= st->cur_alloc;
    if (!ordinary_fits && !st->in_roll_cb) {
        rc = try_roll(st, room_after + SEG_START_REC + rec);
        if (rc == PQ_EIO || rc == PQ_ENOMEM) {
            return rc;
        }
        if (rc != PQ_OK && !is_terminal(type)) {
            return PQ_ENOSPC;
        }
        /* rolled, or an ACK/DROP that may use the reserve */
    }
    if (st->cur_off + start_bytes(st) + rec + room_after > st->cur_alloc) {
        return PQ_ENOSPC;
    }
    rc = place(st, type, body, len, lsn_out, loc_out);
    if (rc != PQ_OK) {
        return rc;
    }
    if (resv_after != st->reserved) {
        st->reserved = resv_after;
    }
    return PQ_OK;
}

/* gc: hand the oldest free segments to the thread for deletion. */
static void
gc(struct store *st)
{
    size_t n = 0;

    while (n < st->nsegs) {
        struct seg *s = &st->segs[n];
        if (s->seq == st->cur_seg || s->refs > 0 || s->holds > 0 ||
            s->zero_lsn > st->durable_lsn) {
            break;
        }
        n++;
    }
    if (n == 0) {
        return;
    }
    pthread_mutex_lock(&st->mu);
    for (size_t i = 0; i < n; i++) {
        if (st->ndels == st->dels_cap) {
            size_t ncap = st->dels_cap ? st->dels_cap * 2 : 8;
            uint32_t *d = pq_realloc(st->dels, ncap * sizeof(*d));
            if (d == NULL) {
                n = i; /* try the rest next time */
                break;
            }
            st->dels = d;
            st->dels_cap = ncap;
        }
        st->dels[st->ndels++] = st->segs[i].seq;
    }
    pthread_cond_signal(&st->wake);
    pthread_mutex_unlock(&st->mu);
    memmove(st->segs, st->segs + n, (st->nsegs - n) * sizeof(*st->segs));
    st->nsegs -= n;
}

/* rewind: the first failed batch of this generation came back; go back to
 * the thread's last good position and start a new generation. */
static void
rewind_to_good(struct store *st)
{
    pthread_mutex_lock(&st->mu);
    submit_locked(st); /* old generation: the thread fails it */
    st->gen++;
    st->cur_seg = st->good_seg;
    st->cur_off = st->good_off;
    st->cur_alloc = st->good_alloc;
    if (st->spare == SPARE_READY && st->spare_taken &&
        st->spare_seq > st->good_seg) {
        st->spare_taken = false; /* the roll into it never happened */
    }
    pthread_mutex_unlock(&st->mu);
    while (st->nsegs > 0 && st->segs[st->nsegs - 1].seq > st->cur_seg) {
        st->nsegs--;
    }
    if (st->nsegs > 0) {
        st->segs[st->nsegs - 1].end_off = st->cur_off;
    }
    st->roll_next = false;
    st->need_meta = st->cur_off == STORE_SEG_HDR_LEN;
}

/* store_reap: see store.h. */
void
store_reap(struct store *st, store_done_fn done, void *arg)
{
    struct batch *list, *b, *next;
    uint64_t cnt;
    ssize_t n;

    if (st->efd < 0) {
        return;
    }
    n = read(st->efd, &cnt, sizeof(cnt));
    (void)n;
    pthread_mutex_lock(&st->mu);
    list = st->c_head;
    st->c_head = st->c_tail = NULL;
    pthread_mutex_unlock(&st->mu);
    for (b = list; b != NULL; b = next) {
        next = b->next;
        if (b->status == PQ_OK) {
            if (b->last_lsn != 0) {
                st->durable_lsn = b->last_lsn;
            }
            st->loop_status = PQ_OK;
        } else {
            /* Segments whose last reference died in a lost record stay. */
            for (size_t i = 0; i < st->nsegs; i++) {
                uint64_t z = st->segs[i].zero_lsn;
                if (z >= b->first_lsn && z <= b->last_lsn) {
                    st->segs[i].zero_lsn = UINT64_MAX;
                }
            }
            if (b->status == PQ_ENOSPC) {
                st->loop_status = PQ_ENOSPC;
                if (b->gen == st->gen) {
                    rewind_to_good(st);
                }
            }
        }
        if (done != NULL && b->last_lsn != 0) {
            done(arg, b->last_lsn, b->status);
        }
        pq_free(b);
    }
    gc(st);
}

/* ==== Open and close ==== */

static int
open_current(struct store *st, uint32_t seq, uint64_t end, char *err,
             size_t errlen)
{
    char path[PATH_BUF];
    struct stat sb;
    uint64_t want = st->cfg.segment_bytes +
                    store_room_for(st, st->reserved * STORE_ACK_RESERVE);
    int fd, e;

    seg_path(path, sizeof(path), st->dir, seq);
    fd = store_seam->open(path, O_RDWR | O_CLOEXEC, 0);
    if (fd < 0) {
        store_seterr(err, errlen, "open %s: %s", path, strerror(errno));
        return store_errno_to_pq(errno);
    }
    if (fstat(fd, &sb) < 0) {
        e = errno;
        goto err_close;
    }
    if ((uint64_t)sb.st_size < want) {
        /* Best effort: a full disk only means less room ahead. */
        if (store_seam->fallocate(fd, 0, (off_t)want) == 0) {
            sb.st_size = (off_t)want;
        }
    }
    st->cur_fd = fd;
    st->cur_seg = seq;
    st->cur_off = end;
    st->cur_alloc = (uint64_t)sb.st_size > end ? (uint64_t)sb.st_size : end;
    return PQ_OK;

err_close:
    store_seterr(err, errlen, "stat %s: %s", path, strerror(e));
    store_seam->close(fd);
    return store_errno_to_pq(e);
}

/* repair: truncate the torn tail and remove spare segments. */
static int
repair(struct store *st, struct scan *sc, char *err, size_t errlen)
{
    char path[PATH_BUF];
    int fd;

    for (size_t i = 0; i < sc->nseqs; i++) {
        if (i >= sc->lo && i < sc->nvalid) {
            continue;
        }
        seg_path(path, sizeof(path), st->dir, sc->seqs[i]);
        if (i < sc->lo) {
            log_info("%s: removing it (its deletion was interrupted; the log "
                     "starts at segment %u)",
                     path, sc->meta.first);
        }
        if (store_seam->unlink(path) < 0 && errno != ENOENT) {
            store_seterr(err, errlen, "remove %s: %s", path, strerror(errno));
            return store_errno_to_pq(errno);
        }
    }
    if (sc->torn) {
        seg_path(path, sizeof(path), st->dir, sc->torn_seq);
        log_warn("%s: torn tail at offset %llu: dropped %llu bytes after the "
                 "last good record",
                 path, (unsigned long long)sc->torn_off,
                 (unsigned long long)sc->torn_dropped);
        fd = store_seam->open(path, O_RDWR | O_CLOEXEC, 0);
        if (fd < 0) {
            store_seterr(err, errlen, "open %s: %s", path, strerror(errno));
            return store_errno_to_pq(errno);
        }
        if (store_seam->ftruncate(fd, (off_t)sc->torn_off) < 0 ||
            store_seam->fdatasync(fd) < 0) {
            int e = errno;
            store_seam->close(fd);
            store_seterr(err, errlen, "truncate %s: %s", path, strerror(e));
            return store_errno_to_pq(e);
        }
        store_seam->close(fd);
    }
    if ((sc->torn || sc->spares > 0 || sc->lo > 0) &&
        store_seam->fsync(st->dir_fd) < 0) {
        store_seterr(err, errlen, "fsync %s: %s", st->dir, strerror(errno));
        return store_errno_to_pq(errno);
    }
    return PQ_OK;
}

static void
store_free(struct store *st)
{
    struct batch *b, *next;

    if (st == NULL) {
        return;
    }
    store_reader_stop(st);
    for (b = st->c_head; b != NULL; b = next) {
        next = b->next;
        pq_free(b->data);
        pq_free(b);
    }
    for (b = st->q_head; b != NULL; b = next) {
        next = b->next;
        pq_free(b->data);
        pq_free(b);
    }
    if (st->pending != NULL) {
        pq_free(st->pending->data);
        pq_free(st->pending);
    }
    if (st->cur_fd >= 0) {
        store_seam->close(st->cur_fd);
    }
    if (st->spare_fd >= 0) {
        store_seam->close(st->spare_fd);
    }
    if (st->efd >= 0) {
        close(st->efd);
    }
    if (st->meta_fd >= 0) {
        store_seam->close(st->meta_fd);
    }
    if (st->dir_fd >= 0) {
        store_seam->close(st->dir_fd);
    }
    if (st->lock_fd >= 0) {
        close(st->lock_fd);
    }
    pthread_mutex_destroy(&st->mu);
    pthread_cond_destroy(&st->wake);
    pthread_cond_destroy(&st->spare_cv);
    pthread_cond_destroy(&st->rd_wake);
    pq_free(st->dels);
    pq_free(st->segs);
    pq_free(st->dir);
    pq_free(st);
}

/* store_open: see store.h. */
int
store_open(const struct store_config *c, store_replay_fn fn, void *arg,
           struct store **out, char *err, size_t errlen)
{
    struct scan sc = {0};
    struct store *st;
    pthread_condattr_t ca;
    int rc;

    *out = NULL;
    if (c->dir == NULL || c->segment_bytes < 4096) {
        store_seterr(
            err, errlen,
            "store: bad config (dir missing or segment_bytes under 4096)");
        return PQ_EINVAL;
    }
    st = pq_calloc(1, sizeof(*st));
    if (st == NULL) {
        store_seterr(err, errlen, "open data dir %s: out of memory", c->dir);
        return PQ_ENOMEM;
    }
    st->lock_fd = st->dir_fd = st->efd = st->cur_fd = st->spare_fd = -1;
    st->meta_fd = -1;
    pthread_mutex_init(&st->mu, NULL);
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&st->wake, &ca);
    pthread_condattr_destroy(&ca);
    pthread_cond_init(&st->spare_cv, NULL);
    pthread_cond_init(&st->rd_wake, NULL);
    st->dir = pq_strdup(c->dir);
    if (st->dir == NULL) {
        rc = PQ_ENOMEM;
        store_seterr(err, errlen, "open data dir %s: out of memory", c->dir);
        goto err_free;
    }
    st->cfg = *c;
    st->cfg.dir = st->dir;

    rc = store_dir_lock(st->dir, c->read_only, &st->lock_fd, err, errlen);
    if (rc != PQ_OK) {
        goto err_free;
    }
    if (!c->read_only) {
        st->dir_fd =
            store_seam->open(st->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0);
        if (st->dir_fd < 0) {
            store_seterr(err, errlen, "open data dir %s: %s", st->dir,
                         strerror(errno));
            rc = store_errno_to_pq(errno);
            goto err_free;
        }
    }

    sc.dir = st->dir;
    sc.opaque = c->opaque_records;
    sc.caller_checks_live = c->live_check_by_caller;
    sc.fn = fn;
    sc.arg = arg;
    rc = store_scan_dir(&sc, err, errlen);
    if (rc != PQ_OK) {
        goto err_scan;
    }
    st->reserved = sc.n_publish > sc.n_end ? sc.n_publish - sc.n_end : 0;
    for (size_t i = sc.lo; i < sc.nvalid; i++) {
        rc = seg_add(st, sc.seqs[i], sc.end_offs[i]);
        if (rc != PQ_OK) {
            store_seterr(err, errlen, "open data dir %s: out of memory",
                         st->dir);
            goto err_scan;
        }
    }
    if (c->read_only) {
        st->cur_seg = st->nsegs > 0 ? st->segs[st->nsegs - 1].seq : 0;
        store_scan_fini(&sc);
        *out = st;
        return PQ_OK;
    }
    rc = repair(st, &sc, err, errlen);
    if (rc != PQ_OK) {
        goto err_scan;
    }
    if (st->nsegs == 0) {
        uint32_t seq = sc.nseqs > 0 ? sc.seqs[sc.nseqs - 1] + 1 : 1;
        char path[PATH_BUF];
        uint64_t alloc = st->cfg.segment_bytes + store_room_for(st, 0);
        seg_path(path, sizeof(path), st->dir, seq);
        rc = seg_create(st->dir, st->dir_fd, seq, alloc, &st->cur_fd);
        if (rc != PQ_OK) {
            store_seterr(err, errlen, "create %s: %s", path, strerror(errno));
            goto err_scan;
        }
        rc = seg_add(st, seq, STORE_SEG_HDR_LEN);
        if (rc != PQ_OK) {
            store_seterr(err, errlen, "open data dir %s: out of memory",
                         st->dir);
            goto err_scan;
        }
        st->cur_seg = seq;
        st->cur_off = STORE_SEG_HDR_LEN;
        st->cur_alloc = alloc;
    } else {
        struct seg *last = &st->segs[st->nsegs - 1];
        rc = open_current(st, last->seq, last->end_off, err, errlen);
        if (rc != PQ_OK) {
            goto err_scan;
        }
        if (st->nsegs > 1) {
            st->start_prev_seq = last[-1].seq;
            st->start_prev_end = last[-1].end_off;
        }
    }
    /* Record where the log starts and ends now (leftovers and spares are
     * gone); from here on the storage thread keeps it up to date. */
    rc = store_meta_open(st->dir, st->dir_fd, &st->meta_fd, err, errlen);
    if (rc != PQ_OK) {
        goto err_scan;
    }
    st->meta = sc.meta;
    st->meta.first = st->segs[0].seq;
    st->meta.last = st->cur_seg;
    if (store_meta_write(st->meta_fd, &st->meta, true) < 0) {
        char path[PATH_BUF];

        meta_path(path, sizeof(path), st->dir);
        store_seterr(err, errlen, "write %s: %s", path, strerror(errno));
        rc = store_errno_to_pq(errno);
        goto err_scan;
    }
    store_scan_fini(&sc);
    sc = (struct scan){0};
    st->w_seg = st->cur_seg;
    st->w_off = st->cur_off;
    st->last_sync_ms = clock_mono_ms();
    st->want_room = st->reserved * STORE_ACK_RESERVE;
    st->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (st->efd < 0) {
        store_seterr(err, errlen, "eventfd: %s", strerror(errno));
        rc = PQ_ESYS;
        goto err_free;
    }
    if (pthread_create(&st->thr, NULL, store_thread_main, st) != 0) {
        store_seterr(err, errlen, "start the storage thread: %s",
                     strerror(errno));
        rc = PQ_ESYS;
        goto err_free;
    }
    st->thr_started = true;
    *out = st;
    return PQ_OK;

err_scan:
    store_scan_fini(&sc);
err_free:
    store_free(st);
    return rc;
}

/* store_close: see store.h. */
int
store_close(struct store *st)
{
    char path[PATH_BUF];
    int rc = PQ_OK;

    if (st == NULL) {
        return PQ_OK;
    }
    if (st->thr_started) {
        pthread_mutex_lock(&st->mu);
        submit_locked(st);
        st->stop = true;
        pthread_cond_signal(&st->wake);
        pthread_mutex_unlock(&st->mu);
        pthread_join(st->thr, NULL);
        rc = st->fatal;
        if (rc == PQ_OK && st->loop_status != PQ_OK) {
            rc = st->loop_status;
        }
        /* An unused spare would only be removed at the next open. */
        if (st->spare_fd >= 0 && !st->spare_taken) {
            store_seam->close(st->spare_fd);
            st->spare_fd = -1;
            seg_path(path, sizeof(path), st->dir, st->spare_seq);
            if (store_seam->unlink(path) == 0) {
                (void)store_seam->fsync(st->dir_fd);
            }
        }
    }
    store_free(st);
    return rc;
}

/* ==== Small accessors ==== */

/* store_event_fd: see store.h. */
int
store_event_fd(const struct store *st)
{
    return st->efd;
}

/* store_urgent: see store.h. */
void
store_urgent(struct store *st)
{
    if (st->cfg.fsync_policy != FSYNC_ALWAYS || st->last_lsn == 0) {
        return;
    }
    if (st->pending != NULL) {
        st->pending->urgent = true; /* the common case: no lock needed */
        return;
    }
    pthread_mutex_lock(&st->mu);
    st->urgent_lsn = st->last_lsn;
    pthread_cond_signal(&st->wake);
    pthread_mutex_unlock(&st->mu);
}

/* store_last_lsn: see store.h. */
uint64_t
store_last_lsn(const struct store *st)
{
    return st->last_lsn;
}

/* store_durable_lsn: see store.h. */
uint64_t
store_durable_lsn(const struct store *st)
{
    return st->durable_lsn;
}

/* store_current_seg: see store.h. */
uint32_t
store_current_seg(const struct store *st)
{
    return st->cur_seg;
}

/* store_status: see store.h. Degraded means: the last batch failed for
 * space, or the current segment is full and no spare could be made. */
int
store_status(const struct store *st)
{
    struct store *m = (struct store *)st; /* the mutex is not logical state */
    int rc;

    if (st->cfg.read_only) {
        return PQ_OK;
    }
    pthread_mutex_lock(&m->mu);
    rc = st->fatal;
    if (rc == PQ_OK && st->spare == SPARE_FAILED) {
        rc = PQ_ENOSPC;
    }
    pthread_mutex_unlock(&m->mu);
    if (rc == PQ_OK) {
        rc = st->loop_status;
    }
    return rc;
}

/* store_space_check: see store.h. */
int
store_space_check(struct store *st, uint32_t n_publish, uint64_t bytes)
{
    uint64_t need = (uint64_t)n_publish * (STORE_REC_HDR_LEN + 64) + bytes;
    uint64_t room = (st->reserved + n_publish) * STORE_ACK_RESERVE;
    enum spare_state sp;
    uint64_t spare_room;
    int fatal;

    if (st->cfg.read_only) {
        return PQ_EINVAL;
    }
    pthread_mutex_lock(&st->mu);
    fatal = st->fatal;
    sp = st->spare;
    spare_room = st->spare_room;
    pthread_mutex_unlock(&st->mu);
    if (fatal != PQ_OK) {
        return fatal;
    }
    if (st->cur_off + need + room <= st->cur_alloc &&
        st->cur_off + need <= st->cfg.segment_bytes) {
        return PQ_OK;
    }
    /* A roll will be needed (several for a batch over a segment: the log
     * goes on in the next segment between any two records, and each
     * record was checked against a segment's size): fine while spares
     * are ready or on their way. */
    if (sp != SPARE_FAILED && room <= spare_room + st->cfg.segment_bytes) {
        return PQ_OK;
    }
    return PQ_ENOSPC;
}

/* store_reserve_set: see store.h. */
void
store_reserve_set(struct store *st, uint64_t n_live)
{
    st->reserved = n_live;
}

/* store_reserve_count: see store.h. */
uint64_t
store_reserve_count(const struct store *st)
{
    return st->reserved;
}

/* store_seg_ref: see store.h. */
void
store_seg_ref(struct store *st, uint32_t seg, uint64_t bytes)
{
    struct seg *s = seg_find(st, seg);

    if (s == NULL) {
        return;
    }
    s->refs++;
    s->live_bytes += bytes;
}

/* store_seg_unref: see store.h. */
void
store_seg_unref(struct store *st, uint32_t seg, uint64_t bytes)
{
    struct seg *s = seg_find(st, seg);

    if (s == NULL) {
        return;
    }
    if (s->refs == 0) {
        /* A reference released twice: some segment lost one early and may
         * already be gone with live records in it. A bug, never data. */
        log_err("segment %u: reference count would go below zero (a "
                "reference was released twice)",
                seg);
        return;
    }
    s->refs--;
    s->live_bytes = s->live_bytes > bytes ? s->live_bytes - bytes : 0;
    if (s->refs == 0 && s->zero_lsn != UINT64_MAX) {
        s->zero_lsn = st->last_lsn;
    }
}

/* store_seg_hold: see store.h. */
void
store_seg_hold(struct store *st, uint32_t seg)
{
    struct seg *s = seg_find(st, seg);

    if (s != NULL) {
        s->holds++;
    }
}

/* store_seg_release: see store.h. */
void
store_seg_release(struct store *st, uint32_t seg)
{
    struct seg *s = seg_find(st, seg);

    if (s != NULL && s->holds > 0) {
        s->holds--;
    }
}

/* store_set_roll_cb: see store.h. */
void
store_set_roll_cb(struct store *st, store_roll_fn fn, void *arg)
{
    st->roll_fn = fn;
    st->roll_arg = arg;
}

/* store_compact_candidate: see store.h. */
int
store_compact_candidate(const struct store *st, uint32_t *seg)
{
    uint64_t total = 0, live = 0;

    for (size_t i = 0; i < st->nsegs; i++) {
        total += st->segs[i].end_off;
        live += st->segs[i].live_bytes;
    }
    if (live * 2 >= total) {
        return PQ_ENOTFOUND;
    }
    for (size_t i = 0; i < st->nsegs; i++) {
        const struct seg *s = &st->segs[i];
        if (s->seq == st->cur_seg) {
            break;
        }
        if (s->refs > 0) {
            *seg = s->seq;
            return PQ_OK;
        }
    }
    return PQ_ENOTFOUND;
}

/* store_seg_stats: see store.h. */
size_t
store_seg_stats(const struct store *st, struct store_seg_stat *out, size_t max)
{
    for (size_t i = 0; i < st->nsegs && i < max; i++) {
        out[i] = (struct store_seg_stat){
            .seg = st->segs[i].seq,
            .refs = st->segs[i].refs,
            .live_bytes = st->segs[i].live_bytes,
            .end_off = st->segs[i].end_off,
            .current = st->segs[i].seq == st->cur_seg,
        };
    }
    return st->nsegs;
}

/* store_salvage_floor: see store.h. */
uint32_t
store_salvage_floor(const struct store *st)
{
    return st->meta.floor;
}

/* store_get_stats: see store.h. */
void
store_get_stats(struct store *st, struct store_stats *out)
{
    pthread_mutex_lock(&st->mu);
    *out = st->stats;
    pthread_mutex_unlock(&st->mu);
}
