"""Log-mel normalisation statistics: storing them with the shards and reading them back (measuring them over
random crops of the pipeline: audiojepa.data.compute_stats).

The statistics file `logmel_stats.json` in a shard folder holds one entry per front end
(`{"frontend": LogMelParams.to_dict(), "mean", "std", "num_crops", "crop_frames", "seed"}`), so one
shard set can serve several front ends. It belongs to the set's audio: re-making the set
(tools/make_shards.py --overwrite) removes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets

import numpy as np

STATS_FILE = "logmel_stats.json"
# The official M2D default (used by the 2022 M2D models): mean -7.1, std 4.2 of log-mel values.
M2D_DEFAULT_STATS = (-7.1, 4.2)


def normalize(lms, mean: float, std: float):
    """(lms - mean) / std; works on NumPy and jax arrays alike."""
    return (lms - mean) / std


def check_norm_stats(mean: float, std: float, *, where: str) -> tuple[float, float]:
    """(mean, std) as floats, or a ValueError naming `where` (a config key or a statistics file): both must be
    finite and std > 0, else every normalised log-mel is inf or NaN and the run fails only when its loss does."""
    mean, std = float(mean), float(std)
    if not (np.isfinite(mean) and np.isfinite(std) and std > 0):
        raise ValueError(f"{where}: mean={mean}, std={std}; log-mel statistics need a finite mean and a finite "
                         "std > 0 (e.g. 'm2d' = -7.1, 4.2)")
    return mean, std


def _read_entries(folder: str) -> list[dict]:
    path = os.path.join(folder, STATS_FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        try:
            return json.load(f)["entries"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a log-mel statistics file ({type(e).__name__}: {e}); delete it and run "
                             f"`python tools/compute_stats.py --shards {folder}`") from None


def read_stats(folder: str, params) -> tuple[float, float]:
    """(mean, std) stored in `folder` for front end `params`; a clear error if there are none."""
    for entry in _read_entries(folder):
        if entry["frontend"] == params.to_dict():
            path = os.path.join(folder, STATS_FILE)
            try:
                return check_norm_stats(entry["mean"], entry["std"], where=path)
            except ValueError as e:
                raise ValueError(f"{e}. Shards of silence give std=0; re-run `python tools/compute_stats.py "
                                 f"--shards {folder}` on audible shards, or set config.data.norm_stats to 'm2d' "
                                 "or a (mean, std) pair") from None
    raise FileNotFoundError(
        f"no log-mel statistics for this front end in {os.path.join(folder, STATS_FILE)}; run "
        f"`python tools/compute_stats.py --shards {folder} --frontend <preset>` or set "
        "config.data.norm_stats to 'm2d' or a (mean, std) pair")


def write_stats(folder: str, params, *, mean: float, std: float, **info) -> str:
    """Adds or replaces the entry for `params` in `folder/logmel_stats.json`; returns the path."""
    entries = [e for e in _read_entries(folder) if e["frontend"] != params.to_dict()]
    entries.append({"frontend": params.to_dict(), "mean": float(mean), "std": float(std), **info})
    path = os.path.join(folder, STATS_FILE)
    # A temporary file of its own, so concurrent writers (test workers, processes of one job) never
    # replace each other's half-written file. Mode 0644 less the umask, as for any new file (mkstemp's
    # 0600 would hide the statistics from the other accounts that read the shards).
    tmp = os.path.join(folder, f"{STATS_FILE}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"entries": entries}, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    return path
