/* Span ids: xoshiro256** seeded from getrandom.  Shared by the hot path (hotpath.c, the
 * callers' ids) and the span encoder (otlp_encoder.c, the children of graph replays);
 * each keeps its own state and reseeds in a forked child. */
#pragma once
#include <stdint.h>
#include <string.h>
#include <sys/random.h>
#include <sys/types.h>

static inline uint64_t otel_fi_rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

/* Fills ``s`` from the OS: 0, or -1 when getrandom fails. */
static inline int otel_fi_xoshiro_seed(uint64_t s[4]) {
    uint64_t seed[4];
    size_t got = 0;
    while (got < sizeof(seed)) {
        ssize_t n = getrandom((char *)seed + got, sizeof(seed) - got, 0);
        if (n <= 0) return -1;
        got += (size_t)n;
    }
    if ((seed[0] | seed[1] | seed[2] | seed[3]) == 0) seed[0] = 1;
    memcpy(s, seed, sizeof(seed));
    return 0;
}

/* The next nonzero 64 random bits (an all-zero id is invalid in OTel). */
static inline uint64_t otel_fi_xoshiro_next(uint64_t s[4]) {
    uint64_t r;
    do {
        r = otel_fi_rotl(s[1] * 5, 7) * 9;
        uint64_t t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = otel_fi_rotl(s[3], 45);
    } while (r == 0);
    return r;
}
