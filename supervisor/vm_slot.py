"""One VM of a launch across its restarts (supervisor/launch.py): its spec, restart policy,
current worker and state, and the worker's resident memory for --rss-limit."""

from __future__ import annotations

import time

from vmworker.spec import VmSpec

from .policy import RestartPolicy
from .worker import Worker


class VmSlot:
    """One VM of the run across its restarts: its spec, policy, current worker and state."""

    TERMINAL = ("exited", "fatal", "stopped")

    def __init__(self, spec: VmSpec, policy: RestartPolicy, rss_limit: int | None, console: str | None) -> None:
        self.spec = spec
        self.policy = policy
        self.rss_limit = rss_limit
        self.console = console
        self.state = "starting"
        self.worker: Worker | None = None
        self.epoch = -1
        self.restarts = 0
        self.failed_starts = 0  # consecutive runs shorter than policy.startsecs
        self.next_start = 0.0
        self.result: dict | None = None
        self.detail = ""
        self.stop_requested = False
        self.stop_deadline: float | None = None
        self.limit_hit: End | None = None  # a supervisor-enforced limit that ended this epoch
        self.exits_before = 0  # exits of earlier epochs

    @property
    def terminal(self) -> bool:
        return self.state in self.TERMINAL

    @property
    def pid(self) -> int | None:
        return self.worker.proc.pid if self.worker is not None and not self.worker.done else None

    def describe(self) -> dict:
        uptime = time.monotonic() - self.worker.started if self.worker is not None and not self.worker.done else 0.0
        last = self.result or {}
        return {"vm": self.spec.vm_id, "name": self.spec.name, "state": self.state, "pid": self.pid,
                "epoch": max(self.epoch, 0), "restarts": self.restarts, "uptime": uptime,
                "exits": self.exits_before,  # epochs that ended (_ended adds each once)
                "unclaimed": sum((last.get("unclaimed") or {}).values()),
                "status": last.get("status"), "detail": self.detail or last.get("detail", "")}


def rss_bytes(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
