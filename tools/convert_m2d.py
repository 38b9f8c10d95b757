r"""Converts an official M2D checkpoint into an audiojepa encoder export.

    python tools/convert_m2d.py --checkpoint m2d_vit_base-80x608p16x16/checkpoint-300.pth --output /ckpt/m2d_official
    python tools/convert_m2d.py --checkpoint state_dict.npz --output /tmp/m2d_small

Reads a `.npz` of name -> array (no torch needed) or, with the optional torch extra installed
(`pip install -e ".[torch]"`), a `.pth` file (loaded with `weights_only=True`; a full training
checkpoint keeps the state dict under "model"). The size, depth and training width are read from
the tensors; `norm_stats` from the checkpoint if present. The export loads with
`audiojepa.encoder.load_encoder(OUTPUT)` and evaluates with `python -m audiojepa.evaluate`.
"""

import argparse
import re

import numpy as np
from absl import app, flags, logging

from audiojepa import encoder, frontend
from audiojepa.convert import m2d_torch
from audiojepa.data import stats
from audiojepa.methods import m2d
from audiojepa.models import VARIANTS

flags.DEFINE_string("checkpoint", None, "Official M2D checkpoint: .pth (needs torch) or .npz state dict.")
flags.DEFINE_string("output", None, "Output folder for encoder.json and params.msgpack.")
flags.DEFINE_string("frontend", "m2d", f"Front-end preset the model was trained with: {sorted(frontend.PRESETS)}. "
                    "Default: from the weight folder name as M2D's runtime reads it (p32k: m2d_32k), else m2d.")
flags.DEFINE_integer("input_frames", None, "Training width in frames, the chunk width of the export (e.g. 1001 for "
                     "the 80x1001 models). Default: from the checkpoint path's '<mels>x<frames>p<pf>x<pt>' as M2D's "
                     "runtime reads it, else whole patches of the position table.")
flags.mark_flags_as_required(["checkpoint", "output"])
FLAGS = flags.FLAGS


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".npz"):
        return dict(np.load(path))
    try:
        import torch
    except ImportError:
        raise app.UsageError(f"{path}: reading .pth files needs the optional torch extra "
                             "(pip install -e '.[torch]'), or convert it to .npz elsewhere") from None
    # MAE-style training checkpoints also hold the run's argparse.Namespace ("args"): allowed, nothing else.
    with torch.serialization.safe_globals([argparse.Namespace]):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


# The state-dict entries an encoder export needs; the rest (the predictor, the EMA target, M2D-X's
# offline predictor, fine-tuning heads) is left out with a log line.
ENCODER_ENTRIES = ("patch_embed", "cls_token", "pos_embed", "blocks", "norm", "norm_stats")


def encoder_entries(state_dict: dict) -> tuple[dict, list[str]]:
    """(the entries ENCODER_ENTRIES names, the sorted top-level names of the others)."""
    keep = {k: v for k, v in state_dict.items() if k.split(".")[0] in ENCODER_ENTRIES}
    return keep, sorted({k.split(".")[0] for k in state_dict if k not in keep})


def frontend_from_path(path: str) -> str | None:
    """The front-end preset M2D's runtime would pick from a weight folder name: `…80x608p16x16p32k…` ->
    "m2d_32k", `…80x608p16x16…` -> "m2d" (None when the path has no `<mels>x<frames>p<pf>x<pt>` part)."""
    match = re.search(r"\d+x\d+p\d+x\d+(p(\d+)k)?", path)
    if not match:
        return None
    return "m2d_32k" if match.group(2) == "32" else "m2d"


def frames_from_path(path: str) -> int | None:
    """The training width M2D's runtime reads from a weight folder name: `m2d_vit_base-80x1001p16x16-…` -> 1001
    (None when the path has no such part)."""
    match = re.search(r"(\d+)x(\d+)p(\d+)x(\d+)", path)
    return int(match.group(2)) if match else None


def model_config_for(state_dict: dict[str, np.ndarray], n_mels: int, input_frames: int | None = None):
    """(model config, input_shape) inferred from tensor shapes; `input_frames` (checked against the position
    table) when the training width is not whole patches."""
    width = state_dict["cls_token"].shape[-1]
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    variant = next((name for name, v in VARIANTS.items() if v["width"] == width and v["depth"] == depth), None)
    if variant is None:
        raise app.UsageError(f"width {width} / depth {depth} match no variant of {sorted(VARIANTS)}")
    patch_f, patch_t = state_dict["patch_embed.proj.weight"].shape[2:]
    num_patches = state_dict["pos_embed"].shape[1] - 1
    grid_f = n_mels // patch_f
    config = m2d.default_config(variant)
    config.patch_size = (int(patch_f), int(patch_t))
    if "decoder_embed.weight" in state_dict:
        config.predictor_width = int(state_dict["decoder_embed.weight"].shape[0])
        config.predictor_depth = len({k.split(".")[1] for k in state_dict if k.startswith("decoder_blocks.")})
    grid_t = num_patches // grid_f
    if input_frames is None:
        return config, (n_mels, grid_t * int(patch_t))
    if input_frames // int(patch_t) != grid_t:
        raise app.UsageError(f"--input_frames={input_frames} gives {input_frames // int(patch_t)} time patches; the "
                             f"checkpoint's position table has {grid_t}")
    return config, (n_mels, int(input_frames))


def main(argv):
    del argv
    full_state_dict = load_state_dict(FLAGS.checkpoint)
    state_dict, dropped = encoder_entries(full_state_dict)
    if dropped:
        logging.info("not part of the encoder, left out: %s", ", ".join(dropped))
    from_path = frontend_from_path(FLAGS.checkpoint)
    preset = FLAGS.frontend if FLAGS["frontend"].present or from_path is None else from_path
    if from_path is not None and FLAGS["frontend"].present and preset != from_path:
        raise app.UsageError(f"--frontend={preset}, but the checkpoint's folder name says {from_path!r} "
                             f"({FLAGS.checkpoint}); the model would get log-mels it was not trained on")
    params_frontend = frontend.get_preset(preset)
    input_frames = FLAGS.input_frames or frames_from_path(FLAGS.checkpoint)
    model_config, input_shape = model_config_for(full_state_dict, params_frontend.n_mels, input_frames)
    grid = (input_shape[0] // model_config.patch_size[0], input_shape[1] // model_config.patch_size[1])
    params, _ = m2d_torch.state_dict_to_params(state_dict, grid_size=grid)
    norm = state_dict.get("norm_stats")
    norm_stats = tuple(float(v) for v in norm) if norm is not None else stats.M2D_DEFAULT_STATS
    exported = encoder.AudioEncoder("m2d", model_config, input_shape, params_frontend, norm_stats,
                                    {"encoder": params["encoder"]})
    exported.save(FLAGS.output, source=FLAGS.checkpoint)
    logging.info("M2D %s, input %s, norm_stats %s -> %s", model_config.variant, input_shape, norm_stats,
                 FLAGS.output)


if __name__ == "__main__":
    app.run(main)
