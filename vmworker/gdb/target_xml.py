"""The target description (GDB manual, "Target Descriptions"), built from regs.REGISTERS.

One document for every mode: architecture i386:x86-64, every register in `g`-packet order with
explicit regnums. Types are gdb's predefined ones, except the EFLAGS flag names below.
"""

from __future__ import annotations

from . import regs as R

# EFLAGS bits (SDM Vol. 1 §3.4.3), so `info registers` shows [ ZF PF ... ] as gdb users expect.
_EFLAGS_BITS = (("CF", 0), ("", 1), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7), ("TF", 8), ("IF", 9), ("DF", 10),
                ("OF", 11), ("NT", 14), ("RF", 16), ("VM", 17), ("AC", 18), ("VIF", 19), ("VIP", 20), ("ID", 21))


def _eflags_type() -> str:
    fields = "".join(f'<field name="{n}" start="{b}" end="{b}"/>' for n, b in _EFLAGS_BITS)
    return f'<flags id="vmsup_eflags" size="4">{fields}</flags>'


def build() -> bytes:
    parts = ['<?xml version="1.0"?>', '<!DOCTYPE target SYSTEM "gdb-target.dtd">', "<target>",
             "<architecture>i386:x86-64</architecture>"]
    feature = None
    for i, reg in enumerate(R.REGISTERS):
        if reg.feature != feature:
            if feature is not None:
                parts.append("</feature>")
            feature = reg.feature
            parts.append(f'<feature name="{feature}">')
            if feature == R.CORE:
                parts.append(_eflags_type())
        group = f' group="{reg.group}"' if reg.group else ""
        parts.append(f'<reg name="{reg.name}" bitsize="{reg.bits}" type="{reg.type}" regnum="{i}"{group}/>')
    parts += ["</feature>", "</target>"]
    return "\n".join(parts).encode()


TARGET_XML = build()
