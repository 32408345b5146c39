"""Process settings for training and inference on CPU: glibc's allocator.

PyTorch's CPU tensors come from ``malloc``. glibc serves a block above its
mmap threshold (128 KiB at start, raised as blocks are freed, at most
32 MiB) with a fresh ``mmap`` and returns it to the system on ``free``; it
also trims the top of its heap whenever more than a threshold is free. A
training step allocates and frees the same activations every batch, so with
the defaults the kernel hands out, page-faults in and zeroes the same memory
again and again. Profiling one ``fit_batch`` of the ``hparams/distill.yaml``
student on 2 CPU threads (batch of 8 utterances): 16,500-27,000 minor page
faults per step and 0.110-0.125 s; after :func:`keep_freed_memory`, 0-1
faults and 0.089-0.091 s. ``torch.stft`` on 8 x 4 s of audio took 6.3 ms
with 2,986 faults per call and 1.1 ms without.

:func:`keep_freed_memory` raises both thresholds (``mallopt``) so freed
blocks stay in the process for the next batch: the process keeps its peak
CPU memory instead of giving it back between batches (what jemalloc and
tcmalloc, which PyTorch's CPU tuning guide recommends, do as well). It is
called where our code starts CPU work (the training Brains, ``evaluate``,
``speech-kd bench``); ``SPEECH_KD_KEEP_FREED_MEMORY=0`` turns it off. Other
C libraries (musl, macOS, Windows) are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

__all__ = ["MMAP_THRESHOLD_BYTES", "TRIM_THRESHOLD_BYTES", "keep_freed_memory"]

logger = logging.getLogger(__name__)

#: glibc's upper limit for ``M_MMAP_THRESHOLD`` on 64-bit systems: blocks up to this size come from the heap
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
#: free memory the heap may hold before glibc gives it back to the system
TRIM_THRESHOLD_BYTES = 1024 * 1024 * 1024
_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of unmapping it (see module docstring).

    Idempotent; returns whether the setting is in force (``False`` off glibc,
    or with ``SPEECH_KD_KEEP_FREED_MEMORY=0``).
    """
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("SPEECH_KD_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return _applied
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        gnu_get_libc_version = libc.gnu_get_libc_version  # present only in glibc
    except (OSError, AttributeError):
        return _applied
    del gnu_get_libc_version
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES) == 1 and ok
    if not ok:
        logger.warning("glibc refused mallopt thresholds; CPU steps may page-fault their activations in every batch")
    _applied = ok
    return _applied
