"""glibc allocator settings shared by the CPU benchmarks (repeatable peak-memory and timing:
without them heap trimming and mmap thresholds make page-fault costs vary run to run)."""

from __future__ import annotations

import ctypes

M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
M_MMAP_THRESHOLD = -3


def mallopt(param: int, value: int) -> None:
    try:
        ctypes.CDLL("libc.so.6").mallopt(param, value)
    except OSError:  # not glibc: measure with the platform allocator as it is
        pass
