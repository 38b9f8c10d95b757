"""tools/bench_torch_m2d.py: the PyTorch M2D step does the matmul work the analytic count says, and
its update is AdamW + the EMA of the online encoder into the target."""

import pytest

torch = pytest.importorskip("torch")

from tools import bench_torch_m2d  # noqa: E402
from tools.bench_train import row_config  # noqa: E402


def sizes_of(variant, frames, batch):
    return bench_torch_m2d.m2d_sizes(row_config("configs/m2d.py", variant, frames=frames, batch_size=batch))


def test_sizes_follow_the_m2d_config():
    sizes = sizes_of("B", 608, 8)
    assert (sizes["grid"], sizes["num_patches"], sizes["num_visible"]) == ((5, 38), 190, 57)
    assert (sizes["width"], sizes["depth"], sizes["heads"], sizes["mlp_dim"]) == (768, 12, 12, 3072)
    assert (sizes["predictor_width"], sizes["predictor_depth"], sizes["predictor_heads"]) == (512, 8, 16)
    assert (sizes["n_mels"], sizes["frames"], sizes["batch"]) == (80, 608, 8)
    assert (sizes["clip_norm"], sizes["betas"], sizes["weight_decay"]) == (3.0, (0.9, 0.95), 0.05)


def test_other_methods_are_refused():
    with pytest.raises(ValueError, match="times M2D only"):
        bench_torch_m2d.m2d_sizes(row_config("configs/jepa.py", "tiny"))


@pytest.mark.parametrize("frames", [64, 208])
def test_counted_flops_match_the_analytic_count(frames):
    """torch's FlopCounterMode over forward + backward counts every matmul, convolution and attention
    the step runs: it must agree with audiojepa.training.flops.m2d_step_flops (what both benchmarks divide
    by). Attention runs on torch's math backend here: the counter does not see inside the fused CPU
    kernel. The analytic count charges the patch embedding a gradient with respect to its input, which
    is never computed (the input is data): that is the whole difference (flops.py: ~0.1% of the step
    for ViT-B at 80x608, ~2-3% for these tiny models)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    sizes = sizes_of("tiny", frames, 2)
    model, _, _, _ = bench_torch_m2d.build(sizes)
    lms = torch.randn(2, sizes["n_mels"], frames)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(lms).backward()
    counted = counter.get_total_flops()
    embed = 2 * 2 * sizes["num_patches"] * 16 * 16 * sizes["width"]  # batch 2, input gradient of the conv
    assert counted == pytest.approx(sizes["flops"] - embed, rel=1e-3)


def test_a_step_updates_the_online_params_and_moves_the_target_by_the_ema():
    sizes = sizes_of("tiny", 64, 2)
    model, optimizer, trainable, (online, target) = bench_torch_m2d.build(sizes)
    before = [p.detach().clone() for p in trainable]
    target_before = [t.detach().clone() for t in target]
    loss = bench_torch_m2d.train_step(model, optimizer, trainable, (online, target),
                                      torch.randn(2, sizes["n_mels"], 64), sizes["clip_norm"], ema_decay=0.9)
    assert 0.0 <= loss <= 4.0  # 2 - 2·cos
    assert sum(not torch.equal(a, b) for a, b in zip(before, trainable)) > 0.9 * len(trainable)
    for old, new, source in zip(target_before, target, online):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * source.detach(), rtol=1e-6, atol=1e-7)
