"""EncodecMAE: span masks at the reference settings, the mask-token re-insertion, the model sizes, the ResiDual
stack, the weighted loss, γ_q from quantization errors, k-means against scikit-learn, and a jitted loss+grad
on the tiny model with on-device and precomputed targets (stage 1 and self-training).

Independent references are NumPy (float64) or scikit-learn. The general span-mask statistics at T = 300 are in
tests/test_masking.py; here only what the method's default config draws. Random EnCodec weights throughout
(the EnCodec parity tests are tests/test_encodec.py).
"""

import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from audiojepa.methods import encodecmae_loss
from audiojepa.methods.encodecmae import EncodecMAE, default_config
from audiojepa.models import encodec
from audiojepa.models import encodecmae as mae
from audiojepa.ops import kmeans

FIXTURES = Path(os.environ.get("AUDIOJEPA_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
ENCODEC_STATE_DICT = FIXTURES / "encodec" / "encodec24k_random_state.npz"
TOL = dict(rtol=1e-5, atol=1e-6)  # float32 against a float64 NumPy reference
TEST_SAMPLES = 4800  # 0.2 s at 24 kHz → 15 frames
TEST_SPAN = 5


def tiny_config(**overrides):
    config = default_config("tiny")
    config.mask_span = TEST_SPAN
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def method():
    return EncodecMAE(tiny_config(), input_shape=(TEST_SAMPLES,))


@pytest.fixture(scope="module")
def state(method):
    return jax.jit(method.init)(jax.random.key(1))


@pytest.fixture(scope="module")
def waveform():
    return jax.random.uniform(jax.random.key(2), (2, TEST_SAMPLES), minval=-0.5, maxval=0.5)


def _runs(row):
    """(starts, ends) of the runs of True in a 1-D bool array, ends exclusive."""
    edges = np.diff(np.concatenate([[0], row.astype(np.int8), [0]]))
    return np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)


# -- masking ----------------------------------------------------------------------------------------

def test_default_config_masks_half_of_4s_in_15_frame_spans():
    method = EncodecMAE(default_config("tiny"), input_shape=(4 * encodec.SAMPLE_RATE,))
    assert method.num_frames == 300
    num_draws = 200
    visible, masked = (np.asarray(a) for a in jax.jit(method.sample_mask, static_argnums=(1, 2))(
        jax.random.key(0), num_draws, method.num_frames))
    assert visible.shape == (num_draws, 150) and masked.shape == (num_draws, 150)
    np.testing.assert_array_equal(np.sort(np.concatenate([visible, masked], 1), 1),
                                  np.tile(np.arange(300), (num_draws, 1)))
    is_masked = np.zeros((num_draws, 300), bool)
    np.put_along_axis(is_masked, masked, True, axis=1)
    for row in is_masked:  # spans of 15 merge into longer runs; only the last, cut span can be shorter
        starts, ends = _runs(row)
        assert ((ends - starts) < 15).sum() <= 1
    assert is_masked.any(0).all()  # every frame is masked in some draw, the edge frames included


# -- model pieces -----------------------------------------------------------------------------------

def test_insert_mask_tokens_puts_every_token_at_its_frame():
    batch, frames, dim, num_visible = 3, 11, 4, 6
    rng = np.random.default_rng(0)
    order = np.stack([rng.permutation(frames) for _ in range(batch)])  # any order, not only ascending
    visible_idx, masked_idx = order[:, :num_visible], order[:, num_visible:]
    tokens = rng.standard_normal((batch, num_visible, dim)).astype(np.float32)
    mask_token = np.arange(dim, dtype=np.float32) + 100.0

    out = np.asarray(mae.insert_mask_tokens(jnp.asarray(tokens), jnp.asarray(visible_idx), jnp.asarray(masked_idx),
                                            jnp.asarray(mask_token)))
    expected = np.zeros((batch, frames, dim), np.float32)
    for b in range(batch):
        expected[b, masked_idx[b]] = mask_token
        expected[b, visible_idx[b]] = tokens[b]
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(mae.frame_mask(jnp.asarray(masked_idx), frames),
                                  (expected == mask_token).all(-1))
    zeros = mae.insert_mask_tokens(jnp.asarray(tokens), jnp.asarray(visible_idx), jnp.asarray(masked_idx))
    np.testing.assert_array_equal(zeros, np.where((expected == mask_token).all(-1, keepdims=True), 0.0, expected))


def np_sinusoid(length, dim):
    """The reference's interleaved table in float64: channel 2i = sin(t·ω_i), 2i+1 = cos(t·ω_i)."""
    position = np.arange(length)[:, None]
    div = np.exp(np.arange(0, dim, 2) * (-np.log(10000.0) / dim))
    table = np.zeros((length, dim))
    table[:, 0::2], table[:, 1::2] = np.sin(position * div), np.cos(position * div)
    return table


def test_sinusoid_table_is_the_interleaved_reference():
    np.testing.assert_allclose(mae.sinusoid_table(7, 10), np_sinusoid(7, 10), **TOL)


def np_layer_norm(x, p, eps=mae.LAYERNORM_EPS):
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def np_attention(x, p, num_heads):
    batch, frames, _ = x.shape
    q, k, v = (np.einsum("btd,de->bte", x, p[name]["kernel"]) for name in ("query", "key", "value"))
    head_dim = q.shape[-1] // num_heads
    split = [a.reshape(batch, frames, num_heads, head_dim) for a in (q, k, v)]
    logits = np.einsum("bqhd,bkhd->bhqk", split[0], split[1]) * head_dim ** -0.5
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", weights, split[2]).reshape(batch, frames, -1)
    return out @ p["out"]["kernel"]


def np_residual_stack(x, p, num_heads):
    """ResiDualStack in NumPy: (x0 + LN(x1), [depth, ...] every layer's x0). The FFN is the stack's shared
    `ffn` when the params have one, else each layer's own `layers_{i}/ffn`."""
    x0 = x1 = x
    layers = []
    for i in range(sum(name.startswith("layers_") for name in p)):
        layer = p[f"layers_{i}"]
        ffn = p["ffn"] if "ffn" in p else layer["ffn"]
        a = np_attention(x0, layer["attn"], num_heads)
        x0, x1 = np_layer_norm(x0 + a, layer["norm1"]), x1 + a
        f = np.maximum(x0 @ ffn["fc1"]["kernel"] + ffn["fc1"]["bias"], 0) @ ffn["fc2"]["kernel"] + ffn["fc2"]["bias"]
        x0, x1 = np_layer_norm(x0 + f, layer["norm2"]), x1 + f
        layers.append(x0)
    return x0 + np_layer_norm(x1, p["final_norm"]), np.stack(layers)


@pytest.mark.parametrize("share_ffn", [True, False])
def test_residual_stack_matches_numpy(share_ffn):
    """Shared FFN (the reference's) and one FFN per layer (the "residual" kind of test_perf_options)."""
    depth, heads, width, ff_dim = 2, 2, 8, 16
    x = jax.random.normal(jax.random.key(0), (2, 5, width))
    stack = mae.ResiDualStack(depth, heads, ff_dim, share_ffn=share_ffn)
    shapes = jax.eval_shape(stack.init, jax.random.key(1), x)["params"]
    if share_ffn:
        assert set(shapes) == {"ffn", "final_norm", "layers_0", "layers_1"} and "ffn" not in shapes["layers_0"]
    else:
        assert set(shapes) == {"final_norm", "layers_0", "layers_1"}
        assert all(set(shapes[f"layers_{i}"]) == {"attn", "norm1", "ffn", "norm2"} for i in range(depth))
    for ffn in [shapes["ffn"]] if share_ffn else [shapes[f"layers_{i}"]["ffn"] for i in range(depth)]:
        assert (ffn["fc1"]["kernel"].shape, ffn["fc2"]["kernel"].shape) == ((width, ff_dim), (ff_dim, width))
    # Random values everywhere (norm scales around 1, non-zero biases), so a swapped or missing piece cannot hide.
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: (0.3 * rng.standard_normal(a.shape) + (a.ndim == 1)).astype(np.float32), shapes)
    out, layers = jax.jit(lambda p: stack.apply({"params": p}, x, return_layers=True))(params)

    expected, expected_layers = np_residual_stack(np.asarray(x, np.float64),
                                                  jax.tree.map(lambda a: np.asarray(a, np.float64), params), heads)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layers, expected_layers, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size, encoder_m, decoder_m, head_m, total_m", [
    ("small", 18.11, 11.02, 6.30, 36.1), ("base", 29.92, 11.02, 6.30, 47.9), ("large", 92.04, 16.76, 8.40, 118.4)])
def test_parameter_counts_match_the_reference(size, encoder_m, decoder_m, head_m, total_m):
    """§1.2's counts, measured on the reference's own modules (shared FFN; large: 12 heads of 85 channels)."""
    model = mae.EncodecMAEModel(**mae.decode_variant(size))
    visible_idx, masked_idx = jnp.arange(150)[None], jnp.arange(150, 300)[None]
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 300, 128)), visible_idx, masked_idx)
    millions = {key: sum(a.size for a in jax.tree.leaves(tree)) / 1e6 for key, tree in shapes["params"].items()}
    assert round(millions["encoder"], 2) == encoder_m
    assert round(millions["decoder"], 2) == decoder_m
    assert round(millions["head"], 2) == head_m
    assert round(sum(millions.values()), 1) == total_m


def test_tiny_model_shapes_and_the_encoder_sees_visible_frames_only(method, state):
    params, _ = state
    batch, frames = 2, method.num_frames
    num_visible = frames - frames // 2
    order = np.stack([np.random.default_rng(b).permutation(frames) for b in range(batch)])
    visible_idx, masked_idx = (jnp.asarray(np.sort(a, 1)) for a in np.split(order, [num_visible], 1))
    features = jax.random.normal(jax.random.key(4), (batch, frames, 128))
    forward = jax.jit(lambda f: method.model.apply({"params": params}, f, visible_idx, masked_idx))
    out = forward(features)
    assert out["codes"].shape == (batch, frames, 8, 1024) and out["codes"].dtype == jnp.float32
    assert out["encoded"].shape == (batch, num_visible, 64)
    # New values on the masked frames only: the encoder never sees them, and the decoder gets zeros and
    # positions there, so nothing changes.
    changed = jnp.where(mae.frame_mask(masked_idx, frames)[..., None], 5.0, features)
    out_changed = forward(changed)
    np.testing.assert_array_equal(out_changed["encoded"], out["encoded"])
    np.testing.assert_array_equal(out_changed["codes"], out["codes"])
    # A visible frame does matter.
    changed_visible = features.at[:, visible_idx[0, 0]].add(1.0)
    assert not np.allclose(forward(changed_visible)["codes"], out["codes"])


@pytest.mark.parametrize("learned_mask_token", [False, True])
def test_model_forward_matches_numpy(learned_mask_token):
    """EncodecMAEModel.__call__ against NumPy float64: input_proj, + s_enc·table, the visible frames (in
    visible_idx's order, not sorted), the encoder stack, decoder_proj, the mask token (zeros, or the learned
    one) at the masked frames, + s_dec·table, the decoder stack, the head. Random params everywhere and
    position scales 0.6 and 1.7 (not 1, and different, so a dropped or swapped scale shows). Tolerance as
    the stack's: 1e-5 (float32 against float64, values of order 1)."""
    heads, num_codebooks, codebook_size = 2, 2, 5
    model = mae.EncodecMAEModel(width=8, encoder_depth=2, decoder_depth=1, num_heads=heads, ff_dim=16,
                                num_codebooks=num_codebooks, codebook_size=codebook_size,
                                learned_mask_token=learned_mask_token)
    batch, frames, num_visible = 2, 7, 4
    rng = np.random.default_rng(0)
    order = np.stack([rng.permutation(frames) for _ in range(batch)]).astype(np.int32)
    visible_idx, masked_idx = order[:, :num_visible], order[:, num_visible:]
    features = rng.standard_normal((batch, frames, 128)).astype(np.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), features, visible_idx, masked_idx)["params"]
    params = jax.tree.map(lambda a: (0.3 * rng.standard_normal(a.shape) + (a.ndim == 1)).astype(np.float32), shapes)
    params["encoder_positions"]["scale"], params["decoder_positions"]["scale"] = np.float32(0.6), np.float32(1.7)
    out = jax.jit(model.apply)({"params": params}, features, visible_idx, masked_idx)

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    table = np_sinusoid(frames, 8)
    x = features.astype(np.float64) @ p["input_proj"]["kernel"] + p["input_proj"]["bias"] + 0.6 * table
    encoded, _ = np_residual_stack(np.take_along_axis(x, visible_idx[..., None], axis=1), p["encoder"], heads)
    decoder_in = np.zeros((batch, frames, 8))
    for b in range(batch):
        decoder_in[b, visible_idx[b]] = encoded[b] @ p["decoder_proj"]["kernel"] + p["decoder_proj"]["bias"]
        decoder_in[b, masked_idx[b]] = p["mask_token"] if learned_mask_token else 0.0
    decoded, _ = np_residual_stack(decoder_in + 1.7 * table, p["decoder"], heads)
    codes = (decoded @ p["head"]["kernel"] + p["head"]["bias"]).reshape(batch, frames, num_codebooks, codebook_size)
    np.testing.assert_allclose(out["encoded"], encoded, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["codes"], codes, rtol=1e-5, atol=1e-5)
    # Every masked frame enters the decoder as the same token; only its position code sets it apart.
    for b in range(batch):
        first, second = masked_idx[b, :2]
        assert np.abs(np.asarray(out["codes"][b, first] - out["codes"][b, second])).max() > 1e-2


def test_encode_and_variants_shapes(method, state, waveform):
    params, _ = state
    frames = method.num_frames
    assert jax.eval_shape(method.encode, params, waveform).shape == (2, frames, 64)
    assert jax.eval_shape(method.encode, params, jnp.zeros((2, frames, 128))).shape == (2, frames, 64)
    learned = EncodecMAE(tiny_config(learned_mask_token=True, stack_type="pre_ln", share_ffn=False),
                         input_shape=(TEST_SAMPLES,))
    learned_params, _ = jax.eval_shape(learned.init, jax.random.key(0))
    assert learned_params["mask_token"].shape == (64,)
    assert learned_params["encoder"]["blocks"]["attn"]["qkv"]["kernel"].shape[0] == 2  # a vit.TransformerStack
    with pytest.raises(ValueError, match="share_ffn"):
        EncodecMAE(tiny_config(stack_type="pre_ln"), input_shape=(TEST_SAMPLES,))
    with pytest.raises(ValueError, match="codebook_weights"):
        EncodecMAE(tiny_config(num_codebooks=4), input_shape=(TEST_SAMPLES,))


# -- loss -------------------------------------------------------------------------------------------

def np_cross_entropy(logits, target):
    logits = np.asarray(logits, np.float64)
    return np.log(np.sum(np.exp(logits - logits.max()))) + logits.max() - logits[target]


def test_weighted_loss_normalises_by_batch_level_frame_counts():
    weighted_stream_loss = jax.jit(encodecmae_loss.weighted_stream_loss)
    rng = np.random.default_rng(0)
    batch, frames, streams, classes = 2, 4, 2, 3
    logits = rng.standard_normal((batch, frames, streams, classes)).astype(np.float32)
    targets = rng.integers(0, classes, (batch, frames, streams))
    # Different counts per example (1 and 3 masked), so a per-example mean would give another value.
    is_masked = np.array([[False, True, False, False], [True, True, False, True]])
    weights, delta = np.array([0.7, 0.3]), 0.9

    sums, counts = {True: 0.0, False: 0.0}, {True: 0, False: 0}
    for b in range(batch):
        for t in range(frames):
            m = bool(is_masked[b, t])
            counts[m] += 1
            sums[m] += sum(weights[s] * np_cross_entropy(logits[b, t, s], targets[b, t, s]) for s in range(streams))
    masked, visible = sums[True] / counts[True], sums[False] / counts[False]

    loss, terms = weighted_stream_loss(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(is_masked), weights,
                                       delta)
    np.testing.assert_allclose(terms["masked"], masked, **TOL)
    np.testing.assert_allclose(terms["visible"], visible, **TOL)
    np.testing.assert_allclose(loss, delta * masked + (1 - delta) * visible, **TOL)

    # By hand: uniform logits give CE = ln K everywhere, so loss = Σ_s w_s·ln K whatever the mask and δ.
    uniform, _ = weighted_stream_loss(jnp.zeros_like(logits), jnp.asarray(targets), jnp.asarray(is_masked), weights,
                                      delta)
    np.testing.assert_allclose(uniform, np.log(3.0), **TOL)
    # And one confident, correct masked frame: its CE is ~0 while the others keep ln 3.
    confident = np.zeros_like(logits)
    confident[0, 1, 0, targets[0, 1, 0]] = 50.0
    _, terms = weighted_stream_loss(jnp.asarray(confident), jnp.asarray(targets), jnp.asarray(is_masked), weights,
                                    delta)
    np.testing.assert_allclose(terms["masked"], (4 * np.log(3.0) - 0.7 * np.log(3.0)) / 4, rtol=1e-5)


def test_reference_codebook_weights():
    gamma = np.asarray(encodecmae_loss.REFERENCE_CODEBOOK_WEIGHTS)
    assert gamma.shape == (8,) and abs(gamma.sum() - 1.0) < 1e-6 and (np.diff(gamma) < 0).all()
    assert default_config().codebook_weights == encodecmae_loss.REFERENCE_CODEBOOK_WEIGHTS


def test_codebook_weights_from_quantization_errors_on_an_exact_rvq():
    """Two codebooks that the RVQ decodes exactly: x = c0[i] + c1[j] with ‖c0‖ = 10, ‖c1‖ = 1 on the axes,
    so stage 0 picks i, stage 1 picks j, and the errors are e_0 = mean‖x‖², e_1 = 1, e_2 = 0."""
    axes = np.concatenate([np.eye(4), -np.eye(4)])  # 8 entries in 4-D
    codebooks = np.stack([10.0 * axes, axes]).astype(np.float32)
    rng = np.random.default_rng(0)
    i, j = rng.integers(0, 8, 64), rng.integers(0, 8, 64)
    x = (codebooks[0][i] + codebooks[1][j]).reshape(2, 32, 4)
    errors = np.asarray(encodecmae_loss.rvq_quantization_errors(jnp.asarray(codebooks), jnp.asarray(x), 2))
    e0 = np.mean(np.sum(x.astype(np.float64) ** 2, -1))
    np.testing.assert_allclose(errors, [e0, 1.0, 0.0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(encodecmae_loss.codebook_weights_from_errors(errors, "residual"),
                               [e0 / (e0 + 1), 1 / (e0 + 1)], rtol=1e-5)
    np.testing.assert_allclose(encodecmae_loss.codebook_weights_from_errors(errors, "error_reduction"),
                               [(e0 - 1) / e0, 1 / e0], rtol=1e-5)
    centered = np.asarray(encodecmae_loss.rvq_quantization_errors(jnp.asarray(codebooks), jnp.asarray(x), 2,
                                                                  centered=True))
    flat = x.reshape(-1, 4).astype(np.float64)
    np.testing.assert_allclose(centered[0], np.sum(flat.var(0)), rtol=1e-5)

    # Errors that shrink by r per stage: both rules give γ_{q+1} / γ_q = r.
    geometric = 0.8 ** np.arange(9)
    for rule in encodecmae_loss.WEIGHT_RULES:
        gamma = encodecmae_loss.codebook_weights_from_errors(geometric, rule)
        np.testing.assert_allclose(gamma[1:] / gamma[:-1], 0.8, rtol=1e-12)
        np.testing.assert_allclose(gamma.sum(), 1.0, rtol=1e-12)
    with pytest.raises(ValueError, match="errors must not increase"):
        encodecmae_loss.codebook_weights_from_errors([1.0, 2.0, 0.5], "error_reduction")


# -- k-means ----------------------------------------------------------------------------------------

def _same_partition(a, b):
    """Labels equal up to a permutation of the cluster ids."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.fixture(scope="module")
def blobs():
    """Five well-separated Gaussian blobs in 6-D and scikit-learn's KMeans fit (k-means++, Lloyd, n_init=1)."""
    from sklearn.cluster import KMeans
    from sklearn.datasets import make_blobs

    features, _ = make_blobs(n_samples=700, centers=5, n_features=6, cluster_std=0.6, random_state=0)
    features = features.astype(np.float32)
    return features, KMeans(5, n_init=1, random_state=0).fit(features)


def test_kmeans_matches_sklearn_on_separated_blobs(blobs):
    features, reference = blobs
    history = []
    for key, data in ((0, features), (1, jnp.asarray(features))):  # chunks sliced on the host and on device
        centroids, inertia = kmeans.kmeans(jax.random.key(key), data, 5, chunk_size=128, callback=history.append)
        np.testing.assert_allclose(inertia, reference.inertia_, rtol=1e-4)
        labels = kmeans.assign_in_chunks(centroids, features, chunk_size=128)  # 700 rows: a partial last chunk
        assert _same_partition(labels, reference.labels_)
    assert history[0]["iteration"] == 1 and all(h["num_empty"] == 0 for h in history)
    batched = jax.jit(kmeans.assign)(jnp.asarray(centroids), jnp.asarray(features).reshape(7, 100, 6))
    np.testing.assert_array_equal(np.asarray(batched).reshape(-1), labels)

    # Random init may stop in a local optimum (two seeds in one blob); with tol=0 it runs to a Lloyd fixed
    # point, where every centroid is the mean of its frames.
    centroids, inertia = kmeans.kmeans(jax.random.key(0), features, 5, init="random", chunk_size=128, tol=0.0)
    assert inertia >= reference.inertia_ * (1 - 1e-4)
    labels = kmeans.assign_in_chunks(centroids, features, chunk_size=128)
    means = np.stack([features[labels == j].mean(0) for j in range(5)])
    np.testing.assert_allclose(centroids, means, rtol=1e-4, atol=1e-3)


def test_kmeans_reseeds_empty_clusters(blobs):
    features, reference = blobs
    init = np.concatenate([reference.cluster_centers_[:4], np.full((1, 6), 1e3)]).astype(np.float32)
    history = []
    centroids, inertia = kmeans.kmeans(jax.random.key(0), features, 5, init=init, chunk_size=128,
                                       callback=history.append)
    assert history[0]["num_empty"] == 1 and history[-1]["num_empty"] == 0  # the far centroid got no frame
    assert np.isfinite(centroids).all() and np.isfinite(inertia)
    counts = np.bincount(kmeans.assign_in_chunks(centroids, features, chunk_size=128), minlength=5)
    assert (counts > 0).all()


# -- the method ------------------------------------------------------------------------------------

@pytest.mark.skipif(not ENCODEC_STATE_DICT.exists(), reason=f"no EnCodec fixture at {ENCODEC_STATE_DICT}")
def test_encodec_checkpoint_from_a_state_dict_or_a_converted_folder(tmp_path):
    from audiojepa.models import encodec_torch

    converted = encodec_torch.convert(encodec_torch.load_state_dict(ENCODEC_STATE_DICT))
    encodec_torch.save_params(converted, str(tmp_path))
    for checkpoint in (ENCODEC_STATE_DICT, tmp_path):
        method = EncodecMAE(tiny_config(encodec_checkpoint=str(checkpoint)), input_shape=(TEST_SAMPLES,))
        loaded = method.encodec_params
        np.testing.assert_array_equal(loaded["codebooks"], converted["codebooks"][:8])  # only the n_q used
        jax.tree.map(np.testing.assert_array_equal, loaded["encoder"], converted["encoder"])
    # The checkpoint is read on first use (an exported encoder brings its own EnCodec and never reads it).
    missing = EncodecMAE(tiny_config(encodec_checkpoint=str(tmp_path / "missing")), input_shape=(TEST_SAMPLES,))
    with pytest.raises(FileNotFoundError, match="encodec_checkpoint"):
        missing.encodec_params


# -- the method: jitted loss + grad -----------------------------------------------------------------

def test_loss_and_grad_same_for_on_device_and_precomputed_targets(method, state, waveform):
    params, target_params = state
    assert set(target_params) == {"encodec"}
    assert target_params["encodec"]["codebooks"].shape == (8, 1024, 128)

    @jax.jit
    def on_device_and_precomputed(params, target_params, waveform):
        def loss_and_grad(batch):
            return jax.value_and_grad(method.loss, has_aux=True)(params, target_params, batch, jax.random.key(5), 0)
        features, codes = encodec.encode(target_params["encodec"], waveform, 8)
        codes = jnp.concatenate([codes, codes], -1)  # codebooks beyond n_q are ignored
        return loss_and_grad({"waveform": waveform}), loss_and_grad({"features": features, "codes": codes})

    ((loss, metrics), grads), ((loss_pre, _), grads_pre) = on_device_and_precomputed(params, target_params, waveform)
    assert np.isfinite(loss) and set(metrics) == {"loss", "loss_masked", "loss_visible", "loss_codes",
                                                  "accuracy_masked"}
    np.testing.assert_allclose(loss_pre, loss, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_pre, grads)
    # A fresh model is near chance: CE ≈ ln 1024 per codebook and Σ γ_q = 1.
    assert abs(float(loss) - np.log(1024)) < 0.5
    np.testing.assert_allclose(metrics["loss"], 0.9 * metrics["loss_masked"] + 0.1 * metrics["loss_visible"], rtol=1e-6)
    assert float(jnp.abs(grads["head"]["kernel"]).max()) > 0 and float(jnp.abs(grads["input_proj"]["kernel"]).max()) > 0
    assert method.update_targets(params, target_params, 0, 10) is target_params
    assert all(jax.tree.leaves(method.weight_decay_mask(params)))  # the reference decays everything


@pytest.mark.parametrize("targets", ["codes+kmeans", "kmeans"])
def test_self_training_loss_with_teacher_ids_and_precomputed_ids(method, state, waveform, targets):
    stage1_params, _ = state
    num_clusters = 16
    student = EncodecMAE(tiny_config(targets=targets, num_clusters=num_clusters), input_shape=(TEST_SAMPLES,))
    centroids = jax.random.normal(jax.random.key(6), (num_clusters, 64))
    params, target_params = student.start_self_training(stage1_params, centroids, jax.random.key(7))
    assert set(target_params) == {"encodec", "teacher", "centroids"}
    np.testing.assert_array_equal(params["encoder"]["ffn"]["fc1"]["kernel"],
                                  stage1_params["encoder"]["ffn"]["fc1"]["kernel"])
    assert ("head" in params) == (targets == "codes+kmeans") and params["kmeans_head"]["kernel"].shape == (64, 16)
    # The init-time structure (placeholders) is the one start_self_training builds, so checkpoints restore.
    assert jax.tree.structure(jax.eval_shape(student.init, jax.random.key(0))) == jax.tree.structure(
        (params, target_params))

    if targets == "kmeans":  # only the loss shapes: the compile of the codes+kmeans case covers the rest
        loss, metrics = jax.eval_shape(student.loss, params, target_params, {"waveform": waveform},
                                       jax.random.key(5), 0)
        assert loss.shape == () and "loss_kmeans" in metrics and "loss_codes" not in metrics
        return

    # Any frames will do here (EnCodec's on-device path is covered by the stage-1 test).
    features = jax.random.normal(jax.random.key(8), (2, method.num_frames, 128))
    codes = jax.random.randint(jax.random.key(9), (2, method.num_frames, 8), 0, 1024)

    @jax.jit  # everything as arguments: large closed-over constants make XLA compiles slow
    def teacher_and_precomputed_ids(params, target_params, stage1_params, features, codes):
        # Reference ids: the frozen stage-1 model's features (its last layer's x0), nearest centroid.
        ids = kmeans.assign(target_params["centroids"], method.cluster_features(stage1_params, features))

        def loss(batch):
            return student.loss(params, target_params, batch, jax.random.key(5), 0)
        # The teacher in target_params labels the frames in the step, or the ids come with the batch.
        return ids, loss({"features": features, "codes": codes}), loss({"features": features, "codes": codes,
                                                                        "kmeans_ids": ids})

    ids, (loss, metrics), (loss_pre, _) = teacher_and_precomputed_ids(params, target_params, stage1_params,
                                                                          features, codes)
    assert ids.shape == (2, method.num_frames) and ids.dtype == jnp.int32
    np.testing.assert_allclose(loss_pre, loss, rtol=1e-6)
    np.testing.assert_allclose(loss, metrics["loss_codes"] + metrics["loss_kmeans"], rtol=1e-6)
    assert np.isfinite(metrics["loss_kmeans"]) and float(metrics["loss_kmeans"]) > 0
