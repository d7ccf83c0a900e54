# protected32 -- 32-bit protected-mode arithmetic and printing via the 8250.
#
# Mode: protected (flat 4 GiB segments, paging off), linked at 0x10000.
# Computes 1 + 2 + ... + 1000 in a loop (1000 iterations), converts the
# result to decimal at run time (no digits hard-coded) and prints
#   "protected32: sum(1..1000) = 500500\n"
# on COM1, polling LSR.THRE before every byte.  Then HLT (VM halted).
# It exercises the stack (call/ret, push/pop), 32-bit division and the
# loader's protected-mode setup.

        .code32
        .text
        .globl _start

        .equ    COM1_THR, 0x3F8
        .equ    COM1_LSR, 0x3FD
        .equ    LSR_THRE, 0x20

_start:
        cld
        xorl    %eax, %eax              # sum
        movl    $1, %ecx                # i
sum_loop:
        addl    %ecx, %eax
        incl    %ecx
        cmpl    $1000, %ecx
        jbe     sum_loop

        pushl   %eax
        movl    $prefix, %esi
        call    puts
        popl    %eax
        call    putdec
        movb    $'\n', %al
        call    putc
halt:
        hlt
        jmp     halt

# putc: write AL to COM1 once the transmitter holding register is empty.
putc:
        pushl   %edx
        pushl   %eax
        movw    $COM1_LSR, %dx
1:      inb     %dx, %al
        testb   $LSR_THRE, %al
        jz      1b
        popl    %eax
        movw    $COM1_THR, %dx
        outb    %al, %dx
        popl    %edx
        ret

# puts: write the NUL-terminated string at ESI.
puts:
        lodsb
        testb   %al, %al
        jz      1f
        call    putc
        jmp     puts
1:      ret

# putdec: write EAX as an unsigned decimal number.
putdec:
        movl    $10, %ecx
        xorl    %ebx, %ebx              # digit count
1:      xorl    %edx, %edx
        divl    %ecx                    # EAX = EAX / 10, EDX = digit
        addb    $'0', %dl
        pushl   %edx
        incl    %ebx
        testl   %eax, %eax
        jnz     1b
2:      popl    %eax                    # most significant digit first
        call    putc
        decl    %ebx
        jnz     2b
        ret

prefix:
        .asciz  "protected32: sum(1..1000) = "
