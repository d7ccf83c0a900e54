"""A copy of a real trace with some records edited: how tests forge one field of a recording."""

from __future__ import annotations

from typing import Callable

from tracetool import schema
from tracetool.trace import TraceReader, TraceWriter


def copy_trace(trace: str, out, edit: Callable[[str, dict], dict]) -> str:
    """Copy `trace` to `out` block by block; every record passes through `edit(kind, record)`.
    Exit blocks are copied as they are; the index is rebuilt by the writer."""
    with TraceReader(trace) as reader, TraceWriter(out, reader.run) as writer:
        for block in reader.blocks():
            if block.batch is not None:
                b = block.batch
                cols = {k: v for k, v in b.columns.items() if k != schema.SEQ_COLUMN.name}
                writer.write_exits(b.vm, b.vcpu, b.epoch, b.first_seq, b.count, cols,
                                   seq=b.columns[schema.SEQ_COLUMN.name], payloads=b.payloads)
            elif block.kind != "index":
                writer.write_record(block.kind, edit(block.kind, block.record))
    return str(out)
