/* x87calc -- double and long double arithmetic and 64-bit division on the x87, as gcc -m32
 * -mfpmath=387 compiles them.
 *
 * ELF32, entered in protected mode.  On this PVM host KVM's emulator cannot run FWAIT or any x87
 * instruction; vmsup performs them (vmworker/emulate/).  The results are printed on port 0xE9 in
 * hex, one per line, for a test to compare with numpy.longdouble computed on the host's own x87
 * under the same control word (tests/test_emulate_guests.py):
 *
 *   init CW SW                      FCW and FSW after `finit` (9b db e3)
 *   pi CW X                         FLDPI, rounded as CW's RC says
 *   r CW I OP X                     pair I's OP: add sub mul div sqrt (long double, 20 hex digits:
 *                                   sign+exponent, significand), ddiv (stored as a double, 16
 *                                   digits), lmul ((long long)(a*b), 16 digits), cmp (1 2 or 4
 *                                   for <, ==, >), smul (a * (short)-1234)
 *   q CW A B Q                      A / B on unsigned 64-bit integers (libgcc's helper is replaced
 *                                   by one that divides through long double, as small runtimes do;
 *                                   the pair above 2**63 only with extended precision)
 *
 * for each control word in CWS (precision control single/double/extended, every rounding mode),
 * then exits with code 0 on port 0xF4.
 */

typedef unsigned long long u64;
typedef long long s64;
typedef unsigned int u32;
typedef unsigned short u16;

#define DEBUG_PORT 0xE9
#define EXIT_PORT 0xF4

static inline void outb(u16 port, unsigned char v)
{
	__asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static void puts_(const char *s)
{
	while (*s)
		outb(DEBUG_PORT, (unsigned char)*s++);
}

static void puthex(u64 v, int digits)
{
	for (int i = digits - 1; i >= 0; i--)
		outb(DEBUG_PORT, (unsigned char)"0123456789abcdef"[(u32)(v >> (4 * i)) & 15]);
}

static void put_ld(long double x)
{
	union { long double x; struct { u64 m; u16 se; } __attribute__((packed)) p; } u;
	u.x = x;
	puthex(u.p.se, 4);
	puthex(u.p.m, 16);
}

static void put_d(double x)
{
	union { double x; u64 bits; } u;
	u.x = x;
	puthex(u.bits, 16);
}

static void set_cw(u16 cw)
{
	__asm__ volatile("fldcw %0" : : "m"(cw) : "memory");
}

/* gcc's conversion to an integer saves the control word once per function (FNSTCW), sets
 * truncation for FISTP, then restores what it saved: kept in a function of its own so that it
 * saves the control word set_cw() loaded, not the one before it. */
static __attribute__((noinline)) s64 to_s64(long double x)
{
	return (s64)x;
}

/* Unsigned 64-bit division for gcc's `a / b` on this freestanding target (there is no 32-bit
 * libgcc here).  Through long double: exact while the precision control is extended (a 64-bit
 * significand keeps every 63-bit integer and the quotient cannot round up to the next integer);
 * with double precision it is not, which the q lines show. */
u64 __udivdi3(u64 a, u64 b)
{
	if (b > a)
		return 0;
	if (b >> 63)
		return 1;
	if (a >> 63) {
		u64 q = __udivdi3(a >> 1, b) << 1;
		u64 r = a - q * b;
		while (r >= b) {
			q++;
			r -= b;
		}
		return q;
	}
	long double q = (long double)(s64)a / (long double)(s64)b;
	return (u64)(s64)q;
}

static volatile double A[] = { 1.0, 2.0, 1e16, 0.1, -7.0, 123456789.123, 1e300 };
static volatile double B[] = { 3.0, 3.0, 1.0, 3.0, 3.0, 987654321.987, 1e300 };
#define PAIRS (sizeof(A) / sizeof(A[0]))
static const u16 CWS[] = { 0x037F, 0x027F, 0x007F, 0x077F, 0x0B7F, 0x0F7F, 0x0E7F };
#define NCWS (sizeof(CWS) / sizeof(CWS[0]))
static volatile u64 QA[] = { 1000000000000000000ULL, 0x4000000000003039ULL, 9007199254740991ULL,
			     0x7FFFFFFFFFFFFFF0ULL, 0xFFFFFFFFFFFFFFFFULL };
static volatile u64 QB[] = { 7, 3, 3, 0x7FFFFFFF, 10 };
#define DIVS (sizeof(QA) / sizeof(QA[0]))
static volatile short S = -1234;

static void line_start(const char *tag, u16 cw)
{
	puts_(tag);
	puthex(cw, 4);
	puts_(" ");
}

static void result(const char *tag, u16 cw, u32 i, const char *op)
{
	line_start(tag, cw);
	puthex(i, 1);
	puts_(" ");
	puts_(op);
	puts_(" ");
}

static void run_cw(u16 cw)
{
	set_cw(cw);
	long double pi;
	__asm__ volatile("fldpi" : "=t"(pi));
	line_start("pi ", cw);
	put_ld(pi);
	puts_("\n");
	for (u32 i = 0; i < PAIRS; i++) {
		long double a = A[i], b = B[i];
		long double r;
		result("r ", cw, i, "add"); put_ld(a + b); puts_("\n");
		result("r ", cw, i, "sub"); put_ld(a - b); puts_("\n");
		result("r ", cw, i, "mul"); put_ld(a * b); puts_("\n");
		result("r ", cw, i, "div"); put_ld(a / b); puts_("\n");
		r = __builtin_fabsl(a);
		__asm__ volatile("fsqrt" : "+t"(r));
		result("r ", cw, i, "sqrt"); put_ld(r); puts_("\n");
		volatile double d = A[i] / B[i];
		result("r ", cw, i, "ddiv"); put_d(d); puts_("\n");
		if (a * b < 9e18L && a * b > -9e18L) {
			result("r ", cw, i, "lmul"); puthex((u64)to_s64(a * b), 16); puts_("\n");
		}
		result("r ", cw, i, "cmp"); puthex(a < b ? 1 : a == b ? 2 : 4, 1); puts_("\n");
		result("r ", cw, i, "smul"); put_ld(a * S); puts_("\n");
	}
	for (u32 i = 0; i < DIVS; i++) {
		/* Above 2**63 the helper corrects its quotient by steps of one: only exact enough
		 * with a 64-bit significand. */
		if ((QA[i] >> 63) && (cw & 0x300) != 0x300)
			continue;
		line_start("q ", cw);
		puthex(QA[i], 16); puts_(" ");
		puthex(QB[i], 16); puts_(" ");
		puthex(QA[i] / QB[i], 16); puts_("\n");
	}
}

__attribute__((noreturn)) void _start(void)
{
	u16 cw, sw;
	__asm__ volatile("finit");
	__asm__ volatile("fnstcw %0" : "=m"(cw));
	__asm__ volatile("fnstsw %0" : "=m"(sw));
	puts_("init ");
	puthex(cw, 4);
	puts_(" ");
	puthex(sw, 4);
	puts_("\n");
	for (u32 i = 0; i < NCWS; i++)
		run_cw(CWS[i]);
	outb(EXIT_PORT, 0);
	for (;;)
		__asm__ volatile("hlt");
}
