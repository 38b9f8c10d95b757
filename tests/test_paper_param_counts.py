"""Parameter counts of the recipe=paper models against the papers' tables, from abstract inits (no allocation).

Audio-JEPA (Tuncay et al. 2025, Table I): 85.4M parameters per encoder (context and target alike), 96.7M
trainable (context encoder + predictor). Each count is also checked against a closed-form ViT formula
written here, so the test pins down both the architecture and the paper's total. Tolerance: 1% of the paper's
figure (the paper rounds to 0.1M; what it counts beyond the ViT's own tensors is not stated).
"""

import jax
import numpy as np
import pytest

from audiojepa.methods import jepa
from audiojepa.ops import frontend
from configs import audio_jepa as audio_jepa_config


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _vit_params(width: int, depth: int, mlp: int, patch: int = 16 * 16) -> int:
    """Patch embedding (conv kernel + bias), `depth` pre-LN blocks (qkv, proj, fc1, fc2 with biases, two
    LayerNorms), final LayerNorm; no CLS token, fixed sin-cos positions (no params)."""
    block = (3 * width * width + 3 * width) + (width * width + width) + (width * mlp + mlp) + (mlp * width + width) \
        + 4 * width
    return patch * width + width + depth * block + 2 * width


def _predictor_params(encoder_width: int, width: int, depth: int) -> int:
    """embed (encoder width -> width), mask token, `depth` blocks of MLP 4·width, final norm, head back."""
    return (encoder_width * width + width) + width + _vit_params(width, depth, 4 * width, patch=0) - width \
        + (width * encoder_width + encoder_width)


@pytest.mark.parametrize("recipe", ["paper", "code"])
def test_audio_jepa_sizes_match_table_1(recipe):
    config = audio_jepa_config.get_config(f"recipe={recipe}")
    n_mels = frontend.get_preset(config.data.frontend).n_mels
    method = jepa.JEPA(config.model, input_shape=(n_mels, config.data.crop_frames))
    params, target_params = jax.eval_shape(method.init, jax.random.key(0))
    encoder, predictor = _count(params["encoder"]), _count(params["predictor"])
    assert encoder == _vit_params(768, 12, 3072) == _count(target_params)
    assert predictor == _predictor_params(768, 384, 6)
    assert encoder == pytest.approx(85.4e6, rel=0.01)
    assert encoder + predictor == pytest.approx(96.7e6, rel=0.01)
    if recipe == "paper":
        assert method.grid_size == (8, 16) and method.num_patches == 128  # 128 mels x 256 time bins per 10 s
