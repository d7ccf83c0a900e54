"""`vmtrace console`: the guest's console output, rebuilt from the recorded exits.

A guest writes its console through two devices of vmsup's standard machine (see
vmworker/devices): the 8250 UART at COM1 and the Bochs/QEMU debug console at port 0xE9. Both
are port writes, so every byte the guest printed is in the trace as an `io out` exit: size-1
writes carry the byte in `data`; string I/O (`rep outsb`, count > 1) carries all its elements in
the block's payloads.

What reaches the screen follows the devices' rules, not just the port number:
  - 0xE9: only the low byte of a write is a character (the port is one byte wide).
  - UART: a write is split into byte cycles at consecutive registers; the byte that lands on
    register 0 is a character only while LCR.DLAB (bit 7 of register 3) is clear — with DLAB
    set, register 0 is the divisor latch (16550 datasheet, register summary). LCR starts at
    0x03 (8N1) in each epoch, as the device does.
Bytes of all vCPUs of a VM are merged in t_exit order (a vCPU's exit is timed before it can
re-enter the guest, so a lock handed over between vCPUs keeps its order in the trace).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import typer

# The ports and UART registers are the devices' own, defined once in vmworker.
from vmworker.devices.uart8250 import LCR as UART_LCR
from vmworker.devices.uart8250 import LCR_DLAB, LCR_RESET
from vmworker.layout import COM1_PORT as UART_BASE
from vmworker.layout import DEBUGCON_PORT

from .. import schema
from ..analysis import vm_names
from ..filters import EventFilter
from ..trace import TraceReader
from . import _common as c

SOURCES = ("all", "uart", "debugcon")

# The writes that can matter: those starting at THR..LCR of the UART (the port bus hands an
# access to the device that claims its first port), and the debug port.
_PORTS = tuple(range(UART_BASE, UART_BASE + UART_LCR + 1)) + (DEBUGCON_PORT,)
_COLS = ("t_exit", "addr", "data", "count", "size", "flags", "seq")


@dataclass
class ConsoleText:
    vm: int
    name: str | None
    text: bytes
    uart_bytes: int = 0
    debugcon_bytes: int = 0
    notes: list[str] = field(default_factory=list)

    def as_json(self) -> dict:
        return {"vm": self.vm, "name": self.name, "bytes": len(self.text), "uart_bytes": self.uart_bytes,
                "debugcon_bytes": self.debugcon_bytes, "text": self.text.decode("utf-8", "backslashreplace"),
                "notes": self.notes}


def rebuild(reader: TraceReader, vm: int | None = None, source: str = "all") -> list[ConsoleText]:
    """Console text of every VM in the trace (or of `vm`), in VM order."""
    if source not in SOURCES:
        raise ValueError(f"unknown console source {source!r} (known: {', '.join(SOURCES)})")
    where = EventFilter(vm=None if vm is None else (vm,), port=_PORTS)
    parts: dict[tuple[int, int], dict[str, list]] = {}  # (vm, epoch) → column pieces
    for batch in reader.exit_batches(where=where):
        cols = batch.columns
        keep = where.mask(cols, vm=batch.vm) & ((cols["flags"] & schema.FLAG_WRITE) != 0)
        if not keep.any():
            continue
        acc = parts.setdefault((batch.vm, batch.epoch), {name: [] for name in (*_COLS, "vcpu")})
        for name in _COLS:
            acc[name].append(cols[name][keep])
        acc["vcpu"].append(np.full(int(keep.sum()), batch.vcpu, np.uint32))
    vms = sorted({s.vm for s in reader.streams()} if vm is None else {vm})
    names = vm_names(reader)
    payloads = None
    out = []
    for v in vms:
        result = ConsoleText(v, names.get(v), b"")
        pieces = []
        for (pvm, epoch) in sorted(k for k in parts if k[0] == v):
            cols = {name: np.concatenate(p) for name, p in parts[(pvm, epoch)].items()}
            if payloads is None and bool((cols["count"] > 1).any()):
                payloads = reader.payloads(vm=vm)
            pieces.append(_epoch_text(pvm, epoch, cols, payloads or {}, source, result))
        result.text = b"".join(pieces)
        out.append(result)
    return out


def _epoch_text(vm: int, epoch: int, cols: dict[str, np.ndarray], payloads: dict, source: str,
                result: ConsoleText) -> bytes:
    order = np.lexsort((cols["seq"], cols["vcpu"], cols["t_exit"]))
    cols = {name: col[order] for name, col in cols.items()}
    port = cols["addr"].astype(np.int64)
    size = cols["size"].astype(np.int64)
    data = cols["data"]
    # Which byte of the access lands on LCR, and which on THR (-1: none).
    lcr_byte = UART_BASE + UART_LCR - port
    lcr_byte = np.where((port >= UART_BASE) & (lcr_byte >= 0) & (lcr_byte < size), lcr_byte, -1)
    thr = (port == UART_BASE) & (size >= 1)
    debug = port == DEBUGCON_PORT
    # LCR in force before each write (the device handles THR before LCR within one access, and
    # a string write to LCR leaves its last element there).
    lcr_value = ((data >> (8 * np.maximum(lcr_byte, 0)).astype(np.uint64)) & np.uint64(0xFF)).astype(np.int64)
    strings = np.flatnonzero(cols["count"] > 1)
    for i in strings.tolist():
        if lcr_byte[i] >= 0:
            raw = payloads.get((vm, int(cols["vcpu"][i]), epoch, int(cols["seq"][i])))
            if raw:
                lcr_value[i] = raw[-int(size[i]) + int(lcr_byte[i])] if size[i] else lcr_value[i]
    writes = np.where(lcr_byte >= 0, np.arange(len(port)), -1)
    last = np.maximum.accumulate(writes) if len(writes) else writes
    before = np.empty_like(last)
    before[:1] = -1
    before[1:] = last[:-1]
    lcr_now = np.where(before >= 0, lcr_value[np.maximum(before, 0)], LCR_RESET)
    uart = thr & ((lcr_now & LCR_DLAB) == 0)
    if source == "uart":
        emit = uart
    elif source == "debugcon":
        emit = debug
    else:
        emit = uart | debug
    idx = np.flatnonzero(emit)
    chars = (data[idx] & np.uint64(0xFF)).astype(np.uint8)
    multi = cols["count"][idx] > 1
    n_uart = int(uart[idx].sum())
    n_debug = len(idx) - n_uart
    if not multi.any():
        result.uart_bytes += n_uart
        result.debugcon_bytes += n_debug
        return chars.tobytes()
    pieces, start = [], 0
    for j in np.flatnonzero(multi).tolist():
        i = int(idx[j])
        pieces.append(chars[start:j].tobytes())
        start = j + 1
        width = max(int(size[i]), 1)
        raw = payloads.get((vm, int(cols["vcpu"][i]), epoch, int(cols["seq"][i])))
        if raw is None:
            result.notes.append(f"vm {vm} vcpu {int(cols['vcpu'][i])} seq {int(cols['seq'][i])}: string write of "
                                f"{int(cols['count'][i])} elements has no payload in the trace; only its first byte is shown")
            text = chars[j:j + 1].tobytes()
        else:
            text = raw[::width]  # the low byte of each element
        pieces.append(text)
        extra = len(text) - 1
        if uart[i]:
            n_uart += extra
        else:
            n_debug += extra
    pieces.append(chars[start:].tobytes())
    result.uart_bytes += n_uart
    result.debugcon_bytes += n_debug
    return b"".join(pieces)


def render(texts: list[ConsoleText], out) -> None:
    """The bytes as the guest wrote them (one VM), or a heading per VM; `out` takes bytes."""
    if len(texts) == 1:
        out.write(texts[0].text)  # exactly what the guest wrote
    else:
        for t in texts:
            if not t.text:
                continue
            name = f" ({t.name})" if t.name else ""
            out.write(f"--- vm {t.vm}{name} ---\n".encode())
            out.write(t.text if t.text.endswith(b"\n") else t.text + b"\n")
    out.flush()


def run(
    trace: str = c.TRACE_ARG,
    vm: Optional[int] = typer.Option(None, "--vm", min=0, help="Only this VM's console."),
    source: str = typer.Option("all", "--source", help="all, uart (COM1 at 0x3f8) or debugcon (port 0xe9)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON document: text and byte counts per VM."),
) -> None:
    """The guest's serial and debug-port output, rebuilt from its recorded port writes."""
    if source not in SOURCES:
        c.bad_input(f"unknown --source {source!r} (choose from {', '.join(SOURCES)})")
    with c.reading(trace) as reader:
        if vm is not None and vm not in {s.vm for s in reader.streams()}:
            c.bad_input(f"{trace}: no events of vm {vm} in this trace; its VMs: {c.trace_vms(reader)}")
        texts = rebuild(reader, vm=vm, source=source)
    for t in texts:
        for note in t.notes:
            c.warn(note)
    if as_json:
        c.dump_json({"vms": [t.as_json() for t in texts]})
    else:
        render(texts, sys.stdout.buffer)
