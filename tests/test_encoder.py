"""Encoder export/load and chunked embeddings, against the official M2D runtime (shared/fixtures/m2d).

Tolerance: 1e-4 absolute on features (float32; the fixture README's bound for ports).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import flax.serialization
import jax
import numpy as np
import pytest

from audiojepa.adapters import encoder
from audiojepa.convert import m2d_torch
from audiojepa.methods import m2d
from audiojepa.models import vit
from audiojepa.ops import frontend
from audiojepa.training import train

ATOL = 1e-4
FIXTURES = Path(os.environ.get("AUDIOJEPA_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
STATE_DICT = FIXTURES / "m2d" / "m2d_small_state_dict.npz"
OUTPUTS = FIXTURES / "m2d" / "m2d_parity_outputs.npz"
needs_fixtures = pytest.mark.skipif(not (STATE_DICT.exists() and OUTPUTS.exists()),
                                    reason=f"M2D fixtures not found under {FIXTURES} (set AUDIOJEPA_FIXTURES)")
REPO = Path(__file__).resolve().parents[1]


def _fixture_encoder():
    params, _ = m2d_torch.state_dict_to_params(dict(np.load(STATE_DICT)), grid_size=(5, 13))
    config = m2d.default_config("tiny")
    config.predictor_width, config.predictor_depth, config.predictor_heads = 128, 2, 4
    return encoder.AudioEncoder("m2d", config, (80, 208), frontend.get_preset("m2d"), (-7.1, 4.2),
                                {"encoder": params["encoder"]})


@needs_fixtures
def test_chunked_features_match_the_official_runtime():
    ref = np.load(OUTPUTS)
    enc = _fixture_encoder()
    lms = ref["runtime_input_lms"][:, 0]  # [2, 80, 500]: chunks of 208, 208 and 84 (padded to 96) frames
    features = enc.frame_features(lms)
    assert features.shape == ref["runtime_features"].shape == (2, 32, 960)
    np.testing.assert_allclose(features, ref["runtime_features"], atol=ATOL)
    np.testing.assert_allclose(enc.clip_embedding(lms), ref["runtime_clip_embedding"], atol=ATOL)
    np.testing.assert_allclose(features.reshape(2, 32, 5, 192).mean(axis=2), ref["runtime_features_freqavg"],
                               atol=ATOL)


@needs_fixtures
def test_convert_cli_export_round_trip(tmp_path):
    out = tmp_path / "export"
    result = subprocess.run([sys.executable, "tools/convert_m2d.py", f"--checkpoint={STATE_DICT}", f"--output={out}"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    loaded = encoder.load_encoder(str(out))
    assert loaded.input_shape == (80, 208) and loaded.model_config.variant == "tiny"
    assert loaded.norm_stats == pytest.approx((-7.1, 4.2), rel=1e-6)  # stored as float32 in the checkpoint
    assert loaded.frontend == frontend.get_preset("m2d")
    ref = np.load(OUTPUTS)
    np.testing.assert_allclose(loaded.frame_features(ref["runtime_input_lms"][:, 0]), ref["runtime_features"],
                               atol=ATOL)


@pytest.mark.slow
def test_workdir_export_matches_the_checkpoint(tmp_path):
    import run_helpers as rh

    workdir = str(tmp_path / "run")
    train.train_and_evaluate(rh.tiny_config(), workdir, num_devices=1)
    from_workdir = encoder.load_encoder(workdir)
    assert from_workdir.input_shape == (80, 48) and from_workdir.method_name == "m2d"
    exported = encoder.load_encoder(from_workdir.save(str(tmp_path / "export")))
    waveform = np.random.default_rng(0).standard_normal((2, 16000)).astype(np.float32) * 0.1
    frames_a, clip_a = from_workdir.embed_waveform(waveform)
    frames_b, clip_b = exported.embed_waveform(waveform)
    # 1 s = 101 frames -> chunks of 48, 48, 5 (padded to 16) -> 3 + 3 + 1 time steps of 5 x 192.
    assert frames_a.shape == (2, 7, 5 * 192) and clip_a.shape == (2, 960)
    np.testing.assert_array_equal(frames_a, frames_b)
    np.testing.assert_array_equal(clip_a, clip_b)
    assert from_workdir.frame_hop_seconds == pytest.approx(0.16)


def _per_block_layout(tree):
    """The params as audiojepa wrote them before the stacked layout (format_version 1): blocks_<i>."""
    if not isinstance(tree, dict):
        return tree
    tree = {key: _per_block_layout(value) if key != "blocks" else value for key, value in tree.items()}
    return vit.unstack_blocks(tree) if "blocks" in tree else tree


@needs_fixtures
def test_format_version_1_export_loads_in_the_stacked_layout(tmp_path):
    enc = _fixture_encoder()
    folder = enc.save(str(tmp_path / "export"))
    meta = json.loads((tmp_path / "export" / encoder.ENCODER_JSON).read_text())
    assert meta["format_version"] == 2
    # A version-1 export as it was written: no params digest (exports carry one since 2026-12).
    v1_meta = {key: value for key, value in meta.items() if key != "params_sha256"}
    (tmp_path / "export" / encoder.ENCODER_JSON).write_text(json.dumps({**v1_meta, "format_version": 1}))
    old_params = _per_block_layout(jax.tree.map(np.asarray, enc.params))
    assert "blocks_1" in old_params["encoder"]["stack"] and "blocks" not in old_params["encoder"]["stack"]
    (tmp_path / "export" / encoder.PARAMS_FILE).write_bytes(flax.serialization.msgpack_serialize(old_params))

    loaded = encoder.load_encoder(folder)
    assert jax.tree.structure(loaded.params) == jax.tree.structure(enc.params)
    ref = np.load(OUTPUTS)
    np.testing.assert_allclose(loaded.frame_features(ref["runtime_input_lms"][:, 0]), ref["runtime_features"],
                               atol=ATOL)
    (tmp_path / "export" / encoder.ENCODER_JSON).write_text(json.dumps({**meta, "format_version": 7}))
    with pytest.raises(ValueError, match="format_version 7"):
        encoder.load_encoder(folder)


def test_load_encoder_error_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        encoder.load_encoder(str(tmp_path))


@needs_fixtures
def test_convert_cli_reads_a_torch_checkpoint(tmp_path):
    torch = pytest.importorskip("torch", reason="the optional torch extra is not installed")
    import argparse

    state_dict = {k: torch.from_numpy(v) for k, v in np.load(STATE_DICT).items()}
    # As MAE-style training saves it: the run's argparse.Namespace too (weights_only=True refused it), and
    # an entry that is not the encoder's (M2D-X's offline predictor), left out instead of being an error.
    state_dict["offline_predictor.weight"] = torch.zeros(3, 3)
    torch.save({"model": state_dict, "epoch": 299, "args": argparse.Namespace(lr=3e-4, input_size=[80, 608])},
               tmp_path / "checkpoint-299.pth")
    out = tmp_path / "export"
    result = subprocess.run([sys.executable, "tools/convert_m2d.py", f"--checkpoint={tmp_path / 'checkpoint-299.pth'}",
                             f"--output={out}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    ref = np.load(OUTPUTS)
    np.testing.assert_allclose(encoder.load_encoder(str(out)).frame_features(ref["runtime_input_lms"][:, 0]),
                               ref["runtime_features"], atol=ATOL)


def test_an_encoder_trained_in_bfloat16_with_cudnn_attention_embeds_in_float32_anywhere(tmp_path):
    """Export keeps the run's model config (dtype bfloat16, attention_impl cudnn, remat dots), but embedding
    uses float32 XLA attention: on this CPU it runs (cuDNN would be an error) and gives the float32
    features exactly, where bfloat16 matmuls would differ by ~0.5%."""
    config = m2d.default_config("tiny")
    method = m2d.M2D(config, input_shape=(80, 48))
    params = jax.jit(method.encoder.init)(jax.random.key(0), np.zeros((1, 80, 48), np.float32))["params"]
    trained = config.copy_and_resolve_references()
    trained.update(dict(dtype="bfloat16", attention_impl="cudnn", remat="dots"))
    args = (frontend.get_preset("m2d"), (-7.1, 4.2), {"encoder": params})
    fast = encoder.load_encoder(encoder.AudioEncoder("m2d", trained, (80, 48), *args).save(str(tmp_path / "bf16")))
    assert (fast.model_config.dtype, fast.model_config.attention_impl) == ("bfloat16", "cudnn")  # kept as trained
    reference = encoder.AudioEncoder("m2d", config, (80, 48), *args)
    lms = np.random.default_rng(0).standard_normal((2, 80, 96)).astype(np.float32)
    np.testing.assert_array_equal(fast.frame_features(lms), reference.frame_features(lms))


def test_a_1001_frame_model_chunks_as_the_official_runtime():
    """80x1001 models (M2D-AS, CLAP): chunks of 1001 frames whose last 9 frames the patch stride drops, as
    runtime_audio.py does (m2d.md §5: a 10 s clip gives 62 steps, not 63); only a shorter last chunk is padded."""
    config = m2d.default_config("tiny")
    method = m2d.M2D(config, input_shape=(80, 992))  # the patches of a 1001-frame chunk
    params = jax.jit(method.encoder.init)(jax.random.key(0), np.zeros((1, 80, 992), np.float32))["params"]
    enc = encoder.AudioEncoder("m2d", config, (80, 1001), frontend.get_preset("m2d"), (-7.1, 4.2),
                               {"encoder": params})
    lms = np.random.default_rng(0).standard_normal((1, 80, 2002 + 20)).astype(np.float32)
    assert enc.frame_features(lms[:, :, :1001]).shape[1] == 62
    np.testing.assert_array_equal(enc.frame_features(lms[:, :, :1001]), enc.frame_features(lms[:, :, :992]))
    features = enc.frame_features(lms)  # 1001 + 1001 + 20 (padded to 32: 2 steps)
    assert features.shape[1] == 62 + 62 + 2
    np.testing.assert_allclose(features[:, 62:124], enc.frame_features(lms[:, :, 1001:2002]), rtol=1e-6, atol=1e-6)


def test_convert_reads_the_training_width_from_the_weight_folder_name():
    convert_m2d = m2d_torch  # the layout helpers tools/convert_m2d.py uses

    assert convert_m2d.frames_from_path("/w/m2d_as_vit_base-80x1001p16x16-240213_AS-FT_enconly/weights_ep69.pth") == 1001
    assert convert_m2d.frames_from_path("/w/m2d_vit_base-80x608p16x16-221006-mr7/checkpoint-300.pth") == 608
    assert convert_m2d.frames_from_path("/w/state_dict.npz") is None
    assert convert_m2d.frontend_from_path("/w/m2d_vit_base-80x608p16x16p32k-240119/checkpoint-300.pth") == "m2d_32k"
    assert convert_m2d.frontend_from_path("/w/m2d_vit_base-80x608p16x16-221006-mr7/checkpoint-300.pth") == "m2d"
    assert convert_m2d.frontend_from_path("/w/state_dict.npz") is None
    kept, dropped = convert_m2d.encoder_entries({"blocks.0.x": 1, "norm.weight": 2, "offline_predictor.w": 3,
                                                 "decoder_embed.weight": 4, "cls_token": 5})
    assert sorted(kept) == ["blocks.0.x", "cls_token", "norm.weight"] and dropped == ["decoder_embed",
                                                                                      "offline_predictor"]
    state = {"cls_token": np.zeros((1, 1, 192)), "patch_embed.proj.weight": np.zeros((192, 1, 16, 16)),
             "pos_embed": np.zeros((1, 1 + 5 * 62, 192)), **{f"blocks.{i}.x": 0 for i in range(2)}}  # tiny
    assert convert_m2d.model_config_for(state, 80)[1] == (80, 992)
    assert convert_m2d.model_config_for(state, 80, 1001)[1] == (80, 1001)
    with pytest.raises(Exception, match="--input_frames=608 gives 38 time patches; the checkpoint's position table has 62"):
        convert_m2d.model_config_for(state, 80, 608)
