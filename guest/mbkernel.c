/*
 * mbkernel -- a small Multiboot (v1) kernel in freestanding C, for vmsup's
 * tests of real-kernel support.  Entry, header, stack and interrupt stubs are
 * in mbkernel_entry.S; the link map in mbkernel.ld (loaded at 1 MiB).
 *
 * What it does, in order:
 *   1. checks EAX == 0x2BADB002 (else prints "bad magic" and exits with 1);
 *   2. prints a banner on the VGA text screen (0xB8000, with the CRTC cursor
 *      at 0x3D4/0x3D5) and on the 8250 UART at COM1 (0x3F8) -- every line
 *      goes to both;
 *   3. prints what the multiboot info says: mem_lower/mem_upper, each memory
 *      map entry, the command line and the boot loader name;
 *   4. loads its own GDT and an IDT, remaps the 8259 PICs to vectors
 *      0x20-0x2F, programs PIT channel 0 at 100 Hz, unmasks IRQ 0 and 1;
 *   5. sleeps in `sti; hlt`, counting timer ticks; each key press (IRQ 1,
 *      scan code set 1) is echoed; Enter prints "enter at tick N"; `q`
 *      quits;
 *   6. at `q`, or after maxticks ticks (300 = 3 s unless the command line
 *      says maxticks=N, 0 = never), prints "ticks: N" and writes 0 to the exit
 *      port 0xF4: guest exit code 0.
 * Command line words: maxticks=N (see above), report=N (print "tick N" every
 * N ticks).  A CPU exception prints "exception V at EIP" and exits with
 * code 0x80 + V.
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define MULTIBOOT_BOOTLOADER_MAGIC 0x2BADB002u
#define EXIT_PORT 0xF4
#define COM1 0x3F8
#define VGA ((volatile u16 *)0xB8000)
#define VGA_COLS 80
#define VGA_ROWS 25

/* Multiboot 0.6.96 §3.3: the fields of the boot information we read. */
struct multiboot_info {
	u32 flags, mem_lower, mem_upper, boot_device, cmdline, mods_count, mods_addr;
	u32 syms[4];
	u32 mmap_length, mmap_addr, drives_length, drives_addr, config_table, boot_loader_name;
};
struct __attribute__((packed)) mmap_entry {
	u32 size;
	u64 base_addr, length;
	u32 type;
};

/* The registers isr_common pushes, in memory order (pushal, then the stub's pushes, then the CPU's). */
struct frame {
	u32 edi, esi, ebp, esp, ebx, edx, ecx, eax;
	u32 vector, error, eip, cs, eflags;
};

extern const u32 isr_table[48];

static volatile u32 ticks;
static volatile int quit;
static u32 max_ticks = 300;
static u32 report_every;
static int shift, extended;
static int row, col;     /* VGA cursor */
static int serial_col;   /* column on the serial line, to end a partial line before "ticks:" */

/* freestanding: the compiler may still emit calls to these */
void *memset(void *d, int c, unsigned long n)
{
	u8 *p = d;
	while (n--)
		*p++ = (u8)c;
	return d;
}

void *memcpy(void *d, const void *s, unsigned long n)
{
	u8 *p = d;
	const u8 *q = s;
	while (n--)
		*p++ = *q++;
	return d;
}

static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}

static void guest_exit(u8 code)
{
	outb(EXIT_PORT, code);
	for (;;)
		__asm__ volatile("cli; hlt");
}

/* --- output: the 8250 UART and the VGA text screen ----------------------- */

static void serial_init(void)
{
	outb(COM1 + 1, 0x00);   /* IER: no UART interrupts */
	outb(COM1 + 3, 0x80);   /* LCR: DLAB, to set the divisor */
	outb(COM1 + 0, 0x01);   /* DLL: 115200 baud */
	outb(COM1 + 1, 0x00);   /* DLM */
	outb(COM1 + 3, 0x03);   /* LCR: 8N1 */
}

static void serial_putc(char c)
{
	while (!(inb(COM1 + 5) & 0x20))   /* LSR.THRE */
		;
	outb(COM1, (u8)c);
	serial_col = c == '\n' ? 0 : serial_col + 1;
}

static void vga_cursor(void)
{
	u16 pos = (u16)(row * VGA_COLS + col);
	outb(0x3D4, 0x0E);   /* CRTC cursor location high */
	outb(0x3D5, (u8)(pos >> 8));
	outb(0x3D4, 0x0F);   /* CRTC cursor location low */
	outb(0x3D5, (u8)pos);
}

static u8 attr = 0x07;

static void vga_putc(char c)
{
	if (c == '\n') {
		col = 0;
		row++;
	} else if (c == '\b') {
		if (col > 0)
			VGA[row * VGA_COLS + --col] = (u16)(attr << 8 | ' ');
	} else {
		VGA[row * VGA_COLS + col] = (u16)(attr << 8 | (u8)c);
		if (++col == VGA_COLS) {
			col = 0;
			row++;
		}
	}
	if (row == VGA_ROWS) {   /* scroll up one line */
		for (int i = 0; i < (VGA_ROWS - 1) * VGA_COLS; i++)
			VGA[i] = VGA[i + VGA_COLS];
		for (int i = 0; i < VGA_COLS; i++)
			VGA[(VGA_ROWS - 1) * VGA_COLS + i] = (u16)(0x07 << 8 | ' ');
		row = VGA_ROWS - 1;
	}
}

static void print(const char *s)
{
	for (const char *p = s; *p; p++) {
		serial_putc(*p);
		vga_putc(*p);
	}
	vga_cursor();
}

static void print_char(char c)
{
	char s[2] = {c, 0};
	print(s);
}

static void put_dec(u32 v)
{
	char buf[11];
	int i = 10;
	buf[i] = 0;
	do {
		buf[--i] = (char)('0' + v % 10);
		v /= 10;
	} while (v);
	print(buf + i);
}

static void put_hex(u64 v, int digits)
{
	char buf[19] = "0x";
	for (int i = 0; i < digits; i++)
		buf[2 + i] = "0123456789ABCDEF"[(v >> (4 * (digits - 1 - i))) & 0xF];
	buf[2 + digits] = 0;
	print(buf);
}

/* --- the multiboot information ------------------------------------------- */

static u32 parse_number(const char *s)
{
	u32 v = 0;
	while (*s >= '0' && *s <= '9')
		v = v * 10 + (u32)(*s++ - '0');
	return v;
}

static int starts_with(const char *s, const char *prefix)
{
	while (*prefix)
		if (*s++ != *prefix++)
			return 0;
	return 1;
}

static void parse_cmdline(const char *s)
{
	while (*s) {
		while (*s == ' ')
			s++;
		if (starts_with(s, "maxticks="))
			max_ticks = parse_number(s + 9);
		else if (starts_with(s, "report="))
			report_every = parse_number(s + 7);
		while (*s && *s != ' ')
			s++;
	}
}

static void show_boot_info(const struct multiboot_info *mbi)
{
	print("flags: ");
	put_hex(mbi->flags, 8);
	print("\n");
	if (mbi->flags & (1u << 0)) {   /* mem_lower, mem_upper */
		print("mem_lower: ");
		put_dec(mbi->mem_lower);
		print(" KiB, mem_upper: ");
		put_dec(mbi->mem_upper);
		print(" KiB\n");
	}
	if (mbi->flags & (1u << 6)) {   /* memory map */
		u32 at = mbi->mmap_addr;
		while (at < mbi->mmap_addr + mbi->mmap_length) {
			const struct mmap_entry *e = (const struct mmap_entry *)at;
			print("mmap: base ");
			put_hex(e->base_addr, 16);
			print(" length ");
			put_hex(e->length, 16);
			print(" type ");
			put_dec(e->type);
			print("\n");
			at += e->size + 4;   /* size does not count itself */
		}
	}
	if (mbi->flags & (1u << 2)) {   /* command line */
		const char *cmdline = (const char *)mbi->cmdline;
		print("cmdline: '");
		print(cmdline);
		print("'\n");
		parse_cmdline(cmdline);
	}
	if (mbi->flags & (1u << 9)) {   /* boot loader name */
		print("loader: '");
		print((const char *)mbi->boot_loader_name);
		print("'\n");
	}
}

/* --- descriptor tables, PIC, PIT ---------------------------------------- */

/* Flat 4 GiB code and data (SDM Vol. 3A §3.4.5): §3.2 of the Multiboot spec
 * says the loader's GDTR may be invalid, and an interrupt reloads CS. */
static const u64 gdt[3] = {0, 0x00CF9A000000FFFFull, 0x00CF92000000FFFFull};
static u64 idt[48];

struct __attribute__((packed)) table_register {
	u16 limit;
	u32 base;
};

static void load_gdt(void)
{
	static struct table_register gdtr;
	gdtr.limit = sizeof gdt - 1;
	gdtr.base = (u32)gdt;
	__asm__ volatile("lgdt %0\n\t"
			 "ljmp $0x08, $1f\n"
			 "1:\n\t"
			 "movw $0x10, %%ax\n\t"
			 "movw %%ax, %%ds\n\t"
			 "movw %%ax, %%es\n\t"
			 "movw %%ax, %%fs\n\t"
			 "movw %%ax, %%gs\n\t"
			 "movw %%ax, %%ss"
			 : : "m"(gdtr) : "eax", "memory");
}

static void load_idt(void)
{
	static struct table_register idtr;
	/* 32-bit interrupt gates (SDM Vol. 3A §6.11): present, DPL 0, type 0xE; selector 0x08. */
	for (int v = 0; v < 48; v++) {
		u32 off = isr_table[v];
		idt[v] = (u64)(off & 0xFFFF) | (u64)0x08 << 16 | (u64)0x8E << 40 | (u64)(off >> 16) << 48;
	}
	idtr.limit = sizeof idt - 1;
	idtr.base = (u32)idt;
	__asm__ volatile("lidt %0" : : "m"(idtr) : "memory");
}

/* 8259A: ICW1 0x11 = edge triggered, cascade, ICW4 follows; ICW2 = vector
 * base; ICW3 = slave on IR2 (master) / cascade identity 2 (slave); ICW4 0x01
 * = 8086 mode.  OCW1 then masks all but IR0 (timer) and IR1 (keyboard). */
static void pic_init(void)
{
	outb(0x20, 0x11);
	outb(0xA0, 0x11);
	outb(0x21, 0x20);
	outb(0xA1, 0x28);
	outb(0x21, 0x04);
	outb(0xA1, 0x02);
	outb(0x21, 0x01);
	outb(0xA1, 0x01);
	outb(0x21, 0xFC);
	outb(0xA1, 0xFF);
}

static void pic_eoi(u32 irq)
{
	if (irq >= 8)
		outb(0xA0, 0x20);   /* OCW2: non-specific EOI */
	outb(0x20, 0x20);
}

/* 8254: control word 0x34 = counter 0, LSB then MSB, mode 2 (rate
 * generator), binary; 1193182 Hz / 11932 = 100.0 Hz. */
static void pit_init(void)
{
	u16 divisor = 11932;
	outb(0x43, 0x34);
	outb(0x40, (u8)divisor);
	outb(0x40, (u8)(divisor >> 8));
}

/* --- interrupts ---------------------------------------------------------- */

/* Scan code set 1 make codes 0x00-0x39 on a US layout; 0 = no character. */
static const char keymap[2][0x3A] = {
	{0, 27, '1', '2', '3', '4', '5', '6', '7', '8', '9', '0', '-', '=', '\b', '\t',
	 'q', 'w', 'e', 'r', 't', 'y', 'u', 'i', 'o', 'p', '[', ']', '\n', 0, 'a', 's',
	 'd', 'f', 'g', 'h', 'j', 'k', 'l', ';', '\'', '`', 0, '\\', 'z', 'x', 'c', 'v',
	 'b', 'n', 'm', ',', '.', '/', 0, '*', 0, ' '},
	{0, 27, '!', '@', '#', '$', '%', '^', '&', '*', '(', ')', '_', '+', '\b', '\t',
	 'Q', 'W', 'E', 'R', 'T', 'Y', 'U', 'I', 'O', 'P', '{', '}', '\n', 0, 'A', 'S',
	 'D', 'F', 'G', 'H', 'J', 'K', 'L', ':', '"', '~', 0, '|', 'Z', 'X', 'C', 'V',
	 'B', 'N', 'M', '<', '>', '?', 0, '*', 0, ' '},
};

static void keyboard(u8 code)
{
	if (code == 0xE0) {   /* an extended key follows: arrows etc., not echoed */
		extended = 1;
		return;
	}
	if (extended) {
		extended = 0;
		return;
	}
	if (code == 0x2A || code == 0x36) {   /* left/right shift pressed */
		shift = 1;
		return;
	}
	if (code == 0xAA || code == 0xB6) {   /* released */
		shift = 0;
		return;
	}
	if (code & 0x80 || code >= sizeof keymap[0])
		return;   /* key releases and keys without a character */
	char c = keymap[shift][code];
	if (c == 'q') {
		quit = 1;
	} else if (c == '\n') {
		print("\nenter at tick ");
		put_dec(ticks);
		print("\n");
	} else if (c) {
		print_char(c);
	}
}

void isr_dispatch(struct frame *f)
{
	if (f->vector == 0x20) {
		ticks++;
		if (report_every && ticks % report_every == 0) {
			if (serial_col)
				print("\n");
			print("tick ");
			put_dec(ticks);
			print("\n");
		}
		pic_eoi(0);
	} else if (f->vector == 0x21) {
		if (inb(0x64) & 0x01)   /* 8042 status: output buffer full */
			keyboard(inb(0x60));
		pic_eoi(1);
	} else if (f->vector < 0x20) {
		print("\nexception ");
		put_dec(f->vector);
		print(" at ");
		put_hex(f->eip, 8);
		print("\n");
		guest_exit((u8)(0x80 + f->vector));
	} else {
		pic_eoi(f->vector - 0x20);
	}
}

/* --- main ---------------------------------------------------------------- */

void kmain(u32 magic, const struct multiboot_info *mbi)
{
	serial_init();
	for (int i = 0; i < VGA_COLS * VGA_ROWS; i++)
		VGA[i] = (u16)(0x07 << 8 | ' ');
	attr = 0x1F;   /* white on blue */
	print("mbkernel: hello from a multiboot kernel\n");
	attr = 0x07;
	if (magic != MULTIBOOT_BOOTLOADER_MAGIC) {
		print("bad magic ");
		put_hex(magic, 8);
		print("\n");
		guest_exit(1);
	}
	show_boot_info(mbi);

	load_gdt();
	load_idt();
	pic_init();
	pit_init();
	while (inb(0x64) & 0x01)   /* drain the 8042 output buffer */
		inb(0x60);
	print("ready: PIT at 100 Hz on IRQ 0, keyboard on IRQ 1; Enter shows the tick count, q quits\n");

	for (;;) {
		__asm__ volatile("cli");
		if (quit || (max_ticks && ticks >= max_ticks))
			break;
		/* STI's interrupt shadow (SDM Vol. 2B, STI) covers HLT: no wake-up is lost in between. */
		__asm__ volatile("sti; hlt");
	}
	if (serial_col)
		print("\n");
	print("ticks: ");
	put_dec(ticks);
	print("\n");
	guest_exit(0);
}
