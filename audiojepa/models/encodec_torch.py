"""EnCodec 24 kHz PyTorch state dicts (`encodec==0.1.1`) → params of `audiojepa.models.encodec`.

Input: `{name: array}` as `EncodecModel.state_dict()` names it, e.g. the released
`encodec_24khz-d7cc33bc.th` or the fixture `encodec24k_random_state.npz`. Only the encoder
(`encoder.model.*`) and the codebooks (`quantizer.vq.layers.{i}._codebook.embed`) are used; the decoder
and the codebooks' k-means/EMA buffers (`inited`, `cluster_size`, `embed_avg`) are ignored.

Layout changes:
- weight norm is resolved here: w = g · v / ‖v‖ with the norm over all dims but 0 (torch
  `weight_norm(dim=0)`); a plain `.weight` (already resolved) is also accepted;
- conv weight [out, in, kernel] → kernel [kernel, in, out];
- LSTM `weight_{ih,hh}_l{l}` [4·hidden, in] → `kernel_{ih,hh}` [in, 4·hidden] (gate order kept), biases as is;
- the codebooks are stacked into `codebooks` [n_q, 1024, 128].

The converted params are written by `save_params` (the `tools/convert_encodec.py` CLI) as
`params.msgpack` + `encodec.json`, and read back by `load_params`. No torch needed except to read
`.th`/`.pt` files.
"""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization, traverse_util

from audiojepa.models import encodec

PARAMS_FILE = "params.msgpack"
META_FILE = "encodec.json"
FORMAT_VERSION = 1
MODEL_NAME = "encodec_24khz"
TORCH_SUFFIXES = (".th", ".pt", ".pth")

_CONV_LEAF = r"\.conv\.conv\.(bias|weight|weight_g|weight_v)"
_CONV = re.compile(r"encoder\.model\.(\d+)" + _CONV_LEAF)
_RESBLOCK_CONV = re.compile(r"encoder\.model\.(\d+)\.(block\.1|block\.3|shortcut)" + _CONV_LEAF)
_LSTM = re.compile(r"encoder\.model\.(\d+)\.lstm\.(weight|bias)_(ih|hh)_l(\d+)")
_CODEBOOK = re.compile(r"quantizer\.vq\.layers\.(\d+)\._codebook\.embed")
_IGNORED = re.compile(r"decoder\..*|quantizer\.vq\.layers\.\d+\._codebook\.(inited|cluster_size|embed_avg)")


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a state dict: `.npz` (name → array, no torch needed) or a torch `.th`/`.pt`/`.pth` file.

    Torch files are read with `torch.load(path, map_location="cpu", weights_only=True)` (tensors only,
    no pickled code) and need the optional torch extra.

    Raises:
        ImportError: for a torch file when torch is not installed.
        ValueError: for another suffix, or a torch file that does not hold a flat name → tensor dict.
    """
    path = os.fspath(path)
    if path.endswith(".npz"):
        with np.load(path) as data:
            return {name: data[name] for name in data.files}
    if not path.endswith(TORCH_SUFFIXES):
        raise ValueError(f"{path}: unknown state-dict format; expected .npz or a torch file {TORCH_SUFFIXES}.")
    try:
        import torch
    except ImportError:
        raise ImportError(f"{path}: reading torch checkpoints needs the optional torch extra "
                          "(pip install -e '.[torch]'), or convert the state dict to .npz elsewhere.") from None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict (name → tensor) as saved by torch.save(model.state_dict()), "
                         f"got {type(state).__name__}.")
    return {name: value.detach().cpu().numpy() for name, value in state.items()}


def resolve_weight_norm(weight_g: np.ndarray, weight_v: np.ndarray) -> np.ndarray:
    """torch weight_norm(dim=0): g · v / ‖v‖, the norm over every axis but 0. → float32, shaped like v."""
    v = np.asarray(weight_v, np.float64)
    g = np.asarray(weight_g, np.float64).reshape((-1,) + (1,) * (v.ndim - 1))
    norm = np.sqrt(np.sum(v ** 2, axis=tuple(range(1, v.ndim)), keepdims=True))
    return (g * v / norm).astype(np.float32)


def expected_encoder_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
    """Param path → shape of `EncodecEncoder()` (traced abstractly; nothing is computed)."""
    abstract = jax.eval_shape(encodec.EncodecEncoder().init, jax.random.key(0),
                              jnp.zeros((1, encodec.HOP_LENGTH), jnp.float32))["params"]
    flat = traverse_util.flatten_dict(abstract)
    return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def _encoder_path(name: str) -> tuple[tuple[str, ...], str] | None:
    """(param path without the leaf, torch leaf name) of an encoder tensor, or None."""
    if match := _CONV.fullmatch(name):
        index, leaf = match.groups()
        return (f"conv_{index}",), leaf
    if match := _RESBLOCK_CONV.fullmatch(name):
        index, module, leaf = match.groups()
        return (f"resblock_{index}", module.replace(".", "_")), leaf
    if match := _LSTM.fullmatch(name):
        index, kind, gates, layer = match.groups()
        return (f"lstm_{index}", f"layer_{layer}"), f"{kind}_{gates}"
    return None


def convert(state_dict: dict[str, np.ndarray]) -> dict:
    """Converts an EnCodec 24 kHz state dict into {"encoder": EncodecEncoder params, "codebooks": [n_q, 1024, 128]}.

    Args:
        state_dict: torch name → array (numpy float32; anything np.asarray accepts).

    Returns:
        Nested dict of float32 numpy arrays; `encoder` goes to `EncodecEncoder().apply({"params": ...})`
        and `codebooks` to `rvq_encode` (see `audiojepa.models.encodec.encode`).

    Raises:
        KeyError: names the unexpected tensors (not encoder, codebook or ignored buffers), or the
            missing ones (encoder params, or codebooks that are not numbered 0..n−1).
        ValueError: a tensor whose shape does not match the 24 kHz encoder.
    """
    modules: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
    codebooks: dict[int, np.ndarray] = {}
    unexpected = []
    for name, value in state_dict.items():
        value = np.asarray(value)
        if match := _CODEBOOK.fullmatch(name):
            codebooks[int(match.group(1))] = value
        elif (where := _encoder_path(name)) is not None:
            modules.setdefault(where[0], {})[where[1]] = value
        elif not _IGNORED.fullmatch(name):
            unexpected.append(name)
    if unexpected:
        raise KeyError(f"Unexpected EnCodec state-dict entries: {sorted(unexpected)}. Known: encoder.model.* "
                       "(convs, residual blocks, LSTM), quantizer.vq.layers.{i}._codebook.embed; ignored: decoder.*, "
                       "codebook buffers inited / cluster_size / embed_avg.")

    params: dict[tuple[str, ...], np.ndarray] = {}
    for module, tensors in modules.items():
        if module[0].startswith("lstm_"):
            for kind in ("ih", "hh"):
                if f"weight_{kind}" in tensors:
                    params[module + (f"kernel_{kind}",)] = tensors[f"weight_{kind}"].T
                if f"bias_{kind}" in tensors:
                    params[module + (f"bias_{kind}",)] = tensors[f"bias_{kind}"]
            continue
        if "bias" in tensors:
            params[module + ("bias",)] = tensors["bias"]
        if "weight_g" in tensors and "weight_v" in tensors:
            weight = resolve_weight_norm(tensors["weight_g"], tensors["weight_v"])
        else:
            weight = tensors.get("weight")
        if weight is not None:
            params[module + ("kernel",)] = np.transpose(weight, (2, 1, 0))

    expected = expected_encoder_shapes()
    missing = [torch_name(path) for path in expected if path not in params]
    if missing:
        raise KeyError(f"Missing EnCodec encoder tensors: {missing}. Is this the 24 kHz model's full state dict "
                       "(keys start with 'encoder.model.')?")
    extra = [torch_name(path) for path in params if path not in expected]
    if extra:
        raise KeyError(f"Unexpected EnCodec encoder tensors (not in the 24 kHz encoder): {extra}.")
    for path, shape in expected.items():
        if params[path].shape != shape:
            raise ValueError(f"{torch_name(path)}: shape {params[path].shape} after conversion, the 24 kHz encoder "
                             f"expects {shape} at {'/'.join(path)}.")

    if not codebooks:
        raise KeyError("Missing EnCodec codebooks: no quantizer.vq.layers.{i}._codebook.embed entries.")
    missing_codebooks = sorted(set(range(max(codebooks) + 1)) - set(codebooks))
    if missing_codebooks:
        names = [f"quantizer.vq.layers.{i}._codebook.embed" for i in missing_codebooks]
        raise KeyError(f"Missing EnCodec codebooks: {names}.")
    stacked = np.stack([np.asarray(codebooks[i], np.float32) for i in range(len(codebooks))])
    if stacked.shape[1:] != (encodec.CODEBOOK_SIZE, encodec.DIMENSION):
        raise ValueError(f"quantizer.vq.layers.*._codebook.embed: shape {stacked.shape[1:]}, expected "
                         f"{(encodec.CODEBOOK_SIZE, encodec.DIMENSION)}.")
    encoder = traverse_util.unflatten_dict({k: np.ascontiguousarray(v, np.float32) for k, v in params.items()})
    return {"encoder": encoder, "codebooks": stacked}


def torch_name(path: tuple[str, ...]) -> str:
    """The torch name(s) a param path comes from, for error messages."""
    module, *rest = path
    index = module.rsplit("_", 1)[1]
    if module.startswith("lstm_"):
        layer, leaf = rest
        kind, gates = leaf.split("_")
        return f"encoder.model.{index}.lstm.{'weight' if kind == 'kernel' else 'bias'}_{gates}_l{layer.split('_')[1]}"
    *sub, leaf = rest
    torch_leaf = "weight_g/weight_v" if leaf == "kernel" else leaf
    sub_module = "".join(f"{s.replace('_', '.')}." for s in sub)
    return f"encoder.model.{index}.{sub_module}conv.conv.{torch_leaf}"


def save_params(params: dict, output_dir: str, *, source: str = "") -> str:
    """Writes `params.msgpack` (flax msgpack of `params`) and `encodec.json` into `output_dir`; returns it."""
    os.makedirs(output_dir, exist_ok=True)
    params = jax.tree.map(np.asarray, params)
    meta = {
        "format_version": FORMAT_VERSION,
        "model": MODEL_NAME,
        "source": os.fspath(source),
        "sample_rate": encodec.SAMPLE_RATE,
        "hop_length": encodec.HOP_LENGTH,
        "frame_rate": encodec.FRAME_RATE,
        "dimension": encodec.DIMENSION,
        "num_codebooks": int(params["codebooks"].shape[0]),
        "codebook_size": int(params["codebooks"].shape[1]),
        "encoder_param_count": int(sum(x.size for x in jax.tree.leaves(params["encoder"]))),
        "params_file": PARAMS_FILE,
    }
    with open(os.path.join(output_dir, PARAMS_FILE), "wb") as f:
        f.write(serialization.msgpack_serialize(params))
    with open(os.path.join(output_dir, META_FILE), "w") as f:
        json.dump(meta, f, indent=1)
    return output_dir


def load_params(path: str) -> dict:
    """Reads a folder written by `save_params` → {"encoder": ..., "codebooks": [n_q, 1024, 128]} (numpy)."""
    meta_path = os.path.join(path, META_FILE)
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{path}: no {META_FILE}; write one with tools/convert_encodec.py.")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION or meta.get("model") != MODEL_NAME:
        raise ValueError(f"{meta_path}: format_version {meta.get('format_version')!r} / model {meta.get('model')!r}; "
                         f"this code reads {FORMAT_VERSION} / {MODEL_NAME!r}.")
    with open(os.path.join(path, PARAMS_FILE), "rb") as f:
        params = serialization.msgpack_restore(f.read())
    if params["codebooks"].shape[0] != meta["num_codebooks"]:
        raise ValueError(f"{path}: {PARAMS_FILE} holds {params['codebooks'].shape[0]} codebooks, {META_FILE} says "
                         f"{meta['num_codebooks']}.")
    return params
