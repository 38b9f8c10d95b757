"""Shared by tools/bench_*.py and tools/profile_step.py: the head of a result section (command, date, machine)
and appending it to BENCHMARKS.md, timing repeated calls, the matmul peak, paired A/B ratios, JSON-object flags."""

import datetime
import json
import os
import platform
import shlex
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from audiojepa.runtime import sharding


def append_markdown(path: str, section: str) -> None:
    """Appends `section` to the markdown file `path`, creating it with a title if missing."""
    if not path:
        return
    new_file = not os.path.exists(path)
    with open(path, "a") as f:
        f.write("# Benchmarks\n\n" if new_file else "\n")
        f.write(section if section.endswith("\n") else section + "\n")


def section_head(title: str, machine: str) -> list[str]:
    """The first lines of a result section: "### <title>", a blank line, "- Command: `python <argv>`" (this
    process's command line, shell-quoted), "- Date: " (now, local time with its UTC offset, to the second) and
    "- Machine: <machine>"."""
    return [f"### {title}", "", f"- Command: `{shlex.join(['python', *sys.argv])}`",
            f"- Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}", f"- Machine: {machine}"]


def cpu_name() -> str:
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


def cpus() -> str:
    """"<cpu_name()>, <os.cpu_count()> CPUs": how a Machine line starts."""
    return f"{cpu_name()}, {os.cpu_count()} CPUs"


def jax_backend() -> str:
    """"jax <version>, backend <default backend> (<device kind of the first device>)"."""
    return f"jax {jax.__version__}, backend {jax.default_backend()} ({jax.devices()[0].device_kind})"


def timed_calls(fn, repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds (time.perf_counter) of each of `repeats` calls of fn() after `warmup` untimed ones (a
    compile, first allocations); fn must wait for its own result (e.g. jax.block_until_ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def clips_per_second(iterator, *, batch_size: int, batches: int, warmup: int) -> float:
    """Clips/s of `batches` next(iterator) calls of `batch_size` clips each, one wall-time interval, after
    `warmup` untimed ones (worker start-up, first fills)."""
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def gemm_gflops(matmul, size: int, repeats: int, copies: int = 1) -> float:
    """GFLOP/s of the fastest of `repeats` matmul() calls (after one untimed call), each `copies` size³
    matmuls of 2·size³ FLOP; matmul must wait for its result."""
    return copies * 2 * size ** 3 / min(timed_calls(matmul, repeats)) / 1e9


def xla_gemm_gflops(mesh, size: int, repeats: int, dtype=jnp.float32) -> float:
    """Best-of-`repeats` GFLOP/s (gemm_gflops) of one jitted [size, size] @ [size, size] `dtype` matmul per
    device of `mesh`, all devices at once: inputs [devices, size, size] split over the mesh's `data` axis."""
    n = mesh.devices.size
    spec = sharding.batch_sharding(mesh)
    a = jax.device_put(np.random.default_rng(0).standard_normal((n, size, size), dtype=np.float32).astype(dtype), spec)
    b = jax.device_put(np.random.default_rng(1).standard_normal((n, size, size), dtype=np.float32).astype(dtype), spec)
    matmul = jax.jit(lambda x, y: jnp.einsum("nij,njk->nik", x, y), out_shardings=spec)
    return gemm_gflops(lambda: matmul(a, b).block_until_ready(), size, repeats, copies=n)


def ab_ratios(a_seconds: list[float], b_seconds: list[float]) -> dict:
    """Paired times of A and B (seconds, pair i measured back to back): {"ratios": B ÷ A of each pair,
    "median_ratio": their median, "b_faster": how many pairs have B ÷ A < 1}."""
    ratios = [b / a for a, b in zip(a_seconds, b_seconds)]
    return {"ratios": ratios, "median_ratio": statistics.median(ratios), "b_faster": sum(r < 1 for r in ratios)}


def ab_summary(result: dict, pairs: str) -> str:
    """"Median B ÷ A over <n> <pairs>: **<median>**; B faster in <k> of <n>." for an ab_ratios result."""
    n = len(result["ratios"])
    return f"Median B ÷ A over {n} {pairs}: **{result['median_ratio']:.3f}**; B faster in {result['b_faster']} of {n}."


def json_dict_flag(name: str) -> dict:
    """The absl flag --`name`, a JSON object, parsed; a UsageError naming the flag if it is not one."""
    text = flags.FLAGS[name].value
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise app.UsageError(f"--{name} is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise app.UsageError(f"--{name} must be a JSON object, got {text!r}")
    return value
