"""Where `vmsup launch` records: checking the trace path before any VM starts, and keeping the
file a new recording would replace.

An existing trace is never lost: like `cp --backup=numbered`, it is renamed PATH.1, PATH.2, …
(the highest number is the most recent). vmtrace reads a trace by its content, never its name,
so a backup reads like any trace.
"""

from __future__ import annotations

import os
import re

from vmworker.errors import VmsupError


class TracePathError(VmsupError):
    pass


def check_trace_path(path: str, inputs=(), create_dir: bool = False) -> None:
    """Refuse an unwritable trace path, or one that is an input of the run (a guest image, a
    fleet, serial-input or key file: recording would move it aside), before any VM starts.

    A missing directory is created only for the default trace directory (`create_dir`); a
    --trace into a directory that does not exist is refused, since a typo would otherwise
    silently grow a new tree."""
    from tracetool._output import OutputError, refuse_overwriting_inputs
    try:
        refuse_overwriting_inputs(path, [p for p in inputs if p and p != "-"])
    except OutputError as e:
        raise TracePathError(f"trace path {e}") from None
    parent = os.path.dirname(os.path.abspath(path)) or "."
    if os.path.isdir(path):
        raise TracePathError(f"trace path {path} is a directory")
    if not os.path.isdir(parent):
        if not create_dir:
            shown = os.path.dirname(path) or "."
            raise TracePathError(f"trace directory {shown} does not exist (create it first, or pick another --trace)")
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            raise TracePathError(f"cannot create trace directory {parent}: {e.strerror or e}") from None
    if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        raise TracePathError(f"trace path {path} is not writable")


def numbered_backups(path: str) -> list[str]:
    """The backups of `path` there are, PATH.1, PATH.2, …, oldest first."""
    directory = os.path.dirname(path) or "."
    base = os.path.basename(path)
    pattern = re.compile(re.escape(base) + r"\.([1-9][0-9]*)")
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    numbered = sorted((int(m.group(1)), name) for name in names if (m := pattern.fullmatch(name)))
    return [os.path.join(directory, name) for _, name in numbered]


def keep_previous(path: str) -> str | None:
    """Rename an existing file at `path` to the next free PATH.N; the backup's name, or None when
    there was nothing to keep."""
    if not os.path.lexists(path):
        return None
    backups = numbered_backups(path)
    n = int(backups[-1].rsplit(".", 1)[1]) + 1 if backups else 1
    while True:
        backup = f"{path}.{n}"
        try:
            os.link(path, backup)  # fails rather than replacing a backup made meanwhile
        except FileExistsError:
            n += 1
            continue
        os.unlink(path)
        return backup
