"""`vmsup top --by symbol`: a VM's exits per guest symbol, live.

The symbols come from the guest image named in the VM's vm-start message, through
tracetool.symbols.symbols_for_vm (used only while the image's sha256 matches), read once per
image and kept for the VM's restarts. Exits whose address no symbol covers count as
"(no symbol)", those of a VM whose symbols are unknown (its vm-start came before top attached,
or the image has none) as "(no symbols)".
"""

from __future__ import annotations

import numpy as np

from tracetool import schema
from tracetool.symbols import NO_ID, SymbolError, SymbolTable, symbols_for_vm

NO_SYMBOL, NO_SYMBOLS, UNKNOWN = "(no symbol)", "(no symbols)", "(address unknown)"


class SymbolCounts:
    """One VM's exits per symbol since top attached, and rates over the last tick."""

    _tables: dict[tuple, SymbolTable | None] = {}  # (image, sha256, code base) → its table, per process

    def __init__(self) -> None:
        self.table: SymbolTable | None = None
        self.totals: dict[str, int] = {}
        self.previous: dict[str, int] = {}
        self.rates: dict[str, float] = {}

    def start(self, vm_start: dict) -> None:
        """A vm-start message: take its image's symbols (once per image)."""
        spec = vm_start.get("spec") or {}
        key = (spec.get("guest"), vm_start.get("sha256"), spec.get("mode"))
        if key not in self._tables:
            try:
                self._tables[key] = symbols_for_vm(vm_start).table
            except (SymbolError, OSError, ValueError):
                self._tables[key] = None  # a live view shows counts without names rather than stop
        self.table = self._tables[key]

    def add(self, rip: np.ndarray) -> None:
        if not len(rip):
            return
        unknown = rip == np.uint64(schema.RIP_UNKNOWN)
        if self.table is None:
            names, ids = [NO_SYMBOLS], np.zeros(len(rip), np.int64)
        else:
            names = [*self.table.names, NO_SYMBOL]
            ids = self.table.symbol_ids(rip).astype(np.int64)
            ids[ids == NO_ID] = len(names) - 1
        names.append(UNKNOWN)
        ids[unknown] = len(names) - 1
        counts = np.bincount(ids, minlength=len(names))
        for i in np.flatnonzero(counts).tolist():
            self.totals[names[i]] = self.totals.get(names[i], 0) + int(counts[i])

    def tick(self, dt: float) -> None:
        self.rates = {name: (n - self.previous.get(name, 0)) / dt for name, n in self.totals.items()}
        self.previous = dict(self.totals)

    def rows(self, sort: str) -> list[dict]:
        total = sum(self.totals.values())
        rows = [{"symbol": name, "total": n, "percent": round(100.0 * n / total, 2) if total else 0.0,
                 "rate": round(float(self.rates.get(name, 0.0)), 1)} for name, n in self.totals.items()]
        key = (lambda r: (-r["rate"], -r["total"], r["symbol"])) if sort == "rate" else \
            (lambda r: (-r["total"], -r["rate"], r["symbol"]))
        return sorted(rows, key=key)
