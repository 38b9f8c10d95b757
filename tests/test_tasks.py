"""Task sources: task folders (splits, folds, multi-label, bad folders), shard sets, the embedded corpus, TFDS."""

import functools
import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
import soundfile as sf

from audiojepa.data import audio_io, embedded, shards, synthetic
from audiojepa.evaluation import tasks

SR = 16000
FILE_SR = 8000  # task files are written at 8 kHz and loaded at 16 kHz: load_audio resamples


def _write_wav(path, seconds=0.25, seed=0, sr=FILE_SR):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, (0.1 * rng.standard_normal(int(seconds * sr))).astype(np.float32), sr, subtype="PCM_16")


def _task_folder(root, rows, header="filename,label,split", write=True):
    """rows: (filename, label cell, split or fold); writes the listed wavs and labels.csv."""
    root.mkdir(parents=True, exist_ok=True)
    lines = [header]
    for i, (name, label, split) in enumerate(rows):
        if write:
            _write_wav(str(root / name), seed=i)
        lines.append(f"{name},{label},{split}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


SPLIT_ROWS = [
    ("a/dog1.wav", "dog", "train"), ("a/dog2.wav", "dog", "valid"), ("dog3.wav", "dog", "test"),
    ("cat1.wav", "cat", "train"), ("cat2.wav", "cat", "test"),
    ("bird1.wav", "bird", "train"),
]


def test_split_folder(tmp_path):
    task = tasks.load_task(str(_task_folder(tmp_path / "pets", SPLIT_ROWS)), sample_rate=SR)
    assert task.name == "pets" and len(task) == 6 and task.skipped == []
    assert task.clip_ids == [r[0] for r in SPLIT_ROWS]
    assert task.classes == ["bird", "cat", "dog"] and not task.multilabel and not task.is_folds
    assert task.splits.tolist() == [r[2] for r in SPLIT_ROWS]
    assert task.labels == [[r[1]] for r in SPLIT_ROWS]
    labels = task.label_array()
    assert labels.dtype == np.int64 and labels.tolist() == [2, 2, 2, 1, 1, 0]
    audio = task.load_audio(0, SR)
    assert audio.dtype == np.float32 and audio.shape == (int(0.25 * SR),)
    expected, _ = sf.read(tmp_path / "pets" / "a" / "dog1.wav", dtype="float32")
    assert task.load_audio(0, FILE_SR).shape == expected.shape
    np.testing.assert_allclose(task.load_audio(0, FILE_SR), expected)


def test_fold_folder(tmp_path):
    rows = [(f"c{i}.wav", "yes" if i % 2 else "no", 1 + i % 3) for i in range(9)]
    task = tasks.load_task(str(_task_folder(tmp_path / "folds", rows, "filename,label,fold")), sample_rate=SR)
    assert task.is_folds and task.splits.dtype == np.int64
    assert task.splits.tolist() == [1 + i % 3 for i in range(9)]
    assert task.label_array().tolist() == [i % 2 for i in range(9)]


def test_multilabel_folder(tmp_path):
    rows = [("x1.wav", "speech;music", "train"), ("x2.wav", "music", "train"), ("x3.wav", " noise ; speech;", "train"),
            ("x4.wav", "speech;noise;speech", "test"), ("x5.wav", "music", "valid")]
    task = tasks.load_task(str(_task_folder(tmp_path / "ml", rows)), sample_rate=SR)
    assert task.multilabel and task.classes == ["music", "noise", "speech"]
    assert task.labels[2] == ["noise", "speech"] and task.labels[3] == ["speech", "noise"]
    multi_hot = task.label_array()
    assert multi_hot.shape == (5, 3) and multi_hot.dtype == np.float32
    assert multi_hot.tolist() == [[1, 0, 1], [1, 0, 0], [0, 1, 1], [0, 1, 1], [1, 0, 0]]


def test_majority_class_accuracy_of_fixed_splits_predicts_the_most_frequent_training_label():
    # train: dog 3, cat 2 (valid's cats do not count); test: dog 1, cat 2, bird 1 -> "dog" is right on 1 of 4.
    rows = [("d1.wav", "dog", "train"), ("d2.wav", "dog", "train"), ("d3.wav", "dog", "train"),
            ("c1.wav", "cat", "train"), ("c2.wav", "cat", "train"), ("c3.wav", "cat", "valid"),
            ("c4.wav", "cat", "valid"), ("c5.wav", "cat", "test"), ("c6.wav", "cat", "test"),
            ("d4.wav", "dog", "test"), ("b1.wav", "bird", "train"), ("b2.wav", "bird", "test")]
    task = tasks.Task(name="pets", clip_ids=[r[0] for r in rows], labels=[[r[1]] for r in rows],
                      splits=np.array([r[2] for r in rows]), multilabel=False, classes=["bird", "cat", "dog"],
                      skipped=[])
    assert tasks.majority_class(task) == {"label": "dog", "accuracy": 0.25, "test_clips": 4}


def test_majority_class_of_folds_is_the_mean_over_held_out_folds_and_ties_go_to_the_first_name():
    # fold 1 held out: folds 2+3 hold a x2, b x2 (a tie: "a"), fold 1 is [a, b, b] -> 1/3.
    # fold 2 held out: folds 1+3 hold a x2, b x3 -> "b"; fold 2 is [a, a] -> 0.
    # fold 3 held out: folds 1+2 hold a x3, b x2 -> "a"; fold 3 is [a, b, b] -> 1/3.
    labels = ["a", "b", "b", "a", "a", "a", "b", "b"]
    folds = [1, 1, 1, 2, 2, 3, 3, 3]
    task = tasks.Task(name="f", clip_ids=[str(i) for i in range(8)], labels=[[x] for x in labels],
                      splits=np.array(folds, dtype=np.int64), multilabel=False, classes=["a", "b"], skipped=[])
    result = tasks.majority_class(task)
    assert result["label"] is None and result["test_clips"] == 8
    assert result["accuracy"] == pytest.approx((1 / 3 + 0 + 1 / 3) / 3, abs=1e-12)


def test_a_multilabel_task_has_no_majority_class():
    task = tasks.Task(name="m", clip_ids=["x", "y"], labels=[["a", "b"], ["a"]], splits=np.array(["train", "test"]),
                      multilabel=True, classes=["a", "b"], skipped=[])
    assert tasks.majority_class(task) is None


def test_missing_labels_csv(tmp_path):
    (tmp_path / "empty_task").mkdir()
    with pytest.raises(FileNotFoundError, match="labels.csv"):
        tasks.load_task(str(tmp_path / "empty_task"), sample_rate=SR)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        tasks.load_task(str(tmp_path / "nowhere"), sample_rate=SR)


def test_missing_columns(tmp_path):
    root = _task_folder(tmp_path / "t", SPLIT_ROWS, header="filename,class,split")
    with pytest.raises(ValueError, match=r"labels\.csv.*missing column.*'label'"):
        tasks.load_task(str(root), sample_rate=SR)
    root = _task_folder(tmp_path / "t2", SPLIT_ROWS, header="filename,label,partition")
    with pytest.raises(ValueError, match="no split or fold column"):
        tasks.load_task(str(root), sample_rate=SR)


def test_bad_split_value_names_the_row(tmp_path):
    rows = SPLIT_ROWS[:1] + [("dog9.wav", "dog", "validation")] + SPLIT_ROWS[1:]
    with pytest.raises(ValueError, match=r"labels\.csv:3: split 'validation' is not one of train, valid, test"):
        tasks.load_task(str(_task_folder(tmp_path / "t", rows)), sample_rate=SR)
    rows = [("a.wav", "x", "1"), ("b.wav", "x", "two")]
    with pytest.raises(ValueError, match=r"labels\.csv:3: fold 'two'"):
        tasks.load_task(str(_task_folder(tmp_path / "f", rows, "filename,label,fold")), sample_rate=SR)


def test_unknown_and_bad_files_are_counted_skips(tmp_path):
    root = _task_folder(tmp_path / "t", SPLIT_ROWS)
    extra = [("ghost.wav", "dog", "train"), ("garbage.wav", "cat", "train"), ("void.wav", "cat", "test"),
             ("nan.wav", "bird", "train")]
    with open(root / "labels.csv", "a") as f:
        f.writelines(f"{n},{label},{s}\n" for n, label, s in extra)
    (root / "garbage.wav").write_text("not audio at all\n" * 20)
    sf.write(root / "void.wav", np.zeros(0, np.float32), FILE_SR)
    sf.write(root / "nan.wav", np.full(100, np.nan, np.float32), FILE_SR, subtype="FLOAT")
    task = tasks.load_task(str(root), sample_rate=SR)
    reasons = {s["path"]: s["reason"] for s in task.skipped}
    assert reasons == {"ghost.wav": "missing", "garbage.wav": "unreadable", "void.wav": "empty",
                       "nan.wav": "non-finite"}
    assert task.clip_ids == [r[0] for r in SPLIT_ROWS]
    assert len(task.labels) == len(task.splits) == len(task.label_array()) == 6
    # The header-only check finds what it can without decoding; samples are checked at load time.
    quick = tasks.load_task(str(root), sample_rate=SR, verify_audio="header")
    assert {s["path"]: s["reason"] for s in quick.skipped} == {
        "ghost.wav": "missing", "garbage.wav": "unreadable", "void.wav": "empty"}
    with pytest.raises(audio_io.BadAudioError, match="non-finite"):
        quick.load_audio(quick.clip_ids.index("nan.wav"), SR)


def test_silent_clips_are_kept(tmp_path):
    root = _task_folder(tmp_path / "t", SPLIT_ROWS)
    sf.write(root / "cat1.wav", np.zeros(FILE_SR // 4, np.float32), FILE_SR, subtype="PCM_16")
    task = tasks.load_task(str(root), sample_rate=SR)
    assert task.skipped == [] and not task.load_audio(3, SR).any()


def test_class_only_in_test_is_an_error(tmp_path):
    rows = SPLIT_ROWS + [("frog1.wav", "frog", "test"), ("frog2.wav", "frog", "test")]
    with pytest.raises(ValueError, match=r"'frog' \(only in test\)"):
        tasks.load_task(str(_task_folder(tmp_path / "t", rows)), sample_rate=SR)
    # A class left without training clips by a skipped file is caught the same way.
    rows = SPLIT_ROWS[:5] + [("bird1.wav", "bird", "test"), ("bird2.wav", "bird", "train")]
    root = _task_folder(tmp_path / "t2", rows)
    os.remove(root / "bird2.wav")
    with pytest.raises(ValueError, match=r"'bird' \(only in test\)"):
        tasks.load_task(str(root), sample_rate=SR)
    # Folds: a class in a single fold has no training clip when that fold is held out.
    rows = [("a.wav", "x", 1), ("b.wav", "x", 2), ("c.wav", "y", 2), ("d.wav", "y", 2)]
    with pytest.raises(ValueError, match=r"'y' \(only in 2\)"):
        tasks.load_task(str(_task_folder(tmp_path / "f", rows, "filename,label,fold")), sample_rate=SR)


def test_empty_train_split_is_an_error(tmp_path):
    rows = [(n, label, "test" if s == "train" else s) for n, label, s in SPLIT_ROWS]
    with pytest.raises(ValueError, match="train split is empty"):
        tasks.load_task(str(_task_folder(tmp_path / "t", rows)), sample_rate=SR)
    with pytest.raises(ValueError, match="at least 2 folds"):
        tasks.load_task(str(_task_folder(tmp_path / "f", [("a.wav", "x", 1)], "filename,label,fold")),
                        sample_rate=SR)


def test_duplicate_rows_and_missing_labels_are_errors(tmp_path):
    with pytest.raises(ValueError, match=r"labels\.csv:3: 'a\.wav' is listed twice \(also on line 2\)"):
        tasks.load_task(str(_task_folder(tmp_path / "d", [("a.wav", "x", "train"), ("a.wav", "x", "test")])),
                        sample_rate=SR)
    with pytest.raises(ValueError, match=r"labels\.csv:2: no label"):
        tasks.load_task(str(_task_folder(tmp_path / "l", [("a.wav", " ; ", "train")])), sample_rate=SR)


def test_shard_set_task_with_folds(tmp_path):
    rng = np.random.default_rng(0)
    clips = [(f"clip{i}", (0.1 * rng.standard_normal(4000)).astype(np.float32),
              {"label": "ab"[i % 2], "fold": str(1 + i % 3)}) for i in range(12)]
    folder = str(tmp_path / "shards")
    shards.write_shard_set(folder, clips, sample_rate=FILE_SR, num_shards=3)
    task = tasks.load_task(folder, sample_rate=SR)
    assert task.name == "shards" and task.is_folds and len(task) == 12 and task.classes == ["a", "b"]
    by_id = {cid: i for i, cid in enumerate(task.clip_ids)}
    i = by_id["clip5"]
    assert task.labels[i] == ["b"] and task.splits[i] == 3
    assert task.load_audio(i, FILE_SR).shape == (4000,) and task.load_audio(i, SR).shape == (8000,)
    np.testing.assert_allclose(task.load_audio(i, FILE_SR), clips[5][1], atol=1 / 32768)
    no_labels = str(tmp_path / "unlabelled")
    shards.write_shard_set(no_labels, [(c, w, {}) for c, w, _ in clips], sample_rate=FILE_SR, num_shards=1)
    with pytest.raises(ValueError, match="lacks 'label' and 'split'"):
        tasks.load_task(no_labels, sample_rate=SR)


def test_embedded_task_matches_the_generator(tmp_path, monkeypatch):
    monkeypatch.setenv("AUDIOJEPA_CACHE", str(tmp_path / "cache"))
    task = tasks.load_task("embedded:num_clips=96,duration_s=1", sample_rate=SR)
    assert task.name == "embedded" and len(task) == 96 and task.skipped == [] and not task.multilabel
    assert task.classes == sorted(synthetic.CLASS_NAMES)
    for clip_id, clip_labels, split in zip(task.clip_ids, task.labels, task.splits):
        index = int(clip_id.rsplit("_", 1)[1])
        assert clip_labels == [synthetic.CLASS_NAMES[index % len(synthetic.CLASS_NAMES)]]
        assert split == embedded.split_of(index)
    assert sorted(set(task.splits.tolist())) == ["test", "train", "valid"]
    assert task.load_audio(0, SR).shape == (SR,)
    assert os.listdir(tmp_path / "cache") == [os.path.basename(embedded.corpus_dir(
        sample_rate=SR, num_clips=96, duration_s=1.0, seed=0))]


def test_spec_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"bad option 'clips=3'.*num_clips=<int>"):
        tasks.load_task("embedded:clips=3", sample_rate=SR)
    with pytest.raises(ValueError, match="not a valid int"):
        tasks.load_task("embedded:num_clips=many", sample_rate=SR)
    with pytest.raises(ValueError, match="verify_audio"):
        tasks.load_task("embedded", sample_rate=SR, verify_audio="never")
    assert tasks._split_tfds_spec("tfds:nsynth/full:2.3.0:data_dir=gs://b/tfds,label_key=instrument") == (
        "nsynth/full:2.3.0", {"data_dir": "gs://b/tfds", "label_key": "instrument"})


# -- TFDS ------------------------------------------------------------------------------------------------

TFDS_CLASSES = ["bird", "cat", "dog"]
TFDS_SPLITS = {"train": 9, "validation": 3, "test": 3}


@functools.cache
def _tiny_builder_class():
    """A TFDS builder of int16 clips at 8 kHz with a ClassLabel, registered once per test session."""
    tfds = pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets (optional) is not installed")

    class TinyAudioTask(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            # A Tensor, not tfds.features.Audio: Audio cannot be built without TensorFlow (see tasks.py).
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict({
                    "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16),
                    "label": tfds.features.ClassLabel(names=TFDS_CLASSES),
                }),
                supervised_keys=("audio", "label"))

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(split, n) for split, n in TFDS_SPLITS.items()}

        def _generate_examples(self, split, n):
            for i in range(n):
                yield f"{split}{i}", {"audio": _tfds_audio(split, i), "label": i % 3}

    return TinyAudioTask


def _tfds_audio(split, i):
    rng = np.random.default_rng([len(split), i])
    return (3000 * rng.standard_normal(800 + 100 * i)).astype(np.int16)


@pytest.fixture(scope="module")
def tfds_data_dir(tmp_path_factory):
    builder_class = _tiny_builder_class()
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    builder_class(data_dir=data_dir, file_format="array_record").download_and_prepare()
    return data_dir


def _check_tfds_task(task, name):
    assert task.name == name and len(task) == 15 and task.skipped == []
    assert task.classes == TFDS_CLASSES and not task.multilabel
    ours = {"train": "train", "validation": "valid", "test": "test"}
    assert sorted(task.splits.tolist()) == sorted(ours[s] for s, n in TFDS_SPLITS.items() for _ in range(n))
    # TFDS shuffles examples when it prepares a dataset; the clip length tells which one each is.
    for index, (clip_id, clip_labels, split) in enumerate(zip(task.clip_ids, task.labels, task.splits)):
        tfds_split = clip_id.split(":")[0]
        audio = task.load_audio(index, FILE_SR)
        i = (len(audio) - 800) // 100
        assert split == ours[tfds_split] and clip_labels == [TFDS_CLASSES[i % 3]]
        np.testing.assert_allclose(audio, _tfds_audio(tfds_split, i).astype(np.float32) / 32768, atol=1e-7)
    assert task.load_audio(0, SR).shape == (2 * len(task.load_audio(0, FILE_SR)),)


def test_tfds_data_source(tfds_data_dir):
    with pytest.raises(ValueError, match="sample_rate=<Hz>"):
        tasks.load_task(f"tfds:tiny_audio_task:data_dir={tfds_data_dir}", sample_rate=SR)
    task = tasks.load_task(f"tfds:tiny_audio_task:data_dir={tfds_data_dir},sample_rate={FILE_SR}", sample_rate=SR)
    _check_tfds_task(task, "tiny_audio_task")
    with pytest.raises(ValueError, match="no feature 'sound'"):
        tasks.load_task(f"tfds:tiny_audio_task:data_dir={tfds_data_dir},audio_key=sound,sample_rate=8000",
                        sample_rate=SR)


def test_tfds_audio_feature_dataset(tfds_data_dir, tmp_path):
    """A dataset whose features.json has a tfds.features.Audio (as `tfds build` writes for audio datasets)."""
    src = os.path.join(tfds_data_dir, "tiny_audio_task", "1.0.0")
    dst = tmp_path / "tfds" / "tiny_audio_files" / "1.0.0"
    dst.mkdir(parents=True)
    for name in os.listdir(src):
        shutil.copy(os.path.join(src, name), dst / name.replace("tiny_audio_task", "tiny_audio_files"))
    info = json.loads((dst / "dataset_info.json").read_text())
    info["name"] = "tiny_audio_files"
    (dst / "dataset_info.json").write_text(json.dumps(info))
    features = json.loads((dst / "features.json").read_text())
    # Non-lazy Audio stores samples exactly as a Tensor does; only the feature description differs.
    features["featuresDict"]["features"]["audio"] = {
        "pythonClassName": "tensorflow_datasets.core.features.audio_feature.Audio",
        "audio": {"dtype": "int16", "shape": {"dimensions": ["-1"]}, "sampleRate": str(FILE_SR), "encoding": "none"}}
    (dst / "features.json").write_text(json.dumps(features))
    task = tasks.load_task(f"tfds:tiny_audio_files:data_dir={tmp_path / 'tfds'}", sample_rate=SR)
    _check_tfds_task(task, "tiny_audio_files")
    if importlib.util.find_spec("tensorflow") is None:
        # tfds.data_source cannot build the Audio feature without TensorFlow: the files were read directly.
        assert isinstance(task.audio_loader.source._files, tasks._TfdsFiles)
