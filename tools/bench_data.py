r"""Data benchmarks: (a) log-mel front ends, (b) the full input pipeline from shards.

    python tools/bench_data.py                    # both parts, results appended to BENCHMARKS.md
    python tools/bench_data.py --parts=pipeline --pipeline_clips=256

(a) runs tools/bench_frontend.py's measurement (librosa vs host NumPy vs device JAX, same clips).
(b) writes a temporary shard set of 10-s procedural clips (AudioSet-like: 16 kHz pcm16), then times
the training pipeline (shuffle, decode, random 608-frame crop, host log-mel, normalise, batch) with
0, 1 and 2 worker processes, and the raw-waveform pipeline used with the device front end. Clips/s
per core divides by the processes doing the work (the workers, or the main process with 0).
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as tools/bench_frontend.py: before NumPy is imported

import datetime  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from absl import app, flags  # noqa: E402

from audiojepa import frontend  # noqa: E402
from audiojepa.data import pipeline, shards, synthetic  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, for tools/
from tools import bench_common, bench_frontend  # noqa: E402

flags.DEFINE_list("parts", ["frontend", "pipeline"], "Which parts to run: frontend, pipeline.")
flags.DEFINE_integer("pipeline_clips", 512, "Clips in the temporary shard set for part (b).")
flags.DEFINE_float("pipeline_seconds", 10.0, "Length of each clip in part (b), seconds.")
flags.DEFINE_integer("pipeline_batch", 64, "Batch size in part (b).")
flags.DEFINE_integer("crop_frames", 608, "Crop length in frames in part (b).")
flags.DEFINE_list("workers", ["0", "1", "2"], "Worker counts to time in part (b).")
flags.DEFINE_integer("pipeline_batches", 12, "Timed batches per setting (after 2 warm-up batches).")
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
            for _ in range(2):  # worker start-up and first fills
                next(it)
            start = time.perf_counter()
            for _ in range(FLAGS.pipeline_batches):
                next(it)
            rate = FLAGS.pipeline_batches * FLAGS.pipeline_batch / (time.perf_counter() - start)
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


def main(argv):
    if "frontend" in FLAGS.parts:
        bench_frontend.main(argv)
    if "pipeline" in FLAGS.parts:
        with tempfile.TemporaryDirectory() as tmp:
            rows = _pipeline_rows(tmp)
        table = _pipeline_table(rows)
        print(table)
        bench_common.append_markdown(FLAGS.append_to, (
            f"### Input pipeline from shards\n\n"
            f"- Command: `{shlex.join(['python', *sys.argv])}`\n"
            f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}\n"
            f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
            f"{os.getloadavg()[0]:.2f}\n"
            f"- {FLAGS.pipeline_clips} procedural clips of {FLAGS.pipeline_seconds:g} s at 16 kHz (pcm16, 4 shards), "
            f"batch {FLAGS.pipeline_batch}, {FLAGS.crop_frames}-frame crops, m2d front end; "
            f"{FLAGS.pipeline_batches} timed batches after 2 warm-up batches. Per core = clips/s / max(workers, 1).\n\n"
            f"{table}\n"))

if __name__ == "__main__":
    app.run(main)
