"""The guest's x87 state for one fallback (KVM_GET_XSAVE / KVM_SET_XSAVE): stack, tags, FSW, FCW.

Why XSAVE and not KVM_GET_FPU/KVM_SET_FPU: measured on this host, KVM_SET_FPU writes the legacy
FXSAVE area but leaves XSTATE_BV alone, so when the guest's x87 state was in its initial
configuration (XSTATE_BV bit 0 clear, e.g. empty stack and FCW 0x037F) the CPU reloads the initial
state and drops the write: a guest's FLDCW done here was lost. KVM_SET_XSAVE honours XSTATE_BV, so
the VMM sets bit 0 with its write (SDM Vol. 1 §13.8.1, XRSTOR's use of XSTATE_BV).

Registers are kept by physical number, as the x87 addresses its tag word; ST(i) is physical
(TOP + i) mod 8 (SDM Vol. 1 §8.1.2). Exception flags go through `raise_flags`, which refuses an
unmasked one before anything changes (a CPU would report it as #MF, which is not emulated).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import float80 as f
from .cpu import AF, CF, OF, PF, SF, ZF, Unsupported

# FSW bits (SDM Vol. 1 §8.1.3): exception flags 0-5, stack fault, error summary, condition codes,
# TOP (11-13), busy.
SF_FLAG, ES, C0, C1, C2, C3, BUSY = 1 << 6, 1 << 7, 1 << 8, 1 << 9, 1 << 10, 1 << 14, 1 << 15
TOP_SHIFT = 11
EXCEPTIONS = 0x3F
FCW_INIT = 0x037F  # FNINIT: all exceptions masked, extended precision, round to nearest

# The legacy region of an XSAVE image (SDM Vol. 1 Table 10-2, FXSAVE layout): FCW, FSW, abridged
# FTW, FOP, FPU IP, FPU DP, ...; ST0-ST7 from byte 32, 16 bytes apart (stack order). XSTATE_BV at
# byte 512; bit 0 is the x87 state component.
_LEGACY = struct.Struct("<HHBxHQQ")
_ST_AT = 32
_XSTATE_BV_AT = 512
_XSTATE_X87 = 1 << 0


@dataclass
class X87State:
    fcw: int
    fsw: int
    last_opcode: int
    last_ip: int
    last_dp: int


class Fpu:
    """The x87 state of one vCPU for the length of one fallback: physical registers and tags."""

    def __init__(self, vcpu) -> None:
        self.vcpu = vcpu
        self._xsave = vcpu.get_xsave()
        image = bytes(self._xsave)
        fcw, fsw, ftw, fop, fip, fdp = _LEGACY.unpack_from(image)
        self.state = X87State(fcw, fsw, fop, fip, fdp)
        top = (fsw >> TOP_SHIFT) & 7
        self.regs: list[bytes] = [b""] * 8
        for i in range(8):  # stack order: ST(i) is physical register (TOP + i) & 7
            self.regs[(top + i) & 7] = image[_ST_AT + 16 * i:_ST_AT + 16 * i + 10]
        self.valid = [bool(ftw >> p & 1) for p in range(8)]
        self.changed = False

    def save(self) -> None:
        if not self.changed:
            return
        image = bytearray(bytes(self._xsave))
        s = self.state
        ftw = sum(1 << p for p in range(8) if self.valid[p])
        _LEGACY.pack_into(image, 0, s.fcw, s.fsw, ftw, s.last_opcode, s.last_ip, s.last_dp)
        top = self.top
        for i in range(8):
            image[_ST_AT + 16 * i:_ST_AT + 16 * i + 16] = self.regs[(top + i) & 7].ljust(16, b"\0")
        bv = int.from_bytes(image[_XSTATE_BV_AT:_XSTATE_BV_AT + 8], "little") | _XSTATE_X87
        image[_XSTATE_BV_AT:_XSTATE_BV_AT + 8] = bv.to_bytes(8, "little")
        self.vcpu.set_xsave(type(self._xsave).from_buffer_copy(image))

    def snapshot(self):
        s = self.state
        return (list(self.regs), list(self.valid), s.fsw, s.fcw, s.last_ip, s.last_dp, s.last_opcode)

    def restore(self, snap) -> None:
        regs, valid, fsw, fcw, ip, dp, op = snap
        self.regs, self.valid = regs, valid
        s = self.state
        s.fsw, s.fcw, s.last_ip, s.last_dp, s.last_opcode = fsw, fcw, ip, dp, op

    @property
    def top(self) -> int:
        return (self.state.fsw >> TOP_SHIFT) & 7

    @top.setter
    def top(self, value: int) -> None:
        self.state.fsw = (self.state.fsw & ~(7 << TOP_SHIFT)) | ((value & 7) << TOP_SHIFT)

    @property
    def rc(self) -> int:
        return (self.state.fcw >> 10) & 3

    @property
    def precision(self) -> int:
        return f.PRECISION_BITS[(self.state.fcw >> 8) & 3]

    def unmasked_pending(self) -> int:
        return self.state.fsw & EXCEPTIONS & ~self.state.fcw

    # Condition codes and exceptions ---------------------------------------------------------------
    def set_cc(self, c3: bool = False, c2: bool = False, c1: bool = False, c0: bool = False) -> None:
        s = self.state
        s.fsw = (s.fsw & ~(C0 | C1 | C2 | C3)) | (C3 if c3 else 0) | (C2 if c2 else 0) | (C1 if c1 else 0) | (C0 if c0 else 0)

    def raise_flags(self, flags: int) -> None:
        """Record exception flags; refuse (before any change) if one of them is unmasked."""
        unmasked = flags & EXCEPTIONS & ~self.state.fcw
        if unmasked:
            raise Unsupported(f"x87 exception {unmasked:#04x} is unmasked (FCW {self.state.fcw:#06x}): #MF is not emulated")
        self.state.fsw |= flags & EXCEPTIONS

    # The register stack -----------------------------------------------------------------------------
    def st(self, i: int) -> f.Real:
        p = (self.top + i) & 7
        if not self.valid[p]:
            self.raise_flags(f.IE)  # stack underflow: the masked response reads the indefinite NaN
            self.state.fsw = (self.state.fsw | SF_FLAG) & ~C1
            return f.INDEFINITE
        return f.from_extended(self.regs[p])

    def set_st(self, i: int, raw: bytes) -> None:
        p = (self.top + i) & 7
        self.regs[p] = raw
        self.valid[p] = True
        self.changed = True

    def push(self, raw: bytes) -> None:
        p = (self.top - 1) & 7
        if self.valid[p]:
            self.raise_flags(f.IE)  # stack overflow: masked response pushes the indefinite NaN
            self.state.fsw |= SF_FLAG | C1
            raw = f.to_extended(f.INDEFINITE)
        self.top = p
        self.set_st(0, raw)

    def pop(self) -> None:
        self.valid[self.top] = False
        self.top = self.top + 1
        self.changed = True

    def store_result(self, i: int, x: f.Real, flags: int = 0, precision: int | None = None) -> None:
        """Round `x` with RC and `precision` (default: PC) into ST(i), flags and C1 included."""
        raw, more, up = f.round_extended(x, self.precision if precision is None else precision, self.rc)
        self.raise_flags(flags | more)
        self.set_st(i, raw)
        self.state.fsw = (self.state.fsw & ~C1) | (C1 if up else 0)


def compare_flags(a: f.Real, b: f.Real) -> tuple[bool, bool, bool]:
    """(C3/ZF, C2/PF, C0/CF) of comparing a with b: greater 000, less 001, equal 100, unordered 111."""
    if a.is_nan or b.is_nan:
        return True, True, True
    av = _ordered(a)
    bv = _ordered(b)
    return av == bv, False, av < bv


def _ordered(x: f.Real):
    if x.kind == "inf":
        return float("-inf") if x.negative else float("inf")
    return x.value


EFLAGS_COMPARE = ZF | PF | CF | OF | SF | AF
