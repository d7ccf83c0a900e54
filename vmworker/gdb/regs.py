"""The registers gdb sees, in `g`-packet order, and their mapping to KVM's regs and sregs.

One layout for every CPU mode (real, protected, long): gdb reads the target description once per
connection, and a `g` reply of another length after a mode switch breaks the session ("Remote 'g'
packet reply is too long"). So the layout is an x86-64 superset: gdb's amd64 core (general
registers, rip, eflags, selectors, x87), SSE, fs_base/gs_base, and vmsup's own system feature
(segment bases, control registers, descriptor tables).

`rip` as gdb sees it is the LINEAR program counter, CS.base + RIP, in every mode: breakpoints and
`x/i $pc` then use linear addresses, and a real-mode CS:IP is not silently read as IP alone.
x87 and SSE state is not fetched from KVM: it reads as zero and writes to it are ignored.
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
    kvm: str = ""  # "regs.NAME", "sregs.NAME", "seg.NAME" (a segment's selector), "base.NAME", "" = not held


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
    regs += [Reg(f"st{i}", 80, "i387_ext", CORE, group="float") for i in range(8)]
    regs += [Reg(n, 32, "int", CORE, group="float")
             for n in ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")]
    regs += [Reg(f"xmm{i}", 128, "uint128", SSE, group="vector") for i in range(16)]
    regs.append(Reg("mxcsr", 32, "int", SSE, group="vector"))
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


def value_of(index: int, regs, sregs) -> int | None:
    """The register's value now (None = not held by vmsup, reads as zero)."""
    kvm = REGISTERS[index].kvm
    if not kvm:
        return None
    kind, _, name = kvm.partition(".")
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


def encode(index: int, regs, sregs) -> bytes:
    reg = REGISTERS[index]
    value = value_of(index, regs, sregs) or 0
    return (value & ((1 << reg.bits) - 1)).to_bytes(reg.bits // 8, "little")


def encode_all(regs, sregs) -> bytes:
    return b"".join(encode(i, regs, sregs) for i in range(len(REGISTERS)))


def set_value(index: int, raw: bytes, regs, sregs) -> str:
    """Write one register from gdb's little-endian bytes into regs/sregs (in place).

    Returns which structure changed: "regs", "sregs" or "" (a register vmsup does not hold: ignored).
    Raises RegisterError for a register that cannot take this value.
    """
    reg = REGISTERS[index]
    if len(raw) != reg.bits // 8:
        raise RegisterError(f"{reg.name} is {reg.bits // 8} bytes, not {len(raw)}")
    value = int.from_bytes(raw, "little")
    kind, _, name = reg.kvm.partition(".")
    if not kind:
        return ""
    if value == value_of(index, regs, sregs):
        return ""
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
