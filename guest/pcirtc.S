# pcirtc: what real programs probe first, from 32-bit protected mode.
#
# 1. PCI bus 0 through configuration mechanism #1 (CONFIG_ADDRESS 0xCF8,
#    CONFIG_DATA 0xCFC; PCI Local Bus Spec 3.0 §3.2.2.3.2): for each of the 32
#    devices, function 0's vendor/device dword; all-ones means nothing there.
#    For each device found, the class code (register 0x08, bits 31:8).
# 2. The CMOS RTC (MC146818A, index 0x70, data 0x71): waits until register A's
#    UIP bit is clear, then reads century (0x32), year, month, day, hours,
#    minutes, seconds and registers B and D in the RTC's default BCD mode; sets
#    register B's DM bit (binary) and reads the time again.
# 3. POST codes to port 0x80 before each step (0x11, 0x22, 0x33).
#
# Output on the UART (COM1, written without polling LSR: vmsup's transmitter
# never makes it wait), numbers in hex, so BCD values read as decimal digits:
#   pci 00:00.0 8086:1237 class 060000
#   pci: 01 devices
#   rtc bcd 20 26-12-04 21:58:07 b 02 d 80
#   rtc bin 14 1a-0c-04 15:3a:07 b 06
# then exit code 0 (a write of 0 to port 0xF4).

	.set COM1, 0x3F8
	.set EXIT_PORT, 0xF4
	.set POST_PORT, 0x80
	.set PCI_ADDRESS, 0xCF8
	.set PCI_DATA, 0xCFC
	.set RTC_INDEX, 0x70
	.set RTC_DATA, 0x71

	.code32
	.text
	.globl _start
_start:
	mov $0x11, %al
	out %al, $POST_PORT

	xor %ebx, %ebx			# device number
	xor %ebp, %ebp			# devices found
scan:
	mov %ebx, %eax			# enable | bus 0 | device << 11 | function 0 | register 0
	shl $11, %eax
	or $0x80000000, %eax
	mov $PCI_ADDRESS, %dx
	out %eax, %dx
	mov $PCI_DATA, %dx
	in %dx, %eax
	cmp $0xFFFFFFFF, %eax
	je next
	inc %ebp
	mov %eax, %ecx			# device id << 16 | vendor id
	mov $msg_pci, %esi
	call puts
	mov %ebx, %eax
	call hex8
	mov $msg_fn0, %esi
	call puts
	mov %ecx, %eax			# vendor
	shl $16, %eax
	mov $4, %edi
	call hex_digits
	mov $':', %al
	call putc
	mov %ecx, %eax			# device
	mov $4, %edi
	call hex_digits
	mov $msg_class, %esi
	call puts
	mov %ebx, %eax			# register 0x08: class code << 8 | revision
	shl $11, %eax
	or $0x80000008, %eax
	mov $PCI_ADDRESS, %dx
	out %eax, %dx
	mov $PCI_DATA, %dx
	in %dx, %eax
	and $0xFFFFFF00, %eax
	mov $6, %edi
	call hex_digits
	call newline
next:
	inc %ebx
	cmp $32, %ebx
	jb scan
	mov $msg_count, %esi
	call puts
	mov %ebp, %eax
	shl $24, %eax
	mov $2, %edi
	call hex_digits
	mov $msg_devices, %esi
	call puts

	mov $0x22, %al
	out %al, $POST_PORT
	mov $msg_bcd, %esi
	call rtc_line
	mov $msg_b, %esi
	call puts
	mov $0x0B, %al
	call rtc_byte
	mov $msg_d, %esi
	call puts
	mov $0x0D, %al
	call rtc_byte
	call newline

	mov $0x0B, %al			# register B: binary (DM), 24-hour
	out %al, $RTC_INDEX
	mov $0x06, %al
	out %al, $RTC_DATA
	mov $msg_bin, %esi
	call rtc_line
	mov $msg_b, %esi
	call puts
	mov $0x0B, %al
	call rtc_byte
	call newline

	mov $0x33, %al
	out %al, $POST_PORT
	xor %eax, %eax
	out %al, $EXIT_PORT
halt:
	cli
	hlt
	jmp halt

rtc_line:				# the label at ESI, then "CC YY-MM-DD HH:MM:SS"
	call puts
uip:	mov $0x0A, %al			# wait for register A's UIP to clear: the
	out %al, $RTC_INDEX		# time registers then hold still for 244 us
	in $RTC_DATA, %al
	test $0x80, %al
	jnz uip
	mov $rtc_fields, %ebx
field:
	movzbl (%ebx), %eax		# register
	cmp $0xFF, %al
	je 1f
	call rtc_byte
	movzbl 1(%ebx), %eax		# separator (0 = none)
	test %al, %al
	jz 2f
	call putc
2:	add $2, %ebx
	jmp field
1:	ret

rtc_byte:				# register AL's value as 2 hex digits
	out %al, $RTC_INDEX
	in $RTC_DATA, %al
	shl $24, %eax
	mov $2, %edi
	jmp hex_digits

putc:					# AL
	mov $COM1, %dx
	out %al, %dx
	ret
puts:					# the NUL-terminated string at ESI
	movzbl (%esi), %eax
	test %eax, %eax
	jz 1f
	call putc
	inc %esi
	jmp puts
1:	ret
newline:
	mov $'\n', %al
	jmp putc
hex8:					# AL as 2 hex digits
	shl $24, %eax
	mov $2, %edi
hex_digits:				# the top EDI nibbles of EAX
	mov %eax, %esi
1:	rol $4, %esi
	mov %esi, %eax
	and $0xF, %eax
	movzbl hexdigits(%eax), %eax
	call putc
	dec %edi
	jnz 1b
	ret

rtc_fields:	# (register, separator after it)
	.byte 0x32, ' ', 0x09, '-', 0x08, '-', 0x07, ' ', 0x04, ':', 0x02, ':', 0x00, 0, 0xFF
msg_pci:	.asciz "pci 00:"
msg_fn0:	.asciz ".0 "
msg_class:	.asciz " class "
msg_count:	.asciz "pci: "
msg_devices:	.asciz " devices\n"
msg_bcd:	.asciz "rtc bcd "
msg_bin:	.asciz "rtc bin "
msg_b:		.asciz " b "
msg_d:		.asciz " d "
hexdigits:	.ascii "0123456789abcdef"
