"""gdb `stepi` round trip through vmsup's gdb stub (issue 13's benchmark).

Runs seed16 with `vmsup launch --gdb PORT --gdb-wait`, attaches Debian's gdb in batch mode and
times N `stepi` commands with gdb's own Python clock (from just before the first to just after
the last), then kills the VM. Prints `gdb-stepi: N steps in T s (R steps/s, U µs each)`.

    .venv/bin/python bench/bench_gdb_stepi.py [N]      # default 1000
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
import tempfile

from benchlib import REPO, VMSUP, BenchError

SCRIPT = """set $i = 0
python import time; _t0 = time.monotonic()
while $i < {n}
  stepi
  set $i = $i + 1
end
python print("stepped in %.6f s" % (time.monotonic() - _t0))
kill
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    if shutil.which("gdb") is None:
        raise BenchError("no gdb on PATH (apt-get install gdb)")
    port = free_port()
    vm = subprocess.Popen([str(VMSUP), "launch", "seed16", "--gdb", str(port), "--gdb-wait", "-q", "--no-trace"],
                          cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".gdb") as script:
            script.write(SCRIPT.format(n=n))
            script.flush()
            out = subprocess.run(["gdb", "-nx", "-batch", "-ex", f"target remote 127.0.0.1:{port}", "-x", script.name],
                                 capture_output=True, text=True, timeout=600).stdout
        vm.wait(60)
    finally:
        if vm.poll() is None:
            vm.kill()
            vm.wait()
    m = re.search(r"stepped in ([0-9.]+) s", out)
    if m is None:
        raise BenchError(f"gdb did not finish its steps:\n{out[-2000:]}")
    seconds = float(m.group(1))
    print(f"gdb-stepi: {n} steps in {seconds:.3f} s ({n / seconds:.0f} steps/s, {seconds / n * 1e6:.0f} µs each)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as e:
        print(f"bench_gdb_stepi: {e}", file=sys.stderr)
        sys.exit(1)
