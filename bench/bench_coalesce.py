"""P2: recorded port writes/s with coalesced I/O against the C exit-per-write loop.

    .venv/bin/python bench/bench_coalesce.py [--exits N] [--c-exits M] [--rounds R]

Each round runs, adjacent in time and in alternating order:
  A: bench/build/c_seed_loop guest/seed16.bin M                  (one KVM exit per port write, C)
  B: vmsup launch seed16 --coalesce 0x10 --max-exits N --quiet --trace bench/build/p2.vmtrace
B's rate is the port writes its trace holds (io exits + coalesced writes; checked to be the guest's
counter without holes) over the run loop's time from its status line. The median of the per-round
ratios B/A is reported against the goal of 4.

A benchmark, not a test: it exits non-zero only when something fails to build or run.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from benchlib import (BUILD_DIR, C_BINARY, GUEST, REPO, VMSUP, BenchError, build_c_loop, check_prerequisites, fmt_rate,
                      median, run_one, trace_line)

sys.path.insert(0, str(REPO))
from tracetool import schema  # noqa: E402
from tracetool.coalesced import coalesced_columns  # noqa: E402
from tracetool.trace import TraceReader  # noqa: E402

GOAL = 4.0
P2_TRACE = BUILD_DIR / "p2.vmtrace"


def recorded_writes(trace: Path) -> int:
    """Port writes in the trace (exits + coalesced), checked to be 0, 1, 2, … in program order."""
    import numpy as np

    with TraceReader(trace) as r:
        if r.gaps:
            raise BenchError(f"{trace}: the trace has gaps")
        ev = r.exits()
        cols, = coalesced_columns(r).values()
    io = (ev["reason"] == schema.REASON_IO) & (ev["addr"] == 0x10)
    seq = np.concatenate([cols["exit_seq"], ev["seq"][io]])
    after = np.concatenate([np.zeros(len(cols["exit_seq"]), np.uint8), np.ones(int(io.sum()), np.uint8)])
    values = np.concatenate([cols["data"], ev["data"][io]])[np.lexsort((np.arange(len(seq)), after, seq))]
    if not np.array_equal(values, np.arange(len(values), dtype=np.uint64) % (1 << 16)):
        raise BenchError(f"{trace}: the seed's counter has holes or is out of order")
    return len(values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exits", type=int, default=2000, help="vmsup's exits per run (~170 writes each; default 2000)")
    parser.add_argument("--c-exits", type=int, default=100_000, help="the C loop's exits per run (default 100000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of A/B (default 3)")
    args = parser.parse_args(argv)
    c_cmd = [str(C_BINARY), str(GUEST), str(args.c_exits)]
    b_cmd = [str(VMSUP), "launch", "seed16", "--coalesce", "0x10", "--max-exits", str(args.exits), "--quiet",
             "--trace", str(P2_TRACE.relative_to(REPO))]
    ratios = []
    try:
        check_prerequisites()
        build_c_loop()
        print(f"P2, {args.rounds} rounds ({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start)")
        print(f"  A: {' '.join(c_cmd)}\n  B: {' '.join(b_cmd)}\n")
        print(f"{'round':>5}  {'A exits/s':>10}  {'B writes/s':>11}  {'B exits':>7}  {'B writes':>9}  {'B/A':>5}")
        for i in range(1, args.rounds + 1):
            got = {}
            for which in ("AB" if i % 2 else "BA"):
                if which == "A":
                    got["A"] = run_one("c_seed_loop", c_cmd, args.c_exits)
                else:
                    P2_TRACE.unlink(missing_ok=True)
                    run = run_one("vmsup --coalesce", b_cmd, args.exits)
                    trace_line("vmsup --coalesce", run.stderr)
                    got["B"] = (run, recorded_writes(P2_TRACE))
            a, (b, writes) = got["A"], got["B"]
            rate = writes / b.loop_s
            ratios.append(rate / a.rate)
            print(f"{i:>5}  {fmt_rate(a.rate):>10}  {fmt_rate(rate):>11}  {b.exits:>7}  {writes:>9}  {ratios[-1]:>5.2f}",
                  flush=True)
    except BenchError as exc:
        print(f"bench_coalesce: error: {exc}", file=sys.stderr)
        return 1
    print(f"\nmedian B/A: {median(ratios):.2f} (goal >= {GOAL}; min {min(ratios):.2f}, max {max(ratios):.2f}); "
          f"load average {os.getloadavg()[0]:.2f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
