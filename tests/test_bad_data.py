"""Bad data at scale: shards with corrupt, truncated, silent, NaN, wrong-rate and out-of-range records train
to the end with the skips counted by reason (metrics and run summary); a NaN batch stops the run, or is
skipped under config.nonfinite_policy="skip"."""

import json
import os

import msgpack
import numpy as np
import pytest
import run_helpers as rh

from audiojepa.data import pipeline, records, resolve, shards
from audiojepa.runtime import metrics
from audiojepa.training import run_summary, step_metrics, train

pytestmark = pytest.mark.slow  # short in-process training runs

SR = 16000


def bad_records() -> dict[str, bytes]:
    """One record per skip reason, as a broken writer, disk or upstream tool would produce them."""
    tone = (0.3 * np.sin(np.linspace(0, 800, SR))).astype(np.float32)
    good = records.encode_clip("x", tone, SR)
    truncated = msgpack.unpackb(good, raw=False)
    truncated["audio"] = truncated["audio"][: len(truncated["audio"]) // 3]
    nan = tone.copy()
    nan[100:200] = np.nan
    huge = tone * np.float32(1e20)  # finite, but its float32 power spectrum overflows into NaN log-mels
    return {
        "corrupt": good[: len(good) // 2],  # cut-off bytes: not a msgpack record
        "truncated": msgpack.packb(truncated, use_bin_type=True),  # header says more samples than stored
        "non_finite": records.encode_clip("nan", nan, SR, codec="f32"),
        "silent": records.encode_clip("silent", np.zeros(SR, np.float32), SR),
        "wrong_rate": records.encode_clip("8k", tone[: SR // 2], SR // 2),
        "out_of_range": records.encode_clip("huge", huge, SR, codec="f32"),
    }


def write_bad_shard_set(folder: str, num_good: int = 24, seed: int = 0) -> dict[str, int]:
    """A 2-shard set of `num_good` tones with one record of each bad kind spread among them.

    Returns {reason: record index}.
    """
    rng = np.random.default_rng(seed)
    raw = []
    for i in range(num_good):
        t = np.arange(int(rng.uniform(0.6, 1.0) * SR)) / SR
        wave = 0.4 * np.sin(2 * np.pi * rng.uniform(200, 3000) * t) + 0.02 * rng.standard_normal(t.shape)
        raw.append(records.encode_clip(f"tone{i}", wave.astype(np.float32), SR))
    positions = {}
    for k, (reason, record) in enumerate(bad_records().items()):
        positions[reason] = 2 + 5 * k  # never two bad records in a row
        raw.insert(positions[reason], record)
    writer = shards.ShardWriter(folder, 2)
    for r in raw:
        writer.write(r, SR)
    writer.close()
    shards.write_manifest(folder, {"num_clips": len(raw), "sample_rate": SR, "shards": writer.names,
                                   "total_hours": 0.0, "skipped": []})
    return positions


@pytest.fixture(scope="module")
def bad_shards(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("bad_shards"))
    write_bad_shard_set(folder)
    return folder


def test_each_bad_record_is_rejected_for_its_reason():
    for reason, raw in bad_records().items():
        with pytest.raises(records.CorruptRecordError) as e:
            records.decode_waveform(raw, sample_rate=SR, silence_peak=records.SILENCE_PEAK)
        assert e.value.reason == reason, (reason, str(e.value))


def test_huge_finite_samples_are_out_of_range(tmp_path):
    with pytest.raises(records.CorruptRecordError, match=r"peak amplitude 3e\+19 > 1000") as e:
        records.decode_waveform(bad_records()["out_of_range"])
    assert e.value.reason == "out_of_range"
    loud = np.full(SR, records.MAX_PEAK, np.float32)  # at the bound: still a clip
    np.testing.assert_array_equal(records.decode_waveform(records.encode_clip("loud", loud, SR, codec="f32")), loud)
    # The training source steps over it and counts it.
    tone = (0.3 * np.sin(np.linspace(0, 800, SR))).astype(np.float32)
    folder = str(tmp_path / "shards")
    shards.write_shard_set(folder, [("a", tone, {}), ("huge", tone * np.float32(1e20), {}), ("b", tone, {})],
                           sample_rate=SR, num_shards=1, codec="f32")
    paths, _ = shards.resolve_shards(folder)
    element = pipeline.ClipSource(paths, sample_rate=SR)[1]
    assert element["record_index"] == 2 and element["skipped_records"] == 1
    assert element["skipped_by_reason"][records.SKIP_REASONS.index("out_of_range")] == 1


def test_bad_shards_train_to_the_end_with_skips_counted(bad_shards, tmp_path):
    workdir = str(tmp_path / "run")
    config = rh.tiny_config(**{"data.shards": bad_shards, "data.norm_stats": "m2d"})
    train.train_and_evaluate(config, workdir)
    rows = metrics.read_metrics(workdir)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(np.isfinite(r["loss"]) and r["nonfinite_skipped"] == 0 for r in rows)
    with open(os.path.join(workdir, run_summary.SUMMARY_FILE)) as f:
        summary = json.load(f)
    assert summary["finished"] and summary["step"] == 6
    # 30 records, 48 examples: every record is read in the first epoch, so every bad one is stepped over.
    by_reason = summary["skipped_by_reason"]
    assert set(by_reason) == set(records.SKIP_REASONS) and all(by_reason[r] >= 1 for r in by_reason), by_reason
    assert summary["skipped_records"] == sum(by_reason.values()) == sum(r["skipped_records"] for r in rows)
    for reason in records.SKIP_REASONS:
        assert sum(r[f"skipped/{reason}"] for r in rows) == by_reason[reason]
    # The counts are those of the pipeline itself over the same 6 batches.
    spec = resolve.resolve_data_spec(config.data)
    ds = pipeline.make_dataset(spec, batch_size=8, seed=config.seed)
    expected = sum(ds[i]["skipped_by_reason"].sum(axis=0) for i in range(6))
    assert list(expected) == [by_reason[r] for r in records.SKIP_REASONS]


def _poison_third_batch(monkeypatch):
    """Makes the trainer's third batch all-NaN on the host (the compiled step is unchanged)."""
    real = train.sharding.to_global_batch
    calls = []

    def poisoned(local_batch, mesh):
        calls.append(1)
        if len(calls) == 3:
            local_batch = {**local_batch, "lms": np.full_like(local_batch["lms"], np.nan)}
        return real(local_batch, mesh)

    monkeypatch.setattr(train.sharding, "to_global_batch", poisoned)


def test_nan_batch_stops_the_run_by_default(tmp_path, monkeypatch):
    _poison_third_batch(monkeypatch)
    workdir = str(tmp_path / "stop")
    with pytest.raises(step_metrics.NonFiniteLossError, match=r"step 3.*latest checkpoint \(2\).*nonfinite_policy"):
        train.train_and_evaluate(rh.tiny_config(checkpoint_every_steps=2), workdir)
    assert rh.latest_state(workdir)[0] == 2


def test_nan_batch_is_skipped_under_the_skip_policy(tmp_path, monkeypatch):
    _poison_third_batch(monkeypatch)
    workdir = str(tmp_path / "skip")
    train.train_and_evaluate(rh.tiny_config(nonfinite_policy="skip"), workdir)
    rows = {r["step"]: r for r in metrics.read_metrics(workdir)}
    assert sorted(rows) == list(range(1, 7))
    assert rows[3]["nonfinite_skipped"] == 1 and sum(r["nonfinite_skipped"] for r in rows.values()) == 1
    assert all(np.isfinite(rows[s]["loss"]) for s in rows if s != 3)
    with open(os.path.join(workdir, run_summary.SUMMARY_FILE)) as f:
        summary = json.load(f)
    assert summary["finished"] and summary["nonfinite_skipped_batches"] == 1


def test_bad_nonfinite_policy_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="config.nonfinite_policy"):
        train.train_and_evaluate(rh.tiny_config(nonfinite_policy="ignore"), str(tmp_path / "bad"))
