r"""Expands a config's `get_sweep()` into one training command per setting, and runs or prints them.

    python launch/sweep.py --config=configs/m2d.py:runlocal --workdir_root=/tmp/m2d_sweep --dry_run

Each run gets its own workdir (`workdir_root/<key=value,...>`), so re-running the sweep resumes
every unfinished run. With `--dry_run` the commands are printed, e.g. to paste into a cluster
launcher (see launch/slurm_gpu.sbatch); otherwise they run one after another here.
"""

import argparse
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


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir_root", required=True)
    parser.add_argument("--dry_run", action="store_true")
    args, extra = parser.parse_known_args()
    for cmd in commands(args.config, args.workdir_root, extra):
        print(shlex.join(cmd), flush=True)
        if not args.dry_run:
            subprocess.run(cmd, check=True)


if __name__ == "__main__":
    main()
