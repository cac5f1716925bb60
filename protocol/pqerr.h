/*
 * pqerr.h: the one error convention of the whole tree (broker, protocol,
 * client). Functions return 0 (PQ_OK) or a negative PQ_E* code; a count
 * and an error may share an ssize_t return. PQ_EAGAIN means "need more
 * input", not a failure. These are internal codes: dispatch.c maps them to
 * the wire's protoq.ErrorCode in one place.
 */
#ifndef PQ_ERR_H
#define PQ_ERR_H

enum pq_err {
    PQ_OK = 0,
    PQ_ENOMEM = -1,     /* allocation failed */
    PQ_EAGAIN = -2,     /* need more input (not an error) */
    PQ_EPROTO = -3,     /* malformed frame or record */
    PQ_ETOOBIG = -4,    /* length over a configured limit */
    PQ_EINVAL = -5,     /* bad argument or request */
    PQ_ENOTFOUND = -6,  /* no such queue, subscription or message */
    PQ_EEXIST = -7,     /* already exists (with other attributes) */
    PQ_EFULL = -8,      /* queue max_length or max_bytes reached */
    PQ_ESTALE = -9,     /* delivery token no longer current */
    PQ_ENOSPC = -10,    /* disk full */
    PQ_EIO = -11,       /* I/O error (fsync failure is fatal) */
    PQ_ECORRUPT = -12,  /* checksum or format damage in stored data */
    PQ_ECLOSED = -13,   /* connection closed */
    PQ_ETIMEDOUT = -14, /* operation timed out */
    PQ_EVERSION = -15,  /* unsupported version */
    PQ_EBUSY = -16,     /* resource locked or overloaded */
    PQ_ESYS = -17,      /* other system call failure; see errno/message */
    PQ_EREMOTE = -18,   /* the broker answered with an Error frame */
    PQ_ERR_MIN = -18
};

/* pq_strerror: a static, human-readable name for a PQ_* code. */
const char *pq_strerror(int err);

#endif
