"""Hot spots, for people: the target of an exit (port or MMIO address and direction, else its
reason) in one int64 so each place in the guest can count its top targets, and the table of
`vmtrace summary --storms` (tracetool.storms).
"""

from __future__ import annotations

import numpy as np

from .. import schema


# A row's target in one int64: port I/O (port, direction), MMIO (guest-physical address below
# 2^52, x86's widest physical address, and R/W), or else the exit reason.
_TARGET_IO, _TARGET_MMIO, _TARGET_OTHER = 1 << 60, 2 << 60, 3 << 60
_GPA_MASK = (1 << 52) - 1


def target_codes(cols: dict) -> np.ndarray:
    """Each row's target code (the columns reason, addr, flags)."""
    reason = cols["reason"]
    write = (cols["flags"] & schema.FLAG_WRITE).astype(np.int64)
    addr = cols["addr"]
    io = ((addr & np.uint64(0xFFFF)).astype(np.int64) << 1) | write | _TARGET_IO
    mmio = ((addr & np.uint64(_GPA_MASK)).astype(np.int64) << 1) | write | _TARGET_MMIO
    other = reason.astype(np.int64) | _TARGET_OTHER
    return np.where(reason == schema.REASON_IO, io, np.where(reason == schema.REASON_MMIO, mmio, other))


def target_text(code: int) -> str:
    """`0x3fd:in`, `0xfee00000:W`, or a reason name."""
    kind, value = code & (3 << 60), code & ((1 << 60) - 1)
    if kind == _TARGET_IO:
        return f"{value >> 1:#x}:{'out' if value & 1 else 'in'}"
    if kind == _TARGET_MMIO:
        return f"{value >> 1:#x}:{'W' if value & 1 else 'R'}"
    return schema.reason_name(value)



def render_storms(data: dict, console, *, wide: bool = False) -> None:
    """`--storms`: one row per polling site (its address and symbol, port, value, exits, rate,
    time and the exits an interrupt-driven driver would save), fitted to the terminal."""
    from rich.text import Text

    from . import _common as c

    columns = [c.Col("guest address", numeric=False), c.Col("read", numeric=False), c.Col("value"), c.Col("exits"),
               c.Col("rate/s"), c.Col("time\nms"), c.Col("saved")]
    rows = [[s["where"], s["target"], f"{s['data']:#x}", str(s["count"]), f"{s['rate_per_s']:.0f}",
             f"{s['time_ns'] / 1e6:.2f}", str(s["saved"])] for s in data["storms"]]
    title = f"Exit storms (polling: ≥{data['min_count']} reads of one value, ≥{data['min_rate_per_s']:.0f}/s)"
    t, hidden = c.fitted_table(console, title, columns, rows, wide=wide)
    c.print_fitted(console, t, hidden, wide=wide)
    saved = sum(s["saved"] for s in data["storms"])
    console.print(Text(f"{len(data['storms'])} storm(s) among {data['reads']} reads; an interrupt-driven driver "
                       f"would save up to {saved} exits (time: guest + handling time of those exits)"))
