"""Soak: 8 VMs of mixed guests for N minutes; RSS and open fds of every process sampled, the
slope of each long-lived process over the last 10 minutes printed (--window; the last half of a
shorter run), pass/fail, and
`vmtrace verify` of the trace at the end (issue 11, goal R6).

    .venv/bin/python bench/soak.py [--minutes 30] [--interval 5]

Guests that end quickly (hello, mmio, protected32, long64) restart (--restart always
--startsecs 0), so the run also exercises restarts; seed16 ×3 and mbkernel run throughout.
A process passes when, over that window, its RSS grows by at most --rss-slope KiB/min and its fd
count by at most --fd-slope per minute (the supervisor's and the recorder's fds rise and fall as
workers restart: a trend is judged, not the swing). Short-lived workers are counted, not judged.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from runlib import Launch, fd_count, fresh_trace, rss_kib, verify, BUILD

GUESTS = ["seed16", "seed16", "seed16", "mbkernel", "hello", "mmio", "protected32", "long64"]


def slope_per_minute(t: list[float], v: list[float]) -> float:
    if len(t) < 3 or t[-1] == t[0]:
        return 0.0
    return float(np.polyfit(np.asarray(t) / 60.0, np.asarray(v, float), 1)[0])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--rss-slope", type=float, default=256.0, help="KiB/min a process may grow by (noise)")
    ap.add_argument("--fd-slope", type=float, default=2.0, help="fds/min a process may grow by (noise)")
    ap.add_argument("--window", type=float, default=10.0,
                    help="minutes at the end of the run the slopes are taken over (at most half the run)")
    args = ap.parse_args()
    trace = fresh_trace("soak.vmtrace")
    launch = Launch([*GUESTS, "-q", "--trace", str(trace), "--restart", "always", "--startsecs", "0",
                     "--backoff-max", "1"], BUILD / "soak.err")
    samples: dict[int, dict] = {}  # pid -> {"role", "t", "rss", "fds"}
    start = time.monotonic()
    end = start + args.minutes * 60
    while time.monotonic() < end and launch.proc.poll() is None:
        now = time.monotonic() - start
        procs = {launch.pid: "supervisor"}
        for pid, cmd in launch.children().items():
            procs[pid] = "recorder" if "supervisor.recorder" in cmd else "worker"
        for pid, role in procs.items():
            rss, fds = rss_kib(pid), fd_count(pid)
            if rss is None or fds is None:
                continue
            s = samples.setdefault(pid, {"role": role, "t": [], "rss": [], "fds": []})
            s["t"].append(now)
            s["rss"].append(rss)
            s["fds"].append(fds)
        time.sleep(args.interval)
    ps = {vm["pid"]: vm["name"] for vm in launch.ps() if vm.get("pid")}
    code = launch.stop()
    ok_verify, verify_line = verify(trace)

    half = args.minutes * 60 / 2
    window = min(args.window * 60, half)
    window_start = args.minutes * 60 - window
    failed = []
    print(f"soak: {len(GUESTS)} VMs ({', '.join(GUESTS)}), {args.minutes:g} min, a sample every {args.interval:g} s")
    print(f"{'pid':>7} {'role':<10} {'vm':<12} {'n':>4} {'rss KiB first→last':>22} {f'KiB/min (last {window / 60:g} min)':>22} "
          f"{'fds first→last':>15} {'fds/min':>8}  verdict")
    short = 0
    for pid, s in sorted(samples.items(), key=lambda kv: (kv[1]["role"], kv[0])):
        long_lived = s["t"][0] < half / 2 and s["t"][-1] > args.minutes * 60 - 2 * args.interval
        if not long_lived:
            short += 1
            continue
        idx = [i for i, t in enumerate(s["t"]) if t >= window_start]
        t2, r2, f2 = ([s[k][i] for i in idx] for k in ("t", "rss", "fds"))
        rslope = slope_per_minute(t2, r2)
        fslope = slope_per_minute(t2, f2)
        ok = rslope <= args.rss_slope and fslope <= args.fd_slope
        if not ok:
            failed.append(pid)
        print(f"{pid:>7} {s['role']:<10} {ps.get(pid, ''):<12} {len(s['t']):>4} {s['rss'][0]:>10}→{s['rss'][-1]:<10} "
              f"{rslope:>22.1f} {s['fds'][0]:>7}→{s['fds'][-1]:<7} {fslope:>8.2f}  {'ok' if ok else 'GROWS'}")
    print(f"short-lived workers (restarts) seen: {short}")
    print(f"launch exit code {code}; vmtrace verify: {'ok' if ok_verify else 'FAILED'} ({verify_line})")
    passed = not failed and ok_verify
    print(f"soak: {'PASS' if passed else 'FAIL'}")
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
