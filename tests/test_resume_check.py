"""audiojepa.training.resume_check: a resumed run refuses a config that changes the run itself, and says which keys."""

import json
import logging

import pytest
import run_helpers as rh

from audiojepa.training import resume_check, train


def saved(config) -> dict:
    return json.loads(config.to_json_best_effort())


def test_identity_changes_raise_naming_the_keys_and_others_warn(caplog):
    config = rh.tiny_config()
    before = saved(config)
    resume_check.check(before, config, step=3, workdir="/w")  # unchanged: nothing

    for key, value in (("seed", 1), ("batch_size", 16), ("model.mask_ratio", 0.5), ("data.crop_frames", 64),
                       ("data.frontend", "matpac"), ("method", "matpac"), ("data.embedded.num_clips", 65)):
        changed = rh.tiny_config(**{key: value})
        with pytest.raises(ValueError, match=rf"from step 3 .*config\.{key.replace('.', '[.]')}: .* -> "
                                             r".*--config\.allow_resume_changes=True"):
            resume_check.check(before, changed, step=3, workdir="/w")

    caplog.set_level(logging.WARNING)
    for key, value in (("total_steps", 12), ("optim.lr", 5e-3), ("log_every_steps", 2), ("model.remat", "dots"),
                       ("data.num_workers", 2), ("data.shards", "/moved/shards")):
        caplog.clear()
        resume_check.check(before, rh.tiny_config(**{key: value}), step=3, workdir="/w")
        assert f"config.{key}:" in caplog.text

    allowed = rh.tiny_config(seed=1, allow_resume_changes=True)
    caplog.clear()
    resume_check.check(before, allowed, step=3, workdir="/w")
    assert "config.seed: 0 -> 1" in caplog.text and "allowed by config.allow_resume_changes" in caplog.text


def test_keys_from_another_version_of_the_configs_only_warn(caplog):
    config = rh.tiny_config()
    before = saved(config)
    del before["model"]["mask_ratio"]  # as if saved before the key existed
    before["model"]["retired_key"] = 1
    caplog.set_level(logging.WARNING)
    resume_check.check(before, config, step=3, workdir="/w")
    assert "config.model.mask_ratio" in caplog.text and "config.model.retired_key" in caplog.text
    resume_check.check(None, config, step=3, workdir="/w")  # a checkpoint without a saved config


@pytest.mark.slow
def test_the_trainer_refuses_a_changed_seed_and_keeps_its_config_json(tmp_path):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(rh.tiny_config(total_steps=3), workdir, num_devices=1)
    with open(tmp_path / "run" / "config.json") as f:
        written = f.read()
    with pytest.raises(ValueError, match=r"config\.seed: 0 -> 7"):
        train.train_and_evaluate(rh.tiny_config(total_steps=3, seed=7), workdir, num_devices=1)
    assert (tmp_path / "run" / "config.json").read_text() == written
