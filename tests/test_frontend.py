"""Log-mel front end: host and device implementations against librosa, and against each other."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest

from audiojepa.ops import frontend

M2D = frontend.get_preset("m2d")
AUDIOJEPA = frontend.get_preset("audiojepa")
# Exercises the other branches: HTK scale, no area norm, a window shorter than n_fft, zero padding.
HTK_SHORT_WINDOW = dataclasses.replace(M2D, n_fft=512, win_length=400, mel_scale="htk", mel_norm=None,
                                       pad_mode="constant", n_mels=64)

# Tolerances, about 5-10x above what float32 rounding gives here (measured max in brackets).
# Filterbank: relative to the largest weight [1.1e-7]. Power spectrogram: absolute, relative to the
# largest value of the reference spectrogram [9.5e-7, DFT as matmul]. Log-mel: absolute, in
# natural-log units, on bins whose mel power is above 1e-6 of the maximum [4.9e-5], and on all
# bins [1.9e-4]: the quiet stretch goes down to 1e-13 of the maximum, where the float32 rounding
# of the spectrum is a larger relative error, partly hidden by the log offset.
FILTERBANK_RTOL = 1e-6
POWER_RTOL = 5e-6
LOGMEL_ATOL_LOUD = 5e-4
LOUD_FLOOR = 1e-6
LOGMEL_ATOL_ALL = 2e-3

POWER_FNS = {
    "host": frontend.power_spectrogram_host,
    "device_fft": lambda w, p: np.asarray(frontend.power_spectrogram_device(w, p, "fft")),
    "device_matmul": lambda w, p: np.asarray(frontend.power_spectrogram_device(w, p, "matmul")),
}
LOGMEL_FNS = {
    "host": frontend.logmel_host,
    "device_fft": lambda w, p: np.asarray(frontend.logmel_device(w, p, "fft")),
    "device_matmul": lambda w, p: np.asarray(frontend.logmel_device(w, p, "matmul")),
}


def _test_signal(sample_rate: int, seconds: float = 3.0, seed: int = 0) -> np.ndarray:
    """Noise + two tones + a chirp, with 0.5 s about 70 dB below the tones: [samples] float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    y = (0.05 * rng.standard_normal(t.size) + 0.5 * np.sin(2 * np.pi * 440.0 * t)
         + 0.2 * np.sin(2 * np.pi * 3000.0 * t) + 0.1 * np.sin(2 * np.pi * (200.0 + 1000.0 * t) * t))
    quiet = slice(int(1.5 * sample_rate), int(2.0 * sample_rate))
    y[quiet] = 1.5e-4 * rng.standard_normal(quiet.stop - quiet.start)
    return y.astype(np.float32)


def _librosa_power(y: np.ndarray, p: frontend.LogMelParams) -> np.ndarray:
    """[n_freqs, frames]; librosa's default pad_mode is "constant", so it is passed explicitly."""
    stft = librosa.stft(y, n_fft=p.n_fft, hop_length=p.hop_length, win_length=p.win_length, window="hann",
                        center=p.center, pad_mode=p.pad_mode)
    return np.abs(stft) ** p.power


def _librosa_mel_power(y: np.ndarray, p: frontend.LogMelParams) -> np.ndarray:
    """[n_mels, frames] mel power (before the log)."""
    return librosa.feature.melspectrogram(S=_librosa_power(y, p), sr=p.sample_rate, n_fft=p.n_fft,
                                          n_mels=p.n_mels, fmin=p.f_min, fmax=p.f_max,
                                          htk=p.mel_scale == "htk", norm=p.mel_norm)


@pytest.mark.parametrize("params", [M2D, AUDIOJEPA, HTK_SHORT_WINDOW], ids=["m2d", "audiojepa", "htk_nonorm"])
def test_filterbank_matches_librosa(params):
    ref = librosa.filters.mel(sr=params.sample_rate, n_fft=params.n_fft, n_mels=params.n_mels, fmin=params.f_min,
                              fmax=params.f_max, htk=params.mel_scale == "htk", norm=params.mel_norm).T
    fb = frontend.mel_filterbank(params)
    assert fb.shape == (params.n_fft // 2 + 1, params.n_mels) and fb.dtype == np.float32
    assert np.abs(fb - ref).max() <= FILTERBANK_RTOL * ref.max()
    assert (fb.max(axis=0) > 0).all(), "every filter covers at least one bin"


@pytest.mark.parametrize("params", [M2D, HTK_SHORT_WINDOW], ids=["full", "short_window"])
def test_analysis_window_is_centred_periodic_hann(params):
    ref = librosa.util.pad_center(librosa.filters.get_window("hann", params.win_length, fftbins=True),
                                  size=params.n_fft)
    np.testing.assert_allclose(frontend.analysis_window(params), ref, atol=1e-7)


@pytest.mark.parametrize("impl", list(POWER_FNS))
@pytest.mark.parametrize("params", [M2D, HTK_SHORT_WINDOW], ids=["m2d", "short_window_constant_pad"])
def test_power_spectrogram_matches_librosa(impl, params):
    y = _test_signal(params.sample_rate)
    ref = _librosa_power(y, params)
    power = POWER_FNS[impl](y, params)
    assert power.shape == (params.num_frames(y.size), params.n_fft // 2 + 1) and power.dtype == np.float32
    assert np.abs(power.T - ref).max() <= POWER_RTOL * ref.max()


def _check_logmel(logmel, y, params):
    mel_ref = _librosa_mel_power(y, params)
    ref = np.log(mel_ref + params.log_offset)
    assert logmel.shape == ref.shape == (params.n_mels, params.num_frames(y.size))
    assert logmel.dtype == np.float32
    err = np.abs(logmel - ref)
    loud = mel_ref > LOUD_FLOOR * mel_ref.max()
    assert loud.mean() > 0.5 and (~loud).any(), "the test signal should have loud and quiet bins"
    assert err[loud].max() <= LOGMEL_ATOL_LOUD
    assert err.max() <= LOGMEL_ATOL_ALL


@pytest.mark.parametrize("impl", list(LOGMEL_FNS))
@pytest.mark.parametrize("params", [M2D, AUDIOJEPA, HTK_SHORT_WINDOW], ids=["m2d", "audiojepa", "htk_short_window"])
def test_logmel_matches_librosa(impl, params):
    y = _test_signal(params.sample_rate)
    _check_logmel(LOGMEL_FNS[impl](y, params), y, params)


@pytest.mark.parametrize("params", [M2D, AUDIOJEPA], ids=["m2d", "audiojepa"])
def test_host_and_device_agree(params):
    y = np.stack([_test_signal(params.sample_rate, seed=s) for s in range(2)])
    host = frontend.logmel_host(y, params)
    device = np.asarray(frontend.logmel_device(y, params))
    assert host.shape == device.shape == (2, params.n_mels, params.num_frames(y.shape[-1]))
    loud = host > np.log(LOUD_FLOOR) + host.max()
    assert np.abs(host - device)[loud].max() <= LOGMEL_ATOL_LOUD
    assert np.abs(host - device).max() <= LOGMEL_ATOL_ALL


FRAME_PARAMS = [M2D, frontend.get_preset("matpac"), HTK_SHORT_WINDOW,
                dataclasses.replace(M2D, n_fft=401, win_length=401, hop_length=100),
                dataclasses.replace(M2D, hop_length=400, center=False)]


@pytest.mark.parametrize("params", FRAME_PARAMS)
def test_frame_count_arithmetic(params):
    for num_frames in [1, 2, 3, 7, 208, 608, 1001]:
        samples = params.num_samples_for_frames(num_frames)
        assert params.num_frames(samples) == num_frames
        if samples > 1:  # smallest: one sample fewer gives fewer frames, or none
            try:
                assert params.num_frames(samples - 1) < num_frames
            except ValueError:
                assert num_frames == 1 and not params.center


@pytest.mark.parametrize("center", [True, False])
def test_output_frames_match_num_frames(center):
    params = dataclasses.replace(M2D, center=center)
    rng = np.random.default_rng(0)
    for samples in [400, 401, 559, 560, 561, 16000, 97120, 97280]:
        y = rng.standard_normal(samples).astype(np.float32)
        expected = params.num_frames(samples)
        assert frontend.logmel_host(y, params).shape == (80, expected)
        # eval_shape traces without compiling: the device shapes are static functions of the input.
        assert jax.eval_shape(lambda w: frontend.logmel_device(w, params), y).shape == (80, expected)
        assert frontend.power_spectrogram_host(y, params).shape == (expected, 201)
    with pytest.raises(ValueError, match="shorter than one frame"):
        dataclasses.replace(M2D, center=False).num_frames(399)


@pytest.mark.parametrize("impl", list(LOGMEL_FNS))
def test_center_false_matches_librosa_and_inner_frames(impl):
    params = frontend.get_preset("matpac")
    assert not params.center
    y = _test_signal(params.sample_rate)
    uncentred = LOGMEL_FNS[impl](y, params)
    _check_logmel(uncentred, y, params)
    # With center=True frame t covers y[t*hop - n_fft/2 : t*hop + n_fft/2]; dropping the first
    # 2*hop - n_fft/2 = 120 samples lines these up with the uncentred frames of the shorter signal.
    offset = 2 * params.hop_length - params.n_fft // 2
    centred = LOGMEL_FNS[impl](y, M2D)
    inner = LOGMEL_FNS[impl](y[offset:], params)
    n = inner.shape[-1] - 1  # the last centred frame would reach into the padding
    np.testing.assert_allclose(inner[:, :n], centred[:, 2:2 + n], atol=1e-4)


@pytest.mark.parametrize("impl", ["host", "device_fft"])
@pytest.mark.parametrize("name", ["audiojepa_paper", "audiojepa_code"])
def test_audio_jepa_recipe_presets_match_librosa(impl, name):
    """Audio-JEPA's paper input (128 x 256 per 10 s, frame 2.5x the hop: an odd 3125-sample DFT) and its code's
    (96 x 512, window 1562 in a 2048 DFT), HTK mels without area norm, against librosa (tolerances above)."""
    params = frontend.get_preset(name)
    y = _test_signal(params.sample_rate)
    _check_logmel(LOGMEL_FNS[impl](y, params), y, params)
    frames_10s = params.num_frames(10 * params.sample_rate)
    assert (name, frames_10s) in {("audiojepa_paper", 256), ("audiojepa_code", 513)}
    assert params.win_length / params.hop_length == pytest.approx(2.5, abs=1e-3)


def test_presets_exist_and_validate():
    assert set(frontend.PRESETS) == {"m2d", "matpac", "riou", "m2d_32k", "audiojepa", "audiojepa_paper",
                                     "audiojepa_code", "encodec"}
    for name, params in frontend.PRESETS.items():
        assert frontend.get_preset(name) is params
        # Equal to a fresh instance built from its JSON form (as stored in checkpoints).
        assert frontend.LogMelParams.from_dict(json.loads(json.dumps(params.to_dict()))) == params
        if name.startswith("audiojepa_"):  # Kaldi-like band and filters (test_audio_jepa_recipe_presets...)
            assert (params.f_min, params.mel_scale, params.mel_norm) == (20.0, "htk", None)
            continue
        assert params.n_fft == params.win_length and params.f_min == 50.0
        assert params.f_max == params.sample_rate / 2
        assert (params.mel_scale, params.mel_norm, params.log_offset) == ("slaney", "slaney", 1.1920929e-07)
        # Equal to a fresh instance built from its JSON form (as stored in checkpoints).
        assert frontend.LogMelParams.from_dict(json.loads(json.dumps(params.to_dict()))) == params
    m2d = frontend.get_preset("m2d")
    assert (m2d.sample_rate, m2d.n_fft, m2d.hop_length, m2d.n_mels, m2d.center, m2d.pad_mode) == (
        16000, 400, 160, 80, True, "reflect")
    assert frontend.get_preset("riou") == m2d
    assert frontend.get_preset("m2d_32k").hop_length == 320 and frontend.get_preset("audiojepa").n_mels == 128
    with pytest.raises(ValueError, match="audiojepa"):
        frontend.get_preset("nope")
    with pytest.raises(TypeError):
        frontend.PRESETS["m2d"] = m2d  # read-only
    assert {m2d: 1}[frontend.LogMelParams()] == 1  # hashable, equal params hash equal


@pytest.mark.parametrize("field, value", [
    ("f_max", 9000.0), ("win_length", 401), ("mel_scale", "mel"), ("mel_norm", "l2"), ("pad_mode", "edge"),
    ("hop_length", 0), ("n_mels", 0), ("f_min", -1.0), ("power", 0.0), ("log_offset", 0.0), ("center", "yes"),
    ("sample_rate", 16000.5),
])
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        frontend.LogMelParams(**{field: value})


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="n_melz"):
        frontend.LogMelParams.from_dict({"n_melz": 64})


def test_jit_batch_compiles_once_and_matches_single_examples():
    traces = []

    def traced_logmel(waveform, params):
        traces.append(waveform.shape)
        return frontend.logmel_device(waveform, params)

    jitted = jax.jit(traced_logmel, static_argnums=1)
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((4, 16000)).astype(np.float32) for _ in range(2)]
    outputs = [np.asarray(jitted(jnp.asarray(b), M2D)) for b in batches]
    assert len(traces) == 1
    for batch, out in zip(batches, outputs):
        assert out.shape == (4, 80, 101)
        for waveform, lms in zip(batch, out):
            np.testing.assert_allclose(lms, np.asarray(frontend.logmel_device(waveform, M2D)), atol=1e-5)
            np.testing.assert_allclose(lms, frontend.logmel_host(waveform, M2D), atol=1e-4)


def test_int16_pcm_and_leading_dims():
    rng = np.random.default_rng(2)
    pcm = rng.integers(-20000, 20000, size=(2, 3, 4000), dtype=np.int16)
    as_float = pcm.astype(np.float32) / 32768.0
    host = frontend.logmel_host(pcm, M2D)
    assert host.shape == (2, 3, 80, 26)
    np.testing.assert_allclose(host, frontend.logmel_host(as_float, M2D), atol=1e-5)
    np.testing.assert_allclose(np.asarray(frontend.logmel_device(pcm, M2D)), host, atol=1e-4)
    with pytest.raises(ValueError, match="int16"):
        frontend.logmel_host(pcm.astype(np.int32), M2D)


def test_magnitude_power_option():
    params = dataclasses.replace(M2D, power=1.0)
    y = _test_signal(params.sample_rate)
    ref = _librosa_power(y, params)
    for impl, fn in POWER_FNS.items():
        assert np.abs(fn(y, params).T - ref).max() <= POWER_RTOL * ref.max(), impl
