"""Fleet files: many VMs in one TOML file; the `vmsup launch` flags are shorthand for one entry.

    [defaults]                 # optional: any VM key but `name`, applied to every [[vm]]
    mem = "32M"
    [[vm]]
    name = "counter"           # unique; defaults to the guest's name
    guest = "seed16"           # a bundled guest or a path, relative to the fleet file
    vms = 2                    # copies, named counter-0, counter-1 (once spelled `count`)
    restart = "on-failure"
    backoff = { initial = 0.5, max = 30.0, jitter = 0.2 }

The keys, their kinds and checks are the settings table's (vmworker.settings); the flags are its too.
Both front ends build `FleetEntry`s through one checker (`_resolve`), so a value means the same
and fails the same way whether it came from a flag or from a file; only the label differs
(`--mem` or `mem`). A fleet file is untrusted input: its size, the number of VMs and every value
are bounded, and each problem is one `FILE:LINE: message` line.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from vmworker.errors import GuestImageError, SpecError, VmsupError
from vmworker.settings import BY_NAME, FLAGGED, MAX_VMS, OLD_KEYS, SETTINGS, check_together
from vmworker.setting_values import Invalid
from vmworker.spec import VmSpec

from .fleet_lines import FleetLines, syntax_line
from .guests import bundled_guests, resolve_guest
from .policy import RestartPolicy

MAX_FLEET_BYTES = 1 << 20  # a fleet of a thousand VMs is a few hundred KiB of TOML
MAX_NAME = 64
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # names become file names (consoles): no '/', no leading '.'

VM_KEYS = tuple(s.name for s in SETTINGS)  # a [[vm]] table's keys: the settings' names


class FleetError(VmsupError):
    """A bad fleet file; str() is one line, `FILE:LINE: message`."""

    def __init__(self, path: str, line: int | None, message: str) -> None:
        self.path = path
        self.line = line
        self.message = message
        super().__init__(f"{path}:{line}: {message}" if line else f"{path}: {message}")


@dataclass
class FleetEntry:
    """One [[vm]] (or the launch flags for one guest): every setting's checked value, read by its
    name (entry.mem, entry.vms …), and the restart policy those values make."""

    values: dict[str, Any]
    policy: RestartPolicy
    line: int | None = None  # the [[vm]] header's line; None for an entry built from flags

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None


class _Invalid(Exception):
    """A bad value of `key`; each front end adds its own context (a line, or nothing)."""

    def __init__(self, key: str, message: str, sub: str | None = None) -> None:
        self.key = key
        self.sub = sub  # a key inside the value's table (backoff.max)
        super().__init__(message)


def _relative(path: str, base_dir: Path | None) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or base_dir is None else base_dir / p


def _guest(label: str, value: str, base_dir: Path | None):
    """A guest: a path (relative to the fleet file, if any) or a bundled name."""
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


def _policy(v: dict, label: Callable[[str], str]) -> RestartPolicy:
    """The restart policy the `policy` settings make (unset ones keep RestartPolicy's defaults)."""
    base = RestartPolicy()
    fields: dict[str, Any] = {}
    if v.get("restart") is not None:
        fields["mode"] = v["restart"]
    backoff = v.get("backoff") or {}
    for k, x in backoff.items():
        fields[f"backoff_{k}"] = x
    if "max" in backoff and "initial" not in backoff:  # a lower cap alone brings the first delay down with it
        fields["backoff_initial"] = min(base.backoff_initial, backoff["max"])
    for k in ("startsecs", "retries"):
        if v.get(k) is not None:
            fields[k] = v[k]
    try:
        return dataclasses.replace(base, **fields).validate()
    except ValueError as e:
        raise _Invalid("backoff" if backoff else "restart", str(e)) from None


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
    """Check one VM's raw values (from TOML or from flags) by the settings table and resolve what
    depends on the guest; raises _Invalid."""
    from vmworker.loader import load_image

    for key in values:
        if key not in BY_NAME:
            raise _Invalid(key, f"unknown key {key!r} (known: {', '.join(VM_KEYS)})")
    if values.get("guest") is None:
        raise _Invalid("guest", "no guest: every VM needs guest = \"NAME\" or a path")
    given = {k: x for k, x in values.items() if x is not None}
    v: dict[str, Any] = {}
    for setting in SETTINGS:
        if setting.name not in given:
            v[setting.name] = setting.default
            continue
        try:
            v[setting.name] = setting.kind.check(given[setting.name], label(setting.name), base_dir)
        except Invalid as e:
            raise _Invalid(setting.name, str(e), e.sub) from None
    found = _guest(label("guest"), v["guest"], base_dir)
    v["guest"] = found.path
    if "name" not in given:
        v["name"] = found.name
    name = v["name"]
    if len(name) > MAX_NAME or not _NAME.match(name):
        why = (f"{label('name')} {name!r}" if "name" in given else f"the guest's name {name!r} (set name = \"...\")")
        raise _Invalid("name", f"{why} is not a usable VM name: letters, digits, '_', '.', '-', "
                               f"at most {MAX_NAME}, not starting with '.' or '-'")
    if "vcpus" not in given:
        v["vcpus"] = found.vcpus  # a bundled guest says how many vCPUs it is built for
    if "mode" not in given:
        v["mode"] = found.mode
    try:
        check_together(v.get, label)
    except Invalid as e:
        raise _Invalid(e.key or "guest", str(e)) from None
    policy = _policy(v, label)
    try:
        # The image is checked here, so bad input fails before any process or VM exists.
        image = load_image(found.path, load_addr=v["load_addr"], entry=v["entry"], mode=v["mode"],
                           boot_entry=v["boot_entry"])
        image.check_fits(v["mem"])
    except GuestImageError as e:
        raise _Invalid(_image_key(e.reason, given), str(e)) from None
    if v["cmdline"] and not image.is_kernel:
        raise _Invalid("cmdline", f"{found.path}: {label('cmdline')} applies to multiboot kernels and bzImages; "
                                  f"this is a {image.describe()}")
    if v["initrd"] and image.linux is None:
        raise _Invalid("initrd", f"{found.path}: {label('initrd')} applies to bzImage kernels; "
                                 f"this is a {image.describe()}")
    if image.linux is not None:
        from vmworker.bzimage import plan_boot

        try:  # the command line's room and the initrd's place, before any VM
            plan_boot(image, v["mem"], v["cmdline"], os.path.getsize(v["initrd"]) if v["initrd"] else 0, v["vcpus"])
        except (GuestImageError, SpecError) as e:
            message = str(e)
            key = "cmdline" if "--cmdline" in message else "mem" if "--mem" in message else "initrd"
            raise _Invalid(key, message.replace("--cmdline", label("cmdline")).replace("--mem", label("mem"))) from None
    from vmworker.machine import check_vm_shape

    try:
        check_vm_shape(image, v["mem"], v["vcpus"], _host_max_vcpus())
    except SpecError as e:
        message = str(e).replace("--vcpus", label("vcpus"), 1)  # the machine's messages name the flag
        raise _Invalid("vcpus" if "vcpus" in given else "mem" if "mem" in given else "guest", message) from None
    return FleetEntry(values=v, policy=policy, line=line)


# The flags' entry ------------------------------------------------------------------------------

def _flag_label(name: str) -> str:
    """A setting as the command line spells it: its flag (GUESTS for the guest)."""
    setting = BY_NAME[name]
    return "GUESTS" if name == "guest" else setting.flag_name or name


def cli_entry(guest: str, **flags: Any) -> FleetEntry:
    """The entry `vmsup launch GUEST --flags…` means: `flags` by their parameter name (vms,
    backoff_max …; None = not given), as the flags' text or as values; bad values raise
    SpecError naming the flag."""
    by_param = {s.param: s for s in FLAGGED}
    values: dict[str, Any] = {"guest": guest}
    try:
        for param, value in flags.items():
            setting = by_param[param]
            if value is not None:
                values[setting.name] = setting.kind.from_flag(value, _flag_label(setting.name))
        return _resolve(values, _flag_label, None, None)
    except Invalid as e:
        raise SpecError(str(e)) from None
    except _Invalid as e:
        raise SpecError(str(e)) from None


# Fleet files -----------------------------------------------------------------------------------

def _renamed(table: dict, spelled: dict[str, str]) -> dict:
    """`table` with deprecated keys under their settings' names; `spelled` gets new → old."""
    out = {}
    for key, value in table.items():
        new = OLD_KEYS.get(key)
        if new is not None:
            if new in table:
                raise _Invalid(new, f"{key!r} is the old name of {new!r}: give {new} only")
            spelled[new] = key
        out[new or key] = value
    return out


def load_fleet(path: str, notes: list[str] | None = None) -> list[FleetEntry]:
    """Read and check a fleet file; every problem is a FleetError (`FILE:LINE: message`).
    A deprecated key still works and adds one line to `notes` (`FILE:LINE: …`)."""
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
    lines = FleetLines(text)
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        line, message = syntax_line(str(e), lines)
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
        if key not in VM_KEYS and key not in OLD_KEYS:
            raise FleetError(path, lines.key(defaults_line, "defaults", key) or defaults_line,
                             f"unknown key {key!r} in [defaults] (known: {', '.join(VM_KEYS)})")
    vms = doc.get("vm")
    if vms is None:
        raise FleetError(path, 1, "no VMs: add a [[vm]] table with guest = \"NAME\" for each")
    if not isinstance(vms, list) or not all(isinstance(v, dict) for v in vms):
        raise FleetError(path, lines.top_level("vm") or 1, "vm must be an array of tables: write [[vm]], not [vm]")

    defaults_spelled: dict[str, str] = {}
    try:
        defaults = _renamed(defaults, defaults_spelled)
    except _Invalid as e:
        raise FleetError(path, lines.key(defaults_line, "defaults", e.key) or defaults_line, str(e)) from None
    deprecated: list[tuple[str, int | None]] = [(old, lines.key(defaults_line, "defaults", old) or defaults_line)
                                                for old in defaults_spelled.values()]
    entries: list[FleetEntry] = []
    seen: dict[str, int] = {}  # VM name (after vms expansion) -> header line of its entry
    total = 0
    for index, table in enumerate(vms):
        header = lines.vm_header(index)

        spelled: dict[str, str] = {}  # setting name → the deprecated key this table wrote it as

        def line_of(key: str, sub: str | None = None) -> int | None:
            if key in table:
                return lines.key(header, "vm", spelled.get(key, key), sub) or header
            if key in defaults:
                return lines.key(defaults_line, "defaults", defaults_spelled.get(key, key), sub) or defaults_line
            return header

        def label(key: str) -> str:  # a message names the key as the file spells it
            return spelled.get(key) or (defaults_spelled.get(key) if key not in table else None) or key

        try:
            table = _renamed(table, spelled)
            entry = _resolve({**defaults, **table}, label, base_dir, header)
        except _Invalid as e:
            raise FleetError(path, line_of(e.key, e.sub), str(e)) from None
        deprecated += [(old, line_of(new)) for new, old in spelled.items()]
        total += entry.vms
        if total > MAX_VMS:
            raise FleetError(path, line_of("vms"), f"more than {MAX_VMS} VMs in one fleet")
        for name in _names(entry):
            if name in seen:
                where = line_of("name") if "name" in table else header
                raise FleetError(path, where, f"duplicate VM name {name!r} (first used by the [[vm]] at line "
                                              f"{seen[name]}); give each [[vm]] its own name")
            seen[name] = header
        entries.append(entry)
    for old, line in deprecated:
        new = OLD_KEYS[old]
        if notes is not None:
            notes.append(f"{path}:{line}: fleet key {old!r} is deprecated: write {new} (as the flag --{new.replace('_', '-')})")
    return entries


def _names(entry: FleetEntry) -> list[str]:
    return [f"{entry.name}-{i}" for i in range(entry.vms)] if entry.vms > 1 else [entry.name]


# Specs -----------------------------------------------------------------------------------------

def specs_from_entries(entries: list[FleetEntry], *, quiet: bool = False, notes: list[str] | None = None,
                       stdin_terminal: bool = False) -> list[VmSpec]:
    """One VmSpec per VM, vm_id 0.. in order. What only the supervisor reads travels in `spec.extra`:
    "policy" (RestartPolicy as a dict) and each setting whose home is "supervisor" (rss_limit: bytes or None).

    Several VMs cannot share stdin: the first VM with serial input `-` reads it, the others get
    none, and a note in `notes` says so. On a terminal none reads it: with several VMs the live
    table holds the terminal, and a VM's worker (its own process group) would be stopped by
    SIGTTIN on its first read."""
    total = sum(e.vms for e in entries)
    several = total > 1
    stdin_reader: str | None = None
    stdin_denied: list[str] = []
    specs: list[VmSpec] = []
    for e in entries:
        for name in _names(e):
            spec = VmSpec(**{s.name: e.values[s.name] for s in SETTINGS if s.home == "spec"},
                          # Several VMs share one terminal: no per-exit lines, and no shared stdin.
                          quiet=quiet or several,
                          extra={"policy": dataclasses.asdict(e.policy),
                                 **{s.name: e.values[s.name] for s in SETTINGS if s.home == "supervisor"}})
            spec.name = name
            if e.serial_in == "none":
                spec.serial_in = None
            elif several and e.serial_in == "-":
                if stdin_reader is None and not stdin_terminal:
                    stdin_reader = spec
                else:
                    spec.serial_in = None
                    stdin_denied.append(spec)
            spec.vm_id = len(specs)
            specs.append(spec)
    names = [s.name for s in specs]
    for i, s in enumerate(specs):  # the same guest named twice on the command line: keep names unique
        if names.count(s.name) > 1:
            s.name = f"{s.name}#{i}"
    if notes is not None and stdin_denied:
        others = ", ".join(s.name for s in stdin_denied)
        get = "gets" if len(stdin_denied) == 1 else "get"
        if stdin_reader is not None:
            notes.append(f"stdin goes to {stdin_reader.name} only; {others} {get} no serial input "
                         "(--serial-in FILE gives a VM its own)")
        else:
            notes.append(f"stdin is a terminal: with several VMs no VM reads it ({others} {get} no serial input; "
                         "--serial-in FILE gives a VM its own)")
    return specs


def policy_of(spec: VmSpec) -> RestartPolicy:
    """The restart policy a spec carries (the default one for a spec built elsewhere)."""
    data = spec.extra.get("policy")
    return RestartPolicy(**data) if isinstance(data, dict) else RestartPolicy()


# CLI glue --------------------------------------------------------------------------------------

def check_fleet_flags(guests: list[str] | None, flags: dict[str, Any]) -> None:
    """With --fleet: no GUESTS and no per-VM flag (every flag of the settings table describes the
    one VM the file replaces). `flags`: launch's per-VM flag values by parameter, None = not given."""
    if guests:
        raise SpecError("give GUESTS or --fleet FILE, not both")
    for setting in FLAGGED:
        if flags.get(setting.param) is not None:
            raise SpecError(f"{setting.flag_name} describes one VM; with --fleet set it in the fleet file "
                            f"([defaults] or [[vm]], as {setting.name})")


def fleet_specs(fleet: str | None, guests: list[str] | None, flags: dict[str, Any], *, quiet: bool = False,
                notes: list[str] | None = None, stdin_terminal: bool = False) -> list[VmSpec]:
    """`vmsup launch --fleet FILE`'s specs (or the error for neither GUESTS nor --fleet)."""
    if fleet is None:
        raise SpecError("no guest given: name one (e.g. vmsup launch seed16) or give --fleet FILE")
    check_fleet_flags(guests, flags)
    return specs_from_entries(load_fleet(fleet, notes), quiet=quiet, notes=notes, stdin_terminal=stdin_terminal)
