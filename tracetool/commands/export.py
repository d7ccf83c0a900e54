"""`vmtrace export`: a trace as a Perfetto/Chrome timeline (JSON), CSV or Parquet.

Events go out in time order (the order `vmtrace show` prints), in chunks of numpy columns;
text formats are built with tracetool._text (no Python object per event).

Perfetto: tracetool/commands/_perfetto.py (exits as slices; records, coalesced writes and emulated
instructions as instant events).

CSV: one header line, one row per event, the columns named as an exit's JSON fields
(schema.EVENT_FIELDS, the README's "One exit" table); `handle_ns` is empty where unknown,
`write` is true or false; `symbol` and `line` are named from rip with the guest's symbols (the
image the trace names, or --symbols), empty where unknown.
Parquet: the same columns with types (reason as a dictionary-encoded string, handle_ns null
where unknown), the run metadata in the file's key-value metadata; needs pyarrow
(`pip install 'vmsup[parquet]'`).

`--table coalesced` or `--table emulated` (CSV or Parquet) writes the coalesced writes or the
emulated instructions instead, one row each: the columns of `vmtrace sql`'s tables of those
names (tracetool/side_rows.py), which are not exits.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from typing import Callable, Optional

import numpy as np
import typer

from .. import _text as T
from .. import analysis, exit_rows, schema, side_rows
from .._output import OutputError, output_path
from ..filters import EventFilter
from ..handling import NO_HANDLE
from ..trace import TraceReader
from . import _common as common
from ._perfetto import write_timeline
from ._symbols import SYMBOLS_OPT, vm_tables

FORMATS = ("perfetto", "csv", "parquet")
TABLES = ("exits", *side_rows.KINDS)  # what an export holds: exits, or the rows beside them
_PLACES = tuple(f.name for f in schema.PLACE_FIELDS)  # derived: named from rip (exit_rows.add_places)
CSV_COLUMNS = schema.EXPORT_COLUMNS  # CSV and Parquet: one column each, in this order
_PARQUET_ROWS = 1 << 20  # rows per Parquet row group


class ExportError(Exception):
    """An export that cannot run (a missing optional dependency, an unwritable output)."""


Progress = Callable[[int], None]


def export(reader: TraceReader, fmt: str, out_path: str, where: EventFilter | None = None,
           progress: Progress | None = None, symbols: dict | None = None) -> dict:
    """Write the export to out_path (see tracetool._output: whole or not at all; "-" is
    standard output). Returns {"events": n, "path": out_path, "bytes": size or None}.
    `symbols`: {vm: SymbolTable | None} (commands._symbols.vm_tables) naming each exit's rip."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r} (known: {', '.join(FORMATS)})")
    writer = {"perfetto": write_timeline, "csv": _csv, "parquet": _parquet}[fmt]
    if fmt == "parquet":
        _need_pyarrow()
    try:
        with output_path(out_path, inputs=(reader.path,)) as path:
            n = writer(reader, path, where, progress or (lambda k: None), symbols or {})
            size = os.path.getsize(path) if os.path.isfile(path) else None
    except OutputError as e:
        raise ExportError(str(e)) from None
    return {"events": n, "path": out_path, "bytes": size, "format": fmt}


def export_side(reader: TraceReader, kind: str, fmt: str, out_path: str, where: EventFilter | None = None) -> dict:
    """Write the coalesced writes or emulated instructions (side_rows.KINDS) as CSV or Parquet,
    whole or not at all (as export). Returns {"events": rows, "path", "bytes", "format"}."""
    if fmt not in ("csv", "parquet"):
        raise ExportError(f"--table {kind} goes to csv or parquet (the perfetto timeline holds every kind)")
    if fmt == "parquet":
        _need_pyarrow()
    try:
        with output_path(out_path, inputs=(reader.path,)) as path:
            if fmt == "parquet":
                import pyarrow.parquet as pq

                from .. import tables
                table = tables.side_table(kind, reader, where=where)
                pq.write_table(table.replace_schema_metadata(_parquet_metadata(reader)), path, compression="zstd")
                n = table.num_rows
            else:
                values = side_rows.value_columns(kind, side_rows.columns(reader, kind, where))
                with open(path, "w", newline="") as f:
                    out = csv.writer(f, lineterminator="\n")
                    out.writerow(values)
                    out.writerows(zip(*values.values()))
                n = len(next(iter(values.values())))
            size = os.path.getsize(path) if os.path.isfile(path) else None
    except OutputError as e:
        raise ExportError(str(e)) from None
    return {"events": n, "path": out_path, "bytes": size, "format": fmt}


# --- CSV ------------------------------------------------------------------------------------------
_BOOLEANS = [b"false", b"true"]


def _csv_text(text: str) -> bytes:
    """A CSV cell (RFC 4180: quoted when it holds a comma, quote or line break)."""
    if any(ch in text for ch in ',"\r\n'):
        text = '"' + text.replace('"', '""') + '"'
    return text.encode()


def _csv_field(c: dict[str, np.ndarray], name: str, reasons: list[bytes]) -> np.ndarray:
    """One export column (schema.EXPORT_COLUMNS) as text cells."""
    if name in _PLACES:
        labels = c[name]
        return T.lookup([b""] + [_csv_text(t) for t in labels.texts[1:]], labels.codes)
    if name == "t_exit_ns":
        return T.decimal(c["t_exit"])
    if name == "handle_ns":
        no_handle = c["handle_ns"] == NO_HANDLE
        return T.blank(T.decimal(np.where(no_handle, 0, c["handle_ns"])), no_handle)
    if name == "reason":
        return T.lookup(reasons, c["reason"])
    if name == "reason_code":
        return T.decimal(c["reason"])
    if name == "write":  # as JSON spells a boolean
        return T.lookup(_BOOLEANS, c["flags"] & schema.FLAG_WRITE)
    unknown = exit_rows.missing_mask(c, name)
    return T.decimal(c[name]) if unknown is None else T.blank(T.decimal(c[name]), unknown)


def _csv(reader: TraceReader, path: str, where, progress: Progress, symbols: dict) -> int:
    reasons = exit_rows.reason_texts()
    n_total = 0
    with open(path, "wb") as f:
        f.write((",".join(CSV_COLUMNS) + "\n").encode())
        for c in analysis.events_with_places(reader, where, symbols):
            n = len(c["t_exit"])
            comma = T.const(b",", n)
            pieces = []
            for name in CSV_COLUMNS:
                pieces += [_csv_field(c, name, reasons), comma]
            pieces[-1] = T.const(b"\n", n)
            f.write(T.join_rows(pieces))
            n_total += n
            progress(n)
    return n_total


# --- Parquet --------------------------------------------------------------------------------------
def _need_pyarrow():
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise ExportError("parquet export needs pyarrow: pip install 'vmsup[parquet]'") from None


def _parquet_metadata(reader: TraceReader) -> dict:
    return {b"vmsup.source": b"vmtrace export", b"vmsup.schema_version": str(schema.SCHEMA_VERSION).encode(),
            b"vmsup.run": json.dumps(reader.run, default=str).encode()}


def _parquet(reader: TraceReader, path: str, where, progress: Progress, symbols: dict) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from .. import tables

    pa_schema = tables.exit_schema(metadata=_parquet_metadata(reader))
    n_total = 0
    pending: list[dict[str, np.ndarray]] = []
    rows = 0

    def flush(writer) -> None:
        nonlocal pending, rows
        if not pending:
            return
        c = {k: np.concatenate([p[k] for p in pending]) for k in pending[0] if k not in _PLACES}
        for name in _PLACES:  # each chunk's codes index its own texts: offset them into one list
            texts, codes = [None], []
            for p in pending:
                labels = p[name]
                codes.append(np.where(labels.codes == 0, 0, labels.codes + (len(texts) - 1)).astype(np.int32))
                texts += labels.texts[1:]
            c[name] = exit_rows.Labels(np.concatenate(codes), texts)
        writer.write_table(pa.Table.from_batches([tables.exit_batch(c, pa_schema)]), row_group_size=_PARQUET_ROWS)
        pending, rows = [], 0

    with pq.ParquetWriter(path, pa_schema, compression="zstd") as writer:
        for c in analysis.events_with_places(reader, where, symbols):
            n = len(c["t_exit"])
            pending.append(c)
            rows += n
            n_total += n
            if rows >= _PARQUET_ROWS:
                flush(writer)
            progress(n)
        flush(writer)
    return n_total


def partition_keys(text: str) -> list[str]:
    """`vm,epoch` → ["vm", "epoch"]: a dataset splits by stream ids only."""
    keys = [k.strip() for k in text.split(",") if k.strip()]
    if not keys or any(k not in schema.STREAM_COLUMNS for k in keys) or len(set(keys)) != len(keys):
        raise ValueError(f"bad --partition-by {text!r}: a comma-separated list of {', '.join(schema.STREAM_COLUMNS)}")
    return keys


def export_partitioned(reader: TraceReader, out_dir: str, keys: list[str], where: EventFilter | None = None,
                       progress: Progress | None = None, symbols: dict | None = None) -> dict:
    """A Hive-partitioned Parquet dataset in out_dir (tracetool.tables.write_partitioned)."""
    _need_pyarrow()
    from .. import tables
    try:
        n = tables.write_partitioned(reader, out_dir, keys, where, _parquet_metadata(reader), progress, symbols)
    except OSError as e:
        raise ExportError(str(e) if isinstance(e, FileExistsError) else f"{out_dir}: cannot write: {e.strerror or e}") from None
    return {"events": n, "path": out_dir, "bytes": None, "format": "parquet"}


def run(
    trace: str = common.TRACE_ARG,
    fmt: str = typer.Option(..., "--format", help="perfetto (Chrome/Perfetto JSON timeline), csv or parquet."),
    out: str = typer.Option(..., "--output", "-o", help="The file to write ('-': standard output), or with "
                            "--partition-by the dataset's directory."),
    partition_by: Optional[str] = typer.Option(None, "--partition-by", metavar="KEYS",
                                               help="parquet: a Hive-partitioned dataset split by vm, vcpu and/or "
                                               "epoch (vm,epoch → DIR/vm=0/epoch=0/part-0.parquet)."),
    vm: Optional[str] = common.VM_OPT, vcpu: Optional[str] = common.VCPU_OPT, epoch: Optional[str] = common.EPOCH_OPT,
    reason: Optional[str] = common.REASON_OPT, port: Optional[str] = common.PORT_OPT,
    addr: Optional[str] = common.ADDR_OPT, where: Optional[str] = common.FILTER_OPT,
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress",
                                            help="A progress bar on stderr [default: when stderr is a terminal]."),
    symbols: Optional[str] = SYMBOLS_OPT,
    table: str = typer.Option("exits", "--table", help="exits, or (csv, parquet) the rows beside them: coalesced "
                              "(writes KVM queued, --coalesce) or emulated (instructions vmsup performed), as "
                              "vmtrace sql's tables of those names."),
) -> None:
    """Write the events as a Perfetto timeline (open it in ui.perfetto.dev), CSV or Parquet."""
    if fmt not in FORMATS:
        common.bad_input(f"unknown --format {fmt!r} (choose from {', '.join(FORMATS)})")
    if table not in TABLES:
        common.bad_input(f"unknown --table {table!r} (choose from {', '.join(TABLES)})")
    if table != "exits" and (fmt == "perfetto" or partition_by is not None):
        common.bad_input(f"--table {table} goes to --format csv or parquet, without --partition-by (the "
                         "perfetto timeline holds every kind)")
    common.refuse_overwriting(out, trace)
    if fmt == "parquet" and out == "-" and sys.stdout.isatty():
        common.bad_input("Parquet is binary: not to a terminal (redirect standard output, or -o FILE)")
    event_filter = common.event_filter(vm, vcpu, epoch, reason, port, addr, where)
    if partition_by is not None:
        if fmt != "parquet":
            common.bad_input("--partition-by needs --format parquet")
        try:
            keys = partition_keys(partition_by)
        except ValueError as e:
            common.bad_input(str(e))

    def export_to(reader, *args):
        if table != "exits":
            return export_side(reader, table, fmt, out, args[0])
        if partition_by is None:
            return export(reader, fmt, out, *args, symbols=vm_tables(reader, symbols))
        return export_partitioned(reader, out, keys, *args, symbols=vm_tables(reader, symbols))

    with common.reading(trace) as reader:
        common.require_vms(reader, trace, event_filter)
        show_bar = sys.stderr.isatty() if progress is None else progress
        try:
            if show_bar:
                from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
                from rich.progress import Progress as ProgressBar
                total = reader.event_count if event_filter is None else None
                with ProgressBar(TextColumn(f"export {fmt}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                              console=common.console(stderr=True), transient=True) as bar:
                    task = bar.add_task("export", total=total)
                    result = export_to(reader, event_filter, lambda n: bar.advance(task, n))
            else:
                result = export_to(reader, event_filter)
        except ExportError as e:
            common.bad_input(str(e))
    size = "" if result["bytes"] is None else f", {result['bytes']} bytes"
    what = {"exits": "events", schema.MSG_COALESCED: "coalesced writes", schema.MSG_EMULATED: "emulated instructions"}
    typer.echo(f"vmtrace: wrote {result['events']} {what[table]} to {out} ({fmt}{size})", err=True)
