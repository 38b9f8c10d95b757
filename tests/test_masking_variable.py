"""Variable-count mask samplers (`MaskSet`): multi-block and time masking as the papers sample them, and
unstructured masking with a traced ratio, against independent NumPy implementations of the papers' algorithms.

Reference algorithms (written here from the papers, not from audiojepa.ops.masking):
- Multi-block (I-JEPA, Assran et al. 2023 §3; Riou et al. 2024 §3.2 and Fig. 1): per example, M = 4 target
  blocks with scale ~ U(0.15, 0.2) and aspect (height/width) ~ U(0.75, 1.5) drawn independently per block,
  one context block with scale ~ U(0.85, 1.0) and aspect 1, each placed uniformly with the block inside the
  grid; targets = union of the target blocks, context = context block minus that union; the whole layout is
  redrawn while the context has fewer than `min_context` patches (I-JEPA retries its context block).
- Time (Riou et al. §3.2): the same with blocks spanning all frequency rows, width round(scale·n_time).
Block sizes on a grid: height round(sqrt(area·aspect)) clipped to [1, n_freq], width round(area/height)
clipped to [1, n_time] (area = scale·n_freq·n_time), the rule `masking._block_hw` documents.

Statistical tests: two-sample chi-square tests (categories merged until each holds >= 10 draws) at
significance ALPHA = 1e-3 on the distributions of target-block sizes (h, w), target counts and context
counts; means within 5 combined standard errors; per-position target and context rates within 5 standard
errors of their difference. Seeds are fixed, so each outcome is deterministic; the thresholds say how
unlikely a failure of a correct sampler would be.
"""

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mask_helpers import TRACES, counted
from scipy import stats

from audiojepa.ops import masking

ALPHA = 1e-3
NUM_JAX = 3000     # masks drawn from the JAX sampler per configuration
NUM_NUMPY = 20000  # masks drawn from the NumPy reference per configuration


# -- independent NumPy references ---------------------------------------------------------------------

def _np_blocks(rng, n, grid, scale, aspect, full_height):
    """n random blocks inside the grid: ([n, L] bool, height [n], width [n])."""
    n_freq, n_time = grid
    s = rng.uniform(*scale, n)
    if full_height:
        height = np.full(n, n_freq)
        width = np.clip(np.round(s * n_time), 1, n_time).astype(np.int64)
    else:
        area = s * n_freq * n_time
        height = np.clip(np.round(np.sqrt(area * rng.uniform(*aspect, n))), 1, n_freq).astype(np.int64)
        width = np.clip(np.round(area / height), 1, n_time).astype(np.int64)
    top = rng.integers(0, n_freq - height + 1)
    left = rng.integers(0, n_time - width + 1)
    rows, cols = np.arange(n_freq), np.arange(n_time)
    in_rows = (top[:, None] <= rows) & (rows < (top + height)[:, None])
    in_cols = (left[:, None] <= cols) & (cols < (left + width)[:, None])
    return (in_rows[:, :, None] & in_cols[:, None, :]).reshape(n, -1), height, width


def _np_paper_masks(seed, n, grid, *, full_height, num_targets=4, target_scale=(0.15, 0.2),
                    target_aspect=(0.75, 1.5), context_scale=(0.85, 1.0), min_context=1):
    """The papers' algorithm with rejection: dict of target [n, L], context [n, L], block_hw [n, M]."""
    rng = np.random.default_rng(seed)
    kept = collections.defaultdict(list)
    need = n
    while need > 0:
        draws = 2 * need + 100
        blocks = [_np_blocks(rng, draws, grid, target_scale, target_aspect, full_height)
                  for _ in range(num_targets)]
        context_block = _np_blocks(rng, draws, grid, context_scale, (1.0, 1.0), full_height)[0]
        union = np.any([b[0] for b in blocks], axis=0)
        context = context_block & ~union
        ok = np.flatnonzero(context.sum(1) >= min_context)[:need]
        kept["target"].append(union[ok])
        kept["context"].append(context[ok])
        kept["block_hw"].append(np.stack([100 * b[1] + b[2] for b in blocks], axis=1)[ok])
        need -= len(ok)
    return {k: np.concatenate(v) for k, v in kept.items()}


# -- helpers --------------------------------------------------------------------------------------------

def _same_distribution(a, b, what):
    """Two-sample chi-square test on integer samples, adjacent categories merged to >= 10 draws each."""
    values = np.union1d(a, b)
    table = np.stack([(a[:, None] == values).sum(0), (b[:, None] == values).sum(0)])
    merged, current = [], np.zeros(2, np.int64)
    for column in table.T:
        current = current + column
        if current.min() >= 10:
            merged.append(current)
            current = np.zeros(2, np.int64)
    if merged:
        merged[-1] = merged[-1] + current
    if len(merged) < 2:  # a single category: both samples are constant and equal
        assert np.array_equal(np.unique(a), np.unique(b)), what
        return
    p_value = stats.chi2_contingency(np.stack(merged, axis=1)).pvalue
    assert p_value > ALPHA, (what, p_value, np.mean(a), np.mean(b))


def _same_mean(a, b, what):
    standard_error = np.sqrt(a.var() / len(a) + b.var() / len(b))
    assert abs(a.mean() - b.mean()) <= 5 * standard_error + 1e-12, (what, a.mean(), b.mean(), standard_error)


def _same_rates(a, b, what):
    """Per-position rates of two [n, L] bool samples within 5 standard errors of their difference."""
    rate_a, rate_b = a.mean(0), b.mean(0)
    pooled = (a.sum(0) + b.sum(0)) / (len(a) + len(b))
    standard_error = np.sqrt(pooled * (1 - pooled) * (1 / len(a) + 1 / len(b)))
    assert (np.abs(rate_a - rate_b) <= 5 * standard_error + 1e-12).all(), (what, rate_a - rate_b)


def _dense(idx, valid, num_patches):
    mask = np.zeros((idx.shape[0], num_patches), bool)
    rows = np.broadcast_to(np.arange(idx.shape[0])[:, None], idx.shape)
    mask[rows[valid], idx[valid]] = True
    return mask


def _check_mask_set(masks, num_patches, capacity):
    """Hard invariants of a MaskSet; returns the dense (context, target) [B, L] bool masks."""
    context_capacity, target_capacity = capacity
    assert isinstance(masks, masking.MaskSet)
    masks = masking.MaskSet(*(np.asarray(a) for a in masks))
    batch = masks.context_idx.shape[0]
    assert masks.context_idx.shape == masks.context_valid.shape == (batch, context_capacity)
    assert masks.target_idx.shape == masks.target_valid.shape == (batch, target_capacity)
    assert masks.context_idx.dtype == masks.target_idx.dtype == np.int32
    assert masks.context_valid.dtype == masks.target_valid.dtype == bool
    dense = []
    for idx, valid in ((masks.context_idx, masks.context_valid), (masks.target_idx, masks.target_valid)):
        assert idx.min() >= 0 and idx.max() < num_patches
        assert (valid[:, :-1] >= valid[:, 1:]).all()  # valid entries first, then padding
        assert (idx[~valid] == 0).all()  # padding holds index 0
        both_valid = valid[:, 1:]
        assert (np.diff(idx, axis=1)[both_valid] > 0).all()  # ascending, hence unique
        dense.append(_dense(idx, valid, num_patches))
    context, target = dense
    assert not (context & target).any()  # no target in the context
    assert context.any(1).all()  # the context is never empty
    return context, target


# -- samplers under test, jitted once per configuration --------------------------------------------------


CONFIGS = {
    "multiblock-5x13": dict(sampler=masking.multiblock_variable, grid=(5, 13), full_height=False),
    "multiblock-8x16": dict(sampler=masking.multiblock_variable, grid=(8, 16), full_height=False),
    "time-5x13": dict(sampler=masking.time_blocks, grid=(5, 13), full_height=True),
    "time-8x16": dict(sampler=masking.time_blocks, grid=(8, 16), full_height=True),
}
SAMPLERS = {name: counted(name, c["sampler"], grid=c["grid"], return_layout=True) for name, c in CONFIGS.items()}


def _capacity(name, **kwargs):
    config = CONFIGS[name]
    function = masking.time_blocks_capacity if config["full_height"] else masking.multiblock_capacity
    return function(config["grid"], **kwargs)


@functools.cache
def _draws(name):
    masks, layout = SAMPLERS[name](jax.random.key(7), NUM_JAX)
    return (masking.MaskSet(*(np.asarray(a) for a in masks)),
            masking.BlockLayout(*(np.asarray(a) for a in layout)))


@functools.cache
def _reference(name):
    config = CONFIGS[name]
    return _np_paper_masks(11, NUM_NUMPY, config["grid"], full_height=config["full_height"])


# -- invariants ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
def test_block_masks_invariants(name):
    """Every sample: targets are exactly the union of the kept target blocks, the context exactly the context
    block minus the targets (nothing invented, nothing moved), blocks are full rectangles inside the grid."""
    grid = CONFIGS[name]["grid"]
    num_patches = grid[0] * grid[1]
    masks, layout = _draws(name)
    context, target = _check_mask_set(masks, num_patches, _capacity(name))
    assert layout.target_blocks.shape == (NUM_JAX, 4, num_patches)
    assert layout.context_block.shape == (NUM_JAX, num_patches)
    kept = np.arange(4) < layout.num_blocks_kept[:, None]
    union = (layout.target_blocks & kept[:, :, None]).any(1)
    np.testing.assert_array_equal(target, union)
    np.testing.assert_array_equal(context, layout.context_block & ~union)
    assert (layout.num_blocks_kept == 4).all()  # min_context=1 never needs the fallback with these ranges
    assert target.any(1).all()
    blocks = np.concatenate([layout.target_blocks.reshape(-1, *grid), layout.context_block.reshape(-1, *grid)])
    rows, cols = blocks.any(2), blocks.any(1)
    heights, widths = rows.sum(1), cols.sum(1)
    assert (blocks.sum((1, 2)) == heights * widths).all()  # rectangles: area = rows × columns spanned
    for spanned in (rows, cols):  # contiguous: one run of covered rows / columns
        assert (np.diff(spanned.astype(np.int8), axis=1) == 1).sum(1).max() <= 1
        assert (np.diff(spanned.astype(np.int8), axis=1) == -1).sum(1).max() <= 1
    if CONFIGS[name]["full_height"]:
        assert rows.all()  # time blocks span every frequency row


@pytest.mark.parametrize("name", list(CONFIGS))
def test_capacities_are_reached_and_never_exceeded(name):
    """Capacities are the exact maxima: the largest drawn target block and context block reach them."""
    masks, layout = _draws(name)
    context_capacity, target_capacity = _capacity(name)
    largest_target_block = layout.target_blocks.sum(2).max()
    assert target_capacity == min(masks.target_idx.shape[1], 4 * largest_target_block)
    assert layout.context_block.sum(1).max() == context_capacity
    assert masks.target_valid.sum(1).max() <= target_capacity


# -- distributions against the papers' algorithms ----------------------------------------------------------

@pytest.mark.parametrize("name", list(CONFIGS))
def test_distributions_match_the_papers_algorithm(name):
    grid = CONFIGS[name]["grid"]
    masks, layout = _draws(name)
    reference = _reference(name)
    context, target = _check_mask_set(masks, grid[0] * grid[1], _capacity(name))
    blocks = layout.target_blocks.reshape(NUM_JAX, 4, *grid)
    block_hw = 100 * blocks.any(3).sum(2) + blocks.any(2).sum(2)  # [B, M]: height·100 + width
    _same_distribution(block_hw.ravel(), reference["block_hw"].ravel(), "target block (h, w)")
    for what, ours, theirs in (("targets", target, reference["target"]),
                               ("context", context, reference["context"])):
        _same_distribution(ours.sum(1), theirs.sum(1), f"{what} count")
        _same_mean(ours.sum(1), theirs.sum(1), f"{what} count")
        _same_rates(ours, theirs, f"{what} rate per position")


def test_multiblock_target_fraction_is_not_forced_to_a_count():
    """The fixed-count sampler gives every example Kt targets; the paper's counts vary widely per example."""
    masks, _ = _draws("multiblock-5x13")
    counts = masks.target_valid.sum(1)
    assert counts.min() <= 15 and counts.max() >= 35  # one to four overlapping 9-12 patch blocks


def test_rejection_matches_the_papers_retry():
    """With a large min_context the layout is redrawn (first acceptable of num_candidates): the accepted
    distribution is the papers' retry loop's, and the fallback stays rare."""
    grid, min_context = (5, 13), 25
    sample = counted("multiblock-retry", masking.multiblock_variable, grid=grid, min_context=min_context,
                      return_layout=True)
    masks, layout = sample(jax.random.key(8), NUM_JAX)
    layout = masking.BlockLayout(*(np.asarray(a) for a in layout))
    context, target = _check_mask_set(masks, 65, masking.multiblock_capacity(grid))
    reference = _np_paper_masks(12, NUM_NUMPY, grid, full_height=False, min_context=min_context)
    assert (context.sum(1) >= min_context).all()
    fallback = np.mean(layout.num_blocks_kept < 4)
    assert fallback < 0.01
    rejected = np.mean(_draws("multiblock-5x13")[0].context_valid.sum(1) < min_context)
    assert rejected > 0.2  # the constraint does bind: without it a fifth or more of layouts fail
    for what, ours, theirs in (("targets", target, reference["target"]),
                               ("context", context, reference["context"])):
        _same_distribution(ours.sum(1), theirs.sum(1), f"{what} count")
        _same_rates(ours, theirs, f"{what} rate per position")


@pytest.mark.parametrize("sampler", [masking.multiblock_variable, masking.time_blocks])
def test_fallback_drops_whole_target_blocks(sampler):
    """With one candidate and a demanding min_context, examples whose layout fails keep the longest prefix of
    target blocks that leaves min_context context patches; no target enters the context."""
    grid, min_context = (5, 13), 40
    masks, layout = jax.jit(functools.partial(sampler, grid=grid, min_context=min_context, num_candidates=1,
                                              return_layout=True), static_argnums=1)(jax.random.key(9), 1000)
    layout = masking.BlockLayout(*(np.asarray(a) for a in layout))
    context, target = _check_mask_set(masks, 65, (masks.context_idx.shape[1], masks.target_idx.shape[1]))
    kept = layout.num_blocks_kept
    assert (kept < 4).mean() > 0.1 and (kept == 4).any()
    assert (context.sum(1) >= min_context).all()
    cumulative = np.cumsum(layout.target_blocks, axis=1) > 0  # [B, M, L]: union of blocks 0..k
    for b in np.flatnonzero(kept < 4):
        assert (layout.context_block[b] & ~cumulative[b, kept[b]]).sum() < min_context  # one more block fails
        np.testing.assert_array_equal(target[b], cumulative[b, kept[b] - 1] if kept[b] else False)


@pytest.mark.parametrize("kwargs, match", [
    ({"min_context": 0}, "min_context"),
    ({"min_context": 56}, "min_context"),  # the smallest context block on 5×13 has 55 patches
    ({"num_candidates": 0}, "num_candidates"),
    ({"num_targets": 0}, "num_targets"),
    ({"target_scale": (0.2, 0.1)}, "target_scale"),
])
def test_block_samplers_reject_bad_config(kwargs, match):
    for sampler in (masking.multiblock_variable, masking.time_blocks):
        with pytest.raises(ValueError, match=match):
            sampler(jax.random.key(0), 2, (5, 13), **kwargs)


def _brute_force_max_area(grid, scale, aspect, full_height, steps=1201):
    """Largest block area over a dense grid of (scale, aspect) values, endpoints included (float64)."""
    n_freq, n_time = grid
    s, a = np.meshgrid(np.linspace(*scale, steps), np.linspace(*aspect, steps))
    if full_height:
        return n_freq * int(np.clip(np.round(s * n_time), 1, n_time).max())
    area = s * n_freq * n_time
    height = np.clip(np.round(np.sqrt(area * a)), 1, n_freq)
    return int((height * np.clip(np.round(area / height), 1, n_time)).max())


@pytest.mark.parametrize("grid, kwargs", [
    ((5, 13), {}),
    ((8, 16), {}),
    ((16, 16), {}),
    ((5, 38), {}),
    ((16, 16), dict(target_scale=(0.2, 0.8), target_aspect=(0.3, 3.0), num_targets=2)),  # I-JEPA defaults
    ((5, 13), dict(target_scale=(0.3, 0.45), context_scale=(0.5, 0.7), context_aspect=(0.5, 2.0))),
])
def test_capacity_is_the_largest_block_area(grid, kwargs):
    num_patches = grid[0] * grid[1]
    num_targets = kwargs.get("num_targets", 4)
    context_capacity, target_capacity = masking.multiblock_capacity(grid, **kwargs)
    target_area = _brute_force_max_area(grid, kwargs.get("target_scale", (0.15, 0.2)),
                                        kwargs.get("target_aspect", (0.75, 1.5)), False)
    assert target_capacity == min(num_patches, num_targets * target_area)
    assert context_capacity == _brute_force_max_area(grid, kwargs.get("context_scale", (0.85, 1.0)),
                                                     kwargs.get("context_aspect", (1.0, 1.0)), False)
    time_context, time_target = masking.time_blocks_capacity(grid, num_targets=num_targets,
                                                             target_scale=kwargs.get("target_scale", (0.15, 0.2)))
    assert time_target == min(num_patches, num_targets * _brute_force_max_area(
        grid, kwargs.get("target_scale", (0.15, 0.2)), (1, 1), True))
    assert time_context == _brute_force_max_area(grid, (0.85, 1.0), (1, 1), True)


def test_one_compile_for_many_keys():
    """Every draw of one configuration, in this test and in the others, shares a single trace."""
    sample = SAMPLERS["time-5x13"]
    draws = [np.asarray(sample(jax.random.key(100 + i), NUM_JAX)[0].target_idx) for i in range(10)]
    assert TRACES[sample.trace_key] == 1
    assert len({d.tobytes() for d in draws}) == 10


def test_mask_fractions():
    masks, _ = _draws("multiblock-5x13")
    context_fraction, target_fraction = (np.asarray(a) for a in masking.mask_fractions(masks, 65))
    np.testing.assert_allclose(context_fraction, masks.context_valid.sum(1) / 65, rtol=1e-6)
    np.testing.assert_allclose(target_fraction, masks.target_valid.sum(1) / 65, rtol=1e-6)


# -- unstructured with a traced ratio ----------------------------------------------------------------------

RATIOS = [p / 100 for p in range(40, 61)] + [0.4321, 0.5555]


def test_unstructured_variable_traced_ratio_one_compile():
    """One compile serves every ratio in [min_ratio, max_ratio]; the context has int(L·(1 - r)) patches
    (the exact floor, here equal to num_visible's float64 one) and the targets are the other L - K."""
    num_patches, batch = 65, 256
    traces = 0

    @functools.partial(jax.jit, static_argnums=1)
    def sample(rng, batch_size, ratio):
        nonlocal traces
        traces += 1
        return masking.unstructured_variable(rng, batch_size, num_patches, ratio, min_ratio=0.4, max_ratio=0.6)

    capacity = masking.unstructured_capacity(num_patches, 0.4, 0.6)
    assert capacity == (masking.num_visible(65, 0.4), 65 - masking.num_visible(65, 0.6)) == (39, 39)
    target_hits, variance = np.zeros(num_patches), 0.0
    for i, ratio in enumerate(RATIOS):
        masks = sample(jax.random.key(i), batch, jnp.float32(ratio))
        context, target = _check_mask_set(masks, num_patches, capacity)
        exact = (num_patches * round((1 - ratio) * 10_000)) // 10_000  # floor of L·(1 - r) in integers
        assert exact == masking.num_visible(num_patches, ratio)
        assert (context.sum(1) == exact).all() and (target.sum(1) == num_patches - exact).all(), ratio
        assert (context | target).all()  # a partition of the patches
        target_hits += target.sum(0) / (num_patches - exact)
        rate = (num_patches - exact) / num_patches  # a patch is a target with this probability
        variance += batch * rate * (1 - rate) / (num_patches - exact) ** 2
    assert traces == 1
    # Uniform positions: each patch's mean share of an example's targets is 1/L; tolerance 5 standard errors.
    draws = len(RATIOS) * batch
    np.testing.assert_allclose(target_hits / draws, 1 / num_patches, atol=5 * np.sqrt(variance) / draws)


@pytest.mark.parametrize("num_patches, ratio", [(65, 0.6), (190, 0.7), (128, 0.5), (65, 0.8)])
def test_unstructured_variable_python_ratio_matches_random_unstructured_counts(num_patches, ratio):
    masks = masking.unstructured_variable(jax.random.key(1), 64, num_patches, ratio)
    keep = masking.num_visible(num_patches, ratio)
    context, target = _check_mask_set(masks, num_patches, (keep, num_patches - keep))
    assert masks.context_valid.all() and masks.target_valid.all()  # capacities equal the counts: no padding
    assert (context | target).all()


@pytest.mark.parametrize("num_patches", [128, 190, 496])
def test_unstructured_variable_traced_count_is_the_exact_floor(num_patches):
    """A traced float32 ratio gives K = floor(L·(1 - r)) of the decimal r, float32 rounding undone: e.g. on
    190 patches r = 0.8 gives 38 (num_visible's float64 product 37.99999999999999 floors to 37)."""
    ratios = RATIOS + [0.8, 0.9]

    @jax.jit
    def context_count(ratio):
        masks = masking.unstructured_variable(jax.random.key(0), 2, num_patches, ratio, min_ratio=0.4,
                                              max_ratio=0.9)
        return masks.context_valid.sum(1)

    for ratio in ratios:
        exact = (num_patches * round((1 - ratio) * 10_000)) // 10_000
        np.testing.assert_array_equal(context_count(jnp.float32(ratio)), exact, err_msg=str(ratio))


@pytest.mark.parametrize("kwargs, match", [
    (dict(mask_ratio=0.7, min_ratio=0.4, max_ratio=0.6), "mask_ratio"),
    (dict(mask_ratio=0.5, min_ratio=0.6, max_ratio=0.4), "min_ratio"),
    (dict(mask_ratio=0.5, min_ratio=0.4, max_ratio=1.0), "max_ratio"),
])
def test_unstructured_variable_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        masking.unstructured_variable(jax.random.key(0), 2, 65, **kwargs)


def test_unstructured_variable_traced_ratio_needs_capacities():
    with pytest.raises(ValueError, match="min_ratio"):
        jax.jit(lambda r: masking.unstructured_variable(jax.random.key(0), 2, 65, r))(jnp.float32(0.5))
