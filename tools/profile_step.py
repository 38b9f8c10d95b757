r"""Where one training step spends its time on XLA:CPU: a `jax.profiler` trace of one step, op time summed
per kind of XLA op, and every matmul's achieved GFLOP/s against a float32 GEMM peak measured in the same run.

    python tools/profile_step.py                                  # M2D ViT-B, batch 8, 80x608
    python tools/profile_step.py --frames=208
    python tools/profile_step.py --config=configs/matpac.py --variants=tiny
    python tools/profile_step.py --append_to=BENCHMARKS.md        # also append the tables there

The row is the one tools/bench_train.py times (same flags: --config with overrides, --variants (the
first one; default the config's largest size, M2D's B), --frames, --batch_b / --batch_tiny,
--mask_ratio, --warmup), on one CPU device. The step is run --warmup times, then once under the profiler
with XLA:CPU's per-op trace events (`--xla_cpu_enable_xprof_traceme=true`, added to XLA_FLAGS before JAX
starts its backend).

Tables:
- "Op kinds": trace time per kind of op (an XLA instruction name without its numeric suffix, e.g.
  `ynn_fusion` (YNNPACK: dots, and whatever XLA fused into them), `copy_bitcast_fusion`,
  `bitcast_dynamic-update-slice_fusion` (writes into a scan's stacked outputs)), summed over every
  time it ran (a scan body runs once per layer), with its share of all op time.
- "Matmuls": each instruction that contains a dot, grouped by the model op that made it (the end of
  its JAX op name) and its output shape: time, calls, GFLOP (2 x output size x contraction size per
  call, from the compiled HLO) and GFLOP/s, as a fraction of the GEMM peak. A dot that XLA fused with
  what follows it is named after the fusion's last op (e.g. attention logits fused with the softmax show
  as `attn/vmap()/reduce_sum`).
- "Other ops": the instructions without dots, grouped by kind, output type and model op, by time, with
  their output bytes per second (what they write; reads come on top), to tell memory-bound copies and
  scan buffers from real work.
The dot GFLOP it finds are printed next to the analytic count of audiojepa/training/flops.py as a check.
Op times overlap when XLA runs independent ops concurrently, so shares are of summed op time, not of the
step's wall time (both are printed).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

TRACEME_FLAG = "--xla_cpu_enable_xprof_traceme=true"
if __name__ == "__main__" and TRACEME_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TRACEME_FLAG).strip()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from audiojepa.runtime import host_memory  # noqa: E402

if __name__ == "__main__":  # as `python -m audiojepa.main` runs: huge pages for large allocations
    host_memory.reexec_with_hugepage_malloc()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from audiojepa.runtime import sharding  # noqa: E402
from tools import bench_common, bench_train  # noqa: E402  (bench_train defines the row flags used here)

flags.DEFINE_integer("top", 25, "Rows of each table.")
FLAGS = flags.FLAGS

IMPLAUSIBLE = 1.5  # a matmul rate above this many GEMM peaks cannot be what its trace events say
_SUFFIX = re.compile(r"\.\d+$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\S+) (\w[\w\-]*)\((.*)$")
_SHAPE = re.compile(r"^[a-z]\w*\[([\d,]*)\]")


def _dims(text: str) -> list[int]:
    return [int(d) for d in text.split(",") if d]


def _shape_of(type_text: str) -> list[int] | None:
    m = _SHAPE.match(type_text)
    return _dims(m.group(1)) if m else None


def hlo_dot_flops(hlo_text: str) -> dict[str, tuple[int, str, str]]:
    """Instruction name -> (dot FLOPs per call, output type, JAX op name) for every instruction of the
    compiled HLO text that is a dot or a fusion containing dots (2 x output size x contraction size each)."""
    computations: dict[str, dict[str, str]] = {}  # computation -> instruction -> its type text
    bodies: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$", line)
        if header:
            current = header.group(1)
            computations[current], bodies[current] = {}, []
            continue
        m = _INSTRUCTION.match(line)
        if m and current is not None:
            computations[current][m.group(1)] = m.group(2)
            bodies[current].append(line)

    def dots_in(lines: list[str], types: dict[str, str]) -> int:
        total = 0
        for line in lines:
            m = _INSTRUCTION.match(line)
            if not m or m.group(3) != "dot":
                continue
            out = _shape_of(m.group(2))
            lhs_name = m.group(4).split(",")[0].strip().lstrip("%")
            lhs = _shape_of(types.get(lhs_name, ""))
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
            if out is None or lhs is None or contracting is None:
                continue
            k = 1
            for d in _dims(contracting.group(1)):
                k *= lhs[d]
            n = 1
            for d in out:
                n *= d
            total += 2 * n * k
        return total

    fused = set(re.findall(r"fusion\(.*?calls=%([\w.\-]+)", hlo_text))  # counted through their fusion
    result = {}
    for name, lines in bodies.items():
        if name in fused:
            continue
        types = computations[name]
        for line in lines:
            m = _INSTRUCTION.match(line)
            if m.group(3) == "dot":
                flops = dots_in([line], types)
            elif m.group(3) == "fusion":
                called = re.search(r"calls=%([\w.\-]+)", line)
                callee = called.group(1) if called else ""
                flops = dots_in(bodies.get(callee, []), computations.get(callee, {}))
            else:
                continue
            if flops:
                op_name = re.search(r'op_name="([^"]*)"', line)
                result[m.group(1)] = (flops, m.group(2), op_name.group(1) if op_name else "")
    return result


def op_times(trace_path: str) -> tuple[dict[str, float], dict[str, int]]:
    """Summed duration (s) and count of each XLA op in a perfetto trace (wrapper events left out)."""
    with gzip.open(trace_path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    seconds, calls = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or "dur" not in e or name.startswith(("Thunk", "$", "end: ")) or " " in name:
            continue
        seconds[name] += e["dur"] / 1e6
        calls[name] += 1
    return dict(seconds), dict(calls)


def profile(config, *, warmup: int) -> dict:
    """Traces one step of `config` on one device; returns the step time, op times, dot FLOPs and GEMM peak."""
    mesh = sharding.make_mesh(1)
    with jax.set_mesh(mesh):  # see train.train_and_evaluate
        step, init_state, method, spec = bench_train.build_step(config, mesh=mesh)
        state = jax.jit(init_state, out_shardings=sharding.replicated(mesh))(jax.random.key(0))
        batch = bench_train.random_batch(method, spec, int(config.batch_size), mesh)
        rng, variant = jax.random.key(1), bench_train.timed_mask_variant(method)
        hlo = step.lower(state, batch, rng, variant).compile().as_text()
        for _ in range(max(warmup, 1)):
            state, out = step(state, batch, rng, variant)
            jax.block_until_ready(out)
        with tempfile.TemporaryDirectory() as trace_dir:
            jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
            start = time.perf_counter()
            state, out = step(state, batch, rng, variant)
            jax.block_until_ready(out)
            step_s = time.perf_counter() - start
            jax.profiler.stop_trace()
            traces = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
            if not traces:
                raise RuntimeError(f"jax.profiler wrote no perfetto trace under {trace_dir}")
            seconds, calls = op_times(traces[0])
        return {"step_s": step_s, "seconds": seconds, "calls": calls, "dots": hlo_dot_flops(hlo),
                "instructions": hlo_instructions(hlo),
                "analytic_flops": bench_train.analytic_flops(method, int(config.batch_size))["total"],
                "peak_gflops": bench_train.gemm_peaks(mesh)[0]}


def hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
    """Instruction name -> (output type, JAX op name) for every instruction of the compiled HLO text
    outside fused computations (the ones with their own trace events)."""
    fused = set(re.findall(r"fusion\(.*?calls=%([\w.\-]+)", hlo_text))
    result, current = {}, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{\s*$", line)
        if header:
            current = header.group(1)
            continue
        m = _INSTRUCTION.match(line)
        if m and current not in fused:
            op_name = re.search(r'op_name="([^"]*)"', line)
            result[m.group(1)] = (m.group(2), op_name.group(1) if op_name else "")
    return result


def _type_bytes(type_text: str) -> int:
    """Bytes of an HLO array type ('f32[8,58,768]{2,1,0}'); tuples count all their elements."""
    width = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}
    return sum(width.get(dtype, 4) * int(np.prod(_dims(dims)) if dims else 1)
               for dtype, dims in re.findall(r"([a-z]\w*)\[([\d,]*)\]", type_text))


def other_ops_table(result: dict) -> list[dict]:
    """The instructions without dots, grouped by (op kind, output type, model op), by time; with the
    output bytes written per second (a lower bound on the memory traffic)."""
    groups: dict[tuple[str, str, str], dict] = {}
    for name, s in result["seconds"].items():
        if name in result["dots"] or name not in result["instructions"]:
            continue
        out_type, op_name = result["instructions"][name]
        key = (_SUFFIX.sub("", name), out_type.split("{")[0], "/".join(op_name.split("/")[-3:]))
        g = groups.setdefault(key, {"kind": key[0], "shape": key[1], "op": key[2], "seconds": 0.0, "calls": 0,
                                    "bytes": 0})
        g["seconds"] += s
        g["calls"] += result["calls"][name]
        g["bytes"] += _type_bytes(out_type) * result["calls"][name]
    return sorted(groups.values(), key=lambda g: -g["seconds"])


def kind_table(seconds: dict[str, float], calls: dict[str, int], top: int) -> tuple[list[tuple], float]:
    """[(kind, seconds, calls)] by time, and the total op time."""
    by_kind, count = collections.Counter(), collections.Counter()
    for name, s in seconds.items():
        kind = _SUFFIX.sub("", name)
        by_kind[kind] += s
        count[kind] += calls[name]
    return [(k, s, count[k]) for k, s in by_kind.most_common(top)], sum(by_kind.values())


def matmul_table(result: dict) -> list[dict]:
    """One row per (model op, output type) over the traced instructions that contain dots, by time."""
    groups: dict[tuple[str, str], dict] = {}
    for name, (flops, out_type, op_name) in result["dots"].items():
        if name not in result["seconds"]:
            continue
        key = ("/".join(op_name.split("/")[-3:]), out_type.split("{")[0])
        g = groups.setdefault(key, {"op": key[0], "shape": key[1], "seconds": 0.0, "calls": 0, "flops": 0})
        g["seconds"] += result["seconds"][name]
        g["calls"] += result["calls"][name]
        g["flops"] += flops * result["calls"][name]
    return sorted(groups.values(), key=lambda g: -g["seconds"])


def report(result: dict, config, variant: str, top: int) -> str:
    kinds, total = kind_table(result["seconds"], result["calls"], top)
    matmuls = matmul_table(result)
    dot_s = sum(g["seconds"] for g in matmuls)
    dot_flops = sum(g["flops"] for g in matmuls)
    peak = result["peak_gflops"]
    machine = (f"{bench_common.cpus()}; jax {jax.__version__}; float32 GEMM peak {peak:.1f} GFLOP/s (measured in "
               f"this run); {host_memory.describe()}")
    lines = [
        *bench_common.section_head(f"Where the {config.method} step's time goes on XLA:CPU ({variant}, batch "
                                   f"{config.batch_size}, {config.data.crop_frames} frames)", machine),
        f"- Traced step: {result['step_s']:.3f} s wall (the profiler adds a little); summed op time {total:.3f} s.",
        f"- Instructions with dots: {dot_s:.3f} s, {dot_flops / 1e9:.1f} GFLOP found in the HLO (analytic count "
        f"{result['analytic_flops'] / 1e9:.1f}), {dot_flops / max(dot_s, 1e-9) / 1e9:.1f} GFLOP/s = "
        f"{dot_flops / max(dot_s, 1e-9) / 1e9 / peak:.0%} of the peak. Their time includes what XLA fused into them.",
        "",
        "| op kind | s | share of op time | calls |",
        "|---|---:|---:|---:|",
        *(f"| {k} | {s:.3f} | {s / total:.1%} | {c} |" for k, s, c in kinds),
        "",
        "| matmul (JAX op) | output | s | calls | GFLOP | GFLOP/s | of peak |",
        "|---|---|---:|---:|---:|---:|---:|",
        *(f"| {g['op']} | {g['shape']} | {g['seconds']:.3f} | {g['calls']} | {g['flops'] / 1e9:.1f} | "
          f"{g['flops'] / g['seconds'] / 1e9:.1f} | {g['flops'] / g['seconds'] / 1e9 / peak:.0%}"
          f"{' †' if g['flops'] / g['seconds'] / 1e9 > IMPLAUSIBLE * peak else ''} |"
          for g in matmuls[:top]),
        "",
    ]
    others = other_ops_table(result)
    lines += [
        "| other op (kind) | output | JAX op | s | calls | output GB/s |",
        "|---|---|---|---:|---:|---:|",
        *(f"| {g['kind']} | {g['shape']} | {g['op'] or '-'} | {g['seconds']:.3f} | {g['calls']} | "
          f"{g['bytes'] / max(g['seconds'], 1e-9) / 1e9:.1f} |" for g in others[:top]),
        "",
    ]
    if any(g["flops"] / g["seconds"] / 1e9 > IMPLAUSIBLE * peak for g in matmuls[:top]):
        lines += [f"† Above {IMPLAUSIBLE:g}x the GEMM peak: the op's trace events cannot cover all of its dot's work "
                  "(seen for weight gradients XLA fused with a transpose); the rest runs on under the next ops' "
                  "events, which then look slow. Totals are not affected.", ""]
    return "\n".join(lines)


def main(argv):
    del argv
    if TRACEME_FLAG not in os.environ.get("XLA_FLAGS", ""):
        raise app.UsageError(f"XLA_FLAGS must contain {TRACEME_FLAG} before JAX starts (run this file as a script)")
    variant, config = bench_train.first_row_config()
    result = profile(config, warmup=FLAGS.warmup)
    text = report(result, config, variant, FLAGS.top)
    print(text)
    bench_common.append_markdown(FLAGS.append_to, text)


if __name__ == "__main__":
    FLAGS.set_default("append_to", "")
    app.run(main)
