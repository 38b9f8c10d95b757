"""A run never reports a state it is not in (issue 22 item 1): run_summary.json says the last committed step,
finished / failed / stopped / preempted, and the error, however the run ends; a failed run is never "finished",
and exporting or evaluating an unfinished run says so."""

import json
import logging
import os
import shutil
import signal

import numpy as np
import process_helpers
import pytest
import run_helpers as rh

from audiojepa.adapters import encoder as encoder_lib
from audiojepa.data import records, shards, stats
from audiojepa.ops import frontend
from audiojepa.runtime import checkpointing, locks
from audiojepa.training import run_summary, train

pytestmark = pytest.mark.slow  # short in-process training runs


def _summary(workdir):
    with open(os.path.join(workdir, run_summary.SUMMARY_FILE)) as f:
        return json.load(f)


def test_a_run_that_fails_before_its_first_checkpoint_is_not_finished(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    config = rh.tiny_config(total_steps=3)

    def broken_step(*args, **kwargs):
        raise RuntimeError("the step broke")

    monkeypatch.setattr(train, "make_train_step", lambda *a, **k: broken_step)
    with pytest.raises(RuntimeError, match="the step broke"):
        train.train_and_evaluate(config, workdir, num_devices=1)
    summary = _summary(workdir)
    assert summary["finished"] is False and summary["status"] == "failed"
    assert summary["step"] == 0 and summary["total_steps"] == 3  # nothing committed
    assert "RuntimeError: the step broke" in summary["error"]


def test_a_run_that_fails_after_a_checkpoint_reports_that_checkpoint(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    config = rh.tiny_config(total_steps=6, checkpoint_every_steps=2)
    real_save = checkpointing.save

    def save_failing_at_step_5(manager, step, *args, **kwargs):
        if step == 5:
            raise OSError(28, "No space left on device")
        return real_save(manager, step, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "save", save_failing_at_step_5)
    with pytest.raises(OSError, match="No space left"):
        train.train_and_evaluate(config, workdir, num_devices=1)
    summary = _summary(workdir)
    assert (summary["status"], summary["finished"], summary["step"]) == ("failed", False, 4)
    assert summary["trained_step"] == 5 and summary["total_steps"] == 6  # step 5 trained, never saved
    assert "No space left" in summary["error"]

    # Exporting (or evaluating) what such a run left says that it is not finished.
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger().addHandler(handler)
    try:
        loaded = encoder_lib.load_encoder(workdir)
    finally:
        logging.getLogger().removeHandler(handler)
    warnings = [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    assert any("not finished" in w and "failed" in w and "step 4" in w for w in warnings), warnings
    assert loaded.params  # the step-4 encoder is still usable

    # Resuming to the end makes it finished, with no error left over.
    monkeypatch.setattr(checkpointing, "save", real_save)
    train.train_and_evaluate(config, workdir, num_devices=1)
    summary = _summary(workdir)
    assert (summary["status"], summary["finished"], summary["step"], summary["error"]) == ("finished", True, 6, None)


def test_stopping_early_is_stopped_not_finished(tmp_path):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(rh.tiny_config(total_steps=6), workdir, num_devices=1, stop_after=3)
    summary = _summary(workdir)
    assert (summary["status"], summary["finished"], summary["step"]) == ("stopped", False, 3)


# -- resuming on other data (issue 22 item 4) --------------------------------------------------------------

def _tone_shards(folder, seed, num_clips=24):
    """A 2-shard set of `num_clips` noisy tones at 16 kHz, with its log-mel statistics (as compute_stats)."""
    rng = np.random.default_rng(seed)
    writer = shards.ShardWriter(folder, 2)
    for i in range(num_clips):
        t = np.arange(16000) / 16000
        wave = 0.4 * np.sin(2 * np.pi * rng.uniform(200, 3000) * t) + 0.05 * rng.standard_normal(t.shape)
        writer.write(records.encode_clip(f"tone{i}", wave.astype(np.float32), 16000), 16000)
    writer.close()
    shards.write_manifest(folder, {"num_clips": num_clips, "sample_rate": 16000, "shards": writer.names,
                                   "total_hours": 0.0, "skipped": [], "input": f"tones seed {seed}"})
    stats.write_stats(folder, frontend.get_preset("m2d"), mean=-8.0 - seed, std=4.0 + seed)
    return folder


def test_resuming_on_other_shards_or_other_statistics_is_refused_and_a_moved_copy_is_not(tmp_path):
    set_a = _tone_shards(str(tmp_path / "a"), seed=0)
    set_b = _tone_shards(str(tmp_path / "b"), seed=1)
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(rh.tiny_config(total_steps=6, **{"data.shards": set_a}), workdir, num_devices=1,
                             stop_after=3)

    with pytest.raises(ValueError, match=r"config\.data\.shards") as info:
        train.train_and_evaluate(rh.tiny_config(total_steps=6, **{"data.shards": set_b}), workdir, num_devices=1)
    assert "manifest" in str(info.value)

    # compute_stats run again on the same shards, with other numbers: refused, naming the statistics.
    stats.write_stats(set_a, frontend.get_preset("m2d"), mean=-9.5, std=3.0)
    with pytest.raises(ValueError, match=r"config\.data\.norm_stats") as info:
        train.train_and_evaluate(rh.tiny_config(total_steps=6, **{"data.shards": set_a}), workdir, num_devices=1)
    assert "-8.0" in str(info.value) and "-9.5" in str(info.value)
    stats.write_stats(set_a, frontend.get_preset("m2d"), mean=-8.0, std=4.0)

    # The same shards moved elsewhere: the same run, resumed to the end.
    moved = str(tmp_path / "moved")
    shutil.move(set_a, moved)
    train.train_and_evaluate(rh.tiny_config(total_steps=6, **{"data.shards": moved}), workdir, num_devices=1)
    assert _summary(workdir)["status"] == "finished"


def test_a_second_trainer_on_a_workdir_in_use_fails_at_once_and_touches_nothing(tmp_path):
    """Issue 22 item 5: two trainers on one workdir used to both run and interleave checkpoints."""
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    with open(os.path.join(workdir, run_summary.SUMMARY_FILE), "w") as f:
        json.dump({"status": "running (the other trainer's)"}, f)
    with train.workdir_lock(workdir):  # what another trainer of this workdir holds
        with pytest.raises(locks.RunLockedError, match=rf"workdir {workdir} is in use by another run \(pid {os.getpid()}"):
            train.train_and_evaluate(rh.tiny_config(), workdir, num_devices=1)
    assert _summary(workdir) == {"status": "running (the other trainer's)"}  # the other run's file is untouched
    assert not os.path.exists(checkpointing.checkpoint_dir(workdir))
    # Once the other run has ended (its lock released), the workdir trains.
    train.train_and_evaluate(rh.tiny_config(total_steps=2), workdir, num_devices=1)
    assert _summary(workdir)["status"] == "finished"
    assert not os.path.exists(os.path.join(workdir, train.LOCK_FILE))


def _largest_file(folder):
    files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]
    return max(files, key=os.path.getsize)


def test_a_damaged_latest_checkpoint_is_skipped_by_the_trainer_and_by_exports(tmp_path, caplog):
    """Issue 22 item 3 end to end: 64 flipped bytes in the latest checkpoint's largest file used to load silently."""
    workdir = str(tmp_path / "run")
    config = rh.tiny_config(total_steps=6, checkpoint_every_steps=2)
    train.train_and_evaluate(config, workdir, num_devices=1, stop_after=4)
    path = _largest_file(os.path.join(checkpointing.checkpoint_dir(workdir), "4"))
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        chunk = f.read(64)
        f.seek(os.path.getsize(path) // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    with caplog.at_level(logging.WARNING):
        loaded = encoder_lib.load_encoder(workdir)  # evaluation/export: the step-2 encoder, with a warning
    assert any("checkpoint 4" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    assert loaded.params is not None
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        train.train_and_evaluate(config, workdir, num_devices=1)  # resumes from step 2, moves step 4 aside
    assert any("using checkpoint 2" in r.getMessage() for r in caplog.records)
    assert _summary(workdir)["status"] == "finished" and rh.committed_step(workdir) == 6
    assert os.listdir(os.path.join(workdir, "damaged_checkpoints")) == ["4"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads the process tree from Linux's /proc")
def test_a_killed_trainer_leaves_no_data_worker_running(tmp_path):
    """Issue 22 item 8: after SIGKILL of a trainer with num_workers > 0, Grain's worker processes (~250 MB each)
    stayed alive. They now exit within a second or two of the trainer (worker_lifetime.exit_when_orphaned)."""
    workdir = str(tmp_path / "run")
    proc = rh.start(rh.main_command(workdir, **{"total_steps": 500, "data.num_workers": 2}), str(tmp_path / "log"))
    try:
        rh.wait_for_step(proc, workdir, 2, rows_before=0)
        workers = process_helpers.descendants(proc.pid)
        assert len(workers) >= 2, workers  # the data workers (and multiprocessing's helpers)
    finally:
        rh.kill(proc, signal.SIGKILL)
    process_helpers.wait_for(lambda: not process_helpers.alive(workers), 10,
                             f"processes of the killed trainer still alive: {process_helpers.alive(workers)}")
