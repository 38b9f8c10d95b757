"""Mask samplers as fixed-length index arrays: unstructured, multi-block, time-only, spans, ratio buckets."""

import collections
import functools

import jax
import numpy as np
import pytest
from mask_helpers import TRACES, counted

from audiojepa.ops import masking


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


# -- JEPA-family samplers ------------------------------------------------------------------------------
# Statistical tolerances: with 2000 examples a per-position rate p has binomial std ≤ 0.011, so ±0.06 is
# over 5 std; the bias these tests guard against (I-JEPA's issue #60, EncodecMAE's edges) is 0.3-0.5.

NUM_DRAWS = 2000
RATE_TOLERANCE = 0.06


MULTIBLOCK = {
    (5, 13): counted("multiblock", masking.multiblock, grid=(5, 13), return_block_masks=True),
    (8, 8): counted("multiblock", masking.multiblock, grid=(8, 8), return_block_masks=True),
}
SPAN_CLIPPED = counted("span", masking.span_mask_1d, length=300)
SPAN_ENCODECMAE = counted("span", masking.span_mask_1d, length=300, clip_spans=False)
TIME_ONLY = counted("time_only", masking.time_only, grid=(5, 13), target_ratio=0.6, span=2)


def _as_mask(idx, length):
    mask = np.zeros((idx.shape[0], length), bool)
    np.put_along_axis(mask, idx, True, axis=1)
    return mask


def _check_index_pair(first, second, length, first_count, second_count):
    """Shapes, dtype, ascending unique in-range indices and disjointness of an index pair."""
    assert first.shape == (NUM_DRAWS, first_count) and second.shape == (NUM_DRAWS, second_count)
    assert first.dtype == np.int32 and second.dtype == np.int32
    for idx in (first, second):
        assert idx.min() >= 0 and idx.max() < length
        assert (np.diff(idx, axis=1) > 0).all()  # ascending, hence unique
    assert not (_as_mask(first, length) & _as_mask(second, length)).any()


def _runs(row):
    """(starts, ends) of the runs of True in a 1-D bool array, ends exclusive."""
    edges = np.diff(np.concatenate([[0], row.astype(np.int8), [0]]))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


@functools.cache
def _multiblock_draws(grid):
    return tuple(np.asarray(a) for a in MULTIBLOCK[grid](jax.random.key(2), NUM_DRAWS))


@pytest.mark.parametrize("grid", [(5, 13), (8, 8)])
def test_multiblock_indices_are_fixed_unique_and_disjoint(grid):
    context, target, _ = _multiblock_draws(grid)
    num_context, num_target = masking.multiblock_counts(grid)
    _check_index_pair(context, target, grid[0] * grid[1], num_context, num_target)
    assert len({t.tobytes() for t in target}) > NUM_DRAWS // 2


@pytest.mark.parametrize("grid", [(5, 13), (8, 8)])
def test_multiblock_positions_are_uniform_targets_and_contexts(grid):
    """Every patch, edges included, is a target and a context at about the mean rate (issue #60)."""
    context, target, _ = _multiblock_draws(grid)
    num_patches = grid[0] * grid[1]
    for idx in (target, context):
        rate = np.bincount(idx.ravel(), minlength=num_patches).reshape(grid) / NUM_DRAWS
        mean = idx.shape[1] / num_patches
        assert rate.min() > 0
        np.testing.assert_allclose(rate, mean, atol=RATE_TOLERANCE)
        middle_row, middle_col = rate[grid[0] // 2].mean(), rate[:, grid[1] // 2].mean()
        for edge_row in (rate[0], rate[-1]):
            assert edge_row.mean() > 0.9 * middle_row
        for edge_col in (rate[:, 0], rate[:, -1]):
            assert edge_col.mean() > 0.9 * middle_col


@pytest.mark.parametrize("grid", [(5, 13), (8, 8)])
def test_multiblock_targets_are_the_union_of_blocks_truncated_or_topped_up(grid):
    context, target, blocks = _multiblock_draws(grid)
    num_patches = grid[0] * grid[1]
    union = blocks.any(axis=1)
    targets = _as_mask(target, num_patches)
    contexts = _as_mask(context, num_patches)
    small = union.sum(1) <= target.shape[1]
    assert small.any() and (~small).any()  # both cases occur with the default counts
    assert (targets[small] >= union[small]).all()  # topped up: the whole union is kept
    assert (targets[~small] <= union[~small]).all()  # truncated: a subset of the union
    # Context avoids target-block patches whenever the other patches suffice.
    enough = num_patches - union.sum(1) >= context.shape[1]
    assert not (contexts[enough] & union[enough]).any()
    # Kt is the expected union size.
    assert abs(union.sum(1).mean() - target.shape[1]) < 1.0
    # Blocks are rectangles (clipped to the grid).
    for block in blocks[:50].reshape(-1, *grid):
        rows, cols = np.flatnonzero(block.any(1)), np.flatnonzero(block.any(0))
        assert block.sum() == len(rows) * len(cols) == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)


@pytest.mark.parametrize("grid", [(5, 13), (8, 8)])
def test_multiblock_targets_are_spatially_clustered(grid):
    _, target, _ = _multiblock_draws(grid)
    _, unstructured = masking.random_unstructured(jax.random.key(3), NUM_DRAWS, grid[0] * grid[1],
                                                  1 - (grid[0] * grid[1] - target.shape[1]) / (grid[0] * grid[1]))
    unstructured = np.asarray(unstructured)
    assert unstructured.shape == target.shape

    def mean_pairwise_distance(idx):
        rows, cols = idx // grid[1], idx % grid[1]
        dist = np.hypot(rows[:, :, None] - rows[:, None, :], cols[:, :, None] - cols[:, None, :])
        return dist.sum() / (idx.shape[0] * idx.shape[1] * (idx.shape[1] - 1))

    def isolated_fraction(idx):  # targets with no target among their 4 neighbours
        padded = np.pad(_as_mask(idx, grid[0] * grid[1]).reshape(-1, *grid), ((0, 0), (1, 1), (1, 1)))
        inner = padded[:, 1:-1, 1:-1]
        neighbour = padded[:, :-2, 1:-1] | padded[:, 2:, 1:-1] | padded[:, 1:-1, :-2] | padded[:, 1:-1, 2:]
        return (inner & ~neighbour).sum() / inner.sum()

    # Measured (2000 draws): distance ratio 0.89 (5×13) and 0.92 (8×8); isolated 6% vs 23-25% for random sets.
    # The four blocks are placed independently, so the union's spread stays large; locality is the strong signal.
    assert mean_pairwise_distance(target) < 0.95 * mean_pairwise_distance(unstructured)
    assert isolated_fraction(target) < 0.5 * isolated_fraction(unstructured)


def test_multiblock_inside_placement_keeps_full_blocks_on_a_short_grid():
    """'inside' blocks keep their area; tall aspects are clipped to the 5 frequency rows."""
    grid = (5, 13)
    context, target, blocks = jax.jit(
        masking.multiblock, static_argnums=(1, 2),
        static_argnames=("target_aspect", "target_placement", "return_block_masks"))(
        jax.random.key(4), 512, grid, target_aspect=(3.0, 4.0), target_placement="inside",
        return_block_masks=True)
    blocks = np.asarray(blocks).reshape(-1, *grid)
    heights = blocks.any(2).sum(1)
    areas = blocks.sum((1, 2))
    assert (heights == 5).all()  # round(sqrt(area·aspect)) ≥ 5 → clipped to n_freq, width fitted to the area
    assert areas.min() >= 10 and areas.max() <= 15  # scale 0.15-0.2 of 65 = 9.75-13, rounded to whole columns
    assert not (_as_mask(np.asarray(context), 65) & _as_mask(np.asarray(target), 65)).any()


def _np_random_blocks(rng, draws, grid, scale, aspect, placement):
    """[draws, n_freq, n_time] bool: one block per draw, drawn in NumPy as `multiblock` documents the geometry.

    Scale and aspect uniform; area = scale·n_freq·n_time, height round(sqrt(area·aspect)) clipped to
    [1, n_freq], width round(area / height) clipped to [1, n_time]. Start per axis uniform over
    [-(size-1), n-1] and clipped ("clip"), over [0, n-size] ("inside"), or over [0, n) wrapping ("wrap").
    """
    n_freq, n_time = grid
    area = rng.uniform(*scale, draws) * n_freq * n_time
    height = np.clip(np.round(np.sqrt(area * rng.uniform(*aspect, draws))), 1, n_freq).astype(np.int64)
    width = np.clip(np.round(area / height), 1, n_time).astype(np.int64)

    def segment(size, n):
        cells = np.arange(n)
        if placement == "wrap":
            return (cells - rng.integers(0, n, draws)[:, None]) % n < size[:, None]
        start = rng.integers(-(size - 1), n) if placement == "clip" else rng.integers(0, n - size + 1)
        return (start[:, None] <= cells) & (cells < (start + size)[:, None])

    return segment(height, n_freq)[:, :, None] & segment(width, n_time)[:, None, :]


# Monte-Carlo means (Kc, Kt) here: 39.56, 22.24 / 29.37, 33.25 / 159.3, 84.3 (standard errors 0.01 and 0.06):
# tight enough that rounding the wrong way (39 for 39.56) fails.
@pytest.mark.parametrize("grid, placement, draws", [
    ((5, 13), "clip", 400_000), ((5, 13), "inside", 400_000), ((16, 16), "clip", 200_000)])
def test_multiblock_counts_are_the_expected_union_and_context_sizes(grid, placement, draws):
    """Kt = E|union of the 4 target blocks|, Kc = E|context block minus that union| (`multiblock_counts`),
    against a NumPy Monte-Carlo of the blocks themselves (the function integrates per-patch coverage
    probabilities instead): equal up to rounding, i.e. within 0.5 + 5 standard errors."""
    num_context, num_target = masking.multiblock_counts(grid, target_placement=placement)
    rng = np.random.default_rng(0)
    union = np.zeros((draws, *grid), bool)
    for _ in range(4):
        union |= _np_random_blocks(rng, draws, grid, (0.15, 0.2), (0.75, 1.5), placement)
    context_block = _np_random_blocks(rng, draws, grid, (0.85, 1.0), (1.0, 1.0), "wrap")
    for name, count, sizes in (("Kc", num_context, (context_block & ~union).sum((1, 2))),
                               ("Kt", num_target, union.sum((1, 2)))):
        mean, standard_error = sizes.mean(), sizes.std() / np.sqrt(draws)
        assert abs(mean - count) <= 0.5 + 5 * standard_error, (name, count, mean, standard_error)


def test_multiblock_counts_on_a_single_frequency_row():
    num_context, num_target = masking.multiblock_counts((1, 13))
    assert num_target >= 1 and 1 <= num_context <= 13 - num_target


@pytest.mark.parametrize("kwargs, match", [
    ({"target_placement": "edge"}, "target_placement"),
    ({"target_scale": (0.2, 1.5)}, "target_scale"),
    ({"target_aspect": (0.0, 1.0)}, "target_aspect"),
    ({"context_scale": (0.9, 0.8)}, "context_scale"),
    ({"num_targets": 0}, "num_targets"),
])
def test_multiblock_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        masking.multiblock_counts((5, 13), **kwargs)


def test_time_only_targets_are_whole_columns():
    n_freq, n_time = 5, 13
    context, target = (np.asarray(a) for a in TIME_ONLY(jax.random.key(5), NUM_DRAWS))
    context_cols = masking.num_visible(n_time, 0.6)  # int(13·0.4) = 5
    _check_index_pair(context, target, n_freq * n_time, n_freq * context_cols, n_freq * (n_time - context_cols))
    targets = _as_mask(target, n_freq * n_time).reshape(-1, n_freq, n_time)
    contexts = _as_mask(context, n_freq * n_time).reshape(-1, n_freq, n_time)
    assert (targets | contexts).all()  # a partition
    assert (targets.all(1) == targets.any(1)).all()  # every target column has all n_freq patches
    column_rate = targets[:, 0].mean(0)
    np.testing.assert_allclose(column_rate, (n_time - context_cols) / n_time, atol=RATE_TOLERANCE)
    # Target columns come in spans of ≥ 2 columns except at the grid's ends and one partial span.
    for row in targets[:, 0]:
        starts, ends = _runs(row)
        assert np.sum((ends - starts < 2) & (starts > 0) & (ends < n_time)) <= 1


@pytest.mark.parametrize("kwargs, match", [
    ({"target_ratio": 0.0}, "target_ratio"),
    ({"target_ratio": 0.95}, "no context"),
    ({"target_ratio": 0.5, "span": 14}, "span"),
])
def test_time_only_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        masking.time_only(jax.random.key(0), 2, (5, 13), **kwargs)


@pytest.mark.parametrize("clip_spans", [True, False])
def test_span_mask_exact_count_and_runs(clip_spans):
    length, span = 300, 15
    visible, masked = (np.asarray(a) for a in (SPAN_CLIPPED if clip_spans else SPAN_ENCODECMAE)(
        jax.random.key(6), NUM_DRAWS))
    _check_index_pair(visible, masked, length, 150, 150)  # exactly ⌊0.5·300⌋ masked
    is_masked = _as_mask(masked, length)
    assert (is_masked | _as_mask(visible, length)).all()
    num_short = []
    for row in is_masked:
        starts, ends = _runs(row)
        short = ends - starts < span
        if clip_spans:  # spans clipped at the ends may be short there
            short &= (starts > 0) & (ends < length)
        num_short.append(short.sum())
    assert max(num_short) <= 1  # only the last, partial span can leave a short run
    rate = is_masked.mean(0)
    assert rate.min() > 0
    if clip_spans:
        np.testing.assert_allclose(rate, 0.5, atol=RATE_TOLERANCE)
    else:  # EncodecMAE's starts in [0, T - span]: the first and last frames are rarely masked
        assert rate[0] < 0.1 and rate[-1] < 0.1
        np.testing.assert_allclose(rate[span:-span], 0.5, atol=RATE_TOLERANCE)


@pytest.mark.parametrize("kwargs, match", [
    ({"mask_prop": 0.0}, "mask_prop"),
    ({"mask_prop": 1.0}, "mask_prop"),
    ({"span": 0}, "span"),
    ({"span": 301}, "span"),
])
def test_span_mask_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        masking.span_mask_1d(jax.random.key(0), 2, 300, **kwargs)


def test_span_mask_short_sequences():
    """EncodecMAE's sampler raises below ~30 frames; here any span <= length works."""
    visible, masked = jax.jit(masking.span_mask_1d, static_argnums=(1, 2), static_argnames="span")(
        jax.random.key(7), 4, 16, span=15)
    assert masked.shape == (4, 8) and visible.shape == (4, 8)
    for v, m in zip(np.asarray(visible), np.asarray(masked)):
        np.testing.assert_array_equal(np.sort(np.concatenate([v, m])), np.arange(16))


@pytest.mark.parametrize("sampler", [MULTIBLOCK[(5, 13)], SPAN_CLIPPED, TIME_ONLY], ids=lambda s: s.trace_key[0])
def test_structured_samplers_compile_once_for_many_keys(sampler):
    # Other tests may already have traced these samplers at other batch sizes: count from the first call.
    draws = [np.asarray(sampler(jax.random.key(100), 8)[1])]
    traces = TRACES[sampler.trace_key]
    draws += [np.asarray(sampler(jax.random.key(100 + i), 8)[1]) for i in range(1, 20)]
    assert TRACES[sampler.trace_key] == traces
    assert len({d.tobytes() for d in draws}) == 20


# -- per-batch mask ratio ----------------------------------------------------------------------------

def test_bucketed_ratios():
    assert masking.bucketed_ratios(0.4, 0.6, 5).ratios == (0.4, 0.45, 0.5, 0.55, 0.6)
    assert masking.bucketed_ratios(0.4, 0.6, 1).ratios == (0.5,)
    assert masking.num_visible(20, masking.bucketed_ratios(0.4, 0.6, 5).ratios[1]) == 11  # the literal 0.45
    buckets = masking.bucketed_ratios(0.4, 0.6, 5)
    assert [buckets.draw_bucket(s, seed=3) for s in range(50)] == [buckets.draw_bucket(s, seed=3) for s in range(50)]
    assert [buckets.draw_bucket(s, seed=3) for s in range(50)] != [buckets.draw_bucket(s, seed=4) for s in range(50)]
    assert buckets.ratio(7, seed=3) == buckets.ratios[buckets.draw_bucket(7, seed=3)]


@pytest.mark.parametrize("args, match", [
    ((0.6, 0.4, 5), "low <= high"),
    ((0.4, 1.0, 5), "high < 1"),
    ((0.4, 0.6, 0), "num_buckets"),
])
def test_bucketed_ratios_rejects_bad_config(args, match):
    with pytest.raises(ValueError, match=match):
        masking.bucketed_ratios(*args)


def test_bucket_dispatch_compiles_at_most_num_buckets_times():
    low, high, num_buckets, num_patches = 0.4, 0.6, 5, 65
    buckets = masking.bucketed_ratios(low, high, num_buckets)
    traces = 0

    @functools.partial(jax.jit, static_argnums=1)
    def step(rng, mask_ratio):
        nonlocal traces
        traces += 1
        visible, masked = masking.random_unstructured(rng, 4, num_patches, mask_ratio)
        return visible.sum() + masked.sum()

    drawn = []
    for i in range(200):
        ratio = buckets.ratio(i, seed=0)
        drawn.append(ratio)
        step(jax.random.fold_in(jax.random.key(0), i), ratio)
    assert traces <= num_buckets
    assert min(drawn) == low and max(drawn) == high
    counts = collections.Counter(drawn)
    assert set(counts) == set(buckets.ratios) and min(counts.values()) > 20  # 40 expected per bucket
    assert abs(np.mean(drawn) - (low + high) / 2) < 0.01
