"""EncodecMAE through the generic trainer: stage 1 trains, the self-training stage runs end to end (k-means of
the stage-1 teacher, or of another run's encoder of another size, then the codes+kmeans targets), and the
evaluation embeds and reports the result.

Random EnCodec weights (no checkpoint in CI): this proves the plumbing, not the representations.
"""

import json
import os

import jax
import numpy as np
import pytest

from audiojepa import evaluate, selftrain
from audiojepa.adapters import encoder as encoder_lib
from audiojepa.config_utils import load_config, set_by_path
from audiojepa.runtime import metrics
from audiojepa.training import train

pytestmark = pytest.mark.slow

TINY = {  # configs/encodecmae.py:runlocal shrunk: 0.4 s crops (30 frames, two 15-frame spans masked), batch 8
    "total_steps": 12, "log_every_steps": 3, "checkpoint_every_steps": 12, "tensorboard": False,
    "async_checkpoints": False, "batch_size": 8, "data.crop_frames": 30, "data.embedded.num_clips": 96,
    "data.embedded.duration_s": 1.0, "model.num_clusters": 8,
}


def tiny_config(**overrides):
    config = load_config("configs/encodecmae.py:runlocal")
    for key, value in {**TINY, **overrides}.items():
        set_by_path(config, key, value)
    return config


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("encodecmae") / "stage1")
    train.train_and_evaluate(tiny_config(), workdir, num_devices=2)
    return workdir


def test_stage1_trains_with_a_falling_loss(stage1):
    rows = [r for r in metrics.read_metrics(stage1) if "loss" in r]
    assert [r["step"] for r in rows] == [3, 6, 9, 12]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert 0.0 <= rows[-1]["accuracy_masked"] <= 1.0


def test_frame_embeddings_chunk_at_the_training_crop(stage1):
    enc = encoder_lib.load_encoder(stage1)
    assert enc.is_waveform_model and enc.input_shape == (9600,) and "encodec" in enc.params
    assert enc.frame_hop_seconds == pytest.approx(320 / 24000)
    wave = np.random.default_rng(0).standard_normal((2, 9600 * 2 + 1000)).astype(np.float32) * 0.1
    frames, clip = enc.embed_waveform(wave)
    assert frames.shape == (2, 30 + 30 + 4, enc.feature_dim)  # ceil(1000 / 320) = 4 frames from the last chunk
    # Each chunk is encoded on its own: the first chunk's frames equal encoding it alone, and so do the
    # last one's (1000 samples, 4 frames), not padded to a full chunk of silence that it would attend to.
    alone, _ = enc.embed_waveform(wave[:, :9600])
    np.testing.assert_allclose(frames[:, :30], alone, rtol=1e-5, atol=1e-5)
    tail = np.asarray(enc._encode(enc.params, np.pad(wave[:, -1000:], ((0, 0), (0, 280)))))
    np.testing.assert_allclose(frames[:, -4:], tail, rtol=1e-5, atol=1e-5)
    padded = np.asarray(enc._encode(enc.params, np.pad(wave[:, -1000:], ((0, 0), (0, 9600 - 1000)))))[:, :4]
    assert np.abs(padded - tail).max() > 1e-3  # what padding to the full chunk used to give
    np.testing.assert_allclose(clip, frames.mean(axis=1), rtol=1e-6)


def test_self_training_runs_end_to_end_and_is_evaluated(stage1, tmp_path):
    config = tiny_config(self_training_steps=4, log_every_steps=2, checkpoint_every_steps=4)
    workdir = str(tmp_path / "selftrain")
    centroids, stage1_params = selftrain.prepare(config, stage1, workdir, num_frames=200, max_iter=20, num_clips=24)
    assert np.load(centroids).shape == (8, 64)  # num_clusters x tiny width
    st_config = selftrain.self_training_config(config, centroids, stage1_params)
    assert st_config.model.targets == "codes+kmeans"
    assert (config.total_steps, st_config.total_steps) == (12, 4)  # stage 2's own length
    train.train_and_evaluate(st_config, workdir, num_devices=2)
    rows = [r for r in metrics.read_metrics(workdir) if "loss" in r]
    assert rows[-1]["step"] == 4 and np.isfinite(rows[-1]["loss_kmeans"])

    # The frozen teacher that labels the frames is the stage-1 encoder, unchanged by stage 2.
    _, stage1_state, _ = encoder_lib.restore_train_state(stage1)
    _, stage2_state, _ = encoder_lib.restore_train_state(workdir)
    teacher = stage2_state["target_params"]["teacher"]
    for a, b in zip(jax.tree.leaves(teacher["encoder"]), jax.tree.leaves(stage1_state["params"]["encoder"])):
        np.testing.assert_array_equal(a, b)

    # The evaluation's random-init floor is a fresh model, not the stage-1 encoder the student started from,
    # and it needs neither the stage-1 file nor the centroids.
    os.rename(stage1_params, stage1_params + ".moved")
    floor = evaluate._random_encoder_params(encoder_lib.load_encoder(workdir))
    os.rename(stage1_params + ".moved", stage1_params)
    for a, b in zip(jax.tree.leaves(floor["encoder"]), jax.tree.leaves(stage1_state["params"]["encoder"])):
        assert a.shape == b.shape and not np.allclose(a, b)

    out = str(tmp_path / "eval")
    # (The log-mel and random-init floors are the same code path as for M2D, tested in test_evaluate.py.)
    # 80 clips (8 test clips): EnCodec embeds every clip on the CPU, and the plumbing does not need more.
    results = evaluate.run(workdir, ["embedded:num_clips=80,duration_s=1"], out, baselines=False, seeds=(0,),
                           batch_size=32)
    assert set(results) == {workdir}
    with open(os.path.join(out, "results.json")) as f:
        report = json.load(f)
    (task,) = report  # results.json holds the main encoder's results, one entry per task
    assert 0.0 <= report[task]["knn"]["mean"] <= 1.0 and 0.0 <= report[task]["linear"]["mean"] <= 1.0


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory):
    """A second stage-1 run of another size ("micro": 32 wide, 1 layer; the student is "tiny": 64 wide, 2 layers),
    the teacher of the test below, as the paper's base self-trained model is the large model's."""
    workdir = str(tmp_path_factory.mktemp("encodecmae") / "micro")
    train.train_and_evaluate(tiny_config(**{"model.size": "micro", "total_steps": 3, "checkpoint_every_steps": 3,
                                            "log_every_steps": 3}), workdir, num_devices=2)
    return workdir


def test_self_training_with_a_teacher_from_another_run(stage1, micro_run, tmp_path):
    config = tiny_config(self_training_steps=2, log_every_steps=1, checkpoint_every_steps=2)
    workdir = str(tmp_path / "selftrain")
    no_run = str(tmp_path / "no_run")
    with pytest.raises(FileNotFoundError, match=f"--teacher_workdir={no_run}: no checkpoint"):
        selftrain.prepare(config, stage1, workdir, num_frames=100, max_iter=5, num_clips=8, teacher_workdir=no_run)

    centroids, stage1_params = selftrain.prepare(config, stage1, workdir, num_frames=200, max_iter=20, num_clips=24,
                                                 teacher_workdir=micro_run)
    assert np.load(centroids).shape == (8, 32)  # fitted on the teacher's 32-dim features, not the student's 64
    summary = selftrain.read_summary(workdir)
    assert summary["teacher"] == {"workdir": os.path.abspath(micro_run), "step": 3,
                                  "params": os.path.join(workdir, selftrain.TEACHER_PARAMS_FILE), "size": "micro",
                                  "stack_type": "residual", "share_ffn": True, "width": 32}
    assert summary["stage1"] == {"workdir": os.path.abspath(stage1), "step": 12}
    assert (summary["kmeans"]["dim"], summary["kmeans"]["num_frames"]) == (32, 200)
    with pytest.raises(ValueError, match="--teacher_workdir"):  # resuming with another teacher (stage 1's)
        selftrain.prepare(config, stage1, workdir, num_frames=200, max_iter=20, num_clips=24)

    st_config = selftrain.self_training_config(config, centroids, stage1_params, summary["teacher"])
    train.train_and_evaluate(st_config, workdir, num_devices=2)
    rows = [r for r in metrics.read_metrics(workdir) if "loss" in r]
    assert rows[-1]["step"] == 2 and np.isfinite(rows[-1]["loss_kmeans"])

    # The frozen teacher is the micro run's encoder; the student started from (and is shaped as) stage 1.
    _, micro_state, _ = encoder_lib.restore_train_state(micro_run)
    _, stage2_state, meta = encoder_lib.restore_train_state(workdir)
    teacher = stage2_state["target_params"]["teacher"]
    for key in ("input_proj", "encoder_positions", "encoder"):
        jax.tree.map(np.testing.assert_array_equal, teacher[key], micro_state["params"][key])
    assert stage2_state["params"]["input_proj"]["kernel"].shape == (128, 64)
    assert stage2_state["target_params"]["centroids"].shape == (8, 32)
    # The run's saved config names the teacher (and rebuilds its architecture when restored).
    assert (meta["config"]["model"]["teacher_size"], meta["config"]["model"]["teacher_params"]) == (
        "micro", summary["teacher"]["params"])
