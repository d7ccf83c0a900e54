# bzguest: a tiny kernel in the Linux x86 boot protocol's bzImage format, with
# its own setup header (Documentation/arch/x86/boot.rst, "The Real-Mode Kernel
# Header"), to show what a Linux boot loader hands a kernel.  It prints, on the
# UART (COM1, 0x3F8), the zero page (struct boot_params, zero-page.rst) at
# ESI/RSI: the loader type, the segment selectors it was entered with, the
# e820 map, the command line, screen_info and the initrd's address, size and
# byte sum; then writes 0 to port 0xF4 (exit code 0).
#
# Both entries of the protocol: the 32-bit one at code32_start (the start of
# the protected-mode kernel, 0x100000) and the 64-bit one 0x200 bytes further
# (xloadflags XLF_KERNEL_64).  The report is one macro assembled twice, once
# as 32-bit and once as 64-bit code: it uses 32-bit registers and addresses
# only (below 4 GiB), which mean the same in both modes, and no push/pop.
# Output bytes go straight to THR: vmsup's UART never makes a transmitter
# wait (guest/README.md), so LSR is not polled.
#
# Output, for `--cmdline "hello world"` and a 5000-byte initrd (hex numbers):
#   bzguest: 64-bit entry, boot_params 00008000
#   loader ff cs 10 ds 18 ss 18
#   e820 06
#   e820 0000000000000000 0000000000001000 01
#   ...
#   cmdline hello world
#   screen mode 03 cols 50 lines 19 vga 01
#   initrd 00fff000 00001388 sum 0009ab12
#   bzguest: done

	.set COM1, 0x3F8
	.set EXIT_PORT, 0xF4
	.set SETUP_SECTS, 1		# bzguest.ld places the kernel at (1 + 1) * 512

# --- boot sector and setup: file offsets 0x000..0x3ff -----------------------
	.section .setup, "ax"
	.code16
	.org 0x1F1
setup_sects:	.byte SETUP_SECTS
root_flags:	.word 0
syssize:	.long _syssize		# protected-mode code, 16-byte paragraphs
ram_size:	.word 0
vid_mode:	.word 0xFFFF		# "normal"
root_dev:	.word 0
boot_flag:	.word 0xAA55
	# 0x200: a short jmp over the header; its offset byte also says where
	# the header ends (0x202 + byte at 0x201).
jump:		.byte 0xEB, header_end - 0x202
header:		.ascii "HdrS"
version:	.word 0x020F		# protocol 2.15
realmode_swtch:	.long 0
start_sys_seg:	.word 0x1000
kernel_version:	.word 0
type_of_loader:	.byte 0			# the loader writes its id here
loadflags:	.byte 0x01		# LOADED_HIGH: the kernel loads at 1 MiB
setup_move_size: .word 0
code32_start:	.long 0x100000
ramdisk_image:	.long 0
ramdisk_size:	.long 0
bootsect_kludge: .long 0
heap_end_ptr:	.word 0
ext_loader_ver:	.byte 0
ext_loader_type: .byte 0
cmd_line_ptr:	.long 0
initrd_addr_max: .long 0x7FFFFFFF
kernel_alignment: .long 0x1000
relocatable_kernel: .byte 0
min_alignment:	.byte 0
xloadflags:	.word 0x0001		# XLF_KERNEL_64: the 64-bit entry at +0x200
cmdline_size:	.long 2047
hardware_subarch: .long 0
hardware_subarch_data: .quad 0
payload_offset:	.long 0
payload_length:	.long 0
setup_data:	.quad 0
pref_address:	.quad 0x100000
init_size:	.long _init_size	# code plus the stack above it
handover_offset: .long 0
kernel_info_offset: .long 0
header_end:
	# Real-mode setup code: a loader that runs it gets a stopped CPU.
	cli
	hlt
	.org 0x400

# --- the protected-mode kernel: file offset 0x400, runs at 0x100000 --------
	.section .kernel, "awx"
	.code32
	.globl _start
_start:				# the 32-bit entry (code32_start)
	mov $stack_top, %esp
	mov %esi, %ebp		# boot_params
	mov $msg_entry32, %edi
	jmp report32

	.org 0x200
	.code64
startup_64:			# the 64-bit entry: load address + 0x200
	mov $stack_top, %esp
	mov %esi, %ebp
	mov $msg_entry64, %edi
	jmp report64

# The report, for one mode; \sfx names its copy.  Registers: EBP = boot_params
# throughout; EBX, ECX walk tables; helpers clobber EAX, EDX, ESI, EDI.
.macro REPORT sfx
report\sfx:
	call puts\sfx
	mov %ebp, %eax
	call hex32\sfx
	call newline\sfx

	mov $msg_loader, %edi		# type_of_loader (0x210) and the selectors
	call puts\sfx
	movzbl 0x210(%ebp), %eax
	call hex8\sfx
	mov $msg_cs, %edi
	call puts\sfx
	mov %cs, %eax
	call hex8\sfx
	mov $msg_ds, %edi
	call puts\sfx
	mov %ds, %eax
	call hex8\sfx
	mov $msg_ss, %edi
	call puts\sfx
	mov %ss, %eax
	call hex8\sfx
	call newline\sfx

	mov $msg_e820, %edi		# e820_entries (0x1E8), e820_table (0x2D0)
	call puts\sfx
	movzbl 0x1E8(%ebp), %eax
	call hex8\sfx
	call newline\sfx
	movzbl 0x1E8(%ebp), %ecx
	lea 0x2D0(%ebp), %ebx
e820_next\sfx:
	test %ecx, %ecx
	jz e820_done\sfx
	mov $msg_e820, %edi
	call puts\sfx
	mov 4(%ebx), %eax		# addr, high then low half
	call hex32\sfx
	mov (%ebx), %eax
	call hex32_nospace\sfx
	mov 12(%ebx), %eax		# size
	call hex32\sfx
	mov 8(%ebx), %eax
	call hex32_nospace\sfx
	movzbl 16(%ebx), %eax		# type
	call hex8\sfx
	call newline\sfx
	add $20, %ebx
	dec %ecx
	jmp e820_next\sfx
e820_done\sfx:

	mov $msg_cmdline, %edi		# cmd_line_ptr (0x228)
	call puts\sfx
	mov 0x228(%ebp), %edi
	test %edi, %edi
	jz cmdline_done\sfx
	call puts\sfx
cmdline_done\sfx:
	call newline\sfx

	mov $msg_screen, %edi		# screen_info (0x000)
	call puts\sfx
	movzbl 0x06(%ebp), %eax		# orig_video_mode
	call hex8\sfx
	mov $msg_cols, %edi
	call puts\sfx
	movzbl 0x07(%ebp), %eax		# orig_video_cols
	call hex8\sfx
	mov $msg_lines, %edi
	call puts\sfx
	movzbl 0x0E(%ebp), %eax		# orig_video_lines
	call hex8\sfx
	mov $msg_vga, %edi
	call puts\sfx
	movzbl 0x0F(%ebp), %eax		# orig_video_isVGA
	call hex8\sfx
	call newline\sfx

	mov $msg_initrd, %edi		# ramdisk_image (0x218), ramdisk_size (0x21C)
	call puts\sfx
	mov 0x218(%ebp), %eax
	call hex32\sfx
	mov 0x21C(%ebp), %eax
	call hex32\sfx
	mov $msg_sum, %edi
	call puts\sfx
	mov 0x218(%ebp), %ebx
	mov 0x21C(%ebp), %ecx
	xor %eax, %eax
sum_next\sfx:				# the initrd's bytes, summed mod 2^32
	test %ecx, %ecx
	jz sum_done\sfx
	movzbl (%ebx), %edi
	add %edi, %eax
	inc %ebx
	dec %ecx
	jmp sum_next\sfx
sum_done\sfx:
	call hex32\sfx
	call newline\sfx

	mov $msg_done, %edi
	call puts\sfx
	xor %eax, %eax
	out %al, $EXIT_PORT
halt\sfx:
	cli
	hlt
	jmp halt\sfx

putc\sfx:				# AL
	mov $COM1, %dx
	out %al, %dx
	ret
puts\sfx:				# the NUL-terminated string at EDI
	movzbl (%edi), %eax
	test %eax, %eax
	jz puts_end\sfx
	call putc\sfx
	inc %edi
	jmp puts\sfx
puts_end\sfx:
	ret
newline\sfx:
	mov $'\n', %al
	jmp putc\sfx
hex32\sfx:				# " " and EAX as 8 hex digits
	mov %eax, %edi
	mov $' ', %al
	call putc\sfx
	mov %edi, %eax
hex32_nospace\sfx:			# EAX as 8 hex digits
	mov $8, %esi
	mov %eax, %edi
	jmp hex_digits\sfx
hex8\sfx:				# " " and AL as 2 hex digits
	shl $24, %eax
	mov %eax, %edi
	mov $' ', %al
	call putc\sfx
	mov $2, %esi
hex_digits\sfx:				# the top ESI nibbles of EDI
	rol $4, %edi
	mov %edi, %eax
	and $0xF, %eax
	movzbl hexdigits(%eax), %eax
	call putc\sfx
	dec %esi
	jnz hex_digits\sfx
	ret
.endm

	.code32
	REPORT 32
	.code64
	REPORT 64

msg_entry32:	.asciz "bzguest: 32-bit entry, boot_params"
msg_entry64:	.asciz "bzguest: 64-bit entry, boot_params"
msg_loader:	.asciz "loader"
msg_cs:		.asciz " cs"
msg_ds:		.asciz " ds"
msg_ss:		.asciz " ss"
msg_e820:	.asciz "e820"
msg_cmdline:	.asciz "cmdline "
msg_screen:	.asciz "screen mode"
msg_cols:	.asciz " cols"
msg_lines:	.asciz " lines"
msg_vga:	.asciz " vga"
msg_initrd:	.asciz "initrd"
msg_sum:	.asciz " sum"
msg_done:	.asciz "bzguest: done\n"
hexdigits:	.ascii "0123456789abcdef"
