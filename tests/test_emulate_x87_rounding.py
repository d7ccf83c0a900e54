"""The fallback's x87 arithmetic rounds exactly as the host's x87 under every control word.

vmworker/emulate/float80.py computes exact results and rounds them once; the oracle is the host
CPU's own x87 through numpy.longdouble with the same precision control and rounding mode
(host_x87.py). No /dev/kvm is needed.
"""

from __future__ import annotations

import random
from fractions import Fraction

import numpy as np
import pytest

from host_x87 import HOST_HAS_X87, extended_bytes, host_control_word
from vmworker.emulate import float80 as f
from vmworker.emulate.x87 import ADD, DIV, MUL, SUB, SUBR, DIVR, arithmetic

pytestmark = pytest.mark.skipif(not HOST_HAS_X87, reason="the oracle needs an x86-64 host whose long double is the x87's")

# Every precision (single 0x0xx, double 0x2xx, extended 0x3xx) and rounding mode (nearest 0x0xx,
# down 0x4xx, up 0x8xx, chop 0xCxx), exceptions masked.
CONTROL_WORDS = [0x037F, 0x027F, 0x007F, 0x077F, 0x0B7F, 0x0F7F, 0x0E7F, 0x047F, 0x087F]


def operands(seed: int, count: int) -> list[np.longdouble]:
    """Values with full 64-bit significands, both signs, exponents small and far apart."""
    rng = random.Random(seed)
    out = [np.longdouble(1), np.longdouble(3), np.longdouble(-0.1), np.longdouble(1e16), np.longdouble(2.0) ** -16400]
    while len(out) < count:
        mant = rng.getrandbits(64) | (1 << 63)
        exp = rng.choice([rng.randint(-70, 70), rng.randint(-16000, 16000)])
        sign = rng.choice([1, -1])
        out.append(np.longdouble(sign * mant) * np.longdouble(2.0) ** (exp - 63))
    return out


def real(x: np.longdouble) -> f.Real:
    return f.from_extended(extended_bytes(x))


def host(op: int, a: np.longdouble, b: np.longdouble) -> np.longdouble:
    return {ADD: a + b, SUB: a - b, SUBR: b - a, MUL: a * b, DIV: a / b, DIVR: b / a}[op]


@pytest.mark.parametrize("cw", CONTROL_WORDS, ids=[f"{cw:#06x}" for cw in CONTROL_WORDS])
def test_add_sub_mul_div_round_like_the_host_x87(cw):
    xs = operands(cw, 40)
    precision, rc = f.PRECISION_BITS[(cw >> 8) & 3], (cw >> 10) & 3
    mismatches = []
    with np.errstate(all="ignore"), host_control_word(cw):
        for a in xs[:20]:
            for b in xs[20:]:
                for op in (ADD, SUB, SUBR, MUL, DIV, DIVR):
                    want = extended_bytes(host(op, a, b))
                    result, _ = arithmetic(op, real(a), real(b), rc)
                    got, _, _ = f.round_extended(result, precision, rc)
                    if got != want:
                        mismatches.append((op, a, b, got.hex(), want.hex()))
    assert not mismatches, mismatches[:5]


@pytest.mark.parametrize("cw", CONTROL_WORDS, ids=[f"{cw:#06x}" for cw in CONTROL_WORDS])
def test_sqrt_rounds_like_the_host_x87(cw):
    precision, rc = f.PRECISION_BITS[(cw >> 8) & 3], (cw >> 10) & 3
    with np.errstate(all="ignore"), host_control_word(cw):
        for x in operands(cw + 1, 200):
            x = abs(x)
            want = extended_bytes(np.sqrt(x))
            got, _, _ = f.round_extended(f.Real(False, f.sqrt_exact_or_bracketed(real(x).magnitude, precision)),
                                         precision, rc)
            assert got == want, (x, got.hex(), want.hex())


@pytest.mark.parametrize("cw", [0x037F, 0x077F, 0x0B7F, 0x0F7F], ids=["nearest", "down", "up", "chop"])
def test_stores_to_double_and_single_and_integers_round_like_the_host(cw):
    rc = (cw >> 10) & 3
    with np.errstate(all="ignore"), host_control_word(cw):
        for x in operands(cw + 2, 300):
            got, _, _ = f.round_ieee(real(x), f.DOUBLE, rc)
            assert got == np.float64(x).tobytes(), x
            got, _, _ = f.round_ieee(real(x), f.SINGLE, rc)
            assert got == np.float32(x).tobytes(), x
            if abs(x) < 2.0 ** 62:
                value, _, _ = f.round_integer(real(x), 8, rc)
                assert value == int(Fraction(*np.rint(x).as_integer_ratio())), x


def test_precision_control_narrows_the_significand_but_not_the_exponent_range():
    # 1e300 * 1e300 overflows a double but not the x87 at double precision (SDM Vol. 1 §8.1.5.2).
    big = real(np.longdouble(1e300))
    result, flags = arithmetic(MUL, big, big, f.RC_NEAREST)
    raw, more, _ = f.round_extended(result, 53, f.RC_NEAREST)
    assert not (flags | more) & f.OE
    with host_control_word(0x027F):
        assert raw == extended_bytes(np.longdouble(1e300) * np.longdouble(1e300))


def test_one_third_differs_under_each_precision_and_between_nearest_and_chop():
    third = arithmetic(DIV, f.finite(1), f.finite(3), f.RC_NEAREST)[0]
    nearest = {p: f.round_extended(third, p, f.RC_NEAREST)[0] for p in (24, 53, 64)}
    assert len(set(nearest.values())) == 3
    # ...aaab rounded up at 64 bits, ...aaaa chopped (SDM Vol. 1 §4.8.4)
    assert nearest[64] != f.round_extended(third, 64, f.RC_CHOP)[0]


def test_masked_invalid_operations_give_the_indefinite_nan():
    inf = f.Real(False, kind="inf")
    assert arithmetic(SUB, inf, inf, f.RC_NEAREST) == (f.INDEFINITE, f.IE)
    assert arithmetic(DIV, f.finite(0), f.finite(0), f.RC_NEAREST) == (f.INDEFINITE, f.IE)
    assert arithmetic(DIV, f.finite(1), f.finite(0), f.RC_NEAREST) == (f.Real(False, kind="inf"), f.ZE)
    assert f.round_integer(f.finite(2 ** 70), 8, f.RC_NEAREST)[0] is None
