"""Keys for the i8042's keyboard: key names → scan code set 1, key scripts (`--keys FILE`), typing.

Scan code set 1 is what a PC kernel reads at port 0x60 with the 8042's translation on (command
byte bit 6, the state firmware leaves): one make code per key press; the break code on release is
the make code with bit 7 set; the extended keys (right Ctrl/Alt, arrows, the Insert/Delete/Home/
End/Page block) send 0xE0 before each. The codes are the IBM PC keyboard's (XT) set, into which
the 8042 translates an AT keyboard's set 2.

Public surface, for `--keys` and for the screen's interactive typing:
    key_stroke("Enter") / key_stroke("ctrl+c")   → bytes of one press-and-release
    text_strokes("Hi!\n")                         → the strokes that type that text (Shift included)
    inject_keys(i8042, ["h", "i", "Enter"])       → press them, waiting for keyboard buffer room
    inject_text(i8042, "hello\n")
    parse_key_script(path) / KeyFeeder            → a key script, typed by a thread with its pacing
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from ..errors import SpecError, VmsupError

E0 = 0xE0  # prefix of the extended keys
BREAK = 0x80  # break code = make code | 0x80

# Make codes, scan code set 1.
_MAKE: dict[str, int] = {
    "escape": 0x01,
    **{str(d): 0x02 + (d - 1) for d in range(1, 10)}, "0": 0x0B,
    "minus": 0x0C, "equal": 0x0D, "backspace": 0x0E, "tab": 0x0F,
    **{c: 0x10 + i for i, c in enumerate("qwertyuiop")},
    "leftbracket": 0x1A, "rightbracket": 0x1B, "enter": 0x1C, "leftctrl": 0x1D,
    **{c: 0x1E + i for i, c in enumerate("asdfghjkl")},
    "semicolon": 0x27, "apostrophe": 0x28, "backquote": 0x29, "leftshift": 0x2A, "backslash": 0x2B,
    **{c: 0x2C + i for i, c in enumerate("zxcvbnm")},
    "comma": 0x33, "period": 0x34, "slash": 0x35, "rightshift": 0x36, "kpasterisk": 0x37,
    "leftalt": 0x38, "space": 0x39, "capslock": 0x3A,
    **{f"f{n}": 0x3B + (n - 1) for n in range(1, 11)},
    "numlock": 0x45, "scrolllock": 0x46, "f11": 0x57, "f12": 0x58,
}
# Extended keys: 0xE0 then the make code (and 0xE0 then the break code).
_MAKE_E0: dict[str, int] = {
    "rightctrl": 0x1D, "rightalt": 0x38, "home": 0x47, "up": 0x48, "pageup": 0x49, "left": 0x4B,
    "right": 0x4D, "end": 0x4F, "down": 0x50, "pagedown": 0x51, "insert": 0x52, "delete": 0x53,
}
ALIASES = {
    "esc": "escape", "return": "enter", "bksp": "backspace", "spacebar": "space",
    "shift": "leftshift", "lshift": "leftshift", "rshift": "rightshift",
    "ctrl": "leftctrl", "control": "leftctrl", "lctrl": "leftctrl", "rctrl": "rightctrl",
    "alt": "leftalt", "lalt": "leftalt", "ralt": "rightalt", "altgr": "rightalt",
    "del": "delete", "ins": "insert", "pgup": "pageup", "pgdn": "pagedown",
    "-": "minus", "=": "equal", "[": "leftbracket", "]": "rightbracket", ";": "semicolon",
    "'": "apostrophe", "`": "backquote", "\\": "backslash", ",": "comma", ".": "period", "/": "slash",
}
MODIFIERS = frozenset({"leftshift", "rightshift", "leftctrl", "rightctrl", "leftalt", "rightalt"})

# Characters a US layout types, as (key, shifted).
_SHIFTED_SYMBOLS = dict(zip('!@#$%^&*()_+{}:"~|<>?', [
    "1", "2", "3", "4", "5", "6", "7", "8", "9", "0", "minus", "equal", "leftbracket", "rightbracket",
    "semicolon", "apostrophe", "backquote", "backslash", "comma", "period", "slash"]))
CHAR_KEYS: dict[str, tuple[str, bool]] = {
    **{c: (c, False) for c in "abcdefghijklmnopqrstuvwxyz0123456789"},
    **{c.upper(): (c, True) for c in "abcdefghijklmnopqrstuvwxyz"},
    **{c: (ALIASES[c], False) for c in "-=[];'`\\,./"},
    **{c: (k, True) for c, k in _SHIFTED_SYMBOLS.items()},
    " ": ("space", False), "\n": ("enter", False), "\t": ("tab", False),
}

KEY_NAMES = frozenset(_MAKE) | frozenset(_MAKE_E0)


class UnknownKeyError(ValueError):
    """A key name or character that no key of the keyboard produces."""


def canonical(name: str) -> str:
    """The table's name for a key name, case-insensitively, aliases resolved; UnknownKeyError if none."""
    key = name if len(name) == 1 else name.strip().lower()
    key = ALIASES.get(key, key).lower()
    if key not in KEY_NAMES:
        raise UnknownKeyError(f"unknown key name {name!r}")
    return key


def make_code(key: str) -> bytes:
    key = canonical(key)
    return bytes((E0, _MAKE_E0[key])) if key in _MAKE_E0 else bytes((_MAKE[key],))


def break_code(key: str) -> bytes:
    key = canonical(key)
    return bytes((E0, _MAKE_E0[key] | BREAK)) if key in _MAKE_E0 else bytes((_MAKE[key] | BREAK,))


def key_stroke(spec: str) -> bytes:
    """One press and release: a key name ("Enter", "F5", "a") or a chord ("ctrl+alt+delete")."""
    parts = spec.split("+") if len(spec) > 1 and "+" in spec.strip("+") else [spec]
    keys = [canonical(p) for p in parts]
    *mods, key = keys
    for m in mods:
        if m not in MODIFIERS:
            raise UnknownKeyError(f"{m!r} in {spec!r} is not a modifier (shift, ctrl, alt)")
    return (b"".join(make_code(m) for m in mods) + make_code(key) + break_code(key)
            + b"".join(break_code(m) for m in reversed(mods)))


def char_stroke(ch: str) -> bytes:
    """The stroke that types `ch` on a US layout (Shift held for capitals and shifted symbols)."""
    try:
        key, shifted = CHAR_KEYS[ch]
    except KeyError:
        raise UnknownKeyError(f"no key types {ch!r}") from None
    return key_stroke(f"leftshift+{key}" if shifted else key)


def text_strokes(text: str) -> list[bytes]:
    return [char_stroke(ch) for ch in text]


def inject_keys(i8042, keys: Iterable[str], timeout: float | None = None) -> bool:
    """Press and release each key (name or chord) on the VM's keyboard; False if it went away."""
    return all(i8042.inject_scancodes(key_stroke(k), timeout) for k in keys)


def inject_text(i8042, text: str, timeout: float | None = None) -> bool:
    return all(i8042.inject_scancodes(s, timeout) for s in text_strokes(text))


# --- key scripts -------------------------------------------------------------------------------
MAX_SCRIPT_BYTES = 1 << 20
MAX_WAIT_MS = 3_600_000
_TEXT = re.compile(r'^text:\s*"((?:[^"\\]|\\.)*)"\s*$')
_WAIT = re.compile(r"^wait:\s*(\d+)\s*$")
_ESCAPES = {"n": "\n", "t": "\t", '"': '"', "\\": "\\"}


class KeyScriptError(SpecError):
    """A key script that cannot be typed; the message names file and line."""

    def __init__(self, path: str, line: int | None, reason: str) -> None:
        self.path, self.line, self.reason = path, line, reason
        super().__init__(f"{path}:{line}: {reason}" if line is not None else f"{path}: {reason}")


@dataclass(frozen=True)
class Step:
    """Either keys to send (one stroke each) or a pause."""

    strokes: tuple[bytes, ...] = ()
    wait_s: float = 0.0
    line: int = 0


def _unescape(body: str) -> str:
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), "\\" + m.group(1)), body)


def parse_key_script_text(text: str, path: str = "<keys>") -> list[Step]:
    """Parse a key script: one entry a line — a key name or chord (`Enter`, `ctrl+c`),
    `text:"typed text"` (escapes \\n \\t \\" \\\\), `wait:MS`; `#` starts a comment line."""
    steps: list[Step] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            if line.startswith("text:"):
                m = _TEXT.match(line)
                if not m:
                    raise KeyScriptError(path, n, 'text: wants a double-quoted string, e.g. text:"hello"')
                steps.append(Step(strokes=tuple(text_strokes(_unescape(m.group(1)))), line=n))
            elif line.startswith("wait:"):
                m = _WAIT.match(line)
                if not m:
                    raise KeyScriptError(path, n, "wait: wants a whole number of milliseconds, e.g. wait:500")
                ms = int(m.group(1))
                if ms > MAX_WAIT_MS:
                    raise KeyScriptError(path, n, f"wait:{ms} is longer than an hour")
                steps.append(Step(wait_s=ms / 1000, line=n))
            else:
                steps.append(Step(strokes=(key_stroke(line),), line=n))
        except UnknownKeyError as e:
            raise KeyScriptError(path, n, str(e)) from None
    return steps


def parse_key_script(path: str) -> list[Step]:
    """Read and parse a key script file; KeyScriptError (one line, file:line) on any problem."""
    try:
        if os.path.isdir(path):
            raise KeyScriptError(path, None, "is a directory, not a key script")
        with open(path, "rb") as f:
            data = f.read(MAX_SCRIPT_BYTES + 1)
    except OSError as e:
        raise KeyScriptError(path, None, e.strerror or str(e)) from None
    if len(data) > MAX_SCRIPT_BYTES:
        raise KeyScriptError(path, None, f"is larger than {MAX_SCRIPT_BYTES} bytes")
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise KeyScriptError(path, line, "is not UTF-8 text") from None
    return parse_key_script_text(text, path)


class KeyFeeder:
    """Types a parsed key script into an I8042 from its own thread.

    It starts `SETTLE_SECONDS` after the guest first touches port 0x60/0x64 (so a kernel's init —
    flushing the output buffer, writing the command byte — is over before the first key), or
    `START_DELAY_SECONDS` after `start()` for a guest that waits for IRQ 1 without touching the
    ports first. Then each stroke goes in as soon as the keyboard buffer has room; `wait:` lines
    pause. `stop()` ends it early.
    """

    START_DELAY_SECONDS = 1.0
    SETTLE_SECONDS = 0.1

    def __init__(self, i8042, steps: list[Step]) -> None:
        self.i8042 = i8042
        self.steps = steps
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="keys", daemon=True)
        self.strokes_sent = 0
        self.error = ""
        self.done = threading.Event()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.i8042.close()
        if self._thread.is_alive():
            self._thread.join(timeout=1.0)

    def _run(self) -> None:
        try:
            if self.i8042.touched.wait(self.START_DELAY_SECONDS):
                self._stop.wait(self.SETTLE_SECONDS)
            for step in self.steps:
                if self._stop.is_set():
                    return
                if step.wait_s:
                    self._stop.wait(step.wait_s)
                for stroke in step.strokes:
                    if self._stop.is_set() or not self.i8042.inject_scancodes(stroke):
                        return
                    self.strokes_sent += 1
        except VmsupError as e:  # the IRQ line of a VM that is going away: typing ends, the VM decides
            self.error = str(e)
        finally:
            self.done.set()


class ClockedKeyScript:
    """A key script typed on a --deterministic VM's virtual clock: vmworker/deterministic.py calls
    `tick(now_ns)` after each guest exit, on the vCPU's thread, so two runs type every stroke at
    the same exit. KeyFeeder's pacing in virtual time: it starts `SETTLE_NS` after the exit where
    the guest first touched port 0x60/0x64 (or at `START_NS` for a guest that waits for IRQ 1
    without touching them), each stroke goes in once the keyboard buffer has room for all of it,
    `wait:` lines pause. Virtual time runs at one instruction a nanosecond and a HLT jumps ahead
    (`next_due`): the delays are shorter than KeyFeeder's, which a polling guest pays in real
    instructions (~0.7M/s here).
    """

    START_NS = 10_000_000  # 10 ms of virtual time
    SETTLE_NS = 1_000_000  # 1 ms

    def __init__(self, keyboard, steps: list[Step], buffer_size: int) -> None:
        self.keyboard = keyboard  # the i8042 (or screen.RecordingKeyboard, which records each press)
        self.steps = steps
        self.buffer_size = buffer_size
        self.strokes_sent = 0
        self._step = self._stroke = 0
        self._waited = False
        self._at: int | None = None  # virtual ns before which nothing happens; None: not started

    def done(self) -> bool:
        return self._step >= len(self.steps)

    def next_due(self) -> int | None:
        """The virtual time of the next stroke or wait's end (where a HLT may jump to), or None
        when the script is done or waits for the guest to make room."""
        if self.done():
            return None
        if self._at is None:
            return self.START_NS
        step = self.steps[self._step]
        if self._waited or not step.wait_s:
            if self._stroke < len(step.strokes) and self._room_for(step.strokes[self._stroke]) is False:
                return None
        return self._at

    def _room_for(self, stroke: bytes) -> bool:
        return self.keyboard.keyboard_buffered() + len(stroke) <= self.buffer_size

    def tick(self, now: int) -> None:
        if self._at is None:
            if self.keyboard.touched.is_set():
                self._at = now + self.SETTLE_NS
            elif now >= self.START_NS:
                self._at = now
            else:
                return
        while not self.done() and now >= self._at:
            step = self.steps[self._step]
            if step.wait_s and not self._waited:
                self._waited = True
                self._at = now + int(step.wait_s * 1e9)
                continue
            if self._stroke < len(step.strokes):
                stroke = step.strokes[self._stroke]
                if not self._room_for(stroke):
                    return  # the guest makes room by reading port 0x60: a later exit
                self.keyboard.inject_scancodes(stroke, 0)
                self._stroke += 1
                self.strokes_sent += 1
                continue
            self._step, self._stroke, self._waited = self._step + 1, 0, False
