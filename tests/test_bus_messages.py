"""Bus messages: one class per message checks its fields; the recorder writes nothing unchecked,
counts what it refuses, and no sender can make it hold more than a bounded amount of memory.

The run tests push forged and oversized messages to the real events socket of a real run (real
VM, real recorder process) and read the real trace afterwards.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from supervisor.commands import RecorderClient
from supervisor.runtime import RunDir
from tests.conftest import REPO, VMSUP
from tracetool import messages, schema
from tracetool.screen import encode_cells
from tracetool.step_schema import REGISTERS
from tracetool.trace import TraceReader, TraceWriter

DEADLINE = 60.0
_COLS = schema.columns_from_rows(b"\0" * schema.ROW_SIZE, 1)

# One step: `inc %ax` at 0x10004 in 16-bit mode, changing rax and rip (tracetool/step_schema.py).
_STEP_COLS = {"t": (5).to_bytes(8, "little"), "addr": (0x10004).to_bytes(8, "little"), "bits": bytes([16]),
              "insn": b"\x40" + bytes(14), "changed": (1 | 1 << REGISTERS.index("rip")).to_bytes(4, "little"),
              "values": (1).to_bytes(8, "little") + (5).to_bytes(8, "little")}

# One valid example of every message, as its sender builds it.
EXAMPLES = {
    messages.ExitBatch: messages.ExitBatch(vm=0, vcpu=0, epoch=0, first_seq=7, count=1, cols=_COLS,
                                           payloads=[[0, b"abc"]]),
    messages.VmStart: messages.VmStart(vm=1, epoch=2, name="seed16", spec={"mem": 1}, sha256="0" * 64,
                                       mem_size=1 << 24, mode="real", format="flat", vcpus=2, pid=1, t=5, wall=6),
    messages.VmEnd: messages.VmEnd(vm=1, epoch=2, name="seed16", status="halted", guest_code=None, detail="",
                                   registers={"rip": 1}, exits=3, kicks=0, by_reason={"io": 3}, final_seq=[3, 0],
                                   filtered_out=0, dropped_batches=0, blocked_seconds=0.5, t=9, wall=10),
    messages.Gap: messages.Gap(vm=0, vcpu=1, epoch=0, first_missing=5, count=2, cause="test", count_known=True),
    messages.Lifecycle: messages.Lifecycle(vm=0, epoch=0, event="exit", name="x", pid=3, status="halted", code=0,
                                           detail="", no_record=False, t=1, wall=2),
    messages.Screen: messages.Screen(vm=0, epoch=0, t=1, cursor=[2, 3], cells=encode_cells(bytes(4000))),
    messages.Input: messages.Input(vm=0, epoch=0, t=1, key="a", scancodes=b"\x1e\x9e"),
    messages.KvmStats: messages.KvmStats(vm=0, epoch=0, vcpu=-1, t=1, values={"exits": 12, "halt_exits": 3}, last=True),
    messages.Refused: messages.Refused(causes={"no credential": 2, "exits for a stream the sender does not own": 1},
                                       total=3, t=1, wall=2),
    messages.StepBatch: messages.StepBatch(vm=0, vcpu=0, epoch=0, first_seq=0, count=1, cols=_STEP_COLS,
                                           initial=[0] * len(REGISTERS), last=True, insn_emulation=1),
    messages.Interrupt: messages.Interrupt(vm=0, vcpu=0, epoch=0, at=10, clock="insns", rip=0x1000, vector=0x20, t=1),
    messages.InsnCounts: messages.InsnCounts(vm=0, vcpu=0, epoch=0, first=4, counts=(12).to_bytes(8, "little") * 2, t=1),
    messages.VmImage: messages.VmImage(vm=0, epoch=0, sha256="ab" * 32, path="/g.bin", size=3, image=b"\xf4\x90\x90",
                                       cpuid=b"", registers={"rip": 0}, t=1),
    messages.CoalescedWrites: messages.CoalescedWrites(vm=0, vcpu=0, epoch=0, count=1, cols={
        c.name: bytes(c.itemsize) for c in schema.COALESCED_COLUMNS}),
    messages.EmulatedInstructions: messages.EmulatedInstructions(vm=0, vcpu=0, epoch=0, count=1, cols={
        c.name: bytes(c.itemsize) for c in schema.EMULATED_COLUMNS}),
}
# A value of the wrong kind for each sort of check.
WRONG = {messages.Int: "zz", messages.Number: "zz", messages.Str: 5, messages.Bytes: "zz", messages.Map: [1],
         messages.Bool: 1, messages.PerVcpu: "zz", messages.Cursor: [99, 99], messages.Equals: 132,
         messages._Check: None}


def test_every_message_type_has_one_class_and_an_example():
    assert set(messages.MESSAGE_CLASSES) == set(schema.MESSAGE_TYPES)
    assert set(EXAMPLES) == set(messages.MESSAGE_CLASSES.values())


@pytest.mark.parametrize("cls", list(EXAMPLES), ids=lambda c: c.TYPE)
def test_a_message_comes_back_from_the_wire_as_it_was_sent(cls):
    sent = EXAMPLES[cls]
    got = messages.unpack(messages.pack(sent))
    assert type(got) is cls
    assert got.to_msg() == sent.to_msg()


@pytest.mark.parametrize("cls", list(EXAMPLES), ids=lambda c: c.TYPE)
def test_every_field_refuses_a_value_of_the_wrong_kind(cls):
    wire = EXAMPLES[cls].to_msg()
    for f in dataclasses.fields(cls):
        check = f.metadata["check"]
        bad = WRONG[type(check)]
        if bad is None:
            continue
        with pytest.raises(messages.MessageError, match=re.escape(cls.TYPE)):
            messages.decode({**wire, f.name: bad})
        if check.required:
            with pytest.raises(messages.MessageError, match="missing"):
                messages.decode({k: v for k, v in wire.items() if k != f.name})


def test_a_message_carries_exactly_the_fields_its_sender_gave():
    # The wire stays as it was before the classes: an explicit None is sent, a field not given is not.
    sent = messages.Lifecycle(vm=0, epoch=1, event="exit", code=None, signal=9)
    assert sent.to_msg() == {"v": schema.SCHEMA_VERSION, "type": "lifecycle", "vm": 0, "epoch": 1, "event": "exit",
                             "code": None, "signal": 9}
    assert sent.pid is None and messages.decode(sent.to_msg()).to_msg() == sent.to_msg()


def test_the_trace_writer_refuses_every_record_its_class_refuses(tmp_path):
    with TraceWriter(tmp_path / "w.vmtrace", {}) as w:
        for cls, example in EXAMPLES.items():
            if cls is messages.ExitBatch:
                continue
            w.write_record(cls.TYPE, example.to_msg())
            field = "epoch" if "epoch" in example.to_msg() else "total"  # refused records name no stream
            with pytest.raises(ValueError, match=f"{cls.TYPE} record needs"):
                w.write_record(cls.TYPE, {**example.to_msg(), field: "zz"})
        with pytest.raises(ValueError, match="final_seq"):
            w.write_record(schema.MSG_VM_END, {"vm": 0, "epoch": 0, "final_seq": "zz"})
    with TraceReader(tmp_path / "w.vmtrace") as r:
        # Step batches are stored like records but read on demand (reader.step_batches), not as records.
        assert [rec["type"] for rec in r.records()] == [cls.TYPE for cls in EXAMPLES
                                                        if cls not in (messages.ExitBatch, messages.StepBatch)]
        assert [b.to_msg() for b in r.step_batches()] == [EXAMPLES[messages.StepBatch].to_msg()]


def test_bytes_beyond_the_bus_limit_are_refused_before_unpacking():
    with pytest.raises(messages.MessageError, match="more than"):
        messages.unpack(b"\0" * (messages.BUS.max_bytes + 1))


def test_every_socket_that_takes_bytes_is_bounded_by_a_wire_limit():
    # One definition of the bounds (tracetool/wire_limits.py): no module sets ZMQ_MAXMSGSIZE itself,
    # and every module that opens a receiving socket applies a WireLimits to it.
    for path in [*REPO.glob("supervisor/*.py"), *REPO.glob("vmworker/*.py"), *REPO.glob("tracetool/*.py")]:
        text = path.read_text()
        if path.name != "wire_limits.py":
            assert "zmq.MAXMSGSIZE" not in text, f"{path.name} sets ZMQ_MAXMSGSIZE outside tracetool/wire_limits.py"
        receiving = re.findall(r"socket\((?:zmq\.)?(PULL|SUB|REP)\)", text)
        if receiving:
            assert ".apply(" in text, f"{path.name} opens a {receiving[0]} socket without a WireLimits"


# --- a real run ------------------------------------------------------------------------------------
class Run:
    """A real `vmsup launch seed16` with a trace, its run dir, and a PUSH socket to its events.sock."""

    def __init__(self, tmp_path: Path, seconds: int) -> None:
        self.trace = tmp_path / "t.vmtrace"
        xdg = Path(os.environ["XDG_RUNTIME_DIR"])
        self.proc = subprocess.Popen([*VMSUP, "launch", "seed16", "--timeout", str(seconds), "-q", "--trace",
                                      str(self.trace)], cwd=REPO, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        until = time.monotonic() + DEADLINE
        while not list(xdg.glob("vmsup/*/events.sock")):
            assert time.monotonic() < until and self.proc.poll() is None, "the run's events socket never appeared"
            time.sleep(0.05)
        path = next(xdg.glob("vmsup/*/events.sock")).parent
        self.run_dir = RunDir(path.name, path)
        self.context = zmq.Context()
        self.recorder = RecorderClient(self.run_dir, timeout=5.0)

    def push(self, *raws: bytes) -> None:
        sock = self.context.socket(zmq.PUSH)
        sock.connect(self.run_dir.events_endpoint)
        for raw in raws:
            sock.send(raw, copy=False)
        sock.close(linger=int(DEADLINE * 1000))

    def push_until_dropped(self, raw: bytes) -> None:
        """Send one message the recorder's socket must refuse: wait until it drops the connection."""
        from zmq.utils.monitor import recv_monitor_message
        sock = self.context.socket(zmq.PUSH)
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sock.connect(self.run_dir.events_endpoint)
        sock.send(raw, copy=False)
        assert monitor.poll(int(DEADLINE * 1000)), "the recorder kept the connection of an oversized message"
        assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)

    def stats(self) -> dict:
        return self.recorder.call("stats") or {}

    def wait_for(self, condition, what: str) -> None:
        until = time.monotonic() + DEADLINE
        while not condition():
            assert time.monotonic() < until and self.proc.poll() is None, f"timed out waiting for {what}"
            time.sleep(0.05)

    def recorder_pid(self) -> int:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                cmdline = (entry / "cmdline").read_bytes()
            except (OSError, IndexError, ValueError):
                continue
            if ppid == self.proc.pid and b"supervisor.recorder" in cmdline:
                return int(entry.name)
        raise AssertionError("no recorder process under the launch")

    def finish(self) -> str:
        _, err = self.proc.communicate(timeout=DEADLINE)
        self.context.term()
        assert self.proc.returncode == 4, err  # the VM timed out as asked: nothing else fell over
        assert "Traceback" not in err
        return err

    def assert_streams_intact(self) -> None:
        with TraceReader(self.trace) as r:
            ev = r.exits()
            assert r.gaps == [] and r.unexplained_gaps == []
            assert {int(v) for v in np.unique(ev["vm"])} == {0}
            assert len(ev["seq"]) > 0 and np.array_equal(ev["seq"], np.arange(len(ev["seq"])))
            end, = r.records(schema.MSG_VM_END)
            assert end["final_seq"] == [len(ev["seq"])]
            start, = r.records(schema.MSG_VM_START)
            assert start["vcpus"] == 1 and start["name"] == "seed16"


def _vm_hwm_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def forged() -> dict[str, bytes]:
    """One message of every kind with a field that is wrong, by what is wrong."""
    def wire(cls, **bad) -> bytes:
        return msgpack.packb({**EXAMPLES[cls].to_msg(), "vm": 0, "epoch": 0, **bad}, use_bin_type=True)
    return {
        "exits: columns hold 1 row, count says 5": wire(messages.ExitBatch, count=5),
        "exits: first_seq not a number": wire(messages.ExitBatch, first_seq="zz"),
        "vm-start: vcpus not a number": wire(messages.VmStart, vcpus="zz"),
        "vm-end: final_seq not a number": wire(messages.VmEnd, final_seq="zz"),
        "gap: first_missing not a number": wire(messages.Gap, first_missing="zz"),
        "gap: a well-formed gap from a sender (gaps are the recorder's to write)": wire(messages.Gap),
        "lifecycle: an unknown event": wire(messages.Lifecycle, event="teleport"),
        "lifecycle: exit code not a number": wire(messages.Lifecycle, code="zz"),
        "screen: cells that are not a screen": wire(messages.Screen, cells=b"garbage"),
        "input: no scancodes": wire(messages.Input, scancodes=b""),
        "steps: the masks name more registers than values holds": wire(
            messages.StepBatch, cols={**_STEP_COLS, "values": bytes(8)}),
    }


@pytest.mark.kvm
def test_forged_messages_of_every_kind_are_refused_counted_and_never_written(tmp_path):
    run = Run(tmp_path, seconds=5)
    bad = forged()
    run.push(*bad.values())
    run.wait_for(lambda: run.stats().get("refused") == len(bad), f"{len(bad)} refusals in the recorder's stats")
    causes = run.stats()["bad_messages"]
    for kind in ("exits", "vm-start", "vm-end", "gap", "lifecycle", "screen", "input"):
        assert any(cause.startswith(kind) for cause in causes), (kind, causes)
    err = run.finish()
    assert f"{len(bad)} malformed messages dropped" in err
    run.assert_streams_intact()
    with TraceReader(run.trace) as r:
        assert r.records(schema.MSG_SCREEN) == [] and r.records(schema.MSG_INPUT) == []
        assert {rec["event"] for rec in r.records(schema.MSG_LIFECYCLE)} <= {"spawn", "exit"}
        for kind in (schema.MSG_VM_START, schema.MSG_VM_END, schema.MSG_LIFECYCLE):
            for rec in r.records(kind):  # every record written is one its class accepts
                messages.validate_record(kind, rec)


@pytest.mark.kvm
def test_oversized_and_flooding_messages_keep_the_recorder_small_and_the_streams_intact(tmp_path):
    run = Run(tmp_path, seconds=12)
    # 100 MB in one message: ZeroMQ drops the connection at its header, nothing is buffered.
    run.push_until_dropped(msgpack.packb({"v": schema.SCHEMA_VERSION, "type": "exits", "cols": {"t_exit": bytes(100 << 20)}}))
    # Then messages just under the limit, fully unpacked and checked each, 4× the RSS bound in all.
    just_under = msgpack.packb({"v": schema.SCHEMA_VERSION, "type": "exits", "vm": 0, "vcpu": 0, "epoch": 0,
                                "first_seq": 0, "count": 1,
                                "cols": {"t_exit": bytes(messages.BUS.max_bytes - 4096)}})
    assert messages.BUS.max_bytes - 8192 < len(just_under) <= messages.BUS.max_bytes
    flood = (1 << 30) // len(just_under)
    run.push(*[just_under] * flood)
    run.wait_for(lambda: run.stats().get("refused") == flood, f"the {flood} flooding messages to be refused")
    peak = _vm_hwm_bytes(run.recorder_pid())
    assert peak < 256 << 20, f"the recorder's peak RSS was {peak >> 20} MiB"
    run.finish()
    run.assert_streams_intact()
