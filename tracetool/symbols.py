"""Guest symbols and source lines: which function and line a guest address belongs to.

A `SymbolTable` comes from an ELF file (its .symtab and DWARF .debug_line, read with pyelftools)
or from an `nm`-format map for flat binaries (`ADDR TYPE NAME` or `nm -S`'s `ADDR SIZE TYPE NAME`
lines). It resolves one address to `<name+0xoff> (file:line)` and many addresses at once with
numpy (`symbol_ids`, `line_ids`), for analyses over millions of exits.

Addresses are guest linear addresses (CS base + RIP: what gdb, objdump and ELF symbols use). A
symbol file's addresses are what the guest's code uses; a real-mode guest's are offsets in its
code segment, so a table is built with `bias` = the code segment's base to make them linear.

Failures of the file as a whole (missing, not ELF and not a map) are one `SymbolError`; a broken
part (corrupt DWARF) leaves the table without lines and adds a line to `warnings`; a stripped ELF
gives a table with no symbols, which is not an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

ELF_MAGIC = b"\x7fELF"
MAX_SYMBOL_FILE_BYTES = 256 << 20  # far above any guest's; bounds what a hostile file can make us read
# A map carries no sizes: a symbol ends where the next begins, and at most this far from its start.
MAP_LAST_SYMBOL_SPAN = 0x1000

NO_ID = -1  # symbol_ids / line_ids for an address nothing covers


class SymbolError(Exception):
    """A symbol file that cannot be used at all; str() is the one line a CLI prints."""

    def __init__(self, path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class Location:
    """One address, resolved: `0x10023c <kbd_poll+0x1c> (mbkernel.c:212)`."""

    address: int
    symbol: str | None = None
    offset: int = 0
    file: str | None = None
    line: int | None = None

    def symbolic(self) -> str:
        """`<name+0xoff> (file:line)`, the parts that are known; empty when nothing is."""
        parts = []
        if self.symbol is not None:
            parts.append(f"<{self.symbol}+{self.offset:#x}>" if self.offset else f"<{self.symbol}>")
        if self.file is not None:
            parts.append(f"({self.file}:{self.line})")
        return " ".join(parts)

    def __str__(self) -> str:
        rest = self.symbolic()
        return f"{self.address:#x} {rest}" if rest else f"{self.address:#x}"


@dataclass(frozen=True)
class _Candidate:
    start: int
    size: int  # 0 = unknown: ends at the next symbol (or its section's end)
    limit: int  # where an unsized symbol must end at the latest
    rank: int  # among symbols at one address, the lowest rank names it
    name: str


class _RangeMap:
    """Half-open address ranges → ids, looked up for many addresses at once.

    `bounds[i]` (sorted) starts a range with id `ids[i]` that lasts until `bounds[i + 1]`; NO_ID marks
    a gap. Where the ranges span little memory (any guest's code), a dense table indexed by address
    answers in a few vectorised passes; otherwise a binary search (numpy.searchsorted) does.
    """

    DENSE_MAX_SPAN = 1 << 22  # addresses; the table costs 4 bytes each

    def __init__(self, bounds: list[int], ids: list[int]) -> None:
        # A leading gap from address 0 so every address has a range at or below it.
        self.bounds = np.array([0, *bounds], np.uint64)
        self.ids = np.array([NO_ID, *ids], np.int32)
        self._dense: np.ndarray | None = None
        self._low = 0
        if len(bounds) >= 1 and bounds[-1] - bounds[0] <= self.DENSE_MAX_SPAN:
            self._low = bounds[0]
            span = np.arange(bounds[0], bounds[-1] + 1, dtype=np.uint64)
            # The last slot (the final bound onwards) is a gap by construction, and out-of-span addresses clip to it.
            self._dense = self.ids[np.searchsorted(self.bounds, span, side="right") - 1]

    def lookup(self, addresses) -> np.ndarray:
        addrs = np.asarray(addresses, dtype=np.uint64)
        if self._dense is not None:
            offset = addrs - np.uint64(self._low)  # below _low wraps to a huge offset: clipped to the gap
            np.minimum(offset, np.uint64(len(self._dense) - 1), out=offset)
            return self._dense.take(offset)
        return self.ids.take(np.searchsorted(self.bounds, addrs, side="right") - 1)


@dataclass
class SymbolTable:
    """Sorted, non-overlapping symbol ranges and a DWARF line table, in guest linear addresses."""

    source: str
    starts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    ends: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    names: list[str] = field(default_factory=list)
    line_starts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    line_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # id into `lines`, or NO_ID
    lines: list[tuple[str, int]] = field(default_factory=list)  # (file, line) per line id
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._symbol_ranges = self._symbols_to_ranges()
        self._line_ranges = _RangeMap(self.line_starts.tolist(), self.line_rows.tolist())

    def _symbols_to_ranges(self) -> _RangeMap:
        bounds, ids = [], []
        for i, (start, end) in enumerate(zip(self.starts.tolist(), self.ends.tolist())):
            if bounds and bounds[-1] == start:
                bounds.pop(), ids.pop()  # the previous symbol ended where this one starts
            bounds += [start, end]
            ids += [i, NO_ID]
        return _RangeMap(bounds, ids)

    # --- loading ------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path, *, bias: int = 0) -> "SymbolTable":
        """An ELF file or an nm-format map, told apart by the ELF magic; SymbolError if neither."""
        path = os.fspath(path)
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                magic = f.read(len(ELF_MAGIC))
        except FileNotFoundError:
            raise SymbolError(path, "no such file") from None
        except IsADirectoryError:
            raise SymbolError(path, "is a directory, not a symbol file") from None
        except OSError as e:
            raise SymbolError(path, e.strerror or str(e)) from None
        if size > MAX_SYMBOL_FILE_BYTES:
            raise SymbolError(path, f"is {size} bytes, over the {MAX_SYMBOL_FILE_BYTES >> 20} MiB limit for symbol files")
        if magic == ELF_MAGIC:
            return cls.from_elf(path, bias=bias)
        return cls.from_map(path, bias=bias)

    @classmethod
    def from_elf(cls, path, *, bias: int = 0) -> "SymbolTable":
        from ._elf_symbols import read_elf

        candidates, rows, lines, warnings = read_elf(os.fspath(path))
        table = cls._build(os.fspath(path), candidates, bias)
        table._set_lines(rows, lines, bias)
        table.warnings.extend(warnings)
        return table

    @classmethod
    def from_map(cls, path, *, bias: int = 0) -> "SymbolTable":
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                raw = f.read(MAX_SYMBOL_FILE_BYTES + 1)
        except OSError as e:
            raise SymbolError(path, e.strerror or str(e)) from None
        return cls._build(path, _parse_map(path, raw), bias)

    @classmethod
    def _build(cls, source: str, candidates: list[_Candidate], bias: int) -> "SymbolTable":
        # One name per start address (the best-ranked), then each range ends at its size, or, unsized,
        # at its limit, and always by the next symbol's start. Empty ranges (linker marks past a
        # section) go.
        best: dict[int, _Candidate] = {}
        for c in candidates:
            held = best.get(c.start)
            if held is None or (c.rank, -c.size, c.name) < (held.rank, -held.size, held.name):
                best[c.start] = c
        ordered = sorted(best.values(), key=lambda c: c.start)
        starts, ends, names = [], [], []
        for i, c in enumerate(ordered):
            following = ordered[i + 1].start if i + 1 < len(ordered) else c.limit
            # A symbol nested in a sized one (rare) takes over from its start: ranges never overlap.
            end = min(c.start + c.size, following) if c.size else min(following, c.limit)
            if end > c.start:
                starts.append(c.start + bias)
                ends.append(end + bias)
                names.append(c.name)
        return cls(source, np.array(starts, np.uint64), np.array(ends, np.uint64), names)

    def _set_lines(self, rows: list[tuple[int, int]], lines: list[tuple[str, int]], bias: int) -> None:
        """`rows`: (address, line id or NO_ID at the end of a sequence), sorted by address, later rows winning."""
        if rows:
            self.line_starts = np.array([a + bias for a, _ in rows], np.uint64)
            self.line_rows = np.array([i for _, i in rows], np.int32)
        self.lines = lines
        self._line_ranges = _RangeMap(self.line_starts.tolist(), self.line_rows.tolist())

    # --- resolving ----------------------------------------------------------------------------
    @property
    def has_symbols(self) -> bool:
        return bool(self.names)

    @property
    def has_lines(self) -> bool:
        return bool(self.lines)

    def symbol_ids(self, addresses) -> np.ndarray:
        """Index into `names` of each address's symbol (int32), NO_ID where none covers it (vectorised)."""
        return self._symbol_ranges.lookup(addresses)

    def line_ids(self, addresses) -> np.ndarray:
        """Index into `lines` of each address's (file, line), NO_ID where no line covers it (vectorised)."""
        return self._line_ranges.lookup(addresses)

    def resolve(self, address: int) -> Location:
        sym = int(self.symbol_ids([address])[0])
        line = int(self.line_ids([address])[0])
        name, offset = (self.names[sym], address - int(self.starts[sym])) if sym != NO_ID else (None, 0)
        file, lineno = self.lines[line] if line != NO_ID else (None, None)
        return Location(address, name, offset, file, lineno)

    def symbol_name(self, symbol_id: int) -> str | None:
        return self.names[symbol_id] if symbol_id != NO_ID else None

    def line_text(self, line_id: int) -> str | None:
        if line_id == NO_ID:
            return None
        file, line = self.lines[line_id]
        return f"{file}:{line}"


def _parse_map(path: str, raw: bytes) -> list[_Candidate]:
    """nm output: `ADDR TYPE NAME`, or `ADDR SIZE TYPE NAME` (nm -S); undefined (`U NAME`) lines skipped."""
    if len(raw) > MAX_SYMBOL_FILE_BYTES:
        raise SymbolError(path, f"is over the {MAX_SYMBOL_FILE_BYTES >> 20} MiB limit for symbol files")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SymbolError(path, "neither an ELF file nor an nm-format map (binary data)") from None
    out: list[_Candidate] = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or (len(fields) == 2 and fields[0] in ("U", "w", "v")):
            continue  # blank, or an undefined symbol (nm prints no address for it)
        try:
            if len(fields) == 3 and len(fields[1]) == 1:
                start, size, kind, name = int(fields[0], 16), 0, fields[1], fields[2]
            elif len(fields) == 4 and len(fields[2]) == 1:
                start, size, kind, name = int(fields[0], 16), int(fields[1], 16), fields[2], fields[3]
            else:
                raise ValueError
        except ValueError:
            raise SymbolError(path, f"neither an ELF file nor an nm-format map (line {number}: "
                                    f"expected 'ADDR TYPE NAME', got {line.strip()[:60]!r})") from None
        if kind in "aAuUNn":
            continue  # absolute values (constants), undefined, debug: not places in the code
        # Global text first, then local text, then data, for names sharing one address.
        rank = {"T": 0, "t": 1, "W": 2, "w": 2}.get(kind, 3)
        out.append(_Candidate(start, size, start + (size or MAP_LAST_SYMBOL_SPAN), rank, name))
    if not out:
        raise SymbolError(path, "neither an ELF file nor an nm-format map (no symbol lines)")
    return out


# --- the symbols of a traced VM -------------------------------------------------------------------

@dataclass
class VmSymbols:
    """What a trace's VM resolves against: a table (None = addresses only) and why, in warning lines."""

    table: SymbolTable | None
    warnings: list[str] = field(default_factory=list)


def code_segment_base(vm_start: dict) -> int:
    """Where the guest's symbol addresses start in linear memory: the real-mode code segment's base.

    A real-mode flat guest runs at CS = load address / 16 with IP from 0 (vmworker.x86), so its
    symbols are offsets from the load address; protected and long mode guests are linked at their
    linear addresses.
    """
    if vm_start.get("mode") != "real":
        return 0
    from vmworker.layout import DEFAULT_LOAD_ADDR  # the one definition of where flat guests load

    load = (vm_start.get("spec") or {}).get("load_addr")
    return load if isinstance(load, int) and load >= 0 else DEFAULT_LOAD_ADDR


def symbols_for_vm(vm_start: dict, symbols_path=None) -> VmSymbols:
    """The symbols of the VM a vm-start record describes.

    `symbols_path` (a `--symbols FILE`) wins; a bad one raises SymbolError. Otherwise the guest image
    the trace names is used only while its sha256 still matches the recorded one: an ELF image
    itself, or for a flat image the ELF or nm map beside it (NAME.elf, NAME.map) — an ELF only when
    its loadable bytes are the image's. A trace naming no image, or a flat image with nothing beside
    it, gives bare addresses; an image gone, changed or unreadable gives them with one warning line.
    """
    bias = code_segment_base(vm_start)
    if symbols_path is not None:
        table = SymbolTable.from_file(symbols_path, bias=bias)
        return VmSymbols(table, list(table.warnings))
    image = (vm_start.get("spec") or {}).get("guest")
    if not isinstance(image, str) or not image:
        return VmSymbols(None)  # nothing to look for: bare addresses, nothing to warn about
    try:
        with open(image, "rb") as f:
            data = f.read(MAX_SYMBOL_FILE_BYTES + 1)
    except OSError as e:
        return VmSymbols(None, [f"{image}: {e.strerror or e}; showing addresses only (use --symbols FILE)"])
    import hashlib

    if hashlib.sha256(data).hexdigest() != vm_start.get("sha256"):
        return VmSymbols(None, [f"{image}: changed since the trace was recorded (sha256 differs); "
                                "showing addresses only (use --symbols FILE)"])
    try:
        if data.startswith(ELF_MAGIC):
            table = SymbolTable.from_elf(image, bias=bias)
            return VmSymbols(table, list(table.warnings))
        stem = os.path.splitext(image)[0]
        if os.path.isfile(stem + ".elf"):
            if not _elf_loads_image(stem + ".elf", data):
                return VmSymbols(None, [f"{stem}.elf: its code is not {image}'s; showing addresses only"])
            table = SymbolTable.from_elf(stem + ".elf", bias=bias)
        elif os.path.isfile(stem + ".map"):
            table = SymbolTable.from_map(stem + ".map", bias=bias)
        else:
            return VmSymbols(None)  # a flat image without symbols beside it: bare addresses, as expected
    except SymbolError as e:
        return VmSymbols(None, [f"{e}; showing addresses only"])
    return VmSymbols(table, list(table.warnings))


def _elf_loads_image(elf_path: str, image: bytes) -> bool:
    """Whether a flat image starts with the ELF's first loadable segment (as objcopy -O binary makes it)."""
    from ._elf_symbols import first_load_bytes

    first = first_load_bytes(elf_path)
    return first is not None and image.startswith(first)
