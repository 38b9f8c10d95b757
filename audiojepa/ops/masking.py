"""Patch masks as fixed-length index arrays, and the gather that uses them.

A mask is a pair of int32 index arrays over the patch sequence of length L (frequency-major, index
f·T' + t): `visible_idx [batch, K]` (what the context encoder sees) and `masked_idx [batch, L - K]`.
K depends only on (L, mask_ratio), both Python values, so every shape is static and a jitted step
compiles once however the random draws fall.

Fixed-count samplers (all jittable with Python-static sizes; the JEPA ones call the two arrays
`context_idx [batch, Kc]` and `target_idx [batch, Kt]`, disjoint per example):
- `random_unstructured`: a uniformly random subset of patches (M2D, SonyCSL JEPA, MATPAC, Audio-JEPA).
- `multiblock`: I-JEPA's target blocks and one large context block, with fixed counts and no position bias.
- `time_only`: whole time columns (all frequency patches) as targets, the other columns as context.
- `span_mask_1d`: EncodecMAE's spans of frames, exactly ⌊mask_prop·length⌋ masked.
- `bucketed_ratios` / `RatioBuckets`: a per-batch random mask ratio from a few compiled shapes (Audio-JEPA).

Variable-count samplers (the papers' sampling; each returns a `MaskSet`, a pytree of padded index arrays
`context_idx [B, Nc]`, `context_valid`, `target_idx [B, Nt]`, `target_valid`: valid entries first and
ascending, padding index 0; Nc, Nt are Python capacities from the config, so one compile per config):
- `multiblock_variable` / `multiblock_capacity`: I-JEPA multi-block as its paper and Riou et al. describe
  it: independent target and context blocks inside the grid, targets = union of the target blocks, context
  = context block minus the targets. Counts vary per example; nothing is truncated or topped up.
- `time_blocks` / `time_blocks_capacity`: Riou et al.'s time masking, the same with full-height blocks.
- `unstructured_variable` / `unstructured_capacity`: unstructured masking whose ratio may be traced.
- `BlockLayout` (the blocks behind a multi-block/time MaskSet) and `mask_fractions` (for logging).

How the fixed-count structured samplers (`multiblock`, `time_only`) reach a fixed count: they draw their
geometry (blocks, spans), give every token a level (say 1 inside a target block, 0 outside) and keep the
k tokens of highest level, ties broken uniformly at random. A set larger than k is thus truncated to a
uniformly random subset of itself and a smaller one is topped up with uniformly random tokens of the next
level. I-JEPA instead truncates sorted index lists to the smallest count in the batch, which drops
bottom/right patches (its issue #60).
Returned indices are sorted ascending (raster order); the selection itself is position-free.
"""

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Number of visible patches K = int(L·(1 - r)), floored in float64 as the reference does.

    The float64 floor matters: 65·(1 - 0.7) = 19.500000000000004 → 19, and 190·(1 - 0.7) → 57.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
    return int(num_patches * (1 - float(mask_ratio)))


def random_unstructured(rng: jax.Array, batch_size: int, num_patches: int,
                        mask_ratio: float) -> tuple[jax.Array, jax.Array]:
    """Unstructured random mask: each example keeps a uniformly random subset of K patches.

    Jittable; batch_size, num_patches and mask_ratio must be Python values (they fix the shapes).

    Args:
        rng: a jax.random key.
        batch_size: B.
        num_patches: L.
        mask_ratio: fraction r of masked patches; K = num_visible(L, r).

    Returns:
        visible_idx: [B, K] int32.
        masked_idx: [B, L - K] int32. Both in shuffle order (the argsort of per-example uniform noise, as
            the reference's ids_shuffle[:, :K] and ids_shuffle[:, K:]); together a permutation of range(L).
    """
    keep = num_visible(num_patches, mask_ratio)
    noise = jax.random.uniform(rng, (batch_size, num_patches))
    ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
    return ids_shuffle[:, :keep], ids_shuffle[:, keep:]


def gather_tokens(x: jax.Array, idx: jax.Array) -> jax.Array:
    """Picks tokens per example: x [B, L, D], idx [B, N] → [B, N, D] with out[b, n] = x[b, idx[b, n]]."""
    return jnp.take_along_axis(x, idx[:, :, None], axis=1)


# -- shared pieces ------------------------------------------------------------------------------------

def _select_top_levels(rng: jax.Array, level: jax.Array, k: int) -> jax.Array:
    """Keeps the k tokens of highest level per row, ties broken uniformly at random.

    Args:
        rng: a jax.random key.
        level: [B, L] int32.
        k: Python int, 0 <= k <= L.

    Returns:
        [B, L] bool with exactly k True per row.
    """
    noise = jax.random.bits(rng, level.shape, jnp.uint32)
    order = jnp.lexsort((noise, -level), axis=-1)  # last key is the primary one: highest level first
    return jnp.argsort(order, axis=-1) < k


def _indices_where(mask: jax.Array, count: int) -> jax.Array:
    """Positions of the True entries, ascending: mask [B, L] bool with `count` True per row → [B, count] int32."""
    return jnp.argsort(~mask, axis=-1, stable=True)[:, :count].astype(jnp.int32)


def _check_grid(grid) -> tuple[int, int]:
    if len(grid) != 2 or any(int(n) != n or n < 1 for n in grid):
        raise ValueError(f"grid must be (n_freq, n_time) positive ints, got {grid!r}.")
    return int(grid[0]), int(grid[1])


def _check_range(name: str, value, low: float, high: float | None) -> tuple[float, float]:
    """(lo, hi) floats with low < lo <= hi (<= high when given); the error names the argument."""
    lo, hi = (float(v) for v in value)
    if not (low < lo <= hi and (high is None or hi <= high)):
        bound = f" <= {high}" if high is not None else ""
        raise ValueError(f"{name} must be (lo, hi) with {low} < lo <= hi{bound}, got {value!r}.")
    return lo, hi


# -- spans of cells on one axis (EncodecMAE frames, time-only columns) -----------------------------------

def _span_cover(rng: jax.Array, batch_size: int, length: int, count: int, span: int,
                clip_spans: bool) -> jax.Array:
    """Marks exactly `count` of `length` cells with random spans of `span` cells.

    Spans are added in a uniformly random order of their start until `count` cells are covered; the
    span that crosses the count adds only the cells still needed, taken from one end (the end is chosen
    at random per example). Drawing starts without replacement covers the same cells as EncodecMAE's
    draws with replacement, since a repeated start adds nothing. With `clip_spans` the starts range over
    [-(span-1), length-1] and spans are clipped to the axis, so every cell lies under the same number of
    possible starts and all cells are masked equally often; without it starts range over
    [0, length - span] (EncodecMAE), and the first/last cells are masked far less often.

    Returns:
        [batch_size, length] bool, exactly `count` True per row.
    """
    num_slots = length + span - 1  # slot j holds the span starting at cell j - (span - 1)
    rng_order, rng_end = jax.random.split(rng)
    arrival = jnp.argsort(jax.random.uniform(rng_order, (batch_size, num_slots)), axis=1).astype(jnp.int32)
    if not clip_spans:
        slot = jnp.arange(num_slots)
        arrival = jnp.where((slot >= span - 1) & (slot <= length - 1), arrival, num_slots)
    # Cell t lies under the spans of slots t .. t + span - 1; it is covered when the first of them arrives.
    first = jax.lax.reduce_window(arrival, np.int32(np.iinfo(np.int32).max), jax.lax.min,
                                  (1, span), (1, 1), "VALID")
    position = jnp.arange(length, dtype=jnp.int32)
    from_start = jax.random.bernoulli(rng_end, 0.5, (batch_size, 1))
    order_key = first * length + jnp.where(from_start, position, length - 1 - position)  # distinct per row
    kth = jnp.sort(order_key, axis=1)[:, count - 1:count]
    return order_key <= kth


def _check_span(span, length: int, length_name: str) -> int:
    if int(span) != span or not 1 <= span <= length:
        raise ValueError(f"span must be an int in [1, {length_name}={length}], got {span!r}.")
    if (length + span) * length >= 2 ** 31:
        raise ValueError(f"{length_name}={length} is too long for int32 span keys.")
    return int(span)


def span_mask_1d(rng: jax.Array, batch_size: int, length: int, *, mask_prop: float = 0.5, span: int = 15,
                 clip_spans: bool = True) -> tuple[jax.Array, jax.Array]:
    """EncodecMAE span masking of frames: exactly M = ⌊mask_prop·length⌋ frames masked per example.

    Spans of `span` frames (EncodecMAE: M_gap = 15) start at uniformly random frames, may overlap and
    merge, and are added until M frames are covered; the last span is cut to what is still needed. So
    every run of masked frames is at least `span` long except runs clipped at either end of the axis
    (only with `clip_spans`) and at most one run per example made of the last span's partial cells.

    clip_spans=True (default) lets spans start before frame 0 and end after the last frame, clipped,
    so every frame is masked with probability M/length. clip_spans=False draws starts in
    [0, length - span] as EncodecMAE does; its first and last frames are then masked ~10× less often
    (≈5% instead of 50% at length 300).

    Jittable; batch_size, length, mask_prop, span and clip_spans must be Python values.

    Args:
        rng: a jax.random key.
        batch_size: B.
        length: number of frames T.
        mask_prop: fraction of masked frames, 0 < mask_prop < 1 with 1 <= M <= T - 1.
        span: span length in frames, 1 <= span <= T.
        clip_spans: see above.

    Returns:
        visible_idx: [B, T - M] int32, ascending.
        masked_idx: [B, M] int32, ascending.
    """
    num_masked = int(length * float(mask_prop))
    if not 1 <= num_masked <= length - 1:
        raise ValueError(f"mask_prop={mask_prop} masks {num_masked} of length={length} frames; "
                         "need at least one masked and one visible frame.")
    span = _check_span(span, length, "length")
    is_masked = _span_cover(rng, batch_size, length, num_masked, span, clip_spans)
    return _indices_where(~is_masked, length - num_masked), _indices_where(is_masked, num_masked)


def time_only(rng: jax.Array, batch_size: int, grid: tuple[int, int], *, target_ratio: float, span: int = 2,
              clip_spans: bool = True) -> tuple[jax.Array, jax.Array]:
    """Time-only masking: targets are whole time columns (all n_freq patches), context the other columns.

    The SonyCSL JEPA study (Riou et al. 2024) compares this with unstructured and multi-block masking;
    its public code implements only unstructured masking, so this follows the paper's description: the
    target region spans the full frequency axis and is grouped in time. Target columns are spans of
    `span` columns placed as in `span_mask_1d` (random order, merging, the last span cut so the count is
    exact; span=1 gives independent random columns). The context is every other column.

    Counts follow `num_visible`: n_ctx = int(n_time·(1 - target_ratio)) context columns and
    n_tgt = n_time - n_ctx target columns, so Kc = n_freq·n_ctx and Kt = n_freq·n_tgt.

    Jittable; batch_size, grid, target_ratio, span and clip_spans must be Python values.

    Args:
        rng: a jax.random key.
        batch_size: B.
        grid: (n_freq, n_time) patches; token index f·n_time + t.
        target_ratio: fraction of target columns.
        span: target span length in columns, 1 <= span <= n_time.
        clip_spans: as in `span_mask_1d`; True makes every column a target equally often.

    Returns:
        context_idx: [B, Kc] int32, ascending.
        target_idx: [B, Kt] int32, ascending. Together a partition of range(n_freq·n_time).
    """
    n_freq, n_time = _check_grid(grid)
    if not 0.0 < float(target_ratio) < 1.0:
        raise ValueError(f"target_ratio must be in (0, 1), got {target_ratio}.")
    context_cols = num_visible(n_time, target_ratio)
    target_cols = n_time - context_cols
    if context_cols < 1:
        raise ValueError(f"target_ratio={target_ratio} leaves no context column of n_time={n_time}.")
    span = _check_span(span, n_time, "n_time")
    is_target_col = _span_cover(rng, batch_size, n_time, target_cols, span, clip_spans)
    is_target = jnp.tile(is_target_col, (1, n_freq))  # token f·n_time + t belongs to column t
    return (_indices_where(~is_target, n_freq * context_cols),
            _indices_where(is_target, n_freq * target_cols))


# -- I-JEPA multi-block -------------------------------------------------------------------------------

PLACEMENTS = ("clip", "inside")


def _block_hw(scale, aspect, grid: tuple[int, int], xp):
    """Block height and width (patches) from scale (fraction of the grid) and aspect (height / width).

    Height round(sqrt(area·aspect)) is clipped to [1, n_freq] first and the width is then fitted to the
    area, clipped to [1, n_time]: on a short grid (5 frequency rows) the aspect ratio yields, not the
    area. xp is numpy (config-time expectations) or jax.numpy (sampling); both round half to even.
    """
    n_freq, n_time = grid
    area = scale * (n_freq * n_time)
    height = xp.clip(xp.round(xp.sqrt(area * aspect)), 1, n_freq)
    width = xp.clip(xp.round(area / height), 1, n_time)
    return height, width


def _coverage_1d(n: int, size: int, placement: str) -> np.ndarray:
    """[n] float64: probability that cell i lies in a segment of `size` cells placed on n cells.

    "clip": start uniform in [-(size-1), n-1], segment clipped (same for every cell); "inside": start
    uniform in [0, n - size]; "wrap": start uniform in [0, n), segment wraps around.
    """
    if placement == "clip":
        return np.full(n, size / (n + size - 1))
    if placement == "wrap":
        return np.full(n, size / n)
    starts = np.arange(n - size + 1)[:, None]
    cells = np.arange(n)[None]
    return ((starts <= cells) & (cells < starts + size)).mean(axis=0)


def _block_coverage(grid: tuple[int, int], scale: tuple[float, float], aspect: tuple[float, float],
                    placement: str, quadrature: int = 256) -> np.ndarray:
    """[n_freq, n_time] float64: probability that a patch lies in one random block (midpoint rule over
    the uniform scale × aspect square, accurate to ~1e-3 patches in the expected counts)."""
    u = (np.arange(quadrature) + 0.5) / quadrature
    scales, aspects = np.meshgrid(scale[0] + (scale[1] - scale[0]) * u, aspect[0] + (aspect[1] - aspect[0]) * u)
    height, width = _block_hw(scales.ravel(), aspects.ravel(), grid, np)
    sizes, counts = np.unique(np.stack([height, width], axis=1).astype(np.int64), axis=0, return_counts=True)
    coverage = np.zeros(grid)
    for (h, w), count in zip(sizes, counts):
        coverage += count * np.outer(_coverage_1d(grid[0], h, placement), _coverage_1d(grid[1], w, placement))
    return coverage / counts.sum()


def _check_multiblock(grid, num_targets, target_scale, target_aspect, context_scale, context_aspect,
                      target_placement):
    grid = _check_grid(grid)
    if int(num_targets) != num_targets or num_targets < 1:
        raise ValueError(f"num_targets must be a positive int, got {num_targets!r}.")
    if target_placement not in PLACEMENTS:
        raise ValueError(f"target_placement={target_placement!r}; valid: {PLACEMENTS}.")
    return (grid, int(num_targets), _check_range("target_scale", target_scale, 0.0, 1.0),
            _check_range("target_aspect", target_aspect, 0.0, None),
            _check_range("context_scale", context_scale, 0.0, 1.0),
            _check_range("context_aspect", context_aspect, 0.0, None))


def multiblock_counts(grid: tuple[int, int], *, num_targets: int = 4,
                      target_scale: tuple[float, float] = (0.15, 0.2),
                      target_aspect: tuple[float, float] = (0.75, 1.5),
                      context_scale: tuple[float, float] = (0.85, 1.0),
                      context_aspect: tuple[float, float] = (1.0, 1.0),
                      target_placement: str = "clip") -> tuple[int, int]:
    """(Kc, Kt): the fixed context and target counts of `multiblock` for this config (Python, no JAX).

    Kt is the expected size of the union of the target blocks and Kc the expected number of
    context-block patches outside that union, both rounded, computed exactly over block positions and
    by quadrature over scale × aspect; then 1 <= Kt <= L - 1 and 1 <= Kc <= L - Kt.
    """
    grid, num_targets, target_scale, target_aspect, context_scale, context_aspect = _check_multiblock(
        grid, num_targets, target_scale, target_aspect, context_scale, context_aspect, target_placement)
    num_patches = grid[0] * grid[1]
    outside_targets = (1.0 - _block_coverage(grid, target_scale, target_aspect, target_placement)) ** num_targets
    in_context = _block_coverage(grid, context_scale, context_aspect, "wrap")
    num_target = min(max(int(np.round(num_patches - outside_targets.sum())), 1), num_patches - 1)
    num_context = min(max(int(np.round((in_context * outside_targets).sum())), 1), num_patches - num_target)
    return num_context, num_target


def _sample_blocks(rng: jax.Array, shape: tuple[int, ...], grid: tuple[int, int], scale: tuple[float, float],
                   aspect: tuple[float, float], placement: str, full_height: bool = False) -> jax.Array:
    """Random rectangular blocks as patch masks: [*shape, n_freq·n_time] bool.

    Scale and aspect are uniform and independent (I-JEPA draws both from one uniform); the position is
    uniform as described in `_coverage_1d` for `placement`. With full_height (time blocks) the aspect is
    unused: height n_freq and width round(scale·n_time) clipped to [1, n_time] (`_time_block_width`).
    """
    n_freq, n_time = grid
    # One draw of random bits for everything: each jax.random call costs compile time on CPU.
    bits = jax.random.bits(rng, (4, *shape), jnp.uint32)
    unit = (bits[:2] >> 8).astype(jnp.float32) * 2.0 ** -24  # uniform in [0, 1), 24 bits
    block_scale = scale[0] + (scale[1] - scale[0]) * unit[0]
    if full_height:
        height = jnp.full(shape, n_freq, jnp.int32)
        width = _time_block_width(block_scale, n_time, jnp).astype(jnp.int32)
    else:
        height, width = _block_hw(block_scale, aspect[0] + (aspect[1] - aspect[0]) * unit[1], grid, jnp)
        height, width = height.astype(jnp.int32), width.astype(jnp.int32)
    token = jnp.arange(n_freq * n_time)

    def along(axis_bits, size, n, cell):
        """[*shape, L] bool: cells of the segment on one axis; its start is uniform over its positions
        (bits modulo the number of positions, bias below 1e-8)."""
        num_positions = {"clip": n + size - 1, "inside": n - size + 1, "wrap": jnp.full_like(size, n)}[placement]
        start = (axis_bits % num_positions.astype(jnp.uint32)).astype(jnp.int32)
        if placement == "clip":
            start = start - (size - 1)
        elif placement == "wrap":
            return (cell - start[..., None]) % n < size[..., None]
        return (start[..., None] <= cell) & (cell < (start + size)[..., None])

    return along(bits[2], height, n_freq, token // n_time) & along(bits[3], width, n_time, token % n_time)


def multiblock(rng: jax.Array, batch_size: int, grid: tuple[int, int], *, num_targets: int = 4,
               target_scale: tuple[float, float] = (0.15, 0.2), target_aspect: tuple[float, float] = (0.75, 1.5),
               context_scale: tuple[float, float] = (0.85, 1.0), context_aspect: tuple[float, float] = (1.0, 1.0),
               target_placement: str = "clip", return_block_masks: bool = False):
    """I-JEPA multi-block masking with fixed counts and no position bias.

    Per example: `num_targets` target blocks and one context block are drawn independently. A block's
    scale (its area as a fraction of the grid, before clipping) and aspect (height / width) are uniform
    in their ranges; the height is clipped to n_freq and the width fitted to the area (`_block_hw`).
    Then, with Kc, Kt = `multiblock_counts(...)` (Python ints; the same for every step):
    - targets are the union of the target blocks, truncated or topped up uniformly at random to exactly
      Kt patches (truncation picks a random subset of the union; top-up adds random patches outside it);
    - context is Kc patches chosen, in order of preference, among the context block minus the target
      blocks, then patches outside both, then leftover target-block patches that truncation dropped;
      ties are broken uniformly at random. It never contains a target.

    Placement, chosen so that no position is systematically disfavoured:
    - target_placement="clip" (default): a block may hang over the grid edge and is clipped, its
      top-left uniform over the (n_freq + h - 1)·(n_time + w - 1) positions where it still overlaps the
      grid. Every patch then lies in a block with the same probability, so first/last rows and columns
      are targets as often as the middle; the price is that blocks at the edges are smaller (mean block
      area on 5×13 with the defaults: 6.4 patches clipped vs 11.5 inside), so the I-JEPA ranges give
      fewer targets: Kt = 22 of 65 (vs 33 with "inside"); target_scale=(0.3, 0.4) gives Kt = 32.
    - "inside": blocks lie fully inside the grid (I-JEPA with its last-row/column fix); they keep their
      area but edge rows and columns are covered less often, strongly so on a 5-row grid.
    - The context block is placed on the torus (it wraps around both axes): it keeps its full area and
      every patch is in it equally often. (I-JEPA's shipped config always puts it in the top-left 15×15.)

    Jittable; everything but rng must be a Python value.

    Args:
        rng: a jax.random key.
        batch_size: B.
        grid: (n_freq, n_time) patches; token index f·n_time + t.
        num_targets: number of target blocks.
        target_scale, target_aspect: (lo, hi) uniform ranges of a target block's scale and aspect.
        context_scale, context_aspect: the same for the context block.
        target_placement: "clip" or "inside", see above.
        return_block_masks: also return each target block's patches (clipped to the grid, before the count
            is fixed), e.g. to predict each block in its own predictor sequence as I-JEPA does.

    Returns:
        context_idx: [B, Kc] int32, ascending.
        target_idx: [B, Kt] int32, ascending, disjoint from context_idx.
        block_masks (only with return_block_masks): [B, num_targets, n_freq·n_time] bool.
    """
    num_context, num_target = multiblock_counts(
        grid, num_targets=num_targets, target_scale=target_scale, target_aspect=target_aspect,
        context_scale=context_scale, context_aspect=context_aspect, target_placement=target_placement)
    grid, num_targets, target_scale, target_aspect, context_scale, context_aspect = _check_multiblock(
        grid, num_targets, target_scale, target_aspect, context_scale, context_aspect, target_placement)
    rng_targets, rng_context, rng_pick_targets, rng_pick_context = jax.random.split(rng, 4)
    block_masks = _sample_blocks(rng_targets, (batch_size, num_targets), grid, target_scale, target_aspect,
                                 target_placement)
    context_block = _sample_blocks(rng_context, (batch_size,), grid, context_scale, context_aspect, "wrap")
    in_targets = block_masks.any(axis=1)
    is_target = _select_top_levels(rng_pick_targets, in_targets.astype(jnp.int32), num_target)
    context_level = jnp.where(is_target, -1, jnp.where(in_targets, 0, jnp.where(context_block, 2, 1)))
    is_context = _select_top_levels(rng_pick_context, context_level, num_context)
    out = (_indices_where(is_context, num_context), _indices_where(is_target, num_target))
    return (*out, block_masks) if return_block_masks else out


# -- variable counts: multi-block and time masking as the papers sample them -----------------------------

class MaskSet(NamedTuple):
    """Context and target patches with per-example counts, padded to static capacities (a pytree).

    Nc and Nt are Python ints fixed by the sampler's configuration (`multiblock_capacity`,
    `time_blocks_capacity`, `unstructured_capacity`), so a jitted step compiles once.

    Attributes:
        context_idx: [B, Nc] int32: each example's context patches in ascending order, then padding.
        context_valid: [B, Nc] bool: True for real context patches (a prefix of each row).
        target_idx: [B, Nt] int32: the targets, ascending, then padding.
        target_valid: [B, Nt] bool: True for real targets.
    Padding entries hold patch index 0 with valid=False; consumers must give them no attention and no
    loss weight. Context and targets are disjoint per example.
    """
    context_idx: jax.Array
    context_valid: jax.Array
    target_idx: jax.Array
    target_valid: jax.Array


class BlockLayout(NamedTuple):
    """The blocks behind a `multiblock_variable` / `time_blocks` MaskSet (tests, diagnostics, and
    I-JEPA-style prediction of each target block in its own sequence).

    Attributes:
        target_blocks: [B, M, L] bool: the M target blocks of the chosen layout, in draw order.
        context_block: [B, L] bool: its context block.
        num_blocks_kept: [B] int32: the targets are the union of target_blocks[:, :num_blocks_kept]. It is
            M except in the fallback, so mean(num_blocks_kept < M) is the fallback rate.
    """
    target_blocks: jax.Array
    context_block: jax.Array
    num_blocks_kept: jax.Array


# Rounding ties: a float32 draw may land on either side of a .5 boundary that float64 puts on one side.
_TIE_SLACK = 1e-4


def _time_block_width(scale, n_time: int, xp):
    """Width in columns of a time block (all n_freq rows): round(scale·n_time) clipped to [1, n_time]."""
    return xp.clip(xp.round(scale * n_time), 1, n_time)


def _rounded_range(lo: float, hi: float, low_clip: int, high_clip: int) -> tuple[int, int]:
    """(min, max) of clip(round(x), low_clip, high_clip) over x in [lo, hi], ties counted both ways."""
    smallest = math.ceil(lo - 0.5 - _TIE_SLACK)
    largest = math.floor(hi + 0.5 + _TIE_SLACK)
    return min(max(smallest, low_clip), high_clip), min(max(largest, low_clip), high_clip)


def _block_area_range(grid: tuple[int, int], scale: tuple[float, float], aspect: tuple[float, float],
                      full_height: bool) -> tuple[int, int]:
    """(smallest, largest) patch count of one block over the scale × aspect ranges.

    Exact, not sampled: for each height h, the areas a = scale·L that give h (round(sqrt(a·aspect))
    clipped to [1, n_freq] equals h for some aspect in range) form an interval, and the width
    round(a / h) is monotone in a, so the extremes sit at the interval ends. Within 1e-4 of a rounding
    tie both sides count, so the bounds err on the safe side only there.
    """
    n_freq, n_time = grid
    if full_height:
        low, high = _rounded_range(scale[0] * n_time, scale[1] * n_time, 1, n_time)
        return n_freq * low, n_freq * high
    area_lo, area_hi = scale[0] * n_freq * n_time, scale[1] * n_freq * n_time
    smallest, largest = n_freq * n_time, 0
    for height in range(1, n_freq + 1):
        lo = area_lo if height == 1 else max(area_lo, (height - 0.5) ** 2 / aspect[1] * (1 - _TIE_SLACK))
        hi = area_hi if height == n_freq else min(area_hi, (height + 0.5) ** 2 / aspect[0] * (1 + _TIE_SLACK))
        if lo <= hi:
            width_lo, width_hi = _rounded_range(lo / height, hi / height, 1, n_time)
            smallest, largest = min(smallest, height * width_lo), max(largest, height * width_hi)
    return smallest, largest


def _check_variable_blocks(grid, num_targets, target_scale, target_aspect, context_scale, context_aspect,
                           full_height: bool):
    """Validated (grid, num_targets, ranges...) and the capacities (Nc, Nt) and smallest context block."""
    grid, num_targets, target_scale, target_aspect, context_scale, context_aspect = _check_multiblock(
        grid, num_targets, target_scale, target_aspect, context_scale, context_aspect, "inside")
    num_patches = grid[0] * grid[1]
    target_area = _block_area_range(grid, target_scale, target_aspect, full_height)[1]
    smallest_context, context_capacity = _block_area_range(grid, context_scale, context_aspect, full_height)
    capacity = (context_capacity, min(num_patches, num_targets * target_area))
    return (grid, num_targets, target_scale, target_aspect, context_scale, context_aspect), capacity, \
        smallest_context


def multiblock_capacity(grid: tuple[int, int], *, num_targets: int = 4,
                        target_scale: tuple[float, float] = (0.15, 0.2),
                        target_aspect: tuple[float, float] = (0.75, 1.5),
                        context_scale: tuple[float, float] = (0.85, 1.0),
                        context_aspect: tuple[float, float] = (1.0, 1.0)) -> tuple[int, int]:
    """(Nc, Nt): the static capacities of `multiblock_variable` for this config (Python ints, no JAX).

    Nc is the largest context block and Nt = min(L, num_targets · largest target block), block sizes
    from `_block_hw` over the scale × aspect ranges, computed exactly (`_block_area_range`). On 5×13 with
    the defaults: target blocks of 9-12 patches, context blocks of 55-65, so (Nc, Nt) = (65, 48).
    """
    return _check_variable_blocks(grid, num_targets, target_scale, target_aspect, context_scale,
                                  context_aspect, False)[1]


def time_blocks_capacity(grid: tuple[int, int], *, num_targets: int = 4,
                         target_scale: tuple[float, float] = (0.15, 0.2),
                         context_scale: tuple[float, float] = (0.85, 1.0)) -> tuple[int, int]:
    """(Nc, Nt): the static capacities of `time_blocks`: n_freq × the widest context block, and
    min(L, num_targets · n_freq × the widest target block). On 5×13 with the defaults: target blocks of
    2-3 columns, context blocks of 11-13 columns, so (Nc, Nt) = (65, 60)."""
    return _check_variable_blocks(grid, num_targets, target_scale, (1.0, 1.0), context_scale, (1.0, 1.0),
                                  True)[1]


def _padded_indices(mask: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
    """mask [B, L] bool with at most `capacity` True per row → (idx [B, capacity] int32, valid [B, capacity]):
    the True positions ascending, then padding (index 0, valid False)."""
    order = jnp.argsort(~mask, axis=-1, stable=True)[:, :capacity].astype(jnp.int32)
    valid = jnp.arange(capacity) < mask.sum(axis=-1, keepdims=True)
    return jnp.where(valid, order, 0), valid


def _variable_blocks(rng, batch_size, grid, num_targets, target_scale, target_aspect, context_scale,
                     context_aspect, min_context, num_candidates, full_height, return_layout):
    """Shared body of `multiblock_variable` and `time_blocks` (see there)."""
    config, capacity, smallest_context = _check_variable_blocks(
        grid, num_targets, target_scale, target_aspect, context_scale, context_aspect, full_height)
    grid, num_targets, target_scale, target_aspect, context_scale, context_aspect = config
    if int(min_context) != min_context or not 1 <= min_context <= smallest_context:
        raise ValueError(f"min_context must be an int in [1, {smallest_context}] (the smallest context block "
                         f"of this config), got {min_context!r}.")
    if int(num_candidates) != num_candidates or num_candidates < 1:
        raise ValueError(f"num_candidates must be a positive int, got {num_candidates!r}.")
    num_patches = grid[0] * grid[1]
    shape = (batch_size, int(num_candidates))
    rng_targets, rng_context = jax.random.split(rng)
    target_blocks = _sample_blocks(rng_targets, (*shape, num_targets), grid, target_scale, target_aspect,
                                   "inside", full_height)                                # [B, C, M, L]
    context_block = _sample_blocks(rng_context, shape, grid, context_scale, context_aspect, "inside",
                                   full_height)                                          # [B, C, L]
    # unions[:, :, k] = union of the first k target blocks, k = 0..M.
    unions = jnp.concatenate([jnp.zeros((*shape, 1, num_patches), bool),
                              jax.lax.cummax(target_blocks.astype(jnp.int8), axis=2) > 0], axis=2)
    context_count = jnp.sum(context_block[:, :, None] & ~unions, axis=-1)                # [B, C, M + 1]
    # context_count falls with k, so the acceptable k form a prefix; k = 0 is always acceptable because
    # min_context <= the smallest context block.
    blocks_kept = jnp.sum(context_count >= min_context, axis=-1) - 1                    # [B, C]
    most_kept = blocks_kept.max(axis=1)                                                  # [B]
    chosen = jnp.argmax(blocks_kept == most_kept[:, None], axis=1)                      # first such candidate

    def pick(x):  # [B, C, ...] → [B, ...] at the chosen candidate
        return jnp.take_along_axis(x, chosen.reshape(-1, *[1] * (x.ndim - 1)), axis=1)[:, 0]

    is_target = jnp.take_along_axis(pick(unions), most_kept[:, None, None], axis=1)[:, 0]
    chosen_context_block = pick(context_block)
    is_context = chosen_context_block & ~is_target
    masks = MaskSet(*_padded_indices(is_context, capacity[0]), *_padded_indices(is_target, capacity[1]))
    if not return_layout:
        return masks
    return masks, BlockLayout(pick(target_blocks), chosen_context_block, most_kept.astype(jnp.int32))


def multiblock_variable(rng: jax.Array, batch_size: int, grid: tuple[int, int], *, num_targets: int = 4,
                        target_scale: tuple[float, float] = (0.15, 0.2),
                        target_aspect: tuple[float, float] = (0.75, 1.5),
                        context_scale: tuple[float, float] = (0.85, 1.0),
                        context_aspect: tuple[float, float] = (1.0, 1.0),
                        min_context: int = 1, num_candidates: int = 8, return_layout: bool = False):
    """I-JEPA multi-block masking as the papers sample it: per-example counts vary, nothing is invented.

    Per example (I-JEPA, Assran et al. 2023 §3; Riou et al. 2024 §3.2 and Fig. 1: "target and context
    blocks are sampled independently, and then patches in the target blocks are eventually removed from
    the context one"):
    - `num_targets` target blocks, each with scale (area as a fraction of the grid) and aspect
      (height / width) uniform in their ranges, drawn independently per block and per example;
    - one context block the same way (aspect 1 by default);
    - every block lies inside the grid, its top-left uniform over the positions where it fits; the size
      follows `_block_hw` (height round(sqrt(area·aspect)) clipped to n_freq, width fitted to the area),
      so on a 5-row grid the area wins over the aspect;
    - targets = the union of the target blocks (they may overlap); context = the context block minus
      that union.
    The defaults are I-JEPA's (4 targets of scale (0.15, 0.2), aspect (0.75, 1.5); context scale
    (0.85, 1.0)): Riou et al. give no numbers. What differs from I-JEPA's code: it draws scale and aspect
    from one uniform, one block size per batch, excludes the last row/column from block positions, and
    truncates every example to the batch's smallest counts; here draws are independent and counts vary.

    Empty or tiny contexts: a layout is acceptable when its context has >= min_context patches. Each
    example draws `num_candidates` layouts at once and keeps the first acceptable one, which samples the
    same distribution as I-JEPA's redraw-until-acceptable loop (up to the rare fallback). If no candidate
    is acceptable (the fallback), it keeps the candidate and the longest prefix of its target blocks that
    leaves >= min_context context patches, dropping whole target blocks from the targets; a target is
    never put into the context and no patch moves between sets. The fallback rate is
    mean(layout.num_blocks_kept < num_targets) with return_layout=True. On 5×13 with the default ranges
    the context never has fewer than 7 patches (context block >= 55, targets <= 48), so min_context <= 7
    never rejects; I-JEPA's code asks for more than min_keep = 10 patches (min_context=11 here).

    Counts on 5×13 with the defaults (4,000 draws): targets 15-48 patches, mean 51% of the grid;
    context 11-50, mean 44% (the fixed-count `multiblock` gives 22 and 40 to every example).

    Jittable; everything but rng must be a Python value.

    Args:
        rng: a jax.random key.
        batch_size: B.
        grid: (n_freq, n_time) patches; token index f·n_time + t.
        num_targets: M, the number of target blocks.
        target_scale, target_aspect: (lo, hi) uniform ranges of a target block's scale and aspect.
        context_scale, context_aspect: the same for the context block.
        min_context: smallest acceptable context, 1 <= min_context <= the smallest context block.
        num_candidates: layouts drawn per example (memory B·num_candidates·(M + 2)·L bytes).
        return_layout: also return the `BlockLayout`.

    Returns:
        MaskSet with capacities (Nc, Nt) = `multiblock_capacity(grid, ...)`, and the BlockLayout when
        return_layout.
    """
    return _variable_blocks(rng, batch_size, grid, num_targets, target_scale, target_aspect, context_scale,
                            context_aspect, min_context, num_candidates, False, return_layout)


def time_blocks(rng: jax.Array, batch_size: int, grid: tuple[int, int], *, num_targets: int = 4,
                target_scale: tuple[float, float] = (0.15, 0.2), context_scale: tuple[float, float] = (0.85, 1.0),
                min_context: int = 1, num_candidates: int = 8, return_layout: bool = False):
    """Time masking of Riou et al. 2024 (§3.2, Fig. 1): multi-block masking with blocks spanning all
    frequency rows.

    Each block covers all n_freq rows and width = round(scale·n_time) clipped to [1, n_time] columns at a
    uniform position inside the grid; `num_targets` target blocks and one context block are drawn
    independently, targets = their union, context = the context block minus the targets; retries and
    fallback as in `multiblock_variable`. The paper gives no numbers (block count, scales): the defaults
    are I-JEPA's multi-block ones (4 targets of scale (0.15, 0.2), context (0.85, 1.0)); on 5×13 that is
    target blocks of 2-3 columns and a context block of 11-13 columns; targets 10-55 patches, mean 51%,
    context 10-50, mean 44% (4,000 draws). Unlike `time_only` (target columns
    at a fixed ratio, the context their complement), the counts vary per example and the context block
    leaves some non-target columns out.

    Args and returns: as `multiblock_variable` (no aspect: blocks are full height); capacities
    `time_blocks_capacity(grid, ...)`.
    """
    return _variable_blocks(rng, batch_size, grid, num_targets, target_scale, (1.0, 1.0), context_scale,
                            (1.0, 1.0), min_context, num_candidates, True, return_layout)


def unstructured_capacity(num_patches: int, min_ratio: float, max_ratio: float) -> tuple[int, int]:
    """(Nc, Nt) of `unstructured_variable` for ratios in [min_ratio, max_ratio]:
    Nc = num_visible(L, min_ratio) and Nt = L - num_visible(L, max_ratio)."""
    if not 0.0 <= float(min_ratio) <= float(max_ratio):
        raise ValueError(f"min_ratio must satisfy 0 <= min_ratio <= max_ratio, got min_ratio={min_ratio}, "
                         f"max_ratio={max_ratio}.")
    if not float(max_ratio) < 1.0 or num_visible(num_patches, max_ratio) < 1:
        raise ValueError(f"max_ratio={max_ratio} leaves no context patch of {num_patches}.")
    if num_visible(num_patches, min_ratio) >= num_patches:
        raise ValueError(f"min_ratio={min_ratio} leaves no target patch of {num_patches}.")
    return num_visible(num_patches, min_ratio), num_patches - num_visible(num_patches, max_ratio)


def unstructured_variable(rng: jax.Array, batch_size: int, num_patches: int, mask_ratio, *,
                          min_ratio: float | None = None, max_ratio: float | None = None) -> MaskSet:
    """Unstructured masking whose ratio may be traced: one compile for every ratio in [min_ratio, max_ratio].

    Each example's context is a uniformly random set of K patches and its targets the other L - K,
    K the same for the whole batch (Audio-JEPA draws r ~ U[0.4, 0.6] per batch).
    - A Python float mask_ratio gives K = num_visible(L, r) (the float64 floor of `random_unstructured`).
    - A traced scalar gives K = floor(L·(1 - r) + L·2^-20) in float32: the floor of the exact product
      for a decimal r, the slack undoing float32's rounding of r (0.6 → 0.60000002 would lose a patch
      at L = 65). It can differ from num_visible where float64 itself lands just below an integer
      (L = 190, r = 0.8: num_visible 37, here 38). K is clipped to the capacities, so a ratio outside
      [min_ratio, max_ratio] acts as the nearest end.

    Args:
        rng: a jax.random key.
        batch_size: B.
        num_patches: L.
        mask_ratio: fraction r of target patches, a Python float or a traced scalar.
        min_ratio, max_ratio: Python floats fixing the capacities (`unstructured_capacity`); default
            mask_ratio, which must then be a Python float.

    Returns:
        MaskSet, (Nc, Nt) = unstructured_capacity(L, min_ratio, max_ratio); targets and context
        partition range(L) per example.
    """
    is_static = isinstance(mask_ratio, (int, float, np.floating))
    if (min_ratio is None or max_ratio is None) and not is_static:
        raise ValueError("min_ratio and max_ratio are required when mask_ratio is traced; they fix the shapes.")
    min_ratio = mask_ratio if min_ratio is None else min_ratio
    max_ratio = mask_ratio if max_ratio is None else max_ratio
    context_capacity, target_capacity = unstructured_capacity(num_patches, min_ratio, max_ratio)
    if is_static:
        if not float(min_ratio) <= float(mask_ratio) <= float(max_ratio):
            raise ValueError(f"mask_ratio={mask_ratio} is outside [min_ratio, max_ratio] = "
                             f"[{min_ratio}, {max_ratio}].")
        num_context = num_visible(num_patches, mask_ratio)
    else:
        ratio = jnp.asarray(mask_ratio, jnp.float32)
        num_context = jnp.floor(num_patches * (1 - ratio) + num_patches * 2.0 ** -20).astype(jnp.int32)
        num_context = jnp.clip(num_context, num_patches - target_capacity, context_capacity)
    noise = jax.random.uniform(rng, (batch_size, num_patches))
    rank = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)  # a uniformly random permutation per example
    is_context = rank < num_context
    return MaskSet(*_padded_indices(is_context, context_capacity), *_padded_indices(~is_context, target_capacity))


def mask_fractions(masks: MaskSet, num_patches: int) -> tuple[jax.Array, jax.Array]:
    """(context_fraction [B], target_fraction [B]) float32: each example's share of the L patches, to log.
    A None validity (a fixed-count mask) means every entry is a patch."""
    def fraction(idx, valid):
        count = jnp.full(idx.shape[:1], idx.shape[1], jnp.float32) if valid is None else valid.sum(axis=1)
        return count.astype(jnp.float32) / num_patches
    return fraction(masks.context_idx, masks.context_valid), fraction(masks.target_idx, masks.target_valid)


# -- per-batch random mask ratio ---------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RatioBuckets:
    """A per-batch random mask ratio from a small fixed set of values (Audio-JEPA draws U[0.4, 0.6]).

    Each ratio fixes the index-array shapes, so a trainer keeps one compiled step per bucket (e.g. a
    jitted step with the ratio as a static argument, or a dict of steps) and dispatches on the host:
    `ratio = buckets.ratios[buckets.draw_bucket(step, seed)]`. At most len(ratios) compiles ever happen.

    Why buckets rather than padding every batch to the largest mask with attention masks: shapes stay
    static with no padding tokens, so no FLOPs or memory go to padded positions and the loss needs no
    validity weights; each batch gets its ratio exactly, up to the bucket resolution
    (high - low) / (num_buckets - 1). The cost is num_buckets compiles (done once, cacheable) and a
    discrete rather than continuous ratio distribution.

    Attributes:
        ratios: the mask ratios, ascending.
    """
    ratios: tuple[float, ...]

    def draw_bucket(self, step: int, seed: int = 0) -> int:
        """Bucket index for `step`, uniform over the buckets.

        A pure function of (seed, step) computed with numpy on the host: every process of a multi-host
        run draws the same bucket without communicating, and a resumed run repeats the same sequence.
        """
        if int(step) != step or step < 0 or int(seed) != seed or seed < 0:
            raise ValueError(f"step and seed must be non-negative ints, got step={step!r}, seed={seed!r}.")
        return int(np.random.default_rng([int(seed), int(step)]).integers(len(self.ratios)))

    def ratio(self, step: int, seed: int = 0) -> float:
        """The mask ratio for `step`: ratios[draw_bucket(step, seed)]."""
        return self.ratios[self.draw_bucket(step, seed)]


def bucketed_ratios(low: float, high: float, num_buckets: int) -> RatioBuckets:
    """num_buckets evenly spaced ratios from low to high, both included (one bucket: the midpoint).

    Drawing a bucket uniformly keeps the mean (low + high) / 2 of U[low, high]. Ratios are rounded to
    10 decimals so that, e.g., 0.45 is the literal 0.45 when `num_visible` floors L·(1 - r).
    """
    if not 0.0 <= float(low) <= float(high) < 1.0:
        raise ValueError(f"mask ratio range must satisfy 0 <= low <= high < 1, got low={low}, high={high}.")
    if int(num_buckets) != num_buckets or num_buckets < 1:
        raise ValueError(f"num_buckets must be a positive int, got {num_buckets!r}.")
    values = np.linspace(low, high, num_buckets) if num_buckets > 1 else np.array([(low + high) / 2])
    return RatioBuckets(tuple(round(float(v), 10) for v in values))
