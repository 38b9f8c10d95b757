"""Model pieces shared by every method: size table, patch embedding, position tables, blocks, encoder, predictor;
the frozen EnCodec encoder and RVQ (EncodecMAE's input features and targets)."""

from audiojepa.models.encodec import EncodecEncoder, rvq_decode, rvq_encode
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
    "VARIANTS", "Attention", "Block", "EncodecEncoder", "Mlp", "PatchEmbed", "Predictor", "TransformerStack",
    "ViTEncoder", "as_dtype", "checked_grid_size", "decode_variant", "grid_size", "rvq_decode", "rvq_encode",
    "sincos_1d", "sincos_2d",
]
