"""Remote recording across two network namespaces: `vmsup record --listen` on one "host",
`vmsup launch --recorder` on another (tests/netns_pair.py), one trace for several launches.

Counts are checked against the kernel's (perf's kvm:kvm_pio, as tests/test_recording.py does)
and every stream's sequence numbers; the link is cut with `ip link set … down`."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

from supervisor.recorder import Recorder
from supervisor.runtime import RunDir
from tracetool import messages, schema
from tracetool.bus_credentials import BusKeys
from tracetool.exit_tally import RunTally
from tracetool.trace import TraceReader

from conftest import REPO, VMSUP
from netns_pair import NetnsPair, NetnsUnavailable
from test_recorder_memory import BATCHES, ROWS, VCPUS, _batch, _Feeder, _run_epoch
from test_recording import _perf_counts, perf  # noqa: F401 (the perf fixture)

DEADLINE = 120.0
PORT = 5555  # a fresh namespace has every port free


@pytest.fixture
def netns():
    try:
        pair = NetnsPair.create()
    except NetnsUnavailable as e:
        if os.environ.get("VMSUP_REQUIRE_KVM") == "1":
            pytest.fail(f"VMSUP_REQUIRE_KVM=1 but network namespaces cannot be made: {e}")
        pytest.skip(f"network namespaces cannot be made here: {e}")
    try:
        yield pair
    finally:
        pair.close()


@pytest.fixture
def keys_dir(tmp_path):
    directory = tmp_path / "keys"
    subprocess.run([*VMSUP, "keys", "--dir", str(directory)], cwd=REPO, check=True, capture_output=True, timeout=60)
    return directory


class RecordProcess:
    """`vmsup record --listen` (inside a namespace: `prefix`); its stderr lines gathered by a thread."""

    def __init__(self, prefix: list[str], keys_dir, trace, listen: str = f"tcp://*:{PORT}") -> None:
        self.proc = subprocess.Popen([*prefix, *VMSUP, "record", "--listen", listen,
                                      "--trace", str(trace), "--keys-dir", str(keys_dir)],
                                     cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stderr], daemon=True)
        self._reader.start()
        until = time.monotonic() + DEADLINE
        while not any("listening on" in line for line in self.seen):
            assert self.proc.poll() is None, "".join(self.seen)
            try:
                self.seen.append(self.lines.get(timeout=max(0.1, until - time.monotonic())))
            except queue.Empty:
                pytest.fail(f"vmsup record did not start listening: {''.join(self.seen)}")

    def stop(self) -> str:
        """Ctrl-C, as a user ends it; everything it said."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=DEADLINE)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=DEADLINE)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return "".join(self.seen)


@pytest.fixture
def recorder(netns, keys_dir, tmp_path):
    started = []

    def start(trace):
        started.append(RecordProcess(netns.run_in(netns.recorder_ns), keys_dir, trace))
        return started[-1]

    yield start
    for rec in started:
        rec.stop()


def launch_in(pair: NetnsPair, ns: str, endpoint: str, keys_dir, *args: str, perf_counts: bool = True,
              env: dict | None = None) -> subprocess.Popen:
    """`vmsup launch ARGS --recorder ENDPOINT` inside namespace `ns` (under perf stat: the kernel's counts)."""
    counting = ["perf", "stat", "-x,", "-e", "kvm:kvm_pio", "--"] if perf_counts else []
    return subprocess.Popen([*pair.run_in(ns), *counting, *VMSUP, "launch", *args, "-q", "--recorder", endpoint,
                             "--keys-dir", str(keys_dir)], cwd=REPO, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def finished(proc: subprocess.Popen) -> str:
    _, err = proc.communicate(timeout=DEADLINE)
    assert "Traceback" not in err, err
    return err


def run_id_of(stderr: str) -> str:
    return re.search(r"vmsup: run (\S+): recording at", stderr).group(1)


def io_exits_by_run(trace) -> dict[str, dict[int, int]]:
    """Per run id, per its own vm id: the io exits in the trace, after checking that every stream's
    sequence numbers run from 0 without a hole and that the trace has no gap."""
    with TraceReader(trace) as r:
        assert r.gaps == []
        starts = r.records(schema.MSG_VM_START)
        out: dict[str, dict[int, int]] = {}
        for start in starts:
            ev = r.exits(vm=start["vm"])
            assert np.array_equal(ev["seq"], np.arange(len(ev["seq"]))), start["name"]
            run = start["run"]
            assert start["name"].endswith(f"@{run['id']}")
            out.setdefault(run["id"], {})[run["vm"]] = int(np.sum(ev["reason"] == schema.REASON_CODES["io"]))
        assert len({s["vm"] for s in starts}) == len(starts), "two VMs share a trace vm id"
    return out


@pytest.mark.kvm
def test_two_launches_on_two_hosts_record_into_one_trace_without_loss(netns, recorder, keys_dir, tmp_path, perf):
    trace = tmp_path / "remote.vmtrace"
    rec = recorder(trace)
    # One launch across the veth link, another on the recorder's own host: each has its vm 0.
    far = launch_in(netns, netns.launch_ns, f"tcp://{netns.recorder_addr}:{PORT}", keys_dir,
                    "seed16", "--vms", "4", "--max-exits", "20000")
    near = launch_in(netns, netns.recorder_ns, f"tcp://127.0.0.1:{PORT}", keys_dir,
                     "seed16", "--vms", "2", "--max-exits", "20000")
    far_err, near_err = finished(far), finished(near)
    assert far.returncode == 0 and near.returncode == 0, far_err + near_err
    said = rec.stop()
    assert rec.proc.returncode == 0, said
    assert "2 runs recorded" in said and "no gaps" in said, said

    exits = io_exits_by_run(trace)
    for err, vms in ((far_err, 4), (near_err, 2)):
        run = run_id_of(err)
        assert sorted(exits[run]) == list(range(vms))
        assert sum(exits[run].values()) == _perf_counts(err)["kvm:kvm_pio"] == 20000 * vms
        assert f"sent to the recorder at" in err and f"{20000 * vms} exits of {vms} VMs" in err and "0 undelivered" in err
    verify = subprocess.run([*VMSUP[:-1], "tracetool", "verify", str(trace)], cwd=REPO, capture_output=True,
                            text=True, timeout=DEADLINE)
    assert verify.returncode == 0 and "6 streams" in verify.stdout and "closed cleanly" in verify.stdout, verify.stdout
    info = subprocess.run([*VMSUP[:-1], "tracetool", "info", "--json", str(trace)], cwd=REPO, capture_output=True,
                          text=True, timeout=DEADLINE)
    described = json.loads(info.stdout)
    assert {(vm["run"]["id"], vm["run"]["vm"]) for vm in described["vms"]} == {
        (run_id_of(far_err), vm) for vm in range(4)} | {(run_id_of(near_err), vm) for vm in range(2)}
    assert described["events"]["total"] == 20000 * 6 + sum(  # and the kicks that flushed quiet vCPUs
        v["by_reason"].get("intr", 0) for v in described["events"]["by_vm"])


@pytest.mark.kvm
def test_a_link_cut_for_five_seconds_loses_nothing(netns, recorder, keys_dir, tmp_path, perf):
    trace = tmp_path / "cut.vmtrace"
    rec = recorder(trace)
    launch = launch_in(netns, netns.launch_ns, f"tcp://{netns.recorder_addr}:{PORT}", keys_dir,
                       "seed16", "--vms", "4", "--timeout", "12")
    # Cut once the run is going, for 5 s: the cut itself is the scenario (a timed outage).
    lines: list[str] = []
    until = time.monotonic() + DEADLINE
    while not any("recording at" in line for line in lines):
        line = launch.stderr.readline()
        assert line and time.monotonic() < until, "".join(lines)
        lines.append(line)
    netns.link(up=False)
    try:
        time.sleep(5.0)
    finally:
        netns.link(up=True)
    err = "".join(lines) + finished(launch)
    assert launch.returncode in (0, 4), err  # 4: ended by --timeout
    said = rec.stop()
    assert "no gaps" in said, said
    exits = io_exits_by_run(trace)[run_id_of(err)]
    assert sorted(exits) == [0, 1, 2, 3]
    assert sum(exits.values()) == _perf_counts(err)["kvm:kvm_pio"] > 0
    assert "0 undelivered" in err, err


@pytest.mark.kvm
def test_a_launch_whose_key_is_not_authorized_is_refused_before_any_vm_runs(netns, recorder, keys_dir, tmp_path):
    trace = tmp_path / "refused.vmtrace"
    rec = recorder(trace)
    stranger = tmp_path / "stranger"
    subprocess.run([*VMSUP, "keys", "--dir", str(stranger)], cwd=REPO, check=True, capture_output=True, timeout=60)
    (stranger / "server.key").write_bytes((keys_dir / "server.key").read_bytes())  # the right server, a wrong client
    launch = launch_in(netns, netns.launch_ns, f"tcp://{netns.recorder_addr}:{PORT}", stranger, "seed16", "--vms", "2",
                       perf_counts=False)
    err = finished(launch)
    assert launch.returncode == 2, err
    assert err.strip().splitlines()[-1].startswith("vmsup: error: the recorder at"), err
    assert "refused this launch's CURVE key" in err and "recording at" not in err
    said = rec.stop()
    assert re.search(r"refused: \d+ × client refused: its CURVE key is not authorized", said), said
    with TraceReader(trace) as r:
        assert r.records(schema.MSG_VM_START) == []
        causes = {c for rec_ in r.records(schema.MSG_REFUSED) for c in rec_["causes"]}
    assert "client refused: its CURVE key is not authorized" in causes


def test_an_unreachable_recorder_is_one_line_after_a_bounded_wait(vmsup, keys_dir):
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = vmsup("launch", "seed16", "--vms", "2", "--recorder", f"tcp://127.0.0.1:{port}", "--keys-dir", str(keys_dir),
                 env={**os.environ, "VMSUP_RECORDER_CONNECT_TIMEOUT": "1"})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (f"vmsup: error: no recorder answered at tcp://127.0.0.1:{port} "
                                                    f"within 1 s (is 'vmsup record --listen' running there, and reachable?)")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, fragment", [
    (["--recorder", "tcp://127.0.0.1:5555", "--trace", "x.vmtrace"], "not with --listen, --trace or --no-trace"),
    (["--recorder", "udp://127.0.0.1:5555"], "--recorder udp://127.0.0.1:5555: only tcp://HOST:PORT"),
])
def test_bad_recorder_options_are_one_line(vmsup, keys_dir, args, fragment):
    proc = vmsup("launch", "seed16", *args, "--keys-dir", str(keys_dir))
    assert proc.returncode == 2 and fragment in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_recorder_without_client_keys_is_refused_before_any_vm_runs(vmsup, tmp_path):
    proc = vmsup("launch", "seed16", "--recorder", "tcp://127.0.0.1:5555", "--keys-dir", str(tmp_path / "none"))
    assert proc.returncode == 2, proc.stderr
    assert "needs CURVE keys in" in proc.stderr and "client.key_secret" in proc.stderr


@pytest.mark.kvm
def test_live_views_work_on_the_host_of_a_remote_launch(vmsup, keys_dir, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    rec = RecordProcess([], keys_dir, tmp_path / "live.vmtrace", listen=endpoint)
    try:
        started = vmsup("launch", "seed16", "--timeout", "60", "--detach", "--recorder", endpoint,
                        "--keys-dir", str(keys_dir))
        assert started.returncode == 0, started.stderr
        tail = vmsup("tail", "-n", "3", "--json", timeout=DEADLINE)
        assert tail.returncode == 0 and len(tail.stdout.splitlines()) == 3, tail.stdout + tail.stderr
        assert vmsup("stop", "--all").returncode == 0
        until = time.monotonic() + DEADLINE  # the launch ends (its relay drained) before the recorder does
        while vmsup("ps", "--json").stdout.strip() not in ("[]", ""):
            assert time.monotonic() < until, "the stopped launch did not end"
            time.sleep(0.1)
    finally:
        said = rec.stop()
    assert "1 run recorded" in said, said


def test_record_closes_its_trace_cleanly_on_sigterm(keys_dir, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    trace = tmp_path / "term.vmtrace"
    rec = RecordProcess([], keys_dir, trace, listen=endpoint)
    rec.proc.send_signal(signal.SIGTERM)
    said = rec.stop()
    assert rec.proc.returncode == 0 and "Traceback" not in said, said
    assert "0 runs recorded" in said
    with TraceReader(trace) as r:
        assert r.records(schema.MSG_VM_START) == []
    verify = subprocess.run([*VMSUP[:-1], "tracetool", "verify", str(trace)], cwd=REPO, capture_output=True, text=True,
                            timeout=DEADLINE)
    assert verify.returncode == 0 and "closed cleanly" in verify.stdout, verify.stdout + verify.stderr


def test_record_bad_input_is_one_line(vmsup, keys_dir, tmp_path):
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cases = [
            (["--listen", "tcp://127.0.0.1:5555", "--keys-dir", str(tmp_path / "none")], "needs CURVE keys"),
            (["--listen", "ipc:///tmp/x", "--keys-dir", str(keys_dir)], "only tcp://HOST:PORT"),
            (["--listen", f"tcp://127.0.0.1:{port}", "--keys-dir", str(keys_dir)], f"cannot listen on tcp://127.0.0.1:{port}"),
            (["--listen", "tcp://127.0.0.1:5555", "--keys-dir", str(keys_dir), "--trace", str(tmp_path / "no" / "t")],
             "does not exist"),
        ]
        for args, fragment in cases:
            proc = vmsup("record", *args, "--trace", str(tmp_path / "t.vmtrace")) if "--trace" not in args else \
                vmsup("record", *args)
            lines = proc.stderr.strip().splitlines()
            assert proc.returncode == 2 and len(lines) == 1 and fragment in lines[0], (args, proc.stderr)


class _RelayAndRecorder(_Feeder):
    """Each message to a real recorder and, as a launch's relay takes it off the bus, to a RunTally."""

    def __init__(self, recorder: Recorder, keys: BusKeys, endpoint: str) -> None:
        super().__init__(recorder, keys, endpoint)
        self.relay = RunTally()

    def send(self, message: messages.Message, supervisor: bool = False) -> None:
        super().send(message, supervisor)
        self.relay.take(messages.unpack(messages.pack(message)))


def test_a_relay_counts_the_exits_a_recorder_counts_over_many_epochs_holding_only_the_last_ones(tmp_path):
    run_path = tmp_path / "run"
    run_path.mkdir(mode=0o700)
    keys = BusKeys.new("relay")
    rec = Recorder(RunDir("relay", run_path), None, {"vms": [{"vm_id": 0}]}, keys)
    feed = _RelayAndRecorder(rec, keys, RunDir("relay", run_path).events_endpoint)
    try:
        epochs = 50
        for epoch in range(epochs):
            _run_epoch(feed, 0, epoch)
        feed.send(messages.VmStart(vm=0, epoch=epochs, name="restarter", vcpus=1))
        feed.send(_batch(0, 0, epochs, 0))  # a running epoch: its streams' reach, no vm-end yet
        total = epochs * VCPUS * BATCHES * ROWS + ROWS
        assert feed.relay.vm(0).exits == rec.tally.vm(0).exits == total
        assert len(feed.relay.vm(0).epochs) <= 2  # however many epochs the VM ran
        feed.relay.take(messages.unpack(messages.pack(_batch(0, 0, 3, BATCHES * ROWS))))  # a stale one
        assert feed.relay.vm(0).exits == total
    finally:
        feed.close()
        rec.close()


def _ps_exits(vmsup) -> list[int]:
    runs = json.loads(vmsup("ps", "--json").stdout or "[]")
    return [vm["exits"] for run in runs for vm in run["vms"]]


@pytest.mark.kvm
def test_a_remote_launch_shows_its_exits_in_ps_and_keeps_them_when_the_recorder_dies(vmsup, keys_dir, tmp_path):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    rec = RecordProcess([], keys_dir, tmp_path / "dies.vmtrace", listen=endpoint)
    launch = subprocess.Popen([*VMSUP, "launch", "seed16", "--vms", "2", "--timeout", "100", "-q", "--recorder", endpoint,
                               "--keys-dir", str(keys_dir)], cwd=REPO, stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        # While it runs, ps shows each VM's exits: counted by the launch's relay, not by a recorder here.
        until = time.monotonic() + DEADLINE
        while len(seen := _ps_exits(vmsup)) != 2 or min(seen) == 0:
            assert time.monotonic() < until and launch.poll() is None, "ps never showed a remote launch's exits"
            time.sleep(0.1)
        rec.proc.kill()
        rec.stop()
        counted = sum(_ps_exits(vmsup))
        # The workers' last messages (their vm-ends) find the connection gone: never delivered.
        launch.send_signal(signal.SIGTERM)
        err = finished(launch)
    finally:
        if launch.poll() is None:
            launch.kill()
            launch.wait()
    line = next((line for line in err.splitlines() if "sent to the recorder at" in line), err)
    exits = int(re.search(r": (\d+) exits of 2 VMs", line).group(1))
    assert exits >= counted > 0, line
    assert re.search(r"\d+ messages? could not be delivered", line), line
    assert "the connection dropped 1 time" in line, line
