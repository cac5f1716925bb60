/*
 * store_recover.c: reading a data dir back: listing and scanning segments
 * (torn tail or damage), checking META, segment links and that every live
 * message kept its publish record; the offline check (protoqd
 * --check-data) and salvage (--salvage-data).
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
        store_seterr(err, errlen, "open data dir %s: %s", sc->dir,
                     strerror(errno));
        return store_errno_to_pq(errno);
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
                store_seterr(err, errlen, "scan %s: out of memory", sc->dir);
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
map_file(const char *path, uint8_t **buf, size_t *len, char *err, size_t errlen)
{
    struct stat sb;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    int rc = PQ_OK;
    void *p;

    *buf = NULL;
    *len = 0;
    if (fd < 0) {
        store_seterr(err, errlen, "open %s: %s", path, strerror(errno));
        return store_errno_to_pq(errno);
    }
    if (fstat(fd, &sb) < 0) {
        store_seterr(err, errlen, "stat %s: %s", path, strerror(errno));
        rc = store_errno_to_pq(errno);
        goto out_close;
    }
    if (sb.st_size == 0) {
        goto out_close;
    }
    p = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
        store_seterr(err, errlen, "mmap %s: %s", path, strerror(errno));
        rc = store_errno_to_pq(errno);
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

bool
store_all_zero(const uint8_t *p, size_t n)
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
        if (!store_all_zero(buf + off, end - off)) {
            return false;
        }
        (void)madvise((void *)(buf + off / WINDOW * (size_t)WINDOW),
                      end - off / WINDOW * (size_t)WINDOW, MADV_DONTNEED);
        off = end;
    }
    return true;
}

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
        rlen = le32_get(buf + o);
        if (rlen == 0 || rlen > REC_LEN_MAX || rlen > len - o - 8 ||
            (!opaque &&
             record_decode(buf[o + 8], buf + o + 9, rlen - 1, &r) != PQ_OK)) {
            continue;
        }
        if (rlen > budget) {
            return true;
        }
        budget -= rlen;
        if (le32_get(buf + o + 4) == crc32c(0, buf + o + 8, rlen)) {
            return true;
        }
    }
    return false;
}

static int
scan_segment(struct scan *sc, uint32_t seq, const char *path,
             const uint8_t *buf, size_t len, bool last, uint64_t *end,
             char *err, size_t errlen)
{
    size_t off = STORE_SEG_HDR_LEN;
    size_t released = 0; /* pages before this are dropped */
    const char *what;
    uint32_t rlen = 0;

    sc->has_start = false;
    if (len < STORE_SEG_HDR_LEN) {
        store_seterr(err, errlen,
                     "%s: offset 0: the file is %zu bytes, shorter than a "
                     "segment header (emptied or truncated); run protoqd "
                     "--check-data %s (salvage: protoqd --salvage-data %s)",
                     path, len, sc->dir, sc->dir);
        goto bad_header;
    }
    if (memcmp(buf, STORE_MAGIC, 8) != 0) {
        store_seterr(
            err, errlen,
            "%s: offset 0: bad segment header (not a protoq log segment); run "
            "protoqd --check-data %s (salvage: protoqd --salvage-data %s)",
            path, sc->dir, sc->dir);
        goto bad_header;
    }
    sc->version = le32_get(buf + 8);
    if (sc->version < STORE_FORMAT_MIN || sc->version > STORE_FORMAT_VERSION) {
        store_seterr(err, errlen,
                     "%s: format version %u, this protoqd reads versions %d to "
                     "%d; use a protoqd that knows it",
                     path, sc->version, STORE_FORMAT_MIN, STORE_FORMAT_VERSION);
        return PQ_EVERSION;
    }
    if (le64_get(buf + 12) != seq) {
        store_seterr(err, errlen,
                     "%s: offset 12: header says segment %llu; run protoqd "
                     "--check-data %s",
                     path, (unsigned long long)le64_get(buf + 12), sc->dir);
        goto bad_header;
    }
    while (off < len) {
        uint32_t crc;
        uint8_t type;

        if (len - off < 8) {
            if (store_all_zero(buf + off, len - off)) {
                break;
            }
            what = "short record header";
            goto damage;
        }
        rlen = le32_get(buf + off);
        crc = le32_get(buf + off + 4);
        if (rlen == 0) {
            if (crc == 0 && mapped_zero(buf, off, len)) {
                break; /* the clean end: preallocated zeros */
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
        sc->n_publish += record_publishes(type, buf + off + 9, rlen - 1);
        if (type == REC_ACK || type == REC_DROP) {
            sc->n_end++;
        } else if (type == REC_ATOMIC) {
            struct record ar;

            if (record_decode(type, buf + off + 9, rlen - 1, &ar) == PQ_OK) {
                sc->n_publish += ar.u.atomic.n;
                sc->n_end += ar.u.atomic.inner_type != REC_DEAD_LETTER;
            }
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

            if (!sc->caller_checks_live) {
                verify_record(&sc->v, type, buf + off + 9, rlen - 1, &loc);
            }
            if (rc != PQ_OK) {
                store_seterr(err, errlen,
                             "%s: offset %zu: replay of a %s record failed: %s",
                             path, off, record_type_name(type),
                             pq_strerror(rc));
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
        store_seterr(err, errlen,
                     "%s: offset %zu: %s (record type %u, length %u)%s; run "
                     "protoqd --check-data %s",
                     path, off, what, buf[off + 8], rlen,
                     last ? ", and valid records follow" : "", sc->dir);
    } else {
        store_seterr(
            err, errlen, "%s: offset %zu: %s%s; run protoqd --check-data %s",
            path, off, what, last ? ", and valid records follow" : "", sc->dir);
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
        store_seterr(
            err, errlen,
            "%s: missing: the log runs from segment %u to %u (%s/META) and "
            "this one is gone with its records; run protoqd --check-data %s "
            "(salvage: protoqd --salvage-data %s)",
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
            store_seterr(err, errlen,
                         "%s: holds records, but the log ends at segment %u "
                         "(%s/META); run protoqd --check-data %s",
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
    if (len >= STORE_SEG_HDR_LEN && !store_all_zero(buf, STORE_SEG_HDR_LEN)) {
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
            store_seterr(err, errlen,
                         "%s/META: missing, but %s was written by a protoqd "
                         "that keeps it; run protoqd --check-data %s (salvage: "
                         "protoqd --salvage-data %s)",
                         sc->dir, path, sc->dir, sc->dir);
        } else {
            store_seterr(err, errlen,
                         "%s: offset %d: does not begin with its link record; "
                         "run protoqd --check-data %s",
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
        store_seterr(err, errlen,
                     "%s: follows segment %u, but the one before it here is "
                     "%s: a segment is missing; run protoqd --check-data %s "
                     "(salvage: protoqd --salvage-data %s)",
                     path, sc->start.prev_seq, prev, sc->dir, sc->dir);
        return PQ_ECORRUPT;
    }
    if (sc->start.prev_end != sc->end_offs[i - 1]) {
        store_seterr(
            err, errlen,
            "%s: its records end at offset %llu, but %s says they ended at "
            "offset %llu: records are missing (truncated or emptied); run "
            "protoqd --check-data %s (salvage: protoqd --salvage-data %s)",
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
        store_seterr(err, errlen,
                     "scan %s: out of memory checking live messages", sc->dir);
        return rc;
    }
    if (sc->vr.orphans == 0) {
        return PQ_OK;
    }
    seg_path(path, sizeof(path), sc->dir, sc->vr.orphan_at.seg);
    store_seterr(err, errlen,
                 "%s: offset %llu: message %llu is live here, but its publish "
                 "record is not in the log (%llu such messages): a segment "
                 "that held live messages is missing; run protoqd --check-data "
                 "%s (salvage: protoqd --salvage-data %s)",
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
int
store_scan_dir(struct scan *sc, char *err, size_t errlen)
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
        store_seterr(err, errlen, "scan %s: out of memory", sc->dir);
        return PQ_ENOMEM;
    }
    rc = store_meta_read(sc->dir, &sc->meta, err, errlen);
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
            store_seterr(err, errlen,
                         "%s: missing: segments %u and %u are here, the ones "
                         "between are gone with their records; run protoqd "
                         "--check-data %s (salvage: protoqd --salvage-data %s)",
                         path, sc->seqs[i - 1], sc->seqs[i], sc->dir, sc->dir);
            return PQ_ECORRUPT;
        }
        seg_path(path, sizeof(path), sc->dir, sc->seqs[i]);
        rc = map_file(path, &buf, &len, err, errlen);
        if (rc != PQ_OK) {
            return rc;
        }
        rc = scan_segment(sc, sc->seqs[i], path, buf, len, i == sc->nvalid - 1,
                          &sc->end_offs[i], err, errlen);
        unmap_file(buf, len);
        buf = NULL;
        if (rc == PQ_OK) {
            rc = check_link(sc, i, sc->end_offs[i], err, errlen);
        }
        if (rc != PQ_OK) {
            return rc;
        }
    }
    return sc->salvage || sc->opaque || sc->caller_checks_live
               ? PQ_OK
               : check_live(sc, err, errlen);
}

void
store_scan_fini(struct scan *sc)
{
    pq_free(sc->seqs);
    pq_free(sc->end_offs);
    verify_fini(&sc->v);
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
    fprintf(out,
            ", spare/empty: %zu, leftovers of an interrupted deletion: %zu\n",
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
        fprintf(out, "log start and end (META): not recorded (format 1 data "
                     "dir, or no record written yet)\n");
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
            fprintf(out,
                    "dead letters whose original publish record is gone: %llu "
                    "(recovered from their DEAD_LETTER records)\n",
                    (unsigned long long)sc->vr.dl_orphans);
        }
    }
    if (sc->torn) {
        seg_path(path, sizeof(path), dir, sc->torn_seq);
        fprintf(out,
                "torn tail: %s at offset %llu, %llu bytes (protoqd truncates "
                "it at start)\n",
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

/*
 * check_advice: the damage messages are written for a failed start and
 * end with "; run protoqd --check-data DIR ...". This is that check: say
 * the step that follows instead, the salvage.
 */
static void
check_advice(char *err, size_t errlen, const char *dir)
{
    char *run = strstr(err, "; run protoqd --check-data ");
    size_t n;

    if (run == NULL) {
        return;
    }
    *run = '\0';
    n = strlen(err);
    snprintf(err + n, errlen - n,
             "; to start again, protoqd --salvage-data %s keeps every record "
             "that can be read and moves the damaged files to "
             "%s/salvage-UNIXTIME/ (README, \"Data directory\")",
             dir, dir);
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
    rc = store_dir_lock(dir, true, &lock_fd, err, errlen);
    if (rc != PQ_OK) {
        return rc;
    }
    rc = store_scan_dir(&sc, err, errlen);
    if (rc == PQ_ECORRUPT && err != NULL) {
        check_advice(err, errlen, dir);
    }
    print_summary(&sc, dir, out, rc, err != NULL ? err : "");
    store_scan_fini(&sc);
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
        if (store_pwrite_all(outfd, buf, (size_t)n, off) < 0) {
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
        return PQ_OK; /* sound: nothing to do */
    }
    if (salvage_dir(sc->dir, bak, bakcap, out) < 0) {
        store_seterr(err, errlen, "mkdir %s: %s", bak, strerror(errno));
        return store_errno_to_pq(errno);
    }
    snprintf(dst, sizeof(dst), "%s/seg-%010u.log", bak, seq);
    if (rc != PQ_OK && sc->damaged && sc->damage_off == 0) {
        if (rename(path, dst) < 0) {
            store_seterr(err, errlen, "move %s to %s: %s", path, dst,
                         strerror(errno));
            return store_errno_to_pq(errno);
        }
        fprintf(out, "moved %s away: %s\n", path, err);
        return PQ_OK;
    }
    *kept = true;
    {
        cut = rc != PQ_OK ? sc->damage_off : sc->torn_off;
        if (copy_file(path, dst) < 0 || truncate(path, (off_t)cut) < 0) {
            store_seterr(err, errlen, "cut %s at offset %llu: %s", path,
                         (unsigned long long)cut, strerror(errno));
            return store_errno_to_pq(errno);
        }
        fprintf(out,
                "cut %s at offset %llu (%zu bytes dropped; the whole file is "
                "in %s)\n",
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

    rc = store_dir_lock(dir, false, &lock_fd, err, errlen);
    if (rc != PQ_OK) {
        return rc;
    }
    rc = list_segments(&sc, err, errlen);
    if (rc != PQ_OK) {
        goto out;
    }
    if (store_meta_read(dir, &m, err, errlen) != PQ_OK) {
        m = (struct meta){0}; /* rewritten below */
    }
    for (size_t i = 0; i < sc.nseqs; i++) {
        bool kept;

        if (m.present && sc.seqs[i] < m.first) {
            continue; /* a leftover: the next start removes it */
        }
        rc = salvage_segment(&sc, sc.seqs[i], bak, sizeof(bak), out, &kept, err,
                             errlen);
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
        store_seterr(err, errlen, "open data dir %s: %s", dir, strerror(errno));
        rc = store_errno_to_pq(errno);
        goto out;
    }
    if (first != 0) {
        /* Accept the log as it is now: what came before is not checked
         * any more (gaps, links, live messages up to segment last). */
        rc = store_meta_open(dir, dir_fd, &meta_fd, err, errlen);
        if (rc != PQ_OK) {
            goto out;
        }
        m.first = first;
        m.last = last;
        m.floor = last;
        if (store_meta_write(meta_fd, &m, true) < 0) {
            store_seterr(err, errlen, "write %s/META: %s", dir,
                         strerror(errno));
            rc = store_errno_to_pq(errno);
            goto out;
        }
        fprintf(
            out,
            "the log is now segments %u .. %u, accepted as found (%s/META)\n",
            first, last, dir);
    }
    store_scan_fini(&sc);
    sc = (struct scan){.dir = dir};
    rc = store_scan_dir(&sc, err, errlen);
    print_summary(&sc, dir, out, rc, err != NULL ? err : "");
out:
    store_scan_fini(&sc);
    if (meta_fd >= 0) {
        close(meta_fd);
    }
    if (dir_fd >= 0) {
        close(dir_fd);
    }
    close(lock_fd);
    return rc;
}
