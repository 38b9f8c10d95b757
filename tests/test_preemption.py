"""Surviving interruptions: SIGKILL at random steps, SIGTERM (preemption) and a half-written checkpoint,
then a bitwise comparison with an uninterrupted run of the same length.

One training workdir goes through: SIGKILL -> restart -> SIGKILL -> restart -> SIGTERM (must commit a
checkpoint at the step it stopped and exit 143) -> a planted half-written later checkpoint -> restart to
the end. The steps are drawn at random (seed in AUDIOJEPA_TEST_SEED, or printed on failure).
"""

import json
import os
import random
import shutil
import signal

import jax
import numpy as np
import pytest
import run_helpers as rh

from audiojepa.runtime import checkpointing, host_memory
from audiojepa.training import run_summary

pytestmark = pytest.mark.slow  # five training subprocesses (about a minute on 2 cores)

TOTAL = 12
SETTINGS = {"total_steps": TOTAL, "checkpoint_every_steps": 2, "async_checkpoints": True}
ENV = {"JAX_NUM_CPU_DEVICES": 1}


@pytest.fixture(scope="module")
def seed():
    return int(os.environ.get("AUDIOJEPA_TEST_SEED") or random.SystemRandom().randrange(10**6))


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, seed):
    """Runs the interruption sequence; returns what each stage observed."""
    print(f"preemption test seed: AUDIOJEPA_TEST_SEED={seed}")  # shown with the setup's output if it fails
    rng = random.Random(seed)
    root = tmp_path_factory.mktemp("preemption")
    workdir, log = str(root / "run"), str(root / "run.log")
    cmd = rh.main_command(workdir, **SETTINGS)
    seen = {"seed": seed, "kills": []}
    # The uninterrupted run first: it compiles the step once into the session's cache for the others.
    reference = str(root / "uninterrupted")
    assert rh.start(rh.main_command(reference, **SETTINGS), str(root / "uninterrupted.log"), **ENV).wait(600) == 0
    seen["reference"] = reference
    with open(root / "uninterrupted.log", errors="replace") as f:
        seen["reference_log"] = f.read()
    for _ in range(2):
        committed = rh.committed_step(workdir) or 0
        target = rng.randint(committed + 1, max(committed + 1, TOTAL - 5))
        rows = len(rh.logged_steps(workdir))
        proc = rh.start(cmd, log, **ENV)
        seen["kills"].append((target, rh.wait_for_step(proc, workdir, target, rows_before=rows)))
        assert rh.kill(proc, signal.SIGKILL) == -signal.SIGKILL
    committed = rh.committed_step(workdir) or 0
    rows = len(rh.logged_steps(workdir))
    proc = rh.start(cmd, log, **ENV)
    rh.wait_for_step(proc, workdir, rng.randint(committed + 1, max(committed + 1, TOTAL - 3)), rows_before=rows)
    seen["sigterm_status"] = rh.kill(proc, signal.SIGTERM)
    seen["sigterm_logged"] = max(rh.logged_steps(workdir)[rows:])
    seen["sigterm_committed"] = rh.committed_step(workdir)
    with open(os.path.join(workdir, run_summary.SUMMARY_FILE)) as f:
        seen["sigterm_summary"] = json.load(f)
    # A save killed half-way leaves `<step>.orbax-checkpoint-tmp` (a SIGKILL above may have left one too):
    # plant one for a later step, with truncated array files, and check the restart ignores it.
    ckpt = checkpointing.checkpoint_dir(workdir)
    half = os.path.join(ckpt, f"{TOTAL - 1}.orbax-checkpoint-tmp")
    shutil.copytree(os.path.join(ckpt, str(seen["sigterm_committed"])), half)
    for dirpath, _, files in os.walk(os.path.join(half, "state")):
        for name in files:
            with open(os.path.join(dirpath, name), "r+b") as f:
                f.truncate(os.path.getsize(os.path.join(dirpath, name)) // 2)
    proc = rh.start(cmd, log, **ENV)
    seen["final_status"] = proc.wait(600)
    with open(log, errors="replace") as f:
        seen["log"] = f.read()
    seen["workdir"] = workdir
    return seen


def test_sigterm_commits_a_checkpoint_at_the_step_it_stops(interrupted):
    assert interrupted["sigterm_status"] == 143, interrupted  # audiojepa.training.process.EXIT_PREEMPTED (128 + SIGTERM)
    step = interrupted["sigterm_committed"]
    assert step == interrupted["sigterm_logged"] < TOTAL, interrupted
    assert interrupted["sigterm_summary"]["preempted"] and interrupted["sigterm_summary"]["step"] == step
    assert "preemption signal at step" in interrupted["log"]


def test_half_written_checkpoint_is_never_picked(interrupted):
    assert f"resumed from step {interrupted['sigterm_committed']} " in interrupted["log"], interrupted["log"][-3000:]


def test_killed_and_resumed_run_equals_an_uninterrupted_one_bitwise(interrupted):
    assert interrupted["final_status"] == 0, interrupted["log"][-3000:]
    (step_a, a), (step_b, b) = rh.latest_state(interrupted["workdir"]), rh.latest_state(interrupted["reference"])
    assert step_a == step_b == TOTAL
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y, err_msg=f"seed {interrupted['seed']}, kills {interrupted['kills']}")
    # Every step's loss, including those re-run after a kill, equals the uninterrupted run's.
    assert rh.losses(interrupted["workdir"]) == rh.losses(interrupted["reference"])


def test_the_trainer_reexecutes_with_huge_page_malloc_and_says_so(interrupted):
    """`python -m audiojepa.main` replaces itself once with glibc's huge-page tunable (audiojepa.runtime.host_memory,
    whose own tests check the page faults) and logs which malloc it runs with, then that it is done."""
    parent = rh.subprocess_env()
    child_env = host_memory.hugepage_env(parent) or parent
    log = interrupted["reference_log"]
    assert f"host memory: {host_memory.describe(child_env)}" in log, log[-3000:]
    assert log.count("host memory: ") == 1  # one re-exec, not a loop
    assert f"done: {interrupted['reference']}" in log
