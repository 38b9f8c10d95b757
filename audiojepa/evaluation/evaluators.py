"""Periodic evaluation during training, configured in `config.evals`.

    config.evals.knn_embedded = dict(type="knn", task="embedded", every_steps=100)
    config.evals.probe_esc50 = dict(type="linear", task="/data/tasks/esc50", every_steps=5000, seeds=(42,), lr=1e-3)
    config.evals.knn_layer3 = dict(type="knn", task="embedded", every_steps=100, layer=3)

Each evaluator takes the frozen evaluated encoder and yields `(name, value)` pairs; the trainer logs
them as `eval/<config key>/<name>` with the training metrics. The optional `layer` (an int; default: the
final output) is the encoder layer that embeds (audiojepa/models/encoder_layers.py). The task (clip list,
labels, splits) is loaded and checked once, when the evaluator is built; its audio is decoded at each
evaluation, streamed in batches (embedders.embed_task).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from audiojepa.evaluation import embedders, probes, tasks
from audiojepa.models import encoder_layers

TYPES = ("knn", "linear")


class TaskEvaluator:
    """kNN and/or linear-probe scores of an encoder on one task."""

    def __init__(self, task_spec: str, *, sample_rate: int, kind: str = "knn", seeds=(42,), batch_size: int = 32,
                 name: str = "*", lr: float = probes.DEFAULT_LR, layer: int | None = None,
                 num_layers: int | None = None):
        """Loads the task and checks its splits now (not at the first evaluation, maybe days into a run);
        errors name `config.evals.<name>`. `layer`: the encoder layer that embeds (None: the final output),
        checked against `num_layers` (the encoder's depth) when given."""
        if kind not in TYPES:
            raise ValueError(f"config.evals.{name}.type={kind!r}; valid: {TYPES}")
        if layer is not None:
            try:
                if isinstance(layer, bool) or not isinstance(layer, int):
                    raise ValueError("an int (0-based block, negative from the end) or None (the final output)")
                if num_layers is not None:
                    encoder_layers.check_layer(layer, num_layers)
            except ValueError as e:
                raise ValueError(f"config.evals.{name}.layer={layer!r}: {e}") from None
        self.layer = layer
        self.kind = kind
        self.seeds = tuple(seeds)
        self.batch_size = batch_size
        self.lr = float(lr)
        self.task = tasks.load_task(task_spec, sample_rate=sample_rate)
        try:
            probes.check_splits(self.task.label_array(), self.task.splits, multilabel=self.task.multilabel,
                                num_classes=len(self.task.classes))
        except ValueError as e:
            raise ValueError(f"config.evals.{name}.task={task_spec!r}: {e}") from e

    def run(self, audio_encoder) -> Iterator[tuple[str, float]]:
        """Scores of `audio_encoder` (an AudioEncoder, embedding at this evaluator's layer)."""
        if self.layer is not None:
            audio_encoder = audio_encoder.with_layer(self.layer)
        embedder = embedders.EncoderEmbedder(audio_encoder, name="online encoder")
        emb, kept = embedders.embed_task(embedder, self.task, batch_size=self.batch_size)
        labels = self.task.label_array()[kept]
        splits = np.asarray(self.task.splits)[kept]
        result = probes.evaluate_task(emb, labels, splits, multilabel=self.task.multilabel,
                                      num_classes=len(self.task.classes), seeds=self.seeds,
                                      run_linear=self.kind == "linear", lr=self.lr)
        yield "knn", float(result["knn"]["mean"])
        if self.kind == "linear":
            yield "linear", float(result["linear"]["mean"])


def from_config(evals_config, *, sample_rate: int, num_layers: int | None = None
                ) -> list[tuple[str, int, TaskEvaluator]]:
    """[(name, every_steps, evaluator)] for each entry of `config.evals`; `num_layers` (the evaluated encoder's
    depth), when given, checks each entry's `layer` now."""
    out = []
    for name, cfg in (evals_config or {}).items():
        try:
            every = int(cfg.get("every_steps", 0))
        except (TypeError, ValueError):
            every = 0
        if every <= 0:
            raise ValueError(f"config.evals.{name}.every_steps={cfg.get('every_steps')!r}; it must be an int > 0")
        if "task" not in cfg:
            raise ValueError(f"config.evals.{name}.task is missing (a task folder, shard set, 'embedded' or 'tfds:NAME')")
        out.append((name, every, TaskEvaluator(cfg["task"], sample_rate=sample_rate, kind=cfg.get("type", "knn"),
                                               seeds=tuple(cfg.get("seeds", (42,))),
                                               batch_size=int(cfg.get("batch_size", 32)), name=name,
                                               lr=float(cfg.get("lr", probes.DEFAULT_LR)),
                                               layer=cfg.get("layer"), num_layers=num_layers)))
    return out
