"""make_shards --overwrite: the old set survives an interrupted run, is replaced whole by a finished one
(its log-mel statistics included; other files in the folder stay), and the statistics file is readable
by other accounts."""

import glob
import os

import fault_helpers
import ml_collections
import numpy as np
import pytest
import soundfile as sf

from audiojepa.data import compute_stats, resolve, shards, stats
from audiojepa.ops import frontend

SR = 16000
PARAMS = frontend.get_preset("m2d")


def _write_tones(folder, level, count=6):
    """`count` 0.5-s files of a tone in white noise (energy in every mel band), peak about `level`."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    t = np.arange(SR // 2) / SR
    for i in range(count):
        wave = 0.5 * np.sin(2 * np.pi * (300 + 100 * i) * t) + 0.15 * rng.standard_normal(t.shape)
        sf.write(os.path.join(folder, f"tone{i}.wav"), (level * wave).astype(np.float32), SR, subtype="FLOAT")
    return folder


def _leftovers(output_dir):
    """Staging or old folders a replace may leave next to or inside `output_dir`."""
    name = os.path.basename(output_dir)
    return (glob.glob(os.path.join(os.path.dirname(output_dir), f".{name}.*"))
            + glob.glob(os.path.join(output_dir, f".{name}.*")))


def _interrupt_third_decode(monkeypatch):
    real, calls = shards._decode_one, []

    def decode(item, **kwargs):
        calls.append(item[0])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(item, **kwargs)

    monkeypatch.setattr(shards, "_decode_one", decode)


@pytest.mark.parametrize("staging", ["beside", "inside"])
def test_interrupted_overwrite_keeps_the_old_set_and_a_finished_one_replaces_it(tmp_path, monkeypatch, staging):
    if staging == "inside":  # as when --output is a mount point or its parent is read-only
        monkeypatch.setattr(shards, "_can_stage_beside", lambda output_dir: False)
    out = str(tmp_path / "out")
    shards.make_shards(_write_tones(str(tmp_path / "old_audio"), 0.1), out, num_shards=2, progress=False)
    stats.write_stats(out, PARAMS, mean=-3.0, std=1.0)
    with open(os.path.join(out, "NOTES.txt"), "w") as f:
        f.write("not part of the shard set")
    before = fault_helpers.snapshot(out)
    new_audio = _write_tones(str(tmp_path / "new_audio"), 0.001, count=5)

    with monkeypatch.context() as m:
        _interrupt_third_decode(m)
        with pytest.raises(KeyboardInterrupt):
            shards.make_shards(new_audio, out, num_shards=2, overwrite=True, progress=False)
    assert fault_helpers.snapshot(out) == before
    assert _leftovers(out) == []

    manifest = shards.make_shards(new_audio, out, num_shards=2, overwrite=True, progress=False)
    after = fault_helpers.snapshot(out)
    assert manifest["num_clips"] == 5 and shards.read_manifest(out) == manifest
    assert stats.STATS_FILE not in after, "the old audio's log-mel statistics survived the overwrite"
    assert after["NOTES.txt"] == before["NOTES.txt"]
    assert sorted(after) == sorted(manifest["shards"] + [shards.MANIFEST, "NOTES.txt"])
    assert _leftovers(out) == []


def test_overwrite_removes_stale_log_mel_statistics(tmp_path):
    out = str(tmp_path / "shards")
    cfg = ml_collections.ConfigDict({"shards": out, "frontend": "m2d", "crop_frames": 32, "norm_stats": "shards"})

    def measured_mean():
        spec = resolve.resolve_data_spec(ml_collections.ConfigDict({**cfg.to_dict(), "norm_stats": "m2d"}))
        result = compute_stats.compute_logmel_stats(spec, num_crops=16, batch_size=8, progress=False)
        stats.write_stats(out, PARAMS, **result)
        return result["mean"]

    shards.make_shards(_write_tones(str(tmp_path / "loud"), 0.1), out, num_shards=1, progress=False)
    loud_mean = measured_mean()
    assert resolve.resolve_data_spec(cfg).norm_mean == pytest.approx(loud_mean)
    shards.make_shards(_write_tones(str(tmp_path / "quiet"), 0.001), out, num_shards=1, overwrite=True,
                       progress=False)
    with pytest.raises(FileNotFoundError, match="compute_stats.py"):
        resolve.resolve_data_spec(cfg)  # not the loud audio's mean
    quiet_mean = measured_mean()
    assert quiet_mean < loud_mean - 5  # 40 dB quieter: the old statistics were far off
    assert resolve.resolve_data_spec(cfg).norm_mean == pytest.approx(quiet_mean)


def test_stats_file_is_readable_by_others(tmp_path):
    umask = os.umask(0o022)
    try:
        path = stats.write_stats(str(tmp_path), PARAMS, mean=-5.0, std=4.0)
        assert os.stat(path).st_mode & 0o777 == 0o644
        os.umask(0o077)
        stats.write_stats(str(tmp_path), PARAMS, mean=-6.0, std=4.0)
        assert os.stat(path).st_mode & 0o777 == 0o600  # the umask still applies
    finally:
        os.umask(umask)
    assert stats.read_stats(str(tmp_path), PARAMS) == (-6.0, 4.0)
    assert os.listdir(tmp_path) == [stats.STATS_FILE]


def test_new_set_folder_gets_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        out = str(tmp_path / "fresh")
        shards.make_shards(_write_tones(str(tmp_path / "audio"), 0.1, count=2), out, num_shards=1, progress=False)
        assert os.stat(out).st_mode & 0o777 == 0o755  # not tempfile.mkdtemp's 0700
        os.chmod(out, 0o750)
        shards.make_shards(str(tmp_path / "audio"), out, num_shards=1, overwrite=True, progress=False)
        assert os.stat(out).st_mode & 0o777 == 0o750  # an overwrite keeps the folder's own
    finally:
        os.umask(umask)


def test_rerun_without_overwrite_names_the_flag(tmp_path):
    out = str(tmp_path / "out")
    audio = _write_tones(str(tmp_path / "audio"), 0.1, count=2)
    shards.make_shards(audio, out, num_shards=1, progress=False)
    before = fault_helpers.snapshot(out)
    with pytest.raises(FileExistsError, match=f"{out} already holds a shard set; pass --overwrite"):
        shards.make_shards(audio, out, num_shards=1, progress=False)
    assert fault_helpers.snapshot(out) == before and _leftovers(out) == []


def test_embedded_corpus_folder_is_readable_by_others(tmp_path):
    """The corpus cache may be shared by several accounts: not mkdtemp's 0700."""
    import stat

    from audiojepa.data import embedded

    folder = embedded.ensure_embedded_corpus(num_clips=8, duration_s=0.5, root=str(tmp_path), stats_frontends=())
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o755
