"""Two network namespaces joined by a veth pair: two "hosts" on one machine, for the remote
recorder's tests (tests/test_remote_recorder.py) and its benchmark (bench/bench_remote.py).

Names are unique per process and pair; addresses (10.213.N.1 and .2 /30) live inside the
namespaces only, so nothing of the host's own network changes. `close()` deletes both
namespaces (and with them the veth ends); every `ip` call is bounded by a timeout.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from dataclasses import dataclass

_pairs = itertools.count()
IP_TIMEOUT = 10.0


class NetnsUnavailable(Exception):
    """Namespaces cannot be made here (no `ip`, not root, no netns support): the reason."""


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT)
    if proc.returncode != 0:
        raise NetnsUnavailable(f"'ip {' '.join(args)}' failed: {proc.stderr.strip()[:200]}")


@dataclass
class NetnsPair:
    recorder_ns: str
    launch_ns: str
    recorder_if: str  # the veth end in recorder_ns: cut the link by setting it down
    recorder_addr: str
    launch_addr: str

    @classmethod
    def create(cls) -> "NetnsPair":
        if shutil.which("ip") is None:
            raise NetnsUnavailable("the ip command (iproute2) is not installed")
        if os.geteuid() != 0:
            raise NetnsUnavailable("network namespaces need root (ip netns add)")
        n = next(_pairs)
        tag = f"{os.getpid() % 100000}x{n}"
        subnet = 10 + (os.getpid() + n) % 240  # 10.213.S.0/30: distinct for concurrent test processes
        pair = cls(f"vmsup-rec-{tag}", f"vmsup-vm-{tag}", f"vr{tag}", f"10.213.{subnet}.1", f"10.213.{subnet}.2")
        launch_if = f"vl{tag}"
        try:
            _ip("netns", "add", pair.recorder_ns)
            _ip("netns", "add", pair.launch_ns)
            _ip("link", "add", pair.recorder_if, "netns", pair.recorder_ns, "type", "veth",
                "peer", "name", launch_if, "netns", pair.launch_ns)
            for ns, dev, addr in ((pair.recorder_ns, pair.recorder_if, pair.recorder_addr),
                                  (pair.launch_ns, launch_if, pair.launch_addr)):
                _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except (NetnsUnavailable, OSError, subprocess.TimeoutExpired) as e:
            pair.close()
            raise NetnsUnavailable(str(e)) from None
        return pair

    def run_in(self, ns: str) -> list[str]:
        """The argv prefix that runs a command inside namespace `ns`."""
        return ["ip", "netns", "exec", ns]

    def link(self, up: bool) -> None:
        """Cut (up=False) or restore the link, from the recorder's side."""
        _ip("-n", self.recorder_ns, "link", "set", self.recorder_if, "up" if up else "down")

    def close(self) -> None:
        for ns in (self.launch_ns, self.recorder_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=IP_TIMEOUT)
