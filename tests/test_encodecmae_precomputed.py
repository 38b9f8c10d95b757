"""EncodecMAE on precomputed EnCodec targets: tools/precompute_encodec_targets.py and its library
(audiojepa.data.encodec_targets), the γ_q tool, the Grain pipeline's frame crops, the trainer's path and
its errors.

Tiny 24 kHz shard sets (1-2 s clips) and seeded random EnCodec weights. References: EnCodec run directly
on each clip (`encodec.encode`, one clip at its own length) and NumPy float64 for the quantization errors.
Tolerances: float32 features within 2e-6 + 1e-5·|x| of the direct run (the padded batch runs the same ops on
other shapes); float16 features within float16 rounding of it, 2^-11·|x| + 2e-6; codes equal except at
near-ties of the RVQ argmin (`assert_codes_match`).
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from array_record.python import array_record_module
from batch_helpers import assert_batches_equal, take
from tqdm import tqdm

from audiojepa import methods
from audiojepa.config_utils import data_config, load_config, set_by_path
from audiojepa.data import (
    encodec_targets,
    pipeline,
    records,
    resolve,
    shards,
    target_records,
)
from audiojepa.methods import encodecmae_loss
from audiojepa.methods.encodecmae import (
    EncodecMAE,
    default_config,
    random_encodec_params,
)
from audiojepa.models import encodec
from audiojepa.runtime import metrics
from audiojepa.training import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SR = encodec.SAMPLE_RATE
# Clip lengths in samples: most not multiples of 320 (the last frame is partial), one exactly 30 frames.
CLIP_SAMPLES = (24123, 30000, 40017, 9600 * 3, 33333, 47999)
CORRUPT = ("shard-00000-of-00002.array_record", 1)  # (shard, record index) overwritten with garbage
N_Q = 8
CROP_FRAMES = 30  # 0.4 s
F16_TOL = 2.0 ** -11  # float16 round-to-nearest: relative error at most half an ulp (2^-11)


def _wave(i, n):
    rng = np.random.default_rng(i)
    t = np.arange(n) / SR
    return (0.3 * np.sin(2 * np.pi * rng.uniform(100, 3000) * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


def _write_waveform_shards(folder, sample_rate=SR):
    clips = [(f"clip{i}", _wave(i, n), {"index": str(i)}) for i, n in enumerate(CLIP_SAMPLES)]
    shards.write_shard_set(folder, clips, sample_rate=sample_rate, num_shards=2, codec="f32")
    return {clip_id: wave for clip_id, wave, _ in clips}


def _read_records(folder, name):
    reader = array_record_module.ArrayRecordReader(os.path.join(folder, name))
    raw = reader.read_all()
    reader.close()
    return raw


@pytest.fixture(scope="module")
def params():
    return random_encodec_params(0, N_Q)


@pytest.fixture(scope="module")
def waveforms(tmp_path_factory):
    """(folder of 24 kHz waveform shards with one corrupt record, {clip id: waveform} of the good clips)."""
    folder = str(tmp_path_factory.mktemp("wave24k"))
    waves = _write_waveform_shards(folder)
    name, index = CORRUPT
    raw = _read_records(folder, name)
    del waves[records.decode_header(raw[index])["id"]]
    raw[index] = b"\x93not a record"
    writer = array_record_module.ArrayRecordWriter(os.path.join(folder, name), "group_size:1")
    for r in raw:
        writer.write(r)
    writer.close()
    return folder, waves


@pytest.fixture(scope="module")
def targets32(waveforms, params, tmp_path_factory):
    """float32 targets: 2 s chunks (no clip is cut), 2 rows per EnCodec call."""
    out = str(tmp_path_factory.mktemp("targets32"))
    encodec_targets.precompute(waveforms[0], out, encodec_params=params, source="random seed 0", num_codebooks=N_Q,
                               feature_dtype="float32", batch_rows=2, chunk_seconds=2.0, progress=False)
    return out


@pytest.fixture(scope="module")
def targets16(waveforms, params, tmp_path_factory):
    """float16 targets, other buckets: 4 s chunks (rows padded to 4 s instead of 2 s), 3 rows per call."""
    out = str(tmp_path_factory.mktemp("targets16"))
    encodec_targets.precompute(waveforms[0], out, encodec_params=params, source="random seed 0", num_codebooks=N_Q,
                               feature_dtype="float16", batch_rows=3, chunk_seconds=4.0, progress=False)
    return out


@pytest.fixture(scope="module")
def direct(waveforms, params):
    """{clip id: (features [T, 128], codes [T, n_q])}: EnCodec + RVQ on each clip alone, at its own length."""
    fn = jax.jit(encodec.encode, static_argnums=2)
    out = {}
    for clip_id, wave in waveforms[1].items():
        features, codes = fn(params, wave[None], N_Q)
        out[clip_id] = (np.asarray(features[0]), np.asarray(codes[0]))
    return out


def stored(folder):
    """{clip id: decoded target record} of a targets folder, and the ids per shard in order."""
    manifest = shards.read_manifest(folder)
    out, order = {}, []
    for name in manifest["shards"]:
        decoded = [target_records.decode_targets(r) for r in _read_records(folder, name)]
        order.append([d["id"] for d in decoded])
        out.update({d["id"]: d for d in decoded})
    return out, order


def assert_codes_match(codes, expected, features, codebooks, tie=1e-4):
    """codes == expected [T, n_q], except frames whose first differing stage is a near-tie (distances of the
    two entries within `tie`) on the residual of the reference `features` [T, 128]."""
    codes, expected = np.asarray(codes), np.asarray(expected)
    assert codes.shape == expected.shape
    for t in np.flatnonzero((codes != expected).any(axis=1)):
        q = int(np.flatnonzero(codes[t] != expected[t])[0])
        residual = features[t].astype(np.float64) - sum(codebooks[s][expected[t, s]] for s in range(q))
        d = [np.sum((residual - codebooks[q][c]) ** 2) for c in (codes[t, q], expected[t, q])]
        assert abs(d[0] - d[1]) < tie, f"frame {t} stage {q}: codes {codes[t, q]} vs {expected[t, q]}, distances {d}"
    assert (codes != expected).any(axis=1).mean() <= 0.05


def assert_features_close(ours, reference, rtol):
    ours, reference = np.asarray(ours, np.float32), np.asarray(reference, np.float32)
    assert ours.shape == reference.shape
    assert np.all(np.abs(ours - reference) <= 2e-6 + rtol * np.abs(reference)), np.abs(ours - reference).max()


# -- (a) the stored targets equal EnCodec run on each clip ---------------------------------------------------

def test_float32_targets_equal_encodec_on_each_clip(targets32, direct, params):
    records_, _ = stored(targets32)
    assert set(records_) == set(direct)
    for clip_id, (features, codes) in direct.items():
        record = records_[clip_id]
        n = record["num_samples"]
        assert record["features"].shape == (-(-n // 320), 128) == features.shape  # ceil(n / 320) frames
        assert record["features"].dtype == np.float32 and record["codes"].dtype == np.int16
        assert_features_close(record["features"], features, 1e-5)
        assert_codes_match(record["codes"], codes, features, params["codebooks"])


def test_float16_targets_in_other_buckets_equal_within_float16_rounding(targets16, targets32, direct, params):
    records16, _ = stored(targets16)
    records32, _ = stored(targets32)
    for clip_id, (features, codes) in direct.items():
        assert records16[clip_id]["features"].dtype == np.float16
        assert_features_close(records16[clip_id]["features"], features, F16_TOL + 1e-5)
        # Codes come from the float32 features, whatever the storage dtype and the padded row length.
        assert_codes_match(records16[clip_id]["codes"], codes, features, params["codebooks"])
        assert_codes_match(records16[clip_id]["codes"], records32[clip_id]["codes"], features, params["codebooks"])


def test_padding_buckets_and_chunks(params):
    wave = _wave(7, 12345)  # 38.6 frames: a partial last frame
    fn = jax.jit(encodec.encode, static_argnums=2)
    alone = [np.asarray(a[0]) for a in fn(params, wave[None], N_Q)]
    # The same clip alone, with a shorter neighbour, in every bucket of a 1.5 s chunk: the same frames.
    chunk = encodec_targets.chunk_samples_for(1.5)
    assert chunk == 36160 and encodec_targets.bucket_lengths(chunk) == (4800, 9280, 18240, 36160)  # 15..113 frames
    for other in (100, 20000):  # the batch's longest row sets its bucket: 18,240 or 36,160 samples
        out = list(encodec_targets.encode_clips(params, [("a", _wave(8, other)), ("b", wave)], num_codebooks=N_Q,
                                                batch_rows=2, chunk_samples=chunk))
        assert [c.key for c in out] == ["a", "b"]
        assert out[1].features.shape == (39, 128) and out[1].codes.shape == (39, N_Q)
        assert_features_close(out[1].features, alone[0], 1e-5)
        assert_codes_match(out[1].codes, alone[1], alone[0], params["codebooks"])
    # A clip longer than the chunk: independent chunks of 0.2 s (4800 samples = 15 frames), then the rest.
    (clip,) = encodec_targets.encode_clips(params, [("c", wave)], num_codebooks=N_Q, batch_rows=2, chunk_samples=4800)
    assert clip.features.shape[0] == 39 == 15 + 15 + 9
    for start in (0, 4800, 9600):
        piece = [np.asarray(a[0]) for a in fn(params, wave[None, start:start + 4800], N_Q)]
        frames = slice(start // 320, start // 320 + piece[0].shape[0])
        assert_features_close(clip.features[frames], piece[0], 1e-5)
        assert_codes_match(clip.codes[frames], piece[1], piece[0], params["codebooks"])


# -- (b) manifest and skipped records ---------------------------------------------------------------------

def test_manifest_counts_order_and_the_skipped_record(targets32, waveforms):
    folder, waves = waveforms
    manifest = shards.read_manifest(targets32)
    lengths = [w.shape[0] for w in waves.values()]
    assert manifest["kind"] == "encodec_targets" and manifest["encodec_source"] == "random seed 0"
    assert (manifest["frame_rate_hz"], manifest["hop_samples"], manifest["sample_rate"]) == (75, 320, 24000)
    assert manifest["num_codebooks"] == N_Q and manifest["feature_dtype"] == "float32"
    assert manifest["num_clips"] == len(waves) == len(CLIP_SAMPLES) - 1 and manifest["input_num_records"] == 6
    assert manifest["total_frames"] == sum(-(-n // 320) for n in lengths)
    assert manifest["total_hours"] == pytest.approx(sum(lengths) / SR / 3600)
    assert len(manifest["shards"]) == 2 and sum(manifest["shard_num_clips"]) == len(waves)
    (skip,) = manifest["skipped"]
    assert manifest["num_skipped"] == 1 and skip["path"] == f"{CORRUPT[0]}:{CORRUPT[1]}" and skip["reason"] == "corrupt"
    # Output shard i holds input shard i's good clips, in order, with their metadata.
    _, order = stored(targets32)
    for name, ids in zip(shards.read_manifest(folder)["shards"], order):
        expected = []
        for raw in _read_records(folder, name):
            try:
                expected.append(records.decode_header(raw)["id"])
            except records.CorruptRecordError:
                pass
        assert ids == expected
    records_, _ = stored(targets32)
    assert records_["clip3"]["metadata"] == {"index": "3"} and "clip2" not in records_  # clip2 was record 1


def _flip_middle(path, num_bytes=4096):
    """Inverts `num_bytes` in the middle of a file (a bad disk block or a corrupted copy)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size // 2)
        block = f.read(num_bytes)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in block))


def test_read_clips_skips_the_records_of_a_corrupt_chunk(tmp_path):
    folder = str(tmp_path / "flipped")
    clips = [(f"c{i}", _wave(i, SR // 2), {}) for i in range(20)]
    shards.write_shard_set(folder, clips, sample_rate=SR, num_shards=1)
    manifest = shards.read_manifest(folder)
    name = manifest["shards"][0]
    _flip_middle(os.path.join(folder, name))
    skipped = []
    read = [key for key, _ in encodec_targets._read_clips(folder, manifest, skipped, tqdm(disable=True))]
    assert 1 <= len(skipped) <= 2 and len(read) + len(skipped) == 20, skipped
    bad = [int(s["path"].split(":")[1]) for s in skipped]
    for entry in skipped:
        assert entry["reason"] == "corrupt" and entry["path"].startswith(f"{name}:"), entry
        assert f"of shard {os.path.join(folder, name)}" in entry["detail"], entry
    assert [key[2] for key in read] == [f"c{i}" for i in range(20) if i not in bad]


def test_interrupted_overwrite_keeps_the_old_targets(waveforms, targets32, params, tmp_path, monkeypatch):
    out = str(tmp_path / "targets")
    shutil.copytree(targets32, out)

    def snapshot():
        return {name: open(os.path.join(out, name), "rb").read() for name in sorted(os.listdir(out))}

    before = snapshot()
    real, calls = records.decode_waveform, []

    def decode_then_interrupt(raw, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(raw, **kwargs)

    kwargs = dict(encodec_params=params, source="random seed 0", num_codebooks=N_Q, feature_dtype="float32",
                  batch_rows=2, chunk_seconds=2.0, progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        encodec_targets.precompute(waveforms[0], out, **kwargs)
    with monkeypatch.context() as m:
        m.setattr(records, "decode_waveform", decode_then_interrupt)
        with pytest.raises(KeyboardInterrupt):
            encodec_targets.precompute(waveforms[0], out, overwrite=True, **kwargs)
    assert snapshot() == before
    assert sorted(os.listdir(tmp_path)) == ["targets"]  # no staging folder left behind
    encodec_targets.precompute(waveforms[0], out, overwrite=True, **kwargs)
    assert snapshot() == before  # the same targets, rewritten
    assert sorted(os.listdir(tmp_path)) == ["targets"]


# -- (c) quantization errors and γ_q ------------------------------------------------------------------------

def test_quantization_error_matches_numpy(targets32, params):
    codebooks = params["codebooks"].astype(np.float64)
    records_, _ = stored(targets32)
    energy, frames = np.zeros(N_Q + 1), 0
    for record in records_.values():
        residual = record["features"].astype(np.float64)
        energy[0] += np.sum(residual ** 2)
        for q in range(N_Q):
            residual = residual - codebooks[q][record["codes"][:, q]]
            energy[q + 1] += np.sum(residual ** 2)
        frames += residual.shape[0]
    errors = shards.read_manifest(targets32)["quantization_error"]
    np.testing.assert_allclose(errors, energy / frames, rtol=1e-5)
    assert np.all(np.diff(errors) < 0)  # every stage removes some error


def test_codebook_weights_cli(targets32, tmp_path):
    out = str(tmp_path / "gamma.json")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "encodecmae_codebook_weights.py"),
                          f"--targets={targets32}", f"--output={out}"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    with open(out) as f:
        result = json.load(f)
    errors = shards.read_manifest(targets32)["quantization_error"]
    expected = encodecmae_loss.codebook_weights_from_errors(errors)
    np.testing.assert_array_equal(result["codebook_weights"], expected)
    assert result["override"] in run.stdout
    weights = ",".join(f"{w:.8g}" for w in expected)
    assert result["override"] == f"--config.model.num_codebooks=8 --config.model.codebook_weights='({weights},)'"


# -- (d) the pipeline's frame crops ---------------------------------------------------------------------------

def _spec(folder, crop_frames=CROP_FRAMES, frontend="encodec"):
    config = data_config(frontend, crop_frames, norm_stats="shards")
    config.shards = folder
    return resolve.resolve_data_spec(config)


def test_pipeline_crops_are_frame_slices_of_the_stored_targets(targets16):
    spec = _spec(targets16)
    assert spec.kind == "encodec_targets" and spec.target_frames == CROP_FRAMES and spec.num_clips == 5
    assert (spec.norm_mean, spec.norm_std) == (0.0, 1.0)  # no statistics for targets
    ds = pipeline.make_dataset(spec, batch_size=2, seed=0, num_epochs=1)
    source = pipeline.TargetSource(list(spec.shard_paths), num_codebooks=N_Q)
    starts = set()
    for i in range(len(ds)):
        batch = ds[i]
        assert set(batch) == {"features", "codes", "skipped_records", "skipped_by_reason", "record_index"}
        assert batch["features"].shape == (2, CROP_FRAMES, 128) and batch["features"].dtype == np.float32
        assert batch["codes"].shape == (2, CROP_FRAMES, N_Q) and batch["codes"].dtype == np.int32
        for features, codes, index in zip(batch["features"], batch["codes"], batch["record_index"]):
            record = source[int(index)]
            full = record["features"].astype(np.float32)
            matches = [s for s in range(full.shape[0] - CROP_FRAMES + 1)
                       if np.array_equal(full[s:s + CROP_FRAMES], features)]
            assert matches, "the crop is not a whole-frame slice of the stored features"
            assert any(np.array_equal(record["codes"][s:s + CROP_FRAMES], codes) for s in matches)
            starts.add(matches[0])
    assert len(starts) > 1  # random offsets


def test_random_frame_crop_pads_short_clips():
    crop = pipeline.RandomFrameCrop(10)
    element = {"features": np.ones((4, 128), np.float16), "codes": np.full((4, 3), 7, np.int16)}
    out = crop.random_map(element, np.random.default_rng(0))
    np.testing.assert_array_equal(out["features"], np.r_[np.ones((4, 128)), np.zeros((6, 128))].astype(np.float32))
    np.testing.assert_array_equal(out["codes"], np.r_[np.full((4, 3), 7), np.zeros((6, 3))].astype(np.int32))
    assert out["features"].dtype == np.float32 and out["codes"].dtype == np.int32


def test_pipeline_is_seeded_worker_independent_and_resumable(targets16):
    spec = _spec(targets16)
    ds = pipeline.make_dataset(spec, batch_size=2, seed=3)
    serial = take(pipeline.make_iterator(ds, num_workers=0), 6)  # 12 elements: crosses an epoch boundary
    assert_batches_equal(serial, take(pipeline.make_iterator(pipeline.make_dataset(spec, batch_size=2, seed=3)), 6))
    assert_batches_equal(serial, take(pipeline.make_iterator(ds, num_workers=2), 6))
    other = take(pipeline.make_iterator(pipeline.make_dataset(spec, batch_size=2, seed=4)), 1)
    assert not np.array_equal(other[0]["features"], serial[0]["features"])
    it = pipeline.make_iterator(ds)
    take(it, 2)
    state = it.get_state()
    fresh = pipeline.make_iterator(ds)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 3), serial[2:5])
    # Resuming without an iterator state (pipeline.plan_resume after a topology change) starts at batch 2.
    assert_batches_equal(take(pipeline.make_iterator(pipeline.make_dataset(spec, batch_size=2, seed=3,
                                                                            start_batch=2)), 3), serial[2:5])


def test_corrupt_target_record_is_skipped_and_counted(targets16, tmp_path):
    folder = str(tmp_path)
    manifest = shards.read_manifest(targets16)
    for name in manifest["shards"]:
        raw = _read_records(targets16, name)
        if name == manifest["shards"][1]:
            raw[0] = raw[0][: len(raw[0]) // 2]  # truncated msgpack: corrupt
        writer = array_record_module.ArrayRecordWriter(os.path.join(folder, name), "group_size:1")
        for r in raw:
            writer.write(r)
        writer.close()
    shards.write_manifest(folder, manifest)
    ds = pipeline.make_dataset(_spec(folder), batch_size=1, seed=0, num_epochs=1)
    by_reason = sum(ds[i]["skipped_by_reason"][0] for i in range(len(ds)))
    assert by_reason[records.SKIP_REASONS.index("corrupt")] == 1 and by_reason.sum() == 1


def test_target_record_errors():
    raw = target_records.encode_targets("x", np.zeros((3, 128)), np.zeros((3, 2), int), num_samples=900)
    assert target_records.decode_targets(raw)["codes"].shape == (3, 2)
    with pytest.raises(records.CorruptRecordError, match="codebooks") as e:
        target_records.decode_targets(raw, num_codebooks=8)
    assert e.value.reason == "corrupt"
    bad = target_records.encode_targets("x", np.full((3, 128), np.nan), np.zeros((3, 2), int), num_samples=900)
    with pytest.raises(records.CorruptRecordError) as e:
        target_records.decode_targets(bad)
    assert e.value.reason == "non_finite"
    waveform_record = records.encode_clip("w", np.zeros(100, np.float32), SR)
    with pytest.raises(records.CorruptRecordError, match="waveform shard set"):
        target_records.decode_targets(waveform_record)


# -- (e) the method and the trainer on precomputed batches -------------------------------------------------------

def _tiny_method(**overrides):
    config = default_config("tiny")
    config.update(overrides)
    return EncodecMAE(config, input_shape=(CROP_FRAMES * 320,))


@pytest.fixture(scope="module")
def tiny_method():
    """(method, (params, target_params), jitted loss): the tiny model on 30-frame crops, random EnCodec seed 0."""
    method = _tiny_method()
    return method, method.init(jax.random.key(1)), jax.jit(method.loss)


def test_train_step_passes_precomputed_batches_to_the_method(targets16, tiny_method):
    import jax.numpy as jnp
    import optax

    spec = _spec(targets16)
    method, (params, target_params), loss = tiny_method
    methods.check_data("encodecmae", method, spec)
    batch = pipeline.make_dataset(spec, batch_size=2, seed=0)[0]
    rng = jax.random.key(5)
    expected, _ = loss(params, target_params, {"features": batch["features"], "codes": batch["codes"]},
                       jax.random.fold_in(rng, 0), 0)
    tx = optax.adamw(1e-3)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "target_params": target_params,
             "opt_state": tx.init(params)}
    step = jax.jit(train.make_train_step(method, tx, lambda step: 1e-3, spec, device_frontend=False, total_steps=10))
    _, out = step(state, batch, rng)
    assert np.isfinite(out["loss"]) and out["loss"] == pytest.approx(float(expected), rel=1e-5)


def test_crop_at_the_clip_start_gives_the_on_device_loss(targets32, waveforms, tiny_method):
    """EnCodec is causal: the first 30 stored frames of a clip are EnCodec of its first 9,600 samples alone, so
    a crop at a clip's start gives the on-device path's features, codes and loss."""
    method, (params, target_params), loss = tiny_method
    records_, _ = stored(targets32)
    ids = ("clip0", "clip1")
    wave = np.stack([waveforms[1][i][:CROP_FRAMES * 320] for i in ids])
    precomputed = {"features": np.stack([records_[i]["features"][:CROP_FRAMES] for i in ids]),
                   "codes": np.stack([records_[i]["codes"][:CROP_FRAMES] for i in ids]).astype(np.int32)}
    on_device = jax.jit(method.make_targets)(target_params, {"waveform": wave})
    for row in range(2):
        assert_features_close(precomputed["features"][row], on_device["features"][row], 1e-5)
        assert_codes_match(precomputed["codes"][row], on_device["codes"][row], np.asarray(on_device["features"][row]),
                           method.encodec_params["codebooks"])
    rng = jax.random.key(3)
    assert float(loss(params, target_params, precomputed, rng, 0)[0]) == pytest.approx(
        float(loss(params, target_params, {"waveform": wave}, rng, 0)[0]), rel=1e-5)


@pytest.mark.slow
def test_training_runs_on_precomputed_targets(targets16, tmp_path):
    config = load_config("configs/encodecmae.py:runlocal")
    for key, value in {"total_steps": 4, "log_every_steps": 2, "checkpoint_every_steps": 4, "tensorboard": False,
                       "async_checkpoints": False, "batch_size": 4, "data.crop_frames": CROP_FRAMES,
                       "data.shards": targets16}.items():
        set_by_path(config, key, value)
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir, num_devices=2)
    rows = [r for r in metrics.read_metrics(workdir) if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4]
    assert all(np.isfinite(r["loss"]) and 0.0 <= r["accuracy_masked"] <= 1.0 for r in rows)
    assert rows[-1]["skipped_records"] == 0


@pytest.mark.slow
def test_precompute_cli_rewrites_the_same_shards(waveforms, targets32, tmp_path):
    out = str(tmp_path / "cli")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "precompute_encodec_targets.py"),
                          f"--input={waveforms[0]}", f"--output={out}", "--feature_dtype=float32", "--batch_clips=2",
                          "--chunk_seconds=2"], capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "EnCodec targets of" in run.stderr  # the progress bar
    with open(os.path.join(out, shards.MANIFEST)) as a, open(os.path.join(targets32, shards.MANIFEST)) as b:
        assert json.load(a) == json.load(b)
    for name in shards.read_manifest(out)["shards"]:
        with open(os.path.join(out, name), "rb") as a, open(os.path.join(targets32, name), "rb") as b:
            assert a.read() == b.read(), name


# -- (f) clear errors ---------------------------------------------------------------------------------------------

def test_precompute_rejects_other_sample_rates_and_target_sets(params, targets32, tmp_path):
    folder = str(tmp_path / "wave16k")
    shards.write_shard_set(folder, [("a", _wave(0, 1600), {})], sample_rate=16000, num_shards=1)
    manifest = os.path.join(folder, "manifest.json")
    with pytest.raises(ValueError, match=f"{manifest}.*16000 Hz.*--sample_rate=24000"):
        encodec_targets.precompute(folder, str(tmp_path / "out"), encodec_params=params, source="random seed 0")
    with pytest.raises(ValueError, match="already an encodec_targets shard set"):
        encodec_targets.precompute(targets32, str(tmp_path / "out"), encodec_params=params, source="random seed 0")


def test_precompute_names_a_truncated_input_shard(waveforms, params, tmp_path):
    folder = str(tmp_path / "wave24k")
    shutil.copytree(waveforms[0], folder)
    path = os.path.join(folder, CORRUPT[0])
    with open(path, "r+b") as f:  # a partial copy
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(shards.ShardReadError, match=f"cannot read shard {path}: its index is truncated"):
        encodec_targets.precompute(folder, str(tmp_path / "out"), encodec_params=params, source="random seed 0")
    assert not os.path.exists(tmp_path / "out")


def test_precomputed_data_errors_name_the_config_key_and_manifest(targets32):
    where = os.path.join(targets32, "manifest.json")
    with pytest.raises(ValueError, match="data.frontend='m2d'.*manifest.json.*'encodec'"):
        _spec(targets32, frontend="m2d")
    spec = _spec(targets32)
    assert spec.manifest_path == where
    with pytest.raises(ValueError, match=f"config.method='m2d' cannot train .*{where}.*'encodecmae'"):
        methods.check_data("m2d", methods.get_method("m2d"), spec)
    methods.check_data("encodecmae", _tiny_method(num_codebooks=4, codebook_weights=(0.25,) * 4), spec)
    with pytest.raises(ValueError, match=f"config.model.num_codebooks=8 but {where} stores 4 codebooks"):
        _tiny_method().check_precomputed({**spec.manifest, "num_codebooks": 4}, where)
    with pytest.raises(ValueError, match=f"encodec_seed=1.*'random seed 1'.*{where}.*'random seed 0'"):
        methods.check_data("encodecmae", _tiny_method(encodec_seed=1), spec)
    with pytest.raises(FileNotFoundError, match="config.model.encodec_checkpoint"):
        methods.check_data("encodecmae", _tiny_method(encodec_checkpoint=os.path.join(targets32, "nothing")), spec)
