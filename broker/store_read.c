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
    failpoint_delay("store-read");
    seg_path(path, sizeof(path), st->dir, loc->seg);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return errno == ENOENT ? PQ_ENOTFOUND : store_errno_to_pq(errno);
    }
    if (pread_all(fd, hdr, sizeof(hdr), loc->off) < 0) {
        rc = errno ? store_errno_to_pq(errno) : PQ_ECORRUPT;
        goto out_close;
    }
    rlen = le32_get(hdr);
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
    goto out_close;

err_free:
    pq_free(b);
out_close:
    close(fd);
    return rc;
}

/* ==== The reader thread ==== */

static void *
reader_main(void *arg)
{
    struct store *st = arg;
    struct store_rd *r;
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
        r = st->rd_head;
        st->rd_head = r->next;
        if (st->rd_head == NULL) {
            st->rd_tail = NULL;
        }
        pthread_mutex_unlock(&st->mu);

        r->rc = store_read(st, &r->loc, &r->type, &r->body, &r->len);
        r->next = NULL;

        pthread_mutex_lock(&st->mu);
        if (st->rd_done_tail != NULL) {
            st->rd_done_tail->next = r;
        } else {
            st->rd_done_head = r;
        }
        st->rd_done_tail = r;
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
