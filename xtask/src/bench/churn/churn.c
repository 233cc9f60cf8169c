/* Starts short-lived processes at a fixed rate: a rotation of real
 * programs (shell, coreutils) and a small C program that burns ~1 ms,
 * as a build or a CGI-style service does. Usage: churn RATE SECONDS BURNER */
#define _GNU_SOURCE
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <fcntl.h>
#include <unistd.h>

extern char **environ;

int main(int argc, char **argv) {
    long rate = argc > 1 ? atol(argv[1]) : 2000;
    long secs = argc > 2 ? atol(argv[2]) : 10;
    char *burner = argc > 3 ? argv[3] : "/bin/true";
    char *cmds[][4] = {
        {"/bin/true", NULL},
        {"/bin/sh", "-c", ":", NULL},
        {"/usr/bin/env", "true", NULL},
        {"/bin/cat", "/dev/null", NULL},
        {burner, "1", NULL},
        {"/bin/date", NULL},
    };
    int ncmds = sizeof cmds / sizeof cmds[0];
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    struct timespec start, next;
    clock_gettime(CLOCK_MONOTONIC, &start);
    next = start;
    long spawned = 0, failed = 0;
    long step_ns = 1000000000L / rate;
    /* Ends on time even when the machine cannot keep the rate. */
    for (long i = 0; ; i++) {
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if ((now.tv_sec - start.tv_sec) * 1000000000L + (now.tv_nsec - start.tv_nsec) >= secs * 1000000000L) break;
        pid_t pid;
        char **c = cmds[i % ncmds];
        if (posix_spawn(&pid, c[0], &fa, NULL, c, environ) == 0) spawned++; else failed++;
        while (waitpid(-1, NULL, WNOHANG) > 0) {}
        next.tv_nsec += step_ns;
        while (next.tv_nsec >= 1000000000L) { next.tv_nsec -= 1000000000L; next.tv_sec++; }
        /* Behind schedule: do not sleep, and do not try to catch up. */
        if (next.tv_sec < now.tv_sec || (next.tv_sec == now.tv_sec && next.tv_nsec < now.tv_nsec)) next = now;
        else clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
    }
    while (wait(NULL) > 0) {}
    struct timespec end;
    clock_gettime(CLOCK_MONOTONIC, &end);
    double el = (end.tv_sec - start.tv_sec) + (end.tv_nsec - start.tv_nsec) / 1e9;
    printf("spawned %ld processes in %.1f s (%.0f/s), %ld failed\n", spawned, el, spawned / el, failed);
    return 0;
}
