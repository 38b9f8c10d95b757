"""audiojepa.ops.optim's gradient clipping against optax's, the learning-rate schedule against its formula in
NumPy, and the trainer's update step (a branch on a finite loss and gradient norm) against a plain optax
reference step.

Tolerances: the clip multiplies by one scalar where optax divides and multiplies, so values agree to a
few float32 ulps (rtol 1e-6); the trainer's step uses the same ops as the reference apart from that
clip, so params agree to 1e-6 absolute after one step of lr 1e-3 (with AdamW's eps at 1e-3, see setup).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from audiojepa import config_utils
from audiojepa.data import pipeline
from audiojepa.methods import m2d
from audiojepa.ops import frontend, optim
from audiojepa.training import train

INPUT_SHAPE = (32, 64)  # 2 x 4 patches


@pytest.mark.parametrize("max_norm", [0.5, 3.0, 1e6])  # clipped hard, clipped a little, not clipped
def test_clip_by_global_norm_matches_optax(max_norm):
    rng = np.random.default_rng(0)
    grads = {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": {"c": rng.standard_normal(7).astype(np.float32)}}
    norm = float(np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in jax.tree.leaves(grads))))
    ours, theirs = optim.clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
    assert jax.tree.structure(ours.init(grads)) == jax.tree.structure(theirs.init(grads))
    clipped, _ = jax.jit(ours.update)(grads, ours.init(grads))
    expected, _ = theirs.update(grads, theirs.init(grads))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), clipped, expected)
    clipped_norm = float(np.sqrt(sum(np.sum(np.square(g, dtype=np.float64)) for g in jax.tree.leaves(clipped))))
    assert clipped_norm == pytest.approx(min(norm, max_norm), rel=1e-6)
    # A norm passed in (as the trainer does) gives the same result, in make_optimizer's chain too.
    given, _ = jax.jit(ours.update)(grads, ours.init(grads), grad_norm=jnp.float32(norm))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), given, clipped)
    for clip_norm in (max_norm, 0.0):  # 0: no clip in the chain; the extra argument is ignored
        config = ml_collections.ConfigDict(dict(b1=0.9, b2=0.95, weight_decay=0.0, grad_clip_norm=clip_norm))
        tx = optim.make_optimizer(config, 1e-3, jax.tree.map(lambda _: False, grads))
        with_norm, _ = tx.update(grads, tx.init(grads), grads, grad_norm=jnp.float32(norm))
        without, _ = tx.update(grads, tx.init(grads), grads)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), with_norm, without)


@pytest.fixture(scope="module")
def setup():
    config = m2d.default_config("tiny")
    config.update(dict(predictor_width=64, predictor_depth=1, predictor_heads=4))
    method = m2d.M2D(config, input_shape=INPUT_SHAPE)
    params, target_params = jax.jit(method.init)(jax.random.key(0))
    # grad_clip_norm small enough to clip. eps 1e-3 (not 1e-8) keeps AdamW's first step, lr·g/(|g| + eps),
    # from amplifying rounding-level gradient differences (the two steps are compiled differently) for
    # gradients near zero.
    optim_config = ml_collections.ConfigDict(dict(lr=1e-3, min_lr=0.0, b1=0.9, b2=0.95, eps=1e-3, weight_decay=0.05,
                                                  grad_clip_norm=0.5))
    schedule = optax.constant_schedule(1e-3)
    tx = optim.make_optimizer(optim_config, schedule, method.weight_decay_mask(params))
    spec = pipeline.DataSpec((), frontend.get_preset("m2d"), INPUT_SHAPE[1], 0.0, 1.0, 0)
    step = jax.jit(train.make_train_step(method, tx, schedule, spec, device_frontend=False, total_steps=10),
                   donate_argnums=0)
    state = {"step": jnp.asarray(3, jnp.int32), "params": params, "target_params": target_params,
             "opt_state": tx.init(params)}
    lms = jax.random.normal(jax.random.key(3), (2, *INPUT_SHAPE))
    return method, step, state, lms


def _batch(lms):
    return {"lms": lms, "skipped_records": jnp.zeros((lms.shape[0],), jnp.int32)}


def test_train_step_matches_a_plain_optax_step(setup):
    method, step, state, lms = setup
    expected_state = jax.device_get(state)
    rng = jax.random.key(4)
    new_state, metrics = step(jax.tree.map(jnp.copy, state), _batch(lms), rng)

    # Reference: the same loss and gradients, then optax's own clip and AdamW, apply, EMA.
    @jax.jit  # one compile rather than an eager dispatch per op and leaf
    def reference(state):
        loss_fn = lambda p: method.loss(p, state["target_params"], {"lms": lms}, jax.random.fold_in(rng, 3), 3)
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        tx = optax.chain(optax.clip_by_global_norm(0.5),
                         optax.adamw(1e-3, b1=0.9, b2=0.95, eps=1e-3, weight_decay=0.05,
                                     mask=method.weight_decay_mask(state["params"])))
        updates, _ = tx.update(grads, tx.init(state["params"]), state["params"])
        params = optax.apply_updates(state["params"], updates)
        return loss, grads, params, method.update_targets(params, state["target_params"], 3, 10)

    loss, grads, params, target = reference(state)
    assert float(optax.tree.norm(grads)) > 0.5  # the clip was active
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
    assert int(metrics["nonfinite"]) == 0 and int(new_state["step"]) == 4
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6),
                 (new_state["params"], new_state["target_params"]), (params, target))
    moved = [float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(new_state["params"]),
                                                            jax.tree.leaves(expected_state["params"]))]
    assert min(moved) > 0  # every param leaf changed


def test_nonfinite_step_keeps_params_moments_and_target_bit_for_bit(setup):
    _, step, state, lms = setup
    before = jax.device_get(state)
    lms = lms.at[0, 0, 0].set(jnp.nan)
    new_state, metrics = step(jax.tree.map(jnp.copy, state), _batch(lms), jax.random.key(4))
    assert int(metrics["nonfinite"]) == 1 and int(new_state["step"]) == 4
    for key in ("params", "target_params", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(new_state[key]), before[key])


@pytest.mark.parametrize("eps", [1e-8, 1e-6])  # M2D's and MATPAC's
def test_optim_eps_reaches_adamw(eps):
    """AdamW's first step is -lr·g/(|g| + eps) per element (bias-corrected moments of one gradient):
    with gradients near eps, the config's eps decides the step (numpy formula, rtol 1e-5)."""
    grads = {"w": np.array([1e-7, 1e-6, 1e-3], np.float32)}
    config = ml_collections.ConfigDict(dict(b1=0.9, b2=0.95, eps=eps, weight_decay=0.0, grad_clip_norm=None))
    tx = optim.make_optimizer(config, 1e-3, {"w": False})
    updates, _ = tx.update(grads, tx.init(grads), grads)
    g = grads["w"].astype(np.float64)
    np.testing.assert_allclose(updates["w"], -1e-3 * g / (np.abs(g) + eps), rtol=1e-5)


@pytest.mark.parametrize("overrides, batch, peak", [
    (dict(lr=2e-3, min_lr=1e-5), 512, 2e-3),  # lr set: the batch size does not scale it
    (dict(base_lr=3e-4, min_lr=1e-6), 512, 3e-4 * 512 / 256),  # base_lr × batch / 256
])
def test_learning_rate_schedule_is_linear_warmup_then_cosine_to_min_lr(overrides, batch, peak):
    """Against the formula in NumPy: peak·s/W for s ≤ W (0 at step 0), then
    min_lr + (peak − min_lr)·(1 + cos(π·(s − W)/(T − W)))/2 up to T, min_lr after T. rtol 1e-6 (float32)."""
    config = config_utils.adamw_config(**overrides)
    assert optim.peak_learning_rate(config, batch) == pytest.approx(peak, rel=1e-12)
    warmup, total, min_lr = 10, 50, overrides["min_lr"]
    schedule = optim.learning_rate_schedule(config, global_batch_size=batch, total_steps=total, warmup_steps=warmup)
    steps = np.array([0, warmup // 2, warmup, (warmup + total) // 2, total, 2 * total])
    cosine = min_lr + (peak - min_lr) * (1 + np.cos(np.pi * (steps - warmup) / (total - warmup))) / 2
    expected = np.where(steps <= warmup, peak * steps / warmup, np.where(steps >= total, min_lr, cosine))
    np.testing.assert_allclose(expected, [0.0, peak / 2, peak, (peak + min_lr) / 2, min_lr, min_lr], rtol=1e-12)
    got = np.array([float(schedule(s)) for s in steps])
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)


def test_warmup_can_start_above_zero_as_audio_jepa():
    """Audio-JEPA (Tuncay et al. §IV.C): "ramps from 1e-6 to 3e-4 over 1,000 steps, then anneals to zero".
    Against init + (peak − init)·s/W in NumPy, rtol 1e-6 plus atol 1e-10 (optax interpolates in float32: a few ulps
    of the 3e-4 peak, ~3e-11 each); a start above the peak is an error naming the key."""
    config = config_utils.adamw_config(lr=3e-4, warmup_init_lr=1e-6)
    schedule = optim.learning_rate_schedule(config, global_batch_size=256, total_steps=5000, warmup_steps=1000)
    steps = np.array([0, 1, 500, 1000])
    expected = 1e-6 + (3e-4 - 1e-6) * steps / 1000
    np.testing.assert_allclose([float(schedule(s)) for s in steps], expected, rtol=1e-6, atol=1e-10)
    assert float(schedule(0)) > 0.9e-6  # not the 0 start of M2D's warm-up
    with pytest.raises(ValueError, match="warmup_init_lr"):
        optim.learning_rate_schedule(config_utils.adamw_config(lr=1e-4, warmup_init_lr=1e-3), global_batch_size=256,
                                     total_steps=10, warmup_steps=2)
