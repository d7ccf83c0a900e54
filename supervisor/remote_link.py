"""A launch's link to a recorder on another host: `vmsup launch … --recorder tcp://HOST:PORT`.

    workers ─PUSH→ events.sock (run dir, ipc) ─ relay thread ─PUSH, CURVE, tcp→ vmsup record --listen
                                                  └─PUB→ live.sock (tail, top, screen on this host)

Workers send exactly as to a local recorder (the same credential frames, the same blocking PUSH
with its high-water mark). The launch binds the run's events socket itself and a relay thread
forwards each message, unchanged, over one CURVE connection: a full queue on the link blocks the
relay, which stops reading, which blocks the workers' sends — backpressure reaches the vCPUs, and
nothing is dropped while the VMs run. The relay also republishes each message on the run's live
socket, as a local recorder does, so `vmsup tail/top/screen` work on the launch's host (best
effort, never slowing the link; only the recorder's own gap records are missing there), and counts
each VM's exits with the recorder's own tally (tracetool/exit_tally.py): `vmsup ps`, the live
table and the end line of a remote launch show them, even when the recorder dies mid-run. One
connection also orders the run's messages: the run-start that registers the run
(supervisor/remote_runs.py) is the first thing on it.

Before any VM starts, the launch waits (bounded) for the CURVE handshake to succeed: ZeroMQ
says nothing to a client whose key is refused, so its monitor socket's handshake events tell
an unreachable recorder from a refused key or a wrong server key.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import zmq
from zmq.utils.monitor import recv_monitor_message

from tracetool import messages, schema
from tracetool.bus_credentials import BusKeys
from tracetool.exit_tally import RunTally
from vmworker.errors import VmsupError
from vmworker.publisher import SEND_HWM

from .keys import KeyPaths, default_keys_dir, load_client, parse_listen
from .recorder import LIVE_HWM
from .remote_runs import RunStart

# How long the launch waits for the recorder's handshake before it gives up (no VM started).
CONNECT_TIMEOUT = float(os.environ.get("VMSUP_RECORDER_CONNECT_TIMEOUT", "10"))
# Messages (per worker socket) the relay takes off the run's events socket before the workers' sends
# block: few, the workers' own queues (vmworker/publisher.py) are where batches wait.
RELAY_RCVHWM = 8
# At the end: how long the relay waits for the link to take what the workers sent (a cut link
# holds it), and how quiet the events socket must be before the relay stops.
DRAIN_DEADLINE = 15.0
DRAIN_QUIET = 0.3
_POLL_MS = 100


class RemoteRecorderError(VmsupError):
    """The remote recorder cannot be reached, or refused this launch: one line, no VM started."""


def check_recorder(endpoint: str, keys_dir: str | None) -> tuple[str, Path]:
    """What `vmsup launch --recorder` checks before anything starts: the endpoint and the keys."""
    try:
        endpoint = parse_listen(endpoint)
    except VmsupError as e:
        raise RemoteRecorderError(str(e).replace("--listen", "--recorder", 1)) from None
    directory = Path(keys_dir) if keys_dir else default_keys_dir()
    paths = KeyPaths(directory)
    if not paths.client_secret.exists() or not paths.server_public.exists():
        raise RemoteRecorderError(
            f"--recorder {endpoint} needs CURVE keys in {directory}: client.key_secret (this launch's key, "
            f"authorized on the recorder's host) and server.key (the recorder's public key); "
            f"'vmsup keys' on the recorder's host makes both")
    load_client(directory)  # their permissions and format
    return endpoint, directory


class RemoteLink:
    """The launch's connection to a remote recorder and the relay thread that feeds it."""

    def __init__(self, context: zmq.Context, endpoint: str, keys_dir: Path) -> None:
        self.endpoint = endpoint
        self.keys = load_client(keys_dir)
        self.context = context
        self.link = context.socket(zmq.PUSH)
        self.link.curve_publickey = self.keys.public
        self.link.curve_secretkey = self.keys.secret
        self.link.curve_serverkey = self.keys.server_public
        self.link.setsockopt(zmq.SNDHWM, SEND_HWM)
        self.link.setsockopt(zmq.SNDTIMEO, _POLL_MS)
        # A link that stays cut at the very end: what is still queued then is given up after this.
        self.link.setsockopt(zmq.LINGER, int(DRAIN_DEADLINE * 1000))
        self.events: zmq.Socket | None = None
        self.live: zmq.Socket | None = None
        self.monitor: zmq.Socket | None = None
        self.drops = 0  # times the connection dropped (a recorder that died, a reset): said at the end
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._stop_time = 0.0
        self.relayed = 0  # messages forwarded to the recorder
        self.relayed_bytes = 0
        self.undelivered = 0  # messages given up on at the end (the link stayed cut)
        # Messages queued while the connection was down (since its last drop): they go out if it
        # comes back, and are undelivered if the launch ends first (ZeroMQ drops its queue).
        self._down = False
        self._queued_while_down = 0
        self._queued_while_down_bytes = 0
        self.blocked_seconds = 0.0  # time the link was full: the recorder's backpressure
        # The VMs' exits as the relay saw them go by (delivered or not); read by the launch's
        # thread (ps, the live table) while the relay adds to it.
        self.tally = RunTally()
        self._tally_lock = threading.Lock()

    def connect(self, timeout: float = CONNECT_TIMEOUT) -> None:
        """Connect and wait for the CURVE handshake; RemoteRecorderError says why it failed."""
        self.monitor = self.link.get_monitor_socket()
        self.link.connect(self.endpoint)
        seen = self._handshake(self.monitor, time.monotonic() + timeout)
        if seen == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            return  # the monitor stays: the relay counts the connection's drops
        self._close_monitor()
        self.link.close(linger=0)
        if seen == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            raise RemoteRecorderError(f"the recorder at {self.endpoint} refused this launch's CURVE key "
                                      f"(put client.key in authorized_clients/ on its host)")
        if seen is not None:
            raise RemoteRecorderError(f"the CURVE handshake with {self.endpoint} failed: is server.key the "
                                      f"public key of the recorder listening there?")
        raise RemoteRecorderError(f"no recorder answered at {self.endpoint} within {timeout:g} s "
                                  f"(is 'vmsup record --listen' running there, and reachable?)")

    @staticmethod
    def _handshake(monitor: zmq.Socket, until: float) -> int | None:
        """The handshake's outcome: succeeded, refused (auth), failed (a connection that dropped
        without succeeding), or None when nothing answered before `until`."""
        connected = False
        while (left := until - time.monotonic()) > 0:
            if not monitor.poll(int(min(left, 0.2) * 1000) + 1):
                continue
            event = recv_monitor_message(monitor)["event"]
            if event in (zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_HANDSHAKE_FAILED_AUTH):
                return event
            if event in (zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL):
                return event
            if event == zmq.EVENT_CONNECTED:
                connected = True
            elif event == zmq.EVENT_DISCONNECTED and connected:
                return event  # the server dropped us mid-handshake: its key is not the one we have
        return None

    def start(self, events_endpoint: str, live_endpoint: str, bus_keys: BusKeys, vms: list[tuple[int, str]]) -> None:
        """Register the run (the first message on the link), bind the run's events socket and
        start relaying it."""
        start = RunStart(run=bus_keys.run, secret=bytes.fromhex(bus_keys.secret_hex), vms=[list(v) for v in vms],
                         host=os.uname().nodename, t=time.monotonic_ns(), wall=time.time_ns())
        self._send([bus_keys.supervisor().frame(), messages.pack(start)])
        self.events = self.context.socket(zmq.PULL)
        self.events.setsockopt(zmq.RCVHWM, RELAY_RCVHWM)
        messages.BUS.apply(self.events)
        self.events.bind(events_endpoint)
        self.live = self.context.socket(zmq.PUB)
        self.live.setsockopt(zmq.SNDHWM, LIVE_HWM)
        self.live.bind(live_endpoint)
        self._thread = threading.Thread(target=self._relay, name="recorder-link", daemon=True)
        self._thread.start()

    def _send(self, frames) -> bool:
        """Send on the link, blocking while it is full (backpressure); False once the relay is
        stopping and the link stayed full past DRAIN_DEADLINE."""
        waited_since = None
        while True:
            try:
                self.link.send_multipart(frames, copy=False)
                if waited_since is not None:
                    self.blocked_seconds += time.monotonic() - waited_since
                return True
            except zmq.Again:
                now = time.monotonic()
                waited_since = waited_since or now
                if self._stopping.is_set() and now - self._stop_time > DRAIN_DEADLINE:
                    self.blocked_seconds += now - waited_since
                    return False

    def _relay(self) -> None:
        poller = zmq.Poller()
        poller.register(self.events, zmq.POLLIN)
        poller.register(self.monitor, zmq.POLLIN)
        quiet_since = time.monotonic()
        while True:
            ready = dict(poller.poll(_POLL_MS))
            while self.monitor in ready:
                try:
                    event = recv_monitor_message(self.monitor, flags=zmq.NOBLOCK)["event"]
                except zmq.Again:
                    break
                if event == zmq.EVENT_DISCONNECTED:
                    self.drops += 1
                    self._down = True
                elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:  # back (a recorder restarted there)
                    self._down = False
                    self._queued_while_down = self._queued_while_down_bytes = 0
            if self.events in ready:
                frames = self.events.recv_multipart(copy=False)
                self.live.send(frames[-1], flags=zmq.NOBLOCK, copy=False)  # PUB: drops for a slow viewer
                self._count(frames[-1].buffer)
                if self._send(frames):
                    size = sum(len(f) for f in frames)
                    self.relayed += 1
                    self.relayed_bytes += size
                    if self._down:
                        self._queued_while_down += 1
                        self._queued_while_down_bytes += size
                else:
                    self.undelivered += 1
                quiet_since = time.monotonic()
            elif self._stopping.is_set() and time.monotonic() - quiet_since > DRAIN_QUIET:
                return

    def _count(self, raw: memoryview) -> None:
        try:
            msg = messages.unpack(raw)
        except (messages.MessageError, schema.SchemaError):
            return  # the recorder refuses it, and counts the refusal on its side
        with self._tally_lock:
            self.tally.take(msg)

    def stats(self) -> dict:
        """What `vmsup ps` and the live table read of a remote launch: each VM's exits, in the
        shape of a local recorder's `stats`."""
        with self._tally_lock:
            return {"vms": {str(vm): {"exits": t.exits, "unclaimed": t.unclaimed} for vm, t in self.tally.vms.items()},
                    "tally": self.tally.to_json()}

    def close(self) -> dict:
        """Relay what the workers sent (they have ended), then close; what the launch knows of
        the link: messages and bytes relayed, those given up on (at least: what was queued before
        a drop is not known), whether the connection was down at the end, time spent blocked, and the
        tally of the VMs' exits (exit_tally.RunTally.to_json)."""
        self._stop_time = time.monotonic()
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
        for sock in (self.events, self.live):
            if sock is not None:
                sock.close(linger=0)
        self._close_monitor()
        ended_down = self._down
        if ended_down:  # what waited for a connection that never came back: never delivered
            self.relayed -= self._queued_while_down
            self.relayed_bytes -= self._queued_while_down_bytes
            self.undelivered += self._queued_while_down
        # What is queued still goes out while the connection lives (LINGER); a link that already
        # stayed full past the deadline would only make the launch wait as long again.
        self.link.close(linger=0 if self.undelivered or ended_down else None)
        return {"endpoint": self.endpoint, "messages": self.relayed, "bytes": self.relayed_bytes,
                "undelivered": self.undelivered, "blocked_seconds": self.blocked_seconds, "drops": self.drops,
                "ended_down": ended_down, "tally": self.tally.to_json()}

    def _close_monitor(self) -> None:
        if self.monitor is not None:
            self.link.disable_monitor()
            self.monitor.close(linger=0)
            self.monitor = None
