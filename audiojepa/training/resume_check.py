"""What a resumed run may change in its config, checked against the config saved in its checkpoint.

A checkpoint continues the run that wrote it only if the run is the same: the same method and model
(params and EMA target), the same seed and global batch (the data order and the masks), the same input
(front end, crop, statistics and clips). Changing one of those on resume silently trains something no
uninterrupted run would, so it is an error naming the keys, unless `config.allow_resume_changes` is
True. Other differences (the schedule's total_steps, optimizer values, logging, evaluations, the
shards' path after moving them, speed-only model keys such as dtype or remat) are logged as warnings.
"""

from __future__ import annotations

import hashlib
import json
import logging

# Dotted-key prefixes whose change breaks the run's identity on resume.
IDENTITY_KEYS = ("method", "seed", "batch_size", "model.", "data.frontend", "data.crop_frames", "data.norm_stats",
                 "data.embedded.", "data.device_frontend")
# Keys under those prefixes that change only speed or memory, never the values trained.
SPEED_ONLY_KEYS = ("model.dtype", "model.attention_impl", "model.remat", "model.scan_layers", "model.residual_dtype")


def flatten(tree, prefix: str = "") -> dict:
    """{"a.b": leaf} of a nested dict (lists and tuples are leaves)."""
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


_MISSING = "<not in this config>"


def changed_keys(saved: dict, config) -> dict[str, tuple]:
    """{dotted key: (saved value, new value)} for every key that differs; a key only one side has shows
    `_MISSING` on the other."""
    new = flatten(json.loads(config.to_json_best_effort()))
    old = flatten(saved)
    return {key: (old.get(key, _MISSING), new.get(key, _MISSING)) for key in sorted(set(old) | set(new))
            if old.get(key, _MISSING) != new.get(key, _MISSING)}


def is_identity_key(key: str) -> bool:
    if key in SPEED_ONLY_KEYS or key == "allow_resume_changes":
        return False
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in IDENTITY_KEYS)


def check(saved: dict | None, config, *, step: int, workdir: str) -> None:
    """Raises ValueError naming the identity keys that differ from the checkpoint's config (saved at
    `step` in `workdir`); logs the other differences. No saved config (older checkpoints): nothing to do."""
    if not saved:
        return
    changes = changed_keys(saved, config)
    if not changes:
        return
    describe = lambda keys: "; ".join(f"config.{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in keys)
    # A key only one side has comes from another version of the configs (a key added with its old
    # behaviour as default, or removed): a warning, so that upgrading the code never blocks a resume.
    breaking = [k for k in changes if is_identity_key(k) and _MISSING not in changes[k]]
    other = [k for k in changes if k not in breaking]
    if other:
        logging.warning("resuming %s from step %d with a changed config: %s", workdir, step, describe(other))
    if breaking:
        message = (f"resuming {workdir} from step {step} with a config that changes the run itself: "
                   f"{describe(breaking)}. Use a new --workdir for a new run, or set "
                   "--config.allow_resume_changes=True to continue this one anyway.")
        if not config.get("allow_resume_changes", False):
            raise ValueError(message)
        logging.warning("%s (allowed by config.allow_resume_changes)", message)


def data_identity(manifest: dict | None) -> dict | None:
    """The identity of a shard set: the SHA-256 of its manifest.json content (canonical JSON) and its clip
    count, or None without a manifest (the embedded corpus, whose config keys identify it). The manifest
    holds shard names, counts and the source, not the folder's path, so a moved copy keeps its identity."""
    if not manifest:
        return None
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True, default=str).encode()).hexdigest()
    return {"manifest_sha256": digest, "num_clips": manifest.get("num_clips")}


def check_data(saved_meta: dict, *, norm_stats: tuple[float, float], identity: dict | None, config, step: int,
               workdir: str) -> None:
    """Raises ValueError when a resume would read other data than the checkpoint's run: a shard set with
    another manifest (`config.data.shards`), or other normalisation statistics (`config.data.norm_stats`, e.g.
    compute_stats.py run again), unless config.allow_resume_changes. Checkpoints written before the shard
    set's identity was recorded skip that part."""
    problems = []
    saved_stats = saved_meta.get("norm_stats")
    if saved_stats is not None and [float(v) for v in saved_stats] != [float(v) for v in norm_stats]:
        problems.append(f"config.data.norm_stats resolves to mean/std {tuple(float(v) for v in norm_stats)}, the "
                        f"run trained with {tuple(float(v) for v in saved_stats)} (were the statistics computed again?)")
    if "data_identity" in saved_meta and saved_meta["data_identity"] != identity:
        problems.append(f"config.data.shards={config.data.get('shards')!r} has another shard set (manifest "
                        f"{_describe_identity(identity)}) than the run trained on ({_describe_identity(saved_meta['data_identity'])})")
    if not problems:
        return
    message = (f"resuming {workdir} from step {step} on other data: " + "; ".join(problems) +
               ". Use a new --workdir for a new run, or set --config.allow_resume_changes=True to continue anyway.")
    if not config.get("allow_resume_changes", False):
        raise ValueError(message)
    logging.warning("%s (allowed by config.allow_resume_changes)", message)


def _describe_identity(identity: dict | None) -> str:
    if identity is None:
        return "none: the embedded corpus"
    return f"sha256 {identity['manifest_sha256'][:12]}…, {identity.get('num_clips')} clips"
