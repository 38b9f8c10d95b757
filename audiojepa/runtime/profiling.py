"""A `jax.profiler` trace of a window of training steps (`config.profile_steps`), on any backend.

    python -m audiojepa.main --config=configs/m2d.py --workdir=DIR --config.profile_steps=100,5
    tensorboard --logdir DIR/tb        # the "Profile" tab (tensorboard-plugin-profile), or XProf

`"START,COUNT"` traces the COUNT steps that take the run from step START to START + COUNT (steps counted
as the logs count them: "step N" is logged after N steps), so "0,3" includes the first step's compile.
The trace goes to `DIR/tb/plugins/profile/<timestamp>/<host>.xplane.pb`, beside the TensorBoard scalars;
every process of a multi-host run writes its own host's file. The device work of the last traced step is
waited for before the trace stops. A run resumed past the window traces nothing (logged); resumed inside
it, it traces the window's remaining steps.
"""

from __future__ import annotations

import logging
import os

import jax

PROFILE_SUBDIR = "tb"  # TensorBoard's logdir; the profile plugin reads <logdir>/plugins/profile/


def parse_profile_steps(value) -> tuple[int, int] | None:
    """config.profile_steps ("START,COUNT", a (START, COUNT) pair, or None/"" for no trace) -> (start, count).

    Raises ValueError naming config.profile_steps when it is not two integers, START >= 0 and COUNT >= 1.
    """
    if value is None or value == "":
        return None
    parts = value.split(",") if isinstance(value, str) else list(value)
    try:
        start, count = (int(str(p).strip()) for p in parts)
    except ValueError:
        raise ValueError(f"config.profile_steps={value!r}; expected 'START,COUNT' (two integers, e.g. '100,5': "
                         "the 5 steps after step 100)") from None
    if start < 0 or count < 1:
        raise ValueError(f"config.profile_steps={value!r}; expected START >= 0 and COUNT >= 1")
    return start, count


class StepProfiler:
    """Starts and stops `jax.profiler` around the steps of `config.profile_steps` (module docstring).

    Call `before_step(step)` with the number of steps done before each step, `after_step(step, state)` with the
    number done after it, and `close()` when the loop ends (stops a trace a failure or a preemption left open).
    """

    def __init__(self, window: tuple[int, int] | None, workdir: str, *, first_step: int):
        self.window = window
        self.directory = os.path.join(workdir, PROFILE_SUBDIR)
        self.active = False
        if window is not None and first_step >= sum(window):
            logging.info("config.profile_steps=%d,%d: the run resumes at step %d, past that window; no trace",
                         *window, first_step)
            self.window = None

    def before_step(self, step: int) -> None:
        if self.window is None or self.active:
            return
        start, count = self.window
        if start <= step < start + count:
            jax.profiler.start_trace(self.directory)
            self.active = True
            logging.info("profiling steps %d to %d into %s", step + 1, start + count, self.directory)

    def after_step(self, step: int, state) -> None:
        if self.active and step >= sum(self.window):
            jax.block_until_ready(state)  # the traced steps' device work belongs in the trace
            self._stop(step)

    def close(self) -> None:
        if self.active:
            self._stop(None)

    def _stop(self, step: int | None) -> None:
        jax.profiler.stop_trace()
        self.active = False
        self.window = None
        logging.info("profile written to %s (%s)", os.path.join(self.directory, "plugins", "profile"),
                     f"through step {step}" if step is not None else "stopped early: the run ended inside the window")
