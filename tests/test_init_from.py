"""Start a run from weights (issue 24 item 2): `config.init_from` = an export, a workdir, an official M2D state
dict (.npz / .pth) or a .safetensors in the official names. The matching leaves are loaded, the rest keep the
method's init, a shape mismatch is refused naming the tensor, and a resumed run ignores init_from."""

import logging
import os
import pathlib

import jax
import numpy as np
import pytest

from audiojepa.convert import m2d_torch
from audiojepa.methods import jepa, m2d
from audiojepa.training import init_from, train

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "shared" / "fixtures"
STATE_DICT = FIXTURES / "m2d" / "m2d_small_state_dict.npz"
needs_fixtures = pytest.mark.skipif(not STATE_DICT.exists(), reason=f"needs {STATE_DICT}")
INPUT_SHAPE = (80, 208)


def fixture_method(**keys) -> m2d.M2D:
    """The M2D of the parity fixture's size (tiny encoder, predictor 128 wide, 2 blocks)."""
    config = m2d.default_config("tiny")
    config.update(dict(predictor_width=128, predictor_depth=2, predictor_heads=4), **keys)
    return m2d.M2D(config, input_shape=INPUT_SHAPE)


def _flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_trees_equal(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        np.testing.assert_array_equal(fa[key], fb[key], err_msg=key)


# -- merging ------------------------------------------------------------------------------------------

def test_merge_loads_matching_leaves_and_reports_the_rest():
    fresh = {"encoder": {"w": np.zeros((2, 3)), "b": np.zeros(3)}, "head": {"w": np.zeros(4)}}
    loaded = {"encoder": {"w": np.ones((2, 3))}, "other": {"x": np.ones(1)}}
    merged, report = init_from.merge(fresh, loaded, source="src")
    np.testing.assert_array_equal(merged["encoder"]["w"], 1.0)
    np.testing.assert_array_equal(merged["encoder"]["b"], 0.0)
    assert report.loaded == ["encoder/w"] and report.kept == ["encoder/b", "head/w"] and report.unused == ["other/x"]


def test_merge_refuses_a_shape_mismatch_naming_the_tensor_and_the_source():
    fresh = {"encoder": {"w": np.zeros((2, 3))}}
    with pytest.raises(ValueError, match=r"src: encoder/w has shape \(3, 3\) there, \(2, 3\) in this model"):
        init_from.merge(fresh, {"encoder": {"w": np.ones((3, 3))}}, source="src")


def test_merge_refuses_a_source_with_nothing_that_matches():
    with pytest.raises(ValueError, match=r"src: none of its 1 tensors match this model"):
        init_from.merge({"encoder": {"w": np.zeros(2)}}, {"x": np.ones(2)}, source="src")


# -- sources ------------------------------------------------------------------------------------------

@needs_fixtures
@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_an_official_state_dict_fills_encoder_predictor_and_target(tmp_path, suffix):
    state = dict(np.load(STATE_DICT))
    path = str(tmp_path / f"m2d{suffix}")
    if suffix == ".npz":
        np.savez(path, **state)
    else:
        from safetensors.numpy import save_file
        save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, path)
    method = fixture_method()
    params, target = jax.jit(method.init)(jax.random.key(0))
    new_params, new_target, report = init_from.initialize(path, method, params, target, jax.random.key(1))
    expected_params, expected_target = m2d_torch.state_dict_to_params(state)
    _assert_trees_equal(new_params, expected_params)
    _assert_trees_equal(new_target, expected_target)
    assert report.kept == [] and "target" in report.describe()


@needs_fixtures
def test_an_encoder_export_fills_the_encoder_and_the_target_follows_the_method(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    export = tmp_path / "export"
    result = subprocess.run([sys.executable, "tools/convert_m2d.py", f"--checkpoint={STATE_DICT}",
                             f"--output={export}"], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    expected, _ = m2d_torch.state_dict_to_params(dict(np.load(STATE_DICT)))
    for copy_target in (True, False):
        method = fixture_method(init_target_from_online=copy_target)
        params, target = jax.jit(method.init)(jax.random.key(0))
        new_params, new_target, report = init_from.initialize(str(export), method, params, target,
                                                              jax.random.key(1))
        _assert_trees_equal(new_params["encoder"], expected["encoder"])
        _assert_trees_equal(new_params["predictor"], params["predictor"])  # not in an export: the method's init
        assert any(k.startswith("predictor/") for k in report.kept)
        if copy_target:  # the method's own target init, from the loaded encoder
            _assert_trees_equal(new_target, expected["encoder"]["stack"])
        else:
            _assert_trees_equal(new_target, method.init_target(jax.random.key(1), new_params))
            assert not np.array_equal(_flat(new_target)["['norm']['scale']"] * 0 + 1, 0)


@needs_fixtures
def test_a_shape_mismatch_names_the_tensor_and_the_config_key(tmp_path):
    method = fixture_method(width=256)
    params, target = jax.eval_shape(method.init, jax.random.key(0))
    with pytest.raises(ValueError, match=r"config\.init_from=.*m2d_small_state_dict\.npz: encoder/cls_token has "
                                         r"shape \(1, 1, 192\) there, \(1, 1, 256\) in this model"):
        init_from.initialize(str(STATE_DICT), method, params, target, jax.random.key(1))


def test_a_jepa_target_copies_the_loaded_encoder():
    config = jepa.default_config("tiny")
    config.update(predictor_width=32, predictor_depth=1, predictor_heads=2)
    method = jepa.JEPA(config, input_shape=(80, 64))
    params, target = jax.jit(method.init)(jax.random.key(0))
    donor, _ = jax.jit(method.init)(jax.random.key(5))
    new_params, new_target, _ = init_from.place(method, params, target, {"encoder": donor["encoder"]}, None,
                                                jax.random.key(1), source="donor")
    _assert_trees_equal(new_params["encoder"], donor["encoder"])
    _assert_trees_equal(new_target, donor["encoder"])


def test_a_missing_source_is_an_error_naming_it(tmp_path):
    method = fixture_method()
    params, target = jax.eval_shape(method.init, jax.random.key(0))
    with pytest.raises(FileNotFoundError, match=r"config\.init_from=.*nowhere: not an encoder export"):
        init_from.initialize(str(tmp_path / "nowhere"), method, params, target, jax.random.key(1))


# -- in a run -----------------------------------------------------------------------------------------

def test_a_run_starts_from_a_workdir_and_a_resume_ignores_init_from(tmp_path, caplog):
    import run_helpers as rh

    donor = str(tmp_path / "donor")
    train.train_and_evaluate(rh.tiny_config(total_steps=2), donor, num_devices=1)
    from audiojepa.adapters.encoder import restore_train_state
    _, donor_state, _ = restore_train_state(donor)

    run = str(tmp_path / "run")
    caplog.set_level(logging.INFO)
    # One step at learning rate 0 leaves the trained params as loaded (AdamW's decay is scaled by the rate too).
    train.train_and_evaluate(rh.tiny_config(total_steps=1, init_from=donor, seed=7, **{"optim.lr": 0.0}), run,
                             num_devices=1)
    assert "config.init_from" in caplog.text and "loaded" in caplog.text
    _, run_state, _ = restore_train_state(run)
    _assert_trees_equal(run_state["params"], donor_state["params"])
    assert int(run_state["step"]) == 1

    caplog.clear()  # resuming (the finished run: nothing to train): the checkpoint wins, init_from is ignored
    train.train_and_evaluate(rh.tiny_config(total_steps=1, init_from=str(tmp_path / "gone"), seed=7,
                                            **{"optim.lr": 0.0}), run, num_devices=1)
    assert "config.init_from" in caplog.text and "ignored" in caplog.text
