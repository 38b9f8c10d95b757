"""MATPAC: the classification head, teacher sharpening/centering, the head EMA, the loss mix, and a short
training run that must not collapse. NumPy re-derivations are the independent references (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from audiojepa import distillation, metrics, train
from audiojepa.config_utils import load_config, set_by_path
from audiojepa.methods import m2d
from audiojepa.methods.matpac import MATPAC, default_config
from audiojepa.models.cls_head import ClassificationHead

TOL = dict(rtol=1e-5, atol=1e-6)  # float32 against a float64 NumPy reference


def np_softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_head(params, x):
    """The head in NumPy: Linear/GELU(erf) MLP, L2 normalisation, weight-normalised prototypes."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = np.asarray(x, np.float64)
    layers = sorted(k for k in p if k.startswith("mlp_"))
    for i, name in enumerate(layers):
        x = x @ p[name]["kernel"] + p[name]["bias"]
        if i < len(layers) - 1:
            x = 0.5 * x * (1 + erf(x / np.sqrt(2)))
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    v, g = p["prototypes_direction"], p["prototypes_gain"]
    return x @ (v / np.linalg.norm(v, axis=0) * g)


def test_head_matches_numpy_and_weight_norm_gain():
    head = ClassificationHead(num_prototypes=48, hidden_dim=40, bottleneck_dim=16, num_layers=3)
    x = jax.random.normal(jax.random.key(0), (2, 5, 24))
    params = jax.jit(head.init)(jax.random.key(1), x)["params"]
    # A non-unit gain and a non-normalised direction: a missing normalisation or gain cannot hide.
    params["prototypes_gain"] = jnp.linspace(0.5, 2.0, 48)
    params["prototypes_direction"] = params["prototypes_direction"] * 3.0
    np.testing.assert_allclose(jax.jit(head.apply)({"params": params}, x), np_head(params, x), **TOL)

    def gain_grad(train_gain):
        module = head.clone(train_gain=train_gain)
        return jax.jit(jax.grad(lambda p: module.apply({"params": p}, x).sum()))(params)["prototypes_gain"]

    assert np.abs(gain_grad(True)).max() > 0
    assert np.abs(gain_grad(False)).max() == 0  # DINO's frozen gain


def test_teacher_temperature_is_linspace_then_constant():
    steps = np.arange(0, 30)
    warm = 20
    expected = np.concatenate([np.linspace(0.04, 0.07, warm), np.full(10, 0.07)])
    got = jax.vmap(lambda s: distillation.teacher_temperature(s, warm, 0.04, 0.07))(steps)
    np.testing.assert_allclose(got, expected, **TOL)
    assert float(distillation.teacher_temperature(5, 0, 0.04, 0.07)) == pytest.approx(0.07)


@pytest.mark.parametrize("center_from", ["logits", "probabilities"])
def test_loss_centre_and_monitors_match_numpy(center_from):
    rng = np.random.default_rng(0)
    teacher, student = rng.normal(size=(2, 2, 7, 12)) * 3
    center = rng.normal(size=12) * 0.1
    t_t, t_s = 0.05, 0.1

    p_t = np_softmax((teacher - center) / t_t)
    log_p_s = np.log(np_softmax(student / t_s))
    ce = -(p_t * log_p_s).sum(-1).mean()
    stat = (teacher if center_from == "logits" else p_t).reshape(-1, 12).mean(0)
    new_center = 0.9 * center + 0.1 * stat
    ent = -(p_t * np.log(p_t)).sum(-1).mean()
    marginal = p_t.reshape(-1, 12).mean(0)
    used = len(np.unique(p_t.reshape(-1, 12).argmax(-1)))

    f32 = lambda a: jnp.asarray(a, jnp.float32)
    got_p_t = distillation.teacher_probabilities(f32(teacher), f32(center), t_t)
    got_log_p_s = distillation.student_log_probabilities(f32(student), t_s)
    np.testing.assert_allclose(got_p_t, p_t, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(distillation.cross_entropy(got_p_t, got_log_p_s), ce, rtol=1e-5)
    stat_got = distillation.batch_center(f32(teacher), got_p_t, center_from)
    np.testing.assert_allclose(distillation.update_center(f32(center), stat_got, 0.9), new_center, **TOL)
    monitors = distillation.collapse_metrics(got_p_t, got_log_p_s)
    np.testing.assert_allclose(monitors["teacher_entropy"], ent, rtol=1e-4)
    np.testing.assert_allclose(monitors["teacher_marginal_entropy"], -(marginal * np.log(marginal)).sum(), rtol=1e-5)
    np.testing.assert_allclose(monitors["kl_teacher_student"], ce - ent, rtol=1e-4, atol=1e-5)
    assert monitors["prototypes_used"] == used
    with pytest.raises(ValueError, match="center_from"):
        distillation.batch_center(f32(teacher), got_p_t, "softmax")


def tiny_model_config(**overrides):
    config = default_config("tiny")
    config.update(dict(predictor_width=32, predictor_depth=1, predictor_heads=2, num_prototypes=32,
                       head_hidden_dim=48, head_bottleneck_dim=16, teacher_temp_warmup_epochs=2.0))
    config.update(overrides)
    return config


INPUT_SHAPE = (32, 48)  # 2 × 3 patches of 16×16


def test_loss_mixes_classification_and_m2d_prediction():
    method = MATPAC(tiny_model_config(), input_shape=INPUT_SHAPE, steps_per_epoch=5)
    params, target = method.init(jax.random.key(0))
    lms = jax.random.normal(jax.random.key(1), (3, *INPUT_SHAPE))
    visible, masked = method.sample_mask(jax.random.key(2), 3)
    step = 4
    loss_fn = lambda p: method.loss_from_indices(p, target, lms, visible, masked, step)
    (loss, aux), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)

    # The prediction part is exactly M2D's loss on the same params and mask (no target standardisation).
    plain = m2d.M2D(tiny_model_config(), input_shape=INPUT_SHAPE)
    m2d_loss, _ = jax.jit(plain.loss_from_indices)({k: params[k] for k in ("encoder", "predictor")},
                                                   target["encoder_stack"], lms, visible, masked)
    np.testing.assert_allclose(aux["loss_pred"], m2d_loss, **TOL)

    # The classification part, from the activations through the NumPy head (teacher = EMA head tree).
    out = jax.jit(method.forward_from_indices)(params, target["encoder_stack"], lms, visible, masked)
    temp = 0.04 + 0.03 * step / (2 * 5 - 1)  # warm-up over 2 epochs × 5 steps
    p_t = np_softmax(np_head(target["head"], out["target"]) / temp)  # centre is 0 at init
    log_p_s = np.log(np_softmax(np_head(params["head"], out["pred"]) / 0.1))
    np.testing.assert_allclose(aux["teacher_temp"], temp, **TOL)
    np.testing.assert_allclose(aux["loss_cls"], -(p_t * log_p_s).sum(-1).mean(), rtol=1e-4)
    np.testing.assert_allclose(loss, 0.5 * aux["loss_cls"] + 0.5 * aux["loss_pred"], **TOL)
    np.testing.assert_allclose(aux["state_update"], p_t.reshape(-1, 32).mean(0), rtol=1e-4, atol=1e-7)

    # Gradients are finite and reach the student head (the teacher side is a separate, stopped tree).
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert np.abs(grads["head"]["prototypes_direction"]).max() > 0


def test_update_targets_follows_the_two_ema_schedules_and_the_centre():
    method = MATPAC(tiny_model_config(head_ema_decay_init=0.9, head_ema_decay=1.0), input_shape=INPUT_SHAPE)
    params, target = method.init(jax.random.key(0))
    # The teacher head starts as an exact copy of the student head.
    for a, b in zip(jax.tree.leaves(params["head"]), jax.tree.leaves(target["head"])):
        np.testing.assert_array_equal(a, b)
    online = jax.tree.map(lambda p: p + 1.0, params)  # as if after an optimizer step
    total = 11
    stat = jnp.linspace(0.0, 1.0, 32)
    for step in (0, 5, 10, 20):
        new = method.update_targets(online, target, step, total, state_update=stat)
        tau_head = 0.9 + 0.1 * min(step / (total - 1), 1.0)
        expected_head = jax.tree.map(lambda t, o: tau_head * np.asarray(t, np.float64) + (1 - tau_head) * np.asarray(o),
                                     target["head"], online["head"])
        for a, b in zip(jax.tree.leaves(new["head"]), jax.tree.leaves(expected_head)):
            np.testing.assert_allclose(a, b, **TOL)
        tau_enc = float(method.ema_decay(step, total))
        leaf = lambda tree: jax.tree.leaves(tree)[0]
        np.testing.assert_allclose(leaf(new["encoder_stack"]),
                                   tau_enc * leaf(target["encoder_stack"]) + (1 - tau_enc) * leaf(online["encoder"]["stack"]),
                                   **TOL)
        np.testing.assert_allclose(new["center"], 0.1 * np.asarray(stat), **TOL)  # from a zero centre
    assert np.array_equal(method.update_targets(online, target, 0, total)["center"], target["center"])


def test_bad_config_values_name_the_key():
    with pytest.raises(ValueError, match="config.model.center_from"):
        MATPAC(tiny_model_config(center_from="mean"), input_shape=INPUT_SHAPE)
    with pytest.raises(ValueError, match="config.model.pred_loss_weight"):
        MATPAC(tiny_model_config(pred_loss_weight=1.5), input_shape=INPUT_SHAPE)
    with pytest.raises(KeyError, match="num_prototypes"):
        MATPAC({k: v for k, v in tiny_model_config().items() if k != "num_prototypes"}, input_shape=INPUT_SHAPE)
    method = MATPAC(tiny_model_config(), input_shape=INPUT_SHAPE)  # as the encoder loader builds it
    with pytest.raises(ValueError, match="steps_per_epoch"):
        method.teacher_temperature(0)


# Collapse floors for the short run below (K = 256 prototypes, log K = 5.55 nats): a collapsed teacher
# has one prototype in use and per-token entropy → 0 (sharpening wins) or marginal entropy → 0.
MIN_PROTOTYPES_USED = 8
MIN_TEACHER_ENTROPY = 0.5  # nats
MIN_MARGINAL_ENTROPY = 2.0  # nats


@pytest.mark.slow
def test_runlocal_trains_without_collapse(tmp_path):
    """configs/matpac.py:runlocal, shortened to 40 steps on 1 s crops of a 256-clip corpus, on one device
    (~30 s on 2 cores; 8 simulated devices give the same losses at twice the time).

    Measured at 40 steps: ~68 prototypes in use, teacher entropy ~4.4 nats, marginal entropy ~5.1 nats.
    The full 300-step runlocal (documented in the config) ends with ~40 prototypes in use and a teacher
    entropy of ~4 nats.
    """
    config = load_config("configs/matpac.py:runlocal")
    for key, value in {"total_steps": 40, "warmup_steps": 10, "log_every_steps": 10, "tensorboard": False,
                       "checkpoint_every_steps": 40, "data.embedded.num_clips": 256,
                       "data.embedded.duration_s": 1.0, "data.crop_frames": 96}.items():
        set_by_path(config, key, value)
    train.train_and_evaluate(config, str(tmp_path / "run"), num_devices=1)
    rows = [r for r in metrics.read_metrics(str(tmp_path / "run")) if "loss_cls" in r]
    first, last = rows[0], rows[-1]
    assert last["step"] == 40
    assert last["loss"] < first["loss"]
    assert last["loss_pred"] < first["loss_pred"]
    assert last["prototypes_used"] >= MIN_PROTOTYPES_USED
    assert last["teacher_entropy"] > MIN_TEACHER_ENTROPY
    assert last["teacher_marginal_entropy"] > MIN_MARGINAL_ENTROPY
    assert last["teacher_temp"] == pytest.approx(0.07)  # warm-up (1 epoch = 8 steps) is over


def test_recipe_optimizer_is_matpacs_not_m2ds():
    """matpac.yaml (shared/reference/jepa_family.md §4.3): fairseq's lr 3e-4 as the peak, not scaled by
    the batch as M2D's 3e-4 x 2048/256 = 2.4e-3, and Adam eps 1e-6; the rest is M2D's."""
    from audiojepa import optim
    config = load_config("configs/matpac.py")
    assert config.batch_size == 2048
    assert optim.peak_learning_rate(config.optim, config.batch_size) == pytest.approx(3e-4)
    assert config.optim.eps == 1e-6
    assert (config.optim.b1, config.optim.b2, config.optim.weight_decay, config.optim.grad_clip_norm) == (
        0.9, 0.95, 0.05, 3.0)
    m2d_config = load_config("configs/m2d.py")
    assert optim.peak_learning_rate(m2d_config.optim, m2d_config.batch_size) == pytest.approx(2.4e-3)
    assert m2d_config.optim.eps == 1e-8
