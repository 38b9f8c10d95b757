"""audiojepa ViT param trees → official M2D (`M2DViT`, timm blocks) state dicts: the inverse of m2d_torch.

`params_to_state_dict` gives `{torch name: np.ndarray}` (float32, C-contiguous) that PyTorch loads with
`model.load_state_dict` after `torch.from_numpy`, and that `m2d_torch.state_dict_to_params` turns back into the
same trees bit for bit. Layout changes are m2d_torch's, reversed: kernel [in, out] → Linear weight [out, in];
the patch kernel [pf, pt, 1, D] (HWIO) → conv weight [D, 1, pf, pt] (OIHW); LayerNorm scale → weight; row i of a
stacked leaf `stack/blocks/... [depth, ...]` → `blocks.<i>.…`. Names:

    params["encoder"]     patch_embed.proj.*, cls_token (only when the tree has one), blocks.<i>.*, norm.*
    params["predictor"]   decoder_embed.*, mask_token, decoder_blocks.<i>.*, decoder_norm.*, decoder_pred.*
    target_params         target_blocks.<i>.*, target_norm.* (M2D's EMA target stack: blocks + norm)

plus the frozen tensors the official model keeps in its state dict: `pos_embed` [1, (1 +) F·T', D] rebuilt with
`sincos_2d` (a CLS row of zeros only with a CLS token, as timm's `class_token=False` for the JEPA family),
`decoder_pos_embed` [1, 1 + F·T', predictor width] with the predictor, and `norm_stats` [2] when given.

A leaf with no name here (MATPAC's classification head and centre, a learned position table, JEPA's target
patch embedding) is a ValueError listing them all: nothing is dropped silently. `encoder_only=True` reads
params["encoder"] alone, for an encoder export.
"""

from collections.abc import Mapping

import numpy as np

from audiojepa.convert import m2d_torch, state_dict_io
from audiojepa.models.pos_embed import sincos_2d
from audiojepa.models.vit import STACKED_BLOCKS

# (tree, our module path) → torch module prefix; a path ending in STACKED_BLOCKS is a stack's blocks, whose
# row i is `<prefix>.<i>`. The twin of m2d_torch's table; every name made here is checked against it.
_MODULES = (
    ("params", ("encoder", "patch_embed", "proj"), "patch_embed.proj"),
    ("params", ("encoder", "stack", STACKED_BLOCKS), "blocks"),
    ("params", ("encoder", "stack", "norm"), "norm"),
    ("params", ("predictor", "embed"), "decoder_embed"),
    ("params", ("predictor", "stack", STACKED_BLOCKS), "decoder_blocks"),
    ("params", ("predictor", "stack", "norm"), "decoder_norm"),
    ("params", ("predictor", "head"), "decoder_pred"),
    ("target_params", (STACKED_BLOCKS,), "target_blocks"),
    ("target_params", ("norm",), "target_norm"),
)
_TOKENS = {("params", ("encoder", "cls_token")): "cls_token",
           ("params", ("predictor", "mask_token")): "mask_token"}
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
# The official state dict's order (M2DViT.state_dict()): top-level names, then a block's modules, weight before
# bias. Only cosmetic (a .pth keeps it; safetensors sorts the names).
_ORDER = ("norm_stats", "cls_token", "pos_embed", "mask_token", "decoder_pos_embed", "patch_embed", "blocks",
          "norm", "decoder_embed", "decoder_blocks", "decoder_norm", "decoder_pred", "target_blocks", "target_norm")
_BLOCK_ORDER = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


def params_to_state_dict(params: Mapping, target_params: Mapping | None = None, *, grid_size: tuple[int, int],
                         norm_stats: tuple[float, float] | None = None,
                         encoder_only: bool = False) -> dict[str, np.ndarray]:
    """The official M2D state dict of audiojepa ViT params (M2D, MATPAC, JEPA trees; numpy or jax leaves).

    Args:
        params: {"encoder": ViTEncoder params, ["predictor": Predictor params]}.
        target_params: M2D's EMA target stack {"blocks", "norm"}, or None for no target_* tensors.
        grid_size: (F, T') patch grid of the training input, e.g. (5, 38) for 80×608 with 16×16 patches: the
            shape of the position tables.
        norm_stats: (mean, std) of the log-mel values, stored as `norm_stats` float32 [2]; None: not stored.
        encoder_only: read params["encoder"] only (whatever else params holds); target_params must be None.

    Returns:
        {torch name: float32 C-contiguous array}, in the official order (M2DViT.state_dict()'s).

    Raises:
        ValueError: listing every leaf (as "params/encoder/pos_embed [1, 65, 192]") that has no M2D name; also
            for a params without "encoder", target_params with encoder_only, or norm_stats not of 2 values.
    """
    if "encoder" not in params:
        raise ValueError(f"params has no 'encoder' subtree (it has {sorted(params)}); expected an audiojepa ViT "
                         "param tree {'encoder': ..., ['predictor': ...]}")
    if encoder_only and target_params is not None:
        raise ValueError("encoder_only=True exports the encoder alone; pass target_params=None")
    trees = [("params", {"encoder": params["encoder"]} if encoder_only else params)]
    if target_params is not None:
        trees.append(("target_params", target_params))

    state_dict: dict[str, np.ndarray] = {}
    unknown = []
    for tree, root in trees:
        for path, leaf in state_dict_io.nested_leaves(root):
            converted = _torch_tensors(tree, path, np.asarray(leaf))
            if converted is None:
                unknown.append(f"{tree}/{'/'.join(path)} {list(np.shape(leaf))}")
                continue
            for name, value in converted:
                if name in state_dict:
                    raise ValueError(f"two leaves map to the torch name {name!r} (second: {tree}/{'/'.join(path)})")
                state_dict[name] = value
    if unknown:
        listed = state_dict_io.listed(unknown)
        raise ValueError(f"no official M2D name for {listed}. Known: params/encoder/{{patch_embed, cls_token, stack}}, "
                         "params/predictor/{embed, mask_token, stack, head}, target_params/{blocks, norm} (M2D's "
                         "target stack); fixed sin-cos position tables only")

    encoder = params["encoder"]
    has_cls = "cls_token" in encoder
    width = int(np.shape(encoder["patch_embed"]["proj"]["kernel"])[-1])
    state_dict["pos_embed"] = _pos_table(grid_size, width, cls_token=has_cls)
    if not encoder_only and "predictor" in params:
        predictor_width = int(np.shape(params["predictor"]["mask_token"])[-1])
        state_dict["decoder_pos_embed"] = _pos_table(grid_size, predictor_width, cls_token=True)
    if norm_stats is not None:
        values = np.asarray(norm_stats, np.float32).ravel()
        if values.size != 2:
            raise ValueError(f"norm_stats has {values.size} values {values.tolist()[:8]}; expected (mean, std)")
        state_dict["norm_stats"] = np.ascontiguousarray(values)
    return dict(sorted(state_dict.items(), key=lambda item: _order_key(item[0])))


def _torch_tensors(tree: str, path: tuple[str, ...], value: np.ndarray) -> list[tuple[str, np.ndarray]] | None:
    """[(torch name, value in torch layout)] of one leaf (one per block row for a stacked leaf), or None when the
    leaf has no M2D name. Every name is checked to convert back to (tree, path) with m2d_torch."""
    if (tree, path) in _TOKENS:
        return [(_TOKENS[tree, path], _to_torch_layout(path[-1], value))]
    for module_tree, module_path, prefix in _MODULES:
        if module_tree != tree or path[:len(module_path)] != module_path:
            continue
        rest = path[len(module_path):]
        if not rest or rest[-1] not in _LEAF_NAMES:
            return None
        suffix = ".".join(rest[:-1] + (_LEAF_NAMES[rest[-1]],))
        if module_path[-1] == STACKED_BLOCKS:
            out = [(f"{prefix}.{i}.{suffix}", path + (i,), _to_torch_layout(rest[-1], row))
                   for i, row in enumerate(value)]
        else:
            out = [(f"{prefix}.{suffix}", path, _to_torch_layout(rest[-1], value))]
        if any(m2d_torch.torch_name_to_path(name) != (tree, expected) for name, expected, _ in out):
            return None  # e.g. a sub-module the official blocks do not have
        return [(name, converted) for name, _, converted in out]
    return None


def _to_torch_layout(leaf_name: str, value: np.ndarray) -> np.ndarray:
    """m2d_torch._to_flax_layout reversed, as a float32 C-contiguous copy."""
    if leaf_name == "kernel":
        # conv [h, w, in, out] → [out, in, h, w]; Linear [in, out] → [out, in]
        value = np.transpose(value, (3, 2, 0, 1)) if value.ndim == 4 else value.T
    return np.ascontiguousarray(value, dtype=np.float32)


def _pos_table(grid_size: tuple[int, int], width: int, *, cls_token: bool) -> np.ndarray:
    """[1, (1 +) F·T', width] float32: the fixed table the model adds (m2d_torch.check_pos_table accepts it)."""
    return np.ascontiguousarray(sincos_2d(*grid_size, width, cls_token=cls_token)[None])


def _order_key(name: str) -> tuple[int, int, int, bool]:
    top, _, rest = name.partition(".")
    index, _, in_block = rest.partition(".")
    is_bias = name.endswith(".bias")
    if not index.isdigit():
        return _ORDER.index(top), -1, -1, is_bias
    return _ORDER.index(top), int(index), _BLOCK_ORDER.index(in_block.rpartition(".")[0]), is_bias
