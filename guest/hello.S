# hello -- real-mode "hello world" through the 8250 UART (COM1, 0x3F8).
#
# Mode: real (16-bit), CS=DS=0x1000, linked with -Ttext 0.
# Output: "Hello from vmsup!\n" on the serial console, then HLT (VM halted).
# Before each byte it polls LSR (0x3FD) until THRE (bit 5) is set, as a real
# 8250 driver must; in vmsup THRE is always set, so that costs one IN exit per
# byte.  No UART initialisation: vmsup's 8250 needs none.

        .code16
        .text
        .globl _start

        .equ    COM1_THR, 0x3F8
        .equ    COM1_LSR, 0x3FD
        .equ    LSR_THRE, 0x20

_start:
        cld
        movw    $msg, %si               # DS:SI -> message (DS = 0x1000)
next:
        lodsb
        testb   %al, %al
        jz      done
        movb    %al, %bl
        movw    $COM1_LSR, %dx
wait_thre:
        inb     %dx, %al
        testb   $LSR_THRE, %al
        jz      wait_thre
        movw    $COM1_THR, %dx
        movb    %bl, %al
        outb    %al, %dx
        jmp     next
done:
        hlt
        jmp     done                    # stay halted if ever resumed

msg:
        .asciz  "Hello from vmsup!\n"
