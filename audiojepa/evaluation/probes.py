"""Probes on precomputed clip embeddings: EVAR's linear evaluation and X-ARES's weighted kNN.

Everything here is a pure function of NumPy arrays. Embeddings are `[n, dim]` float32; labels are
either an int array `[n]` (single-label, classes `0 .. num_classes-1`) or a multi-hot {0, 1} array
`[n, num_classes]` (multi-label). Single-label tasks are scored with accuracy, multi-label ones with
mAP (macro average precision over the classes that have a positive in the scored split).

- `linear_probe`: by default EVAR's `TorchMLPClassifier2(hidden_layer_sizes=())`, i.e. train-set
  standardisation, one linear layer, Adam with a constant learning rate, batch `min(200, n_train)`,
  at most 200 epochs, early stopping with patience 20 on the validation metric, best-validation
  weights restored before the test split is scored. Its options give the other benchmarks' probes
  (`audiojepa/evaluation/protocols.py` names the sets): the probe batch, the head (X-ARES's
  LayerNorm + Linear), the selection rule (best validation metric, best validation loss, or the
  last epoch), a per-epoch cosine learning-rate schedule, the weight decay and the loss scale.
  Written in JAX + optax; one jitted call runs a whole epoch (a `lax.scan` over the minibatches of
  a per-epoch permutation).
- `knn_score`: X-ARES's kNN: L2-normalised embeddings, cosine similarity, top-k neighbours whose
  one-hot (or multi-hot) labels are summed with weights `softmax(sim / temperature)`.
- `evaluate_task`: both probes on one task, over fixed train/valid/test splits or leave-one-fold-out
  folds, the linear probe repeated for several seeds.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats

log = logging.getLogger(__name__)

# EVAR's recipe (TorchMLPClassifier2 as called by lineareval.py).
MAX_EPOCHS = 200
PATIENCE = 20
MAX_BATCH_SIZE = 200
ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8
WEIGHT_DECAY = 1e-8  # EVAR's `alpha`, applied like torch.optim.Adam's (coupled) weight_decay.
# EVAR runs M2D's 3840-d features at 3e-5. Our embeddings are smaller (a few hundred dims) and our
# tasks often have a few thousand clips, where 3e-5 stops at the 200-epoch cap while still
# underfitting; 1e-3 reaches the same optimum well inside the cap, and early stopping guards
# against overshooting. Pass lr=3e-5 to reproduce EVAR's M2D setting exactly. Train sets under
# 200 clips get one step per epoch (200 steps in all), where even 1e-3 can stop short; the probe
# logs a warning when the best epoch is the last one.
DEFAULT_LR = 1e-3
VALID_FRACTION = 0.1
SEEDS = (42, 43, 44)
# Which epoch's weights score the test split (see linear_probe).
SELECTIONS = ("best_val_metric", "best_val_loss", "last")
HEADS = ("linear", "layernorm_linear")  # the second is X-ARES's LayerNorm(dim) -> Linear
LR_SCHEDULES = ("constant", "cosine_per_epoch")
LAYERNORM_EPS = 1e-5  # torch.nn.LayerNorm's default

# X-ARES kNN.
KNN_K = 10
KNN_TEMPERATURE = 0.07
# Bound on the elements of one similarity block [test_chunk, n_train] (float32: 4 bytes each).
_KNN_BLOCK_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------------------------
# Metrics


def accuracy(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Fraction of rows whose highest score is the true class.

    Args:
      y_true: [n] int class ids.
      scores: [n, num_classes] logits, probabilities or votes; ties go to the lowest class id.
    """
    y_true = np.asarray(y_true)
    scores = np.asarray(scores)
    if scores.ndim != 2 or len(scores) != len(y_true):
        raise ValueError(f"accuracy needs scores [n, num_classes] and y_true [n]; got "
                         f"{scores.shape} and {y_true.shape}")
    if len(y_true) == 0:
        raise ValueError("accuracy of an empty split is undefined")
    return float(np.mean(np.argmax(scores, axis=1) == y_true))


def average_precision_per_class(y_true: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Uninterpolated average precision of each class (sklearn's definition, ties grouped).

    AP = sum over distinct score thresholds of (recall gain) x (precision at that threshold):
    every positive contributes the precision measured at the end of its group of tied scores.

    Args:
      y_true: [n, num_classes] multi-hot {0, 1}.
      scores: [n, num_classes] real-valued scores, higher = more likely.
    Returns:
      [num_classes] float64; NaN for a class without positives.
    """
    y_true = np.asarray(y_true)
    scores = np.asarray(scores, dtype=np.float64)
    if y_true.shape != scores.shape or y_true.ndim != 2:
        raise ValueError(f"average precision needs y_true and scores of one shape "
                         f"[n, num_classes]; got {y_true.shape} and {scores.shape}")
    n = len(scores)
    order = np.argsort(-scores, axis=0, kind="stable")
    sorted_scores = np.take_along_axis(scores, order, axis=0)
    sorted_true = np.take_along_axis(y_true, order, axis=0).astype(np.float64)
    true_positives = np.cumsum(sorted_true, axis=0)
    # Index of the last row of each run of equal scores (the threshold that admits the whole run).
    run_end = np.ones_like(sorted_scores, dtype=bool)
    run_end[:-1] = sorted_scores[1:] != sorted_scores[:-1]
    rows = np.broadcast_to(np.arange(n)[:, None], scores.shape)
    end_of_run = np.minimum.accumulate(np.where(run_end, rows, n)[::-1], axis=0)[::-1]
    precision_at_end = np.take_along_axis(true_positives, end_of_run, axis=0) / (end_of_run + 1)
    num_positives = sorted_true.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (sorted_true * precision_at_end).sum(axis=0) / num_positives
    ap[num_positives == 0] = np.nan
    return ap


def mean_average_precision(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Macro mAP over the classes with at least one positive in `y_true`.

    Classes without a positive have no defined AP and are left out of the mean (sklearn's
    `average_precision_score(average="macro")` would count them as 0 and warn).

    Args:
      y_true: [n, num_classes] multi-hot {0, 1}.
      scores: [n, num_classes] real-valued scores.
    """
    ap = average_precision_per_class(y_true, scores)
    if np.all(np.isnan(ap)):
        raise ValueError("mAP is undefined: no class has a positive example in y_true")
    return float(np.nanmean(ap))


def _score(y: np.ndarray, scores: np.ndarray, multilabel: bool) -> float:
    return mean_average_precision(y, scores) if multilabel else accuracy(y, scores)


def _metric_name(multilabel: bool) -> str:
    return "mAP" if multilabel else "accuracy"


# ----------------------------------------------------------------------------------------------
# Linear probe (EVAR)


def standardize(train_x: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    """StandardScaler fitted on `train_x` ([n, dim]) and applied to it and to each of `others`.

    Statistics are per dimension (population std, ddof 0) in float64; a constant dimension gets
    std 1 so it maps to 0 instead of dividing by zero. Returns float32 arrays.
    """
    train64 = np.asarray(train_x, dtype=np.float64)
    mean = train64.mean(axis=0)
    std = train64.std(axis=0)
    std[std == 0] = 1.0
    return tuple(((np.asarray(x, dtype=np.float64) - mean) / std).astype(np.float32)
                 for x in (train_x, *others))


def _init_linear(key: jax.Array, dim: int, num_classes: int) -> dict[str, jax.Array]:
    """torch.nn.Linear's default init: weight and bias ~ U(-1/sqrt(dim), 1/sqrt(dim))."""
    bound = 1.0 / math.sqrt(dim)
    w_key, b_key = jax.random.split(key)
    return {
        "w": jax.random.uniform(w_key, (dim, num_classes), jnp.float32, -bound, bound),
        "b": jax.random.uniform(b_key, (num_classes,), jnp.float32, -bound, bound),
    }


def init_head(key: jax.Array, dim: int, num_classes: int, head: str) -> dict[str, jax.Array]:
    """Parameters of `head`: the linear layer, plus torch.nn.LayerNorm's init (scale 1, bias 0) for
    "layernorm_linear"."""
    params = _init_linear(key, dim, num_classes)
    if head == "layernorm_linear":
        params["ln_scale"] = jnp.ones((dim,), jnp.float32)
        params["ln_bias"] = jnp.zeros((dim,), jnp.float32)
    return params


def head_logits(params: dict, x: jax.Array) -> jax.Array:
    """Logits [n, num_classes] of a probe head for inputs x [n, dim].

    `x @ w + b`; when `params` hold `ln_scale` / `ln_bias` ([dim] each: X-ARES's
    `LayerNorm(dim) -> Linear`), x is first normalised over its last axis like torch.nn.LayerNorm:
    (x - mean) / sqrt(biased variance + 1e-5) * ln_scale + ln_bias.
    """
    if "ln_scale" in params:
        mean = jnp.mean(x, axis=-1, keepdims=True)
        variance = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        x = (x - mean) * jax.lax.rsqrt(variance + LAYERNORM_EPS) * params["ln_scale"] + params["ln_bias"]
    return x @ params["w"] + params["b"]


def probe_optimizer(lr: jax.Array | float, weight_decay: float = WEIGHT_DECAY) -> optax.GradientTransformation:
    # torch.optim.Adam(weight_decay=alpha) adds alpha * param to the gradient before the moments.
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_adam(b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS),
        optax.scale_by_learning_rate(lr),
    )


def _per_row_loss(params, x, y, multilabel: bool, loss_over_classes: bool):
    """Loss of each row [batch]: x [batch, dim]; y [batch] int or [batch, num_classes] float."""
    logits = head_logits(params, x)
    if multilabel:
        return optax.sigmoid_binary_cross_entropy(logits, y).mean(axis=-1)
    log_probs = jax.nn.log_softmax(logits)
    per_row = -jnp.take_along_axis(log_probs, y[:, None], axis=-1)[:, 0]
    # EVAR's loss is -(onehot * log_softmax).mean() over batch *and* classes, i.e. CE / C.
    # Adam is invariant to that constant scale, so only the (tiny) weight decay notices it.
    return per_row / logits.shape[-1] if loss_over_classes else per_row


def _batch_loss(params, x, y, weight, multilabel: bool, loss_over_classes: bool = True):
    """Mean loss over the real rows of one padded minibatch.

    x: [batch, dim]; y: [batch] int (single-label) or [batch, num_classes] float (multi-label);
    weight: [batch] 1 for real rows, 0 for padding.
    """
    per_row = _per_row_loss(params, x, y, multilabel, loss_over_classes)
    return jnp.sum(per_row * weight) / jnp.sum(weight)


@functools.partial(jax.jit, static_argnames=("multilabel", "loss_over_classes"))
def _evaluate_head(params, x, y, *, multilabel: bool, loss_over_classes: bool):
    """(logits [n, num_classes], mean loss) of the head on a whole split."""
    return head_logits(params, x), jnp.mean(_per_row_loss(params, x, y, multilabel, loss_over_classes))


@functools.partial(jax.jit, static_argnames=("batch_size", "multilabel", "loss_over_classes", "weight_decay"))
def train_epoch(params, opt_state, key, x, y, num_real, lr, *, batch_size: int, multilabel: bool,
                 loss_over_classes: bool = True, weight_decay: float = WEIGHT_DECAY):
    """One epoch of minibatch Adam over a fresh permutation of the real rows.

    x: [n_batches * batch_size, dim] train rows, the first `num_real` real and the rest padding;
    y: matching labels. The permutation puts the real rows first in random order and the padding
    last, so only the final minibatch is partly padding and its loss is the mean over its real
    rows — the same as a DataLoader with `drop_last=False`. `num_real` and `lr` are traced, so
    train sets with the same number of minibatches share one compilation, and a per-epoch
    learning-rate schedule does not recompile.
    Returns (params, opt_state, mean minibatch loss).
    """
    num_padded = x.shape[0]
    rows = jnp.arange(num_padded)
    sort_keys = jnp.where(rows < num_real, jax.random.uniform(key, (num_padded,)), 2.0)
    batches = jnp.argsort(sort_keys).reshape(num_padded // batch_size, batch_size)
    tx = probe_optimizer(lr, weight_decay)

    def step(carry, idx):
        params, opt_state = carry
        weight = (idx < num_real).astype(jnp.float32)
        loss, grads = jax.value_and_grad(_batch_loss)(params, x[idx], y[idx], weight, multilabel,
                                                      loss_over_classes)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), batches)
    return params, opt_state, losses.mean()


def epoch_learning_rates(lr: float, max_epochs: int, schedule: str = "constant",
                         final_lr_fraction: float = 1.0) -> np.ndarray:
    """Learning rate of each epoch, [max_epochs] float64 (epoch 1 first).

    "constant": `lr` throughout (EVAR, MATPAC). "cosine_per_epoch": X-ARES's
    `ignite.handlers.CosineAnnealingScheduler(start=lr, end=final_lr_fraction * lr,
    cycle_size=max_epochs)` fired at every EPOCH_STARTED (xares `src/xares/trainer.py` L122-131):
    epoch e gets lr + (end - lr) / 2 * (1 - cos(pi * (e - 1) / max_epochs)), so the last epoch
    stays just above `end`.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule={schedule!r}; valid: {LR_SCHEDULES}")
    if schedule == "constant":
        return np.full(max_epochs, float(lr))
    end = final_lr_fraction * lr
    progress = np.arange(max_epochs) / max_epochs
    return lr + (end - lr) / 2 * (1 - np.cos(np.pi * progress))


def _check_probe_inputs(name: str, x: np.ndarray, y: np.ndarray, *, multilabel: bool,
                        num_classes: int, dim: int | None = None) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name}_x must be [n, dim]; got shape {x.shape}")
    if len(x) == 0:
        raise ValueError(f"the {name} split is empty")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"{name}_x has dim {x.shape[1]} but train_x has dim {dim}")
    if len(y) != len(x):
        raise ValueError(f"{name}_x has {len(x)} rows but {name}_y has {len(y)}")
    expected = (len(x), num_classes) if multilabel else (len(x),)
    if y.shape != expected:
        raise ValueError(f"{name}_y must have shape {expected} "
                         f"({'multi-hot' if multilabel else 'int class ids'}); got {y.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name}_x has {int((~np.isfinite(x)).any(axis=1).sum())} rows with "
                         "NaN or inf")
    if not multilabel and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{name}_y class ids must lie in [0, {num_classes}); got range "
                         f"[{y.min()}, {y.max()}]")


def _check_probe_options(*, max_epochs, patience, batch_size, selection, head, lr_schedule) -> None:
    if max_epochs < 1 or (patience is not None and patience < 1):
        raise ValueError(f"max_epochs and patience must be >= 1 (patience may be None: no early "
                         f"stopping); got {max_epochs}, {patience}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"probe batch_size must be >= 1 or None (EVAR's min(200, n_train)); got {batch_size}")
    if selection not in SELECTIONS:
        raise ValueError(f"selection={selection!r}; valid: {SELECTIONS}")
    if head not in HEADS:
        raise ValueError(f"head={head!r}; valid: {HEADS}")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule={lr_schedule!r}; valid: {LR_SCHEDULES}")


def linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    valid_x: np.ndarray,
    valid_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    multilabel: bool,
    num_classes: int,
    seed: int,
    lr: float = DEFAULT_LR,
    max_epochs: int = MAX_EPOCHS,
    patience: int | None = PATIENCE,
    batch_size: int | None = None,
    selection: str = "best_val_metric",
    keep_later_tie: bool = True,
    head: str = "linear",
    standardize_inputs: bool = True,
    weight_decay: float = WEIGHT_DECAY,
    lr_schedule: str = "constant",
    final_lr_fraction: float = 1.0,
    loss_over_classes: bool = True,
    return_params: bool = False,
) -> dict[str, Any]:
    """A linear probe on one train/valid/test split; the defaults are EVAR's linear evaluation.

    Inputs are standardised with train statistics (`standardize_inputs`); the head (`"linear"`:
    one linear layer `[dim, num_classes]`; `"layernorm_linear"`: LayerNorm(dim) then the linear
    layer, X-ARES's "MLP") is trained with Adam (coupled `weight_decay`) on softmax cross-entropy
    (divided by the class count when `loss_over_classes`, as EVAR) or sigmoid BCE (multi-label),
    minibatches of `min(batch_size, n_train)` (`batch_size=None`: EVAR's `min(200, n_train)`),
    reshuffled every epoch, learning rate per epoch from `epoch_learning_rates`. After each epoch
    the validation metric and loss are computed and `selection` decides which weights score the
    test split:

    - "best_val_metric": the epoch with the highest validation accuracy (mAP for multi-label);
      of equal epochs the later (`keep_later_tie`, EVAR's `>=`) or the earlier (ignite's
      `Checkpoint`, X-ARES) is kept.
    - "best_val_loss": the epoch with the lowest validation loss (the training loss on the valid
      split, without weight decay); ties as above.
    - "last": the weights after the final epoch (no early stopping).

    Training stops after `patience` epochs in a row that saved no weights (None: never early), or
    at `max_epochs`.

    Args:
      train_x, valid_x, test_x: [n_split, dim] embeddings.
      train_y, valid_y, test_y: [n_split] int class ids, or [n_split, num_classes] multi-hot.
      multilabel: picks the loss (BCE vs CE) and the metric (mAP vs accuracy).
      num_classes: width of the linear layer.
      seed: initialisation and the per-epoch shuffles.
      lr: Adam learning rate (see DEFAULT_LR for why it is not EVAR's M2D 3e-5).
      return_params: also return the scored head's parameters (host arrays) as "params".
    Returns:
      {"test": test metric, "valid": validation metric of the scored epoch, "valid_loss": its
       validation loss, "epochs": epochs run, "best_epoch": 1-based epoch whose weights were scored}.
    """
    train_x, valid_x, test_x = (np.asarray(a) for a in (train_x, valid_x, test_x))
    train_y, valid_y, test_y = (np.asarray(a) for a in (train_y, valid_y, test_y))
    _check_probe_inputs("train", train_x, train_y, multilabel=multilabel, num_classes=num_classes)
    dim = train_x.shape[1]
    _check_probe_inputs("valid", valid_x, valid_y, multilabel=multilabel, num_classes=num_classes,
                        dim=dim)
    _check_probe_inputs("test", test_x, test_y, multilabel=multilabel, num_classes=num_classes,
                        dim=dim)
    _check_probe_options(max_epochs=max_epochs, patience=patience, batch_size=batch_size,
                         selection=selection, head=head, lr_schedule=lr_schedule)
    if standardize_inputs:
        train_x, valid_x, test_x = standardize(train_x, valid_x, test_x)
    else:
        train_x, valid_x, test_x = (a.astype(np.float32) for a in (train_x, valid_x, test_x))

    num_train = len(train_x)
    batch_size = min(MAX_BATCH_SIZE if batch_size is None else int(batch_size), num_train)
    num_batches = -(-num_train // batch_size)
    num_padded = num_batches * batch_size
    x_padded = np.zeros((num_padded, dim), np.float32)
    x_padded[:num_train] = train_x
    label_dtype = np.float32 if multilabel else np.int32
    y_padded = np.zeros((num_padded, num_classes) if multilabel else (num_padded,), label_dtype)
    y_padded[:num_train] = train_y
    x_padded, y_padded = jnp.asarray(x_padded), jnp.asarray(y_padded)
    valid_x_dev, valid_y_dev = jnp.asarray(valid_x), jnp.asarray(valid_y.astype(label_dtype))
    test_x_dev, test_y_dev = jnp.asarray(test_x), jnp.asarray(test_y.astype(label_dtype))
    evaluate = functools.partial(_evaluate_head, multilabel=multilabel, loss_over_classes=loss_over_classes)
    lrs = epoch_learning_rates(lr, max_epochs, lr_schedule, final_lr_fraction)

    init_key, shuffle_key = jax.random.split(jax.random.key(seed))
    params = init_head(init_key, dim, num_classes, head)
    opt_state = probe_optimizer(lr, weight_decay).init(params)

    best_value, best_params, best_epoch, best_valid, best_valid_loss = -np.inf, None, 0, np.nan, np.nan
    last_strict_gain = 0  # ties may also save weights, but only a gain means progress
    epochs_without_gain = 0
    epoch = 0
    for epoch in range(1, max_epochs + 1):
        params, opt_state, _ = train_epoch(
            params, opt_state, jax.random.fold_in(shuffle_key, epoch), x_padded, y_padded,
            num_train, jnp.float32(lrs[epoch - 1]), batch_size=batch_size, multilabel=multilabel,
            loss_over_classes=loss_over_classes, weight_decay=float(weight_decay))
        valid_logits, valid_loss = evaluate(params, valid_x_dev, valid_y_dev)
        valid_score = _score(valid_y, np.asarray(valid_logits), multilabel)
        valid_loss = float(valid_loss)
        value = {"best_val_metric": valid_score, "best_val_loss": -valid_loss, "last": float(epoch)}[selection]
        if value > best_value or (keep_later_tie and value == best_value):
            if value > best_value:
                last_strict_gain = epoch
            best_value, best_params, best_epoch = value, params, epoch
            best_valid, best_valid_loss = valid_score, valid_loss
            epochs_without_gain = 0
        else:
            epochs_without_gain += 1
            if selection != "last" and patience is not None and epochs_without_gain >= patience:
                break
    if (selection != "last" and patience is not None and epoch == max_epochs
            and last_strict_gain > max_epochs - patience):
        log.warning("linear probe was still improving at the %d-epoch cap (%d steps of lr %g); "
                    "a larger lr would likely score higher", max_epochs, max_epochs * num_batches,
                    float(lr))
    test_logits, _ = evaluate(best_params, test_x_dev, test_y_dev)
    result = {"test": _score(test_y, np.asarray(test_logits), multilabel), "valid": float(best_valid),
              "valid_loss": float(best_valid_loss), "epochs": epoch, "best_epoch": best_epoch}
    if return_params:
        result["params"] = jax.device_get(best_params)
    return result


# ----------------------------------------------------------------------------------------------
# kNN (X-ARES)


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


def _as_multi_hot(y: np.ndarray, num_classes: int, multilabel: bool) -> np.ndarray:
    """[n] class ids or [n, num_classes] multi-hot -> [n, num_classes] float32."""
    if multilabel:
        return np.asarray(y, dtype=np.float32)
    return np.eye(num_classes, dtype=np.float32)[np.asarray(y)]


def knn_class_scores(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    *,
    multilabel: bool,
    num_classes: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    block_elements: int = _KNN_BLOCK_ELEMENTS,
) -> np.ndarray:
    """Weighted kNN votes of each test clip for each class.

    Embeddings are L2-normalised; the k train clips with the highest cosine similarity vote with
    weights softmax(similarity / temperature) over those k. The similarity matrix is built in
    blocks of test rows with at most `block_elements` entries, so memory stays bounded for large
    train sets. `k` larger than the train set is cut to its size.

    Args:
      train_x: [n_train, dim]; train_y: [n_train] int or [n_train, num_classes] multi-hot.
      test_x: [n_test, dim].
    Returns:
      [n_test, num_classes] float64 votes; each row sums to the number of labels of its
      neighbours (1 for single-label).
    """
    train_hot = _as_multi_hot(train_y, num_classes, multilabel)
    train_unit = _l2_normalize(np.asarray(train_x, dtype=np.float32))
    test_unit = _l2_normalize(np.asarray(test_x, dtype=np.float32))
    k = min(k, len(train_unit))
    rows_per_block = max(1, block_elements // max(len(train_unit), k * num_classes))
    votes = np.empty((len(test_unit), num_classes), np.float64)
    for start in range(0, len(test_unit), rows_per_block):
        similarity = test_unit[start:start + rows_per_block] @ train_unit.T
        neighbours = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        top_sim = np.take_along_axis(similarity, neighbours, axis=1).astype(np.float64)
        logits = top_sim / temperature
        weights = np.exp(logits - logits.max(axis=1, keepdims=True))
        weights /= weights.sum(axis=1, keepdims=True)
        votes[start:start + len(similarity)] = np.einsum("nk,nkc->nc", weights,
                                                          train_hot[neighbours])
    return votes


def knn_score(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    *,
    multilabel: bool,
    num_classes: int,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
) -> float:
    """X-ARES's weighted kNN: accuracy of the argmax vote, or mAP of the votes (multi-label).

    Args:
      train_x: [n_train, dim]; train_y: [n_train] int or [n_train, num_classes] multi-hot.
      test_x: [n_test, dim]; test_y: [n_test] int or [n_test, num_classes] multi-hot.
    """
    train_x, test_x = np.asarray(train_x), np.asarray(test_x)
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    _check_probe_inputs("train", train_x, train_y, multilabel=multilabel, num_classes=num_classes)
    _check_probe_inputs("test", test_x, test_y, multilabel=multilabel, num_classes=num_classes,
                        dim=train_x.shape[1])
    votes = knn_class_scores(train_x, train_y, test_x, multilabel=multilabel,
                             num_classes=num_classes, k=k, temperature=temperature)
    return _score(test_y, votes, multilabel)


# ----------------------------------------------------------------------------------------------
# A whole task: splits, folds, seeds


def holdout_validation(labels: np.ndarray, train_idx: np.ndarray, *, multilabel: bool,
                       num_classes: int, fraction: float, rng: np.random.Generator
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Splits `train_idx` into (train, valid) with about `fraction` of it in valid.

    Every class present in `train_idx` stays present in the new train part. Single-label: each
    class with c clips gives round(fraction * c) of them to valid, at least 1 when c >= 2 and at
    most c - 1, so valid also covers every class with two or more clips (EVAR retries random
    splits until valid covers all classes; stratifying gets there directly). Multi-label: a random
    `fraction` of the clips, then clips are moved back to train until each class that had a
    positive in train still has one.

    Args:
      labels: [n] int or [n, num_classes] multi-hot, indexed by `train_idx`.
      train_idx: [n_train] row indices.
    Returns:
      (train indices, valid indices), each sorted.
    """
    train_idx = np.asarray(train_idx)
    if multilabel:
        shuffled = rng.permutation(train_idx)
        num_valid = max(1, int(round(fraction * len(shuffled))))
        valid, train = list(shuffled[:num_valid]), shuffled[num_valid:]
        hot = labels[train_idx].astype(bool)
        missing = hot.any(axis=0) & ~labels[train].astype(bool).any(axis=0)
        moved_back = []
        for cls in np.flatnonzero(missing):
            if labels[np.asarray(moved_back, dtype=int), cls].any():
                continue
            row = next(r for r in valid if labels[r, cls])
            valid.remove(row)
            moved_back.append(row)
        train = np.concatenate([train, np.asarray(moved_back, dtype=train.dtype)])
        valid = np.asarray(valid, dtype=train.dtype)
    else:
        train_parts, valid_parts = [], []
        for cls in np.unique(labels[train_idx]):
            members = rng.permutation(train_idx[labels[train_idx] == cls])
            count = len(members)
            num_valid = 0 if count < 2 else min(count - 1, max(1, int(round(fraction * count))))
            valid_parts.append(members[:num_valid])
            train_parts.append(members[num_valid:])
        train, valid = np.concatenate(train_parts), np.concatenate(valid_parts)
    if len(valid) == 0 or len(train) == 0:
        raise ValueError(f"cannot hold out a validation set from {len(train_idx)} training clips "
                         f"(fraction {fraction}); the task needs more training data or a 'valid' "
                         "split")
    return np.sort(train), np.sort(valid)


def confidence_interval_95(scores) -> float:
    """Half-width of the 95 % Student-t interval of the mean of `scores`.

    t_{0.975, n-1} * std(ddof=1) / sqrt(n): with 3 seeds t = 4.30, not the normal 1.96, since the
    spread is itself estimated from 3 values. NaN for a single score.
    """
    scores = np.asarray(scores, dtype=np.float64)
    n = len(scores)
    if n < 2:
        return float("nan")
    return float(scipy.stats.t.ppf(0.975, n - 1) * scores.std(ddof=1) / math.sqrt(n))


def wilson_interval_95(correct: int, n: int) -> tuple[float, float]:
    """Wilson's 95 % score interval of an accuracy of `correct` right answers out of `n` test clips.

    The test set's own sampling error, which the seeds' interval leaves out: with 45 test clips an accuracy of
    58 % spans about 43-71 %. (p + z²/2n ± z √(p(1-p)/n + z²/4n²)) / (1 + z²/n), z = 1.96.
    """
    z = float(scipy.stats.norm.ppf(0.975))
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def fold_mean_interval_95(correct, sizes) -> tuple[float, float]:
    """95 % interval of the mean over folds of per-fold accuracies `correct[i] / sizes[i]` (disjoint test folds).

    Normal approximation with Agresti-Coull's adjusted counts per fold (c + z²/2 of n + z², so that a fold at
    0 % or 100 % still has a spread): mean ± z √(Σ p̃(1 - p̃) / ñ) / K, clipped to [0, 1]. The centre is the
    plain mean of the folds' accuracies, the score reported."""
    z = float(scipy.stats.norm.ppf(0.975))
    correct, sizes = np.asarray(correct, np.float64), np.asarray(sizes, np.float64)
    mean = float(np.mean(correct / sizes))
    adjusted_n = sizes + z * z
    adjusted_p = (correct + z * z / 2) / adjusted_n
    half = z * math.sqrt(float(np.sum(adjusted_p * (1 - adjusted_p) / adjusted_n))) / len(sizes)
    return max(0.0, mean - half), min(1.0, mean + half)


def _class_counts(labels: np.ndarray, idx: np.ndarray, multilabel: bool, num_classes: int):
    if multilabel:
        return labels[idx].astype(bool).sum(axis=0)
    return np.bincount(labels[idx], minlength=num_classes)


def _check_task_inputs(embeddings, labels, splits, *, multilabel: bool, num_classes: int) -> None:
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be [n_clips, dim]; got shape {embeddings.shape}")
    n = len(embeddings)
    if n == 0:
        raise ValueError("no clips: embeddings is empty")
    if len(labels) != n or len(splits) != n:
        raise ValueError(f"one row per clip is needed: embeddings has {n} rows, labels "
                         f"{len(labels)}, splits {len(splits)}")
    bad_rows = np.flatnonzero(~np.isfinite(embeddings).all(axis=1))
    if len(bad_rows):
        raise ValueError(f"embeddings contain NaN or inf in {len(bad_rows)} of {n} clips "
                         f"(first rows: {bad_rows[:5].tolist()})")
    if multilabel:
        if labels.shape != (n, num_classes):
            raise ValueError(f"multi-label labels must be multi-hot [n_clips, num_classes] = "
                             f"{(n, num_classes)}; got {labels.shape}")
        if not np.isin(labels, (0, 1)).all():
            raise ValueError("multi-label labels must contain only 0 and 1")
    else:
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"single-label labels must be int class ids [n_clips]; got dtype "
                             f"{labels.dtype}, shape {labels.shape}")
        if labels.min() < 0 or labels.max() >= num_classes:
            raise ValueError(f"class ids must lie in [0, {num_classes}); got range "
                             f"[{labels.min()}, {labels.max()}]")
    if splits.ndim != 1:
        raise ValueError(f"splits must be [n_clips]; got shape {splits.shape}")


def check_splits(labels: np.ndarray, splits: np.ndarray, *, multilabel: bool, num_classes: int) -> None:
    """Raises the ValueError evaluate_task would raise for these labels and splits (an empty 'train' or
    'test' split, fewer than 2 folds, a test class never seen in training), without embedding anything:
    for checking a task when it is configured rather than when it is first evaluated."""
    labels = np.asarray(labels)
    for plan in _plan_splits(np.asarray(splits))[0]:
        _check_class_coverage(labels, plan, multilabel=multilabel, num_classes=num_classes)


def _plan_splits(splits: np.ndarray) -> tuple[list, bool]:
    """[(fold id or None, train idx, valid idx or None, test idx)], and whether splits are folds."""
    if splits.dtype.kind in "USO":
        names = splits.astype(str)
        unknown = sorted(set(np.unique(names)) - {"train", "valid", "test"})
        if unknown:
            raise ValueError(f"split names must be 'train', 'valid' or 'test'; got {unknown}")
        train, valid, test = (np.flatnonzero(names == s) for s in ("train", "valid", "test"))
        for name, idx in (("train", train), ("test", test)):
            if len(idx) == 0:
                raise ValueError(f"the '{name}' split is empty")
        return [(None, train, valid if len(valid) else None, test)], False
    if splits.dtype.kind in "iu":
        folds = np.unique(splits)
        if len(folds) < 2:
            raise ValueError(f"cross-validation needs at least 2 folds; got folds {folds.tolist()}")
        return [(int(f), np.flatnonzero(splits != f), None, np.flatnonzero(splits == f))
                for f in folds], True
    raise ValueError(f"splits must be strings ('train'/'valid'/'test') or int fold ids; got dtype "
                     f"{splits.dtype}")


def _check_class_coverage(labels, plan, *, multilabel: bool, num_classes: int) -> None:
    fold, train, valid, test = plan
    where = "" if fold is None else f" (test fold {fold})"
    train_counts = _class_counts(labels, train, multilabel, num_classes)
    test_counts = _class_counts(labels, test, multilabel, num_classes)
    unseen = np.flatnonzero((test_counts > 0) & (train_counts == 0))
    if len(unseen):
        detail = ", ".join(f"class {c}: {test_counts[c]} test / 0 train clips" for c in unseen[:10])
        raise ValueError(f"{len(unseen)} class(es) appear in test but never in train{where}, which "
                         f"no probe can predict: {detail}. Drop those clips or fix the split.")
    if valid is not None:
        valid_counts = _class_counts(labels, valid, multilabel, num_classes)
        unseen = np.flatnonzero((valid_counts > 0) & (train_counts == 0))
        if len(unseen):
            log.warning("classes %s appear in valid but not in train%s", unseen[:10].tolist(),
                        where)


def evaluate_task(
    embeddings: np.ndarray,
    labels: np.ndarray,
    splits: np.ndarray,
    *,
    multilabel: bool,
    num_classes: int,
    seeds=SEEDS,
    lr: float = DEFAULT_LR,
    k: int = KNN_K,
    temperature: float = KNN_TEMPERATURE,
    valid_fraction: float = VALID_FRACTION,
    run_linear: bool = True,
    run_knn: bool = True,
    linear_options: dict | None = None,
    test_embeddings: np.ndarray | None = None,
) -> dict[str, Any]:
    """Linear probe (one run per seed) and kNN on one task.

    `splits` is either a string array of 'train' / 'valid' / 'test' per clip, or an int fold id
    per clip for leave-one-fold-out cross-validation (each fold is the test set once, the others
    are the training set; the task score is the mean over folds). Where the task has no 'valid'
    split (fold tasks, or fixed splits without one), each seed holds out its own `valid_fraction`
    of the training clips with `holdout_validation` for model selection; the test clips are never
    used to select. kNN uses the whole training set (no hold-out) and is deterministic, so it runs
    once per fold.

    Args:
      embeddings: [n_clips, dim] float32.
      labels: [n_clips] int class ids, or [n_clips, num_classes] multi-hot when `multilabel`.
      splits: [n_clips] str split names or int fold ids.
      run_linear: False skips the linear probe (kNN only, e.g. for frequent checks during
        training); "linear" is then None.
      run_knn: False skips kNN; "knn" is then None.
      linear_options: keyword arguments of `linear_probe` beyond the data, seed and lr (batch_size,
        selection, head, ...; a protocol's `linear_options()`).
      test_embeddings: [n_clips, dim] embeddings to score the test rows with, where they differ
        from the training ones (EVAR crops a long clip at random for train/valid and from its
        start for test, and in a fold task each clip is both); None: `embeddings`.
    Returns:
      {"metric": "accuracy" | "mAP",
       "linear": {"metric", "lr", "mean", "ci95", "std", "validation",
                  "per_seed": [score per seed (mean over folds)],
                  "per_fold": [mean over seeds per fold] (fold tasks), "folds": [fold ids],
                  "runs": [{"seed", "fold", "test", "valid", "valid_loss", "epochs", "best_epoch"}]},
       "knn": {"metric", "mean", "per_fold" (fold tasks), "folds", and for accuracy "test_interval95" (Wilson's
               [low, high] over the test clips: `wilson_interval_95`; folds: `fold_mean_interval_95`) and
               "test_clips"}}.
      `validation` says which clips selected the model: "valid split", or the held-out share of
      the training clips. `ci95` is the Student-t half-width over the per-seed scores
      (`confidence_interval_95`); NaN (as is `std`) with a single seed.
    Raises:
      ValueError: mismatched lengths, NaN/inf embeddings, bad labels, an empty split, fewer than
        two folds, or a class that occurs in a test set but not in its training set.
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    labels = np.asarray(labels)
    splits = np.asarray(splits)
    _check_task_inputs(embeddings, labels, splits, multilabel=multilabel, num_classes=num_classes)
    if test_embeddings is None:
        test_embeddings = embeddings
    else:
        test_embeddings = np.asarray(test_embeddings, dtype=np.float32)
        if test_embeddings.shape != embeddings.shape:
            raise ValueError(f"test_embeddings must match embeddings' shape {embeddings.shape}; got "
                             f"{test_embeddings.shape}")
        _check_task_inputs(test_embeddings, labels, splits, multilabel=multilabel, num_classes=num_classes)
    linear_options = dict(linear_options or {})
    if not (run_linear or run_knn):
        raise ValueError("run_linear and run_knn are both False: no probe to run")
    if multilabel:
        labels = labels.astype(np.float32)
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise ValueError("seeds is empty; give at least one seed")
    plans, is_folds = _plan_splits(splits)
    for plan in plans:
        _check_class_coverage(labels, plan, multilabel=multilabel, num_classes=num_classes)

    metric = _metric_name(multilabel)
    runs = []
    knn_per_plan = []
    for plan_index, (fold, train, valid, test) in enumerate(plans):
        if run_knn:
            knn_per_plan.append(knn_score(
                embeddings[train], labels[train], test_embeddings[test], labels[test],
                multilabel=multilabel, num_classes=num_classes, k=k, temperature=temperature))
        for seed in seeds if run_linear else ():
            fit, held_out = train, valid
            if held_out is None:
                rng = np.random.default_rng((seed, plan_index))
                fit, held_out = holdout_validation(labels, train, multilabel=multilabel,
                                                   num_classes=num_classes,
                                                   fraction=valid_fraction, rng=rng)
            result = linear_probe(
                embeddings[fit], labels[fit], embeddings[held_out], labels[held_out],
                test_embeddings[test], labels[test], multilabel=multilabel, num_classes=num_classes,
                seed=seed, lr=lr, **linear_options)
            runs.append({"seed": seed, "fold": fold, **result})
            log.info("linear probe seed %d%s: test %s %.4f (valid %.4f, %d epochs)", seed,
                     "" if fold is None else f" fold {fold}", metric, result["test"],
                     result["valid"], result["epochs"])

    folds = [plan[0] for plan in plans]
    knn = None
    if run_knn:
        knn = {"metric": metric, "mean": float(np.mean(knn_per_plan))}
        if is_folds:
            knn.update(per_fold=list(map(float, knn_per_plan)), folds=folds)
        if not multilabel:  # the test clips' sampling error
            sizes = [len(plan[3]) for plan in plans]
            correct = [round(score * n) for score, n in zip(knn_per_plan, sizes)]
            interval = (wilson_interval_95(correct[0], sizes[0]) if len(plans) == 1
                        else fold_mean_interval_95(correct, sizes))
            knn.update(test_interval95=list(interval), test_clips=sum(sizes))
    linear = None
    if run_linear:
        test_scores = np.array([r["test"] for r in runs]).reshape(len(plans), len(seeds))
        per_seed = test_scores.mean(axis=0)
        has_valid = all(plan[2] is not None for plan in plans)
        validation = ("valid split" if has_valid else
                      f"{valid_fraction:.0%} of the training clips held out per seed"
                      f"{' and fold' if is_folds else ''} (stratified; the task has no valid split)")
        linear = {"metric": metric, "lr": float(lr), "mean": float(per_seed.mean()),
                  "ci95": confidence_interval_95(per_seed),
                  "std": float(per_seed.std(ddof=1)) if len(seeds) > 1 else float("nan"),
                  "validation": validation, "per_seed": per_seed.tolist(), "runs": runs}
        if is_folds:
            linear.update(per_fold=test_scores.mean(axis=1).tolist(), folds=folds)
    return {"metric": metric, "linear": linear, "knn": knn}
