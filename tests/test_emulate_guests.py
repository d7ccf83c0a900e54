"""Instruction fallbacks with real guests (vmworker/emulate/): what this PVM host's KVM emulator
gives up on — INT n/INT3/INTO and IRET outside real mode, FWAIT, x87 — the VMM performs, so the
guests below run to their end; what the VMM does not emulate ends the VM with a clear status.

The x87 results of x87calc (C built with -m32 -mfpmath=387) are held against numpy.longdouble
computed on the host's own x87 under the same control word (host_x87.py).
"""

from __future__ import annotations

import re
from fractions import Fraction

import numpy as np
import pytest

from host_x87 import HOST_HAS_X87, extended_bytes, host_control_word
from test_launch_guests import assert_clean, assert_status, status_of

pytestmark = pytest.mark.kvm

# x87calc's inputs (guest/x87calc.c: A, B, QA, QB, S).
A = [1.0, 2.0, 1e16, 0.1, -7.0, 123456789.123, 1e300]
B = [3.0, 3.0, 1.0, 3.0, 3.0, 987654321.987, 1e300]
S = -1234
CONTROL_WORDS = [0x037F, 0x027F, 0x007F, 0x077F, 0x0B7F, 0x0F7F, 0x0E7F]
# FLDPI's constant (SDM Vol. 1 §8.3.8: the x87 keeps pi to 66 bits and rounds it with RC):
# 0xC90FDAA22168C234_C4..., so nearest and up give ...C235, down and chop ...C234.
PI_SIGNIFICAND = 0xC90FDAA22168C234


def test_ring3_int80_goes_through_the_tss_stack_and_iret_returns_in_protected_mode(vmsup):
    proc = vmsup("launch", "int80_32", "--quiet")
    assert proc.stdout == ("int80_32: ring 0 int 0x80 ok\nint80_32: ring 3 int 0x80 ok\n"
                           "int80_32: int3 ok\nint80_32: into ok\n")
    assert_status(status_of(proc.stderr), "guest exit code 0")
    assert proc.returncode == 0
    assert_clean(proc)


def test_ring3_int80_uses_rsp0_ist_and_returns_to_64_bit_and_compatibility_mode(vmsup):
    proc = vmsup("launch", "int80_64", "--quiet")
    assert proc.stdout == ("int80_64: ring 0 int 0x80 ok\nint80_64: ring 3 int 0x80 ok\n"
                           "int80_64: int3 on IST1 ok\nint80_64: x87 with RIP-relative operands ok\n"
                           "int80_64: compatibility mode int 0x80 ok\n")
    assert_status(status_of(proc.stderr), "guest exit code 0")
    assert proc.returncode == 0
    assert_clean(proc)


def test_an_instruction_not_emulated_ends_the_vm_with_its_bytes_and_disassembly(vmsup):
    proc = vmsup("launch", "x87unknown", "--quiet")
    assert proc.stdout == "x87unknown: fsin next\n"  # finit (fwait + fninit) and fldpi were done
    fields = status_of(proc.stderr)
    assert_status(fields, "internal-error")
    assert "emulation failure" in fields["status"]
    assert "bytes d9 fe (fsin) at 0x10016" in fields["status"]
    assert proc.returncode != 0
    assert_clean(proc)


@pytest.fixture(scope="module")
def x87calc_lines(kvm_required):
    from conftest import run_vmsup
    proc = run_vmsup("launch", "x87calc", "--quiet", timeout=120)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert_status(status_of(err), "guest exit code 0")
    assert "Traceback" not in out + err
    return out.splitlines()


def test_finit_leaves_the_reset_control_and_status_words(x87calc_lines):
    assert x87calc_lines[0] == "init 037f 0000"


def test_fldpi_rounds_with_the_rounding_control(x87calc_lines):
    got = {int(cw, 16): value for _, cw, value in (line.split() for line in x87calc_lines if line.startswith("pi "))}
    assert set(got) == set(CONTROL_WORDS)
    for cw, value in got.items():
        up = ((cw >> 10) & 3) in (0, 2)  # nearest or up
        assert value == f"4000{PI_SIGNIFICAND + up:016x}", hex(cw)


def _expected(op: str, i: int, cw: int) -> str:
    a, b = np.longdouble(A[i]), np.longdouble(B[i])
    with np.errstate(all="ignore"), host_control_word(cw):
        if op in ("add", "sub", "mul", "div", "sqrt", "smul"):
            x = {"add": lambda: a + b, "sub": lambda: a - b, "mul": lambda: a * b, "div": lambda: a / b,
                 "sqrt": lambda: np.sqrt(abs(a)), "smul": lambda: a * np.longdouble(S)}[op]()
            raw = extended_bytes(x)
            return raw[8:10][::-1].hex() + raw[:8][::-1].hex()
        if op == "ddiv":
            return f"{np.float64(a / b).view(np.uint64):016x}"
        if op == "lmul":
            product = Fraction(*(a * b).as_integer_ratio())
            return f"{int(product) & 0xFFFF_FFFF_FFFF_FFFF:016x}"  # int() truncates, as the C cast does
        if op == "cmp":
            return "1" if a < b else "2" if a == b else "4"
    raise AssertionError(op)


@pytest.mark.skipif(not HOST_HAS_X87, reason="the oracle needs an x86-64 host whose long double is the x87's")
def test_x87_arithmetic_matches_the_host_x87_under_every_control_word(x87calc_lines):
    rows = [line.split() for line in x87calc_lines if line.startswith("r ")]
    assert len(rows) >= len(CONTROL_WORDS) * len(A) * 8
    for _, cw, i, op, value in rows:
        assert value == _expected(op, int(i), int(cw, 16)), (cw, i, op)
    # The control word changes the answers here: 1/3 comes out single, double, extended rounded up
    # (nearest and up: ...aaab) and extended rounded down (down and chop: ...aaaa).
    thirds = {value for _, cw, i, op, value in rows if (i, op) == ("0", "div")}
    assert len(thirds) == 4


@pytest.mark.skipif(not HOST_HAS_X87, reason="the oracle needs an x86-64 host whose long double is the x87's")
def test_64_bit_division_through_long_double_is_exact_only_with_extended_precision(x87calc_lines):
    rows = [line.split() for line in x87calc_lines if line.startswith("q ")]
    wrong_at_double = 0
    for _, cw, a, b, q in rows:
        cw, a, b, q = int(cw, 16), int(a, 16), int(b, 16), int(q, 16)
        if (cw >> 8) & 3 == 3:
            assert q == a // b, (hex(cw), a, b)  # exact at 64 bits, whatever the rounding mode
            continue
        la, lb = np.longdouble(str(a)), np.longdouble(str(b))  # parsed exactly, before the CW change
        with np.errstate(all="ignore"), host_control_word(cw):
            quotient = Fraction(*(la / lb).as_integer_ratio())
        want = int(quotient) if int(quotient) < 2 ** 63 else 1 << 63  # FISTP's integer indefinite
        assert q == want, (hex(cw), a, b)
        wrong_at_double += cw == 0x027F and q != a // b
    assert wrong_at_double >= 1  # the precision control changes the result of an integer division
