"""Masked Modeling Duo (M2D; Niizumi et al.), as in the official code (nttcslab/m2d).

The online encoder sees CLS + the visible patches; a predictor fills the masked positions; an EMA
target stack encodes CLS + the masked patches (embedded by the *online* patch embedding and position
table, under stop_gradient) and its outputs are the regression targets. Details and line references:
shared/reference/m2d.md §1-2.

Model config keys (`config.model`; `default_config()` has the official values):
    variant: encoder size, a key of audiojepa.models.VARIANTS ("tiny", "S", "B", "L").
    patch_size: (frequency bins, frames) per patch, e.g. (16, 16).
    mask_ratio: fraction of masked patches; visible K = int(L·(1 - mask_ratio)) (0.7 → 57 of 190).
    predictor_width, predictor_depth, predictor_heads: predictor sizes (512, 8, 16); MLP 4·width.
    loss_type: "norm_mse" (2 - 2·cos of L2-normalised vectors) or "mse" (mean squared error).
    norm_target: standardise each target token over features (unbiased variance + 1e-6) first.
    ema_decay_init, ema_decay: τ goes linearly from the first to the second over training.
    init_target_from_online: start the target stack as a copy of the online stack (the official code
        initialises it independently, i.e. False).
    dtype: compute dtype, "float32" or "bfloat16"; params are float32 either way.
    attention_impl (optional, None): None/"xla" or "cudnn" (fused attention; NVIDIA GPU, bfloat16 only).
    remat (optional, "none"): "none" | "block" | "dots", rematerialisation of every transformer block
        (audiojepa.models.vit.REMAT_POLICIES); same params and values, less memory, more compute.
    scan_layers (optional, True): run every transformer stack as one lax.scan over its blocks (False
        unrolls them; same params, values equal up to float rounding).
    eval_encoder (optional, "online"): the encoder that `encode`, exports and evaluations use: "online" (the
        M2D and MATPAC papers evaluate it) or "target" (the EMA target stack behind the online patch embedding,
        positions and CLS token, as the target branch runs during training).
    pos_embed (optional, "sincos"): the encoder's and the predictor's position tables: "sincos" (fixed, as
        the official code) or "learned" (trainable tables initialised with the sin-cos ones, MATPAC's paper;
        audiojepa.models.vit.ViTEncoder). The target encoder adds the online encoder's table either way.

Param trees:
    params = {"encoder": {"patch_embed", "cls_token", "stack"}, "predictor": {"embed", "mask_token",
    "stack", "head"}}, plus "pos_embed" in both ([1, F·T', D] and [1, 1 + F·T', predictor width]) with
    pos_embed="learned"; target_params has the structure of params["encoder"]["stack"] (blocks + norm).
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from audiojepa import config_utils
from audiojepa.models import (
    Predictor,
    TransformerStack,
    ViTEncoder,
    checked_grid_size,
    encoder_layers,
)
from audiojepa.models.vit import (
    POS_EMBEDS,
    model_size,
    per_block_ndim,
    performance_options,
    size_override_keys,
)
from audiojepa.ops import masking

# The loss helpers live in audiojepa.ops.losses (shared with the JEPA family); re-exported under their M2D names.
from audiojepa.ops.losses import (  # noqa: F401
    L2_NORMALIZE_EPS,
    STANDARDIZE_EPS,
    l2_normalize,
    prediction_loss,
    standardize_tokens,
)
from audiojepa.ops.losses import token_spread as _spread  # noqa: F401

Params = dict[str, Any]

CONFIG_KEYS = ("variant", "patch_size", "mask_ratio", "predictor_width", "predictor_depth", "predictor_heads",
               "loss_type", "norm_target", "ema_decay_init", "ema_decay", "init_target_from_online", "dtype")
LOSS_TYPES = ("norm_mse", "mse")
EVAL_ENCODERS = ("online", "target")  # the subset of audiojepa.ops.losses.LOSS_TYPES that M2D uses


def default_config(variant: str = "B") -> ml_collections.ConfigDict:
    """The official M2D settings (m2d_vit_base, 16×16 patches, mask 0.7, EMA 0.99995 → 0.99999)."""
    return ml_collections.ConfigDict(dict(
        variant=variant,
        **size_override_keys(),
        patch_size=(16, 16),
        mask_ratio=0.7,
        predictor_width=512,
        predictor_depth=8,
        predictor_heads=16,
        predictor_mlp_dim=config_dict.placeholder(int),  # None: 4 x predictor_width
        loss_type="norm_mse",
        norm_target=True,
        ema_decay_init=0.99995,
        ema_decay=0.99999,
        init_target_from_online=False,
        eval_encoder="online",
        dtype="float32",
        attention_impl=config_dict.placeholder(str),  # None: XLA; typed so that --config...=cudnn parses
        remat="none",
    ))


def linear_ema_decay(step, total_steps: int, decay_init: float, decay_final: float) -> jax.Array:
    """τ(step) = init + (final - init) · step / (total_steps - 1), held at `final` after the last step."""
    fraction = jnp.clip(jnp.asarray(step, jnp.float32) / max(int(total_steps) - 1, 1), 0.0, 1.0)
    return decay_init + (decay_final - decay_init) * fraction


def ema_update(target_params: Params, online_params: Params, one_minus_decay) -> Params:
    """target ← τ·target + (1 - τ)·online, leaf by leaf (two trees of the same structure).

    Takes 1 - τ rather than τ and computes target + (1 - τ)·(online - target): the same value, but a
    float32 τ ≈ 0.99999 would carry up to 0.3% error into (1 - τ).
    """
    rate = jnp.asarray(one_minus_decay, jnp.float32)
    return jax.tree.map(lambda t, o: t + (rate * (o - t)).astype(t.dtype), target_params, online_params)


class M2D:
    """The M2D method: param construction, loss, EMA of the target stack, weight-decay mask, encoder.

    Built from `config.model` (keys in the module docstring) and the input shape (n_mels, frames);
    `steps_per_epoch` (unused by M2D) is for subclasses with schedules in epochs.
    """

    num_prefix_tokens = 1  # `encode` outputs CLS first, then the patch tokens

    def __init__(self, model_config, *, input_shape: tuple[int, int], steps_per_epoch: int | None = None):
        model_config = config_utils.model_config_with_keys(model_config, CONFIG_KEYS, method="M2D",
                                                           values="audiojepa.methods.m2d.default_config()")
        if model_config.loss_type not in LOSS_TYPES:
            raise ValueError(f"config.model.loss_type={model_config.loss_type!r}; valid: {LOSS_TYPES}.")
        self.config = model_config
        self.steps_per_epoch = steps_per_epoch
        self.input_shape = tuple(int(n) for n in input_shape)
        self.patch_size = tuple(int(p) for p in model_config.patch_size)
        self.grid_size = checked_grid_size(self.input_shape, self.patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.mask_ratio = float(model_config.mask_ratio)
        self.num_visible = masking.num_visible(self.num_patches, self.mask_ratio)
        if not 0 < self.num_visible < self.num_patches:
            raise ValueError(f"config.model.mask_ratio={self.mask_ratio} leaves {self.num_visible} of "
                             f"{self.num_patches} patches visible; M2D needs both visible and masked patches.")

        size = model_size(model_config)  # the variant's, or config.model.width/depth/num_heads/mlp_dim
        options = performance_options(model_config)  # dtype, attention_impl, remat
        # Configs and checkpoints from before the key: the official fixed tables.
        pos_embed = model_config.get("pos_embed", "sincos")
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"config.model.pos_embed={pos_embed!r}; valid: {POS_EMBEDS}.")
        self.eval_encoder = model_config.get("eval_encoder", "online")
        if self.eval_encoder not in EVAL_ENCODERS:
            raise ValueError(f"config.model.eval_encoder={self.eval_encoder!r}; valid: {EVAL_ENCODERS}.")
        self.width = size["width"]
        self.encoder_depth = size["depth"]  # the layers `encode` can return
        self.encoder = ViTEncoder(**size, patch_size=self.patch_size, pos_embed=pos_embed, pos_grid=self.grid_size,
                                  **options)
        self.target_stack = TransformerStack(size["depth"], size["num_heads"], size["mlp_dim"], **options)
        self.predictor = Predictor(grid_size=self.grid_size, width=int(model_config.predictor_width),
                                   depth=int(model_config.predictor_depth),
                                   num_heads=int(model_config.predictor_heads), out_dim=self.width,
                                   mlp_dim=model_config.get("predictor_mlp_dim"), pos_embed=pos_embed, **options)

    # -- params ---------------------------------------------------------------------------------------

    def init(self, rng: jax.Array) -> tuple[Params, Params]:
        """(params, target_params), float32; the target stack from init_target with its own key."""
        rng_encoder, rng_predictor, rng_target = jax.random.split(rng, 3)
        encoder = self.encoder.init(rng_encoder, jnp.zeros((1, *self.input_shape), jnp.float32))["params"]
        predictor = self.predictor.init(
            rng_predictor, jnp.zeros((1, 1 + self.num_visible, self.width), jnp.float32),
            jnp.arange(self.num_visible, dtype=jnp.int32)[None],
            jnp.arange(self.num_visible, self.num_patches, dtype=jnp.int32)[None])["params"]
        params = {"encoder": encoder, "predictor": predictor}
        return params, self.init_target_stack(rng_target, params)

    def init_target(self, rng: jax.Array, params: Params) -> Params:
        """The EMA target of `params` (e.g. loaded weights; audiojepa.training.init_from): M2D's is the target stack."""
        return self.init_target_stack(rng, params)

    def init_target_stack(self, rng: jax.Array, params: Params) -> Params:
        """A fresh target stack: independently initialised from rng (as the official code), or a copy of
        params["encoder"]["stack"] when config.model.init_target_from_online."""
        if self.config.init_target_from_online:
            return jax.tree.map(jnp.copy, params["encoder"]["stack"])
        num_masked = self.num_patches - self.num_visible
        return self.target_stack.init(rng, jnp.zeros((1, 1 + num_masked, self.width), jnp.float32))["params"]

    def weight_decay_mask(self, params: Params) -> Params:
        """True for tensors with ndim > 1 per block (kernels, CLS and mask tokens, learned position tables;
        vit.per_block_ndim); False for biases and LayerNorm.

        Same set as the official timm rule (no decay if ndim == 1 or the name ends in '.bias'; M2D passes no
        skip list, so a trainable position table would be decayed there too).
        """
        return jax.tree.map(lambda ndim: ndim > 1, per_block_ndim(params))

    # -- forward --------------------------------------------------------------------------------------

    def forward_from_indices(self, params: Params, target_params: Params, lms: jax.Array,
                             visible_idx: jax.Array, masked_idx: jax.Array) -> dict[str, jax.Array]:
        """All M2D activations for a given mask.

        Args:
            lms: [batch, n_mels, frames] normalised log-mel.
            visible_idx: [batch, K] int patch indices seen by the online encoder.
            masked_idx: [batch, L - K] int patch indices to predict (predictions and targets in this order).

        Returns:
            dict with "context" [batch, 1 + K, D] (online encoder, CLS first), "target_tokens"
            [batch, L - K, D] (target-encoder input without CLS), "target" [batch, L - K, D] (target
            encoder output, CLS dropped, not standardised) and "pred" [batch, L - K, D].
        """
        encoder = {"params": params["encoder"]}
        tokens = self.encoder.apply(encoder, lms, method=ViTEncoder.embed)
        context = self.encoder.apply(encoder, masking.gather_tokens(tokens, visible_idx),
                                     method=ViTEncoder.encode_tokens)
        pred = self.predictor.apply({"params": params["predictor"]}, context, visible_idx, masked_idx)

        # The target encoder is the online encoder (its patch embedding, positions and CLS) with the EMA
        # stack swapped in; nothing in this branch is trained. A learned position table is the online one of
        # this step (in `tokens`; passed along only because the module declares it).
        target_tokens = jax.lax.stop_gradient(masking.gather_tokens(tokens, masked_idx))
        target_encoder = jax.lax.stop_gradient({**{k: v for k, v in params["encoder"].items() if k != "stack"},
                                                "stack": target_params})
        target = self.encoder.apply({"params": target_encoder}, target_tokens, method=ViTEncoder.encode_tokens)
        return {"context": context, "target_tokens": target_tokens, "target": target[:, 1:], "pred": pred}

    def loss_from_indices(self, params: Params, target_params: Params, lms: jax.Array, visible_idx: jax.Array,
                          masked_idx: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(scalar loss, metrics) for a given mask; shapes as in forward_from_indices."""
        out = self.forward_from_indices(params, target_params, lms, visible_idx, masked_idx)
        loss, metrics = prediction_loss(out["pred"], out["target"], loss_type=self.config.loss_type,
                                        norm_target=bool(self.config.norm_target))
        return loss, {"loss": loss, **metrics}

    def sample_mask(self, rng: jax.Array, batch_size: int) -> tuple[jax.Array, jax.Array]:
        """(visible_idx [batch, K], masked_idx [batch, L - K]) int32, unstructured random."""
        return masking.random_unstructured(rng, batch_size, self.num_patches, self.mask_ratio)

    def loss(self, params: Params, target_params: Params, batch: dict[str, jax.Array], rng: jax.Array,
             step) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(scalar loss, metrics) on batch["lms"] [batch, n_mels, frames] with a mask drawn from rng.

        Metrics: "loss", "target_std", "pred_std" (collapse monitors, ≈1 healthy, → 0 collapsed).
        `step` is unused by M2D (its schedules live in the trainer and in update_targets).
        """
        del step
        lms = batch["lms"]
        visible_idx, masked_idx = self.sample_mask(rng, lms.shape[0])
        return self.loss_from_indices(params, target_params, lms, visible_idx, masked_idx)

    def target_stack_params(self, target_params: Params) -> Params:
        """The EMA target's transformer stack (blocks + norm) within target_params (M2D: all of it)."""
        return target_params

    def encoder_params(self, params: Params, target_params: Params | None = None) -> Params:
        """{"encoder": ...}, what `encode` takes and exports hold: the online encoder, or with
        config.model.eval_encoder="target" the online patch embedding, positions and CLS with the EMA stack."""
        if self.eval_encoder == "online":
            return {"encoder": params["encoder"]}
        if target_params is None:
            raise ValueError("config.model.eval_encoder='target' needs the target params (a training state).")
        return {"encoder": {**params["encoder"], "stack": self.target_stack_params(target_params)}}

    def encode(self, params: Params, lms: jax.Array, *, layer: int | None = None,
               valid: jax.Array | None = None) -> jax.Array:
        """The evaluated encoder on all patches: lms [batch, n_mels, frames] → [batch, 1 + L, D], CLS first.
        `params` holds "encoder" (the training params, or `encoder_params`: online or EMA-target stack).
        `layer`: None, the final output; k in [-encoder_depth, encoder_depth), block k's output
        (audiojepa.models.encoder_layers: intermediate blocks raw, the last one the final output).
        `valid`: None, or [batch, L] bool over the patches: False marks padding (ViTEncoder.__call__).

        Any number of frames works (the time grid is frames // patch frames); positions are those of a
        clip starting at frame 0. A learned position table (pos_embed="learned") serves at most the training
        grid; audiojepa.adapters.encoder embeds longer inputs in chunks of the training width.
        """
        return encoder_layers.encode_at(layer, self.encoder_depth,
                                        lambda: self.encoder.apply({"params": params["encoder"]}, lms, False, valid),
                                        lambda: self.encode_layers(params, lms, valid=valid))

    def encode_layers(self, params: Params, lms: jax.Array, *, valid: jax.Array | None = None) -> jax.Array:
        """Every layer of `encode` from one pass: lms [batch, n_mels, frames] → [encoder_depth, batch, 1 + L, D]."""
        return encoder_layers.runtime_layers(*self.encoder.apply({"params": params["encoder"]}, lms, True, valid))

    # -- target network -------------------------------------------------------------------------------

    def ema_decay(self, step, total_steps: int) -> jax.Array:
        """τ at `step` (0-based optimizer step) of `total_steps`: ema_decay_init → ema_decay, linear."""
        return linear_ema_decay(step, total_steps, float(self.config.ema_decay_init), float(self.config.ema_decay))

    def update_targets(self, params: Params, target_params: Params, step, total_steps: int) -> Params:
        """EMA of the online stack into the target stack, with τ = ema_decay(step, total_steps).

        Call right after each optimizer step with the 0-based index of that step (the official
        global_step), so the first update uses ema_decay_init. `step` may be traced.
        """
        # The linear schedule of the complements is exactly 1 - τ(step), without float32 cancellation.
        one_minus_decay = linear_ema_decay(step, total_steps, 1.0 - float(self.config.ema_decay_init),
                                           1.0 - float(self.config.ema_decay))
        return ema_update(target_params, params["encoder"]["stack"], one_minus_decay)
