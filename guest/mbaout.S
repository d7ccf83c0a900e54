# mbaout -- a Multiboot kernel in the a.out-kludge form: a flat binary whose
# header (flag bit 16) says where it loads, instead of ELF program headers
# (Multiboot 0.6.96 §3.1.1 and §3.1.3).  Linked at 1 MiB as a flat image:
#
#   0x100000  load_addr: a jump over the header
#   0x100004  the header: magic, flags, checksum, header_addr, load_addr,
#             load_end_addr, bss_end_addr, entry_addr
#   ...       code and the message, up to load_end_addr
#   file tail 64 bytes of 0xCC *after* load_end_addr: a loader that honours
#             load_end_addr never copies them; bss_end_addr asks for 256
#             zeroed bytes from load_end_addr on, which the guest checks.
#
# Checks EAX == 0x2BADB002 and that the bss reads zero, then prints one line
# on the 8250 UART (COM1, polling LSR.THRE) and writes 0 to the exit port:
#   UART: "mbaout: hello from an a.out-kludge multiboot kernel\n", exit code 0.
# On a failed check it prints "mbaout: FAIL magic" or "mbaout: FAIL bss" and
# exits with 1 or 2.

        .equ    MB_MAGIC, 0x1BADB002
        .equ    MB_FLAGS, 0x00010002            # bit 1 (memory info) + bit 16 (a.out kludge)
        .equ    BSS_SIZE, 256
        .equ    COM1, 0x3F8
        .equ    EXIT_PORT, 0xF4

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
        .long   load_end + BSS_SIZE             # bss_end_addr
        .long   entry                           # entry_addr

entry:
_start:
        cld
        movl    $fail_magic, %esi
        movb    $1, %bl
        cmpl    $0x2BADB002, %eax
        jne     fail
        movl    $load_end, %edi                 # the bss: must be all zero
        movl    $BSS_SIZE, %ecx
        xorl    %eax, %eax
        repe scasb
        movl    $fail_bss, %esi
        movb    $2, %bl
        jne     fail
        movl    $msg, %esi
        call    print
        xorl    %eax, %eax
        outb    %al, $EXIT_PORT
        jmp     halt
fail:
        call    print
        movb    %bl, %al
        outb    %al, $EXIT_PORT
halt:
        cli
        hlt
        jmp     halt

print:                                          # ESI: NUL-terminated string
        lodsb
        testb   %al, %al
        jz      1f
        movb    %al, %ah
        movw    $COM1 + 5, %dx
2:      inb     %dx, %al                        # LSR.THRE: transmitter ready
        testb   $0x20, %al
        jz      2b
        movb    %ah, %al
        movw    $COM1, %dx
        outb    %al, %dx
        jmp     print
1:      ret

msg:        .asciz  "mbaout: hello from an a.out-kludge multiboot kernel\n"
fail_magic: .asciz  "mbaout: FAIL magic\n"
fail_bss:   .asciz  "mbaout: FAIL bss\n"
        .align  4
load_end:
        .fill   64, 1, 0xCC                     # in the file, never loaded
