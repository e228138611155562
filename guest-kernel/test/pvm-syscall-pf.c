/*
 * Exercises patches/0001-x86-pvm-syscall-from-page-fault.patch on any host.
 *
 * On PVM hosts a user SYSCALL reaches the guest as a user-mode page fault at
 * entry_SYSCALL_64. A user program that jumps to entry_SYSCALL_64 itself gets
 * exactly that fault anywhere, so this checks the patched path under QEMU TCG
 * or hardware KVM too. Build static and run inside the guest with the address
 * of entry_SYSCALL_64 (fixed: the kernel is not relocatable):
 *
 *   gcc -O2 -static -o pvm-syscall-pf pvm-syscall-pf.c
 *   nm target/guest-kernel/vmlinux | grep -w entry_SYSCALL_64
 *   ./pvm-syscall-pf ffffffff81400040      # exit status 0 on success
 *
 * Without the patch the jump is a plain SIGSEGV.
 */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/syscall.h>

#define FLAG_CF 0x1UL
#define FLAG_IF 0x200UL
#define FLAG_IOPL 0x3000UL
#define FLAG_NT 0x4000UL

/* Sets up rcx/r11 the way SYSCALL does, then jumps to entry_SYSCALL_64. */
static long pf_syscall(unsigned long entry, long nr, long a1, long a2, long a3,
		       unsigned long r11, unsigned long *flags_after)
{
	register long r10 __asm__("r10") = 0;
	unsigned long flags;
	long ret;

	__asm__ volatile("lea 1f(%%rip), %%rcx\n\t"
			 "mov %[r11], %%r11\n\t"
			 "jmp *%[entry]\n"
			 "1:\n\t"
			 "pushfq\n\t"
			 "pop %[flags]\n\t"
			 : "=a"(ret), [flags] "=&r"(flags), "+r"(r10)
			 : "a"(nr), "D"(a1), "S"(a2), "d"(a3), [entry] "r"(entry),
			   [r11] "r"(r11)
			 : "rcx", "r11", "memory", "cc");
	*flags_after = flags;
	return ret;
}

int main(int argc, char **argv)
{
	static const char msg[] = "pvm-syscall-pf: write() through #PF\n";
	unsigned long entry, flags;
	int failed = 0;
	long r;

	if (argc != 2) {
		fprintf(stderr, "usage: %s <entry_SYSCALL_64 address in hex>\n", argv[0]);
		return 2;
	}
	entry = strtoul(argv[1], NULL, 16);

	r = pf_syscall(entry, SYS_write, 1, (long)msg, sizeof(msg) - 1, FLAG_IF | 2, &flags);
	failed |= r != (long)sizeof(msg) - 1;
	printf("write: %ld\n", r);

	r = pf_syscall(entry, SYS_getpid, 0, 0, 0, FLAG_IF | 2, &flags);
	failed |= r != getpid();
	printf("getpid: %ld (getpid() = %d)\n", r, getpid());

	/* IOPL 3 and NT asked for through r11 must not be granted; CF must stick. */
	r = pf_syscall(entry, SYS_getppid, 0, 0, 0,
		       FLAG_IF | 2 | FLAG_IOPL | FLAG_NT | FLAG_CF, &flags);
	failed |= r != getppid() || (flags & (FLAG_IOPL | FLAG_NT)) ||
		  !(flags & FLAG_IF) || !(flags & FLAG_CF);
	printf("getppid: %ld, flags 0x%lx\n", r, flags);

	r = pf_syscall(entry, 100000, 0, 0, 0, FLAG_IF | 2, &flags);
	failed |= r != -38;
	printf("unknown syscall: %ld (want -38, -ENOSYS)\n", r);

	puts(failed ? "pvm-syscall-pf: FAIL" : "pvm-syscall-pf: ok");
	return failed;
}
