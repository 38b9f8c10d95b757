r"""Training-step throughput of any method config on simulated CPU devices (or, with --platform, a
machine's accelerators): compile time, step time, clips/s, FLOP/s, MFU, and (--data) the input
pipeline's clips/s next to the step's.

    python tools/bench_train.py                                   # M2D: tiny and B, 1 and 8 devices, 80x608
    python tools/bench_train.py --variants=tiny --devices=1,2,4,8 --frames=208
    python tools/bench_train.py --config=configs/matpac.py        # MATPAC: tiny and B, 80x608
    python tools/bench_train.py --config=configs/jepa.py          # SonyCSL JEPA: tiny and B, 80x208
    python tools/bench_train.py --config=configs/jepa.py:masking=multiblock,target_domain=latent
    python tools/bench_train.py --config=configs/audio_jepa.py --batch_b=4   # 128x256, padded to the ratio range
    python tools/bench_train.py --config=configs/encodecmae.py    # tiny and base, 4 s, targets on device
                                                                  # and precomputed (--encodecmae_targets)
    python tools/bench_train.py --config=configs/m2d.py --variants=tiny --devices=1 --data
    python tools/bench_train.py --platform=gpu --variants=B --devices=1 --batch_b=256 \
        --config.model.dtype=bfloat16 [--config.model.attention_impl=cudnn]   # issue 9's GPU row
    python tools/bench_train.py --config=configs/encodecmae.py --encodecmae_targets=precomputed --data \
        --config.data.shards=/data/targets/as_24k   # tools/precompute_encodec_targets.py output

What a row is. `--config=configs/<method>.py[:arg]` (with any `--config.key=value` overrides, as for
audiojepa.main) gives the method and its settings; `--variants` the model sizes, one row each per
device count: "tiny" is the config's `runlocal` preset (tiny model, small predictor or head), any other
name the config built with `variant=<name>` (EncodecMAE: `size=<name>`), the paper's predictor and
head. Every row uses the crop of the config as given (`--frames`, or --config.data.crop_frames,
overrides it), batch --batch_tiny or --batch_b (--config.batch_size overrides both) and, with
--mask_ratio, that config.model.mask_ratio. Audio-JEPA, whose mask ratio is drawn per batch from a few
buckets, is timed at the middle bucket. EncodecMAE gets one row per --encodecmae_targets: "device" (the
step takes 24 kHz waveforms and runs the frozen EnCodec encoder, the RVQ and, when self-training, the
teacher inside: what the trainer does on waveform shards) and "precomputed" (the step the trainer runs
on shards of tools/precompute_encodec_targets.py: it takes EnCodec features [batch, T, 128] float32
and codes [batch, T, n_q] int32, here random; a self-training teacher still runs in it). Each row
lists the options of its config that change speed: the compute dtype, the attention implementation,
`model.remat` when the config has that key, and the device log-mel front end when it is on.

How it is measured. Each device count runs in its own subprocess of this script (`--_worker`, with
JAX_NUM_CPU_DEVICES set before JAX starts) on `sharding.make_mesh(n)`. The step is
`train.make_train_step` jitted as the trainer jits it (state donated, outputs replicated, the mask
variant static), fed one batch of random inputs (normalised log-mels [batch, n_mels, frames] ~ N(0, 1),
or waveforms, or EnCodec targets) that already sits on the devices, split over the `data` axis: the step
column measures compute, not the input pipeline. Per row: trace + compile time, the mean of --steps
timed steps after --warmup untimed ones (each waited for with block_until_ready), clips/s, FLOP/s and
MFU.

FLOPs. The analytic count is `audiojepa.training.flops.step_flops` (its docstring has every method's formula):
matmuls and convolutions only, forward plus twice the forward of the trained parts, frozen parts (EMA
targets, EnCodec, the teacher) forward only. For ViT-B M2D on 80x608 (L = 190, K = 57) that is about
85 GFLOP per clip, 28% of it in the target encoder; the formula slightly overcounts the input layers
(patch embedding, EncodecMAE's input projection), whose input needs no gradient. XLA's own count
(`cost_analysis()["flops"]`, a cross-check) includes LayerNorm, softmax, GELU, the loss and the AdamW
update, so it reads a few percent higher (tests/test_bench_train.py checks that the two agree within
15% for every method config, loops accounted for as below). XLA counts the body of a loop once, so the
count is taken on the step with unrolled transformer stacks (`unrolled`: config.model.scan_layers=False,
lowered only), whatever the row runs. Two known differences remain: XLA counts the
body of a loop once, so in an EncodecMAE step with targets on device it sees one of the LSTM's T
recurrent matmuls and one of the n_q RVQ stages, and reads ~15% lower; and it counts the forward passes
that rematerialisation (config.model.remat) repeats, which the analytic count leaves out (model FLOPs,
not hardware FLOPs). On n devices XLA
analyses one device's program and the table shows n × that, so work that every device repeats (the
AdamW update of the replicated params) is counted n times there.

Peaks: each worker times a jitted --gemm_size³ matmul in the rows' compute dtype (config.model.dtype:
float32, or bfloat16) (best of --gemm_repeats, before and after the rows, the higher kept) on one
device ("1-device GEMM"), and, with several devices, the same matmul on every device at once, sharded
over the mesh ("all-device GEMM", the most this process gets from the machine). MFU is reported both
ways: against n × the 1-device peak, and against the all-device peak. Simulated CPU devices share the
machine's cores, so the first understates the use of the machine n-fold when one device alone can
keep all cores busy; the second is the honest number here.

Accelerators (--platform=gpu|tpu): each --devices entry n runs on the first n of the machine's
devices (the worker gets JAX_PLATFORMS=<platform> and no simulated-device setting), the peak matmul
is 8192³ unless --gemm_size says otherwise, the host-memory skip does not apply, and for bfloat16
rows on a chip in DATASHEET_BF16_TFLOPS (H100, H200, A100, TPU v4/v5e/v5p/v6e) a last column gives
MFU against n × the vendor's dense bfloat16 figure: the usual accelerator MFU, as in issue 9's target.

Input pipeline (--data): after the workers, this process builds each row config's pipeline as the
trainer does (`pipeline.make_dataset` + `make_iterator` on config.data: the configured shards or the
embedded corpus, its front end, crop, worker processes) and reports the clips/s of --data_batches
batches after --data_warmup, next to the step's clips/s and their ratio; the issue asks the pipeline
to deliver at least 3× what the step consumes. The host-to-device copy of the batch is not included.
For EncodecMAE the configured shards feed one kind of row: waveform shards (and the embedded corpus)
the "device" rows, shards of precomputed targets (--config.data.shards=...) the "precomputed" ones.

Memory: every simulated device holds its own replica of the train state in host RAM (ViT-B: params,
EMA target and AdamW moments are ~1.7 GB, ~2.4 GB with a gradient and an update), so ViT-B on 8
simulated devices needs ~20 GB. A row whose estimate exceeds --max_memory_fraction of MemAvailable is
reported as skipped rather than run into the OOM killer.

The table (one per run, i.e. per method config) is printed and appended to --append_to with the
command, date, machine and versions. Compile times are real compiles unless JAX_COMPILATION_CACHE_DIR
points at a warm cache.
"""

import copy
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

# `configs/` is not part of the installed package: make the repository root importable when this
# file is run as a script (sys.path[0] is then tools/).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from audiojepa import config_utils, methods
from audiojepa.data import pipeline, resolve, target_records  # noqa: E402
from audiojepa.models import encodec  # noqa: E402
from audiojepa.models.vit import as_dtype  # noqa: E402
from audiojepa.ops import frontend, optim
from audiojepa.runtime import host_memory, sharding
from audiojepa.training import flops, train  # noqa: E402
from tools import bench_common  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", os.path.join(ROOT, "configs", "m2d.py"),
    "Method config, e.g. configs/jepa.py:masking=time; --config.key=value overrides any field.", lock_config=True)
flags.DEFINE_list("variants", None,
                  "Model sizes, one row each: 'tiny' = the config's runlocal preset (tiny model, small predictor "
                  "or head), others = config.model.variant (EncodecMAE: size) with the paper's predictor and head. "
                  "Default: tiny,B (EncodecMAE: tiny,base).")
flags.DEFINE_list("devices", ["1", "8"], "Device counts, one subprocess each (simulated CPU devices, or the first n "
                  "accelerators with --platform).")
flags.DEFINE_string("platform", "cpu", "'cpu': simulated CPU devices (JAX_NUM_CPU_DEVICES); 'gpu', 'cuda' or 'tpu' "
                    "(any JAX_PLATFORMS value): the machine's real accelerators.")
flags.DEFINE_integer("frames", 0, "Input frames (a multiple of the patch frames; EncodecMAE: 75 Hz EnCodec frames). "
                     "0: config.data.crop_frames of the config as given (M2D: 608).")
flags.DEFINE_float("mask_ratio", None, "Sets config.model.mask_ratio (default: the config's).")
flags.DEFINE_integer("batch_tiny", 64, "Global batch for 'tiny' (divisible by every device count).")
flags.DEFINE_integer("batch_b", 8, "Global batch for the other variants (divisible by every device count).")
flags.DEFINE_list("encodecmae_targets", ["device", "precomputed"],
                  "EncodecMAE rows: 'device' (EnCodec, RVQ, teacher inside the step, from waveforms) and/or "
                  "'precomputed' (the step on shards of precomputed targets: EnCodec features and codes in).")
flags.DEFINE_integer("steps", 5, "Timed steps per row.")
flags.DEFINE_integer("steps_b", 3, "Timed steps for the non-tiny variants (0: same as --steps).")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compiling, before timing.")
flags.DEFINE_integer("gemm_size", 0, "Side of the square matmul that measures the peak, in the rows' compute dtype "
                     "(0: 2048 on CPU, 8192 on accelerators, where a small one times mostly the launch).")
flags.DEFINE_integer("gemm_repeats", 5, "Timed matmuls; the best is reported.")
flags.DEFINE_float("max_memory_fraction", 0.7,
                   "Skip a row whose estimated host memory (n devices × replicated train state, gradients and "
                   "updates) exceeds this fraction of MemAvailable: simulated devices each hold a full copy.")
flags.DEFINE_string("profile_dir", "", "If set, each row also runs --profile_steps more steps under jax.profiler.trace "
                    "into <profile_dir>/<variant>[_<targets>]_<devices>dev (TensorBoard's profile plugin / XProf).")
flags.DEFINE_integer("profile_steps", 3, "Steps traced per row (--profile_dir).")
flags.DEFINE_bool("data", False, "Also time each row config's input pipeline (clips/s) as the trainer builds it.")
flags.DEFINE_integer("data_batches", 10, "Timed batches of the input pipeline (--data).")
flags.DEFINE_integer("data_warmup", 2, "Untimed batches first (worker start-up, first fills) (--data).")
flags.DEFINE_string("append_to", "BENCHMARKS.md", "Markdown file the table is appended to ('' to skip).")
flags.DEFINE_bool("_worker", False, "Internal: measure in this process and print one JSON line per row.")
flags.DEFINE_integer("_worker_devices", 0, "Internal: the worker's device count (0: all it sees).")

RESULT_PREFIX = "BENCH_TRAIN_ROW "  # marks the worker's result lines on its stdout
TARGETS = ("device", "precomputed")
DEFAULT_VARIANTS = {"variant": ("tiny", "B"), "size": ("tiny", "base")}  # by the config's model-size key
TITLES = {"m2d": "M2D", "matpac": "MATPAC", "jepa": "JEPA", "audio_jepa": "Audio-JEPA", "encodecmae": "EncodecMAE"}
TOTAL_STEPS = 1000  # only shapes the lr and EMA schedules, which do not change the cost
STEPS_PER_EPOCH = 100  # only shapes epoch-based schedules (MATPAC's teacher temperature)
# Dense bfloat16 TFLOP/s per chip from the vendors' datasheets (no sparsity), by a substring of
# jax.Device.device_kind: the denominator of the usual accelerator MFU (issue 9's "≥ 35% MFU").
DATASHEET_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "TPU v4": 275.0, "TPU v5 lite": 197.0,
                         "TPU v5p": 459.0, "TPU v6 lite": 918.0}


# -- configs -------------------------------------------------------------------------------------------


def first_row_config():
    """(variant, config) of the first --variants entry; without --variants, of the config's largest
    default size (M2D: B). For tools that time one row (profile_step, bench_pair)."""
    if not FLAGS.variants:
        FLAGS.variants = [DEFAULT_VARIANTS[size_key(FLAGS.config)][-1]]
    return row_configs()[0]


def size_key(config) -> str:
    """The config.model key naming the model size: "variant" (ViT methods) or "size" (EncodecMAE)."""
    for key in ("variant", "size"):
        if key in config.model:
            return key
    raise KeyError("config.model has neither 'variant' nor 'size'; tools/bench_train.py cannot pick model sizes.")


def row_config(config_arg: str, variant: str, *, overrides: dict | None = None, frames: int = 0,
               batch_size: int | None = None, mask_ratio: float | None = None):
    """The config of one row: `config_arg` ("configs/x.py[:arg]") at model size `variant` ("tiny": the
    config's runlocal preset), then `overrides` (dotted keys, as --config.key=value), the crop (`frames`;
    0 keeps config.data.crop_frames of the config as given, overrides included), the batch (unless
    overridden) and the mask ratio (when given).

    Raises:
        ValueError: the variant conflicts with the config arg or an override (e.g. :runlocal with B).
    """
    path, _, arg = config_arg.partition(":")
    module = config_utils.load_config_module(path)
    overrides = dict(overrides or {})

    def build(extra_arg: str | None):
        config = module.get_config(",".join(a for a in (arg, extra_arg) if a) or None)
        for key, value in overrides.items():
            config_utils.set_by_path(config, key, value)
        return config

    base = build(None)
    key = size_key(base)
    config = build("runlocal" if variant == "tiny" else f"{key}={variant}")
    if config.model[key] != variant:
        raise ValueError(f"--variants={variant} gives config.model.{key}={config.model[key]!r}: the config arg "
                         f"{arg!r} or an override of model.{key} sets the size; drop it or the variant.")
    config.data.crop_frames = int(frames or base.data.crop_frames)
    if "batch_size" not in overrides and batch_size is not None:
        config.batch_size = int(batch_size)
    if mask_ratio is not None:
        if "mask_ratio" not in config.model:
            raise ValueError(f"--mask_ratio: config.model of {path} has no mask_ratio.")
        config.model.mask_ratio = float(mask_ratio)
    return config


def config_options(config) -> str:
    """The config's settings that change the step's speed: dtype, attention, remat (when the key
    exists), unrolled blocks and a residual stream other than float32 (when set), device front end (when on)."""
    model = config.model
    options = [model.get("dtype", "float32"), f"attention {model.get('attention_impl', None) or 'xla'}"]
    if "remat" in model:
        options.append(f"remat {model.remat}")
    if not model.get("scan_layers", True):
        options.append("unrolled")
    if model.get("residual_dtype", "float32") != "float32":
        options.append(f"residual {model.residual_dtype}")
    if config.data.get("device_frontend", False):
        options.append("device log-mel")
    return ", ".join(options)


# -- the step ------------------------------------------------------------------------------------------


def timed_mask_variant(method) -> int | None:
    """The mask variant a row times: the middle ratio bucket of a method with several, else None."""
    count = getattr(method, "num_mask_variants", 1)
    return count // 2 if count > 1 else None


def batch_keys(targets: str | None) -> tuple[str, ...]:
    """What the trainer hands EncodecMAE.loss in a row's step (flops.encodecmae_step_flops' batch_keys):
    waveforms, or the features and codes of precomputed shards (k-means ids are never precomputed)."""
    return ("features", "codes") if targets == "precomputed" else flops.BATCH_KEYS_WAVEFORM


def analytic_flops(method, batch_size: int, *, targets: str | None = None) -> dict[str, int]:
    """flops.step_flops of the step a row times (its mask variant; EncodecMAE: its targets)."""
    if methods.input_kind(method) == "waveform":
        return flops.step_flops(method, batch_size, batch_keys=batch_keys(targets))
    if isinstance(method, methods.JEPA):
        return flops.step_flops(method, batch_size, mask_variant=timed_mask_variant(method))
    return flops.step_flops(method, batch_size)


def build_step(config, *, mesh, targets: str | None = None):
    """The trainer's jitted step for `config` on `mesh`, and how to make its state.

    Args:
        config: a full method config (row_config); its batch_size and data.crop_frames are used.
        mesh: sharding.make_mesh(n).
        targets: EncodecMAE only: "device" (waveform shards: EnCodec in the step) or "precomputed"
            (shards of precomputed EnCodec targets: the step takes features and codes).

    Returns:
        (step, init_state, method, spec): `step(state, batch, rng, mask_variant) -> (state, metrics)` is
        jitted as the trainer jits it (state donated, outputs replicated, mask_variant static);
        `init_state(rng)` builds a fresh train state; `method` the built method; `spec` the DataSpec the
        step reads (front end, crop and kind of shards; no shard is opened).
    """
    params = frontend.get_preset(config.data.frontend)
    kind = target_records.KIND if targets == "precomputed" else pipeline.WAVEFORM
    spec = pipeline.DataSpec((), params, int(config.data.crop_frames), 0.0, 1.0, 0, kind=kind)
    method_cls = methods.get_method(config.method)
    method = method_cls(config.model, input_shape=methods.input_shape(method_cls, params, spec.crop_frames),
                        steps_per_epoch=STEPS_PER_EPOCH)
    waveform_method = methods.input_kind(method) == "waveform"
    if waveform_method != (targets is not None):
        raise ValueError(f"targets={targets!r}: give 'device' or 'precomputed' for EncodecMAE, None otherwise.")
    if targets not in (None, *TARGETS):
        raise ValueError(f"--encodecmae_targets={targets!r}; valid: {TARGETS}.")
    batch_size = int(config.batch_size)
    sharding.check_batch_size(batch_size, mesh, key="batch size")
    schedule = optim.learning_rate_schedule(config.optim, global_batch_size=batch_size, total_steps=TOTAL_STEPS,
                                            warmup_steps=TOTAL_STEPS // 10)

    def init_state(rng):
        return train.init_train_state(method, config.optim, schedule, rng)

    abstract_params = jax.eval_shape(init_state, jax.random.key(0))["params"]
    tx = optim.make_optimizer(config.optim, schedule, method.weight_decay_mask(abstract_params))
    device_frontend = bool(config.data.get("device_frontend", False)) or waveform_method
    repl = sharding.replicated(mesh)
    step = jax.jit(train.make_train_step(method, tx, schedule, spec, device_frontend=device_frontend,
                                         total_steps=TOTAL_STEPS),
                   donate_argnums=(0,), out_shardings=(repl, repl), static_argnums=(3,))
    return step, init_state, method, spec


def random_batch(method, spec: pipeline.DataSpec, batch_size: int, mesh, *, device_frontend: bool = False,
                 targets: str | None = None, seed: int = 0) -> dict:
    """A random batch of what the row's step takes, split over the mesh's `data` axis:
    "lms" [batch, n_mels, frames] ~ N(0, 1) (normalised log-mels look like this on average), or
    "waveform" [batch, samples] ~ N(0, 0.1²) (device front end, EncodecMAE "device"), or for
    EncodecMAE "precomputed" "features" [batch, T, 128] ~ N(0, 1) float32 and "codes" [batch, T, n_q]
    int32, as the pipeline of precomputed shards yields them; and "skipped_records" [batch] int32 zeros."""
    rng = np.random.default_rng(seed)
    if targets == "precomputed":
        frames = method.num_frames
        batch = {"features": rng.standard_normal((batch_size, frames, encodec.DIMENSION), dtype=np.float32),
                 "codes": rng.integers(0, encodec.CODEBOOK_SIZE, (batch_size, frames, method.num_codebooks),
                                       dtype=np.int32)}
    elif methods.input_kind(method) == "waveform" or device_frontend:
        batch = {"waveform": 0.1 * rng.standard_normal((batch_size, spec.crop_samples), dtype=np.float32)}
    else:
        batch = {"lms": rng.standard_normal((batch_size, *method.input_shape), dtype=np.float32)}
    batch["skipped_records"] = np.zeros((batch_size,), np.int32)
    return jax.device_put(batch, sharding.batch_sharding(mesh))


def describe_input(method, spec: pipeline.DataSpec) -> str:
    """The input and token counts of a row, e.g. "80x608, 190 patches, 57 visible"."""
    if methods.input_kind(method) == "waveform":
        _, masked_idx = jax.eval_shape(lambda: method.sample_mask(jax.random.key(0), 1, method.num_frames))
        return (f"{method.num_samples / encodec.SAMPLE_RATE:g} s at 24 kHz, {method.num_frames} frames, "
                f"{method.num_frames - masked_idx.shape[1]} visible")
    shape = "x".join(str(n) for n in method.input_shape)
    if isinstance(method, methods.JEPA):
        variant = timed_mask_variant(method)
        context, target = flops.jepa_mask_counts(method, variant)
        bucket = "" if variant is None else f" (mask ratio {method.mask_ratio_of(variant):g}, middle bucket)"
        return f"{shape}, {method.num_patches} patches, {context} context, {target} targets{bucket}"
    return f"{shape}, {method.num_patches} patches, {method.num_visible} visible"


def unrolled(config):
    """A copy of `config` whose transformer stacks are unrolled (config.model.scan_layers=False): XLA's
    cost analysis counts a loop body once, so the FLOP cross-check lowers this copy (same computation)."""
    config = copy.deepcopy(config)
    config.model.scan_layers = False
    return config


def xla_flops(compiled) -> float | None:
    """XLA's FLOP count of a compiled (or lowered) computation (per device for a partitioned one), or None."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per computation
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        return None
    return float(analysis["flops"])


# -- measurement (worker) ------------------------------------------------------------------------------


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


def row_configs() -> list[tuple[str, object]]:
    """(variant, config) of every --variants entry, from the flags (the same in parent and workers)."""
    config_arg = config_flags.get_config_filename(FLAGS["config"])
    overrides = config_flags.get_override_values(FLAGS["config"])
    variants = FLAGS.variants or DEFAULT_VARIANTS[size_key(FLAGS.config)]
    return [(variant, row_config(config_arg, variant, overrides=overrides, frames=FLAGS.frames,
                                 batch_size=FLAGS.batch_tiny if variant == "tiny" else FLAGS.batch_b,
                                 mask_ratio=FLAGS.mask_ratio))
            for variant in variants]


def row_targets(config) -> list[str | None]:
    """The --encodecmae_targets of a waveform method's config, [None] for the others."""
    if methods.input_kind(methods.get_method(config.method)) != "waveform":
        return [None]
    for targets in FLAGS.encodecmae_targets:
        if targets not in TARGETS:
            raise ValueError(f"--encodecmae_targets={targets!r}; valid: {TARGETS}.")
    return list(FLAGS.encodecmae_targets)


def _measure_row(variant: str, config, targets: str | None, mesh) -> dict:
    steps = FLAGS.steps if variant == "tiny" or not FLAGS.steps_b else FLAGS.steps_b
    num_devices = mesh.devices.size
    batch_size = int(config.batch_size)
    step, init_state, method, spec = build_step(config, mesh=mesh, targets=targets)
    mask_variant = timed_mask_variant(method)
    row = {"variant": variant, "targets": targets, "devices": num_devices, "batch": batch_size,
           "frames": spec.crop_frames, "input": describe_input(method, spec), "options": config_options(config),
           "steps": steps, "flops": analytic_flops(method, batch_size, targets=targets)["total"],
           "backend": jax.default_backend()}
    needed, available = estimated_memory_bytes(init_state, num_devices), _available_memory_bytes()
    if FLAGS.platform == "cpu" and available is not None and needed > FLAGS.max_memory_fraction * available:
        row["skipped"] = (f"needs ~{needed / 2**30:.0f} GiB of host RAM ({num_devices} replicas of the train state), "
                          f"{available / 2**30:.0f} GiB available")
        return row
    init_rng, rng = jax.random.split(jax.random.key(0))
    repl = sharding.replicated(mesh)
    if getattr(method, "jit_init", True):
        state = jax.jit(init_state, out_shardings=repl)(init_rng)
    else:  # as the trainer: frozen host arrays (EnCodec) must not become jit constants
        state = jax.device_put(init_state(init_rng), repl)
    batch = random_batch(method, spec, batch_size, mesh, targets=targets,
                         device_frontend=bool(config.data.get("device_frontend", False)))
    start = time.perf_counter()
    compiled = step.lower(state, batch, rng, mask_variant).compile()
    compile_s = time.perf_counter() - start
    if config.model.get("scan_layers", True):  # count on the unrolled step (lowered only, not compiled)
        unrolled_step = build_step(unrolled(config), mesh=mesh, targets=targets)[0]
        per_device_flops = xla_flops(unrolled_step.lower(state, batch, rng, mask_variant))
    else:
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
    if FLAGS.profile_dir:
        name = "_".join([variant, *([targets] if targets else []), f"{num_devices}dev"])
        state, metrics = trace_steps(compiled, state, batch, rng, os.path.join(FLAGS.profile_dir, name),
                                     FLAGS.profile_steps)
    loss = float(metrics["loss"])
    if not np.isfinite(loss):
        raise RuntimeError(f"{variant} on {num_devices} devices: non-finite loss {loss}")
    row.update(compile_s=compile_s, step_s=statistics.mean(times), step_s_min=min(times), loss=loss,
               # A partitioned module is one device's program: scale to the whole step.
               xla_flops=None if per_device_flops is None else per_device_flops * num_devices)
    return row


def trace_steps(step, state, batch, rng, directory: str, steps: int):
    """Runs `steps` more steps under `jax.profiler.trace(directory)` (an .xplane.pb under
    directory/plugins/profile/<run>/); returns the last (state, metrics)."""
    with jax.profiler.trace(directory):
        for _ in range(steps):
            state, metrics = step(state, batch, rng)
        jax.block_until_ready((state, metrics))
    return state, metrics


def gemm_size() -> int:
    """--gemm_size, or its default for the platform: 2048 on CPU, 8192 on accelerators."""
    return FLAGS.gemm_size or (2048 if FLAGS.platform == "cpu" else 8192)


def gemm_dtype():
    """The compute dtype of the rows (config.model.dtype, the same for every row): the peak's dtype."""
    return as_dtype(row_configs()[0][1].model.get("dtype", "float32"))


def gemm_peaks(mesh, dtype=jnp.float32) -> tuple[float, float]:
    """(1-device, all-device) GEMM GFLOP/s (bench_common.xla_gemm_gflops) in `dtype`, logged."""
    size = gemm_size()
    peak_one = bench_common.xla_gemm_gflops(sharding.make_mesh(1), size, FLAGS.gemm_repeats, dtype)
    peak_all = (bench_common.xla_gemm_gflops(mesh, size, FLAGS.gemm_repeats, dtype) if mesh.devices.size > 1
                else peak_one)
    print(f"[{mesh.devices.size} devices] {jnp.dtype(dtype).name} GEMM peak: {peak_one:.1f} GFLOP/s on one device, "
          f"{peak_all:.1f} on all", file=sys.stderr, flush=True)
    return peak_one, peak_all


def datasheet_tflops(device_kind: str, dtype_name: str) -> float | None:
    """DATASHEET_BF16_TFLOPS for a device kind (e.g. "NVIDIA H200") and "bfloat16"; None otherwise."""
    if dtype_name != "bfloat16":
        return None
    return next((tflops for key, tflops in DATASHEET_BF16_TFLOPS.items() if key in device_kind), None)


def _worker() -> None:
    n = FLAGS._worker_devices or jax.device_count()
    mesh = sharding.make_mesh(n)
    dtype = gemm_dtype()
    # The peak is measured before and after the rows and the higher figure kept: a GEMM slowed by a
    # passing process (e.g. the previous run's pipeline workers exiting) would otherwise inflate MFU.
    peaks_before = gemm_peaks(mesh, dtype)
    rows = []
    for variant, config in row_configs():
        for targets in row_targets(config):
            with jax.set_mesh(mesh):  # see train.train_and_evaluate
                rows.append(_measure_row(variant, config, targets, mesh))
            progress = (f"skipped: {rows[-1]['skipped']}" if "skipped" in rows[-1]
                        else f"compile {rows[-1]['compile_s']:.1f} s, step {rows[-1]['step_s']:.3f} s")
            name = variant if targets is None else f"{variant}, targets {targets}"
            print(f"[{n} devices] {name}: {progress}", file=sys.stderr, flush=True)
    peak_one, peak_all = (max(a, b) for a, b in zip(peaks_before, gemm_peaks(mesh, dtype)))
    device_kind, dtype_name = jax.devices()[0].device_kind, jnp.dtype(dtype).name
    for row in rows:
        row.update(gemm_1dev_gflops=peak_one, gemm_all_gflops=peak_all, gemm_dtype=dtype_name,
                   device_kind=device_kind, datasheet_tflops=datasheet_tflops(device_kind, dtype_name),
                   host_memory=host_memory.describe())
        print(RESULT_PREFIX + json.dumps(row), flush=True)


# -- input pipeline (parent) ---------------------------------------------------------------------------


def data_clips_per_second(config, *, batches: int, warmup: int) -> tuple[float, str]:
    """(clips/s, DataSpec.kind) of `config`'s input pipeline, built as the trainer builds it (one process)."""
    spec = resolve.resolve_data_spec(config.data)
    method_cls = methods.get_method(config.method)
    device_frontend = bool(config.data.get("device_frontend", False)) or methods.input_kind(method_cls) == "waveform"
    ds = pipeline.make_dataset(spec, batch_size=int(config.batch_size), seed=config.seed,
                               device_frontend=device_frontend)
    data_iter = pipeline.make_iterator(ds, num_workers=config.data.get("num_workers", 0),
                                       worker_buffer_size=config.data.get("worker_buffer_size", 2),
                                       read_threads=config.data.get("read_threads", 0))
    return (bench_common.clips_per_second(data_iter, batch_size=int(config.batch_size), batches=batches,
                                          warmup=warmup), spec.kind)


def _add_data_rates(rows: list[dict]) -> None:
    """Times each variant's pipeline once and puts its clips/s on that variant's rows that it feeds:
    waveform shards all but EncodecMAE's "precomputed" rows, precomputed targets only those."""
    rates = {}
    for variant, config in row_configs():
        print(f"[data] {variant}: timing the input pipeline ({config.data.get('shards') or 'embedded corpus'}, "
              f"{config.data.get('num_workers', 0)} workers)", file=sys.stderr, flush=True)
        rates[variant] = data_clips_per_second(config, batches=FLAGS.data_batches, warmup=FLAGS.data_warmup)
    for row in rows:
        rate, kind = rates[row["variant"]]
        if (kind == target_records.KIND) == (row.get("targets") == "precomputed"):
            row["data_clips_s"] = rate


# -- orchestration and report (parent) -----------------------------------------------------------------


def worker_env(num_devices: int, platform: str, environ=None) -> dict:
    """The environment of a worker: `num_devices` simulated CPU devices for platform "cpu"; otherwise
    JAX_PLATFORMS=platform ("gpu" as "cuda": JAX 0.11 reads "gpu" as CUDA or ROCm and fails when the ROCm
    plugin is absent) and no simulated-device setting (the worker meshes its first n devices). Huge
    pages for glibc's large allocations as `python -m audiojepa.main` has them (audiojepa.runtime.host_memory;
    AUDIOJEPA_HUGEPAGE_MALLOC=0 turns them off)."""
    env = dict(os.environ if environ is None else environ, JAX_PLATFORMS="cuda" if platform == "gpu" else platform)
    env = host_memory.hugepage_env(env) or env
    if platform == "cpu":
        env["JAX_NUM_CPU_DEVICES"] = str(num_devices)
    else:
        env.pop("JAX_NUM_CPU_DEVICES", None)
    return env


def _run_worker(num_devices: int, expected_rows: int) -> list[dict]:
    """Runs this script as a worker on `num_devices` devices (worker_env); returns its rows."""
    env = worker_env(num_devices, FLAGS.platform)
    command = [sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--_worker",
               f"--_worker_devices={num_devices}"]
    result = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)  # stderr: progress, shown live
    if result.returncode:
        raise RuntimeError(f"the {num_devices}-device worker failed (exit {result.returncode}): {shlex.join(command)}")
    rows = worker_rows(result.stdout)
    if len(rows) != expected_rows:
        raise RuntimeError(f"the {num_devices}-device worker returned {len(rows)} rows, expected "
                           f"{expected_rows}; its stdout:\n{result.stdout}")
    return rows


def worker_rows(stdout: str) -> list[dict]:
    """The rows a worker printed on `stdout` (its lines that start with RESULT_PREFIX)."""
    return [json.loads(line[len(RESULT_PREFIX):]) for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]


def format_table(rows: list[dict]) -> str:
    """Markdown table of worker rows (keys as produced by the worker). A "targets" column appears when
    rows have targets (EncodecMAE), the data columns when rows have "data_clips_s" (--data)."""
    with_targets = any(r.get("targets") for r in rows)
    with_data = any("data_clips_s" in r for r in rows)
    with_datasheet = any(r.get("datasheet_tflops") for r in rows)
    header = ["variant", *(["targets"] if with_targets else []), "devices", "batch", "options", "compile s",
              "step s mean (min)", "clips/s", *(["data clips/s", "data ÷ step"] if with_data else []),
              "analytic GFLOP/step", "XLA GFLOP/step", "XLA ÷ analytic", "achieved GFLOP/s",
              "1-device GEMM GFLOP/s", "all-device GEMM GFLOP/s", "MFU vs n × 1-device", "MFU vs all-device",
              *(["MFU vs datasheet"] if with_datasheet else [])]
    left = {"variant", "targets", "options"}
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if h in left else "---:" for h in header) + "|"]
    for r in rows:
        cell = {h: "" for h in header}
        cell.update(variant=r["variant"], targets=r.get("targets") or "", devices=str(r["devices"]),
                    batch=str(r["batch"]), options=r.get("options", ""))
        cell["analytic GFLOP/step"] = f"{r['flops'] / 1e9:.1f}"
        cell["1-device GEMM GFLOP/s"] = f"{r['gemm_1dev_gflops']:.1f}"
        cell["all-device GEMM GFLOP/s"] = f"{r['gemm_all_gflops']:.1f}"
        if "skipped" in r:
            cell["compile s"] = f"skipped: {r['skipped']}"
        else:
            clips_s = r["batch"] / r["step_s"]
            achieved = r["flops"] / r["step_s"] / 1e9
            cell["compile s"] = f"{r['compile_s']:.1f}"
            cell["step s mean (min)"] = f"{r['step_s']:.3f} ({r['step_s_min']:.3f})"
            cell["clips/s"] = f"{clips_s:.1f}"
            if r.get("xla_flops") is None:
                cell["XLA GFLOP/step"] = "n/a"
            else:
                cell["XLA GFLOP/step"] = f"{r['xla_flops'] / 1e9:.1f}"
                cell["XLA ÷ analytic"] = f"{r['xla_flops'] / r['flops']:.2f}"
            cell["achieved GFLOP/s"] = f"{achieved:.1f}"
            cell["MFU vs n × 1-device"] = f"{achieved / (r['devices'] * r['gemm_1dev_gflops']):.1%}"
            cell["MFU vs all-device"] = f"{achieved / r['gemm_all_gflops']:.1%}"
            if r.get("datasheet_tflops"):
                cell["MFU vs datasheet"] = f"{achieved / (r['devices'] * r['datasheet_tflops'] * 1e3):.1%}"
            if "data_clips_s" in r:
                cell["data ÷ step"] = f"{r['data_clips_s'] / clips_s:.1f}×"
        if "data_clips_s" in r:
            cell["data clips/s"] = f"{r['data_clips_s']:.1f}"
        lines.append("| " + " | ".join(cell[h] for h in header) + " |")
    return "\n".join(lines)


def _total_memory_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def _report(rows: list[dict], load_at_start: float) -> str:
    config_arg = config_flags.get_config_filename(FLAGS["config"])
    path, _, arg = config_arg.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    title = TITLES.get(name, name) + (f" ({arg})" if arg else "")
    inputs = "; ".join(dict.fromkeys(f"{r['variant']}: {r['input']}" for r in rows))
    simulated = FLAGS.platform == "cpu"
    devices = "simulated devices" if simulated else f"{rows[0].get('device_kind', '?')} devices"
    machine = (f"{bench_common.cpus()}, {_total_memory_gib():.0f} GiB RAM; "
               f"jax {jax.__version__}, backend {rows[0]['backend']} ({devices}); load average at start "
               f"{load_at_start:.1f} (other processes share the cores: timings are only as steady as that); "
               f"{rows[0].get('host_memory', 'default malloc')}")
    steps = ", ".join(sorted({f"{r['variant']}: {r['steps']}" for r in rows}))
    where = "simulated CPU devices" if simulated else rows[0].get("device_kind", FLAGS.platform)
    lines = [
        *bench_common.section_head(f"{title} training step on {where}", machine),
        f"- Input: {inputs}",
        f"- Timed steps per row ({steps}) after {FLAGS.warmup} untimed ones, random inputs already on the "
        "devices. Compile = trace + lower + XLA compile.",
        "- What the numbers mean: step columns are compute only (no input pipeline). Analytic GFLOP counts "
        "matmuls (forward + 2x backward of the trained parts, frozen parts forward only; audiojepa/training/flops.py); "
        "XLA GFLOP is cost_analysis() over all devices, non-matmul ops included. MFU vs n × 1-device is the "
        "usual definition; the simulated devices share the same cores, so MFU vs all-device (a GEMM on every "
        "device at once in the same process) is the machine's real utilisation.",
        f"- Peaks: a {gemm_size()}³ {rows[0].get('gemm_dtype', 'float32')} matmul, the rows' compute dtype"
        + ("; MFU vs datasheet divides by n × the vendor's dense bfloat16 figure (DATASHEET_BF16_TFLOPS)."
           if any(r.get("datasheet_tflops") for r in rows) else "."),
    ]
    if any(r.get("targets") for r in rows):
        lines.append("- Targets: `device` = 24 kHz waveforms in, the frozen EnCodec encoder and RVQ (and a "
                     "self-training teacher) run in the step; `precomputed` = EnCodec features and codes in. XLA "
                     "counts a loop body once, so with targets on device it misses the LSTM's recurrence and "
                     "all but one RVQ stage (XLA ÷ analytic < 1).")
    if any("data_clips_s" in r for r in rows):
        lines.append(f"- Data: the config's input pipeline as the trainer builds it, {FLAGS.data_batches} batches "
                     f"after {FLAGS.data_warmup}, in this process (its worker processes: config.data.num_workers); "
                     "data ÷ step should be at least 3 (issue 9).")
    lines += ["", format_table(rows), ""]
    return "\n".join(lines)


def main(argv):
    del argv
    if FLAGS._worker:
        _worker()
        return
    load_at_start = os.getloadavg()[0]
    expected_rows = sum(len(row_targets(config)) for _, config in row_configs())
    rows, failures = collect_rows([int(n) for n in FLAGS.devices], lambda n: _run_worker(n, expected_rows))
    if not rows:
        raise RuntimeError("; ".join(failures))
    if FLAGS.data:
        _add_data_rates(rows)
    report = _report(rows, load_at_start)
    if failures:
        report += "\n" + "\n".join(f"- Failed: {failure}" for failure in failures) + "\n"
    print(report)
    bench_common.append_markdown(FLAGS.append_to, report)
    if failures:
        raise SystemExit(f"bench_train: {len(failures)} of {len(FLAGS.devices)} device counts failed (listed in "
                         "the report); the rows of the others are reported above.")


def collect_rows(device_counts: list[int], run_worker) -> tuple[list[dict], list[str]]:
    """Rows of `run_worker(n)` for each device count, and one message per count whose worker failed: a
    failing count (e.g. 8 devices on a 1-GPU machine) does not lose the rows measured before it."""
    rows, failures = [], []
    for num_devices in device_counts:
        try:
            rows.extend(run_worker(num_devices))
        except RuntimeError as e:
            print(f"[{num_devices} devices] {e}", file=sys.stderr, flush=True)
            failures.append(str(e))
    return rows, failures


if __name__ == "__main__":
    app.run(main)
