"""Exit storms: guest code that polls a device, named (`vmtrace summary --storms`).

A polling loop shows in a trace as one guest instruction address reading the same port or MMIO
address over and over and getting the same value back, e.g. a UART driver spinning on the line
status register (`in 0x3fd` → 0x60) before each character. A *site* is (vm, rip, target, value):
target is the port or guest-physical address and the direction; only reads count (a read that
keeps returning one value is a question the device could answer with an interrupt).

A site is a storm when it has at least MIN_COUNT exits and its polling rate is at least
MIN_RATE exits/s. The polling rate is 1 / the median interval between consecutive exits of the
site on one vCPU: the rate while the loop runs, which idle time between bursts does not dilute
(a driver that polls before each of 400 characters printed over 3 s still polls at ~20k/s).
The median comes from a log histogram with 16 bins per octave (±2.2%).

Exits saved: every exit of a storm's site. An interrupt-driven driver learns from the device's
interrupt what these reads keep returning, so it makes none of them; with the in-kernel irqchip
the interrupt reaches the guest without an exit to vmsup. It is an upper bound (a handler may
read a status register once per interrupt).
"""

from __future__ import annotations

import numpy as np

from . import schema
from .filters import EventFilter
from .handling import NO_HANDLE, Stitcher
from .trace import TraceReader

MIN_COUNT = 100  # exits of one site before it can be a storm
MIN_RATE = 1000.0  # exits/s while polling (see the module docstring)
_BINS_PER_OCTAVE = 16
_BINS = 64 * _BINS_PER_OCTAVE  # intervals from 1 ns to 2^64 ns


class _Site:
    __slots__ = ("count", "guest_ns", "handle_ns", "intervals")

    def __init__(self) -> None:
        self.count = 0
        self.guest_ns = 0
        self.handle_ns = 0
        self.intervals = np.zeros(_BINS, np.int64)  # log histogram of intervals between its exits

    def median_interval_ns(self) -> float | None:
        n = int(self.intervals.sum())
        if not n:
            return None
        k = int(np.searchsorted(np.cumsum(self.intervals), (n + 1) // 2))
        return 2 ** ((k + 0.5) / _BINS_PER_OCTAVE)  # the bin's geometric middle


def _interval_bins(intervals: np.ndarray) -> np.ndarray:
    clipped = np.maximum(intervals, 1).astype(np.float64)
    return np.minimum((np.log2(clipped) * _BINS_PER_OCTAVE).astype(np.int64), _BINS - 1)


def find_storms(reader: TraceReader, where: EventFilter | None = None, symbols: dict | None = None,
                min_count: int = MIN_COUNT, min_rate: float = MIN_RATE) -> dict:
    """Storms as JSON-ready data, most exits first. `symbols`: {vm: SymbolTable | None}
    (commands._symbols.vm_tables) to name each site's address."""
    sites: dict[tuple, _Site] = {}
    last_t: dict[tuple, int] = {}  # (stream, site) → t_exit of its latest exit
    last_site: dict[tuple, tuple] = {}  # stream → site of its latest row, awaiting its handling time
    handles = Stitcher()
    events = 0
    columns = {"t_exit", "guest_ns", "reason", "addr", "flags", "data", "rip"}
    with np.errstate(all="ignore"):
        for batch in reader.exit_batches(where=where, columns=columns):
            cols = batch.columns
            n = batch.n_rows
            if not n:
                continue
            stream = (batch.vm, batch.vcpu, batch.epoch)
            block = handles.block(batch)
            before = last_site.pop(stream, None)
            if before is not None and block.previous is not None:
                sites[before].handle_ns += block.previous
            keep = ((cols["reason"] == schema.REASON_IO) | (cols["reason"] == schema.REASON_MMIO)) \
                & ((cols["flags"] & schema.FLAG_WRITE) == 0) & (cols["rip"] != np.uint64(schema.RIP_UNKNOWN))
            if where is not None:
                keep &= where.mask(cols, vm=batch.vm, vcpu=batch.vcpu, epoch=batch.epoch)
            events += int(keep.sum())
            rows = np.flatnonzero(keep)
            if not len(rows):
                continue
            handle = block.full()[rows]
            addr = np.where(cols["reason"][rows] == schema.REASON_IO, cols["addr"][rows] & np.uint64(0xFFFF),
                            cols["addr"][rows])
            # the site of each kept row: (rip, reason, addr, data) as one row of a uint64 matrix
            key = np.stack([cols["rip"][rows], cols["reason"][rows].astype(np.uint64), addr,
                            cols["data"][rows]], axis=1)
            uniq, inverse = np.unique(key, axis=0, return_inverse=True)
            inverse = inverse.reshape(-1)
            order = np.argsort(inverse, kind="stable")  # rows of a site together, still in time order
            starts = np.searchsorted(inverse[order], np.arange(len(uniq)))
            bounds = [*starts.tolist(), len(rows)]
            t, g = cols["t_exit"][rows][order], cols["guest_ns"][rows][order]
            h = handle[order]
            for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
                rip, reason, port_or_gpa, data = (int(v) for v in uniq[i])
                site_key = (batch.vm, rip, reason, port_or_gpa, data)
                site = sites.get(site_key)
                if site is None:
                    site = sites[site_key] = _Site()
                site.count += b - a
                site.guest_ns += int(g[a:b].sum())
                hs = h[a:b]
                site.handle_ns += int(hs[hs != NO_HANDLE].sum())
                ts = t[a:b]
                intervals = np.diff(ts)
                previous = last_t.get((stream, site_key))
                if previous is not None:
                    intervals = np.concatenate([[int(ts[0]) - previous], intervals])
                last_t[(stream, site_key)] = int(ts[-1])
                if len(intervals):
                    np.add.at(site.intervals, _interval_bins(intervals), 1)
            if keep[-1]:
                last_row = int(np.searchsorted(rows, n - 1))
                site_row = uniq[inverse[last_row]]
                last_site[stream] = (batch.vm, *(int(v) for v in site_row))
    return _result(sites, events, symbols or {}, min_count, min_rate)


def _result(sites: dict, reads: int, symbols: dict, min_count: int, min_rate: float) -> dict:
    from .commands._symbols import table_for

    storms = []
    for (vm, rip, reason, target, data), site in sites.items():
        median = site.median_interval_ns()
        rate = 1e9 / median if median else 0.0
        if site.count < min_count or rate < min_rate:
            continue
        table = table_for(symbols, vm)
        location = table.resolve(rip) if table is not None else None
        io = reason == schema.REASON_IO
        storms.append({
            "vm": vm, "rip": rip, "where": str(location) if location is not None else f"{rip:#x}",
            "symbol": location.symbol if location is not None else None,
            "line": f"{location.file}:{location.line}" if location is not None and location.file else None,
            "reason": schema.reason_name(reason), "target": f"{target:#x}:{'in' if io else 'R'}",
            "port" if io else "addr": target, "data": data,
            "count": site.count, "rate_per_s": rate, "guest_ns": site.guest_ns, "handle_ns": site.handle_ns,
            "time_ns": site.guest_ns + site.handle_ns, "saved": site.count,
        })
    storms.sort(key=lambda s: (-s["count"], s["vm"], s["rip"]))
    return {"min_count": min_count, "min_rate_per_s": min_rate, "reads": reads, "storms": storms}
