r"""Paired A/B of one training step: the config as given (A) against the same config with overrides or XLA
compiler options (B), both compiled in one process on one device, their steps alternated.

    python tools/bench_pair.py --b_overrides='{"model.remat": "dots"}'          # M2D ViT-B, 80x608
    python tools/bench_pair.py --frames=208 --b_overrides='{"model.remat": "dots"}' --rounds=8
    python tools/bench_pair.py --b_compiler_options='{"xla_cpu_enable_concurrency_optimized_scheduler": true}'

Why paired: on a shared machine the speed drifts by more than most effects worth testing (here the
same 2048³ GEMM measured 163-202 GFLOP/s within 10 minutes). Alternating A and B step by step puts both
under the same drift, so the ratio of each pair (B ÷ A) is steadier than either time. It reports every
pair, the median ratio and how many pairs B won; a process-wide setting (an environment variable, the
allocator) cannot be paired this way. Sharing the process is not neutral either: A and B allocate
around each other, so confirm a win in separate processes with tools/bench_alternate.py (remat=dots
paired 0.871 at 80x608, 6 of 6, yet ran level with remat none in alternated processes; A against A
paired 1.000).

The row is the one tools/bench_train.py times (same flags: --config with overrides, --variants (the
first one; default the config's largest size), --frames, --batch_b / --batch_tiny, --mask_ratio). B's
overrides must leave the train state's shapes as they are (e.g. remat, attention_impl, scan_layers=False
do; a different model size does not). --append_to=BENCHMARKS.md appends the result.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from audiojepa.runtime import host_memory  # noqa: E402

if __name__ == "__main__":  # as `python -m audiojepa.main` runs: huge pages for large allocations
    host_memory.reexec_with_hugepage_malloc()

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from audiojepa.runtime import sharding  # noqa: E402
from tools import bench_common, bench_train  # noqa: E402  (bench_train defines the row flags used here)

flags.DEFINE_string("b_overrides", "{}", 'JSON dict of dotted config keys for B, e.g. {"model.remat": "dots"}.')
flags.DEFINE_string("b_compiler_options", "{}", "JSON dict of XLA compiler options for B's compile.")
flags.DEFINE_integer("rounds", 5, "Timed A,B pairs, after one untimed round.")
FLAGS = flags.FLAGS


def compare(config_a, config_b, compiler_options: dict, rounds: int) -> dict:
    """Compiles A and B (same state and batch) and times `rounds` alternated pairs after one untimed round.
    B is checked and compiled first, so a B that cannot run fails before A's compile."""
    mesh = sharding.make_mesh(1)
    with jax.set_mesh(mesh):  # see train.train_and_evaluate
        (step_a, init_a, method, spec), (step_b, init_b, _, _) = (bench_train.build_step(c, mesh=mesh)
                                                                  for c in (config_a, config_b))
        shapes_a, shapes_b = (jax.eval_shape(init, jax.random.key(0)) for init in (init_a, init_b))
        if (jax.tree.structure(shapes_a) != jax.tree.structure(shapes_b)
                or jax.tree.leaves(shapes_a) != jax.tree.leaves(shapes_b)):
            raise app.UsageError("--b_overrides change the train state's structure: A and B cannot share a state")
        state = jax.jit(init_a, out_shardings=sharding.replicated(mesh))(jax.random.key(0))
        batch = bench_train.random_batch(method, spec, int(config_a.batch_size), mesh)
        variant = bench_train.timed_mask_variant(method)
        try:
            compiled_b = step_b.lower(state, batch, jax.random.key(1), variant).compile(compiler_options or None)
        except jax.errors.JaxRuntimeError as e:
            if not compiler_options:
                raise
            raise app.UsageError(f"--b_compiler_options={json.dumps(compiler_options)}: XLA refused them: {e}") from e
        compiled = [step_a.lower(state, batch, jax.random.key(1), variant).compile(), compiled_b]
        times = ([], [])
        for r in range(rounds + 1):
            for i, step in enumerate(compiled):
                start = time.perf_counter()
                state, out = step(state, batch, jax.random.key(1))
                jax.block_until_ready(out)
                if r:
                    times[i].append(time.perf_counter() - start)
        return {"a": times[0], "b": times[1], **bench_common.ab_ratios(*times)}


def report(result: dict, variant: str, config, b_overrides: dict, compiler_options: dict) -> str:
    b_desc = ", ".join([f"--config.{k}={v}" for k, v in b_overrides.items()]
                       + [f"compiler option {k}={v}" for k, v in compiler_options.items()])
    title = (f"Paired A/B, {config.method} {variant}, batch {config.batch_size}, {config.data.crop_frames} frames: "
             f"B = {b_desc or 'same as A'}")
    lines = [
        *bench_common.section_head(
            title, f"{bench_common.cpus()}; jax {jax.__version__}; 1 device; {host_memory.describe()}"),
        f"- {bench_common.ab_summary(result, 'alternated pairs')}",
        "",
        "| pair | A s | B s | B ÷ A |",
        "|---:|---:|---:|---:|",
        *(f"| {i + 1} | {a:.4f} | {b:.4f} | {r:.3f} |"
          for i, (a, b, r) in enumerate(zip(result["a"], result["b"], result["ratios"]))),
        "",
    ]
    return "\n".join(lines)


def main(argv):
    del argv
    b_overrides = bench_common.json_dict_flag("b_overrides")
    compiler_options = bench_common.json_dict_flag("b_compiler_options")
    variant, config_a = bench_train.first_row_config()
    config_arg = config_flags.get_config_filename(FLAGS["config"])
    overrides = {**config_flags.get_override_values(FLAGS["config"]), **b_overrides}
    config_b = bench_train.row_config(config_arg, variant, overrides=overrides, frames=FLAGS.frames,
                                      batch_size=int(config_a.batch_size), mask_ratio=FLAGS.mask_ratio)
    result = compare(config_a, config_b, compiler_options, FLAGS.rounds)
    text = report(result, variant, config_a, b_overrides, compiler_options)
    print(text)
    bench_common.append_markdown(FLAGS.append_to, text)


if __name__ == "__main__":
    FLAGS.set_default("append_to", "")
    app.run(main)
