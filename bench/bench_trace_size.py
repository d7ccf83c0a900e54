"""P4: bytes per event of a trace file, against the goal <= 2 B/event and a naive msgpack baseline.

    .venv/bin/python bench/bench_trace_size.py [--exits N] [--sample S]   # defaults: 1000000, 100000

Records N exits of the seed guest,
    vmsup launch seed16 --max-exits N --quiet --trace bench/build/p4.vmtrace
then reads the file's size and event count from `python -m tracetool info --json` and prints
  - bytes/event of the whole file (what `vmtrace info` reports);
  - the same without the file header and the index footer + trailer, and for the EXITS blocks
    alone (their sizes come from the layout documented in tracetool/trace/format.py: the header
    is 14 + n + 4 bytes, the trailer points at the index block, each block is 16 + length);
  - baselines on the same events, from TraceReader(...).exits(): the schema's columns
    uncompressed, and each event packed as a msgpack map with the schema's field names
    (measured on the first S events and extrapolated to all), plain and zstd level 3.
Goal: whole file <= 2 B/event (timestamps exact to the nanosecond, no field dropped).

This is a benchmark, not a test: it exits non-zero only when something fails to run.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import time

from benchlib import BUILD_DIR, REPO, VMSUP, BenchError, check_prerequisites, run_one, tail_of, trace_line

GOAL_BYTES_PER_EVENT = 2.0
TRACE = BUILD_DIR / "p4.vmtrace"
# From tracetool/trace/format.py's documented layout.
FILE_HEAD = struct.Struct("<8sHI")  # "VMSUPTRC", format version, n; then n bytes, then a u32 crc32
BLOCK_HEAD = struct.Struct("<4sIII")  # "BLK\x01", type, payload length, crc32
TRAILER = struct.Struct("<Q8s")  # offset of the INDEX block, "VMSUPEND"


def layout_sizes(path, exit_offsets: list[int]) -> dict[str, int]:
    """Bytes of the file header, of the index footer + trailer, and of the EXITS blocks."""
    with open(path, "rb") as f:
        magic, _version, n = FILE_HEAD.unpack(f.read(FILE_HEAD.size))
        if magic != b"VMSUPTRC":
            raise BenchError(f"{path}: not a vmsup trace")
        header = FILE_HEAD.size + n + 4
        size = os.fstat(f.fileno()).st_size
        footer = 0
        if size >= TRAILER.size:
            f.seek(size - TRAILER.size)
            index_at, end_magic = TRAILER.unpack(f.read(TRAILER.size))
            if end_magic == b"VMSUPEND" and header <= index_at < size:
                footer = size - index_at
        exits = 0
        for offset in exit_offsets:
            f.seek(offset)
            _magic, _type, length, _crc = BLOCK_HEAD.unpack(f.read(BLOCK_HEAD.size))
            exits += BLOCK_HEAD.size + length
    return {"size": size, "header": header, "footer": footer, "exits_blocks": exits}


def msgpack_baseline(cols: dict, names: tuple[str, ...], sample: int) -> tuple[int, int, int]:
    """(events packed, msgpack bytes, zstd-3 bytes of those msgpack bytes) for the first `sample` events."""
    import msgpack
    import zstandard

    n = min(sample, len(cols[names[0]]))
    lists = [cols[name][:n].tolist() for name in names]  # Python ints, as a producer would have them
    packer = msgpack.Packer(use_bin_type=True)
    parts = [packer.pack(dict(zip(names, values))) for values in zip(*lists)]
    raw = b"".join(parts)
    return n, len(raw), len(zstandard.ZstdCompressor(level=3).compress(raw))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exits", type=int, default=1_000_000, help="--max-exits of the recording (default 1000000)")
    parser.add_argument("--sample", type=int, default=100_000, help="events packed for the msgpack baseline (default 100000)")
    args = parser.parse_args(argv)
    if args.exits <= 0 or args.sample <= 0:
        parser.error("--exits and --sample must be positive")

    try:
        check_prerequisites()
        from tracetool import schema
        from tracetool.trace import TraceReader

        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        TRACE.unlink(missing_ok=True)  # vmsup refuses to overwrite a trace
        cmd = [str(VMSUP), "launch", "seed16", "--max-exits", str(args.exits), "--quiet", "--trace",
               str(TRACE.relative_to(REPO))]
        print(f"P4: trace size of {args.exits} seed-guest exits")
        print(f"  {' '.join(cmd)}")
        run = run_one("vmsup launch", cmd, args.exits)
        tl = trace_line("vmsup launch", run.stderr)
        print(f"  recorded: {run.exits} exits at {run.rate:,.0f} exits/s; trace line: {tl.events} events, "
              f"{tl.batches} batches, {tl.gaps} gaps ({tl.lost} lost)")

        info_cmd = [sys.executable, "-m", "tracetool", "info", str(TRACE.relative_to(REPO)), "--json"]
        print(f"  {' '.join(info_cmd)}\n")
        res = subprocess.run(info_cmd, cwd=REPO, capture_output=True, text=True)
        if res.returncode != 0:
            raise BenchError(f"`{' '.join(info_cmd)}` exited with {res.returncode}:\n{tail_of(res.stdout + res.stderr)}")
        try:
            info = json.loads(res.stdout)
            size, events = int(info["file"]["size"]), int(info["events"]["total"])
            info_bpe = info.get("bytes_per_event")
        except (ValueError, KeyError, TypeError) as e:
            raise BenchError(f"`{' '.join(info_cmd)}` printed no usable JSON ({e}):\n{tail_of(res.stdout)}") from None
        if events <= 0:
            raise BenchError(f"{TRACE} holds no events")

        t0 = time.perf_counter()
        with TraceReader(TRACE) as reader:
            offsets = [ref.offset for ref in reader.exit_blocks()]
            cols = reader.exits()
            blocks = len(offsets)
        read_s = time.perf_counter() - t0
        parts = layout_sizes(TRACE, offsets)
        names = schema.COLUMN_NAMES
        raw_row = sum(cols[name].dtype.itemsize for name in names)
        n_sample, mp_bytes, mp_zstd = msgpack_baseline(cols, names, args.sample)
    except BenchError as exc:
        print(f"bench_trace_size: error: {exc}", file=sys.stderr)
        return 1

    if len(cols[names[0]]) != events:
        print(f"warning: the reader decoded {len(cols[names[0]])} events, vmtrace info says {events}", file=sys.stderr)
    by_reason = info["events"]["by_vm"][0]["by_reason"] if info["events"].get("by_vm") else {}
    body = size - parts["header"] - parts["footer"]
    scale = events / n_sample
    rows = [
        ("trace file, whole (vmtrace info)", size),
        ("  without file header and index footer", body),
        ("  EXITS blocks only", parts["exits_blocks"]),
        (f"schema columns uncompressed ({raw_row} B/event)", raw_row * events),
        (f"msgpack map per event (first {n_sample:,}, extrapolated)", round(mp_bytes * scale)),
        ("  the same msgpack, zstd level 3", round(mp_zstd * scale)),
    ]
    print(f"{events:,} events ({', '.join(f'{k} {v:,}' for k, v in by_reason.items())}) in {blocks} EXITS blocks; "
          f"file header {parts['header']:,} B, index footer + trailer {parts['footer']:,} B, "
          f"vm-start/vm-end records {body - parts['exits_blocks']:,} B; decoded in {read_s:.2f} s")
    print()
    header = f"{'':<58}  {'bytes':>13}  {'B/event':>8}  {'x trace':>7}"
    print(header)
    print("-" * len(header))
    for label, nbytes in rows:
        print(f"{label:<58}  {nbytes:>13,}  {nbytes / events:>8.3f}  {nbytes / size:>7.1f}")
    print()
    bpe = size / events
    if info_bpe is not None and abs(info_bpe - bpe) > 1e-3:
        print(f"note: vmtrace info reports {info_bpe:.3f} B/event, size/events here is {bpe:.3f}")
    print(f"goal (P4): whole file <= {GOAL_BYTES_PER_EVENT:.1f} B/event -> {bpe:.3f} B/event -> "
          f"{'PASS' if bpe <= GOAL_BYTES_PER_EVENT else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
