"""Official EncodecMAE (habla-liaa/encodecmae, tag v.1.0.0) state dicts → audiojepa EncodecMAE params. No torch.

Takes the Lightning module's `state_dict` (the released `lpepino/encodecmae-{small,base,base-st,large,large-st}`
`model.pt` holds it under "state_dict"; v1 `encodecmae/tasks/models/encodecmae/mae.py` and
`tasks/models/transformers/__init__.py` name the modules). Names and layouts:

| reference name (v1)                                         | ours (audiojepa.models.encodecmae)            |
|-------------------------------------------------------------|-----------------------------------------------|
| feat_projector.{weight,bias} [D, 128]                        | input_proj/{kernel,bias} (transposed)         |
| positional_encoder.scale []                                  | encoder_positions/scale and decoder_positions/scale (v1 shares one scale) |
| visible_encoder.encoder_layers.<i>.att_layer.w{q,k,v}.weight | encoder/layers_<i>/attn/{query,key,value}/kernel |
| visible_encoder.encoder_layers.<i>.att_layer.wo.weight       | encoder/layers_<i>/attn/out/kernel            |
| visible_encoder.encoder_layers.<i>.norm{1,2}.{weight,bias}   | encoder/layers_<i>/norm{1,2}/{scale,bias}     |
| visible_encoder.encoder_layers.<i>.ff_layer.{0,2}.{weight,bias} | encoder/ffn/{fc1,fc2} (shared) or layers_<i>/ffn |
| visible_encoder.final_norm.{weight,bias}                     | encoder/final_norm/{scale,bias}               |
| decoder_projector.*, decoder.*                               | decoder_proj, decoder (same layout as the encoder) |
| head.layer.{weight,bias} [n_q·1024, D]                       | head (n_q = rows / 1024; stream-major as ours) |
| extra_head.layer.{weight,bias} [k, D] (self-training)        | kmeans_head (targets "codes+kmeans")          |
| wav_encoder.model.<rest>, target_encoder.model.<rest>        | EnCodec `encoder.<rest>`, `quantizer.<rest>`, converted by encodec_torch |

Layout changes:
- Linear weight [out, in] → kernel [in, out].
- Attention heads: the reference interleaves them (`Q.view(N, T, d_head, H)`: feature d·H + h is head h's
  channel d, for Q, K, V and the input of `wo`); ours are contiguous (h·d_head + d). The rows of w{q,k,v} and
  the columns of wo are permuted accordingly. Q/K/V project D → H·(D // H) (1020 for the large model).
- The FFN: the reference builds one FFN per stack and hands it to every layer, so its state dict repeats the
  same tensors under each `encoder_layers.<i>.ff_layer`. When all copies are equal (the released models) they
  become the shared `ffn` (share_ffn=True); when they differ, one FFN per layer (share_ffn=False).

Sizes are read from the tensors (width from feat_projector, depths from the layer indices, FFN width, heads
only by `num_heads`: the tensors cannot tell them) and must be one of our VARIANTS; a mismatch is a ValueError
that lists both.

No counterpart here, so a ValueError (listed, never dropped): attention biases (the reference's
q_bias/k_bias/v_bias/out_bias, off in every released config), a stack's own `positional_encoder` (v1 adds the
one top-level PE), LayerScale `ls*.gamma`, cross-attention (`xatt_layer`, `norm3`), and the v2 refactor
(`main` branch: `wav_encoder.encoder.*`, `wav_encoder.post_net.*`, `masker.positional_encoder.*`, …), whose
released `mel256-ec-*` models take 256-bin log-mels, an input this package's EncodecMAE does not have.
The stack type cannot be read from the names: the reference's `norm_type` default and every released model
is "ResiDual", which is what this converter assumes (a "prenorm" checkpoint has the same names and would
convert, but compute something else; a "postnorm" one has no final_norm and fails as incomplete).
"""

import dataclasses
import re

import ml_collections
import numpy as np

from audiojepa.models import encodec, encodec_torch
from audiojepa.models import encodecmae as mae

STACKS = {"visible_encoder": "encoder", "decoder": "decoder"}
LINEARS = {"feat_projector": "input_proj", "decoder_projector": "decoder_proj", "head.layer": "head",
            "extra_head.layer": "kmeans_head"}
ATTN = {"wq": "query", "wk": "key", "wv": "value", "wo": "out"}
FFN = {"0": "fc1", "2": "fc2"}
_LAYER = re.compile(r"(visible_encoder|decoder)\.encoder_layers\.(\d+)\.(.+)")
_FINAL_NORM = re.compile(r"(visible_encoder|decoder)\.final_norm\.(weight|bias)")
_LINEAR = re.compile(r"(feat_projector|decoder_projector|head\.layer|extra_head\.layer)\.(weight|bias)")
POSITIONS = "positional_encoder.scale"
ENCODEC_PREFIXES = {"wav_encoder.model.": "encoder.", "target_encoder.model.": "quantizer."}
V2_HINTS = ("wav_encoder.encoder.", "wav_encoder.post_net.", "masker.")
# What an encoder export needs (tools/convert_encodecmae.py keeps these, plus the EnCodec weights).
ENCODER_ENTRIES = ("feat_projector.", POSITIONS, "visible_encoder.")


@dataclasses.dataclass
class Converted:
    """params: EncodecMAEModel params (numpy); encodec: {"encoder", "codebooks"} converted from the checkpoint's
    own EnCodec copy (`wav_encoder` / `target_encoder`), or None when it has none; model_config: the
    EncodecMAE config.model these params fit (size, share_ffn, num_codebooks, targets, num_clusters)."""
    params: dict
    encodec: dict | None
    model_config: ml_collections.ConfigDict


def _deinterleave_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """w{q,k,v}.weight [H·d, D] with row d·H + h → kernel [D, H·d] with column h·d + d'."""
    inner, width = weight.shape
    return weight.reshape(inner // num_heads, num_heads, width).transpose(1, 0, 2).reshape(inner, width).T


def _deinterleave_cols(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """wo.weight [D, H·d] with column d·H + h → kernel [H·d, D] with row h·d + d'."""
    width, inner = weight.shape
    return weight.reshape(width, inner // num_heads, num_heads).transpose(0, 2, 1).reshape(width, inner).T


def _leaf(torch_leaf: str, is_norm: bool) -> str:
    if torch_leaf == "bias":
        return "bias"
    return "scale" if is_norm else "kernel"


def split_state_dict(state_dict: dict) -> tuple[dict, dict, list[str]]:
    """(MAE tensors, EnCodec tensors renamed to EncodecModel's names, unknown names)."""
    mae_tensors, encodec_tensors, unknown = {}, {}, []
    for name, value in state_dict.items():
        for prefix, encodec_prefix in ENCODEC_PREFIXES.items():
            if name.startswith(prefix):
                encodec_tensors[encodec_prefix + name[len(prefix):]] = np.asarray(value)
                break
        else:
            if name == POSITIONS or _LINEAR.fullmatch(name) or _FINAL_NORM.fullmatch(name) or _known_layer(name):
                mae_tensors[name] = np.asarray(value)
            else:
                unknown.append(name)
    return mae_tensors, encodec_tensors, unknown


def _known_layer(name: str) -> bool:
    match = _LAYER.fullmatch(name)
    if not match:
        return False
    rest = match.group(3)
    return bool(re.fullmatch(r"att_layer\.w[qkvo]\.weight|norm[12]\.(weight|bias)|ff_layer\.[02]\.(weight|bias)", rest))


def _sizes(tensors: dict) -> dict:
    """The sizes the tensors show: width, encoder_depth, decoder_depth (None without a decoder), ff_dim,
    attention inner width."""
    def depth(stack):
        indices = {int(m.group(2)) for k in tensors if (m := _LAYER.fullmatch(k)) and m.group(1) == stack}
        if indices and indices != set(range(len(indices))):
            raise ValueError(f"{stack}.encoder_layers: layer indices {sorted(indices)}, expected 0 … n-1.")
        return len(indices) or None

    return dict(width=int(tensors["feat_projector.weight"].shape[0]), encoder_depth=depth("visible_encoder"),
                decoder_depth=depth("decoder"),
                ff_dim=int(tensors["visible_encoder.encoder_layers.0.ff_layer.0.weight"].shape[0]),
                inner=int(tensors["visible_encoder.encoder_layers.0.att_layer.wq.weight"].shape[0]))


def match_variant(sizes: dict, num_heads: int | None) -> str:
    """The VARIANTS name with these sizes (and num_heads, when given); ValueError listing both otherwise."""
    keys = ("width", "encoder_depth", "ff_dim") + (("decoder_depth",) if sizes["decoder_depth"] else ())
    for name, variant in mae.VARIANTS.items():
        heads = num_heads or variant["num_heads"]
        if (all(variant[k] == sizes[k] for k in keys) and heads == variant["num_heads"]
                and heads * (variant["width"] // heads) == sizes["inner"]):
            return name
    shown = {k: sizes[k] for k in keys} | {"attention inner width": sizes["inner"], "num_heads": num_heads}
    raise ValueError(f"EncodecMAE checkpoint sizes {shown} are none of this package's sizes "
                     f"(audiojepa.models.encodecmae.VARIANTS: {mae.VARIANTS}); the reference's small / base / large "
                     "have 12 heads.")


def _stack_params(tensors: dict, stack: str, depth: int, num_heads: int) -> tuple[dict, list[dict]]:
    """(ResiDualStack params without the FFN, per-layer FFN params)."""
    params, ffns = {}, []
    for i in range(depth):
        prefix = f"{stack}.encoder_layers.{i}."
        layer = {}
        for torch_name, ours in ATTN.items():
            weight = tensors[f"{prefix}att_layer.{torch_name}.weight"]
            kernel = _deinterleave_cols(weight, num_heads) if torch_name == "wo" else _deinterleave_rows(weight, num_heads)
            layer.setdefault("attn", {})[ours] = {"kernel": kernel}
        for norm in ("norm1", "norm2"):
            layer[norm] = {"scale": tensors[f"{prefix}{norm}.weight"], "bias": tensors[f"{prefix}{norm}.bias"]}
        params[f"layers_{i}"] = layer
        ffns.append({ours: {"kernel": tensors[f"{prefix}ff_layer.{index}.weight"].T,
                            "bias": tensors[f"{prefix}ff_layer.{index}.bias"]} for index, ours in FFN.items()})
    params["final_norm"] = {"scale": tensors[f"{stack}.final_norm.weight"], "bias": tensors[f"{stack}.final_norm.bias"]}
    return params, ffns


def _all_equal(ffns: list[dict]) -> bool:
    return all(np.array_equal(ffn[fc][leaf], ffns[0][fc][leaf]) for ffn in ffns for fc in FFN.values()
               for leaf in ("kernel", "bias"))


def state_dict_to_params(state_dict: dict, *, num_heads: int | None = None) -> Converted:
    """Converts a v1 EncodecMAE state dict (module docstring).

    Args:
        state_dict: reference name → array (the Lightning checkpoint's "state_dict").
        num_heads: attention heads (the tensors cannot tell them); None: the matching variant's.

    Returns:
        Converted: params with input_proj, encoder_positions, encoder and, when the dict has them,
        decoder_proj / decoder_positions / decoder, head and kmeans_head; the EnCodec copy; the model config.

    Raises:
        ValueError: unknown names or names with no counterpart (listed), missing tensors, sizes that are none
            of VARIANTS, or stacks whose FFN sharing differs.
    """
    tensors, encodec_tensors, unknown = split_state_dict(state_dict)
    if unknown:
        hint = (" These look like the encodecmae v2 (main branch) layout, whose released models take 256-bin "
                "log-mels; only the v1 (tag v.1.0.0) EnCodec-input layout has a counterpart here."
                if any(n.startswith(V2_HINTS) for n in unknown) else "")
        raise ValueError(f"Unrecognised or unsupported EncodecMAE state-dict entries: {sorted(unknown)}.{hint} "
                         "Known: feat_projector, positional_encoder.scale, {visible_encoder,decoder}.encoder_layers.<i>."
                         "{att_layer.w{q,k,v,o}.weight, norm{1,2}, ff_layer.{0,2}}, {visible_encoder,decoder}.final_norm,"
                         " decoder_projector, head.layer, extra_head.layer, wav_encoder.model.*, target_encoder.model.*"
                         " (no attention biases, per-stack positional encoders, LayerScale or cross-attention).")
    required = ["feat_projector.weight", "feat_projector.bias", POSITIONS, "visible_encoder.final_norm.weight",
                "visible_encoder.encoder_layers.0.ff_layer.0.weight", "visible_encoder.encoder_layers.0.att_layer.wq.weight"]
    missing = [k for k in required if k not in tensors]
    if missing:
        raise ValueError(f"EncodecMAE state dict lacks {missing} (an encoder needs the input projection, the "
                         "positional scale and the ResiDual visible encoder with its final_norm).")
    sizes = _sizes(tensors)
    size = match_variant(sizes, num_heads)
    variant = mae.decode_variant(size)
    heads = variant["num_heads"]

    def linear(torch_name):
        return {"kernel": tensors[f"{torch_name}.weight"].T, "bias": tensors[f"{torch_name}.bias"]}

    scale = np.asarray(tensors[POSITIONS], np.float32).reshape(())
    params = {"input_proj": linear("feat_projector"), "encoder_positions": {"scale": scale}}
    stacks = {"visible_encoder": sizes["encoder_depth"]}
    if sizes["decoder_depth"]:
        stacks["decoder"] = sizes["decoder_depth"]
        params["decoder_proj"] = linear("decoder_projector")
        params["decoder_positions"] = {"scale": scale.copy()}
    shared = {}
    try:
        for stack, depth in stacks.items():
            stack_params, ffns = _stack_params(tensors, stack, depth, heads)
            shared[stack] = _all_equal(ffns)
            if shared[stack]:
                stack_params["ffn"] = ffns[0]
            else:
                for i, ffn in enumerate(ffns):
                    stack_params[f"layers_{i}"]["ffn"] = ffn
            params[STACKS[stack]] = stack_params
    except KeyError as e:
        raise ValueError(f"EncodecMAE state dict lacks {e.args[0]} (every layer needs att_layer.w{{q,k,v,o}}, "
                         "norm1, norm2 and ff_layer.{0,2}; the stack a final_norm: a 'postnorm' model has none).") from None
    if len(set(shared.values())) > 1:
        raise ValueError(f"FFN sharing differs between the stacks ({shared}); this package's share_ffn is one flag "
                         "for both.")
    for torch_name in ("head.layer", "extra_head.layer"):
        if f"{torch_name}.weight" in tensors:
            params[LINEARS[torch_name]] = linear(torch_name)
    extra = [k for k in tensors if k.startswith(("decoder_projector.", "decoder.")) and "decoder" not in params]
    if extra:
        raise ValueError(f"decoder tensors {extra} without decoder layers.")

    # Imported here: the method module imports this package (audiojepa.models.encodec_torch).
    from audiojepa.methods import encodecmae

    config = encodecmae.default_config(size)
    config.share_ffn = bool(shared["visible_encoder"])
    if "head" in params:
        rows = params["head"]["kernel"].shape[1]
        if rows % encodec.CODEBOOK_SIZE:
            raise ValueError(f"head.layer.weight has {rows} rows, not n_q x {encodec.CODEBOOK_SIZE}.")
        config.num_codebooks = rows // encodec.CODEBOOK_SIZE
        config.codebook_weights = list(config.codebook_weights)[:config.num_codebooks]
    if "kmeans_head" in params:
        config.targets = "codes+kmeans" if "head" in params else "kmeans"
        config.num_clusters = int(params["kmeans_head"]["kernel"].shape[1])
    check_shapes(params, config)
    encodec_params = None
    if encodec_tensors:
        try:
            encodec_params = encodec_torch.convert(encodec_tensors)
        except (KeyError, ValueError) as e:
            raise ValueError(f"the checkpoint's EnCodec copy (wav_encoder.model.* → encoder.*, target_encoder.model.* "
                             f"→ quantizer.*): {e}") from None
    return Converted(params, encodec_params, config)


def check_shapes(params: dict, model_config) -> None:
    """Raises ValueError naming the tensors whose converted shapes differ from (or are missing in) the
    EncodecMAEModel of `model_config`, for the top-level parts `params` has (traced abstractly, nothing computed)."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    c = model_config
    model = mae.EncodecMAEModel(**mae.decode_variant(c.size), num_codebooks=int(c.num_codebooks) if "head" in params
                                else 0, num_clusters=int(c.num_clusters) if "kmeans_head" in params else 0,
                                share_ffn=bool(c.share_ffn))
    expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 2, encodec.DIMENSION)),
                              jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.int32))["params"]
    expected = {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(expected).items()
                if path[0] in params}
    got = {path: tuple(np.shape(leaf)) for path, leaf in traverse_util.flatten_dict(params).items()}
    wrong = {"/".join(path): (got.get(path), expected.get(path)) for path in set(got) | set(expected)
             if got.get(path) != expected.get(path)}
    if wrong:
        raise ValueError(f"converted EncodecMAE params do not fit the {c.size!r} model (path: (converted, expected)): "
                         f"{dict(sorted(wrong.items()))}")


def encodec_for_export(converted: Converted, encodec_path: str | None) -> dict:
    """The frozen EnCodec params {"encoder", "codebooks" [n_q, 1024, 128]} an EncodecMAE export carries: from
    `encodec_path` (a tools/convert_encodec.py folder or an EnCodec 24 kHz state dict; it takes precedence) or
    else the checkpoint's own copy. ValueError when there is neither: the encoder runs on EnCodec frames."""
    num_codebooks = int(converted.model_config.num_codebooks)
    if encodec_path:
        from audiojepa.methods import encodecmae

        return encodecmae.load_encodec_params(encodec_path, num_codebooks)
    if converted.encodec is None:
        raise ValueError("the checkpoint has no EnCodec weights (wav_encoder.model.*) and the EncodecMAE encoder runs "
                         "on EnCodec frames: give --encodec (a folder written by tools/convert_encodec.py from "
                         "encodec_24khz-d7cc33bc.th, or that state dict)")
    return {"encoder": converted.encodec["encoder"], "codebooks": converted.encodec["codebooks"][:num_codebooks]}


def encoder_entries(state_dict: dict) -> tuple[dict, list[str]]:
    """(the entries an encoder export needs: ENCODER_ENTRIES and the EnCodec copy, the sorted top-level names of the
    others)."""
    keep = {k: v for k, v in state_dict.items() if k.startswith(ENCODER_ENTRIES + tuple(ENCODEC_PREFIXES))}
    return keep, sorted({k.split(".")[0] for k in state_dict if k not in keep})
