"""The bare Python KVM_RUN loop: the ceiling any Python vCPU loop can reach on this machine.

    .venv/bin/python bench/bare_python_loop.py [GUEST.bin] [N]      # defaults: guest/seed16.bin, 200000

Builds the seed VM exactly as a vmsup worker does (vmworker.loader.load_image, the standard
devices with a capture-only Console and an empty SerialInput, vmworker.machine.Machine: RAM,
boot tables, real-mode registers), then calls `fcntl.ioctl(vcpu.fd, KVM_RUN, 0)` N times and
does nothing else: no decode, no dispatch, no recording. It prints one line like the C loop,

    bare-python: N exits in T s (R exits/s)

where T covers the run loop only (time.perf_counter just before the first KVM_RUN to just after
the last). The difference to the C loop is the cost of the Python call itself.

After the timed loop (not timed) it checks that the last exit is the seed guest's
`out %ax, $0x10` with the value (N - 1) mod 65536: had any exit not been the guest's port write,
the counter would lag behind and the run is reported as failed (exit status 1).
"""

from __future__ import annotations

import fcntl
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without relying on the venv's install

from vmworker import kvm_abi as abi  # noqa: E402
from vmworker.devices.console import Console  # noqa: E402
from vmworker.devices.serial_input import SerialInput  # noqa: E402
from vmworker.devices.standard import StandardDevices  # noqa: E402
from vmworker.exits import IoOut, decode_exit  # noqa: E402
from vmworker.layout import DEFAULT_MEM, SEED_PORT  # noqa: E402
from vmworker.loader import load_image  # noqa: E402
from vmworker.machine import Machine  # noqa: E402

DEFAULT_GUEST = REPO / "guest" / "seed16.bin"
DEFAULT_EXITS = 200_000


def main(argv: list[str]) -> int:
    if len(argv) > 2:
        print(f"usage: {Path(sys.argv[0]).name} [GUEST.bin] [N]", file=sys.stderr)
        return 2
    guest = argv[0] if argv else str(DEFAULT_GUEST)
    try:
        n = int(argv[1]) if len(argv) > 1 else DEFAULT_EXITS
    except ValueError:
        n = 0
    if n <= 0:
        print(f"bare-python: N must be a positive integer, got {argv[1]!r}", file=sys.stderr)
        return 2

    image = load_image(guest)
    devices = StandardDevices(Console(None, False), SerialInput.empty())
    with Machine("bare", image, DEFAULT_MEM, 1, devices.port_bus, devices.mmio_bus) as machine:
        vcpu = machine.vm.vcpus[0]
        fd = vcpu.fd
        ioctl = fcntl.ioctl
        kvm_run = abi.KVM_RUN
        loop = range(n)

        t0 = time.perf_counter()
        for _ in loop:
            ioctl(fd, kvm_run, 0)
        t1 = time.perf_counter()

        last = decode_exit(vcpu.run_page)
    expected = (n - 1) & 0xFFFF
    if not (isinstance(last, IoOut) and last.port == SEED_PORT and last.size == 2
            and int.from_bytes(last.data, "little") == expected):
        print(f"bare-python: after {n} KVM_RUNs the last exit is {last!r}, expected the seed guest's "
              f"out to port {SEED_PORT:#x} of {expected:#x}: not every KVM_RUN was a guest port write",
              file=sys.stderr)
        return 1
    elapsed = t1 - t0
    print(f"bare-python: {n} exits in {elapsed:.6f} s ({n / elapsed:.0f} exits/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
