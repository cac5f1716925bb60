/*
 * backoff.c: reconnect delays with equal jitter (see backoff.h).
 */
#include "backoff.h"

void
backoff_init(struct backoff *b, uint32_t min_ms, uint32_t max_ms, uint64_t seed)
{
    b->min_ms = min_ms ? min_ms : BACKOFF_DEFAULT_MIN_MS;
    b->max_ms = max_ms ? max_ms : BACKOFF_DEFAULT_MAX_MS;
    if (b->max_ms < b->min_ms) {
        b->max_ms = b->min_ms;
    }
    b->cur_ms = b->min_ms;
    /* splitmix64 of the seed: a good xorshift start from any seed */
    seed += 0x9e3779b97f4a7c15ull;
    seed = (seed ^ (seed >> 30)) * 0xbf58476d1ce4e5b9ull;
    seed = (seed ^ (seed >> 27)) * 0x94d049bb133111ebull;
    seed ^= seed >> 31;
    b->rng = seed ? seed : 1;
}

uint32_t
backoff_next(struct backoff *b)
{
    uint32_t d = b->cur_ms;
    uint32_t half = d / 2;

    b->rng ^= b->rng << 13;
    b->rng ^= b->rng >> 7;
    b->rng ^= b->rng << 17;
    b->cur_ms = d > b->max_ms / 2 ? b->max_ms : d * 2;
    return half + (uint32_t)(b->rng % (uint64_t)(d - half + 1));
}

void
backoff_reset(struct backoff *b)
{
    b->cur_ms = b->min_ms;
}
