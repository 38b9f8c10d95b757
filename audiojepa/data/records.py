"""The clip record stored in ArrayRecord shards: one msgpack map per clip.

Fields: `v` (format version), `id` (str), `sample_rate` (Hz), `num_samples`, `codec`
("pcm16": little-endian int16 samples; "flac": a FLAC file, 16-bit), `audio` (bytes) and
`metadata` (str -> str, e.g. labels from a CSV).
"""

from __future__ import annotations

import io

import msgpack
import numpy as np
import soundfile as sf

FORMAT_VERSION = 1
CODECS = ("pcm16", "flac")


class CorruptRecordError(ValueError):
    """A shard record that cannot be decoded into a waveform."""


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
    pcm = to_pcm16(waveform)
    if codec == "pcm16":
        audio = pcm.tobytes()
    else:
        buf = io.BytesIO()
        sf.write(buf, pcm, sample_rate, format="FLAC", subtype="PCM_16")
        audio = buf.getvalue()
    return msgpack.packb(
        {
            "v": FORMAT_VERSION,
            "id": clip_id,
            "sample_rate": int(sample_rate),
            "num_samples": int(pcm.shape[0]),
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


def decode_waveform(raw: bytes) -> np.ndarray:
    """Record bytes -> [samples] float32 waveform in [-1, 1). Raises CorruptRecordError."""
    record = decode_header(raw)
    codec, audio, n = record.get("codec"), record.get("audio"), record.get("num_samples")
    if codec == "pcm16":
        if not isinstance(audio, bytes) or len(audio) != 2 * n:
            raise CorruptRecordError(f"pcm16 payload has {len(audio or b'')} bytes, header says {n} samples")
        pcm = np.frombuffer(audio, dtype="<i2")
    elif codec == "flac":
        try:
            pcm, _ = sf.read(io.BytesIO(audio), dtype="int16")
        except Exception as e:
            raise CorruptRecordError(f"FLAC payload does not decode: {e}") from None
        if pcm.ndim != 1 or pcm.shape[0] != n:
            raise CorruptRecordError(f"FLAC payload has shape {pcm.shape}, header says {n} samples")
    else:
        raise CorruptRecordError(f"unknown codec {codec!r}; valid: {CODECS}")
    if n == 0:
        raise CorruptRecordError("record holds no samples")
    return pcm.astype(np.float32) * np.float32(1.0 / 32768.0)
