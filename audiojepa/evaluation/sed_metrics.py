"""Sound event detection scoring as HEAR scores DCASE 2016 task 2: frame posteriors -> events -> onset F-measure.

Pure NumPy (and scipy's median filter); times in seconds. The facts come from hearbenchmark/hear-eval-kit
v2021.1.3 (`heareval/predictions/task_predictions.py`: `create_events_from_prediction`,
`EVENT_POSTPROCESSING_GRID`, `EventPredictionModel`; `heareval/score.py`: `event_onset_200ms_fms`) and from
sed_eval 0.2.1 (`sound_event.py`: `EventBasedMetrics`; `metric.py`), which HEAR calls:

- **Decoding** (`decode_events`), per file: posteriors [T, C] (sigmoid outputs) -> a median filter over time
  `round(median_filter_s / hop_s)` frames wide (`scipy.ndimage.median_filter` with size (width, 1) and its
  default "reflect" edges, as HEAR; width <= 1 changes nothing; an even width takes the upper of the two middle
  values, scipy's rank) -> active where posterior > `threshold` (0.5, fixed in HEAR: no per-class threshold is
  tuned) -> each run of consecutive active frames of a class is one event from the first frame's timestamp to
  the last frame's timestamp, kept when last - first >= `min_duration_s` (so a one-frame run is always dropped
  when min_duration_s > 0).
- **Post-processing grid** (`HEAR_POSTPROCESSING_GRID`): median filter 250 ms with minimum durations 125 and
  250 ms; the entry with the best validation score scores the test split (ties: the later entry, the longer
  minimum duration, as HEAR's descending sort of (score, setting) pairs).
- **Metric** (`onset_f_measure`): HEAR's `event_onset_200ms_fms` = sed_eval
  `EventBasedMetrics(t_collar=0.2, percentage_of_length=0.5, evaluate_onset=True, evaluate_offset=False)`,
  evaluated file by file and accumulated, overall (micro) F-measure. An estimated event matches a reference
  event of the same label and file when |onset difference| <= t_collar (offsets are ignored, so
  percentage_of_length plays no part); each reference and each estimate is matched at most once, and the
  matching is a maximum one (sed_eval's default "optimal" matching: Hopcroft-Karp over the hit matrix). Here
  the maximum matching comes from a sweep over onsets sorted in time (`_count_onset_matches`), which is
  optimal for windows of equal width; tests/test_sed.py compares it with a brute-force maximum matching and
  with sed_eval itself when installed. F = 2PR / (P + R) over the counts summed across files and classes;
  sed_eval's P (or R) is NaN without estimated (reference) events and HEAR turns the NaN F-measure into 0: so
  does `onset_f_measure`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import scipy.ndimage

ONSET_COLLAR_S = 0.2  # HEAR's event_onset_200ms_fms
THRESHOLD = 0.5  # HEAR's create_events_from_prediction default, never tuned
# HEAR v2021.1.3 EVENT_POSTPROCESSING_GRID ({"median_filter_ms": [250], "min_duration": [125, 250]}), in seconds.
HEAR_POSTPROCESSING_GRID = (
    {"median_filter_s": 0.25, "min_duration_s": 0.125},
    {"median_filter_s": 0.25, "min_duration_s": 0.25},
)
# Slack for comparing durations built from float timestamps (HEAR compares milliseconds; 125 ms steps in
# seconds can round to 0.12499999...).
_DURATION_TOLERANCE_S = 1e-9


class Event(NamedTuple):
    """One sound event: onset and offset in seconds from the start of its file, and its class name."""

    onset: float
    offset: float
    label: str


def median_filter_width(median_filter_s: float, hop_s: float) -> int:
    """Frames in HEAR's median filter: round(median_filter_s / hop_s) (0 or 1: no filtering)."""
    if median_filter_s <= 0:
        return 0
    return round(median_filter_s / hop_s)


def median_filter_frames(posteriors: np.ndarray, width: int) -> np.ndarray:
    """posteriors [T, C] -> [T, C], each class's sequence median-filtered over `width` frames
    (scipy.ndimage.median_filter, size (width, 1), "reflect" edges); width <= 1 returns them unchanged."""
    posteriors = np.asarray(posteriors)
    if width <= 1 or posteriors.shape[0] < 2:
        return posteriors
    return scipy.ndimage.median_filter(posteriors, size=(width, 1))


def active_runs(active: np.ndarray) -> list[tuple[int, int]]:
    """active [T] bool -> [(first, last)] frame indices (inclusive) of each run of consecutive True values."""
    padded = np.concatenate([[False], np.asarray(active, bool), [False]])
    changes = np.flatnonzero(padded[1:] != padded[:-1])
    return [(int(first), int(end) - 1) for first, end in zip(changes[::2], changes[1::2])]


def decode_events(posteriors: np.ndarray, times_s: np.ndarray, classes: Sequence[str], *, hop_s: float,
                  median_filter_s: float, min_duration_s: float, threshold: float = THRESHOLD) -> list[Event]:
    """One file's frame posteriors -> its events, as HEAR decodes them (module docstring).

    Args:
      posteriors: [T, C] class probabilities per frame (sigmoid outputs).
      times_s: [T] increasing timestamps of the frames, seconds.
      classes: the C class names.
      hop_s: seconds between frames (sets the median filter's width).
      median_filter_s, min_duration_s: the post-processing setting (HEAR_POSTPROCESSING_GRID).
      threshold: a frame is active where its posterior is strictly greater.
    Returns:
      events sorted by onset (then class), each from its first active frame's timestamp to its last one's.
    """
    posteriors = np.asarray(posteriors)
    times_s = np.asarray(times_s, np.float64)
    if posteriors.ndim != 2 or posteriors.shape != (len(times_s), len(classes)):
        raise ValueError(f"posteriors must be [T, C] = [{len(times_s)}, {len(classes)}] (timestamps, classes); "
                         f"got {posteriors.shape}")
    active = median_filter_frames(posteriors, median_filter_width(median_filter_s, hop_s)) > threshold
    events = []
    for c, label in enumerate(classes):
        for first, last in active_runs(active[:, c]):
            onset, offset = float(times_s[first]), float(times_s[last])
            if offset - onset >= min_duration_s - _DURATION_TOLERANCE_S:
                events.append(Event(onset, offset, label))
    return sorted(events, key=lambda e: (e.onset, e.label))


def _count_onset_matches(reference_onsets: np.ndarray, estimated_onsets: np.ndarray, t_collar: float) -> int:
    """Size of a maximum matching between reference and estimated onsets (one class of one file, each sorted
    ascending), where a pair may match when |reference - estimate| <= t_collar.

    Every reference's window [r - t_collar, r + t_collar] has the same width, so windows sorted by start are
    also sorted by end; giving each reference in turn the earliest unmatched estimate inside its window is then
    a maximum matching (the classic interval-point exchange argument). Estimates left of the current window are
    left of every later window too and are passed for good. The window test is sed_eval's own,
    |r - e| <= t_collar in float64, so boundary cases round as there.
    """
    matches, j = 0, 0
    for r in reference_onsets:
        while j < len(estimated_onsets) and estimated_onsets[j] < r and abs(r - estimated_onsets[j]) > t_collar:
            j += 1
        if j < len(estimated_onsets) and abs(r - estimated_onsets[j]) <= t_collar:
            matches += 1
            j += 1
    return matches


def _f_measure(correct: int, n_ref: int, n_est: int) -> tuple[float, float, float]:
    """(F, precision, recall); P / R are NaN without estimates / references (sed_eval), F is then 0 (HEAR)."""
    precision = correct / n_est if n_est else math.nan
    recall = correct / n_ref if n_ref else math.nan
    if math.isnan(precision) or math.isnan(recall) or precision + recall == 0:
        return 0.0, precision, recall
    return 2 * precision * recall / (precision + recall), precision, recall


def onset_f_measure(reference: Mapping[str, Iterable[Event]], estimated: Mapping[str, Iterable[Event]], *,
                    t_collar: float = ONSET_COLLAR_S) -> dict:
    """HEAR's event-based onset F-measure (module docstring) of `estimated` against `reference` events.

    Args:
      reference, estimated: {file: events}; a file missing from one side has no events there. Events are
        `Event`s or (onset, offset, label) tuples, seconds.
      t_collar: onset tolerance, seconds.
    Returns:
      {"f_measure" (micro, over all files and classes), "precision", "recall" (NaN where undefined),
       "n_ref", "n_est", "n_correct", "per_class": {label: {"f_measure", "precision", "recall", "n_ref", "n_est",
       "n_correct"}} (labels of either side), "macro_f_measure" (mean of per_class F over the labels with a
       reference event; NaN without any)}.
    """
    counts: dict[str, list[int]] = {}  # label -> [n_ref, n_est, n_correct]
    for file in sorted(set(reference) | set(estimated)):
        by_label: dict[str, tuple[list[float], list[float]]] = {}
        for side, events in ((0, reference.get(file, ())), (1, estimated.get(file, ()))):
            for event in events:
                onset, _, label = event
                by_label.setdefault(label, ([], []))[side].append(float(onset))
        for label, (ref_onsets, est_onsets) in by_label.items():
            matched = _count_onset_matches(np.sort(ref_onsets), np.sort(est_onsets), t_collar)
            entry = counts.setdefault(label, [0, 0, 0])
            entry[0] += len(ref_onsets)
            entry[1] += len(est_onsets)
            entry[2] += matched
    per_class = {}
    for label, (n_ref, n_est, correct) in sorted(counts.items()):
        f, p, r = _f_measure(correct, n_ref, n_est)
        per_class[label] = {"f_measure": f, "precision": p, "recall": r, "n_ref": n_ref, "n_est": n_est,
                            "n_correct": correct}
    n_ref, n_est, correct = (sum(c[i] for c in counts.values()) for i in range(3))
    f, p, r = _f_measure(correct, n_ref, n_est)
    with_reference = [c["f_measure"] for c in per_class.values() if c["n_ref"]]
    return {"f_measure": f, "precision": p, "recall": r, "n_ref": n_ref, "n_est": n_est, "n_correct": correct,
            "per_class": per_class, "macro_f_measure": float(np.mean(with_reference)) if with_reference else math.nan}


def best_postprocessing(posteriors_by_file: Mapping[str, np.ndarray], times_by_file: Mapping[str, np.ndarray],
                        reference: Mapping[str, Iterable[Event]], classes: Sequence[str], *, hop_s: float,
                        grid: Sequence[Mapping[str, float]] = HEAR_POSTPROCESSING_GRID,
                        t_collar: float = ONSET_COLLAR_S) -> tuple[dict, dict, dict]:
    """The post-processing setting of `grid` whose decoded events score best against `reference` (ties: the
    later setting, as HEAR). Returns (setting, its onset_f_measure result, {file: its events})."""
    if not grid:
        raise ValueError("the post-processing grid is empty")
    best = None
    for setting in grid:
        estimated = {file: decode_events(posteriors_by_file[file], times_by_file[file], classes, hop_s=hop_s,
                                         **setting) for file in posteriors_by_file}
        score = onset_f_measure(reference, estimated, t_collar=t_collar)
        if best is None or score["f_measure"] >= best[1]["f_measure"]:
            best = (dict(setting), score, estimated)
    return best
