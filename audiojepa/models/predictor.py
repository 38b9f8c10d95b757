"""Predictor: from context-encoder tokens to predictions at target patch positions.

One module serves the M2D/MAE decoder, the SonyCSL JEPA study and MATPAC (`full_grid=True`: every grid
position is in the sequence, mask tokens wherever there is no context token) and I-JEPA-style
predictors (`full_grid=False`: only the context tokens and one mask token per target position).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from audiojepa.models.pos_embed import sincos_2d
from audiojepa.models.vit import (
    TransformerStack,
    check_pos_embed,
    dense,
    sincos_init,
    token_init,
)
from audiojepa.ops.masking import gather_tokens


class Predictor(nn.Module):
    """Dense in → place tokens on the patch grid → + sin-cos positions → TransformerStack → Dense out.

    Params: `embed` (Dense encoder width → width), `mask_token [1, 1, width]`, `stack` (blocks + norm),
    `head` (Dense width → out_dim); with pos_embed="learned" also `pos_embed [1, 1 + L, width]`.

    Attributes:
        grid_size: (F, T') of the patch grid; positions are frequency-major indices f·T' + t < F·T'.
        width, depth, num_heads: predictor sizes; mlp_dim defaults to 4·width.
        out_dim: width of the predictions (the target encoder's width).
        use_cls: the context starts with one CLS token, which is kept at the front of the sequence (its
            position code is zero).
        full_grid: see the module docstring.
        dtype, attention_impl, remat, scan_layers, residual_dtype: as in ViTEncoder.
        pos_embed: "sincos" (fixed table) or "learned" (a trainable table initialised with the sin-cos one,
            CLS row included and added to the CLS token; MATPAC's paper).
    """
    grid_size: tuple[int, int]
    width: int
    depth: int
    num_heads: int
    out_dim: int
    mlp_dim: int | None = None
    use_cls: bool = True
    full_grid: bool = True
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    remat: str = "none"
    scan_layers: bool = True
    pos_embed: str = "sincos"
    residual_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, context_tokens: jax.Array, context_idx: jax.Array, target_idx: jax.Array,
                 context_valid: jax.Array | None = None, target_valid: jax.Array | None = None) -> jax.Array:
        """Predicts the target positions.

        Args:
            context_tokens: [batch, (1 if use_cls) + Kc, encoder width]: context-encoder output, CLS first;
                token 1 + j (or j without CLS) sits at patch position context_idx[:, j].
            context_idx: [batch, Kc] int: patch positions of the context tokens (distinct within a row).
            target_idx: [batch, Kt] int: patch positions to predict. Any positions: with full_grid they
                may be a subset of the non-context positions (the rest still hold mask tokens in the
                sequence); M2D passes all of them.
            context_valid: None, or [batch, Kc] bool: False marks padding entries of a variable-size mask
                (audiojepa.ops.masking.MaskSet); they are not placed on the grid (full_grid) or not attended to.
            target_valid: None, or [batch, Kt] bool: padding queries (False) are not attended to; their
                predictions are meaningless and the loss must drop them.

        Returns:
            [batch, Kt, out_dim] float32, predictions in the order of target_idx.
        """
        num_positions = self.grid_size[0] * self.grid_size[1]
        if check_pos_embed(self.pos_embed) == "learned":
            table = self.param("pos_embed", sincos_init(*self.grid_size, cls_token=True),
                               (1, 1 + num_positions, self.width), jnp.float32)[0]  # [1 + L, width]
        else:
            table = jnp.asarray(sincos_2d(*self.grid_size, self.width, cls_token=True))  # [1 + L, width]
        mask_token = self.param("mask_token", token_init, (1, 1, self.width), jnp.float32)

        x = dense(self.width, self.dtype, "embed")(context_tokens).astype(jnp.float32)
        prefix, context = (x[:, :1], x[:, 1:]) if self.use_cls else (x[:, :0], x)
        if self.pos_embed == "learned":
            prefix = prefix + table[:1][None]  # the CLS row (zero for the fixed table, so skipped there)
        valid = None
        if self.full_grid:
            # Position p holds context token j where context_idx[:, j] == p, else the mask token. Built
            # from a one-hot match and a gather rather than a scatter into a broadcast grid, so every
            # array keeps the batch sharding of the inputs.
            matches = context_idx[:, :, None] == jnp.arange(num_positions)[None, None, :]  # [B, Kc, L]
            if context_valid is not None:
                matches = matches & context_valid[:, :, None]
            placed = gather_tokens(context, jnp.argmax(matches, axis=1))  # [B, L, width]
            grid = jnp.where(jnp.any(matches, axis=1)[:, :, None], placed, mask_token)
            sequence = jnp.concatenate([prefix, grid + table[None, 1:]], axis=1)
        else:
            positions = table[1:]
            context = context + positions[context_idx]
            # Start from an array that carries the batch sharding: gathering the replicated table with
            # batch-sharded indices gives replicated queries, which an Explicit mesh cannot concatenate.
            queries = jnp.zeros_like(context[:, :1]) + mask_token + positions[target_idx]
            sequence = jnp.concatenate([prefix, context, queries], axis=1)
            if context_valid is not None or target_valid is not None:
                def all_valid(tokens):  # [B, N] True, with the batch sharding of `tokens`
                    return jnp.ones_like(tokens[:, :, 0], dtype=bool)
                # `&` with an array of the tokens' sharding: masks drawn from a key are replicated, and an
                # Explicit mesh cannot concatenate them with batch-sharded ones.
                valid = jnp.concatenate([
                    all_valid(prefix),
                    all_valid(context) if context_valid is None else all_valid(context) & context_valid,
                    all_valid(queries) if target_valid is None else all_valid(queries) & target_valid], axis=1)

        stack = TransformerStack(self.depth, self.num_heads, self.mlp_dim or 4 * self.width, self.dtype,
                                 self.attention_impl, self.remat, self.scan_layers, self.residual_dtype,
                                 name="stack")
        x = stack(sequence, valid=valid)[:, prefix.shape[1]:]
        if self.full_grid:
            x = gather_tokens(x, target_idx)
        else:
            x = x[:, context.shape[1]:]
        return dense(self.out_dim, self.dtype, "head")(x).astype(jnp.float32)
