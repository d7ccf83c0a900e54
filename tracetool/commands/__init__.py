"""The vmtrace commands, one module each.

A command module holds its data function (returns plain data, prints nothing), its renderer
(a table or lines for people; `--json` dumps the data for scripts) and `run`, the command as
Typer calls it: its options, which it hands to the data function and then to the renderer.
tracetool/cli.py registers each `run` with one line. What the commands share (exit codes,
error lines, the rich Console, opening a trace, the filter and time options) is in _common.
"""
