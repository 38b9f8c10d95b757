"""Speed/memory options of config.model: `remat`, `dtype` (bfloat16 compute) and `attention_impl`.

Rematerialisation must leave the param tree and the values unchanged (same loss and gradients as
remat="none", float32) while making the backward pass keep less; bfloat16 compute must keep float32
params and a loss close to float32's; every method and every config must pass the options through to
every transformer stack. Tiny sizes throughout; most checks trace (make_jaxpr / eval_shape) rather
than compile.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from audiojepa import methods
from audiojepa.config_utils import load_config
from audiojepa.data import pipeline
from audiojepa.methods import m2d
from audiojepa.models import encodecmae as mae
from audiojepa.models.vit import REMAT_POLICIES, TransformerStack, performance_options
from audiojepa.ops import frontend, optim
from audiojepa.training import train

STACK_KINDS = ("pre_ln", "residual_shared_ffn", "residual")
# Recomputing a block in the backward pass runs the same ops on the same values; XLA may fuse them
# differently, so float32 results agree to rounding (observed ≤ 6e-6 absolute on O(1) values), not bits.
REMAT_TOL = dict(rtol=1e-5, atol=1e-5)
# bfloat16 has an 8-bit mantissa (relative rounding 2^-9 ≈ 0.2%) on every matmul input; the loss is a
# mean over tokens, so its error stays near that size (observed 4e-4 relative on the tiny M2D).
BF16_LOSS_RTOL = 5e-3


def make_stack(kind: str, remat: str, depth: int = 2, width: int = 32):
    """A tiny stack of each kind: vit.TransformerStack (also EncodecMAE's "pre_ln") or a ResiDualStack."""
    if kind == "pre_ln":
        return TransformerStack(depth, 2, 2 * width, remat=remat)
    return mae.ResiDualStack(depth, 2, 2 * width, share_ffn=kind == "residual_shared_ffn", remat=remat)


def stack_loss(stack, params, x):
    """A scalar that depends on the output and on every layer (return_layers) of the stack."""
    out, layers = stack.apply(params, x, return_layers=True)
    return jnp.mean(out ** 2) + jnp.mean(jnp.sin(layers))


def residual_bytes(fn, *args) -> int:
    """Bytes the backward pass of `fn` keeps from its forward pass (jax.vjp's residuals; shapes only)."""
    vjp_fn = jax.eval_shape(lambda *a: jax.vjp(fn, *a)[1], *args)
    return sum(int(np.prod(r.shape)) * r.dtype.itemsize for r in jax.tree.leaves(vjp_fn))


def count_eqns(jaxpr, predicate) -> int:
    """Equations of a (closed) jaxpr, and of the jaxprs nested in their params, for which predicate(eqn),
    as executed: an equation inside a scan body counts once per iteration (scanned transformer stacks)."""
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in jaxpr.eqns:
        total += bool(predicate(eqn))
        repeats = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                    total += repeats * count_eqns(sub, predicate)
    return total


def is_remat(eqn) -> bool:
    # "remat2" in JAX 0.10, "checkpoint" in other versions.
    return "remat" in eqn.primitive.name or "checkpoint" in eqn.primitive.name


def is_bf16_matmul(eqn) -> bool:
    return eqn.primitive.name == "dot_general" and eqn.outvars[0].aval.dtype == jnp.bfloat16


def uses_bf16(eqn) -> bool:
    return any(getattr(v.aval, "dtype", None) == jnp.bfloat16 for v in eqn.outvars)


# -- remat on each stack type ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", STACK_KINDS)
def test_remat_keeps_params_loss_and_gradients(kind):
    x = jax.random.normal(jax.random.key(1), (2, 6, 32))
    # Jitted: an op-by-op init takes longer than compiling it.
    inits = jax.jit(lambda rng: {remat: make_stack(kind, remat).init(rng, x) for remat in REMAT_POLICIES})(
        jax.random.key(0))
    reference_params = inits["none"]
    for remat in ("block", "dots"):
        assert jax.tree.structure(inits[remat]) == jax.tree.structure(reference_params)
        jax.tree.map(np.testing.assert_array_equal, inits[remat], reference_params)

    # Perturb so zero biases and unit norms cannot hide a difference in the backward pass.
    leaves, treedef = jax.tree.flatten(reference_params)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    params = treedef.unflatten([p + 0.1 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])

    @jax.jit  # one program for the three variants: a compile costs seconds on a CPU
    def loss_and_grads(params):
        return {remat: jax.value_and_grad(lambda p, s=make_stack(kind, remat): stack_loss(s, p, x))(params)
                for remat in REMAT_POLICIES}

    out = loss_and_grads(params)
    loss, grads = out["none"]
    for remat in ("block", "dots"):
        remat_loss, remat_grads = out[remat]
        np.testing.assert_allclose(remat_loss, loss, **REMAT_TOL)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **REMAT_TOL), remat_grads, grads)


@pytest.mark.parametrize("kind", STACK_KINDS)
def test_remat_makes_the_backward_pass_keep_less(kind):
    """What the backward pass keeps from the forward (vjp residuals): "block" keeps each layer's input,
    "dots" also the Dense outputs, "none" everything. Checked on the traced program, since XLA's CPU
    memory analysis (temp_size_in_bytes) does not show the saving: it reported more temp memory with
    remat for a 6-block stack."""
    x = jnp.zeros((4, 16, 32))
    params = jax.eval_shape(make_stack(kind, "none", depth=4).init, jax.random.key(0), x)
    kept = {remat: residual_bytes(lambda p, s=make_stack(kind, remat, depth=4): stack_loss(s, p, x), params)
            for remat in REMAT_POLICIES}
    assert kept["block"] < kept["dots"] < kept["none"], kept
    # And the gradient program recomputes: more matmuls with remat (the whole block for "block", only the
    # attention logits and weighted sum, which have batch dimensions, for "dots").
    matmuls = {remat: count_eqns(jax.make_jaxpr(jax.grad(lambda p, s=make_stack(kind, remat, depth=4):
                                                         stack_loss(s, p, x)))(params),
                                 lambda e: e.primitive.name == "dot_general")
               for remat in REMAT_POLICIES}
    assert matmuls["none"] < matmuls["dots"] < matmuls["block"], matmuls


def test_unknown_remat_is_an_error_naming_the_key():
    with pytest.raises(ValueError, match=r"config\.model\.remat='full'.*'none', 'block', 'dots'"):
        performance_options(ml_collections.ConfigDict(dict(remat="full")))
    with pytest.raises(ValueError, match=r"config\.model\.remat="):
        make_stack("pre_ln", "everything").init(jax.random.key(0), jnp.zeros((1, 2, 32)))
    with pytest.raises(ValueError, match=r"config\.model\.remat="):
        m2d.M2D(tiny_m2d_config(remat="Block"), input_shape=M2D_INPUT_SHAPE)


def test_performance_option_errors_and_defaults():
    assert performance_options(ml_collections.ConfigDict()) == dict(dtype=jnp.float32, attention_impl=None,
                                                                     remat="none", scan_layers=True,
                                                                     residual_dtype=jnp.float32)
    assert performance_options(ml_collections.ConfigDict(dict(dtype="bfloat16", residual_dtype="bfloat16"))
                               )["residual_dtype"] == jnp.bfloat16
    with pytest.raises(ValueError, match=r"config\.model\.residual_dtype='bfloat16' needs config\.model\.dtype="):
        performance_options(ml_collections.ConfigDict(dict(residual_dtype="bfloat16")))
    with pytest.raises(ValueError, match=r"config\.model\.residual_dtype='half'"):
        performance_options(ml_collections.ConfigDict(dict(dtype="bfloat16", residual_dtype="half")))
    with pytest.raises(ValueError, match=r"config\.model\.scan_layers='yes'"):
        performance_options(ml_collections.ConfigDict(dict(scan_layers="yes")))
    with pytest.raises(ValueError, match=r"config\.model\.dtype='float16'"):
        performance_options(ml_collections.ConfigDict(dict(dtype="float16")))
    with pytest.raises(ValueError, match=r"config\.model\.attention_impl='flash'.*'cudnn'"):
        performance_options(ml_collections.ConfigDict(dict(attention_impl="flash")))
    with pytest.raises(ValueError, match=r"attention_impl='cudnn' needs config\.model\.dtype='bfloat16'"):
        performance_options(ml_collections.ConfigDict(dict(attention_impl="cudnn", dtype="float32")))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the error off a GPU")
def test_cudnn_attention_off_a_gpu_fails_naming_the_key():
    stack = TransformerStack(1, 2, 64, dtype=jnp.bfloat16, attention_impl="cudnn")
    with pytest.raises(ValueError, match=r"config\.model\.attention_impl='cudnn' needs an NVIDIA GPU"):
        jax.eval_shape(stack.init, jax.random.key(0), jnp.zeros((1, 4, 32)))


@pytest.mark.parametrize("with_valid", [False, True])
def test_attention_padded_to_the_cudnn_token_multiple_equals_unpadded_attention(with_valid):
    """cuDNN's fused kernel refuses odd token counts in training (JAX 0.11 on an H200: "Unsupported sequence
    length Q 191, KV 191"), so the cudnn path pads tokens to a multiple of 64 and masks the padding out. The
    padding path, run with XLA's attention here, must give the unpadded result (float32, 1e-6)."""
    from audiojepa.models.vit import padded_dot_product_attention
    batch, tokens, heads, head_dim = 3, 13, 2, 8
    q, k, v = jax.random.normal(jax.random.key(1), (3, batch, tokens, heads, head_dim))
    valid = None
    if with_valid:
        valid = jnp.arange(tokens)[None, :] < jnp.array([13, 7, 1])[:, None]
        valid = valid.at[1, 2].set(False)  # not only a prefix
    mask = None if valid is None else valid[:, None, None, :]
    expected = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=0.3)
    padded = padded_dot_product_attention(q, k, v, 0.3, "xla", valid, multiple=64)
    assert padded.shape == expected.shape
    np.testing.assert_allclose(np.asarray(padded), np.asarray(expected), rtol=1e-6, atol=1e-6)
    grad = lambda f: jax.grad(lambda q: jnp.sum(f(q) ** 2))(q)
    np.testing.assert_allclose(
        np.asarray(grad(lambda q: padded_dot_product_attention(q, k, v, 0.3, "xla", valid, multiple=64))),
        np.asarray(grad(lambda q: jax.nn.dot_product_attention(q, k, v, mask=mask, scale=0.3))), rtol=1e-5, atol=1e-6)


def test_cudnn_attention_runs_per_shard_under_the_explicit_data_mesh():
    """Under the trainer's Explicit `data` mesh, JAX 0.11.2's cuDNN attention fails its backward pass
    ("Expected cotangent type bfloat16[256@data,191,...] but got bfloat16[256,191,...]", H200), so the cudnn
    path runs inside a shard_map over the batch. That wrapping, run with XLA's attention on 8 CPU devices,
    must give the unsharded values and gradients (float32, 1e-5)."""
    from audiojepa.models.vit import padded_dot_product_attention
    from audiojepa.runtime import sharding
    mesh = sharding.make_mesh()
    batch = 2 * mesh.devices.size
    q, k, v = jax.random.normal(jax.random.key(2), (3, batch, 11, 2, 8))
    valid = jnp.arange(11)[None, :] < jax.random.randint(jax.random.key(3), (batch, 1), 1, 12)

    def loss(q, k, v, valid, per_shard):
        out = padded_dot_product_attention(q, k, v, 0.3, "xla", valid, multiple=64, per_shard=per_shard)
        return jnp.sum(jnp.where(valid[:, :, None, None], out, 0.0) ** 2)

    expected = jax.value_and_grad(loss)(q, k, v, valid, False)
    with jax.set_mesh(mesh):
        placed = jax.device_put((q, k, v, valid), sharding.batch_sharding(mesh))
        got = jax.jit(jax.value_and_grad(loss), static_argnums=4)(*placed, True)
    np.testing.assert_allclose(float(got[0]), float(expected[0]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(expected[1]), rtol=1e-5, atol=1e-5)


# -- the M2D train step -----------------------------------------------------------------------------------

M2D_INPUT_SHAPE = (32, 64)  # 2 × 4 patches


def tiny_m2d_config(**overrides) -> ml_collections.ConfigDict:
    config = m2d.default_config("tiny")
    config.update(dict(predictor_width=64, predictor_depth=1, predictor_heads=4, **overrides))
    return config


@pytest.fixture(scope="module")
def m2d_params():
    """(params, target_params) of the tiny M2D; the same for every remat and dtype (same param tree)."""
    return jax.jit(m2d.M2D(tiny_m2d_config(), input_shape=M2D_INPUT_SHAPE).init)(jax.random.key(0))


@pytest.mark.slow
def test_m2d_train_step_with_remat_compiles_and_matches(m2d_params):
    """The trainer's jitted step (loss, grads, clip, AdamW, EMA) with each remat: same loss and update."""
    optim_config = ml_collections.ConfigDict(dict(lr=1e-3, min_lr=0.0, b1=0.9, b2=0.95, weight_decay=0.05,
                                                  grad_clip_norm=3.0))
    schedule = optax.constant_schedule(1e-3)
    spec = pipeline.DataSpec((), frontend.get_preset("m2d"), M2D_INPUT_SHAPE[1], 0.0, 1.0, 0)
    batch = {"lms": jax.random.normal(jax.random.key(3), (2, *M2D_INPUT_SHAPE)),
             "skipped_records": jnp.zeros((2,), jnp.int32)}
    params, target_params = m2d_params
    results = {}
    for remat in REMAT_POLICIES:
        method = m2d.M2D(tiny_m2d_config(remat=remat), input_shape=M2D_INPUT_SHAPE)
        tx = optim.make_optimizer(optim_config, schedule, method.weight_decay_mask(params))
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "target_params": target_params,
                 "opt_state": tx.init(params)}
        step = jax.jit(train.make_train_step(method, tx, schedule, spec, device_frontend=False, total_steps=10))
        results[remat] = jax.device_get(step(state, batch, jax.random.key(4)))
    new_state, metrics = results["none"]
    for remat in ("block", "dots"):
        remat_state, remat_metrics = results[remat]
        assert jax.tree.structure(remat_state) == jax.tree.structure(new_state)
        for key in ("loss", "grad_norm"):
            np.testing.assert_allclose(remat_metrics[key], metrics[key], **REMAT_TOL)
        # AdamW's first step moves a weight by about lr·g/|g|: for the smallest gradients, rounding-level
        # differences in g shift that by a few % of lr = 1e-3 (the gradients themselves are compared to
        # REMAT_TOL in test_remat_keeps_params_loss_and_gradients).
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-4),
                     (remat_state["params"], remat_state["target_params"]),
                     (new_state["params"], new_state["target_params"]))


# -- bfloat16 compute ---------------------------------------------------------------------------------------


def test_m2d_bfloat16_loss_is_close_and_params_and_gradients_stay_float32(m2d_params):
    params, target_params = m2d_params
    lms = jax.random.normal(jax.random.key(3), (4, *M2D_INPUT_SHAPE))
    by_dtype = {dtype: m2d.M2D(tiny_m2d_config(dtype=dtype, remat="dots"), input_shape=M2D_INPUT_SHAPE)
                for dtype in ("float32", "bfloat16")}
    mask = by_dtype["float32"].sample_mask(jax.random.key(5), 4)
    shapes = jax.eval_shape(by_dtype["bfloat16"].init, jax.random.key(0))
    assert jax.tree.structure(shapes) == jax.tree.structure(m2d_params)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes))

    @jax.jit
    def loss_and_grads(params, target_params):
        return {dtype: jax.value_and_grad(lambda p, m=method: m.loss_from_indices(p, target_params, lms, *mask)[0])(
            params) for dtype, method in by_dtype.items()}

    out = loss_and_grads(params, target_params)
    loss16, grads16 = out["bfloat16"]
    loss32, grads32 = out["float32"]
    assert loss16.dtype == jnp.float32
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads16))
    np.testing.assert_allclose(loss16, loss32, rtol=BF16_LOSS_RTOL)
    # The gradient direction survives bfloat16 rounding (observed cosine 0.99999).
    flat16, flat32 = (jnp.concatenate([g.ravel() for g in jax.tree.leaves(g)]) for g in (grads16, grads32))
    assert float(jnp.dot(flat16, flat32) / (jnp.linalg.norm(flat16) * jnp.linalg.norm(flat32))) > 0.999
    # ... and bfloat16 was not silently dropped: observed relative differences 1.0e-4 (loss) and 5.4e-3
    # (gradient norm), while float32 with remat "none" against "dots" differs by 0 and 1.4e-7.
    assert abs(float(loss16 - loss32)) > 1e-6 * abs(float(loss32))
    assert float(jnp.linalg.norm(flat16 - flat32)) > 5e-4 * float(jnp.linalg.norm(flat32))


# -- every method and config passes the options through -------------------------------------------------

# configs/*.py:runlocal, and the number of transformer blocks its loss runs (online + target + predictor).
CONFIG_BLOCKS = {"m2d": 6, "matpac": 6, "jepa": 6, "audio_jepa": 6, "encodecmae": 4}


def traced_loss(config_name: str, **model_overrides):
    """(method, jaxpr of method.loss on a batch of 2, param shapes) for configs/<name>.py:runlocal with
    config.model overrides; traced only, nothing runs."""
    config = load_config(f"configs/{config_name}.py:runlocal")
    config.model.update(model_overrides)
    method_cls = methods.get_method(config.method)
    crop_frames = config.data.crop_frames
    input_shape = methods.input_shape(method_cls, frontend.get_preset(config.data.frontend), crop_frames)
    method = method_cls(config.model, input_shape=input_shape, steps_per_epoch=10)
    if methods.input_kind(method) == "waveform":  # precomputed EnCodec features and codes: no EnCodec run
        params = jax.eval_shape(method._init_model, jax.random.key(0))
        target_params = {}
        batch = {"features": jnp.zeros((2, method.num_frames, 128)),
                 "codes": jnp.zeros((2, method.num_frames, method.num_codebooks), jnp.int32)}
    else:
        params, target_params = jax.eval_shape(method.init, jax.random.key(0))
        batch = {"lms": jnp.zeros((2, *input_shape))}
    kwargs = {"mask_variant": method.mask_variant(0)} if getattr(method, "num_mask_variants", 1) > 1 else {}
    jaxpr = jax.make_jaxpr(lambda p, t: method.loss(p, t, batch, jax.random.key(0), 0, **kwargs)[0])(
        params, target_params)
    return method, jaxpr, params


@pytest.mark.parametrize("config_name", sorted(CONFIG_BLOCKS))
def test_every_config_passes_the_options_to_every_stack(config_name):
    config = load_config(f"configs/{config_name}.py")
    assert (config.model.dtype, config.model.attention_impl, config.model.remat) == ("float32", None, "none")

    _, default, default_params = traced_loss(config_name)
    assert count_eqns(default, is_remat) == 0
    assert count_eqns(default, uses_bf16) == 0  # the float32 default has no bfloat16 anywhere

    _, fast, fast_params = traced_loss(config_name, dtype="bfloat16", remat="dots", attention_impl="xla")
    assert count_eqns(fast, is_remat) == CONFIG_BLOCKS[config_name]
    assert count_eqns(fast, is_bf16_matmul) > 0
    assert fast.out_avals[0].dtype == jnp.float32
    assert jax.tree.structure(fast_params) == jax.tree.structure(default_params)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(fast_params))


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the error off a GPU")
@pytest.mark.parametrize("config_name", sorted(CONFIG_BLOCKS))
def test_every_config_sends_cudnn_to_the_attention(config_name):
    with pytest.raises(ValueError, match=r"attention_impl='cudnn' needs an NVIDIA GPU"):
        traced_loss(config_name, dtype="bfloat16", attention_impl="cudnn")


@pytest.mark.parametrize("remat", ["none", "dots"])
def test_scanned_and_unrolled_stacks_agree(remat):
    """TransformerStack.scan_layers changes how the blocks run, not the params or (beyond float32
    rounding, 1e-5) the outputs, every layer's output and the gradients."""
    x = jax.random.normal(jax.random.key(0), (2, 5, 32))
    stacks = {scan: TransformerStack(3, 4, 64, remat=remat, scan_layers=scan) for scan in (True, False)}
    params = stacks[False].init(jax.random.key(1), x)["params"]
    assert jax.tree.structure(stacks[True].init(jax.random.key(1), x)["params"]) == jax.tree.structure(params)
    outputs = {scan: jax.jit(lambda p, s=s: s.apply({"params": p}, x, return_layers=True))(params)
               for scan, s in stacks.items()}
    grads = {scan: jax.jit(jax.grad(lambda p, s=s: (s.apply({"params": p}, x) ** 2).sum()))(params)
             for scan, s in stacks.items()}
    for a, b in zip(jax.tree.leaves((outputs[True], grads[True])), jax.tree.leaves((outputs[False], grads[False]))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _scan_carry_dtypes(fn, *args) -> set:
    """The dtypes of every lax.scan carry in fn's jaxpr (outer level)."""
    jaxpr = jax.make_jaxpr(fn)(*args)
    dtypes = set()
    for eqn in jaxpr.jaxpr.eqns:
        if eqn.primitive.name == "scan":
            num_carry = eqn.params["num_carry"]
            dtypes |= {v.aval.dtype for v in eqn.outvars[:num_carry]}
    return dtypes


@pytest.mark.parametrize("scan_layers", [True, False])
def test_bfloat16_residual_stream(scan_layers):
    """residual_dtype=bfloat16 carries the residual stream in bfloat16 (the scan's carry is bfloat16; with
    the default it is float32), keeps the params, returns float32, and stays within bfloat16 rounding of the
    float32 model while differing from the float32-residual bfloat16 model (it does change the numbers)."""
    x = jax.random.normal(jax.random.key(0), (2, 6, 32))
    stacks = {name: TransformerStack(3, 4, 64, dtype=jnp.dtype(dtype), scan_layers=scan_layers,
                                     residual_dtype=jnp.dtype(residual))
              for name, (dtype, residual) in dict(f32=("float32", "float32"), bf16=("bfloat16", "float32"),
                                                  bf16_residual=("bfloat16", "bfloat16")).items()}
    params = stacks["f32"].init(jax.random.key(1), x)["params"]
    assert (jax.tree.map(jnp.shape, stacks["bf16_residual"].init(jax.random.key(1), x)["params"])
            == jax.tree.map(jnp.shape, params))
    out = {name: jax.jit(lambda p, s=s: s.apply({"params": p}, x, return_layers=True))(params)
           for name, s in stacks.items()}
    for normed, layers in out.values():
        assert normed.dtype == jnp.float32 and layers.dtype == jnp.float32
    # Normed outputs are O(1); 3 blocks of bfloat16 adds (2^-9 relative each) stay well under 0.1.
    np.testing.assert_allclose(out["bf16_residual"][0], out["f32"][0], atol=0.1)
    assert float(jnp.abs(out["bf16_residual"][0] - out["bf16"][0]).max()) > 1e-4
    # Every block's output (the residual stream itself) is bfloat16-representable.
    layers = np.asarray(out["bf16_residual"][1])
    np.testing.assert_array_equal(layers, layers.astype(jnp.bfloat16).astype(np.float32))
    if scan_layers:
        apply = lambda p, s: s.apply({"params": p}, x)
        assert _scan_carry_dtypes(lambda p: apply(p, stacks["bf16_residual"]), params) == {jnp.dtype(jnp.bfloat16)}
        assert _scan_carry_dtypes(lambda p: apply(p, stacks["bf16"]), params) == {jnp.dtype(jnp.float32)}


def test_bfloat16_residual_m2d_loss_and_gradients(m2d_params):
    """A tiny M2D with residual_dtype=bfloat16: float32 loss and gradients on the same param tree, the loss within
    bfloat16 rounding of the float32 model's and the gradient direction kept."""
    params, target_params = m2d_params
    lms = jax.random.normal(jax.random.key(3), (4, *M2D_INPUT_SHAPE))
    by_name = {name: m2d.M2D(tiny_m2d_config(**options), input_shape=M2D_INPUT_SHAPE)
               for name, options in dict(f32={}, bf16_residual=dict(dtype="bfloat16",
                                                                     residual_dtype="bfloat16")).items()}
    mask = by_name["f32"].sample_mask(jax.random.key(5), 4)

    @jax.jit
    def loss_and_grads(params, target_params):
        return {name: jax.value_and_grad(lambda p, m=method: m.loss_from_indices(p, target_params, lms, *mask)[0])(
            params) for name, method in by_name.items()}

    out = loss_and_grads(params, target_params)
    (loss16, grads16), (loss32, grads32) = out["bf16_residual"], out["f32"]
    assert loss16.dtype == jnp.float32 and all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads16))
    assert jax.tree.structure(grads16) == jax.tree.structure(grads32)
    # Each residual add also rounds to bfloat16 here: allow twice the compute-only tolerance.
    np.testing.assert_allclose(loss16, loss32, rtol=2 * BF16_LOSS_RTOL)
    flat16, flat32 = (jnp.concatenate([g.ravel() for g in jax.tree.leaves(g)]) for g in (grads16, grads32))
    assert float(jnp.dot(flat16, flat32) / (jnp.linalg.norm(flat16) * jnp.linalg.norm(flat32))) > 0.99


def test_bfloat16_residual_needs_a_pre_ln_stack_in_encodecmae():
    with pytest.raises(ValueError, match=r"residual_dtype='bfloat16' needs config\.model\.stack_type='pre_ln'"):
        mae.make_stack("residual", 2, 2, 64, True, jnp.bfloat16, None, residual_dtype=jnp.bfloat16)
    stack = mae.make_stack("pre_ln", 2, 2, 64, False, jnp.bfloat16, None, residual_dtype=jnp.bfloat16)
    assert stack.residual_dtype == jnp.bfloat16
