r"""Log-mel throughput: librosa vs the host (NumPy) and device (JAX) front ends, in clips/s.

    python tools/bench_frontend.py                       # 256 clips of 6.08 s, m2d preset
    python tools/bench_frontend.py --preset audiojepa --batch 32

Every implementation processes the same random clips; each is run --repeats times, interleaved with
the others so that load from other processes affects all of them alike, and the median throughput is
reported, with the throughput per CPU-second of this process (less sensitive to other load; above
clips/s where an implementation keeps several cores busy). The device rows time jitted calls on
batches already on the device, after a warm-up call that compiles; each batch is waited for with
block_until_ready. The last column checks that the numbers agree: the largest log-mel difference
from librosa on the first clip. The last row is the floor of any FFT front end on the machine:
|rfft|^2 alone, on frames cut and windowed beforehand. The table is printed and appended to
--append_to with the command, date, machine and versions.
"""

import os

# librosa and the host rows run single-threaded, as in data-loader workers: with OpenBLAS's
# default threads their mel matmul ran 5x slower on a busy 2-core machine. Set the variable
# yourself to override. It must be set before NumPy is imported; XLA does not use OpenBLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import librosa  # noqa: E402
import numpy as np  # noqa: E402
import scipy  # noqa: E402
from absl import (
    app,  # noqa: E402
    flags,  # noqa: E402
)

# The repo root: this checkout's package (as the other tools do) and tools/.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from audiojepa.ops import frontend  # noqa: E402
from tools import bench_common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_clips", 256, "Number of random clips.")
flags.DEFINE_float("seconds", 6.08, "Clip length in seconds.")
flags.DEFINE_string("preset", "m2d", "Front-end preset.")
flags.DEFINE_integer("batch", 16, "Clips per call for the batched host and device rows.")
flags.DEFINE_integer("repeats", 3, "Passes over all clips per implementation; the median is reported.")
flags.DEFINE_string("append_to", "BENCHMARKS.md", "Markdown file the result is appended to ('' to skip).")


def _librosa_logmel(clip: np.ndarray, params: frontend.LogMelParams) -> np.ndarray:
    mel = librosa.feature.melspectrogram(
        y=clip, sr=params.sample_rate, n_fft=params.n_fft, hop_length=params.hop_length,
        win_length=params.win_length, window="hann", center=params.center, pad_mode=params.pad_mode,
        power=params.power, n_mels=params.n_mels, fmin=params.f_min, fmax=params.f_max,
        htk=params.mel_scale == "htk", norm=params.mel_norm)
    return np.log(mel + params.log_offset)


def _windowed_frames(clips: np.ndarray, params: frontend.LogMelParams) -> np.ndarray:
    """[batch, samples] -> [batch, frames, n_fft] float32: the padded, cut and windowed frames."""
    x = np.pad(clips, ((0, 0), (params.n_fft // 2,) * 2), mode=params.pad_mode) if params.center else clips
    frames = np.lib.stride_tricks.sliding_window_view(x, params.n_fft, axis=-1)[:, ::params.hop_length]
    frames = frames[:, :params.num_frames(clips.shape[-1])]
    return (frames * frontend.analysis_window(params)).astype(np.float32)


def _implementations(clips: np.ndarray, params: frontend.LogMelParams, batch: int):
    """name -> (batch size, run(): computes all log-mels, first(): log-mel of clip 0)."""
    batches = [clips[i:i + batch] for i in range(0, len(clips), batch)]
    impls = {
        "librosa (per clip)": (1, lambda: [_librosa_logmel(c, params) for c in clips],
                               lambda: _librosa_logmel(clips[0], params)),
        "host NumPy (per clip)": (1, lambda: [frontend.logmel_host(c, params) for c in clips],
                                  lambda: frontend.logmel_host(clips[0], params)),
        "host NumPy (batched)": (batch, lambda: [frontend.logmel_host(b, params) for b in batches],
                                 lambda: frontend.logmel_host(batches[0], params)[0]),
    }
    device_batches = [jax.device_put(b) for b in batches]
    for method in ("fft", "matmul"):
        jitted = jax.jit(frontend.logmel_device, static_argnums=(1, 2))

        def run(jitted=jitted, method=method):
            return [jitted(b, params, method).block_until_ready() for b in device_batches]

        def first(jitted=jitted, method=method):
            return np.asarray(jitted(device_batches[0], params, method))[0]

        impls[f"device JAX, {method} (jit, batched)"] = (batch, run, first)

    # The floor of any FFT front end on this machine: |rfft|^2 of frames that are already cut and
    # windowed, nothing else (no framing, mel, log). Not a log-mel, so it has no difference column.
    framed = [jax.device_put(_windowed_frames(b, params)) for b in batches]
    rfft_power = jax.jit(lambda f: jnp.square(jnp.abs(jnp.fft.rfft(f, axis=-1))))
    impls["floor: device rfft + power only (frames cut beforehand)"] = (
        batch, lambda: [rfft_power(f).block_until_ready() for f in framed], None)
    return impls


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _machine() -> str:
    devices = ", ".join(sorted({d.device_kind for d in jax.devices()}))
    load = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    return (f"{bench_common.cpu_name()}, os.cpu_count()={os.cpu_count()}, "
            f"jax backend {jax.default_backend()} ({len(jax.devices())} x {devices}), "
            f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}, load average {load}")


def _versions() -> str:
    return (f"python {platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}, "
            f"jax {jax.__version__}, librosa {librosa.__version__}")


def main(argv):
    del argv
    params = frontend.get_preset(FLAGS.preset)
    num_samples = int(round(FLAGS.seconds * params.sample_rate))
    rng = np.random.default_rng(0)
    clips = (0.1 * rng.standard_normal((FLAGS.num_clips, num_samples))).astype(np.float32)
    machine = _machine()  # load average before this process adds to it

    impls = _implementations(clips, params, FLAGS.batch)
    reference = _librosa_logmel(clips[0], params)
    max_diff = {}
    for name, (_, run, first) in impls.items():  # also compiles the device functions
        max_diff[name] = float(np.abs(first() - reference).max()) if first else None
        if not first:
            run()
    seconds = {name: [] for name in impls}
    cpu_seconds = {name: [] for name in impls}
    for _ in range(FLAGS.repeats):
        for name, (_, run, _) in impls.items():
            cpu_start, start = _cpu_seconds(), time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
            cpu_seconds[name].append(_cpu_seconds() - cpu_start)

    clips_per_s = {name: FLAGS.num_clips / statistics.median(s) for name, s in seconds.items()}
    clips_per_cpu_s = {name: FLAGS.num_clips / statistics.median(s) for name, s in cpu_seconds.items()}
    baseline = clips_per_s["librosa (per clip)"]
    frames = params.num_frames(num_samples)
    title = (f"Log-mel front end, preset `{FLAGS.preset}`: {FLAGS.num_clips} clips of {FLAGS.seconds} s "
             f"({num_samples} samples, {frames} frames)")
    lines = [
        *bench_common.section_head(title, machine),
        f"- Versions: {_versions()}",
        "",
        f"| implementation | clips per call | clips/s (median of {FLAGS.repeats}) | x librosa "
        "| clips per CPU-second | max abs diff vs librosa (clip 0, log-mel) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, (batch, _, _) in impls.items():
        lines.append(f"| {name} | {batch} | {clips_per_s[name]:.0f} | {clips_per_s[name] / baseline:.1f} "
                     f"| {clips_per_cpu_s[name]:.0f} "
                     f"| {'n/a' if max_diff[name] is None else f'{max_diff[name]:.1e}'} |")
    table = "\n".join(lines) + "\n"
    print(table)
    bench_common.append_markdown(FLAGS.append_to, table)


if __name__ == "__main__":
    app.run(main)
