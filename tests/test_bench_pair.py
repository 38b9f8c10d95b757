"""tools/bench_pair.py: a real paired run of the tiny M2D step (A: remat none, B: remat dots) in a
subprocess, and its refusal of a B that changes the train state or of compiler options XLA does not know."""

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--variants=tiny", "--frames=64", "--batch_tiny=8"]


def _run(*args):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_NUM_CPU_DEVICES="1")
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "bench_pair.py"), *TINY, *args],
                          env=env, capture_output=True, text=True, timeout=600, cwd=REPO)


def test_pairs_are_timed_and_their_ratios_reported():
    out = _run('--b_overrides={"model.remat": "dots"}', "--rounds=3")
    assert out.returncode == 0, out.stderr[-3000:]
    rows = re.findall(r"^\| (\d) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", out.stdout, re.M)
    assert [r[0] for r in rows] == ["1", "2", "3"]
    for _, a, b, ratio in rows:  # each ratio is B ÷ A of its own pair; times printed to 4 decimals, ratios to 3
        a, b, ratio, half = float(a), float(b), float(ratio), 0.5e-4
        assert (b - half) / (a + half) - 5e-4 <= ratio <= (b + half) / (a - half) + 5e-4, rows
    median = float(re.search(r"\*\*([\d.]+)\*\*", out.stdout).group(1))
    assert median == sorted(float(r[3]) for r in rows)[1]
    assert "B = --config.model.remat=dots" in out.stdout


def test_a_b_that_changes_the_state_is_refused():
    out = _run('--b_overrides={"model.predictor_depth": 1}', "--rounds=1")
    assert out.returncode != 0
    assert "change the train state's structure" in out.stderr


def test_unknown_compiler_options_name_the_flag():
    out = _run('--b_compiler_options={"xla_no_such_option": true}', "--rounds=1")
    assert out.returncode != 0
    assert "--b_compiler_options=" in out.stderr and "xla_no_such_option" in out.stderr
