"""HEAR API and X-ARES encoder over an untrained tiny M2D export: shapes, dtypes, timestamps, torch wrappers."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from audiojepa.adapters import encoder, hear, xares
from audiojepa.methods import m2d
from audiojepa.ops import frontend

REPO = Path(__file__).resolve().parents[1]
SR = 16000


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    config = m2d.default_config("tiny")
    method = m2d.M2D(config, input_shape=(80, 48))
    # Only the encoder's params are exported: initialising them alone skips the predictor and target stack.
    encoder_params = jax.jit(lambda key: method.encoder.init(key, jnp.zeros((1, 80, 48)))["params"])(
        jax.random.key(0))
    audio_encoder = encoder.AudioEncoder("m2d", config, (80, 48), frontend.get_preset("m2d"), (-7.1, 4.2),
                                         {"encoder": encoder_params})
    return audio_encoder.save(str(tmp_path_factory.mktemp("export")))


@pytest.fixture(scope="module")
def model(export_dir):
    return hear.load_model(export_dir)


def _white_noise(n, seconds, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (n, int(seconds * SR))).astype(np.float32)


def _check_like_the_hear_validator(embeddings, timestamps, seconds, model, hop_ms=50.0):
    """The hear-validator's timestamp rules (errors and warnings alike are failures here), hop <= 50 ms included."""
    assert embeddings.ndim == 3 and timestamps.ndim == 2
    assert embeddings.shape[:2] == timestamps.shape and embeddings.shape[2] == model.timestamp_embedding_size
    assert embeddings.dtype == np.float32
    length_ms = int(seconds * SR) * 1000 / SR
    hops = np.diff(timestamps, axis=1)
    assert np.max(np.abs(hops - hops.mean())) <= 1.0  # regular spacing
    np.testing.assert_allclose(hops, hop_ms, atol=1e-3)
    assert hop_ms <= hear.MAX_TIMESTAMP_HOP_MS
    assert timestamps.min() >= 0 and timestamps.min() <= hops.mean()  # starts within one hop
    assert timestamps.max() <= length_ms  # never past the end
    assert timestamps.max() >= length_ms - hops.mean()  # covers the end
    assert (timestamps == timestamps[:1]).all()


def test_model_attributes(model):
    assert model.sample_rate == SR
    assert isinstance(model.scene_embedding_size, int) and isinstance(model.timestamp_embedding_size, int)
    assert model.scene_embedding_size == model.timestamp_embedding_size == 5 * 192  # 80 mels / 16 x dim


@pytest.mark.parametrize("seconds, num_timestamps", [(1.07, 22), (1.98, 40), (4.0, 81)])
def test_timestamp_embeddings_on_a_50_ms_grid(model, seconds, num_timestamps):
    """The default: the 160 ms steps interpolated onto timestamps 0, 50, 100, ... ms up to the end."""
    audio = _white_noise(2, seconds)
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
    assert isinstance(embeddings, np.ndarray) and embeddings.shape == (2, num_timestamps, 960)
    _check_like_the_hear_validator(embeddings, timestamps, seconds, model)
    np.testing.assert_allclose(timestamps[0], 50.0 * np.arange(num_timestamps), atol=1e-3)
    assert timestamps.dtype == np.float32


def test_interpolated_embeddings_are_np_interp_of_the_steps(export_dir, model):
    """Each channel of the 50 ms embeddings is np.interp of the native steps' channel at the timestamps, the steps
    at their patch centres 75 + 160 i ms (7.5 frames of 10 ms after the patch start); rtol 1e-5."""
    native = hear.load_model(export_dir, timestamp_hop_ms="native")
    audio = _white_noise(1, 1.98, seed=3)
    steps, _ = hear.get_timestamp_embeddings(audio, native)
    frames, _ = encoder.load_encoder(export_dir).embed_waveform(audio)  # every step, the last (padded) one too
    grid, timestamps = hear.get_timestamp_embeddings(audio, model)
    centres = 75.0 + 160.0 * np.arange(frames.shape[1])
    expected = np.stack([np.interp(timestamps[0], centres, frames[0, :, d]) for d in range(frames.shape[2])], -1)
    np.testing.assert_allclose(np.asarray(grid)[0], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(steps), frames[:, :12])  # the native steps are the encoder's


@pytest.mark.parametrize("seconds, num_steps", [(1.07, 7), (1.98, 12), (4.0, 25)])
def test_native_timestamps_are_the_patch_centres(export_dir, seconds, num_steps):
    """timestamp_hop_ms="native": the steps at 75 + 160 i ms; a last step centred past the end (1.98 s: 1995 ms) is
    left out, so no timestamp moves with the sound's length."""
    native = hear.load_model(export_dir, timestamp_hop_ms="native")
    embeddings, timestamps = hear.get_timestamp_embeddings(_white_noise(2, seconds), native)
    assert embeddings.shape == (2, num_steps, 960)
    timestamps = np.asarray(timestamps)[0]
    np.testing.assert_allclose(timestamps, 75.0 + 160.0 * np.arange(num_steps), atol=1e-3)
    # The validator's other rules hold (its hop warning aside): within the audio, covering its end.
    assert timestamps[-1] <= seconds * 1000 and timestamps[-1] >= seconds * 1000 - 160.0


def test_timestamps_do_not_depend_on_the_length(model):
    short_ts = np.asarray(hear.get_timestamp_embeddings(_white_noise(1, 1.07), model)[1])[0]
    long_ts = np.asarray(hear.get_timestamp_embeddings(_white_noise(1, 4.0), model)[1])[0]
    np.testing.assert_array_equal(long_ts[:len(short_ts)], short_ts)


def test_bad_timestamp_hop_and_sample_rate_are_errors(export_dir):
    with pytest.raises(ValueError, match="timestamp_hop_ms='fast'"):
        hear.load_model(export_dir, timestamp_hop_ms="fast")
    with pytest.raises(ValueError, match="sample_rate=8000"):
        hear.load_model(export_dir, sample_rate=8000)
    with pytest.raises(TypeError, match="unknown option"):
        hear.load_model(export_dir, hop=50)


def test_scene_embeddings_are_the_time_mean(model, export_dir):
    """The scene embedding is the encoder's clip embedding, the time mean of all its steps (as evaluation embeds
    clips), not a mean over the interpolated timestamps."""
    audio = _white_noise(4, 2.74, seed=1)
    scene = hear.get_scene_embeddings(audio, model)
    assert scene.shape == (4, model.scene_embedding_size) and scene.dtype == np.float32
    frames, clip = encoder.load_encoder(export_dir).embed_waveform(audio)
    np.testing.assert_allclose(scene, frames.mean(axis=1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(scene, clip, rtol=1e-6, atol=1e-6)


def test_torch_model_takes_and_returns_tensors(model):
    torch = pytest.importorskip("torch", reason="the torch wrapper needs torch")
    assert isinstance(model, torch.nn.Module)
    model.to("cpu")  # what the HEAR tools do; the module has no torch parameters to move
    audio = _white_noise(2, 1.07, seed=2)
    embeddings, timestamps = hear.get_timestamp_embeddings(torch.from_numpy(audio), model)
    assert isinstance(embeddings, torch.Tensor) and embeddings.dtype == torch.float32
    assert isinstance(timestamps, torch.Tensor) and timestamps.dtype == torch.float32
    scene = hear.get_scene_embeddings(torch.from_numpy(audio), model)
    assert isinstance(scene, torch.Tensor) and scene.dtype == torch.float32 and scene.shape == (2, 960)
    np.testing.assert_allclose(embeddings.numpy(), hear.get_timestamp_embeddings(audio, model)[0], atol=1e-6)
    np.testing.assert_allclose(scene.numpy(), hear.get_scene_embeddings(audio, model), atol=1e-6)
    with torch.inference_mode():
        assert model(torch.from_numpy(audio)).shape == (2, 22, 960)


def test_load_model_without_a_path(export_dir, monkeypatch):
    monkeypatch.delenv(hear.ENCODER_ENV, raising=False)
    with pytest.raises(ValueError, match=hear.ENCODER_ENV):
        hear.load_model()
    monkeypatch.setenv(hear.ENCODER_ENV, export_dir)
    assert hear.load_model().timestamp_embedding_size == 960


def test_xares_encoder(export_dir, monkeypatch):
    torch = pytest.importorskip("torch", reason="the X-ARES encoder is a torch module")
    # X-ARES picks the one module attribute whose name ends in "Encoder" and builds it without arguments.
    names = [name for name in dir(xares) if name.endswith("Encoder")]
    assert names == ["AudioJepaEncoder"]
    monkeypatch.setenv(hear.ENCODER_ENV, export_dir)
    xares_encoder = getattr(xares, names[0])()
    assert isinstance(xares_encoder, torch.nn.Module) and type(xares_encoder).__name__.endswith("Encoder")
    assert xares_encoder.sampling_rate == SR and xares_encoder.output_dim == 960
    assert xares_encoder.hop_size_in_ms == pytest.approx(160.0)
    audio = torch.randn(2, 50000)  # the X-ARES checker's input
    with torch.inference_mode():
        frames = xares_encoder.to("cpu")(audio)
    # 50000 samples = 313 frames = chunks of 48 x 6 + 25 (two patches) -> 20 steps.
    assert isinstance(frames, torch.Tensor) and frames.dtype == torch.float32 and frames.shape == (2, 20, 960)
    expected, _ = encoder.load_encoder(export_dir).embed_waveform(audio.numpy())
    np.testing.assert_allclose(frames.numpy(), expected, atol=1e-6)


def test_no_torch_at_import_and_plain_objects_without_torch(export_dir):
    """In a fresh process: importing the adapters loads no torch; with torch absent they return NumPy objects."""
    script = (
        "import sys\n"
        "import audiojepa.evaluation.tasks, audiojepa.adapters.hear as hear, audiojepa.adapters.xares as xares\n"
        "assert 'torch' not in sys.modules, 'torch imported at module import time'\n"
        "sys.modules['torch'] = None  # makes `import torch` fail: as if it were not installed\n"
        "import numpy as np\n"
        "model = hear.load_model(sys.argv[1])\n"
        "assert type(model) is hear.HearEmbedder, type(model)\n"
        "emb, ts = hear.get_timestamp_embeddings(np.zeros((1, 16000), np.float32), model)\n"
        "assert isinstance(emb, np.ndarray) and emb.shape == (1, 21, 960) and ts.shape == (1, 21)\n"
        "enc = xares.AudioJepaEncoder(sys.argv[1])\n"
        "assert type(enc).__name__ == 'AudioJepaEncoder'\n"
        "assert enc(np.zeros((2, 8000), np.float32)).shape == (2, 4, 960)\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", script, export_dir], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_waveform_encoder_serves_hear_at_48_khz():
    """EncodecMAE (24 kHz, which HEAR does not offer) declares 48 kHz, resamples to 24 kHz, and gives one
    embedding per 75 Hz frame at its centre, (i + 0.5) / 75 s (encodecmae.md §1.14); the embeddings equal
    the encoder's own on the same audio resampled with soxr (atol 1e-5)."""
    import soxr

    from audiojepa import methods
    from audiojepa.methods import encodecmae

    config = encodecmae.default_config("tiny")
    method = encodecmae.EncodecMAE(config, input_shape=(9600,))  # 0.4 s crops, random EnCodec weights
    enc = encoder.AudioEncoder("encodecmae", config, (9600,), frontend.get_preset("encodec"), (0.0, 1.0),
                               methods.random_encoder_params(method, jax.random.key(0)))
    embedder = hear.HearEmbedder(enc)
    assert embedder.sample_rate == 48000 and embedder.hop_ms == pytest.approx(1000 / 75)
    audio = (0.1 * np.random.default_rng(0).standard_normal((2, 48000 // 2))).astype(np.float32)  # 0.5 s
    emb, ts = embedder.timestamp_embeddings(audio)
    assert emb.shape == (2, 38, embedder.timestamp_embedding_size) and emb.dtype == np.float32  # ceil(12000/320)
    np.testing.assert_allclose(ts[0], (np.arange(38) + 0.5) * 1000 / 75, rtol=1e-6)  # 13.3 ms steps: native
    assert ts[0, -1] <= 500.0 and np.allclose(np.diff(ts[0]), 1000 / 75)
    at_24k = np.stack([soxr.resample(a, 48000, 24000, quality="HQ") for a in audio]).astype(np.float32)
    np.testing.assert_allclose(emb, enc.embed_waveform(at_24k)[0], atol=1e-5)


def test_frequency_mean_pooling_for_hear_and_xares(export_dir, model, monkeypatch):
    """freq_pooling="mean": D = dim (192), each frame the mean of the concatenated features' F = 5 patches
    (M2D's runtime for HEAR timestamp embeddings; Audio-JEPA's X-ARES encoder). rtol 1e-6."""
    mean_model = hear.load_model(export_dir, freq_pooling="mean")
    assert mean_model.scene_embedding_size == mean_model.timestamp_embedding_size == 192
    audio = _white_noise(2, 1.0)
    concat, ts = hear.get_timestamp_embeddings(audio, model)
    averaged, ts_mean = hear.get_timestamp_embeddings(audio, mean_model)
    concat, averaged = (np.asarray(x.cpu()) if hasattr(x, "cpu") else np.asarray(x) for x in (concat, averaged))
    np.testing.assert_allclose(averaged, concat.reshape(2, -1, 5, 192).mean(axis=2), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(ts_mean), np.asarray(ts))
    with pytest.raises(ValueError, match="freq_pooling='max'"):
        hear.load_model(export_dir, freq_pooling="max")
    monkeypatch.setenv(xares.FREQ_POOLING_ENV, "mean")
    assert xares.AudioJepaEncoder(export_dir).output_dim == 192


def test_a_32_khz_model_declares_48_khz_and_resamples():
    """A model trained at 32 kHz (frontend m2d_32k) declares 48 kHz, which every hear-validator accepts, and
    embeds its input resampled 48 -> 32 kHz with soxr: the embeddings equal the encoder's on that audio
    (atol 1e-5); sample_rate=32000 declares its own rate."""
    import soxr

    config = m2d.default_config("tiny")
    fe = frontend.get_preset("m2d_32k")
    method = m2d.M2D(config, input_shape=(80, 48))
    params = jax.jit(lambda key: method.encoder.init(key, jnp.zeros((1, 80, 48)))["params"])(jax.random.key(0))
    enc = encoder.AudioEncoder("m2d", config, (80, 48), fe, (-7.1, 4.2), {"encoder": params})
    embedder = hear.HearEmbedder(enc)
    assert embedder.sample_rate == 48000 and embedder.model_rate == 32000
    audio = (0.1 * np.random.default_rng(0).standard_normal((2, 48000))).astype(np.float32)  # 1 s at 48 kHz
    emb, ts = embedder.timestamp_embeddings(audio)
    _check_like_the_hear_validator(emb, ts, 1.0, embedder)  # timestamps in ms of the 48 kHz input
    at_32k = np.stack([soxr.resample(a, 48000, 32000, quality="HQ") for a in audio]).astype(np.float32)
    np.testing.assert_allclose(embedder.scene_embeddings(audio), enc.embed_waveform(at_32k)[1], atol=1e-5)
    assert hear.HearEmbedder(enc, sample_rate=32000).sample_rate == 32000


def test_importing_the_adapters_turns_off_gpu_preallocation_unless_set():
    """JAX must not take 75% of the GPU beside torch: importing audiojepa.adapters.hear (and .xares) sets
    XLA_PYTHON_CLIENT_PREALLOCATE=false before JAX starts its backend, and keeps a value the user set."""
    code = "import os, audiojepa.adapters.{m}; print(os.environ.get('XLA_PYTHON_CLIENT_PREALLOCATE'))"
    env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_PREALLOCATE"}
    for module in ("hear", "xares"):
        out = subprocess.run([sys.executable, "-c", code.format(m=module)], env=env, capture_output=True, text=True,
                             cwd=REPO, timeout=300)
        assert out.stdout.strip() == "false", out.stderr[-2000:]
    out = subprocess.run([sys.executable, "-c", code.format(m="hear")], env={**env, "XLA_PYTHON_CLIENT_PREALLOCATE":
                                                                             "true"},
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.stdout.strip() == "true"
