"""IRET done by the VMM when KVM's instruction emulator gives up on it (PVM hosts).

On this project's hosts KVM is PVM (DESIGN.md). A guest that is not PVM-aware runs through KVM's
x86 instruction emulator: a vCPU's stats count one `insn_emulation` per guest instruction, which is
why guest code runs ~3000x slower than native here. That emulator executes IRET only in real mode;
in protected and long mode it gives up (KVM_EXIT_INTERNAL_ERROR, suberror
KVM_INTERNAL_ERROR_EMULATION, RIP still at the IRET), so every kernel that takes interrupts would
die at its first interrupt return. Interrupt *delivery* works; only the return is missing.

A return to the same privilege level is small and exact, so the VMM performs it — SDM Vol. 2A,
"IRET/IRETD/IRETQ", operation RETURN-FROM-INTERRUPT → PROTECTED-MODE / IA-32e-MODE →
RETURN-TO-SAME-PRIVILEGE-LEVEL — and the vCPU resumes. Anything else (a privilege change, a task
return through EFLAGS.NT, a return to virtual-8086 mode, another code segment, an unmapped stack)
is refused with a reason, and the VM ends with the emulation failure as before. This runs only on
that rare exit, never on the vCPU loop's hot path; on VMX/SVM hosts IRET never exits at all.
"""

from __future__ import annotations

import struct

from . import kvm_abi as abi

IRET_OPCODE = 0xCF
OPERAND_SIZE_PREFIX = 0x66
CR0_PE, CR0_PG = 1 << 0, 1 << 31
EFER_LMA = 1 << 10

# EFLAGS bits (SDM Vol. 1 §3.4.3).
CF, PF, AF, ZF, SF, TF, IF, DF, OF = 1 << 0, 1 << 2, 1 << 4, 1 << 6, 1 << 7, 1 << 8, 1 << 9, 1 << 10, 1 << 11
IOPL = 3 << 12
NT, RF, VM, AC, VIF, VIP, ID = 1 << 14, 1 << 16, 1 << 17, 1 << 18, 1 << 19, 1 << 20, 1 << 21
RESERVED_ONE = 1 << 1
_ALWAYS = CF | PF | AF | ZF | SF | TF | DF | OF | NT | RF | AC | ID


class Unsupported(Exception):
    """This IRET is not one the VMM performs; the message says why."""


class InsnFallback:
    """Performs the IRET a vCPU's emulation failure stopped at; `irets` counts them."""

    def __init__(self, memory) -> None:
        self.memory = memory
        self.irets = 0
        self.last_refusal = ""

    def handle(self, vcpu, data: tuple[int, ...]) -> bool:
        """True if the instruction was performed and the vCPU may run on."""
        try:
            self._iret(vcpu, data)
        except Unsupported as e:
            self.last_refusal = str(e)
            return False
        self.irets += 1
        return True

    # ------------------------------------------------------------------------------------------
    def _insn(self, vcpu, regs, sregs, data) -> bytes:
        if data and data[0] & abi.KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES and len(data) >= 3:
            raw = struct.pack("<QQ", data[1], data[2])  # insn_size (1 byte), then insn_bytes[15]
            return raw[1:1 + min(raw[0], 15)]
        return self._read(vcpu, sregs, sregs.cs.base + regs.rip, 15, what="instruction")

    def _read(self, vcpu, sregs, linear: int, length: int, what: str) -> bytes:
        out = b""
        while length:
            chunk = min(length, 0x1000 - (linear & 0xFFF))
            if sregs.cr0 & CR0_PG:
                gpa = vcpu.translate(linear)
                if gpa is None:
                    raise Unsupported(f"{what} at linear {linear:#x} is not mapped")
            else:
                gpa = linear & 0xFFFF_FFFF
            if not self.memory.contains(gpa, chunk):
                raise Unsupported(f"{what} at {gpa:#x} is outside guest RAM")
            out += self.memory.read(gpa, chunk)
            linear += chunk
            length -= chunk
        return out

    def _iret(self, vcpu, data) -> None:
        regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
        if not sregs.cr0 & CR0_PE:
            raise Unsupported("real mode (KVM emulates that IRET itself)")
        long64 = bool(sregs.efer & EFER_LMA) and sregs.cs.l == 1
        insn = self._insn(vcpu, regs, sregs, data)
        # Prefixes we understand: operand size (0x66) and, in 64-bit mode, REX (0x40-0x4F, W = bit 3).
        osize_prefix = rex_w = False
        i = 0
        while i < len(insn) and insn[i] == OPERAND_SIZE_PREFIX:
            osize_prefix, i = True, i + 1
        if long64 and i < len(insn) and 0x40 <= insn[i] <= 0x4F:
            rex_w, i = bool(insn[i] & 0x8), i + 1
        if i >= len(insn) or insn[i] != IRET_OPCODE:
            raise Unsupported(f"instruction {insn[:i + 1].hex()} is not an IRET")
        if long64:
            size = 8 if rex_w else (2 if osize_prefix else 4)
        else:
            size = 2 if osize_prefix == bool(sregs.cs.db) else 4
        rflags = regs.rflags
        if rflags & VM:
            raise Unsupported("IRET in virtual-8086 mode")
        if rflags & NT and not long64:
            raise Unsupported("IRET with EFLAGS.NT set (a task return)")
        cpl = sregs.cs.selector & 3

        # The stack: SS:ESP in 32-bit code (SP with a 16-bit stack segment), RSP in 64-bit mode.
        if long64:
            sp, sp_mask = regs.rsp, 0xFFFF_FFFF_FFFF_FFFF
        else:
            sp_mask = 0xFFFF_FFFF if sregs.ss.db else 0xFFFF
            sp = regs.rsp & sp_mask
        count = 5 if long64 else 3  # 64-bit mode always pops SS:RSP too
        frame = self._read(vcpu, sregs, (0 if long64 else sregs.ss.base) + sp, size * count, what="IRET frame")
        fmt = {2: "H", 4: "I", 8: "Q"}[size]
        items = struct.unpack(f"<{count}{fmt}", frame)
        new_ip, new_cs, popped_flags = items[0], items[1] & 0xFFFF, items[2]

        if new_cs & 3 != cpl:
            raise Unsupported(f"IRET to privilege level {new_cs & 3} from {cpl} (only same-level returns are done)")
        if new_cs != sregs.cs.selector:
            raise Unsupported(f"IRET to code segment {new_cs:#x}, not the current {sregs.cs.selector:#x}")
        if size >= 4 and popped_flags & VM:
            raise Unsupported("IRET to virtual-8086 mode")

        # Which flags the popped image may change (IRET operation: IOPL at CPL 0 only, IF when
        # CPL <= IOPL, VIF/VIP at CPL 0); a 16-bit IRET replaces the low 16 bits only.
        mask = _ALWAYS
        if cpl == 0:
            mask |= IOPL | VIF | VIP
        if cpl <= (rflags & IOPL) >> 12:
            mask |= IF
        if size == 2:
            mask &= 0xFFFF
        new_flags = (rflags & ~mask) | (popped_flags & mask) | RESERVED_ONE

        regs.rip = new_ip if long64 else new_ip & (0xFFFF_FFFF if size == 4 else 0xFFFF)
        regs.rflags = new_flags
        if long64:
            new_sp, new_ss = items[3], items[4] & 0xFFFF
            if new_ss != sregs.ss.selector and not (new_ss == 0 and cpl == 0):
                raise Unsupported(f"IRETQ to stack segment {new_ss:#x}, not the current {sregs.ss.selector:#x}")
            regs.rsp = new_sp
            if new_ss != sregs.ss.selector:  # a null SS at CPL 0 (SDM: allowed in 64-bit mode)
                sregs.ss.selector = new_ss
                vcpu.set_sregs(sregs)
        else:
            regs.rsp = (regs.rsp & ~sp_mask) | ((sp + size * count) & sp_mask)
        vcpu.set_regs(regs)
