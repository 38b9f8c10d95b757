"""ViT pieces for log-mel spectrograms: size table, patch embedding, transformer blocks, encoder.

Flax Linen modules, applied as pure functions of their params. Parameter names mirror the official
M2D/timm PyTorch names (`patch_embed/proj`, `blocks/{norm1,attn/qkv,attn/proj,norm2,mlp/fc1,mlp/fc2}`,
`norm`, `cls_token`) so that `audiojepa.convert` is a table of renames and transposes; the transformer
blocks' params are stored stacked (`blocks/...` leaves [depth, ...], TransformerStack).

Mixed precision: `dtype` is the compute dtype of the matmuls, convolutions and attention; parameters
are always float32. LayerNorm statistics and the attention softmax stay float32, and so does the residual
stream unless `residual_dtype` says otherwise, so a bfloat16 model returns float32 activations that are
close to the float32 model's.

Performance options (`config.model`; they change speed and memory, never the param tree):
    dtype: "float32" | "bfloat16" compute dtype (above).
    attention_impl: None or "xla" (XLA's attention, any backend) | "cudnn" (cuDNN's fused kernel; an
        NVIDIA GPU and dtype "bfloat16" only).
    remat: what the backward pass keeps of each transformer block (REMAT_POLICIES).
    scan_layers: True (default) runs each pre-LN TransformerStack as one lax.scan over its blocks;
        False unrolls them (TransformerStack).
    residual_dtype: "float32" (default) | "bfloat16": the dtype of the residual stream between and inside
        the blocks of a TransformerStack (the sum x + attn(...), x + mlp(...)), and so of its gradient in the
        backward pass. "bfloat16" (with dtype "bfloat16" only) halves the bytes of the float32 elementwise
        work that dominates a bfloat16 step once the matmuls are fast (BENCHMARKS.md, H200 profile); the
        stack's input is rounded to bfloat16 and its output normed in float32. It changes the numbers
        (each residual add rounds to 8 bits of mantissa), not the params.
`performance_options(config.model)` checks them and gives the keyword arguments of the modules.
"""

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from einops.array_api import (
    rearrange,  # the array-API entry: no framework lookup (never imports torch)
)
from ml_collections import config_dict

from audiojepa.models.pos_embed import sincos_2d

# width, depth, heads, MLP hidden width. "tiny" has the geometry of the M2D parity fixture
# (shared/fixtures/m2d), so the smallest model is exactly the one the fixtures pin down; it is also
# what CPU tests and `runlocal` training use.
VARIANTS = {
    "tiny": dict(width=192, depth=2, num_heads=3, mlp_dim=768),
    "S": dict(width=384, depth=12, num_heads=6, mlp_dim=1536),
    "B": dict(width=768, depth=12, num_heads=12, mlp_dim=3072),
    "L": dict(width=1024, depth=24, num_heads=16, mlp_dim=4096),
}

LAYERNORM_EPS = 1e-6
TOKEN_INIT_STD = 0.02

dense_kernel_init = nn.initializers.xavier_uniform()
token_init = nn.initializers.normal(stddev=TOKEN_INIT_STD)
# Name of a TransformerStack's stacked block params (every leaf [depth, ...]).
STACKED_BLOCKS = "blocks"


def decode_variant(name: str) -> dict[str, int]:
    """Encoder size for a variant name: dict(width=, depth=, num_heads=, mlp_dim=)."""
    if name not in VARIANTS:
        raise ValueError(f"Unknown model variant {name!r}; valid variants: {sorted(VARIANTS)}.")
    return dict(VARIANTS[name])


SIZE_KEYS = ("width", "depth", "num_heads", "mlp_dim")
HEAD_DIM = 64  # every named variant's width / num_heads, the default heads of an overridden width


def size_override_keys() -> dict:
    """The config keys of SIZE_KEYS, unset (None: the variant's), typed so that `--config.model.width=384` parses."""
    return {key: config_dict.placeholder(int) for key in SIZE_KEYS}


def model_size(model_config) -> dict[str, int]:
    """The encoder size of a model config: `variant`'s sizes, each overridden by `config.model.<key>` for the
    keys of SIZE_KEYS that are set (not None; configs from before the keys have none). A width set without
    num_heads / mlp_dim gets width / 64 heads and a 4·width MLP, as every named variant has.

    Raises:
        ValueError naming the config key: a size that is not a positive integer, a width that the heads do not
        divide, or a width that is not a multiple of 64 without num_heads.
    """
    size = decode_variant(model_config.variant)
    overrides = {key: model_config.get(key) for key in SIZE_KEYS if model_config.get(key) is not None}
    for key, value in overrides.items():
        if isinstance(value, bool) or int(value) != value or value <= 0:
            raise ValueError(f"config.model.{key}={value!r}: a positive integer (or None for the variant's).")
    overrides = {key: int(value) for key, value in overrides.items()}
    if "width" in overrides:
        width = overrides["width"]
        if "num_heads" not in overrides and width % HEAD_DIM:
            raise ValueError(f"config.model.width={width} is not a multiple of {HEAD_DIM}: set config.model.num_heads.")
        size.update(num_heads=width // HEAD_DIM, mlp_dim=4 * width)
    size.update(overrides)
    if size["width"] % size["num_heads"]:
        raise ValueError(f"config.model.num_heads={size['num_heads']} does not divide the width {size['width']} "
                         f"(config.model.width / variant {model_config.variant!r}).")
    return size


# config.model.remat: rematerialisation of every transformer block (encoders, predictors, EncodecMAE's
# stacks). Same params and the same values whatever the choice; only memory and compute change.
#   "none":  the backward pass keeps every activation it needs (fastest, most memory).
#   "block": it keeps each block's input only and recomputes the block (least memory, about one
#            more forward pass of the blocks).
#   "dots":  it keeps the outputs of matmuls without batch dimensions (the Dense layers: qkv, proj,
#            MLP) and recomputes the rest (norms, attention logits and softmax, GELU).
REMAT_POLICIES = {
    "none": None,
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
# config.model.attention_impl: the `implementation` of jax.nn.dot_product_attention (None = "xla").
ATTENTION_IMPLS = (None, "xla", "cudnn")
GPU_PLATFORMS = ("gpu", "cuda")


def as_dtype(name: Any) -> jnp.dtype:
    """'float32' / 'bfloat16' (or a dtype) → a jnp dtype, with an error naming the valid choices."""
    valid = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
    if isinstance(name, str):
        if name not in valid:
            raise ValueError(f"Unknown dtype {name!r}; valid: {sorted(valid)}.")
        return jnp.dtype(valid[name])
    return jnp.dtype(name)


def check_remat(remat: str) -> str:
    if remat not in REMAT_POLICIES:
        raise ValueError(f"config.model.remat={remat!r}; valid: {tuple(REMAT_POLICIES)}.")
    return remat


def remat_block(block_cls: type[nn.Module], remat: str) -> type[nn.Module]:
    """block_cls, or block_cls wrapped in nn.remat with config.model.remat's policy (REMAT_POLICIES).

    The wrapped class creates the same params under the same names.
    """
    if check_remat(remat) == "none":
        return block_cls
    return nn.remat(block_cls, policy=REMAT_POLICIES[remat])


def performance_options(model_config) -> dict[str, Any]:
    """config.model's dtype, attention_impl, remat, scan_layers and residual_dtype, checked, as module
    keyword arguments dict(dtype=jnp dtype, attention_impl=, remat=, scan_layers=, residual_dtype=jnp dtype).
    Missing keys (configs written before they existed) take the defaults "float32", None, "none", True and
    "float32"."""
    name = model_config.get("dtype", "float32")
    try:
        dtype = as_dtype(name)
    except ValueError:
        raise ValueError(f"config.model.dtype={name!r}; valid: 'float32', 'bfloat16'.") from None
    attention_impl = model_config.get("attention_impl", None)
    if attention_impl not in ATTENTION_IMPLS:
        raise ValueError(f"config.model.attention_impl={attention_impl!r}; valid: {ATTENTION_IMPLS}.")
    if attention_impl == "cudnn" and dtype != jnp.bfloat16:
        raise ValueError(f"config.model.attention_impl='cudnn' needs config.model.dtype='bfloat16' (cuDNN's fused "
                         f"attention takes 16-bit inputs); got dtype={name!r}.")
    scan_layers = model_config.get("scan_layers", True)
    if not isinstance(scan_layers, bool):
        raise ValueError(f"config.model.scan_layers={scan_layers!r}; valid: True, False.")
    residual_name = model_config.get("residual_dtype", "float32")
    try:
        residual_dtype = as_dtype(residual_name)
    except ValueError:
        raise ValueError(f"config.model.residual_dtype={residual_name!r}; valid: 'float32', 'bfloat16'.") from None
    if residual_dtype != jnp.float32 and residual_dtype != dtype:
        raise ValueError(f"config.model.residual_dtype={residual_name!r} needs config.model.dtype={residual_name!r} "
                         f"(a residual stream narrower than the compute dtype); got dtype={name!r}.")
    return dict(dtype=dtype, attention_impl=attention_impl, remat=check_remat(model_config.get("remat", "none")),
                scan_layers=scan_layers, residual_dtype=residual_dtype)


# cuDNN's fused attention refuses odd token counts when training (JAX 0.11.2, H200: "Unsupported sequence
# length Q 191, KV 191"); its kernels tile tokens by 64, so the cudnn path pads to this multiple.
CUDNN_TOKEN_MULTIPLE = 64


def dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, scale: float,
                          implementation: str | None, valid: jax.Array | None = None) -> jax.Array:
    """jax.nn.dot_product_attention of [batch, tokens, heads, head_dim] arrays (no bias).

    valid: None, or [batch, tokens] bool: False marks padding tokens, which no query attends to (a key
        mask); their own outputs are computed but meaningless, and callers drop them. Every row needs at
        least one valid token.
    "cudnn" off a GPU fails here, naming the config key, rather than deep inside JAX. On a GPU it pads the
    tokens to a multiple of CUDNN_TOKEN_MULTIPLE (padded_dot_product_attention).
    """
    if implementation == "cudnn":
        if jax.default_backend() not in GPU_PLATFORMS:
            raise ValueError(f"config.model.attention_impl='cudnn' needs an NVIDIA GPU with cuDNN; this JAX backend "
                             f"is {jax.default_backend()!r}. Use attention_impl=None (XLA) here.")
        return padded_dot_product_attention(query, key, value, scale, implementation, valid, CUDNN_TOKEN_MULTIPLE,
                                            per_shard=True)
    mask = None if valid is None else valid[:, None, None, :]  # [batch, 1 (heads), 1 (queries), keys]
    return jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale, implementation=implementation)


def padded_dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array, scale: float,
                                 implementation: str | None, valid: jax.Array | None, multiple: int,
                                 per_shard: bool = False) -> jax.Array:
    """dot_product_attention with the tokens zero-padded to a multiple of `multiple` and the padding masked
    out of the keys (by sequence lengths when `valid` is None, cuDNN's padding mask, else by the padded
    `valid` as a [batch, 1, queries, keys] mask, the one bias shape cuDNN takes); the padded queries'
    outputs are dropped. Same [batch, tokens, heads, head_dim] result.

    per_shard: under a mesh whose batch axis is sharded in the arrays' types (the trainer's Explicit `data`
    mesh), run the attention inside a shard_map over the batch: JAX 0.11.2's cuDNN attention loses the
    sharding of its cotangents otherwise. Attention is per example, so the result is the same.
    """
    if per_shard:
        batch_spec = jax.typeof(query).sharding.spec[0] if jax.typeof(query).sharding is not None else None
        mesh = jax.sharding.get_abstract_mesh()
        if batch_spec is not None and not mesh.empty:
            spec = jax.sharding.PartitionSpec(batch_spec)
            local = lambda q, k, v, valid: padded_dot_product_attention(q, k, v, scale, implementation, valid,
                                                                        multiple)
            return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, None if valid is None else spec),
                                 out_specs=spec)(query, key, value, valid)
    batch, tokens = query.shape[:2]
    padded = -(-tokens // multiple) * multiple
    if padded == tokens and valid is None:
        return jax.nn.dot_product_attention(query, key, value, scale=scale, implementation=implementation)
    pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - tokens), (0, 0), (0, 0)))
    query, key, value = pad(query), pad(key), pad(value)
    if valid is None:
        lengths = jnp.full((batch,), tokens, jnp.int32)
        out = jax.nn.dot_product_attention(query, key, value, scale=scale, implementation=implementation,
                                           query_seq_lengths=lengths, key_value_seq_lengths=lengths)
    else:
        keys = jnp.pad(valid, ((0, 0), (0, padded - tokens)))
        mask = jnp.broadcast_to(keys[:, None, None, :], (batch, 1, padded, padded))
        out = jax.nn.dot_product_attention(query, key, value, mask=mask, scale=scale, implementation=implementation)
    return out[:, :tokens]


POS_EMBEDS = ("sincos", "learned")


def check_pos_embed(pos_embed: str) -> str:
    if pos_embed not in POS_EMBEDS:
        raise ValueError(f"config.model.pos_embed={pos_embed!r}; valid: {POS_EMBEDS}.")
    return pos_embed


def sincos_init(grid_f: int, grid_t: int, cls_token: bool = False):
    """Param initialiser of a learned position table [1, (1 +) F·T', width]: the fixed sin-cos table (zeros in
    the CLS slot with cls_token), so a learned table starts where the fixed one stays."""
    def init(key, shape, dtype=jnp.float32):
        del key
        return jnp.asarray(sincos_2d(grid_f, grid_t, shape[-1], cls_token=cls_token), dtype).reshape(shape)
    return init


def learned_table_for_grid(table: jax.Array, train_grid: tuple[int, int], grid: tuple[int, int]) -> jax.Array:
    """The [F·T', width] rows of a learned table [F0·T0', width] (training grid (F0, T0')) for an input grid
    (F, T') <= (F0, T0'): its top-left part, frequency-major. A larger grid is an error."""
    (train_f, train_t), (grid_f, grid_t) = train_grid, grid
    if grid_f > train_f or grid_t > train_t:
        raise ValueError(f"input patch grid {grid} exceeds the learned position table's training grid {train_grid} "
                         "(config.model.pos_embed='learned'); embed longer inputs in chunks of the training width.")
    grid = rearrange(table, "(f t) d -> f t d", f=train_f, t=train_t)[:grid_f, :grid_t]
    return rearrange(grid, "f t d -> (f t) d")


def grid_size(input_shape: tuple[int, int], patch_size: tuple[int, int]) -> tuple[int, int]:
    """Patch grid (F, T') of an [n_mels, frames] input; remainders are dropped, as a strided conv does."""
    return input_shape[0] // patch_size[0], input_shape[1] // patch_size[1]


def checked_grid_size(input_shape: tuple[int, int], patch_size: tuple[int, int]) -> tuple[int, int]:
    """grid_size for a training input, which must be whole patches (a method's start-up check)."""
    if any(n % p for n, p in zip(input_shape, patch_size)):
        raise ValueError(f"input_shape {tuple(input_shape)} (n_mels, frames) is not a multiple of "
                         f"config.model.patch_size {tuple(patch_size)}.")
    return grid_size(input_shape, patch_size)


def _torch_default_bias_init(fan_in: int):
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)): PyTorch's default conv bias, which the official M2D keeps."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _layer_norm(name: str) -> nn.LayerNorm:
    # Two-pass variance, as torch computes it; float32 output whatever the compute dtype.
    return nn.LayerNorm(epsilon=LAYERNORM_EPS, use_fast_variance=False, dtype=jnp.float32,
                        param_dtype=jnp.float32, name=name)


def dense(features: int, dtype: Any, name: str) -> nn.Dense:
    """Dense with the official Linear init (xavier-uniform kernel, zero bias) and float32 params."""
    return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, kernel_init=dense_kernel_init,
                    bias_init=nn.initializers.zeros, name=name)


class PatchProjection(nn.Module):
    """The linear map of each patch to `width`, with the params of a stride-`patch_size` Conv
    (`kernel [pf, pt, 1, D]`, `bias [D]`, the official layout), computed as one matmul over the
    patches: as a conv, cuDNN's strided kernels took ~2.5 ms of a 105 ms M2D ViT-B bfloat16 step on an
    H200 (the backward filter ran at 47 GFLOP/s; BENCHMARKS.md).
    """
    width: int
    patch_size: tuple[int, int]
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, lms: jax.Array) -> jax.Array:
        """lms: [batch, n_mels, frames] → [batch, F, T', width] (frames past the last whole patch dropped)."""
        patch_f, patch_t = self.patch_size
        # Xavier on the [width, patch_f·patch_t] view of the kernel, as the official code does.
        kernel = self.param("kernel", nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3),
                            (patch_f, patch_t, 1, self.width), jnp.float32)
        bias = self.param("bias", _torch_default_bias_init(patch_f * patch_t), (self.width,), jnp.float32)
        grid_f, grid_t = lms.shape[1] // patch_f, lms.shape[2] // patch_t
        x = lms[:, :grid_f * patch_f, :grid_t * patch_t]
        # One axis split per reshape (so no einops "b (f i) (t j) -> b f i t j", which is one reshape): under an
        # Explicit mesh JAX refuses to split two axes in one reshape.
        x = x.reshape(x.shape[0], grid_f, patch_f, grid_t * patch_t)
        x = x.reshape(x.shape[0], grid_f, patch_f, grid_t, patch_t)
        # [batch, F, pf, T', pt] · [pf, pt, D] → [batch, F, T', D], contracting each patch's bins and frames.
        out = jnp.einsum("bfitj,ijd->bftd", x.astype(self.dtype), kernel[:, :, 0].astype(self.dtype),
                         preferred_element_type=jnp.float32)
        return (out + bias).astype(self.dtype)


class PatchEmbed(nn.Module):
    """Non-overlapping patches of a log-mel, projected to `width`.

    Attributes:
        width: output channels D.
        patch_size: (frequency bins, frames) per patch.
        dtype: compute dtype.
    """
    width: int
    patch_size: tuple[int, int] = (16, 16)
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, lms: jax.Array) -> jax.Array:
        """lms: [batch, n_mels, frames] → [batch, F·T', width], frequency-major (token f·T' + t)."""
        x = PatchProjection(self.width, tuple(self.patch_size), self.dtype, name="proj")(lms)
        return rearrange(x, "b f t d -> b (f t) d")


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection (kernel [D, 3D], columns [q | k | v],
    each heads-major, i.e. the transpose of torch's qkv.weight).

    Uses `jax.nn.dot_product_attention`: its XLA path accumulates the logits and runs the softmax in
    float32 for bfloat16 inputs, and `attention_impl="cudnn"` switches a GPU run to the fused kernel
    without touching the params.
    """
    num_heads: int
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        """x: [batch, tokens, width] → [batch, tokens, width]; valid: None or [batch, tokens] bool, the tokens
        that may be attended to (padding is False; see dot_product_attention)."""
        width = x.shape[-1]
        if width % self.num_heads:
            raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}.")
        head_dim = width // self.num_heads
        qkv = rearrange(dense(3 * width, self.dtype, "qkv")(x), "b n (three h d) -> b n three h d", three=3,
                        h=self.num_heads)
        query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        out = dot_product_attention(query, key, value, head_dim ** -0.5, self.attention_impl, valid)
        return dense(width, self.dtype, "proj")(rearrange(out, "b n h d -> b n (h d)"))


class Mlp(nn.Module):
    """fc1 → exact (erf) GELU → fc2."""
    hidden_dim: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        width = x.shape[-1]
        x = dense(self.hidden_dim, self.dtype, "fc1")(x)
        x = jax.nn.gelu(x, approximate=False)
        return dense(width, self.dtype, "fc2")(x)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)). No dropout."""
    num_heads: int
    mlp_dim: int
    dtype: Any = jnp.float32
    attention_impl: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        """x: [batch, tokens, width] → same shape, in x's dtype (the residual stream keeps its precision).
        valid: None or [batch, tokens] bool; padding tokens (False) are never attended to."""
        x = x + Attention(self.num_heads, self.dtype, self.attention_impl, name="attn")(_layer_norm("norm1")(x), valid)
        return x + Mlp(self.mlp_dim, self.dtype, name="mlp")(_layer_norm("norm2")(x))


class TransformerStack(nn.Module):
    """`depth` pre-LN blocks and a final LayerNorm (`norm`).

    Params: `blocks`, the `depth` blocks' params stacked: the tree of one Block
    (`{norm1, attn/qkv, attn/proj, norm2, mlp/fc1, mlp/fc2}`) with a leading [depth] axis on every leaf
    (e.g. `blocks/attn/qkv/kernel [depth, width, 3·width]`), and `norm`. `stack_blocks`/`unstack_blocks`
    convert to and from the per-block `blocks_0` … `blocks_{depth-1}` trees. The width is the input's
    last dimension. `remat` rematerialises each block (REMAT_POLICIES).

    `scan_layers` (default) runs the blocks as one `jax.lax.scan` over the stacked params: XLA compiles
    one block instead of `depth`, and the backward pass materialises the residual-stream gradient
    between blocks. Unrolled, XLA:CPU fuses that gradient's running sum into every block's weight-gradient
    inputs, recomputing the chain of all later blocks each time (quadratic in depth; unrolled, a ViT-B M2D
    step on CPU is ~9% slower, tools/bench_pair.py and BENCHMARKS.md). False unrolls the Python loop
    over slices of the same params (the same values up to float rounding). Storing the params stacked,
    rather than stacking per-block trees in every step, saves a copy of every block param (and of its
    gradient) per step.

    `residual_dtype` (module docstring): the input is cast to it, so every block adds in it; the final norm
    and the returned layers are float32.
    """
    depth: int
    num_heads: int
    mlp_dim: int
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    remat: str = "none"
    scan_layers: bool = True
    residual_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, return_layers: bool = False, valid: jax.Array | None = None):
        """x: [batch, tokens, width]; valid: None (every token is content) or [batch, tokens] bool, False for
        padding: padding tokens are never attended to, so they change no valid token's output (theirs are
        meaningless and must be dropped by the caller).

        Returns:
            [batch, tokens, width] float32 after the final norm; with return_layers, also
            [depth, batch, tokens, width]: every block's output before the final norm. (The official
            runtime's `return_layers` list is these with the last entry replaced by the normed output.)
        """
        block = Block(self.num_heads, self.mlp_dim, self.dtype, self.attention_impl, parent=None)
        width = x.shape[-1]

        def init_blocks(rng: jax.Array) -> dict:
            def init_one(key):
                return block.init(key, jnp.zeros((1, 1, width), jnp.float32))["params"]
            return jax.vmap(init_one)(jax.random.split(rng, self.depth))

        blocks = self.param(STACKED_BLOCKS, init_blocks)

        def body(h, block_params):
            h = block.apply({"params": block_params}, h, valid)
            return h, (h if return_layers else None)

        if check_remat(self.remat) != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat])
        x = x.astype(self.residual_dtype)
        if self.scan_layers:
            x, layers = jax.lax.scan(body, x, blocks)
        else:
            outputs = []
            for i in range(self.depth):
                x, _ = body(x, jax.tree.map(lambda leaf: leaf[i], blocks))
                outputs.append(x)
            layers = jnp.stack(outputs) if return_layers else None
        out = _layer_norm("norm")(x)
        if return_layers:
            return out, layers.astype(jnp.float32)
        return out


def stack_blocks(tree: dict) -> dict:
    """A TransformerStack's params with per-block subtrees `blocks_0` … `blocks_{n-1}` (any other keys
    kept) → the stored layout, one `blocks` subtree with every leaf stacked on a new leading axis.

    Raises ValueError when the block indices are not 0 … n-1 or the blocks' trees differ.
    """
    indices = sorted(int(key[len("blocks_"):]) for key in tree if re.fullmatch(r"blocks_\d+", key))
    if not indices:
        raise ValueError(f"no blocks_<i> params to stack among {sorted(tree)}.")
    missing = sorted(set(range(indices[-1] + 1)) - set(indices))
    if missing:
        names = ", ".join(f"blocks_{i}" for i in missing)
        raise ValueError(f"{names} missing among blocks_0 … blocks_{indices[-1]}; a stack's params are stored "
                         f"stacked, so every block is needed.")
    per_block = [tree[f"blocks_{i}"] for i in indices]
    structure = jax.tree.structure(per_block[0])
    for i, block_params in enumerate(per_block):
        if jax.tree.structure(block_params) != structure:
            raise ValueError(f"blocks_{i} has params {jax.tree.structure(block_params)}; blocks_0 has {structure}.")
    rest = {key: value for key, value in tree.items() if not re.fullmatch(r"blocks_\d+", key)}
    return {**rest, STACKED_BLOCKS: jax.tree.map(lambda *leaves: np.stack([np.asarray(v) for v in leaves]),
                                                  *per_block)}


def stack_all_blocks(tree: dict) -> dict:
    """stack_blocks applied to every dict in `tree` that holds per-block subtrees blocks_<i> (e.g. an
    M2D param tree in the per-block layout of audiojepa before 2026-11-30, or converted per block)."""
    tree = {key: stack_all_blocks(value) if isinstance(value, dict) else value for key, value in tree.items()}
    if any(re.fullmatch(r"blocks_\d+", key) for key in tree):
        return stack_blocks(tree)
    return tree


def unstack_blocks(tree: dict) -> dict:
    """Inverse of stack_blocks: `blocks` (leaves [depth, ...]) → `blocks_0` … `blocks_{depth-1}`."""
    blocks = tree[STACKED_BLOCKS]
    depth = len(jax.tree.leaves(blocks)[0])
    rest = {key: value for key, value in tree.items() if key != STACKED_BLOCKS}
    return {**rest, **{f"blocks_{i}": jax.tree.map(lambda leaf: leaf[i], blocks) for i in range(depth)}}


def per_block_ndim(params) -> Any:
    """The tree of params with each leaf replaced by its ndim per block: a leaf under a stacked
    `blocks` subtree (TransformerStack) counts without its leading [depth] axis. Weight-decay masks use
    it, so a stacked bias [depth, width] is still a vector."""
    def ndim(path, leaf):
        stacked = any(isinstance(key, jax.tree_util.DictKey) and key.key == STACKED_BLOCKS for key in path)
        return jnp.ndim(leaf) - int(stacked)
    return jax.tree_util.tree_map_with_path(ndim, params)


class ViTEncoder(nn.Module):
    """Patch embedding + fixed sin-cos positions + learnable CLS (optional) + TransformerStack.

    Params: `patch_embed/proj/{kernel [pf, pt, 1, D], bias}`, `cls_token [1, 1, D]` (only with use_cls),
    `stack/...`.
    The pieces are separate methods so a method can embed all patches once, pick a subset with index
    arrays, and encode only that subset (`encode_tokens`); swapping `stack` for another tree of the same
    structure (e.g. an EMA target) gives the target encoder with the same CLS and patch embedding.

    Attributes:
        width, depth, num_heads, mlp_dim: sizes (see VARIANTS / decode_variant).
        patch_size: (frequency bins, frames) per patch.
        dtype: compute dtype; params stay float32.
        attention_impl: passed to jax.nn.dot_product_attention (None = XLA, "cudnn").
        remat: rematerialisation of the blocks (REMAT_POLICIES).
        scan_layers: run the blocks as one lax.scan (TransformerStack).
        residual_dtype: the residual stream's dtype (TransformerStack).
        use_cls: prepend a learnable CLS token (M2D); False encodes the patch tokens alone (I-JEPA and
            the audio JEPAs), and outputs have no prefix token.
        pos_embed: "sincos" (fixed 2-D sin-cos table, M2D and the JEPAs) or "learned" (a trainable table
            `pos_embed [1, F·T', width]` for the training grid `pos_grid`, initialised with the sin-cos table;
            MATPAC's paper). A learned table serves inputs up to the training grid: a shorter input uses its
            top-left [F, T'] part, as the reference truncates a longer table.
        pos_grid: (F, T') of the training input; required with pos_embed="learned".
    """
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    patch_size: tuple[int, int] = (16, 16)
    dtype: Any = jnp.float32
    attention_impl: str | None = None
    use_cls: bool = True
    remat: str = "none"
    scan_layers: bool = True
    pos_embed: str = "sincos"
    pos_grid: tuple[int, int] | None = None
    residual_dtype: Any = jnp.float32

    def setup(self):
        self.patch_embed = PatchEmbed(self.width, tuple(self.patch_size), self.dtype)
        if self.use_cls:
            self.cls_token = self.param("cls_token", token_init, (1, 1, self.width), jnp.float32)
        if check_pos_embed(self.pos_embed) == "learned":
            if self.pos_grid is None:
                raise ValueError("pos_embed='learned' needs pos_grid, the (F, T') patch grid of the training input.")
            grid_f, grid_t = self.pos_grid
            self.pos_table = self.param("pos_embed", sincos_init(grid_f, grid_t), (1, grid_f * grid_t, self.width),
                                        jnp.float32)
        self.stack = TransformerStack(self.depth, self.num_heads, self.mlp_dim, self.dtype, self.attention_impl,
                                      self.remat, self.scan_layers, self.residual_dtype)

    def embed(self, lms: jax.Array) -> jax.Array:
        """lms: [batch, n_mels, frames] → patch tokens with positions added, [batch, F·T', width] float32.

        The table is built for this input's own grid, which equals the reference's truncation of a
        longer table for short inputs (`adjust_short`).
        """
        tokens = self.patch_embed(lms)
        grid_f, grid_t = grid_size(lms.shape[1:], self.patch_size)
        if self.pos_embed == "learned":
            table = learned_table_for_grid(self.pos_table[0], tuple(self.pos_grid), (grid_f, grid_t))
        else:
            table = sincos_2d(grid_f, grid_t, self.width, cls_token=False)
        return tokens.astype(jnp.float32) + table[None]

    def encode_tokens(self, tokens: jax.Array, return_layers: bool = False, valid: jax.Array | None = None):
        """tokens: [batch, N, width] (any subset of embedded patches) → [batch, 1 + N, width], CLS first
        ([batch, N, width] without use_cls).

        The CLS slot's position code is all zeros, so nothing is added to the CLS token.
        With return_layers, also returns [depth, batch, 1 + N, width] (see TransformerStack).
        valid: None, or [batch, N] bool: False marks padding tokens (variable-size masks padded to a fixed
            length), which nothing attends to; their outputs are meaningless. The CLS token is always valid.
        """
        tokens = tokens.astype(jnp.float32)
        if not self.use_cls:
            return self.stack(tokens, return_layers, valid)
        # Broadcast through `tokens` so the CLS rows share its batch sharding (concatenate under an
        # Explicit mesh needs equal shardings; a plain broadcast_to would be replicated).
        cls = jnp.zeros_like(tokens[:, :1]) + self.cls_token
        if valid is not None:
            # Take the tokens' (batch) sharding: masks drawn from a key are replicated (Explicit mesh).
            valid = jnp.ones_like(tokens[:, :, 0], dtype=bool) & valid
            valid = jnp.concatenate([jnp.ones_like(valid[:, :1]), valid], axis=1)
        return self.stack(jnp.concatenate([cls, tokens], axis=1), return_layers, valid)

    def __call__(self, lms: jax.Array, return_layers: bool = False, valid: jax.Array | None = None):
        """lms: [batch, n_mels, frames] → [batch, 1 + F·T', width], CLS first (all patches); no CLS row without
        use_cls. valid: None, or [batch, F·T'] bool over the patch tokens (frequency-major), False for padding
        patches (audiojepa.adapters.encoder pads chunks to a few fixed widths), which no token attends to; their outputs
        are meaningless (encode_tokens)."""
        return self.encode_tokens(self.embed(lms), return_layers, valid)
