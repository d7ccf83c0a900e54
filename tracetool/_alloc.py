"""Let freed memory be reused instead of handed back to the kernel, for the `vmtrace` process.

Under PVM a first-touched page costs ~11 µs (a fault the nested hypervisor handles; 160 MB of
fresh memory takes ~0.45 s), while reusing memory is free. glibc's defaults work against
block-by-block decoding: a numpy array of 128 KiB or more is mmapped and unmapped again on
free, and a heap with more than 128 KiB free at its top is trimmed — so every decoded block
touches fresh pages. Measured decoding a 10M-event trace here: 780k page faults and 1.43 s
with the defaults, 6k faults and 0.51 s with the settings below.

M_MMAP_THRESHOLD and M_TRIM_THRESHOLD are mallopt(3) parameters (glibc malloc.h: -3 and -1).
32 MiB is the largest mmap threshold glibc accepts on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX).
"""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 512 << 20


def keep_freed_memory() -> bool:
    """Tune the C allocator of this process; False where there is no glibc mallopt."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
