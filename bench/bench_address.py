"""P1 with the guest address recorded, against the build before the `rip` column, in one run.

    .venv/bin/python bench/bench_address.py [--exits N] [--rounds R] [--before COMMIT]

Exports COMMIT (default: the parent of the commit that added the rip column) with `git archive`
into a temporary directory, then runs R rounds, each of four adjacent runs in alternating order
(A B C, then C B A, …):
  A: bench/build/c_seed_loop guest/seed16.bin N                      (the C loop)
  B: vmsup launch seed16 --max-exits N -q --trace T                  (P1 now: rip on every exit)
  C: the same with PYTHONPATH=<the exported COMMIT>                  (P1 before the rip column)
and once, in the middle round after A, bench/bare_python_loop.py (KVM_RUN from Python and
nothing else). Ratios are per round (runs of a round share the machine's state); medians over
rounds are printed: B/A, C/A, B/C (the address's cost: 1 - B/C; goal ≤ 3%), and B/bare.
A benchmark, not a test: non-zero only when something fails to run.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

from benchlib import (BARE_PYTHON, BUILD_DIR, C_BINARY, GUEST, REPO, VMSUP, BenchError, build_c_loop,
                      check_prerequisites, fmt_rate, median, parse_run, run_one)

RIP_COMMIT_SUBJECT = "rip column (schema 2)"


def commit_before_rip() -> str:
    out = subprocess.run(["git", "log", "--format=%H %s", "--all"], capture_output=True, text=True, cwd=REPO,
                         check=True).stdout
    for line in out.splitlines():
        sha, _, subject = line.partition(" ")
        if subject.startswith(RIP_COMMIT_SUBJECT):
            return sha + "~1"
    raise BenchError("cannot find the commit that added the rip column; pass --before COMMIT")


def export(commit: str, into: str) -> None:
    archive = subprocess.run(["git", "archive", commit], capture_output=True, cwd=REPO)
    if archive.returncode:
        raise BenchError(f"git archive {commit}: {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", into], input=archive.stdout, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exits", type=int, default=100_000, help="exits per run (default 100000)")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of A/B/C runs (default 4)")
    parser.add_argument("--before", default=None, help="the build to compare with (default: before the rip column)")
    args = parser.parse_args(argv)
    n = str(args.exits)
    trace = BUILD_DIR / "address.vmtrace"
    try:
        check_prerequisites()
        build_c_loop()
        before = args.before or commit_before_rip()
        with tempfile.TemporaryDirectory(prefix="vmsup-before-rip-") as snap:
            export(before, snap)
            old_env = {**os.environ, "PYTHONPATH": snap}
            launch = [str(VMSUP), "launch", "seed16", "--max-exits", n, "-q", "--trace", str(trace)]

            def p1(env=None):
                trace.unlink(missing_ok=True)
                if env is None:
                    return run_one("vmsup --trace", launch, args.exits)
                # in the snapshot's directory: `python -m supervisor.recorder` puts the cwd first
                t0 = time.perf_counter()
                res = subprocess.run(launch, capture_output=True, text=True, cwd=snap, env=env,
                                     stdin=subprocess.DEVNULL)
                return parse_run("vmsup --trace (before)", launch, res.returncode, res.stdout, res.stderr,
                                 time.perf_counter() - t0, args.exits)

            print(f"seed guest, {n} exits per run, {args.rounds} rounds ({os.cpu_count()} CPUs, "
                  f"load average {os.getloadavg()[0]:.2f}); before = {before}")
            print(f"{'round':>5}  {'order':>5}  {'A c-loop/s':>10}  {'B rip/s':>9}  {'C before/s':>10}  "
                  f"{'B/A':>5}  {'C/A':>5}  {'B/C':>5}")
            ratios: dict[str, list[float]] = {"B/A": [], "C/A": [], "B/C": []}
            bare = bare_b = None
            for r in range(1, args.rounds + 1):
                order = "ABC" if r % 2 else "CBA"
                got = {}
                for which in order:
                    if which == "A":
                        got["A"] = run_one("c_seed_loop", [str(C_BINARY), str(GUEST), n], args.exits)
                        if r == (args.rounds + 1) // 2:
                            bare = run_one("bare_python_loop", [sys.executable, str(BARE_PYTHON), str(GUEST), n],
                                           args.exits)
                    elif which == "B":
                        got["B"] = p1()
                    else:
                        got["C"] = p1(old_env)
                a, b, c = got["A"].rate, got["B"].rate, got["C"].rate
                if bare is not None and bare_b is None:
                    bare_b = b / bare.rate
                for key, value in (("B/A", b / a), ("C/A", c / a), ("B/C", b / c)):
                    ratios[key].append(value)
                print(f"{r:>5}  {order:>5}  {fmt_rate(a):>10}  {fmt_rate(b):>9}  {fmt_rate(c):>10}  "
                      f"{b / a:>5.3f}  {c / a:>5.3f}  {b / c:>5.3f}", flush=True)
    except BenchError as exc:
        print(f"bench_address: error: {exc}", file=sys.stderr)
        return 1
    print()
    for key, values in ratios.items():
        print(f"median {key}: {median(values):.3f}  (min {min(values):.3f}, max {max(values):.3f})")
    if bare is not None:
        print(f"bare Python KVM_RUN loop (once): {fmt_rate(bare.rate)} exits/s; B/bare in that round {bare_b:.3f}")
    cost = 1 - median(ratios["B/C"])
    print(f"the address's cost (1 - median B/C): {100 * cost:.1f}%  (goal <= 3%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
