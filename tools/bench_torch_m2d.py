r"""The PyTorch counterpart of the M2D training step, timed on this machine: issue 9's yardstick.

    python tools/bench_torch_m2d.py                       # ViT-B, batch 8, 80x608, mask 0.7
    python tools/bench_torch_m2d.py --frames=208
    python tools/bench_torch_m2d.py --append_to=BENCHMARKS.md

Issue 9 compares the JAX step (`tools/bench_train.py`, one device) with "a PyTorch implementation of
the same step, timm blocks and AdamW". This is that step for bench_train's first row (the same row
flags: --config=configs/m2d.py with overrides, --variants, --frames, --batch_b, --mask_ratio,
--steps_b, --warmup, --gemm_size), written so that its matmuls are those the analytic count
`audiojepa.training.flops.m2d_step_flops` counts for that config (tests/test_bench_torch_m2d.py checks it with
torch's FLOP counter):
  - timm-style pre-LN blocks (LayerNorm eps 1e-6, fused qkv, F.scaled_dot_product_attention, exact
    GELU MLP), a 16x16 Conv2d patch embedding and fixed position embeddings;
  - the online encoder on CLS + the K visible patches; the EMA target encoder, under no_grad, on CLS +
    the L - K masked patches; the predictor (width 512, depth 8) on CLS + the whole grid, predicting
    the masked patches; the loss 2 - 2·cos against per-token standardised targets (norm_mse);
  - gradient clipping at config.optim.grad_clip_norm, torch.optim.AdamW (config.optim's betas and
    weight decay, foreach), then the EMA update with torch._foreach ops.
The random mask (a per-clip argsort of uniform noise) is drawn inside the step, as in the JAX step.

Per run: the mean and min of --steps_b timed steps after --warmup untimed ones, clips/s, the analytic
GFLOP/step and GFLOP/s, and two fractions: of a --gemm_size³ float32 torch.matmul peak (best of
--gemm_repeats, before and after the steps, the higher kept) and of bench_train's jitted XLA matmul
peak, both measured in the same run. The second is the denominator of bench_train's MFU, so that
column compares with bench_train's row for row. Run it alternately with bench_train (separate
processes): this machine's speed drifts by more than 10% within minutes. Unlike the JAX tools, it keeps
the malloc it is started with: glibc's huge pages made this step slower (3.9 s against 2.7 s at 80x208,
BENCHMARKS.md), so the yardstick runs with the default unless GLIBC_TUNABLES says otherwise.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from audiojepa.runtime import (
    host_memory,  # noqa: E402
    sharding,  # noqa: E402
)
from tools import bench_common, bench_train  # noqa: E402  (bench_train defines the row flags used here)

flags.DEFINE_integer("threads", 0, "torch.set_num_threads (0: torch's default).")
FLAGS = flags.FLAGS

def m2d_sizes(config) -> dict:
    """Sizes of an M2D config's model (a bench_train row config: its size, crop, mask ratio and batch)
    and its analytic step FLOPs (audiojepa.training.flops.m2d_step_flops), taken from the JAX method itself, so
    that both frameworks time the same step."""
    from audiojepa import methods
    from audiojepa.models.vit import model_size
    from audiojepa.ops import frontend
    from audiojepa.training import flops

    if config.method != "m2d":
        raise ValueError(f"config.method={config.method!r}: tools/bench_torch_m2d.py times M2D only.")
    model_config = config.model
    if model_config.get("predictor_mlp_dim") is not None:
        raise ValueError("config.model.predictor_mlp_dim: the torch yardstick's predictor has a 4 x width MLP only.")
    n_mels = frontend.get_preset(config.data.frontend).n_mels
    method = methods.get_method("m2d")(model_config, input_shape=(n_mels, int(config.data.crop_frames)))
    size = model_size(model_config)
    batch = int(config.batch_size)
    return dict(
        grid=tuple(method.grid_size), patch=tuple(method.patch_size), num_patches=method.num_patches,
        num_visible=method.num_visible, width=size["width"], depth=size["depth"], heads=size["num_heads"],
        mlp_dim=size["mlp_dim"], predictor_width=int(model_config.predictor_width),
        predictor_depth=int(model_config.predictor_depth), predictor_heads=int(model_config.predictor_heads),
        clip_norm=config.optim.get("grad_clip_norm"), betas=(float(config.optim.b1), float(config.optim.b2)),
        weight_decay=float(config.optim.weight_decay), n_mels=n_mels, frames=int(config.data.crop_frames),
        batch=batch, flops=flops.m2d_step_flops(method, batch)["total"])


def build(sizes: dict, seed: int = 0):
    """(model, optimizer, trainable params, online params paired with the EMA target's) for `sizes`."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Block(nn.Module):
        def __init__(self, dim, heads, mlp_dim):
            super().__init__()
            self.heads = heads
            self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.fc1, self.fc2 = nn.Linear(dim, mlp_dim), nn.Linear(mlp_dim, dim)

        def forward(self, x):
            b, n, d = x.shape
            q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            x = x + self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))
            return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))

    def stack(dim, depth, heads, mlp_dim):
        return nn.ModuleList(Block(dim, heads, mlp_dim) for _ in range(depth)), nn.LayerNorm(dim, eps=1e-6)

    def gather(x, idx):
        return torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[-1]))

    class M2D(nn.Module):
        def __init__(self, s):
            super().__init__()
            d, p, n = s["width"], s["predictor_width"], s["num_patches"]
            self.k = s["num_visible"]
            self.patch_embed = nn.Conv2d(1, d, s["patch"], stride=s["patch"])
            self.register_buffer("pos", torch.randn(1, n, d) * 0.02)  # fixed (sin-cos in M2D)
            self.register_buffer("pred_pos", torch.randn(1, 1 + n, p) * 0.02)
            self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
            self.mask_token = nn.Parameter(torch.randn(1, 1, p) * 0.02)
            self.blocks, self.norm = stack(d, s["depth"], s["heads"], s["mlp_dim"])
            self.target_blocks, self.target_norm = stack(d, s["depth"], s["heads"], s["mlp_dim"])
            for param in [*self.target_blocks.parameters(), *self.target_norm.parameters()]:
                param.requires_grad_(False)
            self.pred_embed = nn.Linear(d, p)
            self.pred_blocks, self.pred_norm = stack(p, s["predictor_depth"], s["predictor_heads"], 4 * p)
            self.pred_out = nn.Linear(p, d)

        def forward(self, lms):
            """lms [batch, mels, frames] → the M2D loss (scalar)."""
            b = lms.shape[0]
            x = self.patch_embed(lms[:, None]).flatten(2).transpose(1, 2) + self.pos  # [b, L, D]
            order = torch.rand(b, x.shape[1]).argsort(dim=1)
            visible, masked = order[:, :self.k], order[:, self.k:]
            cls = self.cls.expand(b, -1, -1)
            h = torch.cat([cls, gather(x, visible)], 1)
            for block in self.blocks:
                h = block(h)
            h = self.norm(h)
            with torch.no_grad():
                t = torch.cat([cls, gather(x, masked)], 1)
                for block in self.target_blocks:
                    t = block(t)
                t = self.target_norm(t)[:, 1:]
                t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
            z = self.pred_embed(h)
            grid = torch.cat([z[:, 1:], self.mask_token.expand(b, masked.shape[1], -1)], 1)
            grid = gather(grid, order.argsort(dim=1))  # back to patch order
            z = torch.cat([z[:, :1], grid], 1) + self.pred_pos
            for block in self.pred_blocks:
                z = block(z)
            pred = self.pred_out(gather(self.pred_norm(z)[:, 1:], masked))
            return (2 - 2 * F.cosine_similarity(pred, t, dim=-1)).mean()

    torch.manual_seed(seed)
    model = M2D(sizes)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, betas=sizes["betas"], weight_decay=sizes["weight_decay"],
                                  foreach=True)
    online = [*model.blocks.parameters(), *model.norm.parameters()]
    target = [*model.target_blocks.parameters(), *model.target_norm.parameters()]
    return model, optimizer, trainable, (online, target)


def train_step(model, optimizer, trainable, ema_pairs, lms, clip_norm: float | None,
               ema_decay: float = 0.99995) -> float:
    """One step: loss, backward, clip at clip_norm (None: no clip), AdamW, EMA of the online encoder into
    the target; returns the loss."""
    import torch

    optimizer.zero_grad(set_to_none=True)
    loss = model(lms)
    loss.backward()
    if clip_norm:
        torch.nn.utils.clip_grad_norm_(trainable, clip_norm, foreach=True)
    optimizer.step()
    with torch.no_grad():
        online, target = ema_pairs
        torch._foreach_mul_(target, ema_decay)
        torch._foreach_add_(target, online, alpha=1 - ema_decay)
    return loss.item()


def gemm_gflops(size: int, repeats: int) -> float:
    """Best GFLOP/s of a size³ float32 torch.matmul (bench_common.gemm_gflops)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    return bench_common.gemm_gflops(lambda: a @ b, size, repeats)


def measure(sizes: dict, steps: int, warmup: int, gemm_size: int, gemm_repeats: int) -> dict:
    """Times `steps` train steps of the `sizes` model after `warmup`, on one random batch of log-mels."""
    import torch

    peak = gemm_gflops(gemm_size, gemm_repeats)
    model, optimizer, trainable, ema_pairs = build(sizes)
    lms = torch.randn(sizes["batch"], sizes["n_mels"], sizes["frames"])
    losses = [train_step(model, optimizer, trainable, ema_pairs, lms, sizes["clip_norm"]) for _ in range(warmup)]
    times = []
    for i in range(steps):
        start = time.perf_counter()
        losses.append(train_step(model, optimizer, trainable, ema_pairs, lms, sizes["clip_norm"]))
        times.append(time.perf_counter() - start)
        print(f"step {i + 1}/{steps}: {times[-1]:.3f} s, loss {losses[-1]:.4f}", file=sys.stderr, flush=True)
    peak = max(peak, gemm_gflops(gemm_size, gemm_repeats))
    xla_peak = bench_train.gemm_peaks(sharding.make_mesh(1))[0]
    mean = statistics.mean(times)
    gflop = sizes["flops"] / 1e9
    return dict(step_s=mean, step_min_s=min(times), clips_s=sizes["batch"] / mean, gflop=gflop,
                gflop_s=gflop / mean, peak=peak, mfu=gflop / mean / peak, xla_peak=xla_peak,
                xla_mfu=gflop / mean / xla_peak, steps=steps, warmup=warmup, threads=torch.get_num_threads(),
                torch_version=torch.__version__)


def report(result: dict, variant: str, sizes: dict) -> str:
    grid = sizes["grid"]
    title = (f"PyTorch M2D step (issue 9's yardstick): {variant}, batch {sizes['batch']}, "
             f"{sizes['n_mels']}x{sizes['frames']} ({grid[0] * grid[1]} patches, {sizes['num_visible']} visible)")
    machine = (f"{bench_common.cpus()}; torch {result['torch_version']}, {result['threads']} threads; "
               f"{host_memory.describe()}")
    lines = [
        *bench_common.section_head(title, machine),
        f"- {result['steps']} timed steps after {result['warmup']}; analytic GFLOP as bench_train's "
        "(audiojepa.training.flops.m2d_step_flops); peaks: a float32 torch.matmul and bench_train's jitted XLA matmul, "
        "both in this run (the XLA one is the denominator of bench_train's MFU, hence of issue 9's targets).",
        "",
        "| step s mean (min) | clips/s | analytic GFLOP/step | achieved GFLOP/s | torch GEMM GFLOP/s | of torch peak "
        "| XLA GEMM GFLOP/s | of XLA peak |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {result['step_s']:.3f} ({result['step_min_s']:.3f}) | {result['clips_s']:.2f} | {result['gflop']:.1f} | "
        f"{result['gflop_s']:.1f} | {result['peak']:.1f} | {100 * result['mfu']:.1f}% | {result['xla_peak']:.1f} | "
        f"{100 * result['xla_mfu']:.1f}% |",
        "",
    ]
    return "\n".join(lines)


def main(argv):
    del argv
    import torch

    if FLAGS.threads:
        torch.set_num_threads(FLAGS.threads)
    variant, config = bench_train.first_row_config()
    try:
        sizes = m2d_sizes(config)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    steps = FLAGS.steps if variant == "tiny" or not FLAGS.steps_b else FLAGS.steps_b
    result = measure(sizes, steps, FLAGS.warmup, bench_train.gemm_size(), FLAGS.gemm_repeats)
    text = report(result, variant, sizes)
    print(text)
    bench_common.append_markdown(FLAGS.append_to, text)


if __name__ == "__main__":
    FLAGS.set_default("steps_b", 6)
    FLAGS.set_default("append_to", "")
    app.run(main)
