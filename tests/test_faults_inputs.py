"""Bad inputs fail early and name what is wrong (issue 22 item 10): evaluation tasks and outputs, config keys,
normalisation statistics, tool flags, foreign M2D checkpoints and a killed launcher child.

Each test gives one bad input and checks that the error comes before the long work (embedding, decoding,
training) and names the task, file, flag or config key at fault."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tone_task(root, *, labels=("low", "high"), splits=None, n=12):
    """A task folder of `n` 0.25 s tones; clip i has label labels[i % len(labels)] and split splits[i]
    (default: 8 train, 2 valid, 2 test)."""
    root.mkdir(parents=True)
    splits = splits or ["train"] * 8 + ["valid"] * 2 + ["test"] * 2
    rows = ["filename,label,split"]
    t = np.arange(4000) / 16000
    for i in range(n):
        label = labels[i % len(labels)]
        freq = 300.0 if label == labels[0] else 3000.0
        sf.write(root / f"c{i:02d}.wav", (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000)
        rows.append(f"c{i:02d}.wav,{label},{splits[i]}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def no_embedding(monkeypatch):
    """Makes any embedding fail loudly: the checks under test must come before it."""
    from audiojepa.evaluation import embedders

    def embed_task(*args, **kwargs):
        raise AssertionError("embedding started before the bad input was refused")

    monkeypatch.setattr(embedders, "embed_task", embed_task)


# -- a. one-class tasks --------------------------------------------------------------------------------


def test_a_one_class_task_is_refused_naming_the_task_and_its_class(tmp_path, no_embedding):
    from audiojepa import evaluate

    task = _tone_task(tmp_path / "dogs_only", labels=("dog",))
    with pytest.raises(ValueError, match=r"dogs_only.*one class.*'dog'"):
        evaluate.run("logmel", [str(task)], str(tmp_path / "out"), baselines=False, seeds=(0,))


# -- b. results.json is strict JSON ---------------------------------------------------------------------


def _strict_json(text: str):
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def test_b_results_json_with_one_seed_is_strict_json_and_the_table_stays_readable(tmp_path):
    from audiojepa import evaluate

    task = _tone_task(tmp_path / "tones")
    out = tmp_path / "out"
    evaluate.run("logmel", [str(task)], str(out), baselines=False, seeds=(0,))
    for name in ("results.json", "all_results.json"):
        _strict_json((out / name).read_text())  # raises on NaN / Infinity
    linear = _strict_json((out / "results.json").read_text())["tones"]["linear"]
    assert linear["ci95"] is None and linear["std"] is None and math.isfinite(linear["mean"])
    table = (out / "results.md").read_text()
    assert "nan" not in table.lower()
    assert "(1 seed)" in table


# -- c. --output that is a file --------------------------------------------------------------------------


def test_c_an_output_path_that_is_a_file_fails_at_start_naming_it(tmp_path, no_embedding):
    from audiojepa import evaluate

    task = _tone_task(tmp_path / "tones")
    output = tmp_path / "report.txt"
    output.write_text("not a folder")
    with pytest.raises(ValueError, match=rf"--output={output}.*not a folder"):
        evaluate.run("logmel", [str(task)], str(output), baselines=False, seeds=(0,))
    with pytest.raises(ValueError, match=rf"--output={output / 'sub'}"):
        evaluate.run("logmel", [str(task)], str(output / "sub"), baselines=False, seeds=(0,))
    assert output.read_text() == "not a folder"


# -- d. empty test split ---------------------------------------------------------------------------------


def test_d_an_empty_test_split_fails_before_embedding_naming_the_task(tmp_path, no_embedding):
    from audiojepa import evaluate

    task = _tone_task(tmp_path / "no_test", splits=["train"] * 10 + ["valid"] * 2)
    with pytest.raises(ValueError, match=r"no_test.*'test' split is empty"):
        evaluate.run("logmel", [str(task)], str(tmp_path / "out"), baselines=False, seeds=(0,))


# -- e. unknown config keys ------------------------------------------------------------------------------


@pytest.mark.parametrize("dotted_key, close", [
    ("modle.variant", "model"),  # a typo in a group
    ("optim.lrr", "optim.lr"),  # a typo in a leaf: would silently add a key nothing reads
    ("norm_stats", "data.norm_stats"),  # right name, wrong group
])
def test_e_an_unknown_config_key_is_a_value_error_naming_it_and_close_matches(dotted_key, close):
    from audiojepa import config_utils

    config = config_utils.load_config(os.path.join(REPO, "configs/m2d.py:runlocal"))
    before = config.to_dict()
    with pytest.raises(ValueError, match=rf"config\.{dotted_key}\b.*unknown.*did you mean.*{close}"):
        config_utils.set_by_path(config, dotted_key, 1)
    assert config.to_dict() == before  # nothing added
    config_utils.set_by_path(config, "optim.lr", 5e-4)  # known keys still set
    assert config.optim.lr == 5e-4


def test_e_a_key_below_a_leaf_and_an_unknown_config_arg_are_named():
    from audiojepa import config_utils

    config = config_utils.load_config(os.path.join(REPO, "configs/m2d.py:runlocal"))
    with pytest.raises(ValueError, match=r"config\.batch_size holds a value of type int, not a group.*config\.batch_size\.x"):
        config_utils.set_by_path(config, "batch_size.x", 1)
    with pytest.raises(ValueError, match=r"config arg 'runlocl' \('runlocl=1'\) is unknown.*did you mean.*runlocal"):
        config_utils.parse_arg("runlocl=1", runlocal=False, variant="B")


# -- f. normalisation statistics -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_corpus():
    """A shard set of 8 one-second clips (the embedded corpus, cached for the session)."""
    from audiojepa.data import embedded

    return embedded.ensure_embedded_corpus(sample_rate=16000, num_clips=8, duration_s=1.0, seed=0, num_shards=1)


@pytest.mark.parametrize("norm_stats", ["0,0", "-7.1,0", "-7.1,-4.2", "nan,4.2", "-7.1,inf", (0.0, 0.0)])
def test_f_zero_negative_or_non_finite_norm_stats_fail_at_start_naming_the_key(tiny_corpus, norm_stats):
    from audiojepa import config_utils
    from audiojepa.data import resolve

    data = config_utils.data_config("m2d", 48, norm_stats=norm_stats)
    data.shards = tiny_corpus
    with pytest.raises(ValueError, match=r"config\.data\.norm_stats.*std.*> 0"):
        resolve.resolve_data_spec(data)


def test_f_a_statistics_file_with_zero_std_is_an_error_naming_the_file(tmp_path):
    from audiojepa.data import stats
    from audiojepa.ops import frontend

    params = frontend.get_preset("m2d")
    stats.write_stats(str(tmp_path), params, mean=-80.0, std=0.0)  # e.g. computed over silent shards
    with pytest.raises(ValueError, match=rf"{tmp_path / stats.STATS_FILE}.*std=0.*compute_stats"):
        stats.read_stats(str(tmp_path), params)


# -- g. tool flags that can only fail late ---------------------------------------------------------------


def _tool(*args):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_g_make_shards_refuses_sample_rate_zero_before_decoding(tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    sf.write(clips / "a.wav", np.zeros(1600, np.float32) + 0.1, 16000)
    out = tmp_path / "shards"
    result = _tool("tools/make_shards.py", f"--input={clips}", f"--output={out}", "--sample_rate=0", "--workers=0")
    assert result.returncode != 0
    assert "--sample_rate=0" in result.stderr and "ZeroDivisionError" not in result.stderr
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith("shards")]


def test_g_compute_stats_refuses_num_crops_zero_at_start(tmp_path):
    from audiojepa.data import compute_stats, pipeline
    from audiojepa.ops import frontend

    result = _tool("tools/compute_stats.py", f"--shards={tmp_path}", "--num_crops=0")
    assert result.returncode != 0
    assert "--num_crops=0" in result.stderr and "ZeroDivisionError" not in result.stderr
    spec = pipeline.DataSpec((str(tmp_path / "none.array_record"),), frontend.get_preset("m2d"), 48, 0.0, 1.0, 1)
    for bad in (0, -5):  # the library call too, before it opens any shard
        with pytest.raises(ValueError, match=rf"num_crops={bad}.*> 0"):
            compute_stats.compute_logmel_stats(spec, num_crops=bad)


# -- h. foreign or damaged M2D checkpoints ---------------------------------------------------------------

M2D_STATE_DICT = os.path.join(os.environ.get("AUDIOJEPA_FIXTURES", os.path.join(os.path.dirname(REPO), "shared",
                                                                                 "fixtures")),
                              "m2d", "m2d_small_state_dict.npz")


def _m2d_like_state_dict():
    """The entries an encoder export reads, at toy sizes (names and ranks as M2DViT's state_dict)."""
    rng = np.random.default_rng(0)
    return {"cls_token": rng.standard_normal((1, 1, 8)).astype(np.float32),
            "pos_embed": rng.standard_normal((1, 5, 8)).astype(np.float32),
            "patch_embed.proj.weight": rng.standard_normal((8, 1, 16, 16)).astype(np.float32),
            "patch_embed.proj.bias": np.zeros(8, np.float32),
            "blocks.0.attn.qkv.weight": rng.standard_normal((24, 8)).astype(np.float32),
            "norm.weight": np.ones(8, np.float32), "norm_stats": np.array([-7.1, 4.2], np.float32),
            "decoder_embed.weight": np.full((4, 8), np.nan, np.float32)}  # not exported: not checked


def test_h_a_dataparallel_prefix_is_stripped_and_a_foreign_file_names_the_missing_tensor():
    from audiojepa.convert import m2d_torch

    state_dict = _m2d_like_state_dict()
    checked = m2d_torch.check_state_dict({f"module.{k}": v for k, v in state_dict.items()}, source="dp.pth")
    assert sorted(checked) == sorted(state_dict)
    foreign = {"encoder.layers.0.weight": np.zeros((4, 4), np.float32)}  # e.g. a BEATs or HuBERT file
    with pytest.raises(ValueError, match=r"other\.pth: no cls_token, pos_embed, patch_embed\.proj\.weight.*M2D"):
        m2d_torch.check_state_dict(foreign, source="other.pth")


@pytest.mark.parametrize("name, value, message", [
    ("blocks.0.attn.qkv.weight", "nan", r"bad\.npz: tensor blocks\.0\.attn\.qkv\.weight \(24, 8\) has 1 NaN/Inf"),
    ("cls_token", "inf", r"bad\.npz: tensor cls_token \(1, 1, 8\) has 1 NaN/Inf"),
    ("norm_stats", np.array([-7.1, 4.2, 0.0]), r"bad\.npz: norm_stats has 3 values.*\(mean, std\)"),
    ("norm_stats", np.array([-7.1, 0.0]), r"bad\.npz: norm_stats.*std > 0"),
])
def test_h_non_finite_weights_and_bad_norm_stats_are_refused_naming_the_tensor(name, value, message):
    from audiojepa.convert import m2d_torch

    state_dict = _m2d_like_state_dict()
    if isinstance(value, str):
        state_dict[name] = state_dict[name].copy()
        state_dict[name].flat[3 % state_dict[name].size] = float(value)
    else:
        state_dict[name] = value
    with pytest.raises(ValueError, match=message):
        m2d_torch.check_state_dict(state_dict, source="bad.npz")


def test_h_convert_m2d_cli_names_the_file_instead_of_a_key_error(tmp_path):
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, **{"encoder.layers.0.weight": np.zeros((4, 4), np.float32)})
    result = _tool("tools/convert_m2d.py", f"--checkpoint={foreign}", f"--output={tmp_path / 'out'}")
    assert result.returncode != 0 and "KeyError" not in result.stderr
    assert f"{foreign}: no cls_token" in result.stderr + result.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not os.path.exists(M2D_STATE_DICT), reason="M2D fixture state dict not found")
def test_h_convert_m2d_cli_reads_a_dataparallel_checkpoint(tmp_path):
    from audiojepa.adapters import encoder

    prefixed = tmp_path / "dp.npz"
    np.savez(prefixed, **{f"module.{k}": v for k, v in np.load(M2D_STATE_DICT).items()})
    result = _tool("tools/convert_m2d.py", f"--checkpoint={prefixed}", f"--output={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr
    assert encoder.load_encoder(str(tmp_path / "out")).model_config.variant == "tiny"


# -- i. a child killed by a signal -----------------------------------------------------------------------


def test_i_the_local_launcher_exits_128_plus_the_signal_and_names_the_rank(capsys):
    import signal
    import time

    from launch import local

    # Rank 1 is SIGKILLed (as by the OOM killer); rank 0 would wait in a collective and is stopped.
    script = ('if [ "$JAX_PROCESS_ID" = 1 ]; then kill -KILL $$; else exec sleep 60; fi')
    start = time.monotonic()
    status = local.run(["sh", "-c", script], 2, poll_s=0.05)
    assert status == 128 + signal.SIGKILL == 137  # what a shell reports, not 256 - 9 = 247
    assert time.monotonic() - start < 30
    err = capsys.readouterr().err
    assert "process 1" in err and "SIGKILL" in err


def test_i_the_launcher_cli_exit_status_of_a_killed_child_is_137(tmp_path):
    script = 'if [ "$JAX_PROCESS_ID" = 0 ]; then kill -KILL $$; fi'
    result = _tool("launch/local.py", "--num_processes=1", "--", "sh", "-c", script)
    assert result.returncode == 137, (result.returncode, result.stderr)
    assert "process 0 was killed by SIGKILL" in result.stderr


def test_e_an_unknown_config_flag_is_a_usage_error_naming_it():
    """`--config.modle.x=1` / `--config.optim.lrr=1` on the command line ended in a bare KeyError / AttributeError
    traceback from ml_collections' flag parsing; now one line naming the flag and the close match, exit 1."""
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for flag, hint in (("--config.modle.x=1", '"model"'), ("--config.optim.lrr=1", '"lr"')):
        result = subprocess.run([sys.executable, "-m", "audiojepa.main", "--config=configs/m2d.py:runlocal",
                                 "--workdir=/nonexistent/never-made", flag], cwd=repo, capture_output=True, text=True,
                                env={**os.environ, "PYTHONPATH": repo, "AUDIOJEPA_HUGEPAGE_MALLOC": "0"}, timeout=120)
        assert result.returncode == 1, result.stderr[-2000:]
        assert flag.split("=")[0] in result.stderr and hint in result.stderr
        assert "Traceback" not in result.stderr
