"""`vmtrace verify`: is every byte of this trace what the recorder wrote, and does it add up?

Checks, each problem one line:
  - every block's crc32 (the reader scans with skip_corrupt, so it lists all bad blocks, not
    only the first) and a torn tail;
  - the schema: the header describes this version's columns, every EXITS block decodes
    (heads, encodings, column sizes, seq column, time range), and the values keep the schema's
    promises (flags bits, I/O ports and sizes, no negative guest time);
  - time and sequence continuity: sequence numbers of each stream without holes that no gap
    record explains and without overlaps; t_exit never going back in a stream and no negative
    handling time (KVM_RUN entered again before the previous exit returned);
  - the index footer, when there is one: its totals match the blocks.
A file the reader refuses outright (missing, not a trace, newer format) is not verified: the
CLI reports it as bad input.
"""

from __future__ import annotations

import sys

import numpy as np
import typer

from .. import schema
from ..handling import Stitcher
from ..trace import TraceError, TraceReader
from . import _common as c

MAX_PROBLEMS = 1000  # lines; past that, one line says how many more there were
_SEQ = schema.SEQ_COLUMN[0]
_IO_SIZES = (1, 2, 4)
_KNOWN_FLAGS = schema.FLAG_WRITE


class _Problems:
    def __init__(self) -> None:
        self.items: list[dict] = []
        self.more = 0

    def add(self, offset: int | None, reason: str) -> None:
        if len(self.items) < MAX_PROBLEMS:
            self.items.append({"offset": offset, "reason": reason})
        else:
            self.more += 1


def verify(path) -> dict:
    """Everything `vmtrace verify` reports, as data. Raises TraceError when the file cannot be
    opened as a trace at all."""
    problems = _Problems()
    with TraceReader(path, skip_corrupt=True) as reader:
        for offset, reason in reader.corrupt:
            problems.add(offset, reason)
        if reader.torn_tail is not None:
            offset, reason = reader.torn_tail
            problems.add(offset, f"torn tail: {reason}")
        for w in reader.warnings:
            problems.add(None, w)
        _check_header(reader, problems)
        counted = _check_blocks(reader, problems)
        for d in reader.unexplained_gaps:
            stream = f"vm {d.vm} vcpu {d.vcpu} epoch {d.epoch}"
            if d.kind == "overlap":
                problems.add(d.offset, f"{stream}: sequence numbers {d.first_seq}..{d.first_seq + d.count - 1} "
                                       "are in two blocks")
            else:
                problems.add(d.offset, f"{stream}: {d.count} sequence numbers missing from seq {d.first_seq} "
                                       "(no gap record explains them)")
        _check_footer(reader, counted, problems)
        checked = {"blocks": len(reader.exit_blocks()) + len(reader.records()) + (reader.footer is not None),
                   "exit_blocks": len(reader.exit_blocks()), "events": int(sum(counted.values())),
                   "streams": len(reader.streams()), "records": len(reader.records()),
                   "closed_cleanly": reader.closed_cleanly, "gap_records": len(reader.gaps),
                   "gaps": [_gap(g) for g in reader.gaps]}
    return {"path": str(path), "ok": not problems.items, "problems": problems.items, "more_problems": problems.more,
            "checked": checked}


def _gap(record: dict) -> dict:
    """A gap record as verify reports it (count None: the recorder could not tell how many)."""
    count = record.get("count")
    return {key: record.get(key) for key in ("vm", "vcpu", "epoch", "first_missing", "cause")} | {
        "count": count if isinstance(count, int) and not isinstance(count, bool) and count > 0 else None}


def gap_line(gaps: list[dict]) -> str:
    """`2 gaps recorded: 100 events lost (vm 1 vcpu 1 from seq 500: recorder queue full), …`"""
    known = sum(g["count"] or 0 for g in gaps)
    unknown = sum(g["count"] is None for g in gaps)
    lost = f"{known} events lost" + (f" and {unknown} losses of unknown size" if unknown else "")
    where = "; ".join(f"vm {g['vm']} vcpu {g['vcpu']}" + (f" epoch {g['epoch']}" if g["epoch"] else "")
                      + (f" from seq {g['first_missing']}" if g["first_missing"] is not None else "")
                      + f": {g['count'] if g['count'] is not None else 'an unknown number'}"
                      + (f" ({g['cause']})" if g["cause"] else "") for g in gaps[:5])
    more = f"; … {len(gaps) - 5} more" if len(gaps) > 5 else ""
    return f"{len(gaps)} gap{'s' if len(gaps) != 1 else ''} recorded, {lost}: {where}{more}"


def _check_header(reader: TraceReader, problems: _Problems) -> None:
    described = reader.header["schema"]
    if described.get("version") != schema.SCHEMA_VERSION:
        return  # an older schema: its own columns; the blocks are checked against what they say
    mine = schema.schema_description()
    columns = described.get("columns")
    if not isinstance(columns, list) or [(c.get("name"), c.get("dtype")) if isinstance(c, dict) else None
                                         for c in columns] != [(c["name"], c["dtype"]) for c in mine["columns"]]:
        problems.add(None, f"the header's column list is not event schema {schema.SCHEMA_VERSION}'s")


def _check_blocks(reader: TraceReader, problems: _Problems) -> dict[tuple[int, int], int]:
    """Decode every EXITS block and check its values; returns events per (vm, reason)."""
    counted: dict[tuple[int, int], int] = {}
    last_t: dict[tuple[int, int, int], int] = {}  # stream → t_exit of its last event
    handles = Stitcher()
    bad_offsets = {offset for offset, _ in reader.corrupt}
    with np.errstate(all="ignore"):
        for ref in reader.exit_blocks():
            if ref.offset in bad_offsets:
                continue
            try:
                batch = reader.read_batch(ref)
            except TraceError as e:
                problems.add(ref.offset, getattr(e, "reason", str(e)))
                continue
            if not batch.n_rows:
                continue
            cols = batch.columns
            where = f"vm {batch.vm} vcpu {batch.vcpu} epoch {batch.epoch}"
            reasons = np.bincount(cols["reason"], minlength=256)
            for code in np.flatnonzero(reasons).tolist():
                counted[(batch.vm, code)] = counted.get((batch.vm, code), 0) + int(reasons[code])

            def bad(mask: np.ndarray, what: str) -> None:
                rows = np.flatnonzero(mask)
                if len(rows):
                    problems.add(ref.offset, f"{where}: {len(rows)} event(s) {what} (first at seq "
                                             f"{int(cols[_SEQ][rows[0]])})")

            t, g, seq = cols["t_exit"], cols["guest_ns"], cols[_SEQ]
            bad((cols["flags"] & ~np.uint8(_KNOWN_FLAGS)) != 0, "with flag bits the schema does not define")
            bad(g < 0, "with negative guest_ns")
            io = cols["reason"] == schema.REASON_IO
            bad(io & (cols["addr"] > 0xFFFF), "of io on a port above 0xffff")
            bad(io & ~np.isin(cols["size"], _IO_SIZES), "of io with a size other than 1, 2 or 4")
            bad(cols["count"] == 0, "with count 0")
            bad(t[1:] < t[:-1], "with t_exit before the previous event's")
            block = handles.block(batch)
            negative = block.inner < 0
            if block.follows is not None:
                negative &= block.follows
            bad(negative, "entering KVM_RUN before the previous exit returned (negative handling time)")
            key = (batch.vm, batch.vcpu, batch.epoch)
            prev_t = last_t.get(key)
            if prev_t is not None and int(t[0]) < prev_t:
                problems.add(ref.offset, f"{where}: t_exit at seq {int(seq[0])} is before the previous "
                                         f"block's last event")
            elif block.previous is not None and block.previous < 0:
                problems.add(ref.offset, f"{where}: seq {int(seq[0])} entered KVM_RUN before the previous "
                                         "block's last exit returned")
            last_t[key] = int(t[-1])
    return counted


def _check_footer(reader: TraceReader, counted: dict[tuple[int, int], int], problems: _Problems) -> None:
    footer = reader.footer
    if footer is None or reader.corrupt:
        return
    total = sum(counted.values())
    events = footer.get("events")
    if isinstance(events, int) and events != total:
        problems.add(None, f"the index footer says {events} events; the blocks hold {total}")
    by_vm = footer.get("by_vm")
    if isinstance(by_vm, dict):
        listed = {}
        for vm, counts in by_vm.items():
            if isinstance(counts, dict):
                for code, n in counts.items():
                    listed[(vm, code)] = n
        if listed != counted:
            problems.add(None, "the index footer's per-VM, per-reason totals differ from the blocks")


def render(data: dict, trace: str, out) -> None:
    """One line per problem, or one line saying what was verified."""
    for p in data["problems"]:
        where = "" if p["offset"] is None else f"offset {p['offset']}: "
        out.write(f"{trace}: {where}{p['reason']}\n")
    if data["more_problems"]:
        out.write(f"{trace}: … and {data['more_problems']} more problems\n")
    checked = data["checked"]
    if data["ok"]:
        state = "closed cleanly" if checked["closed_cleanly"] else "no index footer (the recorder did not finish)"
        out.write(f"{trace}: ok: {checked['blocks']} blocks, {checked['events']} events in {checked['streams']} "
                  f"streams; checksums, schema and sequence numbers verified; {state}\n")
    if checked["gaps"]:  # not a problem of the file, but events the trace does not hold
        out.write(f"{trace}: {gap_line(checked['gaps'])}\n")


def run(
    trace: str = c.TRACE_ARG,
    as_json: bool = typer.Option(False, "--json", help="One JSON document instead of lines."),
) -> None:
    """Check every block's checksum, the schema and sequence continuity; exit 1 on any problem."""
    data = c.or_exit(verify, trace)
    if as_json:
        c.dump_json(data)
    else:
        render(data, trace, sys.stdout)
    raise typer.Exit(0 if data["ok"] else c.EXIT_PROBLEMS)
