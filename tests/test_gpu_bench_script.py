"""tools/gpu_bench.sh, dry-run on the CPU: `run` writes the XLA-attention table for the requested dtype and
batch to $OUT, and the cuDNN run fails there with the error that names the backend (on a GPU it runs).
`fetch` needs the package index and is not run here. Two tiny compiles, ~30 s on 2 cores."""

import subprocess
import sys

import pytest

import run_helpers as rh

pytestmark = pytest.mark.slow


def test_run_writes_the_xla_table_and_cudnn_fails_by_name_on_cpu(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # No wheels to install here (WHEELS_DIR empty): this interpreter already has the project's packages.
    env = rh.subprocess_env(PLATFORM="cpu", VARIANT="tiny", BATCH=8, STEPS=1, OUT=out, PYTHON=sys.executable,
                            WHEELS_DIR=tmp_path / "no_wheels")
    # Flags after `run` go to bench_train: a small peak matmul and no warm-up steps keep this test short.
    result = subprocess.run(["bash", "tools/gpu_bench.sh", "run", "--gemm_size=256", "--gemm_repeats=1", "--warmup=0"],
                            cwd=rh.REPO, env=env, capture_output=True, text=True, timeout=600)
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-3000:]
    assert "attention_impl='cudnn' needs an NVIDIA GPU with cuDNN" in log, log[-3000:]
    table = (out / "BENCHMARKS.gpu.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == 1, table
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[:4] == ["tiny", "1", "8", "bfloat16, attention xla, remat none"]
    assert float(cells[5].split()[0]) > 0  # step seconds


def test_unknown_subcommand_prints_the_usage():
    result = subprocess.run(["bash", "tools/gpu_bench.sh", "bench"], cwd=rh.REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "usage: tools/gpu_bench.sh fetch|run" in result.stderr
