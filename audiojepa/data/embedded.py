"""The embedded default corpus: procedural clips written as a cached shard set on first use.

When a config names no data, training reads this corpus, so every config runs on a laptop with
no download. It is a pure function of its arguments (same bytes on every machine), written once
into the cache folder (`$AUDIOJEPA_CACHE`, default `~/.cache/audiojepa`) and re-used afterwards.
Every clip keeps its class (`label`) and a fixed `split` (train/valid/test, 80/10/10 within each
class) as metadata, so the same corpus serves as a small downstream task.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time

from audiojepa.data import compute_stats, pipeline, shards, stats, synthetic

CORPUS_VERSION = 2
DEFAULT_NUM_CLIPS = 3000
DEFAULT_DURATION_S = 3.0


def cache_root() -> str:
    return os.environ.get("AUDIOJEPA_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "audiojepa")


def split_of(index: int) -> str:
    """train / valid / test, 8:1:1, balanced per class (classes cycle with the clip index)."""
    fold = (index // len(synthetic.CLASS_NAMES)) % 10
    return "valid" if fold == 8 else "test" if fold == 9 else "train"


def corpus_dir(*, sample_rate: int, num_clips: int, duration_s: float, seed: int, root: str | None = None) -> str:
    name = f"embedded-v{CORPUS_VERSION}-sr{sample_rate}-n{num_clips}-d{duration_s:g}s-seed{seed}"
    return os.path.join(root or cache_root(), name)


def ensure_embedded_corpus(
    *,
    sample_rate: int = 16000,
    num_clips: int = DEFAULT_NUM_CLIPS,
    duration_s: float = DEFAULT_DURATION_S,
    seed: int = 0,
    num_shards: int = 4,
    root: str | None = None,
    stats_frontends: tuple[str, ...] = ("m2d",),
) -> str:
    """Returns the folder of the embedded shard set, generating it first if it is not cached.

    The folder is built under a temporary name and renamed into place when complete, so an
    interrupted generation never leaves a half-written corpus behind. Log-mel statistics for the
    `stats_frontends` presets whose sample rate matches are computed and stored with it.
    """
    folder = corpus_dir(sample_rate=sample_rate, num_clips=num_clips, duration_s=duration_s, seed=seed, root=root)
    if os.path.exists(os.path.join(folder, shards.MANIFEST)):
        return folder
    from audiojepa.ops import frontend

    os.makedirs(os.path.dirname(folder), exist_ok=True)
    start = time.time()
    logging.info("generating the embedded corpus (%d clips of %g s at %d Hz) in %s",
                 num_clips, duration_s, sample_rate, folder)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(folder) + ".tmp-", dir=os.path.dirname(folder))
    os.chmod(tmp, 0o755)  # a shared cache, readable by other users (mkdtemp makes it 0700)
    clips = (
        (clip_id, waveform, {"label": label, "split": split_of(i)})
        for i, (clip_id, waveform, label) in enumerate(synthetic.synthesize_clips(
            num_clips, sample_rate=sample_rate, duration_s=duration_s, seed=seed))
    )
    manifest = shards.write_shard_set(tmp, clips, sample_rate=sample_rate, num_shards=num_shards, extra_manifest={
        "input": "embedded procedural corpus",
        "metadata_columns": ["label", "split"],
        "classes": list(synthetic.CLASS_NAMES),
        "corpus_version": CORPUS_VERSION,
        "generator": {"num_clips": num_clips, "duration_s": duration_s, "seed": seed},
    })
    for name in stats_frontends:
        params = frontend.get_preset(name)
        if params.sample_rate == sample_rate:
            _write_stats(tmp, manifest, params)
    shards.move_into_place(tmp, folder)
    logging.info("embedded corpus ready in %.1f s: %s", time.time() - start, folder)
    return folder


def _write_stats(folder: str, manifest: dict, params) -> None:
    """Computes log-mel mean/std for front end `params` over whole clips of the corpus in `folder`."""
    generator = manifest["generator"]
    paths = tuple(os.path.join(folder, n) for n in manifest["shards"])
    crop_frames = params.num_frames(int(generator["duration_s"] * manifest["sample_rate"]))
    spec = pipeline.DataSpec(paths, params, crop_frames, 0.0, 1.0, manifest["num_clips"])
    result = compute_stats.compute_logmel_stats(spec, num_crops=min(manifest["num_clips"], 512), seed=generator["seed"],
                                        progress=False)
    stats.write_stats(folder, params, **result)


def ensure_stats(folder: str, params) -> None:
    """Adds log-mel statistics for front end `params` to the embedded corpus in `folder` if it has none
    (a few seconds; a preset other than the ones computed at generation, e.g. MATPAC's center=False)."""
    try:
        stats.read_stats(folder, params)
        return
    except FileNotFoundError:
        pass
    with open(os.path.join(folder, shards.MANIFEST)) as f:
        manifest = json.load(f)
    logging.info("computing log-mel statistics of the embedded corpus for this front end")
    _write_stats(folder, manifest, params)
