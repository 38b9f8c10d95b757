"""Helpers for `configs/*.py`: parsing the `:arg` string of `--config=configs/x.py:arg`."""

from __future__ import annotations

import difflib

import ml_collections
from ml_collections import config_dict


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses "runlocal,variant=S" into a ConfigDict typed like `defaults`.

    A bare word sets a boolean default to True, or, if it is not a boolean key, picks the value of
    the first default named `variant`/`preset` (so `:S` means `variant=S`). Unknown keys are an
    error that lists the valid ones.
    """
    result = ml_collections.ConfigDict(defaults)
    if not arg:
        return result
    for item in arg.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" in item:
            key, value = item.split("=", 1)
        elif isinstance(defaults.get(item), bool):
            key, value = item, "True"
        else:
            key = next((k for k in ("variant", "preset") if k in defaults), None)
            if key is None:
                raise ValueError(f"config arg {item!r}: expected key=value; valid keys: {sorted(defaults)}")
            value = item
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=3, cutoff=0.6)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise ValueError(f"config arg {key!r} ({item!r}) is unknown; {hint}valid: {sorted(defaults)}")
        default = defaults[key]
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config arg {key}={value!r}: expected true/false")
            result[key] = value.lower() in ("true", "1")
        elif default is None:
            result[key] = value
        else:
            result[key] = type(default)(value)
    return result


def load_config_module(path: str):
    """Imports a config file (e.g. configs/m2d.py) by path."""
    import importlib.util
    import os

    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config(config_arg: str) -> ml_collections.ConfigDict:
    """`configs/m2d.py:runlocal` -> that file's `get_config("runlocal")` (as `--config=` would)."""
    path, _, arg = config_arg.partition(":")
    return load_config_module(path).get_config(arg or None)


def run_config(method: str, *, batch_size: int, seed: int = 0) -> ml_collections.ConfigDict:
    """The run-level keys every method config shares, with the M2D-family defaults (300 epochs, 20 of
    warm-up, logs every 100 steps, a checkpoint every 2000); each config sets its own values on top and
    adds `data` (data_config), `model` and `optim` (adamw_config)."""
    return ml_collections.ConfigDict({
        "method": method,
        "seed": seed,
        "batch_size": batch_size,  # global, over all devices and processes
        "num_epochs": 300,
        "warmup_epochs": 20,
        "total_steps": 0,  # > 0 overrides num_epochs x steps per epoch
        "warmup_steps": -1,  # >= 0 overrides warmup_epochs
        "log_every_steps": 100,
        "checkpoint_every_steps": 2000,
        "keep_checkpoints": 2,  # the latest N checkpoints are kept
        "keep_every_steps": 0,  # > 0: also keep every checkpoint whose step is a multiple of this
        "async_checkpoints": True,
        "nonfinite_policy": "stop",  # NaN/Inf loss: "stop" the run, or "skip" the batch and go on
        "allow_resume_changes": False,  # True: resume even if method, seed, batch, model or input changed
        # Start from weights (audiojepa/training/init_from.py): an export, a workdir, or an official
        # .pth/.npz/.safetensors;
        # ignored when the workdir already has a checkpoint.
        "init_from": config_dict.placeholder(str),
        "tensorboard": True,
        # "START,COUNT": a jax.profiler trace of the COUNT steps after step START into workdir/tb (profiling.py).
        "profile_steps": config_dict.placeholder(str),
        # Periodic evaluators (audiojepa/evaluation/evaluators.py), none by default; from the command line:
        # --config.evals='{"knn": {"type": "knn", "task": "embedded", "every_steps": 250}}'
        "evals": {},
    })


def data_config(frontend: str, crop_frames: int, *, norm_stats: str = "shards", **embedded) -> ml_collections.ConfigDict:
    """`config.data`: unset `shards` = the embedded corpus (3000 clips of 3 s unless `embedded` overrides);
    `norm_stats`: "shards" (tools/compute_stats.py), "m2d" (-7.1, 4.2) or "MEAN,STD"; `device_frontend`:
    log-mels on the accelerator from raw waveforms; the worker keys tune the Grain pipeline."""
    from ml_collections import config_dict

    data = ml_collections.ConfigDict()
    data.shards = config_dict.placeholder(str)  # shard folder or glob
    data.frontend = frontend  # a preset of audiojepa.ops.frontend.PRESETS
    data.crop_frames = crop_frames
    data.norm_stats = norm_stats
    data.device_frontend = False
    data.num_workers = 8
    data.worker_buffer_size = 2
    data.read_threads = 0
    data.embedded = ml_collections.ConfigDict({"num_clips": 3000, "duration_s": 3.0, "seed": 0, **embedded})
    return data


def adamw_config(**overrides) -> ml_collections.ConfigDict:
    """`config.optim` for M2D's recipe: AdamW (0.9, 0.95), eps 1e-8, wd 0.05, lr = 3e-4 x batch / 256,
    clip 3.0.

    `lr` set (not None) overrides the batch scaling; `grad_clip_norm` None disables clipping.
    """
    from ml_collections import config_dict

    optim = ml_collections.ConfigDict({
        "name": "adamw",
        "base_lr": 3e-4,  # lr = base_lr x batch_size / 256
        "lr": config_dict.placeholder(float),
        "min_lr": 0.0,
        "warmup_init_lr": 0.0,  # the lr the linear warm-up starts from (Audio-JEPA: 1e-6)
        "b1": 0.9,
        "b2": 0.95,
        "eps": 1e-8,  # Adam's epsilon (torch's and optax's default)
        "weight_decay": 0.05,
        "grad_clip_norm": config_dict.placeholder(float),
    })
    optim.grad_clip_norm = 3.0
    optim.update(overrides)
    return optim


def apply_runlocal(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The CPU smoke schedule every method's `runlocal` shares: tiny encoder, 64-wide 2-layer predictor,
    300 steps of batch 32 at lr 1e-3, in-process data loading. Method-specific settings (EMA, crop)
    stay in each config."""
    config.batch_size = 32
    config.total_steps = 300
    config.warmup_steps = 30
    config.log_every_steps = 20
    config.checkpoint_every_steps = 100
    config.data.num_workers = 0
    config.model.variant = "tiny"
    config.model.predictor_width = 64
    config.model.predictor_depth = 2
    config.model.predictor_heads = 4
    config.optim.lr = 1e-3
    return config


SMALL_STEPS = 4000  # `small`: ~11 min for M2D's tiny ViT at batch 32 on 2 CPU cores (BENCHMARKS.md, issue 23)


def apply_small(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The `small` preset every ViT method shares: `runlocal`'s tiny encoder, predictor, batch and lr, trained
    SMALL_STEPS steps on a few hours of real audio (`--config.data.shards`); chosen on the dev benchmark
    (tools/make_dev_benchmark.py; docs/dev_benchmark.md). Method-specific settings (EMA, crop) stay in each
    config."""
    apply_runlocal(config)
    config.total_steps = SMALL_STEPS
    config.checkpoint_every_steps = 1000
    config.log_every_steps = 50
    return config


def _flat_keys(node, prefix: str = "") -> list[str]:
    """Every dotted key of a config: ["batch_size", "data", "data.crop_frames", ...]."""
    out = []
    for key, value in node.items():
        out.append(prefix + key)
        if hasattr(value, "items"):
            out += _flat_keys(value, prefix + key + ".")
    return out


def _close_keys(config, dotted_key: str, node, prefix: str, name: str) -> list[str]:
    """Dotted keys of `config` that `dotted_key` may have meant: siblings spelled like `name`, then any key
    spelled like the whole path (the right name in the wrong group)."""
    siblings = [prefix + k for k in difflib.get_close_matches(name, list(node.keys()), n=3, cutoff=0.6)]
    flat = _flat_keys(config)
    anywhere = difflib.get_close_matches(dotted_key, flat, n=3, cutoff=0.6)
    anywhere += [k for k in flat if k.rsplit(".", 1)[-1] == dotted_key.rsplit(".", 1)[-1]]
    return list(dict.fromkeys(siblings + anywhere))


def set_by_path(config: ml_collections.ConfigDict, dotted_key: str, value) -> None:
    """config["a.b.c"] = value, as `--config.a.b.c=value` would set it.

    Every part of the key must exist already, as for `--config.` flags: a typo is a ValueError naming the
    key and the close matches (difflib), never a new key that nothing reads.
    """
    *parents, leaf = dotted_key.split(".")
    node, prefix = config, ""
    for depth, key in enumerate(parents + [leaf]):
        if not hasattr(node, "items"):
            raise ValueError(f"config.{prefix.rstrip('.')} holds a value of type {type(node).__name__}, not a group "
                             f"of keys: config.{dotted_key} does not exist")
        if key not in node:
            close = _close_keys(config, dotted_key, node, prefix, key)
            hint = f"did you mean {', '.join('config.' + k for k in close)}? " if close else ""
            raise ValueError(f"config.{dotted_key}: config.{prefix}{key} is unknown; {hint}"
                             f"valid keys under config{'.' + prefix.rstrip('.') if prefix else ''}: "
                             f"{sorted(node.keys())}")
        if depth < len(parents):
            node, prefix = node[key], prefix + key + "."
    node[leaf] = value


def parse_flags_naming_config_keys(argv: list[str]) -> list[str]:
    """absl's flag parsing (`app.run(main, flags_parser=...)`), with a `--config.<key>=value` that names no config
    field reported as one line naming the flag and ml_collections' close match, exit status 1, instead of the
    KeyError / AttributeError traceback that ml_collections raises while the flags are parsed."""
    import sys

    from absl import flags

    try:
        return flags.FLAGS(argv)
    except (KeyError, AttributeError) as e:
        import re

        raw = str(e.args[0] if e.args else e)
        hint = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', raw)
        unknown = re.search(r"'([^'\\]+)\\?'", raw)
        detail = (f'"{hint.group(2)}" (did you mean "{hint.group(1)}"?)' if hint else
                  f'"{unknown.group(1)}"' if unknown else raw)
        overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
        bad = [a for a in overrides if any(part and part in detail for part in a[len("--config."):].split("."))]
        named = ", ".join(bad or overrides) or "a --config override"
        print(f"FATAL Flags parsing error: {named} names no config field: {detail}. The config file's "
              "get_config() defines the fields.", file=sys.stderr)
        sys.exit(1)


def model_config_with_keys(model_config, required, *, method: str, values: str) -> ml_collections.ConfigDict:
    """`model_config` (a ConfigDict, or a dict made one) once it has every key of `required`; a KeyError names the
    missing keys, `method` and where the values are (`values`, e.g. "audiojepa.methods.m2d.default_config()")."""
    if isinstance(model_config, dict):
        model_config = ml_collections.ConfigDict(model_config)
    missing = [key for key in required if key not in model_config]
    if missing:
        raise KeyError(f"config.model is missing {missing} for {method}; it needs all of {list(required)} "
                       f"(values: {values}).")
    return model_config
