/*
 * powerloss.c: rewrite a data dir as a power loss would have left it, from
 * the undo journal of protoqd-pl (see powerloss.h, pl_journal.h).
 */
#include "powerloss.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "pl_journal.h"

/* One record as read: its header and where its path and data are. */
struct rec {
    struct pl_rec h;
    const char *path;
    const unsigned char *data;
};

/* One incarnation of a file: from its creation (or the first record that
 * names it) to its removal. */
struct file {
    char path[512];
    bool created; /* by this broker: its name needs a directory fsync */
    uint64_t created_at;
    bool removed;
    uint64_t removed_at;
    const struct rec *removal;
    uint64_t durable; /* records of it numbered below this are synced */
    size_t *idx;      /* its PL_WRITE / PL_SIZE records, in order */
    size_t n, cap;
};

struct plan {
    struct rec *r;
    size_t nr;
    struct file *f;
    size_t nf;
    uint64_t dir_durable; /* names created below this are durable */
};

static void __attribute__((format(printf, 3, 4)))
seterr(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static unsigned char *
slurp(const char *path, size_t *len)
{
    unsigned char *buf = NULL;
    struct stat sb;
    size_t done = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);

    if (fd < 0 || fstat(fd, &sb) < 0) {
        goto out;
    }
    buf = malloc((size_t)sb.st_size + 1);
    if (buf == NULL) {
        goto out;
    }
    while (done < (size_t)sb.st_size) {
        ssize_t r = read(fd, buf + done, (size_t)sb.st_size - done);

        if (r <= 0) {
            free(buf);
            buf = NULL;
            goto out;
        }
        done += (size_t)r;
    }
    *len = done;
out:
    if (fd >= 0) {
        close(fd);
    }
    return buf;
}

/* live: the file incarnation named path that is not removed, or NULL. */
static struct file *
live(struct plan *p, const char *path, size_t plen)
{
    for (size_t i = p->nf; i-- > 0;) {
        struct file *f = &p->f[i];

        if (!f->removed && strlen(f->path) == plen &&
            memcmp(f->path, path, plen) == 0) {
            return f;
        }
    }
    return NULL;
}

static struct file *
add_file(struct plan *p, const struct rec *r)
{
    struct file *f, *nf = realloc(p->f, (p->nf + 1) * sizeof(*p->f));

    if (nf == NULL) {
        return NULL;
    }
    p->f = nf;
    f = &p->f[p->nf++];
    memset(f, 0, sizeof(*f));
    snprintf(f->path, sizeof(f->path), "%.*s", (int)r->h.path_len, r->path);
    return f;
}

/* parse: split the journal into records and files. A torn last record
 * is dropped (its I/O had not begun). */
static int
parse(struct plan *p, const unsigned char *buf, size_t len)
{
    size_t at = 0;

    while (at + sizeof(struct pl_rec) <= len) {
        struct rec r;
        struct file *f;

        memcpy(&r.h, buf + at, sizeof(r.h));
        if (r.h.data_len > len || r.h.path_len > sizeof(f->path) - 1 ||
            at + sizeof(r.h) + r.h.path_len + r.h.data_len > len) {
            break;
        }
        r.path = (const char *)buf + at + sizeof(r.h);
        r.data = buf + at + sizeof(r.h) + r.h.path_len;
        at += sizeof(r.h) + r.h.path_len + r.h.data_len;
        {
            struct rec *nr = realloc(p->r, (p->nr + 1) * sizeof(*p->r));

            if (nr == NULL) {
                return -1;
            }
            p->r = nr;
            p->r[p->nr++] = r;
        }
    }
    /* files (after the array stops moving: removal points into it) */
    for (size_t i = 0; i < p->nr; i++) {
        const struct rec *r = &p->r[i];
        struct file *f = live(p, r->path, r->h.path_len);

        switch (r->h.type) {
        case PL_CREATE:
            if (f != NULL) { /* created again: the old one is replaced */
                f->removed = true;
                f->removed_at = i;
            }
            f = add_file(p, r);
            if (f == NULL) {
                return -1;
            }
            f->created = true;
            f->created_at = i;
            break;
        case PL_WRITE:
        case PL_SIZE:
            if (f == NULL && (f = add_file(p, r)) == NULL) {
                return -1;
            }
            if (f->n == f->cap) {
                size_t cap = f->cap ? 2 * f->cap : 16;
                size_t *ni = realloc(f->idx, cap * sizeof(*ni));

                if (ni == NULL) {
                    return -1;
                }
                f->idx = ni;
                f->cap = cap;
            }
            f->idx[f->n++] = i;
            break;
        case PL_UNLINK:
            if (f == NULL && (f = add_file(p, r)) == NULL) {
                return -1;
            }
            f->removed = true;
            f->removed_at = i;
            f->removal = r;
            break;
        case PL_SYNC:
            if (f != NULL && r->h.upto > f->durable) {
                f->durable = r->h.upto;
            }
            break;
        case PL_DIRSYNC:
            if (r->h.upto > p->dir_durable) {
                p->dir_durable = r->h.upto;
            }
            break;
        default:
            return -1;
        }
    }
    return 0;
}

static int
pwrite_all(int fd, const unsigned char *b, size_t n, uint64_t off)
{
    while (n > 0) {
        ssize_t w = pwrite(fd, b, n, (off_t)off);

        if (w <= 0) {
            return -1;
        }
        b += w;
        n -= (size_t)w;
        off += (uint64_t)w;
    }
    return 0;
}

/* undo: record r of fd's file, except its first keep bytes (a torn
 * write keeps a prefix). */
static int
undo(int fd, const struct pl_rec *h, const unsigned char *data, uint64_t keep)
{
    if (h->type == PL_SIZE) {
        if (ftruncate(fd, (off_t)h->old_size) < 0) {
            return -1;
        }
        return h->len < h->old_size ? pwrite_all(fd, data, h->data_len, h->len)
                                    : 0;
    }
    /* PL_WRITE: the old bytes back, from off + keep */
    if (keep < h->data_len &&
        pwrite_all(fd, data + keep, h->data_len - keep, h->off + keep) < 0) {
        return -1;
    }
    if (h->off + h->len > h->old_size) {
        uint64_t to = h->off + keep > h->old_size ? h->off + keep : h->old_size;

        if (ftruncate(fd, (off_t)to) < 0) {
            return -1;
        }
    }
    return 0;
}

/* crash_file: what a power loss leaves of f. */
static int
crash_file(struct plan *p, struct file *f, unsigned *seed, bool all,
           struct pl_result *res, char *err, size_t errlen)
{
    size_t first = f->n, k, nw;
    size_t torn_part = 0;
    bool torn = false;
    int fd = -1, rc = -1;

    if (f->created && f->created_at >= p->dir_durable) {
        if (unlink(f->path) == 0) {
            res->vanished++;
        } else if (errno != ENOENT) { /* ENOENT: removed already */
            seterr(err, errlen, "unlink %s: %s", f->path, strerror(errno));
            return -1;
        }
        return 0;
    }
    if (f->removed && (f->removed_at < p->dir_durable || f->removal == NULL)) {
        return 0; /* gone for good (or replaced by a later creation) */
    }
    if (f->removed) {
        const struct pl_rec *h = &f->removal->h;

        fd = open(f->path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd < 0 || pwrite_all(fd, f->removal->data, h->data_len, 0) < 0) {
            seterr(err, errlen, "revive %s: %s", f->path, strerror(errno));
            goto out;
        }
        res->revived++;
    } else {
        fd = open(f->path, O_RDWR | O_CLOEXEC);
        if (fd < 0) {
            seterr(err, errlen, "open %s: %s", f->path, strerror(errno));
            goto out;
        }
    }
    /* the records no sync covered: a suffix */
    while (first > 0 && f->idx[first - 1] >= f->durable) {
        first--;
    }
    nw = f->n - first;
    res->unsynced += (long)nw;
    /* as pl_apply_crash: k of them reached the disk, the next maybe torn */
    k = nw && !all ? (size_t)rand_r(seed) % (nw + 1) : 0;
    if (k < nw && !all && rand_r(seed) % 2 == 0) {
        const struct pl_rec *h = &p->r[f->idx[first + k]].h;

        torn_part = h->len ? (size_t)rand_r(seed) % h->len : 0;
        torn = h->type == PL_WRITE && torn_part > 0;
    }
    for (size_t j = nw; j-- > k;) {
        const struct rec *r = &p->r[f->idx[first + j]];

        if (undo(fd, &r->h, r->data, j == k && torn ? torn_part : 0) < 0) {
            seterr(err, errlen, "undo in %s: %s", f->path, strerror(errno));
            goto out;
        }
        res->undone++;
    }
    res->torn += torn;
    rc = 0;
out:
    if (fd >= 0) {
        close(fd);
    }
    return rc;
}

/* pl_apply: see powerloss.h. */
int
pl_apply(const char *journal, unsigned seed, bool all, struct pl_result *res,
         char *err, size_t errlen)
{
    struct plan p = {0};
    unsigned char *buf;
    size_t len = 0;
    int rc = -1;

    buf = slurp(journal, &len);
    if (buf == NULL) {
        seterr(err, errlen, "read %s: %s", journal, strerror(errno));
        return -1;
    }
    if (parse(&p, buf, len) != 0) {
        seterr(err, errlen, "%s: bad record after %zu", journal, p.nr);
        goto out;
    }
    res->records += (long)p.nr;
    for (size_t i = 0; i < p.nf; i++) {
        if (crash_file(&p, &p.f[i], &seed, all, res, err, errlen) != 0) {
            goto out;
        }
    }
    rc = 0;
out:
    for (size_t i = 0; i < p.nf; i++) {
        free(p.f[i].idx);
    }
    free(p.f);
    free(p.r);
    free(buf);
    return rc;
}

/* pl_binary: see powerloss.h. */
const char *
pl_binary(void)
{
    static char derived[PATH_MAX];
    const char *pl = getenv("PROTOQD_PL"), *d = getenv("PROTOQD");

    if (pl == NULL || pl[0] == '\0') {
        const char *slash;

        d = d && d[0] ? d : "build/protoqd";
        slash = strrchr(d, '/');
        snprintf(derived, sizeof(derived), "%.*stests/model/protoqd-pl",
                 slash ? (int)(slash - d + 1) : 0, d);
        pl = derived;
    }
    return access(pl, X_OK) == 0 ? pl : NULL;
}
