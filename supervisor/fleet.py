"""Fleet files: many VMs in one TOML file; the `vmsup launch` flags are shorthand for one entry.

    [defaults]                 # optional: any VM key but `name`, applied to every [[vm]]
    mem = "32M"
    [[vm]]
    name = "counter"           # unique; defaults to the guest's name
    guest = "seed16"           # a bundled guest or a path, relative to the fleet file
    count = 2                  # copies, named counter-0, counter-1
    restart = "on-failure"
    backoff = { initial = 0.5, max = 30.0, jitter = 0.2 }

Both front ends build `FleetEntry`s through one checker (`_resolve`), so a value means the same
and fails the same way whether it came from a flag or from a file; only the label differs
(`--mem` or `mem`). A fleet file is untrusted input: its size, the number of VMs and every value
are bounded, and each problem is one `FILE:LINE: message` line.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from vmworker.errors import GuestImageError, SpecError, VmsupError
from vmworker.spec import VmSpec, parse_address, parse_size

from .guests import bundled_guests, resolve_guest
from .policy import POLICIES, RestartPolicy

MAX_FLEET_BYTES = 1 << 20  # a fleet of a thousand VMs is a few hundred KiB of TOML
MAX_VMS = 1024  # one worker process each: beyond this a typo (count = 100000) is likelier than intent
MAX_NAME = 64
MODES = ("real", "protected", "long")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # names become file names (consoles): no '/', no leading '.'

VM_KEYS = ("name", "guest", "count", "mem", "vcpus", "mode", "load_addr", "entry", "max_exits", "timeout",
           "rss_limit", "restart", "backoff", "startsecs", "retries", "serial_in", "record_only",
           "irqchip", "cmdline", "keys")
BACKOFF_KEYS = ("initial", "max", "jitter")
# The `vmsup launch` flag for each key, for messages from the CLI path.
FLAGS = {"guest": "GUESTS", "count": "--vms", "mem": "--mem", "vcpus": "--vcpus", "mode": "--mode",
         "load_addr": "--load-addr", "entry": "--entry", "max_exits": "--max-exits", "timeout": "--timeout",
         "rss_limit": "--rss-limit", "restart": "--restart", "backoff": "--backoff", "startsecs": "--startsecs",
         "retries": "--retries", "serial_in": "--serial-in", "record_only": "--record-only", "name": "--name",
         "irqchip": "--irqchip", "cmdline": "--cmdline", "keys": "--keys"}


class FleetError(VmsupError):
    """A bad fleet file; str() is one line, `FILE:LINE: message`."""

    def __init__(self, path: str, line: int | None, message: str) -> None:
        self.path = path
        self.line = line
        self.message = message
        super().__init__(f"{path}:{line}: {message}" if line else f"{path}: {message}")


@dataclass
class FleetEntry:
    """One [[vm]] (or the launch flags for one guest), every value checked and resolved."""

    name: str
    guest: str  # a path
    count: int = 1
    mem_size: int = 16 << 20
    vcpus: int = 1
    mode: str | None = None
    load_addr: int | None = None
    entry: int | None = None
    max_exits: int | None = None
    timeout: float | None = None
    rss_limit: int | None = None  # bytes; None = no limit
    policy: RestartPolicy = dataclasses.field(default_factory=RestartPolicy)
    serial_in: str = "-"  # "-" = stdin, "none", or a path
    record_only: str | None = None
    irqchip: bool | None = None  # None: the loader decides (on for multiboot kernels)
    cmdline: str = ""  # multiboot kernels' command line
    keys: str | None = None  # a key script (absolute path)
    line: int | None = None  # the [[vm]] header's line; None for an entry built from flags


class _Invalid(Exception):
    """A bad value of `key`; each front end adds its own context (a line, or nothing)."""

    def __init__(self, key: str, message: str, sub: str | None = None) -> None:
        self.key = key
        self.sub = sub  # a key inside the value's table (backoff.max)
        super().__init__(message)


# Values ----------------------------------------------------------------------------------------

def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "a table",
            list: "an array"}.get(type(value), f"a {type(value).__name__}")


def _integer(key: str, label: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(key, f"{label} must be an integer, not {_kind(value)}")
    if value < minimum:
        raise _Invalid(key, f"{label} must be at least {minimum}, not {value}")
    if maximum is not None and value > maximum:
        raise _Invalid(key, f"{label} must be at most {maximum}, not {value}")
    return value


def _number(key: str, label: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(key, f"{label} must be a number, not {_kind(value)}")
    if not math.isfinite(value):
        raise _Invalid(key, f"{label} must be a finite number, not {value}")
    return float(value)


def _string(key: str, label: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(key, f"{label} must be a string, not {_kind(value)}")
    if not value.strip():
        raise _Invalid(key, f"{label} must not be empty")
    return value


def _size(key: str, label: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _Invalid(key, f"{label} must be a size like \"16M\" or a number of bytes, not {_kind(value)}")
    try:
        return parse_size(value, label)
    except SpecError as e:
        raise _Invalid(key, str(e)) from None


def _address(key: str, label: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _Invalid(key, f"{label} must be an address like 0x10000, not {_kind(value)}")
    try:
        addr = parse_address(value, label)
    except SpecError as e:
        raise _Invalid(key, str(e)) from None
    if addr >= 1 << 64:
        raise _Invalid(key, f"{label} {value!r} is beyond the 64-bit address space")
    return addr


def _choice(key: str, label: str, value: Any, choices: tuple[str, ...]) -> str:
    value = _string(key, label, value)
    if value not in choices:
        raise _Invalid(key, f"{label} {value!r} is not one of {', '.join(choices)}")
    return value


def _relative(path: str, base_dir: Path | None) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or base_dir is None else base_dir / p


def _guest(label: str, value: Any, base_dir: Path | None):
    """A guest: a path (relative to the fleet file, if any) or a bundled name."""
    value = _string("guest", label, value)
    try:
        if base_dir is None:
            return resolve_guest(value)
        candidate = _relative(value, base_dir)
        if not candidate.exists() and os.sep not in value:
            bundled = bundled_guests()
            if value in bundled:
                return bundled[value]
            known = ", ".join(sorted(bundled)) or "none found"
            raise _Invalid("guest", f"{label} {value!r}: no such file next to the fleet file, nor a bundled "
                                    f"guest (bundled: {known})")
        return resolve_guest(str(candidate))
    except GuestImageError as e:
        raise _Invalid("guest", f"{label} {e}" if base_dir is not None else str(e)) from None


def _serial_in(label: str, value: Any, base_dir: Path | None) -> str:
    value = _string("serial_in", label, value)
    if value in ("-", "none"):
        return value
    path = _relative(value, base_dir)
    if not path.is_file() or not os.access(path, os.R_OK):
        why = "no such file" if not path.exists() else "not a readable file"
        raise _Invalid("serial_in", f"{label}: serial input {path}: {why}")
    return str(path)


def _record_only(label: str, value: Any) -> str:
    from tracetool.filters import FilterError, parse_filter

    value = _string("record_only", label, value)
    try:
        parse_filter(value)
    except FilterError as e:
        raise _Invalid("record_only", f"{label}: {e}") from None
    return value


def _policy(values: dict, label: Callable[[str], str]) -> RestartPolicy:
    base = RestartPolicy()
    fields: dict[str, Any] = {}
    if values.get("restart") is not None:
        fields["mode"] = _choice("restart", label("restart"), values["restart"], POLICIES)
    backoff = values.get("backoff")
    if backoff is not None:
        if not isinstance(backoff, dict):
            raise _Invalid("backoff", f"{label('backoff')} must be a table like "
                                      f"{{ initial = 0.5, max = 30.0, jitter = 0.2 }}, not {_kind(backoff)}")
        for k, v in backoff.items():
            if k not in BACKOFF_KEYS:
                raise _Invalid("backoff", f"unknown key {k!r} in {label('backoff')} (known: {', '.join(BACKOFF_KEYS)})", k)
            try:
                fields[f"backoff_{k}"] = _number("backoff", f"{label('backoff')}.{k}", v)
            except _Invalid as e:
                raise _Invalid("backoff", str(e), k) from None
    if values.get("startsecs") is not None:
        fields["startsecs"] = _number("startsecs", label("startsecs"), values["startsecs"])
        if fields["startsecs"] < 0:
            raise _Invalid("startsecs", f"{label('startsecs')} must not be negative, not {values['startsecs']}")
    if values.get("retries") is not None:
        fields["retries"] = _integer("retries", label("retries"), values["retries"], 0)
    try:
        return dataclasses.replace(base, **fields).validate()
    except ValueError as e:
        raise _Invalid("backoff" if backoff is not None else "restart", str(e)) from None


_max_vcpus: list[int] = []


def _host_max_vcpus() -> int:
    """KVM's vCPU limit, asked once (opening /dev/kvm: a missing KVM is reported before any VM)."""
    if not _max_vcpus:
        from vmworker.kvm import Kvm
        with Kvm() as kvm:
            _max_vcpus.append(kvm.max_vcpus())
    return _max_vcpus[0]


def _image_key(reason: str, values: dict) -> str:
    """Which key an image problem is about, to point at its line (else the guest's)."""
    for fragment, key in (("entry ", "entry"), ("does not fit", "mem"), ("load address", "load_addr"),
                          ("aligned", "load_addr"), ("below 1 MiB", "load_addr"), ("boot tables", "load_addr"),
                          ("mode", "mode")):
        if fragment in reason and values.get(key) is not None:
            return key
    return "guest"


def _resolve(values: dict, label: Callable[[str], str], base_dir: Path | None, line: int | None) -> FleetEntry:
    """Check one VM's raw values (from TOML or from flags) and resolve them; raises _Invalid."""
    from vmworker.loader import load_image
    from vmworker.memory import validate_mem_size

    for key in values:
        if key not in VM_KEYS:
            raise _Invalid(key, f"unknown key {key!r} (known: {', '.join(VM_KEYS)})")
    if values.get("guest") is None:
        raise _Invalid("guest", "no guest: every VM needs guest = \"NAME\" or a path")
    found = _guest(label("guest"), values["guest"], base_dir)
    v = {k: x for k, x in values.items() if x is not None}
    if "name" in v:
        name = _string("name", label("name"), v["name"])
    else:
        name = found.name
    if len(name) > MAX_NAME or not _NAME.match(name):
        why = (f"{label('name')} {name!r}" if "name" in v else f"the guest's name {name!r} (set name = \"...\")")
        raise _Invalid("name", f"{why} is not a usable VM name: letters, digits, '_', '.', '-', "
                               f"at most {MAX_NAME}, not starting with '.' or '-'")
    count = _integer("count", label("count"), v.get("count", 1), 1, MAX_VMS)
    mem = _size("mem", label("mem"), v.get("mem", "16M"))
    try:
        mem_size = validate_mem_size(mem)
    except SpecError as e:
        raise _Invalid("mem", str(e)) from None
    vcpus = _integer("vcpus", label("vcpus"), v["vcpus"], 1) if "vcpus" in v else found.vcpus
    mode = _choice("mode", label("mode"), v["mode"], MODES) if "mode" in v else found.mode
    load_addr = _address("load_addr", label("load_addr"), v["load_addr"]) if "load_addr" in v else None
    entry = _address("entry", label("entry"), v["entry"]) if "entry" in v else None
    max_exits = _integer("max_exits", label("max_exits"), v["max_exits"], 1) if "max_exits" in v else None
    timeout = None
    if "timeout" in v:
        timeout = _number("timeout", label("timeout"), v["timeout"])
        if not timeout > 0:
            raise _Invalid("timeout", f"{label('timeout')} must be a positive number of seconds, not {v['timeout']}")
    rss_limit = None
    if "rss_limit" in v and v["rss_limit"] != "none":
        rss_limit = _size("rss_limit", label("rss_limit"), v["rss_limit"])
        if rss_limit <= 0:
            raise _Invalid("rss_limit", f"{label('rss_limit')} must be greater than 0")
    policy = _policy(v, label)
    serial_in = _serial_in(label("serial_in"), v.get("serial_in", "-"), base_dir)
    record_only = _record_only(label("record_only"), v["record_only"]) if "record_only" in v else None
    irqchip = None
    if "irqchip" in v:
        if not isinstance(v["irqchip"], bool):
            raise _Invalid("irqchip", f"{label('irqchip')} must be true or false, not {_kind(v['irqchip'])}")
        irqchip = v["irqchip"]
    cmdline = _string("cmdline", label("cmdline"), v["cmdline"]) if "cmdline" in v else ""
    keys = None
    if "keys" in v:
        keys = str(_relative(_string("keys", label("keys"), v["keys"]), base_dir).resolve())
        from vmworker.devices.keyboard import parse_key_script
        try:
            parse_key_script(keys)  # unknown key names: one line with file:line, before any VM
        except VmsupError as e:
            raise _Invalid("keys", str(e)) from None
    try:
        # The image is checked here, so bad input fails before any process or VM exists.
        image = load_image(found.path, load_addr=load_addr, entry=entry, mode=mode)
        image.check_fits(mem_size)
    except GuestImageError as e:
        raise _Invalid(_image_key(e.reason, v), str(e)) from None
    from vmworker.machine import check_vm_shape

    try:
        check_vm_shape(image, mem_size, vcpus, _host_max_vcpus())
    except SpecError as e:
        message = str(e).replace("--vcpus", label("vcpus"), 1)  # the machine's messages name the flag
        raise _Invalid("vcpus" if "vcpus" in v else "mem" if "mem" in v else "guest", message) from None
    return FleetEntry(name=name, guest=found.path, count=count, mem_size=mem_size, vcpus=vcpus, mode=mode,
                      load_addr=load_addr, entry=entry, max_exits=max_exits, timeout=timeout, rss_limit=rss_limit,
                      policy=policy, serial_in=serial_in, record_only=record_only, irqchip=irqchip,
                      cmdline=cmdline, keys=keys, line=line)


# The flags' entry ------------------------------------------------------------------------------

def cli_entry(guest: str, *, vms: int = 1, mem: str = "16M", load_addr: str | None = None,
              entry: str | None = None, mode: str | None = None, vcpus: int | None = None,
              max_exits: int | None = None, timeout: float | None = None, serial_in: str = "-",
              record_only: str | None = None, restart: str | None = None, backoff: dict | None = None,
              startsecs: float | None = None, retries: int | None = None,
              rss_limit: str | None = None, irqchip: bool | None = None, cmdline: str | None = None,
              keys: str | None = None) -> FleetEntry:
    """The entry `vmsup launch GUEST --flags…` means; bad values raise SpecError naming the flag."""
    values = {"guest": guest, "count": vms, "mem": mem, "load_addr": load_addr, "entry": entry, "mode": mode,
              "vcpus": vcpus, "max_exits": max_exits, "timeout": timeout, "serial_in": serial_in,
              "record_only": record_only, "restart": restart, "backoff": backoff, "startsecs": startsecs,
              "retries": retries, "rss_limit": rss_limit, "irqchip": irqchip, "cmdline": cmdline or None,
              "keys": keys}
    try:
        return _resolve(values, FLAGS.__getitem__, None, None)
    except _Invalid as e:
        raise SpecError(str(e)) from None


# Fleet files -----------------------------------------------------------------------------------

_HEADER = re.compile(r"""^\s*(\[\[?)\s*([^\]]*?)\s*\]\]?\s*(?:#.*)?$""")


def _unquote(part: str) -> str:
    part = part.strip()
    return part[1:-1] if len(part) >= 2 and part[0] == part[-1] and part[0] in "\"'" else part


class _Lines:
    """Line numbers for a parsed fleet file, which tomllib does not give: found by scanning the text
    for table headers and `key =` lines (a heuristic that covers every way the format is written)."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        # (line number, "[" or "[[", dotted name as a tuple)
        self.headers: list[tuple[int, str, tuple[str, ...]]] = []
        for n, line in enumerate(self.lines, 1):
            m = _HEADER.match(line)
            if m:
                self.headers.append((n, m.group(1), tuple(_unquote(p) for p in m.group(2).split("."))))

    def _region(self, start: int, owner: str) -> tuple[int, int]:
        """Lines from `start` to the next header that is not a sub-table of `owner`."""
        for n, _kind, name in self.headers:
            if n > start and name[0] != owner or (n > start and name == (owner,)):
                return start, n
        return start, len(self.lines) + 1

    def vm_header(self, index: int) -> int | None:
        vms = [n for n, kind, name in self.headers if kind == "[[" and name == ("vm",)]
        return vms[index] if index < len(vms) else None

    def table_header(self, name: str) -> int | None:
        for n, kind, hname in self.headers:
            if kind == "[" and hname == (name,):
                return n
        return None

    @staticmethod
    def _sets(key: str, sub: str | None = None) -> re.Pattern:
        """A line setting `key` (`key =`, `key.x =`), or with `sub` the dotted `key.sub =`."""
        def bare_or_quoted(k: str) -> str:
            k = re.escape(k)
            return rf"""(?:{k}|"{k}"|'{k}')"""
        if sub is None:
            return re.compile(rf"^\s*{bare_or_quoted(key)}\s*[=.]")
        return re.compile(rf"^\s*{bare_or_quoted(key)}\s*\.\s*{bare_or_quoted(sub)}\s*=")

    def key(self, start: int | None, owner: str, key: str, sub: str | None = None) -> int | None:
        """The first line in `owner`'s table starting at `start` that sets `key` (or its sub-table);
        with `sub`, the line of the dotted key or sub-table that sets `sub`, if there is one."""
        if start is None:
            return None
        lo, hi = self._region(start, owner)
        if sub is not None:
            dotted = self._sets(key, sub)
            for n in range(lo + 1, hi):
                if dotted.match(self.lines[n - 1]):
                    return n
            for n, _kind, name in self.headers:
                if lo < n < hi and name[1:] == (key,):  # [vm.backoff]: look inside it
                    end = next((m for m, _k, _n in self.headers if m > n), len(self.lines) + 1)
                    return next((m for m in range(n + 1, end) if self._sets(sub).match(self.lines[m - 1])), n)
        pattern = self._sets(key)
        for n in range(lo + 1, hi):
            if pattern.match(self.lines[n - 1]):
                return n
        for n, _kind, name in self.headers:
            if lo < n < hi and name[1:2] == (key,):
                return n
        return None

    def top_level(self, key: str) -> int | None:
        pattern = self._sets(key)
        first_header = self.headers[0][0] if self.headers else len(self.lines) + 1
        for n in range(1, first_header):
            if pattern.match(self.lines[n - 1]):
                return n
        for n, _kind, name in self.headers:
            if name[0] == key:
                return n
        return None


def _syntax_line(message: str, lines: _Lines) -> tuple[int, str]:
    m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if m:
        return int(m.group(1)), f"{message[:m.start()]} (column {m.group(2)})"
    m = re.search(r"\s*\(at end of document\)$", message)
    if m:
        return max(1, len(lines.lines)), f"{message[:m.start()]} (at the end of the file)"
    return 1, message


def load_fleet(path: str) -> list[FleetEntry]:
    """Read and check a fleet file; every problem is a FleetError (`FILE:LINE: message`)."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FLEET_BYTES + 1)
    except OSError as e:
        raise FleetError(path, None, f"cannot read the fleet file: {e.strerror or e}") from None
    if len(data) > MAX_FLEET_BYTES:
        raise FleetError(path, None, f"the fleet file is larger than {MAX_FLEET_BYTES >> 20} MiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise FleetError(path, data[:e.start].count(b"\n") + 1, "not UTF-8 text") from None
    lines = _Lines(text)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        line, message = _syntax_line(str(e), lines)
        raise FleetError(path, line, f"TOML syntax: {message}") from None
    base_dir = Path(path).resolve().parent

    for key in doc:
        if key not in ("defaults", "vm"):
            raise FleetError(path, lines.top_level(key) or 1,
                             f"unknown key or table {key!r} (a fleet file has [defaults] and [[vm]] tables)")
    defaults = doc.get("defaults", {})
    defaults_line = lines.table_header("defaults") or lines.top_level("defaults")
    if not isinstance(defaults, dict):
        raise FleetError(path, defaults_line or 1, "defaults must be a table: [defaults]")
    for key in defaults:
        if key == "name":
            raise FleetError(path, lines.key(defaults_line, "defaults", key) or defaults_line,
                             "name cannot be a default: every VM's name is its own")
        if key not in VM_KEYS:
            raise FleetError(path, lines.key(defaults_line, "defaults", key) or defaults_line,
                             f"unknown key {key!r} in [defaults] (known: {', '.join(VM_KEYS)})")
    vms = doc.get("vm")
    if vms is None:
        raise FleetError(path, 1, "no VMs: add a [[vm]] table with guest = \"NAME\" for each")
    if not isinstance(vms, list) or not all(isinstance(v, dict) for v in vms):
        raise FleetError(path, lines.top_level("vm") or 1, "vm must be an array of tables: write [[vm]], not [vm]")

    entries: list[FleetEntry] = []
    seen: dict[str, int] = {}  # VM name (after count expansion) -> header line of its entry
    total = 0
    for index, table in enumerate(vms):
        header = lines.vm_header(index)

        def line_of(key: str, sub: str | None = None) -> int | None:
            if key in table:
                return lines.key(header, "vm", key, sub) or header
            if key in defaults:
                return lines.key(defaults_line, "defaults", key, sub) or defaults_line
            return header

        try:
            entry = _resolve({**defaults, **table}, lambda k: k, base_dir, header)
        except _Invalid as e:
            raise FleetError(path, line_of(e.key, e.sub), str(e)) from None
        total += entry.count
        if total > MAX_VMS:
            raise FleetError(path, line_of("count"), f"more than {MAX_VMS} VMs in one fleet")
        for name in _names(entry):
            if name in seen:
                where = line_of("name") if "name" in table else header
                raise FleetError(path, where, f"duplicate VM name {name!r} (first used by the [[vm]] at line "
                                              f"{seen[name]}); give each [[vm]] its own name")
            seen[name] = header
        entries.append(entry)
    return entries


def _names(entry: FleetEntry) -> list[str]:
    return [f"{entry.name}-{i}" for i in range(entry.count)] if entry.count > 1 else [entry.name]


# Specs -----------------------------------------------------------------------------------------

def specs_from_entries(entries: list[FleetEntry], *, quiet: bool = False) -> list[VmSpec]:
    """One VmSpec per VM, vm_id 0.. in order. The restart policy and the RSS limit travel in
    `spec.extra` ("policy": RestartPolicy as a dict, "rss_limit": bytes or None) for the supervisor."""
    total = sum(e.count for e in entries)
    several = total > 1
    specs: list[VmSpec] = []
    for e in entries:
        for name in _names(e):
            spec = VmSpec(
                guest=e.guest, name=name, mem_size=e.mem_size, vcpus=e.vcpus, mode=e.mode, load_addr=e.load_addr,
                entry=e.entry, max_exits=e.max_exits, timeout=e.timeout,
                # Several VMs share one terminal: no per-exit lines, and no shared stdin.
                quiet=quiet or several,
                serial_input=None if e.serial_in == "none" or (several and e.serial_in == "-") else e.serial_in,
                record_filter=e.record_only, irqchip=e.irqchip, cmdline=e.cmdline, keys=e.keys,
                extra={"policy": dataclasses.asdict(e.policy), "rss_limit": e.rss_limit},
            ).validate()
            spec.vm_id = len(specs)
            specs.append(spec)
    names = [s.name for s in specs]
    for i, s in enumerate(specs):  # the same guest named twice on the command line: keep names unique
        if names.count(s.name) > 1:
            s.name = f"{s.name}#{i}"
    return specs


def policy_of(spec: VmSpec) -> RestartPolicy:
    """The restart policy a spec carries (the default one for a spec built elsewhere)."""
    data = spec.extra.get("policy")
    return RestartPolicy(**data) if isinstance(data, dict) else RestartPolicy()


# CLI glue --------------------------------------------------------------------------------------

# launch's per-VM parameters: with --fleet the file says these, so giving them too is a mistake.
_PER_VM_PARAMS = ("mem", "load_addr", "entry", "mode", "vcpus", "vms", "max_exits", "timeout", "serial_in",
                  "record_only", "restart", "backoff_initial", "backoff_max", "backoff_jitter", "startsecs",
                  "retries", "rss_limit")


def check_fleet_flags(ctx, guests: list[str] | None) -> None:
    """With --fleet: no GUESTS and no per-VM flags (they describe the one VM the file replaces)."""
    if guests:
        raise SpecError("give GUESTS or --fleet FILE, not both")
    for param in ctx.command.params:
        source = ctx.get_parameter_source(param.name)
        if param.name in _PER_VM_PARAMS and getattr(source, "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP"):
            flag = max(param.opts, key=len)
            raise SpecError(f"{flag} describes one VM; with --fleet set it in the fleet file ([defaults] or [[vm]])")


def fleet_specs(ctx, fleet: str | None, guests: list[str] | None, *, quiet: bool = False) -> list[VmSpec]:
    """`vmsup launch --fleet FILE`'s specs (or the error for neither GUESTS nor --fleet)."""
    if fleet is None:
        raise SpecError("no guest given: name one (e.g. vmsup launch seed16) or give --fleet FILE")
    check_fleet_flags(ctx, guests)
    return specs_from_entries(load_fleet(fleet), quiet=quiet)
