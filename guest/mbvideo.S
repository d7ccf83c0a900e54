# mbvideo -- a Multiboot kernel that asks for video mode information (header
# flag bit 2, Multiboot 0.6.96 §3.1.2) and takes the EGA text mode a loader may
# answer with (§3.1.4: "the boot loader may set a text mode even if this field
# contains 0").  An a.out-kludge flat image at 1 MiB, like mbaout; its header
# has the graphics fields (mode_type 1 = EGA text, 80 x 25, depth 0).
#
# Checks the boot information at EBX (§3.3): EAX = 0x2BADB002, flags bit 12
# (framebuffer_* valid), framebuffer_addr 0xB8000, pitch 160, width 80,
# height 25, bpp 16, framebuffer_type 2 (EGA text).  Then writes its line into
# the framebuffer it was given (row 0, grey on black) and on the UART (COM1,
# polling LSR.THRE), and exits with 0:
#   UART: "mbvideo: EGA text 80x25 at 0xb8000\n", exit code 0.
# A failed check prints "mbvideo: FAIL" and exits with the check's number
# (1 magic, 2 flags bit 12, 3 address, 4 pitch, 5 width, 6 height, 7 bpp,
# 8 type).

        .equ    MB_MAGIC, 0x1BADB002
        .equ    MB_FLAGS, 0x00010006            # bit 1 (memory info) + bit 2 (video mode) + bit 16 (a.out kludge)
        .equ    COM1, 0x3F8
        .equ    EXIT_PORT, 0xF4
        .equ    INFO_FRAMEBUFFER, 1 << 12

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
        .long   0                               # bss_end_addr: no bss
        .long   entry                           # entry_addr
        .long   1                               # mode_type: EGA text
        .long   80                              # width (characters)
        .long   25                              # height
        .long   0                               # depth: 0 in text mode

entry:
_start:
        cld
        movl    %ebx, %ebp                      # the multiboot information
        movb    $1, %bl
        cmpl    $0x2BADB002, %eax
        jne     fail
        movb    $2, %bl
        testl   $INFO_FRAMEBUFFER, 0(%ebp)      # flags
        jz      fail
        movb    $3, %bl
        cmpl    $0xB8000, 88(%ebp)              # framebuffer_addr, low half
        jne     fail
        cmpl    $0, 92(%ebp)                    # ... high half
        jne     fail
        movb    $4, %bl
        cmpl    $160, 96(%ebp)                  # framebuffer_pitch: bytes per text line
        jne     fail
        movb    $5, %bl
        cmpl    $80, 100(%ebp)                  # framebuffer_width
        jne     fail
        movb    $6, %bl
        cmpl    $25, 104(%ebp)                  # framebuffer_height
        jne     fail
        movb    $7, %bl
        cmpb    $16, 108(%ebp)                  # framebuffer_bpp
        jne     fail
        movb    $8, %bl
        cmpb    $2, 109(%ebp)                   # framebuffer_type: EGA text
        jne     fail

        movl    88(%ebp), %edi                  # the line into the framebuffer, row 0
        movl    $msg, %esi
        movb    $0x07, %ah                      # attribute: grey on black
1:      lodsb
        testb   %al, %al
        jz      2f
        stosw
        jmp     1b
2:      movl    $msg, %esi
        call    print
        movl    $newline, %esi
        call    print
        xorl    %eax, %eax
        outb    %al, $EXIT_PORT
        jmp     halt
fail:
        movl    $fail_msg, %esi
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

msg:        .asciz  "mbvideo: EGA text 80x25 at 0xb8000"
newline:    .asciz  "\n"
fail_msg:   .asciz  "mbvideo: FAIL\n"
        .align  4
load_end:
