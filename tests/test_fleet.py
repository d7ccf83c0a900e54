"""Fleet files: `vmsup launch --fleet FILE.toml`.

A valid fleet launches every VM it describes and each ends as asked; every bad key, value, type,
duplicate name, missing guest or TOML syntax error is one `vmsup: error: FILE:LINE: …` line and
exit code 2, before any VM starts. Bad files mark their bad line with `# <-`, so the expected line
number is read from the text itself.
"""

from __future__ import annotations

import pytest

from supervisor.fleet import FleetError, cli_entry, load_fleet, specs_from_entries
from tracetool import schema
from tracetool.trace import TraceReader
from vmworker.errors import SpecError

EXIT_BAD_INPUT = 2
HLT = b"\xf4"

VALID = """\
# two entries: a counted copy of the seed guest, and a hand-made image next to this file
[defaults]
max_exits = 40
restart = "on-failure"

[[vm]]
name = "counter"
guest = "seed16"
count = 2
mem = "16M"
backoff = { initial = 0.25, max = 8.0, jitter = 0.1 }
retries = 3

[[vm]]
name = "halter"
guest = "images/hlt.bin"     # relative to this file, not to the working directory
load_addr = "0x10000"
entry = 0x10000
rss_limit = "256M"
serial_in = "none"
"""


@pytest.fixture
def fleet_dir(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "hlt.bin").write_bytes(HLT)
    (tmp_path / "input.txt").write_text("hello\n")
    return tmp_path


def test_with_several_vms_stdin_goes_to_the_first_and_a_note_names_the_others(fleet_dir):
    path = fleet_dir / "fleet.toml"
    path.write_text(VALID)
    notes: list[str] = []
    specs = specs_from_entries(load_fleet(str(path)), notes=notes)
    assert [s.serial_in for s in specs] == ["-", None, None]
    assert notes == ["stdin goes to counter-0 only; counter-1 gets no serial input (--serial-in FILE gives a VM its own)"]
    notes.clear()
    specs = specs_from_entries(load_fleet(str(path)), notes=notes, stdin_terminal=True)
    assert [s.serial_in for s in specs] == [None, None, None]
    assert notes == ["stdin is a terminal: with several VMs no VM reads it (counter-0, counter-1 get no serial "
                     "input; --serial-in FILE gives a VM its own)"]


def test_fleet_entries_carry_resolved_values_policy_and_rss_limit(fleet_dir):
    path = fleet_dir / "fleet.toml"
    path.write_text(VALID)
    counter, halter = load_fleet(str(path))
    assert (counter.name, counter.vms, counter.mem, counter.max_exits, counter.line) == ("counter", 2, 16 << 20, 40, 6)
    assert counter.guest.endswith("seed16.bin") and counter.mode == "real"
    assert (counter.policy.mode, counter.policy.backoff_initial, counter.policy.backoff_max,
            counter.policy.backoff_jitter, counter.policy.retries) == ("on-failure", 0.25, 8.0, 0.1, 3)
    assert halter.guest == str(fleet_dir / "images" / "hlt.bin")
    assert (halter.load_addr, halter.entry, halter.rss_limit, halter.line) == (0x10000, 0x10000, 256 << 20, 14)
    assert halter.policy.mode == "on-failure" and halter.policy.backoff_initial == 0.5  # defaults, then built-ins

    specs = specs_from_entries([counter, halter])
    assert [(s.vm_id, s.name) for s in specs] == [(0, "counter-0"), (1, "counter-1"), (2, "halter")]
    assert all(s.quiet for s in specs)  # several VMs: no shared terminal
    # stdin (the default serial input) goes to the first VM only (issue 10 item 8); halter said none.
    assert [s.serial_in for s in specs] == ["-", None, None]
    assert specs[0].extra == {"policy": {"mode": "on-failure", "backoff_initial": 0.25, "backoff_max": 8.0,
                                         "backoff_jitter": 0.1, "startsecs": 1.0, "retries": 3}, "rss_limit": None}
    assert specs[2].extra["rss_limit"] == 256 << 20


def test_cli_flags_go_through_the_same_checks_and_name_the_flag():
    entry = cli_entry("seed16", vms=2, restart="always", max_exits=5)
    assert [s.name for s in specs_from_entries([entry])] == ["seed16-0", "seed16-1"]
    assert entry.policy.mode == "always"
    for kwargs, fragment in [({"mem": "lots"}, "--mem 'lots' is not a size"), ({"vcpus": 0}, "--vcpus must be at least 1"),
                             ({"vms": 0}, "--vms must be at least 1"), ({"restart": "maybe"}, "--restart 'maybe'"),
                             ({"timeout": -1.0}, "--timeout must be a positive"),
                             ({"record_only": "reason=nope"}, "--record-only: bad filter term")]:
        with pytest.raises(SpecError, match=fragment):
            cli_entry("seed16", **kwargs)
    # The same guest named twice on the command line keeps unique names, as before fleets.
    names = [s.name for s in specs_from_entries([cli_entry("seed16"), cli_entry("seed16")])]
    assert names == ["seed16#0", "seed16#1"]


@pytest.mark.kvm
def test_a_valid_fleet_launches_every_vm_and_each_ends_as_asked(vmsup, fleet_dir):
    path = fleet_dir / "fleet.toml"
    path.write_text(VALID)
    trace = fleet_dir / "fleet.vmtrace"
    proc = vmsup("launch", "--fleet", str(path), "--trace", str(trace))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    with TraceReader(trace) as r:
        ends = {rec["name"]: rec for rec in r.records(schema.MSG_VM_END)}
        starts = {rec["name"]: rec for rec in r.records(schema.MSG_VM_START)}
        run_vms = {vm["name"]: vm for vm in r.run["vms"]}
    assert set(ends) == set(starts) == {"counter-0", "counter-1", "halter"}
    assert ends["counter-0"]["status"] == ends["counter-1"]["status"] == "max-exits"
    assert ends["halter"]["status"] == "halted"
    # The supervisor's per-VM policy and RSS limit travel with the spec (extra; the worker ignores it).
    assert run_vms["counter-1"]["extra"]["policy"]["retries"] == 3
    assert run_vms["halter"]["extra"]["rss_limit"] == 256 << 20


@pytest.mark.kvm
def test_a_one_vm_fleet_is_the_same_as_the_flags(vmsup, fleet_dir):
    path = fleet_dir / "one.toml"
    path.write_text('[[vm]]\nguest = "hello"\nserial_in = "input.txt"\n')
    proc = vmsup("launch", "--fleet", str(path), "--no-trace", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "Hello from vmsup!" in proc.stdout  # one VM runs in the foreground, console on stdout


FIRST = """\
[defaults]
max_exits = 10

[[vm]]
name = "first"
guest = "seed16"

"""

# case: (fleet text after FIRST, or a whole file when it starts with "!"), fragment of the message
BAD = {
    "unknown key": ('[[vm]]\nguest = "hello"\nmemory = "16M"  # <-\n', "unknown key 'memory'"),
    "string for an integer": ('[[vm]]\nguest = "hello"\ncount = "two"  # <-\n', "count must be an integer, not a string"),
    "boolean for an integer": ('[[vm]]\nguest = "hello"\nvcpus = true  # <-\n', "vcpus must be an integer, not a boolean"),
    "float for an integer": ('[[vm]]\nguest = "hello"\nmax_exits = 1.5  # <-\n', "max_exits must be an integer"),
    "zero count": ('[[vm]]\nguest = "hello"\ncount = 0  # <-\n', "count must be at least 1"),
    "not a size": ('[[vm]]\nguest = "hello"\nmem = "lots"  # <-\n', "mem 'lots' is not a size"),
    "unaligned memory": ('[[vm]]\nguest = "hello"\nmem = 12345  # <-\n', "page size"),
    "unknown mode": ('[[vm]]\nguest = "hello"\nmode = "unreal"  # <-\n', "mode 'unreal' is not one of"),
    "not an address": ('[[vm]]\nguest = "hello"\nload_addr = "here"  # <-\n', "load_addr 'here' is not a number"),
    "negative timeout": ('[[vm]]\nguest = "hello"\ntimeout = -1  # <-\n', "timeout must be a positive number"),
    "bad size for rss_limit": ('[[vm]]\nguest = "hello"\nrss_limit = [1]  # <-\n', "rss_limit must be a size"),
    "unknown restart policy": ('[[vm]]\nguest = "hello"\nrestart = "sometimes"  # <-\n', "restart 'sometimes' is not one of"),
    "backoff initial over max": ('[[vm]]\nguest = "hello"\nbackoff = { initial = 10.0, max = 1.0 }  # <-\n',
                                 "initial <= max"),
    "unknown backoff key in a sub-table": ('[[vm]]\nguest = "hello"\n\n[vm.backoff]\ninitial = 1.0\nstart = 2  # <-\n',
                                           "unknown key 'start' in backoff"),
    "negative retries": ('[[vm]]\nguest = "hello"\nretries = -1  # <-\n', "retries must be at least 0"),
    "bad record filter": ('[[vm]]\nguest = "hello"\nrecord_only = "reason=nope"  # <-\n', "unknown reason 'nope'"),
    "missing serial input": ('[[vm]]\nguest = "hello"\nserial_in = "nope.txt"  # <-\n', "nope.txt: no such file"),
    "entry past the image": ('[[vm]]\nguest = "images/hlt.bin"\nentry = 0x10005  # <-\n',
                             "entry 0x10005 is outside the image"),
    "image larger than memory": ('[[vm]]\nguest = "images/big.bin"\nmem = "1M"  # <-\n', "does not fit in 1 MiB"),
    "missing guest file": ('[[vm]]\nguest = "images/missing.bin"  # <-\n', "missing.bin: no such file"),
    "unknown bundled guest": ('[[vm]]\nguest = "nosuchguest"  # <-\n', "'nosuchguest'", "bundled guest"),
    "no guest": ('[[vm]]  # <-\nmem = "16M"\n', "no guest"),
    "duplicate name": ('[[vm]]\nname = "first"  # <-\nguest = "hello"\n', "duplicate VM name 'first'", "line 4"),
    "duplicate default name": ('[[vm]]\nguest = "hello"\n\n[[vm]]  # <-\nguest = "hello"\n', "duplicate VM name 'hello'"),
    "duplicate name from a count": ('[[vm]]\nname = "web"\nguest = "hello"\ncount = 2\n\n'
                                    '[[vm]]\nname = "web-1"  # <-\nguest = "hello"\n', "duplicate VM name 'web-1'"),
    "unusable name": ('[[vm]]\nname = "../etc"  # <-\nguest = "hello"\n', "not a usable VM name"),
    "bad value in [defaults]": ('!# only defaults are wrong\n[defaults]\nvcpus = 0  # <-\n\n[[vm]]\nguest = "hello"\n',
                                "vcpus must be at least 1"),
    "name in [defaults]": ('![defaults]\nname = "x"  # <-\n[[vm]]\nguest = "hello"\n', "name cannot be a default"),
    "unknown table": ('[vms]  # <-\nguest = "hello"\n', "unknown key or table 'vms'"),
    "[vm] instead of [[vm]]": ('![vm]  # <-\nguest = "hello"\n', "write [[vm]], not [vm]"),
    "no VMs": ('![defaults]  # <-\nmem = "16M"\n', "no VMs"),
    "syntax: missing value": ('[[vm]]\nguest = "hello"\nmem =  # <-\n', "TOML syntax"),
    "syntax: key set twice": ('[[vm]]\nguest = "hello"\nguest = "seed16"  # <-\n', "TOML syntax", "overwrite"),
    "syntax: unterminated string": ('[[vm]]\nguest = "hello"\nname = "abc  # <-\n', "TOML syntax"),
}


def _bad_line(text: str) -> int:
    marked = [n for n, line in enumerate(text.splitlines(), 1) if "# <-" in line]
    assert len(marked) == 1, text
    return marked[0]


@pytest.mark.parametrize("case", list(BAD))
def test_bad_fleet_file_is_one_line_with_file_and_line(vmsup, fleet_dir, case):
    body, *fragments = BAD[case]
    text = body[1:] if body.startswith("!") else FIRST + body
    (fleet_dir / "images" / "big.bin").write_bytes(HLT * (2 << 20))
    path = fleet_dir / "bad fleet.toml"  # a space in the name: the line must still parse as FILE:LINE
    path.write_text(text)
    proc = vmsup("launch", "--fleet", str(path), "--no-trace")
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    prefix = f"vmsup: error: {path}:{_bad_line(text)}: "
    assert lines[0].startswith(prefix), (lines[0], prefix)
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert proc.stdout == ""
    assert proc.returncode == EXIT_BAD_INPUT
    with pytest.raises(FleetError) as e:  # the library says the same
        load_fleet(str(path))
    assert f"vmsup: error: {e.value}" == lines[0]


@pytest.mark.kvm
def test_vcpus_over_the_kvm_limit_in_a_fleet_names_its_line(vmsup, fleet_dir):
    path = fleet_dir / "smp.toml"
    path.write_text('[[vm]]\nguest = "smp"\nvcpus = 5000\n')
    proc = vmsup("launch", "--fleet", str(path), "--no-trace")
    lines = proc.stderr.splitlines()
    assert lines == [lines[0]] and lines[0].startswith(f"vmsup: error: {path}:3: vcpus 5000 is over"), proc.stderr
    assert "KVM limit" in lines[0] and proc.returncode == EXIT_BAD_INPUT


@pytest.mark.parametrize("args, fragment", [
    (["seed16", "--fleet", "{f}"], "GUESTS or --fleet FILE, not both"),
    (["--fleet", "{f}", "--mem", "32M"], "--mem describes one VM"),
    (["--fleet", "{f}", "--max-exits", "5"], "--max-exits describes one VM"),
    (["--fleet", "{d}/no-such-fleet.toml"], "cannot read the fleet file"),
    ([], "no guest given"),
])
def test_fleet_flag_misuse_is_one_line(vmsup, fleet_dir, args, fragment):
    path = fleet_dir / "ok.toml"
    path.write_text('[[vm]]\nguest = "hello"\n')
    proc = vmsup("launch", *(a.format(f=path, d=fleet_dir) for a in args), "--no-trace")
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("vmsup: error: ") and fragment in lines[0], proc.stderr
    assert proc.returncode == EXIT_BAD_INPUT and proc.stdout == ""
