# mbkernel_entry -- the assembly half of mbkernel (see mbkernel.c): the
# Multiboot header, the entry point, a stack, and the interrupt entry stubs.
#
# Multiboot 0.6.96 §3.1.1: the header (magic, flags, checksum) must lie
# 32-bit aligned within the first 8192 bytes of the file; the linker script
# puts .multiboot first.  Flags: bit 0 (page-align modules) and bit 1 (memory
# information), as GRUB-loaded kernels usually ask; no a.out kludge (bit 16):
# the loader takes the addresses from the ELF program headers.
#
# §3.2: at entry EAX = 0x2BADB002, EBX = address of the multiboot info,
# flat 32-bit segments, paging and interrupts off, ESP undefined -- so the
# first thing is our own stack.

        .equ    MB_MAGIC, 0x1BADB002
        .equ    MB_FLAGS, 0x00000003
        .equ    STACK_SIZE, 16384

        .section .multiboot, "a"
        .align  4
        .long   MB_MAGIC
        .long   MB_FLAGS
        .long   -(MB_MAGIC + MB_FLAGS)

        .text
        .globl  _start
_start:
        movl    $stack_top, %esp
        xorl    %ebp, %ebp
        pushl   %ebx                    # kmain(magic, info)
        pushl   %eax
        call    kmain
1:      cli
        hlt
        jmp     1b

# Interrupt stubs, vectors 0-47: push a zero error code where the CPU pushes
# none (SDM Vol. 3A §6.13: 8, 10-14, 17, 21 push one), then the vector, then
# the general registers; isr_dispatch(frame) gets a pointer to all of it.
        .macro  stub vector
isr\vector:
        .if (\vector == 8) || (\vector >= 10 && \vector <= 14) || (\vector == 17) || (\vector == 21)
        .else
        pushl   $0
        .endif
        pushl   $\vector
        jmp     isr_common
        .endm

        .altmacro
        .set    i, 0
        .rept   48
        stub    %i
        .set    i, i + 1
        .endr

isr_common:
        pushal
        cld
        pushl   %esp
        call    isr_dispatch
        addl    $4, %esp
        popal
        addl    $8, %esp                # vector and error code
        iret

        .macro  entry vector
        .long   isr\vector
        .endm

        .section .rodata
        .globl  isr_table
        .align  4
isr_table:
        .set    i, 0
        .rept   48
        entry   %i
        .set    i, i + 1
        .endr

        .section .bss
        .align  16
stack:
        .skip   STACK_SIZE
stack_top:
