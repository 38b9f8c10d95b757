"""Embedding with a chosen encoder layer (`layer=`): methods' `encode`, `AudioEncoder` and `evaluate --layer`.

The convention (audiojepa/models/encoder_layers.py): layer k < depth - 1 is block k's raw output, the last
layer is the final (normed) output, so layer=-1 equals layer=None.
"""

import functools
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import task_helpers

from audiojepa.adapters import encoder
from audiojepa.methods import encodecmae, jepa, m2d
from audiojepa.models import encodecmae as mae
from audiojepa.models import vit
from audiojepa.ops import frontend

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INPUT_SHAPE = (80, 48)  # 5 x 3 patches of 16 x 16
TINY_DEPTH = vit.VARIANTS["tiny"]["depth"]


@pytest.fixture(scope="module")
def tiny_m2d():
    method = m2d.M2D(m2d.default_config("tiny"), input_shape=INPUT_SHAPE)
    params = jax.jit(method.encoder.init)(jax.random.key(0), jnp.zeros((1, *INPUT_SHAPE)))["params"]
    return method, {"encoder": params}


@pytest.fixture(scope="module")
def tiny_jepa():
    method = jepa.JEPA(jepa.default_config("tiny"), input_shape=INPUT_SHAPE)
    params = jax.jit(method.encoder.init)(jax.random.key(1), jnp.zeros((1, *INPUT_SHAPE)))["params"]
    return method, {"encoder": params}


def _blocks_one_by_one(method, params, lms) -> list[np.ndarray]:
    """Every block's output [batch, prefix + L, D], computed without TransformerStack: each Block applied by
    flax with its params sliced from the stacked ones; the last entry is passed through the final norm."""
    encoder_params = params["encoder"]
    x = method.encoder.apply({"params": encoder_params}, lms, method=vit.ViTEncoder.embed)
    if method.num_prefix_tokens:
        cls = np.broadcast_to(encoder_params["cls_token"], (x.shape[0], 1, x.shape[2]))
        x = jnp.concatenate([cls, x], axis=1)
    size = vit.VARIANTS["tiny"]
    block = vit.Block(size["num_heads"], size["mlp_dim"])
    outputs = []
    for i in range(size["depth"]):
        block_params = jax.tree.map(lambda leaf, i=i: leaf[i], encoder_params["stack"]["blocks"])
        x = block.apply({"params": block_params}, x)
        outputs.append(np.asarray(x))
    norm = vit._layer_norm("norm")
    outputs[-1] = np.asarray(norm.apply({"params": encoder_params["stack"]["norm"]}, x))
    return outputs


@pytest.mark.parametrize("name", ["m2d", "jepa"])
def test_encode_at_a_layer_is_that_blocks_output(name, tiny_m2d, tiny_jepa):
    method, params = {"m2d": tiny_m2d, "jepa": tiny_jepa}[name]
    lms = jax.random.normal(jax.random.key(2), (2, *INPUT_SHAPE))
    expected = _blocks_one_by_one(method, params, lms)
    assert method.encoder_depth == TINY_DEPTH == len(expected)
    default = np.asarray(method.encode(params, lms))
    np.testing.assert_array_equal(default, np.asarray(method.encoder.apply({"params": params["encoder"]}, lms)))
    for k in range(TINY_DEPTH):
        at_k = np.asarray(method.encode(params, lms, layer=k))
        assert at_k.shape == default.shape == (2, method.num_prefix_tokens + 15, 192)
        np.testing.assert_allclose(at_k, expected[k], rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(method.encode(params, lms, layer=k - TINY_DEPTH)), at_k)
    # Intermediate blocks are raw (no final norm); the last layer is the final output.
    assert np.abs(expected[0] - default).max() > 1e-2
    np.testing.assert_array_equal(np.asarray(method.encode(params, lms, layer=-1)), default)
    all_layers = np.asarray(method.encode_layers(params, lms))
    assert all_layers.shape == (TINY_DEPTH, *default.shape)
    np.testing.assert_allclose(all_layers, np.stack(expected), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", [TINY_DEPTH, -TINY_DEPTH - 1, 1.0, "1"])
def test_a_layer_out_of_range_names_the_range_and_depth(tiny_m2d, layer):
    method, params = tiny_m2d
    with pytest.raises(ValueError, match=rf"layer={layer!r}.*\[-2, 2\).*depth 2"):
        method.encode(params, jnp.zeros((1, *INPUT_SHAPE)), layer=layer)


@pytest.mark.parametrize("stack_type", ["residual", "pre_ln"])
def test_encodecmae_encode_at_a_layer(stack_type):
    config = encodecmae.default_config("tiny")
    config.stack_type, config.share_ffn = stack_type, stack_type == "residual"
    method = encodecmae.EncodecMAE(config, input_shape=(9600,))
    features = jax.random.normal(jax.random.key(3), (2, method.num_frames, 128))
    params = jax.jit(functools.partial(method.model.init, method=mae.EncodecMAEModel.encode))(
        jax.random.key(4), features)["params"]
    _, per_layer = method.model.apply({"params": params}, method.model.apply(
        {"params": params}, features, method=mae.EncodecMAEModel.embed), True,
        method=mae.EncodecMAEModel.encode_tokens)
    default = np.asarray(method.encode(params, features))
    assert method.encoder_depth == 2
    np.testing.assert_allclose(np.asarray(method.encode(params, features, layer=0)), per_layer[0], rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(method.encode(params, features, layer=-1)), default, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(method.encode(params, features, layer=1)),
                                  np.asarray(method.encode(params, features, layer=-1)))
    assert np.abs(np.asarray(method.encode(params, features, layer=0)) - default).max() > 1e-2
    with pytest.raises(ValueError, match=r"\[-2, 2\).*depth 2"):
        method.encode(params, features, layer=2)


# -- AudioEncoder ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_export(tiny_m2d, tmp_path_factory):
    method, params = tiny_m2d
    enc = encoder.AudioEncoder("m2d", method.config, INPUT_SHAPE, frontend.get_preset("m2d"), (-7.1, 4.2), params)
    return enc.save(str(tmp_path_factory.mktemp("export")))


def test_audio_encoder_embeds_with_the_chosen_layer(tiny_export):
    final = encoder.load_encoder(tiny_export)
    first = encoder.load_encoder(tiny_export, layer=0)
    assert (final.layer, first.layer, first.num_layers) == (None, 0, TINY_DEPTH)
    lms = np.random.default_rng(0).standard_normal((2, 80, 130)).astype(np.float32)  # 3 chunks
    features, features_0 = final.frame_features(lms), first.frame_features(lms)
    assert features_0.shape == features.shape == (2, 9, 5 * 192) and first.feature_dim == final.feature_dim
    assert np.abs(features_0 - features).max() > 1e-2
    np.testing.assert_allclose(first.clip_embedding(lms), features_0.mean(axis=1), rtol=1e-6, atol=1e-6)
    # with_layer shares the compiled encoder; "all" gives every layer from one pass, [depth, ...].
    every = final.with_layer("all")
    assert every._encode is final._encode and final.layer is None
    all_features = every.frame_features(lms)
    assert all_features.shape == (TINY_DEPTH, *features.shape) and every.feature_dim == final.feature_dim
    np.testing.assert_allclose(all_features[0], features_0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(all_features[-1], features, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(final.with_layer(-1).frame_features(lms), features, rtol=1e-6, atol=1e-6)
    wave = np.random.default_rng(1).standard_normal((2, 8000)).astype(np.float32)
    frames, clips = every.embed_waveform(wave)
    assert frames.shape[0] == clips.shape[0] == TINY_DEPTH
    np.testing.assert_allclose(clips[0], first.embed_waveform(wave)[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"layer=2.*\[-2, 2\).*depth 2"):
        encoder.load_encoder(tiny_export, layer=2)


def test_the_layer_is_not_exported(tiny_export, tmp_path):
    enc = encoder.load_encoder(tiny_export, layer=1)
    enc.save(str(tmp_path / "again"))
    exported, again = (json.loads((pathlib.Path(path) / encoder.ENCODER_JSON).read_text())
                       for path in (tiny_export, tmp_path / "again"))
    assert exported.keys() == again.keys() and "layer" not in again
    assert encoder.load_encoder(str(tmp_path / "again")).layer is None


@pytest.mark.slow
def test_a_waveform_encoder_embeds_with_the_chosen_layer():
    """EncodecMAE (configs/encodecmae.py:runlocal at random init, random EnCodec): chunked frame features at
    layer 0, and every layer from one pass."""
    from audiojepa import methods
    from audiojepa.config_utils import load_config
    from audiojepa.data import resolve

    config = load_config("configs/encodecmae.py:runlocal")
    spec = resolve.resolve_data_spec(config.data)
    method = encodecmae.EncodecMAE(config.model, input_shape=(9600,))
    enc = encoder.AudioEncoder("encodecmae", config.model, (9600,), spec.frontend, (0.0, 1.0),
                               methods.random_encoder_params(method, jax.random.key(0)))
    wave = np.random.default_rng(0).standard_normal((2, 9600 + 1000)).astype(np.float32) * 0.1  # 30 + 4 frames
    final, first, every = (enc.with_layer(layer).embed_waveform(wave)[0] for layer in (None, 0, "all"))
    assert final.shape == first.shape == (2, 34, 64) and every.shape == (2, *final.shape)
    assert np.abs(first - final).max() > 1e-2
    np.testing.assert_allclose(every[0], first, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(every[1], final, rtol=1e-5, atol=1e-5)


# -- evaluate --layer ------------------------------------------------------------------------------------


_tones = task_helpers.tone_task


def test_the_layer_flag_takes_an_int_or_all(tiny_export, tmp_path):
    from audiojepa import evaluate

    assert [evaluate.parse_layer(v) for v in (None, "", "3", "-1", "all")] == [None, None, 3, -1, "all"]
    with pytest.raises(ValueError, match=r"--layer='last'.*integer.*all"):
        evaluate.parse_layer("last")
    with pytest.raises(ValueError, match=r"--layer=0: --encoder=logmel has no layers"):
        evaluate.run("logmel", [], str(tmp_path / "out"), layer=0)
    with pytest.raises(ValueError, match=rf"--layer=2, --encoder={tiny_export}: .*\[-2, 2\)"):
        evaluate.run(tiny_export, [], str(tmp_path / "out"), layer=2)


@pytest.mark.slow
def test_evaluate_cli_reports_every_layer(tiny_export, tmp_path):
    """--layer=all: one row per (encoder, layer) and per (random init, layer), one log-mel row; results.json
    keeps the final output's numbers on top and every layer's under "layers". --layer=0 records layer 0."""
    task = _tones(tmp_path / "tones")
    out = tmp_path / "all"
    from absl import flags

    from audiojepa import evaluate

    # The CLI's main with its flags as typed (in this process: a subprocess would import JAX and compile again).
    flag_values = flags.FlagValues()
    evaluate.define_flags(flag_values)
    flag_values(["evaluate", f"--encoder={tiny_export}", f"--task={task}", f"--output={out}", "--seeds=1",
                 "--layer=all"])
    evaluate.main(["evaluate"], flag_values=flag_values)
    names = [f"{tiny_export} (layer {k})" for k in range(TINY_DEPTH)] + ["logmel"] + \
        [f"random init (layer {k})" for k in range(TINY_DEPTH)]
    everything = json.loads((out / "all_results.json").read_text())
    assert set(everything["results"]) == set(names) and everything["layer"] == "all"
    table = (out / "results.md").read_text()
    assert [line.split(" | ")[1] for line in table.splitlines() if line.startswith("| tones |")] == names
    assert "Best layer" in table and "- tones: layer " in table
    tones = json.loads((out / "results.json").read_text())["tones"]
    assert tones["layer"] == TINY_DEPTH - 1 and sorted(tones["layers"]) == [str(k) for k in range(TINY_DEPTH)]
    for k in range(TINY_DEPTH):
        row = everything["results"][f"{tiny_export} (layer {k})"]["tones"]
        assert row["layer"] == k and tones["layers"][str(k)]["linear"] == row["linear"]
        assert tones["layers"][str(k)]["knn"] == row["knn"]
    assert tones["linear"] == tones["layers"][str(TINY_DEPTH - 1)]["linear"]

    out = tmp_path / "layer0"
    results = evaluate.run(tiny_export, [str(task)], str(out), baselines=False, seeds=(0,), layer=0)
    assert list(results) == [f"{tiny_export} (layer 0)"]
    assert json.loads((out / "results.json").read_text())["tones"]["layer"] == 0
    assert json.loads((out / "all_results.json").read_text())["layer"] == 0


def test_periodic_evaluation_takes_a_layer(tiny_export, tmp_path, monkeypatch):
    from audiojepa.evaluation import embedders, evaluators

    task = str(_tones(tmp_path / "tones"))
    (name, _, evaluator), = evaluators.from_config({"knn_l0": {"task": task, "every_steps": 5, "layer": 0}},
                                                   sample_rate=16000)
    assert (name, evaluator.layer) == ("knn_l0", 0)
    seen, real_embed_task = [], embedders.embed_task

    def embed_task(embedder, *args, **kwargs):
        seen.append(embedder.encoder.layer)
        return real_embed_task(embedder, *args, **kwargs)

    monkeypatch.setattr(embedders, "embed_task", embed_task)
    trained = encoder.load_encoder(tiny_export)
    assert dict(evaluator.run(trained))["knn"] >= 0 and seen == [0] and trained.layer is None
    with pytest.raises(ValueError, match=r"config.evals.bad.layer='last'"):
        evaluators.from_config({"bad": {"task": task, "every_steps": 5, "layer": "last"}}, sample_rate=16000)
