"""The record of a precomputed EnCodec-targets shard set: one msgpack map per clip.

Written by tools/precompute_encodec_targets.py (audiojepa.data.encodec_targets), read by the training
pipeline in place of waveforms. Fields: `v` (format version), `kind` ("encodec_targets"), `id` (str),
`metadata` (str -> str, copied from the waveform record), `num_samples` (24 kHz samples of the source
clip), `num_frames` (T = ceil(num_samples / 320), 75 Hz), `feature_dtype` ("float16" | "float32"),
`features` (little-endian [T, 128] of that dtype: the continuous EnCodec encoder output),
`num_codebooks` (n_q) and `codes` (little-endian int16 [T, n_q]: the RVQ codes of the float32 features).
"""

from __future__ import annotations

import msgpack
import numpy as np

from audiojepa.data.records import CorruptRecordError

FORMAT_VERSION = 1
KIND = "encodec_targets"  # the record's and the manifest's "kind"
FEATURE_DTYPES = {"float16": "<f2", "float32": "<f4"}
FEATURE_DIM = 128  # EnCodec's embedding size (audiojepa.models.encodec.DIMENSION)


def encode_targets(clip_id: str, features: np.ndarray, codes: np.ndarray, *, num_samples: int,
                   feature_dtype: str = "float16", metadata: dict[str, str] | None = None) -> bytes:
    """Serialises one clip's targets. features: [T, 128] float; codes: [T, n_q] ints in [0, 32768)."""
    if feature_dtype not in FEATURE_DTYPES:
        raise ValueError(f"feature_dtype={feature_dtype!r}; valid: {sorted(FEATURE_DTYPES)}")
    features, codes = np.asarray(features), np.asarray(codes)
    if features.ndim != 2 or features.shape[1] != FEATURE_DIM or codes.ndim != 2 or codes.shape[0] != features.shape[0]:
        raise ValueError(f"features {features.shape} and codes {codes.shape}: expected [T, {FEATURE_DIM}] and [T, n_q]")
    if codes.size and (codes.min() < 0 or codes.max() > np.iinfo(np.int16).max):
        raise ValueError(f"codes outside int16 range [{codes.min()}, {codes.max()}]")
    return msgpack.packb({
        "v": FORMAT_VERSION,
        "kind": KIND,
        "id": clip_id,
        "metadata": {str(k): str(v) for k, v in (metadata or {}).items()},
        "num_samples": int(num_samples),
        "num_frames": int(features.shape[0]),
        "feature_dtype": feature_dtype,
        "features": features.astype(FEATURE_DTYPES[feature_dtype]).tobytes(),
        "num_codebooks": int(codes.shape[1]),
        "codes": codes.astype("<i2").tobytes(),
    }, use_bin_type=True)


def decode_targets(raw: bytes, *, num_codebooks: int | None = None) -> dict:
    """Record bytes -> {"id", "metadata", "num_samples", "features" [T, 128] (stored dtype), "codes" [T, n_q] int16}.

    Raises CorruptRecordError: "corrupt" (not a targets record, unknown dtype, or `num_codebooks` given
    and different), "truncated" (payload sizes disagree with num_frames) or "non_finite" (NaN/Inf features).
    """
    try:
        record = msgpack.unpackb(raw, raw=False)
    except Exception as e:
        raise CorruptRecordError(f"not a msgpack record: {type(e).__name__}: {e}") from None
    if not isinstance(record, dict) or record.get("kind") != KIND or record.get("v") != FORMAT_VERSION:
        kind = record.get("kind") if isinstance(record, dict) else None
        raise CorruptRecordError(f"not an {KIND} record (kind={kind!r}); a waveform shard set in place of targets?")
    frames, n_q, dtype = record.get("num_frames"), record.get("num_codebooks"), record.get("feature_dtype")
    if not isinstance(frames, int) or frames < 1 or not isinstance(n_q, int) or n_q < 1:
        raise CorruptRecordError(f"num_frames={frames!r}, num_codebooks={n_q!r} in the header are not counts")
    if dtype not in FEATURE_DTYPES:
        raise CorruptRecordError(f"feature_dtype={dtype!r}; valid: {sorted(FEATURE_DTYPES)}")
    if num_codebooks is not None and n_q != num_codebooks:
        raise CorruptRecordError(f"record has {n_q} codebooks, the manifest says {num_codebooks}")
    features, codes = record.get("features"), record.get("codes")
    width = np.dtype(FEATURE_DTYPES[dtype]).itemsize
    if not isinstance(features, bytes) or len(features) != frames * FEATURE_DIM * width:
        raise CorruptRecordError(f"features payload has {len(features or b'')} bytes, header says {frames} frames",
                                 "truncated")
    if not isinstance(codes, bytes) or len(codes) != frames * n_q * 2:
        raise CorruptRecordError(f"codes payload has {len(codes or b'')} bytes, header says {frames}x{n_q}",
                                 "truncated")
    features = np.frombuffer(features, FEATURE_DTYPES[dtype]).reshape(frames, FEATURE_DIM)
    if not np.all(np.isfinite(features)):
        raise CorruptRecordError(f"{int(np.sum(~np.isfinite(features)))} NaN/Inf feature values", "non_finite")
    return {"id": record.get("id"), "metadata": record.get("metadata") or {}, "num_samples": record.get("num_samples"),
            "features": features, "codes": np.frombuffer(codes, "<i2").reshape(frames, n_q)}
