r"""Mean and std of log-mel values over random crops of a shard set, stored next to the shards.

    python tools/compute_stats.py --shards /data/shards/as2m --frontend m2d --crop_frames 608

Writes (or updates) SHARDS/logmel_stats.json; configs with `data.norm_stats = "shards"` (the
default) pick it up. The official M2D default (-7.1, 4.2) stays available as `norm_stats = "m2d"`.
Re-making the shard set (tools/make_shards.py --overwrite) removes the file: run this again then.
"""

import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from audiojepa.data import compute_stats, pipeline, shards, stats  # noqa: E402
from audiojepa.ops import frontend  # noqa: E402

flags.DEFINE_string("shards", None, "Shard-set folder (with manifest.json).")
flags.DEFINE_string("frontend", "m2d", f"Front-end preset: {sorted(frontend.PRESETS)}.")
flags.DEFINE_integer("crop_frames", 608, "Crop length in frames (the training crop).")
flags.DEFINE_integer("num_crops", 5000, "Number of random crops, > 0 (the official M2D code uses 5000).",
                     lower_bound=1)
flags.DEFINE_integer("seed", 0, "Seed for record order and crop offsets.")
flags.DEFINE_integer("workers", 0, "Decoding processes.")
flags.mark_flags_as_required(["shards"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    params = frontend.get_preset(FLAGS.frontend)
    paths, manifest = shards.resolve_shards(FLAGS.shards)
    if manifest is not None and manifest["sample_rate"] != params.sample_rate:
        raise app.UsageError(f"--frontend {FLAGS.frontend} expects {params.sample_rate} Hz; "
                             f"{FLAGS.shards} holds {manifest['sample_rate']} Hz audio")
    spec = pipeline.DataSpec(tuple(paths), params, FLAGS.crop_frames, 0.0, 1.0, len(paths))
    result = compute_stats.compute_logmel_stats(spec, num_crops=FLAGS.num_crops, seed=FLAGS.seed,
                                        num_workers=FLAGS.workers)
    path = stats.write_stats(FLAGS.shards, params, **result)
    logging.info("log-mel mean %.4f std %.4f over %d crops -> %s", result["mean"], result["std"],
                 result["num_crops"], path)


if __name__ == "__main__":
    app.run(main)
