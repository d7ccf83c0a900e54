"""The gdb stub's listening socket and thread inside a worker.

`GdbServer.bind` happens before the VM starts, so a port in use is a SpecError (one line, exit 2)
and no VM runs. The thread accepts one gdb at a time; after one detaches (or goes away) the next
may attach. When the VM ends, `finish` lets an attached gdb hear `W` (exit code) before the
worker goes.
"""

from __future__ import annotations

import logging
import select
import socket
import threading

from ..errors import SpecError
from .control import Debugger
from .stub import Stub

log = logging.getLogger("vmsup.gdb")

DEFAULT_HOST = "127.0.0.1"
FINISH_GRACE_SECONDS = 2.0  # how long an ended VM waits for an attached gdb to hear of it
ACCEPT_POLL_SECONDS = 0.2


def parse_endpoint(text: str, what: str = "--gdb") -> tuple[str, int]:
    """'[HOST:]PORT' → (host, port); SpecError with one line if it is not that."""
    host, sep, port_text = str(text).rpartition(":")
    if not sep:
        host = DEFAULT_HOST
    try:
        port = int(port_text)
    except ValueError:
        raise SpecError(f"{what} {text!r}: expected [HOST:]PORT, e.g. 1234 or 127.0.0.1:1234") from None
    if not 0 < port < 65536:
        raise SpecError(f"{what} {text!r}: port must be 1-65535")
    return host or DEFAULT_HOST, port


def bind_listener(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1)
    except OSError as e:
        sock.close()
        raise SpecError(f"gdb stub: cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def assign_ports(specs) -> list[str]:
    """Give VMs that share one --gdb endpoint consecutive ports (VM i of them: PORT+i), check that
    each port can be listened on now (SpecError, before any VM starts), and return the lines that
    tell the user where each stub listens."""
    seen: dict[tuple[str, int], int] = {}
    lines = []
    for spec in specs:
        if not spec.gdb:
            continue
        host, port = parse_endpoint(spec.gdb)
        offset = seen.get((host, port), 0)
        seen[(host, port)] = offset + 1
        if port + offset > 65535:
            raise SpecError(f"--gdb {spec.gdb}: no port {port + offset} for VM {spec.name}")
        spec.gdb = f"{host}:{port + offset}"
        bind_listener(host, port + offset).close()
        held = " (held until gdb attaches)" if spec.gdb_wait else ""
        lines.append(f"{spec.name}: gdb stub on {spec.gdb}{held}: gdb -ex 'target remote {spec.gdb}'")
    return lines


class GdbServer:
    def __init__(self, endpoint: str, describe=lambda: "", record=None) -> None:
        self.host, self.port = parse_endpoint(endpoint)
        self.listener = bind_listener(self.host, self.port)
        self.describe = describe
        self.record = record or (lambda event, **fields: None)  # lifecycle records (Recording.lifecycle)
        self.debugger: Debugger | None = None
        self._ended: int | None = None
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None
        self._conn: socket.socket | None = None
        self._stub: Stub | None = None

    def start(self, machine, wait: bool) -> None:
        """Attach a Debugger to `machine` (before it runs) and serve in a daemon thread."""
        self.debugger = Debugger(machine, wait=wait)
        machine.ctx.debugger = self.debugger
        self._thread = threading.Thread(target=self._serve, name="gdb-stub", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._closing.is_set():
            ready, _, _ = select.select([self.listener], [], [], ACCEPT_POLL_SECONDS)
            if not ready:
                continue
            try:
                conn, peer = self.listener.accept()
            except OSError:
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            log.info("gdb attached from %s:%s", *peer[:2])
            self.record("gdb-attach", peer=f"{peer[0]}:{peer[1]}")
            self._conn = conn
            self._stub = Stub(conn, self.debugger, lambda: self._ended, self.describe, self.record)
            try:
                self._stub.serve()
            except Exception:  # a stub bug ends this connection (the VM runs on), not the worker
                log.exception("gdb stub failed; the VM runs on")
                self.record("gdb-gone", detail="the gdb stub failed; the VM runs on")
            finally:
                self._conn = self._stub = None
                conn.close()

    def finish(self, exit_code: int) -> None:
        """The VM ended: an attached gdb waiting on it gets `W`; then stop serving."""
        self._ended = exit_code
        self._closing.set()
        stub = self._stub
        if stub is not None and self._thread is not None:
            # A stub waiting for a stop answers `W` within its poll; one waiting for gdb's next
            # packet (the VM was stopped) has nothing to say: the closed connection tells gdb.
            stub.resuming_done.wait(FINISH_GRACE_SECONDS)
        conn = self._conn
        if conn is not None:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(FINISH_GRACE_SECONDS)

    def close(self) -> None:
        self._closing.set()
        self.listener.close()
        if self.debugger is not None:
            self.debugger.close()
