"""Who may say what on the bus: each stream belongs to the worker the supervisor started for it.

At launch the supervisor draws a run secret and hands it to the recorder on its stdin (never in
argv, which any local user can read). Each worker it spawns gets, in its environment, a
credential for its own (run, vm, epoch) — an HMAC-SHA256 of those under the run secret — and the
supervisor keeps one for itself. Every bus message travels as two ZeroMQ frames, the sender's
credential and then the message (tracetool.messages), so no message class carries it and it is
never written to a trace. The recorder recomputes the MAC and takes a message only for a stream
the credential names (`may_send`); lifecycle records of the supervisor's own making (spawn, exit,
restart, …) only from the supervisor.

Streams are thereby keyed by (run, vm, vcpu, epoch): a recorder only takes its own run's
credentials, so a later recorder for several hosts or runs can keep them apart by the same key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass

import msgpack

from . import messages

# The worker's credential, hex, in its environment (readable only by its own user, unlike argv).
CREDENTIAL_ENV = "VMSUP_BUS_CREDENTIAL"
SECRET_BYTES = 32
_MAX_FRAME = 512  # a credential frame is ~60 bytes; anything bigger is not one
_SUPERVISOR = -1  # vm and epoch of the supervisor's credential: it speaks for every VM


class CredentialError(messages.MessageError):
    """A message without a valid credential, or for a stream its credential does not cover."""


@dataclass(frozen=True)
class Credential:
    run: str
    vm: int  # _SUPERVISOR for the supervisor's own
    epoch: int
    mac: bytes

    @property
    def is_supervisor(self) -> bool:
        return self.vm == _SUPERVISOR

    def frame(self) -> bytes:
        return msgpack.packb([self.run, self.vm, self.epoch, self.mac], use_bin_type=True)

    @classmethod
    def from_frame(cls, raw: bytes) -> "Credential":
        if len(raw) > _MAX_FRAME:
            raise CredentialError("no credential")
        try:
            run, vm, epoch, mac = msgpack.unpackb(raw, raw=False, max_bin_len=_MAX_FRAME, max_str_len=_MAX_FRAME,
                                                  max_array_len=4, max_map_len=0)
        except Exception:  # msgpack raises several unrelated types for bad bytes
            raise CredentialError("no credential") from None
        if not (isinstance(run, str) and type(vm) is int and type(epoch) is int and isinstance(mac, bytes)):
            raise CredentialError("no credential")
        return cls(run, vm, epoch, mac)

    def hex(self) -> str:
        return self.frame().hex()

    @classmethod
    def from_env(cls) -> bytes | None:
        """The credential frame the supervisor put in this worker's environment, if any."""
        value = os.environ.pop(CREDENTIAL_ENV, None)
        try:
            return bytes.fromhex(value) if value else None
        except ValueError:
            return None


class BusKeys:
    """The run secret: makes credentials (supervisor) and checks them (recorder)."""

    def __init__(self, run: str, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("a run secret of at least 16 bytes")
        self.run = run
        self._secret = secret

    @classmethod
    def new(cls, run: str) -> "BusKeys":
        return cls(run, secrets.token_bytes(SECRET_BYTES))

    @property
    def secret_hex(self) -> str:
        return self._secret.hex()

    def _mac(self, vm: int, epoch: int) -> bytes:
        return hmac.new(self._secret, f"{self.run}/{vm}/{epoch}".encode(), hashlib.sha256).digest()

    def worker(self, vm: int, epoch: int) -> Credential:
        return Credential(self.run, vm, epoch, self._mac(vm, epoch))

    def supervisor(self) -> Credential:
        return Credential(self.run, _SUPERVISOR, _SUPERVISOR, self._mac(_SUPERVISOR, _SUPERVISOR))

    def verify(self, raw: bytes) -> Credential:
        """The credential of a frame, checked; CredentialError when it is not one of this run's."""
        cred = Credential.from_frame(raw)
        if cred.run != self.run or not hmac.compare_digest(cred.mac, self._mac(cred.vm, cred.epoch)):
            raise CredentialError("a credential this run did not issue")
        return cred


def check_sender(cred: Credential, msg: messages.Message) -> None:
    """Refuse a message its sender may not send: a worker speaks only for its own (vm, epoch)
    and may not report what the supervisor did; the supervisor sends only lifecycle records."""
    is_lifecycle = isinstance(msg, messages.Lifecycle)
    if cred.is_supervisor:
        if not is_lifecycle:
            raise CredentialError(f"{msg.TYPE} from the supervisor's credential")
        return
    if (msg.vm, msg.epoch) != (cred.vm, cred.epoch):
        raise CredentialError(f"{msg.TYPE} for a stream the sender does not own")
    if is_lifecycle and msg.event not in messages.WORKER_LIFECYCLE_EVENTS:
        raise CredentialError(f"lifecycle {msg.event!r} not from the supervisor")
