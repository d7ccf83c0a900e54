"""One filter language for record-time filters, `vmtrace show` and `vmsup tail`, and the
filter flags every command that selects exits takes (`option`, `from_flags`).

    vm=0,reason=io|mmio            terms AND; alternatives (|) OR
    port=0x10                      port= implies reason io
    addr=0xd0000000|0xd0000004     addr= implies reason mmio

Keys: vm, vcpu, epoch, reason, port, addr. Numbers are decimal or 0x-hex; a reason is a schema
name (io, mmio, hlt, …) or its KVM_EXIT_* number. `str(filter)` gives the canonical text back,
which is what travels over the bus as a record-time filter.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Mapping

import numpy as np

from . import schema

KEYS = ("vm", "vcpu", "epoch", "reason", "port", "addr")
_MAX = {"vm": (1 << 32) - 1, "vcpu": (1 << 32) - 1, "epoch": (1 << 32) - 1, "reason": 255,
        "port": 0xFFFF, "addr": (1 << 64) - 1}  # reason is a u1 column; I/O ports are 16-bit
_REASON_COLUMN = "reason"
_ADDR_COLUMN = "addr"  # io: the port; mmio: the guest-physical address (see schema.EXIT_COLUMNS)


class FilterError(ValueError):
    """A filter that does not parse; the message is one line naming the bad term."""


def _number(text: str, key: str, term: str) -> int:
    s = text.strip().lower()
    try:
        if s.startswith("0x"):
            value = int(s[2:], 16) if s[2:].isalnum() else None
        else:
            value = int(s) if s.isdigit() else None
    except ValueError:
        value = None
    if value is None:
        raise FilterError(f"bad filter term {term!r}: {text.strip()!r} is not a number (decimal or 0x-hex)")
    if value > _MAX[key]:
        raise FilterError(f"bad filter term {term!r}: {key} {text.strip()} is out of range (0..{_MAX[key]:#x})")
    return value


def _reason(text: str, term: str) -> int:
    # `internal-error` as the README's status table and `vmsup launch` spell it, or internal_error.
    s = text.strip().lower().replace("-", "_")
    if s in schema.REASON_CODES:
        return schema.REASON_CODES[s]
    if s[:1].isdigit():
        return _number(s, "reason", term)
    known = ", ".join(sorted(schema.REASON_CODES))
    raise FilterError(f"bad filter term {term!r}: unknown reason {text.strip()!r} (known: {known})")


def _values(key: str, text: str, term: str) -> tuple[int, ...]:
    alternatives = text.split("|")
    if any(not a.strip() for a in alternatives):
        raise FilterError(f"bad filter term {term!r}: empty value")
    parse = (lambda a: _reason(a, term)) if key == "reason" else (lambda a: _number(a, key, term))
    return tuple(sorted({parse(a) for a in alternatives}))


def _isin(column, values: tuple[int, ...]) -> np.ndarray:
    column = np.asarray(column)
    info = np.iinfo(column.dtype)
    values = [v for v in values if info.min <= v <= info.max]  # out of the column's range: never matches
    if not values:
        return np.zeros(column.shape, bool)
    if len(values) == 1:
        return column == column.dtype.type(values[0])
    return np.isin(column, np.array(values, dtype=column.dtype))


@dataclass(frozen=True)
class EventFilter:
    """Which events to keep; a key left None matches anything. Build with parse_filter() or
    from_options(); the constructor checks that the terms can match together."""

    vm: tuple[int, ...] | None = None
    vcpu: tuple[int, ...] | None = None
    epoch: tuple[int, ...] | None = None
    reason: tuple[int, ...] | None = None
    port: tuple[int, ...] | None = None
    addr: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.port is not None and self.addr is not None:
            raise FilterError("bad filter: port= matches io exits and addr= matches mmio exits; no event is both")
        if self.reason is not None:
            for key, implied, name in (("port", schema.REASON_IO, "io"), ("addr", schema.REASON_MMIO, "mmio")):
                if getattr(self, key) is not None and implied not in self.reason:
                    raise FilterError(f"bad filter: {key}= matches only {name} exits, but reason= excludes {name}")

    @classmethod
    def from_options(cls, **options) -> "EventFilter":
        """From CLI flags: vm=, vcpu=, epoch=, reason=, port=, addr=; each None, an int, a string in
        the filter syntax ("io|mmio", "0x10") or a list of those."""
        unknown = set(options) - set(KEYS)
        if unknown:
            raise TypeError(f"unknown filter option(s): {', '.join(sorted(unknown))}")
        found: dict[str, tuple[int, ...]] = {}
        for key in KEYS:
            value = options.get(key)
            if value is None:
                continue
            items = value if isinstance(value, (list, tuple, set, frozenset)) else [value]
            if not items:
                continue
            # A flag lists alternatives with | or , (--reason io,hlt): no flag value holds a term.
            text = "|".join(str(v) for v in items).replace(",", "|")
            found[key] = _values(key, text, f"{key}={text}")
        return cls(**found)

    def __and__(self, other: "EventFilter") -> "EventFilter":
        """Both filters at once: per key, the values both allow."""
        merged = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            merged[f.name] = a if b is None else b if a is None else tuple(sorted(set(a) & set(b)))
        return EventFilter(**merged)

    def __str__(self) -> str:
        terms = []
        for key in KEYS:
            values = getattr(self, key)
            if values is None:
                continue
            if key == "reason":
                text = "|".join(schema.reason_name(v) if v in schema.REASONS else str(v) for v in values)
            elif key in ("port", "addr"):
                text = "|".join(f"{v:#x}" for v in values)
            else:
                text = "|".join(str(v) for v in values)
            terms.append(f"{key}={text}")
        return ",".join(terms)

    @property
    def matches_everything(self) -> bool:
        return all(getattr(self, key) is None for key in KEYS)

    @property
    def reasons(self) -> tuple[int, ...] | None:
        """The reason codes an event may have: reason= narrowed by what port= or addr= imply."""
        implied = (schema.REASON_IO,) if self.port is not None else (schema.REASON_MMIO,) if self.addr is not None else None
        if implied is None:
            return self.reason
        return implied if self.reason is None else tuple(r for r in self.reason if r in implied)

    def matches_stream(self, vm: int, vcpu: int, epoch: int) -> bool:
        """Can any event of this stream match? (Lets a reader skip whole blocks.)"""
        return all(want is None or value in want for want, value in
                   ((self.vm, vm), (self.vcpu, vcpu), (self.epoch, epoch)))

    def mask(self, columns: Mapping[str, np.ndarray], vm=None, vcpu=None, epoch=None) -> np.ndarray:
        """Which rows of `columns` match, as a bool array. vm/vcpu/epoch: a scalar (a batch of one
        stream) or a column; when not given they are looked up in `columns`."""
        n = len(next(iter(columns.values()))) if columns else 0
        keep = np.ones(n, bool)
        for key, given in (("vm", vm), ("vcpu", vcpu), ("epoch", epoch)):
            want = getattr(self, key)
            if want is None:
                continue
            value = given if given is not None else columns.get(key)
            if value is None:
                raise ValueError(f"the filter tests {key}, but no {key} value or column was given")
            if np.ndim(value) == 0:
                if int(value) not in want:
                    return np.zeros(n, bool)
            else:
                keep &= _isin(value, want)
        reasons = self.reasons
        if reasons is not None:
            keep &= _isin(columns[_REASON_COLUMN], reasons)
        for values in (self.port, self.addr):
            if values is not None:
                keep &= _isin(columns[_ADDR_COLUMN], values)
        return keep


MATCH_ALL = EventFilter()


def parse_filter(text: str | None) -> EventFilter:
    """`vm=0,reason=io|mmio,port=0x10` → EventFilter; empty text matches everything."""
    if text is None or not text.strip():
        return MATCH_ALL
    found: dict[str, tuple[int, ...]] = {}
    for raw in text.split(","):
        term = raw.strip()
        if not term:
            raise FilterError(f"bad filter {text.strip()!r}: empty term")
        key, sep, value = term.partition("=")
        key = key.strip().lower()
        if not sep:
            raise FilterError(f"bad filter term {term!r}: expected key=value")
        if key not in KEYS:
            raise FilterError(f"bad filter term {term!r}: unknown key {key!r} (keys: {', '.join(KEYS)})")
        if key in found:
            raise FilterError(f"bad filter term {term!r}: {key} given twice (list alternatives with '|')")
        found[key] = _values(key, value, term)
    return EventFilter(**found)


# --- the filter flags: one definition for vmsup tail/top and vmtrace show/replay/summary/export/plot
FLAGS = ("vm", "vcpu", "epoch", "reason", "port", "addr", "where")  # where: the -f expression
FLAG_HELP = {
    "vm": "Only these VMs: 0, or 0,2 (alternatives with , or |).",
    "vcpu": "Only these vCPUs: 0, or 0,1.",
    "epoch": "Only these epochs (a VM's restarts): 0, or 1,2.",
    "reason": "Only these exit reasons: io, mmio, hlt, shutdown, internal-error, … or KVM_EXIT_* numbers; "
              "alternatives with , or |.",
    "port": "Only port I/O on these ports, decimal or 0x-hex (implies io).",
    "addr": "Only MMIO at these guest-physical addresses (implies mmio).",
    "where": "A filter expression: vm=0,reason=io|mmio,port=0x10.",
}
_METAVARS = {"vm": "VM", "vcpu": "VCPU", "epoch": "EPOCH", "reason": "REASON", "port": "PORT", "addr": "ADDR",
             "where": "FILTER"}


def option(flag: str):
    """The Typer option of one filter flag (a str, or None when not given)."""
    import typer  # only the CLIs ask; the filter language itself needs no CLI library

    names = ("--filter", "-f") if flag == "where" else (f"--{flag}",)
    return typer.Option(None, *names, help=FLAG_HELP[flag], metavar=_METAVARS[flag], show_default=False)


def from_flags(vm=None, vcpu=None, epoch=None, reason=None, port=None, addr=None, where=None) -> EventFilter:
    """The filter flags' values as one EventFilter; FilterError names a bad one."""
    return EventFilter.from_options(vm=vm, vcpu=vcpu, epoch=epoch, reason=reason, port=port, addr=addr) \
        & parse_filter(where)
