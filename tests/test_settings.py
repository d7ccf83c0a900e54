"""The one table of VM settings (vmworker.settings) and what is derived from it.

`VmSpec`'s fields, the fleet file's keys, `vmsup launch`'s per-VM flags and the refusal of those
flags next to `--fleet` all come from the table; these tests fail when one of them grows a setting
the table does not have. Limits switch off with none/0/inf, and flags that cannot apply are refused.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib

import pytest
import typer

from supervisor.cli import app
from supervisor.fleet import VM_KEYS, FleetEntry, cli_entry, load_fleet, specs_from_entries
from supervisor.policy import RestartPolicy
from conftest import REPO
from test_bad_input import assert_one_error_line
from vmworker.errors import SpecError
from vmworker.settings import BY_NAME, FLAGGED, HOMES, OLD_KEYS, SETTINGS
from vmworker.setting_values import Limit, Switch
from vmworker.spec import RunWiring, VmSpec

# launch's options that are about the run, not one VM: allowed with --fleet, not in the table.
RUN_WIDE = {"guests", "fleet", "quiet", "trace", "no_trace", "listen", "keys_dir", "detach", "screen", "recorder"}


def _launch_params() -> dict:
    command = typer.main.get_command(app).commands["launch"]
    return {p.name: p for p in command.params}


# Derived things held against the table -----------------------------------------------------------

def test_vmspec_fields_are_the_tables_worker_settings_plus_the_run_wiring():
    fields = {f.name for f in dataclasses.fields(VmSpec)}
    wiring = {f.name for f in dataclasses.fields(RunWiring)}
    assert fields == {s.name for s in SETTINGS if s.home == "spec"} | wiring
    assert not wiring & set(BY_NAME), "a run wiring field is spelled like a setting"


def test_launch_options_are_the_tables_flags_plus_the_run_wide_ones():
    params = _launch_params()
    per_vm = set(params) - RUN_WIDE
    assert per_vm == {s.param for s in FLAGGED}
    for s in FLAGGED:
        assert tuple(params[s.param].opts) == (s.flag_name,), s.name
        if isinstance(s.kind, Switch):
            assert params[s.param].secondary_opts == [f"--no-{s.flag_name[2:]}"]
    assert not RUN_WIDE & set(BY_NAME), "a run-wide option is spelled like a setting"


def test_every_setting_goes_somewhere_known_and_the_supervisors_travel_in_extra():
    assert all(s.home in HOMES for s in SETTINGS)
    (spec,) = specs_from_entries([FleetEntry(values={s.name: s.default for s in SETTINGS} | {"guest": "g", "name": "g"},
                                             policy=RestartPolicy())])
    assert set(spec.extra) == {"policy"} | {s.name for s in SETTINGS if s.home == "supervisor"}


def test_fleet_keys_are_the_setting_names():
    assert set(VM_KEYS) == set(BY_NAME)
    assert not set(OLD_KEYS) & set(BY_NAME)


def test_one_name_per_setting_flag_key_and_attribute():
    for s in SETTINGS:
        if s.flag_name is None or s.name == "backoff":
            continue
        assert s.flag_name == "--" + s.name.replace("_", "-"), s.name
    # backoff is a table in a fleet file; its flag sets the table's `max` (TOML: backoff.max).
    assert BY_NAME["backoff"].flag_name == "--backoff-max"


def test_readme_fleet_example_uses_only_setting_names():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Fleet files", 1)[1].split("\n## ", 1)[0]
    example = tomllib.loads("\n".join(line[4:] for line in section.splitlines() if line.startswith("    ")))
    keys = set(example["defaults"]) | {k for vm in example["vm"] for k in vm}
    assert keys <= set(BY_NAME), keys - set(BY_NAME)


def test_readme_flag_tables_name_only_launch_options():
    readme = (REPO / "README.md").read_text()
    documented = set(re.findall(r"^\| `(--[a-z-]+)", readme, re.MULTILINE))
    launch_flags = {opt for p in _launch_params().values() for opt in (*p.opts, *p.secondary_opts)}
    assert documented <= launch_flags, documented - launch_flags


# The refusal of per-VM flags with --fleet --------------------------------------------------------

def _flag_uses() -> list:
    """(setting, argv) for every way to give each per-VM flag (both sides of a switch)."""
    uses = []
    for s in FLAGGED:
        if isinstance(s.kind, Switch):
            uses += [(s, [s.flag_name]), (s, [f"--no-{s.flag_name[2:]}"])]
        else:
            uses.append((s, [s.flag_name, "1"]))  # refused before its value is looked at
    return uses


@pytest.mark.parametrize("setting, args", _flag_uses(), ids=lambda x: " ".join(x) if isinstance(x, list) else "")
def test_every_per_vm_flag_with_fleet_is_refused(vmsup, tmp_path, setting, args):
    path = tmp_path / "ok.toml"
    path.write_text('[[vm]]\nguest = "hello"\n')
    assert_one_error_line(vmsup("launch", "--fleet", str(path), *args, "--no-trace"),
                          f"{setting.flag_name} describes one VM", f"fleet file ([defaults] or [[vm]], as {setting.name})")


def test_a_missing_key_script_with_fleet_is_refused_before_it_is_read(vmsup, tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text('[[vm]]\nguest = "hello"\n')
    assert_one_error_line(vmsup("launch", "--fleet", str(path), "--keys", str(tmp_path / "missing.keys")),
                          "--keys describes one VM")


# Limits that switch off ---------------------------------------------------------------------------

LIMITS = [s for s in SETTINGS if isinstance(s.kind, Limit)]


def test_the_limits_are_timeout_max_exits_rss_limit_and_console_limit():
    assert {s.name for s in LIMITS} == {"timeout", "max_exits", "rss_limit", "console_limit"}


@pytest.mark.kvm
@pytest.mark.parametrize("word", ["none", "0", "inf", "None", "INF"])
@pytest.mark.parametrize("setting", LIMITS, ids=lambda s: s.name)
def test_a_limit_flag_switches_off_with_none_zero_or_inf(setting, word):
    assert getattr(cli_entry("seed16", **{setting.param: word}), setting.name) is None


@pytest.mark.kvm
@pytest.mark.parametrize("value", ['"none"', "0", "inf", '"inf"', "0.0"])
@pytest.mark.parametrize("setting", LIMITS, ids=lambda s: s.name)
def test_a_limit_fleet_key_switches_off_with_none_zero_or_inf(tmp_path, setting, value):
    path = tmp_path / "f.toml"
    path.write_text(f'[defaults]\n{setting.name} = 10\n\n[[vm]]\nguest = "seed16"\n{setting.name} = {value}\n')
    (entry,) = load_fleet(str(path))
    assert getattr(entry, setting.name) is None  # also over a [defaults] value


@pytest.mark.kvm
def test_a_limit_still_refuses_a_negative_value_and_says_how_to_switch_it_off():
    with pytest.raises(SpecError, match=r"--timeout must be a positive number of seconds, not -2\.0 \(none, 0 or inf"):
        cli_entry("seed16", timeout="-2")
    with pytest.raises(SpecError, match=r"--max-exits 'lots' is not an integer \(none, 0 or inf: no limit\)"):
        cli_entry("seed16", max_exits="lots")


@pytest.mark.kvm
def test_timeout_none_runs_until_the_guest_ends(vmsup):
    proc = vmsup("launch", "seed16", "--timeout", "none", "--max-exits", "5", "--no-trace", "-q")
    assert proc.returncode == 0, proc.stderr
    assert "max-exits" in proc.stderr


# Flags that cannot apply ---------------------------------------------------------------------------

@pytest.mark.parametrize("guest, what", [("seed16", "flat binary"), ("elfhello32", "ELF32 executable")])
def test_cmdline_on_a_guest_that_is_not_a_kernel_is_refused(vmsup, guest, what):
    line = assert_one_error_line(vmsup("launch", guest, "--cmdline", "quiet"), "--cmdline applies to multiboot kernels")
    assert what in line


@pytest.mark.kvm
def test_cmdline_on_a_multiboot_kernel_is_taken():
    assert cli_entry("mbkernel", cmdline="console=vga").cmdline == "console=vga"


def test_trace_and_no_trace_together_are_refused(vmsup, tmp_path):
    proc = vmsup("launch", "hello", "--trace", str(tmp_path / "t.vmtrace"), "--no-trace")
    assert_one_error_line(proc, "--trace", "--no-trace")
    assert not (tmp_path / "t.vmtrace").exists()


# Renamed fleet keys ---------------------------------------------------------------------------------

@pytest.mark.kvm
def test_the_old_fleet_key_count_still_works_with_one_deprecation_line(tmp_path):
    path = tmp_path / "f.toml"
    path.write_text('[[vm]]\nname = "web"\nguest = "seed16"\ncount = 2\n')
    notes: list[str] = []
    (entry,) = load_fleet(str(path), notes)
    assert entry.vms == 2
    assert notes == [f"{path}:4: fleet key 'count' is deprecated: write vms (as the flag --vms)"]


def test_old_and_new_fleet_key_together_are_one_error_line(vmsup, tmp_path):
    path = tmp_path / "f.toml"
    path.write_text('[[vm]]\nguest = "seed16"\nvms = 2\ncount = 2\n')
    assert_one_error_line(vmsup("launch", "--fleet", str(path)), f"{path}:3:", "'count' is the old name of 'vms'")
