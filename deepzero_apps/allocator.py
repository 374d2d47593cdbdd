"""glibc allocator thresholds applied at the start of every run.

ZO queries allocate and free multi-MB activations thousands of times per step. With glibc's default
(dynamic) mmap threshold, each one is a fresh mmap whose pages fault in on first touch and are
returned by munmap/trim when freed. Raising the mmap and trim thresholds to 1 GiB keeps freed memory
in the heap for the next query: measured here on a 64x16x32x32 conv block, 200 forwards took 68,668
minor page faults without the setting and 2,078 with it (tests/test_allocator.py: 20 forwards), the same with `mallopt` at start-up as with
MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ in the environment before the process starts, so
`mallopt` is used (no re-exec). The cost is memory: freed blocks stay mapped (the process's peak
resident size stays resident).

Opt out with DEEPZERO_MALLOC_TUNING=0. No effect outside glibc (macOS, Windows, musl).
"""

from __future__ import annotations

import ctypes
import os
import sys

OPT_OUT = "DEEPZERO_MALLOC_TUNING"
THRESHOLD = 1 << 30  # bytes
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


def tune_malloc(threshold: int = THRESHOLD) -> bool:
    """Set glibc's mmap and trim thresholds to `threshold` bytes; False where not applied (opted
    out with DEEPZERO_MALLOC_TUNING=0, not Linux, no glibc)."""
    if os.environ.get(OPT_OUT, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs
        return False
    return bool(mallopt(_M_TRIM_THRESHOLD, threshold) and mallopt(_M_MMAP_THRESHOLD, threshold))
