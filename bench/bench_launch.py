"""A/B benchmark: vmsup's exit rate on the seed guest against the C baseline.

    .venv/bin/python bench/bench_launch.py [--exits N] [--pairs P]

Builds bench/c_seed_loop.c with `cc -O2` into bench/build/, then runs P pairs, alternating
  A: bench/build/c_seed_loop guest/seed16.bin N
  B: vmsup launch seed16 --max-exits N --quiet
Both print `N exits in T s (R exits/s)`, where T covers the run loop only. For each run the
run-loop rate (exits / T) and the whole-process wall time are recorded. The ratio vmsup/C is
computed per pair (the two runs of a pair are adjacent in time, so they share the machine's
state), then the median over pairs is reported against the goal ratio >= 0.90.

This is a benchmark, not a test: it exits non-zero only when something fails to build or run,
never because the goal was missed.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
C_SOURCE = REPO / "bench" / "c_seed_loop.c"
BUILD_DIR = REPO / "bench" / "build"
C_BINARY = BUILD_DIR / "c_seed_loop"
GUEST = REPO / "guest" / "seed16.bin"
VMSUP = Path(sys.executable).parent / "vmsup"
GOAL_RATIO = 0.90
RESULT_RE = re.compile(r"(\d+) exits in ([0-9.]+) s")


class BenchError(Exception):
    pass


@dataclass
class Run:
    exits: int
    loop_s: float  # the run loop, as reported by the program
    wall_s: float  # the whole process, as seen from here

    @property
    def rate(self) -> float:
        return self.exits / self.loop_s


def build_c_loop() -> None:
    if shutil.which("cc") is None:
        raise BenchError("no C compiler `cc` on PATH")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    cmd = ["cc", "-O2", "-Wall", "-o", str(C_BINARY), str(C_SOURCE)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed:\n{res.stderr}")


def run_one(name: str, cmd: list[str], exits: int) -> Run:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    output = res.stdout + "\n" + res.stderr
    if res.returncode != 0:
        raise BenchError(f"{name}: `{' '.join(cmd)}` exited with {res.returncode}:\n{output.strip()[-2000:]}")
    match = RESULT_RE.search(res.stdout) or RESULT_RE.search(res.stderr)
    if match is None:
        raise BenchError(f"{name}: no 'N exits in T s' in its output:\n{output.strip()[-2000:]}")
    done, loop_s = int(match.group(1)), float(match.group(2))
    if loop_s <= 0:
        raise BenchError(f"{name}: reported a run loop of {loop_s} s")
    if done != exits:
        print(f"warning: {name} reported {done} exits, asked for {exits}", file=sys.stderr)
    return Run(done, loop_s, wall)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exits", type=int, default=200_000, help="exits per run (default 200000)")
    parser.add_argument("--pairs", type=int, default=5, help="A/B pairs to run (default 5)")
    args = parser.parse_args(argv)
    if args.exits <= 0 or args.pairs <= 0:
        parser.error("--exits and --pairs must be positive")

    try:
        if not GUEST.is_file():
            raise BenchError(f"{GUEST} is missing (build it with `make -C guest`)")
        if not VMSUP.is_file():
            raise BenchError(f"{VMSUP} is missing (install the project into this venv)")
        build_c_loop()
        c_cmd = [str(C_BINARY), str(GUEST), str(args.exits)]
        vmsup_cmd = [str(VMSUP), "launch", "seed16", "--max-exits", str(args.exits), "--quiet"]

        print(f"seed guest, {args.exits} exits per run, {args.pairs} A/B pairs")
        print(f"  A: {' '.join(c_cmd)}\n  B: {' '.join(vmsup_cmd)}\n")
        header = f"{'pair':>4}  {'C exits/s':>11}  {'C wall s':>8}  {'vmsup exits/s':>13}  {'vmsup wall s':>12}  {'ratio':>6}"
        print(header)
        print("-" * len(header))
        c_runs: list[Run] = []
        v_runs: list[Run] = []
        ratios: list[float] = []
        for pair in range(1, args.pairs + 1):
            c = run_one("c_seed_loop", c_cmd, args.exits)
            v = run_one("vmsup", vmsup_cmd, args.exits)
            c_runs.append(c)
            v_runs.append(v)
            ratios.append(v.rate / c.rate)
            print(f"{pair:>4}  {c.rate:>11,.0f}  {c.wall_s:>8.3f}  {v.rate:>13,.0f}  {v.wall_s:>12.3f}  {ratios[-1]:>6.3f}",
                  flush=True)
    except BenchError as exc:
        print(f"bench_launch: error: {exc}", file=sys.stderr)
        return 1

    med_ratio = statistics.median(ratios)
    print()
    print(f"median C rate:      {statistics.median(r.rate for r in c_runs):>11,.0f} exits/s")
    print(f"median vmsup rate:  {statistics.median(r.rate for r in v_runs):>11,.0f} exits/s")
    print(f"median ratio vmsup/C (per pair): {med_ratio:.3f}  (min {min(ratios):.3f}, max {max(ratios):.3f})")
    print(f"whole process, median wall: C {statistics.median(r.wall_s for r in c_runs):.3f} s, "
          f"vmsup {statistics.median(r.wall_s for r in v_runs):.3f} s "
          f"(run loop alone: C {statistics.median(r.loop_s for r in c_runs):.3f} s, "
          f"vmsup {statistics.median(r.loop_s for r in v_runs):.3f} s)")
    print(f"goal: ratio >= {GOAL_RATIO:.2f} -> {'PASS' if med_ratio >= GOAL_RATIO else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
