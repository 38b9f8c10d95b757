"""k-means in JAX for large feature matrices (EncodecMAE's self-training targets, §1.13 of
shared/reference/encodecmae.md: 1024 clusters of the teacher's last-layer frame features).

`kmeans` runs Lloyd iterations over the feature matrix in fixed-size chunks, so it scales to millions of
frames: each iteration makes one pass that accumulates, per cluster, the sum and count of the frames
assigned to it (and the inertia) with one jitted function compiled once for the chunk shape; the
centroids are then the means. A jax.Array input stays on device and is sliced there; a NumPy input is
copied chunk by chunk every pass (pass `jnp.asarray(features)` when it fits in device memory).

What it does like scikit-learn's KMeans (Lloyd, n_init=1), against which the tests compare it:
- init "k-means++": greedy k-means++ (2 + ⌊ln k⌋ candidates per centre, the one that lowers the
  potential most is kept), here on a random subset of `init_sample_size` frames (all of them when
  smaller); "random": k distinct random frames; or an explicit [k, d] array;
- convergence when Σ‖c_new − c_old‖² ≤ tol · mean per-feature variance of the data (tol 1e-4), or
  after max_iter iterations;
- the returned inertia is Σ min_j ‖x − c_j‖² of the returned centroids (a final assignment pass).
Unlike scikit-learn, an empty cluster is re-seeded with a uniformly random frame (scikit-learn takes
the frames farthest from their centres); the loop never stops on an iteration that had an empty cluster.

Distances are ‖x‖² − 2x·c + ‖c‖² in float32 at `Precision.HIGHEST` (no TF32/bfloat16 matmul passes on
GPU/TPU, which would blur near ties).
"""

import logging
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

PRECISION = jax.lax.Precision.HIGHEST
DEFAULT_CHUNK_SIZE = 65536
INITS = ("k-means++", "random")


def squared_distances(features: jax.Array, centroids: jax.Array) -> jax.Array:
    """‖x − c‖² clamped at 0: features [n, d], centroids [k, d] → [n, k] float32."""
    features = features.astype(jnp.float32)
    centroids = centroids.astype(jnp.float32)
    cross = jnp.matmul(features, centroids.T, precision=PRECISION)
    distances = jnp.sum(features ** 2, axis=-1, keepdims=True) - 2.0 * cross + jnp.sum(centroids ** 2, axis=-1)
    return jnp.maximum(distances, 0.0)


def assign(centroids: jax.Array, features: jax.Array) -> jax.Array:
    """Nearest centroid (squared L2; the first on exact ties) of every feature vector. Jittable.

    Args:
        centroids: [k, d].
        features: [..., d], any leading shape (e.g. [batch, frames, d] inside a train step).

    Returns:
        [...] int32 cluster ids.
    """
    flat = features.reshape(-1, features.shape[-1])
    ids = jnp.argmin(squared_distances(flat, centroids), axis=-1).astype(jnp.int32)
    return ids.reshape(features.shape[:-1])


@jax.jit
def _chunk_stats(centroids: jax.Array, chunk: jax.Array, valid: jax.Array):
    """Per-cluster sums [k, d], counts [k] and inertia (scalar) of the valid rows of a chunk [C, d]."""
    distances = squared_distances(chunk, centroids)
    ids = jnp.argmin(distances, axis=-1)
    weight = valid.astype(jnp.float32)
    k = centroids.shape[0]
    sums = jax.ops.segment_sum(chunk.astype(jnp.float32) * weight[:, None], ids, num_segments=k)
    counts = jax.ops.segment_sum(weight, ids, num_segments=k)
    inertia = jnp.sum(jnp.min(distances, axis=-1) * weight)
    return sums, counts, inertia


@jax.jit
def _chunk_moments(chunk: jax.Array, valid: jax.Array):
    """Σ x and Σ x² over the valid rows of a chunk [C, d] → two [d] float32 arrays."""
    x = chunk.astype(jnp.float32) * valid.astype(jnp.float32)[:, None]
    return jnp.sum(x, axis=0), jnp.sum(x * chunk.astype(jnp.float32), axis=0)


@jax.jit
def _chunk_ids(centroids: jax.Array, chunk: jax.Array) -> jax.Array:
    return assign(centroids, chunk)


class _Chunks:
    """Fixed-size row chunks of an [N, d] matrix, with a `valid` mask per chunk.

    Every chunk has `size` rows: the last one is the matrix's final `size` rows, with only the rows not
    seen before marked valid, so one compiled shape serves every chunk without padding copies.
    """

    def __init__(self, features, chunk_size: int):
        if features.ndim != 2 or features.shape[0] < 1:
            raise ValueError(f"features must be [num_frames, dim] with num_frames >= 1, got {features.shape}.")
        if int(chunk_size) != chunk_size or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
        self.features = features
        self.num_rows = int(features.shape[0])
        self.size = min(int(chunk_size), self.num_rows)
        self.on_device = isinstance(features, jax.Array)

    def __iter__(self):
        for start in range(0, self.num_rows, self.size):
            begin = min(start, self.num_rows - self.size)
            valid = np.arange(self.size) >= start - begin
            if self.on_device:
                chunk = jax.lax.dynamic_slice_in_dim(self.features, begin, self.size)
            else:
                chunk = np.asarray(self.features[begin:begin + self.size], np.float32)
            yield chunk, valid

    def rows(self, idx: np.ndarray) -> jax.Array:
        """Rows at host int indices → [len(idx), d] float32 device array."""
        if self.on_device:
            return jnp.take(self.features, jnp.asarray(idx), axis=0).astype(jnp.float32)
        return jnp.asarray(np.asarray(self.features)[np.asarray(idx)], jnp.float32)


def _kmeans_plus_plus(rng: jax.Array, sample: jax.Array, k: int, num_trials: int) -> jax.Array:
    """Greedy k-means++ on sample [n, d] → [k, d] (jit with k and num_trials static)."""
    n = sample.shape[0]
    rng_first, rng_loop = jax.random.split(rng)
    first = jax.random.randint(rng_first, (), 0, n)
    centroids = jnp.zeros((k, sample.shape[1]), jnp.float32).at[0].set(sample[first])
    closest = squared_distances(sample, sample[first][None])[:, 0]  # [n]

    def add_centre(i, state):
        centroids, closest = state
        total = jnp.sum(closest)
        # D² sampling; all-zero distances (fewer distinct points than k) fall back to uniform.
        logits = jnp.where(total > 0, jnp.log(jnp.maximum(closest, 1e-38)), 0.0)
        logits = jnp.where((total > 0) & (closest <= 0), -jnp.inf, logits)
        candidates = jax.random.categorical(jax.random.fold_in(rng_loop, i), logits, shape=(num_trials,))
        trial_closest = jnp.minimum(closest[:, None], squared_distances(sample, sample[candidates]))  # [n, trials]
        best = jnp.argmin(jnp.sum(trial_closest, axis=0))
        return centroids.at[i].set(sample[candidates[best]]), trial_closest[:, best]

    centroids, _ = jax.lax.fori_loop(1, k, add_centre, (centroids, closest))
    return centroids


_kmeans_plus_plus_jit = jax.jit(_kmeans_plus_plus, static_argnums=(2, 3))


def _initial_centroids(rng: jax.Array, chunks: _Chunks, k: int, init, init_sample_size: int | None) -> jax.Array:
    if not isinstance(init, str):
        centroids = jnp.asarray(init, jnp.float32)
        if centroids.shape != (k, chunks.features.shape[1]):
            raise ValueError(f"init centroids have shape {centroids.shape}, expected {(k, chunks.features.shape[1])}.")
        return centroids
    if init not in INITS:
        raise ValueError(f"Unknown init {init!r}; valid: {INITS} or a [k, d] array.")
    rng_sample, rng_init = jax.random.split(rng)
    if init == "random":
        return chunks.rows(np.asarray(jax.random.choice(rng_sample, chunks.num_rows, (k,), replace=False)))
    sample_size = chunks.num_rows if init_sample_size is None else min(int(init_sample_size), chunks.num_rows)
    if sample_size < k:
        raise ValueError(f"init_sample_size={init_sample_size} is smaller than k={k}.")
    if sample_size == chunks.num_rows:
        sample = chunks.rows(np.arange(chunks.num_rows))
    else:
        sample = chunks.rows(np.sort(np.asarray(jax.random.choice(rng_sample, chunks.num_rows, (sample_size,),
                                                                  replace=False))))
    num_trials = 2 + int(math.log(k))
    return _kmeans_plus_plus_jit(rng_init, sample, k, num_trials)


def _pass_stats(centroids: jax.Array, chunks: _Chunks):
    """One pass over the data: per-cluster sums [k, d], counts [k] and the inertia."""
    sums = counts = inertia = None
    for chunk, valid in chunks:
        s, c, i = _chunk_stats(centroids, chunk, valid)
        sums, counts, inertia = (s, c, i) if sums is None else (sums + s, counts + c, inertia + i)
    return sums, counts, inertia


def kmeans(rng: jax.Array, features, k: int, *, max_iter: int = 300, tol: float = 1e-4, init="k-means++",
           init_sample_size: int | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
           callback: Callable[[dict], None] | None = None) -> tuple[np.ndarray, float]:
    """Lloyd's k-means (module docstring).

    Args:
        rng: a jax.random key (initialisation and re-seeding of empty clusters).
        features: [N, d] float (NumPy or jax.Array), N >= k.
        k: number of clusters.
        max_iter: maximum number of Lloyd iterations.
        tol: relative tolerance on the centroid shift (× the mean per-feature variance of the data).
        init: "k-means++", "random" or a [k, d] array of initial centroids.
        init_sample_size: k-means++ runs on this many random frames (None: all of them; it costs
            k · (2 + ln k) distance passes over them, so cap it for millions of frames, e.g. 256·k).
        chunk_size: rows per jitted step (memory: chunk_size × k distances in float32).
        callback: called after every iteration with {"iteration", "inertia" (of the centroids before
            the update), "shift" (Σ‖c_new − c_old‖²), "num_empty" (clusters re-seeded)}; e.g. a tqdm update.

    Returns:
        (centroids [k, d] float32 NumPy, inertia: float, Σ over frames of the squared distance to the
        nearest returned centroid).
    """
    chunks = _Chunks(features, chunk_size)
    if int(k) != k or not 1 <= k <= chunks.num_rows:
        raise ValueError(f"k must be an int in [1, num_frames={chunks.num_rows}], got {k!r}.")
    k = int(k)
    rng_init, rng_reseed = jax.random.split(rng)
    centroids = _initial_centroids(rng_init, chunks, k, init, init_sample_size)

    total = sq_total = None
    for chunk, valid in chunks:
        s, s2 = _chunk_moments(chunk, valid)
        total, sq_total = (s, s2) if total is None else (total + s, sq_total + s2)
    mean = total / chunks.num_rows
    tol_scaled = float(tol) * float(jnp.mean(sq_total / chunks.num_rows - mean ** 2))

    for iteration in range(1, max_iter + 1):
        sums, counts, inertia = _pass_stats(centroids, chunks)
        empty = counts == 0
        new_centroids = sums / jnp.maximum(counts, 1.0)[:, None]
        num_empty = int(jnp.sum(empty))
        if num_empty:
            seeds = chunks.rows(np.asarray(jax.random.randint(jax.random.fold_in(rng_reseed, iteration), (k,), 0,
                                                              chunks.num_rows)))
            new_centroids = jnp.where(empty[:, None], seeds, new_centroids)
        shift = float(jnp.sum((new_centroids - centroids) ** 2))
        centroids = new_centroids
        info = {"iteration": iteration, "inertia": float(inertia), "shift": shift, "num_empty": num_empty}
        if callback is not None:
            callback(info)
        logging.debug("k-means iteration %d: inertia %.6g, shift %.3g, %d empty", iteration, info["inertia"],
                      shift, num_empty)
        if not num_empty and shift <= tol_scaled:
            break
    _, _, inertia = _pass_stats(centroids, chunks)
    logging.info("k-means: %d clusters of %d frames, %d iterations, inertia %.6g", k, chunks.num_rows, iteration,
                 float(inertia))
    return np.asarray(centroids, np.float32), float(inertia)


def assign_in_chunks(centroids, features, chunk_size: int = DEFAULT_CHUNK_SIZE) -> np.ndarray:
    """`assign` over a large [N, d] matrix in fixed-size chunks (one compile) → [N] int32 NumPy ids."""
    chunks = _Chunks(features, chunk_size)
    centroids = jnp.asarray(centroids, jnp.float32)
    ids = np.empty(chunks.num_rows, np.int32)
    end = 0
    for chunk, valid in chunks:
        new = np.asarray(_chunk_ids(centroids, chunk))[valid]
        ids[end:end + new.shape[0]] = new
        end += new.shape[0]
    return ids
