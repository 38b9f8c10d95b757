"""EncodecMAE weights out in the reference names (habla-liaa/encodecmae v1): audiojepa.convert.encodecmae_export and
tools/export_torch.py, the inverse of audiojepa.convert.encodecmae_torch (tools/convert_encodecmae.py).

The reference state dicts are tests/test_convert_matpac_encodecmae.py's: v1's names and shapes at our "tiny" size,
random values, with an EnCodec copy. Tolerances: the export only transposes, permutes and renames float32 arrays,
so tensors are compared bit for bit (np.array_equal), except the EnCodec conv kernels, which the reference stores
weight-normed as (g, v) with w = g·v/‖v‖: the export's g is ‖w‖ rounded to float32, so the kernel its (g, v)
resolve to is compared at 1 ulp (np.testing.assert_array_max_ulp), and its v is the kernel itself, bit for bit.
"""

import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file
from test_convert_matpac_encodecmae import encodecmae_state_dict

from audiojepa.adapters import encoder
from audiojepa.convert import encodecmae_export, encodecmae_torch
from audiojepa.methods import encodecmae
from audiojepa.models import encodec_torch
from audiojepa.ops import frontend

REPO = Path(__file__).resolve().parents[1]
# The RVQ's k-means state (EuclideanCodebook buffers): no params here, not written, ignored by the converter.
CODEBOOK_BUFFERS = ("._codebook.inited", "._codebook.cluster_size", "._codebook.embed_avg")
NUM_SAMPLES = 9600  # 0.4 s chunks: 30 EnCodec frames
V1_ORDER = ["wav_encoder", "target_encoder", "visible_encoder", "feat_projector", "decoder_projector",
            "positional_encoder", "head", "decoder", "extra_head"]


def _export_torch(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/export_torch.py", *flags], cwd=REPO, capture_output=True,
                          check=False, text=True, timeout=300)


def _params_tensors(state_dict: dict) -> dict:
    """The entries of a v1 state dict that are params here (all but the codebook buffers)."""
    return {name: value for name, value in state_dict.items() if not name.endswith(CODEBOOK_BUFFERS)}


def _assert_same_state_dict(exported: dict, reference: dict) -> None:
    """Every name of `reference`, nothing else, float32 C-contiguous, equal values (weight-normed convs: above)."""
    assert sorted(exported) == sorted(reference)
    for name, value in reference.items():
        got = np.asarray(exported[name])
        assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == np.shape(value), name
        if name.endswith("weight_v"):
            base = name.removesuffix("weight_v")
            kernel = encodec_torch.resolve_weight_norm(reference[base + "weight_g"], value)
            np.testing.assert_array_equal(got, kernel, err_msg=name)
            np.testing.assert_array_max_ulp(encodec_torch.resolve_weight_norm(exported[base + "weight_g"], got),
                                            kernel, maxulp=1)
        elif not name.endswith("weight_g"):  # weight_g: with its weight_v
            assert np.array_equal(got, value), name


def _assert_same_encodec(actual: dict, expected: dict) -> None:
    """EnCodec params equal: conv kernels to 1 ulp (weight norm), the rest bit for bit."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    np.testing.assert_array_equal(actual["codebooks"], expected["codebooks"])
    for (path, a), (_, b) in zip(jax.tree_util.tree_leaves_with_path(actual["encoder"]),
                                 jax.tree_util.tree_leaves_with_path(expected["encoder"])):
        if path[-1].key == "kernel":
            np.testing.assert_array_max_ulp(a, b, maxulp=1)
        else:
            np.testing.assert_array_equal(a, b, err_msg=str(path))


def _assert_trees_equal(actual, expected) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), actual, expected)


# -- the inverse of encodecmae_torch ---------------------------------------------------------------------------------


@pytest.mark.parametrize("share_ffn", [True, False])
def test_the_reference_state_dict_comes_back(share_ffn):
    reference = encodecmae_state_dict(share_ffn=share_ffn)  # self-trained: head and extra_head
    converted = encodecmae_torch.state_dict_to_params(reference)
    assert converted.model_config.share_ffn is share_ffn
    exported = encodecmae_export.params_to_state_dict(converted.params, {"encodec": converted.encodec},
                                                      model_config=converted.model_config)
    _assert_same_state_dict(exported, _params_tensors(reference))
    assert list(dict.fromkeys(name.split(".")[0] for name in exported)) == V1_ORDER
    assert list(exported)[:3] == [f"wav_encoder.model.model.0.conv.conv.{leaf}" for leaf in ("bias", "weight_g",
                                                                                                "weight_v")]
    layer = [name.removeprefix("visible_encoder.encoder_layers.1.") for name in exported
             if name.startswith("visible_encoder.encoder_layers.1.")]
    assert layer == [f"att_layer.w{w}.weight" for w in "qkvo"] + [
        f"{module}.{leaf}" for module in ("ff_layer.0", "ff_layer.2", "norm1", "norm2") for leaf in ("weight", "bias")]
    shared = (exported["decoder.encoder_layers.0.ff_layer.2.weight"] is
              exported["decoder.encoder_layers.1.ff_layer.2.weight"])
    assert shared is share_ffn  # the one FFN under every layer, as v1's state dict repeats its one module

    # ...and reads back into the same params (the EnCodec kernels to 1 ulp).
    again = encodecmae_torch.state_dict_to_params(exported)
    _assert_trees_equal(again.params, converted.params)
    _assert_same_encodec(again.encodec, converted.encodec)
    assert again.model_config.to_dict() == converted.model_config.to_dict()

    # The encoder alone: what encodecmae_torch.encoder_entries keeps (the EnCodec copy included).
    encoder_only = encodecmae_export.params_to_state_dict({**converted.params, "encodec": converted.encodec},
                                                          model_config=converted.model_config, encoder_only=True)
    _assert_same_state_dict(encoder_only, _params_tensors(encodecmae_torch.encoder_entries(reference)[0]))


def test_leaves_without_a_reference_name_are_an_error_listing_them():
    converted = encodecmae_torch.state_dict_to_params(encodecmae_state_dict())
    params, config = converted.params, converted.model_config
    targets = {"encodec": converted.encodec}

    def export(params, target_params=targets, **kwargs):
        return encodecmae_export.params_to_state_dict(params, target_params, model_config=config, **kwargs)

    learned = {**params, "mask_token": np.zeros(64, np.float32)}  # learned_mask_token=True (the paper's recipe)
    two_scales = {**params, "decoder_positions": {"scale": np.float32(0.5)}}
    with pytest.raises(ValueError, match=r"params/decoder_positions/scale \[\] \(= 0\.5; v1 has one "
                                         r"positional_encoder\.scale .*, params/mask_token \[64\]\. Known"):
        export({**learned, **two_scales})
    self_training = {**targets, "teacher": {"encoder_positions": {"scale": np.float32(1)}},
                     "centroids": np.zeros((8, 64), np.float32)}
    with pytest.raises(ValueError, match=r"target_params/teacher/encoder_positions/scale \[\], "
                                         r"target_params/centroids \[8, 64\]\..*tokenizer\.pkl"):
        export(params, self_training)
    odd_encodec = {**converted.encodec, "decoder": {"kernel": np.zeros(3, np.float32)}}
    with pytest.raises(ValueError, match=r"params/encodec/decoder"):
        export({**params, "encodec": odd_encodec}, None)
    # The encoder alone reads the encoder and the EnCodec copy: the rest is not its business.
    names = export({**learned, **two_scales}, self_training, encoder_only=True)
    assert not any(name.startswith(("decoder", "head", "extra_head")) for name in names)

    with pytest.raises(ValueError, match=r"0 EnCodec copies"):
        export(params, None)
    with pytest.raises(ValueError, match=r"2 EnCodec copies"):
        export({**params, "encodec": converted.encodec})
    pre_ln = config.copy_and_resolve_references()
    pre_ln.stack_type = "pre_ln"
    with pytest.raises(ValueError, match=r"stack_type='pre_ln'"):
        encodecmae_export.params_to_state_dict(params, targets, model_config=pre_ln)


# -- the CLI -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted_export(tmp_path_factory):
    """(reference state dict, export folder): the reference converted as tools/convert_encodecmae.py does, saved."""
    reference = encodecmae_state_dict(seed=3)
    converted = encodecmae_torch.state_dict_to_params(reference)
    params = {key: converted.params[key] for key in encodecmae.TEACHER_KEYS}
    params["encodec"] = encodecmae_torch.encodec_for_export(converted, None)
    folder = tmp_path_factory.mktemp("encodecmae") / "export"
    encoder.AudioEncoder("encodecmae", converted.model_config, (NUM_SAMPLES,), frontend.get_preset("encodec"),
                         (0.0, 1.0), params).save(str(folder))
    return reference, folder


def test_cli_exports_an_encoder_folder_as_the_reference_names_it(converted_export, tmp_path):
    reference, folder = converted_export
    weights = tmp_path / "encodecmae_tiny.safetensors"
    result = _export_torch(f"--encoder={folder}", f"--output={weights}")
    assert result.returncode == 0, result.stderr
    assert "encodecmae encoder of" in result.stderr and "(tiny, share_ffn=True, 8 codebooks, chunks of 9600 samples)" \
        in result.stderr
    # 1 shared FFN (16,576 values) under the 2 encoder layers: one repeat.
    assert re.search(r"wrote \d+ tensors, [\d,]+ values \(16,576 of them repeats of the shared FFN", result.stderr)

    exported = load_file(str(weights))
    _assert_same_state_dict(exported, _params_tensors(encodecmae_torch.encoder_entries(reference)[0]))
    loaded = encoder.load_encoder(str(folder))
    again = encodecmae_torch.state_dict_to_params(exported)  # what tools/convert_encodecmae.py reads
    _assert_trees_equal(again.params, {key: loaded.params[key] for key in encodecmae.TEACHER_KEYS})
    _assert_same_encodec(again.encodec, jax.tree.map(np.asarray, loaded.params["encodec"]))


def test_cli_pth_loads_with_torch(converted_export, tmp_path):
    torch = pytest.importorskip("torch", reason="the optional torch extra is not installed")
    reference, folder = converted_export
    weights = tmp_path / "encodecmae_tiny.pth"
    result = _export_torch(f"--encoder={folder}", f"--output={weights}")
    assert result.returncode == 0, result.stderr

    state_dict = torch.load(weights, map_location="cpu", weights_only=True)
    loaded = encoder.load_encoder(str(folder))
    expected = encodecmae_export.params_to_state_dict(loaded.params, model_config=loaded.model_config,
                                                      encoder_only=True)
    assert list(state_dict) == list(expected)  # v1's order, kept by torch.save
    for name, value in expected.items():
        assert state_dict[name].dtype == torch.float32, name
        assert np.array_equal(state_dict[name].numpy(), value), name
    _assert_same_state_dict({k: v.numpy() for k, v in state_dict.items()},
                            _params_tensors(encodecmae_torch.encoder_entries(reference)[0]))
    # The shared FFN is one storage, as in the reference's own checkpoints.
    first, second = (state_dict[f"visible_encoder.encoder_layers.{i}.ff_layer.0.weight"] for i in (0, 1))
    assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()


@pytest.mark.slow  # a 2-step training run
def test_workdir_exports_and_full_names_the_second_position_scale(tmp_path):
    from test_encodecmae_training import tiny_config

    from audiojepa.training import train

    workdir = str(tmp_path / "run")
    train.train_and_evaluate(tiny_config(total_steps=2, checkpoint_every_steps=2, log_every_steps=1), workdir,
                             num_devices=1)
    weights = tmp_path / "encoder.safetensors"
    result = _export_torch(f"--encoder={workdir}", f"--output={weights}")
    assert result.returncode == 0, result.stderr
    loaded = encoder.load_encoder(workdir)
    exported = load_file(str(weights))
    expected = encodecmae_export.params_to_state_dict(loaded.params, model_config=loaded.model_config,
                                                      encoder_only=True)
    assert sorted(exported) == sorted(expected)
    for name, value in expected.items():
        assert np.array_equal(exported[name], value), name
    again = encodecmae_torch.state_dict_to_params(exported)
    _assert_trees_equal(again.params, {key: loaded.params[key] for key in encodecmae.TEACHER_KEYS})

    # The run learned two position scales; v1 has one, so --full names the decoder's and writes nothing.
    method, state, _ = encoder.restore_train_state(workdir)
    params = jax.tree.map(np.asarray, state["params"])
    assert params["encoder_positions"]["scale"] != params["decoder_positions"]["scale"]
    full = tmp_path / "full.safetensors"
    result = _export_torch(f"--encoder={workdir}", f"--output={full}", "--full")
    assert result.returncode != 0 and not full.exists()
    assert "params/decoder_positions/scale []" in result.stderr and "--full writes v1's module" in result.stderr, \
        result.stderr
    # With one scale, the whole training state exports and reads back (decoder, head; the EnCodec to 1 ulp).
    params["decoder_positions"]["scale"] = params["encoder_positions"]["scale"].copy()
    target_params = jax.tree.map(np.asarray, state["target_params"])
    exported = encodecmae_export.params_to_state_dict(params, target_params, model_config=method.config)
    again = encodecmae_torch.state_dict_to_params(exported)
    _assert_trees_equal(again.params, params)
    _assert_same_encodec(again.encodec, target_params["encodec"])
