"""`vmtrace kvm-stats`: the kernel's own KVM counters (KVM_GET_STATS_FD) as a time series.

The worker samples each VM's and vCPU's counters every `stats_interval` seconds into the trace
(vmworker/kernel_counters.py). This shows, per VM and vCPU (vcpu -1: the VM's own counters), the
change of each counter per interval, beside the exits of that vCPU the trace recorded in the same
interval (`recorded`): the kernel's `exits` minus those is what it handled itself (kvm_stat's view).
Counters that never moved are left out. Names are the kernel's.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import typer

from .. import kvm_counters
from ..analysis import vm_names
from ..trace import TraceReader
from . import _common as c


def _recorded_per_interval(reader: TraceReader, stream: kvm_counters.Stream) -> tuple[list[int], int]:
    """Exits of the stream's vCPU recorded in each interval between its samples, and in all."""
    edges = np.asarray(stream.times, np.int64)
    counts = np.zeros(max(len(edges) - 1, 0), np.int64)
    total = 0
    for batch in reader.exit_batches(vm=stream.vm, vcpu=stream.vcpu, epoch=stream.epoch):
        t = batch.columns["t_exit"]
        total += len(t)
        if len(edges) > 1:
            at = np.searchsorted(edges, t, side="left") - 1  # interval i covers (edges[i], edges[i + 1]]
            inside = (at >= 0) & (at < len(counts))
            counts += np.bincount(at[inside], minlength=len(counts))[:len(counts)]
    return counts.tolist(), total


def kvm_stats(reader: TraceReader, vm: int | None = None) -> dict:
    """Every counter stream of the trace, as JSON-ready data."""
    streams = kvm_counters.from_trace(reader, vm)
    names = vm_names(reader)
    starts = [s.times[0] for s in streams.by_key.values() if s.times]
    span = reader.time_range
    t0 = min(starts + ([span[0]] if span else []), default=0)
    out = []
    for (v, epoch, vcpu), stream in sorted(streams.by_key.items()):
        recorded, total = ([], 0) if vcpu == kvm_counters.VM_STREAM else _recorded_per_interval(reader, stream)
        intervals = []
        for i, iv in enumerate(stream.intervals()):
            entry = {"t_s": (iv["t_ns"] - t0) / 1e9, "dt_s": iv["dt_ns"] / 1e9, "deltas": iv["deltas"]}
            if vcpu != kvm_counters.VM_STREAM:
                entry["recorded"] = recorded[i]
            intervals.append(entry)
        out.append({"vm": v, "epoch": epoch, "vcpu": vcpu, "name": names.get(v), "samples": len(stream.times),
                    "ended": stream.ended, "final": stream.current,
                    "recorded_exits": None if vcpu == kvm_counters.VM_STREAM else total, "intervals": intervals})
    return {"t0_ns": t0, "streams": out}


def render(data: dict, console, wanted: list[str] | None) -> None:
    from rich.table import Table
    from rich.text import Text

    if not data["streams"]:
        console.print(Text("no kvm-stats records in this trace (recorded with --stats-interval 0, or by an "
                           "older vmsup)"))
        return
    for s in data["streams"]:
        totals: dict[str, int] = {}
        for iv in s["intervals"]:
            for k, d in iv["deltas"].items():
                totals[k] = totals.get(k, 0) + d
        moved = [k for k in kvm_counters.order(totals, totals) if totals[k]]
        names = [k for k in wanted if k in s["final"]] if wanted else moved
        recorded = s["vcpu"] != kvm_counters.VM_STREAM
        fixed = ["t s"] + (["recorded"] if recorded else [])
        shown, width = [], sum(len(f) + 3 for f in fixed) + 8
        for name in names:
            cell = max(len(name), len(str(totals.get(name, 0)))) + 3
            if width + cell > console.width and not wanted:
                break
            shown.append(name)
            width += cell
        who = "VM" if not recorded else f"vcpu {s['vcpu']}"
        title = f"vm {s['vm']} {s['name'] or ''} epoch {s['epoch']}, {who}: change per interval"
        console.print(Text(title, style="bold"))
        t = Table(show_edge=False)
        for col in fixed + shown:
            t.add_column(col, justify="right", no_wrap=True)
        for iv in s["intervals"]:
            row = [f"{iv['t_s']:.2f}"] + ([str(iv["recorded"])] if recorded else [])
            t.add_row(*row, *(str(iv["deltas"].get(n, 0)) for n in shown))
        t.add_section()
        t.add_row("total", *([str(s["recorded_exits"])] if recorded else []), *(str(totals.get(n, 0)) for n in shown))
        console.print(t)
        left = [n for n in names if n not in shown]
        if left:
            console.print(Text(f"  {len(left)} more counters moved ({', '.join(left[:6])}{', …' if len(left) > 6 else ''}):"
                               " --counter NAME or --json", style="dim"))


def run(
    trace: str = c.TRACE_ARG,
    vm: Optional[int] = typer.Option(None, "--vm", min=0, help="Only this VM."),
    counter: Optional[list[str]] = typer.Option(None, "--counter", help="Show this counter (repeatable; "
                                                "default: those that moved, as many as fit)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document instead of tables."),
) -> None:
    """The kernel's KVM counters per VM and vCPU over time, beside the exits the trace recorded."""
    with c.reading(trace) as reader:
        c.require_vms(reader, trace, None if vm is None else c.event_filter(vm=str(vm)))
        data = kvm_stats(reader, vm)
    if as_json:
        c.dump_json(data)
    else:
        render(data, c.console(pipe_width=100), counter)
