# modeswitch -- real mode → 32-bit protected mode → 64-bit long mode, one guest.
#
# Mode: real (CS = DS = 0x1000, IP = 0), linked at 0: a label's linear
# address is 0x10000 + its offset (BASE below).  Proves that one gdb session
# survives every CPU mode switch (vmworker/gdb/: one register layout for all
# modes, $pc linear).  At each of real_mark, prot_mark and long_mark it writes
# one letter to the debug port 0xE9, so the console reads "RPL\n"; then it
# writes 0 to the exit port 0xF4 (guest exit code 0).
#
# The switches follow SDM Vol. 3A §9.9.1 (to protected mode: LGDT, CR0.PE,
# a far jump) and §9.8.5 (to IA-32e mode: CR4.PAE, CR3 = PML4, EFER.LME,
# CR0.PG, a far jump to a 64-bit code segment).  Page tables identity-map the
# first 2 MiB with one 2 MiB page, at 0x30000-0x32FFF (free RAM above the
# image; RAM starts zeroed).

        .equ    BASE, 0x10000           # where vmsup loads a flat image
        .equ    DEBUG_PORT, 0xE9
        .equ    EXIT_PORT, 0xF4
        .equ    PML4, 0x30000
        .equ    PDPT, 0x31000
        .equ    PD, 0x32000
        .equ    SEL_CODE32, 0x08
        .equ    SEL_DATA, 0x10
        .equ    SEL_CODE64, 0x18

        .text
        .globl  _start
        .code16
_start:
        cli
real_mark:
        movb    $'R', %al
        outb    %al, $DEBUG_PORT
        lgdtl   gdt_desc                # DS base = BASE, so this is the descriptor's offset
        movl    %cr0, %eax
        orl     $1, %eax                # CR0.PE
        movl    %eax, %cr0
        ljmpl   $SEL_CODE32, $(BASE + pm32)

        .code32
pm32:
        movw    $SEL_DATA, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
prot_mark:
        movb    $'P', %al
        outb    %al, $DEBUG_PORT
        movl    $(PDPT | 3), PML4       # present, writable
        movl    $(PD | 3), PDPT
        movl    $0x83, PD               # present, writable, 2 MiB page at 0
        movl    $PML4, %eax
        movl    %eax, %cr3
        movl    %cr4, %eax
        orl     $0x20, %eax             # CR4.PAE
        movl    %eax, %cr4
        movl    $0xC0000080, %ecx       # IA32_EFER
        rdmsr
        orl     $0x100, %eax            # EFER.LME
        wrmsr
        movl    %cr0, %eax
        orl     $0x80000000, %eax       # CR0.PG: long mode is active from here
        movl    %eax, %cr0
        ljmpl   $SEL_CODE64, $(BASE + lm64)

        .code64
lm64:
long_mark:
        movb    $'L', %al
        outb    %al, $DEBUG_PORT
        movb    $'\n', %al
        outb    %al, $DEBUG_PORT
        xorl    %eax, %eax
        outb    %al, $EXIT_PORT
        hlt

        .p2align 3
gdt:
        .quad   0                       # null descriptor
        .quad   0x00CF9A000000FFFF      # 0x08: 32-bit code, base 0, 4 GiB
        .quad   0x00CF92000000FFFF      # 0x10: data, base 0, 4 GiB
        .quad   0x00AF9A000000FFFF      # 0x18: 64-bit code (L = 1)
gdt_desc:
        .word   gdt_desc - gdt - 1
        .long   BASE + gdt
