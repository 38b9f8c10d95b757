"""What a resumed run may change in its config, checked against the config saved in its checkpoint.

A checkpoint continues the run that wrote it only if the run is the same: the same method and model
(params and EMA target), the same seed and global batch (the data order and the masks), the same input
(front end, crop, statistics and clips). Changing one of those on resume silently trains something no
uninterrupted run would, so it is an error naming the keys, unless `config.allow_resume_changes` is
True. Other differences (the schedule's total_steps, optimizer values, logging, evaluations, the
shards' path after moving them, speed-only model keys such as dtype or remat) are logged as warnings.
"""

from __future__ import annotations

import json
import logging

# Dotted-key prefixes whose change breaks the run's identity on resume.
IDENTITY_KEYS = ("method", "seed", "batch_size", "model.", "data.frontend", "data.crop_frames", "data.norm_stats",
                 "data.embedded.", "data.device_frontend")
# Keys under those prefixes that change only speed or memory, never the values trained.
SPEED_ONLY_KEYS = ("model.dtype", "model.attention_impl", "model.remat", "model.scan_layers")


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
