"""The clip record stored in ArrayRecord shards: one msgpack map per clip.

Fields: `v` (format version), `id` (str), `sample_rate` (Hz), `num_samples`, `codec`
("pcm16": little-endian int16 samples; "flac": a FLAC file, 16-bit; "f32": little-endian float32
samples, lossless), `audio` (bytes) and `metadata` (str -> str, e.g. labels from a CSV).
"""

from __future__ import annotations

import io

import msgpack
import numpy as np
import soundfile as sf

FORMAT_VERSION = 1
CODECS = ("pcm16", "flac", "f32")
# Why a record is rejected at training time (the counts the trainer logs, in this order).
SKIP_REASONS = (
    "corrupt",  # not a clip record, unknown codec, or an audio payload that does not decode
    "truncated",  # the payload holds fewer (or more) samples than the header says
    "non_finite",  # NaN/Inf samples (possible with the "f32" codec)
    "silent",  # peak |amplitude| below the silence threshold
    "wrong_rate",  # sample rate differs from the one the run's front end expects
    "out_of_range",  # peak |amplitude| above MAX_PEAK (possible with the "f32" codec)
)
# Peak |amplitude| (full scale 1.0) below which a clip is silence, as for files in audio_io.load_clip.
SILENCE_PEAK = 1e-4
# Peak |amplitude| above which a record is not audio at full scale 1.0 ("out_of_range"): far beyond any
# over-driven float clip, far below the ~1e17 (a pure tone; ~1e19 for noise) at which the float32
# power spectrum of a 400-sample frame overflows into NaN log-mels. Only "f32" records can exceed 1.0.
MAX_PEAK = 1e3


class CorruptRecordError(ValueError):
    """A shard record that cannot be used as a waveform; `reason` is one of SKIP_REASONS."""

    def __init__(self, message: str, reason: str = "corrupt"):
        assert reason in SKIP_REASONS, reason
        super().__init__(message)
        self.reason = reason


def to_pcm16(waveform: np.ndarray) -> np.ndarray:
    """[samples] float in [-1, 1] -> int16, clipping out-of-range samples."""
    return np.clip(np.round(waveform * 32768.0), -32768, 32767).astype("<i2")


def encode_clip(
    clip_id: str,
    waveform: np.ndarray,
    sample_rate: int,
    *,
    codec: str = "pcm16",
    metadata: dict[str, str] | None = None,
) -> bytes:
    """Serialises one mono clip. `waveform`: [samples] float32 in [-1, 1], `sample_rate` in Hz."""
    if codec not in CODECS:
        raise ValueError(f"codec={codec!r}; valid: {CODECS}")
    if codec == "f32":
        audio = np.asarray(waveform, dtype="<f4").tobytes()
    elif codec == "pcm16":
        audio = to_pcm16(waveform).tobytes()
    else:
        buf = io.BytesIO()
        sf.write(buf, to_pcm16(waveform), sample_rate, format="FLAC", subtype="PCM_16")
        audio = buf.getvalue()
    return msgpack.packb(
        {
            "v": FORMAT_VERSION,
            "id": clip_id,
            "sample_rate": int(sample_rate),
            "num_samples": int(np.shape(waveform)[0]),
            "codec": codec,
            "audio": audio,
            "metadata": {str(k): str(v) for k, v in (metadata or {}).items()},
        },
        use_bin_type=True,
    )


def decode_header(raw: bytes) -> dict:
    """The record's map with `audio` still encoded (cheap: no audio decoding)."""
    try:
        record = msgpack.unpackb(raw, raw=False)
    except Exception as e:
        raise CorruptRecordError(f"not a msgpack clip record: {type(e).__name__}: {e}") from None
    if not isinstance(record, dict) or record.get("v") != FORMAT_VERSION:
        raise CorruptRecordError(f"unknown record format (v={getattr(record, 'get', lambda _: None)('v')!r})")
    return record


def decode_waveform(raw: bytes, *, sample_rate: int | None = None, silence_peak: float | None = None) -> np.ndarray:
    """Record bytes -> [samples] float32 waveform, nominally in [-1, 1]. Raises CorruptRecordError.

    Samples that are NaN/Inf ("non_finite") or have a peak |amplitude| above MAX_PEAK ("out_of_range")
    are rejected. With `sample_rate` (Hz), a record at another rate is rejected ("wrong_rate"); with
    `silence_peak`, one whose peak |amplitude| is below it ("silent").
    """
    record = decode_header(raw)
    codec, audio, n = record.get("codec"), record.get("audio"), record.get("num_samples")
    if not isinstance(n, int) or n < 0:
        raise CorruptRecordError(f"num_samples={n!r} in the header is not a sample count")
    if sample_rate is not None and record.get("sample_rate") != sample_rate:
        raise CorruptRecordError(f"record is {record.get('sample_rate')!r} Hz, expected {sample_rate} Hz",
                                 "wrong_rate")
    if codec in ("pcm16", "f32"):
        width = 2 if codec == "pcm16" else 4
        if not isinstance(audio, bytes) or len(audio) != width * n:
            raise CorruptRecordError(f"{codec} payload has {len(audio or b'')} bytes, header says {n} samples",
                                     "truncated")
        if codec == "pcm16":
            waveform = np.frombuffer(audio, dtype="<i2").astype(np.float32) * np.float32(1.0 / 32768.0)
        else:
            waveform = np.frombuffer(audio, dtype="<f4").astype(np.float32)
    elif codec == "flac":
        try:
            pcm, _ = sf.read(io.BytesIO(audio), dtype="int16")
        except Exception as e:
            raise CorruptRecordError(f"FLAC payload does not decode: {e}") from None
        if pcm.ndim != 1 or pcm.shape[0] != n:
            raise CorruptRecordError(f"FLAC payload has shape {pcm.shape}, header says {n} samples", "truncated")
        waveform = pcm.astype(np.float32) * np.float32(1.0 / 32768.0)
    else:
        raise CorruptRecordError(f"unknown codec {codec!r}; valid: {CODECS}")
    if n == 0:
        raise CorruptRecordError("record holds no samples", "truncated")
    if not np.all(np.isfinite(waveform)):
        raise CorruptRecordError(f"{int(np.sum(~np.isfinite(waveform)))} NaN/Inf samples", "non_finite")
    peak = float(np.max(np.abs(waveform)))
    if peak > MAX_PEAK:
        raise CorruptRecordError(f"peak amplitude {peak:.3g} > {MAX_PEAK:g} (full scale is 1.0)", "out_of_range")
    if silence_peak is not None and peak < silence_peak:
        raise CorruptRecordError(f"peak amplitude {peak:.3g} < {silence_peak:g}", "silent")
    return waveform
