"""DINO-style classification head (MATPAC): MLP → L2-normalised bottleneck → weight-normalised prototypes.

Facts: shared/reference/jepa_family.md §4.2 (MATPAC `cls_head.py`): Linear D→2048, GELU, Linear 2048→2048,
GELU, Linear 2048→256 (no batch norm), L2 normalisation, then a bias-free weight-normalised Linear 256→K
whose per-prototype gain starts at 1. MATPAC trains the gain; DINO's `norm_last_layer` freezes it.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from audiojepa.ops.losses import l2_normalize

HEAD_INIT_STD = 0.02  # truncated-normal std of the MLP and prototype weights (DINO / MATPAC init)


def trunc_normal_init(std: float = HEAD_INIT_STD):
    """Normal(0, std) truncated at ±2 std, as timm's trunc_normal_ (absolute bounds ±2 there: same for std ≤ 1)."""
    return nn.initializers.truncated_normal(stddev=std, lower=-2.0, upper=2.0)


class ClassificationHead(nn.Module):
    """tokens [..., D] → prototype logits [..., num_prototypes] (float32).

    Params: `mlp_0` … `mlp_{num_layers-1}` (Dense; the last one to `bottleneck_dim`),
    `prototypes_direction` [bottleneck_dim, K] and `prototypes_gain` [K]; the prototype matrix is
    gain · direction / ‖direction‖ with the norm over the bottleneck axis (PyTorch `weight_norm(dim=0)` of
    a [K, bottleneck] weight).

    Attributes:
        num_prototypes: K (2048 in MATPAC).
        hidden_dim: MLP width (2048).
        bottleneck_dim: width of the L2-normalised embedding (256).
        num_layers: MLP layers including the bottleneck projection (3).
        train_gain: False stops the gradient into `gain` (DINO's frozen weight-norm gain); True trains it.
        dtype: compute dtype of the matmuls; params and logits are float32.
    """
    num_prototypes: int = 2048
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3
    train_gain: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = trunc_normal_init()
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            x = nn.Dense(self.bottleneck_dim if last else self.hidden_dim, dtype=self.dtype, param_dtype=jnp.float32,
                         kernel_init=init, bias_init=nn.initializers.zeros, name=f"mlp_{i}")(x)
            if not last:
                x = nn.gelu(x, approximate=False)
        x = x.astype(jnp.float32)
        x = l2_normalize(x)
        direction = self.param("prototypes_direction", init, (self.bottleneck_dim, self.num_prototypes))
        gain = self.param("prototypes_gain", nn.initializers.ones, (self.num_prototypes,))
        if not self.train_gain:
            gain = jax.lax.stop_gradient(gain)
        kernel = direction * (gain / jnp.linalg.norm(direction, axis=0))
        return jnp.matmul(x, kernel, precision=jax.lax.Precision.HIGHEST)
