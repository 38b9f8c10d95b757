"""Writing audio clips into ArrayRecord shards plus a `manifest.json`, and finding shards to read.

A shard set is a folder holding `shard-XXXXX-of-YYYYY.array_record` files and a `manifest.json`
with at least `num_clips`, `total_hours`, `sample_rate`, `shards` (file names, in order) and
`skipped` (a list of `{"path", "reason"}`). Clip j (in input order, counting written clips only)
goes to shard j % num_shards, so shards are balanced and the output is a pure function of the
input list: re-running on the same input writes the same bytes.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import glob
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from array_record.python import array_record_module
from tqdm import tqdm

from audiojepa.data import audio_io, records

MANIFEST = "manifest.json"
SHARD_SUFFIX = ".array_record"
# group_size:1 makes every record its own chunk: the cost of true random access during a global shuffle.
_WRITER_OPTIONS = "group_size:1"


def shard_name(index: int, num_shards: int) -> str:
    return f"shard-{index:05d}-of-{num_shards:05d}{SHARD_SUFFIX}"


@dataclasses.dataclass
class InputList:
    """Audio files to shard, in a deterministic order."""

    items: list[tuple[str, str, dict[str, str]]]  # (path on disk, clip id, metadata)
    skipped: list[dict[str, str]]  # files rejected before decoding, as {"path", "reason"}
    metadata_columns: list[str]


def list_folder(folder: str) -> InputList:
    """All files under `folder` (recursive, sorted); non-audio extensions are listed as skipped."""
    items, skipped = [], []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            if name.startswith(".") or name in (MANIFEST,):
                continue
            if os.path.splitext(name)[1].lower() in audio_io.AUDIO_EXTENSIONS:
                items.append((path, rel, {}))
            else:
                skipped.append({"path": rel, "reason": "unsupported extension"})
    return InputList(items, skipped, [])


def list_table(table_path: str) -> InputList:
    """A CSV (or TSV, by extension) with a header row; the first column is an audio path.

    Relative paths are resolved against the table's folder. The other columns are kept as
    per-clip metadata (e.g. labels).
    """
    delimiter = "\t" if table_path.lower().endswith((".tsv", ".tab")) else ","
    base = os.path.dirname(os.path.abspath(table_path))
    with open(table_path, newline="") as f:
        rows = list(csv.reader(f, delimiter=delimiter))
    if not rows:
        raise ValueError(f"{table_path}: empty table; expected a header row then one audio path per row")
    header = [h.strip() for h in rows[0]]
    items = []
    for line_number, row in enumerate(rows[1:], start=2):
        if not row or not row[0].strip():
            continue
        if len(row) != len(header):
            raise ValueError(f"{table_path}:{line_number}: {len(row)} columns, header has {len(header)}")
        clip_path = row[0].strip()
        disk_path = clip_path if os.path.isabs(clip_path) else os.path.join(base, clip_path)
        items.append((disk_path, clip_path, dict(zip(header[1:], (c.strip() for c in row[1:])))))
    return InputList(items, [], header[1:])


def list_inputs(input_path: str) -> InputList:
    if os.path.isdir(input_path):
        return list_folder(input_path)
    if os.path.isfile(input_path):
        return list_table(input_path)
    raise FileNotFoundError(f"--input {input_path!r} is neither a folder nor a CSV/TSV file")


class ShardWriter:
    """Writes encoded clip records round-robin over `num_shards` ArrayRecord files in `output_dir`."""

    def __init__(self, output_dir: str, num_shards: int):
        if num_shards < 1:
            raise ValueError(f"num_shards={num_shards}; must be >= 1")
        os.makedirs(output_dir, exist_ok=True)
        self.output_dir = output_dir
        self.names = [shard_name(i, num_shards) for i in range(num_shards)]
        self._writers = [
            array_record_module.ArrayRecordWriter(os.path.join(output_dir, n), _WRITER_OPTIONS)
            for n in self.names
        ]
        self.counts = [0] * num_shards
        self.num_written = 0
        self.total_samples = 0

    def write(self, record: bytes, num_samples: int, shard: int | None = None) -> None:
        """Appends `record` to shard `shard` (default: round-robin, clip j to shard j % num_shards)."""
        if shard is None:
            shard = self.num_written % len(self._writers)
        self._writers[shard].write(record)
        self.counts[shard] += 1
        self.num_written += 1
        self.total_samples += num_samples

    def close(self) -> None:
        for w in self._writers:
            w.close()


def write_manifest(output_dir: str, manifest: dict) -> None:
    """Writes manifest.json atomically (its presence marks a complete shard set)."""
    tmp = os.path.join(output_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
    os.replace(tmp, os.path.join(output_dir, MANIFEST))


def _decode_one(item, *, sample_rate, codec, min_seconds):
    """Worker: (path, id, metadata) -> ("ok", record bytes, num_samples) or ("skip", reason, detail)."""
    path, clip_id, metadata = item
    try:
        waveform = audio_io.load_clip(path, sample_rate=sample_rate, min_seconds=min_seconds)
    except audio_io.BadAudioError as e:
        return ("skip", e.reason, e.detail)
    except Exception as e:  # anything else a decoder throws: never abort the run for one file
        return ("skip", "unreadable", f"{type(e).__name__}: {e}")
    return ("ok", records.encode_clip(clip_id, waveform, sample_rate, codec=codec, metadata=metadata),
            waveform.shape[0])


def clear_old_output(output_dir: str, overwrite: bool) -> None:
    """Removes a shard set (shards and manifest) from `output_dir`; raises unless `overwrite`."""
    old = glob.glob(os.path.join(output_dir, "shard-*" + SHARD_SUFFIX))
    manifest = os.path.join(output_dir, MANIFEST)
    if (old or os.path.exists(manifest)) and not overwrite:
        raise FileExistsError(f"{output_dir} already holds a shard set; pass --overwrite to replace it")
    for path in old:
        os.remove(path)
    if os.path.exists(manifest):
        os.remove(manifest)


def write_shard_set(
    output_dir: str,
    clips: Iterable[tuple[str, np.ndarray, dict[str, str]]],
    *,
    sample_rate: int,
    num_shards: int,
    codec: str = "pcm16",
    extra_manifest: dict | None = None,
) -> dict:
    """Writes in-memory clips `(clip_id, waveform [samples] float32, metadata)`; returns the manifest."""
    writer = ShardWriter(output_dir, num_shards)
    try:
        for clip_id, waveform, metadata in clips:
            writer.write(records.encode_clip(clip_id, waveform, sample_rate, codec=codec, metadata=metadata),
                         waveform.shape[0])
    finally:
        writer.close()
    manifest = _manifest(writer, sample_rate=sample_rate, codec=codec, skipped=[], extra=extra_manifest)
    write_manifest(output_dir, manifest)
    return manifest


def _manifest(writer: ShardWriter, *, sample_rate, codec, skipped, extra) -> dict:
    manifest = {
        "num_clips": writer.num_written,
        "total_hours": writer.total_samples / sample_rate / 3600.0,
        "sample_rate": sample_rate,
        "codec": codec,
        "shards": writer.names,
        "shard_num_clips": writer.counts,
        "num_skipped": len(skipped),
        "skipped": skipped,
        "record_format_version": records.FORMAT_VERSION,
    }
    manifest.update(extra or {})
    return manifest


def default_num_shards(num_files: int) -> int:
    # ~1024 clips per shard: ~330 MB of 10-s pcm16 clips at 16 kHz, and enough shards for many hosts.
    return max(1, -(-num_files // 1024))


def make_shards(
    input_path: str,
    output_dir: str,
    *,
    sample_rate: int = 16000,
    codec: str = "pcm16",
    num_shards: int | None = None,
    workers: int = 0,
    min_seconds: float = 0.0,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Decodes every file listed by `input_path` (folder or CSV/TSV) into a shard set.

    Bad files are skipped and listed in the manifest with their reason; nothing aborts the run.
    Returns the manifest dict (also written to `output_dir/manifest.json`).
    """
    if codec not in records.CODECS:
        raise ValueError(f"--format {codec!r}; valid: {records.CODECS}")
    inputs = list_inputs(input_path)
    num_shards = num_shards or default_num_shards(len(inputs.items))
    os.makedirs(output_dir, exist_ok=True)
    clear_old_output(output_dir, overwrite)
    skipped = list(inputs.skipped)
    decode = functools.partial(_decode_one, sample_rate=sample_rate, codec=codec, min_seconds=min_seconds)
    start = time.time()
    writer = ShardWriter(output_dir, num_shards)
    pool = None
    try:
        if workers > 0:
            # spawn: safe even when the caller has JAX or threads running.
            pool = multiprocessing.get_context("spawn").Pool(workers)
            results: Iterator = pool.imap(decode, inputs.items, chunksize=4)  # ordered: deterministic shards
        else:
            results = map(decode, inputs.items)
        bar = tqdm(results, total=len(inputs.items), unit="clip", disable=not progress,
                   desc=f"sharding {os.path.basename(os.path.normpath(input_path))}")
        for (path, clip_id, _), result in zip(inputs.items, bar):
            if result[0] == "ok":
                writer.write(result[1], result[2])
            else:
                skipped.append({"path": clip_id, "reason": result[1], "detail": result[2]})
                bar.set_postfix(skipped=len(skipped), refresh=False)
    finally:
        writer.close()
        if pool is not None:
            pool.close()
            pool.join()
    manifest = _manifest(writer, sample_rate=sample_rate, codec=codec, skipped=skipped, extra={
        "input": os.path.abspath(input_path),
        "metadata_columns": inputs.metadata_columns,
    })
    write_manifest(output_dir, manifest)
    logging.info("wrote %d clips (%.2f h) to %d shards in %s in %.1f s; skipped %d files",
                 writer.num_written, manifest["total_hours"], num_shards, output_dir,
                 time.time() - start, len(skipped))
    return manifest


def read_manifest(shard_dir: str) -> dict:
    path = os.path.join(shard_dir, MANIFEST)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: {shard_dir} is not a complete shard set "
                                "(make one with tools/make_shards.py)")
    with open(path) as f:
        return json.load(f)


def resolve_shards(spec: str | Sequence[str]) -> tuple[list[str], dict | None]:
    """Shard files for `spec`: a shard-set folder, a glob, or a list of files.

    Returns (paths, manifest) where manifest is the folder's manifest.json (None for a glob/list).
    """
    if isinstance(spec, str) and os.path.isdir(spec):
        manifest = read_manifest(spec)
        paths = [os.path.join(spec, n) for n in manifest["shards"]]
        missing = [p for p in paths if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"{spec}/{MANIFEST} lists shards that are missing: {missing[:3]}")
        return paths, manifest
    paths = sorted(glob.glob(spec)) if isinstance(spec, str) else list(spec)
    if not paths:
        raise FileNotFoundError(f"data.shards={spec!r} matches no shard files "
                                "(give a shard-set folder, a glob, or a list of .array_record files)")
    manifests = {os.path.dirname(p) for p in paths}
    manifest = None
    if len(manifests) == 1 and os.path.exists(os.path.join(manifests.pop(), MANIFEST)):
        manifest = read_manifest(os.path.dirname(paths[0]))
    return paths, manifest


def move_into_place(src_dir: str, dst_dir: str) -> None:
    """Moves a finished folder into place; a concurrent writer that lost the race is harmless."""
    try:
        os.replace(src_dir, dst_dir)
    except OSError:
        if os.path.exists(os.path.join(dst_dir, MANIFEST)):
            shutil.rmtree(src_dir, ignore_errors=True)
        else:
            raise
