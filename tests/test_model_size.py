"""Any model size (issue 24 item 4): config.model.width/depth/num_heads/mlp_dim override the named variant, the
predictor's size is set the same way, and an official-layout checkpoint of any size converts."""

import jax
import ml_collections
import numpy as np
import pytest

from audiojepa.config_utils import load_config
from audiojepa.convert import m2d_torch
from audiojepa.methods import jepa, m2d
from audiojepa.models import sincos_2d
from audiojepa.models.vit import VARIANTS, model_size
from audiojepa.training import flops

INPUT_SHAPE = (80, 64)  # 5 x 4 patches


def _config(**keys):
    config = m2d.default_config("tiny")
    config.update(keys)
    return config


def test_without_overrides_the_variant_decides():
    assert model_size(_config()) == VARIANTS["tiny"]
    old = ml_collections.ConfigDict(dict(variant="S"))  # a config.json from before the keys
    assert model_size(old) == VARIANTS["S"]


def test_overrides_and_the_defaults_an_overridden_width_brings():
    assert model_size(_config(width=256)) == dict(width=256, depth=2, num_heads=4, mlp_dim=1024)
    assert model_size(_config(depth=5)) == dict(VARIANTS["tiny"], depth=5)
    assert model_size(_config(width=96, num_heads=3, mlp_dim=200, depth=4)) == dict(width=96, depth=4, num_heads=3,
                                                                                   mlp_dim=200)
    assert model_size(_config(mlp_dim=100)) == dict(VARIANTS["tiny"], mlp_dim=100)


@pytest.mark.parametrize("keys,message", [
    (dict(width=100), r"config\.model\.width=100 is not a multiple of 64: set config\.model\.num_heads"),
    (dict(width=256, num_heads=5), r"config\.model\.num_heads=5 does not divide the width 256"),
    (dict(num_heads=5), r"config\.model\.num_heads=5 does not divide the width 192"),
    (dict(depth=0), r"config\.model\.depth=0: a positive integer"),
    (dict(mlp_dim=2.5), r"config\.model\.mlp_dim=2\.5: a positive integer"),
])
def test_bad_sizes_name_the_config_key(keys, message):
    with pytest.raises(ValueError, match=message):  # an untyped dict, as a config.json reads back
        model_size(ml_collections.ConfigDict(dict(variant="tiny", **keys)))


@pytest.mark.parametrize("name", ["m2d", "matpac", "jepa", "audio_jepa"])
def test_every_vit_config_has_the_keys_typed_for_command_line_overrides(name):
    config = load_config(f"configs/{name}.py:runlocal")
    for key in ("width", "depth", "num_heads", "mlp_dim", "predictor_mlp_dim"):
        assert key in config.model and config.model[key] is None, key
        config.model[key] = 8  # a typed placeholder: ints go in, a string does not
        with pytest.raises(TypeError):
            config.model[key] = "eight"


def _leaf_shapes(tree) -> dict[str, tuple]:
    return {jax.tree_util.keystr(path): leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_m2d_of_an_unnamed_size_builds_trains_and_counts_its_flops():
    config = _config(width=96, depth=3, num_heads=3, mlp_dim=160, predictor_width=32, predictor_depth=2,
                     predictor_heads=2, predictor_mlp_dim=48)
    method = m2d.M2D(config, input_shape=INPUT_SHAPE)
    params, target = jax.jit(method.init)(jax.random.key(0))
    stack = params["encoder"]["stack"]
    assert params["encoder"]["cls_token"].shape == (1, 1, 96)
    assert jax.tree.leaves(stack)[0].shape[0] == 3  # stacked over 3 blocks
    assert any(shape == (3, 96, 160) for shape in _leaf_shapes(stack).values())  # fc1
    assert any(shape == (2, 32, 48) for shape in _leaf_shapes(params["predictor"]).values())  # predictor fc1
    assert params["predictor"]["head"]["kernel"].shape == (32, 96)
    assert _leaf_shapes(target) == _leaf_shapes(stack)
    lms = jax.random.normal(jax.random.key(1), (2, *INPUT_SHAPE))
    loss, _ = jax.jit(method.loss)(params, target, {"lms": lms}, jax.random.key(2), 0)
    assert np.isfinite(float(loss))
    parts = flops._m2d_per_example(method)
    assert parts["online_encoder"] == 3 * flops.block_flops(1 + method.num_visible, 96, 160)


def test_jepa_of_an_unnamed_size_builds():
    config = jepa.default_config("tiny")
    config.update(width=64, depth=1, predictor_width=32, predictor_depth=1, predictor_heads=2)
    method = jepa.JEPA(config, input_shape=INPUT_SHAPE)
    params, _ = jax.jit(method.init)(jax.random.key(0))
    assert params["encoder"]["patch_embed"]["proj"]["kernel"].shape == (16, 16, 1, 64)
    assert jax.tree.leaves(params["encoder"]["stack"])[0].shape[0] == 1
    assert method.width == 64 and method.encoder_depth == 1


def _official_state_dict(width: int, depth: int, mlp_dim: int, grid=(5, 4), seed=0) -> dict[str, np.ndarray]:
    """Random tensors with the names and shapes of an official M2D encoder (timm ViT layout)."""
    rng = np.random.default_rng(seed)
    r = lambda *shape: (0.02 * rng.standard_normal(shape)).astype(np.float32)
    state = {"cls_token": r(1, 1, width), "pos_embed": sincos_2d(*grid, width)[None],
             "patch_embed.proj.weight": r(width, 1, 16, 16), "patch_embed.proj.bias": r(width),
             "norm.weight": 1 + r(width), "norm.bias": r(width)}
    for i in range(depth):
        b = f"blocks.{i}."
        state.update({b + "norm1.weight": 1 + r(width), b + "norm1.bias": r(width),
                      b + "attn.qkv.weight": r(3 * width, width), b + "attn.qkv.bias": r(3 * width),
                      b + "attn.proj.weight": r(width, width), b + "attn.proj.bias": r(width),
                      b + "norm2.weight": 1 + r(width), b + "norm2.bias": r(width),
                      b + "mlp.fc1.weight": r(mlp_dim, width), b + "mlp.fc1.bias": r(mlp_dim),
                      b + "mlp.fc2.weight": r(width, mlp_dim), b + "mlp.fc2.bias": r(width)})
    return state


def test_a_checkpoint_of_any_size_converts_with_its_sizes_read_from_the_tensors():
    state = _official_state_dict(width=128, depth=3, mlp_dim=320)
    config, input_shape = m2d_torch.model_config_for(state, 80)
    assert input_shape == INPUT_SHAPE
    assert model_size(config) == dict(width=128, depth=3, num_heads=2, mlp_dim=320)  # heads: width / 64
    config, _ = m2d_torch.model_config_for(state, 80, num_heads=4)
    assert model_size(config)["num_heads"] == 4
    params, _ = m2d_torch.state_dict_to_params(state, grid_size=(5, 4))
    method = m2d.M2D(config, input_shape=INPUT_SHAPE)
    expected = _leaf_shapes(jax.eval_shape(method.init, jax.random.key(0))[0]["encoder"])
    assert _leaf_shapes(params["encoder"]) == expected
    with pytest.raises(ValueError, match=r"num_heads=5 does not divide the width 128"):
        m2d_torch.model_config_for(state, 80, num_heads=5)


def test_a_named_size_still_converts_as_its_variant():
    state = _official_state_dict(width=192, depth=2, mlp_dim=768)
    config, _ = m2d_torch.model_config_for(state, 80)
    assert config.variant == "tiny" and config.width is None and model_size(config) == VARIANTS["tiny"]


def test_convert_cli_exports_a_checkpoint_of_any_size(tmp_path):
    import os
    import subprocess
    import sys

    from audiojepa.adapters import encoder

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    checkpoint = tmp_path / "state_dict.npz"
    np.savez(checkpoint, **_official_state_dict(width=128, depth=3, mlp_dim=320))
    lms = np.random.default_rng(3).standard_normal((2, 80, 64)).astype(np.float32)
    features = {}
    for heads in (2, 4):
        out = tmp_path / f"export{heads}"
        result = subprocess.run([sys.executable, "tools/convert_m2d.py", f"--checkpoint={checkpoint}",
                                 f"--output={out}", *([f"--num_heads={heads}"] if heads != 2 else [])],
                                cwd=root, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        loaded = encoder.load_encoder(str(out))
        assert model_size(loaded.model_config) == dict(width=128, depth=3, num_heads=heads, mlp_dim=320)
        features[heads] = loaded.frame_features(lms)
        assert features[heads].shape == (2, 4, 5 * 128) and np.isfinite(features[heads]).all()
    assert np.abs(features[2] - features[4]).max() > 1e-3  # the heads are part of the model
