"""Snapshot size and time for 16 MiB and 256 MiB guests, and restore to first exit.

    .venv/bin/python bench/bench_snapshot.py [--rounds R] [--sizes 16M,256M]

In one process, with the worker's own code (Machine, StandardDevices, vmworker.snapshot):
  take     seed16 runs on its vCPU thread; pause, park, save (vmworker.snapshot.take), resume.
           Twice per size: memory as the guest left it (almost all zero pages), and every page
           filled with random bytes (zstd's worst case: what a busy guest's RAM costs).
  restore  from the file to the first exit: read and check the file, build a fresh Machine
           with the same image, put the state back, one KVM_RUN until the guest's next exit.
Medians over R rounds. `vmsup snapshot` through the control socket adds the CLI's start-up
(~0.4 s of Python imports) on top of `take`.

A benchmark, not a test: it exits non-zero only when something fails.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vmworker.devices.console import Console  # noqa: E402
from vmworker.devices.serial_input import SerialInput  # noqa: E402
from vmworker.devices.standard import StandardDevices  # noqa: E402
from vmworker.exits import IoOut  # noqa: E402
from vmworker.loader import load_image  # noqa: E402
from vmworker.machine import Machine  # noqa: E402
from vmworker.setting_values import parse_size  # noqa: E402
from vmworker.snapshot import Snapshot, take  # noqa: E402
from vmworker.spec import VmSpec  # noqa: E402
from vmworker.status import End  # noqa: E402

GUEST = str(REPO / "guest" / "seed16.bin")


def _machine(mem: int):
    image = load_image(GUEST)
    devices = StandardDevices(Console(open(os.devnull, "wb"), line_buffered=False), SerialInput.empty(), mem_size=mem)
    return image, devices, Machine("bench", image, mem, 1, devices.port_bus, devices.mmio_bus)


def take_once(mem: int, path: str, random_fill: bool) -> tuple[float, int]:
    image, devices, machine = _machine(mem)
    spec = VmSpec(guest=GUEST, mem=mem)
    with machine:
        if random_fill:  # above the guest's 64 KiB page: what a guest that used its RAM leaves
            region = machine.memory.regions[0].mapping
            step = 1 << 24
            for off in range(1 << 20, mem, step):
                region[off:min(off + step, mem)] = os.urandom(min(step, mem - off))
        replies: list = []

        def snapshotter() -> None:  # machine.run() must own the main thread (it sets a signal handler)
            try:
                time.sleep(0.2)  # let it count
                machine.pause()
                if not machine.wait_parked(10):
                    raise RuntimeError("the vCPU did not park")
                replies.append(take(path, machine, devices, [None], spec, image.sha256))
            except Exception as e:
                replies.append(e)
            finally:
                machine.stop(End.STOPPED)

        threading.Thread(target=snapshotter, daemon=True).start()
        machine.run()
    reply = replies[0]
    if isinstance(reply, Exception):
        raise SystemExit(f"snapshot failed: {reply}")
    return reply["seconds"], reply["bytes"]


def restore_once(mem: int, path: str) -> float:
    t0 = time.perf_counter()
    snap = Snapshot(path)
    image, devices, machine = _machine(mem)
    with machine:
        snap.check_fits(VmSpec(guest=GUEST, mem=mem), image.sha256, False)
        snap.restore(machine, devices)
        exit_ = machine.vm.vcpus[0].run()
        elapsed = time.perf_counter() - t0
        if not isinstance(exit_, IoOut):
            raise SystemExit(f"first exit after restore: {exit_!r}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sizes", default="16M,256M")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.vmsnap")
        print(f"{'guest RAM':>9} {'memory':>8} {'take s':>8} {'file bytes':>13} {'MiB/s':>8} {'restore→exit s':>15}")
        for size in args.sizes.split(","):
            mem = parse_size(size)
            for random_fill in (False, True):
                takes, sizes, restores = [], [], []
                for _ in range(args.rounds):
                    seconds, nbytes = take_once(mem, path, random_fill)
                    takes.append(seconds)
                    sizes.append(nbytes)
                    restores.append(restore_once(mem, path))
                t = statistics.median(takes)
                print(f"{size:>9} {'random' if random_fill else 'as left':>8} {t:8.3f} {int(statistics.median(sizes)):13,} "
                      f"{mem / t / (1 << 20):8.0f} {statistics.median(restores):15.3f}")
    print(f"load: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f} (1/5/15 min), {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
