"""What every vmtrace command shares: exit codes, error lines, the rich Console, JSON output,
opening a trace, the filter and time-window options, and refusing to overwrite an input.

Bad input (a missing, truncated, corrupt or foreign file, a bad filter) ends in one
`vmtrace: error: …` line and exit code 2; a torn tail (a recorder killed while writing) is a
warning, and the readable part is shown.
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from decimal import Decimal, InvalidOperation
from typing import NamedTuple, NoReturn

import typer

from .._output import OutputError, refuse_overwriting_inputs
from .. import filters
from ..filters import EventFilter, FilterError
from ..trace import TraceError, TraceReader

EXIT_BAD_INPUT = 2  # as vmsup: bad input, an unreadable trace (typer uses 2 for usage errors too)
EXIT_INTERRUPTED = 130
EXIT_PROBLEMS = 1  # verify found problems; diff found differences (as diff(1))

# Piped into a file or grep, cells wrapped at 80 columns would split words; use wide lines.
PIPE_WIDTH = 200


def err(message: str) -> None:
    typer.echo(f"vmtrace: error: {message}", err=True)


def warn(message: str) -> None:
    typer.echo(f"vmtrace: warning: {message}", err=True)


def bad_input(message: str) -> NoReturn:
    """End the command: one error line, exit code 2."""
    sys.stdout.flush()
    err(message)
    raise typer.Exit(EXIT_BAD_INPUT)


def warn_reader(reader_path: str, torn_tail, warnings: list[str]) -> None:
    if torn_tail is not None:
        offset, reason = torn_tail
        warn(f"{reader_path}: torn tail at offset {offset} ({reason}); using the blocks before it")
    for w in warnings:
        warn(f"{reader_path}: {w}")


def or_exit(analyse, *args):
    """Run one analysis over trace files; a bad file becomes one error line and exit 2."""
    try:
        return analyse(*args)
    except TraceError as e:
        bad_input(str(e))


@contextmanager
def reading(trace: str, *, warn: bool = True, **kwargs):
    """Open a trace for a command: its warnings on stderr; a TraceError anywhere inside ends the
    command with one line and exit code 2."""
    try:
        with TraceReader(trace, **kwargs) as reader:
            if warn:
                warn_reader(trace, reader.torn_tail, reader.warnings)
            yield reader
    except TraceError as e:
        bad_input(str(e))


def console(file=None, *, stderr: bool = False, pipe_width: int = PIPE_WIDTH):
    """The rich Console every command renders through (stdout, or stderr for progress)."""
    from rich.console import Console
    out = file or (sys.stderr if stderr else sys.stdout)
    return Console(file=out, highlight=False, width=None if out.isatty() else pipe_width)


class Col(NamedTuple):
    """A column of a table that must fit the terminal (fitted_table)."""

    header: str  # "\n" splits it over lines, so a number column stays as narrow as its numbers
    numeric: bool = True  # numbers never wrap and are never cut; text folds
    drop: int = 0  # 0: always shown; otherwise dropped (highest first, equal ones together) when too wide


# The narrowest a text column (a group's name) folds to before columns are dropped instead.
_MIN_TEXT = 12


def fitted_table(console, title: str, columns: list[Col], rows: list[list[str]], *, wide: bool = False):
    """(rich Table, hidden column count): the table at the console's width — numbers never cut to
    `1…`: text columns fold first, then optional columns go (highest `drop` first); `wide`: all
    columns, as wide as they need (print_fitted prints it at that width)."""
    from rich.table import Table
    from rich.text import Text

    def natural(i: int, *, folded: bool = True) -> int:
        cells = [len(line) for line in columns[i].header.split("\n")] + [len(r[i]) for r in rows]
        width = max(cells)
        return width if columns[i].numeric or not folded else min(width, _MIN_TEXT)

    def total(keep: list[int]) -> int:  # each cell has a space either side and a border
        return sum(natural(i) + 3 for i in keep) + 1

    keep = list(range(len(columns)))
    one_line = [col._replace(header=col.header.strip().replace("\n", " ")) for col in columns]
    if wide or sum(max([len(col.header)] + [len(r[i]) for r in rows]) + 3
                   for i, col in enumerate(one_line)) + 1 <= console.width:
        columns = one_line  # room enough for every column with its header on one line
    if not wide:
        while total(keep) > console.width:
            level = max((columns[i].drop for i in keep), default=0)
            if not level:
                break
            keep = [i for i in keep if columns[i].drop != level]  # e.g. A, B and Δ% of one statistic
    t = Table(title=title, title_justify="left", title_style="bold")
    for i in keep:
        col = columns[i]
        t.add_column(col.header, justify="right" if col.numeric else "left", no_wrap=col.numeric,
                     overflow="ellipsis" if col.numeric else "fold", min_width=natural(i) if col.numeric else None)
    for r in rows:
        t.add_row(*(Text(r[i]) for i in keep))  # Text: names from a file are never markup
    if wide:  # every cell whole, on one line
        t.width = max(console.width, sum(natural(i, folded=False) + 3 for i in keep) + 1)
    return t, len(columns) - len(keep)


def print_fitted(console, table, hidden: int, *, wide: bool = False) -> None:
    """Print a fitted_table; say how many columns the width hid (`--wide` shows them)."""
    from rich.text import Text
    if wide:
        console.print(table, width=table.width, crop=False)
    else:
        console.print(table)
    if hidden:
        console.print(Text(f"({hidden} more columns with --wide)", style="dim"))


WIDE_OPT = typer.Option(False, "--wide", help="Every column, however wide the table gets.")


def json_default(value):
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    if hasattr(value, "item"):  # numpy scalars
        return value.item()
    return str(value)


def dump_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=json_default) + "\n")


def usec(ns) -> str:
    return "-" if ns is None else f"{ns / 1000:.2f}"


def refuse_overwriting(out: str, *inputs: str) -> None:
    """A command that writes `out` from `inputs` ends (exit 2) when `out` is one of them."""
    try:
        refuse_overwriting_inputs(out, inputs)
    except OutputError as e:
        bad_input(str(e))


# --- options shared by the commands that select events ----------------------------------------------
TRACE_ARG = typer.Argument(..., help="A trace file written by the vmsup recorder.")
# Defined once in tracetool/filters.py, for vmsup tail/top too.
VM_OPT, VCPU_OPT, EPOCH_OPT, REASON_OPT, PORT_OPT, ADDR_OPT, FILTER_OPT = (filters.option(f) for f in filters.FLAGS)


def event_filter(vm=None, vcpu=None, epoch=None, reason=None, port=None, addr=None, where=None) -> EventFilter | None:
    """The command's filter flags as one EventFilter (None: everything); bad text ends the command."""
    try:
        selected = filters.from_flags(vm, vcpu, epoch, reason, port, addr, where)
    except FilterError as e:
        bad_input(str(e))
    return None if selected.matches_everything else selected


def trace_vms(reader) -> str:
    """The VMs of a trace, as an error line names them: `0 (seed16), 1 (mmio)`."""
    from ..analysis import vm_names
    names = vm_names(reader)
    vms = sorted(set(names) | {s.vm for s in reader.streams()})
    return ", ".join(f"{vm} ({names[vm]})" if vm in names else str(vm) for vm in vms) or "none"


def require_vms(reader, trace: str, selected: EventFilter | None) -> None:
    """End the command (exit 2) when the filter names only VMs the trace does not have, naming the
    ones it has: a typo'd --vm must not look like a VM without events."""
    if selected is None or selected.vm is None:
        return
    from ..analysis import vm_names
    present = set(vm_names(reader)) | {s.vm for s in reader.streams()}
    if not present & set(selected.vm):
        asked = "|".join(str(v) for v in selected.vm)
        bad_input(f"{trace}: no vm {asked} in this trace; its VMs: {trace_vms(reader)}")


_TIME_UNITS = (("ns", 1), ("us", 1_000), ("µs", 1_000), ("ms", 1_000_000), ("s", 1_000_000_000))


def parse_time(text: str, flag: str) -> int:
    """`1.5`, `1.5s`, `250ms`, `40us`, `1500ns` (a leading + is allowed) → ns."""
    s = text.strip().lower().lstrip("+")
    scale = 1_000_000_000
    for unit, factor in _TIME_UNITS:
        if s.endswith(unit) and not (unit == "s" and s[-2:-1] in ("n", "u", "µ", "m")):
            s, scale = s[:-len(unit)].strip(), factor
            break
    try:
        value = Decimal(s)
        if not value.is_finite() or value < 0:
            raise InvalidOperation
    except (InvalidOperation, ValueError):
        bad_input(f"bad {flag} {text!r}: expected a time since the first event, e.g. 1.5, 250ms, 40us")
    return int(value * scale)


def time_window(t_from: str | None, t_to: str | None) -> tuple[int | None, int | None]:
    lo = None if t_from is None else parse_time(t_from, "--from")
    hi = None if t_to is None else parse_time(t_to, "--to")
    if lo is not None and hi is not None and hi < lo:
        bad_input(f"--to {t_to} is before --from {t_from}")
    return lo, hi


def absolute(span: tuple[int | None, int | None], t0: int | None) -> tuple[int | None, int | None]:
    base = t0 or 0
    return tuple(None if v is None else min(base + v, (1 << 63) - 1) for v in span)
