r"""Probe protocols: how each benchmark trains and scores its probes, as data.

    python -m audiojepa.evaluate --protocol=evar --encoder=/ckpt/m2d/export --task=/data/tasks/esc50 --output=/tmp/e
    python -m audiojepa.evaluate --protocol=matpac --encoder=/ckpt/matpac/export --task=/data/tasks/gtzan \
        --output=/tmp/m
    python -m audiojepa.evaluate --protocol=xares  --encoder=/ckpt/audio_jepa/export --task=/data/tasks/esc50 \
        --output=/tmp/x

A `Protocol` holds every value that decides a probe score: the linear probe's learning rate, minibatch,
epochs, early stopping, model-selection rule, head, input scaling, weight decay and schedule; the seeds and
the confidence level; the per-task crop length (`unit_sec`); which probes run and the kNN settings.
`resolve(name, **overrides)` returns one, with the command line's explicit `--lr`, `--seeds`,
`--probe_batch_size` and `--unit_sec` replacing the protocol's values (and listed in `overridden`).
`results.json` records `as_record()` under each task's "protocol", with the task's resolved `unit_sec`.

Sources. "ref" = shared/reference/eval_protocols.md (line numbers of that file), which reads
nttcslab/eval-audio-repr (EVAR, HEAD 88ba772) and jimbozhang/xares (HEAD 161f0ef). Papers:
quelennec2025_matpac.txt ("MATPAC", line 50-51, "Linear probing evaluation"), riou2024_jepa_design_choices.txt
("Riou", line 113, "Linear evaluation details"), tuncay2025_audio_jepa.txt ("Audio-JEPA", §III.C
"Evaluation"). "silent": no source states the value; the value shown is this codebase's choice.

| value | default (no --protocol) | evar (M2D, Riou et al.) | matpac | xares (Audio-JEPA) |
|---|---|---|---|---|
| lr | 1e-3 (probes.DEFAULT_LR: why) | 3e-5: M2D's `lr_lineareval` (ref L45-46) | 1e-4: issue 21 item 9; the digits are lost from our paper text (MATPAC L50 "a learning rate of with an ADAM optimizer") | 1e-3 (ref L144; xares task.py `learning_rate`) |
| probe batch | min(200, n_train) | min(200, n_train) (ref L47) | 128 (MATPAC L50) | 32 (ref L145; Speech Commands V1 uses 64 there: pass --probe_batch_size=64) |
| epochs | <= 200 | <= 200 (ref L50) | <= 200: silent (EVAR's cap) | 10 (ref L145) |
| early stopping | patience 20 | patience 20 on the valid metric (ref L50) | patience 20 on the valid loss: silent | none: all 10 epochs (ref L145) |
| selection | best valid metric, later of ties | best valid accuracy/mAP, weights restored, later of ties (`>=`) (ref L50-51) | best valid **loss** (MATPAC L50) | best valid metric, earlier of ties (ignite `Checkpoint`, strict `>`; xares trainer.py L189-199) (ref L145-146) |
| validation clips | valid split, else 10% of train | valid split, else 10% of the training folds (ref L53-54) | valid split; fold tasks (ESC-50, US8K): silent, 10% of train | valid split; fold tasks: X-ARES selects **on the test fold** (ref L147-148), not reproduced: 10% of train |
| head | Linear | Linear (ref L41-42) | Linear, "a single fully connected layer" (MATPAC L50) | LayerNorm(D) -> Linear (ref L143; xares models/simple.py) |
| input scaling | StandardScaler (train) | StandardScaler (train) (ref L43-44) | StandardScaler: silent | none (the LayerNorm) (ref L188) |
| weight decay | 1e-8 (coupled) | 1e-8 (ref L45) | 0: silent ("an ADAM optimizer", torch's default 0) | 0 (torch.optim.Adam default; xares trainer.py L104) |
| lr schedule | constant | constant (ref L51-52) | constant: silent | cosine per epoch, lr -> 0.1 lr (ref L145; xares trainer.py L122-131) |
| CE scale | CE / n_classes | CE / n_classes (ref L48-49) | CE: silent | CE (torch CrossEntropyLoss) |
| seeds | 42, 43, 44 | 42, 43, 44, mean (ref L57-58) | 5 runs (MATPAC L50); seed values silent: 42..46 | 1 run (ref L191); seed silent: 42 |
| interval | 95% Student t | none reported (mean only, ref L58); we show 95% t | 95% CI: issue 21 item 9; the level's digits are lost from our paper text (MATPAC L50 "CI at .") | none (1 run) |
| unit_sec | whole clip | per task: EVAR's ds_tasks table (ref L61-76), or the task's task.json | whole clip: silent (the encoder splits > 6 s clips into 6 s chunks, MATPAC L51) | whole clip (ref L139: X-ARES's `crop_length` chunks the encoder input, no crop) |
| crop | – | random start for train/valid, start 0 for test, zero-pad at the end (ref L27-29) | – | – |
| probes | linear + kNN | linear (EVAR has no kNN) | linear | linear + kNN, k 10, T 0.07 (ref L149-152; Audio-JEPA §III.C) |
| kNN on multi-label | yes (mAP of votes) | – | – | no: X-ARES skips it (`do_knn=False`, ref L152) |

Riou et al. state no probe hyper-parameter (Riou L113: a linear classifier on the frozen context encoder's
3840-d time-mean); their released code runs a vendored EVAR (`evar/` in SonyCSLParis/audio-representations,
shared/reference/jepa_family.md L132-134), hence `evar`. The M2D paper is not in shared/papers;
its numbers come from EVAR (ref L45-46, `config/m2d.yaml`). MATPAC releases no probe code
(aurianworld/matpac holds training and inference code only), so `matpac` follows the paper text alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from audiojepa.evaluation import probes

PER_TASK = "per_task"  # unit_sec policy: each task's own crop length (EVAR)
PROBES = ("linear", "knn")
# Command-line flags that replace a protocol's value when given (evaluate.py), by Protocol field.
OVERRIDABLE = ("lr", "seeds", "probe_batch_size", "unit_sec")

# EVAR's per-task crop length in seconds (`evar/ds_tasks.py`, ref L61-76), by EVAR task name; a task
# folder named so gets it under --protocol=evar.
EVAR_UNIT_SEC = {
    "esc50": 5.0, "us8k": 4.0, "spcv2": 1.0, "spcv1": 1.0, "vc1": 8.2, "voxforge": 5.8, "cremad": 2.5,
    "cremad_gender": 2.5, "gtzan": 30.0, "nsynth": 4.0, "nspitch": 4.0, "nsvelocity": 4.0, "surge": 4.0,
    "fsd50k": 7.6358,
}


@dataclasses.dataclass(frozen=True)
class Protocol:
    """Every value that decides a probe score (see the module docstring for the sources).

    Attributes:
      name: "default", "evar", "matpac" or "xares".
      used_by: the papers evaluated with it.
      lr: Adam learning rate of the linear probe.
      probe_batch_size: linear-probe minibatch (clips); None = EVAR's min(200, n_train).
      max_epochs, patience: epoch cap; epochs without saved weights before stopping (None: never).
      selection: probes.SELECTIONS: "best_val_metric" (accuracy, or mAP for multi-label tasks),
        "best_val_loss" or "last".
      keep_later_tie: of epochs with equal validation values, keep the later one (EVAR) or the first.
      head: probes.HEADS: "linear" or "layernorm_linear".
      standardize_inputs: StandardScaler fitted on the training embeddings.
      weight_decay: coupled (torch Adam) weight decay.
      lr_schedule, final_lr_fraction: probes.LR_SCHEDULES; the cosine ends near final_lr_fraction * lr.
      loss_over_classes: single-label CE divided by the class count (EVAR's loss).
      seeds: one linear probe per seed; the score is their mean.
      ci_level: confidence level of the Student-t interval over the seeds.
      unit_sec: crop length (s): None = whole clips, PER_TASK = each task's (EVAR), or seconds.
      crop_seed: seeds the random crop start of each train/valid clip (one draw per clip).
      probes: which of PROBES run.
      knn_k, knn_temperature: X-ARES's weighted kNN.
      knn_on_multilabel: run kNN on multi-label tasks too (scored with mAP of the votes).
      valid_fraction: share of the training clips held out for selection when a task has no valid split.
      overridden: the fields the command line replaced.
    """

    name: str
    used_by: str
    lr: float
    probe_batch_size: int | None
    max_epochs: int
    patience: int | None
    selection: str
    keep_later_tie: bool
    head: str
    standardize_inputs: bool
    weight_decay: float
    lr_schedule: str
    final_lr_fraction: float
    loss_over_classes: bool
    seeds: tuple[int, ...]
    ci_level: float
    unit_sec: float | str | None
    probes: tuple[str, ...]
    knn_k: int = probes.KNN_K
    knn_temperature: float = probes.KNN_TEMPERATURE
    knn_on_multilabel: bool = True
    valid_fraction: float = probes.VALID_FRACTION
    crop_seed: int = 0
    overridden: tuple[str, ...] = ()

    def __post_init__(self):
        if self.selection not in probes.SELECTIONS:
            raise ValueError(f"protocol {self.name}: selection={self.selection!r}; valid: {probes.SELECTIONS}")
        if self.head not in probes.HEADS:
            raise ValueError(f"protocol {self.name}: head={self.head!r}; valid: {probes.HEADS}")
        if self.lr_schedule not in probes.LR_SCHEDULES:
            raise ValueError(f"protocol {self.name}: lr_schedule={self.lr_schedule!r}; valid: {probes.LR_SCHEDULES}")
        if not self.probes or set(self.probes) - set(PROBES):
            raise ValueError(f"protocol {self.name}: probes={self.probes!r}; a non-empty subset of {PROBES}")
        if not self.seeds:
            raise ValueError(f"protocol {self.name}: seeds is empty (--seeds needs at least one)")
        if not self.lr > 0:
            raise ValueError(f"protocol {self.name}: lr={self.lr} (--lr) must be > 0")
        if self.probe_batch_size is not None and self.probe_batch_size < 1:
            raise ValueError(f"protocol {self.name}: probe_batch_size={self.probe_batch_size} "
                             "(--probe_batch_size) must be >= 1")
        if not (self.unit_sec is None or self.unit_sec == PER_TASK
                or (isinstance(self.unit_sec, (int, float)) and self.unit_sec > 0)):
            raise ValueError(f"protocol {self.name}: unit_sec={self.unit_sec!r} (--unit_sec); valid: seconds > 0, "
                             f"{PER_TASK!r} or None (whole clips)")

    def linear_options(self) -> dict[str, Any]:
        """`probes.linear_probe` keyword arguments (besides data, seed and lr)."""
        return {"max_epochs": self.max_epochs, "patience": self.patience, "batch_size": self.probe_batch_size,
                "selection": self.selection, "keep_later_tie": self.keep_later_tie, "head": self.head,
                "standardize_inputs": self.standardize_inputs, "weight_decay": self.weight_decay,
                "lr_schedule": self.lr_schedule, "final_lr_fraction": self.final_lr_fraction,
                "loss_over_classes": self.loss_over_classes}

    def as_record(self) -> dict[str, Any]:
        """Every value as JSON types (for results.json)."""
        record = dataclasses.asdict(self)
        record["seeds"] = list(self.seeds)
        record["probes"] = list(self.probes)
        record["overridden"] = list(self.overridden)
        record["probe_batch_size"] = (self.probe_batch_size if self.probe_batch_size is not None
                                      else f"min({probes.MAX_BATCH_SIZE}, n_train)")
        return record


_EVAR_PROBE = dict(probe_batch_size=None, max_epochs=probes.MAX_EPOCHS, patience=probes.PATIENCE,
                   selection="best_val_metric", keep_later_tie=True, head="linear", standardize_inputs=True,
                   weight_decay=probes.WEIGHT_DECAY, lr_schedule="constant", final_lr_fraction=1.0,
                   loss_over_classes=True)

PROTOCOLS: dict[str, Protocol] = {
    "default": Protocol(name="default", used_by="this codebase's own setting (EVAR's probe at lr 1e-3, plus kNN)",
                        lr=probes.DEFAULT_LR, seeds=probes.SEEDS, ci_level=0.95, unit_sec=None,
                        probes=("linear", "knn"), **_EVAR_PROBE),
    "evar": Protocol(name="evar", used_by="M2D (EVAR) and Riou et al. (vendored EVAR)",
                     lr=3e-5, seeds=(42, 43, 44), ci_level=0.95, unit_sec=PER_TASK, probes=("linear",),
                     **_EVAR_PROBE),
    "matpac": Protocol(name="matpac", used_by="MATPAC (Quelennec et al. 2025, 'Linear probing evaluation')",
                       lr=1e-4, probe_batch_size=128, max_epochs=probes.MAX_EPOCHS, patience=probes.PATIENCE,
                       selection="best_val_loss", keep_later_tie=False, head="linear", standardize_inputs=True,
                       weight_decay=0.0, lr_schedule="constant", final_lr_fraction=1.0, loss_over_classes=False,
                       seeds=(42, 43, 44, 45, 46), ci_level=0.95, unit_sec=None, probes=("linear",)),
    "xares": Protocol(name="xares", used_by="Audio-JEPA (X-ARES: linear probe and kNN)",
                      lr=1e-3, probe_batch_size=32, max_epochs=10, patience=None, selection="best_val_metric",
                      keep_later_tie=False, head="layernorm_linear", standardize_inputs=False, weight_decay=0.0,
                      lr_schedule="cosine_per_epoch", final_lr_fraction=0.1, loss_over_classes=False,
                      seeds=(42,), ci_level=0.95, unit_sec=None, probes=("linear", "knn"),
                      knn_on_multilabel=False),
}
NAMES = tuple(PROTOCOLS)


def resolve(name: str | None = None, **overrides) -> Protocol:
    """The protocol `name` (None: "default") with `overrides` (fields of OVERRIDABLE) replacing its values.

    `seeds` may be any iterable of ints; `unit_sec` seconds, PER_TASK or None. The replaced fields are
    listed in `overridden`.
    """
    name = name or "default"
    if name not in PROTOCOLS:
        raise ValueError(f"--protocol={name!r}; valid: {', '.join(NAMES)}")
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        raise ValueError(f"cannot override {unknown} from the command line; overridable: {OVERRIDABLE}")
    if "seeds" in overrides:
        overrides["seeds"] = tuple(int(s) for s in overrides["seeds"])
    if "lr" in overrides:
        overrides["lr"] = float(overrides["lr"])
    if isinstance(overrides.get("unit_sec"), int):
        overrides["unit_sec"] = float(overrides["unit_sec"])
    return dataclasses.replace(PROTOCOLS[name], overridden=tuple(sorted(overrides)), **overrides)


def task_unit_sec(protocol: Protocol, task_name: str, task_unit_sec_value: float | None) -> tuple[float | None, str]:
    """(crop length in seconds or None for whole clips, where it came from) for one task.

    Order: a fixed `protocol.unit_sec` (from --unit_sec, or the protocol); under PER_TASK the task's own
    (`task.json` in its folder), then EVAR's table by task name. PER_TASK with neither is an error: EVAR
    gives every task a crop length and guessing one would change the score.
    """
    if protocol.unit_sec is None:
        return None, "whole clips"
    if protocol.unit_sec != PER_TASK:
        source = "--unit_sec" if "unit_sec" in protocol.overridden else f"protocol {protocol.name}"
        return float(protocol.unit_sec), source
    if task_unit_sec_value is not None:
        return float(task_unit_sec_value), "task.json"
    if task_name in EVAR_UNIT_SEC:
        return EVAR_UNIT_SEC[task_name], "EVAR evar/ds_tasks.py"
    raise ValueError(f"--protocol={protocol.name} crops every clip to its task's unit_sec, and task {task_name!r} "
                     f"has none: it is not one of EVAR's tasks ({', '.join(sorted(EVAR_UNIT_SEC))}) and has no "
                     "task.json with a unit_sec. Write {\"unit_sec\": <seconds>} to <task folder>/task.json, or pass "
                     "--unit_sec=<seconds> for all tasks")
