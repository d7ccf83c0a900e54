"""Runs that record on another host: `vmsup launch --recorder tcp://…` into `vmsup record --listen`.

A remote launch opens one CURVE connection to the recorder (supervisor/remote_link.py) and sends
its `run-start` first on it: its run id, host, run secret and VMs. Everything after travels on
the same connection, so the run is registered before any of its messages arrive. The recorder
keeps the run under the CURVE client key that registered it and checks every later message the
way it checks a local worker's (tracetool/bus_credentials.py: the credential frame, verified with
that run's secret, and the stream it may speak for).

Streams are keyed by (run, vm, vcpu, epoch): each VM of a run gets a trace vm id of its own,
so two launches that each have a vm 0 (on two hosts) share one trace without clashes. The trace
says where each came from: the vm-start record's `run` field ({"id", "host", "vm"}) and the
VM's name, NAME@RUN.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import zmq

from tracetool import messages, schema
from tracetool.bus_credentials import BusKeys, Credential, CredentialError, check_sender
from tracetool.message_fields import Bytes, Str, _Check, _is_int, checked

# Bounds on what registered runs may claim: runs per recorder, VMs per run.
MAX_RUNS = 1024
MAX_RUN_VMS = 4096
_ID_LIMIT = 1 << 31  # trace vm ids (tracetool/message_fields.py: vm numbers)


@dataclass(frozen=True)
class RunStart(messages.Message):
    """A remote launch registers its run (bus only: never written to a trace, it holds the secret)."""

    TYPE: ClassVar[str] = schema.MSG_RUN_START
    run: str = checked(Str(required=True, max_len=64), default=None)
    secret: bytes = checked(Bytes(required=True, min_len=16, max_len=64), default=None)
    vms: list = checked(_Check(required=True), default=None)  # [[vm id, name], …] as the launch knows them
    host: str | None = checked(Str(max_len=256))
    t: int | None = checked(messages.Int())
    wall: int | None = checked(messages.Int())

    @classmethod
    def from_msg(cls, msg) -> "RunStart":
        if isinstance(msg, dict) and msg.get("v") != schema.SCHEMA_VERSION:
            raise messages.MessageError(f"schema version {msg.get('v')!r}, expected {schema.SCHEMA_VERSION}")
        start = super().from_msg(msg)
        vms = start.vms
        if (not isinstance(vms, list) or not 0 < len(vms) <= MAX_RUN_VMS or not all(
                isinstance(v, list) and len(v) == 2 and _is_int(v[0]) and 0 <= v[0] < _ID_LIMIT
                and isinstance(v[1], str) and len(v[1]) <= 200 for v in vms)
                or len({v[0] for v in vms}) != len(vms)):
            raise messages.MessageError(f"{cls.TYPE}: vms is not a list of distinct [vm id, name]")
        return start


@dataclass
class RemoteRun:
    """One registered run: who sent it (a CURVE public key, z85), its secret, its VMs' trace ids."""

    run: str
    host: str
    client_key: str
    bus_keys: BusKeys
    trace_vm: dict[int, int]  # its vm id → the trace's
    names: dict[int, str]  # its vm id → the trace's name (NAME@RUN)

    def to_json(self) -> dict:
        return {"host": self.host, "vms": {str(vm): self.trace_vm[vm] for vm in sorted(self.trace_vm)}}

    def renumbered(self, msg: messages.Message) -> messages.Message:
        """The message as the trace keeps it: the run's vm id → its trace vm id (and name)."""
        own = msg.vm
        if own not in self.trace_vm:
            raise CredentialError(f"{msg.TYPE} for a VM its run-start did not name")
        out = copy.copy(msg)  # messages are frozen: the copy is changed in place, like from_msg does
        object.__setattr__(out, "vm", self.trace_vm[own])
        if getattr(out, "name", None) is not None:
            object.__setattr__(out, "name", self.names[own])
        if isinstance(out, messages.VmStart):
            object.__setattr__(out, "run", {"id": self.run, "host": self.host, "vm": own})
            if "run" not in out._given:
                object.__setattr__(out, "_given", (*out._given, "run"))
        return out


class RemoteRuns:
    """The recorder's registry of remote runs. `owners` is the recorder's map of vm ids taken by
    remote senders (shared: a vm id given to a run is nobody else's); `reserved`: its own run's VMs."""

    def __init__(self, owners: dict[int, str], reserved: set[int]) -> None:
        self.owners = owners
        self.reserved = reserved
        self.runs: dict[str, RemoteRun] = {}

    def admit(self, client_key: str, credential: bytes, raw: bytes) -> messages.Message | None:
        """One [credential, message] from CURVE client `client_key`: the message, renumbered for
        the trace, or None for a run-start (registered). CredentialError/MessageError: refused."""
        doc = messages.BUS.unpack(raw)
        if isinstance(doc, dict) and doc.get("type") == schema.MSG_RUN_START:
            self._register(client_key, credential, RunStart.from_msg(doc))
            return None
        run = self.runs.get(Credential.from_frame(credential).run)
        if run is None:
            raise CredentialError("a message of a run that never registered (no run-start)")
        if run.client_key != client_key:
            raise CredentialError("a message of a run another client registered")
        sender = run.bus_keys.verify(credential)
        msg = messages.decode(doc)
        if isinstance(msg, (messages.Gap, messages.Refused)):  # the recorder's to write, never a sender's
            raise CredentialError(f"{msg.TYPE} from a sender")
        check_sender(sender, msg)
        return run.renumbered(msg)

    def _register(self, client_key: str, credential: bytes, start: RunStart) -> None:
        keys = BusKeys(start.run, start.secret)
        if not keys.verify(credential).is_supervisor:  # signed with its own secret, as its supervisor
            raise CredentialError("run-start not from its run's supervisor")
        known = self.runs.get(start.run)
        if known is not None:
            if known.client_key == client_key and known.bus_keys.secret_hex == keys.secret_hex:
                return  # the same run-start again
            raise CredentialError("run-start for a run id another client registered")
        if len(self.runs) >= MAX_RUNS:
            raise CredentialError(f"run-start beyond {MAX_RUNS} runs")
        trace_vm, names, next_id = {}, {}, 0
        for vm, name in start.vms:
            while next_id in self.owners or next_id in self.reserved:
                next_id += 1
            if next_id >= _ID_LIMIT:
                raise CredentialError("run-start: no trace vm ids left")
            trace_vm[vm] = next_id
            names[vm] = f"{name}@{start.run}"
            self.owners[next_id] = f"run {start.run}"
        self.runs[start.run] = RemoteRun(start.run, start.host or "", client_key, keys, trace_vm, names)

    def to_json(self) -> dict:
        return {run: r.to_json() for run, r in self.runs.items()}


def check_first_speaker(owners: dict[int, str], local_vms: set[int], key: str, msg: messages.Message) -> None:
    """A CURVE sender without a run (one frame, no credential): a VM id belongs to the first
    client key that speaks for it; the recorder's own run's VMs and registered runs' are not its."""
    if isinstance(msg, messages.Lifecycle) and msg.event not in messages.WORKER_LIFECYCLE_EVENTS:
        raise CredentialError(f"lifecycle {msg.event!r} not from the supervisor")
    if msg.vm in local_vms:
        raise CredentialError(f"{msg.TYPE} from a remote sender for one of this run's own VMs")
    if owners.setdefault(msg.vm, key) != key:
        raise CredentialError(f"{msg.TYPE} for a VM another remote sender owns")


# Handshake outcomes of a CURVE server socket (zmq_socket_monitor(3)): ZAP said no to the client's
# key, or the handshake itself failed (no CURVE, another server's key: the client's HELLO does not
# decrypt).
REFUSED_KEY = "client refused: its CURVE key is not authorized"
REFUSED_HANDSHAKE = "client refused: CURVE handshake failed (no CURVE, or another server's key)"
_HANDSHAKE_EVENTS = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: REFUSED_KEY,
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: REFUSED_HANDSHAKE,
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: REFUSED_HANDSHAKE,
}


class HandshakeWatch:
    """A monitor of the tcp socket: clients refused before they could send a message. A refused
    client retries every reconnect interval, so the count is of handshakes, not of clients."""

    def __init__(self, server: zmq.Socket) -> None:
        self.server = server
        self.socket = server.get_monitor_socket(events=sum(_HANDSHAKE_EVENTS))

    def refusals(self) -> list[str]:
        """The causes of the handshakes refused since the last call (zmq.Again when none)."""
        from zmq.utils.monitor import recv_monitor_message
        causes = [_HANDSHAKE_EVENTS.get(recv_monitor_message(self.socket, flags=zmq.NOBLOCK)["event"])]
        while True:
            try:
                causes.append(_HANDSHAKE_EVENTS.get(recv_monitor_message(self.socket, flags=zmq.NOBLOCK)["event"]))
            except zmq.Again:
                return [c for c in causes if c]

    def close(self) -> None:
        self.server.disable_monitor()
        self.socket.close(linger=0)
