"""EncodecMAE's loss: cross-entropy over frames and target streams, weighted by mask state and by stream.

A *stream* is one sequence of class targets per frame: each of the n_q EnCodec codebooks, and in the
self-training stage the k-means cluster ids. For per-frame, per-stream cross-entropies CE[b, t, s]
and stream weights w_s (γ_q for the codebooks), the reference code (v1 `mae.py:124-144`, v2
`losses/__init__.py:10-43`; shared/reference/encodecmae.md §1.9) computes

    masked  = Σ_{b, t ∈ M, s} w_s·CE[b, t, s] / |M|
    visible = Σ_{b, t ∉ M, s} w_s·CE[b, t, s] / |¬M|
    loss    = δ·masked + (1 − δ)·visible,            δ = MASKED_LOSS_WEIGHT = 0.9

|M| and |¬M| are frame counts over the whole batch (not per example and not times the number of
streams), clamped to ≥ 1 as in v2. So each term is a sum over streams of w_s times the mean CE of that
stream over the frames of the term; with Σ γ_q = 1 it is a γ-weighted average of per-codebook mean CEs.
The terms are linear in the streams, so the loss of several groups of streams (codebooks, k-means) is
the sum of the groups' losses (`weighted_stream_loss` per group).

γ_q: the reference hard-codes them (`REFERENCE_CODEBOOK_WEIGHTS`, v1 `selftrain_8q_weight_by_variance.gin`,
v2 `encodecmae.gin:13`); nothing in its code computes them. `codebook_weights_from_errors` gives the
rule the config name suggests (weights ∝ the variance / quantization error each codebook quantizes),
for other n_q or another codec; it is not needed to reproduce the paper.
"""

import jax
import jax.numpy as jnp
import numpy as np

from audiojepa.models import encodec

MASKED_LOSS_WEIGHT = 0.9  # δ (MASKED_LOSS_WEIGHT in encodecmae.gin)
# γ_1 .. γ_8 of the released models (sum 1.0000000).
REFERENCE_CODEBOOK_WEIGHTS = (0.22407463, 0.1759858, 0.14499009, 0.12150037, 0.10315603, 0.08831368, 0.07608274,
                              0.06589669)
WEIGHT_RULES = ("residual", "error_reduction")


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-element softmax cross-entropy: logits [..., K], int targets [...] in [0, K) → [...] float32 nats."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def weighted_stream_loss(logits: jax.Array, targets: jax.Array, is_masked: jax.Array, stream_weights,
                         masked_weight: float = MASKED_LOSS_WEIGHT) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The reference loss (module docstring) for one group of streams sharing a class count.

    Args:
        logits: [batch, frames, streams, K] (e.g. [B, T, 8, 1024] for the codebooks, [B, T, 1, k] for k-means).
        targets: [batch, frames, streams] int class ids.
        is_masked: [batch, frames] bool, True on masked frames.
        stream_weights: [streams] w_s (γ_q), any sequence or array.
        masked_weight: δ; the visible frames get 1 − δ.

    Returns:
        (loss, terms): loss = δ·masked + (1 − δ)·visible, scalar float32; terms {"masked", "visible"}
        (each Σ_s w_s·mean CE over its frames) and "accuracy_masked" (top-1 accuracy on masked frames,
        averaged over streams, without gradient).
    """
    weights = jnp.asarray(stream_weights, jnp.float32)
    if weights.shape != (logits.shape[2],):
        raise ValueError(f"{weights.shape[0] if weights.ndim == 1 else weights.shape} stream weights for "
                         f"{logits.shape[2]} streams (logits {logits.shape}).")
    per_frame = jnp.sum(cross_entropy(logits, targets) * weights, axis=-1)  # [B, T]: Σ_s w_s·CE
    masked = is_masked.astype(jnp.float32)
    visible = 1.0 - masked
    masked_term = jnp.sum(per_frame * masked) / jnp.maximum(jnp.sum(masked), 1.0)
    visible_term = jnp.sum(per_frame * visible) / jnp.maximum(jnp.sum(visible), 1.0)
    loss = masked_weight * masked_term + (1.0 - masked_weight) * visible_term
    correct = (jnp.argmax(jax.lax.stop_gradient(logits), axis=-1) == targets).astype(jnp.float32).mean(-1)
    accuracy = jnp.sum(correct * masked) / jnp.maximum(jnp.sum(masked), 1.0)
    return loss, {"masked": masked_term, "visible": visible_term, "accuracy_masked": accuracy}


def rvq_quantization_errors(codebooks: jax.Array, embeddings: jax.Array, num_codebooks: int, *,
                            centered: bool = False) -> jax.Array:
    """Mean quantization error of EnCodec's RVQ after 0, 1, ..., n_q stages.

    e_q = mean over frames of ‖r_q‖², where r_0 = the embedding and r_q = r_{q-1} − (codebook-q entry
    chosen for r_{q-1}) is the residual left after q stages (summed over the 128 channels). With
    `centered`, the per-channel mean over frames is removed first, i.e. e_q is the total variance of r_q.

    Args:
        codebooks: [n_total, K, D] (e.g. [32, 1024, 128]).
        embeddings: [..., D] continuous EnCodec frames (any leading shape; all are pooled).
        num_codebooks: n_q (static).
        centered: see above.

    Returns:
        [n_q + 1] float32: e_0 (the embeddings' energy or variance), e_1, ..., e_{n_q}.
    """
    flat = embeddings.reshape(-1, embeddings.shape[-1]).astype(jnp.float32)
    codes, _ = encodec.rvq_encode(codebooks, flat[None], num_codebooks)  # [1, N, n_q]
    chosen = jax.vmap(lambda codebook, idx: codebook[idx], in_axes=(0, -1))(codebooks[:num_codebooks], codes[0])
    residuals = flat[None] - jnp.concatenate([jnp.zeros_like(flat)[None], jnp.cumsum(chosen, axis=0)])
    if centered:
        residuals = residuals - residuals.mean(axis=1, keepdims=True)
    return jnp.mean(jnp.sum(residuals ** 2, axis=-1), axis=1)


def codebook_weights_from_errors(errors, rule: str = "residual") -> np.ndarray:
    """Per-codebook loss weights γ_q from the RVQ's quantization errors, normalised to sum to 1.

    Args:
        errors: [n_q + 1] e_0 .. e_{n_q} (`rvq_quantization_errors`): the error left after q stages.
        rule: "residual": γ_q ∝ e_{q-1}, the variance of the residual that codebook q quantizes (what the
            reference's config name "weight_by_variance" suggests); "error_reduction": γ_q ∝ e_{q-1} − e_q,
            the part of the error that codebook q removes. Both decrease with q; when the errors fall
            geometrically they give the same weights.

    Returns:
        [n_q] float64 weights summing to 1. The reference's values fall by a factor 0.785 → 0.866 per
        codebook, as either rule gives for errors that shrink by roughly that factor per stage.
    """
    errors = np.asarray(errors, np.float64)
    if errors.ndim != 1 or errors.shape[0] < 2:
        raise ValueError(f"errors must be [n_q + 1] with n_q >= 1, got shape {errors.shape}.")
    if rule == "residual":
        raw = errors[:-1]
    elif rule == "error_reduction":
        raw = errors[:-1] - errors[1:]
    else:
        raise ValueError(f"Unknown rule {rule!r}; valid: {WEIGHT_RULES}.")
    if np.any(raw < 0) or not raw.sum() > 0:
        raise ValueError(f"rule {rule!r} needs non-negative raw weights with a positive sum; got {raw} from "
                         f"errors {errors} (errors must not increase from stage to stage).")
    return raw / raw.sum()
