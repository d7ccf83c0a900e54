# repio -- string port I/O: many bytes per exit.
#
# Mode: real (16-bit), CS=DS=0x1000, linked with -Ttext 0.
# 1. One `rep outsb` writes all 28 bytes of "repio: one exit, many bytes\n"
#    to the debug console (port 0xE9).
# 2. One `rep outsw` writes 4 words 0x1111, 0x2222, 0x3333, 0x4444 to port
#    0x10.
# Then HLT (VM halted).  Console output: "repio: one exit, many bytes\n".
#
# A KVM_EXIT_IO carries `count` items of `size` bytes, and a VMM must handle
# count > 1.  But KVM emulates OUTS one element per exit (only INS is read
# ahead), so on the KVM measured here (PVM, Linux 6.x) this guest makes 32 IO
# exits of count 1: 28 of size 1 to 0xE9, then 4 of size 2 to 0x10.  The
# title says what the guest asks for; the trace shows what KVM delivers.

        .code16
        .text
        .globl _start

        .equ    DEBUG_PORT, 0xE9
        .equ    SEED_PORT, 0x10

_start:
        cld
        movw    $msg, %si               # DS:SI
        movw    $msg_len, %cx
        movw    $DEBUG_PORT, %dx
        rep outsb

        movw    $words, %si
        movw    $4, %cx
        movw    $SEED_PORT, %dx
        rep outsw
halt:
        hlt
        jmp     halt

msg:
        .ascii  "repio: one exit, many bytes\n"
        .equ    msg_len, . - msg

        .balign 2
words:
        .word   0x1111, 0x2222, 0x3333, 0x4444
