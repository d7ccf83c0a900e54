"""Fork-server workers against spawned ones, in one invocation: P7 (32 VMs to each VM's first
recorded exit) and worker USS.

    .venv/bin/python bench/bench_fork_server.py [--base REV] [--vms N] [--rounds R] [--uss-vms N]

The comparison is with the code before the fork server, not a switch in the product: REV (by
default the parent of the commit that added vmworker/forkserver.py) is unpacked with `git archive`
into a temporary directory and run with PYTHONPATH and cwd pointing there (`python -m` puts the cwd
first on sys.path). Rounds alternate base / fork server, so a change of load hits both.

P7, per round: bench_launch32's measure (the max over the VMs of command start -> first recorded
exit). USS: `vmsup launch seed16 --vms N --mem 16M -q --no-trace --timeout 60`, each worker's
Private_Clean + Private_Dirty (smaps_rollup) and Pss once its VmRSS holds still; a forked worker
shares the template's imported pages until it writes them. The load average is printed; with
other work on the machine, compare the two columns of one run, not runs of different days.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

from bench_launch32 import TRACE, launch
from bench_rss import rollup_kib, settle, vmsup_ps
from benchlib import BUILD_DIR, REPO, VMSUP, BenchError, check_prerequisites, tail_of

START_DEADLINE = 30.0


def base_commit() -> str:
    """The newest commit of HEAD's history without the fork server."""
    out = subprocess.run(["git", "log", "--format=%H", "--diff-filter=A", "--", "vmworker/forkserver.py"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    if not out:
        raise BenchError("no commit adds vmworker/forkserver.py: nothing to compare with")
    return out[-1] + "^"


def unpack(rev: str, into: str) -> None:
    archive = subprocess.run(["git", "archive", rev], cwd=REPO, capture_output=True, check=False)
    if archive.returncode != 0:
        raise BenchError(f"git archive {rev}: {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", into], input=archive.stdout, check=True)


def worker_uss(cwd, env: dict, vms: int) -> list[dict]:
    """Per worker of a background launch: Private (USS) and Pss in KiB, once settled."""
    xdg = tempfile.mkdtemp(prefix="vmsup-bench-fork-")
    os.chmod(xdg, 0o700)
    env = {**env, "XDG_RUNTIME_DIR": xdg}
    cmd = [str(VMSUP), "launch", "seed16", "--vms", str(vms), "--mem", "16M", "-q", "--no-trace", "--timeout", "60"]
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + START_DEADLINE
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"`{' '.join(cmd)}` showed no running workers:\n{tail_of(proc.stderr.read().decode())}")
            runs = vmsup_ps(env)
            rows = runs[0]["vms"] if runs else []
            if len(rows) == vms and all(r["pid"] and r["state"] in ("starting", "running") for r in rows):
                break
            time.sleep(0.25)
        out = []
        for r in rows:
            settle(r["pid"], 1.0)
            out.append(rollup_kib(r["pid"]))
        return out
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(xdg, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=None, help="the commit to compare with [the one before the fork server]")
    parser.add_argument("--vms", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--uss-vms", type=int, default=4)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="vmsup-bench-base-")
    try:
        check_prerequisites()
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        rev = args.base or base_commit()
        unpack(rev, tmp)
        base_env = {**os.environ, "PYTHONPATH": tmp}
        variants = {"spawn (base)": (tmp, base_env), "fork server": (REPO, dict(os.environ))}
        print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {os.cpu_count()} CPUs; base {rev}")
        worst = {name: [] for name in variants}
        for n in range(args.rounds):
            for name, (cwd, env) in variants.items():
                rows = launch(args.vms, TRACE, cwd=cwd, env=env)["rows"].values()
                firsts = sorted(r["first"] for r in rows)
                worst[name].append(firsts[-1])
                print(f"round {n + 1}, {name:<13}: {args.vms} VMs' first recorded exit: max {firsts[-1]:.3f} s, "
                      f"median {statistics.median(firsts):.3f} s")
        uss = {name: worker_uss(cwd, env, args.uss_vms) for name, (cwd, env) in variants.items()}
    except BenchError as e:
        print(f"bench_fork_server: {e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for name in variants:
        rows = uss[name]
        print(f"{name:<13}: P7 max over {args.vms} VMs, median of {args.rounds} rounds: "
              f"{statistics.median(worst[name]):.3f} s (rounds: {', '.join(f'{w:.3f}' for w in worst[name])}); "
              f"worker USS {statistics.median(r['Private'] for r in rows) / 1024:.1f} MiB, "
              f"Pss {statistics.median(r['Pss'] for r in rows) / 1024:.1f} MiB (median of {len(rows)} workers, "
              f"guest 16M, seed16)")
    base, fork = (statistics.median(w) for w in worst.values())
    print(f"fork server / spawn: P7 {fork / base:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
