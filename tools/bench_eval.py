r"""Embedding throughput for clips of many lengths vs one length (issue 25): audio-seconds embedded per second.

    python tools/bench_eval.py                                   # 1000 clips of 0.3-30 s, tiny random M2D
    python tools/bench_eval.py --num_clips=100 --append_to=''    # a few minutes on 2 cores
    python tools/bench_eval.py --encoder=/path/to/export --fixed_seconds=6.08

Two workloads of the same audio, one after the other in this process, through `embedders.embed_task` (the
evaluation's path, less the audio decoding: clips are white noise cut from one periodic buffer): `--num_clips`
clips of random lengths uniform in [--min_seconds, --max_seconds] (FSD50K spans 0.3-30 s), and the same total
audio cut into clips of --fixed_seconds (the last one shorter). Each workload gets a fresh copy of the encoder
(same params, empty compile cache), so its wall time includes its own compiles, which the table counts
(AudioEncoder.compile_count) next to audio-s/s. The goal of issue 25 is a ratio (random lengths / one length)
>= 0.7: before it, every distinct length compiled the encoder again (12 lengths: 12 s with the tiny model).
With --repeats > 1 the workloads alternate and the median wall time is reported; each repeat compiles again.
XLA's default compile flags are used (the test suite's faster ones are not set here).
"""

import dataclasses
import os
import statistics
import sys
import time

import numpy as np
from absl import app, flags

# The repo root: this checkout's package (as the other tools do) and tools/.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from audiojepa.evaluation import embedders  # noqa: E402
from tools import bench_common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("encoder", "random:configs/m2d.py:runlocal",
                    "--encoder of audiojepa.evaluate: an export, a workdir or random:<config> (not logmel).")
flags.DEFINE_integer("num_clips", 1000, "Clips of random lengths.")
flags.DEFINE_float("min_seconds", 0.3, "Shortest random length, s.")
flags.DEFINE_float("max_seconds", 30.0, "Longest random length, s.")
flags.DEFINE_float("fixed_seconds", 10.0, "Length of the one-length clips, s.")
flags.DEFINE_integer("batch_size", 32, "embed_task's batch_size (chunk rows per encoder call).")
flags.DEFINE_integer("repeats", 1, "Passes per workload, alternating; the median wall time is reported.")
flags.DEFINE_integer("seed", 0, "Seed of the lengths and the noise.")
flags.DEFINE_string("append_to", "BENCHMARKS.md", "Markdown file the result is appended to ('' to skip).")

BUFFER_SECONDS = 61.3  # the periodic noise buffer clips are cut from (not a multiple of any chunk)


@dataclasses.dataclass
class _SyntheticTask:
    """What embed_task reads of a tasks.Task: clips cut from a periodic noise buffer at given sample offsets."""
    name: str
    starts: np.ndarray  # [clips] first sample of each clip in the (unrolled) audio
    lengths: np.ndarray  # [clips] samples
    buffer: np.ndarray  # [BUFFER_SECONDS x rate] float32
    skipped: list = dataclasses.field(default_factory=list)

    @property
    def clip_ids(self) -> list[str]:
        return [f"{self.name}/{i}" for i in range(len(self.lengths))]

    def load_audio(self, i: int, sample_rate: int) -> np.ndarray:
        del sample_rate
        return np.take(self.buffer, np.arange(self.starts[i], self.starts[i] + self.lengths[i]), mode="wrap")


def _workloads(rate: int, rng: np.random.Generator) -> list[_SyntheticTask]:
    """The random-length task and the one-length task over the same total audio."""
    buffer = (0.1 * rng.standard_normal(int(BUFFER_SECONDS * rate))).astype(np.float32)
    lengths = np.round(rng.uniform(FLAGS.min_seconds, FLAGS.max_seconds, FLAGS.num_clips) * rate).astype(np.int64)
    total = int(lengths.sum())
    fixed = round(FLAGS.fixed_seconds * rate)
    fixed_lengths = np.full(total // fixed, fixed, np.int64)
    if total % fixed:
        fixed_lengths = np.append(fixed_lengths, total % fixed)
    starts = lambda n: np.concatenate([[0], np.cumsum(n)[:-1]])
    return [_SyntheticTask("random lengths", starts(lengths), lengths, buffer),
            _SyntheticTask("one length", starts(fixed_lengths), fixed_lengths, buffer)]


def main(argv):
    del argv
    if FLAGS.encoder == "logmel":
        raise app.UsageError("--encoder=logmel has no encoder to compile; give an export, a workdir or random:<config>")
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())  # before this process adds to it
    embedder = embedders.make_embedder(FLAGS.encoder)
    encoder = embedder.encoder
    rate = int(embedder.sample_rate)
    workloads = _workloads(rate, np.random.default_rng(FLAGS.seed))
    seconds = {task.name: [] for task in workloads}
    compiles = {}
    for _ in range(FLAGS.repeats):
        for task in workloads:
            fresh = embedders.EncoderEmbedder(dataclasses.replace(encoder), name=embedder.name)  # empty jit cache
            start = time.perf_counter()
            embedders.embed_task(fresh, task, batch_size=FLAGS.batch_size)
            seconds[task.name].append(time.perf_counter() - start)
            compiles[task.name] = fresh.encoder.compile_count

    audio_seconds = workloads[0].lengths.sum() / rate
    speed = {name: audio_seconds / statistics.median(s) for name, s in seconds.items()}
    ratio = speed["random lengths"] / speed["one length"]
    buckets = "n/a (waveform model)" if encoder.is_waveform_model else ", ".join(map(str, encoder.time_buckets))
    title = (f"Embedding clips of many lengths vs one length (issue 25): `{FLAGS.encoder}`, {audio_seconds:.0f} s "
             "of audio")
    lines = [
        *bench_common.section_head(title, f"{bench_common.cpus()}; {bench_common.jax_backend()}; load average at "
                                          f"start {load}"),
        (f"- Encoder input {encoder.input_shape}, time buckets (patches) {buckets}; embed_task batch_size "
         f"{FLAGS.batch_size} chunk rows; wall time includes compiles (median of {FLAGS.repeats})."),
        "",
        "| workload | clips | distinct lengths | audio s | wall s | audio-s/s | compiles |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for task in workloads:
        lines.append(f"| {task.name} | {len(task.lengths)} | {len(np.unique(task.lengths))} | {audio_seconds:.0f} "
                     f"| {statistics.median(seconds[task.name]):.1f} | {speed[task.name]:.0f} "
                     f"| {compiles[task.name]} |")
    lines += ["", f"Ratio random lengths / one length: **{ratio:.2f}** (goal >= 0.7)."]
    table = "\n".join(lines) + "\n"
    print(table)
    bench_common.append_markdown(FLAGS.append_to, table)


if __name__ == "__main__":
    app.run(main)
