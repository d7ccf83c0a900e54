"""Remote recording: events/s and loss across two network namespaces against a local recorder.

    .venv/bin/python bench/bench_remote.py [--vms N] [--seconds S] [--rounds R]   (root: ip netns)

Each round runs, adjacent in time and in alternating order, under `perf stat -e kvm:kvm_pio`:
  L: vmsup launch seed16 --vms N --timeout S -q --trace bench/build/remote-local.vmtrace
  R: the same launch in one namespace with --recorder tcp://…, `vmsup record --listen` in another
     (a veth pair between them: tests/netns_pair.py), into bench/build/remote.vmtrace
A run's rate is its trace's io events over the span of their exit times (all VMs together); its
loss is the kernel's kvm_pio count minus those events (0 is lossless), and its gaps are listed.
The median of the per-round ratios R/L is reported. With --cut S, one more remote run has its link
cut (`ip link set … down`) for S seconds, 1.5 s in: its loss, gaps and how long the VMs waited.

A benchmark, not a test: it exits non-zero only when something fails to run.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchlib import BUILD_DIR, REPO, BenchError, median

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from netns_pair import NetnsPair, NetnsUnavailable  # noqa: E402
from tracetool import schema  # noqa: E402
from tracetool.trace import TraceReader  # noqa: E402

VMSUP = [sys.executable, "-m", "supervisor"]
PORT = 5555
PIO_RE = re.compile(r"^(\d+),,kvm:kvm_pio", re.M)


def figures(trace: Path, kernel_pio: int) -> dict:
    import numpy as np
    with TraceReader(trace) as r:
        ev = r.exits()
        gaps = r.gaps
    io = ev["reason"] == schema.REASON_CODES["io"]
    t = ev["t_exit"][io]
    span = (int(t.max()) - int(t.min())) / 1e9 if len(t) > 1 else 0.0
    events = int(np.sum(io))
    return {"events": events, "rate": events / span if span else 0.0, "lost": kernel_pio - events, "gaps": len(gaps)}


def run_launch(prefix: list[str], args: list[str]) -> tuple[int, str]:
    proc = subprocess.run([*prefix, "perf", "stat", "-x,", "-e", "kvm:kvm_pio", "--", *VMSUP, "launch", *args],
                          cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    if proc.returncode not in (0, 4):  # 4: ended by --timeout
        raise BenchError(f"launch failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    m = PIO_RE.search(proc.stderr)
    if not m:
        raise BenchError(f"no kvm_pio count from perf: {proc.stderr.strip()[-300:]}")
    return int(m.group(1)), proc.stderr


def local_round(vms: int, seconds: float) -> dict:
    trace = BUILD_DIR / "remote-local.vmtrace"
    pio, _ = run_launch([], ["seed16", "--vms", str(vms), "--timeout", str(seconds), "-q", "--trace", str(trace)])
    return figures(trace, pio)


def remote_round(pair: NetnsPair, keys: Path, vms: int, seconds: float, cut: float = 0.0) -> dict:
    trace = BUILD_DIR / "remote.vmtrace"
    rec = subprocess.Popen([*pair.run_in(pair.recorder_ns), *VMSUP, "record", "--listen", f"tcp://*:{PORT}",
                            "--trace", str(trace), "--keys-dir", str(keys)], cwd=REPO, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "listening on" not in line:
            line = rec.stderr.readline()
            if not line:
                raise BenchError("vmsup record did not start")
        if cut:
            threading.Thread(target=cut_link, args=(pair, cut), daemon=True).start()
        pio, err = run_launch(pair.run_in(pair.launch_ns),
                              ["seed16", "--vms", str(vms), "--timeout", str(seconds), "-q",
                               "--recorder", f"tcp://{pair.recorder_addr}:{PORT}", "--keys-dir", str(keys)])
    finally:
        rec.send_signal(signal.SIGINT)
        rec.communicate(timeout=120)
    out = figures(trace, pio)
    sent = re.search(r"backpressure: the link full ([0-9.]+) s, the VMs waiting ([0-9.]+) s", err)
    out["link_full"], out["vms_waiting"] = (float(sent.group(1)), float(sent.group(2))) if sent else (None, None)
    return out


def cut_link(pair: NetnsPair, seconds: float) -> None:
    time.sleep(1.5)  # the launch is running by then (its VMs start within a second here)
    pair.link(up=False)
    try:
        time.sleep(seconds)  # the outage itself
    finally:
        pair.link(up=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cut", type=float, default=0.0, help="then one remote run with the link cut this long")
    args = parser.parse_args()
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    try:
        pair = NetnsPair.create()
    except NetnsUnavailable as e:
        print(f"bench_remote: {e}", file=sys.stderr)
        return 2
    keys = BUILD_DIR / "remote-keys"
    try:
        subprocess.run([*VMSUP, "keys", "--dir", str(keys), "--force"], cwd=REPO, check=True, capture_output=True)
        print(f"load: {os.getloadavg()[0]:.1f} (1-min) on {os.cpu_count()} CPUs; {args.vms} seed16 VMs, "
              f"{args.seconds:g} s per launch")
        ratios = []
        for i in range(args.rounds):
            order = (("local", lambda: local_round(args.vms, args.seconds)),
                     ("remote", lambda: remote_round(pair, keys, args.vms, args.seconds)))
            got = dict((name, run()) for name, run in (order if i % 2 == 0 else order[::-1]))
            loc, rem = got["local"], got["remote"]
            ratios.append(rem["rate"] / loc["rate"] if loc["rate"] else 0.0)
            print(f"round {i + 1}: local {loc['rate']:,.0f} events/s (lost {loc['lost']}, gaps {loc['gaps']}); "
                  f"remote {rem['rate']:,.0f} events/s (lost {rem['lost']}, gaps {rem['gaps']}, link full "
                  f"{rem['link_full']} s, VMs waiting {rem['vms_waiting']} s); ratio {ratios[-1]:.2f}")
        print(f"remote/local events/s, median of {len(ratios)} rounds: {median(ratios):.2f}")
        if args.cut:
            c = remote_round(pair, keys, args.vms, args.seconds + args.cut, cut=args.cut)
            print(f"link cut for {args.cut:g} s: {c['events']} events, lost {c['lost']}, gaps {c['gaps']}; link full "
                  f"{c['link_full']} s, VMs waiting {c['vms_waiting']} s")
    except BenchError as e:
        print(f"bench_remote: {e}", file=sys.stderr)
        return 1
    finally:
        pair.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
