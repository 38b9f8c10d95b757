"""audiojepa.runtime.host_memory: when the entry points re-execute with glibc's huge-page tunable, and that the
re-executed process really faults its large allocations in 2 MiB pages."""

import os
import subprocess
import sys

import pytest

from audiojepa.runtime import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINUX = {"system": "Linux", "libc": ("glibc", "2.36"), "thp": "madvise"}


def test_the_tunable_is_added_to_the_users_tunables_and_never_overrides_them():
    assert host_memory.with_hugepage_tunable("") == "glibc.malloc.hugetlb=1"
    assert (host_memory.with_hugepage_tunable("glibc.malloc.arena_max=2")
            == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1")
    for given in ("glibc.malloc.hugetlb=0", "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2"):
        assert host_memory.with_hugepage_tunable(given) == given


def test_reexecutes_only_where_glibc_and_the_kernel_can_use_huge_pages():
    env = host_memory.hugepage_env({"PATH": "/bin"}, **LINUX)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    assert host_memory.hugepage_env({}, **{**LINUX, "thp": "always"}) is not None
    nothing_to_do = [
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, LINUX),  # already re-executed: no loop
        ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, LINUX),  # the user's choice
        ({host_memory.OPT_OUT: "0"}, LINUX),
        ({}, {**LINUX, "system": "Darwin"}),
        ({}, {**LINUX, "libc": ("glibc", "2.31")}),  # no such tunable before 2.35
        ({}, {**LINUX, "libc": ("", "")}),  # musl and other libcs
        ({}, {**LINUX, "thp": "never"}),
        ({}, {**LINUX, "thp": None}),  # no THP in this kernel
    ]
    for environ, machine in nothing_to_do:
        assert host_memory.hugepage_env(environ, **machine) is None, (environ, machine)


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert host_memory.thp_mode(str(path)) == "madvise"
    assert host_memory.thp_mode(str(tmp_path / "missing")) is None


def test_active_and_describe_follow_the_environment():
    assert host_memory.hugepage_malloc_active({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"})
    assert not host_memory.hugepage_malloc_active({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert not host_memory.hugepage_malloc_active({})
    assert host_memory.describe({}) == "default malloc (4 KiB pages)"
    assert "transparent huge pages" in host_memory.describe({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})


# Runs in a fresh interpreter: prints its PID and GLIBC_TUNABLES before and after the re-exec call, then
# the minor page faults of first-touching a 256 MiB malloc (65,536 with 4 KiB pages, ~128 with 2 MiB).
PROBE = """
import ctypes, os, resource
from audiojepa.runtime import host_memory
print("before", os.getpid(), flush=True)
host_memory.reexec_with_hugepage_malloc()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 256 << 20
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(libc.malloc(size), 1, size)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print("after", os.getpid(), os.environ.get("GLIBC_TUNABLES"), faults)
"""


def _probe(**env) -> tuple[list[str], list[str]]:
    environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.OPT_OUT)}
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, env={**environ, "PYTHONPATH": REPO, **env},
                         capture_output=True, text=True, check=True).stdout.splitlines()
    return [line.split() for line in out if line.startswith("before")], [line.split() for line in out
                                                                         if line.startswith("after")]


@pytest.mark.skipif(host_memory.hugepage_env({}) is None, reason="this machine has no glibc >= 2.35 with THP")
def test_the_reexecuted_process_faults_large_allocations_in_huge_pages():
    befores, afters = _probe()
    assert len(befores) == 2 and len(afters) == 1  # exactly one re-exec, same process
    assert befores[0][1] == befores[1][1] == afters[0][1]
    assert afters[0][2] == "glibc.malloc.hugetlb=1"
    assert int(afters[0][3]) < 65536 // 8, afters  # 4 KiB pages would fault 65,536 times

    befores, afters = _probe(**{host_memory.OPT_OUT: "0"})
    assert len(befores) == 1 and afters[0][2] == "None"
    assert int(afters[0][3]) >= 65536  # the default: one fault per 4 KiB page
