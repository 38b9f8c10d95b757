"""make_shards: manifest, skip reasons for planted bad files, CSV metadata, determinism, codecs, a decoding
process that dies; reading corrupt shard files."""

import hashlib
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
from array_record.python import array_record_module

from audiojepa.data import records, shards
import fault_helpers

SR = 16000


def _tone(seconds, freq=440.0, sr=SR):
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _read_all(shard_dir):
    manifest = shards.read_manifest(shard_dir)
    out = []
    for name in manifest["shards"]:
        reader = array_record_module.ArrayRecordReader(os.path.join(shard_dir, name))
        out.extend(reader.read_all())
        reader.close()
    return manifest, out


@pytest.fixture
def audio_folder(tmp_path):
    """Good files in several formats/rates/channel counts plus one of each kind of bad file."""
    root = tmp_path / "audio"
    (root / "sub").mkdir(parents=True)
    sf.write(root / "a_good.wav", _tone(1.0), SR, subtype="PCM_16")
    sf.write(root / "sub" / "b_good_44k_stereo.flac", np.stack([_tone(0.5, sr=44100), _tone(0.5, 880, 44100)], 1),
             44100, subtype="PCM_16")
    sf.write(root / "sub" / "c_good.ogg", _tone(0.7), SR, format="OGG", subtype="VORBIS")
    # Bad files.
    sf.write(root / "d_full.wav", _tone(1.0), SR, subtype="PCM_16")
    data = (root / "d_full.wav").read_bytes()
    (root / "d_full.wav").unlink()
    (root / "bad_truncated.wav").write_bytes(data[: len(data) // 2])
    (root / "bad_empty.wav").write_bytes(b"")
    sf.write(root / "bad_zeros.wav", np.zeros(SR, np.float32), SR, subtype="PCM_16")
    sf.write(root / "bad_nan.wav", np.full(SR, np.nan, np.float32), SR, subtype="FLOAT")
    (root / "bad_text_named.wav").write_text("this is not audio\n" * 50)
    (root / "notes.txt").write_text("not audio")
    sf.write(root / "bad_short.wav", _tone(0.05), SR, subtype="PCM_16")
    return root


EXPECTED_SKIPS = {
    "bad_truncated.wav": "truncated",
    "bad_empty.wav": "unreadable",
    "bad_zeros.wav": "silent",
    "bad_nan.wav": "non-finite",
    "bad_text_named.wav": "unreadable",
    "notes.txt": "unsupported extension",
    "bad_short.wav": "too short",
}


def test_folder_manifest_counts_and_skip_reasons(audio_folder, tmp_path):
    out = tmp_path / "shards"
    manifest = shards.make_shards(str(audio_folder), str(out), num_shards=2, workers=0, min_seconds=0.1,
                                  progress=False)
    assert manifest["num_clips"] == 3
    assert manifest["sample_rate"] == SR
    assert {s["path"]: s["reason"] for s in manifest["skipped"]} == EXPECTED_SKIPS
    assert manifest["num_skipped"] == len(EXPECTED_SKIPS)
    expected_hours = (SR * 1.0 + SR * 0.5 + SR * 0.7) / SR / 3600
    assert manifest["total_hours"] == pytest.approx(expected_hours, rel=1e-3)
    assert manifest["shards"] == ["shard-00000-of-00002.array_record", "shard-00001-of-00002.array_record"]
    assert manifest == shards.read_manifest(str(out))
    _, raw = _read_all(str(out))
    assert len(raw) == 3
    headers = [records.decode_header(r) for r in raw]
    assert sorted(h["id"] for h in headers) == ["a_good.wav", "sub/b_good_44k_stereo.flac", "sub/c_good.ogg"]
    by_id = {h["id"]: r for h, r in zip(headers, raw)}
    # 44.1 kHz stereo -> 16 kHz mono: 0.5 s stays 0.5 s, and the mix of 440 and 880 Hz survives.
    stereo = records.decode_waveform(by_id["sub/b_good_44k_stereo.flac"])
    assert stereo.shape[0] == pytest.approx(SR * 0.5, abs=2)
    spectrum = np.abs(np.fft.rfft(stereo))
    freqs = np.fft.rfftfreq(stereo.shape[0], 1 / SR)
    top2 = sorted(freqs[np.argsort(spectrum)[-2:]])
    assert top2 == pytest.approx([440, 880], abs=3)
    # The wav clip round-trips through int16 within quantisation error.
    np.testing.assert_allclose(records.decode_waveform(by_id["a_good.wav"]), _tone(1.0), atol=1.0 / 32768)


def test_workers_and_reruns_give_identical_shards(audio_folder, tmp_path):
    def digest(folder):
        manifest = shards.read_manifest(str(tmp_path / folder))
        return [hashlib.sha256((tmp_path / folder / n).read_bytes()).hexdigest() for n in manifest["shards"]]

    shards.make_shards(str(audio_folder), str(tmp_path / "s0"), num_shards=2, workers=0, progress=False)
    shards.make_shards(str(audio_folder), str(tmp_path / "s2"), num_shards=2, workers=2, progress=False)
    assert digest("s0") == digest("s2")
    with pytest.raises(FileExistsError, match="--overwrite"):
        shards.make_shards(str(audio_folder), str(tmp_path / "s0"), num_shards=2, progress=False)
    shards.make_shards(str(audio_folder), str(tmp_path / "s0"), num_shards=2, overwrite=True, progress=False)
    assert digest("s0") == digest("s2")


REAL_DECODE = shards._decode_one
CRASH_MARK = "crash_me"  # a file whose name holds this kills the process decoding it


def decode_or_die(item, **kwargs):
    """shards._decode_one, except that the process dies outright (as on a decoder segfault or the OOM
    killer) on a file named CRASH_MARK. Importable, so spawned workers can run it."""
    if CRASH_MARK in os.path.basename(item[0]):
        os._exit(1)
    return REAL_DECODE(item, **kwargs)


def _shard_digests(folder):
    return [hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest()
            for n in shards.read_manifest(folder)["shards"]]


def test_a_dead_decoding_process_skips_its_file_only(tmp_path, monkeypatch):
    audio = tmp_path / "audio"
    audio.mkdir()
    for i in range(24):  # more files than 2 workers hold at a time (FILES_PER_TASK x 2 tasks each)
        sf.write(audio / f"{i:02d}_tone.wav", _tone(0.2, 200 + 50 * i), SR, subtype="PCM_16")
    sf.write(audio / f"05_{CRASH_MARK}.wav", _tone(0.2), SR, subtype="PCM_16")
    monkeypatch.setattr(shards, "_decode_one", decode_or_die)
    manifest = fault_helpers.within(60, shards.make_shards, str(audio), str(tmp_path / "out"), num_shards=3,
                                    workers=2, progress=False)
    assert manifest["skipped"] == [{"path": f"05_{CRASH_MARK}.wav", "reason": "decoder crashed",
                                    "detail": manifest["skipped"][0]["detail"]}]
    assert manifest["num_clips"] == 24
    # The same shards as decoding the other files in this process: order and content are unchanged.
    monkeypatch.setattr(shards, "_decode_one", REAL_DECODE)
    os.remove(audio / f"05_{CRASH_MARK}.wav")
    shards.make_shards(str(audio), str(tmp_path / "ref"), num_shards=3, workers=0, progress=False)
    assert _shard_digests(str(tmp_path / "out")) == _shard_digests(str(tmp_path / "ref"))


def _corrupt_copy(shard_dir, tmp_path, mode):
    """A copy of `shard_dir` whose first shard has its second half cut off or 4 KiB of its middle inverted."""
    folder = str(tmp_path / mode)
    shutil.copytree(shard_dir, folder)
    path = os.path.join(folder, shards.shard_name(0, 1))
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        if mode == "truncate":
            f.truncate(size // 2)
        else:
            f.seek(size // 2)
            block = f.read(4096)
            f.seek(size // 2)
            f.write(bytes(b ^ 0xFF for b in block))
    return folder, path


@pytest.fixture
def noise_shards(tmp_path):
    rng = np.random.default_rng(0)
    clips = [(f"c{i}", (0.1 * rng.standard_normal(SR)).astype(np.float32), {}) for i in range(20)]
    folder = str(tmp_path / "good")
    shards.write_shard_set(folder, clips, sample_rate=SR, num_shards=1)
    return folder


def test_a_truncated_or_missing_shard_is_an_error_naming_it(noise_shards, tmp_path):
    folder, path = _corrupt_copy(noise_shards, tmp_path, "truncate")
    # The reader itself opens a truncated file without an error and reports 0 records.
    with pytest.raises(shards.ShardReadError, match=f"cannot read shard {path}: its index is truncated"):
        shards.open_reader(path)
    with pytest.raises(shards.ShardReadError, match=f"cannot read shard {path}"):
        shards.shard_sizes(folder, shards.read_manifest(folder))
    os.remove(path)
    with pytest.raises(shards.ShardReadError, match=f"cannot read shard {path}: it does not exist"):
        shards.open_reader(path)
    assert shards.shard_sizes(noise_shards, shards.read_manifest(noise_shards)) == [20]


def test_a_corrupt_chunk_is_an_error_naming_the_shard(noise_shards, tmp_path):
    folder, path = _corrupt_copy(noise_shards, tmp_path, "flip")
    reader = shards.open_reader(path)  # the index is intact
    try:
        with pytest.raises(shards.ShardReadError, match=f"cannot read records 0..19 of shard {path}: .*hash mismatch"):
            shards.read_records(reader, path, 0, 20)
    finally:
        reader.close()


def test_a_shard_shorter_than_its_manifest_is_an_error_naming_it(noise_shards):
    manifest = shards.read_manifest(noise_shards)
    expected = f"{shards.shard_name(0, 1)} holds 20 records where its manifest.json lists 21"
    with pytest.raises(ValueError, match=expected):
        shards.shard_sizes(noise_shards, {**manifest, "shard_num_clips": [21]})


def test_csv_input_keeps_metadata_and_lists_missing(tmp_path):
    sf.write(tmp_path / "x.wav", _tone(0.5), SR)
    sf.write(tmp_path / "y.wav", _tone(0.5, 660), 22050)
    (tmp_path / "list.tsv").write_text("path\tlabel\tsplit\nx.wav\tdog\ttrain\ny.wav\tcat;bird\ttest\nz.wav\tcow\ttrain\n"
                                       "\t\t\n\tpig\ttest\n")  # a blank row, then a row without a path
    manifest = shards.make_shards(str(tmp_path / "list.tsv"), str(tmp_path / "out"), codec="flac", num_shards=1,
                                  progress=False)
    assert manifest["metadata_columns"] == ["label", "split"]
    assert [(s["path"], s["reason"]) for s in manifest["skipped"]] == [
        (f"{tmp_path / 'list.tsv'}:6", "missing"), ("z.wav", "missing")]
    _, raw = _read_all(str(tmp_path / "out"))
    headers = [records.decode_header(r) for r in raw]
    assert [(h["id"], h["metadata"], h["codec"]) for h in headers] == [
        ("x.wav", {"label": "dog", "split": "train"}, "flac"),
        ("y.wav", {"label": "cat;bird", "split": "test"}, "flac"),
    ]
    np.testing.assert_allclose(records.decode_waveform(raw[0]), _tone(0.5), atol=1.0 / 32768)


def test_corrupt_record_bytes_raise_named_error():
    good = records.encode_clip("id", _tone(0.1), SR)
    assert records.decode_waveform(good).shape == (SR // 10,)
    for bad in (b"", b"\x00garbage", good[: len(good) // 2]):
        with pytest.raises(records.CorruptRecordError):
            records.decode_waveform(bad)


def test_cli_runs(audio_folder, tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "tools/make_shards.py", f"--input={audio_folder}", f"--output={out}", "--workers=0",
         "--min_seconds=0.1"],
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert shards.read_manifest(str(out))["num_clips"] == 3
    assert "skipped" in result.stderr


def test_files_longer_than_max_seconds_are_skipped_from_their_header(tmp_path):
    """--max_seconds is checked from the header, before a long file is decoded whole; 0/None: no limit."""
    folder = tmp_path / "in"
    folder.mkdir()
    sf.write(folder / "short.wav", _tone(1.0), SR)
    sf.write(folder / "long.wav", _tone(3.0, sr=8000), 8000)  # 3 s at another rate: the limit is in seconds
    manifest = shards.make_shards(str(folder), str(tmp_path / "out"), sample_rate=SR, workers=0, progress=False,
                                  max_seconds=2.0)
    assert manifest["num_clips"] == 1
    assert [(s["path"].rsplit("/", 1)[-1], s["reason"]) for s in manifest["skipped"]] == [("long.wav", "too long")]
    assert "3 s > 2 s" in manifest["skipped"][0]["detail"]
    unlimited = shards.make_shards(str(folder), str(tmp_path / "all"), sample_rate=SR, workers=0, progress=False,
                                   max_seconds=None)
    assert unlimited["num_clips"] == 2 and unlimited["skipped"] == []


def test_segment_seconds_cuts_long_files_into_consecutive_records(tmp_path):
    """--segment_seconds: a file longer than a segment becomes consecutive records of that length (AudioSet-style
    10 s clips from long recordings, so an hour-long track is not sampled as often as a one-second one); the last,
    shorter piece is kept unless it is shorter than --min_seconds; the records join back into the file."""
    folder = tmp_path / "in"
    folder.mkdir()
    long_wave = _tone(2.5) * np.linspace(0.5, 1.0, int(2.5 * SR), dtype=np.float32)
    sf.write(folder / "long.wav", long_wave, SR, subtype="FLOAT")
    sf.write(folder / "short.wav", _tone(0.4), SR, subtype="FLOAT")
    sf.write(folder / "tail.wav", _tone(2.1, 330.0), SR, subtype="FLOAT")  # a 0.1 s tail: under min_seconds
    manifest = shards.make_shards(str(folder), str(tmp_path / "out"), sample_rate=SR, workers=0, progress=False,
                                  codec="f32", segment_seconds=1.0, min_seconds=0.2)
    _, raws = _read_all(str(tmp_path / "out"))
    clips = {records.decode_header(r)["id"]: records.decode_waveform(r) for r in raws}
    long_ids = sorted(k for k in clips if k.startswith("long.wav"))
    assert [len(clips[k]) for k in long_ids] == [SR, SR, SR // 2]
    np.testing.assert_array_equal(np.concatenate([clips[k] for k in long_ids]), long_wave)
    assert [len(clips[k]) for k in sorted(k for k in clips if k.startswith("tail.wav"))] == [SR, SR]
    assert [len(v) for k, v in clips.items() if k.startswith("short.wav")] == [int(0.4 * SR)]
    assert manifest["num_clips"] == 6 and manifest["num_files"] == 3 and manifest["segment_seconds"] == 1.0
    assert manifest["total_hours"] == pytest.approx((2.5 + 0.4 + 2.0) / 3600)
    assert manifest["segments_dropped"] == {"short tail": {"count": 1, "seconds": pytest.approx(0.1)},
                                            "silent": {"count": 0, "seconds": 0.0}}
    with pytest.raises(ValueError, match="segment_seconds"):
        shards.make_shards(str(folder), str(tmp_path / "bad"), sample_rate=SR, workers=0, progress=False,
                           segment_seconds=-1.0)


def test_silent_segments_are_dropped_and_counted(tmp_path):
    """A segment as silent as a file make_shards skips (a track's silent end) is not stored, so training never
    reads and skips it; the manifest counts it."""
    folder = tmp_path / "in"
    folder.mkdir()
    wave = np.concatenate([_tone(1.0), np.zeros(SR, np.float32), _tone(1.0, 550.0)])
    sf.write(folder / "gap.wav", wave, SR, subtype="FLOAT")
    manifest = shards.make_shards(str(folder), str(tmp_path / "out"), sample_rate=SR, workers=0, progress=False,
                                  codec="f32", segment_seconds=1.0)
    _, raws = _read_all(str(tmp_path / "out"))
    assert sorted(records.decode_header(r)["id"] for r in raws) == ["gap.wav#00000", "gap.wav#00002"]
    assert manifest["segments_dropped"]["silent"] == {"count": 1, "seconds": 1.0}
