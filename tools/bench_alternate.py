r"""A/B of bench_train's first row in separate processes, A and B alternated round by round.

    python tools/bench_alternate.py --b_env='{"AUDIOJEPA_HUGEPAGE_MALLOC": "0"}'     # huge-page malloc or not
    python tools/bench_alternate.py --frames=208 --b_flags='--config.model.remat=dots' --process_pairs=4

For what cannot share a process (an environment variable: AUDIOJEPA_HUGEPAGE_MALLOC, XLA_FLAGS,
GLIBC_TUNABLES), and to confirm a tools/bench_pair.py result: two executables in one process allocate
around each other, which can favour one of them (BENCHMARKS.md, session 8). Each round runs
bench_train's worker for A, then for B, each in its own process (compile, --warmup untimed steps,
--steps_b timed ones, its own GEMM peak), so both sides see the same drift of a shared machine at
round granularity. The row flags are bench_train's, as given here (--config with overrides,
--variants (the first one), --frames, --batch_b, --steps_b, ...; in --flag=value form); B adds
--b_flags to them, and its environment is this one with --b_env's variables set (replaced, not
appended to: give XLA_FLAGS whole). Reported: each round's mean step time and MFU of A
and B, B ÷ A, the median ratio and how many rounds B won; --append_to=BENCHMARKS.md appends it.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tools import bench_common, bench_train  # noqa: E402  (bench_train defines the row flags passed on)

flags.DEFINE_string("b_env", "{}", 'JSON dict of environment variables for B, e.g. {"AUDIOJEPA_HUGEPAGE_MALLOC": "0"}.')
flags.DEFINE_string("b_flags", "", "bench_train flags added for B, e.g. '--config.model.remat=dots'.")
flags.DEFINE_integer("process_pairs", 3, "Rounds, each one A process then one B process (bench_pair has --rounds).")
FLAGS = flags.FLAGS

OWN_FLAGS = ("--b_env", "--b_flags", "--process_pairs", "--append_to", "--variants", "--devices")


def worker_args(argv: list[str], variant: str, extra: list[str]) -> list[str]:
    """bench_train worker arguments: `argv` (this tool's, without the program name) minus this tool's own
    flags, one variant on one device, then `extra` (B's flags)."""
    kept = [arg for arg in argv if arg.split("=", 1)[0] not in OWN_FLAGS]
    return [*kept, f"--variants={variant}", "--devices=1", "--_worker", "--_worker_devices=1", *extra]


def side_env(b_env: dict, platform: str, environ=None) -> dict:
    """A worker's environment: bench_train's (devices, huge-page malloc unless opted out), with `b_env`
    applied first so that e.g. AUDIOJEPA_HUGEPAGE_MALLOC=0 is seen by it."""
    return bench_train.worker_env(1, platform, environ={**(os.environ if environ is None else environ), **b_env})


def run_side(args: list[str], env: dict) -> dict:
    """Runs one bench_train worker; returns its first row (raises with its command if it fails)."""
    command = [sys.executable, bench_train.__file__, *args]
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)  # stderr: progress, shown live
    rows = bench_train.worker_rows(result.stdout)
    if result.returncode or not rows or "step_s" not in rows[0]:
        raise RuntimeError(f"bench_train worker failed (exit {result.returncode}, rows {rows}): {shlex.join(command)}")
    return rows[0]


def mfu(row: dict) -> float:
    """Analytic FLOP/s of the row over its own 1-device GEMM peak."""
    return row["flops"] / row["step_s"] / (row["gemm_1dev_gflops"] * 1e9)


def alternate(run_a, run_b, rounds: int) -> dict:
    """`rounds` rounds of run_a() then run_b() (each returns a bench_train row); the per-round rows and
    ratios of B's mean step time to A's."""
    a_rows, b_rows = [], []
    for r in range(rounds):
        a_rows.append(run_a())
        b_rows.append(run_b())
        print(f"round {r + 1}/{rounds}: A {a_rows[-1]['step_s']:.3f} s, B {b_rows[-1]['step_s']:.3f} s",
              file=sys.stderr, flush=True)
    return {"a": a_rows, "b": b_rows,
            **bench_common.ab_ratios([a["step_s"] for a in a_rows], [b["step_s"] for b in b_rows])}


def report(result: dict, b_env: dict, b_flags: str, config_arg: str = "") -> str:
    first = result["a"][0]
    b_desc = ", ".join([*(f"{k}={v}" for k, v in b_env.items()), *shlex.split(b_flags)]) or "same as A"
    title = (f"Alternated processes, {config_arg or 'config'} {first['variant']}, batch {first['batch']}, "
             f"{first['frames']} frames: B = {b_desc}")
    lines = [
        *bench_common.section_head(title, f"{bench_common.cpus()}; backend {first['backend']}; 1 device"),
        f"- A: {first['options']}; {first.get('host_memory', '?')}. B: {result['b'][0]['options']}; "
        f"{result['b'][0].get('host_memory', '?')}.",
        f"- Each side: its own process per round, {first['steps']} timed steps (mean) after the warm-up; MFU "
        "against that process's own GEMM peak.",
        f"- {bench_common.ab_summary(result, 'rounds')}",
        "",
        "| round | A step s | A MFU | B step s | B MFU | B ÷ A |",
        "|---:|---:|---:|---:|---:|---:|",
        *(f"| {i + 1} | {a['step_s']:.3f} | {mfu(a):.1%} | {b['step_s']:.3f} | {mfu(b):.1%} | {ratio:.3f} |"
          for i, (a, b, ratio) in enumerate(zip(result["a"], result["b"], result["ratios"]))),
        "",
    ]
    return "\n".join(lines)


def main(argv):
    del argv
    b_env = {str(k): str(v) for k, v in bench_common.json_dict_flag("b_env").items()}
    if any(" " in arg.split("=", 1)[0] or not arg.startswith("--") for arg in sys.argv[1:]):
        raise app.UsageError("give every flag as --flag=value (they are passed on to bench_train's workers)")
    variant, _ = bench_train.first_row_config()
    args_a = worker_args(sys.argv[1:], variant, [])
    args_b = worker_args(sys.argv[1:], variant, shlex.split(FLAGS.b_flags))
    env_a, env_b = side_env({}, FLAGS.platform), side_env(b_env, FLAGS.platform)
    result = alternate(lambda: run_side(args_a, env_a), lambda: run_side(args_b, env_b), FLAGS.process_pairs)
    config_arg = config_flags.get_config_filename(FLAGS["config"])
    if os.path.isabs(config_arg) and config_arg.startswith(bench_train.ROOT + os.sep):  # the default config
        config_arg = os.path.relpath(config_arg, bench_train.ROOT)
    text = report(result, b_env, FLAGS.b_flags, config_arg)
    print(text)
    bench_common.append_markdown(FLAGS.append_to, text)


if __name__ == "__main__":
    FLAGS.set_default("append_to", "")
    app.run(main)
