r"""Runs training on a Cloud TPU VM slice (single host or pod): create or reuse the VM, install, run.

    python launch/tpu_pod.py --tpu=ajepa-v4-32 --zone=us-central2-b --accelerator_type=v4-32 --spot -- \
        --config=configs/m2d.py --workdir=/mnt/shared/m2d_vitb --config.data.shards=/mnt/shared/shards/as2m

Steps, each a `gcloud compute tpus tpu-vm` command (printed before it runs; `--dry_run` only prints):
  1. `describe` the TPU VM; `create` it if it does not exist, or delete and re-create it if a spot VM
     was preempted (state PREEMPTED or TERMINATED).
  2. Pack this checkout (tracked and untracked, non-ignored files) and `scp` it to every worker.
  3. `ssh --worker=all`: unpack into ~/audiojepa and install it with `jax[tpu]` into a Python 3.12
     virtual environment made by uv (TPU VM images ship an older Python than the package needs).
  4. `ssh --worker=all`: run `python -m audiojepa.main <your arguments>` on every worker at once, with
     AUDIOJEPA_DISTRIBUTED=1 so that each calls `jax.distributed.initialize()` (the slice is found
     through the TPU metadata server). `--detach` leaves it running in the background (log in
     ~/audiojepa-run.log on each worker).

Re-running the same command reuses the VM and resumes the run from its workdir, so after a spot
preemption the same line brings the job back. The workdir must be storage every worker sees and that
outlives the VM: a `gs://` bucket (audiojepa/runtime/storage.py; the install step adds the `gcs` extra), a Filestore
NFS share or a Cloud Storage FUSE mount; other URL schemes are refused. `--skip_install` skips steps 2-3 when the code on the VM is current.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHIVE = "/tmp/audiojepa-src.tar.gz"
VENV = "~/audiojepa-venv"
RUN_LOG = "~/audiojepa-run.log"


def _gcloud(verb: str, args) -> list[str]:
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb]
    if verb in ("describe", "create", "delete", "ssh"):
        cmd.append(args.tpu)
    return cmd


def _where(args) -> list[str]:
    return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def describe_command(args) -> list[str]:
    return [*_gcloud("describe", args), *_where(args), "--format=value(state)"]


def create_command(args) -> list[str]:
    cmd = [*_gcloud("create", args), *_where(args), f"--accelerator-type={args.accelerator_type}",
           f"--version={args.runtime_version}"]
    return cmd + (["--spot"] if args.spot else [])


def delete_command(args) -> list[str]:
    return [*_gcloud("delete", args), *_where(args), "--quiet"]


def pack_command() -> list[str]:
    """Tars the checkout's tracked and untracked-but-not-ignored files (run in the repo root)."""
    return ["bash", "-c", "git ls-files -z --cached --others --exclude-standard | "
            f"tar --null -T - -czf {ARCHIVE}"]


def scp_command(args) -> list[str]:
    return [*_gcloud("scp", args), ARCHIVE, f"{args.tpu}:{ARCHIVE}", *_where(args), "--worker=all"]


def ssh_command(args, remote: str) -> list[str]:
    return [*_gcloud("ssh", args), *_where(args), "--worker=all", f"--command={remote}"]


def install_script() -> str:
    return " && ".join([
        "set -e",
        "rm -rf ~/audiojepa && mkdir -p ~/audiojepa",
        f"tar -xzf {ARCHIVE} -C ~/audiojepa",
        "(command -v uv >/dev/null || test -x ~/.local/bin/uv || curl -LsSf https://astral.sh/uv/install.sh | sh)",
        "export PATH=$HOME/.local/bin:$PATH",
        f"(test -x {VENV}/bin/python || uv venv --python 3.12 {VENV})",
        f"uv pip install --python {VENV}/bin/python -U 'jax[tpu]' -e \"$HOME/audiojepa[gcs]\"",  # gs:// workdirs
    ])


def run_script(main_args: list[str], detach: bool) -> str:
    main = f"cd ~/audiojepa && AUDIOJEPA_DISTRIBUTED=1 {VENV}/bin/python -m audiojepa.main {shlex.join(main_args)}"
    if detach:
        return f"setsid nohup bash -c {shlex.quote(main)} > {RUN_LOG} 2>&1 < /dev/null &"
    return main


def plan(args, main_args: list[str]) -> list[tuple[str, list[str]]]:
    """The (when, command) steps after the describe; `when` is "always", "if missing" or "if preempted"."""
    steps = [("if preempted", delete_command(args)), ("if missing or preempted", create_command(args))]
    if not args.skip_install:
        steps += [("always", pack_command()), ("always", scp_command(args)),
                  ("always", ssh_command(args, install_script()))]
    steps.append(("always", ssh_command(args, run_script(main_args, args.detach))))
    return steps


def _run(cmd: list[str], check: bool = True, capture: bool = False) -> subprocess.CompletedProcess:
    print("+", shlex.join(cmd), flush=True)
    return subprocess.run(cmd, cwd=REPO, check=check, text=True, capture_output=capture)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tpu", required=True, help="TPU VM name")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", default="", help="GCP project (default: gcloud's)")
    parser.add_argument("--accelerator_type", default="v4-8", help="e.g. v4-8, v4-32, v5litepod-16, v6e-64")
    parser.add_argument("--runtime_version", default="tpu-ubuntu2204-base", help="TPU VM software version")
    parser.add_argument("--spot", action="store_true", help="create a spot (preemptible) TPU VM")
    parser.add_argument("--skip_install", action="store_true", help="reuse the code already installed on the VM")
    parser.add_argument("--detach", action="store_true", help="leave the run in the background on the workers")
    parser.add_argument("--dry_run", action="store_true", help="print the gcloud commands without running them")
    parser.add_argument("main_args", nargs=argparse.REMAINDER, help="-- then the arguments of audiojepa.main")
    args = parser.parse_args()
    main_args = args.main_args[1:] if args.main_args[:1] == ["--"] else args.main_args
    if not any(a.startswith("--config") for a in main_args) or not any(a.startswith("--workdir") for a in main_args):
        parser.error("give audiojepa.main's arguments after --, at least --config=... and --workdir=...")
    if any(a.startswith("--workdir=") and "://" in a and not a.startswith("--workdir=gs://") for a in main_args):
        parser.error("--workdir must be a gs:// bucket or a path mounted on every worker (NFS or Cloud Storage "
                     "FUSE); other URL schemes are not supported")
    steps = plan(args, main_args)
    if args.dry_run:
        print(shlex.join(describe_command(args)))
        for when, cmd in steps:
            print(("" if when == "always" else f"# {when}:\n") + shlex.join(cmd))
        return
    described = _run(describe_command(args), check=False, capture=True)
    state = described.stdout.strip() if described.returncode == 0 else "MISSING"
    print(f"TPU VM {args.tpu}: {state}", flush=True)
    preempted = state in ("PREEMPTED", "TERMINATED")
    for when, cmd in steps:
        if (when == "always" or (when == "if preempted" and preempted)
                or (when == "if missing or preempted" and (preempted or state == "MISSING"))):
            result = _run(cmd, check=False)
            if result.returncode:
                sys.exit(result.returncode)


if __name__ == "__main__":
    main()
