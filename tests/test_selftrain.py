"""audiojepa.selftrain's pieces that need no trained model: the teacher-frame sampling behind the k-means
(shared/reference/encodecmae.md §1.13: 10,000 frames drawn from the pooled frames of 10,000 random items)
and the stage-2 config (150k steps)."""

import numpy as np
import pytest

from audiojepa import selftrain
from audiojepa.config_utils import load_config


def labelled_batches(num_batches, clips=8, frames=30):
    """[clips, frames, 2] batches whose frame features are (global clip id, frame index)."""
    for b in range(num_batches):
        clip_ids = np.arange(b * clips, (b + 1) * clips)
        yield np.stack(np.broadcast_arrays(clip_ids[:, None], np.arange(frames)[None, :]), axis=-1).astype(np.float32)


def test_sample_is_drawn_from_every_batch_without_replacement():
    # 100 batches x 8 clips x 30 frames = 24,000 frames; 2,400 drawn. Stopping at the first batch that
    # holds 2,400 frames (what the stage did before) would cover 80 of the 800 clips.
    sample = selftrain.sample_frames(labelled_batches(100), 2400, seed=0)
    assert sample.shape == (2400, 2)
    assert len(np.unique(sample, axis=0)) == 2400  # no frame twice
    clips = sample[:, 0].astype(int)
    assert len(np.unique(clips)) > 700  # P(a clip is missed) = (1 - 0.1)^30 ≈ 4%: ~770 of 800 expected
    # Uniform over the stream: each batch's share is Binomial(2400, 1/100), mean 24, sd ~4.9.
    per_batch = np.bincount(clips // 8, minlength=100)
    assert per_batch.min() >= 5 and per_batch.max() <= 50
    first_half = np.sum(clips < 400)
    assert abs(first_half - 1200) < 5 * np.sqrt(2400 * 0.25)  # 5 sd of Binomial(2400, 1/2)


def test_sample_matches_one_frame_at_a_time_reservoir():
    """The batched draws equal algorithm R run frame by frame with the same random numbers."""
    batches = list(labelled_batches(5, clips=3, frames=7))
    k = 20
    got = selftrain.sample_frames(iter(batches), k, seed=3)
    rng = np.random.default_rng(3)
    reservoir, t = [], 0
    for batch in batches:
        frames = batch.reshape(-1, 2)
        fill = max(0, min(k - t, len(frames)))
        reservoir.extend(frames[:fill])
        rest = frames[fill:]
        slots = rng.integers(0, t + fill + np.arange(len(rest)) + 1) if len(rest) else []
        for frame, slot in zip(rest, slots):
            if slot < k:
                reservoir[slot] = frame
        t += len(frames)
    np.testing.assert_array_equal(got, np.stack(reservoir))


def test_fewer_frames_than_asked_gives_them_all():
    sample = selftrain.sample_frames(labelled_batches(2, clips=2, frames=5), 100, seed=0)
    assert sample.shape == (20, 2) and len(np.unique(sample, axis=0)) == 20
    with pytest.raises(ValueError, match="no batches"):
        selftrain.sample_frames(iter([]), 10, seed=0)


def test_stage2_runs_the_reference_150k_steps():
    config = load_config("configs/encodecmae.py")
    assert config.total_steps == 500_000
    stage2 = selftrain.self_training_config(config, "centroids.npy", "params.msgpack")
    assert stage2.total_steps == 150_000 and stage2.model.targets == "codes+kmeans"
    assert stage2.model.kmeans_centroids == "centroids.npy" and stage2.model.stage1_params == "params.msgpack"
    config.self_training_steps = 0  # unset: stage 2 keeps total_steps
    assert selftrain.self_training_config(config, "c", "p").total_steps == 500_000


def test_stage2_config_takes_a_teacher_from_another_run():
    """With a teacher recorded from another run (selftrain.json), the stage-2 config points at its params and
    describes its architecture; without one (or one without a params file: the stage-1 run) it sets nothing."""
    config = load_config("configs/encodecmae.py:size=large")
    teacher = {"workdir": "/ckpt/base_st", "step": 150_000, "params": "/ckpt/large_st/teacher_params.msgpack",
               "size": "base", "stack_type": "residual", "share_ffn": True, "width": 768}
    stage2 = selftrain.self_training_config(config, "c.npy", "p.msgpack", teacher)
    assert stage2.model.teacher_params == teacher["params"]
    assert (stage2.model.teacher_size, stage2.model.teacher_stack_type, stage2.model.teacher_share_ffn) == (
        "base", "residual", True)
    assert stage2.model.size == "large"  # the student keeps its own size
    for own in (None, {**teacher, "params": ""}):
        plain = selftrain.self_training_config(config, "c.npy", "p.msgpack", own)
        assert (plain.model.teacher_params, plain.model.teacher_size, plain.model.teacher_share_ffn) == ("", "", None)
