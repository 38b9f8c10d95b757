r"""Converts an official MATPAC checkpoint (aurianworld/matpac) into an audiojepa encoder export.

    python tools/convert_matpac.py --checkpoint matpac_10_2048.pt --output /ckpt/matpac_official
    python tools/convert_matpac.py --checkpoint state_dict.npz --output /tmp/matpac_small

Reads a `.npz` or `.safetensors` of name -> array (no torch needed) or, with the optional torch extra, a `.pt`/`.pth`
file (weights_only=True): a released file (the inference wrapper's names) or a fairseq training checkpoint (the
state dict under "model", its `_ema` teacher nested; audiojepa.convert.state_dict_io.read_state_dict). Only the
student encoder is exported (patch embedding, CLS, positions, `student_encoder.*`); the decoder, classification
heads, teacher and any fine-tuning head are left out with a log line. Width, depth, MLP size, patch size and the
training width come from the tensors (`--num_heads`: the encoder's heads, which they cannot tell; default: the
named variant's, else width / 64). The log-mel front end is MATPAC's ("matpac": 16 kHz, 80 mels, no centre
padding) and the normalisation statistics the inference code's (mean -7.056, std 4.193) unless given. The export
loads with `audiojepa.adapters.encoder.load_encoder(OUTPUT)`.
"""

import os
import sys

from absl import app, flags, logging

# This checkout's package, not whichever one is installed (as the other tools do).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from audiojepa.adapters import encoder
from audiojepa.convert import matpac_torch, state_dict_io  # noqa: E402
from audiojepa.data import stats  # noqa: E402
from audiojepa.ops import frontend  # noqa: E402

MATPAC_NORM_STATS = (-7.056, 4.193)  # inference_matpac/matpac/model.py general_config lms_mean / lms_std

flags.DEFINE_string("checkpoint", None, "Official MATPAC checkpoint: .pt/.pth (needs torch), .npz or .safetensors.")
flags.DEFINE_string("output", None, "Output folder for encoder.json and params.msgpack.")
flags.DEFINE_string("frontend", "matpac", f"Front-end preset the model was trained with: {sorted(frontend.PRESETS)}.")
flags.DEFINE_integer("input_frames", None, "Training width in frames, the chunk width of the export (608 for the "
                     "released 6 s models, 992 for the AudioSet fine-tuned ones). Default: whole patches of the "
                     "position table.")
flags.DEFINE_integer("num_heads", None, "Attention heads of the encoder (default: the named variant's, else width / 64).")
flags.DEFINE_list("norm_stats", [str(v) for v in MATPAC_NORM_STATS], "Log-mel mean,std the model was trained with.")
flags.mark_flags_as_required(["checkpoint", "output"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    try:
        full_state_dict = state_dict_io.read_state_dict(FLAGS.checkpoint)
        missing = [k for k in ("cls_token", "pos_embed", "patch_embed.proj.weight") if k not in full_state_dict]
        if missing or not any(k.startswith("student_encoder.blocks.") for k in full_state_dict):
            names = sorted(full_state_dict)
            raise ValueError(f"{FLAGS.checkpoint}: no {missing or 'student_encoder.blocks.<i>.*'} tensor(s): not a "
                             f"MATPAC state dict? It has {len(names)} entries, e.g. {names[:5]}")
        state_dict, dropped = matpac_torch.encoder_entries(full_state_dict)
        if dropped:
            logging.info("not part of the encoder, left out: %s", ", ".join(dropped))
        params_frontend = frontend.get_preset(FLAGS.frontend)
        model_config, input_shape = matpac_torch.model_config_for(full_state_dict, params_frontend.n_mels,
                                                                  FLAGS.input_frames, num_heads=FLAGS.num_heads)
        grid = (input_shape[0] // model_config.patch_size[0], input_shape[1] // model_config.patch_size[1])
        params, _ = matpac_torch.state_dict_to_params(state_dict, grid_size=grid)
        norm_stats = tuple(float(v) for v in FLAGS.norm_stats)
        if len(norm_stats) != 2:
            raise ValueError(f"--norm_stats={FLAGS.norm_stats}: expected mean,std")
        stats.check_norm_stats(*norm_stats, where="--norm_stats")
    except ValueError as e:  # a foreign or damaged file, or sizes that do not make a model: the message names it
        raise app.UsageError(str(e)) from None
    exported = encoder.AudioEncoder("matpac", model_config, input_shape, params_frontend, norm_stats,
                                    {"encoder": params["encoder"]})
    exported.save(FLAGS.output, source=FLAGS.checkpoint)
    logging.info("MATPAC %s, input %s, norm_stats %s -> %s", model_config.variant, input_shape, norm_stats,
                 FLAGS.output)


if __name__ == "__main__":
    app.run(main)
