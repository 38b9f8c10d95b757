"""Encoder weights out in the official M2D/timm names (tools/export_torch.py, audiojepa.convert.m2d_export).

Tolerances: the conversion only transposes and renames float32 arrays, so every round trip is compared bit for bit
(np.array_equal). A PyTorch ViT running the exported weights is compared with this package's encoder at 1e-4
absolute on the final-norm tokens (float32, different matmul and softmax order; the fixture README's bound for
ports, as tests/test_encoder.py).
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from audiojepa.adapters import encoder
from audiojepa.convert import m2d_export, m2d_torch
from audiojepa.methods import jepa, m2d
from audiojepa.ops import frontend
from audiojepa.runtime import checkpointing
from audiojepa.training import train

ATOL = 1e-4
FIXTURES = Path(os.environ.get("AUDIOJEPA_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
STATE_DICT = FIXTURES / "m2d" / "m2d_small_state_dict.npz"
FIXTURE_GRID = (5, 13)  # 80x208 with 16x16 patches
needs_fixtures = pytest.mark.skipif(not STATE_DICT.exists(),
                                    reason=f"M2D fixtures not found under {FIXTURES} (set AUDIOJEPA_FIXTURES)")
REPO = Path(__file__).resolve().parents[1]
INPUT_SHAPE = (80, 64)  # (n_mels, frames): a 5 x 4 patch grid
NORM_STATS = (-7.1, 4.2)


def _export_torch(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "tools/export_torch.py", *flags], cwd=REPO, capture_output=True,
                          check=False, text=True, timeout=300)


def _assert_trees_equal(actual, expected):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), actual, expected)


# -- the inverse of m2d_torch ----------------------------------------------------------------------------------------


@needs_fixtures
def test_the_official_state_dict_comes_back_bit_for_bit():
    official = dict(np.load(STATE_DICT))
    params, target_params = m2d_torch.state_dict_to_params(official, grid_size=FIXTURE_GRID)
    assert "predictor" in params and target_params is not None  # the fixture is a full M2DViT
    exported = m2d_export.params_to_state_dict(params, target_params, grid_size=FIXTURE_GRID,
                                               norm_stats=official["norm_stats"])
    assert list(exported) == list(official)  # every name, in the official order
    for name, value in official.items():  # incl. pos_embed / decoder_pos_embed (rebuilt) and norm_stats
        assert exported[name].dtype == np.float32 and exported[name].flags.c_contiguous, name
        assert np.array_equal(exported[name], value), name

    encoder_only = m2d_export.params_to_state_dict(params, grid_size=FIXTURE_GRID, norm_stats=official["norm_stats"],
                                                   encoder_only=True)
    assert sorted(encoder_only) == sorted(m2d_torch.encoder_entries(official)[0])


def test_leaves_without_an_m2d_name_are_an_error_listing_them():
    config = m2d.default_config("tiny")
    method = m2d.M2D(config, input_shape=INPUT_SHAPE)
    shapes = jax.eval_shape(method.init, jax.random.key(0))
    params, target_params = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    grid = method.grid_size
    names = m2d_export.params_to_state_dict(params, target_params, grid_size=grid)
    assert {name.split(".")[0] for name in names} == {
        "cls_token", "pos_embed", "patch_embed", "blocks", "norm", "mask_token", "decoder_pos_embed", "decoder_embed",
        "decoder_blocks", "decoder_norm", "decoder_pred", "target_blocks", "target_norm"}

    extra = {**params, "head": {"last": {"kernel": np.zeros((192, 8), np.float32)}},  # MATPAC's head
             "encoder": {**params["encoder"], "pos_embed": np.zeros((1, 20, 192), np.float32)}}  # a learned table
    with pytest.raises(ValueError, match=r"params/encoder/pos_embed \[1, 20, 192\], params/head/last/kernel "
                                         r"\[192, 8\]\. Known"):
        m2d_export.params_to_state_dict(extra, target_params, grid_size=grid)
    with pytest.raises(ValueError, match=r"target_params/center \[8\]"):  # MATPAC's teacher centre
        m2d_export.params_to_state_dict(params, {**target_params, "center": np.zeros(8, np.float32)}, grid_size=grid)
    # An encoder export reads params["encoder"] alone: a head elsewhere is not its business.
    only = m2d_export.params_to_state_dict({**params, "head": extra["head"]}, grid_size=grid, encoder_only=True)
    assert not any(name.startswith(("decoder", "mask_token", "target")) for name in only)


# -- the CLI -------------------------------------------------------------------------------------------------------


@needs_fixtures
def test_cli_exports_a_converted_official_checkpoint_bit_for_bit(tmp_path):
    folder, weights = tmp_path / "export", tmp_path / "m2d_tiny-80x208p16x16" / "weights.safetensors"
    result = subprocess.run([sys.executable, "tools/convert_m2d.py", f"--checkpoint={STATE_DICT}",
                             f"--output={folder}"], cwd=REPO, capture_output=True, check=False, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    result = _export_torch(f"--encoder={folder}", f"--output={weights}")
    assert result.returncode == 0, result.stderr
    assert "wrote 31 tensors, 952,322 values" in result.stderr and str(weights) in result.stderr

    exported = load_file(str(weights))
    official, _ = m2d_torch.encoder_entries(dict(np.load(STATE_DICT)))
    assert sorted(exported) == sorted(official)
    for name, value in official.items():
        assert np.array_equal(exported[name], value), name


def _random_export(method_name: str, folder: Path) -> encoder.AudioEncoder:
    """A tiny encoder of `method_name` (random init, every leaf perturbed so no scale is 1 or bias 0), saved."""
    module = {"m2d": m2d, "jepa": jepa}[method_name]
    config = module.default_config("tiny")
    method = {"m2d": m2d.M2D, "jepa": jepa.JEPA}[method_name](config, input_shape=INPUT_SHAPE)
    params = jax.jit(method.encoder.init)(jax.random.key(0), jnp.zeros((1, *INPUT_SHAPE)))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: np.asarray(x) + rng.normal(0, 0.05, x.shape).astype(np.float32), params)
    exported = encoder.AudioEncoder(method_name, config, INPUT_SHAPE, frontend.get_preset("m2d"), NORM_STATS,
                                    {"encoder": params})
    exported.save(str(folder))
    return exported


def _timm_layout_vit(torch, *, width, depth, num_heads, mlp_dim, patch_size, grid, use_cls):
    """A minimal ViT with timm's module names: patch_embed.proj (Conv2d), [cls_token], pos_embed, blocks.<i>
    (norm1, attn.qkv, attn.proj, norm2, mlp.fc1, exact GELU, mlp.fc2; pre-LN), norm; LayerNorm eps 1e-6."""
    nn = torch.nn

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)

        def forward(self, x):
            batch, tokens, _ = x.shape
            q, k, v = self.qkv(x).reshape(batch, tokens, 3, num_heads, width // num_heads).permute(2, 0, 3, 1, 4)
            weights = ((q @ k.transpose(-2, -1)) * (width // num_heads) ** -0.5).softmax(dim=-1)
            return self.proj((weights @ v).transpose(1, 2).reshape(batch, tokens, width))

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(width, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, width)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm1, self.attn = nn.LayerNorm(width, eps=1e-6), Attention()
            self.norm2, self.mlp = nn.LayerNorm(width, eps=1e-6), Mlp()

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch_embed = nn.Module()
            self.patch_embed.proj = nn.Conv2d(1, width, patch_size, stride=patch_size)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if use_cls else None
            self.pos_embed = nn.Parameter(torch.zeros(1, int(use_cls) + grid[0] * grid[1], width), requires_grad=False)
            self.blocks = nn.ModuleList([Block() for _ in range(depth)])
            self.norm = nn.LayerNorm(width, eps=1e-6)

        def forward(self, lms):  # [batch, n_mels, frames] -> [batch, (1 +) F·T', width] after the final norm
            x = self.patch_embed.proj(lms[:, None]).flatten(2).transpose(1, 2)  # frequency-major tokens
            x = x + self.pos_embed[:, int(use_cls):]
            if use_cls:
                x = torch.cat([(self.cls_token + self.pos_embed[:, :1]).expand(len(x), -1, -1), x], dim=1)
            for block in self.blocks:
                x = block(x)
            return self.norm(x)

    return ViT()


@pytest.mark.parametrize("method_name", ["m2d", "jepa"])  # with a CLS token / without (timm class_token=False)
def test_a_pytorch_vit_runs_the_exported_pth_as_this_package_runs_the_encoder(tmp_path, method_name):
    torch = pytest.importorskip("torch", reason="the optional torch extra is not installed")
    ours = _random_export(method_name, tmp_path / "export")
    weights = tmp_path / "encoder.pth"
    result = _export_torch(f"--encoder={tmp_path / 'export'}", f"--output={weights}")
    assert result.returncode == 0, result.stderr

    state_dict = torch.load(weights, map_location="cpu", weights_only=True)
    np.testing.assert_array_equal(state_dict.pop("norm_stats").numpy(), np.float32(NORM_STATS))
    use_cls = method_name == "m2d"
    assert ("cls_token" in state_dict) == use_cls
    model = _timm_layout_vit(torch, width=192, depth=2, num_heads=3, mlp_dim=768, patch_size=(16, 16),
                             grid=(5, 4), use_cls=use_cls)
    model.load_state_dict(state_dict, strict=True)

    lms = np.random.default_rng(1).standard_normal((2, *INPUT_SHAPE)).astype(np.float32)
    with torch.no_grad():
        theirs = model.eval()(torch.from_numpy(lms)).numpy()
    expected = np.asarray(ours.method.encode(ours.params, jnp.asarray(lms)))  # final-norm tokens, [CLS,] patches
    assert theirs.shape == expected.shape == (2, int(use_cls) + 20, 192)
    np.testing.assert_allclose(theirs, expected, atol=ATOL)


@pytest.mark.slow  # a 2-step training run
def test_full_export_of_a_workdir_holds_the_checkpoint(tmp_path):
    import run_helpers as rh

    workdir = str(tmp_path / "run")
    train.train_and_evaluate(rh.tiny_config(total_steps=2, checkpoint_every_steps=2), workdir, num_devices=1)
    step, state = rh.latest_state(workdir)
    grid = (5, 3)  # 80x48 crops
    full, plain = tmp_path / "full.safetensors", tmp_path / "encoder.safetensors"
    result = _export_torch(f"--encoder={workdir}", f"--output={full}", "--full", f"--step={step}")
    assert result.returncode == 0, result.stderr
    result = _export_torch(f"--encoder={workdir}", f"--output={plain}")
    assert result.returncode == 0, result.stderr

    exported = load_file(str(full))
    assert {"decoder_embed.weight", "mask_token", "decoder_pos_embed", "decoder_blocks.1.mlp.fc2.weight",
            "decoder_pred.bias", "target_blocks.1.attn.qkv.weight", "target_norm.weight"} <= set(exported)
    params, target_params = m2d_torch.state_dict_to_params(exported, grid_size=grid)
    _assert_trees_equal(params, state["params"])
    _assert_trees_equal(target_params, state["target_params"])
    norm_stats = np.float32(checkpointing.restore_meta(workdir)[1]["norm_stats"])
    np.testing.assert_array_equal(exported["norm_stats"], norm_stats)

    encoder_only = load_file(str(plain))
    assert sorted(encoder_only) == sorted(m2d_torch.encoder_entries(exported)[0])
    for name, value in encoder_only.items():
        assert np.array_equal(value, exported[name]), name


@pytest.mark.parametrize("case", ["suffix", "full_of_an_export", "unknown_method"])
def test_usage_errors(tmp_path, case):
    export = tmp_path / "export"
    export.mkdir()
    # The tool reads the method (and refuses --full) before any weights: encoder.json alone is enough here.
    method = "byol" if case == "unknown_method" else "m2d"
    (export / encoder.ENCODER_JSON).write_text(json.dumps({"format_version": 2, "method": method}))
    flags, message = {
        "suffix": ([f"--output={tmp_path / 'w.bin'}"], r"must end with one of \('.safetensors', '.pth'\)"),
        "full_of_an_export": ([f"--output={tmp_path / 'w.safetensors'}", "--full"], "--full needs a training workdir"),
        "unknown_method": ([f"--output={tmp_path / 'w.safetensors'}"], "method 'byol' is not supported"),
    }[case]
    result = _export_torch(f"--encoder={export}", *flags)
    assert result.returncode != 0
    assert re.search(message, result.stderr), result.stderr
    assert not list(tmp_path.glob("w*"))  # nothing written
