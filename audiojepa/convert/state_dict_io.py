"""Reading a PyTorch-world state dict into a flat {name: np.ndarray}: `.npz`, `.safetensors` (no torch needed), or
`.pth`/`.pt` (the optional torch extra, imported only here and only for those files)."""

import argparse
from collections.abc import Mapping

import numpy as np

# Training checkpoints keep the state dict under one of these keys: "model" (MAE-style, M2D, fairseq/MATPAC),
# "state_dict" (PyTorch Lightning, EncodecMAE's released files).
WRAPPER_KEYS = ("model", "state_dict")


def flatten(state_dict: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """{dotted name: array}: nested dicts (fairseq's `_ema`, `_cls_head_ema`) become `_ema.blocks.0…` names."""
    out = {}
    for name, value in state_dict.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = np.asarray(value)
    return out


def nested_leaves(tree, prefix: tuple[str, ...] = ()):
    """(path, leaf) of every leaf of a nested mapping (a param tree), depth first, in insertion order: the
    walk the exporters (m2d_export, encodecmae_export) rename from."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from nested_leaves(value, prefix + (str(key),))
        else:
            yield prefix + (str(key),), value


def listed(names, limit: int = 20) -> str:
    """The first `limit` of `names`, comma-separated, then "… (N in all)" when there are more: the exporters'
    errors about params that have no name in the reference layout."""
    names = list(names)
    text = ", ".join(names[:limit])
    return text + (f", … ({len(names)} in all)" if len(names) > limit else "")


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """{name: array} of `path`. A `.pth`/`.pt` is loaded with weights_only=True (plus argparse.Namespace, which
    MAE-style checkpoints hold); the state dict under a WRAPPER_KEYS key when there is one, nested dicts flattened,
    non-tensor entries (step counters, configs) left out, floating tensors as float32."""
    if path.endswith(".npz"):
        with np.load(path) as data:
            return {k: data[k] for k in data.files}
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return load_file(path)
    if path.endswith((".pth", ".pt")):
        try:
            import torch
        except ImportError:
            raise ValueError(f"{path}: reading .pth/.pt files needs the optional torch extra "
                             "(pip install -e '.[torch]'), or save it as .npz / .safetensors elsewhere") from None
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        for key in WRAPPER_KEYS:
            if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
        if not isinstance(checkpoint, dict):
            raise ValueError(f"{path}: holds a {type(checkpoint).__name__}, not a state dict")

        def tensors(tree):
            return {k: tensors(v) if isinstance(v, dict) else
                    v.detach().cpu().float().numpy() if v.dtype.is_floating_point else v.detach().cpu().numpy()
                    for k, v in tree.items() if isinstance(v, (dict, torch.Tensor))}

        return flatten(tensors(checkpoint))
    raise ValueError(f"{path}: not a state dict this code reads (.npz, .safetensors, .pth, .pt)")
