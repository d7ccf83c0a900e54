"""The Perfetto/Chrome JSON timeline of `vmtrace export --format perfetto` (the trace event format).

One process per VM ("vm 0 seed16"), one thread per vCPU ("vcpu 0"), named by metadata ("M")
events; each exit is a complete ("X") slice that starts when KVM_RUN returned and lasts its
handling time (until the vCPU entered the guest again), so the gaps between slices are guest time;
its args hold seq, epoch, address or port, size, count, data, guest_ns, handle_ns, the guest
address rip and its symbol and source line (null where unknown). Times are µs with ns precision,
from the trace's first exit. VM start and end, gap, lifecycle and key input records become
instant ("i") events, and so do coalesced writes and emulated instructions (categories
"coalesced" and "emulated", their fields as args). Thread ids are unique across VMs (Perfetto
keys threads by tid alone).
"""

from __future__ import annotations

import json
import os

import numpy as np

from .. import _text as T
from .. import analysis, exit_rows, schema
from ..handling import NO_HANDLE
from ..trace import TraceReader

_PLACES = tuple(f.name for f in schema.PLACE_FIELDS)  # derived: named from rip (exit_rows.add_places)
_RECORD_WINDOW_NS = 3600 * 10**9  # records further before the first exit are not on the timeline
_TID_STRIDE = 1 << 16  # tid = (vm + 1) * stride + vcpu: unique across VMs


def _tid(vm: int, vcpu: int) -> int:
    return (vm + 1) * _TID_STRIDE + vcpu


def _metadata(reader: TraceReader) -> list[dict]:
    names = analysis.vm_names(reader)
    events = []
    vcpus = sorted({(s.vm, s.vcpu) for s in reader.streams()})
    for vm in sorted({vm for vm, _ in vcpus}):
        label = f"vm {vm}" + (f" {names[vm]}" if vm in names else "")
        events.append({"ph": "M", "name": "process_name", "pid": vm + 1, "args": {"name": label}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": vm + 1, "args": {"sort_index": vm}})
    for vm, vcpu in vcpus:
        events.append({"ph": "M", "name": "thread_name", "pid": vm + 1, "tid": _tid(vm, vcpu),
                       "args": {"name": f"vcpu {vcpu}"}})
        events.append({"ph": "M", "name": "thread_sort_index", "pid": vm + 1, "tid": _tid(vm, vcpu),
                       "args": {"sort_index": vcpu}})
    return events


def _us(ns: int) -> float:
    return round(ns / 1000, 3)


def _record_events(reader: TraceReader, t0: int) -> list[dict]:
    """Instant events for VM start / end, gap and lifecycle records that carry a time."""
    out = []
    for kind in (schema.MSG_VM_START, schema.MSG_VM_END, schema.MSG_LIFECYCLE, schema.MSG_INPUT, schema.MSG_GAP):
        for rec in reader.records(kind):
            vm = rec.get("vm")
            if not isinstance(vm, int) or not 0 <= vm < 1 << 32:
                continue
            t = rec.get("t")
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t - t0 <= 1 << 62:
                if kind != schema.MSG_GAP:
                    continue
                t = None
            args = {k: v for k, v in rec.items() if isinstance(v, (int, str, float, bool))}
            name = {schema.MSG_LIFECYCLE: f"lifecycle {rec.get('event')}", schema.MSG_INPUT: f"key {rec.get('key')}"}.get(
                kind, kind)
            if kind == schema.MSG_GAP:
                vcpu = rec.get("vcpu")
                ev = {"ph": "i", "s": "t", "name": f"gap: {rec.get('count')} events lost", "pid": vm + 1,
                      "tid": _tid(vm, vcpu) if isinstance(vcpu, int) and 0 <= vcpu < _TID_STRIDE else vm + 1,
                      "ts": 0.0 if t is None else _us(t - t0), "args": args}
            else:
                ev = {"ph": "i", "s": "p", "name": name, "pid": vm + 1, "ts": _us(t - t0), "args": args}
            out.append(ev)
    return out


def _side_events(reader: TraceReader, t0: int, where) -> list[dict]:
    """The rows beside the exits (tracetool/side_rows.py) as instant events on their vCPU's
    thread, their fields as args: a coalesced write at the drain that found it (t_before; it
    happened after t_after), an emulated instruction at the exit that led to it."""
    from .. import side_rows

    out = []
    for w in side_rows.rows(side_rows.COALESCED, side_rows.columns(reader, side_rows.COALESCED, where)):
        out.append({"ph": "i", "s": "t", "name": f"coalesced {w['reason']} {w['addr']:#x}", "cat": "coalesced",
                    "pid": w["vm"] + 1, "tid": _tid(w["vm"], w["vcpu"]), "ts": _us(w["t_before_ns"] - t0), "args": w})
    emulated = side_rows.rows(side_rows.EMULATED, side_rows.columns(reader, side_rows.EMULATED, where))
    exit_times: dict[tuple[int, int, int, int], int] = {}
    for stream in sorted({(r["vm"], r["vcpu"], r["epoch"]) for r in emulated}):
        wanted = np.array(sorted({r["exit_seq"] for r in emulated if (r["vm"], r["vcpu"], r["epoch"]) == stream}),
                          np.uint64)
        for batch in reader.exit_batches(*stream, columns=("t_exit",)):
            seq = batch.columns["seq"].astype(np.uint64)
            hit = np.isin(seq, wanted)
            exit_times.update(((*stream, s), t) for s, t in zip(seq[hit].tolist(), batch.columns["t_exit"][hit].tolist()))
    for r in emulated:
        t = exit_times.get((r["vm"], r["vcpu"], r["epoch"], r["exit_seq"]))
        if t is not None:  # its exit is in the trace (a lost block takes its exits along)
            out.append({"ph": "i", "s": "t", "name": f"emulated {r['family']} {r['insn']}", "cat": "emulated",
                        "pid": r["vm"] + 1, "tid": _tid(r["vm"], r["vcpu"]), "ts": _us(t - t0), "args": r})
    return out


def _timeline_start(reader: TraceReader) -> int:
    """The zero of the timeline: the first exit, or an earlier record (a VM's start) within
    _RECORD_WINDOW_NS of it — Perfetto drops events at negative times."""
    t0 = analysis.trace_start(reader)
    times = [rec["t"] for rec in reader.records() if isinstance(rec.get("t"), int) and not isinstance(rec["t"], bool)]
    if t0 is None:
        return min(times, default=0)
    return min([t for t in times if t0 - _RECORD_WINDOW_NS <= t] + [t0])


# Table columns the slice shows in its own way (time, duration, name, category, the args above);
# every other column of the schema goes into args under its own name, null where unknown.
_PERFETTO_SHOWN = frozenset(("t_exit", "guest_ns", "addr", "data", "count", "reason", "size", "flags"))


def _perfetto_other_args(c: dict[str, np.ndarray], n: int) -> list[np.ndarray]:
    pieces = []
    for name in schema.COLUMN_NAMES:
        if name in _PERFETTO_SHOWN:
            continue
        unknown = exit_rows.missing_mask(c, name)
        pieces.append(T.const(f',"{name}":'.encode(), n))
        if unknown is None:
            pieces.append(T.decimal(c[name]))
        else:
            pieces += [T.lookup([b"", b"null"], unknown.astype(np.intp)), T.blank(T.decimal(c[name]), unknown)]
    return pieces


def _perfetto_places(c: dict, n: int) -> list[np.ndarray]:
    """`,"symbol":"print","line":"mbkernel.c:88"` (null where unknown)."""
    pieces = []
    for name in _PLACES:
        labels = c[name]
        pieces += [T.const(f',"{name}":'.encode(), n),
                   T.lookup([b"null"] + [json.dumps(t).encode() for t in labels.texts[1:]], labels.codes)]
    return pieces


def write_timeline(reader: TraceReader, path: str, where, progress, symbols: dict) -> int:
    """Write the timeline to `path`; the number of exits on it."""
    t0 = _timeline_start(reader)
    reasons = exit_rows.reason_texts()
    # name: "io out 0x3f8" / "mmio W 0xd0000000" / "hlt": the reason, a direction for io and mmio
    direction = [b""] * 512
    for w, text in ((0, b" in"), (1, b" out")):
        direction[schema.REASON_IO * 2 + w] = text
    for w, text in ((0, b" R"), (1, b" W")):
        direction[schema.REASON_MMIO * 2 + w] = text
    n_total = 0
    with open(path, "wb") as f:
        head = {"displayTimeUnit": "ns",
                "otherData": {"source": "vmtrace export", "trace": os.path.basename(reader.path),
                              "run_id": str(reader.run.get("run_id", "")), "t0_ns": t0}}
        f.write(b'{"displayTimeUnit":"ns","otherData":' + json.dumps(head["otherData"]).encode()
                + b',"traceEvents":[\n')
        first = True
        for ev in _metadata(reader):
            f.write((b"" if first else b",\n") + json.dumps(ev, separators=(",", ":")).encode())
            first = False
        for c in analysis.events_with_places(reader, where, symbols):
            n = len(c["t_exit"])
            rel = c["t_exit"] - np.int64(t0)
            handle = c["handle_ns"]
            known = handle != NO_HANDLE
            dur = np.where(known, np.maximum(handle, 0), 0)
            io_or_mmio = (c["reason"] == schema.REASON_IO) | (c["reason"] == schema.REASON_MMIO)
            w = (c["flags"] & schema.FLAG_WRITE).astype(np.intp)
            addr_hex = T.hexadecimal(c["addr"])
            pieces = [
                T.const(b",\n", n),
                T.const(b'{"ph":"X","name":"', n), T.lookup(reasons, c["reason"]),
                T.lookup(direction, c["reason"].astype(np.intp) * 2 + w),
                T.blank(np.concatenate([T.const(b" ", n), addr_hex], axis=1), ~io_or_mmio),
                T.const(b'","cat":"', n), T.lookup(reasons, c["reason"]),
                T.const(b'","pid":', n), T.decimal(c["vm"].astype(np.uint64) + np.uint64(1)),
                T.const(b',"tid":', n), T.decimal((c["vm"].astype(np.uint64) + np.uint64(1)) * np.uint64(_TID_STRIDE)
                                                   + c["vcpu"].astype(np.uint64)),
                T.const(b',"ts":', n), T.decimal(rel // 1000), T.const(b".", n), T.decimal(rel % 1000, width=3),
                T.const(b',"dur":', n), T.decimal(dur // 1000), T.const(b".", n), T.decimal(dur % 1000, width=3),
                T.const(b',"args":{"seq":', n), T.decimal(c["seq"]),
                T.const(b',"epoch":', n), T.decimal(c["epoch"]),
                T.const(b',"addr":"', n), addr_hex,
                T.const(b'","size":', n), T.decimal(c["size"]),
                T.const(b',"count":', n), T.decimal(c["count"]),
                T.const(b',"data":"', n), T.hexadecimal(c["data"]),
                T.const(b'","write":', n), T.lookup([b"false", b"true"], w),
                T.const(b',"guest_ns":', n), T.decimal(c["guest_ns"]),
                *_perfetto_other_args(c, n),
                *_perfetto_places(c, n),
                T.const(b',"handle_ns":', n),
                T.lookup([b"null", b""], known.astype(np.intp)),
                T.blank(T.decimal(np.where(known, handle, 0)), ~known),
                T.const(b"}}", n),
            ]
            text = T.join_rows(pieces)
            if first:  # only when there was no metadata (cannot happen: events come with streams)
                text, first = text[1:], False
            f.write(text)
            n_total += n
            progress(n)
        for ev in (*_side_events(reader, t0, where), *_record_events(reader, t0)):
            f.write((b"" if first else b",\n") + json.dumps(ev, separators=(",", ":"), default=str).encode())
            first = False
        f.write(b"\n]}\n")
    return n_total
