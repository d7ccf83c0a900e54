# int80_64 -- system calls from ring 3 through `int $0x80` in 64-bit long mode.
#
# Mode: long (the VMM's identity map), linked at 0x10000.  A tiny kernel: it
# marks the first 2 MiB user-accessible in the VMM's page tables, loads its own
# GDT (64-bit ring-0 code, data, 32-bit and 64-bit ring-3 code, ring-3 data, a
# 64-bit TSS with RSP0 and IST1) and a 64-bit IDT: an interrupt gate at 0x80 and
# a trap gate for #BP (3) on IST1, both of DPL 3.  It calls `int $0x80` once
# from ring 0 (no stack switch, still an SS:RSP frame), enters 64-bit ring 3
# with IRETQ and runs:
#   int $0x80  write(msg)     -- ring 3 -> 0: RSP0 from the TSS, SS null
#   int3                      -- on the IST1 stack, IF kept (trap gate)
#   int $0x80  x87()          -- the handler multiplies with RIP-relative x87 operands
#   int $0x80  to_compat()    -- the handler's IRETQ lands in compatibility mode
#   (32-bit code) int $0x80 write(msg), then exit(failures); the handler checks
#   that the exit call's frame holds the 32-bit code selector
# The int 0x80 handler checks its frame: IF clear; from ring 3, the caller's SS
# on the stack, SS null in the handler, and the frame ending exactly at RSP0.
# Output on port 0xE9:
#   "int80_64: ring 0 int 0x80 ok\n"
#   "int80_64: ring 3 int 0x80 ok\n"
#   "int80_64: int3 on IST1 ok\n"
#   "int80_64: x87 with RIP-relative operands ok\n"
#   "int80_64: compatibility mode int 0x80 ok\n"
# then exit code 0 on port 0xF4 (N = number of failed checks otherwise).

        .code64
        .text
        .globl _start

        .equ    DEBUG_PORT, 0xE9
        .equ    EXIT_PORT, 0xF4
        .equ    KCODE, 0x08
        .equ    KDATA, 0x10
        .equ    UCODE32, 0x18
        .equ    UDATA, 0x20
        .equ    UCODE64, 0x28
        .equ    TSS_SEL, 0x30
        .equ    EFLAGS_IF, 0x200
        .equ    PTE_US, 4
        .equ    SYS_WRITE, 1
        .equ    SYS_EXIT, 2
        .equ    SYS_TO_COMPAT, 3
        .equ    SYS_X87, 4

_start:
        cld
        # User access to the first 2 MiB: U/S in PML4[0], PDPT[0] and PD[0] of the
        # VMM's tables (vmworker/layout.py: 0x2000, 0x3000, 0x4000).
        movq    %cr3, %rax
        orq     $PTE_US, 0x2000
        orq     $PTE_US, 0x3000
        orq     $PTE_US, 0x4000
        movq    %rax, %cr3
        lgdt    gdt_desc
        movw    $KDATA, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movq    $kstack_top, %rsp
        movl    $tss, %eax              # TSS descriptor base (bits 0..31; 32..63 stay 0)
        movw    %ax, gdt + TSS_SEL + 2
        shrl    $16, %eax
        movb    %al, gdt + TSS_SEL + 4
        movb    %ah, gdt + TSS_SEL + 7
        movq    $kstack_top, tss + 4    # RSP0
        movq    $ist1_top, tss + 0x24   # IST1
        movw    $TSS_SEL, %ax
        ltr     %ax
        movl    $0x80, %ecx
        movl    $sys_entry, %eax
        movl    $0xEE00, %edx           # interrupt gate, DPL 3, no IST
        call    set_gate
        movl    $3, %ecx
        movl    $bp_entry, %eax
        movl    $0xEF01, %edx           # trap gate, DPL 3, IST1
        call    set_gate
        lidt    idt_desc

        movl    $SYS_WRITE, %eax
        movl    $msg_ring0, %ebx
        movl    $msg_ring0_len, %ecx
        int     $0x80
        cmpl    $msg_ring0_len, %eax
        je      1f
        incl    failures
1:      movw    $UDATA | 3, %ax         # DPL-0 data segments would be nulled by the return
        movw    %ax, %ds
        movw    %ax, %es
        pushq   $UDATA | 3
        pushq   $ustack_top
        pushq   $EFLAGS_IF | 2
        pushq   $UCODE64 | 3
        pushq   $user_main
        iretq

# set_gate: 16-byte IDT entry ECX -> handler EAX (below 4 GiB), DX = type/DPL/IST word.
set_gate:
        shll    $4, %ecx
        leaq    idt(%rcx), %rdi
        movw    %ax, (%rdi)
        movw    $KCODE, 2(%rdi)
        movw    %dx, 4(%rdi)
        shrl    $16, %eax
        movw    %ax, 6(%rdi)
        movq    $0, 8(%rdi)
        ret

# --- ring 3, 64-bit ------------------------------------------------------------
# (Only the RPL of CS is checked here: on a PVM host ring-3 code runs natively and
# `mov %cs` reads the host's user selector, 0x33. The handlers check the frames.)
user_main:
        movw    %cs, %ax
        andw    $3, %ax
        cmpw    $3, %ax
        je      1f
        incl    failures
1:      movl    $SYS_WRITE, %eax
        movl    $msg_ring3, %ebx
        movl    $msg_ring3_len, %ecx
        int     $0x80
        int3
        cmpl    $1, bp_count
        jne     1f
        movl    $SYS_WRITE, %eax
        movl    $msg_int3, %ebx
        movl    $msg_int3_len, %ecx
        int     $0x80
        # x87 in 64-bit ring 0 code with RIP-relative operands: 1000 * 3 = 3000.
        # (In ring 3 this host runs it natively; the handler checks the result.)
        movl    $SYS_X87, %eax
        int     $0x80
1:      movl    $SYS_TO_COMPAT, %eax
        int     $0x80
        ud2                             # the call returns to compat_main instead

# --- ring 3, compatibility mode ------------------------------------------------------
        .code32
compat_main:
        movl    $SYS_WRITE, %eax
        movl    $msg_compat, %ebx
        movl    $msg_compat_len, %ecx
        int     $0x80
        movl    $SYS_EXIT, %eax
        movl    failures, %ebx
        int     $0x80
        ud2
        .code64

# --- ring 0 handlers ----------------------------------------------------------------
# int 0x80: EAX = call; write(EBX = text, ECX = length) returns ECX; exit(EBX);
# to_compat() returns to compat_main in 32-bit ring-3 code.
sys_entry:
        pushq   %rax                    # 0: rax, 8: rip, 16: cs, 24: rflags, 32: rsp, 40: ss
        pushfq
        popq    %rax
        testl   $EFLAGS_IF, %eax        # an interrupt gate clears IF
        jz      1f
        incl    failures
1:      testl   $3, 16(%rsp)
        jz      2f
        cmpq    $UDATA | 3, 40(%rsp)    # from ring 3: the caller's SS, RSP0's stack, SS null
        jne     3f
        leaq    48(%rsp), %rax
        cmpq    $kstack_top, %rax
        jne     3f
        movw    %ss, %ax
        testw   %ax, %ax
        jz      2f
3:      incl    failures
2:      popq    %rax
        cmpl    $SYS_EXIT, %eax
        je      sys_exit
        cmpl    $SYS_TO_COMPAT, %eax
        je      sys_to_compat
        cmpl    $SYS_X87, %eax
        je      sys_x87
        pushq   %rsi
        pushq   %rdx
        movl    %ebx, %esi
        movl    %ecx, %eax
        movw    $DEBUG_PORT, %dx
        rep outsb
        popq    %rdx
        popq    %rsi
        iretq
sys_to_compat:
        movq    $compat_main, (%rsp)    # RIP
        movq    $UCODE32 | 3, 8(%rsp)   # CS: 32-bit code, so IRETQ enters compatibility mode
        iretq
sys_x87:
        fninit
        fildl   x87_a(%rip)
        fimull  x87_b(%rip)
        fistpl  x87_r(%rip)
        cmpl    $3000, x87_r(%rip)
        je      1f
        incl    failures
1:      movl    $SYS_WRITE, %eax
        movl    $msg_x87, %ebx
        movl    $msg_x87_len, %ecx
        jmp     sys_entry               # and print the line
sys_exit:
        cmpq    $UCODE32 | 3, 8(%rsp)   # exit is called from compatibility mode
        je      1f
        incl    %ebx
1:      movl    %ebx, %eax
        outb    %al, $EXIT_PORT
        hlt

# int3: a trap gate on IST1 (IF kept; the stack is IST1's whatever the level).
bp_entry:
        leaq    ist1_stack(%rip), %rax
        cmpq    %rax, %rsp
        jb      1f
        leaq    ist1_top(%rip), %rax
        cmpq    %rax, %rsp
        jae     1f
        pushfq
        testl   $EFLAGS_IF, (%rsp)
        popq    %rax
        jz      1f
        incl    bp_count
1:      iretq

msg_ring0:      .ascii "int80_64: ring 0 int 0x80 ok\n"
        .equ    msg_ring0_len, . - msg_ring0
msg_ring3:      .ascii "int80_64: ring 3 int 0x80 ok\n"
        .equ    msg_ring3_len, . - msg_ring3
msg_int3:       .ascii "int80_64: int3 on IST1 ok\n"
        .equ    msg_int3_len, . - msg_int3
msg_x87:        .ascii "int80_64: x87 with RIP-relative operands ok\n"
        .equ    msg_x87_len, . - msg_x87
msg_compat:     .ascii "int80_64: compatibility mode int 0x80 ok\n"
        .equ    msg_compat_len, . - msg_compat

        .balign 4
failures:       .long 0
x87_a:          .long 1000
x87_b:          .long 3
x87_r:          .long 0
bp_count:       .long 0

        .balign 8
gdt:    .quad   0
        .quad   0x00AF9B000000FFFF      # 0x08 ring-0 64-bit code
        .quad   0x00CF93000000FFFF      # 0x10 ring-0 data
        .quad   0x00CFFA000000FFFF      # 0x18 ring-3 32-bit code (compatibility mode)
        .quad   0x00CFF2000000FFFF      # 0x20 ring-3 data
        .quad   0x00AFFA000000FFFF      # 0x28 ring-3 64-bit code
        .quad   0x0000890000000067      # 0x30 64-bit TSS, available; base filled in at run time
        .quad   0                       #      (its upper half: base bits 32..63)
gdt_end:
        .balign 8
        .word   0
gdt_desc:
        .word   gdt_end - gdt - 1
        .quad   gdt
        .balign 8
        .word   0
idt_desc:
        .word   0x81 * 16 - 1
        .quad   idt

        .balign 16
tss:    .fill   0x68, 1, 0
        .balign 16
idt:    .fill   0x81 * 16, 1, 0
        .balign 16
kstack: .fill   512, 1, 0
kstack_top:
ist1_stack:
        .fill   256, 1, 0
ist1_top:
ustack: .fill   512, 1, 0
ustack_top:
