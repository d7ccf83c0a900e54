"""Standard CLI manners of `vmsup` and `vmtrace` (tracetool/cli_manners.py): -h and --version,
shell completion, help with no arguments, examples at the end of every command's help, help that
fits 80 columns without stray marks or values cut in two, and value errors in the tools' words.

The commands are walked from the Typer apps themselves, so a new command is held to the same."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO
from tracetool import cli_manners

PROGS = {"vmsup": "supervisor", "vmtrace": "tracetool"}


def _app_and_examples(prog: str):
    if prog == "vmsup":
        from supervisor.cli import EXAMPLES, app
    else:
        from tracetool.cli import EXAMPLES, app
    return app, EXAMPLES


def _commands(prog: str) -> list[str]:
    app, examples = _app_and_examples(prog)
    return sorted(cli_manners.commands_of(cli_manners.click_command(app, examples)))


def run(prog: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "80"}
    return subprocess.run([sys.executable, "-m", PROGS[prog], *args], capture_output=True, text=True, timeout=60,
                          cwd=REPO, env=env, stdin=subprocess.DEVNULL)


WALK = [(prog, name) for prog in PROGS for name in ["", *_commands(prog)]]


def test_every_command_of_both_apps_has_one_to_three_examples():
    for prog in PROGS:
        _, examples = _app_and_examples(prog)
        assert set(examples) == {"", *_commands(prog)}, prog
        for name, lines in examples.items():
            assert 1 <= len(lines) <= 3, (prog, name)
            assert all(line.startswith(f"{prog} ") for line in lines), (prog, name)


@pytest.mark.parametrize("prog, name", WALK, ids=[f"{p} {n}".strip() for p, n in WALK])
def test_help_with_dash_h_ends_with_examples_and_fits_80_columns_cleanly(prog, name):
    proc = run(prog, *([name] if name else []), "-h")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    text = proc.stdout
    assert text.startswith(f"Usage: {prog} {name}".rstrip()), text
    _, examples = _app_and_examples(prog)
    tail = text.rstrip("\n").split("\n  Examples:\n")
    assert len(tail) == 2, f"{prog} {name} -h does not end with examples:\n{text}"
    assert tail[1].splitlines() == [f"    {line}" for line in examples[name]]
    for line in text.splitlines():
        assert len(line) <= 80 or line.strip() in examples[name], line
        assert not re.search(r"\s\.(\s|$)", line), f"stray ' .': {line!r}"
        assert not re.search(r"<(str|bool|int|float|list)", line), f"a type where a name belongs: {line!r}"
        assert not re.search(r"\{[A-Z]", line), f"typer's {{ARG}} in a usage line: {line!r}"
        assert line.count("[") == line.count("]"), f"a bracketed value cut in two: {line!r}"
        assert not re.search(r"\w-$", line), f"a word cut at its hyphen: {line!r}"


@pytest.mark.parametrize("prog", PROGS)
def test_no_arguments_prints_help_and_exits_zero(prog):
    proc = run(prog)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.startswith(f"Usage: {prog} [OPTIONS] COMMAND [ARGS]...")


@pytest.mark.parametrize("prog", PROGS)
def test_version_prints_the_package_version(prog):
    proc = run(prog, "--version")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"{prog} {cli_manners.package_version()}\n", "")


@pytest.mark.parametrize("prog", PROGS)
def test_shell_completion_can_be_shown(prog):
    proc = run(prog, "--show-completion", "bash")
    assert proc.returncode == 0, proc.stderr
    assert f"_{prog}_completion" in proc.stdout


BAD_VALUES = [
    ("vmsup", ["top", "--interval", "abc"], "--interval must be a number, not 'abc'"),
    ("vmsup", ["tail", "-n", "x"], "--count (-n) must be a whole number, not 'x'"),
    ("vmsup", ["tail", "-n", "0"], "--count (-n) must be at least 1, not 0"),
    ("vmsup", ["tail", "--vm", "x"], "bad filter term 'vm=x': 'x' is not a number (decimal or 0x-hex)"),
    ("vmsup", ["screen", "x", "--wait", "0"], "--wait must be at least 0.1, not 0"),
    ("vmsup", ["launch", "hello", "--restart", "weird"], "--restart 'weird' is not one of no, on-failure, always"),
    ("vmsup", ["launch", "--bogus"], "No such option: --bogus"),
    ("vmtrace", ["show", "x.vmtrace", "-n", "x"], "--limit (-n) must be a whole number, not 'x'"),
    ("vmtrace", ["replay", "x.vmtrace", "--speed", "fast"], "--speed must be a number, not 'fast'"),
    ("vmtrace", ["screen", "x.vmtrace", "--vm", "-3"], "--vm must be at least 0, not -3"),
]


@pytest.mark.parametrize("prog, args, words", BAD_VALUES, ids=[" ".join([p, *a]) for p, a, _ in BAD_VALUES])
def test_a_bad_value_is_one_line_in_the_tools_own_words(prog, args, words):
    proc = run(prog, *args)
    assert proc.returncode == 2
    assert proc.stderr == f"{prog}: error: {words}\n"
    for library_phrase in ("Input should", "Value error", "Invalid value for", "unable to parse"):
        assert library_phrase not in proc.stderr
