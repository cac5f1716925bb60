/*
 * pl_journal.h: the undo journal of a simulated power loss, shared by the
 * seam linked into the test build of protoqd (pl_seam.c, installed when
 * PROTOQD_PL_JOURNAL names the journal file) and the model test that
 * applies it after a kill -9 (powerloss.c).
 *
 * The journal is a sequence of records, each written with one write(2)
 * before the I/O it describes (so it is complete when the process is
 * SIGKILLed) and numbered by its position (0, 1, ...):
 *   PL_WRITE   a pwrite of len bytes at off into path; old_size is the
 *              file's size before it, data the bytes it overwrote (those
 *              of [off, off + len) below old_size)
 *   PL_SIZE    a size change (ftruncate, fallocate, O_TRUNC at open) from
 *              old_size to len; data the bytes a shrink cut off
 *   PL_CREATE  path was created (its name is not durable yet)
 *   PL_UNLINK  path was removed; data is what it held (old_size bytes):
 *              the name comes back unless a directory fsync followed
 *   PL_SYNC    an fdatasync/fsync of path returned: its records numbered
 *              below upto (the count when the sync began) are durable
 *   PL_DIRSYNC an fsync of the data dir returned: the names created by
 *              records numbered below upto are durable
 * A torn last record (the kill came in the middle of its write) is
 * ignored: the I/O it describes had not started.
 */
#ifndef PQ_TEST_MODEL_PL_JOURNAL_H
#define PQ_TEST_MODEL_PL_JOURNAL_H

#include <stdint.h>

#define PL_JOURNAL_ENV "PROTOQD_PL_JOURNAL"

enum pl_type {
    PL_WRITE = 1,
    PL_SIZE,
    PL_CREATE,
    PL_UNLINK,
    PL_SYNC,
    PL_DIRSYNC,
};

/* One record: this header, then path_len bytes of path (no NUL), then
 * data_len bytes of data. Native byte order (same machine). */
struct pl_rec {
    uint32_t type;
    uint32_t path_len;
    uint64_t off;
    uint64_t len;
    uint64_t old_size;
    uint64_t upto;
    uint64_t data_len;
};

#endif
