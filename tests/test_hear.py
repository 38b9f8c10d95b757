"""HEAR API and X-ARES encoder over an untrained tiny M2D export: shapes, dtypes, timestamps, torch wrappers."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from audiojepa import encoder, frontend, hear, xares
from audiojepa.methods import m2d

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


def _check_like_the_hear_validator(embeddings, timestamps, seconds, model):
    """The hear-validator's timestamp rules (errors and warnings alike are failures here)."""
    assert embeddings.ndim == 3 and timestamps.ndim == 2
    assert embeddings.shape[:2] == timestamps.shape and embeddings.shape[2] == model.timestamp_embedding_size
    assert embeddings.dtype == np.float32
    length_ms = int(seconds * SR) * 1000 / SR
    hops = np.diff(timestamps, axis=1)
    assert np.max(np.abs(hops - hops.mean())) <= 1.0  # regular spacing
    np.testing.assert_allclose(hops, 160.0, atol=1e-3)  # one 16-frame patch of 10 ms frames
    assert timestamps.min() >= 0 and timestamps.min() <= hops.mean()  # starts within one hop
    assert timestamps.max() <= length_ms  # never past the end
    assert timestamps.max() >= length_ms - hops.mean()  # covers the end
    assert (timestamps == timestamps[:1]).all()


def test_model_attributes(model):
    assert model.sample_rate == SR
    assert isinstance(model.scene_embedding_size, int) and isinstance(model.timestamp_embedding_size, int)
    assert model.scene_embedding_size == model.timestamp_embedding_size == 5 * 192  # 80 mels / 16 x dim


@pytest.mark.parametrize("seconds, num_steps, offset_ms", [(1.07, 7, 75.0), (1.98, 13, 60.0), (4.0, 26, 0.0)])
def test_timestamp_embeddings(model, seconds, num_steps, offset_ms):
    audio = _white_noise(2, seconds)
    embeddings, timestamps = hear.get_timestamp_embeddings(audio, model)
    assert isinstance(embeddings, np.ndarray) and embeddings.shape == (2, num_steps, 960)
    _check_like_the_hear_validator(embeddings, timestamps, seconds, model)
    # Patch centres (7.5 frames after the patch start), moved earlier only when the last patch is mostly padding.
    np.testing.assert_allclose(timestamps[0], offset_ms + 160.0 * np.arange(num_steps), atol=1e-3)
    assert timestamps.dtype == np.float32


def test_scene_embeddings_are_the_time_mean(model, export_dir):
    audio = _white_noise(4, 2.74, seed=1)
    scene = hear.get_scene_embeddings(audio, model)
    assert scene.shape == (4, model.scene_embedding_size) and scene.dtype == np.float32
    embeddings, _ = hear.get_timestamp_embeddings(audio, model)
    np.testing.assert_allclose(scene, embeddings.mean(axis=1), rtol=1e-6, atol=1e-6)
    _, clip = encoder.load_encoder(export_dir).embed_waveform(audio)
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
    np.testing.assert_allclose(scene.numpy(), embeddings.numpy().mean(axis=1), atol=1e-6)
    with torch.inference_mode():
        assert model(torch.from_numpy(audio)).shape == (2, 7, 960)


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
        "import audiojepa.evaluation.tasks, audiojepa.hear as hear, audiojepa.xares as xares\n"
        "assert 'torch' not in sys.modules, 'torch imported at module import time'\n"
        "sys.modules['torch'] = None  # makes `import torch` fail: as if it were not installed\n"
        "import numpy as np\n"
        "model = hear.load_model(sys.argv[1])\n"
        "assert type(model) is hear.HearEmbedder, type(model)\n"
        "emb, ts = hear.get_timestamp_embeddings(np.zeros((1, 16000), np.float32), model)\n"
        "assert isinstance(emb, np.ndarray) and emb.shape == (1, 7, 960) and ts.shape == (1, 7)\n"
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
    np.testing.assert_allclose(ts[0], np.minimum((np.arange(38) + 0.5) * 1000 / 75, 500.0), rtol=1e-6)
    assert ts[0, -1] <= 500.0 and np.allclose(np.diff(ts[0, :-1]), 1000 / 75)
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
