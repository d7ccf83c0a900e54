"""Bundled guests: `vmsup launch seed16` finds guest/seed16.bin and its defaults in guest/guests.toml."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from vmworker.errors import GuestImageError


def guest_dir() -> Path:
    """The bundled guest directory: $VMSUP_GUEST_DIR, else guest/ beside the packages (a checkout)."""
    override = os.environ.get("VMSUP_GUEST_DIR")
    return Path(override) if override else Path(__file__).resolve().parent.parent / "guest"


@dataclass(frozen=True)
class GuestDefaults:
    name: str
    path: str
    mode: str | None
    vcpus: int


def bundled_guests() -> dict[str, GuestDefaults]:
    manifest = guest_dir() / "guests.toml"
    try:
        with open(manifest, "rb") as f:
            table = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise GuestImageError(str(manifest), f"unreadable guest manifest: {e}") from None
    guests = {}
    for name, entry in table.items():
        if isinstance(entry, dict) and "file" in entry:
            mode = entry.get("mode") if entry.get("format", "flat") == "flat" else None
            guests[name] = GuestDefaults(name, str(guest_dir() / entry["file"]), mode, int(entry.get("vcpus", 1)))
    return guests


def resolve_guest(arg: str) -> GuestDefaults:
    """A path (used as is, with manifest defaults if it is a bundled file) or a bundled name."""
    guests = bundled_guests()
    if os.path.exists(arg):
        real = os.path.realpath(arg)
        for g in guests.values():
            if os.path.realpath(g.path) == real:
                return GuestDefaults(g.name, arg, g.mode, g.vcpus)
        return GuestDefaults(Path(arg).stem, arg, None, 1)
    if arg in guests:
        return guests[arg]
    if os.sep in arg or "." in arg:
        raise GuestImageError(arg, "no such file")
    known = ", ".join(sorted(guests)) or "none found"
    raise GuestImageError(arg, f"no such file or bundled guest (bundled: {known})")
