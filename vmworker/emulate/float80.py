"""x87 numbers: the 80-bit register format, IEEE single/double, and rounding as the x87 does it.

The fallback computes every result exactly (Python integers / Fraction) and rounds it once, with
the control word's rounding mode and to the precision it asks for. numpy.longdouble is the x87
itself on this host but always rounds with the host's control word (nearest, 64 bits): used for a
guest asking for single precision or another rounding mode it would round twice or wrongly, so it
serves the tests as an oracle instead. Precision control (SDM Vol. 1 §8.1.5.2) narrows only the
significand of add/sub/mul/div/sqrt results; the exponent keeps the 15-bit extended range.
Formats: SDM Vol. 1 §4.2.2 and §4.8 (including the explicit integer bit of the 80-bit format).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from fractions import Fraction
from math import isqrt

# Rounding control (FCW bits 10-11) and the results' exception flags (FSW bits 0-5).
RC_NEAREST, RC_DOWN, RC_UP, RC_CHOP = 0, 1, 2, 3
IE, DE, ZE, OE, UE, PE = 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4, 1 << 5


@dataclass(frozen=True)
class Format:
    name: str
    precision: int  # significand bits, the integer bit included
    emin: int  # smallest normal exponent (unbiased)
    emax: int


SINGLE = Format("single", 24, -126, 127)
DOUBLE = Format("double", 53, -1022, 1023)
EXTENDED = Format("extended", 64, -16382, 16383)
# Precision control (FCW bits 8-9): 00 single, 10 double, 11 extended; 01 is reserved.
PRECISION_BITS = {0: 24, 1: 64, 2: 53, 3: 64}


@dataclass(frozen=True)
class Real:
    """An x87 value: a finite number (exact magnitude, sign kept for zeros), an infinity or a NaN."""

    negative: bool
    magnitude: Fraction = Fraction(0)
    kind: str = "finite"  # "finite" | "inf" | "nan"
    payload: int = 0  # a NaN's 64-bit significand (bit 63 set, bit 62 = quiet)

    @property
    def is_nan(self) -> bool:
        return self.kind == "nan"

    @property
    def is_signaling(self) -> bool:
        return self.kind == "nan" and not self.payload & (1 << 62)

    @property
    def is_zero(self) -> bool:
        return self.kind == "finite" and self.magnitude == 0

    @property
    def value(self) -> Fraction:
        return -self.magnitude if self.negative else self.magnitude

    def quieted(self) -> "Real":
        return Real(self.negative, kind="nan", payload=self.payload | (3 << 62))

    def negated(self) -> "Real":
        return Real(not self.negative, self.magnitude, self.kind, self.payload)

    def absolute(self) -> "Real":
        return Real(False, self.magnitude, self.kind, self.payload)


INDEFINITE = Real(True, kind="nan", payload=0xC000_0000_0000_0000)  # the "real indefinite" QNaN
INFINITY = Real(False, kind="inf")


def finite(value: Fraction | int, negative_zero: bool = False) -> Real:
    value = Fraction(value)
    return Real(value < 0 or (value == 0 and negative_zero), abs(value))


# --- decoding -----------------------------------------------------------------------------------
def _ieee(bits: int, fmt: Format) -> Real:
    frac_bits = fmt.precision - 1
    exp_bits = {24: 8, 53: 11}[fmt.precision]
    negative = bool(bits >> (frac_bits + exp_bits))
    exp = (bits >> frac_bits) & ((1 << exp_bits) - 1)
    frac = bits & ((1 << frac_bits) - 1)
    if exp == (1 << exp_bits) - 1:
        if frac == 0:
            return Real(negative, kind="inf")
        return Real(negative, kind="nan", payload=(1 << 63) | (frac << (63 - frac_bits)))
    if exp == 0:
        return Real(negative, Fraction(frac) * Fraction(2) ** (fmt.emin - frac_bits))
    return Real(negative, Fraction((1 << frac_bits) | frac) * Fraction(2) ** (exp - (1 << (exp_bits - 1)) + 1 - frac_bits))


def from_single(raw: bytes) -> Real:
    return _ieee(struct.unpack("<I", raw)[0], SINGLE)


def from_double(raw: bytes) -> Real:
    return _ieee(struct.unpack("<Q", raw)[0], DOUBLE)


def from_extended(raw: bytes) -> Real:
    """The 10-byte register/memory format. Unnormals (integer bit clear, exponent not 0) are
    invalid operands on a 387 and later: they read as the indefinite NaN."""
    mant, se = struct.unpack("<QH", raw[:10])
    negative, exp = bool(se >> 15), se & 0x7FFF
    if exp == 0x7FFF:
        if mant & ((1 << 63) - 1) == 0:
            return Real(negative, kind="inf")
        return Real(negative, kind="nan", payload=mant | (1 << 63))
    if exp == 0:
        return Real(negative, Fraction(mant) * Fraction(2) ** (EXTENDED.emin - 63))
    if not mant >> 63:
        return INDEFINITE
    return Real(negative, Fraction(mant) * Fraction(2) ** (exp - 16383 - 63))


# --- rounding -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rounded:
    negative: bool
    significand: int  # < 2**precision; below 2**(precision-1) only when denormal (exponent == emin)
    exponent: int  # unbiased, of the significand's top bit position
    inf: bool  # overflowed to infinity
    flags: int  # PE, UE, OE
    rounded_up: bool  # the magnitude grew (FSW.C1)


def round_to(value: Fraction, negative: bool, precision: int, emin: int, emax: int, rc: int) -> Rounded:
    """Round a finite value (|value|, with its sign) to `precision` significand bits in the
    exponent range [emin, emax], as IEEE 754 and the x87 do: one rounding of the exact value."""
    n, d = value.numerator, value.denominator
    if n == 0:
        return Rounded(negative, 0, emin, False, 0, False)
    e = n.bit_length() - d.bit_length()
    if (n << max(0, -e)) < (d << max(0, e)):
        e -= 1  # now 2**e <= value < 2**(e+1)
    tiny = e < emin
    exp = max(e, emin)
    shift = precision - 1 - exp
    if shift >= 0:
        q, r = divmod(n << shift, d)
        den = d
    else:
        den = d << -shift
        q, r = divmod(n, den)
    up = False
    if r:
        if rc == RC_NEAREST:
            up = 2 * r > den or (2 * r == den and q & 1 == 1)
        elif rc == RC_DOWN:
            up = negative
        elif rc == RC_UP:
            up = not negative
    if up:
        q += 1
        if q == 1 << precision:
            q >>= 1
            exp += 1
    flags = PE if r else 0
    if tiny and r:
        flags |= UE  # tiny and inexact: the masked underflow response (SDM Vol. 1 §4.9.1.5)
    if exp > emax:
        # Overflow: infinity, or the largest finite number when rounding away from it.
        to_inf = rc == RC_NEAREST or (rc == RC_UP and not negative) or (rc == RC_DOWN and negative)
        if to_inf:
            return Rounded(negative, 0, emax + 1, True, flags | OE | PE, True)
        return Rounded(negative, (1 << precision) - 1, emax, False, flags | OE | PE, False)
    return Rounded(negative, q, exp, False, flags, up)


def rounded_value(r: Rounded, precision: int) -> Real:
    if r.inf:
        return Real(r.negative, kind="inf")
    return Real(r.negative, Fraction(r.significand) * Fraction(2) ** (r.exponent - precision + 1))


# --- encoding -----------------------------------------------------------------------------------
def to_extended(x: Real) -> bytes:
    """The exact 80-bit encoding of a value already representable in it."""
    sign = 0x8000 if x.negative else 0
    if x.kind == "inf":
        return struct.pack("<QH", 1 << 63, sign | 0x7FFF)
    if x.kind == "nan":
        return struct.pack("<QH", x.payload, sign | 0x7FFF)
    r = round_to(x.magnitude, x.negative, 64, EXTENDED.emin, EXTENDED.emax, RC_NEAREST)
    if r.flags & (PE | OE):
        raise ValueError(f"{x} is not representable in the 80-bit format")
    return _pack_extended(r, 64)


def _pack_extended(r: Rounded, precision: int) -> bytes:
    sign = 0x8000 if r.negative else 0
    if r.inf:
        return struct.pack("<QH", 1 << 63, sign | 0x7FFF)
    mant = r.significand << (64 - precision)
    biased = r.exponent + 16383 if mant >> 63 else 0
    return struct.pack("<QH", mant, sign | biased)


def round_extended(x: Real, precision: int, rc: int) -> tuple[bytes, int, bool]:
    """A register result: (80-bit encoding, flags, rounded up) with `precision` significand bits."""
    if x.kind != "finite":
        return to_extended(x), 0, False
    r = round_to(x.magnitude, x.negative, precision, EXTENDED.emin, EXTENDED.emax, rc)
    return _pack_extended(r, precision), r.flags, r.rounded_up


def round_ieee(x: Real, fmt: Format, rc: int) -> tuple[bytes, int, bool]:
    """FST/FSTP to a single or double in memory: (bytes, flags, rounded up). A NaN keeps the top of
    its payload (quieted: storing an SNaN is an invalid operation, flagged by the caller)."""
    frac_bits = fmt.precision - 1
    exp_bits = {24: 8, 53: 11}[fmt.precision]
    bias = (1 << (exp_bits - 1)) - 1
    sign = int(x.negative) << (frac_bits + exp_bits)
    top = (1 << exp_bits) - 1
    size = (1 + exp_bits + frac_bits) // 8
    flags, up = 0, False
    if x.kind == "inf":
        bits = sign | (top << frac_bits)
    elif x.kind == "nan":
        bits = sign | (top << frac_bits) | ((x.payload | (1 << 62)) >> (63 - frac_bits)) & ((1 << frac_bits) - 1)
    else:
        r = round_to(x.magnitude, x.negative, fmt.precision, fmt.emin, fmt.emax, rc)
        flags, up = r.flags, r.rounded_up
        if r.inf:
            bits = sign | (top << frac_bits)
        elif r.significand >> frac_bits:
            bits = sign | ((r.exponent + bias) << frac_bits) | (r.significand & ((1 << frac_bits) - 1))
        else:
            bits = sign | r.significand  # denormal (or zero)
    return bits.to_bytes(size, "little"), flags, up


def round_integer(x: Real, size: int, rc: int) -> tuple[int | None, int, bool]:
    """FIST/FISTP: (integer, or None when out of range or not a number, flags, rounded up)."""
    if x.kind != "finite":
        return None, IE, False
    v = x.value
    q, r = divmod(v.numerator, v.denominator)  # floor
    if r:
        frac = v - q
        if rc == RC_NEAREST:
            q += 1 if frac > Fraction(1, 2) or (frac == Fraction(1, 2) and q & 1) else 0
        elif rc == RC_UP:
            q += 1
        elif rc == RC_CHOP and v < 0:
            q += 1
    limit = 1 << (8 * size - 1)
    if not -limit <= q < limit:
        return None, IE, False
    return q, PE if r else 0, r != 0 and abs(q) > abs(v)


def sqrt_exact_or_bracketed(x: Fraction, precision: int) -> Fraction:
    """√x, exact when it is rational, otherwise a stand-in strictly between two integers at far more
    than `precision` + 2 bits, which rounds exactly as √x does in every mode (a sticky bit)."""
    n, d = x.numerator, x.denominator
    root_n, root_d = isqrt(n), isqrt(d)
    if root_n * root_n == n and root_d * root_d == d:
        return Fraction(root_n, root_d)
    bits = 2 * (precision + 4) + max(0, d.bit_length() - n.bit_length())
    scaled = (n << (2 * bits)) // d  # √x = √scaled / 2**bits (up to the floor below)
    y = isqrt(scaled)
    return Fraction(2 * y + 1, 1 << (bits + 1))  # y + 1/2, scaled back
