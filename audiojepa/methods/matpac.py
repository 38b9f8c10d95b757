"""MATPAC (Quelennec et al.): M2D's masked latent prediction plus a DINO-style classification of the masks.

The M2D branch is unchanged (online encoder on the visible patches, predictor, EMA target stack on the
masked patches; audiojepa.methods.m2d). On top, a classification head (audiojepa.models.cls_head) maps
every *predicted* masked token (student) and every *target* token (teacher head, an EMA of the student
head) to K prototype logits; the student learns the centred, sharpened teacher distribution
(audiojepa.ops.distillation). Loss = (1 - α)·L_cls + α·L_pred. Facts and line references:
shared/reference/jepa_family.md §4; where the paper and the code differ, the choice is a config key
(configs/matpac.py sets them per `recipe`).

M2D's optional `pos_embed` key applies as in M2D: "learned" (the paper's §III) gives the encoder and the
predictor trainable tables; the teacher's inputs carry the student's table (the paper adds p before the split
into visible and masked patches; the code shares patch embedding, CLS and positions between the two), so
target_params holds no table of its own. "sincos" is the code's fixed tables.

Model config keys, beyond M2D's (`default_config()` has the MATPAC code's values):
    num_prototypes, head_hidden_dim, head_bottleneck_dim, head_layers: head sizes (2048, 2048, 256, 3).
    train_prototype_gain: train the weight-norm gain (MATPAC code: True) or freeze it (DINO: False).
    student_temp: T_s (0.1).
    teacher_temp_init, teacher_temp, teacher_temp_warmup_epochs: T_t warms up linearly from the first to
        the second over that many epochs (0.04 → 0.07 over 10), then stays.
    center_momentum: the centre's EMA momentum (0.9).
    center_from: "probabilities" (MATPAC code) or "logits" (paper Eq. 3, DINO): what the centre averages.
        Either way the loss of step s uses the centre of the batches before s: the code folds each batch's
        mean in lazily, just before the next step's softmax; here update_targets folds it in after the step.
    head_ema_decay_init, head_ema_decay: the teacher head's EMA rate, linear over training (0.998 → 1).
    pred_loss_weight: α (0.5).

Param trees:
    params = M2D's {"encoder", "predictor"} + {"head"};
    target_params = {"encoder_stack": M2D's target stack, "head": teacher head (a copy of the student
    head at init), "center": [K] float32 (zeros at init)}.
"""

import jax
import jax.numpy as jnp
import ml_collections

from audiojepa import config_utils
from audiojepa.methods import m2d
from audiojepa.models import as_dtype
from audiojepa.models.cls_head import ClassificationHead
from audiojepa.ops import distillation
from audiojepa.ops.losses import prediction_loss

Params = m2d.Params

HEAD_CONFIG_KEYS = ("num_prototypes", "head_hidden_dim", "head_bottleneck_dim", "head_layers",
                    "train_prototype_gain", "student_temp", "teacher_temp_init", "teacher_temp",
                    "teacher_temp_warmup_epochs", "center_momentum", "center_from", "head_ema_decay_init",
                    "head_ema_decay", "pred_loss_weight")


def default_config(variant: str = "B") -> ml_collections.ConfigDict:
    """The MATPAC code's settings (matpac.yaml): M2D ViT-B, mask 0.7, no target standardisation + the head."""
    config = m2d.default_config(variant)
    config.norm_target = False  # MATPAC's prediction loss is 2 - 2·cos on raw targets
    config.pos_embed = "sincos"  # the code's fixed tables; the paper's are "learned"
    config.update(dict(
        num_prototypes=2048,
        head_hidden_dim=2048,
        head_bottleneck_dim=256,
        head_layers=3,
        train_prototype_gain=True,
        student_temp=0.1,
        teacher_temp_init=0.04,
        teacher_temp=0.07,
        teacher_temp_warmup_epochs=10.0,
        center_momentum=0.9,
        center_from="probabilities",
        head_ema_decay_init=0.998,
        head_ema_decay=1.0,
        pred_loss_weight=0.5,
    ))
    return config


class MATPAC(m2d.M2D):
    """M2D + the teacher/student classification head. Built like M2D; `steps_per_epoch` converts the
    teacher-temperature warm-up from epochs to steps (the trainer passes it; encoding needs none)."""

    def __init__(self, model_config, *, input_shape: tuple[int, int], steps_per_epoch: int | None = None):
        model_config = config_utils.model_config_with_keys(  # then M2D's keys, checked by M2D
            model_config, HEAD_CONFIG_KEYS, method="MATPAC", values="audiojepa.methods.matpac.default_config()")
        super().__init__(model_config, input_shape=input_shape, steps_per_epoch=steps_per_epoch)
        c = model_config
        if c.center_from not in distillation.CENTER_SOURCES:
            raise ValueError(f"config.model.center_from={c.center_from!r}; valid: {distillation.CENTER_SOURCES}.")
        if not 0.0 <= float(c.pred_loss_weight) <= 1.0:
            raise ValueError(f"config.model.pred_loss_weight={c.pred_loss_weight}; expected a weight in [0, 1].")
        for key in ("student_temp", "teacher_temp_init", "teacher_temp"):
            if not float(c[key]) > 0:
                raise ValueError(f"config.model.{key}={c[key]}; temperatures must be > 0.")
        self.head = ClassificationHead(num_prototypes=int(c.num_prototypes), hidden_dim=int(c.head_hidden_dim),
                                       bottleneck_dim=int(c.head_bottleneck_dim), num_layers=int(c.head_layers),
                                       train_gain=bool(c.train_prototype_gain), dtype=as_dtype(c.dtype))

    # -- params ---------------------------------------------------------------------------------------

    def init(self, rng: jax.Array) -> tuple[Params, Params]:
        """(params, target_params) as in the module docstring; the teacher head starts as the student's."""
        rng_m2d, rng_head = jax.random.split(rng)
        params, encoder_stack = super().init(rng_m2d)
        params["head"] = self.head.init(rng_head, jnp.zeros((1, 1, self.width), jnp.float32))["params"]
        return params, self._target_tree(encoder_stack, params)

    def init_target(self, rng: jax.Array, params: Params) -> Params:
        """The teacher from `params` (e.g. loaded weights): M2D's target stack (init_target), the student's head
        copied, a zero centre."""
        return self._target_tree(self.init_target_stack(rng, params), params)

    def _target_tree(self, encoder_stack: Params, params: Params) -> Params:
        return {"encoder_stack": encoder_stack, "head": jax.tree.map(jnp.copy, params["head"]),
                "center": jnp.zeros((int(self.config.num_prototypes),), jnp.float32)}

    # -- schedules ------------------------------------------------------------------------------------

    def teacher_temp_warmup_steps(self) -> int:
        epochs = float(self.config.teacher_temp_warmup_epochs)
        if epochs <= 0:
            return 0
        if not self.steps_per_epoch:
            raise ValueError("config.model.teacher_temp_warmup_epochs > 0 needs the epoch length: build MATPAC "
                             "with steps_per_epoch (the trainer does, from the shard manifest).")
        return int(round(epochs * self.steps_per_epoch))

    def teacher_temperature(self, step) -> jax.Array:
        return distillation.teacher_temperature(step, self.teacher_temp_warmup_steps(),
                                                float(self.config.teacher_temp_init), float(self.config.teacher_temp))

    def head_ema_decay(self, step, total_steps: int) -> jax.Array:
        """The teacher head's τ at `step`: head_ema_decay_init → head_ema_decay, linear over the run."""
        return m2d.linear_ema_decay(step, total_steps, float(self.config.head_ema_decay_init),
                                    float(self.config.head_ema_decay))

    # -- loss -----------------------------------------------------------------------------------------

    def loss_from_indices(self, params: Params, target_params: Params, lms: jax.Array, visible_idx: jax.Array,
                          masked_idx: jax.Array, step=0) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(scalar loss, metrics) for a given mask; shapes as in M2D.forward_from_indices.

        Metrics: "loss", "loss_pred", "loss_cls", "teacher_temp", M2D's spreads, the collapse monitors of
        audiojepa.ops.distillation.collapse_metrics and "state_update" (the batch centre statistic, [K]; the
        trainer hands it to update_targets and does not log it).
        """
        c = self.config
        out = self.forward_from_indices(params, target_params["encoder_stack"], lms, visible_idx, masked_idx)
        loss_pred, metrics = prediction_loss(out["pred"], out["target"], loss_type=c.loss_type,
                                             norm_target=bool(c.norm_target))

        student_logits = self.head.apply({"params": params["head"]}, out["pred"])
        teacher_head = jax.lax.stop_gradient(target_params["head"])
        teacher_logits = self.head.apply({"params": teacher_head}, jax.lax.stop_gradient(out["target"]))
        teacher_temp = self.teacher_temperature(step)
        teacher_probs = jax.lax.stop_gradient(
            distillation.teacher_probabilities(teacher_logits, target_params["center"], teacher_temp))
        student_log_probs = distillation.student_log_probabilities(student_logits, float(c.student_temp))
        loss_cls = distillation.cross_entropy(teacher_probs, student_log_probs)

        alpha = float(c.pred_loss_weight)
        loss = (1.0 - alpha) * loss_cls + alpha * loss_pred
        center_stat = distillation.batch_center(jax.lax.stop_gradient(teacher_logits), teacher_probs, c.center_from)
        return loss, {"loss": loss, "loss_pred": loss_pred, "loss_cls": loss_cls, "teacher_temp": teacher_temp,
                      **metrics, **distillation.collapse_metrics(teacher_probs, student_log_probs),
                      "state_update": center_stat}

    def loss(self, params: Params, target_params: Params, batch: dict[str, jax.Array], rng: jax.Array,
             step) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(scalar loss, metrics) on batch["lms"] [batch, n_mels, frames] with a mask drawn from rng."""
        lms = batch["lms"]
        visible_idx, masked_idx = self.sample_mask(rng, lms.shape[0])
        return self.loss_from_indices(params, target_params, lms, visible_idx, masked_idx, step)

    # -- target network -------------------------------------------------------------------------------

    def target_stack_params(self, target_params: Params) -> Params:
        """The EMA encoder stack within MATPAC's target tree (which also holds the teacher head and centre)."""
        return target_params["encoder_stack"]

    def update_targets(self, params: Params, target_params: Params, step, total_steps: int, *,
                       state_update: jax.Array | None = None) -> Params:
        """After each optimizer step: EMA of the encoder stack (M2D's τ), EMA of the head (head τ) and the
        centre moved towards `state_update` (the batch statistic from `loss`; None leaves it)."""
        encoder_stack = super().update_targets(params, target_params["encoder_stack"], step, total_steps)
        head_rate = m2d.linear_ema_decay(step, total_steps, 1.0 - float(self.config.head_ema_decay_init),
                                         1.0 - float(self.config.head_ema_decay))
        head = m2d.ema_update(target_params["head"], params["head"], head_rate)
        center = target_params["center"]
        if state_update is not None:
            center = distillation.update_center(center, state_update, float(self.config.center_momentum))
        return {"encoder_stack": encoder_stack, "head": head, "center": center}
