r"""Precomputes EncodecMAE's inputs and targets (EnCodec features and RVQ codes) of a 24 kHz shard set.

    python tools/precompute_encodec_targets.py --input=/data/shards/as_24k --output=/data/targets/as_24k \
        --encodec_checkpoint=/ckpt/encodec24k
    python -m audiojepa.main --config=configs/encodecmae.py --workdir=/ckpt/encodecmae_base \
        --config.data.shards=/data/targets/as_24k --config.model.encodec_checkpoint=/ckpt/encodec24k

The input must be waveform shards at 24 kHz (tools/make_shards.py --sample_rate=24000); any other rate
is an error (re-shard from the audio files rather than resample stored clips). Output shard i holds
the clips of input shard i, in order: features [T, 128] (--feature_dtype) and codes [T, n_q] int16 per
clip, T = ceil(samples / 320), plus manifest.json (kind "encodec_targets", the EnCodec source and
sha256, per-level quantization errors for γ_q: tools/encodecmae_codebook_weights.py). Records that do
not decode, or sit in a corrupt part of a shard, are skipped and listed with their reason. Re-running
with --overwrite writes the same shards; the old set stays in place until the new one is complete.
Design and how the targets differ from the on-device ones: audiojepa/data/encodec_targets.py.
"""

import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from audiojepa.data import encodec_targets, shards, target_records  # noqa: E402
from audiojepa.methods import encodecmae  # noqa: E402

flags.DEFINE_string("input", None, "Waveform shard-set folder at 24 kHz (written by tools/make_shards.py).")
flags.DEFINE_string("output", None, "Output folder for the target shards and manifest.json.")
flags.DEFINE_string("encodec_checkpoint", "", "Converted EnCodec folder (tools/convert_encodec.py) or 24 kHz state "
                    "dict; empty: seeded RANDOM weights (smoke tests only).")
flags.DEFINE_integer("encodec_seed", 0, "Seed of the random EnCodec weights (without --encodec_checkpoint).")
flags.DEFINE_integer("num_codebooks", 8, "RVQ codebooks stored per frame (8 = 6 kbps, EncodecMAE's n_q).")
flags.DEFINE_enum("feature_dtype", "float16", sorted(target_records.FEATURE_DTYPES), "Storage dtype of the features.")
flags.DEFINE_integer("batch_clips", 16, "Rows (clips, or chunks of long clips) per EnCodec call.")
flags.DEFINE_float("chunk_seconds", encodec_targets.DEFAULT_CHUNK_SECONDS,
                   "Longer clips are encoded in independent chunks of this many seconds (bounds memory).")
flags.DEFINE_bool("overwrite", False, "Replace an existing shard set in --output once the new one is complete; "
                  "without it, an existing set is an error.")
flags.mark_flags_as_required(["input", "output"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    checkpoint = FLAGS.encodec_checkpoint
    if checkpoint and not os.path.exists(checkpoint):
        raise app.UsageError(f"--encodec_checkpoint={checkpoint!r} does not exist; give a folder written by "
                             "tools/convert_encodec.py or an EnCodec 24 kHz state dict")
    encodec_targets.check_input(FLAGS.input)  # fail on a wrong input or output before loading EnCodec
    shards.check_output(FLAGS.output, FLAGS.overwrite)
    if checkpoint:
        params = encodecmae.load_encodec_params(checkpoint, FLAGS.num_codebooks)
    else:
        logging.warning("no --encodec_checkpoint: RANDOM EnCodec weights (seed %d); the targets are meaningless "
                        "outside smoke tests", FLAGS.encodec_seed)
        params = encodecmae.random_encodec_params(FLAGS.encodec_seed, FLAGS.num_codebooks)
    manifest = encodec_targets.precompute(
        FLAGS.input, FLAGS.output, encodec_params=params,
        source=encodec_targets.encodec_source(checkpoint, FLAGS.encodec_seed), num_codebooks=FLAGS.num_codebooks,
        feature_dtype=FLAGS.feature_dtype, batch_rows=FLAGS.batch_clips, chunk_seconds=FLAGS.chunk_seconds,
        overwrite=FLAGS.overwrite)
    reasons = {}
    for item in manifest["skipped"]:
        reasons[item["reason"]] = reasons.get(item["reason"], 0) + 1
    logging.info("%d clips, %.2f hours, %d shards in %s; skipped %s", manifest["num_clips"], manifest["total_hours"],
                 len(manifest["shards"]), FLAGS.output, reasons or "none")


if __name__ == "__main__":
    app.run(main)
