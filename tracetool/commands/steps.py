"""`vmtrace steps`: a step trace (`vmsup launch --step-trace`), one instruction a line, disassembled.

Each row is decoded with iced-x86 in the mode it ran in (16, 32 or 64-bit), at its own IP, and
resolved to the guest's symbols (tracetool/symbols.py); the registers the instruction changed
follow it. The registers are rebuilt exactly from the stream's `initial` values and each row's
changes (tracetool/step_schema.py). `vmtrace summary --steps --by symbol` counts instructions per
function through `count_steps` here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Iterator, Optional

import typer

from .. import analysis
from ..step_schema import REGISTERS
from ..symbols import SymbolError, SymbolTable, symbols_for_vm
from ..trace import TraceReader
from . import _common as c

STEP_GROUPINGS = ("symbol", "line", "addr", "vcpu")
_SEGMENT_REGISTERS = ("cs", "ds", "es", "fs", "gs", "ss")


@dataclass
class Step:
    vm: int
    vcpu: int
    epoch: int
    seq: int
    t: int
    addr: int
    bits: int
    code: bytes  # the instruction's bytes (as long as the decoder found it)
    text: str  # its disassembly (Intel syntax)
    changed: dict  # register name → new value
    symbol: str | None = None  # <name+0xoff>
    line: str | None = None  # file:line

    def to_json(self, t0: int | None) -> dict:
        row = {"vm": self.vm, "vcpu": self.vcpu, "epoch": self.epoch, "seq": self.seq, "t": self.t,
               "t_rel": None if t0 is None else self.t - t0, "addr": self.addr, "bits": self.bits,
               "bytes": self.code.hex(), "insn": self.text, "symbol": self.symbol, "line": self.line,
               "changed": self.changed}
        return row


class _Disassembler:
    def __init__(self) -> None:
        from iced_x86 import Decoder, Formatter, FormatterSyntax
        self._decoder = Decoder
        self._formatter = Formatter(FormatterSyntax.INTEL)

    def decode(self, code: bytes, bits: int, ip: int) -> tuple[int, str]:
        """(length, text) of the first instruction in `code` at `ip`."""
        insn = self._decoder(bits, code, ip=ip).decode()
        if insn.is_invalid:
            return 1, "(bad)"
        return insn.len, self._formatter.format(insn)


def _symbol_tables(reader: TraceReader, symbols_path: str | None) -> tuple[dict, list[str]]:
    """(vm, epoch) → SymbolTable or None, with the warnings to show."""
    tables, warnings = {}, []
    for start in reader.records("vm-start"):
        try:
            resolved = symbols_for_vm(start, symbols_path)
        except SymbolError as e:
            c.bad_input(str(e))
        tables[(start.get("vm"), start.get("epoch"))] = resolved.table
        warnings += resolved.warnings
    return tables, list(dict.fromkeys(warnings))


def steps(reader: TraceReader, *, vm: int | None = None, vcpu: int | None = None, symbols: bool = True,
          symbols_path: str | None = None, span: tuple[int | None, int | None] = (None, None),
          limit: int | None = None, warnings: list | None = None) -> Iterator[Step]:
    """The trace's steps, stream by stream in sequence order (decoded, resolved)."""
    disasm = _Disassembler()
    tables: dict = {}
    if symbols:
        tables, notes = _symbol_tables(reader, symbols_path)
        if warnings is not None:
            warnings += notes
    lo, hi = span
    state: dict[tuple, list[int]] = {}  # per stream: every register before the next row
    shown = 0
    for batch in reader.step_batches(vm=vm, vcpu=vcpu):
        key = (batch.vm, batch.vcpu, batch.epoch)
        if batch.initial is not None:
            state[key] = list(batch.initial)
        regs = state.get(key)
        table: SymbolTable | None = tables.get((batch.vm, batch.epoch))
        cols = batch.cols
        addrs, bits_col, times, masks = (cols[n].tolist() for n in ("addr", "bits", "t", "changed"))
        values = cols["values"].tolist()
        insns = cols["insn"]
        at = 0
        sym_ids = line_ids = None
        if table is not None:
            sym_ids, line_ids = table.symbol_ids(cols["addr"]).tolist(), table.line_ids(cols["addr"]).tolist()
        for i in range(batch.count):
            mask = masks[i]
            changed = {}
            for r, name in enumerate(REGISTERS):
                if mask >> r & 1:
                    changed[name] = values[at]
                    at += 1
            t = times[i]
            if (lo is not None and t < lo) or (hi is not None and t > hi):
                if regs is not None:
                    for name, value in changed.items():
                        regs[REGISTERS.index(name)] = value
                continue
            addr, bits = addrs[i], bits_col[i]
            # IP as the CPU had it (CS-relative outside 64-bit code), so branch targets read right.
            ip = regs[REGISTERS.index("rip")] if regs is not None else addr
            if bits != 64:
                ip &= 0xFFFF if bits == 16 else 0xFFFF_FFFF
            code = bytes(insns[i])
            length, text = disasm.decode(code, bits, ip)
            step = Step(batch.vm, batch.vcpu, batch.epoch, batch.first_seq + i, t, addr, bits, code[:length], text,
                        changed)
            if table is not None:
                sid, lid = sym_ids[i], line_ids[i]
                name = table.symbol_name(sid)
                if name is not None:
                    offset = addr - int(table.starts[sid])
                    step.symbol = f"{name}+{offset:#x}" if offset else name
                step.line = table.line_text(lid)
            if regs is not None:
                for name, value in changed.items():
                    regs[REGISTERS.index(name)] = value
            yield step
            shown += 1
            if limit is not None and shown >= limit:
                return


def count_steps(reader: TraceReader, by: str, vm: int | None = None, symbols_path: str | None = None) -> dict:
    """Instructions per group (symbol, line, addr or vcpu), most first."""
    import numpy as np
    tables, warnings = _symbol_tables(reader, symbols_path) if by in ("symbol", "line") else ({}, [])
    counts: dict[str, int] = {}
    total = 0
    for batch in reader.step_batches(vm=vm):
        addrs = batch.cols["addr"]
        total += batch.count
        if by == "vcpu":
            keys, n = np.array([f"vm{batch.vm}/vcpu{batch.vcpu}"]), np.array([batch.count])
        elif by == "addr":
            uniq, n = np.unique(addrs, return_counts=True)
            keys = [f"{a:#x}" for a in uniq.tolist()]
        else:
            table = tables.get((batch.vm, batch.epoch))
            if table is None:
                uniq, n = np.unique(addrs, return_counts=True)
                keys = [f"{a:#x}" for a in uniq.tolist()]
            else:
                ids = table.symbol_ids(addrs) if by == "symbol" else table.line_ids(addrs)
                uniq, n = np.unique(ids, return_counts=True)
                name = table.symbol_name if by == "symbol" else table.line_text
                keys = [name(int(i)) or "(unknown)" for i in uniq.tolist()]
        for k, m in zip(keys, n.tolist()):
            counts[str(k)] = counts.get(str(k), 0) + int(m)
    groups = [{"key": k, "steps": n, "pct": 100.0 * n / total if total else 0.0}
              for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    return {"by": by, "steps": total, "groups": groups, "warnings": warnings}


def render_counts(data: dict, console) -> None:
    from rich.table import Table
    from rich.text import Text
    t = Table(box=None, pad_edge=False)
    for i, name in enumerate((data["by"], "steps", "%")):
        t.add_column(name, justify="left" if i == 0 else "right")
    for g in data["groups"]:
        t.add_row(Text(g["key"]), str(g["steps"]), f"{g['pct']:.2f}")
    console.print(t)
    console.print(Text(f"{data['steps']} instructions stepped"))


def summary_run(trace: str, by: str, vm: str | None, as_json: bool, symbols_path: str | None = None) -> None:
    """`vmtrace summary --steps`: the step stream counted per group."""
    if by == "reason":  # summary's default grouping means nothing for steps
        by = "symbol"
    if by not in STEP_GROUPINGS:
        c.bad_input(f"unknown --by {by!r} with --steps (choose from {', '.join(STEP_GROUPINGS)})")
    with c.reading(trace) as reader:
        data = count_steps(reader, by, _one_vm(vm), symbols_path)
    for w in data["warnings"]:
        c.warn(w)
    if not data["steps"]:
        c.warn(f"{trace}: no step trace in this file (record one with vmsup launch --step-trace)")
    if as_json:
        c.dump_json(data)
    else:
        render_counts(data, c.console())


def _one_vm(vm: str | None) -> int | None:
    if vm is None:
        return None
    try:
        value = int(vm, 0)
        if value < 0:
            raise ValueError
    except ValueError:
        c.bad_input(f"bad --vm {vm!r}: one VM id, e.g. 0")
    return value


def _time_zero(reader: TraceReader) -> int | None:
    """The zero of relative times: the trace's first event or first step, whichever came first."""
    starts = [t for t in (analysis.trace_start(reader),) if t is not None]
    for batch in reader.step_batches():
        if batch.count:
            starts.append(int(batch.cols["t"][0]))
            break
    return min(starts) if starts else None


def text_line(step: Step, t0: int | None) -> str:
    where = f" <{step.symbol}>" if step.symbol else ""
    if step.line:
        where += f" ({step.line})"
    regs = " ".join(f"{name}={value:#x}" for name, value in step.changed.items()
                    if name != "rip")
    head = f"vm={step.vm} " if step.vm else ""
    head += f"vcpu={step.vcpu} " if step.vcpu else ""
    return f"{head}{step.seq:>6} {step.addr:#010x}{where}  {step.code.hex():<16} {step.text:<28} {regs}".rstrip() + "\n"


def run(
    trace: str = c.TRACE_ARG,
    vm: Optional[str] = typer.Option(None, "--vm", help="Only this VM's steps (its id)."),
    vcpu: Optional[int] = typer.Option(None, "--vcpu", min=0, help="Only this vCPU's steps."),
    t_from: Optional[str] = typer.Option(None, "--from", help="Only steps at or after this time since the trace's "
                                         "first event: seconds, or with a unit (250ms, 40us, 1500ns)."),
    t_to: Optional[str] = typer.Option(None, "--to", help="Only steps at or before this time (as --from)."),
    limit: Optional[int] = typer.Option(None, "--limit", "-n", min=0, help="Show at most N steps."),
    symbols_path: Optional[str] = typer.Option(None, "--symbols", help="Resolve addresses with this ELF or nm map."),
    no_symbols: bool = typer.Option(False, "--no-symbols", help="Addresses only."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per step, one per line."),
) -> None:
    """Single-stepped instructions (vmsup launch --step-trace), disassembled, with symbols."""
    import json
    span = c.time_window(t_from, t_to)
    with c.reading(trace) as reader:
        t0 = _time_zero(reader)
        warnings: list[str] = []
        rows = steps(reader, vm=_one_vm(vm), vcpu=vcpu, symbols=not no_symbols, symbols_path=symbols_path,
                     span=c.absolute(span, t0) if span != (None, None) else span, limit=limit, warnings=warnings)
        out = sys.stdout
        first = True
        shown = 0
        for step in rows:
            if first:
                for w in warnings:
                    c.warn(w)
                first = False
            out.write(json.dumps(step.to_json(t0)) + "\n" if as_json else text_line(step, t0))
            shown += 1
        out.flush()
        if shown == 0 and not any(True for _ in reader.step_batches(vm=_one_vm(vm), vcpu=vcpu)):
            c.warn(f"{trace}: no step trace in this file (record one with vmsup launch --step-trace)")
