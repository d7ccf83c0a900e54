/*
 * c_seed_loop -- the C baseline for vmsup's exit rate.
 *
 * Runs a flat 16-bit guest binary (the seed: out %ax,$0x10; inc %ax; jmp) the way vmsup does:
 * 16 MiB of RAM, the binary at gpa 0x10000, one vCPU in real mode with every segment at
 * selector 0x1000 / base 0x10000, IP=0, SP=0, RFLAGS=2, all other GPRs 0.  It then calls
 * KVM_RUN until N exits have been handled, reading each port I/O exit as a real VMM would,
 * and prints one line:
 *
 *     c-loop: N exits in T s (R exits/s)
 *
 * T covers the run loop only: from just before the first KVM_RUN to just after the last exit.
 *
 * usage: c_seed_loop GUEST.bin N
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/kvm.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define RAM_SIZE   (16u << 20)
#define LOAD_GPA   0x10000u
#define REAL_SEG   0x1000u

static volatile uint64_t io_sink; /* keeps the per-exit data reads alive */

static void __attribute__((noreturn, format(printf, 1, 2))) die(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	fputs("c_seed_loop: ", stderr);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

static int xioctl(int fd, unsigned long req, void *arg, const char *what)
{
	int ret = ioctl(fd, req, arg);

	if (ret < 0)
		die("%s: %s", what, strerror(errno));
	return ret;
}

static size_t load_guest(const char *path, uint8_t *ram)
{
	FILE *f = fopen(path, "rb");
	size_t n;

	if (!f)
		die("%s: %s", path, strerror(errno));
	n = fread(ram + LOAD_GPA, 1, RAM_SIZE - LOAD_GPA, f);
	if (ferror(f))
		die("%s: read error", path);
	if (!feof(f) && fgetc(f) != EOF)
		die("%s: larger than guest RAM above 0x%x", path, LOAD_GPA);
	fclose(f);
	if (n == 0)
		die("%s: empty guest binary", path);
	return n;
}

static void real_mode_segment(struct kvm_segment *seg, int code)
{
	memset(seg, 0, sizeof(*seg));
	seg->selector = REAL_SEG;
	seg->base = (uint64_t)REAL_SEG << 4;
	seg->limit = 0xffff;
	seg->type = code ? 0xb : 0x3; /* code: execute/read, accessed; data: read/write, accessed */
	seg->present = 1;
	seg->s = 1;
}

static void setup_vcpu(int vcpu)
{
	struct kvm_sregs sregs;
	struct kvm_regs regs;

	/* Start from KVM's reset state (keeps apic_base and the interrupt bitmap) and then set
	 * every mode-relevant register to an explicit real-mode value. */
	xioctl(vcpu, KVM_GET_SREGS, &sregs, "KVM_GET_SREGS");
	real_mode_segment(&sregs.cs, 1);
	real_mode_segment(&sregs.ds, 0);
	real_mode_segment(&sregs.es, 0);
	real_mode_segment(&sregs.fs, 0);
	real_mode_segment(&sregs.gs, 0);
	real_mode_segment(&sregs.ss, 0);
	memset(&sregs.tr, 0, sizeof(sregs.tr));
	sregs.tr.limit = 0xffff;
	sregs.tr.type = 0xb;   /* busy TSS, as at reset */
	sregs.tr.present = 1;
	memset(&sregs.ldt, 0, sizeof(sregs.ldt));
	sregs.ldt.limit = 0xffff;
	sregs.ldt.type = 0x2;  /* LDT */
	sregs.ldt.present = 1;
	memset(&sregs.gdt, 0, sizeof(sregs.gdt));
	sregs.gdt.limit = 0xffff;
	memset(&sregs.idt, 0, sizeof(sregs.idt));
	sregs.idt.limit = 0xffff;
	sregs.cr0 = 0x60000010; /* CD NW ET: the reset value, PE=0 (real mode) */
	sregs.cr2 = 0;
	sregs.cr3 = 0;
	sregs.cr4 = 0;
	sregs.cr8 = 0;
	sregs.efer = 0;
	xioctl(vcpu, KVM_SET_SREGS, &sregs, "KVM_SET_SREGS");

	memset(&regs, 0, sizeof(regs));
	regs.rip = 0;
	regs.rsp = 0;
	regs.rflags = 2; /* bit 1 is reserved, always 1 */
	xioctl(vcpu, KVM_SET_REGS, &regs, "KVM_SET_REGS");
}

static uint64_t io_data(const uint8_t *p, unsigned size)
{
	switch (size) {
	case 1: return p[0];
	case 2: { uint16_t v; memcpy(&v, p, 2); return v; }
	case 4: { uint32_t v; memcpy(&v, p, 4); return v; }
	default: die("KVM_EXIT_IO with size %u", size);
	}
	return 0;
}

static double now(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
	struct kvm_userspace_memory_region region;
	unsigned long long want;
	struct kvm_run *run;
	uint64_t done, sum = 0;
	int kvm, vm, vcpu, mmap_size;
	uint8_t *ram;
	double t0, t1;
	char *end;

	if (argc != 3)
		die("usage: %s GUEST.bin N_EXITS", argv[0]);
	errno = 0;
	want = strtoull(argv[2], &end, 10);
	if (errno || *end || end == argv[2] || want == 0)
		die("N_EXITS must be a positive integer, got '%s'", argv[2]);

	kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm < 0)
		die("/dev/kvm: %s", strerror(errno));
	if (ioctl(kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
		die("unexpected KVM API version");
	vm = ioctl(kvm, KVM_CREATE_VM, 0);
	if (vm < 0)
		die("KVM_CREATE_VM: %s", strerror(errno));

	ram = mmap(NULL, RAM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (ram == MAP_FAILED)
		die("mmap guest RAM: %s", strerror(errno));
	load_guest(argv[1], ram);

	memset(&region, 0, sizeof(region));
	region.slot = 0;
	region.guest_phys_addr = 0;
	region.memory_size = RAM_SIZE;
	region.userspace_addr = (uintptr_t)ram;
	xioctl(vm, KVM_SET_USER_MEMORY_REGION, &region, "KVM_SET_USER_MEMORY_REGION");

	vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
	if (vcpu < 0)
		die("KVM_CREATE_VCPU: %s", strerror(errno));
	mmap_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
	if (mmap_size < (int)sizeof(*run))
		die("KVM_GET_VCPU_MMAP_SIZE: %s", mmap_size < 0 ? strerror(errno) : "too small");
	run = mmap(NULL, mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
	if (run == MAP_FAILED)
		die("mmap kvm_run: %s", strerror(errno));
	setup_vcpu(vcpu);

	t0 = now();
	for (done = 0; done < want; done++) {
		if (ioctl(vcpu, KVM_RUN, 0) < 0)
			die("KVM_RUN after %" PRIu64 " exits: %s", done, strerror(errno));
		switch (run->exit_reason) {
		case KVM_EXIT_IO: {
			const uint8_t *p = (const uint8_t *)run + run->io.data_offset;
			unsigned i;

			if (run->io.data_offset + (uint64_t)run->io.size * run->io.count > (uint64_t)mmap_size)
				die("KVM_EXIT_IO data outside the kvm_run mapping");
			for (i = 0; i < run->io.count; i++, p += run->io.size)
				sum += io_data(p, run->io.size) + run->io.port;
			break;
		}
		case KVM_EXIT_FAIL_ENTRY:
			die("KVM_EXIT_FAIL_ENTRY after %" PRIu64 " exits: hardware reason 0x%llx",
			    done, (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
		case KVM_EXIT_INTERNAL_ERROR:
			die("KVM_EXIT_INTERNAL_ERROR after %" PRIu64 " exits: suberror %u",
			    done, run->internal.suberror);
		default:
			die("unexpected exit reason %u after %" PRIu64 " exits", run->exit_reason, done);
		}
	}
	t1 = now();
	io_sink = sum;
#ifdef C_SEED_LOOP_VERIFY
	{
		struct kvm_regs r;
		struct kvm_sregs sr;

		xioctl(vcpu, KVM_GET_REGS, &r, "KVM_GET_REGS");
		xioctl(vcpu, KVM_GET_SREGS, &sr, "KVM_GET_SREGS");
		fprintf(stderr, "verify: sum=%" PRIu64 " rip=0x%llx rax=0x%llx cs=0x%x/0x%llx cr0=0x%llx\n", sum,
			(unsigned long long)r.rip, (unsigned long long)r.rax, sr.cs.selector,
			(unsigned long long)sr.cs.base, (unsigned long long)sr.cr0);
	}
#endif

	printf("c-loop: %" PRIu64 " exits in %.6f s (%.0f exits/s)\n", done, t1 - t0, done / (t1 - t0));
	return 0;
}
