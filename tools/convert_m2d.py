r"""Converts an official M2D checkpoint into an audiojepa encoder export.

    python tools/convert_m2d.py --checkpoint m2d_vit_base-80x608p16x16/checkpoint-300.pth --output /ckpt/m2d_official
    python tools/convert_m2d.py --checkpoint state_dict.npz --output /tmp/m2d_small

Reads a `.npz` or `.safetensors` of name -> array (no torch needed) or, with the optional torch extra installed
(`pip install -e ".[torch]"`), a `.pth` file (loaded with `weights_only=True`; a full training
checkpoint keeps the state dict under "model"; a `module.` prefix from DataParallel is removed). A file
without M2D's tensors, NaN/Inf encoder weights or a `norm_stats` that is not (mean, std > 0) is refused
with an error naming the file and the tensor (`m2d_torch.check_state_dict`). The width, depth, MLP size and training
width are read from the tensors (any size: a named variant when they match one, else config.model.width/depth/
mlp_dim, with `--num_heads`, default width / 64); `norm_stats` from the checkpoint if present. The export loads with
`audiojepa.adapters.encoder.load_encoder(OUTPUT)` and evaluates with `python -m audiojepa.evaluate`.
"""

import os
import sys

import numpy as np
from absl import app, flags, logging

# This checkout's package, not whichever one is installed (as the other tools do).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from audiojepa.adapters import encoder
from audiojepa.convert import m2d_torch, state_dict_io  # noqa: E402
from audiojepa.data import stats  # noqa: E402
from audiojepa.ops import frontend  # noqa: E402

flags.DEFINE_string("checkpoint", None, "Official M2D checkpoint: .pth (needs torch), .npz or .safetensors state dict.")
flags.DEFINE_string("output", None, "Output folder for encoder.json and params.msgpack.")
flags.DEFINE_string("frontend", "m2d", f"Front-end preset the model was trained with: {sorted(frontend.PRESETS)}. "
                    "Default: from the weight folder name as M2D's runtime reads it (p32k: m2d_32k), else m2d.")
flags.DEFINE_integer("input_frames", None, "Training width in frames, the chunk width of the export (e.g. 1001 for "
                     "the 80x1001 models). Default: from the checkpoint path's '<mels>x<frames>p<pf>x<pt>' as M2D's "
                     "runtime reads it, else whole patches of the position table.")
flags.DEFINE_integer("num_heads", None, "Attention heads of the encoder, which its tensors cannot tell. Default: the "
                     "named variant whose width, depth and MLP the tensors have, else width / 64.")
flags.mark_flags_as_required(["checkpoint", "output"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    try:  # a foreign, DataParallel-wrapped or damaged file: an error naming it and the tensor, before any work
        full_state_dict = m2d_torch.check_state_dict(state_dict_io.read_state_dict(FLAGS.checkpoint),
                                                     source=FLAGS.checkpoint)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    state_dict, dropped = m2d_torch.encoder_entries(full_state_dict)
    if dropped:
        logging.info("not part of the encoder, left out: %s", ", ".join(dropped))
    from_path = m2d_torch.frontend_from_path(FLAGS.checkpoint)
    preset = FLAGS.frontend if FLAGS["frontend"].present or from_path is None else from_path
    if from_path is not None and FLAGS["frontend"].present and preset != from_path:
        raise app.UsageError(f"--frontend={preset}, but the checkpoint's folder name says {from_path!r} "
                             f"({FLAGS.checkpoint}); the model would get log-mels it was not trained on")
    params_frontend = frontend.get_preset(preset)
    input_frames = FLAGS.input_frames or m2d_torch.frames_from_path(FLAGS.checkpoint)
    try:
        model_config, input_shape = m2d_torch.model_config_for(full_state_dict, params_frontend.n_mels, input_frames,
                                                               num_heads=FLAGS.num_heads)
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    grid = (input_shape[0] // model_config.patch_size[0], input_shape[1] // model_config.patch_size[1])
    params, _ = m2d_torch.state_dict_to_params(state_dict, grid_size=grid)
    norm = state_dict.get("norm_stats")
    norm_stats = tuple(float(v) for v in np.ravel(norm)) if norm is not None else stats.M2D_DEFAULT_STATS
    exported = encoder.AudioEncoder("m2d", model_config, input_shape, params_frontend, norm_stats,
                                    {"encoder": params["encoder"]})
    exported.save(FLAGS.output, source=FLAGS.checkpoint)
    logging.info("M2D %s, input %s, norm_stats %s -> %s", model_config.variant, input_shape, norm_stats,
                 FLAGS.output)


if __name__ == "__main__":
    app.run(main)
