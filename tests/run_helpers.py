"""Shared by the scale-out tests: a tiny runlocal config, training subprocesses, reading results back.

The tiny run is M2D `runlocal` shrunk further (batch 8, 48-frame crops, a 64-clip embedded corpus),
so a step takes well under a second on 2 CPU cores. Subprocesses get the test session's
environment (JAX compilation cache, AUDIOJEPA_CACHE, simulated devices) so they reuse its compiles.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp

from audiojepa.config_utils import set_by_path
from audiojepa.runtime import checkpointing, metrics
from configs import m2d as m2d_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = {
    "batch_size": 8,
    "total_steps": 6,
    "warmup_steps": 2,
    "log_every_steps": 1,
    "checkpoint_every_steps": 3,
    "async_checkpoints": False,
    "tensorboard": False,
    "data.crop_frames": 48,
    "data.embedded.num_clips": 64,
    "data.embedded.duration_s": 1.0,
}


def tiny_config(**overrides):
    """The tiny runlocal config, with dotted-key overrides."""
    config = m2d_config.get_config("runlocal")
    for key, value in {**TINY, **overrides}.items():
        set_by_path(config, key, value)
    return config


def main_command(workdir: str, **overrides) -> list[str]:
    """`python -m audiojepa.main` for the tiny config, as a user would type it."""
    flags = [f"--config.{k}={v}" for k, v in {**TINY, **overrides}.items()]
    return [sys.executable, "-m", "audiojepa.main", "--config=configs/m2d.py:runlocal", f"--workdir={workdir}", *flags]


# Training subprocesses compile with cheaper XLA CPU settings (about half the compile time of the tiny
# train step on 2 cores). Runs compared bitwise must all be subprocesses, so that they share these flags.
FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def subprocess_env(**extra) -> dict[str, str]:
    """This session's environment (compile cache, corpus cache, devices) plus fast-compile XLA flags
    and `extra`."""
    current = os.environ.get("XLA_FLAGS", "")  # conftest has usually added them already
    xla_flags = current if FAST_COMPILE_FLAGS in current else " ".join(f for f in (current, FAST_COMPILE_FLAGS) if f)
    return {**os.environ, "PYTHONPATH": REPO, "XLA_FLAGS": xla_flags, **{k: str(v) for k, v in extra.items()}}


def start(cmd: list[str], log_path: str, **env) -> subprocess.Popen:
    log = open(log_path, "ab")
    return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(**env), stdout=log, stderr=subprocess.STDOUT)


def logged_steps(workdir: str) -> list[int]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if line.strip().endswith("}")]


def wait_for_step(proc: subprocess.Popen, workdir: str, step: int, *, rows_before: int, timeout_s: float = 300) -> int:
    """Waits until the run has logged `step` or later in a row after the first `rows_before` rows of
    metrics.jsonl (rows of earlier runs in the same workdir); returns that latest step."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        steps = logged_steps(workdir)[rows_before:]
        if steps and max(steps) >= step:
            return max(steps)
        if proc.poll() is not None:
            raise AssertionError(f"the run exited (status {proc.returncode}) before step {step}; logged {steps}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"step {step} not reached in {timeout_s} s")


def kill(proc: subprocess.Popen, sig=signal.SIGKILL, timeout_s: float = 120) -> int:
    proc.send_signal(sig)
    return proc.wait(timeout_s)


def committed_step(workdir: str) -> int | None:
    """The latest committed checkpoint step in `workdir` (None if there is none)."""
    manager = checkpointing.make_manager(workdir, every_steps=1, read_only=True)
    step = manager.latest_step()
    manager.close()
    return step


def latest_state(workdir: str):
    """(step, state) of the latest committed checkpoint, restored onto this process's first device
    (whatever devices and processes wrote it)."""
    manager = checkpointing.make_manager(workdir, every_steps=1, read_only=True)
    step = manager.latest_step()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    saved = manager.item_metadata(step)["state"]
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), saved)
    state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    manager.close()
    return step, state


def losses(workdir: str) -> dict[int, float]:
    """step -> logged loss (the last row wins where a resumed run logged a step again)."""
    return {r["step"]: r["loss"] for r in metrics.read_metrics(workdir) if "loss" in r}


def assert_states_close(actual, expected, *, rtol: float = 1e-4, atol: float = 1e-4) -> None:
    """Train states of runs that reduced in different orders (device or process counts) agree leaf by
    leaf within rtol/atol, except the key third of every attention qkv bias (and its Adam moments).

    That third has a zero gradient up to rounding (softmax cancels q·b_k, tests/test_models.py::
    test_attention_key_bias_gets_no_gradient), so Adam's normalisation turns rounding noise into ±lr
    steps there: its values differ between such runs and change no output. They must stay finite.
    """
    leaves = jax.tree_util.tree_flatten_with_path(actual)[0]
    assert len(leaves) == len(jax.tree.leaves(expected))
    for (path, a), b in zip(leaves, jax.tree.leaves(expected)):
        name, a, b = jax.tree_util.keystr(path), np.asarray(a), np.asarray(b)
        if name.endswith("['qkv']['bias']"):
            assert np.isfinite(a).all() and np.isfinite(b).all(), name
            width = a.shape[-1] // 3
            a, b = (np.concatenate([x[..., :width], x[..., 2 * width:]], axis=-1) for x in (a, b))
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=name)
