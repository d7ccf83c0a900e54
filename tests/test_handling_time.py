"""Handling time is derived in one place (tracetool/handling.py) and every command agrees.

handle[i] = (t_exit[i+1] - guest_ns[i+1]) - t_exit[i] within a stream, known only where event
i+1 is the next sequence number; a block's last event gets its value from the stream's next
block. The trace here interleaves two streams in small blocks and drops events at and inside
block boundaries, so every stitching case is exercised.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from test_trace_file import RUN, seed_like_columns
from tracetool import analysis, handling, schema
from tracetool.commands.plot import plot_data
from tracetool.commands.summary import summarize
from tracetool.commands.verify import verify
from tracetool.trace import TraceReader, TraceWriter

TRACETOOL = Path(__file__).resolve().parent.parent / "tracetool"
BLOCK = 40


@pytest.fixture(scope="module")
def stitched(tmp_path_factory):
    """Two vCPUs of one VM written block by block in turn; vCPU 1 lost seq 39..41 (across the
    first block boundary) and every 13th event; returns the path and, per stream, the expected
    handling time of each written event (None: unknown)."""
    path = tmp_path_factory.mktemp("handling") / "stitched.vmtrace"
    rng = np.random.default_rng(11)
    expected = {}
    streams = {}
    for vcpu in (0, 1):
        cols = seed_like_columns(400, rng, t0=10**12 + 777 * vcpu)
        seq = np.arange(400, dtype=np.uint64)
        keep = np.ones(400, bool)
        if vcpu == 1:
            keep[39:42] = False
            keep[seq % 13 == 5] = False
        entry = cols["t_exit"] - cols["guest_ns"]
        handle = [int(entry[i + 1] - cols["t_exit"][i]) if i + 1 < 400 and keep[i + 1] else None
                  for i in range(400)]
        expected[(0, vcpu, 0)] = {int(s): h for s, h, k in zip(seq, handle, keep) if k}
        streams[vcpu] = (cols, seq, keep)
    with TraceWriter(path, RUN, block_events=BLOCK) as w:
        w.write_record(schema.MSG_VM_START, {"vm": 0, "epoch": 0, "name": "stitch", "t": 10**12})
        for start in range(0, 400, BLOCK):
            for vcpu in (0, 1):
                cols, seq, keep = streams[vcpu]
                sl = slice(start, start + BLOCK)
                part = {k: v[sl][keep[sl]] for k, v in cols.items()}
                w.write_exits(0, vcpu, 0, start, BLOCK, part, seq=seq[sl][keep[sl]])
    return path, expected


def test_events_in_time_order_carry_each_events_handling_time(stitched):
    path, expected = stitched
    got = {}
    with TraceReader(path) as reader:
        for chunk in analysis.events_in_time_order(reader):
            for vcpu, seq, h in zip(chunk["vcpu"].tolist(), chunk[schema.SEQ_COLUMN[0]].tolist(),
                                    chunk["handle_ns"].tolist()):
                got.setdefault((0, vcpu, 0), {})[seq] = None if h == handling.NO_HANDLE else h
    assert got == expected


def test_summary_plot_and_verify_see_the_same_handling_times(stitched):
    path, expected = stitched
    known = [h for stream in expected.values() for h in stream.values() if h is not None]
    with TraceReader(path) as reader:
        summary = summarize(reader, by="vm")
        plotted = plot_data(reader)
    (group,) = summary["groups"]
    assert group["handle"]["count"] == len(known) and group["handle"]["total_ns"] == sum(known)
    assert group["handle"]["min_ns"] == min(known) and group["handle"]["max_ns"] == max(known)
    assert int(plotted["handle_counts"].sum()) == len(known)
    assert verify(path)["ok"]


def test_the_stitcher_gives_a_blocks_last_value_with_the_streams_next_block(stitched):
    path, expected = stitched
    stitcher = handling.Stitcher()
    pending: dict[tuple, int] = {}
    got: dict[tuple, dict[int, int | None]] = {}
    with TraceReader(path) as reader:
        for batch in reader.exit_batches():
            stream = (batch.vm, batch.vcpu, batch.epoch)
            seq = batch.columns[schema.SEQ_COLUMN[0]].tolist()
            block = stitcher.block(batch)
            if stream in pending:
                got[stream][pending.pop(stream)] = block.previous
            values = block.full().tolist()
            got.setdefault(stream, {}).update(
                {s: None if h == handling.NO_HANDLE else h for s, h in zip(seq[:-1], values[:-1])})
            pending[stream] = seq[-1]
    for stream, last in pending.items():
        got[stream][last] = None
    assert got == expected


def test_no_module_but_handling_computes_handling_time():
    """The formula's two shapes — within a block (x[1:] - y[1:]) and across blocks (the next
    block's first t_exit and guest_ns) — appear nowhere else in tracetool."""
    within = re.compile(r"\[1:\]\s*-\s*[\w\"'\[\]]*\[1:\]")
    across = re.compile(r"""(guest_ns["']\]\[0\]|\bint\(g\[0\]\))""")
    offenders = [f"{p.relative_to(TRACETOOL)}:{n}" for p in sorted(TRACETOOL.rglob("*.py")) if p.name != "handling.py"
                 for n, line in enumerate(p.read_text().splitlines(), 1) if within.search(line) or across.search(line)]
    assert offenders == []


class _Collect:
    """The batcher's publisher: keeps what it sends, decoded as the recorder decodes it."""

    def __init__(self) -> None:
        self.batches = []

    def send(self, msg: dict) -> None:
        from tracetool import messages
        self.batches.append(messages.ExitBatch.from_msg(msg))


def test_a_record_time_filter_keeps_each_kept_exits_handling_time_across_batches(tmp_path):
    """Kept exits whose next exit the filter drops (also across a flush) keep their handling time,
    through the bus, the trace file and every command's handling.py."""
    from tracetool.filters import parse_filter
    from vmworker.event_batch import ROW, EventBatcher

    sink = _Collect()
    batcher = EventBatcher(sink, 0, 0, 0, record_filter=parse_filter("port=0x3f8"))
    ports = [[0x10, 0x3F8, 0x3F8], [0x10, 0x3F8, 0x10], [0x3F8, 0x10]]  # kept rows end batch 1 and start batch 3
    i = 0
    want = {}
    for k, batch in enumerate(ports):
        pos = 0
        for port in batch:
            t = 1_000_000 + i * 10_000
            ROW.pack_into(batcher.rows, pos, t, 7_000 + i, port, bytes(8), 1, schema.REASON_IO, 1, 1, 0x7C00)
            want[i] = t
            pos, i = pos + ROW.size, i + 1
        batcher.flush(pos, final=k == len(ports) - 1)
    entry = {j: want[j] - (7_000 + j) for j in want}  # t_exit - guest_ns: when KVM_RUN was entered
    expected = {j: entry[j + 1] - want[j] for j in want if j + 1 in want}
    path = tmp_path / "f.vmtrace"
    with TraceWriter(path, RUN, block_events=2) as w:
        for b in sink.batches:
            cols = {n: b.cols[n] for n in (*schema.COLUMN_NAMES, schema.HANDLE_COLUMN.name)}
            w.write_exits(b.vm, b.vcpu, b.epoch, b.first_seq, b.count, cols, seq=b.cols["seq"])
    with TraceReader(path) as r:
        got = {s: h for chunk in analysis.events_in_time_order(r, None)
               for s, h in zip(chunk["seq"].tolist(), chunk["handle_ns"].tolist())}
        assert got == {j: expected[j] for j in (1, 2, 4, 6)}
        total = summarize(r)["handle_total_ns"]
        assert plot_data(r)["handle_counts"].sum() == 4
    assert total == sum(expected[j] for j in (1, 2, 4, 6))
    assert sum(b.count for b in sink.batches) == batcher.next_seq == 8
