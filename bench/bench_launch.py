"""A/B/C benchmark: vmsup's exit rate on the seed guest, with and without a trace, against C.

    .venv/bin/python bench/bench_launch.py [--exits N] [--pairs P]

Builds bench/c_seed_loop.c with `cc -O2` into bench/build/, then runs P rounds ("pairs"), each
of three adjacent runs, in alternating order (A B C, then C B A, …):
  A: bench/build/c_seed_loop guest/seed16.bin N                            (the C baseline)
  B: vmsup launch seed16 --max-exits N --quiet --no-trace                  (issue 2: the VMM loop)
  C: vmsup launch seed16 --max-exits N --quiet --trace bench/build/p1.vmtrace
                                                                (P1: every exit recorded to a file)
Once per invocation, in the middle round right after its C-loop run, it also runs
  bench/bare_python_loop.py guest/seed16.bin N    (KVM_RUN from Python and nothing else: the ceiling)
Every program prints `N exits in T s`, where T covers the run loop only. For each run the run-loop
rate (exits / T) and the whole-process wall time are recorded. Ratios against the C loop are
computed per round (the runs of a round are adjacent in time, so they share the machine's
state), then the median over rounds is reported against the goals B/C-loop >= 0.90 and
P1/C-loop >= 0.90.

This is a benchmark, not a test: it exits non-zero only when something fails to build or run,
never because a goal was missed.
"""

from __future__ import annotations

import argparse
import os
import sys

from benchlib import (BARE_PYTHON, BUILD_DIR, C_BINARY, GUEST, REPO, VMSUP, BenchError, Run, build_c_loop,
                      check_prerequisites, fmt_rate, median, run_one, trace_line)

GOAL_RATIO = 0.90
P1_TRACE = BUILD_DIR / "p1.vmtrace"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exits", type=int, default=200_000, help="exits per run (default 200000)")
    parser.add_argument("--pairs", type=int, default=5, help="rounds of A/B/C runs (default 5)")
    args = parser.parse_args(argv)
    if args.exits <= 0 or args.pairs <= 0:
        parser.error("--exits and --pairs must be positive")

    n = str(args.exits)
    c_cmd = [str(C_BINARY), str(GUEST), n]
    notrace_cmd = [str(VMSUP), "launch", "seed16", "--max-exits", n, "--quiet", "--no-trace"]
    trace_cmd = [str(VMSUP), "launch", "seed16", "--max-exits", n, "--quiet", "--trace",
                 str(P1_TRACE.relative_to(REPO))]
    bare_cmd = [sys.executable, str(BARE_PYTHON), str(GUEST), n]
    bare_round = (args.pairs + 1) // 2

    c_runs: list[Run] = []
    b_runs: list[Run] = []
    p_runs: list[Run] = []
    b_ratios: list[float] = []
    p_ratios: list[float] = []
    trace_problems: list[str] = []
    bare: Run | None = None
    bare_ratio = 0.0

    def run_c() -> Run:
        return run_one("c_seed_loop", c_cmd, args.exits)

    def run_b() -> Run:
        return run_one("vmsup --no-trace", notrace_cmd, args.exits)

    def run_p1() -> Run:
        P1_TRACE.unlink(missing_ok=True)  # vmsup refuses to overwrite a trace
        run = run_one("vmsup --trace", trace_cmd, args.exits)
        tl = trace_line("vmsup --trace", run.stderr)
        if tl.gaps or tl.lost or tl.events < run.exits:
            trace_problems.append(f"`{' '.join(trace_cmd)}`: {run.exits} exits but the trace line says "
                                  f"{tl.events} events, {tl.gaps} gaps ({tl.lost} events lost)")
        return run

    try:
        check_prerequisites()
        build_c_loop()
        print(f"seed guest, {args.exits} exits per run, {args.pairs} rounds of A/B/C in alternating order "
              f"({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start)")
        print(f"  A: {' '.join(c_cmd)}\n  B: {' '.join(notrace_cmd)}\n  C: {' '.join(trace_cmd)}")
        print(f"  ceiling, once (round {bare_round}, after A): {' '.join(bare_cmd)}\n")
        header = (f"{'pair':>4}  {'order':>5}  {'A c-loop/s':>10}  {'B no-trace/s':>12}  {'C trace/s':>10}  "
                  f"{'B/A':>5}  {'C/A':>5}  {'C/B':>5}  {'wall A':>6}  {'wall B':>6}  {'wall C':>6}")
        print(header)
        print("-" * len(header))
        for pair in range(1, args.pairs + 1):
            order = "ABC" if pair % 2 else "CBA"
            got: dict[str, Run] = {}
            for which in order:
                if which == "A":
                    got["A"] = run_c()
                    if pair == bare_round:
                        bare = run_one("bare_python_loop", bare_cmd, args.exits)
                        bare_ratio = bare.rate / got["A"].rate
                elif which == "B":
                    got["B"] = run_b()
                else:
                    got["C"] = run_p1()
            c, b, p = got["A"], got["B"], got["C"]
            c_runs.append(c)
            b_runs.append(b)
            p_runs.append(p)
            b_ratios.append(b.rate / c.rate)
            p_ratios.append(p.rate / c.rate)
            print(f"{pair:>4}  {order:>5}  {fmt_rate(c.rate):>10}  {fmt_rate(b.rate):>12}  {fmt_rate(p.rate):>10}  "
                  f"{b_ratios[-1]:>5.3f}  {p_ratios[-1]:>5.3f}  {p.rate / b.rate:>5.3f}  "
                  f"{c.wall_s:>6.3f}  {b.wall_s:>6.3f}  {p.wall_s:>6.3f}", flush=True)
    except BenchError as exc:
        print(f"bench_launch: error: {exc}", file=sys.stderr)
        return 1

    assert bare is not None
    med_b, med_p = median(b_ratios), median(p_ratios)
    print()
    print(f"median A c-loop rate:            {fmt_rate(median(r.rate for r in c_runs)):>9} exits/s")
    print(f"median B vmsup --no-trace rate:  {fmt_rate(median(r.rate for r in b_runs)):>9} exits/s")
    print(f"median C vmsup --trace rate:     {fmt_rate(median(r.rate for r in p_runs)):>9} exits/s")
    print(f"bare Python KVM_RUN loop (once): {fmt_rate(bare.rate):>9} exits/s")
    print(f"median ratio B/c-loop (per pair): {med_b:.3f}  (min {min(b_ratios):.3f}, max {max(b_ratios):.3f})")
    print(f"median ratio C/c-loop (per pair): {med_p:.3f}  (min {min(p_ratios):.3f}, max {max(p_ratios):.3f})")
    print(f"median ratio C/B, cost of writing the trace (per pair): {median(p.rate / b.rate for p, b in zip(p_runs, b_runs)):.3f}")
    print(f"ratio bare/c-loop (round {bare_round}): {bare_ratio:.3f}  "
          f"(against the median c-loop rate: {bare.rate / median(r.rate for r in c_runs):.3f}) "
          f"-- the ceiling for any Python loop here")
    print(f"whole process, median wall: A {median(r.wall_s for r in c_runs):.3f} s, "
          f"B {median(r.wall_s for r in b_runs):.3f} s, C {median(r.wall_s for r in p_runs):.3f} s "
          f"(run loop alone: A {median(r.loop_s for r in c_runs):.3f} s, B {median(r.loop_s for r in b_runs):.3f} s, "
          f"C {median(r.loop_s for r in p_runs):.3f} s)")
    for problem in trace_problems:
        print(f"warning: {problem}")
    print(f"goal (issue 2): ratio B/c-loop >= {GOAL_RATIO:.2f} -> {'PASS' if med_b >= GOAL_RATIO else 'FAIL'}")
    print(f"goal (P1):      ratio C/c-loop >= {GOAL_RATIO:.2f} -> {'PASS' if med_p >= GOAL_RATIO else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
