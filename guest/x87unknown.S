# x87unknown -- an x87 instruction vmsup does not emulate: the VM must end with a
# clear internal-error status naming its bytes and disassembly.
#
# Mode: protected (flat, paging off), linked at 0x10000.  Prints
#   "x87unknown: fsin next\n"
# on port 0xE9, then runs `finit; fldpi; fsin`.  On this PVM host KVM's
# emulator gives up on every x87 instruction; vmsup performs FWAIT, FNINIT and
# FLDPI itself (vmworker/emulate/) but not FSIN (d9 fe), so the VM ends with
# status internal-error and the detail says "bytes d9 fe (fsin)".  On a host
# whose CPU runs the guest natively it would halt instead.

        .code32
        .text
        .globl _start

        .equ    DEBUG_PORT, 0xE9

_start:
        cld
        movl    $msg, %esi
        movl    $msg_len, %ecx
        movw    $DEBUG_PORT, %dx
        rep outsb
        finit
        fldpi
        fsin
        hlt

msg:    .ascii  "x87unknown: fsin next\n"
        .equ    msg_len, . - msg
