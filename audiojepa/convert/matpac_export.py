"""audiojepa MATPAC params → official MATPAC (aurianworld/matpac) state dicts: the inverse of matpac_torch.

`params_to_state_dict` gives `{reference name: np.ndarray}` (float32, C-contiguous) in the names of the reference's
`GeneralModel.state_dict()` (training_matpac/models/model.py), which `matpac_torch.state_dict_to_params`
(tools/convert_matpac.py) turns back into the same trees. matpac_torch's table, reversed:

| ours                            | reference name                                                          |
|---------------------------------|-------------------------------------------------------------------------|
| params["encoder"]               | patch_embed.proj.*, cls_token, pos_embed (fixed), student_encoder.blocks.<i>.*, student_encoder.norm.* |
| params["predictor"]             | decoder.{mask_token, decoder_pos_embed (fixed), decoder_embed.*, decoder_blocks.<i>.*, decoder_norm.*, decoder_pred.*} |
| target_params["encoder_stack"]  | _ema.blocks.<i>.*, _ema.norm.*                                          |
| params["head"]                  | cls_student_head.*                                                      |
| target_params["head"]           | _cls_head_ema.*                                                         |
| target_params["center"] [K]     | cls_head_loss.center [1, 1, K]                                          |

The backbone rows are m2d_export's names (its layouts: transposed Linear weights, OIHW patch conv, one name per
block row), renamed through matpac_torch.TO_M2D reversed (`blocks.` → `student_encoder.blocks.`, `decoder_` →
`decoder.decoder_`, `target_blocks.` → `_ema.blocks.`, …).

Classification head (reference `Cls_Head`): `mlp_<i>` → `mlp.<2i>.{weight,bias}` (the Linear layers of the
Sequential, GELUs between; kernel [in, out] → weight [out, in]), or `mlp.{weight,bias}` for a one-layer head (the
reference's `mlp` is then the Linear itself); the weight-normed prototypes as torch's `weight_norm(dim=0)` stores
them: `prototypes_gain` [K] → `last_layer.weight_g` [K, 1] and `prototypes_direction` [bottleneck, K] →
`last_layer.weight_v` [K, bottleneck] (transposed). The reference's matrix g · v / ‖v‖ (norm over the bottleneck
axis) is ours, gain · direction / ‖direction‖; g is our gain as trained (not ‖v‖) and v our direction as is
(not normalised), so both come back bit for bit.

Exact: every param and target leaf reads back through matpac_torch bit for bit (transposes, reshapes and renames
of float32 arrays), and a reference state dict with `weight_g`/`weight_v` heads that matpac_torch read exports to
its own names and values bit for bit. Rebuilt, not read back: the fixed position tables `pos_embed` and
`decoder.decoder_pos_embed` (requires_grad=False in the reference; matpac_torch checks them against the grid's
sin-cos table, m2d_torch.check_pos_table, or ignores them) are written as m2d_export writes them, `sincos_2d` of
`grid_size`. Renamed: the newer weight-norm parametrisation (`last_layer.parametrizations.weight.original0/1`),
which matpac_torch also reads, comes out as `weight_g` / `weight_v` (same values); a plain `last_layer.weight`
(weight norm removed) as its row norms and itself (the same matrix, to float32 rounding). No `norm_stats` tensor:
GeneralModel has none (and matpac_torch would not read one).

A leaf with no reference name is a ValueError listing them all, nothing is dropped: learned position tables
(config.model.pos_embed="learned", recipe=paper; the reference keeps fixed sin-cos tables, which matpac_torch does
not read back as params), or anything else the trees hold beyond the table above.

`GeneralModel.state_dict()` holds the EMA teachers as nested dicts under `_ema` and `_cls_head_ema` (fairseq
`EMAModule.fp32_params`; `GeneralModel._load_from_state_dict` pops them by those keys): `nest` gives that form for a
`.pth`, the one `GeneralModel.load_state_dict` expects. A `.safetensors` cannot nest: it keeps the flat names
(`_ema.blocks.0.norm1.weight`), which matpac_torch (`flatten`) reads either way.
"""

import re
from collections.abc import Mapping

import numpy as np

from audiojepa.convert import m2d_export, matpac_torch, state_dict_io

# matpac_torch's M2D renaming, reversed: M2D name prefix → MATPAC name prefix.
_FROM_M2D = tuple((m2d_prefix, prefix) for prefix, m2d_prefix in matpac_torch.TO_M2D)
# Our trees that are M2D's (m2d_export names them): params' encoder and predictor, the target's encoder stack.
_M2D_PARAMS = ("encoder", "predictor")
ENCODER_STACK = "encoder_stack"
# GeneralModel.state_dict()'s order: its own params, then its sub-modules as __init__ registers them, then the EMA
# teachers that its state_dict() appends. Within a group, m2d_export's order (the reference decoder's own:
# mask_token, decoder_pos_embed, decoder_embed, blocks, norm, pred). Only cosmetic: a .pth keeps it.
_ORDER = ("cls_token", "pos_embed", "patch_embed", "student_encoder", "decoder", "cls_head_loss", "cls_student_head",
          "_ema", "_cls_head_ema")
# The EMA teachers, nested dicts in the reference's state dict.
NESTED = ("_ema", matpac_torch.TEACHER_HEAD[:-1])
_MLP = re.compile(r"mlp_(\d+)")
_LEAF_NAMES = {"kernel": "weight", "bias": "bias"}


def from_m2d_name(m2d_name: str) -> str:
    """The MATPAC name of an official M2D name that m2d_export writes (`target_blocks.0.attn.qkv.weight` →
    `_ema.blocks.0.attn.qkv.weight`); checked to map back through matpac_torch.to_m2d_name."""
    if m2d_name.startswith(matpac_torch.SAME_AS_M2D):
        name = m2d_name
    else:
        name = next((prefix + m2d_name[len(m2d_prefix):] for m2d_prefix, prefix in _FROM_M2D
                     if m2d_name.startswith(m2d_prefix)), None)
    if name is None or matpac_torch.to_m2d_name(name) != m2d_name:
        raise ValueError(f"M2D name {m2d_name!r} has no MATPAC counterpart (matpac_torch.TO_M2D)")
    return name


def head_state_dict(head: Mapping, *, prefix: str, tree: str) -> tuple[dict[str, np.ndarray], list[str]]:
    """({reference name: array} of a ClassificationHead's params under `prefix` (e.g. "cls_student_head."),
    [the leaves with no name, as "params/head/x [shape]"]): matpac_torch.head_params reversed."""
    layers = {int(match.group(1)): key for key in head if (match := _MLP.fullmatch(key))}
    contiguous = sorted(layers) == list(range(len(layers)))  # mlp_0 … mlp_{n-1}, as ClassificationHead names them
    mlp, last_layer, unknown = {}, {}, []
    for key, value in head.items():
        match = _MLP.fullmatch(key)
        if match and contiguous and isinstance(value, Mapping):
            i = int(match.group(1))
            module = "mlp" if len(layers) == 1 else f"mlp.{2 * i}"  # Linear layers of the Sequential, GELUs between
            for leaf, leaf_value in value.items():
                if leaf not in _LEAF_NAMES or isinstance(leaf_value, Mapping):
                    unknown += _unnamed(f"{tree}/{key}/{leaf}", leaf_value)
                    continue
                leaf_value = np.asarray(leaf_value)
                mlp.setdefault(i, {})[_LEAF_NAMES[leaf]] = _float32(leaf_value.T if leaf == "kernel" else leaf_value)
                mlp[i]["module"] = module
        elif key == "prototypes_gain" and not isinstance(value, Mapping):
            last_layer["weight_g"] = _float32(np.reshape(value, (-1, 1)))
        elif key == "prototypes_direction" and not isinstance(value, Mapping):
            last_layer["weight_v"] = _float32(np.asarray(value).T)
        else:
            unknown += _unnamed(f"{tree}/{key}", value)
    # Cls_Head's order: mlp (weight before bias), then weight_norm's weight_g, weight_v.
    state_dict = {f"{prefix}{layer['module']}.{leaf}": layer[leaf]
                  for _, layer in sorted(mlp.items()) for leaf in ("weight", "bias") if leaf in layer}
    state_dict.update({f"{prefix}last_layer.{leaf}": last_layer[leaf] for leaf in ("weight_g", "weight_v")
                       if leaf in last_layer})
    return state_dict, unknown


def params_to_state_dict(params: Mapping, target_params: Mapping | None = None, *,
                         grid_size: tuple[int, int]) -> dict[str, np.ndarray]:
    """The official MATPAC state dict (`GeneralModel.state_dict()`'s names, flat) of MATPAC trees.

    Args:
        params: audiojepa.methods.matpac params {"encoder", "predictor", "head"} (numpy or jax leaves).
        target_params: {"encoder_stack", "head", "center"}, or None for no `_ema`, `_cls_head_ema`, centre.
        grid_size: (F, T') patch grid of the training input, e.g. (5, 38) for 80×608 with 16×16 patches: the
            shape of the fixed position tables.

    Returns:
        {reference name: float32 C-contiguous array}, in GeneralModel.state_dict()'s order; the EMA teachers
        flat (`_ema.blocks.0.norm1.weight`; `nest` gives the reference's nested form).

    Raises:
        ValueError: listing every leaf with no reference name (module docstring), with what it is.
    """
    target_params = {} if target_params is None else target_params
    state_dict: dict[str, np.ndarray] = {}
    unknown = []
    for tree, root, heads in (("params", params, {"head": matpac_torch.STUDENT_HEAD}),
                              ("target_params", target_params, {"head": matpac_torch.TEACHER_HEAD})):
        for key, value in root.items():
            if key in (_M2D_PARAMS if tree == "params" else (ENCODER_STACK,)):
                continue
            if key in heads and isinstance(value, Mapping):
                named, head_unknown = head_state_dict(value, prefix=heads[key], tree=f"{tree}/{key}")
                state_dict.update(named)
                unknown += head_unknown
            elif tree == "target_params" and key == "center" and not isinstance(value, Mapping):
                state_dict[matpac_torch.CENTER] = _float32(np.reshape(value, (1, 1, -1)))
            else:
                unknown += _unnamed(f"{tree}/{key}", value)
    problems = []
    if unknown:
        listed = state_dict_io.listed(unknown)
        problems.append(f"no official MATPAC name for {listed}. Known: params/head, target_params/{{head, center}} "
                        "(ClassificationHead params: mlp_<i>, prototypes_direction, prototypes_gain)")
    try:
        m2d_named = m2d_export.params_to_state_dict(
            {key: params[key] for key in _M2D_PARAMS if key in params},
            target_params.get(ENCODER_STACK), grid_size=grid_size)
    except ValueError as e:  # its tree paths are M2D's: MATPAC's target stack sits under encoder_stack
        message = str(e).replace("target_params/", f"target_params/{ENCODER_STACK}/")
        if "pos_embed [" in message:
            message += (". A pos_embed leaf is a learned position table (config.model.pos_embed='learned', "
                        "recipe=paper): the reference MATPAC code's tables are fixed sin-cos buffers, which "
                        "matpac_torch checks or ignores rather than reads, so a trained table would not come back "
                        "(tools/export_encoder.py keeps it, in this package's format)")
        problems.append(message)
    if problems:
        raise ValueError("; ".join(problems))
    for m2d_name, value in m2d_named.items():
        state_dict[from_m2d_name(m2d_name)] = value
    # A stable sort: each group keeps the order it was written in (m2d_export's, the head's).
    return dict(sorted(state_dict.items(), key=lambda item: _ORDER.index(item[0].split(".")[0])))


def nest(state_dict: Mapping[str, np.ndarray]) -> dict:
    """The flat state dict with its `_ema.*` / `_cls_head_ema.*` entries as nested dicts under `_ema` /
    `_cls_head_ema`, as GeneralModel.state_dict() holds them (matpac_torch.flatten reversed)."""
    out: dict = {}
    for name, value in state_dict.items():
        top, _, rest = name.partition(".")
        if top in NESTED and rest:
            out.setdefault(top, {})[rest] = value
        else:
            out[name] = value
    return out


def _unnamed(path: str, value) -> list[str]:
    """"path/to/leaf [shape]" of every leaf under `value` (itself when it is a leaf), as m2d_export lists them."""
    if not isinstance(value, Mapping):
        return [f"{path} {list(np.shape(value))}"]
    return [entry for key, child in value.items() for entry in _unnamed(f"{path}/{key}", child)]


def _float32(value: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(value, dtype=np.float32)
