/*
 * fuzz.h: what the libFuzzer targets under tests/fuzz share. Each target
 * defines LLVMFuzzerTestOneInput; a broken property calls FUZZ_CHECK, which
 * says what broke and aborts, so libFuzzer saves the input as a crash.
 */
#ifndef PQ_FUZZ_H
#define PQ_FUZZ_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define FUZZ_CHECK(cond)                                                       \
    do {                                                                       \
        if (!(cond)) {                                                         \
            fprintf(stderr, "%s:%d: property broken: %s\n", __FILE__,          \
                    __LINE__, #cond);                                          \
            abort();                                                           \
        }                                                                      \
    } while (0)

#endif
