"""The per-exit text log, in the seed's words: `out port: 16, data: 0`.

One line per exit, written by the vCPU loop only when the VM is not `--quiet`. With several
vCPUs each line starts with `vcpu N: ` so interleaved threads stay readable.
"""

from __future__ import annotations

import threading


def _value(data: bytes) -> int:
    return int.from_bytes(data, "little")


class ExitLog:
    def __init__(self, stream, multi_vcpu: bool) -> None:
        # A binary stream shared with the console, so exit lines and guest text keep their order.
        self._stream = stream
        self._multi = multi_vcpu
        self._lock = threading.Lock()

    def _line(self, vcpu: int, text: str) -> None:
        if self._multi:
            text = f"vcpu {vcpu}: {text}"
        with self._lock:
            self._stream.write(text.encode() + b"\n")

    def io(self, vcpu: int, is_out: bool, port: int, size: int, count: int, data: bytes) -> None:
        word = "out" if is_out else "in"
        if count == 1:
            self._line(vcpu, f"{word} port: {port}, data: {_value(data)}")
        else:
            values = " ".join(str(_value(data[i:i + size])) for i in range(0, size * count, size))
            self._line(vcpu, f"{word} port: {port}, size: {size}, count: {count}, data: {values}")

    def mmio(self, vcpu: int, is_write: bool, addr: int, data: bytes) -> None:
        word = "write" if is_write else "read"
        self._line(vcpu, f"mmio {word} addr: {addr:#x}, len: {len(data)}, data: {_value(data):#x}")

    def event(self, vcpu: int, text: str) -> None:
        self._line(vcpu, text)

    def flush(self) -> None:
        with self._lock:
            self._stream.flush()
