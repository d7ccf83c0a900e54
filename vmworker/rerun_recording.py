"""What a trace says about a VM to rerun: its spec, its image, whether it can be re-executed.

`open_recording` checks the trace (one line for the user, `RerunInputError`, when it cannot be
rerun); `image_file` finds the guest image bytes the recording ran (embedded in its vm-image
record, or the recorded path when its sha256 still matches); `RecordedBatch` is one recorded
block of exits as the rerun's loop reads it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tracetool import schema
from tracetool.trace import TraceError, TraceReader

from .errors import GuestImageError, VmsupError
from .image import read_image_file, sha256_hex
from .insn_counter import TRACE_HEADER_KEY
from .spec import VmSpec


class RerunInputError(VmsupError):
    """A trace that cannot be rerun (one line for the user, exit 2)."""


@dataclass
class Recording:
    """What the trace says about the VM to rerun."""

    reader: TraceReader
    vm: int
    epoch: int
    spec: VmSpec
    image_record: dict
    insn_exact: bool
    irqchip: bool | None = None


def open_recording(path: str, vm: int | None) -> Recording:
    try:
        reader = TraceReader(path)
    except TraceError as e:
        raise RerunInputError(str(e)) from None
    starts = reader.records(schema.MSG_VM_START)
    vms = sorted({s["vm"] for s in starts})
    if not vms:
        raise RerunInputError(f"{path}: no VM started in this trace")
    if vm is None:
        if len(vms) > 1:
            raise RerunInputError(f"{path} holds VMs {', '.join(map(str, vms))}: choose one with --vm")
        vm = vms[0]
    mine = [s for s in starts if s["vm"] == vm]
    if not mine:
        raise RerunInputError(f"{path}: no VM {vm} (VMs: {', '.join(map(str, vms))})")
    start = mine[0]  # the first run of the VM (epoch 0 unless the trace begins later)
    images = [r for r in reader.records(schema.MSG_VM_IMAGE) if r["vm"] == vm and r["epoch"] == start["epoch"]]
    if not images:
        raise RerunInputError(f"{path}: VM {vm} was recorded without a vm-image record (a vmsup before rerun)")
    try:
        spec = VmSpec.from_json(start.get("spec") or {})
    except (TypeError, ValueError) as e:
        raise RerunInputError(f"{path}: VM {vm}'s recorded spec does not read: {e}") from None
    if spec.vcpus != 1:
        raise RerunInputError(f"{path}: VM {vm} has {spec.vcpus} vCPUs; rerun re-executes one-vCPU VMs only")
    if spec.record_only:
        raise RerunInputError(f"{path}: VM {vm} was recorded with --record-only {spec.record_only}: "
                              "a rerun needs every exit")
    return Recording(reader, vm, start["epoch"], spec, images[0], bool(reader.run.get(TRACE_HEADER_KEY)))


def image_file(rec: Recording, scratch: str) -> str:
    """A file holding the recorded guest image: the embedded bytes, or the recorded path when its
    sha256 still matches."""
    record = rec.image_record
    want = record["sha256"]
    data = record.get("image")
    if data is not None:
        if sha256_hex(data) != want:
            raise RerunInputError(f"the embedded guest image is not the recorded one (sha256 {want})")
        path = os.path.join(scratch, os.path.basename(record.get("path") or "guest.bin"))
        with open(path, "wb") as f:
            f.write(data)
        return path
    path = record.get("path") or rec.spec.guest
    try:
        found = sha256_hex(read_image_file(path))
    except (OSError, GuestImageError):
        found = None
    if found != want:
        what = "is gone" if found is None else f"has changed (sha256 {found})"
        raise RerunInputError(f"guest image not embedded and {path} {what}: need the image with sha256 {want}")
    return path


class RecordedBatch:
    """One recorded EXITS block as Python lists (decoded once), and the rerun's rows for it."""

    def __init__(self, batch) -> None:
        cols = batch.columns
        self.batch = batch
        self.cols = cols
        self.seqs = cols[schema.SEQ_COLUMN.name].tolist()
        self.reasons, self.addrs, self.datas = cols["reason"].tolist(), cols["addr"].tolist(), cols["data"].tolist()
        self.sizes, self.counts, self.flags = cols["size"].tolist(), cols["count"].tolist(), cols["flags"].tolist()
        self.rips, self.guest_ns = cols["rip"].tolist(), cols["guest_ns"].tolist()
        self.payloads = batch.payloads
        self.out = {name: [] for name in schema.COLUMN_NAMES}
        self.out_seq: list[int] = []
        self.out_payloads: list = []
