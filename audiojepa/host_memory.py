"""Reuse freed host memory, so XLA:CPU does not page-fault its temporaries in on every step.

XLA's CPU runtime allocates an executable's temporaries with `posix_memalign` on every call and frees
them after: 3.3 GB for the ViT-B M2D step at batch 8. glibc serves a request that large with fresh
`mmap`'d pages (from a thread's own arena it always does, whatever `M_MMAP_MAX` says), so every step
faults the whole buffer in again, page by page: ~800k minor faults, 0.4-1 s of a ~7 s step on 2 cores
(BENCHMARKS.md). With one arena, no `mmap` and no trimming, the step reuses the same pages: 0 faults.

The cost is that the process keeps its peak host memory until it exits, which is what a training or
evaluation process does anyway. `retain_freed_memory` must run before the XLA backend starts its
threads (a thread keeps the arena it first allocated from): the entry points call it first thing.
Set AUDIOJEPA_RETAIN_FREED_MEMORY=0 to leave the C allocator alone.
"""

import ctypes
import ctypes.util
import os

from absl import logging

ENV_VAR = "AUDIOJEPA_RETAIN_FREED_MEMORY"

# mallopt parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# glibc reads the trim threshold as a size_t, so -1 is SIZE_MAX: freed memory never goes back to the
# OS. (The largest positive int, 2 GiB, would hand back the 3.3 GB buffer after every step.)
_NEVER_TRIM = -1


def retain_freed_memory() -> bool:
    """Makes glibc keep and reuse freed memory (one arena, no mmap, no trim). True when applied.

    A no-op, returning False, when AUDIOJEPA_RETAIN_FREED_MEMORY=0 or the C library is not glibc
    (macOS, musl): the process then runs as before, only slower on CPU.
    """
    if os.environ.get(ENV_VAR, "1").strip() == "0":
        logging.info("%s=0: host allocator left as it is", ENV_VAR)
        return False
    libc = _glibc()
    if libc is None:
        logging.info("not glibc: host allocator left as it is (XLA:CPU may page-fault its buffers each step)")
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    applied = (mallopt(_M_ARENA_MAX, 1) == 1 and mallopt(_M_MMAP_MAX, 0) == 1
               and mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) == 1)
    if not applied:
        logging.warning("mallopt refused a setting: host allocator partly unchanged")
    return applied


def _glibc():
    """The process's C library when it is glibc, else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        version = libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return None
    version.restype = ctypes.c_char_p
    return libc if version() else None
