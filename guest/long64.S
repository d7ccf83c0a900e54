# long64 -- 64-bit long-mode arithmetic, printing via the 8250, exit via 0xF4.
#
# Mode: long (64-bit, first 4 GiB identity-mapped), linked at 0x10000.
# Computes fib(90) = 2880067194370816120 with 64-bit registers (90 loop
# iterations; the value needs 62 bits, so any truncation to 32 bits shows),
# converts it to decimal at run time with 64-bit DIV and prints
#   "long64: fib(90) = 2880067194370816120\n"
# on COM1 (polling LSR.THRE), then writes 0 to the exit device at port 0xF4:
# the VM ends with guest exit code 0.

        .code64
        .text
        .globl _start

        .equ    COM1_THR, 0x3F8
        .equ    COM1_LSR, 0x3FD
        .equ    LSR_THRE, 0x20
        .equ    EXIT_PORT, 0xF4

_start:
        cld
        xorl    %eax, %eax              # a = fib(0)
        movl    $1, %edx                # b = fib(1)
        movl    $90, %ecx
fib_loop:
        leaq    (%rax,%rdx), %rbx       # (a, b) = (b, a + b)
        movq    %rdx, %rax
        movq    %rbx, %rdx
        loop    fib_loop                # uses RCX in 64-bit mode
        # RAX = fib(90)

        pushq   %rax
        leaq    prefix(%rip), %rsi
        call    puts
        popq    %rax
        call    putdec
        movb    $'\n', %al
        call    putc

        xorl    %eax, %eax
        outb    %al, $EXIT_PORT         # guest exit code 0
halt:
        hlt
        jmp     halt

# putc: write AL to COM1 once the transmitter holding register is empty.
putc:
        pushq   %rdx
        pushq   %rax
        movw    $COM1_LSR, %dx
1:      inb     %dx, %al
        testb   $LSR_THRE, %al
        jz      1b
        popq    %rax
        movw    $COM1_THR, %dx
        outb    %al, %dx
        popq    %rdx
        ret

# puts: write the NUL-terminated string at RSI.
puts:
        lodsb
        testb   %al, %al
        jz      1f
        call    putc
        jmp     puts
1:      ret

# putdec: write RAX as an unsigned 64-bit decimal number.
putdec:
        movl    $10, %ecx
        xorl    %ebx, %ebx              # digit count
1:      xorl    %edx, %edx
        divq    %rcx                    # RDX:RAX / 10
        addb    $'0', %dl
        pushq   %rdx
        incl    %ebx
        testq   %rax, %rax
        jnz     1b
2:      popq    %rax                    # most significant digit first
        call    putc
        decl    %ebx
        jnz     2b
        ret

prefix:
        .asciz  "long64: fib(90) = "
