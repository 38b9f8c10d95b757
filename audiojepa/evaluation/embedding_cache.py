"""Embeddings of (embedder, task, crop) stored on disk and reused: a later `evaluate` with other probe settings
embeds nothing again.

A cache entry is `DIR/<task name>/<embedder row>-<key[:20]>.npz` holding `embeddings [n_kept, dim]` (or
[n_kept, depth, dim]), `kept [n_kept]`, `test_embeddings` when a fold task's test crops differ, and a JSON
record (`meta`) of the crop counts, the clips skipped while embedding and the key's parts. The key is the
SHA-256 of:
  - the embedder: for an encoder, its method, model config, input shape, front end, normalisation stats,
    frequency pooling, layer and a digest of every param (so a new checkpoint, another step of a run or a
    fine-tuned copy misses); for the log-mel baseline, its front end and stats;
  - the task: its source, clip ids, and each local clip file's size and modification time (an edited file
    misses); and the sample rate;
  - what changes the embedded audio: `unit_sec` and the crop seed;
  - FORMAT_VERSION, bumped when the embedding code changes what it computes.
Entries are written atomically (a temporary file renamed), so a run killed mid-write leaves no partial entry;
an unreadable entry is logged and recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import zipfile

import numpy as np

FORMAT_VERSION = 1
DISABLED = "none"


def params_digest(params) -> str:
    """SHA-256 over a param tree's leaves in path order: each path, dtype, shape and bytes."""
    import jax

    digest = hashlib.sha256()
    for path, leaf in sorted(jax.tree_util.tree_flatten_with_path(params)[0], key=lambda item: str(item[0])):
        value = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{value.dtype.str}|{value.shape}|".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def embedder_identity(embedder) -> dict:
    """What an embedder computes, as JSON-able data (its params as a digest)."""
    encoder = getattr(embedder, "encoder", None)
    if encoder is None:  # the log-mel baseline
        return {"kind": type(embedder).__name__, "frontend": repr(embedder.params),
                "norm_stats": [float(v) for v in embedder.norm_stats]}
    config = encoder.model_config.to_dict() if hasattr(encoder.model_config, "to_dict") else dict(encoder.model_config)
    return {"kind": "encoder", "method": encoder.method_name, "model": json.dumps(config, sort_keys=True, default=str),
            "input_shape": list(encoder.input_shape), "frontend": repr(encoder.frontend),
            "norm_stats": [float(v) for v in encoder.norm_stats], "freq_pooling": encoder.freq_pooling,
            "layer": encoder.layer, "params": params_digest(encoder.params)}


def task_identity(task) -> dict:
    """A task's source and clips; local clip files also by size and modification time."""
    folder = task.source if os.path.isdir(task.source) else None
    files = []
    if folder is not None:
        for clip in task.clip_ids:
            try:
                stat = os.stat(os.path.join(folder, clip))
                files.append((stat.st_size, stat.st_mtime_ns))
            except OSError:
                files.append(None)
    clips = hashlib.sha256(json.dumps([task.clip_ids, files]).encode()).hexdigest()
    return {"source": os.path.abspath(task.source) if folder else task.source, "name": task.name, "clips": clips}


def cache_key(embedder, task, *, unit_sec: float | None, crop_seed: int) -> tuple[str, dict]:
    """(hex key, its parts)."""
    parts = {"format": FORMAT_VERSION, "embedder": embedder_identity(embedder), "task": task_identity(task),
             "sample_rate": int(embedder.sample_rate), "unit_sec": unit_sec, "crop_seed": int(crop_seed)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest(), parts


def entry_path(cache_dir: str, task_name: str, embedder_name: str, key: str) -> str:
    row = re.sub(r"[^A-Za-z0-9_.-]+", "_", os.path.basename(os.path.normpath(embedder_name)) or "encoder")[:60]
    return os.path.join(cache_dir, re.sub(r"[^A-Za-z0-9_.-]+", "_", task_name), f"{row}-{key[:20]}.npz")


def load(path: str):
    """(embeddings, test_embeddings or None, kept, meta dict), or None when there is no usable entry."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            test = data["test_embeddings"] if "test_embeddings" in data.files else None
            return data["embeddings"], test, data["kept"], meta
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        logging.warning("embedding cache entry %s is unreadable (%s: %s); embedding again", path, type(e).__name__, e)
        return None


def save(path: str, embeddings: np.ndarray, test_embeddings: np.ndarray | None, kept: np.ndarray, meta: dict) -> None:
    """Writes the entry atomically (temporary file in the same folder, then renamed)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    arrays = {"embeddings": np.asarray(embeddings), "kept": np.asarray(kept),
              "meta": np.asarray(json.dumps(meta, sort_keys=True, default=str))}
    if test_embeddings is not None:
        arrays["test_embeddings"] = np.asarray(test_embeddings)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
