"""Control commands: one class per command, used by both the client (`vmsup ps` …) and the
server (the running launch's control socket), so a command's name, arguments, validation and
reply shape are defined once (the circus way).

Wire format: a msgpack map {"cmd": NAME, ...arguments} → a msgpack map reply; {"error": text}
for a refusal the client prints as one line.
"""

from __future__ import annotations

import time

import msgpack
import zmq

from vmworker.errors import VmsupError

from . import runtime

_LIMITS = dict(max_bin_len=1 << 20, max_str_len=1 << 16, max_array_len=1 << 12, max_map_len=256)
REQUEST_TIMEOUT = 5.0


class ControlError(VmsupError):
    pass


class Command:
    name = ""
    help = ""
    takes_target = False  # VM name / id, or --all

    def request(self, target: str | None = None, all_vms: bool = False) -> dict:
        if self.takes_target and not all_vms and not target:
            raise ControlError(f"{self.name}: name a VM or use --all")
        return {"cmd": self.name, "vm": target, "all": all_vms}

    def execute(self, launch, req: dict) -> dict:  # server side
        raise NotImplementedError

    @staticmethod
    def targets(launch, req: dict) -> list:
        if req.get("all"):
            return list(launch.slots)
        wanted = str(req.get("vm"))
        for slot in launch.slots:
            if slot.spec.name == wanted or str(slot.spec.vm_id) == wanted:
                return [slot]
        names = ", ".join(s.spec.name for s in launch.slots)
        raise ControlError(f"no VM named {wanted!r} in run {launch.run_dir.run_id} (VMs: {names})")


class Ps(Command):
    name = "ps"
    help = "List runs and their VMs: state, pid, uptime, exits, restarts."

    def execute(self, launch, req: dict) -> dict:
        stats = launch.recorder_stats() or {}
        recorded = stats.get("vms", {})
        vms = []
        for slot in launch.slots:
            row = slot.describe()
            # Live exit counts come from the recorder (every epoch); the worker reports only at its end.
            row["exits"] = max(row["exits"], recorded.get(str(slot.spec.vm_id), {}).get("events", 0))
            vms.append(row)
        return {"run": launch.run_dir.run_id, "pid": __import__("os").getpid(), "started": launch.started_wall,
                "uptime": time.time() - launch.started_wall, "trace": launch.trace_path, "vms": vms}


class _EachVm(Command):
    """A command applied to each targeted VM; `apply` says whether it did something to it."""

    takes_target = True
    done_key = ""

    def apply(self, launch, slot) -> bool:
        raise NotImplementedError

    def execute(self, launch, req: dict) -> dict:
        return {self.done_key: [s.spec.name for s in self.targets(launch, req) if self.apply(launch, s)]}


class Stop(_EachVm):
    name, done_key = "stop", "stopped"
    help = "Stop a VM (or --all) for good: TERM, then KILL after a timeout; no restart."

    def apply(self, launch, slot) -> bool:
        if slot.terminal:
            return False
        launch.stop_slot(slot)
        return True


class Kill(_EachVm):
    name, done_key = "kill", "killed"
    help = "Kill a VM's worker at once (SIGKILL); no restart."

    def apply(self, launch, slot) -> bool:
        if slot.terminal:
            return False
        launch.stop_slot(slot, kill=True)
        return True


class Pause(_EachVm):
    name, done_key = "pause", "paused"
    help = "Pause a VM: its vCPUs are kicked out of KVM_RUN and parked."

    def apply(self, launch, slot) -> bool:
        return launch.pause_slot(slot, True)


class Resume(_EachVm):
    name, done_key = "resume", "resumed"
    help = "Resume a paused VM."

    def apply(self, launch, slot) -> bool:
        return launch.pause_slot(slot, False)


COMMANDS: dict[str, Command] = {c.name: c for c in (Ps(), Stop(), Kill(), Pause(), Resume())}


def handle_request(launch, raw: bytes) -> dict:
    """Server side: one request in, one reply out; never raises on bad input."""
    try:
        req = msgpack.unpackb(raw, raw=False, **_LIMITS)
    except Exception:
        return {"error": "malformed request"}
    if not isinstance(req, dict) or req.get("cmd") not in COMMANDS:
        return {"error": f"unknown command {req.get('cmd') if isinstance(req, dict) else None!r}"}
    try:
        return COMMANDS[req["cmd"]].execute(launch, req)
    except ControlError as e:
        return {"error": str(e)}


def call(run_dir: runtime.RunDir, request: dict, timeout: float = REQUEST_TIMEOUT) -> dict:
    """Client side: send one request to a run; ControlError when it cannot be reached or refuses."""
    context = zmq.Context.instance()
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
    sock.setsockopt(zmq.SNDTIMEO, int(timeout * 1000))
    try:
        sock.connect(run_dir.control_endpoint)
        sock.send(msgpack.packb(request, use_bin_type=True))
        reply = msgpack.unpackb(sock.recv(), raw=False, **_LIMITS)
    except zmq.ZMQError as e:
        raise ControlError(f"run {run_dir.run_id} does not answer ({e})") from None
    finally:
        sock.close()
    if not isinstance(reply, dict):
        raise ControlError(f"run {run_dir.run_id} sent a malformed reply")
    if "error" in reply:
        raise ControlError(str(reply["error"]))
    return reply
