"""`vmtrace summary`: exit statistics like `perf kvm stat report`, plus percentiles.

Per group (exit reason, I/O port and direction, MMIO address and direction, vCPU, VM, or where in
the guest: its instruction address, symbol or source line, named by tracetool.symbols): the
count and its share, the share of handling time (perf's Time%: from the exit until the vCPU
enters the guest again), and min / max / mean / stddev / p50 / p99 of guest time (the time
inside KVM_RUN that ended in this exit) and of handling time (see schema: derived from the
next event of the same stream; a stream's last event has none).

Numpy throughout, one block at a time in file order; the statistics of each group are
tracetool.streaming_stats's (exact, within a memory budget shared by all groups).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import typer

from ..exit_tally import RunTally, unclaimed_text
from ..analysis import vm_names
from ..coalesced import exits_avoided
from ..emulated import emulated_counts
from ..filters import EventFilter
from ..handling import Stitcher
from ..streaming_stats import PERCENTILES, Budget, Metric
from ..trace import ExitBatch, TraceReader
from . import _common as c
from .. import storms as storm_finder
from ._hot_spots import render_storms, target_codes, target_text
from ._grouping import (ADDRESS_GROUPINGS, REASON_OF, block_keys, event_key, key_fields, label, parse_by,
                        split_key, where_column, where_name)
from ._symbols import SYMBOLS_OPT, table_for, vm_tables

SORTS = ("count", "time", "max")
EXACT_LIMIT = 1 << 24  # outliers kept for exact percentiles, all groups together (8 bytes each)
TOP_TARGETS = 3  # ports/addresses named per row of a grouping by where the guest was


class _Group:
    __slots__ = ("guest", "handle", "targets")

    def __init__(self, budget: Budget) -> None:
        self.guest = Metric(budget)
        self.handle = Metric(budget)
        self.targets: dict[int, int] = {}  # target code (see _hot_spots.target_codes) → exits

    def count_targets(self, codes: np.ndarray) -> None:
        values, counts = np.unique(codes, return_counts=True)
        for value, count in zip(values.tolist(), counts.tolist()):
            self.targets[value] = self.targets.get(value, 0) + count


class _Summary:
    def __init__(self, bys: tuple[str, ...], exact_limit: int) -> None:
        self.bys = bys
        self.groups: dict[tuple, _Group] = {}
        self.budget = Budget(exact_limit)

    def group(self, key: tuple) -> _Group:
        g = self.groups.get(key)
        if g is None:
            g = self.groups[key] = _Group(self.budget)
        return g

    def add(self, keys: list[tuple], starts: np.ndarray | None, guest: np.ndarray, handle: np.ndarray,
            has_handle: np.ndarray | None, targets: np.ndarray | None = None) -> None:
        """Add one block's events, sorted by group (`starts`: where each group begins; None for
        one group). `has_handle` masks the rows whose handling time is known (None: all);
        `targets`: each row's target code, counted per group (None: not wanted)."""
        if starts is None:
            g = self.group(keys[0])
            g.guest.add(guest)
            g.handle.add(handle if has_handle is None else handle[has_handle])
            if targets is not None:
                g.count_targets(targets)
            return
        bounds = [*starts.tolist(), len(guest)]
        for key, a, b in zip(keys, bounds, bounds[1:]):
            g = self.group(key)
            g.guest.add(guest[a:b])
            h = handle[a:b]
            g.handle.add(h if has_handle is None else h[has_handle[a:b]])
            if targets is not None:
                g.count_targets(targets[a:b])



def summarize(reader: TraceReader, by: str = "reason", sort: str = "count", where: EventFilter | None = None,
              exact_limit: int = EXACT_LIMIT, symbols: dict | None = None, top: int | None = TOP_TARGETS) -> dict:
    """The summary as JSON-ready data: totals, one entry per group in `sort` order. `by`: one
    grouping or two joined by a comma (`symbol,reason`: each symbol's exits by reason). `symbols`:
    {vm: SymbolTable | None} (commands._symbols.vm_tables) for the address groupings; `top`: how
    many ports/addresses each of their rows names (None: all)."""
    bys = parse_by(by)
    if sort not in SORTS:
        raise ValueError(f"unknown sort key {sort!r} (known: {', '.join(SORTS)})")
    acc = _Summary(bys, exact_limit)
    only_reason = next((REASON_OF[b] for b in bys if b in REASON_OF), None)
    handles = Stitcher()
    last_key: dict[tuple[int, int, int], tuple] = {}  # stream → group of its last event, if kept
    columns = {"t_exit", "guest_ns", "reason"}
    with_targets = len(bys) == 1 and bys[0] in ADDRESS_GROUPINGS
    if {"ioport", "mmio"} & set(bys) or where is not None or with_targets:
        columns |= {"addr", "flags"}
    if set(bys) & set(ADDRESS_GROUPINGS):
        columns |= {"rip"}
    symbols = symbols or {}
    with np.errstate(all="ignore"):  # a hostile file may overflow int64 arithmetic; no warnings
        for batch in reader.exit_batches(where=where, columns=columns):
            for b in bys:
                if b in ADDRESS_GROUPINGS:
                    batch.columns[where_name(b)] = where_column(b, batch.columns["rip"], table_for(symbols, batch.vm))
            _add_batch(acc, batch, bys, only_reason, where, handles, last_key, with_targets)
        for stream, handle in handles.unclaimed().items():  # kept by a record-time filter
            if stream in last_key:
                acc.group(last_key[stream]).handle.add(np.array([handle], np.int64))
    return _result(reader, acc, sort, where, symbols, top)


def _every_row_handle(inner: np.ndarray, n: int, follows) -> tuple[np.ndarray, np.ndarray]:
    """Handling times of all n rows of a block and whether each is known: the last row's comes
    with the stream's next block (0 here, not known), and where a sequence number was dropped
    after a row (`follows` False: a record-time filter) that row's is not known either."""
    full = np.empty(n, np.int64)
    full[:-1] = inner
    full[-1] = 0
    known = np.zeros(n, bool)
    known[:-1] = True if follows is None else follows
    return full, known


def _add_batch(acc: _Summary, batch: ExitBatch, bys: tuple[str, ...], only_reason: int | None,
               where: EventFilter | None, handles: Stitcher, last_key: dict, with_targets: bool) -> None:
    cols = batch.columns
    n = batch.n_rows
    if not n:
        return
    g = cols["guest_ns"]
    stream = (batch.vm, batch.vcpu, batch.epoch)
    block = handles.block(batch)
    before = last_key.pop(stream, None)
    if before is not None and block.previous is not None:
        # the previous block's last event of this stream: handled until this block's first entry
        acc.group(before).handle.add(np.array([block.previous], np.int64))
    handle = block.inner  # rows 0 .. n-2; the last row's comes with the next block
    contiguous = block.follows is None  # no sequence number dropped inside the block

    keep = None
    if only_reason is not None:
        keep = cols["reason"] == only_reason
    if where is not None:
        mask = where.mask(cols, vm=batch.vm, vcpu=batch.vcpu, epoch=batch.epoch)
        keep = mask if keep is None else keep & mask
    if keep is not None and keep.all():
        keep = None

    targets = target_codes(cols) if with_targets else None
    if keep is None and contiguous:
        keys, order, starts = block_keys(bys, batch, cols)
        if order is None:  # the common case: one group, every handling time known
            acc.add(keys, None, g, handle, None, targets)
        else:
            full, known = _every_row_handle(handle, n, block.follows)
            acc.add(keys, starts, g[order], full[order], known[order], None if targets is None else targets[order])
    else:
        full, known = _every_row_handle(handle, n, block.follows)
        sub = cols
        if keep is not None:
            sub = {name: cols[name][keep] for name in cols
                   if name in ("reason", "addr", "flags") or name.startswith("where_")}
            g, full, known = g[keep], full[keep], known[keep]
            targets = None if targets is None else targets[keep]
        if len(g):
            keys, order, starts = block_keys(bys, batch, sub)
            if order is not None:
                g, full, known = g[order], full[order], known[order]
                targets = None if targets is None else targets[order]
            acc.add(keys, starts, g, full, known, targets)
    if keep is None or keep[-1]:
        wide = bool({"ioport", "mmio"} & set(bys))
        reason, addr, flags = (int(cols["reason"][-1]), int(cols["addr"][-1]) if wide else 0,
                               int(cols["flags"][-1]) if wide else 0)
        last_key[stream] = sum((event_key(b, batch, reason, addr, flags) for b in bys), ())



def _result(reader: TraceReader, acc: _Summary, sort: str, where: EventFilter | None, symbols: dict,
            top_n: int | None) -> dict:
    bys = acc.bys
    results = {key: (g.guest.result(), g.handle.result()) for key, g in acc.groups.items()}
    events = sum(gr["count"] for gr, _ in results.values())
    handle_total = sum(hr["total_ns"] for _, hr in results.values())
    guest_total = sum(gr["total_ns"] for gr, _ in results.values())
    names = vm_names(reader) if "vm" in bys else {}
    groups = []
    for key, (gr, hr) in results.items():
        parts = split_key(bys, key)
        labels = [label(b, k, symbols) for b, k in parts]
        entry = {"key": " / ".join(labels)}
        if len(bys) == 2:
            entry["group"], entry["subgroup"] = labels
        for b, k in parts:
            entry.update(key_fields(b, k, symbols))
        entry.update({"count": gr["count"],
                      "pct": 100 * gr["count"] / events if events else 0.0,
                      "time_pct": 100 * hr["total_ns"] / handle_total if handle_total else 0.0,
                      "guest_pct": 100 * gr["total_ns"] / guest_total if guest_total else 0.0,
                      "guest": gr, "handle": hr})
        targets = acc.groups[key].targets
        if targets or (len(bys) == 1 and bys[0] in ADDRESS_GROUPINGS):
            top = sorted(targets.items(), key=lambda item: (-item[1], item[0]))[:top_n]
            entry["top"] = [{"target": target_text(code), "count": n} for code, n in top]
        if bys == ("vm",) and key[0] in names:
            entry["name"] = names[key[0]]
        groups.append(entry)
    metric = {"count": lambda e: e["count"], "time": lambda e: e["handle"]["total_ns"],
              "max": lambda e: e["handle"]["max_ns"] if e["handle"]["max_ns"] is not None else -(1 << 63)}[sort]
    if len(bys) == 2:  # each outer group (ordered by its total) with its inner groups under it
        outer: dict[str, list] = {}
        for e in groups:
            outer.setdefault(e["group"], []).append(e)
        outer_rank = {label: sum(e["count"] for e in members) if sort == "count" else
                      sum(e["handle"]["total_ns"] for e in members) if sort == "time" else
                      max(metric(e) for e in members) for label, members in outer.items()}
        groups.sort(key=lambda e: (-outer_rank[e["group"]], e["group"], -metric(e), e["key"]))
    else:
        groups.sort(key=lambda e: (-metric(e), e["key"]))
    return {
        "by": ",".join(bys), "sort": sort, "filter": None if where is None else str(where),
        "events": events, "guest_total_ns": guest_total, "handle_total_ns": handle_total,
        "percentiles": list(PERCENTILES), "percentiles_exact": acc.budget.exact,
        "groups": groups,
        "unclaimed": {str(vm): t.unclaimed for vm, t in RunTally.from_trace(reader).vms.items() if any(t.unclaimed.values())},
    }


_TITLES = {"reason": "Exits by reason", "ioport": "I/O exits by port:direction", "mmio": "MMIO exits by address:R/W",
           "vcpu": "Exits by vCPU", "vm": "Exits by VM", "rip": "Exits by guest address",
           "symbol": "Exits by guest symbol", "line": "Exits by guest source line"}


# Which columns go first when the terminal is narrow (c.Col.drop: highest first; 0 stays).
_STAT_DROP = {"mean_ns": (2, 1), "stddev_ns": (9, 9), "min_ns": (8, 8), "p50_ns": (6, 6), "p99_ns": (5, 3),
              "max_ns": (7, 7)}  # (guest, handle)
_HOT_STAT_DROP = {"mean_ns": (5, 4), "stddev_ns": (9, 9), "min_ns": (8, 8), "p50_ns": (2, 2), "p99_ns": (1, 1),
                  "max_ns": (7, 6)}
_STAT_HEADER = {"mean_ns": "mean", "stddev_ns": "±sd", "min_ns": "min", "p50_ns": "p50", "p99_ns": "p99",
                "max_ns": "max"}


def _title(data: dict) -> str:
    bys = data["by"].split(",")
    title = _TITLES[bys[0]] + "".join(f", then by {b}" for b in bys[1:])
    if data["filter"]:
        title += f" ({data['filter']})"
    return title + " — times in µs"


def _keys(data: dict) -> list[str]:
    """Each row's key: under two groupings an outer group's first row names both, the rest of its
    rows (indented) only their inner group."""
    keys, outer = [], None
    for g in data["groups"]:
        key = g["key"] + (f" ({g['name']})" if g.get("name") else "")
        if "group" in g:
            if g["group"] == outer:
                key = "  " + g["subgroup"]
            outer = g["group"]
        keys.append(key)
    return keys


def render(data: dict, console, *, wide: bool = False) -> None:
    from rich.text import Text

    # by where the guest was, or two groupings: p50/p99 and time% stay longest, and each place's
    # top ports/addresses go under its key (`0x3fd:in×413`)
    hot = "," in data["by"] or data["by"] in ADDRESS_GROUPINGS
    drops = _HOT_STAT_DROP if hot else _STAT_DROP
    columns = [c.Col("key", numeric=False), c.Col("count"), c.Col("%"), c.Col("time%", drop=3 if hot else 4)]
    for k, metric in enumerate(("guest", "handle")):
        columns += [c.Col(f"{metric}\n{_STAT_HEADER[stat]}", drop=drop[k]) for stat, drop in drops.items()]
    rows = []
    for key, g in zip(_keys(data), data["groups"]):
        if g.get("top"):
            key += "\n  " + " ".join(f"{x['target']}×{x['count']}" for x in g["top"])
        cells = [key, str(g["count"]), f"{g['pct']:.2f}", f"{g['time_pct']:.2f}"]
        for metric in ("guest", "handle"):
            cells += [c.usec(g[metric][stat]) for stat in drops]
        rows.append(cells)
    t, hidden = c.fitted_table(console, _title(data), columns, rows, wide=wide)
    c.print_fitted(console, t, hidden, wide=wide)
    note = (f"{data['events']} events; guest time {data['guest_total_ns'] / 1e9:.6f} s, "
            f"handling time {data['handle_total_ns'] / 1e9:.6f} s (time% is each group's share of it)")
    if not data["percentiles_exact"]:
        note += "; percentiles approximate (too many outliers to keep: log histogram, <0.4% error)"
    console.print(Text(note))
    for vm, counts in data.get("unclaimed", {}).items():
        console.print(Text(f"vm {vm}: unclaimed accesses (no device there): {unclaimed_text(counts)}"))
    avoided = data.get("coalesced") or {}
    if avoided.get("total"):
        console.print(Text(f"exits avoided: {avoided['total']} coalesced writes (--coalesce; not exits, times "
                           "approximate) — " + ", ".join(f"{k}: {n}" for k, n in avoided["by_target"].items())))
    emulated = data.get("emulated") or {}
    if emulated.get("total"):
        families = ", ".join(f"{k} {n}" for k, n in emulated["by_family"].items())
        console.print(Text(f"emulated by vmsup: {emulated['total']} instructions ({families}) in "
                           f"{emulated['exits']} exits"))


def run(
    trace: str = c.TRACE_ARG,
    by: str = typer.Option("reason", "--by", help="Group by reason, ioport (port:direction), mmio (address:R/W), vcpu, "
                           "vm, or where the guest was: rip (its instruction address), symbol or line; two joined by "
                           "a comma (symbol,reason) group by the first, then the second."),
    sort: str = typer.Option("count", "--sort", help="Order groups by count, time (total handling time) or max (longest handling)."),
    vm: Optional[str] = c.VM_OPT, vcpu: Optional[str] = c.VCPU_OPT, epoch: Optional[str] = c.EPOCH_OPT,
    reason: Optional[str] = c.REASON_OPT, port: Optional[str] = c.PORT_OPT, addr: Optional[str] = c.ADDR_OPT,
    where: Optional[str] = c.FILTER_OPT,
    as_json: bool = typer.Option(False, "--json", help="One JSON document instead of a table."),
    symbols: Optional[str] = SYMBOLS_OPT,
    wide: bool = c.WIDE_OPT,
    steps: bool = typer.Option(False, "--steps", help="Count the step trace's instructions instead "
                               "(--by symbol, line, addr or vcpu; see vmtrace steps)."),
    storms: bool = typer.Option(
        False, "--storms",
        help=f"List polling loops instead: guest addresses that read one port/MMIO address and get one value back "
             f"at least {storm_finder.MIN_COUNT} times, at a rate of at least {storm_finder.MIN_RATE:.0f}/s "
             "(1 / the median interval between its consecutive exits on a vCPU: the rate while it polls, "
             "idle time between bursts left out), with the time spent and the exits an interrupt-driven driver "
             "would save (all of them: the interrupt tells it what the reads keep returning)."),
) -> None:
    """Exits per group with count, %, time% and min/max/mean/stddev/p50/p99 of guest and handling time."""
    if steps:
        from .steps import summary_run
        return summary_run(trace, by, vm, as_json, symbols)
    try:
        bys = parse_by(by)
    except ValueError as e:
        c.bad_input(str(e))
    if sort not in SORTS:
        c.bad_input(f"unknown --sort {sort!r} (choose from {', '.join(SORTS)})")
    event_filter = c.event_filter(vm, vcpu, epoch, reason, port, addr, where)
    with c.reading(trace) as reader:
        c.require_vms(reader, trace, event_filter)
        if storms:
            data = storm_finder.find_storms(reader, where=event_filter, symbols=vm_tables(reader, symbols))
        else:
            tables = vm_tables(reader, symbols) if set(bys) & set(ADDRESS_GROUPINGS) else {}
            data = summarize(reader, by=by, sort=sort, where=event_filter, symbols=tables)
            # Beside the table, never in it: coalesced writes are not exits, and emulated
            # instructions are counted in the exits that led to them. A trace with neither keeps
            # the shape summary --json always had.
            avoided = exits_avoided(reader, event_filter)
            if avoided["total"]:
                data["coalesced"] = avoided
            emulated = emulated_counts(reader, event_filter)
            if emulated["total"]:
                data["emulated"] = emulated
    if as_json:
        c.dump_json(data)
    else:
        (render_storms if storms else render)(data, c.console(), wide=wide)
