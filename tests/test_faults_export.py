"""Exports never shadow a workdir's checkpoints and are never half-written (issue 22 item 9); a damaged export
is an error naming its file."""

import json
import os

import numpy as np
import pytest
import run_helpers as rh

from audiojepa.adapters import encoder as encoder_lib
from audiojepa.training import train

pytestmark = pytest.mark.slow  # one short in-process training run


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("run"))
    train.train_and_evaluate(rh.tiny_config(total_steps=4, checkpoint_every_steps=2), path, num_devices=1)
    return path


def test_an_export_into_a_training_workdir_is_refused(workdir):
    loaded = encoder_lib.load_encoder(workdir, step=2)
    with pytest.raises(ValueError, match="training workdir"):
        loaded.save(workdir, source=workdir)
    assert not os.path.exists(os.path.join(workdir, encoder_lib.ENCODER_JSON))
    assert int(encoder_lib.load_encoder(workdir).params is not None)  # the workdir still loads its checkpoints


def test_a_workdir_holding_an_old_export_is_ambiguous_and_says_so(workdir, tmp_path):
    export = str(tmp_path / "export")
    encoder_lib.load_encoder(workdir, step=2).save(export)
    shadowed = str(tmp_path / "shadowed")
    os.makedirs(shadowed)
    os.symlink(os.path.join(workdir, "checkpoints"), os.path.join(shadowed, "checkpoints"))
    for name in os.listdir(export):  # what an older version let `export_encoder --output WORKDIR` write
        os.link(os.path.join(export, name), os.path.join(shadowed, name))
    with pytest.raises(ValueError, match="both an exported encoder .* and a training workdir"):
        encoder_lib.load_encoder(shadowed)


def test_exports_are_replaced_whole_and_damage_is_detected(workdir, tmp_path):
    export = str(tmp_path / "export")
    first = encoder_lib.load_encoder(workdir, step=2)
    first.save(export)
    second = encoder_lib.load_encoder(workdir, step=4)
    second.save(export)  # over an existing export: the step-4 encoder, whole
    loaded = encoder_lib.load_encoder(export)
    for a, b in zip(*(map(np.asarray, encoder_lib.jax.tree.leaves(e.params)) for e in (loaded, second))):
        np.testing.assert_array_equal(a, b)
    assert not [n for n in os.listdir(export) if n.endswith(".tmp")]

    params_path = os.path.join(export, encoder_lib.PARAMS_FILE)
    with open(params_path, "rb") as f:
        data = f.read()
    with open(params_path, "wb") as f:
        f.write(data[: len(data) // 2])  # truncated (a full disk, a killed copy)
    with pytest.raises(ValueError, match=params_path):
        encoder_lib.load_encoder(export)
    # The step-2 params under the step-4 encoder.json (a crash between the two files): detected too.
    first.save(str(tmp_path / "other"))
    with open(os.path.join(str(tmp_path / "other"), encoder_lib.PARAMS_FILE), "rb") as f:
        other = f.read()
    with open(params_path, "wb") as f:
        f.write(other)
    with pytest.raises(ValueError, match="does not match"):
        encoder_lib.load_encoder(export)
    with open(os.path.join(export, encoder_lib.ENCODER_JSON)) as f:
        assert "params_sha256" in json.load(f)
