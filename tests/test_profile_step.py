"""tools/profile_step.py: the HLO dot-FLOP parser against hand-counted FLOPs, and one real profile of
the tiny M2D step (a subprocess: the per-op trace flag must be in XLA_FLAGS before JAX starts)."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from tools import profile_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_dot_flops_of_compiled_hlo_match_hand_counts():
    def f(x, w1, w2, q, k):
        h = jax.nn.gelu(x @ w1) @ w2  # two dots, the first fused with the GELU or not
        logits = jnp.einsum("bqd,bkd->bqk", q, k)  # a batched dot
        return h.sum() + jax.nn.softmax(logits).sum()

    args = [jnp.ones(s, jnp.float32) for s in [(48, 64), (64, 96), (96, 32), (3, 10, 16), (3, 12, 16)]]
    hlo = jax.jit(f).lower(*args).compile().as_text()
    found = profile_step.hlo_dot_flops(hlo)
    expected = 2 * 48 * 96 * 64 + 2 * 48 * 32 * 96 + 2 * 3 * 10 * 12 * 16
    assert sum(flops for flops, _, _ in found.values()) == expected
    assert all(re.match(r"f32\[", out) for _, out, _ in found.values())


def test_other_ops_are_grouped_with_their_output_bytes():
    def f(x):
        return jnp.transpose(x, (1, 0, 2)) * 2.0  # one copy-like fusion, no dot

    hlo = jax.jit(f).lower(jnp.ones((4, 6, 8), jnp.float32)).compile().as_text()
    instructions = profile_step.hlo_instructions(hlo)
    name = next(n for n, (out_type, _) in instructions.items() if out_type.startswith("f32[6,4,8]"))
    result = {"seconds": {name: 0.5, "ynn_fusion.3": 2.0}, "calls": {name: 10, "ynn_fusion.3": 1},
              "dots": {"ynn_fusion.3": (1, "f32[2]", "")}, "instructions": instructions}
    (row,) = profile_step.other_ops_table(result)
    assert row["shape"] == "f32[6,4,8]" and row["calls"] == 10 and row["seconds"] == 0.5
    assert row["bytes"] == 10 * 6 * 4 * 8 * 4
    assert profile_step._type_bytes("(f32[2,3]{1,0}, bf16[4]{0})") == 2 * 3 * 4 + 4 * 2


def test_op_kinds_drop_numeric_suffixes_and_keep_calls():
    rows, total = profile_step.kind_table({"copy.1": 1.0, "copy.22": 0.5, "ynn_fusion": 2.0},
                                          {"copy.1": 2, "copy.22": 1, "ynn_fusion": 4}, top=5)
    assert rows == [("ynn_fusion", 2.0, 4), ("copy", 1.5, 3)] and total == 3.5


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU's per-op trace events")
def test_profile_of_the_tiny_m2d_step():
    env = dict(os.environ, PYTHONPATH=REPO, JAX_NUM_CPU_DEVICES="1")
    env.pop("XLA_FLAGS", None)
    out = subprocess.run([sys.executable, os.path.join(REPO, "tools", "profile_step.py"), "--variants=tiny",
                          "--frames=64", "--batch_tiny=8", "--warmup=1", "--gemm_size=256", "--gemm_repeats=1"],
                         env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    assert "| op kind |" in text and "| matmul (JAX op) |" in text and "| other op (kind) |" in text
    found, analytic = map(float, re.search(r"([\d.]+) GFLOP found in the HLO \(analytic count ([\d.]+)\)", text).groups())
    # The analytic count also charges the patch embedding's unneeded input gradient (flops.py), so it
    # reads a little higher; every other matmul of the step must be found in the traced HLO.
    assert 0.85 * analytic <= found <= analytic, (found, analytic)
    kinds = re.findall(r"^\| (\S+) \| [\d.]+ \| [\d.]+% \| \d+ \|$", text, re.M)
    assert "ynn_fusion" in kinds or "dot" in kinds, kinds
