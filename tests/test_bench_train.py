"""tools/bench_train.py: the analytic FLOP count of an M2D step, by hand and against XLA's count.

Nothing here is timed; the benchmark itself is a script (see its docstring).
"""

import jax
import pytest

from audiojepa import sharding
from audiojepa.methods.m2d import M2D
from tools import bench_train


def test_block_flops_by_hand():
    # 5 tokens, width 4, MLP 8: qkv 3·(2·5·4·4) = 480, scores 2·5²·4 = 200, attention·v 200,
    # projection 2·5·4·4 = 160, MLP 2·(2·5·4·8) = 640.
    assert bench_train.block_flops(5, 4, 8) == 480 + 200 + 200 + 160 + 640


def test_b_step_parts():
    """ViT-B on 80x608 at batch 1: the parts as the docstring's formula spells them out."""
    method = M2D(bench_train.model_config("B", 0.7).model, input_shape=(80, 608))
    assert (method.num_patches, method.num_visible) == (190, 57)
    block = bench_train.block_flops
    flops = bench_train.m2d_step_flops(method, batch_size=1)
    assert flops["patch_embed"] == 2 * 190 * 256 * 768
    assert flops["online_encoder"] == 12 * block(58, 768, 3072)
    assert flops["target_encoder"] == 12 * block(134, 768, 3072)
    assert flops["predictor"] == 2 * 58 * 768 * 512 + 8 * block(191, 512, 2048) + 2 * 133 * 512 * 768
    trained = flops["patch_embed"] + flops["online_encoder"] + flops["predictor"]
    assert flops["total"] == 3 * trained + flops["target_encoder"]
    assert flops["total"] / 1e9 == pytest.approx(84.7, abs=0.1)


def test_tiny_step_flops_match_xla_cost_analysis():
    """The analytic count of the tiny (runlocal) step on one device vs XLA's, within 15%.

    XLA also counts LayerNorm, softmax, GELU, the loss and the AdamW update, so it should be a little
    higher (about 5% here); the patch embedding's input gradient, which the formula counts and the
    step never computes, is about 2% of the count at this size.
    """
    mesh = sharding.make_mesh(1)
    batch_size, frames = 8, 208
    step, init_state, method = bench_train.build_step(bench_train.model_config("tiny", 0.7), frames=frames,
                                                      batch_size=batch_size, mesh=mesh)
    repl, split = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    abstract = lambda tree, where: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where), tree)
    state = abstract(jax.eval_shape(init_state, jax.random.key(0)), repl)
    batch = abstract(jax.eval_shape(lambda: bench_train.random_batch(batch_size, method.input_shape, mesh)), split)
    rng = abstract(jax.eval_shape(lambda: jax.random.key(0)), repl)
    xla = bench_train.xla_flops(step.lower(state, batch, rng).compile())
    if xla is None:
        pytest.skip("this backend's cost_analysis() has no 'flops' entry")
    analytic = bench_train.m2d_step_flops(method, batch_size)["total"]
    assert xla == pytest.approx(analytic, rel=0.15)


def test_table_rows_and_skipped_rows():
    measured = dict(variant="tiny", devices=2, batch=64, compile_s=10.0, step_s=2.0, step_s_min=1.5, flops=100e9,
                    xla_flops=104e9, gemm_1dev_gflops=100.0, gemm_all_gflops=80.0)
    skipped = dict(variant="B", devices=8, batch=8, skipped="needs ~19 GiB", flops=677e9,
                   gemm_1dev_gflops=100.0, gemm_all_gflops=80.0)
    lines = bench_train.format_table([measured, skipped]).splitlines()
    assert len(lines) == 4 and all(line.count("|") == lines[0].count("|") for line in lines)
    # 100 GFLOP in 2 s = 50 GFLOP/s: 25% of 2 devices x 100, 62.5% of the 80 all devices deliver.
    assert "| 32.0 | 100.0 | 104.0 | 50.0 | 100.0 | 80.0 | 25.0% | 62.5% |" in lines[2]
    assert "skipped: needs ~19 GiB" in lines[3]
