"""The index footer of a long trace (issue 11, R6): the writer lists every block it wrote, its
predecessors' too, while holding at most one buffer of entries in memory; the rest waits in an
unnamed spill file beside the trace, which goes when the writer closes."""

from __future__ import annotations

import os

from tracetool import schema
from tracetool.trace import BlockType, TraceReader, TraceWriter
from tracetool.trace.block_index import BUFFER_ENTRIES

RUN = {"run_id": "test-run"}
BLOCKS = 3 * BUFFER_ENTRIES + 5  # three spills and a partial buffer


def _gap(epoch: int) -> dict:
    return {"vm": 1, "vcpu": 0, "epoch": epoch, "first_missing": 0, "count": 1, "cause": "test", "count_known": True}


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _assert_footer_lists_every_block(path, blocks: int) -> None:
    with TraceReader(path) as r:
        assert r.closed_cleanly and not r.warnings
        listed = r.footer["blocks"]
        assert len(listed["offset"]) == blocks
        # The reader holds the footer against the blocks it scanned (offsets and types), so
        # closed_cleanly above means they agree; the ids come through too.
        assert listed["epoch"].tolist() == list(range(blocks))
        assert set(listed["type"].tolist()) == {BlockType.GAP}


def test_a_long_traces_footer_lists_every_block_from_a_writer_holding_one_buffer(tmp_path):
    path = tmp_path / "t.vmtrace"
    fds = _open_fds()
    with TraceWriter(path, RUN) as w:
        held = 0
        for epoch in range(BLOCKS):
            w.write_record(schema.MSG_GAP, _gap(epoch))
            held = max(held, w.statistics()["index_entries_in_memory"])
        assert 0 < held < BUFFER_ENTRIES  # never more than one buffer
        assert _open_fds() == fds + 2  # the trace and the spill file, however many blocks
    assert _open_fds() == fds
    assert os.listdir(tmp_path) == ["t.vmtrace"]  # the spill file had no name and is gone
    _assert_footer_lists_every_block(path, BLOCKS)


def test_a_writer_continuing_a_long_trace_lists_its_predecessors_blocks_and_its_own(tmp_path):
    path = tmp_path / "t.vmtrace"
    first = BUFFER_ENTRIES + 7
    with TraceWriter(path, RUN) as w:
        for epoch in range(first):
            w.write_record(schema.MSG_GAP, _gap(epoch))
    with TraceWriter(path, resume=True) as w:  # a clean close's footer is cut and written anew
        for epoch in range(first, BLOCKS):
            w.write_record(schema.MSG_GAP, _gap(epoch))
    _assert_footer_lists_every_block(path, BLOCKS)
