"""EncodecMAE's masked autoencoder over EnCodec frames (Pepino et al.), as Flax Linen modules.

Input: continuous EnCodec encoder frames [batch, frames, 128] at 75 Hz (`audiojepa.models.encodec`).
Forward pass (shared/reference/encodecmae.md §1.3, the v1 code):
1. `input_proj` (Dense 128 → D) and the encoder's sinusoidal positions times a learnable scale;
2. the visible frames are gathered with an index array (`visible_idx`) and only they are encoded;
3. `decoder_proj` (Dense D → D) on the encoded visible frames, which are put back on the full time
   axis with a mask token at every masked frame (`insert_mask_tokens`, a gather by an inverse
   permutation: fixed shapes, jittable), the decoder's own scaled positions, and the decoder stack
   over all frames;
4. `head`: n_q classifiers over the codebook entries (one Dense D → n_q·1024, reshaped), and for the
   self-training stage `kmeans_head` (Dense D → number of clusters); both on every frame.

Choices (each a model attribute, defaults = the released models):
- Transformer: `stack_type="residual"` is the reference's ResiDual stack (Xie et al. 2023; §1.7): two
  streams per layer, x0 post-LN and x1 a plain residual sum, output x0 + LN(x1); attention without
  biases and head width D // heads (the large model has 12 heads of 85 channels: Q/K/V are
  1024 → 1020); a ReLU FFN of width 4096 that, with `share_ffn=True`, is one module shared by every
  layer of a stack (the released checkpoints were trained that way; this gives the reference's
  parameter counts, 29.92M / 11.02M for the base encoder / decoder), and with `share_ffn=False` one per
  layer (86.59M / 17.32M: the paper's Table 1 counts, configs/encodecmae.py `recipe=paper`).
  `stack_type="pre_ln"` is the plain pre-LN `audiojepa.models.vit.TransformerStack` (GELU MLP of width
  ff_dim, qkv biases, final LN; needs width % heads == 0), offered as a simpler alternative; it is not what
  the paper trained.
- Mask token: the reference code has none: masked slots are zeros, so a masked frame's decoder input is
  only its scaled position code (§1.5). `learned_mask_token=True` uses a learned [D] vector instead
  (init N(0, 0.02²), vit.token_init), as the paper's §2.2 describes ("a shared embedding learned during
  training"). It is a decoder param: `encode` and `cluster_features` never read it.
- Positions: the reference's interleaved sinusoid (channel 2i = sin(t·ω_i), 2i+1 = cos(t·ω_i),
  ω_i = 10000^(-2i/D)) plus a learnable scalar scale (init 1), one for the encoder and one for the
  decoder (v2; v1 shares one scale). Positions are frame indices from 0: every clip has the same length.
- No padding masks: every clip in a batch has the same number of frames.
- Init: xavier-uniform Linear kernels, zero biases, LayerNorm 1 / 0 (§1.10). LayerNorm eps 1e-5
  (torch's default) in the ResiDual stack.

Layer outputs (`return_layers`): the ResiDual stack returns each layer's x0 (its LN2 output), as the
reference's `get_activations`; the last of them is what the self-training stage clusters (§1.13).

Mixed precision as in `audiojepa.models.vit`: `dtype` is the matmul dtype, params and the residual
streams are float32, logits are returned in float32. `attention_impl` and `remat` (rematerialisation of
each layer of both stacks, `vit.REMAT_POLICIES`) are vit's too.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops.array_api import (
    rearrange,  # the array-API entry: no framework lookup (never imports torch)
)

from audiojepa.models import encoder_layers
from audiojepa.models.pos_embed import sincos_1d
from audiojepa.models.vit import (
    TransformerStack,
    dense_kernel_init,
    dot_product_attention,
    remat_block,
    token_init,
)
from audiojepa.ops.masking import gather_tokens

# Encoder sizes (shared/reference/encodecmae.md §1.2). The decoder has decoder_depth layers of the same
# width and heads. "tiny" is for CPU tests and smoke runs only; "micro" too, a second size for tests of a
# self-training teacher narrower and shallower than its student (the paper's base teacher of the large model).
VARIANTS = {
    "micro": dict(width=32, encoder_depth=1, decoder_depth=1, num_heads=2, ff_dim=64),
    "tiny": dict(width=64, encoder_depth=2, decoder_depth=2, num_heads=2, ff_dim=128),
    "small": dict(width=768, encoder_depth=5, decoder_depth=2, num_heads=12, ff_dim=4096),
    "base": dict(width=768, encoder_depth=10, decoder_depth=2, num_heads=12, ff_dim=4096),
    "large": dict(width=1024, encoder_depth=20, decoder_depth=2, num_heads=12, ff_dim=4096),
}
STACK_TYPES = ("residual", "pre_ln")
LAYERNORM_EPS = 1e-5  # torch.nn.LayerNorm's default, which the reference's ResiDual layers use


def decode_variant(name: str) -> dict[str, int]:
    """Sizes for a variant name: dict(width=, encoder_depth=, decoder_depth=, num_heads=, ff_dim=)."""
    if name not in VARIANTS:
        raise ValueError(f"Unknown EncodecMAE size {name!r}; valid sizes: {sorted(VARIANTS)}.")
    return dict(VARIANTS[name])


def sinusoid_table(length: int, dim: int) -> np.ndarray:
    """The reference's interleaved 1-D sinusoid: [length, dim] float32 with channel 2i = sin(t·ω_i) and
    2i+1 = cos(t·ω_i), ω_i = 10000^(-2i/dim), for frames t = 0 .. length-1 (the frequencies of
    `pos_embed.sincos_1d`, whose [sin | cos] halves are interleaved here)."""
    table = sincos_1d(dim, np.arange(length))  # [length, dim]: sin for i < dim/2, then cos
    return table.reshape(length, 2, dim // 2).transpose(0, 2, 1).reshape(length, dim).astype(np.float32)


def linear(features: int, dtype: Any, use_bias: bool = True, name: str | None = None) -> nn.Dense:
    """Dense with xavier-uniform kernel, zero bias and float32 params (the reference's Linear init)."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                    kernel_init=dense_kernel_init, bias_init=nn.initializers.zeros, name=name)


def _layer_norm(name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=LAYERNORM_EPS, use_fast_variance=False, dtype=jnp.float32,
                        param_dtype=jnp.float32, name=name)


def insert_mask_tokens(visible_tokens: jax.Array, visible_idx: jax.Array, masked_idx: jax.Array,
                       mask_token: jax.Array | float = 0.0) -> jax.Array:
    """Puts the visible tokens back on the full frame axis, with `mask_token` at every masked frame.

    Args:
        visible_tokens: [batch, Kv, D]; row j of example b belongs at frame visible_idx[b, j].
        visible_idx: [batch, Kv] int frame indices.
        masked_idx: [batch, M] int frame indices; together with visible_idx a permutation of range(T),
            T = Kv + M, per example.
        mask_token: a [D] (or broadcastable, e.g. [1, 1, D] or a scalar) value for masked frames.

    Returns:
        [batch, T, D]: out[b, visible_idx[b, j]] = visible_tokens[b, j], out[b, masked_idx[b, m]] = mask_token.
        A gather by the inverse permutation (no scatter), so every array keeps the batch layout.
    """
    num_visible = visible_idx.shape[1]
    order = jnp.concatenate([visible_idx, masked_idx], axis=1)
    restore = jnp.argsort(order, axis=1)  # restore[b, t] = slot of frame t in `order`
    filler = jnp.zeros_like(visible_tokens[:, :1]) + jnp.asarray(mask_token, visible_tokens.dtype)
    source = jnp.concatenate([visible_tokens, filler], axis=1)  # [batch, Kv + 1, D]
    return gather_tokens(source, jnp.minimum(restore, num_visible))


def frame_mask(masked_idx: jax.Array, num_frames: int) -> jax.Array:
    """masked_idx [batch, M] int → [batch, num_frames] bool, True at the masked frames."""
    return jnp.any(masked_idx[:, :, None] == jnp.arange(num_frames)[None, None, :], axis=1)


class ScaledSinusoidalPositions(nn.Module):
    """x + scale · sinusoid_table(frames, D), with a learnable scalar `scale` (init 1.0)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [batch, frames, D] → [batch, frames, D] float32."""
        scale = self.param("scale", nn.initializers.ones, (), jnp.float32)
        table = jnp.asarray(sinusoid_table(x.shape[1], x.shape[2]))
        return x.astype(jnp.float32) + scale * table[None]


class SelfAttention(nn.Module):
    """Multi-head self-attention without biases (the reference's MHA).

    Head width d = D // num_heads and Q/K/V project D → num_heads·d (1020 for D = 1024 and 12 heads),
    the output D ← num_heads·d; scale d^-0.5. Params `query`, `key`, `value`, `out` (kernels only).
    Heads are contiguous channel blocks here; the reference interleaves them (feature d·H + h belongs to
    head h), which matters only when importing its weights.
    """
    num_heads: int
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        """x: [batch, frames, D] → [batch, frames, D]. valid: None, or [batch, frames] bool: False marks padding
        frames, which no frame attends to (vit.dot_product_attention)."""
        width = x.shape[-1]
        head_dim = width // self.num_heads
        if head_dim < 1:
            raise ValueError(f"width {width} is smaller than num_heads {self.num_heads}.")
        inner = self.num_heads * head_dim

        def heads(name):  # contiguous heads: channel h·head_dim + d is head h's channel d
            return rearrange(linear(inner, self.dtype, False, name)(x), "b n (h d) -> b n h d", h=self.num_heads)

        out = dot_product_attention(heads("query"), heads("key"), heads("value"), head_dim ** -0.5,
                                    self.attention_impl, valid)
        return linear(width, self.dtype, False, "out")(rearrange(out, "b n h d -> b n (h d)"))


class FeedForward(nn.Module):
    """Dense(ff_dim) → ReLU → Dense(D), with biases (params `fc1`, `fc2`)."""
    ff_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [batch, frames, D] → [batch, frames, D]."""
        y = jax.nn.relu(linear(self.ff_dim, self.dtype, name="fc1")(x))
        return linear(x.shape[-1], self.dtype, name="fc2")(y)


class ResiDualLayer(nn.Module):
    """One ResiDual layer on the two streams (x0, x1):

        a = attn(x0);  x0 = norm1(x0 + a);  x1 = x1 + a
        f = ffn(x0);   x0 = norm2(x0 + f);  x1 = x1 + f

    `ffn` is the stack's shared FeedForward when given, else the layer's own (`ffn` param).
    """
    num_heads: int
    ff_dim: int
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x0: jax.Array, x1: jax.Array, ffn: nn.Module | None = None,
                 valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """x0, x1: [batch, frames, D] float32 → the updated (x0, x1); valid: as SelfAttention's."""
        a = SelfAttention(self.num_heads, self.dtype, self.attention_impl, name="attn")(x0, valid).astype(jnp.float32)
        x0, x1 = _layer_norm("norm1")(x0 + a), x1 + a
        if ffn is None:
            ffn = FeedForward(self.ff_dim, self.dtype, name="ffn")
        f = ffn(x0).astype(jnp.float32)
        return _layer_norm("norm2")(x0 + f), x1 + f


class ResiDualStack(nn.Module):
    """`depth` ResiDual layers (`layers_{i}`), one FeedForward `ffn` shared by all of them when
    `share_ffn` (else one per layer, `layers_{i}/ffn`), and `final_norm`. Both streams start at x;
    the output is x0 + final_norm(x1). `remat` rematerialises each layer (vit.REMAT_POLICIES).
    """
    depth: int
    num_heads: int
    ff_dim: int
    share_ffn: bool = True
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    remat: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array, return_layers: bool = False, valid: jax.Array | None = None):
        """x: [batch, frames, D]; valid: None, or [batch, frames] bool, False for padding frames (never attended to;
        their outputs are meaningless).

        Returns:
            [batch, frames, D] float32; with return_layers also [depth, batch, frames, D]: every
            layer's x0 (its norm2 output), as the reference's per-layer activations.
        """
        x0 = x1 = x.astype(jnp.float32)
        shared_ffn = FeedForward(self.ff_dim, self.dtype, name="ffn") if self.share_ffn else None
        layer = remat_block(ResiDualLayer, self.remat)
        layers = []
        for i in range(self.depth):
            x0, x1 = layer(self.num_heads, self.ff_dim, self.dtype, self.attention_impl,
                           name=f"layers_{i}")(x0, x1, shared_ffn, valid)
            layers.append(x0)
        out = x0 + _layer_norm("final_norm")(x1)
        if return_layers:
            return out, jnp.stack(layers)
        return out


def make_stack(stack_type: str, depth: int, num_heads: int, ff_dim: int, share_ffn: bool, dtype: Any,
               attention_impl: str | None, remat: str = "none", scan_layers: bool = True,
               residual_dtype: Any = jnp.float32) -> nn.Module:
    """A ResiDualStack ("residual"; always unrolled; float32 residual streams only) or a vit.TransformerStack
    ("pre_ln"; share_ffn must be False there; scanned unless scan_layers is False)."""
    if stack_type == "residual":
        if jnp.dtype(residual_dtype) != jnp.float32:
            raise ValueError(f"config.model.residual_dtype={jnp.dtype(residual_dtype).name!r} needs "
                             f"config.model.stack_type='pre_ln'; the ResiDual stack keeps float32 streams.")
        return ResiDualStack(depth, num_heads, ff_dim, share_ffn, dtype, attention_impl, remat)
    if stack_type == "pre_ln":
        if share_ffn:
            raise ValueError("share_ffn=True needs stack_type='residual'; the pre-LN stack has one MLP per block.")
        return TransformerStack(depth, num_heads, ff_dim, dtype, attention_impl, remat, scan_layers, residual_dtype)
    raise ValueError(f"Unknown stack_type {stack_type!r}; valid: {STACK_TYPES}.")


class EncodecMAEModel(nn.Module):
    """The masked autoencoder (module docstring). Applied as a pure function of params.

    Params: `input_proj` (Dense 128 → D), `encoder_positions/scale`, `encoder` (stack),
    `decoder_proj` (Dense D → D), [`mask_token` [D] with learned_mask_token], `decoder_positions/scale`,
    `decoder` (stack), [`head` (Dense D → num_codebooks·codebook_size) when num_codebooks > 0],
    [`kmeans_head` (Dense D → num_clusters) when num_clusters > 0].

    Attributes:
        width, encoder_depth, decoder_depth, num_heads, ff_dim: sizes (VARIANTS).
        num_codebooks: n_q classifiers in `head` (0: no head, the k-means-only self-training stage).
        codebook_size: classes per codebook (1024).
        num_clusters: classes of `kmeans_head` (0: none, stage 1).
        stack_type: "residual" or "pre_ln" (module docstring).
        share_ffn: one FFN per stack (ResiDual only).
        learned_mask_token: a learned mask token instead of zeros.
        dtype: compute dtype; params float32.
        attention_impl: passed to jax.nn.dot_product_attention.
        remat: rematerialisation of the encoder and decoder layers (vit.REMAT_POLICIES).
        scan_layers: run a "pre_ln" stack as one scan over its layers (vit.TransformerStack).
        residual_dtype: a "pre_ln" stack's residual stream dtype (vit.TransformerStack).
    """
    width: int
    encoder_depth: int
    decoder_depth: int
    num_heads: int
    ff_dim: int
    num_codebooks: int = 8
    codebook_size: int = 1024
    num_clusters: int = 0
    stack_type: str = "residual"
    share_ffn: bool = True
    learned_mask_token: bool = False
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    remat: str = "none"
    scan_layers: bool = True
    residual_dtype: Any = jnp.float32

    def setup(self):
        stack_args = (self.num_heads, self.ff_dim, self.share_ffn, self.dtype, self.attention_impl, self.remat,
                      self.scan_layers, self.residual_dtype)
        self.input_proj = linear(self.width, self.dtype)
        self.encoder_positions = ScaledSinusoidalPositions()
        self.encoder = make_stack(self.stack_type, self.encoder_depth, *stack_args)
        self.decoder_proj = linear(self.width, self.dtype)
        if self.learned_mask_token and (self.is_initializing() or self.has_variable("params", "mask_token")):
            # Only the decoder reads it: an encoder-only tree (an exported encoder, a self-training teacher)
            # applies `encode` / `cluster_features` without it.
            self.mask_token = self.param("mask_token", token_init, (self.width,), jnp.float32)
        self.decoder_positions = ScaledSinusoidalPositions()
        self.decoder = make_stack(self.stack_type, self.decoder_depth, *stack_args)
        if self.num_codebooks:
            self.head = linear(self.num_codebooks * self.codebook_size, self.dtype)
        if self.num_clusters:
            self.kmeans_head = linear(self.num_clusters, self.dtype)

    def embed(self, features: jax.Array) -> jax.Array:
        """features: [batch, frames, 128] EnCodec frames → [batch, frames, D] float32 with positions."""
        return self.encoder_positions(self.input_proj(features).astype(jnp.float32))

    def encode_tokens(self, tokens: jax.Array, return_layers: bool = False, valid: jax.Array | None = None):
        """tokens: [batch, N, D] (embedded frames, any subset) → [batch, N, D] float32 encoder output;
        with return_layers also [depth, batch, N, D] (see ResiDualStack / TransformerStack). valid: None, or
        [batch, N] bool, False for padding frames (never attended to)."""
        return self.encoder(tokens, return_layers, valid)

    def encode(self, features: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        """All frames, no masking: features [batch, frames, 128] → [batch, frames, D] (the final encoder
        output, what the reference's feature extraction returns for layer -1). valid: as encode_tokens'."""
        return self.encode_tokens(self.embed(features), valid=valid)

    def encode_layers(self, features: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        """All frames, no masking: features [batch, frames, 128] → [encoder_depth, batch, frames, D], every
        layer's output with the last one replaced by `encode`'s (ResiDual: each layer's x0; the reference v2's
        activations with postnorm_last_activation; audiojepa.models.encoder_layers)."""
        return encoder_layers.runtime_layers(*self.encode_tokens(self.embed(features), return_layers=True,
                                                                 valid=valid))

    def cluster_features(self, features: jax.Array) -> jax.Array:
        """What the self-training stage clusters (§1.13): features [batch, frames, 128] → [batch, frames, D],
        all frames, no masking. ResiDual: the last layer's x0 (its norm2 output, not x0 + LN(x1)); pre-LN:
        the final (normed) output, the nearest equivalent."""
        tokens = self.embed(features)
        if self.stack_type == "residual":
            return self.encode_tokens(tokens, return_layers=True)[1][-1]
        return self.encode_tokens(tokens)

    def decode(self, encoded_visible: jax.Array, visible_idx: jax.Array, masked_idx: jax.Array) -> jax.Array:
        """Encoded visible frames [batch, Kv, D] → decoder output on all T = Kv + M frames [batch, T, D]."""
        x = self.decoder_proj(encoded_visible).astype(jnp.float32)
        if self.learned_mask_token and not self.has_variable("params", "mask_token"):
            raise ValueError("learned_mask_token=True (config.model.learned_mask_token) but the params have no "
                             "'mask_token': they hold an encoder only, or come from a zero-mask-token run.")
        mask_token = self.mask_token if self.learned_mask_token else 0.0
        x = insert_mask_tokens(x, visible_idx, masked_idx, mask_token)
        return self.decoder(self.decoder_positions(x))

    def predict(self, decoded: jax.Array) -> dict[str, jax.Array]:
        """decoded [batch, T, D] → {"codes": [batch, T, n_q, codebook_size], "kmeans": [batch, T, num_clusters]}
        float32 logits (each key only when its head exists)."""
        out = {}
        if self.num_codebooks:
            logits = self.head(decoded).astype(jnp.float32)
            out["codes"] = rearrange(logits, "b t (q c) -> b t q c", q=self.num_codebooks)
        if self.num_clusters:
            out["kmeans"] = self.kmeans_head(decoded).astype(jnp.float32)
        return out

    def __call__(self, features: jax.Array, visible_idx: jax.Array, masked_idx: jax.Array) -> dict[str, jax.Array]:
        """Training forward pass.

        Args:
            features: [batch, T, 128] EnCodec frames.
            visible_idx: [batch, Kv] int frames the encoder sees.
            masked_idx: [batch, M] int masked frames (Kv + M = T, together a permutation of range(T)).

        Returns:
            `predict`'s logits on all T frames, plus "encoded": [batch, Kv, D] encoder output.
        """
        encoded = self.encode_tokens(gather_tokens(self.embed(features), visible_idx))
        return {**self.predict(self.decode(encoded, visible_idx, masked_idx)), "encoded": encoded}
