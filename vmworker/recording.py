"""A VM's side of recording: one publisher and batcher per vCPU, plus the lifecycle records."""

from __future__ import annotations

import os
import threading
import time

import zmq

from tracetool import messages
from tracetool.bus_credentials import Credential

from .errors import SpecError
from .event_batch import EventBatcher
from .publisher import EventPublisher

# How long a worker at its end waits for its vCPUs' queued batches to reach the recorder: four times the
# recorder's own finish deadline (supervisor/recorder.py FINISH_DEADLINE), so a recorder that is
# slow but alive takes them all; past it the recorder is taken to be stopped or dead.
DRAIN_BOUND = 20.0


def rerun_inputs(spec, image, machine) -> dict:
    """The vm-image record's fields: what `vmtrace rerun` needs besides the exits (vmworker/rerun.py).

    Read before any vCPU runs: the image file again (embedded unless --no-embed or too large; its
    sha256 must still be the loaded image's), vCPU 0's CPUID table and first registers."""
    from .image import read_image_file, sha256_hex
    from .machine import register_dump
    fields: dict = {"sha256": image.sha256, "path": os.path.abspath(spec.guest)}
    try:
        data = read_image_file(spec.guest)
    except Exception:  # the file went away since it was loaded: path and sha256 are all there is
        data = None
    if data is not None and sha256_hex(data) == image.sha256:
        fields["size"] = len(data)
        if not spec.embed:
            fields["not_embedded"] = "--no-embed"
        elif len(data) > messages.MAX_EMBEDDED_IMAGE:
            fields["not_embedded"] = f"over {messages.MAX_EMBEDDED_IMAGE} bytes"
        else:
            fields["image"] = data
    else:
        fields["not_embedded"] = "the image file changed after it was loaded"
    fields["cpuid"] = cpuid_table(machine.kvm)
    fields["registers"] = register_dump(machine.vm.vcpus[0])
    return fields


def cpuid_table(kvm) -> bytes:
    """vCPU 0's CPUID entries as Machine gives them (x86.cpuid_for_vcpu), packed kvm_cpuid_entry2s."""
    from .x86 import cpuid_for_vcpu
    table = cpuid_for_vcpu(kvm.supported_cpuid(), 0)
    return b"".join(bytes(e) for e in table.entries[:table.nent])


class Recording:
    def __init__(self, spec, image) -> None:
        self.spec = spec
        self.image = image
        record_filter = None
        if spec.record_only:
            from tracetool.filters import FilterError, parse_filter
            try:
                record_filter = parse_filter(spec.record_only)
            except FilterError as e:
                raise SpecError(f"--record-only: {e}") from None
        self.context = zmq.Context()
        # The vCPUs' sockets have a context of their own: ending it waits for their queued batches
        # alone (drain_batches), before the vm-end goes out on the VM-level socket.
        self.batch_context = zmq.Context()
        # What the supervisor gave this worker to prove its streams are its own.
        self.credential = Credential.from_env() or b""
        # The VM-level publisher (lifecycle records) and one per vCPU thread (event batches).
        self.control = self.publisher()
        self._control_lock = threading.Lock()
        self.publishers = [EventPublisher(self.batch_context, spec.bus_endpoint, credential=self.credential)
                           for _ in range(spec.vcpus)]
        self.undrained = False  # the vCPUs' queued batches did not all leave within DRAIN_BOUND
        self.batchers = [EventBatcher(p, spec.vm_id, i, spec.epoch, record_filter=record_filter)
                         for i, p in enumerate(self.publishers)]
        self.parent: dict | None = None  # restored from a snapshot: vm-start names it (continue_from)

    def continue_from(self, parent: dict, next_seq: list[int]) -> None:
        """A restored VM: its streams carry on the snapshot's sequence numbers."""
        self.parent = parent
        for batcher, seq in zip(self.batchers, next_seq):
            batcher.next_seq = seq

    def publisher(self, stopping=lambda: False) -> EventPublisher:
        """A PUSH socket to the recorder, sending with this worker's credential."""
        return EventPublisher(self.context, self.spec.bus_endpoint, stopping, credential=self.credential)

    def set_stopping_check(self, stopping) -> None:
        for p in (self.control, *self.publishers):
            p.stopping = stopping

    def lifecycle(self, event: str, **fields) -> None:
        """A lifecycle record from inside the worker (e.g. a gdb stop), from any thread."""
        self._record(messages.Lifecycle, event=event, name=self.spec.name, **fields)

    def kvm_stats(self, vcpu: int, t: int, values: dict, last: bool) -> None:
        """One sample of the kernel's counters (vmworker.kernel_counters), from the main thread."""
        message = messages.KvmStats(vm=self.spec.vm_id, epoch=self.spec.epoch, vcpu=vcpu, t=t, values=values,
                                    last=last or None)
        with self._control_lock:
            self.control.send(message.to_msg())

    def interrupt(self, **fields) -> None:
        """An interrupt a --deterministic vCPU was given (vmworker/deterministic.py), from its thread."""
        self._record(messages.Interrupt, vcpu=0, **fields)

    def insn_counts(self, first: int, counts: bytes) -> None:
        """A --deterministic vCPU's instruction counts at guest exits `first`, `first` + 1, … (deterministic.py)."""
        self._record(messages.InsnCounts, vcpu=0, first=first, counts=counts)

    def _record(self, kind, **fields) -> None:
        message = kind(vm=self.spec.vm_id, epoch=self.spec.epoch, t=time.monotonic_ns(), wall=time.time_ns(), **fields)
        with self._control_lock:  # a zmq socket is not thread-safe: the gdb stub's thread sends too
            self.control.send(message.to_msg())

    def start(self, machine=None) -> None:
        self._record(messages.VmStart, name=self.spec.name, spec=self.spec.to_json(), sha256=self.image.sha256,
                     mem_size=self.spec.mem, mode=self.image.mode, format=self.image.format,
                     vcpus=self.spec.vcpus, pid=os.getpid(), parent=self.parent)
        if machine is not None:
            self._record(messages.VmImage, **rerun_inputs(self.spec, self.image, machine))

    def drain_batches(self) -> bool:
        """Wait until every batch the vCPUs queued has left this process (bounded); whether they all did.

        vm-end goes out on another socket whose queue is usually empty: sent first, it reached a
        slow recorder while batches still sat in the vCPU sockets' queues, which the 5 s linger then
        discarded uncounted (issue 11). Ending the vCPUs' context waits for those queues only; ZeroMQ
        cannot say how much of a queue was left, so a drain that used the whole bound is reported."""
        if self.batch_context.closed:
            return not self.undrained
        for p in self.publishers:
            p.socket.setsockopt(zmq.LINGER, int(DRAIN_BOUND * 1000))
            p.close()
        started = time.monotonic()
        self.batch_context.term()
        self.undrained = time.monotonic() - started >= DRAIN_BOUND
        return not self.undrained

    def end(self, result: dict) -> dict:
        # The batches first, so that a vm-end that arrives proves they arrived before it.
        self.drain_batches()
        stats = {
            "final_seq": [b.next_seq for b in self.batchers],
            "filtered_out": sum(b.filtered_out for b in self.batchers),
            "dropped_batches": sum(p.dropped for p in self.publishers),
            "blocked_seconds": sum(p.blocked_seconds for p in self.publishers),
            "undrained": self.undrained or None,
        }
        self._record(messages.VmEnd, name=self.spec.name, status=result["status"],
                     guest_code=result.get("guest_code"), detail=result.get("detail", ""),
                     registers=result.get("registers"), exits=result.get("exits", 0), kicks=result.get("kicks", 0),
                     by_reason=result.get("by_reason", {}), unclaimed=result.get("unclaimed") or None, **stats)
        return stats

    def close(self) -> None:
        self.drain_batches()  # already done by end() when the VM ran to its end
        self.control.close()
        # Linger (bounded) so the lifecycle records reach the recorder before the process exits.
        self.context.term()
