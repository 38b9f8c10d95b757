"""The generic trainer with M2D: exact resume, device-count invariance, non-finite stop, config errors.

Every run is run_helpers.tiny_config() (6 steps) on one device unless the device count is the point, so
the runs share one compiled step through the session's compilation cache."""

import os

import jax
import numpy as np
import pytest
import run_helpers as rh
from jax.sharding import get_abstract_mesh

from audiojepa.methods import m2d
from audiojepa.runtime import checkpointing, metrics
from audiojepa.training import step_metrics, train

pytestmark = pytest.mark.slow  # each test trains for a few steps (tens of seconds on 2 cores)


def test_interrupted_run_resumes_exactly(tmp_path):
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    train.train_and_evaluate(rh.tiny_config(), straight, num_devices=1)
    train.train_and_evaluate(rh.tiny_config(), interrupted, stop_after=3, num_devices=1)
    assert rh.latest_state(interrupted)[0] == 3
    # As if the first attempt had logged steps 4 and 5 (the second torn by the kill) before dying
    # without a checkpoint: the resumed run logs them again, once.
    with open(os.path.join(interrupted, "metrics.jsonl"), "a") as f:
        f.write('{"step": 4, "loss": 123.0}\n{"step": 5, "lo')
    train.train_and_evaluate(rh.tiny_config(), interrupted, num_devices=1)  # resumes from step 3
    assert [r["step"] for r in metrics.read_metrics(interrupted) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    (step_a, state_a), (step_b, state_b) = rh.latest_state(straight), rh.latest_state(interrupted)
    assert step_a == step_b == 6
    for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
        np.testing.assert_array_equal(a, b)
    # The resumed run saw the same batches: its losses for steps 4..6 equal the straight run's.
    loss = lambda rows: {r["step"]: r["loss"] for r in rows}
    la, lb = loss(metrics.read_metrics(straight)), loss(metrics.read_metrics(interrupted))
    assert [la[s] for s in (4, 5, 6)] == [lb[s] for s in (4, 5, 6)]


def test_one_and_many_devices_give_the_same_loss(tmp_path, monkeypatch):
    n = jax.device_count()
    assert n >= 4, "conftest should simulate several CPU devices"
    # The step is traced inside the run's mesh (jax.set_mesh): newer JAX (0.11+) takes the mesh of
    # arrays that explicit-sharding ops create (zeros_like, broadcasts) from that context only.
    meshes, loss = [], m2d.M2D.loss

    def loss_recording_the_mesh(self, *args, **kwargs):
        meshes.append(get_abstract_mesh())  # runs once per trace
        return loss(self, *args, **kwargs)

    monkeypatch.setattr(m2d.M2D, "loss", loss_recording_the_mesh)
    # A periodic evaluation at the last step runs inside that mesh too (16 test clips).
    config = rh.tiny_config(evals={"knn": {"type": "knn", "task": "embedded:num_clips=160,duration_s=1",
                                           "every_steps": 6}})
    one = train.train_and_evaluate(config, str(tmp_path / "one"), num_devices=1)
    many = train.train_and_evaluate(config, str(tmp_path / "many"), num_devices=n)
    assert [(m.axis_names, m.axis_sizes) for m in meshes] == [(("data",), (1,)), (("data",), (n,))]
    rows_one, rows_many = metrics.read_metrics(str(tmp_path / "one")), metrics.read_metrics(str(tmp_path / "many"))
    knn_one, knn_many = ([(r["step"], r["eval/knn/knn"]) for r in rows if "eval/knn/knn" in r]
                         for rows in (rows_one, rows_many))
    assert [s for s, _ in knn_one] == [s for s, _ in knn_many] == [6]
    assert knn_one[0][1] == pytest.approx(knn_many[0][1], abs=1 / 16 + 1e-9)  # near-equal params: at most 1 clip flips
    rows_one, rows_many = ([r for r in rows if "loss" in r] for rows in (rows_one, rows_many))
    assert len(rows_one) == len(rows_many) == 6
    for a, b in zip(rows_one, rows_many):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert one["loss"] == pytest.approx(many["loss"], rel=1e-5)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "nan")
    train.train_and_evaluate(rh.tiny_config(), workdir, stop_after=3, num_devices=1)
    _, good = rh.latest_state(workdir)
    # A std of 1e-45 (a float32 denormal; zero is refused at start-up): every normalised input is +-inf, so the
    # loss is NaN from the first resumed step (a change of input on resume, which the resume check refuses
    # unless allowed).
    with pytest.raises(step_metrics.NonFiniteLossError, match="latest checkpoint \\(3\\)"):
        train.train_and_evaluate(rh.tiny_config(**{"data.norm_stats": "0,1e-45", "allow_resume_changes": True}),
                                 workdir, num_devices=1)
    step, after = rh.latest_state(workdir)
    assert step == 3
    for a, b in zip(jax.tree.leaves(good), jax.tree.leaves(after)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("override, message", [
    ({"method": "byol"}, "byol"),
    ({"model.patch_size": (16, 20)}, "patch_size"),
    ({"model.mask_ratio": 1.0}, "mask_ratio"),
    ({"model.mask_ratio": 0.0}, "mask_ratio"),
    ({"data.shards": "/nonexistent/shards"}, "data.shards"),
    ({"batch_size": 6}, "batch_size"),
])
def test_bad_config_values_fail_at_startup_naming_the_key(tmp_path, override, message):
    with pytest.raises((ValueError, KeyError, FileNotFoundError), match=message):
        train.train_and_evaluate(rh.tiny_config(**override), str(tmp_path / "bad"))  # 8 devices: batch 6 fails


def test_workdir_holds_config_metrics_and_meta(tmp_path):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(rh.tiny_config(), workdir, num_devices=1)
    rows = metrics.read_metrics(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lr", "grad_norm", "ema_decay", "skipped_records", "data_wait_s"):
        assert key in rows[-1], key
    assert os.path.exists(os.path.join(workdir, "config.json"))
    step, meta = checkpointing.restore_meta(workdir)
    assert step == 6 and meta["method"] == "m2d" and meta["frontend"]["n_mels"] == 80
    assert meta["crop_frames"] == 48 and len(meta["norm_stats"]) == 2


def test_steps_and_warmup_from_epochs_or_steps():
    """The recipes' epoch settings (configs/m2d.py: 300 epochs, 20 warm-up, batch 2048) turned into steps
    from the shard set's clip count; explicit steps override them; what cannot be computed is an error
    naming the key, never a silent zero."""
    from audiojepa.config_utils import load_config

    config = load_config("configs/m2d.py")
    assert (config.total_steps, config.warmup_steps, config.num_epochs, config.warmup_epochs) == (0, -1, 300, 20)
    clips = 2_012_615  # AudioSet-2M as MATPAC counts it: 982 steps of 2048 per epoch
    assert train.steps_and_warmup(config, clips) == (300 * 982, 20 * 982, 982)
    config.warmup_steps = 500
    assert train.steps_and_warmup(config, clips) == (300 * 982, 500, 982)
    config.total_steps = 1000
    assert train.steps_and_warmup(config, clips) == (1000, 500, 982)
    assert train.steps_and_warmup(config, 100) == (1000, 500, 1)  # fewer clips than a batch: one step an epoch

    config = load_config("configs/m2d.py")
    with pytest.raises(ValueError, match="config.total_steps must be set"):
        train.steps_and_warmup(config, -1)  # no manifest: no clip count
    config.total_steps = 1000
    with pytest.raises(ValueError, match=r"config.warmup_epochs=20 needs the clip count.*config.warmup_steps"):
        train.steps_and_warmup(config, -1)
    config.warmup_steps = 10
    assert train.steps_and_warmup(config, -1) == (1000, 10, 0)

    config = load_config("configs/m2d.py")
    config.num_epochs = 0
    with pytest.raises(ValueError, match="config.num_epochs=0 gives 0 steps"):
        train.steps_and_warmup(config, clips)
    config.batch_size = 0
    with pytest.raises(ValueError, match="config.batch_size=0"):
        train.steps_and_warmup(config, clips)


def test_skip_policy_stops_at_the_limit_of_nonfinite_steps_in_a_row(tmp_path, monkeypatch):
    """nonfinite_policy="skip" goes on past bad batches but stops at MAX_CONSECUTIVE_NONFINITE in a row
    (README: "stops after 20 in a row"; 3 here): a std of 1e-45 (zero is refused at start-up) makes every
    step's loss NaN."""
    monkeypatch.setattr(step_metrics, "MAX_CONSECUTIVE_NONFINITE", 3)
    with pytest.raises(step_metrics.NonFiniteLossError, match=r"3 steps in a row up to step 3"):
        train.train_and_evaluate(rh.tiny_config(**{"data.norm_stats": "0,1e-45", "nonfinite_policy": "skip"}),
                                 str(tmp_path / "nan"), num_devices=1)
