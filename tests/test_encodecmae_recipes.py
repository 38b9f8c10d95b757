"""EncodecMAE's `recipe=paper|code` (configs/encodecmae.py): the paper's parameter counts (Pepino et al., Table 1:
51M / 94M / 269M) against a closed-form count written here, the learned mask token of the paper's §2.2, and a
self-training teacher of another size (the paper's large model clusters the base self-trained model's features).

Abstract inits only (jax.eval_shape) for the full-size models; the tiny ones run on the CPU in seconds.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from audiojepa.config_utils import load_config
from audiojepa.methods import encodecmae
from audiojepa.methods.encodecmae import EncodecMAE, default_config
from audiojepa.models import encodecmae as mae
from audiojepa.ops import kmeans

TEST_SAMPLES = 4800  # 0.2 s at 24 kHz → 15 frames
CROP_4S = 96_000

# -- parameter counts -------------------------------------------------------------------------------

# Sizes from the paper's §2.2 ("5 transformer layers in the small model, 10 in the base, and 20 in the large ...
# 768 for the small and base models, and 1024 for the large") and the code's heads / FFN width
# (shared/reference/encodecmae.md §1.2: 12 heads everywhere, FFN 4096).
PAPER_SIZES = {"small": (768, 5), "base": (768, 10), "large": (1024, 20)}
HEADS, FFN_WIDTH, ENCODEC_DIM = 12, 4096, 128
TABLE1_PARAMS = {"small": 51e6, "base": 94e6, "large": 269e6}  # the paper's #Par column

# EnCodec 24 kHz encoder convolutions (out, in, kernel), shared/reference/encodecmae.md §3, and its 2-layer
# 512-wide LSTM (input and recurrent kernels, two biases each, as torch stores them).
ENCODEC_CONVS = [(32, 1, 7), (16, 32, 3), (32, 16, 1), (32, 32, 1), (64, 32, 4), (32, 64, 3), (64, 32, 1),
                 (64, 64, 1), (128, 64, 8), (64, 128, 3), (128, 64, 1), (128, 128, 1), (256, 128, 10),
                 (128, 256, 3), (256, 128, 1), (256, 256, 1), (512, 256, 16), (128, 512, 7)]
ENCODEC_ENCODER_PARAMS = (sum(o * i * k + o for o, i, k in ENCODEC_CONVS)
                          + 2 * (2 * 4 * 512 * 512 + 2 * 4 * 512))  # weight norm resolved: 7,423,472


def closed_form_encoder_params(width, depth, share_ffn, heads=HEADS, ffn=FFN_WIDTH):
    """MAE encoder parameters: input projection, position scale, `depth` ResiDual layers (bias-free Q/K/V/out of
    heads·(width // heads) channels, two LayerNorms, a ReLU FFN with biases, one for the stack when shared),
    and the final LayerNorm."""
    inner = heads * (width // heads)
    attention = 4 * width * inner
    norms = 2 * 2 * width
    feed_forward = 2 * width * ffn + ffn + width
    layers = depth * (attention + norms) + (1 if share_ffn else depth) * feed_forward
    return (ENCODEC_DIM * width + width) + 1 + layers + 2 * width


def abstract_params(arg):
    config = load_config(f"configs/encodecmae.py:{arg}")
    method = EncodecMAE(config.model, input_shape=(CROP_4S,))
    params, _ = jax.eval_shape(method.init, jax.random.key(0))
    return method, params


def test_encodec_encoder_count_is_the_closed_form():
    assert encodecmae.encodec_encoder_param_count() == ENCODEC_ENCODER_PARAMS == 7_423_472
    # The paper's "EC" row (7.4M); torch's count stores weight norm's g separately (+ one per output channel).
    assert ENCODEC_ENCODER_PARAMS + sum(o for o, _, _ in ENCODEC_CONVS) == 7_425_792


@pytest.mark.parametrize("size", ["small", "base", "large"])
def test_paper_recipe_has_the_papers_parameter_counts(size):
    """Table 1's #Par within 5%: EnCodec's encoder + the MAE encoder with one FFN per layer (what a downstream
    task runs; the decoder and heads are dropped). Measured: 50.8M / 94.1M / 259.1M (-0.4%, +0.1%, -3.7%)."""
    _, params = abstract_params(f"size={size},recipe=paper")
    width, depth = PAPER_SIZES[size]
    expected = closed_form_encoder_params(width, depth, share_ffn=False) + ENCODEC_ENCODER_PARAMS
    count = encodecmae.inference_param_count(params)
    assert count == expected
    assert abs(count / TABLE1_PARAMS[size] - 1) < 0.05, (size, count)


@pytest.mark.parametrize("size", ["small", "base", "large"])
def test_code_recipe_keeps_the_released_shared_ffn(size):
    """The released code shares one FFN per stack: 25.6M / 37.4M / 99.6M counted the same way, 35-63% short
    of Table 1 (so the recipes differ where it matters)."""
    _, params = abstract_params(f"size={size},recipe=code")
    width, depth = PAPER_SIZES[size]
    count = encodecmae.inference_param_count(params)
    assert count == closed_form_encoder_params(width, depth, share_ffn=True) + ENCODEC_ENCODER_PARAMS
    assert count / TABLE1_PARAMS[size] < 0.75
    assert "mask_token" not in params and "ffn" in params["encoder"]


def test_recipe_argument():
    paper = load_config("configs/encodecmae.py:recipe=paper")
    code = load_config("configs/encodecmae.py:recipe=code")
    default = load_config("configs/encodecmae.py")
    assert (paper.model.share_ffn, paper.model.learned_mask_token) == (False, True)
    assert (code.model.share_ffn, code.model.learned_mask_token) == (True, False)
    assert default.model.to_dict() == code.model.to_dict()  # the default (the docstring says why)
    # Everything else is one value: only the two recipe keys differ.
    differing = {k for k in paper.model if paper.model[k] != code.model[k]}
    assert differing == {"share_ffn", "learned_mask_token"}
    runlocal = load_config("configs/encodecmae.py:runlocal,recipe=paper")
    assert runlocal.model.size == "tiny" and runlocal.model.learned_mask_token and not runlocal.model.share_ffn
    with pytest.raises(ValueError, match="recipe"):
        load_config("configs/encodecmae.py:recipe=released")


# -- learned mask token -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def paper_tiny():
    config = load_config("configs/encodecmae.py:runlocal,recipe=paper").model
    config.mask_span = 5
    config.num_codebooks, config.codebook_weights = 2, (0.6, 0.4)  # a smaller head: faster compiles
    method = EncodecMAE(config, input_shape=(TEST_SAMPLES,))
    params, target_params = method.init(jax.random.key(1))
    return method, params, target_params


def test_learned_mask_token_is_a_param_that_gets_a_gradient(paper_tiny):
    method, params, target_params = paper_tiny
    token = np.asarray(params["mask_token"])
    assert token.shape == (64,)
    # Initialised like the other token embeddings, N(0, 0.02²): 64 draws give a std within ±30% (> 3 sd).
    assert 0.014 < token.std() < 0.026 and abs(token.mean()) < 0.02
    frames = method.num_frames
    batch = {"features": jax.random.normal(jax.random.key(2), (2, frames, 128)),
             "codes": jax.random.randint(jax.random.key(3), (2, frames, 2), 0, 1024)}
    grads = jax.jit(jax.grad(lambda p: method.loss(p, target_params, batch, jax.random.key(4), 0)[0]))(params)
    assert grads["mask_token"].shape == (64,) and float(jnp.abs(grads["mask_token"]).max()) > 0
    assert method.weight_decay_mask(params)["mask_token"]  # the reference decays every param


def test_mask_token_fills_the_masked_frames_only(paper_tiny):
    """The decoder's input (after its positions) changes by exactly Δ at the masked frames when the token moves
    by Δ, and not at all at the visible frames; the encoder output does not change. (The decoder's output
    changes everywhere: its attention mixes all frames.)"""
    method, params, _ = paper_tiny
    frames = method.num_frames
    visible_idx, masked_idx = method.sample_mask(jax.random.key(5), 2, frames)
    features = jax.random.normal(jax.random.key(6), (2, frames, 128))

    @jax.jit
    def forward(params):
        out, state = method.model.apply({"params": params}, features, visible_idx, masked_idx,
                                        capture_intermediates=lambda mdl, _: mdl.name == "decoder_positions")
        return out, state["intermediates"]["decoder_positions"]["__call__"][0]

    delta = np.linspace(-1.0, 1.0, 64).astype(np.float32)
    moved = {**params, "mask_token": params["mask_token"] + delta}
    (out, decoder_in), (out_moved, decoder_in_moved) = forward(params), forward(moved)
    is_masked = np.asarray(mae.frame_mask(masked_idx, frames))
    difference = np.asarray(decoder_in_moved - decoder_in)
    np.testing.assert_allclose(difference[is_masked], np.broadcast_to(delta, difference[is_masked].shape),
                               rtol=0, atol=1e-6)
    np.testing.assert_array_equal(difference[~is_masked], 0.0)
    np.testing.assert_array_equal(out_moved["encoded"], out["encoded"])
    assert np.abs(np.asarray(out_moved["codes"] - out["codes"])).max() > 1e-3


def test_encoder_with_a_learned_mask_token_encodes_without_it(paper_tiny):
    """An exported encoder (encoder_params: no decoder, no mask token) embeds audio, and so does the
    self-training teacher, which holds the encoder only."""
    method, params, target_params = paper_tiny
    features = jax.random.normal(jax.random.key(7), (2, method.num_frames, 128))
    exported = method.encoder_params(params, target_params)
    assert "mask_token" not in exported
    np.testing.assert_array_equal(method.encode(exported, features), method.encode(params, features))
    teacher = {key: params[key] for key in ("input_proj", "encoder_positions", "encoder")}
    assert method.cluster_features(teacher, features).shape == (2, method.num_frames, 64)


# -- a self-training teacher of another size --------------------------------------------------------

def tiny_config(**overrides):
    config = default_config("tiny")
    config.mask_span = 5
    config.update(overrides)
    return config


def test_teacher_of_another_size_labels_the_frames():
    """Student "tiny" (64 wide, 2 layers), teacher "micro" (32 wide, 1 layer): the centroids live in the
    teacher's 32 dims, the frozen teacher in target_params has the teacher's shapes, and the k-means ids of a
    step are the teacher run's own cluster features assigned to the centroids."""
    assert mae.decode_variant("micro")["width"] != mae.decode_variant("tiny")["width"]
    teacher_run = EncodecMAE(tiny_config(size="micro"), input_shape=(TEST_SAMPLES,))
    teacher_params, _ = teacher_run.init(jax.random.key(10))
    stage1 = EncodecMAE(tiny_config(), input_shape=(TEST_SAMPLES,))
    stage1_params, _ = stage1.init(jax.random.key(11))
    num_clusters = 6
    # k-means targets only (no codebook head or RVQ to compile; "codes+kmeans" builds the same teacher).
    student = EncodecMAE(tiny_config(targets="kmeans", num_clusters=num_clusters, teacher_size="micro"),
                         input_shape=(TEST_SAMPLES,))
    assert student.teacher_width == 32 and student.width == 64
    centroids = jax.random.normal(jax.random.key(12), (num_clusters, 32))
    params, target_params = student.start_self_training(stage1_params, centroids, jax.random.key(13),
                                                        teacher_params=teacher_params)
    assert target_params["teacher"]["input_proj"]["kernel"].shape == (128, 32)
    jax.tree.map(np.testing.assert_array_equal, target_params["teacher"]["encoder"], teacher_params["encoder"])
    jax.tree.map(np.testing.assert_array_equal, params["encoder"], stage1_params["encoder"])  # the student: stage 1
    # The placeholder state of init has the same structure and shapes (checkpoints restore into it).
    abstract = jax.eval_shape(student.init, jax.random.key(0))
    assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(lambda a: a.shape, (params, target_params))

    features = jax.random.normal(jax.random.key(14), (2, student.num_frames, 128))
    ids = jax.jit(student.make_targets)(target_params, {"features": features})["kmeans_ids"]
    expected = kmeans.assign(centroids, teacher_run.cluster_features(teacher_params, features))
    np.testing.assert_array_equal(ids, expected)
    assert len(np.unique(np.asarray(ids))) > 1  # not a degenerate all-one-cluster check

    with pytest.raises(ValueError, match="teacher"):  # centroids in the student's width
        student.start_self_training(stage1_params, jnp.zeros((num_clusters, 64)), jax.random.key(13),
                                    teacher_params=teacher_params)
    with pytest.raises(ValueError, match="teacher_size"):  # a teacher of the wrong size
        student.start_self_training(stage1_params, centroids, jax.random.key(13), teacher_params=stage1_params)
