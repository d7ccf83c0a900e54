# smp -- every vCPU prints its own line with one `rep outsb`, lines never mix.
#
# Mode: protected (flat, paging off), linked at 0x10000; run with several
# vCPUs (default 4).  All vCPUs start here; EDI holds the vCPU index and each
# vCPU has its own stack (ESP = top of RAM - index * 0x1000).
# Each vCPU builds "vcpu N\n" (N = EDI in decimal) in a 32-byte buffer on its
# own stack and sends it with ONE `rep outsb` to port 0xE9, then HLT; the VM
# is halted when every vCPU has.  With 4 vCPUs the console shows "vcpu 0\n"
# .. "vcpu 3\n", each line whole, in an undefined order.
#
# Why a lock: KVM emulates OUTS one element at a time, so a `rep outsb` of 7
# bytes reaches the VMM as 7 KVM_EXIT_IOs of count 1 (only INS is batched),
# and two vCPUs' lines would interleave byte by byte.  A spinlock in guest
# memory (xchg to take it, a plain store to drop it) makes each line's
# `rep outsb` run alone, however the VMM sees it (1 exit or 7).

        .code32
        .text
        .globl _start

        .equ    DEBUG_PORT, 0xE9

_start:
        cld
        subl    $32, %esp               # line buffer [ESP, ESP+32)
        leal    32(%esp), %esi          # build backwards from the end
        decl    %esi
        movb    $'\n', (%esi)
        movl    %edi, %eax
        movl    $10, %ecx
1:      xorl    %edx, %edx              # digits, least significant first
        divl    %ecx
        addb    $'0', %dl
        decl    %esi
        movb    %dl, (%esi)
        testl   %eax, %eax
        jnz     1b
        subl    $5, %esi
        movl    $0x75706376, (%esi)     # "vcpu" (little-endian)
        movb    $' ', 4(%esi)

        leal    32(%esp), %ecx
        subl    %esi, %ecx              # length of "vcpu N\n"
        movw    $DEBUG_PORT, %dx

take_lock:
        movl    $1, %eax
        xchgl   %eax, console_lock      # xchg with memory is always locked
        testl   %eax, %eax
        jz      have_lock
wait_lock:
        pause
        cmpl    $0, console_lock
        jne     wait_lock
        jmp     take_lock
have_lock:
        rep outsb                       # DS:ESI, ECX bytes
        movl    $0, console_lock        # release (stores are not reordered)
halt:
        hlt
        jmp     halt

        .balign 4
console_lock:                           # 0 = free, 1 = a vCPU is printing
        .long   0
