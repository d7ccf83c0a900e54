"""Naming guest addresses for the commands that show them (show, summary): the --symbols option,
one symbol table per VM of a trace, and the text `rip=0x10023c <kbd_poll+0x1c> (mbkernel.c:212)`.

The tables come from tracetool.symbols: the guest image a VM's vm-start record names (while its
sha256 matches) or the --symbols file. A bad --symbols file ends the command (exit 2); a VM
without symbols shows bare addresses after one warning line.
"""

from __future__ import annotations

import typer

from .. import schema
from ..symbols import NO_ID, SymbolError, SymbolTable, symbols_for_vm
from ..trace import TraceReader
from . import _common as c

SYMBOLS_OPT = typer.Option(
    None, "--symbols",
    help="Name guest addresses with this file: an ELF with symbols (and DWARF lines), or an nm-format map "
         "(ADDR TYPE NAME lines) for a flat binary. Default: the guest image the trace names, if unchanged.")


def vm_tables(reader: TraceReader, symbols_path: str | None) -> dict[int | None, SymbolTable | None]:
    """{vm id: its table or None}; key None: the table for VMs without a vm-start record."""
    tables: dict[int | None, SymbolTable | None] = {}
    try:
        for record in reader.records(schema.MSG_VM_START):
            vm = record.get("vm")
            if vm in tables:
                continue  # a restart (new epoch) runs the same image
            found = symbols_for_vm(record, symbols_path)
            for line in found.warnings:
                c.warn(line)
            tables[vm] = found.table
        tables[None] = SymbolTable.from_file(symbols_path) if symbols_path is not None else None
    except SymbolError as e:
        c.bad_input(str(e))
    return tables


def table_for(tables: dict, vm: int) -> SymbolTable | None:
    return tables.get(vm, tables.get(None))


class AddressNames:
    """The `rip=…` text of (vm, address) pairs, each resolved once."""

    def __init__(self, tables: dict) -> None:
        self.tables = tables
        self._text: dict[tuple[int, int], str] = {}

    def text(self, vm: int, rip: int) -> str:
        """` rip=0x… <sym+0x…> (file:line)` (leading space), or "" when the address is unknown."""
        key = (vm, rip)
        known = self._text.get(key)
        if known is None:
            if rip == schema.RIP_UNKNOWN:
                known = ""
            else:
                table = table_for(self.tables, vm)
                known = f" rip={table.resolve(rip) if table is not None else hex(rip)}"
            self._text[key] = known
        return known


__all__ = ["SYMBOLS_OPT", "AddressNames", "NO_ID", "table_for", "vm_tables"]
