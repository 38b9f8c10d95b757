"""Reading audio files into clean mono waveforms, with named reasons for rejecting bad files.

`load_clip` decodes a file (wav, flac, ogg, mp3, ... whatever libsndfile reads), downmixes to mono,
resamples with soxr and checks the result. A file that cannot be used raises `BadAudioError` whose
`reason` is one of `SKIP_REASONS`, so a sharding run can list it and carry on.
"""

from __future__ import annotations

import os
import stat
import struct

import numpy as np
import soundfile as sf
import soxr

# Extensions the folder scan picks up. libsndfile >= 1.1 decodes mp3; if it cannot, the file is
# listed as unreadable rather than silently ignored.
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".au", ".w64")

SKIP_REASONS = (
        "unreadable",  # the decoder refused the file (wrong format, corrupt header, not audio)
        "truncated",  # the header declares more audio than the file holds
        "empty",  # zero samples
        "non-finite",  # NaN or Inf samples (float WAVs)
        "silent",  # peak amplitude below the silence threshold
        "too short",  # shorter than the configured minimum duration
        "too long",  # longer than the configured maximum (read whole, it could exhaust memory)
        "unsupported extension",  # not one of AUDIO_EXTENSIONS (folder input only)
        "missing",  # listed in a CSV but not on disk
        "decoder crashed",  # the process decoding it died (make_shards --workers; shards.decode_files)
        "not a regular file",  # a FIFO, socket or device (opening a FIFO would block forever)
        "unreadable folder",  # a folder of a --input tree that cannot be listed (folder input only)
        "repeated folder",  # a symlinked folder already listed, or a link loop (folder input only)
)

_FILE_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a folder"))


def not_regular_file_detail(mode: int) -> str | None:
    """None for a regular file's `st_mode`, else what it is ("a FIFO (named pipe)", ...), for a skip detail."""
    if stat.S_ISREG(mode):
        return None
    return next((what for is_kind, what in _FILE_KINDS if is_kind(mode)), f"file type {stat.S_IFMT(mode):o}")


class BadAudioError(ValueError):
    """A file that cannot be used; `reason` is one of SKIP_REASONS, `detail` says why."""

    def __init__(self, reason: str, detail: str = ""):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _wav_declared_data_bytes(path: str) -> tuple[int, int] | None:
    """Returns (declared size of the RIFF 'data' chunk, bytes actually present), or None if not RIFF."""
    file_size = os.path.getsize(path)
    with open(path, "rb") as f:
        header = f.read(12)
        if len(header) < 12 or header[:4] != b"RIFF" or header[8:12] != b"WAVE":
            return None
        offset = 12
        while True:
            chunk = f.read(8)
            if len(chunk) < 8:
                return None
            chunk_id, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
            offset += 8
            if chunk_id == b"data":
                return size, max(0, file_size - offset)
            offset += size + (size & 1)
            f.seek(offset)


def load_clip(
    path: str,
    *,
    sample_rate: int,
    min_seconds: float = 0.0,
    silence_peak: float = 1e-4,
    max_seconds: float | None = None,
) -> np.ndarray:
    """Decodes `path` to a mono float32 waveform at `sample_rate` Hz.

    Args:
      path: an audio file.
      sample_rate: output rate in Hz; other rates are resampled with soxr (high quality).
      min_seconds: clips shorter than this (after resampling) are rejected as "too short".
      silence_peak: clips whose peak |amplitude| (full scale 1.0) is below this are "silent".
      max_seconds: files longer than this (from the header, before decoding) are "too long" (None: no
        limit). A file is decoded whole, as float32 at its own rate and channel count.

    Returns:
      waveform: [samples] float32, nominally in [-1, 1].

    Raises:
      BadAudioError: with a reason from SKIP_REASONS.
    """
    try:
        mode = os.stat(path).st_mode  # follows links; opens nothing
    except FileNotFoundError:
        raise BadAudioError("missing", path) from None
    except OSError as e:
        raise BadAudioError("unreadable", f"{type(e).__name__}: {e}") from None
    what = not_regular_file_detail(mode)
    if what is not None:  # opening a FIFO for reading blocks until a writer comes: never open one
        raise BadAudioError("not a regular file", f"{path} is {what}")
    if max_seconds is not None:
        try:
            info = sf.info(path)
        except Exception as e:  # libsndfile raises several types for bad input
            raise BadAudioError("unreadable", f"{type(e).__name__}: {e}") from None
        if info.samplerate > 0 and info.frames > max_seconds * info.samplerate:
            raise BadAudioError("too long", f"{info.frames / info.samplerate:.0f} s > {max_seconds:g} s (split it, or "
                                            "raise make_shards' --max_seconds)")
    try:
        data, file_rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:  # libsndfile raises several types for bad input
        raise BadAudioError("unreadable", f"{type(e).__name__}: {e}") from None
    declared = _wav_declared_data_bytes(path)
    if declared is not None and declared[0] > declared[1] and declared[0] != 0xFFFFFFFF:
        # 0xFFFFFFFF is the "unknown length" marker streaming writers use; libsndfile reads it fine.
        raise BadAudioError("truncated", f"header declares {declared[0]} data bytes, file holds {declared[1]}")
    if data.size == 0:
        raise BadAudioError("empty", "no samples")
    if not np.all(np.isfinite(data)):
        raise BadAudioError("non-finite", f"{int(np.sum(~np.isfinite(data)))} NaN/Inf samples")
    waveform = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if file_rate != sample_rate:
        waveform = soxr.resample(waveform, file_rate, sample_rate, quality="HQ").astype(np.float32)
    peak = float(np.max(np.abs(waveform)))
    if peak < silence_peak:
        raise BadAudioError("silent", f"peak amplitude {peak:.3g} < {silence_peak:g}")
    if waveform.shape[0] < min_seconds * sample_rate:
        raise BadAudioError("too short", f"{waveform.shape[0] / sample_rate:.3f} s < {min_seconds} s")
    return np.ascontiguousarray(waveform, dtype=np.float32)
