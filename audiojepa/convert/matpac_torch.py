"""Official MATPAC (aurianworld/matpac) state dicts → audiojepa MATPAC param trees. No torch needed.

Names, as the reference's `GeneralModel.state_dict()` (training_matpac/models/model.py) and its inference
wrapper (inference_matpac/matpac/model.py, which the released `matpac_*.pt` files load into) write them:

| reference name                                    | ours                                              |
|---------------------------------------------------|---------------------------------------------------|
| patch_embed.proj.*, cls_token, pos_embed           | as M2D (audiojepa.convert.m2d_torch)              |
| student_encoder.blocks.<i>.*, student_encoder.norm.* | M2D's blocks.<i>.*, norm.* → params["encoder"]  |
| decoder.decoder_{embed,blocks,norm,pred}.*, decoder.mask_token, decoder.decoder_pos_embed | M2D's decoder_* / mask_token → params["predictor"] |
| _ema.blocks.<i>.*, _ema.norm.*                     | target_params["encoder_stack"] (the EMA teacher)  |
| cls_student_head.*                                 | params["head"]                                    |
| _cls_head_ema.*                                    | target_params["head"] (the EMA teacher head)      |
| cls_head_loss.center [1, 1, K]                     | target_params["center"] [K]                       |

`_ema` and `_cls_head_ema` are fairseq `EMAModule.fp32_params` dicts that the reference's `state_dict` stores
nested under those keys; a nested dict is flattened to `_ema.blocks.0.norm1.weight` etc. here (`flatten`).

Classification head layout (reference `Cls_Head`, cls_head.py; ours audiojepa.models.cls_head):
- `mlp` is an nn.Sequential of Linear/GELU: its Linear layers sit at indices 0, 2, 4, … and become
  `mlp_0`, `mlp_1`, `mlp_2`, … (Linear weight [out, in] → kernel [in, out]); with one layer the reference's
  `mlp` is the Linear itself (`mlp.weight`), our `mlp_0`.
- `last_layer` is `weight_norm(Linear(bottleneck, K, bias=False))` (dim=0): `weight_v` [K, bottleneck] →
  `prototypes_direction` [bottleneck, K] (transposed) and `weight_g` [K, 1] → `prototypes_gain` [K]. Our
  prototype matrix gain · direction / ‖direction‖ (norm over the bottleneck axis) is torch's g · v / ‖v‖.
  The names of torch's newer parametrisation (`last_layer.parametrizations.weight.original0` = g,
  `.original1` = v) are read too; a plain `last_layer.weight` (weight norm removed) becomes a direction with
  gains equal to its row norms, the same matrix.

No counterpart here (named in the ValueError, never dropped silently): MATPAC++'s multiple-choice prediction
heads `mcl_heads.*` (our MATPAC predicts with one `decoder_pred`), and the downstream heads of the released
fine-tuned / probe checkpoints (`head.*`, `head_norm.*`, `probe.*`). An encoder export
(tools/convert_matpac.py) keeps only ENCODER_ENTRIES and logs what it leaves out.
"""

import re

import numpy as np

from audiojepa.convert import m2d_torch, state_dict_io

# MATPAC name prefix → the M2D name prefix it becomes (then converted by m2d_torch).
TO_M2D = (
    ("student_encoder.blocks.", "blocks."),
    ("student_encoder.norm.", "norm."),
    ("decoder.decoder_", "decoder_"),
    ("decoder.mask_token", "mask_token"),
    ("_ema.blocks.", "target_blocks."),
    ("_ema.norm.", "target_norm."),
)
SAME_AS_M2D = ("patch_embed.", "cls_token", "pos_embed")
STUDENT_HEAD = "cls_student_head."
TEACHER_HEAD = "_cls_head_ema."
CENTER = "cls_head_loss.center"
NO_COUNTERPART = {
    "mcl_heads.": "MATPAC++'s multiple-choice prediction heads (use_mcl); this package's MATPAC has one decoder_pred",
    "head.": "the AudioSet fine-tuning classifier of the released *_enc_and_head checkpoint",
    "head_norm.": "the AudioSet fine-tuning classifier's BatchNorm",
    "probe.": "a downstream linear probe",
}
# What an encoder export needs; the rest is left out by tools/convert_matpac.py (with a log line).
ENCODER_ENTRIES = ("patch_embed.", "cls_token", "pos_embed", "student_encoder.")
# Reading a checkpoint file (nested dicts flattened, "model"/"state_dict" wrappers): convert/state_dict_io.py.
flatten = state_dict_io.flatten


def to_m2d_name(name: str) -> str | None:
    """The official M2D name of a MATPAC backbone tensor (`student_encoder.blocks.3.attn.qkv.weight` →
    `blocks.3.attn.qkv.weight`), or None for a head, centre or unknown tensor."""
    if name.startswith(SAME_AS_M2D):
        return name
    for prefix, m2d_prefix in TO_M2D:
        if name.startswith(prefix):
            return m2d_prefix + name[len(prefix):]
    return None


_HEAD_MLP = re.compile(r"mlp\.(?:(\d+)\.)?(weight|bias)")
_HEAD_LAST = {"last_layer.weight_g": "gain", "last_layer.parametrizations.weight.original0": "gain",
              "last_layer.weight_v": "direction", "last_layer.parametrizations.weight.original1": "direction",
              "last_layer.weight": "weight"}


def head_params(tensors: dict[str, np.ndarray], *, source: str = "cls_student_head") -> dict:
    """A `Cls_Head` state dict (names relative to the head, e.g. `mlp.0.weight`) → ClassificationHead params
    (module docstring). ValueError naming the tensors it does not know, or a head without its prototypes."""
    mlp, last, unknown = {}, {}, []
    for name, value in tensors.items():
        if (match := _HEAD_MLP.fullmatch(name)) is not None:
            index, leaf = match.groups()
            mlp.setdefault(int(index or 0), {})[leaf] = np.asarray(value)
        elif name in _HEAD_LAST:
            last[_HEAD_LAST[name]] = np.asarray(value, np.float32)
        else:
            unknown.append(f"{source}.{name}")
    if unknown:
        raise ValueError(f"Unrecognised MATPAC classification-head entries: {unknown}. Known: mlp.<i>.weight/bias, "
                         f"last_layer.weight_g/weight_v (or parametrizations.weight.original0/1, or weight).")
    indices = sorted(mlp)
    if indices != list(range(0, 2 * len(indices), 2)):  # Linear layers of the Sequential, GELUs between
        raise ValueError(f"{source}.mlp: Linear layers at {indices}; expected 0, 2, 4, … (Linear, GELU, Linear, …).")
    params = {}
    for i, index in enumerate(indices):
        layer = {"kernel": mlp[index]["weight"].T}
        if "bias" in mlp[index]:
            layer["bias"] = mlp[index]["bias"]
        params[f"mlp_{i}"] = layer
    if "gain" in last and "direction" in last:
        direction, gain = last["direction"], last["gain"]
    elif "weight" in last:
        direction, gain = last["weight"], np.linalg.norm(last["weight"], axis=1)
    else:
        raise ValueError(f"{source}: no last_layer.weight_g / weight_v (the weight-normalised prototypes).")
    params["prototypes_direction"] = direction.T
    params["prototypes_gain"] = gain.reshape(-1)
    return params


def head_config(state_dict: dict[str, np.ndarray], prefix: str = STUDENT_HEAD) -> dict:
    """The MATPAC config.model head sizes (num_prototypes, head_hidden_dim, head_bottleneck_dim, head_layers) of
    the head under `prefix`, read from its tensors."""
    head = head_params({k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}, source=prefix[:-1])
    layers = sum(1 for key in head if key.startswith("mlp_"))
    bottleneck, num_prototypes = head["prototypes_direction"].shape
    return dict(num_prototypes=int(num_prototypes), head_bottleneck_dim=int(bottleneck), head_layers=layers,
                head_hidden_dim=int(head["mlp_0"]["kernel"].shape[1]) if layers > 1 else int(bottleneck))


def state_dict_to_params(state_dict: dict, *, grid_size: tuple[int, int] | None = None) -> tuple[dict, dict | None]:
    """Converts an official MATPAC state dict (module docstring).

    Args:
        state_dict: reference name → array; nested dicts (`_ema`, `_cls_head_ema`) are flattened.
        grid_size: (F, T') patch grid, e.g. (5, 38) for 80×608 with 16×16 patches; when given, the stored
            position tables must be the 2-D sin-cos tables of that grid (m2d_torch.check_pos_table).

    Returns:
        (params, target_params) as numpy arrays in the trees of audiojepa.methods.matpac.MATPAC: params holds
        "encoder", and "predictor" / "head" when the dict has a decoder / student head; target_params holds
        whichever of "encoder_stack" (`_ema`), "head" (`_cls_head_ema`) and "center" the dict has, or is None
        when it has none of them (the released encoder-only files); MATPAC.init_target builds a teacher from
        params where it is missing.

    Raises:
        ValueError: the names it does not know and those with no counterpart here (listed, with what they
            are), a position table that is not the grid's, or a malformed head.
    """
    state_dict = flatten(state_dict)
    m2d_named, student, teacher, center, unknown, no_counterpart = {}, {}, {}, None, [], []
    for name, value in state_dict.items():
        if (m2d_name := to_m2d_name(name)) is not None:
            m2d_named[m2d_name] = value
        elif name.startswith(STUDENT_HEAD):
            student[name[len(STUDENT_HEAD):]] = value
        elif name.startswith(TEACHER_HEAD):
            teacher[name[len(TEACHER_HEAD):]] = value
        elif name == CENTER:
            center = np.asarray(value, np.float32).reshape(-1)
        elif any(name.startswith(prefix) for prefix in NO_COUNTERPART):
            no_counterpart.append(name)
        else:
            unknown.append(name)
    if unknown or no_counterpart:
        what = sorted({NO_COUNTERPART[p] for p in NO_COUNTERPART for n in no_counterpart if n.startswith(p)})
        raise ValueError(
            (f"Unrecognised MATPAC state-dict entries: {unknown}. " if unknown else "")
            + (f"Entries with no counterpart in this package's MATPAC: {no_counterpart} ({'; '.join(what)}). "
               if no_counterpart else "")
            + "Known: patch_embed, cls_token, pos_embed, student_encoder.{blocks,norm}, decoder.decoder_*, "
              f"decoder.mask_token, _ema.{{blocks,norm}}, {STUDENT_HEAD}*, {TEACHER_HEAD}*, {CENTER}.")
    try:
        params, encoder_stack = m2d_torch.state_dict_to_params(m2d_named, grid_size=grid_size)
    except ValueError as e:  # its messages use M2D's names; say which MATPAC names they come from
        raise ValueError(f"{e} (MATPAC names map to M2D's: student_encoder.X → X, decoder.decoder_X → decoder_X, "
                         "_ema.X → target_X)") from None
    if student:
        params["head"] = head_params(student, source=STUDENT_HEAD[:-1])
    target_params = {}
    if encoder_stack:
        target_params["encoder_stack"] = encoder_stack
    if teacher:
        target_params["head"] = head_params(teacher, source=TEACHER_HEAD[:-1])
    if center is not None:
        target_params["center"] = center
    return params, target_params or None


def encoder_entries(state_dict: dict) -> tuple[dict, list[str]]:
    """(the entries ENCODER_ENTRIES names, the sorted top-level names of the others)."""
    keep = {k: v for k, v in state_dict.items() if k.startswith(ENCODER_ENTRIES)}
    return keep, sorted({k.split(".")[0] for k in state_dict if k not in keep})


def model_config_for(state_dict: dict[str, np.ndarray], n_mels: int, input_frames: int | None = None,
                     num_heads: int | None = None):
    """(MATPAC model config, input_shape) with the encoder, patch and predictor sizes read from the tensors as
    m2d_torch.model_config_for reads an M2D checkpoint's, and the head sizes from `cls_student_head` when the
    dict has it (else MATPAC's defaults, which an encoder export does not use)."""
    from audiojepa.methods import matpac
    from audiojepa.models.vit import SIZE_KEYS

    m2d_named = {m2d: v for k, v in flatten(state_dict).items() if (m2d := to_m2d_name(k)) is not None}
    m2d_config, input_shape = m2d_torch.model_config_for(m2d_named, n_mels, input_frames, num_heads=num_heads)
    config = matpac.default_config(m2d_config.variant)
    for key in (*SIZE_KEYS, "patch_size", "predictor_width", "predictor_depth"):
        config[key] = m2d_config[key]
    if any(k.startswith(STUDENT_HEAD) for k in state_dict):
        config.update(head_config(state_dict))
    return config, input_shape
