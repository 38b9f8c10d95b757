"""Downstream tasks: labelled clips with fixed splits or folds, from a folder, a shard set or TFDS.

`load_task(spec, sample_rate=...)` reads one of:

- a **task folder** `DIR` holding `DIR/labels.csv` with the header `filename,label,split` (split in
  train/valid/test) or `filename,label,fold` (an integer fold id per clip, for leave-one-fold-out);
  `filename` is relative to `DIR`; a multi-label clip lists its labels separated by `;`.
- a **shard set** folder (one with `manifest.json`, written by `tools/make_shards.py`) whose records
  carry `label` and `split` (or `fold`) metadata, e.g. shards made from such a CSV.
- `embedded` or `embedded:num_clips=600,duration_s=3,seed=0`: the procedural corpus of
  `audiojepa.data.embedded` (8 classes, 80/10/10 train/valid/test).
- `tfds:NAME` (`NAME` may carry a config and a version, `nsynth/full:2.3.0`), with options after
  a colon: `tfds:speech_commands:data_dir=/data/tfds,label_key=label`. The dataset must already be
  prepared in ArrayRecord format (`tfds build NAME --file_format=array_record`); nothing is
  downloaded. Options: `data_dir` (default: TFDS's own, `$TFDS_DATA_DIR` or ~/tensorflow_datasets),
  `audio_key` / `label_key` (default: the dataset's supervised keys, else `audio` / `label`),
  `sample_rate` (Hz, only needed when the audio feature does not record it). TFDS split names map
  to ours: train -> train, validation/valid/dev -> valid, test -> test; other splits are ignored.

A task folder or shard-set folder may also hold `task.json` with per-task evaluation settings; today one
key, `unit_sec` (seconds, > 0): the crop length EVAR's protocol cuts each clip to (`--protocol=evar`), for
tasks that are not in EVAR's own table (`audiojepa/evaluation/protocols.py:EVAR_UNIT_SEC`). It lands in
`Task.unit_sec`; unknown keys are an error.

Clips that cannot be used are never dropped silently: each goes to `Task.skipped` as
`{"path", "reason", "detail"}` and `load_task` logs the count. With `verify_audio="decode"` (the
default) `load_task` decodes every clip once, with the same code `Task.load_audio` uses, so every
clip that survives loads later and every bad one is counted before any scoring; eval sets are small
enough for this extra pass. Reasons: "missing" (listed, not on disk), "unreadable", "truncated",
"empty", "non-finite" (the names of `audiojepa.data.audio_io.SKIP_REASONS`). Silent clips are kept:
they are legitimate task data (e.g. a silence class). `verify_audio="header"` only checks existence
and file headers (folder tasks) and leaves decoding to `load_audio`, which then may raise
`BadAudioError` for a clip whose samples are corrupt.

A task is rejected (ValueError naming the file and row or class) when its labels cannot give an
honest score: bad split values, empty train split, fewer than two folds, a single class (every
prediction would be right), or a class without any training clip (fixed splits: no clip in `train`;
folds: all its clips in one fold).
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence

import numpy as np
import soundfile as sf
import soxr

from audiojepa.data import audio_io, records, shards

SPLITS = ("train", "valid", "test")
LABELS_CSV = "labels.csv"
TASK_JSON = "task.json"
_TASK_JSON_KEYS = {"unit_sec": "crop length in seconds (> 0) for EVAR's protocol"}
LABEL_SEPARATOR = ";"
VERIFY_MODES = ("decode", "header")
_EMBEDDED_OPTIONS = {"num_clips": int, "duration_s": float, "seed": int}
_TFDS_OPTIONS = {"data_dir": str, "audio_key": str, "label_key": str, "sample_rate": int}
_TFDS_SPLIT_NAMES = {"train": "train", "validation": "valid", "valid": "valid", "dev": "valid", "test": "test"}
# Clips decoded in parallel by the load-time check: file decoding and soxr release the GIL.
_VERIFY_THREADS = 8


@dataclasses.dataclass
class Task:
    """A labelled downstream task.

    Attributes:
      name: short name for reports (the folder name, "embedded", or the TFDS name).
      clip_ids: [n] clip identifiers (file names relative to the task folder, record ids, ...).
      labels: [n] lists of class names; single-label tasks hold one name per clip.
      splits: [n] "train"/"valid"/"test" strings, or [n] int fold ids.
      multilabel: True if any clip has more than one label.
      classes: sorted class names; `label_array` indexes into this list.
      skipped: clips that could not be used, as {"path", "reason", "detail"}; not in `clip_ids`.
      source: the spec the task was loaded from.
      unit_sec: the task's own crop length in seconds (its folder's task.json), or None.
    """

    name: str
    clip_ids: list[str]
    labels: list[list[str]]
    splits: np.ndarray
    multilabel: bool
    classes: list[str]
    skipped: list[dict]
    source: str = ""
    unit_sec: float | None = None
    audio_loader: Callable[[int, int], np.ndarray] | None = dataclasses.field(default=None, repr=False,
                                                                             compare=False)

    def __len__(self) -> int:
        return len(self.clip_ids)

    @property
    def is_folds(self) -> bool:
        return self.splits.dtype.kind in "iu"

    def load_audio(self, index: int, sample_rate: int) -> np.ndarray:
        """Clip `index` as a mono waveform: [samples] float32 at `sample_rate` Hz."""
        if self.audio_loader is None:
            raise ValueError(f"task {self.name!r} has no audio source")
        return self.audio_loader(int(index), int(sample_rate))

    def label_array(self) -> np.ndarray:
        """Single-label: [n] int64 class indices. Multi-label: [n, num_classes] float32 multi-hot (0/1)."""
        index = {name: i for i, name in enumerate(self.classes)}
        if not self.multilabel:
            return np.array([index[clip_labels[0]] for clip_labels in self.labels], dtype=np.int64)
        multi_hot = np.zeros((len(self.labels), len(self.classes)), np.float32)
        for row, clip_labels in enumerate(self.labels):
            multi_hot[row, [index[name] for name in clip_labels]] = 1.0
        return multi_hot


def majority_class(task: Task) -> dict | None:
    """The score of always answering the most frequent training label: the floor below which a probe has learnt
    nothing (on an unbalanced test split it can be far above 1 / classes).

    Fixed splits: the most frequent label of `train` (ties: the first in `classes`), scored on `test`.
    Folds: the same with each fold held out in turn against all the others, accuracy averaged over folds (label
    None, as it may differ per fold). Returns {"label", "accuracy" (0-1), "test_clips"}; None for a multi-label
    task (no single answer to count).
    """
    if task.multilabel:
        return None
    labels = task.label_array()
    held_out = sorted(set(task.splits.tolist())) if task.is_folds else ["test"]
    accuracies, answers = [], []
    for test in held_out:
        train = task.splits != test if task.is_folds else task.splits == "train"
        answer = int(np.argmax(np.bincount(labels[train], minlength=len(task.classes))))  # first of ties
        accuracies.append(float(np.mean(labels[task.splits == test] == answer)))
        answers.append(answer)
    test_clips = len(labels) if task.is_folds else int(np.sum(task.splits == "test"))
    label = None if task.is_folds else task.classes[answers[0]]
    return {"label": label, "accuracy": float(np.mean(accuracies)), "test_clips": test_clips}


def load_task(spec: str, *, sample_rate: int, verify_audio: str = "decode") -> Task:
    """Reads the task named by `spec` (see the module docstring); audio is checked at `sample_rate` Hz."""
    if verify_audio not in VERIFY_MODES:
        raise ValueError(f"verify_audio={verify_audio!r}; valid: {VERIFY_MODES}")
    if spec == "embedded" or spec.startswith("embedded:"):
        options = _parse_options(spec.partition(":")[2], _EMBEDDED_OPTIONS, spec)
        from audiojepa.data import embedded

        folder = embedded.ensure_embedded_corpus(sample_rate=sample_rate, **options)
        task = _shard_task(folder, name="embedded", verify_audio=verify_audio)
    elif spec.startswith("tfds:"):
        name, options = _split_tfds_spec(spec)
        task = _tfds_task(name, options, verify_audio=verify_audio)
    elif os.path.isfile(os.path.join(spec, LABELS_CSV)):
        task = _folder_task(spec, sample_rate=sample_rate, verify_audio=verify_audio)
    elif os.path.isfile(os.path.join(spec, shards.MANIFEST)):
        task = _shard_task(spec, name=os.path.basename(os.path.normpath(spec)), verify_audio=verify_audio)
    elif os.path.isdir(spec):
        raise FileNotFoundError(f"{os.path.join(spec, LABELS_CSV)} does not exist: a task folder needs a "
                                f"{LABELS_CSV} with the header filename,label,split (or filename,label,fold); "
                                f"a shard set needs {shards.MANIFEST}")
    else:
        raise FileNotFoundError(f"task {spec!r} is neither a folder, 'embedded[:options]' nor 'tfds:NAME[:options]'")
    task.source = spec
    if os.path.isdir(spec):
        task.unit_sec = read_task_json(spec).get("unit_sec")
    if task.skipped:
        reasons = {}
        for entry in task.skipped:
            reasons[entry["reason"]] = reasons.get(entry["reason"], 0) + 1
        logging.warning("task %s: %d clips skipped (%s); e.g. %s", task.name, len(task.skipped),
                        ", ".join(f"{r}: {c}" for r, c in sorted(reasons.items())), task.skipped[0]["path"])
    return task


# -- shared checks ------------------------------------------------------------------------------------


def read_task_json(folder: str) -> dict:
    """The settings in `folder`/task.json ({} without one); errors name the file and the valid keys."""
    path = os.path.join(folder, TASK_JSON)
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            settings = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    valid = "; ".join(f"{k}: {v}" for k, v in _TASK_JSON_KEYS.items())
    if not isinstance(settings, dict) or set(settings) - set(_TASK_JSON_KEYS):
        unknown = sorted(set(settings) - set(_TASK_JSON_KEYS)) if isinstance(settings, dict) else settings
        raise ValueError(f"{path}: unknown setting(s) {unknown}; valid keys: {valid}")
    unit_sec = settings.get("unit_sec")
    if unit_sec is not None and (isinstance(unit_sec, bool) or not isinstance(unit_sec, (int, float))
                                 or not unit_sec > 0):
        raise ValueError(f"{path}: unit_sec={unit_sec!r}; it must be a number of seconds > 0")
    return {k: float(v) for k, v in settings.items()}


def _parse_options(text: str, valid: dict, spec: str) -> dict:
    """"k=v,k=v" -> {k: typed v}; unknown keys and bad values name the spec and the valid keys."""
    options = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in valid:
            raise ValueError(f"task {spec!r}: bad option {item!r}; valid options: "
                             f"{', '.join(f'{k}=<{t.__name__}>' for k, t in valid.items())}")
        try:
            options[key] = valid[key](value.strip())
        except ValueError:
            raise ValueError(f"task {spec!r}: option {key}={value!r} is not a valid {valid[key].__name__}") from None
    return options


def _parse_labels(cell: str) -> list[str]:
    """'dog; bark;dog' -> ['dog', 'bark']: split on ';', stripped, empty and repeated names dropped."""
    out = []
    for name in (part.strip() for part in cell.split(LABEL_SEPARATOR)):
        if name and name not in out:
            out.append(name)
    return out


def _parse_split(value: str, where: str) -> str:
    split = value.strip()
    if split not in SPLITS:
        raise ValueError(f"{where}: split {value!r} is not one of {', '.join(SPLITS)}")
    return split


def _parse_fold(value: str, where: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise ValueError(f"{where}: fold {value!r} is not an integer fold id") from None


def _finish(name: str, clip_ids, labels, splits, skipped, audio_loader, *, where: str) -> Task:
    """Builds the Task after checking that every class can be learned from the training clips."""
    if not clip_ids:
        raise ValueError(f"{where}: no usable clips ({len(skipped)} skipped, e.g. {skipped[:3]})")
    is_folds = isinstance(splits[0], (int, np.integer))
    splits = np.asarray(splits, dtype=np.int64 if is_folds else None)
    classes = sorted({c for clip_labels in labels for c in clip_labels})
    where_seen: dict[str, set] = {c: set() for c in classes}
    for clip_labels, split in zip(labels, splits.tolist()):
        for c in clip_labels:
            where_seen[c].add(split)
    if is_folds:
        folds = sorted(set(splits.tolist()))
        if len(folds) < 2:
            raise ValueError(f"{where}: cross-validation needs at least 2 folds; found folds {folds}")
        untrainable = {c: s for c, s in where_seen.items() if len(s) < 2}
        why = "occurs in one fold only, so it has no training clip when that fold is held out"
    else:
        if "train" not in set(splits.tolist()):
            raise ValueError(f"{where}: the train split is empty (no usable clip has split 'train')")
        untrainable = {c: s for c, s in where_seen.items() if "train" not in s}
        why = "has no clip in the train split"
    if len(classes) < 2:
        # Every prediction would be right: a probe "scores" 100% and says nothing about the encoder.
        raise ValueError(f"task {name!r} ({where}): only one class, {classes[0]!r}, in its {len(clip_ids)} usable "
                         "clips; a score needs at least two classes (check the label column, or the clips "
                         f"skipped: {len(skipped)})")
    if untrainable:
        listed = "; ".join(f"{c!r} (only in {', '.join(map(str, sorted(s)))})"
                           for c, s in sorted(untrainable.items())[:10])
        raise ValueError(f"{where}: {len(untrainable)} class(es) cannot be learned: {listed}. A class that "
                         f"{why} would make the score silently wrong; fix the splits or drop those clips.")
    return Task(name=name, clip_ids=list(clip_ids), labels=[list(x) for x in labels], splits=splits,
                multilabel=any(len(x) > 1 for x in labels), classes=classes, skipped=list(skipped),
                audio_loader=audio_loader)


def verify_all(check: Callable[[int], None], count: int) -> list[tuple[int, str, str]]:
    """Runs `check(i)` for i < count in threads; returns (i, reason, detail) for the failures."""
    def run(i):
        try:
            check(i)
        except audio_io.BadAudioError as e:
            return i, e.reason, e.detail
        except records.CorruptRecordError as e:
            return i, "unreadable", str(e)
        except Exception as e:  # any decoder failure makes the clip unusable, never the whole task
            return i, "unreadable", f"{type(e).__name__}: {e}"
        return None

    with concurrent.futures.ThreadPoolExecutor(min(_VERIFY_THREADS, os.cpu_count() or 1)) as pool:
        return [r for r in pool.map(run, range(count)) if r is not None]


def _check_waveform(waveform: np.ndarray) -> None:
    """The checks `load_clip` makes, for audio that does not come from a file."""
    if waveform.size == 0:
        raise audio_io.BadAudioError("empty", "no samples")
    if not np.all(np.isfinite(waveform)):
        raise audio_io.BadAudioError("non-finite", f"{int(np.sum(~np.isfinite(waveform)))} NaN/Inf samples")


def _resample(waveform: np.ndarray, rate: int, sample_rate: int) -> np.ndarray:
    if rate != sample_rate:
        waveform = soxr.resample(waveform, rate, sample_rate, quality="HQ")
    return np.ascontiguousarray(waveform, dtype=np.float32)


# -- task folders -------------------------------------------------------------------------------------


class FileAudio:
    """Audio of a task folder: clip i is the file paths[i]."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def __call__(self, index: int, sample_rate: int) -> np.ndarray:
        # silence_peak=0: silent clips are task data, not bad files.
        return audio_io.load_clip(self.paths[index], sample_rate=sample_rate, silence_peak=0.0)


def _header_check(path: str) -> None:
    """The file exists and a decoder reads its header (audio_io.read_info: libsndfile or PyAV) with samples in it."""
    info = audio_io.read_info(path)  # BadAudioError "missing", "not a regular file" or "unreadable"
    if info.frames == 0:
        raise audio_io.BadAudioError("empty", "no samples")


def read_csv_rows(path: str, *, expected_header: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """(header, [(line number, cells)]) of the CSV file at `path`: names and cells stripped, blank rows left out.
    Errors name the file: an empty one (saying `expected_header`), a row whose column count is not the header's."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{path}: empty file; expected the header {expected_header}")
    header = [h.strip() for h in rows[0]]
    out = []
    for line_number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            raise ValueError(f"{path}:{line_number}: {len(row)} columns, the header has {len(header)}")
        out.append((line_number, [cell.strip() for cell in row]))
    return header, out


def _folder_task(folder: str, *, sample_rate: int, verify_audio: str) -> Task:
    csv_path = os.path.join(folder, LABELS_CSV)
    header, rows = read_csv_rows(csv_path, expected_header="filename,label,split (or ...,fold)")
    missing = [c for c in ("filename", "label") if c not in header]
    split_columns = [c for c in ("split", "fold") if c in header]
    if missing or len(split_columns) != 1:
        problem = (f"missing column(s) {missing}" if missing else
                   "no split or fold column" if not split_columns else "both a split and a fold column")
        raise ValueError(f"{csv_path}: {problem} in header {header}; expected filename,label,split or "
                         "filename,label,fold")
    col_file, col_label, col_split = header.index("filename"), header.index("label"), header.index(split_columns[0])
    parse_split = _parse_fold if split_columns[0] == "fold" else _parse_split
    clip_ids, labels, splits, paths, first_row = [], [], [], [], {}
    for line_number, row in rows:
        where = f"{csv_path}:{line_number}"
        filename = row[col_file]
        if not filename:
            raise ValueError(f"{where}: empty filename")
        if filename in first_row:
            raise ValueError(f"{where}: {filename!r} is listed twice (also on line {first_row[filename]})")
        first_row[filename] = line_number
        clip_labels = _parse_labels(row[col_label])
        if not clip_labels:
            raise ValueError(f"{where}: no label for {filename!r}")
        clip_ids.append(filename)
        labels.append(clip_labels)
        splits.append(parse_split(row[col_split], where))
        paths.append(os.path.join(folder, filename))
    loader = FileAudio(paths)
    if verify_audio == "decode":
        failures = verify_all(lambda i: loader(i, sample_rate), len(paths))
    else:
        failures = verify_all(lambda i: _header_check(paths[i]), len(paths))
    bad = {i for i, _, _ in failures}
    skipped = [{"path": clip_ids[i], "reason": reason, "detail": detail} for i, reason, detail in failures]
    keep = [i for i in range(len(paths)) if i not in bad]
    return _finish(os.path.basename(os.path.normpath(folder)), [clip_ids[i] for i in keep],
                   [labels[i] for i in keep], [splits[i] for i in keep], skipped,
                   FileAudio([paths[i] for i in keep]), where=csv_path)


# -- shard sets (and the embedded corpus) -------------------------------------------------------------


class _ShardAudio:
    """Audio of a shard-set task: clip i is record locations[i] = (shard index, record index)."""

    def __init__(self, paths: Sequence[str], locations: Sequence[tuple[int, int]]):
        self.paths = list(paths)
        self.locations = list(locations)
        self._readers = {}

    def __getstate__(self):  # open readers do not pickle; they reopen on first use
        return {"paths": self.paths, "locations": self.locations, "_readers": {}}

    def raw(self, index: int) -> bytes:
        shard, record = self.locations[index]
        if shard not in self._readers:
            self._readers[shard] = shards.open_reader(self.paths[shard])
        return shards.read_records(self._readers[shard], self.paths[shard], record, record + 1)[0]

    def __call__(self, index: int, sample_rate: int) -> np.ndarray:
        raw = self.raw(index)
        rate = int(records.decode_header(raw)["sample_rate"])
        return _resample(records.decode_waveform(raw), rate, sample_rate)


def _shard_task(folder: str, *, name: str, verify_audio: str) -> Task:
    paths, manifest = shards.resolve_shards(folder)
    # Clips the sharding run could not use are clips of the task too: count them.
    skipped = [dict(entry) for entry in (manifest or {}).get("skipped", [])]
    clip_ids, labels, splits, locations = [], [], [], []
    split_kind = None
    for shard, path in enumerate(paths):
        reader = shards.open_reader(path)  # errors name the shard
        try:
            raw_records = shards.read_records(reader, path, 0, int(reader.num_records()))
        finally:
            reader.close()
        for j, raw in enumerate(raw_records):
            where = f"{path} record {j}"
            try:
                header = records.decode_header(raw)
                if verify_audio == "decode":
                    _check_waveform(records.decode_waveform(raw))
            except records.CorruptRecordError as e:
                skipped.append({"path": f"{os.path.basename(path)}#{j}", "reason": "unreadable", "detail": str(e)})
                continue
            except audio_io.BadAudioError as e:
                skipped.append({"path": header.get("id", f"#{j}"), "reason": e.reason, "detail": e.detail})
                continue
            metadata = header.get("metadata") or {}
            where = f"{where} (id {header.get('id')!r})"
            kind = "split" if "split" in metadata else "fold" if "fold" in metadata else None
            if "label" not in metadata or kind is None:
                raise ValueError(f"{where}: metadata {sorted(metadata)} lacks 'label' and 'split' (or 'fold'); a "
                                 "shard set used as a task needs both on every clip (make the shards from a CSV "
                                 "with label and split columns)")
            if split_kind not in (None, kind):
                raise ValueError(f"{where}: has a {kind!r} while earlier records have a {split_kind!r}")
            split_kind = kind
            clip_labels = _parse_labels(metadata["label"])
            if not clip_labels:
                raise ValueError(f"{where}: empty label")
            clip_ids.append(str(header.get("id", f"{os.path.basename(path)}#{j}")))
            labels.append(clip_labels)
            splits.append(_parse_fold(metadata["fold"], where) if kind == "fold"
                          else _parse_split(metadata["split"], where))
            locations.append((shard, j))
    return _finish(name, clip_ids, labels, splits, skipped, _ShardAudio(paths, locations), where=folder)


# -- TFDS -----------------------------------------------------------------------------------------------


def _split_tfds_spec(spec: str) -> tuple[str, dict]:
    """'tfds:nsynth/full:2.3.0:data_dir=gs://b/tfds' -> ('nsynth/full:2.3.0', {'data_dir': 'gs://b/tfds'})."""
    parts = spec[len("tfds:"):].split(":")
    first_option = next((i for i, part in enumerate(parts) if "=" in part), len(parts))
    name = ":".join(parts[:first_option])
    if not name:
        raise ValueError(f"task {spec!r}: no dataset name; expected tfds:NAME[:options]")
    return name, _parse_options(":".join(parts[first_option:]), _TFDS_OPTIONS, spec)


def _integer_pcm_scale(dtype: np.dtype) -> tuple[float, float]:
    """(offset, scale) turning stored integer samples into [-1, 1] floats (TFDS keeps 16-bit PCM in int64)."""
    if dtype == np.uint8:
        return 128.0, 1.0 / 128.0
    if dtype == np.int32:
        return 0.0, 1.0 / 2**31
    return 0.0, 1.0 / 32768.0


def _audio_to_float(audio, audio_key: str) -> np.ndarray:
    """A TFDS audio value -> [samples] float32 in [-1, 1].

    Accepts [samples] or [samples, channels] samples (channels are averaged; integer PCM is scaled
    by its full scale, TFDS keeping 16-bit PCM in int64) or the encoded file bytes of a lazily
    decoded `tfds.features.Audio`. Raises BadAudioError("unreadable") for bytes that do not decode.
    """
    if isinstance(audio, (bytes, np.bytes_)):
        import io

        try:
            audio, _ = sf.read(io.BytesIO(audio), dtype="float32", always_2d=True)
        except Exception as e:
            raise audio_io.BadAudioError("unreadable", f"{type(e).__name__}: {e}") from None
    audio = np.asarray(audio)
    if audio.dtype.kind in "iu":
        offset, scale = _integer_pcm_scale(audio.dtype)
        audio = (audio.astype(np.float32) - np.float32(offset)) * np.float32(scale)
    elif audio.dtype.kind != "f":
        raise ValueError(f"feature {audio_key!r} holds {audio.dtype} values, not audio samples")
    if audio.ndim == 2:
        audio = audio.mean(axis=1)
    if audio.ndim != 1:
        raise ValueError(f"feature {audio_key!r} has shape {audio.shape}; expected [samples] or [samples, channels]")
    return audio.astype(np.float32, copy=False)


class _TfdsFiles:
    """A TFDS dataset prepared as ArrayRecord, read straight from its files, without TensorFlow.

    `tfds.data_source` cannot open datasets with a `tfds.features.Audio` feature unless TensorFlow is
    installed (tensorflow/datasets#11233: the feature's constructor converts its dtype with TF). The
    records themselves are `tf.train.Example` protos, which TFDS parses with its own copy of the
    proto, so this reader needs only `dataset_info.json`, `features.json`, `*.labels.txt` and the
    shards. Numeric features come back as arrays, bytes features as bytes.
    """

    def __init__(self, builder_dir: str):
        with open(os.path.join(builder_dir, "dataset_info.json")) as f:
            self.info = json.load(f)
        with open(os.path.join(builder_dir, "features.json")) as f:
            self.features = json.load(f).get("featuresDict", {}).get("features", {})
        file_format = self.info.get("fileFormat", "tfrecord")
        if file_format != "array_record":
            raise ValueError(f"{builder_dir}: prepared as {file_format!r}; random access needs array_record "
                             "(tfds build NAME --file_format=array_record)")
        self.builder_dir = builder_dir
        self.split_info = {s["name"]: s for s in self.info.get("splits", [])}
        self._readers = {}

    def __getstate__(self):  # open readers do not pickle; they reopen on first use
        return {**self.__dict__, "_readers": {}}

    @property
    def feature_names(self) -> list[str]:
        return list(self.features)

    @property
    def supervised_keys(self) -> tuple:
        items = self.info.get("supervisedKeys", {}).get("tuple", {}).get("items", [])
        return tuple(item.get("featureKey") for item in items)

    @property
    def num_examples(self) -> dict[str, int]:
        return {name: sum(int(n) for n in s.get("shardLengths", [])) for name, s in self.split_info.items()}

    def sample_rate(self, key: str) -> int | None:
        return int(self.features[key].get("audio", {}).get("sampleRate", 0) or 0) or None

    def label_names(self, key: str) -> list[str] | None:
        path = os.path.join(self.builder_dir, f"{key}.labels.txt")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return [line.rstrip("\n") for line in f if line.strip()]

    def _shard_path(self, split: str, shard: int, num_shards: int) -> str:
        template = self.split_info[split].get("filepathTemplate", "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}")
        return os.path.join(self.builder_dir, template.format(
            DATASET=self.info["name"], SPLIT=split, FILEFORMAT="array_record",
            SHARD_X_OF_Y=f"{shard:05d}-of-{num_shards:05d}", SHARD_INDEX=f"{shard:05d}",
            NUM_SHARDS=f"{num_shards:05d}"))

    def get(self, split: str, index: int, keys: Sequence[str]) -> dict:
        """{key: value} of example `index` of `split`."""
        from array_record.python import array_record_module
        from tensorflow_datasets.proto import tf_example_pb2

        lengths = [int(n) for n in self.split_info[split]["shardLengths"]]
        shard = int(np.searchsorted(np.cumsum(lengths), index, side="right"))
        if (split, shard) not in self._readers:
            self._readers[split, shard] = array_record_module.ArrayRecordReader(
                self._shard_path(split, shard, len(lengths)))
        raw = self._readers[split, shard].read([index - sum(lengths[:shard])])[0]
        feature_map = tf_example_pb2.Example.FromString(raw).features.feature
        out = {}
        for key in keys:
            if key not in feature_map:
                raise KeyError(f"{self.builder_dir}: example {index} of split {split!r} has no feature {key!r}; "
                               f"it has {sorted(feature_map)}")
            kind = feature_map[key].WhichOneof("kind")
            values = list(getattr(feature_map[key], kind).value) if kind else []
            if kind == "bytes_list":
                out[key] = values[0] if len(values) == 1 else values
                continue
            value = np.asarray(values, np.int64 if kind == "int64_list" else np.float32)
            # [samples, channels] audio is stored flat; its feature spec says how many channels.
            spec = next((v for k, v in self.features[key].items() if isinstance(v, dict) and "shape" in v), {})
            dims = [int(d) for d in spec.get("shape", {}).get("dimensions", [])]
            out[key] = value.reshape(-1, dims[1]) if len(dims) == 2 and dims[1] > 0 else value
        return out


def _needs_tensorflow(error: BaseException) -> bool:
    """Whether `error` (or what caused it) is the failed import of TensorFlow."""
    while error is not None:
        if isinstance(error, ModuleNotFoundError) and (
                (error.name or "").split(".")[0] == "tensorflow" or "No module named 'tensorflow" in str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


class _TfdsSource:
    """One TFDS dataset: through `tfds.data_source`, or `_TfdsFiles` when that needs missing TensorFlow."""

    def __init__(self, name: str, data_dir: str | None):
        import tensorflow_datasets as tfds

        self.name, self.data_dir = name, data_dir
        self._files = None
        try:
            self._sources = tfds.data_source(name, data_dir=data_dir, download=False)
        except Exception as e:
            if not _needs_tensorflow(e):
                raise
            logging.info("tfds:%s: tfds.data_source needs TensorFlow for this dataset (%s); reading its "
                         "ArrayRecord files directly", name, e)
            self._sources = None
            self._files = _TfdsFiles(_tfds_builder_dir(name, data_dir))

    def __getstate__(self):  # data sources hold open files; reopen on first use
        return {**self.__dict__, "_sources": None}

    def _data_sources(self):
        if self._sources is None:
            import tensorflow_datasets as tfds

            self._sources = tfds.data_source(self.name, data_dir=self.data_dir, download=False)
        return self._sources

    def _info(self):
        return next(iter(self._data_sources().values())).dataset_info

    @property
    def feature_names(self) -> list[str]:
        return self._files.feature_names if self._files else list(self._info().features.keys())

    @property
    def supervised_keys(self) -> tuple:
        return self._files.supervised_keys if self._files else tuple(self._info().supervised_keys or ())

    @property
    def num_examples(self) -> dict[str, int]:
        return self._files.num_examples if self._files else {s: len(d) for s, d in self._data_sources().items()}

    def sample_rate(self, key: str) -> int | None:
        return self._files.sample_rate(key) if self._files else getattr(self._info().features[key], "sample_rate", None)

    def label_names(self, key: str) -> list[str] | None:
        if self._files:
            return self._files.label_names(key)
        feature = self._info().features[key]
        feature = getattr(feature, "feature", feature)  # Sequence(ClassLabel) for multi-label tasks
        return list(getattr(feature, "names", None) or []) or None

    def get(self, split: str, index: int, keys: Sequence[str]) -> dict:
        if self._files:
            return self._files.get(split, index, keys)
        example = self._data_sources()[split][index]
        return {key: example[key] for key in keys}


def _tfds_builder_dir(name: str, data_dir: str | None) -> str:
    """<data_dir>/<name>[/<config>]/<version>: the given version, else the newest one prepared."""
    root = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    dataset, _, version = name.partition(":")
    base = os.path.join(root, dataset)
    versions = [version] if version else sorted(
        (v for v in (os.listdir(base) if os.path.isdir(base) else []) if v[:1].isdigit()),
        key=lambda v: tuple(int(x) if x.isdigit() else -1 for x in v.split(".")), reverse=True)
    for v in versions:
        if os.path.exists(os.path.join(base, v, "dataset_info.json")):
            return os.path.join(base, v)
    raise FileNotFoundError(f"TFDS dataset {name!r} is not prepared under {root} (no {base}/<version>/"
                            f"dataset_info.json); prepare it with `tfds build {dataset} --file_format=array_record "
                            f"--data_dir={root}`")


class _TfdsAudio:
    """Audio of a TFDS task: clip i is example rows[i] = (tfds split, index), stored at `rate` Hz."""

    def __init__(self, source: _TfdsSource, rows, audio_key: str, rate: int):
        self.source, self.rows, self.audio_key, self.rate = source, list(rows), audio_key, int(rate)

    def __call__(self, index: int, sample_rate: int) -> np.ndarray:
        split, j = self.rows[index]
        value = self.source.get(split, j, (self.audio_key,))[self.audio_key]
        return _resample(_audio_to_float(value, self.audio_key), self.rate, sample_rate)


def _tfds_task(name: str, options: dict, *, verify_audio: str) -> Task:
    spec = f"tfds:{name}"
    try:
        import tensorflow_datasets  # noqa: F401
    except ImportError as e:
        raise ImportError(f"task {spec!r} needs tensorflow-datasets (pip install tensorflow-datasets; "
                          f"TensorFlow itself is not needed): {e}") from None
    source = _TfdsSource(name, options.get("data_dir"))
    supervised = tuple(source.supervised_keys) + (None, None)
    audio_key = options.get("audio_key") or supervised[0] or "audio"
    label_key = options.get("label_key") or supervised[1] or "label"
    for key in (audio_key, label_key):
        if key not in source.feature_names:
            raise ValueError(f"task {spec!r}: no feature {key!r}; features: {source.feature_names} "
                             "(choose with audio_key=... / label_key=...)")
    rate = options.get("sample_rate") or source.sample_rate(audio_key)
    if not rate:
        raise ValueError(f"task {spec!r}: feature {audio_key!r} records no sample rate; add sample_rate=<Hz> "
                         f"to the spec, e.g. {spec}:sample_rate=16000")
    names = source.label_names(label_key)
    num_examples = source.num_examples
    used = [s for s in num_examples if s in _TFDS_SPLIT_NAMES]
    if sorted(set(num_examples) - set(used)):
        logging.info("task %s: ignoring splits %s (using %s)", spec, sorted(set(num_examples) - set(used)), used)
    clip_ids, labels, splits, rows, skipped = [], [], [], [], []
    for split in used:
        for j in range(num_examples[split]):
            clip_id = f"{split}:{j}"
            example = source.get(split, j, (audio_key, label_key))
            if verify_audio == "decode":
                try:
                    _check_waveform(_audio_to_float(example[audio_key], audio_key))
                except audio_io.BadAudioError as e:
                    skipped.append({"path": clip_id, "reason": e.reason, "detail": e.detail})
                    continue
            clip_labels = _tfds_labels(example[label_key], names)
            if not clip_labels:
                raise ValueError(f"task {spec!r}: example {clip_id} has no label in {label_key!r}")
            clip_ids.append(clip_id)
            labels.append(clip_labels)
            splits.append(_TFDS_SPLIT_NAMES[split])
            rows.append((split, j))
    return _finish(name.split(":")[0].replace("/", "_"), clip_ids, labels, splits, skipped,
                   _TfdsAudio(source, rows, audio_key, rate), where=spec)


def _tfds_labels(value, names: list[str] | None) -> list[str]:
    """A label value (class id, ids, or text) -> class names, deduplicated in order."""
    if isinstance(value, (bytes, np.bytes_)):
        items = [value.decode("utf-8")]
    elif isinstance(value, str):
        items = [value]
    else:
        items = np.atleast_1d(np.asarray(value)).tolist()
    out = []
    for item in items:
        if isinstance(item, bytes):
            item = item.decode("utf-8")
        if isinstance(item, (int, np.integer)):
            item = names[item] if names else str(item)
        if item not in out:
            out.append(str(item))
    return out
