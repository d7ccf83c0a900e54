"""Per-vCPU event rows, packed on the hot path and flushed as columnar batches.

The vCPU loop packs one fixed-size row per exit into a preallocated bytearray (one
`struct.pack_into`, no per-exit objects); `flush` turns the rows into columns, applies the
record-time filter (with numpy; the kept exits carry their handling time), and sends one batch
(messages.ExitBatch).
"""

from __future__ import annotations

import struct

from tracetool import messages, schema, wire_limits

ROW = struct.Struct(schema.ROW_STRUCT_FORMAT)
COALESCED_ENTRY_SIZE = 24  # sizeof(struct kvm_coalesced_mmio), linux/kvm.h (vmworker/coalesce.py checks it)
DEFAULT_BATCH_EVENTS = 4096
DEFAULT_FLUSH_NS = 50_000_000
EMULATED_FAMILY_CODE = {name: code for code, name in enumerate(schema.EMULATED_FAMILIES)}
RECENT_EXITS = 256  # rows each vCPU keeps after flushing them, for gdb's `monitor exits`  # a live viewer sees an exit at most ~50 ms after it happened


class EventBatcher:
    def __init__(self, publisher, vm: int, vcpu: int, epoch: int, *, record_filter=None,
                 batch_events: int = DEFAULT_BATCH_EVENTS, flush_ns: int = DEFAULT_FLUSH_NS) -> None:
        self.publisher = publisher
        self.vm, self.vcpu, self.epoch = vm, vcpu, epoch
        self.filter = record_filter
        self.rows = bytearray(ROW.size * batch_events)
        self.flush_ns = flush_ns
        self.next_seq = 0  # sequence number of the first row not yet flushed
        self.payloads: list[list] = []  # [row index, bytes] for string I/O with count > 1
        self.payload_bytes = 0
        self.filtered_out = 0
        # A record-time filter's last row, waiting for the next flush (see flush), and its payload.
        self.held = b""
        self.held_payloads: list[list] = []
        # monotonic ns of the oldest unflushed row (0 = none): a vCPU that sits in KVM_RUN with
        # rows pending is kicked by the machine so live viewers are not kept waiting.
        self.pending_since = 0
        # Writes drained from KVM's coalesced ring (vmworker/coalesce.py) since the last flush: the
        # raw 24-byte entries, and per drain (exit seq, entries, t_after, t_before). `drain(pos)`,
        # set by the machine with --coalesce, empties the VM's ring into them at every flush.
        self.coalesced = bytearray()
        self.drains: list[tuple[int, int, int, int]] = []
        self.drain = None
        # Instructions the fallback emulator performed (vmworker/emulate/) since the last flush, as
        # rows of schema.EMULATED_COLUMNS: sent as messages.EmulatedInstructions before the exits.
        self.emulated: list[tuple[int, int, int, int, bytes]] = []
        self.recent = b""  # the last RECENT_EXITS rows flushed, for gdb's `monitor exits`
        self.recent_seq = 0  # the sequence number after them

    def seq_at(self, pos: int) -> int:
        """The sequence number the row at `pos` of the buffer has (or will have)."""
        return self.next_seq + (len(self.held) + pos) // ROW.size

    def add_coalesced(self, raw: bytes, pos: int, t_after: int, t_before: int) -> None:
        """Entries one drain found, linked to the exit at row position `pos` (not yet packed)."""
        n = len(raw) // COALESCED_ENTRY_SIZE
        self.coalesced += raw
        self.drains.append((self.seq_at(pos), n, t_after, t_before))
        if len(self.coalesced) >= schema.MAX_COALESCED_ROWS * COALESCED_ENTRY_SIZE // 2:
            self._send_coalesced()

    def add_emulated(self, pos: int, performed) -> None:
        """Instructions (emulate.Performed) the fallback performed while handling the exit at row
        position `pos` (not yet packed): rare, so plain tuples."""
        seq = self.seq_at(pos)
        for p in performed:
            self.emulated.append((seq, p.address, len(p.raw), EMULATED_FAMILY_CODE[p.family], p.raw))
        if len(self.emulated) >= schema.MAX_EMULATED_ROWS:
            self._send_emulated()

    def _send_emulated(self) -> None:
        rows, self.emulated = self.emulated, []
        for start in range(0, len(rows), schema.MAX_EMULATED_ROWS):
            chunk = rows[start:start + schema.MAX_EMULATED_ROWS]
            cols = {c.name: b"".join(struct.pack("<" + c.code, row[i]) for row in chunk)
                    for i, c in enumerate(schema.EMULATED_COLUMNS)}
            message = messages.EmulatedInstructions(vm=self.vm, vcpu=self.vcpu, epoch=self.epoch, count=len(chunk),
                                                    cols=cols)
            self.publisher.send(message.to_msg())

    def _send_coalesced(self) -> None:
        """The drained entries as messages.CoalescedWrites records (columns cut in C, no numpy)."""
        raw, drains = self.coalesced, self.drains
        self.coalesced, self.drains = bytearray(), []
        step = schema.MAX_COALESCED_ROWS * COALESCED_ENTRY_SIZE
        per_drain = [(struct.pack("<Q", seq) * n, struct.pack("<q", lo) * n, struct.pack("<q", hi) * n)
                     for seq, n, lo, hi in drains]
        link = [b"".join(d[i] for d in per_drain) for i in range(3)]
        for start in range(0, len(raw), step):
            chunk = memoryview(raw)[start:start + step]
            n = len(chunk) // COALESCED_ENTRY_SIZE
            q, w = chunk.cast("Q"), chunk.cast("I")  # kvm_coalesced_mmio: u64 phys_addr, u32 len, u32 pio, u8 data[8]
            first = start // COALESCED_ENTRY_SIZE
            cols = {"addr": q[0::3].tobytes(), "data": q[2::3].tobytes(), "size": w[2::6].tobytes(),
                    "pio": w[3::6].tobytes(), "exit_seq": link[0][first * 8:(first + n) * 8],
                    "t_after": link[1][first * 8:(first + n) * 8], "t_before": link[2][first * 8:(first + n) * 8]}
            message = messages.CoalescedWrites(vm=self.vm, vcpu=self.vcpu, epoch=self.epoch, count=n, cols=cols)
            self.publisher.send(message.to_msg())

    def add_payload(self, pos: int, data: bytes) -> None:
        # Bounded so a batch stays within the bus's message size (wire_limits.BUS).
        if len(self.payloads) < schema.MAX_PAYLOADS and self.payload_bytes + len(data) <= wire_limits.MAX_PAYLOAD_BYTES:
            self.payloads.append([pos // ROW.size, bytes(data)])
            self.payload_bytes += len(data)

    def flush(self, pos: int, *, final: bool = False) -> None:
        """Send rows [0, pos) as one batch; the caller resets its write position to 0.

        With a record-time filter the last row waits for the next flush (`final`: the stream's
        end, nothing waits): its handling time needs the next exit's entry time, which only the
        next row holds — and that row may be filtered out."""
        n = pos // ROW.size
        self.pending_since = 0
        if n:
            self._keep_recent(memoryview(self.rows)[:pos], n)
        if self.drain is not None:
            self.drain(pos)  # what other vCPUs queued meanwhile; linked to this stream's next exit
        if self.coalesced:  # before the exits they precede
            self._send_coalesced()
        if self.emulated:  # before the exits they belong to
            self._send_emulated()
        if self.filter is not None:
            self._flush_filtered(bytes(self.rows[:pos]), final)
            return
        if n == 0:
            return
        cols = schema.columns_from_rows(memoryview(self.rows)[:pos], n)
        payloads, self.payloads, self.payload_bytes = self.payloads, [], 0
        self._send(n, cols, payloads)

    def _keep_recent(self, rows, n: int) -> None:
        """Keep the last RECENT_EXITS rows, every exit (a record-time filter's too), for gdb's
        `monitor exits` (vmworker/gdb/recent_exits.py)."""
        self.recent = (self.recent + bytes(rows))[-RECENT_EXITS * ROW.size:]
        self.recent_seq += n

    def _flush_filtered(self, rows: bytes, final: bool) -> None:
        """Send the rows the filter keeps, each with its handling time (schema.HANDLE_COLUMN)."""
        import numpy as np  # only filtered recording pays for numpy in the worker

        from tracetool.handling import NO_HANDLE
        held = len(self.held) // ROW.size
        rows = self.held + rows
        payloads = self.held_payloads + [[i + held, data] for i, data in self.payloads]
        m = len(rows) // ROW.size
        send = m if final else max(m - 1, 0)
        self.held = rows[send * ROW.size:]
        self.held_payloads = [[i - send, data] for i, data in payloads if i >= send]
        self.payloads, self.payload_bytes = [], sum(len(d) for _, d in self.held_payloads)
        if send == 0:
            return
        dtypes = schema.column_dtypes()
        arrays = {name: np.frombuffer(raw, dtype=dtypes[name]) for name, raw in schema.columns_from_rows(rows, m).items()}
        t, g = arrays["t_exit"], arrays["guest_ns"]
        handle = np.full(m, NO_HANDLE, np.int64)
        handle[:-1] = (t[1:] - g[1:]) - t[:-1]  # tracetool/handling.py's formula, from the next row
        arrays = {name: col[:send] for name, col in arrays.items()}
        keep = self.filter.mask(arrays, vm=self.vm, vcpu=self.vcpu, epoch=self.epoch)
        index = np.flatnonzero(keep)
        self.filtered_out += send - len(index)
        cols = {name: col[index].tobytes() for name, col in arrays.items()}
        cols[schema.SEQ_COLUMN.name] = (index.astype(np.uint64) + np.uint64(self.next_seq)).tobytes()
        cols[schema.HANDLE_COLUMN.name] = handle[index].tobytes()
        remap = {int(old): new for new, old in enumerate(index)}
        self._send(send, cols, [[remap[i], data] for i, data in payloads if i in remap])

    def _send(self, count: int, cols: dict, payloads: list) -> None:
        batch = messages.ExitBatch(vm=self.vm, vcpu=self.vcpu, epoch=self.epoch, first_seq=self.next_seq, count=count,
                                   cols=cols, payloads=payloads or None)
        self.next_seq += count
        self.publisher.send(batch.to_msg())
