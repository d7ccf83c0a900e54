"""One fallback's view of a stopped vCPU: its registers, its mode, and guest memory by linear address.

Registers are read once (KVM_GET_REGS/SREGS) when a fallback starts and written back once at the
end (`commit`), so several instructions emulated in one exit cost two ioctls each way. Memory goes
through the guest's own page tables where paging is on (KVM_TRANSLATE, per page), and must be RAM.
Page permissions are not checked: x86 KVM_TRANSLATE reports every page writeable and supervisor
(arch/x86/kvm/x86.c fills `writeable = 1, usermode = 0`), and on this host ring-3 code runs natively
(only its software interrupts reach the VMM, whose pushes are supervisor accesses anyway). Segment
limits are not checked either: the fallbacks serve flat-model kernels.
"""

from __future__ import annotations

import struct

CR0_PE, CR0_MP, CR0_EM, CR0_TS, CR0_PG = 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 31
EFER_LMA = 1 << 10

# EFLAGS bits (SDM Vol. 1 §3.4.3).
CF, PF, AF, ZF, SF, TF, IF, DF, OF = 1 << 0, 1 << 2, 1 << 4, 1 << 6, 1 << 7, 1 << 8, 1 << 9, 1 << 10, 1 << 11
IOPL = 3 << 12
NT, RF, VM, AC, VIF, VIP, ID = 1 << 14, 1 << 16, 1 << 17, 1 << 18, 1 << 19, 1 << 20, 1 << 21
RESERVED_ONE = 1 << 1

# General registers in the instruction encoding's order (SDM Vol. 2A §2.1.5, Table 2-2), as named
# in struct kvm_regs.
GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
_PAGE = 0x1000


class Unsupported(Exception):
    """The fallback does not perform this instruction here; the message says why."""


class GuestCpu:
    """Registers of one vCPU plus bounds- and permission-checked access to its memory."""

    def __init__(self, vcpu, memory) -> None:
        self.vcpu = vcpu
        self.memory = memory
        self.regs = vcpu.get_regs()
        self.sregs = vcpu.get_sregs()
        self.sregs_changed = False

    # Mode ---------------------------------------------------------------------------------------
    @property
    def protected(self) -> bool:
        return bool(self.sregs.cr0 & CR0_PE)

    @property
    def long_mode(self) -> bool:
        return bool(self.sregs.efer & EFER_LMA)

    @property
    def code64(self) -> bool:
        """64-bit mode proper (IA-32e with CS.L = 1), as opposed to compatibility mode."""
        return self.long_mode and self.sregs.cs.l == 1

    @property
    def code_size(self) -> int:
        """Default operand and address size of the current code segment, in bytes."""
        if self.code64:
            return 4  # operand size; addresses are 8 bytes (see decode.py)
        return 4 if self.protected and self.sregs.cs.db else 2

    @property
    def cpl(self) -> int:
        return self.sregs.cs.selector & 3 if self.protected else 0

    @property
    def rip_linear(self) -> int:
        return self.linear(self.sregs.cs.base, self.regs.rip)

    def linear(self, base: int, offset: int) -> int:
        """A segment base plus an offset as the CPU forms it: 64 bits in long mode, else 32."""
        if self.long_mode:
            return (base + offset) & 0xFFFF_FFFF_FFFF_FFFF
        return (base + offset) & 0xFFFF_FFFF

    # Registers ----------------------------------------------------------------------------------
    def gpr(self, index: int, size: int = 8) -> int:
        return getattr(self.regs, GPR_NAMES[index]) & ((1 << (8 * size)) - 1)

    def set_gpr(self, index: int, value: int, size: int) -> None:
        """Writes as the CPU does: a 32-bit write zero-extends, 16/8-bit writes merge."""
        name = GPR_NAMES[index]
        if size >= 4:
            setattr(self.regs, name, value & ((1 << (8 * size)) - 1))
        else:
            mask = (1 << (8 * size)) - 1
            setattr(self.regs, name, (getattr(self.regs, name) & ~mask) | (value & mask))

    def commit(self) -> None:
        """Write the registers back (KVM_SET_SREGS only if a segment or table register changed)."""
        if self.sregs_changed:
            self.vcpu.set_sregs(self.sregs)
        self.vcpu.set_regs(self.regs)

    # Memory ---------------------------------------------------------------------------------------
    def _gpa(self, linear: int, what: str) -> int:
        if not self.sregs.cr0 & CR0_PG:
            return linear & 0xFFFF_FFFF
        gpa = self.vcpu.translate(linear)
        if gpa is None:
            raise Unsupported(f"{what} at linear {linear:#x} is not mapped")
        return gpa

    def _pieces(self, linear: int, length: int, what: str):
        while length:
            chunk = min(length, _PAGE - (linear & (_PAGE - 1)))
            gpa = self._gpa(linear, what)
            if not self.memory.contains(gpa, chunk):
                raise Unsupported(f"{what} at {gpa:#x} is outside guest RAM")
            yield gpa, chunk
            linear += chunk
            length -= chunk

    def read(self, linear: int, length: int, what: str) -> bytes:
        """`length` bytes at a linear address; `what` names them in a refusal."""
        return b"".join(self.memory.read(gpa, n) for gpa, n in self._pieces(linear, length, what))

    def write(self, linear: int, data: bytes, what: str) -> None:
        # Translate every page before writing any, so a refused write leaves memory untouched.
        pieces = list(self._pieces(linear, len(data), what))
        at = 0
        for gpa, n in pieces:
            self.memory.write(gpa, data[at:at + n])
            at += n

    def read_uint(self, linear: int, size: int, what: str) -> int:
        return int.from_bytes(self.read(linear, size, what), "little")

    def write_uint(self, linear: int, value: int, size: int, what: str) -> None:
        self.write(linear, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"), what)

    # The stack ----------------------------------------------------------------------------------
    def stack_mask(self) -> int:
        if self.code64:
            return 0xFFFF_FFFF_FFFF_FFFF
        return 0xFFFF_FFFF if self.sregs.ss.db else 0xFFFF

    def stack_linear(self, sp: int) -> int:
        return sp if self.code64 else self.linear(self.sregs.ss.base, sp)


def u16(data: bytes, at: int) -> int:
    return struct.unpack_from("<H", data, at)[0]


def u32(data: bytes, at: int) -> int:
    return struct.unpack_from("<I", data, at)[0]
