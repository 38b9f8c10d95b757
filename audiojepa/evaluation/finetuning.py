"""End-to-end fine-tuning of an encoder with a linear head on one labelled task (issue 24 item 3).

The recipe of the M2D / AudioMAE fine-tuning scripts, as keys of `configs/finetune.py`:
    epochs, batch_size: training length in epochs of `batch_size` clips (global batch, split over the `data` mesh).
    lr / base_lr: peak learning rate `lr` if set, else `base_lr` x batch_size / 256 (optim.peak_learning_rate).
    min_lr, warmup_epochs: linear warm-up from 0 over `warmup_epochs`, then half-cycle cosine to `min_lr`.
    b1, b2, weight_decay: AdamW; decoupled weight decay on the tensors with ndim > 1 per block except `cls_token`
        and `pos_embed` (timm's fine-tuning groups); none on biases, LayerNorms, the head's bias.
    layer_decay: layer-wise lr decay (`layer_decay_scales`): block i of L gets lr x decay^(L - i), the patch
        embedding, CLS token and position table decay^(L + 1), the final norm and the head lr.
    mixup_alpha: each batch's log-mels and targets mixed with the batch reversed, lambda ~ Beta(alpha, alpha)
        (0: no mixup).
    freq_mask, time_mask: SpecAugment-style masks per example on the normalised log-mel: one band of
        uniform width in [0, freq_mask) mel bins and one of [0, time_mask) frames, set to 0 (the normalisation
        mean); 0 disables a mask. Applied after mixup, as AudioMAE masks the mixed fbank.
    head_norm: "batchnorm" (M2D's fine-tuning head, shared/reference/m2d.md §5, and EVAR's TaskHead:
        `BatchNorm1d(dim, affine=False)` on the clip embedding before the linear layer; `batchnorm_train`) or
        "none" (the linear layer alone).
    head_init_std: std of the head's normal kernel init (M2D's runtime: 2e-5; its bias starts at 0).
    checkpoint_every_steps, keep_checkpoints, log_every_steps, eval_batch_size, seed.
No dropout. Loss: softmax cross-entropy (single-label; accuracy) or sigmoid binary cross-entropy averaged over
classes (multi-label; mAP), both on mixed soft targets.

Forward. The head is (batch-normalised, then) linear on the clip embedding of the evaluation path (audiojepa.adapters.encoder.AudioEncoder):
the method's `encode` of the params, prefix tokens dropped, the F frequency patches of each time step
concatenated (F x D) and the mean taken over time (`clip_embedding`, the same function of the params as
`AudioEncoder.clip_embedding` on one chunk). Training sees a random crop of `input_shape[1]` frames of each
clip's normalised log-mel (a shorter clip zero-padded at the end to the crop). Valid and test clips are scored
whole, exactly as evaluation embeds them: chunks of the crop width, the last one padded to whole patches
only, the time mean of all their frame features (AudioEncoder.clip_embedding), then the head.

Head BatchNorm (torch's BatchNorm1d, affine=False, eps 1e-5, momentum 0.1): a training step normalises the
embeddings with the statistics of its global batch (over every device of the mesh, as SyncBatchNorm; the
mixed, masked batch the loss sees) and moves the running statistics (`head_stats`: mean, and the variance with
Bessel's correction, as torch keeps it) 10% towards them; scoring normalises with the running statistics.
They are state, not params: no gradient, no weight decay; checkpointed, selected with the best epoch's params,
and written to head.npz (`norm_mean`, `norm_var`).

Data order. Step s draws its batch from (seed, epoch) permutations and its crops, masks and mixup lambda from
(seed, s) alone, so a resumed run sees the same batches as an uninterrupted one. An epoch is
max(1, n_train // batch_size) steps (a train split smaller than the batch wraps around).

Checkpoints (Orbax, `TASK_DIR/checkpoints`, audiojepa.runtime.checkpointing): every `checkpoint_every_steps` and at the
end; state {"step", "params", "opt_state", "best_params", "head_stats", "best_head_stats"}, meta {"config", "history", "best"...}. Running
again resumes from the latest; a finished run re-run only rescores and rewrites its outputs.

Model selection: with a valid split, the params of the epoch with the best valid metric (ties: the earlier
epoch); without one, the last epoch's. Fold tasks are refused (ValueError).
"""

from __future__ import annotations

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from einops.array_api import (
    reduce,  # the array-API entry: no framework lookup (never imports torch)
)

from audiojepa.adapters import encoder as encoder_lib
from audiojepa.evaluation import probes, tasks
from audiojepa.models import vit
from audiojepa.ops import optim
from audiojepa.runtime import checkpointing, sharding
from audiojepa.runtime import metrics as metrics_lib

CONFIG_KEYS = ("epochs", "batch_size", "base_lr", "lr", "min_lr", "warmup_epochs", "b1", "b2", "weight_decay",
               "layer_decay", "mixup_alpha", "freq_mask", "time_mask", "head_norm", "head_init_std",
               "checkpoint_every_steps", "keep_checkpoints", "log_every_steps", "eval_batch_size", "seed")
# Keys that do not change the trained params: a resumed run may change them.
RESUMABLE_CHANGES = ("checkpoint_every_steps", "keep_checkpoints", "log_every_steps", "eval_batch_size")
NO_WEIGHT_DECAY = ("cls_token", "pos_embed")  # timm's no_weight_decay list, which MAE/AudioMAE fine-tuning uses
HEAD_NORMS = ("batchnorm", "none")
# torch.nn.BatchNorm1d's defaults, which M2D's and EVAR's fine-tuning heads use.
BATCHNORM_EPS = 1e-5
BATCHNORM_MOMENTUM = 0.1
ENCODER_DIR = "encoder"
HEAD_FILE = "head.npz"


def check_config(config) -> None:
    """Raises ValueError naming the config key that is missing or out of range."""
    missing = [key for key in CONFIG_KEYS if key not in config]
    if missing:
        raise ValueError(f"config is missing {missing}; configs/finetune.py lists every key")
    for key in ("epochs", "batch_size", "checkpoint_every_steps", "keep_checkpoints", "log_every_steps",
                "eval_batch_size"):
        if not isinstance(config[key], int) or isinstance(config[key], bool) or config[key] < 1:
            raise ValueError(f"config.{key}={config[key]!r}; expected an integer >= 1")
    for key in ("mixup_alpha", "freq_mask", "time_mask", "warmup_epochs", "weight_decay"):
        if config[key] < 0:
            raise ValueError(f"config.{key}={config[key]!r}; expected >= 0")
    if not 0 < config.layer_decay <= 1:
        raise ValueError(f"config.layer_decay={config.layer_decay!r}; expected in (0, 1] (1: no decay)")
    if config.head_norm not in HEAD_NORMS:
        raise ValueError(f"config.head_norm={config.head_norm!r}; valid: {HEAD_NORMS}")
    if config.head_norm == "batchnorm" and config.batch_size < 2:
        raise ValueError(f"config.head_norm='batchnorm' needs config.batch_size >= 2 (batch statistics); got "
                         f"{config.batch_size}")
    if not config.head_init_std > 0:
        raise ValueError(f"config.head_init_std={config.head_init_std!r}; expected > 0")


# -- optimizer -------------------------------------------------------------------------------------------


def _path_names(path) -> list[str]:
    return [str(getattr(key, "key", getattr(key, "name", key))) for key in path]


def layer_decay_scales(params, depth: int, layer_decay: float):
    """The lr scale of every leaf of {"encoder": ..., "head": ...}, as timm's `param_groups_lrd` (MAE, AudioMAE,
    M2D fine-tuning): layer ids 0 (patch embedding, CLS, positions), i + 1 (block i), depth + 1 (final norm, head),
    scale decay^(depth + 1 - id).

    Blocks are stacked (vit.TransformerStack: leaves [depth, ...]), so their scale is an array
    [depth, 1, ...] that scales the update row by row; every other leaf's is a float32 scalar.
    """
    def scale(path, leaf):
        names = _path_names(path)
        if names[0] != "encoder":
            return jnp.float32(1.0)  # the head
        if vit.STACKED_BLOCKS in names:
            rows = layer_decay ** (depth - np.arange(depth))
            return jnp.asarray(rows.reshape((depth,) + (1,) * (jnp.ndim(leaf) - 1)), jnp.float32)
        if "stack" in names:  # the final norm
            return jnp.float32(1.0)
        return jnp.float32(layer_decay ** (depth + 1))
    return jax.tree_util.tree_map_with_path(scale, params)


def scale_updates(scales) -> optax.GradientTransformation:
    """Multiplies each update by its leaf of `scales` (broadcast: a stacked leaf's scale is per row)."""
    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, s: u * s.astype(u.dtype), updates, scales), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def weight_decay_mask(params):
    """True for tensors with ndim > 1 per block (vit.per_block_ndim), except NO_WEIGHT_DECAY."""
    ndims = vit.per_block_ndim(params)
    return jax.tree_util.tree_map_with_path(lambda path, n: n > 1 and _path_names(path)[-1] not in NO_WEIGHT_DECAY,
                                            ndims)


def make_optimizer(config, schedule, params, depth: int) -> optax.GradientTransformation:
    """AdamW on `schedule`, then the layer-wise decay: the whole update (weight decay included) of a leaf is
    scaled, i.e. that leaf's lr is lr x scale, as per-group lrs do in timm."""
    return optax.chain(
        optax.adamw(schedule, b1=float(config.b1), b2=float(config.b2), weight_decay=float(config.weight_decay),
                    mask=weight_decay_mask(params)),
        scale_updates(layer_decay_scales(params, depth, float(config.layer_decay))))


# -- augmentation ----------------------------------------------------------------------------------------


def sample_mixup_lambda(rng: np.random.Generator, alpha: float) -> float:
    """lambda ~ Beta(alpha, alpha), or 1.0 (no mixing) for alpha = 0."""
    return float(rng.beta(alpha, alpha)) if alpha > 0 else 1.0


def mixup(lms: jax.Array, targets: jax.Array, lam) -> tuple[jax.Array, jax.Array]:
    """lms [batch, n_mels, frames], targets [batch, classes] -> both mixed with the batch reversed:
    lam * x + (1 - lam) * x[::-1] (timm's Mixup pairing)."""
    lam = jnp.asarray(lam, jnp.float32)
    return lam * lms + (1 - lam) * jnp.flip(lms, 0), lam * targets + (1 - lam) * jnp.flip(targets, 0)


def sample_spec_masks(rng: np.random.Generator, batch: int, n_mels: int, frames: int, freq_mask: int,
                      time_mask: int) -> dict[str, np.ndarray]:
    """Per example, one frequency and one time band as torchaudio's Frequency/TimeMasking draws them: width
    floor(U(0, max)) (max clipped to the axis), start floor(U(0, size - width)). Returns int32 [batch] arrays
    freq_start, freq_width, time_start, time_width (widths 0 where a mask is disabled)."""
    out = {}
    for name, size, max_width in (("freq", n_mels, freq_mask), ("time", frames, time_mask)):
        width = np.floor(rng.uniform(0, min(max_width, size), batch)).astype(np.int32)
        start = np.floor(rng.uniform(0, 1, batch) * (size - width)).astype(np.int32)
        out[f"{name}_start"], out[f"{name}_width"] = start, width
    return out


def apply_spec_masks(lms: jax.Array, freq_start, freq_width, time_start, time_width) -> jax.Array:
    """lms [batch, n_mels, frames] with mel bins [freq_start, freq_start + freq_width) and frames
    [time_start, time_start + time_width) of each example set to 0 (the normalised mean)."""
    bins = jnp.arange(lms.shape[1])[None, :]
    frames = jnp.arange(lms.shape[2])[None, :]
    in_freq = (bins >= freq_start[:, None]) & (bins < (freq_start + freq_width)[:, None])
    in_time = (frames >= time_start[:, None]) & (frames < (time_start + time_width)[:, None])
    return jnp.where(in_freq[:, :, None] | in_time[:, None, :], 0.0, lms)


def crop_or_pad(lms: np.ndarray, frames: int, rng: np.random.Generator) -> np.ndarray:
    """A clip's log-mel [n_mels, t] -> [n_mels, frames]: a uniform random crop (start in [0, t - frames]) or the
    clip zero-padded at the end."""
    t = lms.shape[1]
    if t >= frames:
        start = int(rng.integers(0, t - frames + 1))
        return lms[:, start:start + frames]
    return np.pad(lms, ((0, 0), (0, frames - t)))


# -- forward and loss ------------------------------------------------------------------------------------


def clip_embedding(method, params, lms: jax.Array) -> jax.Array:
    """lms [batch, n_mels, frames] (one chunk) -> [batch, F x D]: `method.encode`'s tokens without the prefix,
    the F frequency patches of a time step concatenated, the mean over time; AudioEncoder.clip_embedding of
    the same chunk (freq_pooling "concat")."""
    tokens = method.encode(params, lms)[:, getattr(method, "num_prefix_tokens", 1):]
    # Tokens are frequency-major (f·t' + t); the time mean of [batch, t', F·D] is that of each frequency row.
    return reduce(tokens, "b (f t) d -> b (f d)", "mean", f=lms.shape[1] // method.patch_size[0])


def head_logits(head, embedding):
    """Linear head: embedding [batch, dim] -> logits [batch, classes]."""
    return embedding @ head["kernel"] + head["bias"]


def init_head_stats(dim: int) -> dict:
    """BatchNorm's running statistics before any batch: mean 0, variance 1 (torch's init), [dim] each."""
    return {"mean": jnp.zeros((dim,), jnp.float32), "var": jnp.ones((dim,), jnp.float32)}


def batchnorm_train(stats: dict, x: jax.Array) -> tuple[jax.Array, dict]:
    """torch BatchNorm1d(affine=False) in training mode: x [batch, dim] normalised with the batch's mean and
    biased variance; the running statistics move BATCHNORM_MOMENTUM towards the batch's mean and its unbiased
    variance. Returns (normalised x, new stats)."""
    mean = x.mean(axis=0)
    var = jnp.mean(jnp.square(x - mean), axis=0)
    n = x.shape[0]
    new = {"mean": (1 - BATCHNORM_MOMENTUM) * stats["mean"] + BATCHNORM_MOMENTUM * mean,
           "var": (1 - BATCHNORM_MOMENTUM) * stats["var"] + BATCHNORM_MOMENTUM * var * (n / (n - 1))}
    return (x - mean) * jax.lax.rsqrt(var + BATCHNORM_EPS), jax.lax.stop_gradient(new)


def batchnorm_eval(stats, x):
    """BatchNorm1d(affine=False) in eval mode: x [batch, dim] normalised with the running statistics (NumPy or
    JAX arrays)."""
    return (x - stats["mean"]) / np.sqrt(np.asarray(stats["var"]) + BATCHNORM_EPS)


def loss_of(logits: jax.Array, targets: jax.Array, multilabel: bool) -> jax.Array:
    """Mean softmax cross-entropy (single-label) or mean sigmoid BCE over batch and classes (multi-label)."""
    if multilabel:
        return optax.sigmoid_binary_cross_entropy(logits, targets).mean()
    return optax.softmax_cross_entropy(logits, targets).mean()


def make_train_step(method, tx, schedule, multilabel: bool, head_norm: str = "batchnorm"):
    """(state, batch, lam) -> (state, {"loss", "lr"}); batch: lms [B, n_mels, frames], targets [B, classes] and
    the spec masks' [B] int32 arrays (sample_spec_masks); lam: the batch's mixup lambda. With head_norm
    "batchnorm" the step also moves state["head_stats"] (batchnorm_train)."""
    def step_fn(state, batch, lam):
        lms, targets = mixup(batch["lms"], batch["targets"], lam)
        lms = apply_spec_masks(lms, batch["freq_start"], batch["freq_width"], batch["time_start"],
                               batch["time_width"])

        def loss_fn(params):
            embedding, head_stats = clip_embedding(method, params, lms), state["head_stats"]
            if head_norm == "batchnorm":
                embedding, head_stats = batchnorm_train(head_stats, embedding)
            return loss_of(head_logits(params["head"], embedding), targets, multilabel), head_stats

        (loss, head_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return ({**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state,
                 "head_stats": head_stats}, {"loss": loss, "lr": schedule(state["step"])})
    return step_fn


# -- data ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TaskData:
    """A task's clips as normalised log-mels, its targets and split indices."""
    lms: list  # [n] arrays [n_mels, frames_i]
    labels: np.ndarray  # [n] int (single-label) or [n, classes] multi-hot
    num_classes: int
    multilabel: bool
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray

    def targets(self, idx: np.ndarray) -> np.ndarray:
        """[len(idx), classes] float32: one-hot or multi-hot."""
        if self.multilabel:
            return self.labels[idx].astype(np.float32)
        return np.eye(self.num_classes, dtype=np.float32)[self.labels[idx]]


def prepare_task(enc: encoder_lib.AudioEncoder, task: tasks.Task) -> TaskData:
    """Decodes every clip once and computes its normalised log-mel with the encoder's front end."""
    if task.is_folds:
        raise ValueError(f"task {task.name!r} ({task.source}) has folds: fine-tuning supports fixed "
                         "train/valid/test splits only (labels.csv with a split column)")
    labels = task.label_array()
    probes.check_splits(labels, task.splits, multilabel=task.multilabel, num_classes=len(task.classes))
    lms = [enc.normalized_logmel(task.load_audio(i, enc.frontend.sample_rate))[0] for i in range(len(task))]
    splits = np.asarray(task.splits).astype(str)
    return TaskData(lms, labels, len(task.classes), task.multilabel, *(np.flatnonzero(splits == s)
                                                                       for s in ("train", "valid", "test")))


def steps_per_epoch(data: TaskData, batch_size: int) -> int:
    return max(1, len(data.train) // batch_size)


def epoch_order(seed: int, epoch: int, n_train: int, num_rows: int) -> np.ndarray:
    """The first `num_rows` of concatenated permutations of range(n_train) drawn from (seed, epoch)."""
    rng = np.random.default_rng((seed, 1, epoch))
    reps = -(-num_rows // n_train)
    return np.concatenate([rng.permutation(n_train) for _ in range(reps)])[:num_rows]


def host_batch(data: TaskData, config, step: int, frames: int) -> tuple[dict, float]:
    """Step `step`'s global batch (train clip crops, targets, spec masks) and mixup lambda, from (seed, step)."""
    per_epoch = steps_per_epoch(data, config.batch_size)
    epoch, index = divmod(step, per_epoch)
    order = epoch_order(config.seed, epoch, len(data.train), per_epoch * config.batch_size)
    rows = data.train[order[index * config.batch_size:(index + 1) * config.batch_size]]
    rng = np.random.default_rng((config.seed, 2, step))
    lms = np.stack([crop_or_pad(data.lms[i], frames, rng) for i in rows]).astype(np.float32)
    masks = sample_spec_masks(rng, len(rows), lms.shape[1], frames, int(config.freq_mask), int(config.time_mask))
    lam = sample_mixup_lambda(rng, float(config.mixup_alpha))
    return {"lms": lms, "targets": data.targets(rows), **masks}, lam


def score_split(enc: encoder_lib.AudioEncoder, head: dict, data: TaskData, idx: np.ndarray,
                batch_size: int, head_stats: dict | None = None) -> float:
    """Accuracy or mAP of the clips `idx`, embedded whole as evaluation embeds them (enc.clip_embedding) with
    `enc.params`, normalised with the running `head_stats` (batchnorm_eval; None: not normalised), scored by
    the head."""
    by_length: dict[int, list[int]] = {}
    for i in idx:
        by_length.setdefault(data.lms[i].shape[1], []).append(int(i))
    rows, logits = [], []
    for members in by_length.values():
        for start in range(0, len(members), batch_size):
            chunk = members[start:start + batch_size]
            emb = enc.clip_embedding(np.stack([data.lms[i] for i in chunk]))
            if head_stats is not None:
                emb = batchnorm_eval(head_stats, emb)
            logits.append(emb @ np.asarray(head["kernel"]) + np.asarray(head["bias"]))
            rows.extend(chunk)
    scores, labels = np.concatenate(logits), data.labels[np.asarray(rows)]
    if data.multilabel:
        return probes.mean_average_precision(labels, scores)
    return probes.accuracy(labels, scores)


# -- the run ---------------------------------------------------------------------------------------------


def config_record(config) -> dict:
    return {key: config[key] for key in CONFIG_KEYS}


def _check_resume(saved: dict, config, task_dir: str) -> None:
    wrong = sorted(k for k in CONFIG_KEYS if k not in RESUMABLE_CHANGES and saved.get(k) != config[k])
    if wrong:
        raise ValueError(f"{task_dir} holds a fine-tuning run with another config ("
                         + ", ".join(f"config.{k}={saved.get(k)!r}, now {config[k]!r}" for k in wrong)
                         + "); run it with the same values to resume, or give another --output")


def finetune_task(enc: encoder_lib.AudioEncoder, task: tasks.Task, task_dir: str, config, *,
                  stop_after: int | None = None, num_devices: int | None = None, source: str = "") -> dict:
    """Fine-tunes `enc` with a linear head on `task`, checkpointing in `task_dir`/checkpoints (resumable).

    Returns (result, the last params {"encoder", "head"} on the host). result: {"metric", "test", "valid" (None without a valid split), "best_epoch", "epochs", "steps", "finished",
    "history": [{"epoch", "step", "valid"}], "export", ...}; when finished, the selected encoder is exported to
    `task_dir`/encoder (load_encoder reads it) and the head to `task_dir`/head.npz. With `stop_after` the run
    stops after that step (checkpoint saved) and returns test None unless it is the last step.
    """
    check_config(config)
    if enc.is_waveform_model:
        raise ValueError(f"encoder method {enc.method_name!r} takes waveforms; fine-tuning supports log-mel patch "
                         "models (m2d, jepa, matpac)")
    data = prepare_task(enc, task)
    mesh = sharding.make_mesh(num_devices)
    local_batch = sharding.check_batch_size(config.batch_size, mesh)
    per_epoch = steps_per_epoch(data, config.batch_size)
    total_steps = int(config.epochs) * per_epoch
    frames = enc.chunk_frames
    metric = "mAP" if data.multilabel else "accuracy"
    schedule = optim.learning_rate_schedule(
        ml_collections.ConfigDict({"lr": config.lr, "base_lr": config.base_lr, "min_lr": config.min_lr}),
        global_batch_size=config.batch_size, total_steps=total_steps,
        warmup_steps=round(config.warmup_epochs * per_epoch))
    method = enc.method
    dim = enc.feature_dim
    head = {"kernel": config.head_init_std * jax.random.normal(jax.random.key(config.seed), (dim, data.num_classes)),
            "bias": jnp.zeros((data.num_classes,), jnp.float32)}
    batchnorm = config.head_norm == "batchnorm"
    params = {**jax.tree.map(jnp.asarray, enc.params), "head": head}
    tx = make_optimizer(config, schedule, params, method.encoder_depth)
    repl = sharding.replicated(mesh)
    eval_enc = encoder_lib.AudioEncoder(enc.method_name, enc.model_config, enc.input_shape, enc.frontend,
                                        enc.norm_stats, enc.params, enc.freq_pooling)
    logging.info("fine-tuning %s on %s: %d train / %d valid / %d test clips, %d classes (%s), %d steps (%d per "
                 "epoch), batch %d on %d devices, crop %d frames", enc.method_name, task.name, len(data.train),
                 len(data.valid), len(data.test), data.num_classes, metric, total_steps, per_epoch,
                 config.batch_size, mesh.devices.size, frames)

    os.makedirs(task_dir, exist_ok=True)
    manager = checkpointing.make_manager(task_dir, every_steps=int(config.checkpoint_every_steps),
                                         keep=int(config.keep_checkpoints))
    try:
        with jax.set_mesh(mesh):
            init = jax.jit(lambda p: {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": tx.init(p),
                                      "best_params": p, "head_stats": init_head_stats(dim),
                                      "best_head_stats": init_head_stats(dim)}, out_shardings=repl)
            abstract = jax.eval_shape(init, params)
            latest = manager.latest_step()
            if latest is not None:
                saved_meta = checkpointing.restore_meta_item(manager, latest)
                _check_resume(saved_meta.get("config", {}), config, task_dir)
                latest, state, meta = checkpointing.restore_latest_intact(
                    manager, checkpointing.abstract_like(abstract, repl), move_damaged=True)
                history, best = meta["history"], meta["best"]
                logging.info("resumed from step %d in %s", latest, checkpointing.checkpoint_dir(task_dir))
            else:
                state, history, best = init(params), [], {"epoch": None, "valid": None}
            train_step = jax.jit(make_train_step(method, tx, schedule, data.multilabel, config.head_norm),
                                 donate_argnums=(0,), out_shardings=(repl, repl))
            step = int(state["step"])
            progress = metrics_lib.Progress(first_step=step, total_steps=total_steps,
                                            global_batch_size=config.batch_size)
            pending = []
            process_rows = slice(jax.process_index() * local_batch, (jax.process_index() + 1) * local_batch)
            while step < total_steps and (stop_after is None or step < stop_after):
                batch, lam = host_batch(data, config, step, frames)
                batch = sharding.to_global_batch({k: v[process_rows] for k, v in batch.items()}, mesh)
                state, out = train_step(state, batch, jnp.float32(lam))
                pending.append(out)
                step += 1
                last = step == total_steps or step == stop_after
                if step % per_epoch == 0:  # end of an epoch: select on valid
                    epoch = step // per_epoch
                    valid = None
                    if len(data.valid):
                        eval_enc.params = jax.device_get({k: v for k, v in state["params"].items() if k != "head"})
                        valid = score_split(eval_enc, jax.device_get(state["params"]["head"]), data, data.valid,
                                            int(config.eval_batch_size),
                                            jax.device_get(state["head_stats"]) if batchnorm else None)
                    history.append({"epoch": epoch, "step": step, "valid": valid})
                    if valid is None or best["valid"] is None or valid > best["valid"]:
                        best = {"epoch": epoch, "valid": valid}
                        state = {**state, "best_params": jax.tree.map(jnp.copy, state["params"]),
                                 "best_head_stats": jax.tree.map(jnp.copy, state["head_stats"])}
                    if valid is not None:
                        logging.info("epoch %d (step %d): valid %s %.4f (best %.4f at epoch %d)", epoch, step,
                                     metric, valid, best["valid"], best["epoch"])
                if step % int(config.log_every_steps) == 0 or last:
                    host = jax.device_get(pending)
                    pending = []
                    row = {"loss": float(np.mean([m["loss"] for m in host])), "lr": float(host[-1]["lr"])}
                    row.update(progress.update(step))
                    metrics_lib.log_progress(progress, step, row)
                checkpointing.save(manager, step, state, None,
                                   {"config": config_record(config), "history": history, "best": best,
                                    "total_steps": total_steps, "task": task.source, "encoder": source},
                                   force=last)
            checkpointing.wait_for_saves(manager)
            finished = step >= total_steps
            result = {"metric": metric, "valid": best["valid"], "best_epoch": best["epoch"], "epochs": config.epochs,
                      "steps": step, "total_steps": total_steps, "finished": finished, "history": history,
                      "test": None, "export": None, "num_devices": int(mesh.devices.size)}
            if finished:
                selected = jax.device_get(state["best_params"])
                selected_stats = jax.device_get(state["best_head_stats"]) if batchnorm else None
                eval_enc.params = {k: v for k, v in selected.items() if k != "head"}
                result["test"] = score_split(eval_enc, selected["head"], data, data.test, int(config.eval_batch_size),
                                             selected_stats)
                if jax.process_index() == 0:
                    result["export"] = eval_enc.save(os.path.join(task_dir, ENCODER_DIR),
                                                     source=f"finetuned {source} on {task.source}")
                    head_arrays = {k: np.asarray(v) for k, v in selected["head"].items()}
                    if batchnorm:
                        head_arrays.update(norm_mean=np.asarray(selected_stats["mean"]),
                                           norm_var=np.asarray(selected_stats["var"]))
                    np.savez(os.path.join(task_dir, HEAD_FILE), **head_arrays)
                logging.info("%s: test %s %.4f (valid %s, epoch %s of %d)", task.name, metric, result["test"],
                             best["valid"], best["epoch"], config.epochs)
            return result, jax.device_get(state["params"])
    finally:
        manager.close()
