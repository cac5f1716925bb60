/*
 * pl_seam.c: the power-loss seam of the test build of protoqd
 * (build/tests/model/protoqd-pl: the broker's objects plus this one; the
 * production protoqd never links it). When PROTOQD_PL_JOURNAL names a
 * file, a constructor installs a store_io (broker/store.h) that writes an
 * undo journal (pl_journal.h) before every pwrite, ftruncate and fallocate
 * of the store and after every fdatasync/fsync, so that the model test can
 * turn the data dir that a kill -9 left into the one a power loss would
 * have left (powerloss.c). Without the variable it does nothing.
 *
 * The storage thread and the reader thread both make I/O calls: one mutex
 * orders each journal record with the call it describes. A sync is not
 * done under it: the records it covers are those written before it began.
 */
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sysexits.h>
#include <unistd.h>

#include "pl_journal.h"
#include "store.h"

enum { PL_MAX_FD = 1 << 16 };

static struct {
    pthread_mutex_t mu;
    int jfd;
    uint64_t nrec; /* records written so far */
} pl = {.mu = PTHREAD_MUTEX_INITIALIZER, .jfd = -1};
/* fd -> path of what the store opened through the seam, and whether it is
 * a directory (under pl.mu) */
static char *fd_paths[PL_MAX_FD];
static bool fd_dir[PL_MAX_FD];

static struct store_io pl_io;

/* pl_die: the seam cannot keep its promise; a silent gap would make the
 * test pass on a journal that lies. */
static void __attribute__((noreturn)) pl_die(const char *what, const char *path)
{
    fprintf(stderr, "protoqd-pl: %s %s: %s\n", what, path ? path : "",
            strerror(errno));
    abort();
}

/* put: append one record (under pl.mu). */
static void
put(struct pl_rec r, const char *path, const void *data)
{
    size_t n, done = 0;
    unsigned char *buf;

    r.path_len = path ? (uint32_t)strlen(path) : 0;
    n = sizeof(r) + r.path_len + r.data_len;
    buf = malloc(n);
    if (buf == NULL) {
        pl_die("journal record for", path);
    }
    memcpy(buf, &r, sizeof(r));
    if (r.path_len > 0) {
        memcpy(buf + sizeof(r), path, r.path_len);
    }
    if (r.data_len > 0) {
        memcpy(buf + sizeof(r) + r.path_len, data, r.data_len);
    }
    while (done < n) {
        ssize_t w = write(pl.jfd, buf + done, n - done);

        if (w < 0 && errno == EINTR) {
            continue;
        }
        if (w <= 0) {
            pl_die("write journal for", path);
        }
        done += (size_t)w;
    }
    free(buf);
    pl.nrec++;
}

/* read_old: the bytes of fd in [from, to) into a new buffer. */
static unsigned char *
read_old(int fd, uint64_t from, uint64_t to, const char *path)
{
    size_t n = (size_t)(to - from), done = 0;
    unsigned char *b = malloc(n > 0 ? n : 1);

    if (b == NULL) {
        pl_die("old bytes of", path);
    }
    while (done < n) {
        ssize_t r = pread(fd, b + done, n - done, (off_t)(from + done));

        if (r < 0 && errno == EINTR) {
            continue;
        }
        if (r <= 0) {
            pl_die("read old bytes of", path);
        }
        done += (size_t)r;
    }
    return b;
}

static uint64_t
fd_size(int fd, const char *path)
{
    struct stat sb;

    if (fstat(fd, &sb) < 0) {
        pl_die("fstat", path);
    }
    return (uint64_t)sb.st_size;
}

static const char *
fd_path(int fd)
{
    if (fd < 0 || fd >= PL_MAX_FD || fd_paths[fd] == NULL) {
        errno = EBADF;
        pl_die("I/O on an fd not opened through the seam", NULL);
    }
    return fd_paths[fd];
}

/* size_change: journal fd's size going to new_size (under pl.mu). */
static void
size_change(int fd, const char *path, uint64_t new_size)
{
    uint64_t old = fd_size(fd, path);
    struct pl_rec r = {.type = PL_SIZE, .len = new_size, .old_size = old};
    unsigned char *cut = NULL;

    if (new_size < old) {
        cut = read_old(fd, new_size, old, path);
        r.data_len = old - new_size;
    }
    put(r, path, cut);
    free(cut);
}

static int
pl_open(const char *path, int flags, mode_t mode)
{
    struct stat sb;
    bool exists;
    int fd;

    pthread_mutex_lock(&pl.mu);
    exists = stat(path, &sb) == 0;
    if (!exists && (flags & O_CREAT)) {
        put((struct pl_rec){.type = PL_CREATE}, path, NULL);
    } else if (exists && (flags & O_TRUNC) && S_ISREG(sb.st_mode)) {
        int old = open(path, O_RDONLY | O_CLOEXEC);

        if (old < 0) {
            pl_die("open old", path);
        }
        size_change(old, path, 0);
        close(old);
    }
    fd = open(path, flags, mode);
    if (fd >= PL_MAX_FD) {
        pl_die("fd out of the seam's range for", path);
    }
    if (fd >= 0) {
        fd_paths[fd] = strdup(path);
        if (fd_paths[fd] == NULL) {
            pl_die("strdup", path);
        }
        fd_dir[fd] = (flags & O_DIRECTORY) != 0;
    }
    pthread_mutex_unlock(&pl.mu);
    return fd;
}

static int
pl_close(int fd)
{
    pthread_mutex_lock(&pl.mu);
    if (fd >= 0 && fd < PL_MAX_FD) {
        free(fd_paths[fd]);
        fd_paths[fd] = NULL;
    }
    pthread_mutex_unlock(&pl.mu);
    return close(fd);
}

static ssize_t
pl_pwrite(int fd, const void *buf, size_t n, off_t off)
{
    const char *path;
    struct pl_rec r = {.type = PL_WRITE, .off = (uint64_t)off, .len = n};
    unsigned char *old = NULL;
    ssize_t w;
    int e;

    pthread_mutex_lock(&pl.mu);
    path = fd_path(fd);
    r.old_size = fd_size(fd, path);
    if (r.off < r.old_size) {
        uint64_t to = r.off + n < r.old_size ? r.off + n : r.old_size;

        old = read_old(fd, r.off, to, path);
        r.data_len = to - r.off;
    }
    put(r, path, old);
    free(old);
    w = pwrite(fd, buf, n, off);
    e = errno;
    pthread_mutex_unlock(&pl.mu);
    errno = e;
    return w;
}

static int
pl_ftruncate(int fd, off_t len)
{
    int rc, e;

    pthread_mutex_lock(&pl.mu);
    size_change(fd, fd_path(fd), (uint64_t)len);
    rc = ftruncate(fd, len);
    e = errno;
    pthread_mutex_unlock(&pl.mu);
    errno = e;
    return rc;
}

/* posix_fallocate's contract: returns 0 or an errno value. */
static int
pl_fallocate(int fd, off_t off, off_t len)
{
    const char *path;
    uint64_t old, end = (uint64_t)off + (uint64_t)len;
    int rc;

    pthread_mutex_lock(&pl.mu);
    path = fd_path(fd);
    old = fd_size(fd, path);
    size_change(fd, path, end > old ? end : old);
    rc = posix_fallocate(fd, off, len);
    pthread_mutex_unlock(&pl.mu);
    return rc;
}

/* synced: after a sync of fd that began when upto records were written. */
static int
synced(int fd, int rc, uint64_t upto)
{
    int e = errno;

    if (rc == 0) {
        struct pl_rec r = {.upto = upto};
        const char *path;

        pthread_mutex_lock(&pl.mu);
        path = fd_path(fd);
        r.type = fd_dir[fd] ? PL_DIRSYNC : PL_SYNC;
        put(r, path, NULL);
        pthread_mutex_unlock(&pl.mu);
    }
    errno = e;
    return rc;
}

static uint64_t
sync_begins(void)
{
    uint64_t upto;

    pthread_mutex_lock(&pl.mu);
    upto = pl.nrec;
    pthread_mutex_unlock(&pl.mu);
    return upto;
}

static int
pl_fdatasync(int fd)
{
    uint64_t upto = sync_begins();

    return synced(fd, fdatasync(fd), upto);
}

static int
pl_fsync(int fd)
{
    uint64_t upto = sync_begins();

    return synced(fd, fsync(fd), upto);
}

/* The record keeps what the file held: a power loss before the next
 * directory fsync brings it back. */
static int
pl_unlink(const char *path)
{
    struct pl_rec r = {.type = PL_UNLINK};
    unsigned char *content = NULL;
    int rc, e, fd;

    pthread_mutex_lock(&pl.mu);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        r.old_size = fd_size(fd, path);
        content = read_old(fd, 0, r.old_size, path);
        r.data_len = r.old_size;
        close(fd);
    }
    put(r, path, content);
    free(content);
    rc = unlink(path);
    e = errno;
    pthread_mutex_unlock(&pl.mu);
    errno = e;
    return rc;
}

/* The store renames nothing through the seam today; one that did would
 * need a record, so refuse to run rather than journal a lie. */
static int
pl_rename(const char *from, const char *to)
{
    (void)to;
    errno = ENOSYS;
    pl_die("rename (not journaled)", from);
}

__attribute__((constructor)) static void
pl_seam_init(void)
{
    const char *jpath = getenv(PL_JOURNAL_ENV);

    if (jpath == NULL || jpath[0] == '\0') {
        return;
    }
    pl.jfd =
        open(jpath, O_WRONLY | O_CREAT | O_TRUNC | O_APPEND | O_CLOEXEC, 0644);
    if (pl.jfd < 0) {
        fprintf(stderr, "protoqd-pl: open %s: %s\n", jpath, strerror(errno));
        _exit(EX_OSERR);
    }
    pl_io = *store_io_real();
    pl_io.open = pl_open;
    pl_io.close = pl_close;
    pl_io.pwrite = pl_pwrite;
    pl_io.fdatasync = pl_fdatasync;
    pl_io.fsync = pl_fsync;
    pl_io.fallocate = pl_fallocate;
    pl_io.ftruncate = pl_ftruncate;
    pl_io.rename = pl_rename;
    pl_io.unlink = pl_unlink;
    store_set_io(&pl_io);
}

__attribute__((destructor)) static void
pl_seam_fini(void)
{
    if (pl.jfd >= 0) {
        close(pl.jfd);
        pl.jfd = -1;
    }
}
