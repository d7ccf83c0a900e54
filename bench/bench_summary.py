"""`vmtrace summary` on a 10M-event trace against iterating the same events with msgpack.Unpacker.

    .venv/bin/python bench/bench_summary.py [--events N] [--record N] [--vms V] [--runs R]

1. Records a real seed16 run (`vmsup launch seed16 --max-exits RECORD`), or reuses
   bench/build/summary-seed.vmtrace when it holds RECORD events.
2. Re-blocks the recorded columns into bench/build/summary-10m.vmtrace: V VMs, each a copy of
   the recorded stream repeated (times shifted past the previous copy, sequence numbers
   continued) until the file holds N events, written with TraceWriter in 16384-event batches,
   round-robin over the VMs as a recorder interleaves them.
3. Packs the same events as one msgpack map per event into bench/build/summary-10m.msgpack.
4. Times, best of R runs, after start-up (imports done, the allocator tuned as `vmtrace` does it:
   tracetool/_alloc.py):
   - summary: TraceReader open (crc of every block) + tracetool.commands.summary.summarize (by reason);
   - msgpack: `for event in msgpack.Unpacker(file): pass` over the same events — the cost of
     merely touching each event as a Python object, before any statistics.
   Also the wall time of the whole `vmtrace summary` process (start-up included), once.
Prints events/s of each and the ratio; the goal is >= 20M events/s for summary.
Exits non-zero only if something fails to run, never because a goal was missed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np

from benchlib import BIN_DIR, BUILD_DIR, REPO, VMSUP, BenchError, check_prerequisites, tail_of

sys.path.insert(0, str(REPO))
from tracetool import schema  # noqa: E402
from tracetool._alloc import keep_freed_memory  # noqa: E402
from tracetool.commands.summary import ADDRESS_GROUPINGS, summarize  # noqa: E402
from tracetool.symbols import SymbolTable  # noqa: E402
from tracetool.trace import TraceReader, TraceWriter  # noqa: E402

GOAL = 20e6
BATCH = 16384
SEED_TRACE = BUILD_DIR / "summary-seed.vmtrace"
BIG_TRACE = BUILD_DIR / "summary-10m.vmtrace"
BIG_MSGPACK = BUILD_DIR / "summary-10m.msgpack"
SEED_ELF = REPO / "guest" / "seed16.elf"


def record(n: int) -> Path:
    if SEED_TRACE.exists():
        with TraceReader(SEED_TRACE) as r:
            if r.event_count == n and r.closed_cleanly:
                return SEED_TRACE
        SEED_TRACE.unlink()
    check_prerequisites()
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([str(VMSUP), "launch", "seed16", "--max-exits", str(n), "-q", "--trace", str(SEED_TRACE)],
                          capture_output=True, text=True, cwd=REPO, stdin=subprocess.DEVNULL)
    if proc.returncode != 0 or not SEED_TRACE.exists():
        raise BenchError(f"recording seed16 failed (exit {proc.returncode}):\n{tail_of(proc.stderr)}")
    return SEED_TRACE


def build(seed: Path, total: int, vms: int) -> tuple[int, dict[str, np.ndarray]]:
    """Write BIG_TRACE from the recorded columns; returns (events, recorded columns)."""
    with TraceReader(seed) as r:
        rec = r.exits(vm=0, vcpu=0, epoch=0)
    cols = {name: rec[name] for name in schema.COLUMN_NAMES}
    n = len(cols["t_exit"])
    span = int(cols["t_exit"][-1]) - int(cols["t_exit"][0]) + int(cols["guest_ns"][0]) + 10_000
    per_vm = total // vms
    if BIG_TRACE.exists():
        with TraceReader(BIG_TRACE) as r:
            if r.event_count == per_vm * vms and r.closed_cleanly:
                return r.event_count, cols
        BIG_TRACE.unlink()
    with TraceWriter(BIG_TRACE, {"run_id": "bench-summary", "source": str(seed)}) as w:
        for vm in range(vms):
            w.write_record(schema.MSG_VM_START, {"vm": vm, "epoch": 0, "name": f"seed16-{vm}", "mode": "real",
                                                 "t": int(cols["t_exit"][0])})
        for start in range(0, per_vm, BATCH):
            count = min(BATCH, per_vm - start)
            for vm in range(vms):
                parts = []
                at = start
                while at < start + count:  # a batch may wrap around the end of the recording
                    copy, i = divmod(at, n)
                    j = min(n, i + (start + count - at))
                    part = {k: v[i:j] for k, v in cols.items()}
                    part["t_exit"] = part["t_exit"] + copy * span
                    parts.append(part)
                    at += j - i
                batch = {k: np.concatenate([p[k] for p in parts]) for k in cols}
                w.write_exits(vm, 0, 0, start, count, batch)
    return per_vm * vms, cols


def pack_msgpack(events: int, vms: int) -> None:
    """The same events as msgpack maps, one per event, in file order of the trace."""
    if BIG_MSGPACK.exists() and BIG_MSGPACK.stat().st_mtime >= BIG_TRACE.stat().st_mtime:
        return
    packer = msgpack.Packer()
    with TraceReader(BIG_TRACE) as r, open(BIG_MSGPACK, "wb") as f:
        for batch in r.exit_batches():
            c = batch.columns
            rows = zip(*(c[name].tolist() for name in (*schema.COLUMN_NAMES, "seq")))
            buf = bytearray()
            for t, g, addr, data, count, reason, size, flags, rip, seq in rows:
                buf += packer.pack({"vm": batch.vm, "vcpu": batch.vcpu, "epoch": batch.epoch, "seq": seq, "t_exit": t,
                                    "guest_ns": g, "addr": addr, "data": data, "count": count, "reason": reason,
                                    "size": size, "flags": flags, "rip": rip})
            f.write(buf)


def time_summary(by: str) -> tuple[float, float, dict]:
    """(wall seconds, CPU seconds of this process, summary): summary runs on one thread, so its
    CPU time is the work itself even when other jobs share the CPUs. By symbol or line, the
    symbols are loaded inside the timed part (seed16.elf, offsets from its code segment)."""
    start, cpu = time.perf_counter(), time.process_time()
    with TraceReader(BIG_TRACE) as r:
        symbols = {None: SymbolTable.from_file(SEED_ELF, bias=0x10000)} if set(by.split(",")) & set(ADDRESS_GROUPINGS) else None
        data = summarize(r, by=by, symbols=symbols)
    return time.perf_counter() - start, time.process_time() - cpu, data


def time_msgpack() -> tuple[float, int]:
    start = time.perf_counter()
    n = 0
    with open(BIG_MSGPACK, "rb") as f:
        for _ in msgpack.Unpacker(f, read_size=1 << 20):
            n += 1
    return time.perf_counter() - start, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--record", type=int, default=500_000, help="exits of the real seed16 run to re-block")
    ap.add_argument("--vms", type=int, default=4)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--by", default="reason", help="the summary's grouping (reason, symbol, line, rip, symbol,reason, ...)")
    args = ap.parse_args()
    keep_freed_memory()  # as the vmtrace process does at start-up
    try:
        seed = record(args.record)
        t = time.perf_counter()
        events, cols = build(seed, args.events, args.vms)
        print(f"trace: {BIG_TRACE} — {events} events ({args.vms} VMs, from {len(cols['t_exit'])} recorded seed16 exits), "
              f"{BIG_TRACE.stat().st_size / events:.3f} B/event, ready in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        pack_msgpack(events, args.vms)
        print(f"msgpack: {BIG_MSGPACK} — {BIG_MSGPACK.stat().st_size / events:.1f} B/event, ready in "
              f"{time.perf_counter() - t:.1f} s")
    except BenchError as e:
        print(f"bench_summary: {e}", file=sys.stderr)
        return 1
    load = os.getloadavg()
    print(f"load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")

    summary_runs, summary_cpu, msgpack_runs = [], [], []
    for i in range(args.runs):  # alternate, so both see the same machine
        s, c, data = time_summary(args.by)
        summary_runs.append(s)
        summary_cpu.append(c)
        m, n = time_msgpack()
        msgpack_runs.append(m)
        if data["events"] != events or n != events:
            print(f"bench_summary: counted {data['events']} (summary) and {n} (msgpack), expected {events}", file=sys.stderr)
            return 1
        print(f"  run {i + 1}: summary {s:.3f} s ({events / s / 1e6:.1f}M events/s; CPU {c:.3f} s), "
              f"msgpack.Unpacker {m:.3f} s ({events / m / 1e6:.2f}M events/s)")
    proc_start = time.perf_counter()
    symbols = ["--symbols", str(SEED_ELF)] if set(args.by.split(",")) & set(ADDRESS_GROUPINGS) else []
    proc = subprocess.run([str(BIN_DIR / "vmtrace"), "summary", str(BIG_TRACE), "--by", args.by, *symbols],
                          capture_output=True, text=True)
    wall = time.perf_counter() - proc_start
    if proc.returncode != 0:
        print(f"bench_summary: vmtrace summary failed:\n{tail_of(proc.stderr)}", file=sys.stderr)
        return 1
    best_s, best_m = min(summary_runs), min(msgpack_runs)
    rate_s, rate_m = events / best_s, events / best_m
    print(f"summary (open + summarize, after start-up), best of {args.runs}: {best_s:.3f} s = {rate_s / 1e6:.1f}M events/s "
          f"(goal {GOAL / 1e6:.0f}M: {'met' if rate_s >= GOAL else 'MISSED'})")
    print(f"summary per CPU second, best of {args.runs}: {events / min(summary_cpu) / 1e6:.1f}M events/s "
          "(the wall figure when this process has a CPU to itself)")
    print(f"msgpack.Unpacker iteration, best of {args.runs}: {best_m:.3f} s = {rate_m / 1e6:.2f}M events/s")
    print(f"summary is {rate_s / rate_m:.1f}x faster than only iterating the events with msgpack")
    print(f"whole `vmtrace summary` process (start-up included): {wall:.2f} s = {events / wall / 1e6:.1f}M events/s")
    g = data["groups"][0]
    print(f"  {g['key']}: {g['count']} exits, guest p50 {g['guest']['p50_ns'] / 1000:.2f} us, "
          f"handle p50 {g['handle']['p50_ns'] / 1000:.2f} us, p99 {g['handle']['p99_ns'] / 1000:.2f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
