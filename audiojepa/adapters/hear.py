"""The HEAR API (hearbenchmark.com) over an exported encoder or a training workdir.

    import audiojepa.adapters.hear as hear
    model = hear.load_model("/path/to/export")            # or a training workdir
    scene = hear.get_scene_embeddings(audio, model)        # [n_sounds, D]
    emb, ts = hear.get_timestamp_embeddings(audio, model)  # [n_sounds, T, D], [n_sounds, T] ms

`audio` is `[n_sounds, n_samples]` float32 in [-1, 1] at `model.sample_rate`, as a NumPy array
(answers are NumPy) or a torch tensor (answers are float32 torch tensors on the input's device).
With torch installed, `load_model` returns a `torch.nn.Module` (the HEAR validator and eval kit
accept only torch or TF modules); without it, a plain object with the same attributes. torch is
imported only when `load_model` runs, never when this module is imported. The encoder itself runs
in JAX on JAX's default device.

Embeddings: D = n_freq_patches x dim (the concatenated frequency patches, as the M2D runtime; or dim with
`freq_pooling="mean"`). The encoder gives one feature per time step at a fixed position: the centre of the
step's patch of log-mel frames, every `frame_hop_seconds` (160 ms for 16x16 patches of 10 ms frames), or for
waveform models (EncodecMAE) the centre of each 75 Hz frame, (i + 0.5) / 75 s (its HEAR wrapper).

Timestamps (`timestamp_hop_ms`, a `load_model` option):
  - default (None): the steps themselves when they are at most 50 ms apart (EncodecMAE: 13.3 ms), else a
    50 ms grid, since the hear-validator warns above 50 ms and HEAR's event tasks score onsets within
    200 ms, which 160 ms steps resolve poorly;
  - a number of ms: timestamps 0, h, 2h, ... up to the end of the audio, each embedding the linear
    interpolation in time between the two steps around it (the first / last step's features before the first
    step's centre / after the last one). Interpolation adds no information the steps do not hold; it puts
    them on the grid the HEAR tools expect. (Overlapping chunks shifted by a fraction of a patch would
    give new features per timestamp, at h/160 ms times the compute; not provided.)
  - "native": the steps, a step whose centre is past the end of the audio (mostly padding) left out (one
    step is always kept, its timestamp at most the audio's length).
Either way a timestamp depends only on its index, never on the sound's length, so the timestamps of a
short sound are the first ones of a longer sound's.

Scene embedding = `AudioEncoder.embed_waveform`'s clip embedding: the time mean of the step features (as
evaluation embeds clips), whatever the timestamp hop.

Sample rate: the model declares its front end's rate when the HEAR API accepts it everywhere (16, 22.05, 44.1
or 48 kHz); otherwise (32 kHz models, which some hear-validator versions reject; EncodecMAE's 24 kHz) the
lowest accepted rate that is a whole multiple of it, else 48 kHz, and resamples its input to its own rate
with soxr. `load_model(..., sample_rate=32000)` declares another rate (16000, 22050, 32000, 44100, 48000).

GPU memory: HEAR and X-ARES run the encoder in the same process as torch. Importing this module (or
audiojepa.adapters.xares) sets XLA_PYTHON_CLIENT_PREALLOCATE=false unless it is already set, so that JAX, when it
starts its backend (at the first computation, not at import), takes GPU memory as it needs it instead of
75% of it up front. It has no effect if JAX already ran something in the process: set it before that.

Sounds of any length: the encoder pads each chunk to one of a few widths and masks the padding
(audiojepa.adapters.encoder, "Fixed shapes"), so calls with many different lengths compile a bounded set of
shapes (each compile is logged; `model.encoder.compile_count`), while a sound's embeddings, and their
number, are those of the sound alone (to float32 rounding). Waveform models still compile once per
distinct last-chunk length.
"""

from __future__ import annotations

import functools
import os
import sys

# Before anything starts JAX's backend (module docstring, "GPU memory").
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402

from audiojepa.adapters import encoder as encoder_lib  # noqa: E402

# Sample rates every version of the HEAR API's validator accepts; a model declares one of these by default.
HEAR_SAMPLE_RATES = (16000, 22050, 44100, 48000)
# ... and those the HEAR API lists (some validator versions reject 32 kHz): `load_model(sample_rate=...)`.
HEAR_API_SAMPLE_RATES = (16000, 22050, 32000, 44100, 48000)
# The hear-validator warns when timestamps are further apart.
MAX_TIMESTAMP_HOP_MS = 50.0
NATIVE = "native"
# load_model() without a path (the validator's default) reads the encoder named here.
ENCODER_ENV = "AUDIOJEPA_ENCODER"


def hear_rate_for(model_rate: int) -> int:
    """The HEAR rate a model whose own rate HEAR_SAMPLE_RATES lacks declares: the lowest one that is a whole
    multiple of its own rate (e.g. 48 kHz for a 24 kHz model), else the highest (48 kHz for 32 kHz)."""
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
      sample_rate: the rate in Hz the model declares and its input comes at (module docstring).
      model_rate: the encoder's own rate; input is resampled to it when it differs.
      scene_embedding_size, timestamp_embedding_size: D = n_freq_patches x dim.
      step_ms: time between the encoder's steps, ms.
      hop_ms: time between consecutive timestamps, ms (step_ms unless interpolated).
      interpolated: timestamps on a grid of hop_ms, embeddings interpolated between steps.
    """

    def __init__(self, audio_encoder: encoder_lib.AudioEncoder, *, timestamp_hop_ms: float | str | None = None,
                 sample_rate: int | None = None):
        self.encoder = audio_encoder
        self.model_rate = int(audio_encoder.frontend.sample_rate)
        self.scene_embedding_size = self.timestamp_embedding_size = frame_feature_dim(audio_encoder)
        self.step_ms = audio_encoder.frame_hop_seconds * 1000.0
        if timestamp_hop_ms is None:
            self.hop_ms = self.step_ms if self.step_ms <= MAX_TIMESTAMP_HOP_MS else MAX_TIMESTAMP_HOP_MS
        elif timestamp_hop_ms == NATIVE:
            self.hop_ms = self.step_ms
        else:
            try:
                self.hop_ms = float(timestamp_hop_ms)
            except (TypeError, ValueError):
                self.hop_ms = -1.0
            if not self.hop_ms > 0:
                raise ValueError(f"timestamp_hop_ms={timestamp_hop_ms!r}; give milliseconds > 0, {NATIVE!r} (the "
                                 "encoder's steps) or None (the steps if <= 50 ms apart, else a 50 ms grid)")
        self.interpolated = self.hop_ms != self.step_ms
        if sample_rate is None:
            sample_rate = self.model_rate if self.model_rate in HEAR_SAMPLE_RATES else hear_rate_for(self.model_rate)
        if sample_rate not in HEAR_API_SAMPLE_RATES:
            raise ValueError(f"sample_rate={sample_rate}: the HEAR API allows {HEAR_API_SAMPLE_RATES}")
        self.sample_rate = int(sample_rate)
        if audio_encoder.is_waveform_model:
            return
        patch_frames = audio_encoder.patch_size[1]
        if audio_encoder.chunk_frames % patch_frames:
            # Chunks that are not whole patches would leave a padded step inside the sequence: uneven spacing.
            raise ValueError(f"chunk width {audio_encoder.chunk_frames} frames is not a multiple of the patch width "
                             f"{patch_frames}; HEAR timestamps need evenly spaced steps")

    def step_centres_ms(self, num_steps: int) -> np.ndarray:
        """[num_steps] float64: where the encoder's steps sit (ms), whatever the audio's length: the centre of each
        step's patch of log-mel frames (frame k centred at k x hop, + n_fft / 2 without centre padding), or of
        each frame of a waveform model, (i + 0.5) x step (EncodecMAE's HEAR wrapper, encodecmae.md §1.14)."""
        steps = np.arange(num_steps, dtype=np.float64)
        if self.encoder.is_waveform_model:
            return (steps + 0.5) * self.step_ms
        fe = self.encoder.frontend
        frame_ms = fe.hop_length * 1000.0 / fe.sample_rate
        first_frame_centre_ms = 0.0 if fe.center else fe.n_fft / 2 * 1000.0 / fe.sample_rate
        return first_frame_centre_ms + steps * self.step_ms + (self.encoder.patch_size[1] - 1) / 2 * frame_ms

    def _model_audio(self, audio) -> np.ndarray:
        """audio [n_sounds, n_samples] at `sample_rate`, checked, at the encoder's own rate."""
        audio = np.asarray(audio, np.float32)
        if audio.ndim != 2 or audio.shape[1] == 0:
            raise ValueError(f"audio must be [n_sounds, n_samples] with n_samples > 0; got shape {audio.shape}")
        if self.sample_rate == self.model_rate:
            return audio
        import soxr  # the declared rate -> the model's (48 -> 24 kHz EncodecMAE, 48 -> 32 kHz)

        return np.stack([soxr.resample(a, self.sample_rate, self.model_rate, quality="HQ")
                         for a in audio]).astype(np.float32)

    def timestamp_embeddings(self, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """audio [n_sounds, n_samples] -> (embeddings [n_sounds, T, D] float32, timestamps [n_sounds, T] ms float32)."""
        audio = np.asarray(audio, np.float32)
        frames, _ = self.encoder.embed_waveform(self._model_audio(audio))
        length_ms = audio.shape[1] * 1000.0 / self.sample_rate
        centres = self.step_centres_ms(frames.shape[1])
        if self.interpolated:
            timestamps = np.arange(int(np.floor(length_ms / self.hop_ms + 1e-9)) + 1, dtype=np.float64) * self.hop_ms
            embeddings = interpolate_steps(frames, centres, timestamps)
        else:  # the steps; one whose centre is past the end (mostly padding) is left out, one always kept
            keep = max(1, int(np.count_nonzero(centres <= length_ms + 1e-6)))  # 1 ns: float rounding of the centres
            timestamps, embeddings = np.minimum(centres[:keep], length_ms), frames[:, :keep]
        timestamps = timestamps.astype(np.float32)
        limit = np.float32(length_ms)  # float32 rounding must not push a timestamp past the end of the audio
        if limit > length_ms:
            limit = np.nextafter(limit, np.float32(0))
        timestamps = np.minimum(timestamps, limit)
        return embeddings.astype(np.float32), np.broadcast_to(timestamps, embeddings.shape[:2]).copy()

    def scene_embeddings(self, audio: np.ndarray) -> np.ndarray:
        """audio [n_sounds, n_samples] -> [n_sounds, D] float32: the encoder's clip embedding (the time mean of its
        step features), whatever the timestamp hop."""
        return self.encoder.embed_waveform(self._model_audio(audio))[1].astype(np.float32)


def interpolate_steps(features: np.ndarray, centres_ms: np.ndarray, times_ms: np.ndarray) -> np.ndarray:
    """features [n, T, D] at step positions centres_ms [T] (increasing) -> [n, len(times_ms), D]: at each time, the
    linear interpolation between the steps around it (np.interp per channel; before the first / after the last
    centre, that step's features)."""
    right = np.clip(np.searchsorted(centres_ms, times_ms, side="right"), 1, max(1, len(centres_ms) - 1))
    left = right - 1
    if len(centres_ms) == 1:
        return np.repeat(features[:, :1], len(times_ms), axis=1)
    weight = np.clip((times_ms - centres_ms[left]) / (centres_ms[right] - centres_ms[left]), 0.0, 1.0)
    weight = weight.astype(features.dtype)[None, :, None]
    return features[:, left] * (1 - weight) + features[:, right] * weight


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
    "mean" (D, as M2D's runtime gives HEAR timestamp embeddings); `timestamp_hop_ms` (None: the steps if at most
    50 ms apart, else a 50 ms grid; ms; or "native") and `sample_rate` (the rate to declare; module docstring).
    Returns a `torch.nn.Module` when torch is importable, else the `HearEmbedder`; both carry `sample_rate`,
    `scene_embedding_size` and `timestamp_embedding_size`.
    """
    valid = ("step", "freq_pooling", "timestamp_hop_ms", "sample_rate")
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"load_model: unknown option(s) {unknown}; valid: {', '.join(valid)}")
    path = resolve_encoder_path(model_file_path)
    embedder = HearEmbedder(encoder_lib.load_encoder(path, step=options.get("step"),
                                                     freq_pooling=options.get("freq_pooling", "concat")),
                            timestamp_hop_ms=options.get("timestamp_hop_ms"), sample_rate=options.get("sample_rate"))
    return _torch_model_class()(embedder) if _torch_available() else embedder


def _embedder_of(model) -> HearEmbedder:
    embedder = getattr(model, "embedder", model)
    if not isinstance(embedder, HearEmbedder):
        raise TypeError(f"expected a model from audiojepa.adapters.hear.load_model, got {type(model).__name__}")
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
