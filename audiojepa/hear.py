"""The HEAR API (hearbenchmark.com) over an exported encoder or a training workdir.

    import audiojepa.hear as hear
    model = hear.load_model("/path/to/export")            # or a training workdir
    scene = hear.get_scene_embeddings(audio, model)        # [n_sounds, D]
    emb, ts = hear.get_timestamp_embeddings(audio, model)  # [n_sounds, T, D], [n_sounds, T] ms

`audio` is `[n_sounds, n_samples]` float32 in [-1, 1] at `model.sample_rate`, as a NumPy array
(answers are NumPy) or a torch tensor (answers are float32 torch tensors on the input's device).
With torch installed, `load_model` returns a `torch.nn.Module` (the HEAR validator and eval kit
accept only torch or TF modules); without it, a plain object with the same attributes. torch is
imported only when `load_model` runs, never when this module is imported. The encoder itself runs
in JAX on JAX's default device.

Embeddings: one per encoder time step, D = n_freq_patches x dim (the concatenated frequency
patches, as the M2D runtime). Waveform models (EncodecMAE, 24 kHz) declare 48 kHz, resample their
input to 24 kHz, and give one embedding per 75 Hz frame at its centre, (i + 0.5) / 75 s.
Scene embedding = mean over time steps = `AudioEncoder.embed_waveform`'s
clip embedding. Timestamps: the centre of each step's patch of log-mel frames, every
`frame_hop_seconds` (160 ms for 16x16 patches with a 10 ms hop). A last patch that is mostly
zero-padding has its centre past the end of the audio, which the HEAR validator rejects; then
all timestamps of the batch move earlier by the same amount (at most half a patch) so that the
last one is the end of the audio. Spacing stays exactly one hop.

Sounds of any length: the encoder pads each chunk to one of a few widths and masks the padding
(audiojepa.encoder, "Fixed shapes"), so calls with many different lengths compile a bounded set of
shapes (each compile is logged; `model.encoder.compile_count`), while a sound's embeddings, and their
number, are those of the sound alone (to float32 rounding). Waveform models still compile once per
distinct last-chunk length.
"""

from __future__ import annotations

import functools
import os
import sys

import numpy as np

from audiojepa import encoder as encoder_lib

# Sample rates the HEAR API allows (some hear-validator versions also reject 32 kHz).
HEAR_SAMPLE_RATES = (16000, 22050, 32000, 44100, 48000)
# load_model() without a path (the validator's default) reads the encoder named here.
ENCODER_ENV = "AUDIOJEPA_ENCODER"


def hear_rate_for(model_rate: int) -> int:
    """The HEAR rate a waveform model declares: the lowest one that is a whole multiple of its own rate (so
    the resampling to it is exact, e.g. 48 kHz for a 24 kHz model), else the highest."""
    multiples = [rate for rate in HEAR_SAMPLE_RATES if rate % model_rate == 0]
    return min(multiples) if multiples else max(HEAR_SAMPLE_RATES)


def frame_feature_dim(audio_encoder: encoder_lib.AudioEncoder) -> int:
    """D of `frame_features` ([batch, T', D]): n_freq_patches x token width, from shapes only (no compile)."""
    return audio_encoder.feature_dim


def resolve_encoder_path(path: str | None) -> str:
    """`path`, else $AUDIOJEPA_ENCODER; a clear error when neither names an encoder."""
    path = path or os.environ.get(ENCODER_ENV, "")
    if not path:
        raise ValueError(f"no encoder given: pass an exported encoder folder or a training workdir, or set "
                         f"${ENCODER_ENV}")
    return path


def audio_as_numpy(audio):
    """audio (NumPy array or torch tensor) -> (float32 NumPy array, `back`).

    `back(array)` returns a NumPy result as the kind of the input: unchanged for NumPy input, a
    float32 torch tensor on the input's device for torch input. torch is never imported here: a
    torch tensor can only exist once the caller has imported torch.
    """
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(audio, torch.Tensor):
        device = audio.device

        def back(array):
            array = np.ascontiguousarray(array)
            out = torch.from_numpy(array.astype(np.float32) if array.dtype.kind == "f" else array)
            return out.to(device)
        return audio.detach().to("cpu", torch.float32).numpy(), back
    return np.asarray(audio, np.float32), lambda array: array


class HearEmbedder:
    """The HEAR computations on NumPy arrays; `load_model` wraps one for the HEAR tools.

    Attributes:
      encoder: the frozen `AudioEncoder`.
      sample_rate: input rate in Hz (the encoder's front end).
      scene_embedding_size, timestamp_embedding_size: D = n_freq_patches x dim.
      hop_ms: time between consecutive timestamp embeddings, ms.
    """

    def __init__(self, audio_encoder: encoder_lib.AudioEncoder):
        self.encoder = audio_encoder
        self.model_rate = int(audio_encoder.frontend.sample_rate)
        self.scene_embedding_size = self.timestamp_embedding_size = frame_feature_dim(audio_encoder)
        self.hop_ms = audio_encoder.frame_hop_seconds * 1000.0
        if audio_encoder.is_waveform_model:  # EncodecMAE: 24 kHz, which HEAR does not offer
            self.sample_rate = hear_rate_for(self.model_rate)
            return
        self.sample_rate = self.model_rate
        if self.sample_rate not in HEAR_SAMPLE_RATES:
            raise ValueError(f"the encoder's front end runs at {self.sample_rate} Hz; the HEAR API allows "
                             f"{HEAR_SAMPLE_RATES}")
        patch_frames = audio_encoder.patch_size[1]
        if audio_encoder.chunk_frames % patch_frames:
            # Chunks that are not whole patches would leave a padded step inside the sequence: uneven spacing.
            raise ValueError(f"chunk width {audio_encoder.chunk_frames} frames is not a multiple of the patch width "
                             f"{patch_frames}; HEAR timestamps need evenly spaced steps")

    def timestamps_ms(self, num_samples: int, num_steps: int) -> np.ndarray:
        """[num_steps] float32 timestamps (ms) for audio of `num_samples` at `sample_rate`: patch centres, kept
        within the audio; for waveform models the centres of their frames, (i + 0.5) x hop (EncodecMAE's
        HEAR wrapper, shared/reference/encodecmae.md §1.14)."""
        if self.encoder.is_waveform_model:
            length_ms = num_samples * 1000.0 / self.sample_rate
            centres = (np.arange(num_steps, dtype=np.float64) + 0.5) * self.hop_ms
            return np.minimum(centres, length_ms).astype(np.float32)
        fe = self.encoder.frontend
        frame_ms = fe.hop_length * 1000.0 / fe.sample_rate
        # Log-mel frame k is centred at k * hop (+ n_fft / 2 without centre padding).
        first_frame_centre_ms = 0.0 if fe.center else fe.n_fft / 2 * 1000.0 / fe.sample_rate
        starts_ms = first_frame_centre_ms + np.arange(num_steps, dtype=np.float64) * self.hop_ms
        length_ms = num_samples * 1000.0 / fe.sample_rate
        half_patch_ms = (self.encoder.patch_size[1] - 1) / 2 * frame_ms
        offset_ms = max(0.0, min(half_patch_ms, length_ms - starts_ms[-1]))
        timestamps = (starts_ms + offset_ms).astype(np.float32)
        # float32 rounding must not push the last timestamp past the end of the audio.
        limit = np.float32(length_ms)
        if limit > length_ms:
            limit = np.nextafter(limit, np.float32(0))
        return np.minimum(timestamps, limit)

    def timestamp_embeddings(self, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """audio [n_sounds, n_samples] -> (embeddings [n_sounds, T, D] float32, timestamps [n_sounds, T] ms float32)."""
        audio = np.asarray(audio, np.float32)
        if audio.ndim != 2 or audio.shape[1] == 0:
            raise ValueError(f"audio must be [n_sounds, n_samples] with n_samples > 0; got shape {audio.shape}")
        model_audio = audio
        if self.sample_rate != self.model_rate:  # waveform models: HEAR's rate -> the model's (48 -> 24 kHz)
            import soxr

            model_audio = np.stack([soxr.resample(a, self.sample_rate, self.model_rate, quality="HQ")
                                    for a in audio]).astype(np.float32)
        frames, _ = self.encoder.embed_waveform(model_audio)
        timestamps = self.timestamps_ms(audio.shape[1], frames.shape[1])
        return frames.astype(np.float32), np.broadcast_to(timestamps, frames.shape[:2]).copy()

    def scene_embeddings(self, audio: np.ndarray) -> np.ndarray:
        """audio [n_sounds, n_samples] -> [n_sounds, D] float32: the mean over time of the timestamp embeddings."""
        embeddings, _ = self.timestamp_embeddings(audio)
        return embeddings.mean(axis=1)


@functools.cache
def _torch_model_class():
    import torch

    class HearModel(torch.nn.Module):
        """`HearEmbedder` as a torch module (no torch parameters: the encoder runs in JAX)."""

        def __init__(self, embedder: HearEmbedder):
            super().__init__()
            self.embedder = embedder
            self.sample_rate = embedder.sample_rate
            self.scene_embedding_size = embedder.scene_embedding_size
            self.timestamp_embedding_size = embedder.timestamp_embedding_size

        def forward(self, audio):
            """audio [n_sounds, n_samples] -> timestamp embeddings [n_sounds, T, D]."""
            return get_timestamp_embeddings(audio, self)[0]

    return HearModel


def _torch_available() -> bool:
    try:
        _torch_model_class()
    except ImportError:
        return False
    return True


def load_model(model_file_path: str = "", **options):
    """The encoder at `model_file_path` (export folder or training workdir; default $AUDIOJEPA_ENCODER).

    Options: `step` (int) picks a checkpoint step of a workdir; `freq_pooling` "concat" (default, F x D) or
    "mean" (D, as M2D's runtime gives HEAR timestamp embeddings). Returns a `torch.nn.Module` when
    torch is importable, else the `HearEmbedder`; both carry `sample_rate`,
    `scene_embedding_size` and `timestamp_embedding_size`.
    """
    unknown = sorted(set(options) - {"step", "freq_pooling"})
    if unknown:
        raise TypeError(f"load_model: unknown option(s) {unknown}; valid: step, freq_pooling")
    path = resolve_encoder_path(model_file_path)
    embedder = HearEmbedder(encoder_lib.load_encoder(path, step=options.get("step"),
                                                     freq_pooling=options.get("freq_pooling", "concat")))
    return _torch_model_class()(embedder) if _torch_available() else embedder


def _embedder_of(model) -> HearEmbedder:
    embedder = getattr(model, "embedder", model)
    if not isinstance(embedder, HearEmbedder):
        raise TypeError(f"expected a model from audiojepa.hear.load_model, got {type(model).__name__}")
    return embedder


def get_timestamp_embeddings(audio, model):
    """audio [n_sounds, n_samples] -> (embeddings [n_sounds, T, D], timestamps [n_sounds, T] in ms), float32."""
    waveform, back = audio_as_numpy(audio)
    embeddings, timestamps = _embedder_of(model).timestamp_embeddings(waveform)
    return back(embeddings), back(timestamps)


def get_scene_embeddings(audio, model):
    """audio [n_sounds, n_samples] -> [n_sounds, D] float32: the time mean of the timestamp embeddings."""
    waveform, back = audio_as_numpy(audio)
    return back(_embedder_of(model).scene_embeddings(waveform))
