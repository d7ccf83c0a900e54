"""One vocabulary (issue 10 item 4): every command that selects exits — vmsup tail and top,
vmtrace show, replay, summary, export and plot — takes the same filter flags, defined once in
tracetool/filters.py, with the same syntax (alternatives with , or |) and the same names (the
README's statuses such as internal-error are reason names too)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO
from tracetool import cli_manners, filters, schema

SELECTING = {"vmsup": ("tail", "top"), "vmtrace": ("show", "replay", "summary", "export", "plot")}


def _command(prog: str, name: str):
    if prog == "vmsup":
        from supervisor.cli import EXAMPLES, app
    else:
        from tracetool.cli import EXAMPLES, app
    return cli_manners.commands_of(cli_manners.click_command(app, EXAMPLES))[name]


@pytest.mark.parametrize("prog, name", [(p, n) for p, names in SELECTING.items() for n in names])
def test_every_selecting_command_takes_the_same_filter_flags(prog, name):
    params = {p.name: p for p in _command(prog, name).params}
    for flag in filters.FLAGS:
        assert flag in params, f"{prog} {name} has no filter flag {flag}"
        param = params[flag]
        assert param.help == filters.FLAG_HELP[flag]
        assert sorted(param.opts) == sorted(filters.option(flag).param_decls)


def test_flag_values_list_alternatives_with_commas_or_bars_alike():
    assert filters.from_flags(reason="io,hlt") == filters.from_flags(reason="io|hlt")
    assert filters.from_flags(vm="0,2", port="0x10,0x3f8") == filters.parse_filter("vm=0|2,port=0x10|0x3f8")


@pytest.mark.parametrize("status", ["internal-error", "fail-entry", "system-event", "shutdown"])
def test_the_readmes_status_words_name_their_exit_reasons(status):
    assert filters.from_flags(reason=status).reason == (schema.REASON_CODES[status.replace("-", "_")],)


def vmtrace(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tracetool", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.kvm
def test_vmtrace_show_takes_io_comma_hlt_as_tail_does_and_internal_error_by_its_status_name(vmsup, tmp_path):
    trace = tmp_path / "x.vmtrace"
    assert vmsup("launch", "x87unknown", "-q", "--trace", str(trace)).returncode != 0
    shown = vmtrace("show", str(trace), "--reason", "io,internal-error", "--json")
    assert shown.returncode == 0, shown.stderr
    reasons = [json.loads(line)["reason"] for line in shown.stdout.splitlines()]
    assert set(reasons) == {"io", "internal_error"} and reasons[-1] == "internal_error"
    assert vmtrace("show", str(trace), "--reason", "io|internal_error", "--json").stdout == shown.stdout


def test_vmsup_tail_accepts_a_status_word_as_a_reason(vmsup):
    proc = vmsup("tail", "--reason", "internal-error", "-n", "1")
    # Past the filter: it only lacks a running launch.
    assert proc.stderr.strip().endswith("no vmsup launch is running (start one with `vmsup launch GUEST`)"), proc.stderr
