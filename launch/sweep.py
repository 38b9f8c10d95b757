r"""Expands a config's `get_sweep()` into one training command per setting, and runs or prints them.

    python launch/sweep.py --config=configs/m2d.py:runlocal --workdir_root=/tmp/m2d_sweep --dry_run

Each run gets its own workdir (`workdir_root/<key=value,...>`), so re-running the sweep resumes
every unfinished run. With `--dry_run` the commands are printed, e.g. to paste into a cluster
launcher; otherwise they run one after another here. With `--evaluate_task TASK` (repeatable) each
finished run is evaluated (`python -m audiojepa.evaluate`, into `<workdir>/eval`) and one table
comparing all runs is written to `workdir_root/sweep_results.md`:

    python launch/sweep.py --config=configs/jepa.py:runlocal --workdir_root=/tmp/jepa_grid \
        --evaluate_task=embedded
"""

import argparse
import json
import os
import shlex
import subprocess
import sys

from audiojepa.config_utils import load_config_module


def load_sweep(config_arg: str) -> list[dict]:
    path, _, arg = config_arg.partition(":")
    module = load_config_module(path)
    if not hasattr(module, "get_sweep"):
        raise SystemExit(f"{path} defines no get_sweep(arg)")
    return module.get_sweep(arg or None)


def commands(config_arg: str, workdir_root: str, extra: list[str]) -> list[list[str]]:
    out = []
    for overrides in load_sweep(config_arg):
        name = ",".join(f"{k}={v}" for k, v in overrides.items())
        flags = [f"--config.{k}={v}" for k, v in overrides.items()]
        out.append([sys.executable, "-m", "audiojepa.main", f"--config={config_arg}",
                    f"--workdir={workdir_root}/{name}", *flags, *extra])
    return out


def evaluate_runs(workdirs: list[str], tasks: list[str], workdir_root: str) -> str:
    """Evaluates each run's latest checkpoint on `tasks`; writes and returns a markdown comparison."""
    lines = ["| run | task | linear probe | kNN |", "|---|---|---:|---:|"]
    for workdir in workdirs:
        out = os.path.join(workdir, "eval")
        cmd = [sys.executable, "-m", "audiojepa.evaluate", f"--encoder={workdir}", f"--output={out}",
               "--nobaselines", *(f"--task={t}" for t in tasks)]
        print(shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True)
        with open(os.path.join(out, "results.json")) as f:
            for task, r in json.load(f).items():
                lines.append(f"| {os.path.basename(workdir)} | {task} | {100 * r['linear']['mean']:.1f} ± "
                             f"{100 * r['linear']['ci95']:.1f} | {100 * r['knn']['mean']:.1f} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(workdir_root, "sweep_results.md"), "w") as f:
        f.write(table)
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir_root", required=True)
    parser.add_argument("--dry_run", action="store_true")
    parser.add_argument("--evaluate_task", action="append", default=[],
                        help="evaluate every finished run on this task (repeatable)")
    parser.add_argument("--limit", type=int, default=0, help="run only the first N settings")
    args, extra = parser.parse_known_args()
    cmds = commands(args.config, args.workdir_root, extra)
    if args.limit:
        cmds = cmds[:args.limit]
    for cmd in cmds:
        print(shlex.join(cmd), flush=True)
        if not args.dry_run:
            subprocess.run(cmd, check=True)
    if args.evaluate_task and not args.dry_run:
        workdirs = [next(a.split("=", 1)[1] for a in cmd if a.startswith("--workdir=")) for cmd in cmds]
        print(evaluate_runs(workdirs, args.evaluate_task, args.workdir_root), flush=True)


if __name__ == "__main__":
    main()
