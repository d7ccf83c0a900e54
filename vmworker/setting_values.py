"""The kinds of value a VM setting takes: how each is read from a flag's text or a fleet file's
TOML value, and checked, with one message per problem naming the flag or key it came from.

A kind knows nothing about which setting uses it; the table in `vmworker.settings` pairs them.
Sizes read like 16M, 512000000, 1G (binary suffixes); addresses like 0x10000 or 65536. A limit
that can be switched off (timeout, max_exits, rss_limit) also takes `none`, `0` or `inf`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .errors import SpecError

_SIZE = re.compile(r"^\s*(\d+)\s*([kmgt]?)(i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
# The spellings of "no limit": 0 as curl and systemd read a zero timeout, inf as a float's infinity.
NO_LIMIT_WORDS = ("none", "0", "inf", "infinity")


def parse_size(text: str, what: str = "size") -> int:
    """'16M' → 16 MiB, '1G' → 1 GiB, '512000000' → bytes. Suffixes are binary (K = 1024)."""
    m = _SIZE.match(str(text))
    if not m:
        raise SpecError(f"{what} {text!r} is not a size (use bytes or a K/M/G suffix, e.g. 16M)")
    return int(m.group(1)) * _UNITS[m.group(2).lower()]


def parse_address(text: str, what: str = "address") -> int:
    try:
        value = int(str(text), 0)
    except ValueError:
        raise SpecError(f"{what} {text!r} is not a number (use decimal or 0x hex)") from None
    if value < 0:
        raise SpecError(f"{what} {text!r} is negative")
    return value


class Invalid(Exception):
    """A bad value; str() is the message. `sub` names a key inside a table value (backoff.max);
    `key` the setting a check across settings blames (a row's own check leaves it to the caller)."""

    def __init__(self, message: str, sub: str | None = None, key: str | None = None) -> None:
        self.sub = sub
        self.key = key
        super().__init__(message)


def kind_of(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "a table",
            list: "an array"}.get(type(value), f"a {type(value).__name__}")


def _relative(path: str, base_dir: Path | None) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or base_dir is None else base_dir / p


class Kind:
    """One kind of value. `check` takes what a fleet file (or a caller) gives; `from_flag` first
    turns a flag's text into that (flags arrive as text so every message is in our words)."""

    metavar = "TEXT"  # the flag's value in --help

    def check(self, value: Any, label: str, base_dir: Path | None) -> Any:
        raise NotImplementedError

    def from_flag(self, value: Any, label: str) -> Any:
        return value


@dataclass(frozen=True)
class Text(Kind):
    """A non-empty string; `also(value, label)` checks it further (raising SpecError with the message)."""

    also: Callable[[str, str], Any] | None = None

    def check(self, value, label, base_dir):
        if not isinstance(value, str):
            raise Invalid(f"{label} must be a string, not {kind_of(value)}")
        if not value.strip():
            raise Invalid(f"{label} must not be empty")
        if self.also is not None:
            try:
                self.also(value, label)
            except SpecError as e:
                raise Invalid(str(e)) from None
        return value


@dataclass(frozen=True)
class Integer(Kind):
    metavar = "N"

    minimum: int
    maximum: int | None = None

    def check(self, value, label, base_dir):
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f"{label} must be an integer, not {kind_of(value)}")
        if value < self.minimum:
            raise Invalid(f"{label} must be at least {self.minimum}, not {value}")
        if self.maximum is not None and value > self.maximum:
            raise Invalid(f"{label} must be at most {self.maximum}, not {value}")
        return value

    def from_flag(self, value, label):
        if not isinstance(value, str):
            return value
        try:
            return int(value, 10)
        except ValueError:
            raise Invalid(f"{label} {value!r} is not an integer") from None


@dataclass(frozen=True)
class Number(Kind):
    """A finite number: `positive` (> 0), else not negative unless `signed`; `unit` for the message."""

    metavar = "SECONDS"

    positive: bool = False
    signed: bool = False
    unit: str = "seconds"

    def check(self, value, label, base_dir):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Invalid(f"{label} must be a number, not {kind_of(value)}")
        if not math.isfinite(value):
            raise Invalid(f"{label} must be a finite number, not {value}")
        if self.positive and not value > 0:
            raise Invalid(f"{label} must be a positive number of {self.unit}, not {value}")
        if value < 0 and not self.signed:
            raise Invalid(f"{label} must not be negative, not {value}")
        return float(value)

    def from_flag(self, value, label):
        if not isinstance(value, str):
            return value
        try:
            return float(value)
        except ValueError:
            raise Invalid(f"{label} {value!r} is not a number") from None


@dataclass(frozen=True)
class Size(Kind):
    """Bytes, or a size with a binary suffix; `also` checks the result (raising SpecError)."""

    metavar = "SIZE"

    also: Callable[[int], Any] | None = None

    def check(self, value, label, base_dir):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise Invalid(f"{label} must be a size like \"16M\" or a number of bytes, not {kind_of(value)}")
        try:
            size = parse_size(value, label)
            if self.also is not None:
                self.also(size)
        except SpecError as e:
            raise Invalid(str(e)) from None
        return size


@dataclass(frozen=True)
class Address(Kind):
    metavar = "ADDR"

    def check(self, value, label, base_dir):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise Invalid(f"{label} must be an address like 0x10000, not {kind_of(value)}")
        try:
            addr = parse_address(value, label)
        except SpecError as e:
            raise Invalid(str(e)) from None
        if addr >= 1 << 64:
            raise Invalid(f"{label} {value!r} is beyond the 64-bit address space")
        return addr


@dataclass(frozen=True)
class Choice(Kind):
    choices: tuple[str, ...]

    @property
    def metavar(self) -> str:
        return "|".join(self.choices)

    def check(self, value, label, base_dir):
        value = Text().check(value, label, base_dir)
        if value not in self.choices:
            raise Invalid(f"{label} {value!r} is not one of {', '.join(self.choices)}")
        return value


@dataclass(frozen=True)
class Switch(Kind):
    """On or off (a flag pair --x/--no-x; true/false in a fleet file)."""

    def check(self, value, label, base_dir):
        if not isinstance(value, bool):
            raise Invalid(f"{label} must be true or false, not {kind_of(value)}")
        return value


@dataclass(frozen=True)
class Limit(Kind):
    """A limit that `none`, `0` or `inf` switches off (None); anything else is `inner`'s."""

    inner: Kind

    @property
    def metavar(self) -> str:
        return self.inner.metavar

    def check(self, value, label, base_dir):
        off = (isinstance(value, str) and value.strip().lower() in NO_LIMIT_WORDS
               or not isinstance(value, bool) and isinstance(value, (int, float)) and value in (0, math.inf))
        if off:
            return None
        try:
            return self.inner.check(value, label, base_dir)
        except Invalid as e:
            raise Invalid(f"{e} (none, 0 or inf: no limit)", e.sub) from None

    def from_flag(self, value, label):
        if isinstance(value, str) and value.strip().lower() in NO_LIMIT_WORDS:
            return value
        try:
            return self.inner.from_flag(value, label)
        except Invalid as e:
            raise Invalid(f"{e} (none, 0 or inf: no limit)", e.sub) from None


@dataclass(frozen=True)
class InputFile(Kind):
    """A readable file (relative to the fleet file), or one of `words` kept as they are."""

    metavar = "FILE"

    words: tuple[str, ...] = ()
    what: str = "file"

    def check(self, value, label, base_dir):
        value = Text().check(value, label, base_dir)
        if value in self.words:
            return value
        path = _relative(value, base_dir)
        if not path.is_file() or not os.access(path, os.R_OK):
            why = "no such file" if not path.exists() else "not a readable file"
            raise Invalid(f"{label}: {self.what} {path}: {why}")
        return str(path)


@dataclass(frozen=True)
class KeyScript(Kind):
    """A key script file, parsed now so an unknown key name fails before any VM (FILE:LINE)."""

    metavar = "FILE"

    def check(self, value, label, base_dir):
        from .devices.keyboard import parse_key_script
        from .errors import VmsupError

        path = str(_relative(Text().check(value, label, base_dir), base_dir).resolve())
        try:
            parse_key_script(path)
        except VmsupError as e:
            raise Invalid(str(e)) from None
        return path


@dataclass(frozen=True)
class ExitFilter(Kind):
    """A record-time exit filter (tracetool.filters syntax, e.g. reason=io,port=0x3f8)."""

    metavar = "FILTER"

    def check(self, value, label, base_dir):
        from tracetool.filters import FilterError, parse_filter

        value = Text().check(value, label, base_dir)
        try:
            parse_filter(value)
        except FilterError as e:
            raise Invalid(f"{label}: {e}") from None
        return value


@dataclass(frozen=True)
class CoalesceZones(Kind):
    """Port or MMIO ranges whose writes KVM may queue (vmworker/coalesce.py): a list, or one
    comma-separated text; each checked against the standard devices."""

    metavar = "PORT[-PORT]|mmio:ADDR[-ADDR]"
    repeatable = True  # the flag may be given more than once

    def check(self, value, label, base_dir):
        from .coalesce import check_zones

        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(i, str) and i.strip() for i in items):
            raise Invalid(f"{label}: expected PORT[-PORT] or mmio:ADDR[-ADDR], or a list of them")
        try:
            return check_zones(items)
        except SpecError as e:
            raise Invalid(f"{label}: {e}") from None

    def from_flag(self, value, label):
        return ",".join(value) if isinstance(value, (list, tuple)) else value


@dataclass(frozen=True)
class Table(Kind):
    """A small table of numbers (backoff = { initial = 0.5, max = 30.0 }); its flag sets `flag_key`."""

    metavar = "SECONDS"

    keys: tuple[str, ...]
    example: str
    flag_key: str

    def check(self, value, label, base_dir):
        if not isinstance(value, dict):
            raise Invalid(f"{label} must be a table like {self.example}, not {kind_of(value)}")
        checked = {}
        for k, v in value.items():
            if k not in self.keys:
                raise Invalid(f"unknown key {k!r} in {label} (known: {', '.join(self.keys)})", k)
            try:  # the ranges and their relation (initial <= max) are the user's check (RestartPolicy)
                checked[k] = Number(signed=True).check(v, f"{label}.{k}", base_dir)
            except Invalid as e:
                raise Invalid(str(e), k) from None
        return checked

    def from_flag(self, value, label):
        return {self.flag_key: Number().from_flag(value, label)}
