"""CURVE keys and the tcp endpoint: `vmsup keys` and `vmsup launch --listen tcp://…`.

A tcp endpoint is refused without keys; with keys, a real PUSH client holding the client key gets a
record into the trace through CURVE, while clients without keys, with a key that is not authorised,
or expecting another server get nothing through. Each client's fate is read from its own socket
monitor (handshake succeeded or failed), never from a sleep. Loopback addresses only.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import msgpack
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from supervisor.keys import ClientKeys, KeyPaths, configure_client, load_client
from supervisor.commands import RecorderClient
from supervisor.runtime import RunDir
from tracetool import schema
from tracetool.trace import TraceReader

from conftest import REPO, VMSUP

EXIT_BAD_INPUT = 2
DEADLINE = 30.0


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def one_error_line(proc) -> str:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("vmsup: error: "), lines[0]
    assert proc.returncode == EXIT_BAD_INPUT
    return lines[0]


def env_with(**extra) -> dict:
    return {**os.environ, **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def keys_dir(vmsup, tmp_path) -> Path:
    directory = tmp_path / "keys"
    proc = vmsup("keys", "--dir", str(directory))
    assert proc.returncode == 0, proc.stderr
    return directory


def test_keys_creates_private_key_pairs_and_says_where(vmsup, tmp_path):
    directory = tmp_path / "cfg" / "keys"
    proc = vmsup("keys", "--dir", str(directory))
    assert proc.returncode == 0, proc.stderr
    assert str(directory) in proc.stdout
    paths = KeyPaths(directory)
    assert mode_of(directory) == mode_of(paths.clients_dir) == 0o700
    for f in paths.files():
        assert f.is_file() and mode_of(f) == 0o600, f
    keys = load_client(directory)
    assert len(keys.public) == len(keys.secret) == len(keys.server_public) == 40  # Z85 of 32 bytes
    assert paths.authorised_client.read_bytes() == paths.client_public.read_bytes()


def test_keys_default_to_the_xdg_config_dir(vmsup, tmp_path):
    proc = vmsup("keys", env=env_with(XDG_CONFIG_HOME=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert KeyPaths(tmp_path / "vmsup" / "keys").server_secret.is_file()


def test_keys_refuse_to_overwrite_unless_forced(vmsup, keys_dir):
    secret = KeyPaths(keys_dir).server_secret
    before = secret.read_bytes()
    line = one_error_line(vmsup("keys", "--dir", str(keys_dir)))
    assert "already exist" in line and "--force" in line
    assert secret.read_bytes() == before
    proc = vmsup("keys", "--dir", str(keys_dir), "--force")
    assert proc.returncode == 0, proc.stderr
    assert secret.read_bytes() != before and mode_of(secret) == 0o600


def test_listen_tcp_without_keys_is_refused_before_any_vm_runs(vmsup, tmp_path):
    trace = tmp_path / "t.vmtrace"
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    proc = vmsup("launch", "seed16", "--timeout", "3", "--listen", f"tcp://127.0.0.1:{free_port()}",
                 "--trace", str(trace), env=env_with(XDG_CONFIG_HOME=str(tmp_path / "empty"),
                                                     XDG_RUNTIME_DIR=str(runtime)))
    line = one_error_line(proc)
    assert "needs CURVE keys" in line and "'vmsup keys'" in line
    assert proc.stdout == ""
    assert not trace.exists()
    assert not (runtime / "vmsup").exists() or not any((runtime / "vmsup").iterdir())  # no run was created


@pytest.mark.parametrize("endpoint, fragment", [
    ("ipc:///tmp/events.sock", "only tcp://HOST:PORT"),
    ("inproc://events", "only tcp://HOST:PORT"),
    ("tcp://127.0.0.1", "is not an endpoint like tcp://"),
    ("127.0.0.1:5555", "is not an endpoint like tcp://"),
    ("tcp://127.0.0.1:99999", "port 99999 is not in 1..65535"),
    ("tcp://127.0.0.1:0", "port 0 is not in 1..65535"),
    ("tcp://127.0.0.1:5555/x", "is not an endpoint"),
])
def test_bad_listen_endpoint_is_one_line(vmsup, keys_dir, endpoint, fragment):
    proc = vmsup("launch", "seed16", "--listen", endpoint, "--keys-dir", str(keys_dir), "--no-trace")
    assert fragment in one_error_line(proc)
    assert proc.stdout == ""


def test_keys_readable_by_others_are_refused(vmsup, keys_dir):
    os.chmod(KeyPaths(keys_dir).server_secret, 0o644)
    proc = vmsup("launch", "seed16", "--listen", f"tcp://127.0.0.1:{free_port()}", "--keys-dir", str(keys_dir),
                 "--no-trace")
    assert "accessible to other users" in one_error_line(proc)


# End to end ------------------------------------------------------------------------------------

class Client:
    """A PUSH socket to the recorder's tcp endpoint, with a monitor telling how its handshake went."""

    HANDSHAKE_ENDS = {zmq.EVENT_HANDSHAKE_SUCCEEDED, zmq.EVENT_HANDSHAKE_FAILED_AUTH,
                      zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL, zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL}

    def __init__(self, context: zmq.Context, endpoint: str, keys: ClientKeys | None) -> None:
        self.socket = context.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.LINGER, 0)
        if keys is not None:
            configure_client(self.socket, keys)
        self.monitor = self.socket.get_monitor_socket()
        self.socket.connect(endpoint)

    def handshake(self) -> int:
        """The first handshake outcome (zmq.EVENT_HANDSHAKE_*), waiting up to DEADLINE."""
        until = time.monotonic() + DEADLINE
        while time.monotonic() < until:
            if self.monitor.poll(100):
                event = recv_monitor_message(self.monitor)["event"]
                if event in self.HANDSHAKE_ENDS:
                    return event
        pytest.fail("no handshake outcome before the deadline")

    def close(self) -> None:
        self.socket.disable_monitor()
        self.monitor.close(linger=0)
        self.socket.close(linger=0)


def vm_start(vm: int, name: str) -> bytes:
    """A schema-conformant vm-start bus message, as a worker on another host would send it."""
    return msgpack.packb({"v": schema.SCHEMA_VERSION, "type": schema.MSG_VM_START, "vm": vm, "epoch": 0,
                          "name": name, "spec": {}, "sha256": "0" * 64, "mem_size": 16 << 20, "mode": "real",
                          "vcpus": 1, "pid": 1, "t": time.monotonic_ns(), "wall": time.time_ns()},
                         use_bin_type=True)


def wait_for(condition, what: str):
    until = time.monotonic() + DEADLINE
    while time.monotonic() < until:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


@pytest.mark.kvm
def test_only_clients_with_an_authorised_key_reach_the_recorder_over_tcp(keys_dir, tmp_path):
    runtime = tmp_path / "xdg"
    runtime.mkdir(mode=0o700)
    trace = tmp_path / "remote.vmtrace"
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    # A long --timeout that is never reached: the test ends the run with SIGINT once it has seen
    # what it needs, so a slow machine cannot make it fail.
    launch = subprocess.Popen([*VMSUP, "launch", "seed16", "-q", "--timeout", "120", "--listen", endpoint,
                               "--keys-dir", str(keys_dir), "--trace", str(trace)],
                              cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              env=env_with(XDG_RUNTIME_DIR=str(runtime)), text=True)
    stderr: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [stderr.put(line) for line in launch.stderr], daemon=True)
    reader.start()
    context = zmq.Context()
    clients: list[Client] = []
    try:
        until = time.monotonic() + DEADLINE
        while True:  # "vmsup: run ID: …" is printed once the recorder is bound and ready
            line = stderr.get(timeout=max(0.0, until - time.monotonic()))
            assert "error" not in line, line
            if line.startswith("vmsup: run "):
                break
        run_id = line.split()[2].rstrip(":")
        recorder = RecorderClient(RunDir(run_id, runtime / "vmsup" / run_id), timeout=5.0)

        def stats() -> dict:
            return recorder.call("stats") or {}

        good = load_client(keys_dir)
        stranger_public, stranger_secret = zmq.curve_keypair()
        _, wrong_server = zmq.curve_keypair()
        strangers = {
            "no CURVE at all": None,
            "a key that is not authorised": ClientKeys(stranger_public, stranger_secret, good.server_public),
            "the right key, another server's": ClientKeys(good.public, good.secret, wrong_server),
        }
        for why, keys in strangers.items():
            client = Client(context, endpoint, keys)
            clients.append(client)
            client.socket.send(b"\x00not msgpack", flags=zmq.NOBLOCK)
            client.socket.send(vm_start(66, "intruder"), flags=zmq.NOBLOCK)
            assert client.handshake() != zmq.EVENT_HANDSHAKE_SUCCEEDED, why
        assert sum(stats()["bad_messages"].values()) == 0
        assert "66" not in stats()["vms"]

        trusted = Client(context, endpoint, good)
        clients.append(trusted)
        trusted.socket.send(b"\x00not msgpack")
        trusted.socket.send(vm_start(99, "remote"))
        assert trusted.handshake() == zmq.EVENT_HANDSHAKE_SUCCEEDED
        wait_for(lambda: "99" in stats().get("vms", {}), "the remote vm-start to reach the recorder")
        wait_for(lambda: sum(stats()["bad_messages"].values()) == 1, "the malformed message to be counted")
        # The local VM has started (a SIGINT to a worker still importing Python would be a different test).
        wait_for(lambda: stats()["vms"].get("0", {}).get("events", 0) > 0, "the local VM's first exits")
        recorder.close()
    finally:
        for client in clients:
            client.close()
        context.destroy(linger=0)
        if launch.poll() is None:
            launch.send_signal(signal.SIGINT)
        launch.wait(timeout=DEADLINE)
        reader.join(timeout=DEADLINE)

    lines = []
    while not stderr.empty():
        lines.append(stderr.get())
    summary = "".join(lines)
    assert "Traceback" not in summary, summary
    assert "1 malformed messages dropped" in summary, summary
    with TraceReader(trace) as r:
        names = {rec["vm"]: rec["name"] for rec in r.records(schema.MSG_VM_START)}
    assert names[99] == "remote"
    assert "intruder" not in names.values() and 66 not in names
    assert names[0] == "seed16"
