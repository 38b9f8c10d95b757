"""Padding tokens (variable-size masks padded to a fixed length) and learned position tables in the model pieces.

The padded path must give the unpadded outputs on the valid tokens (to float32 rounding, 1e-5), and padding must
change nothing: perturbing the padded tokens' content leaves every valid output within 1e-6.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from audiojepa.models import Predictor, TransformerStack, ViTEncoder, sincos_2d
from audiojepa.models.vit import learned_table_for_grid

GRID = (5, 13)
WIDTH = 64


def _stack():
    return TransformerStack(depth=2, num_heads=4, mlp_dim=128)


def test_stack_with_padding_equals_the_unpadded_stack_on_valid_tokens():
    rng = np.random.default_rng(0)
    stack = _stack()
    tokens = jnp.asarray(rng.normal(size=(3, 7, WIDTH)), jnp.float32)
    params = stack.init(jax.random.key(0), tokens)
    counts = [7, 4, 1]
    padded = np.zeros((3, 10, WIDTH), np.float32)
    valid = np.zeros((3, 10), bool)
    for b, n in enumerate(counts):
        padded[b, :n] = tokens[b, :n]
        padded[b, n:] = rng.normal(size=(10 - n, WIDTH)) * 5  # padding content: anything
        valid[b, :n] = True
    out_padded = stack.apply(params, jnp.asarray(padded), valid=jnp.asarray(valid))
    for b, n in enumerate(counts):
        alone = stack.apply(params, tokens[b:b + 1, :n])
        np.testing.assert_allclose(out_padded[b, :n], alone[0], atol=1e-5, rtol=1e-5)


def test_perturbing_padding_changes_no_valid_output_of_the_encoder():
    encoder = ViTEncoder(width=WIDTH, depth=2, num_heads=4, mlp_dim=128, use_cls=True)
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.normal(size=(2, 9, WIDTH)), jnp.float32)
    valid = jnp.asarray(np.arange(9)[None] < np.array([[6], [3]]))
    params = encoder.init(jax.random.key(0), jnp.zeros((1, 80, 208)))
    out = encoder.apply(params, tokens, valid=valid, method=ViTEncoder.encode_tokens)
    noise = jnp.asarray(rng.normal(size=tokens.shape) * 100, jnp.float32)
    perturbed = jnp.where(valid[:, :, None], tokens, tokens + noise)
    out2 = encoder.apply(params, perturbed, valid=valid, method=ViTEncoder.encode_tokens)
    keep = np.concatenate([np.ones((2, 1), bool), np.asarray(valid)], axis=1)  # CLS is always valid
    np.testing.assert_allclose(np.asarray(out)[keep], np.asarray(out2)[keep], atol=1e-6)
    # ... and the mask is not a no-op: without it the perturbation reaches the valid tokens.
    out3 = encoder.apply(params, perturbed, method=ViTEncoder.encode_tokens)
    assert np.abs(np.asarray(out3)[keep] - np.asarray(out)[keep]).max() > 1e-3


@pytest.mark.parametrize("full_grid", [False, True])
def test_predictor_padding_changes_nothing_and_matches_the_unpadded_predictor(full_grid):
    predictor = Predictor(grid_size=GRID, width=32, depth=2, num_heads=4, out_dim=WIDTH, use_cls=False,
                          full_grid=full_grid)
    rng = np.random.default_rng(2)
    perm = rng.permutation(65)
    context_idx, target_idx = np.sort(perm[:20]), np.sort(perm[20:30])
    context = jnp.asarray(rng.normal(size=(1, 20, WIDTH)), jnp.float32)
    params = predictor.init(jax.random.key(0), context, jnp.asarray(context_idx[None]), jnp.asarray(target_idx[None]))
    reference = predictor.apply(params, context, jnp.asarray(context_idx[None]), jnp.asarray(target_idx[None]))

    # The same sets padded to 26 context and 15 target entries, with garbage in the padding.
    pad_c, pad_t = 26, 15
    c_idx = np.concatenate([context_idx, rng.integers(0, 65, pad_c - 20)])[None]
    t_idx = np.concatenate([target_idx, rng.integers(0, 65, pad_t - 10)])[None]
    c_valid = (np.arange(pad_c) < 20)[None]
    t_valid = (np.arange(pad_t) < 10)[None]
    c_tok = np.concatenate([np.asarray(context), rng.normal(size=(1, pad_c - 20, WIDTH)) * 10], axis=1)
    out = predictor.apply(params, jnp.asarray(c_tok, jnp.float32), jnp.asarray(c_idx), jnp.asarray(t_idx),
                          jnp.asarray(c_valid), jnp.asarray(t_valid))
    np.testing.assert_allclose(np.asarray(out)[0, :10], np.asarray(reference)[0], atol=1e-5, rtol=1e-5)


def test_learned_position_tables_start_at_the_sincos_table_and_are_params():
    encoder = ViTEncoder(width=WIDTH, depth=1, num_heads=4, mlp_dim=128, use_cls=True, pos_embed="learned",
                         pos_grid=GRID)
    params = encoder.init(jax.random.key(0), jnp.zeros((1, 80, 208)))["params"]
    np.testing.assert_allclose(params["pos_embed"][0], sincos_2d(*GRID, WIDTH, cls_token=False), atol=1e-7)
    fixed = ViTEncoder(width=WIDTH, depth=1, num_heads=4, mlp_dim=128, use_cls=True)
    lms = jnp.asarray(np.random.default_rng(3).normal(size=(2, 80, 208)), jnp.float32)
    fixed_params = {k: v for k, v in params.items() if k != "pos_embed"}
    np.testing.assert_allclose(encoder.apply({"params": params}, lms), fixed.apply({"params": fixed_params}, lms),
                               atol=1e-6)
    # Training moves it: the gradient reaches the table.
    grad = jax.grad(lambda p: encoder.apply({"params": p}, lms).sum())(params)
    assert float(jnp.abs(grad["pos_embed"]).max()) > 0
    # A shorter input uses the top-left part of the table (row f·T' + t keeps its (f, t)).
    table = np.arange(65 * 2, dtype=np.float32).reshape(65, 2)
    short = np.asarray(learned_table_for_grid(jnp.asarray(table), GRID, (5, 4)))
    np.testing.assert_array_equal(short, table.reshape(5, 13, 2)[:, :4].reshape(20, 2))
    with pytest.raises(ValueError, match="pos_embed"):
        learned_table_for_grid(jnp.asarray(table), GRID, (5, 14))

    predictor = Predictor(grid_size=GRID, width=32, depth=1, num_heads=4, out_dim=WIDTH, use_cls=True,
                          pos_embed="learned")
    p = predictor.init(jax.random.key(0), jnp.zeros((1, 3, WIDTH)), jnp.zeros((1, 2), jnp.int32),
                       jnp.ones((1, 1), jnp.int32))["params"]
    np.testing.assert_allclose(p["pos_embed"][0], sincos_2d(*GRID, 32, cls_token=True), atol=1e-7)
