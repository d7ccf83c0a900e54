"""The one table of per-VM settings. Everything else is derived from it:

- `VmSpec`'s fields (vmworker.spec): the rows whose `home` is "spec";
- the fleet file's keys and their checks (supervisor.fleet): every row, by `name`;
- `vmsup launch`'s per-VM flags (supervisor.cli): every row with a flag, `--name-with-dashes`;
- the refusal of a per-VM flag given together with `--fleet`: the same rows;
- what travels to the supervisor in `spec.extra` (home "supervisor") and the restart policy
  (home "policy").

One name per setting: flag `--x-y` ↔ fleet key `x_y` ↔ attribute `x_y`. It lives in vmworker, not
the supervisor, because `VmSpec` (the worker's input) is derived from it and the worker never
imports the supervisor. Adding a setting = one row here, plus its use (the worker reading
`spec.x`, or the supervisor reading `spec.extra["x"]`), plus its line in the README; a new kind
of value is one class in vmworker.setting_values. tests/test_settings.py holds the derived
things against this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .errors import SpecError
from .bzimage import BOOT_ENTRIES
from .image import MODES
from .setting_values import (Address, Choice, CoalesceZones, ExitFilter, InputFile, Integer, Invalid, Kind, KeyScript, Limit, Number,
                             Size, Switch, Table, Text)

REQUIRED = object()  # the default of a setting every VM must give (its guest)
MAX_VMS = 1024  # one worker process each: beyond this a typo (vms = 100000) is likelier than intent
RESTART_POLICIES = ("no", "on-failure", "always")  # supervisor.policy.RestartPolicy.mode takes these
BACKOFF_KEYS = ("initial", "max", "jitter")
HOMES = ("spec", "policy", "supervisor", "fleet")


def _mem(size: int) -> int:
    from .memory import validate_mem_size  # page-aligned, within the VMM's RAM limits
    return validate_mem_size(size)


def _cmdline(text: str, label: str) -> None:
    from .multiboot import check_cmdline  # no NUL, within the boot information's room
    try:
        check_cmdline(text)
    except ValueError as e:
        raise SpecError(str(e).replace("--cmdline", label)) from None


def _gdb_endpoint(text: str, label: str) -> None:
    from .gdb.server import parse_endpoint  # [HOST:]PORT
    parse_endpoint(text, label)


def _rtc_base(text: str, label: str) -> None:
    from .deterministic import parse_rtc_base  # UTC, YYYY-MM-DD[THH:MM:SS]
    try:
        parse_rtc_base(text)
    except SpecError as e:
        raise SpecError(f"{label}: {e}") from None


def check_together(get: Callable[[str], Any], label: Callable[[str], str]) -> None:
    """The checks across settings (a row's kind checks only its own value); raises Invalid.
    `get(name)` is a setting's value, `label(name)` how the user spelled it."""
    if get("gdb_wait") and not get("gdb"):
        raise Invalid(f"{label('gdb_wait')} needs {label('gdb')} [HOST:]PORT", key="gdb_wait")
    if get("deterministic"):  # vmworker/deterministic.py: one vCPU, every exit recorded, its own PIC/PIT
        if get("record_only"):
            raise Invalid(f"{label('deterministic')} records every exit a rerun needs: not with {label('record_only')}",
                          key="deterministic")
        if (get("vcpus") or 1) > 1:
            raise Invalid(f"{label('deterministic')} runs one vCPU: not with {label('vcpus')} {get('vcpus')}",
                          key="deterministic")
        if get("irqchip"):
            raise Invalid(f"{label('deterministic')} has its own PIC and PIT: not with {label('irqchip')}",
                          key="deterministic")
    for name in ("steps", "from_exit", "to_exit"):
        if get(name) is not None and not get("step_trace"):
            raise Invalid(f"{label(name)} needs {label('step_trace')}", key=name)
    if get("steps") is not None and (get("from_exit") is not None or get("to_exit") is not None):
        raise Invalid(f"{label('steps')} and {label('from_exit')}/{label('to_exit')} are two ways to say "
                      "which instructions to trace; give one", key="steps")
    if get("from_exit") is not None and get("to_exit") is not None and get("to_exit") < get("from_exit"):
        raise Invalid(f"{label('to_exit')} is before {label('from_exit')}", key="to_exit")
    if get("step_trace") and get("gdb"):
        raise Invalid(f"{label('step_trace')} and {label('gdb')} both single-step the vCPU; give one",
                      key="step_trace")
    if get("restore"):
        from .snapshot import check_file  # a snapshot of this format, of this much memory
        try:
            check_file(get("restore"), get("mem"))
        except SpecError as e:
            raise Invalid(f"{label('restore')}: {e}", key="restore") from None


@dataclass(frozen=True)
class Setting:
    name: str  # the attribute and the fleet key; the flag is --name-with-dashes
    type: Any  # the attribute's type (VmSpec's field, or the fleet entry's value)
    kind: Kind  # how a value is read and checked (vmworker.setting_values)
    default: Any
    help: str  # the flag's help; the README's tables say the same
    # Where the value goes: "spec" a VmSpec field the worker reads; "policy" the supervisor's
    # RestartPolicy; "supervisor" the supervisor alone (spec.extra); "fleet" shapes the fleet itself.
    home: str = "spec"  # one of HOMES
    flag: str | None = ""  # "" = --name-with-dashes; None = no flag (a fleet key only); else this flag
    old_keys: tuple[str, ...] = ()  # fleet keys it was once spelled as: still read, with a deprecation line

    @property
    def flags(self) -> tuple[str, ...]:
        """The option's spellings for typer (a switch is a --x/--no-x pair)."""
        if self.flag is None:
            return ()
        flag = self.flag or "--" + self.name.replace("_", "-")
        return (f"{flag}/--no-{flag[2:]}",) if isinstance(self.kind, Switch) else (flag,)

    @property
    def flag_name(self) -> str | None:
        """The flag as a user writes it (--load-addr), or None."""
        return self.flags[0].split("/")[0] if self.flags else None

    @property
    def param(self) -> str | None:
        """The launch function's parameter for the flag (--backoff-max → backoff_max)."""
        return self.flag_name[2:].replace("-", "_") if self.flag_name else None


SETTINGS: tuple[Setting, ...] = (
    Setting("guest", str, Text(), REQUIRED, "A bundled guest or a path (relative to the fleet file).", flag=None),
    Setting("name", str, Text(), "vm0", "The VM's name (unique; default: the guest's name).", flag=None),
    Setting("vms", int, Integer(1, MAX_VMS), 1, "Run this many copies of each guest, one worker process each.",
            home="fleet", old_keys=("count",)),
    Setting("mem", int, Size(also=_mem), 16 << 20, "Guest RAM: bytes or K/M/G suffix (16M, 512000000, 1G) (default: 16M)."),
    Setting("vcpus", int, Integer(1), 1, "Number of vCPUs, one thread each (default: 1, or the bundled guest's)."),
    Setting("mode", str | None, Choice(MODES), None,
            "CPU mode for flat binaries: real, protected or long (default: real, or the bundled guest's)."),
    Setting("load_addr", int | None, Address(), None, "Flat binaries: guest-physical load address (default: 0x10000)."),
    Setting("entry", int | None, Address(), None, "Entry address (default: the load address, or the ELF's)."),
    Setting("max_exits", int | None, Limit(Integer(1)), None,
            "Stop each VM after this many exits; none, 0 or inf: no limit (the default)."),
    Setting("timeout", float | None, Limit(Number(positive=True)), None,
            "Stop each VM after this many seconds, status timeout; none, 0 or inf: no limit (the default)."),
    Setting("rss_limit", int | None, Limit(Size()), None,
            "Kill a VM whose worker's RSS exceeds this, e.g. 256M; none, 0 or inf: no limit (the default).",
            home="supervisor"),
    Setting("restart", str | None, Choice(RESTART_POLICIES), None, "Restart policy: no, on-failure or always (default: no).",
            home="policy"),
    Setting("backoff", dict | None, Table(BACKOFF_KEYS, "{ initial = 0.5, max = 30.0, jitter = 0.2 }", "max"), None,
            "Cap of the exponential restart backoff in seconds (default: 30).", home="policy", flag="--backoff-max"),
    Setting("startsecs", float | None, Number(), None, "A VM that ends sooner counts as a failed start (default: 1.0).",
            home="policy"),
    Setting("retries", int | None, Integer(0), None, "Starts in a row that end within --startsecs before FATAL (default: 5).",
            home="policy"),
    Setting("console_limit", int | None, Limit(Size()), 64 << 20,
            "Cap each VM's console file (TRACE.NAME.console) at this size, e.g. 64M; then a note, and the output "
            "stays only in the trace; none, 0 or inf: no cap (default: 64M)."),
    Setting("serial_in", str | None, InputFile(("-", "none"), "serial input"), "-",
            "UART input: a file, '-' for stdin, or 'none' (default: -)."),
    Setting("record_only", str | None, ExitFilter(), None, "Record only matching exits, e.g. reason=io,port=0x3f8."),
    Setting("irqchip", bool | None, Switch(), None,
            "In-kernel PIC, IOAPIC, LAPIC and PIT (default: on for kernels: multiboot, bzImage)."),
    Setting("cmdline", str, Text(also=_cmdline), "", "Kernels (multiboot, bzImage): the command line they are given."),
    Setting("initrd", str | None, InputFile(what="initrd"), None,
            "bzImage kernels: an initial ramdisk, loaded high in RAM (ramdisk_image/ramdisk_size)."),
    Setting("boot_entry", str | None, Choice(BOOT_ENTRIES), None,
            "bzImage kernels: enter at the 32-bit or the 64-bit entry (default: 64 when the kernel has it)."),
    Setting("keys", str | None, KeyScript(), None, "Type this key script on the VM's keyboard (i8042)."),
    Setting("gdb", str | None, Text(also=_gdb_endpoint), None,
            "Serve gdb's remote protocol on [HOST:]PORT (vmworker/gdb/; host default 127.0.0.1)."),
    Setting("gdb_wait", bool, Switch(), False, "With --gdb: run no instruction until gdb attaches."),
    Setting("stats_interval", float, Number(), 1.0,
            "Sample the kernel's KVM counters (KVM_GET_STATS_FD) into the trace every this many seconds; "
            "0: off (default: 1)."),
    Setting("step_trace", bool, Switch(), False,
            "Single-step the vCPUs and record one row per instruction (vmtrace steps); one exit per instruction."),
    Setting("steps", int | None, Integer(1), None, "With --step-trace: record this many instructions per vCPU, then run on."),
    Setting("from_exit", int | None, Integer(0), None,
            "With --step-trace: start stepping after this vCPU's exit number A (vmtrace show's seq)."),
    Setting("to_exit", int | None, Integer(0), None, "With --step-trace: stop stepping at this vCPU's exit number B."),
    Setting("deterministic", bool, Switch(), False,
            "Interrupts only at exits, from a user-space PIC/PIT on a virtual clock (instruction count), so "
            "`vmtrace rerun` reruns timer-driven guests exactly; one vCPU, no --irqchip, no --record-only."),
    Setting("rtc_base", str | None, Text(also=_rtc_base), None,
            "The CMOS clock's time at start, UTC (YYYY-MM-DD[THH:MM:SS]); it runs on from there (default: the "
            "host's time; with --deterministic 2000-01-01, on the virtual clock)."),
    Setting("embed", bool, Switch(), True,
            "Embed the guest image's bytes in the trace, so `vmtrace rerun` needs no file (--no-embed: path + sha256 only)."),
    Setting("coalesce", list | None, CoalesceZones(), None,
            "Let KVM queue writes to these ports (PORT[-PORT]) or MMIO ranges (mmio:ADDR[-ADDR]) without an exit; "
            "repeatable or comma-separated; only devices whose writes the guest cannot observe at once."),
    Setting("restore", str | None, InputFile(what="snapshot"), None,
            "Continue from a snapshot (vmsup snapshot) of this guest: memory, CPU, interrupt controller and device "
            "state; the trace carries on its sequence numbers."),
)

BY_NAME = {s.name: s for s in SETTINGS}
FLAGGED = tuple(s for s in SETTINGS if s.flags)  # launch's per-VM flags
OLD_KEYS = {old: s.name for s in SETTINGS for old in s.old_keys}  # deprecated fleet key → its setting
