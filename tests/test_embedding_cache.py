"""The embedding cache of `audiojepa.evaluate` (audiojepa/evaluation/embedding_cache.py): a second evaluation with
other probe settings embeds nothing and gets the same embeddings; a new checkpoint, another crop or an edited
clip misses; a damaged entry is embedded again; `none` writes no cache."""

import dataclasses
import glob
import json
import os

import jax
import numpy as np
import pytest
import soundfile as sf
import task_helpers

from audiojepa import evaluate
from audiojepa.adapters import encoder
from audiojepa.evaluation import embedders, embedding_cache, protocols
from audiojepa.methods import m2d
from audiojepa.ops import frontend

INPUT_SHAPE = (80, 48)


def quick(**overrides) -> protocols.Protocol:
    """The default protocol, one seed and a few probe epochs: the cache is the point here, not the probe."""
    return dataclasses.replace(protocols.resolve(None), **{"seeds": (0,), "max_epochs": 3, **overrides})


def _export(root, seed: int) -> str:
    config = m2d.default_config("tiny")
    method = m2d.M2D(config, input_shape=INPUT_SHAPE)
    params = jax.jit(method.encoder.init)(jax.random.key(seed), np.zeros((1, *INPUT_SHAPE), np.float32))["params"]
    enc = encoder.AudioEncoder("m2d", config, INPUT_SHAPE, frontend.get_preset("m2d"), (-7.1, 4.2), {"encoder": params})
    return enc.save(str(root))


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return [_export(tmp_path_factory.mktemp(f"export{seed}"), seed) for seed in (0, 1)]


@pytest.fixture
def counted_embedding(monkeypatch):
    """Counts embed_task calls (one per embedder and task when nothing is cached)."""
    calls = []
    real = embedders.embed_task

    def counting(embedder, task, **kwargs):
        calls.append((embedder.name, task.name))
        return real(embedder, task, **kwargs)
    monkeypatch.setattr(embedders, "embed_task", counting)
    return calls


def _knn(results):
    return {row: {task: r["knn"]["mean"] for task, r in by_task.items()} for row, by_task in results.items()}


def test_a_second_evaluation_reuses_every_embedding(exports, tmp_path, counted_embedding):
    tones = str(task_helpers.tone_task(tmp_path / "tones"))
    out = str(tmp_path / "eval")
    first = evaluate.run(exports[0], [tones], out, protocol=quick(lr=1e-3))
    assert len(counted_embedding) == 3  # encoder, log-mel baseline, random init
    entries = sorted(glob.glob(os.path.join(out, "embedding_cache", "tones", "*.npz")))
    assert len(entries) == 3
    second = evaluate.run(exports[0], [tones], out, protocol=quick(lr=3e-3, seeds=(1,)))
    assert len(counted_embedding) == 3  # nothing embedded again
    assert _knn(second) == _knn(first)  # kNN is a function of the embeddings alone: the very same embeddings
    assert second[exports[0]]["tones"]["linear"]["lr"] == 3e-3
    # The cached arrays are the embeddings the encoder gives now.
    enc = embedders.EncoderEmbedder(encoder.load_encoder(exports[0]), name=exports[0])
    task = evaluate.tasks.load_task(tones, sample_rate=16000)
    fresh, kept = embedders.embed_task(enc, task)
    key, _ = embedding_cache.cache_key(enc, task, unit_sec=None, crop_seed=0)
    cached, _, cached_kept, meta = embedding_cache.load(
        embedding_cache.entry_path(os.path.join(out, "embedding_cache"), "tones", exports[0], key))
    np.testing.assert_array_equal(cached, fresh)
    np.testing.assert_array_equal(cached_kept, kept)
    assert meta["key"]["embedder"]["params"] == embedding_cache.params_digest(enc.encoder.params)


def test_a_new_checkpoint_another_crop_or_an_edited_clip_misses(exports, tmp_path, counted_embedding):
    tones = task_helpers.tone_task(tmp_path / "tones")
    out = str(tmp_path / "eval")
    evaluate.run(exports[0], [str(tones)], out, protocol=quick(), baselines=False)
    evaluate.run(exports[1], [str(tones)], out, protocol=quick(), baselines=False)  # other params
    assert len(counted_embedding) == 2
    evaluate.run(exports[0], [str(tones)], out, protocol=quick(unit_sec=0.2), baselines=False)  # another crop
    assert len(counted_embedding) == 3
    evaluate.run(exports[0], [str(tones)], out, protocol=quick(), baselines=False)  # cached
    assert len(counted_embedding) == 3
    t = np.arange(4000) / 16000
    sf.write(tones / "c00.wav", (0.1 * np.sin(2 * np.pi * 500 * t)).astype(np.float32), 16000)
    os.utime(tones / "c00.wav", ns=(1, 1))  # a distinct mtime whatever the file system's resolution
    evaluate.run(exports[0], [str(tones)], out, protocol=quick(), baselines=False)
    assert len(counted_embedding) == 4


def test_skipped_clips_are_restored_from_the_cache(exports, tmp_path, counted_embedding):
    tones = task_helpers.tone_task(tmp_path / "tones")
    out = str(tmp_path / "eval")
    task = evaluate.tasks.load_task(str(tones), sample_rate=16000)
    (tones / "c03.wav").write_bytes(b"RIFF not audio")  # fails when embedded, after the task was loaded
    first = evaluate.cached_embed_clips(embedders.make_embedder(exports[0]), task, unit_sec=None, crop_seed=0,
                                        batch_size=8, cache_dir=out)
    assert [s["path"] for s in task.skipped] == ["c03.wav"] and 3 not in first[2]
    again = dataclasses.replace(task, skipped=[])  # the same clips, as a later evaluation loads them
    second = evaluate.cached_embed_clips(embedders.make_embedder(exports[0]), again, unit_sec=None, crop_seed=0,
                                         batch_size=8, cache_dir=out)
    assert len(counted_embedding) == 1
    assert again.skipped == task.skipped
    np.testing.assert_array_equal(second[0], first[0])


def test_a_damaged_entry_is_embedded_again_and_none_disables_the_cache(exports, tmp_path, counted_embedding, caplog):
    tones = str(task_helpers.tone_task(tmp_path / "tones"))
    out = str(tmp_path / "eval")
    evaluate.run(exports[0], [tones], out, protocol=quick(), baselines=False)
    (entry,) = glob.glob(os.path.join(out, "embedding_cache", "tones", "*.npz"))
    with open(entry, "r+b") as f:
        f.truncate(100)
    evaluate.run(exports[0], [tones], out, protocol=quick(), baselines=False)
    assert len(counted_embedding) == 2 and "unreadable" in caplog.text
    evaluate.run(exports[0], [tones], out, protocol=quick(), baselines=False)  # rewritten whole: a hit
    assert len(counted_embedding) == 2
    plain = str(tmp_path / "plain")
    evaluate.run(exports[0], [tones], plain, protocol=quick(), baselines=False, embedding_cache_dir="none")
    evaluate.run(exports[0], [tones], plain, protocol=quick(), baselines=False, embedding_cache_dir="none")
    assert len(counted_embedding) == 4 and not os.path.exists(os.path.join(plain, "embedding_cache"))
    assert json.loads(open(os.path.join(plain, "results.json")).read())["tones"]["knn"] is not None
