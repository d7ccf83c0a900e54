"""The worker's screen and keyboard services, off the vCPU threads.

`ScreenSampler`: a thread that reads the VGA text buffer every `interval` seconds and, only when
its 4000 bytes or the cursor changed, sends a `screen` message (tracetool.screen) on its own
publisher (ZeroMQ sockets are not thread-safe). It stays silent while the buffer is blank unless
asked (`--screen`), so a guest that never draws costs one 4 KiB compare per interval.

`KeyInput`: a thread that binds a PULL socket (`vm-<id>-input.sock` in the private run dir) for
key names from `vmsup launch --screen` / `vmsup screen`, types them on the i8042, and records
every key press — typed or from a key script — as an `input` message.

Neither touches the vCPU loop: the guest writes the buffer without exits, and the i8042's
`inject_scancodes` is the keyboard's own thread-safe entry.
"""

from __future__ import annotations

import queue
import threading
import time

import zmq

from tracetool import messages, wire_limits
from tracetool.screen import encode_cells, is_blank

from .devices import keyboard
from .publisher import EventPublisher

# At most 5 snapshots a second: enough to watch a kernel boot, small enough that a guest
# rewriting its screen constantly costs the recorder ~5 records/s (~1 KiB each at most).
SAMPLE_INTERVAL = 0.2
# Input messages are small maps of key names; anything larger is refused by ZeroMQ itself.
MAX_KEYS_PER_MESSAGE = wire_limits.KEY_INPUT.max_array
KEY_TIMEOUT = 2.0  # seconds a key waits for room in a full keyboard buffer before it is dropped


class ScreenSampler:
    def __init__(self, screen, publisher: EventPublisher | None, vm: int, epoch: int, *, always: bool = False,
                 interval: float = SAMPLE_INTERVAL, on_snapshot=None) -> None:
        self.screen = screen
        self.publisher = publisher
        self.vm, self.epoch = vm, epoch
        self.always = always  # --screen: publish even a blank screen
        self.interval = interval
        self.on_snapshot = on_snapshot
        self.sent = 0
        self.bytes_sent = 0  # compressed cells
        self.active = False  # the buffer was non-blank once (or --screen): snapshots flow
        self._last: tuple[bytes, object] | None = None
        self._refresh = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="screen", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def refresh(self) -> None:
        """Send the current screen at the next sample even if unchanged (a viewer just attached)."""
        self._refresh.set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)
        self.sample()  # the last screen before the VM ended

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> bool:
        cells, cursor = self.screen.snapshot()
        force = self._refresh.is_set()
        if self._last is not None and self._last == (cells, cursor) and not force:
            return False
        if not self.active:
            if not self.always and is_blank(cells):
                return False
            self.active = True
        self._refresh.clear()
        self._last = (cells, cursor)
        data = encode_cells(cells)
        msg = messages.Screen(vm=self.vm, epoch=self.epoch, t=time.monotonic_ns(),
                              cursor=list(cursor) if cursor else None, cells=data).to_msg()
        if self.publisher is not None:
            self.publisher.send(msg)
        if self.on_snapshot is not None:
            self.on_snapshot(msg)
        self.sent += 1
        self.bytes_sent += len(data)
        return True

    def statistics(self) -> dict:
        return {"snapshots": self.sent, "snapshot_bytes": self.bytes_sent}


def _stroke_names() -> dict[bytes, str]:
    names: dict[bytes, str] = {}
    for key in sorted(keyboard.KEY_NAMES):
        names.setdefault(keyboard.key_stroke(key), key)
        names.setdefault(keyboard.key_stroke(f"leftshift+{key}"), f"shift+{key}")
    for ch, (key, shifted) in keyboard.CHAR_KEYS.items():
        names[keyboard.key_stroke(f"leftshift+{key}" if shifted else key)] = ch if ch.isprintable() else key
    return names


class RecordingKeyboard:
    """Stands in for the i8042 where keys are injected: each press goes on, and is recorded."""

    def __init__(self, i8042, record) -> None:
        self._i8042 = i8042
        self._record = record

    def inject_scancodes(self, codes: bytes, timeout: float | None = None) -> bool:
        ok = self._i8042.inject_scancodes(codes, timeout)
        if ok:
            self._record(None, codes)
        return ok

    def __getattr__(self, name):
        return getattr(self._i8042, name)


class KeyInput:
    """Key presses in (socket, key script) → the i8042, and `input` records out."""

    def __init__(self, i8042, context: zmq.Context | None, endpoint: str | None, publisher: EventPublisher | None,
                 vm: int, epoch: int, sampler: ScreenSampler | None = None) -> None:
        self.i8042 = i8042
        self.publisher = publisher
        self.vm, self.epoch = vm, epoch
        self.sampler = sampler
        self.keys_in = 0
        self.rejected = 0
        self._names: dict[bytes, str] | None = None
        self._records: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self.socket = None
        self.error = ""
        if context is not None and endpoint is not None:
            self.socket = context.socket(zmq.PULL)
            wire_limits.KEY_INPUT.apply(self.socket)
            self.socket.setsockopt(zmq.RCVHWM, 256)
            self.socket.setsockopt(zmq.LINGER, 0)
            try:
                self.socket.bind(endpoint)
            except zmq.ZMQError as e:  # no typing then (e.g. a path over the ipc limit); the VM runs
                self.error = f"key input socket {endpoint}: {e}"
                self.socket.close(0)
                self.socket = None
        self._thread = threading.Thread(target=self._run, name="key-input", daemon=True)

    def recording_keyboard(self) -> RecordingKeyboard:
        """What a key script's feeder should type on, so its keys are recorded too."""
        return RecordingKeyboard(self.i8042, self.record)

    def record(self, key: str | None, codes: bytes) -> None:
        """Queue one key press for recording (any thread); the input thread sends it."""
        self._records.put((time.monotonic_ns(), key, bytes(codes)))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=KEY_TIMEOUT + 1.0)
        self._flush_records()
        if self.socket is not None:
            self.socket.close(0)

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.socket is None:
                self._stop.wait(0.1)
            elif self.socket.poll(100, zmq.POLLIN):
                for _ in range(64):
                    try:
                        raw = self.socket.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._handle(raw)
            self._flush_records()

    def _handle(self, raw: bytes) -> None:
        """{"keys": [name, …]} types keys (names or chords, as in key scripts); {"text": "…"}
        types text; {"cmd": "refresh"} asks for the current screen. Bad messages are counted."""
        try:
            msg = wire_limits.KEY_INPUT.unpack(raw)
            if not isinstance(msg, dict):
                raise ValueError("not a map")
            if msg.get("cmd") == "refresh":
                if self.sampler is not None:
                    self.sampler.refresh()
                return
            strokes: list[tuple[str, bytes]] = []
            keys, text = msg.get("keys"), msg.get("text")
            if isinstance(keys, list) and all(isinstance(k, str) and len(k) <= 64 for k in keys):
                strokes += [(k, keyboard.key_stroke(k)) for k in keys]
            if isinstance(text, str) and len(text) <= MAX_KEYS_PER_MESSAGE:
                strokes += [(ch, keyboard.char_stroke(ch)) for ch in text]
            if not strokes:
                raise ValueError("no keys")
        except Exception:  # garbage, unknown key names: a typing client's mistake, never the VM's end
            self.rejected += 1
            return
        for name, codes in strokes:
            if self._stop.is_set() or not self.i8042.inject_scancodes(codes, KEY_TIMEOUT):
                return
            self.keys_in += 1
            self.record(name, codes)

    def _flush_records(self) -> None:
        while True:
            try:
                t, key, codes = self._records.get_nowait()
            except queue.Empty:
                return
            if key is None:
                if self._names is None:
                    self._names = _stroke_names()
                key = self._names.get(codes, "")
            if self.publisher is not None:
                self.publisher.send(messages.Input(vm=self.vm, epoch=self.epoch, t=t, key=key,
                                                   scancodes=codes).to_msg())


class ScreenServices:
    """The screen sampler and key input of one VM, wired to its recording; `stop()` before the
    recording closes (their sockets live in its ZeroMQ context)."""

    def __init__(self, spec, memory, devices, recording, stopping) -> None:
        from .devices.vga import VgaTextScreen
        self.sampler: ScreenSampler | None = None
        self.keys: KeyInput | None = None
        self._publishers: list[EventPublisher] = []
        i8042 = devices.i8042  # `devices`: the machine's StandardDevices
        if recording is None:
            return

        def publisher() -> EventPublisher:
            p = recording.publisher(stopping)
            self._publishers.append(p)
            return p

        if VgaTextScreen.available(memory):
            self.sampler = ScreenSampler(VgaTextScreen(memory, devices.vga), publisher(), spec.vm_id, spec.epoch,
                                         always=spec.screen)
        if i8042 is not None:
            self.keys = KeyInput(i8042, recording.context, spec.input_endpoint, publisher(), spec.vm_id, spec.epoch,
                                 self.sampler)

    def keyboard_for_script(self, i8042):
        """The i8042 a key script types on: through KeyInput, so its presses are recorded."""
        return self.keys.recording_keyboard() if self.keys is not None else i8042

    def start(self) -> None:
        for service in (self.sampler, self.keys):
            if service is not None:
                service.start()

    def stop(self) -> dict:
        stats: dict = {}
        if self.keys is not None:
            self.keys.stop()
            stats.update(keys_in=self.keys.keys_in, keys_rejected=self.keys.rejected)
        if self.sampler is not None:
            self.sampler.stop()
            stats.update(self.sampler.statistics())
        for p in self._publishers:
            p.close()
        self._publishers.clear()
        return stats
