"""`evaluate --steps=all|N,M`: a training workdir evaluated at several checkpoints into one report (rows per step,
results.json "steps", a table and a plot of score against step), each step with its own params."""

import dataclasses
import glob
import json
import os

import numpy as np
import pytest
import run_helpers as rh
import task_helpers

from audiojepa import evaluate
from audiojepa.evaluation import embedding_cache, protocols
from audiojepa.training import train

pytestmark = pytest.mark.slow  # one tiny training run (6 steps, checkpoints at 3 and 6) and a few evaluations


def quick() -> protocols.Protocol:
    return dataclasses.replace(protocols.resolve(None), seeds=(0,), max_epochs=3)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("run") / "m2d")
    train.train_and_evaluate(rh.tiny_config(), path, num_devices=1)
    return path


@pytest.fixture(scope="module")
def tones(tmp_path_factory):
    return str(task_helpers.tone_task(tmp_path_factory.mktemp("t") / "tones"))


def test_every_kept_checkpoint_in_one_report(workdir, tones, tmp_path):
    assert evaluate.checkpoint_steps(workdir, "all") == [3, 6]
    out = str(tmp_path / "by_step")
    results = evaluate.run(workdir, [tones], out, protocol=quick(), steps="all")
    rows = [f"{workdir} @ step 3", f"{workdir} @ step 6"]
    assert list(results)[:2] == rows and {"logmel", "random init"} <= set(results)
    main = json.loads(open(os.path.join(out, "results.json")).read())["tones"]
    assert sorted(main["steps"]) == ["3", "6"] and main["steps"]["6"]["step"] == 6
    assert main["knn"] == main["steps"]["6"]["knn"]  # the last step on top
    md = open(os.path.join(out, "results.md")).read()
    assert "Scores by checkpoint" in md and "| tones | 3 |" in md and "| tones | 6 |" in md
    assert os.path.getsize(os.path.join(out, "scores_by_step.png")) > 0
    # Each step embedded with its own params: two cache entries of the encoder rows, with different embeddings,
    # and step 6's are those of the workdir's latest checkpoint evaluated on its own.
    entries = sorted(glob.glob(os.path.join(out, "embedding_cache", "tones", "*step*.npz")))
    assert len(entries) == 2
    (a, *_), (b, *_) = (embedding_cache.load(e) for e in entries)
    assert not np.allclose(a, b)
    latest = evaluate.run(workdir, [tones], str(tmp_path / "latest"), protocol=quick(), baselines=False,
                          embedding_cache_dir="none")
    assert latest[workdir]["tones"]["knn"] == results[rows[1]]["tones"]["knn"]


def test_chosen_steps_and_errors(workdir, tones, tmp_path):
    assert evaluate.checkpoint_steps(workdir, "6, 3") == [3, 6]
    results = evaluate.run(workdir, [tones], str(tmp_path / "one"), protocol=quick(), steps="6", baselines=False)
    assert list(results) == [f"{workdir} @ step 6"]
    with pytest.raises(ValueError, match=r"--steps=5: .* no checkpoint at step\(s\) \[5\]; kept: \[3, 6\]"):
        evaluate.checkpoint_steps(workdir, "5")
    with pytest.raises(ValueError, match=r"--steps='x'"):
        evaluate.checkpoint_steps(workdir, "x")
    with pytest.raises(ValueError, match=r"is not a training workdir"):
        evaluate.checkpoint_steps(tones, "all")
    with pytest.raises(ValueError, match=r"--layer=all"):
        evaluate.run(workdir, [tones], str(tmp_path / "x"), protocol=quick(), steps="all", layer="all")
