"""Clip embedders for evaluation: trained encoders and the two floors every report shows.

An embedder has `name`, `sample_rate` (Hz) and `embed_batch(waveform [batch, samples]) -> [batch, dim]`.

- `EncoderEmbedder`: a frozen encoder (export or training workdir); clip embedding = time mean of
  its chunked frame features.
- `LogMelEmbedder` (`--encoder=logmel`): the mean and the std over time of the normalised log-mel,
  concatenated: [2 x n_mels].
- `random:<config>`: the config's encoder at random initialisation (seeded), through
  `EncoderEmbedder`: what the architecture gives before any training.
"""

from __future__ import annotations

import numpy as np

from audiojepa import encoder as encoder_lib
from audiojepa import frontend as frontend_lib
from audiojepa.data import stats


class EncoderEmbedder:
    def __init__(self, audio_encoder: encoder_lib.AudioEncoder, name: str):
        self.encoder = audio_encoder
        self.name = name
        self.sample_rate = audio_encoder.frontend.sample_rate

    def embed_batch(self, waveform: np.ndarray) -> np.ndarray:
        return self.encoder.embed_waveform(waveform)[1]


class LogMelEmbedder:
    def __init__(self, params: frontend_lib.LogMelParams, norm_stats=stats.M2D_DEFAULT_STATS, name: str = "logmel"):
        self.params = params
        self.norm_stats = tuple(norm_stats)
        self.name = name
        self.sample_rate = params.sample_rate

    def embed_batch(self, waveform: np.ndarray) -> np.ndarray:
        lms = stats.normalize(frontend_lib.logmel_host(np.asarray(waveform, np.float32), self.params),
                              *self.norm_stats)
        return np.concatenate([lms.mean(axis=-1), lms.std(axis=-1)], axis=-1)


def random_encoder(config_arg: str, *, seed: int = 0) -> encoder_lib.AudioEncoder:
    """`configs/m2d.py:runlocal` -> that config's encoder with seeded random parameters."""
    import jax

    from audiojepa import config_utils, methods
    from audiojepa.data import pipeline

    config = config_utils.load_config(config_arg)
    spec = pipeline.resolve_data_spec(config.data)
    method_cls = methods.get_method(config.method)
    input_shape = methods.input_shape(method_cls, spec.frontend, spec.crop_frames)
    method = method_cls(config.model, input_shape=input_shape)
    return encoder_lib.AudioEncoder(config.method, config.model, input_shape, spec.frontend,
                                    (spec.norm_mean, spec.norm_std),
                                    methods.random_encoder_params(method, jax.random.key(seed)))


def make_embedder(spec: str, *, frontend: str = "m2d") -> EncoderEmbedder | LogMelEmbedder:
    """`--encoder` value -> embedder: a path (export or workdir), `logmel`, or `random:<config>`."""
    if spec == "logmel":
        return LogMelEmbedder(frontend_lib.get_preset(frontend))
    if spec.startswith("random:"):
        return EncoderEmbedder(random_encoder(spec[len("random:"):]), name=spec)
    return EncoderEmbedder(encoder_lib.load_encoder(spec), name=spec)
