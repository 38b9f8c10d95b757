r"""Fine-tunes an encoder end to end with a linear head on one or more labelled tasks.

    python -m audiojepa.finetune --encoder=/ckpt/m2d/export --task=/data/tasks/esc50 --output=/ckpt/m2d/ft \
        --config=configs/finetune.py --config.epochs=30

The recipe and its keys: configs/finetune.py and audiojepa/evaluation/finetuning.py. Each task is fine-tuned from
the same `--encoder` in OUTPUT/<task>/ (checkpoints/, encoder/ the fine-tuned encoder as an export that
`load_encoder` reads, head.npz). OUTPUT/results.json: {task: {"finetune": {"mean" (test score), "metric",
"valid", "best_epoch", "steps", ...}, "config": {...}, "encoder", "export"}}; OUTPUT/results.md the table.
Re-running the same command resumes unfinished tasks and rewrites the report.
"""

from __future__ import annotations

from audiojepa.runtime import host_memory

if __name__ == "__main__":  # glibc reads GLIBC_TUNABLES only at start-up: re-execute before the heavy imports
    host_memory.reexec_with_hugepage_malloc()

import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "finetune.py")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS, sys_argv: list[str] | None = None) -> None:
    """The command line's flags, defined only when this module is the program (or on a test's own FlagValues,
    with its argv for the --config.* overrides), so that importing it never claims absl's global flags."""
    flags.DEFINE_string("encoder", None, "Exported encoder or training workdir.", flag_values=flag_values)
    flags.DEFINE_multi_string("task", None, "Task folder (labels.csv with train/valid/test), shard set with labels, "
                              "'embedded' or 'tfds:NAME'; repeat for several.", flag_values=flag_values)
    flags.DEFINE_string("output", None, "Output folder: one subfolder per task, results.json, results.md.",
                        flag_values=flag_values)
    config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "Fine-tuning config (configs/finetune.py).",
                                    flag_values=flag_values, lock_config=True, sys_argv=sys_argv)


def run(encoder_spec: str, task_specs: list[str], output_dir: str, config, *, stop_after: int | None = None,
        num_devices: int | None = None) -> dict:
    """Fine-tunes `encoder_spec` on every task and writes the report; returns results.json's dict. The encoder,
    every task and the output folder are checked before any training (errors name the flag)."""
    from audiojepa.adapters import encoder as encoder_lib
    from audiojepa.evaluation import finetuning, tasks

    try:  # (not evaluate.prepare_output_dir: importing the evaluate CLI would define its flags)
        os.makedirs(output_dir, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--output={output_dir} cannot be made a folder: {e.strerror or e}") from None
    try:
        enc = encoder_lib.load_encoder(encoder_spec)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"--encoder={encoder_spec}: {e}") from None
    loaded = []
    for spec in task_specs:
        try:
            task = tasks.load_task(spec, sample_rate=enc.frontend.sample_rate)
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"--task={spec}: {e}") from None
        if task.is_folds:
            raise ValueError(f"--task={spec}: task {task.name!r} has folds; fine-tuning supports fixed "
                             "train/valid/test splits only")
        if any(t.name == task.name for t in loaded):
            raise ValueError(f"--task={spec}: another task is also named {task.name!r}; rename one folder")
        loaded.append(task)
    results = {}
    for task in loaded:
        result, _ = finetuning.finetune_task(enc, task, os.path.join(output_dir, task.name), config,
                                             stop_after=stop_after, num_devices=num_devices, source=encoder_spec)
        results[task.name] = {
            "finetune": {"mean": result["test"], "metric": result["metric"], "valid": result["valid"],
                         "best_epoch": result["best_epoch"], "steps": result["steps"],
                         "total_steps": result["total_steps"], "finished": result["finished"],
                         "history": result["history"], "num_devices": result["num_devices"]},
            "config": finetuning.config_record(config), "encoder": encoder_spec, "export": result["export"],
            "skipped": task.skipped}
    write_report(output_dir, results)
    return results


def _cell(value) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def write_report(output_dir: str, results: dict) -> str:
    """OUTPUT/results.json (strict JSON) and results.md: one row per task; returns the table."""
    from audiojepa.evaluation import report

    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(report.json_safe(results), f, indent=1, allow_nan=False)
    lines = ["| task | encoder | fine-tuned (test) | valid (selection) | best epoch | steps |",
             "|---|---|---:|---:|---:|---:|"]
    for name, r in sorted(results.items()):
        ft = r["finetune"]
        lines.append(f"| {name} | {r['encoder']} | {_cell(ft['mean'])} {ft['metric']} | {_cell(ft['valid'])} | "
                     f"{ft['best_epoch'] if ft['best_epoch'] is not None else '–'} | {ft['steps']}/{ft['total_steps']} |")
    config = next(iter(results.values()))["config"] if results else {}
    lines += ["", "Config: " + ", ".join(f"{k} {v}" for k, v in config.items()) + "."]
    table = "\n".join(lines)
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    return table


def main(argv, flag_values: flags.FlagValues = flags.FLAGS):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    missing = [name for name in ("encoder", "task", "output") if not flag_values[name].value]
    if missing:
        raise app.UsageError(f"--{', --'.join(missing)} required")
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax's chatter
    run(flag_values.encoder, flag_values.task, flag_values.output, flag_values.config)
    with open(os.path.join(flag_values.output, "results.md")) as f:
        print(f.read(), flush=True)
    print(f"report: {os.path.join(flag_values.output, 'results.md')}")


if __name__ == "__main__":
    from audiojepa import config_utils

    define_flags()
    app.run(main, flags_parser=config_utils.parse_flags_naming_config_keys)
