#!/usr/bin/env bash
# The test suite on the newest JAX that pip offers a newer Python (JAX 0.11+ needs Python >= 3.12; this
# project's own install, on Python 3.11, gets JAX 0.10.x). It makes or reuses a virtualenv, installs the
# checkout with its test and tfds extras (not torch: the few torch-only tests skip), prints the versions
# and runs the README's test command there.
#
#   tools/test_newer_jax.sh                      # python3.12 from PATH, the whole suite (~10 min, 2 cores)
#   PYTHON=~/.pyenv/versions/3.13.0/bin/python tools/test_newer_jax.sh tests/test_train.py
#
# PYTHON: the interpreter (default python3.12); AUDIOJEPA_NEWER_JAX_VENV: the virtualenv
# (default /tmp/audiojepa-newer-jax-<python version>). Extra arguments go to pytest instead of `tests`.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3.12}
if ! command -v "$python" >/dev/null; then
  echo "test_newer_jax.sh: no interpreter '$python'; set PYTHON to a Python >= 3.12" >&2
  exit 2
fi
version=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
venv=${AUDIOJEPA_NEWER_JAX_VENV:-/tmp/audiojepa-newer-jax-$version}
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/pip" install -q --upgrade pip
"$venv/bin/pip" install -q --upgrade -e ".[test,tfds]"
"$venv/bin/python" -c 'import sys; from importlib.metadata import version as v
print(f"Python {sys.version.split()[0]}:", ", ".join(f"{p} {v(p)}" for p in ("jax", "jaxlib", "flax", "optax",
      "orbax-checkpoint", "grain", "numpy")))'
if [ $# -eq 0 ]; then set -- tests; fi
exec "$venv/bin/python" -m pytest -q -n 2 --dist loadfile "$@"
