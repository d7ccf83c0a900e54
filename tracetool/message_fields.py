"""Message fields: the checks a bus message's fields declare, the error they raise, and the base
class (`Message`) that runs them.

Each field of a message class (tracetool/messages.py, tracetool/batch_messages.py) carries one
check (`checked(Int(...))`); `Message.from_msg` runs them, so these classes are the only code that
judges a field's type, range and size. Split from messages.py so the message classes read as a
list of messages.
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from . import schema
from .screen import COLS, ROWS


class MessageError(schema.SchemaError):
    """A bus message or trace record that does not follow its message class."""


# The largest bus message (wire_limits.BUS); no field of one can be longer.
MAX_BUS_MESSAGE_BYTES = 4 << 20
_ID_LIMIT = 1 << 31  # vm and epoch numbers
_VCPU_LIMIT = 1 << 16
_U63 = (1 << 63) - 1
_U64 = (1 << 64) - 1


# --- Field checks -------------------------------------------------------------------------------
def _is_int(value) -> bool:
    return type(value) is int  # bool is a subclass of int, and is not a number here


class _Absent:
    """The default of a field its sender did not give (reads as None, is not sent)."""

    def __repr__(self) -> str:
        return "ABSENT"


ABSENT = _Absent()


@dataclass(frozen=True)
class _Check:
    """One field's check: `required` fields must be there and not None; others may be None."""

    required: bool = False

    def __call__(self, name: str, value):
        if value is None or value is ABSENT:
            if self.required:
                raise MessageError(f"field {name!r} is missing")
            return value
        return self.check(name, value)

    def check(self, name: str, value):
        return value


@dataclass(frozen=True)
class Int(_Check):
    lo: int = 0
    hi: int = _U63  # inclusive

    def check(self, name, value):
        if not _is_int(value) or not self.lo <= value <= self.hi:
            raise MessageError(f"field {name!r} is not an integer in {self.lo}..{self.hi}")
        return value


@dataclass(frozen=True)
class Number(_Check):
    def check(self, name, value):
        if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value) or value < 0:
            raise MessageError(f"field {name!r} is not a non-negative number")
        return value


@dataclass(frozen=True)
class Bool(_Check):
    def check(self, name, value):
        if type(value) is not bool:
            raise MessageError(f"field {name!r} is not true/false")
        return value


@dataclass(frozen=True)
class Str(_Check):
    max_len: int = 200
    choices: tuple = ()

    def check(self, name, value):
        if not isinstance(value, str) or len(value) > self.max_len:
            raise MessageError(f"field {name!r} is not a string of at most {self.max_len} characters")
        if self.choices and value not in self.choices:
            raise MessageError(f"field {name!r} is not one of {', '.join(self.choices)}")
        return value


@dataclass(frozen=True)
class Bytes(_Check):
    min_len: int = 0
    max_len: int = MAX_BUS_MESSAGE_BYTES

    def check(self, name, value):
        if not isinstance(value, bytes) or not self.min_len <= len(value) <= self.max_len:
            raise MessageError(f"field {name!r} is not {self.min_len}–{self.max_len} bytes")
        return value


@dataclass(frozen=True)
class Map(_Check):
    """A map whose content is the sender's (bounded by the unpack limits); `counts`: str → count."""

    counts: bool = False
    max_key: int = 64  # characters of a name in a `counts` map

    def check(self, name, value):
        if not isinstance(value, dict):
            raise MessageError(f"field {name!r} is not a map")
        if self.counts and not all(isinstance(k, str) and len(k) <= self.max_key and _is_int(n) and 0 <= n <= _U63
                                   for k, n in value.items()):
            raise MessageError(f"field {name!r} is not a map of names to counts")
        return value


@dataclass(frozen=True)
class PerVcpu(_Check):
    """One count per vCPU: a list (index = vCPU) or a map {vCPU: count}."""

    def check(self, name, value):
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else None
        if items is None or len(value) > _VCPU_LIMIT or not all(
                _is_int(k) and 0 <= k < _VCPU_LIMIT and _is_int(n) and 0 <= n <= _U64 for k, n in items):
            raise MessageError(f"field {name!r} is not one sequence number per vCPU")
        return value


@dataclass(frozen=True)
class Cursor(_Check):
    def check(self, name, value):
        if (not isinstance(value, (list, tuple)) or len(value) != 2 or not all(_is_int(v) for v in value)
                or not (0 <= value[0] < ROWS and 0 <= value[1] < COLS)):
            raise MessageError("screen cursor is not [row, col] on the screen")
        return [value[0], value[1]]


@dataclass(frozen=True)
class Equals(_Check):
    value: Any = None

    def check(self, name, value):
        if value != self.value:
            raise MessageError(f"field {name!r} is not {self.value!r}")
        return value


def checked(check: _Check, default=ABSENT):
    """A message field with its check (the dataclass field's metadata)."""
    return field(default=default, metadata={"check": check})


def _vm():
    return checked(Int(required=True, hi=_ID_LIMIT - 1))


_epoch = _vm  # vm and epoch numbers share their range


def _vcpu():
    return checked(Int(required=True, hi=_VCPU_LIMIT - 1))


# --- The base of every message class --------------------------------------------------------
@dataclass(frozen=True)
class Message:
    """Base: `from_msg` checks every field through its `checked(...)` metadata."""

    TYPE: ClassVar[str] = ""

    def __post_init__(self) -> None:
        # Which fields the sender gave: those go on the wire; the others read as None.
        given = []
        for f in dataclasses.fields(self):
            if getattr(self, f.name) is ABSENT:
                object.__setattr__(self, f.name, None)
            else:
                given.append(f.name)
        object.__setattr__(self, "_given", tuple(given))

    @classmethod
    def from_msg(cls, msg) -> "Message":
        if not isinstance(msg, dict):
            raise MessageError(f"{cls.TYPE} is not a map")
        values = {}
        for f in dataclasses.fields(cls):
            try:
                values[f.name] = f.metadata["check"](f.name, msg.get(f.name, ABSENT))
            except MessageError as e:
                raise MessageError(f"{cls.TYPE}: {e}") from None
        return cls(**values)

    def to_msg(self) -> dict:
        """The wire map: "v", "type" and every field the sender gave."""
        out = {"v": schema.SCHEMA_VERSION, "type": self.TYPE}
        for name in self._given:
            out[name] = getattr(self, name)
        return out
