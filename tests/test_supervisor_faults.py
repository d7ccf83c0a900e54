"""Faults the supervisor must survive, with real processes: restart policy and FATAL, backoff to
its cap, kill -9 of a worker, of the recorder and of the supervisor itself, Ctrl-C and SIGTERM,
hostile VMs in a fleet, per-VM limits, control from another terminal, and a second user who must
not reach a run (issue 4).

Every wait is a condition with a deadline; timing figures the supervisor records (lifecycle
times, CPU ticks) are compared with the policy or as ratios, never with the wall clock.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from supervisor import commands, runtime
from supervisor.commands import RecorderClient
from conftest import REPO, VMSUP
from procfs import children
from tracetool import schema
from tracetool.trace import TraceReader

pytestmark = pytest.mark.kvm

DEADLINE = 30.0  # seconds any single condition may take on a slow, loaded machine
EXIT_SHUTDOWN, EXIT_VM_ERROR, EXIT_TIMEOUT = 3, 5, 4
NOBODY = 65534

# Hostile and hungry guests, as flat binaries (each line: bytes, then the instruction).
SERIAL_FLOOD = bytes.fromhex(  # real mode: one 8250 THR write per loop, forever
    "baf803"  # mov dx, 0x3f8        COM1 transmit holding register
    "b041"  # mov al, 'A'
    "ee"  # 1: out dx, al
    "ebfd")  # jmp 1b
SPIN = bytes.fromhex("ebfe")  # real mode: jmp $ — burns its vCPU, never exits to the VMM
TOUCH_64M = bytes.fromhex(  # protected mode, paging off: one byte per 4 KiB page over 64 MiB, then spin
    "bf00001000"  # mov edi, 0x100000
    "c60701"  # 1: mov byte [edi], 1
    "81c700100000"  # add edi, 0x1000
    "81ff00001004"  # cmp edi, 0x4100000
    "72ef"  # jb 1b
    "ebfe")  # jmp $ — keep the pages, make no exits


# --- helpers ---------------------------------------------------------------------------------------
def wait_for(condition, what: str, timeout: float = DEADLINE, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def proc_state(pid: int) -> str | None:
    """The one-letter state of /proc/PID/stat, None when the process is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return None


def gone(pid: int) -> bool:
    return proc_state(pid) in (None, "Z", "X")  # a zombie has ended; only its parent's wait is missing


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (/proc/PID/stat fields 14 and 15), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def recorder_pid(supervisor_pid: int) -> int:
    found = [pid for pid, cmd in children(supervisor_pid).items() if b"supervisor.recorder" in cmd]
    assert len(found) == 1, children(supervisor_pid)
    return found[0]


def cli(*args: str, timeout: float = DEADLINE) -> subprocess.CompletedProcess:
    return subprocess.run([*VMSUP, *args], cwd=REPO, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


def cli_ps() -> list[dict]:
    proc = cli("ps", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def ps(rd: runtime.RunDir) -> dict:
    """The run's ps reply, through its control socket (what `vmsup ps` does, without a new process)."""
    return commands.call(rd, commands.COMMANDS["ps"].request())


def vm_row(rd: runtime.RunDir, name: str) -> dict:
    return next(vm for vm in ps(rd)["vms"] if vm["name"] == name)


def lifecycle(reader: TraceReader, vm: int | None = None) -> list[dict]:
    return [r for r in reader.records(schema.MSG_LIFECYCLE) if vm is None or r["vm"] == vm]


def counts_up_from_zero(reader: TraceReader, vm: int, epoch: int) -> int:
    """Assert the seed guest's stream (vm, epoch) holds seq 0, 1, … and data 0, 1, … (mod 2**16,
    the guest's `out %ax`); the number of events recorded."""
    ex = reader.exits(vm=vm, epoch=epoch)
    assert np.array_equal(ex["seq"], np.arange(len(ex["seq"]))), f"vm {vm} epoch {epoch}: a hole in seq"
    data = ex["data"][ex["reason"] == schema.REASON_IO]
    assert np.array_equal(data, np.arange(len(data)) & 0xFFFF), f"vm {vm} epoch {epoch}: a hole in the data"
    return len(ex["seq"])


class Background:
    """`vmsup launch …` as a child in its own session (so a test can Ctrl-C its process group)."""

    def __init__(self, workdir: Path, *args: str) -> None:
        self.err_path = workdir / f"launch-{time.monotonic_ns()}.err"
        with open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([*VMSUP, "launch", *args], cwd=REPO, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        self.pid = self.proc.pid

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def run_dir(self) -> runtime.RunDir:
        def mine():
            if self.proc.poll() is not None:
                pytest.fail(f"vmsup launch ended early ({self.proc.returncode}): {self.stderr}")
            return next((rd for rd in runtime.live_runs() if rd.read_info().get("pid") == self.pid), None)
        rd = wait_for(mine, "the launch's run dir")
        wait_for(lambda: (rd.path / "control.sock").exists(), "the control socket")
        return rd

    def wait(self, timeout: float = DEADLINE) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"vmsup launch did not end within {timeout:g} s: {self.stderr}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.pid, signal.SIGKILL)  # workers follow by PR_SET_PDEATHSIG
            self.proc.wait()


@pytest.fixture
def launches(tmp_path):
    """Start background launches; whatever a failed test leaves running is killed by its pid."""
    started: list[Background] = []

    def start(*args: str) -> Background:
        launch = Background(tmp_path, *args)
        started.append(launch)
        return launch

    yield start
    for launch in started:
        launch.kill()
    base = runtime.base_dir()  # detached runs of this test (its private XDG_RUNTIME_DIR)
    for info in base.glob("*/run.json") if base.is_dir() else []:
        pid = json.loads(info.read_text()).get("pid")
        if isinstance(pid, int) and pid != os.getpid() and not gone(pid):
            os.kill(pid, signal.SIGKILL)


def recorder_events(rd: runtime.RunDir, vm: int = 0) -> dict:
    client = RecorderClient(rd, timeout=2.0)
    try:
        return ((client.call("stats") or {}).get("vms") or {}).get(str(vm), {})
    finally:
        client.close()


# --- 1. restart policy -----------------------------------------------------------------------------
def test_triplefault_under_restart_always_ends_fatal_after_retries_plus_one_starts(vmsup, tmp_path):
    trace = tmp_path / "fatal.vmtrace"
    # --backoff-max 0.5 only shortens the waits; the give-up rule is what is under test.
    proc = vmsup("launch", "triplefault", "--restart", "always", "--retries", "3", "--startsecs", "5",
                 "--backoff-max", "0.5", "--trace", str(trace))
    assert proc.returncode == EXIT_VM_ERROR, proc.stderr
    status_line = proc.stderr.strip().splitlines()[-1]
    reason = "fatal (gave up after 4 starts in a row that ended within 5 s;"
    assert status_line.startswith(f"vmsup: triplefault: {reason}"), status_line
    assert "last: shutdown" in status_line
    with TraceReader(trace) as r:
        events = [(x["event"], x["epoch"]) for x in lifecycle(r)]
        exits = [x for x in lifecycle(r) if x["event"] == "exit"]
        give_up = [x for x in lifecycle(r) if x["event"] == "give-up"]
        ends = r.records(schema.MSG_VM_END)
        assert r.closed_cleanly and r.torn_tail is None
    assert events == [("spawn", 0), ("exit", 0), ("restart", 1), ("exit", 1), ("restart", 2), ("exit", 2),
                      ("restart", 3), ("exit", 3), ("give-up", 3)]
    assert [(x["status"], x["code"], x.get("signal")) for x in exits] == [("shutdown", EXIT_SHUTDOWN, None)] * 4
    assert give_up[0]["status"] == "fatal" and "gave up after 4 starts" in give_up[0]["detail"]
    assert [(e["epoch"], e["status"]) for e in ends] == [(n, "shutdown") for n in range(4)]


@pytest.mark.parametrize("guest, policy, starts, code", [
    ("long64", "on-failure", 1, 0),  # guest exit code 0: a success, not restarted
    ("triplefault", "on-failure", 2, EXIT_VM_ERROR),  # a failure: restarted, then FATAL (--retries 1)
    ("triplefault", "no", 1, EXIT_SHUTDOWN),  # never restarted, whatever happened
])
def test_restart_policy_decides_whether_an_ended_vm_comes_back(vmsup, tmp_path, guest, policy, starts, code):
    trace = tmp_path / "policy.vmtrace"
    proc = vmsup("launch", guest, "--restart", policy, "--retries", "1", "--backoff-max", "0.5", "-q",
                 "--trace", str(trace))
    assert proc.returncode == code, proc.stderr
    with TraceReader(trace) as r:
        spawns = [x["epoch"] for x in lifecycle(r) if x["event"] in ("spawn", "restart")]
        ends = [x["status"] for x in r.records(schema.MSG_VM_END)]
    assert spawns == list(range(starts))
    assert len(ends) == starts
    assert ends[-1] == ("guest-exit" if guest == "long64" else "shutdown")


# --- 2. backoff and CPU ----------------------------------------------------------------------------
def test_backoff_grows_to_its_cap_and_the_supervisor_stays_idle_meanwhile(launches, tmp_path):
    trace = tmp_path / "backoff.vmtrace"
    cap, jitter = 1.0, 0.2  # --backoff-max; RestartPolicy.backoff_jitter
    launch = launches("triplefault", "--restart", "always", "--retries", "1000", "--backoff-max", str(cap),
                      "--startsecs", "5", "-q", "--trace", str(trace))
    rd = launch.run_dir()
    wait_for(lambda: vm_row(rd, "triplefault")["restarts"] >= 1, "the first restart")
    cpu0, t0 = cpu_seconds(launch.pid), time.monotonic()  # after start-up (imports are not idling)
    wait_for(lambda: vm_row(rd, "triplefault")["epoch"] >= 4, "four restarts")
    cpu1, t1 = cpu_seconds(launch.pid), time.monotonic()
    proc = cli("stop", "--all")
    assert proc.returncode == 0, proc.stderr
    assert launch.wait() == 0, launch.stderr  # stopped on request
    # Restarting a crashing VM in backoff costs the supervisor a small share of one core.
    ratio = (cpu1 - cpu0) / (t1 - t0)
    assert ratio < 0.5, f"supervisor used {ratio:.2f} of a core while restarting"

    with TraceReader(trace) as r:
        records = lifecycle(r)
        assert r.closed_cleanly
    delays, last_exit = [], None
    for x in records:
        if x["event"] == "exit":
            last_exit = x["t"]
        elif x["event"] == "restart":
            delays.append((x["t"] - last_exit) / 1e9)
    assert len(delays) >= 4
    assert "give-up" not in [x["event"] for x in records]
    # The policy: 0.5 s ± 20 %, then doubling, capped at 1 s (the cap holds after jitter).
    assert 0.5 * (1 - jitter) <= delays[0] < cap * (1 - jitter), delays
    assert all(cap * (1 - jitter) <= d <= cap * (1 + jitter) for d in delays[1:]), delays


# --- 3. kill -9 a worker, many times ---------------------------------------------------------------
def test_workers_killed_at_random_points_restart_and_every_loss_is_an_explicit_gap(launches, tmp_path):
    trace = tmp_path / "kills.vmtrace"
    # --backoff-max 0.1: the restarts themselves are not under test here, only what each kill leaves.
    launch = launches("seed16", "--restart", "always", "--startsecs", "0.2", "--backoff-max", "0.1", "-q",
                      "--trace", str(trace))
    rd = launch.run_dir()
    rng = random.Random(4)
    # How far each epoch gets before its kill: 0 = as soon as the recorder saw its vm-start.
    thresholds = [0, *(rng.randrange(1, 60_000) for _ in range(5))]
    thresholds.insert(3, 0)
    killed = []
    for epoch, threshold in enumerate(thresholds):
        if threshold:
            [row] = cli_ps()[0]["vms"]  # what a user sees, from another terminal
            assert row["epoch"] == epoch and row["state"] in ("starting", "running"), row
        else:  # too early for a new process: ask the control socket as often as it takes
            row = wait_for(lambda: next((v for v in ps(rd)["vms"] if v["epoch"] == epoch and v["pid"]), None),
                           f"epoch {epoch} to start", interval=0.002)
        def vm_started():  # the recorder has this epoch's vm-start
            seen = recorder_events(rd)
            return seen if seen.get("epoch") == epoch and seen.get("state") == "running" else None
        started = wait_for(vm_started, f"the recorder to see epoch {epoch} start", interval=0.002)
        wait_for(lambda: recorder_events(rd).get("events", 0) >= started["events"] + threshold,
                 f"epoch {epoch} to record {threshold} events", interval=0.002)
        os.kill(row["pid"], signal.SIGKILL)
        killed.append(row["pid"])
        wait_for(lambda: any(v["epoch"] == epoch + 1 for v in ps(rd)["vms"]), f"the restart after kill {epoch}")
    proc = cli("stop", "seed16")
    assert proc.returncode == 0, proc.stderr
    assert launch.wait() == 0, launch.stderr

    kills = len(thresholds)
    with TraceReader(trace) as r:  # raises on anything but a readable file
        assert r.torn_tail is None and r.closed_cleanly
        assert r.unexplained_gaps == []
        starts = [x["epoch"] for x in lifecycle(r) if x["event"] in ("spawn", "restart")]
        exits = {x["epoch"]: x for x in lifecycle(r) if x["event"] == "exit"}
        vm_starts = [x["epoch"] for x in r.records(schema.MSG_VM_START)]
        gaps = {g["epoch"]: g for g in r.gaps}
        recorded = {e: counts_up_from_zero(r, 0, e) for e in range(kills + 1)}
        [end] = r.records(schema.MSG_VM_END)
    assert starts == vm_starts == list(range(kills + 1))  # one epoch per start
    for epoch, pid in enumerate(killed):
        assert (exits[epoch]["pid"], exits[epoch]["signal"]) == (pid, signal.SIGKILL)
        gap = gaps.get(epoch)  # nothing silent: what died with the worker is said to be lost
        assert gap is not None, f"epoch {epoch} (killed after {thresholds[epoch]}+ events) has no gap record"
        assert (gap["count_known"], gap["first_missing"]) == (False, recorded[epoch])
    assert kills not in gaps
    assert (end["epoch"], end["status"], end["final_seq"]) == (kills, "terminated", [recorded[kills]])


# --- 4. kill -9 the recorder -----------------------------------------------------------------------
def test_a_killed_recorder_is_restarted_and_what_it_lost_is_a_gap(launches, tmp_path):
    trace = tmp_path / "recorder.vmtrace"
    total = 200_000
    launch = launches("seed16", "--max-exits", str(total), "-q", "--trace", str(trace))
    rd = launch.run_dir()

    def trace_has_exits():  # the recorder writes gathered batches out once a second
        with TraceReader(trace) as r:
            return r.event_count > 0
    wait_for(trace_has_exits, "the first exits in the trace file", interval=0.1)
    old = recorder_pid(launch.pid)
    os.kill(old, signal.SIGKILL)
    new = wait_for(lambda: next((p for p, cmd in children(launch.pid).items()
                                 if p != old and b"supervisor.recorder" in cmd), None), "a new recorder")
    assert b"--resume" in children(launch.pid)[new]
    assert launch.wait() == 0, launch.stderr
    assert "vmsup: the recorder died (-9) and was restarted" in launch.stderr

    with TraceReader(trace) as r:  # the restarted recorder closed the file with an index over every block
        assert r.torn_tail is None and r.closed_cleanly and not r.warnings
        assert r.unexplained_gaps == []
        ex = r.exits(vm=0)
        gaps = r.gaps
        [end] = r.records(schema.MSG_VM_END)
    assert end["status"] == "max-exits" and end["exits"] == total
    assert all(g["count_known"] and g["cause"] == "lost before reaching the recorder" for g in gaps)
    lost = sum(g["count"] for g in gaps)
    assert len(ex["seq"]) + lost == end["exits"] + end.get("kicks", 0) == end["final_seq"][0]
    assert len(np.unique(ex["seq"])) == len(ex["seq"])
    cut = min((g["first_missing"] for g in gaps), default=len(ex["seq"]))
    assert ex["seq"].min() == 0 and ex["seq"].max() == end["final_seq"][0] - 1  # events before and after
    assert cut > 0
    # Every kept event is the right one: between the holes, the guest's counter goes up by one per io exit.
    for part in np.split(np.arange(len(ex["seq"])), np.flatnonzero(np.diff(ex["seq"]) != 1) + 1):
        data = ex["data"][part][ex["reason"][part] == schema.REASON_IO]
        assert np.all(np.diff(data.astype(np.int64)) % 0x10000 == 1)
    assert ex["data"][0] == 0


# --- 5. kill -9 the supervisor ---------------------------------------------------------------------
def test_a_killed_supervisor_takes_every_worker_and_the_recorder_with_it(launches, tmp_path, vmsup):
    trace = tmp_path / "orphans.vmtrace"
    launch = launches("seed16", "--vms", "2", "-q", "--trace", str(trace))
    rd = launch.run_dir()
    wait_for(lambda: all(recorder_events(rd, vm).get("events", 0) > 0 for vm in (0, 1)), "both VMs' first exits")
    workers = [vm["pid"] for vm in ps(rd)["vms"]]
    pids = [*workers, recorder_pid(launch.pid)]
    assert all(isinstance(p, int) for p in pids)
    os.kill(launch.pid, signal.SIGKILL)
    launch.proc.wait()
    wait_for(lambda: all(gone(p) for p in pids), "the workers and the recorder to end", timeout=2.0)

    with TraceReader(trace) as r:  # readable up to its last whole block
        assert r.event_count > 0
        assert r.unexplained_gaps == []
        cut = {(g["vm"], g["epoch"]) for g in r.gaps if not g["count_known"]}
    # Nothing silent: the recorder, told by PR_SET_PDEATHSIG, says where each VM's stream was cut.
    assert cut == {(0, 0), (1, 0)}

    # The dead run's directory stays behind; it is not fatal and the next launch removes it.
    assert rd.path.is_dir()
    proc = vmsup("ps")
    assert (proc.returncode, proc.stdout.strip()) == (0, "no vmsup launch is running"), proc.stderr
    proc = vmsup("launch", "seed16", "--max-exits", "10", "-q", "--no-trace")
    assert proc.returncode == 0, proc.stderr
    assert not rd.path.exists()


# --- 6. Ctrl-C and SIGTERM -------------------------------------------------------------------------
@pytest.mark.parametrize("how, vms", [("SIGTERM to the supervisor", 2), ("Ctrl-C", 2), ("Ctrl-C", 1)])
def test_sigterm_or_ctrl_c_stops_every_vm_gracefully_and_closes_the_trace(launches, tmp_path, how, vms):
    trace = tmp_path / "stop.vmtrace"
    launch = launches("seed16", "--vms", str(vms), "-q", "--trace", str(trace))
    rd = launch.run_dir()
    wait_for(lambda: all(recorder_events(rd, vm).get("events", 0) > 0 for vm in range(vms)), "every VM's first exits")
    if how == "Ctrl-C":
        os.killpg(launch.pid, signal.SIGINT)  # the terminal signals its whole foreground process group
    else:
        os.kill(launch.pid, signal.SIGTERM)
    # Documented: a VM stopped on request ends "stopped" and the launch exits 0.
    assert launch.wait() == 0, launch.stderr
    assert "stopped" in launch.stderr and "Traceback" not in launch.stderr
    with TraceReader(trace) as r:
        assert r.closed_cleanly and r.torn_tail is None
        assert r.gaps == [] and r.unexplained_gaps == []
        ends = {e["vm"]: e for e in r.records(schema.MSG_VM_END)}
        stops = [x["vm"] for x in lifecycle(r) if x["event"] == "stop"]
        for vm in range(vms):
            assert counts_up_from_zero(r, vm, 0) == ends[vm]["final_seq"][0]
    assert sorted(ends) == list(range(vms))
    # Each VM was stopped by the supervisor (SIGTERM to its worker), or, in the foreground, took
    # the terminal's Ctrl-C itself first.
    for vm, end in ends.items():
        assert (end["status"] == "terminated" and vm in stops) or (end["status"] == "interrupted" and vms == 1), ends
    # One vocabulary (issue 10 item 4): `vmtrace info` says what launch said, stopped on request.
    info = subprocess.run([sys.executable, "-m", "tracetool", "info", str(trace), "--json"], cwd=REPO,
                          capture_output=True, text=True, timeout=DEADLINE)
    assert info.returncode == 0, info.stderr
    assert [(vm["status"], vm["detail"].split(", after ")[0]) for vm in json.loads(info.stdout)["vms"]] == \
        [("stopped", "on request")] * vms


# --- 7. a hostile fleet ----------------------------------------------------------------------------
HOSTILE_FLEET = """\
[[vm]]
name = "seed"
guest = "seed16"
vms = 2
max_exits = 200000

[[vm]]
name = "serialflood"
guest = "serialflood.bin"
mode = "real"
timeout = 3.0

[[vm]]
name = "mmioflood"
guest = "mmioflood"

[[vm]]
name = "spin"
guest = "spin.bin"
mode = "real"
timeout = 3.0
"""


def test_hostile_vms_end_with_their_own_status_and_the_seed_vms_count_every_exit(vmsup, tmp_path):
    (tmp_path / "serialflood.bin").write_bytes(SERIAL_FLOOD)
    (tmp_path / "spin.bin").write_bytes(SPIN)
    (tmp_path / "fleet.toml").write_text(HOSTILE_FLEET)
    trace = tmp_path / "hostile.vmtrace"
    proc = vmsup("launch", "--fleet", str(tmp_path / "fleet.toml"), "--trace", str(trace))
    assert proc.returncode == EXIT_TIMEOUT, proc.stderr  # the worst ending among the VMs
    assert "Traceback" not in proc.stderr
    with TraceReader(trace) as r:
        assert r.closed_cleanly and r.gaps == [] and r.unexplained_gaps == []
        ends = {e["name"]: e for e in r.records(schema.MSG_VM_END)}
        seeds = {e["vm"] for e in ends.values() if e["name"].startswith("seed-")}
        for vm in seeds:  # every exit, in order (plus the kicks a loaded host makes the VMM send)
            end = next(e for e in ends.values() if e["vm"] == vm)
            assert counts_up_from_zero(r, vm, 0) == end["final_seq"][0] == 200_000 + end.get("kicks", 0)
            assert np.count_nonzero(r.exits(vm=vm)["reason"] == schema.REASON_IO) == 200_000
        mmio = r.exits(vm=ends["mmioflood"]["vm"])
        flood = r.exits(vm=ends["serialflood"]["vm"])
    assert set(ends) == {"seed-0", "seed-1", "serialflood", "mmioflood", "spin"}
    for name in ("seed-0", "seed-1"):
        assert (ends[name]["status"], ends[name]["exits"]) == ("max-exits", 200_000)
    assert ends["serialflood"]["status"] == ends["spin"]["status"] == "timeout"
    assert (ends["mmioflood"]["status"], ends["mmioflood"]["guest_code"]) == ("guest-exit", 0)
    assert np.count_nonzero(mmio["reason"] == schema.REASON_MMIO) == 2000
    assert np.all(flood["addr"][flood["reason"] == schema.REASON_IO] == 0x3F8)
    assert ends["spin"]["exits"] == 0  # it never left the guest: only the timeout ended it
    console = (tmp_path / "hostile.serialflood.console").read_bytes()
    assert len(console) > 0 and set(console) == {ord("A")}


# --- 8. limits -------------------------------------------------------------------------------------
LIMITS_FLEET = """\
[defaults]
rss_limit = "40M"

[[vm]]
name = "hungry"
guest = "touch.bin"
mode = "protected"
mem = "128M"
timeout = 30.0        # a backstop only: the RSS limit ends it long before

[[vm]]
name = "counter"
guest = "seed16"
max_exits = 100000

[[vm]]
name = "ticker"
guest = "seed16"
timeout = 2.0
"""


def test_each_limit_ends_only_its_own_vm(vmsup, tmp_path):
    (tmp_path / "touch.bin").write_bytes(TOUCH_64M)
    (tmp_path / "fleet.toml").write_text(LIMITS_FLEET)
    trace = tmp_path / "limits.vmtrace"
    proc = vmsup("launch", "--fleet", str(tmp_path / "fleet.toml"), "--trace", str(trace))
    assert proc.returncode == EXIT_VM_ERROR, proc.stderr
    with TraceReader(trace) as r:
        exits = {x["name"]: x for x in lifecycle(r) if x["event"] == "exit"}
        ends = {e["name"]: e for e in r.records(schema.MSG_VM_END)}
        counter = ends["counter"]
        assert counts_up_from_zero(r, counter["vm"], 0) == counter["final_seq"][0] == 100_000 + counter.get("kicks", 0)
    hungry = exits["hungry"]
    assert (hungry["status"], hungry["signal"]) == ("rss-limit", signal.SIGKILL)
    assert "over the limit of 40 MiB" in hungry["detail"]
    assert (ends["counter"]["status"], ends["counter"]["exits"]) == ("max-exits", 100_000)
    assert ends["ticker"]["status"] == "timeout"


def test_rss_limit_flag_ends_a_vm_that_touches_more_ram(vmsup, tmp_path):
    image = tmp_path / "touch.bin"
    image.write_bytes(TOUCH_64M)
    proc = vmsup("launch", str(image), "--mode", "protected", "--mem", "128M", "--rss-limit", "40M",
                 "--timeout", "30", "-q", "--no-trace")
    assert proc.returncode == EXIT_VM_ERROR, proc.stderr
    assert "vmsup: touch: rss-limit (worker RSS " in proc.stderr and "over the limit of 40 MiB)" in proc.stderr


# --- 9. control from another terminal --------------------------------------------------------------
def test_pause_freezes_the_exit_count_and_resume_lets_it_grow(launches, vmsup):
    launch = launches("seed16", "-q", "--no-trace", "--timeout", "60")
    rd = launch.run_dir()
    wait_for(lambda: vm_row(rd, "seed16")["exits"] > 0, "the first exits")
    proc = vmsup("pause", "seed16")
    assert (proc.returncode, proc.stderr.strip()) == (0, "vmsup: pause: seed16")
    samples = [vm_row(rd, "seed16")["exits"]]

    def settled():  # batches already on their way still land; then nothing more comes
        samples.append(vm_row(rd, "seed16")["exits"])
        return len(samples) >= 3 and samples[-1] == samples[-2] == samples[-3]
    wait_for(settled, "the paused VM's count to settle", interval=0.1)
    first, second = (next(v for v in cli_ps()[0]["vms"] if v["name"] == "seed16") for _ in range(2))
    assert first["state"] == second["state"] == "paused"
    assert first["exits"] == second["exits"] == samples[-1]
    proc = vmsup("resume", "seed16")
    assert (proc.returncode, proc.stderr.strip()) == (0, "vmsup: resume: seed16")
    wait_for(lambda: vm_row(rd, "seed16")["exits"] > samples[-1], "the count to grow after resume")
    assert vm_row(rd, "seed16")["state"] == "running"

    for command in ("stop", "kill", "pause"):
        proc = vmsup(command, "nosuch")
        assert proc.returncode == 2
        [line] = proc.stderr.strip().splitlines()
        assert line.startswith("vmsup: error: no VM named 'nosuch' in run") and proc.stdout == ""
    assert vm_row(rd, "seed16")["state"] == "running"  # a refused command changes nothing


def test_ps_with_nothing_running_says_so(vmsup):
    proc = vmsup("ps")
    assert (proc.returncode, proc.stdout.strip(), proc.stderr) == (0, "no vmsup launch is running", "")
    proc = vmsup("ps", "--json")
    assert (proc.returncode, json.loads(proc.stdout)) == (0, [])
    proc = vmsup("ps", "--run", "123456-1")
    assert (proc.returncode, proc.stderr.strip()) == (
        2, "vmsup: error: no running vmsup launch with id 123456-1 (running: none)")


def test_two_launches_are_separate_runs_and_a_command_finds_the_run_of_its_vm(vmsup, launches):
    ids = []
    for args in (("seed16",), ("seed16", "--vms", "2")):
        proc = vmsup("launch", *args, "-q", "--no-trace", "--timeout", "60", "--detach")
        assert proc.returncode == 0, proc.stderr
        ids.append(proc.stdout.strip())
    one, two = ids
    assert one != two
    runs = {r["run"]: sorted(vm["name"] for vm in r["vms"]) for r in cli_ps()}
    assert runs == {one: ["seed16"], two: ["seed16-0", "seed16-1"]}

    proc = vmsup("stop", "seed16-1")  # only run two has it: no --run needed
    assert (proc.returncode, proc.stderr.strip()) == (0, "vmsup: stop: seed16-1")
    proc = vmsup("stop", "seed16")
    assert (proc.returncode, proc.stderr.strip()) == (0, "vmsup: stop: seed16")
    wait_for(lambda: [r.run_id for r in runtime.live_runs()] == [two], "run one to end with its only VM")
    rd = runtime.find_run(two)
    states = {vm["name"]: vm["state"] for vm in ps(rd)["vms"]}
    assert states["seed16-0"] in ("starting", "running")
    wait_for(lambda: vm_row(rd, "seed16-1")["state"] == "stopped", "seed16-1 to stop")
    proc = vmsup("stop", "--all")  # one run left: no --run needed either
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: runtime.live_runs() == [], "run two to end")


# --- 10. another user ------------------------------------------------------------------------------
# A process that becomes uid 65534 after its imports: the interpreter lives under /root (0700 here),
# so it cannot be exec'd as that user (preexec_fn), but the code under test runs as that user.
AS_NOBODY = """\
import contextlib, io, json, os, shutil, socket, sys, tempfile
import msgpack, zmq
import supervisor.cli, rich.console, rich.table
target, warm = os.environ["XDG_RUNTIME_DIR"], tempfile.mkdtemp()
os.environ["XDG_RUNTIME_DIR"] = warm  # warm-up, as root: the CLI's lazy imports
sys.argv = ["vmsup", "ps"]
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    try:
        supervisor.cli.main()
    except SystemExit:
        pass
shutil.rmtree(warm)
os.environ["XDG_RUNTIME_DIR"] = target
os.setgroups([])
os.setgid(NOBODY)
os.setuid(NOBODY)
assert os.getuid() == os.geteuid() == NOBODY
if os.environ.get("RAW"):
    base, run = os.environ["BASE"], os.environ["RUN"]
    out = {}
    for what, action in (("list base", lambda: os.listdir(base)),
                         ("read run.json", lambda: open(run + "/run.json").read()),
                         ("unix connect", lambda: socket.socket(socket.AF_UNIX).connect(run + "/control.sock"))):
        try:
            action()
            out[what] = "ok"
        except OSError as e:
            out[what] = e.errno
    sock = zmq.Context().socket(zmq.REQ)
    for option in (zmq.LINGER, zmq.SNDTIMEO, zmq.RCVTIMEO):
        sock.setsockopt(option, 0 if option == zmq.LINGER else 1000)
    sock.connect("ipc://" + run + "/control.sock")  # zmq connects in the background: no error here
    try:
        sock.send(msgpack.packb({"cmd": "ps"}))
        out["zmq reply"] = sock.recv() is not None
    except zmq.Again:
        out["zmq reply"] = False
    print(json.dumps(out))
    os._exit(0)
sys.argv = ["vmsup", *json.loads(os.environ["ARGS"])]
supervisor.cli.main()
""".replace("NOBODY", str(NOBODY))


@pytest.fixture
def shared_xdg(monkeypatch):
    """An XDG_RUNTIME_DIR other users may traverse (like /run/user/UID is not, like /tmp is), so
    only vmsup's own 0700 directories stand between them and a run."""
    path = tempfile.mkdtemp(prefix="vmsup-shared-")
    os.chmod(path, 0o755)
    monkeypatch.setenv("XDG_RUNTIME_DIR", path)
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


def as_nobody(*args: str, raw: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "ARGS": json.dumps(args), **({"RAW": "1", **raw} if raw else {})}
    return subprocess.run([sys.executable, "-c", AS_NOBODY], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=DEADLINE)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_another_user_can_neither_see_nor_reach_a_run(shared_xdg, launches, vmsup):
    launch = launches("seed16", "-q", "--no-trace", "--timeout", "60")
    rd = launch.run_dir()
    base = rd.path.parent
    for d in (base, rd.path):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700 and os.stat(d).st_uid == os.getuid()

    for args in (("ps",), ("stop", "--all")):
        proc = as_nobody(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        [line] = proc.stderr.strip().splitlines()
        assert line.startswith("vmsup: error: ") and "permission denied" in line, line

    raw = {"BASE": str(base), "RUN": str(rd.path)}
    proc = as_nobody(raw=raw)
    assert proc.returncode == 0, proc.stderr
    eacces = 13
    assert json.loads(proc.stdout) == {"list base": eacces, "read run.json": eacces, "unix connect": eacces,
                                       "zmq reply": False}
    # With the base dir opened for traversal, the run dir's own 0700 still keeps the stranger out.
    os.chmod(base, 0o711)
    try:
        proc = as_nobody(raw=raw)
    finally:
        os.chmod(base, 0o700)
    assert json.loads(proc.stdout) == {"list base": eacces, "read run.json": eacces, "unix connect": eacces,
                                       "zmq reply": False}
    assert vm_row(rd, "seed16")["state"] == "running"  # the owner still reaches it
    proc = vmsup("stop", "--all")
    assert proc.returncode == 0, proc.stderr
    assert launch.wait() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")
def test_another_users_runtime_dir_is_one_error_line(monkeypatch):
    """XDG_RUNTIME_DIR pointing at another user's private dir (like /run/user/UID): every command
    that looks for runs says so in one line, exit 2, instead of a PermissionError traceback."""
    theirs = tempfile.mkdtemp(prefix="vmsup-theirs-")  # 0700, root's: nobody cannot even stat inside
    try:
        (Path(theirs) / "vmsup").mkdir(mode=0o700)
        monkeypatch.setenv("XDG_RUNTIME_DIR", theirs)
        for args in (("ps",), ("ps", "--json"), ("stop", "--all"), ("tail", "-n", "1")):
            proc = as_nobody(*args)
            assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
            [line] = proc.stderr.strip().splitlines()
            assert line.startswith("vmsup: error: ") and "permission denied" in line, (args, line)
    finally:
        shutil.rmtree(theirs, ignore_errors=True)
