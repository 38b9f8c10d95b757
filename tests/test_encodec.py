"""Frozen EnCodec 24 kHz encoder + RVQ against the official code (shared/fixtures/encodec, see its README).

Tolerances (float32 on CPU, measured with jax 0.10.2):
- continuous embeddings: max |Δ| ≤ EMB_RTOL = 1e-4 × max |emb_torch| (measured 3.1e-7 absolute,
  3.2e-6 relative, on both the 1 s and the 31,234-sample input); also after removing the time mean,
  since the random-weight output is nearly constant in time (measured 2.9e-7 / 3.1e-7 against a
  time-std of 3.1e-3);
- codes: equal, except that a frame may differ from its first differing stage on when that stage's
  near-tie margin (2nd-best minus best squared distance) is below TIE_MARGIN = 1e-6 — a flip
  propagates to every later stage. Measured: 1 s input, one frame (24; stage-0 margin 4.2e-8) for
  both 8 and 32 codebooks; odd-length input, none. On the torch embeddings the RVQ gives the fixture
  codes exactly. Margins come from the fixture (`margin8_1s`) where it has them and otherwise from a
  float64 NumPy computation along the reference codes' residual path;
- RVQ reconstruction from the torch embeddings: within 1e-6 (measured 0.0).
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from audiojepa.models import encodec, encodec_torch

EMB_RTOL = 1e-4
TIE_MARGIN = 1e-6
MAX_FLIPPED_FRAMES = 3  # per input; measured 1 (1 s) and 0 (odd length)

FIXTURES = Path(os.environ.get("AUDIOJEPA_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
ENCODEC_FIXTURES = FIXTURES / "encodec"
STATE_DICT = ENCODEC_FIXTURES / "encodec24k_random_state.npz"
OUTPUTS = ENCODEC_FIXTURES / "fixture.npz"
REPO = Path(__file__).resolve().parents[1]

needs_fixtures = pytest.mark.skipif(
    not (STATE_DICT.exists() and OUTPUTS.exists()),
    reason=f"EnCodec parity fixtures not found under {ENCODEC_FIXTURES} (set AUDIOJEPA_FIXTURES to the "
           "shared/fixtures folder; a plain clone has none).")


@pytest.fixture(scope="module")
def state_dict():
    return encodec_torch.load_state_dict(STATE_DICT)


@pytest.fixture(scope="module")
def params(state_dict):
    return encodec_torch.convert(state_dict)


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(OUTPUTS))


@jax.jit
def _embed(encoder_params, waveform):
    return encodec.EncodecEncoder().apply({"params": encoder_params}, waveform)


@pytest.fixture(scope="module")
def embeddings(params, ref):
    """Our embeddings [1, frames, 128] of the 1 s and the odd-length waveform."""
    return {name: np.asarray(_embed(params["encoder"], ref[f"wav_{name}"][None])) for name in ("1s", "odd")}


def torch_layout(emb):
    """[1, 128, frames] (the fixture's channels-first layout) → [1, frames, 128]."""
    return np.transpose(emb, (0, 2, 1))


def reference_margins(embeddings, codebooks, codes):
    """Near-tie margins [n_q, frames] in float64 along the reference residual path.

    embeddings [frames, D]; codebooks [n, K, D]; codes [n_q, frames] (the reference's). Also checks that
    each reference code is a float64 nearest neighbour up to float32 rounding.
    """
    residual = np.asarray(embeddings, np.float64)
    margins = []
    for codebook, stage_codes in zip(np.asarray(codebooks, np.float64), codes):
        distances = np.sum(residual ** 2, 1)[:, None] - 2 * residual @ codebook.T + np.sum(codebook ** 2, 1)
        best_two = np.sort(distances, axis=1)[:, :2]
        chosen = distances[np.arange(len(stage_codes)), stage_codes]
        assert np.all(chosen - best_two[:, 0] <= TIE_MARGIN)
        margins.append(best_two[:, 1] - best_two[:, 0])
        residual = residual - codebook[stage_codes]
    return np.stack(margins)


def code_flips(ours, theirs, margins):
    """Frames whose codes differ, after checking that each first differs at a stage with margin < TIE_MARGIN.

    ours, theirs: [n_q, frames]; margins [≥ n_q, frames]. Returns {frame: (first stage, its margin)}.
    """
    flips = {}
    for frame in np.nonzero(np.any(ours != theirs, axis=0))[0]:
        stage = int(np.argmax(ours[:, frame] != theirs[:, frame]))
        margin = float(margins[stage, frame])
        assert margin < TIE_MARGIN, (f"frame {frame}: code differs at stage {stage} where the reference's best "
                                     f"and 2nd-best distances differ by {margin:.3g} >= {TIE_MARGIN}")
        flips[int(frame)] = (stage, margin)
    assert len(flips) <= MAX_FLIPPED_FRAMES, f"too many frames with flipped codes: {flips}"
    return flips


# -- padding and shapes (no fixtures) --------------------------------------------------------------

def test_causal_padding_and_frame_counts():
    assert encodec.causal_padding(24000, 7, 1) == (6, 0)
    assert encodec.causal_padding(15617, 8, 4) == (4, 3)  # odd length: 3 extra samples on the right
    assert encodec.HOP_LENGTH == 320 and encodec.FRAME_RATE == 75
    for samples in (1, 5, 319, 320, 321, 24000, 31234):
        out = jax.eval_shape(lambda w: encodec.EncodecEncoder().init_with_output(jax.random.key(0), w)[0],
                             jnp.zeros((2, samples)))
        assert out.shape == (2, encodec.num_frames(samples), 128), samples
    assert encodec.num_frames(31234) == 98


def test_reflect_pad_short_input_appends_zeros_like_encodec():
    x = jnp.asarray([1.0, 2.0, 3.0])[None, :, None]
    # Too short to reflect 6: encodec appends 4 zeros, reflects, then drops the 4 appended samples.
    np.testing.assert_array_equal(encodec.reflect_pad(x, 6, 0)[0, :, 0], [0, 0, 0, 0, 3, 2, 1, 2, 3])
    np.testing.assert_array_equal(encodec.reflect_pad(x, 2, 1)[0, :, 0], [3, 2, 1, 2, 3, 2])


def test_num_codebooks_for_bandwidth():
    assert [encodec.num_codebooks_for_bandwidth(bw) for bw in (1.5, 3.0, 6.0, 12.0, 24.0)] == [2, 4, 8, 16, 32]
    with pytest.raises(ValueError, match="32"):
        encodec.num_codebooks_for_bandwidth(48.0)


# -- RVQ (no fixtures) -----------------------------------------------------------------------------

def test_rvq_matches_brute_force_numpy():
    rng = np.random.default_rng(0)
    codebooks = rng.standard_normal((5, 64, 16)).astype(np.float32)
    embeddings = (2 * rng.standard_normal((3, 11, 16))).astype(np.float32)
    n_q = 4
    residual = embeddings.astype(np.float64).reshape(-1, 16)
    expected_codes, expected_sum = [], np.zeros_like(residual)
    for codebook in codebooks[:n_q].astype(np.float64):
        distances = ((residual[:, None, :] - codebook[None]) ** 2).sum(-1)
        best_two = np.sort(distances, axis=1)[:, :2]
        assert np.min(best_two[:, 1] - best_two[:, 0]) > 1e-4  # no near ties, so codes must be equal
        stage_codes = distances.argmin(1)
        expected_codes.append(stage_codes)
        expected_sum += codebook[stage_codes]
        residual = residual - codebook[stage_codes]
    codes, quantized = jax.jit(encodec.rvq_encode, static_argnums=2)(codebooks, embeddings, n_q)
    assert codes.shape == (3, 11, n_q) and codes.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(codes).reshape(-1, n_q), np.stack(expected_codes, axis=1))
    np.testing.assert_allclose(np.asarray(quantized).reshape(-1, 16), expected_sum, atol=1e-5)
    np.testing.assert_allclose(encodec.rvq_decode(codebooks, codes), quantized, atol=1e-6)


@pytest.mark.parametrize("n_q", [0, 6, 2.0])
def test_rvq_rejects_bad_num_codebooks(n_q):
    with pytest.raises(ValueError, match="num_codebooks"):
        encodec.rvq_encode(np.zeros((5, 4, 2), np.float32), np.zeros((1, 3, 2), np.float32), n_q)


# -- weight norm and converter ---------------------------------------------------------------------

def test_resolve_weight_norm_rows_have_norm_g():
    """Each output row of g · v / ‖v‖ has norm |g| and points along sign(g) · v."""
    rng = np.random.default_rng(1)
    v = rng.standard_normal((6, 3, 5)).astype(np.float32)
    g = rng.standard_normal((6, 1, 1)).astype(np.float32)
    w = encodec_torch.resolve_weight_norm(g, v)
    assert w.shape == v.shape and w.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(w.reshape(6, -1), axis=1), np.abs(g.ravel()), rtol=1e-6)
    cosine = np.sum(w.reshape(6, -1) * v.reshape(6, -1), 1) / (np.linalg.norm(w.reshape(6, -1), axis=1)
                                                               * np.linalg.norm(v.reshape(6, -1), axis=1))
    np.testing.assert_allclose(cosine, np.sign(g.ravel()), rtol=1e-6)


@needs_fixtures
def test_converted_kernels_resolve_weight_norm(state_dict, params):
    encoder_params = params["encoder"]
    checked = 0
    for name in state_dict:
        if not name.endswith(".weight_v"):
            continue
        v = state_dict[name].astype(np.float64)
        g = state_dict[name.replace("weight_v", "weight_g")].astype(np.float64)
        expected = g * v / np.linalg.norm(v.reshape(v.shape[0], -1), axis=1)[:, None, None]
        parts = name.split(".")  # encoder.model.{i}[.block.{j} | .shortcut].conv.conv.weight_v
        if parts[3] == "conv":
            kernel = encoder_params[f"conv_{parts[2]}"]["kernel"]
        else:
            sub = "shortcut" if parts[3] == "shortcut" else f"block_{parts[4]}"
            kernel = encoder_params[f"resblock_{parts[2]}"][sub]["kernel"]
        np.testing.assert_allclose(np.transpose(kernel, (2, 1, 0)), expected, rtol=1e-6, atol=1e-7, err_msg=name)
        checked += 1
    assert checked == 18


@needs_fixtures
def test_converted_tree_matches_the_module(state_dict, params):
    abstract = jax.eval_shape(encodec.EncodecEncoder().init, jax.random.key(0), jnp.zeros((1, 320)))["params"]
    assert jax.tree.structure(params["encoder"]) == jax.tree.structure(abstract)
    for ours, theirs in zip(jax.tree.leaves(params["encoder"]), jax.tree.leaves(abstract)):
        assert ours.shape == theirs.shape and ours.dtype == np.float32
    # torch counts 7,425,792 encoder params, 2,320 of them weight-norm gains folded into the kernels.
    assert sum(x.size for x in jax.tree.leaves(params["encoder"])) == 7_425_792 - 2_320
    lstm = params["encoder"]["lstm_13"]["layer_1"]
    np.testing.assert_array_equal(lstm["kernel_ih"], state_dict["encoder.model.13.lstm.weight_ih_l1"].T)
    np.testing.assert_array_equal(lstm["bias_hh"], state_dict["encoder.model.13.lstm.bias_hh_l1"])
    assert params["codebooks"].shape == (32, 1024, 128)
    np.testing.assert_array_equal(params["codebooks"][7], state_dict["quantizer.vq.layers.7._codebook.embed"])


@needs_fixtures
def test_converter_errors_name_the_keys(state_dict):
    # The decoder and the codebooks' training buffers of a full checkpoint are ignored.
    encodec_torch.convert({**state_dict, "decoder.model.0.conv.conv.bias": np.zeros(512, np.float32),
                           "quantizer.vq.layers.0._codebook.inited": np.ones(1, np.float32)})
    with pytest.raises(KeyError, match=r"encoder\.model\.13\.lstm\.weight_hh_l1"):
        encodec_torch.convert({k: v for k, v in state_dict.items() if k != "encoder.model.13.lstm.weight_hh_l1"})
    with pytest.raises(KeyError, match=r"encoder\.model\.6\.conv\.conv\.weight_g/weight_v"):
        encodec_torch.convert({k: v for k, v in state_dict.items() if k != "encoder.model.6.conv.conv.weight_v"})
    with pytest.raises(KeyError, match=r"encoder\.model\.2\.conv\.conv\.bias"):
        encodec_torch.convert({**state_dict, "encoder.model.2.conv.conv.bias": np.zeros(3, np.float32)})
    with pytest.raises(KeyError, match="encoder.norm.weight"):
        encodec_torch.convert({**state_dict, "encoder.norm.weight": np.zeros(3, np.float32)})
    with pytest.raises(KeyError, match=r"quantizer\.vq\.layers\.3\._codebook\.embed"):
        encodec_torch.convert({k: v for k, v in state_dict.items() if k != "quantizer.vq.layers.3._codebook.embed"})
    with pytest.raises(ValueError, match=r"encoder\.model\.15\.conv\.conv\.bias"):
        encodec_torch.convert({**state_dict, "encoder.model.15.conv.conv.bias": np.zeros(64, np.float32)})


def test_load_state_dict_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="model.ckpt"):
        encodec_torch.load_state_dict(str(tmp_path / "model.ckpt"))
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(ImportError, match=r"encodec_24khz\.th.*\[torch\]"):
        encodec_torch.load_state_dict(str(tmp_path / "encodec_24khz.th"))


@needs_fixtures
def test_torch_file_gives_the_same_params(tmp_path, state_dict, params):
    torch = pytest.importorskip("torch", reason="the optional torch extra is not installed")
    torch.save({name: torch.from_numpy(value) for name, value in state_dict.items()}, tmp_path / "encodec.th")
    from_torch = encodec_torch.convert(encodec_torch.load_state_dict(str(tmp_path / "encodec.th")))
    assert jax.tree.structure(from_torch) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(from_torch), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)


@needs_fixtures
def test_convert_cli_round_trip(tmp_path, params):
    out = tmp_path / "encodec"
    # PYTHONPATH: the tool must import this checkout's audiojepa, whatever the installed one points at.
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "tools/convert_encodec.py", f"--input={STATE_DICT}", f"--output={out}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    loaded = encodec_torch.load_params(str(out))
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(FileNotFoundError, match="encodec.json"):
        encodec_torch.load_params(str(tmp_path))


# -- parity with the official outputs --------------------------------------------------------------

@needs_fixtures
@pytest.mark.parametrize("name, frames", [("1s", 75), ("odd", 98)])
def test_embeddings_match(embeddings, ref, name, frames):
    ours, theirs = embeddings[name], torch_layout(ref[f"emb_{name}"])
    assert ours.shape == theirs.shape == (1, frames, 128)
    scale = np.abs(theirs).max()
    assert np.abs(ours - theirs).max() <= EMB_RTOL * scale
    centred = (ours - ours.mean(1, keepdims=True)) - (theirs - theirs.mean(1, keepdims=True))
    assert np.abs(centred).max() <= EMB_RTOL * scale


@needs_fixtures
def test_rvq_on_torch_embeddings_gives_the_fixture_codes(params, ref):
    codebooks = jnp.asarray(params["codebooks"])
    for name, key, n_q in (("1s", "codes_1s", 8), ("1s", "codes32_1s", 32), ("odd", "codes_odd", 8)):
        emb = torch_layout(ref[f"emb_{name}"])
        codes, quantized = encodec.rvq_encode(codebooks, emb, n_q)
        theirs = ref[key][:, 0]
        margins = reference_margins(emb[0], params["codebooks"], theirs)
        code_flips(np.asarray(codes)[0].T, theirs, margins)
        if key == "codes_1s":
            np.testing.assert_allclose(quantized, torch_layout(ref["quant8_1s"]), atol=1e-6)


@needs_fixtures
def test_fixture_margins_agree_with_float64_margins(params, ref):
    ours = reference_margins(torch_layout(ref["emb_1s"])[0], params["codebooks"], ref["codes_1s"][:, 0])
    np.testing.assert_allclose(ours, ref["margin8_1s"][:, 0], atol=1e-6)
    assert np.sum(ref["margin8_1s"] < TIE_MARGIN) == 24  # [3, 3, 1, 4, 1, 5, 5, 2] of 75 per stage


@needs_fixtures
@pytest.mark.parametrize("name, key, n_q", [("1s", "codes_1s", 8), ("1s", "codes32_1s", 32), ("odd", "codes_odd", 8)])
def test_codes_end_to_end(params, embeddings, ref, name, key, n_q):
    codes, quantized = encodec.rvq_encode(jnp.asarray(params["codebooks"]), embeddings[name], n_q)
    codes = np.asarray(codes)[0].T  # [n_q, frames], the fixture's layout
    theirs = ref[key][:, 0]
    assert codes.shape == theirs.shape
    margins = reference_margins(torch_layout(ref[f"emb_{name}"])[0], params["codebooks"], theirs)
    if key == "codes_1s":
        margins = ref["margin8_1s"][:, 0]
    flips = code_flips(codes, theirs, margins)
    if key == "codes_1s":
        same = np.setdiff1d(np.arange(codes.shape[1]), list(flips))
        np.testing.assert_allclose(np.asarray(quantized)[0, same], torch_layout(ref["quant8_1s"])[0, same], atol=1e-5)


# -- jit -------------------------------------------------------------------------------------------

@needs_fixtures
def test_encode_is_jittable_and_compiles_once(params):
    traces = []

    def encode(params, waveform):
        traces.append(waveform.shape)
        return encodec.encode(params, waveform, 8)

    jitted = jax.jit(encode)
    rng = np.random.default_rng(3)
    batches = [rng.uniform(-1, 1, (2, 3000)).astype(np.float32) for _ in range(2)]
    outputs = [jax.tree.map(np.asarray, jitted(params, b)) for b in batches]
    assert len(traces) == 1
    emb, codes = outputs[1]
    assert emb.shape == (2, 10, 128) and codes.shape == (2, 10, 8) and codes.dtype == np.int32
    eager_emb = encodec.EncodecEncoder().apply({"params": params["encoder"]}, batches[1])
    np.testing.assert_allclose(emb, eager_emb, rtol=0, atol=1e-6)
    # Rows of a batch are independent: the second row alone gives the same embeddings.
    np.testing.assert_allclose(emb[1:], np.asarray(_embed(params["encoder"], batches[1][1:])), atol=1e-6)


def test_lstm_keeps_the_batch_sharding_of_its_input_on_a_mesh():
    """Traced inside the trainer's mesh (jax.set_mesh, Explicit axis), the LSTM's scan carry starts with
    the input's batch sharding; a replicated zero carry is a type error in the scan. Values match the
    same layer run unsharded (float32, 1e-6)."""
    from jax.sharding import PartitionSpec as P

    from audiojepa.runtime import sharding

    layer = encodec.LSTMLayer(8)
    x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
    params = layer.init(jax.random.key(0), x)
    specs = []

    def run(params, x):
        out = layer.apply(params, x)
        specs.append(jax.typeof(out).sharding.spec)
        return out

    with jax.set_mesh(sharding.make_mesh(2)):
        out = jax.jit(run)(jax.device_put(params, P()), jax.device_put(x, P(sharding.DATA_AXIS)))
    assert specs == [P(sharding.DATA_AXIS, None, None)]
    np.testing.assert_allclose(np.asarray(out), np.asarray(layer.apply(params, x)), rtol=0, atol=1e-6)
