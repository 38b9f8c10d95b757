"""The training input pipeline: ArrayRecord shards -> fixed-size batches of log-mel crops.

    shards -> seeded global shuffle (reshuffled every epoch) -> repeat -> decode
           -> random crop / zero-pad -> this process's slice -> log-mel (host) -> normalise
           -> batch -> multiprocessing prefetch

(All lazy: a process decodes and crops only the elements of its own slice.)

With `device_frontend=True` the pipeline stops after the crop and yields raw waveforms; the
trainer computes log-mels on the accelerator with the same front end (`frontend.logmel_device`).

Element order is a function of (seed, index) only: random crops draw from per-element RNGs, so
batches are identical for any number of workers, and the iterator state (a position) is small
and checkpointable with `grain.checkpoint.CheckpointSave`.
"""

from __future__ import annotations

import bisect
import dataclasses
import logging
import os

import grain
import numpy as np
from array_record.python import array_record_module

from audiojepa import frontend
from audiojepa.data import records, shards, stats

# How many consecutive undecodable records a read may step over before giving up: far beyond any
# plausible local corruption, while a shard set that is wholesale unreadable still fails loudly.
MAX_CONSECUTIVE_BAD_RECORDS = 256


class ClipSource(grain.sources.RandomAccessDataSource):
    """Decoded clips from ArrayRecord shards; element i is `{"waveform", "skipped_records", "record_index"}`.

    A record that fails to decode is skipped: the read moves on to the next record (wrapping
    around) and the element carries how many were skipped, so the trainer can log a count and a
    corrupt record never stops a run. `waveform`: [samples] float32; `skipped_records`: int32.
    """

    def __init__(self, paths: list[str]):
        self._paths = list(paths)
        self._source = grain.sources.ArrayRecordDataSource(self._paths)
        sizes = []
        for p in self._paths:
            reader = array_record_module.ArrayRecordReader(p)
            sizes.append(reader.num_records())
            reader.close()
        self._starts = np.cumsum([0] + sizes[:-1]).tolist()
        self._len = int(sum(sizes))
        if self._len == 0:
            raise ValueError(f"the shards hold no records: {self._paths[:3]}")

    def __len__(self) -> int:
        return self._len

    def locate(self, index: int) -> tuple[str, int]:
        """Global record index -> (shard path, index within that shard)."""
        shard = bisect.bisect_right(self._starts, index) - 1
        return self._paths[shard], index - self._starts[shard]

    def __getitem__(self, index: int) -> dict:
        index = int(index)
        for skipped in range(min(MAX_CONSECUTIVE_BAD_RECORDS, self._len)):
            i = (index + skipped) % self._len
            try:
                waveform = records.decode_waveform(self._source[i])
            except Exception as e:  # corrupt bytes, bad codec, I/O error on one record
                path, j = self.locate(i)
                logging.warning("skipping undecodable record %d of %s: %s", j, path, e)
                continue
            return {"waveform": waveform, "skipped_records": np.int32(skipped), "record_index": np.int64(i)}
        path, j = self.locate(index)
        raise RuntimeError(f"{MAX_CONSECUTIVE_BAD_RECORDS} consecutive records from record {j} of {path} "
                           "failed to decode; the shard set looks corrupt (re-run tools/make_shards.py)")

    def __repr__(self) -> str:  # Grain stores this in iterator checkpoints as a sanity check.
        return f"ClipSource({len(self._paths)} shards, {self._len} records, first={self._paths[0]!r})"


@dataclasses.dataclass(frozen=True)
class RandomCrop(grain.transforms.RandomMap):
    """Crops `waveform` to `num_samples` at a uniform random offset, or zero-pads its end."""

    num_samples: int

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        waveform = element["waveform"]
        n = waveform.shape[0]
        if n > self.num_samples:
            start = int(rng.integers(0, n - self.num_samples + 1))
            waveform = waveform[start:start + self.num_samples]
        elif n < self.num_samples:
            waveform = np.pad(waveform, (0, self.num_samples - n))
        return {**element, "waveform": np.ascontiguousarray(waveform, dtype=np.float32)}


@dataclasses.dataclass(frozen=True)
class LogMel(grain.transforms.Map):
    """`waveform` [samples] -> `lms` [n_mels, frames] float32 with the host front end."""

    params: frontend.LogMelParams

    def map(self, element: dict) -> dict:
        element = dict(element)
        element["lms"] = frontend.logmel_host(element.pop("waveform"), self.params)
        return element


@dataclasses.dataclass(frozen=True)
class Normalize(grain.transforms.Map):
    """`lms` -> (lms - mean) / std with dataset statistics."""

    mean: float
    std: float

    def map(self, element: dict) -> dict:
        return {**element, "lms": stats.normalize(element["lms"], self.mean, self.std)}


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """What a run reads, resolved from `config.data`: stored in checkpoints for evaluation."""

    shard_paths: tuple[str, ...]
    frontend: frontend.LogMelParams
    crop_frames: int
    norm_mean: float
    norm_std: float
    num_clips: int

    @property
    def crop_samples(self) -> int:
        return self.frontend.num_samples_for_frames(self.crop_frames)


def _frontend_from_config(value) -> frontend.LogMelParams:
    if isinstance(value, str):
        return frontend.get_preset(value)
    if isinstance(value, frontend.LogMelParams):
        return value
    return frontend.LogMelParams(**dict(value))


def resolve_data_spec(data_config) -> DataSpec:
    """Resolves `config.data` (shards, front end, crop, normalisation) into a DataSpec.

    `data.shards`: a shard-set folder, a glob, a list of files, or None/"" for the embedded
    corpus (generated and cached on first use). `data.norm_stats`: "shards" (the statistics
    `tools/compute_stats.py` wrote next to the shards), "m2d" (-7.1, 4.2), "MEAN,STD" or a
    (mean, std) pair.
    """
    params = _frontend_from_config(data_config.frontend)
    spec = data_config.get("shards")
    if not spec:
        from audiojepa.data import embedded  # generating the corpus is rare; keep imports light

        emb = data_config.get("embedded", {}) or {}
        spec = embedded.ensure_embedded_corpus(sample_rate=params.sample_rate, **dict(emb))
        if data_config.get("norm_stats", "shards") == "shards":
            embedded.ensure_stats(spec, params)
    paths, manifest = shards.resolve_shards(spec)
    if manifest is not None and manifest["sample_rate"] != params.sample_rate:
        raise ValueError(f"data.frontend expects {params.sample_rate} Hz audio but the shards in {spec} are "
                         f"{manifest['sample_rate']} Hz; re-shard with --sample_rate {params.sample_rate} "
                         "or pick a matching front-end preset")
    norm = data_config.get("norm_stats", "shards")
    if norm == "m2d":
        mean, std = stats.M2D_DEFAULT_STATS
    elif norm == "shards":
        folder = spec if isinstance(spec, str) and os.path.isdir(spec) else os.path.dirname(paths[0])
        mean, std = stats.read_stats(folder, params)
    else:
        try:
            mean, std = (float(v) for v in (norm.split(",") if isinstance(norm, str) else norm))
        except (TypeError, ValueError):
            raise ValueError(f"data.norm_stats={norm!r}; valid: 'shards', 'm2d', 'MEAN,STD' or a (mean, std) "
                             "pair") from None
    num_clips = manifest["num_clips"] if manifest else -1
    return DataSpec(tuple(paths), params, int(data_config.crop_frames), float(mean), float(std), num_clips)


def make_dataset(
    spec: DataSpec,
    *,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    device_frontend: bool = False,
    normalize: bool = True,
    num_epochs: int | None = None,
) -> grain.MapDataset:
    """The per-process dataset of batches (before prefetching), indexable and deterministic.

    Args:
      spec: resolved data spec.
      batch_size: examples per batch *for this process* (global batch / process_count).
      seed: shuffle and crop seed.
      process_index, process_count: this process's slice of the global stream.
      device_frontend: yield `waveform` [batch, crop_samples] instead of `lms`.
      normalize: apply (lms - mean) / std (off when computing the statistics themselves).
      num_epochs: None repeats forever.

    Each batch is a dict: `lms` [batch, n_mels, crop_frames] float32 (or `waveform`
    [batch, crop_samples] float32), `skipped_records` [batch] int32 (undecodable records stepped
    over) and `record_index` [batch] int64 (which record each example came from).
    """
    source = ClipSource(list(spec.shard_paths))
    ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(num_epochs)
    # The crop is drawn before slicing so that its RNG is keyed on the global element index: element g
    # is the same crop of the same clip whatever the process count (still computed lazily, per slice).
    ds = ds.random_map(RandomCrop(spec.crop_samples))
    ds = ds[process_index::process_count]
    if not device_frontend:
        ds = ds.map(LogMel(spec.frontend))
        if normalize:
            ds = ds.map(Normalize(spec.norm_mean, spec.norm_std))
    return ds.batch(batch_size, drop_remainder=True)


def make_iterator(
    ds: grain.MapDataset,
    *,
    num_workers: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int = 0,
) -> grain.DatasetIterator:
    """A checkpointable iterator over `ds`; `num_workers` > 0 decodes in that many processes.

    The batches do not depend on `num_workers` or `read_threads`.
    """
    read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2 * read_threads, 1))
    it_ds = ds.to_iter_dataset(read)
    if num_workers > 0:
        # Workers are spawned processes that inherit this environment. Each does single-clip NumPy work,
        # where multi-threaded BLAS only oversubscribes the cores (host log-mel ran 5x slower with
        # OpenBLAS's default threads on a busy 2-core machine). The user's own setting wins.
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, "1")
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=worker_buffer_size))
    return iter(it_ds)
