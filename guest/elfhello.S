# elfhello -- one source, two ELF executables: elfhello32.elf and elfhello64.elf.
#
# Assembled twice: `as --32` (ELF32, i386) and `as --64 --defsym ELF64=1`
# (ELF64, x86-64), each linked at 0x10000 with entry _start.  vmsup's ELF
# loader copies the PT_LOAD segments and enters e_entry: an ELF32 in
# protected mode, an ELF64 in long mode.
# Output on port 0xE9:
#   elfhello32.elf: "elfhello: hello from a 32-bit ELF\n"
#   elfhello64.elf: "elfhello: hello from a 64-bit ELF\n"
# then 0 is written to the exit device (port 0xF4): guest exit code 0.
# The code is the same text for both widths: `as --32` assembles it as
# 32-bit code and `as --64` as 64-bit code (ESI writes zero-extend to RSI).

        .text
        .globl _start

        .equ    DEBUG_PORT, 0xE9
        .equ    EXIT_PORT, 0xF4

_start:
        cld
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
.ifdef ELF64
        .asciz  "elfhello: hello from a 64-bit ELF\n"
.else
        .asciz  "elfhello: hello from a 32-bit ELF\n"
.endif
