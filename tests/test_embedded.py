"""The embedded corpus: deterministic bytes, labels and splits kept, statistics stored, cache reused."""

import hashlib
import os

import pytest
from array_record.python import array_record_module

from audiojepa.data import (
    compute_stats,
    embedded,
    pipeline,
    records,
    shards,
    stats,
    synthetic,
)
from audiojepa.ops import frontend

SMALL = dict(sample_rate=16000, num_clips=48, duration_s=1.0, seed=0)


def _digests(folder):
    manifest = shards.read_manifest(folder)
    return [hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest() for n in manifest["shards"]]


def test_embedded_corpus_is_deterministic_and_labelled(tmp_path):
    a = embedded.ensure_embedded_corpus(**SMALL, root=str(tmp_path / "a"))
    b = embedded.ensure_embedded_corpus(**SMALL, root=str(tmp_path / "b"))
    assert _digests(a) == _digests(b)
    manifest = shards.read_manifest(a)
    assert manifest["num_clips"] == 48 and manifest["sample_rate"] == 16000 and manifest["skipped"] == []
    assert abs(manifest["total_hours"] * 3600 - 48.0) < 1e-9
    assert manifest["classes"] == list(synthetic.CLASS_NAMES)
    headers = []
    for name in manifest["shards"]:
        reader = array_record_module.ArrayRecordReader(os.path.join(a, name))
        headers += [records.decode_header(r) for r in reader.read_all()]
        reader.close()
    labels = {h["id"]: h["metadata"]["label"] for h in headers}
    assert labels["synth_000000"] == synthetic.CLASS_NAMES[0]
    assert labels["synth_000009"] == synthetic.CLASS_NAMES[1]
    assert {h["metadata"]["split"] for h in headers} == {"train"}  # 48 clips = folds 0..5 only
    assert [embedded.split_of(i) for i in (0, 63, 64, 71, 72, 79, 80)] == [
        "train", "train", "valid", "valid", "test", "test", "train"]
    # Statistics for the m2d front end were computed and stored with the corpus: the project's stats function
    # on this corpus's shards with that front end, crops of whole clips (1 s = 101 frames), min(num_clips, 512)
    # crops and the corpus seed. The same float64 accumulation on both sides: equal to rounding (rel 1e-12).
    # (Each of the 48 clips once gives -8.74 and the matpac front end -8.71, so a looser, layout-free
    # reference could not tell the front ends apart. Before compute_logmel_stats kept exactly num_crops,
    # its batches of 32 read 64 crops here, 16 clips twice: -8.80.)
    m2d_frontend = frontend.get_preset("m2d")
    mean, std = stats.read_stats(a, m2d_frontend)
    spec = pipeline.DataSpec(tuple(os.path.join(a, n) for n in manifest["shards"]), m2d_frontend,
                             m2d_frontend.num_frames(16000), 0.0, 1.0, 48)
    assert spec.crop_samples == 16000
    expected = compute_stats.compute_logmel_stats(spec, num_crops=48, seed=0, progress=False)
    assert (mean, std) == pytest.approx((expected["mean"], expected["std"]), rel=1e-12)
    # No temporary folders are left behind.
    assert sorted(os.listdir(tmp_path / "a")) == [os.path.basename(a)]


def test_cached_corpus_is_reused(tmp_path):
    folder = embedded.ensure_embedded_corpus(**SMALL, root=str(tmp_path))
    marker = os.path.join(folder, "marker")
    open(marker, "w").close()
    assert embedded.ensure_embedded_corpus(**SMALL, root=str(tmp_path)) == folder
    assert os.path.exists(marker)
