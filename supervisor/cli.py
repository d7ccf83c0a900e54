"""`vmsup`: launch KVM guests and see every exit they make."""

from __future__ import annotations

import inspect
import json
import os
import stat
import subprocess
import sys
import time
from typing import Optional

import typer

from tracetool import cli_manners
from vmworker import settings, status
from vmworker.status import End
from vmworker.errors import KvmError, SpecError, VmsupError
from vmworker.setting_values import Switch
from vmworker.gdb.server import assign_ports
from vmworker.spec import VmSpec

from tracetool.run_files import open_private_append

from . import render
from .fleet import cli_entry, fleet_specs, specs_from_entries
from .keys import check_listen
from .remote_link import check_recorder
from . import runtime
from .commands import COMMANDS, call
from .launch import Launch
from .trace_path import check_trace_path

app = cli_manners.new_app("Run tiny KVM virtual machines and see every exit they make.")

# What `vmsup COMMAND -h` ends with: 1-3 examples each (tests/test_cli_manners.py walks them all).
EXAMPLES = {
    "": ["vmsup launch seed16 --max-exits 10", "vmsup launch hello --vms 2 -d && vmsup ps", "vmsup launch -h"],
    "launch": ["vmsup launch seed16 --max-exits 10", "vmsup launch hello mmio --vms 2 --trace t.vmtrace",
               "vmsup launch --fleet fleet.toml --detach"],
    "ps": ["vmsup ps", "vmsup ps --json"],
    "stop": ["vmsup stop seed16-1", "vmsup stop --all --run 213149-4457"],
    "pause": ["vmsup pause seed16-0"],
    "resume": ["vmsup resume seed16-0"],
    "kill": ["vmsup kill seed16-1"],
    "snapshot": ["vmsup snapshot seed16 s.vmsnap", "vmsup launch seed16 --restore s.vmsnap"],
    "tail": ["vmsup tail", "vmsup tail --vm 0 --reason io,hlt -n 20", "vmsup tail --port 0x3f8 --json"],
    "top": ["vmsup top", "vmsup top --once --json", "vmsup top --sort total --run 213149-4457"],
    "keys": ["vmsup keys", "vmsup keys --dir ./keys --force"],
    "record": ["vmsup record --listen tcp://0.0.0.0:5555 --trace fleet.vmtrace",
               "vmsup launch seed16 --vms 4 --recorder tcp://recorder-host:5555"],
    "screen": ["vmsup screen mbkernel", "vmsup screen mbkernel --once"],
    "gdb": ["vmsup gdb mbkernel", "vmsup gdb seed16 --gdb 127.0.0.1:1235"],
}


@app.callback()
def _root(version: bool = cli_manners.version_option("vmsup")) -> None:
    """Run tiny KVM virtual machines and see every exit they make."""
    _clean_stale_runs()


def _clean_stale_runs() -> None:
    """Every command first removes the run directories a killed supervisor left behind (its pid
    is gone), and says so: a leftover must neither linger nor vanish without a word."""
    try:
        removed = runtime.cleanup_stale()
    except VmsupError:
        return  # a runtime dir that is not ours: the command itself says so if it needs one
    if removed:
        runs = ", ".join(removed)
        _info(f"removed {len(removed)} stale run director{'y' if len(removed) == 1 else 'ies'} "
              f"(run {runs}: supervisor gone)")


def _err(message: str) -> None:
    typer.echo(f"vmsup: error: {message}", err=True)


def _with_vm_flags(func):
    """Give `launch` one option per per-VM setting of the table (vmworker.settings), after its own
    parameters; the function receives them in **vm_flags (None = not given). Flags arrive as text
    (or a bool for a --x/--no-x switch) so the table's checks word every message."""
    own = inspect.signature(func, eval_str=True)
    params = [p for p in own.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    for setting in settings.FLAGGED:
        switch = isinstance(setting.kind, Switch)
        text = Optional[list[str]] if getattr(setting.kind, "repeatable", False) else Optional[str]
        params.append(inspect.Parameter(
            setting.param, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[bool] if switch else text,
            default=typer.Option(None, *setting.flags, help=setting.help, show_default=False,
                                 metavar=None if switch else setting.kind.metavar)))
    func.__signature__ = own.replace(parameters=params)
    return func


@app.command()
@_with_vm_flags
def launch(
    guests: Optional[list[str]] = typer.Argument(None, help="Guest images (flat binary or ELF) or bundled guest names, e.g. seed16."),
    fleet: Optional[str] = typer.Option(None, "--fleet", help="A fleet file (TOML) describing the VMs, instead of GUESTS and per-VM flags."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not print a line per exit."),
    trace: Optional[str] = typer.Option(None, "--trace", help="Trace file to record to (default: traces/NAME-TIME.vmtrace, "
                                        "or under $VMSUP_TRACE_DIR)."),
    no_trace: bool = typer.Option(False, "--no-trace", help="Do not write a trace file (live views still work)."),
    listen: Optional[str] = typer.Option(None, "--listen", help="Also take events on tcp://HOST:PORT, CURVE-encrypted (needs 'vmsup keys')."),
    recorder: Optional[str] = typer.Option(None, "--recorder", help="Send events to 'vmsup record' at tcp://HOST:PORT "
                                           "(CURVE; the trace is written there) instead of a local recorder."),
    keys_dir: Optional[str] = typer.Option(None, "--keys-dir", help="CURVE keys for --listen or --recorder "
                                           "(default: ~/.config/vmsup/keys)."),
    detach: bool = typer.Option(False, "--detach", "-d", help="Run in the background; print the run id and return."),
    screen: bool = typer.Option(False, "--screen", help="Show the VM's VGA text screen live (one VM; implies --quiet); "
                                "keys typed go to its keyboard."),
    **vm_flags,
) -> None:
    """Run VMs, one worker process each, recording every exit.

    One VM runs in the foreground and prints every exit; several show a live status table.
    """
    try:
        if recorder is not None:
            if listen is not None or trace is not None or no_trace:
                raise SpecError("--recorder sends events to a recorder elsewhere: not with --listen, --trace or --no-trace")
            recorder, keys_dir = check_recorder(recorder, keys_dir)
            no_trace = True  # no local trace: the remote recorder writes it
        if listen is not None:
            listen, keys_dir = check_listen(listen, keys_dir)
        if trace is not None and no_trace:
            raise SpecError("--trace and --no-trace contradict each other: give one")
        notes: list[str] = []  # warnings (deprecated fleet keys) and where stdin goes
        stdin_terminal = sys.stdin is not None and sys.stdin.isatty()
        if guests and fleet is None:
            # The flags describe one fleet entry per GUEST: one validation path for both.
            specs = specs_from_entries([cli_entry(g, **vm_flags) for g in guests], quiet=quiet, notes=notes,
                                       stdin_terminal=stdin_terminal)
        else:
            specs = fleet_specs(fleet, guests, vm_flags, quiet=quiet, notes=notes, stdin_terminal=stdin_terminal)
        for note in notes:
            _info(note if note.startswith("stdin ") else f"warning: {note}")
        if screen and (detach or fleet is not None or len(specs) > 1):
            raise SpecError("--screen shows one foreground VM: not with --detach, --fleet, --vms or several guests")
        trace_path = None if no_trace else (trace or _default_trace_path(specs[0].name))
        if trace_path:
            check_trace_path(trace_path, [fleet, *(f for s in specs for f in (s.guest, s.serial_in, s.keys))],
                             create_dir=trace is None)
        gdb_lines = assign_ports(specs)  # --gdb: PORT+i for VM i, each port checked before any VM starts
        if detach:
            if any(s.serial_in == "-" for s in specs) and _stdin_is_data():
                _info("warning: a detached run takes no standard input: VMs reading '-' get none "
                      "(use --serial-in FILE)")
            raise typer.Exit(_detach(trace_path))
        foreground = len(specs) == 1 and not os.environ.get(DETACHED_ENV)
        for s in specs:
            s.screen = screen  # the terminal belongs to the screen: guest console text goes to a file
        consoles = None if foreground and not screen else [_console_path(trace_path, s.name) for s in specs]
        run = Launch(specs, trace_path, console_paths=consoles, foreground=foreground, listen=listen, keys_dir=keys_dir,
                     remote_recorder=recorder)
        run.start()
        _tell_detaching_parent(run.run_dir.run_id)
    except KvmError as e:
        _err(str(e))
        raise typer.Exit(status.EXIT_NO_KVM if e.ioctl.startswith("open ") else status.EXIT_VM_ERROR)
    except VmsupError as e:
        _err(str(e))
        raise typer.Exit(status.EXIT_BAD_INPUT)
    for line in _image_lines(specs) + gdb_lines:
        _info(line)
    recording = (f"recording to {trace_path}" if trace_path else f"recording at {recorder} (its trace: VMs named "
                 f"NAME@{run.run_dir.run_id})" if recorder else "not recording (--no-trace)")
    _info(f"run {run.run_dir.run_id}: " + recording
          + (f" (the previous file of that name kept as {run.kept_trace})" if run.kept_trace else ""))
    if foreground and screen:
        from .screen_cli import watch_launch
        outcome = watch_launch(run, specs[0].vm_id, specs[0].name, consoles[0])
    elif foreground:
        run.on_quiet = lambda name, text: _info(f"{name}: {text}")
        outcome = run.wait()
    else:
        outcome = render.watch_fleet(run, err_console())
    raise typer.Exit(_report(outcome, foreground))


# --detach: the launch re-runs itself in a new session; the child reports its run id on a pipe.
DETACHED_ENV = "VMSUP_DETACHED_READY_FD"


def _stdin_is_data() -> bool:
    """Standard input is a pipe or a file (not a terminal, not /dev/null): input someone meant."""
    try:
        mode = os.fstat(0).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISREG(mode)


def _detach(trace_path: str | None) -> int:
    argv = [a for a in sys.argv[1:] if a not in ("--detach", "-d")]
    log_dir = os.path.dirname(os.path.abspath(trace_path)) if trace_path else str(runtime.base_dir())
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, f"vmsup-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log")
    read_fd, write_fd = os.pipe()
    with open_private_append(log_path) as log:
        child = subprocess.Popen([sys.executable, "-m", "supervisor", *argv], stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=log, pass_fds=(write_fd,), start_new_session=True,
                                 env={**os.environ, DETACHED_ENV: str(write_fd)})
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        run_id = pipe.readline().decode(errors="replace").strip()
    if not run_id:
        child.wait(timeout=10)
        tail = open(log_path, errors="replace").read().strip().splitlines()
        _err(tail[-1].removeprefix("vmsup: error: ") if tail else "the background launch did not start")
        return child.returncode or status.EXIT_VM_ERROR
    _info(f"run {run_id} started in the background (pid {child.pid}); log: {log_path}")
    typer.echo(run_id)
    return 0


def _tell_detaching_parent(run_id: str) -> None:
    fd = os.environ.pop(DETACHED_ENV, None)
    if fd is not None:
        try:
            os.write(int(fd), run_id.encode() + b"\n")
            os.close(int(fd))
        except (OSError, ValueError):
            pass


# Control commands: each CLI command is a thin shell around one class in supervisor.commands.
def _run_of_vm(target: str | None, run: str | None) -> runtime.RunDir:
    """The run to send a VM command to: --run, the only run, or the one run that has that VM."""
    if run is not None or target is None:
        return runtime.find_run(run)
    runs = runtime.live_runs()
    if len(runs) <= 1:
        return runtime.find_run(None)
    having = []
    for rd in runs:
        try:
            vms = call(rd, COMMANDS["ps"].request(), timeout=2.0)["vms"]
        except VmsupError:
            continue
        if any(target in (vm["name"], str(vm["vm"])) for vm in vms):
            having.append(rd)
    if len(having) == 1:
        return having[0]
    ids = ", ".join(r.run_id for r in (having or runs))
    raise runtime.RuntimeDirError(f"{'several runs have' if having else 'no run has'} a VM named {target!r} "
                                  f"(runs: {ids}): pick one with --run ID")


def _control(command_name: str, target: str | None, all_vms: bool, run: str | None) -> dict:
    command = COMMANDS[command_name]
    try:
        request = command.request(target, all_vms) if command.takes_target else command.request()
        return call(_run_of_vm(None if all_vms else target, run), request)
    except VmsupError as e:
        _err(str(e))
        raise typer.Exit(status.EXIT_BAD_INPUT)


@app.command()
def ps(run: Optional[str] = typer.Option(None, "--run", help="Only this run."),
       json_out: bool = typer.Option(False, "--json", help="JSON for scripts.")) -> None:
    """List running launches and their VMs: state, pid, uptime, exits, restarts."""
    try:
        runs = [runtime.find_run(run)] if run else runtime.live_runs()
    except VmsupError as e:  # no such --run, or a runtime dir that is not ours
        _err(str(e))
        raise typer.Exit(status.EXIT_BAD_INPUT)
    replies = []
    for rd in runs:
        try:
            replies.append(call(rd, COMMANDS["ps"].request()))
        except VmsupError as e:
            replies.append({"run": rd.run_id, "error": str(e), "vms": []})
    if json_out:
        typer.echo(json.dumps(replies, indent=1))
    elif not replies:
        typer.echo("no vmsup launch is running")
    else:
        render.ps_table(replies, out_console())


def _target_command(name: str):
    def command(vm: Optional[str] = typer.Argument(None, help="VM name (or id)."),
                all_vms: bool = typer.Option(False, "--all", help="Every VM of the run."),
                run: Optional[str] = typer.Option(None, "--run", help="The run (when several are running).")) -> None:
        reply = _control(name, vm, all_vms, run)
        done = next(iter(reply.values()), [])
        _info(f"{name}: {', '.join(done) if done else 'nothing to do'}")

    command.__doc__ = COMMANDS[name].help
    return command


for _name in ("stop", "pause", "resume", "kill"):
    app.command(name=_name)(_target_command(_name))


@app.command()
def gdb(vm: str = typer.Argument(..., help="VM name (or id)."),
        run: Optional[str] = typer.Option(None, "--run", help="The run (when several are running)."),
        endpoint: str = typer.Option("127.0.0.1:1234", "--gdb", help="[HOST:]PORT the stub listens on.")) -> None:
    """Open a gdb stub on a running VM; the VM stops when gdb attaches. gdb then connects with `target remote HOST:PORT`."""
    try:
        reply = call(_run_of_vm(vm, run), COMMANDS["gdb"].request(vm, endpoint), timeout=10.0)
    except VmsupError as e:
        _err(str(e))
        raise typer.Exit(status.EXIT_BAD_INPUT)
    where = reply["endpoint"]
    already = " (it already had one)" if reply.get("already") else ""
    _info(f"{reply['vm']}: gdb stub on {where}{already}: gdb -ex 'target remote {where}'")


@app.command()
def snapshot(vm: str = typer.Argument(..., help="VM name (or id)."),
             file: str = typer.Argument(..., help="The snapshot file to write."),
             run: Optional[str] = typer.Option(None, "--run", help="The run (when several are running)."),
             json_out: bool = typer.Option(False, "--json", help="JSON for scripts.")) -> None:
    """Save a running VM to FILE; it runs on. `vmsup launch GUEST --restore FILE` continues from it."""
    command = COMMANDS["snapshot"]
    try:
        reply = call(_run_of_vm(vm, run), command.request(vm, file), timeout=command.TIMEOUT)
    except VmsupError as e:
        _err(str(e))
        raise typer.Exit(status.EXIT_BAD_INPUT)
    if json_out:
        typer.echo(json.dumps(reply))
        return
    _info(f"snapshot: {reply['vm']} → {reply['path']} ({reply['bytes']:,} bytes, {reply['seconds']:.2f} s, "
          f"next seq {', '.join(str(n) for n in reply['next_seq'])})")


def _image_lines(specs: list[VmSpec]) -> list[str]:
    """`NAME: multiboot ELF32 kernel, entry 0x100000` — the format each distinct guest was loaded as."""
    from vmworker.loader import load_image

    lines, seen = [], set()
    for s in specs:
        key = (s.guest, s.load_addr, s.entry, s.mode, s.boot_entry)
        if key not in seen:
            seen.add(key)
            try:
                image = load_image(s.guest, load_addr=s.load_addr, entry=s.entry, mode=s.mode, boot_entry=s.boot_entry)
            except VmsupError:
                continue  # the worker reports it
            lines.append(f"{os.path.basename(s.guest)}: {image.describe()}")
    return lines


def _default_trace_path(name: str) -> str:
    directory = os.environ.get("VMSUP_TRACE_DIR") or "traces"
    return os.path.join(directory, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.vmtrace")


def _console_path(trace_path: str | None, name: str) -> str | None:
    if trace_path is None:
        return None
    return f"{trace_path.removesuffix('.vmtrace')}.{name}.console"


def _info(message: str) -> None:
    typer.echo(f"vmsup: {message}", err=True)


def _report(outcome, foreground: bool) -> int:
    for note in outcome.notes:
        _info(note)
    rec = outcome.recorder
    if outcome.remote:
        _info(render.remote_line(outcome.remote, outcome.results, outcome.run_id))
    if outcome.trace:
        if rec is None:
            _err(f"the recorder did not report; {outcome.trace} may be incomplete")
        else:
            _info(render.recording_line(outcome.trace, rec, outcome.tally))
            if rec.get("recording_error"):
                _err(rec["recording_error"])
    codes = []
    for result in outcome.results:
        if result.get("status") == End.ERROR:
            _err(f"{result.get('name', 'vm')}: {result.get('error', 'the VM could not start')}")
            codes.append(int(result.get("exit_code", status.EXIT_BAD_INPUT)))
            continue
        if foreground and result.get("registers"):
            for line in render.register_lines(result["registers"]):
                typer.echo(line, err=True)
        if foreground:
            typer.echo(render.status_line(result), err=True)  # the last line: why the VM ended
        codes.append(int(result.get("exit_code", status.EXIT_VM_ERROR)))
    if not foreground:
        render.summary_table(outcome, err_console())
    return max(codes) if codes else 0


def out_console():
    from rich.console import Console
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=200)  # scripts and pipes: never wrap a row
    return console


def err_console():
    from rich.console import Console
    return Console(stderr=True, highlight=False)


def main() -> None:
    """Console-script entry: expected failures become one line and an exit code, never a traceback."""
    cli_manners.run(app, "vmsup", EXAMPLES, _err)

from .live_cli import register as _register_live  # noqa: E402
_register_live(app)
from .keys import register as _register_keys  # noqa: E402
_register_keys(app)
from .record_cli import register as _register_record  # noqa: E402
_register_record(app)
from .screen_cli import register as _register_screen  # noqa: E402
_register_screen(app)
