"""The papers' loss equations against NumPy transcriptions, and padding (variable-size masks) in the losses.

Riou et al. 2024, Eq. 2-3: L = (1/|T|) Σ_{j∈T} d(ẑ_j, z̄_j), d = ½‖z - z'‖₂² if ‖z - z'‖₁ < 1 else ‖z - z'‖₁ - ½.
Audio-JEPA (Tuncay et al. 2025), Eq. 2: L = (1/|M|) Σ_{j∈M} ‖ĉ_j - t_j‖₂².
Tolerance: float32 against float64, rel 1e-5.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from audiojepa.ops import losses


def _riou_eq3(z_hat: np.ndarray, z_bar: np.ndarray) -> float:
    """Eq. 2 with Eq. 3, one example: z_hat, z_bar [|T|, D] → scalar, written from the paper."""
    total = 0.0
    for a, b in zip(z_hat.astype(np.float64), z_bar.astype(np.float64)):
        l1 = np.sum(np.abs(a - b))
        total += 0.5 * np.sum((a - b) ** 2) if l1 < 1 else l1 - 0.5
    return total / len(z_hat)


def test_riou_eq3_both_branches():
    rng = np.random.default_rng(0)
    # Small errors: ‖d‖₁ < 1 (the quadratic branch) for half the tokens, large for the rest.
    target = rng.normal(size=(2, 6, 8)).astype(np.float32)
    pred = target + np.concatenate([rng.normal(size=(2, 3, 8)) * 0.01, rng.normal(size=(2, 3, 8))], axis=1)
    pred = pred.astype(np.float32)
    l1 = np.abs(pred - target).sum(-1)
    assert (l1 < 1).any() and (l1 >= 1).any()
    loss, _ = losses.prediction_loss(jnp.asarray(pred), jnp.asarray(target), loss_type="smooth_l1_token",
                                     target_norm="none")
    expected = np.mean([_riou_eq3(pred[b], target[b]) for b in range(2)])
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # It is not the per-element smooth L1 the released code uses.
    elementwise, _ = losses.prediction_loss(jnp.asarray(pred), jnp.asarray(target), loss_type="smooth_l1",
                                            target_norm="none")
    assert abs(float(elementwise) - expected) > 0.1


@pytest.mark.parametrize("loss_type", ["smooth_l1_token", "l2", "norm_mse", "smooth_l1", "mse"])
def test_padding_counts_for_nothing_and_each_example_averages_its_own_targets(loss_type):
    rng = np.random.default_rng(1)
    counts = [5, 2, 7]
    pred = rng.normal(size=(3, 7, 8)).astype(np.float32)
    target = rng.normal(size=(3, 7, 8)).astype(np.float32)
    valid = np.arange(7)[None] < np.array(counts)[:, None]
    loss, metrics = losses.prediction_loss(jnp.asarray(pred), jnp.asarray(target), loss_type=loss_type,
                                           target_norm="none", valid=jnp.asarray(valid))
    # Each example alone, with only its valid tokens: the unpadded loss of that example.
    alone = [float(losses.prediction_loss(jnp.asarray(pred[b:b + 1, :n]), jnp.asarray(target[b:b + 1, :n]),
                                          loss_type=loss_type, target_norm="none")[0]) for b, n in enumerate(counts)]
    assert float(loss) == pytest.approx(np.mean(alone), rel=1e-5)
    if loss_type == "smooth_l1_token":
        assert float(loss) == pytest.approx(np.mean([_riou_eq3(pred[b, :n], target[b, :n])
                                                     for b, n in enumerate(counts)]), rel=1e-5)
    # Perturbing padding changes neither the loss nor the collapse monitors.
    noisy = np.where(valid[:, :, None], pred, pred + 100 * rng.normal(size=pred.shape)).astype(np.float32)
    loss2, metrics2 = losses.prediction_loss(jnp.asarray(noisy), jnp.asarray(target), loss_type=loss_type,
                                             target_norm="none", valid=jnp.asarray(valid))
    assert float(loss2) == pytest.approx(float(loss), rel=1e-6)
    assert float(metrics2["pred_std"]) == pytest.approx(float(metrics["pred_std"]), rel=1e-5)


def test_audio_jepa_eq2_is_the_l2_loss():
    rng = np.random.default_rng(2)
    pred, target = rng.normal(size=(2, 9, 16)), rng.normal(size=(2, 9, 16))
    expected = np.mean([np.mean([np.sum((pred[b, j] - target[b, j]) ** 2) for j in range(9)]) for b in range(2)])
    loss, _ = losses.prediction_loss(jnp.asarray(pred, jnp.float32), jnp.asarray(target, jnp.float32), loss_type="l2",
                                     target_norm="none")
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_token_spread_with_valid_tokens_is_the_spread_of_those_tokens():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(2, 5, 6)).astype(np.float32)
    valid = np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], bool)
    kept = x[valid]
    unit = kept / np.linalg.norm(kept, axis=-1, keepdims=True)
    expected = unit.std(axis=0).mean() * np.sqrt(6)
    assert float(losses.token_spread(jnp.asarray(x), jnp.asarray(valid))) == pytest.approx(expected, rel=1e-5)
