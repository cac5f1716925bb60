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
#include "store.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "crc32c.h"
#include "failpoint.h"
#include "log.h"
#include "mem.h"
#include "pqerr.h"
#include "store_verify.h"

static const char STORE_MAGIC[8] = {'P', 'R', 'O', 'T', 'O', 'Q', 'L', 'G'};

enum {
    REC_LEN_MAX = RECORD_BODY_MAX + 1,  /* len field covers type + body */
    SPARE_RETRY_MS = 100,               /* retry a failed spare this often */
    PATH_BUF = PATH_MAX + 32,
};

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

static const struct store_io *io = &io_real;

/* store_set_io: see store.h. */
void
store_set_io(const struct store_io *new_io)
{
    io = new_io != NULL ? new_io : &io_real;
}

/* store_io_real: see store.h. */
const struct store_io *
store_io_real(void)
{
    return &io_real;
}

/* ---- types ---- */

/* DIR/META: where the log starts and ends (store.h, ON-DISK FORMAT). */
struct meta {
    bool present;                  /* read: the file exists */
    uint64_t gen;                  /* bumped by every write */
    uint32_t first;                /* oldest segment of the log */
    uint32_t last;                 /* newest segment rolled into */
    uint32_t floor;                /* salvage accepted the log up to it */
};

/* One segment as the loop sees it (for refs, GC and compaction). */
struct seg {
    uint32_t seq;
    uint64_t refs;                 /* live references (dispatcher) */
    uint64_t live_bytes;
    uint64_t end_off;              /* bytes appended so far */
    uint64_t zero_lsn;             /* must be durable before deletion;
                                      UINT64_MAX: pinned this session */
};

/* A run of records for one segment; also reused as its completion. */
struct batch {
    struct batch *next;
    uint32_t seg;
    uint32_t gen;                  /* rewind generation it was planned in */
    uint64_t off;                  /* file offset of data[0] */
    uint64_t alloc;                /* preallocated size of seg */
    bool roll;                     /* first write into seg */
    uint8_t *data;
    size_t len, cap;
    uint64_t first_lsn, last_lsn;
    int status;
    bool urgent;                   /* a reply waits on it (store_urgent) */
};

enum spare_state { SPARE_NONE, SPARE_READY, SPARE_FAILED };

struct store {
    char *dir;
    struct store_config cfg;       /* cfg.dir points at dir */
    int lock_fd;
    int dir_fd;
    int efd;                       /* eventfd: completions ready */

    /* [loop] */
    struct batch *pending;
    uint32_t cur_seg;
    uint64_t cur_off;
    uint64_t cur_alloc;
    bool roll_next;                /* next batch starts a new segment */
    uint32_t start_prev_seq;       /* SEG_START of the current segment: */
    uint64_t start_prev_end;       /* the segment before it and its end */
    bool in_roll_cb;
    bool need_meta;                /* call the roll cb before next append */
    uint32_t gen;
    uint64_t last_lsn;
    uint64_t durable_lsn;
    uint64_t reserved;             /* live reservations */
    int loop_status;               /* PQ_ENOSPC after a failed batch */
    store_roll_fn roll_fn;
    void *roll_arg;
    struct seg *segs;              /* oldest first; the last is current */
    size_t nsegs, segs_cap;

    /* [mu] */
    pthread_mutex_t mu;
    pthread_cond_t wake;           /* the thread waits here */
    pthread_cond_t spare_cv;       /* the loop waits here for a spare */
    pthread_t thr;
    bool thr_started;
    bool stop;
    struct batch *q_head, *q_tail; /* submitted, not yet taken */
    struct batch *c_head, *c_tail; /* completed, not yet reaped */
    uint32_t *dels;                /* segments to unlink */
    size_t ndels, dels_cap;
    int fatal;                     /* PQ_EIO once failed for good */
    bool fail_set;                 /* batches of fail_gen fail */
    uint32_t fail_gen;
    uint32_t good_seg;             /* where the loop rewinds to */
    uint64_t good_off, good_alloc;
    enum spare_state spare;
    bool spare_taken;              /* the loop rolled into it */
    uint32_t spare_seq;
    uint64_t spare_alloc;
    uint64_t spare_room;           /* reserve room beyond segment_bytes */
    uint64_t want_room;            /* reserve bytes the loop needs */
    uint64_t spare_retry_ms;       /* monotonic time of next retry */
    uint32_t w_seg;                /* written up to (for store_read) */
    uint64_t w_off;
    struct store_stats stats;

    /* [thread] (the loop's until the thread starts) */
    int meta_fd;                   /* DIR/META */
    struct meta meta;              /* what META says now */
    int cur_fd;
    int spare_fd;
    bool dirty;                    /* written, not yet synced */
    uint64_t last_sync_ms;
    /* FSYNC_ALWAYS: batches written but not synced because nobody waits on
     * them; synced by the next urgent round, a roll, or deferred_due_ms. */
    struct batch *def_head, *def_tail;
    uint64_t deferred_due_ms;
    uint64_t urgent_lsn;           /* [mu] records up to it have a waiter */
};

/* ---- small helpers ---- */

static void
seterr(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void
seterr(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;

    if (err == NULL || errlen == 0) {
        return;
    }
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static uint32_t
rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 |
           (uint32_t)p[3] << 24;
}

static uint64_t
rd64(const uint8_t *p)
{
    return (uint64_t)rd32(p) | (uint64_t)rd32(p + 4) << 32;
}

static void
wr32(uint8_t *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) {
        p[i] = (uint8_t)(v >> (8 * i));
    }
}

static void
wr64(uint8_t *p, uint64_t v)
{
    wr32(p, (uint32_t)v);
    wr32(p + 4, (uint32_t)(v >> 32));
}

static uint64_t
now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static uint64_t
now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void
seg_path(char *buf, size_t n, const char *dir, uint32_t seq)
{
    snprintf(buf, n, "%s/seg-%010u.log", dir, seq);
}

/* rec_crc: the CRC of a record: type byte, then body. */
static uint32_t
rec_crc(uint8_t type, const uint8_t *body, size_t len)
{
    return crc32c(crc32c(0, &type, 1), body, len);
}

static int
errno_to_pq(int e)
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
static uint64_t
room_for(const struct store *st, uint64_t want)
{
    uint64_t room = st->cfg.segment_bytes / 4;

    if (room < 2 * want) {
        room = 2 * want;
    }
    return (room + 4095) & ~(uint64_t)4095;
}

static int
pwrite_all(int fd, const uint8_t *p, size_t n, uint64_t off)
{
    while (n > 0) {
        ssize_t w = io->pwrite(fd, p, n, (off_t)off);
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

static int
pread_all(int fd, uint8_t *p, size_t n, uint64_t off)
{
    while (n > 0) {
        ssize_t r = pread(fd, p, n, (off_t)off);
        if (r < 0) {
            if (errno == EINTR) {
                continue;
            }
            return -1;
        }
        if (r == 0) {
            errno = 0;             /* short file */
            return -1;
        }
        p += r;
        n -= (size_t)r;
        off += (uint64_t)r;
    }
    return 0;
}

/*
 * seg_create: create segment seq in dir, preallocate alloc bytes, write
 * and sync its header, then sync the directory (the new name). On success
 * *fd_out is open read-write. On failure the file is removed and errno
 * describes the cause; returns a PQ code.
 */
static int
seg_create(const char *dir, int dir_fd, uint32_t seq, uint64_t alloc,
           int *fd_out)
{
    char path[PATH_BUF];
    uint8_t hdr[STORE_SEG_HDR_LEN];
    int fd, rc, e;

    seg_path(path, sizeof(path), dir, seq);
    fd = io->open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        return errno_to_pq(errno);
    }
    rc = io->fallocate(fd, 0, (off_t)alloc);
    if (rc != 0) {
        e = rc;
        goto err_remove;
    }
    memcpy(hdr, STORE_MAGIC, 8);
    wr32(hdr + 8, STORE_FORMAT_VERSION);
    wr64(hdr + 12, seq);
    if (pwrite_all(fd, hdr, sizeof(hdr), 0) < 0 || io->fdatasync(fd) < 0 ||
        io->fsync(dir_fd) < 0) {
        e = errno;
        goto err_remove;
    }
    *fd_out = fd;
    return PQ_OK;

err_remove:
    io->close(fd);
    io->unlink(path);
    errno = e;
    return errno_to_pq(e);
}

/* ---- data dir lock ---- */

static int
dir_lock(const char *dir, bool shared, int *fd_out, char *err, size_t errlen)
{
    char path[PATH_BUF], pidbuf[32];
    struct flock fl = {.l_whence = SEEK_SET};
    int fd, n;

    snprintf(path, sizeof(path), "%s/LOCK", dir);
    fd = shared ? open(path, O_RDONLY | O_CLOEXEC)
                : open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) {
        if (shared && errno == ENOENT) {
            *fd_out = -1;          /* nobody ever wrote here */
            return PQ_OK;
        }
        seterr(err, errlen, "open %s: %s", path, strerror(errno));
        return errno_to_pq(errno);
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
            seterr(err, errlen,
                   "data dir %s is locked by another protoqd (pid %s)", dir,
                   pidbuf[0] != '\0' ? pidbuf : "unknown");
            close(fd);
            return PQ_EBUSY;
        }
        seterr(err, errlen, "lock %s: %s", path, strerror(e));
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

static bool all_zero(const uint8_t *p, size_t n);

/* ==== DIR/META ==== */

static const char META_MAGIC[8] = {'P', 'Q', 'M', 'E', 'T', 'A', '0', '1'};

enum { META_SLOT = 32, META_LEN = 2 * META_SLOT };

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
static int
meta_read(const char *dir, struct meta *m, char *err, size_t errlen)
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
        seterr(err, errlen, "open %s: %s", path, strerror(errno));
        return errno_to_pq(errno);
    }
    n = pread(fd, buf, sizeof(buf), 0);
    close(fd);
    if (n < 0) {
        seterr(err, errlen, "read %s: %s", path, strerror(errno));
        return errno_to_pq(errno);
    }
    if (all_zero(buf, sizeof(buf))) {
        return PQ_OK;              /* created, never written: a crash */
    }
    for (int i = 0; i < 2; i++) {
        const uint8_t *p = buf + i * META_SLOT;
        uint64_t gen = rd64(p + 8);

        if (memcmp(p, META_MAGIC, 8) != 0 || rd32(p + 28) != crc32c(0, p, 28) ||
            (m->present && gen <= m->gen)) {
            continue;
        }
        m->present = true;
        m->gen = gen;
        m->first = rd32(p + 16);
        m->last = rd32(p + 20);
        m->floor = rd32(p + 24);
    }
    if (!m->present || m->first == 0 || m->last < m->first) {
        seterr(err, errlen, "%s: damaged (no valid copy of the log's start and end); run protoqd --check-data %s",
               path, dir);
        return PQ_ECORRUPT;
    }
    return PQ_OK;
}

/* meta_open: open (creating: size and name made durable) DIR/META. */
static int
meta_open(const char *dir, int dir_fd, int *fd_out, char *err, size_t errlen)
{
    char path[PATH_BUF];
    struct stat sb;
    int fd;

    meta_path(path, sizeof(path), dir);
    fd = io->open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0 || fstat(fd, &sb) < 0) {
        goto fail;
    }
    if (sb.st_size < META_LEN) {
        /* Allocate both slots once: later writes overwrite in place and
         * so need no free space (they must work on a full disk, where
         * deleting segments is what makes room). */
        if (io->ftruncate(fd, META_LEN) < 0 || io->fsync(fd) < 0 ||
            io->fsync(dir_fd) < 0) {
            goto fail;
        }
    }
    *fd_out = fd;
    return PQ_OK;

fail:
    seterr(err, errlen, "open %s: %s", path, strerror(errno));
    if (fd >= 0) {
        int e = errno;

        io->close(fd);
        errno = e;
    }
    return errno_to_pq(errno);
}

/* meta_write: write m (a new generation) into the older slot and, when
 * sync, fdatasync. Returns 0 or -1 with errno. */
static int
meta_write(int fd, struct meta *m, bool sync)
{
    uint8_t slot[META_SLOT] = {0};

    m->gen++;
    memcpy(slot, META_MAGIC, 8);
    wr64(slot + 8, m->gen);
    wr32(slot + 16, m->first);
    wr32(slot + 20, m->last);
    wr32(slot + 24, m->floor);
    wr32(slot + 28, crc32c(0, slot, 28));
    if (pwrite_all(fd, slot, sizeof(slot), (m->gen % 2) * META_SLOT) < 0 ||
        (sync && io->fdatasync(fd) < 0)) {
        return -1;
    }
    return 0;
}

/* ==== Recovery: scanning segments ==== */

/* What a scan learns; shared by store_open and store_check. */
struct scan {
    const char *dir;
    store_replay_fn fn;
    void *arg;
    uint32_t *seqs;                /* segment files, ascending */
    size_t nseqs;
    size_t lo;                     /* seqs[0..lo) are leftovers of an
                                      interrupted deletion (before META's
                                      first segment) */
    size_t nvalid;                 /* seqs[lo..nvalid) are kept */
    uint64_t *end_offs;            /* per kept segment: end of records */
    struct meta meta;              /* DIR/META as found */
    bool salvage;                  /* store_salvage: find damage only */
    bool opaque;                   /* cfg.opaque_records */
    struct verify v;               /* the live-message check */
    struct verify_result vr;
    uint64_t links;                /* segment links checked */
    uint32_t version;              /* of the segment being scanned */
    bool has_start;                /* it begins with a SEG_START: */
    struct rec_seg_start start;
    bool damaged;                  /* the first damage seen: */
    uint32_t damage_seq;
    uint64_t damage_off;
    uint64_t counts[256];          /* records per type */
    uint64_t records;
    uint64_t bytes;                /* record bytes */
    uint64_t n_publish, n_end;     /* PUBLISH, ACK + DROP */
    bool torn;
    uint32_t torn_seq;
    uint64_t torn_off, torn_dropped;
    size_t spares;                 /* trailing segments without records */
};

static int
cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

    return x < y ? -1 : x > y;
}

/* parse "seg-%010u.log" strictly */
static bool
parse_seg_name(const char *name, uint32_t *seq)
{
    uint64_t v = 0;

    if (strlen(name) != 18 || strncmp(name, "seg-", 4) != 0 ||
        strcmp(name + 14, ".log") != 0) {
        return false;
    }
    for (int i = 4; i < 14; i++) {
        if (name[i] < '0' || name[i] > '9') {
            return false;
        }
        v = v * 10 + (uint64_t)(name[i] - '0');
    }
    if (v == 0 || v > UINT32_MAX) {
        return false;
    }
    *seq = (uint32_t)v;
    return true;
}

static int
list_segments(struct scan *sc, char *err, size_t errlen)
{
    DIR *d = opendir(sc->dir);
    struct dirent *de;
    size_t cap = 0;
    uint32_t seq;

    if (d == NULL) {
        seterr(err, errlen, "open data dir %s: %s", sc->dir, strerror(errno));
        return errno_to_pq(errno);
    }
    while ((de = readdir(d)) != NULL) {
        if (!parse_seg_name(de->d_name, &seq)) {
            continue;
        }
        if (sc->nseqs == cap) {
            size_t ncap = cap ? cap * 2 : 16;
            uint32_t *n = pq_realloc(sc->seqs, ncap * sizeof(*n));
            if (n == NULL) {
                closedir(d);
                seterr(err, errlen, "scan %s: out of memory", sc->dir);
                return PQ_ENOMEM;
            }
            sc->seqs = n;
            cap = ncap;
        }
        sc->seqs[sc->nseqs++] = seq;
    }
    closedir(d);
    if (sc->nseqs > 0) {
        qsort(sc->seqs, sc->nseqs, sizeof(uint32_t), cmp_u32);
    }
    return PQ_OK;
}

/*
 * map_file: map a whole segment read-only (*buf NULL when empty); release
 * it with unmap_file. A private read-only mapping, not a pq_malloc'ed copy:
 * recovery reads every segment once, and copying gigabytes into freshly
 * zeroed buffers was most of its time.
 */
static int
map_file(const char *path, uint8_t **buf, size_t *len, char *err,
         size_t errlen)
{
    struct stat sb;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    int rc = PQ_OK;
    void *p;

    *buf = NULL;
    *len = 0;
    if (fd < 0) {
        seterr(err, errlen, "open %s: %s", path, strerror(errno));
        return errno_to_pq(errno);
    }
    if (fstat(fd, &sb) < 0) {
        seterr(err, errlen, "stat %s: %s", path, strerror(errno));
        rc = errno_to_pq(errno);
        goto out_close;
    }
    if (sb.st_size == 0) {
        goto out_close;
    }
    p = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
        seterr(err, errlen, "mmap %s: %s", path, strerror(errno));
        rc = errno_to_pq(errno);
        goto out_close;
    }
    (void)madvise(p, (size_t)sb.st_size, MADV_SEQUENTIAL);
    *buf = p;
    *len = (size_t)sb.st_size;
out_close:
    close(fd);
    return rc;
}

static void
unmap_file(uint8_t *buf, size_t len)
{
    if (buf != NULL) {
        munmap(buf, len);
    }
}

static bool
all_zero(const uint8_t *p, size_t n)
{
    /* p[0] == 0 and every byte equals the one before it: one vectorized
     * memcmp instead of a byte loop over each segment's preallocated tail. */
    return n == 0 || (p[0] == 0 && memcmp(p, p + 1, n - 1) == 0);
}

/* has_records: a segment file holds at least one record (anything
 * non-zero after its header). A short or all-zero file holds none. */
static bool mapped_zero(const uint8_t *buf, size_t off, size_t len);

static bool
has_records(const uint8_t *buf, size_t len)
{
    return !mapped_zero(buf, STORE_SEG_HDR_LEN, len);
}

/*
 * mapped_zero: buf[off..len) is all zeros. buf is a file mapping
 * (map_file): check a window at a time and drop each window's pages, so
 * the zero tail of a preallocated segment (which holds the ack reserve:
 * 128 MB with a million live messages) never becomes resident.
 */
static bool
mapped_zero(const uint8_t *buf, size_t off, size_t len)
{
    enum { WINDOW = 8 << 20 };

    while (off < len) {
        size_t end = (off / WINDOW + 1) * (size_t)WINDOW;

        if (end > len) {
            end = len;
        }
        if (!all_zero(buf + off, end - off)) {
            return false;
        }
        (void)madvise((void *)(buf + off / WINDOW * (size_t)WINDOW),
                      end - off / WINDOW * (size_t)WINDOW, MADV_DONTNEED);
        off = end;
    }
    return true;
}

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

static bool
valid_after(const uint8_t *buf, size_t len, size_t off, bool opaque)
{
    uint64_t budget = VALID_AFTER_BUDGET + 16 * (uint64_t)(len - off);

    for (size_t o = off + 1; o + STORE_REC_HDR_LEN <= len; o++) {
        struct record r;
        uint32_t rlen;

        if (buf[o] == 0 && buf[o + 1] == 0 && buf[o + 2] == 0 &&
            buf[o + 3] == 0) {
            continue;
        }
        rlen = rd32(buf + o);
        if (rlen == 0 || rlen > REC_LEN_MAX || rlen > len - o - 8 ||
            (!opaque &&
             record_decode(buf[o + 8], buf + o + 9, rlen - 1, &r) != PQ_OK)) {
            continue;
        }
        if (rlen > budget) {
            return true;
        }
        budget -= rlen;
        if (rd32(buf + o + 4) == crc32c(0, buf + o + 8, rlen)) {
            return true;
        }
    }
    return false;
}

/*
 * scan_segment: verify (and replay) one segment held in buf. last: this is
 * the last segment that holds records, where a torn tail is allowed.
 * Sets *end to the end of the good records. Returns PQ_OK, PQ_ECORRUPT,
 * PQ_EVERSION or the replay callback's error, with err set.
 */
enum { SCAN_RELEASE_BYTES = 8 << 20 }; /* a power of two, page-aligned */

static int
scan_segment(struct scan *sc, uint32_t seq, const char *path,
             const uint8_t *buf, size_t len, bool last, uint64_t *end,
             char *err, size_t errlen)
{
    size_t off = STORE_SEG_HDR_LEN;
    size_t released = 0;          /* pages before this are dropped */
    const char *what;
    uint32_t rlen = 0;

    sc->has_start = false;
    if (len < STORE_SEG_HDR_LEN) {
        seterr(err, errlen, "%s: offset 0: the file is %zu bytes, shorter than a segment header (emptied or truncated); run protoqd --check-data %s (salvage: protoqd --salvage-data %s)",
               path, len, sc->dir, sc->dir);
        goto bad_header;
    }
    if (memcmp(buf, STORE_MAGIC, 8) != 0) {
        seterr(err, errlen, "%s: offset 0: bad segment header (not a protoq log segment); run protoqd --check-data %s (salvage: protoqd --salvage-data %s)",
               path, sc->dir, sc->dir);
        goto bad_header;
    }
    sc->version = rd32(buf + 8);
    if (sc->version < STORE_FORMAT_MIN || sc->version > STORE_FORMAT_VERSION) {
        seterr(err, errlen, "%s: format version %u, this protoqd reads versions %d to %d; use a protoqd that knows it",
               path, sc->version, STORE_FORMAT_MIN, STORE_FORMAT_VERSION);
        return PQ_EVERSION;
    }
    if (rd64(buf + 12) != seq) {
        seterr(err, errlen, "%s: offset 12: header says segment %llu; run protoqd --check-data %s",
               path, (unsigned long long)rd64(buf + 12), sc->dir);
        goto bad_header;
    }
    while (off < len) {
        uint32_t crc;
        uint8_t type;

        if (len - off < 8) {
            if (all_zero(buf + off, len - off)) {
                break;
            }
            what = "short record header";
            goto damage;
        }
        rlen = rd32(buf + off);
        crc = rd32(buf + off + 4);
        if (rlen == 0) {
            if (crc == 0 && mapped_zero(buf, off, len)) {
                break;             /* the clean end: preallocated zeros */
            }
            what = "zero record length";
            goto damage;
        }
        if (rlen > REC_LEN_MAX) {
            what = "record length over the limit";
            goto damage;
        }
        if (rlen > len - off - 8) {
            what = "record runs past the end of the file";
            goto damage;
        }
        if (crc != crc32c(0, buf + off + 8, rlen)) {
            what = "checksum mismatch";
            goto damage;
        }
        type = buf[off + 8];
        sc->counts[type]++;
        sc->records += type != REC_SEG_START;
        sc->bytes += 8 + (uint64_t)rlen;
        if (type == REC_PUBLISH) {
            sc->n_publish++;
        } else if (type == REC_ACK || type == REC_DROP) {
            sc->n_end++;
        }
        if (type == REC_SEG_START) {
            /* The store's own: checked by the caller, never replayed. */
            struct record r;

            if (off == STORE_SEG_HDR_LEN &&
                record_decode(type, buf + off + 9, rlen - 1, &r) == PQ_OK) {
                sc->has_start = true;
                sc->start = r.u.seg_start;
            }
        } else if (!sc->salvage) {
            struct store_loc loc = {.seg = seq, .len = 8 + rlen, .off = off};
            int rc = sc->fn != NULL
                         ? sc->fn(sc->arg, type, buf + off + 9, rlen - 1, &loc)
                         : PQ_OK;

            verify_record(&sc->v, type, buf + off + 9, rlen - 1, &loc);
            if (rc != PQ_OK) {
                seterr(err, errlen, "%s: offset %zu: replay of a %s record failed: %s",
                       path, off, record_type_name(type), pq_strerror(rc));
                return rc;
            }
        }
        off += 8 + (size_t)rlen;
        if (off - released >= SCAN_RELEASE_BYTES) {
            /* buf is a private read-only file mapping (map_file): drop the
             * pages already replayed, so recovery's resident memory does
             * not grow by a whole segment. */
            size_t upto = off & ~(size_t)(SCAN_RELEASE_BYTES - 1);

            (void)madvise((void *)(buf + released), upto - released,
                          MADV_DONTNEED);
            released = upto;
        }
    }
    *end = off;
    return PQ_OK;

bad_header:
    sc->damaged = true;
    sc->damage_seq = seq;
    sc->damage_off = 0;
    return PQ_ECORRUPT;

damage:
    sc->damaged = true;
    sc->damage_seq = seq;
    sc->damage_off = off;
    if (last && !valid_after(buf, len, off, sc->opaque)) {
        sc->torn = true;
        sc->torn_seq = seq;
        sc->torn_off = off;
        sc->torn_dropped = 0;
        /* bytes dropped: up to the last non-zero byte */
        for (size_t i = len; i > off; i--) {
            if (buf[i - 1] != 0) {
                sc->torn_dropped = i - off;
                break;
            }
        }
        *end = off;
        return PQ_OK;
    }
    if (len - off >= 9 && rlen != 0) {
        seterr(err, errlen, "%s: offset %zu: %s (record type %u, length %u)%s; run protoqd --check-data %s",
               path, off, what, buf[off + 8], rlen,
               last ? ", and valid records follow" : "", sc->dir);
    } else {
        seterr(err, errlen, "%s: offset %zu: %s%s; run protoqd --check-data %s",
               path, off, what, last ? ", and valid records follow" : "",
               sc->dir);
    }
    return PQ_ECORRUPT;
}

/* seg_holds_records: whether segment seq of sc->dir holds a record. */
static int
seg_holds_records(const struct scan *sc, uint32_t seq, bool *any, char *err,
                  size_t errlen)
{
    char path[PATH_BUF];
    uint8_t *buf;
    size_t len;
    int rc;

    seg_path(path, sizeof(path), sc->dir, seq);
    rc = map_file(path, &buf, &len, err, errlen);
    if (rc == PQ_OK) {
        *any = has_records(buf, len);
        unmap_file(buf, len);
    }
    return rc;
}

/*
 * plan_meta: with DIR/META, the log is exactly its segments first..last:
 * older files are leftovers of a deletion a crash interrupted, newer ones
 * spares that must hold no record. Every segment in between must be
 * there; a gap is accepted only where a salvage said so (up to floor).
 * Sets sc->lo and sc->nvalid.
 */
static int
plan_meta(struct scan *sc, char *err, size_t errlen)
{
    char path[PATH_BUF];
    const struct meta *m = &sc->meta;
    uint32_t missing = 0;
    size_t i;

    for (i = 0; i < sc->nseqs && sc->seqs[i] < m->first; i++) {
    }
    sc->lo = i;
    for (; i < sc->nseqs && sc->seqs[i] <= m->last; i++) {
    }
    /* Segments just past last that hold records: rolled into after the
     * last META write that reached the disk (a roll does not sync it).
     * They are kept; their links (check_link) must chain back to last. */
    for (; i > sc->lo && i < sc->nseqs && sc->seqs[i] == sc->seqs[i - 1] + 1;
         i++) {
        bool any = false;
        int rc = seg_holds_records(sc, sc->seqs[i], &any, err, errlen);

        if (rc != PQ_OK) {
            return rc;
        }
        if (!any) {
            break;
        }
    }
    sc->nvalid = i;
    /* Gaps inside are found by scan_dir; here the two ends. */
    if (sc->nvalid == sc->lo) {
        missing = m->first;
    } else if (sc->seqs[sc->lo] != m->first && sc->seqs[sc->lo] > m->floor) {
        missing = m->first;
    } else if (sc->seqs[sc->nvalid - 1] < m->last) {
        missing = m->last;
    }
    if (missing != 0) {
        seg_path(path, sizeof(path), sc->dir, missing);
        seterr(err, errlen, "%s: missing: the log runs from segment %u to %u (%s/META) and this one is gone with its records; run protoqd --check-data %s (salvage: protoqd --salvage-data %s)",
               path, m->first, m->last, sc->dir, sc->dir, sc->dir);
        sc->damaged = true;
        sc->damage_seq = missing;
        sc->damage_off = 0;
        return PQ_ECORRUPT;
    }
    sc->spares = sc->nseqs - sc->nvalid;
    for (i = sc->nvalid; i < sc->nseqs; i++) {
        bool any = false;
        int rc = seg_holds_records(sc, sc->seqs[i], &any, err, errlen);

        if (rc != PQ_OK) {
            return rc;
        }
        if (any) {
            seg_path(path, sizeof(path), sc->dir, sc->seqs[i]);
            seterr(err, errlen, "%s: holds records, but the log ends at segment %u (%s/META); run protoqd --check-data %s",
                   path, m->last, sc->dir, sc->dir);
            return PQ_ECORRUPT;
        }
    }
    return PQ_OK;
}

/*
 * plan_legacy: without DIR/META (a data dir of format 1, or a new one
 * before its first record): the kept segments run to the last one that
 * holds records; the later ones are spares. With no records anywhere the
 * first segment is kept if its header is sound. Sets sc->nvalid.
 */
static int
plan_legacy(struct scan *sc, char *err, size_t errlen)
{
    char path[PATH_BUF];
    uint8_t *buf = NULL;
    size_t len = 0;
    int rc;

    for (size_t i = sc->nseqs; i > 0; i--) {
        bool any = false;

        rc = seg_holds_records(sc, sc->seqs[i - 1], &any, err, errlen);
        if (rc != PQ_OK) {
            return rc;
        }
        if (any) {
            sc->nvalid = i;
            sc->spares = sc->nseqs - i;
            return PQ_OK;
        }
    }
    sc->nvalid = 0;
    sc->spares = sc->nseqs;
    if (sc->nseqs == 0) {
        return PQ_OK;
    }
    seg_path(path, sizeof(path), sc->dir, sc->seqs[0]);
    rc = map_file(path, &buf, &len, err, errlen);
    if (rc != PQ_OK) {
        return rc;
    }
    if (len >= STORE_SEG_HDR_LEN && !all_zero(buf, STORE_SEG_HDR_LEN)) {
        sc->nvalid = 1;
        sc->spares = sc->nseqs - 1;
    }
    unmap_file(buf, len);
    return PQ_OK;
}

/*
 * check_link: segment i (just scanned, its records ending at end) against
 * the one before it. A segment of format 2 that holds records begins
 * with a SEG_START naming its predecessor and where that one's records
 * ended: a predecessor that is shorter (truncated, emptied to its header)
 * or another segment than named is damage. The first kept segment's
 * predecessor was deleted with nothing live in it: not checked.
 */
static int
check_link(struct scan *sc, size_t i, uint64_t end, char *err, size_t errlen)
{
    char path[PATH_BUF], prev[PATH_BUF];
    uint32_t seq = sc->seqs[i];

    seg_path(path, sizeof(path), sc->dir, seq);
    if (end > STORE_SEG_HDR_LEN && sc->version >= 2 && !sc->has_start) {
        if (!sc->meta.present) {
            seterr(err, errlen, "%s/META: missing, but %s was written by a protoqd that keeps it; run protoqd --check-data %s (salvage: protoqd --salvage-data %s)",
                   sc->dir, path, sc->dir, sc->dir);
        } else {
            seterr(err, errlen, "%s: offset %d: does not begin with its link record; run protoqd --check-data %s",
                   path, STORE_SEG_HDR_LEN, sc->dir);
        }
        return PQ_ECORRUPT;
    }
    if (!sc->has_start || i == sc->lo || seq <= sc->meta.floor) {
        return PQ_OK;
    }
    sc->links++;
    seg_path(prev, sizeof(prev), sc->dir, sc->seqs[i - 1]);
    if (sc->start.prev_seq != sc->seqs[i - 1]) {
        seterr(err, errlen, "%s: follows segment %u, but the one before it here is %s: a segment is missing; run protoqd --check-data %s (salvage: protoqd --salvage-data %s)",
               path, sc->start.prev_seq, prev, sc->dir, sc->dir);
        return PQ_ECORRUPT;
    }
    if (sc->start.prev_end != sc->end_offs[i - 1]) {
        seterr(err, errlen, "%s: its records end at offset %llu, but %s says they ended at offset %llu: records are missing (truncated or emptied); run protoqd --check-data %s (salvage: protoqd --salvage-data %s)",
               prev, (unsigned long long)sc->end_offs[i - 1], path,
               (unsigned long long)sc->start.prev_end, sc->dir, sc->dir);
        sc->damaged = true;
        sc->damage_seq = sc->seqs[i - 1];
        sc->damage_off = sc->end_offs[i - 1];
        return PQ_ECORRUPT;
    }
    return PQ_OK;
}

/*
 * check_live: every message the records show live must still have its
 * PUBLISH in the log (store_verify.h): one that a state record shows
 * live, with no end recorded, but whose PUBLISH is gone was lost with a
 * segment.
 */
static int
check_live(struct scan *sc, char *err, size_t errlen)
{
    char path[PATH_BUF];
    int rc = verify_finish(&sc->v, &sc->vr);

    if (rc != PQ_OK) {
        seterr(err, errlen, "scan %s: out of memory checking live messages",
               sc->dir);
        return rc;
    }
    if (sc->vr.orphans == 0) {
        return PQ_OK;
    }
    seg_path(path, sizeof(path), sc->dir, sc->vr.orphan_at.seg);
    seterr(err, errlen, "%s: offset %llu: message %llu is live here, but its publish record is not in the log (%llu such messages): a segment that held live messages is missing; run protoqd --check-data %s (salvage: protoqd --salvage-data %s)",
           path, (unsigned long long)sc->vr.orphan_at.off,
           (unsigned long long)sc->vr.orphan_id,
           (unsigned long long)sc->vr.orphans, sc->dir, sc->dir);
    return PQ_ECORRUPT;
}

/*
 * scan_dir: list the segments, read DIR/META, decide which segments form
 * the log (plan_meta / plan_legacy), then verify (and replay) each in
 * order: records, links between segments, and the live messages. Fills
 * sc->end_offs for kept ones.
 */
static int
scan_dir(struct scan *sc, char *err, size_t errlen)
{
    char path[PATH_BUF];
    uint8_t *buf = NULL;
    size_t len = 0;
    int rc;

    rc = list_segments(sc, err, errlen);
    if (rc != PQ_OK) {
        return rc;
    }
    sc->end_offs = pq_calloc(sc->nseqs ? sc->nseqs : 1, sizeof(uint64_t));
    if (sc->end_offs == NULL) {
        seterr(err, errlen, "scan %s: out of memory", sc->dir);
        return PQ_ENOMEM;
    }
    rc = meta_read(sc->dir, &sc->meta, err, errlen);
    if (rc != PQ_OK) {
        return rc;
    }
    verify_init(&sc->v, sc->meta.floor);
    rc = sc->meta.present ? plan_meta(sc, err, errlen)
                          : plan_legacy(sc, err, errlen);
    if (rc != PQ_OK) {
        return rc;
    }
    for (size_t i = sc->lo; i < sc->nvalid; i++) {
        if (i > sc->lo && sc->seqs[i] != sc->seqs[i - 1] + 1 &&
            sc->seqs[i] > sc->meta.floor) {
            seg_path(path, sizeof(path), sc->dir, sc->seqs[i - 1] + 1);
            seterr(err, errlen, "%s: missing: segments %u and %u are here, the ones between are gone with their records; run protoqd --check-data %s (salvage: protoqd --salvage-data %s)",
                   path, sc->seqs[i - 1], sc->seqs[i], sc->dir, sc->dir);
            return PQ_ECORRUPT;
        }
        seg_path(path, sizeof(path), sc->dir, sc->seqs[i]);
        rc = map_file(path, &buf, &len, err, errlen);
        if (rc != PQ_OK) {
            return rc;
        }
        rc = scan_segment(sc, sc->seqs[i], path, buf, len,
                          i == sc->nvalid - 1, &sc->end_offs[i], err, errlen);
        unmap_file(buf, len);
        buf = NULL;
        if (rc == PQ_OK) {
            rc = check_link(sc, i, sc->end_offs[i], err, errlen);
        }
        if (rc != PQ_OK) {
            return rc;
        }
    }
    return sc->salvage || sc->opaque ? PQ_OK : check_live(sc, err, errlen);
}

static void
scan_fini(struct scan *sc)
{
    pq_free(sc->seqs);
    pq_free(sc->end_offs);
    verify_fini(&sc->v);
}

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
    (void)n;                       /* EAGAIN: counter full, still readable */
}

static int
sync_fd(struct store *st, int fd)
{
    uint64_t t0 = now_ns(), dt;
    int rc = io->fdatasync(fd);

    dt = now_ns() - t0;
    pthread_mutex_lock(&st->mu);
    st->stats.fsyncs++;
    st->stats.fsync_ns_total += dt;
    if (dt > st->stats.fsync_ns_max) {
        st->stats.fsync_ns_max = dt;
    }
    pthread_mutex_unlock(&st->mu);
    st->last_sync_ms = now_ms();
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
            (void)io->ftruncate(st->cur_fd, (off_t)st->w_off);
            io->close(st->cur_fd);
        }
        failpoint("segment-roll");
        /* The log now ends at the new segment: say so before its first
         * record, so a recovery that finds it missing or emptied knows.
         * Not synced (a roll costs no extra fsync): a process crash keeps
         * it; after a power loss an older last is fine, since segments
         * past it that hold records are accepted when their links chain
         * back to it (plan_meta). */
        st->meta.last = b->seg;
        if (meta_write(st->meta_fd, &st->meta, false) < 0) {
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
    if (pwrite_all(st->cur_fd, b->data, b->len, b->off) == 0) {
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
        if (io->ftruncate(st->cur_fd, (off_t)b->off) == 0) {
            (void)io->fallocate(st->cur_fd, 0, (off_t)b->alloc);
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
            st->deferred_due_ms = now_ms() + st->cfg.fsync_interval_ms;
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
            sync_now = now_ms() - st->last_sync_ms >= st->cfg.fsync_interval_ms;
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
    uint64_t room = room_for(st, want);
    uint64_t alloc = st->cfg.segment_bytes + room;
    int rc = PQ_OK, fd = st->spare_fd;

    if (fd < 0) {
        rc = seg_create(st->dir, st->dir_fd, seq, alloc, &fd);
    } else {
        int e = io->fallocate(fd, 0, (off_t)alloc);
        rc = e == 0 ? PQ_OK : errno_to_pq(e);
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
        st->spare_retry_ms = now_ms() + SPARE_RETRY_MS;
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
        if (meta_write(st->meta_fd, &m, true) < 0) {
            log_warn("write %s/META: %s; segments not removed", st->dir,
                     strerror(errno));
            return;
        }
        st->meta = m;
    }
    for (size_t i = 0; i < n; i++) {
        seg_path(path, sizeof(path), st->dir, seqs[i]);
        if (io->unlink(path) < 0 && errno != ENOENT) {
            log_warn("remove %s: %s", path, strerror(errno));
            continue;
        }
        /* One segment at a time, durably: the order of deletions matters
         * (store.h, "Deletion"). */
        (void)io->fsync(st->dir_fd);
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

static void *
thread_main(void *arg)
{
    struct store *st = arg;

    pthread_mutex_lock(&st->mu);
    for (;;) {
        uint64_t now = now_ms(), wait_ms = 0;
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
            uint64_t w = st->spare_retry_ms > now ? st->spare_retry_ms - now : 1;
            if (wait_ms == 0 || w < wait_ms) {
                wait_ms = w;
            }
        }
        if (st->def_head != NULL) {
            uint64_t w = st->deferred_due_ms > now ? st->deferred_due_ms - now : 1;
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
    } else if (t != NULL && !p->roll && t->seg == p->seg &&
               t->gen == p->gen && t->off + t->len == p->off) {
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
            t->next = p;           /* no memory: queue it on its own */
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

enum { SEG_START_BODY = 12, SEG_START_REC = STORE_SEG_START_LEN };
_Static_assert(STORE_REC_HDR_LEN + SEG_START_BODY == STORE_SEG_START_LEN,
               "SEG_START size");

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

        wr32(sb, st->start_prev_seq);
        wr64(sb + 4, st->start_prev_end);
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
    wr32(p, (uint32_t)(len + 1));
    wr32(p + 4, rec_crc(type, body, len));
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
        *loc_out = (struct store_loc){.seg = st->cur_seg, .len = (uint32_t)rec,
                                      .off = st->cur_off};
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
    uint64_t resv_after, room_after;
    bool ordinary_fits;
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
    resv_after = st->reserved;
    if (type == REC_PUBLISH) {
        resv_after++;
    } else if (is_terminal(type) && resv_after > 0 &&
               rec <= STORE_ACK_RESERVE) {
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
        if (s->seq == st->cur_seg || s->refs > 0 ||
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
                n = i;             /* try the rest next time */
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
    submit_locked(st);             /* old generation: the thread fails it */
    st->gen++;
    st->cur_seg = st->good_seg;
    st->cur_off = st->good_off;
    st->cur_alloc = st->good_alloc;
    if (st->spare == SPARE_READY && st->spare_taken &&
        st->spare_seq > st->good_seg) {
        st->spare_taken = false;   /* the roll into it never happened */
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
    uint64_t want = st->cfg.segment_bytes + room_for(st, st->reserved *
                                                             STORE_ACK_RESERVE);
    int fd, e;

    seg_path(path, sizeof(path), st->dir, seq);
    fd = io->open(path, O_RDWR | O_CLOEXEC, 0);
    if (fd < 0) {
        seterr(err, errlen, "open %s: %s", path, strerror(errno));
        return errno_to_pq(errno);
    }
    if (fstat(fd, &sb) < 0) {
        e = errno;
        goto err_close;
    }
    if ((uint64_t)sb.st_size < want) {
        /* Best effort: a full disk only means less room ahead. */
        if (io->fallocate(fd, 0, (off_t)want) == 0) {
            sb.st_size = (off_t)want;
        }
    }
    st->cur_fd = fd;
    st->cur_seg = seq;
    st->cur_off = end;
    st->cur_alloc = (uint64_t)sb.st_size > end ? (uint64_t)sb.st_size : end;
    return PQ_OK;

err_close:
    seterr(err, errlen, "stat %s: %s", path, strerror(e));
    io->close(fd);
    return errno_to_pq(e);
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
            log_info("%s: removing it (its deletion was interrupted; the log starts at segment %u)",
                     path, sc->meta.first);
        }
        if (io->unlink(path) < 0 && errno != ENOENT) {
            seterr(err, errlen, "remove %s: %s", path, strerror(errno));
            return errno_to_pq(errno);
        }
    }
    if (sc->torn) {
        seg_path(path, sizeof(path), st->dir, sc->torn_seq);
        log_warn("%s: torn tail at offset %llu: dropped %llu bytes after the last good record",
                 path, (unsigned long long)sc->torn_off,
                 (unsigned long long)sc->torn_dropped);
        fd = io->open(path, O_RDWR | O_CLOEXEC, 0);
        if (fd < 0) {
            seterr(err, errlen, "open %s: %s", path, strerror(errno));
            return errno_to_pq(errno);
        }
        if (io->ftruncate(fd, (off_t)sc->torn_off) < 0 ||
            io->fdatasync(fd) < 0) {
            int e = errno;
            io->close(fd);
            seterr(err, errlen, "truncate %s: %s", path, strerror(e));
            return errno_to_pq(e);
        }
        io->close(fd);
    }
    if ((sc->torn || sc->spares > 0 || sc->lo > 0) &&
        io->fsync(st->dir_fd) < 0) {
        seterr(err, errlen, "fsync %s: %s", st->dir, strerror(errno));
        return errno_to_pq(errno);
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
        io->close(st->cur_fd);
    }
    if (st->spare_fd >= 0) {
        io->close(st->spare_fd);
    }
    if (st->efd >= 0) {
        close(st->efd);
    }
    if (st->meta_fd >= 0) {
        io->close(st->meta_fd);
    }
    if (st->dir_fd >= 0) {
        io->close(st->dir_fd);
    }
    if (st->lock_fd >= 0) {
        close(st->lock_fd);
    }
    pthread_mutex_destroy(&st->mu);
    pthread_cond_destroy(&st->wake);
    pthread_cond_destroy(&st->spare_cv);
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
        seterr(err, errlen, "store: bad config (dir missing or segment_bytes under 4096)");
        return PQ_EINVAL;
    }
    st = pq_calloc(1, sizeof(*st));
    if (st == NULL) {
        seterr(err, errlen, "open data dir %s: out of memory", c->dir);
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
    st->dir = pq_strdup(c->dir);
    if (st->dir == NULL) {
        rc = PQ_ENOMEM;
        seterr(err, errlen, "open data dir %s: out of memory", c->dir);
        goto err_free;
    }
    st->cfg = *c;
    st->cfg.dir = st->dir;

    rc = dir_lock(st->dir, c->read_only, &st->lock_fd, err, errlen);
    if (rc != PQ_OK) {
        goto err_free;
    }
    if (!c->read_only) {
        st->dir_fd = io->open(st->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC, 0);
        if (st->dir_fd < 0) {
            seterr(err, errlen, "open data dir %s: %s", st->dir, strerror(errno));
            rc = errno_to_pq(errno);
            goto err_free;
        }
    }

    sc.dir = st->dir;
    sc.opaque = c->opaque_records;
    sc.fn = fn;
    sc.arg = arg;
    rc = scan_dir(&sc, err, errlen);
    if (rc != PQ_OK) {
        goto err_scan;
    }
    st->reserved = sc.n_publish > sc.n_end ? sc.n_publish - sc.n_end : 0;
    if (sc.vr.dl_orphans > 0) {
        log_warn("%s: %llu dead-lettered messages whose original publish record is gone are not recovered (see README, \"Data directory\")",
                 st->dir, (unsigned long long)sc.vr.dl_orphans);
    }
    for (size_t i = sc.lo; i < sc.nvalid; i++) {
        rc = seg_add(st, sc.seqs[i], sc.end_offs[i]);
        if (rc != PQ_OK) {
            seterr(err, errlen, "open data dir %s: out of memory", st->dir);
            goto err_scan;
        }
    }
    if (c->read_only) {
        st->cur_seg = st->nsegs > 0 ? st->segs[st->nsegs - 1].seq : 0;
        scan_fini(&sc);
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
        uint64_t alloc = st->cfg.segment_bytes + room_for(st, 0);
        seg_path(path, sizeof(path), st->dir, seq);
        rc = seg_create(st->dir, st->dir_fd, seq, alloc, &st->cur_fd);
        if (rc != PQ_OK) {
            seterr(err, errlen, "create %s: %s", path, strerror(errno));
            goto err_scan;
        }
        rc = seg_add(st, seq, STORE_SEG_HDR_LEN);
        if (rc != PQ_OK) {
            seterr(err, errlen, "open data dir %s: out of memory", st->dir);
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
    rc = meta_open(st->dir, st->dir_fd, &st->meta_fd, err, errlen);
    if (rc != PQ_OK) {
        goto err_scan;
    }
    st->meta = sc.meta;
    st->meta.first = st->segs[0].seq;
    st->meta.last = st->cur_seg;
    if (meta_write(st->meta_fd, &st->meta, true) < 0) {
        char path[PATH_BUF];

        meta_path(path, sizeof(path), st->dir);
        seterr(err, errlen, "write %s: %s", path, strerror(errno));
        rc = errno_to_pq(errno);
        goto err_scan;
    }
    scan_fini(&sc);
    sc = (struct scan){0};
    st->w_seg = st->cur_seg;
    st->w_off = st->cur_off;
    st->last_sync_ms = now_ms();
    st->want_room = st->reserved * STORE_ACK_RESERVE;
    st->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (st->efd < 0) {
        seterr(err, errlen, "eventfd: %s", strerror(errno));
        rc = PQ_ESYS;
        goto err_free;
    }
    if (pthread_create(&st->thr, NULL, thread_main, st) != 0) {
        seterr(err, errlen, "start the storage thread: %s", strerror(errno));
        rc = PQ_ESYS;
        goto err_free;
    }
    st->thr_started = true;
    *out = st;
    return PQ_OK;

err_scan:
    scan_fini(&sc);
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
            io->close(st->spare_fd);
            st->spare_fd = -1;
            seg_path(path, sizeof(path), st->dir, st->spare_seq);
            if (io->unlink(path) == 0) {
                (void)io->fsync(st->dir_fd);
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
    struct store *m = (struct store *)st;  /* the mutex is not logical state */
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
    /* A roll will be needed: fine if a spare is ready or on its way. */
    if (sp != SPARE_FAILED && room <= spare_room + st->cfg.segment_bytes &&
        need <= st->cfg.segment_bytes) {
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

    if (s == NULL || s->refs == 0) {
        return;
    }
    s->refs--;
    s->live_bytes = s->live_bytes > bytes ? s->live_bytes - bytes : 0;
    if (s->refs == 0 && s->zero_lsn != UINT64_MAX) {
        s->zero_lsn = st->last_lsn;
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

/* store_get_stats: see store.h. */
void
store_get_stats(struct store *st, struct store_stats *out)
{
    pthread_mutex_lock(&st->mu);
    *out = st->stats;
    pthread_mutex_unlock(&st->mu);
}

/* ==== Read-back ==== */

/* store_read: see store.h. */
int
store_read(struct store *st, const struct store_loc *loc, uint8_t *type,
           uint8_t **body, size_t *len)
{
    char path[PATH_BUF];
    uint8_t hdr[STORE_REC_HDR_LEN];
    uint8_t *b = NULL;
    uint32_t rlen;
    bool written;
    int fd, rc = PQ_OK;

    *body = NULL;
    *len = 0;
    if (loc->len < STORE_REC_HDR_LEN || loc->len - 8 > REC_LEN_MAX) {
        return PQ_EINVAL;
    }
    pthread_mutex_lock(&st->mu);
    written = st->cfg.read_only || loc->seg < st->w_seg ||
              (loc->seg == st->w_seg && loc->off + loc->len <= st->w_off);
    pthread_mutex_unlock(&st->mu);
    if (!written) {
        return PQ_EAGAIN;
    }
    seg_path(path, sizeof(path), st->dir, loc->seg);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return errno == ENOENT ? PQ_ENOTFOUND : errno_to_pq(errno);
    }
    if (pread_all(fd, hdr, sizeof(hdr), loc->off) < 0) {
        rc = errno ? errno_to_pq(errno) : PQ_ECORRUPT;
        goto out_close;
    }
    rlen = rd32(hdr);
    if (rlen != loc->len - 8) {
        rc = PQ_ECORRUPT;
        goto out_close;
    }
    b = pq_malloc(rlen > 1 ? rlen - 1 : 1);
    if (b == NULL) {
        rc = PQ_ENOMEM;
        goto out_close;
    }
    if (rlen > 1 && pread_all(fd, b, rlen - 1, loc->off + 9) < 0) {
        rc = errno ? errno_to_pq(errno) : PQ_ECORRUPT;
        goto err_free;
    }
    if (rd32(hdr + 4) != rec_crc(hdr[8], b, rlen - 1)) {
        rc = PQ_ECORRUPT;
        goto err_free;
    }
    *type = hdr[8];
    *body = b;
    *len = rlen - 1;
    goto out_close;

err_free:
    pq_free(b);
out_close:
    close(fd);
    return rc;
}

/* ==== Offline check ==== */

/* print_summary: what store_check and store_salvage report. */
static void
print_summary(const struct scan *sc, const char *dir, FILE *out, int rc,
              const char *err)
{
    char path[PATH_BUF];

    fprintf(out, "data dir %s\n", dir);
    fprintf(out, "segments: %zu", sc->nvalid - sc->lo);
    if (sc->nvalid > sc->lo) {
        fprintf(out, " (seg %u .. %u)", sc->seqs[sc->lo],
                sc->seqs[sc->nvalid - 1]);
    }
    fprintf(out, ", spare/empty: %zu, leftovers of an interrupted deletion: %zu\n",
            sc->spares, sc->lo);
    if (sc->meta.present) {
        fprintf(out, "log start and end (META): seg %u .. %u", sc->meta.first,
                sc->meta.last);
        if (sc->meta.floor > 0) {
            fprintf(out, "; salvaged: accepted as found up to seg %u",
                    sc->meta.floor);
        }
        fprintf(out, "\n");
    } else {
        fprintf(out, "log start and end (META): not recorded (format 1 data dir, or no record written yet)\n");
    }
    fprintf(out, "segment links checked: %llu\n",
            (unsigned long long)sc->links);
    fprintf(out, "records: %llu (%llu bytes); LSN 1 .. %llu\n",
            (unsigned long long)sc->records, (unsigned long long)sc->bytes,
            (unsigned long long)sc->records);
    for (int t = 0; t < 256; t++) {
        if (sc->counts[t] > 0) {
            fprintf(out, "  %-14s %llu\n", record_type_name((uint8_t)t),
                    (unsigned long long)sc->counts[t]);
        }
    }
    if (rc == PQ_OK && !sc->salvage) {
        fprintf(out, "live messages: %llu", (unsigned long long)sc->vr.live);
        if (sc->vr.live > 0) {
            fprintf(out, " (referencing seg %u .. %u)", sc->vr.min_seg,
                    sc->vr.max_seg);
        }
        fprintf(out, "; live without their publish record: 0\n");
        if (sc->vr.dl_orphans > 0) {
            fprintf(out, "warning: %llu dead letters whose original publish record is gone are not recovered by this version (README, \"Data directory\")\n",
                    (unsigned long long)sc->vr.dl_orphans);
        }
    }
    if (sc->torn) {
        seg_path(path, sizeof(path), dir, sc->torn_seq);
        fprintf(out, "torn tail: %s at offset %llu, %llu bytes (protoqd truncates it at start)\n",
                path, (unsigned long long)sc->torn_off,
                (unsigned long long)sc->torn_dropped);
    } else {
        fprintf(out, "torn tail: none\n");
    }
    if (rc == PQ_OK) {
        fprintf(out, "result: clean\n");
    } else {
        fprintf(out, "result: DAMAGED: %s\n", err[0] ? err : pq_strerror(rc));
    }
}

/* store_check: see store.h. */
int
store_check(const char *dir, FILE *out, char *err, size_t errlen)
{
    struct scan sc = {.dir = dir};
    int lock_fd = -1, rc;

    if (err != NULL && errlen > 0) {
        err[0] = '\0';
    }
    rc = dir_lock(dir, true, &lock_fd, err, errlen);
    if (rc != PQ_OK) {
        return rc;
    }
    rc = scan_dir(&sc, err, errlen);
    print_summary(&sc, dir, out, rc, err != NULL ? err : "");
    scan_fini(&sc);
    if (lock_fd >= 0) {
        close(lock_fd);
    }
    return rc;
}

/* ==== Salvage ==== */

/* copy_file: src into dst (created), synced. Returns 0 or -1 (errno). */
static int
copy_file(const char *src, const char *dst)
{
    uint8_t buf[1 << 16];
    int in = open(src, O_RDONLY | O_CLOEXEC), outfd = -1, rc = -1;
    uint64_t off = 0;
    ssize_t n;

    if (in < 0) {
        return -1;
    }
    outfd = open(dst, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (outfd < 0) {
        goto out;
    }
    while ((n = read(in, buf, sizeof(buf))) > 0) {
        if (pwrite_all(outfd, buf, (size_t)n, off) < 0) {
            goto out;
        }
        off += (uint64_t)n;
    }
    rc = n < 0 ? -1 : fsync(outfd);
out:
    if (outfd >= 0) {
        close(outfd);
    }
    close(in);
    return rc;
}

/* salvage_dir: make (once) DIR/salvage-UNIXTIME where originals go. */
static int
salvage_dir(const char *dir, char *bak, size_t cap, FILE *out)
{
    if (bak[0] != '\0') {
        return 0;
    }
    snprintf(bak, cap, "%s/salvage-%lld", dir, (long long)time(NULL));
    if (mkdir(bak, 0750) < 0 && errno != EEXIST) {
        return -1;
    }
    fprintf(out, "originals of what is changed go to %s\n", bak);
    return 0;
}

/*
 * salvage_segment: keep what segment seq holds that can be read. A file
 * without a sound header is moved to bak; a segment damaged at an offset
 * is cut there (a copy of the whole file goes to bak first). Sets *kept
 * when the segment stays in the log.
 */
static int
salvage_segment(struct scan *sc, uint32_t seq, char *bak, size_t bakcap,
                FILE *out, bool *kept, char *err, size_t errlen)
{
    char path[PATH_BUF], dst[PATH_BUF + 64];
    uint8_t *buf;
    size_t len;
    uint64_t end = 0, cut;
    int rc;

    *kept = false;
    seg_path(path, sizeof(path), sc->dir, seq);
    rc = map_file(path, &buf, &len, err, errlen);
    if (rc != PQ_OK) {
        return rc;
    }
    sc->torn = false;
    sc->damaged = false;
    rc = scan_segment(sc, seq, path, buf, len, true, &end, err, errlen);
    unmap_file(buf, len);
    if (rc == PQ_EVERSION) {
        return rc;
    }
    *kept = rc == PQ_OK;
    if (rc == PQ_OK && !sc->torn) {
        return PQ_OK;          /* sound: nothing to do */
    }
    if (salvage_dir(sc->dir, bak, bakcap, out) < 0) {
        seterr(err, errlen, "mkdir %s: %s", bak, strerror(errno));
        return errno_to_pq(errno);
    }
    snprintf(dst, sizeof(dst), "%s/seg-%010u.log", bak, seq);
    if (rc != PQ_OK && sc->damaged && sc->damage_off == 0) {
        if (rename(path, dst) < 0) {
            seterr(err, errlen, "move %s to %s: %s", path, dst, strerror(errno));
            return errno_to_pq(errno);
        }
        fprintf(out, "moved %s away: %s\n", path, err);
        return PQ_OK;
    }
    *kept = true;
    {
        cut = rc != PQ_OK ? sc->damage_off : sc->torn_off;
        if (copy_file(path, dst) < 0 || truncate(path, (off_t)cut) < 0) {
            seterr(err, errlen, "cut %s at offset %llu: %s", path,
                   (unsigned long long)cut, strerror(errno));
            return errno_to_pq(errno);
        }
        fprintf(out, "cut %s at offset %llu (%zu bytes dropped; the whole file is in %s)\n",
                path, (unsigned long long)cut, len - (size_t)cut, bak);
    }
    return PQ_OK;
}

/* store_salvage: see store.h. */
int
store_salvage(const char *dir, FILE *out, char *err, size_t errlen)
{
    struct scan sc = {.dir = dir, .salvage = true};
    char bak[PATH_BUF] = "";
    struct meta m = {0};
    uint32_t first = 0, last = 0;
    int lock_fd = -1, dir_fd = -1, meta_fd = -1, rc;

    rc = dir_lock(dir, false, &lock_fd, err, errlen);
    if (rc != PQ_OK) {
        return rc;
    }
    rc = list_segments(&sc, err, errlen);
    if (rc != PQ_OK) {
        goto out;
    }
    if (meta_read(dir, &m, err, errlen) != PQ_OK) {
        m = (struct meta){0};  /* rewritten below */
    }
    for (size_t i = 0; i < sc.nseqs; i++) {
        bool kept;

        if (m.present && sc.seqs[i] < m.first) {
            continue;          /* a leftover: the next start removes it */
        }
        rc = salvage_segment(&sc, sc.seqs[i], bak, sizeof(bak), out, &kept,
                             err, errlen);
        if (rc != PQ_OK) {
            goto out;
        }
        if (kept) {
            first = first != 0 ? first : sc.seqs[i];
            last = sc.seqs[i];
        }
    }
    dir_fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dir_fd < 0 || fsync(dir_fd) < 0) {
        seterr(err, errlen, "open data dir %s: %s", dir, strerror(errno));
        rc = errno_to_pq(errno);
        goto out;
    }
    if (first != 0) {
        /* Accept the log as it is now: what came before is not checked
         * any more (gaps, links, live messages up to segment last). */
        rc = meta_open(dir, dir_fd, &meta_fd, err, errlen);
        if (rc != PQ_OK) {
            goto out;
        }
        m.first = first;
        m.last = last;
        m.floor = last;
        if (meta_write(meta_fd, &m, true) < 0) {
            seterr(err, errlen, "write %s/META: %s", dir, strerror(errno));
            rc = errno_to_pq(errno);
            goto out;
        }
        fprintf(out, "the log is now segments %u .. %u, accepted as found (%s/META)\n",
                first, last, dir);
    }
    scan_fini(&sc);
    sc = (struct scan){.dir = dir};
    rc = scan_dir(&sc, err, errlen);
    print_summary(&sc, dir, out, rc, err != NULL ? err : "");
out:
    scan_fini(&sc);
    if (meta_fd >= 0) {
        close(meta_fd);
    }
    if (dir_fd >= 0) {
        close(dir_fd);
    }
    close(lock_fd);
    return rc;
}
