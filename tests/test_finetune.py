"""Fine-tuning (audiojepa/evaluation/finetuning.py, python -m audiojepa.finetune): the recipe's pieces against NumPy
references, the CLI end to end on the tone task, resuming, multi-label tasks and the errors."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import task_helpers
from absl import flags

from audiojepa.adapters import encoder
from audiojepa.evaluation import finetuning, tasks
from audiojepa.methods import m2d
from audiojepa.ops import frontend
from configs import finetune as finetune_config

INPUT_SHAPE = (80, 48)  # 5 x 3 patches of 16 x 16
DEPTH = 2  # the tiny variant's


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    """A random-init tiny M2D, exported (as tests/test_encoder_layers.py makes it)."""
    method = m2d.M2D(m2d.default_config("tiny"), input_shape=INPUT_SHAPE)
    params = jax.jit(method.encoder.init)(jax.random.key(0), jnp.zeros((1, *INPUT_SHAPE)))["params"]
    enc = encoder.AudioEncoder("m2d", method.config, INPUT_SHAPE, frontend.get_preset("m2d"), (-7.1, 4.2),
                               {"encoder": params})
    return enc.save(str(tmp_path_factory.mktemp("export")))


@pytest.fixture(scope="module")
def tones(tmp_path_factory):
    return str(task_helpers.tone_task(tmp_path_factory.mktemp("t") / "tones"))


def small_config(**overrides):
    config = finetune_config.get_config()
    config.update({"epochs": 2, "batch_size": 8, "warmup_epochs": 1.0, "base_lr": 0.05, "log_every_steps": 1,
                   "checkpoint_every_steps": 100, **overrides})
    return config


def test_layer_decay_scales_follow_the_rule_row_by_row(tiny_export):
    params = {**encoder.load_encoder(tiny_export).params, "head": {"kernel": np.zeros((960, 2), np.float32),
                                                                    "bias": np.zeros(2, np.float32)}}
    decay = 0.75
    scales = finetuning.layer_decay_scales(params, DEPTH, decay)

    def expected(path: str, leaf) -> np.ndarray:  # timm's param_groups_lrd, written out for depth 2
        layer_scales = [decay ** (DEPTH + 1 - layer_id) for layer_id in range(DEPTH + 2)]
        if path.startswith(("head/", "encoder/stack/norm/")):
            return np.float32(layer_scales[DEPTH + 1])
        if path.startswith("encoder/stack/blocks/"):  # stacked: row i is block i, layer id i + 1
            return np.array([layer_scales[i + 1] for i in range(DEPTH)], np.float32).reshape(
                (DEPTH,) + (1,) * (np.ndim(leaf) - 1))
        return np.float32(layer_scales[0])  # patch embedding, cls token

    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    got = {jax.tree_util.keystr(p): s for p, s in jax.tree_util.tree_flatten_with_path(scales)[0]}
    assert len(flat) == len(got)
    for path, leaf in flat:
        name = "/".join(str(k.key) for k in path)
        np.testing.assert_allclose(np.asarray(got[jax.tree_util.keystr(path)]), expected(name, leaf), rtol=1e-6)
    blocks_qkv = np.asarray(scales["encoder"]["stack"]["blocks"]["attn"]["qkv"]["kernel"])
    assert blocks_qkv.ravel().tolist() == pytest.approx([0.75 ** 2, 0.75])
    assert float(scales["encoder"]["patch_embed"]["proj"]["kernel"]) == pytest.approx(0.75 ** 3)

    # The optimizer's update of each leaf is AdamW's times that scale (stacked leaves row by row).
    schedule = optax.constant_schedule(1e-2)
    config = small_config(layer_decay=decay)
    grads = jax.tree.map(lambda x: jnp.ones_like(x), params)
    tx = finetuning.make_optimizer(config, schedule, params, DEPTH)
    adamw = optax.adamw(schedule, b1=config.b1, b2=config.b2, weight_decay=config.weight_decay,
                        mask=finetuning.weight_decay_mask(params))
    # Jitted: eagerly, optax's per-leaf ops dispatch one by one (~10 s on 2 cores).
    scaled, plain = jax.jit(lambda g, p: (tx.update(g, tx.init(p), p)[0], adamw.update(g, adamw.init(p), p)[0]))(
        grads, params)
    jax.tree.map(lambda s, p, k: np.testing.assert_allclose(s, p * np.asarray(k), rtol=1e-6), scaled, plain, scales)


def test_mixup_and_spec_masks_match_numpy():
    rng = np.random.default_rng(0)
    lms = rng.normal(size=(4, 80, 48)).astype(np.float32)
    targets = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    lam = finetuning.sample_mixup_lambda(np.random.default_rng(1), 0.5)
    assert 0 < lam < 1 and finetuning.sample_mixup_lambda(np.random.default_rng(1), 0.0) == 1.0
    mixed, mixed_targets = finetuning.mixup(jnp.asarray(lms), jnp.asarray(targets), lam)
    np.testing.assert_allclose(mixed, lam * lms + (1 - lam) * lms[::-1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(mixed_targets, lam * targets + (1 - lam) * targets[::-1], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(mixed_targets).sum(axis=1), 1.0, rtol=1e-6)

    masks = finetuning.sample_spec_masks(np.random.default_rng(2), 4, 80, 48, freq_mask=24, time_mask=20)
    assert all(v.shape == (4,) and v.dtype == np.int32 for v in masks.values())
    assert (masks["freq_width"] < 24).all() and (masks["time_width"] < 20).all()
    assert (masks["freq_start"] + masks["freq_width"] <= 80).all() and (masks["time_start"] + masks["time_width"] <= 48).all()
    masked = np.asarray(finetuning.apply_spec_masks(jnp.asarray(lms), *(jnp.asarray(masks[k]) for k in (
        "freq_start", "freq_width", "time_start", "time_width"))))
    reference = lms.copy()
    for b in range(4):  # a loop, the obvious way
        f0, t0 = masks["freq_start"][b], masks["time_start"][b]
        reference[b, f0:f0 + masks["freq_width"][b], :] = 0.0
        reference[b, :, t0:t0 + masks["time_width"][b]] = 0.0
    np.testing.assert_array_equal(masked, reference)
    off = finetuning.sample_spec_masks(np.random.default_rng(2), 4, 80, 48, freq_mask=0, time_mask=0)
    assert not off["freq_width"].any() and not off["time_width"].any()


def numpy_batchnorm1d(batches, eps=1e-5, momentum=0.1):
    """torch.nn.BatchNorm1d(affine=False) as its documentation states it, transcribed: training mode normalises
    with the batch mean and biased variance, and the running mean / variance (init 0 / 1) move `momentum`
    towards the batch mean and the unbiased variance. Returns (each batch normalised, the final running stats)."""
    mean, var, outputs = np.zeros(batches[0].shape[1]), np.ones(batches[0].shape[1]), []
    for x in batches:
        x = x.astype(np.float64)
        outputs.append((x - x.mean(0)) / np.sqrt(x.var(0) + eps))
        mean = (1 - momentum) * mean + momentum * x.mean(0)
        var = (1 - momentum) * var + momentum * x.var(0, ddof=1)
    return outputs, {"mean": mean, "var": var}


def test_head_batchnorm_matches_torch_batchnorm1d():
    rng = np.random.default_rng(0)
    batches = [rng.normal(3.0, 2.0, size=(6, 5)).astype(np.float32) for _ in range(3)]
    expected_outputs, expected_stats = numpy_batchnorm1d(batches)
    stats = finetuning.init_head_stats(5)
    for x, expected in zip(batches, expected_outputs):
        out, stats = jax.jit(finetuning.batchnorm_train)(stats, jnp.asarray(x))
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    for key in ("mean", "var"):
        np.testing.assert_allclose(stats[key], expected_stats[key], rtol=1e-5, atol=1e-6)
    held_out = rng.normal(3.0, 2.0, size=(4, 5)).astype(np.float32)
    expected_eval = (held_out - expected_stats["mean"]) / np.sqrt(expected_stats["var"] + 1e-5)
    np.testing.assert_allclose(finetuning.batchnorm_eval(jax.device_get(stats), held_out), expected_eval,
                               rtol=1e-5, atol=1e-5)
    torch = pytest.importorskip("torch")
    norm = torch.nn.BatchNorm1d(5, affine=False)
    for x in batches:
        norm.train()(torch.from_numpy(x))
    np.testing.assert_allclose(stats["mean"], norm.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats["var"], norm.running_var.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(finetuning.batchnorm_eval(jax.device_get(stats), held_out),
                               norm.eval()(torch.from_numpy(held_out)).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_a_train_step_normalises_the_batch_and_moves_the_head_stats(tiny_export):
    """The step's loss is the head on the batch-normalised clip embeddings, and its head_stats move towards the
    batch's statistics; head_norm="none" leaves them and feeds the raw embeddings."""
    enc = encoder.load_encoder(tiny_export)
    lms = np.random.default_rng(4).normal(size=(4, *INPUT_SHAPE)).astype(np.float32)
    targets = np.eye(2, dtype=np.float32)[[0, 1, 1, 0]]
    no_masks = {k: np.zeros(4, np.int32) for k in ("freq_start", "freq_width", "time_start", "time_width")}
    batch = {"lms": jnp.asarray(lms), "targets": jnp.asarray(targets), **no_masks}
    embedding = np.asarray(finetuning.clip_embedding(enc.method, enc.params, jnp.asarray(lms)), np.float64)
    dim = embedding.shape[1]  # logits O(1) on normalised features: a loss far from 0, compared relatively
    head = {"kernel": jnp.asarray(np.random.default_rng(5).normal(size=(dim, 2)) / np.sqrt(dim), jnp.float32),
            "bias": jnp.zeros((2,), jnp.float32)}
    params = {**enc.params, "head": head}
    tx = optax.sgd(0.0)
    schedule = optax.constant_schedule(0.0)
    expected_outputs, expected_stats = numpy_batchnorm1d([embedding])
    for head_norm, features in (("batchnorm", expected_outputs[0]), ("none", embedding)):
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
                 "head_stats": finetuning.init_head_stats(embedding.shape[1])}
        step = jax.jit(finetuning.make_train_step(enc.method, tx, schedule, False, head_norm))
        new_state, out = step(state, batch, jnp.float32(1.0))
        logits = features @ np.asarray(head["kernel"], np.float64)
        log_probs = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) \
            - logits.max(1, keepdims=True)
        np.testing.assert_allclose(float(out["loss"]), -(targets * log_probs).sum(1).mean(), rtol=1e-4)
        if head_norm == "batchnorm":
            for key in ("mean", "var"):
                np.testing.assert_allclose(new_state["head_stats"][key], expected_stats[key], rtol=1e-4, atol=1e-6)
        else:
            jax.tree.map(np.testing.assert_array_equal, new_state["head_stats"], state["head_stats"])


def test_the_training_forward_is_the_evaluation_clip_embedding(tiny_export):
    enc = encoder.load_encoder(tiny_export)
    lms = np.random.default_rng(3).normal(size=(2, *INPUT_SHAPE)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(finetuning.clip_embedding(enc.method, enc.params, jnp.asarray(lms))),
                               enc.clip_embedding(lms), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_cli_fine_tunes_writes_the_report_and_an_export(tiny_export, tones, tmp_path):
    from audiojepa import finetune

    out = tmp_path / "out"
    argv = ["finetune", f"--encoder={tiny_export}", f"--task={tones}", f"--output={out}", "--config.epochs=2",
            "--config.batch_size=8", "--config.warmup_epochs=1", "--config.base_lr=0.05"]
    flag_values = flags.FlagValues()  # the CLI's flags as typed, in this process (a subprocess compiles again)
    finetune.define_flags(flag_values, sys_argv=argv)
    flag_values(argv)
    finetune.main(argv[:1], flag_values=flag_values)
    result = json.loads((out / "results.json").read_text())["tones"]
    ft = result["finetune"]
    assert ft["metric"] == "accuracy" and 0.0 <= ft["mean"] <= 1.0 and 0.0 <= ft["valid"] <= 1.0
    assert ft["steps"] == ft["total_steps"] == 4 and ft["best_epoch"] in (1, 2) and ft["finished"]
    assert result["config"]["epochs"] == 2 and result["config"]["batch_size"] == 8
    assert "| tones |" in (out / "results.md").read_text()
    tuned, initial = encoder.load_encoder(result["export"]), encoder.load_encoder(tiny_export)
    assert result["export"] == str(out / "tones" / "encoder")
    # head.npz holds the linear layer and BatchNorm's running statistics (moved from their 0 / 1 init); the
    # export and head.npz alone give the reported test score back.
    head = dict(np.load(out / "tones" / "head.npz"))
    assert sorted(head) == ["bias", "kernel", "norm_mean", "norm_var"]
    assert np.abs(head["norm_mean"]).max() > 0 and np.abs(head["norm_var"] - 1).max() > 0
    data = finetuning.prepare_task(tuned, tasks.load_task(tones, sample_rate=16000))
    stats = {"mean": head["norm_mean"], "var": head["norm_var"]}
    assert finetuning.score_split(tuned, head, data, data.test, 4, stats) == ft["mean"]
    diffs = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), tuned.params, initial.params)
    assert max(jax.tree.leaves(diffs)) > 0


@pytest.mark.slow
def test_a_resumed_run_ends_with_the_uninterrupted_runs_params(tiny_export, tones, tmp_path):
    enc = encoder.load_encoder(tiny_export)
    task = tasks.load_task(tones, sample_rate=16000)
    config = small_config(epochs=2)  # 4 steps
    whole, whole_params = finetuning.finetune_task(enc, task, str(tmp_path / "whole"), config)
    part, _ = finetuning.finetune_task(enc, task, str(tmp_path / "resumed"), config, stop_after=3)
    assert part["steps"] == 3 and not part["finished"] and part["test"] is None
    resumed, resumed_params = finetuning.finetune_task(enc, task, str(tmp_path / "resumed"), config)
    assert resumed["steps"] == 4 and resumed["finished"]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), resumed_params, whole_params)
    assert resumed["test"] == whole["test"] and resumed["history"] == whole["history"]
    heads = [np.load(tmp_path / run / "tones" / finetuning.HEAD_FILE) if (tmp_path / run / "tones").exists()
             else np.load(tmp_path / run / finetuning.HEAD_FILE) for run in ("whole", "resumed")]
    for name in ("norm_mean", "norm_var"):  # BatchNorm's running statistics resume too
        np.testing.assert_allclose(heads[1][name], heads[0][name], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"config.seed=0, now 1"):
        finetuning.finetune_task(enc, task, str(tmp_path / "resumed"), small_config(epochs=2, seed=1))


@pytest.mark.slow
def test_a_multilabel_task_reports_map(tiny_export, tmp_path):
    import soundfile as sf

    root = tmp_path / "multi"
    root.mkdir()
    rows = ["filename,label,split"]
    for i in range(20):
        t = np.arange(4000) / 16000
        tone = 0.3 * np.sin(2 * np.pi * (300 if i % 2 else 3000) * t) + (0.2 * np.sin(2 * np.pi * 1000 * t) if i % 3 == 0
                                                                         else 0)
        sf.write(root / f"c{i:02d}.wav", tone.astype(np.float32), 16000)
        labels = ["low" if i % 2 else "high"] + (["mid"] if i % 3 == 0 else [])
        rows.append(f"c{i:02d}.wav,{';'.join(labels)},{'train' if i < 12 else 'valid' if i < 16 else 'test'}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    task = tasks.load_task(str(root), sample_rate=16000)
    assert task.multilabel
    result, _ = finetuning.finetune_task(encoder.load_encoder(tiny_export), task, str(tmp_path / "out"),
                                         small_config(epochs=1))
    assert result["metric"] == "mAP" and 0.0 <= result["test"] <= 1.0


def test_errors_name_the_task_the_encoder_and_folds(tiny_export, tones, tmp_path):
    from audiojepa import finetune

    config = small_config()
    with pytest.raises(FileNotFoundError, match=r"--task=/no/such/task.*neither a folder"):
        finetune.run(tiny_export, ["/no/such/task"], str(tmp_path / "a"), config)
    with pytest.raises(FileNotFoundError, match=rf"--encoder={tmp_path}.*neither an exported encoder"):
        finetune.run(str(tmp_path), [tones], str(tmp_path / "b"), config)
    folds = tmp_path / "folds"
    folds.mkdir()
    csv = ((pathlib.Path(tones) / "labels.csv").read_text().replace("split", "fold").replace(",train", ",1")
           .replace(",valid", ",2").replace(",test", ",2"))
    for name in csv.splitlines()[1:]:
        (folds / name.split(",")[0]).symlink_to(f"{tones}/{name.split(',')[0]}")
    (folds / "labels.csv").write_text(csv)
    with pytest.raises(ValueError, match=r"--task=.*folds.*fixed train/valid/test"):
        finetune.run(tiny_export, [str(folds)], str(tmp_path / "c"), config)
