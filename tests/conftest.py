"""Test setup: simulated devices, a compilation cache and absl flags, before JAX or Grain is imported."""

import atexit
import os
import shutil
import tempfile

# Several CPU devices so sharding code paths run as on a multi-chip host.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
# Many tests build the same tiny models; JAX's persistent cache turns repeat compiles (~10 s each on
# 2 cores) into cache reads. One fresh folder per test session, so no state leaks between runs.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache_dir = tempfile.mkdtemp(prefix="audiojepa-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
    atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)  # subprocesses of the session are done by then
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# One corpus cache (embedded corpora and their stats) for the whole session, never the user's
# ~/.cache/audiojepa: each embedded corpus is generated once and shared by every test that trains on it.
if "AUDIOJEPA_CACHE" not in os.environ:
    _corpus_dir = tempfile.mkdtemp(prefix="audiojepa-corpus-cache-")
    os.environ["AUDIOJEPA_CACHE"] = _corpus_dir
    atexit.register(shutil.rmtree, _corpus_dir, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Cheaper XLA:CPU compiles for the whole session (about half the compile time of the tiny train step on 2 cores;
# the suite is mostly compiles of tiny models), the same flags as the training subprocesses
# (tests/run_helpers.py FAST_COMPILE_FLAGS), so in-process and subprocess runs compile alike.
_FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), _FAST_COMPILE_FLAGS) if f)

from absl import flags  # noqa: E402

# Grain reads absl flags in its worker machinery; outside absl.app.run they must be marked parsed.
flags.FLAGS.mark_as_parsed()
