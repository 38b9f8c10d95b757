"""Transparent huge pages for glibc's large allocations, set by re-executing the entry point once.

XLA:CPU allocates a step's temporaries afresh at every call (about 2 GB for the M2D ViT-B step at
80x608, batch 8), and glibc serves allocations over 32 MiB with a fresh mmap, so each step first-touches
new 4 KiB pages: ~505k minor page faults and ~1 CPU-second of kernel time per step on a 2-core machine.
glibc >= 2.35 can advise the kernel to back those mappings with 2 MiB transparent huge pages
(`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`): ~1.2k faults per step (BENCHMARKS.md, issue 9). glibc reads
its tunables only when a process starts, so the entry points call `reexec_with_hugepage_malloc()` before
anything else and the process replaces itself (same PID, arguments and environment plus the tunable).

Nothing happens when the tunable is already set (a user's `glibc.malloc.hugetlb=0` wins), off Linux,
without glibc >= 2.35, when the kernel's THP mode is `never`, or with `AUDIOJEPA_HUGEPAGE_MALLOC=0`.
The cost to watch: with THP defrag `madvise` (the usual default) a fault in an advised region may compact
memory first, so a host short of free 2 MiB blocks can stall (`compact_stall` rising in /proc/vmstat);
`AUDIOJEPA_HUGEPAGE_MALLOC=0` goes back to 4 KiB pages. Not every program gains: the PyTorch step of
tools/bench_torch_m2d.py was slower with it (BENCHMARKS.md), so that tool does not re-execute.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
OPT_OUT = "AUDIOJEPA_HUGEPAGE_MALLOC"  # "0": keep glibc's default 4 KiB pages
THP_ENABLED_PATH = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)  # first glibc with the glibc.malloc.hugetlb tunable


def thp_mode(path: str = THP_ENABLED_PATH) -> str | None:
    """The kernel's transparent-huge-page mode ("always", "madvise" or "never"), None if unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else None


def _glibc_version(libc: tuple[str, str]) -> tuple[int, ...] | None:
    name, version = libc
    if name != "glibc":
        return None
    try:
        return tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return None


def with_hugepage_tunable(tunables: str) -> str:
    """`tunables` (GLIBC_TUNABLES, colon-separated name=value) with glibc.malloc.hugetlb=1 added; as
    given when it already sets glibc.malloc.hugetlb."""
    entries = [entry for entry in tunables.split(":") if entry]
    if any(entry.split("=", 1)[0] == TUNABLE for entry in entries):
        return tunables
    return ":".join([*entries, f"{TUNABLE}=1"])


_THIS_MACHINE = object()


def hugepage_env(environ, *, system: str | None = None, libc: tuple[str, str] | None = None,
                 thp=_THIS_MACHINE) -> dict[str, str] | None:
    """The environment to re-execute with, or None when there is nothing to change (see the module
    docstring). `system`, `libc` and `thp` (a THP mode, None: no THP) default to this machine's
    (platform.system(), platform.libc_ver(), thp_mode())."""
    system = platform.system() if system is None else system
    libc = platform.libc_ver() if libc is None else libc
    thp = thp_mode() if thp is _THIS_MACHINE else thp
    if environ.get(OPT_OUT, "1") == "0" or system != "Linux" or thp in (None, "never"):
        return None
    version = _glibc_version(libc)
    if version is None or version < MIN_GLIBC:
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    updated = with_hugepage_tunable(tunables)
    if updated == tunables:
        return None
    return {**environ, "GLIBC_TUNABLES": updated}


def hugepage_malloc_active(environ=os.environ) -> bool:
    """Whether this process started with glibc.malloc.hugetlb set to a non-zero value."""
    for entry in environ.get("GLIBC_TUNABLES", "").split(":"):
        name, _, value = entry.partition("=")
        if name == TUNABLE:
            return value not in ("", "0")
    return False


def describe(environ=os.environ) -> str:
    """One line for logs and benchmark reports."""
    if hugepage_malloc_active(environ):
        return f"glibc malloc with transparent huge pages (THP mode {thp_mode()})"
    return "default malloc (4 KiB pages)"


def reexec_with_hugepage_malloc() -> None:
    """Replaces this process with the same command plus GLIBC_TUNABLES=...glibc.malloc.hugetlb=1, when
    `hugepage_env` says so; returns otherwise (also when exec fails: the run goes on with 4 KiB pages).
    Call it first in an entry point's `__main__` block, before heavy imports (they would run twice)."""
    env = hugepage_env(os.environ)
    if env is None or not sys.executable or not getattr(sys, "orig_argv", None):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError as e:
        print(f"audiojepa.runtime.host_memory: re-executing with GLIBC_TUNABLES failed ({e}); going on with the "
              f"default malloc", file=sys.stderr)
