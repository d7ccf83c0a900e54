"""A --deterministic mbkernel run against a normal one: wall time for the same number of timer ticks.

    .venv/bin/python bench/bench_deterministic.py [TICKS] [ROUNDS]    # defaults: 300, 3

mbkernel programs the PIT at 100 Hz and sleeps in `sti; hlt` until TICKS ticks have come
(`--cmdline maxticks=TICKS`), then exits. Normally the in-kernel PIT ticks in host time, so TICKS
ticks take TICKS / 100 s whatever the host does; with --deterministic the user-space PIT runs on
the virtual clock and a HLT jumps straight to the next tick, so the run takes what its exits cost.
Each round runs both (recorded, `--quiet`), alternating; medians are printed: the VM's own time
(vmsup's end line: first KVM_RUN to the end), the command's wall time (start-up included), the
exits, and the ratio of VM times.

A benchmark, not a test: it exits non-zero only when something fails.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VMSUP = Path(sys.executable).parent / "vmsup"
END_LINE = re.compile(r"— (\d+) exits in ([\d.]+) s")


def run(ticks: int, deterministic: bool, trace: Path) -> tuple[float, float, int]:
    """(VM seconds, wall seconds, exits) of one mbkernel run to `ticks` ticks."""
    args = [str(VMSUP), "launch", "mbkernel", "--cmdline", f"maxticks={ticks}", "--quiet", "--trace", str(trace)]
    if deterministic:
        args.append("--deterministic")
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or f"ticks: {ticks}" not in proc.stdout:
        raise SystemExit(f"mbkernel failed ({'deterministic' if deterministic else 'normal'}): {proc.stderr[-500:]}")
    found = END_LINE.search(proc.stderr)
    if found is None:
        raise SystemExit(f"no end line in: {proc.stderr[-500:]}")
    return float(found.group(2)), wall, int(found.group(1))


def main() -> int:
    ticks = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    results: dict[bool, list[tuple[float, float, int]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="bench-det-") as scratch:
        for r in range(rounds):
            for det in (False, True) if r % 2 == 0 else (True, False):
                trace = Path(scratch) / f"{'det' if det else 'normal'}-{r}.trace"
                results[det].append(run(ticks, det, trace))
    print(f"mbkernel to {ticks} timer ticks, medians of {rounds}:")
    print(f"{'run':<15} {'VM time':>10} {'wall':>10} {'exits':>8}")
    medians = {}
    for det, name in ((False, "normal"), (True, "deterministic")):
        vm_s = statistics.median(v for v, _, _ in results[det])
        wall = statistics.median(w for _, w, _ in results[det])
        exits = int(statistics.median(e for _, _, e in results[det]))
        medians[det] = vm_s
        print(f"{name:<15} {vm_s:>9.3f}s {wall:>9.3f}s {exits:>8}")
    print(f"deterministic VM time ÷ normal: {medians[True] / medians[False]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
