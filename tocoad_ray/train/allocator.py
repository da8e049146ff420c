"""glibc allocator settings for training processes.

Ray Train (V2) runs the training function in a thread of the worker actor. glibc gives non-main
threads their own malloc arenas, which hand freed memory back to the kernel eagerly, so every
step's large activation tensors are page-faulted in again: a stage-II step of the same model ran
about 40 % slower in a thread than in a main thread on the 2-core dev machine (2.8 s vs 2.0 s).
Keeping freed memory in the process (a high trim threshold, top padding, the largest mmap
threshold) removes that cost. The single-process loop gains too (its large tensors cross glibc's
mmap threshold and are mapped afresh every step): stage II ran 1.84× faster with it. It is set per
process: in the Ray Train workers, and by ``train_tocoad`` (``tocoad fit``).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory(trim_threshold: int = 1 << 30, top_pad: int = 256 << 20, mmap_threshold: int = 256 << 20) -> bool:
    """``mallopt`` so freed memory is reused instead of returned to the kernel. Linux/glibc only;
    returns whether it applied (a no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(k, v) == 1 for k, v in ((M_TRIM_THRESHOLD, trim_threshold), (M_TOP_PAD, top_pad),
                                               (M_MMAP_THRESHOLD, mmap_threshold)))
