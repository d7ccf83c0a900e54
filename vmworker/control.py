"""The worker's control socket: a ZeroMQ REP the worker binds in the run's private directory
(`vm-N-control.sock`, spec.control_endpoint), through which the supervisor forwards commands that
need the VM itself, not just a signal (`vmsup snapshot`).

Wire format as the supervisor's control socket: a msgpack map {"cmd": NAME, ...} in, a msgpack
map out, {"error": text} for a refusal. The worker's commands are the entries of `handlers`
(name → callable(request) → reply); a handler raises VmsupError to refuse with one line.
"""

from __future__ import annotations

import threading
from typing import Callable

import msgpack
import zmq

from tracetool import messages, wire_limits

from .errors import VmsupError

POLL_MS = 100  # how often the thread looks whether the VM is stopping
CLOSE_WAIT = 60.0  # a snapshot being written when the VM ends is finished, not cut


class WorkerControl:
    def __init__(self, endpoint: str, handlers: dict[str, Callable[[dict], dict]], stopping: Callable[[], bool]) -> None:
        self.handlers = handlers
        self._stopping = stopping
        self._context = zmq.Context()
        self._sock = self._context.socket(zmq.REP)
        wire_limits.CONTROL.apply(self._sock)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.bind(endpoint)
        self._thread = threading.Thread(target=self._run, name="control", daemon=True)
        self._done = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._done.is_set() and not self._stopping():
                if not self._sock.poll(POLL_MS):
                    continue
                reply = self.handle(self._sock.recv())
                self._sock.send(msgpack.packb(reply, use_bin_type=True))
        except zmq.ZMQError:
            pass  # the socket closed under us: the worker is ending

    def handle(self, raw: bytes) -> dict:
        try:
            req = wire_limits.CONTROL.unpack(raw)
        except messages.MessageError:
            return {"error": "malformed request"}
        handler = self.handlers.get(req.get("cmd")) if isinstance(req, dict) else None
        if handler is None:
            return {"error": f"this worker has no command {req.get('cmd') if isinstance(req, dict) else None!r}"}
        try:
            return handler(req)
        except VmsupError as e:
            return {"error": str(e)}

    def close(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=CLOSE_WAIT)
        self._sock.close(linger=0)
        self._context.term()
