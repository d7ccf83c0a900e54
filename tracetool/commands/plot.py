"""`vmtrace plot`: two pictures of a trace — exit rate over time per VM, and a histogram of
handling time (log-spaced bins: the tail is where the interesting time goes); with `--by symbol`
a horizontal bar chart of exits per guest symbol, each bar split by reason and port/address
(symbol → reason → port; the counts are summary --by symbol's).

The numbers come from numpy over one decoded block at a time (bin counts only); drawing uses
matplotlib (optional extra `vmsup[plot]`) with its Agg canvas, no display or pyplot state. PNG
is Agg's raster; HTML is a small self-contained page with the figure inline as SVG.
"""

from __future__ import annotations

import html
import io
import os
import warnings

from typing import Optional

import numpy as np
import typer

from .._output import OutputError, output_path
from ..analysis import vm_names
from ..filters import EventFilter
from ..handling import Stitcher
from ..trace import TraceReader
from . import _common as common
from ._symbols import SYMBOLS_OPT, vm_tables

FORMATS = {".png": "png", ".html": "html", ".htm": "html"}
RATE_BINS = 200
MAX_SYMBOLS = 25  # bars of --by symbol (the symbols with most exits)
MAX_TARGETS = 12  # ports/addresses with a colour of their own; the rest are "other"
# handling time histogram: 20 bins per decade from 100 ns to 10 s
_HANDLE_EDGES = np.logspace(2, 10, 8 * 20 + 1)


class PlotError(Exception):
    """A plot that cannot be made (no matplotlib, an unknown output type, an unwritable file)."""


def plot_data(reader: TraceReader, where: EventFilter | None = None, bins: int = RATE_BINS) -> dict:
    """Exit rate per VM over time and the handling-time histogram, as arrays."""
    span = reader.time_range
    t0, t1 = (span if span is not None else (0, 0))
    width = max(t1 - t0, 1)
    bins = max(1, min(bins, width))  # no bin shorter than 1 ns
    rate: dict[int, np.ndarray] = {}
    handle_counts = np.zeros(len(_HANDLE_EDGES) + 1, np.int64)  # [under, bins…, over]
    handles = Stitcher()
    last_kept: dict[tuple[int, int, int], bool] = {}  # stream → whether its last event is selected
    with np.errstate(all="ignore"):
        for batch in reader.exit_batches(where=where, columns=("t_exit", "guest_ns", "reason", "addr")):
            cols = batch.columns
            if not batch.n_rows:
                continue
            t = cols["t_exit"]
            keep = np.ones(batch.n_rows, bool) if where is None else where.mask(cols, vm=batch.vm, vcpu=batch.vcpu,
                                                                                 epoch=batch.epoch)
            stream = (batch.vm, batch.vcpu, batch.epoch)
            block = handles.block(batch)
            known = keep[:-1] if block.follows is None else keep[:-1] & block.follows
            parts = [block.inner[known]]
            if last_kept.pop(stream, False) and block.previous is not None:
                parts.append(np.array([block.previous], np.int64))
            for part in parts:
                handle_counts += np.bincount(np.searchsorted(_HANDLE_EDGES, part, "right"),
                                             minlength=len(handle_counts))[:len(handle_counts)]
            last_kept[stream] = bool(keep[-1])
            tk = t[keep]
            if len(tk):
                idx = np.clip(((tk - t0).astype(np.float64) * bins / width).astype(np.int64), 0, bins - 1)
                acc = rate.setdefault(batch.vm, np.zeros(bins, np.int64))
                acc += np.bincount(idx, minlength=bins)[:bins]
    for stream, handle in handles.unclaimed().items():  # kept by a record-time filter
        if last_kept.get(stream):
            handle_counts += np.bincount(np.searchsorted(_HANDLE_EDGES, [handle], "right"),
                                         minlength=len(handle_counts))[:len(handle_counts)]
    bin_s = width / bins / 1e9
    names = vm_names(reader)
    return {"t0_ns": t0, "span_ns": t1 - t0, "bins": bins, "bin_s": bin_s,
            "rate": {vm: counts / bin_s for vm, counts in sorted(rate.items())},
            "names": names, "handle_edges_ns": _HANDLE_EDGES, "handle_counts": handle_counts,
            "events": int(sum(c.sum() for c in rate.values()))}


NO_HANDLING_NOTE = ("no handling time known: no selected exit has its next exit in the trace\n"
                    "(a trace filtered at record time by a vmsup before event schema 3 keeps none)")


def output_kind(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise PlotError(f"{path}: unknown picture type {ext or '(none)'!r}; use .png or .html")
    return FORMATS[ext]


def _figure(data: dict, title: str):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("plot needs matplotlib: pip install 'vmsup[plot]'") from None
    fig = Figure(figsize=(10, 7.5), layout="constrained")
    top, bottom = fig.subplots(2, 1)
    x = (np.arange(data["bins"]) + 0.5) * data["bin_s"]
    for vm, rate in data["rate"].items():
        name = data["names"].get(vm)
        top.plot(x, rate, label=f"vm {vm}" + (f" {name}" if name else ""), linewidth=1.2)
    top.set_title("Exit rate over time")
    top.set_xlabel("time since the first exit (s)")
    top.set_ylabel("exits/s")
    top.grid(True, alpha=0.3)
    if data["rate"]:
        top.legend(loc="best", fontsize="small")
    else:
        top.text(0.5, 0.5, "no events", ha="center", va="center", transform=top.transAxes)
    edges = data["handle_edges_ns"] / 1000  # µs
    counts = data["handle_counts"]
    inner = counts[1:-1]
    bottom.bar(edges[:-1], inner, width=np.diff(edges), align="edge", color="tab:orange", edgecolor="none",
               log=True)  # a log count axis: the rare slow exits stay visible
    bottom.set_xscale("log")
    bottom.set_title("Handling time (exit → next KVM_RUN entry)")
    bottom.set_xlabel("handling time (µs, log scale)")
    bottom.set_ylabel("exits (log scale)")
    bottom.grid(True, alpha=0.3)
    notes = []
    if counts[0]:
        notes.append(f"{counts[0]} under {edges[0]:g} µs")
    if counts[-1]:
        notes.append(f"{counts[-1]} over {edges[-1]:g} µs")
    if not counts.sum():  # say why the histogram is empty rather than draw nothing
        bottom.text(0.5, 0.5, NO_HANDLING_NOTE, ha="center", va="center", transform=bottom.transAxes)
    if notes:
        bottom.text(0.99, 0.95, "; ".join(notes), ha="right", va="top", transform=bottom.transAxes, fontsize="small")
    nz = np.flatnonzero(inner)
    if len(nz):
        bottom.set_xlim(edges[max(nz[0] - 1, 0)], edges[min(nz[-1] + 2, len(edges) - 1)])
    fig.suptitle(title)
    return fig


def symbol_data(reader: TraceReader, where: EventFilter | None = None, symbols: dict | None = None) -> dict:
    """Exits per guest symbol, each split by target (port/address and direction, else reason)."""
    from .summary import summarize
    data = summarize(reader, by="symbol", where=where, symbols=symbols, top=None)
    return {"by": "symbol", "events": data["events"],
            "bars": [{"symbol": g["key"], "count": g["count"],
                      "targets": {t["target"]: t["count"] for t in g["top"]}} for g in data["groups"]]}


def _symbol_figure(data: dict, title: str):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("plot needs matplotlib: pip install 'vmsup[plot]'") from None
    bars = data["bars"][:MAX_SYMBOLS]
    fig = Figure(figsize=(10, 1.8 + 0.4 * max(len(bars), 1)), layout="constrained")
    ax = fig.subplots()
    totals: dict[str, int] = {}
    for bar in bars:
        for target, n in bar["targets"].items():
            totals[target] = totals.get(target, 0) + n
    coloured = sorted(totals, key=lambda t: (-totals[t], t))[:MAX_TARGETS]
    # targets sorted by reason first (0x…:in/out are io, :R/:W mmio, else the reason's name) so a
    # bar reads symbol → reason → port
    kind = {t: ("io" if t.endswith((":in", ":out")) else "mmio" if t.endswith((":R", ":W")) else t) for t in coloured}
    coloured.sort(key=lambda t: (kind[t], -totals[t]))
    y = np.arange(len(bars))
    left = np.zeros(len(bars))
    for target in [*coloured, "other"]:
        if target == "other":
            widths = np.array([sum(n for t, n in b["targets"].items() if t not in coloured) for b in bars], float)
        else:
            widths = np.array([b["targets"].get(target, 0) for b in bars], float)
        if widths.any():
            ax.barh(y, widths, left=left, label=target if target == "other" or target == kind[target]
                    else f"{kind[target]} {target}")
            left += widths
    ax.set_yticks(y, [b["symbol"] for b in bars])
    ax.invert_yaxis()  # most exits on top
    ax.set_xlabel("exits")
    ax.set_title("Exits per guest symbol, by reason and port/address")
    ax.grid(True, axis="x", alpha=0.3)
    if bars:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")  # beside the bars, never over them
    else:
        ax.text(0.5, 0.5, "no events", ha="center", va="center", transform=ax.transAxes)
    if len(data["bars"]) > MAX_SYMBOLS:
        ax.text(0.99, 0.01, f"{len(data['bars']) - MAX_SYMBOLS} more symbols not shown", ha="right", va="bottom",
                transform=ax.transAxes, fontsize="small")
    fig.suptitle(title)
    return fig


def render(data: dict, out_path: str, title: str, inputs=()) -> int:
    """Draw the figure into out_path (.png or .html); returns the bytes written."""
    kind = output_kind(out_path)
    buf = io.BytesIO()
    with warnings.catch_warnings():  # e.g. "no positive values" for an empty log axis: not the user's concern
        warnings.simplefilter("ignore")
        return _render(data, out_path, title, kind, buf, inputs)


def _render(data: dict, out_path: str, title: str, kind: str, buf: io.BytesIO, inputs) -> int:
    fig = (_symbol_figure if data.get("by") == "symbol" else _figure)(data, title)
    if kind == "png":
        fig.savefig(buf, format="png", dpi=100)
        payload = buf.getvalue()
    else:
        fig.savefig(buf, format="svg")
        svg = buf.getvalue().decode("utf-8")
        svg = svg[svg.index("<svg"):]  # drop the XML prolog and doctype: inline SVG in HTML5
        payload = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                   f"<title>{html.escape(title)}</title></head>\n<body>\n{svg}\n</body></html>\n").encode()
    try:
        with output_path(out_path, inputs) as path, open(path, "wb") as f:
            f.write(payload)
    except OutputError as e:
        raise PlotError(str(e)) from None
    return len(payload)


def run(
    trace: str = common.TRACE_ARG,
    out: str = typer.Option(..., "--output", "-o", help="FILE.png or FILE.html (self-contained, inline SVG)."),
    vm: Optional[str] = common.VM_OPT, vcpu: Optional[str] = common.VCPU_OPT, epoch: Optional[str] = common.EPOCH_OPT,
    reason: Optional[str] = common.REASON_OPT, port: Optional[str] = common.PORT_OPT,
    addr: Optional[str] = common.ADDR_OPT, where: Optional[str] = common.FILTER_OPT,
    by: Optional[str] = typer.Option(None, "--by", help="symbol: instead, a bar chart of exits per guest symbol, "
                                     "each bar split by reason and port/address."),
    symbols: Optional[str] = SYMBOLS_OPT,
) -> None:
    """Exit rate over time per VM and a histogram of handling time, as a picture."""
    if by not in (None, "symbol"):
        common.bad_input(f"unknown --by {by!r} (the one choice: symbol)")
    try:
        output_kind(out)
    except PlotError as e:
        common.bad_input(str(e))
    common.refuse_overwriting(out, trace)
    event_filter = common.event_filter(vm, vcpu, epoch, reason, port, addr, where)
    with common.reading(trace) as reader:
        common.require_vms(reader, trace, event_filter)
        if by == "symbol":
            data = symbol_data(reader, event_filter, vm_tables(reader, symbols))
        else:
            data = plot_data(reader, event_filter)
    if by == "symbol":
        title = f"{os.path.basename(trace)}: {data['events']} exits"
    else:
        title = f"{os.path.basename(trace)}: {data['events']} exits over {data['span_ns'] / 1e9:.3f} s"
    try:
        size = render(data, out, title, inputs=(trace,))
    except PlotError as e:
        common.bad_input(str(e))
    typer.echo(f"vmtrace: wrote {out} ({size} bytes)", err=True)
    if by is None and not data["handle_counts"].sum():
        typer.echo("vmtrace: note: the handling-time histogram is empty: " + NO_HANDLING_NOTE.split(": ", 1)[1]
                   .replace("\n", " "), err=True)
