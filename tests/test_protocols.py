"""Probe protocols (`--protocol=evar|matpac|xares`): resolved values, overrides, EVAR's crop, model selection,
the X-ARES head and schedule, the confidence interval and what results.json records."""

import json

import numpy as np
import pytest
import scipy.stats
import soundfile as sf
import task_helpers
from absl import flags

from audiojepa.evaluation import embedders, probes, protocols, tasks

# ------------------------------------------------------------------------------------------------
# Resolved values: each literal comes from the source cited in protocols.py's table.

EXPECTED = {
    # EVAR (eval_protocols.md §1): M2D lr 3e-5, batch min(200, n), <=200 epochs, patience 20 on the valid
    # metric (later of ties), StandardScaler, Linear, Adam wd 1e-8, CE / C, seeds 42-44, per-task unit_sec.
    "evar": dict(lr=3e-5, probe_batch_size=None, max_epochs=200, patience=20, selection="best_val_metric",
                 keep_later_tie=True, head="linear", standardize_inputs=True, weight_decay=1e-8,
                 lr_schedule="constant", loss_over_classes=True, seeds=(42, 43, 44), ci_level=0.95,
                 unit_sec=protocols.PER_TASK, probes=("linear",)),
    # MATPAC's paper: lr 1e-4, batch 128, best validation loss, 5 runs, 95% CI, one linear layer, Adam.
    "matpac": dict(lr=1e-4, probe_batch_size=128, selection="best_val_loss", head="linear", weight_decay=0.0,
                   lr_schedule="constant", seeds=(42, 43, 44, 45, 46), ci_level=0.95, unit_sec=None,
                   probes=("linear",)),
    # X-ARES (eval_protocols.md §3): LayerNorm + Linear, Adam 1e-3, batch 32, 10 epochs, cosine to 0.1 lr,
    # best valid metric (first of ties), no input scaling, kNN k 10 T 0.07, no kNN on multi-label, 1 run.
    "xares": dict(lr=1e-3, probe_batch_size=32, max_epochs=10, patience=None, selection="best_val_metric",
                  keep_later_tie=False, head="layernorm_linear", standardize_inputs=False, weight_decay=0.0,
                  lr_schedule="cosine_per_epoch", final_lr_fraction=0.1, loss_over_classes=False, seeds=(42,),
                  unit_sec=None, probes=("linear", "knn"), knn_k=10, knn_temperature=0.07,
                  knn_on_multilabel=False),
    # No --protocol: today's setting, unchanged.
    "default": dict(lr=1e-3, probe_batch_size=None, max_epochs=200, patience=20, selection="best_val_metric",
                    keep_later_tie=True, head="linear", standardize_inputs=True, weight_decay=1e-8,
                    lr_schedule="constant", loss_over_classes=True, seeds=(42, 43, 44), unit_sec=None,
                    probes=("linear", "knn"), knn_k=10, knn_temperature=0.07, knn_on_multilabel=True),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_protocol_resolves_to_its_benchmarks_values(name):
    protocol = protocols.resolve(None if name == "default" else name)
    assert protocol.name == name and protocol.overridden == ()
    for field, value in EXPECTED[name].items():
        assert getattr(protocol, field) == value, field
    options = protocol.linear_options()
    assert options["batch_size"] == protocol.probe_batch_size and options["selection"] == protocol.selection
    record = json.loads(json.dumps(protocol.as_record()))  # JSON-able
    assert record["name"] == name and record["seeds"] == list(protocol.seeds)


def test_evar_unit_sec_per_task():
    evar = protocols.resolve("evar")
    assert protocols.task_unit_sec(evar, "esc50", None) == (5.0, "EVAR evar/ds_tasks.py")
    assert protocols.task_unit_sec(evar, "vc1", None)[0] == 8.2
    assert protocols.task_unit_sec(evar, "fsd50k", None)[0] == 7.6358
    assert protocols.task_unit_sec(evar, "esc50", 3.0) == (3.0, "task.json")  # the task's own wins
    with pytest.raises(ValueError, match=r"task 'tones' has none.*task\.json.*--unit_sec"):
        protocols.task_unit_sec(evar, "tones", None)
    assert protocols.task_unit_sec(protocols.resolve("evar", unit_sec=2), "tones", 3.0) == (2.0, "--unit_sec")
    assert protocols.task_unit_sec(protocols.resolve("matpac"), "esc50", 3.0) == (None, "whole clips")


def _flag_values(*argv):
    from audiojepa import evaluate

    flag_values = flags.FlagValues()
    evaluate.define_flags(flag_values)
    flag_values(["evaluate", *argv])
    return flag_values


def test_explicit_flags_override_the_protocol_and_nothing_else():
    from audiojepa import evaluate

    protocol = evaluate.protocol_from_flags(_flag_values(
        "--protocol=matpac", "--lr=3e-4", "--seeds=1,2", "--probe_batch_size=64", "--unit_sec=2.5"))
    assert (protocol.lr, protocol.seeds, protocol.probe_batch_size, protocol.unit_sec) == (3e-4, (1, 2), 64, 2.5)
    assert protocol.overridden == ("lr", "probe_batch_size", "seeds", "unit_sec")
    untouched = {f: v for f, v in EXPECTED["matpac"].items() if f not in protocol.overridden}
    assert all(getattr(protocol, f) == v for f, v in untouched.items())
    # Nothing given: the protocol's own values; no --protocol: today's default.
    assert evaluate.protocol_from_flags(_flag_values("--protocol=xares")) == protocols.resolve("xares")
    assert evaluate.protocol_from_flags(_flag_values()) == protocols.PROTOCOLS["default"]
    # --batch_size stays the embedding batch: it changes no probe value.
    assert evaluate.protocol_from_flags(_flag_values("--protocol=evar", "--batch_size=8")) == protocols.resolve("evar")
    with pytest.raises(ValueError, match=r"--protocol='hear'; valid: default, evar, matpac, xares"):
        protocols.resolve("hear")
    with pytest.raises(ValueError, match=r"seeds is empty"):
        protocols.resolve("evar", seeds=())


# ------------------------------------------------------------------------------------------------
# EVAR's crop to unit_sec


def test_fit_to_unit_crops_and_pads_like_numpy_slicing():
    waveform = np.arange(1, 11, dtype=np.float32)  # 10 samples, no zero among them
    np.testing.assert_array_equal(embedders.fit_to_unit(waveform, 4), waveform[:4])
    np.testing.assert_array_equal(embedders.fit_to_unit(waveform, 4, start=6), waveform[6:10])
    np.testing.assert_array_equal(embedders.fit_to_unit(waveform, 13), np.pad(waveform, (0, 3)))
    np.testing.assert_array_equal(embedders.fit_to_unit(waveform, 10), waveform)
    with pytest.raises(ValueError, match="crop start 7"):
        embedders.fit_to_unit(waveform, 4, start=7)


def test_evar_crop_start_is_uniform_over_evars_range():
    """EVAR draws np.random.randint(l - unit): starts 0 .. l - unit - 1, never l - unit; test clips start at 0."""
    starts = [embedders.evar_crop_start(13, 10, random_crop=True, rng=np.random.default_rng(i)) for i in range(3000)]
    counts = np.bincount(starts, minlength=4)
    assert counts[3] == 0 and set(starts) == {0, 1, 2}
    assert np.all(np.abs(counts[:3] / 3000 - 1 / 3) < 0.04)  # 1/3 each; 4 sigma is 0.034
    assert embedders.evar_crop_start(13, 10, random_crop=False, rng=np.random.default_rng(0)) == 0
    assert embedders.evar_crop_start(8, 10, random_crop=True, rng=np.random.default_rng(0)) == 0


class EdgesEmbedder:
    """Embeds a clip as (length, first sample, last sample): shows which crop the embedder got."""

    name, sample_rate = "edges", 16000

    def embed_batch(self, waveform):
        return np.stack([np.full(len(waveform), waveform.shape[1]), waveform[:, 0], waveform[:, -1]], axis=1)


def _ramp_task(root, split_column, splits):
    """Clips whose samples are (clip index * 1000 + position) / 2**20: any crop shows where it starts."""
    root.mkdir()
    rows = [f"filename,label,{split_column}"]
    lengths = [300 if i % 3 else 100 for i in range(len(splits))]  # a 100-sample clip is padded
    for i, (split, n) in enumerate(zip(splits, lengths)):
        sf.write(root / f"c{i}.wav", ((i * 1000 + np.arange(n)) / 2**20).astype(np.float32), 16000, subtype="FLOAT")
        rows.append(f"c{i}.wav,{'ab'[i % 2]},{split}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return tasks.load_task(str(root), sample_rate=16000), lengths


def _expected_edges(i, n, unit, random_crop, crop_seed=0):
    """NumPy reference of EVAR's cut: slice at the seeded start, or pad with zeros at the end."""
    ramp = (i * 1000 + np.arange(n)) / 2**20
    if n <= unit:
        cut = np.concatenate([ramp, np.zeros(unit - n)])
    else:
        start = int(np.random.default_rng((crop_seed, i)).integers(0, n - unit)) if random_crop else 0
        cut = ramp[start:start + unit]
    return [unit, cut[0], cut[-1]]


def test_embed_clips_crops_train_and_valid_at_random_and_test_from_the_start(tmp_path):
    from audiojepa import evaluate

    splits = ["train"] * 6 + ["valid"] * 3 + ["test"] * 3
    task, lengths = _ramp_task(tmp_path / "fixed", "split", splits)
    unit_sec = 0.0125  # 200 samples at 16 kHz
    emb, test_emb, kept, info = evaluate.embed_clips(EdgesEmbedder(), task, unit_sec=unit_sec)
    assert test_emb is None and kept.tolist() == list(range(12))
    assert info == {"unit_samples": 200, "clips_cropped": 8, "clips_padded": 4}
    for i, (split, n) in enumerate(zip(splits, lengths)):
        np.testing.assert_allclose(emb[i], _expected_edges(i, n, 200, split != "test"), rtol=0, atol=1e-9)
    random_starts = {round(emb[i, 1] * 2**20) - i * 1000 for i in range(9) if lengths[i] > 200}
    assert len(random_starts) > 1  # not all at 0


def test_embed_clips_of_a_fold_task_gives_test_rows_their_start_crops(tmp_path):
    from audiojepa import evaluate

    task, lengths = _ramp_task(tmp_path / "folds", "fold", [i % 3 for i in range(9)])
    emb, test_emb, kept, _ = evaluate.embed_clips(EdgesEmbedder(), task, unit_sec=0.0125, crop_seed=7)
    for i, n in enumerate(lengths):  # every clip trains in some fold (random crop) and is tested in one (start 0)
        np.testing.assert_allclose(emb[i], _expected_edges(i, n, 200, True, crop_seed=7), rtol=0, atol=1e-9)
        np.testing.assert_allclose(test_emb[i], _expected_edges(i, n, 200, False), rtol=0, atol=1e-9)


def test_task_json_gives_a_task_its_unit_sec(tmp_path):
    task, _ = _ramp_task(tmp_path / "t", "split", ["train", "train", "test", "test"])
    assert task.unit_sec is None
    (tmp_path / "t" / "task.json").write_text('{"unit_sec": 0.5}')
    assert tasks.load_task(str(tmp_path / "t"), sample_rate=16000).unit_sec == 0.5
    (tmp_path / "t" / "task.json").write_text('{"unit_secs": 0.5}')
    with pytest.raises(ValueError, match=r"task\.json: unknown setting\(s\) \['unit_secs'\]; valid keys: unit_sec"):
        tasks.load_task(str(tmp_path / "t"), sample_rate=16000)
    (tmp_path / "t" / "task.json").write_text('{"unit_sec": -1}')
    with pytest.raises(ValueError, match=r"unit_sec=-1; it must be a number of seconds > 0"):
        tasks.load_task(str(tmp_path / "t"), sample_rate=16000)


# ------------------------------------------------------------------------------------------------
# Model selection


def _overlapping_classes(seed=2):
    """3 overlapping Gaussian classes in 16 dims, 24 train / 60 valid / 30 test clips: a fast probe
    overfits, so validation loss and accuracy peak at different epochs."""
    rng = np.random.default_rng(seed)
    means = 0.6 * rng.standard_normal((3, 16))

    def draw(n):
        y = np.arange(n) % 3
        return (means[y] + rng.standard_normal((n, 16))).astype(np.float32), y

    return draw(24), draw(60), draw(30)


def _numpy_loss_and_accuracy(params, train_x, x, y):
    """Standardise with train statistics, apply the linear layer, mean CE and accuracy (float64)."""
    train64 = train_x.astype(np.float64)
    xs = (x - train64.mean(0)) / train64.std(0)
    logits = xs @ np.asarray(params["w"], np.float64) + np.asarray(params["b"], np.float64)
    log_probs = logits - scipy.special.logsumexp(logits, axis=1, keepdims=True)
    return -log_probs[np.arange(len(y)), y].mean(), np.mean(logits.argmax(1) == y)


def test_best_val_loss_and_best_val_metric_pick_the_epochs_an_independent_computation_picks():
    """The weights after each epoch e (the same run stopped at e) are scored in NumPy on the valid split; the
    selected epoch must be argmin of that loss (best_val_loss) or the last argmax of accuracy (EVAR's >=)."""
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = _overlapping_classes()
    common = dict(multilabel=False, num_classes=3, seed=0, lr=0.05, patience=None, weight_decay=0.0,
                  loss_over_classes=False)  # plain CE, as MATPAC; EVAR's CE / 3 has the same argmin
    data = (train_x, train_y, valid_x, valid_y, test_x, test_y)
    epochs = 16
    losses, accuracies, test_scores = [], [], []
    for e in range(1, epochs + 1):
        run = probes.linear_probe(*data, max_epochs=e, selection="last", return_params=True, **common)
        loss, acc = _numpy_loss_and_accuracy(run["params"], train_x, valid_x, valid_y)
        losses.append(loss)
        accuracies.append(acc)
        test_scores.append(_numpy_loss_and_accuracy(run["params"], train_x, test_x, test_y)[1])
    by_loss = int(np.argmin(losses)) + 1
    by_accuracy = epochs - int(np.argmax(np.asarray(accuracies)[::-1]))
    assert by_loss != by_accuracy, "the constructed case must separate the two rules"

    on_loss = probes.linear_probe(*data, max_epochs=epochs, selection="best_val_loss", **common)
    on_metric = probes.linear_probe(*data, max_epochs=epochs, selection="best_val_metric", **common)
    assert on_loss["best_epoch"] == by_loss and on_metric["best_epoch"] == by_accuracy
    assert on_loss["epochs"] == on_metric["epochs"] == epochs  # patience None: no early stop
    # The selected weights are the ones scored: valid values and test accuracy of that epoch (float32 vs 64).
    assert on_loss["valid_loss"] == pytest.approx(losses[by_loss - 1], rel=1e-4)
    assert on_loss["valid"] == accuracies[by_loss - 1] and on_metric["valid"] == accuracies[by_accuracy - 1]
    assert on_loss["test"] == test_scores[by_loss - 1] and on_metric["test"] == test_scores[by_accuracy - 1]


def test_ties_keep_the_later_epoch_for_evar_and_the_first_for_xares():
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = _overlapping_classes()
    data = (train_x, train_y, valid_x, valid_y, test_x, test_y)
    common = dict(multilabel=False, num_classes=3, seed=0, patience=None, max_epochs=12, selection="best_val_metric")
    later = probes.linear_probe(*data, lr=1e-9, keep_later_tie=True, **common)  # lr ~0: every epoch ties
    first = probes.linear_probe(*data, lr=1e-9, keep_later_tie=False, **common)
    assert (later["best_epoch"], first["best_epoch"]) == (12, 1)


# ------------------------------------------------------------------------------------------------
# X-ARES's head and schedule


def test_layernorm_linear_head_matches_a_numpy_forward():
    rng = np.random.default_rng(0)
    x = (3 + 2 * rng.standard_normal((7, 12))).astype(np.float32)
    params = {"w": rng.standard_normal((12, 5)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32),
              "ln_scale": rng.uniform(0.5, 2, 12).astype(np.float32),
              "ln_bias": rng.standard_normal(12).astype(np.float32)}
    x64 = x.astype(np.float64)
    normed = (x64 - x64.mean(1, keepdims=True)) / np.sqrt(x64.var(1, keepdims=True) + 1e-5)  # torch LayerNorm
    expected = (normed * params["ln_scale"] + params["ln_bias"]) @ params["w"] + params["b"]
    np.testing.assert_allclose(np.asarray(probes.head_logits(params, x)), expected, rtol=1e-5, atol=1e-5)
    plain = {"w": params["w"], "b": params["b"]}
    np.testing.assert_allclose(np.asarray(probes.head_logits(plain, x)), x64 @ params["w"] + params["b"],
                               rtol=1e-5, atol=1e-4)


def test_xares_probe_trains_the_layernorm_on_raw_embeddings_with_its_cosine_schedule(monkeypatch):
    """Per-epoch lrs are ignite's CosineAnnealingScheduler(lr -> 0.1 lr, cycle 10) at EPOCH_STARTED; the
    head has a trained LayerNorm; the inputs are not standardised."""
    xares = protocols.resolve("xares")
    seen = []
    real_epoch = probes.train_epoch

    def recording_epoch(*args, **kwargs):
        seen.append(float(args[6]))
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(probes, "train_epoch", recording_epoch)
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = _overlapping_classes()
    run = probes.linear_probe(train_x, train_y, valid_x, valid_y, test_x, test_y, multilabel=False, num_classes=3,
                              seed=0, lr=xares.lr, return_params=True, **xares.linear_options())
    e = np.arange(1, 11)
    ignite = 1e-3 + (0.1e-3 - 1e-3) / 2 * (1 - np.cos(np.pi * (e - 1) / 10))
    np.testing.assert_allclose(seen, ignite, rtol=1e-6)
    assert run["epochs"] == 10 and set(run["params"]) == {"w", "b", "ln_scale", "ln_bias"}
    assert not np.allclose(run["params"]["ln_scale"], 1.0)  # the LayerNorm is trained
    # Raw embeddings reach the head: rescaling one dimension changes what it learns (a StandardScaler would undo it).
    scale = np.ones(16, np.float32)
    scale[0] = 100.0
    rescaled = probes.linear_probe(train_x * scale, train_y, valid_x * scale, valid_y, test_x * scale, test_y,
                                   multilabel=False, num_classes=3, seed=0, lr=xares.lr, return_params=True,
                                   **xares.linear_options())
    assert not np.allclose(rescaled["params"]["w"], run["params"]["w"], rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Seeds and interval; results.json


def test_matpacs_five_seeds_give_a_student_t_95_interval():
    (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = _overlapping_classes(seed=5)
    x = np.concatenate([train_x, valid_x, test_x])
    y = np.concatenate([train_y, valid_y, test_y])
    splits = np.array(["train"] * 24 + ["valid"] * 60 + ["test"] * 30)
    matpac = protocols.resolve("matpac", lr=1e-2)  # a faster lr so the tiny test runs quickly
    result = probes.evaluate_task(x, y, splits, multilabel=False, num_classes=3, seeds=matpac.seeds, lr=matpac.lr,
                                  run_knn=False, linear_options=matpac.linear_options())
    per_seed = np.asarray(result["linear"]["per_seed"])
    assert len(per_seed) == 5 and result["knn"] is None and result["linear"]["validation"] == "valid split"
    low, high = scipy.stats.t.interval(0.95, 4, loc=per_seed.mean(), scale=scipy.stats.sem(per_seed))
    assert per_seed.std() > 0
    assert result["linear"]["ci95"] == pytest.approx((high - low) / 2, rel=1e-9)
    assert result["linear"]["mean"] == pytest.approx(per_seed.mean())


def test_a_fold_task_says_its_model_was_selected_on_held_out_training_clips():
    (train_x, train_y), _, _ = _overlapping_classes()
    result = probes.evaluate_task(train_x, train_y, np.arange(24) % 2, multilabel=False, num_classes=3, seeds=(0,),
                                  run_knn=False, linear_options=protocols.resolve("matpac").linear_options())
    assert result["linear"]["validation"].startswith("10% of the training clips held out per seed and fold")


_tones = task_helpers.tone_task


def test_results_json_records_the_protocol_and_each_tasks_crop(tmp_path, capsys):
    from audiojepa import evaluate

    root = _tones(tmp_path / "tones")
    with pytest.raises(ValueError, match=r"task 'tones' has none"):  # before any embedding
        evaluate.run("logmel", [str(root)], str(tmp_path / "none"), baselines=False, protocol="evar")
    (root / "task.json").write_text('{"unit_sec": 0.3}')
    out = tmp_path / "evar"
    evaluate.run("logmel", [str(root)], str(out), baselines=False, protocol="evar", seeds=(0,))
    result = json.loads((out / "results.json").read_text())["tones"]
    record = result["protocol"]
    assert record["name"] == "evar" and record["lr"] == 3e-5 and record["seeds"] == [0]
    assert record["overridden"] == ["seeds"] and record["selection"] == "best_val_metric"
    assert record["probe_batch_size"] == "min(200, n_train)" and record["head"] == "linear"
    assert (record["unit_sec"], record["unit_sec_source"], record["unit_samples"]) == (0.3, "task.json", 4800)
    assert (record["clips_cropped"], record["clips_padded"]) == (8, 8)
    assert result["knn"] is None and result["linear"]["lr"] == 3e-5
    assert result["linear"]["validation"] == "valid split"
    report = (out / "results.md").read_text()
    assert "Protocol `evar`" in report and "unit_sec 0.3 s (task.json)" in report and "| – |" in report
    assert json.loads((out / "all_results.json").read_text())["protocol"]["name"] == "evar"

    out = tmp_path / "xares"
    evaluate.run("logmel", [str(root)], str(out), baselines=False, protocol="xares")
    result = json.loads((out / "results.json").read_text())["tones"]
    assert result["protocol"]["name"] == "xares" and result["protocol"]["unit_sec"] is None
    assert result["protocol"]["head"] == "layernorm_linear" and result["linear"]["runs"][0]["epochs"] == 10
    # One seed has no interval: null in results.json (strict JSON), NaN only in memory (probes.evaluate_task).
    assert result["knn"]["metric"] == "accuracy" and result["linear"]["ci95"] is None
