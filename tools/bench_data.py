r"""Data benchmarks: (a) log-mel front ends, (b) the full input pipeline from shards, (c) decoding audio files.

    python tools/bench_data.py                    # all parts, results appended to BENCHMARKS.md
    python tools/bench_data.py --parts=pipeline --pipeline_clips=256
    python tools/bench_data.py --parts=decode --append_to=''   # file decoding only, nothing appended

(a) runs tools/bench_frontend.py's measurement (librosa vs host NumPy vs device JAX, same clips).
(b) writes a temporary shard set of 10-s procedural clips (AudioSet-like: 16 kHz pcm16), then times
the training pipeline (shuffle, decode, random 608-frame crop, host log-mel, normalise, batch) with
0, 1 and 2 worker processes, and the raw-waveform pipeline used with the device front end. Clips/s
per core divides by the processes doing the work (the workers, or the main process with 0).
(c) writes procedural 44.1 kHz stereo clips as wav and flac (libsndfile, PCM 16) and as m4a (AAC), webm and ogg
(Opus) and mp3 (PyAV), then times `audio_io.load_clip` to 16 kHz mono in one process (what make_shards does per
file). For the formats libsndfile reads (wav, flac, ogg, mp3) it also times load_clip as it was before PyAV
(a copy kept here as the baseline: libsndfile, the RIFF header check, channel mean, soxr, the sample checks) and
PyAV forced on the same files (the fallback's speed). Clips/s are per second of this process's CPU time (each
path runs on one thread), so other jobs on the machine barely move them; the paths take turns on each file, and
the ratio is the median over the repeats of each path's clips/s over the "before" path's.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as tools/bench_frontend.py: before NumPy is imported

import stat  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import soxr  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from audiojepa.data import audio_io, pipeline, shards, synthetic  # noqa: E402
from audiojepa.ops import frontend  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for tools/
from tools import bench_common, bench_frontend  # noqa: E402

flags.DEFINE_list("parts", ["frontend", "pipeline", "decode"], "Which parts to run: frontend, pipeline, decode.")
flags.DEFINE_integer("pipeline_clips", 512, "Clips in the temporary shard set for part (b).")
flags.DEFINE_float("pipeline_seconds", 10.0, "Length of each clip in part (b), seconds.")
flags.DEFINE_integer("pipeline_batch", 64, "Batch size in part (b).")
flags.DEFINE_integer("crop_frames", 608, "Crop length in frames in part (b).")
flags.DEFINE_list("workers", ["0", "1", "2"], "Worker counts to time in part (b).")
flags.DEFINE_integer("pipeline_batches", 12, "Timed batches per setting (after 2 warm-up batches).")
flags.DEFINE_integer("decode_clips", 16, "Clips per format in part (c).")
flags.DEFINE_float("decode_seconds", 10.0, "Length of each clip in part (c), seconds.")
flags.DEFINE_integer("decode_repeats", 7, "Passes over the clips per path in part (c); medians are reported.")
FLAGS = flags.FLAGS  # bench_frontend's flags (--num_clips, --seconds, --preset, --batch, --append_to) apply to (a)


def _pipeline_rows(tmp: str) -> list[tuple[str, int, float]]:
    params = frontend.get_preset("m2d")
    clips = ((cid, w, {"label": c}) for cid, w, c in synthetic.synthesize_clips(
        FLAGS.pipeline_clips, sample_rate=params.sample_rate, duration_s=FLAGS.pipeline_seconds))
    manifest = shards.write_shard_set(tmp, clips, sample_rate=params.sample_rate, num_shards=4)
    paths = tuple(os.path.join(tmp, n) for n in manifest["shards"])
    spec = pipeline.DataSpec(paths, params, FLAGS.crop_frames, -7.1, 4.2, manifest["num_clips"])
    rows = []
    for device_frontend in (False, True):
        for workers in (int(w) for w in FLAGS.workers):
            ds = pipeline.make_dataset(spec, batch_size=FLAGS.pipeline_batch, seed=0, device_frontend=device_frontend)
            it = pipeline.make_iterator(ds, num_workers=workers)
            rate = bench_common.clips_per_second(it, batch_size=FLAGS.pipeline_batch, batches=FLAGS.pipeline_batches,
                                                 warmup=2)
            output = "raw waveform (device front end)" if device_frontend else "log-mel on host"
            rows.append((output, workers, rate))
            print(f"{output:32s} workers={workers}: {rate:8.1f} clips/s", flush=True)
            del it
    return rows


def _pipeline_table(rows) -> str:
    lines = ["| pipeline output | workers | clips/s | clips/s per core |", "|---|---:|---:|---:|"]
    for output, workers, rate in rows:
        lines.append(f"| {output} | {workers} | {rate:.1f} | {rate / max(workers, 1):.1f} |")
    return "\n".join(lines)


DECODE_RATE = 16000  # Hz, load_clip's output in part (c)
DECODE_FILE_RATE = 44100  # Hz, the files' own rate in part (c)
# format -> (file name suffix, PyAV muxer and encoder, or None for a libsndfile (wav, flac) file)
_DECODE_FORMATS = {"wav": (".wav", None), "flac": (".flac", None), "m4a (AAC)": (".m4a", ("ipod", "aac")),
                   "webm (Opus)": (".webm", ("webm", "libopus")), "ogg (Opus)": (".ogg", ("ogg", "libopus")),
                   "mp3": (".mp3", ("mp3", "libmp3lame"))}


def _write_decode_clips(folder: str) -> dict[str, list[str]]:
    """format -> paths of FLAGS.decode_clips procedural stereo clips at DECODE_FILE_RATE (a format whose encoder
    the PyAV wheel lacks is left out, with a warning)."""
    import av

    mono = [w for _, w, _ in synthetic.synthesize_clips(2 * FLAGS.decode_clips, sample_rate=DECODE_FILE_RATE,
                                                        duration_s=FLAGS.decode_seconds)]
    stereo = [np.stack([left, right]).astype(np.float32) for left, right in zip(mono[::2], mono[1::2])]
    paths = {}
    for name, (suffix, muxer) in _DECODE_FORMATS.items():
        try:
            if muxer is not None:
                av.Codec(muxer[1], "w")
        except Exception:
            logging.warning("decode part: PyAV %s has no %s encoder; %s left out", av.__version__, muxer[1], name)
            continue
        paths[name] = []
        for i, signal in enumerate(stereo):
            path = os.path.join(folder, f"clip{i:03d}{suffix}")
            if muxer is None:
                sf.write(path, signal.T, DECODE_FILE_RATE, subtype="PCM_16")
            else:
                with av.open(path, "w", format=muxer[0]) as container:
                    stream = container.add_stream(muxer[1], rate=48000 if "opus" in muxer[1] else DECODE_FILE_RATE,
                                                  layout="stereo")
                    frame = av.AudioFrame.from_ndarray(signal, format="fltp", layout="stereo")
                    frame.sample_rate, frame.pts = DECODE_FILE_RATE, 0
                    for packet in [*stream.encode(frame), *stream.encode(None)]:
                        container.mux(packet)
            paths[name].append(path)
    return paths


def _load_before(path: str) -> np.ndarray:
    """`audio_io.load_clip` as it was before PyAV (max_seconds left out): the baseline of the "vs before" column."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError(f"{path}: not a regular file")
    data, file_rate = sf.read(path, dtype="float32", always_2d=True)
    with open(path, "rb") as f:  # its RIFF header check, a no-op read for other files
        header = f.read(12)
        if header[:4] == b"RIFF" and header[8:12] == b"WAVE":
            offset = 12
            while len(chunk := f.read(8)) == 8 and chunk[:4] != b"data":
                size = int.from_bytes(chunk[4:], "little")
                offset += 8 + size + (size & 1)
                f.seek(offset)
    if data.size == 0 or not np.all(np.isfinite(data)):
        raise ValueError(f"{path}: empty, or NaN/Inf samples")
    waveform = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if file_rate != DECODE_RATE:
        waveform = soxr.resample(waveform, file_rate, DECODE_RATE, quality="HQ").astype(np.float32)
    if float(np.max(np.abs(waveform))) < 1e-4:
        raise ValueError(f"{path}: silent")
    return np.ascontiguousarray(waveform, dtype=np.float32)


def _load_pyav_forced(path: str) -> np.ndarray:
    data, rate = audio_io.decode_file(path, decoders=("PyAV",))
    return soxr.resample(data.mean(axis=1), rate, DECODE_RATE, quality="HQ").astype(np.float32)


def _load_clip(path: str) -> np.ndarray:
    return audio_io.load_clip(path, sample_rate=DECODE_RATE)


def _decode_rows(folder: str) -> list[tuple[str, str, float, float | None]]:
    """[(format, path name, clips/s (median over repeats), ratio to "before" (median) or None)]."""
    paths = _write_decode_clips(folder)
    rows = []
    for name, files in paths.items():
        loaders = {"load_clip (dispatch)": _load_clip}
        if audio_io.decoder_order(files[0])[0] == "libsndfile":
            loaders = {"before PyAV (libsndfile)": _load_before, **loaders, "PyAV forced": _load_pyav_forced}
        for load in loaders.values():  # warm-up: imports (PyAV on first use), soxr's tables, the page cache
            load(files[0])
        rates = {label: [] for label in loaders}
        order = list(loaders.items())
        for _ in range(FLAGS.decode_repeats):
            seconds = dict.fromkeys(loaders, 0.0)
            for i, path in enumerate(files):  # the paths take turns on each file: a load change hits them alike
                for label, load in order[i % len(order):] + order[:i % len(order)]:
                    start = time.process_time()  # CPU time: the decoders use one thread; other jobs' load cancels
                    load(path)
                    seconds[label] += time.process_time() - start
            for label in loaders:
                rates[label].append(len(files) / seconds[label])
        before = rates.get("before PyAV (libsndfile)")
        for label, measured in rates.items():
            ratio = (float(np.median([r / b for r, b in zip(measured, before)])) if before else None)
            rows.append((name, label, float(np.median(measured)), ratio))
            print(f"{name:12s} {label:26s} {rows[-1][2]:8.1f} clips per CPU s" + (f"  x{ratio:.3f}" if ratio else ""),
                  flush=True)
    return rows


def _decode_table(rows) -> str:
    lines = ["| format | path | clips per CPU s | audio s per CPU s | vs before PyAV |", "|---|---|---:|---:|---:|"]
    for name, label, rate, ratio in rows:
        lines.append(f"| {name} | {label} | {rate:.1f} | {rate * FLAGS.decode_seconds:.0f} | "
                     f"{'' if ratio is None else f'{ratio:.3f}'} |")
    return "\n".join(lines)


def _section_head(title: str) -> str:
    """bench_common.section_head with this tool's Machine line (CPUs, 1-minute load average), as text."""
    return "\n".join(bench_common.section_head(title, f"{bench_common.cpus()}, load average "
                                                       f"{os.getloadavg()[0]:.2f}")) + "\n"


def main(argv):
    if "frontend" in FLAGS.parts:
        bench_frontend.main(argv)
    if "pipeline" in FLAGS.parts:
        with tempfile.TemporaryDirectory() as tmp:
            rows = _pipeline_rows(tmp)
        table = _pipeline_table(rows)
        print(table)
        bench_common.append_markdown(FLAGS.append_to, (
            f"{_section_head('Input pipeline from shards')}"
            f"- {FLAGS.pipeline_clips} procedural clips of {FLAGS.pipeline_seconds:g} s at 16 kHz (pcm16, 4 shards), "
            f"batch {FLAGS.pipeline_batch}, {FLAGS.crop_frames}-frame crops, m2d front end; "
            f"{FLAGS.pipeline_batches} timed batches after 2 warm-up batches. Per core = clips/s / max(workers, 1).\n\n"
            f"{table}\n"))
    if "decode" in FLAGS.parts:
        import av

        with tempfile.TemporaryDirectory() as tmp:
            table = _decode_table(_decode_rows(tmp))
        print(table)
        bench_common.append_markdown(FLAGS.append_to, (
            f"{_section_head('Decoding audio files (audio_io.load_clip)')}"
            f"- {FLAGS.decode_clips} procedural stereo clips of {FLAGS.decode_seconds:g} s at {DECODE_FILE_RATE} Hz "
            f"per format (Opus at 48 kHz), decoded to {DECODE_RATE} Hz mono in one process, timed in CPU seconds; "
            f"median of {FLAGS.decode_repeats} passes, the paths taking turns on each file; soundfile "
            f"{sf.__version__} (libsndfile {sf.__libsndfile_version__}), PyAV {av.__version__}.\n\n{table}\n"))


if __name__ == "__main__":
    app.run(main)
