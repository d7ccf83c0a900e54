# triplefault -- a guest that dies with a triple fault (KVM_EXIT_SHUTDOWN).
#
# Mode: protected (flat, paging off), linked at 0x10000.
# vmsup enters protected mode with an IDT of limit 0, so no vector can be
# delivered: `ud2` raises #UD, whose IDT entry is beyond the limit -> #GP;
# #GP cannot be delivered either -> #DF; #DF cannot be delivered -> triple
# fault -> the CPU shuts down.  Before that it loads recognisable values so
# a register dump taken at the shutdown exit can be checked:
#   EAX=0x7F1E0001 EBX=0x7F1E0002 ECX=0x7F1E0003 EDX=0x7F1E0004
# Nothing is printed; the VM's end status is "shutdown".

        .code32
        .text
        .globl _start

_start:
        movl    $0x7F1E0001, %eax
        movl    $0x7F1E0002, %ebx
        movl    $0x7F1E0003, %ecx
        movl    $0x7F1E0004, %edx
        ud2
