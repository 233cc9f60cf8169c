/* A service that blocks at several places in turn: its client thread waits
 * on a pipe read, a futex, a condition variable (futex inside glibc) and a
 * timer sleep, each in its own function; its server thread sleeps between
 * waking the client through each of them, so each site blocks for a
 * different, known time. Used by the off-CPU tests (per-site truth, measured
 * here) and by `cargo xtask bench offcpu` (the multi-site load).
 *
 * Usage: offcpu_multisite UNIT_US [SPIN_ITERS]
 *   UNIT_US: the server sleeps 1, 2 and 3 units before each wake-up, the
 *            client naps a quarter unit (0: no sleeps at all, flat out).
 *   SPIN_ITERS: busy work per wake-up on both sides (default 0).
 * Counters (after COUNTERS_C): ns blocked and blocks per client site
 * [0..4) / [4..8) = pipe, futex, cond, nap; [8]/[9] the server's sleeps;
 * [10] round trips. Self-contained (the bench builds it as is).
 * "ns blocked" is the wall time of the wait less the thread's own CPU time
 * in it: the syscall paths around a block take 15-45 us on-CPU on a VM,
 * which is not off-CPU time, and against a 0.5 ms nap that alone was 3-8 %. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* `<argv0>.stats`: 64 u64 slots the test or bench reads while this runs. */
static volatile uint64_t *counters;

static void counters_open(const char *argv0) {
    char path[4096];
    snprintf(path, sizeof path, "%s.stats", argv0);
    int fd = open(path, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || ftruncate(fd, 64 * 8) != 0) { perror(path); exit(2); }
    void *p = mmap(0, 64 * 8, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) { perror("mmap"); exit(2); }
    counters = p;
}

static uint64_t clock_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t now_ns(void) { return clock_ns(CLOCK_MONOTONIC); }

/* Start of a timed wait: wall and thread CPU clocks, read in that order. */
struct mark { uint64_t wall, cpu; };

static struct mark mark_start(void) {
    struct mark m;
    m.wall = now_ns();
    m.cpu = clock_ns(CLOCK_THREAD_CPUTIME_ID);
    return m;
}

/* Off-CPU ns since `m`: wall time less CPU time (read in reverse order, so
 * both intervals cover the wait and the CPU one is the inner). */
static uint64_t mark_blocked(struct mark m) {
    uint64_t cpu = clock_ns(CLOCK_THREAD_CPUTIME_ID) - m.cpu;
    uint64_t wall = now_ns() - m.wall;
    return wall > cpu ? wall - cpu : 0;
}

static int p1[2];
static volatile int fw;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static int cv_ready;
static uint64_t unit_ns, spin_iters;

static void spin(void) {
    for (volatile uint64_t i = 0; i < spin_iters; i++) {}
}

__attribute__((noinline)) void wait_pipe(void) {
    char c;
    struct mark t0 = mark_start();
    if (read(p1[0], &c, 1) != 1) exit(3);
    counters[0] += mark_blocked(t0);
    counters[4]++;
}

__attribute__((noinline)) void wait_futex(void) {
    struct mark t0 = mark_start();
    while (!__atomic_exchange_n(&fw, 0, __ATOMIC_ACQ_REL))
        syscall(SYS_futex, &fw, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
    counters[1] += mark_blocked(t0);
    counters[5]++;
}

__attribute__((noinline)) void wait_cond(void) {
    struct mark t0 = mark_start();
    pthread_mutex_lock(&mu);
    while (!cv_ready) pthread_cond_wait(&cv, &mu);
    cv_ready = 0;
    pthread_mutex_unlock(&mu);
    counters[2] += mark_blocked(t0);
    counters[6]++;
}

__attribute__((noinline)) void nap(uint64_t ns) {
    struct timespec ts = {(long)(ns / 1000000000ull), (long)(ns % 1000000000ull)};
    struct mark t0 = mark_start();
    if (ns) nanosleep(&ts, NULL);
    counters[3] += mark_blocked(t0);
    counters[7]++;
}

static void *client(void *arg) {
    (void)arg;
    prctl(PR_SET_NAME, "ms-client");
    for (;;) {
        wait_pipe();
        spin();
        wait_futex();
        spin();
        wait_cond();
        spin();
        nap(unit_ns / 4);
        counters[10]++;
    }
    return NULL;
}

__attribute__((noinline)) void server_sleep(uint64_t ns) {
    struct timespec ts = {(long)(ns / 1000000000ull), (long)(ns % 1000000000ull)};
    uint64_t t0 = now_ns();
    if (ns) nanosleep(&ts, NULL);
    counters[8] += now_ns() - t0;
    counters[9]++;
}

__attribute__((noinline)) void serve(void) {
    for (;;) {
        server_sleep(unit_ns);
        if (write(p1[1], "x", 1) != 1) exit(4);
        spin();
        server_sleep(2 * unit_ns);
        __atomic_store_n(&fw, 1, __ATOMIC_RELEASE);
        syscall(SYS_futex, &fw, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
        spin();
        server_sleep(3 * unit_ns);
        pthread_mutex_lock(&mu);
        cv_ready = 1;
        pthread_cond_signal(&cv);
        pthread_mutex_unlock(&mu);
        spin();
    }
}

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: %s UNIT_US [SPIN_ITERS]\n", argv[0]); return 2; }
    unit_ns = strtoull(argv[1], NULL, 10) * 1000ull;
    spin_iters = argc > 2 ? strtoull(argv[2], NULL, 10) : 0;
    /* Timer sleeps as asked, not rounded up by the default 50 us slack. */
    prctl(PR_SET_TIMERSLACK, 1UL);
    counters_open(argv[0]);
    if (pipe(p1) != 0) { perror("pipe"); return 2; }
    pthread_t t;
    if (pthread_create(&t, NULL, client, NULL) != 0) return 2;
    prctl(PR_SET_NAME, "ms-server");
    serve();
    return 0;
}
