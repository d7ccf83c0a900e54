"""`vmsup tail` and `vmsup top` against real sockets and real processes.

Most tests play the recorder: they make a real run directory in a private XDG_RUNTIME_DIR, bind
an XPUB socket at the run's live endpoint (a PUB that also reports subscriptions, so a test
publishes only once the viewer listens — no sleeps) and publish batches built by the worker's
own EventBatcher. The viewers run as `python -m supervisor` subprocesses. The kvm-marked tests
attach to a real `vmsup launch seed16`.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import termios
import threading
import time
from pathlib import Path

import msgpack
import pytest
import zmq
from conftest import REPO, VMSUP

from supervisor import runtime
from supervisor.live import LiveSubscriber
from supervisor.top import TopModel
from tracetool import schema
from tracetool.filters import parse_filter
from vmworker.event_batch import ROW, EventBatcher

DEADLINE = 20.0  # generous: only ever reached when something is broken
T0 = 12_345_678_901  # t_exit of event 0: prints as t=12.345678901


def io_out(i: int, port: int = 0x10, value: int | None = None, size: int = 2, guest_ns: int = 5_100):
    value = i if value is None else value
    return (T0 + i * 1000, guest_ns, port, value.to_bytes(8, "little"), 1, schema.REASON_IO, size, schema.FLAG_WRITE,
            0x10004)


def mmio_write(i: int, addr: int, value: int, size: int = 4, guest_ns: int = 850):
    return (T0 + i * 1000, guest_ns, addr, value.to_bytes(8, "little"), 1, schema.REASON_MMIO, size, schema.FLAG_WRITE,
            0x10020)


def hlt(i: int, guest_ns: int = 1_250_000):
    return (T0 + i * 1000, guest_ns, 0, b"", 1, schema.REASON_HLT, 0, 0, 0x10030)


def private_xdg() -> str:
    # Short on purpose: an ipc endpoint is a unix socket path, limited to ~107 bytes.
    return tempfile.mkdtemp(prefix="vl-", dir="/tmp")


class LiveBus:
    """A run directory whose live endpoint we publish on, as the recorder does."""

    def __init__(self, vms: tuple[str, ...]) -> None:
        self.xdg = private_xdg()
        self.env = {**os.environ, "XDG_RUNTIME_DIR": self.xdg}
        base = Path(self.xdg) / "vmsup"
        base.mkdir(mode=0o700)
        self.run = runtime.RunDir("120000-1", base / "120000-1")
        self.run.path.mkdir(mode=0o700)
        # live_runs() wants a live supervisor pid: ours.
        self.run.write_info({"id": self.run.run_id, "pid": os.getpid(), "vms": list(vms)})
        self.context = zmq.Context()
        self.pub = self.context.socket(zmq.XPUB)
        self.pub.setsockopt(zmq.XPUB_VERBOSE, 1)  # one subscription message per subscriber
        self.pub.setsockopt(zmq.SNDHWM, 0)  # the tests' own sends never drop
        self.pub.bind(self.run.live_endpoint)
        self.procs: list[subprocess.Popen] = []

    # viewers
    def start(self, *args: str, **popen) -> subprocess.Popen:
        opts = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        opts.update(popen)
        proc = subprocess.Popen([*VMSUP, *args], cwd=REPO, env=self.env, **opts)
        self.procs.append(proc)
        return proc

    def wait_subscribers(self, n: int) -> None:
        deadline = time.monotonic() + DEADLINE
        seen = 0
        while seen < n:
            left = deadline - time.monotonic()
            assert left > 0, f"only {seen} of {n} viewers subscribed"
            if self.pub.poll(int(left * 1000)):
                if self.pub.recv()[:1] == b"\x01":
                    seen += 1

    def attach(self, *args: str) -> subprocess.Popen:
        proc = self.start(*args)
        self.wait_subscribers(1)
        return proc

    @staticmethod
    def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
        out, err = proc.communicate(timeout=DEADLINE)
        return proc.returncode, out.decode(), err.decode()

    # publishing
    def send(self, message: dict) -> None:  # also the EventBatcher's publisher
        self.pub.send(msgpack.packb(message, use_bin_type=True))

    def send_frames(self, *frames: bytes) -> None:
        self.pub.send_multipart(list(frames))

    def batcher(self, vm: int = 0, vcpu: int = 0, epoch: int = 0, record_filter=None) -> EventBatcher:
        return EventBatcher(self, vm, vcpu, epoch, record_filter=record_filter)

    @staticmethod
    def emit(batcher: EventBatcher, rows: list[tuple]) -> None:
        """Pack rows the way the vCPU loop does and flush them as one batch."""
        pos = 0
        for row in rows:
            ROW.pack_into(batcher.rows, pos, *row)
            pos += ROW.size
        batcher.flush(pos)

    def vm_start(self, vm: int, name: str, vcpus: int = 1, epoch: int = 0) -> None:
        self.send({"v": schema.SCHEMA_VERSION, "type": schema.MSG_VM_START, "vm": vm, "epoch": epoch, "name": name,
                   "spec": {}, "sha256": "0" * 64, "mem_size": 1 << 24, "mode": "real", "vcpus": vcpus,
                   "pid": os.getpid(), "t": time.monotonic_ns()})

    def vm_end(self, vm: int, final_seq: list[int], status: str = "halted", epoch: int = 0) -> None:
        self.send({"v": schema.SCHEMA_VERSION, "type": schema.MSG_VM_END, "vm": vm, "epoch": epoch, "name": f"vm{vm}",
                   "status": status, "guest_code": None, "exits": sum(final_seq), "by_reason": {},
                   "final_seq": final_seq, "t": time.monotonic_ns()})

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        self.pub.close(0)
        self.context.term()
        shutil.rmtree(self.xdg, ignore_errors=True)


@pytest.fixture
def bus():
    made: list[LiveBus] = []

    def make(vms: tuple[str, ...] = ("seed16",)) -> LiveBus:
        made.append(LiveBus(vms))
        return made[-1]

    yield make
    for b in made:
        b.close()


def json_events(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def assert_one_error_line(rc: int, out: str, err: str, *fragments: str) -> None:
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmsup: error: "), err
    for fragment in fragments:
        assert fragment in lines[0]
    assert out == ""
    assert rc == 2


# --- vmsup tail --------------------------------------------------------------------------------

def test_tail_json_prints_every_event_with_the_schema_field_names(bus):
    b = bus()
    tail = b.attach("tail", "--json")
    b.vm_start(0, "seed16")
    batcher = b.batcher()
    b.emit(batcher, [io_out(i) for i in range(3)])
    b.emit(batcher, [io_out(i) for i in range(3, 5)])
    b.vm_end(0, [batcher.next_seq])
    rc, out, err = b.finish(tail)  # ends by itself: every VM of the run has ended
    assert rc == 0, err
    assert err == ""
    events = json_events(out)
    assert [e["seq"] for e in events] == [0, 1, 2, 3, 4]
    assert [e["data"] for e in events] == [0, 1, 2, 3, 4]
    first = events[0]
    assert tuple(first) == schema.EXPORT_COLUMNS  # the one shape of an exit (tracetool/exit_rows.py)
    assert (first["vm"], first["vcpu"], first["epoch"]) == (0, 0, 0)
    assert (first["t_exit_ns"], first["guest_ns"], first["addr"], first["size"]) == (T0, 5_100, 0x10, 2)
    assert (first["reason_code"], first["reason"], first["write"], first["count"]) == (schema.REASON_IO, "io", True, 1)
    second = events[1]
    assert first["handle_ns"] == (second["t_exit_ns"] - second["guest_ns"]) - first["t_exit_ns"]


def test_tail_text_line_reads_like_an_exit(bus):
    b = bus()
    tail = b.attach("tail")
    batcher = b.batcher()
    b.emit(batcher, [io_out(0, value=0x11), mmio_write(1, 0xD0000000, 0xDEADBEEF), hlt(2)])
    b.vm_end(0, [batcher.next_seq])
    rc, out, err = b.finish(tail)
    assert rc == 0, err
    assert out.splitlines() == [
        "vm=0 vcpu=0 seq=0 t=12.345678901 io out port=0x10 size=2 data=0x11 guest=5.1us",
        "vm=0 vcpu=0 seq=1 t=12.345679901 mmio write addr=0xd0000000 size=4 data=0xdeadbeef guest=850ns",
        "vm=0 vcpu=0 seq=2 t=12.345680901 hlt guest=1.25ms",
    ]


def test_tail_filters_by_vm_vcpu_reason_and_port(bus):
    b = bus(("a", "b"))
    options = {"vm1": ("--vm", "1"), "vcpu1": ("--vcpu", "1"), "hlt": ("--reason", "hlt"),
               "com1": ("--port", "0x3f8"), "io-or-mmio-of-vm0": ("--reason", "io,mmio", "--vm", "0")}
    viewers = {name: b.start("tail", "--json", *args) for name, args in options.items()}
    b.wait_subscribers(len(viewers))
    b.vm_start(0, "a", vcpus=2)
    b.vm_start(1, "b")
    v0c0, v0c1, v1c0 = b.batcher(0, 0), b.batcher(0, 1), b.batcher(1, 0)
    b.emit(v0c0, [io_out(0), hlt(1), io_out(2, port=0x3F8, value=0x41, size=1), mmio_write(3, 0xD0000000, 7)])
    b.emit(v0c1, [io_out(0), io_out(1, port=0x3F8, value=0x42, size=1)])
    b.emit(v1c0, [hlt(0), io_out(1, port=0x3F8, value=0x43, size=1)])
    b.vm_end(0, [v0c0.next_seq, v0c1.next_seq])
    b.vm_end(1, [v1c0.next_seq])
    expected = {
        "vm1": [(1, 0, 0), (1, 0, 1)],
        "vcpu1": [(0, 1, 0), (0, 1, 1)],
        "hlt": [(0, 0, 1), (1, 0, 0)],
        "com1": [(0, 0, 2), (0, 1, 1), (1, 0, 1)],
        "io-or-mmio-of-vm0": [(0, 0, 0), (0, 0, 2), (0, 0, 3), (0, 1, 0), (0, 1, 1)],
    }
    for name, proc in viewers.items():
        rc, out, err = b.finish(proc)
        assert rc == 0, (name, err)
        assert sorted((e["vm"], e["vcpu"], e["seq"]) for e in json_events(out)) == expected[name], name


def test_tail_stops_after_count_events(bus):
    b = bus()
    tail = b.attach("tail", "--json", "-n", "3")
    batcher = b.batcher()
    b.emit(batcher, [io_out(0), io_out(1)])
    b.emit(batcher, [io_out(2), io_out(3)])  # -n is reached in the middle of this batch
    rc, out, err = b.finish(tail)  # no vm-end: only the count can end it
    assert rc == 0, err
    assert [e["seq"] for e in json_events(out)] == [0, 1, 2]


def test_tail_reports_missed_events_when_sequence_numbers_jump(bus):
    b = bus()
    tail = b.attach("tail", "--json")
    b.vm_start(0, "seed16")
    batcher = b.batcher()
    b.emit(batcher, [io_out(i) for i in range(5)])
    batcher.next_seq += 7  # seq 5..11 never reach the viewer, as when PUB drops at its high-water mark
    b.emit(batcher, [io_out(i) for i in range(12, 17)])
    batcher.next_seq += 3  # and the last three (17..19) never arrive at all
    b.vm_end(0, [batcher.next_seq])
    rc, out, err = b.finish(tail)
    assert rc == 0, err
    assert [e["seq"] for e in json_events(out)] == [0, 1, 2, 3, 4, 12, 13, 14, 15, 16]
    notes = err.splitlines()
    assert notes[0] == "vmsup tail: missed 7 events (vm 0 vcpu 0), 7 in total"
    assert notes[-2] == "vmsup tail: missed 3 events (vm 0 vcpu 0), 10 in total"
    assert notes[-1] == "vmsup tail: missed 10 events in total"


def test_tail_counts_events_before_its_first_batch_as_missed_only_after_a_vm_start(bus):
    b = bus(("a", "b"))
    tail = b.attach("tail", "--json")
    b.vm_start(0, "a")  # vm 1's vm-start was "before we attached": its stream starts where we join
    seen_start, joined_late = b.batcher(0), b.batcher(1)
    seen_start.next_seq = joined_late.next_seq = 100
    b.emit(seen_start, [io_out(i) for i in range(100, 102)])
    b.emit(joined_late, [io_out(i) for i in range(100, 102)])
    b.vm_end(0, [seen_start.next_seq])
    b.vm_end(1, [joined_late.next_seq])
    rc, out, err = b.finish(tail)
    assert rc == 0, err
    assert len(json_events(out)) == 4
    assert err.splitlines() == ["vmsup tail: missed 100 events (vm 0 vcpu 0), 100 in total",
                                "vmsup tail: missed 100 events in total"]


def test_tail_shows_the_sequence_numbers_a_record_time_filter_kept(bus):
    b = bus()
    tail = b.attach("tail", "--json")
    b.vm_start(0, "seed16")
    batcher = b.batcher(record_filter=parse_filter("port=0x3f8"))
    b.emit(batcher, [io_out(0), io_out(1, port=0x3F8, value=0x41, size=1), io_out(2),
                     io_out(3, port=0x3F8, value=0x42, size=1)])
    b.emit(batcher, [io_out(4), io_out(5)])  # nothing kept: a batch of 0 rows covering seq 4..5
    b.vm_end(0, [batcher.next_seq])
    rc, out, err = b.finish(tail)
    assert rc == 0, err
    assert [(e["seq"], e["data"]) for e in json_events(out)] == [(1, 0x41), (3, 0x42)]
    assert err == ""  # filtered out at record time is not missed


def test_tail_ignores_malformed_messages_and_says_how_many(bus):
    b = bus()
    tail = b.attach("tail", "--json")
    good = b.batcher()
    pack = lambda m: msgpack.packb(m, use_bin_type=True)  # noqa: E731
    exits = {"v": schema.SCHEMA_VERSION, "type": schema.MSG_EXITS, "vm": 0, "vcpu": 0, "epoch": 0,
             "first_seq": 0, "count": 1, "cols": schema.columns_from_rows(ROW.pack(*io_out(0)), 1)}
    b.send_frames(b"\xc1 not msgpack")
    b.send_frames(pack([1, 2, 3]))  # not a map
    b.send_frames(pack({**exits, "v": 99}))  # a newer schema
    b.send_frames(pack({**exits, "type": "bogus"}))
    b.send_frames(pack({**exits, "cols": {**exits["cols"], "data": b"\x00" * 3}}))  # short column
    b.send_frames(pack({**exits, "count": -1}))
    b.send_frames(pack({**exits, "cols": {**exits["cols"], "seq": b"\x00" * 16}}))  # 2 rows covering 1 seq
    b.send_frames(b"topic", pack(exits))  # two frames
    b.emit(good, [io_out(i) for i in range(3)])
    b.vm_end(0, [good.next_seq])
    rc, out, err = b.finish(tail)
    assert rc == 0, err
    assert [e["seq"] for e in json_events(out)] == [0, 1, 2]
    assert "Traceback" not in err
    assert err.startswith("vmsup tail: ignored 8 malformed messages"), err


def test_tail_ends_when_the_run_directory_vanishes(bus):
    b = bus()
    tail = b.attach("tail", "--json")
    b.emit(b.batcher(), [io_out(0), io_out(1)])  # no vm-start, no vm-end: only the run's end stops it
    b.run.remove()
    rc, out, err = b.finish(tail)
    assert rc == 0, err
    assert [e["seq"] for e in json_events(out)] == [0, 1]


@pytest.mark.parametrize("view", [("tail",), ("top", "--once")])
def test_viewers_without_a_running_launch_say_so_and_exit_2(view):
    xdg = private_xdg()
    try:
        env = {**os.environ, "XDG_RUNTIME_DIR": xdg}
        # A leftover run whose supervisor is gone does not count as running.
        stale = Path(xdg) / "vmsup" / "120000-1"
        stale.mkdir(parents=True, mode=0o700)
        dead = subprocess.Popen(["true"])
        dead.wait()
        (stale / "run.json").write_text(json.dumps({"id": "120000-1", "pid": dead.pid}))
        proc = subprocess.run([*VMSUP, *view], cwd=REPO, env=env, capture_output=True, timeout=DEADLINE)
        # The leftover is removed first, in one line of its own (issue 10 item 7), then the error.
        removed, _, err = proc.stderr.decode().partition("\n")
        assert removed == "vmsup: removed 1 stale run directory (run 120000-1: supervisor gone)"
        assert not stale.exists()
        assert_one_error_line(proc.returncode, proc.stdout.decode(), err, "no vmsup launch is running")
    finally:
        shutil.rmtree(xdg, ignore_errors=True)


@pytest.mark.parametrize("args, fragment", [
    (("tail", "--run", "nope"), "no running vmsup launch with id nope"),
    (("top", "--once", "--run", "nope"), "no running vmsup launch with id nope"),
    (("tail", "--reason", "bogus"), "unknown reason 'bogus'"),
    (("tail", "--port", "0x10000"), "out of range"),
    (("tail", "--port", "0x10", "--reason", "hlt"), "port= matches only io"),
    (("tail", "-n", "0"), "-n"),
    (("top", "--sort", "fast"), "--sort must be one of rate, total"),
])
def test_viewers_reject_bad_options_with_one_line(bus, args, fragment):
    b = bus()
    proc = subprocess.run([*VMSUP, *args], cwd=REPO, env=b.env, capture_output=True, timeout=DEADLINE)
    assert_one_error_line(proc.returncode, proc.stdout.decode(), proc.stderr.decode(), fragment)


# --- vmsup top ---------------------------------------------------------------------------------

def test_top_once_json_counts_exits_per_vm_and_reason(bus):
    b = bus(("a", "b"))
    top = b.attach("top", "--once", "--json", "--interval", "60")  # the run's end ends the sample
    b.vm_start(0, "a")
    b.vm_start(1, "b")
    v0, v1 = b.batcher(0), b.batcher(1)
    b.emit(v0, [io_out(i) for i in range(6)] + [hlt(6), hlt(7)])
    b.emit(v1, [mmio_write(i, 0xD0000000, i) for i in range(3)])
    b.vm_end(0, [v0.next_seq], status="halted")
    b.vm_end(1, [v1.next_seq], status="max-exits")
    rc, out, err = b.finish(top)
    assert rc == 0, err
    snap = json.loads(out)
    assert snap["run"] == b.run.run_id and snap["missed_total"] == 0 and snap["malformed"] == 0
    vm0, vm1 = snap["vms"]
    assert (vm0["vm"], vm0["name"], vm0["status"], vm0["total"]) == (0, "a", "halted", 8)
    assert [(r["reason"], r["total"], r["percent"]) for r in vm0["reasons"]] == [("io", 6, 75.0), ("hlt", 2, 25.0)]
    assert (vm1["vm"], vm1["name"], vm1["status"], vm1["total"]) == (1, "b", "max-exits", 3)
    assert [(r["reason"], r["code"], r["percent"]) for r in vm1["reasons"]] == [("mmio", schema.REASON_MMIO, 100.0)]
    assert vm0["rate"] > 0 and vm0["reasons"][0]["rate"] > vm0["reasons"][1]["rate"]


def test_top_once_shows_missed_events(bus):
    b = bus()
    top = b.attach("top", "--once", "--json", "--interval", "60")
    b.vm_start(0, "seed16")
    batcher = b.batcher()
    b.emit(batcher, [io_out(i) for i in range(2)])
    batcher.next_seq += 7
    b.emit(batcher, [io_out(i) for i in range(9, 11)])
    b.vm_end(0, [batcher.next_seq])
    rc, out, err = b.finish(top)
    assert rc == 0, err
    snap = json.loads(out)
    assert snap["missed_total"] == 7
    assert snap["vms"][0]["missed"] == 7 and snap["vms"][0]["total"] == 4


def test_top_once_prints_a_table(bus):
    b = bus()
    top = b.attach("top", "--once", "--interval", "60")
    b.vm_start(0, "seed16")
    batcher = b.batcher()
    b.emit(batcher, [io_out(i) for i in range(3)] + [hlt(3)])
    b.vm_end(0, [batcher.next_seq])
    rc, out, err = b.finish(top)
    assert rc == 0, err
    assert "vm 0 seed16 [halted]" in out
    assert re.search(r"\bio\b.*\b3\b.*75\.0", out) and re.search(r"\bhlt\b.*\b1\b.*25\.0", out), out


def _receive(subscriber: LiveSubscriber, n: int) -> list[dict]:
    messages: list[dict] = []
    deadline = time.monotonic() + DEADLINE
    while len(messages) < n:
        assert time.monotonic() < deadline, f"received {len(messages)} of {n} messages"
        messages += subscriber.poll(100)
    return messages


def test_top_rates_cover_the_last_interval_and_sort_by_rate_or_total(bus):
    b = bus()
    now = [0.0]
    model = TopModel(clock=lambda: now[0])
    with LiveSubscriber(b.run) as subscriber:
        b.wait_subscribers(1)
        batcher = b.batcher()
        b.emit(batcher, [hlt(i) for i in range(10)])
        for msg in _receive(subscriber, 1):
            model.feed(msg)
        now[0] = 1.0
        model.tick()
        b.emit(batcher, [io_out(i) for i in range(10, 13)])
        for msg in _receive(subscriber, 1):
            model.feed(msg)
        now[0] = 3.0
        model.tick()
        by_rate = model.snapshot(sort="rate", subscriber=subscriber)["vms"][0]["reasons"]
        by_total = model.snapshot(sort="total", subscriber=subscriber)["vms"][0]["reasons"]
    assert [(r["reason"], r["total"], r["rate"]) for r in by_rate] == [("io", 3, 1.5), ("hlt", 10, 0.0)]
    assert [r["reason"] for r in by_total] == ["hlt", "io"]


def test_top_on_a_terminal_takes_keys_and_restores_the_terminal(bus):
    b = bus()
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    before = termios.tcgetattr(slave)
    output = bytearray()

    def read_screen() -> None:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the last writer closed
                return
            if not chunk:
                return
            output.extend(chunk)

    def wait_for(text: bytes) -> None:
        deadline = time.monotonic() + DEADLINE
        while text not in output:
            assert time.monotonic() < deadline, f"{text!r} never shown: {bytes(output)[-2000:]!r}"
            time.sleep(0.02)

    top = b.start("top", "--interval", "0.1", stdin=slave, stdout=slave, stderr=slave)
    reader = threading.Thread(target=read_screen, daemon=True)
    reader.start()
    try:
        b.wait_subscribers(1)
        b.vm_start(0, "seed16")
        b.emit(b.batcher(), [io_out(i) for i in range(3)])
        wait_for(b"vm 0 seed16")
        wait_for(b"Rate/s \xe2\x96\xbc")  # sorted by rate
        os.write(master, b"s")
        wait_for(b"Total \xe2\x96\xbc")  # now by total
        os.write(master, b"v")
        wait_for(b"\xe2\x80\x94 vm 0")  # only vm 0 shown
        os.write(master, b"q")
        assert top.wait(timeout=DEADLINE) == 0
        after = termios.tcgetattr(slave)
        assert after[3] & (termios.ECHO | termios.ICANON) == before[3] & (termios.ECHO | termios.ICANON)
    finally:
        os.close(slave)
        reader.join(timeout=DEADLINE)
        os.close(master)


# --- against a real launch ---------------------------------------------------------------------

def _start_launch(xdg: str, guest: str, *args: str, stdin=subprocess.DEVNULL) -> tuple[subprocess.Popen, dict]:
    env = {**os.environ, "XDG_RUNTIME_DIR": xdg}
    proc = subprocess.Popen([*VMSUP, "launch", guest, "-q", "--no-trace", *args], cwd=REPO, env=env,
                            stdin=stdin, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + DEADLINE
    while not list((Path(xdg) / "vmsup").glob("*/live.sock")):  # the recorder has bound its PUB
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            _, err = proc.communicate(timeout=DEADLINE)
            shutil.rmtree(xdg, ignore_errors=True)
            pytest.fail(f"vmsup launch made no live socket (exit {proc.returncode}): {err.decode()}")
        time.sleep(0.02)
    return proc, env


def _stop_launch(proc: subprocess.Popen, xdg: str) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # what Ctrl-C does: the VM stops and reports
    try:
        proc.wait(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
        shutil.rmtree(xdg, ignore_errors=True)


@pytest.fixture(scope="module")
def seed_launch():
    """`vmsup launch seed16 -q` in the background, in a private runtime dir.

    Its --timeout is only a backstop: the tests stop it (SIGINT) when done, so a slow machine
    cannot make the VM end before a viewer attaches.
    """
    xdg = private_xdg()
    proc, env = _start_launch(xdg, "seed16", "--timeout", "120")
    yield env
    _stop_launch(proc, xdg)


def _missed_total(err: str) -> int:
    totals = re.findall(r"missed (\d+) events in total", err)
    return int(totals[-1]) if totals else 0


@pytest.mark.kvm
def test_tail_of_a_real_launch_shows_the_seed_counting_up(seed_launch):
    proc = subprocess.run([*VMSUP, "tail", "--json", "-n", "200", "--port", "0x10"], cwd=REPO, env=seed_launch,
                          capture_output=True, timeout=DEADLINE)
    err = proc.stderr.decode()
    assert proc.returncode == 0, err
    events = json_events(proc.stdout.decode())
    assert len(events) == 200
    assert all((e["vm"], e["reason"], e["addr"], e["size"]) == (0, "io", 0x10, 2) for e in events)
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(set(seqs))
    # The seed guest outputs ax, then ax+1, … : consecutive, except where the viewer says it missed events.
    skipped = sum((b["data"] - a["data"] - 1) % 0x10000 for a, b in zip(events, events[1:]))
    assert skipped <= _missed_total(err), err


@pytest.mark.kvm
def test_top_once_of_a_real_launch_shows_vm0_io_exits(seed_launch):
    # The launch is making io exits before top samples: a fresh one may still be starting its VM.
    first = subprocess.run([*VMSUP, "tail", "-n", "1", "--reason", "io"], cwd=REPO, env=seed_launch,
                           capture_output=True, timeout=DEADLINE)
    assert first.returncode == 0 and b" io " in first.stdout, first.stderr.decode()
    proc = subprocess.run([*VMSUP, "top", "--once", "--json", "--interval", "0.5"], cwd=REPO, env=seed_launch,
                          capture_output=True, timeout=DEADLINE)
    assert proc.returncode == 0, proc.stderr.decode()
    vm0 = json.loads(proc.stdout)["vms"][0]
    assert (vm0["vm"], vm0["name"]) == (0, "seed16")
    io = [r for r in vm0["reasons"] if r["reason"] == "io"]
    assert io and io[0]["total"] > 0 and io[0]["rate"] > 0


@pytest.mark.kvm
def test_tail_ends_by_itself_when_the_launch_ends():
    # The echo guest polls the UART (io exits) until its input ends: the test decides when the
    # VM ends, after the viewer has shown that it is attached.
    xdg = private_xdg()
    launch, env = _start_launch(xdg, "echo", "--timeout", "120", stdin=subprocess.PIPE)
    try:
        tail = subprocess.Popen([*VMSUP, "tail", "--reason", "io"], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first = tail.stdout.readline()  # blocks until the viewer shows an event (or ends)
        assert first.startswith(b"vm=0 vcpu=0 seq=") and b" io " in first, first
        launch.stdin.close()  # end of input: the guest exits, then the launch
        rest, err = tail.communicate(timeout=DEADLINE)
        assert tail.returncode == 0, err.decode()
        assert launch.wait(timeout=DEADLINE) == 0
    finally:
        _stop_launch(launch, xdg)


def test_tail_of_a_vm_the_run_does_not_have_is_one_line_naming_its_vms(bus):
    b = bus(("seed16", "hello"))
    proc = b.start("tail", "--vm", "7")
    rc, out, err = b.finish(proc)
    assert rc == 2 and out == ""
    assert err.splitlines() == [f"vmsup: error: run {b.run.run_id}: no vm 7 in this run; its VMs: 0 (seed16), 1 (hello)"]


def test_top_once_lists_every_vm_of_the_run_also_those_that_sent_nothing(bus):
    b = bus(("a", "b", "c"))
    top = b.attach("top", "--once", "--json", "--interval", "0.5")
    b.vm_start(0, "a")
    v0 = b.batcher(0)
    b.emit(v0, [io_out(i) for i in range(3)])
    rc, out, err = b.finish(top)
    assert rc == 0, err
    rows = {vm["vm"]: (vm["name"], vm["status"], vm["total"]) for vm in json.loads(out)["vms"]}
    assert rows == {0: ("a", "running", 3), 1: ("b", "not seen", 0), 2: ("c", "not seen", 0)}


def test_live_top_lists_every_vm_of_the_run_from_its_first_refresh(bus):
    b = bus(("a", "b", "c"))
    top = b.attach("top", "--json", "--interval", "0.2")

    def rows(line: str) -> dict:
        assert line, "top ended early"
        return {vm["vm"]: (vm["name"], vm["status"], vm["total"]) for vm in json.loads(line)["vms"]}

    try:
        assert rows(top.stdout.readline().decode()) == {0: ("a", "not seen", 0), 1: ("b", "not seen", 0),
                                                        2: ("c", "not seen", 0)}
        b.vm_start(0, "a")
        b.emit(b.batcher(0), [io_out(i) for i in range(3)])
        deadline = time.monotonic() + DEADLINE
        while (now := rows(top.stdout.readline().decode()))[0][2] < 3:
            assert time.monotonic() < deadline, now
        assert now == {0: ("a", "running", 3), 1: ("b", "not seen", 0), 2: ("c", "not seen", 0)}
    finally:
        top.send_signal(signal.SIGINT)
        b.finish(top)


@pytest.mark.kvm
def test_top_once_shows_a_paused_vm_and_an_ended_one_with_their_state():
    xdg = private_xdg()
    launch, env = _start_launch(xdg, "seed16", "hello", "--timeout", "120")
    try:
        deadline = time.monotonic() + DEADLINE
        while True:  # hello prints its line and halts; seed16 goes on
            ps = subprocess.run([*VMSUP, "ps", "--json"], cwd=REPO, env=env, capture_output=True, timeout=DEADLINE)
            states = {vm["name"]: vm["state"] for vm in json.loads(ps.stdout)[0]["vms"]}
            if states.get("hello") not in (None, "starting", "running"):
                break
            assert time.monotonic() < deadline, states
            time.sleep(0.1)
        paused = subprocess.run([*VMSUP, "pause", "seed16"], cwd=REPO, env=env, capture_output=True, timeout=DEADLINE)
        assert paused.returncode == 0, paused.stderr.decode()
        proc = subprocess.run([*VMSUP, "top", "--once", "--json", "--interval", "0.3"], cwd=REPO, env=env,
                              capture_output=True, timeout=DEADLINE)
        assert proc.returncode == 0, proc.stderr.decode()
        status = {vm["name"]: vm["status"] for vm in json.loads(proc.stdout)["vms"]}
        assert status == {"seed16": "paused", "hello": states["hello"]}, status
    finally:
        _stop_launch(launch, xdg)
