"""The training input pipeline: ArrayRecord shards -> fixed-size batches of log-mel crops.

    shards -> seeded global shuffle (reshuffled every epoch) -> repeat -> decode
           -> random crop / zero-pad -> log-mel (host) -> normalise -> batch
           -> this process's rows of each global batch -> multiprocessing prefetch

(All lazy: a process decodes and crops only the elements of its own rows.)

With `device_frontend=True` the pipeline stops after the crop and yields raw waveforms; the
trainer computes log-mels on the accelerator with the same front end (`frontend.logmel_device`).

Shards of precomputed EnCodec targets (manifest kind "encodec_targets",
tools/precompute_encodec_targets.py) take the same path with their own source and crop: they yield
`features` and `codes` crops of whole 75 Hz frames (`TargetSource`, `RandomFrameCrop`) for EncodecMAE.

Element order is a function of (seed, index) only: random crops draw from per-element RNGs, so
batches are identical for any number of workers, and the iterator state (a position) is small
and checkpointable with `grain.checkpoint.CheckpointSave`.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import logging
import os
import time

import grain
import numpy as np

from audiojepa.data import records, shards, stats, target_records
from audiojepa.ops import frontend
from audiojepa.runtime import worker_lifetime

# How many consecutive undecodable records a read may step over before giving up: far beyond any
# plausible local corruption, while a shard set that is wholesale unreadable still fails loudly.
MAX_CONSECUTIVE_BAD_RECORDS = 256
# Pauses (s) before re-reading a record whose read failed with an error that is not corruption (an NFS,
# Lustre or FUSE hiccup): ~30 s in all, so that a short outage is waited out, not counted as bad records.
READ_RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
CORRUPTION_MARKERS = ("corrupt", "hash mismatch", "invalid", "truncated")
WAVEFORM = "waveform"  # DataSpec.kind of ordinary clip shards (their manifest has no "kind")
KINDS = (WAVEFORM, target_records.KIND)


def manifest_shard_sizes(spec) -> list[int] | None:
    """The manifest's per-shard record counts in spec.shard_paths' order (None without a manifest or
    counts, or when the paths are not exactly the manifest's shards)."""
    manifest = spec.manifest or {}
    names, counts = manifest.get("shards"), manifest.get("shard_num_clips")
    if not names or counts is None or len(names) != len(spec.shard_paths):
        return None
    by_name = dict(zip(names, counts))
    sizes = [by_name.get(os.path.basename(p)) for p in spec.shard_paths]
    return None if any(size is None for size in sizes) else [int(size) for size in sizes]


class ClipSource(grain.sources.RandomAccessDataSource):
    """Decoded clips from ArrayRecord shards; element i is
    `{"waveform", "skipped_records", "skipped_by_reason", "record_index"}` (`_decode` gives the first keys).

    A record that cannot be used (corrupt or truncated bytes, NaN/Inf samples, silence, or a sample
    rate other than `sample_rate`) is skipped: the read moves on to the next record (wrapping
    around) and the element carries how many were stepped over, so the trainer can count them and a
    bad record never stops a run. `waveform`: [samples] float32; `skipped_records`: int32;
    `skipped_by_reason`: [len(records.SKIP_REASONS)] int32, the same count split by reason.
    """

    def __init__(self, paths: list[str], sample_rate: int | None = None, expected_sizes: list[int] | None = None):
        """paths: ArrayRecord shards; expected_sizes: their record counts as the manifest lists them
        (`shard_num_clips`), checked so that a shard cut short by a partial copy is an error naming it."""
        self._paths = list(paths)
        self._sample_rate = sample_rate
        sizes = shards.count_records(self._paths, expected_sizes)
        self._source = grain.sources.ArrayRecordDataSource(self._paths)
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
        by_reason = np.zeros(len(records.SKIP_REASONS), np.int32)
        for skipped in range(min(MAX_CONSECUTIVE_BAD_RECORDS, self._len)):
            i = (index + skipped) % self._len
            try:
                decoded = self._decode(self._read(i))
            except Exception as e:  # corrupt bytes, bad codec, a read that failed on every retry
                reason = getattr(e, "reason", "corrupt")
                by_reason[records.SKIP_REASONS.index(reason)] += 1
                path, j = self.locate(i)
                logging.warning("skipping record %d of %s (%s): %s", j, path, reason, e)
                continue
            return {**decoded, "skipped_records": np.int32(skipped), "skipped_by_reason": by_reason,
                    "record_index": np.int64(i)}
        path, j = self.locate(index)
        raise RuntimeError(f"{MAX_CONSECUTIVE_BAD_RECORDS} consecutive records from record {j} of {path} "
                           "could not be used; the shard set looks corrupt or was written at another sample "
                           "rate (re-run tools/make_shards.py)")

    def _read(self, index: int) -> bytes:
        """Record `index`'s bytes. A read error that does not say the data are corrupt is retried after
        each of READ_RETRY_DELAYS_S (a storage hiccup), then raised."""
        for delay in (*READ_RETRY_DELAYS_S, None):
            try:
                return self._source[index]
            except Exception as e:  # noqa: BLE001 -- ArrayRecord raises RuntimeError for I/O and corruption alike
                if delay is None or any(marker in str(e).lower() for marker in CORRUPTION_MARKERS):
                    raise
                path, j = self.locate(index)
                logging.warning("reading record %d of %s failed (%s: %s); retrying in %.1f s", j, path,
                                type(e).__name__, e, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _decode(self, raw: bytes) -> dict:
        """Record bytes -> {"waveform": [samples] float32}; raises records.CorruptRecordError."""
        return {"waveform": records.decode_waveform(raw, sample_rate=self._sample_rate,
                                                    silence_peak=records.SILENCE_PEAK)}

    def __repr__(self) -> str:  # Grain stores this in iterator checkpoints as a sanity check.
        return f"ClipSource({len(self._paths)} shards, {self._len} records, first={self._paths[0]!r})"


class TargetSource(ClipSource):
    """Precomputed EnCodec targets (audiojepa.data.target_records); element i is `{"features" [T, 128] (stored
    dtype), "codes" [T, num_codebooks] int16, "skipped_records", "skipped_by_reason", "record_index"}`, bad
    records skipped and counted as in ClipSource."""

    def __init__(self, paths: list[str], num_codebooks: int, expected_sizes: list[int] | None = None):
        super().__init__(paths, expected_sizes=expected_sizes)
        self._num_codebooks = int(num_codebooks)

    def _decode(self, raw: bytes) -> dict:
        record = target_records.decode_targets(raw, num_codebooks=self._num_codebooks)
        return {"features": record["features"], "codes": record["codes"]}

    def __repr__(self) -> str:
        return f"TargetSource({len(self._paths)} shards, {self._len} records, first={self._paths[0]!r})"


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
class RandomFrameCrop(grain.transforms.RandomMap):
    """Crops precomputed `features` [T, 128] and `codes` [T, n_q] to `num_frames` frames at a uniform random
    whole-frame offset, or pads their end; yields float32 features and int32 codes.

    A clip of at least `num_frames` frames is only sliced. A shorter one is padded with zero features
    and code 0; the on-device path instead zero-pads the waveform and encodes it, so its padded frames
    are EnCodec's output for silence after the clip (and their codes). Both score the padding, as the
    reference does, but with different targets.
    """

    num_frames: int

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        features, codes = element["features"], element["codes"]
        n = features.shape[0]
        if n > self.num_frames:
            start = int(rng.integers(0, n - self.num_frames + 1))
            features, codes = features[start:start + self.num_frames], codes[start:start + self.num_frames]
        elif n < self.num_frames:
            features = np.pad(features, ((0, self.num_frames - n), (0, 0)))
            codes = np.pad(codes, ((0, self.num_frames - n), (0, 0)))
        return {**element, "features": features.astype(np.float32), "codes": codes.astype(np.int32)}


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
    kind: str = WAVEFORM  # or target_records.KIND: precomputed EnCodec features and codes
    manifest_path: str = ""  # the shard set's manifest.json ("" without one), for error messages
    manifest: dict | None = dataclasses.field(default=None, compare=False, repr=False)

    @property
    def crop_samples(self) -> int:
        return self.frontend.num_samples_for_frames(self.crop_frames)

    @property
    def target_frames(self) -> int:
        """Frames per crop of precomputed targets: crop_samples // hop_samples (4 s at 24 kHz -> 300)."""
        return self.crop_samples // int(self.manifest["hop_samples"])


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
    start_batch: int = 0,
) -> grain.MapDataset:
    """The per-process dataset of batches (before prefetching), indexable and deterministic.

    Args:
      spec: resolved data spec.
      batch_size: examples per batch *for this process* (global batch / process_count).
      seed: shuffle and crop seed.
      process_index, process_count: this process's slice of the global stream.
      device_frontend: yield `waveform` [batch, crop_samples] instead of `lms` (waveform shards only).
      normalize: apply (lms - mean) / std (off when computing the statistics themselves).
      num_epochs: None repeats forever.
      start_batch: skip this process's first `start_batch` batches (resuming at global batch
        `start_batch` without an iterator state, e.g. after the process count changed).

    Each batch is a dict: `lms` [batch, n_mels, crop_frames] float32 (or `waveform`
    [batch, crop_samples] float32; or, for precomputed EnCodec targets, `features`
    [batch, target_frames, 128] float32 and `codes` [batch, target_frames, stored n_q] int32),
    `skipped_records` [batch] int32 (unusable records stepped over), `skipped_by_reason`
    [batch, len(records.SKIP_REASONS)] int32 (the same, by reason) and `record_index` [batch] int64
    (which record each example came from).
    """
    precomputed = spec.kind == target_records.KIND
    if precomputed:
        source = TargetSource(list(spec.shard_paths), num_codebooks=int(spec.manifest["num_codebooks"]),
                              expected_sizes=manifest_shard_sizes(spec))
    else:
        source = ClipSource(list(spec.shard_paths), sample_rate=spec.frontend.sample_rate,
                            expected_sizes=manifest_shard_sizes(spec))
    ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(num_epochs)
    # The crop is drawn on the global stream so that its RNG is keyed on the global element index:
    # element g is the same crop of the same clip whatever the process count.
    if precomputed:
        ds = ds.random_map(RandomFrameCrop(spec.target_frames))
    else:
        ds = ds.random_map(RandomCrop(spec.crop_samples))
    if not device_frontend and not precomputed:
        ds = ds.map(LogMel(spec.frontend))
        if normalize:
            ds = ds.map(Normalize(spec.norm_mean, spec.norm_std))
    # Global batch k is elements [k * B, (k + 1) * B) of the global stream, and process p feeds rows
    # [p * b, (p + 1) * b) of it (b = B / process_count): consecutive blocks of b elements go round-robin
    # to the processes. The global batch is then the same array, row for row, for any process count, so
    # multi-host runs reproduce single-host ones. MapDataset is lazy: a process decodes only its blocks.
    ds = ds.batch(batch_size, drop_remainder=True)[process_index::process_count]
    return ds[start_batch:] if start_batch else ds


def make_iterator(
    ds: grain.MapDataset,
    *,
    num_workers: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int = 0,
) -> grain.DatasetIterator:
    """A checkpointable iterator over `ds`; `num_workers` > 0 decodes in that many processes.

    The batches hold the same examples and crops whatever `num_workers` or `read_threads`; host log-mels may
    differ at float32 rounding (~5e-7) between num_workers = 0 and > 0, because workers run NumPy's BLAS on
    one thread (below) and the main process on several.
    """
    read = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=max(2 * read_threads, 1))
    it_ds = ds.to_iter_dataset(read)
    if num_workers > 0:
        # Workers are spawned processes that inherit this environment. Each does single-clip NumPy work,
        # where multi-threaded BLAS only oversubscribes the cores (host log-mel ran 5x slower with
        # OpenBLAS's default threads on a busy 2-core machine). The user's own setting wins.
        for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, "1")
        # A worker exits within a second of the training process dying, however it died (SIGKILL included).
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=num_workers, per_worker_buffer_size=worker_buffer_size),
            worker_init_fn=functools.partial(worker_lifetime.exit_when_orphaned, os.getpid()))
    return iter(it_ds)


def data_position(*, global_batch_size: int, process_count: int, num_workers: int, start_batch: int = 0,
                  first_step: int = 0) -> dict:
    """Where a run's data stream stands; stored (JSON) in every checkpoint's meta.

    The iterator built with `make_dataset(..., start_batch=start_batch)` yields global batch
    `start_batch + step - first_step` (of `global_batch_size` examples) at train step `step`.
    """
    return {"global_batch_size": int(global_batch_size), "process_count": int(process_count),
            "num_workers": int(num_workers), "start_batch": int(start_batch), "first_step": int(first_step)}


def plan_resume(saved: dict | None, step: int, **current) -> tuple[dict, bool]:
    """How to resume the data stream from a checkpoint at `step`.

    Args:
      saved: the checkpoint's `data_position` (None for checkpoints that predate it).
      step: the checkpoint's train step.
      current: this run's `global_batch_size`, `process_count` and `num_workers`.

    Returns:
      (position, restore_iterator): the position to build this run's iterator at (its
      `start_batch`), and whether the checkpoint's Grain iterator state applies to it.

    Grain saves one iterator state per process (`process_<i>-of-<n>.json`), shaped by the number of
    workers, so it can be restored only by the same number of processes with the same workers. When
    either changed, the stream is rebuilt from the step instead: global batches are a function of
    (seed, global index) whatever the process count, so with an unchanged global batch size this is
    exactly the stream the original run would have read; with another batch size it restarts at the
    first new batch that holds no example seen before. Either way a warning says what happened.
    """
    if saved is None:
        return data_position(**current), True
    if all(saved.get(k) == v for k, v in current.items()):
        return dict(saved), True
    next_example = (saved["start_batch"] + step - saved["first_step"]) * saved["global_batch_size"]
    start_batch = -(-next_example // current["global_batch_size"])
    changed = ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in current.items() if saved.get(k) != v)
    exact = ("the same examples and crops (host log-mels may differ at float32 rounding when num_workers "
             "changes, so params are not bit-identical to an uninterrupted run)"
             if saved["global_batch_size"] == current["global_batch_size"] else
             "the first batch after the examples already seen (the global batch size changed)")
    logging.warning("data iterator: the checkpoint at step %d was written with a different setup (%s). Grain's "
                    "per-process iterator state does not apply, so the stream restarts at global batch %d "
                    "computed from the step: %s.", step, changed, start_batch, exact)
    return data_position(**current, start_batch=start_batch, first_step=step), False

