"""`vmtrace diff A B`: what changed between two traces of the same guest.

Behaviour and timing are kept apart. Two runs of a deterministic guest make the same exits in
the same order, but never at the same times (host noise, preemption). So a *divergence* is an
event that differs in what the guest did — reason, direction, address or port, size, count or
data — compared stream by stream ((vm, vcpu, epoch)) and sequence number by sequence number;
a stream that ends earlier, or one that only one trace has, diverges too. The first divergence
of each stream is reported (seq, field, both values), and the earliest of them in time is
"the" first divergence. Timing is reported next to it, not as a divergence: per exit reason,
counts and mean / p50 / p99 of guest and handling time in both traces.

Streams are compared block by block with numpy (one decoded block of each side at a time).
Kicks (`intr` rows: the VMM took the vCPU out of KVM_RUN at a host-timed moment — a pause, a
snapshot, a flush of a quiet vCPU) are not the guest's doing: they are left out of the
comparison, and since each takes a sequence number, events are matched by their place among the
guest's exits (seq minus the kicks before it), not by seq alone. The seq reported is A's.

A trace restored from a snapshot (`vmsup launch --restore`) carries on the original's sequence
numbers from the snapshot on: a stream that starts past 0 in either trace (its vm-start names a
parent) is compared over the range both traces hold, and the report names that range.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import typer

from .. import analysis, schema
from ..trace import TraceReader
from . import _common as c
from .summary import summarize

FIELDS = ("reason", "flags", "addr", "size", "count", "data")  # what the guest did; not timing
_SEQ = schema.SEQ_COLUMN[0]
_COLS = (*FIELDS, _SEQ, "t_exit")
_PLACE = "place"  # an event's place among its stream's guest exits (seq minus the kicks before it)


def describe(ev: dict) -> str:
    """One event's behaviour as show prints it: `io out port=0x10 size=2 data=0x5`."""
    reason, write = ev["reason"], ev["flags"] & schema.FLAG_WRITE
    if reason == schema.REASON_IO:
        text = f"io {'out' if write else 'in'} port={ev['addr']:#x} size={ev['size']} data={ev['data']:#x}"
        return text + (f" count={ev['count']}" if ev["count"] != 1 else "")
    if reason == schema.REASON_MMIO:
        return f"mmio {'write' if write else 'read'} addr={ev['addr']:#x} size={ev['size']} data={ev['data']:#x}"
    return schema.reason_name(reason) + (f" data={ev['data']:#x}" if ev["data"] else "")


def _chunks(reader: TraceReader, key: tuple[int, int, int],
            span: tuple[int, int] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Stream `key`'s guest exits (kicks left out) block by block, each with its place; with
    `span` (lo, hi) only seqs lo..hi."""
    kicks = 0  # before this block
    for batch in reader.exit_batches(*key):
        if batch.n_rows:
            cols = {name: batch.columns[name] for name in _COLS}
            if span is not None:
                keep = (cols[_SEQ] >= span[0]) & (cols[_SEQ] <= span[1])
                cols = {name: col[keep] for name, col in cols.items()}
            is_kick = cols["reason"] == schema.REASON_INTR
            cols[_PLACE] = cols[_SEQ].astype(np.int64) - (np.cumsum(is_kick) + kicks)
            kicks += int(is_kick.sum())
            if kicks:
                cols = {name: col[~is_kick] for name, col in cols.items()}
            if len(cols[_SEQ]):
                yield cols


def _row(cols: dict, i: int) -> dict:
    return {name: int(cols[name][i]) for name in _COLS}


def _value(field: str, v: int):
    if field == "reason":
        return schema.reason_name(v)
    if field == "flags":
        return "write" if v & schema.FLAG_WRITE else "read"
    if field in ("addr", "data"):
        return f"{v:#x}"
    return v


def _divergence(key, seq: int, a: dict | None, b: dict | None, t0: int | None) -> dict:
    out = {"vm": key[0], "vcpu": key[1], "epoch": key[2], "seq": seq}
    if a is None or b is None:
        present = a if b is None else b
        out.update(field="event", a=describe(a) if a else None, b=describe(b) if b else None,
                   fields={}, t_ns=present["t_exit"])
    else:
        fields = {f: [_value(f, a[f]), _value(f, b[f])] for f in FIELDS if a[f] != b[f]}
        first = next(iter(fields))
        out.update(field=first, a=fields[first][0], b=fields[first][1], fields=fields,
                   a_event=describe(a), b_event=describe(b), t_ns=min(a["t_exit"], b["t_exit"]))
    out["t_rel_ns"] = None if t0 is None else out["t_ns"] - t0
    return out


def _first_divergence(ra: TraceReader, rb: TraceReader, key, t0: int | None,
                      span: tuple[int, int] | None = None) -> dict | None:
    """The first event of stream `key` where A and B differ, or None when they are the same."""
    ia, ib = _chunks(ra, key, span), _chunks(rb, key, span)
    a = b = None
    while True:
        if a is None or not len(a[_SEQ]):
            a = next(ia, None)
        if b is None or not len(b[_SEQ]):
            b = next(ib, None)
        if a is None and b is None:
            return None
        if span is not None and (a is None or b is None):
            return None  # a restored range ends where either side's events end (kicks shift its seqs)
        if a is None or b is None:
            side = b if a is None else a
            row = _row(side, 0)
            return _divergence(key, row[_SEQ], None if a is None else row, None if b is None else row, t0)
        m = min(len(a[_SEQ]), len(b[_SEQ]))
        differ = a[_PLACE][:m] != b[_PLACE][:m]
        for name in FIELDS:
            differ |= a[name][:m] != b[name][:m]
        hits = np.flatnonzero(differ)
        if len(hits):
            j = int(hits[0])
            ra_, rb_ = _row(a, j), _row(b, j)
            pa, pb = int(a[_PLACE][j]), int(b[_PLACE][j])
            if pa != pb:  # one side has an event the other lacks
                return _divergence(key, ra_[_SEQ] if pa < pb else rb_[_SEQ], ra_ if pa < pb else None,
                                   rb_ if pb < pa else None, t0)
            return _divergence(key, ra_[_SEQ], ra_, rb_, t0)
        a = {name: col[m:] for name, col in a.items()}
        b = {name: col[m:] for name, col in b.items()}


def _restored_starts(reader: TraceReader) -> dict:
    """Streams of epochs restored from a snapshot: (vm, vcpu, epoch) → first seq."""
    from ..trace.accounting import stream_starts
    return {key: n for key, n in stream_starts(reader.records(schema.MSG_VM_START)).items() if n > 0}


def _guests(reader: TraceReader) -> dict[int, dict]:
    out = {}
    for rec in reader.records(schema.MSG_VM_START):
        if isinstance(rec.get("vm"), int):
            out.setdefault(rec["vm"], {"name": rec.get("name"), "sha256": rec.get("sha256")})
    return out


def diff(path_a, path_b) -> dict:
    """Everything `vmtrace diff` reports, as data. Raises TraceError for an unreadable trace."""
    with TraceReader(path_a) as ra, TraceReader(path_b) as rb:
        warnings = [f"{r.path}: torn tail at offset {r.torn_tail[0]} ({r.torn_tail[1]}); using the blocks before it"
                    for r in (ra, rb) if r.torn_tail is not None]
        warnings += [f"{r.path}: {w}" for r in (ra, rb) for w in r.warnings]
        sa = {(s.vm, s.vcpu, s.epoch): s for s in ra.streams() if s.events}
        sb = {(s.vm, s.vcpu, s.epoch): s for s in rb.streams() if s.events}
        t0 = analysis.trace_start(ra)
        restored = {**_restored_starts(ra), **_restored_starts(rb)}
        streams, ranges = [], []
        for key in sorted(set(sa) | set(sb)):
            if key not in sb or key not in sa:
                present = sa.get(key) or sb.get(key)
                d = {"vm": key[0], "vcpu": key[1], "epoch": key[2], "seq": present.first_seq, "field": "stream",
                     "a": f"{sa[key].events} events" if key in sa else None,
                     "b": f"{sb[key].events} events" if key in sb else None, "fields": {},
                     "t_ns": present.t_first, "t_rel_ns": None if t0 is None or present.t_first is None
                     else present.t_first - t0}
            elif key in restored:  # one side continues the other from a snapshot: the range both hold
                lo = max(sa[key].first_seq, sb[key].first_seq)
                ranges.append({"vm": key[0], "vcpu": key[1], "epoch": key[2], "first_seq": lo,
                               "last_seq": min(sa[key].last_seq, sb[key].last_seq)})
                d = _first_divergence(ra, rb, key, t0, (lo, max(sa[key].last_seq, sb[key].last_seq)))
            else:
                d = _first_divergence(ra, rb, key, t0)
            if d is not None:
                streams.append(d)
        first = min(streams, key=lambda d: (d["t_ns"] if d["t_ns"] is not None else 1 << 63, d["vm"], d["vcpu"],
                                            d["epoch"])) if streams else None
        counts = _counts(ra, rb)
        timing = _timing(ra, rb)
        guests_a, guests_b = _guests(ra), _guests(rb)
        guests = [{"vm": vm, "a": guests_a.get(vm), "b": guests_b.get(vm),
                   "same": guests_a.get(vm) == guests_b.get(vm)} for vm in sorted(set(guests_a) | set(guests_b))]
        events = (ra.event_count, rb.event_count)
    count_diffs = [c for c in counts if c["delta"] and c["reason"] != schema.reason_name(schema.REASON_INTR)]  # kicks: host-timed
    # Over a restored range the whole traces' counts differ by what lies outside it: not a divergence.
    same = first is None and (not count_diffs or bool(ranges))
    return {"a": str(path_a), "b": str(path_b), "events": {"a": events[0], "b": events[1]},
            "same": same, "first_divergence": first, "stream_divergences": streams, "restored_ranges": ranges,
            "compared_fields": list(FIELDS), "counts": counts, "count_differences": count_diffs,
            "timing": timing, "guests": guests, "warnings": warnings}


def _counts(ra: TraceReader, rb: TraceReader) -> list[dict]:
    def by_reason(r: TraceReader) -> dict[int, int]:
        out: dict[int, int] = {}
        for counts in analysis.events_by_vm_and_reason(r).values():
            for code, n in counts.items():
                out[code] = out.get(code, 0) + n
        return out

    a, b = by_reason(ra), by_reason(rb)
    return [{"reason": schema.reason_name(code), "a": a.get(code, 0), "b": b.get(code, 0),
             "delta": b.get(code, 0) - a.get(code, 0)} for code in sorted(set(a) | set(b))]


def _timing(ra: TraceReader, rb: TraceReader) -> list[dict]:
    sa = {g["key"]: g for g in summarize(ra)["groups"]}
    sb = {g["key"]: g for g in summarize(rb)["groups"]}
    out = []
    for key in sorted(set(sa) | set(sb)):
        entry = {"reason": key}
        for metric in ("guest", "handle"):
            for stat in ("mean_ns", "p50_ns", "p99_ns"):
                va = sa[key][metric][stat] if key in sa else None
                vb = sb[key][metric][stat] if key in sb else None
                entry[f"{metric}_{stat}"] = {"a": va, "b": vb,
                                             "change_pct": None if not va or vb is None else 100 * (vb - va) / va}
        out.append(entry)
    return out


def _stream_name(d: dict) -> str:
    return f"vm {d['vm']} vcpu {d['vcpu']}" + (f" epoch {d['epoch']}" if d["epoch"] else "")


def signed_seconds(ns: int) -> str:
    """`+1.500000` or `-28.615055`: one sign, from the integer (an event before A's first is negative)."""
    return f"{'-' if ns < 0 else '+'}{abs(ns) / 1e9:.6f}"


def _divergence_line(d: dict) -> str:
    when = "" if d.get("t_rel_ns") is None else f" (t={signed_seconds(d['t_rel_ns'])} s)"
    head = f"{_stream_name(d)} seq {d['seq']}{when}: "
    if d["field"] == "stream":
        return head + f"stream only in {'A' if d['a'] else 'B'} ({d['a'] or d['b']})"
    if d["field"] == "event":
        if d["a"] is None:
            return head + f"A has no such event (its stream ends or skips it); B: {d['b']}"
        return head + f"B has no such event (its stream ends or skips it); A: {d['a']}"
    others = ", ".join(f"{f} {v[0]} vs {v[1]}" for f, v in d["fields"].items())
    return head + f"{d['field']} differs: A {d['a']}, B {d['b']} [{others}] — A: {d['a_event']}; B: {d['b_event']}"


def render(data: dict, console, *, wide: bool = False) -> None:
    from rich.table import Table
    from rich.text import Text

    console.print(Text(f"A: {data['a']} ({data['events']['a']} events)\nB: {data['b']} ({data['events']['b']} events)"))
    for g in data["guests"]:
        a, b = g["a"] or {}, g["b"] or {}
        if g["same"]:
            console.print(Text(f"vm {g['vm']}: {a.get('name')} ({str(a.get('sha256'))[:16]}) in both"))
        else:
            console.print(Text(f"vm {g['vm']}: A {a.get('name')} ({str(a.get('sha256'))[:16]}), "
                               f"B {b.get('name')} ({str(b.get('sha256'))[:16]}) — different guests"))
    for r in data.get("restored_ranges", []):
        console.print(Text(f"vm {r['vm']} vcpu {r['vcpu']} epoch {r['epoch']}: restored from a snapshot; "
                           f"compared seq {r['first_seq']}–{r['last_seq']}, the range both traces hold"))
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
    for count in data["counts"]:
        t.add_row(count["reason"], str(count["a"]), str(count["b"]), f"{count['delta']:+d}" if count["delta"] else "0")
    console.print(t)
    columns, rows = timing_columns(data["timing"])
    t, hidden = c.fitted_table(console, "Timing per reason (µs; not a divergence: runs never repeat their timing)",
                               columns, rows, wide=wide)
    c.print_fitted(console, t, hidden, wide=wide)


# Timing columns: (metric, statistic, drop order of its A, B and Δ% columns; 0: always shown).
_TIMING = (("guest", "mean_ns", 0), ("handle", "mean_ns", 0), ("guest", "p99_ns", 2), ("handle", "p99_ns", 1))


def timing_columns(timing: list[dict]) -> tuple[list, list[list[str]]]:
    """The timing table's columns (c.Col) and rows: A, B and Δ% of each statistic."""
    columns = [c.Col("reason", numeric=False)]
    for metric, stat, drop in _TIMING:
        label = f"{metric}\n{stat[:-3]}"
        columns += [c.Col(f"{label}\nA", drop=drop), c.Col(f"{label}\nB", drop=drop), c.Col("\n\nΔ%", drop=drop)]
    rows = []
    for entry in timing:
        cells = [entry["reason"]]
        for metric, stat, _ in _TIMING:
            v = entry[f"{metric}_{stat}"]
            cells += [c.usec(v["a"]), c.usec(v["b"]), "-" if v["change_pct"] is None else f"{v['change_pct']:+.1f}"]
        rows.append(cells)
    return columns, rows


def run(
    trace_a: str = typer.Argument(..., metavar="A", help="The first trace."),
    trace_b: str = typer.Argument(..., metavar="B", help="The trace to compare with it."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document instead of tables."),
    wide: bool = c.WIDE_OPT,
) -> None:
    """Compare two traces of the same guest: first divergence and count differences per reason.
    Exit 0 when they match, 1 when they differ (timing alone is not a difference)."""
    data = c.or_exit(diff, trace_a, trace_b)
    for w in data["warnings"]:
        c.warn(w)
    if as_json:
        c.dump_json(data)
    else:
        render(data, c.console(), wide=wide)
    raise typer.Exit(0 if data["same"] else c.EXIT_PROBLEMS)
