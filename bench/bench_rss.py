"""P6: a worker's memory beyond its guest's RAM — goal <= 25 MiB.

    .venv/bin/python bench/bench_rss.py [--settle S]     # default: 1.0

Runs, one at a time and each in its own private XDG_RUNTIME_DIR,
    vmsup launch GUEST --mem M --quiet --no-trace --timeout 60
for GUEST in seed16 (the seed: a few guest pages) and touch8m (written to bench/build/: protected
mode, one byte per 4 KiB page from 1 MiB to 9 MiB, then `jmp $` — a bigger working set), and M in
16M and 256M. Once `vmsup ps --json` shows the worker, its memory is sampled every 0.25 s until
VmRSS has not changed for S seconds (the guest has touched what it will touch), then:

  - VmRSS, RssAnon, RssFile, RssShmem from /proc/PID/status (the worker as the kernel counts it);
  - the guest RAM mapping's Rss from /proc/PID/smaps (the one anonymous mapping of exactly M
    bytes, vmworker.memory: mmap MAP_PRIVATE|MAP_ANONYMOUS|MAP_NORESERVE) = guest pages touched;
  - beyond guest = VmRSS - guest pages touched: what P6 is about (the verdict uses it);
  - USS beyond guest = Private_Clean + Private_Dirty (/proc/PID/smaps_rollup) - guest pages
    touched: the same without shared library pages other processes hold too (what a 32nd
    worker really adds).

Baseline: a bare `python3 -c 'import time; time.sleep(5)'` (the venv's interpreter), its VmRSS:
the floor for any Python worker. The supervisor's and the recorder's RSS are printed once for
context. This is a benchmark: it exits non-zero only when something fails to run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from benchlib import BUILD_DIR, REPO, VMSUP, BenchError, check_prerequisites, tail_of
from runlib import children

GOAL_MIB = 25.0
MIB = 1 << 20
STEP = 0.25
START_DEADLINE = 30.0
SETTLE_DEADLINE = 20.0
# touch8m: protected mode, paging off, linked at 0x10000 (bytes, then the instruction).
TOUCH_8M = bytes.fromhex(
    "bf00001000"  # mov edi, 0x100000        1 MiB: above the guest image and the VMM's tables
    "c60701"  # 1: mov byte [edi], 1
    "81c700100000"  # add edi, 0x1000          one byte per 4 KiB page
    "81ff00009000"  # cmp edi, 0x900000        up to 9 MiB: 2048 pages, 8 MiB
    "72ef"  # jb 1b
    "ebfe")  # jmp $                       keep them, make no exits
TOUCH_8M_PATH = BUILD_DIR / "touch8m.bin"
CASES = [("seed16", [], "16M"), ("seed16", [], "256M"),
         ("touch8m", ["--mode", "protected"], "16M"), ("touch8m", ["--mode", "protected"], "256M")]


def status_kib(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def rollup_kib(pid: int) -> dict[str, int]:
    """Pss and Private (clean + dirty) from /proc/PID/smaps_rollup: what is the worker's own."""
    out = {"Pss": 0, "Private": 0}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == "Pss":
                out["Pss"] = int(value.split()[0])
            elif key in ("Private_Clean", "Private_Dirty"):
                out["Private"] += int(value.split()[0])
    return out


def guest_mapping_kib(pid: int, mem_bytes: int) -> tuple[int, int]:
    """(Rss, AnonHugePages) in KiB of the anonymous mapping of exactly mem_bytes (the guest RAM)."""
    found, current = [], None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:  # a mapping's header line
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                anonymous = len(head) == 5
                current = {} if anonymous and hi - lo == mem_bytes else None
                if current is not None:
                    found.append(current)
            elif current is not None and head[0] in ("Rss:", "AnonHugePages:"):
                current[head[0][:-1]] = int(head[1])
    if len(found) != 1:
        raise BenchError(f"worker {pid}: {len(found)} anonymous mappings of {mem_bytes} bytes, expected 1 (guest RAM)")
    return found[0].get("Rss", 0), found[0].get("AnonHugePages", 0)


def settle(pid: int, settle_s: float) -> dict[str, int]:
    """Sample until VmRSS holds still for settle_s; the last sample."""
    deadline = time.monotonic() + SETTLE_DEADLINE
    last, since = None, time.monotonic()
    while True:
        sample = status_kib(pid)
        if last is None or sample["VmRSS"] != last["VmRSS"]:
            since = time.monotonic()
        elif time.monotonic() - since >= settle_s:
            return sample
        if time.monotonic() > deadline:
            print(f"note: worker {pid}'s RSS still moving after {SETTLE_DEADLINE:g} s; using the last sample")
            return sample
        last = sample
        time.sleep(STEP)


def bare_python_rss() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        time.sleep(1.0)  # past interpreter start-up
        return settle(proc.pid, 0.5)["VmRSS"]
    finally:
        proc.kill()
        proc.wait()


def vmsup_ps(env: dict) -> list[dict]:
    res = subprocess.run([str(VMSUP), "ps", "--json"], capture_output=True, text=True, env=env, cwd=REPO)
    if res.returncode != 0:
        raise BenchError(f"vmsup ps --json exited {res.returncode}: {tail_of(res.stderr)}")
    return json.loads(res.stdout)


def measure(guest: str, extra: list[str], mem: str, settle_s: float, context: bool) -> dict:
    mem_bytes = int(mem[:-1]) * MIB
    xdg = tempfile.mkdtemp(prefix="vmsup-bench-rss-")
    os.chmod(xdg, 0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": xdg}
    image = str(TOUCH_8M_PATH) if guest == "touch8m" else guest
    cmd = [str(VMSUP), "launch", image, *extra, "--mem", mem, "--quiet", "--no-trace", "--timeout", "60"]
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + START_DEADLINE
        pid = None
        while pid is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                err.seek(0)
                raise BenchError(f"`{' '.join(cmd)}` showed no running worker (exit {proc.returncode}):\n"
                                 f"{tail_of(err.read().decode(errors='replace'))}")
            runs = vmsup_ps(env)
            vms = runs[0]["vms"] if runs and runs[0].get("vms") else []
            if vms and vms[0]["pid"] and vms[0]["state"] in ("starting", "running"):
                pid = vms[0]["pid"]
            else:
                time.sleep(STEP)
        status = settle(pid, settle_s)
        guest_rss, guest_huge = guest_mapping_kib(pid, mem_bytes)
        status.update(rollup_kib(pid))
        if context:
            for child, cmdline in children(proc.pid).items():
                if "supervisor.recorder" in cmdline:
                    print(f"context: supervisor VmRSS {status_kib(proc.pid)['VmRSS'] / 1024:.1f} MiB, "
                          f"recorder VmRSS {status_kib(child)['VmRSS'] / 1024:.1f} MiB")
        return {"guest": guest, "mem": mem, "pid": pid, **status, "guest_rss": guest_rss, "guest_huge": guest_huge}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # a graceful stop of the whole run
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        err.close()
        shutil.rmtree(xdg, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settle", type=float, default=1.0, help="seconds VmRSS must hold still [1.0]")
    args = parser.parse_args()
    try:
        check_prerequisites()
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        TOUCH_8M_PATH.write_bytes(TOUCH_8M)
        print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        base = bare_python_rss()
        print(f"baseline: bare `python3 -c 'import time; time.sleep(5)'` VmRSS {base / 1024:.1f} MiB")
        rows = [measure(guest, extra, mem, args.settle, context=i == 0) for i, (guest, extra, mem) in enumerate(CASES)]
    except BenchError as e:
        print(f"bench_rss: {e}", file=sys.stderr)
        return 1

    head = (f"{'guest':<8} {'--mem':>5} {'VmRSS':>7} {'RssAnon':>8} {'RssFile':>8} {'RssShmem':>8} "
            f"{'guest touched':>13} {'beyond guest':>12} {'- bare py':>9} {'USS beyond':>10}")
    print(head)
    print("-" * len(head))
    worst = worst_uss = 0.0
    for r in rows:
        beyond = (r["VmRSS"] - r["guest_rss"]) / 1024
        uss = (r["Private"] - r["guest_rss"]) / 1024
        worst, worst_uss = max(worst, beyond), max(worst_uss, uss)
        huge = f" (THP {r['guest_huge'] / 1024:.0f})" if r["guest_huge"] else ""
        print(f"{r['guest']:<8} {r['mem']:>5} {r['VmRSS'] / 1024:>7.1f} {r['RssAnon'] / 1024:>8.1f} "
              f"{r['RssFile'] / 1024:>8.1f} {r['RssShmem'] / 1024:>8.1f} {r['guest_rss'] / 1024:>13.2f}{huge} "
              f"{beyond:>12.1f} {beyond - base / 1024:>9.1f} {uss:>10.1f}")
    print("(MiB; guest touched = Rss of the guest RAM mapping in /proc/PID/smaps; - bare py = beyond guest minus "
          "the bare interpreter's VmRSS; USS beyond = Private_Clean + Private_Dirty (smaps_rollup) minus guest "
          "touched: pages no other process shares)")
    verdict = "met" if worst <= GOAL_MIB else "MISSED"
    print(f"P6: worker RSS beyond guest RAM, worst case {worst:.1f} MiB against the goal <= {GOAL_MIB:g} MiB: "
          f"{verdict} (ratio {worst / GOAL_MIB:.2f}); unshared (USS) {worst_uss:.1f} MiB "
          f"(ratio {worst_uss / GOAL_MIB:.2f}); the bare interpreter alone is {base / 1024:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
