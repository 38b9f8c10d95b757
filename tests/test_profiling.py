"""config.profile_steps (audiojepa/runtime/profiling.py): a jax.profiler trace of a window of training steps, written into
the workdir's TensorBoard folder; bad values fail at startup naming the key."""

import glob
import os

import pytest
import run_helpers as rh

from audiojepa.runtime import profiling
from audiojepa.training import train


def test_parse_profile_steps():
    assert profiling.parse_profile_steps(None) is None and profiling.parse_profile_steps("") is None
    assert profiling.parse_profile_steps("100,5") == (100, 5)
    assert profiling.parse_profile_steps(" 0 , 3 ") == (0, 3)
    assert profiling.parse_profile_steps((7, 2)) == (7, 2)
    for bad in ("5", "a,b", "1,2,3", "-1,2", "3,0"):
        with pytest.raises(ValueError, match=r"config\.profile_steps="):
            profiling.parse_profile_steps(bad)


def test_a_bad_profile_steps_fails_at_startup_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"config\.profile_steps='5'"):
        train.train_and_evaluate(rh.tiny_config(profile_steps="5"), str(tmp_path / "run"), num_devices=1)
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def _traces(workdir) -> list[str]:
    return sorted(glob.glob(os.path.join(workdir, "tb", "plugins", "profile", "*", "*.xplane.pb")))


@pytest.mark.slow
def test_a_run_writes_a_trace_of_its_window_and_a_resume_past_it_writes_none(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    caplog.set_level("INFO")
    train.train_and_evaluate(rh.tiny_config(profile_steps="2,2"), workdir, stop_after=5, num_devices=1)
    traces = _traces(workdir)
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0, traces
    assert "profiling steps 3 to 4" in caplog.text and "through step 4" in caplog.text
    # The trace holds the traced steps' XLA work: the jitted train step's module (train.make_train_step's step_fn).
    with open(traces[0], "rb") as f:
        assert b"jit_step_fn" in f.read()
    caplog.clear()
    train.train_and_evaluate(rh.tiny_config(profile_steps="2,2"), workdir, num_devices=1)  # resumes at 5
    assert _traces(workdir) == traces
    assert "past that window; no trace" in caplog.text


@pytest.mark.slow
def test_a_run_that_ends_inside_the_window_still_writes_its_trace(tmp_path, caplog):
    workdir = str(tmp_path / "run")
    caplog.set_level("INFO")
    train.train_and_evaluate(rh.tiny_config(profile_steps="4,10"), workdir, num_devices=1)  # 6 steps in all
    assert len(_traces(workdir)) == 1
    assert "stopped early" in caplog.text
