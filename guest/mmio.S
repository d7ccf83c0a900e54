# mmio -- self-check of vmsup's MMIO test device at gpa 0xD0000000.
#
# Mode: protected (flat, paging off), linked at 0x10000.
# Device contract: +0x0 (4 bytes) reads the ID 0x75736D76 ("vmsu");
# +0x8 is an 8-byte scratch register (reads return what was last written,
# initially 0); any other offset reads byte (offset + i) & 0xFF for byte i
# of the access, and writes there are ignored.
#
# Checks, in order (N = check number):
#   1  4-byte read of the ID at +0x0 == 0x75736D76
#   2  4-byte read of the scratch register at +0x8 == 0 (initial value)
#   3  1-byte write 0x5A to +0x8, 1-byte read back == 0x5A
#   4  2-byte write 0xBEEF to +0x8, 2-byte read back == 0xBEEF
#   5  4-byte write 0x12345678 to +0x8, 4-byte read back == 0x12345678
#   6  1-byte pattern read at +0x10 == 0x10
#   7  2-byte pattern read at +0x22 == 0x2322
#   8  4-byte pattern read at +0xFFC (last word of the device) == 0xFFFEFDFC
#   9  4-byte write 0xA5A5A5A5 to +0x100 is ignored: 4-byte read == 0x03020100
# (8-byte accesses need 64-bit code, so they are not checked here.)
#
# Output on port 0xE9: "mmio: ok\n" and guest exit code 0 when every check
# passes; otherwise "mmio: FAIL N\n" and guest exit code N (first failure).

        .code32
        .text
        .globl _start

        .equ    MMIO, 0xD0000000
        .equ    DEBUG_PORT, 0xE9
        .equ    EXIT_PORT, 0xF4

# Fail with check number \n unless the preceding compare found equality.
.macro  expect_equal n
        movl    $\n, %ebx               # MOV leaves the flags alone
        jne     fail
.endm

_start:
        cld
        movl    MMIO+0x0, %eax
        cmpl    $0x75736D76, %eax
        expect_equal 1

        movl    MMIO+0x8, %eax
        cmpl    $0, %eax
        expect_equal 2

        movb    $0x5A, MMIO+0x8
        movb    MMIO+0x8, %al
        cmpb    $0x5A, %al
        expect_equal 3

        movw    $0xBEEF, MMIO+0x8
        movw    MMIO+0x8, %ax
        cmpw    $0xBEEF, %ax
        expect_equal 4

        movl    $0x12345678, MMIO+0x8
        movl    MMIO+0x8, %eax
        cmpl    $0x12345678, %eax
        expect_equal 5

        movb    MMIO+0x10, %al
        cmpb    $0x10, %al
        expect_equal 6

        movw    MMIO+0x22, %ax
        cmpw    $0x2322, %ax
        expect_equal 7

        movl    MMIO+0xFFC, %eax
        cmpl    $0xFFFEFDFC, %eax
        expect_equal 8

        movl    $0xA5A5A5A5, MMIO+0x100
        movl    MMIO+0x100, %eax
        cmpl    $0x03020100, %eax
        expect_equal 9

        movl    $msg_ok, %esi
        call    puts
        xorl    %eax, %eax              # exit code 0
        jmp     exit

fail:                                   # EBX = number of the failed check
        movl    $msg_fail, %esi
        call    puts
        movl    %ebx, %eax
        call    putdec
        movb    $'\n', %al
        outb    %al, $DEBUG_PORT
        movl    %ebx, %eax              # exit code N

exit:
        outb    %al, $EXIT_PORT         # ends the VM with code AL
halt:
        hlt
        jmp     halt

# puts: write the NUL-terminated string at ESI to the debug port.
puts:
        lodsb
        testb   %al, %al
        jz      1f
        outb    %al, $DEBUG_PORT
        jmp     puts
1:      ret

# putdec: write EAX in decimal to the debug port (clobbers EAX, ECX, EDX).
putdec:
        movl    $10, %ecx
        pushl   $0                      # end marker
1:      xorl    %edx, %edx
        divl    %ecx
        addl    $'0', %edx
        pushl   %edx
        testl   %eax, %eax
        jnz     1b
2:      popl    %eax                    # most significant digit first
        testl   %eax, %eax
        jz      3f
        outb    %al, $DEBUG_PORT
        jmp     2b
3:      ret

msg_ok:
        .asciz  "mmio: ok\n"
msg_fail:
        .asciz  "mmio: FAIL "
