r"""Exports the evaluated encoder of a training run (latest checkpoint, or --step): the online encoder, or the EMA
target where the method evaluates it (Audio-JEPA; config.model.eval_encoder).

    python tools/export_encoder.py --workdir /ckpt/m2d --output /ckpt/m2d/export

The folder holds encoder.json (method, model config, input shape, front end, normalisation) and
params.msgpack; `audiojepa.adapters.encoder.load_encoder(FOLDER)` reads it.
"""

from absl import app, flags, logging

from audiojepa.adapters import encoder

flags.DEFINE_string("workdir", None, "Training workdir (with checkpoints/).")
flags.DEFINE_string("output", None, "Output folder.")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.mark_flags_as_required(["workdir", "output"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    loaded = encoder.load_encoder(FLAGS.workdir, step=FLAGS.step)
    loaded.save(FLAGS.output, source=FLAGS.workdir)
    logging.info("exported %s encoder (%s, input %s) to %s", loaded.method_name, loaded.model_config.variant,
                 loaded.input_shape, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
