"""`vmtrace sql "SELECT …" TRACE...`: SQL over traces with DuckDB (the `sql` extra).

Tables (tracetool.tables; each with a `trace` column naming the file a row came from, so several
traces, or a glob of them, query as one):
  exits    one row per exit: vm, vcpu, epoch, seq and the CSV export's columns (t_exit_ns,
           guest_ns, handle_ns, addr, data, count, reason, reason_code, size, write)
  records  one row per record (vm-start, vm-end, gap, lifecycle, input, screen…): kind, t, vm,
           vcpu, epoch, name, event, status and the record as JSON (DuckDB's json_extract reads it)
  vms      one row per VM and epoch: name, guest, sha256, mode, vcpus, status, exits, …
  kvm_stats  the kernel's KVM counters (KVM_GET_STATS_FD) the worker sampled: vm, epoch, vcpu
           (-1: the VM's own), t, name (the kernel's), value; one row per sample and counter
  coalesced  writes KVM queued in its coalesced ring (--coalesce), emulated  instructions vmsup's
           fallback emulator performed: the rows beside the exits (tracetool/side_rows.py)
Only the tables a query names are built. Output: a table that fits the terminal (80 columns
when piped; rows too wide for it are shown one `column value` block each), `--csv`, or `--json`
(an array of objects).
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys

import typer

from ..trace import TraceError, TraceReader
from . import _common as common
from ._symbols import vm_tables

EXTRA_HINT = "pip install 'vmsup[sql]'"
_TABLE_WIDTH = 80  # a table piped into a file or a pager


class SqlError(Exception):
    """A query DuckDB refused (its message, on one line), or the extra is not installed."""


def _need_duckdb():
    try:
        import duckdb
        import pyarrow  # noqa: F401
    except ImportError:
        raise SqlError(f"vmtrace sql needs duckdb and pyarrow: {EXTRA_HINT}") from None
    return duckdb


def expand(patterns: list[str]) -> list[str]:
    """Trace arguments → paths: a path that exists is itself; otherwise a glob, which must match."""
    paths = []
    for pattern in patterns:
        if os.path.exists(pattern) or not glob.has_magic(pattern):
            paths.append(pattern)
            continue
        matched = sorted(glob.glob(pattern))
        if not matched:
            raise SqlError(f"no trace matches {pattern!r}")
        paths += matched
    return list(dict.fromkeys(paths))


def tables_named(sql: str) -> list[str]:
    """The tables of tracetool.tables a query names (the others are not built)."""
    from .. import tables  # pyarrow: only once the extra is known to be there
    return [name for name in tables.BUILDERS if re.search(rf"\b{name}\b", sql, re.IGNORECASE)]


def _one_line(error: Exception) -> str:
    # DuckDB's messages end with the query line and a caret under it: keep the words only.
    text = str(error).split("\n\nLINE ")[0]
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def query(sql: str, traces: list[str]):
    """Run `sql` over the traces' tables; a pyarrow Table (None for a statement with no result).
    Raises SqlError (DuckDB's message) or TraceError (an unreadable trace)."""
    duckdb = _need_duckdb()
    import pyarrow as pa

    from .. import tables

    wanted = tables_named(sql)
    parts: dict[str, list] = {name: [] for name in wanted}
    for path in traces:
        if not wanted:  # still check every trace opens
            TraceReader(path).close()
        else:
            with TraceReader(path) as reader:
                for name in wanted:
                    extra = {"symbols": vm_tables(reader, None)} if name == "exits" else {}  # symbol, line
                    parts[name].append(tables.BUILDERS[name](reader, trace=path, **extra))
    con = duckdb.connect(":memory:")
    try:
        for name, pieces in parts.items():
            con.register(name, pa.concat_tables(pieces) if len(pieces) > 1 else pieces[0])
        try:
            rel = con.sql(sql)
            if rel is None:
                return None
            to_arrow = getattr(rel, "to_arrow_table", None) or rel.arrow
            return to_arrow()
        except duckdb.Error as e:
            raise SqlError(_one_line(e)) from None
    finally:
        con.close()


def _plain(table):
    """Dictionary-encoded columns as their values (CSV writers want plain columns)."""
    import pyarrow as pa
    for i, field in enumerate(table.schema):
        if pa.types.is_dictionary(field.type):
            table = table.set_column(i, field.name, table.column(i).cast(field.type.value_type))
    return table


def write_csv(table, out) -> None:
    import pyarrow.csv as pacsv
    pacsv.write_csv(_plain(table), out)


def write_json(table, out) -> None:
    out.write(json.dumps(table.to_pylist(), indent=2, default=common.json_default) + "\n")


def _cell(value):
    from rich.text import Text
    return Text("NULL", style="dim") if value is None else Text(str(value))


def render(table, console) -> None:
    """A table when every column fits the console at its natural width; otherwise one block of
    `column  value` lines per row (psql's expanded display), values folded."""
    from rich.table import Table
    from rich.text import Text

    rows = table.to_pylist()
    names = table.schema.names
    natural = [max([len(n)] + [len("NULL" if r[n] is None else str(r[n])) for r in rows]) for n in names]
    if sum(natural) + 3 * (len(names) - 1) <= console.width:
        t = Table(show_edge=False, pad_edge=False)
        for field in table.schema:
            numeric = str(field.type).startswith(("int", "uint", "float", "double", "decimal"))
            t.add_column(field.name, justify="right" if numeric else "left", no_wrap=True)
        for row in rows:
            t.add_row(*(_cell(v) for v in row.values()))
        console.print(t)
    else:
        for i, row in enumerate(rows):
            console.rule(f"row {i + 1}", align="left", style="dim")
            grid = Table.grid(padding=(0, 2))
            grid.add_column(style="bold", no_wrap=True)
            grid.add_column(overflow="fold")
            for name, value in row.items():
                grid.add_row(name, _cell(value))
            console.print(grid)
    console.print(Text(f"{table.num_rows} row{'s' if table.num_rows != 1 else ''}", style="dim"))


def run(
    sql: str = typer.Argument(..., metavar="QUERY", help="A DuckDB SQL query over the tables exits, records, vms, kvm_stats, coalesced, emulated."),
    traces: list[str] = typer.Argument(..., metavar="TRACE...", help="Trace files or globs (quoted) of them."),
    as_csv: bool = typer.Option(False, "--csv", help="CSV with a header line instead of a table."),
    as_json: bool = typer.Option(False, "--json", help="A JSON array of objects instead of a table."),
) -> None:
    """SQL over traces (DuckDB): tables exits, records, vms, kvm_stats, coalesced and emulated, with a trace column."""
    if as_csv and as_json:
        common.bad_input("--csv and --json exclude each other")
    try:
        result = query(sql, expand(traces))
    except (SqlError, TraceError) as e:
        common.bad_input(str(e))
    if result is None:
        return
    if as_csv:
        sys.stdout.flush()
        write_csv(result, sys.stdout.buffer)
    elif as_json:
        write_json(result, sys.stdout)
    else:
        render(result, common.console(pipe_width=_TABLE_WIDTH))
