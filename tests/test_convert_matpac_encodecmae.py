"""Converters of the official MATPAC and EncodecMAE checkpoints (audiojepa.convert.{matpac,encodecmae}_torch) and
their CLIs, on synthetic state dicts whose names and shapes are those of the reference code (random values):
MATPAC's `GeneralModel.state_dict()` (aurianworld/matpac training_matpac/models/{model,encoder,decoder,cls_head}.py,
with fairseq's nested `_ema` / `_cls_head_ema`) and EncodecMAE v1's Lightning module (habla-liaa/encodecmae tag
v.1.0.0, tasks/models/{encodecmae/mae.py,transformers/__init__.py}, its EnCodec copy under wav_encoder /
target_encoder)."""

import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from audiojepa.adapters import encoder as encoder_lib
from audiojepa.convert import encodecmae_torch, matpac_torch
from audiojepa.methods import encodecmae, matpac
from audiojepa.models import encodec, encodec_torch
from audiojepa.models import encodecmae as mae
from audiojepa.models.cls_head import ClassificationHead
from audiojepa.models.pos_embed import sincos_2d

# MATPAC at the "tiny" ViT (192 wide, 2 blocks, 3 heads), 80 x 64 input → 5 x 4 patches, a 1-block 64-wide
# decoder and a small head.
GRID, WIDTH, DEPTH, MLP = (5, 4), 192, 2, 768
DEC_WIDTH, DEC_DEPTH, DEC_HEADS = 64, 1, 4
K, HIDDEN, BOTTLENECK = 16, 24, 8


def _vit_block(rng, prefix, width, mlp):
    return {f"{prefix}.norm1.weight": rng.normal(1, .1, width), f"{prefix}.norm1.bias": rng.normal(0, .1, width),
            f"{prefix}.attn.qkv.weight": rng.normal(0, .05, (3 * width, width)),
            f"{prefix}.attn.qkv.bias": rng.normal(0, .02, 3 * width),
            f"{prefix}.attn.proj.weight": rng.normal(0, .05, (width, width)),
            f"{prefix}.attn.proj.bias": rng.normal(0, .02, width),
            f"{prefix}.norm2.weight": rng.normal(1, .1, width), f"{prefix}.norm2.bias": rng.normal(0, .1, width),
            f"{prefix}.mlp.fc1.weight": rng.normal(0, .05, (mlp, width)), f"{prefix}.mlp.fc1.bias": rng.normal(0, .02, mlp),
            f"{prefix}.mlp.fc2.weight": rng.normal(0, .05, (width, mlp)), f"{prefix}.mlp.fc2.bias": rng.normal(0, .02, width)}


def _cls_head(rng):
    return {"mlp.0.weight": rng.normal(0, .1, (HIDDEN, WIDTH)), "mlp.0.bias": rng.normal(0, .1, HIDDEN),
            "mlp.2.weight": rng.normal(0, .1, (HIDDEN, HIDDEN)), "mlp.2.bias": rng.normal(0, .1, HIDDEN),
            "mlp.4.weight": rng.normal(0, .1, (BOTTLENECK, HIDDEN)), "mlp.4.bias": rng.normal(0, .1, BOTTLENECK),
            "last_layer.weight_g": rng.uniform(.5, 1.5, (K, 1)), "last_layer.weight_v": rng.normal(0, .1, (K, BOTTLENECK))}


def _f32(tree):
    return {k: _f32(v) if isinstance(v, dict) else np.asarray(v, np.float32) for k, v in tree.items()}


def matpac_state_dict(seed=0):
    """GeneralModel.state_dict(): backbone, decoder, student head, centre; `_ema` / `_cls_head_ema` nested."""
    rng = np.random.default_rng(seed)
    n = GRID[0] * GRID[1]
    sd = {"cls_token": rng.normal(0, .02, (1, 1, WIDTH)), "pos_embed": sincos_2d(*GRID, WIDTH, cls_token=True)[None],
          "patch_embed.proj.weight": rng.normal(0, .05, (WIDTH, 1, 16, 16)), "patch_embed.proj.bias": rng.normal(0, .02, WIDTH),
          "student_encoder.norm.weight": rng.normal(1, .1, WIDTH), "student_encoder.norm.bias": rng.normal(0, .1, WIDTH),
          "decoder.decoder_embed.weight": rng.normal(0, .05, (DEC_WIDTH, WIDTH)),
          "decoder.decoder_embed.bias": rng.normal(0, .02, DEC_WIDTH),
          "decoder.mask_token": rng.normal(0, .02, (1, 1, DEC_WIDTH)),
          "decoder.decoder_pos_embed": sincos_2d(*GRID, DEC_WIDTH, cls_token=True)[None],
          "decoder.decoder_norm.weight": rng.normal(1, .1, DEC_WIDTH), "decoder.decoder_norm.bias": rng.normal(0, .1, DEC_WIDTH),
          "decoder.decoder_pred.weight": rng.normal(0, .05, (WIDTH, DEC_WIDTH)),
          "decoder.decoder_pred.bias": rng.normal(0, .02, WIDTH),
          "cls_head_loss.center": rng.normal(0, .1, (1, 1, K))}
    assert sd["pos_embed"].shape == (1, n + 1, WIDTH)
    for i in range(DEPTH):
        sd.update(_vit_block(rng, f"student_encoder.blocks.{i}", WIDTH, MLP))
    for i in range(DEC_DEPTH):
        sd.update(_vit_block(rng, f"decoder.decoder_blocks.{i}", DEC_WIDTH, 4 * DEC_WIDTH))
    sd.update({f"cls_student_head.{k}": v for k, v in _cls_head(rng).items()})
    ema = {"norm.weight": rng.normal(1, .1, WIDTH), "norm.bias": rng.normal(0, .1, WIDTH)}
    for i in range(DEPTH):
        ema.update(_vit_block(rng, f"blocks.{i}", WIDTH, MLP))
    sd["_ema"] = ema
    sd["_cls_head_ema"] = _cls_head(rng)
    return _f32(sd)


def matpac_method():
    config = matpac.default_config("tiny")
    config.update(predictor_width=DEC_WIDTH, predictor_depth=DEC_DEPTH, predictor_heads=DEC_HEADS, num_prototypes=K,
                  head_hidden_dim=HIDDEN, head_bottleneck_dim=BOTTLENECK)
    return matpac.MATPAC(config, input_shape=(80, 16 * GRID[1]))


def _shapes(tree):
    return jax.tree.map(lambda a: tuple(np.shape(a)), tree)


def test_matpac_trees_match_the_model_and_values_land_in_place():
    sd = matpac_state_dict()
    params, target_params = matpac_torch.state_dict_to_params(sd, grid_size=GRID)
    expected_params, expected_target = jax.eval_shape(matpac_method().init, jax.random.key(0))
    assert _shapes(params) == _shapes(expected_params)
    assert _shapes(target_params) == _shapes(expected_target)

    enc = params["encoder"]
    np.testing.assert_array_equal(enc["patch_embed"]["proj"]["kernel"],
                                  sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(enc["stack"]["blocks"]["attn"]["qkv"]["kernel"][1],
                                  sd["student_encoder.blocks.1.attn.qkv.weight"].T)
    np.testing.assert_array_equal(enc["stack"]["norm"]["scale"], sd["student_encoder.norm.weight"])
    np.testing.assert_array_equal(params["predictor"]["head"]["kernel"], sd["decoder.decoder_pred.weight"].T)
    np.testing.assert_array_equal(target_params["encoder_stack"]["blocks"]["mlp"]["fc2"]["kernel"][0],
                                  sd["_ema"]["blocks.0.mlp.fc2.weight"].T)
    np.testing.assert_array_equal(target_params["center"], sd["cls_head_loss.center"].ravel())
    np.testing.assert_array_equal(target_params["head"]["mlp_2"]["kernel"], sd["_cls_head_ema"]["mlp.4.weight"].T)

    # The student head computes the reference Cls_Head: MLP (exact GELU), L2 normalise, g · v / ‖v‖ (float64 NumPy).
    x = np.random.default_rng(1).normal(size=(2, 3, WIDTH)).astype(np.float32)
    h = x.astype(np.float64)
    for i, index in enumerate((0, 2, 4)):
        h = h @ sd[f"cls_student_head.mlp.{index}.weight"].T + sd[f"cls_student_head.mlp.{index}.bias"]
        if i < 2:
            h = np.asarray(nn.gelu(jnp.asarray(h, jnp.float32), approximate=False), np.float64)
    h /= np.linalg.norm(h, axis=-1, keepdims=True)
    v, g = sd["cls_student_head.last_layer.weight_v"], sd["cls_student_head.last_layer.weight_g"]
    expected = h @ (g * v / np.linalg.norm(v, axis=1, keepdims=True)).T
    head = ClassificationHead(num_prototypes=K, hidden_dim=HIDDEN, bottleneck_dim=BOTTLENECK, num_layers=3)
    np.testing.assert_allclose(head.apply({"params": params["head"]}, x), expected, atol=1e-5)


def test_matpac_encoder_only_and_unknown_names():
    sd = matpac_torch.flatten(matpac_state_dict())
    encoder_only, dropped = matpac_torch.encoder_entries(sd)
    assert dropped == ["_cls_head_ema", "_ema", "cls_head_loss", "cls_student_head", "decoder"]
    params, target_params = matpac_torch.state_dict_to_params(encoder_only, grid_size=GRID)
    assert set(params) == {"encoder"} and target_params is None

    bad = dict(sd, **{"mcl_heads.mcl_heads.0.weight": np.zeros((WIDTH, DEC_WIDTH), np.float32),
                      "student_encoder.something": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"student_encoder\.something.*mcl_heads\.mcl_heads\.0\.weight.*MATPAC\+\+"):
        matpac_torch.state_dict_to_params(bad)
    with pytest.raises(ValueError, match="sin-cos"):
        matpac_torch.state_dict_to_params(sd, grid_size=(5, 5))


# -- EncodecMAE ----------------------------------------------------------------------------------------------------

SIZE = "tiny"


def _encodec_copy(rng, num_codebooks=8):
    """EnCodec 24 kHz encoder + codebooks as the v1 module names them: wav_encoder.model.<SEANet names>,
    target_encoder.model.vq.layers.<i>._codebook.* (shapes from our encoder, in torch layout, weight-normed)."""
    sd = {}
    for path, shape in encodec_torch.expected_encoder_shapes().items():
        name = "wav_encoder.model." + encodec_torch.torch_name(path)[len("encoder."):]
        if path[0].startswith("lstm_"):
            sd[name] = rng.normal(0, .05, shape[::-1] if path[-1].startswith("kernel") else shape)
        elif path[-1] == "kernel":
            k, cin, cout = shape
            base = name[:-len("weight_g/weight_v")]
            sd[base + "weight_v"] = rng.normal(0, 1, (cout, cin, k))
            sd[base + "weight_g"] = rng.uniform(.5, 1.5, (cout, 1, 1))
        else:
            sd[name] = rng.normal(0, .02, shape)
    for i in range(num_codebooks):
        prefix = f"target_encoder.model.vq.layers.{i}._codebook."
        sd.update({prefix + "embed": rng.normal(0, 1, (1024, 128)), prefix + "embed_avg": rng.normal(0, 1, (1024, 128)),
                   prefix + "cluster_size": np.ones(1024), prefix + "inited": np.ones(1)})
    return sd


def encodecmae_state_dict(seed=0, share_ffn=True, with_encodec=True):
    """The v1 Lightning module's state_dict() at our "tiny" size, self-trained (head + extra_head)."""
    rng = np.random.default_rng(seed)
    v = mae.decode_variant(SIZE)
    d, ff = v["width"], v["ff_dim"]
    sd = {"feat_projector.weight": rng.normal(0, .1, (d, 128)), "feat_projector.bias": rng.normal(0, .02, d),
          "decoder_projector.weight": rng.normal(0, .1, (d, d)), "decoder_projector.bias": rng.normal(0, .02, d),
          "positional_encoder.scale": np.asarray(rng.uniform(.5, 1.5)),
          "head.layer.weight": rng.normal(0, .1, (8 * 1024, d)), "head.layer.bias": rng.normal(0, .02, 8 * 1024),
          "extra_head.layer.weight": rng.normal(0, .1, (1024, d)), "extra_head.layer.bias": rng.normal(0, .02, 1024)}
    for stack, depth in (("visible_encoder", v["encoder_depth"]), ("decoder", v["decoder_depth"])):
        ffn = {"0.weight": rng.normal(0, .1, (ff, d)), "0.bias": rng.normal(0, .02, ff),
               "2.weight": rng.normal(0, .1, (d, ff)), "2.bias": rng.normal(0, .02, d)}
        for i in range(depth):
            p = f"{stack}.encoder_layers.{i}."
            for w in ("wq", "wk", "wv", "wo"):
                sd[p + f"att_layer.{w}.weight"] = rng.normal(0, .1, (d, d))
            for norm in ("norm1", "norm2"):
                sd[p + f"{norm}.weight"], sd[p + f"{norm}.bias"] = rng.normal(1, .1, d), rng.normal(0, .1, d)
            if not share_ffn:
                ffn = {k: val + rng.normal(0, .01, val.shape) for k, val in ffn.items()}
            sd.update({p + f"ff_layer.{k}": val.copy() for k, val in ffn.items()})  # the shared module, repeated
        sd[f"{stack}.final_norm.weight"], sd[f"{stack}.final_norm.bias"] = rng.normal(1, .1, d), rng.normal(0, .1, d)
    if with_encodec:
        sd.update(_encodec_copy(rng))
    return _f32(sd)


def _reference_attention(x, sd, prefix, num_heads):
    """The reference MultiHeadAttention (interleaved heads: feature d·H + h), in float64 NumPy."""
    n, t, _ = x.shape

    def heads(w):
        y = x @ sd[prefix + f"{w}.weight"].T.astype(np.float64)
        return y.reshape(n, t, -1, num_heads).transpose(0, 3, 1, 2)  # [N, H, T, d]

    q, k, val = heads("wq"), heads("wk"), heads("wv")
    logits = q @ k.transpose(0, 1, 3, 2) * q.shape[-1] ** -0.5
    att = np.exp(logits - logits.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    out = (att @ val).transpose(0, 2, 3, 1).reshape(n, t, -1)
    return out @ sd[prefix + "wo.weight"].T


def test_encodecmae_trees_match_the_model_and_values_land_in_place():
    sd = encodecmae_state_dict()
    converted = encodecmae_torch.state_dict_to_params(sd)
    config = converted.model_config
    assert (config.size, config.share_ffn, config.num_codebooks, config.targets, config.num_clusters) == \
        (SIZE, True, 8, "codes+kmeans", 1024)
    method = encodecmae.EncodecMAE(config, input_shape=(9600,))
    method.set_encodec_params(converted.encodec)
    expected_params, expected_target = jax.eval_shape(method.init, jax.random.key(0))
    assert _shapes(converted.params) == _shapes(expected_params)
    assert _shapes(converted.encodec) == _shapes(expected_target["encodec"])

    p = converted.params
    np.testing.assert_array_equal(p["input_proj"]["kernel"], sd["feat_projector.weight"].T)
    np.testing.assert_array_equal(p["encoder"]["ffn"]["fc2"]["kernel"], sd["visible_encoder.encoder_layers.1.ff_layer.2.weight"].T)
    np.testing.assert_array_equal(p["decoder"]["layers_1"]["norm2"]["scale"], sd["decoder.encoder_layers.1.norm2.weight"])
    np.testing.assert_array_equal(p["kmeans_head"]["kernel"], sd["extra_head.layer.weight"].T)
    assert p["encoder_positions"]["scale"] == p["decoder_positions"]["scale"] == sd["positional_encoder.scale"]
    np.testing.assert_array_equal(converted.encodec["codebooks"][3], sd["target_encoder.model.vq.layers.3._codebook.embed"])

    # Interleaved heads: our attention with the converted kernels computes the reference's.
    x = np.random.default_rng(2).normal(size=(2, 5, 64))
    ours = mae.SelfAttention(num_heads=2).apply({"params": p["encoder"]["layers_1"]["attn"]}, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(ours, _reference_attention(x, sd, "visible_encoder.encoder_layers.1.att_layer.", 2),
                               atol=1e-4)


def test_encodecmae_unshared_ffn_unknown_names_and_sizes():
    converted = encodecmae_torch.state_dict_to_params(encodecmae_state_dict(share_ffn=False, with_encodec=False))
    assert converted.model_config.share_ffn is False and converted.encodec is None
    assert "ffn" not in converted.params["encoder"] and "ffn" in converted.params["encoder"]["layers_0"]

    sd = encodecmae_state_dict(with_encodec=False)
    bad = dict(sd, **{"visible_encoder.encoder_layers.0.att_layer.wq.bias": np.zeros(64, np.float32),
                      "masker.positional_encoder.scale": np.ones((), np.float32)})
    with pytest.raises(ValueError, match=r"masker\.positional_encoder\.scale.*att_layer\.wq\.bias.*v2"):
        encodecmae_torch.state_dict_to_params(bad)
    with pytest.raises(ValueError, match="none of this package's sizes"):
        encodecmae_torch.state_dict_to_params(sd, num_heads=4)
    with pytest.raises(ValueError, match="give --encodec"):  # what tools/convert_encodecmae.py says without EnCodec
        encodecmae_torch.encodec_for_export(converted, None)


def _run(tool, *args):
    return subprocess.run([sys.executable, f"tools/{tool}", *args], check=False, capture_output=True, text=True,
                          timeout=120)


def test_cli_exports_load_and_embed(tmp_path):
    matpac_file = tmp_path / "matpac.npz"
    np.savez(matpac_file, **matpac_torch.flatten(matpac_state_dict()))
    result = _run("convert_matpac.py", f"--checkpoint={matpac_file}", f"--output={tmp_path / 'matpac'}")
    assert result.returncode == 0, result.stderr[-2000:]
    exported = encoder_lib.load_encoder(str(tmp_path / "matpac"))
    assert exported.input_shape == (80, 64) and exported.norm_stats == (-7.056, 4.193)
    lms = np.random.default_rng(0).normal(size=(1, 80, 64)).astype(np.float32)
    features = exported.frame_features(lms)
    assert features.shape == (1, GRID[1], GRID[0] * WIDTH) and np.isfinite(features).all()

    ecmae_file = tmp_path / "encodecmae.npz"
    np.savez(ecmae_file, **encodecmae_state_dict())
    result = _run("convert_encodecmae.py", f"--checkpoint={ecmae_file}", f"--output={tmp_path / 'ecmae'}")
    assert result.returncode == 0, result.stderr[-2000:]
    exported = encoder_lib.load_encoder(str(tmp_path / "ecmae"))
    waveform = np.random.default_rng(1).uniform(-.5, .5, (1, 6400)).astype(np.float32)
    frames, clip = exported.embed_waveform(waveform)
    assert frames.shape == (1, 6400 // encodec.HOP_LENGTH, 64) and clip.shape == (1, 64)
    assert np.isfinite(frames).all()

