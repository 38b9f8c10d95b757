"""Multi-host: 2 processes x 2 CPU devices (jax.distributed over gloo, launched by launch/local.py)
train exactly as 1 process x 4 devices, and their checkpoint resumes under 1 process."""

import logging
import os
import shutil
import subprocess
import sys

import pytest
import run_helpers as rh

from audiojepa.training import train

pytestmark = pytest.mark.slow  # two JAX processes compile and train (about a minute on 2 cores)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    two, one = str(root / "two_processes"), str(root / "one_process")
    cmd = [sys.executable, "launch/local.py", "--num_processes=2", "--cpu_devices_per_process=2", "--",
           *rh.main_command(two)]
    with open(root / "two_processes.log", "w") as log:
        status = subprocess.run(cmd, cwd=rh.REPO, env=rh.subprocess_env(), stdout=log, stderr=subprocess.STDOUT,
                                timeout=600).returncode
    output = (root / "two_processes.log").read_text(errors="replace")
    assert status == 0, output[-4000:]
    train.train_and_evaluate(rh.tiny_config(), one, num_devices=4)
    return {"two": two, "one": one, "output": output, "root": root}


def test_two_processes_give_the_same_losses_and_params_as_one(runs):
    two, one = rh.losses(runs["two"]), rh.losses(runs["one"])
    assert sorted(two) == sorted(one) == list(range(1, 7))
    for step in one:  # the same global batches, row for row, and the same masks
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6), step
    (step_two, state_two), (step_one, state_one) = rh.latest_state(runs["two"]), rh.latest_state(runs["one"])
    assert step_two == step_one == 6
    # The 2-process run compiles with run_helpers.FAST_COMPILE_FLAGS and reduces over another device
    # layout; Adam turns that into ~1e-5 differences in entries whose gradients are near zero.
    rh.assert_states_close(state_two, state_one)


def test_only_process_0_writes_logs(runs):
    assert rh.logged_steps(runs["two"]) == list(range(1, 7))  # one row per step, not one per process
    lines = runs["output"].splitlines()
    assert any(line.startswith("[0]") and "step 6/6" in line for line in lines)
    assert not any(line.startswith("[1]") and "step " in line and "/6" in line for line in lines)
    # Both processes wrote their own Grain iterator state into the shared checkpoint.
    data = os.path.join(runs["two"], "checkpoints", "6", "data")
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(data))


def test_two_process_checkpoint_resumes_on_one_process(runs, caplog):
    # Keep only the step-3 checkpoint of the 2-process run and resume it with 1 process x 4 devices:
    # Grain's per-process iterator state does not apply, so the stream is rebuilt from the step, with a
    # warning, and the run continues exactly as the 1-process run did.
    resumed = str(runs["root"] / "resumed_on_one")
    shutil.copytree(runs["two"], resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
    with caplog.at_level(logging.WARNING):
        train.train_and_evaluate(rh.tiny_config(), resumed, num_devices=4)
    assert any("process_count 2 -> 1" in r.getMessage() for r in caplog.records), caplog.text
    ref, got = rh.losses(runs["one"]), rh.losses(resumed)
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(ref[step], rel=1e-5, abs=1e-6), step
    (_, a), (_, b) = rh.latest_state(resumed), rh.latest_state(runs["one"])
    rh.assert_states_close(a, b)
