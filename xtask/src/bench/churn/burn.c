#include <stdint.h>
#include <stdlib.h>
#include <time.h>
__attribute__((noinline)) uint64_t burn(long ms) {
    struct timespec t; volatile uint64_t acc = 0;
    for (;;) { for (uint64_t i = 0; i < 20000; i++) acc += i * i;
        clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
        if (t.tv_sec * 1000 + t.tv_nsec / 1000000 >= ms) return acc; }
}
int main(int argc, char **argv) { return burn(argc > 1 ? atol(argv[1]) : 1) == 1; }
