"""Regression losses between predicted and target tokens, shared by M2D and the JEPA family.

Every loss takes `pred` and `target` of shape [batch, tokens, dim] and returns a scalar averaged over
batch × tokens (and over features where the loss is a per-element mean). Targets are first normalised
per token over the feature axis by one of `TARGET_NORMS`:

- "none": as they come out of the target encoder (which already ends with its own LayerNorm).
- "layernorm": (t - μ) / sqrt(var + 1e-6) with the biased variance and no affine parameters, as
  I-JEPA's `F.layer_norm(h, (D,))` on top of the target encoder.
- "standardize": (t - μ) / sqrt(var + 1e-6) with the unbiased variance, the `norm_pix_loss` of M2D and
  of the SonyCSL / Audio-JEPA code.

Loss types (`LOSS_TYPES`):

- "smooth_l1": torch's `smooth_l1_loss` (Huber / β): 0.5·d²/β where |d| < β, else |d| - 0.5·β, mean over
  every element; β = 0 is the L1 loss. The SonyCSL JEPA study (Riou et al.) and I-JEPA.
- "mse": mean over every element of the squared error.
- "l2": squared Euclidean distance per token (sum over features), mean over tokens; "mse" times dim.
- "norm_mse": 2 - 2·cos(pred, target) per token, i.e. the squared distance of the L2-normalised vectors
  (M2D, MATPAC, the Audio-JEPA code).
- "smooth_l1_token": Riou et al.'s Eq. 3, a smooth L1 *per token* whose threshold applies to the token's L1
  norm: d = 0.5·‖z - z'‖₂² if ‖z - z'‖₁ < β, else ‖z - z'‖₁ - 0.5·β (the paper's β = 1), mean over tokens
  (Eq. 2). For wide tokens ‖z - z'‖₁ is rarely below 1, so it acts as the L1 norm of the error.

Variable-size masks (audiojepa.ops.masking.MaskSet) pad the token axis; `prediction_loss(..., valid=)` then
averages each example over its valid tokens, (1/|T|)·Σ_{j∈T} d_j as Riou et al.'s Eq. 2 and Audio-JEPA's
Eq. 2 write it, and the examples with equal weight. Without padding this is the plain mean over tokens.
"""

import jax
import jax.numpy as jnp

LOSS_TYPES = ("smooth_l1", "mse", "l2", "norm_mse", "smooth_l1_token")
TARGET_NORMS = ("none", "layernorm", "standardize")
NORM_EPS = 1e-6
L2_NORMALIZE_EPS = 1e-12
# Kept under the old name: M2D's module constant.
STANDARDIZE_EPS = NORM_EPS


def standardize_tokens(x: jax.Array) -> jax.Array:
    """Per-token standardisation over the last axis with the unbiased variance: (x - μ) / sqrt(var + 1e-6)."""
    mean = x.mean(axis=-1, keepdims=True)
    var = x.var(axis=-1, ddof=1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + NORM_EPS)


def layernorm_tokens(x: jax.Array) -> jax.Array:
    """LayerNorm without affine over the last axis, biased variance: (x - μ) / sqrt(var + 1e-6)."""
    mean = x.mean(axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + NORM_EPS)


def l2_normalize(x: jax.Array) -> jax.Array:
    """x / max(‖x‖, 1e-12) over the last axis (torch.nn.functional.normalize), written as
    x · rsqrt(max(Σx², 1e-24)) so that an all-zero vector has a finite gradient (1e12 · I, as torch's)
    where the gradient of jnp.linalg.norm at 0 is NaN."""
    squared_norm = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(squared_norm, jnp.asarray(L2_NORMALIZE_EPS ** 2, squared_norm.dtype)))


def normalize_target(target: jax.Array, target_norm: str) -> jax.Array:
    """target [..., dim] normalised per token by `target_norm` (one of TARGET_NORMS)."""
    if target_norm == "none":
        return target
    if target_norm == "layernorm":
        return layernorm_tokens(target)
    if target_norm == "standardize":
        return standardize_tokens(target)
    raise ValueError(f"Unknown target_norm {target_norm!r}; valid: {TARGET_NORMS}.")


def smooth_l1(pred: jax.Array, target: jax.Array, beta: float = 1.0) -> jax.Array:
    """Mean smooth L1 (torch's default β = 1) over every element; β = 0 gives the mean absolute error.

    `beta` must be a Python float: β = 0 takes a separate branch (no 0/0 in the unused half).
    """
    beta = float(beta)
    if beta < 0:
        raise ValueError(f"smooth_l1 beta must be >= 0, got {beta}.")
    diff = jnp.abs(pred - target)
    if beta == 0.0:
        return diff.mean()
    return jnp.where(diff < beta, 0.5 * jnp.square(diff) / beta, diff - 0.5 * beta).mean()


def mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error over every element."""
    return jnp.mean(jnp.square(pred - target))


def l2(pred: jax.Array, target: jax.Array) -> jax.Array:
    """Squared Euclidean distance per token (sum over the last axis), mean over the other axes."""
    return jnp.sum(jnp.square(pred - target), axis=-1).mean()


def norm_mse(pred: jax.Array, target: jax.Array) -> jax.Array:
    """2 - 2·cos(pred, target) per token (last axis), mean over tokens."""
    return (2.0 - 2.0 * jnp.sum(l2_normalize(pred) * l2_normalize(target), axis=-1)).mean()


def smooth_l1_per_token(pred: jax.Array, target: jax.Array, beta: float = 1.0) -> jax.Array:
    """Riou et al.'s Eq. 3 per token: 0.5·‖d‖₂² / β where ‖d‖₁ < β, else ‖d‖₁ - 0.5·β (β = 1 in the paper),
    d = pred - target over the last axis. [..., dim] → [...]."""
    beta = float(beta)
    if beta <= 0:
        raise ValueError(f"smooth_l1_token beta must be > 0, got {beta}.")
    diff = pred - target
    l1 = jnp.sum(jnp.abs(diff), axis=-1)
    return jnp.where(l1 < beta, 0.5 * jnp.sum(jnp.square(diff), axis=-1) / beta, l1 - 0.5 * beta)


def per_token_loss(pred: jax.Array, target: jax.Array, loss_type: str, beta: float = 1.0) -> jax.Array:
    """The loss of each token, [batch, tokens, dim] → [batch, tokens]; its mean over tokens is the loss of
    `loss_type` (per-element losses are averaged over features first)."""
    if loss_type == "smooth_l1":
        beta = float(beta)
        if beta < 0:
            raise ValueError(f"smooth_l1 beta must be >= 0, got {beta}.")
        diff = jnp.abs(pred - target)
        if beta == 0.0:
            return diff.mean(axis=-1)
        return jnp.where(diff < beta, 0.5 * jnp.square(diff) / beta, diff - 0.5 * beta).mean(axis=-1)
    if loss_type == "mse":
        return jnp.mean(jnp.square(pred - target), axis=-1)
    if loss_type == "l2":
        return jnp.sum(jnp.square(pred - target), axis=-1)
    if loss_type == "norm_mse":
        return 2.0 - 2.0 * jnp.sum(l2_normalize(pred) * l2_normalize(target), axis=-1)
    if loss_type == "smooth_l1_token":
        return smooth_l1_per_token(pred, target, beta)
    raise ValueError(f"Unknown loss_type {loss_type!r}; valid: {LOSS_TYPES}.")


def masked_token_mean(token_loss: jax.Array, valid: jax.Array) -> jax.Array:
    """Mean over each example's valid tokens, then over examples: token_loss, valid [batch, tokens] → scalar.
    An example without valid tokens counts 0 (its denominator is clamped to 1)."""
    weights = valid.astype(token_loss.dtype)
    per_example = jnp.sum(token_loss * weights, axis=-1) / jnp.maximum(jnp.sum(weights, axis=-1), 1.0)
    return per_example.mean()


def token_spread(x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """Collapse monitor: per-feature std over all tokens of the L2-normalised x, times sqrt(dim).

    ≈1 when token directions are spread over the sphere, → 0 when they collapse to one vector.
    x: [..., dim] → scalar. valid: None or x.shape[:-1] bool; only valid tokens count.
    """
    unit = l2_normalize(x).reshape(-1, x.shape[-1])
    if valid is None:
        return unit.std(axis=0).mean() * jnp.sqrt(x.shape[-1])
    weights = valid.reshape(-1, 1).astype(unit.dtype)
    count = jnp.maximum(weights.sum(), 1.0)
    mean = jnp.sum(unit * weights, axis=0) / count
    var = jnp.sum(jnp.square(unit - mean) * weights, axis=0) / count
    return jnp.sqrt(var).mean() * jnp.sqrt(x.shape[-1])


def prediction_loss(pred: jax.Array, target: jax.Array, *, loss_type: str = "norm_mse",
                    target_norm: str = "standardize", beta: float = 1.0,
                    norm_target: bool | None = None,
                    valid: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Regression loss of predictions on (normalised) targets, averaged over batch × tokens.

    Args:
        pred: [batch, tokens, dim] predictions.
        target: [batch, tokens, dim] target-encoder outputs (no gradient should flow into them; the caller
            applies stop_gradient).
        loss_type: one of LOSS_TYPES (module docstring).
        target_norm: one of TARGET_NORMS, applied to the target only.
        beta: the smooth_l1 threshold (Python float).
        norm_target: M2D's boolean spelling; when given it overrides target_norm
            (True → "standardize", False → "none").
        valid: None, or [batch, tokens] bool: padding tokens (False) count for nothing; each example is
            averaged over its valid tokens, then the examples (masked_token_mean).

    Returns:
        (scalar float32 loss, metrics {"target_std", "pred_std"}: token_spread of the normalised target
        and of the predictions, without gradient).
    """
    if norm_target is not None:
        target_norm = "standardize" if norm_target else "none"
    pred = pred.astype(jnp.float32)
    target = normalize_target(target.astype(jnp.float32), target_norm)
    if valid is not None:
        loss = masked_token_mean(per_token_loss(pred, target, loss_type, beta), valid)
    elif loss_type == "smooth_l1":
        loss = smooth_l1(pred, target, beta)
    elif loss_type == "mse":
        loss = mse(pred, target)
    elif loss_type == "l2":
        loss = l2(pred, target)
    elif loss_type == "norm_mse":
        loss = norm_mse(pred, target)
    elif loss_type == "smooth_l1_token":
        loss = smooth_l1_per_token(pred, target, beta).mean()
    else:
        raise ValueError(f"Unknown loss_type {loss_type!r}; valid: {LOSS_TYPES}.")
    metrics = {"target_std": token_spread(jax.lax.stop_gradient(target), valid),
               "pred_std": token_spread(jax.lax.stop_gradient(pred), valid)}
    return loss, metrics
