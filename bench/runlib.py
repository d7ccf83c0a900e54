"""What soak.py and faults.py share: a background `vmsup launch`, its process tree, its ps, the
end line it prints and what `vmtrace info --json` says about its trace."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "bench" / "build"
VMSUP = [sys.executable, "-m", "supervisor"]
VMTRACE = [sys.executable, "-m", "tracetool"]

sys.path.insert(0, str(REPO / "tests"))  # the /proc reading the fault tests use
import procfs  # noqa: E402


def wait_for(condition, what: str, timeout: float = 60.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
    return value


class Launch:
    """`vmsup launch ARGS` in its own session, stderr to a file; stop() is SIGTERM (a clean stop)."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as err:
            self.proc = subprocess.Popen([*VMSUP, "launch", *args], cwd=REPO, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        self.pid = self.proc.pid
        wait_for(lambda: self.recorder() is not None or self.proc.poll() is not None, "the recorder")
        if self.proc.poll() is not None:
            raise SystemExit(f"vmsup launch ended at once: {self.stderr}")

    @property
    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def children(self) -> dict[int, str]:
        return children(self.pid)

    def recorder(self) -> int | None:
        return next((p for p, cmd in self.children().items() if "supervisor.recorder" in cmd), None)

    def ps(self) -> list[dict]:
        proc = subprocess.run([*VMSUP, "ps", "--json"], cwd=REPO, capture_output=True, text=True, timeout=30)
        try:
            runs = json.loads(proc.stdout)
        except ValueError:
            return []
        return next((r["vms"] for r in runs if r.get("pid") == self.pid), [])

    def kill(self) -> None:
        """kill -9 the whole run (a bench that gives up must leave nothing running)."""
        if self.proc.poll() is None:
            os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 120.0) -> int:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.pid, signal.SIGKILL)
            return self.proc.wait()


def children(pid: int) -> dict[int, str]:
    """{child pid: command line} of a process (tests/procfs.py reads them), as text."""
    return {child: cmd.decode(errors="replace") for child, cmd in procfs.children(pid).items()}


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


END_LINE = re.compile(r"^vmsup: trace (?P<trace>.+?): (?P<events>\d+) events in \d+ batches, "
                      r"(?:no gaps|(?P<gaps>\d+) gaps? \((?P<lost>\d+) events lost(?:, (?P<unknown>\d+) cut with the "
                      r"count unknown)?\))", re.M)


def end_line(stderr: str) -> dict | None:
    m = END_LINE.search(stderr)
    if m is None:
        return None
    return {"events": int(m["events"]), "gaps": int(m["gaps"] or 0), "lost": int(m["lost"] or 0),
            "unknown": int(m["unknown"] or 0)}


def info_figures(trace: Path) -> dict:
    proc = subprocess.run([*VMTRACE, "info", str(trace), "--json"], cwd=REPO, capture_output=True, text=True)
    data = json.loads(proc.stdout)
    recorded = data["gaps"]["recorded"]
    return {"events": data["events"]["total"], "gaps": len(recorded),
            "lost": sum(g["count"] for g in recorded if g.get("count_known", True)),
            "unknown": sum(1 for g in recorded if g.get("count_known") is False),
            "unexplained": len(data["gaps"]["unexplained"]), "closed": data["file"]["closed_cleanly"]}


def verify(trace: Path) -> tuple[bool, str]:
    proc = subprocess.run([*VMTRACE, "verify", str(trace)], cwd=REPO, capture_output=True, text=True)
    return proc.returncode == 0, (proc.stdout + proc.stderr).strip().splitlines()[-1] if (proc.stdout + proc.stderr).strip() else ""


def fresh_trace(name: str) -> Path:
    BUILD.mkdir(parents=True, exist_ok=True)
    trace = BUILD / name
    for old in BUILD.glob(name + "*"):
        old.unlink()
    return trace
