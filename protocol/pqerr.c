/* pqerr.c: names for the PQ_* codes of pqerr.h. */
#include "pqerr.h"

static const char *const names[] = {
    [0] = "ok",
    [-PQ_ENOMEM] = "out of memory",
    [-PQ_EAGAIN] = "need more input",
    [-PQ_EPROTO] = "protocol error",
    [-PQ_ETOOBIG] = "too large",
    [-PQ_EINVAL] = "invalid argument",
    [-PQ_ENOTFOUND] = "not found",
    [-PQ_EEXIST] = "already exists",
    [-PQ_EFULL] = "queue full",
    [-PQ_ESTALE] = "stale delivery",
    [-PQ_ENOSPC] = "no space left on device",
    [-PQ_EIO] = "I/O error",
    [-PQ_ECORRUPT] = "data corrupt",
    [-PQ_ECLOSED] = "connection closed",
    [-PQ_ETIMEDOUT] = "timed out",
    [-PQ_EVERSION] = "unsupported version",
    [-PQ_EBUSY] = "busy",
    [-PQ_ESYS] = "system error",
    [-PQ_EREMOTE] = "broker error",
};

const char *
pq_strerror(int err)
{
    if (err > 0 || err < PQ_ERR_MIN) {
        return "unknown error";
    }
    return names[-err];
}
