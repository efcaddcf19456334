"""Keep freed memory in the process while quantizing: large tensors come from the heap, not fresh pages.

Quantization runs many forwards of whole calibration batches; at real sizes (EfficientNet-Lite2 at
260x260, 64 views) every operation's output is hundreds of MB.  glibc serves blocks that large with
``mmap`` and gives them back with ``munmap`` when freed, so the next operation's output is new pages
the kernel has to fault in and zero: measured on the 2-core machine, a batch-64 forward of Lite2 took
7.0 s user + 8.5 s system CPU by default and 5.5 s + 0.3 s with the heap keeping its memory (the
system time of a Lite2 int8 quantize was ~100 of ~250 CPU seconds).

``keep_freed_memory()`` raises glibc's mmap and trim thresholds (``mallopt``) once per process, so
freed blocks are reused; the peak memory is unchanged, but the process keeps what it freed instead of
returning it to the system.  It does nothing off glibc, or when ``TVM_LOWBIT_KEEP_MEMORY=0``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
LIMIT = 2**31 - 1  # bytes: the largest value mallopt takes (an int)

_done: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (see the module docstring); True when it is set."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux") or os.environ.get("TVM_LOWBIT_KEEP_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    _done = bool(mallopt(M_MMAP_THRESHOLD, LIMIT)) and bool(mallopt(M_TRIM_THRESHOLD, LIMIT))
    return _done
