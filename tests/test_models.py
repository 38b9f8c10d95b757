"""Model pieces (position table, blocks, encoder, predictor) and the M2D method's own logic."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from audiojepa.methods import m2d
from audiojepa.models import (
    VARIANTS,
    Block,
    TransformerStack,
    ViTEncoder,
    decode_variant,
    sincos_2d,
)
from audiojepa.models.vit import unstack_blocks
from audiojepa.ops import masking

INPUT_SHAPE = (80, 208)  # 5 × 13 patches


def small_config(**overrides) -> ml_collections.ConfigDict:
    config = m2d.default_config("tiny")
    config.predictor_width = 64
    config.predictor_depth = 1
    config.predictor_heads = 4
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def method():
    return m2d.M2D(small_config(), input_shape=INPUT_SHAPE)


@pytest.fixture(scope="module")
def initialized(method):
    return jax.jit(method.init)(jax.random.key(0))


# -- position table ---------------------------------------------------------------------------------


def test_sincos_2d_against_elementwise_formula():
    grid_f, grid_t, dim = 3, 5, 16
    table = sincos_2d(grid_f, grid_t, dim)
    assert table.shape == (1 + grid_f * grid_t, dim) and table.dtype == np.float32
    np.testing.assert_array_equal(table[0], 0.0)
    quarter = dim // 4
    for f in range(grid_f):
        for t in range(grid_t):
            row = table[1 + f * grid_t + t]
            for i in range(quarter):
                omega = 1.0 / 10000 ** (i / quarter)
                expected = [math.sin(t * omega), math.cos(t * omega), math.sin(f * omega), math.cos(f * omega)]
                got = [row[i], row[quarter + i], row[2 * quarter + i], row[3 * quarter + i]]
                np.testing.assert_allclose(got, expected, atol=1e-6)


def test_sincos_table_of_a_shorter_grid_is_a_truncation():
    long, short = sincos_2d(5, 38, 64, cls_token=False), sincos_2d(5, 13, 64, cls_token=False)
    np.testing.assert_array_equal(long.reshape(5, 38, 64)[:, :13], short.reshape(5, 13, 64))


# -- sizes ------------------------------------------------------------------------------------------


def test_decode_variant():
    assert decode_variant("B") == dict(width=768, depth=12, num_heads=12, mlp_dim=3072)
    assert decode_variant("L") == dict(width=1024, depth=24, num_heads=16, mlp_dim=4096)
    with pytest.raises(ValueError, match=r"'B/16'.*\['B', 'L', 'S', 'tiny'\]"):
        decode_variant("B/16")


def encoder_param_count(width, depth, num_heads, mlp_dim, patch=16 * 16):
    """Independent arithmetic: conv + CLS + blocks (2 LN, qkv, proj, fc1, fc2) + final LN."""
    del num_heads
    block = 2 * 2 * width + (width * 3 * width + 3 * width) + (width * width + width) + (
        width * mlp_dim + mlp_dim) + (mlp_dim * width + width)
    return patch * width + width + width + depth * block + 2 * width


# With 1-channel 16×16 patches and the CLS token (no position table: it is not a parameter). ViT-B is
# 85.25M; timm's image ViT-B/16 without head (85.80M) has a 3-channel patch conv and a learned table.
EXPECTED_ENCODER_PARAMS = {"tiny": 939_648, "S": 21_393_408, "B": 85_254_144, "L": 302_575_616}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_encoder_shapes_and_param_counts(variant):
    """eval_shape only: no parameters are allocated, so B and L cost nothing."""
    size = decode_variant(variant)
    encoder = ViTEncoder(**size)
    lms = jax.ShapeDtypeStruct((2, 80, 608), jnp.float32)

    def init_with_output(rng, lms):
        (out, layers), variables = encoder.init_with_output(rng, lms, return_layers=True)
        return variables["params"], out, layers

    params, out, layers = jax.eval_shape(init_with_output, jax.random.key(0), lms)
    count = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
    assert count == encoder_param_count(**size) == EXPECTED_ENCODER_PARAMS[variant]
    assert out.shape == (2, 1 + 5 * 38, size["width"]) and out.dtype == jnp.float32
    assert layers.shape == (size["depth"], 2, 1 + 5 * 38, size["width"])
    block_params = params["stack"]["blocks"]  # stacked: a leading [depth] axis on every leaf
    assert block_params["attn"]["qkv"]["kernel"].shape == (size["depth"], size["width"], 3 * size["width"])
    assert block_params["attn"]["qkv"]["bias"].shape == (size["depth"], 3 * size["width"])
    assert params["patch_embed"]["proj"]["kernel"].shape == (16, 16, 1, size["width"])


# -- block against an independent NumPy implementation ---------------------------------------------


def _np_layer_norm(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * scale + bias


def _np_block(x, p, num_heads):
    """timm Block in NumPy float64; p in our layout (kernel [in, out]; qkv columns [q|k|v], heads-major)."""
    batch, tokens, width = x.shape
    head_dim = width // num_heads
    h = _np_layer_norm(x, p["norm1"]["scale"], p["norm1"]["bias"])
    qkv = h @ p["attn"]["qkv"]["kernel"] + p["attn"]["qkv"]["bias"]
    heads = lambda part: qkv[..., part * width:(part + 1) * width].reshape(batch, tokens, num_heads, head_dim)
    q, k, v = heads(0), heads(1), heads(2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(head_dim)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attn = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, tokens, width)
    x = x + attn @ p["attn"]["proj"]["kernel"] + p["attn"]["proj"]["bias"]
    h = _np_layer_norm(x, p["norm2"]["scale"], p["norm2"]["bias"])
    h = h @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"]
    erf = np.vectorize(math.erf)
    h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
    return x + h @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]


# The tests below reuse the tiny M2D params (initialising costs seconds of XLA compile time on CPU).


def test_block_matches_numpy_reference(initialized):
    rng = np.random.default_rng(0)
    size = decode_variant("tiny")
    block = Block(num_heads=size["num_heads"], mlp_dim=size["mlp_dim"])
    x = rng.standard_normal((2, 7, size["width"])).astype(np.float32)
    # Perturb so zero biases and unit LayerNorm scales cannot hide a layout bug.
    params = jax.tree.map(lambda p: np.asarray(p) + 0.1 * rng.standard_normal(p.shape).astype(np.float32),
                          unstack_blocks(initialized[1])["blocks_0"])
    out = jax.jit(block.apply)({"params": params}, x)
    expected = _np_block(x.astype(np.float64), jax.tree.map(lambda p: p.astype(np.float64), params),
                         num_heads=size["num_heads"])
    np.testing.assert_allclose(out, expected, atol=1e-4)


def test_stack_returns_every_layer(initialized):
    size = decode_variant("tiny")
    stack = TransformerStack(size["depth"], size["num_heads"], size["mlp_dim"])
    x = np.random.default_rng(0).standard_normal((2, 5, size["width"])).astype(np.float32)
    params = initialized[1]  # the target stack; LayerNorm scale 1, bias 0 at init
    out, layers = jax.jit(lambda p, x: stack.apply({"params": p}, x, return_layers=True))(params, x)
    assert layers.shape == (size["depth"], 2, 5, size["width"])
    np.testing.assert_allclose(out, _np_layer_norm(np.asarray(layers[-1], np.float64), 1.0, 0.0), atol=1e-5)


# -- mixed precision --------------------------------------------------------------------------------


def test_bfloat16_compute_keeps_float32_params_and_close_outputs(initialized):
    lms = np.random.default_rng(0).standard_normal((2, *INPUT_SHAPE)).astype(np.float32)
    encoder32 = ViTEncoder(**decode_variant("tiny"))
    encoder16 = ViTEncoder(**decode_variant("tiny"), dtype=jnp.bfloat16)
    params = initialized[0]["encoder"]
    shapes = jax.eval_shape(encoder16.init, jax.random.key(0), lms)["params"]
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes))
    out32 = jax.jit(encoder32.apply)({"params": params}, lms)
    out16 = jax.jit(encoder16.apply)({"params": params}, lms)
    assert out16.dtype == jnp.float32
    # Outputs are LayerNorm-ed (unit scale); bf16 has an 8-bit mantissa.
    assert float(jnp.abs(out16 - out32).max()) < 0.1
    assert float(jnp.abs(out16 - out32).mean()) < 0.01
    # ... and bf16 really ran: observed mean difference 3.1e-3, while float32 reruns (eager against jit)
    # differ by at most 2.4e-7, so a dtype that is silently dropped falls far below this bound.
    assert float(jnp.abs(out16 - out32).mean()) > 3e-4


# -- predictor --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def predictor_setup(method, initialized):
    """The tiny M2D predictor (grid 5 × 13, 192 → 64 → 192) with 3 context tokens + CLS; one jitted apply."""
    rng = np.random.default_rng(0)
    context_idx = np.array([[5, 0, 9], [11, 2, 7]], np.int32)
    context = rng.standard_normal((2, 1 + 3, method.width)).astype(np.float32)
    all_positions = np.broadcast_to(np.arange(65, dtype=np.int32), (2, 65))
    params = {"params": initialized[0]["predictor"]}
    return jax.jit(method.predictor.apply), params, context, context_idx, all_positions


def test_predictor_predicts_any_subset_in_target_order(predictor_setup):
    apply, params, context, context_idx, all_positions = predictor_setup
    everywhere = np.asarray(apply(params, context, context_idx, all_positions))
    target_idx = np.array([[3, 1, 10], [0, 4, 6]], np.int32)
    subset = apply(params, context, context_idx, target_idx)
    assert subset.shape == (2, 3, 192)
    np.testing.assert_allclose(subset, np.stack([everywhere[b, target_idx[b]] for b in range(2)]), atol=1e-5)


def test_predictor_ignores_the_order_of_context_tokens(predictor_setup):
    apply, params, context, context_idx, all_positions = predictor_setup
    order = np.array([2, 0, 1])
    permuted = np.concatenate([context[:, :1], context[:, 1:][:, order]], axis=1)
    np.testing.assert_allclose(apply(params, permuted, context_idx[:, order], all_positions),
                               apply(params, context, context_idx, all_positions), atol=1e-5)


def test_sparse_predictor_sees_only_context_and_targets(method, predictor_setup):
    _, params, context, context_idx, _ = predictor_setup
    sparse = jax.jit(method.predictor.clone(full_grid=False).apply)
    target_idx = np.array([[3, 1], [0, 4]], np.int32)
    out = sparse(params, context, context_idx, target_idx)
    assert out.shape == (2, 2, 192)
    # Each query attends to the context and the other queries, so permuting targets permutes outputs.
    swapped = sparse(params, context, context_idx, target_idx[:, ::-1])
    np.testing.assert_allclose(swapped, out[:, ::-1], atol=1e-5)


def _np_sincos_positions(grid_f, grid_t, dim):
    """[F·T', dim] float64 position codes of patches f·T' + t from the formula (no CLS row): channels
    [sin(t·ω_i) | cos(t·ω_i) | sin(f·ω_i) | cos(f·ω_i)], ω_i = 10000^(-i/(dim/4)), i < dim/4."""
    omega = 1.0 / 10000 ** (np.arange(dim // 4) / (dim // 4))
    f, t = (a.reshape(-1, 1) * omega for a in np.meshgrid(np.arange(grid_f), np.arange(grid_t), indexing="ij"))
    return np.concatenate([np.sin(t), np.cos(t), np.sin(f), np.cos(f)], axis=1)


def _np_sparse_predictor(context_tokens, context_idx, target_idx, p, grid_size, num_heads):
    """Predictor(full_grid=False) in NumPy float64 (I-JEPA's predictor): embed → [CLS, context + pos(context_idx),
    mask_token + pos(target_idx)] → blocks → final LayerNorm → the target slots → head. p: per-block params
    (`blocks_i`) in our layout."""
    x = context_tokens @ p["embed"]["kernel"] + p["embed"]["bias"]
    positions = _np_sincos_positions(*grid_size, x.shape[-1])
    queries = np.broadcast_to(p["mask_token"], (x.shape[0], target_idx.shape[1], x.shape[-1])) + positions[target_idx]
    h = np.concatenate([x[:, :1], x[:, 1:] + positions[context_idx], queries], axis=1)
    blocks = sorted((name for name in p["stack"] if name.startswith("blocks_")), key=lambda n: int(n.split("_")[1]))
    for name in blocks:
        h = _np_block(h, p["stack"][name], num_heads)
    h = _np_layer_norm(h, p["stack"]["norm"]["scale"], p["stack"]["norm"]["bias"])
    return h[:, 1 + context_idx.shape[1]:] @ p["head"]["kernel"] + p["head"]["bias"]


@pytest.fixture(scope="module")
def sparse_setup(method, predictor_setup):
    """The tiny predictor with full_grid=False and perturbed params (no zero bias, no unit LayerNorm scale, a
    non-zero mask token that is not small next to the position codes), one jitted apply."""
    _, params, context, context_idx, _ = predictor_setup
    rng = np.random.default_rng(1)
    perturbed = jax.tree.map(lambda a: np.asarray(a) + 0.1 * rng.standard_normal(a.shape).astype(np.float32),
                             params["params"])
    predictor = method.predictor.clone(full_grid=False)
    return predictor, jax.jit(predictor.apply), {"params": perturbed}, context, context_idx


def test_sparse_predictor_matches_numpy_reference(sparse_setup):
    """The whole sparse forward (embed, both sets of position codes, the mask token, blocks, final norm, head)
    against float64 NumPy, at 1e-4 absolute (float32 against float64, outputs of order 1)."""
    predictor, apply, params, context, context_idx = sparse_setup
    target_idx = np.array([[3, 1, 10, 64], [0, 4, 6, 12]], np.int32)  # none of them a context position
    out = np.asarray(apply(params, context, context_idx, target_idx))
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
    p["stack"] = unstack_blocks(p["stack"])  # blocks_0 … and norm
    expected = _np_sparse_predictor(context.astype(np.float64), context_idx, target_idx, p, predictor.grid_size,
                                    predictor.num_heads)
    assert out.shape == expected.shape == (2, 4, 192)
    assert np.abs(expected).max() > 0.5  # not a trivially small output
    np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)


def test_sparse_predictor_queries_carry_their_positions(sparse_setup):
    """All queries start from the same mask token, so only their position codes tell them apart: one position
    asked twice gives the same prediction twice, two positions give different predictions."""
    _, apply, params, context, context_idx = sparse_setup
    out = np.asarray(apply(params, context, context_idx, np.array([[3, 3, 40], [3, 3, 40]], np.int32)))
    np.testing.assert_allclose(out[:, 0], out[:, 1], atol=1e-5)
    assert np.abs(out[:, 2] - out[:, 0]).max(-1).min() > 1e-2


def test_sparse_predictor_context_tokens_carry_their_positions(sparse_setup):
    """The same context tokens at other patch positions change every prediction; permuting tokens together with
    their positions changes nothing (attention has no other notion of order)."""
    _, apply, params, context, context_idx = sparse_setup
    target_idx = np.array([[3, 1], [0, 4]], np.int32)
    out = np.asarray(apply(params, context, context_idx, target_idx))
    moved = context_idx.copy()
    moved[:, 2] += 1  # 9 → 10 and 7 → 8: still distinct and not targets
    out_moved = np.asarray(apply(params, context, moved, target_idx))
    assert np.abs(out_moved - out).max(-1).min() > 1e-3
    order = np.array([2, 0, 1])
    permuted = np.concatenate([context[:, :1], context[:, 1:][:, order]], axis=1)
    np.testing.assert_allclose(apply(params, permuted, context_idx[:, order], target_idx), out, atol=1e-5)


# -- M2D method -------------------------------------------------------------------------------------


def test_m2d_config_errors():
    config = small_config()
    del config["mask_ratio"]
    with pytest.raises(KeyError, match="mask_ratio"):
        m2d.M2D(config, input_shape=INPUT_SHAPE)
    with pytest.raises(ValueError, match="loss_type"):
        m2d.M2D(small_config(loss_type="l1"), input_shape=INPUT_SHAPE)
    with pytest.raises(ValueError, match="patch_size"):
        m2d.M2D(small_config(), input_shape=(80, 200))
    with pytest.raises(ValueError, match="variant"):
        m2d.M2D(small_config(variant="XL"), input_shape=INPUT_SHAPE)


def test_m2d_param_trees(method, initialized):
    params, target_params = initialized
    assert set(params) == {"encoder", "predictor"}
    assert set(params["encoder"]) == {"patch_embed", "cls_token", "stack"}
    assert set(params["predictor"]) == {"embed", "mask_token", "stack", "head"}
    assert jax.tree.structure(target_params) == jax.tree.structure(params["encoder"]["stack"])
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves((params, target_params)))
    # Independent init: the target stack is not a copy of the online stack.
    online_qkv = params["encoder"]["stack"]["blocks"]["attn"]["qkv"]["kernel"]
    assert not np.allclose(target_params["blocks"]["attn"]["qkv"]["kernel"], online_qkv)
    # Each block gets its own init: no two rows of a stacked kernel are equal.
    assert not np.allclose(online_qkv[0], online_qkv[1])
    # Official init: CLS and mask tokens N(0, 0.02); zero Linear biases; LayerNorm 1/0.
    assert 0.01 < float(jnp.std(params["encoder"]["cls_token"])) < 0.03
    np.testing.assert_array_equal(params["predictor"]["embed"]["bias"], 0.0)
    np.testing.assert_array_equal(target_params["norm"]["scale"], 1.0)


def test_init_target_from_online(initialized):
    method = m2d.M2D(small_config(init_target_from_online=True), input_shape=INPUT_SHAPE)
    params, _ = initialized
    target_params = jax.jit(method.init_target)(jax.random.key(1), params)
    assert jax.tree.structure(target_params) == jax.tree.structure(params["encoder"]["stack"])
    for a, b in zip(jax.tree.leaves(target_params), jax.tree.leaves(params["encoder"]["stack"])):
        np.testing.assert_array_equal(a, b)


def test_weight_decay_mask(method, initialized):
    params, _ = initialized
    mask = method.weight_decay_mask(params)
    assert jax.tree.structure(mask) == jax.tree.structure(params)
    for path, decay in jax.tree_util.tree_leaves_with_path(mask):
        name = jax.tree_util.keystr(path)
        if name.endswith("['bias']") or name.endswith("['scale']"):
            assert decay is False, name
        else:
            assert decay is True, name
    assert mask["encoder"]["cls_token"] and mask["predictor"]["mask_token"]
    assert mask["encoder"]["patch_embed"]["proj"]["kernel"]


def test_ema_schedule_endpoints(method):
    assert float(method.ema_decay(0, 1000)) == pytest.approx(0.99995, abs=1e-7)
    assert float(method.ema_decay(999, 1000)) == pytest.approx(0.99999, abs=1e-7)
    assert float(method.ema_decay(499.5, 1000)) == pytest.approx(0.99997, abs=1e-7)
    assert float(method.ema_decay(5000, 1000)) == pytest.approx(0.99999, abs=1e-7)


def test_ema_update_against_numpy():
    method = m2d.M2D(small_config(ema_decay_init=0.9, ema_decay=0.5), input_shape=INPUT_SHAPE)
    rng = np.random.default_rng(0)
    target = {"a": rng.standard_normal((3, 2)).astype(np.float32),
              "b": {"c": rng.standard_normal(4).astype(np.float32)}}
    online = jax.tree.map(lambda x: x + rng.standard_normal(x.shape).astype(np.float32), target)
    step, total = 3, 11
    tau = 0.9 + (0.5 - 0.9) * step / (total - 1)
    new = method.update_targets({"encoder": {"stack": online}}, target, step, total)
    expected = jax.tree.map(lambda t, o: tau * t.astype(np.float64) + (1 - tau) * o, target, online)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_m2d_loss_on_an_explicit_mesh(method, initialized):
    """The loss with a sampled mask, jitted with the batch sharded over an Explicit mesh as the trainer
    may run it: every op keeps the batch sharding (no all-gather). Gradients: test_m2d_parity."""
    params, target_params = initialized
    lms = np.random.default_rng(0).standard_normal((4, *INPUT_SHAPE)).astype(np.float32)

    @jax.jit
    def run(params, lms, rng):
        loss, metrics = method.loss(params, target_params, {"lms": lms}, rng, 0)
        return loss, metrics, method.encode(params, lms)

    num_devices = min(jax.device_count(), lms.shape[0])
    mesh = jax.make_mesh((num_devices,), ("data",), axis_types=(AxisType.Explicit,),
                         devices=jax.devices()[:num_devices])
    with jax.set_mesh(mesh):
        lms = jax.device_put(lms, P("data"))
        params = jax.device_put(params, P())
        compiled = run.lower(params, lms, jax.random.key(3)).compile()
        loss, metrics, encoded = compiled(params, lms, jax.random.key(3))
    assert "all-gather" not in compiled.as_text()
    assert np.isfinite(float(loss)) and 0.0 < float(loss) < 4.0  # 2 - 2·cos lies in [0, 4]
    assert set(metrics) >= {"loss", "target_std", "pred_std"}
    assert encoded.shape == (4, 1 + 65, 192)
    assert method.num_visible == masking.num_visible(65, 0.7) == 19


def test_loss_options_reach_the_loss(method, initialized, monkeypatch):
    """config.model.loss_type / norm_target are what prediction_loss receives (traced only, no compile)."""
    seen = {}

    def recording_loss(pred, target, *, loss_type, norm_target):
        seen.update(loss_type=loss_type, norm_target=norm_target, shape=pred.shape)
        return jnp.mean(pred), {}

    monkeypatch.setattr(m2d, "prediction_loss", recording_loss)
    mse = m2d.M2D(small_config(loss_type="mse", norm_target=False), input_shape=INPUT_SHAPE)
    lms = jax.ShapeDtypeStruct((2, *INPUT_SHAPE), jnp.float32)
    jax.eval_shape(mse.loss, *initialized, {"lms": lms}, jax.random.key(0), 0)
    assert seen == {"loss_type": "mse", "norm_target": False, "shape": (2, 46, 192)}


def test_attention_key_bias_gets_no_gradient():
    """The key third of the qkv bias adds q·b_k to every score of a query, which softmax cancels: its
    gradient is zero up to float32 rounding. (Adam turns that rounding noise into ±lr steps, so runs that
    reduce in another order differ there, and only there: run_helpers.assert_states_close.)"""
    block = Block(num_heads=3, mlp_dim=96)
    x = jax.random.normal(jax.random.key(0), (2, 7, 48))
    params = block.init(jax.random.key(1), x)["params"]
    target = jax.random.normal(jax.random.key(2), x.shape)
    grads = jax.jit(jax.grad(lambda p: ((block.apply({"params": p}, x) - target) ** 2).sum()))(params)
    g = np.asarray(grads["attn"]["qkv"]["bias"]).reshape(3, 48)  # [q, k, v] thirds, as Attention splits them
    assert np.abs(g[0]).max() > 1e-2 and np.abs(g[2]).max() > 1e-2
    assert np.abs(g[1]).max() < 1e-5 * np.abs(g[0]).max()


@pytest.mark.parametrize("patch_size,n_mels,frames", [((16, 16), 80, 64), ((16, 8), 64, 40), ((8, 4), 16, 12), ((16, 16), 80, 70)])
def test_patch_embed_matches_numpy_per_patch_projection(patch_size, n_mels, frames):
    """Each token is the dot product of one patch (frequency-major tokens) with the [pf, pt, 1, D] kernel,
    plus the bias: a NumPy transcription of the conv with stride = kernel = patch size ("VALID": frames past
    the last whole patch are dropped)."""
    from audiojepa.models.vit import PatchEmbed
    lms = np.random.default_rng(0).standard_normal((3, n_mels, frames)).astype(np.float32)
    embed = PatchEmbed(24, patch_size)
    params = embed.init(jax.random.key(1), jnp.asarray(lms))["params"]
    assert params["proj"]["kernel"].shape == (*patch_size, 1, 24) and params["proj"]["bias"].shape == (24,)
    out = np.asarray(embed.apply({"params": params}, jnp.asarray(lms)))
    kernel, bias = np.asarray(params["proj"]["kernel"], np.float64), np.asarray(params["proj"]["bias"], np.float64)
    pf, pt = patch_size
    grid_f, grid_t = n_mels // pf, frames // pt
    expected = np.empty((3, grid_f * grid_t, 24))
    for f in range(grid_f):
        for t in range(grid_t):
            patch = lms[:, f * pf:(f + 1) * pf, t * pt:(t + 1) * pt].astype(np.float64)
            expected[:, f * grid_t + t] = np.einsum("bij,ijd->bd", patch, kernel[:, :, 0]) + bias
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
