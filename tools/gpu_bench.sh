#!/usr/bin/env bash
# Issue 9's GPU measurement, prepared as one command for a session that is lent the device machine.
# That machine's image (KINDS.md of the device tool) has Python 3.12 with JAX 0.11 (CUDA), flax, optax and
# orbax, but not grain, array-record, ml-collections, soundfile, soxr or tensorboardX, and it cannot fetch anything.
#
#   tools/gpu_bench.sh fetch   # here: those packages as CPython 3.12 manylinux wheels in .whl/ (~7 MB)
#   bash tools/gpu_bench.sh run [FLAGS]   # there, with .whl carried; ~4 minutes on an H200 (FLAGS: to bench_train)
#
# `run` installs the wheels into /tmp/site and prints the Python, JAX and GPU it found, checks cuDNN's attention
# against XLA's (tools/check_cudnn_attention.py). Then it runs
# tools/bench_train.py twice, in separate processes, for M2D ViT-B, batch 256, bfloat16 compute:
# attention by XLA, then cuDNN's fused attention. Each run's table goes to $OUT/BENCHMARKS.gpu.md (or
# ./BENCHMARKS.gpu.md without $OUT), with MFU against both the measured bfloat16 matmul and the
# datasheet; copy it into BENCHMARKS.md. Overrides: PYTHON (python3), PLATFORM (gpu), VARIANT (B),
# BATCH (256), DTYPE (bfloat16), STEPS (10 timed steps per run), WHEELS_DIR (.whl), ATTENTIONS ("xla cudnn"),
# CHECK (1: run the cuDNN check), PROFILE_DIR (unset: no profile; else a jax.profiler trace of 3 more steps
# per run, under PROFILE_DIR/<attention>; XLA_FLAGS passes through to the runs).
set -euo pipefail
cd "$(dirname "$0")/.."
PACKAGES=(grain==0.2.18 array-record==0.8.6 ml-collections==1.1.0 soundfile==0.14.0 soxr==1.1.0 einops==0.8.2 cffi pycparser
        portpicker googleapis-common-protos tensorboardX)
python=${PYTHON:-python3}

case "${1:-}" in
  fetch)
    grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
    rm -rf .whl
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "${PACKAGES[@]}"
    ls .whl
    du -sh .whl
    ;;
  run)
    shift  # what follows `run` goes to tools/bench_train.py (e.g. --config.model.scan_layers=False)
    out=${OUT:-.}
    wheels=${WHEELS_DIR:-.whl}
    if ls "$wheels"/*.whl >/dev/null 2>&1; then
      "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$wheels"/*.whl
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
    fi
    export PYTHONUNBUFFERED=1
    "$python" -c 'import sys, jax; from importlib.metadata import version as v
print(f"Python {sys.version.split()[0]}:", ", ".join(f"{p} {v(p)}" for p in ("jax", "jaxlib", "flax", "optax",
      "orbax-checkpoint", "grain")), "| devices:", jax.devices())'
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
    if [ "${CHECK:-1}" = 1 ]; then
      "$python" tools/check_cudnn_attention.py || echo "cuDNN attention differs from XLA's: see the lines above" >&2
    fi
    for attention in ${ATTENTIONS:-xla cudnn}; do
      "$python" tools/bench_train.py --platform="${PLATFORM:-gpu}" --config=configs/m2d.py \
        --variants="${VARIANT:-B}" --devices=1 --batch_b="${BATCH:-256}" --batch_tiny="${BATCH:-256}" \
        --steps="${STEPS:-10}" --steps_b="${STEPS:-10}" --config.model.dtype="${DTYPE:-bfloat16}" \
        --config.model.attention_impl="$attention" --append_to="$out/BENCHMARKS.gpu.md" \
        ${PROFILE_DIR:+--profile_dir="$PROFILE_DIR/$attention"} "$@"
    done
    ;;
  *)
    echo "usage: tools/gpu_bench.sh fetch|run (see the comment at the top)" >&2
    exit 2
    ;;
esac
