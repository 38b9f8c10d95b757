"""Optimizer and learning-rate schedule from `config.optim` (optax).

M2D's recipe: AdamW(0.9, 0.95), weight decay 0.05 on the method's decay mask, lr = base_lr x
global_batch / 256, linear warm-up from 0 then half-cycle cosine to `min_lr`, global-norm gradient
clipping at 3.0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def peak_learning_rate(optim_config, global_batch_size: int) -> float:
    """`optim.lr` if set, else `optim.base_lr` x global_batch_size / 256 (the MAE/M2D scaling rule)."""
    if optim_config.get("lr"):
        return float(optim_config.lr)
    return float(optim_config.base_lr) * global_batch_size / 256


def learning_rate_schedule(optim_config, *, global_batch_size: int, total_steps: int, warmup_steps: int):
    """Step -> lr: linear `optim.warmup_init_lr` (default 0) -> peak over `warmup_steps`, then cosine to
    `optim.min_lr` at `total_steps`. (Audio-JEPA's warm-up starts at 1e-6; M2D's at 0.)"""
    peak = peak_learning_rate(optim_config, global_batch_size)
    min_lr = float(optim_config.get("min_lr", 0.0))
    init_lr = float(optim_config.get("warmup_init_lr", 0.0))
    if not 0.0 <= init_lr <= peak:
        raise ValueError(f"config.optim.warmup_init_lr={init_lr} must lie in [0, peak lr {peak}].")
    warmup_steps = min(warmup_steps, total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=init_lr, peak_value=peak, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1), end_value=min_lr)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """optax.clip_by_global_norm's rule (g unchanged if ‖g‖ < max_norm, else g·max_norm/‖g‖), as one
    scalar factor times every gradient; the same state (EmptyState), so checkpoints are interchangeable.

    optax divides every element by ‖g‖. XLA does not copy a division into each of its consumers (it
    counts it as expensive), so the clipped gradients are written out in full and read back by the
    AdamW moments: one more pass over all gradients per step (~0.2 s of a ViT-B M2D step on a 2-core
    CPU, BENCHMARKS.md). A multiplication by a scalar is fused into the moments' update instead.
    The values agree with optax's to float32 rounding (one multiplication instead of a division and a
    multiplication).

    `tx.update(..., grad_norm=‖g‖)` passes a norm the caller has already computed (the trainer needs it
    for its finite check), so the step reduces over all gradients once, not twice.
    """
    def update(updates, state, params=None, *, grad_norm=None, **extra_args):
        del params, extra_args
        norm = optax.tree.norm(updates) if grad_norm is None else grad_norm
        scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def make_optimizer(optim_config, schedule, weight_decay_mask) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW with decoupled weight decay on the leaves `weight_decay_mask` marks."""
    name = optim_config.get("name", "adamw")
    if name != "adamw":
        raise ValueError(f"optim.name={name!r}; valid: 'adamw'")
    parts = []
    if optim_config.get("grad_clip_norm"):
        parts.append(clip_by_global_norm(float(optim_config.grad_clip_norm)))
    parts.append(optax.adamw(
        schedule, b1=float(optim_config.b1), b2=float(optim_config.b2), eps=float(optim_config.get("eps", 1e-8)),
        weight_decay=float(optim_config.weight_decay), mask=weight_decay_mask))
    return optax.chain(*parts)
