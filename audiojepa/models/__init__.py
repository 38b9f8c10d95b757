"""Model pieces shared by every method: size table, patch embedding, position tables, blocks, encoder, predictor."""

from audiojepa.models.pos_embed import sincos_1d, sincos_2d
from audiojepa.models.predictor import Predictor
from audiojepa.models.vit import (
    VARIANTS,
    Attention,
    Block,
    Mlp,
    PatchEmbed,
    TransformerStack,
    ViTEncoder,
    as_dtype,
    checked_grid_size,
    decode_variant,
    grid_size,
)

__all__ = [
    "VARIANTS", "Attention", "Block", "Mlp", "PatchEmbed", "Predictor", "TransformerStack", "ViTEncoder",
    "as_dtype", "checked_grid_size", "decode_variant", "grid_size", "sincos_1d", "sincos_2d",
]
