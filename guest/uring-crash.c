/*
 * uring-crash: write DATA to PATH from an io_uring worker thread.
 *
 *   uring-crash PATH DATA [DELAY_S]
 *
 * One IORING_OP_WRITE with IOSQE_ASYNC, so the kernel never tries the
 * write inline: an io-wq worker of this process (`iou-wrk-<pid>`, a
 * PF_IO_WORKER | PF_USER_WORKER thread on 6.4+) performs it. Writing `c` to
 * /proc/sysrq-trigger (or an LKDTM type to .../provoke-crash/DIRECT) then
 * crashes the kernel from that worker rather than from a process.
 *
 * With DELAY_S it sets the ring up, says its pid, then sleeps that long
 * before it submits (a test's checkpoint can then hold the process before
 * its request exists). Before submitting, it says its pid on stdout and in the kernel log
 * ("uring-crash pid N"); after the completion it prints "uring-crash res R".
 * Raw system calls only (no liburing), built static by the real-guest test:
 *   gcc -static -O2 -o uring-crash guest/uring-crash.c
 */
#include <fcntl.h>
#include <linux/io_uring.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

static int die(const char *what)
{
	perror(what);
	return 1;
}

int main(int argc, char **argv)
{
	struct io_uring_params p;
	struct io_uring_sqe *sqes, *sqe;
	struct io_uring_cqe *cqes;
	unsigned *sq_tail, *sq_mask, *sq_array, *cq_head, *cq_tail, *cq_mask;
	char *sq, *cq;
	size_t sq_len, cq_len;
	int ring, fd, kmsg;
	char line[64];

	if (argc != 3 && argc != 4) {
		fprintf(stderr, "usage: uring-crash PATH DATA [DELAY_S]\n");
		return 2;
	}
	fd = open(argv[1], O_WRONLY);
	if (fd < 0)
		return die(argv[1]);
	memset(&p, 0, sizeof(p));
	ring = syscall(__NR_io_uring_setup, 4, &p);
	if (ring < 0)
		return die("io_uring_setup");
	sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
	cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
	sq = mmap(NULL, sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_SQ_RING);
	cq = mmap(NULL, cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, ring, IORING_OFF_CQ_RING);
	sqes = mmap(NULL, p.sq_entries * sizeof(*sqes), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
		    ring, IORING_OFF_SQES);
	if (sq == MAP_FAILED || cq == MAP_FAILED || sqes == MAP_FAILED)
		return die("mmap");
	sq_tail = (unsigned *)(sq + p.sq_off.tail);
	sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
	sq_array = (unsigned *)(sq + p.sq_off.array);
	cq_head = (unsigned *)(cq + p.cq_off.head);
	cq_tail = (unsigned *)(cq + p.cq_off.tail);
	cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
	cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);

	sqe = &sqes[*sq_tail & *sq_mask];
	memset(sqe, 0, sizeof(*sqe));
	sqe->opcode = IORING_OP_WRITE;
	sqe->flags = IOSQE_ASYNC;
	sqe->fd = fd;
	sqe->addr = (unsigned long)argv[2];
	sqe->len = strlen(argv[2]);
	sqe->off = 0;
	sq_array[*sq_tail & *sq_mask] = *sq_tail & *sq_mask;
	__atomic_store_n(sq_tail, *sq_tail + 1, __ATOMIC_RELEASE);

	snprintf(line, sizeof(line), "uring-crash pid %d\n", getpid());
	fputs(line, stdout);
	fflush(stdout);
	kmsg = open("/dev/kmsg", O_WRONLY);
	if (kmsg >= 0) {
		(void)!write(kmsg, line, strlen(line));
		close(kmsg);
	}
	if (argc == 4)
		sleep(atoi(argv[3]));
	if (syscall(__NR_io_uring_enter, ring, 1, 1, IORING_ENTER_GETEVENTS, NULL, 0) < 0)
		return die("io_uring_enter");
	while (__atomic_load_n(cq_tail, __ATOMIC_ACQUIRE) == *cq_head)
		;
	printf("uring-crash res %d\n", cqes[*cq_head & *cq_mask].res);
	return 0;
}
