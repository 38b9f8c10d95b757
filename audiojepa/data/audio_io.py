"""Reading audio files into clean mono waveforms, with named reasons for rejecting bad files.

`load_clip` decodes a file, downmixes to mono (the mean of the channels), resamples with soxr and checks
the result. A file that cannot be used raises `BadAudioError` whose `reason` is one of `SKIP_REASONS`, so a
sharding run can list it and carry on. `decode_file` is its decoding step alone ([samples, channels] at the
file's rate); `read_info` reads a header without decoding.

Two decoders, chosen by extension (`decoder_order`):

- libsndfile (through `soundfile`) for wav, flac, ogg/opus, mp3, aiff, au, w64, caf: the path every shard set
  before PyAV was made with (those files decode to the same samples as before, at the same speed:
  tools/bench_data.py --parts=decode). A file libsndfile refuses is then tried with PyAV (e.g. an m4a saved as
  .wav, FLAC in Ogg); only when both refuse is it "unreadable", the detail naming both errors.
- PyAV (`av`, whose wheel ships FFmpeg's libraries) for the containers libsndfile does not read: m4a, mp4, mov,
  3gp, aac (ADTS), webm, mka, mkv, wma, ac3, amr, wv, ape, mp2. A video file gives the audio stream FFmpeg ranks
  best; a file without one is "unreadable". Integer PCM is scaled as libsndfile scales it (x / 2^(bits - 1)).

Length of lossy streams (AAC, Opus, MP3 and Vorbis encoders add priming samples at the start and pad the
last frame): FFmpeg's demuxers drop the priming the container records (MP4 edit lists, Ogg/WebM Opus
pre-skip, the LAME/Xing header of an MP3) and the end padding Ogg, WebM and MP3 record. MP4/M4A/MOV leave
the last frame's padding to the reader, so the stream is cut where its header says it ends (start +
duration, the edit list's when there is one). In tests/test_decode_containers.py m4a, mp4, webm, ogg (Opus
and Vorbis) and mp3 decode to exactly the encoded length. What stays approximate: a raw ADTS .aac (no container
to record priming: up to 2048 extra samples, ~46 ms at 44.1 kHz), AAC in Matroska (no end trim: up to 1023
extra samples), an M4A whose gapless info is only in iTunes' iTunSMPB tag (FFmpeg reads edit lists, not that
tag), and Ogg Vorbis through the PyAV fallback (FFmpeg ends 128 samples early; libsndfile reads it first).

"truncated" is decided from the container's own byte counts (a WAV 'data' chunk, a top-level MP4 box, a
Matroska/WebM Segment larger than the file), whether or not the decoder coped. Damage elsewhere in the middle
of a file makes the decoder fail ("unreadable", the detail saying how much audio came before), or, where
FFmpeg or libsndfile resynchronise (Ogg, WebM), gives a shorter clip.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import struct

import numpy as np
import soundfile as sf
import soxr

# Read with libsndfile first (the soundfile wheel bundles libsndfile >= 1.1, which decodes mp3), then PyAV.
LIBSNDFILE_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au", ".w64",
                         ".caf")
# Containers libsndfile does not read: PyAV only.
PYAV_EXTENSIONS = (".m4a", ".m4b", ".mp4", ".mov", ".3gp", ".aac", ".webm", ".mka", ".mkv", ".wma", ".ac3", ".amr",
                   ".wv", ".ape", ".mp2")
# Extensions the folder scan picks up; any other file is listed as "unsupported extension".
AUDIO_EXTENSIONS = LIBSNDFILE_EXTENSIONS + PYAV_EXTENSIONS

SKIP_REASONS = (
        "unreadable",  # every decoder refused the file (wrong format, corrupt data, no audio stream, not audio)
        "truncated",  # the header declares more audio than the file holds (WAV, MP4/M4A, Matroska/WebM)
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


DECODERS = ("libsndfile", "PyAV")


def decoder_order(path: str) -> tuple[str, ...]:
    """The decoders `load_clip` tries on `path`, in order: ("PyAV",) for PYAV_EXTENSIONS, else ("libsndfile",
    "PyAV") (an unknown extension too: both look at the bytes, not the name)."""
    return ("PyAV",) if os.path.splitext(path)[1].lower() in PYAV_EXTENSIONS else ("libsndfile", "PyAV")


@dataclasses.dataclass(frozen=True)
class AudioInfo:
    """What a file's header says, read without decoding its samples."""

    sample_rate: int  # Hz
    channels: int
    frames: int | None  # samples per channel; None when the header does not say (PyAV: estimated from duration)
    decoder: str  # "libsndfile" or "PyAV": the one that read the header


class _Refused(Exception):
    """A decoder cannot read the file; `load_clip` tries the next one, or reports "unreadable"."""


def _too_long(length: str, max_seconds: float) -> BadAudioError:
    return BadAudioError("too long", f"{length} > {max_seconds:g} s (split it, or raise make_shards' --max_seconds)")


def _check_regular_file(path: str) -> None:
    try:
        mode = os.stat(path).st_mode  # follows links; opens nothing
    except FileNotFoundError:
        raise BadAudioError("missing", path) from None
    except OSError as e:
        raise BadAudioError("unreadable", f"{type(e).__name__}: {e}") from None
    what = not_regular_file_detail(mode)
    if what is not None:  # opening a FIFO for reading blocks until a writer comes: never open one
        raise BadAudioError("not a regular file", f"{path} is {what}")


# -- libsndfile ---------------------------------------------------------------------------------------------


def _read_libsndfile(path: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """(data [samples, channels] float32, rate in Hz) through libsndfile."""
    try:
        if max_seconds is not None:
            info = sf.info(path)
            if info.samplerate > 0 and info.frames > max_seconds * info.samplerate:
                raise _too_long(f"{info.frames / info.samplerate:.0f} s", max_seconds)
        return sf.read(path, dtype="float32", always_2d=True)
    except BadAudioError:
        raise
    except Exception as e:  # libsndfile raises several types for bad input
        raise _Refused(f"{type(e).__name__}: {e}") from None


# -- PyAV ---------------------------------------------------------------------------------------------------

# Integer sample formats as (offset, scale) to [-1, 1] floats: libsndfile's normalisation (x / 2^(bits - 1)),
# so a PCM file gives the same floats through either decoder.
_PCM_SCALE = {"u8": (128.0, 2.0**-7), "s16": (0.0, 2.0**-15), "s32": (0.0, 2.0**-31), "s64": (0.0, 2.0**-63)}


def _open_pyav(path: str):
    """(container, its best audio stream), or _Refused. The caller closes the container."""
    try:
        import av  # here, not at the top: worker processes that only read wav/flac never load FFmpeg
    except ImportError as e:
        raise _Refused(f"PyAV is not installed ({e}); `pip install av` (audiojepa's setup.py requires it)") from None
    try:
        container = av.open(path, metadata_errors="ignore")
    except Exception as e:  # av.error.FFmpegError subclasses, and OSError
        raise _Refused(f"{type(e).__name__}: {e}") from None
    stream = container.streams.best("audio")
    if stream is None:
        detail = (f"no audio stream in this {container.format.name} file (streams: "
                  f"{', '.join(s.type for s in container.streams) or 'none'})")
        container.close()
        raise _Refused(detail)
    return container, stream


def _declared_seconds(container, stream) -> float | None:
    """The stream's duration from the header (else the container's), in seconds; None when neither says."""
    if stream.duration:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000  # AV_TIME_BASE
    return None


def _mp4_end_seconds(container, stream) -> float | None:
    """Where an MP4-family stream ends (start + the duration its edit list declares), in seconds, else None.

    FFmpeg's MP4 demuxer drops the encoder's priming samples the edit list names but decodes the padding of
    the last AAC frame (up to 1023 samples); cutting at the declared end removes it. Other containers signal
    their end trim to the decoder themselves (Ogg granule positions, WebM DiscardPadding, the MP3 LAME header)."""
    if "mp4" not in container.format.name.split(",") or not stream.duration:
        return None
    return float(((stream.start_time or 0) + stream.duration) * stream.time_base)


def _frame_samples(frame) -> np.ndarray:
    """A decoded PyAV frame as [channels, samples] float32, integer PCM scaled as libsndfile scales it."""
    data = frame.to_ndarray()
    if not frame.format.is_planar:  # packed: [1, samples * channels], channels interleaved
        data = data.reshape(-1, frame.layout.nb_channels).T
    kind = frame.format.name.rstrip("p")
    if kind in _PCM_SCALE:
        offset, scale = _PCM_SCALE[kind]
        return (data.astype(np.float32) - np.float32(offset)) * np.float32(scale)
    return data.astype(np.float32, copy=False)


def _read_pyav(path: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """(data [samples, channels] float32, rate in Hz) through PyAV: the best audio stream, whole, at its own
    rate. Channels are kept unless the layout changes mid-stream (then each frame is downmixed: [samples, 1])."""
    container, stream = _open_pyav(path)
    with container:
        declared = _declared_seconds(container, stream)
        if max_seconds is not None and declared is not None and declared > max_seconds:
            raise _too_long(f"{declared:.0f} s", max_seconds)
        end = _mp4_end_seconds(container, stream)
        chunks, total, rate = [], 0, None
        try:
            for frame in container.decode(stream):
                if rate is None:
                    rate = frame.sample_rate
                elif frame.sample_rate != rate:
                    raise _Refused(f"the sample rate changes from {rate} to {frame.sample_rate} Hz at "
                                   f"{total / rate:.2f} s")
                samples = _frame_samples(frame)
                if end is not None and frame.pts is not None and frame.time_base is not None:
                    samples = samples[:, :max(0, round((end - float(frame.pts * frame.time_base)) * rate))]
                if samples.shape[1]:
                    chunks.append(samples)
                    total += samples.shape[1]
                if max_seconds is not None and total > max_seconds * rate:  # the header said less, or nothing
                    raise _too_long(f"{total / rate:.0f} s decoded so far (the header gave no or a shorter duration)",
                                    max_seconds)
        except (BadAudioError, _Refused):
            raise
        except Exception as e:  # a corrupt packet: av.error.InvalidDataError, EOFError, ...
            at = f" (after {total / rate:.2f} s of audio)" if rate else ""
            raise _Refused(f"{type(e).__name__}: {e}{at}") from None
    if not chunks:
        return np.zeros((0, 1), np.float32), rate or stream.rate or 1
    if len({c.shape[0] for c in chunks}) > 1:
        chunks = [c.mean(axis=0, keepdims=True) for c in chunks]
    return np.ascontiguousarray(np.concatenate(chunks, axis=1).T), rate


# -- container byte counts ----------------------------------------------------------------------------------


def _wav_cut_data(f, file_size: int) -> str | None:
    """Whether a RIFF/WAVE file's 'data' chunk declares more bytes than the file holds, described, or None."""
    offset = 12
    while True:
        f.seek(offset)
        chunk = f.read(8)
        if len(chunk) < 8:
            return None
        chunk_id, size = chunk[:4], struct.unpack("<I", chunk[4:])[0]
        offset += 8
        if chunk_id == b"data":
            # 0xFFFFFFFF is the "unknown length" marker streaming writers use; libsndfile reads it fine.
            present = max(0, file_size - offset)
            if size > present and size != 0xFFFFFFFF:
                return f"header declares {size} data bytes, file holds {present}"
            return None
        offset += size + (size & 1)


# Top-level box types an ISO BMFF file (MP4, M4A, MOV, 3GP) may start with.
_MP4_FIRST_BOXES = (b"ftyp", b"styp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot", b"sidx")


def _mp4_cut_box(f, file_size: int) -> str | None:
    """The first top-level MP4 box that runs past the end of the file, described, or None."""
    offset = 0
    while offset + 8 <= file_size:
        f.seek(offset)
        header = f.read(16)
        size, kind = struct.unpack(">I4s", header[:8])
        if size == 1 and len(header) == 16:  # a 64-bit size follows
            size = struct.unpack(">Q", header[8:])[0]
        elif size == 0:  # the box runs to the end of the file
            return None
        if size < 8:  # not a box: the decoder will say what is wrong
            return None
        if offset + size > file_size:
            return (f"MP4 box '{kind.decode('latin-1')}' at byte {offset} declares {size} bytes, the file holds "
                    f"{file_size - offset}")
        offset += size
    return None


def _ebml_size(f) -> int | None:
    """Reads an EBML variable-length size; None for "unknown" (all value bits set) or a short read."""
    first = f.read(1)
    if not first or first[0] == 0:
        return None
    length = 9 - first[0].bit_length()  # leading zero bits + 1
    rest = f.read(length - 1)
    if len(rest) < length - 1:
        return None
    value = first[0] & ((1 << (8 - length)) - 1)
    for byte in rest:
        value = (value << 8) | byte
    return None if value == (1 << (7 * length)) - 1 else value


def _matroska_cut_segment(f, file_size: int) -> str | None:
    """Whether a Matroska/WebM file's Segment declares more bytes than the file holds, described, or None."""
    f.seek(4)  # after the EBML header's ID
    size = _ebml_size(f)
    if size is None:
        return None
    f.seek(f.tell() + size)
    if f.read(4) != b"\x18\x53\x80\x67":  # the Segment's ID
        return None
    size = _ebml_size(f)
    start = f.tell()
    if size is not None and start + size > file_size:
        return f"Matroska/WebM Segment declares {size} bytes, the file holds {file_size - start}"
    return None


def _truncation_detail(path: str) -> str | None:
    """Why `path` is cut short, from its container's own byte counts, or None: a RIFF/WAVE 'data' chunk, a
    top-level MP4 box or a Matroska/WebM Segment that declares more bytes than the file holds. A file that cannot
    be opened gives None: the decoders have said why."""
    try:
        file_size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(12)
            if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
                return _wav_cut_data(f, file_size)
            if head[4:8] in _MP4_FIRST_BOXES:
                return _mp4_cut_box(f, file_size)
            if head[:4] == b"\x1a\x45\xdf\xa3":  # EBML magic
                return _matroska_cut_segment(f, file_size)
    except OSError:
        return None
    return None


# -- the public readers -------------------------------------------------------------------------------------


def read_info(path: str) -> AudioInfo:
    """Reads `path`'s header (no samples decoded) with the first decoder of `decoder_order` that can.

    Raises:
      BadAudioError: "missing", "not a regular file", or "unreadable" (every decoder refused the header).
    """
    _check_regular_file(path)
    refusals = []
    for decoder in decoder_order(path):
        try:
            if decoder == "libsndfile":
                try:
                    info = sf.info(path)
                except Exception as e:  # libsndfile raises several types for bad input
                    raise _Refused(f"{type(e).__name__}: {e}") from None
                return AudioInfo(info.samplerate, info.channels, info.frames, decoder)
            container, stream = _open_pyav(path)
            with container:
                seconds = _declared_seconds(container, stream)
                rate = stream.rate or 0
                frames = None if seconds is None else round(seconds * rate)
                return AudioInfo(rate, stream.channels, frames, decoder)
        except _Refused as e:
            refusals.append(f"{decoder}: {e}")
    raise BadAudioError("unreadable", "; ".join(refusals))


def decode_file(path: str, *, decoders: tuple[str, ...] | None = None,
                max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Decodes `path` as it is: no downmix, no resampling, no checks of the samples.

    Args:
      path: an audio (or video) file.
      decoders: names from ("libsndfile", "PyAV") to try in order; None: `decoder_order(path)`.
      max_seconds: as in `load_clip`.

    Returns:
      (data [samples, channels] float32, sample rate in Hz) from the first decoder that reads the file.

    Raises:
      BadAudioError: "missing", "not a regular file", "too long"; "truncated" when every decoder failed and the
      container's byte counts show the file was cut; else "unreadable", the detail naming each decoder's error.
    """
    unknown = set(decoders or ()) - set(DECODERS)
    if unknown:
        raise ValueError(f"decoders={decoders!r}: unknown {sorted(unknown)}; valid: {DECODERS}")
    _check_regular_file(path)
    refusals = []
    for decoder in decoders or decoder_order(path):
        try:
            return (_read_libsndfile if decoder == "libsndfile" else _read_pyav)(path, max_seconds)
        except _Refused as e:
            refusals.append(f"{decoder}: {e}")
    cut = _truncation_detail(path)
    if cut is not None:  # a cut-off file is often unreadable because of it: say so first
        raise BadAudioError("truncated", f"{cut} ({'; '.join(refusals)})")
    raise BadAudioError("unreadable", "; ".join(refusals))


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
      path: an audio file (or a video file: its best audio stream); decoders as in the module docstring.
      sample_rate: output rate in Hz; other rates are resampled with soxr (high quality).
      min_seconds: clips shorter than this (after resampling) are rejected as "too short".
      silence_peak: clips whose peak |amplitude| (full scale 1.0) is below this are "silent".
      max_seconds: files longer than this (from the header, before decoding; for a PyAV file without a
        duration in its header, once decoding passes it) are "too long" (None: no limit). A file is decoded
        whole, as float32 at its own rate and channel count.

    Returns:
      waveform: [samples] float32, nominally in [-1, 1].

    Raises:
      BadAudioError: with a reason from SKIP_REASONS.
    """
    data, file_rate = decode_file(path, max_seconds=max_seconds)
    cut = _truncation_detail(path)
    if cut is not None:
        raise BadAudioError("truncated", cut)
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
