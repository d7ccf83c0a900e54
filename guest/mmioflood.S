# mmioflood -- 2000 MMIO writes to an address no device claims.
#
# Mode: protected (flat, paging off), linked at 0x10000.
# Writes a 4-byte value (the loop counter, 2000 down to 1) to gpa 0xE0000000
# 2000 times.  Nothing is mapped there, so each write is one KVM_EXIT_MMIO
# that the VMM must ignore quickly: a load test for the MMIO exit path and
# the trace recorder.  Then prints "mmioflood: done\n" on port 0xE9 and
# writes 0 to the exit device (port 0xF4): guest exit code 0.

        .code32
        .text
        .globl _start

        .equ    UNCLAIMED, 0xE0000000
        .equ    DEBUG_PORT, 0xE9
        .equ    EXIT_PORT, 0xF4
        .equ    COUNT, 2000

_start:
        cld
        movl    $COUNT, %ecx
flood:
        movl    %ecx, UNCLAIMED
        loop    flood

        movl    $msg, %esi
print:
        lodsb
        testb   %al, %al
        jz      done
        outb    %al, $DEBUG_PORT
        jmp     print
done:
        xorl    %eax, %eax
        outb    %al, $EXIT_PORT         # guest exit code 0
halt:
        hlt
        jmp     halt

msg:
        .asciz  "mmioflood: done\n"
