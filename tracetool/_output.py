"""Where a command writes its output file: whole or not at all.

A regular file (or a new one) is written to a temporary file beside it and renamed over it at
the end, so a failed export leaves nothing half-written; a symlink's target is what gets
replaced, never the link. Anything else that exists — a FIFO, a terminal, /dev/stdout — is
written in place (renaming over it would replace the device node). "-" is standard output.

An output that is one of the command's input files (the same inode: the path itself, a symlink
to it or a hard link) is refused before anything is written: `export t.vmtrace -o t.vmtrace`
would otherwise replace the trace it reads.
"""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager
from typing import Iterator


class OutputError(Exception):
    """The output cannot be written; the message is one line."""


def refuse_overwriting_inputs(path: str, inputs) -> None:
    """OutputError when the output `path` is the same file as one of `inputs`."""
    try:
        out = os.stat("/dev/stdout" if path == "-" else path)
    except OSError:
        return  # a new file (or one output_path will report)
    if not stat.S_ISREG(out.st_mode):
        return  # a terminal or pipe is never one of the input traces
    for source in inputs:
        try:
            st = os.stat(source)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (out.st_dev, out.st_ino):
            shown = "standard output" if path == "-" else path
            raise OutputError(f"{shown} is the same file as the input {source}: refusing to overwrite it")


@contextmanager
def output_path(path: str, inputs=()) -> Iterator[str]:
    """Yields the path to write to; on success the output ends up at `path`. `inputs`: the
    files the output is made from, which it must not replace."""
    refuse_overwriting_inputs(path, inputs)
    if path == "-":
        path = "/dev/stdout"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise OutputError(f"{path}: cannot write: {e.strerror or e}") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        if stat.S_ISDIR(st.st_mode):
            raise OutputError(f"{path}: is a directory")
        try:
            yield path
        except BrokenPipeError:
            raise  # the reader of a pipe left: click ends the command quietly
        except OSError as e:
            raise OutputError(f"{path}: cannot write: {e.strerror or e}") from None
        return
    target = os.path.realpath(path)
    tmp = os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.part-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, target)
    except OSError as e:
        raise OutputError(f"{path}: cannot write: {e.strerror or e}") from None
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
