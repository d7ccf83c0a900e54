"""Instruction fallbacks: what the VMM performs when KVM's instruction emulator gives up.

On this project's hosts KVM is PVM (no VT-x/SVM): every guest kernel instruction runs through
KVM's x86 emulator, which cannot do INT n/INT3/INTO or IRET outside real mode, FWAIT, or x87
instructions; each ends KVM_RUN with KVM_EXIT_INTERNAL_ERROR (suberror
KVM_INTERNAL_ERROR_EMULATION) at the instruction. The VMM performs those it knows, one class per
instruction family, and the vCPU resumes; anything else is refused with its bytes and disassembly
and the VM ends with the emulation failure. On VMX/SVM hosts none of this ever runs.

    fallback.py      InsnFallback: fetch, decode, dispatch; runs of x87 instructions per exit
    cpu.py           registers and guest memory by linear address (page tables, permissions)
    decode.py        prefixes, ModRM/SIB/displacement, RIP-relative
    descriptors.py   GDT descriptors, IDT gates, TSS stacks
    interrupts.py    SoftwareInterrupt (INT n/INT3/INTO), InterruptReturn (IRET/IRETD/IRETQ)
    fpu.py, x87.py   x87 state (KVM_GET/SET_FPU); Fwait, X87
    float80.py       80-bit/single/double formats and rounding as the control word says
"""

from .cpu import Unsupported
from .fallback import InsnFallback, Performed

__all__ = ["InsnFallback", "Performed", "Unsupported"]
