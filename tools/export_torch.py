r"""Exports an encoder trained here to PyTorch: the ViT methods (M2D, MATPAC, JEPA) in the official M2D / timm
state-dict names (MATPAC --full: the whole model in the official MATPAC names), EncodecMAE in the reference
implementation's (habla-liaa/encodecmae v1).

    python tools/export_torch.py --encoder=/ckpt/m2d/export --output=/weights/m2d_tiny-80x208p16x16/weights.safetensors
    python tools/export_torch.py --encoder=/ckpt/m2d --output=/weights/m2d.pth --full --step=3000
    python tools/export_torch.py --encoder=/tmp/matpac_runlocal --output=/weights/matpac_full.pth --full
    python tools/export_torch.py --encoder=/ckpt/encodecmae_base/export --output=/weights/encodecmae_base.safetensors

--encoder is an export folder (tools/export_encoder.py, tools/convert_m2d.py, tools/convert_encodecmae.py) or a
training workdir (its latest checkpoint, or --step). The output is one file of {name: float32 tensor}:
  `.safetensors`  written with safetensors' numpy API (no torch needed); load it with
                  `safetensors.torch.load_file(FILE)`.
  `.pth`          `torch.save` of {name: tensor}; needs the optional torch extra (`pip install -e ".[torch]"`).
                  MATPAC --full: `_ema` and `_cls_head_ema` are nested {name: tensor} dicts, as the reference's
                  `GeneralModel.state_dict()` holds them (a .safetensors keeps them flat, `_ema.blocks.0.…`).
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
encoder. Params with no M2D name (learned position tables, the JEPA target's own patch embedding) are an error
naming them, never dropped.
MATPAC --full (audiojepa.convert.matpac_export) writes instead the official MATPAC names (aurianworld/matpac,
`GeneralModel.state_dict()`), which tools/convert_matpac.py reads back: `patch_embed.proj.*`, `cls_token`,
`pos_embed`, the online encoder `student_encoder.blocks.<i>.*` / `student_encoder.norm.*`, the predictor
`decoder.{mask_token, decoder_pos_embed, decoder_embed, decoder_blocks.<i>, decoder_norm, decoder_pred}`, the
student head `cls_student_head.*` (`mlp.0/2/4.*`; the prototypes weight-normed as `last_layer.weight_g` [K, 1] and
`weight_v` [K, bottleneck]), the centre `cls_head_loss.center` [1, 1, K], and the EMA teachers `_ema.blocks.<i>.*`,
`_ema.norm.*` and `_cls_head_ema.*`. Every param and target tensor reads back bit for bit (weight_g is the gain as
trained, weight_v the direction as is); no `norm_stats` (GeneralModel has none: the log line gives them). A
recipe=paper run's learned position tables have no reference name (the reference's tables are fixed sin-cos) and
are an error naming them; so is anything else without one. Without --full MATPAC exports as above (M2D names).

EncodecMAE (audiojepa.convert.encodecmae_export; the names of v1's Lightning `EncodecMAE.state_dict()`, which
tools/convert_encodecmae.py reads back): without --full the encoder and the EnCodec copy it runs on,
`wav_encoder.model.model.*` (the EnCodec encoder; convs weight-normed as `weight_g`/`weight_v`),
`target_encoder.model.vq.layers.<q>._codebook.embed` (the run's n_q codebooks; the converter needs them),
`feat_projector.*`, `positional_encoder.scale`, `visible_encoder.encoder_layers.<i>.*` (attention heads in the
reference's interleaved order; a shared FFN under every layer's `ff_layer`, as v1's state dict repeats its one
module) and `visible_encoder.final_norm.*`. --full adds `decoder_projector.*`, `decoder.*`, `head.layer.*` and,
self-trained, `extra_head.layer.*`. Not written: the other codebooks of the reference's 32-codebook RVQ and its
k-means buffers (`inited`, `cluster_size`, `embed_avg`), which are no params here: load with `strict=False` into a
module built on the pretrained EnCodec. Every tensor reads back bit for bit except the EnCodec conv kernels (1 ulp:
weight norm's g is rounded to float32). Params with no v1 name are an error naming them: a learned mask token, the
self-training teacher and centroids, a "pre_ln" stack, and a decoder position scale that differs from the
encoder's (v1 shares one `positional_encoder.scale`; runs here learn two, so --full of a trained run stops there).

What you see (absl logging on stderr; the tiny M2D of shared/fixtures/m2d, ~3 s on 2 CPU cores):

    I... export_torch.py] m2d encoder of /ckpt/m2d/export (tiny, input 80x208p16x16, norm_stats (-7.1, 4.2))
    I... export_torch.py] wrote 31 tensors, 952,322 values (12,674 of them in the fixed position tables and
        norm_stats) to /weights/m2d_tiny-80x208p16x16/weights.safetensors (3.8 MB)

`m2d_torch.state_dict_to_params` (tools/convert_m2d.py) reads such a file back into the same params, bit for bit.
EncodecMAE, a base-size export (e.g. tools/convert_encodecmae.py of the released encodecmae-base; ~8 s on 2 CPU
cores; the .safetensors holds a copy of the shared FFN per layer, safetensors having no shared tensors):

    I... export_torch.py] encodecmae encoder of /ckpt/encodecmae_base/export (base, share_ffn=True, 8 codebooks,
        chunks of 96000 samples)
    I... export_torch.py] wrote 195 tensors, 95,161,857 values (56,666,880 of them repeats of the shared FFN, stored
        once in a .pth) to /weights/encodecmae_base.safetensors (380.7 MB)

and `encodecmae_torch.state_dict_to_params` (tools/convert_encodecmae.py) reads it back into the same params.
MATPAC --full of a 2-step `configs/matpac.py:runlocal,recipe=code` run (tiny, 256 prototypes; ~15 s on 2 busy
CPU cores):

    I... export_torch.py] matpac encoder, predictor, classification heads, centre and EMA teachers of
        /tmp/matpac_runlocal step 2 (tiny, input 80x208p16x16, norm_stats (-9.1803, 3.623))
    I... export_torch.py] wrote 105 tensors, 2,268,480 values (16,896 of them in the fixed position tables) to
        /weights/matpac_full.pth (9.1 MB)

and `matpac_torch.state_dict_to_params` (tools/convert_matpac.py) reads it back into the run's params and target
params. The default runlocal (recipe=paper) learns its position tables, so its --full stops with:

    /tmp/matpac_runlocal: no official M2D name for params/encoder/pos_embed [1, 65, 192],
        params/predictor/pos_embed [1, 66, 64]. Known: … A pos_embed leaf is a learned position table
        (config.model.pos_embed='learned', recipe=paper): the reference MATPAC code's tables are fixed sin-cos
        buffers, … (tools/export_encoder.py keeps it, in this package's format); --full writes MATPAC's
        GeneralModel names, …
"""

import json
import os
import sys

import numpy as np
from absl import app, flags, logging

# This checkout's package, not whichever one is installed (as the other tools do).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from audiojepa import methods
from audiojepa.adapters import encoder
from audiojepa.convert import encodecmae_export, m2d_export, matpac_export  # noqa: E402
from audiojepa.models import vit  # noqa: E402
from audiojepa.ops import frontend
from audiojepa.runtime import checkpointing  # noqa: E402

flags.DEFINE_string("encoder", None, "Exported encoder folder (encoder.json) or training workdir (checkpoints/).")
flags.DEFINE_string("output", None, "Output file: .safetensors (no torch needed) or .pth (needs the torch extra).")
flags.DEFINE_bool("full", False, "Also write the predictor (decoder_*) and the EMA target (target_*), as M2D's "
                  "training checkpoints (MATPAC: the whole GeneralModel state dict, heads and centre included; "
                  "EncodecMAE: the decoder and heads, as v1's module); a training workdir only.")
flags.DEFINE_integer("step", None, "Checkpoint step of a training workdir (default: the latest).")
flags.mark_flags_as_required(["encoder", "output"])
FLAGS = flags.FLAGS

SUFFIXES = (".safetensors", ".pth")
# audiojepa.methods.METHODS names of the ViT methods (Audio-JEPA is a configuration of "jepa").
VIT_METHODS = ("m2d", "matpac", "jepa")
SUPPORTED_METHODS = VIT_METHODS + ("encodecmae",)
# M2D's and MATPAC's, rebuilt rather than trained.
FIXED_TENSORS = ("pos_embed", "decoder_pos_embed", "decoder.decoder_pos_embed", "norm_stats")


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
    """(state dict of the online encoder, predictor and EMA target, a description) of a workdir's checkpoint:
    M2D's training layout, or for MATPAC the reference's GeneralModel names (heads and centre included; flat, as
    matpac_export.params_to_state_dict gives them)."""
    method, state, meta = encoder.restore_train_state(workdir, step)
    input_shape = methods.input_shape(method, frontend.LogMelParams.from_dict(meta["frontend"]), meta["crop_frames"])
    norm_stats = tuple(meta["norm_stats"])
    grid = vit.grid_size(input_shape, method.patch_size)
    is_matpac = meta["method"] == "matpac"
    if method.config.get("eval_encoder") == "target":
        online, target, layout = ("student_encoder.*", "_ema.*", "MATPAC's") if is_matpac else (
            "blocks.*", "target_*", "M2D's")
        logging.warning("config.model.eval_encoder='target': the evaluated encoder is %s; %s is the online encoder, "
                        "as in %s checkpoints", target, online, layout)
    if is_matpac:  # GeneralModel has no norm_stats tensor: the description line gives them
        state_dict = matpac_export.params_to_state_dict(state["params"], state["target_params"], grid_size=grid)
        what = "encoder, predictor, classification heads, centre and EMA teachers"
    else:
        state_dict = m2d_export.params_to_state_dict(state["params"], state["target_params"], grid_size=grid,
                                                     norm_stats=norm_stats)
        what = "encoder, predictor and EMA target"
    description = _describe(f"{meta['method']} {what}", f"{workdir} step {int(state['step'])}", method.config,
                            input_shape, method.patch_size, norm_stats)
    return state_dict, description


def encodecmae_encoder_state_dict(path: str, step: int | None) -> tuple[dict[str, np.ndarray], str]:
    """(v1 state dict of the encoder and the EnCodec copy it runs on, a description) of an export folder or a
    workdir."""
    loaded = encoder.load_encoder(path, step=step)
    # The export's own EnCodec copy (params["encodec"]), or else the one its config names.
    params = {**loaded.params, "encodec": loaded.method.encodec_params}
    state_dict = encodecmae_export.params_to_state_dict(params, model_config=loaded.model_config, encoder_only=True)
    return state_dict, _describe_encodecmae("encodecmae encoder", path, loaded.model_config, loaded.input_shape)


def encodecmae_full_state_dict(workdir: str, step: int | None) -> tuple[dict[str, np.ndarray], str]:
    """(v1 state dict of the whole model: EnCodec copy, encoder, decoder, heads; a description) of a workdir's
    checkpoint."""
    method, state, meta = encoder.restore_train_state(workdir, step)
    state_dict = encodecmae_export.params_to_state_dict(state["params"], state["target_params"],
                                                        model_config=method.config)
    input_shape = methods.input_shape(method, frontend.LogMelParams.from_dict(meta["frontend"]), meta["crop_frames"])
    description = _describe_encodecmae("encodecmae encoder, decoder and heads", f"{workdir} step "
                                       f"{int(state['step'])}", method.config, input_shape)
    return state_dict, description


def _describe_encodecmae(what, source, model_config, input_shape) -> str:
    return (f"{what} of {source} ({model_config.get('size')}, share_ffn={model_config.get('share_ffn')}, "
            f"{model_config.get('num_codebooks')} codebooks, chunks of {input_shape[0]} samples)")


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


def write(state_dict: dict, output: str, *, metadata: dict[str, str]) -> None:
    """Writes `output` (.safetensors or .pth) through a temporary file beside it, so a failure leaves no half file.
    `state_dict` is {name: array}; a .pth may also hold nested dicts of them (matpac_export.nest)."""
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = f"{output}.{os.getpid()}.tmp"
    try:
        if output.endswith(".safetensors"):
            from safetensors.numpy import save

            with open(tmp, "wb") as f:  # not save_file, whose files are private to the user (mode 600)
                f.write(save(state_dict, metadata=metadata))
        else:
            torch = _torch(output)
            # One tensor per array: a shared array (EncodecMAE's shared FFN under every layer) is stored once, as in
            # the reference's own checkpoints. A dict value stays a nested dict (MATPAC's `_ema`).
            tensors = {}

            def tensor(value: np.ndarray):
                if id(value) not in tensors:  # from_numpy shares the memory, and warns on a read-only array
                    tensors[id(value)] = torch.from_numpy(value if value.flags.writeable else value.copy())
                return tensors[id(value)]

            def to_torch(tree: dict) -> dict:
                return {name: to_torch(value) if isinstance(value, dict) else tensor(value)
                        for name, value in tree.items()}

            torch.save(to_torch(state_dict), tmp)
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
    if name not in SUPPORTED_METHODS:
        raise app.UsageError(f"{path}: method {name!r} is not supported; exports take the ViT methods {VIT_METHODS} "
                             "(M2D/timm names) and 'encodecmae' (encodecmae v1 names)")
    if name == "encodecmae":
        export, layout = (encodecmae_full_state_dict if FLAGS.full else encodecmae_encoder_state_dict), "v1's module"
    else:
        export = full_state_dict if FLAGS.full else encoder_state_dict
        layout = "MATPAC's GeneralModel names" if name == "matpac" else "M2D's training layout"
    try:
        state_dict, description = export(path, FLAGS.step)
    except ValueError as e:  # params with no reference name, a damaged checkpoint: the message names them
        hint = f"; --full writes {layout}, without it the evaluated encoder alone" if FLAGS.full else ""
        raise app.UsageError(f"{path}: {e}{hint}") from None
    logging.info("%s", description)
    # A .pth holds MATPAC's EMA teachers nested under `_ema` / `_cls_head_ema`, as GeneralModel.state_dict() does.
    nested = name == "matpac" and FLAGS.full and output.endswith(".pth")
    write(matpac_export.nest(state_dict) if nested else state_dict, output,
          metadata={"format": "pt", "source": os.path.abspath(path), "method": name})
    values = sum(v.size for v in state_dict.values())
    fixed = sum(state_dict[k].size for k in FIXED_TENSORS if k in state_dict)
    repeated = values - sum(v.size for v in {id(v): v for v in state_dict.values()}.values())
    fixed_what = "the fixed position tables" + (" and norm_stats" if "norm_stats" in state_dict else "")
    notes = ([f"{fixed:,} of them in {fixed_what}"] if fixed else []) + (
        [f"{repeated:,} of them repeats of the shared FFN, stored once in a .pth"] if repeated else [])
    logging.info("wrote %d tensors, %s values%s to %s (%.1f MB)", len(state_dict), f"{values:,}",
                 f" ({'; '.join(notes)})" if notes else "", output, os.path.getsize(output) / 1e6)


if __name__ == "__main__":
    app.run(main)
