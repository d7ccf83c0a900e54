"""Wire limits: how large one message of a socket, and what it holds, may be (untrusted bytes).

Each socket kind has one WireLimits: ZeroMQ drops a peer that sends more than max_bytes before it
is buffered (ZMQ_MAXMSGSIZE), and msgpack refuses containers and strings that claim more than the
rest. The message classes (tracetool/messages.py) then check each field.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from .message_fields import MAX_BUS_MESSAGE_BYTES, MessageError


@dataclass(frozen=True)
class WireLimits:
    """How large one message of a socket may be, and the strings and containers in it."""

    max_bytes: int
    max_str: int
    max_array: int
    max_map: int

    def apply(self, socket) -> None:
        """Set ZMQ_MAXMSGSIZE on a receiving socket (before bind/connect)."""
        import zmq
        socket.setsockopt(zmq.MAXMSGSIZE, self.max_bytes)

    def unpack(self, raw: bytes):
        """Bytes → a msgpack object within these bounds; MessageError otherwise."""
        if len(raw) > self.max_bytes:
            raise MessageError(f"message of more than {self.max_bytes} bytes")
        try:
            # strict_map_key=False: final_seq may be a map keyed by vCPU number (an int).
            return msgpack.unpackb(raw, raw=False, strict_map_key=False, max_bin_len=self.max_bytes,
                                   max_str_len=self.max_str, max_array_len=self.max_array,
                                   max_map_len=self.max_map, max_ext_len=0)
        except Exception as e:  # msgpack raises several unrelated types for bad bytes
            raise MessageError(f"not msgpack ({type(e).__name__})") from None


# The bus (events.sock, the --listen tcp socket, the live stream). A real batch is at most
# 4096 rows × 48 B plus MAX_PAYLOAD_BYTES of string-I/O data; 4 MiB leaves room and keeps what a
# flood can queue in the recorder (EVENTS_RCVHWM messages per peer) small.
MAX_PAYLOAD_BYTES = 2 << 20
BUS = WireLimits(max_bytes=MAX_BUS_MESSAGE_BYTES, max_str=1 << 20, max_array=1 << 16, max_map=1 << 12)
# Control sockets (vmsup ps/stop/…, the recorder's stats/finish): small requests and replies.
CONTROL = WireLimits(max_bytes=1 << 20, max_str=1 << 16, max_array=1 << 12, max_map=1 << 12)

# A VM's key input socket (vmsup screen → worker): {"keys": [name, …]} or {"text": …}.
KEY_INPUT = WireLimits(max_bytes=4096, max_str=4096, max_array=64, max_map=8)
