"""MATPAC weights out in the official names (aurianworld/matpac `GeneralModel.state_dict()`):
audiojepa.convert.matpac_export and `tools/export_torch.py --full`, the inverse of audiojepa.convert.matpac_torch
(tools/convert_matpac.py).

The reference state dicts are tests/test_convert_matpac_encodecmae.py's: the reference's names and shapes at our
"tiny" size, random values, nested `_ema` / `_cls_head_ema`. The export only transposes, reshapes and renames
float32 arrays, so tensors are compared bit for bit (np.array_equal); the one exception is a plain
`last_layer.weight` (weight norm removed), which comes out weight-normed as (row norms, itself) and resolves to
the same matrix to float32 rounding (rtol 1e-6). The PyTorch head is compared with ours at atol 1e-5 (float32
matmuls in two libraries).
"""

import re
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file
from test_convert_matpac_encodecmae import BOTTLENECK, GRID, WIDTH, K, matpac_state_dict

from audiojepa.adapters import encoder
from audiojepa.config_utils import load_config, set_by_path
from audiojepa.convert import matpac_export, matpac_torch, state_dict_io
from audiojepa.models.cls_head import ClassificationHead
from audiojepa.models.pos_embed import sincos_2d
from audiojepa.training import train

REPO = Path(__file__).resolve().parents[1]
# Written but not read back by matpac_torch (checked against the grid's sin-cos table, then ignored): the export
# rebuilds them from the grid, so they equal the reference's only because both are the same sin-cos table.
REBUILT = ("pos_embed", "decoder.decoder_pos_embed")
# GeneralModel.state_dict()'s order: its own params, the sub-modules as __init__ registers them, the EMA teachers.
GENERAL_MODEL_ORDER = ["cls_token", "pos_embed", "patch_embed", "student_encoder", "decoder", "cls_head_loss",
                       "cls_student_head", "_ema", "_cls_head_ema"]
HEADS = (matpac_torch.STUDENT_HEAD, matpac_torch.TEACHER_HEAD)
GRID_48 = (5, 3)  # the training runs' 80x48 crops with 16x16 patches


def _export_torch(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/export_torch.py", *flags], cwd=REPO, capture_output=True,
                          check=False, text=True, timeout=300)


def _assert_trees_equal(actual, expected) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), actual, expected)


def _assert_same_state_dict(exported: dict, reference: dict) -> None:
    """The names of `reference` and no others, each float32, C-contiguous, of its shape and values (bit for bit)."""
    assert sorted(exported) == sorted(reference)
    for name, value in reference.items():
        got = exported[name]
        assert got.dtype == np.float32 and got.flags.c_contiguous and got.shape == value.shape, name
        assert np.array_equal(got, value), name


def _with_heads(reference: dict, head: dict) -> dict:
    """`reference` with both classification heads replaced by `head` (names relative to the head)."""
    out = {k: v for k, v in reference.items() if not k.startswith(HEADS)}
    for prefix in HEADS:
        out.update({prefix + name: value for name, value in head.items()})
    return out


# -- the inverse of matpac_torch -------------------------------------------------------------------------------------


def test_the_reference_state_dict_comes_back_bit_for_bit():
    nested = matpac_state_dict()
    reference = matpac_torch.flatten(nested)
    params, target_params = matpac_torch.state_dict_to_params(reference, grid_size=GRID)
    exported = matpac_export.params_to_state_dict(params, target_params, grid_size=GRID)

    _assert_same_state_dict(exported, reference)  # every name, shape and value; nothing dropped, nothing added
    for name in REBUILT:  # ...the position tables because they are the grid's sin-cos tables
        np.testing.assert_array_equal(exported[name][0], sincos_2d(*GRID, exported[name].shape[-1]))
    assert list(dict.fromkeys(name.split(".")[0] for name in exported)) == GENERAL_MODEL_ORDER
    assert [name.removeprefix("decoder.") for name in exported if name.startswith("decoder.")][:4] == [
        "mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias"]
    assert [name for name in exported if name.startswith(matpac_torch.STUDENT_HEAD)] == [
        f"cls_student_head.{name}" for name in ("mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias",
                                                "mlp.4.weight", "mlp.4.bias", "last_layer.weight_g",
                                                "last_layer.weight_v")]
    assert exported["cls_head_loss.center"].shape == (1, 1, K)

    # ...reads back into the same trees, and nests the EMA teachers as GeneralModel.state_dict() holds them.
    again = matpac_torch.state_dict_to_params(exported, grid_size=GRID)
    _assert_trees_equal(again, (params, target_params))
    as_reference = matpac_export.nest(exported)
    assert sorted(as_reference) == sorted(nested)
    for teacher in matpac_export.NESTED:
        _assert_same_state_dict(as_reference[teacher], nested[teacher])
    assert list(as_reference["_ema"])[-2:] == ["norm.weight", "norm.bias"]  # encoder_layers: blocks, then norm


def test_other_head_layouts_that_matpac_torch_reads():
    rng = np.random.default_rng(5)
    reference = matpac_torch.flatten(matpac_state_dict(seed=1))
    g = rng.uniform(.5, 1.5, (K, 1)).astype(np.float32)
    v = rng.normal(0, .1, (K, BOTTLENECK)).astype(np.float32)
    # A one-layer head: the reference's `mlp` is the Linear itself.
    one_layer = {"mlp.weight": rng.normal(0, .1, (BOTTLENECK, WIDTH)).astype(np.float32),
                 "mlp.bias": rng.normal(0, .1, BOTTLENECK).astype(np.float32),
                 "last_layer.weight_g": g, "last_layer.weight_v": v}
    reference = _with_heads(reference, one_layer)
    params, target_params = matpac_torch.state_dict_to_params(reference, grid_size=GRID)
    assert sorted(params["head"]) == ["mlp_0", "prototypes_direction", "prototypes_gain"]
    _assert_same_state_dict(matpac_export.params_to_state_dict(params, target_params, grid_size=GRID), reference)

    # torch's newer weight-norm parametrisation: written under the older names, the same values.
    parametrized = {**{k: v for k, v in one_layer.items() if not k.startswith("last_layer.")},
                    "last_layer.parametrizations.weight.original0": g,
                    "last_layer.parametrizations.weight.original1": v}
    exported = matpac_export.params_to_state_dict(
        *matpac_torch.state_dict_to_params(_with_heads(reference, parametrized), grid_size=GRID), grid_size=GRID)
    _assert_same_state_dict(exported, reference)

    # Weight norm removed (a plain `last_layer.weight`): weight-normed again, the same matrix to rounding.
    weight = g * v / np.linalg.norm(v, axis=1, keepdims=True)
    plain = {**{k: v for k, v in one_layer.items() if not k.startswith("last_layer.")}, "last_layer.weight": weight}
    exported = matpac_export.params_to_state_dict(
        *matpac_torch.state_dict_to_params(_with_heads(reference, plain), grid_size=GRID), grid_size=GRID)
    for prefix in HEADS:
        g_out, v_out = exported[prefix + "last_layer.weight_g"], exported[prefix + "last_layer.weight_v"]
        np.testing.assert_array_equal(v_out, weight)
        np.testing.assert_allclose(g_out * v_out / np.linalg.norm(v_out, axis=1, keepdims=True), weight, rtol=1e-6)


def test_leaves_without_a_reference_name_are_an_error_listing_them():
    params, target_params = matpac_torch.state_dict_to_params(matpac_state_dict(), grid_size=GRID)
    n = GRID[0] * GRID[1]

    def export(params=params, target_params=target_params):
        return matpac_export.params_to_state_dict(params, target_params, grid_size=GRID)

    # config.model.pos_embed="learned" (recipe=paper): trainable tables in the encoder and the predictor.
    learned = {**params, "encoder": {**params["encoder"], "pos_embed": np.zeros((1, n, WIDTH), np.float32)},
               "predictor": {**params["predictor"], "pos_embed": np.zeros((1, 1 + n, 64), np.float32)}}
    with pytest.raises(ValueError, match=r"params/encoder/pos_embed \[1, 20, 192\], params/predictor/pos_embed "
                                         r"\[1, 21, 64\]\..*learned position table .*recipe=paper"):
        export(learned)
    odd_head = {**params, "head": {**params["head"], "scale": np.float32(2)}}
    odd_target = {**target_params, "encoder_stack": {**target_params["encoder_stack"], "extra": np.zeros(3)},
                  "teacher_cls": np.zeros((1, WIDTH))}
    with pytest.raises(ValueError, match=r"no official MATPAC name for params/head/scale \[\], "
                                         r"target_params/teacher_cls \[1, 192\]\. Known.*; no official M2D name for "
                                         r"target_params/encoder_stack/extra \[3\]\. Known"):
        export(odd_head, odd_target)
    gap = {k: v for k, v in params["head"].items() if k != "mlp_1"}  # mlp_0, mlp_2: not a ClassificationHead
    with pytest.raises(ValueError, match=r"params/head/mlp_0/kernel \[192, 24\], params/head/mlp_0/bias \[24\], "
                                         r"params/head/mlp_2/kernel \[24, 8\]"):
        export({**params, "head": gap})


def test_the_pytorch_head_computes_ours():
    """The exported cls_student_head.* loads (strict) into the reference's Cls_Head layout (a Sequential of
    Linear/GELU and a weight_norm Linear, as training_matpac/models/cls_head.py builds it) and gives our logits."""
    torch = pytest.importorskip("torch", reason="the optional torch extra is not installed")
    params, target_params = matpac_torch.state_dict_to_params(matpac_state_dict(seed=2), grid_size=GRID)
    exported = matpac_export.params_to_state_dict(params, target_params, grid_size=GRID)
    hidden = params["head"]["mlp_0"]["kernel"].shape[1]

    head = torch.nn.Module()
    head.mlp = torch.nn.Sequential(torch.nn.Linear(WIDTH, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, hidden),
                                   torch.nn.GELU(), torch.nn.Linear(hidden, BOTTLENECK))
    with warnings.catch_warnings():  # torch.nn.utils.weight_norm is deprecated; it is what the reference calls
        warnings.simplefilter("ignore", FutureWarning)
        head.last_layer = torch.nn.utils.weight_norm(torch.nn.Linear(BOTTLENECK, K, bias=False))
    prefix = matpac_torch.STUDENT_HEAD
    head.load_state_dict({k[len(prefix):]: torch.from_numpy(v) for k, v in exported.items() if k.startswith(prefix)},
                         strict=True)
    x = np.random.default_rng(3).normal(size=(2, 5, WIDTH)).astype(np.float32)
    with torch.no_grad():
        h = torch.nn.functional.normalize(head.mlp(torch.from_numpy(x)), dim=-1, p=2)
        theirs = head.last_layer(h).numpy()
    ours = ClassificationHead(num_prototypes=K, hidden_dim=hidden, bottleneck_dim=BOTTLENECK,
                              num_layers=3).apply({"params": params["head"]}, jnp.asarray(x))
    np.testing.assert_allclose(theirs, np.asarray(ours), atol=1e-5)


# -- the CLI on a training workdir -----------------------------------------------------------------------------------


def _train(workdir: str, recipe: str) -> str:
    """2 steps of configs/matpac.py:runlocal (tests/run_helpers.py's tiny sizes: batch 8, 80x48 crops)."""
    import run_helpers as rh

    config = load_config(f"configs/matpac.py:runlocal,recipe={recipe}")
    for key, value in {**rh.TINY, "total_steps": 2, "checkpoint_every_steps": 2}.items():
        set_by_path(config, key, value)
    train.train_and_evaluate(config, workdir, num_devices=1)
    return workdir


@pytest.fixture(scope="module")
def code_workdir(tmp_path_factory):
    """recipe=code: the reference code's fixed sin-cos tables, so the whole state has reference names."""
    return _train(str(tmp_path_factory.mktemp("matpac") / "run"), "code")


@pytest.mark.slow  # a 2-step training run (~35 s on 2 cores) and two exports (~9 s each)
def test_full_export_of_a_workdir_holds_the_checkpoint(code_workdir, tmp_path):
    full, plain = tmp_path / "matpac_full.safetensors", tmp_path / "matpac_encoder.safetensors"
    result = _export_torch(f"--encoder={code_workdir}", f"--output={full}", "--full")
    assert result.returncode == 0, result.stderr
    assert re.search(r"matpac encoder, predictor, classification heads, centre and EMA teachers of .* step 2 \(tiny, "
                     r"input 80x48p16x16, norm_stats", result.stderr), result.stderr
    assert re.search(r"wrote 105 tensors, [\d,]+ values \(4,096 of them in the fixed position tables\) to ",
                     result.stderr), result.stderr

    exported = load_file(str(full))
    _, state, _ = encoder.restore_train_state(code_workdir)
    assert "norm_stats" not in exported  # GeneralModel has none; matpac_torch would not read one
    # Every module of GeneralModel (a .safetensors sorts the names; the .pth test checks the order).
    assert list(dict.fromkeys(name.split(".")[0] for name in exported)) == sorted(GENERAL_MODEL_ORDER)
    params, target_params = matpac_torch.state_dict_to_params(exported, grid_size=GRID_48)
    _assert_trees_equal(params, state["params"])
    _assert_trees_equal(target_params, state["target_params"])
    # weight_g is the trained gain itself (not ‖v‖), weight_v the direction as is.
    np.testing.assert_array_equal(exported["cls_student_head.last_layer.weight_g"][:, 0],
                                  state["params"]["head"]["prototypes_gain"])

    # Without --full, the evaluated (online) encoder in M2D/timm names, as before: the same tensors.
    result = _export_torch(f"--encoder={code_workdir}", f"--output={plain}")
    assert result.returncode == 0, result.stderr
    encoder_only = load_file(str(plain))
    assert "blocks.0.attn.qkv.weight" in encoder_only and "norm_stats" in encoder_only
    assert not any(name.startswith("student_encoder.") for name in encoder_only)
    for name, value in encoder_only.items():
        if name != "norm_stats":
            assert np.array_equal(value, exported[matpac_export.from_m2d_name(name)]), name


@pytest.mark.slow  # as above, with torch
def test_full_pth_nests_the_ema_teachers_as_general_model_does(code_workdir, tmp_path):
    torch = pytest.importorskip("torch", reason="the optional torch extra is not installed")
    weights = tmp_path / "matpac_full.pth"
    result = _export_torch(f"--encoder={code_workdir}", f"--output={weights}", "--full")
    assert result.returncode == 0, result.stderr
    assert "UserWarning" not in result.stderr  # no read-only arrays handed to torch.from_numpy

    state_dict = torch.load(weights, map_location="cpu", weights_only=True)
    assert list(dict.fromkeys(name.split(".")[0] for name in state_dict)) == GENERAL_MODEL_ORDER
    _, state, _ = encoder.restore_train_state(code_workdir)
    expected = matpac_export.params_to_state_dict(state["params"], state["target_params"], grid_size=GRID_48)
    as_reference = matpac_export.nest(expected)
    assert list(state_dict) == list(as_reference)
    for teacher in matpac_export.NESTED:
        assert isinstance(state_dict[teacher], dict) and list(state_dict[teacher]) == list(as_reference[teacher])
    flat = state_dict_io.read_state_dict(str(weights))  # what tools/convert_matpac.py reads
    _assert_same_state_dict(flat, expected)
    params, target_params = matpac_torch.state_dict_to_params(flat, grid_size=GRID_48)
    _assert_trees_equal(params, state["params"])
    _assert_trees_equal(target_params, state["target_params"])
