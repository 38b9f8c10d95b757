r"""Converts an official EncodecMAE checkpoint (habla-liaa/encodecmae v1) into an audiojepa encoder export.

    python tools/convert_encodecmae.py --checkpoint encodecmae-base/model.pt --output /ckpt/encodecmae_base
    python tools/convert_encodecmae.py --checkpoint state_dict.npz --encodec /ckpt/encodec_24khz --output /tmp/ecmae

Reads a `.npz` or `.safetensors` of name -> array (no torch needed) or, with the optional torch extra, a `.pt`/`.pth`
file (weights_only=True; a Lightning checkpoint's dict under "state_dict"). The export holds the input projection,
the positional scale and the ResiDual encoder (audiojepa.convert.encodecmae_torch; the decoder and heads are left
out with a log line) plus the frozen EnCodec encoder the MAE runs on: the checkpoint's own copy
(`wav_encoder.model.*`, `target_encoder.model.*`, which the released Lightning checkpoints hold), or `--encodec`
(a folder written by tools/convert_encodec.py, or an EnCodec 24 kHz state dict), which takes precedence. Sizes
come from the tensors and must be one of audiojepa.models.encodecmae.VARIANTS (`--num_heads` when they cannot
tell). Chunks of `--chunk_seconds` (the reference's 4 s) of 24 kHz audio. The export loads with
`audiojepa.adapters.encoder.load_encoder(OUTPUT)`.
"""

import os
import sys

from absl import app, flags, logging

# This checkout's package, not whichever one is installed (as the other tools do).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from audiojepa.adapters import encoder
from audiojepa.convert import encodecmae_torch, state_dict_io  # noqa: E402
from audiojepa.methods import encodecmae  # noqa: E402
from audiojepa.models import encodec  # noqa: E402
from audiojepa.ops import frontend  # noqa: E402

flags.DEFINE_string("checkpoint", None, "Official EncodecMAE checkpoint: .pt/.pth (needs torch), .npz or .safetensors.")
flags.DEFINE_string("output", None, "Output folder for encoder.json and params.msgpack.")
flags.DEFINE_string("encodec", None, "EnCodec 24 kHz weights: a folder written by tools/convert_encodec.py or a state "
                    "dict (.npz/.th/.pt). Required when the checkpoint has no EnCodec copy (wav_encoder.model.*).")
flags.DEFINE_integer("num_heads", None, "Attention heads (default: those of the size the tensors match).")
flags.DEFINE_float("chunk_seconds", 4.0, "Chunk length of the export in seconds (the reference encodes 4 s chunks).")
flags.mark_flags_as_required(["checkpoint", "output"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    try:
        full_state_dict = state_dict_io.read_state_dict(FLAGS.checkpoint)
        state_dict, dropped = encodecmae_torch.encoder_entries(full_state_dict)
        if dropped:
            logging.info("not part of the encoder, left out: %s", ", ".join(dropped))
        converted = encodecmae_torch.state_dict_to_params(state_dict, num_heads=FLAGS.num_heads)
        config = converted.model_config
        if FLAGS.encodec and converted.encodec is not None:
            logging.info("--encodec=%s replaces the checkpoint's own EnCodec copy", FLAGS.encodec)
        encodec_params = encodecmae_torch.encodec_for_export(converted, FLAGS.encodec)
        if FLAGS.encodec:
            config.encodec_checkpoint = os.path.abspath(FLAGS.encodec)
    except (FileNotFoundError, ValueError) as e:  # the messages name the file or tensor
        raise app.UsageError(f"{FLAGS.checkpoint}: {e}") from None
    num_samples = int(round(FLAGS.chunk_seconds * encodec.SAMPLE_RATE))
    if num_samples < encodec.HOP_LENGTH:
        raise app.UsageError(f"--chunk_seconds={FLAGS.chunk_seconds} is shorter than one EnCodec frame")
    params = {key: converted.params[key] for key in encodecmae.TEACHER_KEYS}
    params["encodec"] = encodec_params
    exported = encoder.AudioEncoder("encodecmae", config, (num_samples,), frontend.get_preset("encodec"), (0.0, 1.0),
                                    params)
    exported.save(FLAGS.output, source=FLAGS.checkpoint)
    logging.info("EncodecMAE %s (share_ffn=%s), chunks of %d samples -> %s", config.size, config.share_ffn,
                 num_samples, FLAGS.output)


if __name__ == "__main__":
    app.run(main)
