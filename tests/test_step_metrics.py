"""audiojepa.training.step_metrics: the training loop's host-side bookkeeping, against hand-computed rows.

(The loop itself is exercised end to end by test_train, test_bad_data and test_preemption.)"""

import jax.numpy as jnp
import numpy as np
import pytest

from audiojepa.training import step_metrics
from audiojepa.training.step_metrics import StepMetrics, should_stop


def _step(loss, *, nonfinite=False, skipped=0):
    return {"loss": jnp.float32(loss), "nonfinite": jnp.bool_(nonfinite), "skipped_records": jnp.float32(skipped),
            "skipped/corrupt": jnp.float32(skipped)}


def test_a_row_averages_the_finite_steps_and_sums_the_skip_counts():
    acc = StepMetrics("skip")
    for loss, bad, skipped, wait in [(1.0, False, 1, 0.5), (float("nan"), True, 0, 0.25), (3.0, False, 2, 0.25)]:
        acc.add(_step(loss, nonfinite=bad, skipped=skipped), data_wait_s=wait)
    row = acc.row(3, committed_step=lambda: pytest.fail("no error, so no checkpoint to name"))
    assert row == {"loss": 2.0, "skipped_records": 3.0, "skipped/corrupt": 3.0, "nonfinite_skipped": 1.0,
                   "data_wait_s": 1.0}
    acc.add(_step(5.0), data_wait_s=0.125)  # the next row starts from nothing
    assert acc.row(4, committed_step=lambda: None) == {"loss": 5.0, "skipped_records": 0.0, "skipped/corrupt": 0.0,
                                                       "nonfinite_skipped": 0.0, "data_wait_s": 0.125}


def test_a_row_of_only_nonfinite_steps_keeps_their_values_under_skip():
    acc = StepMetrics("skip")
    acc.add(_step(np.inf, nonfinite=True), data_wait_s=0.0)
    row = acc.row(7, committed_step=lambda: None)
    assert row["loss"] == np.inf and row["nonfinite_skipped"] == 1.0


def test_stop_policy_raises_at_the_first_nonfinite_step_naming_the_committed_checkpoint():
    acc = StepMetrics("stop")
    for loss, bad in [(1.0, False), (np.nan, True), (np.nan, True)]:
        acc.add(_step(loss, nonfinite=bad), data_wait_s=0.0)
    with pytest.raises(step_metrics.NonFiniteLossError, match=r"at step 9;.*latest checkpoint \(5\) is intact"):
        acc.row(10, committed_step=lambda: 5)  # steps 8, 9, 10: the first bad one is 9
    acc = StepMetrics("stop")
    acc.add(_step(np.nan, nonfinite=True), data_wait_s=0.0)
    with pytest.raises(step_metrics.NonFiniteLossError, match="no checkpoint had been written yet"):
        acc.row(1, committed_step=lambda: None)


def test_skip_policy_gives_up_after_max_consecutive_nonfinite_steps_across_rows(monkeypatch):
    monkeypatch.setattr(step_metrics, "MAX_CONSECUTIVE_NONFINITE", 3)
    acc = StepMetrics("skip")
    for step in (1, 2):  # two bad steps, one row each: under the limit
        acc.add(_step(np.nan, nonfinite=True), data_wait_s=0.0)
        acc.row(step, committed_step=lambda: None)
    acc.add(_step(1.0), data_wait_s=0.0)  # a good step resets the run of bad ones
    acc.row(3, committed_step=lambda: None)
    for step in (4, 5):
        acc.add(_step(np.nan, nonfinite=True), data_wait_s=0.0)
        acc.row(step, committed_step=lambda: None)
    acc.add(_step(np.nan, nonfinite=True), data_wait_s=0.0)
    with pytest.raises(step_metrics.NonFiniteLossError, match="3 steps in a row up to step 6"):
        acc.row(6, committed_step=lambda: None)


def test_an_unknown_policy_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="config.nonfinite_policy='ignore'"):
        StepMetrics("ignore")


def test_should_stop():
    asked = []

    def requested(answer):
        return lambda: asked.append(1) or answer

    assert should_stop(5, total_steps=10, stop_after=None, preemption_requested=requested(False)) == \
        step_metrics.StopDecision(preempted=False, last_step=False)
    assert should_stop(5, total_steps=10, stop_after=5, preemption_requested=requested(False)) == \
        step_metrics.StopDecision(preempted=False, last_step=True)
    assert should_stop(5, total_steps=10, stop_after=None, preemption_requested=requested(True)) == \
        step_metrics.StopDecision(preempted=True, last_step=True)
    assert len(asked) == 3
    # at the last step the run is complete: a signal then is not a preemption, and nobody is asked (the question
    # may synchronise the processes of a multi-host run, which must all ask at the same steps)
    assert should_stop(10, total_steps=10, stop_after=None, preemption_requested=requested(True)) == \
        step_metrics.StopDecision(preempted=False, last_step=True)
    assert len(asked) == 3
