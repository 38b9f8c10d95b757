"""Optimizer and learning-rate schedule from `config.optim` (optax).

M2D's recipe: AdamW(0.9, 0.95), weight decay 0.05 on the method's decay mask, lr = base_lr x
global_batch / 256, linear warm-up from 0 then half-cycle cosine to `min_lr`, global-norm gradient
clipping at 3.0.
"""

from __future__ import annotations

import optax


def peak_learning_rate(optim_config, global_batch_size: int) -> float:
    """`optim.lr` if set, else `optim.base_lr` x global_batch_size / 256 (the MAE/M2D scaling rule)."""
    if optim_config.get("lr"):
        return float(optim_config.lr)
    return float(optim_config.base_lr) * global_batch_size / 256


def learning_rate_schedule(optim_config, *, global_batch_size: int, total_steps: int, warmup_steps: int):
    """Step -> lr: linear 0 -> peak over `warmup_steps`, then cosine to `optim.min_lr` at `total_steps`."""
    peak = peak_learning_rate(optim_config, global_batch_size)
    min_lr = float(optim_config.get("min_lr", 0.0))
    warmup_steps = min(warmup_steps, total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1), end_value=min_lr)


def make_optimizer(optim_config, schedule, weight_decay_mask) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW with decoupled weight decay on the leaves `weight_decay_mask` marks."""
    name = optim_config.get("name", "adamw")
    if name != "adamw":
        raise ValueError(f"optim.name={name!r}; valid: 'adamw'")
    parts = []
    if optim_config.get("grad_clip_norm"):
        parts.append(optax.clip_by_global_norm(float(optim_config.grad_clip_norm)))
    parts.append(optax.adamw(
        schedule, b1=float(optim_config.b1), b2=float(optim_config.b2), eps=float(optim_config.get("eps", 1e-8)),
        weight_decay=float(optim_config.weight_decay), mask=weight_decay_mask))
    return optax.chain(*parts)
