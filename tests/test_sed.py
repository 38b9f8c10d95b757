"""Sound event detection tasks (audiojepa/evaluation/sed.py, sed_metrics.py): the onset F-measure, decoding,
the task format, frames, and the evaluation end to end."""

import json
import math

import numpy as np
import pytest
import soundfile as sf

from audiojepa.evaluation import sed, sed_metrics
from audiojepa.evaluation.sed_metrics import Event

SR = 16000


def _write_csv(path, header, rows):
    path.write_text("\n".join([header, *rows]) + "\n")


def sed_task_folder(root, *, n_files=24, seconds=3.0):
    """Tone bursts of two classes at known times: "low" (500 Hz, 0.8 s from 0.3-0.7 s) and "high" (3 kHz, 0.8 s
    from 1.6-1.75 s) in quiet noise; every sixth file has no event. Files 0-11 train, 12-17 valid, 18-23 test."""
    root.mkdir()
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * SR)) / SR
    events, splits = [], []
    for i in range(n_files):
        wave = 0.003 * rng.standard_normal(len(t))
        bursts = [] if i % 6 == 5 else [(0.3 + 0.1 * (i % 5), "low", 500.0), (1.6 + 0.05 * (i % 4), "high", 3000.0)]
        for onset, label, freq in bursts:
            on = (t >= onset) & (t < onset + 0.8)
            wave[on] += 0.3 * np.sin(2 * np.pi * freq * t[on])
            events.append(f"f{i:02d}.wav,{onset:.2f},{onset + 0.8:.2f},{label}")
        sf.write(root / f"f{i:02d}.wav", wave.astype(np.float32), SR)
        splits.append(f"f{i:02d}.wav,{'train' if i < 12 else 'valid' if i < 18 else 'test'}")
    _write_csv(root / "events.csv", "filename,onset,offset,label", events)
    _write_csv(root / "splits.csv", "filename,split", splits)
    return root


# -- the onset F-measure -------------------------------------------------------------------------------------


def test_onset_f_measure_hand_worked():
    """One file, 3 references, 5 estimates worked out by hand:
    dog@1.0 <- dog@1.1 (in the 200 ms collar) and dog@1.15 (also in it, but the reference is taken: a false
    positive); dog@3.0 <- dog@3.3 (300 ms late: no match); cat@5.0 <- dog@5.0 (wrong label: no) and cat@5.1 (yes).
    Correct 2 of 3 references and 5 estimates: P 2/5, R 2/3, micro F 1/2. Per class: dog 1 of 2 refs and 4
    estimates, F 1/3; cat 1 of 1 and 1, F 1; macro 2/3 (not the micro F)."""
    reference = {"a": [Event(1.0, 2.0, "dog"), Event(3.0, 4.0, "dog"), Event(5.0, 6.0, "cat")]}
    estimated = {"a": [Event(1.1, 1.5, "dog"), Event(1.15, 2.0, "dog"), Event(3.3, 4.0, "dog"),
                       Event(5.0, 6.0, "dog"), Event(5.1, 5.2, "cat")]}
    score = sed_metrics.onset_f_measure(reference, estimated)
    assert (score["n_ref"], score["n_est"], score["n_correct"]) == (3, 5, 2)
    assert score["precision"] == pytest.approx(2 / 5) and score["recall"] == pytest.approx(2 / 3)
    assert score["f_measure"] == pytest.approx(0.5)
    assert score["per_class"]["dog"]["f_measure"] == pytest.approx(1 / 3)
    assert score["per_class"]["cat"]["f_measure"] == pytest.approx(1.0)
    assert score["macro_f_measure"] == pytest.approx(2 / 3)


def test_onset_collar_offsets_files_and_empty_sides():
    def f(ref, est, **kw):
        return sed_metrics.onset_f_measure({"a": ref}, {"a": est}, **kw)["f_measure"]

    ref = [Event(1.0, 2.0, "x")]
    assert f(ref, [Event(1.2, 9.0, "x")]) == 1.0  # |1.0 - 1.2| = 0.2: on the collar counts; the offset is ignored
    assert f(ref, [Event(0.8, 0.9, "x")]) == 1.0  # early by the collar too
    assert f(ref, [Event(1.21, 2.0, "x")]) == 0.0  # just outside
    assert f(ref, [Event(1.21, 2.0, "x")], t_collar=0.25) == 1.0
    # Two references 0.3 s apart and two estimates between them: a maximum matching pairs all four.
    assert f([Event(1.0, 2.0, "x"), Event(1.3, 2.0, "x")], [Event(1.15, 2.0, "x"), Event(1.19, 2.0, "x")]) == 1.0
    # An estimate in another file never matches.
    cross = sed_metrics.onset_f_measure({"a": ref, "b": []}, {"a": [], "b": [Event(1.0, 2.0, "x")]})
    assert (cross["n_correct"], cross["f_measure"]) == (0, 0.0)
    # No estimate: precision undefined (NaN, sed_eval) and F 0 (HEAR turns NaN into 0); no reference: likewise.
    silent = sed_metrics.onset_f_measure({"a": ref}, {})
    assert math.isnan(silent["precision"]) and silent["recall"] == 0.0 and silent["f_measure"] == 0.0
    assert sed_metrics.onset_f_measure({}, {"a": ref})["f_measure"] == 0.0


def _max_matching(reference, estimated, t_collar):
    """Independent reference: scipy's maximum bipartite matching over the (file, label, |onset diff| <= collar)
    hit matrix, as sed_eval's "optimal" matching builds it."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_bipartite_matching

    refs = [(f, e) for f, events in reference.items() for e in events]
    ests = [(f, e) for f, events in estimated.items() for e in events]
    hits = np.array([[f == g and e.label == d.label and abs(e.onset - d.onset) <= t_collar for g, d in ests]
                     for f, e in refs], dtype=np.int8).reshape(len(refs), len(ests))
    return int(np.sum(maximum_bipartite_matching(csr_matrix(hits), perm_type="column") >= 0))


def _random_events(rng, files=3, labels=("a", "b"), count=6, span=2.0):
    out = {}
    for f in range(files):
        onsets = np.round(rng.uniform(0, span, rng.integers(0, count + 1)), 2)
        out[f"f{f}"] = [Event(float(o), float(o) + 0.5, str(rng.choice(labels))) for o in onsets]
    return out


def test_onset_matching_is_a_maximum_matching():
    rng = np.random.default_rng(0)
    for _ in range(300):
        reference, estimated = _random_events(rng), _random_events(rng)
        score = sed_metrics.onset_f_measure(reference, estimated)
        assert score["n_correct"] == _max_matching(reference, estimated, 0.2)


def test_onset_f_measure_matches_sed_eval():
    """HEAR's metric itself: sed_eval EventBasedMetrics(t_collar=0.2, percentage_of_length=0.5,
    evaluate_onset=True, evaluate_offset=False), file by file, overall and class-wise F (NaN as 0, as HEAR).
    sed_eval is not a dependency (its dcase_util needs pkg_resources); skipped where it is not installed."""
    sed_eval = pytest.importorskip("sed_eval")
    rng = np.random.default_rng(1)
    for trial in range(40):
        reference, estimated = _random_events(rng, files=4), _random_events(rng, files=4)
        labels = sorted({e.label for events in (*reference.values(), *estimated.values()) for e in events}) or ["a"]
        metrics = sed_eval.sound_event.EventBasedMetrics(event_label_list=labels, t_collar=0.2,
                                                         percentage_of_length=0.5, evaluate_onset=True,
                                                         evaluate_offset=False)
        for file in reference:
            def as_list(events, file=file):
                return [{"event_label": e.label, "event_onset": e.onset, "event_offset": e.offset, "file": file}
                        for e in events]
            metrics.evaluate(reference_event_list=as_list(reference[file]),
                             estimated_event_list=as_list(estimated[file]))
        theirs = metrics.results_overall_metrics()["f_measure"]["f_measure"]
        ours = sed_metrics.onset_f_measure(reference, estimated)
        assert ours["f_measure"] == pytest.approx(0.0 if math.isnan(theirs) else theirs, abs=1e-12), trial
        class_wise = metrics.results_class_wise_metrics()
        for label, result in ours["per_class"].items():
            theirs = class_wise[label]["f_measure"]["f_measure"]
            assert result["f_measure"] == pytest.approx(0.0 if math.isnan(theirs) else theirs, abs=1e-12)


# -- decoding -------------------------------------------------------------------------------------------------


def _median_filter_numpy(x, width):
    """scipy.ndimage.median_filter(x, size=(width, 1)) transcribed: each column padded half-sample symmetric
    ("reflect" in scipy's words), window i = padded[i : i + width] with width // 2 before i, the value of rank
    width // 2 (for an even width the upper of the two middle values)."""
    pad = np.pad(x, ((width // 2, width - 1 - width // 2), (0, 0)), mode="symmetric")
    return np.stack([np.sort(pad[i:i + width], axis=0)[width // 2] for i in range(len(x))])


def _decode_numpy(posteriors, times, classes, hop_s, median_filter_s, min_duration_s):
    width = round(median_filter_s / hop_s)
    smooth = _median_filter_numpy(posteriors, width) if width > 1 else posteriors
    events = []
    for c, label in enumerate(classes):
        start = None
        for i, on in enumerate(list(smooth[:, c] > 0.5) + [False]):
            if on and start is None:
                start = i
            if not on and start is not None:
                if times[i - 1] - times[start] >= min_duration_s - 1e-9:
                    events.append(Event(float(times[start]), float(times[i - 1]), label))
                start = None
    return sorted(events, key=lambda e: (e.onset, e.label))


def test_decoding_matches_a_numpy_transcription():
    rng = np.random.default_rng(0)
    classes = ["a", "b", "c"]
    for hop_s in (0.16, 0.05, 0.04):  # median filter 250 ms: 2, 5 and 6 frames (even and odd widths)
        for _ in range(20):
            # Smooth-ish random posteriors so that runs of several frames occur.
            posteriors = np.clip(np.cumsum(rng.normal(0, 0.25, (40, 3)), axis=0) % 1.4, 0, 1)
            times = 0.075 + hop_s * np.arange(40)
            for setting in sed_metrics.HEAR_POSTPROCESSING_GRID:
                ours = sed_metrics.decode_events(posteriors, times, classes, hop_s=hop_s, **setting)
                assert ours == _decode_numpy(posteriors, times, classes, hop_s, **setting)
    for width in (2, 3, 4, 5):
        x = rng.uniform(size=(17, 2))
        np.testing.assert_array_equal(sed_metrics.median_filter_frames(x, width), _median_filter_numpy(x, width))


def test_decoding_hand_worked():
    """Frames 160 ms apart: "x" on at frames 2-5, a one-frame blip at 8; the 250 ms filter (2 frames: the upper
    of each pair = max(previous, current)) lengthens runs by one frame: 2-6 (0.32-0.96 s) and 8-9 (1.28-1.44 s,
    160 ms long: kept with min_duration 125 ms, dropped with 250 ms)."""
    p = np.zeros((12, 1))
    p[2:6, 0] = 0.9
    p[8, 0] = 0.8
    times = 0.16 * np.arange(12)
    short = sed_metrics.decode_events(p, times, ["x"], hop_s=0.16, median_filter_s=0.25, min_duration_s=0.125)
    assert short == [Event(0.32, pytest.approx(0.96), "x"), Event(1.28, 1.44, "x")]
    long = sed_metrics.decode_events(p, times, ["x"], hop_s=0.16, median_filter_s=0.25, min_duration_s=0.25)
    assert long == [Event(0.32, pytest.approx(0.96), "x")]
    assert sed_metrics.decode_events(p, times, ["x"], hop_s=0.16, median_filter_s=0.0, min_duration_s=0.0) == [
        Event(0.32, 0.8, "x"), Event(1.28, 1.28, "x")]


# -- the task format -----------------------------------------------------------------------------------------


def _small_folder(root, events, splits=None, seconds=1.0):
    root.mkdir()
    splits = splits or ["a.wav,train", "b.wav,valid", "c.wav,test", "quiet.wav,train"]
    for row in splits:
        sf.write(root / row.split(",")[0], np.zeros(int(seconds * SR), np.float32), SR)
    _write_csv(root / "splits.csv", "filename,split", splits)
    _write_csv(root / "events.csv", "filename,onset,offset,label", events)
    return root


GOOD_EVENTS = ["a.wav,0.1,0.5,dog", "b.wav,0.2,0.4,dog", "c.wav,0.0,0.9,dog", "a.wav,0.3,0.6,cat"]


def test_task_folder_is_read_with_event_free_files(tmp_path):
    root = _small_folder(tmp_path / "t", GOOD_EVENTS)
    task = sed.load_sed_task(str(root), sample_rate=SR)
    assert task.name == "t" and task.classes == ["cat", "dog"]
    assert task.files == ["a.wav", "b.wav", "c.wav", "quiet.wav"]
    assert task.splits.tolist() == ["train", "valid", "test", "train"]
    assert task.events[0] == [Event(0.1, 0.5, "dog"), Event(0.3, 0.6, "cat")] and task.events[3] == []
    np.testing.assert_allclose(task.durations_s, 1.0)
    assert sed.is_sed_task(str(root)) and not sed.is_sed_task(str(tmp_path))


@pytest.mark.parametrize("events, splits, message", [
    (["a.wav,0.5,0.5,dog"], None, r"events\.csv:2: offset 0\.5 s is not after onset 0\.5 s"),
    (GOOD_EVENTS + ["a.wav,-0.1,0.5,dog"], None, r"events\.csv:6: onset -0\.1 s is negative"),
    (["a.wav,0.1,soon,dog"], None, r"events\.csv:2: offset 'soon' is not a number of seconds"),
    (["a.wav,0.1,0.2,"], None, r"events\.csv:2: empty label"),
    (["d.wav,0.1,0.2,dog"], None, r"events\.csv:2: 'd\.wav' is not listed in splits\.csv"),
    (["a.wav,100,200,dog"], None, r"events\.csv:2: onset 100 s is at or past the end of 'a\.wav' \(1 s long\)"),
    (GOOD_EVENTS, ["a.wav,train", "b.wav,dev", "c.wav,test"], r"splits\.csv:3: split 'dev' of 'b\.wav' is not one"),
    (GOOD_EVENTS, ["a.wav,train", "b.wav,valid", "c.wav,test", "a.wav,test"],
     r"splits\.csv:5: 'a\.wav' is listed twice"),
    (GOOD_EVENTS[:1] + ["c.wav,0.1,0.2,dog"], ["a.wav,train", "b.wav,train", "c.wav,test"],
     r"no usable file in the 'valid' split"),
    (["a.wav,0.1,0.5,dog", "c.wav,0.1,0.2,dog"], None, r"the 'valid' split has 1 usable files but no event"),
    (GOOD_EVENTS + ["c.wav,0.1,0.2,bird"], None, r"class\(es\) \['bird'\] have events only in \['test'\]"),
])
def test_bad_task_folders_name_the_file_and_line(tmp_path, events, splits, message):
    root = _small_folder(tmp_path / "t", events, splits)
    with pytest.raises(ValueError, match=message):
        sed.load_sed_task(str(root), sample_rate=SR)


def test_missing_or_bad_audio_is_skipped_and_counted(tmp_path):
    root = _small_folder(tmp_path / "t", GOOD_EVENTS + ["quiet.wav,0.1,0.2,cat"])
    (root / "quiet.wav").unlink()
    (root / "a.wav").write_bytes(b"not audio")
    splits = (root / "splits.csv").read_text().strip().splitlines() + ["e.wav,train"]
    sf.write(root / "e.wav", np.zeros(SR, np.float32), SR)
    (root / "splits.csv").write_text("\n".join(splits) + "\n")
    (root / "events.csv").write_text((root / "events.csv").read_text() + "e.wav,0.1,0.4,dog\ne.wav,0.2,0.3,cat\n")
    task = sed.load_sed_task(str(root), sample_rate=SR)
    assert task.files == ["b.wav", "c.wav", "e.wav"]
    assert sorted((s["path"], s["reason"]) for s in task.skipped) == [("a.wav", "unreadable"), ("quiet.wav", "missing")]
    assert "splits.csv:5" in next(s["detail"] for s in task.skipped if s["path"] == "quiet.wav")
    # Without e.wav no training file is left.
    (root / "e.wav").unlink()
    with pytest.raises(ValueError, match=r"no usable file in the 'train' split \(3 skipped\)"):
        sed.load_sed_task(str(root), sample_rate=SR)


def test_a_folder_with_both_csv_files_is_refused(tmp_path):
    root = _small_folder(tmp_path / "t", GOOD_EVENTS)
    _write_csv(root / "labels.csv", "filename,label,split", ["a.wav,dog,train"])
    with pytest.raises(ValueError, match="holds both labels.csv"):
        sed.load_sed_task(str(root), sample_rate=SR)


# -- frames ---------------------------------------------------------------------------------------------------


def test_frame_targets_include_the_offset():
    times = np.array([0.0, 0.16, 0.32, 0.48, 0.64])
    targets = sed.frame_targets([Event(0.16, 0.48, "b"), Event(0.5, 0.6, "a")], times, ["a", "b"])
    np.testing.assert_array_equal(targets, [[0, 0], [0, 1], [0, 1], [0, 1], [0, 0]])


def test_logmel_frames_average_windows_at_their_centres():
    from audiojepa.data import stats
    from audiojepa.ops import frontend

    params = frontend.get_preset("m2d")
    frames = sed.LogMelFrames(params, (-7.1, 4.2), "logmel")
    waveform = np.random.default_rng(0).standard_normal(SR + 800).astype(np.float32) * 0.1  # 1.05 s: 106 frames
    features, times = frames.frames(waveform)
    lms = stats.normalize(frontend.logmel_host(waveform[None], params), -7.1, 4.2)[0]
    assert lms.shape[1] == 106 and features.shape == (7, 80) and frames.hop_s == pytest.approx(0.16)
    np.testing.assert_allclose(features[1], lms[:, 16:32].mean(axis=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(features[6], lms[:, 96:].mean(axis=1), rtol=1e-5, atol=1e-5)  # the last 10 frames
    np.testing.assert_allclose(times[:2], [0.075, 0.235])  # centres of frames 0..15 and 16..31 (10 ms apart)
    assert times[6] == pytest.approx(1.005)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A tiny M2D encoder (80 x 48 training crops: 3 patches a chunk) at random init, exported (jitted init: a few
    seconds, where `embedders.random_encoder` initialises op by op)."""
    import jax

    from audiojepa.adapters import encoder
    from audiojepa.methods import m2d
    from audiojepa.ops import frontend

    config = m2d.default_config("tiny")
    method = m2d.M2D(config, input_shape=(80, 48))
    params = jax.jit(method.encoder.init)(jax.random.key(0), np.zeros((1, 80, 48), np.float32))["params"]
    enc = encoder.AudioEncoder("m2d", config, (80, 48), frontend.get_preset("m2d"), (-7.1, 4.2), {"encoder": params})
    return enc.save(str(tmp_path_factory.mktemp("export")))


@pytest.fixture(scope="module")
def tiny_encoder(tiny_export):
    from audiojepa.adapters import encoder

    return encoder.load_encoder(tiny_export)


def test_encoder_frames_are_embed_waveform_at_patch_centres(tiny_encoder):
    """The frames are `embed_waveform`'s, timestamped at the centres of their 16-frame patches (frame k of the
    log-mel centred at k x 10 ms): 75 ms + i x 160 ms, a mostly-padding last step left out (HEAR's "native")."""
    frames = sed.EncoderFrames(tiny_encoder, "tiny")
    assert frames.hop_s == pytest.approx(0.16) and frames.sample_rate == SR
    # 1.2 s: 121 log-mel frames, 8 steps, the last centred at 1.195 s (kept); 1.13 s: 114 frames, 8 steps, the last
    # centred past the end (left out).
    for seconds, steps in ((2.0, 13), (1.2, 8), (1.13, 7)):
        waveform = np.random.default_rng(0).standard_normal(int(seconds * SR)).astype(np.float32) * 0.1
        features, times = frames.frames(waveform)
        np.testing.assert_allclose(times, 0.075 + 0.16 * np.arange(steps), rtol=0, atol=1e-6)
        np.testing.assert_allclose(features, tiny_encoder.embed_waveform(waveform[None])[0][0][:steps],
                                   rtol=1e-6, atol=1e-6)


# -- end to end -----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_evaluate_scores_an_sed_task_end_to_end(tmp_path, tiny_export):
    """The evaluation CLI's `run` on the synthetic tones, for a tiny random encoder and for the log-mel baseline.
    The log-mel frames separate the tones, so their onset F-measure is high: the whole chain (frames, targets,
    probe, decoding, metric, report) works. The probe takes 64-frame steps (--probe_batch_size): with HEAR's 1024
    this task's 230 training frames would make one step an epoch. (The floors are left out, `baselines=False`:
    the random-init floor initialises op by op, ~20 s here; the SED path is the same for every row.)"""
    from audiojepa import evaluate

    task = sed_task_folder(tmp_path / "tones")
    out = tmp_path / "report"
    results = evaluate.run(tiny_export, [str(task)], str(out), baselines=False, seeds=(0,), probe_batch_size=64)
    assert set(results) == {tiny_export}
    main = json.loads((out / "results.json").read_text())["tones"]
    assert main["metric"] == "onset_fms" and main["knn"] is None
    assert 0.0 <= main["linear"]["mean"] <= 1.0 and main["linear"]["metric"] == "onset_fms"
    assert main["sed"]["frame_hop_seconds"] == pytest.approx(0.16)
    assert main["sed"]["files"] == {"train": 12, "valid": 6, "test": 6}
    assert main["sed"]["events"] == {"train": 20, "valid": 10, "test": 10}
    assert main["protocol"]["probe_batch_frames"] == 64
    assert main["linear"]["runs"][0]["postprocessing"] in [dict(g) for g in sed_metrics.HEAR_POSTPROCESSING_GRID]
    report = (out / "results.md").read_text()
    assert "onset_fms (1 seed), 160 ms frames" in report and "sound event detection" in report

    logmel = evaluate.run("logmel", [str(task)], str(tmp_path / "logmel"), seeds=(0, 1), probe_batch_size=64)
    linear = logmel["logmel"]["tones"]["linear"]
    assert linear["mean"] > 0.8 and min(linear["per_seed"]) > 0.8, linear


def test_the_probe_learns_the_tones_and_not_swapped_labels(tmp_path):
    """A negative control for the pipeline: log-mel frames of the tones with the right training targets score
    high; with "low" and "high" swapped in training only, the probe detects each tone as the other class and
    scores near 0."""
    from audiojepa.ops import frontend

    task = sed.load_sed_task(str(sed_task_folder(tmp_path / "tones")), sample_rate=SR)
    frames = sed.LogMelFrames(frontend.get_preset("m2d"), (-7.1, 4.2), "logmel")
    by_file = sed.embed_files(frames, task)
    files = {s: [i for i in by_file if task.splits[i] == s] for s in ("train", "valid", "test")}
    valid = [(task.files[i], *by_file[i]) for i in files["valid"]]
    test = [(task.files[i], *by_file[i]) for i in files["test"]]
    reference = {task.files[i]: task.events[i] for i in by_file}
    scores = []
    for classes in (task.classes, task.classes[::-1]):
        train = [(by_file[i][0], sed.frame_targets(task.events[i], by_file[i][1], classes)) for i in files["train"]]
        run = sed.sed_probe(train, valid, test, reference, task.classes, hop_s=frames.hop_s, seed=0, batch_size=64)
        scores.append(run["test"])
    assert scores[0] > 0.8 and scores[1] < 0.2, scores


def test_sed_tasks_refuse_every_layer_before_embedding(tmp_path, tiny_export):
    from audiojepa import evaluate

    task = _small_folder(tmp_path / "t", GOOD_EVENTS)
    with pytest.raises(ValueError, match=r"SED task, which takes one layer's frames"):
        evaluate.run(tiny_export, [str(task)], str(tmp_path / "out"), layer="all", baselines=False, seeds=(0,))
