"""An X-ARES audio encoder (github.com/jimbozhang/xares) over an exported encoder or a training workdir.

    from audiojepa.adapters.xares import AudioJepaEncoder
    encoder = AudioJepaEncoder("/path/to/export")   # or a workdir; default $AUDIOJEPA_ENCODER
    frames = encoder(audio)                         # audio [B, samples] -> [B, T, output_dim]

X-ARES loads an encoder from a Python file by the one attribute whose name ends in "Encoder" and
builds it without arguments, so this module exposes exactly one such name, `AudioJepaEncoder`,
which reads the encoder named by $AUDIOJEPA_ENCODER when given no path:

    AUDIOJEPA_ENCODER=/path/to/export python -m xares.run audiojepa/adapters/xares.py src/tasks/*.py

With torch installed the class is a `torch.nn.Module` (no torch parameters; the encoder runs in
JAX) whose `forward` takes and returns torch tensors; without torch it is a plain class taking and
returning NumPy arrays. torch is imported on first access to `AudioJepaEncoder`, not when this
module is imported.

Attributes (what the X-ARES encoder checker asks for): `sampling_rate` (Hz), `output_dim`
(n_freq_patches x dim, or dim with AUDIOJEPA_FREQ_POOLING=mean) and `hop_size_in_ms` (time between output frames, `frame_hop_seconds`).
Any length works: the encoder cuts the log-mel into chunks of its training width and joins the
chunk outputs in time, so 10-minute inputs need no extra chunking here; chunks are padded to a few
fixed widths with the padding masked (audiojepa.adapters.encoder, "Fixed shapes"), so inputs of many lengths
compile a bounded set of shapes and each gives the frames it would alone.
"""

from __future__ import annotations

import functools
import os

from audiojepa.adapters import encoder as encoder_lib
from audiojepa.adapters import hear

# X-ARES builds the encoder without arguments: the frequency pooling comes from here ("concat" or "mean";
# Audio-JEPA's own X-ARES encoder averages the frequency patches).
FREQ_POOLING_ENV = "AUDIOJEPA_FREQ_POOLING"


@functools.cache
def _encoder_class() -> type:
    try:
        import torch

        base = torch.nn.Module
    except ImportError:
        base = object

    class AudioJepaEncoder(base):
        """Frame features of a frozen audiojepa encoder: audio [B, samples] -> [B, T, output_dim] float32."""

        def __init__(self, path: str | None = None, *, step: int | None = None, freq_pooling: str | None = None):
            super().__init__()
            freq_pooling = freq_pooling or os.environ.get(FREQ_POOLING_ENV, "concat")
            self.audio_encoder = encoder_lib.load_encoder(hear.resolve_encoder_path(path), step=step,
                                                          freq_pooling=freq_pooling)
            self.sampling_rate = int(self.audio_encoder.frontend.sample_rate)
            self.output_dim = hear.frame_feature_dim(self.audio_encoder)
            self.hop_size_in_ms = self.audio_encoder.frame_hop_seconds * 1000.0

        def forward(self, audio):
            """audio [B, samples] at `sampling_rate` (torch or NumPy) -> [B, T, output_dim] of the same kind."""
            waveform, back = hear.audio_as_numpy(audio)
            if waveform.ndim == 1:
                waveform = waveform[None]
            if waveform.ndim != 2:
                raise ValueError(f"audio must be [batch, samples]; got shape {waveform.shape}")
            frames, _ = self.audio_encoder.embed_waveform(waveform)
            return back(frames)

        if base is object:
            __call__ = forward

    return AudioJepaEncoder


def __getattr__(name: str):
    if name == "AudioJepaEncoder":
        return _encoder_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "AudioJepaEncoder"])
