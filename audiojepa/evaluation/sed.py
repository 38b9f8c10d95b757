r"""Sound event detection (SED) tasks: frame embeddings, a frame-wise linear probe, HEAR's onset F-measure.

    python -m audiojepa.evaluate --encoder=/ckpt/m2d/export --task=/data/tasks/dcase2016_task2 --output=/tmp/sed

evaluates an encoder's timestamp (frame) embeddings the way HEAR scores DCASE 2016 task 2 ("office sound
events"), in-repo: `evaluate` routes a task folder holding `events.csv` here.

**Task folder** (`load_sed_task`):

    DIR/splits.csv   filename,split        every audio file of the task, split in train/valid/test
    DIR/events.csv   filename,onset,offset,label   one row per event, times in seconds from the file's start
    DIR/<audio files>  (paths in the CSVs are relative to DIR; any format audiojepa.data.audio_io reads)

`splits.csv` lists the files, so a file with no event (all background) is simply a file without rows in
`events.csv`. Extra columns are ignored; blank lines are skipped. Events may overlap, within a class or across
classes. A task is rejected (ValueError naming the file and line) for: a missing column; an unknown split; a
file listed twice in splits.csv; an event whose file is not in splits.csv; a time that is not a finite number;
onset < 0; offset <= onset; an empty label; an onset at or past the end of its audio (times in ms instead of s?).
The task as a whole needs files in train, valid (HEAR selects the probe and the decoding on it) and test, events
in all three, and every class of valid/test in train. Audio that cannot be used is skipped and counted as for clip
tasks (`SedTask.skipped`, reasons of audiojepa.data.audio_io.SKIP_REASONS: "missing", "unreadable", ...; the
detail names the splits.csv line): every file is decoded once when the task loads (its length is needed for the
onset check), and its events leave scoring with it.

**Frames** (`frame_embedder`). An encoder (`embedders.EncoderEmbedder`) gives what `audiojepa.adapters.hear` hands HEAR as
timestamp embeddings with `timestamp_hop_ms="native"`: `AudioEncoder.embed_waveform`'s frame features [T', D] of
the whole file, one per `frame_hop_seconds` (160 ms for 16x16 patches of 10 ms frames), frame i timestamped at
the **centre** of its patch of log-mel frames (waveform models: of its frame, (i + 0.5) x hop); a last step whose
centre is past the end of the audio (mostly padding) is left out. (Not audiojepa.adapters.hear's default 50 ms grid of
interpolated steps: interpolation adds no information, and the probe sees the encoder's own steps.) The log-mel baseline
(`embedders.LogMelEmbedder`) has no frames of its own: its frame feature is the normalised log-mel averaged over
windows of `LOGMEL_FRAMES_PER_STEP` frames (16: M2D's patch width, 160 ms at a 10 ms hop; a shorter last
window averages what it has), timestamped at the centre of the window's frames. A frame's target is the multi-hot
of the events active at its timestamp, onset <= t <= offset (HEAR's `get_labels_for_timestamps`, offset
included).

**Probe** (`sed_probe`): HEAR trains shallow MLPs over a grid; here, as the clip probes, one linear layer on
standardised inputs (train-frame statistics) with sigmoid BCE, through `probes`' epoch step (Adam, coupled weight
decay 1e-8, per-epoch reshuffle), lr `DEFAULT_LR`, `DEFAULT_BATCH_FRAMES` frames a step, at most `MAX_EPOCHS`
epochs (HEAR's schedule). Every `VALID_EVERY_EPOCHS` epochs the valid files are decoded with every setting of the
post-processing grid and scored; the epoch and setting with the best valid onset F-measure (the earlier epoch of
equals: HEAR's checkpoint monitor is strict) are kept, training stops after `PATIENCE` scorings without a better
one, and the test files are decoded with that setting and scored. Decoding and metric: `sed_metrics` (HEAR's
median filter 250 ms, threshold 0.5, minimum event duration 125 or 250 ms chosen on valid; sed_eval's event-based
onset F-measure, 200 ms collar, micro average). One run per seed; the score is the mean over seeds with a 95%
Student-t interval. `--lr`, `--probe_batch_size` and `--seeds` apply; the rest of a `--protocol` is for clip tasks.

Memory: every frame of every file is held (DCASE 2016 task 2, 144 files of 120 s at 160 ms and 3840-d: ~1.7 GB
float32). Frame features are not cached (`embedding_cache` holds clip embeddings).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from audiojepa.data import audio_io, stats
from audiojepa.evaluation import embedders, probes, sed_metrics, tasks
from audiojepa.evaluation.sed_metrics import Event
from audiojepa.models import encoder_layers
from audiojepa.ops import frontend as frontend_lib

log = logging.getLogger(__name__)

EVENTS_CSV = "events.csv"
SPLITS_CSV = "splits.csv"
METRIC = "onset_fms"  # HEAR's event_onset_200ms_fms
SPLITS = ("train", "valid", "test")

# The probe's schedule is HEAR v2021.1.3's PARAM_GRID: batches of 1024 frames, at most 500 epochs, the valid
# split scored every 3 epochs, early stopping after 20 scorings without a better one. Its lr grid is
# {3.2e-3, 1e-3, 3.2e-4, 1e-4}; we train once, at 1e-3. --lr and --probe_batch_size override lr and batch.
DEFAULT_LR = 1e-3
DEFAULT_BATCH_FRAMES = 1024
MAX_EPOCHS = 500
VALID_EVERY_EPOCHS = 3
PATIENCE = 20  # valid scorings, i.e. 60 epochs
# The log-mel baseline's frame: M2D's patch width in log-mel frames.
LOGMEL_FRAMES_PER_STEP = 16


# -- the task format ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class SedTask:
    """A sound event detection task (module docstring).

    Attributes:
      name: the folder name.
      files: [n] file names relative to the folder, of the usable files.
      splits: [n] "train" / "valid" / "test".
      events: [n] lists of `Event`s (seconds), sorted by onset.
      durations_s: [n] length of each file's audio, seconds (as decoded at load).
      classes: sorted event labels; posteriors and targets index into this list.
      skipped: files that could not be used, as {"path", "reason", "detail"}; not in `files`.
      source: the spec the task was loaded from.
    """

    name: str
    files: list[str]
    splits: np.ndarray
    events: list[list[Event]]
    durations_s: np.ndarray
    classes: list[str]
    skipped: list[dict]
    source: str = ""
    audio_loader: Callable[[int, int], np.ndarray] | None = dataclasses.field(default=None, repr=False,
                                                                             compare=False)

    def __len__(self) -> int:
        return len(self.files)

    def load_audio(self, index: int, sample_rate: int) -> np.ndarray:
        """File `index` as a mono waveform: [samples] float32 at `sample_rate` Hz."""
        return self.audio_loader(int(index), int(sample_rate))


def is_sed_task(spec: str) -> bool:
    """Whether `spec` is an SED task folder (it holds events.csv)."""
    return os.path.isfile(os.path.join(spec, EVENTS_CSV))


def _read_csv(path: str, required: Sequence[str]) -> tuple[dict[str, int], list[tuple[str, list[str]]]]:
    """(column index by name, [(\"path:line\", row)] of the non-blank rows); errors name the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: an SED task folder holds {SPLITS_CSV} (filename,split) "
                                f"and {EVENTS_CSV} (filename,onset,offset,label)")
    header, rows = tasks.read_csv_rows(path, expected_header=",".join(required))
    missing = [c for c in required if c not in header]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} in header {header}; expected {','.join(required)}")
    out = [(f"{path}:{line_number}", row) for line_number, row in rows]
    return {name: header.index(name) for name in required}, out


def _parse_seconds(value: str, column: str, where: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{where}: {column} {value!r} is not a number of seconds") from None
    if not math.isfinite(seconds):
        raise ValueError(f"{where}: {column} {value!r} is not a finite number of seconds")
    return seconds


def _read_splits(folder: str) -> tuple[list[str], list[str], list[str]]:
    """([filename], [split], [\"splits.csv:line\"]) from splits.csv."""
    columns, rows = _read_csv(os.path.join(folder, SPLITS_CSV), ("filename", "split"))
    files, splits, wheres, first = [], [], [], {}
    for where, row in rows:
        filename, split = row[columns["filename"]], row[columns["split"]]
        if not filename:
            raise ValueError(f"{where}: empty filename")
        if filename in first:
            raise ValueError(f"{where}: {filename!r} is listed twice (also at {first[filename]})")
        if split not in SPLITS:
            raise ValueError(f"{where}: split {split!r} of {filename!r} is not one of {', '.join(SPLITS)}")
        first[filename] = where
        files.append(filename)
        splits.append(split)
        wheres.append(where)
    if not files:
        raise ValueError(f"{os.path.join(folder, SPLITS_CSV)}: no file listed")
    return files, splits, wheres


def _read_events(folder: str, known_files: set[str]) -> dict[str, list[tuple[Event, str]]]:
    """{filename: [(event, \"events.csv:line\")]} from events.csv, every row checked."""
    columns, rows = _read_csv(os.path.join(folder, EVENTS_CSV), ("filename", "onset", "offset", "label"))
    events: dict[str, list[tuple[Event, str]]] = {}
    for where, row in rows:
        filename, label = row[columns["filename"]], row[columns["label"]]
        if filename not in known_files:
            raise ValueError(f"{where}: {filename!r} is not listed in {SPLITS_CSV}; list every audio file there "
                             "with its split")
        onset = _parse_seconds(row[columns["onset"]], "onset", where)
        offset = _parse_seconds(row[columns["offset"]], "offset", where)
        if onset < 0:
            raise ValueError(f"{where}: onset {onset:g} s is negative")
        if offset <= onset:
            raise ValueError(f"{where}: offset {offset:g} s is not after onset {onset:g} s")
        if not label:
            raise ValueError(f"{where}: empty label")
        events.setdefault(filename, []).append((Event(onset, offset, label), where))
    return events


def load_sed_task(folder: str, *, sample_rate: int) -> SedTask:
    """Reads the SED task folder `folder` (module docstring); audio is decoded once at `sample_rate` Hz."""
    if os.path.isfile(os.path.join(folder, tasks.LABELS_CSV)):
        raise ValueError(f"{folder} holds both {tasks.LABELS_CSV} (a clip task) and {EVENTS_CSV} (an SED task); "
                         "keep one")
    files, splits, split_rows = _read_splits(folder)
    events = _read_events(folder, set(files))
    loader = tasks.FileAudio([os.path.join(folder, f) for f in files])
    durations: dict[int, float] = {}

    def check(i: int) -> None:
        durations[i] = len(loader(i, sample_rate)) / sample_rate

    failures = tasks.verify_all(check, len(files))
    bad = {i for i, _, _ in failures}
    skipped = [{"path": files[i], "reason": reason, "detail": f"{detail} ({split_rows[i]})"}
               for i, reason, detail in failures]
    keep = [i for i in range(len(files)) if i not in bad]
    for i in keep:
        for event, where in events.get(files[i], ()):
            if event.onset >= durations[i]:
                raise ValueError(f"{where}: onset {event.onset:g} s is at or past the end of {files[i]!r} "
                                 f"({durations[i]:g} s long); times are in seconds")
    task = SedTask(
        name=os.path.basename(os.path.normpath(folder)), files=[files[i] for i in keep],
        splits=np.array([splits[i] for i in keep], dtype=str),
        events=[sorted((e for e, _ in events.get(files[i], ())), key=lambda e: (e.onset, e.label)) for i in keep],
        durations_s=np.array([durations[i] for i in keep], np.float64),
        classes=sorted({e.label for i in keep for e, _ in events.get(files[i], ())}), skipped=skipped,
        source=folder, audio_loader=tasks.FileAudio([os.path.join(folder, files[i]) for i in keep]))
    if skipped:
        log.warning("task %s: %d files skipped (%s); e.g. %s", task.name, len(skipped),
                    ", ".join(sorted({s["reason"] for s in skipped})), skipped[0]["path"])
    check_task(task, where=folder)
    return task


def check_task(task: SedTask, *, where: str) -> None:
    """Raises ValueError (naming `where`) unless `task` can be scored honestly: files and events in train, valid
    and test, and every valid/test class seen in train."""
    if not task.classes:
        raise ValueError(f"{where}: {EVENTS_CSV} lists no event")
    seen: dict[str, set[str]] = {c: set() for c in task.classes}
    events_in = dict.fromkeys(SPLITS, 0)
    files_in = dict.fromkeys(SPLITS, 0)
    for split, file_events in zip(task.splits.tolist(), task.events):
        files_in[split] += 1
        events_in[split] += len(file_events)
        for event in file_events:
            seen[event.label].add(split)
    for split in SPLITS:
        if not files_in[split]:
            raise ValueError(f"{where}: no usable file in the {split!r} split ({len(task.skipped)} skipped)"
                             + ("; HEAR selects the probe and its decoding on valid files" if split == "valid" else ""))
        if not events_in[split]:
            raise ValueError(f"{where}: the {split!r} split has {files_in[split]} usable files but no event: "
                             "its onset F-measure would be undefined")
    untrainable = sorted(c for c, s in seen.items() if "train" not in s)
    if untrainable:
        raise ValueError(f"{where}: class(es) {untrainable[:10]} have events only in "
                         f"{sorted(set().union(*(seen[c] for c in untrainable)))}, none in train: no probe can "
                         "learn them; fix the splits or drop those events")


# -- frames -------------------------------------------------------------------------------------------------


class EncoderFrames:
    """Frame features of a frozen encoder: its HEAR timestamp embeddings with native timestamps, i.e.
    `embed_waveform`'s [T', D] at the step centres (audiojepa.adapters.hear, `timestamp_hop_ms="native"`)."""

    def __init__(self, audio_encoder, name: str):
        from audiojepa.adapters import hear

        if audio_encoder.layer == encoder_layers.ALL:
            raise ValueError(f"{name}: an SED task takes one layer's frames; --layer=all is for clip tasks")
        # Raises for encoders whose steps are not evenly spaced (chunks that are not whole patches).
        self.hear_model = hear.HearEmbedder(audio_encoder, timestamp_hop_ms=hear.NATIVE)
        self.name = name
        self.sample_rate = int(self.hear_model.sample_rate)  # the rate HEAR feeds it (the encoder's for 16 kHz)
        self.hop_s = float(audio_encoder.frame_hop_seconds)
        self.timestamps = "centre of each encoder step (patch of log-mel frames, or waveform frame), as HEAR's"

    def frames(self, waveform: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """waveform [samples] at `sample_rate` -> (features [T, D] float32, timestamps [T] seconds)."""
        embeddings, timestamps_ms = self.hear_model.timestamp_embeddings(np.asarray(waveform, np.float32)[None])
        return embeddings[0], timestamps_ms[0].astype(np.float64) / 1000.0


class LogMelFrames:
    """The log-mel baseline's frames: the normalised log-mel averaged over windows of `frames_per_step` frames."""

    def __init__(self, params: frontend_lib.LogMelParams, norm_stats, name: str,
                 frames_per_step: int = LOGMEL_FRAMES_PER_STEP):
        self.params, self.norm_stats, self.name = params, tuple(norm_stats), name
        self.frames_per_step = int(frames_per_step)
        self.sample_rate = int(params.sample_rate)
        self.hop_s = self.frames_per_step * params.hop_length / params.sample_rate
        self.timestamps = f"centre of each window of {self.frames_per_step} log-mel frames"

    def frames(self, waveform: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """waveform [samples] -> (features [T, n_mels] float32, timestamps [T] seconds)."""
        lms = stats.normalize(frontend_lib.logmel_host(np.asarray(waveform, np.float32)[None], self.params),
                              *self.norm_stats)[0]  # [n_mels, frames]
        num_frames, p = lms.shape[1], self.frames_per_step
        starts = np.arange(0, num_frames, p)
        features = np.add.reduceat(lms, starts, axis=1).T / np.diff(np.append(starts, num_frames))[:, None]
        first_centre_s = 0.0 if self.params.center else self.params.n_fft / 2 / self.sample_rate
        centres = first_centre_s + np.arange(num_frames) * self.params.hop_length / self.sample_rate
        times = np.add.reduceat(centres, starts) / np.diff(np.append(starts, num_frames))
        return features.astype(np.float32), times


def frame_embedder(embedder) -> EncoderFrames | LogMelFrames:
    """The frame-level counterpart of a clip embedder of `embedders` (an encoder, or the log-mel baseline)."""
    if isinstance(embedder, embedders.EncoderEmbedder):
        return EncoderFrames(embedder.encoder, embedder.name)
    if isinstance(embedder, embedders.LogMelEmbedder):
        return LogMelFrames(embedder.params, embedder.norm_stats, embedder.name)
    raise TypeError(f"{getattr(embedder, 'name', embedder)!r} gives no frame features for an SED task")


def frame_targets(events: Sequence[Event], times_s: np.ndarray, classes: Sequence[str]) -> np.ndarray:
    """[T, C] float32 multi-hot: class c is on at time t when an event of c has onset <= t <= offset (HEAR)."""
    index = {c: i for i, c in enumerate(classes)}
    targets = np.zeros((len(times_s), len(classes)), np.float32)
    for event in events:
        targets[(times_s >= event.onset) & (times_s <= event.offset), index[event.label]] = 1.0
    return targets


def embed_files(frames: EncoderFrames | LogMelFrames, task: SedTask) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{file index: (features [T, D], timestamps [T] s)} of every file that loads; one that fails joins
    `task.skipped` (once) and leaves scoring, as embedders.embed_task does for clips."""
    out = {}
    for i in range(len(task)):
        try:
            waveform = task.load_audio(i, frames.sample_rate)
        except audio_io.BadAudioError as e:
            entry = {"path": task.files[i], "reason": e.reason}
            if entry not in task.skipped:
                task.skipped.append(entry)
            continue
        out[i] = frames.frames(waveform)
    return out


# -- the probe ----------------------------------------------------------------------------------------------


@jax.jit
def _posteriors(params, x):
    return jax.nn.sigmoid(probes.head_logits(params, x))


def _split_rows(x: np.ndarray, lengths: Sequence[int]) -> list[np.ndarray]:
    return np.split(x, np.cumsum(lengths)[:-1]) if len(lengths) else []


def sed_probe(train: Sequence[tuple[np.ndarray, np.ndarray]], valid: Sequence[tuple[str, np.ndarray, np.ndarray]],
              test: Sequence[tuple[str, np.ndarray, np.ndarray]], reference: dict[str, list[Event]],
              classes: Sequence[str], *, hop_s: float, seed: int, lr: float = DEFAULT_LR,
              batch_size: int = DEFAULT_BATCH_FRAMES, max_epochs: int = MAX_EPOCHS,
              valid_every: int = VALID_EVERY_EPOCHS, patience: int = PATIENCE,
              grid: Sequence[dict] = sed_metrics.HEAR_POSTPROCESSING_GRID) -> dict:
    """One frame-wise linear probe (module docstring), selected on valid, scored on test.

    Args:
      train: (features [T, D], targets [T, C]) of each training file.
      valid, test: (file name, features [T, D], timestamps [T] s) of each file.
      reference: {file name: events} of the valid and test files.
      valid_every: score the valid files every this many epochs (and after the last epoch).
      patience: stop after this many valid scorings in a row without a better F-measure.
    Returns:
      {"test": test onset F-measure, "test_precision", "test_recall", "test_per_class": {label: F},
       "valid": the selected valid F-measure, "postprocessing": its setting, "epochs", "best_epoch"}.
    """
    train_x = np.concatenate([x for x, _ in train]).astype(np.float32)
    train_y = np.concatenate([y for _, y in train]).astype(np.float32)
    if len(train_x) == 0:
        raise ValueError("no training frame")
    valid_lengths = [len(x) for _, x, _ in valid]
    test_lengths = [len(x) for _, x, _ in test]
    train_x, valid_x, test_x = probes.standardize(train_x, np.concatenate([x for _, x, _ in valid]),
                                                  np.concatenate([x for _, x, _ in test]))
    num_train, dim = train_x.shape
    batch_size = min(int(batch_size), num_train)
    num_padded = -(-num_train // batch_size) * batch_size
    x_padded = np.zeros((num_padded, dim), np.float32)
    x_padded[:num_train] = train_x
    y_padded = np.zeros((num_padded, len(classes)), np.float32)
    y_padded[:num_train] = train_y
    x_padded, y_padded, valid_x_dev = jnp.asarray(x_padded), jnp.asarray(y_padded), jnp.asarray(valid_x)
    valid_times = {name: t for name, _, t in valid}

    init_key, shuffle_key = jax.random.split(jax.random.key(seed))
    params = probes.init_head(init_key, dim, len(classes), "linear")
    opt_state = probes.probe_optimizer(lr).init(params)
    best = None  # (valid F, epoch, params, setting)
    scorings_without_gain = 0
    epoch = 0
    for epoch in range(1, max_epochs + 1):
        params, opt_state, _ = probes.train_epoch(
            params, opt_state, jax.random.fold_in(shuffle_key, epoch), x_padded, y_padded, num_train,
            jnp.float32(lr), batch_size=batch_size, multilabel=True)
        if epoch % valid_every != 0 and epoch != max_epochs:
            continue
        posteriors = _split_rows(np.asarray(_posteriors(params, valid_x_dev)), valid_lengths)
        setting, score, _ = sed_metrics.best_postprocessing(
            {name: p for (name, _, _), p in zip(valid, posteriors)}, valid_times,
            {name: reference.get(name, []) for name, _, _ in valid}, classes, hop_s=hop_s, grid=grid)
        if best is None or score["f_measure"] > best[0]:  # strictly better: the earlier epoch of equals
            best = (score["f_measure"], epoch, params, setting)
            scorings_without_gain = 0
        else:
            scorings_without_gain += 1
            if scorings_without_gain >= patience:
                break
    valid_f, best_epoch, params, setting = best
    posteriors = _split_rows(np.asarray(_posteriors(params, jnp.asarray(test_x))), test_lengths)
    estimated = {name: sed_metrics.decode_events(p, t, classes, hop_s=hop_s, **setting)
                 for (name, _, t), p in zip(test, posteriors)}
    score = sed_metrics.onset_f_measure({name: reference.get(name, []) for name, _, _ in test}, estimated)
    return {"test": score["f_measure"], "test_precision": score["precision"], "test_recall": score["recall"],
            "test_per_class": {c: s["f_measure"] for c, s in score["per_class"].items()}, "valid": valid_f,
            "postprocessing": setting, "epochs": epoch, "best_epoch": best_epoch}


def _probe_settings(protocol, lr, batch_size, seeds) -> tuple[float, int, tuple[int, ...]]:
    """lr, minibatch (frames) and seeds: the explicit values, else the command line's overrides carried by
    `protocol` (--lr, --probe_batch_size, --seeds), else the SED defaults (the protocol's seeds)."""
    overridden = set(getattr(protocol, "overridden", ()))
    if "unit_sec" in overridden:
        log.warning("--unit_sec does not apply to SED tasks: their files are embedded whole")
    if lr is None:
        lr = protocol.lr if "lr" in overridden else DEFAULT_LR
    if batch_size is None:
        batch_size = protocol.probe_batch_size if "probe_batch_size" in overridden else DEFAULT_BATCH_FRAMES
    if seeds is None:
        seeds = protocol.seeds if protocol is not None else probes.SEEDS
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise ValueError("seeds is empty; give at least one seed")
    return float(lr), int(batch_size), seeds


def evaluate_embedder(embedder, task: SedTask, protocol=None, *, lr: float | None = None,
                      batch_size: int | None = None, seeds: Sequence[int] | None = None,
                      max_epochs: int = MAX_EPOCHS, valid_every: int = VALID_EVERY_EPOCHS, patience: int = PATIENCE,
                      grid: Sequence[dict] = sed_metrics.HEAR_POSTPROCESSING_GRID) -> dict:
    """The SED score of one clip embedder (`embedders.make_embedder`'s kinds) on `task`, in the shape of
    evaluate's results: {"metric": "onset_fms", "linear": {"metric", "mean", "ci95", "std", "per_seed", "lr",
    "validation", "frame_hop_seconds", "runs"}, "knn": None, "sed": {frames, files, events per split, classes,
    decoding}, "protocol": {...}}. `protocol` (protocols.Protocol or None) gives the seeds and the command line's
    --lr / --probe_batch_size overrides (_probe_settings); explicit arguments win."""
    lr, batch_size, seeds = _probe_settings(protocol, lr, batch_size, seeds)
    frames = frame_embedder(embedder)
    by_file = embed_files(frames, task)
    split_of = {i: task.splits[i] for i in by_file}
    targets = {i: frame_targets(task.events[i], t, task.classes) for i, (_, t) in by_file.items()}
    train = [(by_file[i][0], targets[i]) for i in by_file if split_of[i] == "train"]
    valid = [(task.files[i], *by_file[i]) for i in by_file if split_of[i] == "valid"]
    test = [(task.files[i], *by_file[i]) for i in by_file if split_of[i] == "test"]
    reference = {task.files[i]: task.events[i] for i in by_file}
    kept = SedTask(task.name, [task.files[i] for i in by_file], np.array([split_of[i] for i in by_file]),
                   [task.events[i] for i in by_file], task.durations_s[list(by_file)], task.classes, task.skipped)
    check_task(kept, where=f"task {task.name!r}, encoder {frames.name!r} (after files that failed to load)")
    runs = []
    for seed in seeds:
        run = sed_probe(train, valid, test, reference, task.classes, hop_s=frames.hop_s, seed=seed, lr=lr,
                        batch_size=batch_size, max_epochs=max_epochs, valid_every=valid_every, patience=patience,
                        grid=grid)
        log.info("%s, %s: SED probe seed %d: test onset F %.4f (valid %.4f, epoch %d of %d, %s)", task.name,
                 frames.name, seed, run["test"], run["valid"], run["best_epoch"], run["epochs"],
                 run["postprocessing"])
        runs.append({"seed": seed, **run})
    per_seed = np.array([r["test"] for r in runs])
    frame_counts = {s: int(sum(len(by_file[i][1]) for i in by_file if split_of[i] == s)) for s in SPLITS}
    linear = {"metric": METRIC, "lr": lr, "mean": float(per_seed.mean()),
              "ci95": probes.confidence_interval_95(per_seed),
              "std": float(per_seed.std(ddof=1)) if len(seeds) > 1 else float("nan"),
              "validation": "valid split (onset F-measure of the decoded valid files)", "per_seed": per_seed.tolist(),
              "frame_hop_seconds": frames.hop_s, "runs": runs}
    sed_record = {
        "frame_hop_seconds": frames.hop_s, "timestamps": frames.timestamps, "classes": list(task.classes),
        "frames": frame_counts, "files": {s: int(np.sum(kept.splits == s)) for s in SPLITS},
        "events": {s: int(sum(len(e) for e, sp in zip(kept.events, kept.splits) if sp == s)) for s in SPLITS},
        "decoding": {"threshold": sed_metrics.THRESHOLD, "grid": [dict(g) for g in grid],
                     "onset_collar_s": sed_metrics.ONSET_COLLAR_S, "average": "micro (over files and classes)"},
    }
    record = {"probe": "sed frame-wise linear (audiojepa/evaluation/sed.py)", "lr": lr,
              "probe_batch_frames": batch_size, "max_epochs": max_epochs, "valid_every_epochs": valid_every,
              "patience_scorings": patience, "seeds": list(seeds), "head": "linear",
              "selection": "best valid onset F-measure", "unit_sec": None,
              "knn_skipped": "SED task: frame-level probe only"}
    return {"metric": METRIC, "linear": linear, "knn": None, "sed": sed_record, "protocol": record}
