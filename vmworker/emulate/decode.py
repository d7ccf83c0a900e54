"""Decode the instructions the fallbacks handle: prefixes, one opcode byte, ModRM/SIB/displacement.

Only the shapes the fallback families need are decoded (SDM Vol. 2A chapter 2): legacy prefixes,
REX in 64-bit mode, one-byte opcodes, and a ModRM memory operand in 16-, 32- and 64-bit
addressing, RIP-relative included. The effective address is returned as a linear address (segment
base added: FS/GS only in 64-bit mode, where the others are zero-based).
"""

from __future__ import annotations

from dataclasses import dataclass

from .cpu import GuestCpu, Unsupported

MAX_INSN = 15  # SDM Vol. 2A §2.3.11: no instruction is longer
OPERAND_SIZE, ADDRESS_SIZE, LOCK, REPNE, REP = 0x66, 0x67, 0xF0, 0xF2, 0xF3
SEGMENT_PREFIXES = {0x26: "es", 0x2E: "cs", 0x36: "ss", 0x3E: "ds", 0x64: "fs", 0x65: "gs"}
X87_OPCODES = range(0xD8, 0xE0)
# Opcodes followed by a ModRM byte among those decoded here: the x87 escapes.
_WITH_MODRM = set(X87_OPCODES)
_IMM8 = {0xCD}  # int imm8

# 16-bit addressing (SDM Vol. 2A Table 2-1): base and index registers per r/m (GPR numbers).
_RM16 = ((3, 6), (3, 7), (5, 6), (5, 7), (6, None), (7, None), (5, None), (3, None))


@dataclass
class Insn:
    address: int  # linear address of its first byte
    raw: bytes  # exactly the instruction's bytes
    opcode: int
    opsize_prefix: bool = False
    rex: int = 0
    segment: str | None = None
    mod: int = 0
    reg: int = 0
    rm: int = 0
    imm: int = 0
    ea: int | None = None  # linear address of the memory operand (ModRM with mod != 3)

    @property
    def length(self) -> int:
        return len(self.raw)

    @property
    def modrm(self) -> int:
        return (self.mod << 6) | (self.reg << 3) | self.rm

    @property
    def rex_w(self) -> bool:
        return bool(self.rex & 8)


def decode(cpu: GuestCpu, code: bytes, address: int) -> Insn:
    """The instruction at the start of `code` (fetched from linear `address`); Unsupported if it
    is not one of the shapes above or runs past the bytes given."""
    i = 0
    opsize = adsize = False
    segment = None
    rex = 0

    def take(n: int) -> bytes:
        nonlocal i
        if i + n > len(code) or i + n > MAX_INSN:
            raise Unsupported(f"instruction at {address:#x} is truncated or longer than {MAX_INSN} bytes: {code[:MAX_INSN].hex(' ')}")
        out = code[i:i + n]
        i += n
        return out

    while True:
        b = take(1)[0]
        if b == OPERAND_SIZE:
            opsize = True
        elif b == ADDRESS_SIZE:
            adsize = True
        elif b in SEGMENT_PREFIXES:
            segment = SEGMENT_PREFIXES[b]
        elif b in (LOCK, REPNE, REP):
            pass  # meaningless (or #UD with LOCK) for the families here; a real CPU ignores REP on them
        elif cpu.code64 and 0x40 <= b <= 0x4F:
            rex = b
            b = take(1)[0]  # REX must come last (SDM Vol. 2A §2.2.1): the opcode follows
            break
        else:
            break
    insn = Insn(address, b"", b, opsize_prefix=opsize, rex=rex, segment=segment)
    if b in _IMM8:
        insn.imm = take(1)[0]
    if b in _WITH_MODRM:
        modrm = take(1)[0]
        insn.mod, insn.reg, insn.rm = modrm >> 6, (modrm >> 3) & 7, modrm & 7
        if insn.mod != 3:
            if cpu.code64:
                addr_size = 4 if adsize else 8
            else:
                addr_size = 2 if (cpu.code_size == 4) == adsize else 4
            offset, default_seg, rip_relative = _modrm_offset(cpu, insn, addr_size, take)
            insn.raw = code[:i]
            if rip_relative:
                offset += cpu.regs.rip + insn.length
            offset &= (1 << (8 * addr_size)) - 1
            insn.ea = _segment_linear(cpu, segment or default_seg, offset)
    insn.raw = code[:i]
    return insn


def _modrm_offset(cpu: GuestCpu, insn: Insn, addr_size: int, take) -> tuple[int, str, bool]:
    """(offset before segmentation, default segment, RIP-relative?) of a ModRM memory operand."""
    mod, rm = insn.mod, insn.rm
    if addr_size == 2:
        if mod == 0 and rm == 6:
            return int.from_bytes(take(2), "little"), "ds", False
        base, index = _RM16[rm]
        offset = cpu.gpr(base, 2) + (cpu.gpr(index, 2) if index is not None else 0)
        disp = _disp(take, mod, 2)
        return offset + disp, "ss" if base == 5 else "ds", False
    rex_b, rex_x = (insn.rex & 1) << 3, (insn.rex & 2) << 2
    if rm == 4:  # SIB follows
        sib = take(1)[0]
        scale, index, base = sib >> 6, ((sib >> 3) & 7) | rex_x, sib & 7
        offset = 0 if index == 4 else cpu.gpr(index, addr_size) << scale
        if base == 5 and mod == 0:
            return offset + _signed(take(4)), "ds", False
        base |= rex_b
        return offset + cpu.gpr(base, addr_size) + _disp(take, mod, 4), "ss" if base in (4, 5) else "ds", False
    if mod == 0 and rm == 5:  # disp32: RIP-relative in 64-bit mode (SDM Vol. 2A §2.2.1.6)
        return _signed(take(4)), "ds", cpu.code64
    base = rm | rex_b
    return cpu.gpr(base, addr_size) + _disp(take, mod, 4), "ss" if base == 5 else "ds", False


def _disp(take, mod: int, wide: int) -> int:
    if mod == 1:
        return _signed(take(1))
    if mod == 2:
        return _signed(take(wide))
    return 0


def _signed(raw: bytes) -> int:
    return int.from_bytes(raw, "little", signed=True)


def _segment_linear(cpu: GuestCpu, segment: str, offset: int) -> int:
    if cpu.code64 and segment not in ("fs", "gs"):
        return offset
    return cpu.linear(getattr(cpu.sregs, segment).base, offset)
