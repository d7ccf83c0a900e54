"""`vmtrace`: offline analysis of vmsup exit traces.

Only wiring: each command is one module of tracetool/commands (its data function, its renderer
and its options); a new command is one new module there and one line in COMMANDS below. Bad
input ends in one `vmtrace: error: …` line and exit code 2 (see commands/_common.py).
"""

from __future__ import annotations

from importlib import import_module

import typer

from . import cli_manners
from .commands._common import err

app = cli_manners.new_app("Analyse vmsup exit traces.")

# What `vmtrace COMMAND -h` ends with: 1-3 examples each (tests/test_cli_manners.py walks them all).
EXAMPLES = {
    "": ["vmtrace info t.vmtrace", "vmtrace show t.vmtrace --reason io,hlt -n 20", "vmtrace summary -h"],
    "version": ["vmtrace version", "vmtrace --version"],
    "info": ["vmtrace info t.vmtrace", "vmtrace info t.vmtrace --json"],
    "show": ["vmtrace show t.vmtrace -n 20", "vmtrace show t.vmtrace --reason io,hlt --port 0x3f8",
             "vmtrace show t.vmtrace --from 0.5 --to 1 --json"],
    "summary": ["vmtrace summary t.vmtrace --by ioport --sort time",
                "vmtrace summary t.vmtrace --by symbol,reason", "vmtrace summary t.vmtrace --storms"],
    "console": ["vmtrace console t.vmtrace", "vmtrace console t.vmtrace --vm 1 --source uart"],
    "verify": ["vmtrace verify t.vmtrace", "vmtrace verify t.vmtrace --json"],
    "diff": ["vmtrace diff a.vmtrace b.vmtrace", "vmtrace diff a.vmtrace b.vmtrace --json"],
    "export": ["vmtrace export t.vmtrace --format perfetto -o t.json",
               "vmtrace export t.vmtrace --format csv -o - --reason io"],
    "replay": ["vmtrace replay t.vmtrace", "vmtrace replay t.vmtrace --speed 10 --screen"],
    "plot": ["vmtrace plot t.vmtrace -o rate.png", "vmtrace plot t.vmtrace -o rate.html --vm 0",
             "vmtrace plot t.vmtrace --by symbol -o symbols.png"],
    "screen": ["vmtrace screen t.vmtrace", "vmtrace screen t.vmtrace --at 2.5 --color"],
    "kvm-stats": ["vmtrace kvm-stats t.vmtrace", "vmtrace kvm-stats t.vmtrace --vm 0 --counter halt_exits"],
    "sql": ["vmtrace sql 'select reason, count(*) from exits group by reason' t.vmtrace",
            "vmtrace sql 'select * from vms' 'traces/*.vmtrace' --csv"],
    "steps": ["vmtrace steps t.vmtrace -n 20", "vmtrace steps t.vmtrace --vm 0 --json"],
    "rerun": ["vmtrace rerun t.vmtrace --json", "vmtrace rerun t.vmtrace --trace again.vmtrace",
              "vmtrace rerun t.vmtrace --to-seq 812344 --gdb 1234"],
}


@app.command()
def version() -> None:
    """Print the vmsup version."""
    from importlib.metadata import version as dist_version
    typer.echo(dist_version("vmsup"))


# Each name is a module of tracetool/commands and the command's name, in `vmtrace --help` order.
COMMANDS = (
    "info",
    "show",
    "summary",
    "console",
    "verify",
    "diff",
    "export",
    "replay",
    "plot",
    "screen",
    "sql",
    "kvm-stats",
    "steps",
    "rerun",
)
for _name in COMMANDS:
    app.command(_name)(import_module(f".commands.{_name.replace('-', '_')}", __package__).run)


@app.callback()
def _root(version: bool = cli_manners.version_option("vmtrace")) -> None:
    """Analyse vmsup exit traces."""


def main() -> None:
    """Console-script entry: expected failures become one line and an exit code, never a traceback."""
    from ._alloc import keep_freed_memory
    keep_freed_memory()  # decoding block after block reuses memory instead of faulting in fresh pages
    cli_manners.run(app, "vmtrace", EXAMPLES, err)
