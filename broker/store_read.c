/*
 * store_read.c: reading records back. store_read is a pread and a CRC check
 * on the caller's thread; it may run on any thread (the segment is opened
 * by path, and what was written is read under st->mu). The reader thread
 * runs store_read for the loop: store_read_submit queues a read, the
 * thread does it and posts it back through the store's eventfd, and
 * store_read_reap hands finished reads to the loop, so a payload evicted to
 * disk is fetched without stopping the loop. The thread starts at the first
 * submit; reads are done in submission order.
 */
#include "store_int.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include "byteorder.h"
#include "failpoint.h"
#include "mem.h"
#include "pqerr.h"

/* A read the loop asked for: queued, then done, then reaped. */
struct store_rd {
    struct store_rd *next;
    uint64_t tag;
    struct store_loc loc;
    int rc;
    uint8_t type;
    uint8_t *body;
    size_t len;
};

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
            errno = 0; /* short file */
            return -1;
        }
        p += r;
        n -= (size_t)r;
        off += (uint64_t)r;
    }
    return 0;
}

/* An open segment for reading, kept across the reads of one batch. */
struct seg_fd {
    uint32_t seg; /* 0: none */
    int fd;
};

/* read_at: the record at loc, read through sf (opened or switched to
 * loc->seg as needed); the same results as store_read. */
static int
read_at(struct store *st, struct seg_fd *sf, const struct store_loc *loc,
        uint8_t *type, uint8_t **body, size_t *len)
{
    char path[PATH_BUF];
    uint8_t hdr[STORE_REC_HDR_LEN];
    uint8_t *b = NULL;
    uint32_t rlen;
    bool written;
    int rc = PQ_OK;

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
    failpoint_delay("store-read");
    if (sf->seg != loc->seg) {
        if (sf->seg != 0) {
            close(sf->fd);
            sf->seg = 0;
        }
        seg_path(path, sizeof(path), st->dir, loc->seg);
        sf->fd = open(path, O_RDONLY | O_CLOEXEC);
        if (sf->fd < 0) {
            return errno == ENOENT ? PQ_ENOTFOUND : store_errno_to_pq(errno);
        }
        sf->seg = loc->seg;
    }
    if (pread_all(sf->fd, hdr, sizeof(hdr), loc->off) < 0) {
        return errno ? store_errno_to_pq(errno) : PQ_ECORRUPT;
    }
    rlen = le32_get(hdr);
    if (rlen != loc->len - 8) {
        return PQ_ECORRUPT;
    }
    b = pq_malloc(rlen > 1 ? rlen - 1 : 1);
    if (b == NULL) {
        return PQ_ENOMEM;
    }
    if (rlen > 1 && pread_all(sf->fd, b, rlen - 1, loc->off + 9) < 0) {
        rc = errno ? store_errno_to_pq(errno) : PQ_ECORRUPT;
        goto err_free;
    }
    if (le32_get(hdr + 4) != rec_crc(hdr[8], b, rlen - 1)) {
        rc = PQ_ECORRUPT;
        goto err_free;
    }
    *type = hdr[8];
    *body = b;
    *len = rlen - 1;
    return PQ_OK;

err_free:
    pq_free(b);
    return rc;
}

static void
seg_fd_close(struct seg_fd *sf)
{
    if (sf->seg != 0) {
        close(sf->fd);
        sf->seg = 0;
    }
}

/* store_read: see store.h. */
int
store_read(struct store *st, const struct store_loc *loc, uint8_t *type,
           uint8_t **body, size_t *len)
{
    struct seg_fd sf = {0, -1};
    int rc = read_at(st, &sf, loc, type, body, len);

    seg_fd_close(&sf);
    return rc;
}

/* ==== The reader thread ==== */

static void *
reader_main(void *arg)
{
    struct store *st = arg;
    struct store_rd *list, *last, *r;
    struct seg_fd sf = {0, -1};
    uint64_t one = 1;
    ssize_t n;

    pthread_mutex_lock(&st->mu);
    for (;;) {
        while (!st->rd_stop && st->rd_head == NULL) {
            pthread_cond_wait(&st->rd_wake, &st->mu);
        }
        if (st->rd_stop) {
            break;
        }
        /* Everything asked for so far, in one go: one lock round and one
         * wakeup of the loop for the batch, and a segment opened once for
         * its consecutive reads. */
        list = st->rd_head;
        st->rd_head = st->rd_tail = NULL;
        pthread_mutex_unlock(&st->mu);

        last = NULL;
        for (r = list; r != NULL; r = r->next) {
            r->rc = read_at(st, &sf, &r->loc, &r->type, &r->body, &r->len);
            last = r;
        }
        seg_fd_close(&sf); /* a segment may be deleted once its reads end */

        pthread_mutex_lock(&st->mu);
        if (st->rd_done_tail != NULL) {
            st->rd_done_tail->next = list;
        } else {
            st->rd_done_head = list;
        }
        st->rd_done_tail = last;
        n = write(st->efd, &one, sizeof(one));
        (void)n; /* EAGAIN: counter full, still readable */
    }
    pthread_mutex_unlock(&st->mu);
    return NULL;
}

/* store_read_submit: see store.h. */
int
store_read_submit(struct store *st, uint64_t tag, const struct store_loc *loc)
{
    struct store_rd *r;

    if (st->efd < 0) {
        return PQ_EINVAL;
    }
    if (!st->rd_started) {
        if (pthread_create(&st->rd_thr, NULL, reader_main, st) != 0) {
            return PQ_ENOMEM;
        }
        st->rd_started = true;
    }
    r = pq_calloc(1, sizeof(*r));
    if (r == NULL) {
        return PQ_ENOMEM;
    }
    r->tag = tag;
    r->loc = *loc;
    pthread_mutex_lock(&st->mu);
    if (st->rd_tail != NULL) {
        st->rd_tail->next = r;
    } else {
        st->rd_head = r;
    }
    st->rd_tail = r;
    pthread_cond_signal(&st->rd_wake);
    pthread_mutex_unlock(&st->mu);
    return PQ_OK;
}

/* store_read_reap: see store.h. */
void
store_read_reap(struct store *st, store_read_fn fn, void *arg)
{
    struct store_rd *list, *r;

    pthread_mutex_lock(&st->mu);
    list = st->rd_done_head;
    st->rd_done_head = st->rd_done_tail = NULL;
    pthread_mutex_unlock(&st->mu);
    while ((r = list) != NULL) {
        list = r->next;
        fn(arg, r->tag, &r->loc, r->rc, r->type, r->body, r->len);
        pq_free(r);
    }
}

static void
free_reads(struct store_rd *r)
{
    while (r != NULL) {
        struct store_rd *next = r->next;

        pq_free(r->body);
        pq_free(r);
        r = next;
    }
}

/* store_reader_stop: see store_int.h. */
void
store_reader_stop(struct store *st)
{
    if (st->rd_started) {
        pthread_mutex_lock(&st->mu);
        st->rd_stop = true;
        pthread_cond_signal(&st->rd_wake);
        pthread_mutex_unlock(&st->mu);
        pthread_join(st->rd_thr, NULL);
        st->rd_started = false;
    }
    free_reads(st->rd_head);
    free_reads(st->rd_done_head);
    st->rd_head = st->rd_tail = NULL;
    st->rd_done_head = st->rd_done_tail = NULL;
}
