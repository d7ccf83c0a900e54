"""The worker's end of the recording path: a ZeroMQ PUSH socket with backpressure.

PUSH/PULL, not PUB/SUB: PUB drops silently at the high-water mark (measured on this project's
machines: a slow subscriber got ~88% of the events, with no error), and the recording must be lossless. A full queue blocks the sender, which
stalls the vCPU that flushes — backpressure — for as long as the recorder lives.
"""

from __future__ import annotations

import time

import msgpack
import zmq

# Batches queued per socket before send() blocks: at 4096 events a batch, enough to ride out a
# recorder hiccup without holding much memory (each batch is ~160 KiB).
SEND_HWM = 64
# While the VM is stopping, how long a send may wait for a recorder that stopped taking batches.
STOPPING_SEND_TIMEOUT = 5.0
_POLL_MS = 200


class EventPublisher:
    """One PUSH socket (ZeroMQ sockets are not thread-safe: one per vCPU thread, one for the VM)."""

    def __init__(self, context: zmq.Context, endpoint: str, stopping=lambda: False, credential: bytes = b"") -> None:
        self.socket = context.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.SNDHWM, SEND_HWM)
        self.socket.setsockopt(zmq.SNDTIMEO, _POLL_MS)
        self.socket.setsockopt(zmq.LINGER, int(STOPPING_SEND_TIMEOUT * 1000))
        self.socket.connect(endpoint)
        self.stopping = stopping  # callable: True once the VM is stopping
        # The sender's credential (tracetool/bus_credentials.py), the first frame of every message.
        self.credential = credential
        self.sent = 0
        self.dropped = 0  # messages given up on (the recorder stopped taking them while we stopped)
        self.blocked_seconds = 0.0  # time spent waiting on a full queue: backpressure, made visible

    def send(self, message: dict) -> bool:
        payload = msgpack.packb(message, use_bin_type=True)
        waited_since = None
        while True:
            try:
                self.socket.send_multipart((self.credential, payload), copy=False)
                self.sent += 1
                if waited_since is not None:
                    self.blocked_seconds += time.monotonic() - waited_since
                return True
            except zmq.Again:
                now = time.monotonic()
                if waited_since is None:
                    waited_since = now
                if self.stopping() and now - waited_since > STOPPING_SEND_TIMEOUT:
                    self.dropped += 1
                    self.blocked_seconds += now - waited_since
                    return False

    def close(self) -> None:
        self.socket.close()
