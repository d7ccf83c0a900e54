"""What a live `vmsup tail --json` costs a recording VM (P1 with and without a tail attached).

    .venv/bin/python bench/bench_tail.py [--exits N] [--pairs P]    # defaults: 2000000, 3

Each run starts
    vmsup launch seed16 --max-exits N --quiet --trace bench/build/tail.vmtrace
with its own private XDG_RUNTIME_DIR (a fresh temporary directory), so neither the bench nor the
tail can ever attach to somebody else's launch. The bench waits until the run directory (run.json
and live.sock) exists; in a "with" run it then starts
    vmsup tail --json > /dev/null
in the same environment, which attaches to that run and follows it until the run is gone. The
figure is the run-loop rate from the launch's status line (N exits / T, T = first KVM_RUN to last
exit), so process start-up and teardown are left out; the tail attaches a fraction of a second
into a run of ~N/85k seconds. With and without alternate (with/without, then without/with, …).

Printed: one row per pair with both rates and the change (with - without) / without in %, the
median change against the goal (under 2% slower), and what the tail reported missing on its
stderr (the live stream is best effort; the trace must still have no gaps).

This is a benchmark, not a test: it exits non-zero only when something fails to run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib import (BUILD_DIR, REPO, VMSUP, BenchError, Run, check_prerequisites, fmt_rate, median, parse_run,
                      tail_of, trace_line)

GOAL_SLOWDOWN_PCT = 2.0
TRACE = BUILD_DIR / "tail.vmtrace"
RUN_DIR_TIMEOUT = 30.0
LAUNCH_GRACE = 120.0  # beyond N / 20k exits/s, a launch that has not ended is stuck
TAIL_END_TIMEOUT = 15.0  # the tail notices the run is gone within its poll interval
MISSED_RE = re.compile(r"missed (\d+) events in total")


@dataclass
class TailRun:
    run: Run
    attached_after_s: float | None = None  # from launch start to the tail process starting
    tail_missed: int = 0
    tail_notes: str = ""
    guest_us: float = 0.0  # mean time inside KVM_RUN per exit (the trace's guest_ns)
    handle_us: float = 0.0  # mean time from one exit to the next KVM_RUN (derived from the trace)
    launch_cpu_s: float = 0.0  # user + system CPU of vmsup launch, its recorder and its worker
    tail_cpu_s: float = 0.0  # user + system CPU of the tail process


def reap(proc: subprocess.Popen, timeout: float) -> tuple[int | None, float]:
    """Wait for `proc` with os.wait4 (which also gives its CPU time, its reaped descendants
    included); (exit code, CPU seconds), or (None, 0) on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid == proc.pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            return None, 0.0
        time.sleep(0.02)


def trace_timing(path: Path) -> tuple[float, float]:
    """Mean µs per exit inside KVM_RUN and between an exit and the next KVM_RUN, from the trace:
    tells a vCPU thread that waits for a CPU (both grow, KVM_RUN most: PVM runs the guest in the
    host kernel, where a preempted vCPU thread stays inside KVM_RUN) from a loop doing more work."""
    from tracetool.trace import TraceReader

    with TraceReader(path) as reader:
        cols = reader.exits()
    t, g = cols["t_exit"], cols["guest_ns"]
    if len(t) < 2:
        return 0.0, 0.0
    handle = (t[1:] - g[1:]) - t[:-1]
    return float(g.mean()) / 1e3, float(handle.mean()) / 1e3


def process_tree(root: int) -> list[str]:
    """One line per thread of `root` and its descendants: pid/tid, state, wchan, command. For
    the report when a launch does not end."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                procs[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(p for p, parent in procs.items() if parent == pid)
    lines = []
    for pid in tree:
        try:
            cmd = (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            for task in sorted((Path("/proc") / str(pid) / "task").iterdir(), key=lambda t: int(t.name)):
                state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
                wchan = (task / "wchan").read_text() or "-"
                comm = (task / "comm").read_text().strip()
                lines.append(f"{pid}/{task.name} {state} {wchan:<24} {comm:<16} {cmd[:100]}")
        except OSError:
            continue
    return lines


def wait_for_run_dir(base: Path, launch: subprocess.Popen) -> Path:
    """The launch's run directory under `base`, once its live socket is there."""
    deadline = time.monotonic() + RUN_DIR_TIMEOUT
    while time.monotonic() < deadline:
        if launch.poll() is not None:
            raise BenchError(f"the launch ended (exit code {launch.returncode}) before its run directory appeared")
        if base.is_dir():
            for entry in base.iterdir():
                if (entry / "run.json").is_file() and (entry / "live.sock").exists():
                    return entry
        time.sleep(0.01)
    raise BenchError(f"no run directory with run.json and live.sock under {base} after {RUN_DIR_TIMEOUT:.0f} s")


def one_run(exits: int, with_tail: bool) -> TailRun:
    cmd = [str(VMSUP), "launch", "seed16", "--max-exits", str(exits), "--quiet", "--trace", str(TRACE.relative_to(REPO))]
    tail_cmd = [str(VMSUP), "tail", "--json"]
    TRACE.unlink(missing_ok=True)  # vmsup refuses to overwrite a trace
    runtime = Path(tempfile.mkdtemp(prefix="bench-tail-"))  # mkdtemp: mode 0700, ours alone
    env = dict(os.environ, XDG_RUNTIME_DIR=str(runtime))
    launch = tail = None
    err_path = runtime / "launch.stderr"
    out_path = runtime / "launch.stdout"
    tail_err_path = runtime / "tail.stderr"
    try:
        with open(err_path, "w+") as err, open(out_path, "w+") as out:
            t0 = time.perf_counter()
            launch = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                      text=True)
            wait_for_run_dir(runtime / "vmsup", launch)
            attached = None
            if with_tail:
                with open(tail_err_path, "w") as tail_err:
                    tail = subprocess.Popen(tail_cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL, stderr=tail_err)
                attached = time.perf_counter() - t0
            limit = exits / 20_000 + LAUNCH_GRACE
            code, launch_cpu = reap(launch, limit)
            if code is None:
                err.seek(0)
                tail_note = ""
                if tail is not None:
                    tail_note = (f"\n`{' '.join(tail_cmd)}` is {'running' if tail.poll() is None else 'gone'}; its "
                                 f"stderr:\n{tail_of(tail_err_path.read_text()) or '(empty)'}")
                raise BenchError(
                    f"`{' '.join(cmd)}`{' with a tail' if with_tail else ''} did not end within {limit:.0f} s; its "
                    f"stderr so far:\n{tail_of(err.read()) or '(empty)'}{tail_note}\nprocesses (pid/tid state wchan):\n"
                    + "\n".join(process_tree(launch.pid) + (process_tree(tail.pid) if tail is not None else [])))
            wall = time.perf_counter() - t0
            err.seek(0)
            out.seek(0)
            stderr, stdout = err.read(), out.read()
        run = parse_run("vmsup launch", cmd, code, stdout, stderr, wall, exits)
        tl = trace_line("vmsup launch", stderr)
        if tl.gaps or tl.lost or tl.events < run.exits:
            print(f"warning: `{' '.join(cmd)}`{' with a tail' if with_tail else ''}: {run.exits} exits but the trace "
                  f"line says {tl.events} events, {tl.gaps} gaps ({tl.lost} events lost)", file=sys.stderr)
        result = TailRun(run, attached, launch_cpu_s=launch_cpu)
        result.guest_us, result.handle_us = trace_timing(TRACE)
        if tail is not None:
            code, tail_cpu = reap(tail, TAIL_END_TIMEOUT)
            if code is None:
                raise BenchError(f"`{' '.join(tail_cmd)}` did not end within {TAIL_END_TIMEOUT:.0f} s "
                                 f"after the launch ended")
            notes = tail_err_path.read_text()
            if code != 0:
                raise BenchError(f"`{' '.join(tail_cmd)}` exited with {code}:\n{tail_of(notes)}")
            match = MISSED_RE.search(notes)
            result.tail_missed = int(match.group(1)) if match else 0
            result.tail_notes = notes
            result.tail_cpu_s = tail_cpu
        return result
    finally:
        for proc in (tail, launch):
            if proc is not None and proc.poll() is None:
                proc.kill()  # only on an error path: our own child, by its pid
                proc.wait()
        shutil.rmtree(runtime, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exits", type=int, default=2_000_000, help="--max-exits of each launch (default 2000000)")
    parser.add_argument("--pairs", type=int, default=3, help="with/without pairs (default 3)")
    args = parser.parse_args(argv)
    if args.exits <= 0 or args.pairs <= 0:
        parser.error("--exits and --pairs must be positive")

    changes: list[float] = []
    with_runs: list[TailRun] = []
    without_runs: list[TailRun] = []
    try:
        check_prerequisites()
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        print(f"seed guest, P1 (--trace), {args.exits} exits per run, {args.pairs} pairs with/without a tail")
        print(f"  launch: {VMSUP} launch seed16 --max-exits {args.exits} --quiet --trace {TRACE.relative_to(REPO)}")
        print(f"  tail:   {VMSUP} tail --json > /dev/null   (private XDG_RUNTIME_DIR per run)")
        print(f"  {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start; cpu = user + system seconds "
              f"of the launch (supervisor, recorder, worker) and of the tail;")
        print("  in KVM_RUN / handling: mean us per exit from the trace, without -> with a tail\n")
        header = (f"{'pair':>4}  {'order':>7}  {'without/s':>9}  {'with tail/s':>11}  {'change %':>8}  "
                  f"{'attach s':>8}  {'tail missed':>11}  {'wall w/o':>8}  {'wall with':>9}  "
                  f"{'cpu w/o':>7}  {'cpu with':>8}  {'cpu tail':>8}  {'in KVM_RUN us':>13}  {'handling us':>11}")
        print(header)
        print("-" * len(header))
        for pair in range(1, args.pairs + 1):
            order = (True, False) if pair % 2 else (False, True)
            got = {}
            for with_tail in order:
                got[with_tail] = one_run(args.exits, with_tail)
            w, wo = got[True], got[False]
            with_runs.append(w)
            without_runs.append(wo)
            changes.append((w.run.rate - wo.run.rate) / wo.run.rate * 100)
            print(f"{pair:>4}  {'w, w/o' if order[0] else 'w/o, w':>7}  {fmt_rate(wo.run.rate):>9}  "
                  f"{fmt_rate(w.run.rate):>11}  {changes[-1]:>+8.2f}  {w.attached_after_s:>8.3f}  "
                  f"{w.tail_missed:>11,}  {wo.run.wall_s:>8.3f}  {w.run.wall_s:>9.3f}  "
                  f"{wo.launch_cpu_s:>7.2f}  {w.launch_cpu_s:>8.2f}  {w.tail_cpu_s:>8.2f}  "
                  f"{f'{wo.guest_us:.2f}->{w.guest_us:.2f}':>13}  {f'{wo.handle_us:.2f}->{w.handle_us:.2f}':>11}",
                  flush=True)
    except BenchError as exc:
        print(f"bench_tail: error: {exc}", file=sys.stderr)
        return 1

    med = median(changes)
    print()
    print(f"median rate without a tail: {fmt_rate(median(r.run.rate for r in without_runs)):>9} exits/s")
    print(f"median rate with a tail:    {fmt_rate(median(r.run.rate for r in with_runs)):>9} exits/s")
    print(f"median change with a tail (per pair): {med:+.2f}%  (min {min(changes):+.2f}%, max {max(changes):+.2f}%)")
    print(f"median CPU seconds: launch without a tail {median(r.launch_cpu_s for r in without_runs):.2f}, "
          f"launch with a tail {median(r.launch_cpu_s for r in with_runs):.2f}, the tail itself "
          f"{median(r.tail_cpu_s for r in with_runs):.2f} (median run loop with a tail "
          f"{median(r.run.loop_s for r in with_runs):.2f} s, on {os.cpu_count()} CPUs)")
    missed = [r.tail_missed for r in with_runs]
    print(f"events the tail reported missed (best-effort live stream): "
          f"{', '.join(f'{m:,}' for m in missed)} of {args.exits:,} per run")
    print(f"goal: slowdown with a tail < {GOAL_SLOWDOWN_PCT:.0f}% -> {'PASS' if -med < GOAL_SLOWDOWN_PCT else 'FAIL'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
