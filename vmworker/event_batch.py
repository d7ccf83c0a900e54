"""Per-vCPU event rows, packed on the hot path and flushed as columnar batches.

The vCPU loop packs one fixed-size row per exit into a preallocated bytearray (one
`struct.pack_into`, no per-exit objects); `flush` turns the rows into columns with numpy,
applies the record-time filter, and sends one batch (messages.ExitBatch).
"""

from __future__ import annotations

import struct

from tracetool import messages, schema

ROW = struct.Struct(schema.ROW_STRUCT_FORMAT)
DEFAULT_BATCH_EVENTS = 4096
DEFAULT_FLUSH_NS = 50_000_000  # a live viewer sees an exit at most ~50 ms after it happened


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
        # monotonic ns of the oldest unflushed row (0 = none): a vCPU that sits in KVM_RUN with
        # rows pending is kicked by the machine so live viewers are not kept waiting.
        self.pending_since = 0

    def add_payload(self, pos: int, data: bytes) -> None:
        # Bounded so a batch stays within the bus's message size (messages.BUS).
        if len(self.payloads) < schema.MAX_PAYLOADS and self.payload_bytes + len(data) <= messages.MAX_PAYLOAD_BYTES:
            self.payloads.append([pos // ROW.size, bytes(data)])
            self.payload_bytes += len(data)

    def flush(self, pos: int) -> None:
        """Send rows [0, pos) as one batch; the caller resets its write position to 0."""
        n = pos // ROW.size
        self.pending_since = 0
        if n == 0:
            return
        cols = schema.columns_from_rows(memoryview(self.rows)[:pos], n)
        payloads = self.payloads
        if self.filter is not None:
            import numpy as np  # only filtered recording pays for numpy in the worker
            arrays = {name: np.frombuffer(raw, dtype=schema.column_dtypes()[name]) for name, raw in cols.items()}
            keep = self.filter.mask(arrays, vm=self.vm, vcpu=self.vcpu, epoch=self.epoch)
            if not keep.all():
                index = np.flatnonzero(keep)
                self.filtered_out += n - len(index)
                cols = {name: arrays[name][index].tobytes() for name in cols}
                cols["seq"] = (index.astype(np.uint64) + np.uint64(self.next_seq)).tobytes()
                remap = {int(old): new for new, old in enumerate(index)}
                payloads = [[remap[i], data] for i, data in payloads if i in remap]
        batch = messages.ExitBatch(vm=self.vm, vcpu=self.vcpu, epoch=self.epoch, first_seq=self.next_seq, count=n,
                                   cols=cols, payloads=payloads or messages.ABSENT)
        self.payloads = []
        self.payload_bytes = 0
        self.next_seq += n
        self.publisher.send(batch.to_msg())
