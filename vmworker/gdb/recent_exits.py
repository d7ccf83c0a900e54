"""`monitor exits [N]`: the VM's last N exits, as gdb sees them (with the guest's address).

Each vCPU's batcher keeps its last rows after flushing them (vmworker/event_batch.py, `recent`);
a vCPU that gdb stops flushes before it parks, so while gdb looks, they are all there. Rows are
the trace's own (tracetool/schema.py) and are described the way `vmtrace show` does.
"""

from __future__ import annotations

import struct

from tracetool import schema

DEFAULT_EXITS = 10
MAX_EXITS = 256  # event_batch.RECENT_EXITS per vCPU


def recent_exit_lines(batchers, n: int) -> list[str]:
    """The last `n` exits of every vCPU together, oldest first, one line each."""
    row = struct.Struct(schema.ROW_STRUCT_FORMAT)
    names = schema.COLUMN_NAMES
    exits = []
    for vcpu, batcher in enumerate(batchers):
        if batcher is None:
            continue
        rows = batcher.recent
        count = len(rows) // row.size
        for i in range(count):
            fields = dict(zip(names, row.unpack_from(rows, i * row.size)))
            exits.append((fields["t_exit"], vcpu, batcher.recent_seq - count + i, fields))
    exits.sort(key=lambda e: (e[0], e[1]))
    lines = []
    for _, vcpu, seq, f in exits[-n:] if n else []:
        data = f["data"] if isinstance(f["data"], int) else int.from_bytes(f["data"][:8], "little")
        what = schema.describe_exit(f["reason"], f["flags"], f["addr"], f["size"], data, f["count"])
        rip = f.get("rip")
        where = f" rip={rip:#x}" if isinstance(rip, int) and rip != schema.RIP_UNKNOWN else ""
        lines.append(f"vcpu {vcpu} seq={seq} {what}{where}")
    return lines
