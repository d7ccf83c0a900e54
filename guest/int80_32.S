# int80_32 -- system calls from ring 3 through `int $0x80` in 32-bit protected mode.
#
# Mode: protected (flat, paging off), linked at 0x10000.  A tiny kernel: its
# own GDT (ring-0 and ring-3 code/data, a 32-bit TSS with SS0:ESP0), an IDT
# with an interrupt gate at 0x80 and trap gates for #BP (3) and #OF (4), all
# of DPL 3.  It calls `int $0x80` once from ring 0 (same privilege, no stack
# switch), then enters ring 3 with IRET (a return to an outer level) and runs:
#   int $0x80  write(msg)   -- ring 3 -> 0 through the TSS stack
#   int3                    -- trap gate: IF stays set in the handler
#   into (OF=1), into (OF=0) -- one #OF taken, the second a no-op
#   int $0x80  exit(failures)
# The int 0x80 handler checks the frame the CPU built: IF clear (interrupt
# gate); from ring 3, SS:ESP of the caller on the stack and the frame ending
# exactly at the TSS's ESP0.  Output on port 0xE9:
#   "int80_32: ring 0 int 0x80 ok\n"
#   "int80_32: ring 3 int 0x80 ok\n"
#   "int80_32: int3 ok\n"
#   "int80_32: into ok\n"
# then exit code 0 on port 0xF4 (N = number of failed checks otherwise).
# On this PVM host each INT and IRET is one internal-error exit that vmsup
# performs itself (vmworker/emulate/).

        .code32
        .text
        .globl _start

        .equ    DEBUG_PORT, 0xE9
        .equ    EXIT_PORT, 0xF4
        .equ    KCODE, 0x08
        .equ    KDATA, 0x10
        .equ    UCODE, 0x18
        .equ    UDATA, 0x20
        .equ    TSS_SEL, 0x28
        .equ    EFLAGS_IF, 0x200
        .equ    SYS_WRITE, 1
        .equ    SYS_EXIT, 2

_start:
        cld
        lgdt    gdt_desc
        ljmp    $KCODE, $1f
1:      movw    $KDATA, %ax
        movw    %ax, %ds
        movw    %ax, %es
        movw    %ax, %ss
        movl    $kstack_top, %esp
        # TSS descriptor base (split over three fields) and the ring-0 stack.
        movl    $tss, %eax
        movw    %ax, gdt + TSS_SEL + 2
        shrl    $16, %eax
        movb    %al, gdt + TSS_SEL + 4
        movb    %ah, gdt + TSS_SEL + 7
        movl    $kstack_top, tss + 4    # ESP0
        movw    $KDATA, tss + 8         # SS0
        movw    $TSS_SEL, %ax
        ltr     %ax
        # IDT: 0x80 interrupt gate, 3 and 4 trap gates, all callable from ring 3.
        movl    $0x80, %ecx
        movl    $sys_entry, %eax
        movb    $0xEE, %dl
        call    set_gate
        movl    $3, %ecx
        movl    $bp_entry, %eax
        movb    $0xEF, %dl
        call    set_gate
        movl    $4, %ecx
        movl    $of_entry, %eax
        movb    $0xEF, %dl
        call    set_gate
        lidt    idt_desc

        # Same privilege: no stack switch, a 3-word frame.
        movl    $SYS_WRITE, %eax
        movl    $msg_ring0, %ebx
        movl    $msg_ring0_len, %ecx
        int     $0x80
        cmpl    $msg_ring0_len, %eax
        je      1f
        incl    failures
1:
        # To ring 3: IRET pops EIP, CS, EFLAGS, ESP, SS. Data segments of DPL 0 would be
        # nulled by the return, so load the ring-3 one first.
        movw    $UDATA | 3, %ax
        movw    %ax, %ds
        movw    %ax, %es
        pushl   $UDATA | 3
        pushl   $ustack_top
        pushl   $EFLAGS_IF | 2
        pushl   $UCODE | 3
        pushl   $user_main
        iret

# set_gate: IDT entry ECX -> handler EAX, type/attribute byte DL, selector KCODE.
set_gate:
        leal    idt(,%ecx,8), %edi
        movw    %ax, (%edi)
        movw    $KCODE, 2(%edi)
        movb    $0, 4(%edi)
        movb    %dl, 5(%edi)
        shrl    $16, %eax
        movw    %ax, 6(%edi)
        ret

# --- ring 3 ------------------------------------------------------------------
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
        cmpl    $msg_ring3_len, %eax
        je      1f
        incl    failures
1:      int3
        cmpl    $1, bp_count
        jne     1f
        movl    $SYS_WRITE, %eax
        movl    $msg_int3, %ebx
        movl    $msg_int3_len, %ecx
        int     $0x80
1:      movl    $0x7FFFFFFF, %eax
        addl    $1, %eax                # OF = 1: INTO raises #OF
        into
        xorl    %eax, %eax              # OF = 0: INTO does nothing
        into
        cmpl    $1, of_count
        jne     1f
        movl    $SYS_WRITE, %eax
        movl    $msg_into, %ebx
        movl    $msg_into_len, %ecx
        int     $0x80
1:      movl    $SYS_EXIT, %eax
        movl    failures, %ebx
        int     $0x80
        ud2                             # never returns

# --- ring 0 handlers -------------------------------------------------------------
# int 0x80: EAX = call number; write(EBX = text, ECX = length) returns ECX; exit(EBX).
sys_entry:
        pushl   %eax                    # 0: eax, 4: eip, 8: cs, 12: eflags, 16: esp, 20: ss
        pushfl
        popl    %eax
        testl   $EFLAGS_IF, %eax        # an interrupt gate clears IF
        jz      1f
        incl    failures
1:      testl   $3, 8(%esp)
        jz      2f
        cmpl    $UDATA | 3, 20(%esp)    # from ring 3: the caller's SS:ESP, on the TSS stack
        jne     3f
        leal    24(%esp), %eax
        cmpl    $kstack_top, %eax
        je      2f
3:      incl    failures
2:      popl    %eax
        cmpl    $SYS_EXIT, %eax
        je      sys_exit
        pushl   %esi
        pushl   %edx
        movl    %ebx, %esi
        movl    %ecx, %eax
        movw    $DEBUG_PORT, %dx
        rep outsb
        popl    %edx
        popl    %esi
        iret
sys_exit:
        movl    %ebx, %eax
        outb    %al, $EXIT_PORT
        hlt

# int3 (trap gate: IF stays as the caller had it, set here).
bp_entry:
        pushl   %eax
        pushfl
        popl    %eax
        testl   $EFLAGS_IF, %eax
        jz      1f
        incl    bp_count
1:      popl    %eax
        iret

of_entry:
        incl    of_count
        iret


msg_ring0:      .ascii "int80_32: ring 0 int 0x80 ok\n"
        .equ    msg_ring0_len, . - msg_ring0
msg_ring3:      .ascii "int80_32: ring 3 int 0x80 ok\n"
        .equ    msg_ring3_len, . - msg_ring3
msg_int3:       .ascii "int80_32: int3 ok\n"
        .equ    msg_int3_len, . - msg_int3
msg_into:       .ascii "int80_32: into ok\n"
        .equ    msg_into_len, . - msg_into

        .balign 4
failures:       .long 0
bp_count:       .long 0
of_count:       .long 0

        .balign 8
gdt:    .quad   0
        .quad   0x00CF9B000000FFFF      # 0x08 ring-0 code
        .quad   0x00CF93000000FFFF      # 0x10 ring-0 data
        .quad   0x00CFFA000000FFFF      # 0x18 ring-3 code (accessed bit clear: set on first load)
        .quad   0x00CFF2000000FFFF      # 0x20 ring-3 data
        .quad   0x0000890000000067      # 0x28 32-bit TSS, available; base filled in at run time
gdt_end:
gdt_desc:
        .word   gdt_end - gdt - 1
        .long   gdt
        .balign 8
idt_desc:
        .word   0x81 * 8 - 1
        .long   idt

        .balign 16
tss:    .fill   0x68, 1, 0
        .balign 16
idt:    .fill   0x81 * 8, 1, 0
        .balign 16
kstack: .fill   512, 1, 0
kstack_top:
ustack: .fill   512, 1, 0
ustack_top:
