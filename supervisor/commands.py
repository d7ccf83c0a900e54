"""Control commands: one class per command, used by both the client and the server, so a
command's name, arguments, validation and reply shape are defined once (the circus way).

Two servers take commands, each from its own table: the running launch's control socket
(COMMANDS: `vmsup ps`, stop, …) and the recorder's (RECORDER_COMMANDS: stats, finish; the
supervisor is its client).

Wire format: a msgpack map {"cmd": NAME, ...arguments} → a msgpack map reply; {"error": text}
for a refusal the client prints as one line.
"""

from __future__ import annotations

import time

import msgpack
import zmq

from tracetool import messages, wire_limits
from vmworker.errors import VmsupError

from . import runtime

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

    def execute(self, server, req: dict) -> dict:  # server side: a Launch or a Recorder
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
            # Exit counts come from the recorder's tally (every epoch, tracetool/exit_tally.py), the
            # one count the end of the run and the trace give too; the worker reports only at its end.
            mine = recorded.get(str(slot.spec.vm_id))
            if mine is not None:
                row["exits"] = mine.get("exits", 0)
                row["unclaimed"] = sum((mine.get("unclaimed") or {}).values())
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


class Gdb(Command):
    name = "gdb"
    help = "Open a gdb stub on a running VM ([HOST:]PORT, default 127.0.0.1:1234); the VM stops when gdb attaches."
    takes_target = True
    REPLY_SECONDS = 3.0  # the worker answers from its main thread within ~0.1 s

    def request(self, target: str | None = None, endpoint: str = "127.0.0.1:1234") -> dict:
        if not target:
            raise ControlError("gdb: name a VM")
        return {"cmd": self.name, "vm": target, "endpoint": endpoint}

    def execute(self, launch, req: dict) -> dict:
        from vmworker.errors import SpecError
        from vmworker.gdb import on_request
        from vmworker.gdb.server import parse_endpoint
        from vmworker.signals import GDB_SIGNAL
        slot, = self.targets(launch, {"vm": req.get("vm")})
        worker = slot.worker
        if worker is None or worker.done or slot.state not in ("starting", "running", "paused"):
            raise ControlError(f"VM {slot.spec.name} is not running ({slot.state})")
        try:
            host, port = parse_endpoint(str(req.get("endpoint"))[:256], "--gdb")
        except SpecError as e:
            raise ControlError(str(e)) from None
        base = on_request.request_base(launch.run_dir.path, slot.spec.vm_id)
        on_request.send_request(base, f"{host}:{port}")
        worker.signal(GDB_SIGNAL)
        reply = on_request.wait_reply(base, self.REPLY_SECONDS, alive=lambda: not worker.done)
        if reply is None:
            raise ControlError(f"VM {slot.spec.name}: its worker did not answer (it may have ended)")
        if "error" in reply:
            raise ControlError(f"VM {slot.spec.name}: {reply['error']}")
        return {"vm": slot.spec.name, "endpoint": str(reply.get("endpoint")), "already": bool(reply.get("already"))}


class Snapshot(Command):
    name = "snapshot"
    help = "Save a running VM to FILE (memory, CPU, interrupt controllers, devices, trace position); it runs on."
    takes_target = True
    TIMEOUT = 120.0  # a 1 GiB guest's memory is read and compressed while its vCPUs wait

    def request(self, target: str | None = None, path: str = "") -> dict:
        if not target:
            raise ControlError(f"{self.name}: name a VM")
        if not path:
            raise ControlError(f"{self.name}: name a FILE to write")
        import os
        path = os.path.abspath(path)  # the worker's working directory need not be the client's
        if not os.path.isdir(os.path.dirname(path)):
            raise ControlError(f"{self.name}: no directory {os.path.dirname(path)}")
        return {"cmd": self.name, "vm": target, "path": path}

    def execute(self, launch, req: dict) -> dict:
        (slot,) = self.targets(launch, req)
        path = req.get("path")
        if not isinstance(path, str) or not path.startswith("/"):
            raise ControlError("snapshot: the file must be an absolute path")
        if slot.worker is None or slot.worker.done or slot.state not in ("starting", "running", "paused"):
            raise ControlError(f"snapshot: VM {slot.spec.name} is not running ({slot.state})")
        reply = call_endpoint(launch.worker_control_endpoint(slot.spec.vm_id), {"cmd": "worker-snapshot", "path": path},
                              self.TIMEOUT, f"VM {slot.spec.name}'s worker")
        reply["vm"] = slot.spec.name
        return reply


COMMANDS: dict[str, Command] = {c.name: c for c in (Ps(), Stop(), Kill(), Pause(), Resume(), Gdb(), Snapshot())}


# --- The recorder's commands (server: supervisor.recorder.Recorder) -----------------------------
class RecorderStats(Command):
    name = "stats"
    help = "What the recorder has taken so far: events, batches, gaps, refused messages, per-VM state."

    def request(self) -> dict:
        return {"cmd": self.name}

    def execute(self, recorder, req: dict) -> dict:
        return recorder.stats()


class RecorderFinish(Command):
    name = "finish"
    help = "Drain what is in flight, account for what never came, close the trace; reply with the stats."

    def request(self, ended_without_record: list[messages.VmEnd] = ()) -> dict:
        """ended_without_record: the vm-end the supervisor writes for workers that could not."""
        return {"cmd": self.name, "ended_without_record": [e.to_msg() for e in ended_without_record]}

    def execute(self, recorder, req: dict) -> dict:
        ended = req.get("ended_without_record") or []
        if not isinstance(ended, list):
            raise ControlError("finish: ended_without_record is not a list")
        try:
            ends = [messages.VmEnd.from_msg(e) for e in ended]
        except messages.MessageError as e:
            raise ControlError(f"finish: {e}") from None
        return recorder.finish(ends)


RECORDER_COMMANDS: dict[str, Command] = {c.name: c for c in (RecorderStats(), RecorderFinish())}


def handle_request(server, raw: bytes, commands: dict[str, Command] = COMMANDS) -> dict:
    """Server side: one request in, one reply out; never raises on bad input."""
    try:
        req = wire_limits.CONTROL.unpack(raw)
    except messages.MessageError:
        return {"error": "malformed request"}
    if not isinstance(req, dict) or req.get("cmd") not in commands:
        return {"error": f"unknown command {req.get('cmd') if isinstance(req, dict) else None!r}"}
    try:
        return commands[req["cmd"]].execute(server, req)
    except ControlError as e:
        return {"error": str(e)}


def serve_one(server, sock: zmq.Socket, commands: dict[str, Command] = COMMANDS) -> None:
    """Answer the request waiting on a REP socket (the caller polled it)."""
    sock.send(msgpack.packb(handle_request(server, sock.recv(), commands), use_bin_type=True))


def control_socket(context: zmq.Context, endpoint: str) -> zmq.Socket:
    """A server's REP socket, bounded like every socket that takes untrusted bytes."""
    sock = context.socket(zmq.REP)
    wire_limits.CONTROL.apply(sock)
    sock.bind(endpoint)
    return sock


def call_endpoint(endpoint: str, request: dict, timeout: float = REQUEST_TIMEOUT, who: str = "the server") -> dict:
    """Client side: send one request; ControlError when the server cannot be reached or refuses."""
    context = zmq.Context.instance()
    sock = context.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
    sock.setsockopt(zmq.SNDTIMEO, int(timeout * 1000))
    wire_limits.CONTROL.apply(sock)
    try:
        sock.connect(endpoint)
        sock.send(msgpack.packb(request, use_bin_type=True))
        reply = wire_limits.CONTROL.unpack(sock.recv())
    except zmq.ZMQError as e:
        raise ControlError(f"{who} does not answer ({e})") from None
    except messages.MessageError:
        reply = None
    finally:
        sock.close()
    if not isinstance(reply, dict):
        raise ControlError(f"{who} sent a malformed reply")
    if "error" in reply:
        raise ControlError(str(reply["error"]))
    return reply


def call(run_dir: runtime.RunDir, request: dict, timeout: float = REQUEST_TIMEOUT) -> dict:
    """Client side of a run's control socket (vmsup ps, stop, …)."""
    return call_endpoint(run_dir.control_endpoint, request, timeout, f"run {run_dir.run_id}")


class RecorderClient:
    """The supervisor's side of the recorder's control socket: RECORDER_COMMANDS by name."""

    def __init__(self, run_dir: runtime.RunDir, timeout: float = 10.0) -> None:
        self.endpoint = run_dir.recorder_endpoint
        self.timeout = timeout

    def call(self, cmd: str, **args) -> dict | None:
        """The command's reply, or None when the recorder does not answer or refuses."""
        try:
            return call_endpoint(self.endpoint, RECORDER_COMMANDS[cmd].request(**args), self.timeout, "the recorder")
        except ControlError:
            return None

    def close(self) -> None:
        pass
