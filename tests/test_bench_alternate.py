"""tools/bench_alternate.py: the workers' arguments and environments, the alternation and its report,
and one real round (tiny M2D, huge-page malloc against the default)."""

import os
import subprocess
import sys

import pytest
from absl import app, flags

from audiojepa.runtime import host_memory
from tools import bench_alternate, bench_common, bench_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_worker_args_pass_the_row_flags_on_and_drop_the_tools_own():
    argv = ["--config=configs/m2d.py", "--config.model.remat=dots", "--frames=208", "--process_pairs=4",
            "--b_env={}", "--b_flags=--config.model.dtype=bfloat16", "--append_to=BENCHMARKS.md",
            "--variants=B,tiny", "--devices=1,8", "--steps_b=6"]
    args = bench_alternate.worker_args(argv, "B", ["--config.model.dtype=bfloat16"])
    assert args == ["--config=configs/m2d.py", "--config.model.remat=dots", "--frames=208", "--steps_b=6",
                    "--variants=B", "--devices=1", "--_worker", "--_worker_devices=1",
                    "--config.model.dtype=bfloat16"]


def test_b_env_reaches_the_worker_before_the_huge_page_decision():
    base = {"PATH": "/bin"}
    a = bench_alternate.side_env({}, "cpu", environ=base)
    b = bench_alternate.side_env({host_memory.OPT_OUT: "0", "XLA_FLAGS": "--xla_foo"}, "cpu", environ=base)
    assert a["JAX_NUM_CPU_DEVICES"] == b["JAX_NUM_CPU_DEVICES"] == "1"
    assert a.get("GLIBC_TUNABLES") == (host_memory.hugepage_env(base) or {}).get("GLIBC_TUNABLES")
    assert "GLIBC_TUNABLES" not in b and b["XLA_FLAGS"] == "--xla_foo"
    assert base == {"PATH": "/bin"}


def test_json_flags_are_parsed_or_named_in_the_error():
    saved = flags.FLAGS.b_env
    try:
        flags.FLAGS.b_env = '{"AUDIOJEPA_HUGEPAGE_MALLOC": "0"}'
        assert bench_common.json_dict_flag("b_env") == {"AUDIOJEPA_HUGEPAGE_MALLOC": "0"}
        flags.FLAGS.b_env = '["AUDIOJEPA_HUGEPAGE_MALLOC"]'
        with pytest.raises(app.UsageError, match="--b_env must be a JSON object"):
            bench_common.json_dict_flag("b_env")
        flags.FLAGS.b_env = "{AUDIOJEPA_HUGEPAGE_MALLOC: 0}"
        with pytest.raises(app.UsageError, match="--b_env is not valid JSON"):
            bench_common.json_dict_flag("b_env")
    finally:
        flags.FLAGS.b_env = saved


def _row(step_s, peak=100.0):
    return {"variant": "B", "batch": 8, "frames": 208, "backend": "cpu", "options": "float32", "steps": 3,
            "flops": 50e9, "step_s": step_s, "gemm_1dev_gflops": peak, "host_memory": "default malloc (4 KiB pages)"}


def test_rounds_alternate_a_then_b_and_the_report_gives_each_ratio():
    calls = []
    a_times, b_times = iter([1.0, 2.0, 1.0]), iter([0.5, 2.2, 0.9])

    def run(side, times):
        def go():
            calls.append(side)
            return _row(next(times))
        return go

    result = bench_alternate.alternate(run("a", a_times), run("b", b_times), rounds=3)
    assert calls == ["a", "b"] * 3
    assert result["ratios"] == pytest.approx([0.5, 1.1, 0.9])
    assert result["median_ratio"] == pytest.approx(0.9) and result["b_faster"] == 2
    text = bench_alternate.report(result, {host_memory.OPT_OUT: "0"}, "--config.model.remat=dots")
    assert f"B = {host_memory.OPT_OUT}=0, --config.model.remat=dots" in text
    assert "Median B ÷ A over 3 rounds: **0.900**; B faster in 2 of 3." in text
    assert "| 1 | 1.000 | 50.0% | 0.500 | 100.0% | 0.500 |" in text  # 50 GFLOP in 1 s of a 100 GFLOP/s peak


@pytest.mark.slow
def test_one_real_round_of_huge_pages_against_the_default():
    command = [sys.executable, os.path.join(ROOT, "tools", "bench_alternate.py"), "--config=configs/m2d.py:runlocal",
               "--variants=tiny", "--batch_tiny=4", "--steps=1", "--warmup=0", "--gemm_size=128", "--gemm_repeats=1",
               "--process_pairs=1", f'--b_env={{"{host_memory.OPT_OUT}": "0"}}']
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Median B ÷ A over 1 rounds" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith("| 1 |"))
    a_s, b_s = float(row.split("|")[2]), float(row.split("|")[4])
    assert a_s > 0 and b_s > 0
    sides = next(line for line in result.stdout.splitlines() if line.startswith("- A: "))
    a_side, b_side = sides[len("- A: "):].split(". B: ")
    assert a_side.endswith(host_memory.describe(bench_train.worker_env(1, "cpu"))), sides
    assert b_side == f"{a_side.split('; ')[0]}; default malloc (4 KiB pages).", sides
