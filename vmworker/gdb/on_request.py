"""A gdb stub opened on a VM that is already running (`vmsup gdb VM`).

The supervisor writes the wanted endpoint ([HOST:]PORT) to `BASE.request` in the run's private
directory and sends the worker GDB_SIGNAL; the worker's main thread (where Python runs signal
handlers) starts a GdbServer on it and answers in `BASE.reply`, one JSON map: {"endpoint": …}
or {"error": …}. A file pair instead of the input socket keeps the request out of the guest's
key stream and works for a worker without one. The VM stops when gdb attaches (the stub's
attach; vmworker/gdb/stub.py), not before. One stub per VM: a second request gets the first's
endpoint back.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..errors import SpecError

REQUEST_SUFFIX = ".request"
REPLY_SUFFIX = ".reply"
MAX_REQUEST_BYTES = 512  # "[HOST:]PORT" and nothing else


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def request_base(run_dir, vm_id: int) -> str:
    """Where VM `vm_id`'s request and reply files live in a run's private directory."""
    return str(Path(run_dir) / f"vm-{vm_id}-gdb")


# --- supervisor side -------------------------------------------------------------------------------
def send_request(base: str, endpoint: str) -> None:
    """Leave the request for the worker (before signalling it); an old reply is removed."""
    try:
        os.unlink(base + REPLY_SUFFIX)
    except FileNotFoundError:
        pass
    _write_atomically(Path(base + REQUEST_SUFFIX), endpoint)


def wait_reply(base: str, timeout: float, alive=lambda: True) -> dict | None:
    """The worker's reply, or None if none came within `timeout` s (or the worker went)."""
    deadline = time.monotonic() + timeout
    path = Path(base + REPLY_SUFFIX)
    while time.monotonic() < deadline and alive():
        try:
            reply = json.loads(path.read_text()[:MAX_REQUEST_BYTES * 4])
        except FileNotFoundError:
            time.sleep(0.02)
            continue
        except ValueError:
            return {"error": "the worker's reply is not JSON"}
        return reply if isinstance(reply, dict) else {"error": "the worker's reply is not a map"}
    return None


# --- worker side -----------------------------------------------------------------------------------
class StubOnRequest:
    """The worker's GDB_SIGNAL handler: open one stub on request. `make_server(endpoint)` builds a
    started GdbServer (or raises SpecError with one line)."""

    def __init__(self, base: str, make_server) -> None:
        self.base = base
        self.make_server = make_server
        self.server = None

    def __call__(self, *_signal) -> None:
        try:
            reply = self._open()
        except SpecError as e:
            reply = {"error": str(e)}
        try:
            _write_atomically(Path(self.base + REPLY_SUFFIX), json.dumps(reply))
        except OSError:
            pass  # the run dir is gone: the supervisor is going too

    def _open(self) -> dict:
        if self.server is not None:
            return {"endpoint": f"{self.server.host}:{self.server.port}", "already": True}
        try:
            with open(self.base + REQUEST_SUFFIX, "rb") as f:
                raw = f.read(MAX_REQUEST_BYTES + 1)
            os.unlink(self.base + REQUEST_SUFFIX)
        except OSError as e:
            raise SpecError(f"no gdb request to read ({e.strerror or e})") from None
        if len(raw) > MAX_REQUEST_BYTES:
            raise SpecError("gdb request too long")
        endpoint = raw.decode("ascii", "replace").strip()
        self.server = self.make_server(endpoint)
        return {"endpoint": f"{self.server.host}:{self.server.port}"}
