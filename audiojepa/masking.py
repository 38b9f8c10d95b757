"""Patch masks as fixed-length index arrays, and the gather that uses them.

A mask is a pair of int32 index arrays over the patch sequence of length L (frequency-major, index
f·T' + t): `visible_idx [batch, K]` (what the context encoder sees) and `masked_idx [batch, L - K]`.
K depends only on (L, mask_ratio), both Python values, so every shape is static and a jitted step
compiles once however the random draws fall.
"""

import jax
import jax.numpy as jnp


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Number of visible patches K = int(L·(1 - r)), floored in float64 as the reference does.

    The float64 floor matters: 65·(1 - 0.7) = 19.500000000000004 → 19, and 190·(1 - 0.7) → 57.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
    return int(num_patches * (1 - float(mask_ratio)))


def random_unstructured(rng: jax.Array, batch_size: int, num_patches: int,
                        mask_ratio: float) -> tuple[jax.Array, jax.Array]:
    """Unstructured random mask: each example keeps a uniformly random subset of K patches.

    Jittable; batch_size, num_patches and mask_ratio must be Python values (they fix the shapes).

    Args:
        rng: a jax.random key.
        batch_size: B.
        num_patches: L.
        mask_ratio: fraction r of masked patches; K = num_visible(L, r).

    Returns:
        visible_idx: [B, K] int32.
        masked_idx: [B, L - K] int32. Both in shuffle order (the argsort of per-example uniform noise, as
            the reference's ids_shuffle[:, :K] and ids_shuffle[:, K:]); together a permutation of range(L).
    """
    keep = num_visible(num_patches, mask_ratio)
    noise = jax.random.uniform(rng, (batch_size, num_patches))
    ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
    return ids_shuffle[:, :keep], ids_shuffle[:, keep:]


def gather_tokens(x: jax.Array, idx: jax.Array) -> jax.Array:
    """Picks tokens per example: x [B, L, D], idx [B, N] → [B, N, D] with out[b, n] = x[b, idx[b, n]]."""
    return jnp.take_along_axis(x, idx[:, :, None], axis=1)

