"""The host's own x87 as an oracle: numpy.longdouble is the 80-bit x87 format on x86-64, and its
arithmetic runs x87 instructions in this thread, rounded as the x87 control word says. glibc's
fesetenv loads the whole control word, precision control included (fesetround would set RC only).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import platform

import numpy as np

HOST_HAS_X87 = platform.machine() == "x86_64" and np.finfo(np.longdouble).nmant == 63
_libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")


@contextlib.contextmanager
def host_control_word(cw: int):
    """Run the body with the host x87 control word `cw` (all exceptions must stay masked)."""
    saved = (ctypes.c_uint16 * 16)()
    if _libm.fegetenv(saved) != 0:
        raise OSError("fegetenv failed")
    env = (ctypes.c_uint16 * 16).from_buffer_copy(saved)
    env[0] = cw  # fenv_t.__control_word (bits/fenv.h, x86)
    if _libm.fesetenv(env) != 0:
        raise OSError("fesetenv failed")
    try:
        yield
    finally:
        _libm.fesetenv(saved)


def extended_bytes(x: np.longdouble) -> bytes:
    """The 10 bytes of an 80-bit value (numpy stores it in 16 with padding)."""
    return np.longdouble(x).tobytes()[:10]
