# mpstart -- a Multiboot kernel that finds its CPUs in the firmware tables and
# starts the application processors the way a PC kernel does.
#
# 1. The MP table (Intel MP Spec 1.4): scans 0xF0000-0xFFFFF for the "_MP_"
#    floating pointer (§4.1), counts the processor entries (type 0, §4.3.1) of
#    the "PCMP" configuration table it points to.
# 2. ACPI: scans 0xE0000-0xFFFFF for the "RSD PTR " RSDP (ACPI 6.5 §5.2.5),
#    follows the RSDT to the "APIC" table (MADT, §5.2.12) and counts its
#    enabled Processor Local APIC entries.
# 3. Copies a real-mode trampoline to 0x7000, then through its local APIC's
#    ICR (0xFEE00300) sends INIT and twice a STARTUP IPI with vector 0x07 to
#    all but itself (MP spec Appendix B.4, the universal start-up algorithm).
#    Each AP starts in real mode at 0x0700:0000, loads the trampoline's GDT,
#    enters protected mode and jumps to ap_main at 1 MiB, which reads its
#    APIC ID (0xFEE00020, bits 31:24), prints "ap NN up" under a spinlock and
#    counts itself.
# 4. The BSP waits for MADT's count - 1 APs, prints "bsp: NN aps up" and
#    writes 0 to the exit port.
#
# Output on the debug console (port 0xE9), hex, for --vcpus 4:
#   mp: 04 cpus
#   madt: 04 cpus
#   ap 01 up / ap 02 up / ap 03 up (in any order)
#   bsp: 03 aps up
# then exit code 0. A failure prints "mpstart: FAIL" and exits with 1 (no MP
# floating pointer), 2 (bad MP table), 3 (no RSDP), 4 (no MADT) or 5 (the APs
# did not all come up).

        .equ    MB_MAGIC, 0x1BADB002
        .equ    MB_FLAGS, 0x00010002            # bit 1 (memory info) + bit 16 (a.out kludge)
        .equ    DEBUGCON, 0xE9
        .equ    EXIT_PORT, 0xF4
        .equ    LAPIC, 0xFEE00000
        .equ    LAPIC_ID, LAPIC + 0x20
        .equ    ICR_LOW, LAPIC + 0x300
        .equ    ICR_HIGH, LAPIC + 0x310
        # ICR: destination shorthand "all excluding self" (bits 19:18 = 11),
        # level assert (bit 14), delivery mode INIT (101) or STARTUP (110).
        .equ    IPI_INIT, 0x000C4500
        .equ    IPI_STARTUP, 0x000C4600
        .equ    TRAMPOLINE, 0x7000              # SIPI vector 0x07: the AP starts at 0x07000
        .equ    STACKS_TOP, 0x90000             # CPU n's stack ends at STACKS_TOP - n * 4 KiB
        .equ    WAIT_LOOPS, 4000000

        .code32
        .text
        .globl  _start
load_start:
        jmp     entry
        .align  4
mb_header:
        .long   MB_MAGIC
        .long   MB_FLAGS
        .long   -(MB_MAGIC + MB_FLAGS)
        .long   mb_header                       # header_addr
        .long   load_start                      # load_addr
        .long   load_end                        # load_end_addr
        .long   0                               # bss_end_addr: none
        .long   entry                           # entry_addr

entry:
_start:
        cld
        movl    $STACKS_TOP, %esp

        movl    $1, %ebp                        # 1. the MP floating pointer
        movl    $0xF0000, %esi
1:      cmpl    $0x5F504D5F, (%esi)             # "_MP_"
        je      2f
        addl    $16, %esi
        cmpl    $0x100000, %esi
        jb      1b
        jmp     fail
2:      movl    $2, %ebp
        movl    4(%esi), %edi                   # its configuration table
        cmpl    $0x504D4350, (%edi)             # "PCMP"
        jne     fail
        movzwl  34(%edi), %ecx                  # entry count
        addl    $44, %edi                       # past the header
        xorl    %edx, %edx
3:      cmpb    $0, (%edi)                      # a processor entry: 20 bytes; the others 8
        jne     4f
        incl    %edx
        addl    $12, %edi
4:      addl    $8, %edi
        decl    %ecx
        jnz     3b
        movl    $msg_mp, %esi
        call    puts
        movl    %edx, %eax
        call    hex8
        movl    $msg_cpus, %esi
        call    puts

        movl    $3, %ebp                        # 2. the RSDP, 16-byte aligned
        movl    $0xE0000, %esi
5:      cmpl    $0x20445352, (%esi)             # "RSD "
        jne     6f
        cmpl    $0x20525450, 4(%esi)            # "PTR "
        je      7f
6:      addl    $16, %esi
        cmpl    $0x100000, %esi
        jb      5b
        jmp     fail
7:      movl    $4, %ebp
        movl    16(%esi), %edi                  # RsdtAddress
        movl    4(%edi), %ecx                   # its length: header + 4 bytes per table
        subl    $36, %ecx
        shrl    $2, %ecx
        jz      fail
        leal    36(%edi), %ebx
8:      movl    (%ebx), %esi
        cmpl    $0x43495041, (%esi)             # "APIC"
        je      9f
        addl    $4, %ebx
        decl    %ecx
        jnz     8b
        jmp     fail
9:      movl    4(%esi), %ecx                   # the MADT's length
        addl    %esi, %ecx                      # its end
        leal    44(%esi), %edi                  # its first entry
        xorl    %edx, %edx
10:     cmpl    %ecx, %edi
        jae     12f
        cmpb    $0, (%edi)                      # Processor Local APIC
        jne     11f
        testb   $1, 4(%edi)                     # enabled
        jz      11f
        incl    %edx
11:     movzbl  1(%edi), %eax                   # entry length
        addl    %eax, %edi
        jmp     10b
12:     movl    %edx, madt_cpus
        movl    $msg_madt, %esi
        call    puts
        movl    %edx, %eax
        call    hex8
        movl    $msg_cpus, %esi
        call    puts

        movl    $trampoline_start, %esi         # 3. the trampoline, INIT, STARTUP x2
        movl    $TRAMPOLINE, %edi
        movl    $(trampoline_end - trampoline_start), %ecx
        rep movsb
        movl    $0, ICR_HIGH
        movl    $IPI_INIT, ICR_LOW
        call    delay
        movl    $(IPI_STARTUP | TRAMPOLINE >> 12), ICR_LOW
        call    delay
        movl    $(IPI_STARTUP | TRAMPOLINE >> 12), ICR_LOW

        movl    $5, %ebp                        # 4. wait for the APs
        movl    madt_cpus, %ecx
        decl    %ecx
        movl    $WAIT_LOOPS, %edx
13:     cmpl    %ecx, ap_count
        je      14f
        pause
        decl    %edx
        jnz     13b
        jmp     fail
14:     call    lock
        movl    $msg_bsp, %esi
        call    puts
        movl    ap_count, %eax
        call    hex8
        movl    $msg_aps, %esi
        call    puts
        xorl    %eax, %eax
        outb    %al, $EXIT_PORT
        jmp     halt

fail:
        movl    $msg_fail, %esi
        call    puts
        movl    %ebp, %eax
        outb    %al, $EXIT_PORT
halt:
        cli
        hlt
        jmp     halt

ap_main:                                        # an AP, in protected mode, flat segments
        movl    LAPIC_ID, %ebx
        shrl    $24, %ebx                       # its APIC ID
        movl    %ebx, %esp
        shll    $12, %esp
        negl    %esp
        addl    $STACKS_TOP, %esp
        call    lock
        movl    $msg_ap, %esi
        call    puts
        movl    %ebx, %eax
        call    hex8
        movl    $msg_up, %esi
        call    puts
        incl    ap_count
        movl    $0, spinlock
        jmp     halt

lock:                                           # take the console lock
        movl    $1, %eax
        xchgl   %eax, spinlock
        testl   %eax, %eax
        jz      1f
        pause
        jmp     lock
1:      ret

delay:                                          # a short wait between IPIs
        movl    $2000, %eax
1:      pause
        decl    %eax
        jnz     1b
        ret

puts:                                           # ESI: NUL-terminated string
        lodsb
        testb   %al, %al
        jz      1f
        outb    %al, $DEBUGCON
        jmp     puts
1:      ret

hex8:                                           # AL as 2 hex digits
        pushl   %eax
        shrb    $4, %al
        call    1f
        popl    %eax
1:      andl    $0xF, %eax
        movb    hexdigits(%eax), %al
        outb    %al, $DEBUGCON
        ret

# The AP's first instructions, copied to TRAMPOLINE: real mode, CS = 0x0700.
        .code16
trampoline_start:
        cli
        xorw    %ax, %ax
        movw    %ax, %ds
        lgdtl   TRAMPOLINE + (tramp_gdt_desc - trampoline_start)
        movl    %cr0, %eax
        orl     $1, %eax                        # CR0.PE
        movl    %eax, %cr0
        ljmpl   $0x08, $(TRAMPOLINE + (tramp32 - trampoline_start))
        .code32
tramp32:
        movw    $0x10, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movl    $ap_main, %eax
        jmp     *%eax
        .align  8
tramp_gdt:
        .quad   0
        .quad   0x00CF9A000000FFFF              # 0x08: flat 32-bit code
        .quad   0x00CF92000000FFFF              # 0x10: flat data
tramp_gdt_desc:
        .word   3 * 8 - 1
        .long   TRAMPOLINE + (tramp_gdt - trampoline_start)
trampoline_end:

msg_mp:     .asciz  "mp: "
msg_madt:   .asciz  "madt: "
msg_cpus:   .asciz  " cpus\n"
msg_ap:     .asciz  "ap "
msg_up:     .asciz  " up\n"
msg_bsp:    .asciz  "bsp: "
msg_aps:    .asciz  " aps up\n"
msg_fail:   .asciz  "mpstart: FAIL\n"
hexdigits:  .ascii  "0123456789abcdef"
        .align  4
madt_cpus:  .long   0
ap_count:   .long   0
spinlock:   .long   0
load_end:
