"""FWAIT and a subset of the x87 FPU instructions, on the guest's own FPU state (fpu.py).

The subset is what compiled 32-bit code and startup code use (SDM Vol. 2A, opcode map A.5):
loads and stores of m32/m64/m80 reals and m16/m32/m64 integers (FISTTP too), FLD1/FLDZ and the
other constants, FADD/FSUB/FSUBR/FMUL/FDIV/FDIVR in their real-memory, integer-memory, register
and pop forms, FCOM/FCOMP/FCOMPP/FUCOM/FUCOMP/FUCOMPP/FCOMI/FUCOMI(P)/FTST/FXAM, FXCH, FLD/FST/FSTP
ST(i), FCMOVcc, FCHS/FABS/FSQRT/FRNDINT, FLDCW/FNSTCW, FNSTSW AX/m16, FNINIT/FNCLEX, FFREE,
FINCSTP/FDECSTP, FNOP. Results are rounded as the control word says (float80.py); masked
exceptions get the x87's masked responses. Anything else (transcendentals, FPREM, environment
saves, BCD) is refused, and the dispatcher names it.
"""

from __future__ import annotations

from fractions import Fraction

from . import float80 as f
from .cpu import CF, CR0_EM, CR0_MP, CR0_TS, PF, ZF, GuestCpu, Unsupported
from .decode import Insn
from .fpu import BUSY, C1, EFLAGS_COMPARE, ES, EXCEPTIONS, FCW_INIT, SF_FLAG, Fpu, compare_flags

FWAIT = 0x9B

# FLD1, FLDL2T, FLDL2E, FLDPI, FLDLG2, FLDLN2, FLDZ (D9 E8..EE). The x87 rounds its internal
# constants with RC; these decimal expansions are exact far beyond 64 bits, so rounding them
# gives the same results.
CONSTANTS = {
    0xE8: Fraction(1),
    0xE9: Fraction("3.3219280948873623478703194294893901758648313930245806120547563958"),  # log2(10)
    0xEA: Fraction("1.4426950408889634073599246810018921374266459541529859341354494069"),  # log2(e)
    0xEB: Fraction("3.1415926535897932384626433832795028841971693993751058209749445923"),  # pi
    0xEC: Fraction("0.3010299956639811952137388947244930267681898814621085413104274611"),  # log10(2)
    0xED: Fraction("0.6931471805599453094172321214581765680755001343602552541206800094"),  # ln(2)
    0xEE: Fraction(0),
}
# The ModRM reg field of the arithmetic group (D8/DA/DC/DE): dest = dest OP src.
ADD, MUL, COM, COMP, SUB, SUBR, DIV, DIVR = range(8)
# Memory operand formats: (size, decoder) of reals, and sizes of integers, per opcode and reg.
_REAL_ARITH = {0xD8: (4, f.from_single), 0xDC: (8, f.from_double)}
_INT_ARITH = {0xDA: 4, 0xDE: 2}
_REAL_LOADS = {(0xD9, 0): (4, f.from_single), (0xDD, 0): (8, f.from_double), (0xDB, 5): (10, f.from_extended)}
_INT_LOADS = {(0xDF, 0): 2, (0xDB, 0): 4, (0xDF, 5): 8}
_REAL_STORES = {(0xD9, 2): (f.SINGLE, False), (0xD9, 3): (f.SINGLE, True),
                (0xDD, 2): (f.DOUBLE, False), (0xDD, 3): (f.DOUBLE, True)}
# (size, pop, chop): FIST/FISTP round with RC, FISTTP (SSE3) always chops.
_INT_STORES = {(0xDF, 2): (2, False, False), (0xDF, 3): (2, True, False), (0xDB, 2): (4, False, False),
               (0xDB, 3): (4, True, False), (0xDF, 7): (8, True, False), (0xDF, 1): (2, True, True),
               (0xDB, 1): (4, True, True), (0xDD, 1): (8, True, True)}


class Fwait:
    """FWAIT/WAIT (9B): checks for pending unmasked x87 exceptions, otherwise does nothing."""

    name = "fwait"
    opcodes = frozenset({FWAIT})

    def run(self, cpu: GuestCpu, insn: Insn, fpu: Fpu) -> None:
        if cpu.sregs.cr0 & CR0_TS and cpu.sregs.cr0 & CR0_MP:
            raise Unsupported("FWAIT with CR0.TS and CR0.MP set (a #NM)")
        if fpu.unmasked_pending() or fpu.state.fsw & ES:
            raise Unsupported(f"FWAIT with an unmasked x87 exception pending (FSW {fpu.state.fsw:#06x}): #MF is not emulated")
        cpu.regs.rip += insn.length


class X87:
    """The x87 escape opcodes D8-DF, for the subset in this module's docstring."""

    name = "x87"
    opcodes = frozenset(range(0xD8, 0xE0))

    def run(self, cpu: GuestCpu, insn: Insn, fpu: Fpu) -> None:
        if cpu.sregs.cr0 & (CR0_EM | CR0_TS):
            raise Unsupported("x87 instruction with CR0.EM or CR0.TS set (a #NM)")
        snap = fpu.snapshot()
        try:
            _execute(cpu, insn, fpu)
        except Unsupported:
            fpu.restore(snap)
            raise
        fpu.changed = True
        cpu.regs.rip += insn.length


def _execute(cpu: GuestCpu, insn: Insn, fpu: Fpu) -> None:
    op, mod, reg, modrm = insn.opcode, insn.mod, insn.reg, insn.modrm
    s = fpu.state
    # Control instructions that do not wait for pending exceptions (the FN- forms).
    if op == 0xDB and modrm == 0xE3:  # FNINIT
        s.fcw, s.fsw, s.last_ip, s.last_dp, s.last_opcode = FCW_INIT, 0, 0, 0, 0
        fpu.valid = [False] * 8
        return
    if op == 0xDB and modrm == 0xE2:  # FNCLEX
        s.fsw &= ~(EXCEPTIONS | SF_FLAG | ES | BUSY)
        return
    if op == 0xDF and modrm == 0xE0:  # FNSTSW AX
        cpu.set_gpr(0, s.fsw, 2)
        return
    if mod != 3 and (op, reg) in ((0xDD, 7), (0xD9, 7)):  # FNSTSW m16, FNSTCW m16
        cpu.write_uint(insn.ea, s.fsw if op == 0xDD else s.fcw, 2, what="FNSTSW/FNSTCW operand")
        return
    if fpu.unmasked_pending():
        raise Unsupported(f"x87 instruction with an unmasked exception pending (FSW {s.fsw:#06x}): #MF is not emulated")
    if mod != 3 and (op, reg) == (0xD9, 5):  # FLDCW m16
        s.fcw = cpu.read_uint(insn.ea, 2, what="FLDCW operand") | 0x40  # bit 6 reads as 1
        return
    # Everything else records where it was (FPU instruction and data pointers, opcode).
    s.last_ip = cpu.regs.rip
    s.last_opcode = ((op & 7) << 8) | modrm
    if mod != 3:
        s.last_dp = insn.ea
        _memory_form(cpu, insn, fpu)
    else:
        _register_form(insn, fpu, cpu)


def _memory_form(cpu: GuestCpu, insn: Insn, fpu: Fpu) -> None:
    op, reg, ea = insn.opcode, insn.reg, insn.ea
    if op in _REAL_ARITH or op in _INT_ARITH:
        if op in _REAL_ARITH:
            size, decode = _REAL_ARITH[op]
            src = decode(cpu.read(ea, size, what="x87 operand"))
        else:
            src = f.finite(int.from_bytes(cpu.read(ea, _INT_ARITH[op], what="x87 operand"), "little", signed=True))
        _arith_or_compare(fpu, reg, 0, fpu.st(0), src, pops=1 if reg == COMP else 0)
        return
    key = (op, reg)
    if key in _REAL_LOADS:
        size, decode = _REAL_LOADS[key]
        raw = cpu.read(ea, size, what="x87 operand")
        x = decode(raw)
        if x.is_signaling and size != 10:
            fpu.raise_flags(f.IE)
            x = x.quieted()
        fpu.push(raw if size == 10 else f.to_extended(x))  # widening is exact
        return
    if key in _INT_LOADS:
        size = _INT_LOADS[key]
        fpu.push(f.to_extended(f.finite(int.from_bytes(cpu.read(ea, size, what="x87 operand"), "little", signed=True))))
        return
    if key in _REAL_STORES:
        fmt, pops = _REAL_STORES[key]
        x = fpu.st(0)
        raw, flags, up = f.round_ieee(x, fmt, fpu.rc)
        fpu.raise_flags(flags | (f.IE if x.is_signaling else 0))
        cpu.write(ea, raw, what="x87 operand")
        _set_c1(fpu, up)
        if pops:
            fpu.pop()
        return
    if key == (0xDB, 7):  # FSTP m80: the register as it is
        x = fpu.st(0)
        cpu.write(ea, f.to_extended(x) if x is f.INDEFINITE else fpu.regs[fpu.top], what="x87 operand")
        fpu.pop()
        return
    if key in _INT_STORES:
        size, pops, chop = _INT_STORES[key]
        value, flags, up = f.round_integer(fpu.st(0), size, f.RC_CHOP if chop else fpu.rc)
        fpu.raise_flags(flags)
        if value is None:
            value = -(1 << (8 * size - 1))  # the integer indefinite (masked invalid operation)
        cpu.write_uint(ea, value, size, what="x87 operand")
        _set_c1(fpu, up)
        if pops:
            fpu.pop()
        return
    raise Unsupported("x87 memory form not in the emulated subset")


def _register_form(insn: Insn, fpu: Fpu, cpu: GuestCpu) -> None:
    op, reg, i, modrm = insn.opcode, insn.reg, insn.rm, insn.modrm
    if op == 0xD8:
        _arith_or_compare(fpu, reg, 0, fpu.st(0), fpu.st(i), pops=1 if reg == COMP else 0)
    elif op in (0xDC, 0xDE) and reg not in (COM, COMP):
        # dest ST(i), src ST(0); the encodings of SUB/SUBR and DIV/DIVR are swapped (SDM FSUB/FSUBR).
        kind = reg ^ 1 if reg >= SUB else reg
        _arith_or_compare(fpu, kind, i, fpu.st(i), fpu.st(0), pops=1 if op == 0xDE else 0)
    elif op == 0xDC:  # D0+i / D8+i: aliases of FCOM/FCOMP ST(i)
        _arith_or_compare(fpu, reg, 0, fpu.st(0), fpu.st(i), pops=1 if reg == COMP else 0)
    elif op == 0xDE and modrm == 0xD9:  # FCOMPP
        _compare(fpu, fpu.st(0), fpu.st(1), unordered_ok=False)
        fpu.pop()
        fpu.pop()
    elif op == 0xDA and modrm == 0xE9:  # FUCOMPP
        _compare(fpu, fpu.st(0), fpu.st(1), unordered_ok=True)
        fpu.pop()
        fpu.pop()
    elif op == 0xDD and reg in (4, 5):  # FUCOM / FUCOMP ST(i)
        _compare(fpu, fpu.st(0), fpu.st(i), unordered_ok=True)
        if reg == 5:
            fpu.pop()
    elif (op == 0xDB and reg in (5, 6)) or (op == 0xDF and reg in (5, 6)):  # F(U)COMI(P)
        _compare_eflags(cpu, fpu, fpu.st(0), fpu.st(i), unordered_ok=reg == 5)
        if op == 0xDF:
            fpu.pop()
    elif op == 0xDD and reg == 0:  # FFREE ST(i)
        fpu.valid[(fpu.top + i) & 7] = False
    elif op == 0xDD and reg in (2, 3):  # FST / FSTP ST(i)
        x = fpu.st(0)
        fpu.set_st(i, f.to_extended(x) if x is f.INDEFINITE else fpu.regs[fpu.top])
        if reg == 3:
            fpu.pop()
    elif op in (0xDA, 0xDB) and reg <= 3:  # FCMOVcc ST(0), ST(i) (P6): copy if EFLAGS say so
        flags = cpu.regs.rflags
        taken = (bool(flags & CF), bool(flags & ZF), bool(flags & (CF | ZF)), bool(flags & PF))[reg]
        x = fpu.st(i)
        if taken != (op == 0xDB):  # DA: if the condition holds; DB: if it does not
            fpu.set_st(0, f.to_extended(x) if x is f.INDEFINITE else fpu.regs[(fpu.top + i) & 7])
    elif op == 0xD9:
        _d9_register_form(fpu, reg, i, modrm)
    else:
        raise Unsupported("x87 register form not in the emulated subset")


def _d9_register_form(fpu: Fpu, reg: int, i: int, modrm: int) -> None:
    if reg == 0:  # FLD ST(i)
        x = fpu.st(i)
        fpu.push(f.to_extended(x) if x is f.INDEFINITE else fpu.regs[(fpu.top + i) & 7])
    elif reg == 1:  # FXCH ST(i)
        a, b = fpu.st(0), fpu.st(i)
        fpu.set_st(0, f.to_extended(b))
        fpu.set_st(i, f.to_extended(a))
        _set_c1(fpu, False)
    elif modrm == 0xD0:  # FNOP
        pass
    elif modrm in (0xE0, 0xE1):  # FCHS, FABS: the sign bit only, no rounding
        x = fpu.st(0)
        fpu.set_st(0, f.to_extended(x.negated() if modrm == 0xE0 else x.absolute()))
        _set_c1(fpu, False)
    elif modrm == 0xE4:  # FTST
        _compare(fpu, fpu.st(0), f.finite(0), unordered_ok=False)
    elif modrm == 0xE5:  # FXAM
        _fxam(fpu)
    elif modrm in CONSTANTS:
        fpu.push(f.round_extended(f.finite(CONSTANTS[modrm]), 64, fpu.rc)[0])
    elif modrm == 0xFA:  # FSQRT
        fpu.store_result(0, *_sqrt(fpu.st(0), fpu.precision))
    elif modrm == 0xFC:  # FRNDINT: to an integer with RC, in the full 64-bit precision
        x = fpu.st(0)
        if x.kind == "finite" and not x.is_zero:
            value, flags, _ = f.round_integer(x, 4096, fpu.rc)
            fpu.store_result(0, f.finite(value, negative_zero=x.negative), flags, precision=64)
    elif modrm in (0xF6, 0xF7):  # FDECSTP, FINCSTP
        fpu.top = fpu.top + (1 if modrm == 0xF7 else -1)
        _set_c1(fpu, False)
    else:
        raise Unsupported("x87 instruction not in the emulated subset")


def _arith_or_compare(fpu: Fpu, kind: int, dest: int, x: f.Real, y: f.Real, pops: int) -> None:
    if kind in (COM, COMP):
        _compare(fpu, x, y, unordered_ok=False)
    else:
        result, flags = arithmetic(kind, x, y, fpu.rc)
        fpu.store_result(dest, result, flags)
    for _ in range(pops):
        fpu.pop()


def arithmetic(kind: int, x: f.Real, y: f.Real, rc: int) -> tuple[f.Real, int]:
    """dest OP src as the x87 defines it, exactly (rounding is the caller's): (result, flags)."""
    if kind == SUBR:
        kind, x, y = SUB, y, x
    elif kind == DIVR:
        kind, x, y = DIV, y, x
    if x.is_nan or y.is_nan:
        flags = f.IE if x.is_signaling or y.is_signaling else 0
        nans = [n for n in (x, y) if n.is_nan]
        return max(nans, key=lambda n: n.payload & ((1 << 62) - 1)).quieted(), flags
    if kind == SUB:
        kind, y = ADD, y.negated()
    negative = x.negative != y.negative
    if kind == ADD:
        if x.kind == "inf" or y.kind == "inf":
            if x.kind == y.kind and x.negative != y.negative:
                return f.INDEFINITE, f.IE  # inf - inf
            return (x if x.kind == "inf" else y), 0
        total = x.value + y.value
        if total == 0:
            # IEEE 754 §6.3: an exact zero sum is +0, or -0 when rounding down; -0 + -0 is -0.
            if x.is_zero and y.is_zero:
                negative = (x.negative and y.negative) or (rc == f.RC_DOWN and (x.negative or y.negative))
            else:
                negative = rc == f.RC_DOWN
            return f.Real(negative), 0
        return f.finite(total), 0
    if kind == MUL:
        if x.kind == "inf" or y.kind == "inf":
            if x.is_zero or y.is_zero:
                return f.INDEFINITE, f.IE  # inf * 0
            return f.Real(negative, kind="inf"), 0
        return f.Real(negative, x.magnitude * y.magnitude), 0
    # DIV
    if x.kind == "inf":
        return (f.INDEFINITE, f.IE) if y.kind == "inf" else (f.Real(negative, kind="inf"), 0)
    if y.kind == "inf":
        return f.Real(negative), 0
    if y.is_zero:
        return (f.INDEFINITE, f.IE) if x.is_zero else (f.Real(negative, kind="inf"), f.ZE)
    return f.Real(negative, x.magnitude / y.magnitude), 0


def _sqrt(x: f.Real, precision: int) -> tuple[f.Real, int]:
    if x.is_nan:
        return x.quieted(), f.IE if x.is_signaling else 0
    if x.is_zero:
        return x, 0
    if x.negative:
        return f.INDEFINITE, f.IE
    if x.kind == "inf":
        return x, 0
    return f.Real(False, f.sqrt_exact_or_bracketed(x.magnitude, precision)), 0


def _compare(fpu: Fpu, x: f.Real, y: f.Real, unordered_ok: bool) -> None:
    c3, c2, c0 = compare_flags(x, y)
    if (x.is_nan or y.is_nan) and (not unordered_ok or x.is_signaling or y.is_signaling):
        fpu.raise_flags(f.IE)
    fpu.set_cc(c3=c3, c2=c2, c0=c0)


def _compare_eflags(cpu: GuestCpu, fpu: Fpu, x: f.Real, y: f.Real, unordered_ok: bool) -> None:
    zf, pf, cf = compare_flags(x, y)
    if (x.is_nan or y.is_nan) and (not unordered_ok or x.is_signaling or y.is_signaling):
        fpu.raise_flags(f.IE)
    cpu.regs.rflags = (cpu.regs.rflags & ~EFLAGS_COMPARE) | (ZF if zf else 0) | (PF if pf else 0) | (CF if cf else 0)
    _set_c1(fpu, False)


def _fxam(fpu: Fpu) -> None:
    """FXAM's class codes in C3 C2 C0 (SDM Vol. 2A FXAM), the sign in C1; empty is 1x1."""
    p = fpu.top
    if not fpu.valid[p]:
        fpu.set_cc(c3=True, c0=True, c1=bool(fpu.regs[p][9] & 0x80) if fpu.regs[p] else False)
        return
    raw = fpu.regs[p]
    exp = int.from_bytes(raw[8:10], "little") & 0x7FFF
    x = f.from_extended(raw)
    sign = bool(raw[9] & 0x80)
    if x.kind == "nan":
        fpu.set_cc(c0=True, c1=sign)
    elif x.kind == "inf":
        fpu.set_cc(c2=True, c0=True, c1=sign)
    elif x.is_zero:
        fpu.set_cc(c3=True, c1=sign)
    elif exp == 0:
        fpu.set_cc(c3=True, c2=True, c1=sign)  # denormal
    else:
        fpu.set_cc(c2=True, c1=sign)


def _set_c1(fpu: Fpu, value: bool) -> None:
    fpu.state.fsw = (fpu.state.fsw & ~C1) | (C1 if value else 0)
