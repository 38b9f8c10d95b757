"""JEPA for audio: the SonyCSL study (Riou et al. 2024) and Audio-JEPA (Tuncay et al. 2025) as one method.

A context encoder sees only the context patches; a predictor (I-JEPA style: the context tokens plus one
shared mask token, with its sin-cos position, per target position) predicts the target encoder's
representation of the target patches. The target encoder is a full copy of the context encoder
(patch embedding, [CLS,] blocks, final norm), moved by EMA of the context encoder; nothing flows back
into it. Reference notes: shared/reference/jepa_family.md §1-3.

`target_domain` says where targets are masked (the SonyCSL study's "input" vs "latent" domain):
    "input": the target encoder encodes only the target patches (M2D-style; the SonyCSL code's default
        `mask_targets=True`).
    "latent": the target encoder encodes all patches and the targets are its outputs at the target
        positions (I-JEPA, Audio-JEPA).
With "latent" and `predict_all_patches=True`, the predictor queries every patch and the loss covers all
of them (the SonyCSL code's `mask_targets=False`, which is not what its paper describes).

Model config keys (`config.model`; `default_config()` gives the SonyCSL paper values):
    variant: encoder size, a key of audiojepa.models.VARIANTS ("tiny", "S", "B", "L").
    patch_size: (frequency bins, frames) per patch.
    use_cls: give the encoders a CLS token (False: patch tokens only, as I-JEPA and both audio JEPAs).
    masking: "unstructured" | "multiblock" | "time".
    mask_counts: "variable" (default for multiblock/time under recipe=paper) or "fixed". "variable" samples
        blocks as the papers do (Riou et al. Fig. 1, I-JEPA): target blocks and a context block drawn
        independently, the targets removed from the context, so each example has its own numbers of
        context and target patches; index arrays are padded to fixed capacities and validity masks reach
        the encoders' attention, the predictor and the loss (audiojepa.ops.masking.MaskSet). "fixed" keeps the
        fixed-count samplers (audiojepa.ops.masking.multiblock / time_only: truncate or top up to Kc, Kt).
        Unstructured masking has equal counts either way.
    mask_ratio: fraction of target patches for "unstructured" (context K = int(L·(1 - r))) and of
        target time columns for "time" with mask_counts="fixed".
    mask_ratio_range: None, or (low, high): a ratio drawn per batch (Audio-JEPA's U[0.4, 0.6]) from
        `num_ratio_buckets` evenly spaced values; the bucket is a host-side function of
        (ratio_seed, step) (`mask_variant`), so a run compiles at most num_ratio_buckets train steps.
        Not for "multiblock".
    num_ratio_buckets, ratio_seed: see mask_ratio_range.
    ratio_sampling: "continuous" (default): with mask_ratio_range and unstructured masking, r ~ U[low, high]
        drawn per batch inside the jitted step (as Audio-JEPA's paper and code do), the index arrays
        padded to the capacity of the range: one compile. "buckets": the older host-side draw from
        num_ratio_buckets values, one compile per bucket.
    multiblock: dict of keyword arguments of audiojepa.ops.masking.multiblock (num_targets, target_scale,
        target_aspect, context_scale, context_aspect, target_placement); with mask_counts="variable",
        of audiojepa.ops.masking.multiblock_variable (target_placement is not used: blocks lie inside the grid).
    time_blocks: for "time" with mask_counts="variable": dict(num_targets, target_scale, context_scale) of
        audiojepa.ops.masking.time_blocks (blocks of whole time columns, sampled like multi-block).
    time_span: for "time" with mask_counts="fixed", target columns come in spans of this many patch columns.
    eval_encoder: "context" or "target": which encoder `encode` and exports use. Riou et al. probe the
        context encoder; Audio-JEPA's paper (I-JEPA's protocol) the frozen target encoder.
    weight_decay_on: "matrices" (no decay on biases and norms) or "all" (see weight_decay_mask).
    target_domain: "input" | "latent" (above).
    predict_all_patches: "latent" only: predict and regress all patches (SonyCSL code option).
    predictor_width, predictor_depth, predictor_heads: predictor sizes; MLP 4·width; output projected
        back to the encoder width.
    predictor_full_grid: False (I-JEPA queries, default) or True (the whole grid with mask tokens
        in the sequence, as the SonyCSL code's M2D-style predictor). With multi-block masking all
        target blocks are queried in one sequence (I-JEPA runs one predictor pass per block, so its
        queries for different blocks never attend to each other).
    loss_type: "smooth_l1" | "mse" | "l2" | "norm_mse" | "smooth_l1_token" (Riou et al.'s Eq. 3; audiojepa.ops.losses).
    target_norm: "none" | "layernorm" | "standardize" (audiojepa.ops.losses).
    smooth_l1_beta: β of smooth_l1 (torch default 1.0).
    ema_schedule: "linear": τ goes linearly from ema_decay_init to ema_decay (M2D, SonyCSL);
        "cosine": τ = τ1 - (τ1 - τ0)·(cos(π·step/total) + 1)/2 (BYOL, I-JEPA family; 0.996 → 1.0).
    ema_decay_init, ema_decay: τ0 and τ1.
    init_target_from_online: start the target encoder as an exact copy of the context encoder (I-JEPA's
        deepcopy; True) or initialise it independently (False).
    dtype: compute dtype, "float32" or "bfloat16"; params are float32 either way.
    attention_impl (optional, None): None/"xla" or "cudnn" (fused attention; NVIDIA GPU, bfloat16 only).
    remat (optional, "none"): "none" | "block" | "dots", rematerialisation of every transformer block
        (audiojepa.models.vit.REMAT_POLICIES); same params and values, less memory, more compute.
    scan_layers (optional, True): run every transformer stack as one lax.scan over its blocks (False
        unrolls them; same params, values equal up to float rounding).

Param trees:
    params = {"encoder": {"patch_embed", ["cls_token",] "stack"}, "predictor": {"embed", "mask_token",
    "stack", "head"}}; target_params has the structure of params["encoder"] (its own patch embedding).
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_dict

from audiojepa import config_utils
from audiojepa.methods.m2d import ema_update, linear_ema_decay
from audiojepa.models import Predictor, ViTEncoder, checked_grid_size, encoder_layers
from audiojepa.models.vit import (
    model_size,
    per_block_ndim,
    performance_options,
    size_override_keys,
)
from audiojepa.ops import losses, masking

Params = dict[str, Any]

MASKINGS = ("unstructured", "multiblock", "time")
MASK_COUNTS = ("variable", "fixed")
RATIO_SAMPLINGS = ("continuous", "buckets")
EVAL_ENCODERS = ("context", "target")
WEIGHT_DECAY_ON = ("matrices", "all")
TARGET_DOMAINS = ("input", "latent")
EMA_SCHEDULES = ("linear", "cosine")
CONFIG_KEYS = ("variant", "patch_size", "use_cls", "masking", "mask_ratio", "mask_ratio_range",
               "num_ratio_buckets", "ratio_seed", "multiblock", "time_span", "target_domain",
               "predict_all_patches", "predictor_width", "predictor_depth", "predictor_heads",
               "predictor_full_grid", "loss_type", "target_norm", "smooth_l1_beta", "ema_schedule",
               "ema_decay_init", "ema_decay", "init_target_from_online", "dtype")


def default_config(variant: str = "B") -> ml_collections.ConfigDict:
    """SonyCSL JEPA (Riou et al.): ViT-B/16, unstructured mask 0.6, input-domain targets, predictor
    512/8/16, smooth L1 on standardised targets, EMA linear 0.99995 → 0.99999 (their code's values)."""
    return ml_collections.ConfigDict(dict(
        variant=variant,
        **size_override_keys(),
        patch_size=(16, 16),
        use_cls=False,
        masking="unstructured",
        mask_ratio=0.6,
        mask_ratio_range=None,
        num_ratio_buckets=5,
        ratio_seed=0,
        # I-JEPA's shipped ranges; see audiojepa.ops.masking.multiblock for the placement.
        multiblock=dict(num_targets=4, target_scale=(0.15, 0.2), target_aspect=(0.75, 1.5),
                        context_scale=(0.85, 1.0), context_aspect=(1.0, 1.0), target_placement="clip"),
        mask_counts="variable",
        ratio_sampling="continuous",
        time_blocks=dict(num_targets=4, target_scale=(0.15, 0.2), context_scale=(0.85, 1.0)),
        time_span=2,
        eval_encoder="context",
        weight_decay_on="matrices",
        target_domain="input",
        predict_all_patches=False,
        predictor_width=512,
        predictor_depth=8,
        predictor_heads=16,
        predictor_mlp_dim=config_dict.placeholder(int),  # None: 4 x predictor_width
        predictor_full_grid=False,
        loss_type="smooth_l1",
        target_norm="standardize",
        smooth_l1_beta=1.0,
        ema_schedule="linear",
        ema_decay_init=0.99995,
        ema_decay=0.99999,
        init_target_from_online=True,
        dtype="float32",
        attention_impl=config_dict.placeholder(str),  # None: XLA; typed so that --config...=cudnn parses
        remat="none",
    ))


def cosine_one_minus_decay(step, total_steps: int, decay_init: float, decay_final: float) -> jax.Array:
    """1 - τ(step) of the cosine schedule τ = τ1 - (τ1 - τ0)·(cos(π·step/total) + 1)/2.

    Computed as (1 - τ1) + (τ1 - τ0)·(cos + 1)/2 so that 1 - τ ≈ 4e-3 keeps its float32 precision.
    step/total is clipped to [0, 1]: τ(0) = τ0, τ(total) = τ1.
    """
    fraction = jnp.clip(jnp.asarray(step, jnp.float32) / max(int(total_steps), 1), 0.0, 1.0)
    return (1.0 - decay_final) + (decay_final - decay_init) * (jnp.cos(jnp.pi * fraction) + 1.0) / 2.0


def _choice(config, key: str, valid: tuple[str, ...]) -> str:
    value = config[key]
    if value not in valid:
        raise ValueError(f"config.model.{key}={value!r}; valid: {valid}.")
    return value


def _choice_or(config, key: str, valid: tuple[str, ...], default: str) -> str:
    """_choice for a key that older configs lack (they get `default`, what they trained with)."""
    return _choice(config, key, valid) if key in config else default


class JEPA:
    """The JEPA method: params, masks, loss, EMA of the target encoder, weight-decay mask, encoder.

    Built from `config.model` (keys in the module docstring) and the input shape (n_mels, frames);
    `steps_per_epoch` is accepted for the common method signature and unused.
    """

    def __init__(self, model_config, *, input_shape: tuple[int, int], steps_per_epoch: int | None = None):
        model_config = config_utils.model_config_with_keys(model_config, CONFIG_KEYS, method="JEPA",
                                                           values="audiojepa.methods.jepa.default_config()")
        self.config = model_config
        self.masking = _choice(model_config, "masking", MASKINGS)
        self.target_domain = _choice(model_config, "target_domain", TARGET_DOMAINS)
        self.ema_schedule = _choice(model_config, "ema_schedule", EMA_SCHEDULES)
        # Keys added in 2026-12 (configs written before them keep the behaviour they trained with).
        self.mask_counts = _choice_or(model_config, "mask_counts", MASK_COUNTS, "fixed")
        self.ratio_sampling = _choice_or(model_config, "ratio_sampling", RATIO_SAMPLINGS, "buckets")
        self.eval_encoder = _choice_or(model_config, "eval_encoder", EVAL_ENCODERS, "context")
        _choice_or(model_config, "weight_decay_on", WEIGHT_DECAY_ON, "matrices")
        self.loss_type = _choice(model_config, "loss_type", losses.LOSS_TYPES)
        self.target_norm = _choice(model_config, "target_norm", losses.TARGET_NORMS)
        self.smooth_l1_beta = float(model_config.smooth_l1_beta)
        self.predict_all_patches = bool(model_config.predict_all_patches)
        if self.predict_all_patches and self.target_domain != "latent":
            raise ValueError("config.model.predict_all_patches=True needs target_domain='latent' (an "
                             "input-domain target encoder never sees the context patches).")

        self.input_shape = tuple(int(n) for n in input_shape)
        self.patch_size = tuple(int(p) for p in model_config.patch_size)
        self.grid_size = checked_grid_size(self.input_shape, self.patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.use_cls = bool(model_config.use_cls)
        self.num_prefix_tokens = 1 if self.use_cls else 0  # `encode` outputs [CLS,] then the patch tokens

        self.mask_ratio = float(model_config.mask_ratio)
        self.ratio_buckets = None
        self.ratio_range = None  # (low, high) drawn continuously per batch
        if model_config.mask_ratio_range is not None:
            if self.masking == "multiblock" or (self.masking == "time" and self.mask_counts == "variable"):
                raise ValueError("config.model.mask_ratio_range is for masking='unstructured', or 'time' with "
                                 "mask_counts='fixed'; block masks are sized by config.model.multiblock / time_blocks.")
            low, high = (float(v) for v in model_config.mask_ratio_range)
            if self.ratio_sampling == "continuous" and self.masking == "unstructured":
                masking.bucketed_ratios(low, high, 2)  # the same range check and message
                self.ratio_range = (low, high)
            else:
                self.ratio_buckets = masking.bucketed_ratios(low, high, int(model_config.num_ratio_buckets))
        self.variable_masks = self.masking in ("multiblock", "time") and self.mask_counts == "variable"
        self.multiblock_kwargs = dict(model_config.multiblock) if self.masking == "multiblock" else {}
        if self.variable_masks and self.masking == "multiblock":
            self.multiblock_kwargs.pop("target_placement", None)
        self.time_blocks_kwargs = dict(model_config.time_blocks) if self.variable_masks and self.masking == "time" else {}
        if self.ratio_range:
            for ratio in self.ratio_range:
                self._check_context(masking.num_visible(self.num_patches, ratio), ratio, "mask_ratio_range")
        elif not self.variable_masks:
            for variant in range(self.num_mask_variants):
                self._mask_counts(variant)  # fail now, naming the key, if a ratio leaves an empty side

        size = model_size(model_config)  # the variant's, or config.model.width/depth/num_heads/mlp_dim
        options = performance_options(model_config)  # dtype, attention_impl, remat
        self.width = size["width"]
        self.encoder_depth = size["depth"]  # the layers `encode` can return
        self.encoder = ViTEncoder(**size, patch_size=self.patch_size, use_cls=self.use_cls, **options)
        self.predictor = Predictor(grid_size=self.grid_size, width=int(model_config.predictor_width),
                                   depth=int(model_config.predictor_depth),
                                   num_heads=int(model_config.predictor_heads), out_dim=self.width,
                                   mlp_dim=model_config.get("predictor_mlp_dim"), use_cls=self.use_cls, full_grid=bool(model_config.predictor_full_grid),
                                   **options)

    # -- masks ----------------------------------------------------------------------------------------

    @property
    def num_mask_variants(self) -> int:
        """How many mask shapes (hence train-step compiles) the method uses: the ratio buckets, or 1."""
        return len(self.ratio_buckets.ratios) if self.ratio_buckets else 1

    def mask_variant(self, step: int) -> int | None:
        """Host-side: the ratio bucket of `step` (a pure function of (ratio_seed, step)), None without
        mask_ratio_range. The trainer passes it back to `loss` as a static value."""
        if self.ratio_buckets is None:
            return None
        return self.ratio_buckets.draw_bucket(int(step), int(self.config.ratio_seed))

    def mask_ratio_of(self, mask_variant: int | None) -> float:
        """The mask ratio of a variant; without one (e.g. evaluation code) the middle bucket."""
        if self.ratio_buckets is None:
            return self.mask_ratio
        if mask_variant is None:
            mask_variant = len(self.ratio_buckets.ratios) // 2
        return self.ratio_buckets.ratios[int(mask_variant)]

    def _mask_counts(self, mask_variant: int | None) -> tuple[int, int]:
        """(Kc, Kt) context and target patch counts of a variant (Python ints)."""
        if self.masking == "multiblock":
            return masking.multiblock_counts(self.grid_size, **self.multiblock_kwargs)
        ratio = self.mask_ratio_of(mask_variant)
        key = "mask_ratio_range" if self.ratio_buckets else "mask_ratio"
        if self.masking == "unstructured":
            num_context = masking.num_visible(self.num_patches, ratio)
        else:
            num_context = self.grid_size[0] * masking.num_visible(self.grid_size[1], ratio)
        self._check_context(num_context, ratio, key)
        return num_context, self.num_patches - num_context

    def _check_context(self, num_context: int, ratio: float, key: str) -> None:
        if not 0 < num_context < self.num_patches:
            raise ValueError(f"config.model.{key} gives mask ratio {ratio}, which leaves {num_context} of "
                             f"{self.num_patches} patches as context; JEPA needs both context and targets.")

    def sample_masks(self, rng: jax.Array, batch_size: int, mask_variant: int | None = None) -> "masking.MaskSet":
        """The masks of one batch as a MaskSet: (context_idx [batch, Nc], context_valid, target_idx [batch, Nt],
        target_valid). The valid fields are None for fixed-count masks (every entry is a patch); with
        variable-size masks (mask_counts="variable", or a continuous mask-ratio range) they are [batch, N] bool
        and the index arrays are padded to the configuration's capacities."""
        if self.variable_masks and self.masking == "multiblock":
            return masking.multiblock_variable(rng, batch_size, self.grid_size, **self.multiblock_kwargs)
        if self.variable_masks:
            return masking.time_blocks(rng, batch_size, self.grid_size, **self.time_blocks_kwargs)
        if self.ratio_range:
            rng_ratio, rng_mask = jax.random.split(rng)
            low, high = self.ratio_range
            ratio = jax.random.uniform(rng_ratio, (), jnp.float32, low, high)  # one ratio per batch
            return masking.unstructured_variable(rng_mask, batch_size, self.num_patches, ratio,
                                                 min_ratio=low, max_ratio=high)
        context_idx, target_idx = self.sample_mask(rng, batch_size, mask_variant)
        return masking.MaskSet(context_idx, None, target_idx, None)

    def sample_mask(self, rng: jax.Array, batch_size: int,
                    mask_variant: int | None = None) -> tuple[jax.Array, jax.Array]:
        """(context_idx [batch, Kc], target_idx [batch, Kt]) int32 for config.model.masking, disjoint.

        For variable-size masks these are the padded index arrays of `sample_masks` (padding entries included);
        use `sample_masks` to get their validity."""
        if self.variable_masks or self.ratio_range:
            masks = self.sample_masks(rng, batch_size, mask_variant)
            return masks.context_idx, masks.target_idx
        if self.masking == "multiblock":
            return masking.multiblock(rng, batch_size, self.grid_size, **self.multiblock_kwargs)
        ratio = self.mask_ratio_of(mask_variant)
        if self.masking == "time":
            return masking.time_only(rng, batch_size, self.grid_size, target_ratio=ratio,
                                     span=int(self.config.time_span))
        return masking.random_unstructured(rng, batch_size, self.num_patches, ratio)

    # -- params ---------------------------------------------------------------------------------------

    def init(self, rng: jax.Array) -> tuple[Params, Params]:
        """(params, target_params), float32. target_params copies params["encoder"] unless
        config.model.init_target_from_online is False (then it is initialised from its own key)."""
        rng_encoder, rng_predictor, rng_target = jax.random.split(rng, 3)
        dummy_lms = jnp.zeros((1, *self.input_shape), jnp.float32)
        encoder = self.encoder.init(rng_encoder, dummy_lms)["params"]
        predictor = self.predictor.init(
            rng_predictor, jnp.zeros((1, self.num_prefix_tokens + 1, self.width), jnp.float32),
            jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), jnp.int32))["params"]
        params = {"encoder": encoder, "predictor": predictor}
        return params, self.init_target(rng_target, params)

    def init_target(self, rng: jax.Array, params: Params) -> Params:
        """The target encoder: a copy of params["encoder"], or (init_target_from_online False) a fresh one from rng."""
        if self.config.init_target_from_online:
            return jax.tree.map(jnp.copy, params["encoder"])
        return self.encoder.init(rng, jnp.zeros((1, *self.input_shape), jnp.float32))["params"]

    def weight_decay_mask(self, params: Params) -> Params:
        """config.model.weight_decay_on "matrices" (default): True for tensors with ndim > 1 per block
        (kernels, CLS and mask tokens; vit.per_block_ndim), False for biases and LayerNorm (M2D's, I-JEPA's
        and Audio-JEPA's param groups); "all": every tensor (the SonyCSL code's single param group)."""
        if self.config.get("weight_decay_on", "matrices") == "all":
            return jax.tree.map(lambda _: True, params)
        return jax.tree.map(lambda ndim: ndim > 1, per_block_ndim(params))

    # -- forward --------------------------------------------------------------------------------------

    def target_encoder_inputs(self, target_params: Params, lms: jax.Array, target_idx: jax.Array) -> jax.Array:
        """The patch tokens the target encoder encodes: its own patch embedding + positions of all
        patches ("latent", [batch, L, D]) or of the target patches only ("input", [batch, Kt, D])."""
        tokens = self.encoder.apply({"params": target_params}, lms, method=ViTEncoder.embed)
        if self.target_domain == "latent":
            return tokens
        return masking.gather_tokens(tokens, target_idx)

    def forward_from_indices(self, params: Params, target_params: Params, lms: jax.Array,
                             context_idx: jax.Array, target_idx: jax.Array, context_valid: jax.Array | None = None,
                             target_valid: jax.Array | None = None) -> dict[str, jax.Array]:
        """All JEPA activations for a given mask.

        Args:
            lms: [batch, n_mels, frames] normalised log-mel.
            context_idx: [batch, Kc] int patch indices seen by the context encoder.
            target_idx: [batch, Kt] int patch indices to predict (predictions and targets in this order).
            context_valid, target_valid: None, or [batch, Kc] / [batch, Kt] bool: False marks padding of a
                variable-size mask; padding is never attended to, and its outputs are meaningless.

        Returns:
            dict with "context" [batch, prefix + Kc, D] (context encoder), "target_tokens" (the target
            encoder's input, see target_encoder_inputs), "target" [batch, P, D] (target encoder outputs at
            the predicted positions, not normalised, no gradient) and "pred" [batch, P, D], where P = Kt,
            or L with predict_all_patches (then in patch order).
        """
        encoder = {"params": params["encoder"]}
        tokens = self.encoder.apply(encoder, lms, method=ViTEncoder.embed)
        context = self.encoder.apply(encoder, masking.gather_tokens(tokens, context_idx), valid=context_valid,
                                     method=ViTEncoder.encode_tokens)
        if self.predict_all_patches:
            pred_idx = jnp.broadcast_to(jnp.arange(self.num_patches, dtype=jnp.int32),
                                        (lms.shape[0], self.num_patches))
            pred_valid = None
        else:
            pred_idx, pred_valid = target_idx, target_valid
        pred = self.predictor.apply({"params": params["predictor"]}, context, context_idx, pred_idx,
                                    context_valid, pred_valid)

        target_params = jax.lax.stop_gradient(target_params)
        target_tokens = self.target_encoder_inputs(target_params, lms, target_idx)
        input_valid = target_valid if self.target_domain == "input" else None
        target = self.encoder.apply({"params": target_params}, target_tokens, valid=input_valid,
                                    method=ViTEncoder.encode_tokens)[:, self.num_prefix_tokens:]
        if self.target_domain == "latent" and not self.predict_all_patches:
            target = masking.gather_tokens(target, target_idx)
        return {"context": context, "target_tokens": target_tokens, "target": jax.lax.stop_gradient(target),
                "pred": pred}

    def loss_from_indices(self, params: Params, target_params: Params, lms: jax.Array, context_idx: jax.Array,
                          target_idx: jax.Array, context_valid: jax.Array | None = None,
                          target_valid: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(scalar loss, metrics) for a given mask; shapes as in forward_from_indices. Padded targets count for
        nothing: each example averages its own valid targets (audiojepa.ops.losses.prediction_loss)."""
        out = self.forward_from_indices(params, target_params, lms, context_idx, target_idx, context_valid,
                                        target_valid)
        loss_valid = None if self.predict_all_patches else target_valid
        loss, metrics = losses.prediction_loss(out["pred"], out["target"], loss_type=self.loss_type,
                                               target_norm=self.target_norm, beta=self.smooth_l1_beta,
                                               valid=loss_valid)
        return loss, {"loss": loss, **metrics}

    def loss(self, params: Params, target_params: Params, batch: dict[str, jax.Array], rng: jax.Array,
             step, mask_variant: int | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(scalar loss, metrics) on batch["lms"] [batch, n_mels, frames] with a mask drawn from rng.

        mask_variant: static ratio bucket (from `mask_variant(step)`); ignored without mask_ratio_range.
        Metrics: "loss", "target_std", "pred_std" (collapse monitors, ≈1 healthy, → 0 collapsed),
        "mask/context_fraction" and "mask/target_fraction" (the achieved fractions of the L patches, mean over
        the batch) and "mask_ratio" (= the target fraction, the older name).
        """
        del step
        lms = batch["lms"]
        masks = self.sample_masks(rng, lms.shape[0], mask_variant)
        loss, metrics = self.loss_from_indices(params, target_params, lms, masks.context_idx, masks.target_idx,
                                               masks.context_valid, masks.target_valid)
        context_fraction, target_fraction = masking.mask_fractions(masks, self.num_patches)
        metrics["mask/context_fraction"] = context_fraction.mean()
        metrics["mask/target_fraction"] = target_fraction.mean()
        metrics["mask_ratio"] = metrics["mask/target_fraction"]
        return loss, metrics

    def encoder_params(self, params: Params, target_params: Params | None = None) -> Params:
        """{"encoder": the evaluated encoder's params}: the context encoder (params["encoder"]) or, with
        config.model.eval_encoder="target", the EMA target encoder (Audio-JEPA's paper)."""
        if self.eval_encoder == "target":
            if target_params is None:
                raise ValueError("config.model.eval_encoder='target' needs the target params (a training state).")
            return {"encoder": target_params}
        return {"encoder": params["encoder"]}

    def encode(self, params: Params, lms: jax.Array, *, layer: int | None = None,
               valid: jax.Array | None = None) -> jax.Array:
        """The evaluated encoder on all patches: lms [batch, n_mels, frames] → [batch, prefix + L, D]
        (prefix = num_prefix_tokens: 1 CLS with use_cls, else 0). `params` holds "encoder" (the training params
        or `encoder_params`, which picks the context or target encoder by config.model.eval_encoder).
        `layer`: None, the final output; k in [-encoder_depth, encoder_depth), block k's output
        (audiojepa.models.encoder_layers: intermediate blocks raw, the last one the final output).
        `valid`: None, or [batch, L] bool over the patches: False marks padding (ViTEncoder.__call__)."""
        return encoder_layers.encode_at(layer, self.encoder_depth,
                                        lambda: self.encoder.apply({"params": params["encoder"]}, lms, False, valid),
                                        lambda: self.encode_layers(params, lms, valid=valid))

    def encode_layers(self, params: Params, lms: jax.Array, *, valid: jax.Array | None = None) -> jax.Array:
        """Every layer of `encode` from one pass: lms [batch, n_mels, frames] → [encoder_depth, batch, prefix + L,
        D]."""
        return encoder_layers.runtime_layers(*self.encoder.apply({"params": params["encoder"]}, lms, True, valid))

    # -- target network -------------------------------------------------------------------------------

    def _one_minus_decay(self, step, total_steps: int) -> jax.Array:
        decay_init, decay_final = float(self.config.ema_decay_init), float(self.config.ema_decay)
        if self.ema_schedule == "cosine":
            return cosine_one_minus_decay(step, total_steps, decay_init, decay_final)
        return linear_ema_decay(step, total_steps, 1.0 - decay_init, 1.0 - decay_final)

    def ema_decay(self, step, total_steps: int) -> jax.Array:
        """τ at `step` (0-based optimizer step) of `total_steps`, per config.model.ema_schedule."""
        return 1.0 - self._one_minus_decay(step, total_steps)

    def update_targets(self, params: Params, target_params: Params, step, total_steps: int) -> Params:
        """EMA of the whole context encoder (patch embedding included) into the target encoder,
        τ = ema_decay(step, total_steps); call after each optimizer step with its 0-based index."""
        return ema_update(target_params, params["encoder"], self._one_minus_decay(step, total_steps))


__all__ = ["JEPA", "default_config", "cosine_one_minus_decay", "MASKINGS", "TARGET_DOMAINS", "EMA_SCHEDULES"]
