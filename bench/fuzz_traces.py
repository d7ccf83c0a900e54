"""The long run of tests/test_vmtrace_fuzz.py: every vmtrace command on many mutated traces.

    .venv/bin/python bench/fuzz_traces.py [--iterations N] [--seed S] [--synthetic]

Records small real traces (seed16, hello, smp, mmio; needs /dev/kvm) — or with --synthetic uses
traces written by TraceWriter — then mutates them N times (truncate, bit flips with and without
a fixed crc32, overwrites, zero tail, wrong magic, future version, hostile values) and runs
every command on each mutant in-process, through the CLI's real entry point. Every run is
checked as in the test (exit 0/1/2, one error line for 2, no traceback, time and traced-memory
bounds); memory is traced on every 4th mutant, plot runs on every 2nd. Prints the outcomes per
command and per mutation, and the slowest and most memory-hungry runs. Exits 1 on the first
unclean outcome (with the seed and iteration to reproduce it).
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import test_vmtrace_fuzz as fz  # noqa: E402
from tracetool._alloc import keep_freed_memory  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=400)
    ap.add_argument("--seed", type=int, default=int(time.time()))
    ap.add_argument("--synthetic", action="store_true", help="do not launch VMs; fuzz traces written here")
    args = ap.parse_args()
    keep_freed_memory()  # as the vmtrace process does
    by_command: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    by_kind: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    slowest: list[tuple[float, str]] = []
    hungriest: list[tuple[int, str]] = []

    def report(label: str, argv: list[str], result) -> None:
        code, _, _, elapsed, peak = result
        by_command[argv[0]][code] += 1
        by_kind[label.split("(")[1].split(" of ")[0]][code] += 1
        what = f"{label}: {' '.join(a if not a.startswith('/') else Path(a).name for a in argv)}"
        slowest.append((elapsed, what))
        hungriest.append((peak, what))

    with tempfile.TemporaryDirectory(prefix="vmtrace-fuzz-") as tmp:
        work = Path(tmp)
        bases = fz.synthetic_bases(work) if args.synthetic else fz.real_bases(work)
        start = time.perf_counter()
        try:
            fz.fuzz(bases, work, seed=args.seed, iterations=args.iterations, plot_every=2, memory_every=4, report=report)
        except AssertionError as e:
            print(f"fuzz_traces: UNCLEAN OUTCOME (seed {args.seed}):\n{e}", file=sys.stderr)
            return 1
        elapsed = time.perf_counter() - start
    runs = sum(sum(c.values()) for c in by_command.values())
    print(f"fuzz_traces: seed {args.seed}, {args.iterations} mutants of {', '.join(sorted(bases))}, "
          f"{runs} command runs in {elapsed:.1f} s — all clean")
    print("exit codes per command:")
    for cmd, counts in sorted(by_command.items()):
        print(f"  {cmd:8} " + "  ".join(f"{code}: {n}" for code, n in sorted(counts.items())))
    print("exit codes per mutation:")
    for kind, counts in sorted(by_kind.items()):
        print(f"  {kind:15} " + "  ".join(f"{code}: {n}" for code, n in sorted(counts.items())))
    print("slowest runs:")
    for t, what in sorted(slowest, reverse=True)[:5]:
        print(f"  {t:6.2f} s  {what}")
    print("largest traced memory peaks (every 4th mutant):")
    for peak, what in sorted(hungriest, reverse=True)[:5]:
        print(f"  {peak / 2**20:6.1f} MiB  {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
