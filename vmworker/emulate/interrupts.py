"""INT n / INT3 / INTO through the IDT, and the matching IRET/IRETD/IRETQ.

KVM's emulator on this host delivers hardware interrupts and exceptions itself, but performs
software interrupts and IRET only in real mode (elsewhere: an emulation failure at the
instruction; from ring 3, which runs natively, a software interrupt is a shutdown exit). These
classes do the protected- and IA-32e-mode operations of SDM Vol. 2A "INT n/INTO/INT3/INT1" and
"IRET/IRETD/IRETQ", for the cases flat-model kernels use:

- gates: 32-bit interrupt and trap gates (protected mode), 64-bit ones (IA-32e mode, IST too);
  interrupt gates clear IF; TF, NT, RF and VM are cleared either way;
- to the same privilege level, or inward (ring 3 → ring 0..2) with the stack from the TSS
  (SSn:ESPn, or RSPn / ISTn with a null SS in IA-32e mode);
- IRET to the same level or outward (popping SS:ESP, nulling data segments the outer level may
  not use); IRETQ also to compatibility mode.

What raises an exception on a real CPU (a gate DPL below the CPL, a non-present gate, a bad
selector) or is out of scope (task gates and task returns, virtual-8086 mode, 16-bit gates, the
LDT) is refused with a reason; the VM then ends with the emulation failure, as before.
"""

from __future__ import annotations

import struct

from . import descriptors as dt
from .cpu import AC, IF, IOPL, NT, OF, RESERVED_ONE, RF, TF, VIF, VIP, VM, GuestCpu, Unsupported
from .cpu import CF, PF, AF, ZF, SF, DF, ID
from .decode import Insn

INT3, INT_IMM8, INTO, IRET = 0xCC, 0xCD, 0xCE, 0xCF
INTO_VECTOR = 4  # #OF
BREAKPOINT_VECTOR = 3  # #BP

# Flags an IRET always restores; IOPL, IF, VIF and VIP depend on the CPL (IRET operation).
_IRET_ALWAYS = CF | PF | AF | ZF | SF | TF | DF | OF | NT | RF | AC | ID


class SoftwareInterrupt:
    """INT imm8, INT3 and INTO in protected and IA-32e mode."""

    name = "int"
    opcodes = frozenset({INT3, INT_IMM8, INTO})

    def run(self, cpu: GuestCpu, insn: Insn) -> None:
        if not cpu.protected:
            raise Unsupported("INT in real mode (KVM delivers it through the IVT itself)")
        if cpu.regs.rflags & VM:
            raise Unsupported("INT in virtual-8086 mode")
        next_rip = (cpu.regs.rip + insn.length) & _ip_mask(cpu)
        if insn.opcode == INTO:
            if cpu.code64:
                raise Unsupported("INTO in 64-bit mode (#UD)")
            if not cpu.regs.rflags & OF:
                cpu.regs.rip = next_rip  # no overflow: nothing happens
                return
            vector = INTO_VECTOR
        else:
            vector = BREAKPOINT_VECTOR if insn.opcode == INT3 else insn.imm
        deliver(cpu, vector, next_rip)


def deliver(cpu: GuestCpu, vector: int, return_rip: int) -> None:
    """Enter the handler of `vector` for a software interrupt whose return address is `return_rip`."""
    gate = dt.read_gate(cpu, vector)
    cpl = cpu.cpl
    if cpu.long_mode:
        if gate.type not in (dt.GATE_INTERRUPT, dt.GATE_TRAP):
            raise Unsupported(f"IDT entry {vector:#x} has type {gate.type:#x}, not a 64-bit interrupt or trap gate")
    elif gate.type not in (dt.GATE_INTERRUPT, dt.GATE_TRAP):
        raise Unsupported(f"IDT entry {vector:#x} has type {gate.type:#x} (only 32-bit interrupt and trap gates are done)")
    if gate.dpl < cpl:
        raise Unsupported(f"INT {vector:#x} from ring {cpl} through a gate of DPL {gate.dpl} (a #GP)")
    if not gate.present:
        raise Unsupported(f"IDT entry {vector:#x} is not present (a #NP)")
    cs = dt.load_segment(cpu, gate.selector, what="handler code")
    if not dt.is_code(cs):
        raise Unsupported(f"IDT entry {vector:#x} selector {gate.selector:#x} is not a code segment")
    new_cpl = cpl if dt.is_conforming_code(cs) else cs.dpl
    if new_cpl > cpl:
        raise Unsupported(f"IDT entry {vector:#x} leads outward, to ring {new_cpl} from ring {cpl} (a #GP)")
    if cpu.long_mode and not cs.l:
        raise Unsupported(f"IDT entry {vector:#x} leads to a code segment that is not 64-bit")
    cs.selector = (gate.selector & ~3) | new_cpl

    regs, sregs = cpu.regs, cpu.sregs
    old_flags = regs.rflags
    if cpu.long_mode:
        # 64-bit IDT: always an 8-byte frame with SS:RSP, on a 16-byte aligned stack (SDM Vol. 3A
        # §6.14.2); a new stack from the TSS on an IST gate or a privilege change.
        ss = sregs.ss
        sp = regs.rsp
        if gate.ist or new_cpl != cpl:
            sp = dt.tss64_stack(cpu, new_cpl, gate.ist)
        if new_cpl != cpl:
            ss = dt.null_stack_segment(new_cpl)
        sp &= ~0xF
        frame = struct.pack("<5Q", return_rip, sregs.cs.selector, old_flags, regs.rsp, sregs.ss.selector)
        sp = (sp - len(frame)) & 0xFFFF_FFFF_FFFF_FFFF
        cpu.write(sp, frame, what="interrupt frame")
        new_sp = sp
    else:
        if new_cpl != cpl:
            ss_sel, sp = dt.tss_stack(cpu, new_cpl)
            ss = dt.load_segment(cpu, ss_sel, what="TSS stack")
            if ss_sel & 3 != new_cpl or ss.dpl != new_cpl or not dt.is_writable_data(ss):
                raise Unsupported(f"TSS stack segment {ss_sel:#x} does not suit ring {new_cpl} (a #TS)")
            frame = struct.pack("<5I", return_rip, sregs.cs.selector, old_flags & 0xFFFF_FFFF,
                                regs.rsp & 0xFFFF_FFFF, sregs.ss.selector)
        else:
            ss, sp = sregs.ss, regs.rsp
            frame = struct.pack("<3I", return_rip, sregs.cs.selector, old_flags & 0xFFFF_FFFF)
        mask = 0xFFFF_FFFF if ss.db else 0xFFFF
        new_sp = (sp - len(frame)) & mask
        cpu.write(cpu.linear(ss.base, new_sp), frame, what="interrupt frame")
        new_sp |= regs.rsp & ~mask & 0xFFFF_FFFF if ss is sregs.ss else 0

    sregs.cs = cs
    sregs.ss = ss
    cpu.sregs_changed = True
    regs.rsp = new_sp
    regs.rip = gate.offset
    regs.rflags = (old_flags & ~(TF | NT | RF | VM | (IF if gate.clears_if else 0))) | RESERVED_ONE


class InterruptReturn:
    """IRET, IRETD and IRETQ in protected and IA-32e mode (the existing same-level return, plus
    returns to ring 3 and from 64-bit to compatibility mode)."""

    name = "iret"
    opcodes = frozenset({IRET})

    def run(self, cpu: GuestCpu, insn: Insn) -> None:
        regs, sregs = cpu.regs, cpu.sregs
        if not cpu.protected:
            raise Unsupported("IRET in real mode (KVM emulates that IRET itself)")
        rflags = regs.rflags
        if rflags & VM:
            raise Unsupported("IRET in virtual-8086 mode")
        if rflags & NT and not cpu.long_mode:
            raise Unsupported("IRET with EFLAGS.NT set (a task return)")
        if cpu.code64:
            size = 8 if insn.rex_w else (2 if insn.opsize_prefix else 4)
        else:
            size = 2 if insn.opsize_prefix == (cpu.code_size == 4) else 4
        fmt = {2: "H", 4: "I", 8: "Q"}[size]
        cpl = cpu.cpl
        sp_mask = cpu.stack_mask()
        sp = regs.rsp & sp_mask
        new_ip, new_cs, popped_flags = struct.unpack(
            f"<3{fmt}", cpu.read(cpu.stack_linear(sp), 3 * size, what="IRET frame"))
        new_cs &= 0xFFFF
        new_cpl = new_cs & 3
        if new_cpl < cpl:
            raise Unsupported(f"IRET to ring {new_cpl} from ring {cpl} (a #GP)")
        if size >= 4 and popped_flags & VM and cpl == 0 and not cpu.long_mode:
            raise Unsupported("IRET to virtual-8086 mode")
        # 64-bit mode pops SS:RSP always; otherwise only on a return to an outer level.
        pops_stack = cpu.code64 or new_cpl != cpl
        if pops_stack:
            new_sp, new_ss = struct.unpack(
                f"<2{fmt}", cpu.read(cpu.stack_linear((sp + 3 * size) & sp_mask), 2 * size, what="IRET frame"))
            new_ss &= 0xFFFF

        if new_cs == sregs.cs.selector:
            cs = sregs.cs
        else:
            cs = dt.load_segment(cpu, new_cs, what="IRET code")
            if not dt.is_code(cs) or (cs.dpl != new_cpl if not dt.is_conforming_code(cs) else cs.dpl > new_cpl):
                raise Unsupported(f"IRET code segment {new_cs:#x} does not suit ring {new_cpl} (a #GP)")
            if cs.l and cs.db:
                raise Unsupported(f"IRET code segment {new_cs:#x} has both L and D set (a #GP)")
        to64 = cpu.long_mode and bool(cs.l)

        # Which flags the popped image may change (IRET operation: IOPL at CPL 0 only, IF when
        # CPL <= IOPL, VIF/VIP at CPL 0); a 16-bit IRET replaces the low 16 bits only.
        mask = _IRET_ALWAYS
        if cpl == 0:
            mask |= IOPL | VIF | VIP
        if cpl <= (rflags & IOPL) >> 12:
            mask |= IF
        if size == 2:
            mask &= 0xFFFF
        regs.rflags = (rflags & ~mask) | (popped_flags & mask) | RESERVED_ONE
        regs.rip = new_ip if to64 else new_ip & (0xFFFF_FFFF if size >= 4 else 0xFFFF)

        if not pops_stack:
            regs.rsp = (regs.rsp & ~sp_mask) | ((sp + 3 * size) & sp_mask)
        else:
            if new_ss == sregs.ss.selector and new_cpl == cpl:
                ss = sregs.ss
            elif new_ss & ~3 == 0 and to64 and new_cpl < 3:
                ss = dt.null_stack_segment(new_cpl)  # allowed in 64-bit mode below ring 3
            else:
                ss = dt.load_segment(cpu, new_ss, what="IRET stack")
                if new_ss & 3 != new_cpl or ss.dpl != new_cpl or not dt.is_writable_data(ss):
                    raise Unsupported(f"IRET stack segment {new_ss:#x} does not suit ring {new_cpl} (a #GP)")
            regs.rsp = new_sp if cpu.long_mode else new_sp & (0xFFFF_FFFF if ss.db else 0xFFFF)
            if ss is not sregs.ss:
                sregs.ss = ss
                cpu.sregs_changed = True
        if cs is not sregs.cs:
            sregs.cs = cs
            cpu.sregs_changed = True
        if new_cpl > cpl:
            # Data segments the outer level may not use become null (IRET operation, RETURN-TO-
            # OUTER-PRIVILEGE-LEVEL): data or non-conforming code with DPL < the new CPL.
            for name in ("ds", "es", "fs", "gs"):
                seg = getattr(sregs, name)
                if not seg.unusable and seg.dpl < new_cpl and not dt.is_conforming_code(seg):
                    setattr(sregs, name, dt.null_data_segment(seg))


def _ip_mask(cpu: GuestCpu) -> int:
    if cpu.code64:
        return 0xFFFF_FFFF_FFFF_FFFF
    return 0xFFFF_FFFF if cpu.code_size == 4 else 0xFFFF
