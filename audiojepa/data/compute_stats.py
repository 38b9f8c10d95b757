"""Log-mel statistics of a shard set measured through the training pipeline (tools/compute_stats.py, the
embedded corpus): the numbers `audiojepa.data.stats` stores and reads."""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from audiojepa.data import pipeline


def compute_logmel_stats(
    spec,
    *,
    num_crops: int = 5000,
    seed: int = 0,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
) -> dict:
    """Mean and std of raw (un-normalised) log-mel values over `num_crops` random crops.

    `spec` is a `pipeline.DataSpec`; crops are `spec.crop_frames` long, drawn with the training
    pipeline itself (shuffled records, random offsets, short clips zero-padded). Statistics are
    scalars over every element, accumulated in float64, like the official M2D code.
    """
    if isinstance(num_crops, bool) or not isinstance(num_crops, (int, np.integer)) or num_crops <= 0:
        raise ValueError(f"num_crops={num_crops!r} (--num_crops): the statistics need a whole number of crops > 0")
    batch_size = max(1, min(batch_size, num_crops))
    num_batches = -(-num_crops // batch_size)
    ds = pipeline.make_dataset(spec, batch_size=batch_size, seed=seed, normalize=False)
    it = pipeline.make_iterator(ds, num_workers=num_workers)
    total = total_sq = 0.0
    count = 0
    for b in tqdm(range(num_batches), unit="batch", disable=not progress, desc="log-mel statistics"):
        lms = np.asarray(next(it)["lms"], dtype=np.float64)[:num_crops - b * batch_size]  # exactly num_crops
        total += lms.sum()
        total_sq += np.square(lms).sum()
        count += lms.size
    mean = total / count
    std = float(np.sqrt(max(total_sq / count - mean * mean, 0.0)))
    return {"mean": float(mean), "std": std, "num_crops": num_crops,
            "crop_frames": spec.crop_frames, "seed": seed}
