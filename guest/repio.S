# repio -- string port I/O: many bytes per exit.
#
# Mode: real (16-bit), CS=DS=0x1000, linked with -Ttext 0.
# 1. One `rep outsb` writes all 28 bytes of "repio: one exit, many bytes\n"
#    to the debug console (port 0xE9).  KVM reports it as a single
#    KVM_EXIT_IO with size 1 and count 28, so the VMM must consume
#    `count` items from the data area, not just one.
# 2. One `rep outsw` writes 4 words 0x1111, 0x2222, 0x3333, 0x4444 to port
#    0x10 (one exit, size 2, count 4).
# Then HLT (VM halted).  Console output: "repio: one exit, many bytes\n".

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
