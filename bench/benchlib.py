"""What the bench scripts share: paths, building the C loop, running a program and reading the
`N exits in T s` line it prints, and vmsup's `trace PATH: …` line.

Not a benchmark itself. The scripts run as `python bench/NAME.py`, so bench/ is on sys.path.
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "bench"
BUILD_DIR = BENCH_DIR / "build"
C_SOURCE = BENCH_DIR / "c_seed_loop.c"
C_BINARY = BUILD_DIR / "c_seed_loop"
BARE_PYTHON = BENCH_DIR / "bare_python_loop.py"
GUEST = REPO / "guest" / "seed16.bin"
BIN_DIR = Path(sys.executable).parent
VMSUP = BIN_DIR / "vmsup"

# `c-loop: N exits in T s`, `bare-python: N exits in …`, `vmsup: NAME: STATUS — N exits in T s …`
RESULT_RE = re.compile(r"(\d+) exits in ([0-9.]+) s")
WALL_RE = re.compile(r"exits/s\), wall ([0-9.]+) s")
# `vmsup: trace PATH: E events in B batches, no gaps` / `…, G gaps (L events lost)`
TRACE_RE = re.compile(r"trace (.+): (\d+) events in (\d+) batches, (?:no gaps|(\d+) gaps \((\d+) events lost\))")


class BenchError(Exception):
    """Something failed to build or run: the bench ends with exit status 1."""


@dataclass
class Run:
    exits: int
    loop_s: float  # the run loop, as reported by the program
    wall_s: float  # the whole process, as seen from here
    stdout: str = ""
    stderr: str = ""

    @property
    def rate(self) -> float:
        return self.exits / self.loop_s


@dataclass
class TraceLine:
    path: str
    events: int
    batches: int
    gaps: int
    lost: int


def check_prerequisites(need_vmsup: bool = True) -> None:
    if not GUEST.is_file():
        raise BenchError(f"{GUEST} is missing (build it with `make -C guest`)")
    if need_vmsup and not VMSUP.is_file():
        raise BenchError(f"{VMSUP} is missing (install the project into this venv: "
                         f"{BIN_DIR / 'pip'} install -e '{REPO}[dev]')")


def build_c_loop() -> None:
    if shutil.which("cc") is None:
        raise BenchError("no C compiler `cc` on PATH")
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    cmd = ["cc", "-O2", "-Wall", "-o", str(C_BINARY), str(C_SOURCE)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed:\n{res.stderr}")


def tail_of(text: str, limit: int = 2000) -> str:
    return text.strip()[-limit:]


def run_one(name: str, cmd: list[str], exits: int | None, *, env: dict | None = None,
            ok_codes: tuple[int, ...] = (0,)) -> Run:
    """Run `cmd` to completion; its `N exits in T s` line and the wall time around it."""
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, stdin=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    return parse_run(name, cmd, res.returncode, res.stdout, res.stderr, wall, exits, ok_codes=ok_codes)


def parse_run(name: str, cmd: list[str], returncode: int, stdout: str, stderr: str, wall: float,
              exits: int | None, ok_codes: tuple[int, ...] = (0,)) -> Run:
    output = stdout + "\n" + stderr
    if returncode not in ok_codes:
        raise BenchError(f"{name}: `{' '.join(cmd)}` exited with {returncode}:\n{tail_of(output)}")
    match = RESULT_RE.search(stdout) or RESULT_RE.search(stderr)
    if match is None:
        raise BenchError(f"{name}: no 'N exits in T s' in its output:\n{tail_of(output)}")
    done, loop_s = int(match.group(1)), float(match.group(2))
    if loop_s <= 0:
        raise BenchError(f"{name}: reported a run loop of {loop_s} s")
    if exits is not None and done != exits:
        print(f"warning: {name} reported {done} exits, asked for {exits}", file=sys.stderr)
    return Run(done, loop_s, wall, stdout, stderr)


def trace_line(name: str, stderr: str) -> TraceLine:
    match = TRACE_RE.search(stderr)
    if match is None:
        raise BenchError(f"{name}: no 'trace PATH: E events in B batches, …' line on stderr:\n{tail_of(stderr)}")
    path, events, batches, gaps, lost = match.groups()
    return TraceLine(path, int(events), int(batches), int(gaps or 0), int(lost or 0))


def median(values) -> float:
    return statistics.median(list(values))


def fmt_rate(rate: float) -> str:
    return f"{rate:,.0f}"
