# smp -- every vCPU prints its own line with one string-I/O exit.
#
# Mode: protected (flat, paging off), linked at 0x10000; run with several
# vCPUs (default 4).  All vCPUs start here; EDI holds the vCPU index and each
# vCPU has its own stack (ESP = top of RAM - index * 0x1000).
# Each vCPU builds "vcpu N\n" (N = EDI in decimal) in a 32-byte buffer on its
# own stack and sends it with ONE `rep outsb` to port 0xE9, so a line is a
# single KVM_EXIT_IO and lines from different vCPUs never interleave (their
# order is not defined).  Then HLT; the VM is halted when every vCPU has.
# With 4 vCPUs the console shows "vcpu 0\n" .. "vcpu 3\n" in some order.

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
        rep outsb                       # DS:ESI, ECX bytes, one exit
halt:
        hlt
        jmp     halt
