"""Linear probe, kNN, metrics and task evaluation on synthetic embeddings, against sklearn."""

import math

import numpy as np
import scipy.stats
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score
from sklearn.neighbors import NearestNeighbors
from sklearn.preprocessing import StandardScaler

from audiojepa.evaluation import probes


def gaussian_blobs(num_classes, per_class, dim, separation, seed):
    """Class centres ~ N(0, separation^2 I), unit-variance noise; rows shuffled.

    Returns x: [num_classes * per_class, dim] float32, y: [num_classes * per_class] int.
    """
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim)) * separation
    y = np.repeat(np.arange(num_classes), per_class)
    x = centres[y] + rng.normal(size=(len(y), dim))
    order = rng.permutation(len(y))
    return x[order].astype(np.float32), y[order]


def fixed_split(n):
    """70 % train / 10 % valid / 20 % test as slices of n rows."""
    return slice(0, int(0.7 * n)), slice(int(0.7 * n), int(0.8 * n)), slice(int(0.8 * n), n)


def multilabel_data(n, num_classes, dim, seed):
    """Independent Bernoulli(0.3) labels, embeddings a noisy linear image of the label vector.

    Returns x: [n, dim] float32, y: [n, num_classes] multi-hot float32.
    """
    rng = np.random.default_rng(seed)
    y = (rng.random((n, num_classes)) < 0.3).astype(np.float32)
    mixing = rng.normal(size=(num_classes, dim)) * 2.0
    x = y @ mixing + rng.normal(size=(n, dim))
    return x.astype(np.float32), y


# ----------------------------------------------------------------------------------------------
# Metrics


def test_mean_average_precision_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    y = (rng.random((300, 12)) < 0.2).astype(int)
    y[:, 0] = 0
    y[5, 0] = 1  # a class with a single positive
    scores = np.round(rng.random((300, 12)), 1)  # coarse scores: many tied thresholds
    expected = average_precision_score(y, scores, average=None)
    np.testing.assert_allclose(probes.average_precision_per_class(y, scores), expected,
                               atol=1e-6)
    assert probes.mean_average_precision(y, scores) == pytest.approx(
        average_precision_score(y, scores, average="macro"), abs=1e-6)


def test_mean_average_precision_skips_classes_without_positives():
    rng = np.random.default_rng(1)
    y = (rng.random((200, 6)) < 0.3).astype(int)
    y[:, 2] = 0
    scores = rng.normal(size=(200, 6))
    has_positive = y.sum(axis=0) > 0
    expected = average_precision_score(y[:, has_positive], scores[:, has_positive],
                                       average="macro")
    assert probes.mean_average_precision(y, scores) == pytest.approx(expected, abs=1e-6)


def test_accuracy():
    scores = np.array([[0.1, 0.9], [0.8, 0.2], [0.4, 0.6]])
    assert probes.accuracy(np.array([1, 0, 0]), scores) == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------------------------
# Linear probe


def sklearn_logistic_accuracy(x, y, train, test):
    scaler = StandardScaler().fit(x[train])
    model = LogisticRegression(max_iter=2000).fit(scaler.transform(x[train]), y[train])
    return model.score(scaler.transform(x[test]), y[test])


@pytest.mark.parametrize("separation, lo, hi", [(1.0, 0.97, 1.0), (0.02, 0.1, 0.32)])
def test_linear_probe_agrees_with_logistic_regression(separation, lo, hi):
    # 5 classes, dim 32; well separated -> ~1.0, heavily overlapping -> chance (0.2). The probe
    # and sklearn's L2-regularised logistic regression land within 0.06 of each other (measured:
    # 0.995 vs 0.995 and 0.190 vs 0.205; 400 test clips, so 0.06 is ~2.5 standard errors).
    x, y = gaussian_blobs(5, 400, 32, separation, seed=0)
    train, valid, test = fixed_split(len(y))
    ours = probes.linear_probe(x[train], y[train], x[valid], y[valid], x[test], y[test],
                               multilabel=False, num_classes=5, seed=42)
    reference = sklearn_logistic_accuracy(x, y, train, test)
    assert abs(ours["test"] - reference) <= 0.06, (ours, reference)
    assert lo <= ours["test"] <= hi
    assert 1 <= ours["best_epoch"] <= ours["epochs"] <= probes.MAX_EPOCHS


def test_linear_probe_multilabel_learns_separable_problem():
    x, y = multilabel_data(600, 6, 24, seed=0)
    train, valid, test = fixed_split(len(y))
    result = probes.linear_probe(x[train], y[train], x[valid], y[valid], x[test], y[test],
                                 multilabel=True, num_classes=6, seed=42)
    assert result["test"] > 0.9, result


def test_linear_probe_seeds():
    x, y = gaussian_blobs(5, 400, 32, 0.1, seed=3)
    train, valid, test = fixed_split(len(y))

    def run(seed):
        return probes.linear_probe(x[train], y[train], x[valid], y[valid], x[test], y[test],
                                   multilabel=False, num_classes=5, seed=seed)

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_linear_probe_rejects_bad_inputs():
    x, y = gaussian_blobs(3, 10, 4, 1.0, seed=0)
    with pytest.raises(ValueError, match="valid split is empty"):
        probes.linear_probe(x, y, x[:0], y[:0], x, y, multilabel=False, num_classes=3, seed=0)
    with pytest.raises(ValueError, match=r"train_y class ids must lie in \[0, 2\)"):
        probes.linear_probe(x, y, x, y, x, y, multilabel=False, num_classes=2, seed=0)
    with pytest.raises(ValueError, match="dim"):
        probes.linear_probe(x, y, x[:, :2], y, x, y, multilabel=False, num_classes=3, seed=0)


def test_standardize_uses_train_statistics_and_constant_dims():
    train = np.array([[1.0, 5.0], [3.0, 5.0]], np.float32)
    other = np.array([[2.0, 7.0]], np.float32)
    train_z, other_z = probes.standardize(train, other)
    np.testing.assert_allclose(train_z, [[-1.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(other_z, [[0.0, 2.0]])  # constant dim: std taken as 1


# ----------------------------------------------------------------------------------------------
# kNN


def reference_knn_votes(train_x, train_hot, test_x, k, temperature):
    """X-ARES's weighted vote written out over sklearn's cosine neighbours. -> [n_test, C]."""
    distance, neighbours = NearestNeighbors(n_neighbors=k, metric="cosine").fit(
        train_x).kneighbors(test_x)
    similarity = 1.0 - distance
    weights = np.exp(similarity / temperature)
    weights /= weights.sum(axis=1, keepdims=True)
    return (weights[:, :, None] * train_hot[neighbours]).sum(axis=1)


@pytest.mark.parametrize("multilabel", [False, True])
def test_knn_votes_match_sklearn_neighbours(multilabel):
    rng = np.random.default_rng(0)
    train_x = rng.normal(size=(300, 16)).astype(np.float32)
    test_x = rng.normal(size=(50, 16)).astype(np.float32)
    if multilabel:
        train_y = (rng.random((300, 7)) < 0.3).astype(np.float32)
        train_hot = train_y
    else:
        train_y = rng.integers(0, 7, 300)
        train_hot = np.eye(7)[train_y]
    expected = reference_knn_votes(train_x, train_hot, test_x, k=10, temperature=0.07)
    for block_elements in (probes._KNN_BLOCK_ELEMENTS, 1000):  # one block, and 3 rows a block
        votes = probes.knn_class_scores(train_x, train_y, test_x, multilabel=multilabel,
                                        num_classes=7, block_elements=block_elements)
        np.testing.assert_allclose(votes, expected, atol=1e-5)
        if not multilabel:
            np.testing.assert_array_equal(votes.argmax(axis=1), expected.argmax(axis=1))


@pytest.mark.parametrize("separation, lo, hi", [(1.0, 0.97, 1.0), (0.02, 0.1, 0.32)])
def test_knn_accuracy_on_blobs(separation, lo, hi):
    x, y = gaussian_blobs(5, 400, 32, separation, seed=0)
    train, test = slice(0, 1600), slice(1600, None)
    score = probes.knn_score(x[train], y[train], x[test], y[test], multilabel=False,
                             num_classes=5)
    expected_votes = reference_knn_votes(x[train], np.eye(5)[y[train]], x[test], 10, 0.07)
    assert score == pytest.approx(np.mean(expected_votes.argmax(axis=1) == y[test]))
    assert lo <= score <= hi


# ----------------------------------------------------------------------------------------------
# Tasks: folds, hold-out validation, seeds, errors


def test_confidence_interval_formula():
    scores = [0.80, 0.83, 0.81]
    t_975_2dof = 4.302652729911275
    expected = t_975_2dof * np.std(scores, ddof=1) / math.sqrt(3)
    assert probes.confidence_interval_95(scores) == pytest.approx(expected, rel=1e-9)
    assert math.isnan(probes.confidence_interval_95([0.8]))


@pytest.mark.parametrize("correct, n", [(26, 45), (0, 12), (78, 78), (40, 78), (1, 1)])
def test_wilson_interval_matches_scipy(correct, n):
    expected = scipy.stats.binomtest(correct, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = probes.wilson_interval_95(correct, n)
    assert (lo, hi) == pytest.approx((expected.low, expected.high), abs=1e-12)


def test_knn_accuracy_carries_the_test_set_interval():
    """A fixed split scores one test set: the interval is Wilson's over its clips. kNN on 1-d points whose
    nearest training clips give a known count of right answers (here 7 of 10)."""
    x_train = np.array([[1.0, 0.0]] * 10 + [[0.0, 1.0]] * 10)
    y_train = np.array([0] * 10 + [1] * 10)
    x_test = np.array([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 5)
    y_test = np.array([0] * 5 + [1, 1, 0, 0, 0])  # class-0 clips that look like class 1: 3 wrong
    x = np.concatenate([x_train, x_test]).astype(np.float32)
    y = np.concatenate([y_train, y_test])
    splits = np.array(["train"] * 20 + ["test"] * 10)
    result = probes.evaluate_task(x, y, splits, multilabel=False, num_classes=2, run_linear=False)
    assert result["knn"]["mean"] == pytest.approx(0.7)
    expected = scipy.stats.binomtest(7, 10).proportion_ci(confidence_level=0.95, method="wilson")
    assert result["knn"]["test_interval95"] == pytest.approx([expected.low, expected.high], abs=1e-12)
    assert result["knn"]["test_clips"] == 10


def test_fold_tasks_carry_an_interval_around_the_mean_of_their_folds():
    """Folds score the mean of per-fold accuracies; its interval (NumPy transcription of Agresti-Coull per fold,
    normal approximation of the mean) is centred on that mean, not on the pooled accuracy."""
    z = 1.959963984540054
    correct, sizes = np.array([3, 10, 0]), np.array([10, 10, 5])
    mean = np.mean(correct / sizes)
    n_adj = sizes + z ** 2
    p_adj = (correct + z ** 2 / 2) / n_adj
    half = z * np.sqrt(np.sum(p_adj * (1 - p_adj) / n_adj)) / 3
    lo, hi = probes.fold_mean_interval_95(correct, sizes)
    assert (lo, hi) == pytest.approx((max(0, mean - half), min(1, mean + half)), abs=1e-12)
    assert lo < mean < hi

    x, y = gaussian_blobs(3, 20, 4, 1.0, seed=1)
    folds = np.arange(60) % 3
    result = probes.evaluate_task(x, y, folds, multilabel=False, num_classes=3, run_linear=False)
    low, high = result["knn"]["test_interval95"]
    assert low <= result["knn"]["mean"] <= high and result["knn"]["test_clips"] == 60


def test_multilabel_knn_has_no_binomial_interval():
    x, y = multilabel_data(200, 4, 8, seed=3)
    splits = np.array(["train"] * 160 + ["test"] * 40)
    result = probes.evaluate_task(x, y, splits, multilabel=True, num_classes=4, run_linear=False)
    assert "test_interval95" not in result["knn"]


class RecordingProbes:
    """Wraps the real probes and records the row ids (column 0 of the embeddings) they get."""

    def __init__(self, monkeypatch):
        self.linear_calls, self.knn_calls = [], []
        real_linear, real_knn = probes.linear_probe, probes.knn_score

        def linear(train_x, train_y, valid_x, valid_y, test_x, test_y, **kwargs):
            result = real_linear(train_x, train_y, valid_x, valid_y, test_x, test_y, **kwargs)
            self.linear_calls.append({"train_ids": self.ids(train_x),
                                      "valid_ids": self.ids(valid_x),
                                      "test_ids": self.ids(test_x), "seed": kwargs["seed"],
                                      "score": result["test"]})
            return result

        def knn(train_x, train_y, test_x, test_y, **kwargs):
            result = real_knn(train_x, train_y, test_x, test_y, **kwargs)
            self.knn_calls.append({"train_ids": self.ids(train_x),
                                   "test_ids": self.ids(test_x), "score": result})
            return result

        monkeypatch.setattr(probes, "linear_probe", linear)
        monkeypatch.setattr(probes, "knn_score", knn)

    @staticmethod
    def ids(x):
        return set(np.rint(x[:, 0]).astype(int).tolist())


def with_row_ids(x):
    """Prepends the row index as column 0, so a recording probe can tell which clips it got."""
    return np.concatenate([np.arange(len(x), dtype=np.float32)[:, None], x], axis=1)


def test_folds_leave_one_out_without_leakage(monkeypatch):
    # 5 folds x 4 classes x 10 clips: every fold's training set is 160 clips, 16 of them held out.
    x, y = gaussian_blobs(4, 50, 8, 3.0, seed=0)
    folds = np.empty(len(y), int)
    for c in range(4):  # 10 clips of each class in each fold
        members = np.flatnonzero(y == c)
        folds[members] = np.repeat(np.arange(5), 10)
    recorder = RecordingProbes(monkeypatch)
    result = probes.evaluate_task(with_row_ids(x), y, folds, multilabel=False, num_classes=4,
                                  seeds=(42, 43))
    all_ids = set(range(len(y)))

    assert len(recorder.linear_calls) == 10 and len(recorder.knn_calls) == 5
    assert result["linear"]["folds"] == [0, 1, 2, 3, 4]
    assert len(result["linear"]["per_fold"]) == 5 and len(result["knn"]["per_fold"]) == 5
    for call in recorder.linear_calls:
        fold = folds[next(iter(call["test_ids"]))]
        assert call["test_ids"] == set(np.flatnonzero(folds == fold).tolist())
        assert not call["train_ids"] & call["test_ids"] and not call["valid_ids"] & call["test_ids"]
        assert not call["train_ids"] & call["valid_ids"]
        assert call["train_ids"] | call["valid_ids"] | call["test_ids"] == all_ids
        assert len(call["valid_ids"]) == 16  # 10 % of each class's 40 training clips
        assert set(y[list(call["valid_ids"])]) == set(range(4))
    for call in recorder.knn_calls:
        assert call["train_ids"] == all_ids - call["test_ids"]

    per_fold = [np.mean([c["score"] for c in recorder.linear_calls
                         if folds[next(iter(c["test_ids"]))] == f]) for f in range(5)]
    np.testing.assert_allclose(result["linear"]["per_fold"], per_fold)
    assert result["linear"]["mean"] == pytest.approx(np.mean(per_fold))
    assert result["knn"]["mean"] == pytest.approx(np.mean(result["knn"]["per_fold"]))
    assert result["knn"]["per_fold"] == [c["score"] for c in recorder.knn_calls]
    per_seed = result["linear"]["per_seed"]
    assert result["linear"]["ci95"] == pytest.approx(probes.confidence_interval_95(per_seed))
    assert result["metric"] == result["linear"]["metric"] == result["knn"]["metric"] == "accuracy"
    assert result["linear"]["mean"] > 0.9


def test_fixed_split_without_valid_holds_out_ten_percent(monkeypatch):
    x, y = gaussian_blobs(4, 50, 8, 1.0, seed=1)
    splits = np.array(["train"] * 160 + ["test"] * 40)
    recorder = RecordingProbes(monkeypatch)
    result = probes.evaluate_task(with_row_ids(x), y, splits, multilabel=False, num_classes=4,
                                  seeds=(42, 43))
    first, second = recorder.linear_calls
    for call in (first, second):
        assert call["test_ids"] == set(range(160, 200))
        assert call["train_ids"] | call["valid_ids"] == set(range(160))
        assert not call["train_ids"] & call["valid_ids"]
        assert abs(len(call["valid_ids"]) - 16) <= 2
    assert first["valid_ids"] != second["valid_ids"]  # each seed draws its own hold-out
    assert recorder.knn_calls[0]["train_ids"] == set(range(160))
    assert "per_fold" not in result["linear"] and len(result["linear"]["per_seed"]) == 2


def test_fixed_split_with_valid_and_multilabel_task():
    x, y = multilabel_data(400, 5, 16, seed=2)
    splits = np.array(["train"] * 280 + ["valid"] * 40 + ["test"] * 80)
    result = probes.evaluate_task(x, y, splits, multilabel=True, num_classes=5, seeds=(42,))
    assert result["metric"] == "mAP"
    assert result["linear"]["mean"] > 0.9 and result["knn"]["mean"] > 0.7
    assert math.isnan(result["linear"]["ci95"])


def test_knn_only(monkeypatch):
    x, y = gaussian_blobs(3, 20, 4, 3.0, seed=0)
    folds = np.arange(60) % 3
    recorder = RecordingProbes(monkeypatch)
    result = probes.evaluate_task(x, y, folds, multilabel=False, num_classes=3, run_linear=False)
    assert result["linear"] is None and not recorder.linear_calls
    assert len(result["knn"]["per_fold"]) == 3 and result["knn"]["mean"] > 0.7


def test_holdout_validation_keeps_every_class_in_train():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 30 + [1] * 5 + [2] * 1)
    train, valid = probes.holdout_validation(labels, np.arange(36), multilabel=False,
                                             num_classes=3, fraction=0.1, rng=rng)
    assert set(labels[train]) == {0, 1, 2} and set(labels[valid]) == {0, 1}
    assert sorted(np.concatenate([train, valid]).tolist()) == list(range(36))

    hot = np.zeros((40, 3), np.float32)
    hot[:, 0] = 1
    hot[7, 1] = 1  # a class with one positive clip must stay in train
    for seed in range(20):
        train, valid = probes.holdout_validation(hot, np.arange(40), multilabel=True,
                                                 num_classes=3, fraction=0.5,
                                                 rng=np.random.default_rng(seed))
        assert 7 in train and len(valid) >= 19


def task_inputs():
    x, y = gaussian_blobs(3, 20, 4, 1.0, seed=0)
    return x, y, np.array(["train"] * 40 + ["valid"] * 5 + ["test"] * 15)


def test_evaluate_task_errors():
    x, y, splits = task_inputs()
    kwargs = dict(multilabel=False, num_classes=4, seeds=(42,))

    y_test_only = y.copy()
    y_test_only[-3:] = 3
    with pytest.raises(ValueError, match=r"class 3: 3 test / 0 train"):
        probes.evaluate_task(x, y_test_only, splits, **kwargs)
    with pytest.raises(ValueError, match="'test' split is empty"):
        probes.evaluate_task(x, y, np.where(splits == "test", "train", splits), **kwargs)
    with pytest.raises(ValueError, match="'train' split is empty"):
        probes.evaluate_task(x, y, np.where(splits == "train", "valid", splits), **kwargs)
    with pytest.raises(ValueError, match="one row per clip"):
        probes.evaluate_task(x, y[:-1], splits, **kwargs)
    with pytest.raises(ValueError, match="one row per clip"):
        probes.evaluate_task(x, y, splits[:-1], **kwargs)
    x_nan = x.copy()
    x_nan[4, 1] = np.nan
    with pytest.raises(ValueError, match=r"NaN or inf in 1 of 60 clips \(first rows: \[4\]\)"):
        probes.evaluate_task(x_nan, y, splits, **kwargs)
    with pytest.raises(ValueError, match="at least 2 folds"):
        probes.evaluate_task(x, y, np.zeros(len(y), int), **kwargs)
    with pytest.raises(ValueError, match="split names"):
        probes.evaluate_task(x, y, np.where(splits == "valid", "val", splits), **kwargs)
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 2\)"):
        probes.evaluate_task(x, y, splits, multilabel=False, num_classes=2)
    with pytest.raises(ValueError, match="multi-hot"):
        probes.evaluate_task(x, y, splits, multilabel=True, num_classes=3)


def test_class_missing_from_training_folds_names_the_fold():
    x, y = gaussian_blobs(3, 20, 4, 1.0, seed=0)
    folds = np.arange(60) % 3
    y = y.copy()
    y[np.flatnonzero(folds == 1)[:2]] = 3  # class 3 only in fold 1
    with pytest.raises(ValueError, match=r"test fold 1\).*class 3: 2 test / 0 train"):
        probes.evaluate_task(x, y, folds, multilabel=False, num_classes=4, seeds=(42,))


def test_the_linear_probe_lr_is_settable_and_recorded(tmp_path, monkeypatch):
    """`--lr` (evaluate.run's lr, config.evals' lr) reaches the linear probe and lands in results.json."""
    import json

    import soundfile as sf

    from audiojepa import evaluate
    from audiojepa.evaluation import evaluators

    root = tmp_path / "tones"
    root.mkdir()
    rows = ["filename,label,split"]
    for i in range(24):
        label = "low" if i % 2 else "high"
        t = np.arange(4000) / 16000
        sf.write(root / f"c{i:02d}.wav", (0.3 * np.sin(2 * np.pi * (300 if i % 2 else 3000) * (1 + i / 50) * t))
                 .astype(np.float32), 16000)
        rows.append(f"c{i:02d}.wav,{label},{'train' if i < 16 else 'valid' if i < 18 else 'test'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    optimizer_lrs, real_probe = [], probes.linear_probe

    def recording_probe(*args, **kwargs):
        optimizer_lrs.append(kwargs["lr"])
        return real_probe(*args, **kwargs)

    monkeypatch.setattr(probes, "linear_probe", recording_probe)
    for lr in (3e-5, 1e-2):
        out = tmp_path / f"out_{lr}"
        optimizer_lrs.clear()
        evaluate.run("logmel", [str(root)], str(out), baselines=False, seeds=(0,), lr=lr)
        assert json.loads((out / "results.json").read_text())["tones"]["linear"]["lr"] == lr
        assert optimizer_lrs and all(v == pytest.approx(lr) for v in optimizer_lrs)
    (_, _, ev), = evaluators.from_config({"p": {"type": "linear", "task": str(root), "every_steps": 1, "lr": 3e-5}},
                                         sample_rate=16000)
    assert ev.lr == 3e-5


def test_embedding_a_task_streams_with_bounded_memory_and_the_same_embeddings(tmp_path):
    """embedders.embed_task holds at most max_buffered_clips decoded clips (plus the one just loaded), and
    the embeddings equal those of an unbounded pass (batch composition does not change them)."""
    import soundfile as sf

    from audiojepa.evaluation import embedders, tasks
    from audiojepa.ops import frontend

    root = tmp_path / "mixed"
    root.mkdir()
    rows = ["filename,label,split"]
    rng = np.random.default_rng(0)
    for i in range(40):  # 7 different lengths, so many partial batches wait at once
        n = 1600 * (1 + i % 7)
        sf.write(root / f"c{i:02d}.wav", (0.1 * rng.standard_normal(n)).astype(np.float32), 16000)
        rows.append(f"c{i:02d}.wav,{'ab'[i % 2]},{'train' if i < 30 else 'test'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    task = tasks.load_task(str(root), sample_rate=16000)
    embedder = embedders.LogMelEmbedder(frontend.get_preset("m2d"), (-7.1, 4.2))
    real_load, real_embed = task.load_audio, embedder.embed_batch
    held = {"now": 0, "peak": 0}

    def load(i, sample_rate):
        held["now"] += 1
        held["peak"] = max(held["peak"], held["now"])
        return real_load(i, sample_rate)

    def embed_batch(waveforms):
        held["now"] -= len(waveforms)
        return real_embed(waveforms)

    task.load_audio, embedder.embed_batch = load, embed_batch
    bounded, kept = embedders.embed_task(embedder, task, batch_size=4, max_buffered_clips=5)
    assert held == {"now": 0, "peak": 6}  # 5 waiting + the one just loaded
    held["peak"] = 0
    unbounded, kept_all = embedders.embed_task(embedder, task, batch_size=4, max_buffered_clips=10**6)
    assert held["peak"] > 6  # without the bound, partial batches of all 7 lengths wait together
    np.testing.assert_array_equal(kept, kept_all)
    np.testing.assert_allclose(bounded, unbounded, rtol=1e-6, atol=1e-6)
