"""Checkpoint hygiene from the config: keep the latest N, keep every M-th step, reject bad values by name.
(A half-written checkpoint never being picked is in test_preemption.py.)"""

import os

import ml_collections
import pytest
import run_helpers as rh

from audiojepa.runtime import checkpointing
from audiojepa.training import train


@pytest.mark.slow
def test_keep_last_n_and_keep_every_m_steps(tmp_path):
    workdir = str(tmp_path / "run")
    config = rh.tiny_config(checkpoint_every_steps=1, keep_checkpoints=2, keep_every_steps=3, async_checkpoints=True)
    train.train_and_evaluate(config, workdir, num_devices=1)  # the policy is the point, not the devices
    kept = sorted(int(d) for d in os.listdir(checkpointing.checkpoint_dir(workdir)) if d.isdigit())
    assert kept == [3, 5, 6]  # 5, 6: the latest two; 3: a multiple of 3 (6 is both)


@pytest.mark.parametrize("key, value, message", [
    ("checkpoint_every_steps", 0, "config.checkpoint_every_steps=0"),
    ("keep_checkpoints", 0, "config.keep_checkpoints=0"),
    ("keep_every_steps", -5, "config.keep_every_steps=-5"),
    ("keep_every_steps", 4, "config.keep_every_steps=4 is not a multiple of config.checkpoint_every_steps=3"),
    ("keep_every_steps", 1.5, "config.keep_every_steps=1.5"),
    ("async_checkpoints", "yes", "config.async_checkpoints='yes'"),
])
def test_bad_checkpoint_values_name_the_key(tmp_path, key, value, message):
    config = ml_collections.ConfigDict({"checkpoint_every_steps": 3, "keep_checkpoints": 2, "keep_every_steps": 0,
                                        "async_checkpoints": True, key: value})
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        checkpointing.manager_from_config(str(tmp_path), config)


def test_resuming_a_per_block_checkpoint_names_the_layout_change(tmp_path):
    """A checkpoint whose transformer blocks are stored one by one (blocks_<i>, before the stacked layout)
    is refused with a message naming the checkpoint and the layout, not Orbax's list of missing keys."""
    import jax
    import numpy as np

    from audiojepa.models import vit

    stacked = {"stack": {"blocks": {"mlp": {"kernel": np.ones((2, 3, 4), np.float32)}},
                         "norm": {"scale": np.ones(3, np.float32)}}}
    per_block = {"stack": vit.unstack_blocks(stacked["stack"])}
    assert set(per_block["stack"]) == {"blocks_0", "blocks_1", "norm"}
    manager = checkpointing.make_manager(str(tmp_path), every_steps=1, async_save=False)
    assert checkpointing.save(manager, 1, {"params": per_block}, None, {"step": 1}, force=True)
    manager.wait_until_finished()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), {"params": stacked})
    with pytest.raises(ValueError, match=r"checkpoint 1 in .* stores transformer blocks one by one "
                                         r"\(e.g. state\['params'\]\['stack'\]\['blocks_0'\]"):
        checkpointing.restore(manager, 1, abstract)
    # The same tree in the stacked layout restores.
    assert checkpointing.save(manager, 2, {"params": stacked}, None, {"step": 2}, force=True)
    manager.wait_until_finished()
    restored, meta = checkpointing.restore(manager, 2, abstract)
    np.testing.assert_array_equal(restored["params"]["stack"]["blocks"]["mlp"]["kernel"], 1.0)
    assert meta == {"step": 2}
