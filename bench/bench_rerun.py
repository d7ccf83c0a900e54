"""Rerun speed ÷ recording speed of the same guest, in one invocation.

    .venv/bin/python bench/bench_rerun.py [GUEST] [EXITS] [ROUNDS]    # defaults: seed16, 200000, 3

Each round records `vmsup launch GUEST --max-exits EXITS --quiet` into a trace and reruns that
trace (`python -m vmworker.rerun`, what `vmtrace rerun` starts). The recording's rate comes from its
rows' own timestamps (first to last exit), the rerun's from the rerun's own loop (first KVM_RUN to
the last compared exit, reading the recorded blocks included), so start-up counts for neither.
Rounds alternate the two (the machine is shared); the best of each is compared. Prints both rates
and the ratio (goal: >= 0.8).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tracetool.trace import TraceReader  # noqa: E402

VMSUP = Path(sys.executable).parent / "vmsup"


def record(guest: str, exits: int, trace: Path) -> float:
    subprocess.run([str(VMSUP), "launch", guest, "--max-exits", str(exits), "--quiet", "--trace", str(trace)],
                   check=True, capture_output=True)
    with TraceReader(trace) as reader:
        t = reader.exits()["t_exit"]
    return (len(t) - 1) / ((int(t[-1]) - int(t[0])) / 1e9)


def rerun(trace: Path) -> float:
    proc = subprocess.run([sys.executable, "-m", "vmworker.rerun", str(trace)], capture_output=True, text=True,
                          cwd=REPO)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if not result.get("identical"):
        raise SystemExit(f"rerun not identical: {result}")
    return result["exits_per_second"]


def main() -> None:
    guest = sys.argv[1] if len(sys.argv) > 1 else "seed16"
    exits = int(sys.argv[2]) if len(sys.argv) > 2 else 200_000
    rounds = int(sys.argv[3]) if len(sys.argv) > 3 else 3
    recorded, reran = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            trace = Path(tmp) / f"r{i}.vmtrace"
            recorded.append(record(guest, exits, trace))
            reran.append(rerun(trace))
            print(f"round {i + 1}: recording {recorded[-1]:,.0f} exits/s, rerun {reran[-1]:,.0f} exits/s")
    best_rec, best_rerun = max(recorded), max(reran)
    print(f"{guest}, {exits:,} exits: recording {best_rec:,.0f} exits/s, rerun {best_rerun:,.0f} exits/s, "
          f"ratio {best_rerun / best_rec:.2f} (goal >= 0.8)")


if __name__ == "__main__":
    main()
