"""`config.data` -> the `pipeline.DataSpec` a run reads: shards (a folder, glob, file list, gs:// URL, or the
embedded corpus, generated on first use), the front end, the crop and the normalisation statistics.

Above the pipeline and the embedded corpus in the import graph (the corpus's statistics are measured through the
pipeline, so the pipeline cannot be the module that generates the corpus for a config)."""

from __future__ import annotations

import inspect
import os

from audiojepa.data import embedded, pipeline, shards, stats, target_records
from audiojepa.ops import frontend
from audiojepa.runtime import storage


def _frontend_from_config(value) -> frontend.LogMelParams:
    if isinstance(value, str):
        return frontend.get_preset(value)
    if isinstance(value, frontend.LogMelParams):
        return value
    try:
        return frontend.LogMelParams.from_dict(dict(value))
    except (TypeError, ValueError) as e:
        raise ValueError(f"config.data.frontend: {e}") from e


def resolve_data_spec(data_config) -> pipeline.DataSpec:
    """Resolves `config.data` (shards, front end, crop, normalisation) into a DataSpec.

    `data.shards`: a shard-set folder, a glob, a list of files, or None/"" for the embedded
    corpus (generated and cached on first use). `data.norm_stats`: "shards" (the statistics
    `tools/compute_stats.py` wrote next to the shards), "m2d" (-7.1, 4.2), "MEAN,STD" or a
    (mean, std) pair.

    A shard set of precomputed EnCodec targets (manifest kind "encodec_targets") gives kind
    "encodec_targets": it needs a front end at the targets' 24 kHz whose crop is whole 320-sample
    frames (the "encodec" preset), and no normalisation ("shards" then means none).
    """
    params = _frontend_from_config(data_config.frontend)
    spec = data_config.get("shards")
    if not spec:
        emb = dict(data_config.get("embedded", {}) or {})
        valid = set(inspect.signature(embedded.ensure_embedded_corpus).parameters) - {"sample_rate", "root"}
        if set(emb) - valid:
            raise ValueError(f"config.data.embedded has unknown keys {sorted(set(emb) - valid)}; valid: "
                             f"{sorted(valid)}")
        spec = embedded.ensure_embedded_corpus(sample_rate=params.sample_rate, **emb)
        if data_config.get("norm_stats", "shards") == "shards":
            embedded.ensure_stats(spec, params)
    paths, manifest = shards.resolve_shards(spec)
    folder = spec if isinstance(spec, str) and storage.isdir(spec) else os.path.dirname(paths[0])
    manifest_path = storage.join(folder, shards.MANIFEST) if manifest is not None else ""
    kind = (manifest or {}).get("kind", pipeline.WAVEFORM)
    if kind not in pipeline.KINDS:
        raise ValueError(f"{manifest_path} has kind={kind!r}; data.shards must be one of {pipeline.KINDS}")
    if kind == target_records.KIND:
        crop_samples = params.num_samples_for_frames(int(data_config.crop_frames))
        if params.sample_rate != manifest["sample_rate"] or crop_samples % manifest["hop_samples"]:
            raise ValueError(f"data.frontend={data_config.frontend!r} with data.crop_frames={data_config.crop_frames} "
                             f"gives {crop_samples} samples at {params.sample_rate} Hz, but the EnCodec targets in "
                             f"{manifest_path} are {manifest['hop_samples']}-sample frames of "
                             f"{manifest['sample_rate']} Hz audio; use data.frontend='encodec' (crop_frames in 75 Hz "
                             "frames, e.g. 300 = 4 s)")
        norm = data_config.get("norm_stats", "shards")
        mean, std = (0.0, 1.0) if norm == "shards" else _norm_stats(norm, folder, params)
        return pipeline.DataSpec(tuple(paths), params, int(data_config.crop_frames), mean, std, manifest["num_clips"],
                        kind=kind, manifest_path=manifest_path, manifest=manifest)
    if manifest is not None and manifest["sample_rate"] != params.sample_rate:
        raise ValueError(f"data.frontend expects {params.sample_rate} Hz audio but the shards in {spec} are "
                         f"{manifest['sample_rate']} Hz; re-shard with --sample_rate {params.sample_rate} "
                         "or pick a matching front-end preset")
    mean, std = _norm_stats(data_config.get("norm_stats", "shards"), folder, params)
    num_clips = manifest["num_clips"] if manifest else -1
    return pipeline.DataSpec(tuple(paths), params, int(data_config.crop_frames), mean, std, num_clips,
                    manifest_path=manifest_path, manifest=manifest)


def _norm_stats(norm, folder: str, params: frontend.LogMelParams) -> tuple[float, float]:
    """(mean, std) for `data.norm_stats` (resolve_data_spec); "shards" reads the statistics in `folder`."""
    if norm == "m2d":
        mean, std = stats.M2D_DEFAULT_STATS
    elif norm == "shards":
        if storage.is_url(folder):  # audiojepa.data.stats reads local statistics files only
            raise ValueError(f"config.data.norm_stats='shards' reads {stats.STATS_FILE} beside the shards, which is "
                             f"not supported for shards at a URL ({folder}); give config.data.norm_stats='MEAN,STD' "
                             f"(the values in that file, or 'm2d')")
        mean, std = stats.read_stats(folder, params)
    else:
        try:
            mean, std = (float(v) for v in (norm.split(",") if isinstance(norm, str) else norm))
        except (TypeError, ValueError):
            raise ValueError(f"data.norm_stats={norm!r}; valid: 'shards', 'm2d', 'MEAN,STD' or a (mean, std) "
                             "pair") from None
        stats.check_norm_stats(mean, std, where=f"config.data.norm_stats={norm!r}")
    return float(mean), float(std)
