"""A run's first state from weights (`config.init_from`): an encoder export, a training workdir, or a state dict
in the official M2D names (`.npz`, `.safetensors` from tools/export_torch.py, or `.pth` with the torch extra).

The source is read into param trees ("params", and "target_params" when it has an EMA target); each leaf of a
freshly initialised state whose path is in the source takes the source's value (same shape, or a ValueError
naming the tensor); every other leaf keeps the method's init. Without a target in the source, the target is the
method's own init from the loaded params (`method.init_target`: M2D's copy or fresh stack, JEPA's copy of the
encoder); methods without `init_target` (EncodecMAE, whose target is frozen EnCodec) keep theirs. The optimizer
state starts fresh. A resumed run never reads init_from: its checkpoint is the state (train.py logs that).

    python -m audiojepa.main --config=configs/m2d.py --workdir=/ckpt/m2d_continued \
        --config.init_from=/weights/m2d_vit_base-80x608p16x16/checkpoint-300.pth
"""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np

STATE_DICT_SUFFIXES = (".npz", ".safetensors", ".pth", ".pt")


@dataclasses.dataclass
class Report:
    """What a merge did, as "/"-joined param paths."""
    loaded: list[str] = dataclasses.field(default_factory=list)
    kept: list[str] = dataclasses.field(default_factory=list)  # not in the source: the method's init
    unused: list[str] = dataclasses.field(default_factory=list)  # in the source, not in this model
    target: str = ""  # where the EMA target came from

    def describe(self) -> str:
        def some(paths):
            return ", ".join(paths[:8]) + (f", ... ({len(paths)} in all)" if len(paths) > 8 else "")
        lines = [f"loaded {len(self.loaded)} tensors ({some(_top_levels(self.loaded))})",
                 f"target: {self.target}"]
        if self.kept:
            lines.append(f"kept the method's init for {len(self.kept)} (not in the source): {some(self.kept)}")
        if self.unused:
            lines.append(f"not used, no such tensor in this model: {some(self.unused)}")
        return "; ".join(lines)


def _top_levels(paths: list[str]) -> list[str]:
    return sorted({"/".join(p.split("/")[:2]) for p in paths})


def _path(key_path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in key_path)


def _flatten(tree) -> dict[str, object]:
    return {_path(p): leaf for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def merge(fresh, loaded, *, source: str, prefix: str = ""):
    """(fresh with the leaves of `loaded` at the same paths, Report). Raises ValueError naming `source` and the
    tensor when shapes differ, or when no leaf of `loaded` is a leaf of `fresh`."""
    loaded_flat = {prefix + k: v for k, v in _flatten(loaded).items()}
    report = Report()

    def take(key_path, leaf):
        name = prefix + _path(key_path)
        if name not in loaded_flat:
            report.kept.append(name)
            return leaf
        value = np.asarray(loaded_flat[name])
        if value.shape != tuple(leaf.shape):
            raise ValueError(f"{source}: {name} has shape {value.shape} there, {tuple(leaf.shape)} in this model; "
                             "set the model size to the source's (config.model.variant, or config.model.width/"
                             "depth/num_heads/mlp_dim and the predictor_* keys)")
        report.loaded.append(name)
        return value.astype(leaf.dtype)

    merged = jax.tree_util.tree_map_with_path(take, fresh)
    fresh_names = {prefix + k for k in _flatten(fresh)}
    report.unused = sorted(set(loaded_flat) - fresh_names)
    if not report.loaded:
        raise ValueError(f"{source}: none of its {len(loaded_flat)} tensors match this model "
                         f"(e.g. {sorted(loaded_flat)[:4]}; this model's: {sorted(fresh_names)[:4]})")
    return merged, report


def read_source(path: str, *, source: str) -> tuple[dict, dict | None, list[str]]:
    """(params, target_params or None, names it holds that this code cannot place) as trees of numpy arrays, from
    an export folder, a training workdir or a state-dict file in the official M2D names (STATE_DICT_SUFFIXES)."""
    from audiojepa.adapters import encoder as encoder_lib
    from audiojepa.convert import m2d_torch, state_dict_io

    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, encoder_lib.CHECKPOINTS_DIR)) and not os.path.exists(
                os.path.join(path, encoder_lib.ENCODER_JSON)):
            _, state, _ = encoder_lib.restore_train_state(path)
            to_numpy = lambda tree: jax.tree.map(np.asarray, tree)
            return to_numpy(state["params"]), to_numpy(state["target_params"]), []
        if os.path.exists(os.path.join(path, encoder_lib.ENCODER_JSON)):
            return {"encoder": jax.tree.map(np.asarray, encoder_lib.load_encoder(path).params["encoder"])}, None, []
    if os.path.isfile(path) and path.endswith(STATE_DICT_SUFFIXES):
        state_dict = state_dict_io.read_state_dict(path)
        if state_dict and all(k.startswith(m2d_torch.DATA_PARALLEL_PREFIX) for k in state_dict):
            state_dict = {k[len(m2d_torch.DATA_PARALLEL_PREFIX):]: v for k, v in state_dict.items()}
        known = {k: v for k, v in state_dict.items()
                 if m2d_torch.torch_name_to_path(k) is not None or k in m2d_torch.POS_TABLES + m2d_torch.IGNORED}
        if not known:
            raise ValueError(f"{source}: no tensor in the official M2D names (e.g. blocks.0.attn.qkv.weight); "
                             f"it has {len(state_dict)}, e.g. {sorted(state_dict)[:5]}")
        params, target = m2d_torch.state_dict_to_params(known)
        return params, target, sorted(set(state_dict) - set(known))
    raise FileNotFoundError(f"{source}: not an encoder export (encoder.json), a training workdir (checkpoints/) "
                            f"or a state dict ({', '.join(STATE_DICT_SUFFIXES)})")


def place(method, params, target_params, loaded_params: dict, loaded_target: dict | None, rng, *, source: str,
          unplaced: list[str] = ()):
    """(params, target_params, Report): the loaded trees merged into the method's fresh ones (module docstring);
    `unplaced`: the source's names read_source could not place, reported as unused."""
    params, report = merge(params, loaded_params, source=source)
    report.unused = sorted(report.unused + list(unplaced))
    if loaded_target is not None:
        target_params, target_report = merge(target_params, loaded_target, source=source, prefix="target/")
        report.loaded += target_report.loaded
        report.kept += target_report.kept
        report.unused += target_report.unused
        report.target = "loaded" + (f", {len(target_report.kept)} tensors kept from init" if target_report.kept
                                    else "")
    elif hasattr(method, "init_target"):
        target_params = method.init_target(rng, params)
        report.target = "the method's init from the loaded params (the source has none)"
    else:
        report.target = "the method's init (the source has none; this method's target does not follow the params)"
    return params, target_params, report


def initialize(path: str, method, params, target_params, rng):
    """(params, target_params, Report) of a run that starts from `path` (config.init_from)."""
    source = f"config.init_from={path}"
    loaded_params, loaded_target, unplaced = read_source(path, source=source)
    return place(method, params, target_params, loaded_params, loaded_target, rng, source=source, unplaced=unplaced)
