r"""EncodecMAE: what computing the EnCodec targets inside the step costs, against precomputed targets.

    python tools/bench_encodecmae_targets.py                          # tiny model, batch 16, 4 s crops
    python tools/bench_encodecmae_targets.py --size=base --batch=128  # the reference setting (accelerator)

Three jitted functions on random 24 kHz audio (random EnCodec weights: the cost does not depend on them):
  targets only    EnCodec encoder + RVQ (8 codebooks) on the waveform: the extra work of the on-device path;
  on-device step  value_and_grad of EncodecMAE.loss from batch["waveform"] (targets inside the step);
  precomputed     value_and_grad of EncodecMAE.loss from batch["features"] and batch["codes"].
Each row: median of --steps timed calls after one warm-up (compile) call. The optimizer update is the
same for both paths and left out. The table is printed and appended to --append_to.
"""

import os
import statistics
import sys

import jax
import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from audiojepa.methods import encodecmae  # noqa: E402
from audiojepa.models import encodec  # noqa: E402
from tools import bench_common  # noqa: E402

flags.DEFINE_string("size", "tiny", "Model size: tiny, small, base, large.")
flags.DEFINE_integer("batch", 16, "Clips per step.")
flags.DEFINE_float("seconds", 4.0, "Crop length in seconds (24 kHz).")
flags.DEFINE_integer("steps", 5, "Timed calls per row.")
flags.DEFINE_string("append_to", "BENCHMARKS.md", "Markdown file to append the table to ('' to skip).")
FLAGS = flags.FLAGS


def _median_seconds(fn, *args) -> float:
    """Median wall seconds of FLAGS.steps calls fn(*args) after one that compiles."""
    return statistics.median(bench_common.timed_calls(lambda: jax.block_until_ready(fn(*args)), FLAGS.steps))


def main(argv):
    del argv
    samples = int(FLAGS.seconds * encodec.SAMPLE_RATE)
    config = encodecmae.default_config(FLAGS.size)
    method = encodecmae.EncodecMAE(config, input_shape=(samples,))
    params, target_params = method.init(jax.random.key(0))
    waveform = np.random.default_rng(0).standard_normal((FLAGS.batch, samples)).astype(np.float32) * 0.1
    rng = jax.random.key(1)

    targets_fn = jax.jit(lambda tp, w: method.make_targets(tp, {"waveform": w}))
    precomputed = jax.device_get(targets_fn(target_params, waveform))

    step_fn = jax.jit(jax.value_and_grad(lambda p, tp, b: method.loss(p, tp, b, rng, 0)[0]))  # one trace per path

    rows = [
        ("targets only (EnCodec + RVQ)", _median_seconds(targets_fn, target_params, waveform)),
        ("on-device step (targets inside)", _median_seconds(step_fn, params, target_params,
                                                             {"waveform": waveform})),
        ("precomputed step (features + codes)", _median_seconds(step_fn, params, target_params,
                                                                {"features": precomputed["features"],
                                                                 "codes": precomputed["codes"]})),
    ]
    title = (f"EncodecMAE targets on device vs precomputed: size {FLAGS.size}, batch {FLAGS.batch}, "
             f"{FLAGS.seconds:g} s crops ({method.num_frames} frames)")
    machine = f"{bench_common.cpus()}, {bench_common.jax_backend()}; load average at start {os.getloadavg()[0]:.2f}"
    lines = [*bench_common.section_head(title, machine),
             "- Loss + gradient only (no optimizer update), float32, median of "
             f"{FLAGS.steps} calls after a compile call.", "",
             "| computation | s per call | clips/s |", "|---|---:|---:|"]
    lines += [f"| {name} | {seconds:.3f} | {FLAGS.batch / seconds:.1f} |" for name, seconds in rows]
    share = rows[0][1] / rows[1][1]
    lines += ["", f"The EnCodec targets are {share:.0%} of the on-device step; precomputing them into shards "
              f"saves {rows[1][1] - rows[2][1]:.3f} s per step here."]
    table = "\n".join(lines) + "\n"
    print(table)
    bench_common.append_markdown(FLAGS.append_to, table)


if __name__ == "__main__":
    app.run(main)
