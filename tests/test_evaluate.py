"""The evaluation CLI, chunked clip embeddings and periodic evaluation during training."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import soundfile as sf

from audiojepa.adapters import encoder
from audiojepa.methods import m2d
from audiojepa.ops import frontend
from audiojepa.runtime import metrics
from audiojepa.training import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def random_export(tmp_path_factory):
    """A tiny M2D encoder (80 x 48 training crops) at random init, exported."""
    config = m2d.default_config("tiny")
    method = m2d.M2D(config, input_shape=(80, 48))
    enc_params = jax.jit(method.encoder.init)(jax.random.key(0), np.zeros((1, 80, 48), np.float32))["params"]
    enc = encoder.AudioEncoder("m2d", config, (80, 48), frontend.get_preset("m2d"), (-7.1, 4.2),
                               {"encoder": enc_params})
    return enc.save(str(tmp_path_factory.mktemp("export")))


def test_clip_embedding_of_a_long_clip_is_the_mean_of_its_chunk_features(random_export):
    enc = encoder.load_encoder(random_export)
    lms = np.random.default_rng(0).standard_normal((2, 80, 130)).astype(np.float32)  # chunks 48, 48, 34 (-> 48)
    chunk_features = [enc.frame_features(lms[:, :, s:s + 48]) for s in (0, 48, 96)]
    assert [c.shape[1] for c in chunk_features] == [3, 3, 3]
    expected = np.concatenate(chunk_features, axis=1).mean(axis=1)
    np.testing.assert_allclose(enc.clip_embedding(lms), expected, rtol=1e-6, atol=1e-6)
    # The last chunk is zero-padded to whole patches, not to the chunk width.
    padded_last = np.pad(lms[:, :, 96:], ((0, 0), (0, 0), (0, 2)))
    np.testing.assert_allclose(chunk_features[2][:, :3], enc.frame_features(padded_last), rtol=1e-6, atol=1e-6)


def _task_folder(root):
    """Two classes (low vs high tone), 16 clips each, fixed train/valid/test split."""
    root.mkdir()
    rows = ["filename,label,split"]
    rng = np.random.default_rng(0)
    for i in range(32):
        label = "low" if i % 2 else "high"
        freq = rng.uniform(200, 400) if label == "low" else rng.uniform(2000, 4000)
        t = np.arange(8000) / 16000
        sf.write(root / f"c{i:02d}.wav", (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000)
        split = "train" if i < 20 else "valid" if i < 24 else "test"
        rows.append(f"c{i:02d}.wav,{label},{split}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.slow
def test_evaluate_cli_writes_the_report(random_export, tmp_path):
    task = _task_folder(tmp_path / "tones")
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, "-m", "audiojepa.evaluate", f"--encoder={random_export}",
                             f"--task={task}", f"--output={out}", "--seeds=1,2"],
                            cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"tones"}
    assert set(results["tones"]["linear"]) >= {"mean", "ci95", "metric"}
    assert results["tones"]["linear"]["metric"] == "accuracy" and results["tones"]["knn"]["metric"] == "accuracy"
    everything = json.loads((out / "all_results.json").read_text())["results"]
    assert set(everything) == {random_export, "logmel", "random init"}
    # Low vs high tones are separable from the log-mel alone.
    assert everything["logmel"]["tones"]["knn"]["mean"] == 1.0
    assert (out / "tones.png").exists() and "| tones |" in (out / "results.md").read_text()
    # Train holds 10 "high" and 10 "low" (a tie: the first name), test 4 of each.
    assert json.loads((out / "all_results.json").read_text())["majority_class"] == {
        "tones": {"label": "high", "accuracy": 0.5, "test_clips": 8}}
    assert "- tones: always 'high': 50.0% of 8 test clips" in (out / "results.md").read_text()
    assert "| tones |" in result.stdout
    # kNN cells carry Wilson's interval over the 8 test clips: 8 of 8 right for the log-mel -> [67.6, 100.0].
    assert "| tones | logmel |" in result.stdout and "100.0 [67.6, 100.0] accuracy |" in result.stdout


@pytest.mark.slow
def test_periodic_evaluation_is_logged_with_training_metrics(tmp_path, monkeypatch):
    """Evaluations at steps 3 and 6; the first one fails inside the probe (patched to raise once): the
    failure is logged as eval/<name>/failed, training goes on, and both checkpoints are kept. The kNN
    logged at step 6 is recomputed afterwards from the step-6 checkpoint (the CLI's loading path)."""
    import run_helpers as rh

    from audiojepa.evaluation import embedders, probes, tasks
    from audiojepa.runtime import checkpointing

    real_evaluate_task, calls = probes.evaluate_task, []

    def fails_the_first_time(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("probe blew up")
        return real_evaluate_task(*args, **kwargs)

    monkeypatch.setattr(probes, "evaluate_task", fails_the_first_time)
    config = rh.tiny_config()
    task_spec = "embedded:num_clips=160,duration_s=1"
    config.evals = {"knn_embedded": {"type": "knn", "task": task_spec, "every_steps": 3}}
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir, num_devices=1)
    rows = [r for r in metrics.read_metrics(workdir) if any(k.startswith("eval/") for k in r)]
    assert [(r["step"], sorted(k for k in r if k.startswith("eval/"))) for r in rows] == [
        (3, ["eval/knn_embedded/failed"]), (6, ["eval/knn_embedded/knn"])]
    assert rows[0]["eval/knn_embedded/failed"] == 1.0
    manager = checkpointing.make_manager(workdir, every_steps=3, read_only=True)
    assert sorted(manager.all_steps()) == [3, 6]
    manager.close()
    assert len(calls) == 2  # the probe ran at steps 3 and 6
    # The evaluation CLI's path: the online encoder as encoder.load_encoder restores it from the checkpoint,
    # a freshly loaded task, the unpatched probe (kNN is deterministic: no seed). ~2 s here; evaluate.run
    # would add a linear probe and the report (~5 s). The same float32 computation on both sides: 1e-6 is
    # rounding only. (kNN is near chance after 6 steps, 2/16 test clips; the init params give 3/16.)
    embedder = embedders.EncoderEmbedder(encoder.load_encoder(workdir, step=6), name="step 6")
    task = tasks.load_task(task_spec, sample_rate=embedder.sample_rate)
    embeddings, kept = embedders.embed_task(embedder, task)
    recomputed = real_evaluate_task(embeddings, task.label_array()[kept], np.asarray(task.splits)[kept],
                                    multilabel=task.multilabel, num_classes=len(task.classes), run_linear=False)
    assert rows[1]["eval/knn_embedded/knn"] == pytest.approx(recomputed["knn"]["mean"], abs=1e-6)


def test_a_periodic_evaluation_task_with_an_empty_split_fails_at_start_naming_the_key():
    """64 embedded clips fill only the training split (valid and test start at clip 64): an error when the
    evaluator is built, i.e. before the first step, not at the first evaluation."""
    from audiojepa.evaluation import evaluators

    evals = {"knn": {"type": "knn", "task": "embedded:num_clips=64,duration_s=1", "every_steps": 2}}
    with pytest.raises(ValueError, match=r"config\.evals\.knn\.task='embedded:num_clips=64,duration_s=1': "
                                         r"the 'test' split is empty"):
        evaluators.from_config(evals, sample_rate=16000)
    with pytest.raises(ValueError, match=r"config\.evals\.knn\.every_steps='often'"):
        evaluators.from_config({"knn": {"task": "embedded", "every_steps": "often"}}, sample_rate=16000)


def test_periodic_evaluators_can_be_set_from_the_command_line():
    """Every config has an empty `evals` (no evaluation), which `--config.evals=...` on audiojepa.main's
    command line fills (parsed as main parses it, in a fresh interpreter: absl flags are global)."""
    script = ("import json, sys; from absl import flags; from audiojepa import main; flags.FLAGS(sys.argv); "
              "print(json.dumps(flags.FLAGS.config.evals.to_dict()))")

    def parsed_evals(*argv):
        result = subprocess.run([sys.executable, "-c", script, "--workdir=unused", *argv], cwd=REPO, capture_output=True, text=True,
                                timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    assert parsed_evals("--config=configs/encodecmae.py:runlocal") == {}  # every config, through run_config
    knn = {"type": "knn", "task": "embedded", "every_steps": 250}
    assert parsed_evals("--config=configs/m2d.py:runlocal", f"--config.evals={json.dumps({'knn': knn})}") == {"knn": knn}


def test_a_clip_that_fails_to_load_is_listed_once_and_task_names_must_differ(tmp_path):
    from audiojepa import evaluate
    from audiojepa.evaluation import embedders, tasks

    root = _task_folder(tmp_path / "tones")
    sf.write(root / "c00.wav", np.full(800, np.nan, np.float32), 16000, subtype="FLOAT")  # found at load time
    task = tasks.load_task(str(root), sample_rate=16000, verify_audio="header")
    embedder = embedders.LogMelEmbedder(frontend.get_preset("m2d"), (-7.1, 4.2))
    for _ in range(3):  # three embedders, or three periodic evaluations, of one task
        emb, kept = embedders.embed_task(embedder, task)
        assert len(kept) == 31 and 0 not in kept
    assert task.skipped == [{"path": "c00.wav", "reason": "non-finite"}]

    other = tmp_path / "b"
    other.mkdir()
    twin = _task_folder(other / "tones")
    with pytest.raises(ValueError, match=r"both named 'tones'"):
        evaluate.run("logmel", [str(root), str(twin)], str(tmp_path / "out"), baselines=False, seeds=(0,))
