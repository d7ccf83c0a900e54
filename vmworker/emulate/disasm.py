"""A one-line disassembly of instruction bytes, for refusals (iced-x86, a pure disassembler)."""

from __future__ import annotations


def disassemble(code: bytes, bitness: int, ip: int) -> str:
    """The first instruction in `code` in Intel syntax, or a short note if it cannot be decoded."""
    try:
        from iced_x86 import Decoder, Formatter, FormatterSyntax
    except ImportError:  # the dependency is declared; this only keeps a broken install readable
        return "no disassembler (iced-x86 is not installed)"
    decoder = Decoder(bitness, code, ip=ip)
    insn = decoder.decode()
    if insn.is_invalid:
        return "invalid instruction"
    return Formatter(FormatterSyntax.INTEL).format(insn)
