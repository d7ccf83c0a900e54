"""The registers gdb sees, in `g`-packet order, and their mapping to KVM's regs and sregs.

One layout for every CPU mode (real, protected, long): gdb reads the target description once per
connection, and a `g` reply of another length after a mode switch breaks the session ("Remote 'g'
packet reply is too long"). So the layout is an x86-64 superset: gdb's amd64 core (general
registers, rip, eflags, selectors, x87), SSE, fs_base/gs_base, and vmsup's own system feature
(segment bases, control registers, descriptor tables).

`rip` as gdb sees it is the LINEAR program counter, CS.base + RIP, in every mode: breakpoints and
`x/i $pc` then use linear addresses, and a real-mode CS:IP is not silently read as IP alone.
x87 and SSE registers come from the vCPU's XSAVE image (KVM_GET_XSAVE) and go back with
KVM_SET_XSAVE, which (unlike KVM_SET_FPU here) honours XSTATE_BV: see vmworker/emulate/fpu.py.
"""

from __future__ import annotations

from dataclasses import dataclass

CORE, SSE, SEGMENTS, SYSTEM = ("org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse", "org.gnu.gdb.i386.segments",
                               "org.vmsup.x86.sys")


class RegisterError(Exception):
    """A register gdb may not write (or that does not exist); the message says why."""


@dataclass(frozen=True)
class Reg:
    name: str
    bits: int
    type: str
    feature: str
    group: str = ""
    kvm: str = ""  # "regs.NAME", "sregs.NAME", "seg.NAME" (a segment's selector), "base.NAME", "dt.TABLE.FIELD",
    # "pc", or "fx.NAME" (the XSAVE image's legacy region: _FX_FIELDS, "st.N", "xmm.N", "ftag")


def _build() -> list[Reg]:
    regs: list[Reg] = []
    # gdb's amd64 core order (its validation wants these names, in this order, in this feature).
    for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"):
        kind = "data_ptr" if name in ("rbp", "rsp") else "int64"
        regs.append(Reg(name, 64, kind, CORE, kvm=f"regs.{name}"))
    regs += [Reg(f"r{i}", 64, "int64", CORE, kvm=f"regs.r{i}") for i in range(8, 16)]
    regs.append(Reg("rip", 64, "code_ptr", CORE, kvm="pc"))
    regs.append(Reg("eflags", 32, "vmsup_eflags", CORE, kvm="regs.rflags"))
    regs += [Reg(s, 32, "int32", CORE, kvm=f"seg.{s}") for s in ("cs", "ss", "ds", "es", "fs", "gs")]
    regs += [Reg(f"st{i}", 80, "i387_ext", CORE, group="float", kvm=f"fx.st.{i}") for i in range(8)]
    regs += [Reg(n, 32, "int", CORE, group="float", kvm=f"fx.{n}")
             for n in ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")]
    regs += [Reg(f"xmm{i}", 128, "uint128", SSE, group="vector", kvm=f"fx.xmm.{i}") for i in range(16)]
    regs.append(Reg("mxcsr", 32, "int", SSE, group="vector", kvm="fx.mxcsr"))
    regs += [Reg("fs_base", 64, "int64", SEGMENTS, kvm="base.fs"), Reg("gs_base", 64, "int64", SEGMENTS, kvm="base.gs")]
    regs += [Reg(f"{s}_base", 64, "int64", SYSTEM, group="system", kvm=f"base.{s}") for s in ("cs", "ss", "ds", "es")]
    regs += [Reg(n, 64, "int64", SYSTEM, group="system", kvm=f"sregs.{n}")
             for n in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")]
    regs += [Reg("gdtr_base", 64, "int64", SYSTEM, group="system", kvm="dt.gdt.base"),
             Reg("gdtr_limit", 32, "int32", SYSTEM, group="system", kvm="dt.gdt.limit"),
             Reg("idtr_base", 64, "int64", SYSTEM, group="system", kvm="dt.idt.base"),
             Reg("idtr_limit", 32, "int32", SYSTEM, group="system", kvm="dt.idt.limit"),
             Reg("tr", 32, "int32", SYSTEM, group="system", kvm="seg.tr"),
             Reg("ldtr", 32, "int32", SYSTEM, group="system", kvm="seg.ldt")]
    return regs


REGISTERS: list[Reg] = _build()
BY_NAME = {r.name: i for i, r in enumerate(REGISTERS)}
PC = BY_NAME["rip"]
G_PACKET_BYTES = sum(r.bits // 8 for r in REGISTERS)

# Selectors gdb may change: only in real mode, where a selector fully defines its segment
# (base = selector * 16, SDM Vol. 3A §20.1.1). Elsewhere a new selector would need a descriptor load.
_REAL_MODE_LOADABLE = {"cs", "ss", "ds", "es", "fs", "gs"}
CR0_PE = 1 << 0


def linear_pc(regs, sregs) -> int:
    return (sregs.cs.base + regs.rip) & 0xFFFF_FFFF_FFFF_FFFF


# The legacy region of an XSAVE image, as FXSAVE's 64-bit layout (SDM Vol. 1 §10.5.1, Table 10-2):
# (byte offset, size) of each register gdb reads from it. FIP and FDP are 64 bits there; gdb's amd64
# target splits each into fioff (low half) and fiseg (high half), as its FXSAVE64 reader does.
_FX_FIELDS = {"fctrl": (0, 2), "fstat": (2, 2), "fop": (6, 2), "fioff": (8, 4), "fiseg": (12, 4),
              "fooff": (16, 4), "foseg": (20, 4), "mxcsr": (24, 4)}
_FTW_AT = 4  # the abridged tag byte: bit p set = physical register p is not empty
_ST_AT, _XMM_AT = 32, 160  # ST(i) and XMMi, 16 bytes apart (ST(i) in 80 bits, stack order)
_XSTATE_BV_AT = 512  # the XSAVE header's XSTATE_BV (SDM Vol. 1 §13.4.2)
_XSTATE_X87_SSE = 0b11  # state components 0 (x87) and 1 (SSE): in use once gdb writes them
FSW_TOP_SHIFT = 11
# Full tag word values (SDM Vol. 1 §8.1.7), two bits per physical register.
_TAG_VALID, _TAG_ZERO, _TAG_SPECIAL, _TAG_EMPTY = 0, 1, 2, 3


def _tag_of(st80: bytes) -> int:
    """The full tag of a non-empty register from its 80-bit value (what FXSAVE's abridged tag drops)."""
    mantissa = int.from_bytes(st80[:8], "little")
    exponent = int.from_bytes(st80[8:10], "little") & 0x7FFF
    if exponent == 0x7FFF:
        return _TAG_SPECIAL  # infinity, NaN
    if exponent == 0:
        return _TAG_ZERO if mantissa == 0 else _TAG_SPECIAL  # zero, denormal
    return _TAG_VALID if mantissa >> 63 else _TAG_SPECIAL  # normal, or an unnormal


def _fx_value(name: str, fx) -> int:
    kind, _, n = name.partition(".")
    if kind == "st":
        at = _ST_AT + 16 * int(n)
        return int.from_bytes(fx[at:at + 10], "little")
    if kind == "xmm":
        at = _XMM_AT + 16 * int(n)
        return int.from_bytes(fx[at:at + 16], "little")
    if kind == "ftag":  # the abridged byte back to the full word, as FSTENV would store it
        top = (int.from_bytes(fx[2:4], "little") >> FSW_TOP_SHIFT) & 7
        word = 0
        for p in range(8):
            if fx[_FTW_AT] >> p & 1:
                at = _ST_AT + 16 * ((p - top) & 7)  # physical p is ST((p - TOP) mod 8)
                word |= _tag_of(bytes(fx[at:at + 10])) << 2 * p
            else:
                word |= _TAG_EMPTY << 2 * p
        return word
    at, size = _FX_FIELDS[kind]
    return int.from_bytes(fx[at:at + size], "little")


def _set_fx(name: str, value: int, fx: bytearray) -> None:
    kind, _, n = name.partition(".")
    if kind == "st":
        at = _ST_AT + 16 * int(n)
        fx[at:at + 10] = value.to_bytes(10, "little")
    elif kind == "xmm":
        at = _XMM_AT + 16 * int(n)
        fx[at:at + 16] = value.to_bytes(16, "little")
    elif kind == "ftag":
        fx[_FTW_AT] = sum(1 << p for p in range(8) if (value >> 2 * p) & 3 != _TAG_EMPTY)
    else:
        at, size = _FX_FIELDS[kind]
        fx[at:at + size] = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")
    bv = int.from_bytes(fx[_XSTATE_BV_AT:_XSTATE_BV_AT + 8], "little") | _XSTATE_X87_SSE
    fx[_XSTATE_BV_AT:_XSTATE_BV_AT + 8] = bv.to_bytes(8, "little")


def value_of(index: int, regs, sregs, fx=None) -> int | None:
    """The register's value now (None = not held by vmsup). `fx`: the vCPU's XSAVE image (bytes),
    which holds the x87 and SSE registers; without it they are None too."""
    kvm = REGISTERS[index].kvm
    if not kvm:
        return None
    kind, _, name = kvm.partition(".")
    if kind == "fx":
        return None if fx is None else _fx_value(name, fx)
    if kind == "regs":
        return getattr(regs, name)
    if kind == "pc":
        return linear_pc(regs, sregs)
    if kind == "seg":
        return getattr(sregs, name).selector
    if kind == "base":
        return getattr(sregs, name).base
    if kind == "sregs":
        return getattr(sregs, name)
    if kind == "dt":
        table, _, field = name.partition(".")
        return getattr(getattr(sregs, table), field)
    raise AssertionError(kvm)


def encode(index: int, regs, sregs, fx=None) -> bytes:
    reg = REGISTERS[index]
    value = value_of(index, regs, sregs, fx) or 0
    return (value & ((1 << reg.bits) - 1)).to_bytes(reg.bits // 8, "little")


def encode_all(regs, sregs, fx=None) -> bytes:
    return b"".join(encode(i, regs, sregs, fx) for i in range(len(REGISTERS)))


def set_value(index: int, raw: bytes, regs, sregs, fx: bytearray | None = None) -> str:
    """Write one register from gdb's little-endian bytes into regs/sregs or the XSAVE image `fx`
    (in place; it marks the x87 and SSE components in use, so KVM_SET_XSAVE loads them).

    Returns which structure changed: "regs", "sregs", "fx" or "" (unchanged, or a register vmsup
    does not hold). Raises RegisterError for a register that cannot take this value.
    """
    reg = REGISTERS[index]
    if len(raw) != reg.bits // 8:
        raise RegisterError(f"{reg.name} is {reg.bits // 8} bytes, not {len(raw)}")
    value = int.from_bytes(raw, "little")
    kind, _, name = reg.kvm.partition(".")
    if not kind:
        return ""
    if value == value_of(index, regs, sregs, fx):
        return ""
    if kind == "fx":
        if fx is None:
            raise RegisterError(f"{reg.name}: the vCPU's x87/SSE state is not at hand")
        _set_fx(name, value, fx)
        return "fx"
    if kind == "regs":
        setattr(regs, name, value)
        return "regs"
    if kind == "pc":
        regs.rip = (value - sregs.cs.base) & 0xFFFF_FFFF_FFFF_FFFF
        return "regs"
    if kind == "seg":
        if sregs.cr0 & CR0_PE or name not in _REAL_MODE_LOADABLE:
            raise RegisterError(f"{reg.name}: selectors can be changed in real mode only")
        seg = getattr(sregs, name)
        seg.selector = value & 0xFFFF
        seg.base = (value & 0xFFFF) << 4
        return "sregs"
    if kind == "base":
        getattr(sregs, name).base = value
        return "sregs"
    if kind == "sregs":
        setattr(sregs, name, value)
        return "sregs"
    if kind == "dt":
        table, _, field = name.partition(".")
        setattr(getattr(sregs, table), field, value)
        return "sregs"
    raise AssertionError(reg.kvm)
