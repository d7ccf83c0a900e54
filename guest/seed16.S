# seed16 -- the seed's guest, byte for byte (31 c0 e7 10 40 eb fb).
#
# Mode: real (16-bit), linked at offset 0 of segment 0x1000 (gpa 0x10000).
# It writes AX to port 0x10 and increments it, forever: one KVM_EXIT_IO per
# iteration, which makes it the reference exit-rate workload.  Kept UNCHANGED
# from the article the project grew from; do not "improve" it.

        .code16
        .text
        .globl _start
_start:
        xorw    %ax, %ax
loop1:
        out     %ax, $0x10
        inc     %ax
        jmp     loop1
