"""EncodecMAE's inputs and targets precomputed once: EnCodec features and RVQ codes of every clip, in shards.

    waveform shards (24 kHz, tools/make_shards.py) -> frozen EnCodec encoder + RVQ (jitted, fixed shapes)
        -> shards of target records (audiojepa.data.target_records) + manifest.json (kind "encodec_targets")

Shapes stay fixed so nothing recompiles per clip length: a clip is cut into chunks of at most
`chunk_samples` (a multiple of 320), chunks are batched `batch_rows` at a time in input order, and
each batch is zero-padded to the smallest of a few bucket lengths (`bucket_lengths`: the chunk, about
half of it, a quarter, ...) that holds its longest chunk, so a run compiles at most `NUM_BUCKETS`
times. The encoder pads every row at its own length (`EncodecEncoder(...)(waveform, num_samples)`), so
a chunk of n samples gives exactly the ceil(n / 320) frames of encoding it alone, whatever its bucket;
the padded frames are dropped. Chunks are encoded independently (no state carried over), so a clip
longer than the chunk has frames without left context after each chunk boundary.

How this differs from computing the targets in the training step: the step encodes each random 4 s
crop on its own, while here a clip is encoded whole (up to the chunk) and the pipeline then crops
frames. Causal EnCodec makes the two identical for a crop that starts at the clip's (or chunk's) first
sample; a crop starting later sees the audio before it (the LSTM state and the convs' left context),
so its features and codes differ somewhat from the on-device ones.

The manifest also stores `quantization_error`: e_q = mean over all stored frames of ‖r_q‖² (summed
over the 128 channels), q = 0 .. n_q, where r_0 = the features and r_q = r_{q−1} − the codebook-q
entry chosen for it, computed from the float32 features. γ_q follow from it
(encodecmae_loss.codebook_weights_from_errors; tools/encodecmae_codebook_weights.py).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from audiojepa.data import records, shards, target_records
from audiojepa.models import encodec

DEFAULT_CHUNK_SECONDS = 30.0
NUM_BUCKETS = 4  # padded row lengths per run (compiles): the chunk, ~1/2, ~1/4, ~1/8 of it
READ_BLOCK = 64  # records read from a shard at a time


def file_sha256(path: str) -> str:
    """Hex sha256 of a file, or of a folder (every file under it, sorted: relative path, then bytes)."""
    digest = hashlib.sha256()
    if os.path.isdir(path):
        files = sorted(os.path.relpath(os.path.join(root, name), path)
                       for root, _, names in os.walk(path) for name in names)
    else:
        files = [None]
    for rel in files:
        if rel is not None:
            digest.update(rel.replace(os.sep, "/").encode() + b"\0")
        with open(path if rel is None else os.path.join(path, rel), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def encodec_source(checkpoint: str, seed: int) -> dict | str:
    """The manifest's `encodec_source`: {"checkpoint": absolute path, "sha256"} or "random seed N"."""
    if checkpoint:
        return {"checkpoint": os.path.abspath(checkpoint), "sha256": file_sha256(checkpoint)}
    return f"random seed {int(seed)}"


def chunk_samples_for(chunk_seconds: float) -> int:
    """`chunk_seconds` at 24 kHz rounded up to whole frames (a multiple of 320 samples)."""
    if not chunk_seconds > 0:
        raise ValueError(f"--chunk_seconds={chunk_seconds}; must be > 0")
    return encodec.num_frames(int(np.ceil(chunk_seconds * encodec.SAMPLE_RATE))) * encodec.HOP_LENGTH


def bucket_lengths(chunk_samples: int, num_buckets: int = NUM_BUCKETS) -> tuple[int, ...]:
    """Padded row lengths in samples, ascending: ceil(chunk frames / 2^k) whole frames, k < num_buckets."""
    frames = encodec.num_frames(chunk_samples)
    return tuple(sorted({-(-frames // 2 ** k) * encodec.HOP_LENGTH for k in range(num_buckets)}))


@functools.partial(jax.jit, static_argnames="num_codebooks")
def encode_rows(params: dict, waveform: jax.Array, num_samples: jax.Array, num_codebooks: int):
    """EnCodec features, RVQ codes and residual energies of a padded batch of rows.

    Args:
        params: {"encoder", "codebooks" [n_total, 1024, 128]} frozen EnCodec params.
        waveform: [rows, samples] float32 at 24 kHz, each row zero-padded after its num_samples.
        num_samples: [rows] int32 valid samples per row.
        num_codebooks: n_q (static).

    Returns:
        features [rows, F, 128] float32, codes [rows, F, n_q] int32 and residual_energy
        [rows, F, n_q + 1] float32 (‖r_q‖² per frame, module docstring), F = samples / 320; frames at
        and after ceil(num_samples / 320) of a row are padding.
    """
    features = encodec.EncodecEncoder().apply({"params": params["encoder"]}, waveform, num_samples)
    codes, _ = encodec.rvq_encode(params["codebooks"], features, num_codebooks)
    residual = features
    energies = [jnp.sum(residual ** 2, axis=-1)]
    for q in range(num_codebooks):  # the same subtractions, in the same order, as rvq_encode's stages
        residual = residual - jnp.take(params["codebooks"][q], codes[..., q], axis=0)
        energies.append(jnp.sum(residual ** 2, axis=-1))
    return features, codes, jnp.stack(energies, axis=-1)


@dataclasses.dataclass
class EncodedClip:
    """One clip's targets: features [T, 128] float32, codes [T, n_q] int32, residual_energy [T, n_q + 1]."""

    key: Any
    num_samples: int
    features: np.ndarray
    codes: np.ndarray
    residual_energy: np.ndarray


@dataclasses.dataclass
class _OpenClip:
    key: Any
    num_samples: int
    rows_left: int
    parts: list = dataclasses.field(default_factory=list)


def encode_clips(params: dict, clips: Iterable[tuple[Any, np.ndarray]], *, num_codebooks: int, batch_rows: int = 16,
                 chunk_samples: int | None = None, num_buckets: int = NUM_BUCKETS) -> Iterator[EncodedClip]:
    """Encodes `(key, waveform [samples] float32 at 24 kHz)` pairs lazily; yields EncodedClip in input order.

    A clip of n samples gets T = ceil(n / 320) frames. Clips longer than `chunk_samples` (default
    DEFAULT_CHUNK_SECONDS) are encoded in independent chunks; rows are batched `batch_rows` at a time and
    padded to `bucket_lengths` (module docstring).
    """
    chunk_samples = chunk_samples or chunk_samples_for(DEFAULT_CHUNK_SECONDS)
    if chunk_samples % encodec.HOP_LENGTH:
        raise ValueError(f"chunk_samples={chunk_samples} must be a multiple of {encodec.HOP_LENGTH}")
    if batch_rows < 1:
        raise ValueError(f"batch_rows={batch_rows}; must be >= 1")
    buckets = bucket_lengths(chunk_samples, num_buckets)
    params = jax.device_put(params)
    rows: list[tuple[_OpenClip, np.ndarray]] = []
    open_clips: deque[_OpenClip] = deque()

    def run(batch):
        length = min(b for b in buckets if b >= max(w.shape[0] for _, w in batch))
        waveform = np.zeros((batch_rows, length), np.float32)
        num_samples = np.zeros((batch_rows,), np.int32)  # unused rows: 0 samples, their output is ignored
        for i, (_, w) in enumerate(batch):
            waveform[i, :w.shape[0]], num_samples[i] = w, w.shape[0]
        out = jax.device_get(encode_rows(params, waveform, num_samples, num_codebooks))
        for i, (clip, w) in enumerate(batch):
            frames = encodec.num_frames(w.shape[0])
            clip.parts.append([a[i, :frames] for a in out])
            clip.rows_left -= 1

    def finished():
        while open_clips and open_clips[0].rows_left == 0:
            clip = open_clips.popleft()
            features, codes, energy = (np.concatenate(parts) for parts in zip(*clip.parts))
            yield EncodedClip(clip.key, clip.num_samples, features, codes, energy)

    for key, waveform in clips:
        waveform = np.asarray(waveform, np.float32)
        if waveform.ndim != 1 or waveform.shape[0] == 0:
            raise ValueError(f"clip {key!r}: expected a non-empty [samples] waveform, got shape {waveform.shape}")
        starts = range(0, waveform.shape[0], chunk_samples)
        clip = _OpenClip(key, waveform.shape[0], len(starts))
        open_clips.append(clip)
        rows += [(clip, waveform[s:s + chunk_samples]) for s in starts]
        while len(rows) >= batch_rows:
            run(rows[:batch_rows])
            del rows[:batch_rows]
            yield from finished()
    if rows:
        run(rows)
        yield from finished()


def _read_clips(input_dir: str, manifest: dict, skipped: list, bar) -> Iterator[tuple[tuple, np.ndarray]]:
    """((shard index, "shard:record", id, metadata), waveform) of every usable record, in shard order.

    Records that do not decode as 24 kHz clips (records.SKIP_REASONS), or sit in a corrupt chunk of the
    shard ("corrupt", `_read_block`), go to `skipped`, never abort. A shard that cannot be opened at all
    raises shards.ShardReadError naming it."""
    for shard_index, name in enumerate(manifest["shards"]):
        path = os.path.join(input_dir, name)
        reader = shards.open_reader(path)
        try:
            count = reader.num_records()
            for start in range(0, count, READ_BLOCK):
                for j, raw in enumerate(_read_block(reader, path, start, min(count, start + READ_BLOCK)), start):
                    where = f"{name}:{j}"
                    try:
                        if isinstance(raw, shards.ShardReadError):
                            raise raw
                        header = records.decode_header(raw)
                        waveform = records.decode_waveform(raw, sample_rate=encodec.SAMPLE_RATE,
                                                           silence_peak=records.SILENCE_PEAK)
                    except Exception as e:  # one bad record never stops the run
                        skipped.append({"path": where, "reason": getattr(e, "reason", "corrupt"), "detail": str(e)})
                        logging.warning("skipping record %s (%s): %s", where, skipped[-1]["reason"], e)
                        bar.update(1)
                        bar.set_postfix(skipped=len(skipped), refresh=False)
                        continue
                    yield (shard_index, where, str(header.get("id", where)), header.get("metadata") or {}), waveform
        finally:
            reader.close()


def _read_block(reader, path: str, start: int, end: int) -> list[bytes | shards.ShardReadError]:
    """Records [start, end) of the open shard `path`. If the block read fails (a corrupt chunk), each record
    is read on its own and one that cannot be read is a shards.ShardReadError in its place."""
    try:
        return shards.read_records(reader, path, start, end)
    except shards.ShardReadError as e:
        logging.warning("%s; reading records %d..%d one by one", e, start, end - 1)
    block = []
    for j in range(start, end):
        try:
            block.append(shards.read_records(reader, path, j, j + 1)[0])
        except shards.ShardReadError as e:
            block.append(e)
    return block


def check_input(input_dir: str) -> dict:
    """The input shard set's manifest; raises unless it is a waveform shard set at 24 kHz."""
    manifest = shards.read_manifest(input_dir)
    path = os.path.join(input_dir, shards.MANIFEST)
    if manifest.get("kind") == target_records.KIND:
        raise ValueError(f"--input={input_dir}: {path} is already an {target_records.KIND} shard set; "
                         "give the waveform shards it was made from")
    if manifest.get("sample_rate") != encodec.SAMPLE_RATE:
        raise ValueError(f"--input={input_dir}: {path} says sample_rate={manifest.get('sample_rate')} Hz but EnCodec "
                         f"needs {encodec.SAMPLE_RATE} Hz; re-shard the audio files with tools/make_shards.py "
                         f"--sample_rate={encodec.SAMPLE_RATE} and pass that folder as --input")
    return manifest


def precompute(input_dir: str, output_dir: str, *, encodec_params: dict, source: dict | str, num_codebooks: int = 8,
               feature_dtype: str = "float16", batch_rows: int = 16, chunk_seconds: float = DEFAULT_CHUNK_SECONDS,
               overwrite: bool = False, progress: bool = True) -> dict:
    """Writes the EnCodec targets of every clip in the waveform shard set `input_dir` to `output_dir`.

    Output shard i holds the usable clips of input shard i, in order; re-running writes the same bytes.
    Skipped records (undecodable, wrong rate, silent, non-finite features) are listed in the manifest.
    A set already in `output_dir` is an error unless `overwrite`, and is replaced only once the new one
    is complete (shards.staged_output).

    Args:
        input_dir: a 24 kHz shard set (tools/make_shards.py); any other rate is an error (`check_input`).
        output_dir: where shard-*.array_record and manifest.json go.
        encodec_params: {"encoder", "codebooks" [>= num_codebooks, 1024, 128]} frozen EnCodec params.
        source: what they are, for the manifest (`encodec_source`).
        num_codebooks: n_q codes stored per frame.
        feature_dtype: "float16" | "float32" storage of the features (codes come from the float32 ones).
        batch_rows: rows (clips or chunks) per EnCodec call.
        chunk_seconds: longest piece encoded at once (module docstring).

    Returns:
        The manifest (module docstring; also `output_dir/manifest.json`).
    """
    if feature_dtype not in target_records.FEATURE_DTYPES:
        raise ValueError(f"--feature_dtype={feature_dtype!r}; valid: {sorted(target_records.FEATURE_DTYPES)}")
    available = np.shape(encodec_params["codebooks"])[0]
    if not 1 <= num_codebooks <= available:
        raise ValueError(f"--num_codebooks={num_codebooks}; the EnCodec params hold {available} codebooks")
    manifest_in = check_input(input_dir)
    chunk_samples = chunk_samples_for(chunk_seconds)
    num_records = sum(shards.shard_sizes(input_dir, manifest_in))
    start = time.time()
    with shards.staged_output(output_dir, overwrite) as staged:
        manifest = _encode_shards(input_dir, manifest_in, staged, encodec_params=encodec_params, source=source,
                                  num_codebooks=num_codebooks, feature_dtype=feature_dtype, batch_rows=batch_rows,
                                  chunk_samples=chunk_samples, num_records=num_records, progress=progress)
        shards.write_manifest(staged, manifest)
    logging.info("wrote the EnCodec targets of %d clips (%.2f h, %d frames) to %d shards in %s in %.1f s; skipped %d",
                 manifest["num_clips"], manifest["total_hours"], manifest["total_frames"], len(manifest["shards"]),
                 output_dir, time.time() - start, manifest["num_skipped"])
    return manifest


def _encode_shards(input_dir: str, manifest_in: dict, output_dir: str, *, encodec_params: dict, source: dict | str,
                   num_codebooks: int, feature_dtype: str, batch_rows: int, chunk_samples: int, num_records: int,
                   progress: bool) -> dict:
    """Writes the target shards of `input_dir` into `output_dir` (arguments as `precompute`); returns their
    manifest (not written)."""
    skipped: list[dict] = []
    energy_sum = np.zeros(num_codebooks + 1, np.float64)
    total_frames = 0
    writer = shards.ShardWriter(output_dir, len(manifest_in["shards"]))
    bar = tqdm(total=num_records, unit="clip", disable=not progress,
               desc=f"EnCodec targets of {os.path.basename(os.path.normpath(input_dir))}")
    try:
        clips = _read_clips(input_dir, manifest_in, skipped, bar)
        for clip in encode_clips(encodec_params, clips, num_codebooks=num_codebooks, batch_rows=batch_rows,
                                 chunk_samples=chunk_samples):
            shard_index, where, clip_id, metadata = clip.key
            stored = clip.features.astype(target_records.FEATURE_DTYPES[feature_dtype])
            bar.update(1)
            if not (np.all(np.isfinite(clip.features)) and np.all(np.isfinite(stored))):
                skipped.append({"path": where, "reason": "non_finite",
                                "detail": f"NaN/Inf EnCodec features (or beyond {feature_dtype} range) in {clip_id}"})
                bar.set_postfix(skipped=len(skipped), refresh=False)
                continue
            writer.write(target_records.encode_targets(clip_id, stored, clip.codes, num_samples=clip.num_samples,
                                                       feature_dtype=feature_dtype, metadata=metadata),
                         clip.num_samples, shard=shard_index)
            energy_sum += clip.residual_energy.sum(axis=0, dtype=np.float64)
            total_frames += clip.features.shape[0]
    finally:
        bar.close()
        writer.close()
    if total_frames:
        quantization_error = (energy_sum / total_frames).tolist()
    else:
        quantization_error = None
        logging.warning("no clip of %s could be used: the manifest has no quantization_error", input_dir)
    manifest = {
        "kind": target_records.KIND,
        "record_format_version": target_records.FORMAT_VERSION,
        "sample_rate": encodec.SAMPLE_RATE,
        "hop_samples": encodec.HOP_LENGTH,
        "frame_rate_hz": encodec.FRAME_RATE,
        "feature_dim": target_records.FEATURE_DIM,
        "feature_dtype": feature_dtype,
        "num_codebooks": int(num_codebooks),
        "encodec_source": source,
        "num_clips": writer.num_written,
        "total_hours": writer.total_samples / encodec.SAMPLE_RATE / 3600.0,
        "total_frames": total_frames,
        "shards": writer.names,
        "shard_num_clips": writer.counts,
        "num_skipped": len(skipped),
        "skipped": skipped,
        "quantization_error": quantization_error,
        "input": os.path.abspath(input_dir),
        "input_num_records": num_records,
        "chunk_samples": chunk_samples,
    }
    return manifest


def check_compatible(manifest: dict, where: str, *, num_codebooks: int, encodec_checkpoint: str,
                     encodec_seed: int) -> None:
    """Raises unless a run with these config.model values can train on the targets of `manifest` (at `where`).

    The stored codes must cover config.model.num_codebooks, and the EnCodec that made them must be the
    run's own (config.model.encodec_checkpoint by sha256, or the same random seed): evaluation and
    self-training encode waveforms with the run's EnCodec.
    """
    if encodec_checkpoint and not os.path.exists(encodec_checkpoint):
        raise FileNotFoundError(f"config.model.encodec_checkpoint={encodec_checkpoint!r} does not exist (the targets "
                                f"in {where} were computed with {manifest.get('encodec_source')!r})")
    stored = int(manifest.get("num_codebooks", 0))
    if num_codebooks > stored:
        raise ValueError(f"config.model.num_codebooks={num_codebooks} but {where} stores {stored} codebooks; lower "
                         f"it or re-run tools/precompute_encodec_targets.py --num_codebooks={num_codebooks}")
    made_with = manifest.get("encodec_source")
    ours = encodec_source(encodec_checkpoint, encodec_seed)
    same = (made_with == ours if isinstance(ours, str) else
            isinstance(made_with, dict) and made_with.get("sha256") == ours["sha256"])
    if not same:
        raise ValueError(f"config.model.encodec_checkpoint={encodec_checkpoint!r} (encodec_seed={encodec_seed}) gives "
                         f"EnCodec {ours!r}, but the targets in {where} were computed with {made_with!r}; point "
                         "config.model.encodec_checkpoint (or encodec_seed) at the EnCodec the targets came from")
