"""audiojepa EncodecMAE params → reference (habla-liaa/encodecmae v1) state dicts: the inverse of encodecmae_torch.

`params_to_state_dict` gives `{reference name: np.ndarray}` (float32, C-contiguous) in the names of v1's Lightning
module (`EncodecMAE.state_dict()`), which `encodecmae_torch.state_dict_to_params` (tools/convert_encodecmae.py)
turns back into the same params. encodecmae_torch's table and layout changes, reversed:

| ours                                               | reference name (v1)                                    |
|----------------------------------------------------|--------------------------------------------------------|
| input_proj/{kernel,bias}                            | feat_projector.{weight,bias} (transposed)              |
| encoder_positions/scale                             | positional_encoder.scale (v1 has one scale for both stacks) |
| encoder/layers_<i>/attn/{query,key,value,out}/kernel | visible_encoder.encoder_layers.<i>.att_layer.w{q,k,v,o}.weight |
| encoder/layers_<i>/norm{1,2}/{scale,bias}           | visible_encoder.encoder_layers.<i>.norm{1,2}.{weight,bias} |
| encoder/ffn/fc{1,2} (share_ffn) or layers_<i>/ffn   | visible_encoder.encoder_layers.<i>.ff_layer.{0,2}.{weight,bias}, the shared FFN under every layer |
| encoder/final_norm/{scale,bias}                     | visible_encoder.final_norm.{weight,bias}               |
| decoder_proj, decoder (as the encoder)              | decoder_projector.*, decoder.*                         |
| decoder_positions/scale                             | none of its own: it must equal encoder_positions/scale |
| head, kmeans_head                                   | head.layer.*, extra_head.layer.*                       |
| EnCodec encoder                                     | wav_encoder.model.model.<i>.… (weight-normed convs, LSTM) |
| EnCodec codebooks [n_q, 1024, 128]                  | target_encoder.model.vq.layers.<q>._codebook.embed     |

Layout changes: kernel [in, out] → Linear weight [out, in]; attention heads back to the reference's interleaved
order (row d·H + h of w{q,k,v} and column d·H + h of wo are head h's channel d; ours are contiguous, h·d + d);
EnCodec conv kernel [k, in, out] → weight [out, in, k], split as weight norm (`split_weight_norm`); LSTM kernel
[in, 4·hidden] → weight [4·hidden, in].

Every leaf comes back bit for bit through encodecmae_torch except the EnCodec conv kernels: weight norm stores
w as (g, v) with w = g·v/‖v‖, and g is rounded to float32, so the kernel that comes back may differ from the
exported one by 1 unit in the last place (as torch's own float32 weight norm rounds; the reference's released
EnCodec is weight-normed, so a plain `weight` would not load into it). Only the codebooks the run uses (n_q of the
reference RVQ's 32) and no codebook training buffers (`inited`, `cluster_size`, `embed_avg`) are written: they are
not params here, and encodecmae_torch ignores them.

A leaf with no reference name (a learned `mask_token`, a decoder position scale that differs from the encoder's,
the self-training teacher and centroids, a "pre_ln" stack) is a ValueError listing them all: nothing is dropped
silently. `encoder_only=True` reads the encoder (`methods.encodecmae.TEACHER_KEYS`) and the EnCodec copy alone.
"""

import re
from collections.abc import Mapping

import numpy as np

from audiojepa.convert import encodecmae_torch, state_dict_io
from audiojepa.models import encodec_torch
from audiojepa.models import encodecmae as mae

# encodecmae_torch's tables, reversed: one source for the names.
_LINEARS_TO_REF = {ours: ref for ref, ours in encodecmae_torch.LINEARS.items()}
_STACKS_TO_REF = {ours: ref for ref, ours in encodecmae_torch.STACKS.items()}
_ATTN_TO_REF = {ours: ref for ref, ours in encodecmae_torch.ATTN.items()}
_FFN_TO_REF = {ours: index for index, ours in encodecmae_torch.FFN.items()}
_ENCODEC_PREFIXES = {ours: ref for ref, ours in encodecmae_torch.ENCODEC_PREFIXES.items()}
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_LAYER = re.compile(r"layers_(\d+)")
# v1 EncodecMAE.__init__'s module order, then a module's own order (only cosmetic: a .pth keeps it; safetensors
# sorts the names).
_ORDER = ("wav_encoder", "target_encoder", "visible_encoder", "feat_projector", "decoder_projector",
          "positional_encoder", "head", "decoder", "extra_head")
_TOKEN_ORDER = {"wq": 0, "wk": 1, "wv": 2, "wo": 3, "weight": 0, "bias": 1, "weight_g": 2, "weight_v": 3}
_LSTM_LEAF = re.compile(r"(weight_ih|weight_hh|bias_ih|bias_hh)_l(\d+)")


def params_to_state_dict(params: Mapping, target_params: Mapping | None = None, *, model_config,
                         encoder_only: bool = False) -> dict[str, np.ndarray]:
    """The reference v1 state dict of EncodecMAE params (numpy or jax leaves).

    Args:
        params: EncodecMAEModel params (a training state's), or an encoder export's
            {"input_proj", "encoder_positions", "encoder", "encodec"} (`methods.encodecmae.encoder_params`).
        target_params: EncodecMAE's frozen trees {"encodec", ["teacher", "centroids"]}, or None.
        model_config: the run's `config.model` (its size gives the attention heads; stack_type must be "residual").
        encoder_only: write the encoder alone: feat_projector, positional_encoder, visible_encoder and the EnCodec
            copy (wav_encoder and the target_encoder codebooks, as encodecmae_torch.encoder_entries keeps).

    The EnCodec copy {"encoder", "codebooks"} is params["encodec"] or target_params["encodec"] (exactly one).

    Returns:
        {reference name: float32 C-contiguous array}, in v1's module order. A shared FFN is one array under every
        layer's name, as the reference's state dict repeats its one module.

    Raises:
        ValueError: listing every leaf (as "params/mask_token [64]") with no reference name; also for a stack_type
            other than "residual", params without the encoder, or no (or two) EnCodec copies.
    """
    stack_type = model_config.get("stack_type", "residual")
    if stack_type != "residual":
        raise ValueError(f"config.model.stack_type={stack_type!r}: the reference v1 stack is ResiDual (its "
                         "norm_type default, every released model), which is stack_type='residual' here; a "
                         "'pre_ln' stack has no reference names")
    # Imported here: the method module imports this package (audiojepa.models.encodec_torch).
    from audiojepa.methods.encodecmae import TEACHER_KEYS

    missing = [key for key in TEACHER_KEYS if key not in params]
    if missing:
        raise ValueError(f"params lack {missing} (they have {sorted(params)}); expected EncodecMAEModel params or "
                         f"an encoder export's {list(TEACHER_KEYS) + ['encodec']}")
    encodec_copies = [(tree, root["encodec"]) for tree, root in (("params", params), ("target_params", target_params))
                      if root is not None and "encodec" in root]
    if len(encodec_copies) != 1:
        raise ValueError(f"{len(encodec_copies)} EnCodec copies (params['encodec'], target_params['encodec']); "
                         "expected one: the reference's encoder runs on EnCodec frames (wav_encoder) and its targets "
                         "come from the codebooks (target_encoder)")
    num_heads = mae.decode_variant(model_config["size"])["num_heads"]

    model = {key: params[key] for key in (TEACHER_KEYS if encoder_only else params) if key != "encodec"}
    state_dict: dict[str, np.ndarray] = {}
    unknown = []
    for path, leaf in state_dict_io.nested_leaves(model):
        converted = _mae_tensors(path, np.asarray(leaf), model, num_heads)
        if converted is None:
            unknown.append(_describe_leaf("params", path, leaf, model))
            continue
        _add(state_dict, converted, f"params/{'/'.join(path)}")
    encodec_tree, encodec_params = encodec_copies[0]
    converted, encodec_unknown = encodec_to_state_dict(encodec_params)
    _add(state_dict, ((_ENCODEC_PREFIXES[name.split(".")[0] + "."] + name.split(".", 1)[1], value)
                      for name, value in converted.items()), f"{encodec_tree}/encodec")
    unknown += [f"{encodec_tree}/encodec/{leaf}" for leaf in encodec_unknown]
    if not encoder_only and target_params is not None:
        others = {key: value for key, value in target_params.items() if key != "encodec"}
        unknown += [_describe_leaf("target_params", path, leaf, others) for path, leaf in state_dict_io.nested_leaves(others)]
    if unknown:
        listed = state_dict_io.listed(unknown)
        raise ValueError(f"no reference (encodecmae v1) name for {listed}. Known: params/{{input_proj, "
                         "encoder_positions, encoder, decoder_proj, decoder_positions (only equal to "
                         "encoder_positions: v1 shares one scale), decoder, head, kmeans_head}, and the EnCodec "
                         "copy {encoder, codebooks}; v1 has no learned mask token, and its self-training teacher and "
                         "k-means centroids live outside the model (tokenizer.pkl)")
    return dict(sorted(state_dict.items(), key=lambda item: _order_key(item[0])))


def encodec_to_state_dict(encodec_params: Mapping) -> tuple[dict[str, np.ndarray], list[str]]:
    """({EncodecModel name: array}, the leaves with no name) of frozen EnCodec params {"encoder", "codebooks"}:
    the inverse of encodec_torch.convert. Encoder names `encoder.model.…` (conv kernels as weight_g / weight_v),
    codebooks [n_q, 1024, 128] as `quantizer.vq.layers.<q>._codebook.embed`."""
    state_dict, unknown = {}, []
    expected = encodec_torch.expected_encoder_shapes()
    encoder = dict(state_dict_io.nested_leaves(encodec_params.get("encoder", {})))
    for path, leaf in encoder.items():
        value = np.asarray(leaf)
        if expected.get(path) != value.shape:
            unknown.append(f"encoder/{'/'.join(path)} {list(value.shape)}")
            continue
        name = encodec_torch.torch_name(path)  # the converter's own naming of a param path
        if path[-1] == "kernel":  # a conv [k, in, out] → [out, in, k], weight-normed
            weight_g, weight_v = split_weight_norm(np.transpose(value, (2, 1, 0)))
            base = name.removesuffix("weight_g/weight_v")
            state_dict[base + "weight_g"], state_dict[base + "weight_v"] = weight_g, weight_v
        else:  # conv bias, LSTM bias_{ih,hh} as is; LSTM kernel_{ih,hh} [in, 4·hidden] → weight [4·hidden, in]
            state_dict[name] = _float32(value.T if path[-1].startswith("kernel_") else value)
    missing = [encodec_torch.torch_name(path) for path in expected if path not in encoder]
    if missing:
        raise ValueError(f"the EnCodec copy lacks encoder tensors {missing}")
    codebooks = np.asarray(encodec_params.get("codebooks", np.zeros((0,))))
    if codebooks.ndim != 3 or codebooks.shape[1:] != (1024, 128):
        raise ValueError(f"the EnCodec copy's codebooks have shape {list(codebooks.shape)}; expected [n_q, 1024, 128]")
    for q, codebook in enumerate(codebooks):
        state_dict[f"quantizer.vq.layers.{q}._codebook.embed"] = _float32(codebook)
    unknown += [key for key in encodec_params if key not in ("encoder", "codebooks")]
    return state_dict, unknown


def split_weight_norm(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """weight [out, ...] → (weight_g [out, 1, …], weight_v = weight) with weight_g the per-row L2 norm (float64,
    rounded to float32), so encodec_torch.resolve_weight_norm(g, v) gives `weight` back to 1 ulp. An all-zero row
    gets v = 1, g = 0 (not 0 / 0)."""
    weight = np.asarray(weight)
    axes = tuple(range(1, weight.ndim))
    norm = np.sqrt(np.sum(np.square(weight, dtype=np.float64), axis=axes, keepdims=True))
    weight_v = np.where(norm == 0, np.float32(1), weight)
    return _float32(norm), _float32(weight_v)


def _mae_tensors(path: tuple[str, ...], value: np.ndarray, model: Mapping, num_heads: int):
    """[(reference name, value in torch layout)] of one leaf of EncodecMAEModel params, or None without a name."""
    top, *rest = path
    if top in _LINEARS_TO_REF and len(rest) == 1 and rest[0] in ("kernel", "bias"):
        return [(f"{_LINEARS_TO_REF[top]}.{_LEAF_NAMES[rest[0]]}", _torch_layout(rest[0], value))]
    if path == ("encoder_positions", "scale"):
        return [(encodecmae_torch.POSITIONS, _float32(value))]
    if path == ("decoder_positions", "scale"):  # v1's one scale: nothing of its own, when equal to the encoder's
        encoder_scale = model.get("encoder_positions", {}).get("scale")
        return [] if encoder_scale is not None and np.array_equal(encoder_scale, value) else None
    if top not in _STACKS_TO_REF or not rest:
        return None
    stack = _STACKS_TO_REF[top]
    if rest[0] == "ffn":  # share_ffn: v1 hands the one FFN module to every layer
        names = _ffn_names(rest[1:], [f"{stack}.encoder_layers.{i}." for i in range(_depth(model[top]))])
        converted = _torch_layout(rest[-1], value)
        return [(name, converted) for name in names] if names else None
    if rest[0] == "final_norm" and len(rest) == 2 and rest[1] in ("scale", "bias"):
        return [(f"{stack}.final_norm.{_LEAF_NAMES[rest[1]]}", _torch_layout(rest[1], value))]
    layer = _LAYER.fullmatch(rest[0])
    if not layer:
        return None
    prefix, inner = f"{stack}.encoder_layers.{layer.group(1)}.", rest[1:]
    if inner[:1] == ["attn"] and len(inner) == 3 and inner[1] in _ATTN_TO_REF and inner[2] == "kernel":
        kernel = np.asarray(value)
        if kernel.shape[1 if inner[1] != "out" else 0] % num_heads:
            return None
        weight = _interleave_cols(kernel, num_heads) if inner[1] == "out" else _interleave_rows(kernel, num_heads)
        return [(f"{prefix}att_layer.{_ATTN_TO_REF[inner[1]]}.weight", _float32(weight))]
    if len(inner) == 2 and inner[0] in ("norm1", "norm2") and inner[1] in ("scale", "bias"):
        return [(f"{prefix}{inner[0]}.{_LEAF_NAMES[inner[1]]}", _torch_layout(inner[1], value))]
    if inner[:1] == ["ffn"]:
        names = _ffn_names(inner[1:], [prefix])
        return [(names[0], _torch_layout(inner[-1], value))] if names else None
    return None


def _ffn_names(rest: list[str], prefixes: list[str]) -> list[str]:
    """`<prefix>ff_layer.{0,2}.{weight,bias}` for each prefix of an ffn/fc{1,2}/{kernel,bias} leaf ([]: no name)."""
    if len(rest) != 2 or rest[0] not in _FFN_TO_REF or rest[1] not in ("kernel", "bias"):
        return []
    return [f"{prefix}ff_layer.{_FFN_TO_REF[rest[0]]}.{_LEAF_NAMES[rest[1]]}" for prefix in prefixes]


def _interleave_rows(kernel: np.ndarray, num_heads: int) -> np.ndarray:
    """kernel [D, H·d] with column h·d + d' → w{q,k,v}.weight [H·d, D] with row d'·H + h
    (encodecmae_torch._deinterleave_rows reversed)."""
    width, inner = kernel.shape
    return kernel.T.reshape(num_heads, inner // num_heads, width).transpose(1, 0, 2).reshape(inner, width)


def _interleave_cols(kernel: np.ndarray, num_heads: int) -> np.ndarray:
    """kernel [H·d, D] with row h·d + d' → wo.weight [D, H·d] with column d'·H + h
    (encodecmae_torch._deinterleave_cols reversed)."""
    inner, width = kernel.shape
    return kernel.T.reshape(width, num_heads, inner // num_heads).transpose(0, 2, 1).reshape(width, inner)


def _torch_layout(leaf_name: str, value: np.ndarray) -> np.ndarray:
    """Linear kernel [in, out] → weight [out, in]; others as they are; a float32 C-contiguous copy."""
    return _float32(value.T if leaf_name == "kernel" else value)


def _float32(value) -> np.ndarray:
    """A float32 C-contiguous array (np.ascontiguousarray would make a 0-d scale 1-d)."""
    return np.array(value, dtype=np.float32, order="C")


def _depth(stack: Mapping) -> int:
    return sum(1 for key in stack if _LAYER.fullmatch(key))


def _add(state_dict: dict, tensors, source: str) -> None:
    for name, value in tensors:
        if name in state_dict:
            raise ValueError(f"two leaves map to the reference name {name!r} (second: {source})")
        state_dict[name] = value


def _describe_leaf(tree: str, path: tuple[str, ...], leaf, model: Mapping) -> str:
    described = f"{tree}/{'/'.join(path)} {list(np.shape(leaf))}"
    if tree == "params" and path == ("decoder_positions", "scale") and "encoder_positions" in model:
        encoder_scale = float(np.asarray(model["encoder_positions"]["scale"]))
        described += (f" (= {float(np.asarray(leaf)):.6g}; v1 has one positional_encoder.scale for both stacks, "
                      f"and encoder_positions/scale = {encoder_scale:.6g} differs)")
    return described


def _order_key(name: str) -> tuple:
    """v1's state-dict order: _ORDER for the top module, then indices numerically and _TOKEN_ORDER within a module
    (Linear weight before bias; a weight-normed conv's bias, weight_g, weight_v; an LSTM's layers in turn)."""
    top, *tokens = name.split(".")
    key = [_ORDER.index(top) if top in _ORDER else len(_ORDER)]
    for token in tokens:
        if token.isdigit():
            key.append((0, int(token), 0))
        elif lstm := _LSTM_LEAF.fullmatch(token):
            key.append((1, int(lstm.group(2)), ("weight_ih", "weight_hh", "bias_ih", "bias_hh").index(lstm.group(1))))
        else:
            key.append((2, _TOKEN_ORDER.get(token, len(_TOKEN_ORDER)), token))
    return tuple(key)
