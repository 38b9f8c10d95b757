"""Decoding every container the folder scan accepts (audio_io: libsndfile first, PyAV for the rest), on a known
signal encoded here with PyAV: length, waveform, bit-exactness of the lossless formats through either decoder,
truncated and corrupt files skipped with their reasons, make_shards and a task folder over m4a clips.

The signal: 1 s at 44.1 kHz, stereo, a 440 Hz sine (0.5 full scale) on the left and a 1 kHz sine on the right;
load_clip's mono is their mean. Length tolerance (the decoded length against the encoded 1 s, at the rate
asked for): lossless formats exact; lossy formats, whose containers record priming and padding (m4a/mp4 edit
lists, Ogg/WebM Opus pre-skip and end trim, Ogg Vorbis granule positions, the MP3 LAME header),
LOSSY_LENGTH_TOL_S = 1 ms; all measured exact (PyAV 18.1, libsndfile 1.2.2).

The Vorbis clip is written by libsndfile (libvorbis): the PyAV wheel has only FFmpeg's experimental native
Vorbis encoder, which garbles this signal's 1 kHz channel (correlation 0.33 with the sine it was given).
"""

import os
import pathlib
import shutil

import numpy as np
import pytest
import soundfile as sf
import soxr

from audiojepa.data import audio_io, records, shards
from audiojepa.evaluation import tasks

av = pytest.importorskip("av", reason="PyAV (`pip install av`) is a runtime requirement of audiojepa")

FILE_SR = 44100
SR = 16000
LOSSY_LENGTH_TOL_S = 0.001
MIN_CORRELATION = 0.99  # lossy decodes against the expected mono (measured >= 0.9992: AAC at FFmpeg's default rate)

# name -> (file name, muxer (None: written by libsndfile), encoder, encoder rate in Hz, length tolerance in seconds)
FORMATS = {
    "m4a": ("clip.m4a", "ipod", "aac", 44100, LOSSY_LENGTH_TOL_S),
    "mp4": ("clip.mp4", "mp4", "aac", 44100, LOSSY_LENGTH_TOL_S),
    "webm": ("clip.webm", "webm", "libopus", 48000, LOSSY_LENGTH_TOL_S),
    "ogg_opus": ("clip_opus.ogg", "ogg", "libopus", 48000, LOSSY_LENGTH_TOL_S),
    "opus": ("clip.opus", "opus", "libopus", 48000, LOSSY_LENGTH_TOL_S),
    "ogg_vorbis": ("clip_vorbis.ogg", None, "vorbis", 44100, LOSSY_LENGTH_TOL_S),
    "mp3": ("clip.mp3", "mp3", "libmp3lame", 44100, LOSSY_LENGTH_TOL_S),
    "flac": ("clip.flac", "flac", "flac", 44100, 0.0),
    "wav": ("clip.wav", "wav", "pcm_s16le", 44100, 0.0),
    "aiff": ("clip.aiff", "aiff", "pcm_s16be", 44100, 0.0),
}
LOSSLESS = ("flac", "wav", "aiff")


def _stereo(seconds=1.0, left_hz=440.0, right_hz=1000.0):
    """[2, samples] float32 at FILE_SR."""
    t = np.arange(round(seconds * FILE_SR)) / FILE_SR
    return np.stack([0.5 * np.sin(2 * np.pi * left_hz * t), 0.5 * np.sin(2 * np.pi * right_hz * t)]).astype(np.float32)


def _has_encoder(codec):
    try:
        av.Codec(codec, "w")
        return True
    except Exception:
        return False


def _encode(path, muxer, codec, rate, signal=None, muxer_options=None):
    """Writes `signal` ([2, samples] at FILE_SR; default `_stereo()`) to `path` with PyAV; PyAV converts the
    sample format and rate to what the encoder takes."""
    if not _has_encoder(codec):
        pytest.skip(f"this PyAV wheel ({av.__version__}) has no {codec} encoder")
    signal = _stereo() if signal is None else signal
    with av.open(str(path), "w", format=muxer, options=muxer_options or {}) as container:
        stream = container.add_stream(codec, rate=rate, layout="stereo")
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(signal), format="fltp", layout="stereo")
        frame.sample_rate = FILE_SR
        frame.pts = 0
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return str(path)


def _write_format(folder, name):
    file_name, muxer, codec, rate, _ = FORMATS[name]
    path = os.path.join(folder, file_name)
    if muxer is None:
        sf.write(path, _stereo().T, FILE_SR, format="OGG", subtype="VORBIS")
        return path
    return _encode(path, muxer, codec, rate)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """name -> path of the known signal in each of FORMATS whose encoder this PyAV has."""
    folder = tmp_path_factory.mktemp("formats")
    return {name: _write_format(str(folder), name) for name in FORMATS
            if FORMATS[name][1] is None or _has_encoder(FORMATS[name][2])}


def _expected_mono(sample_rate):
    mono = _stereo().mean(axis=0)
    return mono if sample_rate == FILE_SR else soxr.resample(mono, FILE_SR, sample_rate, quality="HQ")


def _peak_magnitudes(waveform, sample_rate, freqs):
    """|DFT| of the first second at `freqs` (1 Hz bins), relative to the largest bin."""
    spectrum = np.abs(np.fft.rfft(waveform[:sample_rate]))
    return [spectrum[int(f)] / spectrum.max() for f in freqs]


@pytest.mark.parametrize("sample_rate", [SR, FILE_SR])
@pytest.mark.parametrize("name", list(FORMATS))
def test_each_format_decodes_to_the_known_mono_signal(clips, name, sample_rate):
    if name not in clips:
        pytest.skip(f"this PyAV wheel has no {FORMATS[name][2]} encoder")
    waveform = audio_io.load_clip(clips[name], sample_rate=sample_rate)
    assert waveform.dtype == np.float32 and waveform.ndim == 1
    tolerance = int(np.ceil(FORMATS[name][4] * sample_rate))
    assert abs(waveform.shape[0] - sample_rate) <= tolerance, (name, waveform.shape[0])
    expected = _expected_mono(sample_rate)
    n = min(len(expected), len(waveform))
    correlation = np.corrcoef(waveform[:n], expected[:n])[0, 1]  # at zero lag: no priming left at the start
    assert correlation > (0.99999 if name in LOSSLESS else MIN_CORRELATION), (name, correlation)
    # Both channels are in the mono: the two tones are the spectrum's peaks, of equal height.
    left, right = _peak_magnitudes(waveform, sample_rate, (440, 1000))
    assert left > 0.9 and right > 0.9, (name, left, right)


@pytest.mark.parametrize("name", LOSSLESS)
def test_lossless_formats_are_bit_exact_through_either_decoder(clips, name):
    data, rate = sf.read(clips[name], dtype="float32", always_2d=True)
    # load_clip's path for these files is what it was before PyAV: libsndfile, channel mean, soxr.
    before = soxr.resample(data.mean(axis=1), rate, SR, quality="HQ").astype(np.float32)
    assert audio_io.decoder_order(clips[name])[0] == "libsndfile"
    np.testing.assert_array_equal(audio_io.load_clip(clips[name], sample_rate=SR), before)
    # The PyAV fallback scales integer PCM as libsndfile does: the same floats.
    via_pyav, pyav_rate = audio_io.decode_file(clips[name], decoders=("PyAV",))
    assert pyav_rate == rate == FILE_SR
    np.testing.assert_array_equal(via_pyav, data)


@pytest.mark.parametrize("name", ["ogg_opus", "opus", "ogg_vorbis", "mp3"])
def test_lossy_files_libsndfile_reads_decode_alike_through_pyav(clips, name):
    """The PyAV fallback for the lossy formats libsndfile reads first: the same samples, from the same start, at
    the same rate (measured: within 1.7e-6, the same length but for Vorbis, where FFmpeg ends 128 samples
    (2.9 ms) early)."""
    if name not in clips:
        pytest.skip(f"this PyAV wheel has no {FORMATS[name][2]} encoder")
    first, first_rate = audio_io.decode_file(clips[name], decoders=("libsndfile",))
    second, second_rate = audio_io.decode_file(clips[name], decoders=("PyAV",))
    assert first_rate == second_rate
    tolerance = int(np.ceil((0.003 if name == "ogg_vorbis" else LOSSY_LENGTH_TOL_S) * first_rate))
    assert abs(first.shape[0] - second.shape[0]) <= tolerance, (first.shape, second.shape)
    n = min(first.shape[0], second.shape[0])
    np.testing.assert_allclose(second[:n], first[:n], rtol=0, atol=1e-5)


def test_decoder_order_by_extension():
    for path in ("a.m4a", "b/c.MP4", "d.webm", "e.mkv", "f.aac"):
        assert audio_io.decoder_order(path) == ("PyAV",), path
    for path in ("a.wav", "b.FLAC", "c.ogg", "d.opus", "e.mp3", "f.aiff", "no_extension", "g.xyz"):
        assert audio_io.decoder_order(path) == ("libsndfile", "PyAV"), path
    assert set(audio_io.AUDIO_EXTENSIONS) >= {".m4a", ".mp4", ".webm", ".ogg", ".opus", ".mp3", ".flac", ".wav",
                                             ".aiff"}
    with pytest.raises(ValueError, match=r"unknown \['ffmpeg'\]; valid: \('libsndfile', 'PyAV'\)"):
        audio_io.decode_file("a.wav", decoders=("ffmpeg",))


def test_files_libsndfile_refuses_fall_back_to_pyav(clips, tmp_path):
    """An m4a saved as .wav, and FLAC in Ogg (which libsndfile does not decode): PyAV reads both."""
    misnamed = tmp_path / "really_m4a.wav"
    misnamed.write_bytes(pathlib.Path(clips["m4a"]).read_bytes())
    np.testing.assert_array_equal(audio_io.load_clip(str(misnamed), sample_rate=SR),
                                  audio_io.load_clip(clips["m4a"], sample_rate=SR))
    ogg_flac = _encode(tmp_path / "flac_in_ogg.oga", "ogg", "flac", FILE_SR)
    with pytest.raises(sf.LibsndfileError):
        sf.read(ogg_flac)
    np.testing.assert_array_equal(audio_io.load_clip(ogg_flac, sample_rate=SR),
                                  audio_io.load_clip(clips["flac"], sample_rate=SR))


def test_containers_without_gapless_info_stay_within_their_documented_slack(tmp_path):
    """Raw ADTS keeps the AAC priming (1024 samples from FFmpeg's encoder) and padding: within 2048 samples;
    AAC in Matroska has its priming dropped but keeps the last frame's padding: within 1023 samples."""
    adts = audio_io.load_clip(_encode(tmp_path / "clip.aac", "adts", "aac", FILE_SR), sample_rate=FILE_SR)
    assert 0 <= adts.shape[0] - FILE_SR <= 2048
    mka = audio_io.load_clip(_encode(tmp_path / "clip.mka", "matroska", "aac", FILE_SR), sample_rate=FILE_SR)
    assert 0 <= mka.shape[0] - FILE_SR <= 1023
    expected = _expected_mono(FILE_SR)
    assert np.corrcoef(mka[:FILE_SR], expected)[0, 1] > MIN_CORRELATION  # aligned: the priming is gone


def test_read_info_reads_either_decoders_header(clips):
    assert audio_io.read_info(clips["m4a"]) == audio_io.AudioInfo(FILE_SR, 2, FILE_SR, "PyAV")
    assert audio_io.read_info(clips["wav"]) == audio_io.AudioInfo(FILE_SR, 2, FILE_SR, "libsndfile")
    with pytest.raises(audio_io.BadAudioError, match="missing"):
        audio_io.read_info(clips["m4a"] + ".gone")


def test_max_seconds_from_the_header_and_while_decoding(clips, monkeypatch):
    with pytest.raises(audio_io.BadAudioError, match=r"too long: 1 s > 0.5 s") as e:
        audio_io.load_clip(clips["m4a"], sample_rate=SR, max_seconds=0.5)
    assert e.value.reason == "too long"
    # A stream whose header gives no duration is stopped once decoding passes the limit.
    monkeypatch.setattr(audio_io, "_declared_seconds", lambda container, stream: None)
    with pytest.raises(audio_io.BadAudioError, match="decoded so far") as e:
        audio_io.load_clip(clips["webm"], sample_rate=SR, max_seconds=0.5)
    assert e.value.reason == "too long"


def _bad_files(folder, clips):
    """name -> expected reason, for damaged copies of the m4a/webm clips written into `folder`."""
    os.makedirs(folder, exist_ok=True)
    m4a = pathlib.Path(clips["m4a"]).read_bytes()
    expected = {}

    def write(name, data, reason):
        with open(os.path.join(folder, name), "wb") as f:
            f.write(data)
        expected[name] = reason

    write("cut.m4a", m4a[: len(m4a) // 2], "truncated")  # FFmpeg's muxer puts the index ('moov') last: lost
    damaged = bytearray(m4a)
    middle = len(m4a) // 3
    damaged[middle:middle + 2000] = np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes()
    write("damaged.m4a", bytes(damaged), "unreadable")  # the AAC decoder refuses a packet
    write("empty.m4a", b"", "unreadable")
    write("text.m4a", b"<html>404 Not Found</html>\n" * 20, "unreadable")
    webm = pathlib.Path(clips["webm"]).read_bytes()
    write("cut.webm", webm[: len(webm) // 2], "truncated")
    return expected


def test_truncated_and_corrupt_files_have_named_reasons(clips, tmp_path):
    expected = _bad_files(str(tmp_path), clips)
    faststart = _encode(tmp_path / "faststart.m4a", "ipod", "aac", FILE_SR, muxer_options={"movflags": "faststart"})
    data = pathlib.Path(faststart).read_bytes()
    (tmp_path / "faststart_cut.m4a").write_bytes(data[: len(data) // 2])  # the index first, then cut audio
    expected["faststart_cut.m4a"] = "truncated"
    details = {}
    for name, reason in expected.items():
        with pytest.raises(audio_io.BadAudioError) as e:
            audio_io.load_clip(str(tmp_path / name), sample_rate=SR)
        assert e.value.reason == reason, (name, e.value)
        details[name] = e.value.detail
    assert "MP4 box 'mdat'" in details["cut.m4a"] and "the file holds" in details["cut.m4a"]
    assert "MP4 box 'mdat'" in details["faststart_cut.m4a"]
    assert "Matroska/WebM Segment declares" in details["cut.webm"]
    assert details["damaged.m4a"].startswith("PyAV: InvalidDataError") and "s of audio" in details["damaged.m4a"]
    assert details["text.m4a"].startswith("PyAV: ")


def test_a_video_file_without_audio_is_unreadable(tmp_path):
    if not _has_encoder("mpeg4"):
        pytest.skip(f"this PyAV wheel ({av.__version__}) has no mpeg4 video encoder")
    path = str(tmp_path / "silent_film.mp4")
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(3):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.zeros((48, 64, 3), np.uint8), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    with pytest.raises(audio_io.BadAudioError, match=r"unreadable: PyAV: no audio stream .*streams: video"):
        audio_io.load_clip(path, sample_rate=SR)


def test_make_shards_writes_every_format_and_lists_the_damaged_files(clips, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for path in clips.values():
        shutil.copy(path, folder)
    bad = _bad_files(str(folder / "bad"), clips)
    out = str(tmp_path / "shards")
    # One decoding process: PyAV is imported in the worker, on its first non-libsndfile file.
    manifest = shards.make_shards(str(folder), out, sample_rate=SR, num_shards=1, workers=1, progress=False)
    assert {s["path"]: s["reason"] for s in manifest["skipped"]} == {f"bad/{n}": r for n, r in bad.items()}
    assert manifest["num_clips"] == len(clips)
    path = os.path.join(out, manifest["shards"][0])
    reader = shards.open_reader(path)
    try:
        headers = [records.decode_header(raw) for raw in shards.read_records(reader, path, 0, manifest["num_clips"])]
    finally:
        reader.close()
    file_names = {os.path.basename(p): name for name, p in clips.items()}
    assert sorted(h["id"] for h in headers) == sorted(file_names)
    for header in headers:
        tolerance = int(np.ceil(FORMATS[file_names[header["id"]]][4] * SR))
        assert abs(header["num_samples"] - SR) <= tolerance, header


def test_a_task_folder_of_m4a_clips_loads(tmp_path):
    """Read-only use of the evaluation API: a labels.csv over m4a files, one of them cut short."""
    root = tmp_path / "tones"
    root.mkdir()
    rows = ["filename,label,split"]
    for i, split in enumerate(["train", "train", "train", "train", "valid", "valid", "test", "test"]):
        label, hz = ("low", 300.0 + 10 * i) if i % 2 else ("high", 3000.0 + 100 * i)
        _encode(root / f"c{i}.m4a", "ipod", "aac", FILE_SR, signal=_stereo(0.5, hz, hz))
        rows.append(f"c{i}.m4a,{label},{split}")
    data = (root / "c0.m4a").read_bytes()
    (root / "cut.m4a").write_bytes(data[: len(data) // 2])
    rows.append("cut.m4a,high,train")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    task = tasks.load_task(str(root), sample_rate=SR)
    assert task.clip_ids == [f"c{i}.m4a" for i in range(8)]
    assert [(s["path"], s["reason"]) for s in task.skipped] == [("cut.m4a", "truncated")]
    assert task.classes == ["high", "low"]
    waveform = task.load_audio(1, SR)
    assert waveform.shape == (SR // 2,) and waveform.dtype == np.float32
    assert _peak_magnitudes(np.pad(waveform, (0, SR // 2)), SR, (310,))[0] == pytest.approx(1.0)
    # verify_audio="header" reads the containers' headers too (no decoding): the m4a clips are kept.
    header_checked = tasks.load_task(str(root), sample_rate=SR, verify_audio="header")
    assert header_checked.clip_ids[:8] == [f"c{i}.m4a" for i in range(8)]
