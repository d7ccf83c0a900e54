"""Step traces: instructions recorded per second against a bare Python single-step loop, in one run.

    .venv/bin/python bench/bench_steps.py [GUEST] [N] [ROUNDS]    # defaults: mbkernel, 6000, 6

The bare loop builds the VM as a worker does (vmworker.machine.Machine), turns on
KVM_GUESTDBG_SINGLESTEP and calls KVM_RUN N times, recording nothing; every return is one
instruction (a debug exit; on the rare port-I/O exit the instruction is finished by the next
KVM_RUN, which traps after the instruction after it, so that return counts for the two).
The step trace is `vmsup launch GUEST --step-trace --steps N` with a trace; its rate comes from
the recorded rows' own timestamps (first to last step), so start-up and the recorder do not
count. Rounds alternate the two (the machine is shared); printed: the best of each compared, and
the median of each round's ratio (a loaded machine makes single rounds vary by 2x).
Prints both rates and the ratio (goal: >= 0.8). mbkernel's first thousands of instructions clear
the screen, no exits among them: the per-instruction cost alone. seed16 makes a port write
every third instruction, which costs a step trace one more KVM_RUN each (step_trace.complete).
"""

from __future__ import annotations

import fcntl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from supervisor.guests import resolve_guest  # noqa: E402
from tracetool.trace import TraceReader  # noqa: E402
from vmworker import kvm_abi as abi  # noqa: E402
from vmworker.devices.console import Console  # noqa: E402
from vmworker.devices.serial_input import SerialInput  # noqa: E402
from vmworker.devices.standard import StandardDevices  # noqa: E402
from vmworker.loader import load_image  # noqa: E402
from vmworker.machine import Machine  # noqa: E402

VMSUP = Path(sys.executable).parent / "vmsup"


def bare_rate(guest: str, n: int) -> float:
    image = load_image(guest)
    devices = StandardDevices(Console(None, False), SerialInput.empty())
    with Machine("bare", image, 16 << 20, 1, devices.port_bus, devices.mmio_bus, irqchip=image.is_kernel) as machine:
        vcpu = machine.vm.vcpus[0]
        vcpu.set_guest_debug(abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_SINGLESTEP)
        fd, ioctl, run = vcpu.fd, fcntl.ioctl, abi.KVM_RUN
        t0 = time.perf_counter()
        for _ in range(n):
            ioctl(fd, run, 0)
        return n / (time.perf_counter() - t0)


def traced_rate(guest: str, n: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "steps.vmtrace"
        subprocess.run([str(VMSUP), "launch", guest, "--step-trace", "--steps", str(n), "--timeout", "1",
                        "--serial-in", "none", "--quiet", "--trace", str(trace)],
                       check=False, capture_output=True, timeout=300)
        with TraceReader(trace) as reader:
            times = [int(t) for b in reader.step_batches() for t in b.cols["t"]]
        if len(times) != n:
            raise SystemExit(f"bench_steps: the trace holds {len(times)} steps, expected {n}")
        return (n - 1) / ((times[-1] - times[0]) / 1e9)


def main(argv: list[str]) -> int:
    name = argv[0] if argv else "mbkernel"
    n = int(argv[1]) if len(argv) > 1 else 6000
    rounds = int(argv[2]) if len(argv) > 2 else 6
    guest = str(resolve_guest(name).path) if not Path(name).exists() else name
    bare, traced = [], []
    for _ in range(rounds):
        bare.append(bare_rate(guest, n))
        traced.append(traced_rate(guest, n))
    b, t = max(bare), max(traced)
    print(f"bare single-step loop: {b:,.0f} instructions/s (best of {rounds}: {', '.join(f'{x:,.0f}' for x in bare)})")
    print(f"step trace (recorded): {t:,.0f} instructions/s (best of {rounds}: {', '.join(f'{x:,.0f}' for x in traced)})")
    paired = sorted(tr / br for tr, br in zip(traced, bare))
    print(f"ratio: {t / b:.2f} best over best; {statistics.median(paired):.2f} median of the {rounds} paired rounds "
          f"(goal >= 0.8) — {name}, {n} instructions")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
