r"""Expands a config's `get_sweep()` into one training command per setting, and runs or prints them.

    python launch/sweep.py --config=configs/m2d.py:runlocal --workdir_root=/tmp/m2d_sweep --dry_run

Each run gets its own workdir (`workdir_root/<key=value,...>`), so re-running the sweep resumes
every unfinished run. With `--dry_run` the commands are printed; otherwise they run one after another
here. With `--evaluate_task TASK` (repeatable) each finished run is evaluated (`python -m
audiojepa.evaluate`, into `<workdir>/eval`) and one table comparing all runs is written to
`workdir_root/sweep_results.md`:

    python launch/sweep.py --config=configs/jepa.py:runlocal --workdir_root=/tmp/jepa_grid \
        --evaluate_task=embedded

`--launcher` turns each run into a cluster job instead (`--launcher_arg` passes options through):
`slurm` submits one `sbatch launch/slurm_gpu.sbatch` job per run, `tpu` runs each in turn on a TPU VM
through `launch/tpu_pod.py`, `local` through `launch/local.py` (several processes on this machine):

    python launch/sweep.py --config=configs/m2d.py --workdir_root=/shared/ckpt/m2d_sweep \
        --launcher=slurm --launcher_arg=--nodes=2 --config.data.shards=/shared/shards/as2m

Once the jobs have finished, the same sweep with `--evaluate_only` instead of `--launcher` (and with
`--evaluate_task`) trains nothing: it reads each run's `run_summary.json`, lists the runs that are not
finished (and exits 1) or else writes the comparison table. (Without `--evaluate_only`, unfinished runs
would resume here, on the submitting machine.)
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


LAUNCHERS = ("none", "slurm", "tpu", "local")
LAUNCH_DIR = os.path.dirname(os.path.abspath(__file__))


def cluster_command(cmd: list[str], launcher: str, launcher_args: list[str]) -> list[str]:
    """One run's `python -m audiojepa.main ...` command as a job for `launcher`."""
    if launcher == "none":
        return cmd
    main_args = cmd[cmd.index("audiojepa.main") + 1:]
    workdir = next(a.split("=", 1)[1] for a in main_args if a.startswith("--workdir="))
    if launcher == "slurm":
        name = "aj-" + os.path.basename(workdir)
        return ["sbatch", f"--job-name={name}", *launcher_args, os.path.join(LAUNCH_DIR, "slurm_gpu.sbatch"),
                *main_args]
    if launcher == "tpu":
        return [sys.executable, os.path.join(LAUNCH_DIR, "tpu_pod.py"), *launcher_args, "--", *main_args]
    if launcher == "local":
        return [sys.executable, os.path.join(LAUNCH_DIR, "local.py"), *launcher_args, "--", *cmd]
    raise ValueError(f"--launcher={launcher!r}; valid: {LAUNCHERS}")


def unfinished_runs(workdirs: list[str]) -> list[str]:
    """"workdir (why)" for each run whose run_summary.json is missing or says it is not finished."""
    out = []
    for workdir in workdirs:
        path = os.path.join(workdir, "run_summary.json")
        try:
            with open(path) as f:
                summary = json.load(f)
        except FileNotFoundError:
            out.append(f"{workdir} (no run_summary.json: never started?)")
            continue
        if not summary.get("finished"):
            out.append(f"{workdir} (step {summary.get('step')} of {summary.get('total_steps')}"
                       f"{', preempted' if summary.get('preempted') else ''})")
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
    parser.add_argument("--launcher", default="none", choices=LAUNCHERS,
                        help="run here (none), or as SLURM jobs, on a TPU VM, or as local multi-process runs")
    parser.add_argument("--launcher_arg", action="append", default=[],
                        help="an option for the launcher, e.g. --launcher_arg=--nodes=2 (repeatable)")
    parser.add_argument("--evaluate_only", action="store_true",
                        help="train nothing: evaluate the runs if all are finished, else list the unfinished ones")
    args, extra = parser.parse_known_args()
    if args.evaluate_task and args.launcher != "none":
        parser.error("--evaluate_task needs the runs finished: run the sweep again with --evaluate_only instead of "
                     "--launcher when the jobs are done")
    if args.evaluate_only and not args.evaluate_task:
        parser.error("--evaluate_only needs at least one --evaluate_task")
    cmds = commands(args.config, args.workdir_root, extra)
    if args.limit:
        cmds = cmds[:args.limit]
    if args.evaluate_only:
        workdirs = [next(a.split("=", 1)[1] for a in cmd if a.startswith("--workdir=")) for cmd in cmds]
        unfinished = unfinished_runs(workdirs)
        if unfinished:
            print("not finished, so not evaluated (resubmit them, e.g. with --launcher):\n  " + "\n  ".join(unfinished),
                  file=sys.stderr, flush=True)
            sys.exit(1)
        if not args.dry_run:
            print(evaluate_runs(workdirs, args.evaluate_task, args.workdir_root), flush=True)
        return
    for cmd in cmds:
        job = cluster_command(cmd, args.launcher, args.launcher_arg)
        print(shlex.join(job), flush=True)
        if not args.dry_run:
            subprocess.run(job, check=True)
    if args.evaluate_task and not args.dry_run:
        workdirs = [next(a.split("=", 1)[1] for a in cmd if a.startswith("--workdir=")) for cmd in cmds]
        print(evaluate_runs(workdirs, args.evaluate_task, args.workdir_root), flush=True)


if __name__ == "__main__":
    main()
