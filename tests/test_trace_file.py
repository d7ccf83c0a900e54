"""Trace files: exact round trips, self-description, crash and corruption behaviour, bounds.

Traces are built with TraceWriter from synthetic but seed-like batches (seed_like_columns): the
timing distributions follow exits of the seed guest measured on this PVM host (guest time and
handling time skewed to the right, rare long outliers), the data counts up by one.
"""

from __future__ import annotations

import json
import os
import select
import signal
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
import zlib
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zstandard

from tracetool import schema
from tracetool.filters import parse_filter
from tracetool.trace import (BLOCK_MAGIC, MAGIC, TRAILER_MAGIC, BlockType, TraceFormatError, TraceReader,
                                  TraceWriteError, TraceWriter)

REPO = Path(__file__).resolve().parent.parent
RUN = {"run_id": "test-run", "argv": ["vmsup", "run", "seed16"], "host": "testhost", "start_ns": 1}
BLOCK_HEAD = struct.Struct("<4sIII")
TRAILER = struct.Struct("<Q8s")


def seed_like_columns(n: int, rng: np.random.Generator, *, t0: int = 10**12, first: int = 0) -> dict[str, np.ndarray]:
    """n exits of the seed guest (`out %ax, $0x10; inc %ax`): port 0x10, size 2, data counting up.

    Timings follow a capture of the real seed guest on this PVM host: CLOCK_MONOTONIC advances
    in 10 ns ticks, so a duration is whole ticks plus a reading offset of a few ns; guest and
    handling times are skewed right with a long tail (preemption). Here guest ~5 µs and handling
    ~4.5 µs (the host measured 8.9 and 0.9): a step of ~9.5 µs per exit.
    """
    def ticks(base: int, shape: float, scale: float, tail: float, tail_scale: float) -> np.ndarray:
        k = base + np.round(rng.gamma(shape, scale, n))
        rare = rng.random(n) < tail
        k[rare] += np.round(rng.exponential(tail_scale, rare.sum()))
        return k.astype(np.int64) * 10

    guest = ticks(478, 4, 6, 0.02, 60) + 3 + (rng.random(n) < 0.19)
    handle = ticks(445, 3, 2, 0.015, 20) + 1 + (rng.random(n) < 0.36)
    step = guest.copy()
    step[1:] += handle[:-1]
    t_exit = t0 + np.cumsum(step)
    return {
        "t_exit": t_exit, "guest_ns": guest,
        "addr": np.full(n, 0x10, np.uint64),
        "data": ((first + np.arange(n)) & 0xFFFF).astype(np.uint64),
        "count": np.ones(n, np.uint32), "reason": np.full(n, schema.REASON_IO, np.uint8),
        "size": np.full(n, 2, np.uint8), "flags": np.full(n, schema.FLAG_WRITE, np.uint8),
    }


def write_seed_stream(w: TraceWriter, vm: int, vcpu: int, n: int, rng, *, batch: int = 256, epoch: int = 0,
                      first_seq: int = 0, t0: int = 10**12) -> dict[str, np.ndarray]:
    cols = seed_like_columns(n, rng, t0=t0, first=first_seq)
    for i in range(0, n, batch):
        part = {k: v[i:i + batch] for k, v in cols.items()}
        w.write_exits(vm, vcpu, epoch, first_seq + i, len(part["t_exit"]), part)
    return cols


def random_columns(n: int, rng) -> dict[str, np.ndarray]:
    """Every column over its whole range, extremes included: nothing may be rounded or clipped."""
    cols = {}
    for name in schema.COLUMN_NAMES:
        dtype = schema.COLUMN_DTYPES[name]
        info = np.iinfo(dtype)
        col = rng.integers(info.min, info.max, n, dtype=dtype, endpoint=True)
        col[:2] = (info.min, info.max)
        cols[name] = col
    return cols


def block_offsets(path) -> list[tuple[int, int, int]]:
    """(offset, type, payload length) of every block, walked from the header on."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack_from("<I", raw, 10)  # after the magic and the u16 format version
    pos, out = 14 + n + 4, []
    while pos + BLOCK_HEAD.size <= len(raw) and raw[pos:pos + 4] == BLOCK_MAGIC:
        _, btype, length, _ = BLOCK_HEAD.unpack_from(raw, pos)
        out.append((pos, btype, length))
        pos += BLOCK_HEAD.size + length
    return out


def frame_block(btype: int, payload: bytes) -> bytes:
    """A block as the format defines it: the crc covers type, length and payload."""
    crc = zlib.crc32(payload, zlib.crc32(struct.pack("<II", btype, len(payload))))
    return BLOCK_HEAD.pack(BLOCK_MAGIC, btype, len(payload), crc) + payload


def cut_footer(path) -> int:
    """Drop the index footer and trailer, as if the recorder had been killed after its last flush."""
    raw = Path(path).read_bytes()
    index_at, magic = TRAILER.unpack_from(raw, len(raw) - TRAILER.size)
    assert magic == TRAILER_MAGIC
    os.truncate(path, index_at)
    return index_at


def assert_columns_equal(got: dict, want: dict) -> None:
    for name, col in want.items():
        assert got[name].dtype == schema.COLUMN_DTYPES.get(name, got[name].dtype), name
        np.testing.assert_array_equal(got[name], col, err_msg=name)


# --- Round trips ----------------------------------------------------------------------------------
def test_every_column_round_trips_exactly_over_its_whole_range(tmp_path):
    rng = np.random.default_rng(1)
    cols = random_columns(5000, rng)
    path = tmp_path / "t.vmtrace"
    with TraceWriter(path, RUN, block_events=2048) as w:
        for i in range(0, 5000, 1000):
            w.write_exits(0, 0, 0, i, 1000, {k: v[i:i + 1000] for k, v in cols.items()})
    with TraceReader(path) as r:
        got = r.exits()
        assert [b.n_rows for b in r.exit_blocks()] == [3000, 2000]  # batches merge until block_events is reached
        assert r.header["run"] == RUN and r.header["schema"] == schema.schema_description()
        assert isinstance(r.header["created"], int)
    assert_columns_equal(got, cols)
    np.testing.assert_array_equal(got["seq"], np.arange(5000))


def test_columns_given_as_bus_bytes_round_trip(tmp_path):
    rows = struct.Struct(schema.ROW_STRUCT_FORMAT)
    packed = b"".join(rows.pack(1000 + 10 * i, 5, 0x10, i.to_bytes(8, "little"), 1, schema.REASON_IO, 2, 1, 0x10004)
                      for i in range(100))
    path = tmp_path / "t.vmtrace"
    with TraceWriter(path, RUN) as w:
        w.write_exits(3, 1, 2, 0, 100, schema.columns_from_rows(packed, 100))
    with TraceReader(path) as r:
        got = r.exits()
    np.testing.assert_array_equal(got["data"], np.arange(100))
    np.testing.assert_array_equal(got["t_exit"], 1000 + 10 * np.arange(100))
    assert set(got["rip"].tolist()) == {0x10004}
    assert set(got["vm"]) == {3} and set(got["vcpu"]) == {1} and set(got["epoch"]) == {2}


def test_interleaved_streams_are_kept_apart_and_selectable(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "t.vmtrace"
    want = {}
    with TraceWriter(path, RUN, block_events=1024) as w:
        parts = {(vm, vcpu): seed_like_columns(3000, rng, t0=10**12 + 777 * vm + 5 * vcpu)
                 for vm in (0, 1) for vcpu in (0, 1)}
        for i in range(0, 3000, 200):  # batches of four streams arrive interleaved
            for (vm, vcpu), cols in parts.items():
                w.write_exits(vm, vcpu, 0, i, 200, {k: v[i:i + 200] for k, v in cols.items()})
        want = parts
    with TraceReader(path) as r:
        assert [(s.vm, s.vcpu, s.events, s.first_seq, s.last_seq) for s in r.streams()] == [
            (vm, vcpu, 3000, 0, 2999) for vm in (0, 1) for vcpu in (0, 1)]
        for (vm, vcpu), cols in want.items():
            got = r.exits(vm=vm, vcpu=vcpu)
            assert_columns_equal(got, cols)
            np.testing.assert_array_equal(got["seq"], np.arange(3000))
        everything = r.exits()
        assert len(everything["t_exit"]) == 12000
        vm1 = r.exits(where=parse_filter("vm=1,vcpu=0"))
        np.testing.assert_array_equal(vm1["t_exit"], want[(1, 0)]["t_exit"])
        assert r.unexplained_gaps == []


def test_filtered_batches_keep_their_seq_and_account_for_dropped_events(tmp_path):
    rng = np.random.default_rng(3)
    cols = seed_like_columns(1000, rng)
    cols["reason"][::3] = schema.REASON_HLT
    path = tmp_path / "t.vmtrace"
    kept_seq = []
    with TraceWriter(path, RUN) as w:
        for i in range(0, 1000, 100):
            part = {k: v[i:i + 100] for k, v in cols.items()}
            keep = parse_filter("reason=hlt").mask(part)
            seq = np.arange(i, i + 100, dtype=np.uint64)[keep]
            kept_seq.append(seq)
            w.write_exits(0, 0, 0, i, 100, {k: v[keep] for k, v in part.items()}, seq=seq)
        # A batch whose events were all filtered out still accounts for its sequence numbers,
        # and an unfiltered batch may follow a filtered one in the same block.
        w.write_exits(0, 0, 0, 1000, 50, {k: v[:0] for k, v in cols.items()}, seq=np.empty(0, np.uint64))
        tail = seed_like_columns(10, rng, first=1050)
        w.write_exits(0, 0, 0, 1050, 10, tail)
    with TraceReader(path) as r:
        got = r.exits()
        (stream,) = r.streams()
        assert (stream.events, stream.covered, stream.last_seq) == (334 + 10, 1060, 1059)
        assert r.unexplained_gaps == []
    want_seq = np.concatenate(kept_seq + [np.arange(1050, 1060)])
    np.testing.assert_array_equal(got["seq"], want_seq)
    np.testing.assert_array_equal(got["t_exit"], np.concatenate([cols["t_exit"][::3], tail["t_exit"]]))
    assert set(got["reason"][:-10]) == {schema.REASON_HLT}


def test_string_io_payloads_come_back_by_sequence_number(tmp_path):
    rng = np.random.default_rng(4)
    cols = seed_like_columns(20, rng)
    cols["count"][[3, 7]] = (5, 3)
    path = tmp_path / "t.vmtrace"
    with TraceWriter(path, RUN) as w:
        w.write_exits(0, 0, 0, 0, 10, {k: v[:10] for k, v in cols.items()}, payloads={3: b"hello", 7: b"abc"})
        w.write_exits(0, 0, 0, 10, 10, {k: v[10:] for k, v in cols.items()}, payloads=[(0, b"\x00\xff")])
    with TraceReader(path) as r:
        assert r.payloads() == {(0, 0, 0, 3): b"hello", (0, 0, 0, 7): b"abc", (0, 0, 0, 10): b"\x00\xff"}
        (block,) = [b for b in r.blocks() if b.kind == schema.MSG_EXITS]
        assert block.batch.payloads == {3: b"hello", 7: b"abc", 10: b"\x00\xff"}


def test_records_come_back_in_file_order_between_exit_blocks(tmp_path):
    rng = np.random.default_rng(5)
    start = {"v": 1, "type": schema.MSG_VM_START, "vm": 0, "epoch": 0, "name": "seed16", "spec": {"mem": 16 << 20},
             "sha256": "ab" * 32, "vcpus": 1, "t": 5}
    gap = {"v": 1, "type": schema.MSG_GAP, "vm": 0, "vcpu": 0, "epoch": 0, "first_missing": 256, "count": 256,
           "cause": "recorder queue full"}
    end = {"v": 1, "type": schema.MSG_VM_END, "vm": 0, "epoch": 0, "status": "halted", "final_seq": {0: 768}, "t": 9}
    path = tmp_path / "t.vmtrace"
    with TraceWriter(path, RUN) as w:
        w.write_record(schema.MSG_VM_START, start)
        cols = seed_like_columns(768, rng)
        w.write_exits(0, 0, 0, 0, 256, {k: v[:256] for k, v in cols.items()})
        w.write_record(schema.MSG_GAP, gap)
        w.write_exits(0, 0, 0, 512, 256, {k: v[512:] for k, v in cols.items()})
        w.write_record(schema.MSG_VM_END, end)
    with TraceReader(path) as r:
        kinds = [b.kind for b in r.blocks()]
        assert kinds == ["vm-start", "exits", "gap", "exits", "vm-end", "index"]
        assert r.records() == [start, gap, end]
        assert r.records(schema.MSG_VM_END) == [end] and r.gaps == [gap]
        assert r.unexplained_gaps == []  # the gap record explains the hole


def test_index_footer_lists_every_block_and_totals(tmp_path):
    rng = np.random.default_rng(6)
    path = tmp_path / "t.vmtrace"
    with TraceWriter(path, RUN, block_events=500) as w:
        write_seed_stream(w, 0, 0, 1200, rng)
        write_seed_stream(w, 2, 0, 300, rng)
        w.write_record(schema.MSG_GAP, {"vm": 2, "vcpu": 0, "epoch": 0, "first_missing": 300, "count": 1})
    with TraceReader(path) as r:
        assert r.closed_cleanly and r.torn_tail is None
        footer = r.footer
        assert footer["events"] == 1500
        assert footer["by_vm"] == {0: {schema.REASON_IO: 1200}, 2: {schema.REASON_IO: 300}}
        blocks = footer["blocks"]  # numpy columns
        listed = list(zip(blocks["offset"].tolist(), blocks["type"].tolist()))
        assert listed == [(o, t) for o, t, _ in block_offsets(path) if t != BlockType.INDEX]
        assert blocks["vm"].tolist() == [0, 0, 0, 2, 2]
        assert blocks["first_seq"].tolist()[:4] == [0, 512, 1024, 0]
        assert blocks["n_rows"].tolist()[:4] == [512, 512, 176, 300]


def test_a_file_without_footer_reads_the_same(tmp_path):
    rng = np.random.default_rng(7)
    path = tmp_path / "t.vmtrace"
    with TraceWriter(path, RUN, block_events=500) as w:
        cols = write_seed_stream(w, 0, 0, 1700, rng)
    cut_footer(path)
    with TraceReader(path) as r:
        assert not r.closed_cleanly and r.footer is None and r.torn_tail is None
        assert_columns_equal(r.exits(), cols)


# --- Crashes, torn tails, corruption --------------------------------------------------------------
def _small_trace(tmp_path, *, close: bool = True) -> tuple[Path, dict]:
    rng = np.random.default_rng(8)
    path = tmp_path / "t.vmtrace"
    w = TraceWriter(path, RUN, block_events=100)
    cols = write_seed_stream(w, 0, 0, 330, rng, batch=110)  # blocks of 110, 110, 110 rows
    w.flush()
    w.write_exits(0, 0, 0, 330, 12, seed_like_columns(12, rng, t0=2 * 10**12, first=330))  # a small last block
    if close:
        w.close()
    else:
        w.flush()
        os.close(w._fd)  # noqa: SLF001 — leave without a footer, like a killed recorder
    return path, cols


def test_a_file_cut_at_every_offset_reads_up_to_the_last_whole_block(tmp_path):
    path, cols = _small_trace(tmp_path)
    raw = path.read_bytes()
    blocks = block_offsets(path)
    last_exits, index = blocks[-2][0], blocks[-1][0]
    assert blocks[-1][1] == BlockType.INDEX
    cut = tmp_path / "cut.vmtrace"
    for end in range(last_exits, len(raw)):
        cut.write_bytes(raw[:end])
        with TraceReader(cut) as r:
            if end == last_exits:
                assert r.torn_tail is None
            elif end < index:
                assert r.torn_tail is not None and r.torn_tail[0] == last_exits, end
            elif end > index:
                assert r.torn_tail is not None and r.torn_tail[0] in (index, len(raw) - TRAILER.size), end
            assert not r.closed_cleanly
            assert r.event_count == (342 if end >= index else 330), end
            if end in (last_exits + 1, index - 1, len(raw) - 1):  # decoding is the same at every cut
                np.testing.assert_array_equal(r.exits()["t_exit"][:330], cols["t_exit"])


def test_a_zero_filled_tail_is_torn_not_corrupt(tmp_path):
    path, cols = _small_trace(tmp_path, close=False)
    size = path.stat().st_size
    with open(path, "ab") as f:
        f.write(bytes(4096))  # what some file systems leave after a crash during an append
    with TraceReader(path) as r:
        assert r.torn_tail == (size, "zero-filled tail")
        assert len(r.exits()["t_exit"]) == 342


def test_a_flipped_byte_in_a_middle_block_is_corruption_at_that_offset(tmp_path):
    path, cols = _small_trace(tmp_path)
    raw = path.read_bytes()
    offset, _, length = block_offsets(path)[1]
    bad = tmp_path / "bad.vmtrace"
    # Every field of the block header, and bytes spread over the payload.
    positions = list(range(offset, offset + 16)) + list(range(offset + 16, offset + 16 + length, max(1, length // 40)))
    for pos in positions:
        flipped = bytearray(raw)
        flipped[pos] ^= 0x40
        bad.write_bytes(bytes(flipped))
        with pytest.raises(TraceFormatError) as info:
            TraceReader(bad).close()
        assert info.value.offset == offset, (pos, str(info.value))
        assert f"at offset {offset}" in str(info.value) and "\n" not in str(info.value)

    # Skipping corruption: the blocks around it stay readable.
    flipped = bytearray(raw)
    flipped[offset + 16 + length // 2] ^= 1
    bad.write_bytes(bytes(flipped))
    with TraceReader(bad, skip_corrupt=True) as r:
        assert [o for o, _ in r.corrupt] == [offset]
        got = r.exits()
        assert len(got["t_exit"]) == 342 - 110
        np.testing.assert_array_equal(got["t_exit"][:110], cols["t_exit"][:110])
        assert [(d.first_seq, d.count, d.kind) for d in r.unexplained_gaps] == [(110, 110, "missing")]


def test_a_bad_crc_in_the_last_block_is_a_torn_tail(tmp_path):
    path, _ = _small_trace(tmp_path, close=False)
    raw = bytearray(path.read_bytes())
    last = block_offsets(path)[-1][0]
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with TraceReader(path) as r:
        assert r.torn_tail == (last, "bad crc32 in the last block")
        assert len(r.exits()["t_exit"]) == 330


def test_kill_9_of_a_writer_leaves_every_whole_block_readable(tmp_path):
    path = tmp_path / "killed.vmtrace"
    script = textwrap.dedent(f"""
        import numpy as np
        from tracetool.trace import TraceWriter
        from tracetool import schema
        w = TraceWriter({str(path)!r}, {{"run_id": "kill"}}, block_events=500)
        n, i = 500, 0
        base = np.arange(n, dtype=np.int64)
        while True:
            seq = i * n + base
            cols = {{"t_exit": 10**12 + seq * 9500, "guest_ns": 5000 + (seq * 7919) % 613,
                     "addr": np.full(n, 0x10, np.uint64), "data": seq.astype(np.uint64),
                     "count": np.ones(n, np.uint32), "reason": np.full(n, schema.REASON_IO, np.uint8),
                     "size": np.full(n, 2, np.uint8), "flags": np.ones(n, np.uint8)}}
            w.write_exits(0, 0, 0, i * n, n, cols)
            i += 1
            if i == 40:
                print("ready", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 30)
        assert ready and proc.stdout.readline() == b"ready\n"
        time.sleep(0.05)  # let it write some more, so the kill lands mid-stream
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    with TraceReader(path) as r:
        assert not r.closed_cleanly
        got = r.exits()
        n = len(got["seq"])
        assert n >= 40 * 500 and n % 500 == 0
        np.testing.assert_array_equal(got["seq"], np.arange(n))
        np.testing.assert_array_equal(got["data"], np.arange(n))
        np.testing.assert_array_equal(got["t_exit"], 10**12 + np.arange(n) * 9500)
        whole = [o for o, _, _ in block_offsets(path)]
        assert len(r.exit_blocks()) == len(whole) and r.unexplained_gaps == []
        if r.torn_tail is not None:  # a kill during write() may leave part of one block
            assert r.torn_tail[0] > whole[-1]


def test_unexplained_gaps_are_found_and_gap_records_explain_them(tmp_path):
    rng = np.random.default_rng(9)
    cols = seed_like_columns(1000, rng)
    path = tmp_path / "t.vmtrace"

    def part(a, b):
        return {k: v[a:b] for k, v in cols.items()}

    with TraceWriter(path, RUN) as w:
        w.write_exits(0, 0, 0, 100, 100, part(100, 200))  # 0..99 missing: no gap record
        w.write_exits(0, 0, 0, 300, 100, part(300, 400))  # 200..299: a gap record covers 200..249 only
        w.write_record(schema.MSG_GAP, {"vm": 0, "vcpu": 0, "epoch": 0, "first_missing": 200, "count": 50,
                                        "cause": "worker queue full"})
        w.write_exits(0, 0, 0, 350, 100, part(350, 450))  # overlaps 350..399
        w.write_exits(0, 1, 0, 0, 100, part(0, 100))  # another vCPU, complete up to vm-end's count
        # final_seq as the worker sends it: the next sequence number of each vCPU, by index
        w.write_record(schema.MSG_VM_END, {"vm": 0, "epoch": 0, "status": "halted", "final_seq": [500, 100]})
    offsets = [o for o, t, _ in block_offsets(path)]
    with TraceReader(path) as r:
        found = [(d.vm, d.vcpu, d.epoch, d.first_seq, d.count, d.kind) for d in r.unexplained_gaps]
        assert found == [(0, 0, 0, 0, 100, "missing"), (0, 0, 0, 250, 50, "missing"),
                         (0, 0, 0, 350, 50, "overlap"), (0, 0, 0, 450, 50, "missing")]
        assert r.unexplained_gaps[0].offset == offsets[0]
        assert r.unexplained_gaps[-1].offset == offsets[-2]  # the vm-end record


def test_disk_full_raises_a_clear_error_and_leaves_the_file_readable(tmp_path):
    # No tmpfs here (mounting needs privileges CI lacks): a file size limit makes write() fail
    # with EFBIG part-way through a block, which the writer treats like ENOSPC.
    path = tmp_path / "full.vmtrace"
    limit = 300_000
    script = textwrap.dedent(f"""
        import json, resource, signal
        import numpy as np
        from tracetool.trace import TraceWriter, TraceWriteError
        from tracetool import schema
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills us at the limit
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        rng = np.random.default_rng(0)
        w = TraceWriter({str(path)!r}, {{"run_id": "full"}}, block_events=1000)
        n, result = 1000, {{}}
        try:
            for i in range(1000):
                cols = {{name: rng.integers(0, 2**31, n).astype(schema.COLUMN_DTYPES[name])
                         for name in schema.COLUMN_NAMES}}  # incompressible, so the file grows
                w.write_exits(0, 0, 0, i * n, n, cols)
        except TraceWriteError as e:
            result = {{"error": str(e), "errno": e.errno, "offset": e.offset, "events": w.events}}
        try:
            w.write_exits(0, 0, 0, 10**9, n, cols)
        except TraceWriteError as e:
            result["again"] = str(e)
        w.close()
        print(json.dumps(result))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=60, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["errno"] == 27  # EFBIG
    assert "file size limit reached" in result["error"] and f"readable up to offset {result['offset']}" in result["error"]
    assert "earlier write failed" in result["again"]
    assert path.stat().st_size == result["offset"] <= limit
    with TraceReader(path) as r:
        assert r.torn_tail is None and not r.closed_cleanly
        assert r.event_count == result["events"] > 0


# --- Bad and hostile files ------------------------------------------------------------------------
def _header_bytes(version: int = 1, schema_version: int = schema.SCHEMA_VERSION) -> bytes:
    description = dict(schema.schema_description(), version=schema_version)
    compressed = zstandard.ZstdCompressor().compress(msgpack.packb({"schema": description, "run": {}, "created": 0}))
    return MAGIC + struct.pack("<HI", version, len(compressed)) + compressed + struct.pack("<I", zlib.crc32(compressed))


@pytest.mark.parametrize("content, words", [
    (b"", "empty file"),
    (b"ELF\x7f not a trace at all", "bad magic"),
    (b"VMSUP", "truncated file header"),
    (_header_bytes()[:30], "truncated file header"),
    (_header_bytes(version=7), "written by a newer vmsup (format 7)"),
    (_header_bytes(schema_version=9), "newer vmsup (event schema 9)"),
    (MAGIC + struct.pack("<HI", 1, 0xFFFFFFFF), "over the limit"),
])
def test_files_that_are_not_readable_traces_fail_with_one_line(tmp_path, content, words):
    path = tmp_path / "bad.vmtrace"
    path.write_bytes(content)
    with pytest.raises(TraceFormatError) as info:
        TraceReader(path)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_a_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(TraceFormatError, match="no such file"):
        TraceReader(tmp_path / "nope.vmtrace")


def test_hostile_lengths_do_not_allocate(tmp_path):
    path = tmp_path / "hostile.vmtrace"
    header = _header_bytes()
    cases = {
        "huge length": header + BLOCK_HEAD.pack(BLOCK_MAGIC, BlockType.EXITS, 0xFFFFFFF0, 0) + b"x" * 100,
        "length just under the limit, file short": header + BLOCK_HEAD.pack(
            BLOCK_MAGIC, BlockType.EXITS, schema.MAX_MESSAGE_BYTES - 1, 0) + b"x" * 100,
        "zstd bomb record": header + frame_block(BlockType.GAP, zstandard.ZstdCompressor().compress(bytes(60 << 20))),
        "huge exits head": header + frame_block(BlockType.EXITS, struct.pack("<I", 0xFFFFFF00) + b"\x80"),
        "exits head claiming a huge body": header + frame_block(BlockType.EXITS, _exits_payload_with_body(
            tmp_path, zstandard.ZstdCompressor().compress(bytes(60 << 20)))),
    }
    for name, content in cases.items():
        path.write_bytes(content)
        tracemalloc.start()
        try:
            try:
                with TraceReader(path) as r:
                    r.exits()
                    outcome = r.torn_tail
            except TraceFormatError as e:
                outcome = str(e)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert outcome is not None, name
        assert peak < 8 << 20, (name, peak, outcome)


def _exits_payload_with_body(tmp_path, body: bytes) -> bytes:
    """A well-formed EXITS head for 1000 rows followed by `body` instead of its columns."""
    path = tmp_path / "donor.vmtrace"
    with TraceWriter(path, RUN) as w:
        w.write_exits(0, 0, 0, 0, 1000, seed_like_columns(1000, np.random.default_rng(0)))
    offset, _, length = block_offsets(path)[0]
    payload = path.read_bytes()[offset + 16:offset + 16 + length]
    (n,) = struct.unpack_from("<I", payload)
    return payload[:4 + n] + body


def test_many_small_records_that_decompress_hugely_are_refused(tmp_path):
    # Each gap record is ~100 bytes on disk and 1 MiB in memory: a budget on retained records
    # turns a few kilobytes of hostile file into a clear error instead of gigabytes of maps.
    cctx = zstandard.ZstdCompressor()
    record = cctx.compress(msgpack.packb({"vm": 0, "vcpu": 0, "epoch": 0, "first_missing": 0, "count": 1,
                                          "cause": "x" * ((1 << 20) - 100)}))
    path = tmp_path / "records.vmtrace"
    path.write_bytes(_header_bytes() + frame_block(BlockType.GAP, record) * 100)
    assert path.stat().st_size < 20_000
    tracemalloc.start()
    try:
        with pytest.raises(TraceFormatError, match="records add up to more than 64 MiB"):
            TraceReader(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 200 << 20


def test_unknown_block_types_are_skipped_with_a_warning(tmp_path):
    path, cols = _small_trace(tmp_path, close=False)
    with open(path, "ab") as f:
        f.write(frame_block(99, b"from a future vmsup"))
    with TraceReader(path) as r:
        assert r.unknown_blocks == 1 and "unknown type 99" in r.warnings[0]
        assert r.torn_tail is None and len(r.exits()["t_exit"]) == 342
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1  # an unknown block's crc is still checked
    path.write_bytes(bytes(raw))
    with TraceReader(path) as r:
        assert r.torn_tail is not None and r.unknown_blocks == 0


# --- Writer contract ------------------------------------------------------------------------------
def test_writer_rejects_batches_that_break_the_schema(tmp_path):
    rng = np.random.default_rng(10)
    cols = seed_like_columns(10, rng)
    with TraceWriter(tmp_path / "t.vmtrace", RUN) as w:
        with pytest.raises(ValueError, match="missing"):
            w.write_exits(0, 0, 0, 0, 10, {k: v for k, v in cols.items() if k != "data"})
        with pytest.raises(ValueError, match="differ in length"):
            w.write_exits(0, 0, 0, 0, 10, dict(cols, data=cols["data"][:5]))
        with pytest.raises(ValueError, match="pass `seq`"):
            w.write_exits(0, 0, 0, 0, 11, cols)
        with pytest.raises(ValueError, match="seq must increase"):
            w.write_exits(0, 0, 0, 0, 10, cols, seq=np.arange(10)[::-1])
        with pytest.raises(ValueError, match="seq must increase"):
            w.write_exits(0, 0, 0, 5, 20, cols, seq=np.arange(10))
        with pytest.raises(ValueError, match="vm must be"):
            w.write_exits(-1, 0, 0, 0, 10, cols)
        with pytest.raises(ValueError, match="gap record needs"):
            w.write_record(schema.MSG_GAP, {"vm": 0})
        with pytest.raises(ValueError, match="unknown record kind"):
            w.write_record("exits", {})
        w.write_exits(0, 0, 0, 0, 10, cols)  # the writer is still usable
    with TraceReader(tmp_path / "t.vmtrace") as r:
        assert r.event_count == 10


def test_writer_does_not_overwrite_an_existing_file(tmp_path):
    path = tmp_path / "t.vmtrace"
    path.write_bytes(b"precious")
    with pytest.raises(TraceWriteError, match="cannot create"):
        TraceWriter(path, RUN)
    assert path.read_bytes() == b"precious"


# --- Size -----------------------------------------------------------------------------------------
def test_bytes_per_event_of_a_million_seed_like_events(tmp_path):
    rng = np.random.default_rng(11)
    path = tmp_path / "million.vmtrace"
    started = time.perf_counter()
    with TraceWriter(path, RUN) as w:
        cols = write_seed_stream(w, 0, 0, 1_000_000, rng, batch=4096)
    written = time.perf_counter()
    with TraceReader(path) as r:
        got = r.exits()
        encodings = next(b.batch.encodings for b in r.blocks() if b.batch is not None)
    read = time.perf_counter()
    assert_columns_equal(got, cols)
    per_event = path.stat().st_size / 1_000_000
    print(f"\n1M seed-like events: {per_event:.3f} bytes/event, write {written - started:.2f} s, "
          f"read {read - written:.2f} s; encodings: "
          + ", ".join(f"{e['name']}={e['enc']}{'-' + e['ref'] if e.get('ref') else ''}/u{8 * e['width']}"
                      for e in encodings))
    assert per_event < 4  # a regression guard, far above the ~1.6 measured


def test_a_writer_that_continues_a_killed_writers_file_closes_it_with_an_index_over_every_block(tmp_path):
    # Issue 11.3: a restarted recorder finishes the file; its footer lists its predecessors' blocks.
    from tracetool.analysis import events_by_vm_and_reason
    path, _ = _small_trace(tmp_path, close=False)
    w = TraceWriter(path, resume=True)
    assert w.resumed_seq == {(0, 0, 0): 342}
    w.write_record(schema.MSG_GAP, {"vm": 0, "vcpu": 0, "epoch": 0, "first_missing": 342, "count": 8,
                                    "cause": "lost before reaching the recorder", "count_known": True})
    w.write_exits(1, 0, 0, 0, 50, seed_like_columns(50, np.random.default_rng(1), t0=3 * 10**12, first=0))
    w.close()
    with TraceReader(path) as r:
        assert r.closed_cleanly and r.torn_tail is None and not r.warnings
        assert r.footer["events"] == r.event_count == 342 + 50
        assert len(r.footer["blocks"]["offset"]) == len(r.exit_blocks()) + len(r.records())
        counted = {}
        for batch in r.exit_batches():
            c = counted.setdefault(batch.vm, {})
            for code, n in zip(*np.unique(batch.columns["reason"], return_counts=True)):
                c[int(code)] = c.get(int(code), 0) + int(n)
        assert events_by_vm_and_reason(r) == counted == r.footer["by_vm"]
    proc = subprocess.run([sys.executable, "-m", "tracetool", "verify", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
