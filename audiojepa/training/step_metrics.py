"""The host side of the training loop's bookkeeping: per-step metrics averaged into logged rows, the
non-finite policy, and the decision to leave the loop.

The jitted step returns its metrics as device arrays; `StepMetrics` keeps them on device until a row is due
(a log, a checkpoint or the last step), so that the loop never waits for a step to finish, then fetches them
together, applies `config.nonfinite_policy` to them and averages them into one row.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import jax
import numpy as np

# config.nonfinite_policy: "stop" raises NonFiniteLossError at the first NaN/Inf loss or gradient;
# "skip" drops that batch (the state is not updated) and goes on, unless this many steps in a row fail.
NONFINITE_POLICIES = ("stop", "skip")
MAX_CONSECUTIVE_NONFINITE = 20


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss or gradient; the last checkpoint predates it."""


def check_nonfinite_policy(policy: str) -> str:
    """`policy` if it is one of NONFINITE_POLICIES, else a ValueError naming config.nonfinite_policy."""
    if policy not in NONFINITE_POLICIES:
        raise ValueError(f"config.nonfinite_policy={policy!r}; valid: {NONFINITE_POLICIES} (stop the run, "
                         "or skip the batch and go on)")
    return policy


class StepMetrics:
    """Metrics of the steps since the last row, and the seconds the loop waited for their batches.

    Each step's metrics are a dict of scalars: `nonfinite` (the step was not applied), `skipped*` record counts,
    and the method's own metrics (loss, ...). A row holds the mean of the method's metrics over the finite steps
    (over all steps when none was finite), the sum of the `skipped*` counts, `nonfinite_skipped` and
    `data_wait_s`.
    """

    def __init__(self, nonfinite_policy: str):
        self.nonfinite_policy = check_nonfinite_policy(nonfinite_policy)
        self._pending = []  # device metrics, one dict per step
        self._data_wait_s = 0.0
        self._nonfinite_in_a_row = 0

    def add(self, device_metrics: dict, *, data_wait_s: float) -> None:
        """Keeps one step's metrics (device arrays, not fetched) and the time its batch took to arrive."""
        self._pending.append(device_metrics)
        self._data_wait_s += data_wait_s

    def row(self, step: int, *, committed_step: Callable[[], int | None]) -> dict[str, float]:
        """The row of the steps up to `step` (the pending ones end there), which it clears.

        Raises NonFiniteLossError when a step was not finite under policy "stop", or when
        MAX_CONSECUTIVE_NONFINITE steps in a row were not under "skip"; the message names the latest
        committed checkpoint, `committed_step()` (which should wait for saves in flight)."""
        host = jax.device_get(self._pending)
        self._pending = []
        first = step - len(host) + 1
        bad = [first + i for i, m in enumerate(host) if m["nonfinite"]]
        for m in host:
            self._nonfinite_in_a_row = self._nonfinite_in_a_row + 1 if m["nonfinite"] else 0
        if bad and (self.nonfinite_policy == "stop" or self._nonfinite_in_a_row >= MAX_CONSECUTIVE_NONFINITE):
            why = (f"{self._nonfinite_in_a_row} steps in a row up to step {bad[-1]}"
                   if self.nonfinite_policy == "skip" else f"step {bad[0]}")
            latest = committed_step()
            kept = (f"the latest checkpoint ({latest}) is intact" if latest is not None
                    else "no checkpoint had been written yet")
            raise NonFiniteLossError(
                f"non-finite loss or gradient at {why}; the state was not updated and {kept}. "
                "Lower config.optim.base_lr or check the data; "
                "config.nonfinite_policy='skip' drops such batches and goes on.")
        if bad:
            logging.warning("non-finite loss or gradient at step(s) %s: batch skipped, state not updated "
                            "(config.nonfinite_policy='skip')", bad)
        good = [m for m in host if not m["nonfinite"]] or host
        row = {k: float(np.mean([m[k] for m in good])) for k in host[-1]
               if k != "nonfinite" and not k.startswith("skipped")}
        row.update({k: float(sum(m[k] for m in host)) for k in host[-1] if k.startswith("skipped")})
        row["nonfinite_skipped"] = float(len(bad))
        row["data_wait_s"] = self._data_wait_s
        self._data_wait_s = 0.0
        return row


@dataclasses.dataclass(frozen=True)
class StopDecision:
    """After a step: `preempted` (a preemption was asked for before the last step), `last_step` (the loop
    saves this step's checkpoint unconditionally and leaves)."""
    preempted: bool
    last_step: bool


def should_stop(step: int, *, total_steps: int, stop_after: int | None,
                preemption_requested: Callable[[], bool]) -> StopDecision:
    """Whether the loop ends after `step` (the number of steps done). `preemption_requested()` is asked only
    before the last step (it may synchronise processes): a signal during the final step is not a preemption,
    the run is complete."""
    preempted = step < total_steps and preemption_requested()
    return StopDecision(preempted=preempted, last_step=step == total_steps or step == stop_after or preempted)
