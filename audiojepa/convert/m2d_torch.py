"""Official M2D (`M2DViT`, timm blocks) state dicts → audiojepa M2D param trees. No torch needed.

Takes `{name: np.ndarray}` as `model.state_dict()` names it (a full checkpoint keeps it under
ckpt["model"]). Layout changes: Linear weight [out, in] → kernel [in, out]; the patch conv OIHW →
HWIO; qkv needs no split because our fused qkv kernel is the transpose of torch's [q; k; v] rows.
The frozen position tables are not parameters here: they are checked against `sincos_2d` when
`grid_size` is given, and otherwise ignored; `norm_stats` belongs to the front end and is ignored.
Per-block tensors (`blocks.<i>.…`) land stacked in the TransformerStack layout: `blocks.3.attn.qkv.weight`
is row 3 of `stack/blocks/attn/qkv/kernel [depth, in, out]`.
"""

import re

import numpy as np

from audiojepa.models.pos_embed import sincos_2d
from audiojepa.models.vit import STACKED_BLOCKS, stack_all_blocks

# torch module prefix → (tree, path prefix). "params" paths start with encoder / predictor.
_PREFIXES = (
    (r"patch_embed\.proj", ("params", ("encoder", "patch_embed", "proj"))),
    (r"blocks\.(\d+)", ("params", ("encoder", "stack", "blocks_{}"))),
    (r"norm", ("params", ("encoder", "stack", "norm"))),
    (r"decoder_embed", ("params", ("predictor", "embed"))),
    (r"decoder_blocks\.(\d+)", ("params", ("predictor", "stack", "blocks_{}"))),
    (r"decoder_norm", ("params", ("predictor", "stack", "norm"))),
    (r"decoder_pred", ("params", ("predictor", "head"))),
    (r"target_blocks\.(\d+)", ("target_params", ("blocks_{}",))),
    (r"target_norm", ("target_params", ("norm",))),
)
_TOKENS = {"cls_token": ("params", ("encoder", "cls_token")),
           "mask_token": ("params", ("predictor", "mask_token"))}
# Inside a block: torch sub-module path → ours (identical apart from the leaf names below).
_BLOCK_MODULES = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
POS_TABLES = ("pos_embed", "decoder_pos_embed")
IGNORED = ("norm_stats",)


def torch_name_to_path(name: str) -> tuple[str, tuple[str | int, ...]] | None:
    """("params" | "target_params", path in that tree) of a trainable/EMA torch tensor, or None.

    A block tensor's path ends with its block index, the row of the stacked leaf it fills:
    "blocks.3.attn.qkv.weight" → ("params", ("encoder", "stack", "blocks", "attn", "qkv", "kernel", 3)).
    """
    where = _per_block_path(name)
    if where is None:
        return None
    tree, path = where
    for i, key in enumerate(path):
        if key.startswith("blocks_"):
            return tree, path[:i] + (STACKED_BLOCKS,) + path[i + 1:] + (int(key[len("blocks_"):]),)
    return tree, path


def convert_tensor(name: str, value) -> tuple[str, tuple[str | int, ...], np.ndarray]:
    """One torch tensor → (tree, path as torch_name_to_path, value in our layout); for a block tensor,
    the value of one row of the stacked leaf. Raises ValueError on a name this converter does not know."""
    where = torch_name_to_path(name)
    if where is None:
        raise ValueError(f"Unrecognised M2D state-dict entry {name!r}.")
    tree, path = where
    leaf = path[-2] if isinstance(path[-1], int) else path[-1]
    return tree, path, _to_flax_layout(leaf, np.asarray(value))


def _per_block_path(name: str) -> tuple[str, tuple[str, ...]] | None:
    """Like torch_name_to_path, with blocks as per-block subtrees "blocks_<i>"."""
    if name in _TOKENS:
        return _TOKENS[name]
    for prefix, (tree, path) in _PREFIXES:
        match = re.fullmatch(prefix + r"\.(.+)", name)
        if not match:
            continue
        *index, rest = match.groups()
        path = tuple(p.format(*index) for p in path)
        module, _, leaf = rest.rpartition(".")
        if module and not (index and module in _BLOCK_MODULES):
            return None
        is_norm = "norm" in (module or prefix)
        if leaf == "weight":
            leaf = "scale" if is_norm else "kernel"
        elif leaf != "bias":
            return None
        return tree, path + tuple(module.split(".") if module else ()) + (leaf,)
    return None


def _to_flax_layout(leaf_name: str, value: np.ndarray) -> np.ndarray:
    if leaf_name != "kernel":
        return value
    if value.ndim == 4:  # conv [out, in, h, w] → [h, w, in, out]
        return np.transpose(value, (2, 3, 1, 0))
    return value.T  # Linear [out, in] → [in, out]


def _set(tree: dict, path: tuple[str, ...], value: np.ndarray) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    if path[-1] in tree:
        raise ValueError(f"Two state-dict entries map to {'/'.join(path)}.")
    tree[path[-1]] = value


def check_pos_table(name: str, table: np.ndarray, grid_size: tuple[int, int], atol: float = 1e-5) -> None:
    """Raises ValueError unless `table` [1, 1 + F·T', D] equals sincos_2d(F, T', D) with a CLS row."""
    table = np.asarray(table).reshape(-1, np.asarray(table).shape[-1])
    expected = sincos_2d(*grid_size, table.shape[-1], cls_token=True)
    if table.shape != expected.shape or not np.allclose(table, expected, atol=atol):
        raise ValueError(f"{name} {table.shape} is not the 2-D sin-cos table of grid {tuple(grid_size)} "
                         f"(expected {expected.shape}); check the input size and patch size of the checkpoint.")


def state_dict_to_params(state_dict: dict[str, np.ndarray], *,
                         grid_size: tuple[int, int] | None = None) -> tuple[dict, dict | None]:
    """Converts an official M2DViT (or encoder-only M2DEncoderViT) state dict.

    Args:
        state_dict: torch name → array (float32 numpy; anything np.asarray accepts).
        grid_size: (F, T') patch grid, e.g. (5, 38) for 80×608 with 16×16 patches; when given, the
            stored position tables must equal ours.

    Returns:
        (params, target_params) as numpy arrays in the trees of audiojepa.methods.m2d.M2D.
        params holds "encoder" and, if the dict has a decoder, "predictor"; target_params is None when
        the dict has no target_blocks (encoder-only checkpoints). A partial dict (e.g. gradients) gives
        partial trees, but a stack's blocks must all be there (they are stored as one stacked tree);
        convert_tensor converts a single tensor.

    Raises:
        ValueError: on names this converter does not know (listed), a position table mismatch, or a
            stack whose blocks are not 0 … n-1 with the same tensors each.
    """
    trees: dict[str, dict] = {"params": {}, "target_params": {}}
    unknown = []
    for name, value in state_dict.items():
        value = np.asarray(value)
        if name in POS_TABLES:
            if grid_size is not None:
                check_pos_table(name, value, grid_size)
            continue
        if name in IGNORED:
            continue
        where = _per_block_path(name)
        if where is None:
            unknown.append(name)
            continue
        tree, path = where
        _set(trees[tree], path, _to_flax_layout(path[-1], value))
    if unknown:
        raise ValueError(f"Unrecognised M2D state-dict entries: {unknown}. Known: patch_embed, cls_token, "
                         f"blocks, norm, decoder_*, mask_token, target_*, {POS_TABLES + IGNORED}.")
    return stack_all_blocks(trees["params"]), stack_all_blocks(trees["target_params"]) or None


# -- reading an official checkpoint's layout (tools/convert_m2d.py) -------------------------------------

# The state-dict entries an encoder export needs; the rest (the predictor, the EMA target, M2D-X's
# offline predictor, fine-tuning heads) is left out with a log line.
ENCODER_ENTRIES = ("patch_embed", "cls_token", "pos_embed", "blocks", "norm", "norm_stats")


# Tensors every M2D checkpoint has and the export reads first (size, patch and position-table shapes).
REQUIRED_ENTRIES = ("cls_token", "pos_embed", "patch_embed.proj.weight")
DATA_PARALLEL_PREFIX = "module."


def check_state_dict(state_dict: dict, *, source: str) -> dict:
    """`state_dict` made ready for conversion, or a ValueError naming `source` (the file) and what is wrong.

    A `module.` prefix on every name (a checkpoint saved from torch's DataParallel/DDP wrapper) is removed.
    Then: the REQUIRED_ENTRIES and at least one `blocks.<i>` tensor must be there (a foreign file, e.g. another
    model's, names the missing tensors); every ENCODER_ENTRIES tensor must be finite (NaN/Inf weights would be
    exported and give NaN embeddings: the error names the tensor); a `norm_stats` entry must be (mean, std)
    with a finite mean and std > 0. Entries the export leaves out (predictor, EMA target) are not checked.
    """
    if state_dict and all(k.startswith(DATA_PARALLEL_PREFIX) for k in state_dict):
        state_dict = {k[len(DATA_PARALLEL_PREFIX):]: v for k, v in state_dict.items()}
    missing = [k for k in REQUIRED_ENTRIES if k not in state_dict]
    if not any(k.startswith("blocks.") for k in state_dict):
        missing.append("blocks.<i>.*")
    if missing:
        names = sorted(state_dict)
        raise ValueError(f"{source}: no {', '.join(missing)} tensor(s): not an M2D (M2DViT) state dict? It has "
                         f"{len(names)} entries, e.g. {names[:5]}")
    kept, _ = encoder_entries(state_dict)
    for name, value in sorted(kept.items()):
        value = np.asarray(value)
        if name == "norm_stats" or value.dtype.kind not in "fc":
            continue
        bad = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
        if bad:
            raise ValueError(f"{source}: tensor {name} {tuple(value.shape)} has {bad} NaN/Inf value(s); a diverged "
                             "or damaged checkpoint would export an encoder whose embeddings are NaN")
    if "norm_stats" in state_dict:
        from audiojepa.data import stats

        values = np.asarray(state_dict["norm_stats"], np.float64).ravel()
        if values.size != 2:
            raise ValueError(f"{source}: norm_stats has {values.size} values {values.tolist()[:8]}; expected "
                             "(mean, std) of the log-mel values")
        stats.check_norm_stats(*values, where=f"{source}: norm_stats")
    return state_dict


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


def model_config_for(state_dict: dict[str, np.ndarray], n_mels: int, input_frames: int | None = None,
                     num_heads: int | None = None):
    """(M2D model config, input_shape) inferred from tensor shapes; `input_frames` (checked against the
    position table) when the training width is not whole patches.

    Width, depth and MLP size come from the tensors: a named variant when they (and `num_heads`, if given)
    are one, else config.model.width/depth/num_heads/mlp_dim. The heads cannot be read from the tensors:
    `num_heads`, default width / 64 (vit.model_size). ValueError when the sizes do not make a model."""
    from audiojepa.methods import m2d
    from audiojepa.models import VARIANTS
    from audiojepa.models.vit import model_size

    width = int(state_dict["cls_token"].shape[-1])
    depth = len({k.split(".")[1] for k in state_dict if k.startswith("blocks.")})
    mlp_dim = int(state_dict["blocks.0.mlp.fc1.weight"].shape[0]) if "blocks.0.mlp.fc1.weight" in state_dict else 4 * width
    size = dict(width=width, depth=depth, mlp_dim=mlp_dim)
    variant = next((name for name, v in VARIANTS.items() if all(v[k] == size[k] for k in size)
                    and num_heads in (None, v["num_heads"])), None)
    config = m2d.default_config(variant or "B")
    if variant is None:
        config.update(size, num_heads=num_heads)
        model_size(config)  # raises, naming the key, for heads that do not divide the width
    patch_f, patch_t = state_dict["patch_embed.proj.weight"].shape[2:]
    num_patches = state_dict["pos_embed"].shape[1] - 1
    grid_f = n_mels // patch_f
    config.patch_size = (int(patch_f), int(patch_t))
    if "decoder_embed.weight" in state_dict:
        config.predictor_width = int(state_dict["decoder_embed.weight"].shape[0])
        config.predictor_depth = len({k.split(".")[1] for k in state_dict if k.startswith("decoder_blocks.")})
    grid_t = num_patches // grid_f
    if input_frames is None:
        return config, (n_mels, grid_t * int(patch_t))
    if input_frames // int(patch_t) != grid_t:
        raise ValueError(f"--input_frames={input_frames} gives {input_frames // int(patch_t)} time patches; the "
                             f"checkpoint's position table has {grid_t}")
    return config, (n_mels, int(input_frames))
