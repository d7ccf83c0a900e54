"""A VM's VGA text screen in the terminal, and the keys typed there sent to its keyboard.

Used by `vmsup launch … --screen` (the foreground VM) and `vmsup screen VM` (attach from another
terminal). Snapshots come from the run's live stream (the recorder republishes the worker's
`screen` messages); keys go to the worker's input socket (`vm-<id>-input.sock`, a PULL it binds in
the private run dir) as key names, which the worker types on the i8042 as set-1 scancodes.

The view never slows a VM: the live stream drops for a slow terminal, and the panel is redrawn
at most REFRESH_HZ times a second, whatever the snapshot rate.
"""

from __future__ import annotations

import os
import select
import sys
import time

import msgpack
import zmq

from tracetool import messages, schema
from tracetool.screen import COLS, ROWS, Snapshot, rich_text

from .live import live_socket
from .terminal_mode import cbreak

REFRESH_HZ = 10
NO_SCREEN_WAIT = 3.0  # `vmsup screen`: how long to wait for a first snapshot
_SCREEN_TAG = msgpack.packb(schema.MSG_SCREEN)
_END_TAG = msgpack.packb(schema.MSG_VM_END)


def input_endpoint(run_path, vm: int) -> str:
    return f"ipc://{os.path.join(str(run_path), f'vm-{vm}-input.sock')}"


# Terminal bytes → key names (vmworker.devices.keyboard names and chords).
_ESCAPES = {b"[A": "up", b"[B": "down", b"[C": "right", b"[D": "left", b"[H": "home", b"[F": "end",
            b"[2~": "insert", b"[3~": "delete", b"[5~": "pageup", b"[6~": "pagedown",
            b"OP": "f1", b"OQ": "f2", b"OR": "f3", b"OS": "f4"}
_CONTROL = {b"\r": "enter", b"\n": "enter", b"\t": "tab", b"\x7f": "backspace", b"\x08": "backspace"}


def terminal_keys(data: bytes) -> list[str]:
    """Key names for bytes a cbreak-mode terminal delivers (US layout; unknown bytes skipped)."""
    from vmworker.devices.keyboard import CHAR_KEYS
    keys: list[str] = []
    i = 0
    while i < len(data):
        b = data[i:i + 1]
        if b == b"\x1b":
            for seq, name in _ESCAPES.items():
                if data.startswith(seq, i + 1):
                    keys.append(name)
                    i += 1 + len(seq)
                    break
            else:
                keys.append("escape")
                i += 1
            continue
        if b in _CONTROL:
            keys.append(_CONTROL[b])
        elif 1 <= b[0] <= 26:
            keys.append(f"ctrl+{chr(ord('a') + b[0] - 1)}")
        else:
            ch = b.decode("latin-1")
            if ch in CHAR_KEYS:
                key, shifted = CHAR_KEYS[ch]
                keys.append(f"shift+{key}" if shifted else key)
        i += 1
    return keys


class ScreenFeed:
    """Screen snapshots (and the end) of one VM from a run's live stream; other messages are
    skipped after a cheap look at their first bytes, so an exit flood costs little to ignore."""

    def __init__(self, run_dir, vm: int) -> None:
        self.vm = vm
        self.run_dir = run_dir
        self.context = zmq.Context()
        self.socket = live_socket(self.context, run_dir)
        self.keys = self.context.socket(zmq.PUSH)
        self.keys.setsockopt(zmq.LINGER, 500)
        self.keys.setsockopt(zmq.SNDHWM, 64)
        self.keys.connect(input_endpoint(run_dir.path, vm))
        self.latest: Snapshot | None = None
        self.snapshots = 0
        self.malformed = 0
        self.ended = False

    def poll(self, timeout_ms: int = 0) -> bool:
        """Take what arrived; True if a new snapshot of our VM did."""
        new = False
        if not self.socket.poll(timeout_ms, zmq.POLLIN):
            return False
        for _ in range(1024):
            try:
                raw = self.socket.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            head = raw[:48]
            is_screen, is_end = _SCREEN_TAG in head, _END_TAG in head
            if not (is_screen or is_end):
                continue
            try:
                msg = messages.unpack(raw)
            except messages.MessageError:  # untrusted bytes: count and skip
                self.malformed += 1
                continue
            if getattr(msg, "vm", None) != self.vm:
                continue
            if isinstance(msg, messages.VmEnd):
                self.ended = True
                continue
            if not isinstance(msg, messages.Screen):
                continue
            snap = msg.snapshot()
            self.latest = snap
            self.snapshots += 1
            new = True
        return new

    def send(self, request: dict) -> bool:
        try:
            self.keys.send(msgpack.packb(request), zmq.NOBLOCK)
            return True
        except zmq.ZMQError:
            return False

    def send_keys(self, keys: list[str]) -> bool:
        return bool(keys) and self.send({"keys": keys[:64]})

    def request_refresh(self) -> bool:
        return self.send({"cmd": "refresh"})

    def close(self) -> None:
        self.socket.close(0)
        self.keys.close()
        self.context.term()


# A frame (border and padding) around the screen needs this much room; an 80×24 terminal has not.
PANEL_COLS, PANEL_ROWS = COLS + 4, ROWS + 2


def framed(console) -> bool:
    """Whether the console has room for the screen in a titled frame; without it the screen is
    drawn bare, all 80 columns, and the title and note go to the window title (status elsewhere)."""
    return console.width >= PANEL_COLS and console.height >= PANEL_ROWS


def render_panel(snap: Snapshot | None, title: str, note: str = "", *, frame: bool = True):
    """The screen as a rich renderable: in a titled frame, or bare (exactly 80 columns × 25 rows)."""
    from rich.panel import Panel
    from rich.text import Text
    if snap is None:
        body = Text("waiting for the VM's screen…".ljust(COLS) + "\n" * (ROWS - 1), no_wrap=True)
    else:
        body = rich_text(snap.cells, snap.cursor)
    if not frame:
        body.no_wrap = True
        return body
    return Panel(body, title=title, subtitle=note or None, width=PANEL_COLS, expand=False, padding=(0, 1))


class TerminalKeys:
    """Keys typed on stdin (cbreak mode on a TTY: one key at a time, unechoed; Ctrl-C stays a
    signal, so it still ends the view). A pipe works too: its bytes are typed, up to EOF."""

    def __init__(self, stdin=None) -> None:
        stdin = sys.stdin if stdin is None else stdin
        try:
            self.fd = stdin.fileno() if stdin is not None and not stdin.closed else None
        except (OSError, ValueError):
            self.fd = None
        self.tty = self.fd is not None and os.isatty(self.fd)
        self._mode = cbreak(self.fd if self.tty else None)

    def __enter__(self) -> "TerminalKeys":
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)

    def read(self) -> list[str]:
        if self.fd is None:
            return []
        try:
            ready, _, _ = select.select([self.fd], [], [], 0)
            if not ready:
                return []
            data = os.read(self.fd, 256)
        except OSError:
            data = b""
        if not data:  # EOF: nothing more to type
            self.fd = None
            return []
        return terminal_keys(data)


class ScreenView:
    """Redraws the panel (at most REFRESH_HZ a second) and forwards typed keys; call tick() often."""

    def __init__(self, feed: ScreenFeed, keys: TerminalKeys, live, title: str) -> None:
        self.feed, self.keys, self.live, self.title = feed, keys, live, title
        self.keys_sent = 0
        self._dirty = False
        self._drawn_at = 0.0

    def tick(self, *_args) -> None:
        if self.feed.poll(0):
            self._dirty = True
        typed = self.keys.read()
        if typed and self.feed.send_keys(typed):
            self.keys_sent += len(typed)
        now = time.monotonic()
        if self._dirty and now - self._drawn_at >= 1.0 / REFRESH_HZ:
            self.draw()
            self._drawn_at = now

    def draw(self) -> None:
        self._dirty = False
        console = self.live.console
        frame = framed(console)
        if not frame and console.is_terminal:
            console.set_window_title(" · ".join(x for x in (self.title, self._note()) if x))
        self.live.update(render_panel(self.feed.latest, self.title, self._note(), frame=frame), refresh=True)

    def _note(self) -> str:
        return "typing goes to the guest · Ctrl-C ends" if self.keys.tty else ""
