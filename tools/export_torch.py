r"""Exports an encoder trained here to PyTorch, in the official M2D / timm state-dict names.

    python tools/export_torch.py --encoder=/ckpt/m2d/export --output=/weights/m2d_tiny-80x208p16x16/weights.safetensors
    python tools/export_torch.py --encoder=/ckpt/m2d --output=/weights/m2d.pth --full --step=3000

--encoder is an export folder (tools/export_encoder.py, tools/convert_m2d.py) or a training workdir (its latest
checkpoint, or --step). The output is one file of {name: float32 tensor}:
  `.safetensors`  written with safetensors' numpy API (no torch needed); load it with
                  `safetensors.torch.load_file(FILE)`.
  `.pth`          `torch.save` of {name: tensor}; needs the optional torch extra (`pip install -e ".[torch]"`).
Without --full it holds the evaluated encoder (the one `load_encoder` gives: the EMA target where the method
evaluates it): `patch_embed.proj.*`, `cls_token` (M2D, MATPAC; the JEPA family has none), `pos_embed` (the fixed
sin-cos table [1, (1 +) F·T', D] of the training input), `blocks.<i>.*`, `norm.*` and `norm_stats` (mean, std).
These are the names of M2D's released encoder-only checkpoints (`*_enconly`, `norm_stats` included), which its
runtime loads; without `norm_stats` the file loads with `load_state_dict(strict=True)` into timm's
`VisionTransformer(img_size=(n_mels, frames), patch_size=(pf, pt), in_chans=1, num_classes=0, global_pool='',
class_token=<has cls_token>, embed_dim, depth, num_heads, mlp_ratio)` (LayerNorm eps 1e-6, exact GELU: timm's
defaults; tests/test_export_torch.py checks such a ViT against this package's encoder). The logged input shape
(e.g. 80x208p16x16) is what M2D's runtime reads from the weight folder name.
--full (a training workdir only; M2D's layout) also writes the predictor (`decoder_embed`, `mask_token`,
`decoder_pos_embed`, `decoder_blocks.<i>`, `decoder_norm`, `decoder_pred`) and the EMA target (`target_blocks.<i>`,
`target_norm`), as the official M2D training checkpoint's "model" holds them; `blocks.<i>` is then the online
encoder. Params with no M2D name (MATPAC's classification head, learned position tables, the JEPA target's own
patch embedding) are an error naming them, never dropped. EncodecMAE is not supported yet.

What you see (absl logging on stderr; the tiny M2D of shared/fixtures/m2d, ~3 s on 2 CPU cores):

    I... export_torch.py] m2d encoder of /ckpt/m2d/export (tiny, input 80x208p16x16, norm_stats (-7.1, 4.2))
    I... export_torch.py] wrote 31 tensors, 952,322 values (12,674 of them in the fixed position tables and
        norm_stats) to /weights/m2d_tiny-80x208p16x16/weights.safetensors (3.8 MB)

`m2d_torch.state_dict_to_params` (tools/convert_m2d.py) reads such a file back into the same params, bit for bit.
"""

import json
import os
import sys

import numpy as np
from absl import app, flags, logging

# This checkout's package, not whichever one is installed (as the other tools do).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from audiojepa import checkpointing, encoder, frontend, methods  # noqa: E402
from audiojepa.convert import m2d_export  # noqa: E402
from audiojepa.models import vit  # noqa: E402

flags.DEFINE_string("encoder", None, "Exported encoder folder (encoder.json) or training workdir (checkpoints/).")
flags.DEFINE_string("output", None, "Output file: .safetensors (no torch needed) or .pth (needs the torch extra).")
flags.DEFINE_bool("full", False, "Also write the predictor (decoder_*) and the EMA target (target_*), as M2D's "
                  "training checkpoints; a training workdir only.")
flags.DEFINE_integer("step", None, "Checkpoint step of a training workdir (default: the latest).")
flags.mark_flags_as_required(["encoder", "output"])
FLAGS = flags.FLAGS

SUFFIXES = (".safetensors", ".pth")
# audiojepa.methods.METHODS names of the ViT methods (Audio-JEPA is a configuration of "jepa").
VIT_METHODS = ("m2d", "matpac", "jepa")


def method_name(path: str, step: int | None) -> str:
    """config.method of an export folder (encoder.json) or a workdir's checkpoint, read before any weights."""
    if os.path.exists(os.path.join(path, encoder.ENCODER_JSON)):
        with open(os.path.join(path, encoder.ENCODER_JSON)) as f:
            return json.load(f)["method"]
    return checkpointing.restore_meta(path, step)[1]["method"]


def encoder_state_dict(path: str, step: int | None) -> tuple[dict[str, np.ndarray], str]:
    """(state dict of the evaluated encoder, a description) of an export folder or a workdir."""
    loaded = encoder.load_encoder(path, step=step)
    grid = vit.grid_size(loaded.input_shape, loaded.patch_size)
    state_dict = m2d_export.params_to_state_dict(loaded.params, grid_size=grid, norm_stats=loaded.norm_stats,
                                                 encoder_only=True)
    return state_dict, _describe(f"{loaded.method_name} encoder", path, loaded.model_config, loaded.input_shape,
                                 loaded.patch_size, loaded.norm_stats)


def full_state_dict(workdir: str, step: int | None) -> tuple[dict[str, np.ndarray], str]:
    """(state dict of the online encoder, predictor and EMA target, a description) of a workdir's checkpoint."""
    method, state, meta = encoder.restore_train_state(workdir, step)
    input_shape = methods.input_shape(method, frontend.LogMelParams.from_dict(meta["frontend"]), meta["crop_frames"])
    norm_stats = tuple(meta["norm_stats"])
    if method.config.get("eval_encoder") == "target":
        logging.warning("config.model.eval_encoder='target': the evaluated encoder is target_*; blocks.* is the "
                        "online encoder, as in M2D's checkpoints")
    state_dict = m2d_export.params_to_state_dict(state["params"], state["target_params"],
                                                 grid_size=vit.grid_size(input_shape, method.patch_size),
                                                 norm_stats=norm_stats)
    description = _describe(f"{meta['method']} encoder, predictor and EMA target", f"{workdir} step "
                            f"{int(state['step'])}", method.config, input_shape, method.patch_size, norm_stats)
    return state_dict, description


def _describe(what, source, model_config, input_shape, patch_size, norm_stats) -> str:
    shape = "x".join(str(n) for n in input_shape) + "p" + "x".join(str(p) for p in patch_size)
    stats = tuple(round(float(v), 4) for v in norm_stats)
    return f"{what} of {source} ({model_config.get('variant')}, input {shape}, norm_stats {stats})"


def _torch(output: str):
    """The torch module, imported only here (the core package never imports it), or a UsageError saying how."""
    try:
        import torch
    except ImportError:
        raise app.UsageError(f"--output={output}: writing .pth needs the optional torch extra "
                             '(pip install -e ".[torch]"); or write .safetensors, which needs no torch') from None
    return torch


def write(state_dict: dict[str, np.ndarray], output: str, *, metadata: dict[str, str]) -> None:
    """Writes `output` (.safetensors or .pth) through a temporary file beside it, so a failure leaves no half file."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = f"{output}.{os.getpid()}.tmp"
    try:
        if output.endswith(".safetensors"):
            from safetensors.numpy import save

            with open(tmp, "wb") as f:  # not save_file, whose files are private to the user (mode 600)
                f.write(save(state_dict, metadata=metadata))
        else:
            torch = _torch(output)
            torch.save({name: torch.from_numpy(value) for name, value in state_dict.items()}, tmp)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(argv):
    del argv
    path, output = FLAGS.encoder, FLAGS.output
    if not output.endswith(SUFFIXES):
        raise app.UsageError(f"--output={output}: the file name must end with one of {SUFFIXES}")
    if output.endswith(".pth"):
        _torch(output)  # before any weights are read
    is_export = os.path.exists(os.path.join(path, encoder.ENCODER_JSON))
    is_workdir = os.path.isdir(os.path.join(path, encoder.CHECKPOINTS_DIR))
    if not (is_export or is_workdir):
        raise app.UsageError(f"--encoder={path} is neither an exported encoder (no {encoder.ENCODER_JSON}) nor a "
                             f"training workdir (no {encoder.CHECKPOINTS_DIR}/)")
    if FLAGS.full and not is_workdir:
        raise app.UsageError(f"--full needs a training workdir: {path} is an export folder, which holds the evaluated "
                             "encoder only (no predictor, no EMA target); drop --full, or give the run's workdir")
    if FLAGS.step is not None and not is_workdir:
        raise app.UsageError(f"--step={FLAGS.step} picks a checkpoint of a training workdir; {path} is an export "
                             "folder")
    try:
        name = method_name(path, FLAGS.step)
    except (OSError, ValueError, KeyError) as e:  # no such step, an unreadable encoder.json
        raise app.UsageError(f"{path}: cannot read the method ({type(e).__name__}: {e})") from None
    if name not in VIT_METHODS:
        raise app.UsageError(f"{path}: method {name!r} is not supported yet; exports to the M2D/timm layout take "
                             f"the ViT methods {VIT_METHODS}")
    try:
        state_dict, description = (full_state_dict if FLAGS.full else encoder_state_dict)(path, FLAGS.step)
    except ValueError as e:  # params with no M2D name, a damaged checkpoint: the message names them
        hint = "; --full writes M2D's training layout, without it the evaluated encoder alone" if FLAGS.full else ""
        raise app.UsageError(f"{path}: {e}{hint}") from None
    logging.info("%s", description)
    write(state_dict, output, metadata={"format": "pt", "source": os.path.abspath(path), "method": name})
    values = sum(v.size for v in state_dict.values())
    fixed = sum(state_dict[k].size for k in ("pos_embed", "decoder_pos_embed", "norm_stats") if k in state_dict)
    logging.info("wrote %d tensors, %s values (%s of them in the fixed position tables and norm_stats) to %s "
                 "(%.1f MB)", len(state_dict), f"{values:,}", f"{fixed:,}", output, os.path.getsize(output) / 1e6)


if __name__ == "__main__":
    app.run(main)
