"""`vmtrace`: offline analysis of vmsup exit traces.

The commands get data from tracetool.analysis and only render it: rich tables for people,
`--json` for scripts. Bad input (a missing, truncated, corrupt or foreign file, a bad filter)
ends in one `vmtrace: error: …` line and exit code 2; a torn tail (a recorder killed while
writing) is a warning, and the readable part is shown.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Optional

import typer
from typer.exceptions import TyperException

from . import analysis, schema
from .filters import EventFilter, FilterError, parse_filter
from .trace import TraceError, TraceReader

EXIT_BAD_INPUT = 2  # as vmsup: bad input, an unreadable trace (typer uses 2 for usage errors too)
EXIT_INTERRUPTED = 130
EXIT_PROBLEMS = 1  # verify found problems; diff found differences (as diff(1))

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="Analyse vmsup exit traces.")


def _err(message: str) -> None:
    typer.echo(f"vmtrace: error: {message}", err=True)


def _warn(message: str) -> None:
    typer.echo(f"vmtrace: warning: {message}", err=True)


def _warn_reader(reader_path: str, torn_tail, warnings: list[str]) -> None:
    if torn_tail is not None:
        offset, reason = torn_tail
        _warn(f"{reader_path}: torn tail at offset {offset} ({reason}); using the blocks before it")
    for w in warnings:
        _warn(f"{reader_path}: {w}")


@app.command()
def version() -> None:
    """Print the vmsup version."""
    from importlib.metadata import version as dist_version
    typer.echo(dist_version("vmsup"))


def _or_exit(analyse, *args):
    """Run one analysis over trace files; a bad file becomes one error line and exit 2."""
    try:
        return analyse(*args)
    except TraceError as e:
        _err(str(e))
        raise typer.Exit(EXIT_BAD_INPUT) from None


# --- info -----------------------------------------------------------------------------------------
@app.command()
def info(
    trace: str = typer.Argument(..., help="A trace file written by the vmsup recorder."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document instead of tables."),
) -> None:
    """Runs, VMs, streams, events per VM and reason, gaps, time span and size of a trace."""
    data = _or_exit(analysis.trace_info, trace)
    torn = data["file"]["torn_tail"]
    _warn_reader(trace, None if torn is None else (torn["offset"], torn["reason"]), data["file"]["warnings"])
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, default=_json_default) + "\n")
    else:
        _render_info(data)


def _json_default(value):
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)


def _when(ns) -> str:
    if not isinstance(ns, int):
        return "?"
    return datetime.fromtimestamp(ns / 1e9, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _text(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=_json_default, separators=(",", ":"))
    return str(value)


def _render_info(data: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # Piped into a file or grep, cells wrapped at 80 columns would split words; use wide lines.
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)

    def table(title: str, *columns: str) -> Table:
        t = Table(title=title, title_justify="left", title_style="bold")
        for c in columns:
            t.add_column(c, overflow="fold")
        return t

    def row(t: Table, *cells) -> None:
        t.add_row(*(Text(_text(c)) for c in cells))  # Text: file contents are never markup

    f = data["file"]
    console.print(Text(f"{f['path']}: {f['size']} bytes, trace format {f['format_version']}, "
                       f"event schema {f['schema_version']}, created {_when(f['created_ns'])}"))
    if f["torn_tail"] is not None:
        state = f"torn tail at offset {f['torn_tail']['offset']} ({f['torn_tail']['reason']})"
    elif f["closed_cleanly"]:
        state = "closed cleanly"
    else:
        state = "not closed (no index footer: the recorder did not finish)"
    console.print(Text(f"state: {state}"))

    if data["run"]:
        t = table("Run", "key", "value")
        for k, v in data["run"].items():
            row(t, k, v)
        console.print(t)

    t = table("VMs", "vm", "epoch", "name", "status", "exits", "in trace", "vcpus", "guest sha256", "spec")
    for vm in data["vms"]:
        sha = vm.get("sha256")
        status = vm.get("status") or "(no vm-end)"
        if vm.get("detail"):
            status += f" ({vm['detail']})"
        row(t, vm["vm"], vm["epoch"], vm.get("name"), status, vm.get("exits"), vm.get("events_in_trace"),
            vm.get("vcpus"), sha[:16] if isinstance(sha, str) else sha, vm.get("spec"))
    console.print(t)

    t = table("Streams", "vm", "vcpu", "epoch", "events", "covered", "first seq", "last seq", "blocks")
    for s in data["streams"]:
        row(t, s["vm"], s["vcpu"], s["epoch"], s["events"], s["covered"], s["first_seq"], s["last_seq"], s["blocks"])
    console.print(t)

    t = table("Events", "vm", "reason", "events", "share")
    for entry in data["events"]["by_vm"]:
        for reason, n in sorted(entry["by_reason"].items(), key=lambda kv: -kv[1]):
            row(t, entry["vm"], reason, n, f"{100 * n / entry['total']:.1f}%" if entry["total"] else "-")
    console.print(t)

    gaps = data["gaps"]
    if gaps["recorded"]:
        t = table("Gaps (recorded)", "vm", "vcpu", "epoch", "first missing", "count", "cause")
        for g in gaps["recorded"]:
            row(t, g.get("vm"), g.get("vcpu"), g.get("epoch"), g.get("first_missing"), g.get("count"), g.get("cause"))
        console.print(t)
    if gaps["unexplained"]:
        t = table("Gaps (unexplained)", "vm", "vcpu", "epoch", "first seq", "count", "kind", "offset")
        for g in gaps["unexplained"]:
            row(t, g["vm"], g["vcpu"], g["epoch"], g["first_seq"], g["count"], g["kind"], g["offset"])
        console.print(t)

    total = data["events"]["total"]
    span = data["time"]["span_s"] if data["time"] else 0.0
    per_event = data["bytes_per_event"]
    console.print(Text(
        f"{total} events in {span:.6f} s; gaps: {len(gaps['recorded'])} recorded, "
        f"{len(gaps['unexplained'])} unexplained; "
        + (f"{per_event:.3f} bytes/event" if per_event is not None else "no events")))


# --- show -----------------------------------------------------------------------------------------
@app.command()
def show(
    trace: str = typer.Argument(..., help="A trace file written by the vmsup recorder."),
    vm: Optional[str] = typer.Option(None, "--vm", help="VM id(s): 0 or 0|2."),
    vcpu: Optional[str] = typer.Option(None, "--vcpu", help="vCPU id(s)."),
    epoch: Optional[str] = typer.Option(None, "--epoch", help="Epoch(s) (a VM's restarts)."),
    reason: Optional[str] = typer.Option(None, "--reason", help="Exit reason(s) by name or number: io|mmio."),
    port: Optional[str] = typer.Option(None, "--port", help="I/O port(s), decimal or 0x-hex (implies io)."),
    addr: Optional[str] = typer.Option(None, "--addr", help="MMIO address(es) (implies mmio)."),
    where: Optional[str] = typer.Option(None, "--filter", "-f", help="A filter expression: vm=0,reason=io|mmio,port=0x10."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per event, one per line."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", min=0, help="Show at most N events."),
    t_from: Optional[str] = typer.Option(None, "--from", help="Only events at or after this time since the trace's "
                                         "first event: seconds, or with a unit (250ms, 40us, 1500ns)."),
    t_to: Optional[str] = typer.Option(None, "--to", help="Only events at or before this time (as --from)."),
) -> None:
    """Events of every stream in time order, one line each."""
    try:
        event_filter = EventFilter.from_options(vm=vm, vcpu=vcpu, epoch=epoch, reason=reason, port=port, addr=addr)
        event_filter &= parse_filter(where)
    except FilterError as e:
        _err(str(e))
        raise typer.Exit(EXIT_BAD_INPUT)
    span = _time_window(t_from, t_to)
    try:
        with TraceReader(trace) as reader:
            _warn_reader(trace, reader.torn_tail, reader.warnings)
            t0 = analysis.trace_start(reader)
            render = _json_lines if as_json else _text_lines
            out = sys.stdout
            for chunk in analysis.events_in_time_order(reader, None if event_filter.matches_everything else event_filter,
                                                       limit, *_absolute(span, t0)):
                out.write("".join(render(chunk, t0)))
            out.flush()
    except TraceError as e:
        sys.stdout.flush()
        _err(str(e))
        raise typer.Exit(EXIT_BAD_INPUT)


_TIME_UNITS = (("ns", 1), ("us", 1_000), ("µs", 1_000), ("ms", 1_000_000), ("s", 1_000_000_000))


def _parse_time(text: str, flag: str) -> int:
    """`1.5`, `1.5s`, `250ms`, `40us`, `1500ns` (a leading + is allowed) → ns."""
    s = text.strip().lower().lstrip("+")
    scale = 1_000_000_000
    for unit, factor in _TIME_UNITS:
        if s.endswith(unit) and not (unit == "s" and s[-2:-1] in ("n", "u", "µ", "m")):
            s, scale = s[:-len(unit)].strip(), factor
            break
    try:
        from decimal import Decimal, InvalidOperation
        value = Decimal(s)
        if not value.is_finite() or value < 0:
            raise InvalidOperation
    except (InvalidOperation, ValueError):
        _err(f"bad {flag} {text!r}: expected a time since the first event, e.g. 1.5, 250ms, 40us")
        raise typer.Exit(EXIT_BAD_INPUT)
    return int(value * scale)


def _time_window(t_from: str | None, t_to: str | None) -> tuple[int | None, int | None]:
    lo = None if t_from is None else _parse_time(t_from, "--from")
    hi = None if t_to is None else _parse_time(t_to, "--to")
    if lo is not None and hi is not None and hi < lo:
        _err(f"--to {t_to} is before --from {t_from}")
        raise typer.Exit(EXIT_BAD_INPUT)
    return lo, hi


def _absolute(span: tuple[int | None, int | None], t0: int | None) -> tuple[int | None, int | None]:
    base = t0 or 0
    return tuple(None if v is None else min(base + v, (1 << 63) - 1) for v in span)


def _event_rows(chunk: dict):
    """One tuple of plain ints per event (tolist() converts a whole column at once)."""
    names = ("t_exit", "vm", "vcpu", "epoch", "seq", "reason", "flags", "addr", "size", "count", "data",
             "guest_ns", "handle_ns")
    return zip(*(chunk[n].tolist() for n in names))


def _us(ns: int) -> str:
    return f"{ns / 1000:.1f}us"


def _text_lines(chunk: dict, t0: int) -> list[str]:
    lines = []
    for t, vm, vcpu, epoch, seq, reason, flags, addr, size, count, data, guest, handle in _event_rows(chunk):
        rel = t - t0
        sign = "+" if rel >= 0 else "-"
        rel = abs(rel)
        head = f"t={sign}{rel // 1_000_000_000}.{rel % 1_000_000_000:09d} vm={vm} vcpu={vcpu} "
        if epoch:
            head += f"epoch={epoch} "
        what = schema.describe_exit(reason, flags, addr, size, data, count)
        tail = f" guest={_us(guest)} handle={'-' if handle == analysis.NO_HANDLE else _us(handle)}\n"
        lines.append(f"{head}seq={seq} {what}{tail}")
    return lines


def _json_lines(chunk: dict, t0: int) -> list[str]:
    lines = []
    for t, vm, vcpu, epoch, seq, reason, flags, addr, size, count, data, guest, handle in _event_rows(chunk):
        event = {"t_ns": t, "t_rel_ns": t - t0, "vm": vm, "vcpu": vcpu, "epoch": epoch, "seq": seq,
                 "reason": schema.reason_name(reason), "reason_code": reason, "write": bool(flags & schema.FLAG_WRITE),
                 "addr": addr, "size": size, "count": count, "data": data, "flags": flags, "guest_ns": guest,
                 "handle_ns": None if handle == analysis.NO_HANDLE else handle}
        if reason == schema.REASON_IO:
            event["port"] = addr
        lines.append(json.dumps(event, separators=(",", ":")) + "\n")
    return lines


# --- shared helpers -------------------------------------------------------------------------------
def _event_filter(vm=None, vcpu=None, epoch=None, reason=None, port=None, addr=None, where=None) -> EventFilter | None:
    """The command's filter flags as one EventFilter (None: everything); bad text ends the command."""
    try:
        event_filter = EventFilter.from_options(vm=vm, vcpu=vcpu, epoch=epoch, reason=reason, port=port, addr=addr)
        event_filter &= parse_filter(where)
    except FilterError as e:
        _err(str(e))
        raise typer.Exit(EXIT_BAD_INPUT)
    return None if event_filter.matches_everything else event_filter


@contextmanager
def _reading(trace: str, *, warn: bool = True, **kwargs):
    """Open a trace for a command: its warnings on stderr; a TraceError anywhere inside ends the
    command with one line and exit code 2."""
    try:
        with TraceReader(trace, **kwargs) as reader:
            if warn:
                _warn_reader(trace, reader.torn_tail, reader.warnings)
            yield reader
    except TraceError as e:
        sys.stdout.flush()
        _err(str(e))
        raise typer.Exit(EXIT_BAD_INPUT)


def _console(file=None):
    from rich.console import Console
    out = file or sys.stdout
    # Piped into a file or grep, cells wrapped at 80 columns would split words; use wide lines.
    return Console(file=out, highlight=False, width=None if out.isatty() else 200)


def _dump_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=_json_default) + "\n")


_VM_OPT = typer.Option(None, "--vm", help="VM id(s): 0 or 0|2.")
_VCPU_OPT = typer.Option(None, "--vcpu", help="vCPU id(s).")
_EPOCH_OPT = typer.Option(None, "--epoch", help="Epoch(s) (a VM's restarts).")
_REASON_OPT = typer.Option(None, "--reason", help="Exit reason(s) by name or number: io|mmio.")
_PORT_OPT = typer.Option(None, "--port", help="I/O port(s), decimal or 0x-hex (implies io).")
_ADDR_OPT = typer.Option(None, "--addr", help="MMIO address(es) (implies mmio).")
_FILTER_OPT = typer.Option(None, "--filter", "-f", help="A filter expression: vm=0,reason=io|mmio,port=0x10.")


# --- summary --------------------------------------------------------------------------------------
@app.command()
def summary(
    trace: str = typer.Argument(..., help="A trace file written by the vmsup recorder."),
    by: str = typer.Option("reason", "--by", help="Group by reason, ioport (port:direction), mmio (address:R/W), vcpu or vm."),
    sort: str = typer.Option("count", "--sort", help="Order groups by count, time (total handling time) or max (longest handling)."),
    vm: Optional[str] = _VM_OPT, vcpu: Optional[str] = _VCPU_OPT, epoch: Optional[str] = _EPOCH_OPT,
    reason: Optional[str] = _REASON_OPT, port: Optional[str] = _PORT_OPT, addr: Optional[str] = _ADDR_OPT,
    where: Optional[str] = _FILTER_OPT,
    as_json: bool = typer.Option(False, "--json", help="One JSON document instead of a table."),
) -> None:
    """Exits per group with count, %, time% and min/max/mean/stddev/p50/p99 of guest and handling time."""
    from . import summary as summary_mod
    if by not in summary_mod.GROUPINGS:
        _err(f"unknown --by {by!r} (choose from {', '.join(summary_mod.GROUPINGS)})")
        raise typer.Exit(EXIT_BAD_INPUT)
    if sort not in summary_mod.SORTS:
        _err(f"unknown --sort {sort!r} (choose from {', '.join(summary_mod.SORTS)})")
        raise typer.Exit(EXIT_BAD_INPUT)
    event_filter = _event_filter(vm, vcpu, epoch, reason, port, addr, where)
    with _reading(trace) as reader:
        data = summary_mod.summarize(reader, by=by, sort=sort, where=event_filter)
    if as_json:
        _dump_json(data)
    else:
        _render_summary(data)


def _usec(ns) -> str:
    return "-" if ns is None else f"{ns / 1000:.2f}"


def _render_summary(data: dict) -> None:
    from rich.table import Table
    from rich.text import Text

    console = _console()
    by = data["by"]
    title = {"reason": "Exits by reason", "ioport": "I/O exits by port:direction", "mmio": "MMIO exits by address:R/W",
             "vcpu": "Exits by vCPU", "vm": "Exits by VM"}[by]
    if data["filter"]:
        title += f" ({data['filter']})"
    t = Table(title=title + " — times in µs", title_justify="left", title_style="bold")
    head = ["key", "count", "%", "time%"]
    for metric in ("guest", "handle"):
        head += [f"{metric} mean", "±sd", "min", "p50", "p99", "max"]
    for i, name in enumerate(head):
        t.add_column(name, justify="left" if i == 0 else "right")
    for g in data["groups"]:
        key = g["key"] + (f" ({g['name']})" if g.get("name") else "")
        cells = [key, str(g["count"]), f"{g['pct']:.2f}", f"{g['time_pct']:.2f}"]
        for metric in ("guest", "handle"):
            m = g[metric]
            cells += [_usec(m["mean_ns"]), _usec(m["stddev_ns"]), _usec(m["min_ns"]), _usec(m["p50_ns"]),
                      _usec(m["p99_ns"]), _usec(m["max_ns"])]
        t.add_row(*(Text(c) for c in cells))
    console.print(t)
    note = (f"{data['events']} events; guest time {data['guest_total_ns'] / 1e9:.6f} s, "
            f"handling time {data['handle_total_ns'] / 1e9:.6f} s (time% is each group's share of it)")
    if not data["percentiles_exact"]:
        note += "; percentiles approximate (too many outliers to keep: log histogram, <0.4% error)"
    console.print(Text(note))


# --- console --------------------------------------------------------------------------------------
@app.command()
def console(
    trace: str = typer.Argument(..., help="A trace file written by the vmsup recorder."),
    vm: Optional[int] = typer.Option(None, "--vm", min=0, help="Only this VM's console."),
    source: str = typer.Option("all", "--source", help="all, uart (COM1 at 0x3f8) or debugcon (port 0xe9)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document: text and byte counts per VM."),
) -> None:
    """The guest's serial and debug-port output, rebuilt from its recorded port writes."""
    from . import console as console_mod
    if source not in console_mod.SOURCES:
        _err(f"unknown --source {source!r} (choose from {', '.join(console_mod.SOURCES)})")
        raise typer.Exit(EXIT_BAD_INPUT)
    with _reading(trace) as reader:
        if vm is not None and vm not in {s.vm for s in reader.streams()}:
            _err(f"{trace}: no events of vm {vm} in this trace")
            raise typer.Exit(EXIT_BAD_INPUT)
        texts = console_mod.rebuild(reader, vm=vm, source=source)
    for t in texts:
        for note in t.notes:
            _warn(note)
    if as_json:
        _dump_json({"vms": [t.as_json() for t in texts]})
        return
    out = sys.stdout.buffer
    if len(texts) == 1:
        out.write(texts[0].text)  # exactly what the guest wrote
    else:
        for t in texts:
            if not t.text:
                continue
            name = f" ({t.name})" if t.name else ""
            out.write(f"--- vm {t.vm}{name} ---\n".encode())
            out.write(t.text if t.text.endswith(b"\n") else t.text + b"\n")
    out.flush()


# --- verify ---------------------------------------------------------------------------------------
@app.command()
def verify(
    trace: str = typer.Argument(..., help="A trace file written by the vmsup recorder."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document instead of lines."),
) -> None:
    """Check every block's checksum, the schema and sequence continuity; exit 1 on any problem."""
    from . import verify as verify_mod
    data = _or_exit(verify_mod.verify, trace)
    if as_json:
        _dump_json(data)
    else:
        out = sys.stdout
        for p in data["problems"]:
            where = "" if p["offset"] is None else f"offset {p['offset']}: "
            out.write(f"{trace}: {where}{p['reason']}\n")
        if data["more_problems"]:
            out.write(f"{trace}: … and {data['more_problems']} more problems\n")
        c = data["checked"]
        if data["ok"]:
            state = "closed cleanly" if c["closed_cleanly"] else "no index footer (the recorder did not finish)"
            out.write(f"{trace}: ok: {c['blocks']} blocks, {c['events']} events in {c['streams']} streams; "
                      f"checksums, schema and sequence numbers verified; {state}\n")
    raise typer.Exit(0 if data["ok"] else EXIT_PROBLEMS)


# --- diff -----------------------------------------------------------------------------------------
@app.command()
def diff(
    trace_a: str = typer.Argument(..., metavar="A", help="The first trace."),
    trace_b: str = typer.Argument(..., metavar="B", help="The trace to compare with it."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document instead of tables."),
) -> None:
    """Compare two traces of the same guest: first divergence and count differences per reason.
    Exit 0 when they match, 1 when they differ (timing alone is not a difference)."""
    from . import diff as diff_mod
    data = _or_exit(diff_mod.diff, trace_a, trace_b)
    for w in data["warnings"]:
        _warn(w)
    if as_json:
        _dump_json(data)
    else:
        _render_diff(data)
    raise typer.Exit(0 if data["same"] else EXIT_PROBLEMS)


def _stream_name(d: dict) -> str:
    return f"vm {d['vm']} vcpu {d['vcpu']}" + (f" epoch {d['epoch']}" if d["epoch"] else "")


def _divergence_line(d: dict) -> str:
    when = "" if d.get("t_rel_ns") is None else f" (t=+{d['t_rel_ns'] / 1e9:.6f} s)"
    head = f"{_stream_name(d)} seq {d['seq']}{when}: "
    if d["field"] == "stream":
        return head + f"stream only in {'A' if d['a'] else 'B'} ({d['a'] or d['b']})"
    if d["field"] == "event":
        if d["a"] is None:
            return head + f"A has no such event (its stream ends or skips it); B: {d['b']}"
        return head + f"B has no such event (its stream ends or skips it); A: {d['a']}"
    others = ", ".join(f"{f} {v[0]} vs {v[1]}" for f, v in d["fields"].items())
    return head + f"{d['field']} differs: A {d['a']}, B {d['b']} [{others}] — A: {d['a_event']}; B: {d['b_event']}"


def _render_diff(data: dict) -> None:
    from rich.table import Table
    from rich.text import Text

    console = _console()
    console.print(Text(f"A: {data['a']} ({data['events']['a']} events)\nB: {data['b']} ({data['events']['b']} events)"))
    for g in data["guests"]:
        a, b = g["a"] or {}, g["b"] or {}
        if g["same"]:
            console.print(Text(f"vm {g['vm']}: {a.get('name')} ({str(a.get('sha256'))[:16]}) in both"))
        else:
            console.print(Text(f"vm {g['vm']}: A {a.get('name')} ({str(a.get('sha256'))[:16]}), "
                               f"B {b.get('name')} ({str(b.get('sha256'))[:16]}) — different guests"))
    first = data["first_divergence"]
    if first is None:
        console.print(Text(f"no divergence: every event matches in {', '.join(data['compared_fields'])}"))
    else:
        console.print(Text("first divergence: " + _divergence_line(first)))
        others = [d for d in data["stream_divergences"] if d is not first]
        for d in others[:10]:
            console.print(Text("  also: " + _divergence_line(d)))
        if len(others) > 10:
            console.print(Text(f"  … and {len(others) - 10} more streams diverge"))
    t = Table(title="Exits per reason", title_justify="left", title_style="bold")
    for name in ("reason", "A", "B", "B − A"):
        t.add_column(name, justify="left" if name == "reason" else "right")
    for c in data["counts"]:
        t.add_row(c["reason"], str(c["a"]), str(c["b"]), f"{c['delta']:+d}" if c["delta"] else "0")
    console.print(t)
    t = Table(title="Timing per reason (µs; not a divergence: runs never repeat their timing)", title_justify="left",
              title_style="bold")
    t.add_column("reason")
    cols = [("guest", "mean_ns"), ("guest", "p99_ns"), ("handle", "mean_ns"), ("handle", "p99_ns")]
    for metric, stat in cols:
        label = f"{metric} {stat[:-3]}"
        for side in ("A", "B"):
            t.add_column(f"{label} {side}", justify="right")
        t.add_column("Δ%", justify="right")
    for entry in data["timing"]:
        cells = [entry["reason"]]
        for metric, stat in cols:
            v = entry[f"{metric}_{stat}"]
            cells += [_usec(v["a"]), _usec(v["b"]), "-" if v["change_pct"] is None else f"{v['change_pct']:+.1f}"]
        t.add_row(*cells)
    console.print(t)


# --- export ---------------------------------------------------------------------------------------
@app.command()
def export(
    trace: str = typer.Argument(..., help="A trace file written by the vmsup recorder."),
    fmt: str = typer.Option(..., "--format", help="perfetto (Chrome/Perfetto JSON timeline), csv or parquet."),
    out: str = typer.Option(..., "--output", "-o", help="The file to write ('-': standard output)."),
    vm: Optional[str] = _VM_OPT, vcpu: Optional[str] = _VCPU_OPT, epoch: Optional[str] = _EPOCH_OPT,
    reason: Optional[str] = _REASON_OPT, port: Optional[str] = _PORT_OPT, addr: Optional[str] = _ADDR_OPT,
    where: Optional[str] = _FILTER_OPT,
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress",
                                            help="A progress bar on stderr [default: when stderr is a terminal]."),
) -> None:
    """Write the events as a Perfetto timeline (open it in ui.perfetto.dev), CSV or Parquet."""
    from . import export as export_mod
    if fmt not in export_mod.FORMATS:
        _err(f"unknown --format {fmt!r} (choose from {', '.join(export_mod.FORMATS)})")
        raise typer.Exit(EXIT_BAD_INPUT)
    event_filter = _event_filter(vm, vcpu, epoch, reason, port, addr, where)
    with _reading(trace) as reader:
        show_bar = sys.stderr.isatty() if progress is None else progress
        try:
            if show_bar:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
                from rich.console import Console
                total = reader.event_count if event_filter is None else None
                with Progress(TextColumn(f"export {fmt}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                              console=Console(stderr=True), transient=True) as bar:
                    task = bar.add_task("export", total=total)
                    result = export_mod.export(reader, fmt, out, event_filter, lambda n: bar.advance(task, n))
            else:
                result = export_mod.export(reader, fmt, out, event_filter)
        except export_mod.ExportError as e:
            _err(str(e))
            raise typer.Exit(EXIT_BAD_INPUT)
    size = "" if result["bytes"] is None else f", {result['bytes']} bytes"
    typer.echo(f"vmtrace: wrote {result['events']} events to {out} ({fmt}{size})", err=True)


# --- replay ---------------------------------------------------------------------------------------
@app.command()
def replay(
    trace: str = typer.Argument(..., help="A trace file written by the vmsup recorder."),
    speed: float = typer.Option(1.0, "--speed", help="Replay X times faster than recorded (inf: no waiting)."),
    max_sleep: Optional[float] = typer.Option(None, "--max-sleep", min=0,
                                              help="Never wait longer than this many seconds between events."),
    vm: Optional[str] = _VM_OPT, vcpu: Optional[str] = _VCPU_OPT, epoch: Optional[str] = _EPOCH_OPT,
    reason: Optional[str] = _REASON_OPT, port: Optional[str] = _PORT_OPT, addr: Optional[str] = _ADDR_OPT,
    where: Optional[str] = _FILTER_OPT,
    as_json: bool = typer.Option(False, "--json", help="One JSON object per event, one per line."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", min=0, help="Stop after N events."),
    t_from: Optional[str] = typer.Option(None, "--from", help="Start at this time since the first event (1.5, 250ms)."),
    t_to: Optional[str] = typer.Option(None, "--to", help="Stop after this time since the first event."),
    show_screen: bool = typer.Option(False, "--screen", help="Print each VGA screen snapshot as it comes, beside the exits."),
) -> None:
    """Print events at their recorded pace (or X times faster), one line each as `show` does."""
    from .replay import paced
    if not speed > 0:
        _err(f"--speed must be greater than 0, not {speed}")
        raise typer.Exit(EXIT_BAD_INPUT)
    event_filter = _event_filter(vm, vcpu, epoch, reason, port, addr, where)
    span = _time_window(t_from, t_to)
    with _reading(trace) as reader:
        t0 = analysis.trace_start(reader)
        render = _json_lines if as_json else _text_lines
        out = sys.stdout
        lo, hi = _absolute(span, t0)
        snaps = _replay_snapshots(reader, vm, lo, hi) if show_screen else []
        chunks = analysis.events_in_time_order(reader, event_filter, limit, lo, hi)
        for chunk in paced(chunks, speed, max_sleep):
            while snaps and snaps[0].t <= int(chunk["t_exit"][-1]):
                out.write(_screen_block(snaps.pop(0), t0, as_json))
            out.write("".join(render(chunk, t0)))
            out.flush()  # each event as it comes due
        for snap in snaps:  # drawn after the last matching exit
            out.write(_screen_block(snap, t0, as_json))
        out.flush()


def _replay_snapshots(reader, vm: str | None, lo: int | None, hi: int | None) -> list:
    from . import screen as screen_mod
    want = None if vm is None else {int(v, 0) for v in vm.replace(",", "|").split("|") if v.strip()}
    return [s for s in screen_mod.trace_snapshots(reader)
            if (want is None or s.vm in want) and (lo is None or s.t >= lo) and (hi is None or s.t <= hi)]


def _screen_block(snap, t0: int | None, as_json: bool) -> str:
    if as_json:
        return json.dumps(dict(snap.to_json(t0), type="screen")) + "\n"
    when = (snap.t - (t0 or snap.t)) / 1e9
    head = f"--- screen vm {snap.vm} epoch {snap.epoch} at {when:.6f} s ---"
    lines = snap.lines()
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join([head, *lines, "-" * len(head)]) + "\n"


# --- plot -----------------------------------------------------------------------------------------
@app.command()
def plot(
    trace: str = typer.Argument(..., help="A trace file written by the vmsup recorder."),
    out: str = typer.Option(..., "--output", "-o", help="FILE.png or FILE.html (self-contained, inline SVG)."),
    vm: Optional[str] = _VM_OPT, vcpu: Optional[str] = _VCPU_OPT, epoch: Optional[str] = _EPOCH_OPT,
    reason: Optional[str] = _REASON_OPT, port: Optional[str] = _PORT_OPT, addr: Optional[str] = _ADDR_OPT,
    where: Optional[str] = _FILTER_OPT,
) -> None:
    """Exit rate over time per VM and a histogram of handling time, as a picture."""
    from . import plot as plot_mod
    try:
        plot_mod.output_kind(out)
    except plot_mod.PlotError as e:
        _err(str(e))
        raise typer.Exit(EXIT_BAD_INPUT)
    event_filter = _event_filter(vm, vcpu, epoch, reason, port, addr, where)
    with _reading(trace) as reader:
        data = plot_mod.plot_data(reader, event_filter)
    title = f"{os.path.basename(trace)}: {data['events']} exits over {data['span_ns'] / 1e9:.3f} s"
    try:
        size = plot_mod.render(data, out, title)
    except plot_mod.PlotError as e:
        _err(str(e))
        raise typer.Exit(EXIT_BAD_INPUT)
    typer.echo(f"vmtrace: wrote {out} ({size} bytes)", err=True)


# --- screen ---------------------------------------------------------------------------------------
@app.command()
def screen(
    trace: str = typer.Argument(..., help="A trace file written by the vmsup recorder."),
    vm: Optional[int] = typer.Option(None, "--vm", min=0, help="The VM (needed when several drew a screen)."),
    at: Optional[str] = typer.Option(None, "--at", help="The moment, as time since the first event (1.5, 250ms) "
                                     "[the end]: the last snapshot at or before it is shown."),
    color: bool = typer.Option(False, "--color", help="VGA colours as ANSI escapes."),
    as_json: bool = typer.Option(False, "--json", help="The snapshot as JSON: lines, cursor, attributes (hex)."),
) -> None:
    """The VGA text screen of a VM at a moment, from the trace's screen snapshots."""
    from . import screen as screen_mod
    t_rel = None if at is None else _parse_time(at, "--at")
    with _reading(trace) as reader:
        snaps = screen_mod.trace_snapshots(reader, vm)
        t0 = analysis.trace_start(reader)
    if not snaps:
        _err(f"{trace}: no screen snapshots" + (f" of VM {vm}" if vm is not None else "") +
             " (the guest never drew on the VGA text screen)")
        raise typer.Exit(EXIT_BAD_INPUT)
    vms = sorted({s.vm for s in snaps})
    if len(vms) > 1:
        _err(f"{trace}: VMs {', '.join(map(str, vms))} drew screens: pick one with --vm")
        raise typer.Exit(EXIT_BAD_INPUT)
    t0 = snaps[0].t if t0 is None else min(t0, snaps[0].t)
    snap = screen_mod.snapshot_at(snaps, None if t_rel is None else t0 + t_rel)
    if snap is None:
        _err(f"no screen snapshot at or before {at}: the first is at {(snaps[0].t - t0) / 1e9:.3f} s")
        raise typer.Exit(EXIT_BAD_INPUT)
    if as_json:
        _dump_json(dict(snap.to_json(t0), snapshots=len(snaps)))
        return
    cur = f"cursor row {snap.cursor[0]} col {snap.cursor[1]}" if snap.cursor else "cursor off"
    typer.echo(f"vmtrace: VM {snap.vm} epoch {snap.epoch}, screen at {(snap.t - t0) / 1e9:.3f} s "
               f"(snapshot {snaps.index(snap) + 1} of {len(snaps)}), {cur}", err=True)
    lines = screen_mod.ansi_lines(snap.cells) if color else snap.lines()
    sys.stdout.write("\n".join(lines) + "\n")


@app.callback()
def _root() -> None:
    """Analyse vmsup exit traces."""


def main() -> None:
    """Console-script entry: expected failures become one line and an exit code, never a traceback."""
    from ._alloc import keep_freed_memory
    keep_freed_memory()  # decoding block after block reuses memory instead of faulting in fresh pages
    try:
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except TyperException as e:  # usage errors: bad flag values, missing arguments
        _err(e.format_message())
        sys.exit(getattr(e, "exit_code", EXIT_BAD_INPUT))
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _err("interrupted")
        sys.exit(EXIT_INTERRUPTED)
