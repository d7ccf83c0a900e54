"""What a VM is to run: the spec the supervisor hands a worker (as JSON).

Its fields are the per-VM settings whose home is the worker (the table in vmworker.settings),
plus `RunWiring`: what the supervisor sets for each VM of a run, never a user per VM.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field, make_dataclass

from .errors import SpecError
from .settings import BY_NAME, REQUIRED, SETTINGS, check_together
from .setting_values import Invalid, parse_address, parse_size  # noqa: F401  (their home before the table)


@dataclass(kw_only=True)
class RunWiring:
    """The spec's fields that are not settings: set by the supervisor when it starts a worker."""

    quiet: bool = False  # no line per exit (--quiet, or several VMs sharing a terminal)
    # Recording: where to PUSH event batches (None = not recorded), this VM's id in the run, and
    # its epoch (restart count).
    bus_endpoint: str | None = None
    vm_id: int = 0
    epoch: int = 0
    # The VGA text screen: publish snapshots even while blank (`--screen`); where the worker binds
    # its key input socket (a PULL in the private run dir; None = no typing).
    screen: bool = False
    input_endpoint: str | None = None
    # `vmsup gdb VM`: the run-dir path (without suffix) of its request and reply files
    # (vmworker/gdb/on_request.py); None = no stub on request.
    gdb_request: str | None = None
    # Where the worker binds its control socket (vmworker/control.py: vmsup snapshot), a REP in
    # the private run dir; None = no control commands.
    control_endpoint: str | None = None
    # What only the supervisor reads: "policy" (RestartPolicy as a dict), "rss_limit" (bytes or None).
    extra: dict = field(default_factory=dict)

    def validate(self):
        """Check every setting again by its table row (the worker trusts no JSON); SpecError names the flag."""
        for setting in SETTINGS:
            value = getattr(self, setting.name, None)
            if setting.home != "spec" or value is None or value == setting.default:
                continue
            try:
                setting.kind.check(value, _label(setting.name), None)
            except Invalid as e:
                raise SpecError(str(e)) from None
        try:
            check_together(lambda name: getattr(self, name), _label)
        except Invalid as e:
            raise SpecError(str(e)) from None
        return self

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "VmSpec":
        known = set(cls.__dataclass_fields__)
        data = {_OLD_FIELDS.get(k, k): v for k, v in data.items()}
        return cls(**{k: v for k, v in data.items() if k in known})


# Fields renamed when the settings got one name each (flag --x-y, key x_y, field x_y): a spec
# written before (a trace's run header, a test's JSON) still reads.
_OLD_FIELDS = {"mem_size": "mem", "serial_input": "serial_in", "record_filter": "record_only"}


def _label(name: str) -> str:
    return BY_NAME[name].flag_name or name


VmSpec = make_dataclass(
    "VmSpec",
    [(s.name, s.type, field(default=MISSING if s.default is REQUIRED else s.default))
     for s in SETTINGS if s.home == "spec"],
    bases=(RunWiring,), kw_only=True, namespace={"__module__": __name__})
VmSpec.__doc__ = """One VM: its settings (vmworker.settings, home "spec") and the run's wiring (RunWiring)."""
