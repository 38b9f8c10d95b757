"""Which layer of an encoder evaluation embeds with: the one convention every method follows.

`layer` (a method's `encode(params, x, layer=...)`, `audiojepa.adapters.encoder.AudioEncoder.layer`,
`python -m audiojepa.evaluate --layer`, `config.evals.<name>.layer`) is:
    None: the encoder's final output (after the final LayerNorm; EncodecMAE's ResiDual stack: x0 + LN(x1)),
        what evaluation embedded before layers could be chosen, computed by the same code, bit for bit.
    k in [-depth, depth): the output of transformer block k of the evaluated encoder, 0-based (-1 is the last
        block), with the same tokens (prefix tokens included) as the final output. As the official runtimes'
        per-layer features (M2D's `return_layers`, EncodecMAE v2's with `postnorm_last_activation`): an
        intermediate block's output is taken raw, without the final norm (the pre-LN residual stream;
        EncodecMAE's ResiDual layers: their x0, the norm2 output), and the last block's entry is the final
        output: layer=-1 (= depth - 1) is layer=None, computed by the same code.
    ALL ("all"; AudioEncoder and the CLI only): every layer from one forward pass; features gain a leading
        [depth] axis (`runtime_layers`; its last entry equals the final output up to float rounding, being
        another compiled graph).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp

ALL = "all"


def check_layer(layer, depth: int) -> int:
    """`layer` (an int in [-depth, depth)) as its block index 0 … depth-1; ValueError naming the valid range
    and the depth otherwise."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not -depth <= layer < depth:
        raise ValueError(f"layer={layer!r} is not a layer of this encoder: valid layers are the integers in "
                         f"[{-depth}, {depth}) (0-based blocks, -1 the last) for its depth {depth}, or None "
                         "for the final output")
    return layer % depth


def check_layer_choice(layer, depth: int):
    """None, ALL, or an int layer in [-depth, depth) as its index 0 … depth-1; ValueError otherwise."""
    if layer is None or layer == ALL:
        return layer
    return check_layer(layer, depth)


def runtime_layers(final: jax.Array, block_outputs: jax.Array) -> jax.Array:
    """Every layer's features, as the module docstring defines them.

    Args:
        final: [batch, tokens, D], the encoder's final output.
        block_outputs: [depth, batch, tokens, D], every block's raw output (a stack's `return_layers`).

    Returns:
        [depth, batch, tokens, D] float32: block_outputs with the last entry replaced by `final`.
    """
    return jnp.concatenate([block_outputs[:-1].astype(jnp.float32), final[None].astype(jnp.float32)])


def encode_at(layer, depth: int, final: Callable[[], jax.Array], every_layer: Callable[[], jax.Array]) -> jax.Array:
    """A method's `encode` at `layer` (None or an int, module docstring).

    Args:
        final: () -> [batch, tokens, D], the final output (today's `encode`), used for None and the last layer.
        every_layer: () -> [depth, batch, tokens, D] (`runtime_layers`), indexed for the other layers.
    """
    index = None if layer is None else check_layer(layer, depth)
    if index is None or index == depth - 1:
        return final()
    return every_layer()[index]
