/*
 * mtcount: the multi-threaded process of the kit's Debian guest
 * (guest/distro, built static on the host by scripts/kit-distro).
 *
 * Threads: the main thread (the reporter) and COUNTERS counter threads that
 * each add one to their count every 10 ms, plus one crasher thread
 * that waits for SIGUSR1 (blocked everywhere else, taken with sigwait) and
 * then crashes the kernel from itself: it announces its thread id on the
 * kernel log (`GUEST-KIT mtcount crash pid P tid T`) and writes `c` to
 * /proc/sysrq-trigger.
 *
 * Every 200 ms the reporter rewrites STATUS (write, then rename) as one line:
 *   pid P crasher T counters TID1:N1 TID2:N2 ... round R
 * so the guest's own shell can tell which threads still count.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define COUNTERS 3
#define STATUS "/run/mtcount.status"

static atomic_long counts[COUNTERS];
static atomic_int tids[COUNTERS];
static atomic_int crasher_tid;

static int gettid_(void) { return (int)syscall(SYS_gettid); }

static void sleep_ms(long ms) {
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) != 0) {}
}

static void *counter(void *arg) {
    long i = (long)arg;
    atomic_store(&tids[i], gettid_());
    for (;;) {
        atomic_fetch_add(&counts[i], 1);
        sleep_ms(10);
    }
    return NULL;
}

static void write_all(const char *path, const char *s) {
    int fd = open(path, O_WRONLY);
    if (fd < 0) return;
    ssize_t r = write(fd, s, strlen(s));
    (void)r;
    close(fd);
}

static void *crasher(void *arg) {
    sigset_t *set = arg;
    int sig;
    atomic_store(&crasher_tid, gettid_());
    for (;;) {
        if (sigwait(set, &sig) != 0 || sig != SIGUSR1) continue;
        char line[96];
        snprintf(line, sizeof line, "GUEST-KIT mtcount crash pid %d tid %d\n", (int)getpid(), gettid_());
        write_all("/dev/kmsg", line);
        write_all("/proc/sysrq-trigger", "c");
    }
    return NULL;
}

int main(void) {
    static sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGUSR1);
    pthread_sigmask(SIG_BLOCK, &set, NULL); /* every thread inherits the mask */
    pthread_t t;
    for (long i = 0; i < COUNTERS; i++)
        if (pthread_create(&t, NULL, counter, (void *)i) != 0) return 1;
    if (pthread_create(&t, NULL, crasher, &set) != 0) return 1;
    printf("mtcount: pid %d, %d counters and a crasher\n", (int)getpid(), COUNTERS);
    fflush(stdout);
    for (long round = 1;; round++) {
        char buf[512];
        int n = snprintf(buf, sizeof buf, "pid %d crasher %d counters", (int)getpid(), atomic_load(&crasher_tid));
        for (int i = 0; i < COUNTERS; i++)
            n += snprintf(buf + n, sizeof buf - n, " %d:%ld", atomic_load(&tids[i]), atomic_load(&counts[i]));
        snprintf(buf + n, sizeof buf - n, " round %ld\n", round);
        FILE *f = fopen(STATUS ".tmp", "w");
        if (f) {
            fputs(buf, f);
            fclose(f);
            rename(STATUS ".tmp", STATUS);
        }
        sleep_ms(200);
    }
}
