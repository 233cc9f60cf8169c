/* cargo xtask bench unwind: the no-frame-pointer workload.
 *
 * Built with gcc -O2 -fomit-frame-pointer. Starts argv[1] threads (one per
 * CPU); each recurses DEPTH frames through four noinline functions and spins
 * in `burn` at the bottom, so nearly every sample has DEPTH + 1 frames of
 * this binary (plus start_thread and clone3 of libc) and only CFI can walk
 * them: without frame pointers, %rbp is just another register. Every level
 * does work with the callee's result, so no call is a tail call. */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#define DEPTH 64
/* Iterations at the bottom: a few ms, so the descent costs nothing. */
#define SPIN 4000000u

volatile uint64_t sink;

__attribute__((noinline)) uint64_t burn(uint64_t x) {
    x |= 1;
    for (uint32_t i = 0; i < SPIN; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
    }
    return x;
}

uint64_t level_a(uint32_t depth, uint64_t seed);
uint64_t level_b(uint32_t depth, uint64_t seed);
uint64_t level_c(uint32_t depth, uint64_t seed);
uint64_t level_d(uint32_t depth, uint64_t seed);

/* One level: calls the next (or burn at depth 0), then mixes its result
 * with this frame's arguments, which therefore live in callee-saved
 * registers across the call (pushes, so the CFA moves within the function). */
#define LEVEL(name, next)                                                    \
    __attribute__((noinline)) uint64_t name(uint32_t depth, uint64_t seed) { \
        uint64_t r = depth == 0 ? burn(seed) : next(depth - 1, seed * 6364136223846793005u + depth); \
        sink = r;                                                            \
        return (r ^ seed) * 31u + depth;                                     \
    }

LEVEL(level_a, level_b)
LEVEL(level_b, level_c)
LEVEL(level_c, level_d)
LEVEL(level_d, level_a)

__attribute__((noinline)) void *worker(void *arg) {
    uint64_t seed = (uintptr_t)arg + 1;
    for (;;)
        seed += level_a(DEPTH - 1, seed);
    return NULL;
}

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 1;
    if (n < 1)
        n = 1;
    pthread_t *threads = calloc((size_t)n, sizeof *threads);
    if (!threads)
        return 1;
    for (int i = 0; i < n; i++)
        if (pthread_create(&threads[i], NULL, worker, (void *)(uintptr_t)i) != 0)
            return 1;
    for (int i = 0; i < n; i++)
        pthread_join(threads[i], NULL);
    return 0;
}
