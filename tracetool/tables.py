"""A trace as Arrow tables: what `vmtrace sql` queries and the Parquet export writes.

`exits`: one row per exit event, the columns of schema.EXPORT_COLUMNS (the CSV export's names),
typed: reason a dictionary-encoded string, write a boolean, handle_ns null where unknown and every
column an older trace lacked null. Built block by block from the decoded numpy columns: numpy
arrays go to Arrow as they are (no Python object per event).

`records`: one row per record (vm-start, vm-end, gap, lifecycle, input, screen, …): its kind, the
fields most records share (t, vm, vcpu, epoch, name, event, status) and the whole record as JSON.
`vms`: one row per VM and epoch, from its vm-start and vm-end records and the trace's streams.
`kvm_stats`: the kernel's KVM counters sampled into the trace, one row per sample and counter.
`coalesced`, `emulated`: coalesced writes and emulated instructions, one row each (tracetool.side_rows).

Every table can carry a `trace` column (which file a row came from) so several traces query as one.
Needs pyarrow (the `parquet` and `sql` extras).
"""

from __future__ import annotations

import json
from typing import Iterator

import numpy as np
import pyarrow as pa

from . import analysis, exit_rows, schema
from .handling import NO_HANDLE
from .trace import TraceReader

TRACE_COLUMN = "trace"

_REASON_NAMES = pa.array([schema.reason_name(code) for code in range(256)], pa.string())
_PLACES = tuple(f.name for f in schema.PLACE_FIELDS)
_TRACE_TYPE = pa.dictionary(pa.int32(), pa.string())
_EXIT_TYPES = {"t_exit_ns": pa.int64(), "handle_ns": pa.int64(), "reason": pa.dictionary(pa.uint8(), pa.string()),
               "reason_code": pa.uint8(), "write": pa.bool_(),
               **{f.name: pa.dictionary(pa.int32(), pa.string()) for f in schema.PLACE_FIELDS},
               **{name: pa.uint32() for name in schema.STREAM_COLUMNS}}


def exit_schema(*, with_trace: bool = False, metadata: dict | None = None) -> pa.Schema:
    """The Arrow schema of the exits table (schema.EXPORT_COLUMNS, typed)."""
    fields = [(name, _EXIT_TYPES.get(name) or pa.from_numpy_dtype(schema.column_dtypes()[name]))
              for name in schema.EXPORT_COLUMNS]
    if with_trace:
        fields.insert(0, (TRACE_COLUMN, _TRACE_TYPE))
    return pa.schema(fields, metadata=metadata)


def _exit_array(c: dict[str, np.ndarray], name: str) -> pa.Array:
    """One export column of a chunk of events (analysis.events_in_time_order's columns)."""
    if name == "t_exit_ns":
        return pa.array(c["t_exit"])
    if name == "handle_ns":
        return pa.array(c["handle_ns"], mask=c["handle_ns"] == NO_HANDLE)
    if name == "reason":
        return pa.DictionaryArray.from_arrays(pa.array(c["reason"]), _REASON_NAMES)
    if name == "reason_code":
        return pa.array(c["reason"])
    if name == "write":
        return pa.array((c["flags"] & schema.FLAG_WRITE).astype(bool))
    if name in _PLACES:  # exit_rows.Labels, or null without symbols
        labels = c.get(name)
        if labels is None:
            return pa.DictionaryArray.from_arrays(pa.array(np.zeros(len(c["t_exit"]), np.int32),
                                                           mask=np.ones(len(c["t_exit"]), bool)), pa.array([], pa.string()))
        return pa.DictionaryArray.from_arrays(pa.array(labels.codes, mask=labels.codes == 0),
                                              pa.array(["", *labels.texts[1:]], pa.string()))
    return pa.array(c[name], mask=exit_rows.missing_mask(c, name))


def _trace_array(label: str, n: int) -> pa.Array:
    return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int32)), pa.array([label], pa.string()))


def exit_batch(c: dict[str, np.ndarray], arrow_schema: pa.Schema, trace: str | None = None) -> pa.RecordBatch:
    """A chunk of events as one Arrow record batch of `arrow_schema` (exit_schema's)."""
    arrays = [_exit_array(c, name) for name in schema.EXPORT_COLUMNS]
    if trace is not None:
        arrays.insert(0, _trace_array(trace, len(c["t_exit"])))
    return pa.RecordBatch.from_arrays(arrays, schema=arrow_schema)


def exit_batches(reader: TraceReader, trace: str | None = None, where=None,
                 symbols: dict | None = None) -> Iterator[pa.RecordBatch]:
    """Every (matching) event of the trace in time order, as record batches; `symbols`:
    {vm: SymbolTable | None} naming each rip (symbol and line; None: null)."""
    arrow_schema = exit_schema(with_trace=trace is not None)
    for c in analysis.events_in_time_order(reader, where):
        if symbols is not None:
            exit_rows.add_places(c, symbols)
        yield exit_batch(c, arrow_schema, trace)


def exits_table(reader: TraceReader, trace: str | None = None, symbols: dict | None = None) -> pa.Table:
    return pa.Table.from_batches(list(exit_batches(reader, trace, symbols=symbols)),
                                 schema=exit_schema(with_trace=trace is not None))


# --- records and VMs (a few per VM: built row by row) ------------------------------------------
def _int_or_none(value) -> int | None:
    return value if type(value) is int and -(1 << 63) <= value < 1 << 63 else None


def _str_or_none(value) -> str | None:
    return value if isinstance(value, str) else None


def _json_value(value):
    if isinstance(value, (bytes, bytearray)):
        return value.hex()
    return str(value)


_RECORD_FIELDS = (("kind", pa.string()), ("t", pa.int64()), ("vm", pa.int64()), ("vcpu", pa.int64()),
                  ("epoch", pa.int64()), ("name", pa.string()), ("event", pa.string()),
                  ("status", pa.string()), ("json", pa.string()))


def records_table(reader: TraceReader, trace: str | None = None) -> pa.Table:
    """One row per record: kind, t, vm, vcpu, epoch, name, event, status (null where the record has
    none) and the record as JSON (bytes as hex) for everything else."""
    rows = {name: [] for name, _ in _RECORD_FIELDS}
    for rec in reader.records():
        rows["kind"].append(_str_or_none(rec.get("type")))
        for name in ("t", "vm", "vcpu", "epoch"):
            rows[name].append(_int_or_none(rec.get(name)))
        for name in ("name", "event", "status"):
            rows[name].append(_str_or_none(rec.get(name)))
        rows["json"].append(json.dumps(rec, default=_json_value, separators=(",", ":")))
    return _with_trace(pa.table({name: pa.array(rows[name], t) for name, t in _RECORD_FIELDS}), trace)


_VM_FIELDS = (("vm", pa.int64()), ("epoch", pa.int64()), ("name", pa.string()), ("guest", pa.string()),
              ("sha256", pa.string()), ("mode", pa.string()), ("vcpus", pa.int64()), ("status", pa.string()),
              ("detail", pa.string()), ("exits", pa.int64()), ("events_in_trace", pa.int64()),
              ("started_ns", pa.int64()), ("ended_ns", pa.int64()))


def vms_table(reader: TraceReader, trace: str | None = None) -> pa.Table:
    """One row per (vm, epoch): name, guest image, sha256, status and exits (from its vm-end: the
    worker's count), events_in_trace (what the trace holds of it), start and end times."""
    vms: dict[tuple, dict] = {}
    for rec in reader.records(schema.MSG_VM_START):
        spec = rec.get("spec") if isinstance(rec.get("spec"), dict) else {}
        vms.setdefault((_int_or_none(rec.get("vm")), _int_or_none(rec.get("epoch"))), {}).update(
            name=_str_or_none(rec.get("name")), guest=_str_or_none(spec.get("guest")),
            sha256=_str_or_none(rec.get("sha256")), mode=_str_or_none(rec.get("mode")),
            vcpus=_int_or_none(rec.get("vcpus")), started_ns=_int_or_none(rec.get("t")))
    for rec in reader.records(schema.MSG_VM_END):
        entry = vms.setdefault((_int_or_none(rec.get("vm")), _int_or_none(rec.get("epoch"))), {})
        entry.update(status=_str_or_none(rec.get("status")), detail=_str_or_none(rec.get("detail")),
                     exits=_int_or_none(rec.get("exits")), ended_ns=_int_or_none(rec.get("t")))
        if entry.get("name") is None:
            entry["name"] = _str_or_none(rec.get("name"))
    in_trace: dict[tuple, int] = {}
    for s in reader.streams():
        in_trace[(s.vm, s.epoch)] = in_trace.get((s.vm, s.epoch), 0) + s.events
        vms.setdefault((s.vm, s.epoch), {})
    keys = sorted(vms, key=lambda k: tuple(-1 if x is None else x for x in k))
    columns = {"vm": [k[0] for k in keys], "epoch": [k[1] for k in keys],
               "events_in_trace": [in_trace.get(k, 0) for k in keys]}
    for name, _ in _VM_FIELDS:
        columns.setdefault(name, [vms[k].get(name) for k in keys])
    return _with_trace(pa.table({name: pa.array(columns[name], t) for name, t in _VM_FIELDS}), trace)


def kvm_stats_table(reader: TraceReader, trace: str | None = None) -> pa.Table:
    """The kernel's KVM counters (tracetool.kvm_counters): one row per sample and counter, every
    counter carried forward (vm, epoch, vcpu, t, name, value); vcpu -1 is the VM's own."""
    from . import kvm_counters
    columns: dict[str, list] = {"vm": [], "epoch": [], "vcpu": [], "t": [], "name": [], "value": []}
    for (vm, epoch, vcpu), stream in sorted(kvm_counters.from_trace(reader).by_key.items()):
        for t, values in zip(stream.times, stream.values):
            for name, value in values.items():
                for key, v in zip(columns, (vm, epoch, vcpu, t, name, value)):
                    columns[key].append(v)
    types = {"vm": pa.int64(), "epoch": pa.int64(), "vcpu": pa.int64(), "t": pa.int64(), "name": pa.string(),
             "value": pa.uint64()}
    return _with_trace(pa.table({k: pa.array(v, types[k]) for k, v in columns.items()}), trace)


def _with_trace(table: pa.Table, trace: str | None) -> pa.Table:
    if trace is None:
        return table
    return table.add_column(0, pa.field(TRACE_COLUMN, _TRACE_TYPE), _trace_array(trace, table.num_rows))


def side_table(kind: str, reader: TraceReader, trace: str | None = None, where=None) -> pa.Table:
    """Coalesced writes or emulated instructions (tracetool.side_rows: its fields, typed)."""
    from . import side_rows
    dtypes = side_rows.integer_dtypes(kind)
    values = side_rows.value_columns(kind, side_rows.columns(reader, kind, where))
    return _with_trace(pa.table({name: pa.array(v, pa.string() if name in side_rows.TEXT_FIELDS
                                                 else pa.from_numpy_dtype(dtypes[name]))
                                 for name, v in values.items()}), trace)


def coalesced_table(reader: TraceReader, trace: str | None = None) -> pa.Table:
    return side_table(schema.MSG_COALESCED, reader, trace)


def emulated_table(reader: TraceReader, trace: str | None = None) -> pa.Table:
    return side_table(schema.MSG_EMULATED, reader, trace)


# Table name → how to build it from one trace.
BUILDERS = {"exits": exits_table, "records": records_table, "vms": vms_table, "kvm_stats": kvm_stats_table,
            "coalesced": coalesced_table, "emulated": emulated_table}


# --- A Hive-partitioned Parquet dataset (vmtrace export --partition-by) --------------------------
def write_partitioned(reader: TraceReader, out_dir: str, keys: list[str], where=None, metadata: dict | None = None,
                      progress=None, symbols: dict | None = None) -> int:
    """Write the exits as a Hive-partitioned Parquet dataset split by `keys` (of
    schema.STREAM_COLUMNS): out_dir/vm=0/epoch=0/part-0.parquet, the partition columns in the
    directory names only, as DuckDB and Spark expect. Whole or not
    at all: written beside out_dir and renamed into place; an existing non-empty out_dir is refused
    (OSError). Returns the number of events."""
    import os
    import shutil
    import tempfile

    import pyarrow.dataset as ds

    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir}: exists and is not empty")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"{out_dir}: exists and is not a directory")
    arrow_schema = exit_schema(metadata=metadata)
    total = 0

    def batches():
        nonlocal total
        for c in analysis.events_with_places(reader, where, symbols):
            batch = exit_batch(c, arrow_schema)
            total += batch.num_rows
            if progress is not None:
                progress(batch.num_rows)
            yield batch

    parent = os.path.dirname(os.path.abspath(out_dir))
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.part-", dir=parent)
    try:
        ds.write_dataset(pa.RecordBatchReader.from_batches(arrow_schema, batches()), tmp, format="parquet",
                         partitioning=ds.partitioning(pa.schema([arrow_schema.field(k) for k in keys]), flavor="hive"),
                         file_options=ds.ParquetFileFormat().make_write_options(compression="zstd"),
                         basename_template="part-{i}.parquet", existing_data_behavior="overwrite_or_ignore")
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above)
        os.rename(tmp, out_dir)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return total
