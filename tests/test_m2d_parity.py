"""Parity of the M2D port with the official PyTorch code (shared/fixtures/m2d, see its README).

Tolerances: float32 activations and losses within ATOL = 1e-4 absolute (measured: ≤ ~3e-6);
gradients within GRAD_RTOL = 1e-4 of each tensor's largest torch gradient (max |Δ| / max |g_torch|),
and the global gradient norm within 1e-4 relative. One AdamW step + EMA: the parameters after it within
1e-4 absolute, and the step itself (after − before, against torch's after − before) within 4 float32 ulps of
the tensor's largest |p|: the EMA moves the target by ≤ 2.2e-5 and the weight decay a parameter by
lr·wd·|p| ≤ 7e-6, both far below 1e-4 but ≥ 10× that tolerance (_assert_step_matches_torch).
"""

import os
from pathlib import Path

import jax
import numpy as np
import pytest

from audiojepa.convert import m2d_torch
from audiojepa.methods import m2d

ATOL = 1e-4
GRAD_RTOL = 1e-4
# AdamW's epsilon in the fixture's step. Its first step is lr·g/(|g| + eps) per element: where |g| < 100·eps,
# that turns float32 gradient rounding (ours and torch's differ by ~1e-9 there) into up to ~1e-5 of update.
ADAM_EPS = 1e-8

FIXTURES = Path(os.environ.get("AUDIOJEPA_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
M2D_FIXTURES = FIXTURES / "m2d"
STATE_DICT = M2D_FIXTURES / "m2d_small_state_dict.npz"
OUTPUTS = M2D_FIXTURES / "m2d_parity_outputs.npz"

pytestmark = pytest.mark.skipif(
    not (STATE_DICT.exists() and OUTPUTS.exists()),
    reason=f"M2D parity fixtures not found under {M2D_FIXTURES} (set AUDIOJEPA_FIXTURES to the shared/fixtures "
           "folder; a plain clone has none).")

INPUT_SHAPE = (80, 208)
GRID = (5, 13)


def fixture_config():
    """The fixture model: ViT 192 wide, depth 2, 3 heads ("tiny"); predictor 128 wide, depth 2, 4 heads."""
    config = m2d.default_config("tiny")
    config.predictor_width = 128
    config.predictor_depth = 2
    config.predictor_heads = 4
    return config


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(OUTPUTS))


@pytest.fixture(scope="module")
def state_dict():
    return dict(np.load(STATE_DICT))


@pytest.fixture(scope="module")
def method():
    return m2d.M2D(fixture_config(), input_shape=INPUT_SHAPE)


@pytest.fixture(scope="module")
def converted(state_dict):
    return m2d_torch.state_dict_to_params(state_dict, grid_size=GRID)


@pytest.fixture(scope="module")
def inputs(ref):
    keep = int(ref["len_keep"])
    ids_shuffle = ref["ids_shuffle"].astype(np.int32)
    return ref["input_lms"][:, 0], ids_shuffle[:, :keep], ids_shuffle[:, keep:]


def max_abs(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_fixture_model_is_tiny_variant(method, state_dict):
    assert method.width == state_dict["cls_token"].shape[-1]
    assert method.num_visible == 19 and method.num_patches == 65


def test_converted_trees_match_init_structure(method, converted):
    params, target_params = converted
    init_params, init_target = jax.eval_shape(method.init, jax.random.key(0))
    assert jax.tree.structure(params) == jax.tree.structure(init_params)
    assert jax.tree.structure(target_params) == jax.tree.structure(init_target)
    for ours, theirs in ((params, init_params), (target_params, init_target)):
        for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
            assert a.shape == b.shape and a.dtype == np.float32


def test_converter_rejects_unknown_names(state_dict):
    with pytest.raises(ValueError, match="blocks.0.attn.qkv.scale"):
        m2d_torch.state_dict_to_params({**state_dict, "blocks.0.attn.qkv.scale": np.zeros(3)})


def test_converted_block_rows_are_the_torch_blocks(state_dict, converted):
    """Row i of every stacked leaf is torch's blocks.i tensor (transposed for kernels), for all three stacks."""
    params, target_params = converted
    trees = {"params": params, "target_params": target_params}
    checked = 0
    for name, value in state_dict.items():
        where = m2d_torch.torch_name_to_path(name)
        if where is None or not isinstance(where[1][-1], int):
            continue
        tree, path = where
        expected = value.T if path[-2] == "kernel" else value
        np.testing.assert_array_equal(_leaf(trees[tree], path), expected, err_msg=name)
        checked += 1
    assert checked == 3 * 2 * 12  # encoder, predictor and target stacks of depth 2, 12 tensors per block


def test_converter_needs_every_block_of_a_stack(state_dict):
    partial = {name: value for name, value in state_dict.items() if not name.startswith("decoder_blocks.0.")}
    with pytest.raises(ValueError, match="blocks_0 missing among blocks_0 … blocks_1"):
        m2d_torch.state_dict_to_params(partial)


def test_position_tables_match(state_dict):
    m2d_torch.check_pos_table("pos_embed", state_dict["pos_embed"], GRID)
    m2d_torch.check_pos_table("decoder_pos_embed", state_dict["decoder_pos_embed"], GRID)
    with pytest.raises(ValueError, match="pos_embed"):
        m2d_torch.check_pos_table("pos_embed", state_dict["pos_embed"], (13, 5))


def test_unmasked_encoder(method, converted, inputs, ref):
    params, _ = converted

    @jax.jit
    def run(params, lms):
        encoder = {"params": params["encoder"]}
        patches = method.encoder.apply(encoder, lms, method=lambda enc, x: enc.patch_embed(x))
        out, layers = method.encoder.apply(encoder, lms, return_layers=True)
        return patches, out, layers, method.encode(params, lms)

    patches, out, layers, encoded = run(params, inputs[0])
    assert max_abs(patches, ref["patch_embed_out"]) < ATOL
    assert max_abs(out, ref["enc_unmasked"]) < ATOL
    assert max_abs(encoded, ref["enc_unmasked"]) < ATOL
    # The official layer list is every block's output with the last one replaced by the normed output.
    official_layers = ref["enc_unmasked_layers"]
    assert max_abs(layers[:-1], official_layers[:-1]) < ATOL
    assert max_abs(out, official_layers[-1]) < ATOL


@pytest.fixture(scope="module")
def forward_and_grads(method, converted, inputs):
    """(activations, loss, metrics, grads w.r.t. params) of the default loss, from one compiled function."""
    params, target_params = converted

    def loss_fn(params):
        out = method.forward_from_indices(params, target_params, *inputs)
        loss, metrics = method.loss_from_indices(params, target_params, *inputs)
        return loss, (out, metrics)

    (loss, (out, metrics)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    return jax.tree.map(np.asarray, (out, loss, metrics, grads))


def test_masked_forward(forward_and_grads, ref):
    out = forward_and_grads[0]
    assert max_abs(out["context"], ref["latent_masked"]) < ATOL
    assert max_abs(out["target_tokens"], ref["x_targ"]) < ATOL
    assert max_abs(out["target"], ref["target"]) < ATOL
    assert max_abs(out["pred"], ref["pred"]) < ATOL


def test_predictor_at_all_positions(method, converted, inputs, forward_and_grads, ref):
    """The predictor asked for every position gives the un-shuffled decoder output."""
    params, _ = converted
    lms, visible_idx, _ = inputs
    all_positions = np.broadcast_to(np.arange(65, dtype=np.int32), (lms.shape[0], 65))
    pred = jax.jit(method.predictor.apply)({"params": params["predictor"]}, forward_and_grads[0]["context"],
                                           visible_idx, all_positions)
    assert max_abs(pred, ref["pred_all_positions"]) < ATOL


def test_loss(forward_and_grads, ref):
    _, loss, metrics, _ = forward_and_grads
    assert abs(float(loss) - float(ref["loss"])) < ATOL
    assert float(metrics["loss"]) == float(loss)


@pytest.mark.parametrize("loss_type, norm_target, key", [
    ("norm_mse", True, "loss"),
    ("norm_mse", False, "loss_no_norm_pix"),
    ("mse", True, "loss_mse_norm_pix"),
])
def test_loss_options(forward_and_grads, ref, loss_type, norm_target, key):
    out = forward_and_grads[0]
    loss_fn = jax.jit(m2d.prediction_loss, static_argnames=("loss_type", "norm_target"))
    loss, _ = loss_fn(out["pred"], out["target"], loss_type=loss_type, norm_target=norm_target)
    assert abs(float(loss) - float(ref[key])) < ATOL


def _torch_grads_as_tree(ref):
    grads = {name[len("grad/"):]: value for name, value in ref.items() if name.startswith("grad/")}
    params, target = m2d_torch.state_dict_to_params(grads)
    assert target is None
    return params


@pytest.fixture(scope="module")
def grads(forward_and_grads):
    return forward_and_grads[3]


def test_gradients(grads, ref):
    expected = _torch_grads_as_tree(ref)
    assert jax.tree.structure(grads) == jax.tree.structure(expected)
    worst = 0.0
    for (path, ours), theirs in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(expected)):
        scale = float(np.max(np.abs(theirs)))
        relative = max_abs(ours, theirs) / scale
        worst = max(worst, relative)
        assert relative < GRAD_RTOL, f"{jax.tree_util.keystr(path)}: {relative:.2e} of max |g| {scale:.2e}"
    norm = float(np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in jax.tree.leaves(grads))))
    assert abs(norm - float(ref["grad_global_norm_preclip"])) < 1e-4 * norm


def test_one_training_step(method, converted, grads, ref, state_dict):
    """clip 3.0 → AdamW(1e-3, 0.9/0.95, wd 0.05 on weight_decay_mask) → update_targets at τ = 0.99995."""
    params, target_params = converted
    mask = method.weight_decay_mask(params)
    trainable = [name[len("grad/"):] for name in ref if name.startswith("grad/")]
    decayed = {name for name in trainable if _leaf(mask, m2d_torch.torch_name_to_path(name)[1])}
    assert decayed == set(str(n) for n in ref["wd_param_names"])

    # First AdamW step in NumPy (bias-corrected moments are g and g²); the global norm 2.16 < 3 leaves
    # clipping inactive.
    lr, weight_decay, eps = float(ref["step_lr"]), float(ref["step_weight_decay"]), ADAM_EPS

    def adamw_first_step(p, g, decay):
        p, g = np.asarray(p, np.float64), np.asarray(g, np.float64)
        return (p - lr * (g / (np.abs(g) + eps) + (weight_decay * p if decay else 0.0))).astype(np.float32)

    new_params = jax.tree.map(adamw_first_step, params, grads, mask)
    # The fixture's τ = 0.99995 is ema_decay_init, i.e. τ at step 0.
    assert abs(float(method.ema_decay(0, 1000)) - float(ref["step_ema_decay"])) < 1e-9
    new_target = jax.jit(method.update_targets, static_argnums=3)(new_params, target_params, 0, 1000)
    _assert_step_matches_torch({"params": new_params, "target_params": new_target}, state_dict, ref)


def _assert_step_matches_torch(ours, state_dict, ref):
    """Every `after_step/` tensor of the fixture: our value after the step within ATOL of torch's, and our
    update (after − before) equal to torch's within 4 ulps of float32 at the tensor's largest |before| (the
    rounding of the two float32 values), on the elements whose torch gradient is ≥ 100·eps (≥ 98.8% of
    every tensor here; all elements of the EMA targets). That tolerance is ≥ 10× below what it must see:
    the weight decay lr·wd·|p| of a decayed tensor and the EMA's move of a target tensor."""
    lr, weight_decay = float(ref["step_lr"]), float(ref["step_weight_decay"])
    decayed = {str(n) for n in ref["wd_param_names"]}
    seen = {"ema": 0, "weight_decay": 0}
    for key, value in ref.items():
        if not key.startswith("after_step/"):
            continue
        name = key[len("after_step/"):]
        tree, path, expected = m2d_torch.convert_tensor(name, value)
        before = m2d_torch.convert_tensor(name, state_dict[name])[2].astype(np.float64)
        after = np.asarray(_leaf(ours[tree], path), np.float64)
        assert max_abs(after, expected) < ATOL, name
        kept = np.ones(before.shape, bool)
        if f"grad/{name}" in ref:
            kept = np.abs(m2d_torch.convert_tensor(name, ref[f"grad/{name}"])[2]) >= 100 * ADAM_EPS
            assert kept.mean() > 0.98, name
        tolerance = 4 * float(np.spacing(np.float32(np.abs(before).max())))
        ref_update = expected.astype(np.float64) - before
        worst = float(np.abs((after - before) - ref_update)[kept].max())
        assert worst < tolerance, (f"{name}: the step differs from torch's by {worst:.2e} (tolerance {tolerance:.1e}; "
                                   f"largest step {np.abs(ref_update).max():.2e})")
        if tree == "target_params":
            assert np.abs(ref_update).max() > 10 * tolerance, name  # a missing EMA would show
            seen["ema"] += 1
        if name in decayed:
            assert lr * weight_decay * np.abs(before[kept]).max() > 10 * tolerance, name  # so would a missing decay
            seen["weight_decay"] += 1
    assert seen["ema"] >= 3 and seen["weight_decay"] >= 3, seen


def _leaf(tree, path):
    """The entry at path (m2d_torch.torch_name_to_path); a trailing block index picks the row of a stacked
    array, and a per-leaf value (a mask's bool) applies to every row."""
    for key in path:
        if isinstance(key, int) and np.ndim(tree) == 0:
            continue
        tree = tree[key]
    return tree


def test_one_training_step_with_the_project_optimizer(method, converted, grads, ref, state_dict):
    """The same step through audiojepa.ops.optim (optax clip + AdamW with the method's decay mask)."""
    import ml_collections
    import optax

    from audiojepa.ops import optim

    params, target_params = converted
    optim_config = ml_collections.ConfigDict({"name": "adamw", "b1": 0.9, "b2": 0.95, "eps": ADAM_EPS,
                                              "weight_decay": float(ref["step_weight_decay"]),
                                              "grad_clip_norm": 3.0})
    tx = optim.make_optimizer(optim_config, float(ref["step_lr"]), method.weight_decay_mask(params))

    @jax.jit  # one compile instead of one eager dispatch (and compile) per optimizer op and leaf
    def step(params, target_params, grads):
        updates, _ = tx.update(grads, tx.init(params), params)
        new_params = optax.apply_updates(params, updates)
        return new_params, method.update_targets(new_params, target_params, 0, 1000)

    new_params, new_target = step(params, target_params, grads)
    _assert_step_matches_torch({"params": new_params, "target_params": new_target}, state_dict, ref)
