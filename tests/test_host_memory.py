"""audiojepa.host_memory: with it, a jitted function's temporaries stop page-faulting in on every call.

Each case runs in a fresh Python process, since the allocator settings must be made before JAX's backend
starts its threads. Page faults are counted with getrusage (ru_minflt), a count, not a timing.
"""

import os
import subprocess
import sys

import pytest

from audiojepa import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs f (two 128 MiB temporaries besides its input) 10 times after a warm-up call and prints the minor
# page faults of each call, as a fraction of the 4 KiB pages in one temporary.
_PROBE = r"""
import resource, sys, time
from audiojepa import host_memory
applied = host_memory.retain_freed_memory()
import jax, jax.numpy as jnp

@jax.jit
def f(x):
    y = jnp.sin(x) * 2.0
    z = jnp.cos(y) + x
    return (z * y).sum()

x = jnp.ones((32, 1024, 1024), jnp.float32)
pages = x.nbytes // 4096
f(x).block_until_ready()
fractions = []
for _ in range(10):
    time.sleep(0.1)  # lets the previous call free its temporaries (XLA frees them just after the result is ready)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    fractions.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / pages)
print(applied, *fractions)
"""


def _probe(retain: bool) -> tuple[bool, list[float]]:
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **{host_memory.ENV_VAR: "1" if retain else "0"})
    env.pop("GLIBC_TUNABLES", None)
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    applied, *fractions = out.stdout.split()
    return applied == "True", [float(f) for f in fractions]


@pytest.mark.skipif(host_memory._glibc() is None, reason="mallopt settings are glibc's")
def test_retained_memory_stops_the_per_call_page_faults():
    applied, fractions = _probe(retain=True)
    assert applied
    # Without it every call faults in at least one whole temporary (checked below). With it the heap
    # may grow for the first calls, until freed blocks fit the temporaries, then the calls reuse pages.
    assert max(fractions[-4:]) < 0.05, fractions
    default_applied, default_fractions = _probe(retain=False)
    assert not default_applied
    assert min(default_fractions) > 0.9, default_fractions


def test_opt_out_leaves_the_allocator_alone(monkeypatch):
    monkeypatch.setenv(host_memory.ENV_VAR, "0")
    assert host_memory.retain_freed_memory() is False
