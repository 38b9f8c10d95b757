"""Process set-up and exit shared by the entry points (audiojepa.main, audiojepa.selftrain)."""

import logging
import sys

import jax

from audiojepa.runtime import distributed, host_memory
from audiojepa.training import train

EXIT_PREEMPTED = 143  # 128 + SIGTERM: what a killed process reports; re-running resumes


def setup() -> None:
    """Logging and multi-host start-up shared by the entry points (this one and audiojepa.selftrain)."""
    # Orbax and Grain log every checkpoint step at INFO through absl's logger; keep their warnings only,
    # so the trainer's progress lines stay readable.
    logging.getLogger("absl").setLevel(logging.WARNING)
    distributed.maybe_initialize()
    if jax.process_index() > 0:  # one copy of the progress lines, from process 0
        logging.getLogger().setLevel(logging.WARNING)
    logging.info("host memory: %s", host_memory.describe())


def train_and_exit(config, workdir: str) -> None:
    """Trains; exits with EXIT_PREEMPTED when a preemption signal stopped the run after its checkpoint."""
    result = train.train_and_evaluate(config, workdir)
    if result.get("preempted"):
        logging.warning("preempted: checkpoint committed in %s; re-run the same command to resume", workdir)
        sys.exit(EXIT_PREEMPTED)
    logging.info("done: %s", workdir)
