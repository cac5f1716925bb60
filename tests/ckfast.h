/*
 * ckfast.h: assertions for hot loops. Each passing Check assertion records
 * its file and line (a write to Check's pipe), so a loop of a million
 * assertions took a minute; these call Check only when the condition
 * fails, naming the expression (not the values).
 */
#ifndef PQ_CKFAST_H
#define PQ_CKFAST_H

#include <check.h>

#define CKF(expr)                                                              \
    do {                                                                       \
        if (!(expr)) {                                                         \
            ck_abort_msg("Assertion '%s' failed", #expr);                      \
        }                                                                      \
    } while (0)

#define CKF_CMP(a, op, b)                                                      \
    do {                                                                       \
        if (!((a)op(b))) {                                                     \
            ck_abort_msg("Assertion '%s %s %s' failed", #a, #op, #b);          \
        }                                                                      \
    } while (0)

#endif
