"""Writing audio clips into ArrayRecord shards plus a `manifest.json`, and finding shards to read.

A shard set is a folder holding `shard-XXXXX-of-YYYYY.array_record` files and a `manifest.json`
with at least `num_clips`, `total_hours`, `sample_rate`, `shards` (file names, in order) and
`skipped` (a list of `{"path", "reason"}`). Clip j (in input order, counting written clips only)
goes to shard j % num_shards, so shards are balanced and the output is a pure function of the
input list: re-running on the same input writes the same bytes.

A set is written into a hidden folder next to the output and swapped into place only when complete
(`staged_output`), so an interrupted or failed run leaves the previous set as it was.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fnmatch
import functools
import glob
import json
import logging
import multiprocessing
import os
import secrets
import shutil
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np
from array_record.python import array_record_module
from tqdm import tqdm

from audiojepa.data import audio_io, records, stats
from audiojepa.runtime import locks, storage, worker_lifetime

MANIFEST = "manifest.json"
SHARD_SUFFIX = ".array_record"
# group_size:1 makes every record its own chunk: the cost of true random access during a global shuffle.
_WRITER_OPTIONS = "group_size:1"
# The files of a shard set in its folder, with their temporaries: what an overwrite replaces. Anything
# else in the folder is kept. The log-mel statistics belong to the old audio, so they go with it.
SET_FILE_PATTERNS = ("shard-*" + SHARD_SUFFIX, MANIFEST, MANIFEST + ".tmp", stats.STATS_FILE,
                     stats.STATS_FILE + ".*.tmp")
FILES_PER_TASK = 4  # files a decoding process gets at a time (make_shards --workers)
# Longer files are skipped as "too long": each is decoded whole in one worker (2 h of 48 kHz stereo is
# 2.8 GB of float32), so a stray multi-hour recording could exhaust memory. Split long recordings first.
DEFAULT_MAX_SECONDS = 2 * 3600.0


def shard_name(index: int, num_shards: int) -> str:
    return f"shard-{index:05d}-of-{num_shards:05d}{SHARD_SUFFIX}"


@dataclasses.dataclass
class InputList:
    """Audio files to shard, in a deterministic order."""

    items: list[tuple[str, str, dict[str, str]]]  # (path on disk, clip id, metadata)
    skipped: list[dict[str, str]]  # files rejected before decoding, as {"path", "reason"}
    metadata_columns: list[str]


def list_folder(folder: str) -> InputList:
    """All files under `folder`, recursively, in a fixed order: each folder's files by name, then its
    subfolders by name. Non-audio extensions are listed as skipped; so are the folders it does not read.

    A symlinked folder is followed, once: a link into the `folder` tree (whose files are listed under
    their own path), to a folder already listed through another link, or to a folder above the link (a
    loop) is skipped as "repeated folder". A subfolder that cannot be listed
    is skipped as "unreadable folder" with the error. Skipped folders are listed as "<path>/". Raises the
    OSError (e.g. PermissionError), naming `folder`, when `folder` itself cannot be listed.
    """
    items, skipped = [], []
    root_real = os.path.realpath(folder)
    listed = {}  # real path of each folder listed -> its path under `folder` ("" for `folder`)
    pending = [(folder, "", None)]  # folders to list, last first: (path, its path under `folder` + "/", real path
    # of the folder holding it if it is a symbolic link, else None)
    while pending:
        path, rel, link_parent_real = pending.pop()
        real = os.path.realpath(path)
        repeat = _repeated_folder(real, link_parent_real, root_real, listed)
        if repeat:
            skipped.append({"path": rel, "reason": "repeated folder", "detail": repeat})
            continue
        try:
            with os.scandir(path) as found:
                entries = sorted(found, key=lambda entry: entry.name)
        except OSError as e:
            if not rel:
                raise type(e)(f"--input {folder}: cannot list it ({type(e).__name__}: {e})") from e
            skipped.append({"path": rel, "reason": "unreadable folder", "detail": f"{type(e).__name__}: {e}"})
            continue
        listed[real] = rel
        subfolders = []
        for entry in entries:
            if _is_folder(entry):
                subfolders.append((entry.path, f"{rel}{entry.name}/", real if entry.is_symlink() else None))
            elif entry.name.startswith(".") or entry.name == MANIFEST:
                continue
            elif os.path.splitext(entry.name)[1].lower() in audio_io.AUDIO_EXTENSIONS:
                items.append((entry.path, rel + entry.name, {}))  # not opened here: load_clip skips a FIFO
            else:
                skipped.append({"path": rel + entry.name, "reason": "unsupported extension"})
        pending.extend(reversed(subfolders))
    return InputList(items, skipped, [])


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows symbolic links
    except OSError:
        return False  # listed as a file; decoding then says what is wrong with it


def _repeated_folder(real: str, link_parent_real: str | None, root_real: str, listed: dict[str, str]) -> str | None:
    """Why the folder whose real path is `real` is not listed (a symbolic link in the folder `link_parent_real`,
    or None for a plain folder), or None."""
    if link_parent_real is not None and _is_within(link_parent_real, real):
        return f"a link to {real}, a folder above it: a loop"
    if link_parent_real is not None and _is_within(real, root_real):
        return f"a link to {real}, listed as {listed.get(real, os.path.relpath(real, root_real) + '/')}"
    if real in listed:  # also a bind mount seen twice
        return f"a link to {real}, already listed as {listed[real]}"
    return None


def _is_within(path: str, folder: str) -> bool:
    """Whether the real path `path` is `folder` or inside it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


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
    items, skipped = [], []
    for line_number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue  # a blank line
        if len(row) != len(header):
            raise ValueError(f"{table_path}:{line_number}: {len(row)} columns, header has {len(header)}")
        clip_path = row[0].strip()
        if not clip_path:  # a row with metadata but no audio path: listed, not dropped
            skipped.append({"path": f"{table_path}:{line_number}", "reason": "missing",
                            "detail": "the path cell (first column) is empty"})
            continue
        disk_path = clip_path if os.path.isabs(clip_path) else os.path.join(base, clip_path)
        items.append((disk_path, clip_path, dict(zip(header[1:], (c.strip() for c in row[1:])))))
    return InputList(items, skipped, header[1:])


class NoClipsError(ValueError):
    """A run that would write no clips: no audio files in the input, or all of them skipped. `skipped`
    holds the skipped files, as {"path", "reason", "detail"} (the manifest's list)."""

    def __init__(self, message: str, skipped: list[dict[str, str]]):
        super().__init__(message)
        self.skipped = skipped


def _skip_summary(skipped: list[dict[str, str]], limit: int = 10) -> str:
    """The counts per reason and the first `limit` skipped files, one per line, for an error message."""
    counts: dict[str, int] = {}
    for item in skipped:
        counts[item["reason"]] = counts.get(item["reason"], 0) + 1
    lines = [", ".join(f"{reason}: {n}" for reason, n in counts.items())]
    for item in skipped[:limit]:
        detail = f" ({item['detail']})" if item.get("detail") else ""
        lines.append(f"  {item['path']}: {item['reason']}{detail}")
    if len(skipped) > limit:
        lines.append(f"  ... and {len(skipped) - limit} more")
    return "\n".join(lines)


def list_inputs(input_path: str) -> InputList:
    """The files to shard from a folder (`list_folder`) or a CSV/TSV (`list_table`); NoClipsError naming
    `input_path` when it lists no audio file."""
    inputs = _list_inputs(input_path)
    if not inputs.items:
        listed = f"; it lists only skipped entries: {_skip_summary(inputs.skipped)}" if inputs.skipped else ""
        what = (f"no audio files (extensions {', '.join(audio_io.AUDIO_EXTENSIONS)})" if os.path.isdir(input_path)
                else "no audio files listed (one path per row after the header)")
        raise NoClipsError(f"--input {input_path}: {what}{listed}", inputs.skipped)
    return inputs


def _list_inputs(input_path: str) -> InputList:
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


SEGMENT_SILENCE_PEAK = 1e-4  # audio_io.load_clip's default for a silent file, applied to each segment
SEGMENT_DROP_REASONS = ("short tail", "silent")


def _clipping(waveform: np.ndarray, codec: str) -> dict | None:
    """{"fraction", "peak"} when a 16-bit codec must clip `waveform` (float audio beyond full scale, |x| >= 1:
    int16 holds [-1, 1 - 2^-15]), else None. "f32" records keep such values."""
    if codec == "f32":
        return None
    beyond = np.abs(waveform) >= 1.0
    if not beyond.any():
        return None
    return {"fraction": float(beyond.mean()), "peak": float(np.abs(waveform).max())}


def _decode_one(item, *, sample_rate, codec, min_seconds, max_seconds=None, segment_seconds=None,
                silence_peak=SEGMENT_SILENCE_PEAK):
    """Worker: (path, id, metadata) -> ("ok", [(record bytes, num_samples), ...], clipping or None, dropped) or
    ("skip", reason, detail); clipping is `_clipping`'s dict for a file the 16-bit codec clips. With
    `segment_seconds`, a longer file gives consecutive records of that length with ids "<id>#00000", ...
    (numbered by position); the last, shorter one is dropped when under `min_seconds`, and a segment whose peak is
    under `silence_peak` (a file's silent stretch) is dropped; `dropped` lists them as (reason, samples)."""
    path, clip_id, metadata = item
    try:
        waveform = audio_io.load_clip(path, sample_rate=sample_rate, min_seconds=min_seconds, max_seconds=max_seconds)
    except audio_io.BadAudioError as e:
        return ("skip", e.reason, e.detail)
    except Exception as e:  # anything else a decoder throws: never abort the run for one file
        return ("skip", "unreadable", f"{type(e).__name__}: {e}")
    pieces, dropped = [(clip_id, waveform)], []
    segment = int(round(segment_seconds * sample_rate)) if segment_seconds else 0
    if segment and waveform.shape[0] > segment:
        pieces = []
        for i, start in enumerate(range(0, waveform.shape[0], segment)):
            piece = waveform[start:start + segment]
            if piece.shape[0] < min_seconds * sample_rate:
                dropped.append(("short tail", piece.shape[0]))
            elif np.abs(piece).max() < silence_peak:
                dropped.append(("silent", piece.shape[0]))
            else:
                pieces.append((f"{clip_id}#{i:05d}", piece))
    return ("ok", [(records.encode_clip(piece_id, piece, sample_rate, codec=codec, metadata=metadata), piece.shape[0])
                   for piece_id, piece in pieces], _clipping(waveform, codec), dropped)


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
    max_seconds: float | None = DEFAULT_MAX_SECONDS,
    segment_seconds: float | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Decodes every file listed by `input_path` (folder or CSV/TSV) into a shard set.

    Bad files are skipped and listed in the manifest with their reason; none aborts the run. A run that
    writes no clip (no audio file in the input, or all skipped) raises NoClipsError naming the input and
    listing the first skipped files, and leaves `output_dir` as it was. A set already in `output_dir` is
    an error unless `overwrite`, and is replaced only once the new one is complete (`staged_output`).
    `segment_seconds`: cut files longer than this into consecutive records of this length (see _decode_one), so
    that long recordings are sampled per segment, as AudioSet's 10 s clips are, rather than once per file.
    Returns the manifest dict (also written to `output_dir/manifest.json`).
    """
    if codec not in records.CODECS:
        raise ValueError(f"--format {codec!r}; valid: {records.CODECS}")
    if segment_seconds is not None and not segment_seconds > 0:
        raise ValueError(f"--segment_seconds={segment_seconds}: must be > 0 (or unset: one record per file)")
    decode = functools.partial(_decode_one, sample_rate=sample_rate, codec=codec, min_seconds=min_seconds,
                               max_seconds=max_seconds, segment_seconds=segment_seconds)
    start = time.time()
    with staged_output(output_dir, overwrite) as staged:  # locks the output first: a second run fails at once
        inputs = list_inputs(input_path)
        num_shards = num_shards or default_num_shards(len(inputs.items))
        writer = ShardWriter(staged, num_shards)
        skipped = list(inputs.skipped)
        clipped = []  # files stored clipped: float audio beyond full scale in a 16-bit codec
        num_files = 0
        segments_dropped = {reason: {"count": 0, "seconds": 0.0} for reason in SEGMENT_DROP_REASONS}
        try:
            with contextlib.closing(decode_files(inputs.items, decode, workers)) as results:
                bar = tqdm(results, total=len(inputs.items), unit="clip", disable=not progress,
                           desc=f"sharding {os.path.basename(os.path.normpath(input_path))}")
                for (path, clip_id, _), result in zip(inputs.items, bar):
                    if result[0] == "ok":
                        num_files += 1
                        for record, num_samples in result[1]:
                            writer.write(record, num_samples)
                        if result[2] is not None:
                            clipped.append({"path": clip_id, **result[2]})
                        for reason, num_samples in result[3]:
                            segments_dropped[reason]["count"] += 1
                            segments_dropped[reason]["seconds"] += num_samples / sample_rate
                    else:
                        skipped.append({"path": clip_id, "reason": result[1], "detail": result[2]})
                        bar.set_postfix(skipped=len(skipped), refresh=False)
        finally:
            writer.close()
        if writer.num_written == 0:  # raised inside the block: the staged set is deleted, the old one kept
            raise NoClipsError(f"--input {input_path}: 0 clips written, all {len(skipped)} files skipped; "
                               f"{output_dir} is unchanged. {_skip_summary(skipped)}", skipped)
        manifest = _manifest(writer, sample_rate=sample_rate, codec=codec, skipped=skipped, extra={
            "input": os.path.abspath(input_path),
            "metadata_columns": inputs.metadata_columns,
            "clipped": clipped,
            "num_files": num_files,
            "segment_seconds": segment_seconds,
            "segments_dropped": segments_dropped,
        })
        write_manifest(staged, manifest)
    if clipped:
        shown = ", ".join(f"{c['path']} ({100 * c['fraction']:.1f}% of samples, peak {c['peak']:.2f})"
                          for c in clipped[:10])
        logging.warning("%d files go beyond full scale and were stored clipped to 16 bits (listed under \"clipped\" "
                        "in %s; --format=f32 keeps their values): %s%s", len(clipped),
                        os.path.join(output_dir, MANIFEST), shown, " ..." if len(clipped) > 10 else "")
    logging.info("wrote %d clips (%.2f h) to %d shards in %s in %.1f s; skipped %d files",
                 writer.num_written, manifest["total_hours"], num_shards, output_dir,
                 time.time() - start, len(skipped))
    return manifest


# -- decoding files, in worker processes that may die -----------------------------------------------------

DECODER_CRASHED = "decoder crashed"  # one of audio_io.SKIP_REASONS: the process decoding the file died


def decode_files(items: Sequence, decode, workers: int) -> Iterator[tuple]:
    """`decode(item)` of every item, in input order: in this process (`workers` <= 0) or in `workers`
    spawned processes (safe even when the caller has JAX or threads running).

    A worker that dies (a crash in a decoder library, the OOM killer) costs only its file: the files
    that were in flight are decoded again one at a time, and the one whose process dies gives
    `("skip", DECODER_CRASHED, detail)`. Close the iterator (contextlib.closing) to stop the workers.
    """
    if workers <= 0:
        return (decode(item) for item in items)
    return _decode_in_pools(list(items), decode, workers)


def _decode_in_pools(items: list, decode, workers: int) -> Iterator[tuple]:
    tasks = deque(items[i:i + FILES_PER_TASK] for i in range(0, len(items), FILES_PER_TASK))
    while tasks:
        in_flight = yield from _decode_until_broken(tasks, decode, workers)
        yield from _decode_one_at_a_time(in_flight, decode)


def _decode_until_broken(tasks: deque, decode, workers: int):
    """Yields the results of the tasks it takes from the left of `tasks`, in order, until all are done
    (returns []) or a worker dies: it then returns the files of the tasks taken but not yielded yet, as
    (item, result or None when its task did not finish)."""
    pool = _spawn_pool(workers)
    in_flight: deque = deque()  # (future, task), in input order
    try:
        while tasks or in_flight:
            while tasks and len(in_flight) < 2 * workers:
                future = pool.submit(_decode_task, decode, tasks[0])  # raises once the pool is broken
                in_flight.append((future, tasks.popleft()))
            results = in_flight[0][0].result()
            in_flight.popleft()
            yield from results
        return []
    except BrokenProcessPool:
        left = []
        for future, task in in_flight:
            finished = future.done() and not future.cancelled() and future.exception() is None
            left += zip(task, future.result() if finished else [None] * len(task))
        logging.warning("a decoding process died; decoding the %d files it may have held one at a time",
                        sum(result is None for _, result in left))
        return left
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _decode_one_at_a_time(items: list, decode) -> Iterator[tuple]:
    """For each (item, result or None): the result, or `decode(item)` in a one-process pool of its own (a
    new one after each item that kills it)."""
    pool = None
    try:
        for item, result in items:
            if result is None:
                pool = pool or _spawn_pool(1)
                try:
                    result = pool.submit(decode, item).result()
                except BrokenProcessPool:
                    pool.shutdown(wait=True)
                    pool = None
                    logging.warning("the decoding process died on %s; skipping it (%s)", item[0], DECODER_CRASHED)
                    result = ("skip", DECODER_CRASHED, "the process decoding it died (a crash in the decoder "
                              "library, or killed, e.g. for memory)")
            yield result
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _spawn_pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=worker_lifetime.die_with_parent, initargs=(os.getpid(),))


def _decode_task(decode, items: list) -> list:
    """Worker: `decode` of a few files (fewer round trips than one file per task)."""
    return [decode(item) for item in items]


# -- writing a set beside the output and swapping it into place ------------------------------------------

def is_set_file(name: str) -> bool:
    """Whether the file `name` in a shard-set folder is part of the set (SET_FILE_PATTERNS)."""
    return any(fnmatch.fnmatch(name, pattern) for pattern in SET_FILE_PATTERNS)


def holds_shard_set(folder: str) -> bool:
    """Whether `folder` holds shards or a manifest (a complete or partial shard set)."""
    return bool(glob.glob(os.path.join(folder, "shard-*" + SHARD_SUFFIX))) or os.path.exists(
        os.path.join(folder, MANIFEST))


def check_output(output_dir: str, overwrite: bool) -> None:
    """Raises unless `output_dir` can take a new shard set: a folder without one, or `overwrite`."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise NotADirectoryError(f"--output {output_dir} is a file; give a folder for the shard set")
    if holds_shard_set(output_dir) and not overwrite:
        raise FileExistsError(f"{output_dir} already holds a shard set; pass --overwrite to replace it")


@contextlib.contextmanager
def staged_output(output_dir: str, overwrite: bool) -> Iterator[str]:
    """Yields an empty folder to write a shard set (manifest last) for `output_dir`; when the block ends
    without an error, the set replaces the one in `output_dir` (`replace_output`).

    The output is locked for the whole block (`output_lock`): a second run into it, in any process, raises
    OutputLockedError at once, before looking at what `output_dir` holds. Under the lock, what a killed run
    left is cleaned up first (`clean_stale_staging`).

    Until then the old set (shards, manifest and log-mel statistics) is untouched, so an interrupted
    run loses nothing; on an exception the staged folder is deleted. A run killed outright (SIGKILL)
    leaves it as `.<output name>.tmp-*`, next to the output or inside it (`staging_dir`), for the next
    run to remove.
    Raises FileExistsError, naming --overwrite, if `output_dir` holds a set and not `overwrite`.
    """
    with output_lock(output_dir):
        clean_stale_staging(output_dir)
        check_output(output_dir, overwrite)
        staged = staging_dir(output_dir)
        try:
            yield staged
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise
        replace_output(staged, output_dir)


def clean_stale_staging(output_dir: str) -> list[str]:
    """Cleans up after runs into `output_dir` that were killed outright; returns the folders it handled.

    Removes `.<name>.tmp-*` staging folders (unfinished sets) beside or inside `output_dir`, and undoes a
    swap cut short (`replace_output`): a `.<name>.old-*` folder goes back to `output_dir` when that is
    missing (the old set was moved aside but the new one never moved in), else its files that are not
    part of a set move into `output_dir` and it is removed (the new set was in place). Logs a warning
    naming each folder. Call it only while holding `output_lock`, so no live run owns these folders.
    """
    real = os.path.realpath(output_dir)
    parent, name = os.path.dirname(real), os.path.basename(real)
    handled = []
    for folder in (parent, real):
        for path in sorted(glob.glob(os.path.join(glob.escape(folder), glob.escape(f".{name}.tmp-") + "*"))):
            shutil.rmtree(path, ignore_errors=True)
            logging.warning("removed %s: an unfinished shard set for %s left by a run that was killed", path,
                            output_dir)
            handled.append(path)
    for old in sorted(glob.glob(os.path.join(glob.escape(parent), glob.escape(f".{name}.old-") + "*"))):
        if not os.path.exists(real):
            os.rename(old, real)
            logging.warning("restored the previous shard set of %s from %s (a run was killed while swapping in a new "
                            "one)", output_dir, old)
        else:
            for kept in os.listdir(old):
                if not is_set_file(kept) and not os.path.exists(os.path.join(real, kept)):
                    os.rename(os.path.join(old, kept), os.path.join(real, kept))
            shutil.rmtree(old, ignore_errors=True)
            logging.warning("removed %s: the shard set %s replaced, left by a run killed after the swap (its other "
                            "files moved into %s)", old, output_dir, output_dir)
        handled.append(old)
    return handled


class OutputLockedError(locks.RunLockedError):
    """Another run holds the lock of the output; the message names the output and the holder's pid."""


def lock_path(output_dir: str) -> str:
    """The lock file of `output_dir`: `.<name>.lock` where its staging folders go (`staging_dir`)."""
    output_dir = os.path.realpath(output_dir)
    os.makedirs(os.path.dirname(output_dir), exist_ok=True)
    name = f".{os.path.basename(output_dir)}.lock"
    if _can_stage_beside(output_dir):
        return os.path.join(os.path.dirname(output_dir), name)
    os.makedirs(output_dir, exist_ok=True)
    return os.path.join(output_dir, name)


def output_lock(output_dir: str):
    """Holds an exclusive lock (audiojepa.runtime.locks, an flock) on `output_dir`'s `lock_path` for the block; yields
    that path.

    Raises OutputLockedError at once, naming `output_dir` and the holder's pid, if another run holds it (in
    any process, this one included). The file holds the holder's pid and is removed when the block ends;
    the kernel frees the lock of a process that dies, so a killed run never leaves the output locked.
    """
    path = lock_path(output_dir)
    return locks.exclusive_lock(path, on_held=lambda holder: OutputLockedError(
        f"{output_dir} is being written by another run (pid {holder}; lock file {path}); wait for it to end, or "
        "give another --output"))


def staging_dir(output_dir: str) -> str:
    """A new empty folder on `output_dir`'s filesystem: a hidden sibling of it, or a hidden folder inside
    it when its parent is on another filesystem (`output_dir` is a mount point) or not writable.

    Symbolic links are resolved first, so a set for a linked folder is written where the link points.
    """
    output_dir = os.path.realpath(output_dir)
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    prefix = f".{os.path.basename(output_dir)}.tmp-"
    if _can_stage_beside(output_dir):
        return _new_dir(parent, prefix)
    os.makedirs(output_dir, exist_ok=True)
    return _new_dir(output_dir, prefix)


def _can_stage_beside(output_dir: str) -> bool:
    parent = os.path.dirname(output_dir)
    same_filesystem = not os.path.exists(output_dir) or os.stat(parent).st_dev == os.stat(output_dir).st_dev
    return same_filesystem and os.access(parent, os.W_OK | os.X_OK)


def _new_dir(parent: str, prefix: str) -> str:
    """Creates `parent/<prefix><random>` with the mode a plain mkdir gives (tempfile.mkdtemp's is 0700)."""
    while True:
        path = os.path.join(parent, prefix + secrets.token_hex(4))
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def replace_output(staged: str, output_dir: str) -> None:
    """Puts the complete shard set in `staged` (from `staging_dir`) in place of `output_dir`'s.

    A sibling `staged` becomes `output_dir` by renames: the old folder moves aside to `.<name>.old-*`,
    `staged` takes its place, the old folder's other files (not SET_FILE_PATTERNS) move into the new
    one, and the old set is deleted. `output_dir` thus holds the old complete set, then (for the
    instant between two renames) nothing, then the new complete set. A `staged` inside `output_dir`
    is moved in file by file instead (`_replace_files`).
    """
    output_dir = os.path.realpath(output_dir)
    if os.path.dirname(os.path.realpath(staged)) == output_dir:
        _replace_files(staged, output_dir)
        return
    if os.path.isdir(output_dir):
        shutil.copymode(output_dir, staged)  # keep the folder's permissions (e.g. group-readable)
    if not os.path.isdir(output_dir) or not os.listdir(output_dir):
        move_into_place(staged, output_dir)
        return
    old = os.path.join(os.path.dirname(output_dir), f".{os.path.basename(output_dir)}.old-{secrets.token_hex(4)}")
    os.rename(output_dir, old)
    try:
        os.rename(staged, output_dir)
    except BaseException:
        os.rename(old, output_dir)
        raise
    for name in os.listdir(old):
        if not is_set_file(name):
            os.rename(os.path.join(old, name), os.path.join(output_dir, name))
    shutil.rmtree(old, ignore_errors=True)


def _replace_files(staged: str, output_dir: str) -> None:
    """Moves the set in `staged` (a folder inside `output_dir`) into `output_dir` file by file: the old
    manifest goes first (the folder stops claiming a complete set), the new manifest comes last."""
    old = {name for name in os.listdir(output_dir) if is_set_file(name)}
    new = {name for name in os.listdir(staged) if name != MANIFEST}
    if MANIFEST in old:
        os.remove(os.path.join(output_dir, MANIFEST))
    for name in sorted(new):
        os.replace(os.path.join(staged, name), os.path.join(output_dir, name))
    for name in old - new - {MANIFEST}:
        os.remove(os.path.join(output_dir, name))
    os.replace(os.path.join(staged, MANIFEST), os.path.join(output_dir, MANIFEST))
    os.rmdir(staged)


def read_manifest(shard_dir: str) -> dict:
    path = storage.join(shard_dir, MANIFEST)
    if not storage.exists(path):
        raise FileNotFoundError(f"{path} does not exist: {shard_dir} is not a complete shard set "
                                "(make one with tools/make_shards.py)")
    try:
        return json.loads(storage.read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-make the shard set (tools/make_shards.py)") from None


def resolve_shards(spec: str | Sequence[str]) -> tuple[list[str], dict | None]:
    """Shard files for `spec`: a shard-set folder, a glob, or a list of files; local, or gs:// URLs (which
    ArrayRecord's reader opens itself; audiojepa.runtime.storage).

    Returns (paths, manifest) where manifest is the folder's manifest.json (None for a glob/list).
    """
    for path in [spec] if isinstance(spec, str) else spec:
        storage.check_url(path, what="config.data.shards")
    if isinstance(spec, str) and storage.isdir(spec):
        manifest = read_manifest(spec)
        paths = [storage.join(spec, n) for n in manifest["shards"]]
        missing = [p for p in paths if not storage.exists(p)]
        if missing:
            raise FileNotFoundError(f"{spec}/{MANIFEST} lists shards that are missing: {missing[:3]}")
        return paths, manifest
    paths = storage.glob(spec) if isinstance(spec, str) else list(spec)
    if not paths:
        raise FileNotFoundError(f"data.shards={spec!r} matches no shard files "
                                "(give a shard-set folder, a glob, or a list of .array_record files)")
    manifests = {os.path.dirname(p) for p in paths}
    manifest = None
    if len(manifests) == 1 and storage.exists(storage.join(manifests.pop(), MANIFEST)):
        manifest = read_manifest(os.path.dirname(paths[0]))
    return paths, manifest


class ShardReadError(RuntimeError):
    """A shard file that cannot be opened or read; the message names the file."""


def open_reader(path: str):
    """An open ArrayRecordReader of the shard file `path`, its index read.

    Raises ShardReadError naming `path` when the file is missing, truncated or has a corrupt index (the
    reader itself may open such a file without an error and report 0 records, or fail later without
    naming it).
    """
    try:
        reader = array_record_module.ArrayRecordReader(path)
        if reader.ok():
            reader.num_records()  # a truncated index may fail only here
    except Exception as e:
        raise ShardReadError(f"cannot read shard {path}: {type(e).__name__}: {e}") from e
    if not reader.ok():
        problem = "it does not exist" if not storage.exists(path) else "its index is truncated or corrupt"
        raise ShardReadError(f"cannot read shard {path}: {problem}; copy it again or re-make the shard set "
                             "(tools/make_shards.py)")
    return reader


def read_records(reader, path: str, start: int, end: int) -> list[bytes]:
    """Records [start, end) of the open shard `path`; a corrupt chunk raises ShardReadError naming the file."""
    try:
        return reader.read(start, end)
    except Exception as e:
        which = f"record {start}" if end == start + 1 else f"records {start}..{end - 1}"
        raise ShardReadError(f"cannot read {which} of shard {path}: {type(e).__name__}: {e}") from e


def count_records(paths: Sequence[str], expected: Sequence[int] | None = None) -> list[int]:
    """Records in each shard file of `paths` (ShardReadError naming one that cannot be opened); a ValueError
    naming a shard that holds another number than `expected` (its manifest's `shard_num_clips`) lists."""
    sizes = []
    for path in paths:
        reader = open_reader(path)
        try:
            sizes.append(int(reader.num_records()))
        finally:
            reader.close()
    for path, size, want in zip(paths, sizes, expected if expected is not None else sizes):
        if size != want:
            raise ValueError(f"{path} holds {size} records where its {MANIFEST} lists {want}: a partial copy? "
                             "Copy the shard again or re-make the shard set")
    return sizes


def shard_sizes(folder: str, manifest: dict) -> list[int]:
    """count_records of the set in `folder`, checked against `manifest["shard_num_clips"]` when present."""
    return count_records([storage.join(folder, name) for name in manifest["shards"]],
                         manifest.get("shard_num_clips"))


def move_into_place(src_dir: str, dst_dir: str) -> None:
    """Moves a finished folder into place; a concurrent writer that lost the race is harmless."""
    try:
        os.replace(src_dir, dst_dir)
    except OSError:
        if os.path.exists(os.path.join(dst_dir, MANIFEST)):
            shutil.rmtree(src_dir, ignore_errors=True)
        else:
            raise
