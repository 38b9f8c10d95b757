"""The Grain pipeline: determinism across workers, checkpointable state, process slices, bad records."""

import os

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from array_record.python import array_record_module
from batch_helpers import assert_batches_equal, take

from audiojepa.data import compute_stats, pipeline, records, resolve, shards, stats
from audiojepa.ops import frontend

SR = 16000
PARAMS = frontend.get_preset("m2d")
CROP_FRAMES = 32  # 0.31 s: small so the tests are fast


def _clips(n, seed=0):
    """Tones of different pitch and length (some shorter than the crop, to exercise padding)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        seconds = rng.uniform(0.1, 0.8)
        t = np.arange(int(seconds * SR)) / SR
        wave = 0.5 * np.sin(2 * np.pi * rng.uniform(100, 4000) * t) + 0.01 * rng.standard_normal(t.shape)
        yield f"clip{i:03d}", wave.astype(np.float32), {"n": str(i)}


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("shards"))
    shards.write_shard_set(folder, _clips(40), sample_rate=SR, num_shards=3)
    return folder


def _spec(folder, crop_frames=CROP_FRAMES, mean=-5.0, std=3.0):
    paths, manifest = shards.resolve_shards(folder)
    return pipeline.DataSpec(tuple(paths), PARAMS, crop_frames, mean, std, manifest["num_clips"])


def test_batch_shapes_and_normalisation(shard_dir):
    spec = _spec(shard_dir)
    batch = next(pipeline.make_iterator(pipeline.make_dataset(spec, batch_size=4, seed=0)))
    assert batch["lms"].shape == (4, PARAMS.n_mels, CROP_FRAMES) and batch["lms"].dtype == np.float32
    assert batch["skipped_records"].shape == (4,) and batch["skipped_records"].sum() == 0
    raw = next(pipeline.make_iterator(pipeline.make_dataset(spec, batch_size=4, seed=0, normalize=False)))
    np.testing.assert_allclose(batch["lms"], (raw["lms"] + 5.0) / 3.0, rtol=1e-6, atol=1e-6)


def test_same_batches_for_0_and_2_workers(shard_dir):
    ds = pipeline.make_dataset(_spec(shard_dir), batch_size=4, seed=3)
    serial = take(pipeline.make_iterator(ds, num_workers=0), 12)  # 48 elements: crosses an epoch boundary
    parallel = take(pipeline.make_iterator(ds, num_workers=2), 12)
    threaded = take(pipeline.make_iterator(ds, read_threads=2), 12)
    assert_batches_equal(serial, parallel)
    assert_batches_equal(serial, threaded)
    # Different seeds give different streams.
    other = take(pipeline.make_iterator(pipeline.make_dataset(_spec(shard_dir), batch_size=4, seed=4)), 1)
    assert not np.array_equal(other[0]["lms"], serial[0]["lms"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_iterator_state_restores_exactly(shard_dir, num_workers):
    ds = pipeline.make_dataset(_spec(shard_dir), batch_size=4, seed=1)
    it = pipeline.make_iterator(ds, num_workers=num_workers)
    take(it, 5)
    state = it.get_state()
    expected = take(it, 4)
    fresh = pipeline.make_iterator(ds, num_workers=num_workers)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 4), expected)


def test_iterator_state_through_orbax(shard_dir, tmp_path):
    ds = pipeline.make_dataset(_spec(shard_dir), batch_size=4, seed=2)
    it = pipeline.make_iterator(ds, num_workers=2)
    take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
    expected = take(it, 3)
    fresh = pipeline.make_iterator(ds, num_workers=2)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    assert_batches_equal(take(fresh, 3), expected)


@pytest.mark.parametrize("process_count", [2, 3])
def test_process_slices_are_disjoint_and_cover_an_epoch(shard_dir, process_count):
    spec = _spec(shard_dir)
    seen = []
    for p in range(process_count):
        ds = pipeline.make_dataset(spec, batch_size=1, seed=0, process_index=p, process_count=process_count,
                                   device_frontend=True, num_epochs=1)
        seen.append([(int(ds[i]["record_index"][0]), ds[i]["waveform"][0].tobytes()) for i in range(len(ds))])
    # 40 records: slices are pairwise disjoint and together hold every record once, with the same crop
    # as a single process would take.
    flat = [w for s in seen for w in s]
    assert len(flat) == 40 and sorted(r for r, _ in flat) == list(range(40))
    for a in range(process_count):
        for b in range(a + 1, process_count):
            assert not set(seen[a]) & set(seen[b])
    single = pipeline.make_dataset(spec, batch_size=1, seed=0, device_frontend=True, num_epochs=1)
    assert {(int(single[i]["record_index"][0]), single[i]["waveform"][0].tobytes())
            for i in range(len(single))} == set(flat)


def test_random_crop_and_zero_pad():
    crop = pipeline.RandomCrop(100)
    long = np.arange(1000, dtype=np.float32)
    out = crop.random_map({"waveform": long}, np.random.default_rng(0))["waveform"]
    assert out.shape == (100,) and np.all(np.diff(out) == 1) and 0 <= out[0] <= 900
    starts = {crop.random_map({"waveform": long}, np.random.default_rng(s))["waveform"][0] for s in range(200)}
    assert min(starts) < 100 and max(starts) > 800  # offsets spread over the whole clip
    short = crop.random_map({"waveform": np.ones(30, np.float32)}, np.random.default_rng(0))["waveform"]
    np.testing.assert_array_equal(short, np.r_[np.ones(30), np.zeros(70)].astype(np.float32))


def test_corrupt_record_is_skipped_and_counted(tmp_path):
    folder = str(tmp_path)
    shards.write_shard_set(folder, _clips(10), sample_rate=SR, num_shards=1)
    # Rewrite the shard with record 4 replaced by garbage and record 7 truncated.
    path = os.path.join(folder, shards.read_manifest(folder)["shards"][0])
    reader = array_record_module.ArrayRecordReader(path)
    raw = reader.read_all()
    reader.close()
    raw[4] = b"\x93garbage"
    raw[7] = raw[7][: len(raw[7]) // 2]
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for r in raw:
        writer.write(r)
    writer.close()
    good = {records.decode_waveform(r).tobytes() for i, r in enumerate(raw) if i not in (4, 7)}

    ds = pipeline.make_dataset(_spec(folder), batch_size=1, seed=0, device_frontend=True, num_epochs=1)
    ds_full = pipeline.make_dataset(_spec(folder, crop_frames=200), batch_size=1, seed=0,
                                    device_frontend=True, num_epochs=1)
    skipped = sum(int(ds[i]["skipped_records"].sum()) for i in range(len(ds)))
    assert skipped == 2
    # Every element is a real clip (the next good record stands in for a bad one).
    for i in range(len(ds_full)):
        wave = ds_full[i]["waveform"][0]
        assert any(wave[: len(np.frombuffer(g, np.float32))].tobytes() == g for g in good)


def test_stats_match_numpy_over_one_epoch(tmp_path):
    # Clips exactly one crop long: one epoch of crops is every clip once, so the statistics must equal
    # NumPy's over the host log-mels of all clips.
    n = PARAMS.num_samples_for_frames(CROP_FRAMES)
    rng = np.random.default_rng(0)
    clips = [(f"c{i}", (0.2 * rng.standard_normal(n)).astype(np.float32), {}) for i in range(16)]
    shards.write_shard_set(str(tmp_path), iter(clips), sample_rate=SR, num_shards=2)
    result = compute_stats.compute_logmel_stats(_spec(str(tmp_path)), num_crops=16, batch_size=8, progress=False)
    pcm = [records.decode_waveform(records.encode_clip("x", w, SR)) for _, w, _ in clips]
    lms = np.stack([frontend.logmel_host(w, PARAMS) for w in pcm]).astype(np.float64)
    assert result["mean"] == pytest.approx(lms.mean(), rel=1e-6)
    assert result["std"] == pytest.approx(lms.std(), rel=1e-6)
    stats.write_stats(str(tmp_path), PARAMS, **result)
    assert stats.read_stats(str(tmp_path), PARAMS) == (pytest.approx(lms.mean(), rel=1e-6),
                                                       pytest.approx(lms.std(), rel=1e-6))
    # One epoch in batches that do not divide it (6 + 6 + 4): still exactly 16 crops, each clip once (the
    # last batch of 6 would read 2 clips of the next epoch, shuffled anew).
    uneven = compute_stats.compute_logmel_stats(_spec(str(tmp_path)), num_crops=16, batch_size=6, progress=False)
    assert uneven["num_crops"] == 16
    assert uneven["mean"] == pytest.approx(lms.mean(), rel=1e-6) and uneven["std"] == pytest.approx(lms.std(), rel=1e-6)


def test_resolve_data_spec_errors_name_the_config_key(shard_dir, tmp_path):
    import ml_collections

    cfg = ml_collections.ConfigDict({"shards": shard_dir, "frontend": "audiojepa", "crop_frames": 32,
                                     "norm_stats": "m2d"})
    with pytest.raises(ValueError, match="data.frontend"):
        resolve.resolve_data_spec(cfg)
    cfg.frontend = "m2d"
    cfg.norm_stats = "shards"
    with pytest.raises(FileNotFoundError, match="compute_stats.py"):
        resolve.resolve_data_spec(cfg)
    cfg.norm_stats = "m2d"
    spec = resolve.resolve_data_spec(cfg)
    assert (spec.norm_mean, spec.norm_std) == stats.M2D_DEFAULT_STATS and spec.num_clips == 40
    cfg.shards = str(tmp_path / "nothing*.array_record")
    with pytest.raises(FileNotFoundError, match="data.shards"):
        resolve.resolve_data_spec(cfg)


def test_device_frontend_batches_match_host_batches(shard_dir):
    # Same seed, same crops: the waveform pipeline + device log-mel must reproduce the host pipeline's
    # normalised log-mels (tolerance: the host/device log-mel agreement of test_frontend, / std).
    spec = _spec(shard_dir)
    host = next(pipeline.make_iterator(pipeline.make_dataset(spec, batch_size=4, seed=5)))
    wave = next(pipeline.make_iterator(pipeline.make_dataset(spec, batch_size=4, seed=5, device_frontend=True)))
    assert wave["waveform"].shape == (4, spec.crop_samples)
    np.testing.assert_array_equal(host["record_index"], wave["record_index"])
    device = jax.jit(frontend.logmel_device, static_argnums=1)(wave["waveform"], PARAMS)
    device = np.asarray(stats.normalize(device, spec.norm_mean, spec.norm_std))
    assert device.shape == host["lms"].shape
    np.testing.assert_allclose(device, host["lms"], atol=2e-3 / spec.norm_std)


def test_compute_stats_cli_writes_stats_the_config_picks_up(shard_dir, tmp_path):
    import shutil
    import subprocess
    import sys

    import ml_collections

    shard_dir = str(shutil.copytree(shard_dir, tmp_path / "shards"))  # leave the shared fixture without stats
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "tools/compute_stats.py", f"--shards={shard_dir}", "--frontend=m2d",
                             "--crop_frames=32", "--num_crops=64"], cwd=repo, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    mean, std = stats.read_stats(shard_dir, PARAMS)
    cfg = ml_collections.ConfigDict({"shards": shard_dir, "frontend": "m2d", "crop_frames": 32,
                                     "norm_stats": "shards"})
    spec = resolve.resolve_data_spec(cfg)
    assert (spec.norm_mean, spec.norm_std) == (mean, std)
    assert -20 < mean < 5 and 0.5 < std < 10


def test_a_truncated_or_short_shard_is_an_error_naming_it(shard_dir, tmp_path):
    import shutil

    folder = str(tmp_path / "copy")
    shutil.copytree(shard_dir, folder)
    paths, manifest = shards.resolve_shards(folder)
    spec = pipeline.DataSpec(tuple(paths), PARAMS, CROP_FRAMES, -5.0, 3.0, manifest["num_clips"], manifest=manifest)
    assert pipeline.manifest_shard_sizes(spec) == manifest["shard_num_clips"]
    with open(paths[1], "r+b") as f:  # a partial copy: the file's second half is missing
        f.truncate(os.path.getsize(paths[1]) // 2)
    with pytest.raises(RuntimeError, match=f"cannot read shard {paths[1]}"):
        pipeline.make_dataset(spec, batch_size=4, seed=0)
    # A shard that reads fine but holds fewer records than the manifest lists.
    shutil.copy(os.path.join(shard_dir, os.path.basename(paths[0])), paths[1])
    with pytest.raises(ValueError, match=rf"{paths[1]} holds \d+ records where its manifest.json lists \d+"):
        pipeline.make_dataset(spec, batch_size=4, seed=0)


def test_a_read_error_is_retried_and_corruption_is_not(shard_dir, monkeypatch):
    """A storage hiccup (OSError on the first reads) is waited out and the element is the record itself,
    with nothing counted as skipped; an error that says the data are corrupt skips the record at once."""
    monkeypatch.setattr(pipeline, "READ_RETRY_DELAYS_S", (0.0, 0.0, 0.0))
    paths, _ = shards.resolve_shards(shard_dir)
    source = pipeline.ClipSource(paths, sample_rate=SR)
    expected = source[5]

    class Flaky:
        def __init__(self, inner, failures, message):
            self.inner, self.failures, self.message, self.calls = inner, failures, message, 0

        def __getitem__(self, i):
            self.calls += 1
            if self.calls <= self.failures:
                raise OSError(self.message)
            return self.inner[i]

    real = source._source
    source._source = Flaky(real, 3, "Stale file handle")
    got = source[5]
    assert source._source.calls == 4 and int(got["skipped_records"]) == 0
    np.testing.assert_array_equal(got["waveform"], expected["waveform"])

    source._source = Flaky(real, 4, "Stale file handle")  # still failing after every retry: skipped, counted
    got = source[5]
    assert int(got["skipped_records"]) == 1 and int(got["record_index"]) == 6

    source._source = Flaky(real, 1, "Corrupted Riegeli/records file: chunk data hash mismatch")
    got = source[5]
    assert source._source.calls == 2 and int(got["skipped_records"]) == 1  # no retry: the next record


def test_typos_in_data_config_name_the_key():
    import ml_collections

    from audiojepa.config_utils import data_config

    config = ml_collections.ConfigDict({**data_config("m2d", 48).to_dict(),
                                        "frontend": {"sample_rate": 16000, "n_melz": 80}})
    with pytest.raises(ValueError, match=r"config.data.frontend: unknown LogMelParams keys \['n_melz'\]"):
        resolve.resolve_data_spec(config)
    config = data_config("m2d", 48)
    config.embedded.num_clip = 10
    with pytest.raises(ValueError, match=r"config.data.embedded has unknown keys \['num_clip'\]"):
        resolve.resolve_data_spec(config)
