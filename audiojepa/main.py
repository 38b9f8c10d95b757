"""Entry point: `python -m audiojepa.main --config=configs/m2d.py[:arg] --workdir=DIR`.

Kept short on purpose: flags, multi-host start-up, then one call into the trainer.
`--config.key=value` overrides any config field, e.g. `--config.batch_size=512`.

Exit status: 0 when the run is complete (or was already), 143 (128 + SIGTERM, what a killed
process reports) when a preemption signal stopped it after committing a checkpoint: re-running the
same command resumes. Process 0 logs progress; the others log warnings and errors only.
"""

from audiojepa.runtime import host_memory

if __name__ == "__main__":  # glibc reads GLIBC_TUNABLES only at start-up: re-execute before the heavy imports
    host_memory.reexec_with_hugepage_malloc()

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from audiojepa import config_utils  # noqa: E402
from audiojepa.training import process  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/m2d.py:runlocal.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs, or a gs:// URL; a run resumes "
                    "from it.")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    process.setup()
    process.train_and_exit(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main, flags_parser=config_utils.parse_flags_naming_config_keys)
