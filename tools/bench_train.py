r"""M2D training-step throughput on simulated CPU devices: compile time, step time, clips/s, FLOP/s, MFU.

    python tools/bench_train.py                   # tiny and B, on 1 and 8 devices, 80x608 input
    python tools/bench_train.py --variants=tiny --devices=1,2,4,8 --frames=208

Each device count runs in its own subprocess of this script (`--_worker`, with JAX_NUM_CPU_DEVICES
set before JAX starts) on `sharding.make_mesh(n)`. The step is `train.make_train_step` jitted as the
trainer jits it (state donated, outputs replicated), fed one batch of random normalised log-mels
[batch, n_mels, frames] that already sits on the devices, split over the `data` axis: this measures
compute, not the input pipeline. Per row: trace + compile time, the mean of --steps timed steps after
--warmup untimed ones (each waited for with block_until_ready), clips/s, FLOP/s and MFU.

Analytic FLOPs per step (matmuls only, 2·m·n·k each). One transformer block on N tokens of width D
with MLP hidden width H costs, forward,

    block(N, D, H) = 3·(2·N·D²)       qkv
                   + 2·N²·D + 2·N²·D  attention scores and attention·V (all heads together)
                   + 2·N·D²           output projection
                   + 2·(2·N·D·H)      MLP fc1 and fc2

With L patches, K = int(L·(1 - mask_ratio)) of them visible, encoder width D, depth d and MLP H,
predictor width P, depth p and MLP 4·P, per example:

    patch_embed   = 2·L·(patch_f·patch_t)·D                     (a 16x16 patch is 256 inputs)
    online        = d·block(1 + K, D, H)                        (online encoder: CLS + visible)
    predictor     = 2·(1 + K)·D·P + p·block(1 + L, P, 4P) + 2·(L - K)·P·D
                    (in-projection of the context, stack over CLS + the whole grid, out-projection
                    of the L - K predicted positions)
    target        = d·block(1 + L - K, D, H)                    (EMA target encoder: CLS + masked)
    step          = batch · (3·(patch_embed + online + predictor) + target)

The target encoder runs under stop_gradient, so it has a forward only; everything else has a backward
counted as twice its forward (input and weight gradients). That slightly overcounts the patch
embedding, whose input (the log-mel) needs no gradient: 2·L·256·D per example, about 0.1% of a B
step. For ViT-B on 80x608 (L = 190, K = 57) the step costs about 85 GFLOP per clip, 28% of it in the
target encoder.

LayerNorm, softmax, GELU, the loss and the AdamW update are not counted (MaxText's MFU convention);
XLA's own count (`cost_analysis()["flops"]`, shown as a cross-check) includes them, so it reads a few
percent higher (tests/test_bench_train.py checks that the two agree within 15%). On n devices XLA
analyses one device's program and the table shows n × that, so work that every device repeats (the
AdamW update of the replicated params) is counted n times there.

Peaks: each worker times a jitted --gemm_size³ float32 matmul (best of --gemm_repeats) on one device
("1-device GEMM"), and, with several devices, the same matmul on every device at once, sharded over
the mesh ("all-device GEMM", the most this process gets from the machine). MFU is reported both ways:
against n × the 1-device peak, the usual definition on real accelerators, and against the all-device
peak. Simulated CPU devices share the machine's cores, so the first understates the use of the
machine n-fold when one device alone can keep all cores busy; the second is the honest number here.

Memory: every simulated device holds its own replica of the train state in host RAM (ViT-B: params,
EMA target and AdamW moments are ~1.7 GB, ~2.4 GB with a gradient and an update), so ViT-B on 8
simulated devices needs ~20 GB. A row whose estimate exceeds --max_memory_fraction of MemAvailable is
reported as skipped rather than run into the OOM killer.

The table is printed and appended to --append_to with the command, date, machine and versions.
Compile times are real compiles unless JAX_COMPILATION_CACHE_DIR points at a warm cache.
"""

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

# `configs/` is not part of the installed package: make the repository root importable when this
# file is run as a script (sys.path[0] is then tools/).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from audiojepa import frontend, optim, sharding, train  # noqa: E402
from tools import bench_common  # noqa: E402
from audiojepa.data import pipeline  # noqa: E402
from audiojepa.methods.m2d import M2D  # noqa: E402
from audiojepa.models import decode_variant  # noqa: E402
from configs import m2d as m2d_config  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("variants", ["tiny", "B"],
                  "Encoder variants (keys of audiojepa.models.VARIANTS). 'tiny' gets the runlocal predictor "
                  "(64 wide, depth 2, 4 heads); the others the paper's (512 wide, depth 8, 16 heads).")
flags.DEFINE_list("devices", ["1", "8"], "Simulated CPU device counts, one subprocess each.")
flags.DEFINE_integer("frames", 608, "Input frames (80 mels; a multiple of 16). The paper uses 608.")
flags.DEFINE_float("mask_ratio", 0.7, "M2D mask ratio.")
flags.DEFINE_integer("batch_tiny", 64, "Global batch for 'tiny' (divisible by every device count).")
flags.DEFINE_integer("batch_b", 8, "Global batch for the other variants (divisible by every device count).")
flags.DEFINE_integer("steps", 5, "Timed steps per row.")
flags.DEFINE_integer("steps_b", 3, "Timed steps for the non-tiny variants (0: same as --steps).")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling, before timing.")
flags.DEFINE_integer("gemm_size", 2048, "Side of the square float32 matmul that measures the peak.")
flags.DEFINE_integer("gemm_repeats", 5, "Timed matmuls; the best is reported.")
flags.DEFINE_float("max_memory_fraction", 0.7,
                   "Skip a row whose estimated host memory (n devices × replicated train state, gradients and "
                   "updates) exceeds this fraction of MemAvailable: simulated devices each hold a full copy.")
flags.DEFINE_string("append_to", "BENCHMARKS.md", "Markdown file the table is appended to ('' to skip).")
flags.DEFINE_bool("_worker", False, "Internal: measure in this process and print one JSON line per row.")

RESULT_PREFIX = "BENCH_TRAIN_ROW "  # marks the worker's result lines on its stdout


# -- analytic FLOPs ------------------------------------------------------------------------------------


def block_flops(tokens: int, width: int, mlp_dim: int) -> int:
    """Forward matmul FLOPs of one pre-LN transformer block on one example of `tokens` tokens."""
    n, d, h = tokens, width, mlp_dim
    qkv = 3 * (2 * n * d * d)
    attention = 2 * n * n * d + 2 * n * n * d  # scores q·kᵀ, then weights·v, summed over heads
    proj = 2 * n * d * d
    mlp = 2 * (2 * n * d * h)
    return qkv + attention + proj + mlp


def m2d_step_flops(method, batch_size: int) -> dict[str, int]:
    """Analytic matmul FLOPs of one M2D train step (formula in the module docstring).

    Args:
        method: an `audiojepa.methods.m2d.M2D` (its config, patch grid and number of visible patches).
        batch_size: global batch.

    Returns:
        Per-step FLOPs: forward of each part ("patch_embed", "online_encoder", "predictor",
        "target_encoder"), "forward" (their sum), "backward" and "total".
    """
    size = decode_variant(method.config.variant)
    width, depth, mlp_dim = size["width"], size["depth"], size["mlp_dim"]
    pred_width, pred_depth = int(method.config.predictor_width), int(method.config.predictor_depth)
    num_patches, num_visible = method.num_patches, method.num_visible
    num_masked = num_patches - num_visible
    patch_inputs = method.patch_size[0] * method.patch_size[1]

    per_example = {
        "patch_embed": 2 * num_patches * patch_inputs * width,
        "online_encoder": depth * block_flops(1 + num_visible, width, mlp_dim),
        "predictor": (2 * (1 + num_visible) * width * pred_width
                      + pred_depth * block_flops(1 + num_patches, pred_width, 4 * pred_width)
                      + 2 * num_masked * pred_width * width),
        "target_encoder": depth * block_flops(1 + num_masked, width, mlp_dim),
    }
    flops = {name: batch_size * value for name, value in per_example.items()}
    trained = flops["patch_embed"] + flops["online_encoder"] + flops["predictor"]
    flops["forward"] = trained + flops["target_encoder"]
    flops["backward"] = 2 * trained
    flops["total"] = flops["forward"] + flops["backward"]
    return flops


# -- the step ------------------------------------------------------------------------------------------


def model_config(variant: str, mask_ratio: float):
    """config.model for a variant: 'tiny' with the runlocal predictor, others with the paper's."""
    config = m2d_config.get_config("runlocal" if variant == "tiny" else f"variant={variant}")
    config.model.mask_ratio = mask_ratio
    return config


def build_step(config, *, frames: int, batch_size: int, mesh):
    """The trainer's jitted M2D step for `config` on `mesh`, and how to make its state.

    Returns:
        (step, init_state, method): `step(state, batch, rng) -> (state, metrics)` is jitted as the
        trainer jits it (state donated, outputs replicated); `init_state(rng)` builds a fresh train
        state (jit it with replicated out_shardings, or pass it to jax.eval_shape).
    """
    params = frontend.get_preset(config.data.frontend)
    # The step reads a DataSpec only for the device front end, which is off: no shard is opened.
    spec = pipeline.DataSpec((), params, frames, 0.0, 1.0, 0)
    method = M2D(config.model, input_shape=(params.n_mels, frames))
    sharding.check_batch_size(batch_size, mesh, key="batch size")
    total_steps = 1000  # only shapes the lr and EMA schedules, which do not change the cost
    schedule = optim.learning_rate_schedule(config.optim, global_batch_size=batch_size, total_steps=total_steps,
                                            warmup_steps=total_steps // 10)

    def init_state(rng):
        return train.init_train_state(method, config.optim, schedule, rng)

    abstract_params = jax.eval_shape(init_state, jax.random.key(0))["params"]
    tx = optim.make_optimizer(config.optim, schedule, method.weight_decay_mask(abstract_params))
    repl = sharding.replicated(mesh)
    step = jax.jit(train.make_train_step(method, tx, schedule, spec, device_frontend=False, total_steps=total_steps),
                   donate_argnums=(0,), out_shardings=(repl, repl))
    return step, init_state, method


def random_batch(batch_size: int, input_shape: tuple[int, int], mesh, seed: int = 0) -> dict:
    """{"lms": [batch, n_mels, frames] float32 ~ N(0, 1), "skipped_records": [batch] int32 zeros},
    split over the mesh's `data` axis (normalised log-mels look like this on average)."""
    lms = np.random.default_rng(seed).standard_normal((batch_size, *input_shape), dtype=np.float32)
    return jax.device_put({"lms": lms, "skipped_records": np.zeros((batch_size,), np.int32)},
                          sharding.batch_sharding(mesh))


def xla_flops(compiled) -> float | None:
    """XLA's FLOP count of a compiled computation (per device for a partitioned one), or None."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per computation
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


# -- measurement (worker) ------------------------------------------------------------------------------


def _gemm_gflops(mesh, size: int, repeats: int) -> float:
    """Best-of-`repeats` GFLOP/s of one size³ float32 matmul per device of `mesh`, all devices at once."""
    n = mesh.devices.size
    spec = sharding.batch_sharding(mesh)
    a = jax.device_put(np.random.default_rng(0).standard_normal((n, size, size), dtype=np.float32), spec)
    b = jax.device_put(np.random.default_rng(1).standard_normal((n, size, size), dtype=np.float32), spec)
    matmul = jax.jit(lambda x, y: jnp.einsum("nij,njk->nik", x, y), out_shardings=spec)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return n * 2 * size ** 3 / best / 1e9


def _available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def estimated_memory_bytes(init_state, num_devices: int) -> int:
    """Host bytes a replicated step needs, roughly: per device the train state (params, EMA target,
    AdamW moments) plus a gradient and an update the size of the params; activations not counted."""
    abstract = jax.eval_shape(init_state, jax.random.key(0))
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
    return num_devices * (nbytes(abstract) + 2 * nbytes(abstract["params"]))


def _measure_row(variant: str, mesh) -> dict:
    batch_size = FLAGS.batch_tiny if variant == "tiny" else FLAGS.batch_b
    steps = FLAGS.steps if variant == "tiny" or not FLAGS.steps_b else FLAGS.steps_b
    num_devices = mesh.devices.size
    step, init_state, method = build_step(model_config(variant, FLAGS.mask_ratio), frames=FLAGS.frames,
                                          batch_size=batch_size, mesh=mesh)
    row = {"variant": variant, "devices": num_devices, "batch": batch_size, "frames": FLAGS.frames,
           "num_patches": method.num_patches, "num_visible": method.num_visible, "steps": steps,
           "flops": m2d_step_flops(method, batch_size)["total"], "backend": jax.default_backend()}
    needed, available = estimated_memory_bytes(init_state, num_devices), _available_memory_bytes()
    if available is not None and needed > FLAGS.max_memory_fraction * available:
        row["skipped"] = (f"needs ~{needed / 2**30:.0f} GiB of host RAM ({num_devices} replicas of the train state), "
                          f"{available / 2**30:.0f} GiB available")
        return row
    init_rng, rng = jax.random.split(jax.random.key(0))
    state = jax.jit(init_state, out_shardings=sharding.replicated(mesh))(init_rng)
    batch = random_batch(batch_size, method.input_shape, mesh)
    start = time.perf_counter()
    compiled = step.lower(state, batch, rng).compile()
    compile_s = time.perf_counter() - start
    per_device_flops = xla_flops(compiled)
    for _ in range(FLAGS.warmup):
        state, metrics = compiled(state, batch, rng)
        jax.block_until_ready((state, metrics))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = compiled(state, batch, rng)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise RuntimeError(f"{variant} on {num_devices} devices: non-finite loss {loss}")
    row.update(compile_s=compile_s, step_s=statistics.mean(times), step_s_min=min(times), loss=loss,
               # A partitioned module is one device's program: scale to the whole step.
               xla_flops=None if per_device_flops is None else per_device_flops * num_devices)
    return row


def _worker() -> None:
    n = jax.device_count()
    mesh = sharding.make_mesh(n)
    peak_one = _gemm_gflops(sharding.make_mesh(1), FLAGS.gemm_size, FLAGS.gemm_repeats)
    peak_all = _gemm_gflops(mesh, FLAGS.gemm_size, FLAGS.gemm_repeats) if n > 1 else peak_one
    print(f"[{n} devices] GEMM peak: {peak_one:.1f} GFLOP/s on one device, {peak_all:.1f} on all",
          file=sys.stderr, flush=True)
    for variant in FLAGS.variants:
        row = _measure_row(variant, mesh)
        row.update(gemm_1dev_gflops=peak_one, gemm_all_gflops=peak_all)
        print(RESULT_PREFIX + json.dumps(row), flush=True)
        progress = (f"skipped: {row['skipped']}" if "skipped" in row
                    else f"compile {row['compile_s']:.1f} s, step {row['step_s']:.3f} s")
        print(f"[{n} devices] {variant}: {progress}", file=sys.stderr, flush=True)


# -- orchestration and report (parent) -----------------------------------------------------------------


def _run_worker(num_devices: int) -> list[dict]:
    """Runs this script with `num_devices` simulated CPU devices; returns its rows."""
    env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(num_devices), JAX_PLATFORMS="cpu")
    command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--_worker"]
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)  # stderr: progress, shown live
    if result.returncode:
        raise RuntimeError(f"the {num_devices}-device worker failed (exit {result.returncode}): {shlex.join(command)}")
    rows = [json.loads(line[len(RESULT_PREFIX):]) for line in result.stdout.splitlines()
            if line.startswith(RESULT_PREFIX)]
    if len(rows) != len(FLAGS.variants):
        raise RuntimeError(f"the {num_devices}-device worker returned {len(rows)} rows, expected "
                           f"{len(FLAGS.variants)}; its stdout:\n{result.stdout}")
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of worker rows (keys as produced by the worker)."""
    lines = [
        "| variant | devices | batch | compile s | step s mean (min) | clips/s | analytic GFLOP/step "
        "| XLA GFLOP/step | achieved GFLOP/s | 1-device GEMM GFLOP/s | all-device GEMM GFLOP/s "
        "| MFU vs n × 1-device | MFU vs all-device |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['variant']} | {r['devices']} | {r['batch']} | skipped: {r['skipped']} "
                         f"| | | {r['flops'] / 1e9:.1f} | | | {r['gemm_1dev_gflops']:.1f} "
                         f"| {r['gemm_all_gflops']:.1f} | | |")
            continue
        achieved = r["flops"] / r["step_s"] / 1e9
        xla = "n/a" if r["xla_flops"] is None else f"{r['xla_flops'] / 1e9:.1f}"
        lines.append(
            f"| {r['variant']} | {r['devices']} | {r['batch']} | {r['compile_s']:.1f} "
            f"| {r['step_s']:.3f} ({r['step_s_min']:.3f}) | {r['batch'] / r['step_s']:.1f} | {r['flops'] / 1e9:.1f} | {xla} | {achieved:.1f} "
            f"| {r['gemm_1dev_gflops']:.1f} | {r['gemm_all_gflops']:.1f} "
            f"| {achieved / (r['devices'] * r['gemm_1dev_gflops']):.1%} | {achieved / r['gemm_all_gflops']:.1%} |")
    return "\n".join(lines)


def _cpu_name() -> str:
    """platform.processor(), or the model name from /proc/cpuinfo where that is empty (Linux)."""
    name = platform.processor()
    if not name or name == platform.machine():
        try:
            with open("/proc/cpuinfo") as f:
                models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
            name = f"{models[0]} ({platform.machine()})" if models else name
        except OSError:
            pass
    return name or platform.machine()


def _total_memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def _report(rows: list[dict], load_at_start: float) -> str:
    first = rows[0]
    machine = (f"{_cpu_name()}, {os.cpu_count()} CPUs, {_total_memory_gib():.0f} GiB RAM; jax {jax.__version__}, "
               f"backend {rows[0]['backend']} (simulated devices); load average at start "
               f"{load_at_start:.1f} (other processes share the cores: timings are only as steady as that)")
    steps = ", ".join(sorted({f"{r['variant']}: {r['steps']}" for r in rows}))
    return "\n".join([
        f"### M2D training step on simulated CPU devices: 80x{first['frames']} input, "
        f"{first['num_patches']} patches, {first['num_visible']} visible (mask {FLAGS.mask_ratio})",
        "",
        f"- Command: `{shlex.join(['python', *sys.argv])}`",
        f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        f"- Machine: {machine}",
        f"- Timed steps per row ({steps}) after {FLAGS.warmup} untimed ones, float32, random log-mels "
        "already on the devices. Compile = trace + lower + XLA compile.",
        "- What the numbers mean: compute only (no input pipeline). Analytic GFLOP counts matmuls "
        "(forward + 2x backward, target encoder forward only; tools/bench_train.py docstring); XLA GFLOP is "
        "cost_analysis() over all devices, non-matmul ops included. MFU vs n × 1-device is the usual "
        "definition; the simulated devices share the same cores, so MFU vs all-device (a GEMM on every "
        "device at once in the same process) is the machine's real utilisation.",
        "",
        format_table(rows),
        "",
    ])


def main(argv):
    del argv
    if FLAGS._worker:
        _worker()
        return
    load_at_start = os.getloadavg()[0]
    rows = []
    for num_devices in (int(n) for n in FLAGS.devices):
        rows.extend(_run_worker(num_devices))
    report = _report(rows, load_at_start)
    print(report)
    bench_common.append_markdown(FLAGS.append_to, report)


if __name__ == "__main__":
    app.run(main)
