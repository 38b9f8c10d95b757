"""Unstructured masks as fixed-length index arrays."""

import jax
import numpy as np
import pytest

from audiojepa import masking


@pytest.mark.parametrize("num_patches, mask_ratio, expected", [
    (65, 0.7, 19),    # 65·(1 - 0.7) = 19.500000000000004
    (190, 0.7, 57),
    (190, 0.6, 76),
    (65, 0.6, 26),
    (310, 0.7, 93),
    (65, 0.0, 65),
])
def test_num_visible(num_patches, mask_ratio, expected):
    assert masking.num_visible(num_patches, mask_ratio) == expected


@pytest.mark.parametrize("mask_ratio", [-0.1, 1.0, 1.5])
def test_num_visible_rejects_bad_ratio(mask_ratio):
    with pytest.raises(ValueError, match="mask_ratio"):
        masking.num_visible(65, mask_ratio)


def test_visible_and_masked_partition_every_example():
    visible, masked = jax.jit(masking.random_unstructured, static_argnums=(1, 2, 3))(jax.random.key(0), 16, 190, 0.7)
    assert visible.shape == (16, 57) and masked.shape == (16, 133)
    assert visible.dtype == np.int32 and masked.dtype == np.int32
    visible, masked = np.asarray(visible), np.asarray(masked)
    for v, m in zip(visible, masked):
        assert not set(v) & set(m)
        np.testing.assert_array_equal(np.sort(np.concatenate([v, m])), np.arange(190))
    assert len({tuple(v) for v in visible}) == 16  # examples get different masks


def test_one_compilation_for_many_keys():
    traces = 0

    def sample(rng):
        nonlocal traces
        traces += 1
        return masking.random_unstructured(rng, 8, 65, 0.7)

    sample = jax.jit(sample)
    draws = [np.asarray(sample(jax.random.key(i))[0]) for i in range(20)]
    assert traces == 1
    assert len({d.tobytes() for d in draws}) == 20


def test_positions_are_uniformly_visible_and_masked():
    batch, num_patches, keep = 4000, 65, 19
    visible, masked = jax.jit(masking.random_unstructured, static_argnums=(1, 2, 3))(
        jax.random.key(1), batch, num_patches, 0.7)
    visible_counts = np.bincount(np.asarray(visible).ravel(), minlength=num_patches)
    masked_counts = np.bincount(np.asarray(masked).ravel(), minlength=num_patches)
    np.testing.assert_array_equal(visible_counts + masked_counts, batch)
    expected = batch * keep / num_patches  # ≈ 1169, binomial std ≈ 29
    sigma = np.sqrt(batch * keep / num_patches * (1 - keep / num_patches))
    assert visible_counts.min() > 0 and masked_counts.min() > 0
    assert np.abs(visible_counts - expected).max() < 5 * sigma


def test_gather_tokens():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 6, 3)).astype(np.float32)
    idx = np.array([[4, 0, 2], [1, 5, 3]], np.int32)
    gathered = jax.jit(masking.gather_tokens)(x, idx)
    np.testing.assert_array_equal(gathered, np.stack([x[b, idx[b]] for b in range(2)]))
