"""Process set-up and exit shared by the entry points (audiojepa.main, audiojepa.selftrain)."""

import logging as std_logging
import sys

import jax
from absl import logging

from audiojepa import distributed, train

EXIT_PREEMPTED = 143  # 128 + SIGTERM: what a killed process reports; re-running resumes


def setup() -> None:
    """Logging and multi-host start-up shared by the entry points (this one and audiojepa.selftrain)."""
    # Orbax and Grain log every checkpoint step at INFO through absl's logger; keep their warnings only,
    # so the trainer's progress lines stay readable.
    std_logging.getLogger("absl").setLevel(std_logging.WARNING)
    distributed.maybe_initialize()
    if jax.process_index() > 0:  # one copy of the progress lines, from process 0
        std_logging.getLogger().setLevel(std_logging.WARNING)


def train_and_exit(config, workdir: str) -> None:
    """Trains; exits with EXIT_PREEMPTED when a preemption signal stopped the run after its checkpoint."""
    result = train.train_and_evaluate(config, workdir)
    if result.get("preempted"):
        logging.warning("preempted: checkpoint committed in %s; re-run the same command to resume", workdir)
        sys.exit(EXIT_PREEMPTED)
    logging.info("done: %s", workdir)
