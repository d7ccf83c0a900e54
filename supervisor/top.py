"""`vmsup top`: exits per VM and exit reason, kvm_stat style — totals, shares and current rates.

`TopModel` counts (one numpy bincount per batch) and takes snapshots (plain data, also what
`--json` prints); `render_table` turns a snapshot into a rich Table. The interactive loop lives
in `live_cli`; it only feeds, ticks and renders.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from tracetool import schema

from .kernel_view import SHOWN as KERNEL_SHOWN
from .kernel_view import KernelView
from .live import LiveSubscriber
from .top_symbols import SymbolCounts

SORT_KEYS = ("rate", "total")
GROUPINGS = ("reason", "symbol")  # --by
_REASON_SLOTS = 256  # the reason column is a u1: every code has a slot


@dataclass
class _VmCounts:
    vm: int
    name: str = ""
    epoch: int = 0
    status: str | None = None  # set from vm-end
    state: str | None = None  # what the supervisor says (vmsup ps): paused, exited, … (know_vms)
    seen: bool = False  # a message of it came while we listened
    totals: np.ndarray = field(default_factory=lambda: np.zeros(_REASON_SLOTS, dtype=np.int64))
    previous: np.ndarray = field(default_factory=lambda: np.zeros(_REASON_SLOTS, dtype=np.int64))
    rates: np.ndarray = field(default_factory=lambda: np.zeros(_REASON_SLOTS, dtype=np.float64))
    kernel: KernelView = field(default_factory=KernelView)  # the kernel's own counters (kvm-stats)
    symbols: SymbolCounts = field(default_factory=SymbolCounts)  # --by symbol


class TopModel:
    """Per-VM, per-reason exit counts since we attached, and rates over the last tick."""

    def __init__(self, event_filter=None, clock: Callable[[], float] = time.monotonic, by: str = "reason") -> None:
        self.by = by
        # The filter flags (tracetool/filters.py), as tail and vmtrace take them: count only those exits.
        self.event_filter = None if event_filter is None or event_filter.matches_everything else event_filter
        self.clock = clock
        self.vms: dict[int, _VmCounts] = {}
        self.tick_at = clock()
        self.interval = 0.0  # length of the last tick, seconds

    def _vm(self, vm: int) -> _VmCounts:
        counts = self.vms.get(vm)
        if counts is None:
            counts = self.vms[vm] = _VmCounts(vm)
        return counts

    def feed(self, msg: dict) -> None:
        kind = msg.get("type")
        if kind in (schema.MSG_EXITS, schema.MSG_VM_START, schema.MSG_VM_END):
            self._vm(msg["vm"]).seen = True
        if kind == schema.MSG_EXITS:
            counts = self._vm(msg["vm"])
            if msg["epoch"] > counts.epoch:  # a restarted VM: same row, new epoch, not ended
                counts.epoch, counts.status = msg["epoch"], None
                counts.kernel = KernelView()
            if msg["epoch"] == counts.epoch:
                counts.kernel.exits(msg["vcpu"], msg["columns"]["seq"], msg["columns"]["t_exit"],
                                    msg["first_seq"] + msg["count"])
            if msg["rows"]:
                reasons = msg["columns"]["reason"]
                keep = None if self.event_filter is None else self.event_filter.mask(
                    msg["columns"], vm=msg["vm"], vcpu=msg["vcpu"], epoch=msg["epoch"])
                if keep is not None:
                    reasons = reasons[keep]
                counts.totals += np.bincount(reasons, minlength=_REASON_SLOTS)
                if self.by == "symbol" and "rip" in msg["columns"]:
                    rip = msg["columns"]["rip"]
                    counts.symbols.add(rip if keep is None else rip[keep])
        elif kind == schema.MSG_VM_START:
            counts = self._vm(msg["vm"])
            if msg["epoch"] >= counts.epoch:
                counts.epoch, counts.status = msg["epoch"], None
                if isinstance(msg.get("name"), str):
                    counts.name = msg["name"]
                if self.by == "symbol":
                    counts.symbols.start(msg)
        elif kind == schema.MSG_KVM_STATS:
            counts = self._vm(msg["vm"])
            if msg["epoch"] > counts.epoch:
                counts.epoch, counts.status = msg["epoch"], None
                counts.kernel = KernelView()
            if msg["epoch"] == counts.epoch and msg["vcpu"] >= 0:
                counts.kernel.sample(msg["vcpu"], msg["t"], msg["values"])
        elif kind == schema.MSG_VM_END:
            counts = self._vm(msg["vm"])
            if msg["epoch"] >= counts.epoch:
                counts.epoch = msg["epoch"]
                counts.status = str(msg.get("status", "ended"))
                if isinstance(msg.get("name"), str) and not counts.name:
                    counts.name = msg["name"]
                if msg["epoch"] == counts.epoch and msg.get("final_seq"):
                    counts.kernel.ended(msg["final_seq"])

    def know_vms(self, rows: list[dict]) -> None:
        """Every VM of the run, also those that sent nothing while we listened (ended before we
        attached, paused): rows of {"vm", "name", "state"} as `vmsup ps` gives them."""
        for row in rows:
            vm = row.get("vm")
            if not isinstance(vm, int):
                continue
            counts = self._vm(vm)
            if isinstance(row.get("name"), str) and not counts.name:
                counts.name = row["name"]
            if isinstance(row.get("state"), str):
                counts.state = row["state"]

    def tick(self) -> None:
        """Close a rate interval: rate = exits since the last tick / its length."""
        now = self.clock()
        dt = now - self.tick_at
        if dt <= 0:
            return
        for counts in self.vms.values():
            counts.rates = (counts.totals - counts.previous) / dt
            counts.previous = counts.totals.copy()
            counts.symbols.tick(dt)
        self.tick_at, self.interval = now, dt

    def snapshot(self, *, sort: str = "rate", vm: int | None = None, subscriber: LiveSubscriber | None = None,
                 run_id: str | None = None) -> dict:
        """Plain data: what the table shows and `--json` prints."""
        missed_by_vm: dict[int, int] = {}
        if subscriber is not None:
            for (v, _vcpu, _epoch), n in subscriber.missed_by_stream().items():
                missed_by_vm[v] = missed_by_vm.get(v, 0) + n
        vms = []
        for v in sorted(self.vms):
            if vm is not None and v != vm:
                continue
            c = self.vms[v]
            name = c.name or (subscriber.vm_names[v] if subscriber is not None and v < len(subscriber.vm_names) else "")
            total = int(c.totals.sum())
            reasons = []
            for code in np.flatnonzero(c.totals).tolist():
                n = int(c.totals[code])
                reasons.append({"reason": schema.reason_name(code), "code": code, "total": n,
                                "percent": round(100.0 * n / total, 2), "rate": round(float(c.rates[code]), 1)})
            key = (lambda r: (-r["rate"], -r["total"], r["code"])) if sort == "rate" else \
                (lambda r: (-r["total"], -r["rate"], r["code"]))
            reasons.sort(key=key)
            vms.append({"vm": v, "name": name, "epoch": c.epoch, "status": c.status or c.state or ("running" if c.seen else "not seen"),
                        "total": total, "rate": round(float(c.rates.sum()), 1),
                        "missed": missed_by_vm.get(v, 0), "reasons": reasons, "kernel": c.kernel.snapshot()})
            if self.by == "symbol":
                vms[-1]["symbols"] = c.symbols.rows(sort)
        snap = {"run": run_id, "interval": round(self.interval, 3), "sort": sort, "by": self.by, "vm": vm, "vms": vms}
        if subscriber is not None:
            snap["missed_total"] = subscriber.missed_total
            snap["malformed"] = subscriber.malformed
        return snap


def _or_dash(value):
    return "-" if value is None else value


def _num(value, fmt: str) -> str:
    return value if isinstance(value, str) else format(value, fmt)


def render_table(snap: dict, *, keys_help: bool = False):
    """A rich Table of a snapshot: one header row per VM, then its exit reasons."""
    from rich.table import Table
    from rich.text import Text

    title = f"vmsup top — run {snap['run']}" if snap.get("run") else "vmsup top"
    if snap.get("vm") is not None:
        title += f" — vm {snap['vm']}"
    table = Table(title=title, title_justify="left", expand=False)
    table.add_column("VM / guest symbol" if snap.get("by") == "symbol" else "VM / exit reason", no_wrap=True)
    table.add_column("Total" + (" ▼" if snap["sort"] == "total" else ""), justify="right")
    table.add_column("%", justify="right")
    table.add_column("Rate/s" + (" ▼" if snap["sort"] == "rate" else ""), justify="right")
    table.add_column("Missed", justify="right")
    for i, vm in enumerate(snap["vms"]):
        kernel = [(f"  kernel: {'in-kernel exits' if name == 'in_kernel' else name}", vm["kernel"][name])
                  for name in ("exits", "in_kernel", *KERNEL_SHOWN[1:])] if vm.get("kernel") else []
        kernel = [(label, {"total": _or_dash(k["total"]), "rate": _or_dash(k["rate"])}) for label, k in kernel]
        rows = [(f"  {r['symbol'] if 'symbol' in r else r['reason']}", r, f"{r['percent']:.1f}", None)
                for r in vm.get("symbols", vm["reasons"])]
        rows += [(label, k, "", "dim") for label, k in kernel]
        label = f"vm {vm['vm']}" + (f" {vm['name']}" if vm["name"] else "") + f" [{vm['status']}]"
        table.add_row(Text(label, style="bold"), f"{vm['total']:,}", "100.0" if vm["total"] else "-",
                      f"{vm['rate']:,.0f}", f"{vm['missed']:,}" if vm["missed"] else "",
                      end_section=not rows and i < len(snap["vms"]) - 1)
        for j, (label, r, pct, style) in enumerate(rows):
            table.add_row(Text(label, style=style or ""), _num(r["total"], ","), pct, _num(r["rate"], ",.0f"), "",
                          end_section=j == len(rows) - 1 and i < len(snap["vms"]) - 1, style=style)
    if not snap["vms"]:
        table.add_row(Text("(no exits seen yet)", style="dim"), "", "", "", "")
    notes = [f"sorted by {snap['sort']}"]
    if snap.get("interval"):
        notes.append(f"rates over {snap['interval']:.1f} s")
    if snap.get("missed_total"):
        notes.append(f"missed {snap['missed_total']:,} events (the live stream is best effort)")
    if snap.get("malformed"):
        notes.append(f"ignored {snap['malformed']} malformed messages")
    if any(vm.get("kernel") for vm in snap["vms"]):
        notes.append("kernel: KVM's own counters (in kernel = exits vmsup never saw)")
    if keys_help:
        notes.append("keys: q quit, s sort, v vm")
    table.caption = " · ".join(notes)
    table.caption_justify = "left"
    return table
