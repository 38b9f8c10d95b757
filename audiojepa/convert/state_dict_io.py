"""Reading a PyTorch-world state dict into {name: np.ndarray}: `.npz`, `.safetensors` (no torch needed), or
`.pth`/`.pt` (the optional torch extra, imported only here and only for those files)."""

import argparse

import numpy as np


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """{name: array} of `path`. A `.pth` training checkpoint keeps its state dict under "model" (MAE-style
    checkpoints), loaded with weights_only=True (plus argparse.Namespace, which those checkpoints also hold)."""
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
            raise ValueError(f"{path}: reading .pth files needs the optional torch extra (pip install -e '.[torch]'), "
                             "or save it as .npz / .safetensors elsewhere") from None
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
        return {k: v.detach().cpu().float().numpy() if v.dtype.is_floating_point else v.detach().cpu().numpy()
                for k, v in state.items()}
    raise ValueError(f"{path}: not a state dict this code reads (.npz, .safetensors, .pth, .pt)")
