"""The generic trainer with M2D: exact resume, device-count invariance, non-finite stop, config errors."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from audiojepa.config_utils import set_by_path
from audiojepa import checkpointing, metrics, train
from configs import m2d as m2d_config

pytestmark = pytest.mark.slow  # each test trains for a few steps (tens of seconds on 2 cores)


def tiny_config(cache_dir, **overrides):
    """runlocal shrunk further: 48-frame crops (15 patches), batch 8, a 64-clip embedded corpus."""
    config = m2d_config.get_config("runlocal")
    config.batch_size = 8
    config.total_steps = 6
    config.warmup_steps = 2
    config.log_every_steps = 1
    config.checkpoint_every_steps = 3
    config.async_checkpoints = False
    config.tensorboard = False
    config.data.crop_frames = 48
    config.data.embedded.num_clips = 64
    config.data.embedded.duration_s = 1.0
    for key, value in overrides.items():
        set_by_path(config, key, value)
    return config


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("AUDIOJEPA_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _final_state(workdir):
    manager = checkpointing.make_manager(workdir, every_steps=1, read_only=True)
    step = manager.latest_step()
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    manager.close()
    return step, state


def test_interrupted_run_resumes_exactly(tmp_path):
    straight, interrupted = str(tmp_path / "straight"), str(tmp_path / "interrupted")
    train.train_and_evaluate(tiny_config(None), straight)
    train.train_and_evaluate(tiny_config(None), interrupted, stop_after=3)
    assert _final_state(interrupted)[0] == 3
    train.train_and_evaluate(tiny_config(None), interrupted)  # resumes from step 3
    (step_a, state_a), (step_b, state_b) = _final_state(straight), _final_state(interrupted)
    assert step_a == step_b == 6
    for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
        np.testing.assert_array_equal(a, b)
    # The resumed run saw the same batches: its losses for steps 4..6 equal the straight run's.
    loss = lambda rows: {r["step"]: r["loss"] for r in rows}
    la, lb = loss(metrics.read_metrics(straight)), loss(metrics.read_metrics(interrupted))
    assert [la[s] for s in (4, 5, 6)] == [lb[s] for s in (4, 5, 6)]


def test_one_and_many_devices_give_the_same_loss(tmp_path):
    n = jax.device_count()
    assert n >= 4, "conftest should simulate several CPU devices"
    one = train.train_and_evaluate(tiny_config(None, total_steps=2), str(tmp_path / "one"), num_devices=1)
    many = train.train_and_evaluate(tiny_config(None, total_steps=2), str(tmp_path / "many"), num_devices=n)
    rows_one, rows_many = metrics.read_metrics(str(tmp_path / "one")), metrics.read_metrics(str(tmp_path / "many"))
    for a, b in zip(rows_one, rows_many):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert one["loss"] == pytest.approx(many["loss"], rel=1e-5)


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    workdir = str(tmp_path / "nan")
    train.train_and_evaluate(tiny_config(None), workdir, stop_after=3)
    _, good = _final_state(workdir)
    # Zero std: every normalised input is +-inf, so the loss is NaN from the first resumed step.
    with pytest.raises(train.NonFiniteLossError, match="latest checkpoint \\(3\\)"):
        train.train_and_evaluate(tiny_config(None, **{"data.norm_stats": "0,0"}), workdir)
    step, after = _final_state(workdir)
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
        train.train_and_evaluate(tiny_config(None, **override), str(tmp_path / "bad"))


def test_workdir_holds_config_metrics_and_meta(tmp_path):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(tiny_config(None, total_steps=3), workdir)
    rows = metrics.read_metrics(workdir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss", "lr", "grad_norm", "ema_decay", "skipped_records", "data_wait_s"):
        assert key in rows[-1], key
    assert os.path.exists(os.path.join(workdir, "config.json"))
    step, meta = checkpointing.restore_meta(workdir)
    assert step == 3 and meta["method"] == "m2d" and meta["frontend"]["n_mels"] == 80
    assert meta["crop_frames"] == 48 and len(meta["norm_stats"]) == 2
